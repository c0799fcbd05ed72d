//! Credentials the agent never holds.
//!
//! A caller grants a sandbox a secret for some destinations: `{name, value, hosts}`. The
//! sandbox gets only a placeholder (an environment variable `name` whose value is
//! `thaw-secret-<name>-<random>`), and uses it as if it were the credential. For connections
//! to those hosts the proxy terminates TLS with a certificate from a CA made for this
//! sandbox alone (only this sandbox's trust bundle holds it), replaces the placeholder in
//! each HTTP/1.1 request's head with the value, and re-encrypts to the real server, whose
//! certificate it verifies against the host's roots. To any other destination the
//! placeholder stays a placeholder: the value goes to the hosts named and nowhere else.
//!
//! The value lives only in this process's memory: not in the sandbox (its memory and so its
//! snapshots), not in a record, a log or an audit record (`Debug` prints it redacted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::GatewayError;

/// One granted credential.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    pub value: String,
    /// Domains (exact, or `*.suffix`) whose requests get the value.
    pub hosts: Vec<String>,
    /// What the sandbox sees instead of the value.
    pub placeholder: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl Secret {
    /// A secret with a fresh placeholder.
    pub fn new(name: &str, value: &str, hosts: Vec<String>) -> Secret {
        let mut r = [0u8; 12];
        // SAFETY: the buffer is valid for its length.
        unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        Secret {
            name: name.to_string(),
            value: value.to_string(),
            hosts: hosts
                .into_iter()
                .map(|h| crate::policy::normalize_name(&h))
                .collect(),
            placeholder: format!("thaw-secret-{name}-{hex}"),
        }
    }

    pub fn for_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => crate::policy::below(host, suffix),
            None => h == host,
        })
    }
}

/// Checks a secret grant: a name fit for an environment variable, a value fit for an HTTP
/// header, and at least one host.
pub fn validate(name: &str, value: &str, hosts: &[String]) -> Result<(), String> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if !name_ok {
        return Err(format!(
            "secret name {name:?} must be 1 to 64 of A-Z, 0-9 and _, not starting with a digit (it becomes an environment variable)"
        ));
    }
    if value.is_empty() || value.len() > 8192 || value.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(format!(
            "secret {name}: the value must be 1 to 8192 bytes without control characters (it goes into an HTTP header)"
        ));
    }
    if hosts.is_empty() {
        return Err(format!(
            "secret {name} names no host: give `hosts`, the domains whose requests get it"
        ));
    }
    Ok(())
}

/// A sandbox's own CA: it signs the certificates the proxy shows that sandbox for hosts it
/// holds secrets for.
pub struct Ca {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl Ca {
    pub fn new(sandbox: &str) -> Result<Ca, GatewayError> {
        let bad = |e: rcgen::Error| GatewayError::Wiring(format!("making the sandbox's CA: {e}"));
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("thaw egress CA for {sandbox}"),
        );
        let cert = params.self_signed(&key).map_err(bad)?;
        Ok(Ca {
            key,
            cert,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, for the sandbox's trust bundle.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A TLS server configuration presenting a certificate for `host`, made once per host.
    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
        if let Some(c) = self.leaves.lock().ok().and_then(|m| m.get(host).cloned()) {
            return Ok(c);
        }
        let bad = |e: &dyn std::fmt::Display| {
            GatewayError::Wiring(format!("certificate for {host}: {e}"))
        };
        let key = rcgen::KeyPair::generate().map_err(|e| bad(&e))?;
        let leaf = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| bad(&e))?
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| bad(&e))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), self.cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .map_err(|e| bad(&e))?;
        // HTTP/1.1 only: HTTP/2 compresses headers, and the placeholder must be found.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        if let Ok(mut m) = self.leaves.lock() {
            m.insert(host.to_string(), cfg.clone());
        }
        Ok(cfg)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots the proxy verifies real servers against: the host's bundle (`SSL_CERT_FILE`,
