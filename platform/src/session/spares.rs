//! Session sandboxes restored before anyone asks for them.
//!
//! A reset is one restore of the session's origin, and restores of one origin are
//! interchangeable until they are given an identity: clone hygiene (hostname, entropy,
//! clock, environment) and the session's owner record come after. So a long-lived engine
//! keeps a few sandboxes of each origin in use restored ahead ("spares"), and a reset or a
//! batch hands one over in the time clone hygiene takes, then restores its replacement in
//! the background, on the core the caller is not using.
//!
//! Only sessions that share their memory with the snapshot (`checkpointable: false`, the
//! rollout kind) get spares: a spare of those costs about half a MiB (its pages are the
//! snapshot's page cache), where a private copy would cost the whole heap.
//!
//! An origin that batches and forks draw from many at a time (an RL trainer forking a
//! checkpoint into a group of rollouts, again and again) keeps as many spares as its largest
//! batch asked for, up to [`MAX_DEMAND`], so that the next fork of it is handed over rather
//! than restored. They cost about half a MiB each, and go with the origin's other spares
//! when it is idle.
//!
//! A spare is an ordinary sandbox owned by this process (its owner file names it), so a
//! crash leaves nothing the startup sweep does not already remove. Spares of an origin
//! nobody used for [`IDLE`] are torn down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::container::SandboxSpec;
use crate::engine::Engine;
use crate::sandbox::Sandbox;
use crate::tier::Tier;

/// Spares of an origin nobody used for this long are torn down.
pub const IDLE: Duration = Duration::from_secs(300);

/// The most spares one origin keeps for the size of its batches.
pub const MAX_DEMAND: usize = 32;

/// What makes two restores interchangeable: the snapshot (its cache entry), the tier, and
/// everything the sandbox is made with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    snapshot: PathBuf,
    tier: Tier,
    layers: Vec<PathBuf>,
    limits: String,
    ids: crate::container::userns::IdMap,
}

impl Key {
    pub(crate) fn of(tier: Tier, spec: &SandboxSpec, snapshot: &std::path::Path) -> Key {
        Key {
            snapshot: snapshot.to_path_buf(),
            tier,
            layers: spec.layers.clone(),
            limits: serde_json::to_string(&spec.limits).unwrap_or_default(),
            ids: spec.ids,
        }
    }
}

#[derive(Default)]
struct Entry {
    ready: Vec<Sandbox>,
    refilling: bool,
    last_used: Option<Instant>,
    /// The largest batch made from this origin since it was last idle (capped).
    demand: usize,
}

impl Entry {
    /// How many spares this origin keeps: the engine's number, or its batches' size.
    fn target(&self, engine_target: usize) -> usize {
        if engine_target == 0 {
            0
        } else {
            engine_target.max(self.demand)
        }
    }
}

#[derive(Default)]
struct State {
    /// Spares kept per origin; 0 keeps none.
    target: usize,
    entries: HashMap<Key, Entry>,
}

