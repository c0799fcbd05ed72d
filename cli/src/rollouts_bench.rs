//! `thaw bench rollouts`: what an RL rollout worker gets from this machine, measured
//! through the HTTP API of a real `thaw serve` (in this process, on a loopback port, under
//! a key made for the run and revoked after it), as a Python worker would use it.
//!
//! A rollout is three steps (two handler invocations and one exec that writes an answer),
//! the template's reward command, then a reset back to the session's origin. Figures:
//! rollouts per second at each concurrency, reset latency (the server's own clock, and the
//! worker's round trip), the time until all of a fork of 1 into 16 are ready, the memory
//! of idle sessions, and how many live sessions the machine holds before a limit stops it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use thaw_api::{
    BatchBody, Client, ClientError, ExecBody, Fault, ForkBody, InvokeBody, RewardBody,
    SessionCreateBody,
};
use thaw_platform::bench::{footprint, Dist};
use thaw_platform::Engine;
use tokio::sync::Mutex;

#[derive(Debug, Clone)]
pub struct Config {
    pub template_dir: PathBuf,
    pub concurrency: Vec<usize>,
    /// Rollouts each worker runs at each concurrency.
    pub rollouts_per_worker: usize,
    pub fork_n: usize,
    pub fork_repeats: usize,
    /// The capacity probe stops here even if nothing else did.
    pub max_sessions: usize,
    /// `checkpointable` of the rollout sessions (false: shared memory, the fast kind).
    pub checkpointable: bool,
    /// Sandboxes the server keeps prepared per snapshot (`thaw serve --prepared`).
    pub prepared: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub template: String,
    pub tier: String,
    pub cores: usize,
    pub checkpointable_sessions: bool,
    pub rollouts: Vec<Rate>,
    /// Reset of one session on an otherwise idle server, as the server timed it (from the
    /// request to the session running again): what a reset costs, without the queueing
    /// that a loaded machine adds (each rate below has its own).
    pub reset: Dist,
    /// The same resets as the worker sees them: the HTTP round trip.
    pub reset_round_trip: Dist,
    pub fork: Fork,
    pub idle: Idle,
    pub capacity: Capacity,
}

#[derive(Debug, Serialize)]
pub struct Rate {
    pub concurrency: usize,
    /// Time until the batch of `concurrency` sessions was ready.
    pub batch_ready_ms: f64,
    pub rollouts: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub step: Dist,
    pub reward: Dist,
    /// Resets at this concurrency (server-side): mostly waiting for a core.
    pub reset: Dist,
    pub task_errors: usize,
    pub infrastructure_errors: usize,
}

#[derive(Debug, Serialize)]
pub struct Fork {
    pub n: usize,
    /// The first fork of the checkpoint: nothing of it restored ahead yet.
    pub first_ms: f64,
    /// Every later fork of it, back to back (each right after the previous one's sessions
    /// were deleted): what a trainer forking a checkpoint again and again sees.
    pub again: Dist,
    /// From the request to all `n` sessions ready, every repetition.
    pub ready: Dist,
    pub failed: usize,
}

#[derive(Debug, Serialize)]
pub struct Idle {
    pub sessions: usize,
    pub pss_bytes_per_session: u64,
    pub rss_bytes_per_session: u64,
}

#[derive(Debug, Serialize)]
pub struct Capacity {
    pub live_sessions: usize,
    /// What stopped the probe.
    pub limit: String,
}

/// Lowest MemAvailable the capacity probe leaves the machine.
const MEM_FLOOR: u64 = 2 << 30;

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(u64::MAX)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn fault(e: &ClientError) -> Fault {
    match e {
        ClientError::Api { fault, .. } => *fault,
        _ => Fault::Infrastructure,
    }
}

