//! Handlers of the session routes. Every session call is scoped to the caller's key by the
//! engine: another key's session is reported as unknown (404), not as forbidden, so ids
//! cannot be probed.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use thaw_api::schema::{Binary, ExecStreamEvent, InvokeStreamEvent};
use thaw_api::{
    ErrorBody, ExecBody, ExecResponse, ExtendBody, InvokeBody, SessionCreateBody, SessionList,
    StreamEvent,
};
use thaw_platform::engine::Invocation;
use thaw_platform::session::{Session, MAX_FILE};
use thaw_protocol::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::extract::{read_body, JsonBody, Owner, PathParam, QueryParams};
use crate::routes::{
    call_options, decode_stdin, exec_response, forward, ndjson, until_disconnect, wants_stream,
    StreamQuery,
};
use crate::{blocking, limits, run_tracked, AppState};

/// Starts a session from a template's snapshot.
#[utoipa::path(
    post,
    path = "/v1/sessions",
    operation_id = "create_session",
    tag = "sessions",
    request_body = SessionCreateBody,
    responses(
        (status = 201, description = "The running session", body = Session),
        (status = 400, description = "Bad body (a NUL byte in `env`, an `env` name empty or with `=`, a timeout over the server's maximum, `on_timeout: pause` with `checkpointable: false`); `path` names the field; a grant that does not hold is `bad_network`, its `path` `allow_out`, `deny_out` or `secrets`", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such template for this key", body = ErrorBody),
        (status = 429, description = "The key's sandbox limit is reached; `Retry-After` gives the seconds to wait", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    owner: Owner,
    JsonBody(mut body): JsonBody<SessionCreateBody>,
) -> Result<(StatusCode, Json<Session>), ApiError> {
    let network = body.network();
    thaw_platform::egress::check_grant(&network, &body.secrets)?;
    let secrets = std::mem::take(&mut body.secrets);
    let mut opts = crate::rollouts::session_options(
        body.idle_timeout_s,
        body.max_lifetime_s,
        body.on_timeout,
        body.checkpointable,
        body.env,
        &state.cfg,
    )?;
    opts.network = network;
    opts.secrets = secrets;
    let (e, t) = (owner.engine.clone(), body.template.clone());
    blocking(move || e.ready_template(&t)).await?;
    let slot = state.slots.acquire(&owner).await?;
    let engine = owner.engine.clone();
    let session = run_tracked(&state, async move {
        let _slot = slot;
        engine.session_create(&body.template, opts).await
    })
    .await??;
    Ok((StatusCode::CREATED, Json(session)))
}

/// This key's sessions, in every state.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    operation_id = "list_sessions",
    tag = "sessions",
    responses(
        (status = 200, description = "The caller's sessions", body = SessionList),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub async fn list(owner: Owner) -> Result<Json<SessionList>, ApiError> {
    let sessions = blocking(move || owner.engine.sessions()).await?;
    Ok(Json(SessionList { sessions }))
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    operation_id = "get_session",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session", body = Session),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
    )
)]
pub async fn get(
    owner: Owner,
    PathParam(id): PathParam<String>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(blocking(move || owner.engine.session(&id)).await?))
}

/// Ends a session in any state: its sandbox and snapshot are discarded.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    operation_id = "delete_session",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session as it ended", body = Session),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
) -> Result<Json<Session>, ApiError> {
    let engine = owner.engine.clone();
    let s = run_tracked(&state, async move { engine.session_delete(&id).await }).await??;
    Ok(Json(s))
}

