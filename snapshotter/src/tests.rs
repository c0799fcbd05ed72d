//! Store-level tests: round trips, dedup, corruption, crash atomicity, disk full, gc,
//! locking and the materialisation cache.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::chunk::tests::pseudo_random;
use crate::put::Fault;
use crate::*;

/// A small CRIU-like image directory plus a sparse CH-like memory file.
fn make_tree(dir: &Path, seed: u64) {
    fs::create_dir_all(dir.join("sub")).expect("mkdir");
    // Memory-like: random pages interleaved with compressible (text-ish) pages.
    let mut pages = Vec::new();
    for i in 0..512u64 {
        if i % 3 == 0 {
            pages.extend(pseudo_random(seed * 1000 + i, 4096));
        } else {
            let line = format!("page {i} of seed {seed}: some repetitive heap content\n");
            while pages.len() % 4096 != 0 || pages.len() < ((i + 1) * 4096) as usize {
                pages.extend_from_slice(line.as_bytes());
                pages.truncate(((i + 1) * 4096) as usize);
            }
        }
    }
    fs::write(dir.join("pages-1.img"), &pages).expect("write");
    fs::write(dir.join("core-1.img"), pseudo_random(seed + 7, 3000)).expect("write");
    fs::write(dir.join("empty.img"), b"").expect("write");
    fs::write(dir.join("sub/inventory.img"), b"inventory").expect("write");
    fs::set_permissions(
        dir.join("sub/inventory.img"),
        fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    fs::set_permissions(dir.join("sub"), fs::Permissions::from_mode(0o750)).expect("chmod");
    std::os::unix::fs::symlink("pages-1.img", dir.join("pages-link")).expect("symlink");
    let mem = fs::File::create(dir.join("memory-ranges")).expect("create");
    mem.set_len(64 << 20).expect("set_len");
    mem.write_all_at(&pseudo_random(seed + 9, 100_000), 1 << 20)
        .expect("write");
    mem.write_all_at(&[0u8; 300_000], 8 << 20).expect("write"); // explicit zeros
    mem.write_all_at(b"tail", (64 << 20) - 4).expect("write");
}

/// Same names, types, modes, sizes and contents.
fn assert_same_tree(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).expect("stat a");
    let mb = fs::symlink_metadata(b).expect("stat b");
    assert_eq!(ma.mode(), mb.mode(), "mode of {}", b.display());
    if ma.is_dir() {
        let mut na: Vec<_> = fs::read_dir(a)
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        let mut nb: Vec<_> = fs::read_dir(b)
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        na.sort();
        nb.sort();
        assert_eq!(na, nb, "entries of {}", b.display());
        for n in na {
            assert_same_tree(&a.join(&n), &b.join(&n));
        }
    } else if ma.file_type().is_symlink() {
        assert_eq!(fs::read_link(a).expect("rl"), fs::read_link(b).expect("rl"));
    } else {
        assert_eq!(ma.len(), mb.len());
        assert!(
            fs::read(a).expect("read") == fs::read(b).expect("read"),
            "{}",
            b.display()
        );
    }
}

fn setup() -> (tempfile::TempDir, Store, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(d.path().join("store")).expect("open");
    let src = d.path().join("src");
    make_tree(&src, 1);
    (d, store, src)
}

fn tmp_is_empty(store: &Store) -> bool {
    fs::read_dir(store.tmp_dir()).expect("ls").count() == 0
}

fn any_chunk_of(store: &Store, name: &str) -> (Digest, PathBuf) {
    let m = store.get(name).expect("get");
    let id = *m.chunk_ids().next().expect("has chunks");
    (id, chunk::chunk_path(&store.chunks_dir(), &id))
}

#[test]
fn roundtrip_preserves_tree_modes_and_holes() {
    let (d, store, src) = setup();
    let st = store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    assert_eq!(st.files, 5);
    assert_eq!(st.chunks_new + st.chunks_reused, st.chunks_total);
    assert!(
        st.data_bytes < st.raw_bytes / 10,
        "zeros are not data: {st:?}"
    );
    let dest = d.path().join("out");
    let ms = store.materialize("tpl-a", &dest).expect("materialize");
    assert_eq!(ms.logical_bytes, st.raw_bytes);
    assert_same_tree(&src, &dest);
    let mem = fs::metadata(dest.join("memory-ranges")).expect("stat");
    assert_eq!(mem.len(), 64 << 20);
    assert!(
        mem.blocks() * 512 < 2 << 20,
        "sparse: {} blocks",
        mem.blocks()
    );
    // list/get agree
    let list = store.list().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].0, "tpl-a");
    assert_eq!(list[0].1.manifest, st.manifest);
    assert_eq!(list[0].1.logical_bytes, st.raw_bytes);
    store.verify("tpl-a").expect("verify");
    // Re-putting an unchanged tree stores nothing new.
    let again = store
        .put_dir("tpl-b", &src, &PutOptions::default())
        .expect("put");
    assert_eq!(again.chunks_new, 0);
    assert_eq!(again.new_stored_bytes, 0);
    assert!(tmp_is_empty(&store));
    // Refuses to overwrite.
    assert!(matches!(
        store.materialize("tpl-a", &dest),
        Err(Error::DestinationExists { .. })
    ));
}