pub async fn run(engine: Engine, cfg: &Config, log: &dyn Fn(&str)) -> Result<Report> {
    let server_cfg = thaw_server::ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        prepared: cfg.prepared,
        ..thaw_server::ServerConfig::default()
    };
    let listener = thaw_server::bind(&server_cfg).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let max = cfg.max_sessions + cfg.concurrency.iter().max().copied().unwrap_or(0) + 64;
    let (key, secret) = engine.create_key(
        &format!("bench-rollouts-{}", std::process::id()),
        u32::try_from(max).unwrap_or(u32::MAX),
        false,
    )?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(thaw_server::serve_on(
        listener,
        engine.clone(),
        server_cfg,
        async move {
            let _ = stopped.await;
        },
    ));
    let c = Client::new(&url, Some(secret))?;
    // The key's view of the engine: the sessions the bench makes are the key's.
    let result = measure(&engine.as_owner(&key.id), &c, cfg, log).await;
    // Whatever happened, the run's sessions and key go.
    if let Ok(sessions) = c.sessions().await {
        for s in sessions {
            let _ = c.session_delete(&s.id).await;
        }
    }
    let _ = stop.send(());
    let _ = server.await;
    let _ = engine.revoke_key(&key.id);
    result
}

async fn measure(engine: &Engine, c: &Client, cfg: &Config, log: &dyn Fn(&str)) -> Result<Report> {
    log(&format!("deploying {}", cfg.template_dir.display()));
    let t = c
        .deploy_dir(&cfg.template_dir)
        .await
        .with_context(|| format!("deploying {}", cfg.template_dir.display()))?;
    anyhow::ensure!(
        t.spec.reward.is_some(),
        "template `{}` declares no [reward] command; the rollout bench scores every rollout",
        t.name
    );
    log("reset of one session x20, nothing else running");
    let (server_side, round_trip) = reset_latency(c, &t.name, cfg).await?;
    let mut rates = Vec::new();
    for &n in &cfg.concurrency {
        log(&format!(
            "{} three-step rollouts at concurrency {n}",
            n * cfg.rollouts_per_worker
        ));
        let resets = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        rates.push(rollouts(c, &t.name, n, cfg, resets).await?);
    }
    let fork = fork(c, &t.name, cfg, log).await?;
    log("capacity: live idle sessions until a limit");
    let (idle, capacity) = capacity(engine, c, &t.name, cfg).await?;
    Ok(Report {
        template: t.name.clone(),
        tier: t.tier.as_str().to_string(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        checkpointable_sessions: cfg.checkpointable,
        rollouts: rates,
        reset: Dist::of(server_side),
        reset_round_trip: Dist::of(round_trip),
        fork,
        idle,
        capacity,
    })
}

fn batch_body(template: &str, n: usize, cfg: &Config) -> BatchBody {
    BatchBody {
        n: n as u32,
        template: Some(template.to_string()),
        checkpointable: Some(cfg.checkpointable),
        idle_timeout_s: Some(600),
        ..BatchBody::default()
    }
}

/// Per-rollout figures a worker hands back.
#[derive(Default)]
struct WorkerStats {
    rollouts: usize,
    steps: Vec<f64>,
    rewards: Vec<f64>,
    task_errors: usize,
    infrastructure_errors: usize,
}

async fn rollouts(
    c: &Client,
    template: &str,
    n: usize,
    cfg: &Config,
    resets: Arc<Mutex<(Vec<f64>, Vec<f64>)>>,
) -> Result<Rate> {
    let started = Instant::now();
    let batch = c.session_batch(&batch_body(template, n, cfg)).await?;
    let batch_ready_ms = ms_since(started);
    anyhow::ensure!(
        batch.errors.is_empty(),
        "a batch of {n} sessions failed: {:?}",
        batch.errors.first().map(|e| &e.error.message)
    );
    let started = Instant::now();
    let mut workers = Vec::new();
    for s in &batch.sessions {
        let (c, id, per, resets) = (
            c.clone(),
            s.id.clone(),
            cfg.rollouts_per_worker,
            resets.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut st = WorkerStats::default();
            for r in 0..per {
                match one_rollout(&c, &id, r, &mut st).await {
                    Ok(()) => st.rollouts += 1,
                    Err(e) if fault(&e) == Fault::Task => st.task_errors += 1,
                    Err(_) => st.infrastructure_errors += 1,
                }
                let t = Instant::now();
                match c.session_reset(&id, None).await {
                    Ok(out) => {
                        let mut r = resets.lock().await;
                        r.0.push(out.reset_ms);
                        r.1.push(ms_since(t));
                    }
                    Err(_) => st.infrastructure_errors += 1,
                }
            }
            st
        }));
    }
    let mut all = WorkerStats::default();
    for w in workers {
        let st = w.await?;
        all.rollouts += st.rollouts;
        all.steps.extend(st.steps);
        all.rewards.extend(st.rewards);
        all.task_errors += st.task_errors;
        all.infrastructure_errors += st.infrastructure_errors;
    }
    let secs = started.elapsed().as_secs_f64();
    for s in &batch.sessions {
        let _ = c.session_delete(&s.id).await;
    }
    let (reset_server, _) = std::mem::take(&mut *resets.lock().await);
    Ok(Rate {
        concurrency: n,
        batch_ready_ms: (batch_ready_ms * 100.0).round() / 100.0,
        rollouts: all.rollouts,
        seconds: (secs * 100.0).round() / 100.0,
        per_second: ((all.rollouts as f64 / secs) * 100.0).round() / 100.0,
        step: Dist::of(all.steps),
        reward: Dist::of(all.rewards),
        reset: Dist::of(reset_server),
        task_errors: all.task_errors,
        infrastructure_errors: all.infrastructure_errors,
    })
}

