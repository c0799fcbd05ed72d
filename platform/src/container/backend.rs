//! The container tier behind the engine's tier contract ([`crate::backend`]).

use std::any::Any;
use std::collections::HashSet;
use std::path::Path;

use tracing::warn;

use super::{cgroup_pids, cgroups, ContainerSandbox, ContainerTier, SandboxSpec};
use crate::agent::Agent;
use crate::backend::{BoxFuture, TierBackend, TierSandbox};
use crate::error::{Error, Result};
use crate::sandbox::Sandbox;
use crate::tier::Tier;

impl TierBackend for ContainerTier {
    fn tier(&self) -> Tier {
        Tier::Container
    }

    fn boot<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Sandbox>> {
        Box::pin(async move {
            Ok(Sandbox::new(Box::new(
                ContainerTier::boot(self, spec).await?,
            )))
        })
    }

    /// A container's snapshot is only read (its upper directory is unpacked, CRIU maps or
    /// copies its pages), so a private copy is treated as the shared one.
    fn restore<'a>(
        &'a self,
        spec: &'a SandboxSpec,
        snapshot: &'a Path,
        _private: bool,
    ) -> BoxFuture<'a, Result<Sandbox>> {
        Box::pin(async move {
            let (sb, _timings) = ContainerTier::restore(self, spec, snapshot).await?;
            Ok(Sandbox::new(Box::new(sb)))
        })
    }

    fn checkpoint<'a>(
        &'a self,
        sb: &'a Sandbox,
        dest: &'a Path,
        leave_running: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let c = sb.tier_handle::<ContainerSandbox>()?;
            crate::engine::require_criu()?;
            ContainerTier::checkpoint(self, c, dest, leave_running).await
        })
    }

    fn attach(&self, id: &str) -> Sandbox {
        Sandbox::new(Box::new(ContainerSandbox::attach(self, id)))
    }

    /// The fallback tier: a directory no other tier claims is a container's.
    fn owns_dir(&self, _dir: &Path) -> bool {
        true
    }

    fn sweep_orphan<'a>(&'a self, id: &'a str, _dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // runc's, or thaw's own (a clone restored by CRIU directly): runc ignores an id
            // it does not know, and its delete leaves no cgroup.
            if let Err(e) = self.runc.delete(id).await {
                warn!(sandbox = %id, error = %e, "runc delete of orphan");
            }
            let cg = id.to_string();
            match tokio::task::spawn_blocking(move || cgroups::destroy(&cg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(sandbox = %id, error = %e, "cgroups of orphan"),
                Err(e) => warn!(sandbox = %id, error = %e, "cgroup teardown task"),
            }
        })
    }

    /// runc containers whose sandbox directory is already gone (a crash between the two
    /// steps of a teardown).
    fn sweep_stray<'a>(&'a self, live: &'a HashSet<String>) -> BoxFuture<'a, usize> {
        Box::pin(async move {
            let mut ended = 0;
            if self.paths.runc_root().exists() {
                if let Ok(ids) = self.runc.list().await {
                    let sandboxes = self.paths.sandboxes();
                    for id in ids.into_iter().filter(|id| !live.contains(id)) {
                        if !sandboxes.join(&id).exists() {
                            let _ = self.runc.delete(&id).await;
                            ended += 1;
                        }
                    }
                }
            }
            ended
        })
    }

    fn keep_prepared(&self, n: usize) {
        self.pool.set_target(n);
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close_pool())
    }

    /// Through its cgroups ([`cgroups::kill_now`]): frozen, killed, thawed until empty.
    fn kill_now(&self, id: &str) -> Result<crate::live::KillStats> {
        cgroups::kill_now(id).map(|k| crate::live::KillStats {
            processes: k.processes,
        })
    }

    /// Its cgroups' CPU time, memory and process count, and what its tmpfs disk holds.
    fn usage(&self, id: &str) -> crate::live::HostUsage {
        let cg = cgroups::usage(id);
        crate::live::HostUsage {
            cpu_seconds: cg.cpu_seconds,
            memory_bytes: cg.memory_bytes,
            pids: cg.pids,
            disk_bytes: disk_used(&self.sandbox_dir(id).disk()),
        }
    }
}

/// Bytes used on a sandbox's disk: the tmpfs mounted at `disk` (its upper directory and
/// overlay work directory), whose size is the template's `disk_mib`. `None` when nothing is
/// mounted there (statvfs would then describe the filesystem beneath).
fn disk_used(disk: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mounted =
        std::fs::metadata(disk).ok()?.dev() != std::fs::metadata(disk.parent()?).ok()?.dev();
    if !mounted {
        return None;
    }
    let st = nix::sys::statvfs::statvfs(disk).ok()?;
    let used = st.blocks().saturating_sub(st.blocks_free());
    Some(used.saturating_mul(st.fragment_size()))
}

impl TierSandbox for ContainerSandbox {
    fn tier(&self) -> Tier {
        Tier::Container
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
        Box::pin(ContainerSandbox::destroy(*self))
    }

    /// The container's init.
    fn identity(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            self.init_pid()
                .await
                .ok()
                .and_then(crate::cleanup::identity)
        })
    }

    /// From the host, in the sandbox's UTS namespace: its guest-init lacks CAP_SYS_ADMIN.
    fn rename_host<'a>(&'a self, hostname: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let pid = self.init_pid().await?;
            super::checkpoint::set_hostname(pid, hostname).await
        })
    }

    /// The members of its memory cgroup.
    fn host_pids(&self) -> Vec<u32> {
        cgroup_pids(&self.id)
    }

    /// Through its cgroups: every process but init is frozen, killed and thawed.
    fn kill_tasks(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let init = self.init_pid().await?;
            let init = i32::try_from(init)
                .map_err(|_| Error::Other(format!("sandbox {}: init pid {init}", self.id)))?;
            let id = self.id.clone();
            tokio::task::spawn_blocking(move || cgroups::kill_all_but(&id, init))
                .await
                .map_err(|e| Error::Other(format!("cgroup kill task: {e}")))?
        })
    }

    fn network(&self) -> Option<crate::backend::SandboxNetwork> {
        self.channel
            .netns()
            .map(|ns| crate::backend::SandboxNetwork {
                ns,
                link: thaw_gateway::netns::Link::Loopback,
            })
    }

    fn oom_killed(&self) -> bool {
        crate::engine::oom_kills(&self.id) > 0
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
