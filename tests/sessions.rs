//! Sessions on the real container tier (runc + CRIU), through the engine's API: state carries
//! over between calls, survives pause and resume and a reopened engine; races resolve to one
//! winner and a conflict; timeouts pause or stop; a killed sandbox fails its session.

use std::time::Duration;

use thaw_e2e::{repo_root, Home};
use thaw_platform::engine::RunOptions;
use thaw_platform::session::{SessionOptions, SessionState, TimeoutAction};
use thaw_platform::{Engine, Error, Paths};

fn paths(home: &Home) -> Paths {
    Paths::new(
        home.path(),
        std::env::var("THAW_CACHE").unwrap_or_else(|_| "/var/cache/thaw".into()),
    )
}

async fn engine_with(home: &Home, template: &str) -> Engine {
    let engine = Engine::open(paths(home)).await.expect("open engine");
    engine
        .deploy(
            &repo_root().join("templates").join(template),
            &thaw_platform::progress::Quiet,
        )
        .await
        .expect("deploy");
    engine
}

async fn sh(engine: &Engine, id: &str, script: &str) -> String {
    let mut out = Vec::new();
    let r = engine
        .session_exec(
            id,
            vec!["sh".into(), "-c".into(), script.into()],
            None,
            RunOptions::default(),
            |_, d| out.extend_from_slice(d),
        )
        .await
        .expect("session exec");
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&out));
    String::from_utf8_lossy(&out).trim().to_string()
}

fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::SessionConflict { .. } | Error::SessionBusy { .. })
}

#[test]
fn shell_session_keeps_files_across_calls_pause_and_resume() {
    let home = Home::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = engine_with(&home, "shell").await;
        let s = engine
            .session_create("shell", SessionOptions::default())
            .await
            .unwrap();
        assert_eq!(s.state, SessionState::Running);
        let sandbox = s
            .sandbox
            .clone()
            .expect("a running session names its sandbox");
        assert!(home.path().join("sandboxes").join(&sandbox).exists());

        sh(&engine, &s.id, "echo 41 > /tmp/counter").await;
        assert_eq!(
            sh(&engine, &s.id, "echo $(( $(cat /tmp/counter) + 1 ))").await,
            "42"
        );
        engine
            .session_write_file(&s.id, "/work/notes.txt", b"kept\n".to_vec(), Some(0o600))
            .await
            .unwrap();
        assert_eq!(
            engine
                .session_read_file(&s.id, "/work/notes.txt")
                .await
                .unwrap(),
            b"kept\n"
        );
        assert_eq!(
            sh(&engine, &s.id, "stat -c %a /work/notes.txt").await,
            "600"
        );
        assert_eq!(sh(&engine, &s.id, "hostname").await, s.id);

        let p = engine.session_pause(&s.id).await.unwrap();
        assert_eq!(p.state, SessionState::Paused);
        let size = p.snapshot_size.expect("pause records its size");
        assert!(size.raw_bytes > 0);
        assert!(
            size.stored_bytes < size.raw_bytes,
            "a pause stores only what its template's snapshot does not already hold: {size:?}"
        );
        assert!(
            !home.path().join("sandboxes").join(&sandbox).exists(),
            "a paused session holds no sandbox"
        );
        let e = engine
            .session_exec(
                &s.id,
                vec!["true".into()],
                None,
                RunOptions::default(),
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert!(is_conflict(&e), "exec on a paused session: {e}");
        assert!(e.to_string().contains("resume"), "{e}");

        let r = engine.session_resume(&s.id).await.unwrap();
        assert_eq!(r.state, SessionState::Running);
        assert!(r.snapshot.is_none());
        assert_eq!(
            sh(&engine, &s.id, "cat /tmp/counter /work/notes.txt").await,
            "41\nkept"
        );
        let e = engine.session_resume(&s.id).await.unwrap_err();
        assert!(is_conflict(&e), "second resume: {e}");

        // Pause, resume and pause again: each pause writes a fresh snapshot, the old goes.
        engine.session_pause(&s.id).await.unwrap();
        engine.session_resume(&s.id).await.unwrap();
        assert_eq!(sh(&engine, &s.id, "cat /tmp/counter").await, "41");

        let d = engine.session_delete(&s.id).await.unwrap();
        assert_eq!(d.id, s.id);
        assert!(matches!(
            engine.session(&s.id).unwrap_err(),
            Error::UnknownSession { .. }
        ));
        // Its snapshots go off the caller's clock.
        engine.settle().await;
        let snaps: Vec<String> = engine
            .snapshots
            .list()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with("ses-"))
            .collect();
        assert!(snaps.is_empty(), "session snapshots left: {snaps:?}");
    });
    home.assert_clean();
}

