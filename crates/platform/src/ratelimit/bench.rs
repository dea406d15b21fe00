//! The limiter benchmark's core (feature `testing`): what the `stagepass
//! bench ratelimit` command reports, as a library function.
//!
//! Against an Upstash-compatible server (the shim over local Redis), with
//! the three policies of a money route for a basic user (`burst`, `money`,
//! `api`), it measures:
//!
//! - Redis round trips per allowed request (must be 1) and per request of
//!   a caller already refused (must be 0: the deny cache);
//! - latency of `decide` itself, allowed and refused;
//! - the latency a limited route adds over the same route unlimited, both
//!   served by axum on a local port and called over HTTP keep-alive.
//!
//! Numbers are only comparable within one run on one machine; compare with
//! `bench/ratelimit-js/bench.mjs` (the same check with `@upstash/ratelimit`)
//! run against the same server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use serde::Serialize;
use uuid::Uuid;

use super::policies::{AUTHENTICATED_API, BURST, MONEY_BASIC};
use super::{Identity, Policy, RateLimiter, layer};
use crate::auth::{AuthUser, Claims};
use crate::config::Secret;
use crate::upstash::Upstash;

/// The policies of a money route for a basic user.
pub const BENCH_POLICIES: &[Policy] = &[BURST, MONEY_BASIC, AUTHENTICATED_API];

/// What to run against.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The Upstash REST URL (e.g. the shim's `http://127.0.0.1:8079`).
    pub url: String,
    pub token: Secret,
    /// Measured requests per scenario (after a warm-up of a tenth of it).
    pub iterations: usize,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The report, printed as JSON by the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub policies: Vec<&'static str>,
    pub iterations: usize,
    /// Upstash requests per allowed request (three policies).
    pub round_trips_per_request: f64,
    /// Upstash requests per request of a caller already refused.
    pub round_trips_per_blocked_request: f64,
    /// `RateLimiter::decide`, allowed (one script call).
    pub decide_allowed: Latency,
    /// `RateLimiter::decide`, refused from the deny cache.
    pub decide_blocked: Latency,
    /// A route behind the limiter, over HTTP.
    pub limited_route: Latency,
    /// The same route without it.
    pub unlimited_route: Latency,
    /// `limited_route` minus `unlimited_route`, per percentile.
    pub added: Latency,
}

/// Runs every scenario once.
pub async fn bench_check(options: &BenchOptions) -> Result<BenchReport, String> {
    let client = Arc::new(Upstash::new(
        &options.url,
        &options.token,
        reqwest::Client::new(),
        Duration::from_secs(2),
    ));
    let limiter = Arc::new(
        RateLimiter::upstash(client.clone())
            .with_prefix(format!("bench:{}", Uuid::new_v4().simple())),
    );
    let n = options.iterations.max(10);

    // Warm-up: connections, script cache.
    decide_fresh_users(&limiter, n / 10).await?;
    let before = client.round_trips();
    let decide_allowed = decide_fresh_users(&limiter, n).await?;
    let round_trips_per_request = per_request(client.round_trips() - before, n);

    let (decide_blocked, blocked_trips) = decide_blocked_user(&limiter, &client, n).await?;
    let round_trips_per_blocked_request = per_request(blocked_trips, n);

    let (limited_route, unlimited_route) = route_latencies(limiter.clone(), n).await?;
    Ok(BenchReport {
        policies: BENCH_POLICIES.iter().map(|p| p.name).collect(),
        iterations: n,
        round_trips_per_request,
        round_trips_per_blocked_request,
        decide_allowed,
        decide_blocked,
        added: Latency {
            p50_ms: limited_route.p50_ms - unlimited_route.p50_ms,
            p99_ms: limited_route.p99_ms - unlimited_route.p99_ms,
        },
        limited_route,
        unlimited_route,
    })
}

fn per_request(trips: u64, n: usize) -> f64 {
    trips as f64 / n as f64
}

fn user(id: Uuid) -> Identity<'static> {
    Identity {
        user: Some(id),
        ..Identity::default()
    }
}

