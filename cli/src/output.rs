//! How results are shown. One place, so the embedded engine and a server print the same.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use thaw_platform::agent::InvokeDone;
use thaw_platform::engine::{ExecResult, Invocation};
use thaw_platform::session::Session;
use thaw_protocol::{InvokeStatus, Outcome, Stream};

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Output of an exec: streamed to the terminal as it comes, or captured for `--json`.
pub struct ExecOutput {
    json: bool,
    captured: Vec<(Stream, Vec<u8>)>,
}

impl ExecOutput {
    pub fn new(json: bool) -> ExecOutput {
        ExecOutput {
            json,
            captured: Vec::new(),
        }
    }

    pub fn chunk(&mut self, stream: Stream, data: &[u8]) {
        if self.json {
            self.captured.push((stream, data.to_vec()));
            return;
        }
        let _ = match stream {
            Stream::Stdout => {
                let mut o = std::io::stdout();
                o.write_all(data).and_then(|_| o.flush())
            }
            Stream::Stderr => std::io::stderr().write_all(data),
        };
    }

    /// Prints the end of an exec and returns the task's exit code as ours.
    pub fn finish(self, r: &ExecResult) -> Result<ExitCode> {
        if self.json {
            let join = |s: Stream| {
                let bytes: Vec<u8> = self
                    .captured
                    .iter()
                    .filter(|(st, _)| *st == s)
                    .flat_map(|(_, d)| d.iter().copied())
                    .collect();
                String::from_utf8_lossy(&bytes).to_string()
            };
            let mut v = serde_json::to_value(r)?;
            v["stdout"] = join(Stream::Stdout).into();
            v["stderr"] = join(Stream::Stderr).into();
            print_json(&v)?;
        } else {
            if r.truncated {
                eprintln!("thaw: output truncated at the template's output limit");
            }
            match r.outcome {
                Outcome::Timeout => {
                    eprintln!("thaw: timed out; the task's process tree was killed")
                }
                Outcome::Oom => eprintln!(
                    "thaw: killed: out of memory (limit: the template's limits.memory_mib)"
                ),
                _ => {}
            }
        }
        Ok(ExitCode::from(r.exit_code.clamp(0, 255) as u8))
    }
}

/// Prints an invocation's result and returns the exit code its status maps to.
pub fn invocation(inv: &Invocation, json: bool) -> Result<ExitCode> {
    if json {
        print_json(inv)?;
    } else {
        match inv.done.status {
            InvokeStatus::Ok => {
                let r = inv.done.result.clone().unwrap_or(serde_json::Value::Null);
                println!("{}", serde_json::to_string_pretty(&r)?);
                if inv.done.truncated {
                    eprintln!("warning: output truncated at the template's output limit");
                }
            }
            status => {
                eprintln!(
                    "invocation {}: {}{}",
                    status.as_str(),
                    describe_failure(&inv.done),
                    if inv.done.truncated {
                        " (output truncated)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(match inv.done.status {
        InvokeStatus::Ok => ExitCode::SUCCESS,
        InvokeStatus::Error => ExitCode::from(1),
        InvokeStatus::Timeout => ExitCode::from(124),
        InvokeStatus::Oom => ExitCode::from(137),
    })
}

fn describe_failure(d: &InvokeDone) -> String {
    let mut parts = Vec::new();
    if let Some(o) = &d.outcome {
        parts.push(match o {
            Outcome::Exited { code } => format!("handler exited with code {code}"),
            Outcome::Signaled { signal } => format!("handler killed by signal {signal}"),
            Outcome::Timeout => "over its time limit; its process tree was killed".into(),
            Outcome::Oom => "out of memory (limit: the template's limits.memory_mib)".into(),
        });
    }
    if let Some(raw) = &d.raw_output {
        let raw: String = raw.chars().take(200).collect();
        parts.push(format!("output is not JSON: {raw:?}"));
    }
    if !d.stderr_tail.trim().is_empty() {
        parts.push(format!("stderr: {}", d.stderr_tail.trim()));
    }
    parts.join("; ")
}

pub fn session_line(s: &Session) -> String {
    format!(
        "{:<22} {:<10} {:<14} {:>8} {:>10}  {}",
        s.id,
        s.state.as_str(),
        s.template,
        s.idle_timeout_s,
        s.pauses,
        s.error.as_deref().unwrap_or("")
    )
}

pub fn sessions(list: &[Session], json: bool) -> Result<()> {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no sessions (start one with `thaw session new <template>`)");
        return Ok(());
    }
    println!(
        "{:<22} {:<10} {:<14} {:>8} {:>10}  NOTE",
        "ID", "STATE", "TEMPLATE", "IDLE_S", "PAUSES"
    );
    for s in list {
        println!("{}", session_line(s));
    }
    Ok(())
}

/// One session after a state change: `--json` prints it whole, text says what happened.
pub fn session(s: &Session, json: bool, what: &str) -> Result<()> {
    if json {
        return print_json(s);
    }
    match what {
        "created" => println!("{}", s.id),
        "paused" => println!(
            "paused {} in {} ms ({} new bytes stored)",
            s.id,
            s.last_pause_ms.unwrap_or(0),
            s.snapshot_size.map(|z| z.stored_bytes).unwrap_or(0)
        ),
        "resumed" => println!("resumed {} in {} ms", s.id, s.last_resume_ms.unwrap_or(0)),
        _ => println!("{what} {}", s.id),
    }
    Ok(())
}
