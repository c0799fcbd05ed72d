//! The guest image pipeline: kernel (from Debian's package), initramfs, and the template's ext4
//! rootfs. Every output is a content-addressed cache entry ([`cache::ImageCache`]).
//!
//! These functions block (they run dpkg-deb, xz, mkfs.ext4 and hash files): call them from
//! `tokio::task::spawn_blocking` in async code.

pub mod cache;
pub mod elf;
pub mod initramfs;
pub mod kernel;
pub mod rootfs;

use std::path::{Path, PathBuf};

pub use cache::ImageCache;
pub use initramfs::{build_initramfs, DEFAULT_GUEST_INIT_PATH};
pub use kernel::{build_kernel, download_kernel_deb, Kernel, DEFAULT_MODULES};
pub use rootfs::{build_rootfs, RootfsSpec};

use crate::util::ToolError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("unexpected kernel package: {what}")]
    UnexpectedPackage { what: String },
    #[error("{deb} contains no boot/vmlinuz-*")]
    NoKernelInPackage { deb: PathBuf },
    #[error("kernel payload is neither XZ nor ZSTD compressed (Debian uses one of them)")]
    UnsupportedKernelCompression,
    #[error("cannot extract vmlinux: {0}")]
    Decompress(String),
    #[error("kernel has no PVH entry point (XEN_PVH): Cloud Hypervisor cannot boot it; use Debian's linux-image-amd64 >= 5.x")]
    NoPvhEntry,
    #[error("kernel module {module} (needed by the guest) is not in the kernel package")]
    MissingModule { module: String },
    #[error("{path} is not a static executable: the initramfs has no C library (install busybox-static)")]
    NotStatic { path: PathBuf },
    #[error("bad guest init path {0:?}: must be absolute, without whitespace")]
    BadInitPath(String),
    #[error("rootfs needs {needed_mib} MiB but the template's disk limit is {limit_mib} MiB")]
    RootfsTooLarge { needed_mib: u64, limit_mib: u64 },
    #[error("guest-init was not installed at {path} in the rootfs image: {detail}")]
    InitNotInstalled { path: String, detail: String },
}

impl ImageError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Kernel plus initramfs: everything but the template's rootfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: Kernel,
    pub initramfs: PathBuf,
}

/// Downloads (once) Debian's current kernel and builds kernel + initramfs into `cache`.
/// `busybox`: a static busybox (`/bin/busybox` from `busybox-static`).
pub fn build_guest_image(
    cache: &ImageCache,
    busybox: &Path,
    init_path: &str,
) -> Result<GuestImage, ImageError> {
    let deb = download_kernel_deb(cache)?;
    build_guest_image_from_deb(cache, &deb, busybox, init_path)
}

/// Like [`build_guest_image`] from a kernel .deb already at hand (offline builds).
pub fn build_guest_image_from_deb(
    cache: &ImageCache,
    deb: &Path,
    busybox: &Path,
    init_path: &str,
) -> Result<GuestImage, ImageError> {
    let kernel = build_kernel(cache, deb, DEFAULT_MODULES)?;
    let initramfs = build_initramfs(cache, &kernel, busybox, init_path)?;
    Ok(GuestImage { kernel, initramfs })
}
