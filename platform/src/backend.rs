//! The contract between the engine and an isolation tier.
//!
//! The engine, sessions and the crash sweep never name a tier's own types: they make, find
//! and end sandboxes through [`TierBackend`] (one per tier, owned by the engine) and act on a
//! live sandbox through the [`TierSandbox`] inside every [`Sandbox`]. [`Tiers::backend`] is
//! the one place where a [`Tier`] value picks its implementation, and [`Tiers::of_dir`] the
//! one place where a sandbox directory known only on disk (after a crash) does. A third tier
//! (gVisor, Firecracker) is a new pair of implementations, a [`Tier`] variant, and a line in
//! each of those two functions.
//!
//! The contract is two traits rather than one because a live sandbox must be usable on its
//! own: it is destroyed from a detached teardown task, by [`crate::engine::Live::destroy`],
//! and by sessions long after the call that made it returned, none of which hold the engine.
//!
//! What every tier must guarantee (the engine relies on each point):
//!
//! * A sandbox lives in `paths.sandbox(id)` (`sandboxes/<id>/`), which holds an `owner`
//!   record written before anything that needs cleaning up exists (a process, a mount, a
//!   cgroup): the crash sweep ([`crate::cleanup::sweep`]) finds orphans by that record, and
//!   sessions hand a sandbox over by rewriting it.
//! * Its guest-init answers on [`TierSandbox::agent`] once boot or restore returns.
//! * Nothing a sandbox can write is trusted or followed by the host (see
//!   ARCHITECTURE's trust boundary): the channel, checkpoints and cleanup use host-side paths.

use std::any::Any;
use std::collections::HashSet;
use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use crate::agent::Agent;
use crate::container::{ContainerTier, SandboxSpec};
use crate::error::{Error, Result};
use crate::microvm::MicrovmTier;
use crate::progress::Progress;
use crate::sandbox::Sandbox;
use crate::template::spec::Limits;
use crate::tier::Tier;

/// A boxed, sendable future: what the traits' async methods return, so that both stay
/// object safe (`&dyn TierBackend`, `Box<dyn TierSandbox>`) and usable from `thaw serve`'s
/// multi-threaded runtime.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One isolation tier: how its sandboxes are made, checkpointed, found again and swept.
pub trait TierBackend: Send + Sync {
    /// The tier this implements (recorded with templates and sessions).
    fn tier(&self) -> Tier;

    /// Whatever the tier builds once per template before its first boot, announced through
    /// `progress` (the microvm tier's guest image). Must be idempotent and cached: it runs at
    /// every publish. Most tiers need nothing.
    fn prepare_template<'a>(
        &'a self,
        _layers: &'a [PathBuf],
        _limits: &'a Limits,
        _progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Cold boot: a fresh sandbox named `spec.id` from the template's layers, its
    /// guest-init ready to serve (within `spec.boot_timeout`). On error nothing of it is
    /// left behind: no process, mount, cgroup or directory.
    fn boot<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Sandbox>>;

