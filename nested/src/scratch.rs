//! The nested guest's scratch disk: the overlay's upper half, and thaw's cache inside L1,
//! pre-filled on the host because L1 has no network.
//!
//! Pre-filled: the guest kernel package and the built kernel and initramfs entries
//! (`images/`), and the rootfs cache entries (base and template layer) of the example
//! templates, built on the host by a `thaw deploy` on the container tier. A template build
//! inside L1 would need its base idmapped, and the Debian base needs the network.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use thaw_platform::template::rootfs::{base_key, layer_key};
use thaw_platform::template::spec::{TemplateSpec, TemplateSpecExt as _};

/// Builds the example templates' layers into the host's cache (`cache`) with a throwaway
/// `THAW_HOME`, on the container tier. Cached layers make this a boot, a warm-up and a
/// snapshot each; a fresh machine also pays for debootstrap once.
pub fn build_layers(thaw: &Path, cache: &Path, templates: &[PathBuf]) -> Result<()> {
    let home = tempdir("thaw-nested-home")?;
    let mut result = Ok(());
    for t in templates {
        eprintln!(
            "[nested] building {} on the host (container tier) to pre-fill L1's cache",
            t.display()
        );
        let status = Command::new(thaw)
            .arg("deploy")
            .arg(t)
            .env("THAW_HOME", &home)
            .env("THAW_CACHE", cache)
            .env("THAW_TIER", "container")
            .status()
            .with_context(|| format!("running {}", thaw.display()))?;
        if !status.success() {
            result = Err(anyhow::anyhow!(
                "thaw deploy {} on the host failed ({status}): L1's cache cannot be pre-filled",
                t.display()
            ));
            break;
        }
    }
    // Leave nothing: the templates' snapshots are not needed, only the cache.
    for t in templates {
        if let Ok(spec) = TemplateSpec::load(t) {
            let _ = Command::new(thaw)
                .args(["templates", "rm", &spec.name])
                .env("THAW_HOME", &home)
                .env("THAW_CACHE", cache)
                .output();
        }
    }
    let _ = std::fs::remove_dir_all(&home);
    result
}

/// The rootfs cache entries (`base-*`, `layer-*`) the templates resolve to.
pub fn entries_of(templates: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in templates {
        let spec = TemplateSpec::load(t).with_context(|| format!("loading {}", t.display()))?;
        out.push(base_key(&spec.base));
        out.push(layer_key(&spec, t).with_context(|| format!("hashing {}", t.display()))?);
    }
    Ok(out)
}

