//! thaw's snapshot store: snapshot artifacts (CRIU image directories, Cloud Hypervisor
//! snapshot directories) stored as content-defined, zstd-compressed, blake3-addressed
//! chunks plus one manifest per snapshot, and materialised back for restore.
//!
//! * Dedup is automatic: a chunk is stored once whoever references it (two templates on one
//!   base, a session checkpoint and its template). Content-defined cut points keep this
//!   working when pages shift inside `pages-*.img`.
//! * All-zero ranges cost nothing and are materialised as holes; logical sizes are kept.
//! * Every chunk is verified (blake3 of the decompressed bytes against its address) when
//!   read; manifests are verified against their address too.
//! * Writes are crash-atomic: chunks, then manifest, then the ref (the commit point).
//! * `gc` removes what no ref reaches; a store-wide flock keeps it away from running puts.
//!
//! The on-disk format is specified in `FORMAT.md` next to this crate's `Cargo.toml`.
//!
//! ```no_run
//! use thaw_snapshotter::{PutOptions, Store};
//! # fn main() -> thaw_snapshotter::Result<()> {
//! let store = Store::open("/var/lib/thaw/snapshots")?;
//! let stats = store.put_dir("tpl-python-3f2a", "/run/thaw/criu/tpl".as_ref(), &PutOptions::default())?;
//! println!("stored {} new bytes", stats.new_stored_bytes);
//! let base = store.materialize_cached("tpl-python-3f2a")?; // shared read-only by clones
//! # let _ = base; Ok(()) }
//! ```

mod atomic;
mod chunk;
mod digest;
mod error;
mod gc;
mod lock;
mod manifest;
mod materialize;
mod put;

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

pub use chunk::{ChunkParams, ZSTD_LEVEL};
pub use digest::{BadDigest, Digest};
pub use error::{Error, Result};
pub use gc::GcStats;
pub use manifest::{ChunkRef, Entry, EntryKind, Manifest, ManifestSummary, MANIFEST_FORMAT};
pub use materialize::{Evict, EvictStats, MaterializeStats};
pub use put::{PutOptions, PutStats};

/// Contents of `<root>/VERSION`; a store with anything else is refused.
pub const STORE_VERSION: &str = "thaw-snapshotter-store 1";

/// Longest accepted snapshot name (bytes). Leaves room for temp-name suffixes within
/// NAME_MAX (255) on every filesystem.
pub const MAX_NAME_LEN: usize = 128;

/// Check a snapshot name: 1..=128 bytes of `[A-Za-z0-9._-]`, starting with a letter or
/// digit. That excludes `/`, `..`, hidden files and anything a shell or URL would mangle,
/// and covers `tpl-python-3f2a...` and `session-<uuid>`.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            name: name.chars().take(MAX_NAME_LEN + 8).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed (no '/')");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit (rules out '.', '..' and hidden names)");
    }
    Ok(())
}

/// Store-wide space accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Refs (named snapshots).
    pub snapshots: u64,
    /// Manifest files (including ones only gc would remove).
    pub manifests: u64,
    /// Chunk files.
    pub chunks: u64,
    /// Bytes in chunk files (compressed).
    pub chunk_bytes: u64,
    /// Materialised cache entries.
    pub cache_entries: u64,
    /// Disk blocks used by the cache, in bytes (holes not counted).
    pub cache_bytes: u64,
}

/// A snapshot store rooted at one directory. Cheap to share between threads (`&Store`);
/// several processes may open the same root, coordination is by flock on `<root>/LOCK`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    threads: usize,
    #[cfg(test)]
    fault: std::sync::Mutex<Option<put::Fault>>,
}

