//! The microvm tier through the real `thaw` binary.
//!
//! * `real_*`: the tier on real Cloud Hypervisor and real KVM, through the `thaw` binary:
//!   both example templates published, clones restored from the snapshot and isolated from
//!   each other, warm state restored, sessions paused and resumed with their memory across a
//!   restart of `thaw serve`, a killed VMM and a killed thaw cleaned up, a hung guest timed
//!   out with its console. They are `#[ignore]`d, so a plain `cargo test` lists them as
//!   ignored; `make test-microvm` runs them (`--ignored`) where KVM is real: natively, or in a
//!   QEMU TCG guest with nested SVM (`nested/`). Asked to run without KVM they fail, naming
//!   what is missing.
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

#[path = "common/internet.rs"]
mod internet;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

/// A home whose templates run on the real microvm tier. Panics, naming the cause, where the
/// tier cannot run: these tests run only when asked for (`--ignored`).
fn real_home() -> Home {
    assert!(
        std::env::var_os("THAW_MICROVM_TEST_DOUBLE").is_none(),
        "THAW_MICROVM_TEST_DOUBLE is set: the real tests need the real Cloud Hypervisor"
    );
    if let Err(why) = thaw_platform::microvm::availability() {
        panic!("the real microvm tests cannot run on this host: {why}");
    }
    let mut home = Home::new();
    home.env.push(("THAW_TIER".into(), "microvm".into()));
    home
}

