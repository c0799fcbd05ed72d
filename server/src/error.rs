//! Errors as the API shows them: a status and an [`ErrorBody`], whose `message` is the
//! engine's one-line message (the same words the CLI prints for a local error).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use thaw_api::{ErrorBody, ErrorDetail, Fault};
use thaw_platform::Error as E;
use thaw_protocol::ErrorCode;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The bad field of a request body.
    pub path: Option<String>,
    /// Seconds after which a retry may succeed (`Retry-After`, with 429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            path: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn with_path(mut self, path: impl Into<String>) -> ApiError {
        self.path = Some(path.into());
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn too_large(what: &str, limit: u64) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{what} too large: the limit is {limit} bytes"),
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn detail(&self) -> ErrorDetail {
        let fault = fault_of(self.status, self.code);
        ErrorDetail {
            code: self.code.to_string(),
            message: self.message.clone(),
            path: self.path.clone(),
            fault,
            // The machine lacks something, or its disk is full: the operator must act.
            retryable: fault == Fault::Infrastructure
                && !matches!(
                    self.code,
                    "missing_dependency" | "disk_full" | "audit_unavailable"
                ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, code = self.code, message = %self.message, "request refused");
        }
        let mut resp = (
            self.status,
            axum::Json(ErrorBody {
                error: self.detail(),
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750: tells the client which scheme to use.
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"thaw\""),
            );
        }
        resp
    }
}

impl From<E> for ApiError {
    fn from(e: E) -> ApiError {
        let (status, code) = classify(&e);
        let err = ApiError::new(status, code, e.to_string());
        match e {
            E::BadNetwork { path, .. } => err.with_path(path),
            _ => err,
        }
    }
}

/// Whose failure an error is, from its code (the task's) or status (5xx, 429: the
/// infrastructure's; any other 4xx: the caller's). What a rollout worker needs to decide
/// between scoring a failure and retrying it.
pub fn fault_of(status: StatusCode, code: &str) -> Fault {
    match code {
        // The task or the template's code did it.
        "reward_not_a_number" | "output_flood" | "host_timeout" | "handler_failed" => Fault::Task,
        // The sandbox died under the call.
        "session_lost" => Fault::Infrastructure,
        // Ended on purpose by `thaw kill` (the key's own or an operator's): a retry would
        // undo that decision.
        "killed" => Fault::Caller,
        // The template must be deployed again.
        "snapshot_corrupt" => Fault::Caller,
        _ if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
            Fault::Infrastructure
        }
        _ => Fault::Caller,
    }
}

