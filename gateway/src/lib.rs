//! thaw's egress gateway: the only way out of a sandbox.
//!
//! A sandbox's network namespace holds nothing but loopback. When the sandbox is granted
//! egress, the gateway wires that namespace ([`netns::wire`]): every address routes to
//! loopback, outbound TCP is redirected to a listener the host owns inside the namespace, and
//! DNS to a resolver the host owns there. The host's side then decides per connection:
//!
//! 1. the destination the sandbox asked for (`SO_ORIGINAL_DST`);
//! 2. the name it gave, from its first bytes ([`sniff`]: TLS SNI or HTTP `Host`);
//! 3. a named connection goes through only to an address that name really resolves to (from
//!    the sandbox's own lookups or a fresh one): no domain fronting;
//! 4. the [`policy::Policy`] (template, session and call grants combined);
//! 5. the dial, from the egress namespace (the host's, or one given to `thaw serve`), to the
//!    address checked, with the sandbox's connection and bandwidth limits.
//!
//! Every decision is reported to an [`EgressObserver`] (the engine's audit log).

pub mod bench;
pub mod dns;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod secrets;
pub mod sniff;
pub mod xtables;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use policy::{Policy, PolicyError, Verdict};

/// The proxy's port inside every sandbox (below 1024: no sandbox process can squat it).
pub const PROXY_PORT: u16 = 997;
/// The resolver's port inside every sandbox.
pub const DNS_PORT: u16 = 53;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("egress gateway: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("egress gateway: wiring the sandbox's network: {0}")]
    Wiring(String),
    #[error("egress gateway: upstream DNS: {0}")]
    Upstream(String),
}

impl GatewayError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> GatewayError {
        GatewayError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Where the gateway's own traffic goes out.
#[derive(Debug)]
pub struct Config {
    /// The resolver asked for allowed names.
    pub upstream_dns: SocketAddr,
    /// The namespace outbound sockets are made in (`None`: the host's own).
    pub egress_netns: Option<OwnedFd>,
}

impl Config {
    /// The first `nameserver` of the host's `/etc/resolv.conf`, port 53; 127.0.0.53 if none.
    pub fn host_resolver() -> SocketAddr {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|v| v.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .next()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 53], 53)))
    }
}

/// Limits a template sets on one sandbox's egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Connections open at once (0: the default, 64).
    pub max_connections: u32,
    /// Bytes per second each way, all connections together (0: unlimited).
    pub bandwidth_bytes_per_s: u64,
}

impl Limits {
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;

    fn connections(&self) -> u64 {
        u64::from(if self.max_connections == 0 {
            Self::DEFAULT_MAX_CONNECTIONS
        } else {
            self.max_connections
        })
    }
}

/// One egress decision, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressEvent {
    pub sandbox: String,
    /// `tcp` or `dns`.
    pub kind: &'static str,
    /// The name asked for or sniffed, if any.
    pub name: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub allowed: bool,
    /// The allowing rule, or why it was refused.
    pub reason: String,
}

/// Receives every decision (the engine forwards them to its audit log and tracing).
pub trait EgressObserver: Send + Sync {
    fn egress(&self, event: &EgressEvent);
}

/// Per-sandbox traffic figures, read by `thaw ps` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetFigures {
    /// Bytes from the outside to the sandbox.
    pub rx_bytes: u64,
    /// Bytes from the sandbox to the outside.
    pub tx_bytes: u64,
    pub connections_open: u64,
    pub connections_total: u64,
    pub refused: u64,
}

#[derive(Default)]
struct Counters {
    rx: AtomicU64,
    tx: AtomicU64,
    open: AtomicU64,
    total: AtomicU64,
    refused: AtomicU64,
}

/// A token bucket shared by all of a sandbox's connections, one per direction.
pub(crate) struct Bucket {
    rate: u64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate,
            state: tokio::sync::Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// Waits until `n` bytes may pass. A burst of at most one second's worth.
    pub(crate) async fn take(&self, n: usize) {
        if self.rate == 0 {
            return;
        }
        let mut s = self.state.lock().await;
        let now = Instant::now();
        let rate = self.rate as f64;
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate).min(rate);
        s.1 = now;
        s.0 -= n as f64;
        if s.0 < 0.0 {
            // Holding the lock while waiting queues the other connections behind this one:
            // the bucket's rate is the sandbox's, not each connection's.
            tokio::time::sleep(Duration::from_secs_f64(-s.0 / rate)).await;
        }
    }
}

