//! Restoring a clone by running `criu restore` directly instead of `runc restore`.
//!
//! Why: of a ~85 ms `runc restore` here, CRIU's own work is ~45-55 ms. The rest is runc: a Go
//! process start, a second `criu swrk` run only to learn CRIU's version, cgroup setup, state
//! files; and discarding the clone costs one more Go process (`runc delete`). On two cores
//! that is also most of the CPU an invocation burns outside the sandbox.
//!
//! What runc did that thaw does here instead:
//! - the cgroups and their limits ([`super::cgroups`]), which CRIU itself joins before it
//!   forks the restored tree, as under runc (restored tasks then start inside, and CRIU's
//!   cgroup work finds them already there);
//! - the external mounts' mapping: runc declared each bind mount at dump time under its
//!   destination (`/run/thaw`, `/.thaw/init`) and the masked `/proc` files under `/dev/null`;
//! - the stdio pipes (`descriptors.json`, written by runc's checkpoint, names the dumped
//!   pipes that new ones replace), and the pid file.
//!
//! What is lost: runc's record of the container. Such a sandbox cannot be checkpointed by
//! `runc checkpoint` (nor could its memory be: it maps the snapshot's page images), so only
//! clones that end in a discard are restored this way, and thaw kills them through their
//! cgroups ([`super::cgroups::destroy`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tokio::process::Command;

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
    /// Bind mounts as runc declared them at dump time: destination in the sandbox, then
    /// source on the host now.
    pub binds: Vec<(&'a str, PathBuf)>,
    pub pid_file: &'a Path,
    /// The sandbox's stdout/stderr go here, as for a runc container.
    pub log: &'a Path,
}

impl DirectRestore<'_> {
    fn args(&self, pipes: &[String]) -> Vec<OsString> {
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
            "--manage-cgroups=soft".into(),
            "--cgroup-root".into(),
            self.cgroup_root.into(),
        ];
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

    /// Runs `criu restore`; returns once the restored tree runs on its own.
    pub async fn run(&self) -> Result<()> {
        let pipes = dumped_stdio(self.images)?;
        let stdio = StdioPipes::new(self.log)?;
        let (stdin, stdout, stderr) = stdio.child_ends()?;
        let procs = self.cgroup.procs_files();
        let mut cmd = Command::new("criu");
        cmd.args(self.args(&pipes))
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        // SAFETY: `cgroups::join` only makes async-signal-safe calls on memory prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || cgroups::join(&procs));
        }
        let status = cmd.status().await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingDependency {
                    what: "criu (checkpoint/restore of sandboxes)".into(),
                    fix: "run `make deps` (builds CRIU 4.1.1 into /usr/local/sbin)".into(),
                }
            } else {
                Error::Criu(format!("criu restore: cannot start: {e}"))
            }
        })?;
        stdio.drain_in_background();
        if !status.success() {
            return Err(Error::Criu(format!("criu restore failed ({status})")));
        }
        Ok(())
    }
}

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
            binds: vec![("/run/thaw", PathBuf::from("/sb/run"))],
            pid_file: Path::new("/sb/init.pid"),
            log: Path::new("/sb/init.log"),
        };
        let args: Vec<String> = r
            .args(&["pipe:[11]".into(), "pipe:[12]".into(), "/dev/null".into()])
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
        assert!(joined.contains("--cgroup-root /thaw/sb-1"), "{joined}");
    }
}
