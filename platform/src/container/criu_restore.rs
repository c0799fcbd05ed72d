//! Restoring a clone by running `criu restore` directly instead of `runc restore`.
//!
//! Why: of a ~85 ms `runc restore` here, CRIU's own work is ~45-55 ms. The rest is runc: a Go
//! process start, a second `criu swrk` run only to learn CRIU's version, cgroup setup, state
//! files; and discarding the clone costs one more Go process (`runc delete`). On two cores
//! that is also most of the CPU an invocation burns outside the sandbox.
//!
//! What runc did that thaw does here instead:
//! - the cgroups and their limits ([`super::cgroups`]), which CRIU itself joins before it
//!   forks the restored tree, so restored tasks start inside and CRIU is told to leave
//!   cgroups alone (unless the sandbox mounts its cgroup view);
//! - the external mounts' mapping: runc declared each bind mount at dump time under its
//!   destination (`/run/thaw`, `/.thaw/init`) and the masked `/proc` files under `/dev/null`;
//! - the stdio pipes (`descriptors.json`, written by runc's checkpoint, names the dumped
//!   pipes that new ones replace), and the pid file.
//!
//! Started ahead: with our CRIU patch `0006`, a sandbox prepared ahead ([`super::pool`])
//! holds a CRIU already started, its images read and its shared resources collected,
//! waiting at a gate (a pipe). A restore opens the gate and pays only for restoring: the
//! process start, the dynamic linking and CRIU's preparation were ~5 ms of every restore.
//!
//! What is lost: runc's record of the container. Such a sandbox cannot be checkpointed by
//! `runc checkpoint` (nor could its memory be: it maps the snapshot's page images), so only
//! clones that end in a discard are restored this way, and thaw kills them through their
//! cgroups ([`super::cgroups::destroy`]).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::cgroups::{self, SandboxCgroup};
use super::runc::StdioPipes;
use crate::error::{Error, Result};

/// CRIU's log level: 2, errors and warnings, which is what a failed restore is explained by.
/// runc asks for 4 (debug): ~5,000 more lines per restore, one write each, measured at ~9 ms
/// of a ~50 ms CRIU run here.
const LOG_LEVEL: &str = "-v2";

/// The device nodes runc gives every container (its default device list), bound from the
/// host's in a user namespace.
const RUNC_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/tty",
    "/dev/random",
    "/dev/urandom",
];

/// Everything a direct restore needs.
pub struct DirectRestore<'a> {
    pub images: &'a Path,
    pub work: &'a Path,
    pub rootfs: &'a Path,
    pub config: &'a Path,
    /// `/thaw/<id>`: where CRIU puts the restored tasks in every hierarchy.
    pub cgroup_root: &'a str,
    pub cgroup: &'a SandboxCgroup,
    /// The sandbox mounts its cgroups (`limits.cgroup_view`): CRIU must know them to restore
    /// those mounts. Otherwise CRIU leaves cgroups alone (see [`DirectRestore::args`]).
    pub cgroup_view: bool,
    /// Bind mounts as runc declared them at dump time: destination in the sandbox, then
    /// source on the host now.
    pub binds: Vec<(&'a str, PathBuf)>,
    pub pid_file: &'a Path,
    /// The sandbox's stdout/stderr go here, as for a runc container.
    pub log: &'a Path,
}

impl DirectRestore<'_> {
    fn args(&self, pipes: &[String], gate: Option<RawFd>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "restore".into(),
            "--images-dir".into(),
            self.images.into(),
            "--work-dir".into(),
            self.work.into(),
            "--log-file".into(),
            "restore.log".into(),
            LOG_LEVEL.into(),
            "--config".into(),
            self.config.into(),
            "--root".into(),
            self.rootfs.into(),
            "--restore-detached".into(),
            "--pidfile".into(),
            self.pid_file.into(),
        ];
        if self.cgroup_view {
            a.extend([
                "--manage-cgroups=soft".into(),
                "--cgroup-root".into(),
                self.cgroup_root.into(),
            ]);
        } else {
            // CRIU starts inside the sandbox's cgroups (`cgroups::join` before exec), so
            // every task it forks is already where it belongs. Left to manage them, CRIU
            // mounts a cgroup "yard" and moves each task into each of the ten hierarchies
            // again, each move a round trip to its user-namespace daemon: 40 round trips
            // and ~3 ms per restore of the python template, for nothing.
            a.push("--manage-cgroups=ignore".into());
        }
        if let Some(fd) = gate {
            a.push("--restore-gate-fd".into());
            a.push(fd.to_string().into());
        }
        let mut external = |key: &str, value: &Path| {
            let mut v = OsString::from(format!("mnt[{key}]:"));
            v.push(value);
            a.push("--external".into());
            a.push(v);
        };
        for (dest, src) in &self.binds {
            external(dest, src);
        }
        // runc dumps each masked /proc file (a bind of /dev/null) as external `/dev/null`,
        // and, in a user namespace (where it cannot mknod), binds each of its default
        // device nodes from the host and dumps it as external under its own path.
        for dev in RUNC_DEVICES {
            external(dev, Path::new(dev));
        }
        for (fd, name) in pipes.iter().enumerate() {
            if name.starts_with("pipe:") {
                a.push("--inherit-fd".into());
                a.push(format!("fd[{fd}]:{name}").into());
            }
        }
        a
    }

    /// Starts `criu restore` inside the sandbox's cgroups.
    ///
    /// With `gate` (a CRIU with our patch `0006`), CRIU starts, reads the images, collects
    /// what the restore shares, and waits for [`Armed::go`]: a prepared sandbox does this
    /// ahead of time, and a restore then pays only for restoring. Without, CRIU restores
    /// at once and [`Armed::go`] only waits for it.
    pub fn start(&self, gate: bool) -> Result<Armed> {
        let pipes = dumped_stdio(self.images)?;
        let stdio = StdioPipes::new(self.log)?;
        let (stdin, stdout, stderr) = stdio.child_ends()?;
        let gate = gate
            .then(|| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))
            .transpose()
            .map_err(|e| Error::Runtime {
                command: "pipe".into(),
                message: e.to_string(),
            })?;
        let gate_fd = gate.as_ref().map(|(r, _)| r.as_raw_fd());
        let procs = self.cgroup.procs_files();
        let mut cmd = Command::new("criu");
        cmd.args(self.args(&pipes, gate_fd))
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        // SAFETY: `cgroups::join` and `fcntl` are async-signal-safe calls on memory and
        // descriptors prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                cgroups::join(&procs)?;
                if let Some(fd) = gate_fd {
                    // CRIU keeps the gate's read end across exec; nothing else does.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingDependency {
                    what: "criu (checkpoint/restore of sandboxes)".into(),
                    fix: "run `make deps` (builds CRIU 4.1.1 into /usr/local/sbin)".into(),
                }
            } else {
                Error::Criu(format!("criu restore: cannot start: {e}"))
            }
        })?;
        // The sandbox's output is copied into its log from now on; the copy ends when the
        // last process holding the pipe (CRIU, or the restored tree) is gone.
        stdio.drain_in_background();
        Ok(Armed {
            child,
            gate: gate.map(|(_, w)| w),
        })
    }
}

