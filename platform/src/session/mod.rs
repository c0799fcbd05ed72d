//! Sessions: a restored clone that stays alive across many calls, can be paused into a
//! snapshot (freeing its memory and processes) and resumed later, even after thaw or the
//! machine restarted. The state machine and its crash guarantees are in `SESSIONS.md`.
//!
//! Every state change is a read-modify-write of the session's sled record under
//! [`Meta::with`](crate::store::Meta::with), which excludes every other thaw thread and
//! process, so exactly one of two racing transitions wins and the other gets a conflict.
//! A transition that needs slow work (pausing, resuming, creating) is split in two: a
//! durable "-ing" state naming the process doing it, the work, then the final state. A
//! process that dies in between leaves the "-ing" state and its name behind; the next
//! thaw process to open the engine finishes or rolls back the transition
//! ([`Engine::recover_sessions`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thaw_protocol::{
    Bytes, ExecRequest, InvokeRequest, InvokeStatus, Outcome, Request, Response, Stream,
};
use tokio::sync::RwLock;
use tracing::{info, info_span, warn, Instrument};

use crate::audit::{call_events, capped_argv, file_detail, AuditAction, AuditEvent, CallOutcome};
use crate::cleanup;
use crate::container::userns::IdMap;
use crate::engine::{ms, now_secs, Engine, ExecResult, Invocation, RunOptions, StartKind, Timings};
use crate::error::{Error, Result};
use crate::sandbox::Sandbox;
use crate::store::Store;
use crate::template::spec::TemplateSpec;
use crate::tier::Tier;

mod kill;
mod rollout;
mod spares;
pub use rollout::{BatchItem, BatchSource, Checkpoint, ResetOutcome, Reward};
pub use spares::Spares;

/// Largest file `session_read_file` returns (a frame carries it base64-encoded).
pub const MAX_FILE: u64 = 32 << 20;

// SessionState, TimeoutAction and Session are in thaw-types (types/src/session.rs): API
// clients share them without compiling the engine.
pub use thaw_types::session::{Session, SessionState, TimeoutAction};

#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub on_timeout: TimeoutAction,
    pub env: BTreeMap<String, String>,
    /// Whether the session can be paused, checkpointed and forked. A session that cannot
    /// (an RL rollout that is only ever reset) shares its memory copy-on-write with its
    /// snapshot: it restores faster and costs a fraction of the memory. Such a session's
    /// timeouts stop it.
    pub checkpointable: bool,
    /// Egress granted to the session on top of its template's `[network]`.
    pub network: thaw_types::spec::NetworkGrant,
    /// Credentials for the session's sandboxes (kept in this process's memory only).
    pub secrets: Vec<thaw_types::spec::SecretGrant>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            idle_timeout: Duration::from_secs(10 * 60),
            max_lifetime: Duration::from_secs(24 * 3600),
            on_timeout: TimeoutAction::Pause,
            env: BTreeMap::new(),
            checkpointable: true,
            network: Default::default(),
            secrets: Vec::new(),
        }
    }
}

/// A call's egress on a session: its grants, withdrawn when dropped, and the environment
/// its secrets' placeholders add to the call's.
struct CallEgress {
    _grant: Option<thaw_gateway::CallGrant>,
    _secrets: Option<thaw_gateway::SecretGrant>,
    env: BTreeMap<String, String>,
}

impl CallEgress {
    fn env(&self, call: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut env = call.clone();
        env.extend(self.env.clone());
        env
    }
}

/// What is stored: the session plus what thaw needs to restore it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    session: Session,
    /// The template as it was when the session was created: a later redeploy does not
    /// change the rootfs under a paused session.
    spec: TemplateSpec,
    layers: Vec<PathBuf>,
    /// The template's tier (records from before the microvm tier are container sessions).
    #[serde(default)]
    tier: Tier,
    /// `<pid> <starttime>` of the sandbox's init (container) or VMM (microvm) while
    /// running: a cheap liveness check.
    #[serde(default)]
    init: Option<String>,
    /// The process doing a transition (an "-ing" state), and the snapshot a pause writes.
    #[serde(default)]
    op: Option<PendingOp>,
    /// The template's uid range when the session was made (it keeps it across redeploys
    /// and deletion of its template). Records from before user namespaces have none and
    /// are not resumed.
    #[serde(default)]
    ids: Option<IdMap>,
    /// The sandbox that runs the session now: every restore (create, resume, reset) makes
    /// a new one, so a reset can restore its successor before the old one goes. Records
    /// from before resets have none: their sandbox is named after the session.
    #[serde(default)]
    sandbox: Option<String>,
    /// Whether the session holds a tag of the snapshot it was made from
    /// ([`rollout::origin_snapshot`]): what a reset goes back to. Sessions from before
    /// resets have none and cannot be reset to their origin.
    #[serde(default)]
    has_origin: bool,
    /// Named checkpoints; each is a snapshot [`rollout::checkpoint_snapshot`] names.
    #[serde(default)]
    checkpoints: BTreeMap<String, Checkpoint>,
    /// Set when `thaw kill` ended the session ([`kill`]): the record is final, every
    /// transition refuses, so nothing brings the session back but a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    killed: Option<kill::KilledMark>,
}

impl SessionRecord {
    /// The id of the sandbox that runs (or last ran) the session.
    fn sandbox_id(&self) -> &str {
        self.sandbox.as_deref().unwrap_or(&self.session.id)
    }

