//! The limiter against real Redis through the Upstash shim: windows with
//! injected time, concurrency, all-or-nothing consumption, trust levels,
//! fail modes, the deny cache and round trips.

mod ratelimit_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ratelimit_support::{Shim, at, client, closed_port, limiter, new_user, user};
use stagepass_platform::config::AppEnv;
use stagepass_platform::http::ApiError;
use stagepass_platform::ratelimit::policies::{
    self, AUTHENTICATED_API, BURST, MONEY_BASIC, PUBLIC,
};
use stagepass_platform::ratelimit::{
    Algorithm, FailMode, Identity, KeyKind, Policy, RateLimiter, TrustLevel, Via, money_policy,
};
use stagepass_platform::upstash::{Command, Reply};

const FIVE_PER_MINUTE: Policy = Policy {
    name: "five",
    algorithm: Algorithm::SlidingWindow {
        limit: 5,
        window_ms: 60_000,
    },
    key: KeyKind::User,
    fail: FailMode::Closed,
};

#[tokio::test]
async fn three_policies_cost_one_round_trip() {
    let shim = Shim::start().await;
    let client = shim.client();
    let limiter = limiter(client.clone());
    let policies = [BURST, MONEY_BASIC, AUTHENTICATED_API];
    // The first call may load the script (NOSCRIPT → EVAL).
    limiter.decide(&policies, &new_user(), at(0)).await.unwrap();

    let before = (client.round_trips(), shim.requests());
    let d = limiter.decide(&policies, &new_user(), at(0)).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.via, Via::Upstash);
    assert_eq!(client.round_trips() - before.0, 1);
    assert_eq!(shim.requests() - before.1, 1);
    let remaining: Vec<(&str, u32)> = d
        .limits
        .iter()
        .map(|l| (l.policy.name, l.remaining))
        .collect();
    assert_eq!(remaining, [("burst", 1), ("money", 4), ("api", 299)]);
}

#[tokio::test]
async fn sliding_window_edges_follow_the_weighted_previous_window() {
    let shim = Shim::start().await;
    let client = shim.client();
    let prefix = ratelimit_support::prefix();
    // A new limiter per call: another instance, so no deny cache answers.
    let ask = |ms: i64, u: Identity<'static>| {
        let limiter = RateLimiter::upstash(client.clone()).with_prefix(prefix.clone());
        async move {
            limiter
                .decide(&[FIVE_PER_MINUTE], &u, at(ms))
                .await
                .unwrap()
        }
    };
    let u = new_user();
    for i in 0..5 {
        let d = ask(i * 1000, u).await;
        assert!(d.allowed, "request {i}");
        assert_eq!(d.limits[0].remaining, 4 - u32::try_from(i).unwrap());
        assert_eq!(d.limits[0].reset_ms, at(60_000).timestamp_millis());
    }
    // Last millisecond of the window: still full.
    let d = ask(59_999, u).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after_seconds(), Some(1));
    // New window, 0 % elapsed: the previous 5 weigh fully.
    assert!(!ask(60_000, u).await.allowed);
    // 20 % in: floor(0.8 × 5) = 4 count, so one more fits.
    let d = ask(72_000, u).await;
    assert!(d.allowed);
    assert_eq!(d.limits[0].remaining, 0);
    assert!(!ask(72_000, u).await.allowed);
    // 50 % in: floor(0.5 × 5) = 2, plus this window's 1: two more fit.
    assert_eq!(ask(90_000, u).await.limits[0].remaining, 1);
    assert_eq!(ask(90_000, u).await.limits[0].remaining, 0);
    assert!(!ask(90_000, u).await.allowed);
    // Next window: the 3 of the last one weigh fully at 0 %.
    assert!(ask(120_000, u).await.allowed);
    assert!(ask(120_000, u).await.allowed);
    assert!(!ask(120_000, u).await.allowed);
    // Two windows later nothing counts.
    let d = ask(240_000, u).await;
    assert!(d.allowed);
    assert_eq!(d.limits[0].remaining, 4);
}

