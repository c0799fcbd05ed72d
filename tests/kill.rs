//! End-to-end tests of live observation and the big red button (`GET /v1/sandboxes`,
//! `POST /v1/sandboxes/{id}/kill`, `POST /v1/sandboxes/kill`, `/metrics`) through a real
//! `thaw serve` router on a loopback socket, the real engine and real runc and CRIU
//! sandboxes of `templates/shell`.

use std::path::Path;
use std::time::{Duration, Instant};

use thaw_api::{
    Client, ClientError, ExecBody, Fault, LiveSandbox, SessionCreateBody, SessionState,
};
use thaw_e2e::inproc::{api_error, Server};
use thaw_e2e::repo_root;

/// What `thaw kill` must take at most, from the caller's side of the HTTP API.
const KILL_BOUND: Duration = Duration::from_millis(100);

fn sh(script: &str) -> ExecBody {
    ExecBody::new(["sh", "-c", script])
}

async fn deploy(c: &Client) {
    c.deploy_dir(&repo_root().join("templates/shell"))
        .await
        .expect("deploy shell");
}

fn admin_key(server: &Server, name: &str) -> String {
    server
        .engine
        .create_key(name, 8, true)
        .expect("admin key")
        .1
}

/// Waits until `c` lists a live sandbox running `argv` whose figures satisfy `ready`. If
/// the call `running` ends first, fails with what it answered.
async fn wait_for<T: std::fmt::Debug>(
    c: &Client,
    argv: &[String],
    ready: impl Fn(&LiveSandbox) -> bool,
    running: &mut tokio::task::JoinHandle<T>,
) -> LiveSandbox {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = c.sandboxes().await.expect("list sandboxes");
        if let Some(s) = list.iter().find(|s| s.tasks.iter().any(|t| t.argv == argv)) {
            if ready(s) {
                return s.clone();
            }
        }
        if running.is_finished() {
            let r = running.await;
            panic!("the call running {argv:?} ended before its sandbox was ready: {r:?}");
        }
        assert!(
            Instant::now() < deadline,
            "no live sandbox running {argv:?} became ready within 20 s; listed: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The members of sandbox `id`'s cgroups in every hierarchy: none may be left after a kill
/// (a hierarchy without its cgroup counts as empty).
fn cgroup_members(id: &str) -> Vec<String> {
    let root = Path::new("/sys/fs/cgroup");
    let mut roots = vec![root.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(root) {
        roots.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut out = Vec::new();
    for r in roots {
        let procs = r.join("thaw").join(id).join("cgroup.procs");
        if let Ok(text) = std::fs::read_to_string(&procs) {
            out.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| format!("{}: {l}", procs.display())),
            );
        }
    }
    out
}

/// Kills the live sandbox running `script` through `c` and checks the bound, that no
/// process of it is left, and that the exec's caller got the clear error.
async fn kill_and_check(
    c: &Client,
    sb: &LiveSandbox,
    exec: tokio::task::JoinHandle<Result<thaw_api::ExecOutput, ClientError>>,
    what: &str,
) {
    let started = Instant::now();
    let report = c.kill(&sb.id).await.expect("kill");
    let took = started.elapsed();
    let left = cgroup_members(&sb.id);
    assert!(
        took < KILL_BOUND,
        "killing {what} took {took:?} (the engine's part: {:.1} ms), over the {KILL_BOUND:?} bound",
        report.kill_ms
    );
    assert!(
        left.is_empty(),
        "{what}: processes still in the sandbox's cgroups right after the kill answered: {left:?}"
    );
    eprintln!(
        "killed {what}: {} processes, {took:?} over HTTP ({:.1} ms in the engine)",
        report.killed_processes, report.kill_ms
    );
    assert_eq!(report.sandbox.as_deref(), Some(sb.id.as_str()));
    assert_eq!(report.was, "running");
    assert!(report.killed_processes >= 1, "{report:?}");
    // Its caller returns at once with the clear error: ended by `thaw kill`, by which key.
    let e = tokio::time::timeout(Duration::from_secs(5), exec)
        .await
        .unwrap_or_else(|_| panic!("{what}: the killed exec did not return within 5 s"))
        .expect("exec task")
        .expect_err("a killed exec fails");
    let (status, code, message, fault) = api_error(&e);
    assert_eq!((status, code), (410, "killed"), "{e}");
    assert_eq!(fault, Fault::Caller, "{e}");
    assert!(
        message.contains("thaw kill") && message.contains(&sb.id),
        "{message}"
    );
    // Gone from the list.
    let list = c.sandboxes().await.expect("list");
    assert!(!list.iter().any(|s| s.id == sb.id), "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_and_a_task_ignoring_sigterm_are_killed_within_the_bound() {
    let server = Server::start().await;
    let secret = server.key("ops", 8);
    let c = server.client(&secret);
    deploy(&c).await;

    // A task that ignores SIGTERM and spins: `ps` shows it with the host's figures.
    let spin = sh("trap '' TERM; while :; do :; done");
    let mut running = tokio::spawn({
        let (c, body) = (c.clone(), spin.clone());
        async move { c.exec("shell", &body).await }
    });
    let sb = wait_for(
        &c,
        &spin.argv,
        // guest-init and the task's shell.
        |s| s.figures.pids.is_some_and(|p| p >= 2),
        &mut running,
    )
    .await;
    let f = &sb.figures;
    assert!(f.memory_bytes.is_some_and(|m| m > 0), "{sb:?}");
    assert!(f.cpu_seconds.is_some_and(|c| c > 0.0), "{sb:?}");
    assert!(f.disk_bytes.is_some(), "{sb:?}");
    // The gateway counts every sandbox; this one was granted no egress, so it has none.
    assert_eq!(
        (f.net_rx_bytes, f.connections_open),
        (Some(0), Some(0)),
        "{sb:?}"
    );
    assert_eq!(
        (
            sb.template.as_str(),
            sb.state.as_str(),
            sb.session.as_deref()
        ),
        ("shell", "running", None)
    );
    assert_eq!(sb.tasks[0].kind, "exec");
    assert!(sb.started_at.is_some());
    assert_eq!(c.sandbox(&sb.id).await.expect("get").id, sb.id);
    // /metrics has the same figures per template.
    let m = c.metrics().await.expect("metrics");
    assert!(
        m.contains("thaw_template_live_sandboxes{template=\"shell\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("thaw_template_cpu_seconds{template=\"shell\"}"),
        "{m}"
    );
    kill_and_check(&c, &sb, running, "a task ignoring SIGTERM").await;

    // A fork bomb: killed with every process it made, however fast it forks. Every copy
    // forks copies of itself for ever; the task's own shell spins without forking, so the
    // exec runs until it is killed. A copy whose fork the pids limit refuses exits, so now
    // and then the whole bomb dies out by itself within milliseconds (every copy failed at
    // once): that one is killed too (it counts) and another is started.
    let bomb = sh("exec 2>/dev/null; f(){ while :; do f & done; }; f & while :; do :; done");
    let mut kills = 1;
    for attempt in 1.. {
        let mut running = tokio::spawn({
            let (c, body) = (c.clone(), bomb.clone());
            async move { c.exec("shell", &body).await }
        });
        let sb = wait_for(&c, &bomb.argv, |_| true, &mut running).await;
        // Going: at the template's pids limit (64), or near it.
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut going = false;
        while !going && Instant::now() < deadline {
            let s = c.sandbox(&sb.id).await.expect("get the bomb's sandbox");
            going = s.figures.pids.is_some_and(|p| p >= 32);
        }
        kills += 1;
        if going {
            kill_and_check(&c, &sb, running, "a fork bomb").await;
            break;
        }
        assert!(attempt < 5, "5 fork bombs in a row died out by themselves");
        c.kill(&sb.id).await.expect("kill a bomb that died out");
        let _ = running.await;
    }

    let m = c.metrics().await.expect("metrics");
    assert!(
        m.contains(&format!("thaw_kills_total{{template=\"shell\"}} {kills}")),
        "{m}"
    );
    assert!(!m.contains("thaw_template_live_sandboxes{"), "{m}");
    // Nothing of either is left once teardowns end (`finish` checks processes, cgroups,
    // mounts, runc state and directories).
    server.engine.settle().await;
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sees_and_kills_only_its_own_sandboxes_and_an_admin_every_keys() {
    let server = Server::start().await;
    let (a_secret, b_secret) = (server.key("a", 8), server.key("b", 8));
    let (a, b) = (server.client(&a_secret), server.client(&b_secret));
    let admin = server.client(&admin_key(&server, "operator"));
    deploy(&a).await;
    deploy(&b).await;
    let long = |tag: &str| sh(&format!("echo {tag}; sleep 30"));
    let start = |c: &Client, body: ExecBody| {
        let c = c.clone();
        tokio::spawn(async move { c.exec("shell", &body).await })
    };

    let mut a1 = start(&a, long("a1"));
    let mut b1 = start(&b, long("b1"));
    let sa = wait_for(&a, &long("a1").argv, |_| true, &mut a1).await;
    let sb = wait_for(&b, &long("b1").argv, |_| true, &mut b1).await;

    // Another key's sandbox does not exist for a key: not listed, 404 to get and to kill.
    assert!(!a
        .sandboxes()
        .await
        .expect("list")
        .iter()
        .any(|s| s.id == sb.id));
    for e in [
        a.sandbox(&sb.id).await.expect_err("get another key's"),
        a.kill(&sb.id).await.expect_err("kill another key's"),
    ] {
        assert_eq!(api_error(&e).0, 404, "{e}");
    }
    // Naming another key is for admins only.
    let e = a
        .kill_all(Some("someone"))
        .await
        .expect_err("kill another key's all");
    assert_eq!(api_error(&e).0, 403, "{e}");
    // An admin sees both.
    let all = admin.sandboxes().await.expect("admin list");
    for id in [&sa.id, &sb.id] {
        assert!(all.iter().any(|s| &s.id == id), "{id} not in {all:?}");
    }

    // A's kill-all ends A's and leaves B's running.
    let killed = a.kill_all(None).await.expect("kill all of a");
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert_eq!(killed[0].sandbox.as_deref(), Some(sa.id.as_str()));
    let e = a1.await.expect("task").expect_err("a1 was killed");
    assert_eq!(api_error(&e).1, "killed", "{e}");
    assert!(cgroup_members(&sa.id).is_empty());
    let still = b.sandboxes().await.expect("list b");
    assert!(
        still.iter().any(|s| s.id == sb.id),
        "B's sandbox survived A's kill-all: {still:?}"
    );
    assert!(!b1.is_finished(), "B's exec must still run");

    // An admin ends another key's sandbox; the error names the admin's key.
    let report = admin.kill(&sb.id).await.expect("admin kills b's");
    assert_eq!(report.owner, sb.owner, "the sandbox is B's");
    let e = b1.await.expect("task").expect_err("b1 was killed");
    let (status, code, message, _) = api_error(&e);
    assert_eq!((status, code), (410, "killed"), "{e}");
    assert!(message.contains("by API key"), "{message}");

    // An admin's kill-all of one key, by `?key=`, leaves the other's alone.
    let mut a2 = start(&a, long("a2"));
    let mut b2 = start(&b, long("b2"));
    let sa2 = wait_for(&a, &long("a2").argv, |_| true, &mut a2).await;
    let sb2 = wait_for(&b, &long("b2").argv, |_| true, &mut b2).await;
    let b_id = sb.owner.clone();
    let killed = admin
        .kill_all(Some(&b_id))
        .await
        .expect("admin kills b's all");
    let ids: Vec<_> = killed.iter().filter_map(|k| k.sandbox.clone()).collect();
    assert_eq!(ids, vec![sb2.id.clone()]);
    assert!(a
        .sandboxes()
        .await
        .expect("list")
        .iter()
        .any(|s| s.id == sa2.id));
    assert_eq!(
        api_error(&b2.await.expect("task").expect_err("b2")).1,
        "killed"
    );
    a.kill(&sa2.id).await.expect("a kills its own");
    assert_eq!(
        api_error(&a2.await.expect("task").expect_err("a2")).1,
        "killed"
    );
    server.engine.settle().await;
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_session_ends_for_good_running_or_paused() {
    let server = Server::start().await;
    let secret = server.key("s", 8);
    let c = server.client(&secret);
    deploy(&c).await;

    // Running, with a call in it: the call gets `killed`, the session is stopped.
    let s = c
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .expect("create");
    let busy = sh("trap '' TERM; sleep 30");
    let mut call = tokio::spawn({
        let (c, id, body) = (c.clone(), s.id.clone(), busy.clone());
        async move { c.session_exec(&id, &body).await }
    });
    let live = wait_for(&c, &busy.argv, |_| true, &mut call).await;
    assert_eq!(live.session.as_deref(), Some(s.id.as_str()));
    assert_eq!(live.state, "running");
    let started = Instant::now();
    let report = c.kill(&s.id).await.expect("kill running session");
    assert!(
        started.elapsed() < KILL_BOUND,
        "killing a running session took {:?}",
        started.elapsed()
    );
    assert_eq!(report.was, "running");
    assert_eq!(report.sandbox.as_deref(), Some(live.id.as_str()));
    assert!(cgroup_members(&live.id).is_empty());
    let e = call.await.expect("task").expect_err("the call was killed");
    assert_eq!(api_error(&e).1, "killed", "{e}");
    let after = c.session(&s.id).await.expect("session");
    assert_eq!(after.state, SessionState::Stopped);
    assert!(
        after
            .error
            .as_deref()
            .is_some_and(|e| e.contains("thaw kill")),
        "{after:?}"
    );

    // Paused: `ps` does not list it (it has no sandbox); a kill ends it for good.
    let p = c
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .expect("create");
    c.session_pause(&p.id).await.expect("pause");
    assert!(!c
        .sandboxes()
        .await
        .expect("list")
        .iter()
        .any(|s| s.session.as_deref() == Some(p.id.as_str())));
    let report = c.kill(&p.id).await.expect("kill paused session");
    assert_eq!(
        (report.was.as_str(), report.sandbox.as_deref()),
        ("paused", None)
    );
    assert_eq!(report.killed_processes, 0);
    // Its audit record names the session and no sandbox: a paused session has none.
    let rs = c
        .audit(&thaw_api::AuditQuery {
            session: Some(p.id.clone()),
            action: Some("kill".into()),
            ..Default::default()
        })
        .await
        .expect("audit")
        .records;
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!(rs[0].session.as_deref(), Some(p.id.as_str()), "{rs:?}");
    assert_eq!(rs[0].sandbox, None, "{rs:?}");
    let after = c.session(&p.id).await.expect("session");
    assert_eq!(after.state, SessionState::Stopped, "{after:?}");
    assert_eq!(after.snapshot, None, "its pause snapshot is dropped");
    // Nothing brings it back: not a resume, not a reset.
    let e = c
        .session_resume(&p.id)
        .await
        .expect_err("resume a killed session");
    assert_eq!(
        api_error(&e).0,
        410,
        "killed, whatever state it was left in: {e}"
    );
    let e = c
        .session_reset(&p.id, None)
        .await
        .expect_err("reset a killed session");
    assert_eq!(api_error(&e).0, 410, "{e}");
    let e = c
        .session_exec(&s.id, &ExecBody::new(["true"]))
        .await
        .expect_err("exec in a killed session");
    assert_eq!(api_error(&e).0, 410, "{e}");
    // Removing them still works.
    c.session_delete(&s.id).await.expect("delete");
    c.session_delete(&p.id).await.expect("delete");
    server.engine.settle().await;
    server.finish().await;
}
