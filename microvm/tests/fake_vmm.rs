//! The Cloud Hypervisor client and VM driver against a fake VMM: a hand-written HTTP/1.1
//! server on a real Unix socket that records requests and answers with Cloud Hypervisor's
//! documented bodies, errors, silence or a dropped connection. The fake "VMM process" is a
//! `sleep`, so process cleanup (kill, reap, directory removal) is checked for real.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thaw_microvm::api::{
    ApiClient, ClientError, ConsoleConfig, MemoryRestoreMode, PayloadConfig, VmConfig, VmState,
};
use thaw_microvm::{RestoreOptions, Vm, VmError, VmSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    body: String,
}

#[derive(Clone)]
enum Reply {
    Status(u16, &'static str),
    Silence,
    Close,
}

type Handler = Arc<dyn Fn(&str, &str) -> Reply + Send + Sync>;

async fn read_request(s: &mut UnixStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..header_end + len]).into_owned();
    Some(Recorded { method, path, body })
}

/// Serves `handler` on `socket` until the test ends; returns the request log.
fn serve(socket: PathBuf, handler: Handler) -> Arc<Mutex<Vec<Recorded>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    tokio::spawn(async move {
        let listener = UnixListener::bind(&socket).expect("bind fake api socket");
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let log = log2.clone();
            tokio::spawn(async move {
                while let Some(req) = read_request(&mut s).await {
                    let reply = handler(&req.method, &req.path);
                    log.lock().unwrap().push(req);
                    match reply {
                        Reply::Status(code, body) => {
                            let resp = format!(
                                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Reply::Silence => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        Reply::Close => return,
                    }
                }
            });
        }
    });
    log
}

const PING: &str =
    r#"{"build_version":"v53.0-0-g1234","version":"53.0","pid":1,"features":["kvm"]}"#;

fn ch_like(method: &str, path: &str) -> Reply {
    match (method, path) {
        ("GET", "/api/v1/vmm.ping") => Reply::Status(200, PING),
        ("GET", "/api/v1/vm.info") => Reply::Status(
            200,
            r#"{"config":{"cpus":{"boot_vcpus":1,"max_vcpus":1}},"state":"Running","memory_actual_size":536870912}"#,
        ),
        ("PUT", "/api/v1/vm.boot") => Reply::Status(
            500,
            r#"["Error from API","The VM could not boot","Cannot load kernel: bad ELF"]"#,
        ),
        ("PUT", "/api/v1/vm.pause") => Reply::Status(405, "Method Not Allowed"),
        ("PUT", _) => Reply::Status(204, ""),
        _ => Reply::Status(404, ""),
    }
}

#[tokio::test]
async fn client_sends_documented_requests_and_maps_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let log = serve(sock.clone(), Arc::new(ch_like));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let api = ApiClient::new(&sock).with_timeout(Duration::from_secs(2));

    let ping = api.ping().await.unwrap();
    assert_eq!(ping.version, "53.0");

    let cfg = VmConfig {
        payload: PayloadConfig {
            kernel: Some("/k/vmlinux".into()),
            cmdline: Some("console=ttyS0".into()),
            initramfs: None,
        },
        cpus: None,
        memory: None,
        disks: None,
        vsock: None,
        serial: Some(ConsoleConfig::off()),
        console: None,
        rng: None,
        net: None,
    };
    api.create(&cfg).await.unwrap();
    let info = api.info().await.unwrap();
    assert_eq!(info.state, VmState::Running);

    match api.boot().await.unwrap_err() {
        ClientError::Api(e) => {
            assert_eq!(e.endpoint, "vm.boot");
            assert_eq!(e.status, 500);
            assert_eq!(e.causes.len(), 3);
            assert!(e
                .to_string()
                .ends_with("The VM could not boot: Cannot load kernel: bad ELF"));
        }
        other => panic!("expected an ApiError, got {other}"),
    }
    match api.pause().await.unwrap_err() {
        ClientError::Api(e) => {
            assert_eq!(e.status, 405);
            assert_eq!(e.causes, vec!["Method Not Allowed"]);
        }
        other => panic!("expected an ApiError, got {other}"),
    }

    let log = log.lock().unwrap().clone();
    let create = log.iter().find(|r| r.path == "/api/v1/vm.create").unwrap();
    assert_eq!(create.method, "PUT");
    let body: serde_json::Value = serde_json::from_str(&create.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"payload": {"kernel": "/k/vmlinux", "cmdline": "console=ttyS0"},
                           "serial": {"mode": "Off"}})
    );
    assert!(log
        .iter()
        .any(|r| r.method == "GET" && r.path == "/api/v1/vmm.ping"));
    assert!(log
        .iter()
        .any(|r| r.method == "PUT" && r.path == "/api/v1/vm.boot" && r.body.is_empty()));
}

