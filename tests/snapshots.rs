//! End-to-end tests of snapshots on the container tier: restore-based invocations, many
//! isolated clones, a corrupted chunk, and crash recovery after `kill -9`.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thaw_e2e::{repo_root, thaw_bin, Home};

fn write_template(dir: &Path, toml: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("template.toml"), toml).unwrap();
}

/// Chunk ids referenced by a snapshot, read from the store's documented on-disk format.
fn chunks_of(home: &Path, snapshot: &str) -> Vec<String> {
    let store = home.join("snapshots");
    let id = std::fs::read_to_string(store.join("refs").join(snapshot)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("manifests").join(format!("{}.json", id.trim()))).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for e in manifest["entries"].as_array().unwrap() {
        if let Some(chunks) = e["chunks"].as_array() {
            out.extend(chunks.iter().map(|c| c["id"].as_str().unwrap().to_string()));
        }
    }
    out
}

fn snapshot_name(h: &Home, template: &str) -> String {
    let ls = h.run(&["--json", "templates", "ls"]).ok().json();
    ls.as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == template)
        .and_then(|t| t["snapshot"].as_str())
        .unwrap_or_else(|| panic!("{template} has no snapshot: {ls}"))
        .to_string()
}

#[test]
fn invocations_restore_from_the_snapshot() {
    let h = Home::new();
    h.deploy("shell");
    let v = h
        .run(&["--json", "invoke", "shell", "--payload", "1"])
        .ok()
        .json();
    assert_eq!(v["start"], "restore", "{v}");
    assert_eq!(v["result"]["payload"], 1);
    // The restored clone has its own identity, not the snapshot's.
    let r = h
        .run(&[
            "exec",
            "shell",
            "--",
            "sh",
            "-c",
            "hostname; echo $THAW_SANDBOX_ID",
        ])
        .ok();
    let out = r.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], lines[1]);
    h.assert_clean();
}

#[test]
fn corrupted_chunk_marks_only_that_template_for_rebuild() {
    let h = Home::new();
    h.deploy("shell");
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    // A persistent shell worker makes this snapshot's memory differ from `shell`'s.
    write_template(
        &other,
        "name = \"other\"\nbase = { kind = \"busybox\" }\n[handler]\nmode = \"persistent\"\ncommand = [\"/bin/sh\", \"-c\", \"echo '{\\\"ready\\\":true}'; while read l; do echo '{\\\"ok\\\":1}'; done\"]\n",
    );
    h.run(&["deploy", other.to_str().unwrap()]).ok();
    let snap = snapshot_name(&h, "shell");
    let other_chunks: HashSet<String> = chunks_of(h.path(), &snapshot_name(&h, "other"))
        .into_iter()
        .collect();
    let victim = chunks_of(h.path(), &snap)
        .into_iter()
        .find(|c| !other_chunks.contains(c))
        .expect("shell has a chunk of its own");
    let file = h
        .path()
        .join("snapshots/chunks")
        .join(&victim[..2])
        .join(format!("{victim}.zst"));
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    // A fresh node: nothing materialised yet.
    let _ = std::fs::remove_dir_all(h.path().join("snapshots/cache"));
    std::fs::create_dir_all(h.path().join("snapshots/cache")).unwrap();

    let r = h.run(&["invoke", "shell"]);
    assert_eq!(r.code(), 1, "{}", r.stdout());
    let err = r.stderr();
    assert!(err.contains(&victim) && err.contains(&snap), "{err}");
    assert!(err.contains("thaw deploy"), "{err}");
    let ls = h.run(&["--json", "templates", "ls"]).ok().json();
    let state = |n: &str| {
        ls.as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("shell"), "needs_rebuild");
    assert_eq!(state("other"), "ready");
    let r = h.run(&["invoke", "shell"]);
    assert!(r.stderr().contains("needs_rebuild"), "{}", r.stderr());
    h.run(&["invoke", "other"]).ok();
    // Redeploying repairs it.
    h.deploy("shell");
    h.run(&["invoke", "shell"]).ok();
    h.assert_clean();
}

