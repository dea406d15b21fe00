//! End-to-end money path: the compiled purchase, webhook, tip and balance
//! functions, with localstripe as Stripe (it creates PaymentIntents and
//! sends signed webhooks by itself).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagepass_integrations::testing::{CARD_SUCCEEDS, LocalStripe, SECRET_KEY};
use stagepass_platform::testing::TestDb;
use support::{Function, env_for, mint};

const WEBHOOK_SECRET: &str = "whsec_e2e_money_secret";

async fn balance(f: &Function, token: &str) -> Value {
    f.get("/api/v1/tokens/balance", Some(token))
        .await
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_card_purchase_is_credited_once_by_the_webhook_and_a_retry_charges_nothing() {
    let Some(stripe) = LocalStripe::start().await else {
        return;
    };
    let db = TestDb::new().await;
    let mut env = env_for(&db);
    let base = stripe.base_url().to_string();
    let base: &'static str = Box::leak(base.into_boxed_str());
    env.extend([
        ("STRIPE_SECRET_KEY", SECRET_KEY),
        ("STRIPE_API_BASE", base),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
    ]);
    let purchases = Function::start("v1_tokens_purchases", &env).await;
    let webhooks = Function::start("webhooks_stripe", &env).await;
    let balances = Function::start("v1_tokens_balance", &env).await;
    stripe
        .register_webhook(&webhooks.url("/api/webhooks/stripe"), WEBHOOK_SECRET)
        .await
        .expect("register webhook");

    let fan = uuid::Uuid::new_v4();
    let token = mint(fan, Some("buyer@example.com"));
    let buy = || async {
        let r = purchases
            .client()
            .post(purchases.url("/api/v1/tokens/purchases"))
            .bearer_auth(&token)
            .header("idempotency-key", "buy-small-1")
            .json(&json!({"package": "small"}))
            .send()
            .await
            .expect("request");
        (
            r.status().as_u16(),
            r.headers().get("idempotency-replayed").is_some(),
            r.json::<Value>().await.expect("json"),
        )
    };
    let (status, replayed, created) = buy().await;
    assert_eq!(status, 201, "{created}");
    assert!(!replayed);
    assert_eq!(created["tokens"], 200);
    assert_eq!(created["price_cents"], 1_900);
    let intent = created["payment_intent_id"]
        .as_str()
        .expect("pi")
        .to_owned();
    assert!(created["client_secret"].as_str().is_some());

    // A client retry with the same key: the same PaymentIntent, no new charge.
    let (status, replayed, again) = buy().await;
    assert_eq!(status, 201);
    assert!(replayed);
    assert_eq!(again["payment_intent_id"], intent.as_str());

    // Nothing is credited before Stripe says so.
    assert_eq!(balance(&balances, &token).await["balance"], 0);

    // The frontend confirms with Stripe.js; localstripe then sends the
    // signed payment_intent.succeeded webhook to the webhook function.
    let confirmed = stripe
        .client()
        .confirm_payment_intent(&intent, Some(CARD_SUCCEEDS))
        .await
        .expect("confirm");
    assert_eq!(format!("{:?}", confirmed.status), "Succeeded");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let b = balance(&balances, &token).await;
        if b["balance"] == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the webhook never credited: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Exactly once: one purchase journal, one PaymentIntent at Stripe's side.
    let journals: i64 =
        sqlx::query_scalar("select count(*) from ledger.journals where kind = 'purchase'")
            .fetch_one(&db.admin_pool)
            .await
            .expect("count");
    assert_eq!(journals, 1);
    let purchases_rows: i64 =
        sqlx::query_scalar("select count(*) from app.purchases where status = 'succeeded'")
            .fetch_one(&db.admin_pool)
            .await
            .expect("count");
    assert_eq!(purchases_rows, 1);
    let mut conn = db.admin_pool.acquire().await.expect("conn");
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report:?}");
}