    /// Every snapshot the session owns: its pause snapshot, one a pause in flight is
    /// writing, its origin tag and its checkpoints.
    fn owned_snapshots(&self) -> Vec<String> {
        let id = &self.session.id;
        let mut v: Vec<String> = self.session.snapshot.iter().cloned().collect();
        v.extend(self.op.as_ref().and_then(|o| o.snapshot.clone()));
        if self.has_origin {
            v.push(rollout::origin_snapshot(id));
        }
        v.extend(
            self.checkpoints
                .keys()
                .map(|n| rollout::checkpoint_snapshot(id, n)),
        );
        v
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingOp {
    by: String,
    #[serde(default)]
    snapshot: Option<String>,
    /// The sandbox being made (create, resume, reset): recovery destroys it if the
    /// process dies before the record names it.
    #[serde(default)]
    sandbox: Option<String>,
}

/// In-process exclusion between a session's calls: execs and file operations share it,
/// pause, resume and delete take it alone. Across processes, the sled state machine
/// decides (a pause from another process during an exec fails cleanly and rolls back).
#[derive(Default)]
pub struct SessionLocks {
    map: Mutex<HashMap<String, Arc<SessionLock>>>,
}

/// One session's in-process lock, and the calls in it that a reset may cancel.
#[derive(Default)]
struct SessionLock {
    rw: RwLock<()>,
    /// Cancelled (and replaced) by a reset; every call in the session watches it.
    calls: Mutex<tokio_util::sync::CancellationToken>,
    /// Calls running now.
    active: std::sync::atomic::AtomicUsize,
    /// Unix seconds of the last call's start or end, in this process (the record is
    /// written at most every [`ACTIVITY_WRITE_S`]).
    active_at: std::sync::atomic::AtomicU64,
}

/// The longest a session's recorded activity lags its last call. Idle timeouts are minutes;
/// another thaw process (the CLI enforcing timeouts) sees activity this late at worst.
const ACTIVITY_WRITE_S: u64 = 5;

impl SessionLock {
    /// The token the next call watches.
    fn call_token(&self) -> tokio_util::sync::CancellationToken {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Cancels every call running in the session; returns how many there were.
    fn cancel_calls(&self) -> usize {
        let old = std::mem::take(&mut *self.calls.lock().unwrap_or_else(|p| p.into_inner()));
        let n = self.active.load(std::sync::atomic::Ordering::SeqCst);
        old.cancel();
        n
    }
}

/// Counts a call as active while it lives.
struct ActiveCall<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> ActiveCall<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> ActiveCall<'a> {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ActiveCall(n)
    }
}

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl SessionLocks {
    fn get(&self, id: &str) -> Arc<SessionLock> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string()).or_default().clone()
    }

    fn forget(&self, id: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(id);
    }
}

fn me() -> String {
    cleanup::my_identity()
}

/// Whether the process named by an identity record runs (a zombie does not: a killed
/// sandbox init lingers as one until its parent reaps it).
fn alive(identity: &str) -> bool {
    if !cleanup::identity_alive(identity) {
        return false;
    }
    cleanup::identity_pid(identity).is_some_and(thaw_microvm::util::process_running)
}

