//! Schemas of what `/openapi.json` describes but thaw's Rust code carries another way (the
//! `openapi` feature; thaw never sends or reads these types):
//!
//! - each NDJSON stream's lines. The server and the Rust [`Client`](crate::Client) use one
//!   [`StreamEvent`](crate::StreamEvent) for both streams; [`ExecStreamEvent`] and
//!   [`InvokeStreamEvent`] are its two views, with only the events each stream carries, one
//!   named schema per event and a discriminator on `event`, so that generated clients get a
//!   precise type per line. Tests check that they accept exactly what `StreamEvent` writes.
//!   A streamed batch's lines are [`BatchEvent`](crate::BatchEvent)s, described the same way
//!   by [`BatchStreamEvent`] (and checked against what `BatchEvent` writes).
//! - raw bodies ([`Binary`]): `type: string, format: binary`.

use serde::Deserialize;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use crate::{ErrorDetail, ExecResult, Invocation, Session};

/// A raw body (a template's tar, a session file): `type: string, format: binary`.
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl ToSchema for Binary {}

/// One line of an exec stream (`POST .../exec` with `Accept: application/x-ndjson` or
/// `?stream=true`): `stdout` and `stderr` events as the command writes, then exactly one
/// `exit` (it ended) or `error` (the call failed after the stream had started).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(discriminator(property_name = "event", mapping(
    ("stdout" = "#/components/schemas/StdoutEvent"),
    ("stderr" = "#/components/schemas/StderrEvent"),
    ("exit" = "#/components/schemas/ExitEvent"),
    ("error" = "#/components/schemas/ErrorEvent"),
)))]
pub enum ExecStreamEvent {
    Stdout(StdoutEvent),
    Stderr(StderrEvent),
    Exit(ExitEvent),
    Error(ErrorEvent),
}

/// One line of an invoke stream (`POST .../invoke` with `Accept: application/x-ndjson` or
/// `?stream=true`): `stderr` events as the handler writes, then exactly one `result` (the
/// invocation, whatever its status) or `error` (the call failed after the stream had started).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(discriminator(property_name = "event", mapping(
    ("stderr" = "#/components/schemas/StderrEvent"),
    ("result" = "#/components/schemas/ResultEvent"),
    ("error" = "#/components/schemas/ErrorEvent"),
)))]
pub enum InvokeStreamEvent {
    Stderr(StderrEvent),
    Result(ResultEvent),
    Error(ErrorEvent),
}

/// One line of a streamed batch (`POST /v1/sessions/batch` with `Accept: application/x-ndjson`
/// or `?stream=true`): a `session` or an `error` per session as each is ready, then `done`;
/// or `aborted` if the batch as a whole failed (a fork point could not be taken), after which
/// nothing more comes (sessions already sent stay).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(discriminator(property_name = "event", mapping(
    ("session" = "#/components/schemas/BatchSessionEvent"),
    ("error" = "#/components/schemas/BatchErrorEvent"),
    ("done" = "#/components/schemas/BatchDoneEvent"),
    ("aborted" = "#/components/schemas/BatchAbortedEvent"),
)))]
pub enum BatchStreamEvent {
    Session(BatchSessionEvent),
    Error(BatchErrorEvent),
    Done(BatchDoneEvent),
    Aborted(BatchAbortedEvent),
}

/// A chunk of the command's standard output: text in `data` when it is valid UTF-8, else
/// base64 in `data_b64`; exactly one of the two is present.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StdoutEvent {
    #[schema(inline)]
    pub event: StdoutTag,
    #[serde(default)]
    #[schema(value_type = String)]
    pub data: Option<String>,
    #[serde(default)]
    #[schema(value_type = String, content_encoding = "base64")]
    pub data_b64: Option<String>,
}

/// A chunk of standard error (of the command, or of the handler for invoke): text in `data`
/// when it is valid UTF-8, else base64 in `data_b64`; exactly one of the two is present.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StderrEvent {
    #[schema(inline)]
    pub event: StderrTag,
    #[serde(default)]
    #[schema(value_type = String)]
    pub data: Option<String>,
    #[serde(default)]
    #[schema(value_type = String, content_encoding = "base64")]
    pub data_b64: Option<String>,
}

