//! Materialising a snapshot for one clone.
//!
//! A Cloud Hypervisor snapshot directory holds `config.json` (the full VmConfig, with absolute
//! paths: disks, vsock socket, console files), `state.json` and `memory-ranges`. Restoring the
//! same directory twice would make both clones bind the same vsock socket and write the same
//! disk, so every clone gets a private directory in its workdir:
//!
//! * `config.json` is rewritten: the vsock socket moves into the clone's workdir, the CID is
//!   the clone's own, each disk path points at the clone's private copy-on-write disk (with
//!   its `image_type` set from the disk's name, and `backing_files` for a qcow2 overlay), and
//!   file-backed serial/console output goes to the clone's workdir. Everything else (every
//!   default the VMM recorded) is kept verbatim by editing the JSON tree, not a typed copy.
//! * `state.json` and `memory-ranges` are symlinked, not copied: restore only reads them, and
//!   the memory file is the big one.
//!
//! Disks: Cloud Hypervisor opens raw and qcow2 images. A clone's disk is a qcow2 overlay
//! backed by the snapshot's raw disk ([`crate::disk::create_overlay`]), copy-on-write on
//! every filesystem. Callers that make their own (the platform does) pass its path in
//! `RestoreOptions::disks`.
//!
//! CID: with hybrid vsock the host reaches the guest through the clone's own Unix socket, so
//! the CID is host-side bookkeeping; the guest kernel keeps the CID it read at boot until a
//! transport reset. A fresh CID per clone still keeps CIDs unique per host, as vhost-vsock
//! users expect.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::disk::{self, DiskError, ImageType};

pub const CONFIG_JSON: &str = "config.json";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("snapshot {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot config.json is not valid JSON: {0}")]
    BadConfig(#[from] serde_json::Error),
    #[error("snapshot config.json has no {0}: not a thaw microvm snapshot")]
    MissingField(&'static str),
    #[error("snapshot has {snapshot} disk(s) but {given} replacement path(s) were given")]
    DiskCountMismatch { snapshot: usize, given: usize },
    #[error("vsock CID {0} is reserved: guest CIDs start at 3")]
    ReservedCid(u32),
    #[error("cannot make the clone's disk: {0}")]
    Disk(#[from] DiskError),
    /// The snapshot's VM has a network device, and no namespace was given for its tap: the
    /// VMM would make it in the caller's own (the host's) namespace.
    #[error(
        "the snapshot has a network device and the restore names no network namespace for its tap"
    )]
    NetworkWithoutNamespace,
}

/// What changes for one clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRewrite {
    pub vsock_socket: PathBuf,
    pub cid: u32,
    /// One path per disk in the snapshot, in order.
    pub disks: Vec<PathBuf>,
    /// Where file-backed serial output goes.
    pub serial_log: PathBuf,
    /// Where file-backed virtio-console output goes.
    pub console_log: PathBuf,
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// Whether a snapshot's config has a network device (whose tap the restoring VMM makes).
pub fn has_network(config: &Value) -> bool {
    config
        .get("net")
        .and_then(Value::as_array)
        .is_some_and(|n| !n.is_empty())
}

