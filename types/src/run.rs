//! What an invocation or an exec returns.

use serde::{Deserialize, Serialize};
use thaw_protocol::{InvokeStatus, Outcome};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Timings {
    /// Sandbox creation to guest-init ready (cold boot or restore).
    pub start_ms: f64,
    /// Handler configuration and warm-up (cold starts only).
    pub warm_ms: f64,
    /// The task itself, in the ready sandbox.
    pub run_ms: f64,
    /// The call to its answer. A discarded sandbox's teardown comes after the answer and
    /// is not in any figure.
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Invocation {
    pub template: String,
    pub sandbox_id: String,
    pub start: StartKind,
    #[serde(flatten)]
    pub done: InvokeDone,
    pub timings: Timings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResult {
    pub template: String,
    pub sandbox_id: String,
    pub start: StartKind,
    pub outcome: Outcome,
    pub exit_code: i32,
    pub truncated: bool,
    pub timings: Timings,
}

/// How a sandbox came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StartKind {
    /// Booted and warmed from scratch (the template has no snapshot).
    Cold,
    /// Restored from the template's snapshot.
    Restore,
    /// Ran in a live session's sandbox.
    Session,
}

/// The result of one invocation as the guest reported it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvokeDone {
    pub status: InvokeStatus,
    pub result: Option<serde_json::Value>,
    pub raw_output: Option<String>,
    pub stderr_tail: String,
    pub outcome: Option<Outcome>,
    pub duration_ms: u64,
    pub truncated: bool,
}
