//! Self-test of `fake-cloud-hypervisor`, the Cloud Hypervisor test double, driven by the
//! microvm tier's real client code (`thaw_microvm`): boot, hybrid vsock, guest-init's
//! protocol, pause, snapshot, restore into a second VMM from a copied disk, and cleanup when
//! the fake is killed. Needs root (loop mounts, namespaces), a static guest-init
//! (`THAW_GUEST_INIT` or target/static/...), mkfs.ext4 and /bin/busybox, all of which
//! `make test` provides: a missing one fails the test, naming it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use thaw_microvm::agent::AgentConn;
use thaw_microvm::api::{
    file_url, ApiClient, ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, MemoryRestoreMode,
    PayloadConfig, RestoreConfig, RngConfig, VmConfig, VmSnapshotConfig, VmState, VsockConfig,
};
use thaw_microvm::disk::{create_overlay, ImageType};
use thaw_microvm::restore::{materialise, CloneRewrite};
use thaw_microvm::{RestoreOptions, Vm, VmSpec};
use thaw_protocol::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");
const T: Duration = Duration::from_secs(10);
const BUSYBOX_APPLETS: [&str; 6] = ["sh", "echo", "cat", "sleep", "hostname", "date"];

/// Everything the tests need: an ext4 image with guest-init and busybox, and stand-in
/// kernel/initramfs files (the fake only checks that they exist).
struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
}

fn guest_init() -> PathBuf {
    std::env::var_os("THAW_GUEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/static/x86_64-unknown-linux-gnu/release/guest-init")
        })
}

fn fixture() -> Option<Fixture> {
    match try_fixture() {
        Ok(f) => Some(f),
        Err(why) => panic!("the fake Cloud Hypervisor's fixture cannot be set up: {why}"),
    }
}

fn try_fixture() -> Result<Fixture, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (loop mounts and namespaces)".into());
    }
    let init = guest_init();
    if !init.is_file() {
        return Err(format!(
            "no static guest-init at {} (set THAW_GUEST_INIT)",
            init.display()
        ));
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err("/bin/busybox missing (apt-get install busybox-static)".into());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let src = dir.path().join("rootfs");
    std::fs::create_dir_all(src.join("sbin")).unwrap();
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::copy(&init, src.join("sbin/thaw-init")).unwrap();
    std::fs::copy(busybox, src.join("bin/busybox")).unwrap();
    for applet in BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", src.join("bin").join(applet)).unwrap();
    }
    let image = dir.path().join("rootfs.ext4");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .arg("-q")
        .arg("-d")
        .arg(&src)
        .arg(&image)
        .arg("64M")
        .output()
        .map_err(|e| format!("mkfs.ext4 not runnable: {e}"))?;
    if !mkfs.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        ));
    }
    let kernel = dir.path().join("vmlinux");
    let initramfs = dir.path().join("initramfs.cpio.zst");
    std::fs::write(&kernel, b"not a kernel: the fake only checks it exists").unwrap();
    std::fs::write(&initramfs, b"not an initramfs").unwrap();
    Ok(Fixture {
        dir,
        image,
        kernel,
        initramfs,
    })
}

/// One fake VMM process in its own directory.
struct Fake {
    child: tokio::process::Child,
    dir: PathBuf,
    api: ApiClient,
}

