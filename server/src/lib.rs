//! `thaw serve`: the engine behind an HTTP API with bearer API keys.
//!
//! The contract (routes, bodies, streams, errors) is in the `thaw-api` crate, and
//! `/openapi.json` is generated from the handlers themselves.
//!
//! Sandboxes must never leak, so no engine call runs inside a request's own future: hyper
//! drops that future when the client disconnects, and a dropped invoke would skip the
//! sandbox's teardown. Every engine call runs in a task of [`AppState::tasks`], which the
//! request awaits and which [`serve`] lets finish before it returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use thaw_platform::Engine;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower_http::trace::TraceLayer;
use tracing::{info, warn};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod audit;
mod conn;
mod error;
mod extract;
mod limits;
mod metrics;
mod rollouts;
mod routes;
mod sandboxes;
mod sessions;
mod slots;
pub mod upload;

pub use audit::{filter_for as audit_filter, parse_head as parse_audit_head};
pub use error::{classify, ApiError};
pub use metrics::Metrics;

/// Default address: loopback only, so a fresh install exposes nothing to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen; port 0 picks a free port (see [`bind`]).
    pub listen: SocketAddr,
    /// Largest JSON body: a maximal invoke payload plus room for the rest of the body.
    pub max_body_bytes: usize,
    /// Largest template upload (tar).
    pub max_upload_bytes: u64,
    /// How often session timeouts are enforced.
    pub reaper_interval: Duration,
    /// Sandboxes kept prepared per snapshot in use ([`Engine::keep_prepared`]).
    pub prepared: usize,
    /// Rollout sessions' sandboxes kept restored ahead per origin in use
    /// ([`Engine::keep_spares`]): what makes a reset cost a hand-over instead of a restore.
    pub spares: usize,
    /// How long a connection may take to send a whole request head, counted from when the
    /// server starts waiting for one (a new or an idle keep-alive connection).
    pub header_read_timeout: Duration,
    /// Open connections at most; over it, the oldest idle one is closed (see `conn`).
    pub max_connections: usize,
    /// Largest `timeout_ms` a call may ask for (a template's `limits.timeout_s` caps it too).
    pub max_call_timeout: Duration,
    /// Largest session `idle_timeout_s`.
    pub max_session_idle: Duration,
    /// Largest session `max_lifetime_s`.
    pub max_session_lifetime: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            max_body_bytes: thaw_platform::engine::MAX_PAYLOAD as usize + (64 << 10),
            max_upload_bytes: 256 << 20,
            reaper_interval: Duration::from_secs(15),
            prepared: 2,
            spares: 2,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_call_timeout: Duration::from_secs(3600),
            max_session_idle: Duration::from_secs(24 * 3600),
            max_session_lifetime: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}. Fix: pick another address with --listen, or stop what holds it")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Serve(#[source] std::io::Error),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    pub cfg: Arc<ServerConfig>,
    slots: Arc<slots::Slots>,
    conns: Arc<conn::Conns>,
    tasks: TaskTracker,
    openapi: Arc<utoipa::openapi::OpenApi>,
}

/// Binds the configured address (port 0: a free one); `local_addr()` tells which.
pub async fn bind(cfg: &ServerConfig) -> Result<TcpListener> {
    TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: cfg.listen,
            source,
        })
}

/// Serves the API on `cfg.listen` until `shutdown` completes.
pub async fn serve(
    engine: Engine,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = bind(&cfg).await?;
    serve_on(listener, engine, cfg, shutdown).await
}

/// Serves the API on an already bound listener until `shutdown` completes, then waits for
/// in-flight engine calls (their sandboxes are torn down, never abandoned).
pub async fn serve_on(
    listener: TcpListener,
    engine: Engine,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    upload::sweep_sources(&engine);
    engine.keep_prepared(cfg.prepared);
    engine.keep_spares(cfg.spares);
    let (app, state) = app(engine, cfg)?;
    let addr = listener.local_addr().map_err(Error::Serve)?;
    info!(%addr, "thaw API listening");
    let stop = tokio_util::sync::CancellationToken::new();
    let reaper = tokio::spawn(reaper(state.clone(), stop.clone()));
    conn::accept_loop(listener, app, &state.cfg, state.conns.clone(), shutdown).await;
    info!("shutting down: waiting for in-flight calls");
    stop.cancel();
    if let Err(e) = reaper.await {
        warn!(error = %e, "session reaper ended abnormally");
    }
    state.tasks.close();
    state.tasks.wait().await;
    state.engine.close().await;
    info!("shut down");
    Ok(())
}

