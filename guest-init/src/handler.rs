//! The template's handler: `Configure` and `Invoke`, in exec mode (a process per
//! invocation) and persistent mode (one warm worker speaking a line protocol).
//!
//! Persistent worker protocol: the worker's first stdout line must be `{"ready": true}`;
//! then, per invocation, guest-init writes one `InvocationEnvelope` JSON line to its stdin
//! and reads one JSON line back from its stdout. Its stderr is drained all the time (so it
//! never blocks on a full pipe) and forwarded to the host while an invocation runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thaw_protocol::{
    Bytes, ErrorCode, HandlerConfig, HandlerMode, InvocationEnvelope, InvokeRequest, InvokeStatus,
    Outcome, Response, Stream,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::ApiError;
use crate::lines::{Line, LineReader};
use crate::server::{cancelled, Cancel, Out, State};
use crate::task::{
    self, push_tail, sleep_until_opt, OutputCap, SpawnError, StdinMode, StdoutMode, Task, TaskSpec,
};

/// Default time a persistent worker gets to print `{"ready": true}`.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest acceptable ready line.
const READY_LINE_CAP: usize = 64 * 1024;
/// Largest `raw_output` returned when a handler's output is not JSON.
const RAW_OUTPUT_CAP: usize = 64 * 1024;

#[derive(Default)]
pub struct Handler {
    /// Held for a whole persistent invocation: the worker serves one request at a time.
    inner: tokio::sync::Mutex<Inner>,
    /// Readable without the lock, so Ping answers during a long invocation.
    ready: AtomicBool,
}

#[derive(Default)]
struct Inner {
    config: Option<HandlerConfig>,
    worker: Option<Worker>,
}

