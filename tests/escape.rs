//! The sandbox boundary, attacked for real: the real `thaw` binary (and `thaw serve` for
//! attacks between tenants), real runc and CRIU, real sessions. Each test tries an attack
//! from SECURITY.md's threat model and asserts how it fails: the errno, the refusal, the
//! victim unchanged. Local-user attacks run as the unprivileged host user `nobody`
//! (`su nobody`), against this test's own home only. No test sends traffic anywhere but
//! loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thaw_e2e::{repo_root, sandbox_procs, Home, Run};

/// Host uids of sandbox ranges start here (platform::container::userns).
const FIRST_RANGE: u64 = 1 << 30;

/// A `thaw serve` child on 127.0.0.1:<free port>, killed (and settled) on drop.
struct Serve {
    addr: String,
    child: Child,
}

impl Serve {
    fn start(home: &Home) -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let addr = format!("127.0.0.1:{port}");
        let child = home
            .cmd()
            .args(["serve", "--listen", &addr])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn thaw serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "thaw serve never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Serve { addr, child }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// One API tenant: a key of its own, every command through the server.
struct Tenant<'a> {
    home: &'a Home,
    server: String,
    secret: String,
}

impl Tenant<'_> {
    fn new<'a>(home: &'a Home, serve: &Serve, name: &str) -> Tenant<'a> {
        let created = home
            .run(&["--json", "keys", "create", "--name", name])
            .ok()
            .json();
        Tenant {
            home,
            server: format!("http://{}", serve.addr),
            secret: created["secret"].as_str().expect("secret").to_string(),
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = self
            .home
            .cmd()
            .env("THAW_SERVER", &self.server)
            .env("THAW_API_KEY", &self.secret)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn thaw");
        let run = Run { out };
        self.home.note_ids(&run.stdout());
        run
    }

    fn sh(&self, session: &str, script: &str) -> Run {
        self.run(&["session", "exec", session, "--", "sh", "-c", script])
    }

    fn new_session(&self) -> String {
        self.run(&["session", "new", "shell"])
            .ok()
            .stdout()
            .trim()
            .to_string()
    }
}

/// Host uid of sandbox root, from inside: the outside id of inside uid 0.
fn root_outside(uid_map: &str) -> u64 {
    let fields: Vec<u64> = uid_map
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(fields.len(), 3, "one mapping line: {uid_map:?}");
    assert_eq!(fields[0], 0, "{uid_map:?}");
    assert_eq!(fields[2], 65536, "{uid_map:?}");
    fields[1]
}

