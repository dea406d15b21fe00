//! Paid 1:1 calls (issue 11, ADR 0018): settings, the request with the
//! price snapshotted in SQL, the answer, joins, per-minute billing driven
//! by heartbeats and the sweep (time moved by the test clock, ADR 0014),
//! the heartbeat timeout, running out of funds, hanging up, duplicated and
//! concurrent sweeps, races (accept vs cancel, the fan's last tokens vs a
//! tip), and the Agora token's scope. The ledger invariants are checked
//! after every money test, and every call's escrow is empty once it ended.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use axum::http::StatusCode;
use chrono::Duration;
use common::classes::{creator, fan_with};
use common::{
    AGORA_APP_CERTIFICATE, CRON_SECRET, TestApp, TestResponse, User, assert_ledger_clean,
    journal_count, wallet,
};
use serde_json::{Value, json};
use stagepass_integrations::agora;
use uuid::Uuid;

/// The test app with the `calls` flag on for everyone and no rate limits
/// (heartbeats and many money requests of one user).
async fn calls_app() -> TestApp {
    let app = TestApp::unlimited().await;
    sqlx::query(
        "update app.feature_flags set enabled = true, rollout_basis_points = 10000 \
          where key = 'calls'",
    )
    .execute(&app.db.admin_pool)
    .await
    .expect("calls flag on");
    app
}

async fn settings(app: &TestApp, who: &User, price: i64) -> TestResponse {
    app.put("/api/v1/me/call-settings")
        .bearer(&who.token)
        .json(&json!({ "price_per_minute": price, "audio_enabled": true, "video_enabled": true }))
        .send()
        .await
}

/// A creator taking calls at `price` tokens a minute.
async fn calling_creator(app: &TestApp, price: i64) -> User {
    let c = creator(app).await;
    let r = settings(app, &c, price).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    c
}

async fn request(app: &TestApp, fan: &User, creator: &User, key: &str) -> TestResponse {
    app.post("/api/v1/calls")
        .bearer(&fan.token)
        .header("idempotency-key", key)
        .json(&json!({ "creator_id": creator.id, "media": "video" }))
        .send()
        .await
}