/// Names the sandbox resolved through its resolver, with the addresses it was given.
#[derive(Default)]
struct Resolved {
    by_name: HashMap<String, (Vec<IpAddr>, Instant)>,
}

/// Secrets granted to one call: withdrawn when dropped.
pub struct SecretGrant {
    net: Arc<SandboxNet>,
    id: u64,
}

impl Drop for SecretGrant {
    fn drop(&mut self) {
        if let Ok(mut g) = self.net.secrets.lock() {
            g.retain(|(id, _)| *id != self.id);
        }
    }
}

/// A grant for one call: widens the policy until dropped.
pub struct CallGrant {
    net: Arc<SandboxNet>,
    id: u64,
}

impl Drop for CallGrant {
    fn drop(&mut self) {
        if let Ok(mut g) = self.net.grants.lock() {
            g.retain(|(id, _)| *id != self.id);
        }
    }
}

/// The gateway's state for one wired sandbox.
pub struct SandboxNet {
    id: String,
    base: Mutex<Policy>,
    grants: Mutex<Vec<(u64, Policy)>>,
    next_grant: AtomicU64,
    limits: Limits,
    counters: Counters,
    resolved: Mutex<Resolved>,
    pub(crate) up: Bucket,
    pub(crate) down: Bucket,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Secrets granted (id 0: the sandbox's own; others: calls'), and the CA made for
    /// them on first use.
    secrets: Mutex<Vec<(u64, Vec<secrets::Secret>)>>,
    ca: std::sync::OnceLock<Arc<secrets::Ca>>,
}

impl SandboxNet {
    /// The policy in force now: the base and every live call grant.
    pub fn policy(&self) -> Policy {
        let base = self.base.lock().map(|p| p.clone()).unwrap_or_default();
        match self.grants.lock() {
            Ok(g) => g.iter().fold(base, |acc, (_, p)| acc.union(p)),
            Err(_) => base,
        }
    }

