//! End-to-end tests of template builds as sandboxes: a tenant's `setup` commands run with
//! a few file capabilities, no host network, seccomp and `[build]` limits, and what they
//! leave is checked before it reaches the cache. Each test gets its own `THAW_CACHE` inside
//! its home, so "nothing landed in the cache" can be checked and [`Home::assert_clean`]
//! also covers the build's mounts and processes (which live under the cache).

use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_e2e::{repo_root, Home, Run};

#[path = "common/internet.rs"]
mod internet;

/// A home whose rootfs cache is its own.
fn home() -> Home {
    let mut h = Home::new();
    let cache = h.path().join("cache");
    h.env
        .push(("THAW_CACHE".into(), cache.to_string_lossy().into_owned()));
    h
}

/// A busybox template named `t` with the given `setup` commands and extra TOML.
fn template(h: &Home, setup: &[&str], extra: &str) -> PathBuf {
    let dir = h.path().join("tpl");
    std::fs::create_dir_all(&dir).unwrap();
    let setup: Vec<String> = setup
        .iter()
        .map(|s| format!("{:?}", s)) // a TOML basic string is a JSON-ish escaped string
        .collect();
    std::fs::write(
        dir.join("template.toml"),
        format!(
            "name = \"t\"\nbase = {{ kind = \"busybox\" }}\nsetup = [{}]\n{extra}\n\
             [handler]\ncommand = [\"/bin/cat\"]\n",
            setup.join(", ")
        ),
    )
    .unwrap();
    dir
}

fn deploy(h: &Home, dir: &Path) -> Run {
    h.run(&["deploy", dir.to_str().unwrap()])
}

