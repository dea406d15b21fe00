//! Rate limiting over Upstash Redis: every limit of a request in one round
//! trip, callers already over a limit refused with none.
//!
//! - [`policy`]: policies are data ([`Policy`]: name, algorithm, key, fail mode).
//! - [`policies`]: the table of SPEC §4, route sets, and trust levels.
//! - [`RateLimiter::decide`]: one `EVALSHA` of `limit.lua` decides all the
//!   policies that apply to a request and consumes quota only if all allow;
//!   the deny cache (`cache.rs`) answers repeat offenders without Redis.
//! - Fail modes: when Upstash is unreachable or slower than its timeout, a
//!   request with any fail-closed policy gets 503 `rate_limiter_unavailable`
//!   (with `Retry-After`); one with only fail-open policies is allowed,
//!   logged and counted. Both are reported to Sentry at most once a minute.
//! - [`layer`]: the axum middleware applying a route's policies, with the
//!   `RateLimit-Policy` / `RateLimit` headers ([`headers`]).
//! - Signed callers (webhooks, the access-token hook, QStash, cron) are
//!   verified before any budget is charged: [`SignatureGate`] (ADR 0011).
//! - Without Upstash outside production, an in-process limiter with the
//!   same algorithms (`local.rs`) stands in, announced loudly once.

mod algorithm;
#[cfg(feature = "testing")]
pub mod bench;
mod cache;
pub mod headers;
mod layer;
mod local;
pub mod policies;
pub mod policy;
mod script;
mod signed;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

pub use cache::DEFAULT_CAPACITY as DEFAULT_DENY_CACHE_CAPACITY;
pub use headers::{ClientIpSource, client_ip};
pub use layer::{RateLimitLayer, RateLimitService, TrustSource, layer};
pub use policies::{SignedSource, TrustLevel, money_policy};
pub use policy::{Algorithm, FailMode, Identity, KeyKind, Policy};
pub use signed::SignatureGate;

use crate::config::{AppEnv, UpstashConfig};
use crate::http::ApiError;
use crate::time::Clock;
use crate::upstash::{Upstash, UpstashError};
use cache::{Blocked, DenyCache};
use local::LocalStore;

/// `@upstash/ratelimit`'s default prefix: keys are shared with JS services
/// using that library with default settings.
pub const DEFAULT_PREFIX: &str = "@upstash/ratelimit";
/// How long one Upstash call may take before the fail mode applies.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// `Retry-After` of a 503 when the limiter is unavailable.
pub const UNAVAILABLE_RETRY_AFTER_SECONDS: u64 = 5;
/// At most one Sentry report of limiter failures per this interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// One policy for one caller: the policy and `{policy name}:{subject}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Item {
    pub policy: Policy,
    pub identifier: String,
}

/// One policy's answer for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    pub policy: Policy,
    /// Whether this policy alone would allow the request.
    pub allowed: bool,
    /// Requests left (after this one, if it was let through).
    pub remaining: u32,
    /// When more quota becomes available (Unix milliseconds).
    pub reset_ms: i64,
}

impl LimitState {
    pub(crate) fn new(policy: Policy, allowed: bool, remaining: i64, reset_ms: i64) -> LimitState {
        LimitState {
            policy,
            allowed,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
            reset_ms,
        }
    }

    /// Whole seconds until `reset_ms`, rounded up, at least 1 when in the future.
    pub fn seconds_until_reset(&self, now_ms: i64) -> u64 {
        seconds_until(self.reset_ms, now_ms)
    }
}

fn seconds_until(at_ms: i64, now_ms: i64) -> u64 {
    let ms = at_ms.saturating_sub(now_ms).max(0);
    u64::try_from(ms.saturating_add(999) / 1000).unwrap_or(0)
}

