//! Host side of the guest-init protocol: one connection per exchange, so that a dropped
//! future (client went away, timeout) closes the socket, which guest-init treats as cancel.
//!
//! Code in a sandbox may control guest-init (it is a process of the sandbox; on the microvm
//! tier the guest kernel too), so nothing here trusts what the guest claims. Every exchange
//! runs under host-side limits ([`CallLimits`]) derived from the request itself: output past
//! the task's cap is dropped here, a guest that keeps sending (or sends one frame larger
//! than the call's budget) is cut off with [`Error::OutputFlood`], and a call that runs past
//! its task's timeout plus [`HOST_GRACE`] ends with [`Error::HostTimeout`]. The caller (the
//! engine) then kills the sandbox's task or the sandbox: guest-init cannot be relied on to.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use thaw_protocol::frame::{read_frame_async_sized, write_frame_async};
use thaw_protocol::{
    ExecRequest, FrameError, InvokeRequest, Outcome, Request, Response, Stream, MAX_FRAME,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info_span, warn, Instrument as _};

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

// InvokeDone is in thaw-types (types/src/run.rs).
pub use thaw_types::run::InvokeDone;

/// How long past a task's own timeout the host waits for guest-init to end it. guest-init
/// needs up to its kill grace (1 s) plus its output-drain grace (2 s) after the timeout; the
/// rest is slack for a loaded machine.
pub const HOST_GRACE: Duration = Duration::from_secs(5);

/// Bytes a task call may carry beyond twice its output cap before the host cuts it off: the
/// final result's own fields (stderr tail, raw output, JSON and base64 overhead) and slack.
pub const OUTPUT_ALLOWANCE: u64 = 1 << 20;

/// Budget of a call that carries no task output (ping, hygiene, configure, write-file): its
/// answer is a few hundred bytes.
const SMALL_BUDGET: u64 = 64 << 10;

/// Deadline of a quick call (ping, hello, hygiene, file transfer).
const QUICK_DEADLINE: Duration = Duration::from_secs(60);

/// Deadline of a ping or hello: guest-init answers them from its accept loop.
const PING_DEADLINE: Duration = Duration::from_secs(10);

/// guest-init's own default for a persistent handler's start (`start_timeout_ms` absent).
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Host-kept lengths of the result's diagnostic strings (guest-init keeps 4 KiB of stderr
/// and 64 KiB of raw output; lossy UTF-8 can triple them).
const STDERR_TAIL_MAX: usize = 16 << 10;
const RAW_OUTPUT_MAX: usize = 256 << 10;

/// The host's own limits on one exchange, whatever the guest sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// Output bytes (`Response::Output` data) passed on to the caller; the rest is dropped
    /// and the result marked truncated.
    pub output_cap: u64,
    /// Bytes the guest may send in all (output data, whatever the cap let through or not,
    /// plus the terminal response's frame) before the call is cut off. Also the largest
    /// frame read, so one frame never makes the host allocate more.
    pub budget: u64,
    /// How long the exchange may take from its request on; `None`: no host deadline (a task
    /// without a timeout).
    pub deadline: Option<Duration>,
    /// The task's own timeout, for the error message (`None` for non-task calls).
    pub task_timeout: Option<Duration>,
}