/// Create a class → a fan enrols (price into escrow) → the creator cancels →
/// the fan has every token back and the creator got nothing, and the fan's
/// private calendar feed shows the class, then shows it cancelled — all
/// through the compiled functions.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_class_refunds_its_fans_through_the_binaries() {
    let db = TestDb::new().await;
    let env = env_for(&db);
    let classes = Function::start("v1_classes", &env).await;
    let enrol = Function::start("v1_classes_enrollments", &env).await;
    let cancel = Function::start("v1_classes_cancel", &env).await;
    let balances = Function::start("v1_tokens_balance", &env).await;
    let mut feed_env = env.clone();
    feed_env.push(("PUBLIC_BASE_URL", "https://api.stagepass.test"));
    let feed_token = Function::start("v1_schedule_feed_token", &feed_env).await;
    let feed = Function::start("v1_schedule_feed", &env).await;

    let creator = uuid::Uuid::new_v4();
    let fan = uuid::Uuid::new_v4();
    let creator_token = mint(creator, Some("host@example.com"));
    let fan_token = mint(fan, Some("fan@example.com"));
    // Both exist after their first request; then the operator makes the
    // creator a creator and the fan gets tokens as a purchase would.
    assert_eq!(balance(&balances, &creator_token).await["balance"], 0);
    assert_eq!(balance(&balances, &fan_token).await["balance"], 0);
    sqlx::query("select app.operator_set_role($1, 'creator', 'e2e', null)")
        .bind(creator)
        .execute(&db.admin_pool)
        .await
        .expect("creator");
    sqlx::query(
        "select ledger.post('purchase', 'e2e-fund', \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-100, 100]::bigint[], null)",
    )
    .bind(fan)
    .execute(&db.admin_pool)
    .await
    .expect("fund");

    let starts_at = (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339();
    let created = classes
        .client()
        .post(classes.url("/api/v1/classes"))
        .bearer_auth(&creator_token)
        .json(
            &json!({"title": "Sunday jazz", "starts_at": starts_at, "time_zone": "Europe/Berlin",
                      "duration_minutes": 60, "capacity": 10, "price_tokens": 40}),
        )
        .send()
        .await
        .expect("create");
    assert_eq!(created.status().as_u16(), 201);
    let class: Value = created.json().await.expect("json");
    let id = class["id"].as_str().expect("id").to_owned();

    let enrolled = enrol
        .client()
        .post(enrol.url(&format!("/api/v1/classes/{id}/enrollments")))
        .bearer_auth(&fan_token)
        .header("idempotency-key", "enrol-1")
        .json(&json!({}))
        .send()
        .await
        .expect("enrol");
    let status = enrolled.status().as_u16();
    assert_eq!(status, 201, "{}", enrolled.text().await.unwrap_or_default());
    assert_eq!(balance(&balances, &fan_token).await["balance"], 60);

    let made = feed_token
        .send(
            reqwest::Method::POST,
            "/api/v1/schedule/feed-token",
            Some(&fan_token),
            None,
        )
        .await;
    assert_eq!(made.status().as_u16(), 201);
    let made: Value = made.json().await.expect("json");
    let feed_path = made["url"]
        .as_str()
        .and_then(|u| u.strip_prefix("https://api.stagepass.test"))
        .expect("a feed URL under PUBLIC_BASE_URL")
        .to_owned();
    let calendar = |expect: &'static str| {
        let (feed, path) = (&feed, feed_path.clone());
        async move {
            let r = feed.get(&path, None).await;
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(
                r.headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some("text/calendar; charset=utf-8")
            );
            let text = r.text().await.expect("body");
            assert!(text.contains(&format!("\r\n{expect}\r\n")), "{text}");
            text
        }
    };
    let confirmed = calendar("STATUS:CONFIRMED").await;
    assert!(confirmed.contains(&format!("UID:class-{id}@stagepass.app")));

    let cancelled = cancel
        .client()
        .post(cancel.url(&format!("/api/v1/classes/{id}/cancel")))
        .bearer_auth(&creator_token)
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancelled.status().as_u16(), 200);
    assert_eq!(balance(&balances, &fan_token).await["balance"], 100);
    assert_eq!(balance(&balances, &creator_token).await["balance"], 0);
    calendar("STATUS:CANCELLED").await;
    let mut conn = db.admin_pool.acquire().await.expect("conn");
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report:?}");
}
