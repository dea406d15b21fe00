//! Feature flags (issue 15, ADR 0016): evaluated in process from a cache
//! that each function refreshes at most every few seconds.
//!
//! - [`bucket`] and [`FlagRule::is_on_for`]: the rule, identical to the SQL
//!   `app.flag_bucket` / `app.flag_evaluate` of migration 18 (a test compares
//!   them over many ids).
//! - [`FlagCache`]: the process's copy of every flag's rule. Fresh for
//!   `FLAGS_CACHE_SECONDS` (default 5, 1–30) by the process [`Clock`]; then
//!   the next request reloads it (one round trip, one request at a time).
//!   When the database cannot be reached the last copy is kept for
//!   `FLAGS_STALE_GRACE_SECONDS` more (default 60, 0–600), then every flag
//!   is off (fail safe: a flag turns *new* behaviour on).
//! - [`Feature`]: the gate, an extractor that answers 403
//!   `feature_disabled` when the flag is off for the caller.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use axum::extract::{FromRef, FromRequestParts};
use chrono::{DateTime, Duration, Utc};
use futures_util::future::BoxFuture;
use http::request::Parts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::{AuthUser, Verifier};
use crate::config::Loader;
use crate::http::{ApiError, FieldError};
use crate::time::Clock;

/// The problem code of a gated route whose flag is off for the caller (403).
pub const FEATURE_DISABLED: &str = crate::http::codes::FEATURE_DISABLED;
/// Buckets per flag: a rollout is given in basis points (500 = 5 %).
pub const BUCKETS: u32 = 10_000;
/// Most user ids on an allow or deny list.
pub const MAX_LIST_USERS: usize = 1000;
/// Longest reason and description, in characters.
pub const MAX_TEXT_CHARS: usize = 500;
/// The roles a flag may be limited to.
pub const ROLES: [&str; 3] = ["fan", "creator", "admin"];

/// The bucket (0–9,999) of `user` for flag `key`: the first four bytes of
/// `sha256("<key>:<user>")` (the UUID lower-case and hyphenated, as
/// Postgres prints it) as a big-endian integer, modulo 10,000. Independent
/// of the rollout, so raising a percentage only adds users.
pub fn bucket(key: &str, user: Uuid) -> u32 {
    let mut hash = Sha256::new();
    hash.update(key.as_bytes());
    hash.update(b":");
    hash.update(
        user.hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    let digest = hash.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % BUCKETS
}

/// [`valid_key`] as a JSON-Schema pattern (the OpenAPI document's).
pub const KEY_PATTERN: &str = "^[a-z][a-z0-9_]{1,39}$";
/// [`KEY_PATTERN`] in words, for the problems that refuse a key.
pub const KEY_RULE: &str = "2–40 characters of a-z, 0-9 and _, starting with a letter";
/// [`valid_text`] in words, for a refused reason or description.
pub const TEXT_RULE: &str = "1–500 characters, not blank, no control characters";

/// Whether `key` is a flag key: 2–40 of `a-z`, `0-9`, `_`, starting with a letter.
pub fn valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    (2..=40).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// A reason or description: 1–500 characters, not blank, no control
/// character at all (the same rule as a token grant's reason and the
/// table's check).
pub fn valid_text(text: &str) -> bool {
    !text.trim().is_empty()
        && text.chars().count() <= MAX_TEXT_CHARS
        && !text
            .chars()
            .any(|c| c.is_control() || crate::http::text::is_forbidden(c))
}

/// One flag's rule, as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct FlagRule {
    pub key: String,
    pub enabled: bool,
    pub rollout_basis_points: i32,
    pub allow_users: Vec<Uuid>,
    pub deny_users: Vec<Uuid>,
    pub roles: Vec<String>,
}

impl FlagRule {
    /// The rule (ADR 0016), first match wins: disabled → off (the allow list
    /// does not override the kill switch); denied → off; allowed → on; a
    /// role filter the user's role is not in (or no role known) → off;
    /// otherwise on when the user's bucket is below the rollout.
    pub fn is_on_for(&self, user: Uuid, role: Option<&str>) -> bool {
        self.decide(user, role, |list, u| list.contains(u))
    }

