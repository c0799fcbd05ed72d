//! thaw's audit log: who (an API key, or `local`) did what (publish, invoke, exec, a file
//! written, a session paused, an egress connection refused, ...), to which sandbox, when.
//! Append-only and hash-chained, so that an edited, removed or reordered record is found
//! and named by position. No engine in here: the engine (`thaw-platform`) owns an
//! [`Audit`] and appends to it; `thaw audit ls|verify` and `GET /v1/audit[/verify]` read it.
//!
//! # Format
//!
//! Records are JSON lines ([`thaw_types::audit::AuditRecord`]) in segment files
//! `<dir>/NNNNNNNN.jsonl` (numbered from 1, no gap; files 0600, directory 0700), each
//! opened `O_APPEND`. Every record carries `seq` (1, 2, 3, ... over the whole log), `prev`
//! (the previous record's `hash`; 64 zeros for the first) and `hash`: the sha256 of the
//! record's own bytes as written without its `hash` member (see `line.rs` for why the
//! written bytes rather than a canonical re-serialization). The first record of a segment
//! links to the last record of the segment before. A segment is closed once it holds
//! [`Options::segment_bytes`] (1 MiB: about 5,000 records), which bounds what opening the
//! log verifies (about 10 ms in a release build, 70 ms in a debug one) and what a query
//! holds in memory at once.
//!
//! # Verification
//!
//! [`Audit::verify`] walks every segment and reports every break by position (segment
//! file, line): `edited` (the bytes do not hash to the record's `hash`, or the line is not
//! a record), `removed` (a gap in `seq`, a link to a record that is not there, a missing
//! segment file), `reordered` (the record expected here comes later in the segment, or
//! this one came already), `truncated` (the file ends mid-record). After a break it goes
//! on from the broken record, so later breaks are reported too; the first by position is
//! the answer to "where was the log tampered with". It ends with the head (`seq`, `hash`
//! of the last record): an operator who keeps a head can later check it with
//! `verify --head SEQ:HASH`, which is what detects a rewrite of the whole chain or a tail
//! cut back by whole records (the chain alone cannot: see SECURITY.md).
//!
//! # Opening: the tail is verified
//!
//! [`Audit::open`] verifies the **last segment** in full (and its link to the last record
//! of the segment before): that is where a crash, a full disk or a hand edit of recent
//! history shows, and it costs one segment's read (a few ms) whichever size the log has
//! grown to. Older segments are checked by `verify`. If the tail is broken, thaw logs an
//! error, leaves the broken segment untouched as evidence, and starts a **fresh segment**
//! whose first record is an `audit_chain_broken` record naming the break, linked to the
//! last good record (`seq` and `prev` as if the broken records had never been written).
//! `verify` then still reports the break, marked `acknowledged`, and the new segment
//! chains correctly from the last good record.
//!
//! # Appending, and what a failure does
//!
//! One `write(2)` of the whole line to the `O_APPEND` descriptor per record, under a
//! mutex (this process) and an `flock` on `<dir>/.lock` (other thaw processes on the same
//! home: the CLI's embedded engine beside `thaw serve`; a process that finds the segment
//! grown or rotated by another one re-reads the tail first). No fsync per record: a crash
//! of thaw loses nothing written (the kernel has it); an `fdatasync` runs at most every
//! [`Options::sync_interval`] (100 ms) from a background thread, when something was
//! written, and on drop, bounding what a power loss can take. Measured on the
//! development machine (ext4, 2 shared cores): 4.5 µs per append of a typical 210-byte
//! exec record in a release build (28 µs in a debug build), and 37 ms to verify 20,000
//! records (`cargo test -p thaw-audit --release -- --ignored append_cost --nocapture`):
//! the rollout path's hundreds of execs per second spend about 1 ms per second on it.
//!
//! A write that fails (disk full, a read-only file system, a file made immutable or
//! deleted under thaw) flips the log into a **failed state**: that append and every later
//! one return [`Error::Unavailable`], naming the file, the OS error and the fix. The
//! engine checks [`Audit::ready`] before starting new work and refuses it (HTTP 503
//! `audit_unavailable`) rather than run it unaudited. The state lasts until thaw is
//! restarted (after the fix): reopening verifies the tail again, so a record cut off by a
//! full disk becomes an acknowledged break, not a silent one.
//!
//! # Reading
//!
//! [`Audit::query`] filters by actor, template, session, sandbox, action and time,
//! newest first by default, reading one segment at a time and stopping at the limit.

