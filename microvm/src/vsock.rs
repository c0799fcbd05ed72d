//! Host side of Cloud Hypervisor's hybrid vsock: the guest's AF_VSOCK ports are reached by
//! connecting to the device's Unix socket and sending `CONNECT <port>\n`; the VMM answers
//! `OK <host port>\n` and from then on the stream is the guest connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest handshake answer accepted: `OK ` plus a u32 and a newline fits easily.
const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot connect to the vsock socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock handshake on {path} for port {port} did not finish within {timeout:?}")]
    Timeout {
        path: PathBuf,
        port: u32,
        timeout: Duration,
    },
    #[error("vsock handshake i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the stream instead of answering: typically nothing listens on that guest
    /// port yet (guest still booting).
    #[error("the VMM closed the vsock connection to guest port {port} without answering (nothing listening in the guest yet?)")]
    Refused { port: u32 },
    #[error("unexpected vsock handshake reply for guest port {port}: {reply:?}")]
    BadReply { port: u32, reply: String },
}

/// Connects to guest port `port` through the hybrid vsock socket at `socket`.
pub async fn connect(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockError> {
    match tokio::time::timeout(timeout, handshake(socket, port)).await {
        Ok(r) => r,
        Err(_) => Err(VsockError::Timeout {
            path: socket.to_owned(),
            port,
            timeout,
        }),
    }
}

async fn handshake(socket: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let io_err = |source| VsockError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| VsockError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_err)?;
    // Read byte by byte up to the newline: anything after it already belongs to the guest's
    // stream and must stay in the socket for the caller.
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = stream.read(&mut b).await.map_err(io_err)?;
        if n == 0 {
            if reply.is_empty() {
                return Err(VsockError::Refused { port });
            }
            return Err(VsockError::BadReply {
                port,
                reply: String::from_utf8_lossy(&reply).into_owned(),
            });
        }
        if b[0] == b'\n' {
            break;
        }
        reply.push(b[0]);
        if reply.len() > MAX_REPLY {
            return Err(VsockError::BadReply {
                port,
                reply: String::from_utf8_lossy(&reply).into_owned(),
            });
        }
    }
    parse_reply(port, &reply)?;
    Ok(stream)
}

/// Checks an `OK <n>` reply (without its newline) and returns the host-side port number.
pub fn parse_reply(port: u32, reply: &[u8]) -> Result<u32, VsockError> {
    let bad = || VsockError::BadReply {
        port,
        reply: String::from_utf8_lossy(reply).into_owned(),
    };
    let text = std::str::from_utf8(reply).map_err(|_| bad())?;
    let rest = text.strip_prefix("OK ").ok_or_else(bad)?;
    rest.trim().parse::<u32>().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(1024, b"OK 1073741824").unwrap(), 1_073_741_824);
        assert!(matches!(
            parse_reply(1024, b"ERR no listener"),
            Err(VsockError::BadReply { .. })
        ));
        assert!(parse_reply(1024, b"OK x").is_err());
    }

    async fn fake_vmm(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            s.get_mut().write_all(reply).await.unwrap();
            if reply.is_empty() {
                return;
            }
            // Keep the stream open so the client can read what follows the handshake.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn handshake_ok_keeps_following_bytes() {
        let (_d, path) = fake_vmm(b"OK 1073741825\nGUEST").await;
        let mut s = connect(&path, 1024, Duration::from_secs(2)).await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GUEST");
    }

    #[tokio::test]
    async fn closed_stream_is_refused() {
        let (_d, path) = fake_vmm(b"").await;
        let e = connect(&path, 1024, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, VsockError::Refused { port: 1024 }), "{e}");
    }

    #[tokio::test]
    async fn silent_vmm_times_out() {
        let (_d, path) = fake_vmm(b"OK").await; // no newline, then silence
        let e = connect(&path, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, VsockError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn missing_socket_is_connect_error() {
        let e = connect(
            Path::new("/nonexistent/vsock.sock"),
            1024,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, VsockError::Connect { .. }), "{e}");
    }
}