/// Runs a command in a running session; its effects stay for the next calls.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/exec",
    operation_id = "exec_session",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id"), StreamQuery),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The result with the whole output (base64); with `Accept: application/x-ndjson` or `?stream=true`, `stdout`/`stderr` events then one `exit` event",
            content((ExecResponse = "application/json"), (ExecStreamEvent = "application/x-ndjson"))),
        (status = 400, description = "Bad body (also: an empty `argv`, a NUL byte in `argv` or `env`, an `env` name empty or with `=`, a timeout over the template's limit or the server's maximum); `path` names the field; a grant that does not hold is `bad_network`, its `path` `allow_out`, `deny_out` or `secrets`", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "The session is not running", body = ErrorBody),
    )
)]
pub async fn exec(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    QueryParams(q): QueryParams<StreamQuery>,
    headers: HeaderMap,
    JsonBody(mut body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let stdin = decode_stdin(&body)?;
    limits::argv(&body.argv)?;
    limits::env(&body.env)?;
    // Unknown (404) and not running (409) sessions are refused before a stream starts (it
    // would have answered 200).
    let (e, i) = (owner.engine.clone(), id.clone());
    let lim = blocking(move || e.session_call_limits(&i, "exec")).await?;
    limits::call_timeout(body.timeout_ms, &lim, &state.cfg)?;
    let cancel = CancellationToken::new();
    let network = body.network();
    let secrets = std::mem::take(&mut body.secrets);
    let opts = call_options(body.env, body.timeout_ms, network, secrets, &cancel)?;
    let engine = owner.engine.clone();
    if wants_stream(&headers, &q) {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = forward(tx.clone());
        state.tasks.spawn(async move {
            let r = engine.session_exec(&id, body.argv, stdin, opts, out).await;
            let _ = tx.send(match r {
                Ok(result) => StreamEvent::Exit { result },
                Err(e) => StreamEvent::Error {
                    error: ApiError::from(e).detail(),
                },
            });
        });
        return Ok(ndjson(rx, cancel.drop_guard()));
    }
    let call = run_tracked(&state, async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = engine
            .session_exec(&id, body.argv, stdin, opts, |s, d| match s {
                Stream::Stdout => out.extend_from_slice(d),
                Stream::Stderr => err.extend_from_slice(d),
            })
            .await;
        r.map(|r| (r, out, err))
    });
    let (result, out, err) = until_disconnect(&cancel, call).await??;
    Ok(Json(exec_response(result, &out, &err)).into_response())
}

/// Runs the template's handler in a running session (a persistent handler keeps its
/// memory between calls).
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/invoke",
    operation_id = "invoke_session",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id"), StreamQuery),
    request_body = InvokeBody,
    responses(
        (status = 200, description = "The invocation; with `Accept: application/x-ndjson` or `?stream=true`, `stderr` events then one `result` event",
            content((Invocation = "application/json"), (InvokeStreamEvent = "application/x-ndjson"))),
        (status = 400, description = "Bad body (also: an empty `argv`, a NUL byte in `argv` or `env`, an `env` name empty or with `=`, a timeout over the template's limit or the server's maximum); `path` names the field; a grant that does not hold is `bad_network`, its `path` `allow_out`, `deny_out` or `secrets`", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "The session is not running", body = ErrorBody),
    )
)]
pub async fn invoke(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    QueryParams(q): QueryParams<StreamQuery>,
    headers: HeaderMap,
    JsonBody(mut body): JsonBody<InvokeBody>,
) -> Result<Response, ApiError> {
    limits::env(&body.env)?;
    let (e, i) = (owner.engine.clone(), id.clone());
    let lim = blocking(move || e.session_call_limits(&i, "invoke")).await?;
    limits::call_timeout(body.timeout_ms, &lim, &state.cfg)?;
    let cancel = CancellationToken::new();
    let network = body.network();
    let secrets = std::mem::take(&mut body.secrets);
    let opts = call_options(body.env, body.timeout_ms, network, secrets, &cancel)?;
    let (engine, metrics) = (owner.engine.clone(), state.metrics.clone());
    if wants_stream(&headers, &q) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = forward(tx.clone());
        state.tasks.spawn(async move {
            let r = engine
                .session_invoke(&id, body.payload, opts, |d| out(Stream::Stderr, d))
                .await;
            metrics.invocation(&r);
            let _ = tx.send(match r {
                Ok(invocation) => StreamEvent::Result { invocation },
                Err(e) => StreamEvent::Error {
                    error: ApiError::from(e).detail(),
                },
            });
        });
        return Ok(ndjson(rx, cancel.drop_guard()));
    }
    let call = run_tracked(&state, async move {
        let r = engine.session_invoke(&id, body.payload, opts, |_| {}).await;
        metrics.invocation(&r);
        r
    });
    let r: Invocation = until_disconnect(&cancel, call).await??;
    Ok(Json(r).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Octal permission bits for a write, e.g. `0644`; default 0644.
    #[serde(default)]
    pub mode: Option<String>,
}

fn check_path(p: &str) -> Result<(), ApiError> {
    if !p.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "file path `{p}` must be absolute (inside the sandbox)"
        ))
        .with_path("path"));
    }
    Ok(())
}

fn parse_mode(m: &str) -> Result<u32, ApiError> {
    u32::from_str_radix(m, 8)
        .ok()
        .filter(|&v| v <= 0o7777)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "mode `{m}` is not octal permission bits such as 0644"
            ))
            .with_path("mode")
        })
}