/// The last line of an exec stream whose command ran: how it ended.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ExitEvent {
    #[schema(inline)]
    pub event: ExitTag,
    pub result: ExecResult,
}

/// The last line of an invoke stream whose handler ran: the invocation (its `status` says
/// whether the handler succeeded).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResultEvent {
    #[schema(inline)]
    pub event: ResultTag,
    pub invocation: Invocation,
}

/// The last line of a stream whose call failed after the response had started (status 200
/// was already sent): the error a buffered call would have answered with its status.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ErrorEvent {
    #[schema(inline)]
    pub event: ErrorTag,
    pub error: ErrorDetail,
}

/// A session of the batch, as soon as it runs; `index` is its place in the batch.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchSessionEvent {
    #[schema(inline)]
    pub event: SessionTag,
    pub index: u32,
    pub session: Box<Session>,
}

/// A session of the batch that could not be made; `index` is its place in the batch.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchErrorEvent {
    #[schema(inline)]
    pub event: ErrorTag,
    pub index: u32,
    pub error: ErrorDetail,
}

/// The last line of a batch that ran: how many sessions were made and how many failed.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchDoneEvent {
    #[schema(inline)]
    pub event: DoneTag,
    pub created: u32,
    pub failed: u32,
    /// From the request to the last session ready.
    pub batch_ms: f64,
}

/// The last line of a batch that failed as a whole (a fork point could not be taken);
/// sessions already sent stay.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchAbortedEvent {
    #[schema(inline)]
    pub event: AbortedTag,
    pub error: ErrorDetail,
}

/// Always `stdout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StdoutTag {
    Stdout,
}

/// Always `stderr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StderrTag {
    Stderr,
}

/// Always `exit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExitTag {
    Exit,
}

/// Always `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultTag {
    Result,
}

/// Always `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorTag {
    Error,
}

/// Always `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionTag {
    Session,
}

/// Always `done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DoneTag {
    Done,
}

