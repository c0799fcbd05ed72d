//! Process-tree walking through /proc, used to kill everything a task started.
//!
//! A task's processes can leave its process group (`setsid`) and its parent can die, but as
//! long as an ancestor is a child subreaper every orphan is reparented inside the tree, so
//! "every process whose parent chain reaches `root`" is exactly the task's tree.

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

/// One process as seen in /proc/<pid>/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcInfo {
    ppid: i32,
    /// Zombies and dead entries are already gone; killing them is pointless and they only
    /// disappear when their parent reaps them.
    dead: bool,
}

/// Parses the fields we need from a /proc/<pid>/stat line. The command name is in
/// parentheses and may itself contain spaces and parentheses, so split after the last ')'.
fn parse_stat(stat: &str) -> Option<ProcInfo> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcInfo {
        ppid,
        dead: matches!(state, "Z" | "X" | "x"),
    })
}

fn snapshot() -> HashMap<i32, ProcInfo> {
    let mut map = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // The process may exit between readdir and this read: skipping it is correct.
        if let Some(info) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            map.insert(pid, info);
        }
    }
    map
}

/// Live (non-zombie) processes whose parent chain reaches `root` (root itself excluded).
pub fn live_descendants(root: i32) -> Vec<i32> {
    descendants_in(&snapshot(), root)
}

fn descendants_in(map: &HashMap<i32, ProcInfo>, root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for (&pid, info) in map {
        if info.dead || pid == root {
            continue;
        }
        // Walk up; the depth bound protects against a cycle in a torn /proc snapshot.
        let mut cur = info.ppid;
        for _ in 0..map.len() + 1 {
            if cur == root {
                out.push(pid);
                break;
            }
            match map.get(&cur) {
                Some(parent) if cur > 1 => cur = parent.ppid,
                _ => break,
            }
        }
    }
    out.sort_unstable();
    out
}

/// SIGKILLs every live descendant of `root` until none is left or `limit` passes.
///
/// Loops because a process may fork between our scan and our kill; killed processes cannot
/// fork any more, so even a fork bomb converges within a few rounds. `reap` runs after each
/// round so the caller (the subreaper) can collect zombies. Returns whether the tree is empty.
pub fn kill_tree(root: i32, limit: Duration, mut reap: impl FnMut()) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        reap();
        let alive = live_descendants(root);
        if alive.is_empty() {
            return true;
        }
        for pid in alive {
            // SAFETY: kill(2) with a plain pid and signal has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let info = parse_stat("42 (a) b (c)) S 7 42 42 0 -1").unwrap();
        assert_eq!(info.ppid, 7);
        assert!(!info.dead);
        assert!(parse_stat("42 (x) Z 1 0").unwrap().dead);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn descendants_follow_parent_chains() {
        let p = |ppid, dead| ProcInfo { ppid, dead };
        let map: HashMap<i32, ProcInfo> = [
            (10, p(1, false)),
            (11, p(10, false)),
            (12, p(11, false)),
            (13, p(11, true)),
            (20, p(1, false)),
        ]
        .into_iter()
        .collect();
        assert_eq!(descendants_in(&map, 10), vec![11, 12]);
        assert!(descendants_in(&map, 20).is_empty());
    }

    #[test]
    fn finds_real_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        assert!(live_descendants(me).contains(&(child.id() as i32)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
