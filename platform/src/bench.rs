//! `thaw bench`: the figures of docs/benchmarks.md, measured in one run on this machine.
//!
//! Every figure is a distribution over repeated real operations (real runc, CRIU, sandboxes),
//! reported as p50/p99 because the machines we run on are shared and noisy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{Engine, Live, RunOptions, StartKind};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub template: String,
    /// Repetitions of each latency measurement.
    pub iterations: usize,
    /// Payload of the trivial invocation.
    pub payload: serde_json::Value,
    pub idle_clones: usize,
    /// Drop the page cache for the cold-cache restore figure (root only; affects the host).
    pub drop_caches: bool,
    /// Sandboxes kept prepared per snapshot, as `thaw serve` keeps them.
    pub prepared: usize,
    /// Highest concurrency of the throughput figures (1, 4 and 16 up to it).
    pub max_concurrency: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dist {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Dist {
        v.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| {
            if v.is_empty() {
                return 0.0;
            }
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v[i.min(v.len() - 1)]
        };
        Dist {
            n: v.len(),
            p50_ms: round(pick(0.5)),
            p99_ms: round(pick(0.99)),
            min_ms: round(v.first().copied().unwrap_or(0.0)),
            max_ms: round(v.last().copied().unwrap_or(0.0)),
        }
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub concurrency: usize,
    pub invocations: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub errors: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub clones: usize,
    pub pss_bytes: u64,
    pub rss_bytes: u64,
    pub pss_over_rss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub template: String,
    /// The tier the template runs on (`container` or `microvm`).
    pub tier: crate::tier::Tier,
    pub machine: String,
    /// Set when the figures are an emulator's (QEMU TCG, where the microvm tier runs on
    /// nested KVM without hardware virtualization): not speeds of real hardware.
    pub caveat: Option<String>,
    /// Sandboxes kept prepared per snapshot during the run (0: every restore prepared its
    /// own directory, disk and cgroups).
    pub prepared_per_snapshot: usize,
    pub cold_start: Dist,
    pub restore_to_ready: Dist,
    pub invoke_round_trip: Dist,
    pub restore_vs_cold_speedup: f64,
    pub throughput: Vec<Throughput>,
    pub idle_memory: Memory,
    pub snapshot_raw_bytes: u64,
    pub snapshot_stored_bytes: u64,
    pub snapshot_ratio: f64,
    pub restore_cold_page_cache: Option<Dist>,
    pub restore_warm_page_cache: Dist,
    pub sessions: SessionFigures,
}

/// Pause and resume of a live session (one exec of state between each).
#[derive(Debug, Clone, Serialize)]
pub struct SessionFigures {
    pub pause: Dist,
    pub resume: Dist,
    /// Raw checkpoint bytes of one pause, and what it added to the store: the rest is
    /// shared with the template's snapshot.
    pub pause_raw_bytes: u64,
    pub pause_new_stored_bytes: u64,
}

pub async fn run(engine: Arc<Engine>, cfg: &BenchConfig, log: &dyn Fn(&str)) -> Result<Report> {
    let t = engine.ready_template(&cfg.template)?;
    if t.snapshot.is_none() {
        return Err(Error::TemplateNotReady {
            name: t.name,
            state: "without a snapshot".into(),
            hint: "deploy it again with this thaw release".into(),
        });
    }
    let opts = RunOptions::default();
    let n = cfg.iterations.max(3);
    engine.keep_prepared(cfg.prepared);

    log(&format!("cold start x{}", n.min(5)));
    let mut cold = Vec::new();
    for _ in 0..n.min(5) {
        let started = Instant::now();
        let live = engine.spawn_cold(&cfg.template, &opts).await?;
        cold.push(ms(started.elapsed()));
        live.destroy().await;
    }

    log(&format!("restore to ready x{n}"));
    let mut restore = Vec::new();
    for _ in 0..n {
        let live = engine.spawn(&cfg.template, &opts).await?;
        debug_assert_eq!(live.kind, StartKind::Restore);
        restore.push(ms(live.ready));
        live.destroy().await;
    }

    log(&format!("invoke round trip x{n}"));
    let mut rtt = Vec::new();
    for _ in 0..n {
        let inv = engine
            .invoke(&cfg.template, cfg.payload.clone(), opts.clone(), |_| {})
            .await?;
        // The round trip a caller sees ends when the answer is back; teardown follows.
        rtt.push(inv.timings.start_ms + inv.timings.run_ms);
    }
    engine.settle().await;

    let mut throughput = Vec::new();
    for conc in [1usize, 4, 16]
        .into_iter()
        .filter(|c| *c <= cfg.max_concurrency.max(1))
    {
        let total = (conc * 3).max(12);
        log(&format!(
            "throughput at concurrency {conc} ({total} invocations)"
        ));
        throughput.push(measure_throughput(&engine, cfg, conc, total).await);
    }

    log(&format!("{} idle clones: PSS and RSS", cfg.idle_clones));
    let idle_memory = idle_memory(&engine, cfg).await?;

    let restore_cold_page_cache = if cfg.drop_caches {
        log("restore with a cold page cache x3");
        let mut v = Vec::new();
        for _ in 0..3 {
            drop_caches()?;
            let live = engine.spawn(&cfg.template, &opts).await?;
            v.push(ms(live.ready));
            live.destroy().await;
        }
        Some(Dist::of(v))
    } else {
        None
    };

    log(&format!("session pause and resume x{}", n.min(10)));
    let sessions = session_figures(&engine, cfg, n.min(10)).await?;

    let cold_d = Dist::of(cold);
    let restore_d = Dist::of(restore.clone());
    let size = t.snapshot_size;
    Ok(Report {
        template: cfg.template.clone(),
        tier: t.tier,
        machine: machine(),
        caveat: emulated().then(|| {
            "measured under QEMU TCG software emulation (nested KVM): every guest instruction is emulated, so these are not speeds of real hardware; compare ratios, not milliseconds".to_string()
        }),
        prepared_per_snapshot: cfg.prepared,
        restore_vs_cold_speedup: round(cold_d.p50_ms / restore_d.p50_ms.max(0.001)),
        cold_start: cold_d,
        restore_to_ready: restore_d.clone(),
        invoke_round_trip: Dist::of(rtt),
        throughput,
        idle_memory,
        snapshot_raw_bytes: size.raw_bytes,
        snapshot_stored_bytes: size.stored_bytes,
        snapshot_ratio: round(size.stored_bytes as f64 / size.raw_bytes.max(1) as f64),
        restore_cold_page_cache,
        restore_warm_page_cache: restore_d,
        sessions,
    })
}

async fn session_figures(
    engine: &Arc<Engine>,
    cfg: &BenchConfig,
    n: usize,
) -> Result<SessionFigures> {
    let s = engine
        .session_create(&cfg.template, crate::session::SessionOptions::default())
        .await?;
    let r = async {
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        let mut last = None;
        for i in 0..n {
            // Change some state each round, as a real session would between pauses.
            engine
                .session_write_file(&s.id, "/tmp/bench-round", i.to_string().into_bytes(), None)
                .await?;
            let t = Instant::now();
            let p = engine.session_pause(&s.id).await?;
            pause.push(ms(t.elapsed()));
            last = p.snapshot_size;
            let t = Instant::now();
            engine.session_resume(&s.id).await?;
            resume.push(ms(t.elapsed()));
        }
        Ok(SessionFigures {
            pause: Dist::of(pause),
            resume: Dist::of(resume),
            pause_raw_bytes: last.map(|z| z.raw_bytes).unwrap_or(0),
            pause_new_stored_bytes: last.map(|z| z.stored_bytes).unwrap_or(0),
        })
    }
    .await;
    let _ = engine.session_delete(&s.id).await;
    r
}

async fn measure_throughput(
    engine: &Arc<Engine>,
    cfg: &BenchConfig,
    concurrency: usize,
    total: usize,
) -> Throughput {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..total {
        let engine = engine.clone();
        let sem = sem.clone();
        let name = cfg.template.clone();
        let payload = cfg.payload.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            engine
                .invoke(&name, payload, RunOptions::default(), |_| {})
                .await
                .map(|i| i.done.status == thaw_protocol::InvokeStatus::Ok)
        }));
    }
    let mut errors = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(true))) {
            errors += 1;
        }
    }
    // The last answers are out, but their sandboxes' teardowns are work this rate must pay.
    engine.settle().await;
    let secs = started.elapsed().as_secs_f64();
    Throughput {
        concurrency,
        invocations: total,
        seconds: round(secs),
        per_second: round(total as f64 / secs),
        errors,
    }
}

