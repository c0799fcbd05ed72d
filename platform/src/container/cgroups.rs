//! A sandbox's cgroups when thaw runs CRIU itself (a clone that ends in a discard, see
//! [`super::criu_restore`]); runc makes and removes its own for every other sandbox.
//!
//! The layout is runc's, `<hierarchy>/thaw/<id>` in every mounted hierarchy, so whoever
//! reads a sandbox's cgroup (`cgroup_pids`, `oom_kills`) or sweeps up after a crash need not
//! know which of the two made it. The limits are the ones runc would set from the same
//! template: memory (and memory+swap, so no swap), CPU quota, pids, and the device
//! allow-list.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::error::{Error, Result};
use crate::template::spec::Limits;

/// The cgroup below each hierarchy's root that holds every sandbox's.
pub const PARENT: &str = "thaw";

/// CPU bandwidth period; the quota is `vcpus` periods.
const CPU_PERIOD_US: u64 = 100_000;

/// runc's default device allow-list (after denying everything), in the order the kernel lists
/// it: `mknod` of anything (no sandbox can: it has no CAP_MKNOD), null, zero, full, random,
/// urandom, tty, ptmx, tun, and the ptys.
const ALLOWED_DEVICES: &[&str] = &[
    "b *:* m",
    "c *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 10:200 rwm",
    "c 136:* rwm",
];

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// The v1 controllers bound to it (`name=systemd` for a named one); empty on v2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

impl Hierarchy {
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// A sandbox's cgroup directory in this hierarchy.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.mount.join(PARENT).join(id)
    }
}

/// The host's cgroup hierarchies, read once from /proc/self/mountinfo.
pub fn hierarchies() -> &'static [Hierarchy] {
    static H: OnceLock<Vec<Hierarchy>> = OnceLock::new();
    H.get_or_init(|| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default()
    })
}

const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    // (device, preference, hierarchy): a hierarchy is one superblock however often it is
    // mounted (a bind, a container's view, CRIU's transient "cgroup yard" during a restore).
    let mut found: Vec<(String, u8, Hierarchy)> = Vec::new();
    for line in text.lines() {
        // `<id> <parent> <dev> <root> <mountpoint> <opts> [optional...] - <fstype> <src> <superopts>`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let (Some(dev), Some(root), Some(mount)) = (fields.get(2), fields.get(3), fields.get(4))
        else {
            continue;
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let superopts = r.nth(1).unwrap_or("");
        let (v2, controllers) = match fstype {
            "cgroup2" => (true, Vec::new()),
            "cgroup" => (
                false,
                superopts
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o) || o.starts_with("name="))
                    .map(String::from)
                    .collect(),
            ),
            _ => continue,
        };
        // The conventional place, showing the whole hierarchy, wins.
        let preference =
            u8::from(!mount.starts_with("/sys/fs/cgroup")) * 2 + u8::from(*root != "/");
        let h = Hierarchy {
            mount: PathBuf::from(mount),
            controllers,
            v2,
        };
        match found.iter_mut().find(|(d, _, _)| d == dev) {
            Some(existing) if existing.1 > preference => {
                *existing = (dev.to_string(), preference, h)
            }
            Some(_) => {}
            None => found.push((dev.to_string(), preference, h)),
        }
    }
    found.into_iter().map(|(_, _, h)| h).collect()
}

/// Whether thaw can give a sandbox the same confinement runc would: its device allow-list
/// needs a v1 `devices` hierarchy (on a pure v2 host runc attaches an eBPF device filter,
/// which thaw does not build, so restores there stay with runc).
pub fn can_confine_devices() -> bool {
    hierarchies().iter().any(|h| h.has("devices"))
}

/// A sandbox's cgroup in every hierarchy.
#[derive(Debug)]
pub struct SandboxCgroup {
    dirs: Vec<PathBuf>,
}

impl SandboxCgroup {
    /// Makes the sandbox's cgroups and sets its limits. On failure nothing is left behind.
    pub fn create(id: &str, limits: &Limits) -> Result<SandboxCgroup> {
        let hs = hierarchies();
        if hs.is_empty() {
            return Err(Error::Runtime {
                command: "cgroup setup".into(),
                message: "no cgroup hierarchy is mounted (is /sys/fs/cgroup mounted?)".into(),
            });
        }
        let mut made = SandboxCgroup { dirs: Vec::new() };
        for h in hs {
            let r = ensure_parent(h).and_then(|()| {
                let dir = h.dir(id);
                std::fs::create_dir(&dir).map_err(|e| cg_error("creating", &dir, e))?;
                made.dirs.push(dir.clone());
                configure(h, &dir, limits)
            });
            if let Err(e) = r {
                if let Err(e2) = destroy(id) {
                    warn!(sandbox = id, error = %e2, "removing half-made cgroups");
                }
                return Err(e);
            }
        }
        Ok(made)
    }

