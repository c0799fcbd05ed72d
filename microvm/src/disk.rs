//! A VM's disk images: their format, copy-on-write clones, and flattening for a checkpoint.
//!
//! * A clone's disk is a **qcow2 overlay** whose backing file is a read-only raw image (the
//!   snapshot's `disk.ext4`, or a template's cached rootfs): it starts at a few hundred KiB
//!   and grows only by the clusters the guest writes, on every filesystem (a reflink copy is
//!   copy-on-write only on btrfs/XFS; on ext4 it is a full copy).
//! * A **checkpoint** stores a flattened, standalone raw image ([`flatten`]): the snapshot
//!   then depends on no other file, so a session outlives a redeploy or delete of its
//!   template, and the snapshotter's content-addressed chunks still share every unchanged
//!   block with the template's disk.
//!
//! The format of a disk is decided by the name thaw gave it (`*.qcow2` is qcow2, anything else
//! raw), never by its content: a raw disk is written by the guest, which could put a qcow2
//! header (naming a backing file anywhere on the host) in its first sector.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use crate::api::ImageType;
use crate::util::{run, ToolError};

/// File extension of a qcow2 overlay.
pub const QCOW2_EXTENSION: &str = "qcow2";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("backing image {path}: {source}")]
    Base {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backing image path {0} contains a comma or newline, which qemu-img cannot take")]
    BadBasePath(PathBuf),
    #[error("{path} is not an overlay thaw made: {why}")]
    BadOverlay { path: PathBuf, why: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
}

/// The format of a disk thaw made, from its name (see the module docs).
pub fn format_of(path: &Path) -> ImageType {
    match path.extension() {
        Some(ext) if ext == QCOW2_EXTENSION => ImageType::Qcow2,
        _ => ImageType::Raw,
    }
}

/// Creates `dest` (a `*.qcow2` path) as a qcow2 overlay of the raw image `base`, whose
/// absolute, symlink-free path is written into the overlay's header: the overlay is valid
/// wherever it is opened from, and Cloud Hypervisor opens the base read-only. The guest's
/// writes go to `dest` only; `base` must not change while any overlay of it is in use.
pub fn create_overlay(base: &Path, dest: &Path) -> Result<(), DiskError> {
    let base = base.canonicalize().map_err(|source| DiskError::Base {
        path: base.to_owned(),
        source,
    })?;
    let text = base.to_string_lossy();
    if text.contains([',', '\n']) {
        return Err(DiskError::BadBasePath(base));
    }
    let size = std::fs::metadata(&base)
        .map_err(|source| DiskError::Base {
            path: base.clone(),
            source,
        })?
        .len();
    // `-u` with the size given: qemu-img does not open the base, which running clones'
    // VMMs hold (locked) already.
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b"])
            .arg(&base)
            .arg(dest)
            .arg(size.to_string()),
        "create a copy-on-write qcow2 overlay for a clone's disk (apt-get install qemu-utils)",
    )?;
    Ok(())
}

/// Writes `src` (raw or qcow2, by name) to `dest` as one standalone sparse raw image: a
/// reflink/sparse copy of a raw disk, or the overlay's clusters merged with its backing
/// file. The caller keeps the guest paused, so the image is from one instant, and has had
/// the guest flush its disk first: Cloud Hypervisor keeps qcow2 metadata (L2 tables) in
/// memory until a flush, and holds a lock on the file, which `-U` reads past.
pub fn flatten(src: &Path, dest: &Path) -> Result<(), DiskError> {
    match format_of(src) {
        ImageType::Raw => {
            run(
                Command::new("cp")
                    .args(["--reflink=auto", "--sparse=always", "--"])
                    .arg(src)
                    .arg(dest),
                "copy a disk image",
            )?;
        }
        ImageType::Qcow2 => {
            // Cloud Hypervisor holds an OFD lock on the whole overlay (and one on its base),
            // which qemu-img's own locking trips over even with `-U`; `locking=off` on both
            // files is how it reads them anyway. `-S 4k` (the default) keeps zeroed 4 KiB
            // runs as holes in the output.
            let base = backing_of(src)?;
            for p in [src, base.as_path()] {
                if p.to_string_lossy().contains([',', '\n']) {
                    return Err(DiskError::BadBasePath(p.to_owned()));
                }
            }
            let opts = format!(
                "driver=qcow2,file.driver=file,file.filename={},file.locking=off,\
                 backing.driver=raw,backing.file.driver=file,backing.file.filename={},backing.file.locking=off",
                src.display(),
                base.display()
            );
            run(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-O", "raw", "--image-opts"])
                    .arg(opts)
                    .arg(dest),
                "flatten a clone's qcow2 disk into a raw image (apt-get install qemu-utils)",
            )?;
        }
    }
    Ok(())
}

