//! WriteFile, ReadFile and ListDir. Blocking filesystem work runs on tokio's blocking pool
//! so a large file does not stall other connections on the single runtime thread.

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use thaw_protocol::{DirEntry, FileKind, Response, MAX_FRAME};

use crate::error::ApiError;

/// Largest file content returned in one `FileData`: base64 grows data by 4/3 and the frame
/// must stay under `MAX_FRAME`, so leave room for the encoding and the JSON around it.
pub const MAX_READ: u64 = (MAX_FRAME as u64 / 4) * 3 - 4096;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("file worker failed: {e}")))?
}

fn absolute(path: &str) -> Result<PathBuf, ApiError> {
    if path.is_empty() {
        return Err(ApiError::bad_request("empty path"));
    }
    Ok(PathBuf::from(path))
}

pub async fn write_file(
    path: String,
    data: Vec<u8>,
    mode: Option<u32>,
    append: bool,
) -> Result<Response, ApiError> {
    let path = absolute(&path)?;
    if let Some(m) = mode {
        if m > 0o7777 {
            return Err(ApiError::bad_request(format!(
                "mode {m:o} is not a permission mode (at most 7777 octal)"
            )));
        }
    }
    blocking(move || {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| ApiError::io("cannot create directory", parent, &e))?;
        }
        let existed = path.symlink_metadata().is_ok();
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).mode(mode.unwrap_or(0o644));
        if append {
            opts.append(true);
        } else {
            opts.truncate(true);
        }
        let mut file = opts
            .open(&path)
            .map_err(|e| ApiError::io("cannot open", &path, &e))?;
        file.write_all(&data)
            .map_err(|e| ApiError::io("cannot write", &path, &e))?;
        // The create mode is filtered by the umask; set it exactly when asked for, or
        // when we created the file (so the default really is 0644).
        if mode.is_some() || !existed {
            file.set_permissions(fs::Permissions::from_mode(mode.unwrap_or(0o644)))
                .map_err(|e| ApiError::io("cannot chmod", &path, &e))?;
        }
        Ok(Response::Ok)
    })
    .await
}

pub async fn read_file(path: String, max_bytes: Option<u64>) -> Result<Response, ApiError> {
    let path = absolute(&path)?;
    let max = max_bytes.unwrap_or(MAX_READ).min(MAX_READ);
    blocking(move || {
        let file = fs::File::open(&path).map_err(|e| ApiError::io("cannot open", &path, &e))?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(ApiError::bad_request(format!(
                "{} is a directory: use list_dir",
                path.display()
            )));
        }
        let mut data = Vec::new();
        // Read one byte past the limit to learn whether the file is longer.
        file.take(max + 1)
            .read_to_end(&mut data)
            .map_err(|e| ApiError::io("cannot read", &path, &e))?;
        let truncated = data.len() as u64 > max;
        data.truncate(max as usize);
        Ok(Response::FileData {
            data: data.into(),
            truncated,
        })
    })
    .await
}

pub async fn list_dir(path: String) -> Result<Response, ApiError> {
    let path = absolute(&path)?;
    blocking(move || {
        let dir = fs::read_dir(&path).map_err(|e| ApiError::io("cannot list", &path, &e))?;
        let mut entries = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| ApiError::io("cannot list", &path, &e))?;
            // An entry deleted since readdir is simply skipped.
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            entries.push(dir_entry(&entry.file_name().to_string_lossy(), &meta));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::DirEntries { entries })
    })
    .await
}

fn dir_entry(name: &str, meta: &fs::Metadata) -> DirEntry {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    DirEntry {
        name: name.to_string(),
        kind,
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
    }
}

/// Used by tests and by the sandbox-id writer.
pub fn write_small(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_protocol::ErrorCode;

    #[tokio::test]
    async fn write_read_list() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c.txt");
        let ps = p.to_string_lossy().to_string();
        write_file(ps.clone(), b"hello".to_vec(), None, false)
            .await
            .unwrap();
        write_file(ps.clone(), b" world".to_vec(), Some(0o600), true)
            .await
            .unwrap();
        match read_file(ps.clone(), Some(7)).await.unwrap() {
            Response::FileData { data, truncated } => {
                assert_eq!(data.0, b"hello w");
                assert!(truncated);
            }
            other => panic!("{other:?}"),
        }
        match list_dir(dir.path().join("a/b").to_string_lossy().into())
            .await
            .unwrap()
        {
            Response::DirEntries { entries } => {
                assert_eq!(entries.len(), 1);
                assert_eq!(entries[0].mode, 0o600);
                assert_eq!(entries[0].size, 11);
            }
            other => panic!("{other:?}"),
        }
        let err = read_file(dir.path().join("nope").to_string_lossy().into(), None)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err.message.contains("nope"));
    }
}