mod line;
mod query;
mod segment;
mod verify;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thaw_types::audit::{AuditAction, AuditBreak, AuditHead, AuditList, AuditVerify};
use tracing::{error, warn};

pub use line::{sha256_hex, ZERO_HASH};
pub use query::{Filter, DEFAULT_LIMIT, MAX_LIMIT};
pub use thaw_types::audit;

use segment::segment_path;
use verify::{Expect, Walker};

/// The actor of records thaw writes about its own log.
pub const THAW_ACTOR: &str = "thaw";
/// A record's line is kept under this size (its detail is replaced by its size when it
/// would not be): a reader finds the last record within this many bytes of a file's end.
pub const MAX_RECORD_BYTES: usize = 32 << 10;
/// How far back from a segment's end its last record is looked for.
const TAIL_WINDOW: u64 = 2 * MAX_RECORD_BYTES as u64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The log cannot be written: new work must not start.
    #[error("the audit log cannot be written ({what} {}: {os}), so thaw refuses new work rather than run it unaudited. Fix: {fix}", path.display())]
    Unavailable {
        path: PathBuf,
        what: String,
        os: String,
        fix: String,
    },
    #[error("reading the audit log at {}: {os}", path.display())]
    Read { path: PathBuf, os: String },
}

/// Tuning of an [`Audit`].
#[derive(Debug, Clone)]
pub struct Options {
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
    /// Written records are made durable (`fdatasync`) at most this long after.
    pub sync_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 1 << 20,
            sync_interval: Duration::from_millis(100),
        }
    }
}

/// A destination of an egress connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Destination {
    /// The name the sandbox asked for (SNI, `Host`, `CONNECT host:port`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
    pub port: u16,
}

/// What is to be recorded. The engine fills `actor` (see `Engine::audit`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub action: AuditAction,
    pub actor: String,
    pub template: Option<String>,
    pub session: Option<String>,
    pub sandbox: Option<String>,
    /// Action-specific facts. Never secrets, payloads or file contents: sizes and hashes.
    pub detail: serde_json::Value,
}

impl AuditEvent {
    pub fn new(action: AuditAction) -> AuditEvent {
        AuditEvent {
            action,
            actor: String::new(),
            template: None,
            session: None,
            sandbox: None,
            detail: serde_json::Value::Null,
        }
    }

    pub fn actor(mut self, actor: impl Into<String>) -> AuditEvent {
        self.actor = actor.into();
        self
    }

    pub fn template(mut self, t: impl Into<String>) -> AuditEvent {
        self.template = Some(t.into());
        self
    }

    pub fn session(mut self, s: impl Into<String>) -> AuditEvent {
        self.session = Some(s.into());
        self
    }

    pub fn sandbox(mut self, s: impl Into<String>) -> AuditEvent {
        self.sandbox = Some(s.into());
        self
    }

    pub fn detail(mut self, d: serde_json::Value) -> AuditEvent {
        self.detail = d;
        self
    }

    /// Adds `key: value` to the detail object.
    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> AuditEvent {
        let v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        match &mut self.detail {
            serde_json::Value::Object(m) => {
                m.insert(key.to_string(), v);
            }
            other => {
                let mut m = serde_json::Map::new();
                m.insert(key.to_string(), v);
                *other = serde_json::Value::Object(m);
            }
        }
        self
    }

    /// The egress proxy's decision on one connection of `sandbox`.
    pub fn egress(sandbox: &str, destination: &Destination, allowed: bool, reason: &str) -> Self {
        let action = if allowed {
            AuditAction::EgressAllowed
        } else {
            AuditAction::EgressRefused
        };
        AuditEvent::new(action)
            .sandbox(sandbox)
            .with("destination", destination)
            .with("reason", reason)
    }

    /// The host killed processes of `sandbox` (`killed`: how many, where known).
    pub fn kill(sandbox: &str, reason: &str, killed: Option<u64>) -> AuditEvent {
        let e = AuditEvent::new(AuditAction::Kill)
            .sandbox(sandbox)
            .with("reason", reason);
        match killed {
            Some(n) => e.with("killed", n),
            None => e,
        }
    }

