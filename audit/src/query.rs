//! Reading records back, filtered. Segments are read one at a time (each is at most
//! [`crate::Options::segment_bytes`] plus one record), never the whole log at once.

use std::path::Path;

use thaw_types::audit::{AuditAction, AuditList, AuditRecord};

use crate::segment::{list, segment_path};
use crate::{line, Error};

/// Which records [`crate::Audit::query`] returns. Every field set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The actor: an API key's id, or `local`.
    pub actor: Option<String>,
    pub template: Option<String>,
    pub session: Option<String>,
    pub sandbox: Option<String>,
    pub action: Option<AuditAction>,
    /// At or after, unix milliseconds.
    pub since_ms: Option<u64>,
    /// At or before, unix milliseconds.
    pub until_ms: Option<u64>,
    /// At most this many records (0: [`DEFAULT_LIMIT`]).
    pub limit: usize,
    /// Oldest first instead of newest first (the default: what `ls` most often wants is
    /// what just happened).
    pub oldest_first: bool,
}

/// Records returned when a query names no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// Most records one query returns.
pub const MAX_LIMIT: usize = 10_000;

impl Filter {
    fn matches(&self, r: &AuditRecord) -> bool {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_deref() == Some(w))
        };
        self.actor.as_ref().is_none_or(|a| *a == r.actor)
            && eq(&self.template, &r.template)
            && eq(&self.session, &r.session)
            && eq(&self.sandbox, &r.sandbox)
            && self.action.is_none_or(|a| a == r.action)
            && self.since_ms.is_none_or(|s| r.ts >= s)
            && self.until_ms.is_none_or(|u| r.ts <= u)
    }

    fn limit(&self) -> usize {
        match self.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        os: e.to_string(),
    })
}

/// Runs `filter` over the log in `dir`. Lines that are not records (a cut-off tail, an
/// edited line that no longer parses) are skipped: `verify` is what reports them.
pub(crate) fn query(dir: &Path, filter: &Filter) -> Result<AuditList, Error> {
    let limit = filter.limit();
    let mut segments = list(dir).map_err(|e| Error::Read {
        path: dir.to_path_buf(),
        os: e.to_string(),
    })?;
    if !filter.oldest_first {
        segments.reverse();
    }
    let mut records = Vec::new();
    let mut more = false;
    'segments: for n in segments {
        let data = read(&segment_path(dir, n))?;
        let mut parsed: Vec<AuditRecord> = line::lines(&data)
            .into_iter()
            .filter(|l| l.terminated)
            .filter_map(|l| serde_json::from_slice(l.bytes).ok())
            .collect();
        // Segments are in time order: once a whole segment is before `since` (newest
        // first) or after `until` (oldest first), the rest are too.
        let past_range = match (filter.oldest_first, parsed.first(), parsed.last()) {
            (false, Some(first), _) => filter.since_ms.is_some_and(|s| first.ts < s),
            (true, _, Some(last)) => filter.until_ms.is_some_and(|u| last.ts > u),
            _ => false,
        };
        if !filter.oldest_first {
            parsed.reverse();
        }
        for r in parsed {
            if filter.matches(&r) {
                if records.len() == limit {
                    more = true;
                    break 'segments;
                }
                records.push(r);
            }
        }
        if past_range {
            break;
        }
    }
    Ok(AuditList { records, more })
}