/// The application router and its state.
pub fn app(engine: Engine, cfg: ServerConfig) -> Result<(Router, AppState)> {
    let (public, public_doc) = public_routes().split_for_parts();
    let (protected, protected_doc) = protected_routes().split_for_parts();
    let mut doc = ApiDoc::openapi();
    doc.merge(public_doc);
    doc.merge(protected_doc);
    let metrics = Arc::new(Metrics::new()?);
    let state = AppState {
        engine,
        metrics: metrics.clone(),
        conns: Arc::new(conn::Conns::new(cfg.max_connections)),
        cfg: Arc::new(cfg),
        slots: Arc::default(),
        tasks: TaskTracker::new(),
        openapi: Arc::new(doc),
    };
    let protected = protected.route_layer(middleware::from_fn_with_state(
        state.clone(),
        extract::authenticate,
    ));
    let router = public
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        .layer(middleware::from_fn_with_state(metrics, count_requests))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map(|m| m.as_str())
                .unwrap_or("unmatched");
            tracing::info_span!(
                "http",
                method = %req.method(),
                route,
                key = tracing::field::Empty
            )
        }));
    Ok((router, state))
}

/// The OpenAPI document of every route (what `/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(public_routes().split_for_parts().1);
    doc.merge(protected_routes().split_for_parts().1);
    doc
}

fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(routes::healthz))
}

fn protected_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(routes::metrics))
        .routes(routes!(routes::openapi_json))
        .routes(routes!(routes::deploy_template, routes::list_templates))
        .routes(routes!(routes::get_template, routes::delete_template))
        .routes(routes!(routes::invoke))
        .routes(routes!(routes::exec))
        .routes(routes!(sessions::create, sessions::list))
        .routes(routes!(sessions::get, sessions::delete))
        .routes(routes!(sessions::exec))
        .routes(routes!(sessions::invoke))
        .routes(routes!(sessions::write_file, sessions::read_file))
        .routes(routes!(sessions::pause))
        .routes(routes!(sessions::resume))
        .routes(routes!(sessions::extend))
        .routes(routes!(
            rollouts::checkpoint_create,
            rollouts::checkpoint_list
        ))
        .routes(routes!(rollouts::checkpoint_delete))
        .routes(routes!(rollouts::reset))
        .routes(routes!(rollouts::fork))
        .routes(routes!(rollouts::batch))
        .routes(routes!(rollouts::reward))
        .routes(routes!(sandboxes::list))
        .routes(routes!(sandboxes::get))
        .routes(routes!(sandboxes::kill))
        .routes(routes!(sandboxes::kill_all))
        .routes(routes!(audit::list))
        .routes(routes!(audit::verify))
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "thaw",
        description = "Isolated sandboxes for agent tasks, restored from a snapshot of a warm sandbox. Every route but /healthz needs `Authorization: Bearer <key>` (`thaw keys create`)."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "service", description = "Health, metrics and this document"),
        (name = "templates", description = "Publish templates; invoke and exec in fresh sandboxes"),
        (name = "sessions", description = "Long-lived sandboxes: exec, files, pause and resume"),
        (name = "sandboxes", description = "Live sandboxes and what they use (`thaw ps`); ending them now (`thaw kill`)"),
        (name = "audit", description = "The audit log: who did what, to which sandbox, when; and its chain's verification"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from `thaw keys create` (thaw_<id>_<secret>)",
                    ))
                    .build(),
            ),
        );
    }
}

/// Runs an engine call to completion in a tracked task, whether or not the request that
/// started it is still waiting (see the crate docs).
pub(crate) async fn run_tracked<T: Send + 'static>(
    state: &AppState,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    state
        .tasks
        .spawn(fut)
        .await
        .map_err(|e| ApiError::internal(format!("engine task failed: {e}")))
}

/// Runs a synchronous engine call (sled, snapshot store) off the async workers: these may
/// wait on another process's database lock.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> thaw_platform::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("engine task failed: {e}")))?
        .map_err(ApiError::from)
}

