//! A typed async client of `thaw serve`, one method per route.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use crate::types::*;
use crate::{
    Checkpoint, ExecResult, Invocation, ResetOutcome, Reward, Session, Stream, TemplateRecord,
};

/// Longest NDJSON line accepted from the server: an invocation's result is bounded by the
/// template's output cap, which the agent protocol bounds by its 64 MiB frames. Guards the
/// client's memory against a broken or hostile server.
const MAX_LINE: usize = 80 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request; `message` is its one-line explanation (printed
    /// verbatim by the CLI, like a local error).
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        path: Option<String>,
        /// Whose failure it is (a trainer retries infrastructure faults).
        fault: crate::Fault,
    },
    /// A streamed call failed after its response had started (status 200 was already sent).
    #[error("{message}")]
    Stream { code: String, message: String },
    #[error("cannot reach the thaw server at {url}: {source}. Fix: start it with `thaw serve`, or point --server/THAW_SERVER at it")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("thaw server at {url} answered something this client does not understand: {message}")]
    Protocol { url: String, message: String },
    #[error("invalid server URL `{url}`: {message}")]
    BadUrl { url: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Machine-readable code of an API or stream error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } | ClientError::Stream { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The buffered result of an exec.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub result: ExecResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    /// `Bearer <secret>`, marked sensitive so it never shows in debug output.
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("authenticated", &self.auth.is_some())
            .finish()
    }
}