/// An engine on the test's home (sharing the root filesystem cache) with the template in
/// `dir` published.
async fn deployed_engine(home: &Home, dir: &Path) -> thaw_platform::Engine {
    let paths = thaw_platform::Paths::new(
        home.path(),
        std::env::var("THAW_CACHE").unwrap_or_else(|_| "/var/cache/thaw".into()),
    );
    let engine = thaw_platform::Engine::open(paths).await.unwrap();
    engine
        .deploy(dir, &thaw_platform::progress::Quiet)
        .await
        .unwrap();
    engine
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_9_mid_invocation_and_mid_publish_is_cleaned_up_on_next_start() {
    let h = Home::new();
    h.deploy("shell");
    let mut child = h
        .cmd()
        .args(["exec", "shell", "--", "sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sandboxes = h.path().join("sandboxes");
    wait_for("a live sandbox", Duration::from_secs(20), || {
        sandbox_ids(&h)
            .iter()
            .any(|id| sandboxes.join(id).join("init.pid").exists())
    });
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !sandbox_ids(&h).is_empty(),
        "the crash left something to clean"
    );

    // A publish killed while its setup command runs.
    let tmp = tempfile::tempdir().unwrap();
    let slow = tmp.path().join("slow");
    write_template(
        &slow,
        &format!(
            "name = \"slow\"\nbase = {{ kind = \"busybox\" }}\nsetup = [\"echo {} > /marker; sleep 30\"]\n[handler]\ncommand = [\"cat\"]\n",
            std::process::id()
        ),
    );
    let mut child = h
        .cmd()
        .args(["deploy", slow.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    child.kill().unwrap();
    child.wait().unwrap();

    // Any next command sweeps.
    h.run(&["templates", "ls"]).ok();
    h.assert_clean();
    let cache = std::env::var("THAW_CACHE").unwrap_or_else(|_| "/var/cache/thaw".into());
    let leftovers: Vec<_> = std::fs::read_dir(Path::new(&cache).join("rootfs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join(".owner"))
                .map(|o| !o.is_empty())
                .unwrap_or(false)
                && !thaw_platform::cleanup::owner_alive(&e.path().join(".owner"))
        })
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "build scratch left behind: {leftovers:?}"
    );
    let _ = repo_root();
}

#[test]
fn fifty_clones_alive_together_are_isolated() {
    let home = Home::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = deployed_engine(&home, &repo_root().join("templates/shell")).await;
        let opts = thaw_platform::engine::RunOptions::default();
        let mut clones = Vec::new();
        for _ in 0..50 {
            clones.push(engine.spawn("shell", &opts).await.unwrap());
        }
        let mut seen = HashSet::new();
        for c in &clones {
            let script = format!(
                "echo {} > /tmp/owner; ls /tmp; cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
                c.id()
            );
            let (done, out, err) = c
                .exec_collect(vec!["sh".into(), "-c".into(), script], &opts)
                .await
                .unwrap();
            assert!(done.outcome.success(), "{}", String::from_utf8_lossy(&err));
            let out = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines[0], "owner", "a clone sees another's files: {out}");
            assert!(seen.insert(lines[1].to_string()), "duplicate uuid {}", lines[1]);
            assert!(seen.insert(lines[2].to_string()), "duplicate random bytes {}", lines[2]);
        }
        // Every clone still sees only its own file once all have written.
        for c in &clones {
            let (_, out, _) = c
                .exec_collect(vec!["cat".into(), "/tmp/owner".into()], &opts)
                .await
                .unwrap();
            assert_eq!(String::from_utf8(out).unwrap().trim(), c.id());
        }
        for c in clones {
            c.destroy().await;
        }
    });
    home.assert_clean();
}

