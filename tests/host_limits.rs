//! The host enforces a sandbox's limits itself (it cannot trust guest-init, which code in
//! the sandbox may control): output caps, timeouts and the size of its host-side log. These
//! drive the real `thaw` binary; the agent's own tests (platform/src/agent.rs) put a fake,
//! lying guest-init in front of the host for what a correct guest-init cannot produce.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use thaw_e2e::{sandbox_procs, Home};

fn write_template(dir: &std::path::Path, toml: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("template.toml"), toml).unwrap();
}

/// A busybox template with a 64 KiB output cap.
fn flood_home() -> (Home, tempfile::TempDir) {
    let h = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("flood");
    write_template(
        &t,
        r#"name = "flood"
base = { kind = "busybox" }
[handler]
command = ["/bin/sh", "-c", "head -c 200000000 /dev/zero >&2; echo '{\"ok\":true}'"]
[limits]
memory_mib = 64
pids = 32
timeout_s = 30
output_kib = 64
"#,
    );
    h.run(&["deploy", t.to_str().unwrap()]).ok();
    (h, tmp)
}

/// Runs thaw with `args`, sampling `watch` every 5 ms while it runs (and the thaw process's
/// peak RSS, VmHWM, in KiB). Returns (exit code, stdout, stderr, peak RSS KiB, elapsed).
fn run_watched(
    h: &Home,
    args: &[&str],
    mut watch: impl FnMut(),
) -> (i32, Vec<u8>, String, u64, Duration) {
    let started = Instant::now();
    let mut child = h
        .cmd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn thaw");
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut hwm = 0u64;
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for l in status.lines() {
                if let Some(v) = l.strip_prefix("VmHWM:") {
                    let kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    hwm = hwm.max(kib);
                }
            }
        }
        watch();
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "thaw {args:?} still runs after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    (
        status.code().unwrap_or(-1),
        reader.join().unwrap(),
        ereader.join().unwrap(),
        hwm,
        elapsed,
    )
}

#[test]
fn a_task_flooding_output_is_cut_at_the_cap_and_thaw_stays_small() {
    let (h, _t) = flood_home();
    // 200 MB on stdout with a 64 KiB cap.
    let (code, out, err, hwm_kib, took) = run_watched(
        &h,
        &[
            "exec",
            "flood",
            "--",
            "sh",
            "-c",
            "head -c 200000000 /dev/zero; echo finished >&2",
        ],
        || {},
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), 64 << 10, "stdout is cut at output_kib");
    assert!(hwm_kib < 200 << 10, "thaw's peak RSS was {hwm_kib} KiB");
    assert!(took < Duration::from_secs(60), "{took:?}");

    // The same through the handler (stderr streamed, result after it).
    let (code, out, err, hwm_kib, _) =
        run_watched(&h, &["--json", "invoke", "flood", "--payload", "{}"], || {});
    let v: serde_json::Value =
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["truncated"], true, "{v}");
    assert!(code == 0 || code == 1, "{code}: {err}");
    assert!(hwm_kib < 200 << 10, "thaw's peak RSS was {hwm_kib} KiB");
    h.assert_clean();
}

#[test]
fn a_task_writing_into_guest_inits_stdout_cannot_grow_the_host_log() {
    let (h, _t) = flood_home();
    let sandboxes = h.path().join("sandboxes");
    let mut biggest = 0u64;
    // 1 GB into guest-init's own stdout: the pipe to the host-side init.log.
    let (code, out, err, _, took) = run_watched(
        &h,
        &[
            "exec",
            "flood",
            "--",
            "sh",
            "-c",
            "head -c 1000000000 /dev/zero 2>/dev/null > /proc/1/fd/1 || echo refused; echo done",
        ],
        || {
            for e in std::fs::read_dir(&sandboxes)
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(m) = std::fs::metadata(e.path().join("init.log")) {
                    biggest = biggest.max(m.len());
                }
            }
        },
    );
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(
        biggest <= (1 << 20) + 4096,
        "init.log reached {biggest} bytes"
    );
    // guest-init is not dumpable, so a task cannot even open its descriptors through
    // /proc/1/fd: the first layer refuses. Where it could, the host's cap is the second.
    if out.trim() == "refused\ndone" {
        assert!(biggest < 1 << 20, "nothing was written ({biggest} bytes)");
    } else {
        assert_eq!(out.trim(), "done", "the writer was never blocked");
        assert!(
            biggest >= 1 << 20,
            "the watcher saw the log ({biggest} bytes)"
        );
    }
    assert!(took < Duration::from_secs(60), "{took:?}");
    h.assert_clean();
}

#[test]
fn a_task_ignoring_sigterm_ends_at_its_timeout_and_leaves_nothing() {
    let (h, _t) = flood_home();
    let started = Instant::now();
    let r = h.run(&[
        "exec",
        "flood",
        "--timeout",
        "1",
        "--",
        "sh",
        "-c",
        "trap '' TERM; sleep 100",
    ]);
    let took = started.elapsed();
    assert_eq!(r.code(), 124, "{}", r.stderr());
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(sandbox_procs(h.path(), "sleep"), Vec::<u32>::new());
    h.assert_clean();
}

/// [`Home::assert_clean`] itself: a live session's processes and cgroups are seen (on the
/// container tier `/proc/<pid>/root` reads `/`, so a check on it saw nothing).
#[test]
fn assert_clean_sees_a_live_sandboxs_processes_and_cgroups() {
    let (h, _t) = flood_home();
    let r = h.run(&["session", "new", "flood"]).ok();
    let id = r.stdout().trim().to_string();
    let show = h.run(&["--json", "session", "show", &id]).ok().json();
    let sandbox = show["sandbox"]
        .as_str()
        .expect("a running session names its sandbox");
    let found = h.leftovers().join("; ");
    assert!(found.contains("sandbox processes left behind"), "{found}");
    assert!(found.contains("sandbox cgroups left behind"), "{found}");
    assert!(found.contains(&format!("thaw/{sandbox}")), "{found}");
    h.run(&["session", "rm", &id]).ok();
    h.assert_clean();
}
