//! Whole-sandbox snapshots on the container tier: CRIU (driven by runc) dumps the process
//! tree with its memory, file descriptors, pipes and guest-init's listening socket; we add
//! the sandbox's private overlay upper directory (`upper.tar`), so a restore gets back
//! exactly the files the processes had open. A clone that ends in a discard is restored by
//! CRIU alone (`criu_restore`); every other restore goes through runc.
//!
//! Snapshot directory layout (what goes into the snapshotter):
//! - `criu/`      CRIU images (`pages-*.img` hold the memory)
//! - `upper.tar`  the overlay upper directory at checkpoint time (GNU tar, xattrs kept so
//!   overlayfs whiteouts and opaque directories survive)
//! - `guest-init` the binary the sandbox's PID 1 runs. CRIU maps it back from the file it
//!   was mapped from and refuses one of another size, so a snapshot that carried only a
//!   path would stop restoring the day thaw (and its guest-init) is upgraded. Snapshots
//!   from before this file restore with the current binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use tokio::process::Command;
use tracing::{debug, info_span, Instrument};

use super::cgroups::SandboxCgroup;
use super::criu_restore::{Armed, DirectRestore};
use super::userns;
use super::{
    mounts, oci, write_json, CloneMemory, ContainerSandbox, ContainerTier, Keeper, SandboxDir,
    SandboxSpec,
};
use crate::error::{Error, IoContext, Result};

pub const CRIU_DIR: &str = "criu";

/// CRIU options runc passes on (annotation `org.criu.config`; a config file given over
/// CRIU's RPC overrides runc's own settings).
///
/// `network-lock skip`: CRIU otherwise fences the sandbox's network namespace with
/// iptables rules while it dumps and restores, spawning iptables each time. A sandbox's
/// namespace holds only loopback, which nothing outside can reach, so there is nothing to
/// fence. The method is recorded at dump time and reused by the restore.
pub const CRIU_CONFIG: &str = "network-lock skip\n";
/// [`CRIU_CONFIG`] for restoring a clone with [`super::CloneMemory::Shared`] memory.
pub const CRIU_CONFIG_SHARED: &str = "network-lock skip\nmmap-pages\n";
pub const UPPER_TAR: &str = "upper.tar";
pub const GUEST_INIT: &str = "guest-init";

/// Timings of one restore, for `thaw bench` and tracing.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RestoreTimings {
    pub prepare_ms: f64,
    pub criu_ms: f64,
    pub ready_ms: f64,
}

async fn run_checked(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Criu(format!("{what}: cannot start: {e}")))?;
    if !out.status.success() {
        let mut text = out.stdout;
        text.extend_from_slice(&out.stderr);
        return Err(Error::Criu(format!(
            "{what} failed ({}): {}",
            out.status,
            super::runc::tail(&text, 800)
        )));
    }
    Ok(())
}

/// CRIU's own log explains most failures; quote its last error lines.
pub(super) fn criu_log_errors(work: &Path, file: &str) -> String {
    let text = std::fs::read_to_string(work.join(file)).unwrap_or_default();
    // CRIU reports failing to raise its own fd limit as an error, then carries on.
    let errs: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .filter(|l| !l.contains("Can't setup RLIMIT_NOFILE for self"))
        .collect();
    let start = errs.len().saturating_sub(4);
    errs[start..].join(" | ")
}