/// Publishing onto a full disk fails with an error that says so, and the template's
/// previous snapshot keeps serving invocations. THAW_HOME is a small tmpfs here, so the
/// disk really fills.
#[test]
fn disk_full_during_publish_keeps_the_previous_snapshot() {
    let home = Home::new();
    let disk = home.path();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "thaw-e2e-full"])
        .arg(disk)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a tmpfs needs root");
    // Succeeds only if nothing (no sandbox mount, no process) still uses the home.
    let unmount = || {
        std::process::Command::new("umount")
            .arg(disk)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let r = std::panic::catch_unwind(|| {
        home.deploy("shell");
        let before = snapshot_name(&home, "shell");
        home.run(&["invoke", "shell", "--payload", "{}"]).ok();
        // Leave the home about 256 KiB: less than a checkpoint needs.
        let avail = nix::sys::statvfs::statvfs(disk).expect("statvfs");
        let free = avail.blocks_available() * avail.fragment_size();
        let filler = vec![0u8; (free.saturating_sub(256 << 10)) as usize];
        std::fs::write(disk.join("filler"), &filler).expect("fill the disk");
        let shell = repo_root().join("templates/shell");
        let r = home.run(&["deploy", shell.to_str().unwrap()]);
        assert_ne!(r.code(), 0, "a publish onto a full disk cannot succeed");
        let err = r.stderr();
        assert!(
            err.contains("No space left") || err.contains("disk full"),
            "the error must name the cause: {err}"
        );
        // The previous snapshot is still the template's, and it still serves.
        assert_eq!(snapshot_name(&home, "shell"), before);
        home.run(&["invoke", "shell", "--payload", "{}"]).ok();
        std::fs::remove_file(disk.join("filler")).unwrap();
        home.deploy("shell");
        home.run(&["invoke", "shell", "--payload", "{}"]).ok();
    });
    let unmounted = unmount();
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
    assert!(
        unmounted,
        "the home is still in use: something was left behind"
    );
    home.assert_clean();
}

/// A persistent handler that counts its invocations in a shell variable: its memory is the
/// state under test.
const COUNTER: &str = "name = \"counter\"\nbase = { kind = \"busybox\" }\n[handler]\nmode = \"persistent\"\ncommand = [\"/bin/sh\", \"-c\", \"n=0; echo '{\\\"ready\\\":true}'; while read l; do n=$((n+1)); echo \\\"{\\\\\\\"n\\\\\\\":$n}\\\"; done\"]\n";

/// Limits small enough to tell a sandbox confined by them from one under any default.
const COUNTER_LIMITS: &str = "[limits]\nmemory_mib = 96\nvcpus = 1\npids = 40\n";

/// Writes the counter template, with `limits` appended, under `tmp`; returns its directory.
fn counter_template(tmp: &Path, limits: &str) -> PathBuf {
    let dir = tmp.join("counter");
    write_template(&dir, &format!("{COUNTER}{limits}"));
    dir
}

/// The lines of `/proc/<pid>/maps` of every process in a sandbox's memory cgroup.
fn maps_of(sandbox: &str) -> Vec<String> {
    let pids = thaw_platform::container::cgroup_pids(sandbox);
    assert!(!pids.is_empty(), "sandbox {sandbox} has no processes");
    pids.iter()
        .flat_map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/maps"))
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A one-shot clone maps the snapshot's memory copy-on-write from the materialised page
/// images instead of copying it, and what it writes stays its own: every clone's handler
/// counts from the snapshot's state. A session's sandbox copies its memory instead, because
/// it is checkpointed again, and its handler keeps counting across calls.
#[test]
fn clones_map_the_snapshot_memory_copy_on_write_and_sessions_copy_it() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = counter_template(tmp.path(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = deployed_engine(&home, &dir).await;
        let opts = thaw_platform::engine::RunOptions::default();
        let cache = home.path().join("snapshots").join("cache");
        let cache = cache.to_str().unwrap();
        let mut clones = Vec::new();
        for _ in 0..3 {
            let live = engine.spawn("counter", &opts).await.unwrap();
            let done = live.invoke(serde_json::json!(null), &opts).await.unwrap();
            assert_eq!(done.result, Some(serde_json::json!({"n": 1})), "{done:?}");
            let mapped: Vec<String> = maps_of(live.id())
                .into_iter()
                .filter(|l| l.contains(cache) && l.contains("/criu/pages-"))
                .collect();
            assert!(
                !mapped.is_empty(),
                "a clone's memory is not mapped from the snapshot's page images"
            );
            clones.push(live);
        }
        // A second call in the same clone sees its own write.
        let done = clones[0]
            .invoke(serde_json::json!(null), &opts)
            .await
            .unwrap();
        assert_eq!(done.result, Some(serde_json::json!({"n": 2})), "{done:?}");
        for c in clones {
            c.destroy().await;
        }

        let s = engine
            .session_create("counter", thaw_platform::session::SessionOptions::default())
            .await
            .unwrap();
        assert!(
            !maps_of(s.sandbox.as_deref().expect("sandbox"))
                .iter()
                .any(|l| l.contains("/criu/pages-")),
            "a session's memory must be its own copy: it is checkpointed later"
        );
        for n in 1..=2 {
            let inv = engine
                .session_invoke(&s.id, serde_json::json!(null), opts.clone(), |_| {})
                .await
                .unwrap();
            assert_eq!(inv.done.result, Some(serde_json::json!({ "n": n })));
        }
        engine.session_pause(&s.id).await.unwrap();
        engine.session_delete(&s.id).await.unwrap();
    });
    home.assert_clean();
}

