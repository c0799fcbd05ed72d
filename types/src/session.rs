//! A session as users see it. The state machine and its crash guarantees are in the engine's
//! `platform/SESSIONS.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::template::SnapshotSize;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SessionState {
    /// Its sandbox is being restored from the template.
    Creating,
    /// Alive: exec, files, pause.
    Running,
    /// Being checkpointed; the sandbox still runs until the snapshot is durable.
    Pausing,
    /// Only a snapshot: no process, no memory.
    Paused,
    /// Being restored from its snapshot.
    Resuming,
    /// Ended by its timeout with `on_timeout = stop`, or by `thaw kill` (for good: it can
    /// only be removed); kept for inspection until removed. `error` says which.
    Stopped,
    /// Its sandbox was lost (killed, machine restarted while running) or its snapshot is
    /// unusable; `error` says which.
    Failed,
}

impl SessionState {
    /// Whether a session in this state has (or is getting) a live sandbox: what per-key
    /// limits and the live-sandbox gauge count.
    pub fn holds_sandbox(&self) -> bool {
        matches!(
            self,
            SessionState::Running
                | SessionState::Creating
                | SessionState::Pausing
                | SessionState::Resuming
        )
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Creating => "creating",
            SessionState::Running => "running",
            SessionState::Pausing => "pausing",
            SessionState::Paused => "paused",
            SessionState::Resuming => "resuming",
            SessionState::Stopped => "stopped",
            SessionState::Failed => "failed",
        }
    }
}

/// What happens when a session passes its idle timeout or maximum lifetime.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TimeoutAction {
    /// Pause it: nothing is lost, it can be resumed.
    #[default]
    Pause,
    /// Stop it: processes and state are discarded.
    Stop,
}

/// A session as users see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Session {
    pub id: String,
    pub owner: String,
    pub template: String,
    pub state: SessionState,
    /// Unix seconds.
    pub created_at: u64,
    pub last_active_at: u64,
    /// When the maximum lifetime ends (unix seconds).
    pub expires_at: u64,
    pub idle_timeout_s: u64,
    pub on_timeout: TimeoutAction,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The session's egress grant, added to its template's `[network]`.
    #[serde(default, skip_serializing_if = "crate::spec::NetworkGrant::is_empty")]
    pub network: crate::spec::NetworkGrant,
    /// Why the session failed, or why the last transition was rolled back.
    #[serde(default)]
    pub error: Option<String>,
    /// Snapshot holding a paused session.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Raw size of the last pause's checkpoint and the bytes it added to the store (chunks
    /// shared with the template or an earlier pause are not stored again).
    #[serde(default)]
    pub snapshot_size: Option<SnapshotSize>,
    #[serde(default)]
    pub pauses: u32,
    #[serde(default)]
    pub last_pause_ms: Option<u64>,
    #[serde(default)]
    pub last_resume_ms: Option<u64>,
    /// What `reset` without a checkpoint goes back to: `template <name>`, `checkpoint
    /// <session>/<name>` (a fork), `session <id>` (a batch from a paused session).
    #[serde(default)]
    pub origin: String,
    /// Names of the session's checkpoints, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<String>,
    #[serde(default)]
    pub resets: u32,
    /// The sandbox that runs it now (a directory under `sandboxes/`; every restore makes a
    /// new one). Absent while it holds none (paused, stopped, failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Whether it can be paused, checkpointed and forked (see the engine's
    /// `SessionOptions::checkpointable`).
    #[serde(default = "yes")]
    pub checkpointable: bool,
}

fn yes() -> bool {
    true
}