/// Worker stderr, shared with the drain task.
#[derive(Default)]
struct StderrHub {
    tail: Vec<u8>,
    listener: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

struct Worker {
    task: Task,
    stdin: pipe::Sender,
    stdout: LineReader<pipe::Receiver>,
    stderr: Arc<Mutex<StderrHub>>,
    /// The stderr drain task; `None` once it has finished (and been awaited).
    drain: Option<JoinHandle<()>>,
    /// Asks the drain task to empty the pipe and acknowledge (see [`Worker::sync_stderr`]).
    flush: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl Worker {
    /// Kills the worker's tree and returns its stderr tail.
    async fn kill(mut self) -> String {
        self.task.kill_and_wait().await;
        self.finish_drain().await;
        if let Some(d) = self.drain.take() {
            d.abort();
        }
        tail_of(&self.stderr)
    }

    /// Returns once every byte the worker wrote to stderr so far has reached the hub.
    ///
    /// The worker writes stderr straight into the pipe, so whatever it wrote before its
    /// answer line is, by the time that line is read, either in the pipe or already taken
    /// by the drain task. The drain empties the pipe before acknowledging: no guessing with
    /// a grace period, which cost every invocation its full length.
    async fn sync_stderr(&self) {
        let (tx, rx) = oneshot::channel();
        if self.flush.send(tx).is_ok() {
            // A drain that has ended drops the request, which ends the wait too.
            let _ = tokio::time::timeout(Duration::from_millis(500), rx).await;
        }
    }

    /// The drain ends at EOF once the supervisor exits; give it a moment so the tail
    /// includes the worker's last words.
    async fn finish_drain(&mut self) {
        if let Some(d) = self.drain.as_mut() {
            if tokio::time::timeout(Duration::from_millis(500), d)
                .await
                .is_ok()
            {
                self.drain = None;
            }
        }
    }
}

fn tail_of(hub: &Mutex<StderrHub>) -> String {
    hub.lock()
        .map(|h| String::from_utf8_lossy(&h.tail).into_owned())
        .unwrap_or_default()
}

async fn drain_stderr(
    rx: pipe::Receiver,
    hub: Arc<Mutex<StderrHub>>,
    mut flushes: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    enum Event {
        Read(std::io::Result<usize>),
        Flush(oneshot::Sender<()>),
    }
    let deliver = |data: &[u8]| {
        if let Ok(mut h) = hub.lock() {
            push_tail(&mut h.tail, data);
            if let Some(l) = &h.listener {
                let _ = l.send(data.to_vec());
            }
        }
    };
    let mut rx = rx;
    let mut buf = vec![0u8; 16384];
    loop {
        let event = tokio::select! {
            r = rx.read(&mut buf) => Event::Read(r),
            Some(ack) = flushes.recv() => Event::Flush(ack),
        };
        match event {
            Event::Read(Ok(0) | Err(_)) => return,
            Event::Read(Ok(n)) => deliver(&buf[..n]),
            Event::Flush(ack) => {
                let mut eof = false;
                loop {
                    match rx.try_read(&mut buf) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => deliver(&buf[..n]),
                        // WouldBlock: the pipe is empty.
                        Err(_) => break,
                    }
                }
                let _ = ack.send(());
                if eof {
                    return;
                }
            }
        }
    }
}

fn handler_failed(message: String) -> ApiError {
    ApiError::new(ErrorCode::HandlerFailed, message)
}

fn with_tail(message: String, tail: &str) -> String {
    if tail.trim().is_empty() {
        format!("{message} (no stderr output)")
    } else {
        format!("{message}; stderr tail:\n{}", tail.trim_end())
    }
}

impl Handler {
    /// Configured and, if persistent, warm.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub async fn configure(
        &self,
        state: &State,
        config: HandlerConfig,
        cancel: &mut Cancel,
    ) -> Result<Response, ApiError> {
        if config.command.is_empty() || config.command[0].is_empty() {
            return Err(ApiError::bad_request("handler command is empty"));
        }
        let mut inner = self.inner.lock().await;
        self.ready.store(false, Ordering::Relaxed);
        if let Some(old) = inner.worker.take() {
            old.kill().await;
        }
        inner.config = Some(config.clone());
        if config.mode == HandlerMode::Exec {
            self.ready.store(true, Ordering::Relaxed);
            return Ok(Response::Configured { warm_ms: 0 });
        }
        let started = Instant::now();
        let worker = start_worker(state, &config, cancel).await?;
        inner.worker = Some(worker);
        self.ready.store(true, Ordering::Relaxed);
        Ok(Response::Configured {
            warm_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Kills the persistent worker (Shutdown).
    pub async fn stop(&self) {
        let mut inner = self.inner.lock().await;
        self.ready.store(false, Ordering::Relaxed);
        if let Some(w) = inner.worker.take() {
            w.kill().await;
        }
    }

    pub async fn invoke(
        &self,
        state: &State,
        req: InvokeRequest,
        out: &mut Out,
        cancel: &mut Cancel,
    ) -> Result<Response, ApiError> {
        let mut inner = self.inner.lock().await;
        let Some(config) = inner.config.clone() else {
            return Err(ApiError::new(
                ErrorCode::NoHandler,
                "no handler configured: send configure before invoke",
            ));
        };
        if config.mode == HandlerMode::Exec {
            // Exec handlers are independent processes: do not serialise them.
            drop(inner);
            return invoke_exec(state, &config, req, out, cancel).await;
        }
        let dead = match inner.worker.as_mut() {
            None => true,
            // A zero timeout polls once: true if the worker already reported its exit.
            Some(w) => tokio::time::timeout(Duration::ZERO, w.task.wait())
                .await
                .is_ok(),
        };
        if dead {
            if let Some(old) = inner.worker.take() {
                let tail = old.kill().await;
                crate::info!("persistent handler had exited; restarting it. {tail}");
            }
            self.ready.store(false, Ordering::Relaxed);
            let worker = start_worker(state, &config, cancel).await?;
            inner.worker = Some(worker);
            self.ready.store(true, Ordering::Relaxed);
        }
        let Some(worker) = inner.worker.as_mut() else {
            return Err(ApiError::internal("persistent handler vanished"));
        };
        let (resp, keep) = invoke_persistent(state, worker, req, out, cancel).await;
        if !keep {
            self.ready.store(false, Ordering::Relaxed);
            if let Some(w) = inner.worker.take() {
                w.kill().await;
            }
        }
        resp
    }
}

async fn start_worker(
    state: &State,
    config: &HandlerConfig,
    cancel: &mut Cancel,
) -> Result<Worker, ApiError> {
    let spec = TaskSpec {
        argv: config.command.clone(),
        env: state.task_env(&[&config.env]),
        cwd: config.cwd.clone(),
        stdin: StdinMode::Pipe,
    };
    let mut task = Task::spawn(spec, &state.registry)
        .await
        .map_err(|e| handler_failed(format!("cannot start the persistent handler: {e}")))?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (task.stdin.take(), task.stdout.take(), task.stderr.take())
    else {
        task.kill_and_wait().await;
        return Err(ApiError::internal(
            "persistent handler started without pipes",
        ));
    };
    let hub = Arc::new(Mutex::new(StderrHub::default()));
    let (flush, flushes) = mpsc::unbounded_channel();
    let drain = tokio::spawn(drain_stderr(stderr, hub.clone(), flushes));
    let mut worker = Worker {
        task,
        stdin,
        stdout: LineReader::new(stdout),
        stderr: hub,
        drain: Some(drain),
        flush,
    };
    let limit = config
        .start_timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_START_TIMEOUT);
    let failure = tokio::select! {
        line = worker.stdout.read_line(READY_LINE_CAP) => match line {
            Ok(Line::Line { data, overflow: false }) if is_ready_line(&data) => return Ok(worker),
            Ok(Line::Line { data, .. }) => format!(
                "persistent handler printed {:?} instead of {{\"ready\": true}} as its first \
                 stdout line",
                String::from_utf8_lossy(&data[..data.len().min(200)])
            ),
            Ok(Line::Eof) | Err(_) => {
                let st = worker.task.wait().await;
                format!(
                    "persistent handler exited ({}) before printing {{\"ready\": true}}",
                    describe(&worker.task.outcome(&st, false))
                )
            }
        },
        _ = tokio::time::sleep(limit) => format!(
            "persistent handler did not print {{\"ready\": true}} within {} ms \
             (start_timeout_ms)",
            limit.as_millis()
        ),
        _ = cancelled(cancel) => "host disconnected while the handler was starting".to_string(),
    };
    let tail = worker.kill().await;
    Err(handler_failed(with_tail(failure, &tail)))
}

fn is_ready_line(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line)
        .map(|v| v.get("ready") == Some(&serde_json::Value::Bool(true)))
        .unwrap_or(false)
}

pub fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Exited { code } => format!("exit code {code}"),
        Outcome::Signaled { signal } => format!("killed by signal {signal}"),
        Outcome::Timeout => "timed out".into(),
        Outcome::Oom => "killed by the OOM killer".into(),
    }
}

