//! The guest's root disk, as Cloud Hypervisor v53 opens it, for a fake that loop-mounts it.
//!
//! * `image_type` is checked against the content (`QFI\xfb` is qcow2, anything else raw), as
//!   Cloud Hypervisor does when it opens the disk: a mismatch fails the boot or restore. A
//!   missing `image_type` (or `Unknown`) is autodetected with Cloud Hypervisor's deprecation
//!   warning.
//! * A **qcow2** disk cannot be loop-mounted. Test double: the fake flattens it into a raw
//!   scratch file next to the API socket (`qemu-img convert`), mounts that, and writes the
//!   guest's changes back into the qcow2 file whenever the real VMM's file would be current
//!   (pause, which precedes every snapshot, and guest stop) as a new overlay over the same
//!   backing file holding only clusters that differ from it (`qemu-img rebase`). Like
//!   Cloud Hypervisor, an overlay naming a backing file opens only with `backing_files`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::guest::{child_command, tool};

/// What Cloud Hypervisor v53's `ImageType` serialises to.
pub const IMAGE_TYPES: [&str; 5] = ["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"];
const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// The disk the guest root is mounted from: the configured file itself, or (qcow2) a raw
/// scratch copy synced back to it.
#[derive(Debug)]
pub struct RootDisk {
    /// What `mount -o loop` gets.
    pub mountable: PathBuf,
    qcow2: Option<Qcow2Shadow>,
}

#[derive(Debug)]
struct Qcow2Shadow {
    overlay: PathBuf,
    backing: Option<String>,
}

fn detect(path: &Path) -> Result<Format, String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok(match f.read_exact(&mut magic) {
        Ok(()) if &magic == QCOW_MAGIC => Format::Qcow2,
        _ => Format::Raw,
    })
}

fn name(f: Format) -> &'static str {
    match f {
        Format::Raw => "Raw",
        Format::Qcow2 => "Qcow2",
    }
}

async fn qemu_img(args: &[&std::ffi::OsStr], what: &str) -> Result<Vec<u8>, String> {
    let out = child_command(&tool("qemu-img"))
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img to {what} (apt-get install qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img failed to {what} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

impl RootDisk {
    /// Opens `disks[0]` (`config`) as Cloud Hypervisor would; a qcow2 disk is flattened to
    /// `scratch`.
    pub async fn open(disk: &Value, path: &Path, scratch: &Path) -> Result<RootDisk, String> {
        let detected = detect(path)?;
        let specified = disk.get("image_type").and_then(Value::as_str);
        match specified {
            None | Some("Unknown") => log!(
                "DEPRECATION: auto-detection of disk image type is deprecated and will be \
                 removed in a future release. Please specify image type explicitly. (detected {})",
                name(detected)
            ),
            Some(s) if s != name(detected) => {
                return Err(format!(
                    "Disk image type does not match expected type: specified = {}, detected = {}",
                    s.to_lowercase(),
                    name(detected).to_lowercase()
                ))
            }
            Some(_) => {}
        }
        if detected == Format::Raw {
            return Ok(RootDisk {
                mountable: path.to_owned(),
                qcow2: None,
            });
        }
        let info = qemu_img(
            &["info".as_ref(), "--output=json".as_ref(), path.as_os_str()],
            "read the qcow2 header",
        )
        .await?;
        let info: Value = serde_json::from_slice(&info)
            .map_err(|e| format!("qemu-img info {}: {e}", path.display()))?;
        let backing = info
            .get("full-backing-filename")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let backing_files = disk
            .get("backing_files")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // Autodetected qcow2 gets backing files disabled, as in Cloud Hypervisor.
        if backing.is_some() && (!backing_files || specified.is_none()) {
            return Err(format!(
                "Failed to open disk {}: the qcow2 image has a backing file but backing_files is off",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(scratch);
        qemu_img(
            &[
                "convert".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                path.as_os_str(),
                scratch.as_os_str(),
            ],
            "flatten the qcow2 disk for loop-mounting",
        )
        .await?;
        log!(
            "qcow2 disk {} (backing {:?}) flattened to {} (test double)",
            path.display(),
            backing,
            scratch.display()
        );
        Ok(RootDisk {
            mountable: scratch.to_owned(),
            qcow2: Some(Qcow2Shadow {
                overlay: path.to_owned(),
                backing,
            }),
        })
    }

    /// Makes the configured disk file hold every write the guest made (the caller stopped the
    /// guest and flushed its filesystem). Nothing to do for a raw disk.
    pub async fn sync_back(&self) -> Result<(), String> {
        let Some(q) = &self.qcow2 else { return Ok(()) };
        let tmp = q.overlay.with_extension("fake-sync.qcow2");
        let _ = std::fs::remove_file(&tmp);
        let scratch = self.mountable.as_os_str();
        let what = "write the guest's changes back to its qcow2 disk";
        match &q.backing {
            // An empty overlay over the scratch copy, rebased (safe mode: content compared
            // cluster by cluster) onto the real backing file: only clusters that differ
            // from it end up in the overlay, as with Cloud Hypervisor's own writes.
            Some(b) => {
                let fmt = backing_format(b).await?;
                let args = ["create", "-q", "-f", "qcow2", "-F", "raw", "-b"];
                let mut create: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
                create.extend([scratch, tmp.as_os_str()]);
                qemu_img(&create, what).await?;
                let args = ["rebase", "-q", "-f", "qcow2", "-F", fmt, "-b", b];
                let mut rebase: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
                rebase.push(tmp.as_os_str());
                qemu_img(&rebase, what).await?;
            }
            None => {
                let args = ["convert", "-q", "-f", "raw", "-O", "qcow2"];
                let mut convert: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
                convert.extend([scratch, tmp.as_os_str()]);
                qemu_img(&convert, what).await?;
            }
        }
        std::fs::rename(&tmp, &q.overlay)
            .map_err(|e| format!("cannot replace {}: {e}", q.overlay.display()))
    }

    /// Removes the scratch copy (after the final [`RootDisk::sync_back`] and unmount).
    pub fn remove_scratch(&self) {
        if self.qcow2.is_some() {
            let _ = std::fs::remove_file(&self.mountable);
        }
    }
}

async fn backing_format(backing: &str) -> Result<&'static str, String> {
    Ok(match detect(Path::new(backing))? {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    })
}
