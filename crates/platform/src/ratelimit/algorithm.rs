//! The arithmetic of both algorithms, in Rust, for the in-process limiter.
//! `limit.lua` is the same arithmetic for Redis; keep the two in step (the
//! test `local_and_redis_agree` in `tests/ratelimit.rs` runs both on the
//! same sequence of requests and compares every answer).

/// A sliding-window policy's view before this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlidingCheck {
    pub allowed: bool,
    /// The previous window's count, weighted.
    pub weighted: i64,
    /// What is left before this request.
    pub remaining: i64,
    pub reset_ms: i64,
}

/// The index of the fixed window `now_ms` falls into (part of the key).
pub(crate) fn window_index(now_ms: i64, window_ms: u64) -> i64 {
    now_ms.div_euclid(window_ms_i64(window_ms))
}

fn window_ms_i64(window_ms: u64) -> i64 {
    i64::try_from(window_ms).unwrap_or(i64::MAX).max(1)
}

/// `@upstash/ratelimit`'s slidingWindow decision. The weighting is done in
/// floating point exactly as the Lua (and the JS library) does it, so all
/// three agree to the request.
pub(crate) fn sliding(
    limit: u32,
    window_ms: u64,
    now_ms: i64,
    current: i64,
    previous: i64,
) -> SlidingCheck {
    let window = window_ms_i64(window_ms);
    let limit = i64::from(limit);
    let share_elapsed = now_ms.rem_euclid(window) as f64 / window as f64;
    let weighted = ((1.0 - share_elapsed) * previous as f64).floor() as i64;
    SlidingCheck {
        allowed: weighted + current < limit,
        weighted,
        remaining: limit - (weighted + current),
        reset_ms: (window_index(now_ms, window_ms) + 1) * window,
    }
}

/// How long a sliding-window counter lives: long enough to serve as the
/// next window's previous one.
pub(crate) fn sliding_ttl_ms(window_ms: u64) -> i64 {
    window_ms_i64(window_ms)
        .saturating_mul(2)
        .saturating_add(1000)
}

/// A token bucket's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bucket {
    pub refilled_at_ms: i64,
    pub tokens: i64,
}

/// A token-bucket policy's view before this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BucketCheck {
    pub allowed: bool,
    /// The bucket after refilling (what is written back if consumed).
    pub bucket: Bucket,
    pub reset_ms: i64,
}

/// `@upstash/ratelimit`'s tokenBucket decision: refills happen in whole
/// intervals since the last refill; a missing bucket is full. One
/// difference: a bucket found full starts its refill cycle at `now_ms`.
pub(crate) fn bucket(
    max: u32,
    interval_ms: u64,
    refill: u32,
    now_ms: i64,
    stored: Option<Bucket>,
) -> BucketCheck {
    let interval = window_ms_i64(interval_ms);
    let max = i64::from(max);
    let mut b = stored.unwrap_or(Bucket {
        refilled_at_ms: now_ms,
        tokens: max,
    });
    if now_ms >= b.refilled_at_ms.saturating_add(interval) {
        let refills = (now_ms - b.refilled_at_ms).div_euclid(interval);
        b.tokens = max.min(
            b.tokens
                .saturating_add(refills.saturating_mul(i64::from(refill))),
        );
        b.refilled_at_ms += refills * interval;
    }
    // A full bucket restarts its cycle now, as if its key had expired (see
    // limit.lua): answers then do not depend on when Redis expires keys.
    if b.tokens >= max {
        b = Bucket {
            refilled_at_ms: now_ms,
            tokens: max,
        };
    }
    BucketCheck {
        allowed: b.tokens > 0,
        bucket: b,
        reset_ms: b.refilled_at_ms.saturating_add(interval),
    }
}

/// How long a bucket lives after taking a token: until it would be full
/// again (then a missing bucket means the same).
pub(crate) fn bucket_ttl_ms(max: u32, interval_ms: u64, refill: u32, remaining: i64) -> i64 {
    let missing = i64::from(max) - remaining;
    let refill = i64::from(refill).max(1);
    let refills = (missing + refill - 1).div_euclid(refill);
    refills.saturating_mul(window_ms_i64(interval_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_window_weighs_by_what_is_left_of_it() {
        // 25 % into the window: 75 % of the previous 8 requests count (6).
        let c = sliding(10, 1000, 10_250, 3, 8);
        assert_eq!(c.weighted, 6);
        assert!(c.allowed);
        assert_eq!(c.remaining, 1);
        assert_eq!(c.reset_ms, 11_000);
        let full = sliding(10, 1000, 10_250, 4, 8);
        assert!(!full.allowed);
    }

    #[test]
    fn buckets_refill_in_whole_intervals() {
        let fresh = bucket(2, 1000, 2, 5_000, None);
        assert!(fresh.allowed);
        assert_eq!(fresh.bucket.tokens, 2);
        let empty = Bucket {
            refilled_at_ms: 5_000,
            tokens: 0,
        };
        let early = bucket(2, 1000, 2, 5_999, Some(empty));
        assert!(!early.allowed);
        assert_eq!(early.reset_ms, 6_000);
        let later = bucket(2, 1000, 2, 6_000, Some(empty));
        assert!(later.allowed);
        assert_eq!(later.bucket.refilled_at_ms, 6_000);
        // Found full again: the cycle restarts now (7 500, not 7 000).
        let one = Bucket {
            refilled_at_ms: 5_000,
            tokens: 1,
        };
        let full = bucket(2, 1000, 2, 7_500, Some(one));
        assert_eq!(
            full.bucket,
            Bucket {
                refilled_at_ms: 7_500,
                tokens: 2
            }
        );
        assert_eq!(full.reset_ms, 8_500);
        let partial = bucket(4, 1000, 1, 7_500, Some(one));
        assert_eq!(
            partial.bucket,
            Bucket {
                refilled_at_ms: 7_000,
                tokens: 3
            }
        );
        assert_eq!(bucket_ttl_ms(2, 1000, 2, 1), 1000);
        assert_eq!(bucket_ttl_ms(10, 1000, 3, 0), 4000);
    }
}
