//! Walking the chain: every record's hash, and its link to the record before (`seq` one
//! more, `prev` its hash). Used by [`crate::Audit::verify`] over the whole log, and by the
//! writer over the last segment when it opens the log.

use std::collections::HashMap;

use thaw_types::audit::{AuditBreak, AuditHead, AuditVerify, BreakKind};

use crate::line::{self, Bad, Checked, ZERO_HASH};
use crate::segment::segment_name;

/// Breaks kept in a report (all are counted).
const MAX_BREAKS: usize = 100;

/// What the chain expects of the next record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expect {
    pub seq: u64,
    pub prev: String,
}

impl Expect {
    pub fn genesis() -> Expect {
        Expect {
            seq: 1,
            prev: ZERO_HASH.to_string(),
        }
    }

    pub fn after(seq: u64, hash: &str) -> Expect {
        Expect {
            seq: seq + 1,
            prev: hash.to_string(),
        }
    }
}

/// A break with where the chain stood (what it expected) when it was found.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub segment: u32,
    pub brk: AuditBreak,
    /// The chain as it stood before the broken record: the last good record is
    /// `expected.seq - 1`, whose hash is `expected.prev`.
    pub expected: Expect,
}

pub(crate) struct Walker {
    expected: Expect,
    /// The chain may start with whatever record comes first (the writer's tail check,
    /// when the segment before gives nothing to link to), or with a restart record.
    lenient_start: bool,
    /// The writer's tail check: the segment checked may start with a restart record
    /// (whose break is in an earlier segment, which only a full verify reads).
    restart_start: bool,
    started: bool,
    breaks: Vec<Found>,
    total_breaks: u64,
    /// Breaks that a later `audit_chain_broken` record may acknowledge.
    pending: Vec<(Expect, usize)>,
    pub records: u64,
    pub segments: u64,
    pub head: Option<AuditHead>,
    resumed_at: Option<u64>,
    pin: Option<AuditHead>,
    /// Hash of the good record with the pin's seq, where it was (segment, line).
    pin_seen: Option<(String, u32, u64)>,
    last_pos: (u32, u64),
}

impl Walker {
    pub fn new(start: Option<Expect>) -> Walker {
        Walker {
            lenient_start: start.is_none(),
            restart_start: false,
            expected: start.unwrap_or_else(Expect::genesis),
            started: false,
            breaks: Vec::new(),
            total_breaks: 0,
            pending: Vec::new(),
            records: 0,
            segments: 0,
            head: None,
            resumed_at: None,
            pin: None,
            pin_seen: None,
            last_pos: (0, 0),
        }
    }

    /// For the writer's tail check (see `restart_start`).
    pub fn tail_check(mut self) -> Walker {
        self.restart_start = true;
        self
    }

    pub fn pin(mut self, pin: Option<AuditHead>) -> Walker {
        self.pin = pin;
        self
    }

    /// The first break found, if any.
    pub fn first(&self) -> Option<&Found> {
        self.breaks.first()
    }

    fn push(&mut self, segment: u32, brk: AuditBreak) {
        self.total_breaks += 1;
        self.resumed_at = None;
        if self.breaks.len() < MAX_BREAKS {
            self.pending
                .push((self.expected.clone(), self.breaks.len()));
            self.breaks.push(Found {
                segment,
                brk,
                expected: self.expected.clone(),
            });
        }
    }

    fn good(&mut self, segment: u32, line: u64, c: &Checked) {
        if self.total_breaks > 0 && self.resumed_at.is_none() {
            self.resumed_at = Some(c.seq);
        }
        if let Some(pin) = &self.pin {
            if pin.seq == c.seq && self.pin_seen.as_ref().is_none_or(|(h, ..)| h != &pin.hash) {
                self.pin_seen = Some((c.hash.clone(), segment, line));
            }
        }
        self.expected = Expect::after(c.seq, &c.hash);
        self.head = Some(AuditHead {
            seq: c.seq,
            hash: c.hash.clone(),
        });
    }

