//! The guest image of a template on the microvm tier: Debian's kernel and thaw's initramfs
//! (shared by every template), and the template's layers as one ext4 image.
//!
//! Everything is a content-addressed entry of thaw-microvm's image cache under
//! `$THAW_CACHE/images`. Finding an entry means hashing its inputs (the rootfs image hashes
//! the whole merged tree), so each process remembers what it already resolved: only the
//! first cold boot of a template in a process pays for the hash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thaw_microvm::image::{self, GuestImage, ImageCache, ImageError, RootfsSpec};

use crate::cleanup::Scratch;
use crate::container::mounts;
use crate::error::{Error, Result};
use crate::paths::Paths;

/// Where guest-init lives in the guest (the initramfs hands over to it).
pub const GUEST_INIT_PATH: &str = image::DEFAULT_GUEST_INIT_PATH;
/// Static busybox for the initramfs (`busybox-static`, installed by `make deps`).
const BUSYBOX: &str = "/bin/busybox";

/// Everything a VM of one template boots from.
#[derive(Debug, Clone)]
pub struct VmImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Shared, read-only: each VM gets its own copy.
    pub rootfs: PathBuf,
}

#[derive(Default)]
struct Resolved {
    guest: Option<GuestImage>,
    rootfs: HashMap<(Vec<PathBuf>, u64), PathBuf>,
}

/// Builds and remembers guest images.
#[derive(Clone, Default)]
pub struct Images {
    resolved: Arc<Mutex<Resolved>>,
}

impl Images {
    /// The image for a template with these layers (top first) and disk limit. Blocking: it may
    /// download the kernel package, run mkfs.ext4 and hash the tree. Call it off the runtime.
    pub fn get(
        &self,
        paths: &Paths,
        guest_init: &Path,
        layers: &[PathBuf],
        disk_mib: u64,
    ) -> Result<VmImage> {
        let cache = ImageCache::new(paths.image_cache()).map_err(image_error)?;
        let guest = self.guest(&cache)?;
        let key = (layers.to_vec(), disk_mib);
        let known = self.lock().rootfs.get(&key).cloned();
        let rootfs = match known {
            Some(p) if p.is_file() => p,
            _ => {
                let p = build_rootfs(paths, &cache, guest_init, layers, disk_mib)?;
                self.lock().rootfs.insert(key, p.clone());
                p
            }
        };
        Ok(VmImage {
            kernel: guest.kernel.vmlinux,
            initramfs: guest.initramfs,
            rootfs,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Resolved> {
        self.resolved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn guest(&self, cache: &ImageCache) -> Result<GuestImage> {
        if let Some(g) = self.lock().guest.clone() {
            if g.kernel.vmlinux.is_file() && g.initramfs.is_file() {
                return Ok(g);
            }
        }
        if !Path::new(BUSYBOX).is_file() {
            return Err(Error::MissingDependency {
                what: format!("{BUSYBOX} (static busybox for the microvm initramfs)"),
                fix: "run `make deps` or `apt-get install busybox-static`".into(),
            });
        }
        let g = image::build_guest_image(cache, Path::new(BUSYBOX), GUEST_INIT_PATH)
            .map_err(image_error)?;
        self.lock().guest = Some(g.clone());
        Ok(g)
    }
}

/// One ext4 image of the merged layers, with guest-init installed.
fn build_rootfs(
    paths: &Paths,
    cache: &ImageCache,
    guest_init: &Path,
    layers: &[PathBuf],
    disk_mib: u64,
) -> Result<PathBuf> {
    // One layer is its own merged view; several are merged by a read-only overlay, which
    // also applies the upper layers' whiteouts.
    let scratch;
    let source = match layers {
        [] => return Err(Error::Other("template has no rootfs layers".into())),
        [only] => only.clone(),
        _ => {
            scratch = Scratch::new(
                &paths.rootfs_cache(),
                &format!("vm-rootfs-{}", uuid::Uuid::new_v4().simple()),
            )?;
            let merged = scratch.path.join("merged");
            mounts::mount_overlay_ro(layers, &merged)?;
            merged
        }
    };
    // `limits.disk_mib` means what it means on the container tier: how much a sandbox may
    // write on top of its template. The image is the content (with ext4's own overhead)
    // plus that much free space; sparse, so the free space costs the host nothing until a
    // guest writes it, and a clone's overlay can never grow past the image.
    let spec = RootfsSpec {
        source_dir: &source,
        guest_init,
        init_path: GUEST_INIT_PATH,
        disk_limit_mib: u64::MAX,
        headroom_mib: disk_mib,
    };
    image::build_rootfs(cache, &spec).map_err(image_error)
}

/// A too-large rootfs is the template's problem (its limit), the rest the host's.
pub fn image_error(e: ImageError) -> Error {
    match e {
        ImageError::RootfsTooLarge {
            needed_mib,
            limit_mib,
        } => Error::TooLarge {
            what: format!(
                "rootfs for the microvm tier ({needed_mib} MiB; raise `limits.disk_mib` in template.toml)"
            ),
            size: needed_mib << 20,
            limit: limit_mib << 20,
        },
        other => Error::GuestImage(other),
    }
}
