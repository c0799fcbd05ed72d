//! Content-addressed cache of built images: `<root>/<kind>/<key>/`. An entry is built in a
//! temporary directory next to its final place and renamed into it, so a crash mid-build
//! never leaves a half-written entry that a later run would trust.

use std::path::{Path, PathBuf};

use tracing::{debug, info_span};

use super::ImageError;

#[derive(Debug, Clone)]
pub struct ImageCache {
    root: PathBuf,
}

impl ImageCache {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| ImageError::io(&root, e))?;
        Ok(ImageCache { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns the entry `<kind>/<key>`, building it with `build(tmp_dir)` when missing.
    pub fn get_or_build<F>(&self, kind: &str, key: &str, build: F) -> Result<PathBuf, ImageError>
    where
        F: FnOnce(&Path) -> Result<(), ImageError>,
    {
        let parent = self.root.join(kind);
        let entry = parent.join(key);
        if entry.is_dir() {
            debug!(kind, key, "image cache hit");
            return Ok(entry);
        }
        let _span = info_span!("image_build", kind, key).entered();
        std::fs::create_dir_all(&parent).map_err(|e| ImageError::io(&parent, e))?;
        // Same filesystem as the entry, so the final rename is atomic.
        let tmp = tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(&parent)
            .map_err(|e| ImageError::io(&parent, e))?;
        build(tmp.path())?;
        let tmp_path = tmp.keep();
        match std::fs::rename(&tmp_path, &entry) {
            Ok(()) => Ok(entry),
            // A concurrent builder won the race: its entry is as good as ours.
            Err(_) if entry.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp_path);
                Ok(entry)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp_path);
                Err(ImageError::io(&entry, e))
            }
        }
    }
}

/// Hex content key from a list of labelled inputs.
pub fn key_of(parts: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().to_hex()[..32].to_owned()
}

/// blake3 of a file's contents, streamed.
pub fn hash_file(path: &Path) -> Result<blake3::Hash, ImageError> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    h.update_reader(f).map_err(|e| ImageError::io(path, e))?;
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_once_and_failed_builds_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path()).unwrap();
        let mut calls = 0;
        let e = cache
            .get_or_build("k", "abc", |tmp| {
                calls += 1;
                std::fs::write(tmp.join("f"), "x").unwrap();
                Ok(())
            })
            .unwrap();
        assert_eq!(std::fs::read(e.join("f")).unwrap(), b"x");
        cache
            .get_or_build("k", "abc", |_| {
                calls += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(calls, 1);
        let r = cache.get_or_build("k", "bad", |_| {
            Err(ImageError::NoKernelInPackage {
                deb: "x.deb".into(),
            })
        });
        assert!(r.is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path().join("k"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("abc")]);
    }
}
