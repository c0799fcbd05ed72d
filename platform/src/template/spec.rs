//! `template.toml`: what a user publishes. Every field is documented in `templates/README.md`.
//!
//! Parsing is strict (unknown fields are errors) because a typo such as `comand` silently
//! ignored would publish a template that does something other than what its author wrote.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const TEMPLATE_FILE: &str = "template.toml";

// TemplateSpec and the types of its fields are in thaw-types (types/src/spec.rs): API clients
// share them without compiling the engine. Loading and validating are here
// ([`TemplateSpecExt`]).
pub use thaw_types::spec::{
    BaseSpec, BuildLimits, FileSpec, HandlerModeSpec, HandlerSpec, Limits, RewardSpec,
    TemplateSpec, WarmupSpec, MAX_BUILD_TIMEOUT_S,
};

/// Parses a `files[].mode` ("0755", "755" or "0o755") into permission bits. Only the nine
/// rwx bits are accepted: setuid and setgid files would be privilege escalation waiting for
/// a sandbox that honours them, and sticky is meaningless on what `files` copies.
pub fn parse_file_mode(m: &str) -> std::result::Result<u32, String> {
    let digits = m.strip_prefix("0o").unwrap_or(m);
    let mode = if !digits.is_empty()
        && digits.len() <= 6
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        u32::from_str_radix(digits, 8).ok()
    } else {
        None
    };
    let Some(mode) = mode else {
        return Err(format!("mode `{m}` is not an octal mode, e.g. \"0755\""));
    };
    for (bit, name) in [(0o4000, "setuid"), (0o2000, "setgid"), (0o1000, "sticky")] {
        if mode & bit != 0 {
            return Err(format!(
                "mode {m} has the {name} bit; thaw refuses setuid, setgid and sticky modes"
            ));
        }
    }
    if mode > 0o777 {
        return Err(format!(
            "mode `{m}` is not a permission mode (at most 0777)"
        ));
    }
    Ok(mode)
}

/// The engine's side of [`TemplateSpec`] (the type is in thaw-types, which API clients share):
/// reading a template.toml, its strict parsing and validation, and resolving its files.
pub trait TemplateSpecExt: Sized {
    /// Reads and validates `<dir>/template.toml`.
    fn load(dir: &Path) -> Result<TemplateSpec>;
    /// Parses and validates the text of `file`.
    fn parse(text: &str, file: &Path) -> Result<TemplateSpec>;
    /// Checks what serde cannot: names, ranges, paths, modes (part of [`Self::parse`]).
    fn validate(&self, file: &Path) -> Result<()>;
    /// Resolves a `files[].src` against the template directory, following symlinks, and
    /// refuses one that ends up outside it (an uploaded template is a stranger's tree).
    fn file_source(dir: &Path, i: usize, f: &FileSpec) -> Result<PathBuf>;
}

impl TemplateSpecExt for TemplateSpec {
    /// Reads and validates `<dir>/template.toml`.
    fn load(dir: &Path) -> Result<TemplateSpec> {
        let file = dir.join(TEMPLATE_FILE);
        let text = std::fs::read_to_string(&file).map_err(|e| Error::BadTemplate {
            file: file.clone(),
            message: format!(
                "cannot read it: {e} (is {} a template directory?)",
                dir.display()
            ),
        })?;
        Self::parse(&text, &file)
    }

    fn parse(text: &str, file: &Path) -> Result<TemplateSpec> {
        let spec: TemplateSpec = toml::from_str(text).map_err(|e| Error::BadTemplate {
            file: file.to_path_buf(),
            message: one_line(&e.to_string()),
        })?;
        spec.validate(file)?;
        Ok(spec)
    }

