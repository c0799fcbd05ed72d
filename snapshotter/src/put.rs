//! `put_dir`: walk a source tree, chunk its files, store new chunks, then commit the
//! manifest and finally the ref.
//!
//! Pipeline: this thread reads and cuts files; `threads` workers hash, dedup, compress and
//! write new chunks to temp files. Commit order (each step durable before the next):
//! 1. all new chunks are complete temp files in `tmp/`, flushed with one syncfs;
//! 2. they are renamed to `chunks/xx/<id>.zst` and the renames flushed with a second
//!    syncfs, so a chunk visible under its final name is always complete (later puts
//!    trust existence) and stays visible after a crash;
//! 3. the manifest is written atomically;
//! 4. the ref is written atomically — the commit point. Until then the old ref (if any)
//!    is untouched, so a failed or crashed put leaves the previous snapshot readable.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::atomic::{self, TempGuard};
use crate::chunk::{self, ChunkParams};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::lock;
use crate::manifest::{ChunkRef, Entry, EntryKind, Manifest, MANIFEST_FORMAT};
use crate::{validate_name, Store};

/// Options for [`Store::put_dir`].
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    /// Snapshot this one is a diff of (e.g. a session checkpoint's template). Must exist.
    /// Recorded in the manifest for information; dedup against it needs no help.
    pub parent: Option<String>,
}

/// What a put did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutStats {
    /// Id (blake3 of the JSON) of the manifest now referenced by the name.
    pub manifest: Digest,
    /// Regular files stored.
    pub files: u64,
    /// Sum of logical file sizes.
    pub raw_bytes: u64,
    /// Bytes in non-zero chunks (raw minus holes and all-zero chunks).
    pub data_bytes: u64,
    /// Compressed bytes written for chunks that were not in the store yet.
    pub new_stored_bytes: u64,
    /// Non-zero chunk references in the manifest.
    pub chunks_total: u64,
    /// Distinct chunks that had to be written.
    pub chunks_new: u64,
    /// References satisfied by a chunk already stored (or repeated within this put).
    pub chunks_reused: u64,
    pub elapsed: Duration,
}

/// Crash injection points (armed only by tests; a no-op otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Fail after the chunks are renamed into place, before the manifest is written.
    BeforeManifest,
    /// Fail after the manifest is written, before the ref.
    BeforeRef,
}

struct Job {
    file: usize,
    offset: u64,
    data: Vec<u8>,
}

/// Per-put shared state between workers.
#[derive(Default)]
struct Shared {
    /// Chunk ids already handled in this put -> temp path if this put writes it.
    known: HashMap<Digest, Option<PathBuf>>,
    refs: Vec<(usize, ChunkRef)>,
    new_stored_bytes: u64,
}

enum SourceKind {
    Dir,
    File { size: u64 },
    Symlink { target: String },
}

struct SourceEntry {
    rel: String,
    abs: PathBuf,
    mode: u32,
    kind: SourceKind,
}

impl Store {
    /// Store the tree under `dir` as snapshot `name`, replacing any previous snapshot of
    /// that name atomically (the old one stays readable until the new one is complete).
    pub fn put_dir(&self, name: &str, dir: &Path, opts: &PutOptions) -> Result<PutStats> {
        validate_name(name)?;
        let _lock = self.lock(lock::Mode::Shared)?;
        self.put_locked(name, dir, opts)
            .map_err(|e| e.for_snapshot(name))
    }

