//! The microvm tier behind the engine's tier contract ([`crate::backend`]).

use std::any::Any;
use std::path::{Path, PathBuf};

use super::{kill_orphan_vmm, MicrovmTier, VmSandbox, VMM_RECORD, WORKDIR};
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

    fn as_any(&self) -> &dyn Any {
        self
    }
}
