//! Measures the numbers behind FORMAT.md's chunking and compression choices.
//!
//! `cargo run --release -p thaw-snapshotter --example chunkstudy -- [binary-file]`
//!
//! 1. Dedup: a synthetic 48 MiB "pages image" (pages taken from a real binary, heap-like
//!    text pages, random pages, some zero pages) versus a "session checkpoint" of it: 5% of
//!    pages dirtied, pages inserted at 20 places (4 KiB-multiple shifts, as when a process
//!    maps new memory) and 10 runs removed. Reports how much of B is found in A's chunks
//!    for fixed-size and FastCDC chunking at several sizes, and the chunk count.
//! 2. Compression: zstd levels on 16 KiB chunks of the binary (how the store compresses):
//!    ratio, compress and decompress throughput.

use std::collections::HashSet;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;
use common::xorshift;

const PAGE: usize = 4096;

fn build_image(bin: &[u8], pages: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(pages);
    let bin_pages = bin.len() / PAGE;
    for i in 0..pages {
        let kind = (i as u64).wrapping_mul(2654435761).wrapping_add(seed) % 10;
        let page = match kind {
            0..=4 => {
                let p = (i * 7919) % bin_pages.max(1);
                bin[p * PAGE..(p + 1) * PAGE].to_vec()
            }
            5..=7 => {
                let line = format!("obj#{i} {{'key': {}, 'name': 'item-{}'}} ", i * 31, i % 97);
                line.as_bytes().iter().cycle().take(PAGE).copied().collect()
            }
            8 => xorshift(seed ^ (i as u64) << 8, PAGE),
            _ => vec![0u8; PAGE],
        };
        out.push(page);
    }
    out
}

/// Dirty 5% of the pages, either `scattered` (every 20th page: worst case) or clustered
/// in 30 runs (heap arenas and stacks a task touched), then shift by inserting and removing
/// whole pages.
fn mutate(a: &[Vec<u8>], scattered: bool) -> Vec<Vec<u8>> {
    let mut b: Vec<Vec<u8>> = a.to_vec();
    let dirty: Vec<usize> = if scattered {
        (0..b.len()).step_by(20).collect()
    } else {
        let run = b.len() / 20 / 30;
        (0..30)
            .flat_map(|r| {
                let start = (r * 9973 + 500) % (b.len() - run);
                start..start + run
            })
            .collect()
    };
    for (n, j) in dirty.into_iter().enumerate() {
        let k = (n * 7) % PAGE;
        b[j][k] ^= 0x5a;
        b[j][(k + 100) % PAGE] ^= 0x33;
    }
    // insert 1..8 new pages at 20 places
    for n in 0..20usize {
        let at = (n * 7727 + 1000) % b.len();
        for m in 0..(n % 8 + 1) {
            b.insert(at, xorshift((n * 100 + m) as u64 + 777, PAGE));
        }
    }
    // remove 10 runs of 1..4 pages
    for n in 0..10usize {
        let at = (n * 5003 + 333) % (b.len() - 8);
        for _ in 0..(n % 4 + 1) {
            b.remove(at);
        }
    }
    b
}

fn cuts_fixed(data: &[u8], size: usize) -> Vec<(usize, usize)> {
    (0..data.len())
        .step_by(size)
        .map(|o| (o, size.min(data.len() - o)))
        .collect()
}

fn cuts_cdc(data: &[u8], avg: u32) -> Vec<(usize, usize)> {
    fastcdc::v2020::FastCDC::new(data, avg / 4, avg, avg * 4)
        .map(|c| (c.offset, c.length))
        .collect()
}

/// (offset, length) cut points of a buffer.
type Cutter<'a> = &'a dyn Fn(&[u8]) -> Vec<(usize, usize)>;