/// How a decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// One script call to Upstash.
    Upstash,
    /// The deny cache: no round trip.
    DenyCache,
    /// The in-process limiter (development).
    Local,
    /// Upstash failed and every policy fails open.
    FailedOpen,
    /// No policy applied to this caller.
    NoPolicy,
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policies that applied to this caller (headers list these).
    pub policies: Vec<Policy>,
    /// Per-policy states; empty when failed open, only the blocking ones
    /// when answered from the deny cache.
    pub limits: Vec<LimitState>,
    pub via: Via,
    /// The time the decision was made for (Unix milliseconds).
    pub now_ms: i64,
}

impl Decision {
    /// The refusing policy that frees up last (the one to wait for).
    pub fn blocking(&self) -> Option<&LimitState> {
        self.limits
            .iter()
            .filter(|l| !l.allowed)
            .max_by_key(|l| l.reset_ms)
    }

    /// `Retry-After` of a refusal, in seconds (at least 1).
    pub fn retry_after_seconds(&self) -> Option<u64> {
        self.blocking()
            .map(|l| l.seconds_until_reset(self.now_ms).max(1))
    }

    /// The 429 of a refusal, naming the policy; `None` when allowed.
    pub fn error(&self) -> Option<ApiError> {
        if self.allowed {
            return None;
        }
        // A refusal always has a refusing state; should one ever be
        // missing, it is still a refusal, never a pass.
        let (policy, retry_after_seconds) = match self.blocking() {
            Some(b) => (b.policy.name, b.seconds_until_reset(self.now_ms).max(1)),
            None => (self.policies.first().map_or("rate_limit", |p| p.name), 1),
        };
        Some(ApiError::RateLimited {
            policy: policy.to_owned(),
            retry_after_seconds,
        })
    }
}

/// Counters for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub struct LimiterStats {
    /// Requests allowed because Upstash failed and their policies fail open.
    pub failed_open: AtomicU64,
    /// Requests refused with 503 because Upstash failed.
    pub failed_closed: AtomicU64,
    /// Requests refused from the deny cache (no round trip).
    pub cache_refusals: AtomicU64,
    /// Decisions that asked the store.
    pub store_calls: AtomicU64,
}

enum Backend {
    Upstash(Arc<Upstash>),
    Local(LocalStore),
    /// Production without Upstash (the config refuses this; defensive):
    /// behaves like an outage.
    Missing,
}

/// The limiter. Create one per process (it owns the deny cache) and share
/// it in an `Arc`.
pub struct RateLimiter {
    backend: Backend,
    prefix: String,
    deny_cache: DenyCache,
    clock: Clock,
    stats: LimiterStats,
    last_report: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Upstash(u) => format!("{u:?}"),
            Backend::Local(_) => "local".to_owned(),
            Backend::Missing => "missing".to_owned(),
        };
        f.debug_struct("RateLimiter")
            .field("backend", &backend)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Said once per process when the in-process limiter stands in.
static LOCAL_ANNOUNCED: AtomicBool = AtomicBool::new(false);

impl RateLimiter {
    fn with_backend(backend: Backend) -> RateLimiter {
        RateLimiter {
            backend,
            prefix: DEFAULT_PREFIX.to_owned(),
            deny_cache: DenyCache::new(cache::DEFAULT_CAPACITY),
            clock: Clock::system(),
            stats: LimiterStats::default(),
            last_report: Mutex::new(None),
        }
    }

    /// Limits kept in Upstash through `client`.
    pub fn upstash(client: Arc<Upstash>) -> RateLimiter {
        RateLimiter::with_backend(Backend::Upstash(client))
    }

    /// Limits kept in this process (development, tests).
    pub fn local() -> RateLimiter {
        RateLimiter::with_backend(Backend::Local(LocalStore::default()))
    }

