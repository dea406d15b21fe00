//! The Redis side: key layout, the script's arguments, and its reply.
//!
//! Key layout (that of `@upstash/ratelimit`, so a JS service can share the
//! counters): the identifier of a policy for a caller is
//! `{policy name}:{subject}`, e.g. `money:5f0c…` or `public:203.0.113.9`;
//!
//! - sliding window: `{prefix}:{identifier}:{window index}` with
//!   `window index = floor(now_ms / window_ms)` (a string counter);
//! - token bucket: `{prefix}:{identifier}` (a hash `refilledAt`, `tokens`).
//!
//! With the default prefix `@upstash/ratelimit`, a JS service calling
//! `new Ratelimit({ limiter: Ratelimit.slidingWindow(5, "60 s") })
//! .limit("money:" + userId)` counts against the same `money` limit.

use std::sync::LazyLock;

use super::algorithm::window_index;
use super::policy::Algorithm;
use super::{Item, LimitState};
use crate::upstash::{Reply, Script};

/// The script deciding every policy of one request (see `limit.lua`).
pub(crate) static LIMIT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("limit.lua")));

/// The Redis keys one policy reads and writes, in the script's order.
pub(crate) fn keys(prefix: &str, item: &Item, now_ms: i64) -> Vec<String> {
    match item.policy.algorithm {
        Algorithm::SlidingWindow { window_ms, .. } => {
            let current = window_index(now_ms, window_ms);
            vec![
                format!("{prefix}:{}:{current}", item.identifier),
                format!("{prefix}:{}:{}", item.identifier, current - 1),
            ]
        }
        Algorithm::TokenBucket { .. } => vec![format!("{prefix}:{}", item.identifier)],
    }
}

/// KEYS and ARGV of one script call deciding `items` at `now_ms`.
pub(crate) fn call(prefix: &str, items: &[Item], now_ms: i64) -> (Vec<String>, Vec<String>) {
    let mut keys_out = Vec::with_capacity(items.len() * 2);
    let mut args = Vec::with_capacity(2 + items.len() * 4);
    args.push(now_ms.to_string());
    args.push(items.len().to_string());
    for item in items {
        keys_out.extend(keys(prefix, item, now_ms));
        match item.policy.algorithm {
            Algorithm::SlidingWindow { limit, window_ms } => {
                args.extend([
                    "sw".to_owned(),
                    limit.to_string(),
                    window_ms.to_string(),
                    "0".to_owned(),
                ]);
            }
            Algorithm::TokenBucket {
                refill,
                interval_ms,
                max,
            } => {
                args.extend([
                    "tb".to_owned(),
                    max.to_string(),
                    interval_ms.to_string(),
                    refill.to_string(),
                ]);
            }
        }
    }
    (keys_out, args)
}

/// The script's reply → one state per item, or why it is not one.
pub(crate) fn parse(reply: &Reply, items: &[Item]) -> Result<Vec<LimitState>, String> {
    let Reply::Array(values) = reply else {
        return Err("the limit script did not answer an array".to_owned());
    };
    let ints: Option<Vec<i64>> = values.iter().map(Reply::as_int).collect();
    let ints = ints.ok_or("the limit script answered a non-integer")?;
    if ints.len() != 1 + 3 * items.len() {
        return Err("the limit script answered the wrong number of values".to_owned());
    }
    let states = items
        .iter()
        .zip(ints[1..].chunks_exact(3))
        .map(|(item, v)| LimitState::new(item.policy, v[0] == 1, v[1], v[2]))
        .collect();
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::policies;

    #[test]
    fn keys_follow_upstash_layout() {
        let item = Item {
            policy: policies::MONEY_BASIC,
            identifier: "money:u1".to_owned(),
        };
        // 125 s into the epoch: window 2 of 60 s windows.
        assert_eq!(
            keys("@upstash/ratelimit", &item, 125_000),
            [
                "@upstash/ratelimit:money:u1:2",
                "@upstash/ratelimit:money:u1:1"
            ]
        );
        let burst = Item {
            policy: policies::BURST,
            identifier: "burst:u1".to_owned(),
        };
        assert_eq!(keys("p", &burst, 125_000), ["p:burst:u1"]);
    }

    #[test]
    fn arguments_describe_each_policy() {
        let items = [
            Item {
                policy: policies::BURST,
                identifier: "burst:u".to_owned(),
            },
            Item {
                policy: policies::PURCHASES,
                identifier: "purchases:u".to_owned(),
            },
        ];
        let (keys, args) = call("p", &items, 1_000);
        assert_eq!(keys.len(), 3);
        assert_eq!(
            args,
            [
                "1000", "2", "tb", "2", "1000", "2", "sw", "5", "300000", "0"
            ]
        );
    }

    #[test]
    fn rejects_replies_of_the_wrong_shape() {
        let items = [Item {
            policy: policies::BURST,
            identifier: "burst:u".to_owned(),
        }];
        assert!(parse(&Reply::Int(1), &items).is_err());
        assert!(parse(&Reply::Array(vec![Reply::Int(1)]), &items).is_err());
        let ok = Reply::Array(vec![
            Reply::Int(1),
            Reply::Int(1),
            Reply::Int(1),
            Reply::Int(9),
        ]);
        let states = parse(&ok, &items).unwrap();
        assert!(states[0].allowed);
        assert_eq!(states[0].remaining, 1);
        assert_eq!(states[0].reset_ms, 9);
    }
}
