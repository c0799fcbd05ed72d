//! The invocation engine: publish templates, run invocations and execs in fresh sandboxes.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use thaw_protocol::{
    Bytes, Env, ExecRequest, InvokeRequest, InvokeStatus, Outcome, Request, Stream, TaskLimits,
};
use tracing::{info, info_span, Instrument};

use crate::agent::{ExecDone, InvokeDone};
use crate::audit::{call_events, capped_argv, AuditAction, AuditEvent, CallOutcome};
use crate::backend::{TierBackend, Tiers};
use crate::container::userns::IdMap;
use crate::container::{CloneMemory, SandboxSpec};
use crate::error::{Error, Result};
use crate::paths::{guest_init_binary, Paths};
use crate::progress::Progress;
use crate::sandbox::Sandbox;
use crate::store::{Meta, Store};
use crate::template::rootfs;
use crate::template::spec::{TemplateSpec, TemplateSpecExt as _};
use crate::tier::Tier;

/// Largest payload accepted for one invocation.
pub const MAX_PAYLOAD: u64 = 16 << 20;

// TemplateState, TemplateRecord, Timings, Invocation, ExecResult, StartKind and
// SnapshotSize are in thaw-types (types/src/template.rs, types/src/run.rs): API clients
// share them without compiling the engine.
pub use thaw_types::run::{ExecResult, Invocation, StartKind, Timings};
pub use thaw_types::template::{SnapshotSize, TemplateRecord, TemplateState};

/// The engine's side of [`TemplateRecord`] (the type is in thaw-types).
pub trait TemplateRecordExt {
    /// Its uid range, or why it cannot run until it is published again.
    fn ids(&self) -> Result<IdMap>;
}

impl TemplateRecordExt for TemplateRecord {
    fn ids(&self) -> Result<IdMap> {
        self.ids.ok_or_else(|| Error::TemplateNotReady {
            name: self.name.clone(),
            state: TemplateState::NeedsRebuild.as_str().to_string(),
            hint: format!(
                "{BEFORE_USERNS}; run `thaw deploy {}`",
                self.source_dir.display()
            ),
        })
    }
}

/// Range indexes held by sessions (records from before user namespaces hold none).
pub(crate) fn sessions_ids(s: &Store) -> Result<Vec<u32>> {
    #[derive(Deserialize)]
    struct Held {
        #[serde(default)]
        ids: Option<IdMap>,
    }
    Ok(s.list::<Held>(Store::sessions_tree())?
        .into_iter()
        .filter_map(|h| h.ids.map(|m| m.index()))
        .collect())
}

/// Why a template or session from before user namespaces is not restored.
pub(crate) const BEFORE_USERNS: &str = "it was published before sandboxes ran in user \
     namespaces (its snapshot would restore with sandbox root as host root)";

/// Per-call options of invoke and exec.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    /// Ends the call early with [`Error::Cancelled`] when cancelled (its caller went away):
    /// the task is killed (its agent exchange is dropped, which guest-init treats as
    /// cancel) and a fresh sandbox is discarded as on every other path. A restore in
    /// progress is finished first, never abandoned.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// Egress granted to this call on top of the template's (and session's) `[network]`.
    pub network: thaw_types::spec::NetworkGrant,
    /// Credentials for this call's sandbox (or, in a session, for this call).
    pub secrets: Vec<thaw_types::spec::SecretGrant>,
}

impl RunOptions {
    /// Whether the call was cancelled already.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    /// Runs `work` until it ends or the call is cancelled, whichever comes first.
    pub(crate) async fn cancellable<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        match &self.cancel {
            None => work.await,
            Some(c) => tokio::select! {
                biased;
                _ = c.cancelled() => Err(Error::Cancelled),
                r = work => r,
            },
        }
    }
}

/// The engine, as seen by one owner: an API key's id behind `thaw serve`, or
/// [`LOCAL_OWNER`] for the embedded CLI. Templates and sessions are scoped to the owner;
/// [`Engine::as_owner`] gives another owner's view of the same machine (cheap: it shares
/// everything but the name).
#[derive(Clone)]
pub struct Engine {
    pub paths: Paths,
    /// Every isolation tier; [`Engine::backend`] picks one.
    pub tiers: Tiers,
    pub snapshots: std::sync::Arc<thaw_snapshotter::Store>,
    pub(crate) meta: Meta,
    pub(crate) session_locks: std::sync::Arc<crate::session::SessionLocks>,
    /// Teardowns of discarded sandboxes still running (see [`Engine::settle`]).
    teardowns: tokio_util::task::TaskTracker,
    /// Coalesced snapshot garbage collection ([`Engine::collect_garbage_soon`]).
    gc: std::sync::Arc<GcRequests>,
    /// Session sandboxes restored ahead ([`crate::session::Spares`]).
    pub(crate) spares: std::sync::Arc<crate::session::Spares>,
    /// The egress gateway: sandboxes granted a network are wired to it.
    pub(crate) gateway: thaw_gateway::Gateway,
    /// Sessions' secrets, by session id: in this process's memory only (a restarted
    /// server's sessions have none until they are granted again).
    pub(crate) session_secrets: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, Vec<thaw_types::spec::SecretGrant>>>,
    >,
    /// The live sandboxes this process runs ([`crate::live`]: `thaw ps`, `thaw kill`).
    pub(crate) live: std::sync::Arc<crate::live::Registry>,
    /// Whether live views and kills span every owner (see [`Engine::sees_all_owners`]).
    pub(crate) all_owners: bool,
    /// The home's audit log ([`crate::audit`]); shared by every owner's view.
    pub(crate) audit_log: thaw_audit::Audit,
    owner: String,
}

