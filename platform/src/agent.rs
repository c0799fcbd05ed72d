//! Host side of the guest-init protocol: one connection per exchange, so that a dropped
//! future (client went away, timeout) closes the socket, which guest-init treats as cancel.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use thaw_protocol::frame::{read_frame_async, write_frame_async};
use thaw_protocol::{
    ExecRequest, InvokeRequest, InvokeStatus, Outcome, Request, Response, Stream, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};

pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentStream for T {}

pub type BoxStream = Pin<Box<dyn AgentStream>>;

/// How to reach a sandbox's guest-init.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Container tier: guest-init's abstract socket in the sandbox's network namespace.
    Netns(crate::container::channel::NetnsChannel),
    /// A socket file in a directory only the host writes (a guest double in tests).
    Unix(PathBuf),
    /// microvm tier: Cloud Hypervisor's hybrid vsock socket (`CONNECT <port>` handshake).
    HybridVsock { socket: PathBuf, port: u32 },
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub sandbox: String,
    pub endpoint: Endpoint,
}

/// What an exec produced (output also went to the callback as it came).
#[derive(Debug, Clone)]
pub struct ExecDone {
    pub outcome: Outcome,
    pub duration_ms: u64,
    pub truncated: bool,
}

/// The result of one invocation as the guest reported it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvokeDone {
    pub status: InvokeStatus,
    pub result: Option<serde_json::Value>,
    pub raw_output: Option<String>,
    pub stderr_tail: String,
    pub outcome: Option<Outcome>,
    pub duration_ms: u64,
    pub truncated: bool,
}

impl Agent {
    pub fn new(sandbox: impl Into<String>, endpoint: Endpoint) -> Agent {
        Agent {
            sandbox: sandbox.into(),
            endpoint,
        }
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Agent {
            sandbox: self.sandbox.clone(),
            message: message.into(),
        }
    }

    pub async fn connect(&self) -> Result<BoxStream> {
        match &self.endpoint {
            Endpoint::Netns(ch) => Ok(Box::pin(ch.connect(&self.sandbox).await?)),
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| self.err(format!("connect {}: {e}", path.display())))?;
                Ok(Box::pin(s))
            }
            Endpoint::HybridVsock { socket, port } => {
                // The handshake's bound: a live VMM answers at once; a wedged one must not
                // hang the call (the protocol exchange has its own limits).
                let s = thaw_microvm::vsock::connect(socket, *port, Duration::from_secs(10))
                    .await
                    .map_err(|e| self.err(format!("vsock {}: {e}", socket.display())))?;
                Ok(Box::pin(s))
            }
        }
    }

    /// Sends one request and returns its terminal response, turning guest errors into
    /// [`Error::Guest`].
    pub async fn call(&self, req: &Request) -> Result<Response> {
        let mut s = self.connect().await?;
        self.exchange(&mut s, req, |_| {}).await
    }

    /// Sends `reqs` down one connection without waiting between them, then collects each
    /// one's terminal response in order: one connection and one round trip for a batch of
    /// quick requests (clone hygiene). The first guest error ends the batch.
    pub async fn call_all(&self, reqs: &[Request]) -> Result<Vec<Response>> {
        let mut s = self.connect().await?;
        for req in reqs {
            write_frame_async(&mut s, req)
                .await
                .map_err(|e| self.err(format!("send: {e}")))?;
        }
        let mut out = Vec::with_capacity(reqs.len());
        for _ in reqs {
            out.push(self.receive(&mut s, |_| {}).await?);
        }
        Ok(out)
    }

    async fn exchange(
        &self,
        s: &mut BoxStream,
        req: &Request,
        mut on_partial: impl FnMut(Response),
    ) -> Result<Response> {
        write_frame_async(s, req)
            .await
            .map_err(|e| self.err(format!("send: {e}")))?;
        self.receive(s, &mut on_partial).await
    }

    /// Reads responses until the terminal one, passing partial ones (streamed output) on.
    async fn receive(
        &self,
        s: &mut BoxStream,
        mut on_partial: impl FnMut(Response),
    ) -> Result<Response> {
        loop {
            let resp: Response = read_frame_async(s).await.map_err(|e| {
                if e.is_closed() {
                    self.err("guest-init closed the connection (sandbox died or was killed)")
                } else {
                    self.err(format!("receive: {e}"))
                }
            })?;
            if let Response::Error { code, message } = resp {
                return Err(Error::Guest {
                    sandbox: self.sandbox.clone(),
                    code,
                    message,
                });
            }
            if resp.is_terminal() {
                return Ok(resp);
            }
            on_partial(resp);
        }
    }

    /// Polls until guest-init answers a ping (it may still be starting).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Response> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_micros(500);
        loop {
            match self.call(&Request::Ping).await {
                Ok(pong @ Response::Pong { .. }) => return Ok(pong),
                Ok(other) => return Err(self.err(format!("unexpected answer to ping: {other:?}"))),
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(Error::NotReady {
                            sandbox: self.sandbox.clone(),
                            timeout_ms: timeout.as_millis() as u64,
                            log: format!(" (last error: {e})"),
                        });
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    pub async fn hello(&self) -> Result<()> {
        match self
            .call(&Request::Hello {
                version: PROTOCOL_VERSION,
            })
            .await?
        {
            Response::Hello { .. } => Ok(()),
            other => Err(self.err(format!("unexpected answer to hello: {other:?}"))),
        }
    }

    pub async fn exec(
        &self,
        req: ExecRequest,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecDone> {
        let mut s = self.connect().await?;
        let resp = self
            .exchange(&mut s, &Request::Exec(req), |r| {
                if let Response::Output { stream, data } = r {
                    on_output(stream, &data.0);
                }
            })
            .await?;
        match resp {
            Response::Exited {
                outcome,
                duration_ms,
                truncated,
            } => Ok(ExecDone {
                outcome,
                duration_ms,
                truncated,
            }),
            other => Err(self.err(format!("unexpected answer to exec: {other:?}"))),
        }
    }

    pub async fn invoke(
        &self,
        req: InvokeRequest,
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<InvokeDone> {
        let mut s = self.connect().await?;
        let resp = self
            .exchange(&mut s, &Request::Invoke(req), |r| {
                if let Response::Output { data, .. } = r {
                    on_stderr(&data.0);
                }
            })
            .await?;
        match resp {
            Response::InvokeResult {
                status,
                result,
                raw_output,
                stderr_tail,
                outcome,
                duration_ms,
                truncated,
            } => Ok(InvokeDone {
                status,
                result,
                raw_output,
                stderr_tail,
                outcome,
                duration_ms,
                truncated,
            }),
            other => Err(self.err(format!("unexpected answer to invoke: {other:?}"))),
        }
    }
}
