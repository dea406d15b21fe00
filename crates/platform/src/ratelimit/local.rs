//! The in-process limiter for local development (no Upstash configured):
//! the same policies, algorithms, keys and all-or-nothing consumption as
//! `limit.lua`, over a bounded map. Limits are per process, which is what
//! a developer's single dev server wants; production refuses to start
//! without Upstash (`UpstashConfig::load`).

use std::collections::HashMap;
use std::sync::Mutex;

use super::algorithm::{self, Bucket};
use super::policy::Algorithm;
use super::script::keys;
use super::{Item, LimitState};

/// Keys kept at most; beyond, expired keys go first, then the soonest to expire.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
enum Value {
    Counter(i64),
    Bucket(Bucket),
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    value: Value,
    expires_at_ms: i64,
}

/// What phase 1 learned about one policy.
enum Plan {
    Sliding {
        key: String,
        check: algorithm::SlidingCheck,
        limit: u32,
        window_ms: u64,
    },
    Bucket {
        key: String,
        check: algorithm::BucketCheck,
        max: u32,
        interval_ms: u64,
        refill: u32,
    },
}

#[derive(Debug, Default)]
pub(crate) struct LocalStore {
    slots: Mutex<HashMap<String, Slot>>,
}

impl LocalStore {
    /// Decides `items` at `now_ms`, consuming only when all allow.
    pub(crate) fn run(&self, prefix: &str, items: &[Item], now_ms: i64) -> Vec<LimitState> {
        // A poisoned lock only means another request panicked mid-update;
        // the counters are still usable.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let plans: Vec<Plan> = items
            .iter()
            .map(|item| plan(&slots, prefix, item, now_ms))
            .collect();
        let all_allowed = plans.iter().all(Plan::allowed);
        items
            .iter()
            .zip(plans)
            .map(|(item, plan)| {
                let (allowed, reset_ms) = (plan.allowed(), plan.reset_ms());
                let remaining = if all_allowed {
                    consume(&mut slots, plan, now_ms)
                } else {
                    plan.remaining_now()
                };
                LimitState::new(item.policy, allowed, remaining, reset_ms)
            })
            .collect()
    }
}

fn live(slots: &HashMap<String, Slot>, key: &str, now_ms: i64) -> Option<Value> {
    slots
        .get(key)
        .filter(|s| s.expires_at_ms > now_ms)
        .map(|s| s.value)
}

fn plan(slots: &HashMap<String, Slot>, prefix: &str, item: &Item, now_ms: i64) -> Plan {
    let mut keys = keys(prefix, item, now_ms).into_iter();
    // `keys` always yields the current window's key first.
    let key = keys.next().unwrap_or_default();
    match item.policy.algorithm {
        Algorithm::SlidingWindow { limit, window_ms } => {
            let count = |k: Option<&str>| match k.and_then(|k| live(slots, k, now_ms)) {
                Some(Value::Counter(n)) => n,
                _ => 0,
            };
            let previous = keys.next();
            let check = algorithm::sliding(
                limit,
                window_ms,
                now_ms,
                count(Some(&key)),
                count(previous.as_deref()),
            );
            Plan::Sliding {
                key,
                check,
                limit,
                window_ms,
            }
        }
        Algorithm::TokenBucket {
            refill,
            interval_ms,
            max,
        } => {
            let stored = match live(slots, &key, now_ms) {
                Some(Value::Bucket(b)) => Some(b),
                _ => None,
            };
            let check = algorithm::bucket(max, interval_ms, refill, now_ms, stored);
            Plan::Bucket {
                key,
                check,
                max,
                interval_ms,
                refill,
            }
        }
    }
}

impl Plan {
    fn allowed(&self) -> bool {
        match self {
            Plan::Sliding { check, .. } => check.allowed,
            Plan::Bucket { check, .. } => check.allowed,
        }
    }

    fn remaining_now(&self) -> i64 {
        match self {
            Plan::Sliding { check, .. } => check.remaining,
            Plan::Bucket { check, .. } => check.bucket.tokens,
        }
    }

    fn reset_ms(&self) -> i64 {
        match self {
            Plan::Sliding { check, .. } => check.reset_ms,
            Plan::Bucket { check, .. } => check.reset_ms,
        }
    }
}

/// Takes one unit; returns what is left.
fn consume(slots: &mut HashMap<String, Slot>, plan: Plan, now_ms: i64) -> i64 {
    match plan {
        Plan::Sliding {
            key,
            check,
            limit,
            window_ms,
        } => {
            let used = match live(slots, &key, now_ms) {
                Some(Value::Counter(n)) => n + 1,
                _ => 1,
            };
            // Like PEXPIRE on the first INCRBY: the expiry is set once.
            let expires_at_ms = match slots.get(&key) {
                Some(s) if used > 1 => s.expires_at_ms,
                _ => now_ms + algorithm::sliding_ttl_ms(window_ms),
            };
            insert(slots, key, Value::Counter(used), expires_at_ms, now_ms);
            i64::from(limit) - (check.weighted + used)
        }
        Plan::Bucket {
            key,
            check,
            max,
            interval_ms,
            refill,
        } => {
            let remaining = check.bucket.tokens - 1;
            let ttl = algorithm::bucket_ttl_ms(max, interval_ms, refill, remaining);
            let bucket = Bucket {
                refilled_at_ms: check.bucket.refilled_at_ms,
                tokens: remaining,
            };
            insert(
                slots,
                key,
                Value::Bucket(bucket),
                now_ms + ttl.max(1),
                now_ms,
            );
            remaining
        }
    }
}

fn insert(
    slots: &mut HashMap<String, Slot>,
    key: String,
    value: Value,
    expires_at_ms: i64,
    now_ms: i64,
) {
    if slots.len() >= MAX_KEYS && !slots.contains_key(&key) {
        slots.retain(|_, s| s.expires_at_ms > now_ms);
        if slots.len() >= MAX_KEYS {
            let soonest = slots
                .iter()
                .min_by_key(|(_, s)| s.expires_at_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = soonest {
                slots.remove(&k);
            }
        }
    }
    slots.insert(
        key,
        Slot {
            value,
            expires_at_ms,
        },
    );
}
