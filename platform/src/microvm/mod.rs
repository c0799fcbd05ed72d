//! The microvm tier: one Cloud Hypervisor VM per sandbox, driven through `thaw-microvm`.
//!
//! A sandbox directory `sandboxes/<id>/` holds, besides the `owner` record every sandbox has:
//!
//! * `disk.qcow2`: the VM's private root disk, a qcow2 overlay whose backing file is the
//!   template's cached rootfs image (a cold boot) or the snapshot cache's `disk.ext4` (a
//!   clone): copy-on-write on every filesystem, it holds only what the guest wrote; or
//!   `disk.ext4`, a raw disk: a resumed session's own (its snapshot is private to it);
//! * `vmm`: `<pid> <starttime>` of the VMM process, so that a later thaw process (a session
//!   call after a restart, the crash sweep) can reach or end it without mistaking a reused
//!   pid for it; `cid`: the VM's vsock CID;
//! * `vm/`: the VMM's work directory (API socket, vsock socket, console and VMM logs);
//! * `snapshot/`: a resumed session's snapshot, whose memory file the VM reads on demand.
//!
//! The VMM is detached from the handle that started it, like a runc container: it lives until
//! [`VmSandbox::destroy`], and a thaw process killed mid-invocation leaves it to the sweep.
//!
//! Every VMM runs in a network namespace of its own, where Cloud Hypervisor makes the tap of
//! the guest's one network device. Nothing is wired there until the sandbox is granted
//! egress; then the gateway wires it as it wires a container's namespace, from the tap's
//! side ([`thaw_gateway::netns::Link::Tap`]). The namespace lives as long as its VMM.
//!
//! A snapshot is Cloud Hypervisor's snapshot directory (`config.json`, `state.json`,
//! `memory-ranges`) plus `disk.ext4`, the disk as it was while the VM was paused, flattened
//! into one standalone raw image (overlay merged with its backing file): memory and disk must
//! come from the same instant, since the guest's page cache refers to disk blocks, and a
//! snapshot must not depend on a file outside it, so that a session survives a redeploy or
//! delete of its template. The snapshotter stores it compressed and content-addressed, so a
//! session's pause still shares every unchanged chunk of memory and disk with its template.

mod backend;
pub mod image;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;
use thaw_microvm::restore::clone_disk;
use thaw_microvm::{RestoreOptions, Vm, VmSpec};
use tracing::{info_span, warn, Instrument};

use crate::agent::{Agent, Endpoint};
use crate::cleanup;
use crate::container::{mounts, SandboxSpec};
use crate::error::{Error, IoContext, Result};
use crate::paths::Paths;

pub use image::{Images, VmImage};

/// The raw disk: in a snapshot, and a resumed session's own in its sandbox directory.
pub const DISK_FILE: &str = "disk.ext4";
/// A sandbox's copy-on-write disk over a shared raw base (the extension tells thaw-microvm
/// to open it as qcow2 with its backing file).
const OVERLAY_FILE: &str = "disk.qcow2";
const VMM_RECORD: &str = "vmm";
const CID_FILE: &str = "cid";
const WORKDIR: &str = "vm";
/// A session's own snapshot, kept while its VM reads memory from it.
const SNAPSHOT_DIR: &str = "snapshot";

#[derive(Clone)]
pub struct MicrovmTier {
    pub paths: Paths,
    pub guest_init: PathBuf,
    pub images: Images,
}

/// A live VM sandbox. Dropping it does not end the VM: call [`VmSandbox::destroy`].
#[derive(Debug)]
pub struct VmSandbox {
    pub id: String,
    pub dir: PathBuf,
    pub agent: Agent,
}

/// Whether this host can run the microvm tier (`Err`: every reason, each with its fix).
pub fn availability() -> std::result::Result<PathBuf, String> {
    match thaw_microvm::cloud_hypervisor_available() {
        thaw_microvm::Availability::Available { binary, .. } => Ok(binary),
        other => Err(other.reason()),
    }
}