    /// A task of `sandbox` hit `limit` (`timeout`, `memory`, `output`, `host_timeout`,
    /// `output_flood`).
    pub fn limit_hit(sandbox: &str, limit: &str) -> AuditEvent {
        AuditEvent::new(AuditAction::LimitHit)
            .sandbox(sandbox)
            .with("limit", limit)
    }
}

/// argv as recorded: each argument cut at 512 bytes, and at most 8 KiB in all (a record
/// stays small; `argv_bytes` tells the whole size).
pub fn capped_argv(argv: &[String]) -> serde_json::Value {
    const ARG: usize = 512;
    const TOTAL: usize = 8 << 10;
    let mut out = Vec::new();
    let mut used = 0;
    for a in argv {
        if used >= TOTAL {
            out.push(serde_json::Value::String("…".into()));
            break;
        }
        let mut end = a.len().min(ARG).min(TOTAL - used);
        while !a.is_char_boundary(end) {
            end -= 1;
        }
        let mut s = a[..end].to_string();
        if end < a.len() {
            s.push('…');
        }
        used += end;
        out.push(serde_json::Value::String(s));
    }
    serde_json::Value::Array(out)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The fix for a failed write, from its error.
fn fix_for(dir: &Path, path: &Path, os: Option<i32>) -> String {
    let d = dir.display();
    match os {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => format!(
            "free space on the file system that holds {d} (`df -h {d}`), then restart thaw"
        ),
        Some(libc::EROFS) => {
            format!("remount the file system that holds {d} read-write, then restart thaw")
        }
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "make {} writable by thaw again (check `ls -l` and `lsattr`; `chattr -i -a` clears the immutable and append-only flags), then restart thaw",
            path.display()
        ),
        _ => format!(
            "repair {d} (a directory of NNNNNNNN.jsonl files that thaw can write), then restart thaw: it verifies the log and goes on after the last good record"
        ),
    }
}

/// An exclusive `flock` held until dropped.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(f: &'a File) -> std::io::Result<Flock<'a>> {
        loop {
            // SAFETY: flock on a descriptor this File owns; no memory is involved.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                return Ok(Flock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The segment being appended to.
struct Writer {
    num: u32,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes in the file as this process last knew them.
    len: u64,
    /// What the next record must be.
    next: Expect,
}

struct State {
    lock: Option<File>,
    writer: Option<Writer>,
    failure: Option<Error>,
}

struct Inner {
    dir: PathBuf,
    opts: Options,
    state: Mutex<State>,
    dirty: AtomicBool,
    /// The break the tail check found when the log was opened, if any.
    opened_break: Option<AuditBreak>,
}

/// The audit log of one thaw home. Cheap to clone (one log, shared).
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// What opening the tail found.
struct Opened {
    writer: Writer,
    broken: Option<AuditBreak>,
}

fn io_fail(dir: &Path, path: &Path, what: &str, e: &std::io::Error) -> Error {
    Error::Unavailable {
        path: path.to_path_buf(),
        what: what.to_string(),
        os: e.to_string(),
        fix: fix_for(dir, path, e.raw_os_error()),
    }
}

fn create_segment(dir: &Path, num: u32) -> Result<(PathBuf, File), Error> {
    let path = segment_path(dir, num);
    let f = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_fail(dir, &path, "creating", &e))?;
    Ok((path, f))
}

/// The last complete line of a file (within [`TAIL_WINDOW`] of its end).
fn last_line(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    if buf.last() != Some(&b'\n') {
        return Ok(None);
    }
    buf.pop();
    let start = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if from == 0 => 0,
        None => return Ok(None),
    };
    Ok(Some(buf[start..].to_vec()))
}

/// Where the chain stands at the end of segment `num` (its last record), if that can be
/// told; an edited last record still tells what it claims (the next record links to it).
fn end_of(dir: &Path, num: u32) -> Option<Expect> {
    let line = last_line(&segment_path(dir, num)).ok()??;
    match line::check(&line) {
        Ok(c) => Some(Expect::after(c.seq, &c.hash)),
        Err(_) => {
            #[derive(serde::Deserialize)]
            struct Claim {
                seq: u64,
                hash: String,
            }
            let c: Claim = serde_json::from_slice(&line).ok()?;
            Some(Expect::after(c.seq, &c.hash))
        }
    }
}

