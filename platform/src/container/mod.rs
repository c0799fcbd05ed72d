//! The container tier: Linux namespaces, cgroups, seccomp and an overlayfs root per sandbox,
//! through runc; memory snapshots by CRIU. Clones that end in a discard are restored by CRIU
//! directly, without runc ([`criu_restore`]).

mod backend;
pub mod cgroups;
pub mod channel;
pub mod checkpoint;
pub mod criu;
pub mod criu_restore;
pub mod mounts;
pub mod oci;
pub mod pool;
pub mod runc;
pub mod seccomp;
pub mod userns;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info_span, warn, Instrument};

use crate::agent::{Agent, Endpoint};
use crate::error::{Error, IoContext, Result};
use crate::paths::Paths;
use crate::template::spec::Limits;
use oci::{ContainerConfig, Network, GUEST_INIT_PATH};
use runc::Runc;

/// What a new sandbox is made of.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub hostname: String,
    /// Read-only rootfs layers, top first.
    pub layers: Vec<PathBuf>,
    pub limits: Limits,
    pub boot_timeout: Duration,
    /// Where a restore takes the clone's memory from (container tier; a microvm always maps
    /// its snapshot's memory on demand).
    pub memory: CloneMemory,
    /// The template's uid/gid range: sandbox root is `ids.host_base` on the host.
    pub ids: userns::IdMap,
}

/// Where a clone restored on the container tier gets its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMemory {
    /// Its own anonymous copy of every page, read from the snapshot during the restore
    /// (CRIU's default). A sandbox that may be checkpointed again (a session) needs this.
    Copied,
    /// Mapped copy-on-write from the materialised snapshot's page images (CRIU's
    /// `mmap-pages`, our patch `0002`): the restore copies nothing, a page comes from the page
    /// cache when first touched, and pages a clone only reads stay shared by every clone of
    /// the template. Such a clone cannot be checkpointed (its memory maps host files outside
    /// its mount namespace), so only sandboxes that end in a discard ask for it. Where the
    /// installed CRIU lacks the option, the restore copies instead.
    Shared,
}

#[derive(Debug, Clone)]
pub struct ContainerTier {
    pub paths: Paths,
    pub runc: Runc,
    pub guest_init: PathBuf,
    /// The installed CRIU has our `mmap-pages` option ([`CloneMemory::Shared`]).
    pub mmap_pages: bool,
    /// The installed CRIU has our `restore-gate-fd` option: a prepared sandbox's CRIU is
    /// started ahead and waits ([`criu_restore::Armed`]).
    pub restore_gate: bool,
    /// Clones restored [`CloneMemory::Shared`] skip runc ([`criu_restore`]): where thaw can
    /// confine them as runc would (see [`cgroups::can_confine_devices`]).
    pub direct_restore: bool,
    /// Sandboxes prepared ahead of their restore ([`pool`]); off unless turned on.
    pub pool: std::sync::Arc<pool::Pool>,
}

/// Who keeps a container sandbox's processes and cgroups, and so who ends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keeper {
    /// runc: booted sandboxes and those restored through it (sessions).
    Runc,
    /// thaw itself: clones restored by CRIU directly.
    Thaw,
}

/// A live container sandbox. Dropping it does not destroy it: call [`ContainerSandbox::destroy`]
/// (the engine does, on every path); the startup sweep catches what a crash leaves.
#[derive(Debug)]
pub struct ContainerSandbox {
    pub id: String,
    pub dir: PathBuf,
    pub agent: Agent,
    /// The agent's channel, bound once the sandbox's init is known.
    channel: channel::NetnsChannel,
    runc: Runc,
    keeper: Keeper,
}

/// Layout of a sandbox directory.
pub struct SandboxDir {
    pub root: PathBuf,
}

