//! A live sandbox on either tier, as the engine and sessions use it: an id, a guest-init
//! endpoint, and the tier's own handle for what only the tier can do (snapshot, destroy,
//! liveness, OOM accounting).

use std::path::PathBuf;

use crate::agent::Agent;
use crate::container::ContainerSandbox;
use crate::microvm::VmSandbox;
use crate::tier::Tier;

#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub agent: Agent,
    pub(crate) inner: Inner,
}

#[derive(Debug)]
pub(crate) enum Inner {
    Container(ContainerSandbox),
    Vm(VmSandbox),
}

impl From<ContainerSandbox> for Sandbox {
    fn from(sb: ContainerSandbox) -> Sandbox {
        Sandbox {
            id: sb.id.clone(),
            agent: sb.agent.clone(),
            inner: Inner::Container(sb),
        }
    }
}

impl From<VmSandbox> for Sandbox {
    fn from(sb: VmSandbox) -> Sandbox {
        Sandbox {
            id: sb.id.clone(),
            agent: sb.agent.clone(),
            inner: Inner::Vm(sb),
        }
    }
}

impl Sandbox {
    pub fn tier(&self) -> Tier {
        match self.inner {
            Inner::Container(_) => Tier::Container,
            Inner::Vm(_) => Tier::Microvm,
        }
    }

    /// The sandbox's directory under `sandboxes/`.
    pub fn dir(&self) -> &std::path::Path {
        match &self.inner {
            Inner::Container(c) => &c.dir,
            Inner::Vm(v) => &v.dir,
        }
    }

    /// Its owner record (a thaw process, or a session once handed over).
    pub fn owner_file(&self) -> PathBuf {
        self.dir().join("owner")
    }

    /// Ends every process and removes every file of the sandbox (best effort throughout).
    pub async fn destroy(self) {
        match self.inner {
            Inner::Container(c) => c.destroy().await,
            Inner::Vm(v) => v.destroy().await,
        }
    }

    /// `<pid> <starttime>` of the process whose life is the sandbox's: the container's init,
    /// or the VMM.
    pub async fn identity(&self) -> Option<String> {
        match &self.inner {
            Inner::Container(c) => c.init_pid().await.ok().and_then(crate::cleanup::identity),
            Inner::Vm(v) => v.identity(),
        }
    }

    /// Host pids holding the sandbox's memory: the container's processes (its memory
    /// cgroup's members), or the VMM, whose memory is the guest's.
    pub fn host_pids(&self) -> Vec<u32> {
        match &self.inner {
            Inner::Container(c) => crate::container::cgroup_pids(&c.id),
            Inner::Vm(v) => v
                .identity()
                .and_then(|i| crate::cleanup::identity_pid(&i))
                .into_iter()
                .collect(),
        }
    }

    /// Kills every process of the sandbox but its init (guest-init), through its cgroups:
    /// how the host ends a task that guest-init did not end by its deadline or that flooded
    /// output, keeping the sandbox (a session's files) alive. Only the container tier can:
    /// a VM's processes are the guest kernel's, out of the host's reach, so a microvm
    /// answers an error and its caller destroys the VM instead.
    pub async fn kill_tasks(&self) -> crate::error::Result<usize> {
        match &self.inner {
            Inner::Container(c) => {
                let init = c.init_pid().await?;
                let init = i32::try_from(init).map_err(|_| {
                    crate::error::Error::Other(format!("sandbox {}: init pid {init}", c.id))
                })?;
                let id = c.id.clone();
                tokio::task::spawn_blocking(move || {
                    crate::container::cgroups::kill_all_but(&id, init)
                })
                .await
                .map_err(|e| crate::error::Error::Other(format!("cgroup kill task: {e}")))?
            }
            Inner::Vm(v) => Err(crate::error::Error::Other(format!(
                "sandbox {}: a microvm's processes can only be ended with the VM",
                v.id
            ))),
        }
    }

    /// Whether the kernel's OOM killer fired in the sandbox's memory cgroup. A VM's memory
    /// is its own: an out-of-memory guest kills inside, and the task reports the signal.
    pub fn oom_killed(&self) -> bool {
        match &self.inner {
            Inner::Container(c) => crate::engine::oom_kills(&c.id) > 0,
            Inner::Vm(_) => false,
        }
    }
}