/// Runs `script` as the unprivileged host user `nobody`.
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("su")
        .args(["nobody", "-s", "/bin/sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("su (util-linux) is installed")
}

/// A new session of the `shell` template, through the embedded engine.
fn local_session(home: &Home) -> String {
    home.run(&["session", "new", "shell"])
        .ok()
        .stdout()
        .trim()
        .to_string()
}

/// The sandbox that runs a session now (each restore makes a new one), from its record.
fn session_sandbox(show: Run) -> String {
    let s = show.ok().json();
    s["sandbox"]
        .as_str()
        .unwrap_or_else(|| panic!("a running session names its sandbox: {s}"))
        .to_string()
}

fn sandbox_dir(home: &Home, session: &str) -> PathBuf {
    let sb = session_sandbox(home.run(&["--json", "session", "show", session]));
    home.path().join("sandboxes").join(sb)
}

/// Attack 1 of the issue: a sandbox replaces its end of the host's channel with a symlink
/// to another tenant's guest-init, then asks for exec, file get and file put. With guest-init
/// on an abstract socket in the sandbox's own network namespace there is no file to
/// replace: every call still lands in the attacker's own sandbox, and the victim's secret
/// is neither read nor changed. The attacker then deletes and moves what guest-init keeps in
/// its `/run/thaw` and `/.thaw`, and its session still pauses and resumes with its files.
#[test]
fn a_sandbox_cannot_hijack_another_tenants_guest_init_nor_break_its_own_session() {
    let home = Home::new();
    let serve = Serve::start(&home);
    let victim = Tenant::new(&home, &serve, "victim");
    let attacker = Tenant::new(&home, &serve, "attacker");
    let shell = repo_root().join("templates/shell");
    for t in [&victim, &attacker] {
        t.run(&["deploy", shell.to_str().unwrap()]).ok();
    }
    let v = victim.new_session();
    let a = attacker.new_session();
    victim
        .sh(
            &v,
            "echo victim-secret > /tmp/secret && chmod 600 /tmp/secret",
        )
        .ok();

    // Two tenants, two uid ranges; neither is host root.
    let v_root = root_outside(&victim.sh(&v, "cat /proc/self/uid_map").ok().stdout());
    let a_root = root_outside(&attacker.sh(&a, "cat /proc/self/uid_map").ok().stdout());
    assert!(v_root >= FIRST_RANGE && a_root >= FIRST_RANGE);
    assert_ne!(v_root, a_root, "two tenants share a uid range");

    // The old attack: point the host's socket path at the victim's guest-init.
    let v_sandbox = session_sandbox(victim.run(&["--json", "session", "show", &v]));
    let victim_init: Vec<u32> = sandbox_procs(home.path(), "")
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&format!("/thaw/{v_sandbox}")))
        })
        .collect();
    assert!(
        !victim_init.is_empty(),
        "the victim's processes are running"
    );
    let mut plant = String::from("rm -rf /run/thaw && mkdir -p /run/thaw && ");
    for pid in &victim_init {
        plant.push_str(&format!(
            "ln -sf /proc/{pid}/root/run/thaw/agent.sock /run/thaw/agent-{pid}.sock; "
        ));
    }
    plant.push_str(&format!(
        "ln -sf /proc/{}/root/run/thaw/agent.sock /run/thaw/agent.sock; true",
        victim_init[0]
    ));
    attacker.sh(&a, &plant).ok();
    // Nothing on the host follows it: the attacker reads its own (empty) /tmp, under its
    // own hostname.
    let read = attacker.sh(&a, "hostname; cat /tmp/secret");
    assert_ne!(
        read.code(),
        0,
        "the attacker read a /tmp/secret: {}",
        read.stdout()
    );
    assert!(read.stdout().contains(&a), "{}", read.stdout());
    assert!(!read.stdout().contains("victim-secret"));
    let got = attacker.run(&["session", "get", &a, "/tmp/secret"]);
    assert_ne!(got.code(), 0);
    assert!(!got.stdout().contains("victim-secret"));
    let planted = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(planted.path(), "planted").unwrap();
    attacker
        .run(&[
            "session",
            "put",
            &a,
            planted.path().to_str().unwrap(),
            "/tmp/secret",
        ])
        .ok();
    // The victim's file is as it was, and nothing was planted beside it.
    let after = victim.sh(&v, "cat /tmp/secret; ls /tmp").ok().stdout();
    assert_eq!(after.trim(), "victim-secret\nsecret", "{after}");
    // A tenant cannot even name the other's session.
    let cross = attacker.run(&["session", "exec", &v, "--", "true"]);
    assert_ne!(cross.code(), 0);

    // Attack 6 of the issue: break everything guest-init keeps in the sandbox, then pause
    // and resume. The session comes back with its files.
    attacker
        .sh(
            &a,
            "echo kept > /tmp/mine; rm -rf /run/thaw; mv /.thaw /.moved; \
             ln -s /nonexistent /.thaw; true",
        )
        .ok();
    attacker.run(&["session", "pause", &a]).ok();
    attacker.run(&["session", "resume", &a]).ok();
    let back = attacker.sh(&a, "cat /tmp/mine; hostname").ok().stdout();
    assert!(back.starts_with("kept\n"), "{back}");
    for t in [(&victim, &v), (&attacker, &a)] {
        t.0.run(&["session", "rm", t.1]).ok();
    }
    drop(serve);
    home.assert_clean();
}

