//! Splitting files into content-defined chunks, and encoding/decoding one chunk.
//!
//! Files are read region by region (SEEK_DATA/SEEK_HOLE, so holes in sparse files are never
//! read) through a bounded window, cut with FastCDC-2020, and every all-zero chunk is dropped:
//! the manifest lists only non-zero chunks with their offsets, and every gap is a hole.
//! See FORMAT.md for why these parameters.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Content-defined chunking parameters (bytes). Recorded in every manifest so a future
/// change is visible; chunks cut with other parameters stay readable, they just stop
/// deduplicating against new puts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkParams {
    /// The store's parameters: min 4 KiB (one page) / avg 16 KiB / max 64 KiB. Measured in
    /// FORMAT.md (`examples/chunkstudy.rs`): a session checkpoint with 5% dirty pages and
    /// page-shifting inserts finds 90% of its bytes in its template's chunks (78% at 64 KiB
    /// average, 92% at 8 KiB average for twice the chunk files and manifest size).
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 4 * 1024,
        avg: 16 * 1024,
        max: 64 * 1024,
    };
}

/// zstd level for chunks: level 3 (zstd's default). FORMAT.md has the numbers: on binary
/// data it compresses within a few % of level 6-9 at 3-4x their speed, and decompression
/// speed (what restores pay) is the same for every level.
pub const ZSTD_LEVEL: i32 = 3;

/// Bytes read per window. Must be at least twice `max` so every window yields one complete
/// chunk beyond the carried-over tail.
const WINDOW: usize = 8 * 1024 * 1024;

/// True if every byte is zero (word-at-a-time; this runs over every byte stored).
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    for block in &mut words {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

/// The allocated (non-hole) byte ranges of a file as `(start, end)`. Filesystems without
/// SEEK_DATA support report the whole file as data, which is still correct, just slower.
pub(crate) fn data_regions(file: &File, path: &Path, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let Ok(off) = libc::off_t::try_from(pos) else {
            break;
        };
        // SAFETY: lseek on a valid descriptor; no memory is passed.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // No data after pos: the rest is one hole.
                Some(libc::ENXIO) => break,
                // SEEK_DATA unsupported: treat the remainder as data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    out.push((pos, size));
                    break;
                }
                _ => return Err(Error::io("seek data in", path)(e)),
            }
        }
        let data_start = u64::try_from(data).unwrap_or(size).min(size);
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let data_end = if hole < 0 {
            size
        } else {
            u64::try_from(hole).unwrap_or(size).min(size)
        };
        if data_end <= data_start {
            break;
        }
        out.push((data_start, data_end));
        pos = data_end;
    }
    Ok(out)
}

/// Cut `file` (of logical `size`) into chunks, calling `sink(offset, bytes)` for every chunk
/// that is not all zeros. Memory use is bounded by the window, whatever the file size.
///
/// Cut points are identical to chunking each data region in one piece: FastCDC decides a
/// cut only from the bytes after the current chunk's start, so the last (possibly
/// window-truncated) chunk of a window is carried into the next one instead of emitted.
pub(crate) fn chunk_file(
    file: &File,
    path: &Path,
    size: u64,
    params: ChunkParams,
    mut sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let window = WINDOW.max(2 * params.max as usize);
    let mut buf: Vec<u8> = Vec::with_capacity(window);
    for (start, end) in data_regions(file, path, size)? {
        buf.clear();
        let mut buf_pos = start; // file offset of buf[0]
        let mut read_to = start;
        loop {
            let room = (window - buf.len()) as u64;
            let want = room.min(end - read_to) as usize;
            let old = buf.len();
            buf.resize(old + want, 0);
            file.read_exact_at(&mut buf[old..], read_to)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => Error::UnsupportedFile {
                        path: path.to_path_buf(),
                        reason: "file shrank while it was being stored; snapshot a quiescent \
                                 sandbox"
                            .into(),
                    },
                    _ => Error::io("read", path)(e),
                })?;
            read_to += want as u64;
            let last_window = read_to == end;
            let mut consumed = 0usize;
            let cuts: Vec<fastcdc::v2020::Chunk> =
                fastcdc::v2020::FastCDC::new(&buf, params.min, params.avg, params.max).collect();
            let n = cuts.len();
            for (i, c) in cuts.into_iter().enumerate() {
                if !last_window && i + 1 == n {
                    break; // carry: its end may be an artefact of the window edge
                }
                let bytes = &buf[c.offset..c.offset + c.length];
                if !is_zero(bytes) {
                    sink(buf_pos + c.offset as u64, bytes)?;
                }
                consumed = c.offset + c.length;
            }
            if last_window {
                break;
            }
            buf.drain(..consumed);
            buf_pos += consumed as u64;
        }
    }
    Ok(())
}

