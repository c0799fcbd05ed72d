//! The high-level VM the platform drives: boot from a spec, or restore a snapshot into a fresh
//! VMM; pause, resume, snapshot; reach guest-init over hybrid vsock.
//!
//! A [`Vm`] owns its VMM process and its work directory (API socket, vsock socket, console
//! log, the clone's materialised snapshot and disk). Dropping it, or any failure while it is
//! being set up, kills the VMM and removes the directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tracing::{debug, info, info_span, Instrument};

use crate::agent::AgentConn;
use crate::api::patience;
use crate::api::{
    file_url, ClientError, ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, MemoryRestoreMode,
    NetConfig, PayloadConfig, RestoreConfig, RngConfig, VmConfig, VmInfo, VmSnapshotConfig,
    VsockConfig,
};
use crate::restore::{self, CloneRewrite, RestoreError};
use crate::vmm::{Vmm, VmmError, DEFAULT_START_TIMEOUT};
use crate::vsock::{self, VsockError};

pub const VSOCK_SOCKET: &str = "vsock.sock";
/// In the capped log directory ([`crate::logs`]), like the VMM's own log.
pub const CONSOLE_LOG: &str = "logs/console.log";
const VIRTIO_CONSOLE_LOG: &str = "logs/virtio-console.log";
const SNAPSHOT_COPY: &str = "snapshot";

/// Default kernel command line for Cloud Hypervisor guests: serial console on ttyS0 (to the
/// log file), rootfs on the first virtio disk, quiet, and reboot (= VMM exit) on panic.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 root=/dev/vda quiet loglevel=3 panic=-1 thaw.init=/sbin/thaw-init";

/// Time a paused VM's snapshot may take (writes all guest RAM).
pub const DEFAULT_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// ELF `vmlinux` with a PVH entry point ([`crate::image::Kernel::vmlinux`]).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// The VM's own ext4 image (written by the guest: give each VM a private copy), raw, or
    /// a qcow2 overlay when its name ends in `.qcow2` ([`crate::disk`]).
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// vsock context id, >= 3, unique per host.
    pub cid: u32,
    /// Must not exist or be empty; owned (and removed) by the [`Vm`].
    pub workdir: PathBuf,
    /// The guest's network device, if it has one.
    pub network: Option<NetworkSpec>,
}

/// A virtio-net device whose tap lives in a network namespace of the VM's own: the VMM is
/// started inside `netns` and makes the tap `tap` there, so the guest's packets reach only
/// what that namespace is wired to (nothing, until the caller wires it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// A network namespace file (`/proc/<pid>/fd/<n>` of a descriptor the caller holds
    /// until the VMM has started, or `/run/netns/<name>`).
    pub netns: PathBuf,
    pub tap: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOptions {
    /// The clone's vsock CID (>= 3).
    pub cid: u32,
    /// The clone's disks, one per snapshot disk; `*.qcow2` names are opened as qcow2 with
    /// backing files, others as raw. `None`: qcow2 overlays of the snapshot's (raw) disks
    /// are made in the workdir ([`restore::clone_disk_into`]).
    pub disks: Option<Vec<PathBuf>>,
    pub memory_restore_mode: MemoryRestoreMode,
    pub prefault: bool,
    /// Resume as part of the restore (Cloud Hypervisor v52+).
    pub resume: bool,
    /// Bound on `vm.restore`; past it the VMM is killed.
    pub restore_timeout: Duration,
    /// The network namespace the VMM runs in (see [`NetworkSpec::netns`]): a snapshot with
    /// a network device makes its tap there again. Required for such a snapshot, whose tap
    /// would otherwise be made in the caller's namespace.
    pub netns: Option<PathBuf>,
}

impl RestoreOptions {
    pub fn new(cid: u32) -> Self {
        RestoreOptions {
            cid,
            disks: None,
            memory_restore_mode: MemoryRestoreMode::OnDemand,
            prefault: false,
            resume: true,
            restore_timeout: Duration::from_secs(30),
            netns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A call on a running VM failed; the VM is still owned by its [`Vm`].
    #[error("{step} failed: {source}")]
    Api {
        step: &'static str,
        #[source]
        source: ClientError,
    },
    /// Boot or restore failed part-way: nothing is left running.
    #[error("{step} failed (VMM killed, work directory removed): {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("work directory {0} already exists and is not empty: each VM needs a fresh one")]
    WorkdirInUse(PathBuf),
    #[error("work directory {dir}: {source}")]
    Workdir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "snapshot destination {0} is inside the VM's work directory, which is removed with the VM"
    )]
    SnapshotInsideWorkdir(PathBuf),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("guest not ready: guest-init did not answer Ping within {timeout:?} (last error: {last_error}); console tail:\n{console_tail}")]
    GuestNotReady {
        timeout: Duration,
        last_error: String,
        console_tail: String,
    },
    #[error("the VMM exited ({status}) while waiting for {waiting_for}; console tail:\n{console_tail}\nVMM log tail:\n{vmm_log}")]
    VmmDied {
        status: std::process::ExitStatus,
        waiting_for: &'static str,
        console_tail: String,
        vmm_log: String,
    },
}