impl CallLimits {
    /// The limits of `req`, from the task limits it carries (the template's `output_kib` and
    /// `timeout_s`, or the caller's shorter timeout).
    pub fn for_request(req: &Request) -> CallLimits {
        let quick = |budget: u64, deadline: Duration| CallLimits {
            output_cap: 0,
            budget,
            deadline: Some(deadline),
            task_timeout: None,
        };
        match req {
            Request::Exec(ExecRequest { limits, .. })
            | Request::Invoke(InvokeRequest { limits, .. }) => {
                let timeout = limits.timeout_ms.map(Duration::from_millis);
                CallLimits {
                    output_cap: limits.output_cap,
                    budget: limits
                        .output_cap
                        .saturating_mul(2)
                        .saturating_add(OUTPUT_ALLOWANCE),
                    deadline: timeout.map(|t| t.saturating_add(HOST_GRACE)),
                    task_timeout: timeout,
                }
            }
            Request::Configure(h) => {
                // A persistent handler starts and warms within `start_timeout_ms`.
                let start = h
                    .start_timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_START_TIMEOUT);
                quick(SMALL_BUDGET, start.saturating_add(HOST_GRACE))
            }
            // The answer carries the file, base64-encoded (4 bytes per 3) inside JSON.
            Request::ReadFile { max_bytes, .. } => {
                let max = max_bytes.unwrap_or(MAX_FRAME as u64);
                quick(
                    max.saturating_mul(4) / 3 + SMALL_BUDGET,
                    QUICK_DEADLINE.saturating_mul(2),
                )
            }
            Request::ListDir { .. } => quick(16 << 20, QUICK_DEADLINE),
            Request::Ping | Request::Hello { .. } | Request::Shutdown => {
                quick(SMALL_BUDGET, PING_DEADLINE)
            }
            Request::WriteFile { .. }
            | Request::SetIdentity { .. }
            | Request::AddEntropy { .. }
            | Request::SetClock { .. }
            | Request::SetEnv { .. } => quick(SMALL_BUDGET, QUICK_DEADLINE),
        }
    }

    /// The largest frame this call reads.
    fn max_frame(&self) -> usize {
        usize::try_from(self.budget)
            .unwrap_or(MAX_FRAME)
            .min(MAX_FRAME)
    }
}

/// What the host counted on one exchange.
#[derive(Debug, Default, Clone, Copy)]
struct Meter {
    /// Output bytes passed on to the caller.
    passed: u64,
    /// Bytes charged against the budget.
    received: u64,
    /// Output was dropped at the host's cap.
    truncated: bool,
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
    /// [`Error::Guest`]. Runs under the request's [`CallLimits`].
    pub async fn call(&self, req: &Request) -> Result<Response> {
        let limits = CallLimits::for_request(req);
        self.bounded(&limits, async {
            let mut s = self.connect().await?;
            self.exchange(&mut s, req, &limits, |_, _| {})
                .await
                .map(|(r, _)| r)
        })
        .await
    }

    /// Sends `reqs` down one connection without waiting between them, then collects each
    /// one's terminal response in order: one connection and one round trip for a batch of
    /// quick requests (clone hygiene). The first guest error ends the batch. Each answer is
    /// read under its own request's limits; the batch's deadline is the longest of theirs.
    pub async fn call_all(&self, reqs: &[Request]) -> Result<Vec<Response>> {
        let all: Vec<CallLimits> = reqs.iter().map(CallLimits::for_request).collect();
        let batch = CallLimits {
            deadline: all.iter().filter_map(|l| l.deadline).max(),
            ..CallLimits::for_request(&Request::Ping)
        };
        self.bounded(&batch, async {
            let mut s = self.connect().await?;
            for req in reqs {
                write_frame_async(&mut s, req)
                    .await
                    .map_err(|e| self.err(format!("send: {e}")))?;
            }
            let mut out = Vec::with_capacity(reqs.len());
            for limits in &all {
                let mut meter = Meter::default();
                out.push(self.receive(&mut s, limits, &mut meter, |_, _| {}).await?);
            }
            Ok(out)
        })
        .await
    }

    /// Runs one exchange (connection included) under the host deadline of `limits`.
    async fn bounded<T>(
        &self,
        limits: &CallLimits,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(deadline) = limits.deadline else {
            return work.await;
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => {
                warn!(sandbox = %self.sandbox, deadline_ms = deadline.as_millis() as u64,
                    "guest-init did not end the call by the host deadline");
                Err(Error::HostTimeout {
                    sandbox: self.sandbox.clone(),
                    what: match limits.task_timeout {
                        Some(t) => format!(
                            "its task ran past its {} ms timeout and guest-init did not end it \
                             within {} ms more",
                            t.as_millis(),
                            HOST_GRACE.as_millis()
                        ),
                        None => format!(
                            "guest-init did not answer within {} ms",
                            deadline.as_millis()
                        ),
                    },
                })
            }
        }
    }

