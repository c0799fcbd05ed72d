//! Spawning, supervising and killing tasks from guest-init's side.
//!
//! Every task runs under a `guest-init --supervise` process (see `supervisor.rs`) that owns
//! the tree and reports over a status pipe. guest-init only talks to it: it reads the
//! status lines, reads the task's output pipes, and on timeout or cancel sends SIGUSR1. If
//! the supervisor does not report within [`KILL_GRACE`], guest-init SIGKILLs the tree itself.

use std::collections::HashMap;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thaw_protocol::{Bytes, Env, Outcome, Response, Stream, TaskLimits};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::pipe;

use crate::lines::{Line, LineReader};
use crate::server::{Cancel, Disconnected, Out};
use crate::supervisor::{Status, STATUS_FD};
use crate::{oom, procs};

/// How long the supervisor gets to kill the tree and report before guest-init does it.
pub const KILL_GRACE: Duration = Duration::from_secs(1);
/// How long output pipes may stay open after the task's status is known. Only a process
/// that escaped the supervisor (its supervisor was itself killed) can hold them longer.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bytes of stderr kept for error reports.
pub const STDERR_TAIL: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The command could not be started; the message names the program and the cause.
    #[error("{0}")]
    Command(String),
    /// guest-init could not set up the supervisor (pipes, fork, /proc/self/exe).
    #[error("cannot start the task supervisor: {0}")]
    Supervisor(String),
}

/// What to connect the task's stdin to.
pub enum StdinMode {
    Null,
    /// Write these bytes, then close.
    Data(Vec<u8>),
    /// Keep a pipe open for the caller (persistent worker).
    Pipe,
}

pub struct TaskSpec {
    pub argv: Vec<String>,
    pub env: Env,
    pub cwd: Option<String>,
    pub stdin: StdinMode,
}

/// Supervisors of live tasks, so Shutdown can kill everything.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, i32>>,
}

impl Registry {
    fn add(self: &Arc<Self>, supervisor: i32) -> RegistryGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, supervisor);
        }
        RegistryGuard {
            registry: self.clone(),
            id,
        }
    }

    pub fn supervisors(&self) -> Vec<i32> {
        self.live
            .lock()
            .map(|l| l.values().copied().collect())
            .unwrap_or_default()
    }
}

struct RegistryGuard {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for RegistryGuard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.registry.live.lock() {
            live.remove(&self.id);
        }
    }
}

/// A running (or finished) task.
pub struct Task {
    supervisor_pid: i32,
    /// The command's pid (also its process-group id); 0 until started.
    pub pid: u32,
    status: LineReader<pipe::Receiver>,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    /// The final status line, once read (None while running).
    finished: Option<Status>,
    kill_sent: Option<Instant>,
    pub oom_before: Option<u64>,
    pub started: Instant,
    _registered: RegistryGuard,
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array; O_CLOEXEC keeps them out of other
    // children, the one end meant for this child is dup'ed onto 0/1/2/3 by exec setup.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn sup_err(what: &str) -> impl Fn(std::io::Error) -> SpawnError + '_ {
    move |e| SpawnError::Supervisor(format!("{what}: {e}"))
}

