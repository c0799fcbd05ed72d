//! Handlers of the live-sandbox routes: `thaw ps` and `thaw kill` over the API.
//!
//! A key sees and ends only its own sandboxes; another key's is unknown (404, as an id that
//! does not exist, so ids cannot be probed). An admin key (`thaw keys create --admin`) sees
//! every key's, and its kill-all ends every key's, or one key's with `?key=`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use thaw_api::{ErrorBody, KillList, KillReport, LiveSandbox, SandboxList};
use thaw_platform::live::KilledBy;
use thaw_platform::Engine;

use crate::error::ApiError;
use crate::extract::{Owner, PathParam, QueryParams};
use crate::{blocking, run_tracked, AppState};

/// The caller's view: its own sandboxes, or every key's for an admin key.
fn view(owner: &Owner) -> Engine {
    if owner.key.admin {
        owner.engine.as_admin()
    } else {
        owner.engine.clone()
    }
}

/// The caller's live sandboxes (an admin key: every key's) with what each uses now.
#[utoipa::path(
    get,
    path = "/v1/sandboxes",
    operation_id = "list_sandboxes",
    tag = "sandboxes",
    responses(
        (status = 200, description = "Live sandboxes: invokes and execs in flight and sessions' sandboxes (paused sessions hold none). Figures the host cannot read are null", body = SandboxList),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub async fn list(owner: Owner) -> Result<Json<SandboxList>, ApiError> {
    let engine = view(&owner);
    let sandboxes = blocking(move || engine.live_sandboxes()).await?;
    Ok(Json(SandboxList { sandboxes }))
}

#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}",
    operation_id = "get_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id (`sb-...`) or the id of the session it runs")),
    responses(
        (status = 200, description = "The live sandbox", body = LiveSandbox),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No live sandbox of this key by that id", body = ErrorBody),
    )
)]
pub async fn get(
    owner: Owner,
    PathParam(id): PathParam<String>,
) -> Result<Json<LiveSandbox>, ApiError> {
    let engine = view(&owner);
    Ok(Json(blocking(move || engine.live_sandbox(&id)).await?))
}

/// Ends a sandbox now, whatever it is doing; the call running in it fails with `killed`
/// (410). A session's id ends the session for good, paused or not (`stopped`; only
/// `DELETE` is left for it).
#[utoipa::path(
    post,
    path = "/v1/sandboxes/{id}/kill",
    operation_id = "kill_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id (`sb-...`) or session id")),
    responses(
        (status = 200, description = "Ended: no process of it is left; its files go right after", body = KillReport),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No live sandbox or session of this key by that id", body = ErrorBody),
    )
)]
pub async fn kill(
    State(state): State<AppState>,
    owner: Owner,
    PathParam(id): PathParam<String>,
) -> Result<Json<KillReport>, ApiError> {
    let (engine, by) = (view(&owner), KilledBy::key(&owner.key.id));
    let r = run_tracked(&state, async move { engine.kill(&id, &by).await }).await??;
    Ok(Json(r))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct KillAllQuery {
    /// Admin keys only: end only this key's sandboxes (default: every key's).
    #[serde(default)]
    pub key: Option<String>,
}

/// Ends every live sandbox of the caller's key (an admin key: of every key, or of `key`),
/// running sessions included (they end for good). Paused sessions are left alone: they run
/// nothing.
#[utoipa::path(
    post,
    path = "/v1/sandboxes/kill",
    operation_id = "kill_sandboxes",
    tag = "sandboxes",
    params(KillAllQuery),
    responses(
        (status = 200, description = "What was ended", body = KillList),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "`key` names another key and the caller is not an admin", body = ErrorBody),
    )
)]
pub async fn kill_all(
    State(state): State<AppState>,
    owner: Owner,
    QueryParams(q): QueryParams<KillAllQuery>,
) -> Result<Json<KillList>, ApiError> {
    let engine = match q.key.as_deref() {
        None => view(&owner),
        Some(k) if k == owner.key.id => owner.engine.clone(),
        Some(k) if owner.key.admin => state.engine.as_owner(k),
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "only an admin key (`thaw keys create --admin`) may end another key's sandboxes; leave out `key` to end your own",
            )
            .with_path("key"))
        }
    };
    let by = KilledBy::key(&owner.key.id);
    let killed = run_tracked(&state, async move { engine.kill_all(&by).await }).await??;
    Ok(Json(KillList { killed }))
}