/// The limit files runc and thaw both write, v1 and v2, and the device list.
const CONFINEMENT: &[&str] = &[
    "memory.limit_in_bytes",
    "memory.memsw.limit_in_bytes",
    "memory.max",
    "memory.swap.max",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
    "cpu.max",
    "pids.max",
    "devices.list",
    "cpuset.cpus",
    "cpuset.mems",
];

/// `<hierarchy>/<file>: <value>` for every confinement file of a sandbox's cgroups.
fn confinement_of(sandbox: &str) -> Vec<String> {
    let mut out = Vec::new();
    for h in thaw_platform::container::cgroups::hierarchies() {
        let dir = h.dir(sandbox);
        assert!(dir.exists(), "{} missing", dir.display());
        for f in CONFINEMENT {
            if let Ok(v) = std::fs::read_to_string(dir.join(f)) {
                out.push(format!("{}/{f}: {}", h.mount.display(), v.trim()));
            }
        }
    }
    out
}

/// A clone that ends in a discard is restored by CRIU without runc, so thaw makes its
/// cgroups itself. It must be confined exactly as runc confines a session's sandbox of the
/// same template (memory without swap, CPU quota, pids, devices, cpuset), sit in its cgroup
/// in every hierarchy, and leave none behind.
#[test]
fn clones_restored_without_runc_are_confined_as_runc_confines_sessions() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = counter_template(tmp.path(), COUNTER_LIMITS);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = deployed_engine(&home, &dir).await;
        let opts = thaw_platform::engine::RunOptions::default();
        let clone = engine.spawn("counter", &opts).await.unwrap();
        let clone_id = clone.id().to_string();
        let session = engine
            .session_create("counter", thaw_platform::session::SessionOptions::default())
            .await
            .unwrap();

        let runc = std::process::Command::new("runc")
            .arg("--root")
            .arg(home.path().join("runc"))
            .args(["list", "--quiet"])
            .output()
            .unwrap();
        let known = String::from_utf8_lossy(&runc.stdout).to_string();
        assert!(
            known.contains(session.sandbox.as_deref().expect("sandbox")),
            "the session is runc's: {known}"
        );
        assert!(
            !known.contains(&clone_id),
            "the clone is not runc's: {known}"
        );

        let theirs = confinement_of(session.sandbox.as_deref().expect("sandbox"));
        let ours = confinement_of(&clone_id);
        assert!(
            theirs.iter().any(|l| l.contains("pids.max: 40")),
            "{theirs:?}"
        );
        assert_eq!(ours, theirs, "thaw's cgroup differs from runc's");

        for pid in thaw_platform::container::cgroup_pids(&clone_id) {
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            for line in cg.lines() {
                assert!(
                    line.ends_with(&format!("/thaw/{clone_id}")),
                    "process {pid} of the clone outside its cgroup: {line}"
                );
            }
        }
        let done = clone.invoke(serde_json::json!(null), &opts).await.unwrap();
        assert_eq!(done.result, Some(serde_json::json!({"n": 1})), "{done:?}");
        clone.destroy().await;
        assert_eq!(
            thaw_e2e::leaked_cgroups(std::slice::from_ref(&clone_id)),
            Vec::<String>::new()
        );
        engine.session_delete(&session.id).await.unwrap();
    });
    home.assert_clean();
}

