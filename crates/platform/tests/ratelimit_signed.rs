//! Signed routes verify before they are limited (ADR 0011): forged
//! requests are charged to their client IP's `unsigned` budget and never to
//! the source's; each source has its own budget. The limiter is on real
//! Redis through the shim; the routes' real verifiers are tested in
//! `stagepass-routes`' `signed_budgets.rs`.

mod ratelimit_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use http_body_util::BodyExt;
use ratelimit_support::{Shim, limiter};
use serde_json::Value;
use stagepass_platform::http::ApiError;
use stagepass_platform::ratelimit::policies::{
    QSTASH_CALLBACKS, STRIPE_EVENTS, SUPABASE_AUTH_HOOK, UNSIGNED, VERCEL_CRON,
};
use stagepass_platform::ratelimit::{RateLimiter, SignatureGate, SignedSource, layer};
use stagepass_platform::time::Clock;
use tower::ServiceExt as _;

const GOOD: &str = "the-one-good-signature";

/// A signed route's shape: verify (here: one exact header), admit, work.
async fn signed_handler(gate: SignatureGate, headers: HeaderMap) -> Result<&'static str, ApiError> {
    let verified = match headers.get("x-signature") {
        Some(v) if v == GOOD => Ok(()),
        _ => Err(ApiError::Unauthenticated("invalid_signature")),
    };
    gate.admit(verified).await?;
    Ok("done")
}

fn route(limiter: &Arc<RateLimiter>, source: SignedSource) -> Router {
    Router::new()
        .route("/signed", post(signed_handler))
        .layer(layer(limiter.clone(), &[]).signed(source))
}

/// A limiter whose clock sits at the start of a minute, so a sliding
/// window's edge never falls inside a test.
fn limiter_at_minute_start(shim: &Shim) -> Arc<RateLimiter> {
    let clock = Clock::system();
    let into_minute = clock.now().timestamp_millis().rem_euclid(60_000);
    clock.advance(chrono::Duration::milliseconds(60_000 - into_minute));
    Arc::new(limiter(shim.client()).with_clock(clock))
}

fn request(peer: &str, signature: Option<&str>) -> Request<Body> {
    let mut req = Request::post("/signed");
    if let Some(sig) = signature {
        req = req.header("x-signature", sig);
    }
    let mut req = req.body(Body::from("{}")).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    req
}

async fn send(app: &Router, req: Request<Body>) -> (Response, Value) {
    let response = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (Response::from_parts(parts, Body::empty()), json)
}

fn header<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

/// `r` of the named policy in a `RateLimit` header.
fn remaining(r: &Response, policy: &str) -> Option<u32> {
    let value = header(r, "ratelimit");
    let item = value
        .split(", ")
        .find(|i| i.starts_with(&format!("\"{policy}\";")))?;
    item.split(';')
        .find_map(|p| p.strip_prefix("r="))?
        .parse()
        .ok()
}