    async fn exchange(
        &self,
        s: &mut BoxStream,
        req: &Request,
        limits: &CallLimits,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<(Response, Meter)> {
        write_frame_async(s, req)
            .await
            .map_err(|e| self.err(format!("send: {e}")))?;
        let mut meter = Meter::default();
        let resp = self.receive(s, limits, &mut meter, on_output).await?;
        Ok((resp, meter))
    }

    fn flood(&self, bytes: u64, limits: &CallLimits) -> Error {
        warn!(sandbox = %self.sandbox, bytes, budget = limits.budget,
            "guest sent more than its output budget; cutting the call off");
        Error::OutputFlood {
            sandbox: self.sandbox.clone(),
            bytes,
            output_kib: limits.output_cap / 1024,
        }
    }

    /// Reads responses until the terminal one, passing output on up to the cap and counting
    /// every byte against the budget. Frames are read with the budget as their size limit,
    /// so a single giant frame is refused before the host allocates it.
    async fn receive(
        &self,
        s: &mut BoxStream,
        limits: &CallLimits,
        meter: &mut Meter,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<Response> {
        loop {
            let (resp, len): (Response, usize) = read_frame_async_sized(s, limits.max_frame())
                .await
                .map_err(|e| match e {
                    FrameError::OverLimit { len, .. } | FrameError::TooLarge(len) => {
                        self.flood(meter.received.saturating_add(len as u64), limits)
                    }
                    e if e.is_closed() => {
                        self.err("guest-init closed the connection (sandbox died or was killed)")
                    }
                    e => self.err(format!("receive: {e}")),
                })?;
            let charge = match &resp {
                // Data bytes, not frame bytes: an honest guest may send many tiny frames
                // (an unbuffered task), whose JSON overhead must not count as output. An
                // empty frame still costs a byte, so endless empty frames are cut off too.
                Response::Output { data, .. } => (data.0.len() as u64).max(1),
                _ => len as u64,
            };
            meter.received = meter.received.saturating_add(charge);
            if meter.received > limits.budget {
                return Err(self.flood(meter.received, limits));
            }
            match resp {
                Response::Error { code, message } => {
                    return Err(Error::Guest {
                        sandbox: self.sandbox.clone(),
                        code,
                        message,
                    })
                }
                Response::Output { stream, data } => {
                    let room = limits.output_cap.saturating_sub(meter.passed);
                    let n = usize::try_from(room)
                        .unwrap_or(usize::MAX)
                        .min(data.0.len());
                    if n < data.0.len() {
                        meter.truncated = true;
                    }
                    if n > 0 {
                        meter.passed += n as u64;
                        on_output(stream, &data.0[..n]);
                    }
                }
                resp if resp.is_terminal() => return Ok(resp),
                _ => {}
            }
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

    /// Runs a command. Its output goes to `on_output` as it comes, at most the request's
    /// `output_cap` bytes of it whatever the guest sends; the call ends by the request's
    /// timeout plus [`HOST_GRACE`] whatever the guest does.
    pub async fn exec(
        &self,
        req: ExecRequest,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecDone> {
        let req = Request::Exec(req);
        let limits = CallLimits::for_request(&req);
        let span = info_span!("agent.exec", sandbox = %self.sandbox, budget = limits.budget);
        let (resp, meter) = self
            .bounded(&limits, async {
                let mut s = self.connect().await?;
                self.exchange(&mut s, &req, &limits, on_output).await
            })
            .instrument(span)
            .await?;
        match resp {
            Response::Exited {
                outcome,
                duration_ms,
                truncated,
            } => Ok(ExecDone {
                outcome,
                duration_ms,
                truncated: truncated || meter.truncated,
            }),
            other => Err(self.err(format!("unexpected answer to exec: {other:?}"))),
        }
    }

    /// Runs the handler on one payload, under the same host limits as [`Agent::exec`]. The
    /// result's frame counts against the budget; its diagnostic strings are cut to the
    /// lengths an honest guest-init sends.
    pub async fn invoke(
        &self,
        req: InvokeRequest,
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<InvokeDone> {
        let req = Request::Invoke(req);
        let limits = CallLimits::for_request(&req);
        let span = info_span!("agent.invoke", sandbox = %self.sandbox, budget = limits.budget);
        let (resp, meter) = self
            .bounded(&limits, async {
                let mut s = self.connect().await?;
                self.exchange(&mut s, &req, &limits, |_, d| on_stderr(d))
                    .await
            })
            .instrument(span)
            .await?;
        match resp {
            Response::InvokeResult {
                status,
                result,
                raw_output,
                mut stderr_tail,
                outcome,
                duration_ms,
                truncated,
            } => {
                let mut cut = keep_tail(&mut stderr_tail, STDERR_TAIL_MAX);
                let raw_output = raw_output.map(|mut r| {
                    cut |= cut_string(&mut r, RAW_OUTPUT_MAX);
                    r
                });
                Ok(InvokeDone {
                    status,
                    result,
                    raw_output,
                    stderr_tail,
                    outcome,
                    duration_ms,
                    truncated: truncated || meter.truncated || cut,
                })
            }
            other => Err(self.err(format!("unexpected answer to invoke: {other:?}"))),
        }
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary; whether it cut.
fn cut_string(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
    true
}

/// Keeps the last (at most) `max` bytes of `s`, at a character boundary; whether it cut.
fn keep_tail(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut at = s.len() - max;
    while !s.is_char_boundary(at) {
        at += 1;
    }
    s.drain(..at);
    true
}

/// A test double stands in for a compromised guest-init: a task on a real Unix socket that
/// speaks the protocol but ignores every limit (floods output, sends a giant frame, never
/// ends). The host must cut each off by itself.
#[cfg(test)]
mod tests {
    use super::*;
    use thaw_protocol::{Bytes, InvokeStatus, TaskLimits};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    /// Serves one connection with `behave`, after reading its request.
    fn fake_guest<F, Fut>(behave: F) -> (tempfile::TempDir, Agent)
    where
        F: FnOnce(tokio::net::UnixStream, Request) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let req: Request = thaw_protocol::frame::read_frame_async(&mut s)
                .await
                .unwrap();
            behave(s, req).await;
        });
        (dir, Agent::new("sb-fake", Endpoint::Unix(path)))
    }

    fn exec_req(output_cap: u64, timeout_ms: u64) -> ExecRequest {
        ExecRequest {
            argv: vec!["flood".into()],
            env: Default::default(),
            cwd: None,
            stdin: None,
            limits: TaskLimits {
                timeout_ms: Some(timeout_ms),
                output_cap,
            },
        }
    }

    fn output(n: usize) -> Response {
        Response::Output {
            stream: Stream::Stdout,
            data: Bytes(vec![b'x'; n]),
        }
    }

    #[tokio::test]
    async fn endless_output_is_passed_on_up_to_the_cap_then_cut_off() {
        let (_d, agent) = fake_guest(|mut s, _| async move {
            // Ignores the cap: 64 KiB frames until the host hangs up.
            while write_frame_async(&mut s, &output(64 << 10)).await.is_ok() {}
        });
        let cap = 64 << 10;
        let mut passed = 0usize;
        let started = Instant::now();
        let err = agent
            .exec(exec_req(cap, 60_000), |_, d| passed += d.len())
            .await
            .unwrap_err();
        assert_eq!(passed as u64, cap, "the host passes on exactly the cap");
        match &err {
            Error::OutputFlood { bytes, .. } => {
                assert!(*bytes > 2 * cap + OUTPUT_ALLOWANCE, "{err}");
                assert!(*bytes < 2 * cap + OUTPUT_ALLOWANCE + (128 << 10), "{err}");
            }
            other => panic!("expected OutputFlood, got {other}"),
        }
        assert!(
            err.to_string().contains("past its output_kib limit"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn output_past_the_cap_within_the_budget_is_dropped_and_marked_truncated() {
        let (_d, agent) = fake_guest(|mut s, _| async move {
            for _ in 0..4 {
                write_frame_async(&mut s, &output(1000)).await.unwrap();
            }
            let done = Response::Exited {
                outcome: Outcome::Exited { code: 0 },
                duration_ms: 1,
                truncated: false, // a lie: the guest sent 4000 bytes over a 2500 cap
            };
            write_frame_async(&mut s, &done).await.unwrap();
        });
        let mut got = Vec::new();
        let done = agent
            .exec(exec_req(2500, 60_000), |_, d| got.extend_from_slice(d))
            .await
            .unwrap();
        assert_eq!(got.len(), 2500);
        assert!(done.truncated);
    }

    #[tokio::test]
    async fn a_giant_frame_is_refused_on_its_header() {
        let (_d, agent) = fake_guest(|mut s, _| async move {
            // Claims a 60 MiB frame (under MAX_FRAME) and starts sending it.
            let _ = s.write_all(&(60u32 << 20).to_be_bytes()).await;
            let junk = vec![b'x'; 1 << 20];
            for _ in 0..60 {
                if s.write_all(&junk).await.is_err() {
                    break;
                }
            }
        });
        let err = agent.exec(exec_req(64 << 10, 60_000), |_, _| {}).await;
        match err {
            Err(Error::OutputFlood { bytes, .. }) => assert_eq!(bytes, 60 << 20),
            other => panic!("expected OutputFlood, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_result_over_the_budget_is_cut_off_and_its_strings_are_capped() {
        // A result frame over the budget: refused.
        let (_d, agent) = fake_guest(|mut s, _| async move {
            let big = Response::InvokeResult {
                status: InvokeStatus::Ok,
                result: Some(serde_json::Value::String("y".repeat(3 << 20))),
                raw_output: None,
                stderr_tail: String::new(),
                outcome: None,
                duration_ms: 1,
                truncated: false,
            };
            let _ = write_frame_async(&mut s, &big).await;
        });
        let req = InvokeRequest {
            payload: serde_json::json!({}),
            env: Default::default(),
            limits: exec_req(64 << 10, 60_000).limits,
        };
        let err = agent.invoke(req.clone(), |_| {}).await.unwrap_err();
        assert!(matches!(err, Error::OutputFlood { .. }), "{err}");

        // Within the budget, but with diagnostic strings longer than guest-init sends.
        let (_d2, agent) = fake_guest(|mut s, _| async move {
            let r = Response::InvokeResult {
                status: InvokeStatus::Error,
                result: None,
                raw_output: Some("r".repeat(400 << 10)),
                stderr_tail: format!("{}END", "e".repeat(100 << 10)),
                outcome: None,
                duration_ms: 1,
                truncated: false,
            };
            write_frame_async(&mut s, &r).await.unwrap();
        });
        let done = agent.invoke(req, |_| {}).await.unwrap();
        assert_eq!(done.stderr_tail.len(), STDERR_TAIL_MAX);
        assert!(done.stderr_tail.ends_with("END"), "a tail keeps the end");
        assert_eq!(done.raw_output.map(|r| r.len()), Some(RAW_OUTPUT_MAX));
        assert!(done.truncated);
    }

    #[tokio::test]
    async fn a_task_the_guest_never_ends_is_ended_by_the_host_deadline() {
        let (_d, agent) = fake_guest(|mut s, _| async move {
            write_frame_async(&mut s, &Response::Started { pid: 2 })
                .await
                .unwrap();
            // Ignores its timeout: never answers, keeps the connection open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let started = Instant::now();
        let err = agent
            .exec(exec_req(1024, 200), |_, _| {})
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, Error::HostTimeout { .. }), "{err}");
        assert!(
            err.to_string().contains("the host enforced the timeout"),
            "{err}"
        );
        assert!(
            took >= Duration::from_millis(200) + HOST_GRACE && took < HOST_GRACE * 2,
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_file_read_answered_with_more_than_asked_is_cut_off() {
        let (_d, agent) = fake_guest(|mut s, _| async move {
            let r = Response::FileData {
                data: Bytes(vec![0u8; 1 << 20]),
                truncated: false,
            };
            let _ = write_frame_async(&mut s, &r).await;
        });
        let err = agent
            .call(&Request::ReadFile {
                path: "/etc/hostname".into(),
                max_bytes: Some(4096),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::OutputFlood { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_ping_answer_is_small_and_prompt() {
        let (_d, agent) = fake_guest(|mut s, _| async move {
            // An endless stream of non-terminal frames in answer to a ping.
            while write_frame_async(&mut s, &output(0)).await.is_ok() {}
        });
        let err = agent.call(&Request::Ping).await.unwrap_err();
        assert!(matches!(err, Error::OutputFlood { .. }), "{err}");
    }
}
