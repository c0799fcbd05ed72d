//! User namespaces: root in a sandbox is an unprivileged uid range on the host.
//!
//! Every template gets its own range of 65,536 host uids and gids ([`IdMap`]), allocated at
//! its first publish and kept by its record and by every session made from it. Its build,
//! its snapshot, every clone restored from it and every session of it run with uid 0..65535
//! inside mapped to `host_base..host_base+65535` outside. Two tenants never share a range;
//! clones of one template do (see SECURITY.md for why, and what that means).
//!
//! The shared read-only rootfs layers stay as they are on disk (owned by uid 0 and friends)
//! and are shifted into the range without copying by *idmapped mounts*
//! (`mount_setattr(MOUNT_ATTR_IDMAP)`): each sandbox's overlay stacks idmapped views of the
//! layers under its private upper directory, whose files are owned by range uids. So one
//! copy of a base on disk and in the page cache serves every template, and nothing a
//! sandbox creates is owned by host root.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

// RANGE_SIZE, MAX_RANGES and IdMap are in thaw-types (types/src/ids.rs).
pub use thaw_types::ids::{IdMap, MAX_RANGES, RANGE_SIZE};

/// The lowest range index not in `used`.
pub fn lowest_free(used: &[u32]) -> Result<u32> {
    let mut used = used.to_vec();
    used.sort_unstable();
    used.dedup();
    let mut want = 0;
    for u in used {
        if u == want {
            want += 1;
        } else if u > want {
            break;
        }
    }
    if want >= MAX_RANGES {
        return Err(Error::Other(format!(
            "all {MAX_RANGES} uid ranges are in use by templates and sessions; \
             delete unused templates or sessions"
        )));
    }
    Ok(want)
}

/// A user namespace with `map`, held by descriptor (what an idmapped mount needs). Made once
/// per range per process: a child unshares a user namespace, the parent writes its maps,
/// keeps a descriptor of the namespace and reaps the child.
fn userns_fd(map: IdMap) -> Result<Arc<OwnedFd>> {
    static CACHE: OnceLock<Mutex<HashMap<IdMap, Arc<OwnedFd>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(fd) = cache.lock().ok().and_then(|c| c.get(&map).cloned()) {
        return Ok(fd);
    }
    let fd = Arc::new(make_userns(map)?);
    if let Ok(mut c) = cache.lock() {
        c.insert(map, fd.clone());
    }
    Ok(fd)
}

fn make_userns(map: IdMap) -> Result<OwnedFd> {
    let err = |what: &str, e: std::io::Error| Error::Runtime {
        command: format!("user namespace for uids {}+{}", map.host_base, map.size),
        message: format!("{what}: {e}"),
    };
    // A forked child unshares a user namespace, says so on one pipe and waits on another
    // until the parent has written its maps and opened it. No exec: nothing is looked up
    // on PATH, and the child touches nothing the parent's threads may hold.
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err("pipe", e.into()));
    let (ready_r, ready_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    // SAFETY: the child only makes raw, async-signal-safe syscalls (unshare, write, read,
    // _exit) on descriptors and stack memory it owns, then exits without unwinding.
    let pid = match unsafe { nix::unistd::fork() }.map_err(|e| err("fork", e.into()))? {
        nix::unistd::ForkResult::Child => unsafe {
            // The child's copies of the parent's ends: without closing them it would wait
            // for an EOF it holds off itself.
            libc::close(done_w.as_raw_fd());
            libc::close(ready_r.as_raw_fd());
            let ok: u8 = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
            libc::write(
                ready_w.as_raw_fd(),
                &ok as *const u8 as *const libc::c_void,
                1,
            );
            let mut b = 0u8;
            libc::read(
                done_r.as_raw_fd(),
                &mut b as *mut u8 as *mut libc::c_void,
                1,
            );
            libc::_exit(0);
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    drop(done_r);
    let result = (|| {
        let mut ok = [0u8; 1];
        let n =
            nix::unistd::read(ready_r.as_raw_fd(), &mut ok).map_err(|e| err("read", e.into()))?;
        if n != 1 || ok[0] != 1 {
            return Err(err(
                "unshare(CLONE_NEWUSER)",
                std::io::Error::other(
                    "refused (user namespaces disabled? check sysctl user.max_user_namespaces)",
                ),
            ));
        }
        let ns_path = format!("/proc/{pid}/ns/user");
        std::fs::write(format!("/proc/{pid}/uid_map"), map.map_line())
            .map_err(|e| err("uid_map", e))?;
        std::fs::write(format!("/proc/{pid}/setgroups"), "deny")
            .map_err(|e| err("setgroups", e))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), map.map_line())
            .map_err(|e| err("gid_map", e))?;
        let f = std::fs::File::open(&ns_path).map_err(|e| err("open", e))?;
        Ok(OwnedFd::from(f))
    })();
    drop(done_w);
    let _ = nix::sys::wait::waitpid(pid, None);
    result
}

// Not in the libc crate's stable surface for every target: the new mount API's constants.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(p: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Other(format!("{}: path has a NUL byte", p.display())))
}

