//! The log's guarantees, checked on real files: every kind of tampering is found at its
//! position, a broken tail makes thaw go on in a fresh linked segment, and a write that
//! really fails (a full file system) stops the log.

use std::path::{Path, PathBuf};

use serde_json::json;
use thaw_types::audit::{AuditAction, AuditHead, AuditVerify, BreakKind};

use super::*;

fn opts() -> Options {
    Options::default()
}

fn small_segments() -> Options {
    Options {
        segment_bytes: 1200,
        ..Options::default()
    }
}

fn exec(i: usize) -> AuditEvent {
    AuditEvent::new(AuditAction::Exec)
        .actor(["k1", "k2"][i % 2])
        .template("shell")
        .sandbox(format!("sb-{i}"))
        .with("argv", capped_argv(&["echo".into(), format!("{i}")]))
        .with("exit_code", 0)
}

/// A log of `n` records in `dir`.
fn log(dir: &Path, n: usize, o: Options) -> Audit {
    let a = Audit::open(dir, o);
    for i in 0..n {
        a.append(&exec(i)).expect("append");
    }
    a
}

fn seg(dir: &Path, n: u32) -> PathBuf {
    segment_path(dir, n)
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(p, s).unwrap();
}

fn first_break(v: &AuditVerify) -> (String, u64, BreakKind) {
    let b = v.first_break.as_ref().expect("a break");
    (b.segment.clone(), b.line, b.kind)
}

#[test]
fn an_untouched_log_verifies_and_names_its_head() {
    let d = tempfile::tempdir().unwrap();
    let a = log(d.path(), 5, opts());
    let v = a.verify(None).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!((v.records, v.segments), (5, 1));
    assert_eq!(v.head, a.head());
    assert_eq!(v.head.as_ref().unwrap().seq, 5);
    assert!(v.first_break.is_none() && v.breaks.is_empty());
    // Files and directory are private.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(d.path()), 0o700);
    assert_eq!(mode(&seg(d.path(), 1)), 0o600);
    // Each record links to the one before.
    let lines = read_lines(&seg(d.path(), 1));
    let recs: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs[0]["prev"], ZERO_HASH);
    for w in recs.windows(2) {
        assert_eq!(w[1]["prev"], w[0]["hash"]);
        assert_eq!(w[1]["seq"], w[0]["seq"].as_u64().unwrap() + 1);
    }
}

#[test]
fn an_edited_byte_is_reported_at_its_line() {
    let d = tempfile::tempdir().unwrap();
    drop(log(d.path(), 6, opts()));
    let p = seg(d.path(), 1);
    let mut lines = read_lines(&p);
    lines[3] = lines[3].replace("\"exit_code\":0", "\"exit_code\":1");
    write_lines(&p, &lines);
    let v = verify_dir(d.path(), None).unwrap();
    assert!(!v.ok);
    assert_eq!(
        first_break(&v),
        ("00000001.jsonl".into(), 4, BreakKind::Edited)
    );
    let b = v.first_break.unwrap();
    assert_eq!((b.expected_seq, b.found_seq), (4, Some(4)));
    // One edit, one break: the chain goes on from the record after it.
    assert_eq!(v.breaks.len(), 1, "{:?}", v.breaks);
    assert_eq!(v.resumed_at, Some(5));
}

#[test]
fn a_removed_record_is_reported_where_it_is_missing() {
    let d = tempfile::tempdir().unwrap();
    drop(log(d.path(), 6, opts()));
    let p = seg(d.path(), 1);
    let mut lines = read_lines(&p);
    lines.remove(2);
    write_lines(&p, &lines);
    let v = verify_dir(d.path(), None).unwrap();
    assert_eq!(
        first_break(&v),
        ("00000001.jsonl".into(), 3, BreakKind::Removed)
    );
    let b = v.first_break.unwrap();
    assert_eq!((b.expected_seq, b.found_seq), (3, Some(4)));
    assert!(
        b.message.contains("records 3 to 3 are missing"),
        "{}",
        b.message
    );
}

#[test]
fn swapped_records_are_reported_as_reordered() {
    let d = tempfile::tempdir().unwrap();
    drop(log(d.path(), 6, opts()));
    let p = seg(d.path(), 1);
    let mut lines = read_lines(&p);
    lines.swap(1, 2);
    write_lines(&p, &lines);
    let v = verify_dir(d.path(), None).unwrap();
    assert_eq!(
        first_break(&v),
        ("00000001.jsonl".into(), 2, BreakKind::Reordered)
    );
    let b = v.first_break.unwrap();
    assert_eq!((b.expected_seq, b.found_seq), (2, Some(3)));
}

