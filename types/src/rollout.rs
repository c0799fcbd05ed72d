//! What the rollout routes answer: checkpoints, resets and rewards of sessions. The engine's
//! side (batch, fork, checkpoint, reset, reward) is in `thaw_platform::session`.

use serde::{Deserialize, Serialize};

use crate::session::Session;

/// A named snapshot of a live session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Checkpoint {
    pub name: String,
    pub session: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Size of the checkpoint, and what it added to the store (chunks it shares with the
    /// template or other snapshots are stored once).
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub checkpoint_ms: u64,
}

/// What a reset did.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResetOutcome {
    pub session: Session,
    /// `origin`, or `checkpoint <name>`.
    pub from: String,
    /// Calls that were running in the session and were cancelled (their callers got a
    /// `cancelled` error).
    pub cancelled_calls: u32,
    pub reset_ms: f64,
}

/// A reward and how it was computed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reward {
    pub reward: f64,
    pub exit_code: i32,
    /// The command's standard output (UTF-8, lossy; at most 64 KiB).
    pub output: String,
    pub run_ms: f64,
}