impl SandboxDir {
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk")
    }
    pub fn upper(&self) -> PathBuf {
        self.disk().join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.disk().join("work")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.root.join("rootfs")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("init.log")
    }
    pub fn owner(&self) -> PathBuf {
        self.root.join("owner")
    }
    /// CRIU's work directory (its logs) for a restore into this sandbox.
    pub fn criu_work(&self) -> PathBuf {
        self.root.join("criu-work")
    }
    /// The restored init's host pid (written by runc or CRIU).
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("init.pid")
    }
    /// Makes the directory, private to host root and the sandbox's own range (0710
    /// root:R: the sandbox's root passes through to its rootfs, nobody else gets in), with
    /// its owner record.
    pub fn create(&self, ids: userns::IdMap) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.root).ctx("creating sandbox directory", &self.root)?;
        nix::unistd::chown(
            &self.root,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(ids.root())),
        )
        .map_err(|e| Error::io("chown", &self.root, e.into()))?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o710))
            .ctx("setting the mode of", &self.root)?;
        crate::cleanup::write_owner(&self.owner())
    }

    /// The pid in [`SandboxDir::pid_file`].
    pub fn init_pid(&self) -> Result<u32> {
        let f = self.pid_file();
        std::fs::read_to_string(&f)
            .ctx("reading the sandbox's init pid", &f)?
            .trim()
            .parse()
            .map_err(|_| Error::Criu(format!("{}: not a pid", f.display())))
    }
}

impl ContainerTier {
    pub fn new(paths: Paths, guest_init: PathBuf) -> ContainerTier {
        let runc = Runc::new(paths.runc_root());
        let features = criu::features(&paths);
        ContainerTier {
            paths,
            runc,
            guest_init,
            mmap_pages: features.mmap_pages,
            restore_gate: features.restore_gate,
            direct_restore: cgroups::can_confine_devices(),
            pool: Default::default(),
        }
    }

    /// Where sandbox `id` lives.
    pub fn sandbox_dir(&self, id: &str) -> SandboxDir {
        SandboxDir {
            root: self.paths.sandbox(id),
        }
    }

    /// Prepares the sandbox directory: owner record, tmpfs disk, overlay root.
    pub fn prepare_dir(&self, spec: &SandboxSpec) -> Result<SandboxDir> {
        let d = self.sandbox_dir(&spec.id);
        d.create(spec.ids)?;
        mounts::mount_tmpfs(&d.disk(), spec.limits.disk_mib)?;
        mounts::mount_sandbox_root(&spec.layers, &d.upper(), &d.work(), &d.rootfs(), spec.ids)?;
        Ok(d)
    }

    /// The container runc would run for `spec` in `d`, with `guest_init` as its PID 1.
    pub fn container_config(
        &self,
        spec: &SandboxSpec,
        d: &SandboxDir,
        guest_init: &Path,
    ) -> ContainerConfig {
        ContainerConfig {
            rootfs: d.rootfs(),
            hostname: spec.hostname.clone(),
            args: vec![GUEST_INIT_PATH.to_string()],
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                format!("THAW_SANDBOX_ID={}", spec.id),
            ],
            cwd: "/".into(),
            network: Network::Loopback,
            build_caps: false,
            memory_bytes: Some(spec.limits.memory_mib << 20),
            cpu_quota_us: Some(spec.limits.vcpus as u64 * 100_000),
            pids: Some(spec.limits.pids),
            ids: spec.ids,
            cgroup_view: spec.limits.cgroup_view,
            guest_init: Some(guest_init.to_path_buf()),
            ca_bundle: None,
            cgroup_path: format!("/thaw/{}", spec.id),
            criu_config: Some(self.criu_config_for(spec.memory)),
        }
    }

    /// The CRIU options file for restoring a clone with `memory`.
    pub fn criu_config_for(&self, memory: CloneMemory) -> PathBuf {
        match memory {
            CloneMemory::Shared if self.mmap_pages => self.paths.criu_config_shared(),
            _ => self.paths.criu_config(),
        }
    }

    /// Cold boot: a fresh container running guest-init, ready to serve.
    pub async fn boot(&self, spec: &SandboxSpec) -> Result<ContainerSandbox> {
        let span = info_span!("sandbox.boot", sandbox = %spec.id);
        async {
            let started = Instant::now();
            let d = self.prepare_dir(spec);
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    let _ = mounts::teardown_dir(&self.paths.sandbox(&spec.id));
                    return Err(e);
                }
            };
            let sb = ContainerSandbox::new(
                spec.id.clone(),
                d.root.clone(),
                self.runc.clone(),
                Keeper::Runc,
            );
            let result = async {
                let cfg = oci::render(&self.container_config(spec, &d, &self.guest_init));
                write_json(&d.root.join("config.json"), &cfg)?;
                self.runc.run_detached(&spec.id, &d.root, &d.log()).await?;
                sb.channel
                    .bind(&spec.id, self.runc.init_pid(&spec.id).await?)?;
                debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "runc started"
                );
                sb.agent
                    .wait_ready(spec.boot_timeout)
                    .await
                    .map_err(|e| with_log(e, &d.log()))?;
                Ok(())
            }
            .await;
            match result {
                Ok(()) => Ok(sb),
                Err(e) => {
                    sb.destroy().await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }
}