fn dedup(a: &[u8], b: &[u8], cut: Cutter<'_>) -> (f64, usize, f64) {
    let t = Instant::now();
    let ca = cut(a);
    let secs = t.elapsed().as_secs_f64();
    let known: HashSet<blake3::Hash> = ca
        .iter()
        .map(|&(o, l)| blake3::hash(&a[o..o + l]))
        .collect();
    let cb = cut(b);
    let reused: usize = cb
        .iter()
        .filter(|&&(o, l)| known.contains(&blake3::hash(&b[o..o + l])))
        .map(|&(_, l)| l)
        .sum();
    (
        reused as f64 / b.len() as f64 * 100.0,
        cb.len(),
        a.len() as f64 / secs / 1e6,
    )
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0".into());
    let bin = match std::fs::read(&path) {
        Ok(b) if b.len() >= 1 << 20 => b,
        Ok(_) => {
            eprintln!("{path}: need at least 1 MiB of data");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("cannot read {path}: {e}");
            std::process::exit(2);
        }
    };
    println!("data source: {path} ({} bytes)", bin.len());

    let a_pages = build_image(&bin, 12288, 1);
    let a: Vec<u8> = a_pages.concat();
    let b_clustered: Vec<u8> = mutate(&a_pages, false).concat();
    let b_scattered: Vec<u8> = mutate(&a_pages, true).concat();
    println!(
        "\n## dedup of a 'session checkpoint' B (~{} MiB) against its template A ({} MiB)",
        b_clustered.len() >> 20,
        a.len() >> 20
    );
    println!("B = A with 5% of pages dirtied, 90 pages inserted at 20 places, 25 removed.");
    println!("| chunking | found in A, dirty clustered | found in A, dirty scattered | chunks in B | cut MB/s |");
    println!("|---|---|---|---|---|");
    for size in [4096usize, 16384, 65536] {
        let (pc, n, _) = dedup(&a, &b_clustered, &|d| cuts_fixed(d, size));
        let (ps, _, _) = dedup(&a, &b_scattered, &|d| cuts_fixed(d, size));
        println!(
            "| fixed {} KiB | {pc:.1}% | {ps:.1}% | {n} | - |",
            size / 1024
        );
    }
    for avg in [8192u32, 16384, 32768, 65536, 131072] {
        let (pc, n, mbs) = dedup(&a, &b_clustered, &|d| cuts_cdc(d, avg));
        let (ps, _, _) = dedup(&a, &b_scattered, &|d| cuts_cdc(d, avg));
        println!(
            "| FastCDC {}/{}/{} KiB | {pc:.1}% | {ps:.1}% | {n} | {mbs:.0} |",
            avg / 4096,
            avg / 1024,
            avg / 256
        );
    }

    println!("\n## zstd on 16 KiB chunks of {path}");
    println!("| level | ratio (raw/stored) | compress MB/s | decompress MB/s |");
    println!("|---|---|---|---|");
    let sample = &bin[..bin.len().min(48 << 20)];
    for level in [1, 3, 6, 9, 19] {
        let mut comp = zstd::bulk::Compressor::new(level).expect("zstd");
        let t = Instant::now();
        let stored: Vec<Vec<u8>> = sample
            .chunks(16384)
            .map(|c| comp.compress(c).expect("compress"))
            .collect();
        let ct = t.elapsed().as_secs_f64();
        let total: usize = stored.iter().map(|s| s.len()).sum();
        let mut dec = zstd::bulk::Decompressor::new().expect("zstd");
        let t = Instant::now();
        for s in &stored {
            let out = dec.decompress(s, 16384).expect("decompress");
            std::hint::black_box(out);
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "| {level} | {:.2} | {:.0} | {:.0} |",
            sample.len() as f64 / total as f64,
            sample.len() as f64 / ct / 1e6,
            sample.len() as f64 / dt / 1e6
        );
    }
    let t = Instant::now();
    let h = blake3::hash(sample);
    std::hint::black_box(h);
    println!(
        "\nblake3 (single thread): {:.0} MB/s",
        sample.len() as f64 / t.elapsed().as_secs_f64() / 1e6
    );
}