/// Every node of a sandbox's `/dev` and `/sys/fs/cgroup` tmpfs mounts: name, type, mode,
/// owner, device number and symlink target (not times).
async fn device_tree(live: &thaw_platform::engine::Live) -> String {
    let opts = thaw_platform::engine::RunOptions::default();
    let script = "for f in /dev/* /sys/fs/cgroup/*; do stat -c '%N %F %a %u %g %t:%T' \"$f\"; done";
    let (done, out, err) = live
        .exec_collect(vec!["sh".into(), "-c".into(), script.into()], &opts)
        .await
        .unwrap();
    assert!(done.outcome.success(), "{}", String::from_utf8_lossy(&err));
    String::from_utf8(out).unwrap()
}

/// The restore recreates the snapshot's small tmpfs mounts (`/dev`, `/sys/fs/cgroup`) from a
/// list of their nodes instead of a tar (CRIU patch 0003): a clone must see exactly what a
/// cold-booted sandbox of the template sees, and its devices must work.
#[test]
fn a_clone_sees_the_same_dev_and_cgroup_nodes_as_a_cold_boot() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    // With the cgroup view, so that a v1 host's /sys/fs/cgroup tmpfs is restored too.
    let dir = counter_template(tmp.path(), "[limits]\ncgroup_view = true\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = deployed_engine(&home, &dir).await;
        let opts = thaw_platform::engine::RunOptions::default();
        let cold = engine.spawn_cold("counter", &opts).await.unwrap();
        let clone = engine.spawn("counter", &opts).await.unwrap();
        let (booted, restored) = (device_tree(&cold).await, device_tree(&clone).await);
        // In a user namespace runc binds the host's device nodes (it cannot mknod), so
        // they belong to host root, which the sandbox sees as nobody.
        assert!(
            booted.contains("/dev/null character special file 666 65534 65534 1:3"),
            "{booted}"
        );
        // One known difference, not the tmpfs list's: the mqueue filesystem's root is made
        // by whoever first mounts the IPC namespace's mqueue. runc does that as the
        // namespace's root (uid 0); CRIU's restore as host root, which the namespace sees as
        // nobody. It is mode 1777 either way, so every task can still use it.
        let mqueue_owner = |t: &str| {
            t.replace(
                "/dev/mqueue directory 1777 65534 65534",
                "/dev/mqueue directory 1777 0 65534",
            )
        };
        assert_eq!(
            mqueue_owner(&restored),
            booted,
            "a clone's /dev or /sys/fs/cgroup differs"
        );
        let script = "echo x > /dev/null && head -c 8 /dev/urandom | wc -c && ls /dev/pts";
        let (done, out, err) = clone
            .exec_collect(vec!["sh".into(), "-c".into(), script.into()], &opts)
            .await
            .unwrap();
        assert!(done.outcome.success(), "{}", String::from_utf8_lossy(&err));
        assert_eq!(String::from_utf8_lossy(&out), "8\nptmx\n");
        cold.destroy().await;
        clone.destroy().await;
    });
    home.assert_clean();
}