    /// The secrets whose values requests to `host` get.
    pub(crate) fn secrets_for(&self, host: &str) -> Vec<secrets::Secret> {
        self.secrets
            .lock()
            .map(|g| {
                g.iter()
                    .flat_map(|(_, v)| v.iter())
                    .filter(|s| s.for_host(host))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn ca(&self) -> Option<Arc<secrets::Ca>> {
        self.ca.get().cloned()
    }

    fn remember(&self, name: &str, addrs: &[IpAddr], ttl: u32) {
        // At least a minute: clients cache answers longer than their TTL, and a connection
        // made from a cached answer must still pass. At most a day.
        let keep = Duration::from_secs(u64::from(ttl).clamp(60, 86_400));
        if let Ok(mut r) = self.resolved.lock() {
            if r.by_name.len() > 4096 {
                let now = Instant::now();
                r.by_name.retain(|_, (_, until)| *until > now);
            }
            let entry = r
                .by_name
                .entry(name.to_string())
                .or_insert_with(|| (Vec::new(), Instant::now()));
            for a in addrs {
                if !entry.0.contains(a) {
                    entry.0.push(*a);
                }
            }
            entry.1 = entry.1.max(Instant::now() + keep);
        }
    }

    fn resolved_to(&self, name: &str, ip: IpAddr) -> bool {
        self.resolved.lock().is_ok_and(|r| {
            r.by_name
                .get(name)
                .is_some_and(|(ips, until)| *until > Instant::now() && ips.contains(&ip))
        })
    }

    pub fn figures(&self) -> NetFigures {
        let c = &self.counters;
        NetFigures {
            rx_bytes: c.rx.load(Ordering::Relaxed),
            tx_bytes: c.tx.load(Ordering::Relaxed),
            connections_open: c.open.load(Ordering::Relaxed),
            connections_total: c.total.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
    }
}

/// The gateway: one per engine, serving every wired sandbox.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    observer: Arc<dyn EgressObserver>,
    sandboxes: Mutex<HashMap<String, Arc<SandboxNet>>>,
    upstream_tls: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
}

impl Gateway {
    pub fn new(config: Config, observer: Arc<dyn EgressObserver>) -> Gateway {
        Gateway {
            inner: Arc::new(Inner {
                config,
                observer,
                sandboxes: Mutex::new(HashMap::new()),
                upstream_tls: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Wires `sandbox`'s namespace and starts serving it under `policy`. Attaching a sandbox
    /// already attached replaces its policy and keeps its listeners.
    pub async fn attach(
        &self,
        sandbox: &str,
        netns: BorrowedFd<'_>,
        link: netns::Link,
        policy: Policy,
        limits: Limits,
    ) -> Result<Arc<SandboxNet>, GatewayError> {
        if let Some(net) = self.get(sandbox) {
            if let Ok(mut b) = net.base.lock() {
                *b = policy;
            }
            return Ok(net);
        }
        let span = tracing::info_span!("egress_attach", sandbox);
        let _g = span.enter();
        let started = Instant::now();
        let ns = netns
            .try_clone_to_owned()
            .map_err(|e| GatewayError::io("dup of the sandbox's namespace", e))?;
        let listeners = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsFd;
            netns::wire(ns.as_fd(), link, PROXY_PORT, DNS_PORT)
        })
        .await
        .map_err(|e| GatewayError::Wiring(format!("wiring task: {e}")))??;
        let net = Arc::new(SandboxNet {
            id: sandbox.to_string(),
            base: Mutex::new(policy),
            grants: Mutex::new(Vec::new()),
            next_grant: AtomicU64::new(1),
            limits,
            counters: Counters::default(),
            resolved: Mutex::new(Resolved::default()),
            up: Bucket::new(limits.bandwidth_bytes_per_s),
            down: Bucket::new(limits.bandwidth_bytes_per_s),
            tasks: Mutex::new(Vec::new()),
            secrets: Mutex::new(Vec::new()),
            ca: std::sync::OnceLock::new(),
        });
        let proxy = tokio::net::TcpListener::from_std(listeners.proxy)
            .map_err(|e| GatewayError::io("proxy listener", e))?;
        let dns = tokio::net::UdpSocket::from_std(listeners.dns)
            .map_err(|e| GatewayError::io("resolver socket", e))?;
        let t1 = tokio::spawn(proxy::serve(self.clone(), net.clone(), proxy));
        let t2 = tokio::spawn(serve_dns(self.clone(), net.clone(), dns));
        if let Ok(mut t) = net.tasks.lock() {
            t.push(t1.abort_handle());
            t.push(t2.abort_handle());
        }
        if let Ok(mut m) = self.inner.sandboxes.lock() {
            m.insert(sandbox.to_string(), net.clone());
        }
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "egress wired"
        );
        Ok(net)
    }

    /// Stops serving `sandbox` (its connections end with it).
    pub fn detach(&self, sandbox: &str) {
        let net = self
            .inner
            .sandboxes
            .lock()
            .ok()
            .and_then(|mut m| m.remove(sandbox));
        if let Some(net) = net {
            if let Ok(t) = net.tasks.lock() {
                for h in t.iter() {
                    h.abort();
                }
            }
        }
    }

    pub fn get(&self, sandbox: &str) -> Option<Arc<SandboxNet>> {
        self.inner.sandboxes.lock().ok()?.get(sandbox).cloned()
    }

    /// Widens `sandbox`'s policy by `policy` until the returned grant is dropped.
    pub fn grant(&self, sandbox: &str, policy: Policy) -> Option<CallGrant> {
        let net = self.get(sandbox)?;
        let id = net.next_grant.fetch_add(1, Ordering::Relaxed);
        net.grants.lock().ok()?.push((id, policy));
        Some(CallGrant { net, id })
    }

    /// Grants `secrets` to a wired sandbox until the guard is dropped (a call's), or for
    /// good (`keep`: the sandbox's own). Returns the PEM of the sandbox's CA, which its trust
    /// bundle must hold.
    pub fn add_secrets(
        &self,
        sandbox: &str,
        secrets: Vec<secrets::Secret>,
        keep: bool,
    ) -> Result<(String, Option<SecretGrant>), GatewayError> {
        let net = self
            .get(sandbox)
            .ok_or_else(|| GatewayError::Wiring(format!("{sandbox} is not wired")))?;
        let ca = match net.ca.get() {
            Some(ca) => ca.clone(),
            None => {
                let ca = Arc::new(secrets::Ca::new(sandbox)?);
                net.ca.get_or_init(|| ca).clone()
            }
        };
        let id = if keep {
            0
        } else {
            net.next_grant.fetch_add(1, Ordering::Relaxed)
        };
        if let Ok(mut g) = net.secrets.lock() {
            if keep {
                g.retain(|(i, _)| *i != 0);
            }
            g.push((id, secrets));
        }
        let guard = (!keep).then(|| SecretGrant {
            net: net.clone(),
            id,
        });
        Ok((ca.pem(), guard))
    }

    /// The TLS client configuration for servers the proxy injects secrets for.
    pub(crate) fn upstream_tls(&self) -> Result<Arc<rustls::ClientConfig>, GatewayError> {
        if let Some(c) = self.inner.upstream_tls.get() {
            return Ok(c.clone());
        }
        let c = secrets::upstream_client()?;
        Ok(self.inner.upstream_tls.get_or_init(|| c).clone())
    }

    pub fn figures(&self, sandbox: &str) -> Option<NetFigures> {
        self.get(sandbox).map(|n| n.figures())
    }

    fn report(&self, event: EgressEvent) {
        if event.allowed {
            tracing::debug!(?event, "egress allowed");
        } else {
            tracing::info!(?event, "egress refused");
        }
        self.inner.observer.egress(&event);
    }

    /// A connected socket to `addr`, made in the egress namespace.
    pub(crate) async fn dial(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let ns = self.inner.config.egress_netns.as_ref();
        let fd = if ns.is_some() {
            let ns = ns.map(|n| n.try_clone()).transpose()?;
            tokio::task::spawn_blocking(move || netns::tcp_socket_in(ns.as_ref(), addr))
                .await
                .map_err(std::io::Error::other)?
        } else {
            netns::tcp_socket_in(None, addr)
        }
        .map_err(std::io::Error::other)?;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }

    /// Resolves `name` upstream (A records), filtered, and remembers the answer for `net`.
    pub(crate) async fn lookup(
        &self,
        net: &SandboxNet,
        name: &str,
        qtype: hickory_proto::rr::RecordType,
    ) -> Result<dns::Answer, GatewayError> {
        let upstream = self.inner.config.upstream_dns;
        let ns = self
            .inner
            .config
            .egress_netns
            .as_ref()
            .map(|n| n.try_clone())
            .transpose()
            .map_err(|e| GatewayError::io("dup of the egress namespace", e))?;
        let socket =
            tokio::task::spawn_blocking(move || netns::udp_socket_in(ns.as_ref(), upstream))
                .await
                .map_err(|e| GatewayError::Wiring(format!("socket task: {e}")))??;
        let answer = dns::ask(socket, upstream, name, qtype).await?;
        if !answer.addrs.is_empty() {
            net.remember(name, &answer.addrs, answer.ttl);
        }
        Ok(answer)
    }
}

/// Questions one sandbox may have in flight at once; more are dropped (a resolver under a
/// flood answers what it can, as any does), so a sandbox cannot make the host run
/// unbounded tasks and upstream sockets.
const DNS_IN_FLIGHT: usize = 32;

/// Answers the sandbox's DNS questions, one task per question so a slow upstream does not
/// hold the others.
async fn serve_dns(gw: Gateway, net: Arc<SandboxNet>, socket: tokio::net::UdpSocket) {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RecordType;
    let socket = Arc::new(socket);
    let slots = Arc::new(tokio::sync::Semaphore::new(DNS_IN_FLIGHT));
    let mut buf = vec![0u8; dns::MAX_UDP];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let Some(q) = dns::parse_question(&buf[..n]) else {
            continue;
        };
        let (gw, net, socket) = (gw.clone(), net.clone(), socket.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let verdict = net.policy().resolves(&q.name);
            let event = |allowed: bool, reason: String| EgressEvent {
                sandbox: net.id.clone(),
                kind: "dns",
                name: Some(q.name.clone()),
                ip: None,
                port: DNS_PORT,
                allowed,
                reason,
            };
            let out = match verdict {
                Verdict::Deny { why } => {
                    net.counters.refused.fetch_add(1, Ordering::Relaxed);
                    gw.report(event(false, why));
                    dns::reply(&q, ResponseCode::NXDomain, Vec::new())
                }
                Verdict::Allow { .. } if q.qtype == RecordType::AAAA => {
                    dns::reply(&q, ResponseCode::NoError, Vec::new())
                }
                Verdict::Allow { rule } => match gw.lookup(&net, &q.name, q.qtype).await {
                    Ok(a) => {
                        let mut reason = format!("allowed by {rule}");
                        if !a.withheld.is_empty() {
                            reason = format!(
                                "{reason}; withheld private or reserved answers {:?} (rebinding)",
                                a.withheld
                            );
                        }
                        gw.report(event(true, reason));
                        let code = ResponseCode::from(0, (a.code & 0xf) as u8);
                        dns::reply(&q, code, a.records)
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %net.id, name = %q.name, "{e}");
                        dns::reply(&q, ResponseCode::ServFail, Vec::new())
                    }
                },
            };
            let _ = socket.send_to(&out, from).await;
        });
    }
}
