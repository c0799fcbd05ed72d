//! The protocol server: one task per connection, each connection a sequence of exchanges.
//!
//! A connection's reader runs in its own task and feeds parsed frames to the exchange loop.
//! That lets the exchange loop notice, while a task runs, that the host closed the
//! connection (the cancellation signal) without consuming the next request.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thaw_protocol::frame::{read_frame_async, write_frame_async};
use thaw_protocol::{Env, ErrorCode, ExecRequest, FrameError, Request, Response, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;
use crate::handler::{spawn_error, Handler};
use crate::task::{self, Registry, StdinMode, StdoutMode, Task, TaskSpec};
use crate::{files, hygiene};

/// A bidirectional byte stream carrying frames (Unix socket, vsock, serial port).
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}
pub type BoxConn = Box<dyn Conn>;

/// The host went away mid-exchange.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("host disconnected")]
pub struct Disconnected;

/// Becomes true when the host closes the connection.
pub type Cancel = watch::Receiver<bool>;

/// Resolves once the connection is closed (or its reader is gone).
pub async fn cancelled(cancel: &mut Cancel) {
    let _ = cancel.wait_for(|closed| *closed).await;
}

/// The writing side of a connection.
pub struct Out {
    w: WriteHalf<BoxConn>,
}

impl Out {
    pub async fn send(&mut self, resp: &Response) -> Result<(), Disconnected> {
        match write_frame_async(&mut self.w, resp).await {
            Ok(()) => Ok(()),
            Err(FrameError::TooLarge(n)) => {
                // Cannot happen for our own bounded responses; never send a broken frame.
                crate::warn!("dropping a {n}-byte response over the frame limit");
                Ok(())
            }
            Err(_) => Err(Disconnected),
        }
    }
}

