//! Put/materialise throughput on ~200 MB of synthetic-but-realistic snapshot data.
//!
//! `cargo run --release -p thaw-snapshotter --example snapbench -- <work-dir> [binary-file]`
//!
//! Builds, under `<work-dir>`, a CRIU-like image directory: `pages-1.img` (128 MiB: pages
//! of a real binary, heap-like text, random pages, zero pages), `pages-2.img` (32 MiB
//! random-heavy), small `core`/`mm` files, and a Cloud-Hypervisor-like sparse
//! `memory-ranges` (1 GiB logical, 40 MiB data). Then times: cold put, re-put (all dedup),
//! a diff put of a session checkpoint, materialise, materialise_cached, verify and gc.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use thaw_snapshotter::{PutOptions, Store};

const PAGE: usize = 4096;

#[path = "common/mod.rs"]
mod common;
use common::xorshift;

/// `pages` pages; `random_share` of 10 are random, 1 of 10 zero, rest binary/text.
fn image(bin: &[u8], pages: usize, random_share: u64, seed: u64) -> Vec<u8> {
    let bin_pages = (bin.len() / PAGE).max(1);
    let mut out = Vec::with_capacity(pages * PAGE);
    for i in 0..pages {
        let k = (i as u64).wrapping_mul(2654435761).wrapping_add(seed) % 10;
        if k < random_share {
            out.extend(xorshift(seed << 32 ^ i as u64, PAGE));
        } else if k == 9 {
            out.extend(std::iter::repeat_n(0u8, PAGE));
        } else if k & 1 == 0 && bin.len() >= PAGE {
            let p = (i * 7919) % bin_pages;
            out.extend_from_slice(&bin[p * PAGE..(p + 1) * PAGE]);
        } else {
            let line = format!("<obj {i} refcnt={} type=dict key='k{}'> ", i % 13, i * 31);
            out.extend(line.as_bytes().iter().cycle().take(PAGE));
        }
    }
    out
}

fn write_tree(dir: &Path, bin: &[u8], seed: u64) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("pages-1.img"), image(bin, 32768, 2, seed))?;
    fs::write(dir.join("pages-2.img"), image(bin, 8192, 6, seed + 1))?;
    fs::write(dir.join("core-1.img"), xorshift(seed + 2, 20_000))?;
    fs::write(dir.join("mm-1.img"), image(bin, 3, 0, seed + 3))?;
    let mem = fs::File::create(dir.join("memory-ranges"))?;
    mem.set_len(1 << 30)?;
    let data = image(bin, 10240, 3, seed + 4);
    mem.write_all_at(&data, 256 << 20)?;
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(work) = args.next().map(PathBuf::from) else {
        eprintln!("usage: snapbench <work-dir> [binary-file]");
        std::process::exit(2);
    };
    let bin_path = args
        .next()
        .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0".into());
    let bin = fs::read(&bin_path).unwrap_or_else(|_| xorshift(42, 1 << 20));
    fs::create_dir_all(&work)?;
    let src = work.join("src");
    let sess = work.join("session");
    let root = work.join("store");
    for p in [&src, &sess, &root, &work.join("out")] {
        let _ = fs::remove_dir_all(p);
    }
    println!("generating data (binary pages from {bin_path}) ...");
    write_tree(&src, &bin, 1)?;
    // Session checkpoint: same tree, 40 pages inserted at the front of pages-1 (shift),
    // 3% of pages-1 rewritten in a few runs.
    write_tree(&sess, &bin, 1)?;
    let mut p1 = fs::read(sess.join("pages-1.img"))?;
    p1.splice(0..0, xorshift(7, 40 * PAGE));
    for run in 0..10usize {
        let start = (run * 3001 + 100) * PAGE;
        let len = 100 * PAGE;
        let end = (start + len).min(p1.len());
        p1[start..end].copy_from_slice(&xorshift(run as u64 + 100, end - start));
    }
    fs::write(sess.join("pages-1.img"), &p1)?;

    // Flush the generated source so the first put's syncfs does not pay for writing it.
    let t = Instant::now();
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    println!("sync of generated data: {:.2}s", t.elapsed().as_secs_f64());
    let store = Store::open(&root)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("store at {} ({threads} cores)\n", root.display());

    let st = store.put_dir("tpl-bench", &src, &PutOptions::default())?;
    println!(
        "put (cold):        {:7.1} MB logical, {:6.1} MB data, {:6.1} MB stored (ratio {:.2}), \
         {} chunks in {:.2}s -> {:.0} MB/s of data",
        mb(st.raw_bytes),
        mb(st.data_bytes),
        mb(st.new_stored_bytes),
        st.data_bytes as f64 / st.new_stored_bytes.max(1) as f64,
        st.chunks_total,
        st.elapsed.as_secs_f64(),
        mb(st.data_bytes) / st.elapsed.as_secs_f64()
    );
    let st2 = store.put_dir("tpl-bench-2", &src, &PutOptions::default())?;
    println!(
        "put (unchanged):   {} new chunks, {:.2}s -> {:.0} MB/s of data",
        st2.chunks_new,
        st2.elapsed.as_secs_f64(),
        mb(st2.data_bytes) / st2.elapsed.as_secs_f64()
    );
    let opts = PutOptions {
        parent: Some("tpl-bench".into()),
    };
    let st3 = store.put_dir("session-bench", &sess, &opts)?;
    println!(
        "put (diff):        {} of {} chunks new, {:.1} MB new stored ({:.1}% of cold), {:.2}s",
        st3.chunks_new,
        st3.chunks_total,
        mb(st3.new_stored_bytes),
        st3.new_stored_bytes as f64 / st.new_stored_bytes.max(1) as f64 * 100.0,
        st3.elapsed.as_secs_f64()
    );

    // Drop the page cache of the store? Not without root-wide side effects; numbers are warm.
    let out = work.join("out");
    let ms = store.materialize("tpl-bench", &out)?;
    println!(
        "materialize:       {:.1} MB written ({} chunks, {:.1} MB logical) in {:.2}s -> {:.0} MB/s",
        mb(ms.written_bytes),
        ms.chunks,
        mb(ms.logical_bytes),
        ms.elapsed.as_secs_f64(),
        mb(ms.written_bytes) / ms.elapsed.as_secs_f64()
    );
    let t = Instant::now();
    let cached = store.materialize_cached("tpl-bench")?;
    let first = t.elapsed();
    let t = Instant::now();
    store.materialize_cached("tpl-bench")?;
    println!(
        "materialize_cached: first {:.2}s (incl. syncfs), then {:.1} us -> {}",
        first.as_secs_f64(),
        t.elapsed().as_secs_f64() * 1e6,
        cached.display()
    );
    let t = Instant::now();
    store.verify("tpl-bench")?;
    println!(
        "verify:            {:.2}s -> {:.0} MB/s",
        t.elapsed().as_secs_f64(),
        mb(ms.written_bytes) / t.elapsed().as_secs_f64()
    );
    let u = store.usage()?;
    println!(
        "usage:             {} chunks, {:.1} MB stored for 3 snapshots of {:.1} MB logical each",
        u.chunks,
        mb(u.chunk_bytes),
        mb(st.raw_bytes)
    );
    store.delete("tpl-bench-2")?;
    store.delete("session-bench")?;
    let gc = store.gc()?;
    println!(
        "gc:                {} chunks + {} manifests deleted, {:.1} MB freed in {:.2}s",
        gc.chunks_deleted,
        gc.manifests_deleted,
        mb(gc.bytes_freed),
        gc.elapsed.as_secs_f64()
    );
    Ok(())
}
