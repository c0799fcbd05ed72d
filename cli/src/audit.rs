//! `thaw audit ls|verify`: the audit log, from the embedded engine (this machine's whole
//! log) or a server (`--server`: a key that is not an admin sees its own records only).

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Subcommand;
use thaw_api::{AuditList, AuditQuery, AuditRecord, AuditVerify};

use crate::backend::Backend;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// List audit records, newest first.
    Ls {
        /// Records of this API key's id (`local`: the embedded CLI's).
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        sandbox: Option<String>,
        /// An action: exec, invoke, file_put, session_pause, egress_refused, ...
        #[arg(long)]
        action: Option<String>,
        /// At or after: unix seconds, or a time ago such as 30s, 15m, 2h, 7d.
        #[arg(long, value_parser = parse_when)]
        since: Option<u64>,
        /// At or before: unix seconds, or a time ago such as 30s, 15m, 2h, 7d.
        #[arg(long, value_parser = parse_when)]
        until: Option<u64>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Oldest first.
        #[arg(long)]
        oldest: bool,
    },
    /// Verify the log's hash chain: the first edited, removed or reordered record, by
    /// position. Exits 1 when the chain is broken. Prints the head to pin.
    Verify {
        /// A head printed by an earlier verify (SEQ:HASH): the log must still hold that
        /// record unchanged (detects a rewrite of the whole chain).
        #[arg(long, value_name = "SEQ:HASH")]
        head: Option<String>,
    },
}

/// Unix seconds, or `<n>s|m|h|d` ago.
fn parse_when(s: &str) -> Result<u64, String> {
    if let Ok(v) = s.parse::<u64>() {
        return Ok(v);
    }
    let bad = || format!("`{s}` is neither unix seconds nor a time ago such as 30s, 15m, 2h, 7d");
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(bad()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(now.saturating_sub(secs))
}

pub async fn run(backend: &Backend, cmd: AuditCmd, json: bool) -> Result<ExitCode> {
    match cmd {
        AuditCmd::Ls {
            key,
            template,
            session,
            sandbox,
            action,
            since,
            until,
            limit,
            oldest,
        } => {
            let q = AuditQuery {
                key,
                template,
                session,
                sandbox,
                action,
                since,
                until,
                limit: Some(limit),
                order: Some(if oldest { "oldest" } else { "newest" }.to_string()),
            };
            let list = match backend {
                Backend::Local(e) => {
                    let filter = thaw_server::audit_filter(None, q)
                        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                    e.audit_query(&filter)?
                }
                Backend::Remote(c) => c.audit(&q).await?,
            };
            if json {
                print_json(&list)?;
            } else {
                print_list(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCmd::Verify { head } => {
            let pin = head
                .as_deref()
                .map(thaw_server::parse_audit_head)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--head: {e}"))?;
            let v = match backend {
                Backend::Local(e) => e.audit_verify(pin).context("verifying the audit log")?,
                Backend::Remote(c) => c.audit_verify(pin.as_ref()).await?,
            };
            if json {
                print_json(&v)?;
            } else {
                print_verify(&v);
            }
            Ok(if v.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of unix milliseconds (UTC; the civil-from-days algorithm).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn print_list(list: &AuditList) {
    if list.records.is_empty() {
        println!("no audit records match");
        return;
    }
    println!(
        "{:>7}  {:<24}  {:<12}  {:<17}  {:<12}  {:<20}  {:<19}  DETAIL",
        "SEQ", "TIME (UTC)", "ACTOR", "ACTION", "TEMPLATE", "SESSION", "SANDBOX"
    );
    for r in &list.records {
        print_record(r);
    }
    if list.more {
        println!("(more records match: raise --limit or narrow the filter)");
    }
}

fn print_record(r: &AuditRecord) {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let detail = if r.detail.is_null() {
        String::new()
    } else {
        r.detail.to_string()
    };
    println!(
        "{:>7}  {:<24}  {:<12}  {:<17}  {:<12}  {:<20}  {:<19}  {}",
        r.seq,
        utc(r.ts),
        r.actor,
        r.action.as_str(),
        dash(&r.template),
        dash(&r.session),
        dash(&r.sandbox),
        detail
    );
}

fn kind(k: thaw_api::BreakKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn print_verify(v: &AuditVerify) {
    if v.ok {
        println!(
            "audit log intact: {} records in {} segments",
            v.records, v.segments
        );
    } else {
        println!(
            "audit log BROKEN: {} break(s) in {} records, {} segments",
            v.breaks.len(),
            v.records,
            v.segments
        );
        if let Some(b) = &v.first_break {
            println!(
                "first break ({}): {}{}",
                kind(b.kind),
                b.message,
                if b.acknowledged {
                    " (thaw found it when it opened the log and went on in a fresh segment linked to the last good record)"
                } else {
                    ""
                }
            );
        }
        for b in v.breaks.iter().skip(1) {
            println!("also ({}): {}", kind(b.kind), b.message);
        }
        if let Some(r) = v.resumed_at {
            println!("the chain verifies again from record {r} to the head");
        }
    }
    match &v.head {
        Some(h) => println!(
            "head: {}:{} (keep it somewhere thaw's host cannot write; `thaw audit verify --head {}:{}` later proves the log was not rewritten up to it)",
            h.seq, h.hash, h.seq, h.hash
        ),
        None => println!("head: none (the log is empty)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_and_ago() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_709_251_199_123), "2024-02-29T23:59:59.123Z");
        assert_eq!(parse_when("1700000000"), Ok(1_700_000_000));
        let now = parse_when("0s").unwrap();
        assert_eq!(parse_when("2h").unwrap(), now - 7200);
        assert!(parse_when("2w").is_err());
        assert!(parse_when("").is_err());
    }
}