/// A `criu restore` started by [`DirectRestore::start`], waiting at its gate or already
/// restoring. Dropped without [`Armed::go`] or [`Armed::cancel`], CRIU is killed.
#[derive(Debug)]
pub struct Armed {
    child: Child,
    /// The gate's write end: one byte opens it, closing it sends CRIU away.
    gate: Option<OwnedFd>,
}

impl Armed {
    /// Opens the gate and returns once the restored tree runs on its own.
    pub async fn go(mut self) -> Result<()> {
        if let Some(gate) = self.gate.take() {
            // A CRIU that already failed has closed its end: its exit status and log
            // explain why, so the write's own error adds nothing.
            let _ = nix::unistd::write(&gate, b"1");
        }
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| Error::Criu(format!("criu restore: cannot wait for it: {e}")))?;
        if !status.success() {
            return Err(Error::Criu(format!("criu restore failed ({status})")));
        }
        Ok(())
    }

    /// Whether CRIU is still there to restore (a prepared one waits at its gate; one that
    /// exited, killed or failed while it prepared, will restore nothing).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends away a CRIU that never got the go: with its gate closed it exits without
    /// restoring anything. One that does not within [`CANCEL_GRACE`] is killed.
    pub async fn cancel(mut self) {
        drop(self.gate.take());
        if tokio::time::timeout(CANCEL_GRACE, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// How long a cancelled CRIU may take to exit on its own.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// The stdio runc's checkpoint recorded (`descriptors.json`: the name of fds 0, 1 and 2).
fn dumped_stdio(images: &Path) -> Result<Vec<String>> {
    let path = images.join("descriptors.json");
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::Criu(format!(
            "{}: {e} (the snapshot is incomplete; republish the template)",
            path.display()
        ))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Criu(format!("{}: unreadable: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn externals_and_pipes_are_named_as_runc_dumped_them() {
        let cg = SandboxCgroup::empty();
        let r = DirectRestore {
            images: Path::new("/snap/criu"),
            work: Path::new("/sb/criu-work"),
            rootfs: Path::new("/sb/rootfs"),
            config: Path::new("/home/criu-shared.conf"),
            cgroup_root: "/thaw/sb-1",
            cgroup: &cg,
            cgroup_view: false,
            binds: vec![("/run/thaw", PathBuf::from("/sb/run"))],
            pid_file: Path::new("/sb/init.pid"),
            log: Path::new("/sb/init.log"),
        };
        let args: Vec<String> = r
            .args(
                &["pipe:[11]".into(), "pipe:[12]".into(), "/dev/null".into()],
                Some(7),
            )
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("--external mnt[/run/thaw]:/sb/run"),
            "{joined}"
        );
        assert!(
            joined.contains("--external mnt[/dev/null]:/dev/null"),
            "{joined}"
        );
        assert!(joined.contains("--inherit-fd fd[0]:pipe:[11]"), "{joined}");
        assert!(joined.contains("--inherit-fd fd[1]:pipe:[12]"), "{joined}");
        assert!(
            !joined.contains("fd[2]"),
            "/dev/null is not inherited: {joined}"
        );
        assert!(joined.contains("--restore-gate-fd 7"), "{joined}");
        // CRIU starts in the sandbox's cgroups and leaves them alone...
        assert!(joined.contains("--manage-cgroups=ignore"), "{joined}");
        assert!(!joined.contains("--cgroup-root"), "{joined}");
        // ...unless the sandbox mounts them, when CRIU must know them.
        let view = DirectRestore {
            cgroup_view: true,
            ..r
        };
        let joined = view
            .args(&[], None)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("--manage-cgroups=soft"), "{joined}");
        assert!(joined.contains("--cgroup-root /thaw/sb-1"), "{joined}");
        assert!(!joined.contains("--restore-gate-fd"), "{joined}");
    }
}
