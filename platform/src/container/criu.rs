//! What the installed CRIU can do beyond release 4.0: the options our patches add
//! (`scripts/criu-patches/`). A CRIU 4 built by someone else works without them, so thaw
//! asks the binary rather than assuming.
//!
//! Asking costs a process start, and the CLI is a new process per command, so the answer is
//! cached in `$THAW_HOME/criu-features` under the binary's path, size and modification time:
//! installing another CRIU invalidates it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use thaw_microvm::util::find_on_path;
use tracing::debug;

use crate::paths::Paths;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `mmap-pages`: restore private memory copy-on-write from the pages image (patch 0002).
    pub mmap_pages: bool,
    /// `restore-gate-fd`: a restore prepared ahead waits for one byte before it restores
    /// (patch 0006).
    pub restore_gate: bool,
}

/// The features of the `criu` that runc will run (the first on PATH).
pub fn features(paths: &Paths) -> Features {
    let Some(bin) = find_on_path("criu") else {
        return Features::default();
    };
    let Ok(meta) = std::fs::metadata(&bin) else {
        return Features::default();
    };
    let key = format!(
        "{} {} {}.{}",
        bin.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let cache = paths.criu_features();
    if let Some(f) = read_cached(&cache, &key) {
        return f;
    }
    let f = probe(&bin);
    debug!(criu = %bin.display(), ?f, "probed CRIU features");
    // Best effort: without the cache the next process probes again.
    let tmp = cache.with_extension("tmp");
    let text = format!(
        "{key}\nmmap-pages={}\nrestore-gate={}\n",
        u8::from(f.mmap_pages),
        u8::from(f.restore_gate)
    );
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &cache);
    }
    f
}

/// [`features`] without the cache (for `thaw doctor`); `None` when no criu is on PATH.
pub fn features_uncached() -> Option<Features> {
    find_on_path("criu").map(|b| probe(&b))
}

fn read_cached(cache: &Path, key: &str) -> Option<Features> {
    let text = std::fs::read_to_string(cache).ok()?;
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    let (mut mmap_pages, mut restore_gate) = (None, None);
    for l in lines {
        match l.split_once('=') {
            Some(("mmap-pages", v)) => mmap_pages = Some(v == "1"),
            Some(("restore-gate", v)) => restore_gate = Some(v == "1"),
            _ => return None,
        }
    }
    // A cache written before a feature was known does not answer for it: probe again.
    Some(Features {
        mmap_pages: mmap_pages?,
        restore_gate: restore_gate?,
    })
}

/// CRIU parses every option before it acts, so an option it lacks fails `--version`.
fn probe(bin: &Path) -> Features {
    let accepts = |opt: &[&str]| {
        Command::new(bin)
            .args(opt)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    Features {
        mmap_pages: accepts(&["--mmap-pages"]),
        restore_gate: accepts(&["--restore-gate-fd", "-1"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_answers_only_for_the_same_binary() {
        let dir = std::env::temp_dir().join(format!("thaw-criu-features-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = dir.join("criu-features");
        std::fs::write(
            &cache,
            "/usr/sbin/criu 10 1.2\nmmap-pages=1\nrestore-gate=0\n",
        )
        .unwrap();
        assert_eq!(
            read_cached(&cache, "/usr/sbin/criu 10 1.2"),
            Some(Features {
                mmap_pages: true,
                restore_gate: false
            })
        );
        // Written before the gate was known: not an answer.
        std::fs::write(&cache, "/usr/sbin/criu 10 1.2\nmmap-pages=1\n").unwrap();
        assert_eq!(read_cached(&cache, "/usr/sbin/criu 10 1.2"), None);
        assert_eq!(read_cached(&cache, "/usr/sbin/criu 11 1.2"), None);
        std::fs::write(&cache, "/usr/sbin/criu 10 1.2\nsomething-else=1\n").unwrap();
        assert_eq!(read_cached(&cache, "/usr/sbin/criu 10 1.2"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_binary_that_rejects_the_option_lacks_the_feature() {
        // `false` exits 1 whatever it is given, like a CRIU without the option.
        if let Some(f) = find_on_path("false") {
            assert_eq!(probe(&f), Features::default());
        }
        if let Some(t) = find_on_path("true") {
            assert_eq!(
                probe(&t),
                Features {
                    mmap_pages: true,
                    restore_gate: true
                }
            );
        }
    }
}