/// Everything shared between connections.
pub struct State {
    started: Instant,
    sandbox_id: Mutex<String>,
    /// The SetEnv layer (on top of the built-in PATH and HOME).
    env: Mutex<Env>,
    pub handler: Handler,
    pub registry: Arc<Registry>,
    pub state_dir: PathBuf,
    /// Power the machine off on Shutdown (PID 1 in a VM) instead of exiting.
    pub power_off: bool,
    /// Socket files to remove on a clean exit.
    pub socket_paths: Vec<PathBuf>,
}

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl State {
    pub fn new(state_dir: PathBuf, power_off: bool, socket_paths: Vec<PathBuf>) -> Self {
        State {
            started: Instant::now(),
            sandbox_id: Mutex::new(String::new()),
            env: Mutex::new(Env::new()),
            handler: Handler::default(),
            registry: Arc::new(Registry::default()),
            state_dir,
            power_off,
            socket_paths,
        }
    }

    pub fn sandbox_id(&self) -> String {
        self.sandbox_id
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// A task's environment: built-in base, the SetEnv layer, THAW_SANDBOX_ID, then each of
    /// `layers` in order (handler env, request env), later entries winning.
    pub fn task_env(&self, layers: &[&Env]) -> Env {
        let mut env = Env::new();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        env.insert("HOME".into(), "/root".into());
        if let Ok(set) = self.env.lock() {
            env.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let id = self.sandbox_id();
        if !id.is_empty() {
            env.insert("THAW_SANDBOX_ID".into(), id);
        }
        for layer in layers {
            env.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        env
    }
}

/// An item from the connection reader.
enum Incoming {
    Request(Request),
    /// A frame of sane length that did not parse: answer BadRequest, keep going.
    Malformed(String),
    /// A frame over the limit: answer and close (the stream is out of sync).
    TooLarge(usize),
}

pub async fn serve_connection(conn: BoxConn, state: Arc<State>) {
    let (mut r, w) = tokio::io::split(conn);
    let (closed_tx, closed_rx) = watch::channel(false);
    // Capacity 1: at most one request read ahead, bounding memory.
    let (tx, mut rx) = mpsc::channel::<Incoming>(1);
    let reader = tokio::spawn(async move {
        loop {
            let item = match read_frame_async::<_, Request>(&mut r).await {
                Ok(req) => Incoming::Request(req),
                Err(FrameError::Malformed(e)) => Incoming::Malformed(e.to_string()),
                Err(FrameError::TooLarge(n)) => Incoming::TooLarge(n),
                Err(e) => {
                    if !e.is_closed() {
                        crate::debug!("connection read: {e}");
                    }
                    break;
                }
            };
            let stop = matches!(item, Incoming::TooLarge(_));
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
        let _ = closed_tx.send(true);
    });
    let mut out = Out { w };
    while let Some(item) = rx.recv().await {
        let mut cancel = closed_rx.clone();
        let result = match item {
            Incoming::Request(req) => handle(req, &state, &mut out, &mut cancel).await,
            Incoming::Malformed(msg) => out
                .send(&ApiError::bad_request(format!("malformed request: {msg}")).into_response())
                .await
                .map(|_| Flow::Continue),
            Incoming::TooLarge(n) => {
                let msg = format!(
                    "frame of {n} bytes exceeds the {}-byte limit; closing the connection",
                    thaw_protocol::MAX_FRAME
                );
                let _ = out.send(&ApiError::bad_request(msg).into_response()).await;
                break;
            }
        };
        match result {
            Ok(Flow::Continue) => {}
            Ok(Flow::Shutdown) => {
                reader.abort();
                crate::shutdown(&state).await;
            }
            Err(Disconnected) => break,
        }
    }
    reader.abort();
}

pub enum Flow {
    Continue,
    Shutdown,
}

async fn handle(
    req: Request,
    state: &Arc<State>,
    out: &mut Out,
    cancel: &mut Cancel,
) -> Result<Flow, Disconnected> {
    crate::debug!("request {}", op_name(&req));
    let reply = match req {
        Request::Hello { version } => Ok(hello(version)),
        Request::Ping => Ok(Response::Pong {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_ms: state.started.elapsed().as_millis() as u64,
            sandbox_id: state.sandbox_id(),
            handler_ready: state.handler.ready(),
        }),
        Request::Exec(req) => exec(req, state, out, cancel).await,
        Request::Configure(cfg) => state.handler.configure(state, cfg, cancel).await,
        Request::Invoke(req) => state.handler.invoke(state, req, out, cancel).await,
        Request::WriteFile {
            path,
            data,
            mode,
            append,
        } => files::write_file(path, data.0, mode, append).await,
        Request::ReadFile { path, max_bytes } => files::read_file(path, max_bytes).await,
        Request::ListDir { path } => files::list_dir(path).await,
        Request::SetIdentity {
            hostname,
            sandbox_id,
        } => set_identity(state, &hostname, sandbox_id),
        Request::AddEntropy { data } => hygiene::add_entropy(&data.0),
        Request::SetClock { unix_nanos } => hygiene::set_clock(unix_nanos),
        Request::SetEnv { env, replace } => {
            if let Ok(mut cur) = state.env.lock() {
                if replace {
                    *cur = env;
                } else {
                    cur.extend(env);
                }
            }
            Ok(Response::Ok)
        }
        Request::Shutdown => {
            out.send(&Response::Ok).await?;
            return Ok(Flow::Shutdown);
        }
    };
    let resp = reply.unwrap_or_else(ApiError::into_response);
    out.send(&resp).await?;
    Ok(Flow::Continue)
}

fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Hello { .. } => "hello",
        Request::Ping => "ping",
        Request::Exec(_) => "exec",
        Request::Configure(_) => "configure",
        Request::Invoke(_) => "invoke",
        Request::WriteFile { .. } => "write_file",
        Request::ReadFile { .. } => "read_file",
        Request::ListDir { .. } => "list_dir",
        Request::SetIdentity { .. } => "set_identity",
        Request::AddEntropy { .. } => "add_entropy",
        Request::SetClock { .. } => "set_clock",
        Request::SetEnv { .. } => "set_env",
        Request::Shutdown => "shutdown",
    }
}

pub fn hello(version: u32) -> Response {
    if version == PROTOCOL_VERSION {
        Response::Hello {
            version,
            agent: format!("guest-init {}", env!("CARGO_PKG_VERSION")),
        }
    } else {
        Response::error(
            ErrorCode::UnsupportedVersion,
            format!(
                "host speaks v{version}, guest-init speaks v{PROTOCOL_VERSION}: rebuild the \
                 template with the same thaw release"
            ),
        )
    }
}

fn set_identity(state: &State, hostname: &str, sandbox_id: String) -> Result<Response, ApiError> {
    if sandbox_id.contains(['\0', '\n']) {
        return Err(ApiError::bad_request("sandbox_id contains NUL or newline"));
    }
    // The id is stored first: it matters to tasks even where the hostname cannot be set.
    if let Ok(mut id) = state.sandbox_id.lock() {
        id.clone_from(&sandbox_id);
    }
    // The file is a convenience for tasks (THAW_SANDBOX_ID is the contract). The directory
    // is the sandbox's own to delete or replace, and doing so must not break the sandbox's
    // next clone hygiene (a session's resume): say so in the log and go on.
    let path = state.state_dir.join("sandbox-id");
    if let Err(e) = files::write_small(&path, format!("{sandbox_id}\n").as_bytes()) {
        crate::warn!("cannot write {}: {e}", path.display());
    }
    hygiene::set_hostname(hostname)?;
    Ok(Response::Ok)
}

async fn exec(
    req: ExecRequest,
    state: &Arc<State>,
    out: &mut Out,
    cancel: &mut Cancel,
) -> Result<Response, ApiError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(ApiError::bad_request("exec: argv is empty"));
    }
    let spec = TaskSpec {
        argv: req.argv,
        env: state.task_env(&[&req.env]),
        cwd: req.cwd,
        stdin: match req.stdin {
            Some(data) => StdinMode::Data(data.0),
            None => StdinMode::Null,
        },
    };
    let mut task = tokio::select! {
        t = Task::spawn(spec, &state.registry) => t.map_err(spawn_error)?,
        // Dropping the spawn future drops the Task, whose Drop asks the supervisor to kill.
        _ = cancelled(cancel) => return Err(ApiError::internal("host disconnected")),
    };
    if out
        .send(&Response::Started { pid: task.pid })
        .await
        .is_err()
    {
        task.kill_and_wait().await;
        return Err(ApiError::internal("host disconnected"));
    }
    let r = task::run(&mut task, &req.limits, StdoutMode::Forward, out, cancel)
        .await
        .map_err(|_| ApiError::internal("host disconnected"))?;
    Ok(Response::Exited {
        outcome: r.outcome,
        duration_ms: r.duration_ms,
        truncated: r.truncated,
    })
}