/// Runs `script` in a one-shot exec of `template`; returns the result and its stdout lines.
fn exec_lines(home: &Home, template: &str, script: &str) -> (serde_json::Value, Vec<String>) {
    let r = home
        .run(&["--json", "exec", template, "--", "/bin/sh", "-c", script])
        .ok()
        .json();
    let lines = r["stdout"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    (r, lines)
}

/// A granted name resolved (through the guest's `/etc/resolv.conf`, which its initramfs
/// points at the gateway, and through a server address the guest names: every DNS datagram
/// is the gateway's) and fetched by address with its `Host` (busybox's static wget crashes
/// in glibc's NSS, which a busybox rootfs lacks, so the request goes through `nc`); a name
/// not granted neither resolves nor gets an answer.
const EGRESS: &str = "nslookup plain.test | grep -q 198.51.100.12 && echo resolved; \
nslookup plain.test 198.51.100.53 | grep -q 198.51.100.12 && echo resolved-by-address; \
printf 'GET /hello HTTP/1.0\\r\\nHost: plain.test\\r\\n\\r\\n' | nc -w 20 198.51.100.12 80; echo; \
nslookup other.test 198.51.100.53 >/dev/null 2>&1 || echo other unresolved; \
printf 'GET / HTTP/1.0\\r\\nHost: other.test\\r\\n\\r\\n' | nc -w 10 198.51.100.20 80 | grep -q 'hello from' || echo other refused";

/// What makes a clone itself: prints its random UUID, 16 random bytes and hostname, whether
/// its disk was fresh, then marks its disk. (Not the boot id: the kernel makes it at its first
/// read, so clones of a snapshot taken before any read each make their own.)
const IDENTITY: &str = "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; test ! -e /mine && echo fresh; echo x > /mine";

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

/// Deploys a warm template (`warm`) on the test double and starts a session of it whose
/// `/data` says `kept`; returns the template's directory and the session's id.
fn double_session(home: &Home) -> (PathBuf, String) {
    let tpl = warm_template(home.path(), "warm", "microvm");
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    let s = home.run(&["--json", "session", "new", "warm"]).ok().json();
    let id = s["id"].as_str().unwrap().to_string();
    session_sh(home, &id, "echo kept > /data");
    (tpl, id)
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
    let (_, id) = double_session(&home);
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

/// `limits.disk_mib` is what a sandbox may write on top of its template, as on the container
/// tier: the guest's root disk has that much free (plus ext4's slack), and no more: a write
/// past it fails with ENOSPC inside the guest instead of growing anything on the host.
#[test]
fn test_double_guest_disk_holds_disk_mib_and_no_more() {
    let home = double_home();
    let tpl = warm_template(home.path(), "disk", "microvm");
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    let (r, lines) = exec_lines(
        &home,
        "disk",
        "df -k / | tail -n 1 | awk '{print $4}'; dd if=/dev/zero of=/fill bs=1M count=200 2>&1 | grep -o 'No space left' | head -n 1; ls -l /fill | awk '{print $5}'",
    );
    assert_eq!(lines.len(), 3, "{r}");
    let free_kib: u64 = lines[0].trim().parse().unwrap_or_else(|_| panic!("{r}"));
    // disk_mib = 64: at least that, and at most the ext4 slack (16 MiB + 10%) more.
    assert!(
        (64 << 10..=96 << 10).contains(&free_kib),
        "free space {free_kib} KiB for disk_mib = 64: {r}"
    );
    assert!(lines[1].contains("No space left"), "{r}");
    let written: u64 = lines[2].trim().parse().unwrap_or_else(|_| panic!("{r}"));
    assert!(
        written < 100 << 20,
        "wrote {written} bytes past disk_mib: {r}"
    );
    home.assert_clean();
}

#[test]
#[ignore = "needs Cloud Hypervisor on hardware KVM: run `make test-microvm`"]
fn real_shell_template_publishes_and_its_clones_are_isolated() {
    let home = real_home();
    let t = home.deploy("shell");
    assert_eq!(t["tier"], "microvm", "{t}");
    assert!(t["snapshot"].is_string(), "{t}");

    let inv = home
        .run(&["--json", "invoke", "shell", "--payload", r#"{"task":"vm"}"#])
        .ok()
        .json();
    assert_eq!(inv["status"], "ok", "{inv}");
    assert_eq!(inv["start"], "restore", "{inv}");
    assert_eq!(inv["result"]["greeting"], "hello from thaw", "{inv}");
    assert_eq!(inv["result"]["payload"]["task"], "vm", "{inv}");

    // Two clones of one snapshot: each its own entropy, UUIDs, hostname and disk.
    let (a, la) = exec_lines(&home, "shell", IDENTITY);
    let (b, lb) = exec_lines(&home, "shell", IDENTITY);
    assert_eq!(la.len(), 4, "{a}");
    assert_eq!(lb.len(), 4, "{b}");
    assert_eq!(a["start"], "restore", "{a}");
    assert_ne!(la[0], lb[0], "clones share a random UUID");
    assert_ne!(la[1], lb[1], "clones share /dev/urandom's bytes");
    assert_eq!(la[1].len(), 32, "{a}");
    assert_eq!(
        la[2],
        a["sandbox_id"].as_str().unwrap(),
        "hostname is the sandbox id"
    );
    assert_eq!(
        lb[2],
        b["sandbox_id"].as_str().unwrap(),
        "hostname is the sandbox id"
    );
    assert_ne!(la[2], lb[2]);
    assert_eq!(la[3], "fresh", "{a}");
    assert_eq!(lb[3], "fresh", "a clone saw another clone's write: {b}");
    assert!(
        vmm_processes(&home).is_empty(),
        "VMMs left after one-shot execs"
    );

    // Egress, through the guest's own network device and the gateway wired in its VMM's
    // namespace: a granted name resolves (asked of the gateway's resolver, by default and
    // by address) and its server answers; another name neither resolves nor reaches its
    // server; and a clone granted nothing reaches nothing.
    let net = internet::Internet::shared();
    let r = home
        .run(&[
            "--json",
            "exec",
            "shell",
            "--allow-out",
            "plain.test:80",
            "--",
            "/bin/sh",
            "-c",
            EGRESS,
        ])
        .ok()
        .json();
    let out = r["stdout"].as_str().unwrap_or_default();
    assert!(
        out.contains(&format!(
            "hello from {}:80 host=plain.test",
            internet::PLAIN
        )),
        "{r}"
    );
    for line in [
        "resolved",
        "resolved-by-address",
        "other unresolved",
        "other refused",
    ] {
        assert!(out.lines().any(|l| l == line), "no {line:?}: {r}");
    }
    assert_eq!(net.tcp_seen(internet::PLAIN, 80), 1, "{r}");
    assert_eq!(net.tcp_seen(internet::OTHER, 80), 0, "{r}");
    assert!(
        !net.asked("other.test"),
        "a name not granted reached the resolver"
    );
    let r = home
        .run(&[
            "--json",
            "exec",
            "shell",
            "--",
            "/bin/sh",
            "-c",
            &format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 80 | grep -q 'hello from' || echo unreachable",
                internet::PLAIN
            ),
        ])
        .ok()
        .json();
    assert!(
        r["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{r}"
    );
    assert_eq!(net.tcp_seen(internet::PLAIN, 80), 1, "{r}");

    // A session: its own VM, paused (no VMM) and resumed with its disk and the same kernel.
    let s = home.run(&["--json", "session", "new", "shell"]).ok().json();
    let id = s["id"].as_str().unwrap().to_string();
    let before = session_sh(
        &home,
        &id,
        "echo on-disk > /data; cat /proc/sys/kernel/random/boot_id",
    );
    assert_eq!(
        vmm_processes(&home).len(),
        1,
        "one VMM for the running session"
    );
    home.run(&["session", "pause", &id]).ok();
    assert!(
        vmm_processes(&home).is_empty(),
        "a paused session holds no VMM"
    );
    home.run(&["session", "resume", &id]).ok();
    let after = session_sh(&home, &id, "cat /proc/sys/kernel/random/boot_id; cat /data");
    assert_eq!(
        after.lines().next(),
        before.lines().next(),
        "resumed a different kernel: {before} / {after}"
    );
    assert!(after.contains("on-disk"), "{after}");
    home.run(&["session", "rm", &id]).ok();
    assert!(vmm_processes(&home).is_empty(), "VMM left after session rm");
    home.assert_clean();
}

#[test]
#[ignore = "needs Cloud Hypervisor on hardware KVM: run `make test-microvm`"]
fn real_python_warm_state_and_session_memory_survive_a_serve_restart() {
    use thaw_e2e::serve::{free_port, start_server, Cli};
    let home = real_home();
    let key = home
        .run(&["keys", "create", "--name", "microvm"])
        .ok()
        .stdout()
        .trim()
        .to_string();
    let port = free_port();
    let server = start_server(&home, port);
    let cli = Cli {
        home: &home,
        url: server.url.clone(),
        key,
    };
    let python = thaw_e2e::repo_root().join("templates/python");
    let t = cli.json(&["deploy", python.to_str().unwrap()]);
    assert_eq!(t["tier"], "microvm", "{t}");

    // Warm: the clone's handler is the one that imported numpy, pandas, scipy and sklearn in
    // the template's sandbox before the snapshot.
    let info = cli.json(&["invoke", "python", "--payload", r#"{"op":"info"}"#]);
    assert_eq!(info["start"], "restore", "{info}");
    assert_eq!(info["result"]["sandbox"], info["sandbox_id"], "{info}");
    assert_eq!(info["result"]["warm_from_snapshot"], true, "{info}");
    let random = || cli.json(&["invoke", "python", "--payload", r#"{"op":"random"}"#]);
    let (a, b) = (random(), random());
    for k in ["uuid", "urandom", "numpy"] {
        assert_ne!(a["result"][k], b["result"][k], "python clones share {k}");
    }

    // A session's memory: a variable of the persistent handler, and the kernel's boot id.
    let id = cli.ok(&["session", "new", "python"]);
    let py = |code: &str| {
        let payload = serde_json::json!({"op": "python", "code": code}).to_string();
        cli.json(&["session", "invoke", &id, "--payload", &payload])
    };
    py("remembered = 41");
    assert_eq!(py("remembered + 1")["result"]["value"], 42);
    let boot_id = |cli: &Cli| {
        cli.ok(&[
            "session",
            "exec",
            &id,
            "--",
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
    };
    let boot = boot_id(&cli);
    cli.ok(&["session", "pause", &id]);
    assert_eq!(cli.state(&id), "paused");

    // The server dies (SIGKILL) with the session paused, and a new one takes over its home.
    server.kill9();
    let server = start_server(&home, port);
    assert_eq!(cli.state(&id), "paused");
    cli.ok(&["session", "resume", &id]);
    assert_eq!(
        py("remembered + 1")["result"]["value"],
        42,
        "the handler's variable did not survive"
    );
    assert_eq!(boot_id(&cli), boot, "the resumed VM booted a new kernel");

    cli.ok(&["session", "rm", &id]);
    server.kill9();
    assert!(vmm_processes(&home).is_empty(), "VMMs left");
    home.assert_clean();
}

#[test]
#[ignore = "needs Cloud Hypervisor on hardware KVM: run `make test-microvm`"]
fn real_killed_vmm_and_killed_thaw_are_cleaned_up() {
    let home = real_home();
    home.deploy("shell");

    // 1. The VMM dies mid-invocation: the call fails saying so, nothing is left.
    let mut c = home.cmd();
    c.args(["exec", "shell", "--", "sleep", "600"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let vmm = wait_for_vmm(&home);
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exec survived its VMM: {err}");
    assert!(
        err.contains("Cloud Hypervisor") || err.contains("VMM"),
        "the error does not say the VMM died: {err}"
    );
    assert!(vmm_processes(&home).is_empty(), "VMM left after its death");
    home.assert_clean();

    // 2. thaw dies mid-invocation: the VMM outlives it, and the next start sweeps it.
    let mut c = home.cmd();
    c.args(["exec", "shell", "--", "sleep", "600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    wait_for_vmm(&home);
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(vmm_processes(&home).len(), 1, "the VMM outlives thaw");
    home.run(&["templates", "ls"]).ok();
    assert!(vmm_processes(&home).is_empty(), "orphaned VMM not swept");
    home.assert_clean();
}

#[test]
#[ignore = "needs Cloud Hypervisor on hardware KVM: run `make test-microvm`"]
fn real_hung_guest_times_out_with_its_console_tail() {
    let home = real_home();
    let tpl = warm_template(home.path(), "hang", "microvm");
    let toml = std::fs::read_to_string(tpl.join("template.toml")).unwrap();
    std::fs::write(
        tpl.join("template.toml"),
        toml.replace("timeout_s = 20", "timeout_s = 5"),
    )
    .unwrap();
    home.run(&["deploy", tpl.to_str().unwrap()]).ok();
    // The guest's kernel crashes and, told not to reboot, hangs: guest-init never answers
    // again. The host ends the call at its own deadline and shows the guest's console.
    let r = home.run(&[
        "exec",
        "hang",
        "--",
        "/bin/sh",
        "-c",
        "echo 0 > /proc/sys/kernel/panic; echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger; sleep 600",
    ]);
    let err = r.stderr();
    assert_eq!(r.code(), 124, "not a host-side timeout: {err}");
    assert!(err.contains("host enforced the timeout"), "{err}");
    assert!(err.contains("console ends with"), "no console tail: {err}");
    assert!(
        err.contains("sysrq"),
        "the console tail misses the crash: {err}"
    );
    assert!(vmm_processes(&home).is_empty(), "the hung VM was not ended");
    home.assert_clean();
}

/// Waits until one VMM of this home runs; returns its pid.
fn wait_for_vmm(home: &Home) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(p) = vmm_processes(home).first() {
            return *p;
        }
        assert!(std::time::Instant::now() < deadline, "no VMM started");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A template below the kernel's memory floor is refused before any VM boots, with one line
/// naming `limits.memory_mib`, the minimum and the fix; the published version and a running
/// session are untouched.
#[test]
fn test_double_memory_below_the_kernel_floor_is_refused_and_loses_nothing() {
    let home = double_home();
    let (tpl, id) = double_session(&home);

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
    let (tpl, id) = double_session(&home);
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