fn binary() -> Result<PathBuf> {
    availability().map_err(|why| Error::MissingDependency {
        what: format!("the microvm tier: {why}"),
        fix: "see README: Running on a KVM host".into(),
    })
}

/// The guest's MAC address: one serves every VM, each alone on its tap.
const GUEST_MAC: &str = "52:54:00:74:68:77";

/// The guest's network, for its initramfs (`thaw.net=ADDR/LEN,GATEWAY`): the guest's end of
/// the /30 whose other end is the tap the gateway wires.
fn guest_net_arg() -> String {
    format!(
        "thaw.net={}/30,{}",
        thaw_gateway::netns::GUEST_ADDR,
        thaw_gateway::netns::TAP_ADDR
    )
}

/// A fresh network namespace for one VMM (its tap goes there). The VMM holds it once it
/// has started; the egress gateway reaches it through the VMM ([`crate::backend::TierSandbox::network`]).
async fn vm_netns() -> Result<std::os::fd::OwnedFd> {
    tokio::task::spawn_blocking(thaw_gateway::netns::new)
        .await
        .map_err(|e| Error::Other(format!("network namespace task: {e}")))?
        .map_err(|e| Error::Other(format!("the VM's network namespace: {e}")))
}

/// The path of one of this process's descriptors, for a child to open.
fn fd_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A vsock CID for a new VM. With hybrid vsock the host reaches each VM through its own
/// socket, so the CID only has to be valid (>= 3; Cloud Hypervisor takes a u32, and
/// u32::MAX is VMADDR_CID_ANY) and is very unlikely to repeat.
fn new_cid() -> u32 {
    rand::thread_rng().gen_range(3..u32::MAX)
}

impl MicrovmTier {
    pub fn new(paths: Paths, guest_init: PathBuf) -> MicrovmTier {
        MicrovmTier {
            paths,
            guest_init,
            images: Images::default(),
        }
    }

    /// The template's guest image (built once, then cached).
    pub async fn image(&self, layers: &[PathBuf], disk_mib: u64) -> Result<VmImage> {
        let (images, paths, init, layers) = (
            self.images.clone(),
            self.paths.clone(),
            self.guest_init.clone(),
            layers.to_vec(),
        );
        tokio::task::spawn_blocking(move || images.get(&paths, &init, &layers, disk_mib))
            .await
            .map_err(|e| Error::Other(format!("guest image task: {e}")))?
    }

