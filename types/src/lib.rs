//! thaw's data types: what the engine records and what the HTTP API answers, as plain serde
//! types with no engine code behind them.
//!
//! Both `thaw-platform` (the engine, which re-exports each type at its historical path, e.g.
//! `thaw_platform::session::Session`) and `thaw-api` (the client) depend on this crate, so a
//! client of `thaw serve` compiles none of the engine. The JSON form of every type is part
//! of the API contract: fields are added with `#[serde(default)]`, never renamed.
//!
//! Behaviour that needs the engine (loading and validating a `template.toml`, a template's
//! uid range or why it has none) stays in `thaw-platform`, as extension traits.

pub mod audit;
pub mod ids;
pub mod keys;
pub mod live;
pub mod rollout;
pub mod run;
pub mod session;
pub mod spec;
pub mod template;
pub mod tier;

pub use audit::{
    AuditAction, AuditBreak, AuditHead, AuditList, AuditRecord, AuditVerify, BreakKind,
};
pub use ids::IdMap;
pub use keys::KeyRecord;
pub use live::{KillList, KillReport, LiveSandbox, RunningTask, SandboxFigures, SandboxList};
pub use rollout::{Checkpoint, ResetOutcome, Reward};
pub use run::{ExecResult, Invocation, InvokeDone, StartKind, Timings};
pub use session::{Session, SessionState, TimeoutAction};
pub use spec::{
    BaseSpec, BuildLimits, FileSpec, HandlerModeSpec, HandlerSpec, Limits, NetworkGrant,
    NetworkSpec, RewardSpec, SecretGrant, TemplateSpec, WarmupSpec,
};
pub use template::{SnapshotSize, TemplateRecord, TemplateState};
pub use tier::{Tier, TierChoice};

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// Every key of `want` is in `got` with the same value (`got` may have more: fields are
    /// added over time, with defaults).
    fn assert_keeps(want: &Value, got: &Value) {
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&got[k], v, "field {k}: {got}");
        }
    }

    /// The JSON form is the API's contract and what the engine's database holds: records
    /// read back and write out with the same fields, and defaults fill what old ones lack.
    #[test]
    fn records_keep_their_json_form() {
        let record = json!({
            "name": "shell",
            "source_dir": "/src/shell",
            "layers": ["/layers/a", "/layers/b"],
            "layer_key": "k1",
            "tier": "microvm",
            "state": "needs_rebuild",
            "snapshot": "tpl-shell",
            "published_at": 1,
            "publish_ms": 2,
            "warm_ms": 3,
            "snapshot_size": {"raw_bytes": 4, "stored_bytes": 5, "checkpoint_ms": 6},
            "note": null,
            "ids": {"host_base": 1_073_741_824u64, "size": 65_536},
        });
        let mut with_spec = record.clone();
        with_spec["spec"] = json!({
            "name": "shell",
            "base": {"kind": "busybox"},
            "handler": {"command": ["/bin/sh", "/app/handler.sh"]},
        });
        let r: TemplateRecord = serde_json::from_value(with_spec).unwrap();
        assert_eq!(r.ids, Some(IdMap::range(0)));
        let out = serde_json::to_value(&r).unwrap();
        assert_keeps(&record, &out);
        assert_eq!(out["spec"]["limits"]["timeout_s"], 30);
        assert_eq!(out["spec"]["handler"]["mode"], "exec");
        assert_eq!(out["spec"]["tier"], "auto");

        let session = json!({
            "id": "ses-1",
            "owner": "local",
            "template": "shell",
            "state": "paused",
            "created_at": 10,
            "last_active_at": 11,
            "expires_at": 12,
            "idle_timeout_s": 600,
            "on_timeout": "stop",
            "env": {"A": "b"},
            "error": null,
            "snapshot": "ses-1-p1",
            "snapshot_size": {"raw_bytes": 1, "stored_bytes": 2, "checkpoint_ms": 3},
            "pauses": 1,
            "last_pause_ms": 40,
            "last_resume_ms": null,
        });
        let s: Session = serde_json::from_value(session.clone()).unwrap();
        assert_eq!(s.state, SessionState::Paused);
        assert_eq!(s.on_timeout, TimeoutAction::Stop);
        assert_keeps(&session, &serde_json::to_value(&s).unwrap());
        // A record from before rollouts: no origin, no checkpoints, checkpointable.
        assert!(s.checkpointable && s.origin.is_empty() && s.checkpoints.is_empty());

        let mut rollout = session.clone();
        rollout["state"] = json!("running");
        rollout["origin"] = json!("checkpoint ses-0/mid");
        rollout["checkpoints"] = json!(["a", "b"]);
        rollout["resets"] = json!(3);
        rollout["sandbox"] = json!("sb-7");
        rollout["checkpointable"] = json!(false);
        let s: Session = serde_json::from_value(rollout.clone()).unwrap();
        assert!(!s.checkpointable);
        assert_keeps(&rollout, &serde_json::to_value(&s).unwrap());
    }
}
