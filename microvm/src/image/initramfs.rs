//! The initramfs: static busybox, the kernel modules the guest needs, and an `/init` script
//! that loads them, mounts the template's ext4 rootfs and `switch_root`s into guest-init.
//!
//! The newc cpio archive is written here rather than with `cpio -o` so that it needs no root
//! (the `/dev/console` node is just an archive entry), is byte-for-byte reproducible (fixed
//! owners and mtimes), and so that the content hash of its inputs is its cache key.

use std::path::{Path, PathBuf};

use tracing::info;

use super::cache::{hash_file, key_of, ImageCache};
use super::kernel::{Kernel, LOAD_ORDER};
use super::ImageError;

/// Where guest-init lives inside every rootfs.
pub const DEFAULT_GUEST_INIT_PATH: &str = "/sbin/thaw-init";
pub const INITRAMFS_FILE: &str = "initramfs.cpio.zst";

/// The `/init` script. Kernel command-line knobs it reads:
/// `root=` (default `/dev/vda`), `thaw.init=` (default `init_path`), `thaw.rootwait=` seconds
/// (default 10), `thaw.debug=shell` (a shell on the console instead of powering off on failure),
/// `thaw.agent_port=NAME` (guest-init gets `--listen serial:/dev/<port named NAME>`; the QEMU
/// boot check uses it, since guest-init's automatic choice prefers vsock whenever the vsock
/// module is loaded).
pub fn init_script(init_path: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
# thaw initramfs /init: load virtio/vsock/ext4 modules, mount the rootfs, switch_root to
# guest-init. Any failure prints THAW-INITRAMFS-FATAL and powers off: never hang silently.
/bin/busybox mkdir -p /proc /sys /dev /newroot /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

root=/dev/vda
init={init_path}
rootwait=10
debug=
agentport=
netcfg=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${{arg#root=}}" ;;
    thaw.init=*) init="${{arg#thaw.init=}}" ;;
    thaw.rootwait=*) rootwait="${{arg#thaw.rootwait=}}" ;;
    thaw.debug=shell) debug=shell ;;
    thaw.agent_port=*) agentport="${{arg#thaw.agent_port=}}" ;;
    thaw.net=*) netcfg="${{arg#thaw.net=}}" ;;
  esac
done

fail() {{
  echo "THAW-INITRAMFS-FATAL: $*"
  if [ "$debug" = shell ]; then
    echo "thaw-initramfs: dropping to a shell (thaw.debug=shell)"
    exec sh
  fi
  echo "thaw-initramfs: powering off"
  sync
  poweroff -f
  # poweroff cannot fail as PID 1, but if it does, exiting PID 1 panics (panic=-1 reboots).
  exit 1
}}

while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "thaw-initramfs: warning: insmod $m failed"
done < /lib/modules/{LOAD_ORDER}

