//! Checks of a request body made before any slot is taken or sandbox restored: argv and
//! env that no process could be given (NUL bytes, an empty argv, `=` in a name), and
//! timeouts over the template's limit or the server's maximum. Each refusal is a 400 whose
//! `path` names the field and whose message names the value, the cap and the fix.
//!
//! These live in the server, not the engine: the caps are the server's configuration, and
//! the engine's local caller (the `thaw` CLI, run by the machine's operator) may ask for
//! any timeout. The engine would also only find a bad argv after restoring a sandbox.

use std::collections::BTreeMap;
use std::time::Duration;

use thaw_platform::template::spec::Limits;

use crate::error::ApiError;
use crate::ServerConfig;

fn nul(s: &str) -> bool {
    s.contains('\0')
}

/// A command line: not empty, no NUL byte in any argument.
pub fn argv(argv: &[String]) -> Result<(), ApiError> {
    if argv.is_empty() {
        return Err(ApiError::bad_request(
            "`argv` is empty: give the program and its arguments, e.g. [\"sh\", \"-c\", \"echo hi\"]",
        )
        .with_path("argv"));
    }
    if let Some(i) = argv.iter().position(|a| nul(a)) {
        return Err(ApiError::bad_request(format!(
            "`argv[{i}]` contains a NUL byte, which no program can be given as an argument; remove it"
        ))
        .with_path(format!("argv[{i}]")));
    }
    Ok(())
}

/// Environment variables: non-empty names without `=` or NUL, values without NUL.
pub fn env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        let path = format!("env.{k}");
        if k.is_empty() {
            return Err(ApiError::bad_request(
                "`env` has a variable with an empty name; give every variable a name",
            )
            .with_path("env"));
        }
        if k.contains('=') {
            return Err(ApiError::bad_request(format!(
                "`env` name {k:?} contains `=`, which would end the name there; use a name without `=`"
            ))
            .with_path(path));
        }
        if nul(k) {
            return Err(ApiError::bad_request(format!(
                "`env` name {k:?} contains a NUL byte, which no process environment can hold; remove it"
            ))
            .with_path("env"));
        }
        if nul(v) {
            return Err(ApiError::bad_request(format!(
                "`env.{k}` contains a NUL byte, which no process environment can hold; remove it"
            ))
            .with_path(path));
        }
    }
    Ok(())
}

/// A call's `timeout_ms`: at least 1, at most the template's `limits.timeout_s` and the
/// server's `--max-call-timeout`.
pub fn call_timeout(
    timeout_ms: Option<u64>,
    limits: &Limits,
    cfg: &ServerConfig,
) -> Result<(), ApiError> {
    let Some(t) = timeout_ms else {
        return Ok(());
    };
    let bad = |m: String| ApiError::bad_request(m).with_path("timeout_ms");
    if t == 0 {
        return Err(bad(
            "`timeout_ms` is 0: ask for at least 1, or leave it out for the template's limit"
                .to_string(),
        ));
    }
    let template = limits.timeout_s.saturating_mul(1000);
    if t > template {
        return Err(bad(format!(
            "`timeout_ms` {t} is over the template's limit of {template} ms (limits.timeout_s = {}); ask for at most {template}, or raise limits.timeout_s and deploy the template again",
            limits.timeout_s
        )));
    }
    let server = millis(cfg.max_call_timeout);
    if t > server {
        return Err(bad(format!(
            "`timeout_ms` {t} is over this server's maximum of {server} ms (thaw serve --max-call-timeout); ask for at most {server}"
        )));
    }
    Ok(())
}

/// A session's `idle_timeout_s` and `max_lifetime_s`: at least 1, at most the server's
/// `--max-session-idle` and `--max-session-lifetime`.
pub fn session_times(
    idle_timeout_s: Option<u64>,
    max_lifetime_s: Option<u64>,
    cfg: &ServerConfig,
) -> Result<(), ApiError> {
    let check = |field: &str, value: Option<u64>, max: Duration, flag: &str| {
        let Some(v) = value else {
            return Ok(());
        };
        let max = max.as_secs();
        if v == 0 {
            Err(ApiError::bad_request(format!(
                "`{field}` is 0: ask for at least 1 second, or leave it out for the default"
            ))
            .with_path(field))
        } else if v > max {
            Err(ApiError::bad_request(format!(
                "`{field}` {v} is over this server's maximum of {max} s (thaw serve {flag}); ask for at most {max}"
            ))
            .with_path(field))
        } else {
            Ok(())
        }
    };
    check(
        "idle_timeout_s",
        idle_timeout_s,
        cfg.max_session_idle,
        "--max-session-idle",
    )?;
    check(
        "max_lifetime_s",
        max_lifetime_s,
        cfg.max_session_lifetime,
        "--max-session-lifetime",
    )
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn argv_must_be_a_command_without_nul_bytes() {
        assert!(argv(&s(&["true"])).is_ok());
        assert_eq!(argv(&[]).unwrap_err().path.as_deref(), Some("argv"));
        let e = argv(&s(&["sh", "-c", "a\0b"])).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("argv[2]"));
        assert!(e.message.contains("NUL"), "{}", e.message);
    }

    #[test]
    fn env_names_and_values_are_checked() {
        let e1 = |k: &str, v: &str| env(&BTreeMap::from([(k.to_string(), v.to_string())]));
        assert!(e1("A", "b=c").is_ok());
        assert_eq!(e1("", "x").unwrap_err().path.as_deref(), Some("env"));
        assert_eq!(e1("A=B", "x").unwrap_err().path.as_deref(), Some("env.A=B"));
        assert_eq!(e1("A\0", "x").unwrap_err().path.as_deref(), Some("env"));
        assert_eq!(e1("A", "x\0").unwrap_err().path.as_deref(), Some("env.A"));
    }

    #[test]
    fn timeouts_are_capped_by_the_template_and_the_server() {
        let cfg = ServerConfig {
            max_call_timeout: Duration::from_secs(10),
            ..ServerConfig::default()
        };
        let limits = Limits {
            timeout_s: 20,
            ..Limits::default()
        };
        assert!(call_timeout(None, &limits, &cfg).is_ok());
        assert!(call_timeout(Some(10_000), &limits, &cfg).is_ok());
        let e = call_timeout(Some(10_001), &limits, &cfg).unwrap_err();
        assert!(
            e.message.contains("10001") && e.message.contains("10000 ms"),
            "{}",
            e.message
        );
        let e = call_timeout(Some(20_001), &limits, &cfg).unwrap_err();
        assert!(e.message.contains("limits.timeout_s = 20"), "{}", e.message);
        assert_eq!(e.path.as_deref(), Some("timeout_ms"));
        assert!(call_timeout(Some(0), &limits, &cfg).is_err());

        let e = session_times(Some(u64::MAX), None, &cfg).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("idle_timeout_s"));
        let e = session_times(None, Some(0), &cfg).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("max_lifetime_s"));
        assert!(session_times(Some(60), Some(3600), &cfg).is_ok());
    }
}
