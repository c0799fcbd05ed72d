#![allow(dead_code)] // shared by several test binaries, each using a part
//! A small "internet" for egress tests, inside a network namespace the test makes: a DNS
//! zone, HTTP servers, a TLS server with a test CA, raw TCP and UDP echo servers, at
//! documentation addresses (198.51.100.0/24, 203.0.113.0/24) that exist only in that
//! namespace. thaw's gateway is pointed at it (`THAW_EGRESS_NETNS`, `THAW_UPSTREAM_DNS`), so
//! no test packet goes anywhere else. Every server logs what reached it: a refusal is proven
//! by the gateway's answer *and* by the server never seeing the connection or the question.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const DNS: &str = "198.51.100.53";
pub const ALLOWED: &str = "198.51.100.10";
pub const WILD: &str = "198.51.100.11";
/// Another HTTP server, for tests that must not share counts with the others.
pub const PLAIN: &str = "198.51.100.12";
pub const OTHER: &str = "198.51.100.20";
pub const TLS: &str = "203.0.113.30";
pub const RAW: &str = "203.0.113.40";

/// The zone the test resolver serves.
pub fn zone() -> HashMap<&'static str, Ipv4Addr> {
    let mut z = HashMap::new();
    for (name, ip) in [
        ("allowed.test", ALLOWED),
        ("a.wild.test", WILD),
        ("plain.test", PLAIN),
        ("other.test", OTHER),
        ("tls.test", TLS),
        ("rebind.test", "127.0.0.1"),
        ("meta.test", "169.254.169.254"),
    ] {
        z.insert(name, ip.parse().expect("ip"));
    }
    z
}

/// What reached the internet.
#[derive(Default, Debug)]
pub struct Log {
    /// `local address:port` of every accepted TCP connection.
    pub tcp: Vec<SocketAddr>,
    /// Every `Authorization` header an HTTP or HTTPS server received.
    pub auth: Vec<String>,
    /// Every DNS question's name.
    pub dns: Vec<String>,
    /// Every UDP datagram's destination.
    pub udp: Vec<SocketAddr>,
}

pub struct Internet {
    pub netns: String,
    pub log: Arc<Mutex<Log>>,
    /// PEM of the test CA the TLS server's certificate is signed by.
    pub ca_pem: String,
    /// The same, in a file (what thaw's proxy is told to trust for the test's servers).
    pub ca_file: std::path::PathBuf,
}

