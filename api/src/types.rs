//! Request and response bodies of the HTTP API.
//!
//! Request bodies reject unknown fields: a misspelt `timout_ms` silently ignored would run
//! a task under a different limit than its caller asked for.
//!
//! Binary data: the buffered exec response carries stdout and stderr base64-encoded
//! (`stdout_b64`, `stderr_b64`) because a task's output may be any bytes and one field per
//! stream keeps the contract simple. Streamed chunks carry `data` (text) when the chunk is
//! valid UTF-8, else `data_b64`, so that a human reading the stream with `curl` sees text.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::{Checkpoint, ExecResult, Invocation, Session, TemplateRecord, TimeoutAction};

/// Body of `POST /v1/templates/{name}/invoke`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvokeBody {
    /// Handed to the template's handler as JSON.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Added to (and overriding) the template's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit; default: the template's `limits.timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Egress granted to this call on top of the template's `[network]`: domains
    /// (`example.com`, `*.example.com`), IPs and CIDRs, each with an optional `:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// IPs and CIDRs kept out even when a broader `allow_out` range covers them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// Credentials the sandbox never holds: it sees a placeholder in the environment
    /// variable `name`; the egress proxy puts `value` in its place in HTTPS requests to
    /// `hosts` (which `allow_out` must allow). Kept in the server's memory only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::SecretGrant>,
}

/// Body of the exec routes (`/v1/templates/{name}/exec`, `/v1/sessions/{id}/exec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecBody {
    /// The command and its arguments; not run through a shell.
    pub argv: Vec<String>,
    /// The whole standard input, base64; absent connects stdin to /dev/null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Egress granted to this call on top of the template's `[network]`: domains
    /// (`example.com`, `*.example.com`), IPs and CIDRs, each with an optional `:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// IPs and CIDRs kept out even when a broader `allow_out` range covers them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// Credentials the sandbox never holds: it sees a placeholder in the environment
    /// variable `name`; the egress proxy puts `value` in its place in HTTPS requests to
    /// `hosts` (which `allow_out` must allow). Kept in the server's memory only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::SecretGrant>,
}

impl ExecBody {
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> ExecBody {
        ExecBody {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecBody::default()
        }
    }

    /// Sets the standard input (encodes it).
    pub fn with_stdin(mut self, stdin: &[u8]) -> ExecBody {
        self.stdin_b64 = Some(b64(stdin));
        self
    }
}

/// Body of `POST /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionCreateBody {
    pub template: String,
    /// Seconds without a call before `on_timeout` applies; default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Seconds from creation before `on_timeout` applies; default 86400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_s: Option<u64>,
    /// Default `pause`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<TimeoutAction>,
    /// Default true. false: the session cannot be paused, checkpointed or forked from its
    /// state, and shares its memory copy-on-write with its snapshot: it restores (and
    /// resets) faster and holds a fraction of the memory. For rollouts that are only reset.
    /// Its timeouts stop it (`on_timeout` may not be `pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointable: Option<bool>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Egress granted to the session on top of the template's `[network]`: domains
    /// (`example.com`, `*.example.com`), IPs and CIDRs, each with an optional `:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// IPs and CIDRs kept out even when a broader `allow_out` range covers them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// Credentials the sandbox never holds: it sees a placeholder in the environment
    /// variable `name`; the egress proxy puts `value` in its place in HTTPS requests to
    /// `hosts` (which `allow_out` must allow). Kept in the server's memory only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::SecretGrant>,
}

impl InvokeBody {
    /// The call's egress grant.
    pub fn network(&self) -> crate::NetworkGrant {
        crate::NetworkGrant {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
        }
    }
}

impl ExecBody {
    /// The call's egress grant.
    pub fn network(&self) -> crate::NetworkGrant {
        crate::NetworkGrant {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
        }
    }
}

impl SessionCreateBody {
    /// The session's egress grant.
    pub fn network(&self) -> crate::NetworkGrant {
        crate::NetworkGrant {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
        }
    }

    pub fn new(template: impl Into<String>) -> SessionCreateBody {
        SessionCreateBody {
            template: template.into(),
            idle_timeout_s: None,
            max_lifetime_s: None,
            on_timeout: None,
            checkpointable: None,
            env: BTreeMap::new(),
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            secrets: Vec::new(),
        }
    }
}

