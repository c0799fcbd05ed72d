//! A microvm's link ([`Link::Tap`]) wired for real, with real namespaces, rules and sockets.
//!
//! The guest is a test double: a network namespace joined to the VMM's namespace by a veth
//! pair whose VMM end is named like the tap. Its packets arrive on `thaw0` exactly as a
//! virtio-net guest's arrive on a tap, which is all the wiring sees; the real guest, through
//! real Cloud Hypervisor, is `tests/microvm.rs`'s nested test. No packet leaves the
//! namespaces this test makes (the "internet" is one of them).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thaw_gateway::netns::{self, Link};
use thaw_gateway::{Config, EgressEvent, EgressObserver, Gateway, Limits, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[derive(Default)]
struct Events(Mutex<Vec<EgressEvent>>);

impl EgressObserver for Events {
    fn egress(&self, e: &EgressEvent) {
        if let Ok(mut v) = self.0.lock() {
            v.push(e.clone());
        }
    }
}

/// An echo server on `addr:7` in `ns`; each connection's peer is logged in `seen`.
fn echo(ns: &OwnedFd, addr: Ipv4Addr, seen: Arc<Mutex<Vec<Ipv4Addr>>>) {
    let l = netns::within(Some(ns), "echo server", move || {
        let l = std::net::TcpListener::bind((addr, 7))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .expect("echo listener");
    let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            if let Ok(mut v) = seen.lock() {
                v.push(addr);
            }
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A resolver in `ns` that answers every A question with [`ALLOWED`].
fn resolver(ns: &OwnedFd) {
    let d = netns::within(Some(ns), "resolver", || {
        let d = std::net::UdpSocket::bind((RESOLVER, 53))?;
        d.set_nonblocking(true)?;
        Ok(d)
    })
    .expect("resolver socket");
    let d = tokio::net::UdpSocket::from_std(d).expect("tokio socket");
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = d.recv_from(&mut buf).await {
            if let Some(r) = thaw_gateway::dns::answer_with(&buf[..n], ALLOWED, 60) {
                let _ = d.send_to(&r, from).await;
            }
        }
    });
}

/// An A question for `name`, asked from the guest to `to:53`; the addresses answered, or
/// `None` when nothing came back within a second.
fn lookup(guest: &OwnedFd, to: Ipv4Addr, name: &str) -> Option<Vec<Ipv4Addr>> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::new();
    m.set_id(7)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    let q = m.to_vec().ok()?;
    let got = netns::within(Some(guest), "guest lookup", move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.send_to(&q, (to, 53))?;
        let mut buf = [0u8; 1500];
        match s.recv(&mut buf) {
            Ok(n) => Ok(Some(buf[..n].to_vec())),
            Err(_) => Ok(None),
        }
    })
    .ok()??;
    let r = Message::from_vec(&got).ok()?;
    Some(
        r.answers()
            .iter()
            .filter_map(|a| match a.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect(),
    )
}

/// Connects from the guest to `to`, sends a line and returns what came back (empty when
/// the connection was closed without an answer).
async fn talk(guest: &OwnedFd, to: SocketAddr) -> std::io::Result<Vec<u8>> {
    let g = guest.try_clone()?;
    let fd = tokio::task::spawn_blocking(move || netns::tcp_socket_in(Some(&g), to))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let mut s = tokio::time::timeout(Duration::from_secs(5), sock.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    s.write_all(b"ping\n").await?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer within 5 s"))?
        .unwrap_or(0);
    buf.truncate(n);
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_behind_a_tap_reaches_what_it_is_granted_and_nothing_else() {
    let inet = netns::new().expect("internet namespace");
    netns::within(Some(&inet), "internet addresses", || {
        ip(&["link", "set", "lo", "up"])?;
        for a in [ALLOWED, OTHER, RESOLVER] {
            ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        Ok(())
    })
    .expect("internet");
    let seen = Arc::new(Mutex::new(Vec::new()));
    echo(&inet, ALLOWED, seen.clone());
    echo(&inet, OTHER, seen.clone());
    resolver(&inet);

    // The VMM's namespace, with `thaw0`; the guest's, with `eth0` at 100.64.0.2 and its
    // default route through the tap's end (what the guest's initramfs sets up).
    let vm = netns::new().expect("vm namespace");
    let guest = netns::new().expect("guest namespace");
    let guest_path = format!("/proc/{}/fd/{}", std::process::id(), guest.as_raw_fd());
    netns::within(Some(&vm), "veth", move || {
        ip(&[
            "link",
            "add",
            netns::TAP,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &guest_path,
        ])
    })
    .expect("veth pair");
    netns::within(Some(&guest), "guest address", || {
        ip(&["link", "set", "lo", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", netns::GUEST_ADDR),
            "dev",
            "eth0",
        ])?;
        ip(&["link", "set", "eth0", "up"])?;
        ip(&["route", "add", "default", "via", netns::TAP_ADDR])
    })
    .expect("guest network");

    let events = Arc::new(Events::default());
    let gateway = Gateway::new(
        Config {
            upstream_dns: SocketAddr::from((RESOLVER, 53)),
            egress_netns: Some(inet.try_clone().expect("dup")),
        },
        events.clone(),
    );

    // Before it is wired, the guest reaches nothing: the VMM's namespace has no route out.
    let before = talk(&guest, SocketAddr::from((ALLOWED, 7))).await;
    assert!(
        before.as_ref().map(|b| b.is_empty()).unwrap_or(true),
        "an unwired guest got an answer: {before:?}"
    );

    let policy =
        Policy::parse(&["198.51.100.10:7", "echo.test:7"], &[] as &[&str]).expect("policy");
    gateway
        .attach("vm-1", vm.as_fd(), Link::Tap, policy, Limits::default())
        .await
        .expect("wire the tap");

    // Granted: the echo answers, through the proxy.
    let got = talk(&guest, SocketAddr::from((ALLOWED, 7)))
        .await
        .expect("allowed");
    assert_eq!(got, b"ping\n");
    // Not granted: the proxy closes it, and the server never sees a connection.
    let got = talk(&guest, SocketAddr::from((OTHER, 7))).await;
    assert!(
        got.as_ref().map(|b| b.is_empty()).unwrap_or(true),
        "a refused destination answered: {got:?}"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![ALLOWED],
        "what reached the internet"
    );
    // DNS, to whatever server the guest names, is answered by the gateway: an allowed name
    // resolves, another does not reach the upstream resolver's answer.
    assert_eq!(
        lookup(&guest, Ipv4Addr::new(192, 0, 2, 1), "echo.test."),
        Some(vec![ALLOWED])
    );
    let other = lookup(&guest, Ipv4Addr::new(192, 0, 2, 1), "other.test.");
    assert!(
        other.as_ref().map(|a| a.is_empty()).unwrap_or(true),
        "a name the grant does not allow resolved: {other:?}"
    );
    // Other UDP has no way out (the internet's resolver, asked directly on another port,
    // never answers), and the guest cannot reach the VMM's namespace's own services past
    // the two listeners.
    let direct = netns::within(Some(&guest), "udp", || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.send_to(b"x", (RESOLVER, 5353))?;
        let mut b = [0u8; 16];
        Ok(s.recv(&mut b).is_ok())
    })
    .expect("udp probe");
    assert!(!direct, "a UDP packet other than DNS got an answer");

    let ev = events.0.lock().unwrap().clone();
    assert!(
        ev.iter()
            .any(|e| e.sandbox == "vm-1" && e.allowed && e.port == 7),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| !e.allowed && e.ip == Some(OTHER.into())),
        "{ev:?}"
    );
    gateway.detach("vm-1");
}

/// A namespace without the tap (a microvm restored from a snapshot made before microvm
/// networking) is refused with the reason and the fix, and nothing is wired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_without_a_tap_is_refused_naming_the_fix() {
    let vm = netns::new().expect("vm namespace");
    let gateway = Gateway::new(
        Config {
            upstream_dns: SocketAddr::from((RESOLVER, 53)),
            egress_netns: None,
        },
        Arc::new(Events::default()),
    );
    let policy = Policy::parse(&["198.51.100.10:7"], &[] as &[&str]).expect("policy");
    let msg = match gateway
        .attach("vm-2", vm.as_fd(), Link::Tap, policy, Limits::default())
        .await
    {
        Ok(_) => panic!("wired a namespace without a tap"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("deploy its template again"), "{msg}");
    assert!(gateway.get("vm-2").is_none());
}
