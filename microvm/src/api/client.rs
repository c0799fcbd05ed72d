//! HTTP/1.1 client for Cloud Hypervisor's REST API over its Unix socket.
//!
//! One connection per request: the VMM's HTTP server is small and a fresh connection means a
//! VMM that died between two calls shows up as a connect error rather than a half-dead
//! keep-alive stream. Every call is bounded by a timeout covering connect, handshake, request
//! and the whole body, because a wedged VMM must never wedge the platform.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;
use tracing::debug;

use super::types::{RestoreConfig, VmConfig, VmInfo, VmSnapshotConfig, VmmPingResponse};

/// Default bound for one API call. Restores of large guests with `Copy` take longer: callers
/// pass their own timeout to [`ApiClient::restore`].
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(10);

/// `vm.boot` loads the kernel and initramfs into guest memory before it answers: it gets at
/// least this long.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable: the shortest wait, in seconds, for any Cloud Hypervisor API call,
/// VMM start, restore, snapshot or guest boot. For slow hosts (nested virtualization,
/// emulation: `make test-microvm` sets it), where the defaults are too short.
pub const PATIENCE_ENV: &str = "THAW_VMM_PATIENCE_S";

/// `d`, or longer if [`PATIENCE_ENV`] says so.
pub fn patience(d: Duration) -> Duration {
    std::env::var(PATIENCE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| d.max(Duration::from_secs_f64(s.min(86_400.0))))
        .unwrap_or(d)
}

/// Largest response body accepted (vm.info echoes the config; a few KiB in practice).
const MAX_BODY: usize = 4 << 20;

/// A non-2xx answer from the VMM. Cloud Hypervisor reports errors as a JSON array of strings,
/// outermost cause first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Cloud Hypervisor {endpoint} failed (HTTP {status}): {}", display_causes(.causes))]
pub struct ApiError {
    pub endpoint: String,
    pub status: u16,
    pub causes: Vec<String>,
}

fn display_causes(causes: &[String]) -> String {
    if causes.is_empty() {
        "no error details in the response".to_owned()
    } else {
        causes.join(": ")
    }
}

