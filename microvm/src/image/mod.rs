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
    #[error("{path}: cannot read the kernel's load segments: {source}")]
    KernelElf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
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

/// Guest RAM the kernel needs on top of what its image and the initramfs occupy, in MiB.
///
/// Covers what the kernel allocates while it boots to guest-init: the initramfs unpacked
/// into its root tmpfs (about 5 MiB for thaw's) and the decompressed modules it loads, page
/// tables and `struct page`s (1.6% of RAM), slab and per-CPU areas, the ext4 journal and page
/// cache of the rootfs, and guest-init's own process. The physical range below the kernel
/// (the first 16 MiB) is usable too but mostly reserved early (real-mode, DMA zone, ACPI).
/// 48 MiB was checked by booting Debian 6.1 to a guest-init answering `Ping` at exactly the
/// resulting minimum (`microvm/README.md`, "Memory floor").
pub const KERNEL_RUNTIME_HEADROOM_MIB: u64 = 48;

/// The smallest guest memory, in MiB, with which `vmlinux` + `initramfs` boot on Cloud
/// Hypervisor: the end of the kernel's highest PT_LOAD segment in physical memory (Cloud
/// Hypervisor's PVH loader puts each segment at its physical address; if RAM ends before,
/// the ELF load fails and it falls back to bzImage, answering "Invalid bzImage"), plus the
/// initramfs (loaded as a whole into guest RAM), plus [`KERNEL_RUNTIME_HEADROOM_MIB`],
/// rounded up to a MiB. Reads only the ELF headers.
pub fn min_guest_memory_mib(vmlinux: &Path, initramfs: &Path) -> Result<u64, ImageError> {
    use std::os::unix::fs::FileExt;
    // More program headers than fit here is no kernel anyone ships.
    const MAX_HEADERS: u64 = 1 << 20;
    let f = std::fs::File::open(vmlinux).map_err(|e| ImageError::io(vmlinux, e))?;
    let elf_err = |source| ImageError::KernelElf {
        path: vmlinux.to_owned(),
        source,
    };
    let read = |len: u64| -> Result<Vec<u8>, ImageError> {
        let mut buf = vec![0u8; len as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ImageError::io(vmlinux, e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    };
    let header = read(64)?;
    elf::Elf::parse(&header).map_err(elf_err)?;
    let len = elf::Elf::headers_len(&header).map_err(elf_err)?;
    if len > MAX_HEADERS {
        return Err(elf_err(elf::ElfError::Malformed(
            "program headers too large",
        )));
    }
    let headers = read(len)?;
    let load_end = elf::Elf::parse(&headers)
        .and_then(|e| e.highest_load_end())
        .map_err(elf_err)?;
    let initramfs_len = std::fs::metadata(initramfs)
        .map_err(|e| ImageError::io(initramfs, e))?
        .len();
    const MIB: u64 = 1 << 20;
    let bytes = load_end
        .saturating_add(initramfs_len)
        .saturating_add(KERNEL_RUNTIME_HEADROOM_MIB * MIB);
    Ok(bytes.div_ceil(MIB))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The floor of the real Debian kernel is checked by booting it at exactly that much
    // memory: tests/qemu_boot.rs, guest_init_answers_at_the_memory_floor_under_tcg.

    #[test]
    fn memory_floor_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("vmlinux");
        std::fs::write(&k, b"not an elf").unwrap();
        let e = min_guest_memory_mib(&k, &k).unwrap_err().to_string();
        assert!(e.contains("vmlinux"), "{e}");
        let e = min_guest_memory_mib(&d.path().join("missing"), &k).unwrap_err();
        assert!(matches!(e, ImageError::Io { .. }), "{e}");
    }
}
