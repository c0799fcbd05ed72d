//! Prometheus metrics. Counters and the restore histogram are updated as requests finish;
//! the gauges that describe the machine (live sandboxes, paused sessions, store size) are
//! measured when `/metrics` is scraped, so they cannot drift from the truth.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
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
        Ok(Metrics {
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
