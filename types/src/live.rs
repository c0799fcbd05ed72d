//! Live sandboxes as `thaw ps` and `GET /v1/sandboxes` show them, and what `thaw kill`
//! answers.
//!
//! Every figure is read from the host kernel (cgroups, `/proc`, the sandbox's disk), never
//! from guest-init, which code in the sandbox may control. A figure the host cannot read for
//! a sandbox (a microvm's guest processes, network bytes when no egress proxy counts them)
//! is `null`, never 0.

use serde::{Deserialize, Serialize};

use crate::tier::Tier;

/// A sandbox that is alive now: a fresh one running an invoke or exec, or a session's.
/// Paused sessions hold no sandbox and are not listed (`thaw session ls` lists them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LiveSandbox {
    /// The sandbox's id (`sb-...`): a directory under `sandboxes/` and its cgroup's name.
    pub id: String,
    pub tier: Tier,
    pub template: String,
    /// The API key (id) whose call or session it is; `local` for the embedded CLI.
    pub owner: String,
    /// The session it runs, if it is a session's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// `running` (an invoke or exec in a fresh sandbox), or the session's state
    /// (`running`, `creating`, `pausing`, `resuming`).
    pub state: String,
    /// Unix seconds when the sandbox (its init, or its VMM) started; unknown: `null`.
    #[serde(default)]
    pub started_at: Option<u64>,
    /// The calls running in it now, oldest first (a session may run several at once).
    #[serde(default)]
    pub tasks: Vec<RunningTask>,
    pub figures: SandboxFigures,
}

/// A call running in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunningTask {
    /// `invoke` or `exec` (session calls: also `write_file`, `read_file`, `reward`).
    pub kind: String,
    /// The command: an exec's argv, or the template handler's command for an invoke.
    pub argv: Vec<String>,
    /// Unix milliseconds when the call started.
    pub since_ms: u64,
}

/// What a sandbox uses now, read from the host kernel. `null`: not known for this sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxFigures {
    /// CPU time used since the sandbox started (its cgroup's; a microvm: its VMM's).
    pub cpu_seconds: Option<f64>,
    /// Memory charged now (its memory cgroup; a microvm: the VMM's resident set).
    pub memory_bytes: Option<u64>,
    /// Processes now (its pids cgroup). A microvm's guest processes are out of the host's
    /// sight: `null`.
    pub pids: Option<u64>,
    /// Bytes its private disk holds (a container's tmpfs upper directory, a microvm's disk
    /// image's allocated blocks).
    pub disk_bytes: Option<u64>,
    /// Bytes received from and sent to the network through thaw's egress proxy; `null` where
    /// no proxy counts them.
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    /// Egress connections open now, and made since the sandbox started.
    pub connections_open: Option<u64>,
    pub connections_total: Option<u64>,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxList {
    pub sandboxes: Vec<LiveSandbox>,
}

/// What one `thaw kill` ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KillReport {
    /// The sandbox ended; `null` for a paused session (it had none).
    #[serde(default)]
    pub sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub template: String,
    pub owner: String,
    /// What it was: `running` (an invoke or exec), or the session's state before the kill.
    pub was: String,
    /// Host processes killed (a microvm: its VMM).
    pub killed_processes: u64,
    /// From the kill's start until no process of the sandbox was left.
    pub kill_ms: f64,
}

/// `POST /v1/sandboxes/kill`: everything that was ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KillList {
    pub killed: Vec<KillReport>,
}
