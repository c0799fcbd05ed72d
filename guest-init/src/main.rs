//! guest-init: PID 1 of every thaw sandbox.
//!
//! It serves the agent protocol (`thaw-protocol`, see PROTOCOL.md) over a Unix socket, a
//! vsock port or a virtio-serial port; runs tasks under supervisors that guarantee nothing
//! survives a timeout or cancel; reaps orphans; and performs clone hygiene after restores.
//!
//! It runs a single-threaded tokio runtime: fewer threads make CRIU checkpoint/restore
//! faster and cheaper, and a single thread also makes forking safe to reason about.

mod error;
mod files;
mod handler;
mod hygiene;
mod lines;
mod log;
mod oom;
mod pid1;
mod procs;
mod server;
mod supervisor;
mod task;
mod transport;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use server::State;
use transport::{ListenSpec, Listener};

const USAGE: &str =
    "usage: guest-init [--listen unix:PATH|abstract:NAME|vsock:PORT|serial:PATH]... \
                     [--state-dir DIR]\n\
                     With no --listen: the virtio-serial port named org.thaw.agent if present, \
                     else vsock if a virtio-vsock device exists, else abstract:thaw-agent.";

#[derive(Debug, PartialEq, Eq)]
struct Args {
    listen: Vec<ListenSpec>,
    state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Listen(#[from] transport::TransportError),
}

fn parse_args(args: &[String]) -> Result<Args, ArgsError> {
    let mut out = Args {
        listen: Vec::new(),
        state_dir: PathBuf::from(thaw_protocol::CONTAINER_STATE_DIR),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| ArgsError::Usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--listen" => out.listen.push(value("--listen")?.parse()?),
            "--state-dir" => out.state_dir = PathBuf::from(value("--state-dir")?),
            other => {
                if let Some(v) = other.strip_prefix("--listen=") {
                    out.listen.push(v.parse()?);
                } else if let Some(v) = other.strip_prefix("--state-dir=") {
                    out.state_dir = PathBuf::from(v);
                } else {
                    return Err(ArgsError::Usage(format!("unknown argument {other:?}")));
                }
            }
        }
    }
    Ok(out)
}

fn main() {
    // First thing, in every role (PID 1 and `--supervise`, which is exec'd and so starts
    // dumpable again): not dumpable. A task runs as the same uid as guest-init, and the
    // kernel lets a same-uid process open a *dumpable* process's /proc/<pid>/mem read-write
    // without ptrace (the seccomp filter denies only the ptrace syscall), which would let a
    // task rewrite guest-init's memory. Non-dumpable makes that open need CAP_SYS_PTRACE,
    // which no task has. Children inherit the flag only until their execve, which resets
    // it for an ordinary binary, so tasks themselves are unaffected. CRIU (host root,
    // CAP_SYS_PTRACE) still dumps us and restores the flag.
    set_not_dumpable();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--supervise") {
        std::process::exit(supervisor::main(&argv[1..]));
    }
    if argv.first().map(String::as_str) == Some("--sync") {
        // The host's request before it reads a paused VM's disk (microvm checkpoints):
        // sync(2) writes every dirty page and ends in a flush of each block device, which is
        // what makes Cloud Hypervisor write its qcow2 metadata to the disk file.
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        return;
    }
    log::init();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    if argv.iter().any(|a| a == "--version") {
        println!("guest-init {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            warn!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let pid1 = pid1::is_pid1();
    if pid1 {
        pid1::setup_mounts();
        if let Err(e) = pid1::loopback_up() {
            debug!("bringing lo up: {e}");
        }
    } else {
        pid1::become_subreaper();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fatal(&format!("cannot start the async runtime: {e}")),
    };
    rt.block_on(run(args, pid1));
}

fn set_not_dumpable() {
    // SAFETY: prctl with integer arguments only; it changes this process's own flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        // Logging is not set up yet; stderr reaches the sandbox's log.
        eprintln!(
            "guest-init: prctl(PR_SET_DUMPABLE, 0): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// PID 1 must not exit (the kernel panics); anything else exits with an error.
fn fatal(msg: &str) -> ! {
    warn!("{msg}");
    if pid1::is_pid1() {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(1);
}

async fn run(args: Args, pid1: bool) {
    tokio::spawn(pid1::reaper());
    let specs = if args.listen.is_empty() {
        vec![transport::auto_listen()]
    } else {
        args.listen
    };
    // A VM (vsock/serial transport) powers off on Shutdown; a container just exits.
    let in_vm = specs
        .iter()
        .any(|s| matches!(s, ListenSpec::Vsock(_) | ListenSpec::Serial(_)));
    let socket_paths = specs
        .iter()
        .filter_map(|s| match s {
            ListenSpec::Unix(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let state = Arc::new(State::new(args.state_dir, pid1 && in_vm, socket_paths));
    for spec in specs {
        let listener = bind_with_retry(&spec, pid1).await;
        info!("listening on {spec} (pid {})", std::process::id());
        tokio::spawn(listener.serve(state.clone()));
    }
    wait_for_termination(pid1).await;
    shutdown(&state).await;
}

/// As PID 1 a missing device may still be appearing (udev-less boot): keep trying. As a
/// plain process, fail fast so tests and operators see the error.
async fn bind_with_retry(spec: &ListenSpec, pid1: bool) -> Listener {
    let mut warned = false;
    loop {
        match Listener::bind(spec) {
            Ok(l) => return l,
            Err(e) if pid1 => {
                if !warned {
                    warn!("cannot listen on {spec}: {e}; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => fatal(&format!("cannot listen on {spec}: {e}")),
        }
    }
}

/// Resolves on SIGTERM/SIGINT. PID 1 in a VM ignores them (exiting would panic the kernel;
/// the host uses Shutdown); PID 1 in a container exits cleanly like any other process.
async fn wait_for_termination(pid1: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install SIGTERM/SIGINT handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if pid1 && vm_like() {
            info!("ignoring SIGTERM/SIGINT as PID 1 in a VM; use the shutdown request");
            continue;
        }
        info!("terminating on signal");
        return;
    }
}

/// True when guest-init serves a VM transport (the only case where exiting as PID 1 is
/// fatal to the machine rather than a container stop).
fn vm_like() -> bool {
    Path::new("/dev/vsock").exists() || Path::new("/sys/class/virtio-ports").exists()
}

/// Kills everything, then exits (or powers off a VM).
pub async fn shutdown(state: &State) -> ! {
    info!("shutting down: killing all tasks");
    server::kill_everything(state).await;
    for p in &state.socket_paths {
        let _ = std::fs::remove_file(p);
    }
    if state.power_off {
        pid1::power_off();
        // reboot(2) failed: there is nothing sensible left to do as PID 1 but idle.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_command_line() {
        let a = parse_args(&s(&[
            "--listen",
            "unix:/tmp/a.sock",
            "--listen=vsock:1024",
            "--state-dir",
            "/tmp/st",
        ]))
        .unwrap();
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.state_dir, PathBuf::from("/tmp/st"));
        assert!(parse_args(&s(&["--listen"])).is_err());
        assert!(parse_args(&s(&["--bogus"])).is_err());
        assert!(parse_args(&s(&["--listen", "tcp:1"])).is_err());
    }
}
