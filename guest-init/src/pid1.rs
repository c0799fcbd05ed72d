//! PID-1 duties: early mounts and loopback in a VM, the global zombie reaper, power-off.

use std::fs;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Mounts the pseudo-filesystems a bare VM root lacks. In a container the runtime has done
/// all of this; the function only runs when /proc is missing.
pub fn setup_mounts() {
    if Path::new("/proc/self").exists() {
        return;
    }
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    try_mount("proc", "/proc", "proc", nosuid_nodev_noexec, None);
    let mounted = mount_points();
    let missing = |p: &str| !mounted.iter().any(|m| m == p);
    if missing("/sys") {
        try_mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None);
    }
    if missing("/dev") {
        try_mount(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        );
    }
    if missing("/dev/pts") {
        try_mount(
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        );
    }
    if missing("/dev/shm") {
        try_mount(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        );
    }
    if missing("/tmp") {
        try_mount(
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        );
    }
    if missing("/run") {
        try_mount(
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        );
    }
}

fn try_mount(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = fs::create_dir_all(target) {
        crate::warn!("mkdir {target}: {e}");
    }
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) => crate::debug!("mounted {fstype} on {target}"),
        Err(Errno::EBUSY) => {}
        Err(e) => crate::warn!("mount {fstype} on {target}: {e}"),
    }
}

/// Mount points from /proc/self/mountinfo (field 5).
fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Brings `lo` up with SIOCGIFFLAGS/SIOCSIFFLAGS (no `ip` binary in most rootfs images).
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ioctls with a valid ifreq pointer; the union's flags member is what
    // SIOC[GS]IFFLAGS read and write.
    unsafe {
        if libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = req.ifr_ifru.ifru_flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        req.ifr_ifru.ifru_flags = flags;
        if libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes orphans of our tasks reparent to us (when we are not PID 1 already), so that a
/// supervisor killed by force still leaves nothing running behind our back.
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        crate::warn!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Reaps every exited child. Statuses are not needed: supervisors report over their pipes.
pub fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        crate::debug!("reaped {pid}");
    }
}

/// The global reaper: reap on every SIGCHLD. Never returns.
pub async fn reaper() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sig = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            // Without SIGCHLD delivery fall back to polling: zombies must not pile up.
            crate::warn!("cannot watch SIGCHLD ({e}); reaping by polling");
            loop {
                reap_all();
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    loop {
        reap_all();
        sig.recv().await;
    }
}

/// Syncs filesystems and powers the VM off. Only returns if reboot(2) fails.
pub fn power_off() {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    crate::warn!("reboot(RB_POWER_OFF): {}", std::io::Error::last_os_error());
}
