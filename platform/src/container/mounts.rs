//! Host-side mounts of a sandbox: a size-capped tmpfs that holds the private overlay upper
//! directory (so the template's `disk_mib` limit is enforced by the kernel), and the overlayfs
//! root that stacks it on idmapped views of the template's read-only layers.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::userns::{self, IdMap};
use crate::error::{Error, IoContext, Result};

/// Mounts a tmpfs of `size_mib` at `target`.
pub fn mount_tmpfs(target: &Path, size_mib: u64) -> Result<()> {
    std::fs::create_dir_all(target).ctx("creating tmpfs mountpoint", target)?;
    let opts = format!("size={}m,mode=0700", size_mib);
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| Error::Runtime {
        command: format!("mount tmpfs {}", target.display()),
        message: format!("{e} (thaw must run as root)"),
    })
}

/// A sandbox's root: an overlay of idmapped views of `lowers` (top first) under `upper`,
/// mounted `nosuid,nodev` at `target`.
///
/// The layers are shared by every template and stay owned by uid 0 on disk; each is mounted
/// idmapped into the sandbox's range next to `target`, stacked, and unmounted again at once
/// (overlayfs keeps private clones of its layers), so nothing outlives the overlay. `upper`'s
/// own directory is given to the range's root when it is new (an extracted upper brings
/// its owner from the snapshot).
pub fn mount_sandbox_root(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    ids: IdMap,
) -> Result<()> {
    for d in [upper, work] {
        std::fs::create_dir_all(d).ctx("creating overlay directory", d)?;
    }
    if std::fs::read_dir(upper)
        .ctx("reading", upper)?
        .next()
        .is_none()
    {
        let id = Some(nix::unistd::Uid::from_raw(ids.root()));
        let gid = Some(nix::unistd::Gid::from_raw(ids.root()));
        nix::unistd::chown(upper, id, gid).map_err(|e| Error::io("chown", upper, e.into()))?;
    }
    let parent = target.parent().unwrap_or(Path::new("/"));
    let mut mapped = Vec::with_capacity(lowers.len());
    let mut result = Ok(());
    for (i, lower) in lowers.iter().enumerate() {
        let at = parent.join(format!("lower-{i}"));
        if let Err(e) = userns::mount_idmapped(lower, &at, ids) {
            result = Err(e);
            break;
        }
        mapped.push(at);
    }
    if result.is_ok() {
        // index=off: CRIU cannot dump overlay mounts that use inode indexing across
        // restores, and we never hard-link across layers.
        let rw = format!(
            ",upperdir={},workdir={},index=off",
            upper.display(),
            work.display()
        );
        result = overlay(&mapped, &rw, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, target);
    }
    for at in &mapped {
        let _ = umount2(at, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(at);
    }
    result
}

/// Read-only overlay of `lowers` (top first) at `target`: the merged view of a template's
/// layers, e.g. as the source of a microvm rootfs image.
pub fn mount_overlay_ro(lowers: &[PathBuf], target: &Path) -> Result<()> {
    overlay(lowers, "", MsFlags::MS_RDONLY, target)
}

fn overlay(lowers: &[PathBuf], extra: &str, flags: MsFlags, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).ctx("creating overlay directory", target)?;
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!("lowerdir={lower}{extra}");
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(opts.as_str()),
    )
    .map_err(|e| Error::Runtime {
        command: format!("mount overlay {}", target.display()),
        message: format!("{e} (needs root and overlayfs support; options: {opts})"),
    })
}

/// Unmounts `target` if it is mounted. Lazy (MNT_DETACH) so that a straggling process holding
/// a file cannot wedge cleanup; the kernel frees the mount when the last user goes.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(Error::Runtime {
            command: format!("umount {}", target.display()),
            message: e.to_string(),
        }),
    }
}

/// Every mountpoint at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Unmounts everything below `dir`, then removes it.
pub fn teardown_dir(dir: &Path) -> Result<()> {
    for m in mounts_below(dir) {
        unmount(&m)?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing sandbox directory", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