impl Fake {
    async fn start(dir: &Path) -> Fake {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("api.sock");
        let log = std::fs::File::create(dir.join("vmm.log")).unwrap();
        let child = tokio::process::Command::new(FAKE)
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let fake = Fake {
            child,
            dir: dir.to_owned(),
            api: ApiClient::new(socket),
        };
        let deadline = Instant::now() + T;
        loop {
            match fake.api.ping().await {
                Ok(p) => {
                    assert_eq!(p.version, "53.0.0");
                    assert_eq!(p.build_version, "v53.0-thaw-fake");
                    return fake;
                }
                Err(e) if Instant::now() > deadline => panic!("fake never answered: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default()
    }

    fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    async fn state(&self) -> VmState {
        self.api.info().await.unwrap().state
    }
}

fn vm_config(f: &Fixture, vm_dir: &Path, cid: u32) -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: Some(f.kernel.clone()),
            cmdline: Some(thaw_microvm::vm::DEFAULT_CMDLINE.into()),
            initramfs: Some(f.initramfs.clone()),
        },
        cpus: Some(CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }),
        memory: Some(MemoryConfig {
            size: 256 << 20,
            shared: false,
            hugepages: false,
            prefault: false,
            thp: true,
        }),
        disks: Some(vec![DiskConfig::writable(f.image.clone(), ImageType::Raw)]),
        vsock: Some(VsockConfig {
            cid,
            socket: vm_dir.join("vsock.sock"),
        }),
        serial: Some(ConsoleConfig::file(vm_dir.join("console.log"))),
        console: Some(ConsoleConfig::off()),
        rng: Some(RngConfig {
            src: "/dev/urandom".into(),
        }),
        net: None,
    }
}