#[test]
fn a_cut_off_tail_is_reported_and_a_pinned_head_catches_whole_records_cut() {
    let d = tempfile::tempdir().unwrap();
    let a = log(d.path(), 6, opts());
    let pin = a.head().unwrap();
    drop(a);
    let p = seg(d.path(), 1);
    let data = std::fs::read(&p).unwrap();
    // Mid-record: the last line has no end.
    std::fs::write(&p, &data[..data.len() - 10]).unwrap();
    let v = verify_dir(d.path(), None).unwrap();
    assert_eq!(
        first_break(&v),
        ("00000001.jsonl".into(), 6, BreakKind::Truncated)
    );
    // Whole records: the chain itself is intact, only the pin tells.
    let lines = read_lines(&p);
    write_lines(&p, &lines[..4]);
    let v = verify_dir(d.path(), None).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.head.as_ref().unwrap().seq, 4);
    let v = verify_dir(d.path(), Some(pin.clone())).unwrap();
    assert!(!v.ok);
    let b = v.first_break.unwrap();
    assert_eq!(b.kind, BreakKind::Rewritten);
    assert!(b.message.contains("no good record 6"), "{}", b.message);
    // A pin of a record that is there and unchanged passes; a wrong hash does not.
    let v4 = v.head.clone().unwrap();
    assert!(verify_dir(d.path(), Some(v4.clone())).unwrap().ok);
    let wrong = AuditHead {
        seq: 4,
        hash: pin.hash,
    };
    let v = verify_dir(d.path(), Some(wrong)).unwrap();
    assert_eq!(first_break(&v).2, BreakKind::Rewritten);
}

#[test]
fn a_deleted_middle_segment_is_reported_at_the_next_one() {
    let d = tempfile::tempdir().unwrap();
    let a = log(d.path(), 20, small_segments());
    drop(a);
    let segs = segment::list(d.path()).unwrap();
    assert!(segs.len() >= 4, "{segs:?}");
    assert!(verify_dir(d.path(), None).unwrap().ok);
    std::fs::remove_file(seg(d.path(), 2)).unwrap();
    let v = verify_dir(d.path(), None).unwrap();
    assert_eq!(
        first_break(&v),
        ("00000003.jsonl".into(), 1, BreakKind::Removed)
    );
    let b = v.first_break.unwrap();
    assert!(b.message.contains("00000002.jsonl"), "{}", b.message);
    assert_eq!(v.breaks.len(), 1);
}

#[test]
fn after_a_tampered_tail_thaw_goes_on_in_a_fresh_linked_segment() {
    let d = tempfile::tempdir().unwrap();
    drop(log(d.path(), 5, opts()));
    let p = seg(d.path(), 1);
    let before = std::fs::read(&p).unwrap();
    let mut lines = read_lines(&p);
    lines[3] = lines[3].replace("sb-3", "sb-X");
    write_lines(&p, &lines);
    let tampered = std::fs::read(&p).unwrap();
    assert_ne!(before, tampered);

    let a = Audit::open(d.path(), opts());
    let b = a
        .opened_break()
        .expect("the tail check found the edit")
        .clone();
    assert_eq!(
        (b.segment.as_str(), b.line, b.kind),
        ("00000001.jsonl", 4, BreakKind::Edited)
    );
    // The evidence is untouched; the fresh segment starts with the break's record, linked
    // to the last good record (seq 3).
    assert_eq!(std::fs::read(&p).unwrap(), tampered);
    let fresh = read_lines(&seg(d.path(), 2));
    let first: serde_json::Value = serde_json::from_str(&fresh[0]).unwrap();
    assert_eq!(first["action"], "audit_chain_broken");
    assert_eq!(first["actor"], THAW_ACTOR);
    assert_eq!(first["seq"], 4);
    assert_eq!(first["detail"]["line"], 4);
    assert_eq!(first["detail"]["segment"], "00000001.jsonl");
    let good3: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(first["prev"], good3["hash"]);
    let h = a.append(&exec(9)).unwrap();
    assert_eq!(h.seq, 5);

    let v = a.verify(None).unwrap();
    assert!(!v.ok, "the old break is still reported");
    assert_eq!(
        first_break(&v),
        ("00000001.jsonl".into(), 4, BreakKind::Edited)
    );
    assert!(v.first_break.as_ref().unwrap().acknowledged);
    // The new segment chains: the chain verifies from the restart record to the head.
    assert_eq!(v.resumed_at, Some(4));
    assert_eq!(v.head, Some(h));
    assert_eq!(v.breaks.len(), 1, "{:?}", v.breaks);
    drop(a);
    // Opening again finds a good tail and appends to the fresh segment.
    let a = Audit::open(d.path(), opts());
    assert!(a.opened_break().is_none());
    assert_eq!(a.append(&exec(10)).unwrap().seq, 6);
    assert_eq!(segment::list(d.path()).unwrap(), vec![1, 2]);
}