/// `n` decisions, each for a new user (so each is allowed).
async fn decide_fresh_users(limiter: &RateLimiter, n: usize) -> Result<Latency, String> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let d = limiter
            .decide(BENCH_POLICIES, &user(Uuid::new_v4()), limiter.now())
            .await
            .map_err(|e| format!("decide failed: {e}"))?;
        samples.push(started.elapsed());
        if !d.allowed {
            return Err("a fresh user was refused".to_owned());
        }
    }
    Ok(latency(samples))
}

/// One user exhausts `burst`, then `n` more decisions: latency and the
/// round trips those `n` caused.
async fn decide_blocked_user(
    limiter: &RateLimiter,
    client: &Upstash,
    n: usize,
) -> Result<(Latency, u64), String> {
    let id = user(Uuid::new_v4());
    let now = limiter.now();
    // burst allows 2 per second: the third is refused (and remembered).
    for _ in 0..3 {
        limiter
            .decide(BENCH_POLICIES, &id, now)
            .await
            .map_err(|e| format!("decide failed: {e}"))?;
    }
    let before = client.round_trips();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let d = limiter
            .decide(BENCH_POLICIES, &id, now)
            .await
            .map_err(|e| format!("decide failed: {e}"))?;
        samples.push(started.elapsed());
        if d.allowed {
            return Err("a blocked user was allowed".to_owned());
        }
    }
    Ok((latency(samples), client.round_trips() - before))
}

/// Alternates calls to a limited and an unlimited route, each for a new
/// user, over one keep-alive connection.
async fn route_latencies(
    limiter: Arc<RateLimiter>,
    n: usize,
) -> Result<(Latency, Latency), String> {
    let addr = serve(limiter).await?;
    let http = reqwest::Client::new();
    let call = |path: &'static str| {
        let http = http.clone();
        async move {
            let started = Instant::now();
            let response = http
                .get(format!("http://{addr}{path}"))
                .header("x-bench-user", Uuid::new_v4().to_string())
                .send()
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status();
            let _ = response.bytes().await;
            if !status.is_success() {
                return Err(format!("{path} answered {status}"));
            }
            Ok::<_, String>(started.elapsed())
        }
    };
    for _ in 0..n / 10 {
        call("/limited").await?;
        call("/unlimited").await?;
    }
    let (mut limited, mut unlimited) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        limited.push(call("/limited").await?);
        unlimited.push(call("/unlimited").await?);
    }
    Ok((latency(limited), latency(unlimited)))
}

/// The two routes on a random local port. The user comes from a header
/// (what the auth layer would have put into the extensions).
async fn serve(limiter: Arc<RateLimiter>) -> Result<SocketAddr, String> {
    let limited = Router::new()
        .route("/limited", get(|| async { "ok" }))
        .layer(layer(limiter, BENCH_POLICIES));
    let app = Router::new()
        .route("/unlimited", get(|| async { "ok" }))
        .merge(limited)
        .layer(axum::middleware::from_fn(bench_user));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // The leaf `local` server, not `serve::serve_local` (its one-line
        // wrapper): `ratelimit` does not depend on `serve` (ADR 0015).
        let _ = crate::local::serve(
            listener,
            app,
            std::future::pending(),
            crate::local::HEADER_READ_TIMEOUT,
        )
        .await;
    });
    Ok(addr)
}

async fn bench_user(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-bench-user")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Uuid>().ok());
    if let Some(sub) = id {
        req.extensions_mut().insert(AuthUser(Arc::new(Claims {
            sub,
            email: None,
            email_verified: false,
            app_role: None,
            session_id: None,
            exp: 0,
            raw: serde_json::Value::Null,
        })));
    }
    next.run(req).await
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort_unstable();
    Latency {
        p50_ms: percentile_ms(&samples, 50.0),
        p99_ms: percentile_ms(&samples, 99.0),
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&samples, 50.0), 50.0);
        assert_eq!(percentile_ms(&samples, 99.0), 99.0);
        assert_eq!(percentile_ms(&[], 99.0), 0.0);
    }
}