/// Status and code of every engine error. Exhaustive on purpose: a new variant must be
/// given a status here before the server compiles.
pub fn classify(e: &E) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        E::BadTemplate { .. } => (S::BAD_REQUEST, "bad_template"),
        E::BadPayload(_) => (S::BAD_REQUEST, "bad_payload"),
        E::BadNetwork { .. } => (S::BAD_REQUEST, "bad_network"),
        E::Egress { .. } => (S::INTERNAL_SERVER_ERROR, "egress"),
        E::UnknownTemplate { .. } => (S::NOT_FOUND, "unknown_template"),
        E::UnknownSession { .. } => (S::NOT_FOUND, "unknown_session"),
        E::NotFound(_) => (S::NOT_FOUND, "not_found"),
        E::TemplateNotReady { .. } => (S::CONFLICT, "template_not_ready"),
        // The template must be deployed again: a state conflict, not a server fault.
        E::SnapshotCorrupt { .. } => (S::CONFLICT, "snapshot_corrupt"),
        E::SessionConflict { .. } => (S::CONFLICT, "session_conflict"),
        E::SessionBusy { .. } => (S::CONFLICT, "session_busy"),
        E::SessionLost { .. } => (S::BAD_GATEWAY, "session_lost"),
        E::ResetCancelled { .. } => (S::CONFLICT, "cancelled"),
        // The sandbox is gone, on purpose (`thaw kill`).
        E::Killed { .. } => (S::GONE, "killed"),
        E::UnknownCheckpoint { .. } => (S::NOT_FOUND, "unknown_checkpoint"),
        E::CheckpointExists { .. } => (S::CONFLICT, "checkpoint_exists"),
        E::InvalidName { .. } => (S::BAD_REQUEST, "bad_request"),
        E::NoRewardCommand { .. } => (S::CONFLICT, "no_reward_command"),
        E::RewardNotANumber { .. } => (S::UNPROCESSABLE_ENTITY, "reward_not_a_number"),
        E::Conflict(_) => (S::CONFLICT, "conflict"),
        E::TooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "too_large"),
        // The uploaded template is well-formed but its own build or warm-up fails.
        E::SetupFailed { .. } => (S::UNPROCESSABLE_ENTITY, "setup_failed"),
        E::BuildRefused(_) => (S::UNPROCESSABLE_ENTITY, "build_refused"),
        E::WarmupFailed(_) => (S::UNPROCESSABLE_ENTITY, "warmup_failed"),
        E::Guest { code, .. } => match code {
            ErrorCode::BadRequest => (S::BAD_REQUEST, "guest_bad_request"),
            ErrorCode::NotFound => (S::NOT_FOUND, "guest_not_found"),
            ErrorCode::PermissionDenied => (S::FORBIDDEN, "guest_permission_denied"),
            // No such program, not executable: the caller's argv is wrong.
            ErrorCode::SpawnFailed => (S::UNPROCESSABLE_ENTITY, "spawn_failed"),
            ErrorCode::HandlerFailed => (S::UNPROCESSABLE_ENTITY, "handler_failed"),
            ErrorCode::UnsupportedVersion
            | ErrorCode::Io
            | ErrorCode::NoHandler
            | ErrorCode::Internal => (S::INTERNAL_SERVER_ERROR, "guest_error"),
        },
        // The host lacks something (criu, runc, guest-init): the operator must act.
        E::MissingDependency { .. } => (S::SERVICE_UNAVAILABLE, "missing_dependency"),
        E::DiskFull { .. } => (S::INSUFFICIENT_STORAGE, "disk_full"),
        E::Runtime { .. } => (S::INTERNAL_SERVER_ERROR, "runtime"),
        E::NotReady { .. } => (S::INTERNAL_SERVER_ERROR, "sandbox_not_ready"),
        E::Agent { .. } => (S::INTERNAL_SERVER_ERROR, "agent"),
        // The sandbox broke the host's limits (its guest-init did not enforce them).
        E::HostTimeout { .. } => (S::GATEWAY_TIMEOUT, "host_timeout"),
        E::OutputFlood { .. } => (S::BAD_GATEWAY, "output_flood"),
        E::Snapshot(_) => (S::INTERNAL_SERVER_ERROR, "snapshot_store"),
        E::Criu(_) => (S::INTERNAL_SERVER_ERROR, "criu"),
        E::Vm(_) => (S::INTERNAL_SERVER_ERROR, "vmm"),
        E::GuestImage(_) => (S::INTERNAL_SERVER_ERROR, "guest_image"),
        E::Store { .. } => (S::INTERNAL_SERVER_ERROR, "metadata_store"),
        E::Io { .. } => (S::INTERNAL_SERVER_ERROR, "io"),
        E::Other(_) => (S::INTERNAL_SERVER_ERROR, "internal"),
        // No new work runs unaudited: the operator must make the log writable again.
        E::Audit(thaw_platform::audit::AuditError::Unavailable { .. }) => {
            (S::SERVICE_UNAVAILABLE, "audit_unavailable")
        }
        E::Audit(thaw_platform::audit::AuditError::Read { .. }) => {
            (S::INTERNAL_SERVER_ERROR, "audit_read")
        }
        // Nobody reads it (the client is gone); 499 as nginx logs a client that left.
        E::Cancelled => (S::from_u16(499).unwrap_or(S::REQUEST_TIMEOUT), "cancelled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn status(e: E) -> u16 {
        classify(&e).0.as_u16()
    }

    #[test]
    fn every_error_has_the_documented_status() {
        let s = String::new;
        assert_eq!(
            status(E::BadTemplate {
                file: PathBuf::from("t"),
                message: s()
            }),
            400
        );
        assert_eq!(status(E::BadPayload(s())), 400);
        assert_eq!(
            status(E::UnknownTemplate {
                name: s(),
                known: vec![]
            }),
            404
        );
        assert_eq!(status(E::UnknownSession { id: s() }), 404);
        assert_eq!(status(E::NotFound(s())), 404);
        assert_eq!(
            status(E::TemplateNotReady {
                name: s(),
                state: s(),
                hint: s()
            }),
            409
        );
        assert_eq!(
            status(E::SnapshotCorrupt {
                template: s(),
                message: s()
            }),
            409
        );
        assert_eq!(
            status(E::SessionConflict {
                id: s(),
                state: s(),
                action: s(),
                hint: s()
            }),
            409
        );
        assert_eq!(status(E::SessionBusy { id: s(), what: s() }), 409);
        assert_eq!(status(E::Conflict(s())), 409);
        assert_eq!(
            status(E::TooLarge {
                what: s(),
                size: 2,
                limit: 1
            }),
            413
        );
        assert_eq!(
            status(E::SetupFailed {
                command: s(),
                status: s(),
                tail: s()
            }),
            422
        );
        assert_eq!(status(E::WarmupFailed(s())), 422);
        let guest = |code| E::Guest {
            sandbox: s(),
            code,
            message: s(),
        };
        assert_eq!(status(guest(ErrorCode::NotFound)), 404);
        assert_eq!(status(guest(ErrorCode::PermissionDenied)), 403);
        assert_eq!(status(guest(ErrorCode::BadRequest)), 400);
        assert_eq!(status(guest(ErrorCode::SpawnFailed)), 422);
        assert_eq!(status(guest(ErrorCode::Internal)), 500);
        assert_eq!(
            status(E::MissingDependency {
                what: s(),
                fix: s()
            }),
            503
        );
        assert_eq!(
            status(E::DiskFull {
                context: s(),
                path: PathBuf::new()
            }),
            507
        );
        assert_eq!(
            status(E::Runtime {
                command: s(),
                message: s()
            }),
            500
        );
        assert_eq!(status(E::Criu(s())), 500);
        assert_eq!(status(E::Other(s())), 500);
        assert_eq!(
            status(E::Io {
                context: s(),
                source: std::io::Error::other("x")
            }),
            500
        );
    }

    #[test]
    fn a_killed_call_is_gone_the_callers_doing_and_not_retried() {
        let a = ApiError::from(E::Killed {
            what: "sandbox sb-1".into(),
            by: Some("k1".into()),
        });
        assert_eq!((a.status, a.code), (StatusCode::GONE, "killed"));
        let d = a.detail();
        assert_eq!(d.fault, Fault::Caller);
        assert!(!d.retryable);
        assert!(
            d.message.contains("thaw kill") && d.message.contains("k1"),
            "{}",
            d.message
        );
    }

    #[test]
    fn the_message_is_the_engines_one_line_message() {
        let e = E::UnknownTemplate {
            name: "nope".into(),
            known: vec!["shell".into()],
        };
        let line = e.to_string();
        let a = ApiError::from(e);
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert_eq!(a.code, "unknown_template");
        assert_eq!(a.message, line);
        assert!(!a.message.contains('\n'));
    }

    #[tokio::test]
    async fn unauthorized_responses_name_the_scheme() {
        let r = ApiError::unauthorized("no key").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers().get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer realm=\"thaw\""
        );
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.error.code, "unauthorized");
        assert_eq!(v.error.message, "no key");
    }
}
