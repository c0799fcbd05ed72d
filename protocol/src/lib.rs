//! The agent protocol between the thaw host and `guest-init`, PID 1 of every sandbox.
//!
//! One protocol serves both isolation tiers: over a Unix socket (container tier), over
//! virtio-vsock (microvm tier) and over a virtio-serial port (the QEMU boot check in CI).
//! `guest-init/PROTOCOL.md` is the normative description; this crate is its single
//! implementation, shared by host and guest so the two cannot drift apart.
//!
//! # Framing
//! Every message is a frame: a 4-byte big-endian length `N`, then `N` bytes of UTF-8 JSON.
//! Frames larger than [`MAX_FRAME`] are a protocol error (the reader refuses them before
//! allocating). Binary data travels base64-encoded in [`Bytes`] fields.
//!
//! # Exchanges
//! A connection carries a sequence of exchanges. In each, the host sends one [`Request`] and
//! the guest answers with zero or more non-terminal [`Response`]s (streamed output) followed by
//! exactly one terminal one (see [`Response::is_terminal`]). Closing the connection while an
//! exchange runs cancels it: the guest kills the task's whole process tree.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub mod frame;

pub use frame::FrameError;

/// Version of this protocol. Bumped on any incompatible change; `Hello` negotiates it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts (64 MiB). Bounds memory on hostile or corrupt input.
pub const MAX_FRAME: usize = 64 << 20;

/// vsock port guest-init listens on in the microvm tier.
pub const VSOCK_PORT: u32 = 1024;

/// guest-init's state directory inside a container-tier sandbox (the sandbox id file). It is
/// the sandbox's own, like the rest of its root: nothing on the host resolves a path in it.
pub const CONTAINER_STATE_DIR: &str = "/run/thaw";

/// The abstract Unix socket name guest-init listens on in a container-tier sandbox.
///
/// Abstract names live in the network namespace, not in any filesystem: the host reaches it
/// by creating its socket inside the sandbox's network namespace (held open by descriptor),
/// so no name the sandbox can write or replace is ever resolved on the host. A task in the
/// sandbox cannot take the name over (guest-init binds it before any task starts, and CRIU
/// restores the bound socket) nor reach another sandbox's (each has its own namespace).
pub const CONTAINER_AGENT_NAME: &str = "thaw-agent";

/// Name of the virtio-serial port guest-init serves on when no vsock device exists.
pub const VIRTIO_SERIAL_NAME: &str = "org.thaw.agent";

/// Binary data, carried as a base64 string in JSON.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(v.to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Bytes)
            .map_err(serde::de::Error::custom)
    }
}

/// Environment variables, ordered so that frames are deterministic.
pub type Env = BTreeMap<String, String>;

/// A request from the host. Tagged by `op`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Version negotiation. Answered by [`Response::Hello`] or an `unsupported_version` error.
    Hello { version: u32 },
    /// Liveness and readiness. Answered by [`Response::Pong`].
    Ping,
    /// Run a command. Answered by `Started`, `Output`* and a terminal `Exited`.
    Exec(ExecRequest),
    /// Store the template's handler (and, for a persistent handler, start it and wait until it
    /// reports warm). Answered by [`Response::Configured`].
    Configure(HandlerConfig),
    /// Run the handler on one payload. Answered by `Output`* (handler stderr) and a terminal
    /// [`Response::InvokeResult`].
    Invoke(InvokeRequest),
    /// Write a file (creating parent directories). Answered by `Ok`.
    WriteFile {
        path: String,
        data: Bytes,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        append: bool,
    },
    /// Read a file, at most `max_bytes` of it. Answered by [`Response::FileData`].
    ReadFile {
        path: String,
        #[serde(default)]
        max_bytes: Option<u64>,
    },
    /// List a directory. Answered by [`Response::DirEntries`].
    ListDir { path: String },
    /// Give the sandbox its identity: hostname and sandbox id (exported to tasks as
    /// `THAW_SANDBOX_ID`). Answered by `Ok`.
    SetIdentity {
        hostname: String,
        sandbox_id: String,
    },
    /// Mix fresh host entropy into the guest kernel's pool and reseed it. Answered by
    /// [`Response::Entropy`].
    AddEntropy { data: Bytes },
    /// Set the wall clock. Answered by [`Response::Clock`].
    SetClock { unix_nanos: i64 },
    /// Replace (or extend) the environment every later task starts with. Answered by `Ok`.
    SetEnv {
        env: Env,
        #[serde(default)]
        replace: bool,
    },
    /// Stop every task and end guest-init (a VM powers off). Answered by `Ok` first.
    Shutdown,
}