    #[cfg(test)]
    pub fn empty() -> SandboxCgroup {
        SandboxCgroup { dirs: Vec::new() }
    }

    /// Each `cgroup.procs`, for a child to join between fork and exec ([`join`]).
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok())
            .collect()
    }
}

/// Moves the calling process into each cgroup (writing `0` means "me"). Only
/// async-signal-safe calls, so it may run in a forked child before exec.
pub fn join(procs: &[CString]) -> std::io::Result<()> {
    for p in procs {
        // SAFETY: `p` is a valid NUL-terminated path; open/write/close are
        // async-signal-safe and touch no memory but the literal below.
        unsafe {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// `<hierarchy>/thaw` with what a child cgroup needs from its parent: v1 cpuset's CPUs and
/// memory nodes (empty in a new cgroup, and a cpuset without them admits no task), v2's
/// controllers enabled for children.
fn ensure_parent(h: &Hierarchy) -> Result<()> {
    let parent = h.mount.join(PARENT);
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(cg_error("creating", &parent, e)),
    }
    if h.has("cpuset") {
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let own = read_trim(&parent.join(f));
            if own.is_empty() {
                write(&parent.join(f), &read_trim(&h.mount.join(f)))?;
            }
        }
    }
    if h.v2 {
        for dir in [&h.mount, &parent] {
            let available = read_trim(&dir.join("cgroup.controllers"));
            let enabled = read_trim(&dir.join("cgroup.subtree_control"));
            for c in ["cpu", "memory", "pids"] {
                let on = enabled.split(' ').any(|e| e == c);
                if !on && available.split(' ').any(|a| a == c) {
                    write(&dir.join("cgroup.subtree_control"), &format!("+{c}"))?;
                }
            }
        }
    }
    Ok(())
}

fn configure(h: &Hierarchy, dir: &Path, limits: &Limits) -> Result<()> {
    let memory = limits.memory_mib << 20;
    let quota = u64::from(limits.vcpus) * CPU_PERIOD_US;
    if h.v2 {
        let set = |file: &str, value: &str| -> Result<()> {
            let p = dir.join(file);
            if p.exists() {
                write(&p, value)?;
            }
            Ok(())
        };
        set("memory.max", &memory.to_string())?;
        set("memory.swap.max", "0")?;
        set("cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
        set("pids.max", &limits.pids.to_string())?;
        return Ok(());
    }
    if h.has("cpuset") {
        let parent = dir.parent().unwrap_or(dir);
        for f in ["cpuset.cpus", "cpuset.mems"] {
            write(&dir.join(f), &read_trim(&parent.join(f)))?;
        }
    }
    if h.has("memory") {
        write(&dir.join("memory.limit_in_bytes"), &memory.to_string())?;
        // Where swap is accounted, memory+swap equal to memory means no swap at all.
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write(&memsw, &memory.to_string())?;
        }
    }
    if h.has("cpu") {
        write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
    }
    if h.has("pids") {
        write(&dir.join("pids.max"), &limits.pids.to_string())?;
    }
    if h.has("devices") {
        write(&dir.join("devices.deny"), "a")?;
        for rule in ALLOWED_DEVICES {
            write(&dir.join("devices.allow"), rule)?;
        }
    }
    Ok(())
}

/// A sandbox frozen in place until this is dropped: what the host reads of its files then
/// cannot change under it (a session's upper directory while it is archived).
pub struct Frozen {
    file: Option<PathBuf>,
    thawed: &'static str,
}

/// Freezes every process of sandbox `id` (v1 freezer, else v2 `cgroup.freeze`). Where
/// neither exists nothing is frozen, and the caller's reads must not rely on it alone.
pub fn freeze(id: &str) -> Frozen {
    let found = hierarchies().iter().find_map(|h| {
        let d = h.dir(id);
        if h.has("freezer") && d.join("freezer.state").exists() {
            Some((d.join("freezer.state"), "FROZEN", "THAWED"))
        } else if h.v2 && d.join("cgroup.freeze").exists() {
            Some((d.join("cgroup.freeze"), "1", "0"))
        } else {
            None
        }
    });
    match found {
        Some((file, frozen, thawed)) if std::fs::write(&file, frozen).is_ok() => Frozen {
            file: Some(file),
            thawed,
        },
        _ => Frozen {
            file: None,
            thawed: "",
        },
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            let _ = std::fs::write(f, self.thawed);
        }
    }
}

