//! The HTTP server under hostile or careless clients: the real `thaw serve` binary on a real
//! loopback socket, real sandboxes. Idle and slowloris connections, SIGTERM, clients that
//! disconnect mid-call, bodies no process could be given, timeouts over their caps, a
//! key's sandbox count, `Retry-After`, and errors that must come before a stream starts.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thaw_api::{Client, ExecBody, InvokeBody, SessionCreateBody};
use thaw_e2e::{leaked_cgroups, repo_root, sandbox_procs, Home};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `thaw serve` child process on 127.0.0.1:<free port>.
struct Serve {
    home: Home,
    addr: String,
    child: Child,
    log: tempfile::NamedTempFile,
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A new key's secret, made by the CLI in `home` (before or while a server runs there).
fn key(home: &Home, max_sandboxes: u32) -> String {
    let created = home
        .run(&[
            "--json",
            "keys",
            "create",
            "--name",
            "hostile",
            "--max-sandboxes",
            &max_sandboxes.to_string(),
        ])
        .ok()
        .json();
    created["secret"].as_str().expect("secret").to_string()
}

impl Serve {
    async fn start(home: Home, args: &[&str]) -> Serve {
        let log = tempfile::NamedTempFile::new().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = home
            .cmd()
            .args(["serve", "--listen", &addr])
            .args(args)
            .env("THAW_LOG", "thaw_server=info,thaw=info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("spawn thaw serve");
        let mut s = Serve {
            home,
            addr,
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(s.url("/healthz")).await {
                if r.status() == 200 {
                    break;
                }
            }
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("thaw serve exited with {status}:\n{}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "thaw serve never answered:\n{}",
                s.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn client(&self, secret: &str) -> Client {
        Client::new(&self.url(""), Some(secret.to_string())).expect("client")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    async fn deploy_shell(&self, secret: &str) {
        self.client(secret)
            .deploy_dir(&repo_root().join("templates/shell"))
            .await
            .expect("deploy templates/shell");
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal thaw serve");
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("thaw serve did not exit within {within:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server with SIGINT and checks that nothing of its sandboxes is left.
    async fn finish(mut self) {
        self.signal(nix::sys::signal::Signal::SIGINT);
        let status = self.wait_exit(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "thaw serve exited with {status}:\n{}",
            self.log()
        );
        self.home.assert_clean();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A failed test must not leave the server running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sandbox directories of this home (live, discarded-but-not-yet-removed, or prepared).
fn sandbox_dirs(home: &Path) -> usize {
    std::fs::read_dir(home.join("sandboxes"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// Names (ids) of this home's sandbox directories.
fn sandbox_ids(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("sandboxes"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `cond` every 20 ms until it holds; the time it took, or `None` after `within`.
async fn within(within: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the server has closed this connection: EOF or an error, or a response (the
/// 503 of a server at its cap), within `wait`.
async fn closed_by_server(rd: &mut tokio::net::tcp::OwnedReadHalf, wait: Duration) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(wait, rd.read(&mut buf)).await {
        Ok(Ok(_)) | Ok(Err(_)) => true,
        Err(_) => false,
    }
}

/// Opens a connection and sends a request head one byte every `every`, never finishing
/// it (slowloris); returns the read half. The writer stops when the server closes.
async fn slowloris(addr: &str, every: Duration) -> tokio::net::tcp::OwnedReadHalf {
    let (rd, mut wr) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    tokio::spawn(async move {
        let head = b"GET /healthz HTTP/1.1\r\nHost: thaw\r\nX-Slow: ";
        for &b in head.iter().chain(std::iter::repeat(&b'a')) {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    rd
}

async fn idle(addr: &str) -> tokio::net::tcp::OwnedReadHalf {
    let (rd, wr) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    // Keep the write side open (a half-closed client is not idle, it is leaving).
    std::mem::forget(wr);
    rd
}

async fn healthz_in(s: &Serve, limit: Duration) {
    let started = Instant::now();
    // A fresh client: a new connection, as a load balancer's probe makes.
    let r = reqwest::Client::new()
        .get(s.url("/healthz"))
        .timeout(limit)
        .send()
        .await
        .unwrap_or_else(|e| panic!("/healthz did not answer within {limit:?}: {e}"));
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < limit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_capped_and_cannot_starve_the_server() {
    // The cap: 8 connections, a header timeout long enough not to be what closes them.
    let home = Home::new();
    let secret = key(&home, 2);
    let s = Serve::start(
        home,
        &[
            "--max-connections",
            "8",
            "--header-read-timeout",
            "60",
            "--prepared",
            "0",
        ],
    )
    .await;
    s.deploy_shell(&secret).await;
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(idle(&s.addr).await);
    }
    for _ in 0..10 {
        conns.push(slowloris(&s.addr, Duration::from_millis(100)).await);
    }
    // 30 connections held open against a cap of 8: probes and calls still answer at once.
    for _ in 0..3 {
        healthz_in(&s, Duration::from_secs(2)).await;
    }
    let c = Client::new(&s.url(""), Some(secret.clone())).unwrap();
    let inv = c
        .invoke(
            "shell",
            &InvokeBody {
                payload: json!("still here"),
                ..InvokeBody::default()
            },
        )
        .await
        .expect("an invocation while idle connections fill the cap");
    assert_eq!(serde_json::to_value(&inv).unwrap()["status"], "ok");
    // The server closed the oldest idle ones to stay under its cap.
    let mut closed = 0;
    for rd in &mut conns {
        if closed_by_server(rd, Duration::from_millis(100)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 30 - 8,
        "only {closed} of 30 idle connections were closed with --max-connections 8"
    );
    let m = c.metrics().await.unwrap();
    let open: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("thaw_open_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no thaw_open_connections in {m}"));
    assert!(open <= 8, "{open} connections open over a cap of 8");
    drop(conns);
    s.finish().await;

    // The header-read timeout: an idle connection and a slowloris one (sending a byte
    // every 200 ms, so never idle) are both closed about 1 s after they connect.
    let home = Home::new();
    let secret = key(&home, 1);
    let s = Serve::start(home, &["--header-read-timeout", "1", "--prepared", "0"]).await;
    let started = Instant::now();
    let mut silent = idle(&s.addr).await;
    let mut slow = slowloris(&s.addr, Duration::from_millis(200)).await;
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(4)).await,
        "an idle connection was still open after 4 s with --header-read-timeout 1"
    );
    assert!(
        closed_by_server(&mut slow, Duration::from_secs(4)).await,
        "a slowloris connection was still open after 4 s with --header-read-timeout 1"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}, not about 1 s"
    );
    healthz_in(&s, Duration::from_secs(2)).await;

    // A body that stalls (10 of 100 bytes, then nothing) is refused with 408 after the
    // same timeout, and its connection closed.
    let mut conn = TcpStream::connect(&s.addr).await.unwrap();
    let head = format!(
        "POST /v1/templates/shell/invoke HTTP/1.1\r\nHost: thaw\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"payload\""
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(4), conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok() && answer.starts_with("HTTP/1.1 408"),
        "a stalled body after {:?}: {answer}",
        started.elapsed()
    );
    assert!(answer.contains("stalled"), "{answer}");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_like_sigint() {
    let home = Home::new();
    let secret = key(&home, 4);
    // Prepared sandboxes (the default) must be torn down too.
    let mut s = Serve::start(home, &["--prepared", "2"]).await;
    s.deploy_shell(&secret).await;
    let c = s.client(&secret);
    c.invoke("shell", &InvokeBody::default()).await.unwrap();
    assert!(
        within(Duration::from_secs(10), || sandbox_dirs(s.home.path()) >= 1)
            .await
            .is_some(),
        "no prepared sandbox appeared"
    );
    // A call in flight when SIGTERM comes is settled, not abandoned.
    let resp = reqwest::Client::new()
        .post(s.url("/v1/templates/shell/exec"))
        .bearer_auth(&secret)
        .header("accept", "application/x-ndjson")
        .json(&ExecBody::new(["sh", "-c", "sleep 3; echo settled"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = within(Duration::from_secs(10), || {
        !sandbox_procs(s.home.path(), "sleep 3").is_empty()
    });
    assert!(started.await.is_some(), "the exec never started");
    // The exec's sandbox and the prepared ones: none may keep a cgroup.
    let ids = sandbox_ids(s.home.path());
    assert!(ids.len() >= 2, "{ids:?}");
    s.signal(nix::sys::signal::Signal::SIGTERM);
    let text = resp.text().await.expect("the stream ends normally");
    assert!(text.contains("settled"), "{text}");
    assert!(text.contains("\"event\":\"exit\""), "{text}");
    let status = s.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "thaw serve exited with {status} on SIGTERM:\n{}",
        s.log()
    );
    let log = s.log();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("shut down"), "{log}");
    assert_eq!(leaked_cgroups(&ids), Vec::<String>::new());
    assert_eq!(sandbox_procs(s.home.path(), ""), Vec::<u32>::new());
    s.home.assert_clean();
}

/// Sends a request on a raw connection and returns it (nothing read).
async fn raw_request(
    addr: &str,
    method: &str,
    path: &str,
    secret: &str,
    accept: &str,
    body: &Value,
) -> TcpStream {
    let body = body.to_string();
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: thaw\r\nAuthorization: Bearer {secret}\r\nAccept: {accept}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.expect("send");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_call_and_frees_its_sandbox() {
    let home = Home::new();
    let secret = key(&home, 1);
    let s = Serve::start(home, &["--prepared", "0"]).await;
    s.deploy_shell(&secret).await;
    let c = s.client(&secret);
    let h = s.home.path().to_path_buf();
    let exec = json!({"argv": ["sh", "-c", "sleep 8; echo never"]});
    for accept in ["application/json", "application/x-ndjson"] {
        let conn = raw_request(
            &s.addr,
            "POST",
            "/v1/templates/shell/exec",
            &secret,
            accept,
            &exec,
        )
        .await;
        assert!(
            within(Duration::from_secs(10), || !sandbox_procs(&h, "sleep 8")
                .is_empty())
            .await
            .is_some(),
            "the exec never started ({accept})"
        );
        let ids = sandbox_ids(&h);
        drop(conn);
        // The task is killed and its sandbox torn down within a second...
        let gone = within(Duration::from_secs(5), || {
            sandbox_procs(&h, "sleep 8").is_empty()
                && sandbox_dirs(&h) == 0
                && leaked_cgroups(&ids).is_empty()
        })
        .await;
        assert!(
            gone.is_some_and(|t| t < Duration::from_secs(1)),
            "the sandbox of a disconnected call ({accept}) went after {gone:?}"
        );
        // ...and the key's only slot is free: the next call is not refused.
        let inv = c
            .invoke("shell", &InvokeBody::default())
            .await
            .unwrap_or_else(|e| panic!("after a disconnected {accept} call: {e}"));
        assert_eq!(serde_json::to_value(&inv).unwrap()["status"], "ok");
    }

    // A call into a session: the task is killed, the session stays.
    let sess = c
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .unwrap();
    for accept in ["application/json", "application/x-ndjson"] {
        let path = format!("/v1/sessions/{}/exec", sess.id);
        let conn = raw_request(&s.addr, "POST", &path, &secret, accept, &exec).await;
        assert!(
            within(Duration::from_secs(10), || !sandbox_procs(&h, "sleep 8")
                .is_empty())
            .await
            .is_some(),
            "the session exec never started ({accept})"
        );
        drop(conn);
        let gone = within(Duration::from_secs(5), || {
            sandbox_procs(&h, "sleep 8").is_empty()
        })
        .await;
        assert!(
            gone.is_some_and(|t| t < Duration::from_secs(1)),
            "the task of a disconnected session call ({accept}) went after {gone:?}"
        );
        let out = c
            .session_exec(&sess.id, &ExecBody::new(["echo", "alive"]))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
    }
    c.session_delete(&sess.id).await.unwrap();
    s.finish().await;
}

async fn refusal(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = resp.text().await.unwrap();
    assert!(ct.starts_with("application/json"), "{status} {ct}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty() && !msg.contains('\n'), "{body}");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_timeouts_over_their_caps_are_refused_before_any_sandbox() {
    let home = Home::new();
    let secret = key(&home, 1);
    let s = Serve::start(
        home,
        &[
            "--prepared",
            "0",
            "--max-call-timeout",
            "5",
            "--max-session-idle",
            "60",
            "--max-session-lifetime",
            "120",
        ],
    )
    .await;
    s.deploy_shell(&secret).await;
    let c = s.client(&secret);
    // The key's only slot is held by a session: a body refused with 400 (not 429) was
    // checked before any slot was taken, so before any sandbox was restored.
    let sess = c
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |path: String, body: Value, accept: &'static str| {
        http.post(s.url(&path))
            .bearer_auth(&secret)
            .header("accept", accept)
            .json(&body)
            .send()
    };
    let sx = format!("/v1/sessions/{}/exec", sess.id);
    let si = format!("/v1/sessions/{}/invoke", sess.id);
    let te = "/v1/templates/shell/exec".to_string();
    let ti = "/v1/templates/shell/invoke".to_string();
    let nul_env = json!({"A": "x\u{0}y"});
    let cases: Vec<(String, Value, &str, &[&str])> = vec![
        (te.clone(), json!({"argv": []}), "argv", &["empty"]),
        (sx.clone(), json!({"argv": []}), "argv", &["empty"]),
        (
            te.clone(),
            json!({"argv": ["sh", "-c", "echo a\u{0}b"]}),
            "argv[2]",
            &["NUL"],
        ),
        (
            sx.clone(),
            json!({"argv": ["echo\u{0}"]}),
            "argv[0]",
            &["NUL"],
        ),
        (
            te.clone(),
            json!({"argv": ["true"], "env": nul_env}),
            "env.A",
            &["NUL"],
        ),
        (
            sx.clone(),
            json!({"argv": ["true"], "env": nul_env}),
            "env.A",
            &["NUL"],
        ),
        (ti.clone(), json!({"env": nul_env}), "env.A", &["NUL"]),
        (si.clone(), json!({"env": nul_env}), "env.A", &["NUL"]),
        (
            te.clone(),
            json!({"argv": ["true"], "env": {"": "x"}}),
            "env",
            &["empty name"],
        ),
        (
            te.clone(),
            json!({"argv": ["true"], "env": {"A=B": "x"}}),
            "env.A=B",
            &["`=`"],
        ),
        (
            sx.clone(),
            json!({"argv": ["true"], "env": {"A=B": "x"}}),
            "env.A=B",
            &["`=`"],
        ),
        (
            "/v1/sessions".into(),
            json!({"template": "shell", "env": {"A": "\u{0}"}}),
            "env.A",
            &["NUL"],
        ),
        // shell's limits.timeout_s is 10; this server's maximum is 5 s.
        (
            ti.clone(),
            json!({"timeout_ms": 10_001}),
            "timeout_ms",
            &["10001", "10000 ms", "limits.timeout_s = 10"],
        ),
        (
            te.clone(),
            json!({"argv": ["true"], "timeout_ms": 6000}),
            "timeout_ms",
            &["6000", "5000 ms", "--max-call-timeout"],
        ),
        (
            sx.clone(),
            json!({"argv": ["true"], "timeout_ms": 6000}),
            "timeout_ms",
            &["6000", "5000 ms"],
        ),
        (
            si.clone(),
            json!({"timeout_ms": 999_999_999}),
            "timeout_ms",
            &["999999999", "10000 ms"],
        ),
        (
            ti.clone(),
            json!({"timeout_ms": 0}),
            "timeout_ms",
            &["at least 1"],
        ),
        (
            "/v1/sessions".into(),
            json!({"template": "shell", "idle_timeout_s": 61}),
            "idle_timeout_s",
            &["61", "60 s", "--max-session-idle"],
        ),
        (
            "/v1/sessions".into(),
            json!({"template": "shell", "max_lifetime_s": 121}),
            "max_lifetime_s",
            &["121", "120 s", "--max-session-lifetime"],
        ),
        (
            format!("/v1/sessions/{}/extend", sess.id),
            json!({"max_lifetime_s": 1_000_000}),
            "max_lifetime_s",
            &["1000000", "120 s"],
        ),
        (
            format!("/v1/sessions/{}/extend", sess.id),
            json!({"idle_timeout_s": 0}),
            "idle_timeout_s",
            &["at least 1"],
        ),
    ];
    for (path, body, field, words) in &cases {
        for accept in ["application/json", "application/x-ndjson"] {
            let (status, err) =
                refusal(post(path.clone(), body.clone(), accept).await.unwrap()).await;
            assert_eq!(status, 400, "{path} {body} ({accept}): {err}");
            assert_eq!(err["error"]["path"], *field, "{path} {body}: {err}");
            let msg = err["error"]["message"].as_str().unwrap();
            for w in *words {
                assert!(msg.contains(w), "{path} {body}: `{w}` not in: {msg}");
            }
        }
    }
    assert_eq!(sandbox_dirs(s.home.path()), 1, "only the session's sandbox");
    // Within the caps, calls run.
    let out = c
        .session_exec(
            &sess.id,
            &ExecBody {
                timeout_ms: Some(5000),
                env: BTreeMap::from([("A".to_string(), "b=c".to_string())]),
                ..ExecBody::new(["sh", "-c", "echo $A"])
            },
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b=c\n");

    // An error known before a stream starts is its status, not 200 and an error event.
    c.session_pause(&sess.id).await.unwrap();
    for (path, body) in [
        (sx.clone(), json!({"argv": ["true"]})),
        (si.clone(), json!({})),
    ] {
        for accept in ["application/x-ndjson", "application/json"] {
            let (status, err) =
                refusal(post(path.clone(), body.clone(), accept).await.unwrap()).await;
            assert_eq!(status, 409, "{path} ({accept}): {err}");
            assert_eq!(err["error"]["code"], "session_conflict", "{err}");
            let msg = err["error"]["message"].as_str().unwrap();
            assert!(msg.contains("paused") && msg.contains("resume"), "{msg}");
        }
    }
    let (status, err) = refusal(
        post(
            "/v1/sessions/nope/exec".into(),
            json!({"argv": ["true"]}),
            "application/x-ndjson",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{err}");
    let (status, err) = refusal(
        post(
            "/v1/sessions/nope/invoke".into(),
            json!({}),
            "application/x-ndjson",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{err}");
    let (status, err) = refusal(
        post(
            "/v1/templates/nope/exec".into(),
            json!({"argv": ["true"]}),
            "application/x-ndjson",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{err}");
    c.session_delete(&sess.id).await.unwrap();
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_counts_each_sandbox_once_and_429_says_when_to_retry() {
    let home = Home::new();
    let secret = key(&home, 2);
    let s = Serve::start(home, &["--prepared", "0"]).await;
    s.deploy_shell(&secret).await;
    let c = s.client(&secret);

    // A session being created holds one of the key's two slots, not two: an invocation
    // made while it is `creating` runs.
    let creating = {
        let c = c.clone();
        tokio::spawn(async move { c.session_create(&SessionCreateBody::new("shell")).await })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = c.sessions().await.unwrap();
        if list
            .iter()
            .any(|x| serde_json::to_value(x.state).unwrap() == "creating")
        {
            break;
        }
        assert!(
            !creating.is_finished() && Instant::now() < deadline,
            "never saw the session `creating`"
        );
    }
    let inv = c
        .invoke("shell", &InvokeBody::default())
        .await
        .expect("an invocation next to a session being created, under max_sandboxes 2");
    assert_eq!(serde_json::to_value(&inv).unwrap()["status"], "ok");
    let sess = creating.await.unwrap().expect("the session");

    // One running session and one exec in flight: a third sandbox is refused, with
    // Retry-After.
    let resp = reqwest::Client::new()
        .post(s.url("/v1/templates/shell/exec"))
        .bearer_auth(&secret)
        .header("accept", "application/x-ndjson")
        .json(&ExecBody::new(["sh", "-c", "sleep 2; echo done"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let third = reqwest::Client::new()
        .post(s.url("/v1/templates/shell/invoke"))
        .bearer_auth(&secret)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(
        third
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "{:?}",
        third.headers()
    );
    let (_, err) = refusal(third).await;
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("limit of 2") && msg.contains("retry"), "{msg}");
    let m = c.metrics().await.unwrap();
    assert!(m.contains("thaw_live_sandboxes 2"), "{m}");
    assert!(resp.text().await.unwrap().contains("done"));

    // A resume counts once too: paused, then resumed next to an invocation.
    c.session_pause(&sess.id).await.unwrap();
    let resuming = {
        let (c, id) = (c.clone(), sess.id.clone());
        tokio::spawn(async move { c.session_resume(&id).await })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = serde_json::to_value(c.session(&sess.id).await.unwrap().state).unwrap();
        if st == "resuming" {
            break;
        }
        assert!(
            !resuming.is_finished() && Instant::now() < deadline,
            "never saw the session `resuming`"
        );
    }
    c.invoke("shell", &InvokeBody::default())
        .await
        .expect("an invocation next to a session being resumed, under max_sandboxes 2");
    resuming.await.unwrap().expect("resumed");
    c.session_delete(&sess.id).await.unwrap();
    s.finish().await;
}
