//! Store-wide reader/writer lock on `<root>/LOCK` via flock(2).
//!
//! put, delete, materialize and verify hold it shared; gc holds it exclusive, so gc never
//! deletes a chunk that a concurrent put has written but not yet referenced from a manifest,
//! nor one a concurrent materialize is about to read. flock locks belong to the open file
//! description, so every acquisition opens the file anew: this works between threads of one
//! process as well as between processes, and the lock dies with the process on a crash.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// Held lock; released on drop (closing the descriptor releases the flock).
#[derive(Debug)]
pub(crate) struct LockGuard {
    _file: File,
}

/// Shared or exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(Error::io("open lock file", path))
}

fn op(mode: Mode) -> libc::c_int {
    match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    }
}

/// Block until the lock is held.
pub(crate) fn lock(path: &Path, mode: Mode) -> Result<LockGuard> {
    let file = open(path)?;
    loop {
        // SAFETY: flock on a valid descriptor owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op(mode)) };
        if rc == 0 {
            return Ok(LockGuard { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::io("flock", path)(e));
        }
    }
}

/// Take the lock if it is free right now.
#[cfg(test)]
pub(crate) fn try_lock(path: &Path, mode: Mode) -> Result<Option<LockGuard>> {
    let file = open(path)?;
    // SAFETY: flock on a valid descriptor owned by `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op(mode) | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(LockGuard { _file: file }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(Error::io("flock", path)(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_shared_and_vice_versa() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("LOCK");
        let s1 = lock(&p, Mode::Shared).expect("shared");
        let s2 = try_lock(&p, Mode::Shared).expect("try");
        assert!(s2.is_some(), "shared locks coexist");
        assert!(try_lock(&p, Mode::Exclusive).expect("try").is_none());
        drop(s1);
        drop(s2);
        let x = try_lock(&p, Mode::Exclusive).expect("try");
        assert!(x.is_some());
        assert!(try_lock(&p, Mode::Shared).expect("try").is_none());
    }
}
