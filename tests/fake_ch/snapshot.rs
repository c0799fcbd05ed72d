//! Cloud Hypervisor's snapshot directory, as far as a test double can honestly write it:
//! `config.json` (the VmConfig in effect), a `state.json` saying that no vCPU, device or
//! memory state was captured, and a token `memory-ranges`. Restoring one boots the guest
//! afresh from its (copied) disk.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::{self, object, opt_bool, opt_str, shape, Invalid};

/// What `state.json` says instead of holding vCPU and device state.
const STATE_NOTE: &str = "test double: guest memory is not captured; restore boots the disk afresh";
/// Size of the token `memory-ranges` file.
const MEMORY_RANGES_LEN: usize = 4096;

/// `file:///abs/dir` to `/abs/dir`.
pub fn dir_from_url(url: &str) -> Result<PathBuf, String> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| format!("Invalid URL {url:?}: only file:// URLs are supported"))?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!("Invalid URL {url:?}: the path must be absolute"));
    }
    Ok(path)
}

/// Body of `vm.snapshot`: the destination directory.
pub fn parse_request(body: &Value) -> Result<PathBuf, Invalid> {
    let top = object(body, "VmSnapshotConfig")?;
    let url = opt_str(top, "destination_url", "VmSnapshotConfig")?
        .ok_or_else(|| shape("destination_url is required"))?;
    dir_from_url(url).map_err(Invalid::Rejected)
}

/// Body of `vm.restore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    pub dir: PathBuf,
    pub resume: bool,
}

pub fn parse_restore(body: &Value) -> Result<RestoreRequest, Invalid> {
    let what = "RestoreConfig";
    let top = object(body, what)?;
    let url = opt_str(top, "source_url", what)?.ok_or_else(|| shape("source_url is required"))?;
    opt_bool(top, "prefault", what)?;
    if let Some(mode) = opt_str(top, "memory_restore_mode", what)? {
        if mode != "Copy" && mode != "OnDemand" {
            return Err(shape(format!(
                "memory_restore_mode {mode:?} is not one of \"Copy\", \"OnDemand\""
            )));
        }
    }
    Ok(RestoreRequest {
        dir: dir_from_url(url).map_err(Invalid::Rejected)?,
        resume: opt_bool(top, "resume", what)?.unwrap_or(false),
    })
}

/// `config.json`, a `state.json` that says what it is, and a token `memory-ranges`. The disk
/// is not part of a Cloud Hypervisor snapshot.
pub fn write(dir: &Path, config: &Value) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!(
            "snapshot destination {} is not a directory",
            dir.display()
        ));
    }
    let state = json!({"thaw_fake": true, "note": STATE_NOTE});
    let files: [(&str, Vec<u8>); 3] = [
        ("config.json", pretty(config)?),
        ("state.json", pretty(&state)?),
        ("memory-ranges", vec![0u8; MEMORY_RANGES_LEN]),
    ];
    for (name, data) in files {
        let path = dir.join(name);
        std::fs::write(&path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn pretty(v: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec_pretty(v).map_err(|e| format!("cannot encode JSON: {e}"))
}

/// The snapshot's (validated) config; `state.json` and `memory-ranges` must be there too.
pub fn read(dir: &Path) -> Result<Value, Vec<String>> {
    for name in ["state.json", "memory-ranges"] {
        let p = dir.join(name);
        if let Err(e) = std::fs::metadata(&p) {
            return Err(vec![format!(
                "cannot open {} in the snapshot: {e}",
                p.display()
            )]);
        }
    }
    let path = dir.join("config.json");
    let raw =
        std::fs::read(&path).map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    let config: Value = serde_json::from_slice(&raw)
        .map_err(|e| vec![format!("{} is not valid JSON: {e}", path.display())])?;
    config::validate(&config)
        .map_err(|e| vec!["Error validating configuration".into(), e.message()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_files_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k");
        std::fs::write(&f, b"x").unwrap();
        let cfg = json!({"payload": {"kernel": f}, "disks": [{"path": f}],
                         "vsock": {"cid": 9, "socket": "/w/v.sock"}});
        write(d.path(), &cfg).unwrap();
        let state: Value =
            serde_json::from_slice(&std::fs::read(d.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(state["thaw_fake"], true);
        let back = read(d.path()).unwrap();
        assert_eq!(back["vsock"]["cid"], 9);
        std::fs::remove_file(d.path().join("memory-ranges")).unwrap();
        let e = read(d.path()).unwrap_err();
        assert!(e[0].contains("memory-ranges"), "{e:?}");
        assert!(write(&d.path().join("missing"), &cfg).is_err());
    }

    #[test]
    fn urls_and_restore_bodies() {
        assert_eq!(dir_from_url("file:///a/b").unwrap(), PathBuf::from("/a/b"));
        assert!(dir_from_url("/a/b").is_err());
        assert!(dir_from_url("file://rel").is_err());
        let r = parse_restore(&json!({"source_url": "file:///s", "prefault": false,
            "memory_restore_mode": "OnDemand", "resume": true}))
        .unwrap();
        assert_eq!(r.dir, PathBuf::from("/s"));
        assert!(r.resume);
        assert!(matches!(
            parse_restore(&json!({"source_url": "file:///s", "memory_restore_mode": "ondemand"})),
            Err(Invalid::Shape(_))
        ));
    }
}
