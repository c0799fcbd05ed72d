//! The Cloud Hypervisor process: spawn an empty VMM on a fresh API socket, wait until it
//! answers, and make sure it never outlives its owner.
//!
//! Each VMM gets its own directory. A VMM killed with SIGKILL leaves `api.sock` and
//! `api.sock.lock` behind and a new VMM refuses that path, so stale files are removed before a
//! spawn and the directory is removed when the VMM is dropped.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tracing::{debug, info_span, warn, Instrument};

use crate::api::{ApiClient, ClientError, VmmPingResponse};

/// How long a fresh VMM may take to create its API socket and answer `vmm.ping`.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VMM may take to exit after `vmm.shutdown` before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(3);

pub const API_SOCKET: &str = "api.sock";
pub const VMM_LOG: &str = "logs/vmm.log";
/// The VMM's pid, written right after spawn (check `/proc/<pid>/cmdline` names this
/// directory's API socket before trusting it: pids are reused).
pub const PID_FILE: &str = "vmm.pid";

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("Cloud Hypervisor binary {bin} not found: install the Cloud Hypervisor static binary from the GitHub releases of cloud-hypervisor/cloud-hypervisor into /usr/local/bin (or set THAW_CLOUD_HYPERVISOR)")]
    BinaryNotFound { bin: PathBuf },
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM's network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM exited during start-up ({status}); log tail:\n{log_tail}")]
    ExitedEarly {
        status: ExitStatus,
        log_tail: String,
    },
    /// `vmm.ping` reported a release older than thaw needs (the VMM was killed).
    #[error("{0}")]
    TooOld(String),
    #[error("the VMM did not answer vmm.ping within {timeout:?} (killed); last error: {last}; log tail:\n{log_tail}")]
    StartTimeout {
        timeout: Duration,
        last: String,
        log_tail: String,
    },
}

/// A running Cloud Hypervisor process. An owned VMM (from [`Vmm::spawn`]) is killed, reaped
/// (best effort) and its directory removed on drop. [`Vmm::detach`] lets the process outlive
/// the handle (a session's VM outlives the thaw process that made it); [`Vmm::attach`] makes
/// a non-owning handle on such a VMM again, which [`Vmm::shutdown`] still ends.
#[derive(Debug)]
pub struct Vmm {
    child: Option<Child>,
    /// The process id, kept after [`Vmm::detach`] drops `child`.
    pid: Option<u32>,
    dir: PathBuf,
    api: ApiClient,
    version: String,
}

