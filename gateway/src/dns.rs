//! The resolver each sandbox talks to: it answers only names the sandbox's allowlist
//! allows, asks the upstream resolver for them from the egress namespace, and hands back
//! only addresses the sandbox could connect to.
//!
//! So DNS is not an exfiltration channel (a name outside the allowlist is answered NXDOMAIN
//! here and never leaves the host; no public resolver is reachable), and not a rebinding
//! tool (an allowed name whose answer points into a private range gets no address).
//! AAAA answers are withheld: a sandbox's egress is IPv4, and an address it cannot route
//! would only make clients wait before they fall back.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::policy::special_range;
use crate::GatewayError;

/// How long one upstream exchange may take.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// A DNS message's largest size over UDP that this resolver reads or sends.
pub const MAX_UDP: usize = 4096;

/// What the upstream resolver said about a name, filtered.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub code: u16,
    /// Records to pass to the sandbox.
    pub records: Vec<Record>,
    /// Every A address for the name (the CNAME chain followed), special ranges removed.
    pub addrs: Vec<IpAddr>,
    /// Addresses withheld because they are private or reserved.
    pub withheld: Vec<IpAddr>,
    /// Shortest TTL among the passed address records, seconds.
    pub ttl: u32,
}

/// Parses a sandbox's question: its id, name (lowercase, no trailing dot) and type.
pub struct Question {
    pub id: u16,
    pub name: String,
    pub qtype: RecordType,
    pub query: Query,
}

/// An answer to the question in `query` with one A record, `ip`, whatever the name: what a
/// test's or a benchmark's upstream resolver says. `None` for a packet that is not a query.
pub fn answer_with(query: &[u8], ip: std::net::Ipv4Addr, ttl: u32) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    let q = msg.queries().first()?.clone();
    let mut r = Message::new();
    r.set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_recursion_available(true)
        .add_query(q.clone());
    r.add_answer(Record::from_rdata(
        q.name().clone(),
        ttl,
        RData::A(hickory_proto::rr::rdata::A(ip)),
    ));
    r.to_vec().ok()
}

pub fn parse_question(packet: &[u8]) -> Option<Question> {
    let msg = Message::from_vec(packet).ok()?;
    if msg.message_type() != MessageType::Query || msg.op_code() != OpCode::Query {
        return None;
    }
    let [q] = msg.queries() else {
        return None;
    };
    Some(Question {
        id: msg.id(),
        name: crate::policy::normalize_name(&q.name().to_ascii()),
        qtype: q.query_type(),
        query: q.clone(),
    })
}

/// The reply to the sandbox: `code` with `records`.
pub fn reply(q: &Question, code: ResponseCode, records: Vec<Record>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(q.id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_recursion_available(true)
        .set_response_code(code)
        .add_query(q.query.clone());
    for r in records {
        m.add_answer(r);
    }
    m.to_vec().unwrap_or_default()
}

/// Asks `upstream` (from a socket made by `socket`) for `name`/`qtype` and filters the answer.
pub async fn ask(
    socket: std::net::UdpSocket,
    upstream: SocketAddr,
    name: &str,
    qtype: RecordType,
) -> Result<Answer, GatewayError> {
    let fqdn = Name::from_ascii(format!("{name}."))
        .map_err(|e| GatewayError::Upstream(format!("{name}: not a DNS name: {e}")))?;
    let id: u16 = rand_id();
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(fqdn, qtype));
    let bytes = m
        .to_vec()
        .map_err(|e| GatewayError::Upstream(format!("encoding the question: {e}")))?;
    let socket = tokio::net::UdpSocket::from_std(socket)
        .map_err(|e| GatewayError::io("upstream DNS socket", e))?;
    socket
        .send_to(&bytes, upstream)
        .await
        .map_err(|e| GatewayError::Upstream(format!("sending to {upstream}: {e}")))?;
    let mut buf = vec![0u8; MAX_UDP];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let (n, from) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf))
            .await
            .map_err(|_| {
                GatewayError::Upstream(format!(
                    "{upstream} did not answer within {UPSTREAM_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| GatewayError::Upstream(format!("reading from {upstream}: {e}")))?;
        // Only the resolver asked, with the id asked, is believed (no off-path spoofing by
        // anything else that can reach the egress socket).
        if from != upstream {
            continue;
        }
        let Ok(resp) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if resp.id() != id || resp.message_type() != MessageType::Response {
            continue;
        }
        return Ok(filter(&resp));
    }
}

fn filter(resp: &Message) -> Answer {
    let mut a = Answer {
        code: u16::from(resp.response_code()),
        ttl: u32::MAX,
        ..Answer::default()
    };
    for r in resp.answers() {
        match r.data() {
            RData::A(v4) => {
                let ip = IpAddr::V4(v4.0);
                if special_range(ip).is_some() {
                    a.withheld.push(ip);
                } else {
                    a.addrs.push(ip);
                    a.ttl = a.ttl.min(r.ttl());
                    a.records.push(r.clone());
                }
            }
            RData::AAAA(_) => {}
            _ => a.records.push(r.clone()),
        }
    }
    if a.ttl == u32::MAX {
        a.ttl = 0;
    }
    a
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // getrandom(2) does not fail for two bytes once the pool is ready; a zero id would
    // only weaken spoofing resistance, which the source-address check still covers.
    // SAFETY: the buffer is valid for its length.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u16::from_ne_bytes(b)
}
