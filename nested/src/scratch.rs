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
