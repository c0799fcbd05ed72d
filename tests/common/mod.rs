//! Helpers for end-to-end tests: each test gets its own `THAW_HOME` (metadata, snapshots,
//! sandboxes) and shares `THAW_CACHE` (root filesystems are pure functions of their inputs,
//! and the Debian one takes a minute to build). After each test, [`Home::assert_clean`]
//! checks that no sandbox process, mount, cgroup or directory is left behind.

pub mod inproc;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The thaw binary of the same profile as this test (target/<profile>/thaw).
pub fn thaw_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("thaw");
    assert!(
        bin.exists(),
        "{} missing: run `make build-debug` (or `make test`) first",
        bin.display()
    );
    bin
}

pub struct Home {
    pub dir: tempfile::TempDir,
    /// Extra environment of every thaw command run in this home.
    pub env: Vec<(String, String)>,
    /// Sandbox and session ids seen in the output of this home's commands (see
    /// [`Home::note_ids`]): [`Home::assert_clean`] checks that none keeps a cgroup.
    ids: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

pub struct Run {
    pub out: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).to_string()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).to_string()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout(),
                self.stderr()
            )
        })
    }
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code(),
            0,
            "thaw failed\nstdout: {}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::Builder::new()
            .prefix("thaw-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Home {
            dir,
            env: Vec::new(),
            ids: Default::default(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(thaw_bin());
        c.env("THAW_HOME", self.path());
        c.env_remove("THAW_SERVER");
        c.env_remove("THAW_TIER");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_stdin(args, None)
    }

    pub fn run_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Run {
        let mut c = self.cmd();
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn thaw");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut s = child.stdin.take().expect("stdin");
            // thaw may refuse an oversized input before reading all of it: a broken pipe
            // here is the behaviour under test, not a failure.
            match s.write_all(input) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => panic!("write stdin: {e}"),
            }
        }
        let out = child.wait_with_output().expect("wait thaw");
        self.note_ids(&String::from_utf8_lossy(&out.stdout));
        self.note_ids(&String::from_utf8_lossy(&out.stderr));
        Run { out }
    }

    /// Records the sandbox (`sb-<16 hex>`) and session (`ses-<hex>`) ids in `text`, so that
    /// [`Home::assert_clean`] can check their cgroups once their directories are gone.
    pub fn note_ids(&self, text: &str) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        for prefix in ["sb-", "ses-"] {
            for (at, _) in text.match_indices(prefix) {
                if at > 0 && text.as_bytes()[at - 1].is_ascii_alphanumeric() {
                    continue;
                }
                let rest = &text[at + prefix.len()..];
                let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                if hex.len() >= 8 {
                    ids.insert(format!("{prefix}{hex}"));
                }
            }
        }
    }

    pub fn deploy(&self, template: &str) -> serde_json::Value {
        let dir = repo_root().join("templates").join(template);
        self.run(&["--json", "deploy", dir.to_str().expect("utf-8 path")])
            .ok()
            .json()
    }

    /// Nothing of this home's sandboxes may survive: no process, cgroup, container, mount or
    /// directory. Every leftover is listed in one failure.
    #[track_caller]
    pub fn assert_clean(&self) {
        let problems = self.leftovers();
        assert!(problems.is_empty(), "{}", problems.join("; "));
    }

    /// What [`Home::assert_clean`] finds left behind, one line per kind.
    pub fn leftovers(&self) -> Vec<String> {
        let home = self.path();
        let mut problems = Vec::new();
        let sandboxes: Vec<String> = std::fs::read_dir(home.join("sandboxes"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        // Processes of this home's sandboxes: in a thaw cgroup with a root overlay in this
        // home (`/proc/<pid>/root` reads `/` across mount namespaces, so it tells nothing).
        let mut stray = sandbox_procs(home, "");
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // A microvm's VMM runs in the host's root with its sockets in the home.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("--api-socket") && cmdline.contains(&*home.to_string_lossy()) {
                stray.push(pid);
            }
        }
        if !stray.is_empty() {
            problems.push(format!("sandbox processes left behind: {stray:?}"));
        }
        // Cgroups of this home's sandboxes: those whose directory is still there and those
        // whose ids its commands printed.
        let mut ids: Vec<String> = self
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        ids.extend(sandboxes.iter().cloned());
        let cgroups = leaked_cgroups(&ids);
        if !cgroups.is_empty() {
            problems.push(format!("sandbox cgroups left behind: {cgroups:?}"));
        }
        let runc_root = home.join("runc");
        if runc_root.exists() {
            let out = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["list", "--quiet"])
                .output()
                .expect("runc list");
            let list = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !list.is_empty() {
                problems.push(format!("containers left behind: {list}"));
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(home.to_str().unwrap_or("?")))
            .collect();
        if !mounts.is_empty() {
            problems.push(format!("mounts left behind: {mounts:?}"));
        }
        if !sandboxes.is_empty() {
            problems.push(format!("sandbox dirs left behind: {sandboxes:?}"));
        }
        problems
    }
}

impl Default for Home {
    fn default() -> Self {
        Self::new()
    }
}

/// Cgroups named after sandboxes of this test that still exist, in any hierarchy
/// (`/sys/fs/cgroup/thaw/<id>` on v2, `/sys/fs/cgroup/<hierarchy>/thaw/<id>` on v1).
pub fn leaked_cgroups(ids: &[String]) -> Vec<String> {
    let root = Path::new("/sys/fs/cgroup");
    let mut roots = vec![root.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(root) {
        roots.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut out = Vec::new();
    for id in ids {
        for r in &roots {
            let p = r.join("thaw").join(id);
            if p.exists() {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

/// Processes of this home's sandboxes whose command line contains `needle` (`""`: all). A
/// sandbox's process is in a thaw cgroup, and its root is an overlay whose upper directory is
/// in this home; `/proc/<pid>/root` reads `/` across mount namespaces, so it cannot tell.
pub fn sandbox_procs(home: &Path, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if !cgroup.contains("/thaw/") {
            continue;
        }
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        let upper = format!("upperdir={}/", home.display());
        let in_home = mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/") && l.contains(&upper));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if in_home && cmdline.contains(needle) {
            out.push(pid);
        }
    }
    out
}
