//! A VMM's logs, capped by the kernel: Cloud Hypervisor's own output and the guest's serial
//! and virtio consoles are files in `<workdir>/logs/`, a tmpfs of [`LOG_CAP_MIB`].
//!
//! The guest writes its console at will, and Cloud Hypervisor appends it to a file on the
//! host: without a cap a guest could fill the host's disk by printing. Cloud Hypervisor has no
//! size option, and the VMM may outlive every thaw process (sessions), so nothing of ours can
//! rotate the files. A small tmpfs makes the kernel enforce the cap: past it the VMM's writes
//! fail with ENOSPC and the guest's further output is lost, which costs only that guest. The
//! first [`LOG_CAP_MIB`] of a console (a whole boot, or a panic's backtrace) are kept.
//!
//! Mounting needs `CAP_SYS_ADMIN` (the platform runs as root). Without it the directory stays
//! a plain one and a warning says the logs are uncapped.

use std::path::{Path, PathBuf};

use tracing::warn;

/// The directory, relative to a VMM's work directory.
pub const LOGS_DIR: &str = "logs";
/// Its size: every log of one VMM together.
pub const LOG_CAP_MIB: u64 = 4;

/// `<workdir>/logs`.
pub fn dir(workdir: &Path) -> PathBuf {
    workdir.join(LOGS_DIR)
}

/// Creates `<workdir>/logs` and mounts the capped tmpfs on it.
pub fn prepare(workdir: &Path) -> std::io::Result<()> {
    let d = dir(workdir);
    std::fs::create_dir_all(&d)?;
    let opts = format!("size={}m,mode=0700", LOG_CAP_MIB);
    let flags = nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC;
    if let Err(e) = nix::mount::mount(
        Some("thaw-vmm-logs"),
        &d,
        Some("tmpfs"),
        flags,
        Some(opts.as_str()),
    ) {
        warn!(dir = %d.display(), error = %e,
            "cannot mount the capped tmpfs for the VMM's logs (needs CAP_SYS_ADMIN): the guest's console is uncapped");
    }
    Ok(())
}

/// Unmounts `<workdir>/logs` if it is mounted (lazily: a VMM being killed may still hold a
/// file). Best effort; the caller removes the directory next.
pub fn release(workdir: &Path) {
    let d = dir(workdir);
    match nix::mount::umount2(&d, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => {}
        // Not mounted (EINVAL) or already gone (ENOENT): nothing to release.
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => warn!(dir = %d.display(), error = %e, "unmounting the VMM's logs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_caps_what_a_vmm_can_log() {
        if !nix::unistd::geteuid().is_root() {
            // Without CAP_SYS_ADMIN prepare() leaves a plain directory (and says so).
            let d = tempfile::tempdir().unwrap();
            prepare(d.path()).unwrap();
            assert!(dir(d.path()).is_dir());
            return;
        }
        let d = tempfile::tempdir().unwrap();
        prepare(d.path()).unwrap();
        let f = dir(d.path()).join("console.log");
        let mut file = std::fs::File::create(&f).unwrap();
        use std::io::Write;
        let chunk = vec![b'x'; 1 << 20];
        let mut written = 0u64;
        let err = loop {
            match file.write_all(&chunk) {
                Ok(()) => written += chunk.len() as u64,
                Err(e) => break e,
            }
            assert!(
                written <= (LOG_CAP_MIB + 1) << 20,
                "no cap: {written} bytes"
            );
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        drop(file);
        release(d.path());
        std::fs::remove_dir_all(d.path().join(LOGS_DIR)).unwrap();
    }
}