#[tokio::test]
async fn silent_vmm_is_a_typed_timeout_and_dropped_connection_is_http_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    serve(
        sock.clone(),
        Arc::new(|_: &str, p: &str| {
            if p.ends_with("vm.restore") {
                Reply::Close
            } else {
                Reply::Silence
            }
        }),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let api = ApiClient::new(&sock).with_timeout(Duration::from_millis(300));
    let t = std::time::Instant::now();
    let e = api.ping().await.unwrap_err();
    assert!(
        matches!(e, ClientError::Timeout { ref endpoint, .. } if endpoint == "vmm.ping"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    let e = api
        .restore(
            &thaw_microvm::api::RestoreConfig {
                source_url: "file:///x".into(),
                prefault: false,
                memory_restore_mode: MemoryRestoreMode::OnDemand,
                resume: true,
            },
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Http { .. }), "{e}");
    let e = ApiClient::new(dir.path().join("missing.sock"))
        .ping()
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
}

/// A fake `cloud-hypervisor`: a process that only sleeps, plus an in-test API server bound to
/// its socket path once the VMM directory is set up (its `vmm.log` exists, so stale-socket
/// removal is over).
fn fake_vmm_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("fake-cloud-hypervisor");
    std::fs::write(&bin, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bin
}

fn serve_when_spawned(workdir: PathBuf, handler: Handler) {
    tokio::spawn(async move {
        for _ in 0..500 {
            if workdir.join(thaw_microvm::vmm::VMM_LOG).exists() {
                serve(workdir.join("api.sock"), handler);
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

fn process_gone(pid: u32) -> bool {
    // After kill + reap the pid no longer exists (signal 0 only checks).
    unsafe { libc::kill(pid as i32, 0) != 0 }
}

fn snapshot_dir(root: &Path) -> PathBuf {
    let snap = root.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let disk = root.join("base.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let cfg = serde_json::json!({
        "payload": {"kernel": "/k/vmlinux"},
        "disks": [{"path": disk, "readonly": false}],
        "vsock": {"cid": 3, "socket": root.join("base/vsock.sock")},
        "serial": {"mode": "File", "file": root.join("base/console.log")}
    });
    std::fs::write(snap.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(snap.join("state.json"), "{}").unwrap();
    std::fs::write(snap.join("memory-ranges"), [0u8; 4096]).unwrap();
    snap
}

#[tokio::test]
async fn vmm_hanging_mid_restore_is_killed_and_cleaned_up() {
    let root = tempfile::tempdir().unwrap();
    let bin = fake_vmm_bin(root.path());
    let snap = snapshot_dir(root.path());
    let workdir = root.path().join("clone1");
    serve_when_spawned(
        workdir.clone(),
        Arc::new(|_: &str, p: &str| {
            if p.ends_with("vmm.ping") {
                Reply::Status(200, PING)
            } else {
                Reply::Silence
            }
        }),
    );
    let mut opts = RestoreOptions::new(42);
    opts.restore_timeout = Duration::from_millis(500);
    let e = Vm::restore(&snap, &workdir, opts, &bin).await.unwrap_err();
    match &e {
        VmError::Setup {
            step,
            source: ClientError::Timeout { .. },
        } => assert_eq!(*step, "vm.restore"),
        other => panic!("expected a restore timeout, got {other}"),
    }
    assert!(e.to_string().contains("VMM killed"), "{e}");
    assert!(!workdir.exists(), "workdir must be removed");
    // The snapshot itself is untouched.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vsock"]["cid"], 3);
}

#[tokio::test]
async fn vmm_crashing_mid_restore_is_an_error_and_cleaned_up() {
    let root = tempfile::tempdir().unwrap();
    let bin = fake_vmm_bin(root.path());
    let snap = snapshot_dir(root.path());
    let workdir = root.path().join("clone2");
    serve_when_spawned(
        workdir.clone(),
        Arc::new(|_: &str, p: &str| {
            if p.ends_with("vmm.ping") {
                Reply::Status(200, PING)
            } else {
                Reply::Close
            }
        }),
    );
    let e = Vm::restore(&snap, &workdir, RestoreOptions::new(43), &bin)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            VmError::Setup {
                step: "vm.restore",
                source: ClientError::Http { .. }
            }
        ),
        "{e}"
    );
    assert!(!workdir.exists());
}

#[tokio::test]
async fn restore_request_points_at_a_private_rewritten_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let bin = fake_vmm_bin(root.path());
    let snap = snapshot_dir(root.path());
    let workdir = root.path().join("clone3");
    let captured = Arc::new(Mutex::new(None::<serde_json::Value>));
    let cap = captured.clone();
    let wd = workdir.clone();
    serve_when_spawned(
        workdir.clone(),
        Arc::new(move |_: &str, p: &str| {
            if p.ends_with("vm.restore") {
                // The VMM would read config.json now: capture what it would see.
                let cfg = std::fs::read(wd.join("snapshot/config.json")).unwrap();
                *cap.lock().unwrap() = Some(serde_json::from_slice(&cfg).unwrap());
            }
            if p.ends_with("vmm.ping") {
                Reply::Status(200, PING)
            } else {
                Reply::Status(204, "")
            }
        }),
    );
    let vm = Vm::restore(&snap, &workdir, RestoreOptions::new(44), &bin)
        .await
        .unwrap();
    let pid = vm.vmm_pid().unwrap();
    let cfg = captured
        .lock()
        .unwrap()
        .clone()
        .expect("vm.restore was called");
    assert_eq!(cfg["vsock"]["cid"], 44);
    assert_eq!(
        cfg["vsock"]["socket"],
        workdir.join("vsock.sock").to_str().unwrap()
    );
    // The clone's disk is a qcow2 overlay of the snapshot's raw disk, declared as such.
    assert_eq!(
        cfg["disks"][0]["path"],
        workdir.join("disk0.qcow2").to_str().unwrap()
    );
    assert_eq!(cfg["disks"][0]["image_type"], "Qcow2");
    assert_eq!(cfg["disks"][0]["backing_files"], true);
    assert!(workdir.join("disk0.qcow2").exists());
    assert_eq!(
        cfg["serial"]["file"],
        workdir
            .join(thaw_microvm::vm::CONSOLE_LOG)
            .to_str()
            .unwrap()
    );
    vm.shutdown().await.unwrap();
    assert!(!workdir.exists());
    assert!(process_gone(pid));
}

#[tokio::test]
async fn guest_never_ready_is_a_typed_error_with_console_tail_and_drop_cleans_up() {
    let root = tempfile::tempdir().unwrap();
    let bin = fake_vmm_bin(root.path());
    let workdir = root.path().join("vm");
    serve_when_spawned(
        workdir.clone(),
        Arc::new(|_: &str, p: &str| {
            if p.ends_with("vmm.ping") {
                Reply::Status(200, PING)
            } else {
                Reply::Status(204, "")
            }
        }),
    );
    let spec = VmSpec {
        kernel: "/k/vmlinux".into(),
        initramfs: "/k/initramfs".into(),
        cmdline: thaw_microvm::vm::DEFAULT_CMDLINE.into(),
        rootfs: root.path().join("rootfs.ext4"),
        vcpus: 1,
        memory_mib: 256,
        cid: 5,
        workdir: workdir.clone(),
        network: None,
    };
    let mut vm = Vm::boot(&spec, &bin).await.unwrap();
    std::fs::write(
        workdir.join(thaw_microvm::vm::CONSOLE_LOG),
        "[    0.1] Linux version 6.1\nkernel panic: no init\n",
    )
    .unwrap();
    let pid = vm.vmm_pid().unwrap();
    let e = vm
        .wait_agent_ready(Duration::from_millis(400))
        .await
        .unwrap_err();
    match &e {
        VmError::GuestNotReady {
            timeout,
            console_tail,
            ..
        } => {
            assert_eq!(*timeout, Duration::from_millis(400));
            assert!(console_tail.contains("kernel panic: no init"));
        }
        other => panic!("expected GuestNotReady, got {other}"),
    }
    // A second boot into the same, non-empty workdir is refused.
    let e2 = Vm::boot(&spec, &bin).await.unwrap_err();
    assert!(matches!(e2, VmError::WorkdirInUse(_)), "{e2}");
    drop(vm);
    assert!(!workdir.exists());
    assert!(process_gone(pid));
}

#[tokio::test]
async fn missing_binary_is_typed_and_leaves_no_workdir() {
    let root = tempfile::tempdir().unwrap();
    let workdir = root.path().join("vm");
    let spec = VmSpec {
        kernel: "/k/vmlinux".into(),
        initramfs: "/k/initramfs".into(),
        cmdline: String::new(),
        rootfs: root.path().join("rootfs.ext4"),
        vcpus: 1,
        memory_mib: 256,
        cid: 5,
        workdir: workdir.clone(),
        network: None,
    };
    let e = Vm::boot(&spec, Path::new("/nonexistent/cloud-hypervisor"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            VmError::Vmm(thaw_microvm::vmm::VmmError::BinaryNotFound { .. })
        ),
        "{e}"
    );
    assert!(!workdir.exists());
}

/// A VM restored `OnDemand` is refused a snapshot until its background fill is done (Cloud
/// Hypervisor answers 500 "VM on-demand memory restore is still in progress"; the first
/// real run of a session paused right after its resume met it): `Vm::snapshot` waits and
/// retries instead of failing the pause.
#[tokio::test]
async fn snapshot_waits_for_an_on_demand_restore_to_finish() {
    let root = tempfile::tempdir().unwrap();
    let bin = fake_vmm_bin(root.path());
    let snap = snapshot_dir(root.path());
    let workdir = root.path().join("clone-busy");
    let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = refusals.clone();
    serve_when_spawned(
        workdir.clone(),
        Arc::new(move |_: &str, p: &str| {
            if p.ends_with("vmm.ping") {
                Reply::Status(200, PING)
            } else if p.ends_with("vm.snapshot")
                && r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3
            {
                Reply::Status(
                    500,
                    r#"["Error from API","The VM could not be snapshotted","VM on-demand memory restore is still in progress"]"#,
                )
            } else {
                Reply::Status(204, "")
            }
        }),
    );
    let vm = Vm::restore(&snap, &workdir, RestoreOptions::new(45), &bin)
        .await
        .unwrap();
    vm.snapshot(&root.path().join("out")).await.unwrap();
    assert_eq!(
        refusals.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "three refusals, then the snapshot"
    );
    vm.shutdown().await.unwrap();
}
