//! Creator payouts (issue 12, ADR 0019): onboarding against the Connect
//! fake (whose shapes `stagepass-integrations`' `connect_fake` test checks
//! against Stripe's published OpenAPI spec), eligibility from signed Connect
//! events, opt-ins and the cycle boundaries (time moved by the test clock,
//! ADR 0014), the run (statements, holds, carried-over creators), the
//! transfer job exactly once under duplicated, concurrent and crashed
//! deliveries, the lookup after Stripe's idempotency window, refusals
//! retried for 7 days then given up, reversals, forged triggers, admin
//! holds, the CSV export, and a randomized interleaving proving no creator
//! is ever paid more than they earned. The ledger audit runs after each.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use axum::http::StatusCode;
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use common::classes::creator;
use common::{
    CRON_SECRET, STRIPE_CONNECT_WEBHOOK_SECRET, STRIPE_WEBHOOK_SECRET, TestApp, TestResponse, User,
    assert_ledger_clean, fund, journal_count, wallet,
};
use serde_json::{Value, json};
use stagepass_integrations::stripe::webhook;
use stagepass_integrations::testing::connect::{self, ConnectFake, FakeOptions};
use stagepass_routes::payouts::{RunState, TransferOutcome, transfer_payout};
use uuid::Uuid;

/// The app talking to `fake`, with the `payouts` flag on for everyone.
async fn payouts_app(fake: &ConnectFake, limited: bool) -> TestApp {
    let mut env = vec![
        ("STRIPE_API_BASE", fake.base_url().to_string()),
        ("STRIPE_SECRET_KEY", connect::SECRET_KEY.to_owned()),
    ];
    if !limited {
        env.push(("RATE_LIMITS", "off".to_owned()));
    }
    let app = TestApp::with_env(&env).await;
    sqlx::query(
        "update app.feature_flags set enabled = true, rollout_basis_points = 10000 \
          where key = 'payouts'",
    )
    .execute(&app.db.admin_pool)
    .await
    .expect("payouts flag on");
    app
}

/// The run's state, as the cron and the job build it (the outbox never
/// delivers here: jobs are run by the tests).
fn run_state(app: &TestApp, fake: &ConnectFake) -> RunState {
    let env = {
        let mut e = common::test_env(&app.db.app_url());
        e.retain(|(k, _)| *k != "STRIPE_API_BASE" && *k != "STRIPE_SECRET_KEY");
        e.push(("STRIPE_API_BASE", fake.base_url().to_string()));
        e.push(("STRIPE_SECRET_KEY", connect::SECRET_KEY.to_owned()));
        e
    };
    let mut l = common::loader(&env);
    let connect =
        stagepass_routes::payouts::Connect::load(&mut l, &app.resources).expect("connect");
    let outbox = stagepass_routes::outbox::Outbox::load(
        &mut l,
        &app.resources,
        Some(app.db.app_pool.clone()),
    )
    .expect("outbox");
    RunState {
        pool: app.db.app_pool.clone(),
        connect,
        outbox,
    }
}

/// Tokens a creator earned: a tip journal from a funded fan, as `app.tip`
/// posts it (the earning kinds are what the payout counts).
async fn earn(app: &TestApp, creator: Uuid, kind: &str, tokens: i64) {
    let fan = Uuid::now_v7();
    sqlx::query("insert into app.users (id) values ($1)")
        .bind(fan)
        .execute(&app.db.admin_pool)
        .await
        .expect("fan");
    fund(app, fan, tokens).await;
    sqlx::query(
        "select ledger.post($1, $2, array[ledger.account_of('wallet', $3), ledger.account_of('wallet', $4)], \
           array[-$5::bigint, $5::bigint], null)",
    )
    .bind(kind)
    .bind(format!("test-{}", Uuid::new_v4()))
    .bind(fan)
    .bind(creator)
    .bind(tokens)
    .execute(&app.db.admin_pool)
    .await
    .expect("earn");
}

async fn db_now(app: &TestApp) -> DateTime<Utc> {
    sqlx::query_scalar("select app.now()")
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("now")
}

/// Moves the clock to `at` (forward only).
async fn advance_to(app: &TestApp, at: DateTime<Utc>) {
    let now = db_now(app).await;
    assert!(at > now, "the clock only moves forward ({now} → {at})");
    app.db.advance_clock(at - now).await;
}

/// The next cycle day (the 1st or the 15th) strictly after today, at 00:00 UTC.
fn next_cycle_day(after: DateTime<Utc>) -> DateTime<Utc> {
    let mut d = after.date_naive() + Duration::days(1);
    while d.day() != 1 && d.day() != 15 {
        d += Duration::days(1);
    }
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap())
}

async fn connect_event(app: &TestApp, event: &Value, secret: &str) -> TestResponse {
    let body = serde_json::to_vec(event).unwrap();
    let signature = webhook::sign(&body, secret, app.db.clock.now().timestamp()).unwrap();
    app.post("/api/webhooks/stripe-connect")
        .header("stripe-signature", &signature)
        .raw_body("application/json", body)
        .send()
        .await
}

