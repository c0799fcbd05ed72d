//! One record as a line of bytes: how it is written and how a line is checked on its own.
//!
//! A record's `hash` is the sha256 of the record's own bytes as written, without its `hash`
//! member: the line up to `,"hash":"`, closed by `}`. Hashing the written bytes (rather than
//! a re-serialization of the parsed record) means a verifier never depends on how a JSON
//! library orders keys, escapes strings or prints numbers: any changed byte is a changed
//! hash. The writer always puts `hash` last, so the hashed bytes are exactly the JSON of the
//! record without it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thaw_types::audit::AuditAction;

/// `prev` of the first record of a log.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_KEY: &[u8] = b",\"hash\":\"";
/// `,"hash":"<64 hex>"}`
const SUFFIX_LEN: usize = HASH_KEY.len() + 64 + 2;

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A record without its hash, in the order it is written.
#[derive(Serialize)]
pub(crate) struct Body<'a> {
    pub seq: u64,
    pub ts: u64,
    pub actor: &'a str,
    pub action: AuditAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<&'a str>,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: &'a serde_json::Value,
    pub prev: &'a str,
}

/// A whole line (newline included) and its hash.
pub(crate) struct Encoded {
    pub line: Vec<u8>,
    pub hash: String,
}

pub(crate) fn encode(body: &Body<'_>) -> Result<Encoded, serde_json::Error> {
    let mut line = serde_json::to_vec(body)?;
    let hash = sha256_hex(&line);
    // `{...}` becomes `{...,"hash":"<hex>"}\n`.
    line.pop();
    line.extend_from_slice(HASH_KEY);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok(Encoded { line, hash })
}

/// What the chain needs of a record (the action loosely: a newer thaw's actions are fine).
#[derive(Deserialize)]
struct Link {
    seq: u64,
    prev: String,
    hash: String,
    #[serde(default)]
    action: String,
}

/// A line that is a record whose hash matches its bytes.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    pub chain_broken: bool,
}

/// Why a line is not a good record.
#[derive(Debug, Clone)]
pub(crate) enum Bad {
    /// Not a record at all (not JSON, no trailing `hash`).
    Malformed { why: String, seq: Option<u64> },
    /// A record whose bytes do not hash to its `hash`.
    HashMismatch { seq: Option<u64> },
}

/// The `seq` of a line, if it parses that far (for reporting and reorder lookahead).
pub(crate) fn loose_seq(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
}

/// Checks one line (without its newline) on its own.
pub(crate) fn check(line: &[u8]) -> Result<Checked, Bad> {
    let malformed = |why: &str| Bad::Malformed {
        why: why.to_string(),
        seq: loose_seq(line),
    };
    if line.len() < SUFFIX_LEN + 2 || !line.ends_with(b"\"}") {
        return Err(malformed("it does not end with a `hash` member"));
    }
    let cut = line.len() - SUFFIX_LEN;
    if &line[cut..cut + HASH_KEY.len()] != HASH_KEY {
        return Err(malformed("it does not end with a `hash` member"));
    }
    let stored = &line[cut + HASH_KEY.len()..line.len() - 2];
    let mut hasher = Sha256::new();
    hasher.update(&line[..cut]);
    hasher.update(b"}");
    let actual = hex(&hasher.finalize());
    if actual.as_bytes() != stored {
        return Err(Bad::HashMismatch {
            seq: loose_seq(line),
        });
    }
    let link: Link = serde_json::from_slice(line)
        .map_err(|e| malformed(&format!("it is not a record ({e})")))?;
    if link.hash.as_bytes() != stored {
        return Err(malformed("its `hash` member is not its last"));
    }
    Ok(Checked {
        seq: link.seq,
        prev: link.prev,
        hash: link.hash,
        chain_broken: link.action == AuditAction::AuditChainBroken.as_str(),
    })
}

/// One line of a segment file.
pub(crate) struct Line<'a> {
    /// 1-based.
    pub no: u64,
    pub bytes: &'a [u8],
    /// Ends with a newline (the last line of a file cut off mid-record does not).
    pub terminated: bool,
}

/// The lines of a segment's bytes.
pub(crate) fn lines(data: &[u8]) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut no = 0;
    while start < data.len() {
        no += 1;
        match data[start..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.push(Line {
                    no,
                    bytes: &data[start..start + i],
                    terminated: true,
                });
                start += i + 1;
            }
            None => {
                out.push(Line {
                    no,
                    bytes: &data[start..],
                    terminated: false,
                });
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(detail: &serde_json::Value) -> Body<'_> {
        Body {
            seq: 7,
            ts: 1,
            actor: "local",
            action: AuditAction::Exec,
            template: Some("shell"),
            session: None,
            sandbox: Some("sb-1"),
            detail,
            prev: ZERO_HASH,
        }
    }

    #[test]
    fn a_written_line_checks_and_any_changed_byte_does_not() {
        let detail = serde_json::json!({"argv": ["echo", "hi"], "exit_code": 0});
        let e = encode(&body(&detail)).unwrap();
        assert!(e.line.ends_with(b"\"}\n"));
        let line = &e.line[..e.line.len() - 1];
        let c = check(line).unwrap();
        assert_eq!((c.seq, c.hash.as_str()), (7, e.hash.as_str()));
        assert_eq!(
            e.hash,
            sha256_hex(&serde_json::to_vec(&body(&detail)).unwrap())
        );
        for i in 0..line.len() {
            let mut bad = line.to_vec();
            bad[i] ^= 0x01;
            assert!(check(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn lines_know_whether_they_were_finished() {
        let l = lines(b"a\nbb\nc");
        assert_eq!(l.len(), 3);
        assert!(l[0].terminated && l[1].terminated && !l[2].terminated);
        assert_eq!((l[2].no, l[2].bytes), (3, &b"c"[..]));
        assert!(lines(b"").is_empty());
    }
}
