//! Boots the microvm tier's guest image under QEMU with TCG (pure emulation), to prove in CI
//! (and in `thaw doctor --boot-check`) that the kernel, initramfs and rootfs boot and that
//! guest-init answers, on hosts where Cloud Hypervisor cannot run.
//!
//! QEMU boots the bzImage directly. With no vsock device in the guest, guest-init serves the
//! agent protocol on the virtio-serial port named [`thaw_protocol::VIRTIO_SERIAL_NAME`], whose
//! host end is a Unix socket QEMU listens on.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tracing::{debug, info, info_span, Instrument};

use crate::agent::{AgentConn, AgentError};

pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
pub const CONSOLE_LOG: &str = "console.log";
pub const AGENT_SOCKET: &str = "agent.sock";

#[derive(Debug, Clone)]
pub struct QemuSpec {
    pub qemu: PathBuf,
    pub bz_image: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    /// Appended to the base command line (console, root device, quiet, panic=-1).
    pub extra_cmdline: String,
    pub memory_mib: u32,
    /// Fresh directory for the console log and agent socket; removed when the VM is dropped.
    pub workdir: PathBuf,
}

impl QemuSpec {
    pub fn new(bz_image: &Path, initramfs: &Path, rootfs: &Path, workdir: &Path) -> Self {
        QemuSpec {
            qemu: PathBuf::from(DEFAULT_QEMU),
            bz_image: bz_image.to_owned(),
            initramfs: initramfs.to_owned(),
            rootfs: rootfs.to_owned(),
            extra_cmdline: String::new(),
            memory_mib: 512,
            workdir: workdir.to_owned(),
        }
    }

    pub fn cmdline(&self) -> String {
        let base = format!(
            "console=ttyS0 root=/dev/vda quiet loglevel=3 panic=-1 thaw.init=/sbin/thaw-init \
             thaw.agent_port={}",
            thaw_protocol::VIRTIO_SERIAL_NAME
        );
        if self.extra_cmdline.is_empty() {
            base
        } else {
            format!("{base} {}", self.extra_cmdline)
        }
    }

    /// QEMU's arguments: TCG, one vCPU, no default devices, serial to a file, the rootfs as a
    /// virtio disk, and a virtio-serial port for the agent.
    pub fn args(&self) -> Vec<String> {
        let agent = self.workdir.join(AGENT_SOCKET);
        let console = self.workdir.join(CONSOLE_LOG);
        vec![
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            "1".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", console.display()),
            "-kernel".into(),
            self.bz_image.display().to_string(),
            "-initrd".into(),
            self.initramfs.display().to_string(),
            "-append".into(),
            self.cmdline(),
            "-drive".into(),
            format!("file={},format=raw,if=virtio", self.rootfs.display()),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent.display()
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                thaw_protocol::VIRTIO_SERIAL_NAME
            ),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{qemu} not found: install qemu-system-x86 (scripts/install-deps.sh)")]
    NotInstalled { qemu: PathBuf },
    #[error("cannot start {qemu}: {source}")]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU work directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited ({status}) before {waiting_for}; console tail:\n{console_tail}")]
    Exited {
        status: ExitStatus,
        waiting_for: String,
        console_tail: String,
    },
    #[error("guest not ready: no {waiting_for} within {timeout:?}; console tail:\n{console_tail}")]
    GuestNotReady {
        waiting_for: String,
        timeout: Duration,
        console_tail: String,
    },
    #[error("agent protocol failed: {source}; console tail:\n{console_tail}")]
    Agent {
        #[source]
        source: AgentError,
        console_tail: String,
    },
}

/// A running QEMU guest. Killed and its work directory removed on drop.
pub struct QemuVm {
    child: Child,
    workdir: PathBuf,
    started: Instant,
}

impl QemuVm {
    pub async fn boot(spec: &QemuSpec) -> Result<QemuVm, QemuError> {
        let span = info_span!("qemu_boot", workdir = %spec.workdir.display());
        async {
            std::fs::create_dir_all(&spec.workdir).map_err(|source| QemuError::Dir {
                dir: spec.workdir.clone(),
                source,
            })?;
            let _ = std::fs::remove_file(spec.workdir.join(AGENT_SOCKET));
            let log = spec.workdir.join("qemu.log");
            let log = std::fs::File::create(&log).map_err(|source| QemuError::Dir {
                dir: spec.workdir.clone(),
                source,
            })?;
            let log2 = log.try_clone().map_err(|source| QemuError::Dir {
                dir: spec.workdir.clone(),
                source,
            })?;
            let args = spec.args();
            debug!(?args, "starting qemu");
            let child = Command::new(&spec.qemu)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| {
                    if source.kind() == std::io::ErrorKind::NotFound {
                        QemuError::NotInstalled {
                            qemu: spec.qemu.clone(),
                        }
                    } else {
                        QemuError::Spawn {
                            qemu: spec.qemu.clone(),
                            source,
                        }
                    }
                })?;
            Ok(QemuVm {
                child,
                workdir: spec.workdir.clone(),
                started: Instant::now(),
            })
        }
        .instrument(span)
        .await
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Last lines of the guest's serial console plus QEMU's own messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let console = crate::util::file_tail(&self.workdir.join(CONSOLE_LOG), lines);
        let qemu = crate::util::file_tail(&self.workdir.join("qemu.log"), 5);
        if qemu == "(empty)" {
            console
        } else {
            format!("{console}\n[qemu] {qemu}")
        }
    }

