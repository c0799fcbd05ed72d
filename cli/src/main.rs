//! `thaw`: deploy templates, invoke them, exec in them, check the host.
//!
//! Exit codes: 0 success; 1 a thaw error (printed as one `error:` line naming the cause and
//! the fix) or an invocation whose status is `error`; 2 bad usage; for `exec`, the task's own
//! exit code (124 timeout, 137 OOM, 128+N killed by signal N); for `invoke`, 124 on timeout and
//! 137 on OOM.

mod progress;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use thaw_platform::engine::{parse_payload, RunOptions, MAX_PAYLOAD};
use thaw_platform::{Engine, Paths};
use thaw_protocol::{InvokeStatus, Stream};

#[derive(Parser)]
#[command(
    name = "thaw",
    version,
    about = "Instant, isolated sandboxes for agent tasks"
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build and publish a template directory (containing template.toml).
    Deploy { dir: PathBuf },
    /// Run a template's handler on a JSON payload.
    Invoke {
        template: String,
        /// The JSON payload, or `-` to read it from stdin. Default: null.
        #[arg(long, short)]
        payload: Option<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run a command in a fresh sandbox of a template, streaming its output.
    Exec {
        template: String,
        /// Feed this process's stdin to the command.
        #[arg(long, short = 'i')]
        stdin: bool,
        #[command(flatten)]
        run: RunArgs,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// List or remove published templates.
    Templates {
        #[command(subcommand)]
        cmd: TemplatesCmd,
    },
    /// Check system dependencies and the isolation tier thaw would use.
    Doctor,
    /// Measure cold start, restore, invoke latency, throughput, memory and snapshot size.
    Bench {
        /// A deployed template (deploy templates/python first).
        #[arg(long, default_value = "python")]
        template: String,
        /// Repetitions of each latency figure.
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Idle clones kept alive together for the memory figure.
        #[arg(long, default_value_t = 20)]
        clones: usize,
        /// Also measure a restore after dropping the page cache (root; affects the host).
        #[arg(long)]
        cold_cache: bool,
        /// Payload of the trivial invocation.
        #[arg(long, default_value = "{\"op\": \"info\"}")]
        payload: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Extra environment for this call (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Wall-clock limit in seconds (default: the template's limits.timeout_s).
    #[arg(long)]
    timeout: Option<f64>,
}

#[derive(Subcommand)]
enum TemplatesCmd {
    Ls,
    Rm { name: String },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}` has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

impl RunArgs {
    fn options(&self) -> Result<RunOptions> {
        let timeout = match self.timeout {
            Some(t) if !(t > 0.0 && t.is_finite()) => {
                anyhow::bail!("--timeout must be a positive number of seconds")
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        Ok(RunOptions {
            env: self.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            timeout,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THAW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain joined, so the cause and the fix are both visible.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    if let Cmd::Doctor = cli.cmd {
        return Ok(doctor(cli.json));
    }
    let engine = Engine::open(Paths::from_env()).await?;
    match cli.cmd {
        Cmd::Doctor => unreachable!("handled above"),
        Cmd::Bench {
            template,
            iterations,
            clones,
            cold_cache,
            payload,
        } => {
            let cfg = thaw_platform::bench::BenchConfig {
                template,
                iterations,
                payload: parse_payload(payload.as_bytes())?,
                idle_clones: clones,
                drop_caches: cold_cache,
            };
            let log = |m: &str| eprintln!("bench: {m}");
            let report = thaw_platform::bench::run(std::sync::Arc::new(engine), &cfg, &log).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                print_json(&report)?;
                println!();
                print!("{}", thaw_platform::bench::table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Deploy { dir } => {
            let spinner = progress::Spinner::new(!cli.json && std::io::stderr().is_terminal());
            let r = engine.deploy(&dir, &spinner).await;
            spinner.finish();
            let t = r?;
            if cli.json {
                print_json(&t)?;
            } else {
                println!(
                    "published template `{}` in {:.1} s (warm-up {} ms)",
                    t.name,
                    t.publish_ms as f64 / 1000.0,
                    t.warm_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Invoke {
            template,
            payload,
            run,
        } => {
            let payload = read_payload(payload.as_deref())?;
            let json = cli.json;
            let inv = engine
                .invoke(&template, payload, run.options()?, |chunk| {
                    if !json {
                        let _ = std::io::stderr().write_all(chunk);
                    }
                })
                .await?;
            if json {
                print_json(&inv)?;
            } else {
                match inv.done.status {
                    InvokeStatus::Ok => {
                        let r = inv.done.result.clone().unwrap_or(serde_json::Value::Null);
                        println!("{}", serde_json::to_string_pretty(&r)?);
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
                if inv.done.truncated && inv.done.status == InvokeStatus::Ok {
                    eprintln!("warning: output truncated at the template's output limit");
                }
            }
            Ok(match inv.done.status {
                InvokeStatus::Ok => ExitCode::SUCCESS,
                InvokeStatus::Error => ExitCode::from(1),
                InvokeStatus::Timeout => ExitCode::from(124),
                InvokeStatus::Oom => ExitCode::from(137),
            })
        }
        Cmd::Exec {
            template,
            stdin,
            run,
            argv,
        } => {
            let input = if stdin {
                let mut buf = Vec::new();
                std::io::stdin()
                    .take(MAX_PAYLOAD + 1)
                    .read_to_end(&mut buf)
                    .context("reading stdin")?;
                anyhow::ensure!(
                    buf.len() as u64 <= MAX_PAYLOAD,
                    "stdin is larger than the {MAX_PAYLOAD}-byte limit"
                );
                Some(buf)
            } else {
                None
            };
            let json = cli.json;
            let mut captured: Vec<(Stream, Vec<u8>)> = Vec::new();
            let r = engine
                .exec(&template, argv, input, run.options()?, |stream, data| {
                    if json {
                        captured.push((stream, data.to_vec()));
                        return;
                    }
                    let _ = match stream {
                        Stream::Stdout => {
                            let mut o = std::io::stdout();
                            o.write_all(data).and_then(|_| o.flush())
                        }
                        Stream::Stderr => std::io::stderr().write_all(data),
                    };
                })
                .await?;
            if json {
                let join = |s: Stream| {
                    String::from_utf8_lossy(
                        &captured
                            .iter()
                            .filter(|(st, _)| *st == s)
                            .flat_map(|(_, d)| d.iter().copied())
                            .collect::<Vec<u8>>(),
                    )
                    .to_string()
                };
                let mut v = serde_json::to_value(&r)?;
                v["stdout"] = join(Stream::Stdout).into();
                v["stderr"] = join(Stream::Stderr).into();
                print_json(&v)?;
            } else {
                if r.truncated {
                    eprintln!("thaw: output truncated at the template's output limit");
                }
                match r.outcome {
                    thaw_protocol::Outcome::Timeout => {
                        eprintln!("thaw: timed out; the task's process tree was killed")
                    }
                    thaw_protocol::Outcome::Oom => eprintln!(
                        "thaw: killed: out of memory (limit: the template's limits.memory_mib)"
                    ),
                    _ => {}
                }
            }
            Ok(ExitCode::from(r.exit_code.clamp(0, 255) as u8))
        }
        Cmd::Templates { cmd } => match cmd {
            TemplatesCmd::Ls => {
                let ts = engine.templates()?;
                if cli.json {
                    print_json(&ts)?;
                } else if ts.is_empty() {
                    println!("no templates (publish one with `thaw deploy <dir>`)");
                } else {
                    println!(
                        "{:<20} {:<14} {:>10} {:>10}  SOURCE",
                        "NAME", "STATE", "WARM_MS", "MEM_MIB"
                    );
                    for t in ts {
                        println!(
                            "{:<20} {:<14} {:>10} {:>10}  {}",
                            t.name,
                            t.state.as_str(),
                            t.warm_ms,
                            t.spec.limits.memory_mib,
                            t.source_dir.display()
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            TemplatesCmd::Rm { name } => {
                let t = engine.remove_template(&name)?;
                if cli.json {
                    print_json(&serde_json::json!({"removed": t.name}))?;
                } else {
                    println!("removed template `{}`", t.name);
                }
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

fn describe_failure(d: &thaw_platform::agent::InvokeDone) -> String {
    let mut parts = Vec::new();
    if let Some(o) = &d.outcome {
        parts.push(match o {
            thaw_protocol::Outcome::Exited { code } => format!("handler exited with code {code}"),
            thaw_protocol::Outcome::Signaled { signal } => {
                format!("handler killed by signal {signal}")
            }
            thaw_protocol::Outcome::Timeout => {
                "over its time limit; its process tree was killed".into()
            }
            thaw_protocol::Outcome::Oom => {
                "out of memory (limit: the template's limits.memory_mib)".into()
            }
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

fn read_payload(arg: Option<&str>) -> Result<serde_json::Value> {
    let bytes = match arg {
        None => return Ok(serde_json::Value::Null),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .take(MAX_PAYLOAD + 1)
                .read_to_end(&mut buf)
                .context("reading the payload from stdin")?;
            buf
        }
        Some(s) => s.as_bytes().to_vec(),
    };
    Ok(parse_payload(&bytes)?)
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn doctor(json: bool) -> ExitCode {
    let report = thaw_platform::doctor::run();
    if json {
        let _ = print_json(&report);
    } else {
        for c in &report.checks {
            let mark = if c.ok {
                "ok  "
            } else if c.required {
                "FAIL"
            } else {
                "warn"
            };
            println!("[{mark}] {:<16} {}", c.name, c.detail);
            if !c.ok && !c.fix.is_empty() {
                println!("       fix: {}", c.fix);
            }
        }
        println!("isolation tier: {} ({})", report.tier, report.tier_reason);
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
