//! `guest-init --supervise`: the small process that owns one task's process tree.
//!
//! guest-init never waits on task processes itself: its global `waitpid(-1)` reaper would
//! race any per-child wait. Instead each task runs under a supervisor, which
//!
//! 1. becomes a child subreaper, so every orphan of the task is reparented to it;
//! 2. spawns the command in its own process group with the inherited stdin/stdout/stderr;
//! 3. waits for it, SIGKILLing the whole tree on SIGUSR1 (timeout/cancel) or on SIGTERM,
//!    SIGINT, SIGHUP, or when guest-init dies (parent-death signal);
//! 4. after the command ends, SIGKILLs every remaining descendant (daemons included) and
//!    reaps them;
//! 5. reports on fd 3, one JSON line each: [`Status::Started`] or [`Status::SpawnFailed`],
//!    then [`Status::Exited`] or [`Status::Signaled`].
//!
//! It writes nothing to stdout/stderr: those are the task's pipes.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::FromRawFd as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::procs;

/// The descriptor the status pipe is passed on.
pub const STATUS_FD: i32 = 3;

/// One line on the status pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    Started { pid: u32 },
    SpawnFailed { message: String },
    Exited { code: i32 },
    Signaled { signal: i32 },
}

/// Signals that make the supervisor kill the tree. SIGCHLD wakes it to reap.
const KILL_SIGNALS: [i32; 4] = [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// How long the final sweep may take before the supervisor reports anyway. A tree that has
/// not died by then is stuck in the kernel (D state); guest-init's own sweep follows.
const SWEEP_LIMIT: Duration = Duration::from_secs(10);

/// Entry point for `--supervise [--cwd DIR] -- ARGV...`. Returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    // SAFETY: fcntl on a plain integer fd; F_GETFD has no side effects.
    if unsafe { libc::fcntl(STATUS_FD, libc::F_GETFD) } < 0 {
        // Not started by guest-init: there is nobody to report to.
        return 2;
    }
    // SAFETY: fd 3 is open (checked above) and nothing else in this process owns it.
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    // The task must not inherit the status pipe: close it on exec.
    // SAFETY: fcntl on an fd we own.
    unsafe {
        libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }

    let (cwd, argv) = match parse_args(args) {
        Ok(v) => v,
        Err(message) => {
            report(&mut status, &Status::SpawnFailed { message });
            return 2;
        }
    };

    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        // If guest-init dies, tear the tree down instead of leaving it running.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1, 0, 0, 0);
    }
    let sigset = block_signals();

    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).process_group(0);
    if let Some(cwd) = &cwd {
        cmd.current_dir(cwd);
    }
    // The task must start with a clean signal state: std does not reset the mask (which
    // we blocked above), and ignored dispositions would be inherited through exec.
    // SAFETY: runs between fork and exec in this single-threaded process and only calls
    // async-signal-safe functions (sigemptyset, sigprocmask, signal).
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => {
            let message = match &cwd {
                Some(dir) if !std::path::Path::new(dir).is_dir() => {
                    format!("cannot run {:?}: working directory {dir:?}: {err}", argv[0])
                }
                _ => format!("cannot run {:?}: {err}", argv[0]),
            };
            report(&mut status, &Status::SpawnFailed { message });
            return 1;
        }
    };
    let main_pid = child.id() as i32;
    // Dropping a std Child neither waits nor kills: we reap it ourselves below.
    drop(child);
    report(
        &mut status,
        &Status::Started {
            pid: main_pid as u32,
        },
    );

    let me = std::process::id() as i32;
    let mut main_status: Option<Status> = None;
    let reap = |main_status: &mut Option<Status>| reap_all(main_pid, main_status);
    loop {
        match wait_signal(&sigset) {
            Some(sig) if KILL_SIGNALS.contains(&sig) => {
                // SAFETY: kill(2) on the task's process group.
                unsafe {
                    libc::kill(-main_pid, libc::SIGKILL);
                }
                procs::kill_tree(me, SWEEP_LIMIT, || reap(&mut main_status));
            }
            _ => reap(&mut main_status),
        }
        if main_status.is_some() {
            break;
        }
        if procs::live_descendants(me).is_empty() {
            // Defensive: the main child is gone but its status was lost (should not
            // happen as we are its parent). Do not spin forever.
            reap(&mut main_status);
            if main_status.is_none() {
                main_status = Some(Status::Signaled {
                    signal: libc::SIGKILL,
                });
            }
            break;
        }
    }
    // The command ended: nothing it started may outlive it.
    // SAFETY: kill(2) on the task's process group.
    unsafe {
        libc::kill(-main_pid, libc::SIGKILL);
    }
    procs::kill_tree(me, SWEEP_LIMIT, || reap(&mut main_status));
    if let Some(st) = main_status {
        report(&mut status, &st);
    }
    0
}

fn parse_args(args: &[String]) -> Result<(Option<String>, Vec<String>), String> {
    let mut cwd = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--cwd" => cwd = Some(it.next().ok_or("--cwd needs a value")?.clone()),
            "--" => {
                let argv: Vec<String> = it.cloned().collect();
                if argv.is_empty() {
                    return Err("empty argv".into());
                }
                return Ok((cwd, argv));
            }
            other => return Err(format!("supervisor: unexpected argument {other:?}")),
        }
    }
    Err("supervisor: missing `--` before the command".into())
}

fn report(out: &mut File, status: &Status) {
    if let Ok(mut line) = serde_json::to_vec(status) {
        line.push(b'\n');
        // If guest-init is gone there is nobody to tell; ignore the error.
        let _ = out.write_all(&line);
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set; the supervisor is
    // single-threaded, so sigprocmask is the process mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for sig in KILL_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to one second for a blocked signal. The periodic wake-up is a safety net only.
fn wait_signal(set: &libc::sigset_t) -> Option<i32> {
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    // SAFETY: valid pointers to a sigset and a timespec; siginfo may be null.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (sig > 0).then_some(sig)
}

/// Reaps every exited child; records the main child's status.
fn reap_all(main_pid: i32, main_status: &mut Option<Status>) {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == main_pid {
            let st = std::process::ExitStatus::from_raw(raw);
            *main_status = Some(match (st.code(), st.signal()) {
                (Some(code), _) => Status::Exited { code },
                (None, Some(signal)) => Status::Signaled { signal },
                (None, None) => Status::Signaled {
                    signal: libc::SIGKILL,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_round_trip() {
        let s = serde_json::to_string(&Status::Started { pid: 7 }).unwrap();
        assert_eq!(s, r#"{"status":"started","pid":7}"#);
        let back: Status = serde_json::from_str(r#"{"status":"signaled","signal":9}"#).unwrap();
        assert_eq!(back, Status::Signaled { signal: 9 });
    }

    #[test]
    fn parses_supervise_args() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_args(&a(&["--cwd", "/x", "--", "ls", "-l"])).unwrap(),
            (Some("/x".into()), a(&["ls", "-l"]))
        );
        assert!(parse_args(&a(&["--"])).is_err());
        assert!(parse_args(&a(&["ls"])).is_err());
    }
}
