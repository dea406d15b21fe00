//! The rate-limit middleware on real routes (in process, `oneshot`), with
//! the limiter on real Redis through the shim.

mod ratelimit_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use ratelimit_support::{Shim, client, closed_port, limiter};
use serde_json::Value;
use stagepass_platform::auth::{AuthUser, Verifier};
use stagepass_platform::config::Secret;
use stagepass_platform::http::ApiError;
use stagepass_platform::ratelimit::policies::routes;
use stagepass_platform::ratelimit::{
    Algorithm, ClientIpSource, FailMode, KeyKind, Policy, RateLimiter, TrustLevel, TrustSource,
    layer,
};
use tower::ServiceExt as _;
use uuid::Uuid;

// Minted here rather than with `auth::testing` so these tests run without
// the `testing` feature.
const TEST_ISSUER: &str = "http://127.0.0.1:54321/auth/v1";
const TEST_JWT_SECRET: &str = "ratelimit-layer-test-secret-0123456789abcdef";

fn mint_hs256(secret: &str, issuer: &str, sub: Uuid, ttl_seconds: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "iss": issuer,
        "sub": sub.to_string(),
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + ttl_seconds,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn verifier(secret: &str) -> Arc<Verifier> {
    Arc::new(Verifier::with_parts(
        TEST_ISSUER.to_owned(),
        Some(Secret::from(secret.to_owned())),
        None,
        reqwest::Client::new(),
    ))
}

fn token(user: Uuid) -> String {
    mint_hs256(TEST_JWT_SECRET, TEST_ISSUER, user, 3600)
}

/// Trust levels from a table; unknown users are basic.
struct Levels(HashMap<Uuid, TrustLevel>);

impl TrustSource for Levels {
    fn trust_level(&self, user: Uuid) -> BoxFuture<'_, Result<TrustLevel, ApiError>> {
        let level = self.0.get(&user).copied().unwrap_or(TrustLevel::Basic);
        Box::pin(async move { Ok(level) })
    }
}

/// A money route: burst + api + money by trust. The handler's own
/// `AuthUser` uses a verifier that would refuse every token, so a 200
/// proves it reused the user the layer verified.
fn money_route(limiter: Arc<RateLimiter>, levels: Levels) -> Router {
    Router::new()
        .route(
            "/tip",
            get(|user: AuthUser| async move { user.id().to_string() }),
        )
        .with_state(verifier("a-different-secret-that-verifies-nothing-000"))
        .layer(
            layer(limiter, routes::MONEY)
                .with_verifier(verifier(TEST_JWT_SECRET))
                .with_trust(Arc::new(levels)),
        )
}

async fn send(app: &Router, req: Request<Body>) -> (Response, Value) {
    let response = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    (Response::from_parts(parts, Body::empty()), json)
}

fn get_as(path: &str, user: Uuid) -> Request<Body> {
    Request::get(path)
        .header("authorization", format!("Bearer {}", token(user)))
        .body(Body::empty())
        .unwrap()
}