/// Attack 2 of the issue: a sandbox makes a setuid-root shell, and a local user runs it.
/// Sandbox root is a range uid on the host, so the file is owned by that uid, not root;
/// the sandbox's directory admits no other user; and even with that directory opened up
/// (an operator's mistake, simulated), the mount it sits on is nosuid.
#[test]
fn a_setuid_file_made_in_a_sandbox_gives_a_local_user_nothing() {
    let home = Home::new();
    home.deploy("shell");
    let id = local_session(&home);
    let sh = |script: &str| home.run(&["session", "exec", &id, "--", "sh", "-c", script]);
    sh("cp /bin/busybox /tmp/busybox-suid && chmod 4755 /tmp/busybox-suid").ok();
    let root = root_outside(&sh("cat /proc/self/uid_map").ok().stdout());
    assert!(root >= FIRST_RANGE, "sandbox root is host uid {root}");

    let dir = sandbox_dir(&home, &id);
    let upper_file = dir.join("disk/upper/tmp/busybox-suid");
    let rootfs_file = dir.join("rootfs/tmp/busybox-suid");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&upper_file).expect("the file in the upper dir");
    assert_eq!(
        u64::from(meta.uid()),
        root,
        "a file the sandbox made is owned by host uid {}",
        meta.uid()
    );
    assert_eq!(meta.mode() & 0o4000, 0o4000, "the sandbox did set the bit");

    // The local user cannot reach it at all.
    for f in [&upper_file, &rootfs_file] {
        let out = as_nobody(&format!("{} sh -c 'id -u'", f.display()));
        assert_ne!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{err}");
    }
    // Host-side mounts of sandbox content are nosuid,nodev.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut seen = 0;
    for l in info.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() > 5 && Path::new(f[4]).starts_with(&dir) {
            seen += 1;
            assert!(
                f[5].contains("nosuid") && f[5].contains("nodev"),
                "{} is mounted {}",
                f[4],
                f[5]
            );
        }
    }
    assert!(seen >= 2, "the disk and rootfs mounts were checked");

    // An operator opens the sandbox directory to everyone: the setuid bit still buys
    // nothing (nosuid), and the shell runs as nobody.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = as_nobody(&format!(
        "{} sh -c 'id -u; id -u -r'",
        rootfs_file.display()
    ));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o710)).unwrap();
    let ids = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{ids}");
    assert_eq!(
        ids.trim(),
        "65534\n65534",
        "euid and uid of the planted shell"
    );
    home.run(&["session", "rm", &id]).ok();
    home.assert_clean();
}

