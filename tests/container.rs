//! End-to-end tests of the container tier: the real `thaw` binary, real runc, real sandboxes.

use thaw_e2e::{leaked_cgroups, repo_root, Home};

fn write_template(dir: &std::path::Path, toml: &str, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("template.toml"), toml).unwrap();
    for (name, body) in files {
        std::fs::write(dir.join(name), body).unwrap();
    }
}

fn shell_home() -> Home {
    let h = Home::new();
    h.deploy("shell");
    h
}

#[test]
fn shell_deploy_invoke_and_fresh_sandbox_each_time() {
    let h = shell_home();
    let a = h
        .run(&["--json", "invoke", "shell", "--payload", r#"{"task":"hi"}"#])
        .ok()
        .json();
    assert_eq!(a["status"], "ok", "{a}");
    assert_eq!(a["result"]["greeting"], "hello from thaw");
    assert_eq!(a["result"]["payload"]["task"], "hi");
    let b = h
        .run(&["--json", "invoke", "shell", "--payload", "[1,2]"])
        .ok()
        .json();
    assert_eq!(b["result"]["payload"], serde_json::json!([1, 2]));
    assert_ne!(a["sandbox_id"], b["sandbox_id"]);
    assert_eq!(a["result"]["sandbox"], a["sandbox_id"]);
    // Payload from stdin.
    let c = h
        .run_stdin(
            &["--json", "invoke", "shell", "--payload", "-"],
            Some(b"42"),
        )
        .ok()
        .json();
    assert_eq!(c["result"]["payload"], 42);
    let ls = h.run(&["--json", "templates", "ls"]).ok().json();
    assert_eq!(ls[0]["name"], "shell");
    let ids: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|v| v["sandbox_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        leaked_cgroups(&ids).is_empty(),
        "{:?}",
        leaked_cgroups(&ids)
    );
    h.assert_clean();
}

#[test]
fn exec_streams_output_and_exits_with_the_task_code() {
    let h = shell_home();
    let r = h.run(&[
        "exec",
        "shell",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; hostname; exit 3",
    ]);
    assert_eq!(r.code(), 3, "stderr: {}", r.stderr());
    assert!(r.stdout().starts_with("out\nsb-"), "{}", r.stdout());
    assert!(r.stderr().contains("err"), "{}", r.stderr());
    // stdin and env reach the task.
    let r = h.run_stdin(
        &[
            "exec",
            "shell",
            "-i",
            "-e",
            "X=42",
            "--",
            "sh",
            "-c",
            "cat; echo $X",
        ],
        Some(b"piped "),
    );
    assert_eq!(r.stdout(), "piped 42\n");
    // No network but loopback.
    let r = h
        .run(&["exec", "shell", "--", "sh", "-c", "ls /sys/class/net"])
        .ok();
    assert_eq!(r.stdout().trim(), "lo");
    // Every capability dropped.
    let r = h
        .run(&["exec", "shell", "--", "grep", "CapEff", "/proc/self/status"])
        .ok();
    assert!(r.stdout().contains("0000000000000000"), "{}", r.stdout());
    h.assert_clean();
}

#[test]
fn bad_templates_are_refused_and_leave_the_store_alone() {
    let h = shell_home();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    write_template(
        &bad,
        "name = \"bad\"\nbase = { kind = \"busybox\" }\n[handler]\ncomand = [\"x\"]\n",
        &[],
    );
    let r = h.run(&["deploy", bad.to_str().unwrap()]);
    assert_eq!(r.code(), 1);
    let err = r.stderr();
    assert!(
        err.contains("template.toml") && err.contains("comand"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");

    let failing = tmp.path().join("failing");
    write_template(
        &failing,
        "name = \"failing\"\nbase = { kind = \"busybox\" }\nsetup = [\"echo building; echo oh-no >&2; exit 7\"]\n[handler]\ncommand = [\"cat\"]\n",
        &[],
    );
    let r = h.run(&["deploy", failing.to_str().unwrap()]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("oh-no") && r.stderr().contains("exit"),
        "{}",
        r.stderr()
    );

    let ls = h.run(&["--json", "templates", "ls"]).ok().json();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["shell"]);
    h.assert_clean();
}

#[test]
fn unknown_template_and_bad_payload() {
    let h = shell_home();
    let r = h.run(&["invoke", "nope"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("unknown template `nope`") && r.stderr().contains("shell"),
        "{}",
        r.stderr()
    );
    let r = h.run(&["invoke", "shell", "--payload", "{not json"]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("not valid JSON"), "{}", r.stderr());
    let huge = vec![b'1'; 17 << 20];
    let r = h.run_stdin(&["invoke", "shell", "--payload", "-"], Some(&huge));
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("too large"), "{}", r.stderr());
    h.assert_clean();
}

#[test]
fn crash_timeout_oom_forkbomb_and_output_cap() {
    let h = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("edge");
    write_template(
        &t,
        r#"name = "edge"
base = { kind = "busybox" }
[[files]]
src = "h.sh"
dest = "/app/h.sh"
[handler]
command = ["/bin/sh", "/app/h.sh"]
[limits]
memory_mib = 48
pids = 32
timeout_s = 20
output_kib = 64
"#,
        &[(
            "h.sh",
            "read p\ncase \"$p\" in\n*crash*) echo dying >&2; exit 9;;\n*sleep*) sleep 1000;;\n*text*) echo not-json;;\n*) echo '{\"ok\":true}';;\nesac\n",
        )],
    );
    h.run(&["deploy", t.to_str().unwrap()]).ok();

    let r = h.run(&["--json", "invoke", "edge", "--payload", "\"crash\""]);
    assert_eq!(r.code(), 1);
    let v = r.json();
    assert_eq!(v["status"], "error");
    assert!(v["stderr_tail"].as_str().unwrap().contains("dying"), "{v}");

    let v = h
        .run(&["--json", "invoke", "edge", "--payload", "\"text\""])
        .json();
    assert_eq!(v["status"], "error");
    assert_eq!(v["raw_output"].as_str().unwrap().trim(), "not-json");

    // Timeout: the whole tree goes, including a daemonised grandchild.
    let started = std::time::Instant::now();
    let r = h.run(&[
        "--json",
        "invoke",
        "edge",
        "--timeout",
        "1",
        "--payload",
        "\"sleep\"",
    ]);
    assert_eq!(r.code(), 124, "{}", r.stderr());
    assert_eq!(r.json()["status"], "timeout");
    assert!(started.elapsed().as_secs() < 15);
    let r = h.run(&[
        "exec",
        "edge",
        "--timeout",
        "1",
        "--",
        "sh",
        "-c",
        "setsid sleep 1000 & sleep 1000",
    ]);
    assert_eq!(r.code(), 124, "{}", r.stderr());

    // Memory limit: a 100 MB string in a 48 MiB sandbox.
    let r = h.run(&[
        "--json",
        "exec",
        "edge",
        "--",
        "sh",
        "-c",
        "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}",
    ]);
    let v = r.json();
    assert_eq!(v["outcome"]["kind"], "oom", "{v}");
    assert_eq!(r.code(), 137);

    // Fork bomb: contained by the pids limit (32): forks start failing, the task ends, and
    // the whole tree is gone afterwards.
    let started = std::time::Instant::now();
    let r = h.run(&[
        "exec",
        "edge",
        "--timeout",
        "10",
        "--",
        "sh",
        "-c",
        "bomb() { bomb | bomb & }; bomb; sleep 2",
    ]);
    assert!(started.elapsed().as_secs() < 20);
    assert!(
        r.stderr().contains("can't fork")
            || r.stderr().contains("Resource temporarily unavailable"),
        "fork bomb was not stopped by the pids limit: code {} stderr {}",
        r.code(),
        r.stderr()
    );
    let r = h.run(&[
        "exec",
        "edge",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); echo $i; done",
    ]);
    let spawned: u32 = r
        .stdout()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        spawned > 0 && spawned < 32,
        "spawned {spawned} of 40 under pids=32: {}",
        r.stderr()
    );

    // Output over the cap is truncated and flagged.
    let v = h
        .run(&[
            "--json",
            "exec",
            "edge",
            "--",
            "sh",
            "-c",
            "head -c 1000000 /dev/zero | tr '\\0' x",
        ])
        .json();
    assert_eq!(v["truncated"], true);
    assert_eq!(v["stdout"].as_str().unwrap().len(), 64 * 1024);
    h.assert_clean();
}

#[test]
fn missing_dependency_is_named_with_its_fix() {
    let h = Home::new();
    let mut c = h.cmd();
    c.env("PATH", "/nonexistent").args([
        "deploy",
        repo_root().join("templates/shell").to_str().unwrap(),
    ]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("runc") && err.contains("make deps"), "{err}");
    // runc present but no CRIU: the publish fails naming CRIU and its fix, leaving nothing.
    let bin = tempfile::tempdir().unwrap();
    for tool in ["runc", "tar", "sh"] {
        let real = ["/usr/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not installed"));
        std::os::unix::fs::symlink(real, bin.path().join(tool)).unwrap();
    }
    let out = h
        .cmd()
        .env("PATH", bin.path())
        .args([
            "deploy",
            repo_root().join("templates/shell").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("criu") && err.contains("make deps"), "{err}");
    h.assert_clean();
    let doctor = h.run(&["--json", "doctor"]).json();
    assert!(doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "criu"));
    assert_eq!(doctor["tier"], "container");
}