/// Resource and output limits for one task, enforced by guest-init.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TaskLimits {
    /// Wall-clock limit; past it the whole process tree is killed and the outcome is `timeout`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Combined stdout+stderr bytes kept; the rest is dropped and `truncated` is set.
    #[serde(default = "default_output_cap")]
    pub output_cap: u64,
}

/// Default cap on a task's combined output: 1 MiB.
pub const DEFAULT_OUTPUT_CAP: u64 = 1 << 20;

fn default_output_cap() -> u64 {
    DEFAULT_OUTPUT_CAP
}

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits {
            timeout_ms: None,
            output_cap: DEFAULT_OUTPUT_CAP,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (and overriding) the sandbox environment.
    #[serde(default)]
    pub env: Env,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whole standard input; `None` connects stdin to /dev/null.
    #[serde(default)]
    pub stdin: Option<Bytes>,
    #[serde(default)]
    pub limits: TaskLimits,
}

/// How the template's handler runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum HandlerMode {
    /// A new process per invocation: payload on stdin, result on stdout.
    #[default]
    Exec,
    /// One long-lived worker, started (and warmed) before the snapshot. It reads one JSON line
    /// per invocation on stdin (an [`InvocationEnvelope`]) and writes one JSON line back.
    Persistent,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    pub command: Vec<String>,
    #[serde(default)]
    pub mode: HandlerMode,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: Env,
    /// How long a persistent worker may take to report warm.
    #[serde(default)]
    pub start_timeout_ms: Option<u64>,
}

/// The line a persistent worker reads for each invocation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InvocationEnvelope {
    pub payload: serde_json::Value,
    pub env: Env,
    pub sandbox_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    pub payload: serde_json::Value,
    #[serde(default)]
    pub env: Env,
    #[serde(default)]
    pub limits: TaskLimits,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Outcome {
    /// The process exited with this code.
    Exited { code: i32 },
    /// The process was killed by this signal (not by guest-init's timeout).
    Signaled { signal: i32 },
    /// Over its wall-clock limit; guest-init killed the whole tree.
    Timeout,
    /// Killed by the kernel's OOM killer (memory limit).
    Oom,
}

impl Outcome {
    pub fn success(&self) -> bool {
        matches!(self, Outcome::Exited { code: 0 })
    }

    /// Shell-style exit code: the code, 128+signal, 124 for a timeout, 137 for OOM.
    pub fn exit_code(&self) -> i32 {
        match *self {
            Outcome::Exited { code } => code,
            Outcome::Signaled { signal } => 128 + signal,
            Outcome::Timeout => 124,
            Outcome::Oom => 137,
        }
    }
}

/// Status of an invocation, as users see it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum InvokeStatus {
    Ok,
    /// The handler crashed, exited non-zero, or wrote something that is not JSON.
    Error,
    Timeout,
    Oom,
}

impl InvokeStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            InvokeStatus::Ok => "ok",
            InvokeStatus::Error => "error",
            InvokeStatus::Timeout => "timeout",
            InvokeStatus::Oom => "oom",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// How entropy reached the guest kernel.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntropyMethod {
    /// `RNDADDENTROPY` (credited) followed by `RNDRESEEDCRNG`: the microvm tier.
    Credited,
    /// Written to /dev/urandom without credit (no CAP_SYS_ADMIN, e.g. a container sharing the
    /// host kernel, whose pool is not cloned by a snapshot in the first place).
    Mixed,
}