/// Mounts an idmapped, `nosuid,nodev` view of `src` at `dst`: a file owned by uid `u`
/// in `src` appears owned by `map.host_base + u`.
pub fn mount_idmapped(src: &Path, dst: &Path, map: IdMap) -> Result<()> {
    let ns = userns_fd(map)?;
    let fail = |what: &str| Error::Runtime {
        command: format!("idmapped mount of {} at {}", src.display(), dst.display()),
        message: format!(
            "{what}: {} (needs Linux 5.19 or later with idmapped mounts on this filesystem)",
            std::io::Error::last_os_error()
        ),
    };
    std::fs::create_dir_all(dst).map_err(|e| Error::io("creating mountpoint", dst, e))?;
    let csrc = cpath(src)?;
    let cdst = cpath(dst)?;
    // SAFETY: raw syscalls on NUL-terminated paths and a struct that outlive the calls; the
    // returned descriptor is owned at once.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            csrc.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        );
        if fd < 0 {
            return Err(fail("open_tree"));
        }
        let tree = OwnedFd::from_raw_fd(fd as i32);
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: ns.as_raw_fd() as u64,
        };
        let empty = c"";
        if libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) != 0
        {
            return Err(fail("mount_setattr"));
        }
        if libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            cdst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) != 0
        {
            return Err(fail("move_mount"));
        }
    }
    Ok(())
}

/// Whether this host can run sandboxes in user namespaces with idmapped layers: makes an
/// idmapped mount of a scratch directory and checks that its owner moved into the range.
pub fn probe() -> std::result::Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let scratch = std::env::temp_dir().join(format!("thaw-idmap-probe-{}", std::process::id()));
    let (src, dst) = (scratch.join("src"), scratch.join("dst"));
    let map = IdMap::range(0);
    let r = (|| {
        std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
        mount_idmapped(&src, &dst, map).map_err(|e| e.to_string())?;
        let uid = std::fs::metadata(&dst).map(|m| m.uid());
        let _ = nix::mount::umount2(&dst, nix::mount::MntFlags::MNT_DETACH);
        match uid {
            Ok(u) if u == map.root() => Ok(format!(
                "idmapped mounts work; sandbox root is host uid {}+ (one range per template)",
                map.root()
            )),
            Ok(u) => Err(format!(
                "an idmapped mount showed uid {u}, not {}",
                map.root()
            )),
            Err(e) => Err(e.to_string()),
        }
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    r
}

/// Moves the owners of every entry under `dir` (symlinks not followed) between canonical
/// ids (`0..size`, how layers are stored in the cache) and the range (`host_base..`, how a
/// sandbox's upper directory holds them). Entries already on the target side are left as
/// they are, so a second visit (a hard link) changes nothing.
pub fn shift_owners(dir: &Path, map: IdMap, into_range: bool) -> Result<()> {
    let shift = |id: u32| -> Option<u32> {
        if into_range && id < map.size {
            Some(id + map.host_base)
        } else if !into_range && map.contains(id) {
            Some(id - map.host_base)
        } else {
            None
        }
    };
    rechown(dir, |uid, gid| (shift(uid), shift(gid)))
}

/// Gives every entry under `dir` (itself included, symlinks not followed) to the range's
/// root: checkpoint images that a restore reads from inside the sandbox's user namespace.
pub fn chown_tree(dir: &Path, map: IdMap) -> Result<()> {
    rechown(dir, |_, _| (Some(map.root()), Some(map.root())))
}

/// Walks `dir` (itself included, symlinks not followed) and gives each entry the owner and
/// group `to(uid, gid)` names; `None` leaves that id as it is.
fn rechown(dir: &Path, to: impl Fn(u32, u32) -> (Option<u32>, Option<u32>)) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in walkdir::WalkDir::new(dir).follow_links(false) {
        let entry = entry.map_err(|e| Error::Other(format!("walking {}: {e}", dir.display())))?;
        let meta = entry
            .metadata()
            .map_err(|e| Error::Other(format!("{}: {e}", entry.path().display())))?;
        let (uid, gid) = to(meta.uid(), meta.gid());
        if uid.is_none() && gid.is_none() {
            continue;
        }
        nix::unistd::fchownat(
            None,
            entry.path(),
            uid.map(nix::unistd::Uid::from_raw),
            gid.map(nix::unistd::Gid::from_raw),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::io("chown", entry.path(), e.into()))?;
    }
    Ok(())
}

/// Whether `dir` is owned by the range's root already (what [`chown_tree`] leaves).
pub fn owned_by(dir: &Path, map: IdMap) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.uid() == map.root())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_disjoint_and_invertible() {
        let a = IdMap::range(0);
        let b = IdMap::range(1);
        assert_eq!(a.host_base, 1 << 30);
        assert_eq!(b.host_base - a.host_base, RANGE_SIZE);
        assert!(a.contains(a.host_base + 65_535));
        assert!(!a.contains(b.host_base));
        assert!(!a.contains(0));
        assert_eq!(b.index(), 1);
        let last = IdMap::range(MAX_RANGES - 1);
        assert!(last.host_base.checked_add(last.size).is_some());
        assert!(last.host_base + last.size <= 1 << 31);
    }

    #[test]
    fn lowest_free_fills_holes() {
        assert_eq!(lowest_free(&[]).unwrap(), 0);
        assert_eq!(lowest_free(&[0, 1, 3]).unwrap(), 2);
        assert_eq!(lowest_free(&[1, 2]).unwrap(), 0);
        assert_eq!(lowest_free(&[0, 0, 1]).unwrap(), 2);
        let all: Vec<u32> = (0..MAX_RANGES).collect();
        assert!(lowest_free(&all).is_err());
    }
}