# thaw.net=ADDR/LEN,GATEWAY: the guest's one network device, whose other end is a tap in its
# VMM's own namespace; what it reaches is decided there, by the host. A VM restored from a
# snapshot made without the device has no eth0 and keeps loopback alone.
netup=
if [ -n "$netcfg" ] && [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  {{ ip addr add "${{netcfg%,*}}" dev eth0 && ip link set eth0 up \
    && ip route add default via "${{netcfg#*,}}" && netup=1; }} \
    || echo "thaw-initramfs: warning: network setup failed ($netcfg)"
fi

i=0
while [ ! -b "$root" ]; do
  i=$((i + 1))
  [ "$i" -gt $((rootwait * 20)) ] && fail "root device $root did not appear within ${{rootwait}}s (disk not attached, or virtio_blk/virtio_pci failed to load)"
  usleep 50000
done

# thaw.agent_port=NAME: serve the agent on the virtio-serial port called NAME (QEMU boot
# check), found by name because its /dev/vportNpM number depends on the machine.
initargs=
# Ports are announced asynchronously over the virtio-serial control queue: poll for it.
i=0
while [ -n "$agentport" ] && [ -z "$initargs" ] && [ "$i" -le $((rootwait * 20)) ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$agentport" ] && [ -c "/dev/${{p##*/}}" ] && initargs="--listen serial:/dev/${{p##*/}}"
  done
  [ -n "$initargs" ] || usleep 50000
  i=$((i + 1))
done
if [ -n "$agentport" ]; then
  [ -n "$initargs" ] || fail "virtio-serial port $agentport not found (virtio_console loaded? port attached?)"
fi
mount -t ext4 -o rw,noatime "$root" /newroot || fail "cannot mount $root as ext4"
[ -x "/newroot$init" ] || fail "guest init $init is missing or not executable in the rootfs on $root"
# A rootfs without a resolver configuration (a busybox base) would ask 127.0.0.1, inside the
# guest: point it at the gateway's resolver, on the VM's own disk. One the template ships is
# kept (DNS to any address leaves through the tap to the same resolver).
if [ -n "$netup" ] && [ ! -e /newroot/etc/resolv.conf ] && [ ! -L /newroot/etc/resolv.conf ]; then
  mkdir -p /newroot/etc && echo "nameserver ${{netcfg#*,}}" > /newroot/etc/resolv.conf
fi
for d in dev proc sys; do
  mkdir -p "/newroot/$d"
  mount --move "/$d" "/newroot/$d" || fail "cannot move /$d into the rootfs"
done
exec switch_root /newroot "$init" $initargs
fail "switch_root to $init failed"
"#
    )
}

/// One member of a newc archive (paths relative, without a leading `/`).
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, u32, Vec<u8>),
    Symlink(&'a str, &'a str),
    CharDev(&'a str, u32, u32),
}

/// Writes a newc (`070701`) cpio archive.
pub fn write_newc(entries: &[Entry<'_>]) -> Vec<u8> {
    fn pad4(v: &mut Vec<u8>) {
        let pad = (4 - v.len() % 4) % 4;
        v.resize(v.len() + pad, 0);
    }
    fn header(v: &mut Vec<u8>, ino: u32, mode: u32, size: usize, rdev: (u32, u32), name: &str) {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed for reproducible archives
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            (name.len() + 1) as u32,
            0,
        ];
        v.extend_from_slice(b"070701");
        for f in fields {
            v.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        pad4(v);
    }
    let mut v = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir(n) => header(&mut v, ino, 0o040755, 0, (0, 0), n),
            Entry::File(n, mode, data) => {
                header(&mut v, ino, 0o100000 | mode, data.len(), (0, 0), n);
                v.extend_from_slice(data);
                pad4(&mut v);
            }
            Entry::Symlink(n, target) => {
                header(&mut v, ino, 0o120777, target.len(), (0, 0), n);
                v.extend_from_slice(target.as_bytes());
                pad4(&mut v);
            }
            Entry::CharDev(n, major, minor) => {
                header(&mut v, ino, 0o020600, 0, (*major, *minor), n)
            }
        }
    }
    header(&mut v, 0, 0, 0, (0, 0), "TRAILER!!!");
    v
}