    /// [`FlagRule::is_on_for`] with the list lookup given (a binary search
    /// once [`FlagSet`] has sorted the lists).
    fn decide(
        &self,
        user: Uuid,
        role: Option<&str>,
        listed: impl Fn(&[Uuid], &Uuid) -> bool,
    ) -> bool {
        if !self.enabled || listed(&self.deny_users, &user) {
            return false;
        }
        if listed(&self.allow_users, &user) {
            return true;
        }
        if !self.roles.is_empty() && !role.is_some_and(|r| self.roles.iter().any(|x| x == r)) {
            return false;
        }
        i64::from(bucket(&self.key, user)) < i64::from(self.rollout_basis_points)
    }
}

/// Every flag's rule at one moment, sorted by key, each list sorted (so a
/// lookup is a binary search: 50 flags with 1,000-id lists cost
/// microseconds, not a linear scan per flag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagSet {
    rules: Vec<FlagRule>,
}

fn sorted_search(list: &[Uuid], user: &Uuid) -> bool {
    list.binary_search(user).is_ok()
}

impl FlagSet {
    pub fn new(mut rules: Vec<FlagRule>) -> FlagSet {
        rules.sort_by(|a, b| a.key.cmp(&b.key));
        for r in &mut rules {
            r.allow_users.sort_unstable();
            r.deny_users.sort_unstable();
        }
        FlagSet { rules }
    }

    /// Whether `key` is on for the user; an unknown flag is off.
    pub fn is_on(&self, key: &str, user: Uuid, role: Option<&str>) -> bool {
        self.rules
            .binary_search_by(|r| r.key.as_str().cmp(key))
            .is_ok_and(|i| self.rules[i].decide(user, role, sorted_search))
    }