impl ApiError {
    /// Builds the error from a raw body: a JSON array of strings (the documented form), a JSON
    /// string, or anything else taken verbatim (trimmed, bounded) so nothing is lost.
    pub fn from_body(endpoint: &str, status: u16, body: &[u8]) -> Self {
        let causes = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect(),
            Ok(serde_json::Value::String(s)) => vec![s],
            Ok(serde_json::Value::Null) => Vec::new(),
            Ok(other) => vec![other.to_string()],
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    Vec::new()
                } else {
                    vec![truncate(text, 4096)]
                }
            }
        };
        ApiError {
            endpoint: endpoint.to_owned(),
            status,
            causes,
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the Cloud Hypervisor API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cloud Hypervisor {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("HTTP exchange with Cloud Hypervisor ({endpoint}) failed: {source}")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Cloud Hypervisor {endpoint} answered with a {len}-byte body, over the {MAX_BODY}-byte limit")]
    BodyTooLarge { endpoint: String, len: usize },
    #[error("cannot encode the {endpoint} request: {source}")]
    Encode {
        endpoint: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cloud Hypervisor {endpoint} answered with an unexpected body ({source}): {body}")]
    Decode {
        endpoint: String,
        #[source]
        source: serde_json::Error,
        body: String,
    },
    #[error("cannot build the {endpoint} request: {message}")]
    BuildRequest { endpoint: String, message: String },
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl ClientError {
    /// Cloud Hypervisor refused because an `OnDemand` restore is still filling the VM's
    /// memory in the background (it refuses to snapshot until then): worth retrying.
    pub fn is_restore_in_progress(&self) -> bool {
        matches!(self, ClientError::Api(e)
            if e.causes.iter().any(|c| c.contains("on-demand memory restore is still in progress")))
    }

    /// The VMM is gone or unreachable (as opposed to refusing a request).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Http { .. } | ClientError::Timeout { .. }
        )
    }
}

/// Client for one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

struct RawResponse {
    status: StatusCode,
    body: Bytes,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
            timeout: patience(DEFAULT_API_TIMEOUT),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub async fn ping(&self) -> Result<VmmPingResponse, ClientError> {
        self.get_json("vmm.ping").await
    }

    pub async fn create(&self, config: &VmConfig) -> Result<(), ClientError> {
        self.put("vm.create", Some(config), self.timeout).await
    }

    pub async fn boot(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.boot", None, self.timeout.max(BOOT_TIMEOUT))
            .await
    }

    pub async fn pause(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.pause", None, self.timeout).await
    }

    pub async fn resume(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.resume", None, self.timeout).await
    }

    /// Writes a snapshot of a paused VM. Bounded by `timeout`: it writes all guest RAM.
    pub async fn snapshot(
        &self,
        config: &VmSnapshotConfig,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.put("vm.snapshot", Some(config), timeout).await
    }

    /// Restores into this (empty) VMM. Bounded by `timeout`: a `Copy` restore reads all RAM.
    pub async fn restore(
        &self,
        config: &RestoreConfig,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.put("vm.restore", Some(config), timeout).await
    }

    pub async fn info(&self) -> Result<VmInfo, ClientError> {
        self.get_json("vm.info").await
    }

    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.shutdown", None, self.timeout).await
    }

    pub async fn delete(&self) -> Result<(), ClientError> {
        self.put::<()>("vm.delete", None, self.timeout).await
    }

    /// Ends the VMM process. The connection may drop before an answer: callers treat an
    /// unreachable VMM after this call as success.
    pub async fn vmm_shutdown(&self) -> Result<(), ClientError> {
        self.put::<()>("vmm.shutdown", None, self.timeout).await
    }

    async fn get_json<T: DeserializeOwned>(&self, endpoint: &str) -> Result<T, ClientError> {
        let resp = self
            .request(endpoint, Method::GET, None, self.timeout)
            .await?;
        check_status(endpoint, &resp)?;
        serde_json::from_slice(&resp.body).map_err(|source| ClientError::Decode {
            endpoint: endpoint.to_owned(),
            source,
            body: truncate(&String::from_utf8_lossy(&resp.body), 1024),
        })
    }

    async fn put<B: Serialize>(
        &self,
        endpoint: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|source| ClientError::Encode {
                endpoint: endpoint.to_owned(),
                source,
            })?),
            None => None,
        };
        let resp = self.request(endpoint, Method::PUT, body, timeout).await?;
        check_status(endpoint, &resp)
    }

    async fn request(
        &self,
        endpoint: &str,
        method: Method,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RawResponse, ClientError> {
        debug!(endpoint, %method, "cloud-hypervisor api call");
        match tokio::time::timeout(timeout, self.exchange(endpoint, method, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                endpoint: endpoint.to_owned(),
                timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        endpoint: &str,
        method: Method,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let http_err = |source| ClientError::Http {
            endpoint: endpoint.to_owned(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        // The connection task ends when the response is read or the stream fails; aborting it
        // on return keeps a timed-out exchange from lingering.
        let conn_task = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));

        let mut builder = Request::builder()
            .method(method)
            // Origin-form request target plus a Host header, as `curl --unix-socket` sends:
            // an absolute-form URI is legal HTTP/1.1 but not every small server parses it.
            .uri(format!("/api/v1/{endpoint}"))
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        let payload = match body {
            Some(b) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = builder
            .body(Full::new(payload))
            .map_err(|e| ClientError::BuildRequest {
                endpoint: endpoint.to_owned(),
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http_err)?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(h) => http_err(*h),
                Err(_) => ClientError::BodyTooLarge {
                    endpoint: endpoint.to_owned(),
                    len: MAX_BODY,
                },
            })?
            .to_bytes();
        drop(conn_task);
        Ok(RawResponse { status, body })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn check_status(endpoint: &str, resp: &RawResponse) -> Result<(), ClientError> {
    if resp.status.is_success() {
        Ok(())
    } else {
        Err(ApiError::from_body(endpoint, resp.status.as_u16(), &resp.body).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_arrays_become_cause_chains() {
        let body = br#"["Error from API","The VM could not be restored","Failed to open memory file: No such file or directory (os error 2)"]"#;
        let e = ApiError::from_body("vm.restore", 500, body);
        assert_eq!(e.causes.len(), 3);
        assert_eq!(
            e.to_string(),
            "Cloud Hypervisor vm.restore failed (HTTP 500): Error from API: The VM could not be \
             restored: Failed to open memory file: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn non_json_and_empty_bodies_are_kept() {
        let e = ApiError::from_body("vm.boot", 405, b"Method Not Allowed\n");
        assert_eq!(e.causes, vec!["Method Not Allowed"]);
        let e = ApiError::from_body("vm.pause", 404, b"");
        assert!(e.causes.is_empty());
        assert!(e.to_string().contains("HTTP 404"), "{e}");
        let e = ApiError::from_body("vm.pause", 500, br#""single""#);
        assert_eq!(e.causes, vec!["single"]);
        let e = ApiError::from_body("vm.pause", 500, br#"["a", 7]"#);
        assert_eq!(e.causes, vec!["a", "7"]);
    }
}