/// The spares of one engine (shared by its clones for other owners).
#[derive(Default)]
pub struct Spares {
    state: Mutex<State>,
    tasks: TaskTracker,
    /// Batches and forks making sessions now: a refill for batches waits for them, so that
    /// spares for the next batch never take a core from the sessions of this one.
    batches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A batch in progress (see [`Spares::batches`]); it ends when this is dropped.
pub(crate) struct BatchRunning(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BatchRunning {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A spare of `key`, if one is ready.
    pub(crate) fn take(&self, key: &Key) -> Option<Sandbox> {
        let mut st = self.lock();
        let e = st.entries.entry(key.clone()).or_default();
        e.last_used = Some(Instant::now());
        e.ready.pop()
    }

    /// The spares to tear down: those of idle origins, or all beyond a lowered target.
    fn surplus(&self) -> Vec<Sandbox> {
        let mut st = self.lock();
        let target = st.target;
        let mut out = Vec::new();
        st.entries.retain(|_, e| {
            let idle = e.last_used.is_none_or(|t| t.elapsed() > IDLE);
            if idle || target == 0 {
                out.append(&mut e.ready);
                return e.refilling;
            }
            while e.ready.len() > e.target(target) {
                out.extend(e.ready.pop());
            }
            true
        });
        out
    }
}

/// Spares restored at once by one refill: one per core.
fn refill_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

impl Engine {
    /// Keeps `n` spares per origin in use ([`Spares`]); 0 turns them off and tears down
    /// those there are.
    pub fn keep_spares(&self, n: usize) {
        self.spares.lock().target = n;
        if n == 0 {
            for sb in self.spares.surplus() {
                self.discard(sb);
            }
        }
    }

    /// Waits for spares being restored, and tears down every spare.
    pub(crate) async fn close_spares(&self) {
        self.keep_spares(0);
        self.spares.tasks.close();
        self.spares.tasks.wait().await;
        for sb in self.spares.surplus() {
            sb.destroy().await;
        }
    }

    /// Marks a batch as running until the guard is dropped.
    pub(crate) fn batch_running(&self) -> BatchRunning {
        let n = self.spares.batches.clone();
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        BatchRunning(n)
    }

    /// A spare of `key`, if spares are on and one is ready.
    pub(crate) fn take_spare(&self, key: &Key) -> Option<Sandbox> {
        if self.spares.lock().target == 0 {
            return None;
        }
        self.spares.take(key)
    }

    /// Restores spares of `key` in the background until there are as many as the target.
    /// `spec` is any sandbox spec of the origin (its id and hostname are replaced); `batch`
    /// is how many sessions the caller is making from it at once (1 for one session).
    pub(crate) fn refill_spares(&self, key: Key, spec: SandboxSpec, batch: usize) {
        {
            let mut st = self.spares.lock();
            let target = st.target;
            let e = st.entries.entry(key.clone()).or_default();
            e.demand = e.demand.max(batch.min(MAX_DEMAND));
            if target == 0 || e.refilling || e.ready.len() >= e.target(target) {
                return;
            }
            e.refilling = true;
        }
        for sb in self.spares.surplus() {
            self.discard(sb);
        }
        let engine = self.clone();
        let span = info_span!("spares.refill", snapshot = %key.snapshot.display());
        self.spares.tasks.spawn(
            async move {
                loop {
                    let (want, for_batches) = {
                        let st = engine.spares.lock();
                        st.entries.get(&key).map_or((0, false), |e| {
                            (
                                e.target(st.target).saturating_sub(e.ready.len()),
                                e.demand > st.target,
                            )
                        })
                    };
                    if want == 0 {
                        break;
                    }
                    if for_batches {
                        while engine.spares.batches.load(std::sync::atomic::Ordering::SeqCst) > 0
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    // One restore at a time refills the usual few spares off the callers'
                    // core; a batch's worth is refilled one per core, so that the next
                    // batch finds them.
                    let at_once = if for_batches {
                        refill_parallelism()
                    } else {
                        1
                    };
                    let restores = (0..want.min(at_once)).map(|_| {
                        let id = crate::engine::new_sandbox_id();
                        let spec = SandboxSpec {
                            id: id.clone(),
                            hostname: id,
                            ..spec.clone()
                        };
                        let engine = &engine;
                        let key = &key;
                        async move {
                            engine
                                .restore_sandbox(key.tier, &spec, &key.snapshot, false)
                                .await
                        }
                    });
                    let mut failed = false;
                    for r in futures_util::future::join_all(restores).await {
                        match r {
                            Ok(sb) => {
                                debug!(sandbox = %sb.id, "spare ready");
                                let mut st = engine.spares.lock();
                                st.entries.entry(key.clone()).or_default().ready.push(sb);
                            }
                            Err(e) => {
                                warn!(error = %e, "restoring a spare; trying again on the next use");
                                failed = true;
                            }
                        }
                    }
                    if failed {
                        break;
                    }
                }
                let mut st = engine.spares.lock();
                if let Some(e) = st.entries.get_mut(&key) {
                    e.refilling = false;
                }
            }
            .instrument(span),
        );
    }
}
