//! `template.toml`: what a user publishes. Every field is documented in `templates/README.md`.
//! Parsing and validation are the engine's (`thaw_platform::template::spec`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thaw_protocol::{HandlerConfig, HandlerMode};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateSpec {
    /// Template name: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub base: BaseSpec,
    /// Files copied from the template directory into the rootfs at build time.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Shell commands run (with `/bin/sh -c`) inside the rootfs at build time, in order.
    #[serde(default)]
    pub setup: Vec<String>,
    /// Run after boot and before the snapshot, so its effects are in every clone.
    #[serde(default)]
    pub warmup: Option<WarmupSpec>,
    pub handler: HandlerSpec,
    /// How a session scores its episode (`POST /v1/sessions/{id}/reward`): a command whose
    /// last line of output is a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardSpec>,
    #[serde(default)]
    pub limits: Limits,
    /// Limits of the template build (`setup`), which runs in a sandbox of its own.
    #[serde(default)]
    pub build: BuildLimits,
    /// Isolation tier: `auto` (microvm where Cloud Hypervisor and hardware KVM work, else
    /// container), `container` or `microvm`.
    #[serde(default)]
    pub tier: crate::tier::TierChoice,
    /// Environment of every task and of the handler.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Egress: what the sandbox may reach through thaw's gateway. Nothing by default.
    #[serde(default, skip_serializing_if = "NetworkSpec::is_empty")]
    pub network: NetworkSpec,
}

/// `[network]`: a template's egress grant and limits (`templates/README.md`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkSpec {
    /// Domains (`example.com`, `*.example.com`, `*` for every name), IPs and CIDRs, each
    /// with an optional `:port` or `:first-last`.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// IPs and CIDRs kept out even when a broader `allow_out` range covers them (a named
    /// domain in `allow_out` still wins).
    #[serde(default)]
    pub deny_out: Vec<String>,
    /// Connections open at once per sandbox; 0 means the default, 64.
    #[serde(default)]
    pub max_connections: u32,
    /// Bandwidth per sandbox each way, KiB/s; 0 means unlimited.
    #[serde(default)]
    pub bandwidth_kib_s: u64,
}

impl NetworkSpec {
    pub fn is_empty(&self) -> bool {
        *self == NetworkSpec::default()
    }
}

/// A credential for some destinations (a session's or a call's; never stored): the sandbox
/// sees the environment variable `name` holding a placeholder, and the egress proxy puts
/// `value` in its place in HTTPS requests to `hosts` alone (which `allow_out` must allow).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretGrant {
    /// `A-Z`, `0-9`, `_`: the environment variable the placeholder is in.
    pub name: String,
    pub value: String,
    /// Domains (`api.example.com`, `*.example.com`) whose requests get the value.
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for SecretGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretGrant")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// An egress grant of a session or of one call: added to the template's `[network]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkGrant {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