/// Verifies the last segment and opens it for appending, or, when it is broken, starts a
/// fresh segment with an `audit_chain_broken` record. Call under the flock.
fn open_tail(dir: &Path) -> Result<Opened, Error> {
    let segments = segment::list(dir).map_err(|e| io_fail(dir, dir, "listing", &e))?;
    let Some(&last) = segments.last() else {
        let (path, f) = create_segment(dir, 1)?;
        return Ok(Opened {
            writer: Writer {
                num: 1,
                path,
                file: Arc::new(f),
                len: 0,
                next: Expect::genesis(),
            },
            broken: None,
        });
    };
    let previous = segments.len().checked_sub(2).map(|i| segments[i]);
    let start = match previous {
        Some(p) => end_of(dir, p),
        None if last == 1 => Some(Expect::genesis()),
        // Every segment before this one is gone: `verify` reports that; the tail check
        // takes the chain from its first record.
        None => None,
    };
    let path = segment_path(dir, last);
    let data = std::fs::read(&path).map_err(|e| io_fail(dir, &path, "reading", &e))?;
    let mut walker = Walker::new(start.clone()).tail_check();
    walker.segment(last, previous, &data);
    let Some(found) = walker.first().cloned() else {
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_fail(dir, &path, "opening", &e))?;
        let next = match walker.head {
            Some(h) => Expect::after(h.seq, &h.hash),
            None => start.unwrap_or_else(Expect::genesis),
        };
        return Ok(Opened {
            writer: Writer {
                num: last,
                path,
                file: Arc::new(file),
                len: data.len() as u64,
                next,
            },
            broken: None,
        });
    };
    let brk = found.brk.clone();
    error!(
        segment = %brk.segment,
        line = brk.line,
        kind = ?brk.kind,
        "the audit log is broken: {}; its segment is kept as evidence and the log goes on in a fresh segment linked to the last good record (seq {})",
        brk.message,
        found.expected.seq.saturating_sub(1)
    );
    let (new_path, file) = create_segment(dir, last + 1)?;
    let detail = serde_json::json!({
        "segment": brk.segment,
        "line": brk.line,
        "kind": brk.kind,
        "expected_seq": brk.expected_seq,
        "found_seq": brk.found_seq,
        "message": brk.message,
    });
    let body = line::Body {
        seq: found.expected.seq,
        ts: now_ms(),
        actor: THAW_ACTOR,
        action: AuditAction::AuditChainBroken,
        template: None,
        session: None,
        sandbox: None,
        detail: &detail,
        prev: &found.expected.prev,
    };
    let enc = line::encode(&body).map_err(|e| Error::Unavailable {
        path: new_path.clone(),
        what: "encoding a record for".into(),
        os: e.to_string(),
        fix: "report this as a bug".into(),
    })?;
    (&file)
        .write_all(&enc.line)
        .map_err(|e| io_fail(dir, &new_path, "writing", &e))?;
    Ok(Opened {
        writer: Writer {
            num: last + 1,
            path: new_path,
            file: Arc::new(file),
            len: enc.line.len() as u64,
            next: Expect::after(found.expected.seq, &enc.hash),
        },
        broken: Some(brk),
    })
}

