//! Issue 14: identical purchase requests with one `Idempotency-Key`, sent
//! milliseconds apart, could answer 422 `idempotency_key_reused` (it is the
//! same body) and both reach Stripe. Every duplicate must answer 409
//! `idempotency_in_progress` or the same 201, with exactly one call to
//! Stripe. Stripe is a recording fake at the production client's base URL
//! that takes 150 ms per call, like the real one, so the duplicates overlap
//! the call.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use common::{TestApp, User};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// A slow Stripe that counts `POST /v1/payment_intents` and answers each
/// with a PaymentIntent whose id is unique per call (as a Stripe that lost
/// the idempotency key would), so a second call shows in the responses too.
/// The first call waits for `gate` when one is given.
async fn slow_stripe_gated(
    gate: Option<Arc<tokio::sync::Notify>>,
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/v1/payment_intents",
        axum::routing::post(move || {
            let (counter, gate) = (counter.clone(), gate.clone());
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                match gate {
                    Some(gate) if n == 1 => gate.notified().await,
                    _ => tokio::time::sleep(Duration::from_millis(150)).await,
                }
                axum::Json(json!({
                    "id": format!("pi_race_{n}"),
                    "object": "payment_intent",
                    "status": "requires_payment_method",
                    "amount": 1900,
                    "currency": "usd",
                    "client_secret": format!("pi_race_{n}_secret_x"),
                }))
            }
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, calls, server)
}

async fn slow_stripe() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    slow_stripe_gated(None).await
}

async fn purchase(app: &TestApp, fan: &User, key: &str) -> common::TestResponse {
    app.post("/api/v1/tokens/purchases")
        .bearer(&fan.token)
        .header("idempotency-key", key)
        .json(&json!({"package": "small"}))
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_reach_stripe_once_and_never_answer_422() {
    let (url, calls, _server) = slow_stripe().await;
    let app =
        TestApp::with_env(&[("RATE_LIMITS", "off".to_owned()), ("STRIPE_API_BASE", url)]).await;
    for round in 0..5 {
        // A fan seen for the first time (first-sight creation races too) and
        // one already known.
        let fan = if round % 2 == 0 {
            app.new_user()
        } else {
            app.signed_in_user().await
        };
        let before = calls.load(Ordering::SeqCst);
        let key = format!("race-{round}");
        let sends = (0..6).map(|i| {
            let (app, fan, key) = (&app, &fan, &key);
            async move {
                tokio::time::sleep(Duration::from_millis(i)).await;
                purchase(app, fan, key).await
            }
        });
        let answers = join_all(sends).await;
        let mut created: Vec<Value> = Vec::new();
        for r in &answers {
            match r.status {
                StatusCode::CREATED => created.push(r.json()),
                StatusCode::CONFLICT => {
                    r.assert_problem(StatusCode::CONFLICT, "idempotency_in_progress");
                }
                other => panic!("round {round}: unexpected {other}: {}", r.text()),
            }
        }
        assert_eq!(
            calls.load(Ordering::SeqCst) - before,
            1,
            "round {round}: exactly one call to Stripe"
        );
        // After the dust settles the key replays the one PaymentIntent.
        let replay = purchase(&app, &fan, &key).await;
        assert_eq!(replay.status, StatusCode::CREATED, "{}", replay.text());
        assert_eq!(replay.header("idempotency-replayed"), Some("true"));
        for body in &created {
            assert_eq!(body, &replay.json(), "round {round}: one PaymentIntent");
        }
        assert_eq!(calls.load(Ordering::SeqCst) - before, 1);
    }
}

/// The root cause: the claim (15 s) could run out while its holder still
/// waited on Stripe (up to 2 × 10 s + 2 s). A duplicate then claimed the
/// purchase and called Stripe too, and whichever attached its PaymentIntent
/// second answered 422 `idempotency_key_reused` for the very same request.
/// Here the superuser runs the claim out mid-call: the late holder must
/// answer what the duplicate answered, never 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_ran_out_mid_call_never_answers_422() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let (url, calls, _server) = slow_stripe_gated(Some(gate.clone())).await;
    let app = Arc::new(
        TestApp::with_env(&[("RATE_LIMITS", "off".to_owned()), ("STRIPE_API_BASE", url)]).await,
    );
    let fan = app.signed_in_user().await;
    let first = {
        let (app, fan) = (app.clone(), fan.clone());
        tokio::spawn(async move { purchase(&app, &fan, "late").await })
    };
    while calls.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sqlx::query(
        "update app.purchases set creating_until = clock_timestamp() - interval '1 second'",
    )
    .execute(&app.db.admin_pool)
    .await
    .expect("run the claim out");
    let second = purchase(&app, &fan, "late").await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.text());
    gate.notify_one();
    let first = first.await.expect("first request");
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert_eq!(first.json(), second.json(), "one PaymentIntent for one key");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The Stripe call's bound stays inside the claim, so a live holder's claim
/// never runs out (the case above cannot happen without the superuser).
#[tokio::test(flavor = "multi_thread")]
async fn the_stripe_budget_is_shorter_than_the_claim() {
    let app = TestApp::new().await;
    let lease: f64 =
        sqlx::query_scalar("select extract(epoch from app.purchase_claim_lease())::float8")
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("lease");
    let budget = stagepass_routes::purchases::STRIPE_BUDGET.as_secs_f64();
    assert!(
        budget + 5.0 <= lease,
        "Stripe budget {budget} s must stay well inside the claim lease {lease} s"
    );
}

/// A holder whose Stripe call failed gives its claim back: the client's
/// retry with the same key goes to Stripe again at once instead of getting
/// 409 for the whole lease.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_stripe_call_releases_the_claim() {
    // STRIPE_API_BASE points at a closed port in the test environment.
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    for _ in 0..2 {
        purchase(&app, &fan, "down").await.assert_problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "payment_provider_unavailable",
        );
    }
}
