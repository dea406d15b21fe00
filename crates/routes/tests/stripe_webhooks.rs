//! Stripe webhooks and the money crons, in process, with events signed by
//! the test exactly as Stripe signs them. Every test ends with the ledger
//! invariants.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::assert_ledger_clean;

use axum::http::StatusCode;
use common::{CRON_SECRET, STRIPE_WEBHOOK_SECRET, TestApp, User};
use serde_json::{Value, json};
use stagepass_integrations::stripe::webhook;
use uuid::Uuid;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A pending purchase of `package` with PaymentIntent `pi`, as the purchase
/// route leaves it.
async fn pending_purchase(app: &TestApp, user: Uuid, pi: &str, tokens: i64, price: i64) {
    sqlx::query(
        "insert into app.purchases (id, user_id, package, tokens, price_cents, stripe_payment_intent_id) \
         values ($1, $2, 'test', $3, $4, $5)",
    )
    .bind(Uuid::new_v4())
    .bind(user)
    .bind(tokens)
    .bind(price)
    .bind(pi)
    .execute(&app.db.admin_pool)
    .await
    .expect("purchase");
}

fn event(id: &str, kind: &str, object: Value) -> Vec<u8> {
    json!({"id": id, "object": "event", "type": kind, "created": now(), "data": {"object": object}})
        .to_string()
        .into_bytes()
}

fn succeeded(id: &str, pi: &str, amount: i64) -> Vec<u8> {
    event(
        id,
        "payment_intent.succeeded",
        json!({"id": pi, "object": "payment_intent", "status": "succeeded", "amount": amount, "currency": "usd"}),
    )
}

fn refunded(id: &str, pi: &str, charge: &str, amount: i64, refunded: i64) -> Vec<u8> {
    event(
        id,
        "charge.refunded",
        json!({"id": charge, "object": "charge", "amount": amount, "amount_refunded": refunded,
               "currency": "usd", "payment_intent": pi, "refunded": refunded == amount}),
    )
}

fn disputed(id: &str, pi: &str, dispute: &str, amount: i64) -> Vec<u8> {
    event(
        id,
        "charge.dispute.created",
        json!({"id": dispute, "object": "dispute", "amount": amount, "currency": "usd",
               "charge": "ch_x", "payment_intent": pi}),
    )
}

async fn deliver_at(app: &TestApp, body: &[u8], timestamp: i64) -> common::TestResponse {
    let signature = webhook::sign(body, STRIPE_WEBHOOK_SECRET, timestamp).expect("sign");
    app.post("/api/webhooks/stripe")
        .header("stripe-signature", &signature)
        .raw_body("application/json", body.to_vec())
        .send()
        .await
}

async fn deliver(app: &TestApp, body: &[u8]) -> common::TestResponse {
    deliver_at(app, body, now()).await
}

async fn balance(app: &TestApp, user: &User) -> Value {
    app.get("/api/v1/tokens/balance")
        .bearer(&user.token)
        .send()
        .await
        .json()
}