#[tokio::test]
async fn the_deny_cache_holds_a_sliding_refusal_until_the_window_ends() {
    // Like @upstash/ratelimit's ephemeral cache: conservative, since the
    // weighted previous window would free a unit earlier.
    let shim = Shim::start().await;
    let limiter = limiter(shim.client());
    let u = new_user();
    for i in 0..5 {
        assert!(
            limiter
                .decide(&[FIVE_PER_MINUTE], &u, at(i))
                .await
                .unwrap()
                .allowed
        );
    }
    let refused = limiter
        .decide(&[FIVE_PER_MINUTE], &u, at(30_000))
        .await
        .unwrap();
    assert_eq!(refused.via, Via::Upstash);
    assert_eq!(refused.retry_after_seconds(), Some(30));
    let cached = limiter
        .decide(&[FIVE_PER_MINUTE], &u, at(59_999))
        .await
        .unwrap();
    assert_eq!(cached.via, Via::DenyCache);
    assert_eq!(cached.retry_after_seconds(), Some(1));
    let asked = limiter
        .decide(&[FIVE_PER_MINUTE], &u, at(60_000))
        .await
        .unwrap();
    assert_eq!(asked.via, Via::Upstash);
}

#[tokio::test]
async fn concurrent_requests_let_exactly_the_limit_through() {
    let shim = Shim::start().await;
    let client = shim.client();
    let limiter = Arc::new(limiter(client.clone()));
    let id = uuid::Uuid::new_v4();
    let ten = Policy {
        algorithm: Algorithm::SlidingWindow {
            limit: 10,
            window_ms: 60_000,
        },
        ..FIVE_PER_MINUTE
    };
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.decide(&[ten], &user(id), at(1_000)).await })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        if t.await.unwrap().unwrap().allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 10);
    let key = format!(
        "{}:five:{id}:{}",
        limiter.prefix(),
        at(1_000).timestamp_millis() / 60_000
    );
    let stored = client
        .command(&Command::new("GET").arg(&key))
        .await
        .unwrap();
    assert_eq!(stored, Reply::Text("10".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_across_instances_let_exactly_the_limit_through() {
    // Two limiters = two function instances: no shared deny cache.
    let shim = Shim::start().await;
    let prefix = ratelimit_support::prefix();
    let a = Arc::new(RateLimiter::upstash(shim.client()).with_prefix(prefix.clone()));
    let b = Arc::new(RateLimiter::upstash(shim.client()).with_prefix(prefix));
    let id = uuid::Uuid::new_v4();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { limiter.decide(&[FIVE_PER_MINUTE], &user(id), at(0)).await })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap().unwrap().allowed);
    }
    assert_eq!(allowed, 5);
}

#[tokio::test]
async fn a_refused_request_consumes_no_other_quota() {
    let shim = Shim::start().await;
    let limiter = limiter(shim.client());
    let u = new_user();
    let both = [BURST, MONEY_BASIC];
    // Burst allows 2 per second: the third is refused by burst alone…
    assert!(limiter.decide(&both, &u, at(0)).await.unwrap().allowed);
    assert!(limiter.decide(&both, &u, at(10)).await.unwrap().allowed);
    let refused = limiter.decide(&both, &u, at(20)).await.unwrap();
    assert!(!refused.allowed);
    let states: Vec<(&str, bool, u32)> = refused
        .limits
        .iter()
        .map(|l| (l.policy.name, l.allowed, l.remaining))
        .collect();
    assert_eq!(states, [("burst", false, 0), ("money", true, 3)]);
    assert_eq!(refused.error().unwrap().to_string(), "rate limited");
    // …and did not spend a money unit: 3 are left a second later.
    let d = limiter.decide(&both, &u, at(1_000)).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.limits[1].remaining, 2);
    // Use up money; then money refuses while burst has tokens…
    assert!(limiter.decide(&both, &u, at(2_000)).await.unwrap().allowed);
    assert!(limiter.decide(&both, &u, at(3_000)).await.unwrap().allowed);
    let money_out = limiter.decide(&both, &u, at(4_000)).await.unwrap();
    assert!(!money_out.allowed);
    assert_eq!(money_out.blocking().unwrap().policy.name, "money");
    // …and burst was not charged for it: both tokens are still there.
    let burst_only = limiter.decide(&[BURST], &u, at(4_001)).await.unwrap();
    assert_eq!(burst_only.limits[0].remaining, 1);
}

#[tokio::test]
async fn trust_levels_have_their_own_money_limits() {
    let shim = Shim::start().await;
    let limiter = limiter(shim.client());
    for (level, expected) in [
        (TrustLevel::Basic, 5),
        (TrustLevel::Verified, 15),
        (TrustLevel::Trusted, 30),
        (TrustLevel::Vip, 50),
    ] {
        let u = new_user();
        let mut allowed = 0;
        for i in 0..60 {
            allowed += usize::from(
                limiter
                    .decide(&[money_policy(level)], &u, at(i))
                    .await
                    .unwrap()
                    .allowed,
            );
        }
        assert_eq!(allowed, expected, "{level:?}");
    }
}