impl Vmm {
    /// Starts `bin --api-socket path=<dir>/api.sock` (inside the network namespace `netns`,
    /// a namespace file, if given) and waits until `vmm.ping` answers.
    pub async fn spawn(
        bin: &Path,
        dir: &Path,
        netns: Option<&Path>,
        start_timeout: Duration,
    ) -> Result<Vmm, VmmError> {
        let span = info_span!("vmm_spawn", dir = %dir.display());
        async {
            std::fs::create_dir_all(dir).map_err(|source| VmmError::Dir {
                dir: dir.to_owned(),
                source,
            })?;
            crate::logs::prepare(dir).map_err(|source| VmmError::Dir {
                dir: dir.to_owned(),
                source,
            })?;
            // Until the Vmm below owns the directory, a failure releases the logs' mount (the
            // caller then removes the directory).
            let mut logs = LogsGuard(Some(dir));
            let socket = dir.join(API_SOCKET);
            remove_stale(&socket);
            remove_stale(&lock_path(&socket));
            let log_path = dir.join(VMM_LOG);
            let log = std::fs::File::create(&log_path).map_err(|source| VmmError::Dir {
                dir: dir.to_owned(),
                source,
            })?;
            let log_err = log.try_clone().map_err(|source| VmmError::Dir {
                dir: dir.to_owned(),
                source,
            })?;
            let mut cmd = Command::new(bin);
            cmd.arg("--api-socket")
                .arg(format!("path={}", socket.display()))
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                // Drop kills an owned VMM itself; a detached one must survive its handle.
                .kill_on_drop(false);
            // Opened here, joined by the child between fork and exec: the VMM starts in the
            // namespace, and nothing of this process moves.
            let ns_file = match netns {
                Some(p) => Some(std::fs::File::open(p).map_err(|source| VmmError::Netns {
                    path: p.to_owned(),
                    source,
                })?),
                None => None,
            };
            if let Some(f) = &ns_file {
                use std::os::fd::AsRawFd;
                let fd = f.as_raw_fd();
                // SAFETY: setns(2) is async-signal-safe, and `fd` stays open in the child
                // (the parent holds `ns_file` until spawn returns).
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    });
                }
            }
            let child = cmd.spawn().map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    VmmError::BinaryNotFound {
                        bin: bin.to_owned(),
                    }
                } else {
                    VmmError::Spawn {
                        bin: bin.to_owned(),
                        source,
                    }
                }
            })?;
            drop(ns_file);
            debug!(pid = child.id(), "vmm started");
            // For whoever cleans up after a crash of ours before the caller recorded the VMM.
            if let Some(pid) = child.id() {
                let _ = std::fs::write(dir.join(PID_FILE), pid.to_string());
            }
            logs.0 = None;
            let mut vmm = Vmm {
                pid: child.id(),
                child: Some(child),
                dir: dir.to_owned(),
                api: ApiClient::new(socket),
                version: String::new(),
            };
            let ping = vmm.wait_ready(start_timeout).await?;
            // Checked on every start, not only by `cloud_hypervisor_available`: the binary
            // may be replaced under a running thaw. On error `vmm` is dropped: killed.
            crate::availability::check_version(&ping.version).map_err(VmmError::TooOld)?;
            vmm.version = ping.version;
            Ok(vmm)
        }
        .instrument(span)
        .await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<VmmPingResponse, VmmError> {
        let deadline = Instant::now() + timeout;
        let probe = self.api.clone().with_timeout(Duration::from_secs(1));
        let mut last = String::from("API socket not created yet");
        loop {
            if let Some(status) = self.try_wait() {
                return Err(VmmError::ExitedEarly {
                    status,
                    log_tail: self.log_tail(20),
                });
            }
            if self.api.socket().exists() {
                match probe.ping().await {
                    Ok(p) => return Ok(p),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(VmmError::StartTimeout {
                    timeout,
                    last,
                    log_tail: self.log_tail(20),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cloud Hypervisor's version as reported by `vmm.ping`.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Lets the VMM process outlive this handle: nothing is killed or removed on drop. The
    /// caller records [`Vmm::pid`] (with something that survives pid reuse) to end it later.
    pub fn detach(mut self) {
        // Dropping the tokio Child without kill_on_drop leaves the process running; tokio
        // reaps it in the background if it exits while we still run.
        self.child = None;
    }

    /// A non-owning handle on a VMM started earlier (possibly by another process) in `dir`.
    /// `pid` must have been checked by the caller to still be that VMM (not a reused pid):
    /// [`Vmm::shutdown`] and [`Vmm::kill`] signal it.
    pub fn attach(dir: &Path, pid: Option<u32>) -> Vmm {
        Vmm {
            child: None,
            pid,
            dir: dir.to_owned(),
            api: ApiClient::new(dir.join(API_SOCKET)),
            version: String::new(),
        }
    }

    /// The process has exited (and is reaped): its status.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Last `lines` lines of the VMM's own stdout/stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::util::file_tail(&self.dir.join(VMM_LOG), lines)
    }

    /// SIGKILL now. Used when the VMM stops answering: nothing it holds is worth waiting for.
    pub fn kill(&mut self) {
        if self.child.is_none() {
            if let Some(pid) = self.pid.take() {
                kill_attached(pid);
            }
            return;
        }
        if let Some(child) = self.child.as_mut() {
            if let Err(e) = child.start_kill() {
                // Already exited: nothing to do.
                debug!(error = %e, "vmm kill");
            }
            // Reap without blocking the runtime for long: a SIGKILLed process exits promptly.
            for _ in 0..100 {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
    }

    /// Asks the VMM to exit (`vmm.shutdown`), kills it if it does not within a grace period,
    /// and removes its directory.
    pub async fn shutdown(mut self) {
        let span = info_span!("vmm_shutdown", dir = %self.dir.display());
        async {
            if self.child.is_none() {
                if let Some(pid) = self.pid.filter(|p| crate::util::process_running(*p)) {
                    let _ = self.api.vmm_shutdown().await;
                    let deadline = Instant::now() + EXIT_GRACE;
                    while crate::util::process_running(pid) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            } else if self.try_wait().is_none() {
                if let Err(e) = self.api.vmm_shutdown().await {
                    // The VMM may close the connection before answering: that is success.
                    if !matches!(e, ClientError::Http { .. } | ClientError::Connect { .. }) {
                        warn!(error = %e, "vmm.shutdown failed; killing");
                    }
                }
                if let Some(child) = self.child.as_mut() {
                    if tokio::time::timeout(EXIT_GRACE, child.wait())
                        .await
                        .is_err()
                    {
                        warn!("vmm did not exit after vmm.shutdown; killing");
                    }
                }
            }
            self.cleanup();
        }
        .instrument(span)
        .await
    }

    fn cleanup(&mut self) {
        self.kill();
        self.child = None;
        crate::logs::release(&self.dir);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %self.dir.display(), error = %e, "cannot remove VMM directory");
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.cleanup();
        }
    }
}

/// Releases a VMM directory's log mount unless disarmed (a spawn that failed half way).
struct LogsGuard<'a>(Option<&'a Path>);

impl Drop for LogsGuard<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.0 {
            crate::logs::release(d);
        }
    }
}

/// SIGKILL to a VMM that is not our child, then wait (briefly) until it is gone.
fn kill_attached(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        debug!(pid, error = %e, "vmm kill");
        return;
    }
    for _ in 0..200 {
        if !crate::util::process_running(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    warn!(pid, "vmm still present 1 s after SIGKILL");
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn remove_stale(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => warn!(path = %path.display(), "removed stale file left by a previous VMM"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove stale file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_binary_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let e = Vmm::spawn(
            Path::new("/nonexistent/cloud-hypervisor"),
            &dir.path().join("vm"),
            None,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, VmmError::BinaryNotFound { .. }), "{e}");
        assert!(e.to_string().contains("GitHub releases"));
    }

    #[tokio::test]
    async fn vmm_that_exits_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-ch");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'Error: KVM not available' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = Vmm::spawn(&fake, &dir.path().join("vm"), None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, VmmError::ExitedEarly { .. }), "{e}");
        assert!(e.to_string().contains("KVM not available"), "{e}");
    }

    /// The VMM starts inside the network namespace it is given (where its tap goes), and
    /// this process stays where it was.
    #[tokio::test]
    async fn vmm_starts_in_the_network_namespace_given() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-ch");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"netns $(readlink /proc/self/ns/net)\" >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let ns: std::os::fd::OwnedFd = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok::<_, std::io::Error>(std::fs::File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .unwrap()
        .expect("a network namespace (needs root)");
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", ns.as_raw_fd()));
        let want = std::fs::read_link(&path).unwrap();
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(want, mine);
        let e = Vmm::spawn(
            &fake,
            &dir.path().join("vm"),
            Some(&path),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains(&format!("netns {}", want.display())),
            "{e}"
        );
        assert_eq!(std::fs::read_link("/proc/self/ns/net").unwrap(), mine);
        // A namespace that is not there is named in the error.
        let e = Vmm::spawn(
            &fake,
            &dir.path().join("vm2"),
            Some(Path::new("/nonexistent/ns")),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, VmmError::Netns { .. }), "{e}");
    }

    #[tokio::test]
    async fn silent_vmm_is_killed_after_start_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-ch");
        // Never creates the socket; `exec` so the kill hits the sleeping process itself.
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        // Stale files from a previous VMM must not block the start.
        std::fs::write(vm_dir.join("api.sock.lock"), "").unwrap();
        let t = Instant::now();
        let e = Vmm::spawn(&fake, &vm_dir, None, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, VmmError::StartTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!vm_dir.join("api.sock.lock").exists());
    }
}
