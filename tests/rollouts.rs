//! End-to-end tests of the rollout routes (checkpoints, reset, fork, batch, reward) through
//! a real `thaw serve` router on a loopback socket, the real engine and real runc and CRIU
//! sandboxes of `templates/shell`.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use thaw_api::{
    BatchBody, Client, ExecBody, Fault, ForkBody, RewardBody, SessionCreateBody, SessionState,
};
use thaw_e2e::inproc::{api_error, Server};
use thaw_e2e::repo_root;

fn sh(script: &str) -> ExecBody {
    ExecBody::new(["sh", "-c", script])
}

async fn out(c: &Client, id: &str, script: &str) -> String {
    let o = c.session_exec(id, &sh(script)).await.expect("exec");
    assert!(o.result.outcome.success(), "{script}: {:?}", o.result);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A server with `templates/shell` deployed by a key of `max_sandboxes`: the server, a
/// client of that key, and its secret.
async fn shell_server(max_sandboxes: u32) -> (Server, Client, String) {
    let server = Server::start().await;
    let secret = server.key("rl", max_sandboxes);
    let c = server.client(&secret);
    c.deploy_dir(&repo_root().join("templates/shell"))
        .await
        .expect("deploy shell");
    (server, c, secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_resets_put_a_session_back_and_cancel_what_runs() {
    let (server, c, _) = shell_server(8).await;
    let s = c
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .expect("create");
    assert_eq!(s.origin, "template shell");
    out(&c, &s.id, "echo one > /tmp/a").await;
    let ckp = c
        .session_checkpoint(&s.id, "mid")
        .await
        .expect("checkpoint");
    assert_eq!(
        (ckp.name.as_str(), ckp.session.as_str()),
        ("mid", s.id.as_str())
    );
    assert!(ckp.raw_bytes > 0);
    // A name is taken once; a bad one names the rule.
    let e = c.session_checkpoint(&s.id, "mid").await.unwrap_err();
    assert_eq!(api_error(&e).1, "checkpoint_exists", "{e}");
    let e = c.session_checkpoint(&s.id, "../x").await.unwrap_err();
    assert_eq!(api_error(&e).0, 400, "{e}");
    out(&c, &s.id, "echo two > /tmp/b; rm /tmp/a").await;

    // Back to the checkpoint: /tmp/a is back, /tmp/b is gone; same id and hostname.
    let r = c.session_reset(&s.id, Some("mid")).await.expect("reset");
    assert_eq!(r.from, "checkpoint mid");
    assert_eq!(r.cancelled_calls, 0);
    assert_eq!(r.session.id, s.id);
    assert_eq!(r.session.resets, 1);
    assert_eq!(r.session.checkpoints, vec!["mid".to_string()]);
    assert_eq!(
        out(
            &c,
            &s.id,
            "cat /tmp/a; ls /tmp/b 2>&1 >/dev/null | wc -l; hostname"
        )
        .await,
        format!("one\n1\n{}", s.id)
    );
    // Back to the origin: neither file.
    let r = c.session_reset(&s.id, None).await.expect("reset to origin");
    assert_eq!(r.from, "origin");
    assert_eq!(out(&c, &s.id, "ls /tmp | wc -l").await, "0");

    // An unknown checkpoint is a 404 naming the known ones, and changes nothing.
    let e = c.session_reset(&s.id, Some("nope")).await.unwrap_err();
    let (status, code, message, _) = api_error(&e);
    assert_eq!((status, code), (404, "unknown_checkpoint"), "{e}");
    assert!(message.contains("mid"), "{message}");

    // A reset cancels a command running in the session, and says so.
    let (c2, id) = (c.clone(), s.id.clone());
    let running = tokio::spawn(async move { c2.session_exec(&id, &sh("sleep 30")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = c
        .session_reset(&s.id, None)
        .await
        .expect("reset while busy");
    assert_eq!(r.cancelled_calls, 1);
    let e = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the cancelled exec returns at once")
        .expect("task")
        .unwrap_err();
    assert_eq!(api_error(&e).1, "cancelled", "{e}");
    assert_eq!(out(&c, &s.id, "echo alive").await, "alive");

    // A paused session resets too, and runs afterwards.
    out(&c, &s.id, "echo x > /tmp/x").await;
    c.session_pause(&s.id).await.expect("pause");
    let r = c
        .session_reset(&s.id, Some("mid"))
        .await
        .expect("reset paused");
    assert_eq!(r.session.state, SessionState::Running);
    assert_eq!(out(&c, &s.id, "cat /tmp/a; ls /tmp").await, "one\na");

    // Deleting a checkpoint; deleting the session removes every snapshot it owned.
    c.session_checkpoint_delete(&s.id, "mid")
        .await
        .expect("delete checkpoint");
    assert!(c.session_checkpoints(&s.id).await.expect("list").is_empty());
    c.session_delete(&s.id).await.expect("delete");
    server.engine.settle().await;
    let prefix = format!("ses-{}", s.id.trim_start_matches("ses-"));
    let left: Vec<String> = server
        .engine
        .snapshots
        .names()
        .expect("names")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "snapshots left behind: {left:?}");
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_and_batches_make_isolated_sessions_within_the_key_limit() {
    let (server, c, secret) = shell_server(8).await;
    let src = c
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .expect("create");
    out(&c, &src.id, "echo episode-7 > /tmp/state").await;

    // Fork the live session into 3: each has its state, its own identity and entropy.
    let forked = c
        .session_fork(
            &src.id,
            &ForkBody {
                n: 3,
                ..ForkBody::default()
            },
        )
        .await
        .expect("fork");
    assert!(forked.errors.is_empty(), "{:?}", forked.errors);
    assert_eq!(forked.sessions.len(), 3);
    let mut seen = HashSet::new();
    for f in &forked.sessions {
        assert_eq!(f.state, SessionState::Running);
        assert_eq!(f.origin, format!("fork of session {}", src.id));
        let got = out(
            &c,
            &f.id,
            "cat /tmp/state; hostname; head -c 16 /dev/urandom | od -An -tx1",
        )
        .await;
        let mut lines = got.lines();
        assert_eq!(lines.next(), Some("episode-7"));
        assert_eq!(lines.next(), Some(f.id.as_str()));
        assert!(
            seen.insert(lines.collect::<String>()),
            "two forks drew the same random bytes"
        );
        // Their writes are their own.
        out(&c, &f.id, &format!("echo {} > /tmp/mine", f.id)).await;
    }
    // The source goes on running, and sees none of the forks' writes.
    assert_eq!(
        out(&c, &src.id, "cat /tmp/state; ls /tmp").await,
        "episode-7\nstate"
    );
    // A fork resets to the fork point.
    let f0 = &forked.sessions[0].id;
    c.session_reset(f0, None).await.expect("reset fork");
    assert_eq!(out(&c, f0, "ls /tmp").await, "state");

    // Over the key's limit (8: 4 sessions held), refused before anything is restored.
    let before = c.sessions().await.expect("list").len();
    let e = c
        .session_batch(&BatchBody {
            n: 5,
            template: Some("shell".into()),
            ..BatchBody::default()
        })
        .await
        .unwrap_err();
    let (status, code, message, fault) = api_error(&e);
    assert_eq!((status, code), (429, "too_many_sandboxes"), "{e}");
    assert!(message.contains("asks for 5 and 4 are free"), "{message}");
    assert_eq!(fault, Fault::Infrastructure);
    assert_eq!(c.sessions().await.expect("list").len(), before);

    // A batch from a checkpoint.
    c.session_checkpoint(&src.id, "start")
        .await
        .expect("checkpoint");
    let post = |secret: String, path: &'static str, body: Value| {
        let url = server.url(path);
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(secret)
                .header("accept", "application/x-ndjson")
                .json(&body)
                .send()
                .await
                .expect("batch")
        }
    };
    // Another key cannot see the session: 404, as for an id that does not exist.
    let other = server.key("other", 8);
    let body = json!({"n": 2, "session": src.id, "checkpoint": "start"});
    let resp = post(other.clone(), "/v1/sessions/batch", body).await;
    assert_eq!(resp.status().as_u16(), 404);
    let body = json!({"n": 2, "template": "shell", "checkpoint": "start"});
    let resp = post(secret.clone(), "/v1/sessions/batch", body).await;
    assert_eq!(resp.status().as_u16(), 400, "a checkpoint needs a session");
    let batch = c
        .session_batch(&BatchBody {
            n: 2,
            session: Some(src.id.clone()),
            checkpoint: Some("start".into()),
            ..BatchBody::default()
        })
        .await
        .expect("batch from checkpoint");
    assert_eq!(batch.sessions.len(), 2, "{:?}", batch.errors);
    for s in &batch.sessions {
        assert_eq!(s.origin, format!("checkpoint {}/start", src.id));
        assert_eq!(out(&c, &s.id, "cat /tmp/state").await, "episode-7");
        c.session_delete(&s.id).await.expect("delete");
    }
    for f in &forked.sessions {
        c.session_delete(&f.id).await.expect("delete");
    }
    // Templates belong to their key too.
    let resp = post(
        other,
        "/v1/sessions/batch",
        json!({"n": 2, "template": "shell"}),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 404);
    // Streamed: one line per session as it is ready, then `done`.
    let body = json!({"n": 2, "template": "shell", "idle_timeout_s": 60});
    let resp = post(secret, "/v1/sessions/batch", body).await;
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("stream");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("ndjson line"))
        .collect();
    assert_eq!(events.len(), 3, "{text}");
    for e in &events[..2] {
        assert_eq!(e["event"], "session", "{e}");
        assert_eq!(e["session"]["idle_timeout_s"], 60);
    }
    assert_eq!(events[2]["event"], "done");
    assert_eq!(events[2]["created"], 2);
    for e in &events[..2] {
        let id = e["session"]["id"].as_str().expect("id");
        c.session_delete(id).await.expect("delete");
    }
    c.session_delete(&src.id).await.expect("delete");
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_are_numbers_and_failures_say_whose_they_are() {
    let (server, c, _) = shell_server(8).await;
    // A rollout session: its memory is shared with the snapshot, it cannot be paused.
    let s = c
        .session_create(&SessionCreateBody {
            checkpointable: Some(false),
            ..SessionCreateBody::new("shell")
        })
        .await
        .expect("create");
    assert!(!s.checkpointable);
    assert_eq!(
        s.on_timeout,
        thaw_api::TimeoutAction::Stop,
        "its timeouts stop it"
    );
    for e in [
        c.session_pause(&s.id).await.unwrap_err(),
        c.session_checkpoint(&s.id, "x").await.unwrap_err(),
    ] {
        let (status, _, message, _) = api_error(&e);
        assert_eq!(status, 409, "{e}");
        assert!(message.contains("checkpointable: false"), "{message}");
    }
    let e = c
        .session_create(&SessionCreateBody {
            checkpointable: Some(false),
            on_timeout: Some(thaw_api::TimeoutAction::Pause),
            ..SessionCreateBody::new("shell")
        })
        .await
        .unwrap_err();
    assert_eq!(api_error(&e).0, 400, "{e}");
    let reward =
        |c: Client, id: String| async move { c.session_reward(&id, &RewardBody::default()).await };
    // Nothing written yet: the template's command prints 0.
    assert_eq!(
        reward(c.clone(), s.id.clone())
            .await
            .expect("reward")
            .reward,
        0.0
    );
    out(&c, &s.id, "echo 0.75 > /tmp/reward").await;
    let r = reward(c.clone(), s.id.clone()).await.expect("reward");
    assert_eq!((r.reward, r.exit_code), (0.75, 0));
    // Not a number: the task's fault, quoting what it printed.
    out(&c, &s.id, "echo 'about half' > /tmp/reward").await;
    let e = reward(c.clone(), s.id.clone()).await.unwrap_err();
    let (status, code, message, fault) = api_error(&e);
    assert_eq!(
        (status, code, fault),
        (422, "reward_not_a_number", Fault::Task),
        "{e}"
    );
    assert!(message.contains("about half"), "{message}");

    // The sandbox killed from outside: the infrastructure's fault, and a reset brings the
    // session back.
    let pids = thaw_e2e::sandbox_procs(server.home.path(), "");
    assert!(
        !pids.is_empty(),
        "no process found in the session's sandbox"
    );
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = c.session_exec(&s.id, &sh("true")).await.unwrap_err();
    let (status, code, _, fault) = api_error(&e);
    assert_eq!(
        (status, code, fault),
        (502, "session_lost", Fault::Infrastructure),
        "{e}"
    );
    assert_eq!(
        c.session(&s.id).await.expect("get").state,
        SessionState::Failed
    );
    let r = c
        .session_reset(&s.id, None)
        .await
        .expect("reset a failed session");
    assert_eq!(r.session.state, SessionState::Running);
    assert_eq!(out(&c, &s.id, "echo back").await, "back");
    c.session_delete(&s.id).await.expect("delete");
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_mid_batch_has_its_sessions_reaped_after_their_idle_timeout() {
    let (server, c, secret) = shell_server(8).await;
    // A streamed batch whose client reads one line, then goes away.
    let mut resp = reqwest::Client::new()
        .post(server.url("/v1/sessions/batch?stream=true"))
        .bearer_auth(&secret)
        .json(&json!({"n": 3, "template": "shell", "idle_timeout_s": 1, "checkpointable": false}))
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status().as_u16(), 200);
    let first = resp.chunk().await.expect("read").expect("a first line");
    assert!(String::from_utf8_lossy(&first).contains("\"session\""));
    drop(resp);
    // The batch still completes: every session it made is the key's, and idles out.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let sessions = loop {
        let s = c.sessions().await.expect("list");
        if s.len() == 3 && s.iter().all(|s| s.state == SessionState::Running) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "batch never completed: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let changed = server
        .engine
        .enforce_session_timeouts()
        .await
        .expect("timeouts");
    assert_eq!(changed.len(), 3, "{changed:?}");
    for s in sessions {
        let now = c.session(&s.id).await.expect("get");
        assert_eq!(now.state, SessionState::Stopped, "{now:?}");
        c.session_delete(&s.id).await.expect("delete");
    }
    server.finish().await;
}
