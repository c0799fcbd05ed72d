//! Sandboxes prepared before anyone asks for them.
//!
//! Before CRIU restores a clone, thaw makes the clone's directory, mounts its tmpfs disk,
//! extracts the snapshot's upper directory into it, mounts the overlay root and creates
//! its cgroups with the template's limits: about 3 ms, on the caller's clock. Then CRIU
//! starts, reads the snapshot's images and prepares: about 5 ms more. None of it depends
//! on the caller. So a long-lived engine (`thaw serve`, `thaw bench`) keeps a few prepared
//! sandboxes per snapshot, each with its CRIU started and waiting at its gate
//! ([`super::criu_restore::Armed`], where the installed CRIU has our patch `0006`), and
//! makes new ones in the background, on the core the restore is not using. A one-shot `thaw invoke` keeps none: its process would prepare a
//! sandbox only to tear it down at exit.
//!
//! Only clones CRIU restores directly (discarded ones, [`super::Keeper::Thaw`]) are taken
//! from the pool; a prepared sandbox is an ordinary sandbox directory with an owner file,
//! so a crash leaves nothing the startup sweep does not already remove. Prepared sandboxes
//! of a snapshot nobody restored for [`IDLE`] are torn down.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use super::cgroups::SandboxCgroup;
use super::criu_restore::Armed;
use super::{ContainerSandbox, ContainerTier, Keeper, SandboxSpec};
use crate::error::Result;

/// Prepared sandboxes of a snapshot nobody restored for this long are torn down.
pub const IDLE: Duration = Duration::from_secs(300);

/// What makes two prepared sandboxes interchangeable: the same snapshot (its upper
/// directory), the same rootfs layers and the same limits (cgroups, disk size).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    snapshot: PathBuf,
    layers: Vec<PathBuf>,
    limits: String,
    ids: super::userns::IdMap,
}

impl Key {
    pub fn of(spec: &SandboxSpec, snapshot: &Path) -> Key {
        Key {
            snapshot: snapshot.to_path_buf(),
            layers: spec.layers.clone(),
            limits: serde_json::to_string(&spec.limits).unwrap_or_default(),
            ids: spec.ids,
        }
    }
}

/// A sandbox ready for CRIU: directory, disk, upper directory, overlay root, cgroups, and
/// (where CRIU has our gate patch) CRIU itself, started and waiting at its gate.
#[derive(Debug)]
pub struct Prepared {
    pub id: String,
    pub cgroup: SandboxCgroup,
    /// Boxed: a prepared sandbox moves through the pool's queues.
    pub armed: Option<Box<Armed>>,
}

#[derive(Debug, Default)]
struct Entry {
    ready: Vec<Prepared>,
    refilling: bool,
    last_used: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    /// Prepared sandboxes kept per key; 0 turns the pool off.
    target: usize,
    entries: HashMap<Key, Entry>,
}

/// The pool. Cheap to share: the tier holds it in an `Arc`.
#[derive(Debug, Default)]
pub struct Pool {
    state: Mutex<State>,
    /// Refills and teardowns of unused prepared sandboxes.
    tasks: TaskTracker,
}

impl Pool {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `n` prepared sandboxes per snapshot restored from now on (0: none).
    pub fn set_target(&self, n: usize) {
        self.state().target = n;
    }

    /// A prepared sandbox for `key`, if one is ready, and those of snapshots idle for
    /// [`IDLE`], which the caller tears down.
    pub fn take(&self, key: &Key) -> (Option<Prepared>, Vec<Prepared>) {
        let mut st = self.state();
        if st.target == 0 {
            return (None, Vec::new());
        }
        let now = Instant::now();
        let mut stale = Vec::new();
        for (k, e) in st.entries.iter_mut() {
            let idle = e.last_used.is_some_and(|t| now.duration_since(t) > IDLE);
            if k != key && idle && !e.refilling {
                stale.append(&mut e.ready);
            }
        }
        st.entries.retain(|_, e| !e.ready.is_empty() || e.refilling);
        let e = st.entries.entry(key.clone()).or_default();
        e.last_used = Some(now);
        (e.ready.pop(), stale)
    }