/// Writes a file into a running session (created or replaced), the body is its content.
#[utoipa::path(
    put,
    path = "/v1/sessions/{id}/files",
    operation_id = "write_session_file",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id"), FileQuery),
    request_body(content = inline(Binary), content_type = "application/octet-stream", description = "The file's content"),
    responses(
        (status = 204, description = "Written"),
        (status = 400, description = "Relative path or bad mode", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "The session is not running", body = ErrorBody),
        (status = 413, description = "File over the limit", body = ErrorBody),
    )
)]
pub async fn write_file(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    QueryParams(q): QueryParams<FileQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    check_path(&q.path)?;
    let mode = q.mode.as_deref().map(parse_mode).transpose()?;
    let stall = state.cfg.header_read_timeout;
    let data = read_body(&headers, body, MAX_FILE, stall, "file").await?;
    let engine = owner.engine.clone();
    run_tracked(&state, async move {
        engine
            .session_write_file(&id, &q.path, data.to_vec(), mode)
            .await
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Reads a file from a running session.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/files",
    operation_id = "read_session_file",
    tag = "sessions",
    params(
        ("id" = String, Path, description = "Session id"),
        ("path" = String, Query, description = "Absolute path inside the sandbox"),
    ),
    responses(
        (status = 200, description = "The file's content", body = inline(Binary), content_type = "application/octet-stream"),
        (status = 400, description = "Relative path", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key, or no such file", body = ErrorBody),
        (status = 409, description = "The session is not running", body = ErrorBody),
    )
)]
pub async fn read_file(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    QueryParams(q): QueryParams<FileQuery>,
) -> Result<Response, ApiError> {
    check_path(&q.path)?;
    let engine = owner.engine.clone();
    let data = run_tracked(&state, async move {
        engine.session_read_file(&id, &q.path).await
    })
    .await??;
    Ok(([(CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// Checkpoints a running session and frees its processes and memory.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/pause",
    operation_id = "pause_session",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The paused session", body = Session),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "Not running, or busy", body = ErrorBody),
    )
)]
pub async fn pause(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
) -> Result<Json<Session>, ApiError> {
    let engine = owner.engine.clone();
    let s = run_tracked(&state, async move { engine.session_pause(&id).await }).await??;
    Ok(Json(s))
}

/// Restores a paused session exactly as it was paused.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/resume",
    operation_id = "resume_session",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The running session", body = Session),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "Not paused, or busy", body = ErrorBody),
        (status = 429, description = "The key's sandbox limit is reached; `Retry-After` gives the seconds to wait", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
) -> Result<Json<Session>, ApiError> {
    // A resume brings a sandbox back: it counts against the key's limit.
    let (e, i) = (owner.engine.clone(), id.clone());
    blocking(move || e.session(&i)).await?;
    let slot = state.slots.acquire(&owner).await?;
    let (engine, metrics) = (owner.engine.clone(), state.metrics.clone());
    let s = run_tracked(&state, async move {
        let _slot = slot;
        let r = engine.session_resume(&id).await;
        if let Ok(s) = &r {
            metrics.resume(s);
        }
        r
    })
    .await??;
    Ok(Json(s))
}

/// Changes the idle timeout and/or pushes the end of life to now + `max_lifetime_s`.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/extend",
    operation_id = "extend_session",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    request_body = ExtendBody,
    responses(
        (status = 200, description = "The session", body = Session),
        (status = 400, description = "A timeout over the server's maximum; `path` names the field", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "Neither running nor paused", body = ErrorBody),
    )
)]
pub async fn extend(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<ExtendBody>,
) -> Result<Json<Session>, ApiError> {
    limits::session_times(body.idle_timeout_s, body.max_lifetime_s, &state.cfg)?;
    let s = blocking(move || {
        owner.engine.session_extend(
            &id,
            body.idle_timeout_s.map(Duration::from_secs),
            body.max_lifetime_s.map(Duration::from_secs),
        )
    })
    .await?;
    Ok(Json(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert_eq!(parse_mode("4755").unwrap(), 0o4755);
        for bad in ["", "0999", "rw-r--r--", "77777", "-1"] {
            let e = parse_mode(bad).unwrap_err();
            assert_eq!(e.path.as_deref(), Some("mode"), "{bad}");
        }
    }

    #[test]
    fn file_paths_must_be_absolute() {
        assert!(check_path("/tmp/x").is_ok());
        assert!(check_path("tmp/x").is_err());
        assert!(check_path("").is_err());
    }
}
