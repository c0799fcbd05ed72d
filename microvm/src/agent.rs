//! A small client for guest-init's agent protocol ([`thaw_protocol`]), over any byte stream:
//! a hybrid-vsock stream (Cloud Hypervisor) or a virtio-serial chardev socket (QEMU).

use std::time::Duration;

use thaw_protocol::frame::{read_frame_async, write_frame_async};
use thaw_protocol::{
    ErrorCode, ExecRequest, FrameError, HandlerConfig, InvokeRequest, Outcome, Request, Response,
    Stream, TaskLimits, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent protocol: {0}")]
    Frame(#[from] FrameError),
    #[error("guest-init did not finish {op} within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("guest-init answered {op} with an error ({code:?}): {message}")]
    Guest {
        op: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("guest-init answered {op} with an unexpected response: {response:?}")]
    Unexpected {
        op: &'static str,
        response: Box<Response>,
    },
}

/// Collected result of an `exec`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub outcome: Outcome,
    pub truncated: bool,
}

/// One protocol connection to guest-init.
pub struct AgentConn<S> {
    stream: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AgentConn<S> {
    pub fn new(stream: S) -> Self {
        AgentConn { stream }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends one request and collects every response up to and including the terminal one.
    pub async fn call(
        &mut self,
        op: &'static str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Vec<Response>, AgentError> {
        let exchange = async {
            write_frame_async(&mut self.stream, req).await?;
            let mut out = Vec::new();
            loop {
                let resp: Response = read_frame_async(&mut self.stream).await?;
                let terminal = resp.is_terminal();
                out.push(resp);
                if terminal {
                    return Ok::<_, AgentError>(out);
                }
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout { op, timeout }),
        }
    }

    async fn call_terminal(
        &mut self,
        op: &'static str,
        req: &Request,
        timeout: Duration,
    ) -> Result<(Vec<Response>, Response), AgentError> {
        let mut all = self.call(op, req, timeout).await?;
        // `call` only returns once a terminal response arrived, so `all` is non-empty; the
        // fallback keeps this total without an unwrap.
        let last = all.pop().unwrap_or(Response::Ok);
        if let Response::Error { code, message } = last {
            return Err(AgentError::Guest { op, code, message });
        }
        Ok((all, last))
    }

    /// Negotiates the protocol version; returns the agent's name.
    pub async fn hello(&mut self, timeout: Duration) -> Result<String, AgentError> {
        let req = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        match self.call_terminal("hello", &req, timeout).await?.1 {
            Response::Hello { agent, .. } => Ok(agent),
            other => Err(AgentError::Unexpected {
                op: "hello",
                response: Box::new(other),
            }),
        }
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<Response, AgentError> {
        match self.call_terminal("ping", &Request::Ping, timeout).await?.1 {
            pong @ Response::Pong { .. } => Ok(pong),
            other => Err(AgentError::Unexpected {
                op: "ping",
                response: Box::new(other),
            }),
        }
    }

    pub async fn exec(
        &mut self,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let req = Request::Exec(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            cwd: None,
            stdin: None,
            limits: TaskLimits {
                timeout_ms: Some(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
                ..TaskLimits::default()
            },
        });
        // Give guest-init a little longer than the task's own limit so its timeout outcome
        // arrives rather than ours.
        let (streamed, last) = self
            .call_terminal("exec", &req, timeout + Duration::from_secs(5))
            .await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        for r in streamed {
            if let Response::Output { stream, data } = r {
                match stream {
                    Stream::Stdout => stdout.extend_from_slice(&data.0),
                    Stream::Stderr => stderr.extend_from_slice(&data.0),
                }
            }
        }
        match last {
            Response::Exited {
                outcome, truncated, ..
            } => Ok(ExecOutput {
                stdout,
                stderr,
                outcome,
                truncated,
            }),
            other => Err(AgentError::Unexpected {
                op: "exec",
                response: Box::new(other),
            }),
        }
    }

    pub async fn configure(
        &mut self,
        handler: HandlerConfig,
        timeout: Duration,
    ) -> Result<u64, AgentError> {
        let req = Request::Configure(handler);
        match self.call_terminal("configure", &req, timeout).await?.1 {
            Response::Configured { warm_ms } => Ok(warm_ms),
            other => Err(AgentError::Unexpected {
                op: "configure",
                response: Box::new(other),
            }),
        }
    }

    /// Runs the handler on `payload`; returns the terminal `InvokeResult`.
    pub async fn invoke(
        &mut self,
        payload: serde_json::Value,
        timeout: Duration,
    ) -> Result<Response, AgentError> {
        let req = Request::Invoke(InvokeRequest {
            payload,
            env: Default::default(),
            limits: TaskLimits {
                timeout_ms: Some(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
                ..TaskLimits::default()
            },
        });
        match self
            .call_terminal("invoke", &req, timeout + Duration::from_secs(5))
            .await?
            .1
        {
            r @ Response::InvokeResult { .. } => Ok(r),
            other => Err(AgentError::Unexpected {
                op: "invoke",
                response: Box::new(other),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_protocol::Bytes;

    #[tokio::test]
    async fn exec_collects_streamed_output() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let req: Request = read_frame_async(&mut guest).await.unwrap();
            assert!(matches!(req, Request::Exec(_)));
            for r in [
                Response::Started { pid: 7 },
                Response::Output {
                    stream: Stream::Stdout,
                    data: Bytes(b"hi\n".to_vec()),
                },
                Response::Exited {
                    outcome: Outcome::Exited { code: 0 },
                    duration_ms: 1,
                    truncated: false,
                },
            ] {
                write_frame_async(&mut guest, &r).await.unwrap();
            }
        });
        let mut c = AgentConn::new(host);
        let out = c
            .exec(&["echo", "hi"], Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        assert!(out.outcome.success());
    }

    #[tokio::test]
    async fn guest_errors_are_typed() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let _: Request = read_frame_async(&mut guest).await.unwrap();
            let r = Response::error(ErrorCode::NoHandler, "configure first");
            write_frame_async(&mut guest, &r).await.unwrap();
        });
        let mut c = AgentConn::new(host);
        let e = c
            .invoke(serde_json::json!({}), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Guest {
                    code: ErrorCode::NoHandler,
                    ..
                }
            ),
            "{e}"
        );
    }
}