/// Template layers in this home's cache.
fn layers(h: &Home) -> Vec<PathBuf> {
    std::fs::read_dir(h.path().join("cache/rootfs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("layer-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[track_caller]
fn assert_failed_one_line(r: &Run) -> String {
    assert_eq!(
        r.code(),
        1,
        "stdout: {}\nstderr: {}",
        r.stdout(),
        r.stderr()
    );
    let err = r.stderr();
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    err
}

#[test]
fn setup_cannot_make_device_nodes_and_nothing_reaches_the_cache() {
    let h = home();
    let dir = template(&h, &["mknod /app/x c 1 3"], "");
    let err = assert_failed_one_line(&deploy(&h, &dir));
    assert!(err.contains("Operation not permitted"), "{err}");
    assert!(layers(&h).is_empty(), "{:?}", layers(&h));
    h.assert_clean();
}

#[test]
fn setup_cannot_reach_the_hosts_loopback() {
    let h = home();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let connected = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (connected, stop) = (connected.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if listener.accept().is_ok() {
                    connected.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let probe = format!(
        "if echo hi | nc -w 2 127.0.0.1 {port}; then echo REACHED\"\"HOST; else echo NO\"\"CONN; fi; exit 7"
    );
    let dir = template(&h, &[&probe], "");
    let err = assert_failed_one_line(&deploy(&h, &dir));
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    // (The markers are split in the command so that only its output spells them.)
    assert!(
        err.contains("NOCONN") && !err.contains("REACHEDHOST"),
        "{err}"
    );
    assert!(!connected.load(Ordering::SeqCst), "setup reached the host");
    h.assert_clean();
}

/// Peak resident memory of a running thaw, polled until it exits.
fn run_measuring_peak_rss(h: &Home, args: &[&str]) -> (Run, u64) {
    let mut child = h
        .cmd()
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak_kib = 0u64;
    // Drain the pipes on threads so thaw never blocks on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for l in status.lines() {
                if let Some(v) = l.strip_prefix("VmHWM:") {
                    let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    peak_kib = peak_kib.max(kib);
                }
            }
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    (Run { out }, peak_kib)
}

#[test]
fn setup_output_is_capped_to_its_tail() {
    let h = home();
    // 50 MB of output, then a marker, then a failure so the error shows the tail.
    let dir = template(
        &h,
        &["yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 50000000; echo; echo THE-END; exit 3"],
        "[build]\noutput_kib = 64\n",
    );
    let (r, peak_kib) = run_measuring_peak_rss(&h, &["deploy", dir.to_str().unwrap()]);
    let err = assert_failed_one_line(&r);
    assert!(err.contains("THE-END"), "{err}");
    assert!(err.len() < 4096, "{} bytes of error", err.len());
    // thaw's own memory does not grow with the output it discards: it peaks within 16 MiB
    // of the same failing deploy that prints one line. Without the cap it holds all 50 MB
    // (and a lossy copy) at once. Relative, because the baseline is the binary's and sled's
    // own (a debug build of thaw peaks near 48 MiB doing nothing but open its engine).
    let quiet = template(&h, &["echo THE-END; exit 3"], "[build]\noutput_kib = 64\n");
    let (q, baseline_kib) = run_measuring_peak_rss(&h, &["deploy", quiet.to_str().unwrap()]);
    assert!(assert_failed_one_line(&q).contains("THE-END"));
    assert!(
        peak_kib < baseline_kib + 16 * 1024,
        "thaw peaked at {peak_kib} KiB with 50 MB of output, {baseline_kib} KiB with one line"
    );
    h.assert_clean();
}

#[test]
fn setup_is_killed_at_its_timeout() {
    let h = home();
    let dir = template(&h, &["sleep 100"], "[build]\ntimeout_s = 2\n");
    let started = Instant::now();
    let err = assert_failed_one_line(&deploy(&h, &dir));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(
        err.contains(
            "setup command 1 `sleep 100` exceeded [build] timeout_s = 2; raise it (max 3600)"
        ),
        "{err}"
    );
    assert!(layers(&h).is_empty());
    h.assert_clean();
    // Over the server's maximum is refused before anything runs.
    let dir = template(&h, &["true"], "[build]\ntimeout_s = 7200\n");
    let err = assert_failed_one_line(&deploy(&h, &dir));
    assert!(
        err.contains("build.timeout_s") && err.contains("3600"),
        "{err}"
    );
}

#[test]
fn a_fork_bomb_in_setup_hits_the_pids_limit() {
    let h = home();
    let dir = template(
        &h,
        &["bomb() { bomb | bomb & }; bomb; sleep 2; exit 1"],
        "[build]\npids = 64\ntimeout_s = 20\n",
    );
    let err = assert_failed_one_line(&deploy(&h, &dir));
    assert!(err.contains("hit [build] pids = 64"), "{err}");
    assert!(layers(&h).is_empty());
    h.assert_clean();
}

#[test]
fn a_setuid_file_mode_is_refused_at_publish() {
    let h = home();
    let dir = template(
        &h,
        &[],
        "[[files]]\nsrc = \"a\"\ndest = \"/app/a\"\n[[files]]\nsrc = \"a\"\ndest = \"/app/x\"\nmode = \"4755\"\n",
    );
    std::fs::write(dir.join("a"), "#!/bin/sh\n").unwrap();
    let err = assert_failed_one_line(&deploy(&h, &dir));
    assert!(
        err.contains("files[1] (dest /app/x): mode 4755 has the setuid bit; thaw refuses setuid, setgid and sticky modes"),
        "{err}"
    );
    assert!(layers(&h).is_empty());
    h.assert_clean();
}

#[test]
fn setup_cannot_publish_a_setuid_file() {
    let h = home();
    let dir = template(
        &h,
        &["cp /bin/busybox /bin/sush; chmod 4755 /bin/sush; ls -l /bin/sush"],
        "",
    );
    deploy(&h, &dir).ok();
    let layers = layers(&h);
    assert_eq!(layers.len(), 1, "{layers:?}");
    let sush = layers[0].join("upper/bin/sush");
    let mode = std::fs::symlink_metadata(&sush).unwrap().mode();
    assert_eq!(
        mode & 0o7777,
        0o755,
        "{} has mode {:o}",
        sush.display(),
        mode
    );
    // And the sandbox sees the same.
    let r = h
        .run(&["exec", "t", "--", "stat", "-c", "%a", "/bin/sush"])
        .ok();
    assert_eq!(r.stdout().trim(), "755");
    h.assert_clean();
}

#[test]
fn template_files_cannot_escape_the_template_or_the_rootfs() {
    let h = home();
    let dir = template(
        &h,
        &[],
        "[[files]]\nsrc = \"link/passwd\"\ndest = \"/app/passwd\"\n",
    );
    std::os::unix::fs::symlink("/etc", dir.join("link")).unwrap();
    let err = assert_failed_one_line(&deploy(&h, &dir));
    assert!(
        err.contains("files[0].src") && err.contains("outside the template directory"),
        "{err}"
    );
    // A symlink copied in first cannot send a later host-side write out of the rootfs: the
    // second file lands at the rootfs's own /tmp, not the host's. (The link climbs far
    // enough to reach the host's / from the build's merged directory.)
    let marker = format!("escape-{}", std::process::id());
    let dir = template(
        &h,
        &[],
        &format!(
            "[[files]]\nsrc = \"d\"\ndest = \"/x\"\n[[files]]\nsrc = \"m\"\ndest = \"/x/e/l/tmp/{marker}\"\n"
        ),
    );
    std::fs::create_dir_all(dir.join("d/e")).unwrap();
    std::os::unix::fs::symlink("../".repeat(24), dir.join("d/e/l")).unwrap();
    std::fs::write(dir.join("m"), "inside").unwrap();
    let r = deploy(&h, &dir);
    let host_file = Path::new("/tmp").join(&marker);
    let escaped = host_file.exists();
    let _ = std::fs::remove_file(&host_file);
    assert!(!escaped, "a template file was written to the host's /tmp");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let r = h
        .run(&["exec", "t", "--", "cat", &format!("/tmp/{marker}")])
        .ok();
    assert_eq!(r.stdout(), "inside");
    h.assert_clean();
}

#[test]
fn setup_over_its_memory_is_reported_as_out_of_memory() {
    let h = home();
    // The shell keeps the whole 200 MB in a variable: over 64 MiB (+16 MiB of disk).
    let dir = template(
        &h,
        &["x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}"],
        "[build]\nmemory_mib = 64\ndisk_mib = 16\n",
    );
    let err = assert_failed_one_line(&deploy(&h, &dir));
    assert!(
        err.contains("ran out of memory: exceeded [build] memory_mib = 64"),
        "{err}"
    );
    h.assert_clean();
}

#[test]
fn setup_writes_are_capped_by_the_build_disk() {
    let h = home();
    let dir = template(
        &h,
        &["head -c 40000000 /dev/zero > /big"],
        "[build]\ndisk_mib = 16\n",
    );
    let err = assert_failed_one_line(&deploy(&h, &dir));
    assert!(
        err.contains("exceeded [build] disk_mib = 16; raise it"),
        "{err}"
    );
    assert!(layers(&h).is_empty());
    h.assert_clean();
}

/// `setup` writes where `[[files]]` put the template's files, in a directory the copy made
/// (the python template byte-compiles `/app` into `/app/__pycache__`): the build's root owns
/// them. Regression: the copy's owners were shifted behind the overlay's back, so the overlay
/// still held a new directory as host root's, and the build's root got "Permission denied".
#[test]
fn setup_writes_into_directories_the_template_files_made() {
    let h = home();
    let dir = template(
        &h,
        &["mkdir /opt/agent/cache && echo built > /opt/agent/cache/x && id -u > /opt/agent/uid"],
        "[[files]]\nsrc = \"app\"\ndest = \"/opt/agent\"\n",
    );
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("app/main.sh"), "echo hi\n").unwrap();
    deploy(&h, &dir).ok();
    let r = h
        .run(&[
            "exec",
            "t",
            "--",
            "/bin/sh",
            "-c",
            "cat /opt/agent/cache/x /opt/agent/uid /opt/agent/main.sh",
        ])
        .ok();
    assert_eq!(r.stdout(), "built\n0\necho hi\n");
    h.assert_clean();
}

/// `[build] allow_out` lets setup reach what it names through the egress gateway, and
/// nothing else: the test's own internet (a network namespace it makes) serves both the
/// allowed and a denied address, and only the allowed one sees a connection.
#[test]
fn setup_reaches_its_build_allowlist_and_nothing_else() {
    let net = internet::Internet::shared();
    let mut h = home();
    h.env.push((
        "THAW_EGRESS_NETNS".into(),
        format!("/run/netns/{}", net.netns),
    ));
    h.env
        .push(("THAW_UPSTREAM_DNS".into(), format!("{}:53", internet::DNS)));
    let get = |host: &str| {
        format!("printf 'GET /hello HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 5 {host} 80")
    };
    let allowed_before = net.tcp_seen(internet::ALLOWED, 80);
    let other_before = net.tcp_seen(internet::OTHER, 80);
    let fetch = format!("{} > /app/fetched", get("allowed.test"));
    let denied = format!(
        "if {} | grep -q hello; then echo REACHED\"\"OTHER; exit 9; fi",
        get(internet::OTHER)
    );
    let dir = template(
        &h,
        &["mkdir -p /app", &fetch, &denied],
        "[build]\nallow_out = [\"allowed.test:80\"]\n",
    );
    let r = deploy(&h, &dir);
    assert_eq!(
        r.code(),
        0,
        "stdout: {}\nstderr: {}",
        r.stdout(),
        r.stderr()
    );
    assert_eq!(net.tcp_seen(internet::ALLOWED, 80), allowed_before + 1);
    assert_eq!(
        net.tcp_seen(internet::OTHER, 80),
        other_before,
        "setup reached an address its allowlist does not name"
    );
    // What setup fetched is in the template: a sandbox of it reads it (with no network).
    let out = h.run(&["exec", "t", "--", "cat", "/app/fetched"]).ok();
    assert!(
        out.stdout().contains("host=allowed.test"),
        "{}",
        out.stdout()
    );
    h.assert_clean();
}

/// templates/pip: setup installs a package from PyPI through the gateway (the build may
/// reach PyPI's index and file host, and nothing else), and a sandbox of it imports it.
/// This test reaches the real PyPI, as `pip install` does.
#[test]
fn the_pip_template_installs_from_pypi_through_the_gateway() {
    let _ = internet::Internet::shared; // (the other tests of this binary use it)
    let mut h = Home::new();
    for var in ["THAW_EGRESS_NETNS", "THAW_UPSTREAM_DNS"] {
        h.env.push((var.into(), String::new()));
    }
    // Behind a TLS-intercepting proxy (as on CI's machines), builds trust the host's bundle.
    let bundle = std::env::var("SSL_CERT_FILE")
        .ok()
        .filter(|p| Path::new(p).is_file())
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    h.env.push(("THAW_BUILD_CA_BUNDLE".into(), bundle));
    let r = h.run(&[
        "deploy",
        repo_root().join("templates/pip").to_str().unwrap(),
    ]);
    assert_eq!(
        r.code(),
        0,
        "stdout: {}\nstderr: {}",
        r.stdout(),
        r.stderr()
    );
    let out = h
        .run(&[
            "invoke",
            "pip",
            "--payload",
            r#"{"bytes": 123456789}"#,
            "--json",
        ])
        .ok();
    let v = out.json();
    assert_eq!(v["result"]["size"], "123.5 MB", "{v}");
    assert_eq!(v["result"]["humanize"], "4.9.0", "{v}");
    h.assert_clean();
}