#[tokio::test]
async fn an_upgrade_applies_at_once_and_a_chargeback_downgrade_too() {
    let shim = Shim::start().await;
    let limiter = limiter(shim.client());
    let u = new_user();
    let basic = [money_policy(TrustLevel::Basic)];
    for i in 0..5 {
        assert!(limiter.decide(&basic, &u, at(i)).await.unwrap().allowed);
    }
    assert!(!limiter.decide(&basic, &u, at(10)).await.unwrap().allowed);
    // Verified now: the same counter (5 used) against 15, despite the deny
    // cache remembering the basic refusal.
    let verified = [money_policy(TrustLevel::Verified)];
    let d = limiter.decide(&verified, &u, at(20)).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.limits[0].remaining, 9);
    for i in 0..9 {
        assert!(
            limiter
                .decide(&verified, &u, at(30 + i))
                .await
                .unwrap()
                .allowed
        );
    }
    // A chargeback drops them to basic: refused at once.
    let d = limiter.decide(&basic, &u, at(100)).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.error().unwrap().to_string(), "rate limited");
}

#[tokio::test]
async fn a_blocked_caller_costs_zero_round_trips() {
    let shim = Shim::start().await;
    let client = shim.client();
    let limiter = limiter(client.clone());
    let u = new_user();
    let policies = [BURST, MONEY_BASIC, AUTHENTICATED_API];
    for i in 0..3 {
        limiter.decide(&policies, &u, at(i)).await.unwrap();
    }
    assert_eq!(limiter.blocked_callers(), 1);
    let before = (client.round_trips(), shim.requests());
    for i in 0..20 {
        let d = limiter.decide(&policies, &u, at(10 + i)).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.via, Via::DenyCache);
        assert_eq!(d.blocking().unwrap().policy.name, "burst");
    }
    assert_eq!(client.round_trips(), before.0);
    assert_eq!(shim.requests(), before.1, "nothing reached the server");
    // Another caller is not affected; after the reset the store is asked again.
    assert!(
        limiter
            .decide(&policies, &new_user(), at(30))
            .await
            .unwrap()
            .allowed
    );
    let after_reset = limiter.decide(&policies, &u, at(1_000)).await.unwrap();
    assert_eq!(after_reset.via, Via::Upstash);
    assert!(after_reset.allowed);
}

