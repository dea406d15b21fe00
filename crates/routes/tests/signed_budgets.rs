//! Signatures before budgets (ADR 0011), with the routes' real verifiers:
//! every signed route answers a forgery 401 charged to the client IP's
//! `unsigned` budget (429 once spent), and a flood of forgeries — from one
//! IP or from a thousand — neither refuses nor uses up the budget of a
//! genuine Stripe event or Supabase sign-in.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use axum::http::StatusCode;
use common::{
    CRON_SECRET, HOOK_SECRET, PUBLIC_BASE_URL, QSTASH_CURRENT_KEY, STRIPE_WEBHOOK_SECRET, TestApp,
    TestResponse, assert_ledger_clean,
};
use serde_json::json;
use stagepass_integrations::stripe::webhook;
use stagepass_platform::config::Secret;
use stagepass_platform::ratelimit::policies::{STRIPE_EVENTS, SUPABASE_AUTH_HOOK, UNSIGNED};
use stagepass_routes::auth_hook::HookKey;
use uuid::Uuid;

const STRIPE: &str = "/api/webhooks/stripe";
const HOOK: &str = "/api/v1/auth/access-token-hook";
const REMINDER: &str = "/api/jobs/class-reminder";
const CRON: &str = "/api/cron/cleanup";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The app, its clock at the start of a minute, so the `unsigned` sliding
/// window's edge never falls inside a test.
async fn app() -> TestApp {
    let app = TestApp::new().await;
    let into_minute = app
        .resources
        .clock
        .now()
        .timestamp_millis()
        .rem_euclid(60_000);
    app.resources
        .clock
        .advance(chrono::Duration::milliseconds(60_000 - into_minute));
    app
}

/// `r` of the named policy in the `RateLimit` header.
fn remaining(r: &TestResponse, policy: &str) -> Option<u32> {
    let value = r.header("ratelimit")?;
    let item = value
        .split(", ")
        .find(|i| i.starts_with(&format!("\"{policy}\";")))?;
    item.split(';')
        .find_map(|p| p.strip_prefix("r="))?
        .parse()
        .ok()
}

fn succeeded(event: &str, pi: &str, amount: i64) -> Vec<u8> {
    json!({"id": event, "object": "event", "type": "payment_intent.succeeded", "created": now(),
           "data": {"object": {"id": pi, "object": "payment_intent", "status": "succeeded",
                               "amount": amount, "currency": "usd"}}})
    .to_string()
    .into_bytes()
}

async fn stripe(app: &TestApp, peer: &str, body: &[u8], secret: Option<&str>) -> TestResponse {
    let mut req = app.post(STRIPE).peer(peer);
    if let Some(secret) = secret {
        let signature = webhook::sign(body, secret, now()).expect("sign");
        req = req.header("stripe-signature", &signature);
    }
    req.raw_body("application/json", body.to_vec()).send().await
}

fn hook_body(user: Uuid) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "user_id": user,
        "claims": {"aud": "authenticated", "sub": user, "role": "authenticated"},
        "authentication_method": "password"
    }))
    .expect("JSON")
}

async fn hook(app: &TestApp, peer: &str, user: Uuid, secret: &str) -> TestResponse {
    let body = hook_body(user);
    let key = HookKey::from_secret(&Secret::from(secret.to_owned())).expect("hook key");
    let ts = now();
    app.post(HOOK)
        .peer(peer)
        .header("webhook-id", "msg_flood")
        .header("webhook-timestamp", &ts.to_string())
        .header("webhook-signature", &key.sign("msg_flood", ts, &body))
        .raw_body("application/json", body)
        .send()
        .await
}

/// Base64 of 32 bytes that are not the hook's secret.
const FORGED_HOOK_SECRET: &str = "v1,whsec_Zm9yZ2VkLWhvb2stc2VjcmV0LW9mLTMyLWJ5dGVzISE=";

