//! Materialising snapshots for restore: verified, parallel, sparse.
//!
//! A tree is always built under a temp name and renamed into place, so a destination path
//! either does not exist or holds a complete, fully verified tree. Chunks are decoded by
//! `threads` workers and written with pwrite at their offsets into files pre-sized with
//! ftruncate; ranges no chunk covers are never written and stay holes.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::atomic::{self, TempGuard};
use crate::chunk;
use crate::error::{Error, Result};
use crate::lock;
use crate::manifest::{ChunkRef, EntryKind, Manifest};
use crate::{read_dir, validate_name, Digest, Store};

/// Files open at once while materialising; bounds descriptor use for large trees.
const FILE_BATCH: usize = 256;

/// What a materialise did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaterializeStats {
    pub files: u64,
    /// Sum of logical file sizes.
    pub logical_bytes: u64,
    /// Bytes actually written (the rest are holes).
    pub written_bytes: u64,
    /// Chunk references decoded and verified.
    pub chunks: u64,
    pub elapsed: Duration,
}

/// Which cache entries [`Store::evict_cache`] removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evict<'a> {
    /// The entry for this snapshot's current manifest.
    Snapshot(&'a str),
    /// Entries whose manifest no ref points to any more (deleted or replaced snapshots).
    Unreferenced,
    /// Everything.
    All,
}

/// What an eviction removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvictStats {
    pub entries_removed: u64,
    /// Disk blocks freed, in bytes.
    pub bytes_freed: u64,
}

/// Per-thread chunk reader: reuses its buffers and zstd context across chunks.
pub(crate) struct ChunkReader<'s> {
    store: &'s Store,
    snapshot: &'s str,
    dec: zstd::bulk::Decompressor<'static>,
    stored: Vec<u8>,
    out: Vec<u8>,
}

impl<'s> ChunkReader<'s> {
    fn new(store: &'s Store, snapshot: &'s str) -> Result<Self> {
        Ok(ChunkReader {
            store,
            snapshot,
            dec: zstd::bulk::Decompressor::new().map_err(Error::io("init zstd", store.root()))?,
            stored: Vec::new(),
            out: Vec::new(),
        })
    }

    /// Read, decompress and verify one chunk.
    pub(crate) fn read(&mut self, c: &ChunkRef) -> Result<&[u8]> {
        let path = chunk::chunk_path(&self.store.chunks_dir(), &c.id);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::MissingChunk {
                    snapshot: self.snapshot.to_string(),
                    chunk: c.id,
                    path,
                })
            }
            Err(e) => return Err(Error::io("open chunk", &path)(e)),
        };
        self.stored.clear();
        f.read_to_end(&mut self.stored)
            .map_err(Error::io("read chunk", &path))?;
        let len = c.len as usize;
        if let Err(detail) =
            chunk::decode_verified(&mut self.dec, &self.stored, len, &c.id, &mut self.out)
        {
            return Err(self.store.corrupt_chunk(self.snapshot, c.id, &path, detail));
        }
        Ok(&self.out)
    }
}

