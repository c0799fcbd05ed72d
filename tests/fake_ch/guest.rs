//! The fake guest: guest-init as PID 1 of fresh UTS, IPC, network, PID and mount namespaces,
//! chrooted into the loop-mounted disk, without CAP_SYS_TIME, CAP_SYS_BOOT and
//! CAP_SYS_MODULE (so SetClock cannot touch the host's clock; the UTS namespace keeps
//! SetIdentity's hostname inside).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::{BootSpec, Serial};
use crate::disk::RootDisk;
use crate::procfs;
use crate::rootfs::{self, Mounts, AGENT_SOCKET, FAKE_DIR};
use crate::vsock;

/// How long guest-init's process may take to appear, and the guest to die when killed.
const START_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long all guest processes may take to reach the stopped state on pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes every later mount private to this process, so they all vanish with it even on
/// SIGKILL. Call before any thread exists.
pub fn private_mount_namespace() -> nix::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

/// A command whose process is SIGKILLed when the fake dies, however it dies.
pub fn child_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe system calls and does not allocate.
    unsafe {
        cmd.pre_exec(move || die_with_parent(parent));
    }
    cmd.kill_on_drop(true);
    cmd
}

fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl and getppid with integer arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before the prctl: then no signal would ever come.
        if libc::getppid() != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// A util-linux tool by absolute path: the guest launcher runs with an empty environment.
pub fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| Path::new("/usr/bin").join(name))
}

/// A running (or paused) fake guest.
pub struct Guest {
    pub id: u64,
    launcher: i32,
    init: i32,
    pidns: String,
    root: PathBuf,
    mounts: Mounts,
    disk: RootDisk,
    vsock: Option<vsock::Proxy>,
    exited: watch::Receiver<Option<String>>,
}

/// Mounts the root, binds the vsock device and starts guest-init. On error nothing is left.
pub async fn boot(spec: &BootSpec, root: &Path, id: u64) -> Result<Guest, String> {
    if spec.disk_readonly {
        return Err(
            "disks[0] is readonly: fake-cloud-hypervisor needs a writable root disk".into(),
        );
    }
    // A qcow2 disk is mounted through a raw scratch copy next to the API socket.
    let scratch = root.with_file_name("fake-disk0.raw");
    let disk = RootDisk::open(&spec.disk_config, &spec.disk, &scratch).await?;
    let mut mounts = Mounts::default();
    let mut proxy = None;
    match start(spec, &disk.mountable, root, &mut mounts, &mut proxy).await {
        Ok((launcher, init, pidns, exited)) => Ok(Guest {
            id,
            launcher,
            init,
            pidns,
            root: root.to_owned(),
            mounts,
            disk,
            vsock: proxy,
            exited,
        }),
        Err(e) => {
            drop(proxy);
            mounts.unmount_all().await;
            let _ = std::fs::remove_dir(root);
            disk.remove_scratch();
            Err(e)
        }
    }
}

type Started = (i32, i32, String, watch::Receiver<Option<String>>);

async fn start(
    spec: &BootSpec,
    disk: &Path,
    root: &Path,
    mounts: &mut Mounts,
    proxy: &mut Option<vsock::Proxy>,
) -> Result<Started, String> {
    rootfs::prepare(disk, root, mounts).await?;
    rootfs::check_init(root, &spec.init)?;
    if let Some(socket) = &spec.vsock_socket {
        let agent = root.join(FAKE_DIR).join(AGENT_SOCKET);
        *proxy = Some(vsock::Proxy::bind(socket, agent)?);
    }
    let mut launcher = launcher_command(spec, root)?
        .spawn()
        .map_err(|e| format!("cannot start the guest (setpriv/unshare from util-linux): {e}"))?;
    let (launcher_pid, init, pidns) = match find_init(&mut launcher, &spec.serial).await {
        Ok(found) => found,
        Err(e) => {
            let _ = launcher.start_kill();
            let _ = launcher.wait().await;
            return Err(e);
        }
    };
    let (tx, exited) = watch::channel(None);
    tokio::spawn(async move {
        let status = match launcher.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown status ({e})"),
        };
        let _ = tx.send(Some(status));
    });
    log!(
        "guest booted: init pid {init} (host view), {pidns}, root {}",
        root.display()
    );
    Ok((launcher_pid, init, pidns, exited))
}

/// `setpriv` drops the capabilities from the bounding set first (inherited by everything
/// below, and it must run on the host: the guest root has no util-linux), then `unshare`
/// makes the namespaces, chroots and forks guest-init as PID 1.
fn launcher_command(spec: &BootSpec, root: &Path) -> Result<Command, String> {
    let mut cmd = child_command(&tool("setpriv"));
    cmd.arg("--bounding-set=-sys_time,-sys_boot,-sys_module")
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(tool("unshare"))
        .args(["--uts", "--ipc", "--net", "--pid", "--mount"])
        .args(["--fork", "--kill-child"])
        .arg(format!("--root={}", root.display()))
        .arg("--")
        .arg(&spec.init)
        .arg("--listen")
        .arg(format!("unix:/{FAKE_DIR}/{AGENT_SOCKET}"))
        .arg("--state-dir")
        .arg(format!("/{FAKE_DIR}/state"))
        // What the kernel gives init in a VM.
        .env_clear()
        .env("HOME", "/")
        .env("TERM", "linux")
        .stdin(Stdio::null());
    let (out, err) = serial_stdio(&spec.serial)?;
    cmd.stdout(out).stderr(err);
    Ok(cmd)
}

