//! `thaw bench egress`: what the gateway costs, measured on this machine with real kernel
//! namespaces, a real TLS server and real TLS clients.
//!
//! - **HTTPS request through the proxy vs direct**: a fresh TLS 1.3 connection and one
//!   request for 1 KiB, from a client in a wired "sandbox" namespace (through the proxy,
//!   which sniffs the SNI, checks it against the sandbox's DNS answers and the policy, and
//!   relays), against the same client in the server's own namespace. The difference of the
//!   medians is what the gateway adds to a request.
//! - **Wiring**: attaching a fresh namespace (route, redirect rules, listeners), the cost a
//!   restore with networking on pays unless it was wired ahead.
//!
//! Everything happens inside namespaces the benchmark makes and removes: no packet leaves.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Config, EgressEvent, EgressObserver, Gateway, GatewayError, Limits, Policy};

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const NAME: &str = "bench.test";

#[derive(Debug, Clone, Serialize)]
pub struct Dist {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
}

impl Dist {
    fn of(mut v: Vec<Duration>) -> Dist {
        v.sort();
        let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Dist {
            n: v.len(),
            p50_ms: ms(at(0.5)),
            p99_ms: ms(at(0.99)),
            min_ms: ms(v[0]),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// A fresh HTTPS connection and a 1 KiB answer, client in the server's namespace.
    pub https_direct: Dist,
    /// The same from a wired sandbox namespace, through the proxy.
    pub https_via_proxy: Dist,
    /// Median added by the proxy, ms.
    pub proxy_added_p50_ms: f64,
    /// Wiring a fresh namespace (route, rules, listeners).
    pub wire: Dist,
}

struct Quiet;
impl EgressObserver for Quiet {
    fn egress(&self, _: &EgressEvent) {}
}

/// Runs the benchmark: `n` requests each way, `wires` fresh namespaces wired.
pub async fn run(n: usize, wires: usize) -> Result<Report, GatewayError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| GatewayError::Wiring(format!("bench: {what}: {e}"));
    let inet = crate::netns::new()?;
    crate::netns::within(Some(&inet), "bench internet", || {
        run_cmd("ip", &["link", "set", "lo", "up"])?;
        run_cmd("ip", &["addr", "add", &format!("{SERVER}/32"), "dev", "lo"])?;
        run_cmd(
            "ip",
            &["addr", "add", &format!("{RESOLVER}/32"), "dev", "lo"],
        )
    })?;

    // A CA, a certificate for the name, a TLS server answering 1 KiB, and a DNS answer.
    let ca_key = rcgen::KeyPair::generate().map_err(|e| bad("key", &e))?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| bad("ca", &e))?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| bad("ca", &e))?;
    let key = rcgen::KeyPair::generate().map_err(|e| bad("key", &e))?;
    let cert = rcgen::CertificateParams::new(vec![NAME.to_string()])
        .map_err(|e| bad("cert", &e))?
        .signed_by(&key, &ca_cert, &ca_key)
        .map_err(|e| bad("cert", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", &e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(|e| bad("tls", &e))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca_cert.der().clone())
        .map_err(|e| bad("roots", &e))?;
    let client_cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls", &e))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let (listener, dns) = crate::netns::within(Some(&inet), "bench servers", || {
        let l = std::net::TcpListener::bind((SERVER, 443))?;
        l.set_nonblocking(true)?;
        let d = std::net::UdpSocket::bind((RESOLVER, 53))?;
        d.set_nonblocking(true)?;
        Ok((l, d))
    })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| GatewayError::io("listener", e))?;
    let server = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut t) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = t.read(&mut buf).await;
                let body = [b'x'; 1024];
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = t.write_all(head.as_bytes()).await;
                let _ = t.write_all(&body).await;
                let _ = t.shutdown().await;
            });
        }
    });
    let dns = tokio::net::UdpSocket::from_std(dns).map_err(|e| GatewayError::io("dns", e))?;
    let resolver = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = dns.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(reply) = answer(&buf[..n]) {
                let _ = dns.send_to(&reply, from).await;
            }
        }
    });

    let gateway = Gateway::new(
        Config {
            upstream_dns: SocketAddr::from((RESOLVER, 53)),
            egress_netns: Some(inet.try_clone().map_err(|e| GatewayError::io("dup", e))?),
        },
        Arc::new(Quiet),
    );
    let policy =
        Policy::parse(&[format!("{NAME}:443")], &[] as &[&str]).map_err(|e| bad("policy", &e))?;

    let mut wire = Vec::with_capacity(wires);
    for i in 0..wires {
        let ns = crate::netns::new()?;
        let t = Instant::now();
        gateway
            .attach(
                &format!("bench-wire-{i}"),
                ns.as_fd(),
                crate::netns::Link::Loopback,
                policy.clone(),
                Limits::default(),
            )
            .await?;
        wire.push(t.elapsed());
        gateway.detach(&format!("bench-wire-{i}"));
    }

    let sandbox = crate::netns::new()?;
    let net = gateway
        .attach(
            "bench-sandbox",
            sandbox.as_fd(),
            crate::netns::Link::Loopback,
            policy,
            Limits::default(),
        )
        .await?;
    // The sandbox resolves the name through its resolver first, as a client would.
    net.remember(NAME, &[SERVER.into()], 300);

    let mut direct = Vec::with_capacity(n);
    let mut proxied = Vec::with_capacity(n);
    for i in 0..(2 * n + 4) {
        let via_proxy = i % 2 == 1;
        let ns = if via_proxy { &sandbox } else { &inet };
        let t = Instant::now();
        request(ns, client_cfg.clone()).await?;
        let took = t.elapsed();
        // The first two of each kind warm caches and are not counted.
        if i >= 4 {
            if via_proxy {
                proxied.push(took);
            } else {
                direct.push(took);
            }
        }
    }
    gateway.detach("bench-sandbox");
    server.abort();
    resolver.abort();
    let https_direct = Dist::of(direct);
    let https_via_proxy = Dist::of(proxied);
    Ok(Report {
        proxy_added_p50_ms: ((https_via_proxy.p50_ms - https_direct.p50_ms) * 100.0).round()
            / 100.0,
        https_direct,
        https_via_proxy,
        wire: Dist::of(wire),
    })
}