fn lossy_capped(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[..data.len().min(RAW_OUTPUT_CAP)]).into_owned()
}

/// Exit 0 + JSON stdout is success; everything else is an error with as much context as
/// the host needs to show the user.
async fn invoke_exec(
    state: &State,
    config: &HandlerConfig,
    req: InvokeRequest,
    out: &mut Out,
    cancel: &mut Cancel,
) -> Result<Response, ApiError> {
    let mut payload = serde_json::to_vec(&req.payload)
        .map_err(|e| ApiError::bad_request(format!("payload: {e}")))?;
    payload.push(b'\n');
    let spec = TaskSpec {
        argv: config.command.clone(),
        env: state.task_env(&[&config.env, &req.env]),
        cwd: config.cwd.clone(),
        stdin: StdinMode::Data(payload),
    };
    let mut task = Task::spawn(spec, &state.registry)
        .await
        .map_err(spawn_error)?;
    let r = task::run(&mut task, &req.limits, StdoutMode::Collect, out, cancel)
        .await
        .map_err(|_| ApiError::internal("host disconnected"))?;
    let stderr_tail = String::from_utf8_lossy(&r.stderr_tail).into_owned();
    let (status, result, raw_output) = match r.outcome {
        Outcome::Timeout => (InvokeStatus::Timeout, None, None),
        Outcome::Oom => (InvokeStatus::Oom, None, None),
        Outcome::Exited { code: 0 } => match parse_result(&r.stdout) {
            Some(v) => (InvokeStatus::Ok, Some(v), None),
            None => (InvokeStatus::Error, None, Some(lossy_capped(&r.stdout))),
        },
        _ => (InvokeStatus::Error, None, None),
    };
    Ok(Response::InvokeResult {
        status,
        result,
        raw_output,
        stderr_tail,
        outcome: Some(r.outcome),
        duration_ms: r.duration_ms,
        truncated: r.truncated,
    })
}

pub fn spawn_error(e: SpawnError) -> ApiError {
    match e {
        SpawnError::Command(m) => ApiError::new(ErrorCode::SpawnFailed, m),
        other => ApiError::internal(other.to_string()),
    }
}

fn parse_result(stdout: &[u8]) -> Option<serde_json::Value> {
    let text = std::str::from_utf8(stdout).ok()?.trim();
    serde_json::from_str(text).ok()
}

/// How a persistent invocation ended.
enum End {
    Line { data: Vec<u8>, overflow: bool },
    Died,
    Timeout,
    Disconnected,
}

