//! The microvm tier end to end on real Cloud Hypervisor: boot, agent ping and exec, pause,
//! snapshot, restore (OnDemand) into a fresh VMM as a clone with its own vsock socket, CID and
//! disk, exec again, shut down, and nothing left behind.
//!
//! Needs `cloud-hypervisor` (v52+ for OnDemand restore with resume), a usable hardware-backed
//! `/dev/kvm`, `busybox-static`, the kernel package (apt, or a pre-filled `THAW_IMAGE_CACHE`),
//! and a static guest-init in `THAW_GUEST_INIT`. So the tests are `#[ignore]`d: a plain
//! `cargo test` shows them as ignored, and `make test-microvm` runs them (`--ignored`) on real
//! KVM, natively or nested under QEMU TCG (`nested/`). Run that way, a missing piece is a
//! failure that names it, never a silent pass.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thaw_microvm::agent::AgentConn;
use thaw_microvm::api::VmState;
use thaw_microvm::image::{self, ImageCache, RootfsSpec};
use thaw_microvm::vm::DEFAULT_CMDLINE;
use thaw_microvm::{cloud_hypervisor_available, Availability, RestoreOptions, Vm, VmSpec};

struct Setup {
    bin: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    rootfs: PathBuf,
}

/// How much longer than on hardware to wait: under nested emulation (`THAW_NESTED`, set by
/// `thaw-nested`) every guest instruction is emulated.
fn patience(d: Duration) -> Duration {
    if std::env::var_os("THAW_NESTED").is_some() {
        d * 8
    } else {
        d
    }
}

fn setup() -> Setup {
    try_setup().unwrap_or_else(|why| panic!("cannot run the real Cloud Hypervisor tests: {why}"))
}

fn try_setup() -> Result<Setup, String> {
    let bin = match cloud_hypervisor_available() {
        Availability::Available { binary, version } => {
            eprintln!("using {} ({version})", binary.display());
            binary
        }
        Availability::Unavailable { reasons } => return Err(reasons.join("; ")),
    };
    let guest_init = std::env::var_os("THAW_GUEST_INIT")
        .map(PathBuf::from)
        .ok_or("THAW_GUEST_INIT is not set (path of a static guest-init binary)")?;
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err("/bin/busybox missing (apt-get install busybox-static)".into());
    }
    let cache_dir = std::env::var_os("THAW_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("thaw-image-cache"));
    let cache = ImageCache::new(cache_dir).map_err(|e| e.to_string())?;
    let img =
        image::build_guest_image(&cache, busybox, "/sbin/thaw-init").map_err(|e| e.to_string())?;
    let src = tempfile::tempdir().map_err(|e| e.to_string())?;
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "run"] {
        std::fs::create_dir_all(src.path().join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(busybox, src.path().join("bin/busybox")).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink("busybox", src.path().join("bin/sh")).map_err(|e| e.to_string())?;
    let rootfs = image::build_rootfs(
        &cache,
        &RootfsSpec {
            source_dir: src.path(),
            guest_init: &guest_init,
            init_path: "/sbin/thaw-init",
            disk_limit_mib: 512,
            headroom_mib: 32,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Setup {
        bin,
        kernel: img.kernel.vmlinux,
        initramfs: img.initramfs,
        rootfs,
    })
}

fn pid_alive(pid: u32) -> bool {
    // Signal 0 only checks existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

async fn exec_echo(vm: &Vm, word: &str) {
    let stream = vm
        .connect_agent(patience(Duration::from_secs(5)))
        .await
        .expect("vsock connect");
    let mut agent = AgentConn::new(stream);
    let out = agent
        .exec(
            &["/bin/busybox", "echo", word],
            patience(Duration::from_secs(10)),
        )
        .await
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), word);
    assert!(out.outcome.success());
}

#[tokio::test]
#[ignore = "needs Cloud Hypervisor on hardware KVM: run `make test-microvm`"]
async fn boot_snapshot_restore_clone_and_clean_up() {
    let s = setup();
    let root = tempfile::tempdir().unwrap();
    let disk = root.path().join("base-rootfs.ext4");
    std::fs::copy(&s.rootfs, &disk).unwrap();
    let base_dir = root.path().join("base");
    let spec = VmSpec {
        kernel: s.kernel.clone(),
        initramfs: s.initramfs.clone(),
        cmdline: DEFAULT_CMDLINE.into(),
        rootfs: disk.clone(),
        vcpus: 1,
        memory_mib: 512,
        cid: 3,
        workdir: base_dir.clone(),
        network: None,
    };

    let t = Instant::now();
    let mut vm = Vm::boot(&spec, &s.bin).await.expect("boot");
    let base_pid = vm.vmm_pid().unwrap();
    vm.wait_agent_ready(patience(Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("boot to guest-init ready: {:?}", t.elapsed());
    exec_echo(&vm, "before").await;

    vm.pause().await.expect("pause");
    assert_eq!(vm.info().await.unwrap().state, VmState::Paused);
    let snap = root.path().join("snapshot");
    let t = Instant::now();
    vm.snapshot(&snap).await.expect("snapshot");
    eprintln!("snapshot: {:?}", t.elapsed());
    assert!(snap.join("config.json").exists());
    vm.shutdown().await.expect("shutdown base");
    assert!(!base_dir.exists());
    assert!(!pid_alive(base_pid));

    let clone_dir = root.path().join("clone");
    let t = Instant::now();
    let mut clone = Vm::restore(&snap, &clone_dir, RestoreOptions::new(7), &s.bin)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(clone.cid(), 7);
    assert!(clone.vsock_socket().starts_with(&clone_dir));
    clone
        .wait_agent_ready(patience(Duration::from_secs(10)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("restore (OnDemand) to guest-init ready: {:?}", t.elapsed());
    assert_eq!(clone.info().await.unwrap().state, VmState::Running);
    exec_echo(&clone, "after").await;

    let clone_pid = clone.vmm_pid().unwrap();
    clone.shutdown().await.expect("shutdown clone");
    assert!(!clone_dir.exists(), "clone workdir (sockets, disk) removed");
    assert!(!pid_alive(clone_pid), "no VMM process remains");
}

#[tokio::test]
#[ignore = "needs Cloud Hypervisor on hardware KVM: run `make test-microvm`"]
async fn guest_that_never_answers_times_out_with_console() {
    let s = setup();
    let root = tempfile::tempdir().unwrap();
    let disk = root.path().join("rootfs.ext4");
    std::fs::copy(&s.rootfs, &disk).unwrap();
    let spec = VmSpec {
        kernel: s.kernel,
        initramfs: s.initramfs,
        // guest-init at a path that does not exist: the initramfs powers off with a message.
        cmdline: "console=ttyS0 root=/dev/vda panic=-1 thaw.init=/nonexistent".into(),
        rootfs: disk,
        vcpus: 1,
        memory_mib: 256,
        cid: 4,
        workdir: root.path().join("vm"),
        network: None,
    };
    let mut vm = Vm::boot(&spec, &s.bin).await.expect("boot");
    let e = vm
        .wait_agent_ready(patience(Duration::from_secs(15)))
        .await
        .expect_err("guest-init cannot start");
    assert!(e.to_string().contains("THAW-INITRAMFS-FATAL"), "{e}");
}