/// One HTTPS request for 1 KiB on a fresh connection made in `ns`.
async fn request(ns: &OwnedFd, cfg: Arc<rustls::ClientConfig>) -> Result<(), GatewayError> {
    let addr = SocketAddr::from((SERVER, 443));
    let ns2 = ns.try_clone().map_err(|e| GatewayError::io("dup", e))?;
    let fd = tokio::task::spawn_blocking(move || crate::netns::tcp_socket_in(Some(&ns2), addr))
        .await
        .map_err(|e| GatewayError::Wiring(format!("bench: {e}")))??;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let tcp = sock
        .connect(addr)
        .await
        .map_err(|e| GatewayError::io("bench connect", e))?;
    let name = rustls::pki_types::ServerName::try_from(NAME)
        .map_err(|e| GatewayError::Wiring(format!("bench: {e}")))?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| GatewayError::io("bench handshake", e))?;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| GatewayError::io("bench write", e))?;
    let mut got = Vec::new();
    let _ = tls.read_to_end(&mut got).await;
    if got.len() < 1024 {
        return Err(GatewayError::Wiring(format!(
            "bench: short answer ({} bytes)",
            got.len()
        )));
    }
    Ok(())
}

/// The bench resolver's answer: every name is [`SERVER`].
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    crate::dns::answer_with(q, SERVER, 300)
}

fn run_cmd(program: &str, args: &[&str]) -> std::io::Result<()> {
    let st = std::process::Command::new(program).args(args).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{program} {args:?}: {st}")))
    }
}