#[tokio::test(flavor = "multi_thread")]
async fn every_signed_route_verifies_before_charging_a_budget() {
    let app = app().await;
    let peer = "198.51.100.20:5000";
    let unsigned_policy = r#""unsigned";q=20;w=60"#;

    // Forgeries: 401 with the `unsigned` policy, one for each route.
    let forged_stripe = stripe(
        &app,
        peer,
        &succeeded("evt_f", "pi_f", 500),
        Some("whsec_x"),
    )
    .await;
    forged_stripe.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let forged_hook = hook(&app, peer, Uuid::new_v4(), FORGED_HOOK_SECRET).await;
    forged_hook.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let reminder = br#"{"class_id":"7d0f0c46-5d8e-4a53-9d59-0d6f2f7a4f11","starts_at":"2030-01-01T10:00:00Z"}"#;
    let forged_job = app
        .post(REMINDER)
        .peer(peer)
        .header(
            "upstash-signature",
            &stagepass_integrations::qstash::sign("sig_not_ours", "x", reminder, now(), 300),
        )
        .raw_body("application/json", reminder.to_vec())
        .send()
        .await;
    forged_job.assert_problem(StatusCode::UNAUTHORIZED, "invalid_qstash_signature");
    let forged_cron = app
        .get(CRON)
        .peer(peer)
        .bearer("not-the-cron-secret")
        .send()
        .await;
    forged_cron.assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");
    for (i, r) in [&forged_stripe, &forged_hook, &forged_job, &forged_cron]
        .into_iter()
        .enumerate()
    {
        assert_eq!(r.header("ratelimit-policy"), Some(unsigned_policy));
        // One IP, one `unsigned` budget across every signed route.
        assert_eq!(
            remaining(r, "unsigned"),
            Some(UNSIGNED.quota() - 1 - i as u32)
        );
    }

    // Genuine calls: each charged to its own source.
    let genuine_stripe = stripe(
        &app,
        peer,
        &succeeded("evt_g", "pi_unknown", 500),
        Some(STRIPE_WEBHOOK_SECRET),
    )
    .await;
    assert_eq!(
        genuine_stripe.status,
        StatusCode::OK,
        "{}",
        genuine_stripe.text()
    );
    assert_eq!(
        genuine_stripe.header("ratelimit-policy"),
        Some(r#""stripe";q=1000;w=1"#)
    );
    let genuine_hook = hook(&app, peer, Uuid::new_v4(), HOOK_SECRET).await;
    assert_eq!(
        genuine_hook.status,
        StatusCode::OK,
        "{}",
        genuine_hook.text()
    );
    assert_eq!(
        genuine_hook.header("ratelimit-policy"),
        Some(r#""supabase_auth";q=2000;w=1"#)
    );
    let url = format!("{PUBLIC_BASE_URL}{REMINDER}");
    let genuine_job = app
        .post(REMINDER)
        .peer(peer)
        .header(
            "upstash-signature",
            &stagepass_integrations::qstash::sign(QSTASH_CURRENT_KEY, &url, reminder, now(), 300),
        )
        .raw_body("application/json", reminder.to_vec())
        .send()
        .await;
    assert_eq!(genuine_job.status, StatusCode::OK, "{}", genuine_job.text());
    assert_eq!(
        genuine_job.header("ratelimit-policy"),
        Some(r#""qstash";q=500;w=1"#)
    );
    let genuine_cron = app.get(CRON).peer(peer).bearer(CRON_SECRET).send().await;
    assert_eq!(
        genuine_cron.status,
        StatusCode::OK,
        "{}",
        genuine_cron.text()
    );
    assert_eq!(
        genuine_cron.header("ratelimit-policy"),
        Some(r#""cron";q=20;w=1"#)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_flood_does_not_refuse_or_drain_stripe_or_sign_ins() {
    let app = app().await;
    let fan = app.signed_in_user().await;
    sqlx::query(
        "insert into app.purchases (id, user_id, package, tokens, price_cents, stripe_payment_intent_id) \
         values ($1, $2, 'test', 200, 1900, 'pi_flood')",
    )
    .bind(Uuid::new_v4())
    .bind(fan.id)
    .execute(&app.db.admin_pool)
    .await
    .expect("pending purchase");
    let attacker = "203.0.113.66:4444";
    let event = succeeded("evt_flood", "pi_flood", 1_900);

    // 1,000 forgeries from one IP: unsigned, signed with a guessed secret,
    // and replays of a real signature over a changed body.
    let mut statuses = Vec::with_capacity(1_000);
    for i in 0..1_000 {
        let r = match i % 3 {
            0 => stripe(&app, attacker, &event, None).await,
            1 => stripe(&app, attacker, &event, Some("whsec_guessed")).await,
            _ => {
                let signature = webhook::sign(&event, STRIPE_WEBHOOK_SECRET, now()).expect("sign");
                let mut changed = event.clone();
                changed.extend_from_slice(b" ");
                app.post(STRIPE)
                    .peer(attacker)
                    .header("stripe-signature", &signature)
                    .raw_body("application/json", changed)
                    .send()
                    .await
            }
        };
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(
                r.assert_problem(r.status, "rate_limited")["policy"],
                "unsigned"
            );
        } else {
            r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
        }
        statuses.push(r.status);
    }
    let quota = UNSIGNED.quota() as usize;
    assert!(
        statuses[..quota]
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED)
    );
    assert!(
        statuses[quota..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS)
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>("select count(*) from app.stripe_events")
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("count"),
        0,
        "no forgery was applied"
    );

    // The genuine event, from the same address, is applied at once, and
    // Stripe's budget shows only its own request.
    let genuine = stripe(&app, attacker, &event, Some(STRIPE_WEBHOOK_SECRET)).await;
    assert_eq!(genuine.status, StatusCode::OK, "{}", genuine.text());
    assert_eq!(genuine.json()["outcome"], "credited");
    assert_eq!(
        remaining(&genuine, "stripe"),
        Some(STRIPE_EVENTS.quota() - 1)
    );
    assert_eq!(common::wallet(&app, fan.id).await, 200);

    // 1,000 forged sign-ins from 1,000 addresses: each a 401 under its own
    // IP's budget; the genuine sign-in after them is the hook's first charge.
    for i in 0..1_000u32 {
        let peer = format!("10.7.{}.{}:443", i / 256, i % 256);
        let r = hook(&app, &peer, fan.id, FORGED_HOOK_SECRET).await;
        r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
        assert_eq!(remaining(&r, "unsigned"), Some(UNSIGNED.quota() - 1));
    }
    let sign_in = hook(&app, attacker, fan.id, HOOK_SECRET).await;
    assert_eq!(sign_in.status, StatusCode::OK, "{}", sign_in.text());
    assert_eq!(sign_in.json()["claims"]["app_role"], "fan");
    assert_eq!(
        remaining(&sign_in, "supabase_auth"),
        Some(SUPABASE_AUTH_HOOK.quota() - 1)
    );
    assert_ledger_clean(&app).await;
}
