//! Prometheus metrics. Counters and the restore histogram are updated as requests finish;
//! the gauges that describe the machine (live sandboxes, paused sessions, store size) are
//! measured when `/metrics` is scraped, so they cannot drift from the truth.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use thaw_api::LiveSandbox;
use thaw_platform::engine::{ExecResult, Invocation, StartKind};
use thaw_platform::session::{Session, SessionState};

pub struct Metrics {
    registry: Registry,
    pub invocations: IntCounterVec,
    pub restore_seconds: Histogram,
    pub live_sandboxes: IntGauge,
    pub paused_sessions: IntGauge,
    pub store_bytes: IntGauge,
    pub open_connections: IntGauge,
    pub http_requests: IntCounterVec,
    /// Per-template figures of live sandboxes (`crate::sandbox_metrics`).
    pub sandboxes: SandboxMetrics,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let invocations = IntCounterVec::new(
            Opts::new(
                "thaw_invocations_total",
                "Invocations by status (ok, error, timeout, oom; failed when no result came back)",
            ),
            &["status"],
        )?;
        let restore_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "thaw_restore_seconds",
                "Time from restore start to a ready sandbox (invocations and execs restored from a template snapshot, session resumes)",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let live_sandboxes = IntGauge::new(
            "thaw_live_sandboxes",
            "Sandboxes alive now: in-flight invocations and execs plus running sessions",
        )?;
        let paused_sessions = IntGauge::new("thaw_paused_sessions", "Paused sessions")?;
        let store_bytes = IntGauge::new(
            "thaw_store_bytes",
            "Bytes of compressed chunks in the snapshot store",
        )?;
        let open_connections = IntGauge::new(
            "thaw_open_connections",
            "Open HTTP connections (at most thaw serve --max-connections)",
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "thaw_http_requests_total",
                "HTTP requests by route template and status",
            ),
            &["route", "status"],
        )?;
        registry.register(Box::new(invocations.clone()))?;
        registry.register(Box::new(restore_seconds.clone()))?;
        registry.register(Box::new(live_sandboxes.clone()))?;
        registry.register(Box::new(paused_sessions.clone()))?;
        registry.register(Box::new(store_bytes.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        let sandboxes = SandboxMetrics::new(&registry)?;
        Ok(Metrics {
            sandboxes,
            registry,
            invocations,
            restore_seconds,
            live_sandboxes,
            paused_sessions,
            store_bytes,
            open_connections,
            http_requests,
        })
    }

    pub fn invocation(&self, r: &Result<Invocation, thaw_platform::Error>) {
        match r {
            Ok(inv) => {
                self.invocations
                    .with_label_values(&[inv.done.status.as_str()])
                    .inc();
                if inv.start == StartKind::Restore {
                    self.restore(inv.timings.start_ms);
                }
            }
            Err(_) => self.invocations.with_label_values(&["failed"]).inc(),
        }
    }

    pub fn exec(&self, r: &ExecResult) {
        if r.start == StartKind::Restore {
            self.restore(r.timings.start_ms);
        }
    }

    pub fn resume(&self, s: &Session) {
        if s.state == SessionState::Running {
            if let Some(ms) = s.last_resume_ms {
                self.restore(ms as f64);
            }
        }
    }

    fn restore(&self, ms: f64) {
        self.restore_seconds
            .observe(Duration::from_secs_f64(ms.max(0.0) / 1000.0).as_secs_f64());
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// What live sandboxes use, summed per template (the label is the template's name, never a
/// sandbox's id, so the series stay as few as the templates), and the kills per template.
/// Measured at each scrape from the same figures `thaw ps` shows; a template whose every
/// sandbox lacks a figure (a microvm's pids, network bytes without an egress proxy) has no
/// series for it rather than a 0.
pub struct SandboxMetrics {
    live: IntGaugeVec,
    cpu_seconds: GaugeVec,
    memory_bytes: IntGaugeVec,
    pids: IntGaugeVec,
    disk_bytes: IntGaugeVec,
    net_rx_bytes: IntGaugeVec,
    net_tx_bytes: IntGaugeVec,
    connections: IntGaugeVec,
    kills: IntCounterVec,
}

impl SandboxMetrics {
    fn new(registry: &Registry) -> Result<SandboxMetrics, prometheus::Error> {
        let int = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["template"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let cpu_seconds = GaugeVec::new(
            Opts::new(
                "thaw_template_cpu_seconds",
                "CPU time used by the template's live sandboxes, summed (cgroups; a microvm: its VMM)",
            ),
            &["template"],
        )?;
        registry.register(Box::new(cpu_seconds.clone()))?;
        let kills = IntCounterVec::new(
            Opts::new(
                "thaw_kills_total",
                "Sandboxes and sessions ended by thaw kill, by template",
            ),
            &["template"],
        )?;
        registry.register(Box::new(kills.clone()))?;
        Ok(SandboxMetrics {
            live: int(
                "thaw_template_live_sandboxes",
                "Live sandboxes of the template: invokes and execs in flight and sessions' sandboxes",
            )?,
            cpu_seconds,
            memory_bytes: int(
                "thaw_template_memory_bytes",
                "Memory charged to the template's live sandboxes, summed (memory cgroups; a microvm: its VMM's resident set)",
            )?,
            pids: int(
                "thaw_template_pids",
                "Processes in the template's live sandboxes, summed (pids cgroups)",
            )?,
            disk_bytes: int(
                "thaw_template_disk_bytes",
                "Bytes on the template's live sandboxes' private disks, summed",
            )?,
            net_rx_bytes: int(
                "thaw_template_net_rx_bytes",
                "Bytes the template's live sandboxes received through the egress proxy, summed",
            )?,
            net_tx_bytes: int(
                "thaw_template_net_tx_bytes",
                "Bytes the template's live sandboxes sent through the egress proxy, summed",
            )?,
            connections: int(
                "thaw_template_egress_connections",
                "Egress connections open now from the template's live sandboxes, summed",
            )?,
            kills,
        })
    }

    /// Replaces every series with the sums of `live`, and brings the kill counters up to
    /// the engine's counts (which only grow).
    pub fn set(&self, live: &[LiveSandbox], kills: &BTreeMap<String, u64>) {
        #[derive(Default)]
        struct Sum {
            n: i64,
            cpu: Option<f64>,
            memory: Option<u64>,
            pids: Option<u64>,
            disk: Option<u64>,
            rx: Option<u64>,
            tx: Option<u64>,
            conns: Option<u64>,
        }
        fn add(acc: &mut Option<u64>, v: Option<u64>) {
            if let Some(v) = v {
                *acc = Some(acc.unwrap_or(0).saturating_add(v));
            }
        }
        let mut sums: BTreeMap<&str, Sum> = BTreeMap::new();
        for s in live {
            let e = sums.entry(s.template.as_str()).or_default();
            let f = &s.figures;
            e.n += 1;
            if let Some(c) = f.cpu_seconds {
                e.cpu = Some(e.cpu.unwrap_or(0.0) + c);
            }
            add(&mut e.memory, f.memory_bytes);
            add(&mut e.pids, f.pids);
            add(&mut e.disk, f.disk_bytes);
            add(&mut e.rx, f.net_rx_bytes);
            add(&mut e.tx, f.net_tx_bytes);
            add(&mut e.conns, f.connections_open);
        }
        for g in [
            &self.live,
            &self.memory_bytes,
            &self.pids,
            &self.disk_bytes,
            &self.net_rx_bytes,
            &self.net_tx_bytes,
            &self.connections,
        ] {
            g.reset();
        }
        self.cpu_seconds.reset();
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (t, s) in &sums {
            self.live.with_label_values(&[t]).set(s.n);
            if let Some(c) = s.cpu {
                self.cpu_seconds.with_label_values(&[t]).set(c);
            }
            for (g, v) in [
                (&self.memory_bytes, s.memory),
                (&self.pids, s.pids),
                (&self.disk_bytes, s.disk),
                (&self.net_rx_bytes, s.rx),
                (&self.net_tx_bytes, s.tx),
                (&self.connections, s.conns),
            ] {
                if let Some(v) = v {
                    g.with_label_values(&[t]).set(int(v));
                }
            }
        }
        for (t, n) in kills {
            let c = self.kills.with_label_values(&[t]);
            let seen = c.get();
            if *n > seen {
                c.inc_by(n - seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_api::{SandboxFigures, Tier};

    fn sandbox(template: &str, figures: SandboxFigures) -> LiveSandbox {
        LiveSandbox {
            id: format!("sb-{template}"),
            tier: Tier::Container,
            template: template.into(),
            owner: "k".into(),
            session: None,
            state: "running".into(),
            started_at: None,
            tasks: vec![],
            figures,
        }
    }

    /// Sums per template; an unknown figure is no series, not a 0; kills count up to the
    /// engine's figure and never back.
    #[test]
    fn per_template_sums_skip_unknown_figures() {
        let m = Metrics::new().unwrap();
        let known = SandboxFigures {
            cpu_seconds: Some(1.5),
            memory_bytes: Some(100),
            pids: Some(3),
            disk_bytes: Some(10),
            ..Default::default()
        };
        let live = vec![
            sandbox("shell", known.clone()),
            sandbox("shell", known),
            sandbox("vm", SandboxFigures::default()),
        ];
        let kills = BTreeMap::from([("shell".to_string(), 2u64)]);
        m.sandboxes.set(&live, &kills);
        m.sandboxes.set(&live, &kills);
        let text = m.render().unwrap();
        for line in [
            "thaw_template_live_sandboxes{template=\"shell\"} 2",
            "thaw_template_live_sandboxes{template=\"vm\"} 1",
            "thaw_template_cpu_seconds{template=\"shell\"} 3",
            "thaw_template_memory_bytes{template=\"shell\"} 200",
            "thaw_template_pids{template=\"shell\"} 6",
            "thaw_kills_total{template=\"shell\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(
            !text.contains("thaw_template_pids{template=\"vm\"}"),
            "{text}"
        );
        assert!(!text.contains("thaw_template_net_rx_bytes{"), "{text}");
        // A sandbox gone: its template's series go with it.
        m.sandboxes.set(&[], &kills);
        let text = m.render().unwrap();
        assert!(!text.contains("thaw_template_live_sandboxes{"), "{text}");
        assert!(
            text.contains("thaw_kills_total{template=\"shell\"} 2"),
            "{text}"
        );
    }
}
