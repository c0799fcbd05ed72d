//! `thaw`: deploy templates, invoke them, exec in them, check the host.
//!
//! Exit codes: 0 success; 1 a thaw error (printed as one `error:` line naming the cause and
//! the fix) or an invocation whose status is `error`; 2 bad usage; for `exec`, the task's own
//! exit code (124 timeout, 137 OOM, 128+N killed by signal N); for `invoke`, 124 on timeout and
//! 137 on OOM.

mod audit;
mod backend;
mod output;
mod progress;
mod ps;
mod rollouts_bench;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use backend::Backend;
use clap::{Parser, Subcommand};
use output::print_json;
use thaw_platform::engine::{parse_payload, RunOptions, MAX_PAYLOAD};
use thaw_platform::session::{SessionOptions, TimeoutAction};
use thaw_platform::{Engine, Paths};
use tokio::signal::unix::SignalKind;
use tracing::info;

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
    /// Run against a `thaw serve` at this URL instead of the embedded engine.
    #[arg(long, global = true, env = "THAW_SERVER", value_name = "URL")]
    server: Option<String>,
    /// API key for --server (create one with `thaw keys create` on the server's machine).
    #[arg(long, global = true, env = "THAW_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
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
    /// Long-lived sandboxes: exec and invoke many times, pause, resume.
    Session {
        #[command(subcommand)]
        cmd: SessionCmd,
    },
    /// Serve the HTTP API (bearer API keys; loopback only by default).
    Serve {
        /// Address to listen on. Anything but loopback exposes thaw to the network.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Largest JSON request body, in bytes.
        #[arg(long, default_value_t = thaw_server::ServerConfig::default().max_body_bytes)]
        max_body_bytes: usize,
        /// Largest template upload (a tar), in bytes.
        #[arg(long, default_value_t = thaw_server::ServerConfig::default().max_upload_bytes)]
        max_upload_bytes: u64,
        /// Sandboxes kept prepared (directory, disk, overlay root, cgroups) per template
        /// snapshot in use, so a restore does not wait for them. 0 turns this off.
        #[arg(long, default_value_t = thaw_server::ServerConfig::default().prepared)]
        prepared: usize,
        /// Sandboxes of rollout sessions (`checkpointable: false`) kept restored ahead per
        /// origin in use, so that a reset hands one over instead of restoring. 0 turns
        /// this off.
        #[arg(long, default_value_t = thaw_server::ServerConfig::default().spares)]
        spares: usize,
        /// Seconds a connection may take to send a whole request head (new or idle
        /// keep-alive connections); slower ones are closed.
        #[arg(long, value_name = "SECS", default_value_t = thaw_server::ServerConfig::default().header_read_timeout.as_secs_f64(), value_parser = parse_secs)]
        header_read_timeout: f64,
        /// Open connections at most; over it, the oldest idle one is closed.
        #[arg(long, default_value_t = thaw_server::ServerConfig::default().max_connections as u64, value_parser = clap::value_parser!(u64).range(1..))]
        max_connections: u64,
        /// Largest `timeout_ms` a call may ask for, in seconds (a template's
        /// limits.timeout_s caps it too).
        #[arg(long, value_name = "SECS", default_value_t = thaw_server::ServerConfig::default().max_call_timeout.as_secs_f64(), value_parser = parse_secs)]
        max_call_timeout: f64,
        /// Largest session idle timeout a caller may ask for, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = thaw_server::ServerConfig::default().max_session_idle.as_secs_f64(), value_parser = parse_secs)]
        max_session_idle: f64,
        /// Largest session lifetime a caller may ask for, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = thaw_server::ServerConfig::default().max_session_lifetime.as_secs_f64(), value_parser = parse_secs)]
        max_session_lifetime: f64,
    },
    /// List live sandboxes with what each uses now: CPU, memory, processes, disk, network,
    /// the running task. Locally this process's engine sees sessions' sandboxes (every key's,
    /// from the machine's store) but not invocations or execs run by other thaw processes
    /// (a `thaw serve`): use --server with an admin key for everything a server runs.
    Ps,
    /// End a live sandbox now, whatever it does (a fork bomb, a task ignoring SIGTERM). ID is
    /// a sandbox id or a session id; a killed session, paused or not, ends for good. Locally
    /// this reaches sessions and this process's own calls only: use --server to end what a
    /// `thaw serve` runs.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["id", "all"])))]
    Kill {
        id: Option<String>,
        /// Every live sandbox you may see (an admin key: every key's; paused sessions are
        /// left alone).
        #[arg(long)]
        all: bool,
        /// With --all and an admin key: only this key's sandboxes.
        #[arg(long, requires = "all")]
        key: Option<String>,
    },
    /// The audit log: who did what, to which sandbox, when (`ls`), and its hash chain
    /// checked (`verify`).
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
    },
    /// Manage the API keys `thaw serve` accepts (on the server's machine).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Check system dependencies and the isolation tier thaw would use.
    Doctor,
    /// Print the HTTP API's OpenAPI document (what `thaw serve` answers at /openapi.json),
    /// e.g. to generate a client. Needs no server and no engine.
    Openapi,
    /// Measure cold start, restore, invoke latency, throughput, memory and snapshot size
    /// (`thaw bench rollouts`: RL rollout throughput, reset, fork and session capacity).
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        kind: Option<BenchKind>,
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
        /// Sandboxes kept prepared per snapshot, as `thaw serve --prepared` (0: measure
        /// restores that prepare their sandbox themselves).
        #[arg(long, default_value_t = thaw_server::ServerConfig::default().prepared)]
        prepared: usize,
        /// Highest concurrency of the throughput figures (1, 4 and 16 up to it).
        #[arg(long, default_value_t = 16)]
        max_concurrency: usize,
    },
}