    /// Claims the right to refill `key`: false if it is full, already being refilled, or
    /// the pool is off.
    fn begin_refill(&self, key: &Key) -> bool {
        let mut st = self.state();
        let target = st.target;
        let e = st.entries.entry(key.clone()).or_default();
        if target == 0 || e.refilling || e.ready.len() >= target {
            return false;
        }
        e.refilling = true;
        true
    }

    /// Adds a freshly prepared sandbox. Gives it back when no more are wanted (the pool
    /// was turned off meanwhile, or is full); the refill then ends.
    fn put(&self, key: &Key, p: Prepared) -> std::result::Result<bool, Prepared> {
        let mut st = self.state();
        let target = st.target;
        let e = st.entries.entry(key.clone()).or_default();
        if e.ready.len() >= target {
            return Err(p);
        }
        e.ready.push(p);
        Ok(e.ready.len() < target)
    }

    fn end_refill(&self, key: &Key) {
        if let Some(e) = self.state().entries.get_mut(key) {
            e.refilling = false;
        }
    }

    /// Turns the pool off and hands back every prepared sandbox, for the caller to tear
    /// down once the refills in flight have ended ([`ContainerTier::close_pool`]).
    fn drain(&self) -> Vec<Prepared> {
        let mut st = self.state();
        st.target = 0;
        st.entries
            .drain()
            .flat_map(|(_, e)| e.ready.into_iter())
            .collect()
    }
}

impl ContainerTier {
    /// Makes a sandbox ready for CRIU to restore `snapshot` into, named `spec.id`. On
    /// failure nothing is left behind.
    pub(crate) async fn prepare(&self, spec: &SandboxSpec, snapshot: &Path) -> Result<Prepared> {
        let d = self.sandbox_dir(&spec.id);
        let r = async {
            self.prepare_restore_dir(&d, spec, snapshot).await?;
            let cgroup = SandboxCgroup::create(&spec.id, &spec.limits)?;
            // Last: a failure above leaves no CRIU to send away.
            let armed = if self.restore_gate {
                Some(Box::new(self.arm(spec, &d, snapshot, &cgroup, true)?))
            } else {
                None
            };
            Ok(Prepared {
                id: spec.id.clone(),
                cgroup,
                armed,
            })
        }
        .await;
        if r.is_err() {
            self.discard_dir(spec.id.clone()).await;
        }
        r
    }

    /// Tears down a prepared sandbox no restore used: its waiting CRIU first, which may
    /// hold its mounts.
    async fn discard_prepared(&self, p: Prepared) {
        if let Some(armed) = p.armed {
            armed.cancel().await;
        }
        self.discard_dir(p.id).await
    }

    async fn discard_dir(&self, id: String) {
        let d = self.sandbox_dir(&id);
        ContainerSandbox::new(id, d.root, self.runc.clone(), Keeper::Thaw)
            .destroy()
            .await
    }

    /// Takes a prepared sandbox for a clone of `spec` from `snapshot`, if one is ready.
    /// One whose waiting CRIU is gone (killed, or failed while it prepared) is torn down
    /// instead, and the next one tried.
    pub(crate) fn take_prepared(&self, spec: &SandboxSpec, snapshot: &Path) -> Option<Prepared> {
        let key = Key::of(spec, snapshot);
        loop {
            let (taken, stale) = self.pool.take(&key);
            for p in stale {
                self.discard_in_background(p);
            }
            let mut p = taken?;
            if p.armed.as_mut().is_none_or(|a| a.alive()) {
                return Some(p);
            }
            let why = super::checkpoint::criu_log_errors(
                &self.sandbox_dir(&p.id).criu_work(),
                "restore.log",
            );
            warn!(sandbox = %p.id, criu = %why, "a prepared sandbox's CRIU exited while it waited; not used");
            self.discard_in_background(p);
        }
    }

    fn discard_in_background(&self, p: Prepared) {
        let tier = self.clone();
        self.pool
            .tasks
            .spawn(async move { tier.discard_prepared(p).await });
    }

