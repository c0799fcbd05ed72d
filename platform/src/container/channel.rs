//! The host's channel to a container sandbox's guest-init.
//!
//! guest-init listens on an abstract Unix socket ([`thaw_protocol::CONTAINER_AGENT_NAME`]),
//! a name that exists only in the sandbox's network namespace. The host keeps a descriptor
//! of that namespace (opened from the sandbox's init once it is known to be the sandbox's)
//! and makes each connection's socket inside it, from a short-lived thread that joins the
//! namespace and exits. So no host-side operation resolves a name the sandbox can write:
//! there is no socket file, no bind-mounted directory, and nothing for a sandbox to delete,
//! replace or point at another sandbox's guest-init.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};

/// How long a connect may wait for room in guest-init's accept queue.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a container sandbox's guest-init is: its network namespace, once known.
#[derive(Debug, Clone, Default)]
pub struct NetnsChannel {
    netns: Arc<OnceLock<OwnedFd>>,
    /// Asked for the init's pid on first use when the channel was not bound at start (a
    /// handle on a sandbox that an earlier process started).
    runc: Option<super::runc::Runc>,
}

impl NetnsChannel {
    /// A channel bound on first use to the init that runc reports for the sandbox.
    pub fn via_runc(runc: super::runc::Runc) -> NetnsChannel {
        NetnsChannel {
            netns: Default::default(),
            runc: Some(runc),
        }
    }

    /// A descriptor of the sandbox's namespace, once known.
    pub fn netns(&self) -> Option<OwnedFd> {
        self.netns.get().and_then(|n| n.try_clone().ok())
    }

    /// Whether the sandbox's namespace is known yet.
    pub fn is_bound(&self) -> bool {
        self.netns.get().is_some()
    }

    /// Binds the channel to the network namespace of `pid`, the sandbox's init as runc or
    /// CRIU reported it. The process is checked to belong to the sandbox's cgroup *after* its
    /// namespace is opened: had the pid been reused by another process in between, the
    /// check would see that process instead and refuse.
    pub fn bind(&self, sandbox: &str, pid: u32) -> Result<()> {
        let path = format!("/proc/{pid}/ns/net");
        let ns = std::fs::File::open(&path)
            .map_err(|e| Error::io("opening the sandbox's network namespace", &path, e))?;
        let own = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| Error::io("stat", "/proc/self/ns/net", e))?;
        let theirs = ns.metadata().map_err(|e| Error::io("stat", &path, e))?;
        use std::os::unix::fs::MetadataExt;
        if (theirs.dev(), theirs.ino()) == (own.dev(), own.ino()) {
            return Err(agent_err(
                sandbox,
                "its init shares the host's network namespace",
            ));
        }
        if !in_sandbox_cgroup(pid, sandbox) {
            return Err(agent_err(
                sandbox,
                &format!("pid {pid} is not in the sandbox's cgroup (it exited)"),
            ));
        }
        // A second bind (a retry) keeps the first: both name the same namespace.
        let _ = self.netns.set(OwnedFd::from(ns));
        Ok(())
    }

    /// A connected stream to guest-init.
    pub async fn connect(&self, sandbox: &str) -> Result<tokio::net::UnixStream> {
        if let (None, Some(runc)) = (self.netns.get(), &self.runc) {
            self.bind(sandbox, runc.init_pid(sandbox).await?)?;
        }
        let ns = self
            .netns
            .get()
            .ok_or_else(|| agent_err(sandbox, "the sandbox has not started"))?
            .try_clone()
            .map_err(|e| agent_err(sandbox, &format!("dup: {e}")))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // setns is per thread: a thread of its own joins the namespace, makes and connects
        // the socket (a socket belongs to the namespace it was made in), and exits, so no
        // thread of the runtime ever changes namespace.
        std::thread::Builder::new()
            .name("thaw-agent-connect".into())
            .spawn(move || {
                let _ = tx.send(connect_in(&ns));
            })
            .map_err(|e| agent_err(sandbox, &format!("thread: {e}")))?;
        let fd = rx
            .await
            .map_err(|_| agent_err(sandbox, "connect thread died"))?
            .map_err(|e| agent_err(sandbox, &format!("connect: {e}")))?;
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)
            .map_err(|e| agent_err(sandbox, &format!("nonblocking: {e}")))?;
        tokio::net::UnixStream::from_std(std).map_err(|e| agent_err(sandbox, &format!("{e}")))
    }
}

fn connect_in(ns: &OwnedFd) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
    let s = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A blocking connect waits for room in the accept queue, bounded by the send timeout.
    let tv = nix::sys::time::TimeVal::new(CONNECT_TIMEOUT.as_secs() as _, 0);
    socket::setsockopt(&s, socket::sockopt::SendTimeout, &tv)?;
    let addr = UnixAddr::new_abstract(thaw_protocol::CONTAINER_AGENT_NAME.as_bytes())?;
    socket::connect(s.as_raw_fd(), &addr)?;
    let none = nix::sys::time::TimeVal::new(0, 0);
    socket::setsockopt(&s, socket::sockopt::SendTimeout, &none)?;
    Ok(s)
}

/// Whether `pid`'s cgroup (in any hierarchy) is the sandbox's: `.../thaw/<id>`, below
/// wherever thaw's own cgroup is.
fn in_sandbox_cgroup(pid: u32, sandbox: &str) -> bool {
    let want = format!("/thaw/{sandbox}");
    let below = format!("{want}/");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        // `hierarchy-id:controllers:path`
        text.lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .any(|p| p.ends_with(&want) || p.contains(&below))
    })
}

fn agent_err(sandbox: &str, message: &str) -> Error {
    Error::Agent {
        sandbox: sandbox.to_string(),
        message: format!("guest-init channel: {message}"),
    }
}
