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

use crate::{ExecResult, Invocation, Session, TemplateRecord, TimeoutAction};

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
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl SessionCreateBody {
    pub fn new(template: impl Into<String>) -> SessionCreateBody {
        SessionCreateBody {
            template: template.into(),
            idle_timeout_s: None,
            max_lifetime_s: None,
            on_timeout: None,
            env: BTreeMap::new(),
        }
    }
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
            },
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"event":"error","error":{"code":"internal","message":"boom"}}"#
        );
        assert!(serde_json::from_str::<StreamEvent>(&line)
            .unwrap()
            .is_terminal());
    }
}
