//! A published template, as the engine records it and the API answers it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ids::IdMap;
use crate::spec::TemplateSpec;
use crate::tier::Tier;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TemplateState {
    Ready,
    /// Its snapshot failed verification; invocations are refused until it is deployed again.
    NeedsRebuild,
}

impl TemplateState {
    pub fn as_str(&self) -> &'static str {
        match self {
            TemplateState::Ready => "ready",
            TemplateState::NeedsRebuild => "needs_rebuild",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateRecord {
    pub name: String,
    pub spec: TemplateSpec,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub source_dir: PathBuf,
    /// Read-only rootfs layers, top first.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub layers: Vec<PathBuf>,
    pub layer_key: String,
    /// Where its sandboxes run (resolved from the spec's `tier` at publish time).
    #[serde(default)]
    pub tier: Tier,
    pub state: TemplateState,
    /// Name of the template's snapshot in the store, when it has one.
    pub snapshot: Option<String>,
    pub published_at: u64,
    pub publish_ms: u64,
    pub warm_ms: u64,
    #[serde(default)]
    pub snapshot_size: SnapshotSize,
    #[serde(default)]
    pub note: Option<String>,
    /// The uid/gid range its sandboxes run in. Records from before user namespaces have
    /// none: such a template needs a rebuild.
    #[serde(default)]
    pub ids: Option<IdMap>,
}

/// Size of a stored snapshot.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotSize {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub checkpoint_ms: u64,
}
