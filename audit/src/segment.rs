//! Segment files: `<dir>/NNNNNNNN.jsonl`, numbered from 1 with no gap.

use std::path::{Path, PathBuf};

pub(crate) fn segment_name(n: u32) -> String {
    format!("{n:08}.jsonl")
}

pub(crate) fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(segment_name(n))
}

/// The number of a segment file's name; `None` for any other file.
fn parse_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".jsonl")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every segment's number, ascending (other files in the directory are not the log's).
pub(crate) fn list(dir: &Path) -> std::io::Result<Vec<u32>> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_name) {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_segment_names_are_segments() {
        assert_eq!(parse_name("00000001.jsonl"), Some(1));
        assert_eq!(parse_name(&segment_name(42)), Some(42));
        for other in [
            "1.jsonl",
            "00000001.json",
            ".lock",
            "0000000a.jsonl",
            "000000001.jsonl",
        ] {
            assert_eq!(parse_name(other), None, "{other}");
        }
    }
}