#[test]
fn python_variable_survives_pause_and_an_engine_restart() {
    let home = Home::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let id = rt.block_on(async {
        let engine = engine_with(&home, "python").await;
        let s = engine
            .session_create("python", SessionOptions::default())
            .await
            .unwrap();
        let call = |code: &str| {
            let engine = engine.clone();
            let id = s.id.clone();
            let payload = serde_json::json!({"op": "python", "code": code});
            async move {
                let inv = engine
                    .session_invoke(&id, payload, RunOptions::default(), |_| {})
                    .await
                    .unwrap();
                assert_eq!(
                    inv.done.status,
                    thaw_protocol::InvokeStatus::Ok,
                    "{:?}",
                    inv.done
                );
                inv.done.result.unwrap_or_default()["value"].clone()
            }
        };
        call("x = np.arange(5).sum()").await;
        assert_eq!(call("int(x) + 1").await, serde_json::json!(11));
        let p = engine.session_pause(&s.id).await.unwrap();
        let size = p.snapshot_size.unwrap();
        eprintln!(
            "python session pause: {} ms, raw {} bytes, new stored {} bytes",
            p.last_pause_ms.unwrap_or(0),
            size.raw_bytes,
            size.stored_bytes
        );
        s.id
    });
    drop(rt);
    // A new runtime and engine: what a restarted thaw sees.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = Engine::open(paths(&home)).await.unwrap();
        let s = engine.session(&id).unwrap();
        assert_eq!(s.state, SessionState::Paused);
        let r = engine.session_resume(&id).await.unwrap();
        eprintln!(
            "python session resume: {} ms",
            r.last_resume_ms.unwrap_or(0)
        );
        let inv = engine
            .session_invoke(
                &id,
                serde_json::json!({"op": "python", "code": "int(x) * 2"}),
                RunOptions::default(),
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(inv.done.result.unwrap()["value"], serde_json::json!(20));
        engine.session_delete(&id).await.unwrap();
    });
    home.assert_clean();
}

#[test]
fn races_timeouts_ownership_and_a_killed_sandbox() {
    let home = Home::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = engine_with(&home, "shell").await;
        let s = engine
            .session_create("shell", SessionOptions::default())
            .await
            .unwrap();

        // Another owner cannot see it.
        let other = engine.as_owner("someoneelse");
        assert!(matches!(
            other.session(&s.id).unwrap_err(),
            Error::UnknownSession { .. }
        ));
        assert!(other.sessions().unwrap().is_empty());
        assert!(other.session_pause(&s.id).await.is_err());

        // A running session survives another engine opening the home (the crash sweep
        // leaves session sandboxes alone).
        let second = Engine::open(paths(&home)).await.unwrap();
        assert_eq!(sh(&second, &s.id, "echo alive").await, "alive");

        // Pause and resume racing: exactly one of them wins.
        let (a, b) = tokio::join!(engine.session_pause(&s.id), engine.session_resume(&s.id));
        assert!(a.is_ok() != b.is_ok(), "pause {a:?} / resume {b:?}");
        let loser = a.as_ref().err().or(b.as_ref().err()).unwrap();
        assert!(is_conflict(loser), "{loser}");
        let state = engine.session(&s.id).unwrap().state;
        assert!(
            matches!(state, SessionState::Paused | SessionState::Running),
            "{state:?}"
        );
        if state == SessionState::Running {
            engine.session_pause(&s.id).await.unwrap();
        }
        // Two resumes racing: one wins.
        let (a, b) = tokio::join!(engine.session_resume(&s.id), engine.session_resume(&s.id));
        assert!(a.is_ok() != b.is_ok(), "resume {a:?} / resume {b:?}");
        assert_eq!(engine.session(&s.id).unwrap().state, SessionState::Running);

        // Idle timeouts: one session pauses, one stops.
        let idle = |on_timeout| SessionOptions {
            idle_timeout: Duration::from_secs(1),
            on_timeout,
            ..SessionOptions::default()
        };
        let to_pause = engine
            .session_create("shell", idle(TimeoutAction::Pause))
            .await
            .unwrap();
        let to_stop = engine
            .session_create("shell", idle(TimeoutAction::Stop))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        // `s` was active too long ago as well, but its idle timeout is 10 minutes.
        let changed = engine.enforce_session_timeouts().await.unwrap();
        let mut ids: Vec<_> = changed.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        let mut want = vec![to_pause.id.clone(), to_stop.id.clone()];
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(
            engine.session(&to_pause.id).unwrap().state,
            SessionState::Paused
        );
        let stopped = engine.session(&to_stop.id).unwrap();
        assert_eq!(stopped.state, SessionState::Stopped);
        assert!(stopped.error.unwrap().contains("idle"));
        assert_eq!(engine.session(&s.id).unwrap().state, SessionState::Running);
        // Extending makes the paused one's lifetime longer and keeps it paused.
        let ext = engine
            .session_extend(&to_pause.id, None, Some(Duration::from_secs(3600)))
            .unwrap();
        assert!(ext.expires_at >= thaw_now() + 3500);

        // A sandbox killed from outside: the next call fails the session, saying why.
        let runc_root = home.path().join("runc");
        let st = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args([
                "kill",
                &engine.session(&s.id).unwrap().sandbox.expect("sandbox"),
                "KILL",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let e = engine
            .session_exec(
                &s.id,
                vec!["true".into()],
                None,
                RunOptions::default(),
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("died"), "{e}");
        assert_eq!(engine.session(&s.id).unwrap().state, SessionState::Failed);

        for id in [&s.id, &to_pause.id, &to_stop.id] {
            engine.session_delete(id).await.unwrap();
        }
        assert!(engine.sessions().unwrap().is_empty());
    });
    home.assert_clean();
}

fn thaw_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
