//! End-to-end tests of the egress gateway: real sandboxes (runc, CRIU) of `templates/python`
//! and `templates/shell` through a real `thaw serve` router, reaching a test-made "internet"
//! in a network namespace of its own ([`internet`]). No packet goes to any other address: a
//! denied destination is proven by the gateway's refusal and by the internet's servers never
//! seeing it.

#[path = "common/internet.rs"]
mod internet;

use std::time::Instant;

use serde_json::Value;
use thaw_api::{Client, ExecBody, ForkBody, SessionCreateBody};
use thaw_e2e::inproc::Server;
use thaw_e2e::repo_root;

use internet::{Internet, ALLOWED, OTHER, RAW, WILD};

/// The sandbox's side of each check: one operation, one JSON line out.
const CLIENT: &str = r#"
import json, os, socket, ssl, sys
op, a = sys.argv[1], sys.argv[2:]
def out(**k):
    print(json.dumps(k)); sys.exit(0)
def read_all(s):
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            return data
        data += b
try:
    if op == "resolve":
        out(ok=True, addrs=sorted({ai[4][0] for ai in socket.getaddrinfo(a[0], 80, socket.AF_INET)}))
    if op == "http":
        s = socket.create_connection((a[0], int(a[1])), timeout=5)
        auth = ("Authorization: Bearer %s\r\n" % os.environ[a[4]]) if len(a) > 4 else ""
        s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n%s\r\n" % (a[3] if len(a) > 3 else "/hello", a[2], auth)).encode())
        out(ok=True, body=read_all(s).decode(errors="replace"))
    if op == "tls":
        ctx = ssl.create_default_context(cafile=a[3]) if a[3] != "-" else ssl.create_default_context()
        s = socket.create_connection((a[0], int(a[1])), timeout=5)
        t = ctx.wrap_socket(s, server_hostname=a[2])
        auth = ("Authorization: Bearer %s\r\n" % os.environ[a[4]]) if len(a) > 4 else ""
        t.sendall(("GET /hello HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" % (a[2], auth)).encode())
        out(ok=True, body=read_all(t).decode(errors="replace"))
    if op == "raw":
        s = socket.create_connection((a[0], int(a[1])), timeout=5)
        s.sendall(a[2].encode())
        data = s.recv(100)
        out(ok=bool(data), body=data.decode(errors="replace"))
    if op == "env":
        out(ok=True, body=os.environ.get(a[0], ""))
    if op == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"ping", (a[0], int(a[1])))
        out(ok=True, body=s.recv(100).decode())
    out(ok=False, error="unknown op " + op)
except Exception as e:
    out(ok=False, error="%s: %s" % (type(e).__name__, e))
"#;

async fn check(c: &Client, session: &str, args: &[&str], grant: &[&str]) -> Value {
    let mut argv = vec!["python3", "-c", CLIENT];
    argv.extend_from_slice(args);
    let mut body = ExecBody::new(argv);
    body.allow_out = grant.iter().map(|s| s.to_string()).collect();
    run(c, session, body, args).await
}