/// The hybrid vsock handshake by hand, retried until guest-init listens.
async fn connect_agent(vsock: &Path) -> AgentConn<UnixStream> {
    let deadline = Instant::now() + T;
    loop {
        if let Some(s) = try_connect(vsock).await {
            let mut conn = AgentConn::new(s);
            if conn.ping(T).await.is_ok() {
                return conn;
            }
        }
        assert!(
            Instant::now() < deadline,
            "guest-init never answered on {vsock:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn try_connect(vsock: &Path) -> Option<UnixStream> {
    let mut s = UnixStream::connect(vsock).await.ok()?;
    s.write_all(b"CONNECT 1024\n").await.ok()?;
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.ok()?; // closed without answer: not listening yet
        if b == b'\n' {
            break;
        }
        line.push(b);
    }
    let line = String::from_utf8(line).unwrap();
    let port = line.strip_prefix("OK ").expect("handshake answer");
    port.parse::<u32>().expect("host port number");
    Some(s)
}

async fn sh(conn: &mut AgentConn<UnixStream>, script: &str) -> String {
    let out = conn.exec(&["/bin/sh", "-c", script], T).await.unwrap();
    assert!(
        out.outcome.success(),
        "{script}: {:?} {}",
        out.outcome,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The host's identity and clock, to prove the guest cannot change them.
struct HostWitness {
    hostname: std::ffi::OsString,
    wall: SystemTime,
    mono: Instant,
}

impl HostWitness {
    fn take() -> Self {
        HostWitness {
            hostname: nix::unistd::gethostname().unwrap(),
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    fn assert_unchanged(&self) {
        assert_eq!(
            nix::unistd::gethostname().unwrap(),
            self.hostname,
            "host hostname changed"
        );
        let expected = self.wall + self.mono.elapsed();
        let now = SystemTime::now();
        let drift = now
            .duration_since(expected)
            .unwrap_or_else(|e| e.duration());
        assert!(
            drift < Duration::from_secs(5),
            "host clock moved by {drift:?}"
        );
    }
}

/// Sets the guest's identity and clock through guest-init, as clone hygiene does.
async fn hygiene(conn: &mut AgentConn<UnixStream>) {
    let r = conn
        .call(
            "set_identity",
            &Request::SetIdentity {
                hostname: "fake-guest".into(),
                sandbox_id: "sb-selftest".into(),
            },
            T,
        )
        .await
        .unwrap();
    assert_eq!(r.last(), Some(&Response::Ok), "{r:?}");
    // 2001-09-09: far enough from now that a changed host clock would show.
    let r = conn
        .call(
            "set_clock",
            &Request::SetClock {
                unix_nanos: 1_000_000_000_000_000_000,
            },
            T,
        )
        .await
        .unwrap();
    // Without CAP_SYS_TIME guest-init reports the clock as shared with the host.
    assert_eq!(r.last(), Some(&Response::Clock { applied: false }), "{r:?}");
}

/// Processes below `root` (by parent pid), with their state letter.
fn descendants(root: i32) -> Vec<(i32, char, String)> {
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut f = stat[close + 1..].split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        all.push((pid, ppid, state, cmd));
    }
    let mut out = Vec::new();
    let mut parents = vec![root];
    while let Some(p) = parents.pop() {
        for (pid, ppid, state, cmd) in &all {
            if *ppid == p {
                out.push((*pid, *state, cmd.clone()));
                parents.push(*pid);
            }
        }
    }
    out
}

fn guest_init_pid(fake: i32) -> i32 {
    descendants(fake)
        .into_iter()
        .find(|(_, _, cmd)| cmd.starts_with("/sbin/thaw-init"))
        .map(|(pid, _, _)| pid)
        .expect("guest-init runs below the fake")
}

#[tokio::test]
async fn boot_exec_pause_snapshot_restore() {
    let Some(f) = fixture() else { return };
    let host = HostWitness::take();
    let vm1 = f.dir.path().join("vm1");
    let fake = Fake::start(&vm1).await;

    // Client mistakes are refused as Cloud Hypervisor refuses them.
    let e = fake.api.boot().await.unwrap_err().to_string();
    assert!(e.contains("VM is not created"), "{e}");
    let mut bad = vm_config(&f, &vm1, 2);
    let e = fake.api.create(&bad).await.unwrap_err().to_string();
    assert!(e.contains("CID"), "{e}");
    bad = vm_config(&f, &vm1, 3);
    bad.disks = Some(vec![DiskConfig::writable(
        "/nonexistent.ext4".into(),
        ImageType::Raw,
    )]);
    assert!(fake.api.create(&bad).await.is_err());
    // A raw image declared qcow2 fails the boot, as Cloud Hypervisor's type check does.
    bad.disks = Some(vec![DiskConfig::writable(
        f.image.clone(),
        ImageType::Qcow2,
    )]);
    fake.api.create(&bad).await.unwrap();
    let e = fake.api.boot().await.unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
    fake.api.delete().await.unwrap();

    fake.api.create(&vm_config(&f, &vm1, 3)).await.unwrap();
    assert_eq!(fake.state().await, VmState::Created);
    let e = fake
        .api
        .create(&vm_config(&f, &vm1, 3))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already created"), "{e}");
    fake.api.boot().await.unwrap();
    assert_eq!(fake.state().await, VmState::Running);

    let mut conn = connect_agent(&fake.vsock()).await;
    assert_eq!(sh(&mut conn, "echo hi > /f; cat /f").await, "hi\n");
    hygiene(&mut conn).await;
    assert_eq!(sh(&mut conn, "hostname").await, "fake-guest\n");
    host.assert_unchanged();
    // Another guest port: nothing listens there, the fake closes the stream.
    let mut other = UnixStream::connect(fake.vsock()).await.unwrap();
    other.write_all(b"CONNECT 2000\n").await.unwrap();
    assert_eq!(other.read_u8().await.ok(), None);

    let e = fake
        .api
        .snapshot(&snap_cfg(f.dir.path()), T)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("VM is not paused"), "{e}");
    fake.api.pause().await.unwrap();
    assert_eq!(fake.state().await, VmState::Paused);
    let init = guest_init_pid(fake.pid());
    assert_eq!(
        descendants(fake.pid())
            .iter()
            .find(|d| d.0 == init)
            .unwrap()
            .1,
        'T'
    );
    assert!(fake.api.pause().await.is_err(), "pausing twice");

    let snap = f.dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    fake.api.snapshot(&snap_cfg(f.dir.path()), T).await.unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["vsock"]["socket"],
        vm1.join("vsock.sock").to_str().unwrap()
    );
    assert_eq!(cfg["disks"][0]["path"], f.image.to_str().unwrap());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["thaw_fake"], true);
    assert!(snap.join("memory-ranges").is_file());

    // The clone's disk is a qcow2 overlay of the paused VM's disk (pause flushed the
    // guest's writes); the fake mounts it through a raw scratch copy.
    let vm2 = f.dir.path().join("vm2");
    std::fs::create_dir_all(&vm2).unwrap();
    let disk2 = vm2.join("disk0.qcow2");
    create_overlay(&f.image, &disk2).unwrap();

    fake.api.shutdown().await.unwrap();
    assert_eq!(fake.state().await, VmState::Shutdown);
    assert!(!fake.vsock().exists(), "vsock socket removed on shutdown");
    fake.api.vmm_shutdown().await.unwrap();
    let mut fake = fake;
    let status = tokio::time::timeout(T, fake.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}\n{}", fake.log());
    assert!(!vm1.join("api.sock").exists());

    let rw = CloneRewrite {
        vsock_socket: vm2.join("vsock.sock"),
        cid: 4,
        disks: vec![disk2],
        serial_log: vm2.join("console.log"),
        console_log: vm2.join("virtio-console.log"),
    };
    materialise(&snap, &vm2.join("snapshot"), &rw).unwrap();
    let fake2 = Fake::start(&vm2).await;
    let restore = RestoreConfig {
        source_url: file_url(&vm2.join("snapshot")),
        prefault: false,
        memory_restore_mode: MemoryRestoreMode::OnDemand,
        resume: false,
    };
    fake2.api.restore(&restore, T).await.unwrap();
    assert_eq!(fake2.state().await, VmState::Paused);
    let e = fake2
        .api
        .restore(&restore, T)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already created"), "{e}");
    fake2.api.resume().await.unwrap();
    assert_eq!(fake2.state().await, VmState::Running);
    assert_eq!(fake2.api.info().await.unwrap().config["vsock"]["cid"], 4);

    let mut conn = connect_agent(&fake2.vsock()).await;
    // The disk survived; the hostname (guest memory) did not: restore boots afresh.
    assert_eq!(sh(&mut conn, "cat /f").await, "hi\n");
    assert_ne!(sh(&mut conn, "hostname").await, "fake-guest\n");
    // The clone's writes reach its overlay at pause, never the base.
    sh(&mut conn, "echo clone > /c").await;
    fake2.api.pause().await.unwrap();
    let overlay = std::fs::read(vm2.join("disk0.qcow2")).unwrap();
    assert_eq!(&overlay[..4], b"QFI\xfb");
    assert!(
        overlay.windows(6).any(|w| w == b"clone\n"),
        "write not in the overlay"
    );
    fake2.api.resume().await.unwrap();
    fake2.api.delete().await.unwrap();
    assert!(fake2.api.info().await.is_err());
    assert!(!fake2.vsock().exists());
    host.assert_unchanged();
}

fn snap_cfg(dir: &Path) -> VmSnapshotConfig {
    VmSnapshotConfig {
        destination_url: file_url(&dir.join("snap")),
    }
}

/// The platform's own high-level path (`Vm::boot`, `Vm::restore`) against the fake: a base
/// VM snapshotted while paused and two clones restored from it side by side.
#[tokio::test]
async fn platform_vm_boot_and_clones() {
    let Some(f) = fixture() else { return };
    let host = HostWitness::take();
    let bin = Path::new(FAKE);
    let spec = VmSpec {
        kernel: f.kernel.clone(),
        initramfs: f.initramfs.clone(),
        cmdline: thaw_microvm::vm::DEFAULT_CMDLINE.into(),
        rootfs: f.image.clone(),
        vcpus: 1,
        memory_mib: 256,
        cid: 10,
        workdir: f.dir.path().join("base"),
        network: None,
    };
    let mut base = Vm::boot(&spec, bin).await.unwrap();
    base.wait_agent_ready(T).await.unwrap();
    assert_eq!(base.vmm_version(), "53.0.0");
    let mut conn = AgentConn::new(base.connect_agent(T).await.unwrap());
    sh(&mut conn, "echo warm > /warm").await;
    base.pause().await.unwrap();
    let snap = f.dir.path().join("snapshot");
    base.snapshot(&snap).await.unwrap();

    let mut clones = Vec::new();
    for (i, cid) in [11u32, 12].into_iter().enumerate() {
        let workdir = f.dir.path().join(format!("clone{i}"));
        let mut vm = Vm::restore(&snap, &workdir, RestoreOptions::new(cid), bin)
            .await
            .unwrap();
        vm.wait_agent_ready(T).await.unwrap();
        clones.push(vm);
    }
    for (i, vm) in clones.iter().enumerate() {
        let mut conn = AgentConn::new(vm.connect_agent(T).await.unwrap());
        assert_eq!(sh(&mut conn, "cat /warm").await, "warm\n");
        sh(&mut conn, &format!("echo {i} > /mine")).await;
        assert_eq!(sh(&mut conn, "cat /mine").await, format!("{i}\n"));
    }
    for vm in clones {
        let dir = vm.workdir().to_owned();
        vm.shutdown().await.unwrap();
        assert!(!dir.exists());
    }
    base.shutdown().await.unwrap();
    host.assert_unchanged();
}

/// Every process (ours included) whose mount table mentions `needle`.
fn processes_mounting(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .is_ok_and(|m| m.contains(needle))
        })
        .collect()
}

