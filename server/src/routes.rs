//! Handlers of the service routes and the template routes. Thin: parse, check the caller's
//! limits, run the engine call (tracked, see the crate docs), shape the answer.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use thaw_api::schema::{Binary, ExecStreamEvent, InvokeStreamEvent};
use thaw_api::{
    b64, unb64, Chunk, ErrorBody, ExecBody, ExecResponse, Health, InvokeBody, StreamEvent,
    TemplateList, NDJSON, TAR,
};
use thaw_platform::engine::{ExecResult, Invocation, RunOptions, TemplateRecord};
use thaw_platform::session::SessionState;
use thaw_platform::template::spec::{TemplateSpec, TemplateSpecExt as _};
use thaw_protocol::Stream;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::ApiError;
use crate::extract::{declared_len, next_chunk, JsonBody, Owner, PathParam, QueryParams};
use crate::{blocking, limits, run_tracked, AppState};

/// `?stream=true` asks for an NDJSON stream, like `Accept: application/x-ndjson`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Answer with an NDJSON stream of events (same as `Accept: application/x-ndjson`).
    #[serde(default)]
    pub stream: Option<bool>,
}

pub fn wants_stream(headers: &HeaderMap, q: &StreamQuery) -> bool {
    q.stream.unwrap_or(false)
        || headers
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.split(';').next().unwrap_or_default().trim() == NDJSON)
}

/// An NDJSON response fed by `rx`; it ends when every sender is gone. `cancel` fires when
/// the response is dropped: hyper drops it when the client disconnects.
pub fn ndjson<E: serde::Serialize + Send + 'static>(
    rx: mpsc::UnboundedReceiver<E>,
    cancel: DropGuard,
) -> Response {
    let lines = futures_util::stream::unfold((rx, cancel), |(mut rx, cancel)| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_else(|e| {
            // Only a result with a non-string map key could fail; say so instead of
            // breaking the stream.
            serde_json::to_vec(&StreamEvent::Error {
                error: ApiError::internal(format!("encoding a stream event: {e}")).detail(),
            })
            .unwrap_or_default()
        });
        line.push(b'\n');
        Some((Ok::<_, Infallible>(line), (rx, cancel)))
    });
    let mut resp = Body::from_stream(lines).into_response();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Sends output chunks to a stream. The channel is unbounded because the engine's callback
/// cannot wait; what it holds is bounded by the template's output cap.
pub fn forward(tx: mpsc::UnboundedSender<StreamEvent>) -> impl FnMut(Stream, &[u8]) + Send {
    move |s, d| {
        let ev = match s {
            Stream::Stdout => StreamEvent::Stdout(Chunk::new(d)),
            Stream::Stderr => StreamEvent::Stderr(Chunk::new(d)),
        };
        // The client left: the call still runs to completion (and tears its sandbox down).
        let _ = tx.send(ev);
    }
}

/// A call's options; `cancel` is the token that ends it when its client goes away (see
/// [`ndjson`] and [`until_disconnect`]).
pub fn run_options(
    env: std::collections::BTreeMap<String, String>,
    timeout_ms: Option<u64>,
    cancel: &CancellationToken,
) -> RunOptions {
    RunOptions {
        env,
        timeout: timeout_ms.map(Duration::from_millis),
        cancel: Some(cancel.clone()),
        ..RunOptions::default()
    }
}

/// [`run_options`] of an invoke or exec with its egress grant, which is checked (every
/// entry, every secret's shape) before anything starts.
pub fn call_options(
    env: std::collections::BTreeMap<String, String>,
    timeout_ms: Option<u64>,
    network: thaw_api::NetworkGrant,
    secrets: Vec<thaw_api::SecretGrant>,
    cancel: &CancellationToken,
) -> Result<RunOptions, ApiError> {
    thaw_platform::egress::check_grant(&network, &secrets)?;
    Ok(RunOptions {
        network,
        secrets,
        ..run_options(env, timeout_ms, cancel)
    })
}

