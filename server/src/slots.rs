//! Per-key sandbox limits: a key may hold at most `max_sandboxes` sandboxes at once, counting
//! its in-flight calls that start a sandbox (invokes, execs, deploys, session creates and
//! resumes: tracked here) and its sessions that hold one (asked of the engine). A call that
//! would start one more is refused with 429 and `Retry-After` before any work starts.
//!
//! Each sandbox counts once: a session being created or resumed holds a slot here for its
//! whole call, so its record (`creating`, `resuming`) is not counted again. Once the engine
//! has recorded it `running`, the call returns and drops its slot at once; a limit check
//! that lands in between sees the session twice and refuses (the safe side of a race).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use thaw_platform::session::SessionState;

use crate::blocking;
use crate::error::ApiError;
use crate::extract::Owner;

#[derive(Default)]
pub struct Slots {
    in_flight: Mutex<HashMap<String, u32>>,
}

/// Sandbox slots of a key (one, or a batch's), released when dropped (after the sandboxes
/// are gone, or are counted as running sessions).
pub struct Slot {
    slots: Arc<Slots>,
    key: String,
    n: u32,
}

impl Slots {
    /// Sandboxes in flight for every key together.
    pub fn total(&self) -> u64 {
        self.lock().values().map(|&n| u64::from(n)).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic while holding this lock cannot leave the map inconsistent (single
        // increments and decrements), so a poisoned lock is still usable.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `owner`'s key, or refuses with 429 naming the limit.
    pub async fn acquire(self: &Arc<Self>, owner: &Owner) -> Result<Slot, ApiError> {
        self.acquire_n(owner, 1).await
    }

    /// Takes `n` slots at once (a fork or batch), or refuses them all with 429 before any
    /// sandbox starts: a batch that does not fit is not half made.
    pub async fn acquire_n(self: &Arc<Self>, owner: &Owner, n: u32) -> Result<Slot, ApiError> {
        let engine = owner.engine.clone();
        let running = blocking(move || {
            Ok(engine
                .sessions()?
                .iter()
                .filter(|s| counted_by_state(s.state))
                .count())
        })
        .await?;
        let running = u32::try_from(running).unwrap_or(u32::MAX);
        let max = owner.key.max_sandboxes;
        let mut map = self.lock();
        let in_flight = map.entry(owner.key.id.clone()).or_insert(0);
        let held = in_flight.saturating_add(running);
        if held.saturating_add(n) > max {
            let asked = if n == 1 {
                String::new()
            } else {
                format!(
                    "; this call asks for {n} and {} are free",
                    max.saturating_sub(held)
                )
            };
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sandboxes",
                format!(
                    "API key `{}` is at its limit of {max} concurrent sandboxes (max_sandboxes): {in_flight} in-flight invoke/exec calls and {running} running sessions{asked}; retry when one finishes, or pause or delete a session",
                    owner.key.id,
                ),
            )
            .retry_after(RETRY_AFTER_S));
        }
        *in_flight += n;
        Ok(Slot {
            slots: self.clone(),
            key: owner.key.id.clone(),
            n,
        })
    }
}

/// What a refused caller is told to wait (`Retry-After`), in seconds: most calls take
/// about a second, and a caller that retries sooner is refused again cheaply.
pub const RETRY_AFTER_S: u64 = 1;

/// Whether a session in this state counts against its key by its record. A session being
/// created or resumed does not: the call doing it holds a slot (see the module docs).
pub fn counted_by_state(state: SessionState) -> bool {
    state.holds_sandbox() && !matches!(state, SessionState::Creating | SessionState::Resuming)
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.slots.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(self.n);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}