#[derive(Subcommand)]
enum BenchKind {
    /// Three-step RL rollouts through `thaw serve`'s API (in this process, on loopback):
    /// rollouts per second, reset, fork of 1 into 16, idle session memory, capacity.
    Rollouts {
        /// The template directory to deploy (it must declare a `[reward]` command).
        #[arg(long, default_value = "templates/python")]
        template_dir: PathBuf,
        /// Concurrent sessions (repeatable).
        #[arg(long = "concurrency", default_values_t = [16usize, 64])]
        concurrency: Vec<usize>,
        /// Rollouts per session at each concurrency.
        #[arg(long, default_value_t = 4)]
        rollouts: usize,
        /// Sessions per fork.
        #[arg(long, default_value_t = 16)]
        fork: usize,
        #[arg(long, default_value_t = 5)]
        fork_repeats: usize,
        /// Stop the capacity probe at this many live sessions.
        #[arg(long, default_value_t = 512)]
        max_sessions: usize,
        /// Make the rollout sessions checkpointable (private memory: slower, larger).
        #[arg(long)]
        checkpointable: bool,
        #[arg(long, default_value_t = thaw_server::ServerConfig::default().prepared)]
        prepared: usize,
    },
    /// The egress gateway's cost: a 1 KiB HTTPS request through the proxy against the same
    /// request direct, and wiring a sandbox's network namespace. In namespaces it makes; no
    /// packet leaves this machine.
    Egress {
        /// HTTPS requests each way.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Fresh namespaces wired.
        #[arg(long, default_value_t = 30)]
        wires: usize,
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
    #[command(flatten)]
    network: NetworkArgs,
}

/// An egress grant on top of the template's `[network]` (templates/README.md).
#[derive(clap::Args, Clone, Default)]
struct NetworkArgs {
    /// Let the sandbox reach a domain (`example.com`, `*.example.com`), IP or CIDR, with an
    /// optional `:PORT` or `:FIRST-LAST` (repeatable).
    #[arg(long = "allow-out", value_name = "DEST")]
    allow_out: Vec<String>,
    /// Keep an IP or CIDR out even when a broader --allow-out covers it (repeatable).
    #[arg(long = "deny-out", value_name = "CIDR")]
    deny_out: Vec<String>,
    /// A credential the sandbox never holds: NAME@HOST[,HOST…] takes the value of this
    /// shell's environment variable NAME (never the command line); the sandbox sees a
    /// placeholder in NAME, which the egress proxy replaces in HTTPS requests to the hosts.
    #[arg(long = "secret", value_name = "NAME@HOSTS")]
    secret: Vec<String>,
}

impl NetworkArgs {
    fn secrets(&self) -> Result<Vec<thaw_types::SecretGrant>> {
        self.secret
            .iter()
            .map(|s| {
                let (name, hosts) = s
                    .split_once('@')
                    .ok_or_else(|| anyhow::anyhow!("--secret {s:?}: expected NAME@HOST[,HOST...]"))?;
                let value = std::env::var(name).map_err(|_| {
                    anyhow::anyhow!("--secret {name}: set the environment variable {name} to the secret's value")
                })?;
                Ok(thaw_types::SecretGrant {
                    name: name.to_string(),
                    value,
                    hosts: hosts.split(',').map(str::to_string).collect(),
                })
            })
            .collect()
    }