#[tokio::test]
async fn upstash_down_fails_closed_for_money_and_open_for_reads() {
    let down = client(
        &format!("http://{}", closed_port().await),
        "t",
        Duration::from_secs(1),
    );
    let limiter = limiter(down);
    let u = new_user();

    let err = limiter
        .decide(&[BURST, AUTHENTICATED_API], &u, at(0))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::LimiterUnavailable { .. }));
    assert_eq!(err.status(), 503);

    let d = limiter
        .decide(&[AUTHENTICATED_API], &u, at(0))
        .await
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.via, Via::FailedOpen);
    let anonymous = Identity {
        ip: Some("203.0.113.5".parse().unwrap()),
        ..Identity::default()
    };
    assert!(
        limiter
            .decide(&[PUBLIC], &anonymous, at(0))
            .await
            .unwrap()
            .allowed
    );

    let stats = limiter.stats();
    assert_eq!(
        stats
            .failed_closed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats.failed_open.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn a_slow_upstash_counts_as_down_after_the_timeout() {
    let app = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        "too late"
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let slow = client(&format!("http://{addr}"), "t", Duration::from_millis(200));
    let limiter = limiter(slow);

    let started = Instant::now();
    let err = limiter
        .decide(&[MONEY_BASIC], &new_user(), at(0))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(err.code(), "rate_limiter_unavailable");
    let open = limiter
        .decide(&[AUTHENTICATED_API], &new_user(), at(0))
        .await
        .unwrap();
    assert_eq!(open.via, Via::FailedOpen);
}

#[tokio::test]
async fn keys_are_those_of_upstash_ratelimit() {
    let shim = Shim::start().await;
    let client = shim.client();
    let limiter = limiter(client.clone());
    let id = uuid::Uuid::new_v4();
    limiter
        .decide(&[MONEY_BASIC, BURST], &user(id), at(61_000))
        .await
        .unwrap();
    let p = limiter.prefix();
    let window = at(61_000).timestamp_millis() / 60_000;
    let counter = client
        .command(&Command::new("GET").arg(format!("{p}:money:{id}:{window}")))
        .await
        .unwrap();
    assert_eq!(counter, Reply::Text("1".to_owned()));
    let ttl = client
        .command(&Command::new("PTTL").arg(format!("{p}:money:{id}:{window}")))
        .await
        .unwrap();
    assert!(
        ttl.as_int().unwrap() > 120_000,
        "2 windows + 1 s, like the JS library"
    );
    let bucket = client
        .command(&Command::new("HGETALL").arg(format!("{p}:burst:{id}")))
        .await
        .unwrap();
    let refilled_at = at(61_000).timestamp_millis().to_string();
    assert_eq!(
        bucket,
        Reply::Array(vec![
            Reply::Text("refilledAt".to_owned()),
            Reply::Text(refilled_at),
            Reply::Text("tokens".to_owned()),
            Reply::Text("1".to_owned()),
        ])
    );
}

/// A small deterministic generator (no extra dependency for one test).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test]
async fn local_and_redis_agree() {
    let shim = Shim::start().await;
    let redis = limiter(shim.client());
    let local = RateLimiter::local().with_prefix(redis.prefix().to_owned());
    let seed = std::env::var("RATELIMIT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_260_101);
    let mut rng = Lcg(seed);
    let users = [new_user(), new_user()];
    let sets: [&[Policy]; 3] = [
        &[BURST, MONEY_BASIC],
        &[MONEY_BASIC],
        &[BURST, FIVE_PER_MINUTE, MONEY_BASIC],
    ];
    let mut now = 0;
    let mut outcomes = [0_u32; 2];
    for step in 0..300 {
        now += i64::try_from(rng.next(2_500)).unwrap();
        let u = &users[usize::try_from(rng.next(2)).unwrap()];
        let set = sets[usize::try_from(rng.next(3)).unwrap()];
        let a = redis.decide(set, u, at(now)).await.unwrap();
        let b = local.decide(set, u, at(now)).await.unwrap();
        assert_eq!(
            (a.allowed, &a.limits),
            (b.allowed, &b.limits),
            "step {step} at {now} ms (seed {seed})"
        );
        outcomes[usize::from(a.allowed)] += 1;
    }
    assert!(
        outcomes.iter().all(|&n| n > 20),
        "both outcomes exercised: {outcomes:?}"
    );
}

#[tokio::test]
async fn without_upstash_development_uses_the_local_limiter() {
    let limiter = RateLimiter::from_config(None, AppEnv::Development, reqwest::Client::new());
    let u = new_user();
    let d = limiter.decide(&[BURST], &u, at(0)).await.unwrap();
    assert_eq!(d.via, Via::Local);
    assert!(limiter.decide(&[BURST], &u, at(1)).await.unwrap().allowed);
    assert!(!limiter.decide(&[BURST], &u, at(2)).await.unwrap().allowed);

    // Production without Upstash (the config refuses it; defensively): fail modes apply.
    let prod = RateLimiter::from_config(None, AppEnv::Production, reqwest::Client::new());
    assert!(prod.decide(&[BURST], &u, at(0)).await.is_err());
    assert!(
        prod.decide(&[AUTHENTICATED_API], &u, at(0))
            .await
            .unwrap()
            .allowed
    );
}

#[tokio::test]
async fn policies_without_a_known_key_do_not_apply() {
    let shim = Shim::start().await;
    let client = shim.client();
    let limiter = limiter(client.clone());
    let before = client.round_trips();
    let d = limiter
        .decide(policies::routes::MONEY, &Identity::default(), at(0))
        .await
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.via, Via::NoPolicy);
    assert_eq!(client.round_trips(), before);
}

#[tokio::test]
async fn check_turns_a_refusal_into_a_429_naming_the_policy() {
    let shim = Shim::start().await;
    let limiter = limiter(shim.client());
    let u = new_user();
    limiter.check(&[BURST], &u, at(0)).await.unwrap();
    limiter.check(&[BURST], &u, at(0)).await.unwrap();
    match limiter.check(&[BURST], &u, at(400)).await {
        Err(ApiError::RateLimited {
            policy,
            retry_after_seconds,
        }) => {
            assert_eq!(policy, "burst");
            assert_eq!(retry_after_seconds, 1);
        }
        other => panic!("expected a 429, got {other:?}"),
    }
}