/// Runs one invocation on the warm worker. Returns the response and whether the worker
/// may be kept (false: kill it; the next invoke restarts it cold).
async fn invoke_persistent(
    state: &State,
    worker: &mut Worker,
    req: InvokeRequest,
    out: &mut Out,
    cancel: &mut Cancel,
) -> (Result<Response, ApiError>, bool) {
    let started = Instant::now();
    let envelope = InvocationEnvelope {
        payload: req.payload,
        env: req.env,
        sandbox_id: state.sandbox_id(),
    };
    let mut line = match serde_json::to_vec(&envelope) {
        Ok(l) => l,
        Err(e) => return (Err(ApiError::bad_request(format!("payload: {e}"))), true),
    };
    line.push(b'\n');

    // Anything the worker printed on stdout between invocations is not an answer to this
    // one: drop it so the line protocol stays in sync.
    let mut junk = [0u8; 8192];
    while let Ok(n) = worker.stdout.get_mut().try_read(&mut junk) {
        if n == 0 {
            break;
        }
        crate::debug!("dropping {n} unsolicited stdout bytes from the persistent handler");
    }
    worker.stdout.clear();

    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Ok(mut h) = worker.stderr.lock() {
        h.tail.clear();
        h.listener = Some(tx);
    }
    let oom_before = crate::oom::oom_kills();
    worker.task.oom_before = oom_before;
    let deadline = req
        .limits
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let line_cap = usize::try_from(req.limits.output_cap).unwrap_or(usize::MAX);
    let mut cap = OutputCap::new(req.limits.output_cap);
    let mut stderr_open = true;

    let Worker {
        task,
        stdin,
        stdout,
        ..
    } = worker;
    let mut write = std::pin::pin!(stdin.write_all(&line));
    let mut written = false;
    let end = loop {
        tokio::select! {
            r = &mut write, if !written => {
                written = true;
                if let Err(e) = r {
                    // EPIPE: the worker is gone; its status arrives on the next turn.
                    crate::debug!("writing to the persistent handler: {e}");
                }
            }
            l = stdout.read_line(line_cap), if written => match l {
                Ok(Line::Line { data, overflow }) => break End::Line { data, overflow },
                Ok(Line::Eof) | Err(_) => break End::Died,
            },
            chunk = rx.recv(), if stderr_open => match chunk {
                Some(chunk) => {
                    if forward_stderr(out, &mut cap, &chunk).await.is_err() {
                        break End::Disconnected;
                    }
                }
                None => stderr_open = false,
            },
            _ = task.wait() => break End::Died,
            _ = sleep_until_opt(deadline) => break End::Timeout,
            _ = cancelled(cancel) => break End::Disconnected,
        }
    };
    // Forward stderr the worker wrote just before answering: the drain task may not have
    // handed it over yet.
    if matches!(end, End::Line { .. }) {
        worker.sync_stderr().await;
        while let Ok(chunk) = rx.try_recv() {
            if forward_stderr(out, &mut cap, &chunk).await.is_err() {
                break;
            }
        }
    }
    if let Ok(mut h) = worker.stderr.lock() {
        h.listener = None;
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    let result = |status, result, raw_output, outcome, truncated, tail: String| {
        Ok(Response::InvokeResult {
            status,
            result,
            raw_output,
            stderr_tail: tail,
            outcome,
            duration_ms,
            truncated: truncated || cap.truncated,
        })
    };
    match end {
        End::Line { data, overflow } => {
            let tail = tail_of(&worker.stderr);
            if overflow {
                return (
                    result(
                        InvokeStatus::Error,
                        None,
                        Some(lossy_capped(&data)),
                        None,
                        true,
                        tail,
                    ),
                    true,
                );
            }
            match parse_result(&data) {
                Some(v) => (
                    result(InvokeStatus::Ok, Some(v), None, None, false, tail),
                    true,
                ),
                None => (
                    result(
                        InvokeStatus::Error,
                        None,
                        Some(lossy_capped(&data)),
                        None,
                        false,
                        tail,
                    ),
                    true,
                ),
            }
        }
        End::Died => {
            let st = worker.task.wait().await;
            let outcome = worker.task.outcome(&st, false);
            // Let the drain catch the worker's last stderr before reporting.
            worker.finish_drain().await;
            let tail = tail_of(&worker.stderr);
            let status = if outcome == Outcome::Oom {
                InvokeStatus::Oom
            } else {
                InvokeStatus::Error
            };
            (
                result(status, None, None, Some(outcome), false, tail),
                false,
            )
        }
        End::Timeout => {
            worker.task.kill_and_wait().await;
            let tail = tail_of(&worker.stderr);
            (
                result(
                    InvokeStatus::Timeout,
                    None,
                    None,
                    Some(Outcome::Timeout),
                    false,
                    tail,
                ),
                false,
            )
        }
        End::Disconnected => (Err(ApiError::internal("host disconnected")), false),
    }
}

async fn forward_stderr(
    out: &mut Out,
    cap: &mut OutputCap,
    chunk: &[u8],
) -> Result<(), crate::server::Disconnected> {
    let kept = cap.admit(chunk);
    if kept.is_empty() {
        return Ok(());
    }
    out.send(&Response::Output {
        stream: Stream::Stderr,
        data: Bytes(kept.to_vec()),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_detection() {
        assert!(is_ready_line(br#"{"ready": true}"#));
        assert!(is_ready_line(br#"{"ready":true,"pid":3}"#));
        assert!(!is_ready_line(br#"{"ready": false}"#));
        assert!(!is_ready_line(b"ready"));
    }

    #[test]
    fn results_parse_trimmed_json() {
        assert_eq!(
            parse_result(b"  {\"a\":1}\n"),
            Some(serde_json::json!({"a":1}))
        );
        assert_eq!(parse_result(b"hello"), None);
        assert_eq!(parse_result(b""), None);
    }
}
