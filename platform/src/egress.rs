//! The engine's side of the egress gateway ([`thaw_gateway`]): which sandboxes get a
//! network, under which rules, and what becomes of each decision.
//!
//! A sandbox is wired only when something grants it egress (its template's `[network]`, its
//! session's or its call's `allow_out`): a sandbox with no grant keeps a namespace with
//! loopback alone, and pays nothing. The grant in force is the union of the three; a call's
//! part lasts as long as the call ([`thaw_gateway::CallGrant`]).
//!
//! Both tiers are wired the same way from the host's side: a container's namespace is the
//! one its processes live in; a microvm's is its VMM's, where the guest's virtio-net device
//! ends in a tap ([`thaw_gateway::netns::Link`]).

use std::os::fd::AsFd;
use std::sync::Arc;

use thaw_gateway::{EgressEvent, EgressObserver, Gateway, Limits, Policy};
use thaw_types::spec::{NetworkGrant, NetworkSpec};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::sandbox::Sandbox;

/// Environment variable: the resolver the gateway asks for allowed names (`IP:PORT`);
/// default, the host's first `nameserver`.
pub const UPSTREAM_DNS_ENV: &str = "THAW_UPSTREAM_DNS";
/// Environment variable: a network namespace file (`/run/netns/NAME`) the gateway's own
/// connections leave from; default, the host's namespace.
pub const EGRESS_NETNS_ENV: &str = "THAW_EGRESS_NETNS";

/// Lists that do not parse, as the error naming their field: `prefix` is where the lists
/// sit in the request or template (`""`, `"network."`, `"build."`).
pub(crate) fn bad_lists(prefix: &str, e: thaw_gateway::PolicyError) -> Error {
    let list = match &e {
        thaw_gateway::PolicyError::Entry { list, .. }
        | thaw_gateway::PolicyError::TooMany { list, .. } => *list,
    };
    Error::BadNetwork {
        path: format!("{prefix}{list}"),
        message: e.to_string(),
    }
}

fn bad_secret(message: String) -> Error {
    Error::BadNetwork {
        path: "secrets".into(),
        message,
    }
}

/// A session's or call's grant, checked before anything starts: every allow/deny entry,
/// and each secret's shape (name, value, hosts). Whether a secret's hosts are allowed is
/// checked against the sandbox's whole policy when it is wired ([`secrets_of`]).
pub fn check_grant(
    network: &NetworkGrant,
    secrets: &[thaw_types::spec::SecretGrant],
) -> Result<()> {
    grant_policy(network)?;
    for g in secrets {
        thaw_gateway::secrets::validate(&g.name, &g.value, &g.hosts).map_err(bad_secret)?;
    }
    Ok(())
}

/// A grant from a session or a call, checked.
pub fn grant_policy(g: &NetworkGrant) -> Result<Policy> {
    Policy::parse(&g.allow_out, &g.deny_out).map_err(|e| bad_lists("", e))
}

pub(crate) fn limits_of(n: &NetworkSpec) -> Limits {
    Limits {
        max_connections: n.max_connections,
        bandwidth_bytes_per_s: n.bandwidth_kib_s.saturating_mul(1024),
    }
}

/// Forwards decisions to tracing and to the audit log, as the sandbox's owner's.
struct Observer {
    audit: thaw_audit::Audit,
}

impl EgressObserver for Observer {
    fn egress(&self, e: &EgressEvent) {
        let actor = WIRED
            .lock()
            .ok()
            .and_then(|m| m.get(&e.sandbox).map(|w| w.owner.clone()))
            .unwrap_or_else(|| "unknown".into());
        let record = thaw_audit::AuditEvent::egress(
            &e.sandbox,
            &thaw_audit::Destination {
                host: e.name.clone(),
                ip: e.ip,
                port: e.port,
            },
            e.allowed,
            &e.reason,
        )
        .actor(actor);
        // A failed append puts the log in its failed state, which stops new work; the
        // connection at hand has been decided already.
        if let Err(err) = self.audit.append(&record) {
            tracing::error!(sandbox = %e.sandbox, "egress decision not audited: {err}");
        }
        tracing::info!(
            target: "thaw::egress",
            sandbox = %e.sandbox,
            kind = e.kind,
            name = e.name.as_deref().unwrap_or(""),
            ip = ?e.ip,
            port = e.port,
            allowed = e.allowed,
            reason = %e.reason,
            "egress"
        );
    }
}