impl ContainerSandbox {
    /// A handle on a sandbox about to start: its channel is bound once its init is known.
    pub(crate) fn new(id: String, dir: PathBuf, runc: Runc, keeper: Keeper) -> ContainerSandbox {
        let channel = channel::NetnsChannel::default();
        ContainerSandbox {
            agent: Agent::new(id.clone(), Endpoint::Netns(channel.clone())),
            id,
            dir,
            channel,
            runc,
            keeper,
        }
    }

    /// A handle on a sandbox that is already running (a session's, possibly made by an
    /// earlier process). runc's sandboxes have a state directory under runc's root, and the
    /// channel asks runc for their init; the others are thaw's own (a session restored with
    /// shared memory), whose init is in the sandbox's pid file.
    pub fn attach(tier: &ContainerTier, id: &str) -> ContainerSandbox {
        let dir = tier.paths.sandbox(id);
        let by_runc = tier.paths.runc_root().join(id).exists();
        let (channel, keeper) = if by_runc {
            (
                channel::NetnsChannel::via_runc(tier.runc.clone()),
                Keeper::Runc,
            )
        } else {
            let channel = channel::NetnsChannel::default();
            // A dead or half-made sandbox stays unbound: its agent calls fail, and
            // destroying it still cleans up.
            if let Ok(pid) = (SandboxDir { root: dir.clone() }).init_pid() {
                let _ = channel.bind(id, pid);
            }
            (channel, Keeper::Thaw)
        };
        ContainerSandbox {
            id: id.to_string(),
            agent: Agent::new(id.to_string(), Endpoint::Netns(channel.clone())),
            dir,
            channel,
            runc: tier.runc.clone(),
            keeper,
        }
    }

    /// Binds the agent's channel to the sandbox's init, `pid`.
    pub(crate) fn bind_channel(&self, pid: u32) -> Result<()> {
        self.channel.bind(&self.id, pid)
    }

    pub fn layout(&self) -> SandboxDir {
        SandboxDir {
            root: self.dir.clone(),
        }
    }

    /// Kills every process, removes the cgroup, unmounts and deletes the directory.
    /// Best effort on every step, so that one failure does not leak the rest.
    pub async fn destroy(self) {
        let span = info_span!("sandbox.destroy", sandbox = %self.id);
        async {
            match self.keeper {
                Keeper::Runc => {
                    if let Err(e) = self.runc.delete(&self.id).await {
                        warn!(error = %e, "runc delete");
                    }
                }
                Keeper::Thaw => {
                    let id = self.id.clone();
                    let killed = tokio::task::spawn_blocking(move || cgroups::destroy(&id)).await;
                    match killed {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "killing the sandbox's cgroups"),
                        Err(e) => warn!(error = %e, "cgroup teardown task"),
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

    pub async fn init_pid(&self) -> Result<u32> {
        match self.keeper {
            Keeper::Runc => self.runc.init_pid(&self.id).await,
            Keeper::Thaw => self.layout().init_pid(),
        }
    }
}

/// Where a sandbox's memory cgroup lives: in the v1 memory hierarchy, or in a v2 one (pure, or
/// the v2 hierarchy of a hybrid host, whose `cgroup.procs` lists the same processes).
pub fn memory_cgroup_dirs(id: &str) -> Vec<PathBuf> {
    cgroups::hierarchies()
        .iter()
        .filter(|h| h.v2 || h.has("memory"))
        .map(|h| h.dir(id))
        .collect()
}

/// Host pids of a container sandbox's processes: the members of its memory cgroup.
pub fn cgroup_pids(id: &str) -> Vec<u32> {
    for dir in memory_cgroup_dirs(id) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if !pids.is_empty() {
                return pids;
            }
        }
    }
    Vec::new()
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(path, bytes).ctx("writing", path)
}

/// Appends the tail of the container log to a readiness error: it usually says why.
fn with_log(e: Error, log: &Path) -> Error {
    match e {
        Error::NotReady {
            sandbox,
            timeout_ms,
            log: _,
        } => {
            let text = std::fs::read(log).unwrap_or_default();
            Error::NotReady {
                sandbox,
                timeout_ms,
                log: format!("; guest-init log: {}", runc::tail(&text, 400)),
            }
        }
        other => other,
    }
}
