//! `thaw kill` of a session, and the sessions `thaw ps` lists.
//!
//! A killed session ends for good: its record becomes `stopped` with the kill in `error`,
//! and is marked so that every later transition refuses ([`refused`]). Neither resume nor
//! reset brings it back; `thaw session rm` removes it. Why final rather than `failed` (which
//! a reset revives): a red button must leave nothing runnable, and a rollout worker that
//! resets every failed session would otherwise restart what an operator just stopped.
//!
//! * a running session: calls in it are cancelled (their callers get [`Error::Killed`]),
//!   its sandbox's processes are killed at once and the sandbox torn down after;
//! * a paused session: it has no process to kill; its pause snapshot is dropped, so it
//!   cannot be resumed (its checkpoints and origin go with `thaw session rm`);
//! * a session being created, paused or resumed: the sandbox being made or checkpointed is
//!   killed too; the process doing the transition finds the record final, fails, and
//!   cleans up what it made (a session being created is removed by its own error path).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{SessionRecord, SessionState};
use crate::engine::{ms, now_secs, Engine};
use crate::error::{Error, Result};
use crate::live::{KillReport, KilledBy};
use crate::session::Session;
use crate::store::Store;
use crate::tier::Tier;

/// Who killed a session, and when (unix seconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KilledMark {
    #[serde(default)]
    by: Option<String>,
    at: u64,
}

/// The error of anything asked of a killed session.
pub(super) fn refused(r: &SessionRecord) -> Error {
    Error::Killed {
        what: format!("session {}", r.session.id),
        by: r.killed.as_ref().and_then(|k| k.by.clone()),
    }
}

/// A session that holds a sandbox now.
pub(crate) struct LiveSession {
    pub session: Session,
    pub tier: Tier,
    /// The sandbox it runs in (or that is being made for it).
    pub sandbox: String,
    /// `<pid> <starttime>` of the sandbox's init or VMM, once running.
    pub init: Option<String>,
}

impl SessionRecord {
    /// The sandbox that lives for the session now: the one being made while it is created
    /// or resumed, else its current one while it holds one.
    fn live_sandbox(&self) -> Option<String> {
        match self.session.state {
            SessionState::Creating | SessionState::Resuming => {
                self.op.as_ref().and_then(|o| o.sandbox.clone())
            }
            SessionState::Running | SessionState::Pausing => Some(self.sandbox_id().to_string()),
            _ => None,
        }
    }
}

impl Engine {
    /// Why a call in session `id` was cancelled, if a kill did it.
    pub(super) fn killed_error(&self, id: &str) -> Option<Error> {
        let rec = self
            .meta
            .read(|s| s.get::<SessionRecord>(Store::sessions_tree(), id))
            .ok()??;
        rec.killed.is_some().then(|| refused(&rec))
    }

    /// Sessions this engine may see that hold a sandbox now.
    pub(crate) fn live_session_sandboxes(&self) -> Result<Vec<LiveSession>> {
        let all: Vec<SessionRecord> = self.meta.read(|s| s.list(Store::sessions_tree()))?;
        Ok(all
            .into_iter()
            .filter(|r| self.visible(&r.session.owner) && r.killed.is_none())
            .filter_map(|r| {
                let sandbox = r.live_sandbox()?;
                Some(LiveSession {
                    session: r.view(),
                    tier: r.tier,
                    sandbox,
                    init: r.init.clone(),
                })
            })
            .collect())
    }

    /// Ends session `id` (a session's id, or the id of the sandbox it runs in) for good: see
    /// the module docs. `None`: no such session for this engine.
    pub(crate) async fn kill_session(&self, id: &str, by: &KilledBy) -> Result<Option<KillReport>> {
        let started = Instant::now();
        let all: Vec<SessionRecord> = self.meta.read(|s| s.list(Store::sessions_tree()))?;
        let Some(found) = all.into_iter().find(|r| {
            self.visible(&r.session.owner)
                && (r.session.id == id || r.live_sandbox().as_deref() == Some(id))
        }) else {
            return Ok(None);
        };
        let sid = found.session.id.clone();
        // The record first, bypassing the transition guard: from here on every call and
        // transition of the session refuses, and a cancelled call reports the kill.
        let mark = KilledMark {
            by: by.key.clone(),
            at: now_secs(),
        };
        let mut before: Option<SessionRecord> = None;
        self.meta.with(|s| {
            s.update::<SessionRecord>(Store::sessions_tree(), &sid, |cur| {
                let Some(mut r) = cur else { return Ok(None) };
                if r.killed.is_some() {
                    return Ok(Some(r));
                }
                before = Some(r.clone());
                let who = by
                    .key
                    .as_deref()
                    .map(|k| format!(" (by API key {k})"))
                    .unwrap_or_default();
                r.session.error = Some(format!(
                    "ended by `thaw kill`{who} while {}; remove it with `thaw session rm {sid}`",
                    r.session.state.as_str()
                ));
                r.session.state = SessionState::Stopped;
                r.session.snapshot = None;
                r.killed = Some(mark.clone());
                r.init = None;
                r.op = None;
                Ok(Some(r))
            })
        })?;
        let Some(before) = before else {
            // Killed already (or deleted meanwhile): nothing runs.
            return Ok(Some(KillReport {
                sandbox: None,
                session: Some(sid),
                template: found.session.template,
                owner: found.session.owner,
                was: found.session.state.as_str().to_string(),
                killed_processes: 0,
                kill_ms: ms(started.elapsed()),
            }));
        };
        self.session_locks.get(&sid).cancel_calls();
        // Its sandbox, and one a transition in flight was making.
        let mut sandboxes: Vec<String> = before.live_sandbox().into_iter().collect();
        sandboxes.extend(before.op.as_ref().and_then(|o| o.sandbox.clone()));
        sandboxes.sort();
        sandboxes.dedup();
        let mut processes = 0u64;
        let mut first_error = None;
        for sb in &sandboxes {
            match self.kill_processes(before.tier, sb).await {
                Ok(k) => processes += k.processes as u64,
                Err(e) => {
                    warn!(session = %sid, sandbox = %sb, error = %e, "killing a session's sandbox");
                    first_error.get_or_insert(e);
                }
            }
            // Files, mounts, cgroups and runc's state go as after any discard.
            self.discard(self.attach(before.tier, sb));
        }
        // A paused session's snapshot: nothing can resume it.
        self.drop_snapshots_later(before.session.snapshot.iter().cloned().collect());
        if let Some(e) = first_error {
            return Err(e);
        }
        let report = KillReport {
            sandbox: before.live_sandbox(),
            session: Some(sid),
            template: before.session.template.clone(),
            owner: before.session.owner.clone(),
            was: before.session.state.as_str().to_string(),
            killed_processes: processes,
            kill_ms: ms(started.elapsed()),
        };
        self.live.count_kill(&report.template);
        self.record_kill(by, &report);
        Ok(Some(report))
    }
}
