//! The limits of SPEC §4, in one table, and the route sets built from them.
//!
//! | policy | limit | algorithm | key | fails |
//! |---|---|---|---|---|
//! | `burst` | 2 / s | token bucket (2 per 1 s, 2 max) | user | closed |
//! | `money` | basic 5, verified 15, trusted 30, vip 50 / min | sliding window | user | closed |
//! | `purchases` | 5 / 5 min | sliding window | user | closed |
//! | `payouts` | 3 / h | sliding window | user | closed |
//! | `api` | 300 / min | sliding window | user | open |
//! | `public` | 600 / min | sliding window | client IP | open |
//! | `unsigned` | 20 / min | sliding window | client IP | open |
//! | `stripe` | 100 / s, bursts of 1,000 | token bucket (100 per 1 s, 1,000 max) | source | open |
//! | `supabase_auth` | 200 / s, bursts of 2,000 | token bucket (200 per 1 s, 2,000 max) | source | open |
//! | `qstash` | 50 / s, bursts of 500 | token bucket (50 per 1 s, 500 max) | source | open |
//! | `cron` | 1 / s, bursts of 20 | token bucket (1 per 1 s, 20 max) | source | open |
//!
//! Money fails closed: a limiter outage must not open the door to a
//! spending spree. Reads and signed callers fail open: Stripe's events are
//! authenticated by signature and applied exactly once anyway, and refusing
//! them would only delay credits.
//!
//! Signed callers (webhooks, the access-token hook, QStash, cron) are
//! verified **before** any budget is charged ([`SignedSource`], ADR 0011):
//! a request whose signature fails costs the sender's IP one `unsigned`
//! request and is answered 401 (429 once that budget is spent); only a
//! verified request reaches its source's budget, so forged traffic can
//! never use up what Stripe or Supabase need. SPEC §4's "webhooks 10 / s
//! per source" is kept as "one budget per source", sized from each
//! source's real peak instead of one number (ADR 0011 has the arithmetic).
//!
//! Every trust level's money limit is named `money` and shares one counter,
//! so a user promoted mid-minute keeps what they already used.
//!
//! Daily spending limits are not here: they are enforced inside the
//! Postgres spend transaction, where they cannot be raced.

use super::policy::{Algorithm, FailMode, KeyKind, Policy};

const MINUTE_MS: u64 = 60_000;

/// 2 requests per second on every money route.
pub const BURST: Policy = Policy {
    name: "burst",
    algorithm: Algorithm::TokenBucket {
        refill: 2,
        interval_ms: 1_000,
        max: 2,
    },
    key: KeyKind::User,
    fail: FailMode::Closed,
};

/// Money operations (tip, enrol, call request, payout request) by trust level.
pub const MONEY_BASIC: Policy = money(5);
pub const MONEY_VERIFIED: Policy = money(15);
pub const MONEY_TRUSTED: Policy = money(30);
pub const MONEY_VIP: Policy = money(50);

const fn money(per_minute: u32) -> Policy {
    Policy {
        name: "money",
        algorithm: Algorithm::SlidingWindow {
            limit: per_minute,
            window_ms: MINUTE_MS,
        },
        key: KeyKind::User,
        fail: FailMode::Closed,
    }
}

/// Token purchases: 5 per 5 minutes.
pub const PURCHASES: Policy = Policy {
    name: "purchases",
    algorithm: Algorithm::SlidingWindow {
        limit: 5,
        window_ms: 5 * MINUTE_MS,
    },
    key: KeyKind::User,
    fail: FailMode::Closed,
};

/// Payout requests: 3 per hour.
pub const PAYOUT_REQUESTS: Policy = Policy {
    name: "payouts",
    algorithm: Algorithm::SlidingWindow {
        limit: 3,
        window_ms: 60 * MINUTE_MS,
    },
    key: KeyKind::User,
    fail: FailMode::Closed,
};

/// Any authenticated route: 300 per minute per user.
pub const AUTHENTICATED_API: Policy = Policy {
    name: "api",
    algorithm: Algorithm::SlidingWindow {
        limit: 300,
        window_ms: MINUTE_MS,
    },
    key: KeyKind::User,
    fail: FailMode::Open,
};

/// Public, unauthenticated routes: 600 per minute per client IP.
pub const PUBLIC: Policy = Policy {
    name: "public",
    algorithm: Algorithm::SlidingWindow {
        limit: 600,
        window_ms: MINUTE_MS,
    },
    key: KeyKind::ClientIp,
    fail: FailMode::Open,
};

/// Requests to a signed route whose signature did not verify: 20 per
/// minute per client IP. Small on purpose: a genuine caller never fails
/// verification, and a misconfigured one (a rotated secret) is fixed by its
/// operator, not by retrying faster.
pub const UNSIGNED: Policy = Policy {
    name: "unsigned",
    algorithm: Algorithm::SlidingWindow {
        limit: 20,
        window_ms: MINUTE_MS,
    },
    key: KeyKind::ClientIp,
    fail: FailMode::Open,
};

