//! The microvm tier behind the engine's tier contract ([`crate::backend`]).

use std::any::Any;
use std::path::{Path, PathBuf};

use super::{
    kill_orphan_vmm, MicrovmTier, VmSandbox, DISK_FILE, OVERLAY_FILE, VMM_RECORD, WORKDIR,
};
use crate::agent::Agent;
use crate::backend::{BoxFuture, TierBackend, TierSandbox};
use crate::container::SandboxSpec;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::sandbox::Sandbox;
use crate::template::spec::Limits;
use crate::tier::Tier;

impl TierBackend for MicrovmTier {
    fn tier(&self) -> Tier {
        Tier::Microvm
    }

    /// The template's guest image: kernel, initramfs and its ext4 rootfs.
    fn prepare_template<'a>(
        &'a self,
        layers: &'a [PathBuf],
        limits: &'a Limits,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            progress.step("building the guest image (kernel, initramfs, ext4 rootfs)");
            self.image(layers, limits.disk_mib).await?;
            Ok(())
        })
    }

    fn boot<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Sandbox>> {
        Box::pin(async move { Ok(Sandbox::new(Box::new(MicrovmTier::boot(self, spec).await?))) })
    }

    fn restore<'a>(
        &'a self,
        spec: &'a SandboxSpec,
        snapshot: &'a Path,
        private: bool,
    ) -> BoxFuture<'a, Result<Sandbox>> {
        Box::pin(async move {
            let vm = MicrovmTier::restore(self, spec, snapshot, private).await?;
            Ok(Sandbox::new(Box::new(vm)))
        })
    }

    fn checkpoint<'a>(
        &'a self,
        sb: &'a Sandbox,
        dest: &'a Path,
        leave_running: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let v = sb.tier_handle::<VmSandbox>()?;
            MicrovmTier::checkpoint(self, v, dest, leave_running).await
        })
    }

    fn attach(&self, id: &str) -> Sandbox {
        Sandbox::new(Box::new(MicrovmTier::attach(self, id)))
    }

    /// A VM sandbox's directory holds the VMM's record, or at least its work directory
    /// (from before the VMM started until it is recorded).
    fn owns_dir(&self, dir: &Path) -> bool {
        dir.join(VMM_RECORD).exists() || dir.join(WORKDIR).exists()
    }

    fn sweep_orphan<'a>(&'a self, _id: &'a str, dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move { kill_orphan_vmm(dir) })
    }

    /// SIGKILL to the VMM (the whole VM, its guest's processes with it, paused or not),
    /// as the crash sweep does; the teardown then removes its files.
    fn kill_now(&self, id: &str) -> Result<crate::live::KillStats> {
        let dir = self.paths.sandbox(id);
        let alive = vmm_pid(&dir).is_some();
        kill_orphan_vmm(&dir);
        if vmm_pid(&dir).is_some() {
            return Err(Error::Other(format!(
                "sandbox {id}: its VMM survived SIGKILL"
            )));
        }
        Ok(crate::live::KillStats {
            processes: usize::from(alive),
        })
    }

    /// The VMM's CPU time and resident memory (the guest's memory is the VMM's), and the
    /// blocks its disk image holds. The guest's processes are out of the host's sight:
    /// `pids` is unknown.
    fn usage(&self, id: &str) -> crate::live::HostUsage {
        let dir = self.paths.sandbox(id);
        let disk = [OVERLAY_FILE, DISK_FILE]
            .iter()
            .find_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512));
        let Some(pid) = vmm_pid(&dir) else {
            return crate::live::HostUsage {
                disk_bytes: disk,
                ..Default::default()
            };
        };
        crate::live::HostUsage {
            cpu_seconds: process_cpu_seconds(pid),
            memory_bytes: process_rss(pid),
            pids: None,
            disk_bytes: disk,
        }
    }
}

/// The pid of sandbox directory `dir`'s VMM, if the process recorded there still runs.
fn vmm_pid(dir: &Path) -> Option<u32> {
    let record = std::fs::read_to_string(dir.join(VMM_RECORD)).ok()?;
    crate::cleanup::identity_alive(&record)
        .then(|| crate::cleanup::identity_pid(&record))
        .flatten()
}

/// User plus system CPU time of a process (`/proc/<pid>/stat` fields 14 and 15).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after the last ')'.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((utime + stime) as f64 / crate::live::clock_ticks()? as f64)
}

/// A process's resident memory (`VmRSS` in `/proc/<pid>/status`).
fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

impl TierSandbox for VmSandbox {
    fn tier(&self) -> Tier {
        Tier::Microvm
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn agent(&self) -> &Agent {
        &self.agent
    }

    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(VmSandbox::destroy(*self))
    }

    /// The VMM's.
    fn identity(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move { VmSandbox::identity(self) })
    }

    /// The VMM, whose memory is the guest's.
    fn host_pids(&self) -> Vec<u32> {
        VmSandbox::identity(self)
            .and_then(|i| crate::cleanup::identity_pid(&i))
            .into_iter()
            .collect()
    }

    /// A VM's processes are the guest kernel's, out of the host's reach.
    fn kill_tasks(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            Err(Error::Other(format!(
                "sandbox {}: a microvm's processes can only be ended with the VM",
                self.id
            )))
        })
    }

    /// A VM's memory is its own: an out-of-memory guest kills inside, and the task reports
    /// the signal.
    fn oom_killed(&self) -> bool {
        false
    }

    /// Whether the VMM still runs, and the guest's serial console tail (Cloud Hypervisor
    /// writes it into the sandbox's host-side work directory; at most the last 64 KiB is
    /// read, and 30 lines kept).
    fn post_mortem(&self) -> Option<String> {
        let vmm = match VmSandbox::identity(self) {
            Some(i) if crate::cleanup::identity_alive(&i) => "the VMM still runs",
            _ => "the VMM (Cloud Hypervisor) has exited",
        };
        let console = self.console_tail(30);
        Some(format!("{vmm}; the guest's console ends with:\n{console}"))
    }

    /// The VMM's namespace, where its tap is: never the host's own (a VMM started before
    /// microvm networking ran in it, and wiring that would redirect the host's traffic).
    fn network(&self) -> Option<crate::backend::SandboxNetwork> {
        use std::os::unix::fs::MetadataExt;
        let identity = VmSandbox::identity(self).filter(|i| crate::cleanup::identity_alive(i))?;
        let pid = crate::cleanup::identity_pid(&identity)?;
        let file = std::fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
        let theirs = file.metadata().ok()?;
        let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
        if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
            return None;
        }
        // The pid could have been reused between the check and the open: it is ours only
        // if the identity still holds after.
        crate::cleanup::identity_alive(&identity).then(|| crate::backend::SandboxNetwork {
            ns: file.into(),
            link: thaw_gateway::netns::Link::Tap,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
