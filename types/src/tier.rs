//! Isolation tiers: what a template asks for, and where its sandboxes run.

use serde::{Deserialize, Serialize};

/// What a template asks for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TierChoice {
    /// microvm where Cloud Hypervisor and hardware KVM work, else container.
    #[default]
    Auto,
    Container,
    Microvm,
}

/// Where a template's sandboxes actually run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Tier {
    /// runc namespaces + cgroups + seccomp, CRIU snapshots. Records written before the
    /// microvm tier existed carry no tier: they are container templates.
    #[default]
    Container,
    /// A Cloud Hypervisor VM per sandbox, VM snapshots.
    Microvm,
}

impl Tier {
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::Container => "container",
            Tier::Microvm => "microvm",
        }
    }
}

impl std::str::FromStr for TierChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(TierChoice::Auto),
            "container" => Ok(TierChoice::Container),
            "microvm" => Ok(TierChoice::Microvm),
            other => Err(format!(
                "`{other}` is not a tier: use auto, container or microvm"
            )),
        }
    }
}