/// A verified source's budget: a token bucket refilled by `per_second`
/// every second, holding at most `burst`.
const fn signed(name: &'static str, per_second: u32, burst: u32) -> Policy {
    Policy {
        name,
        algorithm: Algorithm::TokenBucket {
            refill: per_second,
            interval_ms: 1_000,
            max: burst,
        },
        key: KeyKind::Source,
        fail: FailMode::Open,
    }
}

/// Verified Stripe events. Stripe's live API takes 100 requests/s per
/// account and 25/s per endpoint, so we create at most ~25 PaymentIntents a
/// second, each causing a handful of events: 100 / s sustained with a 1,000
/// burst (a backlog redelivered after an outage) is above any real peak and
/// only stops a leaked secret or a runaway replay.
pub const STRIPE_EVENTS: Policy = signed("stripe", 100, 1_000);
/// Verified access-token hook calls: one per sign-in and one per token
/// refresh (hourly per active session). 200 / s sustained is 720,000 token
/// issues an hour; the 2,000 burst absorbs a push-notification stampede of
/// sign-ins on top. A refusal here fails a user's sign-in, so it is sized
/// far above the product's expected load (ADR 0011).
pub const SUPABASE_AUTH_HOOK: Policy = signed("supabase_auth", 200, 2_000);
/// Verified QStash callbacks (class reminders): classes cluster on the hour,
/// so hundreds of reminders can fall due in the same second.
pub const QSTASH_CALLBACKS: Policy = signed("qstash", 50, 500);
/// Verified Agora notifications (channel events of paid calls): each call
/// causes a handful (joins, leaves, retries of each up to 3 times); 50 / s
/// with a 500 burst covers thousands of calls starting on the hour.
pub const AGORA_EVENTS: Policy = signed("agora", 50, 500);
/// Verified Vercel Cron calls: five jobs, at most one run a minute each,
/// plus an operator's manual runs.
pub const VERCEL_CRON: Policy = signed("cron", 1, 20);

/// Every policy of the table (documentation, tests).
pub const ALL: &[Policy] = &[
    BURST,
    MONEY_BASIC,
    MONEY_VERIFIED,
    MONEY_TRUSTED,
    MONEY_VIP,
    PURCHASES,
    PAYOUT_REQUESTS,
    AUTHENTICATED_API,
    PUBLIC,
    UNSIGNED,
    STRIPE_EVENTS,
    SUPABASE_AUTH_HOOK,
    QSTASH_CALLBACKS,
    AGORA_EVENTS,
    VERCEL_CRON,
];

/// Route sets. Money routes add [`money_policy`] for the caller's trust
/// level (see `RateLimitLayer::with_trust`), so all their limits are still
/// decided in one round trip.
pub mod routes {
    use super::*;

    /// Tip, enrol, call request: burst + API (+ money by trust).
    pub const MONEY: &[Policy] = &[BURST, AUTHENTICATED_API];
    /// Token purchases: burst + purchases + API.
    pub const PURCHASE: &[Policy] = &[BURST, PURCHASES, AUTHENTICATED_API];
    /// Payout requests: burst + payouts + API (+ money by trust).
    pub const PAYOUT_REQUEST: &[Policy] = &[BURST, PAYOUT_REQUESTS, AUTHENTICATED_API];
    /// Other authenticated routes.
    pub const AUTHENTICATED: &[Policy] = &[AUTHENTICATED_API];
    /// Public routes; also limits anonymous calls to routes with optional auth.
    pub const PUBLIC: &[Policy] = &[super::PUBLIC];
    /// Signed callers: their source's budget once verified, the client
    /// IP's `unsigned` budget otherwise (see [`SignedSource`]).
    pub const STRIPE: &[Policy] = &[STRIPE_EVENTS, UNSIGNED];
    pub const SUPABASE_AUTH: &[Policy] = &[SUPABASE_AUTH_HOOK, UNSIGNED];
    pub const QSTASH: &[Policy] = &[QSTASH_CALLBACKS, UNSIGNED];
    pub const AGORA: &[Policy] = &[AGORA_EVENTS, UNSIGNED];
    pub const CRON: &[Policy] = &[VERCEL_CRON, UNSIGNED];
}

/// A caller that proves itself with a signature or shared secret. Its
/// routes verify first and then charge one budget through
/// [`crate::ratelimit::SignatureGate`]: the source's own when the signature
/// holds, the client IP's [`UNSIGNED`] when it does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedSource {
    /// `Stripe-Signature` (HMAC-SHA256 over `t.body`).
    Stripe,
    /// Supabase Auth's access-token hook (Standard Webhooks).
    SupabaseAuth,
    /// QStash callbacks (`Upstash-Signature` JWT).
    Qstash,
    /// Vercel Cron (`Bearer $CRON_SECRET`).
    VercelCron,
    /// Agora's channel-event notifications (`Agora-Signature-V2`,
    /// HMAC-SHA256 over the body).
    Agora,
}

