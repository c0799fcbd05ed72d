//! Drives the real guest-init binary over a Unix socket with thaw-protocol frames.
//!
//! guest-init runs as a plain process (not PID 1). When the tests run as root it is started
//! as `nobody`, so nothing it is asked to do (hostname, clock, entropy credit) can change
//! the host: those requests then take their unprivileged paths, which is also what the
//! container tier sees.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thaw_protocol::frame::{read_frame, write_frame};
use thaw_protocol::*;

const NOBODY: u32 = 65534;

struct Guest {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
    unprivileged: bool,
}

impl Guest {
    fn start() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let unprivileged = unsafe { libc::geteuid() } == 0;
        if unprivileged {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let sock = dir.path().join("a.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest-init"));
        cmd.arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"));
        if unprivileged {
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(NOBODY) != 0
                        || libc::setuid(NOBODY) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "guest-init did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Guest {
            child,
            dir,
            sock,
            unprivileged,
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// One exchange on a fresh connection: every response up to the terminal one.
    fn call(&self, req: &Request) -> Vec<Response> {
        exchange(&mut self.connect(), req)
    }

    fn one(&self, req: &Request) -> Response {
        let mut r = self.call(req);
        assert_eq!(r.len(), 1, "{r:?}");
        r.remove(0)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file the (possibly unprivileged) guest can read and execute.
    fn script(&self, name: &str, body: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.to_string_lossy().into_owned()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn exchange(s: &mut UnixStream, req: &Request) -> Vec<Response> {
    write_frame(s, req).unwrap();
    let mut out = Vec::new();
    loop {
        let r: Response = read_frame(s).unwrap();
        let done = r.is_terminal();
        out.push(r);
        if done {
            return out;
        }
    }
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Env::new(),
        cwd: None,
        stdin: None,
        limits: TaskLimits::default(),
    }
}

fn sh(script: &str) -> ExecRequest {
    exec(&["/bin/sh", "-c", script])
}

/// (stdout, stderr, started pid, terminal response)
fn split_exec(rs: Vec<Response>) -> (Vec<u8>, Vec<u8>, Option<u32>, Response) {
    let (mut out, mut err, mut pid) = (Vec::new(), Vec::new(), None);
    let mut it = rs.into_iter().peekable();
    let mut last = None;
    for r in it.by_ref() {
        match r {
            Response::Started { pid: p } => {
                assert!(pid.is_none() && out.is_empty() && err.is_empty());
                pid = Some(p);
            }
            Response::Output { stream, data } => match stream {
                Stream::Stdout => out.extend(data.0),
                Stream::Stderr => err.extend(data.0),
            },
            other => last = Some(other),
        }
    }
    (out, err, pid, last.unwrap())
}

static MARK: AtomicU32 = AtomicU32::new(0);

/// A sleep duration unique to this test run, usable as a /proc marker.
fn marker() -> String {
    format!(
        "{}.{}{}",
        5000 + MARK.fetch_add(1, Ordering::Relaxed),
        std::process::id(),
        7
    )
}

fn procs_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        // Zombies have an empty cmdline: they are dead already.
        if cmd.contains(marker) {
            found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    found
}

fn assert_gone(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = procs_with(marker);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left running: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ping_and_hello() {
    let g = Guest::start();
    match g.one(&Request::Ping) {
        Response::Pong {
            version,
            pid,
            handler_ready,
            ..
        } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(pid, g.child.id());
            assert!(!handler_ready);
        }
        other => panic!("{other:?}"),
    }
    match g.one(&Request::Hello { version: 1 }) {
        Response::Hello { version, agent } => {
            assert_eq!(version, 1);
            assert!(agent.starts_with("guest-init "), "{agent}");
        }
        other => panic!("{other:?}"),
    }
    match g.one(&Request::Hello { version: 7 }) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::UnsupportedVersion);
            assert!(message.contains("v7"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn exec_streams_output_and_exit_code() {
    let g = Guest::start();
    let (out, err, pid, end) =
        split_exec(g.call(&Request::Exec(sh("echo out; echo err >&2; exit 3"))));
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    assert!(pid.unwrap() > 0);
    match end {
        Response::Exited {
            outcome, truncated, ..
        } => {
            assert_eq!(outcome, Outcome::Exited { code: 3 });
            assert!(!truncated);
        }
        other => panic!("{other:?}"),
    }
    // A task starts with no blocked signals (the supervisor blocks several).
    let (out, _, _, _) = split_exec(g.call(&Request::Exec(exec(&[
        "grep",
        "SigBlk",
        "/proc/self/status",
    ]))));
    assert_eq!(out, b"SigBlk:\t0000000000000000\n");
    // stdin, cwd and the environment a task starts with.
    let mut req = sh("cat; pwd; echo \"$HOME $PATH\"");
    req.stdin = Some(Bytes(b"piped\n".to_vec()));
    req.cwd = Some("/".into());
    let (out, _, _, end) = split_exec(g.call(&Request::Exec(req)));
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("piped\n/\n"), "{out}");
    assert!(out.contains("/root /usr/local/sbin:"), "{out}");
    assert!(matches!(
        end,
        Response::Exited {
            outcome: Outcome::Exited { code: 0 },
            ..
        }
    ));
}

#[test]
fn spawn_failures_name_the_program() {
    let g = Guest::start();
    match g.one(&Request::Exec(exec(&["/nonexistent/prog", "x"]))) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::SpawnFailed);
            assert!(message.contains("/nonexistent/prog"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let p = g.path("noexec");
    std::fs::write(&p, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    match g.one(&Request::Exec(exec(&[p.to_str().unwrap()]))) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::SpawnFailed);
            assert!(message.contains("ermission denied"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut req = exec(&["true"]);
    req.cwd = Some("/nonexistent-dir".into());
    match g.one(&Request::Exec(req)) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::SpawnFailed);
            assert!(message.contains("/nonexistent-dir"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn timeout_kills_a_daemonizing_tree() {
    let g = Guest::start();
    let m = marker();
    let mut req = sh(&format!(
        "setsid sleep {m} & (sleep {m} &) ; echo started; sleep {m}"
    ));
    req.limits.timeout_ms = Some(700);
    let t = Instant::now();
    let (out, _, _, end) = split_exec(g.call(&Request::Exec(req)));
    assert_eq!(out, b"started\n");
    match end {
        Response::Exited { outcome, .. } => assert_eq!(outcome, Outcome::Timeout),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_gone(&m);
}

#[test]
fn background_processes_die_with_the_task() {
    let g = Guest::start();
    let m = marker();
    let (_, _, _, end) = split_exec(g.call(&Request::Exec(sh(&format!(
        "setsid sleep {m} >/dev/null 2>&1 & exit 0"
    )))));
    assert!(matches!(
        end,
        Response::Exited {
            outcome: Outcome::Exited { code: 0 },
            ..
        }
    ));
    assert_gone(&m);
}

#[test]
fn output_cap_truncates() {
    let g = Guest::start();
    let mut req = sh("head -c 100000 /dev/zero; echo tail >&2");
    req.limits.output_cap = 1000;
    let (out, err, _, end) = split_exec(g.call(&Request::Exec(req)));
    assert_eq!(out.len() + err.len(), 1000);
    match end {
        Response::Exited {
            outcome, truncated, ..
        } => {
            assert_eq!(outcome, Outcome::Exited { code: 0 });
            assert!(truncated);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn signal_outcome() {
    let g = Guest::start();
    let (_, _, _, end) = split_exec(g.call(&Request::Exec(sh("kill -TERM $$"))));
    match end {
        Response::Exited { outcome, .. } => assert_eq!(outcome, Outcome::Signaled { signal: 15 }),
        other => panic!("{other:?}"),
    }
}

fn configure(g: &Guest, command: &[&str], mode: HandlerMode) -> Response {
    g.one(&Request::Configure(HandlerConfig {
        command: command.iter().map(|s| s.to_string()).collect(),
        mode,
        cwd: None,
        env: [("HANDLER_VAR".to_string(), "h".to_string())]
            .into_iter()
            .collect(),
        start_timeout_ms: Some(20_000),
    }))
}

fn invoke(g: &Guest, payload: serde_json::Value) -> (Vec<u8>, Response) {
    let rs = g.call(&Request::Invoke(InvokeRequest {
        payload,
        env: [("REQ_VAR".to_string(), "r".to_string())]
            .into_iter()
            .collect(),
        limits: TaskLimits {
            timeout_ms: Some(20_000),
            output_cap: DEFAULT_OUTPUT_CAP,
        },
    }));
    let (out, err, pid, end) = split_exec(rs);
    assert!(out.is_empty() && pid.is_none());
    (err, end)
}

#[test]
fn invoke_exec_mode() {
    let g = Guest::start();
    match g.one(&Request::Invoke(InvokeRequest {
        payload: serde_json::json!(1),
        env: Env::new(),
        limits: TaskLimits::default(),
    })) {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::NoHandler),
        other => panic!("{other:?}"),
    }
    let ok = g.script(
        "ok.sh",
        "#!/bin/sh\nread line\necho progress >&2\necho \"{\\\"got\\\": $line, \\\"env\\\": \\\"$HANDLER_VAR$REQ_VAR\\\"}\"\n",
    );
    assert_eq!(
        configure(&g, &[&ok], HandlerMode::Exec),
        Response::Configured { warm_ms: 0 }
    );
    let (err, end) = invoke(&g, serde_json::json!({"a": [1, 2]}));
    assert_eq!(err, b"progress\n");
    match end {
        Response::InvokeResult {
            status,
            result,
            outcome,
            ..
        } => {
            assert_eq!(status, InvokeStatus::Ok);
            assert_eq!(
                result.unwrap(),
                serde_json::json!({"got": {"a": [1, 2]}, "env": "hr"})
            );
            assert_eq!(outcome, Some(Outcome::Exited { code: 0 }));
        }
        other => panic!("{other:?}"),
    }

    configure(
        &g,
        &["/bin/sh", "-c", "cat >/dev/null; echo not json"],
        HandlerMode::Exec,
    );
    match invoke(&g, serde_json::json!(null)).1 {
        Response::InvokeResult {
            status, raw_output, ..
        } => {
            assert_eq!(status, InvokeStatus::Error);
            assert_eq!(raw_output.as_deref(), Some("not json\n"));
        }
        other => panic!("{other:?}"),
    }

    configure(
        &g,
        &["/bin/sh", "-c", "echo boom >&2; exit 2"],
        HandlerMode::Exec,
    );
    match invoke(&g, serde_json::json!(null)).1 {
        Response::InvokeResult {
            status,
            stderr_tail,
            outcome,
            ..
        } => {
            assert_eq!(status, InvokeStatus::Error);
            assert_eq!(stderr_tail, "boom\n");
            assert_eq!(outcome, Some(Outcome::Exited { code: 2 }));
        }
        other => panic!("{other:?}"),
    }
}

const WORKER: &str = r#"#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    env = json.loads(line)
    p = env["payload"]
    if isinstance(p, dict) and p.get("crash"):
        sys.stderr.write("dying now\n")
        sys.stderr.flush()
        os._exit(3)
    if isinstance(p, dict) and p.get("hang"):
        import time
        time.sleep(1000)
    if isinstance(p, dict) and p.get("burst"):
        # One write of many lines, then the answer straight after it: the stderr drain
        # has had no chance to read it when the answer arrives.
        sys.stderr.flush()
        burst = "".join("line %05d %s\n" % (i, "x" * 80) for i in range(p["burst"]))
        os.write(2, (burst + "working\n").encode())
        answer = json.dumps({"echo": p, "pid": os.getpid()}) + "\n"
        os.write(1, answer.encode())
        continue
    sys.stderr.write("working\n")
    sys.stderr.flush()
    print(json.dumps({"echo": p, "pid": os.getpid(), "req": env["env"].get("REQ_VAR"),
                      "h": os.environ.get("HANDLER_VAR")}), flush=True)
"#;

#[test]
fn persistent_worker_restarts_after_a_crash() {
    let g = Guest::start();
    let worker = g.script("worker.py", WORKER);
    match configure(&g, &[&worker], HandlerMode::Persistent) {
        Response::Configured { .. } => {}
        other => panic!("{other:?}"),
    }
    let ready = |g: &Guest| match g.one(&Request::Ping) {
        Response::Pong { handler_ready, .. } => handler_ready,
        other => panic!("{other:?}"),
    };
    assert!(ready(&g));
    let pid_of = |r: &Response| match r {
        Response::InvokeResult {
            status: InvokeStatus::Ok,
            result: Some(v),
            ..
        } => v["pid"].as_u64().unwrap(),
        other => panic!("{other:?}"),
    };
    let (err, first) = invoke(&g, serde_json::json!({"n": 1}));
    assert_eq!(err, b"working\n");
    match &first {
        Response::InvokeResult {
            result: Some(v), ..
        } => {
            assert_eq!(v["echo"], serde_json::json!({"n": 1}));
            assert_eq!(v["req"], "r");
            assert_eq!(v["h"], "h");
        }
        other => panic!("{other:?}"),
    }
    let pid1 = pid_of(&first);
    // Warm: the same process serves the next invocation.
    assert_eq!(pid_of(&invoke(&g, serde_json::json!(2)).1), pid1);
    // Everything written to stderr before the answer line is forwarded with that answer,
    // every time: the guest syncs with its stderr drain rather than waiting a while.
    for _ in 0..20 {
        let (err, end) = invoke(&g, serde_json::json!({"burst": 3000}));
        let text = String::from_utf8(err).unwrap();
        assert_eq!(text.lines().count(), 3001, "{end:?}");
        let last = format!("line 02999 {}\nworking\n", "x".repeat(80));
        assert!(
            text.ends_with(&last),
            "{:?}",
            &text[text.len().saturating_sub(200)..]
        );
        assert_eq!(pid_of(&end), pid1);
    }

    match invoke(&g, serde_json::json!({"crash": true})).1 {
        Response::InvokeResult {
            status,
            stderr_tail,
            outcome,
            ..
        } => {
            assert_eq!(status, InvokeStatus::Error);
            assert!(stderr_tail.contains("dying now"), "{stderr_tail:?}");
            assert_eq!(outcome, Some(Outcome::Exited { code: 3 }));
        }
        other => panic!("{other:?}"),
    }
    assert!(!ready(&g));
    let pid2 = pid_of(&invoke(&g, serde_json::json!(3)).1);
    assert_ne!(pid1, pid2);
    assert!(ready(&g));
}

#[test]
fn persistent_worker_timeout_and_bad_start() {
    let g = Guest::start();
    let worker = g.script("worker.py", WORKER);
    configure(&g, &[&worker], HandlerMode::Persistent);
    let rs = g.call(&Request::Invoke(InvokeRequest {
        payload: serde_json::json!({"hang": true}),
        env: Env::new(),
        limits: TaskLimits {
            timeout_ms: Some(500),
            output_cap: DEFAULT_OUTPUT_CAP,
        },
    }));
    match rs.last().unwrap() {
        Response::InvokeResult { status, .. } => assert_eq!(*status, InvokeStatus::Timeout),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        invoke(&g, serde_json::json!(1)).1,
        Response::InvokeResult {
            status: InvokeStatus::Ok,
            ..
        }
    ));

    match configure(
        &g,
        &["/bin/sh", "-c", "echo warming up >&2; echo hello"],
        HandlerMode::Persistent,
    ) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::HandlerFailed);
            assert!(message.contains("hello"), "{message}");
            assert!(message.contains("warming up"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match configure(&g, &["/bin/sh", "-c", "exit 4"], HandlerMode::Persistent) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::HandlerFailed);
            assert!(message.contains("exit code 4"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn files() {
    let g = Guest::start();
    let p = g.path("sub/dir/f.txt").to_string_lossy().into_owned();
    let write = |data: &[u8], append| Request::WriteFile {
        path: p.clone(),
        data: Bytes(data.to_vec()),
        mode: None,
        append,
    };
    assert_eq!(g.one(&write(b"hello ", false)), Response::Ok);
    assert_eq!(g.one(&write(b"world", true)), Response::Ok);
    assert_eq!(
        g.one(&Request::ReadFile {
            path: p.clone(),
            max_bytes: None
        }),
        Response::FileData {
            data: Bytes(b"hello world".to_vec()),
            truncated: false
        }
    );
    assert_eq!(
        g.one(&Request::ReadFile {
            path: p.clone(),
            max_bytes: Some(5)
        }),
        Response::FileData {
            data: Bytes(b"hello".to_vec()),
            truncated: true
        }
    );
    match g.one(&Request::ListDir {
        path: g.path("sub/dir").to_string_lossy().into_owned(),
    }) {
        Response::DirEntries { entries } => assert_eq!(
            entries,
            vec![DirEntry {
                name: "f.txt".into(),
                kind: FileKind::File,
                size: 11,
                mode: 0o644
            }]
        ),
        other => panic!("{other:?}"),
    }
    let missing = g.path("missing").to_string_lossy().into_owned();
    match g.one(&Request::ReadFile {
        path: missing.clone(),
        max_bytes: None,
    }) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotFound);
            assert!(message.contains(&missing), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn env_identity_entropy_clock() {
    let g = Guest::start();
    let env: Env = [("FOO".to_string(), "bar".to_string())]
        .into_iter()
        .collect();
    assert_eq!(
        g.one(&Request::SetEnv {
            env,
            replace: false
        }),
        Response::Ok
    );
    // Setting the hostname it already has is allowed even without privilege.
    let hostname = String::from_utf8(std::fs::read("/proc/sys/kernel/hostname").unwrap())
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        g.one(&Request::SetIdentity {
            hostname: hostname.clone(),
            sandbox_id: "sb-42".into()
        }),
        Response::Ok
    );
    assert_eq!(
        std::fs::read_to_string(g.path("state/sandbox-id")).unwrap(),
        "sb-42\n"
    );
    let mut req = sh("echo $FOO $THAW_SANDBOX_ID $BAZ");
    req.env.insert("BAZ".into(), "qux".into());
    let (out, _, _, _) = split_exec(g.call(&Request::Exec(req)));
    assert_eq!(out, b"bar sb-42 qux\n");
    match g.one(&Request::Ping) {
        Response::Pong { sandbox_id, .. } => assert_eq!(sandbox_id, "sb-42"),
        other => panic!("{other:?}"),
    }
    if g.unprivileged {
        match g.one(&Request::SetIdentity {
            hostname: format!("{hostname}-other"),
            sandbox_id: "sb-43".into(),
        }) {
            Response::Error { code, .. } => assert_eq!(code, ErrorCode::PermissionDenied),
            other => panic!("{other:?}"),
        }
    }

    match g.one(&Request::AddEntropy {
        data: Bytes(vec![7u8; 32]),
    }) {
        Response::Entropy { method, bytes } => {
            assert_eq!(bytes, 32);
            if g.unprivileged {
                assert_eq!(method, EntropyMethod::Mixed);
            }
        }
        other => panic!("{other:?}"),
    }

    // Only ever exercised unprivileged: as root this would really set the host's clock.
    if g.unprivileged {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        assert_eq!(
            g.one(&Request::SetClock { unix_nanos: now }),
            Response::Clock { applied: false }
        );
    }
}

#[test]
fn malformed_frames() {
    let g = Guest::start();
    let mut s = g.connect();
    for body in [&b"{\"op\":\"format_disk\"}"[..], b"not json at all"] {
        s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        s.write_all(body).unwrap();
        match read_frame::<_, Response>(&mut s).unwrap() {
            Response::Error { code, .. } => assert_eq!(code, ErrorCode::BadRequest),
            other => panic!("{other:?}"),
        }
    }
    // Still usable.
    assert!(matches!(
        exchange(&mut s, &Request::Ping)[0],
        Response::Pong { .. }
    ));
    // An oversized length is answered, then the connection is closed.
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    match read_frame::<_, Response>(&mut s).unwrap() {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::BadRequest),
        other => panic!("{other:?}"),
    }
    assert!(read_frame::<_, Response>(&mut s).unwrap_err().is_closed());
    // The server itself is fine.
    assert!(matches!(g.one(&Request::Ping), Response::Pong { .. }));
}

#[test]
fn closing_the_connection_cancels_the_task() {
    let g = Guest::start();
    let m = marker();
    let mut s = g.connect();
    write_frame(
        &mut s,
        &Request::Exec(sh(&format!("setsid sleep {m} & echo up; sleep {m}"))),
    )
    .unwrap();
    assert!(matches!(
        read_frame::<_, Response>(&mut s).unwrap(),
        Response::Started { .. }
    ));
    match read_frame::<_, Response>(&mut s).unwrap() {
        Response::Output { data, .. } => assert_eq!(data.0, b"up\n"),
        other => panic!("{other:?}"),
    }
    assert!(!procs_with(&m).is_empty());
    drop(s);
    assert_gone(&m);
    assert!(matches!(g.one(&Request::Ping), Response::Pong { .. }));
}

#[test]
fn concurrent_execs_and_shutdown() {
    let mut g = Guest::start();
    let t = Instant::now();
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let sock = g.sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(sock).unwrap();
                split_exec(exchange(&mut s, &Request::Exec(sh("sleep 1; echo done")))).0
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), b"done\n");
    }
    assert!(
        t.elapsed() < Duration::from_millis(2800),
        "{:?}",
        t.elapsed()
    );

    let m = marker();
    let mut bg = g.connect();
    write_frame(&mut bg, &Request::Exec(sh(&format!("sleep {m}")))).unwrap();
    assert!(matches!(
        read_frame::<_, Response>(&mut bg).unwrap(),
        Response::Started { .. }
    ));
    assert_eq!(g.one(&Request::Shutdown), Response::Ok);
    let status = g.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_gone(&m);
    assert!(!Path::new(&g.sock).exists());
}