#[test]
fn diff_snapshot_with_shifted_pages_dedups() {
    let (d, store, src) = setup();
    let base = store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    // Session checkpoint: 3 new pages inserted near the front, one page changed.
    let sess = d.path().join("sess");
    make_tree(&sess, 1);
    let mut pages = fs::read(sess.join("pages-1.img")).expect("read");
    pages.splice(8192..8192, pseudo_random(99, 3 * 4096));
    pages[300 * 4096] ^= 0xff;
    fs::write(sess.join("pages-1.img"), &pages).expect("write");
    let opts = PutOptions {
        parent: Some("tpl-a".into()),
    };
    let st = store.put_dir("session-1", &sess, &opts).expect("put");
    assert_eq!(
        store.get("session-1").expect("get").parent.as_deref(),
        Some("tpl-a")
    );
    assert!(
        st.new_stored_bytes * 3 < base.new_stored_bytes,
        "diff stored {} vs base {}",
        st.new_stored_bytes,
        base.new_stored_bytes
    );
    assert!(st.chunks_reused > st.chunks_new, "{st:?}");
    let out = d.path().join("out");
    store.materialize("session-1", &out).expect("materialize");
    assert_same_tree(&sess, &out);
    // Unknown parent is an error naming it.
    let bad = PutOptions {
        parent: Some("nope".into()),
    };
    let e = store.put_dir("x", &sess, &bad).expect_err("unknown parent");
    assert!(
        matches!(e, Error::NotFound { ref name, .. } if name == "nope"),
        "{e}"
    );
}

#[test]
fn flipped_byte_is_corrupt_chunk_and_republish_heals() {
    let (d, store, src) = setup();
    store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    let (id, path) = any_chunk_of(&store, "tpl-a");
    let mut bytes = fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&path, &bytes).expect("write");
    let e = store
        .materialize("tpl-a", &d.path().join("out"))
        .expect_err("corrupt");
    match &e {
        Error::CorruptChunk {
            snapshot, chunk, ..
        } => {
            assert_eq!(snapshot, "tpl-a");
            assert_eq!(*chunk, id);
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("tpl-a") && msg.contains(&id.to_hex()) && msg.contains("republish"),
        "{msg}"
    );
    assert!(!d.path().join("out").exists(), "no partial tree left");
    // The bad file was quarantined, so republishing writes a good copy.
    assert!(store.verify("tpl-a").is_err());
    let st = store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("republish");
    assert!(st.chunks_new >= 1);
    store.verify("tpl-a").expect("healed");
}

#[test]
fn truncated_and_missing_chunks_are_detected() {
    let (_d, store, src) = setup();
    store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    let (id, path) = any_chunk_of(&store, "tpl-a");
    let len = fs::metadata(&path).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    let e = store.verify("tpl-a").expect_err("truncated");
    assert!(
        matches!(e, Error::CorruptChunk { chunk, .. } if chunk == id),
        "{e}"
    );
    // (quarantine removed it) -> now it is missing
    let e = store.verify("tpl-a").expect_err("missing");
    assert!(
        matches!(e, Error::MissingChunk { ref snapshot, chunk, .. } if chunk == id && snapshot == "tpl-a"),
        "{e}"
    );
    assert!(e.to_string().contains(&id.to_hex()));
}

#[test]
fn corrupt_and_missing_manifest_are_detected() {
    let (_d, store, src) = setup();
    let st = store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    let mp = store.manifest_path(&st.manifest);
    let mut bytes = fs::read(&mp).expect("read");
    bytes[5] ^= 0x20;
    fs::write(&mp, &bytes).expect("write");
    let e = store.get("tpl-a").expect_err("corrupt");
    assert!(
        matches!(e, Error::CorruptManifest { ref snapshot, .. } if snapshot == "tpl-a"),
        "{e}"
    );
    assert!(store.gc().is_err(), "gc must not guess the live set");
    fs::remove_file(&mp).expect("rm");
    let e = store.get("tpl-a").expect_err("missing");
    assert!(matches!(e, Error::MissingManifest { .. }), "{e}");
    fs::write(store.ref_path("tpl-a"), "garbage\n").expect("write");
    assert!(matches!(
        store.get("tpl-a"),
        Err(Error::CorruptManifest { .. })
    ));
    assert!(matches!(store.get("nope"), Err(Error::NotFound { .. })));
}