/// Options of the sessions a fork or batch makes (as in [`SessionCreateBody`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForkBody {
    /// How many sessions to make (at least 1).
    pub n: u32,
    /// Fork from this checkpoint of the session instead of from its state now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<TimeoutAction>,
    /// Default true. false: the session cannot be paused, checkpointed or forked from its
    /// state, and shares its memory copy-on-write with its snapshot: it restores (and
    /// resets) faster and holds a fraction of the memory. For rollouts that are only reset.
    /// Its timeouts stop it (`on_timeout` may not be `pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointable: Option<bool>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Body of `POST /v1/sessions/batch`: `n` sessions from a template, or from a session (a
/// checkpoint of it, its pause snapshot, or its state now).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchBody {
    pub n: u32,
    /// Make them from this template's snapshot. Exactly one of `template` and `session`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// With `session`: from this checkpoint of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<TimeoutAction>,
    /// Default true. false: the session cannot be paused, checkpointed or forked from its
    /// state, and shares its memory copy-on-write with its snapshot: it restores (and
    /// resets) faster and holds a fraction of the memory. For rollouts that are only reset.
    /// Its timeouts stop it (`on_timeout` may not be `pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointable: Option<bool>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One session of a fork or batch that could not be made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchError {
    pub index: u32,
    pub error: ErrorDetail,
}

/// Buffered answer of `POST /v1/sessions/batch` and of a fork.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchResponse {
    /// In the order they became ready.
    pub sessions: Vec<Session>,
    pub errors: Vec<BatchError>,
    /// From the request to the last session ready.
    pub batch_ms: f64,
}

/// One line of a streamed batch, tagged by `event`: a `session` or an `error` per session
/// as each is ready, then `done`; or `aborted` if the batch as a whole failed (a fork point
/// could not be taken), after which nothing more comes (sessions already sent stay).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum BatchEvent {
    Session {
        index: u32,
        session: Box<Session>,
    },
    Error {
        index: u32,
        error: ErrorDetail,
    },
    Done {
        created: u32,
        failed: u32,
        batch_ms: f64,
    },
    Aborted {
        error: ErrorDetail,
    },
}

/// Body of `POST /v1/sessions/{id}/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CheckpointBody {
    /// 1 to 64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
    pub name: String,
}

/// `GET /v1/sessions/{id}/checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CheckpointList {
    pub checkpoints: Vec<Checkpoint>,
}

/// Body of `POST /v1/sessions/{id}/reset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResetBody {
    /// Back to this checkpoint; absent: back to the snapshot the session was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// Body of `POST /v1/sessions/{id}/reward`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RewardBody {
    /// Default: the template's `reward.timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Body of `POST /v1/sessions/{id}/extend`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExtendBody {
    /// New idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// The session now ends this many seconds from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_s: Option<u64>,
}

/// Every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Machine-readable class, e.g. `unknown_template`, `bad_request`, `too_many_sandboxes`.
    pub code: String,
    /// One line for humans: the cause and the fix.
    pub message: String,
    /// For a bad request body: the path of the offending field, e.g. `argv[0]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Whose failure it is; see [`Fault`].
    #[serde(default)]
    pub fault: Fault,
    /// Whether the same call may succeed if made again (after `Retry-After`, if given):
    /// true for infrastructure faults. A trainer retries the rollout instead of scoring it.
    #[serde(default)]
    pub retryable: bool,
}

/// Whose failure an error is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Fault {
    /// The request: a bad body, an unknown id, a state that does not allow the call.
    #[default]
    Caller,
    /// The task or the template's code: a reward command that printed no number, output
    /// past the cap, a handler that failed.
    Task,
    /// thaw or the machine: a restore that failed, a sandbox that died, an overloaded
    /// server. Not the task's doing.
    Infrastructure,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: String,
}

/// `GET /v1/templates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateList {
    pub templates: Vec<TemplateRecord>,
}

/// `GET /v1/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionList {
    pub sessions: Vec<Session>,
}

/// Buffered response of the exec routes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResponse {
    pub result: ExecResult,
    /// Everything the command wrote to stdout (up to the template's output cap), base64.
    pub stdout_b64: String,
    /// Everything the command wrote to stderr, base64.
    pub stderr_b64: String,
}

