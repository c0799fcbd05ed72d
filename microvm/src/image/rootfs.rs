//! The template's root filesystem as an ext4 image, built by `mkfs.ext4 -d` from the
//! directory the platform prepared, with guest-init added at `/sbin/thaw-init`.
//!
//! guest-init is injected with `debugfs` after mkfs rather than copied into the template's
//! directory: that directory belongs to the platform (and may be large), so it is neither
//! modified nor duplicated.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::info;

use super::cache::{hash_file, key_of, ImageCache};
use super::ImageError;
use crate::util::run;

pub const ROOTFS_FILE: &str = "rootfs.ext4";
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct RootfsSpec<'a> {
    /// The template's root directory.
    pub source_dir: &'a Path,
    /// Static guest-init binary, installed at `init_path`.
    pub guest_init: &'a Path,
    /// Absolute path of guest-init in the guest (normally `/sbin/thaw-init`).
    pub init_path: &'a str,
    /// The template's disk limit: the image may not be larger.
    pub disk_limit_mib: u64,
    /// Free space the guest gets on top of its content (capped by the limit).
    pub headroom_mib: u64,
}

/// Bytes and inode count of a tree (files rounded up to 4 KiB blocks).
fn usage(dir: &Path) -> Result<(u64, u64), ImageError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| ImageError::io(&d, e))? {
            let e = e.map_err(|e| ImageError::io(&d, e))?;
            let md = e.metadata().map_err(|err| ImageError::io(&e.path(), err))?;
            inodes += 1;
            bytes += md.len().div_ceil(4096) * 4096;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Image size for `content` bytes and `inodes` files: content, ext4 metadata (inode tables,
/// journal, reserved blocks; ~10% plus a fixed 16 MiB), then the headroom.
pub fn image_size_mib(content: u64, inodes: u64, headroom_mib: u64) -> (u64, u64) {
    let needed = (content + inodes * 256) * 11 / 10 + 16 * MIB;
    let needed_mib = needed.div_ceil(MIB);
    (needed_mib, needed_mib + headroom_mib)
}

/// Content key of a tree: names, types, modes, owners, sizes, contents, link targets.
fn tree_key(dir: &Path, h: &mut blake3::Hasher) -> Result<(), ImageError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ImageError::io(dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| ImageError::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).map_err(|err| ImageError::io(&p, err))?;
        h.update(e.file_name().as_encoded_bytes());
        h.update(&[0]);
        for n in [md.mode() as u64, md.uid() as u64, md.gid() as u64, md.len()] {
            h.update(&n.to_le_bytes());
        }
        if md.file_type().is_symlink() {
            let t = std::fs::read_link(&p).map_err(|err| ImageError::io(&p, err))?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if md.is_file() {
            h.update(hash_file(&p)?.as_bytes());
        } else if md.is_dir() {
            tree_key(&p, h)?;
            h.update(b"/..");
        }
    }
    Ok(())
}

/// Where guest-init goes inside the image: a usr-merged rootfs has `/sbin -> usr/sbin`, and
/// debugfs would not follow that link.
fn resolve_in_rootfs(source_dir: &Path, init_path: &str) -> String {
    let path = Path::new(init_path);
    let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
        return init_path.to_owned();
    };
    let rel = parent.strip_prefix("/").unwrap_or(parent);
    if let Ok(target) = std::fs::read_link(source_dir.join(rel)) {
        let base = if target.is_absolute() {
            target
        } else {
            Path::new("/")
                .join(parent.parent().unwrap_or(Path::new("/")))
                .join(target)
        };
        return base.join(file).to_string_lossy().into_owned();
    }
    init_path.to_owned()
}

/// Builds (or finds in the cache) the rootfs image; returns its path. The image is shared by
/// everything that uses the cache entry: callers hand each VM its own copy (see
/// [`crate::restore::clone_disk`]).
pub fn build_rootfs(cache: &ImageCache, spec: &RootfsSpec<'_>) -> Result<PathBuf, ImageError> {
    if !spec.source_dir.is_dir() {
        return Err(ImageError::io(
            spec.source_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "rootfs directory not found"),
        ));
    }
    let (content, inodes) = usage(spec.source_dir)?;
    let init_len = std::fs::metadata(spec.guest_init)
        .map_err(|e| ImageError::io(spec.guest_init, e))?
        .len();
    let (needed_mib, wanted_mib) =
        image_size_mib(content + init_len, inodes + 1, spec.headroom_mib);
    if needed_mib > spec.disk_limit_mib {
        return Err(ImageError::RootfsTooLarge {
            needed_mib,
            limit_mib: spec.disk_limit_mib,
        });
    }
    let size_mib = wanted_mib.min(spec.disk_limit_mib);

    let mut h = blake3::Hasher::new();
    tree_key(spec.source_dir, &mut h)?;
    let tree = h.finalize();
    let key = key_of(&[
        b"rootfs-v1",
        tree.as_bytes(),
        hash_file(spec.guest_init)?.as_bytes(),
        spec.init_path.as_bytes(),
        &size_mib.to_le_bytes(),
    ]);
    let dir = cache.get_or_build("rootfs", &key, |out| {
        let img = out.join(ROOTFS_FILE);
        let inode_count = (inodes + 1) * 3 / 2 + 4096;
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "thaw-root", "-E", "root_owner=0:0"])
                .arg("-N")
                .arg(inode_count.to_string())
                .arg("-d")
                .arg(spec.source_dir)
                .arg(&img)
                .arg(format!("{size_mib}M")),
            "build the ext4 rootfs image",
        )?;
        install_init(&img, spec.source_dir, spec.guest_init, spec.init_path)?;
        info!(size_mib, content_mib = content / MIB, "rootfs built");
        Ok(())
    })?;
    Ok(dir.join(ROOTFS_FILE))
}

