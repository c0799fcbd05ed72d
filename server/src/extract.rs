//! Request extractors whose every rejection is an [`ApiError`] (JSON body, right status),
//! and the bearer-key authentication middleware.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use thaw_platform::keys::KeyRecord;
use thaw_platform::Engine;

use crate::error::ApiError;
use crate::{blocking, AppState};

/// A JSON request body. Unlike `axum::Json`, a bad body is a 400 whose `path` names the
/// offending field (`argv[0]`, `timeout_ms`), and a body over the cap is a JSON 413.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        json_content_type(req.headers())?;
        let limit = state.cfg.max_body_bytes as u64;
        let (parts, body) = req.into_parts();
        let stall = state.cfg.header_read_timeout;
        let bytes = read_body(&parts.headers, body, limit, stall, "request body").await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON request body that may be left out (no body, or only whitespace): the default.
/// For calls whose every field is optional (`reset`, `reward`).
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.cfg.max_body_bytes as u64;
        let stall = state.cfg.header_read_timeout;
        let (parts, body) = req.into_parts();
        let bytes = read_body(&parts.headers, body, limit, stall, "request body").await?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(OptionalJsonBody(T::default()));
        }
        json_content_type(&parts.headers)?;
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

/// A body's declared type, if any, must be JSON.
fn json_content_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or_default();
    let essence = ct.split(';').next().unwrap_or_default().trim();
    if essence != "application/json" && !essence.ends_with("+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected a Content-Type of application/json, got `{ct}`"),
        ));
    }
    Ok(())
}

/// Deserializes a JSON body, reporting where it went wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every body of this API is an object; serde would also accept a struct written as an
    // array (`[1, {}]`), which no client means.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid JSON body: expected a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // The path of the offending field (for an unknown field, the field itself); `.` is
        // the root: a syntax error or a missing top-level field.
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid JSON body at `{path}`: {inner}")).with_path(path)
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// Reads a whole body of at most `limit` bytes: a declared or actual size over it is a 413,
/// a body that stalls for `stall` a 408.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    stall: Duration,
    what: &str,
) -> Result<Bytes, ApiError> {
    if declared_len(headers).is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(what, limit));
    }
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = next_chunk(&mut stream, stall, what).await? {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading {what}: {e}")))?;
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::too_large(what, limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// The next chunk of a body; a 408 when none comes within `stall` (a client that sends its
/// headers, then trickles or withholds its body, must not hold a connection for ever).
pub async fn next_chunk<S: futures_util::Stream + Unpin>(
    stream: &mut S,
    stall: Duration,
    what: &str,
) -> Result<Option<S::Item>, ApiError> {
    tokio::time::timeout(stall, stream.next()).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the {what} stalled: no data came for {} s (thaw serve --header-read-timeout); send the whole body without pausing",
                stall.as_secs_f64()
            ),
        )
    })
}

pub fn declared_len(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Query parameters; a bad query string is a JSON 400.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
    }
}

/// A path parameter; a bad one is a JSON 400.
pub struct PathParam<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParam(p.0))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
    }
}

/// The authenticated caller: its key and the engine scoped to it.
#[derive(Clone)]
pub struct Owner {
    pub key: KeyRecord,
    pub engine: Engine,
}

impl FromRequestParts<AppState> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Set by `authenticate`, which guards every route that takes an `Owner`; missing
        // means a route was mounted outside it, which must not silently run as nobody.
        let key = parts
            .extensions
            .get::<KeyRecord>()
            .cloned()
            .ok_or_else(|| ApiError::internal("route is missing authentication"))?;
        Ok(Owner {
            engine: state.engine.as_owner(&key.id),
            key,
        })
    }
}

/// Middleware: requires `Authorization: Bearer <secret>` naming a live key, and hands the
/// key to the handler.
pub async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let secret = bearer(req.headers())?;
    let engine = state.engine.clone();
    let key = blocking(move || engine.verify_key(&secret))
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized("invalid or revoked API key; create one with `thaw keys create`")
        })?;
    tracing::Span::current().record("key", key.id.as_str());
    req.extensions_mut().insert(key);
    Ok(next.run(req).await)
}

fn bearer(headers: &HeaderMap) -> Result<String, ApiError> {
    let missing = || {
        ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer <key>` (create one with `thaw keys create`)",
        )
    };
    let value = headers.get(AUTHORIZATION).ok_or_else(missing)?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not ASCII"))?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_api::{ExecBody, InvokeBody};

    #[test]
    fn a_wrong_type_names_the_field() {
        let e = parse_json::<InvokeBody>(br#"{"timeout_ms": "soon"}"#)
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.path.as_deref(), Some("timeout_ms"));
        assert!(e.message.contains("timeout_ms"), "{}", e.message);
        let e = parse_json::<ExecBody>(br#"{"argv": ["ls", 3]}"#)
            .err()
            .unwrap();
        assert_eq!(e.path.as_deref(), Some("argv[1]"));
    }

    #[test]
    fn an_unknown_field_is_named() {
        let e = parse_json::<InvokeBody>(br#"{"payload": 1, "timout_ms": 5}"#)
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.path.as_deref(), Some("timout_ms"), "{}", e.message);
        assert!(
            e.message.contains("unknown field `timout_ms`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn syntax_errors_and_trailing_garbage_are_bad_requests() {
        for body in [&b"{"[..], b"", b"{} {}", b"[1]"] {
            let e = parse_json::<InvokeBody>(body).err().unwrap();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body:?}");
        }
        assert!(parse_json::<InvokeBody>(b"{}").is_ok());
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer(&h("bearer  abc ")).unwrap(), "abc");
        assert!(bearer(&h("Basic abc")).is_err());
        assert!(bearer(&h("Bearer")).is_err());
        assert!(bearer(&HeaderMap::new()).is_err());
    }
}