/// Awaits a tracked engine call on behalf of a buffered (non-streamed) response. hyper
/// drops the request's future when its client disconnects; the call's task is not dropped
/// (see the crate docs), but `cancel` fires, which kills the task and frees its sandbox.
pub async fn until_disconnect<T>(
    cancel: &CancellationToken,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let guard = cancel.clone().drop_guard();
    let r = call.await;
    guard.disarm();
    r
}

pub fn decode_stdin(body: &ExecBody) -> Result<Option<Vec<u8>>, ApiError> {
    body.stdin_b64
        .as_deref()
        .map(|s| {
            unb64(s).ok_or_else(|| {
                ApiError::bad_request("invalid JSON body at `stdin_b64`: not valid base64")
                    .with_path("stdin_b64")
            })
        })
        .transpose()
}

pub fn exec_response(result: ExecResult, out: &[u8], err: &[u8]) -> ExecResponse {
    ExecResponse {
        result,
        stdout_b64: b64(out),
        stderr_b64: b64(err),
    }
}

// ---- service ----

/// Liveness: answers without touching the engine or needing a key.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "get_health",
    tag = "service",
    security(()),
    responses((status = 200, description = "The server is up", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
    })
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "get_metrics",
    tag = "service",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let engine = state.engine.clone();
    let (running, paused, store_bytes, live, kills) = blocking(move || {
        // Sessions of every owner: each key's, and the embedded CLI's.
        let (mut running, mut paused) = (0i64, 0i64);
        for s in engine.all_sessions()? {
            // A session being created or resumed is counted by its call's slot below.
            if crate::slots::counted_by_state(s.state) {
                running += 1;
            } else if s.state == SessionState::Paused {
                paused += 1;
            }
        }
        let usage = engine.snapshots.usage()?;
        // Every owner's live sandboxes (the server's engine sees all).
        let live = engine.live_sandboxes()?;
        Ok((
            running,
            paused,
            usage.chunk_bytes,
            live,
            engine.kills_by_template(),
        ))
    })
    .await?;
    let m = &state.metrics;
    m.sandboxes.set(&live, &kills);
    m.live_sandboxes
        .set(running + i64::try_from(state.slots.total()).unwrap_or(i64::MAX));
    m.paused_sessions.set(paused);
    m.open_connections
        .set(i64::try_from(state.conns.len()).unwrap_or(i64::MAX));
    m.store_bytes
        .set(i64::try_from(store_bytes).unwrap_or(i64::MAX));
    let text = m
        .render()
        .map_err(|e| ApiError::internal(format!("rendering metrics: {e}")))?;
    Ok(([(CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "get_openapi",
    tag = "service",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub async fn openapi_json(State(state): State<AppState>) -> Json<utoipa::openapi::OpenApi> {
    Json((*state.openapi).clone())
}

// ---- templates ----

/// Publishes a template: the body is a tar of its directory (`tar -C dir -cf - .`). Builds,
/// boots, warms and snapshots it; answers when it is ready.
#[utoipa::path(
    post,
    path = "/v1/templates",
    operation_id = "deploy_template",
    tag = "templates",
    request_body(content = inline(Binary), content_type = "application/x-tar", description = "tar of the template directory, template.toml at its root"),
    responses(
        (status = 201, description = "Published", body = TemplateRecord),
        (status = 400, description = "Bad archive or template.toml", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 413, description = "Archive over the upload limit", body = ErrorBody),
        (status = 415, description = "Not application/x-tar", body = ErrorBody),
        (status = 422, description = "The template's setup or warm-up failed", body = ErrorBody),
        (status = 429, description = "The key's sandbox limit is reached; `Retry-After` gives the seconds to wait", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn deploy_template(
    State(state): State<AppState>,
    owner: Owner,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<TemplateRecord>), ApiError> {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if ct.split(';').next().unwrap_or_default().trim() != TAR {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "expected a Content-Type of {TAR} (a tar of the template directory), got `{ct}`"
            ),
        ));
    }
    let limit = state.cfg.max_upload_bytes;
    if declared_len(&headers).is_some_and(|n| n > limit) {
        return Err(ApiError::too_large("template archive", limit));
    }
    // Deploying boots a sandbox to warm it: it counts against the key's limit.
    let slot = state.slots.acquire(&owner).await?;
    let sources = sources_dir(&state, &owner);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = sources.join(&id);
    let tar_path = sources.join(format!(".upload-{id}.tar"));
    let stall = state.cfg.header_read_timeout;
    let unpacked = receive(&tar_path, &dir, body, limit, stall).await;
    let _ = tokio::fs::remove_file(&tar_path).await;
    if let Err(e) = unpacked {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e);
    }
    let engine = owner.engine.clone();
    let deployed = run_tracked(&state, async move {
        let _slot = slot;
        let r = deploy_dir(&engine, &dir).await;
        if r.is_err() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        r
    })
    .await??;
    Ok((StatusCode::CREATED, Json(deployed)))
}

/// `$THAW_HOME/sources/<owner>/`: uploaded template directories (the owner id is a key id,
/// `[a-z0-9]`, safe as a path component).
fn sources_dir(state: &AppState, owner: &Owner) -> PathBuf {
    state.engine.paths.home.join("sources").join(&owner.key.id)
}

/// Streams the upload to `tar_path` (bounded by `limit`), then unpacks it into `dir`.
async fn receive(
    tar_path: &Path,
    dir: &Path,
    body: Body,
    limit: u64,
    stall: Duration,
) -> Result<(), ApiError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        ApiError::from(thaw_platform::Error::io(what, p, e))
    };
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io("creating the template directory", dir, e))?;
    let mut file = tokio::fs::File::create(tar_path)
        .await
        .map_err(|e| io("storing the upload", tar_path, e))?;
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = next_chunk(&mut stream, stall, "template archive").await? {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("reading the template archive: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::too_large("template archive", limit));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| io("storing the upload", tar_path, e))?;
    }
    file.flush()
        .await
        .map_err(|e| io("storing the upload", tar_path, e))?;
    drop(file);
    let (tar_path, dir) = (tar_path.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let f =
            std::fs::File::open(&tar_path).map_err(|e| io("reading the upload", &tar_path, e))?;
        crate::upload::unpack(std::io::BufReader::new(f), &dir).map_err(|e| match e {
            crate::upload::UnpackError::Bad(m) => {
                ApiError::bad_request(format!("template archive: {m}"))
            }
            crate::upload::UnpackError::Io { dir, source } => {
                io("unpacking the template", &dir, source)
            }
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("unpack task failed: {e}")))?
}

/// Deploys an unpacked template; on success, drops the directory of the version it replaced.
async fn deploy_dir(
    engine: &thaw_platform::Engine,
    dir: &Path,
) -> Result<TemplateRecord, ApiError> {
    let d = dir.to_path_buf();
    let spec = blocking(move || TemplateSpec::load(&d)).await?;
    let (e, name) = (engine.clone(), spec.name.clone());
    // The replaced version's directory, if this owner had one (its sources stay until the
    // new version is durable).
    let previous = blocking(move || match e.template(&name) {
        Ok(t) => Ok(Some(t.source_dir)),
        Err(thaw_platform::Error::UnknownTemplate { .. }) => Ok(None),
        Err(e) => Err(e),
    })
    .await?;
    let record = engine.deploy(dir, &thaw_platform::progress::Quiet).await?;
    if let Some(old) = previous {
        remove_source(dir, &old).await;
    }
    Ok(record)
}

/// Removes an uploaded template directory, if `old` is one (a sibling of `current` under
/// the owner's sources) and not `current` itself. Templates deployed from a local path by
/// the CLI are never touched.
async fn remove_source(current: &Path, old: &Path) {
    let (Some(parent), Ok(cur)) = (current.parent(), current.canonicalize()) else {
        return;
    };
    let parent = parent
        .canonicalize()
        .unwrap_or_else(|_| parent.to_path_buf());
    if old.parent() == Some(parent.as_path()) && old != cur {
        if let Err(e) = tokio::fs::remove_dir_all(old).await {
            tracing::warn!(dir = %old.display(), error = %e, "removing a replaced template's sources");
        }
    }
}

/// This key's templates.
#[utoipa::path(
    get,
    path = "/v1/templates",
    operation_id = "list_templates",
    tag = "templates",
    responses(
        (status = 200, description = "The caller's templates", body = TemplateList),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub async fn list_templates(owner: Owner) -> Result<Json<TemplateList>, ApiError> {
    let templates = blocking(move || owner.engine.templates()).await?;
    Ok(Json(TemplateList { templates }))
}

#[utoipa::path(
    get,
    path = "/v1/templates/{name}",
    operation_id = "get_template",
    tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, description = "The template", body = TemplateRecord),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such template for this key", body = ErrorBody),
    )
)]
pub async fn get_template(
    owner: Owner,
    PathParam(name): PathParam<String>,
) -> Result<Json<TemplateRecord>, ApiError> {
    Ok(Json(blocking(move || owner.engine.template(&name)).await?))
}