    fn grant(&self) -> thaw_types::NetworkGrant {
        thaw_types::NetworkGrant {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
        }
    }
}

#[derive(Subcommand)]
enum TemplatesCmd {
    Ls,
    Rm { name: String },
}

#[derive(Subcommand)]
enum SessionCmd {
    /// Start a session from a template; prints its id.
    New {
        template: String,
        /// Seconds without a call after which the session is paused (or stopped).
        #[arg(long, default_value_t = 600)]
        idle_timeout: u64,
        /// Seconds after which the session is paused (or stopped) whatever its activity.
        #[arg(long, default_value_t = 86400)]
        max_lifetime: u64,
        /// What a timeout does: `pause` keeps everything, `stop` discards it.
        #[arg(long, value_enum, default_value_t = OnTimeout::Pause)]
        on_timeout: OnTimeout,
        /// Environment for every call in the session (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        #[command(flatten)]
        network: NetworkArgs,
    },
    /// Run a command in a session, streaming its output.
    Exec {
        id: String,
        #[arg(long, short = 'i')]
        stdin: bool,
        #[command(flatten)]
        run: RunArgs,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Run the template's handler in a session (a persistent handler keeps its memory).
    Invoke {
        id: String,
        #[arg(long, short)]
        payload: Option<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Copy a local file (or `-` for stdin) into a session.
    Put {
        id: String,
        local: String,
        /// Absolute path inside the session.
        remote: String,
        /// Octal file mode, e.g. 755.
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
    },
    /// Copy a file out of a session (to stdout, or to a local path).
    Get {
        id: String,
        remote: String,
        local: Option<PathBuf>,
    },
    /// Checkpoint a session and free its memory and processes.
    Pause { id: String },
    /// Bring a paused session back, with everything it had.
    Resume { id: String },
    /// Change the idle timeout or push back the end of life.
    Extend {
        id: String,
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// New remaining lifetime, in seconds from now.
        #[arg(long)]
        max_lifetime: Option<u64>,
    },
    /// List your sessions.
    Ls,
    /// Show one session.
    Show { id: String },
    /// End a session, in any state: sandbox, snapshot and record go.
    Rm { id: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnTimeout {
    Pause,
    Stop,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// Sandboxes the key may hold at once (invocations in flight plus live sessions).
        #[arg(long, default_value_t = 16)]
        max_sandboxes: u32,
        /// An operator's key: sees and may end every key's sandboxes and audit records.
        #[arg(long)]
        admin: bool,
    },
    Ls,
    Revoke {
        id: String,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("`{s}` is not an octal file mode such as 644"))
}

/// A positive, finite number of seconds (a duration flag).
fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e12 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
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
            cancel: None,
            network: self.network.grant(),
            secrets: self.network.secrets()?,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `THAW_LOG_SPANS=1` also prints each span as it closes, with its busy and idle time:
    // where a slow restore or call spent its milliseconds.
    let spans = if std::env::var_os("THAW_LOG_SPANS").is_some_and(|v| v == "1") {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THAW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_span_events(spans)
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
            eprintln!("error: {}", one_line(&e));
            // A timeout the host had to enforce itself is still a timeout to a script.
            match e.downcast_ref::<thaw_platform::Error>() {
                Some(thaw_platform::Error::HostTimeout { .. }) => ExitCode::from(124),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// One line: the error chain joined, so the cause and the fix are both visible. Most of our
/// errors already quote their cause in their own message; a cause already said is skipped.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg.replace('\n', " ")
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let json = cli.json;
    if let Cmd::Doctor = cli.cmd {
        return Ok(doctor(json));
    }
    if let Cmd::Openapi = cli.cmd {
        let doc = thaw_server::openapi()
            .to_pretty_json()
            .context("encoding the OpenAPI document")?;
        println!("{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    let local_only = match &cli.cmd {
        Cmd::Bench { .. } => Some("bench"),
        Cmd::Serve { .. } => Some("serve"),
        Cmd::Keys { .. } => Some("keys"),
        _ => None,
    };
    let backend = match (&cli.server, local_only) {
        (Some(url), Some(cmd)) => anyhow::bail!(
            "`thaw {cmd}` works on the local machine only; unset --server/THAW_SERVER (was {url})"
        ),
        (Some(url), None) => Backend::Remote(thaw_api::Client::new(url, cli.api_key.clone())?),
        (None, _) => Backend::Local(Engine::open(Paths::from_env()).await?),
    };
    // Sandboxes are discarded after their answer is printed, and a server or a benchmark
    // keeps some prepared: this process tears them down before it exits.
    let local = match &backend {
        Backend::Local(e) => Some(e.clone()),
        Backend::Remote(_) => None,
    };
    let r = run_cmd(cli.cmd, backend, json).await;
    if let Some(engine) = local {
        engine.close().await;
    }
    r
}

async fn run_cmd(cmd: Cmd, backend: Backend, json: bool) -> Result<ExitCode> {
    match cmd {
        Cmd::Doctor | Cmd::Openapi => unreachable!("handled above"),
        Cmd::Bench {
            kind: Some(BenchKind::Egress { requests, wires }),
            ..
        } => {
            anyhow::ensure!(
                requests >= 1 && wires >= 1,
                "--requests and --wires must be at least 1"
            );
            let r = thaw_gateway::bench::run(requests, wires).await?;
            if json {
                print_json(&r)?;
            } else {
                let line = |what: &str, d: &thaw_gateway::bench::Dist| {
                    println!(
                        "{what:<34} p50 {:>7.2} ms   p99 {:>7.2} ms   min {:>6.2} ms   (n={})",
                        d.p50_ms, d.p99_ms, d.min_ms, d.n
                    )
                };
                line("HTTPS 1 KiB, direct", &r.https_direct);
                line("HTTPS 1 KiB, through the proxy", &r.https_via_proxy);
                println!(
                    "{:<34} {:>7.2} ms (p50)",
                    "added by the proxy", r.proxy_added_p50_ms
                );
                line("wiring a sandbox's namespace", &r.wire);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            kind:
                Some(BenchKind::Rollouts {
                    template_dir,
                    concurrency,
                    rollouts,
                    fork,
                    fork_repeats,
                    max_sessions,
                    checkpointable,
                    prepared,
                }),
            ..
        } => {
            let Backend::Local(engine) = backend else {
                unreachable!("local only")
            };
            let cfg = rollouts_bench::Config {
                template_dir,
                concurrency,
                rollouts_per_worker: rollouts,
                fork_n: fork,
                fork_repeats,
                max_sessions,
                checkpointable,
                prepared,
            };
            let log = |m: &str| eprintln!("bench: {m}");
            let report = rollouts_bench::run(engine, &cfg, &log).await?;
            print_json(&report)?;
            if !json {
                println!();
                print!("{}", rollouts_bench::table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            kind: None,
            template,
            iterations,
            clones,
            cold_cache,
            payload,
            prepared,
            max_concurrency,
        } => {
            let Backend::Local(engine) = backend else {
                unreachable!("local only")
            };
            let cfg = thaw_platform::bench::BenchConfig {
                template,
                iterations,
                payload: parse_payload(payload.as_bytes())?,
                idle_clones: clones,
                drop_caches: cold_cache,
                prepared,
                max_concurrency,
            };
            let log = |m: &str| eprintln!("bench: {m}");
            let report = thaw_platform::bench::run(std::sync::Arc::new(engine), &cfg, &log).await?;
            print_json(&report)?;
            if !json {
                println!();
                print!("{}", thaw_platform::bench::table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            listen,
            max_body_bytes,
            max_upload_bytes,
            prepared,
            spares,
            header_read_timeout,
            max_connections,
            max_call_timeout,
            max_session_idle,
            max_session_lifetime,
        } => {
            let Backend::Local(engine) = backend else {
                unreachable!("local only")
            };
            let cfg = thaw_server::ServerConfig {
                listen,
                max_body_bytes,
                max_upload_bytes,
                prepared,
                spares,
                header_read_timeout: Duration::from_secs_f64(header_read_timeout),
                max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
                max_call_timeout: Duration::from_secs_f64(max_call_timeout),
                max_session_idle: Duration::from_secs_f64(max_session_idle),
                max_session_lifetime: Duration::from_secs_f64(max_session_lifetime),
                ..thaw_server::ServerConfig::default()
            };
            if !listen.ip().is_loopback() {
                eprintln!("thaw: warning: listening on {listen}, reachable from the network; every route but /healthz needs an API key");
            }
            // SIGTERM (service managers, `kill`) shuts down exactly as SIGINT does: in-flight
            // calls finish, prepared sandboxes are torn down.
            let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
            let shutdown = async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
                    _ = sigterm.recv() => info!("SIGTERM: shutting down"),
                }
            };
            thaw_server::serve(engine, cfg, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keys { cmd } => {
            let Backend::Local(engine) = backend else {
                unreachable!("local only")
            };
            keys(&engine, cmd, json)
        }
        Cmd::Deploy { dir } => {
            let spinner = progress::Spinner::new(!json && std::io::stderr().is_terminal());
            let r = backend.deploy(&dir, &spinner).await;
            spinner.finish();
            let t = r?;
            if json {
                print_json(&t)?;
            } else {
                println!(
                    "published template `{}` on the {} tier in {:.1} s (warm-up {} ms)",
                    t.name,
                    t.tier.as_str(),
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
            let inv = backend
                .invoke(&template, payload, run.options()?, stderr_unless(json))
                .await?;
            output::invocation(&inv, json)
        }
        Cmd::Exec {
            template,
            stdin,
            run,
            argv,
        } => {
            let input = read_stdin_if(stdin)?;
            let mut out = output::ExecOutput::new(json);
            let r = backend
                .exec(&template, argv, input, run.options()?, |s, d| {
                    out.chunk(s, d)
                })
                .await?;
            out.finish(&r)
        }
        Cmd::Templates { cmd } => match cmd {
            TemplatesCmd::Ls => {
                let ts = backend.templates().await?;
                if json {
                    print_json(&ts)?;
                } else if ts.is_empty() {
                    println!("no templates (publish one with `thaw deploy <dir>`)");
                } else {
                    println!(
                        "{:<20} {:<14} {:<9} {:>10} {:>10}  SOURCE",
                        "NAME", "STATE", "TIER", "WARM_MS", "MEM_MIB"
                    );
                    for t in ts {
                        println!(
                            "{:<20} {:<14} {:<9} {:>10} {:>10}  {}",
                            t.name,
                            t.state.as_str(),
                            t.tier.as_str(),
                            t.warm_ms,
                            t.spec.limits.memory_mib,
                            t.source_dir.display()
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            TemplatesCmd::Rm { name } => {
                let t = backend.remove_template(&name).await?;
                if json {
                    print_json(&serde_json::json!({"removed": t.name}))?;
                } else {
                    println!("removed template `{}`", t.name);
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        Cmd::Session { cmd } => {
            backend.enforce_timeouts().await?;
            session(&backend, cmd, json).await
        }
        Cmd::Ps => {
            ps::print_ps(&backend.ps().await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kill { id, all, key } => {
            let killed = match (id, all) {
                (Some(id), false) => vec![backend.kill(&id).await?],
                (None, true) => backend.kill_all(key.as_deref()).await?,
                _ => anyhow::bail!("give a sandbox or session ID, or --all"),
            };
            ps::print_killed(&killed, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Audit { cmd } => audit::run(&backend, cmd, json).await,
    }
}

async fn session(backend: &Backend, cmd: SessionCmd, json: bool) -> Result<ExitCode> {
    match cmd {
        SessionCmd::New {
            template,
            idle_timeout,
            max_lifetime,
            on_timeout,
            env,
            network,
        } => {
            anyhow::ensure!(
                idle_timeout > 0 && max_lifetime > 0,
                "--idle-timeout and --max-lifetime must be at least 1 second"
            );
            let opts = SessionOptions {
                idle_timeout: Duration::from_secs(idle_timeout),
                max_lifetime: Duration::from_secs(max_lifetime),
                on_timeout: match on_timeout {
                    OnTimeout::Pause => TimeoutAction::Pause,
                    OnTimeout::Stop => TimeoutAction::Stop,
                },
                env: env.into_iter().collect(),
                checkpointable: true,
                network: network.grant(),
                secrets: network.secrets()?,
            };
            let s = backend.session_create(&template, opts).await?;
            output::session(&s, json, "created")?;
        }
        SessionCmd::Exec {
            id,
            stdin,
            run,
            argv,
        } => {
            let input = read_stdin_if(stdin)?;
            let mut out = output::ExecOutput::new(json);
            let r = backend
                .session_exec(&id, argv, input, run.options()?, |s, d| out.chunk(s, d))
                .await?;
            return out.finish(&r);
        }
        SessionCmd::Invoke { id, payload, run } => {
            let payload = read_payload(payload.as_deref())?;
            let inv = backend
                .session_invoke(&id, payload, run.options()?, stderr_unless(json))
                .await?;
            return output::invocation(&inv, json);
        }
        SessionCmd::Put {
            id,
            local,
            remote,
            mode,
        } => {
            let data = if local == "-" {
                read_stdin_if(true)?.unwrap_or_default()
            } else {
                std::fs::read(&local).with_context(|| format!("reading {local}"))?
            };
            let n = data.len();
            backend.put_file(&id, &remote, data, mode).await?;
            if json {
                print_json(&serde_json::json!({"session": id, "path": remote, "bytes": n}))?;
            } else {
                println!("wrote {n} bytes to {id}:{remote}");
            }
        }
        SessionCmd::Get { id, remote, local } => {
            let data = backend.get_file(&id, &remote).await?;
            match local {
                Some(p) => {
                    std::fs::write(&p, &data).with_context(|| format!("writing {}", p.display()))?
                }
                None => {
                    let mut o = std::io::stdout();
                    o.write_all(&data)?;
                    o.flush()?;
                }
            }
        }
        SessionCmd::Pause { id } => output::session(&backend.pause(&id).await?, json, "paused")?,
        SessionCmd::Resume { id } => output::session(&backend.resume(&id).await?, json, "resumed")?,
        SessionCmd::Extend {
            id,
            idle_timeout,
            max_lifetime,
        } => {
            anyhow::ensure!(
                idle_timeout.is_some() || max_lifetime.is_some(),
                "give --idle-timeout and/or --max-lifetime"
            );
            let s = backend
                .extend(
                    &id,
                    idle_timeout.map(Duration::from_secs),
                    max_lifetime.map(Duration::from_secs),
                )
                .await?;
            output::session(&s, json, "extended")?;
        }
        SessionCmd::Ls => output::sessions(&backend.sessions().await?, json)?,
        SessionCmd::Show { id } => print_json(&backend.session(&id).await?)?,
        SessionCmd::Rm { id } => {
            output::session(&backend.delete_session(&id).await?, json, "removed")?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn keys(engine: &Engine, cmd: KeysCmd, json: bool) -> Result<ExitCode> {
    match cmd {
        KeysCmd::Create {
            name,
            max_sandboxes,
            admin,
        } => {
            let (k, secret) = engine.create_key(&name, max_sandboxes, admin)?;
            if json {
                print_json(&serde_json::json!({"key": k, "secret": secret}))?;
            } else {
                println!("{secret}");
                eprintln!(
                    "created key {} ({}); the secret above is shown only once. Use it as THAW_API_KEY.",
                    k.id, k.name
                );
            }
        }
        KeysCmd::Ls => {
            let ks = engine.keys()?;
            if json {
                print_json(&ks)?;
            } else {
                println!("{:<14} {:<20} {:>8}  STATE", "ID", "NAME", "MAX_SB");
                for k in ks {
                    println!(
                        "{:<14} {:<20} {:>8}  {}",
                        k.id,
                        k.name,
                        k.max_sandboxes,
                        match (k.revoked_at.is_some(), k.admin) {
                            (true, _) => "revoked",
                            (false, true) => "active, admin",
                            (false, false) => "active",
                        }
                    );
                }
            }
        }
        KeysCmd::Revoke { id } => {
            let k = engine.revoke_key(&id)?;
            if json {
                print_json(&k)?;
            } else {
                println!("revoked key {}", k.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Handler stderr goes to our stderr as it comes, except under --json.
fn stderr_unless(json: bool) -> impl FnMut(&[u8]) + Send {
    move |chunk: &[u8]| {
        if !json {
            let _ = std::io::stderr().write_all(chunk);
        }
    }
}

fn read_stdin_if(wanted: bool) -> Result<Option<Vec<u8>>> {
    if !wanted {
        return Ok(None);
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_PAYLOAD + 1)
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    anyhow::ensure!(
        buf.len() as u64 <= MAX_PAYLOAD,
        "stdin is larger than the {MAX_PAYLOAD}-byte limit"
    );
    Ok(Some(buf))
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

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("outer failed: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("disk on fire")]
    struct Inner;

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let e = anyhow::Error::new(Outer(Inner)).context("invoking `x`");
        assert_eq!(one_line(&e), "invoking `x`: outer failed: disk on fire");
        let plain = anyhow::Error::new(Inner).context("line one\nline two");
        assert_eq!(one_line(&plain), "line one line two: disk on fire");
    }
}