fn loop_devices_of(image: &Path) -> String {
    let out = std::process::Command::new("losetup")
        .arg("-j")
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn killed_fake_leaves_no_process_and_no_mount() {
    let Some(f) = fixture() else { return };
    // Orphans of the killed fake come to us (not the host's init), so we can reap them and
    // require every guest pid to be gone, zombies included.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let dir = f.dir.path().join("vm");
    let mut fake = Fake::start(&dir).await;
    fake.api.create(&vm_config(&f, &dir, 3)).await.unwrap();
    fake.api.boot().await.unwrap();
    let mut conn = connect_agent(&fake.vsock()).await;
    sh(&mut conn, "echo alive").await;
    // A long task in the guest, left running.
    let vsock = fake.vsock();
    let _sleeper = tokio::spawn(async move {
        let mut c = connect_agent(&vsock).await;
        let _ = c
            .exec(&["/bin/sleep", "1000"], Duration::from_secs(1000))
            .await;
    });
    let deadline = Instant::now() + T;
    while !descendants(fake.pid())
        .iter()
        .any(|d| d.2.starts_with("/bin/sleep 1000"))
    {
        assert!(Instant::now() < deadline, "the guest task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let guest: Vec<i32> = descendants(fake.pid()).into_iter().map(|d| d.0).collect();
    let init = guest_init_pid(fake.pid());
    let root = dir.join("fake-guest-root");
    assert!(
        !loop_devices_of(&f.image).is_empty(),
        "the disk is loop-mounted"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fake.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    fake.child.wait().await.unwrap();

    let deadline = Instant::now() + T;
    loop {
        for &p in &guest {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(p),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        let alive: Vec<i32> = guest
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        let mounting = processes_mounting(root.to_str().unwrap());
        let loops = loop_devices_of(&f.image);
        if alive.is_empty() && mounting.is_empty() && loops.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: processes {alive:?} (init {init}), mounted in {mounting:?}, loop {loops}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mine = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mine.contains(root.to_str().unwrap()));
}

/// guest-init's Shutdown request ends its PID namespace: like Cloud Hypervisor after a
/// guest-initiated power-off, the fake cleans up and exits.
#[tokio::test]
async fn guest_power_off_ends_the_vmm() {
    let Some(f) = fixture() else { return };
    let dir = f.dir.path().join("vm");
    let mut fake = Fake::start(&dir).await;
    fake.api.create(&vm_config(&f, &dir, 5)).await.unwrap();
    fake.api.boot().await.unwrap();
    let mut conn = connect_agent(&fake.vsock()).await;
    let _ = conn.call("shutdown", &Request::Shutdown, T).await;
    let status = tokio::time::timeout(T, fake.child.wait())
        .await
        .expect("the fake exits after the guest powers off")
        .unwrap();
    assert!(status.success(), "{status}\n{}", fake.log());
    assert!(fake.log().contains("guest powered off"), "{}", fake.log());
    assert!(!dir.join("api.sock").exists());
    assert!(!fake.vsock().exists());
    assert!(!dir.join("fake-guest-root").exists());
    assert_eq!(loop_devices_of(&f.image), "");
}