/// A chunk of output in a stream: text when it is valid UTF-8, else base64. Exactly one of
/// the two fields is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Chunk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl Chunk {
    pub fn new(bytes: &[u8]) -> Chunk {
        match std::str::from_utf8(bytes) {
            Ok(s) => Chunk {
                data: Some(s.to_string()),
                data_b64: None,
            },
            Err(_) => Chunk {
                data: None,
                data_b64: Some(b64(bytes)),
            },
        }
    }

    /// The chunk's bytes; `None` when `data_b64` is not valid base64.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match (&self.data, &self.data_b64) {
            (Some(s), _) => Some(s.as_bytes().to_vec()),
            (None, Some(b)) => unb64(b),
            (None, None) => Some(Vec::new()),
        }
    }
}

/// One line of an NDJSON stream (`Accept: application/x-ndjson` or `?stream=true`), tagged
/// by `event`. Output events come first; the last line is `result` (invoke), `exit` (exec)
/// or `error`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StreamEvent {
    Stdout(Chunk),
    Stderr(Chunk),
    Result { invocation: Invocation },
    Exit { result: ExecResult },
    Error { error: ErrorDetail },
}

impl StreamEvent {
    /// Whether the stream ends with this event.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            StreamEvent::Result { .. } | StreamEvent::Exit { .. } | StreamEvent::Error { .. }
        )
    }
}

/// Media type of streamed responses.
pub const NDJSON: &str = "application/x-ndjson";
/// Media type of a template upload.
pub const TAR: &str = "application/x-tar";

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_text_when_utf8_and_base64_otherwise() {
        let t = Chunk::new("héllo\n".as_bytes());
        assert_eq!(t.data.as_deref(), Some("héllo\n"));
        assert_eq!(t.data_b64, None);
        assert_eq!(t.bytes().unwrap(), "héllo\n".as_bytes());
        let bin = [0xff, 0x00, 0xc3];
        let b = Chunk::new(&bin);
        assert_eq!(b.data, None);
        assert_eq!(b.bytes().unwrap(), bin);
        let line = serde_json::to_string(&StreamEvent::Stderr(b)).unwrap();
        assert_eq!(line, r#"{"event":"stderr","data_b64":"/wDD"}"#);
    }

    #[test]
    fn request_bodies_reject_unknown_fields_and_default_the_rest() {
        let b: InvokeBody = serde_json::from_str("{}").unwrap();
        assert_eq!(b, InvokeBody::default());
        assert!(serde_json::from_str::<InvokeBody>(r#"{"timout_ms": 5}"#).is_err());
        assert!(serde_json::from_str::<ExecBody>(r#"{"argv": [], "x": 1}"#).is_err());
        assert!(serde_json::from_str::<ExtendBody>(r#"{"idle": 1}"#).is_err());
        let s: SessionCreateBody =
            serde_json::from_str(r#"{"template": "shell", "on_timeout": "stop"}"#).unwrap();
        assert_eq!(s.on_timeout, Some(TimeoutAction::Stop));
    }

    #[test]
    fn error_events_round_trip() {
        let e = StreamEvent::Error {
            error: ErrorDetail {
                code: "internal".into(),
                message: "boom".into(),
                path: None,
                fault: Fault::Infrastructure,
                retryable: true,
            },
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"event":"error","error":{"code":"internal","message":"boom","fault":"infrastructure","retryable":true}}"#
        );
        // An error from an older server (no fault) still reads.
        let old: ErrorDetail = serde_json::from_str(r#"{"code":"x","message":"y"}"#).unwrap();
        assert_eq!((old.fault, old.retryable), (Fault::Caller, false));
        assert!(serde_json::from_str::<StreamEvent>(&line)
            .unwrap()
            .is_terminal());
    }
}

/// Query of `GET /v1/audit`: every parameter given must match. A key that is not an admin
/// sees only its own records (`key` may only name itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct AuditQuery {
    /// The acting API key's id (`local`: the embedded CLI's engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// An action, e.g. `exec`, `file_put`, `egress_refused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Records at or after this time, in unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Records at or before this time, in unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// At most this many records (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `newest` (the default) or `oldest` first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
}

/// Query of `GET /v1/audit/verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct AuditVerifyQuery {
    /// A head taken earlier, `SEQ:HASH` (what `verify` printed): the log must still hold
    /// that record unchanged, which detects a rewrite of the whole chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}