    /// Every flag, on or off, for the user (what `GET /api/v1/me` serves).
    pub fn evaluate(&self, user: Uuid, role: Option<&str>) -> BTreeMap<String, bool> {
        self.rules
            .iter()
            .map(|r| (r.key.clone(), r.decide(user, role, sorted_search)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// `FLAGS_CACHE_SECONDS` and `FLAGS_STALE_GRACE_SECONDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagsConfig {
    /// How long a loaded copy is served before the next request reloads it:
    /// the bound on how long a flipped flag keeps its old value.
    pub cache_seconds: u32,
    /// How much longer the last copy is served while reloading fails.
    pub stale_grace_seconds: u32,
}

impl Default for FlagsConfig {
    fn default() -> Self {
        FlagsConfig {
            cache_seconds: 5,
            stale_grace_seconds: 60,
        }
    }
}

impl FlagsConfig {
    pub const CACHE_SECONDS: std::ops::RangeInclusive<u32> = 1..=30;
    pub const GRACE_SECONDS: std::ops::RangeInclusive<u32> = 0..=600;

    /// Both are optional; a value out of bounds is a configuration problem.
    pub fn load(l: &mut Loader) -> FlagsConfig {
        let d = FlagsConfig::default();
        let mut read =
            |name: &'static str, range: std::ops::RangeInclusive<u32>, default| match l.get(name) {
                None => default,
                Some(v) => match v.parse::<u32>() {
                    Ok(n) if range.contains(&n) => n,
                    _ => {
                        l.problem(
                            name,
                            format!(
                                "must be an integer from {} to {}",
                                range.start(),
                                range.end()
                            ),
                            "feature flag cache bounds (docs/adr/0016-feature-flags.md)",
                        );
                        default
                    }
                },
            };
        FlagsConfig {
            cache_seconds: read("FLAGS_CACHE_SECONDS", Self::CACHE_SECONDS, d.cache_seconds),
            stale_grace_seconds: read(
                "FLAGS_STALE_GRACE_SECONDS",
                Self::GRACE_SECONDS,
                d.stale_grace_seconds,
            ),
        }
    }
}

/// Where the cache loads rules from (the database; a fake in unit tests).
pub trait FlagSource: Send + Sync {
    fn load(&self) -> BoxFuture<'_, Result<Vec<FlagRule>, ApiError>>;
}

/// `app.flag_snapshot()` on the process's pool: one round trip (a cached
/// statement in session mode, one flight through a transaction pooler).
pub struct DbSource {
    pub pool: sqlx::PgPool,
}

const SNAPSHOT: &str = "select key, enabled, rollout_basis_points, allow_users, deny_users, roles \
     from app.flag_snapshot()";

impl FlagSource for DbSource {
    fn load(&self) -> BoxFuture<'_, Result<Vec<FlagRule>, ApiError>> {
        Box::pin(async move {
            Ok(sqlx::query_as::<_, FlagRule>(SNAPSHOT)
                .fetch_all(&self.pool)
                .await?)
        })
    }
}

/// After a failed reload, the next attempt waits this long (a request per
/// second at most pays for an unreachable database here).
const RETRY_AFTER_FAILURE: Duration = Duration::seconds(1);

struct Loaded {
    set: Arc<FlagSet>,
    /// When the load that produced `set` started (by the cache's clock).
    at: Option<DateTime<Utc>>,
}

/// The process's flags: one per function instance on Vercel and Lambda.
pub struct FlagCache {
    source: Box<dyn FlagSource>,
    clock: Clock,
    ttl: Duration,
    grace: Duration,
    current: RwLock<Loaded>,
    /// Held while reloading (one load at a time); the time of the last
    /// failed load.
    reload: tokio::sync::Mutex<Option<DateTime<Utc>>>,
    loads: std::sync::atomic::AtomicU64,
}

impl FlagCache {
    pub fn new(source: Box<dyn FlagSource>, clock: Clock, config: FlagsConfig) -> FlagCache {
        FlagCache {
            source,
            clock,
            ttl: Duration::seconds(i64::from(config.cache_seconds)),
            grace: Duration::seconds(i64::from(config.stale_grace_seconds)),
            current: RwLock::new(Loaded {
                set: Arc::new(FlagSet::default()),
                at: None,
            }),
            reload: tokio::sync::Mutex::new(None),
            loads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times the cache asked its source (tests and benchmarks:
    /// warm requests must not).
    pub fn loads(&self) -> u64 {
        self.loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The `(set, loaded at)` now held.
    fn held(&self) -> (Arc<FlagSet>, Option<DateTime<Utc>>) {
        let loaded = self.current.read().unwrap_or_else(|p| p.into_inner());
        (loaded.set.clone(), loaded.at)
    }

    /// `Some(age)` of a copy loaded at `at`, `None` when never loaded or
    /// loaded "in the future" (the system clock went back): not to be trusted.
    fn age(&self, at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Duration> {
        at.map(|at| now - at).filter(|age| *age >= Duration::zero())
    }

    /// The flags to evaluate a request with. Warm (loaded less than
    /// `FLAGS_CACHE_SECONDS` ago): a read of memory, no I/O. Otherwise
    /// reloads first; if that fails, the last copy while it is younger than
    /// the cache time plus the grace, else an empty set (every flag off).
    pub async fn flags(&self) -> Arc<FlagSet> {
        let (set, at) = self.held();
        if self.age(at, self.clock.now()).is_some_and(|a| a < self.ttl) {
            return set;
        }
        let mut last_failure = self.reload.lock().await;
        // Another request may have reloaded while this one waited.
        let now = self.clock.now();
        let (set, at) = self.held();
        if self.age(at, now).is_some_and(|a| a < self.ttl) {
            return set;
        }
        let backing_off =
            last_failure.is_some_and(|failed| now >= failed && now - failed < RETRY_AFTER_FAILURE);
        if !backing_off {
            self.loads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match self.source.load().await {
                Ok(rules) => {
                    let set = Arc::new(FlagSet::new(rules));
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = Loaded {
                        set: set.clone(),
                        at: Some(now),
                    };
                    *last_failure = None;
                    return set;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "feature flags could not be reloaded");
                    *last_failure = Some(now);
                }
            }
        }
        let now = self.clock.now();
        if self.age(at, now).is_some_and(|a| a < self.ttl + self.grace) {
            set
        } else {
            Arc::new(FlagSet::default())
        }
    }
}

/// Names a flag for the [`Feature`] gate: `struct Calls; impl FeatureKey
/// for Calls { const KEY: &'static str = "calls"; }`.
pub trait FeatureKey: Send + Sync + 'static {
    const KEY: &'static str;
}

/// The gate: extracts the signed-in caller (401 without a valid token) and
/// refuses with 403 `feature_disabled` when flag `K` is off for them. The
/// role is the token's `app_role` claim (set by the access-token hook at
/// sign-in), so the gate costs no database round trip on a warm function;
/// a flag is a rollout switch, never an authorization: the route still
/// checks permissions in SQL (ADR 0016).
pub struct Feature<K>(pub AuthUser, PhantomData<K>);

impl<K> Feature<K> {
    pub fn user(&self) -> &AuthUser {
        &self.0
    }
}

impl<S, K> FromRequestParts<S> for Feature<K>
where
    S: Send + Sync,
    K: FeatureKey,
    Arc<Verifier>: FromRef<S>,
    Arc<FlagCache>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        let cache = Arc::<FlagCache>::from_ref(state);
        let flags = cache.flags().await;
        if flags.is_on(K::KEY, user.id(), user.claims().app_role.as_deref()) {
            Ok(Feature(user, PhantomData))
        } else {
            Err(ApiError::Forbidden(FEATURE_DISABLED))
        }
    }
}

/// A flag's settable fields, as the admin routes and the CLI take them
/// (absent = unchanged; on creation, the default). Validated here once for
/// both; `app.apply_flag_change` checks the same again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlagFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_basis_points: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_users: Option<Vec<Uuid>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny_users: Option<Vec<Uuid>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
}

impl FlagFields {
    /// Every field error at once (empty: valid).
    pub fn errors(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut push = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.into(),
                message,
            })
        };
        if let Some(d) = &self.description
            && !valid_text(d)
        {
            push(
                "description",
                format!("1–{MAX_TEXT_CHARS} characters, not blank, no control characters"),
            );
        }
        if let Some(bp) = self.rollout_basis_points
            && !(0..=i64::from(BUCKETS)).contains(&bp)
        {
            push(
                "rollout_basis_points",
                format!("0–{BUCKETS} (basis points: 500 = 5 %)"),
            );
        }
        for (field, list) in [
            ("allow_users", &self.allow_users),
            ("deny_users", &self.deny_users),
        ] {
            if list.as_ref().is_some_and(|l| l.len() > MAX_LIST_USERS) {
                push(field, format!("at most {MAX_LIST_USERS} user ids"));
            }
        }
        if let Some(roles) = &self.roles
            && let Some(bad) = roles.iter().find(|r| !ROLES.contains(&r.as_str()))
        {
            push(
                "roles",
                format!("'{bad}' is not a role (fan, creator or admin)"),
            );
        }
        errors
    }

    pub fn is_empty(&self) -> bool {
        self == &FlagFields::default()
    }

    /// The `p_patch` of `app.apply_flag_change`.
    pub fn to_patch(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn rule(key: &str, bp: i32) -> FlagRule {
        FlagRule {
            key: key.into(),
            enabled: true,
            rollout_basis_points: bp,
            allow_users: vec![],
            deny_users: vec![],
            roles: vec![],
        }
    }

    fn ids(n: u128) -> impl Iterator<Item = Uuid> {
        (0..n).map(|i| Uuid::from_u128(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834 ^ (i * 7919)))
    }

    #[test]
    fn bucket_is_the_documented_hash() {
        // sha256("calls:00000000-0000-0000-0000-000000000001") starts 72326297
        // (checked with `psql`: 1915904663 % 10000).
        assert_eq!(bucket("calls", Uuid::from_u128(1)), 1_915_904_663 % 10_000);
        assert!(ids(5000).all(|u| bucket("x", u) < BUCKETS));
    }

    #[test]
    fn raising_the_rollout_keeps_everyone_who_was_in() {
        let mut five = rule("calls", 500);
        let users: Vec<Uuid> = ids(20_000).collect();
        let in_at_5: Vec<Uuid> = users
            .iter()
            .copied()
            .filter(|u| five.is_on_for(*u, None))
            .collect();
        five.rollout_basis_points = 2000;
        let in_at_20: Vec<Uuid> = users
            .iter()
            .copied()
            .filter(|u| five.is_on_for(*u, None))
            .collect();
        assert!(in_at_5.iter().all(|u| in_at_20.contains(u)));
        // Roughly 5 % and 20 % (the hash spreads users evenly).
        assert!((800..1200).contains(&in_at_5.len()), "{}", in_at_5.len());
        assert!((3600..4400).contains(&in_at_20.len()), "{}", in_at_20.len());
        // 0 is nobody, 10,000 is everybody.
        five.rollout_basis_points = 0;
        assert!(users.iter().all(|u| !five.is_on_for(*u, None)));
        five.rollout_basis_points = 10_000;
        assert!(users.iter().all(|u| five.is_on_for(*u, None)));
    }

    #[test]
    fn buckets_differ_between_flags() {
        let same = ids(1000)
            .filter(|u| bucket("calls", *u) == bucket("payouts", *u))
            .count();
        assert!(same < 10, "{same} of 1000 share a bucket");
    }

    #[test]
    fn deny_beats_allow_beats_roles_beats_percentage_and_disabled_beats_all() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let mut r = rule("calls", 10_000);
        r.roles = vec!["creator".into()];
        r.allow_users = vec![a, b];
        r.deny_users = vec![b];
        // Allowed: on whatever the role; allowed and denied: off.
        assert!(r.is_on_for(a, Some("fan")));
        assert!(r.is_on_for(a, None));
        assert!(!r.is_on_for(b, Some("creator")));
        // The role filter, then the percentage.
        assert!(r.is_on_for(c, Some("creator")));
        assert!(!r.is_on_for(c, Some("fan")));
        assert!(!r.is_on_for(c, None));
        r.rollout_basis_points = 0;
        assert!(!r.is_on_for(c, Some("creator")));
        assert!(
            r.is_on_for(a, Some("fan")),
            "the allow list ignores the rollout"
        );
        // Disabled: off for everyone, the allow list included.
        r.enabled = false;
        r.rollout_basis_points = 10_000;
        assert!(!r.is_on_for(a, Some("creator")));
        assert!(!r.is_on_for(c, Some("creator")));
    }

    #[test]
    fn a_set_answers_like_each_rule_with_unsorted_lists() {
        let users: Vec<Uuid> = ids(300).collect();
        let mut r = rule("calls", 5000);
        // Unsorted, as a hand-written row might hold them.
        r.allow_users = users[..100].iter().rev().copied().collect();
        r.deny_users = users[50..150].iter().rev().copied().collect();
        let set = FlagSet::new(vec![r.clone()]);
        for u in &users {
            for role in [None, Some("fan")] {
                assert_eq!(set.is_on("calls", *u, role), r.is_on_for(*u, role), "{u}");
            }
        }
        assert!(set.is_on("calls", users[0], None));
        assert!(!set.is_on("calls", users[60], None));
    }

    #[test]
    fn a_set_answers_unknown_flags_off() {
        let set = FlagSet::new(vec![rule("b", 10_000), rule("a", 0)]);
        let u = Uuid::from_u128(9);
        assert!(set.is_on("b", u, None));
        assert!(!set.is_on("a", u, None));
        assert!(!set.is_on("zzz", u, None));
        assert_eq!(
            set.evaluate(u, None).into_iter().collect::<Vec<_>>(),
            vec![("a".to_owned(), false), ("b".to_owned(), true)]
        );
    }

    #[test]
    fn keys_and_texts() {
        for k in ["calls", "payouts", "new_checkout_2", "ab"] {
            assert!(valid_key(k), "{k}");
        }
        for k in ["", "a", "Calls", "2fa", "_x", "a-b", "a b", &"a".repeat(41)] {
            assert!(!valid_key(k), "{k}");
        }
        assert!(valid_text("turn on for staff"));
        assert!(valid_text(&"é".repeat(500)));
        for t in [
            "",
            "  ",
            "two\nlines",
            "tab\there",
            "bidi\u{202E}",
            &"é".repeat(501),
        ] {
            assert!(!valid_text(t), "{t:?}");
        }
    }

    #[test]
    fn fields_report_every_error() {
        let f = FlagFields {
            description: Some(" ".into()),
            rollout_basis_points: Some(10_001),
            allow_users: Some(vec![Uuid::nil(); 1001]),
            roles: Some(vec!["fan".into(), "boss".into()]),
            ..FlagFields::default()
        };
        let fields: Vec<String> = f.errors().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "description",
                "rollout_basis_points",
                "allow_users",
                "roles"
            ]
        );
        assert!(FlagFields::default().is_empty());
        assert_eq!(
            FlagFields {
                enabled: Some(true),
                ..FlagFields::default()
            }
            .to_patch(),
            serde_json::json!({ "enabled": true })
        );
    }

    /// A source whose answer the test sets, counting loads.
    #[derive(Clone, Default)]
    struct Fake(Arc<FakeInner>);
    #[derive(Default)]
    struct FakeInner {
        rules: Mutex<Vec<FlagRule>>,
        down: AtomicBool,
    }

    impl FlagSource for Fake {
        fn load(&self) -> BoxFuture<'_, Result<Vec<FlagRule>, ApiError>> {
            Box::pin(async move {
                if self.0.down.load(Ordering::SeqCst) {
                    return Err(ApiError::Unavailable(
                        crate::http::codes::DATABASE_UNAVAILABLE,
                        "down".into(),
                    ));
                }
                Ok(self.0.rules.lock().unwrap().clone())
            })
        }
    }

    fn cache(fake: &Fake, clock: &Clock, cache_seconds: u32, grace: u32) -> FlagCache {
        FlagCache::new(
            Box::new(fake.clone()),
            clock.clone(),
            FlagsConfig {
                cache_seconds,
                stale_grace_seconds: grace,
            },
        )
    }

    #[tokio::test]
    async fn a_flip_is_seen_after_the_cache_time_and_not_before() {
        let fake = Fake::default();
        *fake.0.rules.lock().unwrap() = vec![rule("calls", 10_000)];
        let clock = Clock::system();
        let cache = cache(&fake, &clock, 5, 60);
        let u = Uuid::from_u128(5);
        assert!(cache.flags().await.is_on("calls", u, None));
        assert_eq!(cache.loads(), 1);

        // Turned off in the database: still on from memory, no load …
        fake.0.rules.lock().unwrap()[0].enabled = false;
        clock.advance(Duration::milliseconds(4900));
        for _ in 0..100 {
            assert!(cache.flags().await.is_on("calls", u, None));
        }
        assert_eq!(cache.loads(), 1, "warm requests never load");
        // … and off once the cache time has passed.
        clock.advance(Duration::milliseconds(100));
        assert!(!cache.flags().await.is_on("calls", u, None));
        assert_eq!(cache.loads(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_database_keeps_the_last_copy_for_the_grace_then_all_off() {
        let fake = Fake::default();
        *fake.0.rules.lock().unwrap() = vec![rule("calls", 10_000)];
        let clock = Clock::system();
        let cache = cache(&fake, &clock, 5, 60);
        let u = Uuid::from_u128(5);
        assert!(cache.flags().await.is_on("calls", u, None));

        fake.0.down.store(true, Ordering::SeqCst);
        clock.advance(Duration::seconds(6));
        assert!(cache.flags().await.is_on("calls", u, None), "last copy");
        assert_eq!(cache.loads(), 2);
        // Within a second of a failure, no new attempt.
        assert!(cache.flags().await.is_on("calls", u, None));
        assert_eq!(cache.loads(), 2);
        clock.advance(Duration::seconds(58)); // 64 s after the load: < 5 + 60
        assert!(cache.flags().await.is_on("calls", u, None));
        clock.advance(Duration::seconds(1)); // 65 s: the grace is over
        assert!(
            !cache.flags().await.is_on("calls", u, None),
            "fail safe: off"
        );

        // Back: the next attempt loads again.
        fake.0.down.store(false, Ordering::SeqCst);
        clock.advance(Duration::seconds(1));
        assert!(cache.flags().await.is_on("calls", u, None));
    }

    #[tokio::test]
    async fn never_loaded_and_unreachable_is_all_off() {
        let fake = Fake::default();
        fake.0.down.store(true, Ordering::SeqCst);
        let cache = cache(&fake, &Clock::system(), 5, 60);
        assert!(cache.flags().await.is_empty());
    }

    #[test]
    fn config_bounds() {
        let load = |pairs: &[(&str, &str)]| {
            let mut l = Loader::from_map(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let c = FlagsConfig::load(&mut l);
            (c, l.has_problems())
        };
        assert_eq!(load(&[]), (FlagsConfig::default(), false));
        assert_eq!(
            load(&[
                ("FLAGS_CACHE_SECONDS", "2"),
                ("FLAGS_STALE_GRACE_SECONDS", "0")
            ]),
            (
                FlagsConfig {
                    cache_seconds: 2,
                    stale_grace_seconds: 0
                },
                false
            )
        );
        for bad in ["0", "31", "-1", "five"] {
            assert!(load(&[("FLAGS_CACHE_SECONDS", bad)]).1, "{bad}");
        }
        assert!(load(&[("FLAGS_STALE_GRACE_SECONDS", "601")]).1);
    }

    /// The in-memory part of a warm request: the cache read and every
    /// flag's answer. Prints JSON; run in release for numbers:
    /// `cargo test --release -p stagepass-platform --lib flags::tests::bench -- --ignored --nocapture`
    #[tokio::test]
    #[ignore = "a benchmark: run with --ignored --nocapture"]
    async fn bench_warm_evaluation() {
        let fake = Fake::default();
        let mut report = serde_json::Map::new();
        for (flags, list) in [(2usize, 0usize), (20, 100), (50, 1000)] {
            *fake.0.rules.lock().unwrap() = (0..flags)
                .map(|i| FlagRule {
                    allow_users: ids(list as u128).collect(),
                    deny_users: ids(list as u128 / 10).collect(),
                    roles: vec!["fan".into(), "creator".into()],
                    ..rule(&format!("flag_{i:02}"), 500 * (i as i32 % 21))
                })
                .collect();
            let cache = cache(&fake, &Clock::system(), 30, 60);
            let user = Uuid::new_v4();
            let _ = cache.flags().await;
            let n: u32 = if cfg!(debug_assertions) {
                1000
            } else {
                100_000
            };
            let started = std::time::Instant::now();
            let mut on = 0usize;
            for _ in 0..n {
                let set = cache.flags().await;
                on += set
                    .evaluate(user, Some("fan"))
                    .values()
                    .filter(|v| **v)
                    .count();
            }
            let ns = started.elapsed().as_nanos() as f64 / f64::from(n);
            std::hint::black_box(on);
            report.insert(
                format!("{flags}_flags_{list}_allowed_ns_per_request"),
                serde_json::json!(ns.round()),
            );
        }
        report.insert(
            "profile".into(),
            serde_json::json!(if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }),
        );
        println!("{}", serde_json::Value::Object(report));
    }
}
