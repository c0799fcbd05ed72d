//! Finding the guest's processes through the host's /proc: a process belongs to the guest
//! when its PID namespace (`/proc/<pid>/ns/pid`) is the guest's.

use std::fs;

/// The PID namespace of `pid` (`pid:[4026532...]`), `None` once it is gone.
pub fn pid_ns(pid: i32) -> Option<String> {
    read_ns(&format!("/proc/{pid}/ns/pid"))
}

pub fn own_pid_ns() -> Option<String> {
    read_ns("/proc/self/ns/pid")
}

fn read_ns(link: &str) -> Option<String> {
    fs::read_link(link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// Every process whose PID namespace is `ns`.
pub fn pids_in_ns(ns: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| pid_ns(p).as_deref() == Some(ns))
        .collect()
}

/// State letter and parent pid from `/proc/<pid>/stat`.
pub fn stat(pid: i32) -> Option<(char, i32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The command name is in parentheses and may itself contain spaces or parentheses: fields
/// are counted from the last `)`.
fn parse_stat(text: &str) -> Option<(char, i32)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Children of `parent` (by parent pid).
pub fn children(parent: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat(p).map(|(_, ppid)| ppid) == Some(parent))
        .collect()
}

/// Stopped (`T`, `t`) or no longer able to run (zombie, dead, gone).
pub fn is_stopped_or_gone(pid: i32) -> bool {
    match stat(pid) {
        Some((state, _)) => matches!(state, 'T' | 't' | 'Z' | 'X'),
        None => true,
    }
}

/// Exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "42 (a) b (c)) S 7 42 42 0 -1 4194560";
        assert_eq!(parse_stat(line), Some(('S', 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn finds_itself() {
        let me = std::process::id() as i32;
        let ns = own_pid_ns().unwrap();
        assert!(pids_in_ns(&ns).contains(&me));
        assert!(stat(me).is_some());
    }
}