/// else Debian's), plus `THAW_UPSTREAM_CA_BUNDLE` where an operator (or a test) adds its own.
pub fn upstream_client() -> Result<Arc<rustls::ClientConfig>, GatewayError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut files = vec![std::env::var("SSL_CERT_FILE")
        .ok()
        .filter(|p| std::path::Path::new(p).is_file())
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into())];
    if let Ok(extra) = std::env::var("THAW_UPSTREAM_CA_BUNDLE") {
        if !extra.is_empty() {
            files.push(extra);
        }
    }
    for f in &files {
        if let Ok(iter) = CertificateDer::pem_file_iter(f) {
            for c in iter.flatten() {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err(GatewayError::Wiring(format!(
            "no CA certificates in {files:?} to verify servers the proxy injects secrets for"
        )));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Wiring(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A stream that first yields bytes already read from `inner`.
pub struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(head: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Longest request head accepted from the sandbox on an intercepted connection.
const MAX_HEAD: usize = 64 * 1024;

/// Terminates the sandbox's TLS for `host`, opens TLS to the real server over `upstream`,
/// and relays, putting each secret's value in place of its placeholder in request heads.
/// Returns the names of the secrets that were used.
pub async fn intercept(
    ca: &Ca,
    host: &str,
    secrets: &[Secret],
    client: Prefixed<tokio::net::TcpStream>,
    upstream: tokio::net::TcpStream,
    upstream_tls: Arc<rustls::ClientConfig>,
) -> Result<Vec<String>, GatewayError> {
    let io = |what: &str, e: std::io::Error| GatewayError::io(format!("{what} ({host})"), e);
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(host)?);
    let inner = acceptor
        .accept(client)
        .await
        .map_err(|e| io("TLS from the sandbox", e))?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| GatewayError::Wiring(format!("{host}: {e}")))?;
    let outer = tokio_rustls::TlsConnector::from(upstream_tls)
        .connect(name, upstream)
        .await
        .map_err(|e| io("TLS to the server", e))?;
    let (mut cr, mut cw) = tokio::io::split(inner);
    let (mut ur, mut uw) = tokio::io::split(outer);
    let used = Mutex::new(Vec::<String>::new());
    let up = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            // One request head, then its body by its length.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                if buf.len() > MAX_HEAD {
                    return Err(io(
                        "request head",
                        std::io::Error::other("longer than 64 KiB"),
                    ));
                }
                let n = cr.read(&mut chunk).await.map_err(|e| io("reading", e))?;
                if n == 0 {
                    let _ = uw.shutdown().await;
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let rest = buf.split_off(head_end);
            let mut head = String::from_utf8_lossy(&buf).into_owned();
            for s in secrets {
                if head.contains(&s.placeholder) {
                    head = head.replace(&s.placeholder, &s.value);
                    if let Ok(mut u) = used.lock() {
                        if !u.contains(&s.name) {
                            u.push(s.name.clone());
                        }
                    }
                }
            }
            let body = body_length(&buf);
            uw.write_all(head.as_bytes())
                .await
                .map_err(|e| io("writing", e))?;
            buf = rest;
            match body {
                Body::Length(mut left) => loop {
                    let take = (buf.len() as u64).min(left) as usize;
                    uw.write_all(&buf[..take])
                        .await
                        .map_err(|e| io("writing", e))?;
                    buf.drain(..take);
                    left -= take as u64;
                    if left == 0 {
                        break;
                    }
                    let n = cr.read(&mut chunk).await.map_err(|e| io("reading", e))?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                },
                // A chunked (or unframed) body: relay the rest of the connection as it is;
                // later requests on it are not rewritten (their placeholders stay
                // placeholders, which fails closed).
                Body::Unknown => {
                    uw.write_all(&buf).await.map_err(|e| io("writing", e))?;
                    tokio::io::copy(&mut cr, &mut uw)
                        .await
                        .map_err(|e| io("relaying", e))?;
                    let _ = uw.shutdown().await;
                    return Ok(());
                }
            }
        }
    };
    let down = async {
        tokio::io::copy(&mut ur, &mut cw)
            .await
            .map_err(|e| io("relaying", e))?;
        let _ = cw.shutdown().await;
        Ok::<_, GatewayError>(())
    };
    let (a, b) = tokio::join!(up, down);
    a?;
    b?;
    Ok(used.into_inner().unwrap_or_default())
}

enum Body {
    Length(u64),
    Unknown,
}

fn body_length(head: &[u8]) -> Body {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head).is_err() {
        return Body::Unknown;
    }
    let mut length = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Body::Unknown;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        }
    }
    Body::Length(length.unwrap_or(0))
}
