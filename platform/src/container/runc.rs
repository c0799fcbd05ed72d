//! A thin wrapper over the `runc` binary.
//!
//! Why runc and not youki's `libcontainer` in-process: runc 1.1 is in Debian (so `make` can
//! install it), it is the reference OCI runtime, and it drives CRIU for checkpoint/restore
//! with years of hardening around mounts and namespaces, which is exactly the part of the
//! container tier we most need to be right. Sessions are restored and checkpointed through
//! it; a clone that ends in a discard is restored by CRIU alone (`criu_restore`), because
//! runc's share of that restore was a third of it (docs/benchmarks.md).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Runc {
    /// `runc --root`: our private state directory.
    pub root: PathBuf,
}

/// How a build container's command ended ([`Runc::run_build`]).
#[derive(Debug)]
pub struct BuildRun {
    /// runc's exit status, which is the command's (a signal death shows as 128+N).
    pub status: std::process::ExitStatus,
    /// The host killed it at the time limit.
    pub timed_out: bool,
    /// The last bytes of stdout and stderr, interleaved as written.
    pub output: Vec<u8>,
    /// Bytes read and dropped before those.
    pub dropped: u64,
}

/// The last `cap` bytes of a stream.
pub struct TailBuffer {
    cap: usize,
    buf: std::collections::VecDeque<u8>,
    pub dropped: u64,
}