/// Run `f` over `items` on up to `threads` threads, each with its own [`ChunkReader`].
/// Stops early on the first error, which is returned.
pub(crate) fn parallel<T: Sync>(
    threads: usize,
    items: &[T],
    snapshot: &str,
    store: &Store,
    f: impl Fn(&mut ChunkReader<'_>, &T) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let threads = threads.min(items.len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let run = || -> Result<()> {
                    let mut reader = ChunkReader::new(store, snapshot)?;
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        f(&mut reader, item)?;
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    failed.store(true, Ordering::Relaxed);
                    let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(e);
                }
            });
        }
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Store {
    /// Write snapshot `name` as a directory tree at `dest`, which must not exist. Every
    /// chunk is verified before its bytes are written; on any error nothing is left at
    /// `dest`. The tree is not fsynced: it is restore scratch space (use
    /// [`Store::materialize_cached`] for a durable shared copy).
    pub fn materialize(&self, name: &str, dest: &Path) -> Result<MaterializeStats> {
        validate_name(name)?;
        let _lock = self.lock(lock::Mode::Shared)?;
        let (_, m) = self.resolve(name)?;
        if fs::symlink_metadata(dest).is_ok() {
            return Err(Error::DestinationExists {
                path: dest.to_path_buf(),
            });
        }
        let base = dest.file_name().map(|n| n.as_bytes()).unwrap_or(b"dest");
        let tmp = atomic::parent_of(dest).join(atomic::unique_name(&format!(
            ".{}.materialize",
            String::from_utf8_lossy(base)
        )));
        let guard = TempGuard::default();
        guard.add(tmp.clone());
        let stats = self
            .build_tree(name, &m, &tmp)
            .map_err(|e| e.for_snapshot(name))?;
        rename_noreplace(&tmp, dest).map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                Error::DestinationExists {
                    path: dest.to_path_buf(),
                }
            } else {
                Error::io("rename materialised tree to", dest)(e).for_snapshot(name)
            }
        })?;
        guard.forget(&tmp);
        Ok(stats)
    }

    /// Materialise snapshot `name` once per machine into `<root>/cache/<manifest id>/` and
    /// return that path; later calls (from any thread or process) return it immediately.
    /// Concurrent first calls serialise on a per-entry lock, so only one builds it. The
    /// entry is fsynced before it appears. Treat it as read-only: clones share it.
    pub fn materialize_cached(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        let _lock = self.lock(lock::Mode::Shared)?;
        // Fast path without parsing the manifest (~1 MB of JSON for 200 MB): an entry only
        // ever appears under this name after being built from the verified manifest.
        if let Ok(id) = self.ref_id(name) {
            let dest = self.cache_dir().join(id.to_hex());
            if dest.is_dir() {
                return Ok(dest);
            }
        }
        let (id, m) = self.resolve(name)?;
        let dest = self.cache_dir().join(id.to_hex());
        let _entry = lock::lock(
            &self.cache_dir().join(format!("{id}.lock")),
            lock::Mode::Exclusive,
        )?;
        if dest.is_dir() {
            return Ok(dest); // built by whoever held the entry lock before us
        }
        let tmp = self
            .cache_dir()
            .join(atomic::unique_name(&format!("build-{id}")));
        let guard = TempGuard::default();
        guard.add(tmp.clone());
        let run = || -> Result<()> {
            self.build_tree(name, &m, &tmp)?;
            // The cache outlives reboots: its content must be on disk before its name is.
            atomic::syncfs(&tmp)?;
            match rename_noreplace(&tmp, &dest) {
                Ok(()) => {}
                // Another builder won without our lock (e.g. an older process): reuse it.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty
                    ) => {}
                Err(e) => return Err(Error::io("rename cache entry to", &dest)(e)),
            }
            atomic::fsync_dir(&self.cache_dir())
        };
        run().map_err(|e| e.for_snapshot(name))?;
        if dest.is_dir() {
            // Our tmp was renamed; nothing left to clean.
            guard.forget(&tmp);
        }
        Ok(dest)
    }

    /// Remove cache entries. Takes the store lock exclusively (waits for running puts and
    /// materialisations). The caller must know no clone still uses an evicted entry.
    pub fn evict_cache(&self, which: Evict<'_>) -> Result<EvictStats> {
        let _lock = self.lock(lock::Mode::Exclusive)?;
        let keep: std::collections::HashSet<String> = match which {
            Evict::All => Default::default(),
            Evict::Snapshot(name) => {
                let (id, _) = self.resolve(name)?;
                let mut stats = EvictStats::default();
                self.evict_entry(&id.to_hex(), &mut stats)?;
                return Ok(stats);
            }
            // A ref that does not resolve keeps nothing alive.
            Evict::Unreferenced => self
                .ref_names()?
                .iter()
                .filter_map(|n| self.resolve(n).ok())
                .map(|(id, _)| id.to_hex())
                .collect(),
        };
        let mut stats = EvictStats::default();
        for e in read_dir(&self.cache_dir())? {
            let Ok(n) = e.file_name().into_string() else {
                continue;
            };
            if n.parse::<Digest>().is_ok() && !keep.contains(&n) {
                self.evict_entry(&n, &mut stats)?;
            }
        }
        Ok(stats)
    }

    fn evict_entry(&self, hex: &str, stats: &mut EvictStats) -> Result<()> {
        let p = self.cache_dir().join(hex);
        if fs::symlink_metadata(&p).is_ok() {
            // Rename first so no reader ever sees a half-deleted entry under its real name.
            let doomed = self
                .cache_dir()
                .join(atomic::unique_name(&format!("evict-{hex}")));
            fs::rename(&p, &doomed).map_err(Error::io("rename cache entry", &p))?;
            stats.bytes_freed += crate::disk_usage(&doomed);
            atomic::remove_any(&doomed).map_err(Error::io("remove cache entry", &doomed))?;
            stats.entries_removed += 1;
        }
        let lockfile = self.cache_dir().join(format!("{hex}.lock"));
        atomic::remove_any(&lockfile).map_err(Error::io("remove", &lockfile))
    }

    /// Move a chunk that failed verification to `quarantine/` so the next put of the same
    /// content writes a fresh copy instead of deduplicating against the bad one, and build
    /// the error for it.
    pub(crate) fn corrupt_chunk(
        &self,
        snapshot: &str,
        id: Digest,
        path: &Path,
        detail: String,
    ) -> Error {
        let q = self
            .quarantine_dir()
            .join(atomic::unique_name(&format!("{id}.zst")));
        let quarantined = match fs::rename(path, &q) {
            Ok(()) => q.display().to_string(),
            Err(e) => format!("(not moved: {e}; delete {} by hand)", path.display()),
        };
        tracing::error!(snapshot, chunk = %id, %detail, "corrupt chunk");
        Error::CorruptChunk {
            snapshot: snapshot.to_string(),
            chunk: id,
            detail,
            quarantined,
        }
    }

    /// Build the whole tree of `m` at `dir` (which must not exist).
    fn build_tree(&self, snapshot: &str, m: &Manifest, dir: &Path) -> Result<MaterializeStats> {
        let start = Instant::now();
        // Owner-only while building; final modes are applied at the end, directories last
        // so read-only directories do not block creating their children.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(Error::io("create directory", dir))?;
        let mut stats = MaterializeStats {
            files: 0,
            logical_bytes: 0,
            written_bytes: 0,
            chunks: 0,
            elapsed: Duration::ZERO,
        };
        let mut files: Vec<(PathBuf, u32, u64, &[ChunkRef])> = Vec::new();
        for e in &m.entries {
            let p = dir.join(&e.path);
            match &e.kind {
                EntryKind::Dir => fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&p)
                    .map_err(Error::io("create directory", &p))?,
                EntryKind::File { size, chunks } => files.push((p, e.mode, *size, chunks)),
                EntryKind::Symlink { target } => std::os::unix::fs::symlink(target, &p)
                    .map_err(Error::io("create symlink", &p))?,
            }
        }
        for batch in files.chunks(FILE_BATCH) {
            let mut open = Vec::with_capacity(batch.len());
            let mut work: Vec<(usize, ChunkRef)> = Vec::new();
            for (i, (p, _, size, chunks)) in batch.iter().enumerate() {
                // O_EXCL|O_NOFOLLOW: we only ever write files we just created.
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                    .map_err(Error::io("create file", p))?;
                // Sets the logical size; everything not written below remains a hole.
                f.set_len(*size).map_err(Error::io("set size of", p))?;
                open.push(f);
                work.extend(chunks.iter().map(|c| (i, *c)));
                stats.files += 1;
                stats.logical_bytes += size;
            }
            stats.chunks += work.len() as u64;
            stats.written_bytes += work.iter().map(|(_, c)| u64::from(c.len)).sum::<u64>();
            parallel(self.threads, &work, snapshot, self, |reader, (i, c)| {
                let data = reader.read(c)?;
                let (p, ..) = &batch[*i];
                open[*i]
                    .write_all_at(data, c.offset)
                    .map_err(Error::io("write", p))
            })?;
            for (f, (p, mode, ..)) in open.iter().zip(batch) {
                f.set_permissions(fs::Permissions::from_mode(*mode))
                    .map_err(Error::io("chmod", p))?;
            }
        }
        for e in m.entries.iter().rev() {
            if matches!(e.kind, EntryKind::Dir) {
                let p = dir.join(&e.path);
                fs::set_permissions(&p, fs::Permissions::from_mode(e.mode))
                    .map_err(Error::io("chmod", &p))?;
            }
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(m.root_mode))
            .map_err(Error::io("chmod", dir))?;
        stats.elapsed = start.elapsed();
        Ok(stats)
    }
}

/// rename(2) that fails with AlreadyExists instead of replacing an existing destination
/// (renameat2 RENAME_NOREPLACE; falls back to a checked rename where unsupported).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOSYS) {
        if fs::symlink_metadata(to).is_ok() {
            return Err(ErrorKind::AlreadyExists.into());
        }
        return fs::rename(from, to);
    }
    Err(e)
}