fn header<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn limited_responses_carry_the_ratelimit_headers() {
    let shim = Shim::start().await;
    let user = Uuid::new_v4();
    let app = money_route(
        Arc::new(limiter(shim.client())),
        Levels(HashMap::from([(user, TrustLevel::Verified)])),
    );
    let (r, body) = send(&app, get_as("/tip", user)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body, Value::String(user.to_string()));
    assert_eq!(
        header(&r, "ratelimit-policy"),
        r#""burst";q=2;w=1, "api";q=300;w=60, "money";q=15;w=60"#
    );
    let limits = header(&r, "ratelimit");
    let items: Vec<&str> = limits.split(", ").collect();
    assert_eq!(items.len(), 3, "{limits}");
    assert!(items[0].starts_with(r#""burst";r=1;t="#), "{limits}");
    assert!(items[1].starts_with(r#""api";r=299;t="#), "{limits}");
    assert!(items[2].starts_with(r#""money";r=14;t="#), "{limits}");
}

#[tokio::test]
async fn a_refusal_is_a_429_problem_naming_the_policy() {
    let shim = Shim::start().await;
    let user = Uuid::new_v4();
    let app = money_route(Arc::new(limiter(shim.client())), Levels(HashMap::new()));
    assert_eq!(
        send(&app, get_as("/tip", user)).await.0.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&app, get_as("/tip", user)).await.0.status(),
        StatusCode::OK
    );
    let (r, body) = send(&app, get_as("/tip", user)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "content-type"), "application/problem+json");
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["policy"], "burst");
    assert_eq!(body["retry_after_seconds"], 1);
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(
        header(&r, "ratelimit-policy"),
        r#""burst";q=2;w=1, "api";q=300;w=60, "money";q=5;w=60"#
    );
    assert!(header(&r, "ratelimit").starts_with(r#""burst";r=0;t="#));
    // Another user is not affected.
    assert_eq!(
        send(&app, get_as("/tip", Uuid::new_v4())).await.0.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_invalid_token_is_refused_before_any_limit() {
    let shim = Shim::start().await;
    let client = shim.client();
    let app = money_route(Arc::new(limiter(client.clone())), Levels(HashMap::new()));
    let forged = mint_hs256(
        "another-secret-of-at-least-32-characters!",
        TEST_ISSUER,
        Uuid::new_v4(),
        3600,
    );
    let req = Request::get("/tip")
        .header("authorization", format!("Bearer {forged}"))
        .body(Body::empty())
        .unwrap();
    let (r, body) = send(&app, req).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "invalid_token");
    assert_eq!(client.round_trips(), 0);
}

#[tokio::test]
async fn upstash_down_gives_money_a_503_and_reads_a_200() {
    let down = Arc::new(limiter(client(
        &format!("http://{}", closed_port().await),
        "t",
        std::time::Duration::from_secs(1),
    )));
    let app = money_route(down.clone(), Levels(HashMap::new()));
    let (r, body) = send(&app, get_as("/tip", Uuid::new_v4())).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "rate_limiter_unavailable");
    assert_eq!(header(&r, "retry-after"), "5");
    assert!(header(&r, "ratelimit-policy").contains(r#""burst";q=2;w=1"#));

    let reads = Router::new()
        .route("/feed", get(|| async { "feed" }))
        .layer(layer(down.clone(), routes::AUTHENTICATED).with_verifier(verifier(TEST_JWT_SECRET)));
    let (r, body) = send(&reads, get_as("/feed", Uuid::new_v4())).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body, Value::String("feed".into()));
    assert_eq!(header(&r, "ratelimit-policy"), r#""api";q=300;w=60"#);
    assert_eq!(header(&r, "ratelimit"), "", "no state when failed open");
}

const TWO_PER_MINUTE_BY_IP: &[Policy] = &[Policy {
    name: "public",
    algorithm: Algorithm::SlidingWindow {
        limit: 2,
        window_ms: 60_000,
    },
    key: KeyKind::ClientIp,
    fail: FailMode::Open,
}];

fn from_peer(peer: &str) -> Request<Body> {
    let mut req = Request::get("/public").body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    req
}

#[tokio::test]
async fn public_routes_are_limited_per_client_ip() {
    let shim = Shim::start().await;
    let app = Router::new()
        .route("/public", get(|| async { "hi" }))
        .layer(layer(
            Arc::new(limiter(shim.client())),
            TWO_PER_MINUTE_BY_IP,
        ));
    assert_eq!(
        send(&app, from_peer("198.51.100.1:1000")).await.0.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&app, from_peer("198.51.100.1:2000")).await.0.status(),
        StatusCode::OK
    );
    let (r, body) = send(&app, from_peer("198.51.100.1:3000")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["policy"], "public");
    // Off Vercel, forwarded headers are the client's word: ignored.
    let mut spoofed = from_peer("198.51.100.1:4000");
    spoofed
        .headers_mut()
        .insert("x-forwarded-for", "203.0.113.77".parse().unwrap());
    assert_eq!(
        send(&app, spoofed).await.0.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&app, from_peer("198.51.100.2:1000")).await.0.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn behind_vercel_the_forwarded_client_ip_counts() {
    let shim = Shim::start().await;
    let app = Router::new()
        .route("/public", get(|| async { "hi" }))
        .layer(
            layer(Arc::new(limiter(shim.client())), TWO_PER_MINUTE_BY_IP)
                .with_client_ip(ClientIpSource::Vercel),
        );
    let via_vercel = |client: &str| {
        let mut req = from_peer("10.0.0.1:443");
        req.headers_mut()
            .insert("x-vercel-forwarded-for", client.parse().unwrap());
        req
    };
    for _ in 0..2 {
        assert_eq!(
            send(&app, via_vercel("203.0.113.1")).await.0.status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        send(&app, via_vercel("203.0.113.1")).await.0.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Same proxy, another client.
    assert_eq!(
        send(&app, via_vercel("203.0.113.2")).await.0.status(),
        StatusCode::OK
    );
}

// Signed routes (webhooks, hook, jobs, cron): `ratelimit_signed.rs`.

#[tokio::test]
async fn anonymous_callers_skip_user_policies() {
    let shim = Shim::start().await;
    let client = shim.client();
    let app = money_route(Arc::new(limiter(client.clone())), Levels(HashMap::new()));
    // No token: the limiter has nothing to key user policies by; the
    // handler's extractor refuses the request.
    let (r, body) = send(&app, Request::get("/tip").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "missing_token");
    assert_eq!(client.round_trips(), 0);
}