impl NetworkGrant {
    pub fn is_empty(&self) -> bool {
        self.allow_out.is_empty() && self.deny_out.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum BaseSpec {
    /// A few MB: busybox-static and its applets.
    Busybox,
    /// Debian built with debootstrap (variant minbase) plus `packages`.
    Debian {
        #[serde(default = "default_suite")]
        suite: String,
        #[serde(default)]
        packages: Vec<String>,
    },
}

fn default_suite() -> String {
    "bookworm".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileSpec {
    /// Path relative to the template directory (a file or a directory).
    pub src: String,
    /// Absolute path inside the sandbox.
    pub dest: String,
    /// Octal permission bits, e.g. "0755". Default: the source's.
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WarmupSpec {
    pub command: Vec<String>,
    #[serde(default = "default_warmup_timeout")]
    pub timeout_s: u64,
}

fn default_warmup_timeout() -> u64 {
    120
}

/// The template's reward command, run in a session on request. It prints the reward as
/// the last non-empty line of its standard output: a finite decimal number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RewardSpec {
    pub command: Vec<String>,
    #[serde(default = "default_reward_timeout")]
    pub timeout_s: u64,
}

fn default_reward_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HandlerSpec {
    pub command: Vec<String>,
    #[serde(default)]
    pub mode: HandlerModeSpec,
    #[serde(default)]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum HandlerModeSpec {
    #[default]
    Exec,
    Persistent,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Limits {
    #[serde(default = "d_vcpus")]
    pub vcpus: u32,
    #[serde(default = "d_memory")]
    pub memory_mib: u64,
    #[serde(default = "d_pids")]
    pub pids: u64,
    #[serde(default = "d_disk")]
    pub disk_mib: u64,
    #[serde(default = "d_timeout")]
    pub timeout_s: u64,
    #[serde(default = "d_output")]
    pub output_kib: u64,
    /// Mount the read-only cgroup view (`/sys/fs/cgroup`) in the sandbox, for tasks that read
    /// their own limits there (a JVM, Go's runtime). Off by default: on a cgroup v1 host it
    /// is nine mounts that every restore recreates, each through CRIU's user-namespace
    /// daemon (docs/benchmarks.md), and it shows the host's controller layout.
    #[serde(default)]
    pub cgroup_view: bool,
}

fn d_vcpus() -> u32 {
    1
}
fn d_memory() -> u64 {
    512
}
fn d_pids() -> u64 {
    256
}
fn d_disk() -> u64 {
    256
}
fn d_timeout() -> u64 {
    30
}
fn d_output() -> u64 {
    1024
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            vcpus: d_vcpus(),
            memory_mib: d_memory(),
            pids: d_pids(),
            disk_mib: d_disk(),
            timeout_s: d_timeout(),
            output_kib: d_output(),
            cgroup_view: false,
        }
    }
}

/// Limits of a template build: the `setup` commands run in a sandbox under these. The
/// defaults fit a package install; a tenant may lower them, and raise them up to the ranges
/// in the engine's `TemplateSpecExt::validate` (the timeout up to [`MAX_BUILD_TIMEOUT_S`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildLimits {
    /// Memory of setup's processes (no swap), MiB. The build's writes live in a tmpfs
    /// charged to the same cgroup, so the cgroup's limit is `memory_mib + disk_mib`.
    #[serde(default = "b_memory")]
    pub memory_mib: u64,
    #[serde(default = "b_pids")]
    pub pids: u64,
    #[serde(default = "b_vcpus")]
    pub vcpus: u32,
    /// Size of the tmpfs that holds everything setup writes (the layer), MiB.
    #[serde(default = "b_disk")]
    pub disk_mib: u64,
    /// Output of each setup command the host keeps (the tail), KiB.
    #[serde(default = "b_output")]
    pub output_kib: u64,
    /// Wall-clock limit of each setup command, seconds.
    #[serde(default = "b_timeout")]
    pub timeout_s: u64,
    /// What `setup` may reach through the egress gateway (package indexes), as
    /// `[network] allow_out`; nothing by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

/// The longest a single setup command may be allowed to run, whatever a template asks.
pub const MAX_BUILD_TIMEOUT_S: u64 = 3600;

fn b_memory() -> u64 {
    2048
}
fn b_pids() -> u64 {
    512
}
fn b_vcpus() -> u32 {
    2
}
fn b_disk() -> u64 {
    4096
}
fn b_output() -> u64 {
    1024
}
fn b_timeout() -> u64 {
    600
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            memory_mib: b_memory(),
            pids: b_pids(),
            vcpus: b_vcpus(),
            disk_mib: b_disk(),
            output_kib: b_output(),
            timeout_s: b_timeout(),
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

impl TemplateSpec {
    /// How guest-init runs the handler.
    pub fn handler_config(&self) -> HandlerConfig {
        HandlerConfig {
            command: self.handler.command.clone(),
            mode: match self.handler.mode {
                HandlerModeSpec::Exec => HandlerMode::Exec,
                HandlerModeSpec::Persistent => HandlerMode::Persistent,
            },
            cwd: self.handler.cwd.clone(),
            env: self.env.clone(),
            start_timeout_ms: Some(self.warmup_timeout_s() * 1000),
        }
    }

    /// The warm-up's timeout, also the start timeout of a persistent handler.
    pub fn warmup_timeout_s(&self) -> u64 {
        self.warmup
            .as_ref()
            .map(|w| w.timeout_s)
            .unwrap_or_else(default_warmup_timeout)
    }
}