impl Task {
    /// Starts the supervisor and waits for it to report that the command started.
    pub async fn spawn(spec: TaskSpec, registry: &Arc<Registry>) -> Result<Task, SpawnError> {
        if spec.argv.is_empty() {
            return Err(SpawnError::Command("empty argv".into()));
        }
        let oom_before = oom::oom_kills();
        let (stdin_child, stdin_parent, stdin_data) = match spec.stdin {
            StdinMode::Null => (Stdio::null(), None, None),
            StdinMode::Data(data) => {
                let (r, w) = pipe_pair().map_err(sup_err("stdin pipe"))?;
                (Stdio::from(r), Some(w), Some(data))
            }
            StdinMode::Pipe => {
                let (r, w) = pipe_pair().map_err(sup_err("stdin pipe"))?;
                (Stdio::from(r), Some(w), None)
            }
        };
        let (out_r, out_w) = pipe_pair().map_err(sup_err("stdout pipe"))?;
        let (err_r, err_w) = pipe_pair().map_err(sup_err("stderr pipe"))?;
        let (st_r, st_w) = pipe_pair().map_err(sup_err("status pipe"))?;

        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg0("guest-init").arg("--supervise");
        if let Some(cwd) = &spec.cwd {
            cmd.arg("--cwd").arg(cwd);
        }
        cmd.arg("--")
            .args(&spec.argv)
            .env_clear()
            .envs(&spec.env)
            .stdin(stdin_child)
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            // Own process group: terminal signals aimed at guest-init's group (tests run
            // it from a shell) must not kill supervisors behind our back.
            .process_group(0);
        let st_fd = st_w.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
        // functions (dup2, fcntl) on integers.
        unsafe {
            cmd.pre_exec(move || {
                if st_fd == STATUS_FD {
                    // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
                    if libc::fcntl(STATUS_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(st_fd, STATUS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Safe with the global reaper: this runtime is single-threaded, so the reaper
        // cannot run while std waits for a failed exec inside spawn().
        let child = cmd.spawn().map_err(sup_err("spawn /proc/self/exe"))?;
        let supervisor_pid = child.id() as i32;
        // Never wait on it: the global reaper collects the supervisor.
        drop(child);
        // Close our copies of the child ends (held by cmd) so EOF works.
        drop(cmd);
        drop(st_w);

        let rx = |fd: OwnedFd, what: &str| {
            pipe::Receiver::from_owned_fd(fd)
                .map_err(|e| SpawnError::Supervisor(format!("{what}: {e}")))
        };
        let mut task = Task {
            supervisor_pid,
            pid: 0,
            status: LineReader::new(rx(st_r, "status pipe")?),
            stdin: None,
            stdout: Some(rx(out_r, "stdout pipe")?),
            stderr: Some(rx(err_r, "stderr pipe")?),
            finished: None,
            kill_sent: None,
            oom_before,
            started: Instant::now(),
            _registered: registry.add(supervisor_pid),
        };
        if let Some(w) = stdin_parent {
            let mut tx = pipe::Sender::from_owned_fd(w).map_err(sup_err("stdin pipe"))?;
            match stdin_data {
                Some(data) => {
                    // Feed stdin in the background: a task that does not read it must not
                    // block us. EPIPE (task exited early) is not an error.
                    tokio::spawn(async move {
                        let _ = tx.write_all(&data).await;
                    });
                }
                None => task.stdin = Some(tx),
            }
        }
        match task.next_status().await {
            Some(Status::Started { pid }) => {
                task.pid = pid;
                task.started = Instant::now();
                Ok(task)
            }
            Some(Status::SpawnFailed { message }) => {
                // The supervisor exits by itself; make sure Drop does not signal it.
                task.finished = Some(Status::Exited { code: 127 });
                Err(SpawnError::Command(message))
            }
            other => Err(SpawnError::Supervisor(format!(
                "supervisor reported {other:?} instead of a start"
            ))),
        }
    }

    /// Next status line; `None` at EOF (supervisor gone) or on garbage.
    async fn next_status(&mut self) -> Option<Status> {
        match self.status.read_line(4096).await {
            Ok(Line::Line { data, .. }) => serde_json::from_slice(&data).ok(),
            _ => None,
        }
    }

    /// Waits for the task's final status (cancel-safe). Returns the status once known;
    /// a lost supervisor counts as SIGKILL.
    pub async fn wait(&mut self) -> Status {
        if let Some(st) = &self.finished {
            return st.clone();
        }
        let st = loop {
            match self.next_status().await {
                Some(st @ (Status::Exited { .. } | Status::Signaled { .. })) => break st,
                Some(_) => continue,
                None => {
                    break Status::Signaled {
                        signal: libc::SIGKILL,
                    }
                }
            }
        };
        self.finished = Some(st.clone());
        st
    }

    /// Asks the supervisor to kill the whole tree. Non-blocking; follow with
    /// [`Task::kill_deadline`] / [`Task::force_kill`] if it does not report in time.
    pub fn request_kill(&mut self) {
        if self.finished.is_some() || self.kill_sent.is_some() {
            return;
        }
        self.kill_sent = Some(Instant::now());
        // SAFETY: kill(2). The supervisor has not reported its final status yet, so it has
        // not exited and its pid cannot have been reused.
        unsafe {
            libc::kill(self.supervisor_pid, libc::SIGUSR1);
        }
    }

    /// When guest-init should stop waiting for the supervisor and kill the tree itself.
    pub fn kill_deadline(&self) -> Option<tokio::time::Instant> {
        match (self.kill_sent, &self.finished) {
            (Some(at), None) => Some(tokio::time::Instant::from_std(at + KILL_GRACE)),
            _ => None,
        }
    }

    /// The fallback: SIGKILL every descendant of the supervisor, then the supervisor.
    /// Orphans then reparent to guest-init (a subreaper) and its reaper collects them.
    pub fn force_kill(&mut self) {
        if self.finished.is_some() {
            return;
        }
        crate::warn!(
            "supervisor {} did not report within {KILL_GRACE:?}; killing the tree directly",
            self.supervisor_pid
        );
        // SAFETY: kill(2) on the task's process group and on the supervisor.
        unsafe {
            if self.pid > 0 {
                libc::kill(-(self.pid as i32), libc::SIGKILL);
            }
        }
        // No reaping here: the stuck supervisor is their parent; they stay attached to it
        // (as zombies) until it dies, which keeps the walk accurate.
        procs::kill_tree(self.supervisor_pid, Duration::from_millis(500), || {});
        // SAFETY: as above.
        unsafe {
            libc::kill(self.supervisor_pid, libc::SIGKILL);
        }
        self.finished = Some(Status::Signaled {
            signal: libc::SIGKILL,
        });
    }

    /// Kills the tree and waits until it is gone (used outside streaming loops).
    pub async fn kill_and_wait(&mut self) {
        self.request_kill();
        if tokio::time::timeout(KILL_GRACE, self.wait()).await.is_err() {
            self.force_kill();
        }
    }

    /// Maps the final status to an outcome, given whether guest-init killed it on timeout.
    pub fn outcome(&self, status: &Status, timed_out: bool) -> Outcome {
        if timed_out {
            return Outcome::Timeout;
        }
        match *status {
            Status::Exited { code } => Outcome::Exited { code },
            Status::Signaled { signal }
                if signal == libc::SIGKILL && oom::rose_since(self.oom_before) =>
            {
                Outcome::Oom
            }
            Status::Signaled { signal } => Outcome::Signaled { signal },
            // Not reachable for a final status; keep a sane mapping anyway.
            Status::Started { .. } | Status::SpawnFailed { .. } => Outcome::Signaled {
                signal: libc::SIGKILL,
            },
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis().min(u64::MAX as u128) as u64
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // A task must never outlive its owner (e.g. a connection task that was aborted).
        if self.finished.is_none() {
            self.request_kill();
        }
    }
}

/// What to do with a task's stdout.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum StdoutMode {
    /// Send it to the host as `Output` frames.
    Forward,
    /// Keep it (up to the cap) for the caller.
    Collect,
}

pub struct RunResult {
    pub outcome: Outcome,
    pub duration_ms: u64,
    pub truncated: bool,
    pub stdout: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

/// Appends to a ring-like tail buffer keeping the last `STDERR_TAIL` bytes.
pub fn push_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(data);
    if tail.len() > STDERR_TAIL {
        let cut = tail.len() - STDERR_TAIL;
        tail.drain(..cut);
    }
}

/// Output accounting against the combined cap.
pub struct OutputCap {
    remaining: u64,
    pub truncated: bool,
}

impl OutputCap {
    pub fn new(cap: u64) -> Self {
        OutputCap {
            remaining: cap,
            truncated: false,
        }
    }

    /// The part of `data` that may still be kept.
    pub fn admit<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let n = (data.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        if n < data.len() {
            self.truncated = true;
        }
        &data[..n]
    }
}

/// Streams a started task to completion under `limits`. Returns `Err(Disconnected)` if the
/// host went away (the tree is killed before returning).
pub async fn run(
    task: &mut Task,
    limits: &TaskLimits,
    stdout_mode: StdoutMode,
    out: &mut Out,
    cancel: &mut Cancel,
) -> Result<RunResult, Disconnected> {
    let deadline = limits
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut cap = OutputCap::new(limits.output_cap);
    let mut collected = Vec::new();
    let mut tail = Vec::new();
    let mut timed_out = false;
    let mut disconnected = false;
    let mut status: Option<Status> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut stdout = task.stdout.take();
    let mut stderr = task.stderr.take();
    let mut obuf = vec![0u8; 65536];
    let mut ebuf = vec![0u8; 65536];

    while stdout.is_some() || stderr.is_some() || status.is_none() {
        let kill_deadline = task.kill_deadline();
        tokio::select! {
            r = read_opt(&mut stdout, &mut obuf) => {
                let n = r.unwrap_or(0);
                if n == 0 {
                    stdout = None;
                    continue;
                }
                let kept = cap.admit(&obuf[..n]);
                if kept.is_empty() || disconnected {
                    continue;
                }
                match stdout_mode {
                    StdoutMode::Collect => collected.extend_from_slice(kept),
                    StdoutMode::Forward => {
                        let resp = Response::Output { stream: Stream::Stdout, data: Bytes(kept.to_vec()) };
                        if out.send(&resp).await.is_err() {
                            disconnected = true;
                            task.request_kill();
                        }
                    }
                }
            }
            r = read_opt(&mut stderr, &mut ebuf) => {
                let n = r.unwrap_or(0);
                if n == 0 {
                    stderr = None;
                    continue;
                }
                push_tail(&mut tail, &ebuf[..n]);
                let kept = cap.admit(&ebuf[..n]);
                if kept.is_empty() || disconnected {
                    continue;
                }
                let resp = Response::Output { stream: Stream::Stderr, data: Bytes(kept.to_vec()) };
                if out.send(&resp).await.is_err() {
                    disconnected = true;
                    task.request_kill();
                }
            }
            st = task.wait(), if status.is_none() => {
                status = Some(st);
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            _ = sleep_until_opt(deadline), if !timed_out && status.is_none() && !disconnected => {
                crate::debug!("task {} timed out; killing its tree", task.pid);
                timed_out = true;
                task.request_kill();
            }
            _ = crate::server::cancelled(cancel), if !disconnected && status.is_none() => {
                crate::debug!("host closed the connection; killing task {}", task.pid);
                disconnected = true;
                task.request_kill();
            }
            _ = sleep_until_opt(kill_deadline), if status.is_none() && kill_deadline.is_some() => {
                task.force_kill();
            }
            _ = sleep_until_opt(drain_deadline), if drain_deadline.is_some() => {
                crate::warn!("task {} ended but its output pipes stay open; closing them", task.pid);
                stdout = None;
                stderr = None;
            }
        }
    }
    let status = status.unwrap_or(Status::Signaled {
        signal: libc::SIGKILL,
    });
    if disconnected {
        return Err(Disconnected);
    }
    Ok(RunResult {
        outcome: task.outcome(&status, timed_out),
        duration_ms: task.elapsed_ms(),
        truncated: cap.truncated,
        stdout: collected,
        stderr_tail: tail,
    })
}

/// Reads from an optional pipe; pending forever when absent (so `select!` ignores it).
async fn read_opt(rx: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match rx {
        Some(rx) => rx.read(buf).await,
        None => std::future::pending().await,
    }
}

pub async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_truncates_combined_output() {
        let mut cap = OutputCap::new(5);
        assert_eq!(cap.admit(b"abc"), b"abc");
        assert!(!cap.truncated);
        assert_eq!(cap.admit(b"defg"), b"de");
        assert!(cap.truncated);
        assert_eq!(cap.admit(b"h"), b"");
    }

    #[test]
    fn tail_keeps_last_bytes() {
        let mut tail = Vec::new();
        push_tail(&mut tail, &vec![b'a'; STDERR_TAIL]);
        push_tail(&mut tail, b"xyz");
        assert_eq!(tail.len(), STDERR_TAIL);
        assert!(tail.ends_with(b"axyz"));
    }
}
