//! thaw's HTTP API: the contract between `thaw serve` and its clients, as Rust types, and a
//! typed async [`Client`] (what the CLI uses with `--server`).
//!
//! Routes (every one but `/healthz` needs `Authorization: Bearer <key>`):
//!
//! | route | body | answer |
//! | --- | --- | --- |
//! | `GET /healthz` | | [`Health`] |
//! | `GET /metrics` | | Prometheus text |
//! | `GET /openapi.json` | | the OpenAPI document |
//! | `POST /v1/templates` | tar of the template directory | 201 [`TemplateRecord`] |
//! | `GET /v1/templates` | | [`TemplateList`] |
//! | `GET`, `DELETE /v1/templates/{name}` | | [`TemplateRecord`] |
//! | `POST /v1/templates/{name}/invoke` | [`InvokeBody`] | [`Invocation`], or a stream |
//! | `POST /v1/templates/{name}/exec` | [`ExecBody`] | [`ExecResponse`], or a stream |
//! | `POST /v1/sessions` | [`SessionCreateBody`] | 201 [`Session`] |
//! | `GET /v1/sessions` | | [`SessionList`] |
//! | `GET`, `DELETE /v1/sessions/{id}` | | [`Session`] |
//! | `POST /v1/sessions/{id}/exec` | [`ExecBody`] | [`ExecResponse`], or a stream |
//! | `POST /v1/sessions/{id}/invoke` | [`InvokeBody`] | [`Invocation`], or a stream |
//! | `PUT /v1/sessions/{id}/files?path=/abs&mode=0644` | raw bytes | 204 |
//! | `GET /v1/sessions/{id}/files?path=/abs` | | raw bytes |
//! | `POST /v1/sessions/{id}/pause`, `/resume` | | [`Session`] |
//! | `POST /v1/sessions/{id}/extend` | [`ExtendBody`] | [`Session`] |
//! | `POST /v1/sessions/{id}/checkpoints` | [`CheckpointBody`] | 201 [`Checkpoint`] |
//! | `GET /v1/sessions/{id}/checkpoints` | | [`CheckpointList`] |
//! | `DELETE /v1/sessions/{id}/checkpoints/{name}` | | [`Checkpoint`] |
//! | `POST /v1/sessions/{id}/reset` | [`ResetBody`] | [`ResetOutcome`] |
//! | `POST /v1/sessions/{id}/fork` | [`ForkBody`] | [`BatchResponse`] |
//! | `POST /v1/sessions/batch` | [`BatchBody`] | [`BatchResponse`], or a stream of [`BatchEvent`] |
//! | `POST /v1/sessions/{id}/reward` | [`RewardBody`] | [`Reward`] |
//! | `GET /v1/sandboxes` | | [`SandboxList`] |
//! | `GET /v1/sandboxes/{id}` | | [`LiveSandbox`] |
//! | `POST /v1/sandboxes/{id}/kill` | | [`KillReport`] |
//! | `POST /v1/sandboxes/kill?key=` | | [`KillList`] |
//! | `GET /v1/audit?key&template&session&sandbox&action&since&until&limit&order` | | [`AuditList`] |
//! | `GET /v1/audit/verify?head=SEQ:HASH` | | [`AuditVerify`] (admin keys) |
//!
//! Streams: with `Accept: application/x-ndjson` (or `?stream=true`), invoke and exec answer
//! with one [`StreamEvent`] per line, and a batch with one [`BatchEvent`] per line (the
//! OpenAPI document describes each stream's own events: `ExecStreamEvent`,
//! `InvokeStreamEvent`, `BatchStreamEvent`). Errors are an [`ErrorBody`] with a matching
//! status.
//!
//! The engine's data types ([`Session`], [`TemplateRecord`], [`Invocation`], ...) come from
//! `thaw-types`: this crate does not depend on the engine (`make check-api-deps`).

mod client;
#[cfg(feature = "openapi")]
pub mod schema;
mod types;

pub use client::{pack_dir, Client, ClientError, ExecOutput, Result};
pub use thaw_protocol::{InvokeStatus, Outcome, Stream};
// The engine's data types, shared through thaw-types so that a client compiles no engine.
pub use thaw_types::{
    AuditAction, AuditBreak, AuditHead, AuditList, AuditRecord, AuditVerify, BreakKind, Checkpoint,
    ExecResult, Invocation, InvokeDone, KeyRecord, NetworkGrant, NetworkSpec, ResetOutcome, Reward,
    SecretGrant, Session, SessionState, SnapshotSize, StartKind, TemplateRecord, TemplateSpec,
    TemplateState, Tier, TimeoutAction, Timings,
};
// Live sandboxes (`thaw ps`, `thaw kill`).
pub use thaw_types::{KillList, KillReport, LiveSandbox, RunningTask, SandboxFigures, SandboxList};
pub use types::*;
