//! What RL rollout workers do with sessions: make many at once (batch), branch a live one
//! into many (fork), keep named snapshots of one (checkpoints), put one back to where it
//! started or to a checkpoint (reset), and score it (reward).
//!
//! Every session made here is restored from a snapshot the session itself holds a name
//! for (a tag in the snapshot store, [`origin_snapshot`]): its template's snapshot, a fork
//! point, or a checkpoint of another session. A tag copies nothing, so a session's origin
//! outlives a redeploy of its template, the deletion of the session it was forked from and
//! that session's checkpoints, and it goes when the session does.
//!
//! A reset restores a new sandbox from the origin (or a checkpoint) while the old one still
//! runs, switches the session's record over, and tears the old one down off the caller's
//! clock. What bounds it is one restore from the snapshot cache plus clone hygiene: no
//! namespace, mount or cgroup of the old sandbox is on its path.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use thaw_protocol::Outcome;
use tracing::{info, info_span, Instrument};

use super::{
    alive, conflict, me, new_session_id, PendingOp, Session, SessionOptions, SessionRecord,
    SessionState,
};
use crate::audit::{AuditAction, AuditEvent};
use crate::cleanup;
use crate::container::userns::IdMap;
use crate::container::CloneMemory;
use crate::engine::TemplateRecordExt as _;
use crate::engine::{ms, new_sandbox_id, now_secs, Engine, RunOptions, TemplateRecord};
use crate::error::{Error, Result};
use crate::sandbox::Sandbox;
use crate::store::Store;
use crate::template::spec::TemplateSpec;

/// How many sessions of one batch or fork are restored at once. Each restore is mostly
/// CRIU or the VMM working on one core, with waits on the disk between; two per core keeps
/// both busy without making every session of the batch wait for all the others.
fn restore_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .clamp(2, 16)
}

/// The snapshot-store name of a session's origin tag.
pub(super) fn origin_snapshot(session: &str) -> String {
    format!("{}-origin", snapshot_prefix(session))
}

/// The snapshot-store name of a session's checkpoint.
pub(super) fn checkpoint_snapshot(session: &str, name: &str) -> String {
    format!("{}-ckp-{name}", snapshot_prefix(session))
}

/// Every snapshot a session owns starts with this (pauses included), so deleting the
/// session can remove what a crash left unrecorded.
pub(super) fn snapshot_prefix(session: &str) -> String {
    format!("ses-{}", session.trim_start_matches("ses-"))
}

// Checkpoint, ResetOutcome and Reward are in thaw-types (types/src/rollout.rs): API clients
// share them without compiling the engine.
pub use thaw_types::rollout::{Checkpoint, ResetOutcome, Reward};

/// What a batch of sessions is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchSource {
    /// The template's snapshot, as `session_create` does.
    Template(String),
    /// A session's checkpoint, or with no name, the session's own state: a paused
    /// session's pause snapshot, or (for a running one) a fork point taken now.
    Session {
        id: String,
        checkpoint: Option<String>,
    },
}

/// One session of a batch, as it becomes ready (or fails).
#[derive(Debug)]
pub struct BatchItem {
    pub index: usize,
    pub result: Result<Session>,
}

/// Largest output of a reward command kept.
const REWARD_OUTPUT: usize = 64 << 10;

/// Checkpoint names: what a snapshot name allows, short enough to fit one.
fn validate_checkpoint_name(name: &str) -> Result<()> {
    let bad = |reason: &str| Error::InvalidName {
        what: "checkpoint name",
        name: name.chars().take(80).collect(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("it must be 1 to 64 characters long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad(
            "only ASCII letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("it must start with a letter or digit"));
    }
    Ok(())
}

/// The reward in a reward command's output: its last non-empty line, a finite number.
fn parse_reward(stdout: &str) -> std::result::Result<f64, String> {
    let Some(line) = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        return Err("printed nothing".into());
    };
    match line.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("printed {line:?}, which is not a finite number")),
        Err(_) => Err(format!(
            "printed {line:?} as its last line, which is not a number"
        )),
    }
}

