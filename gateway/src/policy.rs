//! What a sandbox may reach: `allow_out` and `deny_out`, parsed once and matched per
//! connection and per DNS question.
//!
//! The semantics follow E2B's `network.allowOut`/`denyOut`, so that an E2B-compatible API
//! maps onto them, made precise where E2B's documentation is not:
//!
//! - **Deny by default.** Nothing matches, nothing passes.
//! - **A named domain wins over every CIDR.** A connection whose TLS SNI or HTTP `Host`
//!   names an allowed domain passes even when its address falls in a `deny_out` range (the
//!   proxy then checks that the address is one the name really resolves to: no fronting).
//! - **For addresses, the most specific rule wins**, and a deny wins a tie: `allow 0.0.0.0/0`
//!   with `deny 203.0.113.0/24` keeps that /24 out; `deny 10.0.0.0/8` with
//!   `allow 10.1.2.3` lets that one host in.
//! - **Special addresses stay closed unless named.** Private, loopback, link-local (the
//!   cloud metadata service at 169.254.169.254 and `fd00:ec2::254` included), CGNAT,
//!   multicast and reserved ranges are refused even when a broad rule covers them. Only an
//!   allowed IP or CIDR lying inside such a range opens it (`allow 10.0.0.0/8` does;
//!   `allow 0.0.0.0/0` and a domain that resolves there do not), so a DNS answer can never
//!   turn an allowed name into a door to the host's network (DNS rebinding).
//! - `*` alone allows every domain name (and makes the resolver answer every name): the
//!   open internet, still without the special ranges. `*.example.com` matches names below
//!   `example.com`, not `example.com` itself, as in a TLS certificate.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Longest allowlist accepted: one sandbox's rules are matched per connection.
pub const MAX_ENTRIES: usize = 256;

/// Why an allowlist entry was refused; names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("network entry {entry:?} in {list}: {why}")]
    Entry {
        list: &'static str,
        entry: String,
        why: String,
    },
    #[error("{list} has {n} entries; at most {MAX_ENTRIES} are accepted")]
    TooMany { list: &'static str, n: usize },
}

/// Ports an entry applies to, inclusive. `None` in a rule means every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// What an entry matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every domain name (`*`).
    AnyDomain,
    /// One name, lowercase, without a trailing dot.
    Domain(String),
    /// Names strictly below this suffix (`*.example.com` stores `example.com`).
    Wildcard(String),
    /// An address or a range (a single address is a /32 or /128).
    Net(IpNet),
}

/// One parsed entry of `allow_out` or `deny_out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    pub ports: Option<Ports>,
    /// The entry as written, for messages and audit records.
    pub text: String,
}

impl Rule {
    fn port_ok(&self, port: u16) -> bool {
        self.ports.is_none_or(|p| p.contains(port))
    }