async fn events_recorded(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from app.stripe_events")
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_succeeded_payment_is_credited_exactly_once() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    pending_purchase(&app, fan.id, "pi_1", 200, 1_900).await;

    let body = succeeded("evt_1", "pi_1", 1_900);
    let first = deliver(&app, &body).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.json()["outcome"], "credited");
    // Stripe redelivers the same event, re-signed with a fresh timestamp.
    let again = deliver_at(&app, &body, now() + 1).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["duplicate"], true);
    // A different event about the same PaymentIntent credits nothing either.
    let other = deliver(&app, &succeeded("evt_2", "pi_1", 1_900)).await;
    assert_eq!(other.json()["outcome"], "already_credited");

    assert_eq!(balance(&app, &fan).await["balance"], 200);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_and_stale_signatures_are_refused_and_change_nothing() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    pending_purchase(&app, fan.id, "pi_s", 50, 500).await;
    let body = succeeded("evt_s", "pi_s", 500);

    let forged = webhook::sign(&body, "whsec_not_ours", now()).expect("sign");
    let r = app
        .post("/api/webhooks/stripe")
        .header("stripe-signature", &forged)
        .raw_body("application/json", body.clone())
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let stale = deliver_at(&app, &body, now() - 301).await;
    stale.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let mut tampered = body.clone();
    let signature = webhook::sign(&body, STRIPE_WEBHOOK_SECRET, now()).expect("sign");
    tampered.extend_from_slice(b" ");
    let r = app
        .post("/api/webhooks/stripe")
        .header("stripe-signature", &signature)
        .raw_body("application/json", tampered)
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let unsigned = app
        .post("/api/webhooks/stripe")
        .raw_body("application/json", body.clone())
        .send()
        .await;
    unsigned.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");

    assert_eq!(events_recorded(&app).await, 0);
    assert_eq!(balance(&app, &fan).await["balance"], 0);
    // The genuine event still applies afterwards.
    assert_eq!(deliver(&app, &body).await.json()["outcome"], "credited");
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_effect_answers_5xx_records_nothing_and_the_retry_succeeds() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    pending_purchase(&app, fan.id, "pi_f", 50, 500).await;
    sqlx::query(
        "revoke execute on function app.credit_purchase(text, bigint) from stagepass_service",
    )
    .execute(&app.db.admin_pool)
    .await
    .expect("break the effect");
    let body = succeeded("evt_f", "pi_f", 500);
    let failed = deliver(&app, &body).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        events_recorded(&app).await,
        0,
        "a failed effect must not be marked processed"
    );
    sqlx::query("grant execute on function app.credit_purchase(text, bigint) to stagepass_service")
        .execute(&app.db.admin_pool)
        .await
        .expect("repair");
    let retried = deliver_at(&app, &body, now() + 60).await;
    assert_eq!(retried.json()["outcome"], "credited");
    assert_eq!(balance(&app, &fan).await["balance"], 50);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_before_the_success_means_no_tokens_ever() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    pending_purchase(&app, fan.id, "pi_o", 200, 1_900).await;
    let r = deliver(&app, &refunded("evt_r", "pi_o", "ch_o", 1_900, 1_900)).await;
    assert_eq!(r.json()["outcome"], "clawed_back:0");
    let s = deliver(&app, &succeeded("evt_o", "pi_o", 1_900)).await;
    assert_eq!(s.json()["outcome"], "not_creditable");
    assert_eq!(balance(&app, &fan).await["balance"], 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spent_tokens_clawed_back_become_debt_that_blocks_spending_until_repaid() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    let creator = app.signed_in_user().await;
    app.set_role(creator.id, "creator").await;
    pending_purchase(&app, fan.id, "pi_d", 50, 500).await;
    deliver(&app, &succeeded("evt_d1", "pi_d", 500)).await;
    let tip = app
        .post("/api/v1/tips")
        .bearer(&fan.token)
        .header("idempotency-key", "t1")
        .json(&json!({"recipient_id": creator.id, "amount": 40}))
        .send()
        .await;
    assert_eq!(tip.status, StatusCode::CREATED);

    // Half refunded: 25 tokens back (10 from the wallet, 15 as debt).
    let half = deliver(&app, &refunded("evt_d2", "pi_d", "ch_d", 500, 250)).await;
    assert_eq!(half.json()["outcome"], "clawed_back:25");
    let b = balance(&app, &fan).await;
    assert_eq!(
        (b["balance"].as_i64(), b["debt"].as_i64()),
        (Some(0), Some(15))
    );
    // The same refund state again takes nothing more; the full refund the rest.
    assert_eq!(
        deliver(&app, &refunded("evt_d3", "pi_d", "ch_d", 500, 250))
            .await
            .json()["outcome"],
        "clawed_back:0"
    );
    assert_eq!(
        deliver(&app, &refunded("evt_d4", "pi_d", "ch_d", 500, 500))
            .await
            .json()["outcome"],
        "clawed_back:25"
    );
    assert_eq!(balance(&app, &fan).await["debt"], 40);

    let blocked = app
        .post("/api/v1/tips")
        .bearer(&fan.token)
        .header("idempotency-key", "t2")
        .json(&json!({"recipient_id": creator.id, "amount": 1}))
        .send()
        .await;
    blocked.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "account_in_debt");

    // A new purchase repays the debt first.
    pending_purchase(&app, fan.id, "pi_d2", 200, 1_900).await;
    deliver(&app, &succeeded("evt_d5", "pi_d2", 1_900)).await;
    let b = balance(&app, &fan).await;
    assert_eq!(
        (b["balance"].as_i64(), b["debt"].as_i64()),
        (Some(160), Some(0))
    );
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dispute_claws_everything_back_and_drops_trust_to_basic() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    pending_purchase(&app, fan.id, "pi_x", 200, 1_900).await;
    deliver(&app, &succeeded("evt_x1", "pi_x", 1_900)).await;
    let d = deliver(&app, &disputed("evt_x2", "pi_x", "dp_1", 1_900)).await;
    assert_eq!(d.json()["outcome"], "clawed_back:200");
    let again = deliver(&app, &disputed("evt_x3", "pi_x", "dp_1", 1_900)).await;
    assert_eq!(again.json()["outcome"], "clawed_back:0");
    let b = balance(&app, &fan).await;
    assert_eq!(b["balance"], 0);
    assert_eq!(b["trust_level"], "basic");
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_events_are_acknowledged_and_mismatched_amounts_fail_loudly() {
    let app = TestApp::unlimited().await;
    let r = deliver(
        &app,
        &event(
            "evt_u",
            "customer.created",
            json!({"object": "customer", "id": "cus_1"}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["outcome"], "ignored");
    let fan = app.signed_in_user().await;
    pending_purchase(&app, fan.id, "pi_m", 200, 1_900).await;
    let wrong = deliver(&app, &succeeded("evt_m", "pi_m", 100)).await;
    assert_eq!(wrong.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(balance(&app, &fan).await["balance"], 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deliveries_of_one_event_credit_once() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    pending_purchase(&app, fan.id, "pi_c", 433, 3_900).await;
    let body = succeeded("evt_c", "pi_c", 3_900);
    let results = futures_util::future::join_all((0..8).map(|i| {
        let (app, body) = (&app, &body);
        async move { deliver_at(app, body, now() + i).await }
    }))
    .await;
    for r in &results {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(
        results
            .iter()
            .filter(|r| r.json()["outcome"] == "credited")
            .count(),
        1
    );
    assert_eq!(balance(&app, &fan).await["balance"], 433);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cron_routes_require_the_secret() {
    let app = TestApp::unlimited().await;
    for path in [
        "/api/cron/ledger-audit",
        "/api/cron/cleanup",
        "/api/cron/reconcile-purchases",
    ] {
        let none = app.get(path).send().await;
        none.assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");
        let wrong = app.get(path).bearer("not-the-cron-secret-000").send().await;
        wrong.assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");
        // Cron calls are GETs; a POST is not a way in (SPEC §6, defect 4).
        let post = app.post(path).bearer(CRON_SECRET).send().await;
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    }
    let audit = app
        .get("/api/cron/ledger-audit")
        .bearer(CRON_SECRET)
        .send()
        .await;
    assert_eq!(audit.status, StatusCode::OK, "{}", audit.text());
    assert_eq!(audit.json()["total_balance"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_removes_only_expired_idempotency_records() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    for (key, hours) in [("old", -1), ("fresh", 24)] {
        sqlx::query(
            "insert into app.idempotency_keys (user_id, route, key, fingerprint, status_code, response, expires_at) \
             values ($1, 'r', $2, 'f', 201, '{}', now() + make_interval(hours => $3))",
        )
        .bind(fan.id)
        .bind(key)
        .bind(hours)
        .execute(&app.db.admin_pool)
        .await
        .expect("insert");
    }
    let r = app
        .get("/api/cron/cleanup")
        .bearer(CRON_SECRET)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["processed"], 1);
    let left: Vec<String> = sqlx::query_scalar("select key from app.idempotency_keys")
        .fetch_all(&app.db.admin_pool)
        .await
        .expect("keys");
    assert_eq!(left, vec!["fresh".to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_cron_reports_a_corrupted_ledger() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    // Corrupt a stored balance behind the ledger's back (as a superuser).
    sqlx::query("update ledger.accounts set balance = 5 where kind = 'wallet' and owner_id = $1")
        .bind(fan.id)
        .execute(&app.db.admin_pool)
        .await
        .expect("corrupt");
    let r = app
        .get("/api/cron/ledger-audit")
        .bearer(CRON_SECRET)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test(flavor = "multi_thread")]
async fn purchases_validate_and_fail_cleanly_when_stripe_is_down() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    let no_key = app
        .post("/api/v1/tokens/purchases")
        .bearer(&fan.token)
        .json(&json!({"package": "small"}))
        .send()
        .await;
    no_key.assert_problem(StatusCode::BAD_REQUEST, "bad_request");
    let unknown = app
        .post("/api/v1/tokens/purchases")
        .bearer(&fan.token)
        .header("idempotency-key", "p1")
        .json(&json!({"package": "free"}))
        .send()
        .await;
    unknown.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    let priced = app
        .post("/api/v1/tokens/purchases")
        .bearer(&fan.token)
        .header("idempotency-key", "p2")
        .json(&json!({"package": "small", "amount_cents": 1}))
        .send()
        .await;
    priced.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    // STRIPE_API_BASE points at a closed port in the test environment.
    let down = app
        .post("/api/v1/tokens/purchases")
        .bearer(&fan.token)
        .header("idempotency-key", "p3")
        .json(&json!({"package": "small"}))
        .send()
        .await;
    down.assert_problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "payment_provider_unavailable",
    );
    assert_eq!(balance(&app, &fan).await["balance"], 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test]
async fn the_package_table_in_sql_equals_the_rust_constant() {
    let db = stagepass_platform::testing::TestDb::new().await;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "select id, tokens, price_cents, bonus_tokens from app.token_packages order by price_cents",
    )
    .fetch_all(&db.admin_pool)
    .await
    .expect("packages");
    let rust: Vec<(String, i64, i64, i64)> = stagepass_ledger::packages::PACKAGES
        .iter()
        .map(|p| (p.id.to_owned(), p.tokens, p.price_cents, p.bonus_tokens))
        .collect();
    assert_eq!(rows, rust);
}
