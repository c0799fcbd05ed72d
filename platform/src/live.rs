//! Live observation and the big red button: which sandboxes run now (`thaw ps`), what each
//! uses, and ending them at once (`thaw kill`).
//!
//! What counts as live:
//!
//! * **a fresh sandbox running an invoke or exec**, from the moment its restore returns
//!   until its discard. This process's engine knows those from its [`Registry`]; another
//!   thaw process's (a `thaw serve`, another CLI command) are out of its sight.
//! * **a session's sandbox** (`running`, and a `creating`, `pausing` or `resuming` one), from
//!   the session's durable record, so every process on the machine sees them.
//!
//! Not listed: paused sessions (no process, no memory, no cgroup: they are a snapshot and a
//! record, `thaw session ls` shows them), spares restored ahead of resets and sandboxes
//! prepared ahead of restores (they belong to no key and run no call; [`Engine::close`]
//! and `keep_spares(0)` tear them down).
//!
//! Figures come from the host kernel (cgroups, `/proc`, the sandbox's disk), never from
//! guest-init, which code in the sandbox may control; see [`crate::backend::TierBackend::usage`].
//! Network figures come from a [`NetCounters`] source when one is set (the egress proxy), else
//! they are `null`.
//!
//! Kill ([`Engine::kill`], [`Engine::kill_all`]): the sandbox's processes are ended through
//! the host ([`crate::backend::TierBackend::kill_now`]: the container tier freezes and kills
//! its cgroup, the microvm tier SIGKILLs the VMM), without asking the guest and without
//! waiting for a SIGTERM to be honoured. The call running in it returns at once with
//! [`Error::Killed`]; the sandbox is then torn down like any discarded one. A session that
//! is killed ends for good: see [`crate::session`]'s `kill_session`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tier::Tier;

pub use thaw_types::live::{KillReport, LiveSandbox, RunningTask, SandboxFigures};

/// Network figures of one sandbox, as the egress proxy counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetFigures {
    /// Bytes from the network to the sandbox.
    pub rx_bytes: u64,
    /// Bytes from the sandbox to the network.
    pub tx_bytes: u64,
    /// Egress connections open now.
    pub connections_open: u64,
    /// Egress connections made since the sandbox started.
    pub connections_total: u64,
}

/// A source of per-sandbox network figures: the egress proxy (`gateway/`), which sees every
/// byte a sandbox sends or receives. Set it with [`Engine::set_net_counters`]; until then
/// every sandbox's network figures are `null`. `get` is called on every `ps` and `/metrics`
/// scrape for each live sandbox, so it must be cheap (a map lookup) and must not block.
/// `None`: the source knows nothing of that sandbox (its figures are `null`, not 0).
pub trait NetCounters: Send + Sync {
    fn get(&self, sandbox: &str) -> Option<NetFigures>;
}

/// What the host reads of one sandbox (see [`crate::backend::TierBackend::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostUsage {
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub disk_bytes: Option<u64>,
}

/// What a tier's kill ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KillStats {
    /// Host processes signalled (a container's members, a microvm's VMM).
    pub processes: usize,
}

/// Who pressed the button, as the killed call's error and the audit log name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KilledBy {
    /// The API key id, if the kill came over the API; `None`: the local CLI.
    pub key: Option<String>,
}

impl KilledBy {
    pub fn key(id: &str) -> KilledBy {
        KilledBy {
            key: Some(id.to_string()),
        }
    }

    pub fn local() -> KilledBy {
        KilledBy::default()
    }

    /// The error the killed call gets.
    pub fn error(&self, what: String) -> Error {
        Error::Killed {
            what,
            by: self.key.clone(),
        }
    }
}

/// The hook for the audit log: called once for every sandbox or session ended by a kill,
/// after it was ended. Emits the tracing event; the audit log is to append its record here.
impl Engine {
    /// A kill's trace event and audit record. The kill has happened whatever the log says:
    /// a record that cannot be written is an error in the trace, and the failed log stops
    /// new work.
    pub(crate) fn record_kill(&self, by: &KilledBy, report: &KillReport) {
        info!(
            target: "thaw::kill",
            sandbox = report.sandbox.as_deref().unwrap_or("-"),
            session = report.session.as_deref().unwrap_or("-"),
            template = %report.template,
            owner = %report.owner,
            was = %report.was,
            by_key = by.key.as_deref().unwrap_or("local"),
            processes = report.killed_processes,
            kill_ms = report.kill_ms,
            "sandbox killed"
        );
        let mut ev = thaw_audit::AuditEvent::new(thaw_types::audit::AuditAction::Kill)
            .with("reason", format!("thaw kill (it was {})", report.was))
            .with("killed", report.killed_processes)
            .template(&report.template)
            .actor(by.key.as_deref().unwrap_or(crate::engine::LOCAL_OWNER));
        // A paused session has no sandbox: its record names the session alone.
        if let Some(s) = &report.sandbox {
            ev = ev.sandbox(s);
        }
        if let Some(s) = &report.session {
            ev = ev.session(s);
        }
        if let Err(e) = self.audit_log.append(&ev) {
            tracing::error!("kill of {:?} not audited: {e}", report.sandbox);
        }
    }
}

