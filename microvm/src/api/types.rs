//! Cloud Hypervisor's REST API bodies, as described by its OpenAPI document (`vmm.ping`,
//! `vm.create`, `vm.info`, `vm.snapshot`, `vm.restore`).
//!
//! Only the fields thaw sets are modelled; everything is optional on the wire except what the
//! VMM requires, so `skip_serializing_if` keeps the JSON minimal and lets Cloud Hypervisor apply
//! its own defaults. Responses tolerate unknown fields (newer releases add some).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `GET /api/v1/vmm.ping` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    #[serde(default)]
    pub build_version: String,
    pub version: String,
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub features: Vec<String>,
}

/// Body of `PUT /api/v1/vm.create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpus: Option<CpusConfig>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub memory: Option<MemoryConfig>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vsock: Option<VsockConfig>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub serial: Option<ConsoleConfig>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub console: Option<ConsoleConfig>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rng: Option<RngConfig>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub net: Option<Vec<NetConfig>>,
}

/// A virtio-net device on a tap that Cloud Hypervisor opens by name in its own network
/// namespace (creating it if it does not exist). No `ip`/`mask`: the host's side of the tap
/// is configured by whoever wires that namespace, not by the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// The uncompressed ELF `vmlinux` with a PVH entry point.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kernel: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initramfs: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// `shared=false`: private anonymous memory. The snapshot writes it to `memory-ranges`.
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    /// Touch every page at boot (slower start, no faults later).
    #[serde(default)]
    pub prefault: bool,
    /// Ask for transparent huge pages on guest RAM.
    #[serde(default)]
    pub thp: bool,
}

/// A disk image's format, as Cloud Hypervisor's `DiskConfig.image_type` names it (v52+;
/// v53 also knows `FixedVhd` and `Vhdx`, which thaw never makes).
///
/// Always sent: without it Cloud Hypervisor autodetects the format from the file's content,
/// logs a deprecation and, for a raw image, refuses writes to sector 0. Autodetection would
/// also let a guest that writes a qcow2 magic into sector 0 of its raw disk turn the disk
/// into a qcow2 image naming a backing file of its choice on the next open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    pub image_type: ImageType,
    /// Let a qcow2 image read through to the backing file named in its header (v53: off by
    /// default, and an overlay whose backing file is refused fails to open).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backing_files: bool,
}

impl DiskConfig {
    /// A writable disk of `format`; qcow2 overlays get `backing_files` (thaw writes their
    /// headers itself, so the backing path named there is its own).
    pub fn writable(path: PathBuf, format: ImageType) -> Self {
        DiskConfig {
            path,
            readonly: false,
            image_type: format,
            backing_files: format == ImageType::Qcow2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// Guest context id; 0-2 are reserved, so >= 3. Cloud Hypervisor takes a u32
    /// (`VsockConfig::cid`), as the virtio-vsock config space's guest_cid low half.
    pub cid: u32,
    /// Host side of the hybrid vsock device: a Unix socket path.
    pub socket: PathBuf,
}

/// Where a serial port or virtio console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    pub fn off() -> Self {
        ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
            socket: None,
        }
    }

    pub fn file(path: PathBuf) -> Self {
        ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some(path),
            socket: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: PathBuf,
}

/// `vm.info` state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    /// A state this crate does not know yet (a newer Cloud Hypervisor).
    #[serde(other)]
    Unknown,
}

/// `GET /api/v1/vm.info` answer. `config` is kept as raw JSON: it echoes the full VmConfig
/// including every default the VMM filled in, which this crate does not model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub memory_actual_size: Option<u64>,
}

/// Body of `PUT /api/v1/vm.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// `file:///absolute/dir`.
    pub destination_url: String,
}

/// How `vm.restore` brings guest memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MemoryRestoreMode {
    /// Read the whole memory file before the guest runs.
    Copy,
    /// Map nothing up front; userfaultfd fills pages as the guest touches them (v52+).
    #[default]
    OnDemand,
}

/// Body of `PUT /api/v1/vm.restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// `file:///absolute/dir`.
    pub source_url: String,
    #[serde(default)]
    pub prefault: bool,
    pub memory_restore_mode: MemoryRestoreMode,
    /// Resume the VM as part of the restore (v52+), saving one API round trip.
    #[serde(default)]
    pub resume: bool,
}

