//! Making sockets and running commands inside a network namespace the host holds a
//! descriptor of, without moving any thread of the async runtime.
//!
//! `setns` is per thread: a short-lived thread joins the namespace, does its work (a socket
//! belongs for life to the namespace it was made in; a child process starts in its parent
//! thread's namespace) and exits.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Command, Stdio};

use crate::GatewayError;

/// Runs `f` on a fresh thread inside the network namespace `ns` (or the host's, if `None`).
pub fn within<T: Send + 'static>(
    ns: Option<&OwnedFd>,
    what: &'static str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, GatewayError> {
    let ns = ns
        .map(|n| n.try_clone())
        .transpose()
        .map_err(|e| GatewayError::io(what, e))?;
    std::thread::Builder::new()
        .name("thaw-netns".into())
        .spawn(move || {
            if let Some(ns) = &ns {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            f()
        })
        .map_err(|e| GatewayError::io(what, e))?
        .join()
        .map_err(|_| GatewayError::io(what, std::io::Error::other("thread panicked")))?
        .map_err(|e| GatewayError::io(what, e))
}

/// A new, empty network namespace (loopback, down), made by a thread of its own.
pub fn new() -> Result<OwnedFd, GatewayError> {
    std::thread::spawn(|| -> std::io::Result<OwnedFd> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| GatewayError::Wiring("namespace thread panicked".into()))?
    .map_err(|e| GatewayError::io("making a network namespace", e))
}

/// An unconnected TCP socket of `addr`'s family made in `ns`, ready for tokio to connect.
pub fn tcp_socket_in(ns: Option<&OwnedFd>, addr: SocketAddr) -> Result<OwnedFd, GatewayError> {
    let make = move || {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        Ok(socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?)
    };
    match ns {
        // The host's own namespace needs no thread.
        None => make().map_err(|e: std::io::Error| GatewayError::io("making a socket", e)),
        Some(_) => within(ns, "making a socket in the egress namespace", make),
    }
}

/// A UDP socket bound to an ephemeral port in `ns`, for one upstream DNS exchange.
pub fn udp_socket_in(
    ns: Option<&OwnedFd>,
    upstream: SocketAddr,
) -> Result<std::net::UdpSocket, GatewayError> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| GatewayError::Wiring("bad address".into()))?
    } else {
        "[::]:0"
            .parse()
            .map_err(|_| GatewayError::Wiring("bad address".into()))?
    };
    let make = move || {
        let s = std::net::UdpSocket::bind(bind)?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    match ns {
        None => make().map_err(|e: std::io::Error| GatewayError::io("making a DNS socket", e)),
        Some(_) => within(ns, "making a DNS socket in the egress namespace", make),
    }
}

/// The sandbox's own address and default route. The address matters: a route without a
/// source makes the sandbox's connections come from 0.0.0.0, and the proxy's answers to
/// 0.0.0.0 are dropped as martians (the handshake, answered by the kernel from the incoming
/// packet's route, still completes, so a client would hang rather than fail). 100.64.0.2 is
/// in the shared address space (RFC 6598), which no destination the gateway dials uses.
pub const SANDBOX_ROUTE: &str =
    "link set lo up\naddr replace 100.64.0.2/32 dev lo\nroute replace default dev lo src 100.64.0.2\n";

/// How a sandbox's traffic reaches its namespace, which decides how that namespace is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A container: the sandbox's processes live in the namespace itself, and their
    /// connections are caught on the way out (`OUTPUT`).
    Loopback,
    /// A microvm: the guest's kernel sends its packets down the tap device [`TAP`] in the
    /// namespace (its VMM's), and they are caught on the way in (`PREROUTING`). The guest
    /// is [`GUEST_ADDR`]; its gateway, the tap's end, [`TAP_ADDR`].
    Tap,
}

/// The tap device of every microvm: one name serves all, each VMM has a namespace of its
/// own.
pub const TAP: &str = "thaw0";

/// The host's end of a microvm's tap, the guest's default gateway.
pub const TAP_ADDR: &str = "100.64.0.1";
/// A microvm guest's own address (set by its initramfs); both in a /30 of the shared
/// address space (RFC 6598), which no destination the gateway dials uses.
pub const GUEST_ADDR: &str = "100.64.0.2";

/// The tap's address and link. With forwarding off ([`wire`] turns it off), a packet the
/// rules do not catch (UDP other than DNS, ICMP) has nowhere to go from this namespace.
fn tap_route() -> String {
    format!("link set lo up\naddr replace {TAP_ADDR}/30 dev {TAP}\nlink set {TAP} up\n")
}

/// The sockets the gateway listens on inside one sandbox's namespace.
pub struct Listeners {
    pub proxy: std::net::TcpListener,
    pub dns: std::net::UdpSocket,
}