/// Resets of one session, each after a step that changed it, with nothing else running.
async fn reset_latency(c: &Client, template: &str, cfg: &Config) -> Result<(Vec<f64>, Vec<f64>)> {
    let batch = c.session_batch(&batch_body(template, 1, cfg)).await?;
    let s = batch
        .sessions
        .first()
        .ok_or_else(|| anyhow::anyhow!("no session for the reset figure: {:?}", batch.errors))?;
    let (mut server, mut round_trip) = (Vec::new(), Vec::new());
    // The first reset fills the spares; it is not counted.
    for i in 0..21 {
        c.session_exec(
            &s.id,
            &ExecBody::new(["sh", "-c", "echo dirty > /tmp/step"]),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let out = c.session_reset(&s.id, None).await?;
        if i > 0 {
            server.push(out.reset_ms);
            round_trip.push(ms_since(t));
        }
    }
    let _ = c.session_delete(&s.id).await;
    Ok((server, round_trip))
}

/// Three steps and a reward in one session.
async fn one_rollout(
    c: &Client,
    id: &str,
    r: usize,
    st: &mut WorkerStats,
) -> std::result::Result<(), ClientError> {
    for step in 0..2 {
        let t = Instant::now();
        let body = InvokeBody {
            payload: serde_json::json!({"op": "random", "step": step, "rollout": r}),
            ..InvokeBody::default()
        };
        c.session_invoke(id, &body).await?;
        st.steps.push(ms_since(t));
    }
    let t = Instant::now();
    let answer = ExecBody::new([
        "sh",
        "-c",
        "echo '{\"answer\": 42}' > /tmp/answer.json; echo 1 > /tmp/reward",
    ]);
    c.session_exec(id, &answer).await?;
    st.steps.push(ms_since(t));
    let t = Instant::now();
    let body = RewardBody {
        env: [("EXPECTED".to_string(), "42".to_string())].into(),
        ..RewardBody::default()
    };
    c.session_reward(id, &body).await?;
    st.rewards.push(ms_since(t));
    Ok(())
}

/// Fork of one mid-episode session into `fork_n`, repeated.
async fn fork(c: &Client, template: &str, cfg: &Config, log: &dyn Fn(&str)) -> Result<Fork> {
    log(&format!(
        "fork of 1 into {} x{}",
        cfg.fork_n, cfg.fork_repeats
    ));
    let src = c
        .session_create(&SessionCreateBody {
            checkpointable: Some(true),
            ..SessionCreateBody::new(template)
        })
        .await?;
    c.session_exec(
        &src.id,
        &ExecBody::new(["sh", "-c", "echo mid-episode > /tmp/state"]),
    )
    .await?;
    c.session_checkpoint(&src.id, "mid").await?;
    let (mut ready, mut failed) = (Vec::new(), 0);
    for _ in 0..cfg.fork_repeats {
        let t = Instant::now();
        let out = c
            .session_fork(
                &src.id,
                &ForkBody {
                    n: cfg.fork_n as u32,
                    checkpoint: Some("mid".into()),
                    checkpointable: Some(cfg.checkpointable),
                    ..ForkBody::default()
                },
            )
            .await?;
        ready.push(ms_since(t));
        failed += out.errors.len();
        for s in out.sessions {
            let _ = c.session_delete(&s.id).await;
        }
    }
    let _ = c.session_delete(&src.id).await;
    Ok(Fork {
        n: cfg.fork_n,
        first_ms: ready.first().copied().unwrap_or(0.0),
        again: Dist::of(ready.iter().skip(1).copied().collect()),
        ready: Dist::of(ready),
        failed,
    })
}

/// Idle sessions made in batches until something refuses, memory runs low or the cap is
/// reached; their memory is read at the end.
async fn capacity(
    engine: &Engine,
    c: &Client,
    template: &str,
    cfg: &Config,
) -> Result<(Idle, Capacity)> {
    let mut live: Vec<String> = Vec::new();
    let limit = loop {
        if live.len() >= cfg.max_sessions {
            break format!("the bench's own cap (--max-sessions {})", cfg.max_sessions);
        }
        if mem_available() < MEM_FLOOR {
            break format!("memory: MemAvailable fell under {} GiB", MEM_FLOOR >> 30);
        }
        let n = 32.min(cfg.max_sessions - live.len());
        match c.session_batch(&batch_body(template, n, cfg)).await {
            Ok(b) => {
                live.extend(b.sessions.into_iter().map(|s| s.id));
                if let Some(e) = b.errors.first() {
                    break format!("a session failed to start: {}", e.error.message);
                }
            }
            Err(e) => break format!("the server refused a batch: {e}"),
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut pids = Vec::new();
    for id in &live {
        pids.extend(engine.session_host_pids(id).unwrap_or_default());
    }
    let f = footprint(&pids);
    let n = live.len().max(1) as u64;
    let idle = Idle {
        sessions: live.len(),
        pss_bytes_per_session: f.pss_bytes / n,
        rss_bytes_per_session: f.rss_bytes / n,
    };
    for id in &live {
        let _ = c.session_delete(id).await;
    }
    Ok((
        idle,
        Capacity {
            live_sessions: live.len(),
            limit,
        },
    ))
}

/// Renders the report for people.
pub fn table(r: &Report) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut s = format!(
        "thaw bench rollouts: template `{}` ({} tier, {} cores), sessions checkpointable: {}\n",
        r.template, r.tier, r.cores, r.checkpointable_sessions
    );
    for rate in &r.rollouts {
        s += &format!(
            "  concurrency {:>3}: {:>7.2} rollouts/s ({} in {} s; batch ready in {:.0} ms; p50 step {:.1} ms, reward {:.1} ms, reset {:.1} ms; errors: {} task, {} infrastructure)\n",
            rate.concurrency, rate.per_second, rate.rollouts, rate.seconds, rate.batch_ready_ms,
            rate.step.p50_ms, rate.reward.p50_ms, rate.reset.p50_ms, rate.task_errors, rate.infrastructure_errors
        );
    }
    s += &format!(
        "  reset, one session, idle server, p50 / p99: {:.1} / {:.1} ms (server), {:.1} / {:.1} ms (round trip), n={}\n",
        r.reset.p50_ms,
        r.reset.p99_ms,
        r.reset_round_trip.p50_ms,
        r.reset_round_trip.p99_ms,
        r.reset.n
    );
    s += &format!(
        "  fork 1 into {}: all ready in p50 {:.0} ms (min {:.0}, max {:.0}; {} failed); the first fork of the checkpoint {:.0} ms, later ones p50 {:.0} ms\n",
        r.fork.n,
        r.fork.ready.p50_ms,
        r.fork.ready.min_ms,
        r.fork.ready.max_ms,
        r.fork.failed,
        r.fork.first_ms,
        r.fork.again.p50_ms
    );
    s += &format!(
        "  idle session: {:.2} MiB PSS, {:.2} MiB RSS (over {} sessions)\n",
        mib(r.idle.pss_bytes_per_session),
        mib(r.idle.rss_bytes_per_session),
        r.idle.sessions
    );
    s += &format!(
        "  live sessions held: {} (stopped by {})\n",
        r.capacity.live_sessions, r.capacity.limit
    );
    s
}
