//! Proof that the microvm tier's guest image boots: Debian's kernel + thaw's initramfs + an
//! ext4 rootfs, under QEMU TCG (no KVM needed). Runs wherever `qemu-system-x86_64` is
//! installed (CI installs it via scripts/install-deps.sh); skips with a printed reason
//! elsewhere. Each boot takes tens of seconds of emulation, so boots are serialised.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thaw_microvm::image::{self, ImageCache, RootfsSpec};
use thaw_microvm::qemu::{QemuSpec, QemuVm};
use thaw_protocol::{HandlerConfig, HandlerMode, Response};

/// One emulated guest at a time: two would fight over the two cores and both time out.
static BOOTS: Mutex<()> = Mutex::new(());

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn qemu_available() -> Result<(), String> {
    match std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)".into()),
    }
}

fn busybox() -> Result<PathBuf, String> {
    let p = PathBuf::from("/bin/busybox");
    if p.exists() {
        Ok(p)
    } else {
        Err("/bin/busybox missing (apt-get install busybox-static)".into())
    }
}

/// Persistent cache under the target dir so the kernel is downloaded and built once.
fn cache() -> ImageCache {
    let dir = std::env::var_os("THAW_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("thaw-image-cache"));
    ImageCache::new(dir).expect("image cache dir")
}

fn guest_image() -> image::GuestImage {
    let t = Instant::now();
    let img = image::build_guest_image(&cache(), &busybox().unwrap(), "/sbin/thaw-init")
        .expect("kernel + initramfs build");
    eprintln!(
        "guest image ready in {:?}: kernel {} ({}), initramfs {}",
        t.elapsed(),
        img.kernel.release,
        img.kernel.vmlinux.display(),
        img.initramfs.display()
    );
    img
}

/// A minimal rootfs: busybox at /bin/busybox (+ /bin/sh), and `init` at /sbin/thaw-init.
/// Returns a private copy of the image (the guest writes to its disk) in a directory that is
/// removed when the returned guard drops, even if the test panics.
fn rootfs(init: &Path) -> (tempfile::TempDir, PathBuf) {
    let src = tempfile::tempdir().unwrap();
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "run"] {
        std::fs::create_dir_all(src.path().join(d)).unwrap();
    }
    std::fs::copy(busybox().unwrap(), src.path().join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", src.path().join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("busybox", src.path().join("bin/cat")).unwrap();
    std::os::unix::fs::symlink("busybox", src.path().join("bin/echo")).unwrap();
    let img = image::build_rootfs(
        &cache(),
        &RootfsSpec {
            source_dir: src.path(),
            guest_init: init,
            init_path: "/sbin/thaw-init",
            disk_limit_mib: 512,
            headroom_mib: 32,
        },
    )
    .expect("rootfs build");
    let dir = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir()
        .unwrap();
    let private = dir.path().join("rootfs.ext4");
    std::fs::copy(&img, &private).unwrap();
    (dir, private)
}

/// QEMU (the test is ignored where it is missing) and busybox: a host that has QEMU but not
/// the rest of `make deps` is a broken setup, and fails naming the fix.
fn ready_to_boot() {
    if let Err(why) = qemu_available().and_then(|_| busybox().map(|_| ())) {
        panic!("cannot boot the guest image: {why}");
    }
}

/// The static guest-init: `THAW_GUEST_INIT`, else the one `make guest-init` builds.
fn guest_init() -> PathBuf {
    let p = std::env::var_os("THAW_GUEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/static/x86_64-unknown-linux-gnu/release/guest-init")
        });
    assert!(
        p.is_file(),
        "no static guest-init at {} (run `make guest-init`, or point THAW_GUEST_INIT at one)",
        p.display()
    );
    p
}

fn workdir(name: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir()
        .unwrap()
        .keep()
}

#[test]
#[cfg_attr(
    thaw_no_qemu,
    ignore = "this host has no qemu-system-x86_64 (apt-get install qemu-system-x86)"
)]
fn guest_image_boots_to_userspace_under_tcg() {
    ready_to_boot();
    let _serial = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let img = guest_image();
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        "#!/bin/busybox sh\n/bin/busybox echo THAW-ROOTFS-REACHED pid=$$\n/bin/busybox poweroff -f\n",
    )
    .unwrap();
    let (_disk_dir, disk) = rootfs(script.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let spec = QemuSpec::new(
            &img.kernel.bz_image,
            &img.initramfs,
            &disk,
            &workdir("qemu-marker-"),
        );
        let mut vm = QemuVm::boot(&spec).await.expect("qemu starts");
        let t = vm
            .wait_for_console("THAW-ROOTFS-REACHED pid=1", BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("QEMU TCG: kernel -> initramfs -> switch_root -> /sbin/thaw-init in {t:?}");
        let status = vm.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.is_some(),
            "guest did not power off; console:\n{}",
            vm.console_tail(20)
        );
    });
}