/// Kills every process in the sandbox's cgroups and removes them. Freezes first where it
/// can, so nothing forks between the listing and the kill. Absent cgroups are fine.
pub fn destroy(id: &str) -> Result<()> {
    let dirs: Vec<(&Hierarchy, PathBuf)> = hierarchies()
        .iter()
        .map(|h| (h, h.dir(id)))
        .filter(|(_, d)| d.exists())
        .collect();
    if dirs.is_empty() {
        return Ok(());
    }
    let freezer = dirs
        .iter()
        .find(|(h, _)| h.has("freezer"))
        .map(|(_, d)| d.join("freezer.state"));
    let kill_file = dirs
        .iter()
        .find(|(h, _)| h.v2)
        .map(|(_, d)| d.join("cgroup.kill"))
        .filter(|p| p.exists());
    if let Some(f) = &freezer {
        let _ = std::fs::write(f, "FROZEN");
    }
    if let Some(k) = &kill_file {
        let _ = std::fs::write(k, "1");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = members(&dirs);
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // A frozen task takes its SIGKILL when thawed.
        if let Some(f) = &freezer {
            let _ = std::fs::write(f, "THAWED");
        }
        if Instant::now() > deadline {
            return Err(Error::Runtime {
                command: format!("killing sandbox {id}"),
                message: format!("processes {pids:?} survived SIGKILL for 5 s"),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut first_error = None;
    for (_, d) in &dirs {
        if let Err(e) = rmdir_retrying(d) {
            first_error.get_or_insert(cg_error("removing", d, e));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Kills every process of the sandbox but `keep` (its init, guest-init), leaving the cgroups
/// and init alive: how the host ends a session's task when guest-init failed to (a task past
/// its timeout or flooding output), without losing the session's files. The cgroup is frozen
/// (v1 freezer, or v2 `cgroup.freeze`) while it is listed and killed, so nothing forks in
/// between; a frozen task takes its SIGKILL when thawed. Returns how many were killed.
pub fn kill_all_but(id: &str, keep: i32) -> Result<usize> {
    let dirs: Vec<(&Hierarchy, PathBuf)> = hierarchies()
        .iter()
        .map(|h| (h, h.dir(id)))
        .filter(|(_, d)| d.exists())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut killed = std::collections::BTreeSet::new();
    loop {
        let frozen = freeze(id);
        let pids: Vec<i32> = members(&dirs).into_iter().filter(|p| *p != keep).collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.insert(*pid);
        }
        drop(frozen);
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() > deadline {
            return Err(Error::Runtime {
                command: format!("killing the tasks of sandbox {id}"),
                message: format!("processes {pids:?} survived SIGKILL for 5 s"),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What [`kill_now`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Killed {
    /// Distinct processes signalled.
    pub processes: usize,
}

/// Ends every process of sandbox `id` at once, its init included, and returns when none is
/// left (the `thaw kill` path). Unlike [`destroy`] it leaves the cgroups in place: the
/// sandbox's usual teardown removes them, with its mounts and runc's state.
///
/// Why through the cgroup: a fork bomb outruns any walk of a process tree, and a task that
/// ignores SIGTERM must not be waited for. So each round freezes the cgroup (v1 freezer, or
/// v2 `cgroup.freeze`) and waits until the kernel says it is frozen, so no process can fork
/// between the listing and the kill; writes v2 `cgroup.kill` where it exists (the kernel
/// kills every member itself); sends SIGKILL to every member of every hierarchy; then
/// thaws, since a task frozen by the v1 freezer takes its SIGKILL only when thawed. Rounds
/// repeat until `cgroup.procs` is empty everywhere (bounded: an error after 5 s).
pub fn kill_now(id: &str) -> Result<Killed> {
    let dirs: Vec<(&Hierarchy, PathBuf)> = hierarchies()
        .iter()
        .map(|h| (h, h.dir(id)))
        .filter(|(_, d)| d.exists())
        .collect();
    let kill_file = dirs
        .iter()
        .find(|(h, _)| h.v2)
        .map(|(_, d)| d.join("cgroup.kill"))
        .filter(|p| p.exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut signalled = std::collections::BTreeSet::new();
    loop {
        let frozen = freeze(id);
        wait_frozen(id, Instant::now() + Duration::from_millis(20));
        // Listed before `cgroup.kill` empties the cgroup, so the count says what was ended.
        let pids = members(&dirs);
        if let Some(k) = &kill_file {
            let _ = std::fs::write(k, "1");
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            signalled.insert(*pid);
        }
        drop(frozen);
        // The killed take a moment to exit; a cgroup that stays populated gets another round.
        let settle = Instant::now() + Duration::from_millis(50);
        while !members(&dirs).is_empty() && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(1));
        }
        let left = members(&dirs);
        if left.is_empty() {
            return Ok(Killed {
                processes: signalled.len(),
            });
        }
        if Instant::now() > deadline {
            return Err(Error::Runtime {
                command: format!("killing sandbox {id}"),
                message: format!("processes {left:?} survived SIGKILL for 5 s"),
            });
        }
    }
}

/// Waits (until `deadline`) for the v1 freezer to report the cgroup `FROZEN`: while it says
/// `FREEZING`, a task may still be finishing a fork. v2's `cgroup.events` says `frozen 1`.
fn wait_frozen(id: &str, deadline: Instant) {
    let file = hierarchies().iter().find_map(|h| {
        let d = h.dir(id);
        if h.has("freezer") && d.join("freezer.state").exists() {
            Some((d.join("freezer.state"), "FROZEN"))
        } else if h.v2 && d.join("cgroup.freeze").exists() {
            Some((d.join("cgroup.events"), "frozen 1"))
        } else {
            None
        }
    });
    let Some((file, done)) = file else { return };
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.trim() == done || text.lines().any(|l| l.trim() == done) {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A sandbox's figures as its cgroups count them; `None`: no hierarchy here has it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// Reads sandbox `id`'s CPU time, memory and process count from its cgroups: v1's
/// `cpuacct.usage`, `memory.usage_in_bytes` and `pids.current`, else v2's `cpu.stat`
/// (`usage_usec`), `memory.current` and `pids.current` (a hybrid host has both; each figure
/// comes from the first hierarchy that has it).
pub fn usage(id: &str) -> Usage {
    let mut u = Usage::default();
    for h in hierarchies() {
        let d = h.dir(id);
        if !d.exists() {
            continue;
        }
        if h.v2 {
            if u.cpu_seconds.is_none() {
                u.cpu_seconds = std::fs::read_to_string(d.join("cpu.stat"))
                    .ok()
                    .and_then(|t| stat_field(&t, "usage_usec"))
                    .map(|us| us as f64 / 1e6);
            }
            u.memory_bytes = u
                .memory_bytes
                .or_else(|| read_u64(&d.join("memory.current")));
            u.pids = u.pids.or_else(|| read_u64(&d.join("pids.current")));
            continue;
        }
        if h.has("cpuacct") && u.cpu_seconds.is_none() {
            u.cpu_seconds = read_u64(&d.join("cpuacct.usage")).map(|ns| ns as f64 / 1e9);
        }
        if h.has("memory") && u.memory_bytes.is_none() {
            u.memory_bytes = read_u64(&d.join("memory.usage_in_bytes"));
        }
        if h.has("pids") && u.pids.is_none() {
            u.pids = read_u64(&d.join("pids.current"));
        }
    }
    u
}

/// Whether any hierarchy still lists a process of sandbox `id` (what `thaw kill` leaves:
/// none).
pub fn populated(id: &str) -> bool {
    let dirs: Vec<(&Hierarchy, PathBuf)> = hierarchies()
        .iter()
        .map(|h| (h, h.dir(id)))
        .filter(|(_, d)| d.exists())
        .collect();
    !members(&dirs).is_empty()
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// `key value` lines (`cpu.stat`, `memory.stat`).
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn members(dirs: &[(&Hierarchy, PathBuf)]) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs
        .iter()
        .filter_map(|(_, d)| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// A cgroup whose last task just died can stay busy for a moment while the kernel finishes
/// the exit; removal retries briefly.
fn rmdir_retrying(d: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn write(p: &Path, value: &str) -> Result<()> {
    std::fs::write(p, value).map_err(|e| cg_error(&format!("writing {value:?} to"), p, e))
}

fn cg_error(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::Runtime {
        command: "cgroup setup".into(),
        message: format!("{what} {}: {e} (thaw must run as root)", p.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real cgroups (root only; skipped elsewhere): the sandbox's init survives, every
    /// other member is killed, and the cgroup is left thawed and in place.
    #[test]
    fn kill_all_but_spares_only_the_init() {
        if !nix::unistd::geteuid().is_root() || hierarchies().is_empty() {
            eprintln!("skipped: needs root and cgroups");
            return;
        }
        let id = format!("test-kill-all-but-{}", std::process::id());
        let cg = SandboxCgroup::create(&id, &Limits::default()).unwrap();
        let spawn = || {
            let procs = cg.procs_files();
            let mut c = std::process::Command::new("sleep");
            c.arg("100");
            // SAFETY: `join` only makes async-signal-safe calls.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut c, move || join(&procs));
            }
            c.spawn().unwrap()
        };
        let mut init = spawn();
        let mut task = spawn();
        let killed = kill_all_but(&id, init.id() as i32).unwrap();
        assert_eq!(killed, 1);
        let st = task.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        assert!(init.try_wait().unwrap().is_none(), "the init survives");
        let frozen = hierarchies()
            .iter()
            .find(|h| h.has("freezer"))
            .map(|h| read_trim(&h.dir(&id).join("freezer.state")));
        assert!(
            matches!(frozen.as_deref(), None | Some("THAWED")),
            "{frozen:?}"
        );
        destroy(&id).unwrap();
        let _ = init.wait();
    }

    /// Real cgroups (root only; skipped elsewhere): a fork bomb under a pids limit is
    /// ended with every process it made, the cgroup is left empty and in place, and its
    /// figures were readable while it ran.
    #[test]
    fn kill_now_ends_a_fork_bomb_and_leaves_the_cgroup_empty() {
        if !nix::unistd::geteuid().is_root() || hierarchies().is_empty() {
            eprintln!("skipped: needs root and cgroups");
            return;
        }
        let id = format!("test-kill-now-{}", std::process::id());
        let limits = Limits {
            pids: 32,
            ..Limits::default()
        };
        let cg = SandboxCgroup::create(&id, &limits).unwrap();
        let procs = cg.procs_files();
        let mut c = std::process::Command::new("sh");
        // Each copy forks copies of itself for ever; the first shell spins without forking.
        c.args([
            "-c",
            "exec 2>/dev/null; f(){ while :; do f & done; }; f & while :; do :; done",
        ]);
        // SAFETY: `join` only makes async-signal-safe calls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || join(&procs));
        }
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut most = 0;
        while Instant::now() < deadline && most < 8 {
            most = most.max(usage(&id).pids.unwrap_or(0));
        }
        let u = usage(&id);
        assert!(most >= 8, "the bomb never got going: {u:?}");
        assert!(u.memory_bytes.is_some() && u.cpu_seconds.is_some(), "{u:?}");
        let started = Instant::now();
        let killed = kill_now(&id).unwrap();
        let took = started.elapsed();
        assert!(killed.processes >= 1, "{killed:?}");
        assert!(!populated(&id), "processes left after kill_now");
        assert!(took < Duration::from_millis(100), "kill_now took {took:?}");
        let st = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        assert!(
            hierarchies().iter().any(|h| h.dir(&id).exists()),
            "left in place"
        );
        destroy(&id).unwrap();
    }

    const HYBRID: &str = "\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory
37 30 0:33 / /sys/fs/cgroup/devices rw,nosuid - cgroup cgroup rw,devices
99 30 0:32 / /mnt/memory-again rw - cgroup cgroup rw,memory
98 30 0:27 / /tmp/sb/criu-work/.criu.cgyard.X/unified rw - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_yields_each_hierarchy_once_with_its_controllers() {
        // CRIU's yard mounted before the real one is still not the hierarchy's place.
        let yard_first = format!(
            "98 30 0:27 / /tmp/sb/.criu.cgyard.Y/unified rw - cgroup2 cgroup2 rw\n{HYBRID}"
        );
        assert_eq!(parse_mountinfo(&yard_first), parse_mountinfo(HYBRID));
        let hs = parse_mountinfo(HYBRID);
        let names: Vec<(&str, Vec<&str>, bool)> = hs
            .iter()
            .map(|h| {
                (
                    h.mount.to_str().unwrap(),
                    h.controllers.iter().map(String::as_str).collect(),
                    h.v2,
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("/sys/fs/cgroup/unified", vec![], true),
                ("/sys/fs/cgroup/systemd", vec!["name=systemd"], false),
                ("/sys/fs/cgroup/cpu,cpuacct", vec!["cpu", "cpuacct"], false),
                ("/sys/fs/cgroup/memory", vec!["memory"], false),
                ("/sys/fs/cgroup/devices", vec!["devices"], false),
            ]
        );
    }

    #[test]
    fn a_pure_v2_host_has_one_hierarchy_and_no_device_controller() {
        let hs = parse_mountinfo("31 1 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(hs.len(), 1);
        assert!(hs[0].v2 && !hs[0].has("devices"));
    }
}
