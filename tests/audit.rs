//! End-to-end tests of the audit log through a real `thaw serve` router on a loopback
//! socket, the real engine and real runc/CRIU sandboxes of `templates/shell`: every action
//! of a key is recorded under that key with its sandbox, a key sees only its own records
//! (an admin key sees all), `verify` over HTTP finds a tampered record, and a log that the
//! OS refuses to write stops new work with an error that says why and what to do.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use thaw_api::{
    AuditAction, AuditQuery, AuditRecord, BreakKind, Client, ExecBody, Fault, InvokeBody,
    SessionCreateBody,
};
use thaw_e2e::inproc::{api_error, Server};
use thaw_e2e::repo_root;

async fn records(c: &Client, q: AuditQuery) -> Vec<AuditRecord> {
    c.audit(&AuditQuery {
        limit: Some(1000),
        ..q
    })
    .await
    .expect("audit")
    .records
}

/// The one record of `action` that `pick` accepts.
fn one(
    rs: &[AuditRecord],
    action: AuditAction,
    pick: impl Fn(&AuditRecord) -> bool,
) -> &AuditRecord {
    let found: Vec<&AuditRecord> = rs
        .iter()
        .filter(|r| r.action == action && pick(r))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{action:?} records: {found:#?}\nall: {rs:#?}"
    );
    found[0]
}

fn segment(home: &Path, n: u32) -> PathBuf {
    home.join("audit").join(format!("{n:08}.jsonl"))
}

/// Clears the immutable flag it set, even when the test fails (an immutable file cannot
/// be removed, which would leave the test's home behind).
struct Immutable(PathBuf);