/// Garbage collection requested and running ([`Engine::collect_garbage_soon`]).
#[derive(Default)]
struct GcRequests {
    requested: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicBool,
}

/// Owner of everything the embedded CLI publishes and creates.
pub const LOCAL_OWNER: &str = "local";

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn new_sandbox_id() -> String {
    format!("sb-{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

impl Engine {
    /// Opens the engine: creates directories and cleans up after any crashed thaw process.
    pub async fn open(paths: Paths) -> Result<Engine> {
        paths.ensure()?;
        let guest_init = guest_init_binary()?;
        let tiers = Tiers::new(paths.clone(), guest_init);
        let stats = crate::cleanup::sweep(&paths, &tiers).await?;
        if stats.sandboxes + stats.containers + stats.temp_dirs > 0 {
            info!(?stats, "cleaned up after a previous crash");
        }
        let snapshots = std::sync::Arc::new(thaw_snapshotter::Store::open(paths.snapshots())?);
        let meta = Meta::new(paths.meta_db());
        // Never fails: a log that cannot be written is opened failed, so that the engine
        // still reads, verifies and cleans up, but starts no new work.
        let audit_log = thaw_audit::Audit::open(paths.audit(), thaw_audit::Options::default());
        let engine = Engine {
            audit_log: audit_log.clone(),
            tiers,
            snapshots,
            paths,
            meta,
            session_locks: Default::default(),
            teardowns: tokio_util::task::TaskTracker::new(),
            gc: Default::default(),
            spares: Default::default(),
            gateway: crate::egress::open_gateway(audit_log.clone())?,
            session_secrets: Default::default(),
            live: Default::default(),
            // The local CLI is the machine's operator: it sees every owner's sandboxes.
            all_owners: true,
            owner: LOCAL_OWNER.to_string(),
        };
        engine.set_net_counters(std::sync::Arc::new(crate::egress::Counters(
            engine.gateway.clone(),
        )));
        engine.recover_sessions().await?;
        Ok(engine)
    }

    /// The same engine acting for another owner.
    pub fn as_owner(&self, owner: &str) -> Engine {
        let mut e = self.clone();
        e.owner = owner.to_string();
        e.all_owners = false;
        e
    }

    /// The same engine whose live views and kills ([`crate::live`]) span every owner: an
    /// admin key's (its templates and sessions stay its own).
    pub fn as_admin(&self) -> Engine {
        let mut e = self.clone();
        e.all_owners = true;
        e
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The implementation of `tier`: every tier-specific step goes through it.
    pub fn backend(&self, tier: Tier) -> &dyn TierBackend {
        self.tiers.backend(tier)
    }

    /// Key of one of this owner's templates in the templates tree.
    fn template_key(&self, name: &str) -> String {
        format!("{}/{name}", self.owner)
    }

    pub fn templates(&self) -> Result<Vec<TemplateRecord>> {
        let prefix = format!("{}/", self.owner);
        self.meta
            .read(|s| s.list_prefix(Store::templates_tree(), &prefix))
    }

    /// Every owner's templates (for server housekeeping and metrics, not for callers).
    pub fn all_templates(&self) -> Result<Vec<TemplateRecord>> {
        self.meta.read(|s| s.list(Store::templates_tree()))
    }

    pub fn template(&self, name: &str) -> Result<TemplateRecord> {
        let key = self.template_key(name);
        match self
            .meta
            .get_cached::<TemplateRecord>(Store::templates_tree(), &key)?
        {
            Some(t) => Ok(t),
            None => Err(Error::UnknownTemplate {
                name: name.to_string(),
                known: self.templates()?.into_iter().map(|t| t.name).collect(),
            }),
        }
    }

    pub fn remove_template(&self, name: &str) -> Result<TemplateRecord> {
        let t = self.template(name)?;
        let key = self.template_key(name);
        self.meta.with(|s| {
            s.remove(Store::templates_tree(), &key)?;
            // Its range is free again unless a session made from it still holds it.
            let held = sessions_ids(s)?;
            let reserved: Option<u32> = s.get(Store::id_ranges_tree(), &key)?;
            if reserved.is_some_and(|i| !held.contains(&i)) {
                s.remove(Store::id_ranges_tree(), &key)?;
            }
            Ok(())
        })?;
        if let Some(snap) = &t.snapshot {
            self.drop_snapshot(snap);
        }
        let event = AuditEvent::new(AuditAction::TemplateRemove).template(name);
        self.audited_anyway(Ok(t), vec![event])
    }

    /// The uid range of template `key`: the one it was given at its first publish, or the
    /// lowest one held by no template and no session. Reserved in the same unit of work, so
    /// two publishes never get one range.
    fn allocate_ids(&self, key: &str) -> Result<IdMap> {
        self.meta.with(|s| {
            if let Some(i) = s.get::<u32>(Store::id_ranges_tree(), key)? {
                return Ok(IdMap::range(i));
            }
            let mut used: Vec<u32> = s.list(Store::id_ranges_tree())?;
            used.extend(sessions_ids(s)?);
            let i = crate::container::userns::lowest_free(&used)?;
            s.put(Store::id_ranges_tree(), key, &i)?;
            Ok(IdMap::range(i))
        })
    }

    /// Builds the template's rootfs, boots it, warms it up and records it as ready. A failure
    /// at any step leaves the previously published version (if any) untouched.
    pub async fn deploy(&self, dir: &Path, progress: &dyn Progress) -> Result<TemplateRecord> {
        let started = Instant::now();
        progress.step("reading template.toml");
        let spec = TemplateSpec::load(dir)?;
        let span = info_span!("template.publish", template = %spec.name);
        self.audit_ready()?;
        let name = spec.name.clone();
        let r = async {
            let tier = crate::tier::resolve(
                spec.tier,
                std::env::var(crate::tier::TIER_ENV).ok().as_deref(),
                || crate::microvm::availability().map(|_| ()),
            )?;
            let key = self.template_key(&spec.name);
            let ids = self.allocate_ids(&key)?;
            let built = rootfs::build(
                &self.paths,
                &self.gateway,
                self.owner(),
                &spec,
                dir,
                ids,
                progress,
            )
            .await?;
            self.backend(tier)
                .prepare_template(&built.layers, &spec.limits, progress)
                .await?;
            progress.step(&format!(
                "booting a {} sandbox and warming up",
                tier.as_str()
            ));
            let (sb, warm) = self
                .cold_start(&spec, &built.layers, ids, tier, &RunOptions::default())
                .await?;
            progress.step("checkpointing the warm sandbox");
            let (snapshot, snapshot_size) = self.snapshot_template(&spec.name, sb).await?;
            let previous = self
                .meta
                .read(|s| s.get::<TemplateRecord>(Store::templates_tree(), &key))?;
            let record = TemplateRecord {
                name: spec.name.clone(),
                source_dir: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
                layers: built.layers,
                layer_key: built.key,
                tier,
                state: TemplateState::Ready,
                snapshot: Some(snapshot),
                published_at: now_secs(),
                publish_ms: started.elapsed().as_millis() as u64,
                warm_ms: warm.as_millis() as u64,
                snapshot_size,
                note: None,
                ids: Some(ids),
                spec,
            };
            self.meta
                .with(|s| s.put(Store::templates_tree(), &key, &record))?;
            // The new version is durable: only now may the old snapshot go.
            if let Some(old) = previous.and_then(|p| p.snapshot) {
                self.drop_snapshot(&old);
            }
            progress.step("ready");
            Ok(record)
        }
        .instrument(span)
        .await;
        // A failed publish ran the tenant's setup and warm-up too: it is recorded as well.
        let mut event = AuditEvent::new(AuditAction::TemplatePublish).template(name);
        event = match &r {
            Ok(t) => event
                .with("tier", t.tier.as_str())
                .with("snapshot", &t.snapshot)
                .with("publish_ms", t.publish_ms),
            Err(e) => event.with("error", crate::audit::error_kind(e)),
        };
        self.audited(r, vec![event])
    }

    /// Checkpoints a warm template sandbox into the snapshot store. The checkpoint is
    /// written to a scratch directory first; the store makes it visible atomically.
    async fn snapshot_template(
        &self,
        template: &str,
        sb: Sandbox,
    ) -> Result<(String, SnapshotSize)> {
        let name = format!(
            "tpl-{template}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let r = self.snapshot_sandbox(&sb, &name, false).await;
        sb.destroy().await;
        Ok((name, r?))
    }

    /// Checkpoints a live sandbox into the snapshot store under `name`. The checkpoint is
    /// written to a scratch directory first; the store makes it visible atomically, so a
    /// crash at any point leaves either no snapshot or a whole one. The caller still owns
    /// (and must destroy) the sandbox.
    pub(crate) async fn snapshot_sandbox(
        &self,
        sb: &Sandbox,
        name: &str,
        leave_running: bool,
    ) -> Result<SnapshotSize> {
        let started = Instant::now();
        let scratch = crate::cleanup::Scratch::new(&self.paths.checkpoints(), &sb.id)?;
        let images = scratch.path.join("snapshot");
        async {
            self.backend(sb.tier())
                .checkpoint(sb, &images, leave_running)
                .await?;
            let checkpoint_ms = started.elapsed().as_millis() as u64;
            let snaps = self.snapshots.clone();
            let (n, imgs) = (name.to_string(), images.clone());
            let stats = tokio::task::spawn_blocking(move || {
                snaps.put_dir(&n, &imgs, &thaw_snapshotter::PutOptions::default())
            })
            .await
            .map_err(|e| Error::Other(format!("snapshot task: {e}")))??;
            Ok(SnapshotSize {
                raw_bytes: stats.raw_bytes,
                stored_bytes: stats.new_stored_bytes,
                checkpoint_ms,
            })
        }
        .await
    }

    /// Removes a snapshot and its unshared chunks; failures only leave garbage for a later gc.
    pub(crate) fn drop_snapshot(&self, name: &str) {
        match self.snapshots.delete(name) {
            // A rolled-back pause may not have got as far as storing it.
            Ok(()) | Err(thaw_snapshotter::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(snapshot = name, error = %e, "deleting snapshot"),
        }
        let _ = self
            .snapshots
            .evict_cache(thaw_snapshotter::Evict::Unreferenced);
        if let Err(e) = self.snapshots.gc() {
            tracing::warn!(error = %e, "snapshot gc");
        }
    }

    /// Deletes snapshots off the caller's clock, and collects their chunks with
    /// [`Engine::collect_garbage_soon`]. [`Engine::settle`] waits for it, like a discarded
    /// sandbox's teardown.
    pub(crate) fn drop_snapshots_later(&self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        let engine = self.clone();
        self.teardowns.spawn(async move {
            let snaps = engine.snapshots.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for n in &names {
                    match snaps.delete(n) {
                        Ok(()) | Err(thaw_snapshotter::Error::NotFound { .. }) => {}
                        Err(e) => tracing::warn!(snapshot = %n, error = %e, "deleting snapshot"),
                    }
                }
            })
            .await;
            engine.collect_garbage_soon();
        });
    }

    /// Evicts unreferenced cache entries and collects unreferenced chunks, coalescing
    /// requests: the store's gc walks every chunk under the store's exclusive lock (which
    /// holds off every restore's materialisation), so sixteen deleted sessions must cost
    /// one or two passes, not sixteen. A request made while a pass runs gets one more pass.
    pub(crate) fn collect_garbage_soon(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.gc.requested.fetch_add(1, SeqCst);
        if self.gc.running.swap(true, SeqCst) {
            return; // the running pass will see the request
        }
        let (gc, snaps) = (self.gc.clone(), self.snapshots.clone());
        self.teardowns.spawn(async move {
            loop {
                let seen = gc.requested.load(SeqCst);
                let s = snaps.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = s.evict_cache(thaw_snapshotter::Evict::Unreferenced);
                    if let Err(e) = s.gc() {
                        tracing::warn!(error = %e, "snapshot gc");
                    }
                })
                .await;
                if gc.requested.load(SeqCst) == seen {
                    gc.running.store(false, SeqCst);
                    // A request between the load and the store found `running` set: take it.
                    if gc.requested.load(SeqCst) == seen || gc.running.swap(true, SeqCst) {
                        break;
                    }
                }
            }
        });
    }

    /// Marks a template as needing a rebuild (its snapshot is damaged).
    fn mark_needs_rebuild(&self, t: &TemplateRecord, why: &str) {
        let mut t = t.clone();
        t.state = TemplateState::NeedsRebuild;
        t.note = Some(why.to_string());
        let key = self.template_key(&t.name);
        let _ = self.meta.with(|s| s.put(Store::templates_tree(), &key, &t));
    }

    /// Starts a sandbox for one call: restored from the snapshot when there is one, else
    /// cold. Returns the sandbox, how it started, and the time to ready and to warm. The
    /// sandbox ends in a discard, so its memory is shared copy-on-write with the snapshot.
    pub async fn start(
        &self,
        t: &TemplateRecord,
        opts: &RunOptions,
    ) -> Result<(Sandbox, StartKind, Duration, Duration)> {
        self.start_as(t, opts, &new_sandbox_id(), CloneMemory::Shared)
            .await
    }

    /// [`Engine::start`] with a chosen sandbox id (a session's sandbox is named after it)
    /// and memory (a session's must be [`CloneMemory::Copied`]: it is checkpointed later).
    pub(crate) async fn start_as(
        &self,
        t: &TemplateRecord,
        opts: &RunOptions,
        id: &str,
        memory: CloneMemory,
    ) -> Result<(Sandbox, StartKind, Duration, Duration)> {
        let started = Instant::now();
        let Some(snap) = &t.snapshot else {
            let (sb, warm) = self
                .cold_start_as(&t.spec, &t.layers, t.ids()?, t.tier, opts, id)
                .await?;
            return Ok((sb, StartKind::Cold, started.elapsed() - warm, warm));
        };
        let snaps = self.snapshots.clone();
        let name = snap.clone();
        let dir = tokio::task::spawn_blocking(move || snaps.materialize_cached(&name))
            .await
            .map_err(|e| Error::Other(format!("materialize task: {e}")))?;
        let dir = match dir {
            Ok(d) => d,
            Err(e) => {
                if e.is_corruption() {
                    self.mark_needs_rebuild(t, &e.to_string());
                    return Err(Error::SnapshotCorrupt {
                        template: t.name.clone(),
                        message: e.to_string(),
                    });
                }
                return Err(e.into());
            }
        };
        let spec = SandboxSpec {
            memory,
            ..self.sandbox_spec(&t.spec, &t.layers, t.ids()?, id)
        };
        let sb = self.restore_sandbox(t.tier, &spec, &dir, false).await?;
        if let Err(e) = self.hygiene(&sb, &t.spec, opts).await {
            sb.destroy().await;
            return Err(e);
        }
        Ok((sb, StartKind::Restore, started.elapsed(), Duration::ZERO))
    }

    pub(crate) fn sandbox_spec(
        &self,
        spec: &TemplateSpec,
        layers: &[PathBuf],
        ids: IdMap,
        id: &str,
    ) -> SandboxSpec {
        SandboxSpec {
            ids,
            id: id.to_string(),
            hostname: id.to_string(),
            layers: layers.to_vec(),
            limits: spec.limits.clone(),
            // Longer where the operator says the host is slow (nested virtualization).
            boot_timeout: thaw_microvm::api::patience(Duration::from_secs(30)),
            memory: CloneMemory::Copied,
        }
    }

    /// Restores a sandbox of `tier` from a materialised snapshot directory. `private`: the
    /// directory is this restore's own copy (a session's resume), which a microvm keeps for
    /// its lifetime (its memory is read from it on demand); otherwise it is the shared,
    /// read-only cache entry.
    pub(crate) async fn restore_sandbox(
        &self,
        tier: Tier,
        spec: &SandboxSpec,
        dir: &Path,
        private: bool,
    ) -> Result<Sandbox> {
        self.backend(tier).restore(spec, dir, private).await
    }

    /// A handle on a running sandbox of `tier` (a session's, possibly made by an earlier
    /// process).
    pub(crate) fn attach(&self, tier: Tier, id: &str) -> Sandbox {
        self.backend(tier).attach(id)
    }

    /// Boots a fresh sandbox, applies clone hygiene, configures the handler and runs the
    /// warm-up. Returns the sandbox and how long warming took.
    async fn cold_start(
        &self,
        spec: &TemplateSpec,
        layers: &[PathBuf],
        ids: IdMap,
        tier: Tier,
        opts: &RunOptions,
    ) -> Result<(Sandbox, Duration)> {
        self.cold_start_as(spec, layers, ids, tier, opts, &new_sandbox_id())
            .await
    }

    pub(crate) async fn cold_start_as(
        &self,
        spec: &TemplateSpec,
        layers: &[PathBuf],
        ids: IdMap,
        tier: Tier,
        opts: &RunOptions,
        id: &str,
    ) -> Result<(Sandbox, Duration)> {
        let sandbox_spec = self.sandbox_spec(spec, layers, ids, id);
        let sb = self.backend(tier).boot(&sandbox_spec).await?;
        let warm_started = Instant::now();
        let r = async {
            self.hygiene(&sb, spec, opts).await?;
            sb.agent
                .call(&Request::Configure(spec.handler_config()))
                .await
                .map_err(|e| Error::WarmupFailed(e.to_string()))?;
            if let Some(w) = &spec.warmup {
                let mut tail = Vec::new();
                let done = sb
                    .agent
                    .exec(
                        ExecRequest {
                            argv: w.command.clone(),
                            env: Env::new(),
                            cwd: None,
                            stdin: None,
                            limits: TaskLimits {
                                timeout_ms: Some(w.timeout_s * 1000),
                                output_cap: 64 << 10,
                            },
                        },
                        |_, data| tail.extend_from_slice(data),
                    )
                    .await
                    .map_err(|e| Error::WarmupFailed(e.to_string()))?;
                if !done.outcome.success() {
                    return Err(Error::WarmupFailed(format!(
                        "`{}` ended with {:?}; last output: {}",
                        w.command.join(" "),
                        done.outcome,
                        crate::container::runc::tail(&tail, 400)
                    )));
                }
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => Ok((sb, warm_started.elapsed())),
            Err(e) => {
                sb.destroy().await;
                Err(e)
            }
        }
    }

    /// Clone hygiene: identity, fresh entropy, wall clock, environment.
    pub(crate) async fn hygiene(
        &self,
        sb: &Sandbox,
        spec: &TemplateSpec,
        opts: &RunOptions,
    ) -> Result<()> {
        self.hygiene_as(sb, spec, opts, &sb.id).await
    }

    /// [`Engine::hygiene`] under another identity than the sandbox's id: a session's
    /// sandboxes all answer to the session's id (hostname, `THAW_SANDBOX_ID`), whichever
    /// restore made them.
    pub(crate) async fn hygiene_as(
        &self,
        sb: &Sandbox,
        spec: &TemplateSpec,
        opts: &RunOptions,
        identity: &str,
    ) -> Result<()> {
        let mut seed = vec![0u8; 64];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mut env: Env = spec.env.clone();
        env.extend(opts.env.clone());
        let policy = self.egress_policy(spec, &opts.network)?;
        // Secrets: placeholders in the environment, values with the gateway only.
        let secrets = crate::egress::secrets_of(&opts.secrets, &policy)?;
        env.extend(crate::egress::secret_env(&secrets));
        sb.agent
            .call_all(&[
                Request::SetIdentity {
                    hostname: identity.to_string(),
                    sandbox_id: identity.to_string(),
                },
                Request::AddEntropy { data: Bytes(seed) },
                Request::SetClock { unix_nanos: now },
                Request::SetEnv { env, replace: true },
            ])
            .await?;
        crate::egress::open(
            &self.gateway,
            self.owner(),
            sb,
            policy,
            crate::egress::limits_of(&spec.network),
        )
        .await?;
        if !secrets.is_empty() {
            crate::egress::grant_secrets(&self.gateway, sb, secrets, true).await?;
        }
        Ok(())
    }

    /// The egress policy of a sandbox of `spec` with `grant` added (a session's or a
    /// call's). The template's part was checked at publish.
    pub(crate) fn egress_policy(
        &self,
        spec: &TemplateSpec,
        grant: &thaw_types::spec::NetworkGrant,
    ) -> Result<thaw_gateway::Policy> {
        let base = thaw_gateway::Policy::parse(&spec.network.allow_out, &spec.network.deny_out)
            .map_err(|e| crate::egress::bad_lists("network.", e))?;
        Ok(base.union(&crate::egress::grant_policy(grant)?))
    }

    /// Traffic figures of a sandbox granted egress (`None`: it has none).
    pub fn egress_figures(&self, sandbox: &str) -> Option<thaw_gateway::NetFigures> {
        self.gateway.figures(sandbox)
    }

    pub(crate) fn limits(spec: &TemplateSpec, opts: &RunOptions) -> TaskLimits {
        TaskLimits {
            timeout_ms: Some(
                opts.timeout
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(spec.limits.timeout_s * 1000),
            ),
            output_cap: spec.limits.output_kib * 1024,
        }
    }

    pub fn ready_template(&self, name: &str) -> Result<TemplateRecord> {
        let mut t = self.template(name)?;
        if t.ids.is_none() && t.state == TemplateState::Ready {
            self.mark_needs_rebuild(&t, BEFORE_USERNS);
            t.state = TemplateState::NeedsRebuild;
            t.note = Some(BEFORE_USERNS.to_string());
        }
        if t.state != TemplateState::Ready {
            return Err(Error::TemplateNotReady {
                name: t.name.clone(),
                state: t.state.as_str().to_string(),
                hint: format!(
                    "{}; run `thaw deploy {}`",
                    t.note.clone().unwrap_or_default(),
                    t.source_dir.display()
                ),
            });
        }
        Ok(t)
    }

    /// Starts a fresh sandbox of `t`, runs `work` in it, and discards it on every path.
    /// Returns what `work` produced with the sandbox id, how it started, and the timings.
    /// `record` describes what ran for the audit log, from its result and its sandbox's id
    /// (a call that never got a sandbox ran nothing and is not recorded).
    async fn run_once<T>(
        &self,
        t: &TemplateRecord,
        opts: &RunOptions,
        task: crate::live::RunningTask,
        work: impl AsyncFnOnce(&Sandbox) -> Result<T>,
        record: impl FnOnce(&Result<T>, &str) -> Vec<AuditEvent>,
    ) -> Result<(T, String, StartKind, Timings)> {
        if opts.cancelled() {
            return Err(Error::Cancelled);
        }
        self.audit_ready()?;
        let started = Instant::now();
        // Listed by `thaw ps` and ended by `thaw kill` while it runs ([`crate::live`]).
        let call = self.live.begin(self.owner(), &t.name, t.tier, task);
        let (sb, kind, ready, warm) = self.start(t, opts).await?;
        call.started(&sb.id);
        let run_started = Instant::now();
        let r = call
            .watch(&sb.id, opts.cancellable(work(&sb)))
            .await
            .map_err(|e| sb.explain(e));
        let run_ms = ms(run_started.elapsed());
        let id = sb.id.clone();
        drop(call);
        self.discard(sb);
        let events = record(&r, &id);
        let r = self.audited(r, events);
        let timings = Timings {
            start_ms: ms(ready),
            warm_ms: ms(warm),
            run_ms,
            total_ms: ms(started.elapsed()),
        };
        Ok((r?, id, kind, timings))
    }

    /// Tears a used sandbox down without making its caller wait: the answer goes out now,
    /// and the 5-8 ms of killing, unmounting and cgroup removal overlap whatever the caller
    /// does next. [`Engine::settle`] waits for them; a process killed first leaves them to
    /// the next start's sweep, as any crash does.
    pub(crate) fn discard(&self, sb: Sandbox) {
        let span = info_span!("sandbox.discard", sandbox = %sb.id);
        self.teardowns
            .spawn(async move { sb.destroy().await }.instrument(span));
    }

    /// Waits until every sandbox this engine (or any clone of it) discarded is gone.
    pub async fn settle(&self) {
        self.teardowns.close();
        self.teardowns.wait().await;
        self.teardowns.reopen();
    }

    /// Keeps `n` sandboxes prepared ahead of their restore per snapshot restored (see
    /// [`crate::container::pool`]). For long-lived engines; 0 (the default) keeps none.
    pub fn keep_prepared(&self, n: usize) {
        for b in self.tiers.all() {
            b.keep_prepared(n);
        }
    }

    /// Ends this process's use of the engine: tears down discarded and prepared sandboxes.
    /// Call it before the process exits.
    pub async fn close(&self) {
        self.close_spares().await;
        self.keep_prepared(0);
        self.settle().await;
        for b in self.tiers.all() {
            b.close().await;
        }
    }

    /// Runs the template's handler on one payload in a fresh sandbox, then discards it.
    pub async fn invoke(
        &self,
        name: &str,
        payload: serde_json::Value,
        opts: RunOptions,
        on_stderr: impl FnMut(&[u8]),
    ) -> Result<Invocation> {
        self.audit_ready()?;
        let t = self.ready_template(name)?;
        let limits = Self::limits(&t.spec, &opts);
        let env = opts.env.clone();
        let task = crate::live::RunningTask {
            kind: "invoke".into(),
            argv: t.spec.handler.command.clone(),
            since_ms: crate::live::now_ms(),
        };
        let (done, sandbox_id, start, timings) = self
            .run_once(
                &t,
                &opts,
                task,
                async |sb: &Sandbox| {
                    let mut done = sb
                        .agent
                        .invoke(
                            InvokeRequest {
                                payload,
                                env,
                                limits,
                            },
                            on_stderr,
                        )
                        .await?;
                    if sb.oom_killed() {
                        done.status = InvokeStatus::Oom;
                        done.outcome = Some(Outcome::Oom);
                    }
                    Ok(done)
                },
                |r: &Result<InvokeDone>, sandbox: &str| {
                    let call = AuditEvent::new(AuditAction::Invoke).template(name);
                    call_events(call, sandbox, r, |d: &InvokeDone| CallOutcome {
                        outcome: d.outcome,
                        exit_code: None,
                        status: Some(d.status),
                        truncated: d.truncated,
                    })
                },
            )
            .instrument(info_span!("invoke", template = %name))
            .await?;
        Ok(Invocation {
            template: name.to_string(),
            sandbox_id,
            start,
            done,
            timings,
        })
    }

    /// Runs a command in a fresh sandbox of the template, streaming its output.
    pub async fn exec(
        &self,
        name: &str,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        opts: RunOptions,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecResult> {
        self.audit_ready()?;
        let t = self.ready_template(name)?;
        let task = crate::live::RunningTask {
            kind: "exec".into(),
            argv: argv.clone(),
            since_ms: crate::live::now_ms(),
        };
        let call = AuditEvent::new(AuditAction::Exec)
            .template(name)
            .with("argv", capped_argv(&argv))
            .with("stdin_bytes", stdin.as_ref().map(Vec::len));
        let req = ExecRequest {
            argv,
            env: opts.env.clone(),
            cwd: None,
            stdin: stdin.map(Bytes),
            limits: Self::limits(&t.spec, &opts),
        };
        let (d, sandbox_id, start, timings) = self
            .run_once(
                &t,
                &opts,
                task,
                async |sb: &Sandbox| {
                    let mut d: ExecDone = sb.agent.exec(req, on_output).await?;
                    if matches!(d.outcome, Outcome::Signaled { signal: 9 }) && sb.oom_killed() {
                        d.outcome = Outcome::Oom;
                    }
                    Ok(d)
                },
                |r: &Result<ExecDone>, sandbox: &str| {
                    call_events(call, sandbox, r, |d: &ExecDone| CallOutcome {
                        outcome: Some(d.outcome),
                        exit_code: Some(d.outcome.exit_code()),
                        status: None,
                        truncated: d.truncated,
                    })
                },
            )
            .instrument(info_span!("exec", template = %name))
            .await?;
        Ok(ExecResult {
            template: name.to_string(),
            sandbox_id,
            start,
            exit_code: d.outcome.exit_code(),
            outcome: d.outcome,
            truncated: d.truncated,
            timings,
        })
    }

    /// Starts a sandbox of a template and keeps it alive (benchmarks, many-clone tests,
    /// sessions). The caller must [`Live::destroy`] it.
    pub async fn spawn(&self, name: &str, opts: &RunOptions) -> Result<Live> {
        self.audit_ready()?;
        let t = self.ready_template(name)?;
        let (sb, kind, ready, warm) = self.start(&t, opts).await?;
        Ok(Live {
            sb,
            template: t,
            kind,
            ready,
            warm,
        })
    }

    /// Boots a sandbox from scratch even when a snapshot exists (the cold-start baseline).
    pub async fn spawn_cold(&self, name: &str, opts: &RunOptions) -> Result<Live> {
        self.audit_ready()?;
        let t = self.ready_template(name)?;
        let started = Instant::now();
        let (sb, warm) = self
            .cold_start(&t.spec, &t.layers, t.ids()?, t.tier, opts)
            .await?;
        Ok(Live {
            sb,
            template: t,
            kind: StartKind::Cold,
            ready: started.elapsed() - warm,
            warm,
        })
    }
}

/// CRIU 4.x must be on PATH: 3.x fails its vDSO check on current kernels.
pub(crate) fn require_criu() -> Result<()> {
    match crate::doctor::criu_major() {
        Some(v) if v >= 4 => Ok(()),
        Some(v) => Err(Error::MissingDependency {
            what: format!("CRIU >= 4.0 (found {v}.x, whose vDSO check fails on current kernels)"),
            fix: "run `make deps` (builds CRIU 4.1.1 into /usr/local/sbin)".into(),
        }),
        None => Err(Error::MissingDependency {
            what: "criu (checkpoint/restore of sandboxes)".into(),
            fix: "run `make deps` (builds CRIU 4.1.1 into /usr/local/sbin)".into(),
        }),
    }
}

/// OOM kills recorded for a sandbox's memory cgroup.
pub fn oom_kills(id: &str) -> u64 {
    // v1 counts in memory.oom_control, v2 in memory.events; both say `oom_kill N`.
    let candidates = crate::container::memory_cgroup_dirs(id)
        .into_iter()
        .flat_map(|d| [d.join("memory.oom_control"), d.join("memory.events")]);
    for c in candidates {
        if let Ok(text) = std::fs::read_to_string(&c) {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("oom_kill ") {
                    if let Ok(n) = v.trim().parse::<u64>() {
                        if n > 0 {
                            return n;
                        }
                    }
                }
            }
        }
    }
    0
}

/// Parses a user-supplied payload, enforcing the size cap.
pub fn parse_payload(bytes: &[u8]) -> Result<serde_json::Value> {
    if bytes.len() as u64 > MAX_PAYLOAD {
        return Err(Error::TooLarge {
            what: "payload".into(),
            size: bytes.len() as u64,
            limit: MAX_PAYLOAD,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| Error::BadPayload(e.to_string()))
}

/// A live sandbox owned by the caller.
pub struct Live {
    pub sb: Sandbox,
    pub template: TemplateRecord,
    pub kind: StartKind,
    /// Creation to guest-init ready (including clone hygiene on a restore).
    pub ready: Duration,
    /// Handler warm-up (cold starts only).
    pub warm: Duration,
}

impl Live {
    pub fn id(&self) -> &str {
        &self.sb.id
    }

    pub async fn invoke(
        &self,
        payload: serde_json::Value,
        opts: &RunOptions,
    ) -> Result<InvokeDone> {
        self.sb
            .agent
            .invoke(
                InvokeRequest {
                    payload,
                    env: opts.env.clone(),
                    limits: Engine::limits(&self.template.spec, opts),
                },
                |_| {},
            )
            .await
    }

    /// Runs a command and returns its outcome with the collected stdout and stderr.
    pub async fn exec_collect(
        &self,
        argv: Vec<String>,
        opts: &RunOptions,
    ) -> Result<(ExecDone, Vec<u8>, Vec<u8>)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let done = self
            .sb
            .agent
            .exec(
                ExecRequest {
                    argv,
                    env: opts.env.clone(),
                    cwd: None,
                    stdin: None,
                    limits: Engine::limits(&self.template.spec, opts),
                },
                |s, d| match s {
                    Stream::Stdout => out.extend_from_slice(d),
                    Stream::Stderr => err.extend_from_slice(d),
                },
            )
            .await?;
        Ok((done, out, err))
    }

    pub async fn destroy(self) {
        self.sb.destroy().await
    }
}