fn new_session_id() -> String {
    format!("ses-{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// Why `action` cannot be done to a session in its state. A killed session says so (410)
/// whatever state the kill left it in: its caller must not retry.
fn conflict(r: &SessionRecord, action: &str) -> Error {
    if r.killed.is_some() {
        return kill::refused(r);
    }
    let s = &r.session;
    let hint = match s.state {
        SessionState::Paused => format!("; resume it first: `thaw session resume {}`", s.id),
        SessionState::Running if action == "resume" => "; it is already running".to_string(),
        SessionState::Pausing | SessionState::Resuming | SessionState::Creating => {
            "; another call is changing it, retry in a moment".to_string()
        }
        SessionState::Stopped | SessionState::Failed => {
            let rm = format!("`thaw session rm {}`", s.id);
            match s.error.as_deref() {
                // The error may already say how to remove it.
                Some(e) if e.contains(&rm) => format!(" ({e})"),
                Some(e) => format!(" ({e}); remove it with {rm}"),
                None => format!("; remove it with {rm}"),
            }
        }
        _ => String::new(),
    };
    Error::SessionConflict {
        id: s.id.clone(),
        state: s.state.as_str().to_string(),
        action: action.to_string(),
        hint,
    }
}

impl Engine {
    fn session_record(&self, id: &str) -> Result<SessionRecord> {
        let rec = self
            .meta
            .read(|s| s.get::<SessionRecord>(Store::sessions_tree(), id))?;
        match rec {
            // Another owner's session does not exist, as far as this owner can tell.
            Some(r) if r.session.owner == self.owner() => Ok(r),
            _ => Err(Error::UnknownSession { id: id.to_string() }),
        }
    }

    /// Applies `f` to the stored record atomically (see the module docs). `f` sees the
    /// current record and may refuse with an error; the returned record is what was stored.
    fn transition(
        &self,
        id: &str,
        f: impl FnOnce(&mut SessionRecord) -> Result<()>,
    ) -> Result<SessionRecord> {
        let owner = self.owner().to_string();
        let stored = self.meta.with(|s| {
            s.update::<SessionRecord>(Store::sessions_tree(), id, |cur| match cur {
                // A killed session stays as the kill left it (a pause, resume or create
                // that was in flight fails here and cleans up after itself).
                Some(r) if r.session.owner == owner && r.killed.is_some() => Err(kill::refused(&r)),
                Some(mut r) if r.session.owner == owner => {
                    f(&mut r)?;
                    Ok(Some(r))
                }
                _ => Err(Error::UnknownSession { id: id.to_string() }),
            })
        })?;
        stored.ok_or_else(|| Error::UnknownSession { id: id.to_string() })
    }

    pub fn session(&self, id: &str) -> Result<Session> {
        Ok(self.session_record(id)?.view())
    }

    /// The limits of a call into a running session: its template's as the session was
    /// created (a later redeploy does not change them). Refuses a session that is not
    /// running, as the call itself would, so a caller can check before it answers.
    pub fn session_call_limits(
        &self,
        id: &str,
        action: &str,
    ) -> Result<crate::template::spec::Limits> {
        let r = self.session_record(id)?;
        if r.session.state != SessionState::Running {
            return Err(conflict(&r, action));
        }
        Ok(r.spec.limits)
    }

    /// This owner's sessions.
    pub fn sessions(&self) -> Result<Vec<Session>> {
        let all: Vec<SessionRecord> = self.meta.read(|s| s.list(Store::sessions_tree()))?;
        Ok(all
            .into_iter()
            .map(|r| r.view())
            .filter(|s| s.owner == self.owner())
            .collect())
    }

    /// Every owner's sessions (for server housekeeping and metrics, not for callers).
    pub fn all_sessions(&self) -> Result<Vec<Session>> {
        let all: Vec<SessionRecord> = self.meta.read(|s| s.list(Store::sessions_tree()))?;
        Ok(all.into_iter().map(|r| r.view()).collect())
    }

    /// Sessions of this owner that hold a live sandbox (per-key limits count them).
    pub fn count_running_sessions(&self) -> Result<usize> {
        Ok(self
            .sessions()?
            .iter()
            .filter(|s| s.state.holds_sandbox())
            .count())
    }

    /// Starts a session: a clone of the template's snapshot that stays alive.
    pub async fn session_create(&self, template: &str, opts: SessionOptions) -> Result<Session> {
        self.audit_ready()?;
        let t = self.ready_template(template)?;
        let lineage = rollout::Lineage::of_template(&t, self.owner())?;
        let origin = format!("template {}", t.name);
        self.create_child(&lineage, t.snapshot.as_deref(), origin, &opts, 1)
            .await
    }

    /// Checks that the session can take a call and marks it active: in this process's
    /// memory at once, in its record when that is [`ACTIVITY_WRITE_S`] behind. A rollout
    /// makes a call every few milliseconds, and a flushed write for each was most of
    /// thaw's own time on its path.
    fn touch_running(&self, id: &str, action: &str) -> Result<SessionRecord> {
        let rec = self.session_record(id)?;
        if rec.session.state != SessionState::Running {
            return Err(conflict(&rec, action));
        }
        let now = now_secs();
        self.session_locks
            .get(id)
            .active_at
            .store(now, Ordering::SeqCst);
        if now.saturating_sub(rec.session.last_active_at) < ACTIVITY_WRITE_S {
            return Ok(rec);
        }
        self.transition(id, |r| {
            if r.session.state != SessionState::Running {
                return Err(conflict(r, action));
            }
            r.session.last_active_at = now;
            Ok(())
        })
    }

    /// Marks a session active (as [`Engine::touch_running`] does, in any state).
    fn touch(&self, id: &str) {
        let recorded = self.session_record(id).map(|r| r.session.last_active_at);
        self.touch_since(id, recorded.unwrap_or(u64::MAX));
    }

    /// [`Engine::touch`] for a caller that knows the recorded activity already (a call
    /// into the session read its record when it started): no second read.
    fn touch_since(&self, id: &str, recorded: u64) {
        let now = now_secs();
        self.session_locks
            .get(id)
            .active_at
            .store(now, Ordering::SeqCst);
        if recorded != u64::MAX && now.saturating_sub(recorded) >= ACTIVITY_WRITE_S {
            let _ = self.transition(id, |r| {
                r.session.last_active_at = now;
                Ok(())
            });
        }
    }

    /// When the session was last active: its record, or this process's memory if later.
    fn last_active(&self, s: &Session) -> u64 {
        let seen = self
            .session_locks
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&s.id)
            .map_or(0, |l| l.active_at.load(Ordering::SeqCst));
        s.last_active_at.max(seen)
    }

    /// One call into a running session: it shares the session's lock with other calls
    /// (a pause refuses while any runs), checks that the session runs, marks it active
    /// before and after, and fails the session if its sandbox turns out to be dead.
    ///
    /// `record` describes the call for the audit log, from its result (a call refused
    /// before it reached the sandbox is not recorded). No call starts while the audit log
    /// cannot be written.
    async fn in_running<T>(
        &self,
        id: &str,
        action: &str,
        work: impl AsyncFnOnce(&SessionRecord, &Sandbox) -> Result<T>,
        record: impl FnOnce(&Result<T>, AuditEvent, &str) -> Vec<AuditEvent>,
    ) -> Result<T> {
        self.audit_ready()?;
        let lock = self.session_locks.get(id);
        let _shared = lock.rw.read().await;
        let _active = ActiveCall::new(&lock.active);
        let cancel = lock.call_token();
        let rec = self.touch_running(id, action)?;
        let sb = self.attach(rec.tier, rec.sandbox_id());
        // A reset cancels the call: dropping its exchange with guest-init ends the task.
        let r = tokio::select! {
            biased;
            // A reset, or `thaw kill` (which marks the record first).
            _ = cancel.cancelled() => Err(self.killed_error(id).unwrap_or(Error::ResetCancelled { id: id.to_string() })),
            r = work(&rec, &sb).instrument(info_span!("session.call", session = %id, action)) => r,
        }
        .map_err(|e| sb.explain(e));
        self.touch_since(id, rec.session.last_active_at);
        let sandbox = sb.id.clone();
        let r = match r {
            Err(e @ (Error::HostTimeout { .. } | Error::OutputFlood { .. })) => {
                Err(self.contain(id, sb, e).await)
            }
            r => r.map_err(|e| self.lost_if_dead(id, e)),
        };
        let base = AuditEvent::new(AuditAction::Exec)
            .template(&rec.session.template)
            .session(id);
        let events = record(&r, base, &sandbox);
        self.audited(r, events)
    }

    /// A call into the session broke the host's limits, so its guest-init did not enforce
    /// them and its task may still run: the host kills every process of the sandbox but
    /// guest-init (the session keeps its files; a persistent handler is killed too, as any
    /// task is). Where that is impossible (a microvm, or processes that survive SIGKILL) the
    /// sandbox is destroyed and the session failed, with the reason.
    async fn contain(&self, id: &str, sb: Sandbox, e: Error) -> Error {
        match sb.kill_tasks().await {
            Ok(killed) => {
                warn!(session = %id, killed, error = %e,
                    "the host killed the session's tasks; the session keeps running");
                // The call's own records (in_running) say which limit; this one how many.
                let _ = self.audit(
                    AuditEvent::kill(&sb.id, crate::audit::error_kind(&e), Some(killed as u64))
                        .session(id),
                );
                e
            }
            Err(kill) => {
                let why = format!(
                    "{e}; its tasks could not be killed alone ({kill}), so its sandbox was destroyed and the state since the last pause is lost"
                );
                warn!(session = %id, %why, "destroying the session's sandbox");
                let kind = crate::audit::error_kind(&e);
                let _ = self.audit(AuditEvent::limit_hit(&sb.id, kind).session(id));
                let _ = self.audit(
                    AuditEvent::kill(&sb.id, kind, None)
                        .session(id)
                        .with("sandbox_destroyed", true),
                );
                sb.destroy().await;
                let _ = self.transition(id, |r| {
                    r.session.state = SessionState::Failed;
                    r.session.error = Some(why.clone());
                    Ok(())
                });
                Error::SessionConflict {
                    id: id.to_string(),
                    state: "failed".into(),
                    action: "continue".into(),
                    hint: format!(": {why}; remove it with `thaw session rm {id}`"),
                }
            }
        }
    }

    /// Runs a command in a running session, streaming its output. State carries over
    /// between calls: files, and anything a long-lived process in the session keeps.
    pub async fn session_exec(
        &self,
        id: &str,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        opts: RunOptions,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecResult> {
        let _task = self.live.session_task(
            id,
            crate::live::RunningTask {
                kind: "exec".into(),
                argv: argv.clone(),
                since_ms: crate::live::now_ms(),
            },
        );
        let detail = serde_json::json!({
            "argv": capped_argv(&argv),
            "stdin_bytes": stdin.as_ref().map(Vec::len),
        });
        self.in_running(
            id,
            "exec",
            async |rec: &SessionRecord, sb: &Sandbox| {
                let started = Instant::now();
                let grant = self.call_grant(rec, sb, &opts).await?;
                let req = ExecRequest {
                    argv,
                    env: grant.env(&opts.env),
                    cwd: None,
                    stdin: stdin.map(Bytes),
                    limits: Engine::limits(&rec.spec, &opts),
                };
                let mut d = opts.cancellable(sb.agent.exec(req, on_output)).await?;
                if matches!(d.outcome, Outcome::Signaled { signal: 9 }) && sb.oom_killed() {
                    d.outcome = Outcome::Oom;
                }
                Ok(ExecResult {
                    template: rec.session.template.clone(),
                    sandbox_id: id.to_string(),
                    start: StartKind::Session,
                    exit_code: d.outcome.exit_code(),
                    outcome: d.outcome,
                    truncated: d.truncated,
                    timings: call_timings(started),
                })
            },
            |r: &Result<ExecResult>, base: AuditEvent, sandbox: &str| {
                call_events(base.detail(detail), sandbox, r, |x: &ExecResult| {
                    CallOutcome {
                        outcome: Some(x.outcome),
                        exit_code: Some(x.exit_code),
                        status: None,
                        truncated: x.truncated,
                    }
                })
            },
        )
        .await
    }

    /// Runs the template's handler on a payload inside a running session. A persistent
    /// handler keeps its memory between calls (and across pause and resume).
    pub async fn session_invoke(
        &self,
        id: &str,
        payload: serde_json::Value,
        opts: RunOptions,
        on_stderr: impl FnMut(&[u8]),
    ) -> Result<Invocation> {
        self.in_running(
            id,
            "invoke",
            async |rec: &SessionRecord, sb: &Sandbox| {
                let _task = self.live.session_task(
                    id,
                    crate::live::RunningTask {
                        kind: "invoke".into(),
                        argv: rec.spec.handler.command.clone(),
                        since_ms: crate::live::now_ms(),
                    },
                );
                let started = Instant::now();
                let grant = self.call_grant(rec, sb, &opts).await?;
                let req = InvokeRequest {
                    payload,
                    env: grant.env(&opts.env),
                    limits: Engine::limits(&rec.spec, &opts),
                };
                let mut done = opts.cancellable(sb.agent.invoke(req, on_stderr)).await?;
                if sb.oom_killed() && done.status != InvokeStatus::Ok {
                    done.status = InvokeStatus::Oom;
                    done.outcome = Some(Outcome::Oom);
                }
                Ok(Invocation {
                    template: rec.session.template.clone(),
                    sandbox_id: id.to_string(),
                    start: StartKind::Session,
                    done,
                    timings: call_timings(started),
                })
            },
            |r: &Result<Invocation>, base: AuditEvent, sandbox: &str| {
                let base = AuditEvent {
                    action: AuditAction::Invoke,
                    ..base
                };
                call_events(base, sandbox, r, |x: &Invocation| CallOutcome {
                    outcome: x.done.outcome,
                    exit_code: None,
                    status: Some(x.done.status),
                    truncated: x.done.truncated,
                })
            },
        )
        .await
    }

    /// Makes sure a running session's sandbox is wired when it has a grant (a `thaw serve`
    /// restarted since the session started, or another process started it, holds no
    /// wiring for it yet), and widens it by the call's grant for as long as the returned
    /// guard lives.
    async fn call_grant(
        &self,
        rec: &SessionRecord,
        sb: &Sandbox,
        opts: &RunOptions,
    ) -> Result<CallEgress> {
        let base = self.egress_policy(&rec.spec, &rec.session.network)?;
        let call = crate::egress::grant_policy(&opts.network)?;
        let secrets = crate::egress::secrets_of(&opts.secrets, &base.union(&call))?;
        if self.gateway.get(&sb.id).is_none() && !(base.is_closed() && call.is_closed()) {
            let limits = crate::egress::limits_of(&rec.spec.network);
            crate::egress::wire(&self.gateway, self.owner(), sb, base.clone(), limits).await?;
            // A sandbox wired afresh here (a restarted server) gets back the session's
            // secrets this process knows.
            let session_secrets = self.secrets_of_session(&rec.session.id);
            if !session_secrets.is_empty() {
                let own = crate::egress::secrets_of(&session_secrets, &base)?;
                crate::egress::grant_secrets(&self.gateway, sb, own, true).await?;
            }
        }
        let grant = if opts.network.is_empty() {
            None
        } else {
            self.gateway.grant(&sb.id, call)
        };
        let env = crate::egress::secret_env(&secrets);
        let secret_grant = if secrets.is_empty() {
            None
        } else {
            crate::egress::grant_secrets(&self.gateway, sb, secrets, false).await?
        };
        Ok(CallEgress {
            _grant: grant,
            _secrets: secret_grant,
            env,
        })
    }

    /// When a call to a running session fails because its sandbox is gone, the session
    /// is failed (its state since the last pause is lost) and the error says so.
    fn lost_if_dead(&self, id: &str, e: Error) -> Error {
        let Ok(rec) = self.session_record(id) else {
            return e;
        };
        // Killed by `thaw kill` (from another process, whose cancel this call never saw).
        if rec.killed.is_some() {
            return kill::refused(&rec);
        }
        if rec.session.state == SessionState::Running
            && !rec.init.as_deref().map(alive).unwrap_or(false)
        {
            let why = "its sandbox died (killed from outside or out of memory); the state since the last pause is lost".to_string();
            let _ = self.transition(id, |r| {
                r.session.state = SessionState::Failed;
                r.session.error = Some(why.clone());
                Ok(())
            });
            return Error::SessionLost {
                id: id.to_string(),
                why,
            };
        }
        e
    }

    pub async fn session_write_file(
        &self,
        id: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<()> {
        // Its path, size and hash; never its bytes.
        let detail = file_detail(path, &data, mode);
        let req = Request::WriteFile {
            path: path.to_string(),
            data: Bytes(data),
            mode,
            append: false,
        };
        self.in_running(
            id,
            "write files",
            async |_: &SessionRecord, sb: &Sandbox| sb.agent.call(&req).await,
            |r: &Result<Response>, base: AuditEvent, sandbox: &str| {
                vec![with_error(
                    AuditEvent {
                        action: AuditAction::FilePut,
                        ..base
                    }
                    .sandbox(sandbox)
                    .detail(detail),
                    r,
                )]
            },
        )
        .await?;
        Ok(())
    }

    pub async fn session_read_file(&self, id: &str, path: &str) -> Result<Vec<u8>> {
        let req = Request::ReadFile {
            path: path.to_string(),
            max_bytes: Some(MAX_FILE + 1),
        };
        let answer = self
            .in_running(
                id,
                "read files",
                async |_: &SessionRecord, sb: &Sandbox| sb.agent.call(&req).await,
                |r: &Result<Response>, base: AuditEvent, sandbox: &str| {
                    let size = match r {
                        Ok(Response::FileData { data, .. }) => Some(data.0.len()),
                        _ => None,
                    };
                    vec![with_error(
                        AuditEvent {
                            action: AuditAction::FileGet,
                            ..base
                        }
                        .sandbox(sandbox)
                        .with("path", path)
                        .with("size", size),
                        r,
                    )]
                },
            )
            .await?;
        match answer {
            Response::FileData { data, .. } if data.0.len() as u64 > MAX_FILE => {
                Err(Error::TooLarge {
                    what: format!("file {path}"),
                    size: data.0.len() as u64,
                    limit: MAX_FILE,
                })
            }
            Response::FileData { data, .. } => Ok(data.0),
            other => Err(Error::Agent {
                sandbox: id.to_string(),
                message: format!("unexpected answer to read_file: {other:?}"),
            }),
        }
    }

    /// Pauses a running session: checkpoints it into a snapshot (chunks shared with its
    /// template are stored once), then frees its processes and memory.
    pub async fn session_pause(&self, id: &str) -> Result<Session> {
        self.session_record(id)?.must_checkpoint("paused")?;
        let lock = self.session_locks.get(id);
        let Ok(_excl) = lock.rw.try_write() else {
            return Err(Error::SessionBusy {
                id: id.to_string(),
                what: "a command or file transfer is running in it".into(),
            });
        };
        let started = Instant::now();
        let snap = format!(
            "ses-{}-{}",
            id.trim_start_matches("ses-"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let rec = self.transition(id, |r| {
            if r.session.state != SessionState::Running {
                return Err(conflict(r, "pause"));
            }
            r.session.state = SessionState::Pausing;
            r.op = Some(PendingOp {
                by: me(),
                snapshot: Some(snap.clone()),
                sandbox: None,
            });
            Ok(())
        })?;
        let span = info_span!("session.pause", session = %id);
        let r = async {
            let sb = self.attach(rec.tier, rec.sandbox_id());
            match self.snapshot_sandbox(&sb, &snap, true).await {
                Ok(size) => {
                    let elapsed = started.elapsed().as_millis() as u64;
                    let r = self.transition(id, |r| {
                        r.session.state = SessionState::Paused;
                        r.session.snapshot = Some(snap.clone());
                        r.session.snapshot_size = Some(size);
                        r.session.pauses += 1;
                        r.session.last_pause_ms = Some(elapsed);
                        r.session.error = None;
                        r.init = None;
                        r.op = None;
                        Ok(())
                    });
                    match r {
                        Ok(r) => {
                            // The snapshot is durable: only now may the processes go.
                            sb.destroy().await;
                            info!(ms = elapsed, "session paused");
                            Ok(r.view())
                        }
                        Err(e) => {
                            self.drop_snapshot(&snap);
                            Err(e)
                        }
                    }
                }
                Err(e) => {
                    // Roll back: the sandbox was left running, the partial snapshot goes.
                    self.drop_snapshot(&snap);
                    let msg = e.to_string();
                    let _ = self.transition(id, |r| {
                        r.session.state = SessionState::Running;
                        r.session.error = Some(format!("pause failed and was rolled back: {msg}"));
                        r.op = None;
                        Ok(())
                    });
                    Err(self.lost_if_dead(id, e))
                }
            }
        }
        .instrument(span)
        .await;
        let mut event = with_error(session_event(AuditAction::SessionPause, &rec), &r);
        if let Ok(s) = &r {
            event = event
                .with("snapshot", &s.snapshot)
                .with("snapshot_bytes", s.snapshot_size.map(|z| z.stored_bytes));
        }
        // Pausing ends work: it happens whether or not its record can be written.
        self.audited_anyway(r, vec![event])
    }

    /// Resumes a paused session from its snapshot, with everything it had.
    pub async fn session_resume(&self, id: &str) -> Result<Session> {
        // Anything but a paused session is a conflict at once (a pause in flight, a running
        // session). A paused one may still have its lock held by the pause finishing its
        // teardown, or by a racing resume: wait for that (bounded), then the state decides.
        self.audit_ready()?;
        let current = self.session_record(id)?;
        if current.session.state != SessionState::Paused {
            return Err(conflict(&current, "resume"));
        }
        let lock = self.session_locks.get(id);
        let Ok(_excl) = tokio::time::timeout(Duration::from_secs(30), lock.rw.write()).await else {
            return Err(Error::SessionBusy {
                id: id.to_string(),
                what: "another call has held it for 30 s".into(),
            });
        };
        let started = Instant::now();
        let new_sb = crate::engine::new_sandbox_id();
        let rec = self.transition(id, |r| {
            if r.session.state != SessionState::Paused {
                return Err(conflict(r, "resume"));
            }
            r.session.state = SessionState::Resuming;
            r.op = Some(PendingOp {
                by: me(),
                snapshot: None,
                sandbox: Some(new_sb.clone()),
            });
            Ok(())
        })?;
        let span = info_span!("session.resume", session = %id);
        let r = async {
            let Some(snap) = rec.session.snapshot.clone() else {
                return Err(self.fail(id, "paused without a snapshot".into()));
            };
            let restored = self.restore_session(&rec, &snap, &new_sb).await;
            let sb = match restored {
                Ok(sb) => sb,
                Err(e) => {
                    let corrupt = matches!(e, Error::Snapshot(ref s) if s.is_corruption());
                    let msg = e.to_string();
                    if corrupt {
                        return Err(self.fail(id, format!("its snapshot is unusable: {msg}")));
                    }
                    let _ = self.transition(id, |r| {
                        r.session.state = SessionState::Paused;
                        r.session.error = Some(format!("resume failed: {msg}"));
                        r.op = None;
                        Ok(())
                    });
                    return Err(e);
                }
            };
            let elapsed = started.elapsed().as_millis() as u64;
            let init = sb.identity().await;
            let r = self.transition(id, |r| {
                r.session.state = SessionState::Running;
                r.session.snapshot = None;
                r.sandbox = Some(sb.id.clone());
                r.session.last_resume_ms = Some(elapsed);
                r.session.last_active_at = now_secs();
                r.session.error = None;
                r.init = init;
                r.op = None;
                Ok(())
            });
            match r {
                Ok(r) => {
                    // Running again: the snapshot is stale (a later pause writes a new one).
                    self.drop_snapshot(&snap);
                    info!(ms = elapsed, "session resumed");
                    Ok(r.view())
                }
                Err(e) => {
                    sb.destroy().await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await;
        let event = match &r {
            Ok(s) => AuditEvent::new(AuditAction::SessionResume)
                .template(&s.template)
                .session(id)
                .sandbox(s.sandbox.as_deref().unwrap_or(&new_sb))
                .with("resume_ms", s.last_resume_ms),
            Err(e) => session_event(AuditAction::SessionResume, &rec)
                .with("error", crate::audit::error_kind(e)),
        };
        self.audited(r, vec![event])
    }

    async fn restore_session(
        &self,
        rec: &SessionRecord,
        snap: &str,
        sandbox: &str,
    ) -> Result<Sandbox> {
        let id = &rec.session.id;
        let scratch = cleanup::Scratch::new(&self.paths.checkpoints(), &format!("resume-{id}"))?;
        let dir = scratch.path.join("snapshot");
        async {
            let snaps = self.snapshots.clone();
            let (n, d) = (snap.to_string(), dir.clone());
            tokio::task::spawn_blocking(move || snaps.materialize(&n, &d))
                .await
                .map_err(|e| Error::Other(format!("materialize task: {e}")))??;
            let ids = rec.ids.ok_or_else(|| {
                Error::Conflict(format!(
                    "session `{id}` cannot resume: {}; delete it with `thaw session rm {id}`",
                    crate::engine::BEFORE_USERNS
                ))
            })?;
            let spec = self.session_sandbox_spec(rec, ids, sandbox);
            let sb = self.restore_sandbox(rec.tier, &spec, &dir, true).await?;
            let ready = self.adopt(rec, &sb).await;
            match ready {
                Ok(()) => Ok(sb),
                Err(e) => {
                    sb.destroy().await;
                    Err(e)
                }
            }
        }
        .await
    }

    fn fail(&self, id: &str, why: String) -> Error {
        let _ = self.transition(id, |r| {
            r.session.state = SessionState::Failed;
            r.session.error = Some(why.clone());
            r.op = None;
            Ok(())
        });
        Error::SessionConflict {
            id: id.to_string(),
            state: "failed".into(),
            action: "resume".into(),
            hint: format!(": {why}; remove it with `thaw session rm {id}`"),
        }
    }

    /// Changes a session's idle timeout and/or pushes its end of life to now + `max_lifetime`.
    pub fn session_extend(
        &self,
        id: &str,
        idle_timeout: Option<Duration>,
        max_lifetime: Option<Duration>,
    ) -> Result<Session> {
        self.audit_ready()?;
        let r = self.transition(id, |r| {
            if !matches!(
                r.session.state,
                SessionState::Running | SessionState::Paused
            ) {
                return Err(conflict(r, "be extended"));
            }
            if let Some(t) = idle_timeout {
                r.session.idle_timeout_s = t.as_secs();
            }
            if let Some(l) = max_lifetime {
                r.session.expires_at = now_secs().saturating_add(l.as_secs());
            }
            r.session.last_active_at = now_secs();
            Ok(())
        })?;
        let event = session_event(AuditAction::SessionExtend, &r)
            .with("idle_timeout_s", r.session.idle_timeout_s)
            .with("expires_at", r.session.expires_at);
        self.audited(Ok(r.view()), vec![event])
    }

    /// The secrets granted to session `id` that this process holds (none after a restart
    /// until they are granted again: they are never written down).
    pub(crate) fn secrets_of_session(&self, id: &str) -> Vec<thaw_types::spec::SecretGrant> {
        self.session_secrets
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .unwrap_or_default()
    }

    /// Ends a session in any state: kills its sandbox, deletes its snapshot and its record.
    pub async fn session_delete(&self, id: &str) -> Result<Session> {
        let rec = self.session_record(id)?;
        if let Ok(mut m) = self.session_secrets.lock() {
            m.remove(id);
        }
        let span = info_span!("session.delete", session = %id);
        let r = async {
            if rec.session.state != SessionState::Paused {
                self.attach(rec.tier, rec.sandbox_id()).destroy().await;
            }
            if let Some(making) = rec.op.as_ref().and_then(|o| o.sandbox.as_deref()) {
                self.attach(rec.tier, making).destroy().await;
            }
            let owner = self.owner().to_string();
            self.meta.with(|s| {
                s.update::<SessionRecord>(Store::sessions_tree(), id, |cur| match cur {
                    Some(r) if r.session.owner == owner => Ok(None),
                    _ => Err(Error::UnknownSession { id: id.to_string() }),
                })
            })?;
            self.session_locks.forget(id);
            // Its snapshots: those recorded, and any a crash left unrecorded (all are named
            // after the session).
            let mut snaps = rec.owned_snapshots();
            let prefix = format!("{}-", rollout::snapshot_prefix(id));
            snaps.extend(
                self.snapshots
                    .names()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|n| n.starts_with(&prefix)),
            );
            snaps.sort();
            snaps.dedup();
            self.drop_snapshots_later(snaps);
            let mut s = rec.view();
            s.state = SessionState::Stopped;
            Ok(s)
        }
        .instrument(span)
        .await;
        let event = with_error(session_event(AuditAction::SessionDelete, &rec), &r)
            .with("state", rec.session.state.as_str());
        self.audited_anyway(r, vec![event])
    }

    /// Stops a session for its timeout: sandbox and snapshot go, the record stays.
    async fn session_stop(&self, id: &str, why: &str) -> Result<Session> {
        let lock = self.session_locks.get(id);
        let Ok(_excl) = lock.rw.try_write() else {
            return Err(Error::SessionBusy {
                id: id.to_string(),
                what: "a call is running in it".into(),
            });
        };
        let before = self.transition(id, |r| {
            if !matches!(
                r.session.state,
                SessionState::Running | SessionState::Paused
            ) {
                return Err(conflict(r, "stop"));
            }
            Ok(())
        })?;
        if before.session.state == SessionState::Running {
            self.attach(before.tier, before.sandbox_id())
                .destroy()
                .await;
        }
        if let Some(snap) = &before.session.snapshot {
            self.drop_snapshot(snap);
        }
        let r = self.transition(id, |r| {
            r.session.state = SessionState::Stopped;
            r.session.snapshot = None;
            r.session.error = Some(why.to_string());
            r.init = None;
            Ok(())
        })?;
        let event = session_event(AuditAction::SessionStop, &before).with("reason", why);
        self.audited_anyway(Ok(r.view()), vec![event])
    }

    /// Pauses or stops every session (of every owner) past its idle timeout or maximum
    /// lifetime, as each session's creator chose. Returns the sessions it changed.
    /// `thaw serve` calls this periodically; the embedded CLI before session commands.
    pub async fn enforce_session_timeouts(&self) -> Result<Vec<Session>> {
        let all: Vec<SessionRecord> = self.meta.read(|s| s.list(Store::sessions_tree()))?;
        let now = now_secs();
        let mut changed = Vec::new();
        for rec in all {
            let s = &rec.session;
            let expired = now >= s.expires_at;
            let idle = now.saturating_sub(self.last_active(s)) >= s.idle_timeout_s;
            let due = match s.state {
                SessionState::Running => expired || idle,
                SessionState::Paused => expired && s.on_timeout == TimeoutAction::Stop,
                _ => false,
            };
            if !due {
                continue;
            }
            let engine = self.as_owner(&s.owner);
            let why = if expired {
                "maximum lifetime reached"
            } else {
                "idle timeout reached"
            };
            let r = match s.on_timeout {
                TimeoutAction::Pause => engine.session_pause(&s.id).await,
                TimeoutAction::Stop => engine.session_stop(&s.id, why).await,
            };
            match r {
                Ok(s) => {
                    info!(session = %s.id, state = s.state.as_str(), why, "session timeout");
                    changed.push(s);
                }
                Err(Error::SessionBusy { .. }) => {}
                Err(e) => warn!(session = %s.id, error = %e, "enforcing session timeout"),
            }
        }
        Ok(changed)
    }

    /// Finishes or rolls back every session transition whose process died, and fails
    /// running sessions whose sandbox is gone. Runs when the engine opens.
    pub(crate) async fn recover_sessions(&self) -> Result<()> {
        let all: Vec<SessionRecord> = self.meta.read(|s| s.list(Store::sessions_tree()))?;
        let mut with_sandbox = std::collections::HashSet::new();
        for rec in all {
            let id = rec.session.id.clone();
            let engine = self.as_owner(&rec.session.owner);
            let sandbox = rec.sandbox_id().to_string();
            if let Some(op) = &rec.op {
                if alive(&op.by) {
                    with_sandbox.insert(sandbox);
                    with_sandbox.extend(op.sandbox.clone());
                    continue;
                }
                // A sandbox the dead process was making (a create, resume or reset).
                if let Some(making) = op.sandbox.as_deref().filter(|m| *m != sandbox) {
                    self.attach(rec.tier, making).destroy().await;
                }
            }
            match rec.session.state {
                SessionState::Creating => {
                    info!(session = %id, "rolling back an interrupted session creation");
                    self.attach(rec.tier, &sandbox).destroy().await;
                    let _ = self.meta.with(|s| s.remove(Store::sessions_tree(), &id));
                    self.drop_snapshots_later(rec.owned_snapshots());
                }
                SessionState::Pausing => {
                    let snap = rec.op.as_ref().and_then(|o| o.snapshot.clone());
                    let complete = snap
                        .as_deref()
                        .map(|n| self.snapshots.get(n).is_ok())
                        .unwrap_or(false);
                    if complete {
                        info!(session = %id, "completing an interrupted pause");
                        engine.transition(&id, |r| {
                            r.session.state = SessionState::Paused;
                            r.session.snapshot = snap.clone();
                            r.session.pauses += 1;
                            r.init = None;
                            r.op = None;
                            Ok(())
                        })?;
                        self.attach(rec.tier, &sandbox).destroy().await;
                    } else {
                        info!(session = %id, "rolling back an interrupted pause");
                        if let Some(n) = &snap {
                            self.drop_snapshot(n);
                        }
                        let running = rec.init.as_deref().map(alive).unwrap_or(false);
                        engine.transition(&id, |r| {
                            r.op = None;
                            if running {
                                r.session.state = SessionState::Running;
                                r.session.error =
                                    Some("a pause was interrupted and rolled back".into());
                            } else {
                                r.session.state = SessionState::Failed;
                                r.session.error =
                                    Some("a pause was interrupted and its sandbox is gone".into());
                            }
                            Ok(())
                        })?;
                        if running {
                            with_sandbox.insert(sandbox);
                        }
                    }
                }
                SessionState::Resuming => {
                    info!(session = %id, "rolling back an interrupted resume");
                    self.attach(rec.tier, &sandbox).destroy().await;
                    engine.transition(&id, |r| {
                        r.session.state = SessionState::Paused;
                        r.session.error = Some("a resume was interrupted; resume again".into());
                        r.op = None;
                        Ok(())
                    })?;
                }
                SessionState::Running => {
                    if rec.init.as_deref().map(alive).unwrap_or(false) {
                        if rec.op.is_some() {
                            // An interrupted reset: the session keeps its old sandbox.
                            engine.transition(&id, |r| {
                                r.op = None;
                                Ok(())
                            })?;
                        }
                        with_sandbox.insert(sandbox);
                    } else {
                        info!(session = %id, "session's sandbox is gone");
                        self.attach(rec.tier, &sandbox).destroy().await;
                        engine.transition(&id, |r| {
                            r.session.state = SessionState::Failed;
                            r.session.error = Some(
                                "its sandbox is gone (the machine restarted or it was killed) and it was not paused; its state is lost".into(),
                            );
                            r.init = None;
                            Ok(())
                        })?;
                    }
                }
                SessionState::Paused | SessionState::Stopped | SessionState::Failed => {
                    if rec.op.is_some() {
                        engine.transition(&id, |r| {
                            r.op = None;
                            Ok(())
                        })?;
                    }
                }
            }
        }
        // Sandboxes handed to a session that no longer needs one (a crash between a
        // record change and the sandbox's teardown).
        if let Ok(rd) = std::fs::read_dir(self.paths.sandboxes()) {
            for entry in rd.flatten() {
                let Some(owner) = cleanup::session_owner(&entry.path().join("owner")) else {
                    continue;
                };
                let id = entry.file_name().to_string_lossy().to_string();
                if !with_sandbox.contains(&id) && !self.session_needs_sandbox(&owner, &id) {
                    info!(sandbox = %id, session = %owner, "removing a session sandbox no session uses");
                    let tier = self.tiers.of_dir(&entry.path()).tier();
                    self.attach(tier, &id).destroy().await;
                }
            }
        }
        self.sweep_session_snapshots()?;
        Ok(())
    }
}

impl Engine {
    /// Re-reads a session's record: whether it holds (or is about to hold) `sandbox`.
    /// Asked again just before removing a sandbox, since another process may have created,
    /// resumed or reset the session since the records were listed.
    fn session_needs_sandbox(&self, id: &str, sandbox: &str) -> bool {
        let rec = self
            .meta
            .read(|s| s.get::<SessionRecord>(Store::sessions_tree(), id));
        match rec {
            Ok(Some(r)) => {
                r.op.as_ref().map(|o| alive(&o.by)).unwrap_or(false)
                    || (r.session.state == SessionState::Running && r.sandbox_id() == sandbox)
            }
            Ok(None) => false,
            // Unreadable metadata: keep the sandbox rather than destroy a live session.
            Err(_) => true,
        }
    }
}

/// Timings of a call into a session: it has no start, only a run.
fn call_timings(started: Instant) -> Timings {
    let total = ms(started.elapsed());
    Timings {
        start_ms: 0.0,
        warm_ms: 0.0,
        run_ms: total,
        total_ms: total,
    }
}

/// `event`, with the kind of error its action ended with, if any.
fn with_error<T>(event: AuditEvent, r: &Result<T>) -> AuditEvent {
    match r {
        Ok(_) => event,
        Err(e) => event.with("error", crate::audit::error_kind(e)),
    }
}

/// The record of a session's state change: its template, id, and the sandbox that runs it
/// (or last ran it).
fn session_event(action: AuditAction, rec: &SessionRecord) -> AuditEvent {
    AuditEvent::new(action)
        .template(&rec.session.template)
        .session(&rec.session.id)
        .sandbox(rec.sandbox_id())
}