/// Routes every address to the sandbox's loopback, sends its TCP (except to loopback) to the
/// proxy and its DNS to the resolver, and opens both listeners there. Idempotent: the nat
/// table is replaced whole, the route replaced, so a restored namespace that CRIU brought
/// back with the rules already in it ends up the same.
///
/// Why this and not a veth to the host: the namespace has no path to anything but the host
/// process's own sockets. Traffic the rules do not catch (UDP other than DNS, ICMP) is routed
/// to loopback, where no host answers it: there is nothing to misconfigure into an opening.
/// The sandbox's processes hold no capability over the namespace, so cannot change the rules;
/// and if they could, removing them would only cut them off.
///
/// A [`Link::Tap`] namespace (a microvm's) is wired the same way from the other side: the
/// guest's packets arrive on the tap, its TCP is redirected to the proxy and its DNS to the
/// resolver, both listening on the tap's address; nothing else has a route out. The guest's
/// root can change its own routes and addresses, and reach nothing more by it: every
/// packet still arrives on the tap, into a namespace with no other way out.
pub fn wire(
    ns: BorrowedFd<'_>,
    link: Link,
    proxy_port: u16,
    dns_port: u16,
) -> Result<Listeners, GatewayError> {
    let ns: OwnedFd = ns
        .try_clone_to_owned()
        .map_err(|e| GatewayError::io("dup of the sandbox's namespace", e))?;
    within(
        Some(&ns),
        "wiring the sandbox's network namespace",
        move || {
            let (route, listen) = match link {
                Link::Loopback => (SANDBOX_ROUTE.to_string(), "127.0.0.1"),
                Link::Tap => {
                    let name = std::ffi::CString::new(TAP).map_err(std::io::Error::other)?;
                    // SAFETY: a valid C string; the call only reads it.
                    if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
                        return Err(std::io::Error::other(format!(
                            "the sandbox has no network device ({TAP} is missing from its VMM's namespace): its snapshot predates microvm networking; deploy its template again"
                        )));
                    }
                    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"0")?;
                    (tap_route(), TAP_ADDR)
                }
            };
            run(Command::new("ip").args(["-batch", "-"]), route.as_bytes())?;
            match nat_template(link, proxy_port, dns_port) {
                Some(t) => t.install()?,
                None => run(
                    &mut Command::new("iptables-restore"),
                    redirect_rules(link, proxy_port, dns_port).as_bytes(),
                )?,
            }
            // Ports below 1024: the sandbox's processes, without CAP_NET_BIND_SERVICE, cannot
            // have bound them first (a warm-up that squats a high port would survive into every
            // restored clone).
            let proxy = std::net::TcpListener::bind((listen, proxy_port))?;
            proxy.set_nonblocking(true)?;
            let dns = std::net::UdpSocket::bind((listen, dns_port))?;
            dns.set_nonblocking(true)?;
            Ok(Listeners { proxy, dns })
        },
    )
}

/// The `nat` table of a wired sandbox, in `iptables-restore` form.
pub fn redirect_rules(link: Link, proxy_port: u16, dns_port: u16) -> String {
    let rules = match link {
        Link::Loopback => format!(
            "-A OUTPUT -d 127.0.0.0/8 -j RETURN\n\
             -A OUTPUT -p tcp -j REDIRECT --to-ports {proxy_port}\n\
             -A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports {dns_port}\n"
        ),
        Link::Tap => format!(
            "-A PREROUTING -i {TAP} -p tcp -j REDIRECT --to-ports {proxy_port}\n\
             -A PREROUTING -i {TAP} -p udp --dport 53 -j REDIRECT --to-ports {dns_port}\n"
        ),
    };
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         {rules}COMMIT\n"
    )
}

/// The table built once per process and kind of link ([`crate::xtables`]); `None` where
/// that is not possible here (no `iptables-legacy-restore`), and every sandbox runs
/// `iptables-restore` instead.
fn nat_template(
    link: Link,
    proxy_port: u16,
    dns_port: u16,
) -> Option<&'static crate::xtables::Template> {
    type Slot = std::sync::OnceLock<Option<crate::xtables::Template>>;
    static LOOPBACK: Slot = std::sync::OnceLock::new();
    static TAP_TABLE: Slot = std::sync::OnceLock::new();
    let slot = match link {
        Link::Loopback => &LOOPBACK,
        Link::Tap => &TAP_TABLE,
    };
    slot.get_or_init(|| {
        match crate::xtables::Template::capture(&redirect_rules(link, proxy_port, dns_port)) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::info!("egress: running iptables-restore per sandbox ({e})");
                None
            }
        }
    })
    .as_ref()
}

fn run(cmd: &mut Command, stdin: &[u8]) -> std::io::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running {program}: {e} (install iproute2 and iptables: `make deps`)"),
            )
        })?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