impl TailBuffer {
    pub fn new(cap: usize) -> TailBuffer {
        TailBuffer {
            cap,
            buf: std::collections::VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let keep = &bytes[bytes.len().saturating_sub(self.cap)..];
        self.dropped += (bytes.len() - keep.len()) as u64;
        let over = (self.buf.len() + keep.len()).saturating_sub(self.cap);
        self.dropped += over as u64;
        self.buf.drain(..over);
        self.buf.extend(keep);
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf.into()
    }
}

/// Output of a finished runc (or container) process.
#[derive(Debug)]
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Runc {
    pub fn new(root: impl Into<PathBuf>) -> Runc {
        Runc { root: root.into() }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.root);
        c.kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str], what: &str) -> Result<Finished> {
        let out = self
            .cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| spawn_error(e, what))?;
        let f = Finished {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        };
        if !f.status.success() {
            return Err(Error::Runtime {
                command: format!("runc {what}"),
                message: tail(&f.stderr, 600),
            });
        }
        Ok(f)
    }

    /// `runc run --detach`: creates and starts the container; returns once its init runs.
    /// The container's stdout/stderr go to `log` (see [`StdioPipes`]).
    pub async fn run_detached(&self, id: &str, bundle: &Path, log: &Path) -> Result<()> {
        let mut cmd = self.cmd();
        cmd.args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id);
        self.spawn_with_pipes(cmd, log, "run").await
    }

    /// `runc restore --detach` with the given extra arguments; stdio as in [`Self::run_detached`].
    pub async fn restore_detached(&self, args: &[std::ffi::OsString], log: &Path) -> Result<()> {
        let mut cmd = self.cmd();
        cmd.arg("restore").arg("--detach").args(args);
        self.spawn_with_pipes(cmd, log, "restore").await
    }

    async fn spawn_with_pipes(&self, mut cmd: Command, log: &Path, what: &str) -> Result<()> {
        let pipes = StdioPipes::new(log)?;
        let (stdin, stdout, stderr) = pipes.child_ends()?;
        let status = cmd
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .status()
            .await
            .map_err(|e| spawn_error(e, what))?;
        pipes.drain_in_background();
        if !status.success() {
            // Give the drain thread a moment to copy runc's own error message.
            std::thread::sleep(Duration::from_millis(20));
            let log_text = std::fs::read(log).unwrap_or_default();
            return Err(Error::Runtime {
                command: format!("runc {what}"),
                message: tail(&log_text, 600),
            });
        }
        Ok(())
    }

    /// `runc run --keep` in the foreground for a build-time setup command. The container's
    /// stdout and stderr share one pipe, of which the host keeps only the last `output_cap`
    /// bytes (the rest is read and dropped, so a chatty or hostile command cannot grow
    /// thaw's memory). Past `timeout`, the host kills every process of the container; the
    /// command gets no say. `--keep` leaves the stopped container, and with it its cgroups,
    /// so the caller can read why it died (OOM, pids) before [`Self::delete`], which the
    /// caller must call whatever this returns.
    pub async fn run_build(
        &self,
        id: &str,
        bundle: &Path,
        timeout: Duration,
        output_cap: usize,
    ) -> Result<BuildRun> {
        let pipe_err = |e: nix::errno::Errno| Error::Runtime {
            command: "pipe".into(),
            message: e.to_string(),
        };
        let (out_read, out_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(pipe_err)?;
        let dup = |fd: &std::os::fd::OwnedFd| {
            fd.try_clone().map_err(|e| Error::Runtime {
                command: "dup".into(),
                message: e.to_string(),
            })
        };
        let mut child = self
            .cmd()
            .args(["run", "--keep", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::from(dup(&out_write)?))
            .stderr(Stdio::from(dup(&out_write)?))
            .spawn()
            .map_err(|e| spawn_error(e, "run"))?;
        // Only runc and the container hold the write end now: EOF means they are all gone.
        drop(out_write);
        let reader = tokio::task::spawn_blocking(move || {
            let mut tail = TailBuffer::new(output_cap);
            let mut r = std::fs::File::from(out_read);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match std::io::Read::read(&mut r, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => tail.push(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            tail
        });
        let timed_out = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(_)) => false,
            Ok(Err(e)) => return Err(Error::io("waiting for runc", bundle, e)),
            Err(_) => {
                tracing::info!(container = id, "build step over its time limit: killing it");
                // Every process of the container (its pid namespace dies with its init).
                let _ = self.kill(id).await;
                if tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                true
            }
        };
        let status = child
            .wait()
            .await
            .map_err(|e| Error::io("waiting for runc", bundle, e))?;
        // The container's processes are dead, so the pipe reaches EOF promptly; the bound is
        // for a process that escaped into another pid namespace and kept the pipe.
        let tail = match tokio::time::timeout(Duration::from_secs(10), reader).await {
            Ok(Ok(t)) => t,
            _ => TailBuffer::new(0),
        };
        Ok(BuildRun {
            status,
            timed_out,
            dropped: tail.dropped,
            output: tail.into_bytes(),
        })
    }

    pub async fn kill(&self, id: &str) -> Result<()> {
        self.run(&["kill", "--all", id, "KILL"], "kill")
            .await
            .map(|_| ())
    }

    /// `runc delete --force`: kills whatever is left and removes the cgroup and state.
    pub async fn delete(&self, id: &str) -> Result<()> {
        match self.run(&["delete", "--force", id], "delete").await {
            Ok(_) => Ok(()),
            Err(Error::Runtime { message, .. }) if message.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Container ids in our state directory.
    pub async fn list(&self) -> Result<Vec<String>> {
        let f = self.run(&["list", "--quiet"], "list").await?;
        Ok(String::from_utf8_lossy(&f.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Host pid of the container's init.
    pub async fn init_pid(&self, id: &str) -> Result<u32> {
        let f = self.run(&["state", id], "state").await?;
        let v: serde_json::Value =
            serde_json::from_slice(&f.stdout).map_err(|e| Error::Runtime {
                command: "runc state".into(),
                message: format!("unreadable state JSON: {e}"),
            })?;
        v["pid"]
            .as_u64()
            .filter(|p| *p > 0)
            .map(|p| p as u32)
            .ok_or_else(|| Error::Runtime {
                command: "runc state".into(),
                message: format!("container {id} has no running init"),
            })
    }
}

fn spawn_error(e: std::io::Error, what: &str) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::MissingDependency {
            what: "runc (OCI runtime)".into(),
            fix: "run `make deps` or `apt-get install runc`".into(),
        }
    } else {
        Error::Runtime {
            command: format!("runc {what}"),
            message: e.to_string(),
        }
    }
}

/// The last `max` bytes of some output, on one line.
pub fn tail(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.len().saturating_sub(max);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    let t = s[start..].replace('\n', " | ");
    if t.is_empty() {
        "(no output)".to_string()
    } else {
        t
    }
}

/// Stdio for a detached container: pipes, not files. CRIU can dump and restore a pipe whose
/// other end is outside the container (runc declares it external and re-attaches new pipes
/// on restore), but not a host file or the host's /dev/null, which live outside the
/// container's mount namespace. A host thread copies the output into the log file until the
/// last writer is gone.
pub struct StdioPipes {
    stdin_read: std::os::fd::OwnedFd,
    out_read: std::os::fd::OwnedFd,
    out_write: std::os::fd::OwnedFd,
    log: std::fs::File,
}

impl StdioPipes {
    pub fn new(log: &Path) -> Result<StdioPipes> {
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Runtime {
                command: "pipe".into(),
                message: e.to_string(),
            })
        };
        // The write end of stdin is dropped at once: the container reads EOF.
        let (stdin_read, _stdin_write) = pipe()?;
        let (out_read, out_write) = pipe()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io("creating container log", log, e))?;
        Ok(StdioPipes {
            stdin_read,
            out_read,
            out_write,
            log,
        })
    }

    pub(crate) fn child_ends(&self) -> Result<(Stdio, Stdio, Stdio)> {
        let dup = |fd: &std::os::fd::OwnedFd| {
            fd.try_clone().map_err(|e| Error::Runtime {
                command: "dup".into(),
                message: e.to_string(),
            })
        };
        Ok((
            Stdio::from(dup(&self.stdin_read)?),
            Stdio::from(dup(&self.out_write)?),
            Stdio::from(dup(&self.out_write)?),
        ))
    }

    /// Copies the container's stdout/stderr into its log, at most [`LOG_CAP`] bytes of log
    /// in all (a restore appends to the boot's log). A task can write there through
    /// guest-init's own stdout (`/proc/1/fd/1`), so the copy must be bounded; past the cap
    /// the pipe is still read, and what comes discarded, so the sandbox never blocks on it.
    pub(crate) fn drain_in_background(self) {
        let StdioPipes { out_read, log, .. } = self;
        std::thread::spawn(move || {
            let already = log.metadata().map(|m| m.len()).unwrap_or(0);
            let r = std::fs::File::from(out_read);
            let _ = drain_capped(r, log, already, LOG_CAP);
        });
    }
}

/// Most bytes of a container's stdout/stderr kept in its host-side log (`init.log`): plenty
/// for guest-init's own diagnostics, which are a few lines.
pub const LOG_CAP: u64 = 1 << 20;

/// Reads `r` to its end, writing into `log` until it holds `cap` bytes (`already` are there),
/// then one line saying the rest was discarded. Returns the bytes read in all.
pub(crate) fn drain_capped(
    mut r: impl std::io::Read,
    mut log: impl std::io::Write,
    already: u64,
    cap: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut kept = already;
    let mut total = 0u64;
    let mut noted = false;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        let room = usize::try_from(cap.saturating_sub(kept)).unwrap_or(usize::MAX);
        let keep = n.min(room);
        // A failing log (disk full) must not stop the draining: the sandbox would block.
        if keep > 0 && log.write_all(&buf[..keep]).is_ok() {
            kept += keep as u64;
        }
        if keep < n && !noted {
            noted = true;
            let _ = writeln!(
                log,
                "\n[thaw: this log is capped at {cap} bytes; the sandbox's further output is discarded]"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_buffer_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = TailBuffer::new(4);
        t.push(b"ab");
        t.push(b"cdef");
        assert_eq!(t.dropped, 2);
        t.push(b"0123456789");
        assert_eq!(t.dropped, 12);
        assert_eq!(t.into_bytes(), b"6789");
        let mut z = TailBuffer::new(0);
        z.push(b"xyz");
        assert_eq!((z.dropped, z.into_bytes().len()), (3, 0));
    }

    #[test]
    fn the_log_stops_at_its_cap_but_the_pipe_is_drained_to_its_end() {
        let input = vec![b'x'; 3 << 20];
        let mut log = Vec::new();
        let read = drain_capped(&input[..], &mut log, 0, 1 << 20).unwrap();
        assert_eq!(
            read,
            3 << 20,
            "everything is read, so the writer never blocks"
        );
        let text = String::from_utf8_lossy(&log);
        assert!(text.starts_with(&"x".repeat(1 << 20)));
        assert_eq!(text.matches("[thaw: this log is capped").count(), 1);
        assert!(log.len() < (1 << 20) + 200, "{}", log.len());
    }

    #[test]
    fn a_log_already_at_its_cap_takes_nothing_more() {
        let mut log = Vec::new();
        drain_capped(&b"abc"[..], &mut log, 10, 10).unwrap();
        assert!(String::from_utf8_lossy(&log).contains("capped at 10 bytes"));
        let mut log = Vec::new();
        drain_capped(&b"abc"[..], &mut log, 5, 10).unwrap();
        assert_eq!(log, b"abc");
    }
}
