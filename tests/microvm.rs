//! The microvm tier through the real `thaw` binary.
//!
//! * `real_cloud_hypervisor_*`: publish, invoke, exec and a session's pause and resume on
//!   Cloud Hypervisor. They run where `cloud-hypervisor` and hardware KVM exist, and print
//!   `skipping: <reason>` elsewhere (this project's CI machines have a PVM `/dev/kvm`).
//! * `test_double_*`: the same engine code against `fake-cloud-hypervisor`
//!   (tests/fake_ch), a TEST DOUBLE that serves Cloud Hypervisor's REST API and hybrid
//!   vsock but runs the guest's init as a namespaced process on the loop-mounted disk
//!   instead of a VM. It cannot capture memory: a "restore" boots the snapshot's disk
//!   afresh. So these tests check what does not depend on guest memory: the guest image
//!   pipeline (Debian kernel, initramfs, ext4 rootfs with guest-init), tier selection, the
//!   API calls and their order, the snapshot's disk taken at the pause, every clone's own
//!   disk, socket and CID, session pause/resume through the store, and crash cleanup of
//!   orphaned VMMs. Memory (a warm handler, a running process) is checked only by the real
//!   tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thaw_e2e::Home;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

/// Why the real microvm tier cannot run here, if it cannot.
fn real_tier_unavailable() -> Option<String> {
    match thaw_platform::microvm::availability() {
        Ok(_) if std::env::var_os("THAW_MICROVM_TEST_DOUBLE").is_none() => None,
        Ok(_) => Some("THAW_MICROVM_TEST_DOUBLE is set".into()),
        Err(why) => Some(why),
    }
}

/// A home whose thaw runs templates on the microvm tier through the test double.
fn double_home() -> Home {
    let mut home = Home::new();
    home.env.push(("THAW_CLOUD_HYPERVISOR".into(), FAKE.into()));
    home.env
        .push(("THAW_MICROVM_TEST_DOUBLE".into(), "1".into()));
    home.env.push(("THAW_TIER".into(), "microvm".into()));
    home
}

/// A busybox template whose warm-up leaves a mark on the disk before the snapshot.
fn warm_template(dir: &Path, name: &str, tier: &str) -> PathBuf {
    let t = dir.join(name);
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        t.join("template.toml"),
        format!(
            r#"name = "{name}"
tier = "{tier}"
base = {{ kind = "busybox" }}
[handler]
command = ["/bin/sh", "-c", "cat; echo"]
[warmup]
command = ["/bin/sh", "-c", "echo warmed-before-snapshot > /warm-marker; sync"]
[limits]
memory_mib = 128
disk_mib = 64
timeout_s = 20
"#
        ),
    )
    .unwrap();
    t
}

/// Runs a shell script in a session; returns its stdout.
fn session_sh(home: &Home, id: &str, script: &str) -> String {
    let out = home
        .run(&[
            "--json", "session", "exec", id, "--", "/bin/sh", "-c", script,
        ])
        .ok()
        .json();
    out["stdout"].as_str().unwrap_or_default().to_string()
}