    fn validate(&self, file: &Path) -> Result<()> {
        let bad = |field: &str, why: String| Error::BadTemplate {
            file: file.to_path_buf(),
            message: format!("field `{field}`: {why}"),
        };
        validate_name(&self.name).map_err(|why| bad("name", why))?;
        if self.handler.command.is_empty() {
            return Err(bad("handler.command", "must name a program".into()));
        }
        if let Some(w) = &self.warmup {
            if w.command.is_empty() {
                return Err(bad("warmup.command", "must name a program".into()));
            }
        }
        if let Some(r) = &self.reward {
            if r.command.is_empty() {
                return Err(bad("reward.command", "must name a program".into()));
            }
            if r.timeout_s == 0 {
                return Err(bad("reward.timeout_s", "must be at least 1".into()));
            }
        }
        thaw_gateway::Policy::parse(&self.network.allow_out, &self.network.deny_out)
            .map_err(|e| bad("network", e.to_string()))?;
        thaw_gateway::Policy::parse(&self.build.allow_out, &self.build.deny_out)
            .map_err(|e| bad("build", e.to_string()))?;
        if let BaseSpec::Debian { suite, packages } = &self.base {
            if suite.is_empty() || !suite.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(bad(
                    "base.suite",
                    format!("`{suite}` is not a Debian suite name"),
                ));
            }
            for p in packages {
                let ok = !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.:=".contains(c));
                if !ok {
                    return Err(bad("base.packages", format!("`{p}` is not a package name")));
                }
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            if !f.dest.starts_with('/') {
                return Err(bad(
                    &format!("files[{i}].dest"),
                    format!("`{}` must be an absolute path", f.dest),
                ));
            }
            if Path::new(&f.src).is_absolute() || f.src.split('/').any(|c| c == "..") {
                return Err(bad(
                    &format!("files[{i}].src"),
                    format!("`{}` must be relative to the template directory", f.src),
                ));
            }
            if let Some(m) = &f.mode {
                parse_file_mode(m).map_err(|why| Error::BadTemplate {
                    file: file.to_path_buf(),
                    message: format!("files[{i}] (dest {}): {why}", f.dest),
                })?;
            }
        }
        let l = &self.limits;
        let range = |field: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(bad(
                    &format!("limits.{field}"),
                    format!("{v} is outside {lo}..={hi}"),
                ))
            } else {
                Ok(())
            }
        };
        range("vcpus", l.vcpus as u64, 1, 64)?;
        range("memory_mib", l.memory_mib, 16, 256 * 1024)?;
        range("pids", l.pids, 8, 1 << 22)?;
        range("disk_mib", l.disk_mib, 8, 1 << 20)?;
        range("timeout_s", l.timeout_s, 1, 24 * 3600)?;
        range("output_kib", l.output_kib, 1, 64 * 1024)?;
        let b = &self.build;
        let brange = |field: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(bad(
                    &format!("build.{field}"),
                    format!("{v} is outside {lo}..={hi}"),
                ))
            } else {
                Ok(())
            }
        };
        brange("memory_mib", b.memory_mib, 64, 64 * 1024)?;
        brange("pids", b.pids, 16, 1 << 16)?;
        brange("vcpus", b.vcpus as u64, 1, 64)?;
        brange("disk_mib", b.disk_mib, 16, 64 * 1024)?;
        brange("output_kib", b.output_kib, 1, 64 * 1024)?;
        if b.timeout_s > MAX_BUILD_TIMEOUT_S {
            return Err(bad(
                "build.timeout_s",
                format!(
                    "{} is over this server's maximum of {MAX_BUILD_TIMEOUT_S} s; split the step or make it faster",
                    b.timeout_s
                ),
            ));
        }
        brange("timeout_s", b.timeout_s, 1, MAX_BUILD_TIMEOUT_S)?;
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(bad("env", format!("`{k}` is not a valid variable name")));
            }
        }
        Ok(())
    }

    /// Resolves a `files[].src` against the template directory, following symlinks, and
    /// refuses one that ends up outside it (an uploaded template is a stranger's tree).
    fn file_source(dir: &Path, i: usize, f: &FileSpec) -> Result<PathBuf> {
        let bad = |why: String| Error::BadTemplate {
            file: dir.join(TEMPLATE_FILE),
            message: format!("field `files[{i}].src`: {why}"),
        };
        let root = dir
            .canonicalize()
            .map_err(|e| bad(format!("cannot resolve {}: {e}", dir.display())))?;
        let src = dir.join(&f.src).canonicalize().map_err(|e| {
            bad(format!(
                "source `{}` cannot be read in {}: {e}",
                f.src,
                dir.display()
            ))
        })?;
        if !src.starts_with(&root) {
            return Err(bad(format!(
                "source `{}` resolves outside the template directory",
                f.src
            )));
        }
        Ok(src)
    }
}

pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name: use 1-63 of a-z, 0-9 and '-', starting with a letter or digit"
        ))
    }
}

