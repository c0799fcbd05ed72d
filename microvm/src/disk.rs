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
            // `-S 4k` (the default) keeps zeroed 4 KiB runs as holes in the output.
            run(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-U", "-f", "qcow2", "-O", "raw"])
                    .arg(src)
                    .arg(dest),
                "flatten a clone's qcow2 disk into a raw image (apt-get install qemu-utils)",
            )?;
        }
    }
    Ok(())
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
}