fn vmm_processes(home: &Home) -> Vec<u32> {
    let needle = home.path().to_string_lossy().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("--api-socket") && cmdline.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn test_double_publish_exec_and_clone_isolation() {
    let home = double_home();
    let tpl = warm_template(home.path(), "warm", "auto");
    let t = home
        .run(&["--json", "deploy", tpl.to_str().unwrap()])
        .ok()
        .json();
    assert_eq!(t["tier"], "microvm", "{t}");
    assert!(t["snapshot"].is_string(), "{t}");
    let ls = home.run(&["templates", "ls"]).ok().stdout();
    assert!(ls.contains("microvm"), "{ls}");

    // Each exec restores a clone from the snapshot: the warm-up's mark is on its disk, and
    // what one clone writes is not on the next one's.
    for _ in 0..2 {
        let r = home
            .run(&[
                "--json",
                "exec",
                "warm",
                "--",
                "/bin/sh",
                "-c",
                "cat /warm-marker; test ! -e /mine && echo fresh; echo x > /mine; hostname",
            ])
            .ok()
            .json();
        let out = r["stdout"].as_str().unwrap_or_default().to_string();
        assert!(out.contains("warmed-before-snapshot"), "{r}");
        assert!(out.contains("fresh"), "{r}");
        assert_eq!(r["start"], "restore", "{r}");
        // Clone hygiene reached the guest: the hostname is the sandbox id.
        let id = r["sandbox_id"].as_str().unwrap();
        assert!(out.contains(id), "hostname is not {id}: {r}");
    }
    assert!(vmm_processes(&home).is_empty(), "VMMs left running");
    home.assert_clean();
}

#[test]
fn test_double_session_pause_and_resume_keep_the_disk() {
    let home = double_home();
    let tpl = warm_template(home.path(), "warm", "microvm");
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    let s = home.run(&["--json", "session", "new", "warm"]).ok().json();
    let id = s["id"].as_str().unwrap().to_string();
    session_sh(&home, &id, "echo kept > /data");
    let vmms = vmm_processes(&home);
    assert_eq!(vmms.len(), 1, "one VMM while running: {vmms:?}");

    // Twice: the second pause snapshots a VM that was itself resumed from a snapshot.
    for round in 1..=2 {
        let p = home.run(&["--json", "session", "pause", &id]).ok().json();
        assert_eq!(p["state"], "paused", "{p}");
        assert!(
            vmm_processes(&home).is_empty(),
            "a paused session holds no VMM"
        );
        let r = home.run(&["--json", "session", "resume", &id]).ok().json();
        assert_eq!(r["state"], "running", "{r}");
        let text = session_sh(
            &home,
            &id,
            &format!("cat /data /warm-marker; echo {round} >> /rounds; cat /rounds"),
        );
        assert!(text.contains("kept"), "{text}");
        assert!(text.contains("warmed-before-snapshot"), "{text}");
        let rounds: Vec<&str> = text.lines().filter(|l| l.len() == 1).collect();
        assert_eq!(rounds.len(), round, "{text}");
    }

    home.run(&["session", "rm", &id]).ok();
    assert!(vmm_processes(&home).is_empty(), "VMM left after rm");
    home.assert_clean();
}

#[test]
fn test_double_orphaned_vmm_is_swept_after_kill_9() {
    let home = double_home();
    let tpl = warm_template(home.path(), "warm", "microvm");
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    let mut c = home.cmd();
    c.args(["exec", "warm", "--", "sleep", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    // Wait until the clone's VMM runs, then kill thaw under it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while vmm_processes(&home).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no VMM started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(vmm_processes(&home).len(), 1, "the VMM outlives thaw");
    // Any next command sweeps it.
    home.run(&["templates", "ls"]).ok();
    assert!(vmm_processes(&home).is_empty(), "orphaned VMM not killed");
    home.assert_clean();
}

#[test]
fn microvm_template_without_cloud_hypervisor_names_the_cause() {
    let mut home = Home::new();
    home.env.push((
        "THAW_CLOUD_HYPERVISOR".into(),
        "/nonexistent/cloud-hypervisor".into(),
    ));
    let tpl = warm_template(home.path(), "wantsvm", "microvm");
    let r = home.run(&["deploy", tpl.to_str().unwrap()]);
    assert_ne!(r.code(), 0);
    let err = r.stderr();
    assert!(err.contains("microvm"), "{err}");
    assert!(err.contains("KVM host"), "{err}");
    // Nothing was published.
    let ls = home.run(&["--json", "templates", "ls"]).ok().json();
    assert_eq!(ls.as_array().map(|a| a.len()), Some(0), "{ls}");
    // `auto` falls back to the container tier on the same host.
    let tpl = warm_template(home.path(), "fallback", "auto");
    let t = home
        .run(&["--json", "deploy", tpl.to_str().unwrap()])
        .ok()
        .json();
    assert_eq!(t["tier"], "container", "{t}");
    home.assert_clean();
}

#[test]
fn real_cloud_hypervisor_publish_invoke_and_session() {
    if let Some(why) = real_tier_unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let mut home = Home::new();
    home.env.push(("THAW_TIER".into(), "microvm".into()));
    let t = home.deploy("shell");
    assert_eq!(t["tier"], "microvm", "{t}");
    let inv = home
        .run(&["--json", "invoke", "shell", "--payload", r#"{"task":"vm"}"#])
        .ok()
        .json();
    assert_eq!(inv["status"], "ok", "{inv}");
    assert_eq!(inv["start"], "restore", "{inv}");

    // A session's processes survive pause and resume: that is guest memory.
    let s = home.run(&["--json", "session", "new", "shell"]).ok().json();
    let id = s["id"].as_str().unwrap().to_string();
    session_sh(
        &home,
        &id,
        "sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/pid; echo on-disk > /data",
    );
    home.run(&["session", "pause", &id]).ok();
    home.run(&["session", "resume", &id]).ok();
    let text = session_sh(
        &home,
        &id,
        "kill -0 $(cat /tmp/pid) && echo alive; cat /data",
    );
    assert!(text.contains("alive"), "{text}");
    assert!(text.contains("on-disk"), "{text}");
    home.run(&["session", "rm", &id]).ok();
    home.assert_clean();
}

#[test]
fn test_double_rootfs_over_the_disk_limit_fails_the_publish() {
    let home = double_home();
    let tpl = warm_template(home.path(), "tiny", "microvm");
    let toml = std::fs::read_to_string(tpl.join("template.toml")).unwrap();
    std::fs::write(
        tpl.join("template.toml"),
        toml.replace("disk_mib = 64", "disk_mib = 8"),
    )
    .unwrap();
    let r = home.run(&["deploy", tpl.to_str().unwrap()]);
    assert_ne!(r.code(), 0);
    let err = r.stderr();
    assert!(err.contains("limits.disk_mib"), "{err}");
    assert!(vmm_processes(&home).is_empty());
    home.assert_clean();
}

/// A template below the kernel's memory floor is refused before any VM boots, with one line
/// naming `limits.memory_mib`, the minimum and the fix; the published version and a running
/// session are untouched.
#[test]
fn test_double_memory_below_the_kernel_floor_is_refused_and_loses_nothing() {
    let home = double_home();
    let tpl = warm_template(home.path(), "warm", "microvm");
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    let s = home.run(&["--json", "session", "new", "warm"]).ok().json();
    let id = s["id"].as_str().unwrap().to_string();
    session_sh(&home, &id, "echo kept > /data");

    let toml = std::fs::read_to_string(tpl.join("template.toml")).unwrap();
    std::fs::write(
        tpl.join("template.toml"),
        toml.replace("memory_mib = 128", "memory_mib = 64"),
    )
    .unwrap();
    let r = home.run(&["deploy", tpl.to_str().unwrap()]);
    assert_ne!(r.code(), 0);
    let err = r.stderr();
    assert!(
        err.contains("limits.memory_mib = 64 is below the microvm tier's minimum of")
            && err.contains("raise limits.memory_mib in template.toml"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let r = home
        .run(&["--json", "exec", "warm", "--", "cat", "/warm-marker"])
        .ok()
        .json();
    assert!(
        r["stdout"].as_str().unwrap_or_default().contains("warmed"),
        "{r}"
    );
    assert!(session_sh(&home, &id, "cat /data").contains("kept"));
    home.run(&["session", "rm", &id]).ok();
    assert!(vmm_processes(&home).is_empty());
    home.assert_clean();
}

/// A paused session's snapshot holds its whole disk (the clone's qcow2 overlay flattened), so
/// it resumes after its template is redeployed and even deleted.
#[test]
fn test_double_session_survives_redeploy_and_delete_of_its_template() {
    let home = double_home();
    let tpl = warm_template(home.path(), "warm", "microvm");
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    let s = home.run(&["--json", "session", "new", "warm"]).ok().json();
    let id = s["id"].as_str().unwrap().to_string();
    session_sh(&home, &id, "echo kept > /data");
    home.run(&["session", "pause", &id]).ok();

    let toml = std::fs::read_to_string(tpl.join("template.toml")).unwrap();
    std::fs::write(
        tpl.join("template.toml"),
        toml.replace("warmed-before-snapshot", "second-version"),
    )
    .unwrap();
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    home.run(&["session", "resume", &id]).ok();
    let text = session_sh(&home, &id, "cat /data /warm-marker");
    assert!(
        text.contains("kept") && text.contains("warmed-before-snapshot"),
        "{text}"
    );
    home.run(&["session", "pause", &id]).ok();

    home.run(&["templates", "rm", "warm"]).ok();
    home.run(&["session", "resume", &id]).ok();
    assert!(session_sh(&home, &id, "cat /data").contains("kept"));
    home.run(&["session", "rm", &id]).ok();
    assert!(vmm_processes(&home).is_empty());
    home.assert_clean();
}