impl ContainerTier {
    /// Checkpoints a live sandbox into `dest` (which must not exist). With `leave_running`
    /// the sandbox goes on running afterwards (a session's pause keeps it until the snapshot
    /// is durable, so an interrupted pause can roll back); otherwise CRIU kills it. Either
    /// way the caller still owns the sandbox and must destroy it.
    pub async fn checkpoint(
        &self,
        sb: &ContainerSandbox,
        dest: &Path,
        leave_running: bool,
    ) -> Result<()> {
        let span = info_span!("sandbox.checkpoint", sandbox = %sb.id, leave_running);
        async {
            let started = Instant::now();
            let images = dest.join(CRIU_DIR);
            std::fs::create_dir_all(&images).ctx("creating checkpoint directory", &images)?;
            let work = sb.dir.join("criu-work");
            std::fs::create_dir_all(&work).ctx("creating CRIU work directory", &work)?;
            // The binary PID 1 really runs, which is the snapshot's own for a restored
            // sandbox, whatever this thaw's guest-init is now.
            let exe = PathBuf::from(format!("/proc/{}/exe", sb.init_pid().await?));
            let init = dest.join(GUEST_INIT);
            std::fs::copy(&exe, &init).ctx("keeping the sandbox's guest-init", &init)?;
            let mut cmd = Command::new("runc");
            cmd.arg("--root")
                .arg(self.paths.runc_root())
                .arg("checkpoint")
                .arg("--image-path")
                .arg(&images)
                .arg("--work-path")
                .arg(&work);
            if leave_running {
                cmd.arg("--leave-running");
            }
            cmd.arg(&sb.id);
            if let Err(e) = run_checked(cmd, "runc checkpoint").await {
                let detail = criu_log_errors(&work, "dump.log");
                return Err(Error::Criu(format!("{e}; criu: {detail}")));
            }
            debug!(ms = started.elapsed().as_millis() as u64, "criu dump done");
            let layout = sb.layout();
            // The upper directory is the sandbox's to change. A sandbox left running goes
            // on frozen while it is archived, so no name tar reads can be swapped under it;
            // GNU tar archives symlinks as symlinks and never follows them.
            let _frozen = leave_running.then(|| super::cgroups::freeze(&sb.id));
            let mut tar = Command::new("tar");
            tar.arg("--create")
                .arg("--xattrs")
                .arg("--xattrs-include=trusted.*")
                .arg("--sparse")
                .arg("--numeric-owner")
                .arg("--file")
                .arg(dest.join(UPPER_TAR))
                .arg("-C")
                .arg(layout.upper())
                .arg(".");
            run_checked(tar, "archiving the sandbox's upper directory").await?;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Restores a new sandbox from a materialised snapshot directory.
    pub async fn restore(
        &self,
        spec: &SandboxSpec,
        snapshot: &Path,
    ) -> Result<(ContainerSandbox, RestoreTimings)> {
        let t0 = Instant::now();
        let direct = spec.memory == CloneMemory::Shared && self.direct_restore;
        // A sandbox prepared ahead brings its name: the clone is called after it.
        let prepared = if direct {
            self.take_prepared(spec, snapshot)
        } else {
            None
        };
        let spec = &match &prepared {
            // The hostname follows the name unless the caller chose another (a session's
            // sandboxes answer to the session's id).
            Some(p) => SandboxSpec {
                id: p.id.clone(),
                hostname: if spec.hostname == spec.id {
                    p.id.clone()
                } else {
                    spec.hostname.clone()
                },
                ..spec.clone()
            },
            None => spec.clone(),
        };
        let span = info_span!("sandbox.restore", sandbox = %spec.id, prepared = prepared.is_some());
        async {
            let d = self.sandbox_dir(&spec.id);
            let sb = ContainerSandbox::new(
                spec.id.clone(),
                d.root.clone(),
                self.runc.clone(),
                if direct { Keeper::Thaw } else { Keeper::Runc },
            );
            let mut timings = RestoreTimings::default();
            let r = async {
                let (cgroup, armed) = match prepared {
                    Some(p) => (Some(p.cgroup), p.armed),
                    None => {
                        self.prepare_restore_dir(&d, spec, snapshot).await?;
                        let cgroup = if direct {
                            Some(SandboxCgroup::create(&spec.id, &spec.limits)?)
                        } else {
                            None
                        };
                        (cgroup, None)
                    }
                };
                timings.prepare_ms = ms(t0);
                let t1 = Instant::now();
                let restored = match (&cgroup, armed) {
                    // Prepared ahead: CRIU waits at its gate.
                    (Some(_), Some(armed)) => armed.go().await,
                    // CRIU restores at once: no gate to wait at.
                    (Some(cgroup), None) => {
                        async { self.arm(spec, &d, snapshot, cgroup, false)?.go().await }.await
                    }
                    (None, _) => {
                        let guest_init = self.guest_init_of(snapshot, &d)?;
                        let cfg = self.container_config(spec, &d, &guest_init);
                        write_json(&d.root.join("config.json"), &oci::render(&cfg))?;
                        let images = self.criu_images(spec, snapshot)?;
                        std::fs::create_dir_all(d.criu_work())
                            .ctx("creating CRIU work directory", d.criu_work())?;
                        let args: Vec<std::ffi::OsString> = vec![
                            "--image-path".into(),
                            images.into(),
                            "--work-path".into(),
                            d.criu_work().into(),
                            "--pid-file".into(),
                            d.pid_file().into(),
                            "--bundle".into(),
                            d.root.clone().into(),
                            spec.id.clone().into(),
                        ];
                        self.runc.restore_detached(&args, &d.log()).await
                    }
                };
                if let Err(e) = restored {
                    return Err(with_criu_log(e, &d.criu_work()));
                }
                timings.criu_ms = ms(t1);
                let t2 = Instant::now();
                let pid = d.init_pid()?;
                sb.bind_channel(pid)?;
                set_hostname(pid, &spec.hostname).await?;
                sb.agent.wait_ready(spec.boot_timeout).await?;
                timings.ready_ms = ms(t2);
                Ok(())
            }
            .await;
            if direct {
                self.refill(spec, snapshot);
            }
            match r {
                Ok(()) => {
                    debug!(?timings, "restored");
                    Ok((sb, timings))
                }
                Err(e) => {
                    sb.destroy().await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Starts the `criu restore` of `snapshot` into the sandbox `d` (its directory and
    /// cgroups made), waiting at its gate when `gate` is set ([`DirectRestore::start`]).
    pub(super) fn arm(
        &self,
        spec: &SandboxSpec,
        d: &SandboxDir,
        snapshot: &Path,
        cgroup: &SandboxCgroup,
        gate: bool,
    ) -> Result<Armed> {
        let guest_init = self.guest_init_of(snapshot, d)?;
        let cfg = self.container_config(spec, d, &guest_init);
        let work = d.criu_work();
        std::fs::create_dir_all(&work).ctx("creating CRIU work directory", &work)?;
        let images = self.criu_images(spec, snapshot)?;
        DirectRestore {
            images: &images,
            work: &work,
            rootfs: &d.rootfs(),
            config: &self.criu_config_for(spec.memory),
            cgroup_root: &cfg.cgroup_path,
            cgroup,
            cgroup_view: spec.limits.cgroup_view,
            binds: vec![(oci::GUEST_INIT_PATH, guest_init)],
            pid_file: &d.pid_file(),
            log: &d.log(),
        }
        .start(gate)
    }

    /// The snapshot's CRIU images, readable from inside the restored user namespace.
    fn criu_images(&self, spec: &SandboxSpec, snapshot: &Path) -> Result<PathBuf> {
        let images = snapshot.join(CRIU_DIR);
        // CRIU reads some images from inside the restored user namespace, where host
        // root's files are nobody's: they belong to the range's root (the directories
        // above stay host root's, 0700).
        if !userns::owned_by(&images, spec.ids) {
            userns::chown_tree(&images, spec.ids)?;
        }
        Ok(images)
    }

    /// The guest-init a snapshot's processes run: the copy it carries, else (a snapshot
    /// from before snapshots carried one) this thaw's.
    ///
    /// The sandbox gets its own link to it in its directory. For a sandbox that may be
    /// checkpointed again (`Copied` memory: a session) that matters twice: its snapshot
    /// directory is a private copy deleted once restored, and CRIU would find PID 1 running
    /// a deleted file at the next dump.
    fn guest_init_of(&self, snapshot: &Path, d: &SandboxDir) -> Result<PathBuf> {
        let carried = snapshot.join(GUEST_INIT);
        if !carried.is_file() {
            return Ok(self.guest_init.clone());
        }
        // CRIU binds it from inside the sandbox's user namespace, whose root can reach the
        // sandbox's directory but not the snapshot store (0700): every restore links it in.
        let own = d.root.join(GUEST_INIT);
        if std::fs::hard_link(&carried, &own).is_err() {
            std::fs::copy(&carried, &own).ctx("keeping the snapshot's guest-init", &own)?;
        }
        Ok(own)
    }

    pub(super) async fn prepare_restore_dir(
        &self,
        d: &SandboxDir,
        spec: &SandboxSpec,
        snapshot: &Path,
    ) -> Result<()> {
        d.create(spec.ids)?;
        mounts::mount_tmpfs(&d.disk(), spec.limits.disk_mib)?;
        std::fs::create_dir_all(d.upper()).ctx("creating upper directory", d.upper())?;
        let mut tar = Command::new("tar");
        tar.arg("--extract")
            .arg("--xattrs")
            .arg("--xattrs-include=trusted.*")
            .arg("--numeric-owner")
            .arg("--same-permissions")
            .arg("--file")
            .arg(snapshot.join(UPPER_TAR))
            .arg("-C")
            .arg(d.upper());
        run_checked(tar, "restoring the sandbox's upper directory").await?;
        mounts::mount_sandbox_root(&spec.layers, &d.upper(), &d.work(), &d.rootfs(), spec.ids)?;
        Ok(())
    }
}

/// A failed restore's error with CRIU's own explanation appended, when its log has one. A
/// missing dependency already names its fix and passes through as it is.
fn with_criu_log(e: Error, work: &Path) -> Error {
    let detail = criu_log_errors(work, "restore.log");
    match e {
        Error::MissingDependency { .. } => e,
        Error::Criu(m) if detail.is_empty() => Error::Criu(m),
        Error::Criu(m) => Error::Criu(format!("{m}; criu: {detail}")),
        other if detail.is_empty() => Error::Criu(other.to_string()),
        other => Error::Criu(format!("{other}; criu: {detail}")),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Gives a restored sandbox its own hostname. CRIU restores the UTS namespace with the
/// snapshot's name and the sandbox has no CAP_SYS_ADMIN to change it, so the host joins the
/// namespace from a short-lived thread (UTS namespaces are per-thread) and sets it.
pub(crate) async fn set_hostname(pid: u32, name: &str) -> Result<()> {
    let name = name.to_string();
    let path = PathBuf::from(format!("/proc/{pid}/ns/uts"));
    tokio::task::spawn_blocking(move || -> Result<()> {
        let handle = std::thread::spawn(move || -> Result<()> {
            let ns = std::fs::File::open(&path).ctx("opening UTS namespace", &path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUTS)
                .map_err(|e| Error::Other(format!("setns into sandbox UTS namespace: {e}")))?;
            nix::unistd::sethostname(&name)
                .map_err(|e| Error::Other(format!("sethostname: {e}")))?;
            Ok(())
        });
        handle
            .join()
            .map_err(|_| Error::Other("hostname thread panicked".into()))?
    })
    .await
    .map_err(|e| Error::Other(format!("hostname task: {e}")))?
}