    fn put_locked(&self, name: &str, dir: &Path, opts: &PutOptions) -> Result<PutStats> {
        let start = Instant::now();
        if let Some(parent) = &opts.parent {
            // Catches typos early; the parent's content is found by hash anyway.
            self.resolve(parent)?;
        }
        let root_meta = fs::metadata(dir).map_err(Error::io("stat source", dir))?;
        if !root_meta.is_dir() {
            return Err(Error::UnsupportedFile {
                path: dir.to_path_buf(),
                reason: "snapshot source must be a directory".into(),
            });
        }
        let mut sources = Vec::new();
        scan(dir, "", &mut sources)?;

        let params = ChunkParams::DEFAULT;
        let guard = TempGuard::default();
        let shared = Mutex::new(Shared::default());
        let chunks_total = self.store_chunks(&sources, params, &guard, &shared)?;
        let shared = shared.into_inner().unwrap_or_else(|p| p.into_inner());

        // Commit step 1+2: make new chunks durable, then give them their final names.
        let new: Vec<(Digest, PathBuf)> = shared
            .known
            .into_iter()
            .filter_map(|(id, tmp)| tmp.map(|t| (id, t)))
            .collect();
        if !new.is_empty() {
            atomic::syncfs(&self.tmp_dir())?;
        }
        for (id, tmp) in &new {
            let dest = chunk::chunk_path(&self.chunks_dir(), id);
            // Replacing an identical chunk written meanwhile by a concurrent put is harmless.
            fs::rename(tmp, &dest).map_err(Error::io("rename chunk into place", &dest))?;
            guard.forget(tmp);
        }
        if !new.is_empty() {
            // Make the renames durable before the manifest names these chunks. One syncfs
            // (one journal commit) instead of fsyncing up to 256 fan-out directories, which
            // measured 3.8 s for a 200 MB put on ext4 versus ~0.1 s.
            atomic::syncfs(&self.chunks_dir())?;
        }
        self.fault_point(Fault::BeforeManifest)?;

        // Step 3: the manifest.
        let mut files: HashMap<usize, Vec<ChunkRef>> = HashMap::new();
        for (f, r) in shared.refs {
            files.entry(f).or_default().push(r);
        }
        let mut raw_bytes = 0;
        let mut data_bytes = 0;
        let mut file_count = 0;
        let entries: Vec<Entry> = sources
            .into_iter()
            .enumerate()
            .map(|(i, s)| Entry {
                path: s.rel,
                mode: s.mode,
                kind: match s.kind {
                    SourceKind::Dir => EntryKind::Dir,
                    SourceKind::Symlink { target } => EntryKind::Symlink { target },
                    SourceKind::File { size } => {
                        let mut chunks = files.remove(&i).unwrap_or_default();
                        chunks.sort_by_key(|c| c.offset);
                        raw_bytes += size;
                        data_bytes += chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
                        file_count += 1;
                        EntryKind::File { size, chunks }
                    }
                },
            })
            .collect();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: name.to_string(),
            parent: opts.parent.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            chunking: params,
            root_mode: root_meta.permissions().mode() & 0o7777,
            entries,
        };
        // Our own output must pass the checks readers apply.
        manifest
            .validate()
            .map_err(|detail| Error::CorruptManifest {
                snapshot: name.to_string(),
                manifest: "(being written)".into(),
                detail,
            })?;
        let (id, bytes) = manifest.encode();
        let mpath = self.manifest_path(&id);
        // Usually new; if an identical manifest exists (same tree, name and second), keep it
        // unless it has rotted.
        if fs::read(&mpath).ok().as_deref() != Some(&bytes[..]) {
            atomic::write_atomic(&self.tmp_dir(), &mpath, &bytes)?;
        }
        self.fault_point(Fault::BeforeRef)?;

