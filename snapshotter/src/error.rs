//! The crate's error type. Every variant that concerns stored data names the snapshot (and
//! the chunk or manifest) and says what the operator should do, because these messages end
//! up in `thaw` CLI output and platform logs where nobody can attach a debugger.

use std::io;
use std::path::{Path, PathBuf};

use crate::digest::Digest;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot name failed validation (see [`crate::validate_name`]).
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// No ref with this name exists.
    #[error("snapshot {name:?} not found in store {root}")]
    NotFound { name: String, root: PathBuf },

    /// A chunk failed verification: undecodable, wrong length, or blake3 of its
    /// decompressed content differs from its address.
    #[error(
        "chunk {chunk} of snapshot {snapshot:?} is corrupt ({detail}); the bad chunk file was \
         moved to {quarantined}; rebuild and republish the snapshot (then run gc)"
    )]
    CorruptChunk {
        snapshot: String,
        chunk: Digest,
        detail: String,
        /// Where the bad file went (so the next put stores a good copy instead of
        /// deduplicating against the corrupt one), or a note if moving it failed.
        quarantined: String,
    },

    /// A chunk referenced by the snapshot's manifest has no file in the store.
    #[error(
        "chunk {chunk} of snapshot {snapshot:?} is missing ({path}); rebuild and republish the \
         snapshot"
    )]
    MissingChunk {
        snapshot: String,
        chunk: Digest,
        path: PathBuf,
    },

    /// The ref or the manifest it points to does not decode, does not match its hash, or
    /// describes an unsafe tree.
    #[error(
        "manifest {manifest} of snapshot {snapshot:?} is corrupt: {detail}; delete the snapshot \
         and republish it"
    )]
    CorruptManifest {
        snapshot: String,
        manifest: String,
        detail: String,
    },

    /// The ref points to a manifest file that does not exist.
    #[error(
        "manifest {manifest} of snapshot {snapshot:?} is missing ({path}); delete the snapshot \
         and republish it"
    )]
    MissingManifest {
        snapshot: String,
        manifest: Digest,
        path: PathBuf,
    },

    /// ENOSPC or EDQUOT while writing. Temp files of the failed operation were removed and
    /// the previous state of the snapshot (if any) is intact.
    #[error("disk full at {path} while writing snapshot {snapshot:?}: free space and retry")]
    DiskFull { snapshot: String, path: PathBuf },

    /// The store's VERSION file is from a different, incompatible format.
    #[error(
        "store at {root} has format {found:?}, this build reads {expected:?}; use a matching \
         thaw build or a fresh store directory"
    )]
    UnsupportedVersion {
        root: PathBuf,
        found: String,
        expected: String,
    },

    /// The source tree contains something other than regular files, directories and
    /// symlinks, or a name that is not UTF-8.
    #[error("cannot store {path}: {reason}")]
    UnsupportedFile { path: PathBuf, reason: String },

    /// `materialize` refuses to overwrite an existing destination.
    #[error("materialize destination {path} already exists; remove it or pick another path")]
    DestinationExists { path: PathBuf },

    /// Any other I/O failure, with the operation and path it happened on.
    #[error("{op} {path}: {source}{hint}", hint = disk_hint(source))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn disk_hint(e: &io::Error) -> &'static str {
    if is_disk_full(e) {
        " (disk full: free space and retry)"
    } else {
        ""
    }
}

/// ENOSPC and EDQUOT both mean "no room": the fix is the same.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl Error {
    /// Whether the snapshot itself is damaged or gone (as opposed to a transient I/O
    /// failure): the caller should stop trying it and rebuild.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::CorruptChunk { .. }
                | Error::MissingChunk { .. }
                | Error::CorruptManifest { .. }
                | Error::MissingManifest { .. }
                | Error::NotFound { .. }
        )
    }

    /// Build an [`Error::Io`] closure for `map_err`.
    pub(crate) fn io(op: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        move |source| Error::Io { op, path, source }
    }

    /// Attach the snapshot name to low-level errors raised while writing it: a disk-full
    /// I/O error becomes [`Error::DiskFull`] so callers can match on it.
    pub(crate) fn for_snapshot(self, snapshot: &str) -> Error {
        match self {
            Error::Io { path, source, .. } if is_disk_full(&source) => Error::DiskFull {
                snapshot: snapshot.to_string(),
                path,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_becomes_disk_full_with_fix() {
        let e = Error::io("write", "/s/tmp/x")(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(e.to_string().contains("disk full"), "{e}");
        let e = e.for_snapshot("tpl-a");
        assert!(matches!(e, Error::DiskFull { .. }));
        let msg = e.to_string();
        assert!(msg.contains("disk full at /s/tmp/x") && msg.contains("free space and retry"));
    }

    #[test]
    fn other_io_stays_io() {
        let e =
            Error::io("open", "/x")(io::Error::from_raw_os_error(libc::EACCES)).for_snapshot("a");
        assert!(matches!(e, Error::Io { .. }));
    }
}
