//! The deny cache: callers already over a limit are refused in process,
//! with zero round trips, until that limit's reset.
//!
//! This is what makes a flood from one caller cheap: after the first
//! refusal, the warm function answers 429 without asking Redis (and without
//! paying Upstash per command). It is per process, so another instance may
//! ask Redis once more and learn the same. Entries are keyed by the policy
//! identifier (`{policy}:{subject}`), so a caller blocked by `burst` is not
//! blocked on routes without it.
//!
//! Bounded: at most `capacity` entries; when full, expired entries are
//! dropped first, then the one that would expire soonest.

use std::collections::HashMap;
use std::sync::Mutex;

use super::policy::Policy;

/// Default number of blocked identifiers remembered.
pub const DEFAULT_CAPACITY: usize = 10_000;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocked {
    pub policy: Policy,
    pub reset_ms: i64,
}

#[derive(Debug)]
pub(crate) struct DenyCache {
    entries: Mutex<HashMap<String, Blocked>>,
    capacity: usize,
}

impl DenyCache {
    pub(crate) fn new(capacity: usize) -> DenyCache {
        DenyCache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The block on `identifier`, if it is still in force at `now_ms`.
    pub(crate) fn get(&self, identifier: &str, now_ms: i64) -> Option<Blocked> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(identifier)
            .filter(|b| b.reset_ms > now_ms)
            .copied()
    }

    /// Blocks `identifier` until `blocked.reset_ms`.
    pub(crate) fn insert(&self, identifier: &str, blocked: Blocked, now_ms: i64) {
        if blocked.reset_ms <= now_ms {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(identifier) {
            entries.retain(|_, b| b.reset_ms > now_ms);
            if entries.len() >= self.capacity {
                let soonest = entries
                    .iter()
                    .min_by_key(|(_, b)| b.reset_ms)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(identifier.to_owned(), blocked);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::policies::BURST;

    fn blocked(reset_ms: i64) -> Blocked {
        Blocked {
            policy: BURST,
            reset_ms,
        }
    }

    #[test]
    fn blocks_until_reset() {
        let cache = DenyCache::new(10);
        cache.insert("burst:a", blocked(2_000), 1_000);
        assert!(cache.get("burst:a", 1_999).is_some());
        assert!(cache.get("burst:a", 2_000).is_none());
        assert!(cache.get("burst:b", 1_000).is_none());
    }

    #[test]
    fn stays_bounded_evicting_expired_then_soonest() {
        let cache = DenyCache::new(3);
        cache.insert("a", blocked(1_500), 1_000);
        cache.insert("b", blocked(9_000), 1_000);
        cache.insert("c", blocked(5_000), 1_000);
        // At 2 000, "a" has expired: it goes first.
        cache.insert("d", blocked(9_000), 2_000);
        assert_eq!(cache.len(), 3);
        assert!(cache.get("c", 2_000).is_some());
        // Nothing expired: the soonest ("c") goes.
        cache.insert("e", blocked(9_000), 2_000);
        assert_eq!(cache.len(), 3);
        assert!(cache.get("c", 2_000).is_none());
        assert!(cache.get("b", 2_000).is_some());
    }
}