        // Step 4: the ref. After this rename the new snapshot is what readers see.
        atomic::write_atomic(
            &self.tmp_dir(),
            &self.ref_path(name),
            format!("{id}\n").as_bytes(),
        )?;
        let chunks_new = new.len() as u64;
        let stats = PutStats {
            manifest: id,
            files: file_count,
            raw_bytes,
            data_bytes,
            new_stored_bytes: shared.new_stored_bytes,
            chunks_total,
            chunks_new,
            chunks_reused: chunks_total.saturating_sub(chunks_new),
            elapsed: start.elapsed(),
        };
        tracing::info!(snapshot = name, manifest = %id, ?stats, "snapshot stored");
        Ok(stats)
    }

    /// Cut every file and hand chunks to the workers; returns the number of chunk refs.
    fn store_chunks(
        &self,
        sources: &[SourceEntry],
        params: ChunkParams,
        guard: &TempGuard,
        shared: &Mutex<Shared>,
    ) -> Result<u64> {
        let failed = AtomicBool::new(false);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        let record = |e: Error| {
            failed.store(true, Ordering::SeqCst);
            let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        };
        let mut count = 0u64;
        // Bounded: at most 2 chunks per worker wait in memory.
        let (tx, rx) = mpsc::sync_channel::<Job>(self.threads * 2);
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            let rx = &rx;
            let (record, failed) = (&record, &failed);
            for _ in 0..self.threads {
                s.spawn(move || {
                    let mut comp = match zstd::bulk::Compressor::new(chunk::ZSTD_LEVEL) {
                        Ok(c) => c,
                        Err(e) => return record(Error::io("init zstd", self.tmp_dir())(e)),
                    };
                    loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                            rx.recv()
                        };
                        let Ok(job) = job else { return };
                        if failed.load(Ordering::SeqCst) {
                            continue; // drain so the producer never blocks forever
                        }
                        if let Err(e) = self.store_one(job, &mut comp, guard, shared) {
                            record(e);
                        }
                    }
                });
            }
            for (i, src) in sources.iter().enumerate() {
                let SourceKind::File { size } = src.kind else {
                    continue;
                };
                let res = File::open(&src.abs)
                    .map_err(Error::io("open", &src.abs))
                    .and_then(|f| {
                        chunk::chunk_file(&f, &src.abs, size, params, |offset, bytes| {
                            if failed.load(Ordering::SeqCst) {
                                return Err(Error::io("abort put after worker error", &src.abs)(
                                    std::io::Error::other("see first error"),
                                ));
                            }
                            count += 1;
                            let job = Job {
                                file: i,
                                offset,
                                data: bytes.to_vec(),
                            };
                            tx.send(job).map_err(|_| {
                                Error::io("hand chunk to worker", &src.abs)(std::io::Error::other(
                                    "all workers stopped",
                                ))
                            })
                        })
                    });
                if let Err(e) = res {
                    record(e);
                    break;
                }
            }
            drop(tx);
        });
        match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Hash one chunk; if no copy exists, compress it into a temp file.
    fn store_one(
        &self,
        job: Job,
        comp: &mut zstd::bulk::Compressor<'_>,
        guard: &TempGuard,
        shared: &Mutex<Shared>,
    ) -> Result<()> {
        let id = Digest::of(&job.data);
        let cref = ChunkRef {
            offset: job.offset,
            // Chunks are at most ChunkParams::max (<= 16 MiB) long.
            len: u32::try_from(job.data.len()).unwrap_or(u32::MAX),
            id,
        };
        let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
        let seen = {
            let mut sh = lock();
            sh.refs.push((job.file, cref));
            sh.known.contains_key(&id)
        };
        if seen {
            return Ok(());
        }
        let dest = chunk::chunk_path(&self.chunks_dir(), &id);
        if dest.exists() {
            lock().known.entry(id).or_insert(None);
            return Ok(());
        }
        let tmp = self.tmp_dir().join(atomic::unique_name("chunk"));
        {
            let mut sh = lock();
            if sh.known.contains_key(&id) {
                return Ok(()); // another worker took it meanwhile
            }
            sh.known.insert(id, Some(tmp.clone()));
        }
        let stored = comp
            .compress(&job.data)
            .map_err(Error::io("compress chunk for", &tmp))?;
        guard.add(tmp.clone());
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(Error::io("create temp chunk", &tmp))?;
        f.write_all(&stored)
            .map_err(Error::io("write temp chunk", &tmp))?;
        lock().new_stored_bytes += stored.len() as u64;
        Ok(())
    }

    #[cfg(test)]
    fn fault_point(&self, here: Fault) -> Result<()> {
        let armed = *self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if armed == Some(here) {
            return Err(Error::io("injected fault", &self.root)(
                std::io::Error::other(format!("{here:?}")),
            ));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn fault_point(&self, _here: Fault) -> Result<()> {
        Ok(())
    }
}

/// Depth-first walk with sorted names, so parents precede children and the manifest of an
/// unchanged tree is byte-identical (and thus has the same id).
fn scan(dir: &Path, rel: &str, out: &mut Vec<SourceEntry>) -> Result<()> {
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir).map_err(Error::io("list directory", dir))? {
        let e = e.map_err(Error::io("list directory", dir))?;
        let path = e.path();
        let Ok(n) = e.file_name().into_string() else {
            return Err(Error::UnsupportedFile {
                path,
                reason: "file name is not UTF-8".into(),
            });
        };
        names.push((n, path));
    }
    names.sort();
    for (n, abs) in names {
        let rel = if rel.is_empty() {
            n
        } else {
            format!("{rel}/{n}")
        };
        let meta = fs::symlink_metadata(&abs).map_err(Error::io("stat", &abs))?;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            SourceKind::Dir
        } else if ft.is_file() {
            SourceKind::File { size: meta.len() }
        } else if ft.is_symlink() {
            let t = fs::read_link(&abs).map_err(Error::io("read symlink", &abs))?;
            let Ok(target) = t.into_os_string().into_string() else {
                return Err(Error::UnsupportedFile {
                    path: abs,
                    reason: "symlink target is not UTF-8".into(),
                });
            };
            SourceKind::Symlink { target }
        } else {
            return Err(Error::UnsupportedFile {
                path: abs,
                reason: "not a regular file, directory or symlink (sockets, FIFOs and device \
                         nodes cannot be stored)"
                    .into(),
            });
        };
        let is_dir = matches!(kind, SourceKind::Dir);
        out.push(SourceEntry {
            rel: rel.clone(),
            abs: abs.clone(),
            mode,
            kind,
        });
        if is_dir {
            scan(&abs, &rel, out)?;
        }
    }
    Ok(())
}