/// The engine's gateway, configured from the environment; its decisions go to `audit`.
pub fn open_gateway(audit: thaw_audit::Audit) -> Result<Gateway> {
    let upstream_dns = match std::env::var(UPSTREAM_DNS_ENV) {
        Ok(v) if !v.is_empty() => v.parse().map_err(|_| Error::MissingDependency {
            what: format!("a valid {UPSTREAM_DNS_ENV} (`{v}` is not IP:PORT)"),
            fix: format!("set {UPSTREAM_DNS_ENV} to e.g. 192.0.2.53:53, or unset it"),
        })?,
        _ => thaw_gateway::Config::host_resolver(),
    };
    let egress_netns = match std::env::var(EGRESS_NETNS_ENV) {
        Ok(p) if !p.is_empty() => Some(
            std::fs::File::open(&p)
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| Error::MissingDependency {
                    what: format!("the egress network namespace {p} ({EGRESS_NETNS_ENV}): {e}"),
                    fix: format!("create it (`ip netns add`) or unset {EGRESS_NETNS_ENV}"),
                })?,
        ),
        _ => None,
    };
    Ok(Gateway::new(
        thaw_gateway::Config {
            upstream_dns,
            egress_netns,
        },
        Arc::new(Observer { audit }),
    ))
}

/// `thaw ps` and `/metrics`'s network figures, from the gateway's counters. A live sandbox
/// the gateway does not serve has no network at all: its figures are truly 0.
pub(crate) struct Counters(pub(crate) Gateway);

impl crate::live::NetCounters for Counters {
    fn get(&self, sandbox: &str) -> Option<crate::live::NetFigures> {
        let f = self.0.figures(sandbox).unwrap_or_default();
        Some(crate::live::NetFigures {
            rx_bytes: f.rx_bytes,
            tx_bytes: f.tx_bytes,
            connections_open: f.connections_open,
            connections_total: f.connections_total,
        })
    }
}

/// Which gateway serves each wired sandbox. Session calls reach a sandbox through a fresh
/// handle each time ([`crate::engine::Engine::attach`]), so the wiring cannot live in a
/// handle; it ends when the sandbox is destroyed ([`release`]), whichever handle does it.
/// Sandbox ids are unique per machine, so one map serves every engine of the process.
static WIRED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, Wired>>> =
    std::sync::LazyLock::new(Default::default);

struct Wired {
    gateway: Gateway,
    /// Whose sandbox (or build) it is: the actor of its egress audit records.
    owner: String,
}

/// Stops serving `sandbox`: its listeners, and with them the host's hold on its network
/// namespace, go. Called by [`Sandbox::destroy`].
pub(crate) fn release(sandbox: &str) {
    let w = WIRED.lock().ok().and_then(|mut m| m.remove(sandbox));
    if let Some(w) = w {
        w.gateway.detach(sandbox);
    }
}

/// A template build's network: a namespace the host makes, wired to the gateway under the
/// template's `[build] allow_out`, for runc to put the build container in. Dropped after the
/// build, which ends its wiring.
pub(crate) struct BuildNetwork {
    gateway: Gateway,
    id: String,
    ns: std::os::fd::OwnedFd,
}

impl BuildNetwork {
    /// `None` when the build is granted nothing (it keeps a loopback-only namespace).
    pub(crate) async fn open(
        gateway: &Gateway,
        owner: &str,
        id: &str,
        build: &thaw_types::spec::BuildLimits,
    ) -> Result<Option<BuildNetwork>> {
        let policy =
            Policy::parse(&build.allow_out, &build.deny_out).map_err(|e| bad_lists("build.", e))?;
        if policy.is_closed() {
            return Ok(None);
        }
        let bad = |message: String| Error::Egress {
            sandbox: id.to_string(),
            message,
        };
        let ns = tokio::task::spawn_blocking(thaw_gateway::netns::new)
            .await
            .map_err(|e| bad(format!("namespace task: {e}")))?
            .map_err(|e| bad(format!("the build's network namespace: {e}")))?;
        if let Ok(mut m) = WIRED.lock() {
            m.insert(
                id.to_string(),
                Wired {
                    gateway: gateway.clone(),
                    owner: owner.to_string(),
                },
            );
        }
        if let Err(e) = gateway
            .attach(
                id,
                ns.as_fd(),
                thaw_gateway::netns::Link::Loopback,
                policy,
                Limits::default(),
            )
            .await
        {
            release(id);
            return Err(bad(e.to_string()));
        }
        Ok(Some(BuildNetwork {
            gateway: gateway.clone(),
            id: id.to_string(),
            ns,
        }))
    }

    /// The path runc joins: this process's descriptor of the namespace.
    pub(crate) fn path(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        std::path::PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.ns.as_raw_fd()
        ))
    }
}

impl Drop for BuildNetwork {
    fn drop(&mut self) {
        self.gateway.detach(&self.id);
        if let Ok(mut m) = WIRED.lock() {
            m.remove(&self.id);
        }
    }
}