    fn names(&self, name: &str) -> bool {
        match &self.target {
            Target::AnyDomain => true,
            Target::Domain(d) => d == name,
            Target::Wildcard(suffix) => below(name, suffix),
            Target::Net(_) => false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A sandbox's egress rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

/// The outcome of matching one connection or question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by the rule named (its text).
    Allow { rule: String },
    /// Refused, and why, in words fit for an error message or an audit record.
    Deny { why: String },
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

impl Policy {
    /// Parses both lists; the first bad entry is named in the error.
    pub fn parse<A: AsRef<str>, D: AsRef<str>>(
        allow_out: &[A],
        deny_out: &[D],
    ) -> Result<Policy, PolicyError> {
        for (list, n) in [("allow_out", allow_out.len()), ("deny_out", deny_out.len())] {
            if n > MAX_ENTRIES {
                return Err(PolicyError::TooMany { list, n });
            }
        }
        let allow = allow_out
            .iter()
            .map(|e| parse_entry("allow_out", e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let deny = deny_out
            .iter()
            .map(|e| {
                let r = parse_entry("deny_out", e.as_ref())?;
                match r.target {
                    Target::Net(_) => Ok(r),
                    _ => Err(PolicyError::Entry {
                        list: "deny_out",
                        entry: e.as_ref().to_string(),
                        why: "deny_out takes IP addresses and CIDRs; to keep a domain out, leave it off allow_out".into(),
                    }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { allow, deny })
    }

    /// Whether nothing at all is allowed (the sandbox then needs no wiring).
    pub fn is_closed(&self) -> bool {
        self.allow.is_empty()
    }

    /// This policy widened by another's grants (template, then session, then call).
    pub fn union(&self, other: &Policy) -> Policy {
        let mut p = self.clone();
        for r in &other.allow {
            if !p.allow.contains(r) {
                p.allow.push(r.clone());
            }
        }
        for r in &other.deny {
            if !p.deny.contains(r) {
                p.deny.push(r.clone());
            }
        }
        p
    }

    /// The entries as written, for records and listings.
    pub fn allow_texts(&self) -> Vec<String> {
        self.allow.iter().map(|r| r.text.clone()).collect()
    }

    pub fn deny_texts(&self) -> Vec<String> {
        self.deny.iter().map(|r| r.text.clone()).collect()
    }

    /// Whether the resolver may answer a question for `name` (any port).
    pub fn resolves(&self, name: &str) -> Verdict {
        let name = normalize_name(name);
        match self.allow.iter().find(|r| r.names(&name)) {
            Some(r) => Verdict::Allow {
                rule: r.text.clone(),
            },
            None => Verdict::Deny {
                why: format!("{name} is not in allow_out"),
            },
        }
    }

    /// Whether a connection may go to `ip:port`, the name it gave (TLS SNI, HTTP Host)
    /// already checked to resolve to `ip` by the caller when `name` is `Some`.
    pub fn connect(&self, name: Option<&str>, ip: IpAddr, port: u16) -> Verdict {
        let ip = canonical(ip);
        let by_name = name.and_then(|n| {
            let n = normalize_name(n);
            self.allow.iter().find(|r| r.port_ok(port) && r.names(&n))
        });
        let verdict = match by_name {
            Some(r) => Verdict::Allow {
                rule: r.text.clone(),
            },
            None => self.by_address(ip, port, name),
        };
        match verdict {
            Verdict::Allow { rule } => match special_range(ip) {
                Some(range) if !self.names_special(ip, port, range) => Verdict::Deny {
                    why: format!(
                        "{ip} is in {range}, a private or reserved range; only an allow_out CIDR inside it opens it"
                    ),
                },
                _ => Verdict::Allow { rule },
            },
            deny => deny,
        }
    }

    fn by_address(&self, ip: IpAddr, port: u16, name: Option<&str>) -> Verdict {
        fn best(rules: &[Rule], ip: IpAddr, port: u16) -> Option<(u8, &Rule)> {
            rules
                .iter()
                .filter(|r| r.port_ok(port))
                .filter_map(|r| match &r.target {
                    Target::Net(n) if n.contains(&ip) => Some((n.prefix_len(), r)),
                    _ => None,
                })
                .max_by_key(|(len, _)| *len)
        }
        let what = match name {
            Some(n) => format!("{n} ({ip}) port {port}"),
            None => format!("{ip} port {port}"),
        };
        match (best(&self.allow, ip, port), best(&self.deny, ip, port)) {
            (Some((a, r)), d) if d.is_none_or(|(d, _)| a > d) => Verdict::Allow {
                rule: r.text.clone(),
            },
            (_, Some((_, r))) => Verdict::Deny {
                why: format!("{what} is in deny_out ({r})"),
            },
            _ => Verdict::Deny {
                why: format!("{what} is not in allow_out"),
            },
        }
    }

    /// Whether an allowed IP/CIDR inside the special `range` covers `ip`.
    fn names_special(&self, ip: IpAddr, port: u16, range: IpNet) -> bool {
        self.allow.iter().any(|r| match &r.target {
            Target::Net(n) => r.port_ok(port) && n.contains(&ip) && range.contains(n),
            _ => false,
        })
    }
}

/// Whether `name` is strictly below `suffix` (`a.example.com` is below `example.com`;
/// `example.com` and `badexample.com` are not): what `*.example.com` matches.
pub fn below(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix)
        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
}

/// Lowercase, no trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// IPv4-mapped IPv6 addresses are matched as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

const SPECIAL: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// The private or reserved range `ip` is in, if any.
pub fn special_range(ip: IpAddr) -> Option<IpNet> {
    let ip = canonical(ip);
    SPECIAL
        .iter()
        .filter_map(|s| IpNet::from_str(s).ok())
        .find(|n| n.contains(&ip))
}

fn parse_entry(list: &'static str, entry: &str) -> Result<Rule, PolicyError> {
    let bad = |why: &str| PolicyError::Entry {
        list,
        entry: entry.to_string(),
        why: why.to_string(),
    };
    let text = entry.trim();
    if text.is_empty() {
        return Err(bad("empty entry"));
    }
    if text.len() > 300 {
        return Err(bad("longer than 300 characters"));
    }
    // `[v6]:port`, `[v6/len]:port`, `v4:port`, `v4/len:port`, `name:port`; a bare IPv6
    // address or range has several colons and no port.
    let (host, ports) = if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("an opening [ without its ]"))?;
        let ports = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("expected :PORT after ]"))?,
            ),
        };
        (inner, ports)
    } else if text.matches(':').count() == 1 {
        let (h, p) = text.split_once(':').ok_or_else(|| bad("port"))?;
        (h, Some(p))
    } else {
        (text, None)
    };
    let ports = ports
        .map(|p| parse_ports(p).map_err(|why| bad(&why)))
        .transpose()?;
    let target = if host == "*" {
        Target::AnyDomain
    } else if let Ok(ip) = IpAddr::from_str(host) {
        Target::Net(IpNet::from(canonical(ip)))
    } else if let Ok(net) = IpNet::from_str(host) {
        if net != net.trunc() {
            return Err(bad(&format!(
                "host bits are set in the CIDR; did you mean {}?",
                net.trunc()
            )));
        }
        Target::Net(net)
    } else if let Some(suffix) = host.strip_prefix("*.") {
        Target::Wildcard(valid_domain(suffix).map_err(|why| bad(&why))?)
    } else if host.contains('/') || host.contains('*') {
        return Err(bad(
            "not a domain, IP address or CIDR (a wildcard is written *.example.com)",
        ));
    } else {
        Target::Domain(valid_domain(host).map_err(|why| bad(&why))?)
    };
    Ok(Rule {
        target,
        ports,
        text: text.to_string(),
    })
}

fn parse_ports(p: &str) -> Result<Ports, String> {
    let one = |s: &str| match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
        Ok(n) => Ok(n),
    };
    let (first, last) = match p.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => (one(p)?, one(p)?),
    };
    if first > last {
        return Err(format!("port range {first}-{last} is empty"));
    }
    Ok(Ports { first, last })
}

