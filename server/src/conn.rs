//! The accept loop: HTTP/1.1 connections under a header-read timeout and a cap on open
//! connections, so that clients that connect and send nothing, or send their headers a
//! byte at a time (slowloris), can neither pile up nor starve `/healthz` or invocations.
//!
//! - A connection that has not delivered a whole request head within
//!   [`ServerConfig::header_read_timeout`] of starting to wait for one (a new connection,
//!   or an idle keep-alive one) is closed by hyper.
//! - At most [`ServerConfig::max_connections`] are open. A new connection over the cap
//!   evicts the oldest connection that is not inside a request (a request counts until its
//!   response body is sent, so a streamed exec is never evicted); when every connection is
//!   inside a request, the new one is answered `503` with `Retry-After` and closed.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use crate::ServerConfig;

/// The open connections, oldest first.
#[derive(Default)]
pub(crate) struct Conns {
    max: usize,
    next_id: std::sync::atomic::AtomicU64,
    open: Mutex<BTreeMap<u64, Conn>>,
}

struct Conn {
    /// Requests of this connection in progress (until their response body is sent).
    busy: Arc<AtomicUsize>,
    /// Cancelled to close the connection at once (eviction).
    close: CancellationToken,
}

/// A connection's place under the cap; gives it back when dropped.
struct Admitted {
    conns: Arc<Conns>,
    id: u64,
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl Conns {
    pub(crate) fn new(max: usize) -> Conns {
        Conns {
            max: max.max(1),
            ..Conns::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Conn>> {
        // Single inserts and removals: a poisoned map is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes every connection that is not inside a request (shutdown: a connection that
    /// sends its request head slowly must not hold the server up until its timeout).
    fn close_idle(&self) {
        let mut open = self.lock();
        open.retain(|id, c| {
            let idle = c.busy.load(Ordering::Acquire) == 0;
            if idle {
                debug!(conn = id, "shutting down: closing an idle connection");
                c.close.cancel();
            }
            !idle
        });
    }

    /// Admits a new connection, evicting the oldest idle one if at the cap; `None` when
    /// every open connection is inside a request.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = self.lock();
        if open.len() >= self.max {
            let idle = open
                .iter()
                .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                .map(|(&id, _)| id)?;
            if let Some(c) = open.remove(&idle) {
                debug!(
                    conn = idle,
                    "connection cap reached: closing the oldest idle connection"
                );
                c.close.cancel();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (busy, close) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        open.insert(
            id,
            Conn {
                busy: busy.clone(),
                close: close.clone(),
            },
        );
        Some(Admitted {
            conns: self.clone(),
            id,
            busy,
            close,
        })
    }
}

/// Counts a request as in progress until its response body is gone.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(n: Arc<AtomicUsize>) -> Busy {
        n.fetch_add(1, Ordering::AcqRel);
        Busy(n)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection counted as busy while it is being sent.
struct BusyBody {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts and serves connections until `shutdown`, then lets every connection finish its
/// request in progress; idle ones, and ones still sending a request head, are closed at
/// once.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    router: Router,
    cfg: &ServerConfig,
    conns: Arc<Conns>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true);
    loop {
        let stream = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, mostly: back off instead of spinning.
                    warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(admitted) = conns.admit() else {
            tokio::spawn(refuse(stream, conns.max));
            continue;
        };
        let busy = admitted.busy.clone();
        let router = router.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let busy = Busy::new(busy.clone());
            let router = router.clone();
            async move {
                let resp = router.oneshot(req.map(Body::new)).await;
                resp.map(|r| r.map(|inner| Body::new(BusyBody { inner, _busy: busy })))
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            let close = admitted.close.clone();
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        debug!(error = %e, "connection ended");
                    }
                }
                _ = close.cancelled() => {}
            }
            drop(admitted);
        });
    }
    drop(listener);
    conns.close_idle();
    graceful.shutdown().await;
}

/// Answers a connection over the cap with a 503 and closes it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = format!(
        "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"the server is at its limit of {max} open connections, every one inside a request (thaw serve --max-connections); retry shortly\"}}}}"
    );
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_cap_the_oldest_idle_connection_is_closed() {
        let conns = Arc::new(Conns::new(2));
        let a = conns.admit().unwrap();
        let b = conns.admit().unwrap();
        let busy_a = Busy::new(a.busy.clone());
        // a is inside a request: b, the oldest idle one, makes room.
        let c = conns.admit().unwrap();
        assert!(!a.close.is_cancelled());
        assert!(b.close.is_cancelled());
        assert_eq!(conns.len(), 2);
        // Every open connection inside a request: the new one is refused.
        let busy_c = Busy::new(c.busy.clone());
        assert!(conns.admit().is_none());
        drop(b);
        assert_eq!(conns.len(), 2);
        // Shutdown closes the idle ones only.
        drop(busy_c);
        conns.close_idle();
        assert!(c.close.is_cancelled());
        assert!(!a.close.is_cancelled());
        assert_eq!(conns.len(), 1);
        drop(busy_a);
        drop(c);
        drop(a);
        assert_eq!(conns.len(), 0);
    }
}