#[test]
fn python_template_answers_with_warm_libraries() {
    let h = Home::new();
    h.deploy("python");
    let v = h
        .run(&[
            "--json",
            "invoke",
            "python",
            "--payload",
            r#"{"op":"fit","x":[0,1,2,3],"y":[1,3,5,7]}"#,
        ])
        .ok()
        .json();
    assert_eq!(v["status"], "ok", "{v}");
    assert!(
        (v["result"]["coef"].as_f64().unwrap() - 2.0).abs() < 1e-9,
        "{v}"
    );
    let random = || {
        h.run(&[
            "--json",
            "invoke",
            "python",
            "--payload",
            r#"{"op":"random"}"#,
        ])
        .ok()
        .json()
    };
    // A clone knows its own id, not the one of the sandbox the snapshot was taken in.
    let v = h
        .run(&[
            "--json",
            "invoke",
            "python",
            "--payload",
            r#"{"op":"info"}"#,
        ])
        .ok()
        .json();
    assert_eq!(v["result"]["sandbox"], v["sandbox_id"], "{v}");
    // The handler that answered imported its libraries in the template's sandbox, before
    // the snapshot: the clone did not pay for them again.
    assert_eq!(v["result"]["warm_from_snapshot"], true, "{v}");
    let (a, b) = (random(), random());
    for k in ["uuid", "urandom", "numpy"] {
        assert_ne!(a["result"][k], b["result"][k], "clones share {k}");
    }
    let r = h
        .run(&[
            "exec",
            "python",
            "--",
            "python3",
            "-c",
            "import numpy; print(numpy.__name__)",
        ])
        .ok();
    assert_eq!(r.stdout().trim(), "numpy");
    h.assert_clean();
}

