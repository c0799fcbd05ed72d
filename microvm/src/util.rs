//! Small helpers shared by the modules: log tails and running host tools with typed errors.

use std::path::Path;
use std::process::Output;

/// The first executable file called `name` in a directory on `PATH`, as `execvp` finds it.
pub fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Last `lines` lines of a (possibly large, possibly missing) text file, for error messages.
pub fn file_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 64 << 10;
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("({} not readable)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX && f.seek(SeekFrom::Start(len - MAX)).is_err() {
        return format!("({} not readable)", path.display());
    }
    let mut buf = Vec::new();
    // Bounded even while the guest keeps writing: the file may grow as it is read.
    if f.take(MAX).read_to_end(&mut buf).is_err() {
        return format!("({} not readable)", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let tail = all[start..].join("\n");
    if tail.trim().is_empty() {
        "(empty)".to_owned()
    } else {
        tail
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("`{tool}` is not installed (needed to {purpose}); run scripts/install-deps.sh")]
    Missing { tool: String, purpose: String },
    #[error("cannot run `{tool}`: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs a host tool to completion; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut std::process::Command, purpose: &str) -> Result<Output, ToolError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ToolError::Missing {
                tool: tool.clone(),
                purpose: purpose.to_owned(),
            }
        } else {
            ToolError::Spawn {
                tool: tool.clone(),
                source,
            }
        }
    })?;
    if !out.status.success() {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let mut start = stderr.len().saturating_sub(2000);
        while !stderr.is_char_boundary(start) {
            start += 1;
        }
        let stderr = &stderr[start..];
        return Err(ToolError::Failed {
            command: format!("{tool} {}", args.join(" ")),
            status: out.status,
            stderr: stderr.to_owned(),
        });
    }
    Ok(out)
}

/// Whether a process exists and is not a zombie (a process that is not our child may linger
/// as a zombie of its real parent until that parent reaps it).
pub fn process_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The command name may contain spaces and parentheses: the state follows the last ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}