async fn idle_memory(engine: &Arc<Engine>, cfg: &BenchConfig) -> Result<Memory> {
    let mut clones: Vec<Live> = Vec::new();
    let mut result = Ok(());
    for _ in 0..cfg.idle_clones {
        match engine.spawn(&cfg.template, &RunOptions::default()).await {
            Ok(l) => clones.push(l),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Let restore-time background work settle before reading the counters.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut pss, mut rss) = (0u64, 0u64);
    for c in &clones {
        for pid in c.sb.host_pids() {
            let (p, r) = smaps_rollup(pid);
            pss += p;
            rss += r;
        }
    }
    let n = clones.len();
    for c in clones {
        c.destroy().await;
    }
    result?;
    Ok(Memory {
        clones: n,
        pss_bytes: pss,
        rss_bytes: rss,
        pss_over_rss: round(pss as f64 / rss.max(1) as f64),
    })
}

/// Summed Pss and Rss of processes, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Footprint {
    pub pss_bytes: u64,
    pub rss_bytes: u64,
}

/// The memory `pids` hold together (processes gone meanwhile count as nothing).
pub fn footprint(pids: &[u32]) -> Footprint {
    let mut f = Footprint::default();
    for &pid in pids {
        let (p, r) = smaps_rollup(pid);
        f.pss_bytes += p;
        f.rss_bytes += r;
    }
    f
}