#[test]
fn a_task_cannot_open_the_memory_of_guest_init_or_its_supervisor() {
    let h = shell_home();
    // Same uid as guest-init, no capabilities: with PID 1 dumpable the kernel would open
    // its memory read-write (ptrace's access check, not the ptrace syscall, guards it).
    let r = h
        .run(&[
            "exec",
            "shell",
            "--",
            "sh",
            "-c",
            "for p in 1 $PPID; do dd if=/proc/$p/mem of=/dev/null bs=1 count=1 2>&1; \
             (exec 3<>/proc/$p/mem) 2>&1; ls -ln /proc/$p/mem; done; true",
        ])
        .ok();
    let out = r.stdout();
    assert_eq!(
        out.matches("Permission denied").count(),
        4,
        "expected EACCES for reading and writing both: {out}"
    );
    h.assert_clean();
}

#[test]
fn python_tasks_cannot_open_vsock_or_netlink_audit_sockets() {
    let h = Home::new();
    h.deploy("python");
    let probe = r#"
import errno, socket
def probe(*args):
    try:
        socket.socket(*args).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
print("vsock", probe(socket.AF_VSOCK, socket.SOCK_STREAM))
print("audit", probe(socket.AF_NETLINK, socket.SOCK_RAW, 9))
print("route", probe(socket.AF_NETLINK, socket.SOCK_RAW, 0))
print("pair", len(socket.socketpair()))
"#;
    let r = h
        .run(&["exec", "python", "--", "python3", "-c", probe])
        .ok();
    let out = r.stdout();
    for want in [
        "vsock EAFNOSUPPORT",
        "audit EPROTONOSUPPORT",
        "route ok",
        "pair 2",
    ] {
        assert!(out.contains(want), "{want} missing: {out}");
    }
    h.assert_clean();
}