    /// Creates the sandbox directory with its owner record and the VM's private disk: a qcow2
    /// overlay (`disk.qcow2`) of the raw image `snapshot_or_disk`, which must stay unchanged
    /// while the VM runs (the image cache's and the snapshot cache's are), or, for a `private`
    /// snapshot (a session's resume, nobody else's), the snapshot directory itself moved in,
    /// its raw disk as `disk.ext4`. Returns the directory and where the snapshot now is. On
    /// failure removes whatever it made.
    fn prepare(
        &self,
        id: &str,
        snapshot_or_disk: &Path,
        private: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let dir = self.paths.sandbox(id);
        let kept = dir.join(SNAPSHOT_DIR);
        let r = (|| {
            std::fs::create_dir_all(&dir).ctx("creating sandbox directory", &dir)?;
            cleanup::write_owner(&dir.join("owner"))?;
            if private {
                std::fs::rename(snapshot_or_disk, &kept).ctx("keeping the snapshot", &kept)?;
                std::fs::rename(kept.join(DISK_FILE), dir.join(DISK_FILE))
                    .ctx("moving the snapshot's disk", &dir)?;
            } else {
                thaw_microvm::disk::create_overlay(snapshot_or_disk, &dir.join(OVERLAY_FILE))
                    .map_err(|e| {
                        thaw_microvm::VmError::from(thaw_microvm::restore::RestoreError::from(e))
                    })?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => Ok((dir, kept)),
            Err(e) => {
                let _ = mounts::teardown_dir(&dir);
                Err(e)
            }
        }
    }

    /// Cold boot: a fresh VM running guest-init, ready to serve.
    pub async fn boot(&self, spec: &SandboxSpec) -> Result<VmSandbox> {
        let span = info_span!("sandbox.boot", sandbox = %spec.id, tier = "microvm");
        async {
            let bin = binary()?;
            let img = self.image(&spec.layers, spec.limits.disk_mib).await?;
            // Below the kernel's floor Cloud Hypervisor fails with a misleading "Invalid
            // bzImage" (or the guest dies out of memory): refuse first, in the template's terms.
            let (kernel, initramfs) = (img.kernel.clone(), img.initramfs.clone());
            let floor = tokio::task::spawn_blocking(move || {
                thaw_microvm::image::min_guest_memory_mib(&kernel, &initramfs)
            })
            .await
            .map_err(|e| Error::Other(format!("memory floor task: {e}")))?
            .map_err(image::image_error)?;
            if spec.limits.memory_mib < floor {
                return Err(Error::BuildRefused(format!(
                    "limits.memory_mib = {} is below the microvm tier's minimum of {floor} MiB for this kernel and initramfs; raise limits.memory_mib in template.toml",
                    spec.limits.memory_mib
                )));
            }
            let ns = vm_netns().await?;
            let (dir, _) = self.prepare(&spec.id, &img.rootfs, false)?;
            let cid = new_cid();
            let vm_spec = VmSpec {
                kernel: img.kernel,
                initramfs: img.initramfs,
                cmdline: format!("{} {}", thaw_microvm::vm::DEFAULT_CMDLINE, guest_net_arg()),
                rootfs: dir.join(OVERLAY_FILE),
                vcpus: u8::try_from(spec.limits.vcpus).unwrap_or(u8::MAX),
                memory_mib: spec.limits.memory_mib,
                cid,
                workdir: dir.join(WORKDIR),
                network: Some(thaw_microvm::vm::NetworkSpec {
                    netns: fd_path(&ns),
                    tap: thaw_gateway::netns::TAP.into(),
                    mac: GUEST_MAC.into(),
                }),
            };
            let vm = Vm::boot(&vm_spec, &bin).await;
            drop(ns);
            self.adopt(spec, &dir, cid, vm).await
        }
        .instrument(span)
        .await
    }

    /// Restores a clone from a snapshot directory (see the module docs): its own
    /// copy-on-write disk, vsock socket and CID; memory is mapped on demand (userfaultfd), so the memory file
    /// must outlive the restore. A `private` snapshot directory (a session's resume) is moved
    /// into the sandbox directory and goes with it; a shared one is the snapshot cache's.
    pub async fn restore(
        &self,
        spec: &SandboxSpec,
        snapshot: &Path,
        private: bool,
    ) -> Result<VmSandbox> {
        let span = info_span!("sandbox.restore", sandbox = %spec.id, tier = "microvm");
        async {
            let bin = binary()?;
            let from = if private {
                snapshot.to_path_buf()
            } else {
                snapshot.join(DISK_FILE)
            };
            let ns = vm_netns().await?;
            let (dir, kept) = self.prepare(&spec.id, &from, private)?;
            let snapshot = if private { kept.as_path() } else { snapshot };
            let cid = new_cid();
            let mut opts = RestoreOptions::new(cid);
            let disk = if private { DISK_FILE } else { OVERLAY_FILE };
            opts.disks = Some(vec![dir.join(disk)]);
            // Every VMM runs in a namespace of its own, whether its snapshot has a network
            // device or not (one from before microvm networking has none).
            opts.netns = Some(fd_path(&ns));
            let vm = Vm::restore(snapshot, &dir.join(WORKDIR), opts, &bin).await;
            drop(ns);
            self.adopt(spec, &dir, cid, vm).await
        }
        .instrument(span)
        .await
    }

    /// Waits for guest-init in a VM that came up (after a restore it was already listening:
    /// this only waits for the restored vsock device to pass a connection through), then
    /// turns the VM into a sandbox that outlives its handle. Cleans up after one that did
    /// not come up (a failed `Vm` has already killed its VMM and removed its workdir).
    async fn adopt(
        &self,
        spec: &SandboxSpec,
        dir: &Path,
        cid: u32,
        vm: std::result::Result<Vm, thaw_microvm::VmError>,
    ) -> Result<VmSandbox> {
        let ready = match vm {
            Ok(mut vm) => vm.wait_agent_ready(spec.boot_timeout).await.map(|()| vm),
            Err(e) => Err(e),
        };
        let recorded = ready.map_err(Error::from).and_then(|vm| {
            let identity = vm.vmm_pid().and_then(cleanup::identity);
            let written = match &identity {
                Some(i) => std::fs::write(dir.join(VMM_RECORD), i)
                    .and_then(|()| std::fs::write(dir.join(CID_FILE), cid.to_string()))
                    .ctx("recording the VMM", dir),
                None => Err(Error::Other("the VMM exited right after start".into())),
            };
            // On error, dropping the Vm kills the VMM and removes its workdir.
            written.map(|()| vm.detach())
        });
        match recorded {
            Ok(()) => Ok(self.attach(&spec.id)),
            Err(e) => {
                let _ = mounts::teardown_dir(dir);
                Err(e)
            }
        }
    }

    /// A handle on a VM sandbox that already runs (made by this or an earlier process).
    pub fn attach(&self, id: &str) -> VmSandbox {
        let dir = self.paths.sandbox(id);
        VmSandbox {
            id: id.to_string(),
            agent: Agent::new(
                id.to_string(),
                Endpoint::HybridVsock {
                    socket: dir.join(WORKDIR).join(thaw_microvm::vm::VSOCK_SOCKET),
                    port: thaw_protocol::VSOCK_PORT,
                },
            ),
            dir,
        }
    }

    /// Snapshots a VM sandbox into `dest` (a new directory): pause, Cloud Hypervisor's
    /// snapshot, the disk from the same instant flattened into a standalone raw
    /// `disk.ext4` (so the snapshot needs no base image), then resume if `leave_running`
    /// (a session's pause keeps it running until the snapshot is durable). A VM left paused
    /// is about to be destroyed.
    pub async fn checkpoint(&self, sb: &VmSandbox, dest: &Path, leave_running: bool) -> Result<()> {
        let span = info_span!("sandbox.checkpoint", sandbox = %sb.id, tier = "microvm");
        async {
            let vm = sb.vm()?;
            flush_guest_disk(sb).await?;
            vm.pause().await?;
            let r = async {
                vm.snapshot(dest).await?;
                let overlay = sb.dir.join(OVERLAY_FILE);
                let from = if overlay.exists() {
                    overlay
                } else {
                    sb.dir.join(DISK_FILE)
                };
                let to = dest.join(DISK_FILE);
                tokio::task::spawn_blocking(move || clone_disk(&from, &to))
                    .await
                    .map_err(|e| Error::Other(format!("disk flatten task: {e}")))?
                    .map_err(thaw_microvm::VmError::from)?;
                Ok::<_, Error>(())
            }
            .await;
            if leave_running || r.is_err() {
                if let Err(e) = vm.resume().await {
                    warn!(error = %e, "resuming the VM after its snapshot");
                }
            }
            r
        }
        .instrument(span)
        .await
    }
}

/// Has the guest write everything to its disk (guest-init's `--sync`: sync(2), ending in a
/// block-device flush, on which Cloud Hypervisor writes its qcow2 metadata), so the disk the
/// host reads while the VM is paused holds every write the guest saw complete. A guest that
/// writes again before the pause can only make its own checkpoint inconsistent.
async fn flush_guest_disk(sb: &VmSandbox) -> Result<()> {
    let req = thaw_protocol::ExecRequest {
        argv: vec![image::GUEST_INIT_PATH.to_string(), "--sync".to_string()],
        env: Default::default(),
        cwd: None,
        stdin: None,
        limits: thaw_protocol::TaskLimits {
            timeout_ms: Some(120_000),
            ..Default::default()
        },
    };
    let done = sb.agent.exec(req, |_, _| {}).await?;
    if done.outcome.success() {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "sandbox {}: the guest did not flush its disk before the checkpoint ({:?})",
            sb.id, done.outcome
        )))
    }
}

