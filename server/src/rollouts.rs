//! Handlers of the rollout routes: checkpoints, reset, fork, batch and reward. A fork or
//! batch takes the key's sandbox slots for all its sessions before any restore starts, so
//! one that does not fit is refused whole (429) instead of half made.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use thaw_api::schema::BatchStreamEvent;
use thaw_api::{
    BatchBody, BatchError, BatchEvent, BatchResponse, CheckpointBody, CheckpointList, ErrorBody,
    ForkBody, ResetBody, RewardBody,
};
use thaw_platform::session::{
    BatchItem, BatchSource, Checkpoint, ResetOutcome, Reward, SessionOptions, TimeoutAction,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::extract::{JsonBody, OptionalJsonBody, Owner, PathParam, QueryParams};
use crate::routes::{ndjson, run_options, wants_stream, StreamQuery};
use crate::{blocking, limits, run_tracked, AppState, ServerConfig};

/// Most sessions one fork or batch makes; the key's `max_sandboxes` usually bounds it
/// first.
pub const MAX_BATCH: u32 = 1024;

/// The options of sessions a call makes: the caller's, checked against the server's caps;
/// a default over the server's maximum is lowered to it (the caller asked for nothing).
pub fn session_options(
    idle_timeout_s: Option<u64>,
    max_lifetime_s: Option<u64>,
    on_timeout: Option<TimeoutAction>,
    checkpointable: Option<bool>,
    env: BTreeMap<String, String>,
    cfg: &ServerConfig,
) -> Result<SessionOptions, ApiError> {
    limits::env(&env)?;
    limits::session_times(idle_timeout_s, max_lifetime_s, cfg)?;
    let checkpointable = checkpointable.unwrap_or(true);
    if !checkpointable && on_timeout == Some(TimeoutAction::Pause) {
        return Err(ApiError::bad_request(
            "`on_timeout: pause` needs a checkpointable session; drop it (a session with `checkpointable: false` is stopped by its timeouts) or make the session checkpointable",
        )
        .with_path("on_timeout"));
    }
    let defaults = SessionOptions::default();
    Ok(SessionOptions {
        idle_timeout: idle_timeout_s
            .map(Duration::from_secs)
            .unwrap_or(defaults.idle_timeout.min(cfg.max_session_idle)),
        max_lifetime: max_lifetime_s
            .map(Duration::from_secs)
            .unwrap_or(defaults.max_lifetime.min(cfg.max_session_lifetime)),
        on_timeout: on_timeout.unwrap_or(defaults.on_timeout),
        env,
        checkpointable,
        network: Default::default(),
        secrets: Vec::new(),
    })
}

fn batch_size(n: u32) -> Result<u32, ApiError> {
    if n == 0 || n > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "`n` is {n}: ask for 1 to {MAX_BATCH} sessions"
        ))
        .with_path("n"));
    }
    Ok(n)
}

fn batch_error(item_index: usize, e: thaw_platform::Error) -> BatchError {
    BatchError {
        index: item_index as u32,
        error: ApiError::from(e).detail(),
    }
}

/// Keeps a named snapshot of a running session; it goes on running.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/checkpoints",
    operation_id = "checkpoint_session",
    tag = "rollouts",
    params(("id" = String, Path, description = "Session id")),
    request_body = CheckpointBody,
    responses(
        (status = 201, description = "The checkpoint", body = Checkpoint),
        (status = 400, description = "Bad name", body = ErrorBody),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "Not running, busy, or the name is taken", body = ErrorBody),
    )
)]
pub async fn checkpoint_create(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<CheckpointBody>,
) -> Result<(StatusCode, Json<Checkpoint>), ApiError> {
    let engine = owner.engine.clone();
    let c = run_tracked(&state, async move {
        engine.session_checkpoint(&id, &body.name).await
    })
    .await??;
    Ok((StatusCode::CREATED, Json(c)))
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/checkpoints",
    operation_id = "list_checkpoints",
    tag = "rollouts",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session's checkpoints, oldest first", body = CheckpointList),
        (status = 404, description = "No such session for this key", body = ErrorBody),
    )
)]
pub async fn checkpoint_list(
    owner: Owner,
    PathParam(id): PathParam<String>,
) -> Result<Json<CheckpointList>, ApiError> {
    let checkpoints = blocking(move || owner.engine.session_checkpoints(&id)).await?;
    Ok(Json(CheckpointList { checkpoints }))
}

