//! Finds the test binaries to run: cargo builds them (`--no-run`) and names them in its JSON
//! messages, so the paths are exactly what `cargo test` would run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// One test binary, and the directory cargo would run it from (its package's root).
#[derive(Debug, Clone)]
pub struct TestBinary {
    /// `<package>/<test target>`, e.g. `thaw-e2e/microvm`.
    pub name: String,
    pub path: PathBuf,
    pub cwd: PathBuf,
}

/// Builds the `--test` targets `tests` of package `package` and returns their binaries.
pub fn build_tests(workspace: &Path, package: &str, tests: &[&str]) -> Result<Vec<TestBinary>> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace).args([
        "test",
        "--locked",
        "--no-run",
        "--message-format=json",
        "-p",
        package,
    ]);
    for t in tests {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run -p {package} failed (its output is above)");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(target), Some(manifest)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        if !tests.contains(&target) {
            continue;
        }
        found.push(TestBinary {
            name: format!("{package}/{target}"),
            path: PathBuf::from(exe),
            cwd: Path::new(manifest)
                .parent()
                .unwrap_or(workspace)
                .to_path_buf(),
        });
    }
    if found.len() != tests.len() {
        bail!(
            "cargo built {} of the {} test binaries asked of {package} ({tests:?})",
            found.len(),
            tests.len()
        );
    }
    Ok(found)
}

/// The `#[ignore]`d tests of `b` (those the nested run exists for), by asking the binary
/// itself (`--list` runs nothing), narrowed to those containing `filter`.
pub fn ignored_tests(b: &TestBinary, filter: Option<&str>) -> Result<Vec<String>> {
    let mut cmd = Command::new(&b.path);
    cmd.current_dir(&b.cwd)
        .args(["--ignored", "--list", "--format", "terse"]);
    cmd.args(filter);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("listing the tests of {}", b.path.display()))?;
    if !out.status.success() {
        bail!("{} --list failed ({})", b.path.display(), out.status);
    }
    Ok(parse_list(&String::from_utf8_lossy(&out.stdout)))
}

/// `name: test` lines (benchmarks and the summary are not tests).
fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_terse_list_names_its_tests_only() {
        let text = "real_a: test\nreal_b: test\nbench_c: benchmark\n";
        assert_eq!(super::parse_list(text), ["real_a", "real_b"]);
    }
}
