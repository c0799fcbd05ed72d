//! End-to-end tests of the HTTP API: a real server on a real TCP socket (in-process until the
//! CLI has `thaw serve`), the real engine, real runc and CRIU sandboxes. Requests go through
//! `thaw_api::Client` (what the CLI uses) and, where headers or raw bodies matter, plain
//! reqwest.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thaw_api::{
    Client, ClientError, ExecBody, ExtendBody, InvokeBody, SessionCreateBody, SessionState, Stream,
    TimeoutAction,
};
use thaw_e2e::inproc::Server;
use thaw_e2e::{repo_root, Home};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// A tar of a template directory's files: (path, content, mode).
fn tar_of(files: &[(&str, &str, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, content.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A busybox template whose handler writes progress to stderr, pauses, then answers.
fn noisy_template() -> Vec<u8> {
    tar_of(&[
        (
            "template.toml",
            r#"name = "noisy"
base = { kind = "busybox" }
[[files]]
src = "handler.sh"
dest = "/app/handler.sh"
mode = "0755"
[handler]
command = ["/bin/sh", "/app/handler.sh"]
[limits]
memory_mib = 64
timeout_s = 20
"#,
            0o644,
        ),
        (
            "handler.sh",
            "#!/bin/sh\np=$(cat)\necho step-one >&2\nsleep 1\necho step-two >&2\nprintf '{\"payload\":%s}\\n' \"$p\"\n",
            0o755,
        ),
    ])
}

fn api_status(e: &ClientError) -> u16 {
    e.status()
        .unwrap_or_else(|| panic!("expected an API error, got {e:?}"))
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    assert!(
        body["error"]["message"].is_string() && body["error"]["code"].is_string(),
        "not an ErrorBody: {body}"
    );
    (status, body)
}

fn sh(script: &str) -> ExecBody {
    ExecBody::new(["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_openapi_and_authentication() {
    let s = Server::start().await;
    let key = s.key("ops", 4);
    // /healthz needs no key.
    let h: Value = http()
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h, json!({"status": "ok"}));

    // Everything else does: none, garbage, unknown, and revoked keys are all 401 + Bearer.
    let (revoked_rec, revoked) = s.engine.create_key("old", 1, false).unwrap();
    s.engine.revoke_key(&revoked_rec.id).unwrap();
    // The real key with its last hex digit changed (to any other digit: 1/16 of keys end
    // in 0, and a "forgery" equal to the key is no forgery).
    let last = if key.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &key[..key.len() - 1]);
    assert_ne!(forged, key);
    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz".to_string()),
        Some("Bearer nonsense".to_string()),
        Some(format!("Bearer {forged}")),
        Some(format!("Bearer {revoked}")),
    ] {
        for path in ["/metrics", "/openapi.json", "/v1/templates", "/v1/sessions"] {
            let mut req = http().get(s.url(path));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(
                resp.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_string()),
                Some("Bearer realm=\"thaw\"".to_string()),
                "{path} {auth:?}"
            );
            let (status, body) = error_of(resp).await;
            assert_eq!(status, 401, "{path} {auth:?}: {body}");
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    let c = s.client(&key);
    assert_eq!(c.health().await.unwrap().status, "ok");
    assert!(c.templates().await.unwrap().is_empty());
    assert!(c.sessions().await.unwrap().is_empty());

    // The OpenAPI document lists every route and the bearer scheme.
    let doc = c.openapi().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/healthz", &["get"][..]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
        ("/v1/templates", &["get", "post"]),
        ("/v1/templates/{name}", &["get", "delete"]),
        ("/v1/templates/{name}/invoke", &["post"]),
        ("/v1/templates/{name}/exec", &["post"]),
        ("/v1/sessions", &["get", "post"]),
        ("/v1/sessions/{id}", &["get", "delete"]),
        ("/v1/sessions/{id}/exec", &["post"]),
        ("/v1/sessions/{id}/invoke", &["post"]),
        ("/v1/sessions/{id}/files", &["get", "put"]),
        ("/v1/sessions/{id}/pause", &["post"]),
        ("/v1/sessions/{id}/resume", &["post"]),
        ("/v1/sessions/{id}/extend", &["post"]),
        ("/v1/sessions/{id}/checkpoints", &["get", "post"]),
        ("/v1/sessions/{id}/checkpoints/{name}", &["delete"]),
        ("/v1/sessions/{id}/reset", &["post"]),
        ("/v1/sessions/{id}/fork", &["post"]),
        ("/v1/sessions/{id}/reward", &["post"]),
        ("/v1/sessions/batch", &["post"]),
        ("/v1/sandboxes", &["get"]),
        ("/v1/sandboxes/{id}", &["get"]),
        ("/v1/sandboxes/{id}/kill", &["post"]),
        ("/v1/sandboxes/kill", &["post"]),
        ("/v1/audit", &["get"]),
        ("/v1/audit/verify", &["get"]),
    ] {
        let p = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from openapi.json"));
        for m in methods {
            assert!(p.get(*m).is_some(), "{m} {path} missing from openapi.json");
        }
    }
    assert_eq!(
        paths.len(),
        27,
        "undocumented or unexpected paths: {:?}",
        paths.keys()
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "{}",
        doc["components"]
    );
    assert_eq!(paths["/healthz"]["get"]["security"], json!([{}]));
    for schema in [
        "InvokeBody",
        "ExecBody",
        "ErrorBody",
        "ExecStreamEvent",
        "InvokeStreamEvent",
        "BatchStreamEvent",
        "Session",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "schema {schema} missing"
        );
    }
    // Generated clients name their functions after operationIds: each is there, and unique.
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(
                ids.insert(id),
                "operationId {id} ({method} {path}) is not unique"
            );
        }
    }
    // Raw bodies are binary strings, not arrays of integers.
    let binary = json!({"type": "string", "format": "binary"});
    assert_eq!(
        paths["/v1/templates"]["post"]["requestBody"]["content"]["application/x-tar"]["schema"],
        binary
    );
    let files = &paths["/v1/sessions/{id}/files"];
    assert_eq!(
        files["put"]["requestBody"]["content"]["application/octet-stream"]["schema"],
        binary
    );
    assert_eq!(
        files["get"]["responses"]["200"]["content"]["application/octet-stream"]["schema"],
        binary
    );
    // What the server answers is what `thaw openapi` prints (the document the server
    // crate's tests and `make test-openapi` check in depth).
    assert_eq!(
        doc,
        serde_json::to_value(thaw_server::openapi()).unwrap(),
        "served document differs from thaw_server::openapi()"
    );

    // Metrics: the documented families, in Prometheus text format.
    let text = c.metrics().await.unwrap();
    for family in [
        "thaw_live_sandboxes",
        "thaw_paused_sessions",
        "thaw_store_bytes",
        "thaw_http_requests_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
    assert!(
        text.contains(r#"thaw_http_requests_total{route="/v1/templates",status="401"}"#),
        "{text}"
    );
    assert!(text.contains("thaw_live_sandboxes 0"), "{text}");

    // Unknown routes and methods are JSON errors too.
    let (status, body) = error_of(http().get(s.url("/v2/nothing")).send().await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = error_of(
        http()
            .patch(s.url("/v1/templates"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405, "{body}");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_field_and_the_right_status() {
    let s = Server::start_with(|c| {
        c.max_body_bytes = 4096;
        c.max_upload_bytes = 64 << 10;
    })
    .await;
    let key = s.key("dev", 2);
    let post = |path: &str, body: &str| {
        http()
            .post(s.url(path))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };

    // Wrong type: 400 naming the field.
    let (status, body) = error_of(
        post("/v1/templates/shell/invoke", r#"{"timeout_ms": "soon"}"#)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["path"], "timeout_ms", "{body}");
    let (status, body) = error_of(
        post("/v1/templates/shell/exec", r#"{"argv": ["ls", 3]}"#)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["path"], "argv[1]", "{body}");
    // Unknown field: 400 naming it.
    let (status, body) = error_of(
        post(
            "/v1/templates/shell/invoke",
            r#"{"payload": 1, "timout_ms": 5}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["path"], "timout_ms", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field"),
        "{body}"
    );
    // The typed client reports the same thing.
    let e = s
        .client(&key)
        .session_create(&SessionCreateBody::new(""))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(api_status(&e), 404, "{e}");
    let (status, body) = error_of(post("/v1/sessions", r#"{"template": 7}"#).await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["path"], "template", "{body}");
    // A grant that does not parse: 400 bad_network naming the list (or `secrets`).
    for (body, path) in [
        (
            r#"{"template": "shell", "allow_out": ["a b"]}"#,
            "allow_out",
        ),
        (
            r#"{"template": "shell", "deny_out": ["example.com"]}"#,
            "deny_out",
        ),
        (
            r#"{"template": "shell", "allow_out": ["x.test:443"], "secrets": [{"name": "bad name", "value": "v", "hosts": ["x.test"]}]}"#,
            "secrets",
        ),
    ] {
        let (status, err) = error_of(post("/v1/sessions", body).await.unwrap()).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["code"], "bad_network", "{err}");
        assert_eq!(err["error"]["path"], path, "{err}");
    }
    // Not JSON, and bad base64 stdin.
    let (status, _) = error_of(post("/v1/templates/shell/invoke", "{").await.unwrap()).await;
    assert_eq!(status, 400);
    let (status, body) = error_of(
        post(
            "/v1/templates/shell/exec",
            r#"{"argv": ["cat"], "stdin_b64": "%%%"}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["path"], "stdin_b64", "{body}");

    // Over the cap: 413 as JSON, whether the size is declared or only seen while reading.
    let big = format!(r#"{{"payload": "{}"}}"#, "x".repeat(8192));
    let (status, body) = error_of(post("/v1/templates/shell/invoke", &big).await.unwrap()).await;
    assert_eq!(status, 413, "{body}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(big.as_bytes()[..3000].to_vec()),
        Ok(big.as_bytes()[3000..].to_vec()),
    ];
    let resp = http()
        .post(s.url("/v1/templates/shell/invoke"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 413, "{body}");
    let resp = http()
        .post(s.url("/v1/templates"))
        .bearer_auth(&key)
        .header("content-type", "application/x-tar")
        .body(vec![0u8; 128 << 10])
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 413, "{body}");

    // Unknown template: 404 with the engine's message.
    let e = s
        .client(&key)
        .invoke("nope", &InvokeBody::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), 404);
    assert!(e.to_string().contains("unknown template `nope`"), "{e}");

    // Hostile or broken archives: 400 naming the entry, nothing kept.
    for (tar, needle) in [
        (
            {
                let mut t = tar_of(&[("template.toml", "name = 'x'", 0o644)]);
                // An entry with `..`, written raw (the tar crate refuses to build one).
                let mut h = tar::Header::new_gnu();
                h.as_old_mut().name[..9].copy_from_slice(b"../escape");
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                t.truncate(t.len() - 1024);
                let mut b = tar::Builder::new(t);
                b.append(&h, &b""[..]).unwrap();
                b.into_inner().unwrap()
            },
            "../escape",
        ),
        (tar_of(&[("handler.sh", "", 0o755)]), "template.toml"),
        (
            b"definitely not a tar archive".repeat(40),
            "template archive",
        ),
    ] {
        let resp = http()
            .post(s.url("/v1/templates"))
            .bearer_auth(&key)
            .header("content-type", "application/x-tar")
            .body(tar)
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(resp).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{needle}: {body}"
        );
    }
    let sources = s.home.path().join("sources");
    let left: Vec<_> = walk(&sources);
    assert!(
        left.iter().all(|p| p.is_dir()),
        "upload files left behind: {left:?}"
    );
    // Wrong media type.
    let resp = http()
        .post(s.url("/v1/templates"))
        .bearer_auth(&key)
        .header("content-type", "application/zip")
        .body(vec![1, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 415);
    s.finish().await;
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_invoke_and_exec_over_http() {
    let s = Server::start().await;
    let key = s.key("dev", 4);
    let c = s.client(&key);

    // Upload templates/shell as a tar (what the CLI sends).
    let t = c
        .deploy_dir(&repo_root().join("templates/shell"))
        .await
        .expect("deploy shell");
    assert_eq!(t.name, "shell");
    assert!(
        t.source_dir.starts_with(s.home.path().join("sources")),
        "{}",
        t.source_dir.display()
    );
    let listed = c.templates().await.unwrap();
    assert_eq!(
        listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["shell"]
    );
    assert_eq!(c.template("shell").await.unwrap().name, "shell");

    // Invoke, buffered.
    let inv = c
        .invoke(
            "shell",
            &InvokeBody {
                payload: json!({"task": "hi"}),
                ..InvokeBody::default()
            },
        )
        .await
        .unwrap();
    let v = serde_json::to_value(&inv).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["start"], "restore", "{v}");
    assert_eq!(v["result"]["payload"]["task"], "hi", "{v}");
    assert_eq!(v["result"]["greeting"], "hello from thaw", "{v}");

    // Exec, buffered: stdin, env, exit code, both streams.
    let out = c
        .exec(
            "shell",
            &ExecBody {
                env: [("X".to_string(), "42".to_string())].into(),
                ..sh("cat; echo x=$X; echo oops >&2; exit 3")
            }
            .with_stdin(b"from stdin\n"),
        )
        .await
        .unwrap();
    assert_eq!(out.result.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from stdin\nx=42\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    // Exec, streamed: the first line reaches the client while the task still runs.
    let started = Instant::now();
    let mut first_at = None;
    let mut seen = Vec::new();
    let r = c
        .exec_stream(
            "shell",
            &sh("echo one; sleep 2; echo two; printf '\\377' >&2"),
            |s, d| {
                first_at.get_or_insert_with(|| started.elapsed());
                seen.push((s, d.to_vec()));
            },
        )
        .await
        .unwrap();
    let done_at = started.elapsed();
    assert_eq!(r.exit_code, 0);
    let stdout: Vec<u8> = seen
        .iter()
        .filter(|(s, _)| *s == Stream::Stdout)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(stdout, b"one\ntwo\n");
    // Not UTF-8: carried as base64, delivered intact.
    assert!(seen.contains(&(Stream::Stderr, vec![0xff])), "{seen:?}");
    let first_at = first_at.expect("output arrived");
    assert!(
        done_at - first_at >= Duration::from_millis(1500),
        "output was not streamed: first chunk at {first_at:?}, end at {done_at:?}"
    );

    // A failure after the stream started (status 200 is sent) ends it with an `error`
    // event; buffered, the same failure is an error status.
    let missing = ExecBody::new(["/no/such/program"]);
    let e = c.exec("shell", &missing).await.unwrap_err();
    let status = api_status(&e);
    let e = c
        .exec_stream("shell", &missing, |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Stream { .. }), "{e:?}");
    assert!(e.to_string().contains("/no/such/program"), "{e}");
    assert_eq!(status, 422, "{e}");

    // The raw stream is NDJSON (also selected by ?stream=true), ending with `exit`.
    let text = http()
        .post(s.url("/v1/templates/shell/exec?stream=true"))
        .bearer_auth(&key)
        .json(&sh("echo hi"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    assert_eq!(lines.first().unwrap()["event"], "stdout", "{text}");
    assert_eq!(lines.first().unwrap()["data"], "hi\n", "{text}");
    assert_eq!(lines.last().unwrap()["event"], "exit", "{text}");
    assert_eq!(lines.last().unwrap()["result"]["exit_code"], 0, "{text}");

    // Invoke, streamed: stderr lines as they come, then the result.
    c.deploy_tar(noisy_template()).await.expect("deploy noisy");
    let resp = http()
        .post(s.url("/v1/templates/noisy/invoke"))
        .bearer_auth(&key)
        .header("accept", "application/x-ndjson")
        .json(&json!({"payload": [1, 2]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let text = resp.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    let stderr: String = lines
        .iter()
        .filter(|l| l["event"] == "stderr")
        .map(|l| l["data"].as_str().unwrap())
        .collect();
    assert_eq!(stderr, "step-one\nstep-two\n", "{text}");
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "result", "{text}");
    assert_eq!(last["invocation"]["status"], "ok", "{text}");
    assert_eq!(
        last["invocation"]["result"]["payload"],
        json!([1, 2]),
        "{text}"
    );
    let mut err = Vec::new();
    let inv = c
        .invoke_stream("noisy", &InvokeBody::default(), |d| {
            err.extend_from_slice(d)
        })
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&err), "step-one\nstep-two\n");
    assert_eq!(
        serde_json::to_value(&inv).unwrap()["result"]["payload"],
        Value::Null
    );

    // Metrics counted the invocations and the restores.
    let m = c.metrics().await.unwrap();
    assert!(
        m.contains(r#"thaw_invocations_total{status="ok"} 3"#),
        "{m}"
    );
    let restores = m
        .lines()
        .find_map(|l| l.strip_prefix("thaw_restore_seconds_count "))
        .expect("restore histogram")
        .parse::<u64>()
        .unwrap();
    assert!(restores >= 6, "{m}");
    assert!(
        m.contains(
            r#"thaw_http_requests_total{route="/v1/templates/{name}/invoke",status="200"} 3"#
        ),
        "{m}"
    );
    let store = m
        .lines()
        .find_map(|l| l.strip_prefix("thaw_store_bytes "))
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(store > 0, "{m}");

    // Removing a template removes its uploaded sources; it is then unknown.
    let removed = c.remove_template("noisy").await.unwrap();
    assert!(!removed.source_dir.exists());
    let e = c.template("noisy").await.unwrap_err();
    assert_eq!(api_status(&e), 404, "{e}");
    // Redeploying replaces the previous upload's directory.
    let first = c.template("shell").await.unwrap().source_dir;
    let again = c
        .deploy_dir(&repo_root().join("templates/shell"))
        .await
        .unwrap();
    assert_ne!(first, again.source_dir);
    assert!(!first.exists(), "{} kept after a redeploy", first.display());
    assert!(again.source_dir.join("template.toml").is_file());
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_isolated_and_limited() {
    let s = Server::start().await;
    let (a_key, b_key) = (s.key("a", 1), s.key("b", 1));
    let (a, b) = (s.client(&a_key), s.client(&b_key));
    a.deploy_dir(&repo_root().join("templates/shell"))
        .await
        .unwrap();

    // B cannot see, use or remove A's template.
    assert!(b.templates().await.unwrap().is_empty());
    assert_eq!(api_status(&b.template("shell").await.unwrap_err()), 404);
    assert_eq!(
        api_status(&b.invoke("shell", &InvokeBody::default()).await.unwrap_err()),
        404
    );
    assert_eq!(
        api_status(&b.remove_template("shell").await.unwrap_err()),
        404
    );
    assert_eq!(
        api_status(
            &b.session_create(&SessionCreateBody::new("shell"))
                .await
                .unwrap_err()
        ),
        404
    );

    // A's key allows one sandbox: while a streamed exec holds it, another call is 429.
    let resp = http()
        .post(s.url("/v1/templates/shell/exec"))
        .bearer_auth(&a_key)
        .header("accept", "application/x-ndjson")
        .json(&sh("sleep 2; echo done"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let e = a.invoke("shell", &InvokeBody::default()).await.unwrap_err();
    assert_eq!(api_status(&e), 429, "{e}");
    assert_eq!(e.code(), Some("too_many_sandboxes"));
    assert!(e.to_string().contains("limit of 1"), "{e}");
    let m = a.metrics().await.unwrap();
    assert!(m.contains("thaw_live_sandboxes 1"), "{m}");
    // Other keys have their own limit.
    let b_out = b.exec("shell", &sh("true")).await.unwrap_err();
    assert_eq!(api_status(&b_out), 404);
    let text = resp.text().await.unwrap();
    assert!(text.contains("done"), "{text}");
    // The slot is free as soon as the stream ended.
    let inv = a.invoke("shell", &InvokeBody::default()).await.unwrap();
    assert_eq!(serde_json::to_value(&inv).unwrap()["status"], "ok");

    // A running session holds the slot too.
    let sess = a
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .unwrap();
    let e = a.exec("shell", &sh("true")).await.unwrap_err();
    assert_eq!(api_status(&e), 429, "{e}");
    assert!(e.to_string().contains("1 running sessions"), "{e}");
    // B cannot see or touch A's session.
    assert!(b.sessions().await.unwrap().is_empty());
    assert_eq!(api_status(&b.session(&sess.id).await.unwrap_err()), 404);
    assert_eq!(
        api_status(&b.session_exec(&sess.id, &sh("true")).await.unwrap_err()),
        404
    );
    assert_eq!(
        api_status(&b.session_pause(&sess.id).await.unwrap_err()),
        404
    );
    assert_eq!(
        api_status(
            &b.session_read_file(&sess.id, "/etc/hostname")
                .await
                .unwrap_err()
        ),
        404
    );
    assert_eq!(
        api_status(&b.session_delete(&sess.id).await.unwrap_err()),
        404
    );
    a.session_delete(&sess.id).await.unwrap();
    a.exec("shell", &sh("true")).await.unwrap();
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_http() {
    let s = Server::start().await;
    let key = s.key("dev", 4);
    let c = s.client(&key);
    c.deploy_dir(&repo_root().join("templates/shell"))
        .await
        .unwrap();

    let created = http()
        .post(s.url("/v1/sessions"))
        .bearer_auth(&key)
        .json(&json!({"template": "shell", "env": {"WHO": "me"}, "idle_timeout_s": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let sess: Value = created.json().await.unwrap();
    let id = sess["id"].as_str().unwrap().to_string();
    assert_eq!(sess["state"], "running", "{sess}");
    assert_eq!(c.sessions().await.unwrap().len(), 1);
    assert_eq!(c.session(&id).await.unwrap().state, SessionState::Running);

    // State carries over between calls.
    let out = c
        .session_exec(&id, &sh("echo $WHO > /tmp/who; echo 1 > /tmp/n"))
        .await
        .unwrap();
    assert_eq!(
        out.result.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c
        .session_exec(&id, &sh("cat /tmp/who; echo $(( $(cat /tmp/n) + 1 ))"))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "me\n2\n");

    // Files: binary content in and out, with a mode.
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    c.session_write_file(&id, "/tmp/blob", data.clone(), Some(0o600))
        .await
        .unwrap();
    assert_eq!(c.session_read_file(&id, "/tmp/blob").await.unwrap(), data);
    let out = c
        .session_exec(&id, &sh("stat -c %a /tmp/blob"))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "600\n");
    let e = c
        .session_write_file(&id, "relative", vec![], None)
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), 400);
    let e = c.session_read_file(&id, "/no/such/file").await.unwrap_err();
    assert_eq!(api_status(&e), 404, "{e}");

    // Streamed exec in the session.
    let mut streamed = Vec::new();
    let r = c
        .session_exec_stream(&id, &sh("cat /tmp/who"), |_, d| {
            streamed.extend_from_slice(d)
        })
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(streamed, b"me\n");

    // The handler runs in the session too, with the session's environment.
    let inv = c
        .session_invoke(
            &id,
            &InvokeBody {
                payload: json!({"n": 1}),
                ..InvokeBody::default()
            },
        )
        .await
        .unwrap();
    let v = serde_json::to_value(&inv).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["sandbox_id"], id.as_str(), "{v}");
    assert_eq!(v["result"]["payload"]["n"], 1, "{v}");
    let inv = c
        .session_invoke_stream(&id, &InvokeBody::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&inv).unwrap()["status"], "ok");

    // Pause, refuse work while paused, resume with the state intact.
    let paused = c.session_pause(&id).await.unwrap();
    assert_eq!(paused.state, SessionState::Paused);
    let e = c.session_exec(&id, &sh("true")).await.unwrap_err();
    assert_eq!(api_status(&e), 409, "{e}");
    let m = c.metrics().await.unwrap();
    assert!(m.contains("thaw_paused_sessions 1"), "{m}");
    let resumed = c.session_resume(&id).await.unwrap();
    assert_eq!(resumed.state, SessionState::Running);
    let e = c.session_resume(&id).await.unwrap_err();
    assert_eq!(api_status(&e), 409, "{e}");
    let out = c
        .session_exec(&id, &sh("cat /tmp/who /tmp/n"))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "me\n1\n");

    // Racing transitions: exactly one wins, the other is a conflict.
    let (p1, p2) = tokio::join!(c.session_pause(&id), c.session_pause(&id));
    let statuses: Vec<Option<u16>> = [&p1, &p2]
        .iter()
        .map(|r| r.as_ref().err().map(api_status))
        .collect();
    assert!(
        statuses.contains(&None) && statuses.contains(&Some(409)),
        "pause + pause: {p1:?} {p2:?}"
    );
    let (r1, r2) = tokio::join!(c.session_resume(&id), c.session_resume(&id));
    let statuses: Vec<Option<u16>> = [&r1, &r2]
        .iter()
        .map(|r| r.as_ref().err().map(api_status))
        .collect();
    assert!(
        statuses.contains(&None) && statuses.contains(&Some(409)),
        "resume + resume: {r1:?} {r2:?}"
    );
    // Pause racing resume on a running session: whichever order they land in, a refused
    // one is a conflict (never a server error), and the session ends up whole.
    let (p, r) = tokio::join!(c.session_pause(&id), c.session_resume(&id));
    for e in [&p, &r].into_iter().filter_map(|x| x.as_ref().err()) {
        assert_eq!(api_status(e), 409, "pause + resume: {p:?} {r:?}");
    }
    if c.session(&id).await.unwrap().state == SessionState::Paused {
        c.session_resume(&id).await.unwrap();
    }
    let out = c.session_exec(&id, &sh("cat /tmp/who")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "me\n");

    // Extend: new idle timeout and lifetime.
    let before = c.session(&id).await.unwrap();
    let ext = c
        .session_extend(
            &id,
            &ExtendBody {
                idle_timeout_s: Some(1234),
                max_lifetime_s: Some(7200),
            },
        )
        .await
        .unwrap();
    assert_eq!(ext.idle_timeout_s, 1234);
    assert!(ext.expires_at <= before.expires_at, "{ext:?}");
    assert!(ext.expires_at >= before.created_at + 7200, "{ext:?}");

    // Delete, then it is unknown.
    let deleted = c.session_delete(&id).await.unwrap();
    assert_eq!(deleted.id, id);
    assert_eq!(api_status(&c.session(&id).await.unwrap_err()), 404);
    assert!(c.sessions().await.unwrap().is_empty());
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_pauses_idle_sessions() {
    let s = Server::start_with(|c| c.reaper_interval = Duration::from_millis(300)).await;
    let key = s.key("dev", 2);
    let c = s.client(&key);
    c.deploy_dir(&repo_root().join("templates/shell"))
        .await
        .unwrap();
    let mut body = SessionCreateBody::new("shell");
    body.idle_timeout_s = Some(1);
    body.on_timeout = Some(TimeoutAction::Pause);
    let sess = c.session_create(&body).await.unwrap();
    c.session_exec(&sess.id, &sh("echo kept > /tmp/k"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut states = HashSet::new();
    loop {
        let st = c.session(&sess.id).await.unwrap().state;
        states.insert(format!("{st:?}"));
        if st == SessionState::Paused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never paused; states seen: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The reaper's pause may still be tearing the sandbox down after the state reads
    // `paused`: the engine answers `session_busy` (retry) until it is done.
    loop {
        match c.session_resume(&sess.id).await {
            Ok(s) => {
                assert_eq!(s.state, SessionState::Running);
                break;
            }
            Err(e) if e.code() == Some("session_busy") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("resume after the reaper's pause: {e}"),
        }
    }
    let out = c.session_exec(&sess.id, &sh("cat /tmp/k")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
    c.session_delete(&sess.id).await.unwrap();
    s.finish().await;
}

/// A port that was free a moment ago (the server binary needs a fixed `--listen`).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thaw_serve_binary_with_keys_managed_by_the_cli() {
    let home = Home::new();
    // Keys are created and revoked by other thaw processes while the server runs: the
    // metadata store is shared between processes.
    let created = home
        .run(&[
            "--json",
            "keys",
            "create",
            "--name",
            "ci",
            "--max-sandboxes",
            "2",
        ])
        .ok()
        .json();
    let secret = created["secret"].as_str().expect("secret").to_string();
    let id = created["key"]["id"].as_str().expect("id").to_string();
    assert!(secret.starts_with(&format!("thaw_{id}_")), "{created}");

    let log = tempfile::NamedTempFile::new().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    let mut child = home
        .cmd()
        .args(["serve", "--listen", url.trim_start_matches("http://")])
        .env("THAW_LOG", "thaw_server=info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("spawn thaw serve");
    let log_text = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http().get(format!("{url}/healthz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("thaw serve exited with {status}:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "thaw serve never answered:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let c = Client::new(&url, Some(secret.clone())).unwrap();
    c.deploy_dir(&repo_root().join("templates/shell"))
        .await
        .expect("deploy through thaw serve");
    let inv = c
        .invoke(
            "shell",
            &InvokeBody {
                payload: json!(7),
                ..InvokeBody::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&inv).unwrap()["result"]["payload"], 7);
    let out = c.exec("shell", &sh("echo hi; exit 3")).await.unwrap();
    assert_eq!(
        (out.result.exit_code, out.stdout.as_slice()),
        (3, &b"hi\n"[..])
    );
    // The embedded CLI (owner `local`) does not see the key's template.
    let ls = home.run(&["--json", "templates", "ls"]).ok().json();
    assert_eq!(ls, json!([]), "{ls}");

    // Revoked by another process: refused from the next request on.
    home.run(&["keys", "revoke", &id]).ok();
    let e = c.templates().await.unwrap_err();
    assert_eq!(api_status(&e), 401, "{e}");

    // SIGINT: a clean shutdown.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("thaw serve ignored SIGINT:\n{}", log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "thaw serve exited with {status}:\n{}",
        log_text()
    );
    assert!(log_text().contains("thaw API listening"), "{}", log_text());
    home.assert_clean();
}
