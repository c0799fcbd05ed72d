//! Handlers of the audit routes: `GET /v1/audit` (records, filtered; a key that is not an
//! admin sees its own only) and `GET /v1/audit/verify` (admin keys: the whole chain).

use axum::http::StatusCode;
use axum::Json;
use thaw_api::{AuditHead, AuditList, AuditQuery, AuditVerify, AuditVerifyQuery, ErrorBody};
use thaw_platform::audit::{AuditAction, Filter};
use thaw_platform::keys::KeyRecord;

use crate::blocking;
use crate::error::ApiError;
use crate::extract::{Owner, QueryParams};

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The engine's filter for `q` asked by `key` (`None`: the machine's operator, through the
/// embedded CLI): a key that is not an admin is held to its own records.
pub fn filter_for(key: Option<&KeyRecord>, q: AuditQuery) -> Result<Filter, ApiError> {
    let admin = key.is_none_or(|k| k.admin);
    let actor = match (q.key, key) {
        (Some(k), Some(key)) if !admin && k != key.id => {
            return Err(forbidden(format!(
                "key {} is not an admin key, so it sees only its own audit records (key={}); an operator's key (`thaw keys create --admin`) sees every key's",
                key.id, key.id
            )))
        }
        (Some(k), _) => Some(k),
        (None, Some(key)) if !admin => Some(key.id.clone()),
        (None, _) => None,
    };
    let action = q
        .action
        .as_deref()
        .map(str::parse::<AuditAction>)
        .transpose()
        .map_err(|e| ApiError::bad_request(e).with_path("action"))?;
    let oldest_first = match q.order.as_deref() {
        None | Some("newest") => false,
        Some("oldest") => true,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "order `{o}` is neither `newest` nor `oldest`"
            ))
            .with_path("order"))
        }
    };
    let limit = q.limit.unwrap_or(thaw_platform::audit::DEFAULT_LIMIT);
    if limit == 0 || limit > thaw_platform::audit::MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {}, got {limit}",
            thaw_platform::audit::MAX_LIMIT
        ))
        .with_path("limit"));
    }
    let ms = |s: Option<u64>| s.map(|s| s.saturating_mul(1000));
    Ok(Filter {
        actor,
        template: q.template,
        session: q.session,
        sandbox: q.sandbox,
        action,
        since_ms: ms(q.since),
        // `until` is inclusive of its whole second.
        until_ms: q.until.map(|u| u.saturating_mul(1000).saturating_add(999)),
        limit,
        oldest_first,
    })
}

/// `SEQ:HASH`.
pub fn parse_head(s: &str) -> Result<AuditHead, String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| format!("head `{s}` is not SEQ:HASH (as `thaw audit verify` prints it)"))?;
    let seq: u64 = seq
        .parse()
        .map_err(|_| format!("head `{s}`: `{seq}` is not a record number"))?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "head `{s}`: `{hash}` is not a sha256 in hex (64 characters)"
        ));
    }
    Ok(AuditHead {
        seq,
        hash: hash.to_ascii_lowercase(),
    })
}

/// Audit records, newest first (`order=oldest` for the other way).
#[utoipa::path(
    get,
    path = "/v1/audit",
    operation_id = "list_audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "The matching records", body = AuditList),
        (status = 400, description = "A bad parameter (unknown action, order, limit); `path` names it", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "A key that is not an admin asked for another key's records", body = ErrorBody),
    )
)]
pub async fn list(
    owner: Owner,
    QueryParams(q): QueryParams<AuditQuery>,
) -> Result<Json<AuditList>, ApiError> {
    let filter = filter_for(Some(&owner.key), q)?;
    Ok(Json(
        blocking(move || owner.engine.audit_query(&filter)).await?,
    ))
}

/// Verifies the whole audit log's chain and reports the first break by position (admin
/// keys only: it reads every key's records). 200 whether or not the chain is intact:
/// `ok` says which.
#[utoipa::path(
    get,
    path = "/v1/audit/verify",
    operation_id = "verify_audit",
    tag = "audit",
    params(AuditVerifyQuery),
    responses(
        (status = 200, description = "The verification's report", body = AuditVerify),
        (status = 400, description = "A bad `head`", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
    )
)]
pub async fn verify(
    owner: Owner,
    QueryParams(q): QueryParams<AuditVerifyQuery>,
) -> Result<Json<AuditVerify>, ApiError> {
    if !owner.key.admin {
        return Err(forbidden(format!(
            "verifying the audit log reads every key's records: it needs an admin key (`thaw keys create --admin`), and key {} is not one",
            owner.key.id
        )));
    }
    let pin = q
        .head
        .as_deref()
        .map(parse_head)
        .transpose()
        .map_err(|e| ApiError::bad_request(e).with_path("head"))?;
    Ok(Json(
        blocking(move || owner.engine.audit_verify(pin)).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(admin: bool) -> KeyRecord {
        KeyRecord {
            id: "aaaaaaaaaaaa".into(),
            name: "k".into(),
            created_at: 0,
            revoked_at: None,
            max_sandboxes: 1,
            admin,
        }
    }

    #[test]
    fn a_plain_key_is_held_to_its_own_records() {
        let f = filter_for(Some(&key(false)), AuditQuery::default()).unwrap();
        assert_eq!(f.actor.as_deref(), Some("aaaaaaaaaaaa"));
        let own = AuditQuery {
            key: Some("aaaaaaaaaaaa".into()),
            ..AuditQuery::default()
        };
        assert!(filter_for(Some(&key(false)), own).is_ok());
        let other = AuditQuery {
            key: Some("bbbbbbbbbbbb".into()),
            ..AuditQuery::default()
        };
        let e = filter_for(Some(&key(false)), other.clone()).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::FORBIDDEN, "forbidden"));
        // An admin sees everyone's, or whose it names.
        assert_eq!(
            filter_for(Some(&key(true)), AuditQuery::default())
                .unwrap()
                .actor,
            None
        );
        assert_eq!(
            filter_for(Some(&key(true)), other)
                .unwrap()
                .actor
                .as_deref(),
            Some("bbbbbbbbbbbb")
        );
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let q = |f: fn(&mut AuditQuery)| {
            let mut q = AuditQuery::default();
            f(&mut q);
            filter_for(Some(&key(true)), q)
        };
        let e = q(|q| q.action = Some("exce".into())).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("action"));
        assert!(e.message.contains("exec"), "{}", e.message);
        assert_eq!(
            q(|q| q.order = Some("up".into()))
                .unwrap_err()
                .path
                .as_deref(),
            Some("order")
        );
        assert_eq!(
            q(|q| q.limit = Some(0)).unwrap_err().path.as_deref(),
            Some("limit")
        );
        let f = q(|q| {
            q.since = Some(10);
            q.until = Some(20);
            q.order = Some("oldest".into());
        })
        .unwrap();
        assert_eq!(
            (f.since_ms, f.until_ms, f.oldest_first),
            (Some(10_000), Some(20_999), true)
        );
    }

    #[test]
    fn heads_are_seq_colon_hash() {
        let h = parse_head(&format!("12:{}", "A".repeat(64))).unwrap();
        assert_eq!((h.seq, h.hash), (12, "a".repeat(64)));
        for bad in ["", "12", "x:abc", &format!("12:{}", "g".repeat(64))] {
            assert!(parse_head(bad).is_err(), "{bad}");
        }
    }
}