/// The guest-init this test run's thaw uses.
fn current_guest_init() -> PathBuf {
    std::env::var_os("THAW_GUEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| thaw_bin().with_file_name("thaw-guest-init"))
}

/// Upgrading thaw brings another guest-init binary. CRIU maps a restored PID 1's code back
/// from the file it came from and refuses one of another size, so templates and paused
/// sessions would stop restoring: a snapshot carries the guest-init its processes run.
#[test]
fn snapshots_outlive_a_guest_init_upgrade() {
    let mut h = Home::new();
    h.deploy("shell");
    let sid = h.run(&["--json", "session", "new", "shell"]).ok().json()["id"]
        .as_str()
        .expect("session id")
        .to_string();
    h.run(&[
        "session",
        "exec",
        &sid,
        "--",
        "sh",
        "-c",
        "echo kept > /tmp/f",
    ])
    .ok();
    h.run(&["session", "pause", &sid]).ok();

    // The upgrade: a guest-init of another size (a trailing byte keeps it runnable).
    let upgraded = h.path().join("guest-init-upgraded");
    let mut bytes = std::fs::read(current_guest_init()).expect("read guest-init");
    bytes.extend_from_slice(b"\0upgraded");
    std::fs::write(&upgraded, bytes).unwrap();
    std::fs::set_permissions(&upgraded, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.env.push((
        "THAW_GUEST_INIT".into(),
        upgraded.to_string_lossy().into_owned(),
    ));

    let v = h
        .run(&["--json", "invoke", "shell", "--payload", "2"])
        .ok()
        .json();
    assert_eq!(v["start"], "restore", "{v}");
    assert_eq!(v["result"]["payload"], 2, "{v}");
    // The paused session resumes, and pausing it again keeps the binary it runs.
    for _ in 0..2 {
        h.run(&["session", "resume", &sid]).ok();
        let out = h
            .run(&["session", "exec", &sid, "--", "cat", "/tmp/f"])
            .ok()
            .stdout();
        assert_eq!(out, "kept\n");
        h.run(&["session", "pause", &sid]).ok();
    }
    h.run(&["session", "rm", &sid]).ok();
    // Cold boots use the new binary.
    h.deploy("shell");
    h.run(&["invoke", "shell", "--payload", "3"]).ok();
    h.assert_clean();
}

/// The two sandboxes an engine keeping two prepared has made besides `live`, once both are
/// ready. A prepared sandbox's directory appears before its CRIU starts, so this waits
/// until each has its CRIU blocked reading its gate (thaw's CRIU patch `0006`).
fn two_prepared_besides(home: &Home, live: &str) -> HashSet<String> {
    let gate = std::process::Command::new("criu")
        .args(["--restore-gate-fd", "-1", "--version"])
        .output()
        .expect("criu on PATH");
    assert!(
        gate.status.success(),
        "the installed criu lacks thaw's restore-gate patch (scripts/criu-patches/0006): run `make deps`"
    );
    let others = || {
        let mut ids = sandbox_ids(home);
        ids.remove(live);
        ids
    };
    wait_for(
        "two prepared sandboxes, each with a CRIU blocked reading its gate",
        Duration::from_secs(20),
        || {
            let ids = others();
            ids.len() == 2 && ids.iter().all(|id| criu_waits_at_gate(id))
        },
    );
    others()
}

/// Whether a process in the sandbox's cgroups is a CRIU blocked in `read` on the descriptor
/// its command line names as its restore gate (`/proc/<pid>/syscall`: the number, then the
/// arguments; `read` is 0 on x86-64).
fn criu_waits_at_gate(sandbox: &str) -> bool {
    thaw_platform::container::cgroup_pids(sandbox)
        .into_iter()
        .any(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let Some(fd) = args
                .iter()
                .position(|a| *a == b"--restore-gate-fd")
                .and_then(|i| args.get(i + 1))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
            else {
                return false;
            };
            let syscall =
                std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            let mut words = syscall.split_whitespace();
            words.next() == Some("0") && words.next() == Some(format!("0x{fd:x}").as_str())
        })
}

fn sandbox_ids(home: &Home) -> HashSet<String> {
    std::fs::read_dir(home.path().join("sandboxes"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A long-lived engine keeps sandboxes prepared ahead of their restore (directory, disk,
/// overlay root, cgroups): the next clone is restored into one and named after it, is
/// confined and fresh like any clone, and closing the engine leaves nothing behind.
#[test]
fn clones_restore_into_sandboxes_prepared_ahead() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = counter_template(tmp.path(), COUNTER_LIMITS);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut all = Vec::new();
    rt.block_on(async {
        let engine = deployed_engine(&home, &dir).await;
        engine.keep_prepared(2);
        let opts = thaw_platform::engine::RunOptions::default();
        let first = engine.spawn("counter", &opts).await.unwrap();
        let first_id = first.id().to_string();
        // The first restore found none prepared, and asked for two.
        let prepared = two_prepared_besides(&home, &first_id);
        let second = engine.spawn("counter", &opts).await.unwrap();
        let second_id = second.id().to_string();
        assert!(
            prepared.contains(&second_id),
            "{second_id} is not one of the prepared {prepared:?}"
        );
        assert_eq!(confinement_of(&second_id), confinement_of(&first_id));
        for clone in [&first, &second] {
            let done = clone.invoke(serde_json::json!(null), &opts).await.unwrap();
            assert_eq!(done.result, Some(serde_json::json!({"n": 1})), "{done:?}");
        }
        let (done, out, _) = second
            .exec_collect(vec!["hostname".into()], &opts)
            .await
            .unwrap();
        assert_eq!(done.outcome.exit_code(), 0);
        assert_eq!(String::from_utf8_lossy(&out).trim(), second_id);
        all.extend(sandbox_ids(&home));
        first.destroy().await;
        second.destroy().await;
        engine.close().await;
    });
    assert_eq!(thaw_e2e::leaked_cgroups(&all), Vec::<String>::new());
    home.assert_clean();
}

/// With thaw's CRIU (patch `0006`), a prepared sandbox's CRIU is already running, inside the
/// sandbox's cgroups, waiting at its gate with nothing restored. A prepared sandbox whose
/// CRIU was killed while it waited is torn down, never handed to a caller, and closing the
/// engine sends the waiting ones away and leaves nothing behind.
#[test]
fn prepared_sandboxes_hold_a_criu_waiting_at_its_gate() {
    let home = Home::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = counter_template(tmp.path(), COUNTER_LIMITS);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut all = Vec::new();
    rt.block_on(async {
        let engine = deployed_engine(&home, &dir).await;
        engine.keep_prepared(2);
        let opts = thaw_platform::engine::RunOptions::default();
        let first = engine.spawn("counter", &opts).await.unwrap();
        let first_id = first.id().to_string();
        let prepared = two_prepared_besides(&home, &first_id);
        for id in &prepared {
            for pid in thaw_platform::container::cgroup_pids(id) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                assert_eq!(comm.trim(), "criu", "{id}: process {pid} is not its CRIU");
            }
            assert!(
                !home
                    .path()
                    .join("sandboxes")
                    .join(id)
                    .join("init.pid")
                    .exists(),
                "{id}: restored before anyone asked"
            );
        }
        // Kill every waiting CRIU: the next clone must not be restored into their sandboxes.
        for id in &prepared {
            for pid in thaw_platform::container::cgroup_pids(id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        wait_for(
            "the killed CRIUs to be gone",
            Duration::from_secs(10),
            || {
                prepared
                    .iter()
                    .all(|id| thaw_platform::container::cgroup_pids(id).is_empty())
            },
        );
        let next = engine.spawn("counter", &opts).await.unwrap();
        let next_id = next.id().to_string();
        assert!(
            !prepared.contains(&next_id),
            "{next_id} is a sandbox whose CRIU was killed"
        );
        let done = next.invoke(serde_json::json!(null), &opts).await.unwrap();
        assert_eq!(done.result, Some(serde_json::json!({"n": 1})), "{done:?}");
        wait_for(
            "the sandboxes of the killed CRIUs torn down",
            Duration::from_secs(20),
            || {
                let now = sandbox_ids(&home);
                prepared.iter().all(|id| !now.contains(id))
            },
        );
        all.extend(prepared.iter().cloned());
        all.extend(sandbox_ids(&home));
        first.destroy().await;
        next.destroy().await;
        engine.close().await;
    });
    assert_eq!(thaw_e2e::leaked_cgroups(&all), Vec::<String>::new());
    home.assert_clean();
}