    /// Upstash when configured; otherwise the in-process limiter outside
    /// production (announced loudly once) and, in production, a limiter
    /// that treats every request as an outage (fail modes apply).
    pub fn from_config(
        config: Option<&UpstashConfig>,
        app_env: AppEnv,
        http: reqwest::Client,
    ) -> RateLimiter {
        match config {
            Some(c) => RateLimiter::upstash(Arc::new(Upstash::new(
                c.rest_url.as_str(),
                &c.rest_token,
                http,
                DEFAULT_TIMEOUT,
            ))),
            None if app_env.is_production() => {
                tracing::error!(
                    "UPSTASH_REDIS_REST_URL is not set in production: rate limits fail"
                );
                RateLimiter::with_backend(Backend::Missing)
            }
            None => {
                if !LOCAL_ANNOUNCED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "RATE LIMITS ARE IN-PROCESS ONLY: UPSTASH_REDIS_REST_URL is not set. \
                         Fine for local development; production refuses to start like this."
                    );
                }
                RateLimiter::local()
            }
        }
    }

    /// Keys start with `prefix` instead of [`DEFAULT_PREFIX`] (tests use a
    /// random one so they do not share counters).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> RateLimiter {
        self.prefix = prefix.into();
        self
    }

    /// Time comes from `clock` (the layer asks it; tests move it).
    pub fn with_clock(mut self, clock: Clock) -> RateLimiter {
        self.clock = clock;
        self
    }

    pub fn with_deny_cache_capacity(mut self, capacity: usize) -> RateLimiter {
        self.deny_cache = DenyCache::new(capacity);
        self
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn stats(&self) -> &LimiterStats {
        &self.stats
    }

    /// Callers the deny cache currently remembers as over a limit.
    pub fn blocked_callers(&self) -> usize {
        self.deny_cache.len()
    }

    /// The Upstash client, if limits live there.
    pub fn upstash_client(&self) -> Option<&Arc<Upstash>> {
        match &self.backend {
            Backend::Upstash(u) => Some(u),
            _ => None,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Like [`RateLimiter::decide`], with a refusal as its 429 error: for
    /// handlers that check limits themselves and use `?`.
    pub async fn check(
        &self,
        policies: &[Policy],
        identity: &Identity<'_>,
        now: DateTime<Utc>,
    ) -> Result<Decision, ApiError> {
        let decision = self.decide(policies, identity, now).await?;
        match decision.error() {
            Some(e) => Err(e),
            None => Ok(decision),
        }
    }

    /// Decides every policy that applies to `identity` at `now`: from the
    /// deny cache with no round trip, else in one script call. `Err` only
    /// when the store failed and a policy fails closed (503).
    pub async fn decide(
        &self,
        policies: &[Policy],
        identity: &Identity<'_>,
        now: DateTime<Utc>,
    ) -> Result<Decision, ApiError> {
        let now_ms = now.timestamp_millis();
        let items = applicable(policies, identity);
        let applied: Vec<Policy> = items.iter().map(|i| i.policy).collect();
        if items.is_empty() {
            return Ok(allowed(applied, Vec::new(), Via::NoPolicy, now_ms));
        }
        if let Some(decision) = self.cached_refusal(&items, now_ms) {
            self.stats.cache_refusals.fetch_add(1, Ordering::Relaxed);
            return Ok(decision);
        }
        self.stats.store_calls.fetch_add(1, Ordering::Relaxed);
        let (result, via) = match &self.backend {
            Backend::Upstash(client) => {
                (self.ask_upstash(client, &items, now_ms).await, Via::Upstash)
            }
            Backend::Local(store) => (Ok(store.run(&self.prefix, &items, now_ms)), Via::Local),
            Backend::Missing => (
                Err(UpstashError::Unreachable("not configured".to_owned())),
                Via::Upstash,
            ),
        };
        match result {
            Ok(limits) => {
                self.remember_refusals(&items, &limits, now_ms);
                let all = limits.iter().all(|l| l.allowed);
                Ok(Decision {
                    allowed: all,
                    policies: applied,
                    limits,
                    via,
                    now_ms,
                })
            }
            Err(e) => self.failed(applied, &e, now_ms),
        }
    }

    async fn ask_upstash(
        &self,
        client: &Upstash,
        items: &[Item],
        now_ms: i64,
    ) -> Result<Vec<LimitState>, UpstashError> {
        let (keys, args) = script::call(&self.prefix, items, now_ms);
        let reply = client.evalsha(&script::LIMIT_SCRIPT, &keys, &args).await?;
        script::parse(&reply, items).map_err(UpstashError::Malformed)
    }

    /// A refusal from the deny cache if any policy still blocks this caller.
    fn cached_refusal(&self, items: &[Item], now_ms: i64) -> Option<Decision> {
        // An entry counts only for the very policy that refused: a user
        // promoted to a higher money limit is not held to the old one.
        let blocked: Vec<LimitState> = items
            .iter()
            .filter_map(|item| {
                self.deny_cache
                    .get(&item.identifier, now_ms)
                    .filter(|b| b.policy == item.policy)
            })
            .map(|b| LimitState::new(b.policy, false, 0, b.reset_ms))
            .collect();
        if blocked.is_empty() {
            return None;
        }
        Some(Decision {
            allowed: false,
            policies: items.iter().map(|i| i.policy).collect(),
            limits: blocked,
            via: Via::DenyCache,
            now_ms,
        })
    }

    /// Policies that refused are remembered until their reset.
    fn remember_refusals(&self, items: &[Item], limits: &[LimitState], now_ms: i64) {
        for (item, state) in items.iter().zip(limits) {
            if !state.allowed {
                let blocked = Blocked {
                    policy: state.policy,
                    reset_ms: state.reset_ms,
                };
                self.deny_cache.insert(&item.identifier, blocked, now_ms);
            }
        }
    }

    /// The store failed: fail closed if any policy says so, else open.
    fn failed(
        &self,
        applied: Vec<Policy>,
        e: &UpstashError,
        now_ms: i64,
    ) -> Result<Decision, ApiError> {
        let closed = applied.iter().any(|p| p.fail == FailMode::Closed);
        if closed {
            self.stats.failed_closed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "rate limiter unavailable: refusing (fail closed)");
            self.report(e, "closed");
            return Err(ApiError::LimiterUnavailable {
                retry_after_seconds: UNAVAILABLE_RETRY_AFTER_SECONDS,
            });
        }
        self.stats.failed_open.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "rate limiter unavailable: allowing (fail open)");
        self.report(e, "open");
        Ok(allowed(applied, Vec::new(), Via::FailedOpen, now_ms))
    }

    /// Tells Sentry, at most once per [`REPORT_INTERVAL`] per limiter.
    fn report(&self, e: &UpstashError, mode: &str) {
        let due = {
            let mut last = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= REPORT_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            sentry::capture_message(
                &format!("rate limiter unavailable (failing {mode}): {e}"),
                sentry::Level::Warning,
            );
        }
    }
}

fn allowed(policies: Vec<Policy>, limits: Vec<LimitState>, via: Via, now_ms: i64) -> Decision {
    Decision {
        allowed: true,
        policies,
        limits,
        via,
        now_ms,
    }
}

/// The policies whose key is known for `identity`, each once (a repeated
/// name would count the request twice against one counter).
pub(crate) fn applicable(policies: &[Policy], identity: &Identity<'_>) -> Vec<Item> {
    let mut items: Vec<Item> = Vec::with_capacity(policies.len());
    for policy in policies {
        let Some(subject) = identity.subject(policy.key) else {
            continue;
        };
        let identifier = format!("{}:{subject}", policy.name);
        if items.iter().all(|i| i.identifier != identifier) {
            items.push(Item {
                policy: *policy,
                identifier,
            });
        }
    }
    items
}

/// The policies of `policies` that apply to `identity` (for headers when no
/// decision could be made).
pub fn applicable_policies(policies: &[Policy], identity: &Identity<'_>) -> Vec<Policy> {
    applicable(policies, identity)
        .into_iter()
        .map(|i| i.policy)
        .collect()
}
