//! `thaw ps` and `thaw kill`: what live sandboxes use, and ending them.

use anyhow::Result;
use thaw_platform::live::{KillReport, LiveSandbox};

use crate::output::print_json;

const MIB: f64 = (1 << 20) as f64;

/// A figure, or `-` when the host cannot read it.
fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".to_string())
}

fn mib(v: Option<u64>) -> String {
    opt(v, |b| format!("{:.1}", b as f64 / MIB))
}

fn age(started_at: Option<u64>, now: u64) -> String {
    opt(started_at, |t| {
        let s = now.saturating_sub(t);
        match s {
            0..=119 => format!("{s}s"),
            120..=7199 => format!("{}m", s / 60),
            _ => format!("{}h", s / 3600),
        }
    })
}

/// The running task, cut to fit a terminal line.
fn task(s: &LiveSandbox) -> String {
    let Some(t) = s.tasks.first() else {
        return "-".to_string();
    };
    let mut line = format!("{} {}", t.kind, t.argv.join(" "));
    if s.tasks.len() > 1 {
        line.push_str(&format!(" (+{})", s.tasks.len() - 1));
    }
    if line.chars().count() > 48 {
        line = line.chars().take(45).collect::<String>() + "...";
    }
    line
}

pub fn print_ps(list: &[LiveSandbox], json: bool) -> Result<()> {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no live sandboxes");
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!(
        "{:<20} {:<12} {:<21} {:<12} {:<9} {:>7} {:>8} {:>5} {:>8} {:>15} {:>5}  {:<48} {:>5}",
        "ID",
        "TEMPLATE",
        "SESSION",
        "KEY",
        "STATE",
        "CPU s",
        "MEM MiB",
        "PIDS",
        "DISK MiB",
        "NET rx/tx",
        "CONNS",
        "TASK",
        "AGE"
    );
    for s in list {
        let f = &s.figures;
        let net = match (f.net_rx_bytes, f.net_tx_bytes) {
            (None, None) => "-".to_string(),
            (rx, tx) => format!("{}/{}", mib(rx), mib(tx)),
        };
        println!(
            "{:<20} {:<12} {:<21} {:<12} {:<9} {:>7} {:>8} {:>5} {:>8} {:>15} {:>5}  {:<48} {:>5}",
            s.id,
            s.template,
            s.session.as_deref().unwrap_or("-"),
            s.owner,
            s.state,
            opt(f.cpu_seconds, |c| format!("{c:.2}")),
            mib(f.memory_bytes),
            opt(f.pids, |p| p.to_string()),
            mib(f.disk_bytes),
            net,
            opt(f.connections_open, |c| c.to_string()),
            task(s),
            age(s.started_at, now),
        );
    }
    Ok(())
}

pub fn print_killed(list: &[KillReport], json: bool) -> Result<()> {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("nothing to kill: no live sandboxes");
    }
    for r in list {
        let what = match (&r.session, &r.sandbox) {
            (Some(s), Some(sb)) => format!("session {s} (sandbox {sb})"),
            (Some(s), None) => format!("session {s}"),
            (None, Some(sb)) => format!("sandbox {sb}"),
            (None, None) => "a call still restoring its sandbox".to_string(),
        };
        println!(
            "killed {what} of template `{}` (key {}, was {}): {} processes in {:.1} ms",
            r.template, r.owner, r.was, r.killed_processes, r.kill_ms
        );
    }
    Ok(())
}
