//! Bearer API keys of `thaw serve`, as listed (the secret is never part of a record).

use serde::{Deserialize, Serialize};

/// A key as listed and as seen by the server (never carries the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyRecord {
    /// 12 lowercase hex characters; also the owner id of the key's templates and sessions.
    pub id: String,
    pub name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; a revoked key no longer authenticates.
    pub revoked_at: Option<u64>,
    /// How many sandboxes the key may hold at once: in-flight invokes and execs plus
    /// running sessions.
    pub max_sandboxes: u32,
    /// An operator's key: it sees and may end every key's sandboxes and audit records
    /// (`thaw keys create --admin`). Keys made before the flag existed are not admins.
    #[serde(default)]
    pub admin: bool,
}
