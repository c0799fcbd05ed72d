//! The audit log's records and reports, as the HTTP API answers them (`GET /v1/audit`,
//! `GET /v1/audit/verify`). The log itself (its file format, hashing, verification) is the
//! `thaw-audit` crate.

use serde::{Deserialize, Serialize};

/// What was done. New actions are added over time: a reader that does not know one sees
/// `unknown` (the record still verifies: hashes cover the bytes as written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AuditAction {
    TemplatePublish,
    TemplateRemove,
    /// A template's handler ran on a payload (in a fresh sandbox, or in a session).
    Invoke,
    /// A command ran (in a fresh sandbox, or in a session); `detail.argv` names it.
    Exec,
    /// A file was written into a session: `detail` has its path, size and sha256.
    FilePut,
    /// A file was read out of a session: `detail` has its path and size.
    FileGet,
    SessionCreate,
    SessionPause,
    SessionResume,
    SessionDelete,
    /// A session's timeout stopped it (its sandbox and snapshot went).
    SessionStop,
    SessionExtend,
    SessionReset,
    /// A session was forked (each new session also has its own `session_create`).
    SessionFork,
    CheckpointCreate,
    CheckpointDelete,
    /// A session's reward command ran.
    Reward,
    /// The egress proxy let a sandbox connect to `detail.destination`.
    EgressAllowed,
    /// The egress proxy refused a sandbox's connection to `detail.destination`.
    EgressRefused,
    /// A task hit a limit (`detail.limit`: timeout, memory, output, host_timeout,
    /// output_flood).
    LimitHit,
    /// The host killed a sandbox's processes (`detail.reason`).
    Kill,
    KeyCreate,
    KeyRevoke,
    /// thaw found the log's tail edited, removed, reordered or cut off when it opened the
    /// log, and went on in a fresh segment linked to the last good record; `detail` names
    /// the break.
    AuditChainBroken,
    /// An action this version of thaw does not know (written by a newer one).
    #[serde(other)]
    Unknown,
}

impl AuditAction {
    pub const ALL: &'static [AuditAction] = &[
        AuditAction::TemplatePublish,
        AuditAction::TemplateRemove,
        AuditAction::Invoke,
        AuditAction::Exec,
        AuditAction::FilePut,
        AuditAction::FileGet,
        AuditAction::SessionCreate,
        AuditAction::SessionPause,
        AuditAction::SessionResume,
        AuditAction::SessionDelete,
        AuditAction::SessionStop,
        AuditAction::SessionExtend,
        AuditAction::SessionReset,
        AuditAction::SessionFork,
        AuditAction::CheckpointCreate,
        AuditAction::CheckpointDelete,
        AuditAction::Reward,
        AuditAction::EgressAllowed,
        AuditAction::EgressRefused,
        AuditAction::LimitHit,
        AuditAction::Kill,
        AuditAction::KeyCreate,
        AuditAction::KeyRevoke,
        AuditAction::AuditChainBroken,
    ];

    /// The snake_case name (as in the JSON form).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::TemplatePublish => "template_publish",
            AuditAction::TemplateRemove => "template_remove",
            AuditAction::Invoke => "invoke",
            AuditAction::Exec => "exec",
            AuditAction::FilePut => "file_put",
            AuditAction::FileGet => "file_get",
            AuditAction::SessionCreate => "session_create",
            AuditAction::SessionPause => "session_pause",
            AuditAction::SessionResume => "session_resume",
            AuditAction::SessionDelete => "session_delete",
            AuditAction::SessionStop => "session_stop",
            AuditAction::SessionExtend => "session_extend",
            AuditAction::SessionReset => "session_reset",
            AuditAction::SessionFork => "session_fork",
            AuditAction::CheckpointCreate => "checkpoint_create",
            AuditAction::CheckpointDelete => "checkpoint_delete",
            AuditAction::Reward => "reward",
            AuditAction::EgressAllowed => "egress_allowed",
            AuditAction::EgressRefused => "egress_refused",
            AuditAction::LimitHit => "limit_hit",
            AuditAction::Kill => "kill",
            AuditAction::KeyCreate => "key_create",
            AuditAction::KeyRevoke => "key_revoke",
            AuditAction::AuditChainBroken => "audit_chain_broken",
            AuditAction::Unknown => "unknown",
        }
    }
}

impl std::str::FromStr for AuditAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        AuditAction::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = AuditAction::ALL.iter().map(|a| a.as_str()).collect();
                format!("unknown audit action `{s}`; known: {}", names.join(", "))
            })
    }
}

/// One record of the audit log: who did what, to which sandbox, when, chained to the
/// record before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditRecord {
    /// Position in the whole log: 1, 2, 3, ... with no gap.
    pub seq: u64,
    /// When, in unix milliseconds.
    pub ts: u64,
    /// Who: the API key's id, or `local` for the embedded CLI's engine.
    pub actor: String,
    pub action: AuditAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// What is particular to the action (argv and exit code, a file's path, size and
    /// sha256, an egress destination). Never secrets, payloads or file contents.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub detail: serde_json::Value,
    /// `hash` of the record before (64 zeros for the first record of the log).
    pub prev: String,
    /// sha256 (hex) of this record's bytes as written, without its `hash` member.
    pub hash: String,
}

/// Answer of `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditList {
    /// Newest first, unless the query asked for `order=oldest`.
    pub records: Vec<AuditRecord>,
    /// More records matched than `limit`.
    pub more: bool,
}

/// How a record breaks the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum BreakKind {
    /// Its bytes changed since they were written (the hash does not match), or the line is
    /// not a record at all.
    Edited,
    /// Records before it are missing (a gap in `seq`, a link to a record that is not
    /// there, a missing segment file).
    Removed,
    /// It is out of place: the record expected here comes later, or it came already.
    Reordered,
    /// The file ends in the middle of a record.
    Truncated,
    /// The record at a pinned position (`verify --head SEQ:HASH`) is not the pinned one:
    /// the log was rewritten or cut back since the pin was taken.
    Rewritten,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditBreak {
    /// The segment file's name (`00000003.jsonl`).
    pub segment: String,
    /// 1-based line in that file.
    pub line: u64,
    pub kind: BreakKind,
    /// The `seq` the chain expected at this position.
    pub expected_seq: u64,
    /// The `seq` found there (none when the line is not a record).
    pub found_seq: Option<u64>,
    /// One line saying what is wrong.
    pub message: String,
    /// thaw found this break itself when it opened the log and recorded an
    /// `audit_chain_broken` record, starting a fresh segment linked to the last good record.
    pub acknowledged: bool,
}

/// The last record of the chain: pin it (`thaw audit verify --head SEQ:HASH`) to detect a
/// later rewrite of the whole log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
}

/// Answer of `GET /v1/audit/verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditVerify {
    /// No break anywhere.
    pub ok: bool,
    /// Records read.
    pub records: u64,
    /// Segment files read.
    pub segments: u64,
    /// The last record, if any.
    pub head: Option<AuditHead>,
    /// The first break, by position (segment order, then line).
    pub first_break: Option<AuditBreak>,
    /// Every break found (the first ones, up to 100).
    pub breaks: Vec<AuditBreak>,
    /// After the last break, the chain verifies again from this record on (a fresh
    /// segment thaw started, or simply the records after the break).
    pub resumed_at: Option<u64>,
}