async fn run(c: &Client, session: &str, body: ExecBody, args: &[&str]) -> Value {
    let o = c.session_exec(session, &body).await.expect("exec");
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {text}; stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// A server with `templates/python` deployed by a new key named `key`, and its client.
async fn python_server(key: &str) -> (Server, Client) {
    let server = Server::start().await;
    let secret = server.key(key, 4);
    let c = server.client(&secret);
    c.deploy_dir(&repo_root().join("templates/python"))
        .await
        .expect("deploy python");
    (server, c)
}

fn ok(v: &Value) -> bool {
    v["ok"].as_bool() == Some(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reaches_what_its_grant_allows_and_nothing_else() {
    let net = Internet::shared();
    let (server, c) = python_server("egress").await;
    let mut body = SessionCreateBody::new("python");
    body.allow_out = [
        "allowed.test",
        "*.wild.test",
        "tls.test:443",
        "203.0.113.40:8080",
        "rebind.test",
        "meta.test",
    ]
    .map(String::from)
    .to_vec();
    body.deny_out = vec!["203.0.113.0/24".into()];
    let s = c.session_create(&body).await.expect("create");
    c.session_write_file(&s.id, "/tmp/ca.pem", net.ca_pem.as_bytes().to_vec(), None)
        .await
        .expect("write ca");

    // Allowed domain over HTTP, through the sandbox's resolver.
    let r = check(&c, &s.id, &["resolve", "allowed.test"], &[]).await;
    assert_eq!(r["addrs"], serde_json::json!([ALLOWED]), "{r}");
    let r = check(
        &c,
        &s.id,
        &["http", "allowed.test", "80", "allowed.test"],
        &[],
    )
    .await;
    assert!(
        ok(&r)
            && r["body"]
                .as_str()
                .unwrap_or("")
                .contains("host=allowed.test"),
        "{r}"
    );
    let seen_allowed = net.tcp_seen(ALLOWED, 80);
    assert!(seen_allowed >= 1);

    // Allowed domain over HTTPS: a real handshake with the test CA; the named domain wins
    // over the deny_out range its address is in.
    let r = check(
        &c,
        &s.id,
        &["tls", "tls.test", "443", "tls.test", "/tmp/ca.pem"],
        &[],
    )
    .await;
    assert!(
        ok(&r) && r["body"].as_str().unwrap_or("").contains("hello from"),
        "{r}"
    );

    // Wildcard.
    let r = check(
        &c,
        &s.id,
        &["http", "a.wild.test", "80", "a.wild.test"],
        &[],
    )
    .await;
    assert!(ok(&r), "{r}");
    assert_eq!(net.tcp_seen(WILD, 80), 1);

    // Denied domain: NXDOMAIN from the sandbox's resolver, and the question never left.
    let r = check(&c, &s.id, &["resolve", "other.test"], &[]).await;
    assert!(!ok(&r), "{r}");
    assert!(
        !net.asked("other.test"),
        "a denied name reached the upstream resolver"
    );

    // HTTP naming an allowed host, sent to another address (fronting): refused with a 403
    // saying why, and the other server saw nothing.
    let r = check(&c, &s.id, &["http", OTHER, "80", "allowed.test"], &[]).await;
    let body = r["body"].as_str().unwrap_or("");
    assert!(
        body.contains("403") && body.contains("domain fronting"),
        "{r}"
    );
    assert_eq!(net.tcp_seen(OTHER, 80), 0);

    // A name the grant refuses, carried in a connection's first bytes (an HTTP Host, here
    // to an allowed address), is refused by the policy before any lookup: the bytes of a
    // connection cannot make the host ask the upstream a name of the sandbox's choosing.
    let r = check(
        &c,
        &s.id,
        &["http", ALLOWED, "80", "exfil-4a6f.other.test"],
        &[],
    )
    .await;
    let body = r["body"].as_str().unwrap_or("");
    assert!(body.contains("403"), "{r}");
    assert!(
        !net.asked("exfil-4a6f.other.test"),
        "a refused Host reached the upstream resolver"
    );

    // SNI spoofing: an allowed SNI to another IP (which serves TLS) is refused.
    let r = check(
        &c,
        &s.id,
        &["tls", OTHER, "443", "tls.test", "/tmp/ca.pem"],
        &[],
    )
    .await;
    assert!(!ok(&r), "{r}");
    assert_eq!(net.tcp_seen(OTHER, 443), 0);

    // Raw TCP to an allowed name's address, without a name: judged by address alone.
    let r = check(&c, &s.id, &["raw", ALLOWED, "80", "hello"], &[]).await;
    assert!(!ok(&r), "{r}");
    assert_eq!(
        net.tcp_seen(ALLOWED, 80),
        seen_allowed,
        "the raw connection reached the server"
    );

    // An allowed IP and port; the same IP on another port, and inside deny_out, is not.
    let r = check(&c, &s.id, &["raw", RAW, "8080", "ping"], &[]).await;
    assert!(ok(&r) && r["body"] == "ping", "{r}");
    let r = check(&c, &s.id, &["raw", RAW, "8081", "ping"], &[]).await;
    assert!(!ok(&r), "{r}");
    assert_eq!(net.tcp_seen(RAW, 8081), 0);

    // Rebinding: allowed names whose answers point at loopback or the metadata service get
    // no address; a direct connection to the metadata address is refused by the proxy.
    for name in ["rebind.test", "meta.test"] {
        let r = check(&c, &s.id, &["resolve", name], &[]).await;
        assert!(!ok(&r), "{name}: {r}");
    }
    let r = check(&c, &s.id, &["raw", "169.254.169.254", "80", "x"], &[]).await;
    assert!(!ok(&r), "{r}");

    // UDP to anything but the resolver goes nowhere.
    let r = check(&c, &s.id, &["udp", internet::DNS, "9999"], &[]).await;
    assert!(!ok(&r), "{r}");
    assert_eq!(net.udp_seen(), 0);

    // A call's grant lasts for the call.
    let r = check(
        &c,
        &s.id,
        &["http", "other.test", "80", "other.test"],
        &["other.test"],
    )
    .await;
    assert!(ok(&r), "{r}");
    let r = check(&c, &s.id, &["resolve", "other.test"], &[]).await;
    assert!(!ok(&r), "the call's grant outlived the call: {r}");

    // A paused and resumed session keeps its grant in a new sandbox.
    c.session_pause(&s.id).await.expect("pause");
    c.session_resume(&s.id).await.expect("resume");
    let r = check(
        &c,
        &s.id,
        &["http", "allowed.test", "80", "allowed.test"],
        &[],
    )
    .await;
    assert!(ok(&r), "after resume: {r}");

    // Every decision is in the audit log under the session's key, refusals with why.
    let refused = c
        .audit(&thaw_api::AuditQuery {
            action: Some("egress_refused".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .expect("audit");
    let hosts: Vec<String> = refused
        .records
        .iter()
        .map(|r| r.detail.to_string())
        .collect();
    assert!(
        hosts
            .iter()
            .any(|d| d.contains("other.test") && d.contains("not in allow_out")),
        "{hosts:?}"
    );
    assert!(
        hosts.iter().any(|d| d.contains("domain fronting")),
        "{hosts:?}"
    );
    let allowed = c
        .audit(&thaw_api::AuditQuery {
            action: Some("egress_allowed".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert!(
        allowed
            .records
            .iter()
            .any(|r| r.detail.to_string().contains("tls.test")),
        "{:?}",
        allowed.records
    );

    // A bad entry is refused before anything runs, and named.
    let mut bad = SessionCreateBody::new("python");
    bad.allow_out = vec!["exa mple.com".into()];
    let e = c.session_create(&bad).await.expect_err("bad entry");
    assert!(e.to_string().contains("exa mple.com"), "{e}");

    c.session_delete(&s.id).await.expect("delete");
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_grant_has_its_limits_and_no_grant_means_no_network() {
    let net = Internet::shared();
    let server = Server::start().await;
    let secret = server.key("egress-t", 4);
    let c = server.client(&secret);
    // templates/shell, granted one address at 64 KiB/s.
    let dir = tempfile::tempdir().expect("tmp");
    let src = repo_root().join("templates/shell");
    for e in std::fs::read_dir(&src).expect("read shell") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
        }
    }
    let toml = dir.path().join("template.toml");
    let mut text = std::fs::read_to_string(&toml).expect("toml");
    text = text.replace("name = \"shell\"", "name = \"shell-net\"");
    text.push_str(&format!(
        "\n[network]\nallow_out = [\"{ALLOWED}:80\"]\nbandwidth_kib_s = 64\n"
    ));
    std::fs::write(&toml, text).expect("write toml");
    c.deploy_dir(dir.path()).await.expect("deploy shell-net");
    c.deploy_dir(&src).await.expect("deploy shell");

    let get = |path: &str| {
        format!("printf 'GET {path} HTTP/1.0\\r\\nHost: {ALLOWED}\\r\\n\\r\\n' | nc -w 10 {ALLOWED} 80 | wc -c")
    };
    // 256 KiB at 64 KiB/s after a one-second burst: at least ~3 s.
    let before = net.tcp_seen(ALLOWED, 80);
    let started = Instant::now();
    let o = c
        .exec("shell-net", &ExecBody::new(["sh", "-c", &get("/big")]))
        .await
        .expect("exec");
    let took = started.elapsed();
    let bytes: u64 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(bytes > 256 * 1024, "got {bytes} bytes: {o:?}");
    assert!(
        took.as_secs_f64() >= 2.5,
        "256 KiB at 64 KiB/s took only {took:?}: the bandwidth limit did not hold"
    );

    // The same template without the grant: no route out at all.
    let o = c
        .exec("shell", &ExecBody::new(["sh", "-c", &get("/hello")]))
        .await
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0", "{o:?}");
    // (The other test may reach the same server meanwhile; this one's wget did not add a
    // connection: its sandbox has no route.)
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0");
    assert!(net.tcp_seen(ALLOWED, 80) > before);

    // An invalid [network] is refused at publish, naming the entry.
    let toml_text = std::fs::read_to_string(&toml).expect("toml");
    std::fs::write(
        &toml,
        toml_text.replace(&format!("{ALLOWED}:80"), "10.0.0.1/8"),
    )
    .expect("w");
    let e = c.deploy_dir(dir.path()).await.expect_err("bad network");
    assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
    server.finish().await;
}

/// A secret for tls.test: the sandbox holds a placeholder; the server receives the value;
/// another destination receives the placeholder; the value is in no snapshot, audit record
/// or file of thaw's home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_its_host_and_nothing_else_holds_it() {
    let net = Internet::shared();
    let (server, c) = python_server("egress-s").await;
    let value = format!("s3cr3t-{}", std::process::id());
    let mut body = SessionCreateBody::new("python");
    body.allow_out = vec!["tls.test:443".into(), "plain.test".into()];
    body.secrets = vec![thaw_api::SecretGrant {
        name: "API_TOKEN".into(),
        value: value.clone(),
        hosts: vec!["tls.test".into()],
    }];
    let s = c.session_create(&body).await.expect("create");

    // The sandbox sees a placeholder.
    let r = check(&c, &s.id, &["env", "API_TOKEN"], &[]).await;
    let placeholder = r["body"].as_str().unwrap_or("").to_string();
    assert!(placeholder.starts_with("thaw-secret-API_TOKEN-"), "{r}");
    assert!(!placeholder.contains(&value));

    // Its HTTPS request to tls.test (trusting the sandbox's bundle, which holds its own CA)
    // arrives with the value.
    let r = check(
        &c,
        &s.id,
        &["tls", "tls.test", "443", "tls.test", "-", "API_TOKEN"],
        &[],
    )
    .await;
    assert!(
        ok(&r) && r["body"].as_str().unwrap_or("").contains("hello from"),
        "{r}"
    );
    let auth = || net.log.lock().map(|l| l.auth.clone()).unwrap_or_default();
    assert!(auth().contains(&format!("Bearer {value}")), "{:?}", auth());

    // To another destination the placeholder stays a placeholder.
    let r = check(
        &c,
        &s.id,
        &[
            "http",
            "plain.test",
            "80",
            "plain.test",
            "/hello",
            "API_TOKEN",
        ],
        &[],
    )
    .await;
    assert!(ok(&r), "{r}");
    assert!(
        auth().contains(&format!("Bearer {placeholder}")),
        "{:?}",
        auth()
    );

    // A call's secret lasts for the call.
    let mut call = ExecBody::new([
        "python3",
        "-c",
        CLIENT,
        "tls",
        "tls.test",
        "443",
        "tls.test",
        "-",
        "CALL_TOKEN",
    ]);
    call.secrets = vec![thaw_api::SecretGrant {
        name: "CALL_TOKEN".into(),
        value: format!("{value}-call"),
        hosts: vec!["tls.test".into()],
    }];
    let r = run(&c, &s.id, call, &["tls with a call's secret"]).await;
    assert!(ok(&r), "{r}");
    assert!(
        auth().contains(&format!("Bearer {value}-call")),
        "{:?}",
        auth()
    );
    let r = check(&c, &s.id, &["env", "CALL_TOKEN"], &[]).await;
    assert_eq!(
        r["body"], "",
        "the call's placeholder outlived the call: {r}"
    );

    // A fork is the same agent at the same point: it keeps the session's grant and secret
    // (its value reaches tls.test from the fork too), under the source's placeholder name.
    let forked = c
        .session_fork(
            &s.id,
            &ForkBody {
                n: 1,
                ..ForkBody::default()
            },
        )
        .await
        .expect("fork");
    assert!(forked.errors.is_empty(), "{:?}", forked.errors);
    let fork = &forked.sessions[0];
    let r = check(&c, &fork.id, &["env", "API_TOKEN"], &[]).await;
    let fork_placeholder = r["body"].as_str().unwrap_or("").to_string();
    assert!(
        fork_placeholder.starts_with("thaw-secret-API_TOKEN-"),
        "the fork has no placeholder: {r}"
    );
    let bearer = format!("Bearer {value}");
    let count = || auth().iter().filter(|a| **a == bearer).count();
    let before = count();
    let r = check(
        &c,
        &fork.id,
        &["tls", "tls.test", "443", "tls.test", "-", "API_TOKEN"],
        &[],
    )
    .await;
    assert!(ok(&r), "the fork could not use its secret: {r}");
    assert_eq!(count(), before + 1, "{:?}", auth());
    c.session_delete(&fork.id).await.expect("delete the fork");

    // A secret for a host allow_out does not allow is refused, naming it.
    let mut bad = SessionCreateBody::new("python");
    bad.allow_out = vec!["plain.test".into()];
    bad.secrets = vec![thaw_api::SecretGrant {
        name: "X".into(),
        value: "v".into(),
        hosts: vec!["tls.test".into()],
    }];
    let e = c
        .session_create(&bad)
        .await
        .expect_err("secret for a host not allowed");
    assert!(e.to_string().contains("tls.test"), "{e}");

    // Paused: the snapshot of its memory and files does not hold the value, nor does any
    // file of thaw's home (audit log, records, logs).
    let paused = c.session_pause(&s.id).await.expect("pause");
    let snap = paused.snapshot.clone().expect("snapshot name");
    let dir = server
        .engine
        .snapshots
        .materialize_cached(&snap)
        .expect("materialize");
    let hits = grep_tree(&dir, value.as_bytes());
    assert!(hits.is_empty(), "the secret is in the snapshot: {hits:?}");
    let hits = grep_tree(server.home.path(), value.as_bytes());
    assert!(hits.is_empty(), "the secret is in thaw's home: {hits:?}");
    c.session_delete(&s.id).await.expect("delete");
    server.finish().await;
}

/// Files under `dir` whose bytes contain `needle`.
fn grep_tree(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t)
                    if t.is_file()
                        && std::fs::read(&p)
                            .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) =>
                {
                    hits.push(p)
                }
                _ => {}
            }
        }
    }
    hits
}
