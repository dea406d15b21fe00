//! Dependencies that are down or stalled (issue 14, deliverable 4b).
//!
//! "Down" (connection refused: nothing listens on port 9) is covered next
//! to each feature: `rate_limits.rs` (Upstash), `stripe_webhooks.rs`
//! (Stripe purchase), `realtime_jobs.rs` (Ably answering 503). This file
//! covers the harder case, a dependency that accepts the TCP connection and
//! never answers: each call must end at its own timeout with the documented
//! fail mode (docs/RELIABILITY.md, "Outages"). Bounds are 2× the configured
//! timeout: a correctness bound (the call is cut), not a performance figure.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::classes::{class, creator, enroll, fan_with};
use common::{TestApp, User, assert_ledger_clean};
use serde_json::json;
use tokio::net::TcpListener;

/// A stand-in that accepts connections and never reads or answers: a
/// dependency hung mid-request. Held sockets live as long as the task.
async fn stalled() -> String {
    stalled_counting().await.0
}

/// [`stalled`], counting the connections it accepted.
async fn stalled_counting() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (format!("http://{addr}"), accepted)
}

const UPSTASH_TIMEOUT: Duration = stagepass_platform::ratelimit::DEFAULT_TIMEOUT;
/// `crates/integrations/src/stripe/client.rs` DEFAULT_BUDGET (every
/// attempt of one call), under Vercel's `maxDuration` of 15 s.
const STRIPE_BUDGET: Duration = Duration::from_secs(12);
const MAX_DURATION: Duration = Duration::from_secs(15);
/// Ably and QStash calls (`ably.rs`, `qstash.rs`).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

async fn balance(app: &TestApp, user: &User) -> i64 {
    app.get("/api/v1/tokens/balance")
        .bearer(&user.token)
        .send()
        .await
        .json()["balance"]
        .as_i64()
        .expect("balance")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upstash_fails_money_closed_and_reads_open_within_its_timeout() {
    let upstash = stalled().await;
    let app = TestApp::with_env(&[
        ("UPSTASH_REDIS_REST_URL", upstash),
        ("UPSTASH_REDIS_REST_TOKEN", "token".to_owned()),
    ])
    .await;
    let creator = app.signed_in_user().await;
    app.set_role(creator.id, "creator").await;
    let fan = app.signed_in_user().await;

    let started = Instant::now();
    let tip = app
        .post("/api/v1/tips")
        .bearer(&fan.token)
        .header("idempotency-key", "stalled-limiter")
        .json(&json!({"recipient_id": creator.id, "amount": 1}))
        .send()
        .await;
    let took = started.elapsed();
    tip.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "rate_limiter_unavailable");
    assert!(tip.header("retry-after").is_some());
    assert!(took < 2 * UPSTASH_TIMEOUT, "money call took {took:?}");

    let started = Instant::now();
    let read = app
        .get("/api/v1/tokens/balance")
        .bearer(&fan.token)
        .send()
        .await;
    let took = started.elapsed();
    assert_eq!(read.status, StatusCode::OK, "reads fail open");
    assert!(took < 2 * UPSTASH_TIMEOUT, "read took {took:?}");
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stripe_answers_503_within_its_timeout_with_no_half_state() {
    let stripe = stalled().await;
    let app = TestApp::with_env(&[
        ("STRIPE_API_BASE", stripe),
        ("RATE_LIMITS", "off".to_owned()),
    ])
    .await;
    let fan = app.signed_in_user().await;
    let started = Instant::now();
    let r = app
        .post("/api/v1/tokens/purchases")
        .bearer(&fan.token)
        .header("idempotency-key", "stalled-stripe")
        .json(&json!({"package": "small"}))
        .send()
        .await;
    let took = started.elapsed();
    r.assert_problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "payment_provider_unavailable",
    );
    // Two full attempts (2 × 10 s) would outlive the function.
    assert!(
        took < STRIPE_BUDGET + Duration::from_secs(2) && took < MAX_DURATION,
        "purchase took {took:?}"
    );
    // Nothing credited, nothing owed, no purchase left half-created.
    assert_eq!(balance(&app, &fan).await, 0);
    let half: i64 = sqlx::query_scalar(
        "select count(*) from app.purchases \
         where status <> 'pending' or stripe_payment_intent_id is not null",
    )
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("purchases");
    assert_eq!(half, 0);
    assert_ledger_clean(&app).await;
}

/// Waits (bounded) until every outbox row has been tried once and released.
async fn tried_and_kept(app: &TestApp, kind: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let row: Option<(i32, Option<String>)> = sqlx::query_as(
            "select attempts, last_error from app.outbox where kind = $1 \
             and delivered_at is null and claimed_until is null and attempts >= 1 limit 1",
        )
        .bind(kind)
        .fetch_optional(&app.db.admin_pool)
        .await
        .expect("outbox");
        if let Some((_, error)) = row {
            return error.unwrap_or_default();
        }
        if Instant::now() > deadline {
            let rows: Vec<(String, i32, Option<String>, bool, bool)> = sqlx::query_as(
                "select kind, attempts, last_error, delivered_at is null, claimed_until is null \
                 from app.outbox",
            )
            .fetch_all(&app.db.admin_pool)
            .await
            .expect("outbox");
            panic!("the {kind} delivery was not cut by its timeout: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_ably_and_qstash_never_hold_a_request_and_are_retried_later() {
    let ((ably, ably_calls), qstash) = (stalled_counting().await, stalled().await);
    let app = TestApp::with_env(&[
        ("ABLY_API_BASE", ably),
        ("QSTASH_URL", qstash),
        ("RATE_LIMITS", "off".to_owned()),
    ])
    .await;
    let host = creator(&app).await;
    let class = class(&app, &host, 48, 10, 5).await;
    let fan = fan_with(&app, 50).await;

    // The enrolment commits its outbox rows (an Ably message, a QStash
    // reminder) with the enrolment; delivery happens after the response.
    let started = Instant::now();
    let r = enroll(&app, &fan, &class, "stalled-deps").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert!(
        started.elapsed() < PUBLISH_TIMEOUT,
        "the response waited for a stalled dependency: {:?}",
        started.elapsed()
    );
    // Each delivery is cut at its timeout and kept for the cron's retry.
    // One run delivers both kinds, at most one timeout each (the second
    // realtime row is not tried after the first did not answer); twice
    // that is the bound. Before, each row waited its own 5 s.
    let bound = 2 * (PUBLISH_TIMEOUT + PUBLISH_TIMEOUT);
    let realtime = tried_and_kept(&app, "realtime", bound).await;
    let job = tried_and_kept(&app, "job", bound).await;
    let realtime_rows: i64 =
        sqlx::query_scalar("select count(*) from app.outbox where kind = 'realtime'")
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("outbox");
    assert!(realtime_rows >= 2, "the enrolment records several messages");
    assert_eq!(
        ably_calls.load(Ordering::SeqCst),
        1,
        "after one timeout the run does not call a stalled Ably again"
    );
    assert!(
        !realtime.is_empty() && !job.is_empty(),
        "{realtime} / {job}"
    );
    assert_eq!(balance(&app, &fan).await, 40);
    assert_ledger_clean(&app).await;
}