/// Kills every task and the worker: first politely through the supervisors, then by a
/// /proc sweep of everything below guest-init.
pub async fn kill_everything(state: &State) {
    for sup in state.registry.supervisors() {
        // SAFETY: kill(2). A registered supervisor has not been reported finished.
        unsafe {
            libc::kill(sup, libc::SIGUSR1);
        }
    }
    state.handler.stop().await;
    let deadline = Instant::now() + task::KILL_GRACE;
    while !state.registry.supervisors().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let me = std::process::id() as i32;
    crate::procs::kill_tree(me, Duration::from_secs(2), crate::pid1::reap_all);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_checks_version() {
        assert!(matches!(hello(PROTOCOL_VERSION), Response::Hello { .. }));
        match hello(99) {
            Response::Error { code, message } => {
                assert_eq!(code, ErrorCode::UnsupportedVersion);
                assert!(message.contains("v99"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn env_layers_override_in_order() {
        let state = State::new(PathBuf::from("/nonexistent"), false, vec![]);
        if let Ok(mut id) = state.sandbox_id.lock() {
            *id = "sb-1".into();
        }
        let a: Env = [
            ("A".to_string(), "1".to_string()),
            ("HOME".into(), "/h".into()),
        ]
        .into_iter()
        .collect();
        let b: Env = [("A".to_string(), "2".to_string())].into_iter().collect();
        let env = state.task_env(&[&a, &b]);
        assert_eq!(env["A"], "2");
        assert_eq!(env["HOME"], "/h");
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env["THAW_SANDBOX_ID"], "sb-1");
    }
}
