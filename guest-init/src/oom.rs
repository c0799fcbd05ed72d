//! OOM-kill detection: the kernel counts OOM kills per cgroup (cgroup v2 `memory.events`)
//! and system-wide (`/proc/vmstat`). A task that died by SIGKILL while the counter rose was
//! (almost certainly) killed by the OOM killer rather than by anyone else.

use std::fs;

/// Reads the current OOM-kill counter, preferring the sandbox's own cgroup.
pub fn oom_kills() -> Option<u64> {
    ["/sys/fs/cgroup/memory.events", "/proc/vmstat"]
        .iter()
        .find_map(|path| {
            fs::read_to_string(path)
                .ok()
                .and_then(|s| parse_counter(&s))
        })
}

fn parse_counter(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_ascii_whitespace();
        match (it.next(), it.next()) {
            (Some("oom_kill"), Some(n)) => n.parse().ok(),
            _ => None,
        }
    })
}

/// Whether the counter rose between `before` and now.
pub fn rose_since(before: Option<u64>) -> bool {
    match (before, oom_kills()) {
        (Some(b), Some(a)) => a > b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_formats() {
        assert_eq!(parse_counter("low 0\noom 2\noom_kill 3\n"), Some(3));
        assert_eq!(parse_counter("pgfault 5\noom_kill 0\n"), Some(0));
        assert_eq!(parse_counter("oom_killx 1\n"), None);
    }
}