/// Removes a template and its snapshot; answers with what was removed.
#[utoipa::path(
    delete,
    path = "/v1/templates/{name}",
    operation_id = "delete_template",
    tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, description = "The removed template", body = TemplateRecord),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such template for this key", body = ErrorBody),
    )
)]
pub async fn delete_template(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(name): PathParam<String>,
) -> Result<Json<TemplateRecord>, ApiError> {
    let removed = blocking(move || owner.engine.remove_template(&name)).await?;
    let sources = state.engine.paths.home.join("sources");
    if removed.source_dir.starts_with(&sources) {
        if let Err(e) = tokio::fs::remove_dir_all(&removed.source_dir).await {
            tracing::warn!(dir = %removed.source_dir.display(), error = %e, "removing a template's sources");
        }
    }
    Ok(Json(removed))
}

/// Runs the template's handler on a payload in a fresh sandbox restored from its snapshot.
#[utoipa::path(
    post,
    path = "/v1/templates/{name}/invoke",
    operation_id = "invoke_template",
    tag = "templates",
    params(("name" = String, Path, description = "Template name"), StreamQuery),
    request_body = InvokeBody,
    responses(
        (status = 200, description = "The invocation; with `Accept: application/x-ndjson` or `?stream=true`, `stderr` events as they come then one `result` event",
            content((Invocation = "application/json"), (InvokeStreamEvent = "application/x-ndjson"))),
        (status = 400, description = "Bad body (also: an empty `argv`, a NUL byte in `argv` or `env`, an `env` name empty or with `=`, a timeout over the template's limit or the server's maximum); `path` names the field; a grant that does not hold is `bad_network`, its `path` `allow_out`, `deny_out` or `secrets`", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such template for this key", body = ErrorBody),
        (status = 409, description = "The template needs a rebuild", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "The key's sandbox limit is reached; `Retry-After` gives the seconds to wait", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn invoke(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(name): PathParam<String>,
    QueryParams(q): QueryParams<StreamQuery>,
    headers: HeaderMap,
    JsonBody(mut body): JsonBody<InvokeBody>,
) -> Result<Response, ApiError> {
    // Refuse bad bodies and unknown templates before taking a slot or starting a stream,
    // so the status says so (a stream has already answered 200).
    limits::env(&body.env)?;
    let (e, n) = (owner.engine.clone(), name.clone());
    let t = blocking(move || e.ready_template(&n)).await?;
    limits::call_timeout(body.timeout_ms, &t.spec.limits, &state.cfg)?;
    let slot = state.slots.acquire(&owner).await?;
    let cancel = CancellationToken::new();
    let network = body.network();
    let secrets = std::mem::take(&mut body.secrets);
    let opts = call_options(body.env, body.timeout_ms, network, secrets, &cancel)?;
    let (engine, metrics) = (owner.engine.clone(), state.metrics.clone());
    if wants_stream(&headers, &q) {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = forward(tx.clone());
        state.tasks.spawn(async move {
            let mut out = out;
            let r = engine
                .invoke(&name, body.payload, opts, |d| out(Stream::Stderr, d))
                .await;
            // The sandbox is gone: free the slot before the client can see the end of the
            // stream, so that its next call is not refused for it.
            drop(slot);
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
        let _slot = slot;
        let r = engine.invoke(&name, body.payload, opts, |_| {}).await;
        metrics.invocation(&r);
        r
    });
    let r = until_disconnect(&cancel, call).await??;
    Ok(Json(r).into_response())
}

/// Runs a command in a fresh sandbox of the template.
#[utoipa::path(
    post,
    path = "/v1/templates/{name}/exec",
    operation_id = "exec_template",
    tag = "templates",
    params(("name" = String, Path, description = "Template name"), StreamQuery),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The result with the whole output (base64); with `Accept: application/x-ndjson` or `?stream=true`, `stdout`/`stderr` events as they come then one `exit` event",
            content((ExecResponse = "application/json"), (ExecStreamEvent = "application/x-ndjson"))),
        (status = 400, description = "Bad body (also: an empty `argv`, a NUL byte in `argv` or `env`, an `env` name empty or with `=`, a timeout over the template's limit or the server's maximum); `path` names the field; a grant that does not hold is `bad_network`, its `path` `allow_out`, `deny_out` or `secrets`", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such template for this key", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 422, description = "The command could not be started", body = ErrorBody),
        (status = 429, description = "The key's sandbox limit is reached; `Retry-After` gives the seconds to wait", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn exec(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(name): PathParam<String>,
    QueryParams(q): QueryParams<StreamQuery>,
    headers: HeaderMap,
    JsonBody(mut body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let stdin = decode_stdin(&body)?;
    limits::argv(&body.argv)?;
    limits::env(&body.env)?;
    let (e, n) = (owner.engine.clone(), name.clone());
    let t = blocking(move || e.ready_template(&n)).await?;
    limits::call_timeout(body.timeout_ms, &t.spec.limits, &state.cfg)?;
    let slot = state.slots.acquire(&owner).await?;
    let cancel = CancellationToken::new();
    let network = body.network();
    let secrets = std::mem::take(&mut body.secrets);
    let opts = call_options(body.env, body.timeout_ms, network, secrets, &cancel)?;
    let (engine, metrics) = (owner.engine.clone(), state.metrics.clone());
    if wants_stream(&headers, &q) {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = forward(tx.clone());
        state.tasks.spawn(async move {
            let r = engine.exec(&name, body.argv, stdin, opts, out).await;
            // As for invoke: free the slot before the end of the stream is visible.
            drop(slot);
            let _ = tx.send(match r {
                Ok(result) => {
                    metrics.exec(&result);
                    StreamEvent::Exit { result }
                }
                Err(e) => StreamEvent::Error {
                    error: ApiError::from(e).detail(),
                },
            });
        });
        return Ok(ndjson(rx, cancel.drop_guard()));
    }
    let call = run_tracked(&state, async move {
        let _slot = slot;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = engine
            .exec(&name, body.argv, stdin, opts, |s, d| match s {
                Stream::Stdout => out.extend_from_slice(d),
                Stream::Stderr => err.extend_from_slice(d),
            })
            .await;
        r.map(|r| (r, out, err))
    });
    let (result, out, err) = until_disconnect(&cancel, call).await??;
    state.metrics.exec(&result);
    Ok(Json(exec_response(result, &out, &err)).into_response())
}