fn serial_stdio(serial: &Serial) -> Result<(Stdio, Stdio), String> {
    match serial {
        Serial::Discard => Ok((Stdio::null(), Stdio::null())),
        Serial::Inherit => Ok((Stdio::inherit(), Stdio::inherit())),
        Serial::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open the serial file {}: {e}", path.display()))?;
            let f2 = f
                .try_clone()
                .map_err(|e| format!("serial file {}: {e}", path.display()))?;
            Ok((Stdio::from(f), Stdio::from(f2)))
        }
    }
}

/// The launcher's child in a PID namespace other than ours is the guest's PID 1.
/// Returns the launcher's pid, the init's pid and the guest's PID namespace.
async fn find_init(launcher: &mut Child, serial: &Serial) -> Result<(i32, i32, String), String> {
    let pid = launcher.id().ok_or("the guest launcher exited at once")? as i32;
    let own = procfs::own_pid_ns().ok_or("cannot read /proc/self/ns/pid")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let found = procfs::children(pid).into_iter().find_map(|c| {
            procfs::pid_ns(c)
                .filter(|ns| *ns != own)
                .map(|ns| (pid, c, ns))
        });
        if let Some(found) = found {
            return Ok(found);
        }
        if let Ok(Some(status)) = launcher.try_wait() {
            return Err(format!(
                "the guest exited during boot ({status}); console tail:\n{}",
                serial_tail(serial)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the guest's init did not start within {START_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn serial_tail(serial: &Serial) -> String {
    let Serial::File(path) = serial else {
        return "(serial output is not captured to a file)".into();
    };
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(2048);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

fn signal(pid: i32, sig: libc::c_int) {
    // kill(0) or kill(-1) would hit our own process group or everything: never.
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) with integer arguments; a vanished pid just fails with ESRCH.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Guest {
    /// Resolves once the guest's process tree has exited (with a description of the status).
    pub fn exited(&self) -> watch::Receiver<Option<String>> {
        self.exited.clone()
    }

    /// SIGSTOPs every process of the guest until all are stopped (repeating, so that a
    /// process forked during the sweep is caught too), then flushes the guest's filesystem
    /// so the image file on the host holds every write.
    pub async fn pause(&self) -> Result<(), String> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let running: Vec<i32> = procfs::pids_in_ns(&self.pidns)
                .into_iter()
                .filter(|&p| !procfs::is_stopped_or_gone(p))
                .collect();
            if running.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("guest processes {running:?} did not stop"));
            }
            for &p in &running {
                signal(p, libc::SIGSTOP);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.sync_disk()?;
        self.disk.sync_back().await
    }

    /// No process can appear while all are stopped, so one sweep resumes them all.
    pub fn resume(&self) {
        for p in procfs::pids_in_ns(&self.pidns) {
            signal(p, libc::SIGCONT);
        }
    }

    async fn wait_launcher(&self, timeout: Duration) -> bool {
        let mut exited = self.exited.clone();
        let done = tokio::time::timeout(timeout, exited.wait_for(Option::is_some)).await;
        // The sender only goes away after reporting, so a closed channel also means exited.
        done.is_ok()
    }

    /// A zombie holds no namespace and no mount: only live processes count.
    fn any_alive(&self) -> bool {
        procfs::pids_in_ns(&self.pidns)
            .into_iter()
            .any(procfs::is_alive)
    }

    fn sync_disk(&self) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(&self.root)
            .map_err(|e| format!("cannot open {}: {e}", self.root.display()))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("syncfs {}: {e}", self.root.display()));
        }
        Ok(())
    }

    /// Kills the guest tree (SIGKILL to its PID 1 ends the whole namespace), waits for it,
    /// closes the vsock device and unmounts the root.
    pub async fn stop(mut self) {
        // The launcher (`unshare`) is left alive to reap the guest's PID 1 and then exit:
        // killed first, it would orphan a zombie PID 1 to the host's init, which may take its
        // time reaping it.
        signal(self.init, libc::SIGKILL);
        for p in procfs::pids_in_ns(&self.pidns) {
            signal(p, libc::SIGKILL);
        }
        if !self.wait_launcher(STOP_TIMEOUT).await {
            log!(
                "the guest launcher {} did not exit: killing it",
                self.launcher
            );
            signal(self.launcher, libc::SIGKILL);
            self.wait_launcher(STOP_TIMEOUT).await;
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.any_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.vsock = None;
        self.mounts.unmount_all().await;
        if let Err(e) = self.disk.sync_back().await {
            log!("{e}");
        }
        self.disk.remove_scratch();
        let _ = std::fs::remove_dir(&self.root);
        log!("guest stopped");
    }
}
