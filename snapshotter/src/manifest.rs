//! The per-snapshot manifest: the file tree, and for each regular file the list of
//! non-zero chunks with their offsets (gaps are holes). Stored as compact JSON under
//! `manifests/<blake3 of the JSON>.json`; the id is re-checked on every read.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkParams;
use crate::digest::Digest;

/// Manifest format version written by this build.
pub const MANIFEST_FORMAT: u32 = 1;

/// A snapshot's description. See FORMAT.md for the JSON schema and an example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Name the snapshot was stored under.
    pub name: String,
    /// Informational: the snapshot this one was taken as a diff of (dedup against it is
    /// automatic through content addressing).
    pub parent: Option<String>,
    /// Seconds since the Unix epoch at put time.
    pub created_unix: u64,
    /// How the files were cut.
    pub chunking: ChunkParams,
    /// Unix mode bits of the snapshot's root directory.
    pub root_mode: u32,
    /// Entries in tree order: every entry's parent directory comes before it.
    pub entries: Vec<Entry>,
}

/// One directory entry below the snapshot root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path, `/`-separated, no `.`/`..`/empty components.
    pub path: String,
    /// Unix permission bits (including setuid/setgid/sticky); not used for symlinks.
    pub mode: u32,
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File {
        /// Logical size; ranges not covered by `chunks` are zeros (holes when materialised).
        size: u64,
        /// Non-zero chunks, ascending and non-overlapping.
        chunks: Vec<ChunkRef>,
    },
    Symlink {
        target: String,
    },
}

/// A chunk placed at an offset in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub offset: u64,
    pub len: u32,
    pub id: Digest,
}

/// Cheap facts about a snapshot, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestSummary {
    pub manifest: Digest,
    pub parent: Option<String>,
    pub created_unix: u64,
    pub files: u64,
    /// Sum of logical file sizes.
    pub logical_bytes: u64,
    /// Sum of the lengths of non-zero chunks (what materialising writes).
    pub data_bytes: u64,
    /// Distinct chunks referenced.
    pub chunks: u64,
}

impl Manifest {
    /// Serialize to the canonical bytes whose blake3 is the manifest id.
    pub fn encode(&self) -> (Digest, Vec<u8>) {
        // Serializing plain structs of strings and integers cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        (Digest::of(&bytes), bytes)
    }

    /// Parse and validate bytes read from `manifests/<expected>.json`. The error string is
    /// the detail for `Error::CorruptManifest`.
    pub fn decode(bytes: &[u8], expected: &Digest) -> Result<Manifest, String> {
        let got = Digest::of(bytes);
        if got != *expected {
            return Err(format!("content hash is {got} ({} bytes)", bytes.len()));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        if m.format != MANIFEST_FORMAT {
            return Err(format!(
                "format {} is not supported (this build reads {MANIFEST_FORMAT})",
                m.format
            ));
        }
        m.validate()?;
        Ok(m)
    }

    /// Structural checks that make materialising safe even for a manifest that was written
    /// by a buggy or hostile producer: no path escapes the destination, every parent is a
    /// directory listed earlier (so nothing is ever written through a symlink), and chunks
    /// tile their file without overlap.
    pub fn validate(&self) -> Result<(), String> {
        let mut dirs: HashSet<&str> = HashSet::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for e in &self.entries {
            check_rel_path(&e.path)?;
            if !seen.insert(&e.path) {
                return Err(format!("duplicate entry {:?}", e.path));
            }
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                if !dirs.contains(parent) {
                    return Err(format!(
                        "entry {:?} comes before (or without) its parent directory",
                        e.path
                    ));
                }
            }
            match &e.kind {
                EntryKind::Dir => {
                    dirs.insert(&e.path);
                }
                EntryKind::File { size, chunks } => {
                    let mut end = 0u64;
                    for c in chunks {
                        if c.offset < end || c.len == 0 {
                            return Err(format!("{:?}: chunks overlap or are empty", e.path));
                        }
                        end = c
                            .offset
                            .checked_add(u64::from(c.len))
                            .ok_or("offset overflow")?;
                    }
                    if end > *size {
                        return Err(format!("{:?}: chunks extend past the file size", e.path));
                    }
                }
                EntryKind::Symlink { target } => {
                    if target.is_empty() || target.contains('\0') {
                        return Err(format!("{:?}: bad symlink target", e.path));
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts for listings.
    pub fn summary(&self, id: Digest) -> ManifestSummary {
        let mut files = 0;
        let mut logical_bytes = 0;
        let mut data_bytes = 0;
        let mut ids = HashSet::new();
        for e in &self.entries {
            if let EntryKind::File { size, chunks } = &e.kind {
                files += 1;
                logical_bytes += size;
                for c in chunks {
                    data_bytes += u64::from(c.len);
                    ids.insert(c.id);
                }
            }
        }
        ManifestSummary {
            manifest: id,
            parent: self.parent.clone(),
            created_unix: self.created_unix,
            files,
            logical_bytes,
            data_bytes,
            chunks: ids.len() as u64,
        }
    }

    /// Every chunk id referenced.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &Digest> {
        self.entries
            .iter()
            .flat_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => chunks.as_slice(),
                _ => &[],
            })
            .map(|c| &c.id)
    }
}

fn check_rel_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 4096 || p.contains('\0') {
        return Err(format!("bad path {p:?}"));
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("path {p:?} is not a plain relative path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let id = Digest::of(b"chunk");
        Manifest {
            format: MANIFEST_FORMAT,
            name: "tpl-a".into(),
            parent: None,
            created_unix: 1,
            chunking: ChunkParams::DEFAULT,
            root_mode: 0o755,
            entries: vec![
                Entry {
                    path: "d".into(),
                    mode: 0o755,
                    kind: EntryKind::Dir,
                },
                Entry {
                    path: "d/pages-1.img".into(),
                    mode: 0o600,
                    kind: EntryKind::File {
                        size: 10_000,
                        chunks: vec![ChunkRef {
                            offset: 4096,
                            len: 5,
                            id,
                        }],
                    },
                },
                Entry {
                    path: "l".into(),
                    mode: 0o777,
                    kind: EntryKind::Symlink {
                        target: "d/pages-1.img".into(),
                    },
                },
            ],
        }
    }

    #[test]
    fn roundtrip_and_hash_check() {
        let m = sample();
        let (id, bytes) = m.encode();
        assert_eq!(Manifest::decode(&bytes, &id), Ok(m));
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(Manifest::decode(&bad, &id).is_err());
        assert!(Manifest::decode(&bytes[..bytes.len() - 1], &id).is_err());
    }

    #[test]
    fn rejects_unsafe_trees() {
        for path in ["../x", "/etc/passwd", "a/./b", "", "a//b"] {
            let mut m = sample();
            m.entries[1].path = path.into();
            assert!(m.validate().is_err(), "{path:?}");
        }
        // A file below a symlink would be written through the link.
        let mut m = sample();
        m.entries.push(Entry {
            path: "l/x".into(),
            mode: 0o644,
            kind: EntryKind::Dir,
        });
        assert!(m.validate().is_err());
        // Overlapping chunks.
        let mut m = sample();
        if let EntryKind::File { chunks, .. } = &mut m.entries[1].kind {
            let c = chunks[0];
            chunks.push(c);
        }
        assert!(m.validate().is_err());
    }
}