#[test]
#[cfg_attr(
    thaw_no_qemu,
    ignore = "this host has no qemu-system-x86_64 (apt-get install qemu-system-x86)"
)]
fn guest_init_answers_over_virtio_serial_under_tcg() {
    ready_to_boot();
    let guest_init = guest_init();
    let _serial = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let img = guest_image();
    let (_disk_dir, disk) = rootfs(&guest_init);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let spec = QemuSpec::new(
            &img.kernel.bz_image,
            &img.initramfs,
            &disk,
            &workdir("qemu-agent-"),
        );
        let mut vm = QemuVm::boot(&spec).await.expect("qemu starts");
        let mut agent = vm
            .wait_agent_ready(BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "QEMU TCG: guest-init answered Ping {:?} after start",
            vm.elapsed()
        );
        let tail = |vm: &QemuVm| vm.console_tail(30);
        let step = Duration::from_secs(60);

        let name = agent
            .hello(step)
            .await
            .unwrap_or_else(|e| panic!("hello: {e}\n{}", tail(&vm)));
        eprintln!("hello: agent {name}");
        agent
            .ping(step)
            .await
            .unwrap_or_else(|e| panic!("ping: {e}\n{}", tail(&vm)));

        let out = agent
            .exec(&["/bin/busybox", "echo", "hi"], step)
            .await
            .unwrap_or_else(|e| panic!("exec: {e}\n{}", tail(&vm)));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
        assert!(out.outcome.success(), "{:?}", out.outcome);

        agent
            .configure(
                HandlerConfig {
                    command: vec!["/bin/sh".into(), "-c".into(), "cat".into()],
                    mode: HandlerMode::Exec,
                    cwd: None,
                    env: Default::default(),
                    start_timeout_ms: None,
                },
                step,
            )
            .await
            .unwrap_or_else(|e| panic!("configure: {e}\n{}", tail(&vm)));
        let payload = serde_json::json!({"question": 42, "list": [1, 2, 3]});
        match agent
            .invoke(payload.clone(), step)
            .await
            .unwrap_or_else(|e| panic!("invoke: {e}\n{}", tail(&vm)))
        {
            Response::InvokeResult { status, result, .. } => {
                assert_eq!(status.as_str(), "ok");
                assert_eq!(result, Some(payload));
            }
            other => panic!("unexpected {other:?}"),
        }
        eprintln!(
            "QEMU TCG: hello, ping, exec, configure+invoke done at {:?}",
            vm.elapsed()
        );
    });
}

/// The memory floor `min_guest_memory_mib` computes is enough: QEMU boots the PVH `vmlinux`
/// itself (its PVH loader, like Cloud Hypervisor's, puts every PT_LOAD segment at its
/// physical address), with exactly that much RAM, to a guest-init that runs a command.
#[test]
#[cfg_attr(
    thaw_no_qemu,
    ignore = "this host has no qemu-system-x86_64 (apt-get install qemu-system-x86)"
)]
fn guest_init_answers_at_the_memory_floor_under_tcg() {
    ready_to_boot();
    let guest_init = guest_init();
    let _serial = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let img = guest_image();
    let floor = image::min_guest_memory_mib(&img.kernel.vmlinux, &img.initramfs).unwrap();
    let (_disk_dir, disk) = rootfs(&guest_init);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut spec = QemuSpec::new(
            &img.kernel.vmlinux,
            &img.initramfs,
            &disk,
            &workdir("qemu-floor-"),
        );
        spec.memory_mib = u32::try_from(floor).unwrap();
        let mut vm = QemuVm::boot(&spec).await.expect("qemu starts");
        let mut agent = vm
            .wait_agent_ready(BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("at {floor} MiB: {e}"));
        let step = Duration::from_secs(60);
        let out = agent
            .exec(
                &[
                    "/bin/busybox",
                    "sh",
                    "-c",
                    "echo hi; grep MemTotal /proc/meminfo",
                ],
                step,
            )
            .await
            .unwrap_or_else(|e| panic!("exec: {e}\n{}", vm.console_tail(30)));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("hi\n"), "{text}");
        eprintln!(
            "QEMU TCG PVH at the floor of {floor} MiB: guest-init ran a command at {:?}; {}",
            vm.elapsed(),
            text.lines().nth(1).unwrap_or("")
        );
    });
}