#[test]
fn crash_before_manifest_or_ref_keeps_old_snapshot() {
    for fault in [Fault::BeforeManifest, Fault::BeforeRef] {
        let (d, store, src) = setup();
        let old = store
            .put_dir("tpl-a", &src, &PutOptions::default())
            .expect("put");
        let src2 = d.path().join("src2");
        make_tree(&src2, 2);
        *store.fault.lock().expect("lock") = Some(fault);
        store
            .put_dir("tpl-a", &src2, &PutOptions::default())
            .expect_err("injected");
        store
            .put_dir("tpl-new", &src2, &PutOptions::default())
            .expect_err("injected");
        *store.fault.lock().expect("lock") = None;
        assert!(tmp_is_empty(&store), "{fault:?}: temp files cleaned");
        assert!(matches!(store.get("tpl-new"), Err(Error::NotFound { .. })));
        let (id, _) = store.resolve("tpl-a").expect("old still there");
        assert_eq!(id, old.manifest);
        let gc = store.gc().expect("gc");
        assert!(
            gc.chunks_deleted > 0,
            "{fault:?}: orphans collected: {gc:?}"
        );
        store.verify("tpl-a").expect("old snapshot intact");
        store
            .materialize("tpl-a", &d.path().join("out"))
            .expect("materialize");
        assert_same_tree(&src, &d.path().join("out"));
    }
}

#[test]
fn unsupported_file_fails_put_cleanly() {
    let (_d, store, src) = setup();
    let fifo = std::ffi::CString::new(src.join("zz-fifo").as_os_str().as_encoded_bytes())
        .expect("cstring");
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let e = store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect_err("fifo");
    assert!(matches!(e, Error::UnsupportedFile { .. }), "{e}");
    assert!(tmp_is_empty(&store));
    assert!(store.list().expect("list").is_empty());
}

#[test]
fn gc_removes_only_unreferenced_chunks_and_stale_temps() {
    let (d, store, src) = setup();
    store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    let src2 = d.path().join("src2");
    make_tree(&src2, 1);
    fs::write(src2.join("extra.img"), pseudo_random(5, 500_000)).expect("write");
    store
        .put_dir("tpl-b", &src2, &PutOptions::default())
        .expect("put");
    fs::write(store.tmp_dir().join("chunk.1.2.3.tmp"), b"stale").expect("stale temp");
    fs::create_dir(store.cache_dir().join("build-x.1.2.3.tmp")).expect("stale build");
    let before = store.usage().expect("usage");
    let gc = store.gc().expect("gc");
    assert_eq!(
        (gc.chunks_deleted, gc.manifests_deleted, gc.temp_deleted),
        (0, 0, 2)
    );
    store.delete("tpl-b").expect("delete");
    assert!(matches!(store.delete("tpl-b"), Err(Error::NotFound { .. })));
    let gc = store.gc().expect("gc");
    assert!(
        gc.chunks_deleted >= 1 && gc.manifests_deleted == 1,
        "{gc:?}"
    );
    let after = store.usage().expect("usage");
    assert!(after.chunk_bytes < before.chunk_bytes);
    assert_eq!(after.chunks, gc.chunks_live);
    assert_eq!(after.snapshots, 1);
    store.verify("tpl-a").expect("shared chunks kept");
}

#[test]
fn concurrent_gc_never_breaks_puts() {
    let (d, store, src) = setup();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.gc().expect("gc");
            }
        });
        for i in 0..4u64 {
            let dir = d.path().join(format!("s{i}"));
            make_tree(&dir, i + 10);
            store
                .put_dir(&format!("session-{i}"), &dir, &PutOptions::default())
                .expect("put");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    store.gc().expect("gc");
    for i in 0..4 {
        store.verify(&format!("session-{i}")).expect("verify");
    }
    let _ = src;
}

#[test]
fn cache_is_built_once_and_evictable() {
    let (_d, store, src) = setup();
    let st = store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| store.materialize_cached("tpl-a").expect("cached")))
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    assert!(paths.iter().all(|p| *p == paths[0]));
    assert_eq!(paths[0], store.cache_dir().join(st.manifest.to_hex()));
    assert_same_tree(&src, &paths[0]);
    let builds = fs::read_dir(store.cache_dir())
        .expect("ls")
        .filter(|e| atomic::is_temp_name(&e.as_ref().expect("e").file_name()))
        .count();
    assert_eq!(builds, 0, "no leftover build dirs");
    assert_eq!(store.usage().expect("usage").cache_entries, 1);
    // Replace the snapshot: the old entry becomes unreferenced.
    fs::write(src.join("core-1.img"), b"changed").expect("write");
    store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    let newp = store.materialize_cached("tpl-a").expect("cached");
    assert_ne!(newp, paths[0]);
    let ev = store.evict_cache(Evict::Unreferenced).expect("evict");
    assert_eq!(ev.entries_removed, 1);
    assert!(!paths[0].exists() && newp.exists());
    let ev = store.evict_cache(Evict::Snapshot("tpl-a")).expect("evict");
    assert_eq!(ev.entries_removed, 1);
    assert!(ev.bytes_freed > 0);
    assert_eq!(
        store
            .evict_cache(Evict::All)
            .expect("evict")
            .entries_removed,
        0
    );
}