/// Disk paths recorded in a snapshot's config.
pub fn snapshot_disks(config: &Value) -> Vec<PathBuf> {
    config
        .get("disks")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|d| d.get("path").and_then(Value::as_str).map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Rewrites a snapshot's `config.json` for one clone (see the module docs).
pub fn rewrite_config(mut config: Value, rw: &CloneRewrite) -> Result<Value, RestoreError> {
    if rw.cid < 3 {
        return Err(RestoreError::ReservedCid(rw.cid));
    }
    let vsock = config
        .get_mut("vsock")
        .and_then(Value::as_object_mut)
        .ok_or(RestoreError::MissingField("vsock device"))?;
    vsock.insert("socket".into(), path_value(&rw.vsock_socket));
    vsock.insert("cid".into(), Value::from(rw.cid));

    let disks = config
        .get_mut("disks")
        .and_then(Value::as_array_mut)
        .map(|a| a.as_mut_slice())
        .unwrap_or_default();
    if disks.len() != rw.disks.len() {
        return Err(RestoreError::DiskCountMismatch {
            snapshot: disks.len(),
            given: rw.disks.len(),
        });
    }
    for (disk, path) in disks.iter_mut().zip(&rw.disks) {
        let d = disk
            .as_object_mut()
            .ok_or(RestoreError::MissingField("disk object"))?;
        d.insert("path".into(), path_value(path));
        // Never leave the format to Cloud Hypervisor's autodetection (see `ImageType`), and
        // replace what the snapshot recorded: the clone's disk may have another format.
        let format = disk::format_of(path);
        d.insert("image_type".into(), serde_json::to_value(format)?);
        d.insert(
            "backing_files".into(),
            Value::Bool(format == ImageType::Qcow2),
        );
    }

    for (key, log) in [("serial", &rw.serial_log), ("console", &rw.console_log)] {
        if let Some(c) = config.get_mut(key).and_then(Value::as_object_mut) {
            if c.get("mode").and_then(Value::as_str) == Some("File") {
                c.insert("file".into(), path_value(log));
            }
        }
    }
    Ok(config)
}

/// A standalone copy of a disk image (a reflink where the filesystem has them, else sparse):
/// see [`disk::flatten`].
pub fn clone_disk(base: &Path, dest: &Path) -> Result<(), RestoreError> {
    Ok(disk::flatten(base, dest)?)
}

/// A private copy-on-write disk for a clone in `dir`, from the snapshot's disk number `i`: a
/// qcow2 overlay of a raw disk, or a flattened copy of a qcow2 one (an overlay of an overlay
/// would tie the clone to a file the snapshotted VM may still be writing).
pub fn clone_disk_into(base: &Path, dir: &Path, i: usize) -> Result<PathBuf, RestoreError> {
    match disk::format_of(base) {
        ImageType::Raw => {
            let dest = dir.join(format!("disk{i}.{}", disk::QCOW2_EXTENSION));
            disk::create_overlay(base, &dest)?;
            Ok(dest)
        }
        ImageType::Qcow2 => {
            let dest = dir.join(format!("disk{i}.raw"));
            disk::flatten(base, &dest)?;
            Ok(dest)
        }
    }
}

/// Builds the clone's private snapshot directory `dest` from `snapshot_dir`: rewritten
/// `config.json`, every other file symlinked. Returns the rewritten config.
pub fn materialise(
    snapshot_dir: &Path,
    dest: &Path,
    rw: &CloneRewrite,
) -> Result<Value, RestoreError> {
    let io = |dir: &Path| {
        let dir = dir.to_owned();
        move |source| RestoreError::Io { dir, source }
    };
    let snapshot_dir = snapshot_dir.canonicalize().map_err(io(snapshot_dir))?;
    let raw = std::fs::read(snapshot_dir.join(CONFIG_JSON)).map_err(io(&snapshot_dir))?;
    let config = rewrite_config(serde_json::from_slice(&raw)?, rw)?;
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    for entry in std::fs::read_dir(&snapshot_dir).map_err(io(&snapshot_dir))? {
        let entry = entry.map_err(io(&snapshot_dir))?;
        let name = entry.file_name();
        if name == CONFIG_JSON {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), dest.join(&name)).map_err(io(dest))?;
    }
    let text = serde_json::to_vec_pretty(&config)?;
    std::fs::write(dest.join(CONFIG_JSON), text).map_err(io(dest))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shape Cloud Hypervisor writes (abridged; unknown fields must survive).
    fn snapshot_config() -> Value {
        json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false},
            "memory": {"size": 536870912u64, "mergeable": false, "shared": false,
                       "hugepages": false, "prefault": false, "thp": true},
            "payload": {"kernel": "/cache/kernel/k/vmlinux",
                        "initramfs": "/cache/initramfs/i/initramfs.cpio.zst",
                        "cmdline": "console=ttyS0 root=/dev/vda"},
            "disks": [{"path": "/vms/base/rootfs.ext4", "readonly": false, "direct": false,
                       "iommu": false, "num_queues": 1, "queue_size": 128, "id": "_disk0"}],
            "rng": {"src": "/dev/urandom", "iommu": false},
            "serial": {"file": "/vms/base/console.log", "mode": "File", "iommu": false},
            "console": {"file": null, "mode": "Off", "iommu": false},
            "vsock": {"cid": 3, "socket": "/vms/base/vsock.sock", "iommu": false, "id": "_vsock0"},
            "iommu": false,
            "watchdog": false
        })
    }

    fn rw() -> CloneRewrite {
        CloneRewrite {
            vsock_socket: "/vms/clone7/vsock.sock".into(),
            cid: 107,
            disks: vec!["/vms/clone7/disk0.ext4".into()],
            serial_log: "/vms/clone7/console.log".into(),
            console_log: "/vms/clone7/virtio-console.log".into(),
        }
    }

    #[test]
    fn rewrites_socket_cid_disk_and_console_only() {
        let before = snapshot_config();
        let after = rewrite_config(before.clone(), &rw()).unwrap();
        assert_eq!(after["vsock"]["socket"], "/vms/clone7/vsock.sock");
        assert_eq!(after["vsock"]["cid"], 107);
        assert_eq!(after["vsock"]["id"], "_vsock0");
        assert_eq!(after["disks"][0]["path"], "/vms/clone7/disk0.ext4");
        assert_eq!(after["disks"][0]["image_type"], "Raw");
        assert_eq!(after["disks"][0]["backing_files"], false);
        assert_eq!(after["disks"][0]["num_queues"], 1);
        let mut q = rw();
        q.disks = vec!["/vms/clone7/disk.qcow2".into()];
        let after = rewrite_config(before.clone(), &q).unwrap();
        assert_eq!(after["disks"][0]["image_type"], "Qcow2");
        assert_eq!(after["disks"][0]["backing_files"], true);
        assert_eq!(after["serial"]["file"], "/vms/clone7/console.log");
        // Console is Off: its (null) file stays as it was.
        assert_eq!(after["console"], before["console"]);
        for k in ["cpus", "memory", "payload", "rng", "iommu", "watchdog"] {
            assert_eq!(after[k], before[k], "{k} changed");
        }
    }

    #[test]
    fn rejects_mismatches() {
        let mut r = rw();
        r.disks.push("/x".into());
        assert!(matches!(
            rewrite_config(snapshot_config(), &r),
            Err(RestoreError::DiskCountMismatch {
                snapshot: 1,
                given: 2
            })
        ));
        let mut r = rw();
        r.cid = 2;
        assert!(matches!(
            rewrite_config(snapshot_config(), &r),
            Err(RestoreError::ReservedCid(2))
        ));
        let mut c = snapshot_config();
        c.as_object_mut().unwrap().remove("vsock");
        assert!(matches!(
            rewrite_config(c, &rw()),
            Err(RestoreError::MissingField(_))
        ));
    }

    #[test]
    fn materialise_links_state_and_writes_config() {
        let snap = tempfile::tempdir().unwrap();
        std::fs::write(
            snap.path().join(CONFIG_JSON),
            serde_json::to_vec(&snapshot_config()).unwrap(),
        )
        .unwrap();
        std::fs::write(snap.path().join("state.json"), "{}").unwrap();
        std::fs::write(snap.path().join("memory-ranges"), vec![0u8; 4096]).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let d = dest.path().join("snapshot");
        materialise(snap.path(), &d, &rw()).unwrap();
        assert!(std::fs::symlink_metadata(d.join("memory-ranges"))
            .unwrap()
            .file_type()
            .is_symlink());
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(d.join(CONFIG_JSON)).unwrap()).unwrap();
        assert_eq!(cfg["vsock"]["cid"], 107);
        // The original is untouched.
        let orig: Value =
            serde_json::from_slice(&std::fs::read(snap.path().join(CONFIG_JSON)).unwrap()).unwrap();
        assert_eq!(orig["vsock"]["cid"], 3);
        assert_eq!(
            snapshot_disks(&orig),
            vec![PathBuf::from("/vms/base/rootfs.ext4")]
        );
    }

    #[test]
    fn clone_disk_copies_sparsely() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.ext4");
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(64 << 20).unwrap();
        std::fs::write(d.path().join("x"), "x").unwrap();
        let dest = d.path().join("clone.ext4");
        clone_disk(&base, &dest).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 64 << 20);
    }
}