fn valid_domain(d: &str) -> Result<String, String> {
    let d = normalize_name(d);
    if d.is_empty() || d.len() > 253 {
        return Err("a domain name has 1 to 253 characters".into());
    }
    for label in d.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!(
                "{label:?} is not a DNS label (letters, digits, - and _, 1 to 63 characters)"
            ));
        }
    }
    if d.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("looks like an IPv4 address but is not one".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(allow: &[&str], deny: &[&str]) -> Policy {
        Policy::parse(allow, deny).unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_by_default() {
        let pol = p(&[], &[]);
        assert!(pol.is_closed());
        assert!(!pol.connect(None, ip("203.0.113.5"), 443).allowed());
        assert!(!pol.resolves("example.com").allowed());
    }

    #[test]
    fn domains_exact_and_wildcard_with_ports() {
        let pol = p(&["example.com:443", "*.pypi.org"], &[]);
        assert!(pol.resolves("EXAMPLE.com.").allowed());
        assert!(pol
            .connect(Some("example.com"), ip("203.0.113.5"), 443)
            .allowed());
        assert!(!pol
            .connect(Some("example.com"), ip("203.0.113.5"), 80)
            .allowed());
        assert!(pol
            .connect(Some("files.pypi.org"), ip("203.0.113.5"), 80)
            .allowed());
        assert!(
            !pol.resolves("pypi.org").allowed(),
            "a wildcard is below its suffix only"
        );
        assert!(!pol.resolves("evilpypi.org").allowed());
        // A name does not carry over to a raw connection to the same address.
        assert!(!pol.connect(None, ip("203.0.113.5"), 443).allowed());
    }

    #[test]
    fn the_most_specific_address_rule_wins_and_deny_wins_ties() {
        let pol = p(&["0.0.0.0/0", "198.51.100.7"], &["198.51.100.0/24"]);
        assert!(pol.connect(None, ip("203.0.113.5"), 1).allowed());
        assert!(!pol.connect(None, ip("198.51.100.8"), 1).allowed());
        assert!(pol.connect(None, ip("198.51.100.7"), 1).allowed());
        let tie = p(&["198.51.100.0/24"], &["198.51.100.0/24"]);
        assert!(!tie.connect(None, ip("198.51.100.1"), 1).allowed());
    }

    #[test]
    fn a_named_domain_wins_over_a_deny() {
        let pol = p(&["api.example.com"], &["0.0.0.0/0"]);
        assert!(pol
            .connect(Some("api.example.com"), ip("203.0.113.9"), 443)
            .allowed());
        assert!(!pol.connect(None, ip("203.0.113.9"), 443).allowed());
    }

    #[test]
    fn special_ranges_open_only_when_a_cidr_inside_names_them() {
        let open = p(&["*", "0.0.0.0/0"], &[]);
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "192.168.1.1",
            "100.64.0.1",
            "::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
        ] {
            assert!(!open.connect(None, ip(a), 80).allowed(), "{a}");
            assert!(
                !open
                    .connect(Some("rebind.example.com"), ip(a), 80)
                    .allowed(),
                "{a}"
            );
        }
        let named = p(&["10.0.0.0/8:5432", "169.254.169.254"], &[]);
        assert!(named.connect(None, ip("10.9.9.9"), 5432).allowed());
        assert!(!named.connect(None, ip("10.9.9.9"), 22).allowed());
        assert!(named.connect(None, ip("169.254.169.254"), 80).allowed());
    }

    #[test]
    fn bad_entries_are_named() {
        for (allow, deny, want) in [
            (vec!["exa mple.com"], vec![], "exa mple.com"),
            (vec!["example.com:0"], vec![], "not a port"),
            (vec!["example.com:99999"], vec![], "not a port"),
            (vec!["10.0.0.1/8"], vec![], "did you mean 10.0.0.0/8"),
            (vec!["**.example.com"], vec![], "**.example.com"),
            (vec!["[::1"], vec![], "without its ]"),
            (vec![""], vec![], "empty"),
            (vec![], vec!["example.com"], "deny_out takes IP"),
            (vec!["a.com:9-3"], vec![], "empty"),
        ] {
            let e = Policy::parse(&allow, &deny).unwrap_err().to_string();
            assert!(e.contains(want), "{allow:?} {deny:?}: {e}");
        }
        let ok = Policy::parse(
            &[
                "[2001:db8::1]:443",
                "2001:db8::/32",
                "x_y.internal:8000-8100",
            ],
            &[] as &[&str],
        );
        assert!(ok.is_ok(), "{ok:?}");
    }
}