fn install_init(
    img: &Path,
    source_dir: &Path,
    guest_init: &Path,
    init_path: &str,
) -> Result<(), ImageError> {
    let target = resolve_in_rootfs(source_dir, init_path);
    let parent = Path::new(&target)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let host = guest_init.to_string_lossy();
    if host.contains(char::is_whitespace) || target.contains(char::is_whitespace) {
        return Err(ImageError::BadInitPath(format!("{host} -> {target}")));
    }
    // debugfs keeps going after a failed command (e.g. `mkdir` of an existing directory), so
    // the result is verified with `stat` below instead of trusting its exit code.
    let script = format!(
        "mkdir {parent}\nrm {target}\nwrite {host} {target}\nsif {target} mode 0100755\n\
         sif {target} uid 0\nsif {target} gid 0\n"
    );
    let cmds = tempfile::NamedTempFile::new().map_err(|e| ImageError::io(img, e))?;
    std::fs::write(cmds.path(), script).map_err(|e| ImageError::io(cmds.path(), e))?;
    run(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(cmds.path())
            .arg(img),
        "install guest-init into the rootfs image",
    )?;
    let stat = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {target}"))
            .arg(img),
        "check guest-init in the rootfs image",
    )?;
    let text = String::from_utf8_lossy(&stat.stdout);
    let size = std::fs::metadata(guest_init)
        .map_err(|e| ImageError::io(guest_init, e))?
        .len();
    if !text.contains("Type: regular") || !text.contains(&format!("Size: {size}")) {
        return Err(ImageError::InitNotInstalled {
            path: target,
            detail: String::from_utf8_lossy(&stat.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let (needed, wanted) = image_size_mib(100 * MIB, 1000, 64);
        assert!((126..130).contains(&needed), "{needed}");
        assert_eq!(wanted, needed + 64);
    }

    #[test]
    fn usr_merged_sbin_is_followed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", d.path().join("sbin")).unwrap();
        assert_eq!(
            resolve_in_rootfs(d.path(), "/sbin/thaw-init"),
            "/usr/sbin/thaw-init"
        );
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve_in_rootfs(d.path(), "/sbin/thaw-init"),
            "/sbin/thaw-init"
        );
    }

    #[test]
    fn too_large_for_the_disk_limit() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(cache_dir.path()).unwrap();
        let src = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(src.path().join("big")).unwrap();
        f.set_len(40 * MIB).unwrap();
        let init = src.path().join("big"); // any file works as the "binary" here
        let e = build_rootfs(
            &cache,
            &RootfsSpec {
                source_dir: src.path(),
                guest_init: &init,
                init_path: "/sbin/thaw-init",
                disk_limit_mib: 32,
                headroom_mib: 16,
            },
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("rootfs needs "), "{msg}");
        assert!(
            msg.contains("but the template's disk limit is 32 MiB"),
            "{msg}"
        );
        assert!(!cache_dir.path().join("rootfs").exists());
    }

    #[test]
    fn builds_an_ext4_image_with_guest_init() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(cache_dir.path()).unwrap();
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("etc")).unwrap();
        std::fs::write(src.path().join("etc/hostname"), "thaw\n").unwrap();
        let init = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(init.path(), "#!/bin/sh\necho hi\n").unwrap();
        let spec = RootfsSpec {
            source_dir: src.path(),
            guest_init: init.path(),
            init_path: "/sbin/thaw-init",
            disk_limit_mib: 256,
            headroom_mib: 16,
        };
        let img = build_rootfs(&cache, &spec).unwrap();
        let out = Command::new("debugfs")
            .arg("-R")
            .arg("cat /sbin/thaw-init")
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "#!/bin/sh\necho hi\n");
        // Same inputs: a cache hit, same path.
        assert_eq!(build_rootfs(&cache, &spec).unwrap(), img);
    }
}
