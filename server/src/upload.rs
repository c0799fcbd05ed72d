//! Unpacking an uploaded template tar. The archive comes from the network, so every entry is
//! checked before anything is written: only relative paths inside the destination, regular
//! files, directories and symlinks whose target stays inside the destination (checked per
//! entry, then again by resolving every link once all are written). Anything else (absolute
//! paths, `..`, devices, fifos, hard links, sparse files) is refused, naming the entry; the
//! caller then removes the destination, so nothing of the archive is kept.

use std::path::{Component, Path, PathBuf};

use tar::EntryType;

/// Most entries one template may hold: bounds the inode count an upload can create.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive itself is at fault (the caller's error).
    #[error("template archive: {0}")]
    Bad(String),
    /// Writing the files failed (the server's error).
    #[error("unpacking the template archive into {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Unpacks `archive` into `dest` (an existing, empty directory).
pub fn unpack(archive: impl std::io::Read, dest: &Path) -> Result<(), UnpackError> {
    let io = |source| UnpackError::Io {
        dir: dest.to_path_buf(),
        source,
    };
    let bad = |m: String| UnpackError::Bad(m);
    let mut a = tar::Archive::new(archive);
    // Ownership and setuid bits from a stranger's archive must not be honoured.
    a.set_preserve_permissions(false);
    a.set_preserve_ownerships(false);
    a.set_unpack_xattrs(false);
    a.set_overwrite(true);
    let entries = a
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let mut count = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a valid tar archive: {e}")))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let raw = entry
            .path()
            .map_err(|e| bad(format!("entry #{count} has an unreadable path: {e}")))?
            .into_owned();
        let name = raw.display().to_string();
        let rel = relative(&raw).ok_or_else(|| {
            bad(format!(
                "entry `{name}` is an absolute path or contains `..`"
            ))
        })?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::Directory => {}
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("symlink `{name}` has an unreadable target: {e}")))?
                    .ok_or_else(|| bad(format!("symlink `{name}` has no target")))?;
                if !symlink_stays_inside(&rel, &target) {
                    return Err(bad(format!(
                        "symlink `{name}` points outside the template directory (to `{}`)",
                        target.display()
                    )));
                }
            }
            EntryType::Link => {
                return Err(bad(format!(
                    "entry `{name}` is a hard link; store the file itself"
                )))
            }
            other => {
                return Err(bad(format!(
                    "entry `{name}` is a {}; only files, directories and symlinks are allowed",
                    describe(other)
                )))
            }
        }
        if rel.as_os_str().is_empty() {
            // The archive's root directory (`./`): `dest` already exists.
            continue;
        }
        // unpack_in re-checks that the target (after resolving already-unpacked parents,
        // which could be symlinks) lies inside dest, and refuses otherwise.
        let inside = entry.unpack_in(dest).map_err(|e| {
            if e.kind() == std::io::ErrorKind::StorageFull {
                io(e)
            } else {
                bad(format!("entry `{name}`: {e}"))
            }
        })?;
        if !inside {
            return Err(bad(format!(
                "entry `{name}` would be written outside the template directory"
            )));
        }
    }
    check_symlinks(dest)?;
    if !dest.join("template.toml").is_file() {
        return Err(bad(
            "it has no template.toml at its root; tar the template directory's contents (e.g. `tar -C dir -cf - .`)".into(),
        ));
    }
    Ok(())
}