/// Pauses or stops sessions past their timeouts, every `reaper_interval`, until `stop`.
/// A pass in progress is finished, not abandoned: abandoning a pause midway would leave
/// the session for crash recovery.
async fn reaper(state: AppState, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(state.cfg.reaper_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Checked first: no new pass starts once shutdown began.
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let engine = state.engine.clone();
        let span = tracing::info_span!("reaper");
        let pass = tracing::Instrument::instrument(
            async move { engine.enforce_session_timeouts().await },
            span,
        );
        match state.tasks.spawn(pass).await {
            Ok(Ok(changed)) => {
                for s in changed {
                    info!(session = %s.id, owner = %s.owner, state = s.state.as_str(), "session timed out");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "enforcing session timeouts"),
            Err(e) => warn!(error = %e, "session reaper task failed"),
        }
    }
}

/// Counts requests by route template (never the raw path, which would explode the label
/// set) and status.
async fn count_requests(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    resp
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!(
            "no route {} {}; /openapi.json lists the routes",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}; /openapi.json lists the routes",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    fn doc() -> Value {
        serde_json::to_value(super::openapi()).unwrap()
    }

    /// Every operation of the document: (method, path, operation).
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if ["get", "put", "post", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    ops.push((method.clone(), path.clone(), op.clone()));
                }
            }
        }
        ops
    }

    #[test]
    fn every_operation_has_its_own_operation_id() {
        let doc = doc();
        let mut seen = BTreeSet::new();
        for (method, path, op) in operations(&doc) {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(
                seen.insert(id.to_string()),
                "operationId {id} of {method} {path} is not unique"
            );
        }
        for id in [
            "exec_template",
            "invoke_template",
            "exec_session",
            "invoke_session",
            "deploy_template",
            "read_session_file",
            "write_session_file",
            "checkpoint_session",
            "list_checkpoints",
            "delete_checkpoint",
            "reset_session",
            "fork_session",
            "batch_sessions",
            "reward_session",
            "list_sandboxes",
            "get_sandbox",
            "kill_sandbox",
            "kill_sandboxes",
        ] {
            assert!(seen.contains(id), "no operation {id}: {seen:?}");
        }
    }

    #[test]
    fn binary_bodies_are_binary_strings() {
        let doc = doc();
        let binary = json!({"type": "string", "format": "binary"});
        let p = &doc["paths"];
        assert_eq!(
            p["/v1/templates"]["post"]["requestBody"]["content"]["application/x-tar"]["schema"],
            binary
        );
        let files = &p["/v1/sessions/{id}/files"];
        assert_eq!(
            files["put"]["requestBody"]["content"]["application/octet-stream"]["schema"],
            binary
        );
        assert_eq!(
            files["get"]["responses"]["200"]["content"]["application/octet-stream"]["schema"],
            binary
        );
        // No body anywhere is described as an array of byte values.
        for (method, path, op) in operations(&doc) {
            let mut contents: Vec<&Value> = vec![&op["requestBody"]["content"]];
            if let Some(rs) = op["responses"].as_object() {
                contents.extend(rs.values().map(|r| &r["content"]));
            }
            for c in contents.iter().filter_map(|c| c.as_object()) {
                for (ct, media) in c {
                    let s = &media["schema"];
                    assert!(
                        !(s["type"] == "array" && s["items"]["type"] == "integer"),
                        "{method} {path} {ct}: bytes as an array of integers: {s}"
                    );
                }
            }
        }
    }

    /// Each NDJSON stream is a oneOf of its own events, one named schema per event with an
    /// `event` discriminator.
    #[test]
    fn each_stream_lists_its_own_events() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for (stream, events, routes) in [
            (
                "ExecStreamEvent",
                &["stdout", "stderr", "exit", "error"][..],
                &["/v1/templates/{name}/exec", "/v1/sessions/{id}/exec"][..],
            ),
            (
                "InvokeStreamEvent",
                &["stderr", "result", "error"][..],
                &["/v1/templates/{name}/invoke", "/v1/sessions/{id}/invoke"][..],
            ),
            (
                "BatchStreamEvent",
                &["session", "error", "done", "aborted"][..],
                &["/v1/sessions/batch"][..],
            ),
        ] {
            for route in routes {
                let content = &doc["paths"][route]["post"]["responses"]["200"]["content"];
                assert_eq!(
                    content["application/x-ndjson"]["schema"]["$ref"],
                    format!("#/components/schemas/{stream}"),
                    "{route}: {content}"
                );
                assert!(content["application/json"]["schema"]["$ref"].is_string());
            }
            let s = &schemas[stream];
            assert_eq!(s["discriminator"]["propertyName"], "event", "{stream}: {s}");
            let refs: Vec<&str> = s["oneOf"]
                .as_array()
                .unwrap_or_else(|| panic!("{stream} is not a oneOf: {s}"))
                .iter()
                .map(|r| r["$ref"].as_str().unwrap())
                .collect();
            assert_eq!(refs.len(), events.len(), "{stream}: {refs:?}");
            for (event, r) in events.iter().zip(&refs) {
                assert_eq!(s["discriminator"]["mapping"][*event], *r, "{stream}");
                let name = r.strip_prefix("#/components/schemas/").unwrap();
                let e = &schemas[name];
                assert_eq!(e["type"], "object", "{name}: {e}");
                let tag = &e["properties"]["event"];
                assert_eq!(tag["type"], "string", "{name}: {e}");
                assert_eq!(tag["enum"], json!([event]), "{name}: {e}");
                assert!(
                    e["required"].as_array().unwrap().contains(&json!("event")),
                    "{name}: {e}"
                );
            }
        }
        // Output chunks: text or base64, never null.
        for name in ["StdoutEvent", "StderrEvent"] {
            let p = &schemas[name]["properties"];
            assert_eq!(p["data"]["type"], "string", "{name}: {p}");
            assert_eq!(p["data_b64"]["type"], "string", "{name}: {p}");
        }
    }
}
