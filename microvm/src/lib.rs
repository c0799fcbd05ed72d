//! The microvm tier of thaw: Cloud Hypervisor driven over its REST API, and the guest image
//! (Debian kernel, busybox initramfs, ext4 rootfs) it boots.
//!
//! * [`api`]: typed Cloud Hypervisor API bodies and an HTTP/1.1 client over its Unix socket.
//! * [`vmm`]: the VMM process (spawn, readiness, kill and cleanup).
//! * [`vm`]: the high-level [`Vm`] the platform drives (boot, pause, snapshot, restore, agent).
//! * [`disk`]: disk formats, qcow2 overlays for clones, flattening for checkpoints.
//! * [`restore`]: materialising a snapshot for a clone (its own vsock socket, disk and CID).
//! * [`vsock`]: the hybrid-vsock `CONNECT` handshake.
//! * [`agent`]: a client for guest-init's protocol over any stream.
//! * [`logs`]: the VMM's and the guest's console logs, on a capped tmpfs.
//! * [`image`]: the guest image pipeline.
//! * [`qemu`]: boots the same image under QEMU TCG, to prove it in CI where KVM is unusable.
//! * [`availability`]: whether this host can run the tier, and why not.

pub mod agent;
pub mod api;
pub mod availability;
pub mod disk;
pub mod image;
pub mod logs;
pub mod qemu;
pub mod restore;
pub mod util;
pub mod vm;
pub mod vmm;
pub mod vsock;

pub use availability::{cloud_hypervisor_available, Availability};
pub use vm::{RestoreOptions, Vm, VmError, VmSpec};