#[test]
fn a_tail_cut_mid_record_is_acknowledged_the_same_way() {
    let d = tempfile::tempdir().unwrap();
    drop(log(d.path(), 3, opts()));
    let p = seg(d.path(), 1);
    let data = std::fs::read(&p).unwrap();
    std::fs::write(&p, &data[..data.len() - 5]).unwrap();
    let a = Audit::open(d.path(), opts());
    assert_eq!(a.opened_break().unwrap().kind, BreakKind::Truncated);
    assert_eq!(a.append(&exec(3)).unwrap().seq, 4);
    let v = a.verify(None).unwrap();
    assert!(v.first_break.unwrap().acknowledged);
    assert_eq!(v.resumed_at, Some(3));
}

#[test]
fn rotation_links_segments_and_reopening_continues_the_chain() {
    let d = tempfile::tempdir().unwrap();
    drop(log(d.path(), 10, small_segments()));
    let a = log(d.path(), 10, small_segments());
    let v = a.verify(None).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.records, 20);
    assert!(v.segments > 3);
    assert_eq!(v.head.unwrap().seq, 20);
}

#[test]
fn two_writers_on_one_log_keep_one_chain() {
    // Two handles with their own descriptors: what the CLI's engine and a server on the
    // same home are (flock excludes them as it does two processes).
    let d = tempfile::tempdir().unwrap();
    let a = Audit::open(d.path(), small_segments());
    let b = Audit::open(d.path(), small_segments());
    let mut seqs = Vec::new();
    for i in 0..30 {
        let h = [&b, &a, &a][i % 3];
        seqs.push(h.append(&exec(i)).unwrap().seq);
    }
    assert_eq!(seqs, (1..=30).collect::<Vec<u64>>());
    let v = a.verify(None).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.records, 30);
}