#[test]
fn names_are_validated() {
    let (_d, store, src) = setup();
    let long = "a".repeat(MAX_NAME_LEN + 1);
    for bad in [
        "",
        "..",
        ".",
        "a/b",
        "../x",
        ".hidden",
        "a b",
        "é",
        long.as_str(),
    ] {
        let e = store
            .put_dir(bad, &src, &PutOptions::default())
            .expect_err(bad);
        assert!(matches!(e, Error::InvalidName { .. }), "{bad:?}: {e}");
        assert!(matches!(store.get(bad), Err(Error::InvalidName { .. })));
    }
    for good in [
        "tpl-python-3f2a9c",
        "session-6f1c2d4e-1b2a-4c3d-9e8f-0a1b2c3d4e5f",
        "a.b_c",
    ] {
        validate_name(good).expect(good);
    }
}

#[test]
fn version_mismatch_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    Store::open(d.path()).expect("open");
    Store::open(d.path()).expect("reopen");
    fs::write(d.path().join("VERSION"), "thaw-snapshotter-store 99\n").expect("write");
    let e = Store::open(d.path()).expect_err("version");
    assert!(matches!(e, Error::UnsupportedVersion { .. }), "{e}");
}

/// tmpfs mounted for the duration of a test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_fails_cleanly_and_keeps_previous_snapshot() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("small");
    fs::create_dir(&root).expect("mkdir");
    let _mnt = match Tmpfs::mount(&root, "2m") {
        Ok(m) => m,
        Err(why) => {
            println!("SKIP disk_full test: cannot mount tmpfs ({why})");
            return;
        }
    };
    let store = Store::open(&root).expect("open");
    let small = d.path().join("small-src");
    fs::create_dir(&small).expect("mkdir");
    fs::write(small.join("pages-1.img"), pseudo_random(1, 300_000)).expect("write");
    store
        .put_dir("tpl-a", &small, &PutOptions::default())
        .expect("small put fits");
    let big = d.path().join("big-src");
    fs::create_dir(&big).expect("mkdir");
    fs::write(big.join("pages-1.img"), pseudo_random(2, 4 << 20)).expect("write");
    let e = store
        .put_dir("tpl-a", &big, &PutOptions::default())
        .expect_err("does not fit");
    match &e {
        Error::DiskFull { snapshot, path } => {
            assert_eq!(snapshot, "tpl-a");
            assert!(path.starts_with(&root), "{}", path.display());
        }
        other => panic!("expected DiskFull, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("disk full at") && msg.contains("free space and retry"),
        "{msg}"
    );
    assert!(tmp_is_empty(&store), "temp files removed");
    store.verify("tpl-a").expect("previous snapshot readable");
    let out = d.path().join("out");
    store.materialize("tpl-a", &out).expect("materialize");
    assert_same_tree(&small, &out);
    // After freeing space (gc of the failed put's leftovers), a retry of a fitting put works.
    store.gc().expect("gc");
    fs::write(big.join("pages-1.img"), pseudo_random(3, 500_000)).expect("write");
    store
        .put_dir("tpl-a", &big, &PutOptions::default())
        .expect("retry fits");
}

#[test]
fn a_tag_keeps_a_snapshot_after_its_first_name_is_deleted() {
    let (d, store, src) = setup();
    store
        .put_dir("tpl-a", &src, &PutOptions::default())
        .expect("put");
    let cached = store.materialize_cached("tpl-a").expect("cache");
    store.tag("tpl-a", "origin-ses-1").expect("tag");
    // One manifest, one cache entry, two names.
    assert_eq!(
        store.materialize_cached("origin-ses-1").expect("cache"),
        cached
    );
    store.delete("tpl-a").expect("delete");
    store.gc().expect("gc");
    store
        .evict_cache(Evict::Unreferenced)
        .expect("evict unreferenced");
    store
        .verify("origin-ses-1")
        .expect("chunks kept for the tag");
    assert!(cached.is_dir(), "the tag still references the cache entry");
    let out = d.path().join("out");
    store
        .materialize("origin-ses-1", &out)
        .expect("materialize");
    assert_same_tree(&src, &out);
    // A tag of nothing is refused, and names nothing.
    assert!(matches!(
        store.tag("missing", "x"),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(store.get("x"), Err(Error::NotFound { .. })));
    assert!(matches!(
        store.tag("origin-ses-1", "../escape"),
        Err(Error::InvalidName { .. })
    ));
}