/// Makes the scratch disk image at `image`: a sparse ext4 file of `size_gib`, holding
/// `cache/images/{debs,kernel,initramfs}` and `cache/rootfs/<entries>` copied from the host's
/// cache. `staging` is a directory on the cache's filesystem (the copies are hard links).
pub fn make(
    image: &Path,
    size_gib: u64,
    host_cache: &Path,
    entries: &[String],
    staging: &Path,
) -> Result<()> {
    let _ = std::fs::remove_dir_all(staging);
    let cache = staging.join("cache");
    std::fs::create_dir_all(cache.join("images")).context("creating the staging directory")?;
    std::fs::create_dir_all(cache.join("rootfs")).context("creating the staging directory")?;
    for kind in ["debs", "kernel", "initramfs"] {
        let src = host_cache.join("images").join(kind);
        if src.is_dir() {
            link_tree(&src, &cache.join("images").join(kind))?;
        }
    }
    for e in entries {
        let src = host_cache.join("rootfs").join(e);
        if !src.is_dir() {
            bail!(
                "{} is not in the host's cache after the host build",
                src.display()
            );
        }
        link_tree(&src, &cache.join("rootfs").join(e))?;
    }
    let _ = std::fs::remove_file(image);
    check_room(image, tree_bytes(staging)?)?;
    let f =
        std::fs::File::create(image).with_context(|| format!("creating {}", image.display()))?;
    f.set_len(size_gib << 30)
        .with_context(|| format!("sizing {}", image.display()))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "thaw-l1",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            "-d",
        ])
        .arg(staging)
        .arg(image)
        .output()
        .context("running mkfs.ext4 (apt-get install e2fsprogs)")?;
    let _ = std::fs::remove_dir_all(staging);
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -d {} {} failed: {}",
            staging.display(),
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `cp -al`: the staging tree costs no disk, and mkfs.ext4 reads the files through it.
fn link_tree(src: &Path, dst: &Path) -> Result<()> {
    let out = Command::new("cp")
        .arg("-al")
        .arg(src)
        .arg(dst)
        .output()
        .context("running cp")?;
    if !out.status.success() {
        // Another filesystem: hard links are impossible, copy instead.
        let out = Command::new("cp")
            .arg("-a")
            .arg(src)
            .arg(dst)
            .output()
            .context("running cp")?;
        if !out.status.success() {
            bail!(
                "copying {} to {}: {}",
                src.display(),
                dst.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

/// Bytes free to an unprivileged writer on the file system holding `path` (its parent when
/// `path` does not exist yet).
pub fn free_bytes(path: &Path) -> Result<u64> {
    let dir = if path.exists() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let st =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// "12.3 GiB" free where `path` lives, or why that is unknown: for messages.
pub fn free_space_text(path: &Path) -> String {
    match free_bytes(path) {
        Ok(b) => format!("{:.1} GiB", b as f64 / GIB as f64),
        Err(e) => format!("unknown ({e:#})"),
    }
}

pub const GIB: u64 = 1 << 30;

/// What L1 writes on top of its pre-filled cache, at its peak, in a whole run, with room to
/// spare: measured 4.7 GiB (the python test's template snapshots, session snapshots and
/// disks; what each test deletes is freed through discard), over 1.2 GiB pre-filled.
pub const WORK_BYTES: u64 = 8 * GIB;

/// Refuses to boot an L1 whose scratch disk could fill the host's disk: QEMU would report
/// write errors to L1 mid-test, and the failure would name no cause. `content` is what the
/// image holds before L1 writes anything.
pub fn check_room(image: &Path, content: u64) -> Result<()> {
    let need = content + WORK_BYTES;
    let free = free_bytes(image)?;
    if free < need {
        bail!(
            "the host's disk has {:.1} GiB free where L1's scratch disk goes ({}), and a run needs {:.1} GiB \
             ({:.1} GiB of pre-filled cache and {} GiB that the tests write). Fix: free disk space \
             (`cargo clean` in old checkouts, old clones under /tmp), or point --workdir at a file \
             system with room",
            free as f64 / GIB as f64,
            image.display(),
            need as f64 / GIB as f64,
            content as f64 / GIB as f64,
            WORK_BYTES / GIB
        );
    }
    Ok(())
}

/// Bytes in the regular files under `dir` (no symlinks followed): what mkfs.ext4 -d copies.
pub fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e.with_context(|| format!("reading {}", d.display()))?;
            let md = e
                .metadata()
                .with_context(|| format!("stat {}", e.path().display()))?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_without_room_for_a_run_is_refused_naming_the_fix() {
        let dir = std::env::temp_dir();
        let free = free_bytes(&dir).expect("statvfs of the temp dir");
        assert!(free > 0);
        // Content larger than the disk's free space: refused before anything is written.
        let err = check_room(&dir.join("scratch.img"), free).expect_err("no room, yet accepted");
        let msg = format!("{err:#}");
        assert!(msg.contains("free disk space"), "{msg}");
        assert!(msg.contains("scratch.img"), "{msg}");
        check_room(&dir.join("scratch.img"), 0)
            .map(|_| ())
            .or_else(|e| {
                // Only a host with under WORK_BYTES free may refuse an empty image.
                assert!(free < WORK_BYTES, "refused with {free} bytes free: {e:#}");
                Ok::<(), anyhow::Error>(())
            })
            .unwrap();
    }

    #[test]
    fn tree_bytes_counts_regular_files_and_not_symlinks() {
        let d = tempdir("thaw-nested-tree").unwrap();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/one"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.join("a/b/two"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("/usr", d.join("a/link")).unwrap();
        assert_eq!(tree_bytes(&d).unwrap(), 1024);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