/// A Cloud Hypervisor VM and its VMM process.
#[derive(Debug)]
pub struct Vm {
    vmm: Vmm,
    workdir: PathBuf,
    vsock_socket: PathBuf,
    cid: u32,
}

fn prepare_workdir(dir: &Path) -> Result<(), VmError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(VmError::WorkdirInUse(dir.to_owned()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|source| VmError::Workdir {
                dir: dir.to_owned(),
                source,
            })
        }
        Err(source) => Err(VmError::Workdir {
            dir: dir.to_owned(),
            source,
        }),
    }
}

/// Removes a work directory we created when setup fails before a [`Vmm`] owns it.
struct WorkdirGuard<'a>(Option<&'a Path>);

impl WorkdirGuard<'_> {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for WorkdirGuard<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Vm {
    /// Starts a VMM in `spec.workdir`, creates the VM and boots it. Returns once the VMM
    /// accepted `vm.boot`; use [`Vm::wait_agent_ready`] to wait for guest-init.
    pub async fn boot(spec: &VmSpec, bin: &Path) -> Result<Vm, VmError> {
        let span = info_span!("vm_boot", workdir = %spec.workdir.display(), cid = spec.cid);
        async {
            prepare_workdir(&spec.workdir)?;
            let mut guard = WorkdirGuard(Some(&spec.workdir));
            let netns = spec.network.as_ref().map(|n| n.netns.as_path());
            let vmm =
                Vmm::spawn(bin, &spec.workdir, netns, patience(DEFAULT_START_TIMEOUT)).await?;
            guard.disarm(); // the Vmm owns the directory from here on
            let vsock_socket = spec.workdir.join(VSOCK_SOCKET);
            let config = VmConfig {
                payload: PayloadConfig {
                    kernel: Some(spec.kernel.clone()),
                    cmdline: Some(spec.cmdline.clone()),
                    initramfs: Some(spec.initramfs.clone()),
                },
                cpus: Some(CpusConfig {
                    boot_vcpus: spec.vcpus,
                    max_vcpus: spec.vcpus,
                }),
                memory: Some(MemoryConfig {
                    size: spec.memory_mib << 20,
                    shared: false,
                    hugepages: false,
                    prefault: false,
                    thp: true,
                }),
                // The format follows the name thaw gave the file (`disk::format_of`).
                disks: Some(vec![DiskConfig::writable(
                    spec.rootfs.clone(),
                    crate::disk::format_of(&spec.rootfs),
                )]),
                vsock: Some(VsockConfig {
                    cid: spec.cid,
                    socket: vsock_socket.clone(),
                }),
                serial: Some(ConsoleConfig::file(spec.workdir.join(CONSOLE_LOG))),
                console: Some(ConsoleConfig::off()),
                rng: Some(RngConfig {
                    src: "/dev/urandom".into(),
                }),
                net: spec.network.as_ref().map(|n| {
                    vec![NetConfig {
                        tap: n.tap.clone(),
                        mac: n.mac.clone(),
                    }]
                }),
            };
            let t = Instant::now();
            vmm.api()
                .create(&config)
                .await
                .map_err(|source| VmError::Setup {
                    step: "vm.create",
                    source,
                })?;
            vmm.api().boot().await.map_err(|source| VmError::Setup {
                step: "vm.boot",
                source,
            })?;
            info!(elapsed_ms = t.elapsed().as_millis() as u64, "vm booting");
            Ok(Vm {
                vmm,
                workdir: spec.workdir.clone(),
                vsock_socket,
                cid: spec.cid,
            })
        }
        .instrument(span)
        .await
    }

    /// Restores `snapshot_dir` into a fresh VMM in `workdir`, as a clone with its own vsock
    /// socket, CID and disk (see [`crate::restore`]).
    pub async fn restore(
        snapshot_dir: &Path,
        workdir: &Path,
        opts: RestoreOptions,
        bin: &Path,
    ) -> Result<Vm, VmError> {
        let span = info_span!("vm_restore", snapshot = %snapshot_dir.display(),
                              workdir = %workdir.display(), cid = opts.cid);
        async {
            prepare_workdir(workdir)?;
            let mut guard = WorkdirGuard(Some(workdir));
            let t = Instant::now();
            let raw = std::fs::read(snapshot_dir.join(restore::CONFIG_JSON)).map_err(|source| {
                RestoreError::Io {
                    dir: snapshot_dir.to_owned(),
                    source,
                }
            })?;
            let original: serde_json::Value =
                serde_json::from_slice(&raw).map_err(RestoreError::from)?;
            if opts.netns.is_none() && restore::has_network(&original) {
                return Err(RestoreError::NetworkWithoutNamespace.into());
            }
            let disks = match opts.disks.clone() {
                Some(d) => d,
                None => {
                    let mut out = Vec::new();
                    for (i, base) in restore::snapshot_disks(&original).iter().enumerate() {
                        out.push(restore::clone_disk_into(base, workdir, i)?);
                    }
                    out
                }
            };
            let vsock_socket = workdir.join(VSOCK_SOCKET);
            let rw = CloneRewrite {
                vsock_socket: vsock_socket.clone(),
                cid: opts.cid,
                disks,
                serial_log: workdir.join(CONSOLE_LOG),
                console_log: workdir.join(VIRTIO_CONSOLE_LOG),
            };
            let private = workdir.join(SNAPSHOT_COPY);
            restore::materialise(snapshot_dir, &private, &rw)?;
            let vmm = Vmm::spawn(
                bin,
                workdir,
                opts.netns.as_deref(),
                patience(DEFAULT_START_TIMEOUT),
            )
            .await?;
            guard.disarm();
            let cfg = RestoreConfig {
                source_url: file_url(&private),
                prefault: opts.prefault,
                memory_restore_mode: opts.memory_restore_mode,
                resume: opts.resume,
            };
            // On error or timeout `vmm` is dropped here: killed, directory removed.
            vmm.api()
                .restore(&cfg, patience(opts.restore_timeout))
                .await
                .map_err(|source| VmError::Setup {
                    step: "vm.restore",
                    source,
                })?;
            info!(elapsed_ms = t.elapsed().as_millis() as u64, "vm restored");
            Ok(Vm {
                vmm,
                workdir: workdir.to_owned(),
                vsock_socket,
                cid: opts.cid,
            })
        }
        .instrument(span)
        .await
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Lets the VM outlive this handle (see [`Vmm::detach`]): it keeps running, its workdir
    /// stays. Record [`Vm::vmm_pid`] to reach it again with [`Vm::attach`].
    pub fn detach(self) {
        self.vmm.detach();
    }

    /// A handle on a VM started earlier in `workdir` (by [`Vm::boot`] or [`Vm::restore`],
    /// then [`Vm::detach`]ed), possibly by another process. `vmm_pid` must have been checked
    /// by the caller to still be that VMM; [`Vm::shutdown`] ends it and removes `workdir`.
    pub fn attach(workdir: &Path, cid: u32, vmm_pid: Option<u32>) -> Vm {
        Vm {
            vmm: Vmm::attach(workdir, vmm_pid),
            workdir: workdir.to_owned(),
            vsock_socket: workdir.join(VSOCK_SOCKET),
            cid,
        }
    }

    pub fn cid(&self) -> u32 {
        self.cid
    }

    pub fn vsock_socket(&self) -> &Path {
        &self.vsock_socket
    }

    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.pid()
    }

    /// Cloud Hypervisor's version (from `vmm.ping`).
    pub fn vmm_version(&self) -> &str {
        self.vmm.version()
    }

    pub fn console_tail(&self, lines: usize) -> String {
        crate::util::file_tail(&self.workdir.join(CONSOLE_LOG), lines)
    }

    fn api_err(step: &'static str) -> impl FnOnce(ClientError) -> VmError {
        move |source| VmError::Api { step, source }
    }

    pub async fn pause(&self) -> Result<(), VmError> {
        self.vmm
            .api()
            .pause()
            .await
            .map_err(Self::api_err("vm.pause"))
    }

    pub async fn resume(&self) -> Result<(), VmError> {
        self.vmm
            .api()
            .resume()
            .await
            .map_err(Self::api_err("vm.resume"))
    }

    pub async fn info(&self) -> Result<VmInfo, VmError> {
        self.vmm
            .api()
            .info()
            .await
            .map_err(Self::api_err("vm.info"))
    }

    /// Snapshots the (paused) VM into `dest`, a new or empty directory outside the workdir.
    pub async fn snapshot(&self, dest: &Path) -> Result<(), VmError> {
        let span = info_span!("vm_snapshot", dest = %dest.display());
        async {
            let dest_abs = std::path::absolute(dest).map_err(|source| VmError::Workdir {
                dir: dest.to_owned(),
                source,
            })?;
            if dest_abs.starts_with(&self.workdir) {
                return Err(VmError::SnapshotInsideWorkdir(dest_abs));
            }
            prepare_workdir(&dest_abs)?;
            let t = Instant::now();
            let deadline = t + patience(DEFAULT_SNAPSHOT_TIMEOUT);
            let config = VmSnapshotConfig {
                destination_url: file_url(&dest_abs),
            };
            // A VM restored `OnDemand` cannot be snapshotted until its background fill has
            // read all of its memory (Cloud Hypervisor answers "on-demand memory restore is
            // still in progress"): a session paused right after its restore waits for it.
            // The fill runs on the VMM's own thread, paused vCPUs or not.
            let mut wait = Duration::from_millis(50);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.vmm.api().snapshot(&config, left).await {
                    Err(e) if e.is_restore_in_progress() && Instant::now() + wait < deadline => {
                        debug!(?wait, "the on-demand restore is still filling memory");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                    r => break r.map_err(Self::api_err("vm.snapshot"))?,
                }
            }
            info!(
                elapsed_ms = t.elapsed().as_millis() as u64,
                "snapshot written"
            );
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// A fresh stream to guest-init's vsock port.
    pub async fn connect_agent(&self, timeout: Duration) -> Result<UnixStream, VmError> {
        Ok(vsock::connect(&self.vsock_socket, thaw_protocol::VSOCK_PORT, timeout).await?)
    }

    /// Retries connecting and pinging guest-init until it answers `Pong`, or `boot_timeout`
    /// passes (then [`VmError::GuestNotReady`] with the console tail), or the VMM dies.
    pub async fn wait_agent_ready(&mut self, boot_timeout: Duration) -> Result<(), VmError> {
        let span = info_span!("wait_agent_ready", cid = self.cid);
        async {
            let start = Instant::now();
            let deadline = start + boot_timeout;
            let mut last_error = String::from("not tried yet");
            loop {
                if let Some(status) = self.vmm.try_wait() {
                    return Err(VmError::VmmDied {
                        status,
                        waiting_for: "guest-init",
                        console_tail: self.console_tail(30),
                        vmm_log: self.vmm.log_tail(10),
                    });
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(VmError::GuestNotReady {
                        timeout: boot_timeout,
                        last_error,
                        console_tail: self.console_tail(30),
                    });
                }
                let attempt = remaining.min(Duration::from_secs(2));
                match vsock::connect(&self.vsock_socket, thaw_protocol::VSOCK_PORT, attempt).await {
                    Ok(stream) => match AgentConn::new(stream).ping(attempt).await {
                        Ok(_) => {
                            info!(
                                elapsed_ms = start.elapsed().as_millis() as u64,
                                "guest-init ready"
                            );
                            return Ok(());
                        }
                        Err(e) => last_error = e.to_string(),
                    },
                    Err(e) => last_error = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        .instrument(span)
        .await
    }

    /// Shuts the guest down (`vm.shutdown`, best effort), ends the VMM and removes the workdir.
    pub async fn shutdown(self) -> Result<(), VmError> {
        let span = info_span!("vm_shutdown", cid = self.cid);
        async {
            let result = self.vmm.api().shutdown().await;
            // Whatever vm.shutdown said, the VMM goes away and the directory with it.
            self.vmm.shutdown().await;
            match result {
                Ok(()) => Ok(()),
                // A guest that already powered off leaves nothing to shut down.
                Err(ClientError::Api(_)) => Ok(()),
                Err(source) => Err(VmError::Api {
                    step: "vm.shutdown",
                    source,
                }),
            }
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot whose VM has a network device, restored without a namespace for its tap,
    /// is refused before any VMM starts (its tap would be made in this process's namespace),
    /// and the clone's work directory is gone.
    #[tokio::test]
    async fn a_networked_snapshot_needs_a_namespace() {
        let d = tempfile::tempdir().unwrap();
        let snap = d.path().join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let config = serde_json::json!({
            "payload": {"kernel": "/k"},
            "disks": [{"path": "/d.ext4"}],
            "vsock": {"cid": 3, "socket": "/v.sock"},
            "net": [{"tap": "thaw0", "mac": "52:54:00:74:68:77"}]
        });
        std::fs::write(
            snap.join(restore::CONFIG_JSON),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let mut opts = RestoreOptions::new(7);
        opts.disks = Some(vec![d.path().join("disk.ext4")]);
        let workdir = d.path().join("vm");
        let e = Vm::restore(&snap, &workdir, opts, Path::new("/nonexistent/ch"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, VmError::Restore(RestoreError::NetworkWithoutNamespace)),
            "{e}"
        );
        assert!(!workdir.exists());
    }
}