/// Always `aborted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AbortedTag {
    Aborted,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BatchEvent, Chunk, Fault, InvokeDone, InvokeStatus, Outcome, StartKind, StreamEvent,
        Timings,
    };

    fn timings() -> Timings {
        Timings {
            start_ms: 1.0,
            warm_ms: 0.0,
            run_ms: 2.0,
            total_ms: 3.0,
        }
    }

    fn every_event() -> Vec<StreamEvent> {
        vec![
            StreamEvent::Stdout(Chunk::new(b"out\n")),
            StreamEvent::Stdout(Chunk::new(&[0xff, 0])),
            StreamEvent::Stderr(Chunk::new(b"err\n")),
            StreamEvent::Stderr(Chunk::new(&[0xc3])),
            StreamEvent::Exit {
                result: ExecResult {
                    template: "shell".into(),
                    sandbox_id: "sb-1".into(),
                    start: StartKind::Restore,
                    outcome: Outcome::Exited { code: 3 },
                    exit_code: 3,
                    truncated: false,
                    timings: timings(),
                },
            },
            StreamEvent::Result {
                invocation: Invocation {
                    template: "python".into(),
                    sandbox_id: "sb-2".into(),
                    start: StartKind::Session,
                    done: InvokeDone {
                        status: InvokeStatus::Ok,
                        result: Some(serde_json::json!({"value": 42})),
                        raw_output: None,
                        stderr_tail: String::new(),
                        outcome: Some(Outcome::Exited { code: 0 }),
                        duration_ms: 5,
                        truncated: false,
                    },
                    timings: timings(),
                },
            },
            StreamEvent::Error {
                error: ErrorDetail {
                    code: "internal".into(),
                    message: "boom".into(),
                    path: None,
                    fault: Fault::Infrastructure,
                    retryable: true,
                },
            },
        ]
    }

    /// The per-stream schemas accept every line `StreamEvent` writes on that stream, and
    /// refuse the lines of the other stream.
    #[test]
    fn per_stream_views_accept_exactly_what_the_wire_carries() {
        for ev in every_event() {
            let line = serde_json::to_string(&ev).unwrap();
            let exec = serde_json::from_str::<ExecStreamEvent>(&line);
            let invoke = serde_json::from_str::<InvokeStreamEvent>(&line);
            match ev {
                StreamEvent::Stdout(_) => {
                    assert!(matches!(exec, Ok(ExecStreamEvent::Stdout(_))), "{line}");
                    assert!(invoke.is_err(), "{line}");
                }
                StreamEvent::Stderr(_) => {
                    assert!(matches!(exec, Ok(ExecStreamEvent::Stderr(_))), "{line}");
                    assert!(matches!(invoke, Ok(InvokeStreamEvent::Stderr(_))), "{line}");
                }
                StreamEvent::Exit { .. } => {
                    assert!(matches!(exec, Ok(ExecStreamEvent::Exit(_))), "{line}");
                    assert!(invoke.is_err(), "{line}");
                }
                StreamEvent::Result { .. } => {
                    assert!(exec.is_err(), "{line}");
                    assert!(matches!(invoke, Ok(InvokeStreamEvent::Result(_))), "{line}");
                }
                StreamEvent::Error { .. } => {
                    assert!(matches!(exec, Ok(ExecStreamEvent::Error(_))), "{line}");
                    assert!(matches!(invoke, Ok(InvokeStreamEvent::Error(_))), "{line}");
                }
            }
        }
    }

    fn every_batch_event() -> Vec<BatchEvent> {
        let session: Session = serde_json::from_value(serde_json::json!({
            "id": "ses-1",
            "owner": "local",
            "template": "shell",
            "state": "running",
            "created_at": 10,
            "last_active_at": 11,
            "expires_at": 12,
            "idle_timeout_s": 600,
            "on_timeout": "stop",
            "origin": "template shell",
            "sandbox": "sb-1",
            "checkpointable": false,
        }))
        .unwrap();
        let error = ErrorDetail {
            code: "restore_failed".into(),
            message: "boom".into(),
            path: None,
            fault: Fault::Infrastructure,
            retryable: true,
        };
        vec![
            BatchEvent::Session {
                index: 0,
                session: Box::new(session),
            },
            BatchEvent::Error {
                index: 1,
                error: error.clone(),
            },
            BatchEvent::Done {
                created: 1,
                failed: 1,
                batch_ms: 12.5,
            },
            BatchEvent::Aborted { error },
        ]
    }

    /// The batch stream's schema accepts every line `BatchEvent` writes, each as its own
    /// event.
    #[test]
    fn batch_stream_view_accepts_what_the_wire_carries() {
        for ev in every_batch_event() {
            let line = serde_json::to_string(&ev).unwrap();
            let view = serde_json::from_str::<BatchStreamEvent>(&line);
            let ok = match (&ev, &view) {
                (BatchEvent::Session { index, session }, Ok(BatchStreamEvent::Session(v))) => {
                    v.index == *index && v.session.id == session.id
                }
                (BatchEvent::Error { index, error }, Ok(BatchStreamEvent::Error(v))) => {
                    v.index == *index && v.error == *error
                }
                (BatchEvent::Done { created, .. }, Ok(BatchStreamEvent::Done(v))) => {
                    v.created == *created
                }
                (BatchEvent::Aborted { error }, Ok(BatchStreamEvent::Aborted(v))) => {
                    v.error == *error
                }
                _ => false,
            };
            assert!(ok, "{line}: {view:?}");
        }
    }

    #[test]
    fn binary_is_a_binary_string() {
        let s = serde_json::to_value(<Binary as utoipa::PartialSchema>::schema()).unwrap();
        assert_eq!(s, serde_json::json!({"type": "string", "format": "binary"}));
    }
}