    /// Makes prepared sandboxes for clones of `spec` from `snapshot` in the background, up
    /// to the pool's target. Called once a restore is over, not when it starts: mounts and
    /// cgroup changes take the same kernel locks CRIU's restore takes, and a refill racing
    /// the restore it serves only slows that restore down (measured).
    pub(crate) fn refill(&self, spec: &SandboxSpec, snapshot: &Path) {
        let key = Key::of(spec, snapshot);
        if !self.pool.begin_refill(&key) {
            return;
        }
        let (tier, spec, snapshot) = (self.clone(), spec.clone(), snapshot.to_path_buf());
        let span = info_span!("pool.refill", snapshot = %snapshot.display());
        self.pool.tasks.spawn(
            async move {
                loop {
                    let id = crate::engine::new_sandbox_id();
                    let spec = SandboxSpec {
                        id: id.clone(),
                        hostname: id,
                        ..spec.clone()
                    };
                    match tier.prepare(&spec, &snapshot).await {
                        Ok(p) => match tier.pool.put(&key, p) {
                            Ok(true) => continue,
                            Ok(false) => break,
                            Err(p) => {
                                tier.discard_prepared(p).await;
                                break;
                            }
                        },
                        Err(e) => {
                            // The restore itself will meet (and report) the same cause.
                            warn!(error = %e, "preparing a sandbox ahead of its restore");
                            break;
                        }
                    }
                }
                tier.pool.end_refill(&key);
                debug!("pool refilled");
            }
            .instrument(span),
        );
    }

    /// Turns the pool off, lets refills in flight end, and tears every prepared sandbox
    /// down. Call it before the process exits.
    pub async fn close_pool(&self) {
        self.pool.set_target(0);
        self.pool.tasks.close();
        self.pool.tasks.wait().await;
        self.pool.tasks.reopen();
        for p in self.pool.drain() {
            self.discard_prepared(p).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> Key {
        Key {
            snapshot: PathBuf::from(n),
            layers: Vec::new(),
            limits: String::new(),
            ids: crate::container::userns::IdMap::range(0),
        }
    }

    fn prepared(id: &str) -> Prepared {
        Prepared {
            id: id.into(),
            cgroup: SandboxCgroup::empty(),
            armed: None,
        }
    }

    #[test]
    fn an_off_pool_gives_nothing_and_wants_nothing() {
        let p = Pool::default();
        assert!(p.take(&key("a")).0.is_none());
        assert!(!p.begin_refill(&key("a")));
    }

    #[test]
    fn refills_stop_at_the_target_and_one_refill_runs_per_key() {
        let p = Pool::default();
        p.set_target(2);
        let k = key("a");
        assert!(p.begin_refill(&k));
        assert!(!p.begin_refill(&k), "a second refill of the same key");
        assert!(matches!(p.put(&k, prepared("1")), Ok(true)));
        assert!(matches!(p.put(&k, prepared("2")), Ok(false)));
        assert!(matches!(p.put(&k, prepared("3")), Err(x) if x.id == "3"));
        p.end_refill(&k);
        assert!(!p.begin_refill(&k), "full");
        let (got, stale) = p.take(&k);
        assert_eq!(got.map(|x| x.id), Some("2".to_string()));
        assert!(stale.is_empty());
        assert!(p.begin_refill(&k));
        // Another key's sandboxes are not this one's.
        assert!(p.take(&key("b")).0.is_none());
    }

    #[test]
    fn draining_turns_the_pool_off_and_returns_everything() {
        let p = Pool::default();
        p.set_target(2);
        for k in ["a", "b"] {
            assert!(p.begin_refill(&key(k)));
            let _ = p.put(&key(k), prepared(k));
        }
        let mut ids: Vec<String> = p.drain().into_iter().map(|x| x.id).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert!(!p.begin_refill(&key("a")));
        assert!(p.put(&key("a"), prepared("late")).is_err());
    }

    #[test]
    fn idle_keys_are_handed_back_for_teardown() {
        let p = Pool::default();
        p.set_target(1);
        let (a, b) = (key("a"), key("b"));
        assert!(p.begin_refill(&a));
        let _ = p.put(&a, prepared("a1"));
        p.end_refill(&a);
        p.state().entries.get_mut(&a).unwrap().last_used = Instant::now().checked_sub(IDLE * 2);
        let (got, stale) = p.take(&b);
        assert!(got.is_none());
        assert_eq!(stale.into_iter().map(|x| x.id).collect::<Vec<_>>(), ["a1"]);
    }
}
