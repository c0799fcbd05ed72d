//! The engine's audit trail: every action is recorded in the home's audit log
//! (`$THAW_HOME/audit/`, the `thaw-audit` crate) when it is performed, with its actor (the
//! API key's id for an engine of [`Engine::as_owner`], `local` for the embedded CLI's),
//! the template, session and sandbox it touched, and its outcome.
//!
//! # For other parts of the engine
//!
//! [`Engine::audit`] appends any [`AuditEvent`] under this engine's actor; typed
//! constructors build the events of other components: [`AuditEvent::egress`] (the egress
//! proxy's decision on a connection: sandbox, destination host/ip/port, allowed or
//! refused, and why), [`AuditEvent::kill`] (the host killed a sandbox's processes) and
//! [`AuditEvent::limit_hit`]. A component that starts new work first calls
//! [`Engine::audit_ready`], which refuses it while the log cannot be written. Records
//! never hold secrets, payloads or file contents: sizes and sha256 hashes only.
//!
//! # When a record cannot be written
//!
//! The log goes into its failed state (see `thaw-audit`). Work that starts something
//! (publish, invoke, exec, file writes, session create, resume, reset, fork, batch) is
//! refused with [`Error::Audit`] before it starts; a call already running when the log
//! failed finishes, but its caller gets the audit error instead of its result: no result
//! leaves thaw without its record. Actions that end work (pause, delete, a timeout's stop,
//! key revocation, template removal) still happen, so that the failure cannot be used to
//! keep sandboxes alive or keys valid; their record goes to thaw's error log instead.

use serde_json::json;
use thaw_protocol::{InvokeStatus, Outcome};
use thaw_types::audit::{AuditHead, AuditList, AuditVerify};

pub use thaw_audit::{
    capped_argv, sha256_hex, AuditEvent, Destination, Error as AuditError, Filter, DEFAULT_LIMIT,
    MAX_LIMIT,
};
pub use thaw_types::audit::AuditAction;

use crate::engine::Engine;
use crate::error::{Error, Result};

/// The limit an outcome shows was hit.
pub(crate) fn limit_of(outcome: Option<&Outcome>, truncated: bool) -> Option<&'static str> {
    match outcome {
        Some(Outcome::Timeout) => Some("timeout"),
        Some(Outcome::Oom) => Some("memory"),
        _ if truncated => Some("output"),
        _ => None,
    }
}

/// A short, secret-free name of an error for a record (messages may quote task output).
pub(crate) fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::HostTimeout { .. } => "host_timeout",
        Error::OutputFlood { .. } => "output_flood",
        Error::Cancelled => "cancelled",
        Error::ResetCancelled { .. } => "reset_cancelled",
        Error::SessionLost { .. } => "session_lost",
        Error::Guest { .. } => "guest_error",
        Error::Agent { .. } => "agent",
        Error::TooLarge { .. } => "too_large",
        Error::Audit(_) => "audit_unavailable",
        _ => "failed",
    }
}

/// The records of a call that ran in `sandbox`: `call` with its outcome, and a
/// `limit_hit` (plus a `kill` where the host killed the task) for any limit it hit.
pub(crate) fn call_events<T>(
    call: AuditEvent,
    sandbox: &str,
    result: &Result<T>,
    outcome: impl FnOnce(&T) -> CallOutcome,
) -> Vec<AuditEvent> {
    let mut call = call.sandbox(sandbox);
    let mut out = Vec::new();
    let mut limit = None;
    match result {
        Ok(v) => {
            let o = outcome(v);
            limit = limit_of(o.outcome.as_ref(), o.truncated);
            call = call
                .with("outcome", o.outcome)
                .with("truncated", o.truncated);
            if let Some(code) = o.exit_code {
                call = call.with("exit_code", code);
            }
            if let Some(s) = o.status {
                call = call.with("status", s.as_str());
            }
        }
        Err(e) => {
            call = call.with("error", error_kind(e));
            if matches!(e, Error::HostTimeout { .. } | Error::OutputFlood { .. }) {
                limit = Some(error_kind(e));
            }
        }
    }
    let scope = |e: AuditEvent| AuditEvent {
        template: call.template.clone(),
        session: call.session.clone(),
        ..e
    };
    if let Some(l) = limit {
        out.push(scope(
            AuditEvent::limit_hit(sandbox, l).with("action", call.action.as_str()),
        ));
    }
    if let Err(e @ (Error::HostTimeout { .. } | Error::OutputFlood { .. })) = result {
        out.push(scope(AuditEvent::kill(sandbox, error_kind(e), None)));
    }
    out.insert(0, call);
    out
}

/// What a finished call reports in its record.
#[derive(Debug, Default)]
pub(crate) struct CallOutcome {
    pub outcome: Option<Outcome>,
    pub exit_code: Option<i32>,
    pub status: Option<InvokeStatus>,
    pub truncated: bool,
}

impl Engine {
    /// Appends `event` to the audit log as this engine's owner (the API key's id, or
    /// `local`), unless the event names its actor itself.
    pub fn audit(&self, event: AuditEvent) -> Result<AuditHead> {
        let event = if event.actor.is_empty() {
            event.actor(self.owner())
        } else {
            event
        };
        Ok(self.audit_log.append(&event)?)
    }

    /// Ok while the audit log can be written; new work checks it before it starts.
    pub fn audit_ready(&self) -> Result<()> {
        Ok(self.audit_log.ready()?)
    }

    /// The audit log itself (its directory, its head, the break found when it opened).
    pub fn audit_log(&self) -> &thaw_audit::Audit {
        &self.audit_log
    }

    /// Records matching `filter` (every actor's: scoping to a caller is the caller's job).
    pub fn audit_query(&self, filter: &Filter) -> Result<AuditList> {
        Ok(self.audit_log.query(filter)?)
    }

    /// Verifies the whole audit log; `pin`: a head taken earlier that it must still hold.
    pub fn audit_verify(&self, pin: Option<AuditHead>) -> Result<AuditVerify> {
        Ok(self.audit_log.verify(pin)?)
    }

    /// Records what a piece of work did, and hands its result on, unless the record could
    /// not be written: then the caller gets the audit error (see the module docs).
    pub(crate) fn audited<T>(&self, result: Result<T>, events: Vec<AuditEvent>) -> Result<T> {
        for e in events {
            self.audit(e)?;
        }
        result
    }

    /// Records an action that ends work: a record that cannot be written is logged (by
    /// the audit log) and the action's result stands.
    pub(crate) fn audited_anyway<T>(
        &self,
        result: Result<T>,
        events: Vec<AuditEvent>,
    ) -> Result<T> {
        for e in events {
            let _ = self.audit(e);
        }
        result
    }
}

/// A file written into a session: its path, size, mode and sha256, never its bytes.
pub(crate) fn file_detail(path: &str, data: &[u8], mode: Option<u32>) -> serde_json::Value {
    json!({
        "path": path,
        "size": data.len(),
        "sha256": sha256_hex(data),
        "mode": mode.map(|m| format!("{m:04o}")),
    })
}