/// Builds (or finds in the cache) the initramfs for `kernel`; returns the archive's path.
/// `busybox` must be a static binary (Debian's `busybox-static` installs `/bin/busybox`).
pub fn build_initramfs(
    cache: &ImageCache,
    kernel: &Kernel,
    busybox: &Path,
    init_path: &str,
) -> Result<PathBuf, ImageError> {
    if !init_path.starts_with('/') || init_path.contains(char::is_whitespace) {
        return Err(ImageError::BadInitPath(init_path.to_owned()));
    }
    let order = std::fs::read_to_string(kernel.modules_dir.join(LOAD_ORDER))
        .map_err(|e| ImageError::io(&kernel.modules_dir.join(LOAD_ORDER), e))?;
    let modules: Vec<&str> = order.lines().filter(|l| !l.is_empty()).collect();
    let mut parts: Vec<Vec<u8>> = vec![
        b"initramfs-v3".to_vec(),
        hash_file(busybox)?.as_bytes().to_vec(),
        init_script(init_path).into_bytes(),
        order.as_bytes().to_vec(),
    ];
    for m in &modules {
        parts.push(
            hash_file(&kernel.modules_dir.join(format!("{m}.ko")))?
                .as_bytes()
                .to_vec(),
        );
    }
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let key = key_of(&refs);
    let dir = cache.get_or_build("initramfs", &key, |out| {
        let read = |p: &Path| std::fs::read(p).map_err(|e| ImageError::io(p, e));
        check_static(busybox, &read(busybox)?)?;
        let mut entries = vec![
            Entry::Dir("bin"),
            Entry::Dir("dev"),
            // Lets the kernel open a console for /init before devtmpfs is mounted.
            Entry::CharDev("dev/console", 5, 1),
            Entry::Dir("proc"),
            Entry::Dir("sys"),
            Entry::Dir("newroot"),
            Entry::Dir("tmp"),
            Entry::Dir("lib"),
            Entry::Dir("lib/modules"),
            Entry::File("bin/busybox", 0o755, read(busybox)?),
            Entry::Symlink("bin/sh", "busybox"),
            Entry::File("init", 0o755, init_script(init_path).into_bytes()),
            Entry::File("lib/modules/load-order", 0o644, order.as_bytes().to_vec()),
        ];
        let names: Vec<String> = modules
            .iter()
            .map(|m| format!("lib/modules/{m}.ko"))
            .collect();
        for (m, name) in modules.iter().zip(&names) {
            entries.push(Entry::File(
                name,
                0o644,
                read(&kernel.modules_dir.join(format!("{m}.ko")))?,
            ));
        }
        let cpio = write_newc(&entries);
        // zstd level 9: the kernel (CONFIG_RD_ZSTD) unpacks it fast; the archive is ~5 MiB.
        let z = zstd::encode_all(&cpio[..], 9)
            .map_err(|e| ImageError::io(&out.join(INITRAMFS_FILE), e))?;
        let path = out.join(INITRAMFS_FILE);
        std::fs::write(&path, z).map_err(|e| ImageError::io(&path, e))?;
        info!(
            modules = modules.len(),
            bytes = cpio.len(),
            "initramfs built"
        );
        Ok(())
    })?;
    Ok(dir.join(INITRAMFS_FILE))
}

/// A dynamically linked busybox would die in the initramfs (no libc there): refuse it early.
fn check_static(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let elf = super::elf::Elf::parse(data).map_err(|_| ImageError::NotStatic {
        path: path.to_owned(),
    })?;
    let has_interp = elf
        .sections()
        .map(|s| s.iter().any(|sec| sec.name == b".interp"))
        .unwrap_or(false);
    if has_interp {
        return Err(ImageError::NotStatic {
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_archive_lists_with_cpio() {
        let cpio = write_newc(&[
            Entry::Dir("bin"),
            Entry::File("bin/x", 0o755, b"hello".to_vec()),
            Entry::Symlink("bin/y", "x"),
            Entry::CharDev("console", 5, 1),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.cpio");
        std::fs::write(&a, &cpio).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-t", "-v", "-F"])
            .arg(&a)
            .output()
            .expect("cpio is installed");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains("bin/x"), "{listing}");
        assert!(listing.contains("bin/y -> x"), "{listing}");
        assert!(listing.contains("crw-------"), "{listing}");
    }

    #[test]
    fn init_script_has_the_init_path_and_no_placeholders() {
        let s = init_script("/sbin/thaw-init");
        assert!(s.contains("init=/sbin/thaw-init"));
        assert!(s.contains("switch_root /newroot"));
        assert!(s.contains("/lib/modules/load-order"));
    }

    /// The script parses (busybox's shell runs it; dash here is as strict about syntax).
    #[test]
    fn init_script_is_valid_shell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init");
        std::fs::write(&path, init_script("/sbin/thaw-init")).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
