//! Rate limits as the routes apply them (SPEC §4): every function declares
//! its limits; money routes get burst + API + the trust level's money limit
//! in one decision, with `RateLimit` headers and 429 problems.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::json;
use stagepass_platform::serve::Limits;
use stagepass_routes::FUNCTIONS;

#[test]
fn every_function_declares_its_limits() {
    for f in FUNCTIONS {
        match f.limits {
            Limits::Exempt(reason) => {
                assert_eq!(
                    f.name, "health",
                    "only liveness may be exempt: {} ({reason})",
                    f.name
                );
            }
            other => assert!(
                !other.policies().is_empty(),
                "{} declares no policy",
                f.name
            ),
        }
        // Money-moving functions must have the money limits.
        if [
            "v1_tips",
            "v1_classes_enrollments",
            "v1_classes_enrollments_me",
            "v1_admin_users_grants",
        ]
        .contains(&f.name)
        {
            assert!(matches!(f.limits, Limits::Money), "{}", f.name);
        }
        if f.name == "v1_tokens_purchases" {
            assert!(matches!(f.limits, Limits::Purchase));
        }
        if f.name == "v1_me_payout_requests" {
            assert!(matches!(f.limits, Limits::PayoutRequest), "{}", f.name);
        }
        // Signed callers verify before any budget is charged (ADR 0011).
        if f.name.starts_with("webhooks_")
            || f.name.starts_with("cron_")
            || f.name.starts_with("jobs_")
            || f.name == "v1_auth_access_token_hook"
        {
            assert!(matches!(f.limits, Limits::Signed(_)), "{}", f.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tip_burst_limit_refuses_the_third_request_in_a_second() {
    let app = TestApp::new().await;
    let creator = app.signed_in_user().await;
    app.set_role(creator.id, "creator").await;
    let fan = app.signed_in_user().await;
    let mut statuses = Vec::new();
    let mut last = None;
    for i in 0..3 {
        let r = app
            .post("/api/v1/tips")
            .bearer(&fan.token)
            .header("idempotency-key", &format!("burst-{i}"))
            .json(&json!({"recipient_id": creator.id, "amount": 1}))
            .send()
            .await;
        statuses.push(r.status);
        assert!(
            r.header("ratelimit-policy")
                .is_some_and(|p| p.contains("\"burst\"") && p.contains("\"money\"")),
            "{:?}",
            r.headers
        );
        last = Some(r);
    }
    // The first two pass the limiter (and fail for lack of funds: 422).
    assert_eq!(
        statuses[..2],
        [
            StatusCode::UNPROCESSABLE_ENTITY,
            StatusCode::UNPROCESSABLE_ENTITY
        ]
    );
    let limited = last.expect("third");
    let problem = limited.assert_problem(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(problem["policy"], "burst");
    assert!(limited.header("retry-after").is_some());
    assert!(limited.header("ratelimit").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_carry_ratelimit_headers_and_a_bad_token_is_401_before_any_limit() {
    let app = TestApp::new().await;
    let fan = app.signed_in_user().await;
    let r = app
        .get("/api/v1/tokens/balance")
        .bearer(&fan.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.header("ratelimit-policy")
            .is_some_and(|p| p.contains("\"api\""))
    );
    let bad = app
        .get("/api/v1/tokens/balance")
        .bearer("nope")
        .send()
        .await;
    bad.assert_problem(StatusCode::UNAUTHORIZED, "invalid_token");
    // (Per-IP limits need the client address, which in-process requests
    // lack; `platform/tests/ratelimit_layer.rs` covers them.)
    let live = app.get("/api/health").send().await;
    assert!(
        live.header("ratelimit-policy").is_none(),
        "liveness does no I/O"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn money_routes_fail_closed_when_the_limiter_is_unreachable() {
    // Upstash configured but unreachable (nothing listens on port 9).
    let app = TestApp::with_env(&[
        ("UPSTASH_REDIS_REST_URL", "http://127.0.0.1:9".to_owned()),
        ("UPSTASH_REDIS_REST_TOKEN", "token".to_owned()),
    ])
    .await;
    let creator = app.signed_in_user().await;
    app.set_role(creator.id, "creator").await;
    let fan = app.signed_in_user().await;
    let tip = app
        .post("/api/v1/tips")
        .bearer(&fan.token)
        .header("idempotency-key", "closed")
        .json(&json!({"recipient_id": creator.id, "amount": 1}))
        .send()
        .await;
    tip.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "rate_limiter_unavailable");
    assert!(tip.header("retry-after").is_some());
    // Reads fail open.
    let read = app
        .get("/api/v1/tokens/balance")
        .bearer(&fan.token)
        .send()
        .await;
    assert_eq!(read.status, StatusCode::OK);
}
