//! The guest's root: `disks[0]` loop-mounted read-write, with a minimal `/dev` and a
//! read-only `/sys` mounted over it so guest-init never mounts the host's devtmpfs or a
//! writable host sysfs in their place (it only mounts what is missing).

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::guest::child_command;

/// Scratch directory inside the guest root shared with the host: guest-init's socket and
/// state live there.
pub const FAKE_DIR: &str = ".thaw-fake";
pub const AGENT_SOCKET: &str = "agent.sock";
/// Symlink hops allowed while resolving a path inside the root (as the kernel's ELOOP bound).
const MAX_SYMLINKS: usize = 40;

/// Character devices a VM guest's init can count on, as a container runtime provides them.
const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Mount points made for one guest, undone in reverse order.
#[derive(Debug, Default)]
pub struct Mounts(Vec<PathBuf>);

impl Mounts {
    pub async fn unmount_all(&mut self) {
        while let Some(p) = self.0.pop() {
            unmount(&p).await;
        }
    }
}

/// Unmounts `p`, waiting a little while the dying guest still holds it, then detaching it so
/// it goes away with its last user.
async fn unmount(p: &Path) {
    for _ in 0..50 {
        match umount2(p, MntFlags::empty()) {
            Ok(()) => return,
            Err(Errno::EBUSY) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                log!("umount {}: {e}", p.display());
                return;
            }
        }
    }
    if let Err(e) = umount2(p, MntFlags::MNT_DETACH) {
        log!("umount -l {}: {e}", p.display());
    }
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> String {
    let msg = format!("{what} {}", path.display());
    move |e| format!("{msg}: {e}")
}

/// Loop-mounts `disk` read-write at `root`, then adds `/.thaw-fake`, `/dev` and `/sys`.
pub async fn prepare(disk: &Path, root: &Path, mounts: &mut Mounts) -> Result<(), String> {
    std::fs::create_dir_all(root).map_err(io_err("cannot create", root))?;
    mount_disk(disk, root).await?;
    mounts.0.push(root.to_owned());
    fake_dir(root)?;
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(io_err("cannot create", &dev))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(|e| format!("mount tmpfs on {}: {e}", dev.display()))?;
    mounts.0.push(dev.clone());
    populate_dev(&dev)?;
    let sys = root.join("sys");
    std::fs::create_dir_all(&sys).map_err(io_err("cannot create", &sys))?;
    mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mount sysfs on {}: {e}", sys.display()))?;
    mounts.0.push(sys);
    Ok(())
}

/// `mount -o loop` sets up the loop device with autoclear: it is released with the mount.
async fn mount_disk(disk: &Path, root: &Path) -> Result<(), String> {
    let out = child_command(Path::new("mount"))
        .arg("-o")
        .arg("loop,rw")
        .arg(disk)
        .arg(root)
        .output()
        .await
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot loop-mount the disk image {} at {} ({}): {}",
            disk.display(),
            root.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// `/.thaw-fake`, root-only like guest-init's own socket directory, without a stale socket
/// from the snapshotted disk (the proxy would otherwise connect to a dead one).
fn fake_dir(root: &Path) -> Result<(), String> {
    let dir = root.join(FAKE_DIR);
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot chmod", &dir))?;
    let sock = dir.join(AGENT_SOCKET);
    match std::fs::remove_file(&sock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_err("cannot remove stale", &sock)(e))
        }
        _ => Ok(()),
    }
}

fn populate_dev(dev: &Path) -> Result<(), String> {
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| format!("mknod {}: {e}", p.display()))?;
        // mknod honours the umask; the nodes must be world-usable as on any Linux.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666))
            .map_err(io_err("cannot chmod", &p))?;
    }
    for (name, target) in DEV_LINKS {
        let p = dev.join(name);
        std::os::unix::fs::symlink(target, &p).map_err(io_err("cannot create", &p))?;
    }
    Ok(())
}

/// Resolves `path` inside `root` as the guest would see it: absolute symlinks (a usr-merged
/// `/sbin -> usr/sbin`, or `/sbin/init -> /lib/...`) point into the root, never the host.
pub fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, String> {
    let mut todo: Vec<PathBuf> = components_rev(Path::new(path));
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c.as_os_str() == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let host = root.join(&next);
        let meta = std::fs::symlink_metadata(&host)
            .map_err(|e| format!("{path} in the guest root: {}: {e}", next.display()))?;
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINKS {
            return Err(format!("{path} in the guest root: too many symlinks"));
        }
        let target = std::fs::read_link(&host).map_err(io_err("cannot read link", &host))?;
        if target.is_absolute() {
            cur = PathBuf::new();
        }
        todo.extend(components_rev(&target));
    }
    Ok(root.join(cur))
}

/// Normal and `..` components of `p`, last first (a stack to pop from).
fn components_rev(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    v.reverse();
    v
}

/// The init must be an executable regular file inside the root.
pub fn check_init(root: &Path, init: &str) -> Result<(), String> {
    let host =
        resolve_in_root(root, init).map_err(|e| format!("guest init {init} not found: {e}"))?;
    let meta = std::fs::metadata(&host).map_err(|e| format!("guest init {init}: {e}"))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "guest init {init} is not an executable file in the root filesystem"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::write(root.join("usr/sbin/init"), b"x").unwrap();
        std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).unwrap();
        std::os::unix::fs::symlink("/sbin/init", root.join("init")).unwrap();
        let want = root.join("usr/sbin/init");
        assert_eq!(resolve_in_root(root, "/sbin/init").unwrap(), want);
        assert_eq!(resolve_in_root(root, "/init").unwrap(), want);
        assert_eq!(resolve_in_root(root, "/../../sbin/./init").unwrap(), want);
        assert!(resolve_in_root(root, "/missing").is_err());
        assert!(check_init(root, "/init").is_err(), "not executable");
        std::fs::set_permissions(&want, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_init(root, "/init").unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(root, "/loop").is_err());
    }
}
