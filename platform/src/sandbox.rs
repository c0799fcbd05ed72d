//! A live sandbox on any tier, as the engine and sessions use it: an id, a guest-init
//! endpoint, and the tier's own handle ([`TierSandbox`]) for what only the tier can do
//! (destroy, liveness, killing tasks, OOM accounting; its [`crate::backend::TierBackend`]
//! checkpoints it).

use std::path::PathBuf;

use crate::agent::Agent;
use crate::backend::TierSandbox;
use crate::tier::Tier;

#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub agent: Agent,
    pub(crate) handle: Box<dyn TierSandbox>,
}

impl Sandbox {
    pub fn tier(&self) -> Tier {
        self.handle.tier()
    }

    /// The sandbox's directory under `sandboxes/`.
    pub fn dir(&self) -> &std::path::Path {
        self.handle.dir()
    }

    /// Its owner record (a thaw process, or a session once handed over).
    pub fn owner_file(&self) -> PathBuf {
        self.dir().join("owner")
    }

    /// Adds what the tier knows (a microvm's console tail) to an error that says the guest
    /// stopped answering: a host-side timeout or a lost connection. Other errors pass as
    /// they are.
    pub fn explain(&self, e: crate::error::Error) -> crate::error::Error {
        use crate::error::Error;
        let Some(more) = (match &e {
            Error::HostTimeout { .. } | Error::Agent { .. } => self.handle.post_mortem(),
            _ => None,
        }) else {
            return e;
        };
        match e {
            Error::HostTimeout { sandbox, what } => Error::HostTimeout {
                sandbox,
                what: format!("{what}; {more}"),
            },
            Error::Agent { sandbox, message } => Error::Agent {
                sandbox,
                message: format!("{message}; {more}"),
            },
            other => other,
        }
    }

    /// Ends every process and removes every file of the sandbox (best effort throughout).
    pub async fn destroy(self) {
        // The gateway's listeners live in the sandbox's namespace and would keep it alive.
        crate::egress::release(&self.id);
        self.handle.destroy().await
    }

    /// `<pid> <starttime>` of the process whose life is the sandbox's: the container's init,
    /// or the VMM.
    pub async fn identity(&self) -> Option<String> {
        self.handle.identity().await
    }

    /// Host pids holding the sandbox's memory: the container's processes (its memory
    /// cgroup's members), or the VMM, whose memory is the guest's.
    pub fn host_pids(&self) -> Vec<u32> {
        self.handle.host_pids()
    }

    /// Kills every process of the sandbox but its init (guest-init): how the host ends a
    /// task that guest-init did not end by its deadline or that flooded output, keeping the
    /// sandbox (a session's files) alive. A tier that cannot (a microvm: the guest kernel's
    /// processes are out of the host's reach) answers an error and its caller destroys the
    /// sandbox instead.
    pub async fn kill_tasks(&self) -> crate::error::Result<usize> {
        self.handle.kill_tasks().await
    }

    /// Whether the kernel's OOM killer fired in the sandbox's memory cgroup. A VM's memory
    /// is its own: an out-of-memory guest kills inside, and the task reports the signal.
    /// See [`TierSandbox::rename_host`].
    pub async fn rename_host(&self, hostname: &str) -> crate::error::Result<()> {
        self.handle.rename_host(hostname).await
    }

    pub fn oom_killed(&self) -> bool {
        self.handle.oom_killed()
    }
}