/// `file://` URL for an absolute directory, as `vm.snapshot`/`vm.restore` expect.
pub fn file_url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: Some("/cache/vmlinux".into()),
                cmdline: Some("console=ttyS0 root=/dev/vda".into()),
                initramfs: Some("/cache/initramfs.img".into()),
            },
            cpus: Some(CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
            }),
            memory: Some(MemoryConfig {
                size: 512 << 20,
                shared: false,
                hugepages: false,
                prefault: false,
                thp: true,
            }),
            disks: Some(vec![
                DiskConfig::writable("/vm/rootfs.ext4".into(), ImageType::Raw),
                DiskConfig::writable("/vm/clone.qcow2".into(), ImageType::Qcow2),
            ]),
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "/vm/vsock.sock".into(),
            }),
            serial: Some(ConsoleConfig::file("/vm/console.log".into())),
            console: Some(ConsoleConfig::off()),
            rng: Some(RngConfig {
                src: "/dev/urandom".into(),
            }),
            net: Some(vec![NetConfig {
                tap: "thaw0".into(),
                mac: "52:54:00:74:68:77".into(),
            }]),
        }
    }

    #[test]
    fn vm_config_serialises_to_the_documented_shape() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(
            v,
            json!({
                "payload": {
                    "kernel": "/cache/vmlinux",
                    "cmdline": "console=ttyS0 root=/dev/vda",
                    "initramfs": "/cache/initramfs.img"
                },
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 536870912u64, "shared": false, "hugepages": false,
                           "prefault": false, "thp": true},
                "disks": [
                    {"path": "/vm/rootfs.ext4", "readonly": false, "image_type": "Raw"},
                    {"path": "/vm/clone.qcow2", "readonly": false, "image_type": "Qcow2",
                     "backing_files": true}
                ],
                "vsock": {"cid": 3, "socket": "/vm/vsock.sock"},
                "serial": {"mode": "File", "file": "/vm/console.log"},
                "console": {"mode": "Off"},
                "rng": {"src": "/dev/urandom"},
                "net": [{"tap": "thaw0", "mac": "52:54:00:74:68:77"}]
            })
        );
    }

    #[test]
    fn optional_sections_are_omitted() {
        let c = VmConfig {
            payload: PayloadConfig {
                kernel: Some("/k".into()),
                cmdline: None,
                initramfs: None,
            },
            cpus: None,
            memory: None,
            disks: None,
            vsock: None,
            serial: None,
            console: None,
            rng: None,
            net: None,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"payload":{"kernel":"/k"}}"#
        );
    }

    #[test]
    fn parses_documented_ping() {
        // What v53.0 answers: `version` is the cloud-hypervisor crate's version.
        let body = r#"{"build_version":"v53.0","version":"53.0.0","pid":4242,"features":["kvm","io_uring"]}"#;
        let p: VmmPingResponse = serde_json::from_str(body).unwrap();
        assert_eq!(p.version, "53.0.0");
        assert_eq!(p.pid, Some(4242));
        assert_eq!(p.features, vec!["kvm", "io_uring"]);
        // Older releases answer with only the version fields.
        let p: VmmPingResponse = serde_json::from_str(r#"{"version":"v40.0"}"#).unwrap();
        assert!(p.features.is_empty());
    }

    #[test]
    fn parses_documented_info() {
        let body = json!({
            "config": {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 536870912u64}},
            "state": "Paused",
            "memory_actual_size": 536870912u64,
            "device_tree": {}
        });
        let info: VmInfo = serde_json::from_value(body).unwrap();
        assert_eq!(info.state, VmState::Paused);
        assert_eq!(info.memory_actual_size, Some(512 << 20));
        for (s, want) in [
            ("Created", VmState::Created),
            ("Running", VmState::Running),
            ("Shutdown", VmState::Shutdown),
            ("BreakPoint", VmState::Unknown),
        ] {
            let info: VmInfo = serde_json::from_value(json!({"state": s})).unwrap();
            assert_eq!(info.state, want);
        }
    }

    #[test]
    fn restore_body_matches_reference() {
        let r = RestoreConfig {
            source_url: file_url(std::path::Path::new("/snap/a")),
            prefault: false,
            memory_restore_mode: MemoryRestoreMode::OnDemand,
            resume: true,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"source_url": "file:///snap/a", "prefault": false,
                   "memory_restore_mode": "OnDemand", "resume": true})
        );
        let s = VmSnapshotConfig {
            destination_url: file_url(std::path::Path::new("/snap/b")),
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"destination_url":"file:///snap/b"}"#
        );
    }
}