impl Audit {
    /// Opens (or creates) the log in `dir` and verifies its tail (see the crate docs).
    /// Never fails: a log that cannot be opened for writing is returned in the failed
    /// state, so that reading and verifying still work while new work is refused.
    pub fn open(dir: impl Into<PathBuf>, opts: Options) -> Audit {
        let dir = dir.into();
        let mut state = State {
            lock: None,
            writer: None,
            failure: None,
        };
        let opened = (|| -> Result<Opened, Error> {
            std::fs::create_dir_all(&dir).map_err(|e| io_fail(&dir, &dir, "creating", &e))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io_fail(&dir, &dir, "setting the mode of", &e))?;
            let lock_path = dir.join(".lock");
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .map_err(|e| io_fail(&dir, &lock_path, "opening", &e))?;
            let opened = {
                let _g = Flock::exclusive(&lock)
                    .map_err(|e| io_fail(&dir, &lock_path, "locking", &e))?;
                open_tail(&dir)?
            };
            state.lock = Some(lock);
            Ok(opened)
        })();
        let opened_break = match opened {
            Ok(o) => {
                state.writer = Some(o.writer);
                o.broken
            }
            Err(e) => {
                error!(error = %e, "the audit log cannot be opened for writing");
                state.failure = Some(e);
                None
            }
        };
        let inner = Arc::new(Inner {
            dir,
            state: Mutex::new(state),
            dirty: AtomicBool::new(false),
            opened_break,
            opts,
        });
        spawn_syncer(Arc::downgrade(&inner), inner.opts.sync_interval);
        Audit { inner }
    }

    /// The directory of the segment files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The break the tail check found when the log was opened (thaw went on in a fresh
    /// segment after it).
    pub fn opened_break(&self) -> Option<&AuditBreak> {
        self.inner.opened_break.as_ref()
    }

    /// Why the log cannot be written, if it cannot.
    pub fn failure(&self) -> Option<Error> {
        self.inner.lock().failure.clone()
    }

    /// Ok while the log can be written: what to check before starting new work.
    pub fn ready(&self) -> Result<(), Error> {
        self.failure().map_or(Ok(()), Err)
    }

    /// The last record this process knows of (another process may have appended since).
    pub fn head(&self) -> Option<AuditHead> {
        let st = self.inner.lock();
        let w = st.writer.as_ref()?;
        (w.next.seq > 1).then(|| AuditHead {
            seq: w.next.seq - 1,
            hash: w.next.prev.clone(),
        })
    }

    /// Appends one record; returns it as the head. An error means the record is not in the
    /// log, and the log is in the failed state (see the crate docs).
    pub fn append(&self, event: &AuditEvent) -> Result<AuditHead, Error> {
        let inner = &self.inner;
        let mut guard = inner.lock();
        let st = &mut *guard;
        if let Some(f) = &st.failure {
            return Err(f.clone());
        }
        let r = (|| -> Result<AuditHead, Error> {
            let lock = st.lock.as_ref().ok_or_else(|| Error::Unavailable {
                path: inner.dir.join(".lock"),
                what: "locking".into(),
                os: "not open".into(),
                fix: "restart thaw".into(),
            })?;
            let _g = Flock::exclusive(lock)
                .map_err(|e| io_fail(&inner.dir, &inner.dir.join(".lock"), "locking", &e))?;
            inner.catch_up(&mut st.writer)?;
            let w = st.writer.as_mut().ok_or_else(|| Error::Unavailable {
                path: inner.dir.clone(),
                what: "appending to".into(),
                os: "no segment is open".into(),
                fix: "restart thaw".into(),
            })?;
            if w.len >= inner.opts.segment_bytes {
                inner.rotate(w)?;
            }
            let oversized;
            let mut detail = &event.detail;
            let actor = if event.actor.is_empty() {
                "unknown"
            } else {
                &event.actor
            };
            let mut body = line::Body {
                seq: w.next.seq,
                ts: now_ms(),
                actor,
                action: event.action,
                template: event.template.as_deref(),
                session: event.session.as_deref(),
                sandbox: event.sandbox.as_deref(),
                detail,
                prev: &w.next.prev,
            };
            let encode_err = |e: serde_json::Error| Error::Unavailable {
                path: w.path.clone(),
                what: "encoding a record for".into(),
                os: e.to_string(),
                fix: "report this as a bug".into(),
            };
            let mut enc = line::encode(&body).map_err(encode_err)?;
            if enc.line.len() > MAX_RECORD_BYTES {
                oversized = serde_json::json!({"oversized_detail_bytes": serde_json::to_vec(&event.detail).map(|v| v.len()).unwrap_or(0)});
                detail = &oversized;
                body.detail = detail;
                enc = line::encode(&body).map_err(encode_err)?;
            }
            (&*w.file)
                .write_all(&enc.line)
                .map_err(|e| io_fail(&inner.dir, &w.path, "writing", &e))?;
            w.len += enc.line.len() as u64;
            let head = AuditHead {
                seq: w.next.seq,
                hash: enc.hash.clone(),
            };
            w.next = Expect::after(head.seq, &enc.hash);
            inner.dirty.store(true, Ordering::Release);
            Ok(head)
        })();
        r.map_err(|e| {
            error!(error = %e, action = event.action.as_str(), actor = %event.actor,
                template = ?event.template, session = ?event.session, sandbox = ?event.sandbox,
                detail = %event.detail, "audit record NOT written; the audit log is now failed");
            st.failure = Some(e.clone());
            e
        })
    }

    /// Verifies the whole log (see the crate docs); `pin`: a head taken earlier, which the
    /// log must still contain.
    pub fn verify(&self, pin: Option<AuditHead>) -> Result<AuditVerify, Error> {
        verify_dir(&self.inner.dir, pin)
    }

    /// Records matching `filter` (see [`Filter`]).
    pub fn query(&self, filter: &Filter) -> Result<AuditList, Error> {
        query::query(&self.inner.dir, filter)
    }

    /// Makes everything appended so far durable now.
    pub fn sync(&self) -> Result<(), Error> {
        self.inner.sync();
        self.ready()
    }
}