    fn exited(&mut self, waiting_for: &str) -> Option<QemuError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(QemuError::Exited {
                status,
                waiting_for: waiting_for.to_owned(),
                console_tail: self.console_tail(30),
            }),
            _ => None,
        }
    }

    /// Waits until `marker` appears on the serial console.
    pub async fn wait_for_console(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> Result<Duration, QemuError> {
        let deadline = Instant::now() + timeout;
        let path = self.workdir.join(CONSOLE_LOG);
        loop {
            if let Ok(text) = std::fs::read(&path) {
                if String::from_utf8_lossy(&text).contains(marker) {
                    return Ok(self.started.elapsed());
                }
            }
            if let Some(e) = self.exited(&format!("console marker {marker:?}")) {
                // The marker may have been written just before exiting.
                if let Ok(text) = std::fs::read(&path) {
                    if String::from_utf8_lossy(&text).contains(marker) {
                        return Ok(self.started.elapsed());
                    }
                }
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::GuestNotReady {
                    waiting_for: format!("console marker {marker:?}"),
                    timeout,
                    console_tail: self.console_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Connects to the agent's virtio-serial socket and waits until guest-init answers `Ping`.
    ///
    /// virtio-serial has no connections: bytes written before guest-init opens its port wait
    /// in QEMU, so exactly one `Ping` is sent and awaited for the whole timeout (a retry would
    /// leave a second `Pong` queued for the next exchange).
    pub async fn wait_agent_ready(
        &mut self,
        timeout: Duration,
    ) -> Result<AgentConn<UnixStream>, QemuError> {
        let deadline = Instant::now() + timeout;
        let sock = self.workdir.join(AGENT_SOCKET);
        let stream = loop {
            if let Some(e) = self.exited("the agent socket") {
                return Err(e);
            }
            if let Ok(s) = UnixStream::connect(&sock).await {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(QemuError::GuestNotReady {
                    waiting_for: format!("agent socket {}", sock.display()),
                    timeout,
                    console_tail: self.console_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut conn = AgentConn::new(stream);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = tokio::select! {
            r = conn.ping(remaining) => Some(r),
            _ = self.child.wait() => None,
        };
        match result {
            Some(Ok(_)) => {
                info!(
                    elapsed_ms = self.started.elapsed().as_millis() as u64,
                    "guest-init ready"
                );
                Ok(conn)
            }
            Some(Err(AgentError::Timeout { .. })) => Err(QemuError::GuestNotReady {
                waiting_for: "Pong from guest-init".into(),
                timeout,
                console_tail: self.console_tail(30),
            }),
            Some(Err(source)) => Err(QemuError::Agent {
                source,
                console_tail: self.console_tail(30),
            }),
            None => {
                Err(self
                    .exited("a Pong from guest-init")
                    .unwrap_or(QemuError::GuestNotReady {
                        waiting_for: "Pong from guest-init".into(),
                        timeout,
                        console_tail: self.console_tail(30),
                    }))
            }
        }
    }

    /// Waits for QEMU to exit (the guest powered off; `-no-reboot` turns reboots into exits).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(|r| r.ok())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}