/// A response from guest-init. Tagged by `type`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        agent: String,
    },
    Pong {
        version: u32,
        pid: u32,
        uptime_ms: u64,
        sandbox_id: String,
        /// Whether a handler is configured (and, if persistent, warm).
        handler_ready: bool,
    },
    Started {
        pid: u32,
    },
    Output {
        stream: Stream,
        data: Bytes,
    },
    Exited {
        outcome: Outcome,
        duration_ms: u64,
        /// Output beyond the cap was dropped.
        truncated: bool,
    },
    Configured {
        /// Time the persistent worker took to report warm (0 for exec handlers).
        warm_ms: u64,
    },
    InvokeResult {
        status: InvokeStatus,
        /// The handler's answer when it was valid JSON.
        #[serde(default)]
        result: Option<serde_json::Value>,
        /// The raw stdout when it was not valid JSON (status is then `error`).
        #[serde(default)]
        raw_output: Option<String>,
        /// Last bytes of the handler's stderr (for errors, timeouts and OOMs).
        #[serde(default)]
        stderr_tail: String,
        outcome: Option<Outcome>,
        duration_ms: u64,
        truncated: bool,
    },
    FileData {
        data: Bytes,
        truncated: bool,
    },
    DirEntries {
        entries: Vec<DirEntry>,
    },
    Entropy {
        method: EntropyMethod,
        bytes: u64,
    },
    Clock {
        /// False where the sandbox shares the host clock (container tier): nothing to set.
        applied: bool,
    },
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Response {
    /// Whether this response ends the current exchange.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Response::Started { .. } | Response::Output { .. })
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error {
            code,
            message: message.into(),
        }
    }
}

/// Machine-readable error classes. The message says what happened and how to fix it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not a valid request.
    BadRequest,
    UnsupportedVersion,
    NotFound,
    PermissionDenied,
    Io,
    /// The command could not be started (no such program, not executable, ...).
    SpawnFailed,
    /// `invoke` before `configure`.
    NoHandler,
    /// The persistent handler failed to start or died while warming.
    HandlerFailed,
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_tagged_by_op() {
        let r = Request::Exec(ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            env: Env::new(),
            cwd: None,
            stdin: Some(Bytes(b"\x00\xff".to_vec())),
            limits: TaskLimits::default(),
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"op":"exec","argv":["echo","hi"]"#), "{s}");
        assert!(s.contains(r#""stdin":"AP8=""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }

    #[test]
    fn unknown_fields_and_ops_are_rejected() {
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"read_file","path":"/x","y":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"exec"}"#).is_err());
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let r: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"]}"#).unwrap();
        match r {
            Request::Exec(e) => {
                assert_eq!(e.limits.output_cap, DEFAULT_OUTPUT_CAP);
                assert!(e.stdin.is_none());
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bad_base64_is_an_error_not_a_panic() {
        let r = serde_json::from_str::<Request>(r#"{"op":"add_entropy","data":"@@@"}"#);
        assert!(r.is_err());
    }

    #[test]
    fn terminal_responses() {
        assert!(!Response::Started { pid: 1 }.is_terminal());
        assert!(!Response::Output {
            stream: Stream::Stdout,
            data: Bytes::default()
        }
        .is_terminal());
        assert!(Response::Ok.is_terminal());
        assert!(Response::error(ErrorCode::Io, "x").is_terminal());
    }

    #[test]
    fn outcome_exit_codes_follow_shell_conventions() {
        assert_eq!(Outcome::Exited { code: 3 }.exit_code(), 3);
        assert_eq!(Outcome::Signaled { signal: 9 }.exit_code(), 137);
        assert_eq!(Outcome::Timeout.exit_code(), 124);
        assert!(Outcome::Exited { code: 0 }.success());
    }
}