    /// Restores a clone from a materialised snapshot directory that this tier's
    /// [`TierBackend::checkpoint`] wrote, its guest-init ready to serve. `private`: the
    /// directory is this restore's own copy (a session's resume), which the tier may move
    /// into the sandbox and keep; otherwise it is the snapshot cache's entry, shared
    /// read-only by every clone, and must not be changed. `spec.memory` says whether the
    /// clone may be checkpointed later ([`crate::container::CloneMemory`]). The sandbox
    /// may come back under another id than `spec.id` (a sandbox prepared ahead brings its
    /// own); callers use [`Sandbox::id`]. On error nothing of it is left behind.
    fn restore<'a>(
        &'a self,
        spec: &'a SandboxSpec,
        snapshot: &'a Path,
        private: bool,
    ) -> BoxFuture<'a, Result<Sandbox>>;

    /// Checkpoints `sb` (one of this tier's) into `dest`, a directory that does not exist
    /// yet or is empty, whole: memory, processes and disk from one instant. With
    /// `leave_running` the sandbox goes on running afterwards (a session's pause keeps it
    /// until the snapshot is durable, so an interrupted pause can roll back); otherwise it
    /// may be left stopped. Either way the caller still owns the sandbox and destroys it.
    fn checkpoint<'a>(
        &'a self,
        sb: &'a Sandbox,
        dest: &'a Path,
        leave_running: bool,
    ) -> BoxFuture<'a, Result<()>>;

    /// A handle on a sandbox of this tier that already runs, made by this process or an
    /// earlier one (a session's, after a restart). Cheap and infallible: it only names
    /// the sandbox; a dead one shows as errors from its agent and as no
    /// [`TierSandbox::identity`], and destroying it still cleans up what is left.
    fn attach(&self, id: &str) -> Sandbox;

    /// Whether a sandbox directory known only on disk is this tier's, from the files in
    /// it (the crash sweep, sandboxes no session claims). [`Tier::default`]'s tier is the
    /// fallback and need not claim anything; every other tier must recognise its
    /// directories from the moment it starts a process for them.
    fn owns_dir(&self, dir: &Path) -> bool;

    /// Ends whatever still runs for an orphaned sandbox of this tier whose owner is gone
    /// (its processes, cgroups). Best effort, never fails; the caller then removes the
    /// directory and its mounts. The sandbox may be half made.
    fn sweep_orphan<'a>(&'a self, id: &'a str, dir: &'a Path) -> BoxFuture<'a, ()>;

    /// Ends what the tier keeps outside sandbox directories for sandboxes that are gone
    /// (neither in `live` nor on disk any more); returns how many it ended. Best effort.
    fn sweep_stray<'a>(&'a self, _live: &'a HashSet<String>) -> BoxFuture<'a, usize> {
        Box::pin(async { 0 })
    }

    /// Keep `n` sandboxes prepared ahead of their restore per snapshot in use, where the
    /// tier can (long-lived engines). A hint; the default ignores it.
    fn keep_prepared(&self, _n: usize) {}

    /// Ends this process's use of the tier: whatever it prepared ahead is torn down.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Ends every host process of live sandbox `id` now, whatever it does (a fork bomb, a
    /// task ignoring SIGTERM, a paused VM), and returns once none is left: `thaw kill`.
    /// Without asking the guest (it may not answer) and without a grace period. Leaves
    /// the sandbox's files, mounts and cgroups to its usual teardown. Blocking; callers run
    /// it off the async workers. The default: the tier cannot.
    fn kill_now(&self, id: &str) -> Result<crate::live::KillStats> {
        Err(Error::Other(format!(
            "sandbox {id}: the {} tier cannot kill a sandbox outright",
            self.tier().as_str()
        )))
    }

    /// What live sandbox `id` uses now, read by the host from the kernel (cgroups, /proc,
    /// its disk), never from the guest. A figure the tier cannot read is `None`, never 0.
    /// Blocking but cheap (a few small file reads): `ps` and `/metrics` call it per sandbox.
    fn usage(&self, _id: &str) -> crate::live::HostUsage {
        crate::live::HostUsage::default()
    }
}

/// A live sandbox of one tier, as only its tier can handle it. Dropping it does not end
/// the sandbox: [`TierSandbox::destroy`] does (the engine calls it on every path; the crash
/// sweep catches what a dead process leaves).
pub trait TierSandbox: Debug + Send + Sync + 'static {
    fn tier(&self) -> Tier;

    fn id(&self) -> &str;

    /// The sandbox's directory under `sandboxes/`.
    fn dir(&self) -> &Path;

    /// The channel to its guest-init.
    fn agent(&self) -> &Agent;

    /// Ends every process and removes every file, mount and cgroup of the sandbox. Best
    /// effort on every step, so one failure does not leak the rest; idempotent, and safe
    /// on a sandbox that is already dead or half made.
    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()>;

    /// `<pid> <starttime>` ([`crate::cleanup::identity`]) of the host process whose life
    /// is the sandbox's, or `None` if it does not run: sessions record it to tell, after a
    /// restart, whether their sandbox survived.
    fn identity(&self) -> BoxFuture<'_, Option<String>>;

    /// Host pids holding the sandbox's memory (`thaw bench` sums their PSS).
    fn host_pids(&self) -> Vec<u32>;

    /// Kills every process of the sandbox but its guest-init, keeping the sandbox and its
    /// files; returns how many it killed. How the host ends a task that broke its limits in
    /// a session. A tier that cannot reach the guest's processes answers an error, and the
    /// caller destroys the sandbox instead.
    fn kill_tasks(&self) -> BoxFuture<'_, Result<usize>>;

    /// Whether the host's OOM killer fired for the sandbox (tasks report `oom`). A tier
    /// whose guest kills inside its own kernel answers `false`: the task reports the signal.
    fn oom_killed(&self) -> bool;

    /// What the tier can tell about a sandbox whose guest stopped answering (a host-side
    /// timeout, a lost connection): a microvm's console tail, whether its VMM still runs.
    /// Read from files the host owns, with a size cap. `None`: nothing to add.
    fn post_mortem(&self) -> Option<String> {
        None
    }

    /// Gives the sandbox another hostname after its restore (a sandbox restored ahead and
    /// then handed to a session answers to the session's id). The default: the guest sets
    /// it itself when asked for its identity (a microvm's guest-init is root in its own
    /// kernel).
    fn rename_host<'a>(&'a self, _hostname: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// For the tier's own [`TierBackend::checkpoint`], to get its type back.
    fn as_any(&self) -> &dyn Any;

    /// Where the egress gateway wires the sandbox; `None` when it has no network namespace
    /// of its own (a microvm started by a thaw from before microvm networking).
    fn network(&self) -> Option<SandboxNetwork> {
        None
    }
}