fn tail_text(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// What a new session inherits: from its template, or from the session it was forked or
/// batched from (which keeps the template as it was when that session was made).
pub(super) struct Lineage {
    owner: String,
    template: String,
    spec: TemplateSpec,
    layers: Vec<std::path::PathBuf>,
    tier: crate::tier::Tier,
    ids: Option<IdMap>,
    /// A forked session keeps its source's egress grant.
    network: thaw_types::spec::NetworkGrant,
    /// And its secrets, as this process holds them: a fork is the same agent at the same
    /// point, and its memory already expects them.
    secrets: Vec<thaw_types::spec::SecretGrant>,
}

impl Lineage {
    pub(super) fn of_template(t: &TemplateRecord, owner: &str) -> Result<Lineage> {
        Ok(Lineage {
            owner: owner.to_string(),
            template: t.name.clone(),
            spec: t.spec.clone(),
            layers: t.layers.clone(),
            tier: t.tier,
            ids: Some(t.ids()?),
            network: Default::default(),
            secrets: Vec::new(),
        })
    }

    fn of_session(r: &SessionRecord, secrets: Vec<thaw_types::spec::SecretGrant>) -> Lineage {
        Lineage {
            owner: r.session.owner.clone(),
            template: r.session.template.clone(),
            spec: r.spec.clone(),
            layers: r.layers.clone(),
            tier: r.tier,
            ids: r.ids,
            network: r.session.network.clone(),
            secrets,
        }
    }
}

/// A new session record of `parent`'s lineage, in state `creating`, with its options.
fn child_record(parent: &Lineage, origin: String, opts: &SessionOptions) -> SessionRecord {
    let id = new_session_id();
    let now = now_secs();
    SessionRecord {
        session: Session {
            id,
            owner: parent.owner.clone(),
            template: parent.template.clone(),
            state: SessionState::Creating,
            created_at: now,
            last_active_at: now,
            expires_at: now.saturating_add(opts.max_lifetime.as_secs()),
            idle_timeout_s: opts.idle_timeout.as_secs(),
            // A session that cannot be paused is stopped by its timeouts.
            on_timeout: if opts.checkpointable {
                opts.on_timeout
            } else {
                crate::session::TimeoutAction::Stop
            },
            env: opts.env.clone(),
            network: if opts.network.is_empty() {
                parent.network.clone()
            } else {
                opts.network.clone()
            },
            error: None,
            snapshot: None,
            snapshot_size: None,
            pauses: 0,
            last_pause_ms: None,
            last_resume_ms: None,
            origin,
            checkpoints: Vec::new(),
            resets: 0,
            sandbox: None,
            checkpointable: opts.checkpointable,
        },
        spec: parent.spec.clone(),
        layers: parent.layers.clone(),
        tier: parent.tier,
        init: None,
        op: None,
        ids: parent.ids,
        sandbox: None,
        has_origin: false,
        checkpoints: BTreeMap::new(),
        killed: None,
    }
}

impl Engine {
    /// The lineage of sessions made from session `r`, with the secrets this process holds
    /// for it.
    fn lineage_of(&self, r: &SessionRecord) -> Lineage {
        Lineage::of_session(r, self.secrets_of_session(&r.session.id))
    }
}

impl SessionRecord {
    /// Refuses what only a checkpointable session can do.
    pub(super) fn must_checkpoint(&self, what: &str) -> Result<()> {
        if self.session.checkpointable {
            return Ok(());
        }
        let id = &self.session.id;
        Err(Error::Conflict(format!(
            "session `{id}` was made with `checkpointable: false` (its memory is shared with its snapshot, which makes it fast to restore and small), so it cannot be {what}; reset it, or make a checkpointable session for this"
        )))
    }

    /// The record's public view with the fields derived from the rest.
    pub(super) fn view(&self) -> Session {
        let mut s = self.session.clone();
        s.checkpoints = self.checkpoints.keys().cloned().collect();
        s.sandbox = matches!(s.state, SessionState::Running | SessionState::Pausing)
            .then(|| self.sandbox_id().to_string());
        s
    }
}

impl Engine {
    /// The spec of a sandbox for session `rec`: named `sandbox`, answering to the
    /// session's id, memory it owns (sessions are checkpointed).
    pub(super) fn session_sandbox_spec(
        &self,
        rec: &SessionRecord,
        ids: crate::container::userns::IdMap,
        sandbox: &str,
    ) -> crate::container::SandboxSpec {
        crate::container::SandboxSpec {
            hostname: rec.session.id.clone(),
            memory: if rec.session.checkpointable {
                CloneMemory::Copied
            } else {
                CloneMemory::Shared
            },
            ..self.sandbox_spec(&rec.spec, &rec.layers, ids, sandbox)
        }
    }

    /// Makes a restored sandbox the session's: clone hygiene under the session's identity
    /// and environment, then the owner record that hands it from this process to the
    /// session (the crash sweep leaves it alone from then on).
    pub(super) async fn adopt(&self, rec: &SessionRecord, sb: &Sandbox) -> Result<()> {
        let opts = RunOptions {
            env: rec.session.env.clone(),
            network: rec.session.network.clone(),
            secrets: self.secrets_of_session(&rec.session.id),
            ..RunOptions::default()
        };
        self.hygiene_as(sb, &rec.spec, &opts, &rec.session.id)
            .await?;
        cleanup::write_session_owner(&sb.owner_file(), &rec.session.id)
    }

    /// Restores a new sandbox `sandbox` for session `rec` from snapshot `snap` (through the
    /// machine's snapshot cache, shared read-only with every other clone of it) and
    /// adopts it. On error nothing of the sandbox is left.
    pub(super) async fn restore_for(
        &self,
        rec: &SessionRecord,
        snap: &str,
        sandbox: &str,
        batch: usize,
    ) -> Result<Sandbox> {
        let id = &rec.session.id;
        let ids = rec.ids.ok_or_else(|| {
            Error::Conflict(format!(
                "session `{id}` cannot be restored: {}; delete it with `thaw session rm {id}`",
                crate::engine::BEFORE_USERNS
            ))
        })?;
        let snaps = self.snapshots.clone();
        let name = snap.to_string();
        let dir = tokio::task::spawn_blocking(move || snaps.materialize_cached(&name))
            .await
            .map_err(|e| Error::Other(format!("materialize task: {e}")))??;
        let spec = self.session_sandbox_spec(rec, ids, sandbox);
        // Sessions that share their memory with the snapshot take a spare restored ahead.
        let spare_key =
            (!rec.session.checkpointable).then(|| super::spares::Key::of(rec.tier, &spec, &dir));
        // A spare may have died while it waited (killed from outside, the host out of
        // memory): it is discarded and the next one, or a restore, takes its place.
        while let Some(sb) = spare_key.as_ref().and_then(|k| self.take_spare(k)) {
            let handed = async {
                sb.rename_host(&rec.session.id).await?;
                self.adopt(rec, &sb).await
            }
            .await;
            match handed {
                Ok(()) => {
                    if let Some(k) = spare_key {
                        self.refill_spares(k, spec, batch);
                    }
                    return Ok(sb);
                }
                Err(e) => {
                    tracing::warn!(sandbox = %sb.id, error = %e, "a spare could not be handed over; discarding it");
                    self.discard(sb);
                }
            }
        }
        let sb = self.restore_sandbox(rec.tier, &spec, &dir, false).await?;
        if let Some(k) = spare_key {
            self.refill_spares(k, spec, batch);
        }
        match self.adopt(rec, &sb).await {
            Ok(()) => Ok(sb),
            Err(e) => {
                sb.destroy().await;
                Err(e)
            }
        }
    }

    /// Creates one session from `parent`'s lineage, restored from snapshot `source` (or
    /// booted cold when there is none: a template without a snapshot). The new session
    /// tags `source` as its origin first, so that it keeps it whatever happens to
    /// `source`'s other names.
    pub(super) async fn create_child(
        &self,
        parent: &Lineage,
        source: Option<&str>,
        origin: String,
        opts: &SessionOptions,
        batch: usize,
    ) -> Result<Session> {
        let mut rec = child_record(parent, origin, opts);
        // The caller's secrets replace the source session's, as its network grant does.
        let secrets = if opts.secrets.is_empty() {
            &parent.secrets
        } else {
            &opts.secrets
        };
        if !secrets.is_empty() {
            if let Ok(mut m) = self.session_secrets.lock() {
                m.insert(rec.session.id.clone(), secrets.clone());
            }
        }
        let id = rec.session.id.clone();
        let sandbox = new_sandbox_id();
        rec.op = Some(PendingOp {
            by: me(),
            snapshot: None,
            sandbox: Some(sandbox.clone()),
        });
        // The record (naming this live process) comes before the origin's tag: another
        // thaw process opening the engine meanwhile sees a session being made and leaves
        // its snapshots alone (`sweep_session_snapshots`).
        rec.has_origin = source.is_some();
        self.meta
            .with(|s| s.put(Store::sessions_tree(), &id, &rec))?;
        if let Some(src) = source {
            let snaps = self.snapshots.clone();
            let (src, dst) = (src.to_string(), origin_snapshot(&id));
            let tagged = tokio::task::spawn_blocking(move || snaps.tag(&src, &dst))
                .await
                .map_err(|e| Error::Other(format!("tag task: {e}")))
                .and_then(|r| r.map_err(Error::from));
            if let Err(e) = tagged {
                let _ = self.meta.with(|s| s.remove(Store::sessions_tree(), &id));
                return Err(e);
            }
        }
        let span = info_span!("session.create", session = %id, template = %rec.session.template);
        let r = async {
            let made = match source {
                Some(_) => {
                    self.restore_for(&rec, &origin_snapshot(&id), &sandbox, batch)
                        .await
                }
                None => self.cold_session_sandbox(&rec, &sandbox).await,
            };
            let r = match made {
                Ok(sb) => {
                    let init = sb.identity().await;
                    let sb_id = sb.id.clone();
                    match self.transition(&id, |r| {
                        r.session.state = SessionState::Running;
                        r.sandbox = Some(sb_id.clone());
                        r.init = init;
                        r.op = None;
                        Ok(())
                    }) {
                        Ok(r) => Ok(r.view()),
                        Err(e) => {
                            sb.destroy().await;
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(e),
            };
            if r.is_err() {
                let _ = self.meta.with(|s| s.remove(Store::sessions_tree(), &id));
                self.drop_snapshots_later(rec.owned_snapshots());
            } else {
                info!("session running");
            }
            r
        }
        .instrument(span)
        .await;
        // Every new session (created, forked, made by a batch) has its record. Its sandbox
        // is the one the record names (a spare handed over has an id of its own).
        let made_sandbox = r.as_ref().ok().and_then(|s| s.sandbox.clone());
        let event = AuditEvent::new(AuditAction::SessionCreate)
            .template(&rec.session.template)
            .session(&id)
            .sandbox(made_sandbox.unwrap_or(sandbox))
            .with("origin", &rec.session.origin)
            .with("checkpointable", rec.session.checkpointable);
        let event = match &r {
            Ok(_) => event,
            Err(e) => event.with("error", crate::audit::error_kind(e)),
        };
        self.audited(r, vec![event])
    }

    /// A session's sandbox booted cold (its template has no snapshot).
    async fn cold_session_sandbox(&self, rec: &SessionRecord, sandbox: &str) -> Result<Sandbox> {
        let t = self.ready_template(&rec.session.template)?;
        let opts = RunOptions {
            env: rec.session.env.clone(),
            ..RunOptions::default()
        };
        let (sb, _) = self
            .cold_start_as(&t.spec, &t.layers, t.ids()?, t.tier, &opts, sandbox)
            .await?;
        if let Err(e) = self.adopt(rec, &sb).await {
            sb.destroy().await;
            return Err(e);
        }
        Ok(sb)
    }

    /// Keeps a named snapshot of a running session (it goes on running). Refused while a
    /// call runs in it: the snapshot would hold a task half done.
    pub async fn session_checkpoint(&self, id: &str, name: &str) -> Result<Checkpoint> {
        validate_checkpoint_name(name)?;
        self.audit_ready()?;
        let lock = self.session_locks.get(id);
        let Ok(_excl) = lock.rw.try_write() else {
            return Err(Error::SessionBusy {
                id: id.to_string(),
                what: "a command or file transfer is running in it".into(),
            });
        };
        let rec = self.session_record(id)?;
        rec.must_checkpoint("checkpointed")?;
        if rec.session.state != SessionState::Running {
            return Err(conflict(&rec, "checkpoint"));
        }
        if rec.checkpoints.contains_key(name) {
            return Err(Error::CheckpointExists {
                session: id.to_string(),
                name: name.to_string(),
            });
        }
        let span = info_span!("session.checkpoint", session = %id, name);
        let r = async {
            let snap = checkpoint_snapshot(id, name);
            let sb = self.attach(rec.tier, rec.sandbox_id());
            let size = match self.snapshot_sandbox(&sb, &snap, true).await {
                Ok(s) => s,
                Err(e) => {
                    self.drop_snapshot(&snap);
                    return Err(self.lost_if_dead(id, e));
                }
            };
            let ckp = Checkpoint {
                name: name.to_string(),
                session: id.to_string(),
                created_at: now_secs(),
                raw_bytes: size.raw_bytes,
                stored_bytes: size.stored_bytes,
                checkpoint_ms: size.checkpoint_ms,
            };
            let stored = self.transition(id, |r| {
                if r.checkpoints.contains_key(name) {
                    return Err(Error::CheckpointExists {
                        session: id.to_string(),
                        name: name.to_string(),
                    });
                }
                r.checkpoints.insert(name.to_string(), ckp.clone());
                r.session.last_active_at = now_secs();
                Ok(())
            });
            if let Err(e) = stored {
                self.drop_snapshot(&snap);
                return Err(e);
            }
            info!(
                ms = size.checkpoint_ms,
                stored = size.stored_bytes,
                "checkpoint kept"
            );
            Ok(ckp)
        }
        .instrument(span)
        .await;
        let event = AuditEvent::new(AuditAction::CheckpointCreate)
            .template(&rec.session.template)
            .session(id)
            .sandbox(rec.sandbox_id())
            .with("checkpoint", name);
        let event = match &r {
            Ok(c) => event.with("stored_bytes", c.stored_bytes),
            Err(e) => event.with("error", crate::audit::error_kind(e)),
        };
        self.audited(r, vec![event])
    }

    /// Host pids holding a running session's memory (benchmarks sum their PSS).
    pub fn session_host_pids(&self, id: &str) -> Result<Vec<u32>> {
        let rec = self.session_record(id)?;
        if rec.session.state != SessionState::Running {
            return Ok(Vec::new());
        }
        Ok(self.attach(rec.tier, rec.sandbox_id()).host_pids())
    }

    /// The session's checkpoints, oldest first.
    pub fn session_checkpoints(&self, id: &str) -> Result<Vec<Checkpoint>> {
        let rec = self.session_record(id)?;
        let mut v: Vec<Checkpoint> = rec.checkpoints.into_values().collect();
        v.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        Ok(v)
    }

    fn unknown_checkpoint(rec: &SessionRecord, name: &str) -> Error {
        Error::UnknownCheckpoint {
            session: rec.session.id.clone(),
            name: name.to_string(),
            known: rec.checkpoints.keys().cloned().collect(),
        }
    }

    /// Deletes a checkpoint. Sessions forked from it keep their own tag of it.
    pub fn session_checkpoint_delete(&self, id: &str, name: &str) -> Result<Checkpoint> {
        let mut removed = None;
        self.transition(id, |r| {
            match r.checkpoints.remove(name) {
                Some(c) => removed = Some(c),
                None => return Err(Self::unknown_checkpoint(r, name)),
            }
            Ok(())
        })?;
        self.drop_snapshots_later(vec![checkpoint_snapshot(id, name)]);
        let r = removed.ok_or_else(|| Error::Other("checkpoint vanished while deleted".into()));
        let event = AuditEvent::new(AuditAction::CheckpointDelete)
            .session(id)
            .with("checkpoint", name);
        self.audited_anyway(r, vec![event])
    }

    /// Puts a session back to the snapshot it was made from, or to one of its checkpoints,
    /// keeping its id. Calls running in it are cancelled first (and counted in the
    /// answer). A paused session is restored as well (and runs afterwards), and so is a
    /// failed one whose sandbox died: how a rollout worker gets its session back.
    pub async fn session_reset(&self, id: &str, checkpoint: Option<&str>) -> Result<ResetOutcome> {
        self.audit_ready()?;
        let started = Instant::now();
        let lock = self.session_locks.get(id);
        // Checked before anything is cancelled: a reset that cannot happen kills nothing.
        let rec = self.session_record(id)?;
        let (snap, from) = match checkpoint {
            Some(name) => {
                if !rec.checkpoints.contains_key(name) {
                    return Err(Self::unknown_checkpoint(&rec, name));
                }
                (checkpoint_snapshot(id, name), format!("checkpoint {name}"))
            }
            None if rec.has_origin => (origin_snapshot(id), "origin".to_string()),
            None => {
                return Err(Error::Conflict(format!(
                    "session `{id}` was made before sessions kept their origin, so it has nothing to reset to; make a checkpoint and reset to that, or create a new session"
                )))
            }
        };
        if !matches!(
            rec.session.state,
            SessionState::Running | SessionState::Paused | SessionState::Failed
        ) {
            return Err(conflict(&rec, "reset"));
        }
        let cancelled = lock.cancel_calls();
        let Ok(_excl) = tokio::time::timeout(Duration::from_secs(30), lock.rw.write()).await else {
            return Err(Error::SessionBusy {
                id: id.to_string(),
                what: "a call did not end within 30 s of being cancelled".into(),
            });
        };
        // No durable "-ing" state: until the record names it, the new sandbox is this
        // process's (the crash sweep removes it if we die), and once adopted it is the
        // session's but not the record's (recovery removes it). Either way a crash leaves
        // the session as it was. The record is read again (under the lock) for the lineage.
        let before = self.session_record(id)?;
        let sandbox = new_sandbox_id();
        let span = info_span!("session.reset", session = %id, from = %from);
        let r = async {
            let sb = match self.restore_for(&before, &snap, &sandbox, 1).await {
                Ok(sb) => sb,
                Err(e) => {
                    let msg = e.to_string();
                    let _ = self.transition(id, |r| {
                        r.session.error = Some(format!("reset failed, nothing changed: {msg}"));
                        Ok(())
                    });
                    return Err(e);
                }
            };
            let init = sb.identity().await;
            let new_id = sb.id.clone();
            let after = self.transition(id, |r| {
                if !matches!(
                    r.session.state,
                    SessionState::Running | SessionState::Paused | SessionState::Failed
                ) || r.sandbox_id() != before.sandbox_id()
                {
                    return Err(conflict(r, "reset"));
                }
                r.session.state = SessionState::Running;
                r.session.snapshot = None;
                r.session.resets += 1;
                r.session.last_active_at = now_secs();
                r.session.error = None;
                r.sandbox = Some(new_id.clone());
                r.init = init;
                r.op = None;
                Ok(())
            });
            let after = match after {
                Ok(a) => a,
                Err(e) => {
                    sb.destroy().await;
                    return Err(e);
                }
            };
            // The old state goes off the caller's clock: its sandbox, or its pause snapshot.
            match before.session.state {
                SessionState::Paused => {
                    self.drop_snapshots_later(before.session.snapshot.iter().cloned().collect())
                }
                // Running, or failed (whatever of its sandbox is left).
                _ => self.discard(self.attach(before.tier, before.sandbox_id())),
            }
            let reset_ms = ms(started.elapsed());
            info!(ms = reset_ms, cancelled, "session reset");
            Ok(ResetOutcome {
                session: after.view(),
                from,
                cancelled_calls: cancelled as u32,
                reset_ms,
            })
        }
        .instrument(span)
        .await;
        let made_sandbox = r.as_ref().ok().and_then(|o| o.session.sandbox.clone());
        let event = AuditEvent::new(AuditAction::SessionReset)
            .template(&before.session.template)
            .session(id)
            .sandbox(made_sandbox.unwrap_or(sandbox))
            .with("previous_sandbox", before.sandbox_id())
            .with("checkpoint", checkpoint);
        let event = match &r {
            Ok(o) => event.with("cancelled_calls", o.cancelled_calls),
            Err(e) => event.with("error", crate::audit::error_kind(e)),
        };
        self.audited(r, vec![event])
    }

    /// Makes `n` sessions from `source`, restoring several at once, and hands each to
    /// `on_ready` as soon as it runs (or failed). Returns when all are done. The caller
    /// checks its limits before: nothing here refuses a large `n`.
    pub async fn session_batch(
        &self,
        source: &BatchSource,
        n: usize,
        opts: &SessionOptions,
        mut on_ready: impl FnMut(BatchItem),
    ) -> Result<()> {
        self.audit_ready()?;
        let (parent, snap, origin, fork_point) = self.batch_parent(source).await?;
        let _running = self.batch_running();
        let span = info_span!("session.batch", n, origin = %origin);
        let made = async {
            let mut ready = futures_util::stream::iter(0..n)
                .map(|index| {
                    let (parent, snap, origin) = (&parent, snap.as_deref(), origin.clone());
                    async move {
                        BatchItem {
                            index,
                            result: self.create_child(parent, snap, origin, opts, n).await,
                        }
                    }
                })
                .buffer_unordered(restore_concurrency());
            while let Some(item) = ready.next().await {
                on_ready(item);
            }
        };
        made.instrument(span).await;
        // Each new session holds its own tag of the fork point.
        self.drop_snapshots_later(fork_point.into_iter().collect());
        Ok(())
    }

    /// Forks a session into `n` new ones: from its checkpoint `checkpoint`, or from a
    /// fork point taken now (the session goes on running). Returns every new session and
    /// every failure, in the order they were ready.
    pub async fn session_fork(
        &self,
        id: &str,
        n: usize,
        checkpoint: Option<&str>,
        opts: &SessionOptions,
    ) -> Result<Vec<BatchItem>> {
        let mut items = Vec::with_capacity(n);
        let source = BatchSource::Session {
            id: id.to_string(),
            checkpoint: checkpoint.map(str::to_string),
        };
        let r = self
            .session_batch(&source, n, opts, |item| items.push(item))
            .await;
        let made: Vec<&str> = items
            .iter()
            .filter_map(|i| i.result.as_ref().ok().map(|s| s.id.as_str()))
            .collect();
        let event = AuditEvent::new(AuditAction::SessionFork)
            .session(id)
            .with("n", n)
            .with("checkpoint", checkpoint)
            .with("created", &made);
        let event = match &r {
            Ok(()) => event,
            Err(e) => event.with("error", crate::audit::error_kind(e)),
        };
        self.audited(r, vec![event])?;
        Ok(items)
    }

    /// The lineage, snapshot and origin of a batch's sessions, and a fork point made for
    /// it (dropped once the batch's sessions hold their own tags).
    async fn batch_parent(
        &self,
        source: &BatchSource,
    ) -> Result<(Lineage, Option<String>, String, Option<String>)> {
        match source {
            BatchSource::Template(name) => {
                let t = self.ready_template(name)?;
                let parent = Lineage::of_template(&t, self.owner())?;
                Ok((
                    parent,
                    t.snapshot.clone(),
                    format!("template {}", t.name),
                    None,
                ))
            }
            BatchSource::Session {
                id,
                checkpoint: Some(name),
            } => {
                let rec = self.session_record(id)?;
                if !rec.checkpoints.contains_key(name) {
                    return Err(Self::unknown_checkpoint(&rec, name));
                }
                let snap = checkpoint_snapshot(id, name);
                let origin = format!("checkpoint {id}/{name}");
                Ok((self.lineage_of(&rec), Some(snap), origin, None))
            }
            BatchSource::Session {
                id,
                checkpoint: None,
            } => {
                let rec = self.session_record(id)?;
                match rec.session.state {
                    SessionState::Paused => {
                        let snap = rec.session.snapshot.clone().ok_or_else(|| {
                            Error::Other(format!("session `{id}` is paused without a snapshot"))
                        })?;
                        let origin = format!("session {id} (paused)");
                        Ok((self.lineage_of(&rec), Some(snap), origin, None))
                    }
                    SessionState::Running => {
                        let point = self.fork_point(&rec).await?;
                        let origin = format!("fork of session {id}");
                        Ok((
                            self.lineage_of(&rec),
                            Some(point.clone()),
                            origin,
                            Some(point),
                        ))
                    }
                    _ => Err(conflict(&rec, "fork")),
                }
            }
        }
    }

    /// Checkpoints a running session into a snapshot of its own for a fork; the session
    /// goes on running.
    async fn fork_point(&self, rec: &SessionRecord) -> Result<String> {
        rec.must_checkpoint(
            "forked from its state now (fork from one of its checkpoints instead)",
        )?;
        let id = &rec.session.id;
        let lock = self.session_locks.get(id);
        let Ok(_excl) = lock.rw.try_write() else {
            return Err(Error::SessionBusy {
                id: id.to_string(),
                what: "a command or file transfer is running in it".into(),
            });
        };
        let snap = format!(
            "{}-fork-{}",
            snapshot_prefix(id),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let sb = self.attach(rec.tier, rec.sandbox_id());
        match self
            .snapshot_sandbox(&sb, &snap, true)
            .instrument(info_span!("session.fork_point", session = %id))
            .await
        {
            Ok(_) => {
                self.touch(id);
                Ok(snap)
            }
            Err(e) => {
                self.drop_snapshot(&snap);
                Err(self.lost_if_dead(id, e))
            }
        }
    }

    /// Runs the template's reward command in a running session and reads the reward from
    /// its output.
    pub async fn session_reward(&self, id: &str, opts: RunOptions) -> Result<Reward> {
        let rec = self.session_record(id)?;
        let Some(spec) = rec.spec.reward.clone() else {
            return Err(Error::NoRewardCommand {
                template: rec.session.template.clone(),
            });
        };
        let command = spec.command.join(" ");
        let opts = RunOptions {
            timeout: Some(opts.timeout.unwrap_or(Duration::from_secs(spec.timeout_s))),
            ..opts
        };
        let mut stdout = Vec::new();
        let started = Instant::now();
        let result = self
            .session_exec(id, spec.command.clone(), None, opts, |s, d| {
                if s == thaw_protocol::Stream::Stdout && stdout.len() < REWARD_OUTPUT {
                    let room = REWARD_OUTPUT - stdout.len();
                    stdout.extend_from_slice(&d[..d.len().min(room)]);
                }
            })
            .await?;
        let output = tail_text(&stdout, REWARD_OUTPUT);
        let short = tail_text(&stdout, 400);
        if !result.outcome.success() {
            let why = match result.outcome {
                Outcome::Exited { code } => format!("exited with status {code}"),
                Outcome::Timeout => "timed out".to_string(),
                Outcome::Oom => "ran out of memory".to_string(),
                other => format!("ended with {other:?}"),
            };
            return Err(Error::RewardNotANumber {
                command,
                why,
                output: short,
            });
        }
        let reward = parse_reward(&output).map_err(|why| Error::RewardNotANumber {
            command,
            why,
            output: short,
        })?;
        let r = Reward {
            reward,
            exit_code: result.exit_code,
            output,
            run_ms: ms(started.elapsed()),
        };
        // The command itself has its `exec` record; this one says what it scored.
        let event = AuditEvent::new(AuditAction::Reward)
            .template(&rec.session.template)
            .session(id)
            .with("reward", r.reward);
        self.audited(Ok(r), vec![event])
    }

    /// Removes snapshots of sessions that no longer exist (a crash between storing a
    /// checkpoint or origin and recording it). Runs at engine open with recovery.
    pub(super) fn sweep_session_snapshots(&self) -> Result<()> {
        let names = self.snapshots.names()?;
        let all: Vec<SessionRecord> = self.meta.read(|s| s.list(Store::sessions_tree()))?;
        let live: std::collections::HashSet<String> =
            all.iter().map(|r| snapshot_prefix(&r.session.id)).collect();
        let busy = all
            .iter()
            .any(|r| r.op.as_ref().is_some_and(|o| alive(&o.by)));
        let stray: Vec<String> = names
            .into_iter()
            .filter(|n| n.starts_with("ses-") && n.len() > 20)
            // `ses-` and 16 hex digits: the session's id.
            .filter(|n| !live.contains(&n[..20]))
            .collect();
        // A session being created by a live process may have tagged its origin before
        // its record is listed here: leave strays for a quieter moment.
        if !busy && !stray.is_empty() {
            info!(
                count = stray.len(),
                "removing snapshots of sessions that are gone"
            );
            self.drop_snapshots_later(stray);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reward_is_the_last_non_empty_line_as_a_finite_number() {
        assert_eq!(parse_reward("1.5\n"), Ok(1.5));
        assert_eq!(parse_reward("thinking...\n-0.25\n\n  \n"), Ok(-0.25));
        assert_eq!(parse_reward("  7  "), Ok(7.0));
        let e = parse_reward("").unwrap_err();
        assert!(e.contains("printed nothing"), "{e}");
        let e = parse_reward("0.5\nall done\n").unwrap_err();
        assert!(e.contains("\"all done\""), "{e}");
        let e = parse_reward("NaN\n").unwrap_err();
        assert!(e.contains("not a finite number"), "{e}");
        assert!(parse_reward("inf").is_err());
    }

    #[test]
    fn checkpoint_names_fit_a_snapshot_name_and_nothing_else() {
        for ok in ["mid", "step-3", "a.b_c", "9"] {
            validate_checkpoint_name(ok).unwrap();
            thaw_snapshotter::validate_name(&checkpoint_snapshot("ses-0123456789abcdef", ok))
                .unwrap();
        }
        let long = "x".repeat(64);
        thaw_snapshotter::validate_name(&checkpoint_snapshot("ses-0123456789abcdef", &long))
            .unwrap();
        for bad in ["", "-x", ".x", "a/b", "../x", "a b", &"x".repeat(65), "é"] {
            assert!(validate_checkpoint_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_snapshots_share_the_sessions_prefix() {
        let id = "ses-0123456789abcdef";
        assert_eq!(snapshot_prefix(id).len(), 20);
        assert!(origin_snapshot(id).starts_with(&snapshot_prefix(id)));
        assert!(checkpoint_snapshot(id, "x").starts_with(&snapshot_prefix(id)));
    }
}