    /// A segment that should come after `previous` (numbers are consecutive: a gap is a
    /// removed segment).
    pub fn segment(&mut self, num: u32, previous: Option<u32>, data: &[u8]) {
        self.segments += 1;
        let name = segment_name(num);
        let lines = line::lines(data);
        // seq -> index of its first line, built when a seq mismatch needs a lookahead.
        let mut seqs: Option<HashMap<u64, usize>> = None;
        let missing = previous.filter(|p| num > p + 1);
        for (i, l) in lines.iter().enumerate() {
            self.records += 1;
            self.last_pos = (num, l.no);
            let at = |kind, found_seq, message: String| AuditBreak {
                segment: name.clone(),
                line: l.no,
                kind,
                expected_seq: 0,
                found_seq,
                message,
                acknowledged: false,
            };
            if !l.terminated {
                let brk = at(
                    BreakKind::Truncated,
                    line::loose_seq(l.bytes),
                    format!("{name} ends in the middle of a record (line {})", l.no),
                );
                self.report(num, brk);
                continue;
            }
            let c = match line::check(l.bytes) {
                Ok(c) => c,
                Err(Bad::HashMismatch { seq }) => {
                    let brk = at(
                        BreakKind::Edited,
                        seq,
                        format!(
                            "{name} line {}: the record was edited (its bytes do not match its hash)",
                            l.no
                        ),
                    );
                    self.report(num, brk);
                    // The next record links to the hash this one claims, which is the
                    // original's: the chain goes on from it.
                    if let Some(s) = seq {
                        if let Ok(claimed) = claimed_hash(l.bytes) {
                            self.expected = Expect::after(s, &claimed);
                        }
                    }
                    continue;
                }
                Err(Bad::Malformed { why, seq }) => {
                    let brk = at(
                        BreakKind::Edited,
                        seq,
                        format!("{name} line {}: not a record: {why}", l.no),
                    );
                    self.report(num, brk);
                    continue;
                }
            };
            let first_of_segment = l.no == 1;
            if !self.started && (self.lenient_start || (self.restart_start && c.chain_broken)) {
                self.started = true;
                self.good(num, l.no, &c);
                continue;
            }
            self.started = true;
            // A restart record thaw wrote after finding a break: it links to the last good
            // record before that break.
            if c.chain_broken && first_of_segment {
                let here = Expect {
                    seq: c.seq,
                    prev: c.prev.clone(),
                };
                if let Some(p) = self.pending.iter().position(|(e, _)| *e == here) {
                    let (_, idx) = self.pending.remove(p);
                    self.breaks[idx].brk.acknowledged = true;
                    self.good(num, l.no, &c);
                    // The chain thaw went on with starts here (records after the break
                    // in the broken segment are not part of it).
                    self.resumed_at = Some(c.seq);
                    continue;
                }
            }
            if c.seq == self.expected.seq && c.prev == self.expected.prev {
                self.good(num, l.no, &c);
                continue;
            }
            let (kind, message) = if c.seq > self.expected.seq {
                let later = seqs
                    .get_or_insert_with(|| index_seqs(&lines))
                    .get(&self.expected.seq)
                    .is_some_and(|&j| j > i);
                if later {
                    (
                        BreakKind::Reordered,
                        format!(
                            "{name} line {}: record {} comes before record {}",
                            l.no, c.seq, self.expected.seq
                        ),
                    )
                } else {
                    let what = match (first_of_segment, missing) {
                        (true, Some(p)) => format!(
                            "; segment files {} to {} are missing",
                            segment_name(p + 1),
                            segment_name(num - 1)
                        ),
                        _ => String::new(),
                    };
                    (
                        BreakKind::Removed,
                        format!(
                            "{name} line {}: records {} to {} are missing{what}",
                            l.no,
                            self.expected.seq,
                            c.seq - 1
                        ),
                    )
                }
            } else if c.seq < self.expected.seq {
                (
                    BreakKind::Reordered,
                    format!(
                        "{name} line {}: record {} comes after record {}",
                        l.no,
                        c.seq,
                        self.expected.seq - 1
                    ),
                )
            } else {
                (
                    BreakKind::Removed,
                    format!(
                        "{name} line {}: record {} does not link to the record before it (that one was replaced or removed)",
                        l.no, c.seq
                    ),
                )
            };
            let brk = at(kind, Some(c.seq), message);
            self.report(num, brk);
            // Go on from this record: later breaks are reported on their own.
            self.expected = Expect::after(c.seq, &c.hash);
            self.head = Some(AuditHead {
                seq: c.seq,
                hash: c.hash.clone(),
            });
        }
    }

    fn report(&mut self, segment: u32, mut brk: AuditBreak) {
        brk.expected_seq = self.expected.seq;
        self.started = true;
        self.push(segment, brk);
    }

    pub fn finish(mut self) -> AuditVerify {
        if let Some(pin) = self.pin.clone() {
            match &self.pin_seen {
                Some((hash, ..)) if *hash == pin.hash => {}
                Some((hash, seg, line)) => {
                    let (seg, line) = (*seg, *line);
                    let brk = AuditBreak {
                        segment: segment_name(seg),
                        line,
                        kind: BreakKind::Rewritten,
                        expected_seq: pin.seq,
                        found_seq: Some(pin.seq),
                        message: format!(
                            "record {} has hash {hash}, not the pinned {}: the log was rewritten since the pin was taken",
                            pin.seq, pin.hash
                        ),
                        acknowledged: false,
                    };
                    self.push(seg, brk);
                }
                None => {
                    let (seg, line) = self.last_pos;
                    let brk = AuditBreak {
                        segment: segment_name(seg.max(1)),
                        line,
                        kind: BreakKind::Rewritten,
                        expected_seq: pin.seq,
                        found_seq: None,
                        message: format!(
                            "the log has no good record {} (the pinned head): it was cut back or rewritten since the pin was taken",
                            pin.seq
                        ),
                        acknowledged: false,
                    };
                    self.push(seg, brk);
                }
            }
        }
        self.breaks
            .sort_by_key(|f| (f.segment, f.brk.line, f.brk.kind != BreakKind::Rewritten));
        let breaks: Vec<AuditBreak> = self.breaks.into_iter().map(|f| f.brk).collect();
        AuditVerify {
            ok: self.total_breaks == 0,
            records: self.records,
            segments: self.segments,
            head: self.head,
            first_break: breaks.first().cloned(),
            breaks,
            resumed_at: self.resumed_at,
        }
    }
}

fn index_seqs(lines: &[line::Line<'_>]) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(s) = line::loose_seq(l.bytes) {
            m.entry(s).or_insert(i);
        }
    }
    m
}

/// The `hash` a line claims (its last member), whether or not it matches.
fn claimed_hash(line: &[u8]) -> Result<String, ()> {
    #[derive(serde::Deserialize)]
    struct H {
        hash: String,
    }
    serde_json::from_slice::<H>(line)
        .map(|h| h.hash)
        .map_err(|_| ())
}