/// Requests a call and returns its id.
async fn ring(app: &TestApp, fan: &User, creator: &User) -> String {
    let r = request(app, fan, creator, &Uuid::new_v4().to_string()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}

async fn act(app: &TestApp, who: &User, call: &str, action: &str) -> TestResponse {
    app.post(&format!("/api/v1/calls/{call}/{action}"))
        .bearer(&who.token)
        .send()
        .await
}

async fn ok(app: &TestApp, who: &User, call: &str, action: &str) -> Value {
    let r = act(app, who, call, action).await;
    assert_eq!(r.status, StatusCode::OK, "{action}: {}", r.text());
    r.json()
}

/// Rings, accepts and has both join: minute 1 is charged.
async fn connected(app: &TestApp, fan: &User, creator: &User) -> String {
    let call = ring(app, fan, creator).await;
    ok(app, creator, &call, "accept").await;
    ok(app, creator, &call, "join").await;
    let c = ok(app, fan, &call, "join").await;
    assert_eq!(c["status"], "active");
    assert_eq!(c["billed_minutes"], 1);
    call
}

async fn sweep(app: &TestApp) -> Value {
    let r = app
        .get("/api/cron/bill-calls")
        .header("authorization", &format!("Bearer {CRON_SECRET}"))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

async fn get(app: &TestApp, who: &User, call: &str) -> Value {
    let r = app
        .get(&format!("/api/v1/calls/{call}"))
        .bearer(&who.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

async fn calls_recorded(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from app.calls")
        .fetch_one(&app.db.admin_pool)
        .await
        .unwrap()
}

async fn escrow(app: &TestApp, call: &str) -> i64 {
    sqlx::query_scalar(
        "select balance from ledger.accounts where kind = 'escrow' and reference = 'call:' || $1",
    )
    .bind(call)
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("escrow")
}

/// The call invariants over the whole database, beside the ledger's: each
/// call's escrow holds exactly its funded-but-unbilled minutes (0 once it
/// is over), its charges are exactly minutes 1..=billed, its holds exactly
/// its funded minutes, and every call journal balances.
async fn assert_calls_clean(app: &TestApp) {
    assert_ledger_clean(app).await;
    let drifted: Vec<(Uuid, String, i64, i64)> = sqlx::query_as(
        "select c.id, c.status, a.balance, \
                case when c.status in ('accepted', 'active') \
                     then (c.funded_minutes - c.billed_minutes) * c.price_per_minute else 0 end \
           from app.calls c join ledger.accounts a on a.kind = 'escrow' and a.reference = 'call:' || c.id \
          where a.balance <> case when c.status in ('accepted', 'active') \
                     then (c.funded_minutes - c.billed_minutes) * c.price_per_minute else 0 end",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .unwrap();
    assert!(drifted.is_empty(), "escrow drifted: {drifted:?}");
    let bad_minutes: Vec<(Uuid, i32, i64, i64)> = sqlx::query_as(
        "select c.id, c.billed_minutes, count(j.id), coalesce(max(split_part(j.reference, ':', 2)::int), 0) \
           from app.calls c left join ledger.journals j \
             on j.kind = 'call_minute' and split_part(j.reference, ':', 1) = c.id::text \
          group by c.id, c.billed_minutes \
         having count(j.id) <> c.billed_minutes or coalesce(max(split_part(j.reference, ':', 2)::int), 0) <> c.billed_minutes",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .unwrap();
    assert!(
        bad_minutes.is_empty(),
        "minutes charged ≠ billed: {bad_minutes:?}"
    );
    let bad_holds: Vec<(Uuid, i32, i64)> = sqlx::query_as(
        "select c.id, c.funded_minutes, coalesce(sum(e.amount), 0)::bigint \
           from app.calls c left join ledger.journals j \
             on j.kind = 'call_hold' and split_part(j.reference, ':', 1) = c.id::text \
           left join ledger.entries e on e.journal_id = j.id and e.amount > 0 \
          group by c.id, c.funded_minutes, c.price_per_minute \
         having coalesce(sum(e.amount), 0) <> c.funded_minutes * c.price_per_minute",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .unwrap();
    assert!(
        bad_holds.is_empty(),
        "holds ≠ funded minutes: {bad_holds:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_routes_are_behind_the_calls_flag() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    let c = creator(&app).await;
    settings(&app, &c, 10)
        .await
        .assert_problem(StatusCode::FORBIDDEN, "feature_disabled");
    request(&app, &fan, &c, "k1")
        .await
        .assert_problem(StatusCode::FORBIDDEN, "feature_disabled");
    assert_eq!(calls_recorded(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_creators_set_a_price_and_everyone_can_read_it() {
    let app = calls_app().await;
    let fan = app.signed_in_user().await;
    let c = creator(&app).await;
    settings(&app, &fan, 10)
        .await
        .assert_problem(StatusCode::FORBIDDEN, "creator_required");
    for bad in [0, -5, 10_001] {
        let r = settings(&app, &c, bad).await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), "price_per_minute");
    }
    app.get(&format!("/api/v1/creators/{}/call-settings", c.id))
        .bearer(&fan.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(settings(&app, &c, 40).await.status, StatusCode::OK);
    let r = app
        .get(&format!("/api/v1/creators/{}/call-settings", c.id))
        .bearer(&fan.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["price_per_minute"], 40);
    assert_eq!(r.json()["video_enabled"], true);
    let mine = app
        .get("/api/v1/me/call-settings")
        .bearer(&c.token)
        .send()
        .await;
    assert_eq!(mine.json()["price_per_minute"], 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_price_is_the_creators_snapshotted_on_the_call_never_the_clients() {
    let app = calls_app().await;
    let c = calling_creator(&app, 30).await;
    let fan = fan_with(&app, 1000).await;

    // A price in the request is refused (unknown field), nothing is created.
    app.post("/api/v1/calls")
        .bearer(&fan.token)
        .header("idempotency-key", "tamper")
        .json(&json!({ "creator_id": c.id, "media": "video", "price_per_minute": 1 }))
        .send()
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "validation_failed");

    let call = ring(&app, &fan, &c).await;
    // The creator raises the price after the request: this call keeps 30.
    assert_eq!(settings(&app, &c, 500).await.status, StatusCode::OK);
    let accepted = ok(&app, &c, &call, "accept").await;
    assert_eq!(accepted["price_per_minute"], 30);
    assert_eq!(accepted["held_tokens"], 60);
    assert_eq!(wallet(&app, fan.id).await, 1000 - 60);
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_is_refused_when_the_fan_cannot_fund_the_first_minutes() {
    let app = calls_app().await;
    let c = calling_creator(&app, 50).await;
    let poor = fan_with(&app, 99).await;
    request(&app, &poor, &c, "k")
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds");
    // Own call, a creator not taking this kind, an unknown creator.
    request(&app, &c, &c, "own")
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "own_call");
    let audio_only = creator(&app).await;
    app.put("/api/v1/me/call-settings")
        .bearer(&audio_only.token)
        .json(&json!({ "price_per_minute": 5, "audio_enabled": true, "video_enabled": false }))
        .send()
        .await;
    let rich = fan_with(&app, 1000).await;
    request(&app, &rich, &audio_only, "video")
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "not_taking_calls");
    let stranger = app.signed_in_user().await;
    request(&app, &rich, &stranger, "nobody")
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "not_taking_calls");
    assert_eq!(calls_recorded(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_request_answers_the_same_and_a_fan_has_one_open_call() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let other = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 1000).await;
    let first = request(&app, &fan, &c, "same-key").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = request(&app, &fan, &c, "same-key").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.json()["id"], first.json()["id"]);
    request(&app, &fan, &other, "another-key")
        .await
        .assert_problem(StatusCode::CONFLICT, "call_already_open");

    // Concurrent requests with different keys: exactly one call.
    let fan2 = fan_with(&app, 1000).await;
    let (a, b) = tokio::join!(
        request(&app, &fan2, &c, "a"),
        request(&app, &fan2, &other, "b")
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_billed_minutes_then_a_hang_up_settle_exactly() {
    let app = calls_app().await;
    let c = calling_creator(&app, 25).await;
    let fan = fan_with(&app, 1000).await;
    let call = ring(&app, &fan, &c).await;

    // Only the creator answers; the fan cannot accept their own request.
    act(&app, &fan, &call, "accept")
        .await
        .assert_problem(StatusCode::FORBIDDEN, "wrong_call_party");
    let accepted = ok(&app, &c, &call, "accept").await;
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(
        ok(&app, &c, &call, "accept").await["sequence"],
        accepted["sequence"],
        "a repeated accept changes nothing"
    );
    assert_eq!(wallet(&app, fan.id).await, 950);
    assert_eq!(escrow(&app, &call).await, 50);

    ok(&app, &c, &call, "join").await;
    let active = ok(&app, &fan, &call, "join").await;
    assert_eq!(active["status"], "active");
    assert_eq!(
        active["billed_minutes"], 1,
        "minute 1 is charged when it starts"
    );
    assert_eq!(wallet(&app, c.id).await, 25);

    // Minute 2 starts at +60 s: a heartbeat charges it and holds minute 3.
    app.db.advance_clock(Duration::seconds(61)).await;
    let hb = ok(&app, &fan, &call, "heartbeat").await;
    assert_eq!(
        (hb["billed_minutes"].as_i64(), hb["funded_minutes"].as_i64()),
        (Some(2), Some(3))
    );
    // Minute 3 at +120 s, charged by the sweep this time.
    app.db.advance_clock(Duration::seconds(19)).await;
    ok(&app, &c, &call, "heartbeat").await;
    app.db.advance_clock(Duration::seconds(45)).await;
    ok(&app, &fan, &call, "heartbeat").await;
    let run = sweep(&app).await;
    assert_eq!(
        run["charged_minutes"], 0,
        "the heartbeat already charged minute 3"
    );
    assert_eq!(get(&app, &c, &call).await["billed_minutes"], 3);
    // A second sweep and a replayed heartbeat charge nothing more.
    sweep(&app).await;
    ok(&app, &fan, &call, "heartbeat").await;
    assert_eq!(journal_count(&app, "call_minute").await, 3);

    // Hang up at +150 s, inside minute 3: it stays charged, minute 4's hold
    // goes back.
    app.db.advance_clock(Duration::seconds(25)).await;
    let ended = ok(&app, &fan, &call, "hang-up").await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["end_reason"], "hung_up");
    assert_eq!(ended["ended_by"], json!(fan.id));
    assert_eq!(ended["billed_minutes"], 3);
    assert_eq!(ended["refunded_tokens"], 25);
    assert_eq!(wallet(&app, c.id).await, 75);
    assert_eq!(wallet(&app, fan.id).await, 1000 - 75);
    assert_eq!(escrow(&app, &call).await, 0);
    // Repeating the hang-up changes nothing; other actions are conflicts.
    assert_eq!(
        ok(&app, &c, &call, "hang-up").await["sequence"],
        ended["sequence"]
    );
    act(&app, &fan, &call, "heartbeat")
        .await
        .assert_problem(StatusCode::CONFLICT, "call_state_conflict");
    sweep(&app).await;
    assert_eq!(wallet(&app, c.id).await, 75);
    assert_calls_clean(&app).await;

    // Both parties were told every change, in order.
    let told: Vec<(String, String)> = sqlx::query_as(
        "select destination, payload->>'status' from app.outbox \
          where name = 'call.updated' and payload->>'call_id' = $1 order by id",
    )
    .bind(&call)
    .fetch_all(&app.db.admin_pool)
    .await
    .unwrap();
    for party in [&fan, &c] {
        let statuses: Vec<&str> = told
            .iter()
            .filter(|(d, _)| *d == format!("user:{}", party.id))
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(statuses.first(), Some(&"ringing"));
        assert_eq!(statuses.last(), Some(&"ended"));
        assert!(statuses.contains(&"active"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_call_ends_at_its_last_heartbeat_and_is_never_billed_for_the_silence() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 1000).await;
    let call = connected(&app, &fan, &c).await;
    app.db.advance_clock(Duration::seconds(30)).await;
    ok(&app, &fan, &call, "heartbeat").await;
    // Silence from +30 s. Sweeps at +90 s and +140 s charge nothing (minute
    // 2 started at +60 s, after the last sign of life) and keep it open.
    app.db.advance_clock(Duration::seconds(60)).await;
    assert_eq!(sweep(&app).await["charged_minutes"], 0);
    app.db.advance_clock(Duration::seconds(50)).await;
    sweep(&app).await;
    assert_eq!(get(&app, &fan, &call).await["status"], "active");
    // +151 s: 121 s of silence: ended at +30 s.
    app.db.advance_clock(Duration::seconds(11)).await;
    sweep(&app).await;
    let ended = get(&app, &fan, &call).await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["end_reason"], "heartbeat_timeout");
    assert_eq!(ended["billed_minutes"], 1);
    assert_eq!(ended["ended_at"], ended["last_seen_at"]);
    assert_eq!(wallet(&app, c.id).await, 10);
    assert_eq!(wallet(&app, fan.id).await, 990);
    // A late heartbeat does not revive it.
    act(&app, &fan, &call, "heartbeat")
        .await
        .assert_problem(StatusCode::CONFLICT, "call_state_conflict");
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_funds_warns_at_60_and_30_seconds_and_ends_when_the_funded_time_ends() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 30).await;
    let call = connected(&app, &fan, &c).await;
    // +60 s: minute 2 charged, minute 3 held (the fan's last 10 tokens).
    app.db.advance_clock(Duration::seconds(60)).await;
    ok(&app, &fan, &call, "heartbeat").await;
    assert_eq!(wallet(&app, fan.id).await, 0);
    // +120 s: minute 3 charged; no minute 4 can be held: 60 s left.
    app.db.advance_clock(Duration::seconds(60)).await;
    let c3 = ok(&app, &c, &call, "heartbeat").await;
    assert_eq!(c3["billed_minutes"], 3);
    assert_eq!(c3["ending_for_funds"], true);
    let warnings = |app: &TestApp| {
        let pool = app.db.admin_pool.clone();
        let call = call.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "select distinct payload->>'seconds_left' from app.outbox \
                  where name = 'call.ending' and payload->>'call_id' = $1 order by 1",
            )
            .bind(call)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(warnings(&app).await, ["60"]);
    // The precise moments are QStash jobs (call-tick), 30 s before the end
    // and at it.
    let ticks: Vec<String> = sqlx::query_scalar(
        "select dedup_key from app.outbox where kind = 'job' and destination = 'call-tick' \
          and payload->>'call_id' = $1 order by not_before",
    )
    .bind(&call)
    .fetch_all(&app.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(
        ticks,
        [
            format!("call-tick:{call}:warn"),
            format!("call-tick:{call}:end")
        ]
    );
    // +150 s: the 30 s warning (the sweep does what the tick would).
    app.db.advance_clock(Duration::seconds(30)).await;
    sweep(&app).await;
    assert_eq!(warnings(&app).await, ["30", "60"]);
    assert_eq!(get(&app, &fan, &call).await["status"], "active");
    // +180 s: the funded time is over.
    app.db.advance_clock(Duration::seconds(30)).await;
    sweep(&app).await;
    let ended = get(&app, &fan, &call).await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["end_reason"], "funds_exhausted");
    assert_eq!(ended["billed_minutes"], 3);
    let at = |v: &Value| {
        v.as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    };
    assert_eq!(
        at(&ended["ended_at"]) - at(&ended["started_at"]),
        Duration::seconds(180),
        "ended when the third funded minute ran out"
    );
    assert_eq!(wallet(&app, c.id).await, 30);
    assert_eq!(wallet(&app, fan.id).await, 0);
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_call_rings_out_after_two_minutes() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 100).await;
    let call = ring(&app, &fan, &c).await;
    app.db.advance_clock(Duration::seconds(121)).await;
    act(&app, &c, &call, "accept")
        .await
        .assert_problem(StatusCode::CONFLICT, "call_rang_out");
    // The late answer recorded the expiry (it is not left to the sweep).
    assert_eq!(get(&app, &fan, &call).await["status"], "expired");
    act(&app, &c, &call, "accept")
        .await
        .assert_problem(StatusCode::CONFLICT, "call_state_conflict");
    sweep(&app).await;
    assert_eq!(get(&app, &fan, &call).await["status"], "expired");
    assert_eq!(wallet(&app, fan.id).await, 100);
    // The fan may call again.
    ring(&app, &fan, &c).await;
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_accepted_call_nobody_joins_is_refunded_in_full() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 100).await;
    let call = ring(&app, &fan, &c).await;
    ok(&app, &c, &call, "accept").await;
    ok(&app, &fan, &call, "join").await;
    app.db.advance_clock(Duration::seconds(121)).await;
    sweep(&app).await;
    let ended = get(&app, &c, &call).await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["end_reason"], "not_joined");
    assert_eq!(ended["billed_minutes"], 0);
    assert_eq!(wallet(&app, fan.id).await, 100);
    assert_eq!(wallet(&app, c.id).await, 0);
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_racing_cancel_ends_one_way_only() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    for _ in 0..6 {
        let fan = fan_with(&app, 100).await;
        let call = ring(&app, &fan, &c).await;
        let (accept, cancel) = tokio::join!(
            act(&app, &c, &call, "accept"),
            act(&app, &fan, &call, "cancel")
        );
        let state = get(&app, &fan, &call).await;
        match state["status"].as_str() {
            Some("accepted") => {
                assert_eq!(accept.status, StatusCode::OK);
                cancel.assert_problem(StatusCode::CONFLICT, "call_state_conflict");
                assert_eq!(wallet(&app, fan.id).await, 80);
                // Free the creator for the next round.
                ok(&app, &c, &call, "hang-up").await;
                assert_eq!(wallet(&app, fan.id).await, 100);
            }
            Some("cancelled") => {
                assert_eq!(cancel.status, StatusCode::OK);
                accept.assert_problem(StatusCode::CONFLICT, "call_state_conflict");
                assert_eq!(wallet(&app, fan.id).await, 100);
            }
            other => panic!("unexpected state {other:?}"),
        }
    }
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fans_last_tokens_go_to_a_tip_or_to_the_call_never_both() {
    let app = calls_app().await;
    let c = calling_creator(&app, 50).await;
    for i in 0..4 {
        let fan = fan_with(&app, 100).await;
        let call = ring(&app, &fan, &c).await;
        let tip = app
            .post("/api/v1/tips")
            .bearer(&fan.token)
            .header("idempotency-key", &format!("tip-{i}"))
            .json(&json!({ "recipient_id": c.id, "amount": 100 }));
        let (tip, accept) = tokio::join!(tip.send(), act(&app, &c, &call, "accept"));
        let tipped = tip.status == StatusCode::CREATED;
        let accepted = accept.status == StatusCode::OK;
        assert!(
            tipped ^ accepted,
            "tip {} / accept {}",
            tip.status,
            accept.status
        );
        if !accepted {
            accept.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds");
            // Nothing moved; the call still rings.
            assert_eq!(get(&app, &fan, &call).await["status"], "ringing");
            assert_eq!(escrow(&app, &call).await, 0);
            ok(&app, &fan, &call, "cancel").await;
        } else {
            ok(&app, &fan, &call, "hang-up").await;
        }
        assert_eq!(wallet(&app, fan.id).await, if tipped { 0 } else { 100 });
    }
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicated_and_concurrent_sweeps_charge_each_due_minute_once() {
    let app = calls_app().await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let c = calling_creator(&app, 7).await;
        let fan = fan_with(&app, 10_000).await;
        calls.push((connected(&app, &fan, &c).await, fan, c));
    }
    for minute in 2..=5 {
        app.db.advance_clock(Duration::seconds(60)).await;
        // Everyone is still there…
        sqlx::query("update app.calls set fan_seen_at = app.now() where status = 'active'")
            .execute(&app.db.admin_pool)
            .await
            .unwrap();
        // …and four sweeps race, then two more run late.
        let (a, b, c, d) = tokio::join!(sweep(&app), sweep(&app), sweep(&app), sweep(&app));
        let charged: i64 = [a, b, c, d, sweep(&app).await, sweep(&app).await]
            .iter()
            .map(|r| r["charged_minutes"].as_i64().unwrap())
            .sum();
        assert_eq!(charged, 8, "minute {minute}: one per call");
        for (call, _, c) in &calls {
            assert_eq!(get(&app, c, call).await["billed_minutes"], minute);
        }
    }
    assert_eq!(journal_count(&app, "call_minute").await, 8 * 5);
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_skipped_sweep_catches_up_by_index() {
    let app = calls_app().await;
    let c = calling_creator(&app, 3).await;
    let fan = fan_with(&app, 1000).await;
    let call = connected(&app, &fan, &c).await;
    // No sweep for 3½ minutes (heartbeats recorded, none charged): the next
    // sweep charges minutes 2, 3 and 4 at once, topping the escrow up as it
    // goes; the ones after it find nothing due.
    app.db.advance_clock(Duration::seconds(210)).await;
    sqlx::query("update app.calls set fan_seen_at = app.now() where id = $1::uuid")
        .bind(&call)
        .execute(&app.db.admin_pool)
        .await
        .unwrap();
    assert_eq!(sweep(&app).await["charged_minutes"], 3);
    assert_eq!(sweep(&app).await["charged_minutes"], 0);
    assert_eq!(get(&app, &c, &call).await["billed_minutes"], 4);
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_for_the_calls_own_channel_its_two_parties_and_only_while_it_runs() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 1000).await;
    let stranger = app.signed_in_user().await;
    let call = ring(&app, &fan, &c).await;
    let token = |who: &User| {
        app.post(&format!("/api/v1/calls/{call}/token"))
            .bearer(&who.token)
            .send()
    };
    token(&fan)
        .await
        .assert_problem(StatusCode::CONFLICT, "call_state_conflict");
    ok(&app, &c, &call, "accept").await;
    token(&stranger)
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    let mut uids = Vec::new();
    for who in [&fan, &c] {
        let r = token(who).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let body = r.json();
        let decoded = agora::decode(body["token"].as_str().unwrap()).unwrap();
        assert!(decoded.verify(&AGORA_APP_CERTIFICATE.to_owned().into()));
        let rtc = &decoded.rtc;
        assert_eq!(rtc.channel, format!("call_{}", call.replace('-', "")));
        assert_eq!(body["channel"], rtc.channel.as_str());
        let uid = decoded.uid().expect("an integer uid");
        assert_ne!(uid, 0);
        assert_eq!(body["uid"], uid);
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1]);
    ok(&app, &c, &call, "join").await;
    ok(&app, &fan, &call, "join").await;
    // Active: the join privilege is the funded time (2 minutes from the
    // start) plus the 60 s grace.
    let r = token(&fan).await;
    let decoded = agora::decode(r.json()["token"].as_str().unwrap()).unwrap();
    assert!(
        (170..=180).contains(&decoded.expire),
        "expire {}",
        decoded.expire
    );
    ok(&app, &fan, &call, "hang-up").await;
    token(&fan)
        .await
        .assert_problem(StatusCode::CONFLICT, "call_state_conflict");
    assert_calls_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_creator_is_in_one_call_at_a_time() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let a = fan_with(&app, 100).await;
    let b = fan_with(&app, 100).await;
    let first = ring(&app, &a, &c).await;
    let second = ring(&app, &b, &c).await;
    ok(&app, &c, &first, "accept").await;
    act(&app, &c, &second, "accept")
        .await
        .assert_problem(StatusCode::CONFLICT, "creator_busy");
    assert_eq!(wallet(&app, b.id).await, 100);
    ok(&app, &c, &first, "hang-up").await;
    ok(&app, &c, &second, "accept").await;
    let mine = app.get("/api/v1/me/calls").bearer(&c.token).send().await;
    assert_eq!(mine.status, StatusCode::OK);
    assert_eq!(mine.json()["calls"].as_array().unwrap().len(), 2);
    assert_calls_clean(&app).await;
}

/// Sends an Agora notification signed with `secret`.
async fn notify(app: &TestApp, body: &Value, secret: &str) -> TestResponse {
    let raw = serde_json::to_vec(body).unwrap();
    let signature = agora::notify::sign(&raw, &secret.to_owned().into());
    app.post("/api/webhooks/agora")
        .header("agora-signature-v2", &signature)
        .raw_body("application/json", raw)
        .send()
        .await
}

fn channel_event(
    notice: &str,
    event: i64,
    call: &str,
    uid: i64,
    seq: i64,
    reason: Option<i64>,
) -> Value {
    let mut payload = json!({
        "channelName": format!("call_{}", call.replace('-', "")),
        "uid": uid, "platform": 1, "clientSeq": seq, "ts": 1_700_000_000,
    });
    if let Some(r) = reason {
        payload["reason"] = json!(r);
        payload["duration"] = json!(42);
    }
    json!({ "noticeId": notice, "productId": 1, "eventType": event,
            "notifyMs": 1_700_000_000_000_i64, "sid": "s", "payload": payload })
}

async fn uids(app: &TestApp, call: &str) -> (i64, i64) {
    sqlx::query_as("select fan_uid, creator_uid from app.calls where id = $1::uuid")
        .bind(call)
        .fetch_one(&app.db.admin_pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn agora_notifications_need_the_signature_and_count_once() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 1000).await;
    let call = connected(&app, &fan, &c).await;
    let (fan_uid, _) = uids(&app, &call).await;
    let leave = channel_event("n-1", 104, &call, fan_uid, 7, Some(2));

    // Forged: another secret, a tampered body, no header, garbage.
    notify(&app, &leave, "not-the-agora-secret-at-all-0000")
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let raw = serde_json::to_vec(&leave).unwrap();
    let good = agora::notify::sign(&raw, &common::AGORA_NOTIFICATION_SECRET.to_owned().into());
    let mut tampered = leave.clone();
    tampered["payload"]["reason"] = json!(1);
    app.post("/api/webhooks/agora")
        .header("agora-signature-v2", &good)
        .raw_body("application/json", serde_json::to_vec(&tampered).unwrap())
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    app.post("/api/webhooks/agora")
        .raw_body("application/json", raw.clone())
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    app.post("/api/webhooks/agora")
        .header("agora-signature-v2", "00")
        .raw_body("application/json", raw.clone())
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    let recorded = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from app.agora_notices")
            .fetch_one(&app.db.admin_pool)
            .await
            .unwrap()
    };
    assert_eq!(recorded().await, 0, "nothing forged is recorded");

    // Genuine, then redelivered (twice at once, then once more).
    let first = notify(&app, &leave, common::AGORA_NOTIFICATION_SECRET).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.json()["outcome"], "left");
    let (a, b) = tokio::join!(
        notify(&app, &leave, common::AGORA_NOTIFICATION_SECRET),
        notify(&app, &leave, common::AGORA_NOTIFICATION_SECRET)
    );
    for r in [
        a,
        b,
        notify(&app, &leave, common::AGORA_NOTIFICATION_SECRET).await,
    ] {
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["duplicate"], true);
    }
    assert_eq!(recorded().await, 1);
    // A verified body that is not a notification is a 400.
    let junk = json!({ "hello": "world" });
    notify(&app, &junk, common::AGORA_NOTIFICATION_SECRET)
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_party_who_drops_out_ends_the_call_at_the_leave_unless_they_rejoin() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 1000).await;
    let secret = common::AGORA_NOTIFICATION_SECRET;

    // Rejoined within the grace: the call goes on.
    let call = connected(&app, &fan, &c).await;
    let (fan_uid, creator_uid) = uids(&app, &call).await;
    notify(
        &app,
        &channel_event("a-1", 104, &call, fan_uid, 10, Some(2)),
        secret,
    )
    .await;
    app.db.advance_clock(Duration::seconds(20)).await;
    let rejoin = notify(
        &app,
        &channel_event("a-2", 103, &call, fan_uid, 11, None),
        secret,
    )
    .await;
    assert_eq!(rejoin.json()["outcome"], "joined");
    // An older leave arriving late is stale and changes nothing.
    let stale = notify(
        &app,
        &channel_event("a-0", 104, &call, fan_uid, 9, Some(2)),
        secret,
    )
    .await;
    assert_eq!(stale.json()["outcome"], "stale");
    // A quit is the client's own leave: it hangs up through the API.
    let quit = notify(
        &app,
        &channel_event("a-3", 104, &call, creator_uid, 4, Some(1)),
        secret,
    )
    .await;
    assert_eq!(quit.json()["outcome"], "quit");
    app.db.advance_clock(Duration::seconds(50)).await;
    ok(&app, &c, &call, "heartbeat").await;
    sweep(&app).await;
    assert_eq!(get(&app, &fan, &call).await["status"], "active");
    ok(&app, &fan, &call, "hang-up").await;

    // Dropped (timeout) at +10 s and never back; the creator keeps
    // heartbeating. No minute after the leave is charged; the call ends at
    // the leave once the 60 s grace is over.
    let call = connected(&app, &fan, &c).await;
    let (fan_uid, _) = uids(&app, &call).await;
    app.db.advance_clock(Duration::seconds(10)).await;
    notify(
        &app,
        &channel_event("b-1", 104, &call, fan_uid, 3, Some(2)),
        secret,
    )
    .await;
    app.db.advance_clock(Duration::seconds(55)).await;
    let still = ok(&app, &c, &call, "heartbeat").await;
    assert_eq!(still["status"], "active");
    assert_eq!(
        still["billed_minutes"], 1,
        "minute 2 started after the leave"
    );
    app.db.advance_clock(Duration::seconds(10)).await;
    sweep(&app).await;
    let ended = get(&app, &fan, &call).await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["end_reason"], "left_channel");
    assert_eq!(ended["billed_minutes"], 1);
    // Events about an ended call, another channel or another product are
    // recorded and ignored.
    let late = notify(
        &app,
        &channel_event("b-2", 103, &call, fan_uid, 4, None),
        secret,
    )
    .await;
    assert_eq!(late.json()["outcome"], "ignored");
    let mut other = channel_event("b-3", 104, &call, fan_uid, 5, Some(2));
    other["productId"] = json!(3);
    assert_eq!(
        notify(&app, &other, secret).await.json()["outcome"],
        "ignored"
    );
    assert_calls_clean(&app).await;
}

/// `n` active calls 61 s in (minute 1 charged, minute 2 held, both seen
/// now) between fresh fans and creators, seeded in SQL as the call
/// functions leave them.
async fn seed_active_calls(app: &TestApp, n: i64) {
    let mut tx = app.db.admin_pool.begin().await.unwrap();
    let steps = [
        "create temporary table pairs on commit drop as \
           select gen_random_uuid() as fan, gen_random_uuid() as creator, \
                  gen_random_uuid() as call from generate_series(1, $1::bigint)",
        "insert into app.users (id) select fan from pairs where $1::bigint > 0",
        "insert into app.users (id, role) select creator, 'creator' from pairs where $1::bigint > 0",
        "select ledger.post_many(array_agg('purchase'::text), array_agg('seed-' || fan), \
           array_agg(ledger.singleton('stripe_clearing')), array_agg(ledger.account_of('wallet', fan)), \
           array_agg(1000::bigint), array_agg(0::bigint)) from pairs where $1::bigint > 0",
        "insert into app.calls (id, fan_id, creator_id, media, price_per_minute, status, channel, \
           fan_uid, creator_uid, ring_until, accepted_at, join_until, fan_joined_at, creator_joined_at, \
           started_at, fan_seen_at, creator_seen_at, funded_minutes, billed_minutes) \
         select call, fan, creator, 'audio', 10, 'active', 'call_' || replace(call::text, '-', ''), \
           nextval('app.agora_uids'), nextval('app.agora_uids'), app.now(), app.now(), app.now(), \
           app.now() - interval '61 seconds', app.now() - interval '61 seconds', \
           app.now() - interval '61 seconds', app.now(), app.now(), 2, 1 from pairs where $1::bigint > 0",
        "insert into ledger.accounts (kind, owner_id, reference) \
           select 'escrow', fan, 'call:' || call from pairs where $1::bigint > 0",
        "select ledger.post_many(array_agg('call_hold'::text), array_agg(call || ':2'), \
           array_agg(ledger.account_of('wallet', fan)), array_agg(ledger.call_escrow(call)), \
           array_agg(20::bigint), array_agg(0::bigint)) from pairs where $1::bigint > 0",
        "select ledger.post_many(array_agg('call_minute'::text), array_agg(call || ':1'), \
           array_agg(ledger.call_escrow(call)), array_agg(ledger.account_of('wallet', creator)), \
           array_agg(10::bigint), array_agg(0::bigint)) from pairs where $1::bigint > 0",
    ];
    for sql in steps {
        sqlx::query(sql).bind(n).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// (calls billed `minutes`, calls billed otherwise) among active calls.
async fn billed(app: &TestApp, minutes: i32) -> (i64, i64) {
    sqlx::query_as(
        "select count(*) filter (where billed_minutes = $1), count(*) filter (where billed_minutes <> $1) \
           from app.calls where status = 'active'",
    )
    .bind(minutes)
    .fetch_one(&app.db.admin_pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_killed_at_any_point_changes_nothing_and_the_next_one_bills_exactly_once() {
    let app = calls_app().await;
    seed_active_calls(&app, 600).await;
    let mut killed = 0;
    // Each round kills the sweep's database backend after a different
    // delay: mid-statement, between statements, or after the commit.
    for (round, delay_ms) in [5_u64, 40, 90, 160, 400].into_iter().enumerate() {
        let minute = i32::try_from(round).unwrap() + 2;
        let pool = app.db.app_pool.clone();
        let (tell_pid, pid) = tokio::sync::oneshot::channel::<i32>();
        let running = tokio::spawn(async move {
            let mut tx = stagepass_platform::db::begin_service(&pool).await?;
            let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await?;
            let _ = tell_pid.send(pid);
            sqlx::query("select * from app.sweep_calls(5000)")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<(), sqlx::Error>(())
        });
        let pid = pid.await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        sqlx::query("select pg_terminate_backend($1)")
            .bind(pid)
            .execute(&app.db.admin_pool)
            .await
            .unwrap();
        let outcome = running.await.unwrap();
        let (done, not_done) = billed(&app, minute).await;
        if outcome.is_ok() {
            assert_eq!((done, not_done), (600, 0), "round {round}: committed whole");
        } else {
            killed += 1;
            assert_eq!(
                done, 0,
                "round {round}: killed, nothing may be left half done"
            );
        }
        assert_calls_clean(&app).await;
        // The next sweep (the cron route) bills exactly what is still due.
        sweep(&app).await;
        assert_eq!(billed(&app, minute).await, (600, 0), "round {round}");
        assert_eq!(sweep(&app).await["charged_minutes"], 0);
        assert_calls_clean(&app).await;
        // The next minute.
        app.db.advance_clock(Duration::seconds(60)).await;
        sqlx::query("update app.calls set fan_seen_at = app.now() where status = 'active'")
            .execute(&app.db.admin_pool)
            .await
            .unwrap();
    }
    assert!(killed >= 2, "only {killed} of 5 sweeps were killed mid-way");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_minute_is_held_by_the_clock_so_late_heartbeats_still_get_the_warnings() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 20).await;
    let call = connected(&app, &fan, &c).await;
    // Heard from at +50 s, then nothing for a while (under the timeout).
    app.db.advance_clock(Duration::seconds(50)).await;
    ok(&app, &fan, &call, "heartbeat").await;
    // +70 s: minute 2 has started, unheard-of; the sweep charges nothing
    // but must hold minute 3 now. The fan cannot: warned with 50 s left.
    app.db.advance_clock(Duration::seconds(20)).await;
    assert_eq!(sweep(&app).await["charged_minutes"], 0);
    let warned = get(&app, &fan, &call).await;
    assert_eq!(warned["ending_for_funds"], true);
    assert_eq!(warned["status"], "active");
    let sixty: i64 = sqlx::query_scalar(
        "select count(*) from app.outbox where name = 'call.ending' \
          and payload->>'call_id' = $1 and payload->>'seconds_left' = '60'",
    )
    .bind(&call)
    .fetch_one(&app.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(sixty, 2, "both parties warned before the funded end");
    // +125 s: over at the funded end (+120 s), minute 2 paid from its hold.
    app.db.advance_clock(Duration::seconds(55)).await;
    sweep(&app).await;
    let ended = get(&app, &fan, &call).await;
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["end_reason"], "funds_exhausted");
    assert_eq!(ended["billed_minutes"], 2);
    assert_eq!(wallet(&app, c.id).await, 20);
    assert_eq!(wallet(&app, fan.id).await, 0);
    assert_calls_clean(&app).await;
}

/// Server-side milliseconds of `app.advance_calls` on `call` (nothing due),
/// best of five, with `jit` as given; rolled back.
async fn advance_ms(app: &TestApp, call: &str, jit: &str) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut tx = app.db.admin_pool.begin().await.unwrap();
        sqlx::query("select set_config('jit', $1, true)")
            .bind(jit)
            .execute(&mut *tx)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        sqlx::query("select app.advance_calls(array[$1::uuid])")
            .bind(call)
            .execute(&mut *tx)
            .await
            .unwrap();
        best = best.min(started.elapsed().as_secs_f64() * 1000.0);
        tx.rollback().await.unwrap();
    }
    best
}

/// Every heartbeat, join, hang-up, token and sweep runs `app.advance_calls`
/// (a presence twice). Its statements over `pg_temp.call_due` (a temporary
/// table created afresh in each transaction, so with no statistics: 1,070
/// rows estimated, times 1,000 for `generate_series`) are planned at a cost
/// of ~586,000, above `jit_above_cost` (100,000): with JIT on (Postgres's
/// default) each call of the function compiles a JIT plan, 70–150 ms here
/// (inlining ~75 ms, optimisation ~40 ms, emission ~35 ms) for a statement
/// that touches no row. The simulation turns JIT off for its database to
/// keep its run time.
#[tokio::test(flavor = "multi_thread")]
async fn looking_at_a_call_costs_no_jit_compilation() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 1000).await;
    let call = connected(&app, &fan, &c).await;
    let without = advance_ms(&app, &call, "off").await;
    let with = advance_ms(&app, &call, "on").await;
    assert!(
        with < without + 20.0,
        "advancing a call with nothing due: {with:.1} ms with JIT, {without:.1} ms without"
    );
    assert_calls_clean(&app).await;
}

/// `app.call_presence` (and `app.call_join_grant`) first end what is over
/// ("a late heartbeat never revives a call that timed out"), then raise
/// SP076 for the ended call — and the raise rolls the end back with the
/// transaction. The client is told `call_state_conflict`, but the call
/// stays `active` (its escrow held, the fan unrefunded) until the next sweep
/// ends it; meanwhile `GET /api/v1/calls/{id}` says it is active. (The same
/// for a rung-out request: it keeps ringing, and the fan cannot ask again,
/// until the sweep.)
#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_that_finds_the_call_over_leaves_it_ended() {
    let app = calls_app().await;
    let c = calling_creator(&app, 10).await;
    let fan = fan_with(&app, 1000).await;
    let call = connected(&app, &fan, &c).await;
    app.db.advance_clock(Duration::seconds(121)).await;
    act(&app, &fan, &call, "heartbeat")
        .await
        .assert_problem(StatusCode::CONFLICT, "call_state_conflict");
    let after = get(&app, &fan, &call).await;
    assert_eq!(after["status"], "ended", "{after}");
    assert_eq!(after["end_reason"], "heartbeat_timeout");
    assert_eq!(escrow(&app, &call).await, 0);
    assert_calls_clean(&app).await;
}