/// A creator onboarded through the API, with the fake's events delivered:
/// the transfers capability active.
async fn onboarded(app: &TestApp, fake: &ConnectFake) -> (User, String) {
    let c = creator(app).await;
    let r = app
        .post("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let account = r.json()["stripe_account_id"].as_str().unwrap().to_owned();
    for e in fake.complete_onboarding(&account) {
        let r = connect_event(app, &e, STRIPE_CONNECT_WEBHOOK_SECRET).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    (c, account)
}

async fn opt_in(app: &TestApp, who: &User, key: &str) -> TestResponse {
    app.post("/api/v1/me/payout-requests")
        .bearer(&who.token)
        .header("idempotency-key", key)
        .send()
        .await
}

async fn run_cron(app: &TestApp) -> Value {
    let r = app
        .get("/api/cron/payouts")
        .header("authorization", &format!("Bearer {CRON_SECRET}"))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

async fn payout_of(app: &TestApp, creator: Uuid) -> Option<Value> {
    sqlx::query_scalar::<_, Value>(
        "select to_jsonb(p) from app.payouts p where creator_id = $1 order by cycle desc limit 1",
    )
    .bind(creator)
    .fetch_optional(&app.db.admin_pool)
    .await
    .expect("payout")
}

fn id_of(p: &Value) -> Uuid {
    p["id"].as_str().unwrap().parse().unwrap()
}

async fn transfers_to(fake: &ConnectFake, account: &str) -> Vec<Value> {
    fake.transfers()
        .into_iter()
        .filter(|t| t["destination"] == account)
        .collect()
}

/// Sum paid (net of reversals) never above what was earned, per creator;
/// payout clearing equals what is held; the ledger audit is clean.
async fn assert_payouts_clean(app: &TestApp) {
    assert_ledger_clean(app).await;
    let over: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "select p.creator_id, sum(p.tokens - p.reversed_tokens)::bigint, \
                (select (e.tips + e.classes + e.calls) from ledger.earnings(ledger.account_of('wallet', p.creator_id), null, 'infinity') e) \
           from app.payouts p where p.status in ('held', 'sent', 'reversed') group by p.creator_id \
         having sum(p.tokens - p.reversed_tokens) > \
                (select (e.tips + e.classes + e.calls) from ledger.earnings(ledger.account_of('wallet', p.creator_id), null, 'infinity') e)",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .expect("paid vs earned");
    assert!(over.is_empty(), "paid more than earned: {over:?}");
    let (clearing, held): (i64, i64) = sqlx::query_as(
        "select (select balance from ledger.accounts where kind = 'payout_clearing' and owner_id is null and reference is null), \
                coalesce((select sum(tokens) from app.payouts where status = 'held'), 0)::bigint",
    )
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("clearing");
    assert_eq!(
        clearing, held,
        "payout clearing holds exactly the held payouts"
    );
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_creator_routes_are_behind_the_payouts_flag() {
    let fake = ConnectFake::start().await;
    // The flag as migrations seed it: off.
    let app2 = TestApp::with_env(&[
        ("STRIPE_API_BASE", fake.base_url().to_string()),
        ("STRIPE_SECRET_KEY", connect::SECRET_KEY.to_owned()),
        ("RATE_LIMITS", "off".to_owned()),
    ])
    .await;
    let c = creator(&app2).await;
    for (method, path) in [
        ("GET", "/api/v1/me/payout-account"),
        ("POST", "/api/v1/me/payout-account"),
        ("GET", "/api/v1/me/payouts"),
    ] {
        let r = app2
            .request(method.parse().unwrap(), path)
            .bearer(&c.token)
            .send()
            .await;
        r.assert_problem(StatusCode::FORBIDDEN, "feature_disabled");
    }
    let r = opt_in(&app2, &c, "k").await;
    r.assert_problem(StatusCode::FORBIDDEN, "feature_disabled");
    assert!(fake.requests().is_empty(), "nothing reached Stripe");
}

#[tokio::test(flavor = "multi_thread")]
async fn cycles_and_periods_follow_the_1st_and_15th_with_the_0600_cutoff() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let cycle = |at: &str| {
        let pool = app.db.admin_pool.clone();
        let at = at.to_owned();
        async move {
            sqlx::query_scalar::<_, NaiveDate>("select app.payout_cycle_at($1::timestamptz)")
                .bind(at)
                .fetch_one(&pool)
                .await
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(cycle("2026-12-01T05:59:59.999Z").await, "2026-12-01");
    assert_eq!(
        cycle("2026-12-01T06:00:00Z").await,
        "2026-12-15",
        "exactly 06:00 is the next cycle"
    );
    assert_eq!(cycle("2026-12-14T23:59:59Z").await, "2026-12-15");
    assert_eq!(cycle("2026-12-15T05:59:59.999999Z").await, "2026-12-15");
    assert_eq!(cycle("2026-12-15T06:00:00Z").await, "2027-01-01");
    assert_eq!(
        cycle("2026-12-31T23:59:59Z").await,
        "2027-01-01",
        "year end"
    );
    assert_eq!(
        cycle("2027-02-28T12:00:00Z").await,
        "2027-03-01",
        "short month"
    );
    assert_eq!(
        cycle("2028-02-29T12:00:00Z").await,
        "2028-03-01",
        "leap day"
    );
    // A time zone other than UTC on the way in changes nothing.
    assert_eq!(cycle("2026-12-15T07:30:00+02:00").await, "2026-12-15");
    let period = |c: &str| {
        let pool = app.db.admin_pool.clone();
        let c = c.to_owned();
        async move {
            let (s, e): (DateTime<Utc>, DateTime<Utc>) =
                sqlx::query_as("select period_start, period_end from app.payout_period($1::date)")
                    .bind(c)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (s.to_rfc3339(), e.to_rfc3339())
        }
    };
    // The 1st pays the previous month's second half; the 15th the first.
    assert_eq!(
        period("2027-03-01").await,
        (
            "2027-02-15T00:00:00+00:00".into(),
            "2027-03-01T00:00:00+00:00".into()
        )
    );
    assert_eq!(
        period("2027-01-01").await,
        (
            "2026-12-15T00:00:00+00:00".into(),
            "2027-01-01T00:00:00+00:00".into()
        )
    );
    assert_eq!(
        period("2026-12-15").await,
        (
            "2026-12-01T00:00:00+00:00".into(),
            "2026-12-15T00:00:00+00:00".into()
        )
    );

    // Through the API, with the clock moved: an opt-in at 05:59 on a cycle
    // day counts for it, one at 06:00:30 for the next.
    let (c, _) = onboarded(&app, &fake).await;
    earn(&app, c.id, "tip", 2_000).await;
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(5) + Duration::minutes(59)).await;
    let r = opt_in(&app, &c, "k1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["cycle"], day.date_naive().to_string());
    sqlx::query("delete from app.payout_requests where creator_id = $1")
        .bind(c.id)
        .execute(&app.db.admin_pool)
        .await
        .unwrap();
    advance_to(&app, day + Duration::hours(6) + Duration::seconds(30)).await;
    let r = opt_in(&app, &c, "k2").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let next = next_cycle_day(day).date_naive().to_string();
    assert_eq!(r.json()["cycle"], next);
}

#[tokio::test(flavor = "multi_thread")]
async fn onboarding_creates_one_account_and_fresh_single_use_links() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let c = creator(&app).await;

    // Before anything: no account, not eligible.
    let r = app
        .get("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["account"], Value::Null);
    assert_eq!(r.json()["eligible"], false);

    // Four concurrent first onboardings: one Express account.
    let mut handles = Vec::new();
    for _ in 0..4 {
        let req = app.post("/api/v1/me/payout-account").bearer(&c.token);
        handles.push(req.send());
    }
    let answers = futures_util::future::join_all(handles).await;
    let mut accounts = std::collections::BTreeSet::new();
    let mut urls = std::collections::BTreeSet::new();
    for a in &answers {
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(a.header("cache-control"), Some("no-store"));
        accounts.insert(a.json()["stripe_account_id"].as_str().unwrap().to_owned());
        urls.insert(a.json()["url"].as_str().unwrap().to_owned());
    }
    assert_eq!(accounts.len(), 1, "one account per creator");
    assert_eq!(urls.len(), 4, "every link is fresh");
    let created: Vec<Value> = fake
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "POST" && r.path == "/v1/accounts" && r.status == 200 && !r.replayed
        })
        .map(|r| r.response)
        .collect();
    assert_eq!(created.len(), 1, "Stripe created one account");
    let form: Vec<(String, String)> = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/accounts")
        .unwrap()
        .form;
    let has = |k: &str, v: &str| form.iter().any(|(fk, fv)| fk == k && fv == v);
    assert!(has("type", "express"));
    assert!(has("capabilities[transfers][requested]", "true"));
    assert!(
        has("settings[payouts][schedule][interval]", "daily"),
        "the bank schedule is set explicitly"
    );
    let link = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/account_links")
        .unwrap();
    let has_link = |k: &str, v: &str| link.form.iter().any(|(fk, fv)| fk == k && fv == v);
    assert!(has_link(
        "refresh_url",
        "https://app.stagepass.test/payouts/onboarding/refresh"
    ));
    assert!(has_link(
        "return_url",
        "https://app.stagepass.test/payouts/onboarding/return"
    ));
    assert!(has_link("type", "account_onboarding"));

    // The link is never stored: no column anywhere holds it.
    let url = urls.iter().next().unwrap().clone();
    let stored: i64 = sqlx::query_scalar(
        "select count(*) from app.connect_accounts a where to_jsonb(a)::text like '%' || $1 || '%'",
    )
    .bind(&url)
    .fetch_one(&app.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);

    // Requirements are shown until Stripe says the capability is active.
    let r = app
        .get("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await;
    let body = r.json();
    assert_eq!(body["account"]["transfers"], "inactive");
    assert_eq!(body["eligible"], false);
    let account = accounts.into_iter().next().unwrap();
    let events = fake.complete_onboarding(&account);
    // The newest first, then the older one: the older is stale.
    let mut outcomes = Vec::new();
    for e in events.iter().rev() {
        let r = connect_event(&app, e, STRIPE_CONNECT_WEBHOOK_SECRET).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        outcomes.push(r.json()["outcome"].as_str().unwrap().to_owned());
    }
    let r = app
        .get("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await;
    let body = r.json();
    assert_eq!(
        body["account"]["transfers"], "active",
        "{body} after {outcomes:?}"
    );
    assert_eq!(body["account"]["details_submitted"], true);
    assert_eq!(body["account"]["currently_due"], json!([]));
    assert_eq!(body["eligible"], true);

    // A redelivery changes nothing; a restriction shows what is due.
    let again = connect_event(&app, &events[0], STRIPE_CONNECT_WEBHOOK_SECRET).await;
    assert_eq!(again.json()["duplicate"], true);
    for e in fake.restrict_account(&account) {
        connect_event(&app, &e, STRIPE_CONNECT_WEBHOOK_SECRET).await;
    }
    let body = app
        .get("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await
        .json();
    assert_eq!(body["eligible"], false);
    assert!(
        !body["account"]["currently_due"]
            .as_array()
            .unwrap()
            .is_empty()
            || !body["account"]["past_due"].as_array().unwrap().is_empty()
    );

    // Fans are not paid out.
    let fan = app.signed_in_user().await;
    let r = app
        .post("/api/v1/me/payout-account")
        .bearer(&fan.token)
        .send()
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "creator_required");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_events_are_signed_with_their_own_secret_and_mode_checked() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let c = creator(&app).await;
    let r = app
        .post("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await;
    let account = r.json()["stripe_account_id"].as_str().unwrap().to_owned();
    let events = fake.complete_onboarding(&account);

    // The platform endpoint's secret is not the Connect endpoint's.
    let r = connect_event(&app, &events[0], STRIPE_WEBHOOK_SECRET).await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let r = app
        .post("/api/webhooks/stripe-connect")
        .raw_body("application/json", serde_json::to_vec(&events[0]).unwrap())
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    // A live-mode event reaching a test-mode deployment: recorded, ignored.
    let mut live = events[0].clone();
    live["id"] = json!("evt_live_1");
    live["livemode"] = json!(true);
    let r = connect_event(&app, &live, STRIPE_CONNECT_WEBHOOK_SECRET).await;
    assert_eq!(r.json()["outcome"], "wrong_mode");
    let status: String =
        sqlx::query_scalar("select transfers from app.connect_accounts where creator_id = $1")
            .bind(c.id)
            .fetch_one(&app.db.admin_pool)
            .await
            .unwrap();
    assert_eq!(
        status, "inactive",
        "nothing forged or foreign changed the account"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_is_refused_below_the_minimum_replayed_and_limited_to_three_an_hour() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, true).await;
    let (c, _) = onboarded(&app, &fake).await;
    earn(&app, c.id, "tip", 999).await;
    // Bought tokens are not earnings: 5,000 of them change nothing.
    fund(&app, c.id, 5_000).await;
    let r = opt_in(&app, &c, "below").await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "below_payout_minimum");
    earn(&app, c.id, "call_minute", 1).await;
    // (A second apart: the money burst limit is 2 a second.)
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = opt_in(&app, &c, "ok").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["payable_tokens"], 1_000);
    assert_eq!(r.json()["created"], true);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let replay = opt_in(&app, &c, "ok").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    assert_eq!(replay.json(), r.json());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // The 4th payout request in an hour is refused by the limiter (the
    // refused one and the replay counted too).
    let fourth = opt_in(&app, &c, "fourth").await;
    fourth.assert_problem(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(fourth.json()["policy"], "payouts");
    let open: i64 =
        sqlx::query_scalar("select count(*) from app.payout_requests where creator_id = $1")
            .bind(c.id)
            .fetch_one(&app.db.admin_pool)
            .await
            .unwrap();
    assert_eq!(open, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cycle_pays_1000_tokens_as_a_5000_cent_transfer_once_with_a_frozen_statement() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let s = run_state(&app, &fake);
    let (c, account) = onboarded(&app, &fake).await;
    earn(&app, c.id, "tip", 600).await;
    earn(&app, c.id, "class_settlement", 300).await;
    earn(&app, c.id, "call_minute", 100).await;
    let r = opt_in(&app, &c, "k").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());

    // Before the cycle day's 02:00 nothing is frozen.
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(1)).await;
    let run = run_cron(&app).await;
    assert_eq!(run["cycle"], Value::Null);
    assert!(payout_of(&app, c.id).await.is_none());
    advance_to(&app, day + Duration::hours(2)).await;
    let run = run_cron(&app).await;
    assert_eq!(run["cycle"], day.date_naive().to_string());
    assert_eq!(run["frozen"], 1, "{run}");
    let p = payout_of(&app, c.id).await.unwrap();
    assert_eq!(p["tokens"], 1_000);
    assert_eq!(
        p["amount_cents"], 5_000,
        "tokens × 5 cents, never dollars as cents"
    );
    assert_eq!(p["period_tips"], 600);
    assert_eq!(p["period_classes"], 300);
    assert_eq!(p["period_calls"], 100);
    assert_eq!(p["status"], "held");
    assert_eq!(
        wallet(&app, c.id).await,
        0,
        "the tokens are held in payout clearing"
    );
    // The job was queued through the outbox.
    let queued: i64 = sqlx::query_scalar(
        "select count(*) from app.outbox where kind = 'job' and destination = 'payout-transfer' \
          and payload->>'payout_id' = $1",
    )
    .bind(p["id"].as_str().unwrap())
    .fetch_one(&app.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(queued, 1);
    // The creator is told, in the published shape.
    let messages: Vec<Value> = sqlx::query_scalar(
        "select payload from app.outbox where kind = 'realtime' and name = 'payout.updated' \
          and destination = $1",
    )
    .bind(format!("user:{}", c.id))
    .fetch_all(&app.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(messages.len(), 1);
    let (_, _, schema) = stagepass_routes::openapi::REALTIME
        .iter()
        .find(|(_, name, _)| *name == "payout.updated")
        .unwrap();
    let schema: Value = serde_json::from_str(schema).unwrap();
    let mut expected: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    expected.retain(|k| *k != "seq");
    let mut got: Vec<&String> = messages[0].as_object().unwrap().keys().collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    assert_eq!(messages[0]["status"], "held");

    // Duplicated and concurrent deliveries: one transfer.
    let id = id_of(&p);
    let outcomes = futures_util::future::join_all((0..4).map(|_| transfer_payout(&s, id))).await;
    let outcomes: Vec<TransferOutcome> = outcomes.into_iter().map(|o| o.unwrap()).collect();
    assert!(outcomes.contains(&TransferOutcome::Sent), "{outcomes:?}");
    assert_eq!(
        transfer_payout(&s, id).await.unwrap(),
        TransferOutcome::AlreadyDone
    );
    let transfers = transfers_to(&fake, &account).await;
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert_eq!(transfers[0]["amount"], 5_000);
    assert_eq!(transfers[0]["currency"], "usd");
    assert_eq!(transfers[0]["transfer_group"], format!("payout:{id}"));
    assert_eq!(transfers[0]["metadata"]["payout_id"], id.to_string());
    let keys: std::collections::BTreeSet<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/transfers" && r.method == "POST")
        .filter_map(|r| r.idempotency_key)
        .collect();
    assert_eq!(
        keys.into_iter().collect::<Vec<_>>(),
        vec![format!("payout:{}:{}", c.id, day.date_naive())]
    );
    let p = payout_of(&app, c.id).await.unwrap();
    assert_eq!(p["status"], "sent");
    assert_eq!(p["transfer_id"], transfers[0]["id"]);

    // The statement cannot be edited, even by the owner of the tables.
    let edit =
        sqlx::query("update app.payouts set tokens = 2000, amount_cents = 10000 where id = $1")
            .bind(id)
            .execute(&app.db.admin_pool)
            .await;
    assert!(edit.is_err(), "a statement is immutable");

    // The creator's history, statement and CSV.
    let list = app.get("/api/v1/me/payouts").bearer(&c.token).send().await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    assert_eq!(list.json().as_array().unwrap().len(), 1);
    let one = app
        .get(&format!("/api/v1/me/payouts/{id}"))
        .bearer(&c.token)
        .send()
        .await;
    assert_eq!(one.json()["carried_over"], 0);
    let csv = app
        .get(&format!("/api/v1/me/payouts/{id}/earnings"))
        .bearer(&c.token)
        .send()
        .await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    let text = csv.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "earned_at,source,reference,tokens,cents");
    assert_eq!(lines.len(), 4, "{text}");
    let total: i64 = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(3).unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(total, 1_000);
    assert!(
        lines.iter().any(|l| l.contains(",class,")) && lines.iter().any(|l| l.contains(",call,"))
    );
    // Another creator sees none of it.
    let other = creator(&app).await;
    let r = app
        .get(&format!("/api/v1/me/payouts/{id}"))
        .bearer(&other.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .get(&format!("/api/v1/me/payouts/{id}/earnings"))
        .bearer(&other.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Running again the same day pays nothing twice.
    let again = run_cron(&app).await;
    assert_eq!(again["frozen"], 0);
    assert_eq!(journal_count(&app, "payout_sent").await, 1);
    assert_payouts_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_stripe_answered_is_found_by_the_retry_and_by_the_lookup_after_24_hours() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let s = run_state(&app, &fake);
    let mut creators = Vec::new();
    for _ in 0..3 {
        let (c, account) = onboarded(&app, &fake).await;
        earn(&app, c.id, "tip", 1_500).await;
        assert_eq!(opt_in(&app, &c, "k").await.status, StatusCode::CREATED);
        creators.push((c, account));
    }
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(2)).await;
    assert_eq!(run_cron(&app).await["frozen"], 3);

    // The job asked Stripe, Stripe made the transfer, and the function died
    // before its commit: the attempt is recorded, the answer is not.
    let crash = |creator: Uuid| {
        let app = &app;
        let fake = &fake;
        async move {
            let p = payout_of(app, creator).await.unwrap();
            let id = id_of(&p);
            let mut tx = stagepass_platform::db::begin_service(&app.db.app_pool)
                .await
                .unwrap();
            let (_, attempt) = stagepass_ledger::payouts::begin_attempt(&mut tx, id)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            fake.client()
                .create_transfer(
                    &stagepass_routes::payouts::transfer_params(&attempt),
                    &attempt.idempotency_key(),
                )
                .await
                .unwrap();
            id
        }
    };
    // 1. Retried within Stripe's idempotency window: the same key and
    //    parameters get the transfer Stripe made; it is recorded once.
    let (c1, account1) = &creators[0];
    let id1 = crash(c1.id).await;
    assert_eq!(payout_of(&app, c1.id).await.unwrap()["status"], "held");
    assert_eq!(
        transfer_payout(&s, id1).await.unwrap(),
        TransferOutcome::Sent
    );
    assert_eq!(
        transfers_to(&fake, account1).await.len(),
        1,
        "no second transfer"
    );
    assert_eq!(
        transfer_payout(&s, id1).await.unwrap(),
        TransferOutcome::AlreadyDone
    );

    // 2. After Stripe forgot the key (24 h), the retry looks the transfer up
    //    before creating one.
    let (c2, account2) = &creators[1];
    let id2 = crash(c2.id).await;
    fake.forget_idempotency_keys();
    app.db.advance_clock(Duration::hours(25)).await;
    let lists_before = fake.count("GET", "/v1/transfers");
    assert_eq!(
        transfer_payout(&s, id2).await.unwrap(),
        TransferOutcome::Sent
    );
    assert!(
        fake.count("GET", "/v1/transfers") > lists_before,
        "looked up first"
    );
    assert_eq!(
        transfers_to(&fake, account2).await.len(),
        1,
        "no second transfer"
    );

    // 3. Nobody retries: the hourly run's reconciliation finds it.
    let (c3, account3) = &creators[2];
    crash(c3.id).await;
    app.db.advance_clock(Duration::minutes(11)).await;
    let run = run_cron(&app).await;
    assert_eq!(
        run["reconciled"], 1,
        "the hourly run found the unrecorded transfer: {run}"
    );
    assert_eq!(payout_of(&app, c3.id).await.unwrap()["status"], "sent");
    assert_eq!(transfers_to(&fake, account3).await.len(), 1);
    assert_payouts_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unseen_answer_keeps_the_tokens_held_and_the_same_key_pays_once() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let s = run_state(&app, &fake);
    let (c, account) = onboarded(&app, &fake).await;
    earn(&app, c.id, "tip", 1_000).await;
    assert_eq!(opt_in(&app, &c, "k").await.status, StatusCode::CREATED);
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(2)).await;
    run_cron(&app).await;
    let id = id_of(&payout_of(&app, c.id).await.unwrap());

    // Stripe answers 500 (not executed) twice, then 429: held, retried.
    fake.fail_next("/v1/transfers", 500, 2);
    assert_eq!(
        transfer_payout(&s, id).await.unwrap(),
        TransferOutcome::Retrying
    );
    assert_eq!(wallet(&app, c.id).await, 0, "still held");
    fake.fail_next("/v1/transfers", 429, 2);
    app.db.advance_clock(Duration::minutes(1)).await;
    assert_eq!(
        transfer_payout(&s, id).await.unwrap(),
        TransferOutcome::Retrying
    );
    // Not due yet: nothing is sent.
    assert_eq!(
        transfer_payout(&s, id).await.unwrap(),
        TransferOutcome::NotDue
    );
    // Stripe executes it but the answer is lost twice (the client resends
    // with the same key and gets the saved answer).
    fake.fail_after_execute_next("/v1/transfers", 1);
    app.db.advance_clock(Duration::minutes(5)).await;
    assert_eq!(
        transfer_payout(&s, id).await.unwrap(),
        TransferOutcome::Sent
    );
    assert_eq!(transfers_to(&fake, &account).await.len(), 1);
    let p = payout_of(&app, c.id).await.unwrap();
    assert_eq!(p["status"], "sent");
    assert!(p["attempts"].as_i64().unwrap() >= 3);
    assert_payouts_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_transfer_is_released_retried_daily_for_7_days_then_given_up() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let s = run_state(&app, &fake);
    let (c, account) = onboarded(&app, &fake).await;
    earn(&app, c.id, "tip", 1_200).await;
    assert_eq!(opt_in(&app, &c, "k").await.status, StatusCode::CREATED);
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(2)).await;
    run_cron(&app).await;
    let id = id_of(&payout_of(&app, c.id).await.unwrap());
    // Stripe restricts the account after the freeze (we have not heard yet).
    let _ = fake.restrict_account(&account);

    let mut outcomes = Vec::new();
    for _ in 0..10 {
        let o = transfer_payout(&s, id).await.unwrap();
        outcomes.push(o.clone());
        if o == TransferOutcome::Released {
            assert_eq!(
                wallet(&app, c.id).await,
                1_200,
                "released back to the wallet"
            );
        }
        if o == TransferOutcome::Abandoned {
            break;
        }
        app.db
            .advance_clock(Duration::days(1) + Duration::minutes(1))
            .await;
        fake.forget_idempotency_keys();
    }
    assert_eq!(
        outcomes.first(),
        Some(&TransferOutcome::Released),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.last(),
        Some(&TransferOutcome::Abandoned),
        "{outcomes:?}"
    );
    let released = outcomes
        .iter()
        .filter(|o| **o == TransferOutcome::Released)
        .count();
    assert!(
        (6..=8).contains(&released),
        "daily retries for 7 days: {outcomes:?}"
    );
    let p = payout_of(&app, c.id).await.unwrap();
    assert_eq!(p["status"], "abandoned");
    assert_eq!(wallet(&app, c.id).await, 1_200, "nothing lost");
    assert!(transfers_to(&fake, &account).await.is_empty());
    assert_eq!(
        transfer_payout(&s, id).await.unwrap(),
        TransferOutcome::AlreadyDone
    );
    assert_payouts_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ineligible_or_held_creator_is_skipped_and_carried_over_to_the_next_cycle() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let s = run_state(&app, &fake);
    // Not onboarded yet.
    let c = creator(&app).await;
    let r = app
        .post("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await;
    let account = r.json()["stripe_account_id"].as_str().unwrap().to_owned();
    earn(&app, c.id, "tip", 1_000).await;
    assert_eq!(opt_in(&app, &c, "k").await.status, StatusCode::CREATED);
    // Held by an admin.
    let (h, _) = onboarded(&app, &fake).await;
    earn(&app, h.id, "tip", 1_000).await;
    assert_eq!(opt_in(&app, &h, "k").await.status, StatusCode::CREATED);
    let admin = app.admin().await;
    let r = app
        .put(&format!("/api/v1/admin/payout-holds/{}", h.id))
        .bearer(&admin.token)
        .json(&json!({ "held": true, "reason": "chargeback review" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["changed"], true);
    // Only admins hold.
    let r = app
        .put(&format!("/api/v1/admin/payout-holds/{}", h.id))
        .bearer(&c.token)
        .json(&json!({ "held": true, "reason": "x" }))
        .send()
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "admin_required");

    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(2)).await;
    let run = run_cron(&app).await;
    assert_eq!(run["frozen"], 0, "{run}");
    assert_eq!(run["skipped"]["transfers_inactive"], 1, "{run}");
    assert_eq!(run["skipped"]["held"], 1, "{run}");
    let me = app
        .get("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await
        .json();
    assert_eq!(me["summary"]["skipped_reason"], "transfers_inactive");

    // Onboarding completes later that day, the hold is released: both wait
    // for the next cycle, when they are paid.
    for e in fake.complete_onboarding(&account) {
        connect_event(&app, &e, STRIPE_CONNECT_WEBHOOK_SECRET).await;
    }
    let r = app
        .put(&format!("/api/v1/admin/payout-holds/{}", h.id))
        .bearer(&admin.token)
        .json(&json!({ "held": false, "reason": "cleared" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    app.db.advance_clock(Duration::hours(3)).await;
    assert_eq!(
        run_cron(&app).await["frozen"],
        0,
        "not before the next cycle"
    );
    let next = next_cycle_day(day);
    advance_to(&app, next + Duration::hours(2)).await;
    let run = run_cron(&app).await;
    assert_eq!(run["frozen"], 2, "{run}");
    for who in [&c, &h] {
        let p = payout_of(&app, who.id).await.unwrap();
        assert_eq!(p["cycle"], next.date_naive().to_string());
        assert_eq!(p["tokens"], 1_000);
        assert_eq!(p["carried_over"], 1_000, "earned in an earlier period");
        assert_eq!(
            transfer_payout(&s, id_of(&p)).await.unwrap(),
            TransferOutcome::Sent
        );
    }
    let log: Vec<String> = sqlx::query_scalar(
        "select action from app.payout_hold_log where creator_id = $1 order by id",
    )
    .bind(h.id)
    .fetch_all(&app.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(log, ["hold", "release"]);
    assert_payouts_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reversal_after_the_payout_recredits_once_and_bank_payouts_are_shown() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let s = run_state(&app, &fake);
    let (c, account) = onboarded(&app, &fake).await;
    earn(&app, c.id, "tip", 2_000).await;
    assert_eq!(opt_in(&app, &c, "k").await.status, StatusCode::CREATED);
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(2)).await;
    run_cron(&app).await;
    let id = id_of(&payout_of(&app, c.id).await.unwrap());
    assert_eq!(
        transfer_payout(&s, id).await.unwrap(),
        TransferOutcome::Sent
    );
    let transfer = transfers_to(&fake, &account).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A partial reversal of 2,503 cents: 500 whole tokens back.
    fake.client()
        .create_transfer_reversal(&transfer, Some(2_503), "rev-1")
        .await
        .unwrap();
    let event = fake
        .events()
        .into_iter()
        .rev()
        .find(|e| e["type"] == "transfer.reversed")
        .unwrap();
    let body = serde_json::to_vec(&event).unwrap();
    let deliver = || {
        let sig =
            webhook::sign(&body, STRIPE_WEBHOOK_SECRET, app.db.clock.now().timestamp()).unwrap();
        app.post("/api/webhooks/stripe")
            .header("stripe-signature", &sig)
            .raw_body("application/json", body.clone())
            .send()
    };
    let r = deliver().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["outcome"], "reversed:500");
    assert_eq!(deliver().await.json()["duplicate"], true);
    assert_eq!(wallet(&app, c.id).await, 500);
    let p = payout_of(&app, c.id).await.unwrap();
    assert_eq!(p["status"], "sent");
    assert_eq!(p["reversed_cents"], 2_503);
    assert_eq!(p["reversed_tokens"], 500);

    // A bank payout failing is recorded and shown (no tokens move).
    let failed = fake.bank_payout_event(&account, "failed", 7_497);
    let r = connect_event(&app, &failed, STRIPE_CONNECT_WEBHOOK_SECRET).await;
    assert_eq!(r.json()["outcome"], "applied", "{}", r.text());
    let me = app
        .get("/api/v1/me/payout-account")
        .bearer(&c.token)
        .send()
        .await
        .json();
    assert_eq!(me["account"]["bank_payout_status"], "failed");
    assert_eq!(wallet(&app, c.id).await, 500);
    assert_payouts_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_triggers_are_refused_and_change_nothing() {
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let (c, _) = onboarded(&app, &fake).await;
    earn(&app, c.id, "tip", 1_000).await;
    assert_eq!(opt_in(&app, &c, "k").await.status, StatusCode::CREATED);
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(2)).await;
    for auth in [None, Some("Bearer not-the-cron-secret")] {
        let mut req = app.get("/api/cron/payouts");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await;
        r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");
    }
    // The user-facing routes are no trigger either: a creator cannot run it.
    let r = app.get("/api/cron/payouts").bearer(&c.token).send().await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(payout_of(&app, c.id).await.is_none(), "nothing frozen");
    // The job: unsigned and forged QStash calls.
    run_cron(&app).await;
    let id = id_of(&payout_of(&app, c.id).await.unwrap());
    let body = serde_json::to_vec(&json!({ "payout_id": id })).unwrap();
    let r = app
        .post("/api/jobs/payout-transfer")
        .raw_body("application/json", body.clone())
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_qstash_signature");
    let forged = stagepass_integrations::qstash::sign(
        "not-our-signing-key",
        "https://api.stagepass.test/api/jobs/payout-transfer",
        &body,
        Utc::now().timestamp(),
        300,
    );
    let r = app
        .post("/api/jobs/payout-transfer")
        .header("upstash-signature", &forged)
        .raw_body("application/json", body)
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_qstash_signature");
    assert!(fake.transfers().is_empty());
    assert_eq!(payout_of(&app, c.id).await.unwrap()["status"], "held");
    // A signed job works (the real path, through the QStash signature).
    let body = serde_json::to_vec(&json!({ "payout_id": id })).unwrap();
    let signed = stagepass_integrations::qstash::sign(
        common::QSTASH_CURRENT_KEY,
        "https://api.stagepass.test/api/jobs/payout-transfer",
        &body,
        Utc::now().timestamp(),
        300,
    );
    let r = app
        .post("/api/jobs/payout-transfer")
        .header("upstash-signature", &signed)
        .raw_body("application/json", body)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["outcome"], "sent");
    assert_payouts_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platform_balance_is_checked_up_front_and_the_rest_waits() {
    let fake = ConnectFake::start_with(FakeOptions {
        rate_limit_per_second: None,
        platform_available_cents: 12_000,
    })
    .await;
    let app = payouts_app(&fake, false).await;
    let mut creators = Vec::new();
    for _ in 0..3 {
        let (c, _) = onboarded(&app, &fake).await;
        earn(&app, c.id, "tip", 1_000).await;
        assert_eq!(opt_in(&app, &c, "k").await.status, StatusCode::CREATED);
        creators.push(c);
    }
    let day = next_cycle_day(db_now(&app).await);
    advance_to(&app, day + Duration::hours(2)).await;
    let run = run_cron(&app).await;
    assert_eq!(run["platform_available_cents"], 12_000);
    assert_eq!(run["frozen"], 2, "$120 covers two $50 payouts: {run}");
    assert_eq!(run["skipped"]["platform_funds"], 1, "{run}");
    // Funds arrive: the next hourly run that day pays the third.
    fake.set_available(1_000_000);
    app.db.advance_clock(Duration::hours(1)).await;
    let run = run_cron(&app).await;
    assert_eq!(run["frozen"], 1, "{run}");
    assert_payouts_clean(&app).await;
}

/// A seeded random interleaving: creators earn, spend, opt in; cycles run;
/// transfer jobs are delivered late, twice and concurrently; Stripe fails
/// (500, 429, lost answers, refusals); transfers are reversed. After every
/// step no creator has been paid more than they earned, payout clearing
/// holds exactly the held payouts, and the ledger audit is clean.
#[tokio::test(flavor = "multi_thread")]
async fn no_interleaving_pays_a_creator_more_than_they_earned() {
    let seed: u64 = std::env::var("PAYOUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(Utc::now().timestamp_subsec_nanos()));
    eprintln!("PAYOUT_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let fake = ConnectFake::start().await;
    let app = payouts_app(&fake, false).await;
    let s = run_state(&app, &fake);
    let mut creators = Vec::new();
    for _ in 0..4 {
        creators.push(onboarded(&app, &fake).await);
    }
    let spender = app.signed_in_user().await;
    for step in 0..150 {
        let (c, account) = &creators[rng.below(creators.len() as u64) as usize];
        let action = rng.below(12);
        if std::env::var("PAYOUT_TRACE").is_ok() {
            eprintln!("step {step}: action {action}");
        }
        match action {
            0..=2 => {
                earn(
                    &app,
                    c.id,
                    ["tip", "class_settlement", "call_minute"][rng.below(3) as usize],
                    800 + rng.below(1200) as i64,
                )
                .await
            }
            3 => {
                // The creator spends some of their earnings (a tip onwards).
                let w = wallet(&app, c.id).await;
                if w > 0 {
                    let n = 1 + rng.below(1 + w as u64 / 3) as i64;
                    sqlx::query(
                        "select ledger.post('tip', $1, array[ledger.account_of('wallet', $2), ledger.account_of('wallet', $3)], array[-$4::bigint, $4::bigint], null)",
                    )
                    .bind(format!("spend-{step}"))
                    .bind(c.id)
                    .bind(spender.id)
                    .bind(n)
                    .execute(&app.db.admin_pool)
                    .await
                    .unwrap();
                }
            }
            4 | 5 => {
                let r = opt_in(&app, c, &format!("k{step}")).await;
                if std::env::var("PAYOUT_TRACE").is_ok() {
                    eprintln!("step {step}: opt-in {} {}", r.status, r.text());
                }
            }
            6 => {
                let now = db_now(&app).await;
                let next = next_cycle_day(now)
                    + Duration::hours(2)
                    + Duration::minutes(rng.below(300) as i64);
                advance_to(&app, next).await;
                let run = run_cron(&app).await;
                if std::env::var("PAYOUT_TRACE").is_ok() {
                    eprintln!("step {step}: {run}");
                }
            }
            7 => {
                // Stripe misbehaves for the next calls, or changes the
                // account (and tells us, or not yet).
                match rng.below(6) {
                    0 => fake.fail_next("/v1/transfers", 500, 1),
                    1 => fake.fail_next("/v1/transfers", 429, 1),
                    2 => fake.fail_after_execute_next("/v1/transfers", 1),
                    3 => fake.fail_next("/v1/transfers", 503, 1),
                    4 => {
                        let events = fake.restrict_account(account);
                        if rng.below(2) == 0 {
                            for e in events {
                                connect_event(&app, &e, STRIPE_CONNECT_WEBHOOK_SECRET).await;
                            }
                        }
                    }
                    _ => {
                        for e in fake.complete_onboarding(account) {
                            connect_event(&app, &e, STRIPE_CONNECT_WEBHOOK_SECRET).await;
                        }
                    }
                }
            }
            8 | 9 | 11 => {
                // Deliver every pending transfer job, some twice at once.
                let ids: Vec<Uuid> = sqlx::query_scalar(
                    "select id from app.payouts where status in ('held', 'released')",
                )
                .fetch_all(&app.db.admin_pool)
                .await
                .unwrap();
                for id in ids {
                    if rng.below(2) == 0 {
                        let (a, b) = tokio::join!(transfer_payout(&s, id), transfer_payout(&s, id));
                        a.unwrap();
                        b.unwrap();
                    } else {
                        transfer_payout(&s, id).await.unwrap();
                    }
                }
                let hours = 1 + rng.below(30) as i64;
                app.db.advance_clock(Duration::hours(hours)).await;
                // Stripe keeps a key at least 24 h: only then may the fake
                // forget them all (every key it holds was saved before this
                // step's advance). Forgetting younger keys lets a retry
                // inside the window create a second transfer, which no
                // client can prevent: the likely cause of one failed run in
                // 15 ("step 42: {payout:…: 2}", 2026-11-30).
                if hours >= 24 {
                    fake.forget_idempotency_keys();
                }
            }
            _ => {
                // Reverse part of a sent transfer and tell us (sometimes twice).
                let sent: Option<(String, i64, i64)> = sqlx::query_as(
                    "select transfer_id, amount_cents, reversed_cents from app.payouts where status = 'sent' limit 1",
                )
                .fetch_optional(&app.db.admin_pool)
                .await
                .unwrap();
                if let Some((transfer, amount, reversed)) = sent
                    && amount > reversed
                {
                    let part = 1 + rng.below((amount - reversed) as u64) as i64;
                    // An injected failure meant for a transfer may meet the
                    // reversal first (same path prefix): try again.
                    let mut reversed_ok = false;
                    for _ in 0..4 {
                        if fake
                            .client()
                            .create_transfer_reversal(&transfer, Some(part), &format!("rev-{step}"))
                            .await
                            .is_ok()
                        {
                            reversed_ok = true;
                            break;
                        }
                    }
                    assert!(reversed_ok, "step {step}: the reversal never went through");
                    let event = fake
                        .events()
                        .into_iter()
                        .rev()
                        .find(|e| e["type"] == "transfer.reversed")
                        .unwrap();
                    let body = serde_json::to_vec(&event).unwrap();
                    for _ in 0..1 + rng.below(2) {
                        let sig = webhook::sign(
                            &body,
                            STRIPE_WEBHOOK_SECRET,
                            app.db.clock.now().timestamp(),
                        )
                        .unwrap();
                        let r = app
                            .post("/api/webhooks/stripe")
                            .header("stripe-signature", &sig)
                            .raw_body("application/json", body.clone())
                            .send()
                            .await;
                        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                    }
                }
            }
        }
        assert_payouts_clean(&app).await;
        // Each payout's transfer exists at most once at Stripe.
        let mut groups = std::collections::BTreeMap::<String, usize>::new();
        for t in fake.transfers() {
            *groups
                .entry(t["transfer_group"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
        assert!(groups.values().all(|n| *n == 1), "step {step}: {groups:?}");
        // What Stripe sent equals what we recorded as sent.
        let recorded: i64 = sqlx::query_scalar(
            "select coalesce(sum(amount_cents), 0)::bigint from app.payouts where status in ('sent', 'reversed')",
        )
        .fetch_one(&app.db.admin_pool)
        .await
        .unwrap();
        let at_stripe: i64 = fake
            .transfers()
            .iter()
            .map(|t| t["amount"].as_i64().unwrap())
            .sum();
        let unrecorded: i64 = sqlx::query_scalar(
            "select coalesce(sum(amount_cents), 0)::bigint from app.payouts where status = 'held' and attempts > 0",
        )
        .fetch_one(&app.db.admin_pool)
        .await
        .unwrap();
        assert!(
            recorded <= at_stripe && at_stripe <= recorded + unrecorded,
            "step {step}: recorded {recorded}, at Stripe {at_stripe}, unrecorded at most {unrecorded}"
        );
    }
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("select status, count(*) from app.payouts group by status order by status")
            .fetch_all(&app.db.admin_pool)
            .await
            .unwrap();
    eprintln!(
        "payouts by status: {statuses:?}; transfers at Stripe: {}",
        fake.transfers().len()
    );
}

/// xorshift64*: a seeded, reproducible sequence.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) % n.max(1)
    }
}