/// The backing file named in a qcow2 overlay's header (the raw base [`create_overlay`] wrote
/// there). Read with bounds checks: header bytes are data, not trusted.
pub fn backing_of(overlay: &Path) -> Result<PathBuf, DiskError> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::ffi::OsStringExt;
    let bad = |why: &str| DiskError::BadOverlay {
        path: overlay.to_owned(),
        why: why.to_owned(),
    };
    let io = |source| DiskError::Base {
        path: overlay.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(overlay).map_err(io)?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header).map_err(io)?;
    if header[..4] != *b"QFI\xfb" {
        return Err(bad("no qcow2 magic"));
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().map_err(|_| bad("header"))?);
    let size = u32::from_be_bytes(header[16..20].try_into().map_err(|_| bad("header"))?);
    // The qcow2 specification caps the name at 1023 bytes.
    if offset == 0 || size == 0 || size > 1023 {
        return Err(bad("no backing file name"));
    }
    let mut name = vec![0u8; size as usize];
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    f.read_exact(&mut name).map_err(io)?;
    let path = PathBuf::from(std::ffi::OsString::from_vec(name));
    if !path.is_absolute() {
        return Err(bad("the backing file name is not absolute"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img() -> bool {
        crate::util::find_on_path("qemu-img").is_some()
    }

    #[test]
    fn format_comes_from_the_name() {
        assert_eq!(format_of(Path::new("/s/disk.qcow2")), ImageType::Qcow2);
        assert_eq!(format_of(Path::new("/s/disk.ext4")), ImageType::Raw);
        assert_eq!(format_of(Path::new("/s/qcow2")), ImageType::Raw);
        // A raw disk whose guest wrote a qcow2 magic into sector 0 stays raw.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.ext4");
        std::fs::write(&p, b"QFI\xfb\0\0\0\x03").unwrap();
        assert_eq!(format_of(&p), ImageType::Raw);
    }

    #[test]
    fn overlay_is_small_and_flattens_to_the_base_plus_writes() {
        assert!(
            qemu_img(),
            "qemu-img not installed: run `make deps` (apt-get install qemu-utils)"
        );
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.ext4");
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"base-data", 1 << 20).unwrap();
        drop(f);
        let overlay = d.path().join("clone.qcow2");
        create_overlay(&base, &overlay).unwrap();
        assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20);
        let header = std::fs::read(&overlay).unwrap();
        assert_eq!(&header[..4], b"QFI\xfb");
        // Guest writes through qemu-io would need more tooling: flattening an untouched
        // overlay gives back the base, sparse.
        let flat = d.path().join("flat.ext4");
        flatten(&overlay, &flat).unwrap();
        let out = std::fs::File::open(&flat).unwrap();
        assert_eq!(out.metadata().unwrap().len(), 64 << 20);
        let mut buf = [0u8; 9];
        out.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(&buf, b"base-data");
        use std::os::unix::fs::MetadataExt;
        assert!(
            out.metadata().unwrap().blocks() * 512 < 8 << 20,
            "not sparse"
        );
        // Raw disks are copied.
        let copy = d.path().join("copy.ext4");
        flatten(&base, &copy).unwrap();
        assert_eq!(std::fs::metadata(&copy).unwrap().len(), 64 << 20);
        assert!(matches!(
            create_overlay(&d.path().join("missing"), &d.path().join("x.qcow2")),
            Err(DiskError::Base { .. })
        ));
    }

    /// Cloud Hypervisor holds OFD locks on a running VM's overlay (write) and base (read):
    /// a checkpoint reads both anyway. (The first real run failed: "Failed to lock byte 100".)
    #[test]
    fn flatten_reads_an_overlay_its_vmm_holds_locked() {
        assert!(qemu_img(), "qemu-img not installed: run `make deps`");
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.ext4");
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(b"base-data", 4096).unwrap();
        drop(f);
        let overlay = d.path().join("clone.qcow2");
        create_overlay(&base, &overlay).unwrap();
        assert_eq!(backing_of(&overlay).unwrap(), base.canonicalize().unwrap());
        let lock = |path: &Path, write: bool| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .unwrap();
            let fl = libc::flock {
                l_type: if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short,
                l_whence: libc::SEEK_SET as libc::c_short,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            // SAFETY: a valid fd and flock for F_OFD_SETLK.
            assert_eq!(
                unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_OFD_SETLK, &fl) },
                0
            );
            f
        };
        let _held = (lock(&overlay, true), lock(&base, false));
        let flat = d.path().join("flat.ext4");
        flatten(&overlay, &flat).unwrap();
        let mut buf = [0u8; 9];
        std::fs::File::open(&flat)
            .unwrap()
            .read_exact_at(&mut buf, 4096)
            .unwrap();
        assert_eq!(&buf, b"base-data");
    }

    #[test]
    fn backing_of_refuses_what_is_not_our_overlay() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("disk.qcow2");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            backing_of(&raw),
            Err(DiskError::BadOverlay { .. })
        ));
        let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
        h.extend_from_slice(&64u64.to_be_bytes());
        h.extend_from_slice(&5000u32.to_be_bytes());
        h.resize(4096, 0);
        std::fs::write(&raw, &h).unwrap();
        let e = backing_of(&raw).unwrap_err().to_string();
        assert!(e.contains("no backing file name"), "{e}");
    }
}