/// Verifies the log in `dir` without opening it for writing.
pub fn verify_dir(dir: &Path, pin: Option<AuditHead>) -> Result<AuditVerify, Error> {
    let read_err = |path: &Path, e: std::io::Error| Error::Read {
        path: path.to_path_buf(),
        os: e.to_string(),
    };
    let segments = match segment::list(dir) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(read_err(dir, e)),
    };
    let mut walker = Walker::new(Some(Expect::genesis())).pin(pin);
    let mut previous = None;
    for n in segments {
        let path = segment_path(dir, n);
        let data = std::fs::read(&path).map_err(|e| read_err(&path, e))?;
        // The first segment kept may not be 1 (older ones removed): that is a break too,
        // reported at its first line.
        walker.segment(n, previous.or(Some(0)), &data);
        previous = Some(n);
    }
    Ok(walker.finish())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Another process may have appended to the segment or moved on to a new one: if so,
    /// read the tail again (under the flock).
    fn catch_up(&self, writer: &mut Option<Writer>) -> Result<(), Error> {
        if let Some(w) = writer.as_ref() {
            let meta = w
                .file
                .metadata()
                .map_err(|e| io_fail(&self.dir, &w.path, "checking", &e))?;
            if meta.nlink() == 0 {
                return Err(removed(&self.dir, &w.path));
            }
            let moved_on = segment_path(&self.dir, w.num + 1).exists();
            if meta.len() == w.len && !moved_on {
                return Ok(());
            }
        }
        let opened = open_tail(&self.dir)?;
        if let Some(b) = &opened.broken {
            warn!(segment = %b.segment, line = b.line, "another thaw process left the audit log broken; going on in a fresh segment");
        }
        *writer = Some(opened.writer);
        Ok(())
    }

    fn rotate(&self, w: &mut Writer) -> Result<(), Error> {
        // The closed segment is made durable now; the background sync only follows the
        // open one.
        w.file
            .sync_data()
            .map_err(|e| io_fail(&self.dir, &w.path, "syncing", &e))?;
        let (path, f) = create_segment(&self.dir, w.num + 1)?;
        w.num += 1;
        w.path = path;
        w.file = Arc::new(f);
        w.len = 0;
        Ok(())
    }

    /// `fdatasync` of the open segment if anything was written since the last one.
    fn sync(&self) {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let target = {
            let st = self.lock();
            st.writer.as_ref().map(|w| (w.file.clone(), w.path.clone()))
        };
        let Some((file, path)) = target else { return };
        let r = file
            .sync_data()
            .map_err(|e| io_fail(&self.dir, &path, "syncing", &e));
        let r = r.and_then(|()| match file.metadata() {
            Ok(m) if m.nlink() == 0 => Err(removed(&self.dir, &path)),
            _ => Ok(()),
        });
        if let Err(e) = r {
            error!(error = %e, "the audit log is now failed");
            let mut st = self.lock();
            st.failure.get_or_insert(e);
        }
    }
}

fn removed(dir: &Path, path: &Path) -> Error {
    Error::Unavailable {
        path: path.to_path_buf(),
        what: "appending to".into(),
        os: "the file was deleted while thaw wrote it".into(),
        fix: format!(
            "restart thaw: it verifies the log in {} and goes on after the last good record (the deleted records are gone; `thaw audit verify` shows where)",
            dir.display()
        ),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.sync();
    }
}

/// The background `fdatasync` (see the crate docs). It holds the log weakly: it ends
/// within one interval of the last [`Audit`] being dropped.
fn spawn_syncer(inner: Weak<Inner>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("thaw-audit-sync".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            match inner.upgrade() {
                Some(i) => i.sync(),
                None => return,
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "no background sync thread for the audit log: records are synced when it closes");
    }
}

#[cfg(test)]
mod tests;
