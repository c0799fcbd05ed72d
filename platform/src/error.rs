//! The platform's error type. Every message is one line that names the cause and the fix,
//! because it ends up verbatim in front of a user (CLI stderr, HTTP error body).

use std::path::PathBuf;

use thaw_protocol::ErrorCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {message}", file.display())]
    BadTemplate { file: PathBuf, message: String },

    #[error("unknown template `{name}`; known templates: {}", list_or_none(known))]
    UnknownTemplate { name: String, known: Vec<String> },

    #[error("template `{name}` is {state}: {hint}")]
    TemplateNotReady {
        name: String,
        state: String,
        hint: String,
    },

    #[error("setup command `{command}` failed with {status}; last output: {tail}")]
    SetupFailed {
        command: String,
        status: String,
        tail: String,
    },

    /// A template build went over one of its `[build]` limits, or produced something thaw
    /// refuses to publish (a device node). The message names the limit and the fix.
    #[error("{0}")]
    BuildRefused(String),

    #[error("warm-up failed: {0}")]
    WarmupFailed(String),

    /// An egress grant (`allow_out`/`deny_out`, `secrets`) of a session or call that does
    /// not hold; `path` is the request field, the message names the entry.
    #[error("{message}")]
    BadNetwork { path: String, message: String },

    /// The egress gateway could not serve a sandbox that was granted egress.
    #[error("sandbox {sandbox}: egress: {message}")]
    Egress { sandbox: String, message: String },

    #[error("missing system dependency: {what}. Fix: {fix}")]
    MissingDependency { what: String, fix: String },

    #[error(
        "payload is not valid JSON: {0}. Fix: pass a JSON value, e.g. --payload '{{\"x\": 1}}'"
    )]
    BadPayload(String),

    #[error("{what} too large: {size} bytes, the limit is {limit}")]
    TooLarge { what: String, size: u64, limit: u64 },

    #[error("container runtime: `{command}` failed: {message}")]
    Runtime { command: String, message: String },

    #[error("sandbox {sandbox}: guest-init did not become ready within {timeout_ms} ms{log}")]
    NotReady {
        sandbox: String,
        timeout_ms: u64,
        log: String,
    },

    #[error("sandbox {sandbox}: agent connection failed: {message}")]
    Agent { sandbox: String, message: String },

    /// The host's own deadline on a guest call passed (guest-init did not enforce the task's
    /// timeout, or did not answer): the host stopped waiting and killed the task.
    #[error("sandbox {sandbox}: {what}; the host enforced the timeout: the call was ended and the sandbox's processes killed")]
    HostTimeout { sandbox: String, what: String },

    /// The guest sent far more than its output cap allows (or one frame over the call's
    /// budget): the host cut the call off and killed the task.
    #[error("sandbox {sandbox} sent {bytes} bytes of output past its output_kib limit ({output_kib} KiB); the call was cut off and the sandbox's processes killed")]
    OutputFlood {
        sandbox: String,
        bytes: u64,
        output_kib: u64,
    },

    #[error("sandbox {sandbox}: guest-init answered {code:?}: {message}")]
    Guest {
        sandbox: String,
        code: ErrorCode,
        message: String,
    },

    #[error("snapshot store: {0}")]
    Snapshot(#[from] thaw_snapshotter::Error),

    #[error("snapshot of template `{template}` is unusable: {message}. Fix: `thaw deploy` the template again")]
    SnapshotCorrupt { template: String, message: String },

    #[error("unknown session `{id}`; `thaw session ls` lists yours")]
    UnknownSession { id: String },

    #[error("session `{id}` is {state}, so it cannot {action}{hint}")]
    SessionConflict {
        id: String,
        state: String,
        action: String,
        hint: String,
    },

    /// The session's sandbox died under a call (killed from outside, the host ran out of
    /// memory): not the task's doing, so a trainer retries rather than scoring it.
    #[error("session `{id}` lost its sandbox: {why}; reset it (`POST /v1/sessions/{id}/reset`) or remove it with `thaw session rm {id}`")]
    SessionLost { id: String, why: String },

    #[error("session `{id}` is busy: {what}; retry when it finishes")]
    SessionBusy { id: String, what: String },

    #[error("checkpoint/restore: {0}")]
    Criu(String),

    #[error("microvm: {0}")]
    Vm(#[from] thaw_microvm::VmError),

    #[error("microvm guest image: {0}")]
    GuestImage(thaw_microvm::image::ImageError),

    #[error("metadata store at {}: {message}", path.display())]
    Store { path: PathBuf, message: String },

    #[error("not found: {0}")]
    NotFound(String),

    #[error("conflict: {0}")]
    Conflict(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("disk full while {context}: free space under {} and retry", path.display())]
    DiskFull { context: String, path: PathBuf },

    /// The call's [`crate::engine::RunOptions::cancel`] fired (its HTTP client went away):
    /// the task was killed and a fresh sandbox discarded.
    #[error("cancelled: its caller went away")]
    Cancelled,

    /// `thaw kill` (or `POST /v1/sandboxes/.../kill`) ended the sandbox the call ran in: an
    /// operator's or the key's own decision, so retrying would undo it.
    #[error("{what} was ended by `thaw kill`{}: the call in it did not finish and its processes and state are gone", by.as_deref().map(|k| format!(" (by API key {k})")).unwrap_or_default())]
    Killed { what: String, by: Option<String> },

    /// A reset of the session killed the call's task (the reset said so too).
    #[error("cancelled: session `{id}` was reset while this call ran, which killed its task")]
    ResetCancelled { id: String },

    #[error(
        "session `{session}` has no checkpoint `{name}`; its checkpoints: {}",
        list_checkpoints(known)
    )]
    UnknownCheckpoint {
        session: String,
        name: String,
        known: Vec<String>,
    },

    #[error("session `{session}` already has a checkpoint `{name}`; delete it first or pick another name")]
    CheckpointExists { session: String, name: String },

    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },

    #[error("template `{template}` declares no reward command; add `[reward] command = [...]` to its template.toml and deploy it again (sessions keep the template they were made from)")]
    NoRewardCommand { template: String },

    /// The reward command ran but did not produce a reward: the task's fault, not thaw's.
    #[error("the reward command `{command}` {why}; its output ended: {output:?}")]
    RewardNotANumber {
        command: String,
        why: String,
        output: String,
    },

    /// The audit log cannot be written: new work is refused rather than run unaudited.
    /// The message names the file, the OS error and the fix.
    #[error("{0}")]
    Audit(#[from] thaw_audit::Error),

    #[error("{0}")]
    Other(String),
}

fn list_checkpoints(v: &[String]) -> String {
    if v.is_empty() {
        "none (make one with POST /v1/sessions/{id}/checkpoints)".to_string()
    } else {
        v.join(", ")
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none (publish one with `thaw deploy <dir>`)".to_string()
    } else {
        v.join(", ")
    }
}

impl Error {
    /// Wraps an I/O error with what we were doing, turning ENOSPC into [`Error::DiskFull`].
    pub fn io(
        context: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::DiskFull {
                context,
                path: path.into(),
            };
        }
        let path = path.into();
        Error::Io {
            context: format!("{context} ({})", path.display()),
            source,
        }
    }
}

/// Attaches a context to `std::io::Result`s.
pub trait IoContext<T> {
    fn ctx(self, context: impl Into<String>, path: impl AsRef<std::path::Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl Into<String>, path: impl AsRef<std::path::Path>) -> Result<T> {
        self.map_err(|e| Error::io(context, path.as_ref(), e))
    }
}