/// The switch a kill throws: the call watching it returns [`Error::Killed`] at once.
#[derive(Default)]
struct KillSwitch {
    token: CancellationToken,
    by: Mutex<Option<KilledBy>>,
}

impl KillSwitch {
    /// Marks the call killed (a failure it reports from now on is the kill); false if it
    /// was marked already. [`KillSwitch::trip`] then ends its wait.
    fn mark(&self, by: &KilledBy) -> bool {
        let mut b = self.by.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_some() {
            return false;
        }
        *b = Some(by.clone());
        true
    }

    fn trip(&self) {
        self.token.cancel();
    }

    fn fired(&self) -> Option<KilledBy> {
        self.by.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One invoke or exec of this process in a fresh sandbox.
struct Call {
    owner: String,
    template: String,
    tier: Tier,
    /// Known once its restore returned.
    sandbox: Option<String>,
    started_at_ms: u64,
    task: RunningTask,
    switch: Arc<KillSwitch>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    calls: HashMap<u64, Call>,
    /// Calls running in sessions, by session id.
    session_tasks: HashMap<String, Vec<(u64, RunningTask)>>,
    /// Kills per template since this process started (`/metrics`).
    kills: BTreeMap<String, u64>,
}

/// The live sandboxes this process's engine runs (shared by every clone of the engine).
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    net: RwLock<Option<Arc<dyn NetCounters>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every change is a single insert or remove: a panic cannot leave it half done.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a call about to start a fresh sandbox; it leaves the registry when the
    /// guard is dropped.
    pub(crate) fn begin(
        self: &Arc<Self>,
        owner: &str,
        template: &str,
        tier: Tier,
        task: RunningTask,
    ) -> LiveCall {
        let switch = Arc::new(KillSwitch::default());
        let mut st = self.lock();
        st.next += 1;
        let key = st.next;
        st.calls.insert(
            key,
            Call {
                owner: owner.to_string(),
                template: template.to_string(),
                tier,
                sandbox: None,
                started_at_ms: now_ms(),
                task,
                switch: switch.clone(),
            },
        );
        LiveCall {
            registry: self.clone(),
            key,
            switch,
        }
    }

    /// Records a call running in session `id` until the guard is dropped.
    pub(crate) fn session_task(self: &Arc<Self>, id: &str, task: RunningTask) -> SessionTask {
        let mut st = self.lock();
        st.next += 1;
        let key = st.next;
        st.session_tasks
            .entry(id.to_string())
            .or_default()
            .push((key, task));
        SessionTask {
            registry: self.clone(),
            session: id.to_string(),
            key,
        }
    }

    fn tasks_of_session(&self, id: &str) -> Vec<RunningTask> {
        self.lock()
            .session_tasks
            .get(id)
            .map(|v| v.iter().map(|(_, t)| t.clone()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn count_kill(&self, template: &str) {
        *self.lock().kills.entry(template.to_string()).or_default() += 1;
    }

    fn net(&self, sandbox: &str) -> Option<NetFigures> {
        let source = self.net.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        source.get(sandbox)
    }
}

/// A registered invoke or exec ([`Registry::begin`]).
pub(crate) struct LiveCall {
    registry: Arc<Registry>,
    key: u64,
    switch: Arc<KillSwitch>,
}

impl LiveCall {
    /// Its sandbox is ready: from now on `ps` lists it and `kill` finds it by id.
    pub(crate) fn started(&self, sandbox: &str) {
        if let Some(c) = self.registry.lock().calls.get_mut(&self.key) {
            c.sandbox = Some(sandbox.to_string());
        }
    }

    /// The error of a call whose sandbox was killed, if it was.
    pub(crate) fn killed_error(&self, sandbox: &str) -> Option<Error> {
        self.switch
            .fired()
            .map(|by| by.error(format!("sandbox {sandbox}")))
    }

    /// Runs `work` until it ends or the sandbox is killed, whichever comes first.
    pub(crate) async fn watch<T>(
        &self,
        sandbox: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if let Some(e) = self.killed_error(sandbox) {
            return Err(e);
        }
        let r = tokio::select! {
            biased;
            _ = self.switch.token.cancelled() => {
                Err(self.killed_error(sandbox).unwrap_or_else(|| KilledBy::local().error(format!("sandbox {sandbox}"))))
            }
            r = work => r,
        };
        // A killed sandbox's call may also fail by itself (its guest-init went away) a
        // moment before the switch is seen: it was the kill all the same.
        match (r, self.killed_error(sandbox)) {
            (Err(_), Some(killed)) => Err(killed),
            (r, _) => r,
        }
    }
}

impl Drop for LiveCall {
    fn drop(&mut self) {
        self.registry.lock().calls.remove(&self.key);
    }
}

/// A registered session call ([`Registry::session_task`]).
pub(crate) struct SessionTask {
    registry: Arc<Registry>,
    session: String,
    key: u64,
}

impl Drop for SessionTask {
    fn drop(&mut self) {
        let mut st = self.registry.lock();
        if let Some(v) = st.session_tasks.get_mut(&self.session) {
            v.retain(|(k, _)| *k != self.key);
            if v.is_empty() {
                st.session_tasks.remove(&self.session);
            }
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix seconds when the process an identity record (`<pid> <starttime>`) names started:
/// the boot time plus its start in clock ticks since boot.
pub(crate) fn started_at(identity: &str) -> Option<u64> {
    let ticks: u64 = identity.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + ticks / clock_ticks()?)
}

/// The kernel's clock ticks per second (`/proc/<pid>/stat` counts in them).
pub(crate) fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf reads a constant of the C library; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0)
}

impl Engine {
    /// Sets where network figures come from (the egress proxy's counters). Until this is
    /// called, `ps` and `/metrics` report them as `null`.
    pub fn set_net_counters(&self, source: Arc<dyn NetCounters>) {
        *self.live.net.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Whether this engine's live views and kills span every owner: the local CLI's and an
    /// admin key's do ([`Engine::as_admin`]); an API key's ([`Engine::as_owner`]) see only
    /// its own.
    pub fn sees_all_owners(&self) -> bool {
        self.all_owners
    }

    pub(crate) fn visible(&self, owner: &str) -> bool {
        self.all_owners || owner == self.owner()
    }

    /// The live sandboxes this engine may see (module docs: which those are), oldest first.
    /// Blocking (reads the metadata store and the kernel's figures): call it off the async
    /// workers.
    pub fn live_sandboxes(&self) -> Result<Vec<LiveSandbox>> {
        let mut out = Vec::new();
        let calls: Vec<(String, String, Tier, String, u64, RunningTask)> = {
            let st = self.live.lock();
            st.calls
                .values()
                .filter(|c| self.visible(&c.owner) && c.switch.fired().is_none())
                .filter_map(|c| {
                    Some((
                        c.sandbox.clone()?,
                        c.owner.clone(),
                        c.tier,
                        c.template.clone(),
                        c.started_at_ms,
                        c.task.clone(),
                    ))
                })
                .collect()
        };
        for (id, owner, tier, template, started_ms, task) in calls {
            out.push(LiveSandbox {
                figures: self.figures(tier, &id),
                id,
                tier,
                template,
                owner,
                session: None,
                state: "running".to_string(),
                started_at: Some(started_ms / 1000),
                tasks: vec![task],
            });
        }
        for s in self.live_session_sandboxes()? {
            out.push(LiveSandbox {
                figures: self.figures(s.tier, &s.sandbox),
                tasks: self.live.tasks_of_session(&s.session.id),
                started_at: s.init.as_deref().and_then(started_at),
                id: s.sandbox,
                tier: s.tier,
                template: s.session.template,
                owner: s.session.owner,
                state: s.session.state.as_str().to_string(),
                session: Some(s.session.id),
            });
        }
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// One live sandbox, by its id or its session's id. Another owner's is unknown here
    /// (so ids do not leak).
    pub fn live_sandbox(&self, id: &str) -> Result<LiveSandbox> {
        self.live_sandboxes()?
            .into_iter()
            .find(|s| s.id == id || s.session.as_deref() == Some(id))
            .ok_or_else(|| unknown(id))
    }

    fn figures(&self, tier: Tier, sandbox: &str) -> SandboxFigures {
        let host = self.backend(tier).usage(sandbox);
        let net = self.live.net(sandbox);
        SandboxFigures {
            cpu_seconds: host.cpu_seconds,
            memory_bytes: host.memory_bytes,
            pids: host.pids,
            disk_bytes: host.disk_bytes,
            net_rx_bytes: net.map(|n| n.rx_bytes),
            net_tx_bytes: net.map(|n| n.tx_bytes),
            connections_open: net.map(|n| n.connections_open),
            connections_total: net.map(|n| n.connections_total),
        }
    }

    /// Kills per template since this process started (for `/metrics`).
    pub fn kills_by_template(&self) -> BTreeMap<String, u64> {
        self.live.lock().kills.clone()
    }

    /// Ends a live sandbox now, whatever it is doing: `id` is a sandbox's id or a session's
    /// (a paused session included, which is ended for good: see `kill_session`). The call
    /// running in it returns [`Error::Killed`] at once. Answers once no process of the
    /// sandbox is left; its files, mounts and cgroups go right after, as after any discard.
    pub async fn kill(&self, id: &str, by: &KilledBy) -> Result<KillReport> {
        let span = info_span!("sandbox.kill", id = %id);
        async {
            if let Some(r) = self.kill_call(id, by).await? {
                return Ok(r);
            }
            match self.kill_session(id, by).await? {
                Some(r) => Ok(r),
                None => Err(unknown(id)),
            }
        }
        .instrument(span)
        .await
    }

    /// Ends every live sandbox this engine may see (an API key's: its own; an admin's and
    /// the local CLI's: all), running sessions included. Paused sessions are left as they
    /// are: they run nothing (`kill` of a paused session's id ends it).
    pub async fn kill_all(&self, by: &KilledBy) -> Result<Vec<KillReport>> {
        let span = info_span!("sandbox.kill_all");
        async {
            let mut out = Vec::new();
            // Calls still restoring their sandbox are switched off too: they return
            // `killed` as soon as their sandbox is ready, before any task runs in it.
            let keys: Vec<u64> = {
                let st = self.live.lock();
                st.calls
                    .iter()
                    .filter(|(_, c)| self.visible(&c.owner))
                    .map(|(k, _)| *k)
                    .collect()
            };
            for k in keys {
                if let Some(r) = self.kill_call_key(k, by).await? {
                    out.push(r);
                }
            }
            let sessions: Vec<String> = self
                .live_session_sandboxes()?
                .into_iter()
                .map(|s| s.session.id)
                .collect();
            for id in sessions {
                match self.kill_session(&id, by).await {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => {}
                    Err(e) => warn!(session = %id, error = %e, "killing a session"),
                }
            }
            Ok(out)
        }
        .instrument(span)
        .await
    }

    /// Kills a fresh sandbox of this process by its id; `None`: no such call here.
    async fn kill_call(&self, id: &str, by: &KilledBy) -> Result<Option<KillReport>> {
        let key = {
            let st = self.live.lock();
            st.calls
                .iter()
                .find(|(_, c)| c.sandbox.as_deref() == Some(id) && self.visible(&c.owner))
                .map(|(k, _)| *k)
        };
        match key {
            Some(k) => self.kill_call_key(k, by).await,
            None => Ok(None),
        }
    }

    async fn kill_call_key(&self, key: u64, by: &KilledBy) -> Result<Option<KillReport>> {
        let started = Instant::now();
        let found = {
            let st = self.live.lock();
            st.calls.get(&key).map(|c| {
                (
                    c.switch.clone(),
                    c.sandbox.clone(),
                    c.tier,
                    c.template.clone(),
                    c.owner.clone(),
                )
            })
        };
        let Some((switch, sandbox, tier, template, owner)) = found else {
            return Ok(None);
        };
        // Marked first, so the call reports the kill and not the connection it loses; its
        // wait ends after the processes are gone, so its discard does not race the kill.
        if !switch.mark(by) {
            return Ok(None);
        }
        let stats = match &sandbox {
            Some(id) => self.kill_processes(tier, id).await,
            None => Ok(KillStats::default()),
        };
        switch.trip();
        let stats = stats?;
        let report = KillReport {
            sandbox,
            session: None,
            template,
            owner,
            was: "running".to_string(),
            killed_processes: stats.processes as u64,
            kill_ms: crate::engine::ms(started.elapsed()),
        };
        self.live.count_kill(&report.template);
        self.record_kill(by, &report);
        Ok(Some(report))
    }

    /// Ends every process of sandbox `id` through its tier, off the async workers.
    pub(crate) async fn kill_processes(&self, tier: Tier, id: &str) -> Result<KillStats> {
        let (tiers, sandbox) = (self.tiers.clone(), id.to_string());
        tokio::task::spawn_blocking(move || tiers.backend(tier).kill_now(&sandbox))
            .await
            .map_err(|e| Error::Other(format!("kill task: {e}")))?
    }
}

fn unknown(id: &str) -> Error {
    Error::NotFound(format!(
        "no live sandbox or session `{id}` of yours; `thaw ps` lists the live ones"
    ))
}