impl Immutable {
    fn set(p: &Path) -> Immutable {
        let out = Command::new("chattr")
            .arg("+i")
            .arg(p)
            .output()
            .expect("chattr");
        assert!(
            out.status.success(),
            "chattr +i {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_is_recorded_scoped_verified_and_required() {
    let server = Server::start().await;
    let (ka, secret_a) = server.engine.create_key("alice", 8, false).expect("key");
    let (kb, secret_b) = server.engine.create_key("bob", 8, false).expect("key");
    let (_ops, secret_ops) = server.engine.create_key("ops", 1, true).expect("key");
    let (a, b, ops) = (
        server.client(&secret_a),
        server.client(&secret_b),
        server.client(&secret_ops),
    );

    // What alice does (bob only publishes).
    for c in [&a, &b] {
        c.deploy_dir(&repo_root().join("templates/shell"))
            .await
            .expect("deploy");
    }
    let inv = a
        .invoke("shell", &InvokeBody::default())
        .await
        .expect("invoke");
    let ex = a
        .exec("shell", &ExecBody::new(["sh", "-c", "exit 3"]))
        .await
        .expect("exec");
    assert_eq!(ex.result.exit_code, 3);
    let s = a
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .expect("session");
    let content = b"not in any record: 0123456789".to_vec();
    a.session_write_file(&s.id, "/tmp/note", content.clone(), None)
        .await
        .expect("put");
    a.session_exec(&s.id, &ExecBody::new(["cat", "/tmp/note"]))
        .await
        .expect("session exec");
    a.session_pause(&s.id).await.expect("pause");
    let resumed = a.session_resume(&s.id).await.expect("resume");
    a.session_delete(&s.id).await.expect("delete");

    // Alice finds each of them, under her key, with its sandbox.
    let rs = records(&a, AuditQuery::default()).await;
    assert!(rs.iter().all(|r| r.actor == ka.id), "{rs:#?}");
    let in_session = |r: &AuditRecord| r.session.as_deref() == Some(s.id.as_str());
    one(&rs, AuditAction::TemplatePublish, |r| {
        r.template.as_deref() == Some("shell")
    });
    let r = one(&rs, AuditAction::Invoke, |r| r.session.is_none());
    assert_eq!(r.sandbox.as_deref(), Some(inv.sandbox_id.as_str()));
    assert_eq!(r.template.as_deref(), Some("shell"));
    assert_eq!(r.detail["status"], "ok");
    let r = one(&rs, AuditAction::Exec, |r| r.session.is_none());
    assert_eq!(r.sandbox.as_deref(), Some(ex.result.sandbox_id.as_str()));
    assert_eq!(r.detail["argv"], serde_json::json!(["sh", "-c", "exit 3"]));
    assert_eq!(r.detail["exit_code"], 3);
    let created = one(&rs, AuditAction::SessionCreate, in_session);
    let first_sandbox = created.sandbox.clone().expect("a sandbox");
    assert!(first_sandbox.starts_with("sb-"), "{created:?}");
    let put = one(&rs, AuditAction::FilePut, in_session);
    assert_eq!(put.sandbox.as_deref(), Some(first_sandbox.as_str()));
    assert_eq!(put.detail["path"], "/tmp/note");
    assert_eq!(put.detail["size"], content.len());
    assert_eq!(
        put.detail["sha256"],
        thaw_platform::audit::sha256_hex(&content)
    );
    let r = one(&rs, AuditAction::Exec, in_session);
    assert_eq!(r.sandbox.as_deref(), Some(first_sandbox.as_str()));
    assert_eq!(r.detail["argv"], serde_json::json!(["cat", "/tmp/note"]));
    let r = one(&rs, AuditAction::SessionPause, in_session);
    assert_eq!(r.sandbox.as_deref(), Some(first_sandbox.as_str()));
    let r = one(&rs, AuditAction::SessionResume, in_session);
    // A resume restores a new sandbox: the record names it.
    assert_eq!(r.sandbox, resumed.sandbox);
    assert_ne!(r.sandbox.as_deref(), Some(first_sandbox.as_str()));
    one(&rs, AuditAction::SessionDelete, in_session);
    // Newest first, and in the order they happened.
    let seqs: Vec<u64> = rs.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    // No record holds the file's content.
    let raw = std::fs::read_to_string(segment(server.home.path(), 1)).expect("segment");
    assert!(!raw.contains("not in any record"));
    // Filters.
    let only = records(
        &a,
        AuditQuery {
            session: Some(s.id.clone()),
            action: Some("file_put".into()),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(only.len(), 1);

    // Bob sees his own records only and may not ask for hers; the operator's key sees all.
    let bobs = records(&b, AuditQuery::default()).await;
    assert_eq!(bobs.len(), 1, "{bobs:#?}");
    assert_eq!(
        (bobs[0].actor.as_str(), bobs[0].action),
        (kb.id.as_str(), AuditAction::TemplatePublish)
    );
    let e = b
        .audit(&AuditQuery {
            key: Some(ka.id.clone()),
            ..AuditQuery::default()
        })
        .await
        .unwrap_err();
    assert_eq!(api_error(&e).0, 403, "{e}");
    let all = records(&ops, AuditQuery::default()).await;
    assert!(all.len() > rs.len() + bobs.len());
    assert!(all
        .iter()
        .any(|r| r.actor == "local" && r.action == AuditAction::KeyCreate));
    let alices = records(
        &ops,
        AuditQuery {
            key: Some(ka.id.clone()),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(alices, rs);

    // Verify over HTTP: admin keys only; intact, then a tampered record is found.
    let e = a.audit_verify(None).await.unwrap_err();
    assert_eq!(api_error(&e).0, 403, "{e}");
    let v = ops.audit_verify(None).await.expect("verify");
    assert!(v.ok, "{v:?}");
    let head = v.head.clone().expect("a head");
    assert!(ops.audit_verify(Some(&head)).await.expect("pinned").ok);
    let seg1 = segment(server.home.path(), 1);
    let text = std::fs::read_to_string(&seg1).expect("segment");
    let (line_no, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("\"action\":\"exec\"") && l.contains("exit 3"))
        .expect("the exec record");
    let at = text[..text.find(line).unwrap()].len() + line.find("exit 3").unwrap() + 5;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg1)
        .expect("open segment");
    // "exit 3" becomes "exit 0": what someone hiding a failure would do.
    f.seek(SeekFrom::Start(at as u64)).unwrap();
    f.write_all(b"0").unwrap();
    drop(f);
    let v = ops.audit_verify(None).await.expect("verify");
    assert!(!v.ok);
    let brk = v.first_break.expect("a break");
    assert_eq!(brk.segment, "00000001.jsonl");
    assert_eq!(brk.line, line_no as u64 + 1);
    assert_eq!(brk.kind, BreakKind::Edited);

    // A log the OS refuses to write (the segment made immutable): the call that was
    // running gets the audit error instead of its result, and no new call starts.
    let _imm = Immutable::set(&seg1);
    for c in [&a, &b] {
        let e = c.invoke("shell", &InvokeBody::default()).await.unwrap_err();
        let (status, code, message, fault) = api_error(&e);
        assert_eq!(
            (status, code, fault),
            (503, "audit_unavailable", Fault::Infrastructure),
            "{e}"
        );
        assert!(message.contains("00000001.jsonl"), "{message}");
        assert!(message.contains("Operation not permitted"), "{message}");
        assert!(message.contains("refuses new work"), "{message}");
        assert!(message.contains("chattr -i"), "{message}");
    }
    let e = a
        .session_create(&SessionCreateBody::new("shell"))
        .await
        .unwrap_err();
    assert_eq!(api_error(&e).1, "audit_unavailable", "{e}");
    // Reading the log still works.
    assert!(!records(&a, AuditQuery::default()).await.is_empty());
    drop(_imm);
    server.finish().await;
}