/// toml's messages span several lines (with a source excerpt); users get one line.
fn one_line(msg: &str) -> String {
    let mut parts = msg.lines().filter(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('|') && !t.chars().all(|c| c == '^' || c == ' ')
    });
    let head = parts.next().unwrap_or("").trim().to_string();
    let rest: Vec<String> = parts.map(|l| l.trim().to_string()).collect();
    if rest.is_empty() {
        head
    } else {
        format!("{head}: {}", rest.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
name = "shell"
base = { kind = "busybox" }
[handler]
command = ["/bin/sh", "/app/handler.sh"]
"#;

    fn parse(s: &str) -> Result<TemplateSpec> {
        TemplateSpec::parse(s, Path::new("/t/template.toml"))
    }

    #[test]
    fn minimal_template_gets_defaults() {
        let t = parse(MIN).unwrap();
        assert_eq!(t.limits, Limits::default());
        assert_eq!(t.handler.mode, HandlerModeSpec::Exec);
        assert!(t.files.is_empty());
    }

    #[test]
    fn missing_field_names_field_and_file() {
        let err = parse("name = \"x\"\nbase = { kind = \"busybox\" }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/t/template.toml"), "{err}");
        assert!(err.contains("handler"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn mistyped_field_is_named() {
        let err = parse(&MIN.replace("command", "comand"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("comand"), "{err}");
        let err = parse(&format!("{MIN}\n[limits]\nmemory_mib = \"lots\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory_mib"), "{err}");
    }

    #[test]
    fn out_of_range_limit_is_named() {
        let err = parse(&format!("{MIN}\n[limits]\npids = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.pids"), "{err}");
    }

    #[test]
    fn bad_names_and_paths() {
        assert!(parse(&MIN.replace("\"shell\"", "\"Shell!\"")).is_err());
        let with_file = format!("{MIN}\n[[files]]\nsrc = \"../etc/passwd\"\ndest = \"/x\"\n");
        let err = parse(&with_file).unwrap_err().to_string();
        assert!(err.contains("files[0].src"), "{err}");
        let rel_dest = format!("{MIN}\n[[files]]\nsrc = \"a\"\ndest = \"x\"\n");
        assert!(parse(&rel_dest)
            .unwrap_err()
            .to_string()
            .contains("files[0].dest"));
    }

    #[test]
    fn debian_base_with_packages() {
        let t = parse(&MIN.replace(
            "base = { kind = \"busybox\" }",
            "base = { kind = \"debian\", packages = [\"python3\", \"python3-numpy\"] }",
        ))
        .unwrap();
        assert_eq!(
            t.base,
            BaseSpec::Debian {
                suite: "bookworm".into(),
                packages: vec!["python3".into(), "python3-numpy".into()]
            }
        );
        let bad = MIN.replace(
            "base = { kind = \"busybox\" }",
            "base = { kind = \"debian\", packages = [\"a b\"] }",
        );
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("base.packages"));
    }

    #[test]
    fn file_modes_are_octal_permission_bits_only() {
        let with_mode = |i: usize, m: &str| {
            let mut t = MIN.to_string();
            for k in 0..=i {
                let mode = if k == i { m } else { "0644" };
                t.push_str(&format!(
                    "\n[[files]]\nsrc = \"a\"\ndest = \"/app/x{k}\"\nmode = \"{mode}\"\n"
                ));
            }
            parse(&t)
        };
        for ok in ["0755", "644", "0o600", "0"] {
            assert!(with_mode(0, ok).is_ok(), "{ok}");
        }
        let err = with_mode(2, "4755").unwrap_err().to_string();
        assert!(
            err.contains("files[2] (dest /app/x2): mode 4755 has the setuid bit; thaw refuses setuid, setgid and sticky modes"),
            "{err}"
        );
        assert!(with_mode(0, "2755")
            .unwrap_err()
            .to_string()
            .contains("setgid"));
        assert!(with_mode(0, "1777")
            .unwrap_err()
            .to_string()
            .contains("sticky"));
        for bad in ["0799", "rwx", "", "10000", "-755", "0x1ff", "77777777"] {
            let err = with_mode(0, bad).unwrap_err().to_string();
            assert!(err.contains("files[0] (dest /app/x0)"), "{bad}: {err}");
        }
    }

    #[test]
    fn build_limits_default_and_are_checked() {
        let t = parse(MIN).unwrap();
        assert_eq!(t.build, BuildLimits::default());
        assert_eq!(t.build.timeout_s, 600);
        let t = parse(&format!(
            "{MIN}\n[build]\ntimeout_s = 2\nmemory_mib = 256\n"
        ))
        .unwrap();
        assert_eq!((t.build.timeout_s, t.build.memory_mib), (2, 256));
        let err = parse(&format!("{MIN}\n[build]\ntimeout_s = 7200\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("build.timeout_s") && err.contains("3600"),
            "{err}"
        );
        let err = parse(&format!("{MIN}\n[build]\npids = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("build.pids"), "{err}");
        let err = parse(&format!("{MIN}\n[build]\nnetwork = true\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network"), "{err}");
    }

    #[test]
    fn file_sources_stay_inside_the_template_directory() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("tpl");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/ok"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("out")).unwrap();
        std::os::unix::fs::symlink("sub", dir.join("in")).unwrap();
        let f = |src: &str| FileSpec {
            src: src.into(),
            dest: "/x".into(),
            mode: None,
        };
        assert!(TemplateSpec::file_source(&dir, 0, &f("in/ok")).is_ok());
        let err = TemplateSpec::file_source(&dir, 3, &f("out/passwd"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("files[3].src") && err.contains("outside"),
            "{err}"
        );
        assert!(TemplateSpec::file_source(&dir, 0, &f("out")).is_err());
    }
}