/// Where a chunk lives: `chunks/<first two hex digits>/<hex>.zst`. The fan-out keeps
/// directories at a few thousand entries even for millions of chunks.
pub(crate) fn chunk_path(chunks_dir: &Path, id: &Digest) -> PathBuf {
    let hex = id.to_hex();
    chunks_dir.join(&hex[..2]).join(format!("{hex}.zst"))
}

/// Decompress `stored` into `out` (reused buffer) and check it is exactly `len` bytes whose
/// blake3 is `id`. The error string is the human detail for `Error::CorruptChunk`.
pub(crate) fn decode_verified(
    dec: &mut zstd::bulk::Decompressor<'_>,
    stored: &[u8],
    len: usize,
    id: &Digest,
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    out.clear();
    // Capacity is exactly the expected length: a frame that claims more is corrupt, and a
    // damaged header cannot make us allocate gigabytes.
    out.reserve(len);
    dec.decompress_to_buffer(stored, out)
        .map_err(|e| format!("zstd decode failed: {e}"))?;
    if out.len() != len {
        return Err(format!(
            "decompressed to {} bytes, manifest says {len}",
            out.len()
        ));
    }
    let got = Digest::of(out);
    if got != *id {
        return Err(format!("blake3 of content is {got}"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no rand crate.
    pub(crate) fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn collect(data: &[u8], params: ChunkParams) -> Vec<(u64, Digest, usize)> {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(data).expect("write");
        let mut out = Vec::new();
        chunk_file(&f, Path::new("t"), data.len() as u64, params, |o, b| {
            out.push((o, Digest::of(b), b.len()));
            Ok(())
        })
        .expect("chunk");
        out
    }

    #[test]
    fn windowed_cuts_equal_whole_buffer_cuts() {
        // 20 MB spans three windows: the carry logic must not change any cut point.
        let data = pseudo_random(1, 20 << 20);
        let p = ChunkParams::DEFAULT;
        let whole: Vec<(u64, Digest, usize)> =
            fastcdc::v2020::FastCDC::new(&data, p.min, p.avg, p.max)
                .map(|c| {
                    let b = &data[c.offset..c.offset + c.length];
                    (c.offset as u64, Digest::of(b), c.length)
                })
                .collect();
        assert_eq!(collect(&data, p), whole);
        let total: usize = whole.iter().map(|c| c.2).sum();
        assert_eq!(total, data.len());
    }

    #[test]
    fn zero_chunks_are_skipped() {
        let mut data = pseudo_random(2, 1 << 20);
        data.extend(std::iter::repeat_n(0u8, 4 << 20));
        data.extend(pseudo_random(3, 1 << 20));
        let chunks = collect(&data, ChunkParams::DEFAULT);
        let covered: usize = chunks.iter().map(|c| c.2).sum();
        assert!(
            covered < (2 << 20) + 512 * 1024,
            "zeros mostly skipped: {covered}"
        );
        assert!(is_zero(&[0; 130]) && !is_zero(&[0, 0, 1]));
        let mut v = vec![0u8; 200];
        v[199] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn holes_are_not_reported_as_data() {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(64 << 20).expect("set_len");
        f.write_all_at(b"x", 32 << 20).expect("write");
        let regions = data_regions(&f, Path::new("t"), 64 << 20).expect("regions");
        let data: u64 = regions.iter().map(|(a, b)| b - a).sum();
        assert!(data <= 1 << 20, "{regions:?}");
    }

    #[test]
    fn decode_detects_corruption() {
        let data = pseudo_random(4, 100_000);
        let id = Digest::of(&data);
        let stored = zstd::bulk::compress(&data, ZSTD_LEVEL).expect("compress");
        let mut dec = zstd::bulk::Decompressor::new().expect("dec");
        let mut out = Vec::new();
        decode_verified(&mut dec, &stored, data.len(), &id, &mut out).expect("good chunk");
        assert_eq!(out, data);
        for i in [0, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[i] ^= 0x01;
            assert!(decode_verified(&mut dec, &bad, data.len(), &id, &mut out).is_err());
        }
        let truncated = &stored[..stored.len() / 2];
        assert!(decode_verified(&mut dec, truncated, data.len(), &id, &mut out).is_err());
        assert!(decode_verified(&mut dec, &stored, data.len() - 1, &id, &mut out).is_err());
    }
}