/// Deletes a checkpoint; sessions forked from it keep what they need of it.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}/checkpoints/{name}",
    operation_id = "delete_checkpoint",
    tag = "rollouts",
    params(
        ("id" = String, Path, description = "Session id"),
        ("name" = String, Path, description = "Checkpoint name"),
    ),
    responses(
        (status = 200, description = "The deleted checkpoint", body = Checkpoint),
        (status = 404, description = "No such session or checkpoint", body = ErrorBody),
    )
)]
pub async fn checkpoint_delete(
    owner: Owner,
    PathParam((id, name)): PathParam<(String, String)>,
) -> Result<Json<Checkpoint>, ApiError> {
    Ok(Json(
        blocking(move || owner.engine.session_checkpoint_delete(&id, &name)).await?,
    ))
}

/// Puts a session back to the snapshot it was made from, or to a checkpoint, keeping its
/// id. A call running in it is cancelled first (its caller gets `cancelled`); a paused or
/// failed session runs again afterwards.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/reset",
    operation_id = "reset_session",
    tag = "rollouts",
    params(("id" = String, Path, description = "Session id")),
    request_body(content = ResetBody, description = "May be left out: back to the origin"),
    responses(
        (status = 200, description = "The reset session", body = ResetOutcome),
        (status = 404, description = "No such session, or no such checkpoint (the message names the known ones)", body = ErrorBody),
        (status = 409, description = "The session is being changed by another call", body = ErrorBody),
    )
)]
pub async fn reset(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    OptionalJsonBody(body): OptionalJsonBody<ResetBody>,
) -> Result<Json<ResetOutcome>, ApiError> {
    let engine = owner.engine.clone();
    let r = run_tracked(&state, async move {
        engine.session_reset(&id, body.checkpoint.as_deref()).await
    })
    .await??;
    Ok(Json(r))
}

/// Runs the template's reward command in the session and returns the number it printed.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/reward",
    operation_id = "reward_session",
    tag = "rollouts",
    params(("id" = String, Path, description = "Session id")),
    request_body(content = RewardBody, description = "May be left out"),
    responses(
        (status = 200, description = "The reward", body = Reward),
        (status = 404, description = "No such session for this key", body = ErrorBody),
        (status = 409, description = "Not running, or the template declares no reward command", body = ErrorBody),
        (status = 422, description = "The command failed or printed no number (`fault`: task); the message quotes its output", body = ErrorBody),
    )
)]
pub async fn reward(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    OptionalJsonBody(body): OptionalJsonBody<RewardBody>,
) -> Result<Json<Reward>, ApiError> {
    limits::env(&body.env)?;
    let (e, i) = (owner.engine.clone(), id.clone());
    let call_limits = blocking(move || e.session_call_limits(&i, "reward")).await?;
    limits::call_timeout(body.timeout_ms, &call_limits, &state.cfg)?;
    let engine = owner.engine.clone();
    let cancel = CancellationToken::new();
    let opts = run_options(body.env, body.timeout_ms, &cancel);
    let guard = cancel.drop_guard();
    let r = run_tracked(
        &state,
        async move { engine.session_reward(&id, opts).await },
    )
    .await?;
    guard.disarm();
    Ok(Json(r?))
}