/// Checks secret grants against the policy in force and gives each a placeholder.
pub(crate) fn secrets_of(
    grants: &[thaw_types::spec::SecretGrant],
    policy: &Policy,
) -> Result<Vec<thaw_gateway::secrets::Secret>> {
    let mut out = Vec::with_capacity(grants.len());
    for g in grants {
        thaw_gateway::secrets::validate(&g.name, &g.value, &g.hosts).map_err(bad_secret)?;
        for h in &g.hosts {
            let probe = match h.strip_prefix("*.") {
                Some(suffix) => format!("x.{suffix}"),
                None => h.clone(),
            };
            if !policy.resolves(&probe).allowed() {
                return Err(bad_secret(format!(
                    "secret {} is for {h}, which allow_out does not allow: add {h} to allow_out (a secret goes only where the sandbox may go)",
                    g.name
                )));
            }
        }
        out.push(thaw_gateway::secrets::Secret::new(
            &g.name,
            &g.value,
            g.hosts.clone(),
        ));
    }
    Ok(out)
}

/// Where a sandbox with secrets finds the trust bundle that holds its CA.
pub const TRUST_BUNDLE: &str = "/etc/thaw/egress-ca-bundle.crt";

/// The environment a sandbox with secrets gets: each placeholder under its name, and the
/// usual variables pointing TLS clients at the bundle with the sandbox's CA.
pub(crate) fn secret_env(
    secrets: &[thaw_gateway::secrets::Secret],
) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::new();
    if secrets.is_empty() {
        return env;
    }
    for s in secrets {
        env.insert(s.name.clone(), s.placeholder.clone());
    }
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "PIP_CERT",
        "GIT_SSL_CAINFO",
    ] {
        env.insert(var.to_string(), TRUST_BUNDLE.to_string());
    }
    env
}

/// Hands `secrets` to the gateway for `sb` (for good, or until the returned grant drops)
/// and writes the trust bundle with the sandbox's CA into it: the sandbox's own roots (its
/// Debian bundle, if any) plus that CA, so only intercepted hosts see a thaw certificate.
pub(crate) async fn grant_secrets(
    gateway: &Gateway,
    sb: &Sandbox,
    secrets: Vec<thaw_gateway::secrets::Secret>,
    keep: bool,
) -> Result<Option<thaw_gateway::SecretGrant>> {
    use thaw_protocol::{Bytes, Request, Response};
    let (pem, grant) = gateway
        .add_secrets(&sb.id, secrets, keep)
        .map_err(|e| Error::Egress {
            sandbox: sb.id.clone(),
            message: e.to_string(),
        })?;
    // The sandbox's file, read through guest-init: its content only goes back into it.
    let mut bundle = match sb
        .agent
        .call(&Request::ReadFile {
            path: "/etc/ssl/certs/ca-certificates.crt".into(),
            max_bytes: Some(4 << 20),
        })
        .await
    {
        Ok(Response::FileData { data, .. }) => data.0,
        _ => Vec::new(),
    };
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(pem.as_bytes());
    sb.agent
        .call(&Request::WriteFile {
            path: TRUST_BUNDLE.into(),
            data: Bytes(bundle),
            mode: Some(0o644),
            append: false,
        })
        .await?;
    Ok(grant)
}

/// Wires `sb` under `policy` (its template's, session's and call's grants together) if
/// the policy allows anything; a sandbox already wired gets the new policy.
pub(crate) async fn open(
    gateway: &Gateway,
    owner: &str,
    sb: &Sandbox,
    policy: Policy,
    limits: Limits,
) -> Result<()> {
    if policy.is_closed() && gateway.get(&sb.id).is_none() {
        return Ok(());
    }
    wire(gateway, owner, sb, policy, limits).await
}

/// Wires `sb` under `policy` even if it allows nothing yet (a session whose calls bring
/// their own grants); a sandbox already wired gets the new policy.
pub(crate) async fn wire(
    gateway: &Gateway,
    owner: &str,
    sb: &Sandbox,
    policy: Policy,
    limits: Limits,
) -> Result<()> {
    let net = sb.handle.network().ok_or_else(|| Error::Egress {
        sandbox: sb.id.clone(),
        message: format!(
            "this {} sandbox has no network of its own (its VM was started by a thaw from before microvm networking); end it and start another, and deploy its template again if it still has no network",
            sb.tier().as_str()
        ),
    })?;
    gateway
        .attach(&sb.id, net.ns.as_fd(), net.link, policy, limits)
        .instrument(tracing::info_span!("sandbox.egress", sandbox = %sb.id))
        .await
        .map_err(|e| Error::Egress {
            sandbox: sb.id.clone(),
            message: e.to_string(),
        })?;
    if let Ok(mut m) = WIRED.lock() {
        m.insert(
            sb.id.clone(),
            Wired {
                gateway: gateway.clone(),
                owner: owner.to_string(),
            },
        );
    }
    Ok(())
}
