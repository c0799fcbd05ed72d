//! `thaw serve` killed with SIGKILL at several points (mid-invocation, mid-exec in a
//! session, mid-pause), then restarted on the same home: paused sessions are intact and
//! resumable, running sessions keep running, interrupted pauses are complete or rolled
//! back (never half), and the invocation's clone is cleaned up. Driven through the `thaw`
//! CLI with `--server`, so the CLI-over-HTTP path is exercised too.

use std::time::Duration;

use thaw_e2e::serve::{free_port, start_server, Cli};
use thaw_e2e::{repo_root, thaw_bin, Home};

#[test]
fn server_killed_at_several_points_loses_nothing_stored() {
    let home = Home::new();
    let key = home.run(&["keys", "create", "--name", "restart-test"]).ok();
    let key = key.stdout().trim().to_string();
    let port = free_port();
    let mut server = start_server(&home, port);
    let cli = Cli {
        home: &home,
        url: server.url.clone(),
        key,
    };
    let shell = repo_root().join("templates/shell");
    cli.ok(&["deploy", shell.to_str().unwrap()]);

    // A paused session and a running one.
    let paused = cli.ok(&["session", "new", "shell"]);
    cli.ok(&[
        "session",
        "exec",
        &paused,
        "--",
        "sh",
        "-c",
        "echo paused-state > /tmp/f",
    ]);
    cli.ok(&["session", "pause", &paused]);
    let running = cli.ok(&["session", "new", "shell"]);
    cli.ok(&[
        "session",
        "exec",
        &running,
        "--",
        "sh",
        "-c",
        "echo running-state > /tmp/f",
    ]);

    // 1. Killed mid-invocation (a one-shot exec) and mid-exec in the running session.
    let mut oneshot = cli
        .cmd(&["exec", "shell", "--", "sleep", "30"])
        .spawn()
        .unwrap();
    let mut in_session = cli
        .cmd(&["session", "exec", &running, "--", "sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    let _ = oneshot.wait();
    let _ = in_session.wait();
    server = start_server(&home, port);
    assert_eq!(cli.state(&paused), "paused");
    assert_eq!(cli.state(&running), "running");
    let sandboxes: Vec<String> = std::fs::read_dir(home.path().join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    let running_sandbox = cli.json(&["session", "show", &running])["sandbox"]
        .as_str()
        .expect("a running session names its sandbox")
        .to_string();
    assert_eq!(
        sandboxes,
        vec![running_sandbox],
        "the killed invocation's clone must be cleaned up, the session's kept"
    );
    assert_eq!(
        cli.ok(&["session", "exec", &running, "--", "cat", "/tmp/f"]),
        "running-state"
    );
    // The interrupted `sleep 30` died with its connection: nothing is left running.
    let ps = cli.ok(&["session", "exec", &running, "--", "ps"]);
    assert!(!ps.contains("sleep 30"), "{ps}");

    // 2. Killed mid-pause, at several points: complete or rolled back, never half.
    // A shell session's pause takes about 250 ms here: kill before, inside and after it.
    for delay_ms in [20u64, 80, 150, 220, 600] {
        let mut pause = cli.cmd(&["session", "pause", &running]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.kill9();
        let _ = pause.wait();
        // The checkpoint that runc started may still be finishing: let it.
        std::thread::sleep(Duration::from_millis(500));
        server = start_server(&home, port);
        let state = cli.state(&running);
        eprintln!("killed {delay_ms} ms into a pause: session is {state}");
        match state.as_str() {
            "paused" => {
                cli.ok(&["session", "resume", &running]);
            }
            "running" => {}
            other => panic!("after a kill mid-pause the session is {other}"),
        }
        assert_eq!(
            cli.ok(&["session", "exec", &running, "--", "cat", "/tmp/f"]),
            "running-state"
        );
    }

    // The paused session survived every restart.
    cli.ok(&["session", "resume", &paused]);
    assert_eq!(
        cli.ok(&["session", "exec", &paused, "--", "cat", "/tmp/f"]),
        "paused-state"
    );
    for id in [&paused, &running] {
        cli.ok(&["session", "rm", id]);
    }
    let snaps: Vec<String> = std::fs::read_dir(home.path().join("snapshots/refs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("ses-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(snaps.is_empty(), "session snapshots left: {snaps:?}");
    server.kill9();
    // A fresh engine sweeps what the last kill left (nothing should remain).
    home.run(&["templates", "ls"]).ok();
    home.assert_clean();
    let _ = thaw_bin();
}