/// Forks a session into `n` new ones: from a checkpoint, or from its state now (it is
/// checkpointed once and goes on running). Each new session has its own identity and
/// entropy, and resets to the fork point.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/fork",
    operation_id = "fork_session",
    tag = "rollouts",
    params(("id" = String, Path, description = "Session id")),
    request_body = ForkBody,
    responses(
        (status = 200, description = "The new sessions, and any that failed", body = BatchResponse),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 404, description = "No such session or checkpoint", body = ErrorBody),
        (status = 409, description = "Not running (without a checkpoint), or busy", body = ErrorBody),
        (status = 429, description = "More sessions than the key has free sandboxes; nothing was restored", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn fork(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<ForkBody>,
) -> Result<Json<BatchResponse>, ApiError> {
    let n = batch_size(body.n)?;
    let opts = session_options(
        body.idle_timeout_s,
        body.max_lifetime_s,
        body.on_timeout,
        body.checkpointable,
        body.env,
        &state.cfg,
    )?;
    let (e, i) = (owner.engine.clone(), id.clone());
    blocking(move || e.session(&i)).await?;
    let slots = state.slots.acquire_n(&owner, n).await?;
    let engine = owner.engine.clone();
    let started = Instant::now();
    let items = run_tracked(&state, async move {
        let _slots = slots;
        engine
            .session_fork(&id, n as usize, body.checkpoint.as_deref(), &opts)
            .await
    })
    .await??;
    Ok(Json(collect(items, started)))
}

fn collect(items: Vec<BatchItem>, started: Instant) -> BatchResponse {
    let mut out = BatchResponse {
        sessions: Vec::new(),
        errors: Vec::new(),
        batch_ms: 0.0,
    };
    for item in items {
        match item.result {
            Ok(s) => out.sessions.push(s),
            Err(e) => out.errors.push(batch_error(item.index, e)),
        }
    }
    out.batch_ms = started.elapsed().as_secs_f64() * 1000.0;
    out
}

/// Makes `n` sessions from a template, or from a session (a checkpoint of it, its pause
/// snapshot, or its state now). Streamed, each session is a line as soon as it runs.
#[utoipa::path(
    post,
    path = "/v1/sessions/batch",
    operation_id = "batch_sessions",
    tag = "rollouts",
    params(StreamQuery),
    request_body = BatchBody,
    responses(
        (status = 200, description = "The new sessions and any that failed; streamed (`Accept: application/x-ndjson` or `?stream=true`): one BatchStreamEvent per line, `done` last", content(
            (BatchResponse = "application/json"),
            (BatchStreamEvent = "application/x-ndjson"),
        )),
        (status = 400, description = "Bad body (`n` out of range; neither or both of `template` and `session`; `checkpoint` without `session`)", body = ErrorBody),
        (status = 404, description = "No such template, session or checkpoint", body = ErrorBody),
        (status = 429, description = "More sessions than the key has free sandboxes; nothing was restored", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn batch(
    State(state): State<AppState>,
    owner: Owner,
    headers: HeaderMap,
    QueryParams(q): QueryParams<StreamQuery>,
    JsonBody(body): JsonBody<BatchBody>,
) -> Result<Response, ApiError> {
    let n = batch_size(body.n)?;
    let source = match (body.template, body.session, body.checkpoint) {
        (Some(t), None, None) => BatchSource::Template(t),
        (None, Some(id), checkpoint) => BatchSource::Session { id, checkpoint },
        (Some(_), Some(_), _) => {
            return Err(ApiError::bad_request(
                "give one of `template` and `session`, not both",
            ))
        }
        (Some(_), None, Some(_)) => {
            return Err(ApiError::bad_request(
                "`checkpoint` names a session's checkpoint: give `session` with it, not `template`",
            )
            .with_path("checkpoint"))
        }
        (None, None, _) => {
            return Err(ApiError::bad_request(
                "give `template` (sessions from its snapshot) or `session` (from its state or a checkpoint)",
            ))
        }
    };
    let opts = session_options(
        body.idle_timeout_s,
        body.max_lifetime_s,
        body.on_timeout,
        body.checkpointable,
        body.env,
        &state.cfg,
    )?;
    // Unknown sources are refused before any slot is taken.
    let (e, s) = (owner.engine.clone(), source.clone());
    blocking(move || match &s {
        BatchSource::Template(t) => e.ready_template(t).map(|_| ()),
        BatchSource::Session { id, .. } => e.session(id).map(|_| ()),
    })
    .await?;
    let slots = state.slots.acquire_n(&owner, n).await?;
    let engine = owner.engine.clone();
    let started = Instant::now();
    if !wants_stream(&headers, &q) {
        let items = run_tracked(&state, async move {
            let _slots = slots;
            let mut items = Vec::new();
            engine
                .session_batch(&source, n as usize, &opts, |i| items.push(i))
                .await
                .map(|()| items)
        })
        .await??;
        return Ok(Json(collect(items, started)).into_response());
    }
    let (tx, rx) = mpsc::unbounded_channel();
    // A caller that leaves does not stop the batch: its sessions are made and, unused,
    // reaped after their idle timeout like any other.
    let cancel = CancellationToken::new();
    let stream = ndjson(rx, cancel.clone().drop_guard());
    tokio::spawn({
        let state = state.clone();
        async move {
            let r = run_tracked(&state, async move {
                let _slots = slots;
                let (mut created, mut failed) = (0u32, 0u32);
                let sent = engine
                    .session_batch(&source, n as usize, &opts, |item| {
                        let ev = match item.result {
                            Ok(session) => {
                                created += 1;
                                BatchEvent::Session {
                                    index: item.index as u32,
                                    session: Box::new(session),
                                }
                            }
                            Err(e) => {
                                failed += 1;
                                let BatchError { index, error } = batch_error(item.index, e);
                                BatchEvent::Error { index, error }
                            }
                        };
                        let _ = tx.send(ev);
                    })
                    .await;
                let last = match sent {
                    Ok(()) => BatchEvent::Done {
                        created,
                        failed,
                        batch_ms: started.elapsed().as_secs_f64() * 1000.0,
                    },
                    Err(e) => BatchEvent::Aborted {
                        error: ApiError::from(e).detail(),
                    },
                };
                let _ = tx.send(last);
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e.message, "batch task");
            }
        }
    });
    Ok(stream)
}