/// A local user lists or reads nothing of thaw's state: metadata (API key hashes), the
/// snapshot store (tenants' memory), the rootfs cache, live sandboxes.
#[test]
fn a_local_user_reads_nothing_of_thaws_state() {
    let home = Home::new();
    let cache = tempfile::Builder::new()
        .prefix("thaw-e2e-cache-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut home = home;
    home.env
        .push(("THAW_CACHE".into(), cache.path().display().to_string()));
    home.deploy("shell");
    let id = local_session(&home);
    let sb = session_sandbox(home.run(&["--json", "session", "show", &id]));
    let h = home.path().display().to_string();
    let c = cache.path().display().to_string();
    for path in [
        format!("{h}/snapshots"),
        format!("{h}/meta.sled"),
        format!("{h}/runc"),
        format!("{h}/checkpoints"),
        format!("{h}/sandboxes/{sb}"),
        format!("{h}/sandboxes/{sb}/rootfs"),
        c.clone(),
        format!("{c}/rootfs"),
    ] {
        let out = as_nobody(&format!("ls {path}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "nobody listed {path}");
        assert!(err.contains("Permission denied"), "{path}: {err}");
    }
    // Home and sandboxes/ let others through (a sandbox's root must reach its rootfs) but
    // not list them.
    for path in [h.clone(), format!("{h}/sandboxes")] {
        let out = as_nobody(&format!("ls {path}"));
        assert_ne!(out.status.code(), Some(0), "nobody listed {path}");
    }
    let out = as_nobody(&format!("cat {h}/meta.sled/db"));
    assert_ne!(out.status.code(), Some(0));
    home.run(&["session", "rm", &id]).ok();
    home.assert_clean();
}

/// Attack 4 of the issue, the disk half: `/run/thaw` was a bind of the host's disk, outside
/// `disk_mib`. Now every writable path of the sandbox is on its size-capped tmpfs: writing
/// twice the limit anywhere fails with ENOSPC, and the host's disk does not grow.
#[test]
fn no_writable_path_in_a_sandbox_is_backed_by_the_hosts_disk() {
    let home = Home::new();
    // Memory well above the disk, so the disk limit is what a write meets.
    let disk_mib = 16;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_root().join("templates/shell/handler.sh"),
        dir.path().join("handler.sh"),
    )
    .unwrap();
    let toml = std::fs::read_to_string(repo_root().join("templates/shell/template.toml"))
        .unwrap()
        .replace("memory_mib = 160", "memory_mib = 256")
        .replace("disk_mib = 64", &format!("disk_mib = {disk_mib}"));
    std::fs::write(dir.path().join("template.toml"), toml).unwrap();
    home.run(&["deploy", dir.path().to_str().unwrap()]).ok();
    for dir in ["/run/thaw", "/tmp", "/root", "/.thaw"] {
        let out = home.run(&[
            "exec",
            "shell",
            "--",
            "sh",
            "-c",
            &format!(
                "mkdir -p {dir} 2>/dev/null; dd if=/dev/zero of={dir}/fill bs=1M count={} 2>&1; \
                 echo rc=$?",
                disk_mib * 2
            ),
        ]);
        let text = out.stdout();
        assert!(
            text.contains("No space left on device") || text.contains("Read-only"),
            "{dir}: {text}"
        );
        assert!(!text.contains("rc=0"), "{dir}: {text}");
    }
    home.assert_clean();
}

/// Strips the uid range from every record in `home`'s store, as a thaw from before user
/// namespaces wrote them (the field did not exist; serde reads it as absent).
fn forget_ranges(home: &Home) {
    use thaw_platform::store::{Meta, Store};
    let meta = Meta::new(home.path().join("meta.sled"));
    meta.with(|s| {
        for tree in [Store::templates_tree(), Store::sessions_tree()] {
            let keys: Vec<String> = s
                .list::<serde_json::Value>(tree)?
                .iter()
                .filter_map(|v| {
                    v["name"]
                        .as_str()
                        .map(|n| format!("local/{n}"))
                        .or_else(|| v["session"]["id"].as_str().map(String::from))
                })
                .collect();
            for k in keys {
                s.update::<serde_json::Value>(tree, &k, |v| {
                    Ok(v.map(|mut v| {
                        if let Some(o) = v.as_object_mut() {
                            o.remove("ids");
                        }
                        v
                    }))
                })?;
            }
        }
        Ok(())
    })
    .expect("rewriting the store");
}

/// A template or session stored by a thaw from before user namespaces would restore with
/// sandbox root as host root. It is not restored: the template becomes `needs_rebuild` with
/// the reason and the command that fixes it, the session refuses to resume naming its
/// removal, and a redeploy brings the template back. Nothing else stored is lost.
#[test]
fn records_from_before_user_namespaces_are_not_restored_but_rebuilt() {
    let home = Home::new();
    home.deploy("shell");
    let id = local_session(&home);
    home.run(&["session", "pause", &id]).ok();
    forget_ranges(&home);

    let inv = home.run(&["invoke", "shell", "--payload", "{}"]);
    assert_eq!(inv.code(), 1, "{}", inv.stdout());
    let err = inv.stderr();
    assert!(
        err.contains("needs_rebuild") && err.contains("user") && err.contains("thaw deploy"),
        "{err}"
    );
    let ls = home.run(&["--json", "templates", "ls"]).ok().stdout();
    assert!(ls.contains("needs_rebuild"), "{ls}");
    let resume = home.run(&["session", "resume", &id]);
    assert_ne!(resume.code(), 0);
    assert!(
        resume.stderr().contains("thaw session rm"),
        "{}",
        resume.stderr()
    );
    // The session is still there to remove; the template publishes again and serves.
    home.run(&["session", "rm", &id]).ok();
    home.deploy("shell");
    home.run(&["invoke", "shell", "--payload", "{}"]).ok();
    home.assert_clean();
}
