//! The transparent TCP proxy: one accepted connection per outbound connect of the sandbox.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::sniff::{self, Hello};
use crate::{EgressEvent, Gateway, SandboxNet, Verdict};

/// How long the proxy waits for a client's first bytes before it judges the connection by
/// its address alone (protocols where the server speaks first: SSH, SMTP, …).
const FIRST_BYTES: Duration = Duration::from_millis(300);
/// The most of a connection's start read before deciding (a ClientHello is at most 16 KiB
/// in one record).
const MAX_HELLO: usize = 16 * 1024 + 5;

pub(crate) async fn serve(gw: Gateway, net: Arc<SandboxNet>, listener: TcpListener) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (gw, net) = (gw.clone(), net.clone());
        tokio::spawn(async move { handle(gw, net, conn).await });
    }
}

/// Where the sandbox's connect was going before the redirect.
fn original_dst(conn: &TcpStream) -> Option<SocketAddr> {
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: addr and len are valid for the size given; the kernel writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 || i32::from(addr.sin_family) != libc::AF_INET {
        return None;
    }
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    )))
}

async fn handle(gw: Gateway, net: Arc<SandboxNet>, mut conn: TcpStream) {
    let counters = &net.counters;
    let Some(dst) = original_dst(&conn) else {
        return;
    };
    let open = counters.open.fetch_add(1, Ordering::Relaxed) + 1;
    counters.total.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&net);
    let mut event = EgressEvent {
        sandbox: net.id.clone(),
        kind: "tcp",
        name: None,
        ip: Some(dst.ip()),
        port: dst.port(),
        allowed: false,
        reason: String::new(),
    };
    if open > net.limits.connections() {
        event.reason = format!(
            "the sandbox has {} connections open, its limit (network.max_connections)",
            net.limits.connections()
        );
        return refuse(&gw, &net, conn, event, None).await;
    }

    // The first bytes, for the name they carry.
    let mut first = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + FIRST_BYTES;
    let mut chunk = [0u8; 4096];
    while sniff::wants_more(&first) && first.len() < MAX_HELLO {
        match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => first.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let hello = sniff::classify(&first);
    let name = match &hello {
        Hello::Tls { sni } => sni.clone(),
        Hello::Http { host } => host.clone().filter(|h| h.parse::<IpAddr>().is_err()),
        Hello::Other => None,
    };
    event.name = name.clone();
    let http = matches!(hello, Hello::Http { .. });

    // The policy first: a name it refuses is never looked up, so the first bytes of a
    // connection cannot make the host ask the upstream resolver a name of the sandbox's
    // choosing (an exfiltration channel, as a refused DNS question would be).
    let rule = match net.policy().connect(name.as_deref(), dst.ip(), dst.port()) {
        Verdict::Deny { why } => {
            event.reason = why;
            return refuse(&gw, &net, conn, event, http.then_some(403)).await;
        }
        Verdict::Allow { rule } => rule,
    };
    // A name is believed only for an address it resolves to.
    if let Some(n) = &name {
        if !net.resolved_to(n, dst.ip()) {
            let fresh = gw
                .lookup(&net, n, hickory_proto::rr::RecordType::A)
                .await
                .map(|a| a.addrs.contains(&dst.ip()));
            if !matches!(fresh, Ok(true)) {
                event.reason = match fresh {
                    Err(e) => format!("could not resolve {n} to check the address: {e}"),
                    _ => format!(
                        "the connection names {n} but goes to {}, which is not an address of {n} (domain fronting)",
                        dst.ip()
                    ),
                };
                return refuse(&gw, &net, conn, event, http.then_some(403)).await;
            }
        }
    }
    let upstream = match gw.dial(dst).await {
        Ok(u) => u,
        Err(e) => {
            event.reason = format!("allowed by {rule}, but the dial failed: {e}");
            return refuse(&gw, &net, conn, event, http.then_some(502)).await;
        }
    };
    event.allowed = true;
    event.reason = format!("allowed by {rule}");
    let secrets = match (&hello, &name) {
        (Hello::Tls { .. }, Some(host)) => net.secrets_for(host),
        _ => Vec::new(),
    };
    match (secrets.is_empty(), net.ca(), &name) {
        (false, Some(ca), Some(host)) => {
            let tls = match gw.upstream_tls() {
                Ok(t) => t,
                Err(e) => {
                    event.allowed = false;
                    event.reason = format!("allowed by {rule}, but {e}");
                    return refuse(&gw, &net, conn, event, None).await;
                }
            };
            let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
            event.reason = format!("{}; secrets {names:?} injected", event.reason);
            gw.report(event);
            let client = crate::secrets::Prefixed::new(first, conn);
            if let Err(e) =
                crate::secrets::intercept(&ca, host, &secrets, client, upstream, tls).await
            {
                tracing::info!(sandbox = %net.id, host, "intercepted connection ended: {e}");
            }
        }
        _ => {
            gw.report(event);
            relay(&net, conn, upstream, first).await;
        }
    }
}

struct OpenGuard<'a>(&'a SandboxNet);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends a refused connection: an HTTP client gets a status line saying why (it is the only
/// kind that can show it); anything else is reset.
async fn refuse(
    gw: &Gateway,
    net: &SandboxNet,
    mut conn: TcpStream,
    event: EgressEvent,
    http_status: Option<u16>,
) {
    net.counters.refused.fetch_add(1, Ordering::Relaxed);
    if let Some(status) = http_status {
        let body = format!("thaw egress refused: {}\n", event.reason);
        let reason = if status == 403 {
            "Forbidden"
        } else {
            "Bad Gateway"
        };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
    } else {
        // A reset, not a clean close: the client sees the refusal at once. Zero linger makes
        // close send RST without blocking.
        let zero = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::Linger, &zero);
    }
    gw.report(event);
}

/// Copies both ways until both sides are done, counting bytes and holding to the sandbox's
/// bandwidth.
async fn relay(net: &SandboxNet, client: TcpStream, upstream: TcpStream, first: Vec<u8>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        if !first.is_empty() {
            net.up.take(first.len()).await;
            uw.write_all(&first).await?;
            net.counters
                .tx
                .fetch_add(first.len() as u64, Ordering::Relaxed);
        }
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                uw.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            net.up.take(n).await;
            uw.write_all(&buf[..n]).await?;
            net.counters.tx.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = ur.read(&mut buf).await?;
            if n == 0 {
                cw.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            net.down.take(n).await;
            cw.write_all(&buf[..n]).await?;
            net.counters.rx.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let _ = tokio::join!(up, down);
}
