//! The shared HTTP layers as every function runs them: security headers,
//! request ids, problem bodies, HPP, CORS, panic guard (SPEC §1, §5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::{ALLOWED_ORIGIN, TestApp, TestResponse};
use http::{Method, Request, StatusCode};
use stagepass_platform::config::CoreConfig;
use uuid::Uuid;

const SECURITY_HEADERS: [(&str, &str); 8] = [
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (
        "strict-transport-security",
        "max-age=63072000; includeSubDomains; preload",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    (
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    ),
    ("cross-origin-opener-policy", "same-origin"),
    ("x-xss-protection", "0"),
];

#[track_caller]
fn assert_common_headers(r: &TestResponse, what: &str) {
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(r.header(name), Some(value), "{what}: header {name}");
        assert_eq!(
            r.headers.get_all(name).iter().count(),
            1,
            "{what}: one {name}"
        );
    }
    assert_eq!(r.header("api-version"), Some("1"), "{what}: API-Version");
    let id = r
        .header("request-id")
        .unwrap_or_else(|| panic!("{what}: no Request-Id"));
    assert!(
        Uuid::parse_str(id).is_ok(),
        "{what}: Request-Id {id} is not a UUID"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_has_the_security_headers() {
    let app = TestApp::new().await;
    let user = app.new_user();

    let ok = app.get("/api/health").send().await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.json()["status"], "ok");
    assert_common_headers(&ok, "200 health");

    let me = app.get("/api/v1/me").bearer(&user.token).send().await;
    assert_eq!(me.status, StatusCode::OK);
    assert_common_headers(&me, "200 me");

    let not_found = app.get("/api/v1/nowhere").send().await;
    not_found.assert_problem(StatusCode::NOT_FOUND, "not_found");
    assert_common_headers(&not_found, "404");
    let not_found = app.get("/").send().await;
    not_found.assert_problem(StatusCode::NOT_FOUND, "not_found");
    assert_common_headers(&not_found, "404 root");

    let wrong_method = app.request(Method::DELETE, "/api/v1/me").send().await;
    wrong_method.assert_problem(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_common_headers(&wrong_method, "405");
    let allow = wrong_method.header_all("allow");
    assert!(
        allow.contains("GET") && allow.contains("PATCH"),
        "Allow: {allow}"
    );

    let wrong_method = app.post("/api/health").send().await;
    wrong_method.assert_problem(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_common_headers(&wrong_method, "405 health");

    let bad = app.get("/api/health?a=1&a=2").send().await;
    bad.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert_common_headers(&bad, "400");

    let unauth = app.get("/api/v1/me").send().await;
    unauth.assert_problem(StatusCode::UNAUTHORIZED, "missing_token");
    assert_common_headers(&unauth, "401");

    let openapi = app.get("/api/v1/openapi.json").send().await;
    assert_eq!(openapi.status, StatusCode::OK);
    assert_common_headers(&openapi, "200 openapi");
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_are_not_cacheable_unless_the_handler_says_so() {
    let app = TestApp::new().await;
    for path in ["/api/health", "/api/health/ready", "/api/v1/nowhere"] {
        let r = app.get(path).send().await;
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
        let vary = r.header_all("vary");
        assert!(
            vary.contains("Authorization") && vary.contains("Origin"),
            "{path}: {vary}"
        );
    }
    // The one public document chooses its own caching.
    let r = app.get("/api/v1/openapi.json").send().await;
    assert_eq!(r.header("cache-control"), Some("public, max-age=300"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_fresh_and_never_taken_from_the_client() {
    let app = TestApp::new().await;
    let a = app.get("/api/health").send().await;
    let b = app
        .get("/api/health")
        .header("request-id", "attacker-chosen-id")
        .send()
        .await;
    let (a, b) = (
        a.header("request-id").expect("id").to_owned(),
        b.header("request-id").expect("id").to_owned(),
    );
    assert_ne!(a, b);
    assert_ne!(b, "attacker-chosen-id");
    assert!(Uuid::parse_str(&b).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_answers_with_the_database() {
    let app = TestApp::new().await;
    let r = app.get("/api/health/ready").send().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let body = r.json();
    assert_eq!(body["status"], "ready");
    assert!(
        body["database_latency_ms"]
            .as_f64()
            .is_some_and(|ms| ms >= 0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_query_parameters_are_rejected() {
    let app = TestApp::new().await;
    let user = app.new_user();
    for query in ["a=1&a=2", "a=1&b=2&a=3", "a=1&a", "a%62=1&ab=2"] {
        let r = app.get(&format!("/api/health?{query}")).send().await;
        let body = r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert!(body["errors"][0]["field"].is_string(), "{query}: {body}");
    }
    let r = app.get("/api/health?a=1&a=2").send().await;
    assert_eq!(r.first_error_field(), "a");
    // Before authentication and before the handler: no user is created.
    let r = app
        .get("/api/v1/me?x=1&x=2")
        .bearer(&user.token)
        .send()
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(app.role_of(user.id).await, None);
    // Distinct parameters are fine.
    let r = app.get("/api/health?a=1&b=2").send().await;
    assert_eq!(r.status, StatusCode::OK);
}

fn preflight<'a>(
    app: &'a TestApp,
    origin: &str,
    method: &str,
    headers: Option<&str>,
) -> common::Req<'a> {
    let mut req = app
        .request(Method::OPTIONS, "/api/v1/me")
        .origin(origin)
        .header("access-control-request-method", method);
    if let Some(h) = headers {
        req = req.header("access-control-request-headers", h);
    }
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_from_an_allowed_origin() {
    let app = TestApp::new().await;
    let r = preflight(
        &app,
        ALLOWED_ORIGIN,
        "PATCH",
        Some("authorization, content-type, idempotency-key"),
    )
    .send()
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    let allow_headers = r
        .header("access-control-allow-headers")
        .expect("Allow-Headers")
        .to_ascii_lowercase();
    for h in ["idempotency-key", "authorization", "content-type"] {
        assert!(
            allow_headers.contains(h),
            "Allow-Headers {allow_headers} lacks {h}"
        );
    }
    let methods = r
        .header("access-control-allow-methods")
        .expect("Allow-Methods");
    assert!(methods.contains("PATCH"), "{methods}");
    assert!(r.header("access-control-max-age").is_some());
    assert!(
        r.header("access-control-allow-credentials").is_none(),
        "no credentials mode is needed for bearer tokens"
    );
    assert_common_headers(&r, "preflight 204");
    let vary = r.header_all("vary");
    assert!(vary.contains("Origin"), "{vary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_refusals_are_403_never_500() {
    let app = TestApp::new().await;
    for origin in [
        "https://evil.example",
        "null",
        "https://app.stagepass.test.evil.com",
        "http://app.stagepass.test",
        "https://app.stagepass.test:8443",
    ] {
        let r = preflight(&app, origin, "GET", None).send().await;
        r.assert_problem(StatusCode::FORBIDDEN, "cors_origin_not_allowed");
        assert!(
            r.header("access-control-allow-origin").is_none(),
            "{origin}"
        );
        assert_common_headers(&r, origin);
    }
    // No Origin at all.
    let r = app
        .request(Method::OPTIONS, "/api/v1/me")
        .header("access-control-request-method", "GET")
        .send()
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "cors_origin_not_allowed");
    // A header outside the allow-list.
    for headers in ["x-evil", "authorization, x-forwarded-host", "cookie"] {
        let r = preflight(&app, ALLOWED_ORIGIN, "POST", Some(headers))
            .send()
            .await;
        r.assert_problem(StatusCode::FORBIDDEN, "cors_request_not_allowed");
        assert!(r.header("access-control-allow-origin").is_none());
    }
    // A method outside the allow-list.
    for method in ["TRACE", "CONNECT"] {
        let r = preflight(&app, ALLOWED_ORIGIN, method, None).send().await;
        r.assert_problem(StatusCode::FORBIDDEN, "cors_request_not_allowed");
    }
    // An unknown path is refused the same way (not 404, not 500).
    let r = app
        .request(Method::OPTIONS, "/api/v1/nowhere")
        .origin("https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "cors_origin_not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preview_pattern_allows_previews_and_refuses_look_alikes() {
    let app = TestApp::new().await;
    for origin in [
        "https://stagepass-git-main-team.vercel.app",
        "https://stagepass-abc123-team.vercel.app",
    ] {
        let r = preflight(&app, origin, "GET", Some("authorization"))
            .send()
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{origin}: {}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    }
    for origin in [
        "https://stagepass--team.vercel.app",
        "https://stagepass-evil.com.-team.vercel.app",
        "https://stagepass-x-team.vercel.app.evil.com",
        "https://stagepass-x.evil.com/-team.vercel.app",
        "http://stagepass-x-team.vercel.app",
        "https://stagepass-x-team.vercel.app:444",
        "https://evilstagepass-x-team.vercel.app",
        "https://stagepass-x_y-team.vercel.app",
    ] {
        let r = preflight(&app, origin, "GET", None).send().await;
        r.assert_problem(StatusCode::FORBIDDEN, "cors_origin_not_allowed");
        // And a simple request from it gets no CORS grant.
        let r = app.get("/api/health").origin(origin).send().await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.header("access-control-allow-origin").is_none(),
            "{origin}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_simple_request_exposes_headers() {
    let app = TestApp::new().await;
    let user = app.new_user();
    let r = app
        .get("/api/v1/me")
        .origin(ALLOWED_ORIGIN)
        .bearer(&user.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    let expose = r
        .header("access-control-expose-headers")
        .expect("Expose-Headers");
    for h in ["Request-Id", "RateLimit", "API-Version", "Retry-After"] {
        assert!(
            expose.split(',').any(|e| e.trim() == h),
            "Expose-Headers {expose} lacks {h}"
        );
    }
    // Error responses carry the CORS grant too, so the browser can read the problem.
    let r = app.get("/api/v1/me").origin(ALLOWED_ORIGIN).send().await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "missing_token");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    // A disallowed origin gets no grant, but the request itself is served.
    let r = app
        .get("/api/health")
        .origin("https://evil.example")
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("access-control-allow-origin").is_none());
    assert!(r.header("access-control-expose-headers").is_none());
}

async fn boom() -> &'static str {
    panic!("secret-internal-detail")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_becomes_a_500_problem_and_the_service_keeps_serving() {
    let env = common::test_env("postgres://unused@127.0.0.1:5432/unused");
    let mut loader = common::loader(&env);
    let core = CoreConfig::load(&mut loader);
    assert!(loader.finish().is_ok());
    let router = Router::new()
        .route("/boom", get(boom))
        .route("/ok", get(|| async { "fine" }));
    let app = stagepass_platform::http::stack(router, &core);

    let mut ids = Vec::new();
    for _ in 0..2 {
        let req = Request::builder()
            .uri("/boom")
            .body(Body::empty())
            .expect("request");
        let r = common::send(&app, req).await;
        let body = r.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, "internal_error");
        assert!(
            !r.text().contains("secret-internal-detail"),
            "panic message leaked: {}",
            r.text()
        );
        assert!(body.get("detail").is_none_or(|d| d.is_null()), "{body}");
        assert_common_headers(&r, "panic 500");
        assert_eq!(r.header("cache-control"), Some("no-store"));
        ids.push(body["request_id"].as_str().expect("request_id").to_owned());
    }
    assert_ne!(ids[0], ids[1]);
    let req = Request::builder()
        .uri("/ok")
        .body(Body::empty())
        .expect("request");
    let r = common::send(&app, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "fine");
}