impl VmSandbox {
    /// `<pid> <starttime>` of the VMM: the VM runs while this process does.
    pub fn identity(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(VMM_RECORD))
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn vm(&self) -> Result<Vm> {
        let path = self.dir.join(CID_FILE);
        let text = std::fs::read_to_string(&path).ctx("reading the VM's vsock CID", &path)?;
        let cid = text
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|c| *c >= 3)
            .ok_or_else(|| {
                Error::Other(format!(
                    "sandbox {}: {} holds {:?}, not a vsock CID (3 to 4294967295); the sandbox directory is damaged: destroy the sandbox",
                    self.id,
                    path.display(),
                    text.trim()
                ))
            })?;
        // Only a pid whose start time still matches is ours to signal.
        let pid = self
            .identity()
            .filter(|i| cleanup::identity_alive(i))
            .and_then(|i| cleanup::identity_pid(&i));
        Ok(Vm::attach(&self.dir.join(WORKDIR), cid, pid))
    }

    /// The last `lines` lines of the guest's serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        thaw_microvm::util::file_tail(
            &self.dir.join(WORKDIR).join(thaw_microvm::vm::CONSOLE_LOG),
            lines,
        )
    }

    /// Ends the VM (shutdown, then kill), removes its files. Best effort on every step.
    pub async fn destroy(self) {
        let span = info_span!("sandbox.destroy", sandbox = %self.id, tier = "microvm");
        async {
            if self.dir.join(WORKDIR).exists() {
                match self.vm() {
                    // Shut down, within a bound that the host's patience does not stretch:
                    // a VMM that stopped answering held a teardown for two API timeouts,
                    // minutes each under nested emulation, and hung `thaw bench`'s settle.
                    // Past it the VMM is killed. (Killing every VMM outright instead was
                    // followed by soft lockups of L1's KVM in the nested run; the polite
                    // path is the one the nested suite passed with.)
                    Ok(vm) => {
                        match tokio::time::timeout(SHUTDOWN_BOUND, vm.shutdown()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => warn!(error = %e, "vm shutdown"),
                            Err(_) => {
                                warn!(bound = ?SHUTDOWN_BOUND, "vm shutdown did not finish; killing the VMM");
                                kill_orphan_vmm(&self.dir);
                            }
                        }
                    }
                    // Still end the VMM, by its recorded identity.
                    Err(e) => {
                        warn!(error = %e, "vm handle; killing the VMM");
                        kill_orphan_vmm(&self.dir);
                    }
                }
            }
            if let Err(e) = mounts::teardown_dir(&self.dir) {
                warn!(error = %e, "teardown");
            }
        }
        .instrument(span)
        .await
    }
}

