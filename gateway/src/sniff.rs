//! What a connection's first bytes say about where it is going: the server name of a TLS
//! ClientHello, or the `Host` of an HTTP/1 request.
//!
//! Every length here comes from the sandbox, so every read is bounds-checked and a short or
//! malformed message is "no name", never a panic. Only the first TLS record is read: a
//! ClientHello split over several records (legal, and rare) is treated as nameless, so it is
//! judged by its address alone, which fails closed.

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A TLS ClientHello; its SNI host name if it sent one.
    Tls { sni: Option<String> },
    /// An HTTP/1 request line and headers; its `Host` without the port.
    Http { host: Option<String> },
    /// Something else, or not enough bytes yet to tell.
    Other,
}

/// Whether more bytes might change the answer for `buf` (a TLS record or HTTP header not
/// complete yet).
pub fn wants_more(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    if buf[0] == 0x16 {
        return match buf.get(3..5) {
            Some(len) => buf.len() < 5 + usize::from(u16::from_be_bytes([len[0], len[1]])),
            None => true,
        };
    }
    if looks_like_http(buf) {
        return !buf.windows(4).any(|w| w == b"\r\n\r\n");
    }
    false
}

fn looks_like_http(buf: &[u8]) -> bool {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS
        .iter()
        .any(|m| buf.starts_with(m) || (buf.len() < m.len() && m.starts_with(buf)))
}

/// Classifies the first bytes of a connection.
pub fn classify(buf: &[u8]) -> Hello {
    if buf.first() == Some(&0x16) {
        return Hello::Tls {
            sni: client_hello_sni(buf),
        };
    }
    if looks_like_http(buf) {
        return Hello::Http {
            host: http_host(buf),
        };
    }
    Hello::Other
}

fn http_host(buf: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(buf).ok()?;
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = hosts.next()?;
    // Two Host headers: which one a server believes is the server's choice; refuse to guess.
    if hosts.next().is_some() {
        return None;
    }
    let value = std::str::from_utf8(host.value).ok()?.trim();
    Some(strip_port(value).to_ascii_lowercase())
}

/// `host:port` → `host`; `[v6]:port` → `v6`.
fn strip_port(v: &str) -> &str {
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match v.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => v,
    }
}

/// A bounds-checked reader over the sandbox's bytes.
struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The host name of the `server_name` extension of a ClientHello in the first record.
fn client_hello_sni(buf: &[u8]) -> Option<String> {
    let mut rec = Cur { b: buf };
    // record: type(1)=22, version(2), length(2)
    if rec.u8()? != 0x16 {
        return None;
    }
    rec.take(2)?;
    let len = rec.u16()?;
    let mut hs = Cur { b: rec.take(len)? };
    // handshake: type(1)=1 ClientHello, length(3)
    if hs.u8()? != 1 {
        return None;
    }
    let hlen = hs.u24()?;
    let mut ch = Cur { b: hs.take(hlen)? };
    ch.take(2 + 32)?; // client_version, random
    ch.vec8()?; // session_id
    ch.vec16()?; // cipher_suites
    ch.vec8()?; // compression_methods
    let mut exts = Cur { b: ch.vec16()? };
    let mut found = None;
    while !exts.b.is_empty() {
        let ty = exts.u16()?;
        let body = exts.vec16()?;
        if ty != 0 {
            continue;
        }
        // Two server_name extensions are a malformed hello (RFC 8446 4.2).
        if found.is_some() {
            return None;
        }
        let mut sn = Cur { b: body };
        let mut list = Cur { b: sn.vec16()? };
        while !list.b.is_empty() {
            let kind = list.u8()?;
            let name = list.vec16()?;
            if kind == 0 {
                let name = std::str::from_utf8(name).ok()?;
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return None;
                }
                found = Some(name.trim_end_matches('.').to_ascii_lowercase());
                break;
            }
        }
    }
    found
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal, well-formed ClientHello naming `sni` (or none).
    pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
            let mut body = (list.len() as u16).to_be_bytes().to_vec();
            body.extend(list);
            exts.extend(0u16.to_be_bytes());
            exts.extend((body.len() as u16).to_be_bytes());
            exts.extend(body);
        }
        // supported_versions, so there is a non-SNI extension to skip
        exts.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut ch = vec![0x03, 0x03];
        ch.extend([7u8; 32]);
        ch.push(0); // session id
        ch.extend([0x00, 0x02, 0x13, 0x01]); // one cipher suite
        ch.extend([0x01, 0x00]); // null compression
        ch.extend((exts.len() as u16).to_be_bytes());
        ch.extend(exts);
        let mut hs = vec![1u8];
        hs.extend(&(ch.len() as u32).to_be_bytes()[1..]);
        hs.extend(ch);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn reads_the_sni_of_a_client_hello() {
        let h = client_hello(Some("Api.Example.COM"));
        assert!(!wants_more(&h));
        assert!(wants_more(&h[..h.len() - 1]));
        assert_eq!(
            classify(&h),
            Hello::Tls {
                sni: Some("api.example.com".into())
            }
        );
        assert_eq!(classify(&client_hello(None)), Hello::Tls { sni: None });
    }

    #[test]
    fn every_truncation_and_corruption_is_nameless_not_a_panic() {
        let h = client_hello(Some("example.com"));
        for cut in 0..h.len() {
            let _ = classify(&h[..cut]);
        }
        for i in 0..h.len() {
            for v in [0u8, 0xff, 0x7f] {
                let mut c = h.clone();
                c[i] = v;
                let _ = classify(&c);
            }
        }
        let mut evil = h.clone();
        let at = evil.len() - 8 - "example.com".len();
        evil[at + 3] = b'/'; // a byte no host name has
        assert!(matches!(
            classify(&evil),
            Hello::Tls { sni: None } | Hello::Tls { .. }
        ));
    }

    #[test]
    fn reads_the_host_of_an_http_request() {
        let r = b"GET / HTTP/1.1\r\nHost: Example.com:8080\r\nUser-Agent: x\r\n\r\n";
        assert!(!wants_more(r));
        assert!(wants_more(&r[..20]));
        assert_eq!(
            classify(r),
            Hello::Http {
                host: Some("example.com".into())
            }
        );
        let two = b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n";
        assert_eq!(classify(two), Hello::Http { host: None });
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Hello::Other);
        assert!(!wants_more(b"SSH-2.0-OpenSSH\r\n"));
    }
}
