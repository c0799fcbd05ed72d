//! Where guest-init listens: a Unix socket (container tier), a vsock port (microvm tier) or
//! a virtio-serial port (QEMU boot check; one long connection, reopened on hangup).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;

use crate::server::{serve_connection, State};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    Unix(PathBuf),
    /// An abstract Unix socket name (container tier: see `thaw_protocol::CONTAINER_AGENT_NAME`).
    Abstract(String),
    Vsock(u32),
    Serial(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "bad --listen value {0:?}: expected unix:PATH, abstract:NAME, vsock:PORT or serial:PATH"
    )]
    BadSpec(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TransportError {
    let what = what.into();
    move |source| TransportError::Io { what, source }
}

impl std::str::FromStr for ListenSpec {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadSpec(s.to_string());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "unix" if !rest.is_empty() => Ok(ListenSpec::Unix(rest.into())),
            "abstract" if !rest.is_empty() && !rest.contains('\0') => {
                Ok(ListenSpec::Abstract(rest.into()))
            }
            "vsock" => rest.parse().map(ListenSpec::Vsock).map_err(|_| bad()),
            "serial" if !rest.is_empty() => Ok(ListenSpec::Serial(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenSpec::Abstract(n) => write!(f, "abstract:{n}"),
            ListenSpec::Vsock(port) => write!(f, "vsock:{port}"),
            ListenSpec::Serial(p) => write!(f, "serial:{}", p.display()),
        }
    }
}

/// The automatic choice: vsock if the device exists, else the named virtio-serial port,
/// else the container tier's abstract socket.
pub fn auto_listen() -> ListenSpec {
    // A port named for us is an explicit choice by the VMM (QEMU in CI); /dev/vsock alone is
    // not, because loading the vsock module creates it even when no virtio-vsock device is
    // present.
    if let Some(dev) = find_virtio_port(thaw_protocol::VIRTIO_SERIAL_NAME) {
        return ListenSpec::Serial(dev);
    }
    if Path::new("/dev/vsock").exists() && virtio_vsock_device_present() {
        return ListenSpec::Vsock(thaw_protocol::VSOCK_PORT);
    }
    ListenSpec::Abstract(thaw_protocol::CONTAINER_AGENT_NAME.to_string())
}

/// A virtio device of type 19 (vsock) is bound on the virtio bus.
fn virtio_vsock_device_present() -> bool {
    let Ok(dir) = fs::read_dir("/sys/bus/virtio/devices") else {
        // No sysfs view: trust /dev/vsock rather than refusing to serve.
        return true;
    };
    dir.flatten().any(|e| {
        fs::read_to_string(e.path().join("device"))
            .map(|d| d.trim() == "0x0013")
            .unwrap_or(false)
    })
}

/// /sys/class/virtio-ports/<vportNpM>/name holds the port name; the device is /dev/<vportNpM>.
fn find_virtio_port(name: &str) -> Option<PathBuf> {
    let dir = fs::read_dir("/sys/class/virtio-ports").ok()?;
    dir.flatten().find_map(|e| {
        let port_name = fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// A listener bound and ready to accept.
pub enum Listener {
    Unix(UnixListener),
    Vsock(AsyncFd<OwnedFd>),
    Serial(PathBuf),
}

impl Listener {
    pub fn bind(spec: &ListenSpec) -> Result<Listener, TransportError> {
        match spec {
            ListenSpec::Unix(path) => bind_unix(path).map(Listener::Unix),
            ListenSpec::Abstract(name) => bind_abstract(name).map(Listener::Unix),
            ListenSpec::Vsock(port) => bind_vsock(*port).map(Listener::Vsock),
            ListenSpec::Serial(path) => {
                // Fail early (and clearly) if the device is not there.
                fs::metadata(path).map_err(io_err(format!("serial port {}", path.display())))?;
                Ok(Listener::Serial(path.clone()))
            }
        }
    }

    /// Serves connections forever.
    pub async fn serve(self, state: Arc<State>) {
        match self {
            Listener::Unix(l) => loop {
                match l.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_connection(Box::new(stream), state.clone()));
                    }
                    Err(e) => accept_error(e).await,
                }
            },
            Listener::Vsock(l) => loop {
                match accept_vsock(&l).await {
                    Ok(conn) => {
                        tokio::spawn(serve_connection(Box::new(conn), state.clone()));
                    }
                    Err(e) => accept_error(e).await,
                }
            },
            Listener::Serial(path) => loop {
                match open_serial(&path) {
                    Ok(conn) => serve_connection(Box::new(conn), state.clone()).await,
                    Err(e) => crate::warn!("open {}: {e}", path.display()),
                }
                // The host side hung up (EOF) or the port is not connected yet: reopen soon,
                // without spinning.
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
        }
    }
}

async fn accept_error(e: io::Error) {
    // EMFILE and friends are transient: back off instead of spinning or exiting.
    crate::warn!("accept: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn bind_unix(path: &Path) -> Result<UnixListener, TransportError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
            // Only the host (root) may talk to guest-init.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("chmod {}", dir.display())))?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A stale socket from a previous run (or a restored snapshot's rootfs).
            fs::remove_file(path).map_err(io_err(format!("remove stale {}", path.display())))?
        }
        Ok(_) => {
            return Err(TransportError::Io {
                what: format!("{} exists and is not a socket", path.display()),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            })
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(io_err(format!("bind {}", path.display())))
}

/// Binds an abstract Unix socket: a name in this network namespace, with no file anywhere
/// that a task could delete or replace.
fn bind_abstract(name: &str) -> Result<UnixListener, TransportError> {
    use std::os::linux::net::SocketAddrExt as _;
    let what = || format!("bind abstract:{name}");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(io_err(what()))?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(io_err(what()))?;
    l.set_nonblocking(true).map_err(io_err(what()))?;
    UnixListener::from_std(l).map_err(io_err(what()))
}

/// Registers an owned fd with the reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and keeps returning the same fd until the AsyncFd
    // (which owns it) is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn bind_vsock(port: u32) -> Result<AsyncFd<OwnedFd>, TransportError> {
    let what = format!("vsock port {port}");
    // SAFETY: socket(2); the fd is owned immediately below.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })
    .map_err(io_err(what.clone()))?;
    // SAFETY: fd is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; zeroed is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: valid pointer and length of a sockaddr_vm.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })
    .map_err(io_err(format!("bind {what}")))?;
    // SAFETY: listen(2) on our socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) }).map_err(io_err(format!("listen {what}")))?;
    register(fd).map_err(io_err(what))
}

async fn accept_vsock(l: &AsyncFd<OwnedFd>) -> io::Result<FdStream> {
    loop {
        let mut guard = l.readable().await?;
        let res = guard.try_io(|inner| {
            // SAFETY: accept4 on our listening socket; peer address not requested.
            cvt(unsafe {
                libc::accept4(
                    inner.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            })
        });
        match res {
            Ok(Ok(fd)) => {
                // SAFETY: accept4 returned a fresh fd.
                return FdStream::new(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

fn open_serial(path: &Path) -> io::Result<FdStream> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let fd: OwnedFd = file.into();
    // A tty line discipline would mangle binary frames (echo, CR/LF mapping): go raw.
    // virtio-serial ports are not ttys; a pty used in tests is.
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&fd) {
        nix::sys::termios::cfmakeraw(&mut t);
        let _ = nix::sys::termios::tcsetattr(&fd, nix::sys::termios::SetArg::TCSANOW, &t);
    }
    FdStream::new(fd)
}

/// A non-blocking fd (vsock connection or serial device) as an async byte stream.
pub struct FdStream(AsyncFd<OwnedFd>);

impl FdStream {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(FdStream(register(fd)?))
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|inner| {
                // SAFETY: reading into an initialised buffer of the given length.
                let n = unsafe {
                    libc::read(
                        inner.as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let res = guard.try_io(|inner| {
                // SAFETY: writing from a valid buffer of the given length.
                let n = unsafe { libc::write(inner.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_specs() {
        assert_eq!(
            "unix:/tmp/a.sock".parse::<ListenSpec>().unwrap(),
            ListenSpec::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            "vsock:1024".parse::<ListenSpec>().unwrap(),
            ListenSpec::Vsock(1024)
        );
        assert_eq!(
            "serial:/dev/vport0p1".parse::<ListenSpec>().unwrap(),
            ListenSpec::Serial("/dev/vport0p1".into())
        );
        assert!("vsock:x".parse::<ListenSpec>().is_err());
        assert!("tcp:1".parse::<ListenSpec>().is_err());
        assert!("unix:".parse::<ListenSpec>().is_err());
    }
}
