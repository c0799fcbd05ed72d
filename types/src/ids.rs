//! The uid/gid range a template's sandboxes run in (user namespaces): root in a sandbox is an
//! unprivileged range of host ids.

use serde::{Deserialize, Serialize};

/// Uids (and gids) per range: a sandbox sees 0..65535, like a Debian system expects
/// (nobody is 65534).
pub const RANGE_SIZE: u32 = 65_536;
/// The first range starts at 2^30: far above any login user's or `/etc/subuid` range a
/// distribution hands out, and far below the overflow uid 4294967294.
const FIRST_BASE: u32 = 1 << 30;
/// Ranges 0..MAX_RANGES fit below 2^31.
pub const MAX_RANGES: u32 = (1 << 30) / RANGE_SIZE;

/// A sandbox's id mapping: in-sandbox ids `0..size` are host ids `host_base..host_base+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdMap {
    pub host_base: u32,
    pub size: u32,
}

impl IdMap {
    /// The `index`th range.
    pub fn range(index: u32) -> IdMap {
        IdMap {
            host_base: FIRST_BASE + (index % MAX_RANGES) * RANGE_SIZE,
            size: RANGE_SIZE,
        }
    }

    /// Which range this is (the inverse of [`IdMap::range`]).
    pub fn index(&self) -> u32 {
        self.host_base.saturating_sub(FIRST_BASE) / RANGE_SIZE
    }

    /// Root of the sandbox, as the host sees it.
    pub fn root(&self) -> u32 {
        self.host_base
    }

    /// Whether host id `id` belongs to this range.
    pub fn contains(&self, id: u32) -> bool {
        id >= self.host_base && id - self.host_base < self.size
    }

    /// The line of `/proc/<pid>/uid_map` (and `gid_map`) that sets this mapping.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.size)
    }
}