impl Store {
    /// Open (creating if needed) the store at `root`: make the directory layout and check
    /// the VERSION file.
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(Error::io("create store root", &root))?;
        let store = Store {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(1, 8),
            root,
            #[cfg(test)]
            fault: std::sync::Mutex::new(None),
        };
        for d in ["chunks", "manifests", "refs", "tmp", "cache", "quarantine"] {
            let p = store.root.join(d);
            fs::create_dir_all(&p).map_err(Error::io("create directory", &p))?;
        }
        // 256 fan-out directories created up front, so puts never have to create (and
        // fsync the parent of) a directory on their commit path.
        for b in 0..=255u8 {
            let p = store.chunks_dir().join(format!("{b:02x}"));
            fs::create_dir_all(&p).map_err(Error::io("create directory", &p))?;
        }
        let vpath = store.root.join("VERSION");
        match fs::read_to_string(&vpath) {
            Ok(found) if found.trim_end() == STORE_VERSION => {}
            Ok(found) => {
                return Err(Error::UnsupportedVersion {
                    root: store.root.clone(),
                    found: found.trim_end().chars().take(200).collect(),
                    expected: STORE_VERSION.to_string(),
                })
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                atomic::write_atomic(
                    &store.tmp_dir(),
                    &vpath,
                    format!("{STORE_VERSION}\n").as_bytes(),
                )?;
                atomic::fsync_dir(&store.root)?;
            }
            Err(e) => return Err(Error::io("read", &vpath)(e)),
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The manifest of snapshot `name` (verified against its address).
    pub fn get(&self, name: &str) -> Result<Manifest> {
        Ok(self.resolve(name)?.1)
    }

    /// All snapshots, sorted by name, with summaries. Fails on the first snapshot whose
    /// manifest is corrupt or missing (the error names it; delete and republish it).
    pub fn list(&self) -> Result<Vec<(String, ManifestSummary)>> {
        let mut out = Vec::new();
        for name in self.ref_names()? {
            let (id, m) = self.resolve(&name)?;
            out.push((name, m.summary(id)));
        }
        Ok(out)
    }

    /// Every snapshot's name, sorted, without reading any manifest.
    pub fn names(&self) -> Result<Vec<String>> {
        self.ref_names()
    }

    /// Remove snapshot `name` (its ref). Storage is reclaimed by the next [`Store::gc`];
    /// cache entries by [`Store::evict_cache`].
    pub fn delete(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let _lock = self.lock(lock::Mode::Shared)?;
        let p = self.ref_path(name);
        match fs::remove_file(&p) {
            Ok(()) => atomic::fsync_dir(&self.refs_dir()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(self.not_found(name)),
            Err(e) => Err(Error::io("remove ref", &p)(e)),
        }
    }

    /// Names snapshot `src`'s content also `dst` (replacing any `dst`), without copying
    /// anything: both refs point at one manifest, whose chunks and cache entry stay until
    /// every name is deleted. How a session keeps the snapshot it was made from when that
    /// snapshot's first owner (a template being redeployed, a fork point) lets go of it.
    pub fn tag(&self, src: &str, dst: &str) -> Result<()> {
        validate_name(dst)?;
        let _lock = self.lock(lock::Mode::Shared)?;
        // Resolving checks the manifest is there, so the new name never dangles.
        let (id, _) = self.resolve(src)?;
        atomic::write_atomic(
            &self.tmp_dir(),
            &self.ref_path(dst),
            format!("{id}\n").as_bytes(),
        )
    }

    /// Read and verify every chunk of snapshot `name` (without writing anything).
    pub fn verify(&self, name: &str) -> Result<()> {
        let _lock = self.lock(lock::Mode::Shared)?;
        let (_, m) = self.resolve(name)?;
        let mut seen = HashSet::new();
        let refs: Vec<ChunkRef> = m
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => Some(chunks),
                _ => None,
            })
            .flatten()
            .filter(|c| seen.insert(c.id))
            .copied()
            .collect();
        materialize::parallel(self.threads, &refs, name, self, |reader, c| {
            reader.read(c).map(|_| ())
        })
    }

    /// Space used by the store.
    pub fn usage(&self) -> Result<Usage> {
        let mut u = Usage {
            snapshots: self.ref_names()?.len() as u64,
            ..Usage::default()
        };
        for e in read_dir(&self.manifests_dir())? {
            if e.file_name().to_string_lossy().ends_with(".json") {
                u.manifests += 1;
            }
        }
        for sub in read_dir(&self.chunks_dir())? {
            for e in read_dir(&sub.path())? {
                let meta = e.metadata().map_err(Error::io("stat", e.path()))?;
                u.chunks += 1;
                u.chunk_bytes += meta.len();
            }
        }
        for e in read_dir(&self.cache_dir())? {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                && !atomic::is_temp_name(&e.file_name())
            {
                u.cache_entries += 1;
                u.cache_bytes += disk_usage(&p);
            }
        }
        Ok(u)
    }

    // ---- internals shared by the modules ----

    fn chunks_dir(&self) -> PathBuf {
        self.root.join("chunks")
    }
    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }
    fn refs_dir(&self) -> PathBuf {
        self.root.join("refs")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }
    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }
    fn ref_path(&self, name: &str) -> PathBuf {
        self.refs_dir().join(name)
    }
    fn manifest_path(&self, id: &Digest) -> PathBuf {
        self.manifests_dir().join(format!("{id}.json"))
    }

    fn lock(&self, mode: lock::Mode) -> Result<lock::LockGuard> {
        lock::lock(&self.root.join("LOCK"), mode)
    }

    fn not_found(&self, name: &str) -> Error {
        Error::NotFound {
            name: name.to_string(),
            root: self.root.clone(),
        }
    }

    /// Names in `refs/`, sorted; stray files with invalid names are ignored.
    fn ref_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = read_dir(&self.refs_dir())?
            .into_iter()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The manifest id `refs/<name>` points to. Takes no lock.
    fn ref_id(&self, name: &str) -> Result<Digest> {
        validate_name(name)?;
        let rp = self.ref_path(name);
        let raw = match fs::read(&rp) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(self.not_found(name)),
            Err(e) => return Err(Error::io("read ref", &rp)(e)),
        };
        let text = String::from_utf8_lossy(&raw);
        let id: Digest =
            text.trim_end()
                .parse()
                .map_err(|e: BadDigest| Error::CorruptManifest {
                    snapshot: name.to_string(),
                    manifest: format!("(ref {})", rp.display()),
                    detail: e.to_string(),
                })?;
        Ok(id)
    }

    /// Follow `refs/<name>` to its manifest and verify it. Takes no lock.
    fn resolve(&self, name: &str) -> Result<(Digest, Manifest)> {
        let id = self.ref_id(name)?;
        let mp = self.manifest_path(&id);
        let bytes = match fs::read(&mp) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::MissingManifest {
                    snapshot: name.to_string(),
                    manifest: id,
                    path: mp,
                })
            }
            Err(e) => return Err(Error::io("read manifest", &mp)(e)),
        };
        let m = Manifest::decode(&bytes, &id).map_err(|detail| Error::CorruptManifest {
            snapshot: name.to_string(),
            manifest: id.to_hex(),
            detail,
        })?;
        Ok((id, m))
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let rd = fs::read_dir(dir).map_err(Error::io("list directory", dir))?;
    rd.collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::io("list directory", dir))
}

/// Allocated bytes of a tree (st_blocks), best effort: used for reporting only.
fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(p) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                total += disk_usage(&e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests;
