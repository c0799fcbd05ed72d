//! Garbage collection: delete manifests and chunks that no ref reaches, plus temp files
//! and quarantined chunks left by failed or crashed operations.
//!
//! gc holds the store lock exclusively, so no put is between "chunk written" and "ref
//! written" while it computes the live set, and no materialise is reading. Everything in
//! `tmp/` and every `cache/*.tmp` build directory is therefore stale.

use std::collections::HashSet;
use std::fs;
use std::time::{Duration, Instant};

use crate::atomic;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::lock;
use crate::{read_dir, Store};

/// What gc did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Chunks still referenced.
    pub chunks_live: u64,
    pub chunks_deleted: u64,
    pub manifests_deleted: u64,
    /// Temp files/directories and quarantined chunks removed.
    pub temp_deleted: u64,
    /// Bytes of deleted chunk, manifest and temp files.
    pub bytes_freed: u64,
    pub elapsed: Duration,
}

impl Store {
    /// Collect garbage. Fails without deleting any chunk if some ref's manifest is missing
    /// or corrupt, because then the live set is unknown (the error names the snapshot:
    /// delete or republish it, then rerun gc).
    pub fn gc(&self) -> Result<GcStats> {
        let start = Instant::now();
        let _lock = self.lock(lock::Mode::Exclusive)?;
        let mut stats = GcStats::default();

        let mut live_manifests = HashSet::new();
        let mut live_chunks: HashSet<Digest> = HashSet::new();
        for name in self.ref_names()? {
            let (id, m) = self.resolve(&name)?;
            live_manifests.insert(id);
            live_chunks.extend(m.chunk_ids().copied());
        }
        stats.chunks_live = live_chunks.len() as u64;

        for e in read_dir(&self.manifests_dir())? {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Some(id) = name
                .strip_suffix(".json")
                .and_then(|h| h.parse::<Digest>().ok())
            else {
                continue; // not ours: leave it alone
            };
            if !live_manifests.contains(&id) {
                stats.bytes_freed += remove_file_counted(&e.path())?;
                stats.manifests_deleted += 1;
            }
        }

        for sub in read_dir(&self.chunks_dir())? {
            for e in read_dir(&sub.path())? {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let Some(id) = name
                    .strip_suffix(".zst")
                    .and_then(|h| h.parse::<Digest>().ok())
                else {
                    continue;
                };
                if !live_chunks.contains(&id) {
                    stats.bytes_freed += remove_file_counted(&e.path())?;
                    stats.chunks_deleted += 1;
                }
            }
        }

        for dir in [self.tmp_dir(), self.quarantine_dir()] {
            for e in read_dir(&dir)? {
                stats.bytes_freed += crate::disk_usage(&e.path());
                atomic::remove_any(&e.path()).map_err(Error::io("remove", e.path()))?;
                stats.temp_deleted += 1;
            }
        }
        // Half-built cache entries and half-evicted ones from crashed processes.
        for e in read_dir(&self.cache_dir())? {
            if atomic::is_temp_name(&e.file_name()) {
                stats.bytes_freed += crate::disk_usage(&e.path());
                atomic::remove_any(&e.path()).map_err(Error::io("remove", e.path()))?;
                stats.temp_deleted += 1;
            }
        }
        stats.elapsed = start.elapsed();
        tracing::info!(?stats, "gc done");
        Ok(stats)
    }
}

fn remove_file_counted(p: &std::path::Path) -> Result<u64> {
    let len = fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0);
    match fs::remove_file(p) {
        Ok(()) => Ok(len),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io("remove", p)(e)),
    }
}
