//! The host side of Cloud Hypervisor's hybrid vsock: a Unix socket at `vsock.socket` where a
//! client sends `CONNECT <port>\n`, gets `OK <host port>\n` once the guest accepted, and then
//! talks to the guest's port. Here guest port 1024 (guest-init) is guest-init's Unix socket
//! inside the guest root.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};

/// guest-init's vsock port (`thaw_protocol::VSOCK_PORT`).
pub const AGENT_PORT: u32 = 1024;
/// Longest `CONNECT <port>` line accepted.
const MAX_LINE: usize = 32;
/// Unix socket paths longer than this do not fit `sockaddr_un`.
const MAX_SUN_PATH: usize = 107;

/// A bound vsock device. Dropping it stops every connection and removes the socket file.
pub struct Proxy {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Binds `socket` (which must not exist: Cloud Hypervisor does not remove it either) and
    /// forwards guest port 1024 to `agent`.
    pub fn bind(socket: &Path, agent: PathBuf) -> Result<Proxy, String> {
        if std::fs::symlink_metadata(socket).is_ok() {
            return Err(format!(
                "Error creating vsock device: the socket {} already exists",
                socket.display()
            ));
        }
        let listener = UnixListener::bind(socket).map_err(|e| {
            format!(
                "Error creating vsock device: bind {}: {e}",
                socket.display()
            )
        })?;
        let task = tokio::spawn(accept_loop(listener, Arc::new(agent)));
        Ok(Proxy {
            path: socket.to_owned(),
            task,
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every open connection.
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, agent: Arc<PathBuf>) {
    // Host-side port numbers handed out in `OK <n>`, as Cloud Hypervisor allocates them.
    let next_port = Arc::new(AtomicU32::new(1 << 30));
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                conns.spawn(serve(stream, agent.clone(), next_port.clone()));
            }
            Err(e) => {
                log!("vsock accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One host connection. Anything unexpected closes it without an answer, which is what
/// Cloud Hypervisor does when nothing listens on the guest port.
async fn serve(mut host: UnixStream, agent: Arc<PathBuf>, next_port: Arc<AtomicU32>) {
    let port = match read_connect(&mut host).await {
        Ok(p) => p,
        Err(e) => {
            log!("vsock: bad handshake: {e}");
            return;
        }
    };
    if port != AGENT_PORT {
        log!("vsock: nothing listens on guest port {port}; closing");
        return;
    }
    let mut guest = match connect_agent(&agent).await {
        Ok(g) => g,
        Err(e) => {
            // The guest is not listening yet (still booting): the client retries.
            log!("vsock: guest port {port} not reachable yet ({e}); closing");
            return;
        }
    };
    let host_port = next_port.fetch_add(1, Ordering::Relaxed);
    if host
        .write_all(format!("OK {host_port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut host, &mut guest).await {
        log!("vsock: connection to guest port {port} ended: {e}");
    }
}

/// Reads `CONNECT <port>\n` byte by byte: whatever follows the newline belongs to the guest
/// and must stay in the socket.
async fn read_connect(s: &mut UnixStream) -> Result<u32, String> {
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let b = s
            .read_u8()
            .await
            .map_err(|e| format!("reading CONNECT: {e}"))?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_LINE {
            return Err("CONNECT line too long".into());
        }
    }
    parse_connect(&line)
}

fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8".to_owned())?;
    text.strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("expected \"CONNECT <port>\", got {text:?}"))
}

/// Connects to guest-init's socket. Paths too long for `sockaddr_un` (deep work directories)
/// are reached through an `O_PATH` descriptor of their directory.
async fn connect_agent(path: &Path) -> std::io::Result<UnixStream> {
    if path.as_os_str().len() <= MAX_SUN_PATH {
        return UnixStream::connect(path).await;
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    let dir_fd = open_dir_path(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir_fd.as_raw_fd().to_string())
        .join(name);
    UnixStream::connect(short).await
}

/// An `O_PATH` descriptor of a directory: enough to name entries through `/proc/self/fd`.
fn open_dir_path(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert!(parse_connect(b"CONNECT x").is_err());
        assert!(parse_connect(b"HELLO 1024").is_err());
    }

    #[tokio::test]
    async fn long_agent_paths_are_reached_through_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("x".repeat(60)).join("y".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let sock = deep.join("agent.sock");
        let _l = UnixListener::bind(short_bind_path(&deep, &sock)).unwrap();
        connect_agent(&sock).await.unwrap();
    }

    /// Binds through the same O_PATH trick (bind has the same length limit).
    fn short_bind_path(dir: &Path, sock: &Path) -> PathBuf {
        let fd = open_dir_path(dir).unwrap();
        let p = Path::new("/proc/self/fd")
            .join(fd.as_raw_fd().to_string())
            .join(sock.file_name().unwrap());
        std::mem::forget(fd);
        p
    }
}