/// A sandbox's network namespace, and how its traffic enters it: a container's processes
/// live in it, a microvm's guest sends its packets down a tap in its VMM's.
pub struct SandboxNetwork {
    pub ns: std::os::fd::OwnedFd,
    pub link: thaw_gateway::netns::Link,
}

/// Every tier this build has: the engine's one map from a [`Tier`] to its implementation.
#[derive(Clone)]
pub struct Tiers {
    pub container: ContainerTier,
    pub microvm: MicrovmTier,
}

impl Tiers {
    pub fn new(paths: crate::paths::Paths, guest_init: PathBuf) -> Tiers {
        Tiers {
            container: ContainerTier::new(paths.clone(), guest_init.clone()),
            microvm: MicrovmTier::new(paths, guest_init),
        }
    }

    /// The implementation of `tier`.
    pub fn backend(&self, tier: Tier) -> &dyn TierBackend {
        match tier {
            Tier::Container => &self.container,
            Tier::Microvm => &self.microvm,
        }
    }

    /// Every tier, the fallback ([`Tier::default`]) last.
    pub fn all(&self) -> [&dyn TierBackend; 2] {
        [self.backend(Tier::Microvm), self.backend(Tier::Container)]
    }

    /// The tier of a sandbox directory known only on disk: the first that claims it, else
    /// [`Tier::default`] (a directory made before any process started holds nothing to
    /// tell by, and any tier's cleanup of it is the same: remove the directory).
    pub fn of_dir(&self, dir: &Path) -> &dyn TierBackend {
        self.all()
            .into_iter()
            .find(|b| b.tier() != Tier::default() && b.owns_dir(dir))
            .unwrap_or_else(|| self.backend(Tier::default()))
    }
}

impl Sandbox {
    /// Wraps a tier's live sandbox.
    pub fn new(handle: Box<dyn TierSandbox>) -> Sandbox {
        Sandbox {
            id: handle.id().to_string(),
            agent: handle.agent().clone(),
            handle,
        }
    }

    /// The tier's own sandbox type, for that tier's [`TierBackend::checkpoint`]; an error
    /// if `sb` is another tier's (an engine bug: its records and tiers disagree).
    pub fn tier_handle<T: TierSandbox>(&self) -> Result<&T> {
        self.handle.as_any().downcast_ref::<T>().ok_or_else(|| {
            Error::Other(format!(
                "sandbox {} is a {} sandbox, not {}",
                self.id,
                self.tier().as_str(),
                std::any::type_name::<T>()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::ContainerSandbox;
    use crate::microvm::VmSandbox;

    fn tiers(tmp: &Path) -> Tiers {
        let paths = crate::paths::Paths::new(tmp.join("home"), tmp.join("cache"));
        Tiers::new(paths, PathBuf::from("/nonexistent/guest-init"))
    }

    #[test]
    fn each_tier_maps_to_its_own_backend() {
        let tmp = tempfile::tempdir().unwrap();
        let tiers = tiers(tmp.path());
        for t in [Tier::Container, Tier::Microvm] {
            assert_eq!(tiers.backend(t).tier(), t);
            let sb = tiers.backend(t).attach("sb-test");
            assert_eq!(sb.tier(), t);
            assert_eq!(sb.id, "sb-test");
            assert!(sb.dir().ends_with("sb-test"), "{}", sb.dir().display());
        }
    }

    #[test]
    fn a_directory_found_on_disk_goes_to_the_tier_that_claims_it() {
        let tmp = tempfile::tempdir().unwrap();
        let tiers = tiers(tmp.path());
        let dir = tmp.path().join("sb-orphan");
        std::fs::create_dir(&dir).unwrap();
        // Nothing to tell by yet: the fallback tier.
        assert_eq!(tiers.of_dir(&dir).tier(), Tier::Container);
        std::fs::create_dir(dir.join("vm")).unwrap();
        assert_eq!(tiers.of_dir(&dir).tier(), Tier::Microvm);
    }

    #[test]
    fn a_tier_refuses_another_tiers_sandbox() {
        let tmp = tempfile::tempdir().unwrap();
        let tiers = tiers(tmp.path());
        let vm = tiers.backend(Tier::Microvm).attach("sb-vm");
        assert!(vm.tier_handle::<VmSandbox>().is_ok());
        let e = vm
            .tier_handle::<ContainerSandbox>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("microvm sandbox"), "{e}");
    }
}