/// Longest a teardown waits for a VMM to shut down before killing it.
const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(60);

/// Kills the VMM of an orphaned sandbox directory, if it has one that still runs (the crash
/// sweep; the directory itself is removed by the caller).
pub fn kill_orphan_vmm(dir: &Path) {
    let record = match std::fs::read_to_string(dir.join(VMM_RECORD)) {
        Ok(r) => r,
        // Killed between the VMM's start and its record: the VMM's own pid file, trusted
        // only if that process is the VMM of this directory.
        Err(_) => match spawned_vmm(&dir.join(WORKDIR)) {
            Some(identity) => identity,
            None => return,
        },
    };
    if !cleanup::identity_alive(&record) {
        return;
    }
    let Some(pid) = cleanup::identity_pid(&record).and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    // Give the kernel a moment to tear the process down before its files are removed.
    for _ in 0..100 {
        if !cleanup::identity_alive(&record) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Identity of the VMM whose pid file is in `workdir`, if that pid is still a VMM serving
/// this workdir's API socket.
fn spawned_vmm(workdir: &Path) -> Option<String> {
    let pid: u32 = std::fs::read_to_string(workdir.join(thaw_microvm::vmm::PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let socket = workdir.join(thaw_microvm::vmm::API_SOCKET);
    let cmdline = String::from_utf8_lossy(&cmdline);
    if !cmdline.contains(&*socket.to_string_lossy()) {
        return None;
    }
    cleanup::identity(pid)
}