/// (Pss, Rss) of a process in bytes.
fn smaps_rollup(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("Pss:"), field("Rss:"))
}

fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| {
        Error::Other(format!(
            "dropping the page cache needs root ({e}); run without --cold-cache"
        ))
    })
}

/// Whether this machine is QEMU's software emulation (its CPU model says so) or a run of
/// `thaw-nested` (which sets `THAW_NESTED`).
fn emulated() -> bool {
    std::env::var_os("THAW_NESTED").is_some()
        || std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.contains("QEMU TCG"))
            .unwrap_or(false)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} cpus, {model}, kernel {}", kernel.trim())
}

/// The readable table printed after the JSON.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let d = |name: &str, d: &Dist| {
        format!(
            "{name:<34} p50 {:>8.1} ms   p99 {:>8.1} ms   (n={})\n",
            d.p50_ms, d.p99_ms, d.n
        )
    };
    s += &format!(
        "thaw bench: template `{}` ({} tier) on {}, {} prepared sandboxes per snapshot\n",
        r.template,
        r.tier.as_str(),
        r.machine,
        r.prepared_per_snapshot
    );
    if let Some(c) = &r.caveat {
        s += &format!("NOTE: {c}\n");
    }
    s += &d("cold start (boot + warm-up)", &r.cold_start);
    s += &d("restore to ready", &r.restore_to_ready);
    s += &d("invoke round trip (trivial)", &r.invoke_round_trip);
    s += &format!(
        "{:<34} {:.1}x\n",
        "restore vs cold start (p50)", r.restore_vs_cold_speedup
    );
    for t in &r.throughput {
        s += &format!(
            "{:<34} {:>6.1} invocations/s ({} in {:.1} s, {} errors)\n",
            format!("throughput, concurrency {}", t.concurrency),
            t.per_second,
            t.invocations,
            t.seconds,
            t.errors
        );
    }
    let m = &r.idle_memory;
    s += &format!(
        "{:<34} PSS {:.1} MiB, RSS {:.1} MiB, PSS/RSS {:.2}\n",
        format!("{} idle clones", m.clones),
        m.pss_bytes as f64 / 1048576.0,
        m.rss_bytes as f64 / 1048576.0,
        m.pss_over_rss
    );
    s += &format!(
        "{:<34} raw {:.1} MiB, stored {:.1} MiB ({:.2} of raw)\n",
        "snapshot size",
        r.snapshot_raw_bytes as f64 / 1048576.0,
        r.snapshot_stored_bytes as f64 / 1048576.0,
        r.snapshot_ratio
    );
    if let Some(c) = &r.restore_cold_page_cache {
        s += &d("restore, cold page cache", c);
    }
    s += &d("restore, warm page cache", &r.restore_warm_page_cache);
    s += &d("session pause", &r.sessions.pause);
    s += &d("session resume", &r.sessions.resume);
    s += &format!(
        "{:<34} raw {:.1} MiB, new in store {:.2} MiB\n",
        "session pause snapshot",
        r.sessions.pause_raw_bytes as f64 / 1048576.0,
        r.sessions.pause_new_stored_bytes as f64 / 1048576.0
    );
    s
}
