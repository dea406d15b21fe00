//! End-to-end money path: the compiled purchase, webhook, tip and balance
//! functions, with localstripe as Stripe (it creates PaymentIntents and
//! sends signed webhooks by itself); classes; and paid calls, billed by the
//! minute with time moved by the test clock.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagepass_integrations::testing::{CARD_SUCCEEDS, LocalStripe, SECRET_KEY};
use stagepass_platform::testing::TestDb;
use support::{AGORA_APP_CERTIFICATE, Function, env_for, mint};

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

const CRON_SECRET: &str = "cron-secret-for-e2e-calls-0123456789";

/// One function binary's answer: (status, body).
async fn call_json(
    f: &Function,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let r = f
        .send(
            method,
            path,
            Some(token),
            body.map(Value::to_string).as_deref(),
        )
        .await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Settings → request (Idempotency-Key, replayed) → accept → both join →
/// three minutes billed by heartbeats as the database clock moves, with the
/// billing cron finding nothing left to charge → a hang-up inside minute 3
/// settles: the fan paid exactly 3 minutes, the creator got them, the
/// escrow is empty, the ledger audits clean; and each party's Agora token
/// is for the call's own channel with that party's uid — all through the
/// compiled functions.
#[tokio::test(flavor = "multi_thread")]
async fn a_paid_call_bills_three_minutes_and_settles_through_the_binaries() {
    const PRICE: i64 = 20;
    let db = TestDb::new().await;
    // The calls feature flag is off by default (ADR 0016): on for everyone
    // before any function reads it.
    sqlx::query(
        "update app.feature_flags set enabled = true, rollout_basis_points = 10000 \
          where key = 'calls'",
    )
    .execute(&db.admin_pool)
    .await
    .expect("calls flag on");
    let mut env = env_for(&db);
    env.push(("CRON_SECRET", CRON_SECRET));
    let settings = Function::start("v1_me_call_settings", &env).await;
    let creator_settings = Function::start("v1_creators_call_settings", &env).await;
    let requests = Function::start("v1_calls", &env).await;
    let item = Function::start("v1_calls_id", &env).await;
    let actions = Function::start("v1_calls_action", &env).await;
    let tokens = Function::start("v1_calls_token", &env).await;
    let bill = Function::start("cron_bill_calls", &env).await;
    let balances = Function::start("v1_tokens_balance", &env).await;

    let creator = uuid::Uuid::new_v4();
    let fan = uuid::Uuid::new_v4();
    let creator_token = mint(creator, Some("caller-host@example.com"));
    let fan_token = mint(fan, Some("caller-fan@example.com"));
    assert_eq!(balance(&balances, &creator_token).await["balance"], 0);
    assert_eq!(balance(&balances, &fan_token).await["balance"], 0);
    sqlx::query("select app.operator_set_role($1, 'creator', 'e2e', null)")
        .bind(creator)
        .execute(&db.admin_pool)
        .await
        .expect("creator");
    sqlx::query(
        "select ledger.post('purchase', 'e2e-call-fund', \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-1000, 1000]::bigint[], null)",
    )
    .bind(fan)
    .execute(&db.admin_pool)
    .await
    .expect("fund");

    use reqwest::Method;
    let (status, set) = call_json(
        &settings,
        Method::PUT,
        "/api/v1/me/call-settings",
        &creator_token,
        Some(&json!({"price_per_minute": PRICE, "audio_enabled": true, "video_enabled": true})),
    )
    .await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(set["price_per_minute"], PRICE);
    let (status, seen) = call_json(
        &creator_settings,
        Method::GET,
        &format!("/api/v1/creators/{creator}/call-settings"),
        &fan_token,
        None,
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["price_per_minute"], PRICE);

    let ask = || async {
        let r = requests
            .client()
            .post(requests.url("/api/v1/calls"))
            .bearer_auth(&fan_token)
            .header("idempotency-key", "call-1")
            .json(&json!({"creator_id": creator, "media": "video"}))
            .send()
            .await
            .expect("request");
        (
            r.status().as_u16(),
            r.headers().get("idempotency-replayed").is_some(),
            r.json::<Value>().await.expect("json"),
        )
    };
    let (status, replayed, asked) = ask().await;
    assert_eq!(status, 201, "{asked}");
    assert!(!replayed);
    assert_eq!(asked["status"], "ringing");
    assert_eq!(asked["price_per_minute"], PRICE);
    let id = asked["id"].as_str().expect("id").to_owned();
    // A client retry with the same key: the same call, not a second one.
    let (status, replayed, again) = ask().await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again["id"], id.as_str());

    let act = |who: &'static str, action: &'static str| {
        let (actions, id) = (&actions, id.clone());
        let token = if who == "fan" {
            fan_token.clone()
        } else {
            creator_token.clone()
        };
        async move {
            let (status, body) = call_json(
                actions,
                Method::POST,
                &format!("/api/v1/calls/{id}/{action}"),
                &token,
                None,
            )
            .await;
            assert_eq!(status, 200, "{who} {action}: {body}");
            body
        }
    };
    let accepted = act("creator", "accept").await;
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["held_tokens"], 2 * PRICE);
    assert_eq!(
        balance(&balances, &fan_token).await["balance"],
        1000 - 2 * PRICE
    );

    act("creator", "join").await;
    let active = act("fan", "join").await;
    assert_eq!(active["status"], "active");
    assert_eq!(
        active["billed_minutes"], 1,
        "minute 1 is charged at the start"
    );

    // Each party's Agora token: the call's channel, the party's own uid.
    let (fan_uid, creator_uid, channel): (i64, i64, String) =
        sqlx::query_as("select fan_uid, creator_uid, channel from app.calls where id = $1::uuid")
            .bind(&id)
            .fetch_one(&db.admin_pool)
            .await
            .expect("call row");
    assert_eq!(channel, format!("call_{}", id.replace('-', "")));
    for (who, token, uid) in [
        ("fan", &fan_token, fan_uid),
        ("creator", &creator_token, creator_uid),
    ] {
        let (status, body) = call_json(
            &tokens,
            Method::POST,
            &format!("/api/v1/calls/{id}/token"),
            token,
            None,
        )
        .await;
        assert_eq!(status, 200, "{who} token: {body}");
        let decoded = stagepass_integrations::agora::decode(body["token"].as_str().expect("token"))
            .expect("an AccessToken2");
        assert!(
            decoded.verify(&AGORA_APP_CERTIFICATE.to_owned().into()),
            "signed with the project's certificate"
        );
        assert_eq!(decoded.app_id, support::AGORA_APP_ID);
        assert_eq!(decoded.rtc.channel, channel, "{who}");
        assert_eq!(decoded.uid().map(i64::from), Some(uid), "{who}");
        assert_eq!(body["channel"], channel.as_str());
        assert_eq!(body["uid"], uid);
    }
    assert_ne!(fan_uid, creator_uid);

    let sweep = || async {
        let r = bill
            .client()
            .get(bill.url("/api/cron/bill-calls"))
            .bearer_auth(CRON_SECRET)
            .send()
            .await
            .expect("cron");
        assert_eq!(r.status().as_u16(), 200);
        r.json::<Value>().await.expect("json")
    };
    // +61 s: minute 2 has started; the fan's heartbeat charges it and
    // holds minute 3.
    db.advance_clock(chrono::Duration::seconds(61)).await;
    let hb = act("fan", "heartbeat").await;
    assert_eq!(
        (hb["billed_minutes"].as_i64(), hb["funded_minutes"].as_i64()),
        (Some(2), Some(3))
    );
    assert_eq!(sweep().await["charged_minutes"], 0, "nothing more is due");
    // +121 s: minute 3, charged by the creator's heartbeat.
    db.advance_clock(chrono::Duration::seconds(60)).await;
    let hb = act("creator", "heartbeat").await;
    assert_eq!(
        (hb["billed_minutes"].as_i64(), hb["funded_minutes"].as_i64()),
        (Some(3), Some(4))
    );
    // Two sweeps at once and a replayed heartbeat charge nothing more.
    let (a, b) = tokio::join!(sweep(), sweep());
    assert_eq!(
        (a["charged_minutes"].as_i64(), b["charged_minutes"].as_i64()),
        (Some(0), Some(0))
    );
    act("fan", "heartbeat").await;
    assert_eq!(
        balance(&balances, &creator_token).await["balance"],
        3 * PRICE
    );

    // +151 s, inside minute 3: the fan hangs up; minute 4's hold goes back.
    db.advance_clock(chrono::Duration::seconds(30)).await;
    let ended = act("fan", "hang-up").await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["end_reason"], "hung_up");
    assert_eq!(ended["billed_minutes"], 3);
    assert_eq!(ended["refunded_tokens"], PRICE);
    let (status, read) = call_json(
        &item,
        Method::GET,
        &format!("/api/v1/calls/{id}"),
        &creator_token,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(read["status"], "ended");
    assert_eq!(read["charged_tokens"], 3 * PRICE);
    assert_eq!(read["held_tokens"], 0);
    sweep().await;

    assert_eq!(
        balance(&balances, &fan_token).await["balance"],
        1000 - 3 * PRICE
    );
    assert_eq!(
        balance(&balances, &creator_token).await["balance"],
        3 * PRICE
    );
    let (escrow, minutes, holds, refunds): (i64, i64, i64, i64) = sqlx::query_as(
        "select (select balance from ledger.accounts where kind = 'escrow' and reference = 'call:' || $1), \
                (select count(*) from ledger.journals where kind = 'call_minute'), \
                (select count(*) from ledger.journals where kind = 'call_hold'), \
                (select count(*) from ledger.journals where kind = 'call_refund')",
    )
    .bind(&id)
    .fetch_one(&db.admin_pool)
    .await
    .expect("escrow");
    assert_eq!((escrow, minutes, holds, refunds), (0, 3, 3, 1));
    let mut conn = db.admin_pool.acquire().await.expect("conn");
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report:?}");
}