/// Resolves every unpacked symlink for real. The per-entry check is lexical, which a chain
/// defeats: `y -> .` and `x -> y/..` each look inside, yet `x` is the parent of the root.
/// Following the links on disk catches any such chain. A dangling link reads nothing, so
/// it may stay; a loop may not.
fn check_symlinks(dest: &Path) -> Result<(), UnpackError> {
    let io = |source| UnpackError::Io {
        dir: dest.to_path_buf(),
        source,
    };
    let root = dest.canonicalize().map_err(io)?;
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io)?;
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_symlink() {
                continue;
            }
            let name = path
                .strip_prefix(dest)
                .unwrap_or(&path)
                .display()
                .to_string();
            match path.canonicalize() {
                Ok(real) if real.starts_with(&root) => {}
                Ok(_) => {
                    return Err(UnpackError::Bad(format!(
                        "symlink `{name}` resolves outside the template directory"
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(UnpackError::Bad(format!(
                        "symlink `{name}` cannot be resolved: {e}"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// The entry's path without `.` components, or `None` if it is absolute or climbs.
fn relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Whether a symlink at `link` (relative to the root) pointing at `target` resolves inside
/// the root, lexically. Absolute targets are refused: inside the sandbox they would mean
/// something else than on the host, and on the host they point outside.
fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(s) => depth.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn describe(t: EntryType) -> &'static str {
    match t {
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "fifo",
        EntryType::GNUSparse => "sparse file",
        _ => "special entry",
    }
}

/// Removes what a killed server left under `$THAW_HOME/sources`: partial uploads
/// (`.upload-*.tar`) and unpacked directories that no template uses (a deploy that never
/// finished). Runs before the server accepts requests, so no upload of its own is in flight.
pub fn sweep_sources(engine: &thaw_platform::Engine) {
    let root = engine.paths.home.join("sources");
    let Ok(templates) = engine.all_templates() else {
        return;
    };
    let used: std::collections::HashSet<std::path::PathBuf> =
        templates.into_iter().map(|t| t.source_dir).collect();
    let Ok(owners) = std::fs::read_dir(&root) else {
        return;
    };
    for owner in owners.flatten() {
        let Ok(entries) = std::fs::read_dir(owner.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let stale = if e.file_name().to_string_lossy().starts_with(".upload-") {
                true
            } else {
                // Records hold canonical paths (deploy canonicalises); so must we, or a
                // symlinked THAW_HOME would make every upload look unused.
                path.is_dir() && !used.contains(&path.canonicalize().unwrap_or(path.clone()))
            };
            if stale {
                tracing::info!(path = %path.display(), "removing a stale template upload");
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        // set_path refuses `..` and absolute paths; write the raw name for hostile cases.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    fn archive(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let toml = b"name = 'x'";
        let mut h = header("template.toml", EntryType::Regular, toml.len() as u64);
        h.set_cksum();
        b.append(&h, &toml[..]).unwrap();
        for (path, kind, data, link) in entries {
            let mut h = header(path, *kind, data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn try_unpack(
        entries: &[(&str, EntryType, &[u8], Option<&str>)],
    ) -> Result<tempfile::TempDir, String> {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("t");
        std::fs::create_dir(&dest).unwrap();
        unpack(&archive(entries)[..], &dest)
            .map(|()| d)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn files_dirs_and_inner_symlinks_unpack() {
        let d = try_unpack(&[
            ("./bin/", EntryType::Directory, b"", None),
            ("./bin/run.sh", EntryType::Regular, b"#!/bin/sh\n", None),
            ("bin/alias", EntryType::Symlink, b"", Some("run.sh")),
            ("up", EntryType::Symlink, b"", Some("bin/../template.toml")),
        ])
        .unwrap();
        let t = d.path().join("t");
        assert_eq!(std::fs::read(t.join("bin/run.sh")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(
            std::fs::read_link(t.join("bin/alias")).unwrap(),
            Path::new("run.sh")
        );
        assert!(t.join("template.toml").is_file());
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        let cases: &[(&str, EntryType, Option<&str>, &str)] = &[
            ("../evil", EntryType::Regular, None, "../evil"),
            ("a/../../evil", EntryType::Regular, None, "a/../../evil"),
            ("/etc/evil", EntryType::Regular, None, "/etc/evil"),
            ("dev", EntryType::Char, None, "character device"),
            ("blk", EntryType::Block, None, "block device"),
            ("pipe", EntryType::Fifo, None, "fifo"),
            ("hard", EntryType::Link, Some("template.toml"), "hard link"),
            (
                "esc",
                EntryType::Symlink,
                Some("../../etc/passwd"),
                "outside",
            ),
            ("abs", EntryType::Symlink, Some("/etc/passwd"), "outside"),
            ("a/deep", EntryType::Symlink, Some("../../x"), "outside"),
        ];
        for (path, kind, link, needle) in cases {
            let e = try_unpack(&[(path, *kind, b"", *link)])
                .err()
                .unwrap_or_else(|| panic!("{path} ({kind:?}) was accepted"));
            assert!(e.contains(needle), "{path}: {e}");
        }
    }

    #[test]
    fn writing_through_an_inner_symlink_to_a_dir_cannot_escape() {
        // `link` -> `.` is inside; a later entry `link/../../x` is refused lexically, and
        // `link/x` lands inside.
        let d = try_unpack(&[
            ("link", EntryType::Symlink, b"", Some(".")),
            ("link/x", EntryType::Regular, b"ok", None),
        ])
        .unwrap();
        assert_eq!(std::fs::read(d.path().join("t/x")).unwrap(), b"ok");
    }

    #[test]
    fn a_chain_of_inner_looking_symlinks_cannot_reach_outside() {
        // Each target looks inside on its own; together `x` is the root's parent.
        let e = try_unpack(&[
            ("y", EntryType::Symlink, b"", Some(".")),
            ("x", EntryType::Symlink, b"", Some("y/..")),
        ])
        .unwrap_err();
        assert!(e.contains("`x` resolves outside"), "{e}");
        let e = try_unpack(&[
            ("a", EntryType::Symlink, b"", Some("b")),
            ("b", EntryType::Symlink, b"", Some("a")),
        ])
        .unwrap_err();
        assert!(e.contains("cannot be resolved"), "{e}");
        // Dangling but inside: harmless, kept.
        let d = try_unpack(&[("later", EntryType::Symlink, b"", Some("not-yet"))]).unwrap();
        assert!(std::fs::symlink_metadata(d.path().join("t/later")).is_ok());
    }

    #[test]
    fn an_archive_without_template_toml_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let h = header("other", EntryType::Regular, 0);
        b.append(&h, &b""[..]).unwrap();
        let e = unpack(&b.into_inner().unwrap()[..], d.path()).unwrap_err();
        assert!(e.to_string().contains("template.toml"), "{e}");
        let e = unpack(&b"not a tar at all, clearly"[..], d.path()).unwrap_err();
        assert!(matches!(e, UnpackError::Bad(_)), "{e}");
    }
}