#[tokio::test]
async fn a_forged_flood_from_one_ip_is_401_then_429_and_leaves_stripes_budget_whole() {
    let shim = Shim::start().await;
    let limiter = limiter_at_minute_start(&shim);
    let app = route(&limiter, SignedSource::Stripe);
    let attacker = "198.51.100.66:4000";
    let mut statuses = Vec::new();
    for i in 0..1_000 {
        let signature = if i % 2 == 0 { None } else { Some("forged") };
        let (r, body) = send(&app, request(attacker, signature)).await;
        statuses.push(r.status());
        if r.status() == StatusCode::UNAUTHORIZED {
            assert_eq!(body["code"], "invalid_signature");
        } else {
            assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "request {i}");
            assert_eq!(body["policy"], "unsigned", "request {i}");
            assert!(r.headers().contains_key("retry-after"));
        }
        assert_eq!(header(&r, "ratelimit-policy"), r#""unsigned";q=20;w=60"#);
    }
    let quota = UNSIGNED.quota() as usize;
    assert!(
        statuses[..quota]
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED),
        "the first {quota} forgeries are 401: {:?}",
        &statuses[..quota]
    );
    assert!(
        statuses[quota..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "every later forgery is 429"
    );
    // The blocked IP costs no round trips: one store call per allowed
    // forgery and one for the first refusal; the rest are the deny cache's.
    let stats = limiter.stats();
    assert_eq!(stats.store_calls.load(Ordering::Relaxed), quota as u64 + 1);
    assert_eq!(
        stats.cache_refusals.load(Ordering::Relaxed),
        (1_000 - quota - 1) as u64
    );

    // Stripe, from the very same address (a shared NAT, say): allowed, and
    // its budget is whole — the flood never touched it.
    let (genuine, body) = send(&app, request(attacker, Some(GOOD))).await;
    assert_eq!(genuine.status(), StatusCode::OK, "{body}");
    assert_eq!(
        header(&genuine, "ratelimit-policy"),
        r#""stripe";q=1000;w=1"#
    );
    assert_eq!(
        remaining(&genuine, "stripe"),
        Some(STRIPE_EVENTS.quota() - 1),
        "{:?}",
        genuine.headers()
    );
    // ... in one more round trip.
    assert_eq!(stats.store_calls.load(Ordering::Relaxed), quota as u64 + 2);
}

#[tokio::test]
async fn a_forged_flood_from_many_ips_is_all_401_and_the_hook_keeps_its_budget() {
    let shim = Shim::start().await;
    let limiter = limiter_at_minute_start(&shim);
    let app = route(&limiter, SignedSource::SupabaseAuth);
    for i in 0..1_000u32 {
        let peer = format!("10.{}.{}.{}:443", i / 65_536, (i / 256) % 256, i % 256);
        let (r, body) = send(&app, request(&peer, Some("v1,forged"))).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{peer}: {body}");
        assert_eq!(remaining(&r, "unsigned"), Some(UNSIGNED.quota() - 1));
    }
    let (genuine, _) = send(&app, request("10.0.0.1:443", Some(GOOD))).await;
    assert_eq!(genuine.status(), StatusCode::OK);
    assert_eq!(
        remaining(&genuine, "supabase_auth"),
        Some(SUPABASE_AUTH_HOOK.quota() - 1)
    );
    assert_eq!(limiter.blocked_callers(), 0, "nobody is blocked");
}

#[tokio::test]
async fn each_signed_source_has_its_own_budget() {
    let shim = Shim::start().await;
    let limiter = limiter_at_minute_start(&shim);
    let cron = route(&limiter, SignedSource::VercelCron);
    let stripe = route(&limiter, SignedSource::Stripe);
    let qstash = route(&limiter, SignedSource::Qstash);
    let peer = "203.0.113.5:1000";
    // Spend cron's whole burst (signed, as a looping operator would).
    let burst = VERCEL_CRON.quota();
    for i in 0..burst {
        let (r, _) = send(&cron, request(peer, Some(GOOD))).await;
        assert_eq!(r.status(), StatusCode::OK, "cron call {i}");
    }
    let (over, body) = send(&cron, request(peer, Some(GOOD))).await;
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["policy"], "cron");
    // The others are untouched.
    let (r, _) = send(&stripe, request(peer, Some(GOOD))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(remaining(&r, "stripe"), Some(STRIPE_EVENTS.quota() - 1));
    let (r, _) = send(&qstash, request(peer, Some(GOOD))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(remaining(&r, "qstash"), Some(QSTASH_CALLBACKS.quota() - 1));
    // A cron request with a bad secret is still a 401 (its IP's budget),
    // not the exhausted cron budget's 429.
    let (r, body) = send(&cron, request(peer, Some("wrong"))).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn without_a_limiter_the_gate_only_passes_the_verdict_through() {
    let app = Router::new().route("/signed", post(signed_handler));
    let (r, _) = send(&app, request("198.51.100.1:1", Some(GOOD))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("ratelimit-policy").is_none());
    let (r, _) = send(&app, request("198.51.100.1:1", None)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