impl SignedSource {
    pub const ALL: [SignedSource; 5] = [
        SignedSource::Stripe,
        SignedSource::SupabaseAuth,
        SignedSource::Qstash,
        SignedSource::VercelCron,
        SignedSource::Agora,
    ];

    /// The source's name: the subject of its budget's key.
    pub const fn name(self) -> &'static str {
        match self {
            SignedSource::Stripe => "stripe",
            SignedSource::SupabaseAuth => "supabase-auth",
            SignedSource::Qstash => "qstash",
            SignedSource::VercelCron => "vercel-cron",
            SignedSource::Agora => "agora",
        }
    }

    /// The budget of verified requests from this source.
    pub const fn policy(self) -> Policy {
        match self {
            SignedSource::Stripe => STRIPE_EVENTS,
            SignedSource::SupabaseAuth => SUPABASE_AUTH_HOOK,
            SignedSource::Qstash => QSTASH_CALLBACKS,
            SignedSource::VercelCron => VERCEL_CRON,
            SignedSource::Agora => AGORA_EVENTS,
        }
    }

    /// Every policy a request from this source may be charged: its own
    /// and [`UNSIGNED`].
    pub const fn policies(self) -> &'static [Policy] {
        match self {
            SignedSource::Stripe => routes::STRIPE,
            SignedSource::SupabaseAuth => routes::SUPABASE_AUTH,
            SignedSource::Qstash => routes::QSTASH,
            SignedSource::VercelCron => routes::CRON,
            SignedSource::Agora => routes::AGORA,
        }
    }
}

/// How far a user is trusted with money. Derived in one place, the
/// database's `app.trust_level` (tested in crates/routes/tests/trust_levels.rs);
/// this is its answer, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrustLevel {
    Basic,
    Verified,
    Trusted,
    Vip,
}

impl TrustLevel {
    /// Parses `app.trust_level`'s answer; anything unknown is `basic`,
    /// the strictest.
    pub fn parse(level: &str) -> TrustLevel {
        match level {
            "vip" => TrustLevel::Vip,
            "trusted" => TrustLevel::Trusted,
            "verified" => TrustLevel::Verified,
            _ => TrustLevel::Basic,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TrustLevel::Basic => "basic",
            TrustLevel::Verified => "verified",
            TrustLevel::Trusted => "trusted",
            TrustLevel::Vip => "vip",
        }
    }
}

/// The money-operations limit for a trust level.
pub const fn money_policy(level: TrustLevel) -> Policy {
    match level {
        TrustLevel::Basic => MONEY_BASIC,
        TrustLevel::Verified => MONEY_VERIFIED,
        TrustLevel::Trusted => MONEY_TRUSTED,
        TrustLevel::Vip => MONEY_VIP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_limits_grow_with_trust() {
        let quotas: Vec<u32> = [
            TrustLevel::Basic,
            TrustLevel::Verified,
            TrustLevel::Trusted,
            TrustLevel::Vip,
        ]
        .into_iter()
        .map(|l| money_policy(l).quota())
        .collect();
        assert_eq!(quotas, [5, 15, 30, 50]);
        assert!(ALL.iter().all(|p| p.quota() > 0 && p.window_ms() > 0));
    }

    #[test]
    fn names_are_header_safe_and_distinct_except_money() {
        for p in ALL {
            assert!(p.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        let mut names: Vec<&str> = ALL.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            ALL.len() - 3,
            "only the money levels share a name"
        );
    }

    #[test]
    fn every_signed_source_has_its_own_budget_apart_from_forgeries() {
        let mut names: Vec<&str> = SignedSource::ALL.iter().map(|s| s.policy().name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            SignedSource::ALL.len(),
            "one counter per source"
        );
        for source in SignedSource::ALL {
            let own = source.policy();
            assert_eq!(own.key, KeyKind::Source, "{source:?}");
            assert_eq!(own.fail, FailMode::Open, "{source:?}");
            assert_eq!(source.policies(), &[own, UNSIGNED]);
            assert!(ALL.contains(&own), "{source:?} is in the table");
        }
        // Forgeries are counted per client IP, never per source.
        assert_eq!(UNSIGNED.key, KeyKind::ClientIp);
        // A login burst is never below Stripe's, nor Stripe's below SPEC §4.
        assert!(SUPABASE_AUTH_HOOK.quota() >= STRIPE_EVENTS.quota());
        assert!(STRIPE_EVENTS.quota() >= 10);
    }
}