impl Client {
    /// A client of the server at `base_url` (e.g. `http://127.0.0.1:7070`), authenticating
    /// with `api_key` (a `thaw_...` secret) when given.
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Client> {
        let bad = |message: String| ClientError::BadUrl {
            url: base_url.to_string(),
            message,
        };
        let base = Url::parse(base_url).map_err(|e| bad(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad("expected http://host:port or https://host:port".into()));
        }
        let auth = api_key
            .map(|k| {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", k.trim())).map_err(|_| {
                        ClientError::BadUrl {
                            url: base_url.to_string(),
                            message: "the API key contains characters not allowed in a header"
                                .into(),
                        }
                    })?;
                v.set_sensitive(true);
                Ok::<_, ClientError>(v)
            })
            .transpose()?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("thaw-api/", env!("CARGO_PKG_VERSION")))
            // No overall timeout: a deploy takes minutes and an exec as long as its task.
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Client { http, base, auth })
    }

    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// `base` + percent-encoded path segments.
    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().extend(segments);
        }
        u
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let r = self.http.request(method, url);
        match &self.auth {
            Some(a) => r.header(AUTHORIZATION, a.clone()),
            None => r,
        }
    }

    /// Sends a request and turns error statuses into [`ClientError::Api`].
    async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let req = req.build().map_err(|e| ClientError::Protocol {
            url: self.base.to_string(),
            message: e.to_string(),
        })?;
        let url = req.url().to_string();
        debug!(method = %req.method(), %url, "thaw api request");
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|source| ClientError::Connect {
                url: self.base.to_string(),
                source,
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.api_error(resp).await)
    }

    async fn api_error(&self, resp: Response) -> ClientError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ClientError::Api {
                status: status.as_u16(),
                code: e.error.code,
                message: e.error.message,
                path: e.error.path,
                fault: e.error.fault,
            },
            // Not thaw's error format (a proxy in between, or a wrong URL): say what came.
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                let text = text.trim();
                let excerpt: String = text.chars().take(200).collect();
                ClientError::Api {
                    status: status.as_u16(),
                    code: format!("http_{}", status.as_u16()),
                    message: format!(
                        "HTTP {status} from {}{}",
                        self.base,
                        if excerpt.is_empty() {
                            String::new()
                        } else {
                            format!(": {excerpt}")
                        }
                    ),
                    path: None,
                    fault: if status.is_server_error() {
                        crate::Fault::Infrastructure
                    } else {
                        crate::Fault::Caller
                    },
                }
            }
        }
    }

    async fn json<T: DeserializeOwned>(&self, resp: Response) -> Result<T> {
        let bytes = resp.bytes().await.map_err(|source| ClientError::Connect {
            url: self.base.to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url: self.base.to_string(),
            message: format!("bad JSON response: {e}"),
        })
    }

    async fn call<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        self.json(resp).await
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T> {
        self.call(self.request(Method::POST, self.url(segments)).json(body))
            .await
    }

    /// Posts `body` asking for an NDJSON stream; hands output events to `on_output` and
    /// returns the terminal event.
    async fn stream<B: Serialize>(
        &self,
        segments: &[&str],
        body: &B,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<StreamEvent> {
        let req = self
            .request(Method::POST, self.url(segments))
            .header(ACCEPT, NDJSON)
            .json(body);
        let resp = self.send(req).await?;
        let is_ndjson = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(NDJSON));
        if !is_ndjson {
            return Err(self.protocol("expected an application/x-ndjson stream"));
        }
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: StreamEvent = serde_json::from_slice(line)
                    .map_err(|e| self.protocol(format!("bad stream line: {e}")))?;
                match event {
                    StreamEvent::Stdout(c) => on_output(Stream::Stdout, &self.chunk(&c)?),
                    StreamEvent::Stderr(c) => on_output(Stream::Stderr, &self.chunk(&c)?),
                    StreamEvent::Error { error } => {
                        return Err(ClientError::Stream {
                            code: error.code,
                            message: error.message,
                        })
                    }
                    terminal => return Ok(terminal),
                }
            }
            if buf.len() > MAX_LINE {
                return Err(self.protocol(format!("a stream line exceeds {MAX_LINE} bytes")));
            }
            match body.next().await {
                Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                Some(Err(source)) => {
                    return Err(ClientError::Connect {
                        url: self.base.to_string(),
                        source,
                    })
                }
                None => {
                    return Err(self.protocol("the stream ended before the final result"));
                }
            }
        }
    }

    fn chunk(&self, c: &Chunk) -> Result<Vec<u8>> {
        c.bytes()
            .ok_or_else(|| self.protocol("a stream chunk's data_b64 is not base64"))
    }

    fn protocol(&self, message: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            url: self.base.to_string(),
            message: message.into(),
        }
    }

    // ---- service ----

    /// `GET /healthz` (no key needed).
    pub async fn health(&self) -> Result<Health> {
        self.call(self.http.get(self.url(&["healthz"]))).await
    }

    /// `GET /metrics`: Prometheus text exposition.
    pub async fn metrics(&self) -> Result<String> {
        let resp = self
            .send(self.request(Method::GET, self.url(&["metrics"])))
            .await?;
        resp.text().await.map_err(|source| ClientError::Connect {
            url: self.base.to_string(),
            source,
        })
    }

    /// `GET /openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.call(self.request(Method::GET, self.url(&["openapi.json"])))
            .await
    }

    // ---- templates ----

    /// `POST /v1/templates` with a tar of a template directory.
    pub async fn deploy_tar(&self, tar: Vec<u8>) -> Result<TemplateRecord> {
        self.call(
            self.request(Method::POST, self.url(&["v1", "templates"]))
                .header(CONTENT_TYPE, TAR)
                .body(tar),
        )
        .await
    }

    /// Packs `dir` (see [`pack_dir`]) and deploys it.
    pub async fn deploy_dir(&self, dir: &Path) -> Result<TemplateRecord> {
        let d = dir.to_path_buf();
        let tar = tokio::task::spawn_blocking(move || pack_dir(&d))
            .await
            .map_err(|e| ClientError::Io {
                context: format!("packing {}", dir.display()),
                source: std::io::Error::other(e.to_string()),
            })??;
        self.deploy_tar(tar).await
    }

    pub async fn templates(&self) -> Result<Vec<TemplateRecord>> {
        let l: TemplateList = self
            .call(self.request(Method::GET, self.url(&["v1", "templates"])))
            .await?;
        Ok(l.templates)
    }

    pub async fn template(&self, name: &str) -> Result<TemplateRecord> {
        self.call(self.request(Method::GET, self.url(&["v1", "templates", name])))
            .await
    }

    /// `DELETE /v1/templates/{name}`: returns the removed template.
    pub async fn remove_template(&self, name: &str) -> Result<TemplateRecord> {
        self.call(self.request(Method::DELETE, self.url(&["v1", "templates", name])))
            .await
    }

    /// Runs the handler on a payload; the invocation's stderr comes back in
    /// `Invocation::stderr_tail`.
    pub async fn invoke(&self, name: &str, body: &InvokeBody) -> Result<Invocation> {
        self.post_json(&["v1", "templates", name, "invoke"], body)
            .await
    }

    /// Like [`Client::invoke`], streaming the handler's stderr to `on_stderr` as it comes.
    pub async fn invoke_stream(
        &self,
        name: &str,
        body: &InvokeBody,
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<Invocation> {
        let end = self
            .stream(&["v1", "templates", name, "invoke"], body, |_, d| {
                on_stderr(d)
            })
            .await?;
        match end {
            StreamEvent::Result { invocation } => Ok(invocation),
            _ => Err(self.protocol("an invoke stream ended with an exec result")),
        }
    }

    /// Runs a command in a fresh sandbox of the template and collects its output.
    pub async fn exec(&self, name: &str, body: &ExecBody) -> Result<ExecOutput> {
        let r: ExecResponse = self
            .post_json(&["v1", "templates", name, "exec"], body)
            .await?;
        self.exec_output(r)
    }

    /// Runs a command in a fresh sandbox of the template, streaming its output.
    pub async fn exec_stream(
        &self,
        name: &str,
        body: &ExecBody,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecResult> {
        let end = self
            .stream(&["v1", "templates", name, "exec"], body, on_output)
            .await?;
        self.exit(end)
    }

    fn exec_output(&self, r: ExecResponse) -> Result<ExecOutput> {
        let decode =
            |s: &str| unb64(s).ok_or_else(|| self.protocol("exec output is not valid base64"));
        Ok(ExecOutput {
            stdout: decode(&r.stdout_b64)?,
            stderr: decode(&r.stderr_b64)?,
            result: r.result,
        })
    }

    fn exit(&self, end: StreamEvent) -> Result<ExecResult> {
        match end {
            StreamEvent::Exit { result } => Ok(result),
            _ => Err(self.protocol("an exec stream ended with an invocation result")),
        }
    }

    // ---- sessions ----

    pub async fn session_create(&self, body: &SessionCreateBody) -> Result<Session> {
        self.post_json(&["v1", "sessions"], body).await
    }

    pub async fn sessions(&self) -> Result<Vec<Session>> {
        let l: SessionList = self
            .call(self.request(Method::GET, self.url(&["v1", "sessions"])))
            .await?;
        Ok(l.sessions)
    }

    pub async fn session(&self, id: &str) -> Result<Session> {
        self.call(self.request(Method::GET, self.url(&["v1", "sessions", id])))
            .await
    }

    /// `DELETE /v1/sessions/{id}`: returns the session as it was ended.
    pub async fn session_delete(&self, id: &str) -> Result<Session> {
        self.call(self.request(Method::DELETE, self.url(&["v1", "sessions", id])))
            .await
    }

    pub async fn session_exec(&self, id: &str, body: &ExecBody) -> Result<ExecOutput> {
        let r: ExecResponse = self
            .post_json(&["v1", "sessions", id, "exec"], body)
            .await?;
        self.exec_output(r)
    }

    /// Runs the template's handler inside a session, streaming its stderr. A persistent
    /// handler keeps its memory between calls.
    pub async fn session_invoke_stream(
        &self,
        id: &str,
        body: &InvokeBody,
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<Invocation> {
        let end = self
            .stream(&["v1", "sessions", id, "invoke"], body, |_, d| on_stderr(d))
            .await?;
        match end {
            StreamEvent::Result { invocation } => Ok(invocation),
            _ => Err(self.protocol("an invoke stream ended with an exec result")),
        }
    }

    pub async fn session_exec_stream(
        &self,
        id: &str,
        body: &ExecBody,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecResult> {
        let end = self
            .stream(&["v1", "sessions", id, "exec"], body, on_output)
            .await?;
        self.exit(end)
    }

    /// Runs the template's handler in a running session.
    pub async fn session_invoke(&self, id: &str, body: &InvokeBody) -> Result<Invocation> {
        self.post_json(&["v1", "sessions", id, "invoke"], body)
            .await
    }

    /// Writes a file (absolute path in the sandbox), creating or replacing it; `mode` is the
    /// permission bits (e.g. `0o644`).
    pub async fn session_write_file(
        &self,
        id: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<()> {
        let mut url = self.url(&["v1", "sessions", id, "files"]);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("path", path);
            if let Some(m) = mode {
                q.append_pair("mode", &format!("{m:04o}"));
            }
        }
        let resp = self
            .send(
                self.request(Method::PUT, url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(data),
            )
            .await?;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(self.protocol(format!(
                "expected 204 from a file write, got {}",
                resp.status()
            )));
        }
        Ok(())
    }

    pub async fn session_read_file(&self, id: &str, path: &str) -> Result<Vec<u8>> {
        let mut url = self.url(&["v1", "sessions", id, "files"]);
        url.query_pairs_mut().append_pair("path", path);
        let resp = self.send(self.request(Method::GET, url)).await?;
        let bytes = resp.bytes().await.map_err(|source| ClientError::Connect {
            url: self.base.to_string(),
            source,
        })?;
        Ok(bytes.to_vec())
    }

    /// `GET /v1/audit`: audit records (a key that is not an admin gets its own only).
    pub async fn audit(&self, q: &crate::AuditQuery) -> Result<crate::AuditList> {
        let url = self.url(&["v1", "audit"]);
        self.call(self.request(Method::GET, url).query(q)).await
    }

    /// `GET /v1/audit/verify` (admin keys): the whole log's chain, checked; `head`: a head
    /// taken earlier that the log must still hold.
    pub async fn audit_verify(
        &self,
        head: Option<&crate::AuditHead>,
    ) -> Result<crate::AuditVerify> {
        let mut url = self.url(&["v1", "audit", "verify"]);
        if let Some(h) = head {
            url.query_pairs_mut()
                .append_pair("head", &format!("{}:{}", h.seq, h.hash));
        }
        self.call(self.request(Method::GET, url)).await
    }

    pub async fn session_pause(&self, id: &str) -> Result<Session> {
        self.call(self.request(Method::POST, self.url(&["v1", "sessions", id, "pause"])))
            .await
    }

    pub async fn session_resume(&self, id: &str) -> Result<Session> {
        self.call(self.request(Method::POST, self.url(&["v1", "sessions", id, "resume"])))
            .await
    }

    pub async fn session_extend(&self, id: &str, body: &ExtendBody) -> Result<Session> {
        self.post_json(&["v1", "sessions", id, "extend"], body)
            .await
    }

    // ---- rollouts ----

    pub async fn session_checkpoint(&self, id: &str, name: &str) -> Result<Checkpoint> {
        let body = CheckpointBody {
            name: name.to_string(),
        };
        self.post_json(&["v1", "sessions", id, "checkpoints"], &body)
            .await
    }

    pub async fn session_checkpoints(&self, id: &str) -> Result<Vec<Checkpoint>> {
        let l: CheckpointList = self
            .call(self.request(
                Method::GET,
                self.url(&["v1", "sessions", id, "checkpoints"]),
            ))
            .await?;
        Ok(l.checkpoints)
    }

    pub async fn session_checkpoint_delete(&self, id: &str, name: &str) -> Result<Checkpoint> {
        self.call(self.request(
            Method::DELETE,
            self.url(&["v1", "sessions", id, "checkpoints", name]),
        ))
        .await
    }

    /// Back to the session's origin, or to `checkpoint`.
    pub async fn session_reset(&self, id: &str, checkpoint: Option<&str>) -> Result<ResetOutcome> {
        let body = ResetBody {
            checkpoint: checkpoint.map(str::to_string),
        };
        self.post_json(&["v1", "sessions", id, "reset"], &body)
            .await
    }

    pub async fn session_fork(&self, id: &str, body: &ForkBody) -> Result<BatchResponse> {
        self.post_json(&["v1", "sessions", id, "fork"], body).await
    }

    /// A batch, buffered: returns when every session is ready or failed.
    pub async fn session_batch(&self, body: &BatchBody) -> Result<BatchResponse> {
        self.post_json(&["v1", "sessions", "batch"], body).await
    }

    pub async fn session_reward(&self, id: &str, body: &RewardBody) -> Result<Reward> {
        self.post_json(&["v1", "sessions", id, "reward"], body)
            .await
    }
}

impl Client {
    // ---- live sandboxes ----

    /// `GET /v1/sandboxes`: the key's live sandboxes (an admin key: every key's).
    pub async fn sandboxes(&self) -> Result<Vec<crate::LiveSandbox>> {
        let l: crate::SandboxList = self
            .call(self.request(Method::GET, self.url(&["v1", "sandboxes"])))
            .await?;
        Ok(l.sandboxes)
    }

    /// `GET /v1/sandboxes/{id}`: one live sandbox, by its id or its session's.
    pub async fn sandbox(&self, id: &str) -> Result<crate::LiveSandbox> {
        self.call(self.request(Method::GET, self.url(&["v1", "sandboxes", id])))
            .await
    }

    /// `POST /v1/sandboxes/{id}/kill`: ends a sandbox (or a session, for good) now.
    pub async fn kill(&self, id: &str) -> Result<crate::KillReport> {
        self.call(self.request(Method::POST, self.url(&["v1", "sandboxes", id, "kill"])))
            .await
    }

    /// `POST /v1/sandboxes/kill`: ends every live sandbox of the key; an admin key ends
    /// every key's, or only `key`'s.
    pub async fn kill_all(&self, key: Option<&str>) -> Result<Vec<crate::KillReport>> {
        let mut url = self.url(&["v1", "sandboxes", "kill"]);
        if let Some(k) = key {
            url.query_pairs_mut().append_pair("key", k);
        }
        let l: crate::KillList = self.call(self.request(Method::POST, url)).await?;
        Ok(l.killed)
    }
}

/// Packs a template directory as the tar `POST /v1/templates` takes: paths relative to the
/// directory, symlinks stored as symlinks (never followed, so nothing outside the directory
/// is sent by accident), permission bits kept.
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>> {
    let io = |context: String| move |source| ClientError::Io { context, source };
    if !dir.join("template.toml").is_file() {
        return Err(ClientError::Io {
            context: format!("{} is not a template directory", dir.display()),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "it has no template.toml"),
        });
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .map_err(io(format!("packing {}", dir.display())))?;
    b.into_inner()
        .map_err(io(format!("packing {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_segments_and_keep_a_base_path() {
        let c = Client::new("http://127.0.0.1:7070", None).unwrap();
        assert_eq!(
            c.url(&["v1", "templates", "a b/c"]).as_str(),
            "http://127.0.0.1:7070/v1/templates/a%20b%2Fc"
        );
        let c = Client::new("https://example.test/thaw/", None).unwrap();
        assert_eq!(
            c.url(&["v1", "sessions"]).as_str(),
            "https://example.test/thaw/v1/sessions"
        );
    }

    #[test]
    fn bad_urls_and_keys_are_refused() {
        assert!(Client::new("127.0.0.1:7070", None).is_err());
        assert!(Client::new("ftp://x", None).is_err());
        assert!(Client::new("http://x", Some("a\nb".into())).is_err());
    }

    #[test]
    fn pack_dir_keeps_relative_paths_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("template.toml"), "name = 'x'").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/run.sh"), "#!/bin/sh").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        let tar = pack_dir(d.path()).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().to_string();
            if p.ends_with("link") {
                assert_eq!(e.header().entry_type(), tar::EntryType::Symlink);
            }
            seen.push(p);
        }
        assert!(seen.iter().any(|p| p.ends_with("sub/run.sh")), "{seen:?}");
        assert!(seen.iter().all(|p| !p.starts_with('/')), "{seen:?}");
    }

    #[test]
    fn pack_dir_refuses_a_non_template() {
        let d = tempfile::tempdir().unwrap();
        let e = pack_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("template.toml"), "{e}");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let c = Client::new("http://x", Some("thaw_secret".into())).unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }
}
