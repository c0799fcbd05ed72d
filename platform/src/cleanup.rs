//! Crash recovery: every sandbox directory records the thaw process that owns it (pid and
//! kernel start time, so a recycled pid is not mistaken for its owner). On start, thaw
//! destroys every sandbox whose owner is gone: processes (a container, or a microvm's VMM),
//! cgroups, mounts and files left by a `kill -9` mid-publish or mid-invocation.
//!
//! A session's sandbox outlives the process that made it, so its owner record names the
//! session instead ([`write_session_owner`]); the sweep leaves those to session recovery
//! (`session/`), which decides from the session's durable state.

use std::path::Path;

use tracing::{info, warn};

use crate::backend::Tiers;
use crate::container::mounts;
use crate::error::{IoContext, Result};
use crate::paths::Paths;

/// `<pid> <starttime>` of a process, from /proc/<pid>/stat field 22.
pub(crate) fn identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Owner records of session sandboxes start with this.
pub const SESSION_OWNER: &str = "session ";

/// Hands a sandbox over to a session: the sweep no longer treats it as an orphan.
pub fn write_session_owner(path: &Path, session: &str) -> Result<()> {
    // Write-then-rename: a crash must not leave an empty record, which reads as "orphan".
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{SESSION_OWNER}{session}")).ctx("writing owner record", &tmp)?;
    std::fs::rename(&tmp, path).ctx("writing owner record", path)
}

/// The session that owns a sandbox, if a session does.
pub fn session_owner(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.strip_prefix(SESSION_OWNER)
        .map(|s| s.trim().to_string())
}

/// This process's identity record.
pub(crate) fn my_identity() -> String {
    identity(std::process::id()).unwrap_or_else(|| format!("{} 0", std::process::id()))
}

pub fn write_owner(path: &Path) -> Result<()> {
    std::fs::write(path, my_identity()).ctx("writing owner record", path)
}

/// The pid an identity record names.
pub(crate) fn identity_pid(record: &str) -> Option<u32> {
    record.split_whitespace().next()?.parse().ok()
}

/// Whether the process an identity record names still runs (same pid, same start time).
pub(crate) fn identity_alive(record: &str) -> bool {
    let record = record.trim();
    let Some(pid) = identity_pid(record) else {
        return false;
    };
    identity(pid).as_deref() == Some(record)
}

/// Whether the process recorded in `path` still runs.
pub fn owner_alive(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|text| identity_alive(&text))
        .unwrap_or(false)
}

/// A `.tmp-<name>` scratch directory owned by this process, removed (mounts included) when
/// dropped; if the process dies first, [`sweep`] removes it.
pub(crate) struct Scratch {
    pub path: std::path::PathBuf,
}

impl Scratch {
    pub fn new(parent: &Path, name: &str) -> Result<Scratch> {
        let path = parent.join(format!(".tmp-{name}"));
        let _ = mounts::teardown_dir(&path);
        std::fs::create_dir_all(&path).ctx("creating scratch directory", &path)?;
        write_owner(&path.join(".owner"))?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = mounts::teardown_dir(&self.path);
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct SweepStats {
    pub sandboxes: usize,
    pub containers: usize,
    pub temp_dirs: usize,
}

/// Destroys every orphaned sandbox, container and scratch directory under `paths`, each
/// sandbox through the tier its directory belongs to ([`Tiers::of_dir`]).
pub async fn sweep(paths: &Paths, tiers: &Tiers) -> Result<SweepStats> {
    let mut stats = SweepStats::default();
    let sandboxes = paths.sandboxes();
    let mut live = std::collections::HashSet::new();
    if let Ok(rd) = std::fs::read_dir(&sandboxes) {
        for entry in rd.flatten() {
            let dir = entry.path();
            let id = entry.file_name().to_string_lossy().to_string();
            if owner_alive(&dir.join("owner")) || session_owner(&dir.join("owner")).is_some() {
                live.insert(id);
                continue;
            }
            info!(sandbox = %id, "cleaning up orphaned sandbox");
            tiers.of_dir(&dir).sweep_orphan(&id, &dir).await;
            if let Err(e) = mounts::teardown_dir(&dir) {
                warn!(sandbox = %id, error = %e, "teardown of orphan");
            }
            stats.sandboxes += 1;
        }
    }
    // What tiers keep outside sandbox directories (a crash between the two steps).
    for b in tiers.all() {
        stats.containers += b.sweep_stray(&live).await;
    }
    // Scratch dirs (checkpoints in flight, build temp dirs) of dead owners.
    for scratch in [paths.checkpoints(), paths.rootfs_cache()] {
        if let Ok(rd) = std::fs::read_dir(&scratch) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !name.starts_with(".tmp-") {
                    continue;
                }
                let dir = entry.path();
                if owner_alive(&dir.join(".owner")) {
                    continue;
                }
                if mounts::teardown_dir(&dir).is_ok() {
                    stats.temp_dirs += 1;
                }
            }
        }
    }
    Ok(stats)
}
