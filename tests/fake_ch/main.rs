//! `fake-cloud-hypervisor`: an honest test double of the `cloud-hypervisor` binary (v53 API)
//! for hosts that cannot run virtual machines.
//!
//! It serves Cloud Hypervisor's REST API (`/api/v1/...`) on `--api-socket`, checks request
//! bodies against Cloud Hypervisor's documented JSON (so client mistakes show up here), and
//! answers with the same status codes and JSON cause-chain errors. Instead of a VM it runs the
//! guest's init (guest-init, found in the rootfs image) as a process tree in fresh UTS, IPC,
//! network, PID and mount namespaces, chrooted into the loop-mounted `disks[0]`, and it proxies
//! Cloud Hypervisor's hybrid vsock (`CONNECT <port>\n` on `vsock.socket`) to guest-init's Unix
//! socket inside that root.
//!
//! What it does NOT emulate, by design:
//! * **No memory snapshots.** `vm.snapshot` writes `config.json`, a `state.json` that says it is
//!   a fake (`"thaw_fake": true`) and a token `memory-ranges`; `vm.restore` boots the guest
//!   afresh from the (copied) disk. Processes, open files and in-memory state of the guest do
//!   not survive a snapshot/restore; only what was on the disk does.
//! * **Memory and vCPU counts are accepted and reported but not enforced.**
//! * **Isolation is that of namespaces, not of a VM.** The guest keeps the host kernel, shares
//!   its clock (CAP_SYS_TIME is removed from the guest's bounding set, so SetClock cannot change
//!   the host clock), gets its own hostname (UTS namespace), an empty network namespace, a
//!   minimal `/dev` (null, zero, full, random, urandom, tty) instead of the host's devtmpfs, and
//!   a read-only host sysfs. The root is entered with chroot (util-linux `unshare --root`),
//!   which a root process can escape, and the guest keeps the other capabilities and a
//!   writable /proc: it is meant for trusted test workloads only.
//! * A **qcow2** `disks[0]` (an overlay over a raw backing file, as thaw gives clones) cannot be
//!   loop-mounted: it is flattened to a raw scratch file at boot and the guest's changes are
//!   written back into the qcow2 file at pause and at guest stop (`disk.rs`). `image_type` is
//!   checked against the content as Cloud Hypervisor does.
//! * Only `disks[0]` is used (as the root filesystem, read-write); only host-to-guest vsock
//!   connections to port 1024 (guest-init) are served (no guest-to-host `<socket>_<port>`);
//!   serial modes `File`, `Tty`, `Null` and `Off`; no `net` devices.
//! * A guest whose init exits is treated as a guest power-off: like Cloud Hypervisor, the
//!   process then exits.
//!
//! Every mount it makes lives in a private mount namespace and every child carries
//! PR_SET_PDEATHSIG(SIGKILL), so a killed fake leaves neither guest processes nor mounts.

#[macro_use]
mod log;
mod api;
mod config;
mod disk;
mod error;
mod guest;
mod procfs;
mod rootfs;
mod snapshot;
mod vsock;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub const BUILD_VERSION: &str = "v53.0-thaw-fake";
/// What v53.0 answers in `vmm.ping`: the cloud-hypervisor crate version (`CARGO_PKG_VERSION`).
pub const VERSION: &str = "53.0.0";

/// How long open API connections may delay the exit once it is decided.
const EXIT_LINGER: Duration = Duration::from_secs(2);

const USAGE: &str = "usage: fake-cloud-hypervisor --api-socket path=/abs/api.sock | --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("cloud-hypervisor {BUILD_VERSION}");
        return ExitCode::SUCCESS;
    }
    let socket = match parse_api_socket(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-cloud-hypervisor: {e}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    if std::fs::symlink_metadata(&socket).is_ok() {
        // Cloud Hypervisor refuses an existing path too; the client removes stale sockets.
        eprintln!(
            "fake-cloud-hypervisor: Error: the API socket {} already exists",
            socket.display()
        );
        return ExitCode::FAILURE;
    }
    // Must happen while the process is single-threaded: unshare(CLONE_NEWNS) only moves the
    // calling thread, so it has to precede the runtime.
    let private_mounts = match guest::private_mount_namespace() {
        Ok(()) => true,
        Err(e) => {
            log!("no private mount namespace ({e}): vm.boot and vm.restore will refuse to run");
            false
        }
    };
    // One thread: PR_SET_PDEATHSIG fires when the *thread* that forked a child exits, so every
    // child is spawned from this (main) thread, which lives as long as the process.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-cloud-hypervisor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(socket, private_mounts))
}

/// `--api-socket path=/abs/api.sock`, `--api-socket=path=...` or `--api-socket /abs/api.sock`.
fn parse_api_socket(args: &[String]) -> Result<PathBuf, String> {
    let mut value = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--api-socket" {
            value = Some(it.next().ok_or("--api-socket needs a value")?.clone());
        } else if let Some(v) = arg.strip_prefix("--api-socket=") {
            value = Some(v.to_owned());
        } else {
            return Err(format!("unsupported argument {arg:?}"));
        }
    }
    let value = value.ok_or("--api-socket is required")?;
    // The value is a comma-separated option list (`path=...,fd=...`) or a bare path.
    let path = value
        .split(',')
        .find_map(|kv| kv.strip_prefix("path="))
        .unwrap_or(&value);
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!(
            "the API socket path {} is not absolute",
            path.display()
        ));
    }
    Ok(path)
}

async fn run(socket: PathBuf, private_mounts: bool) -> ExitCode {
    let listener = match tokio::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "fake-cloud-hypervisor: cannot bind {}: {e}",
                socket.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let app = Arc::new(api::App::new(&socket, private_mounts));
    log!(
        "{BUILD_VERSION} (pid {}) serving {}",
        std::process::id(),
        socket.display()
    );
    let router = api::router(app.clone());
    let exit = app.clone();
    let served =
        axum::serve(listener, router).with_graceful_shutdown(async move { exit.wait_exit().await });
    // Graceful shutdown lets the answer to vmm.shutdown go out, but a client holding an idle
    // connection must not keep the process alive.
    let linger = async {
        app.wait_exit().await;
        tokio::time::sleep(EXIT_LINGER).await;
    };
    tokio::select! {
        r = served => if let Err(e) = r {
            log!("API server failed: {e}");
        },
        _ = linger => log!("API connections still open after {EXIT_LINGER:?}: closing them"),
    }
    app.stop_everything().await;
    let _ = std::fs::remove_file(&socket);
    log!("exiting");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn api_socket_forms() {
        for args in [
            s(&["--api-socket", "path=/a/api.sock"]),
            s(&["--api-socket=path=/a/api.sock"]),
            s(&["--api-socket", "/a/api.sock"]),
        ] {
            assert_eq!(
                parse_api_socket(&args).unwrap(),
                PathBuf::from("/a/api.sock")
            );
        }
        assert!(parse_api_socket(&s(&["--api-socket", "rel.sock"])).is_err());
        assert!(parse_api_socket(&s(&[])).is_err());
        assert!(parse_api_socket(&s(&["--kernel", "x"])).is_err());
    }
}