#[test]
fn queries_filter_order_and_limit() {
    let d = tempfile::tempdir().unwrap();
    let a = log(d.path(), 12, small_segments());
    a.append(
        &AuditEvent::new(AuditAction::SessionPause)
            .actor("k1")
            .session("ses-1")
            .sandbox("sb-1"),
    )
    .unwrap();
    let all = a.query(&Filter::default()).unwrap();
    assert_eq!(all.records.len(), 13);
    assert!(!all.more);
    // Newest first by default.
    assert_eq!(all.records[0].seq, 13);
    assert_eq!(all.records[0].action, AuditAction::SessionPause);
    let k2 = a
        .query(&Filter {
            actor: Some("k2".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(k2.records.len(), 6);
    assert!(k2.records.iter().all(|r| r.actor == "k2"));
    let oldest = a
        .query(&Filter {
            oldest_first: true,
            limit: 3,
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(
        oldest.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(oldest.more);
    let by_sandbox = a
        .query(&Filter {
            sandbox: Some("sb-1".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(by_sandbox.records.len(), 2);
    let pauses = a
        .query(&Filter {
            action: Some(AuditAction::SessionPause),
            session: Some("ses-1".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(pauses.records.len(), 1);
    let ts = pauses.records[0].ts;
    let future = a
        .query(&Filter {
            since_ms: Some(ts + 60_000),
            ..Filter::default()
        })
        .unwrap();
    assert!(future.records.is_empty());
    let past = a
        .query(&Filter {
            until_ms: Some(ts.saturating_sub(60_000)),
            ..Filter::default()
        })
        .unwrap();
    assert!(past.records.is_empty());
    // Details come back as written.
    assert_eq!(all.records[1].detail["argv"], json!(["echo", "11"]));
}

#[test]
fn argv_and_oversized_details_stay_small() {
    let long = "x".repeat(100_000);
    let v = capped_argv(&[long.clone(), "é".repeat(300), "b".into()]);
    let total: usize = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().len())
        .sum();
    assert!(total < 10_000, "{total}");
    let d = tempfile::tempdir().unwrap();
    let a = Audit::open(d.path(), opts());
    a.append(
        &AuditEvent::new(AuditAction::Exec)
            .actor("k")
            .with("blob", &long),
    )
    .unwrap();
    let r = &a.query(&Filter::default()).unwrap().records[0];
    assert!(r.detail["oversized_detail_bytes"].as_u64().unwrap() > 100_000);
    assert!(a.verify(None).unwrap().ok);
}

/// Set in the child process of [`a_full_disk_fails_the_log_for_good`].
const IN_NAMESPACE: &str = "THAW_AUDIT_TEST_IN_MOUNT_NAMESPACE";

/// A real ENOSPC: the test runs itself again in a mount namespace of its own (so nothing
/// it mounts is seen by the host), where the log lives on a 64 KiB tmpfs that a filler
/// file has all but filled. Needs root (CAP_SYS_ADMIN), as thaw's other tests do.
#[test]
fn a_full_disk_fails_the_log_for_good() {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return full_disk_in_namespace();
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test mounts a tmpfs in a mount namespace of its own: run it as root"
    );
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "tests::a_full_disk_fails_the_log_for_good",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(IN_NAMESPACE, "1");
    // SAFETY: between fork and exec only unshare(2) runs, which is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("running the test in a mount namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("full-disk check passed"),
        "the child did not run the check:\n{stdout}\n{stderr}"
    );
}

fn full_disk_in_namespace() {
    use std::ffi::CString;
    let root = CString::new("/").unwrap();
    // SAFETY: plain mount(2) calls with valid C strings.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    assert_eq!(
        r,
        0,
        "making mounts private: {}",
        std::io::Error::last_os_error()
    );
    let d = tempfile::tempdir().unwrap();
    let (src, fs, target, data) = (
        CString::new("tmpfs").unwrap(),
        CString::new("tmpfs").unwrap(),
        CString::new(d.path().to_str().unwrap()).unwrap(),
        CString::new("size=64k").unwrap(),
    );
    // SAFETY: as above.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mounting a tmpfs: {}",
        std::io::Error::last_os_error()
    );
    // Leave a few KiB free.
    let filler = d.path().join("filler");
    std::fs::write(&filler, vec![0u8; 52 << 10]).unwrap();
    let dir = d.path().join("audit");
    let a = Audit::open(&dir, opts());
    assert!(a.ready().is_ok());
    let mut written = 0;
    let err = loop {
        match a.append(&exec(written)) {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 10_000, "the tmpfs never filled");
    };
    assert!(written > 0, "nothing could be written at all");
    let msg = err.to_string();
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(msg.contains("00000001.jsonl"), "{msg}");
    assert!(msg.contains("refuses new work"), "{msg}");
    assert!(msg.contains("Fix: free space"), "{msg}");
    // Failed for good: every later append and the readiness check say so, even with
    // room again, until the log is opened again.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(a.ready().unwrap_err().to_string(), msg);
    assert_eq!(a.append(&exec(0)).unwrap_err().to_string(), msg);
    drop(a);
    // Reopened with room: the tail is checked (a record cut off by the full disk becomes
    // an acknowledged break) and appending works again, after the last good record.
    let a = Audit::open(&dir, opts());
    let h = a.append(&exec(1)).unwrap();
    assert!(h.seq as usize <= written + 2, "{h:?} after {written}");
    let v = a.verify(None).unwrap();
    assert!(v.ok || v.breaks.iter().all(|b| b.acknowledged), "{v:?}");
    assert_eq!(v.head, Some(h));
    println!("full-disk check passed after {written} records");
}

/// Cost of one append (release build: `cargo test -p thaw-audit --release -- --ignored
/// append_cost --nocapture`); the figure is quoted in the crate docs.
#[test]
#[ignore = "a measurement, not a check: run it with --release --ignored --nocapture"]
fn append_cost() {
    let d = tempfile::tempdir().unwrap();
    let a = Audit::open(d.path(), opts());
    let ev = AuditEvent::new(AuditAction::Exec)
        .actor("3f2a9c0d1e4b")
        .session("ses-0123456789abcdef")
        .sandbox("sb-0123456789abcdef")
        .template("python")
        .with(
            "argv",
            capped_argv(&[
                "python3".into(),
                "-c".into(),
                "print(sum(range(10)))".into(),
            ]),
        )
        .with("exit_code", 0)
        .with("outcome", json!({"exited": {"code": 0}}))
        .with("ms", 3.2);
    let n = 20_000;
    let started = std::time::Instant::now();
    for _ in 0..n {
        a.append(&ev).unwrap();
    }
    let per = started.elapsed() / n;
    let bytes = std::fs::metadata(seg(d.path(), 1))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "append: {per:?} per record ({n} records, {} bytes each)",
        bytes / n as u64
    );
    let started = std::time::Instant::now();
    let v = a.verify(None).unwrap();
    assert!(v.ok);
    println!("verify: {:?} for {} records", started.elapsed(), v.records);
}