impl Internet {
    /// Makes the namespace and starts every server on a runtime of its own thread, which
    /// lives as long as the test process.
    /// The test process's internet, made on first use (every test of a binary shares it:
    /// thaw reads where it is from the environment, which is the process's).
    pub fn shared() -> &'static Internet {
        static NET: std::sync::OnceLock<Internet> = std::sync::OnceLock::new();
        NET.get_or_init(|| {
            let net = Internet::start();
            net.use_for_thaw();
            net
        })
    }

    fn start() -> Internet {
        sweep_stale();
        let netns = format!("thaw-inet-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &netns]).status();
        ip(&["netns", "add", &netns]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        for a in [DNS, ALLOWED, WILD, PLAIN, OTHER, TLS, RAW] {
            ip(&["-n", &netns, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        let ns: OwnedFd = std::fs::File::open(format!("/run/netns/{netns}"))
            .expect("open netns")
            .into();
        let log = Arc::new(Mutex::new(Log::default()));

        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "thaw egress test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["tls.test".to_string()])
            .expect("params")
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("cert");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("tls config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        // Sockets are made in the namespace by this thread, then served from the runtime.
        let (tx, rx) = std::sync::mpsc::channel();
        let ns2 = ns.try_clone().expect("dup");
        std::thread::spawn(move || {
            nix::sched::setns(ns2.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let tcp = |a: &str, port: u16| {
                let l = std::net::TcpListener::bind((a, port)).expect("bind tcp");
                l.set_nonblocking(true).expect("nonblocking");
                l
            };
            let udp = |a: &str, port: u16| {
                let s = std::net::UdpSocket::bind((a, port)).expect("bind udp");
                s.set_nonblocking(true).expect("nonblocking");
                s
            };
            let sockets = (
                vec![
                    tcp(ALLOWED, 80),
                    tcp(WILD, 80),
                    tcp(PLAIN, 80),
                    tcp(OTHER, 80),
                ],
                vec![tcp(TLS, 443), tcp(OTHER, 443)],
                vec![tcp(RAW, 8080), tcp(RAW, 8081)],
                udp(DNS, 53),
                udp(DNS, 9999),
            );
            tx.send(sockets).expect("send");
        })
        .join()
        .expect("socket thread");
        let (http, tls_l, raw, dns, udp_echo) = rx.recv().expect("sockets");
        let log2 = log.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                for l in http {
                    tokio::spawn(serve_http(l, log2.clone()));
                }
                for l in tls_l {
                    tokio::spawn(serve_tls(l, acceptor.clone(), log2.clone()));
                }
                for l in raw {
                    tokio::spawn(serve_echo(l, log2.clone()));
                }
                tokio::spawn(serve_udp_echo(udp_echo, log2.clone()));
                serve_dns(dns, log2).await;
            });
        });
        let ca_file = std::env::temp_dir().join(format!("{netns}-ca.pem"));
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        Internet {
            netns,
            log,
            ca_pem: ca_cert.pem(),
            ca_file,
        }
    }

    /// Points engines opened from now on at this internet.
    pub fn use_for_thaw(&self) {
        std::env::set_var("THAW_EGRESS_NETNS", format!("/run/netns/{}", self.netns));
        std::env::set_var("THAW_UPSTREAM_DNS", format!("{DNS}:53"));
        std::env::set_var("THAW_UPSTREAM_CA_BUNDLE", &self.ca_file);
    }

    pub fn tcp_seen(&self, ip: &str, port: u16) -> usize {
        let want = SocketAddr::new(ip.parse::<IpAddr>().expect("ip"), port);
        self.log
            .lock()
            .map(|l| l.tcp.iter().filter(|a| **a == want).count())
            .unwrap_or(0)
    }

    pub fn asked(&self, name: &str) -> bool {
        self.log
            .lock()
            .map(|l| l.dns.iter().any(|n| n == name))
            .unwrap_or(false)
    }

    pub fn udp_seen(&self) -> usize {
        self.log.lock().map(|l| l.udp.len()).unwrap_or(0)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Removes the namespaces of test processes that are gone (a static is never dropped).
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("thaw-inet-") else {
            continue;
        };
        if pid
            .parse::<u32>()
            .is_ok_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn log_auth(head: &str, log: &Mutex<Log>) {
    for l in head.lines() {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                log.lock().expect("log").auth.push(v.trim().to_string());
            }
        }
    }
}

fn answer(head: &str, local: SocketAddr) -> Vec<u8> {
    let host = head
        .lines()
        .find_map(|l| l.strip_prefix("Host:").or_else(|| l.strip_prefix("host:")))
        .unwrap_or("")
        .trim()
        .to_string();
    let body = if head.starts_with("GET /big ") {
        "x".repeat(256 * 1024)
    } else {
        format!("hello from {local} host={host}")
    };
    format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve_http(l: std::net::TcpListener, log: Arc<Mutex<Log>>) {
    let l = tokio::net::TcpListener::from_std(l).expect("listener");
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let local = s.local_addr().expect("local");
        log.lock().expect("log").tcp.push(local);
        let log = log.clone();
        tokio::spawn(async move {
            let head = read_head(&mut s).await;
            log_auth(&head, &log);
            let _ = s.write_all(&answer(&head, local)).await;
            let _ = s.shutdown().await;
        });
    }
}

async fn serve_tls(
    l: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    log: Arc<Mutex<Log>>,
) {
    let l = tokio::net::TcpListener::from_std(l).expect("listener");
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let local = s.local_addr().expect("local");
        log.lock().expect("log").tcp.push(local);
        let acceptor = acceptor.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let Ok(mut t) = acceptor.accept(s).await else {
                return;
            };
            let head = read_head(&mut t).await;
            log_auth(&head, &log);
            let _ = t.write_all(&answer(&head, local)).await;
            let _ = t.shutdown().await;
        });
    }
}

async fn serve_echo(l: std::net::TcpListener, log: Arc<Mutex<Log>>) {
    let l = tokio::net::TcpListener::from_std(l).expect("listener");
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        log.lock()
            .expect("log")
            .tcp
            .push(s.local_addr().expect("local"));
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            if let Ok(n) = s.read(&mut buf).await {
                let _ = s.write_all(&buf[..n]).await;
            }
        });
    }
}

async fn serve_udp_echo(s: std::net::UdpSocket, log: Arc<Mutex<Log>>) {
    let s = tokio::net::UdpSocket::from_std(s).expect("udp");
    let mut buf = [0u8; 1500];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf).await {
            log.lock()
                .expect("log")
                .udp
                .push(s.local_addr().expect("local"));
            let _ = s.send_to(&buf[..n], from).await;
        }
    }
}

async fn serve_dns(s: std::net::UdpSocket, log: Arc<Mutex<Log>>) {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
    let zone = zone();
    let s = tokio::net::UdpSocket::from_std(s).expect("udp");
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(query) = q.queries().first().cloned() else {
            continue;
        };
        let name = query.name().to_ascii().trim_end_matches('.').to_lowercase();
        log.lock().expect("log").dns.push(name.clone());
        let mut r = Message::new();
        r.set_id(q.id())
            .set_message_type(MessageType::Response)
            .set_recursion_desired(true)
            .set_recursion_available(true)
            .add_query(query.clone());
        match zone.get(name.as_str()) {
            Some(ip) => {
                if query.query_type() == RecordType::A {
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(A(*ip)),
                    ));
                }
            }
            None => {
                r.set_response_code(ResponseCode::NXDomain);
            }
        }
        if let Ok(bytes) = r.to_vec() {
            let _ = s.send_to(&bytes, from).await;
        }
    }
}
