//! Classes: creation, enrolment into escrow (replays, a race for seats),
//! withdrawal and its cut-off, cancellation, rescheduling, settlement, and
//! the schedule JSON. The ledger invariants are checked after every money
//! test (SPEC §2, §3).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::{assert_ledger_clean, journal_count, wallet};

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use common::classes::{
    cancel, class, class_body, create, creator, enroll, fan_with, rfc3339, settle, withdraw,
};
use common::{TestApp, TestResponse, User, claims_for, sign_claims};
use serde_json::{Value, json};
use uuid::Uuid;

async fn escrow(app: &TestApp, class: &str) -> i64 {
    sqlx::query_scalar(
        "select balance from ledger.accounts where kind = 'escrow' and reference = 'class:' || $1",
    )
    .bind(class)
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("escrow")
}

/// Every calendar copy of a class: (user, role, status, sequence, starts_at, title).
async fn copies(
    app: &TestApp,
    class: &str,
) -> Vec<(Uuid, String, String, i32, DateTime<Utc>, String)> {
    sqlx::query_as(
        "select user_id, role, status, sequence, starts_at, title from app.calendar_events \
         where source_kind = 'class' and source_id = $1::uuid order by role desc, user_id",
    )
    .bind(class)
    .fetch_all(&app.db.admin_pool)
    .await
    .expect("calendar copies")
}

#[tokio::test(flavor = "multi_thread")]
async fn only_creators_create_classes_and_every_field_is_validated() {
    let app = TestApp::new().await;
    let c = creator(&app).await;
    let fan = app.signed_in_user().await;

    create(&app, &fan, &class_body(48, 10, 5))
        .await
        .assert_problem(StatusCode::FORBIDDEN, "creator_required");

    let mut bad = class_body(48, -1, 0);
    bad["title"] = json!("  ");
    bad["duration_minutes"] = json!(14);
    bad["time_zone"] = json!("EST");
    let r = create(&app, &c, &bad).await;
    let body = r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    let mut fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "capacity",
            "duration_minutes",
            "price_tokens",
            "time_zone",
            "title"
        ]
    );

    for (field, value) in [
        ("time_zone", json!("Europe/Nowhere")),
        (
            "starts_at",
            json!(rfc3339(Utc::now() - Duration::minutes(1))),
        ),
        ("starts_at", json!("tomorrow")),
        ("capacity", json!(1001)),
        ("price", json!(5)),
    ] {
        let mut body = class_body(48, 10, 5);
        body[field] = value;
        let r = create(&app, &c, &body).await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), field, "{}", r.text());
    }

    let r = create(&app, &c, &class_body(48, 10, 5)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().expect("id");
    assert_eq!(created["status"], "scheduled");
    assert_eq!(created["creator_id"], c.id.to_string());
    assert_eq!(created["time_zone"], "Europe/Berlin");
    assert_eq!(created["seats_taken"], 0);
    assert_eq!(escrow(&app, id).await, 0);
    let host = copies(&app, id).await;
    assert_eq!(host.len(), 1);
    assert_eq!((host[0].0, host[0].1.as_str()), (c.id, "host"));

    let seen = app
        .get(&format!("/api/v1/classes/{id}"))
        .bearer(&fan.token)
        .send()
        .await;
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.text());
    assert_eq!(seen.json()["enrolled"], false);
    let missing = app
        .get(&format!("/api/v1/classes/{}", Uuid::new_v4()))
        .bearer(&fan.token)
        .send()
        .await;
    missing.assert_problem(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn enrolment_pays_into_escrow_once_and_a_replay_answers_the_same() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let id = class(&app, &c, 72, 50, 5).await;
    let fan = fan_with(&app, 120).await;

    let first = enroll(&app, &fan, &id, "seat-1").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert_eq!(first.json()["balance"], 70);
    assert_eq!(first.json()["price_tokens"], 50);
    assert!(first.header("idempotency-replayed").is_none());
    let again = enroll(&app, &fan, &id, "seat-1").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(again.json(), first.json());

    enroll(&app, &fan, &id, "seat-2")
        .await
        .assert_problem(StatusCode::CONFLICT, "already_enrolled");
    enroll(&app, &c, &id, "own")
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "own_class");
    let poor = fan_with(&app, 49).await;
    let refused = enroll(&app, &poor, &id, "poor").await;
    let problem = refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds");
    let replayed = enroll(&app, &poor, &id, "poor").await;
    assert_eq!(replayed.header("idempotency-replayed"), Some("true"));
    assert_eq!(replayed.json(), problem);
    let no_key = app
        .post(&format!("/api/v1/classes/{id}/enrollments"))
        .bearer(&fan.token)
        .send()
        .await;
    no_key.assert_problem(StatusCode::BAD_REQUEST, "bad_request");

    assert_eq!(wallet(&app, fan.id).await, 70);
    assert_eq!(wallet(&app, poor.id).await, 49);
    assert_eq!(escrow(&app, &id).await, 50);
    assert_eq!(
        wallet(&app, c.id).await,
        0,
        "the creator is paid only at settlement"
    );
    assert_eq!(journal_count(&app, "class_enrollment").await, 1);
    let seen = app
        .get(&format!("/api/v1/classes/{id}"))
        .bearer(&fan.token)
        .send()
        .await
        .json();
    assert_eq!(
        (seen["enrolled"].clone(), seen["seats_taken"].clone()),
        (json!(true), json!(1))
    );
    let calendar = copies(&app, &id).await;
    assert_eq!(calendar.len(), 2);
    assert_eq!(
        (calendar[1].0, calendar[1].1.as_str()),
        (fan.id, "attendee")
    );
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_fans_racing_for_ten_seats_exactly_ten_are_enrolled_and_charged() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let id = class(&app, &c, 72, 20, 10).await;
    let mut fans = Vec::new();
    for _ in 0..30 {
        fans.push(fan_with(&app, 100).await);
    }
    let results =
        futures_util::future::join_all(fans.iter().map(|f| enroll(&app, f, &id, "race"))).await;
    let won = results
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(won, 10);
    for r in results.iter().filter(|r| r.status != StatusCode::CREATED) {
        r.assert_problem(StatusCode::CONFLICT, "class_full");
    }
    let mut charged = 0;
    for (fan, r) in fans.iter().zip(&results) {
        let expected = if r.status == StatusCode::CREATED {
            80
        } else {
            100
        };
        assert_eq!(wallet(&app, fan.id).await, expected);
        charged += i64::from(expected == 80);
    }
    assert_eq!(charged, 10);
    assert_eq!(escrow(&app, &id).await, 200);
    assert_eq!(journal_count(&app, "class_enrollment").await, 10);
    let seats: i32 = sqlx::query_scalar("select seats_taken from app.classes where id = $1::uuid")
        .bind(&id)
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("seats");
    assert_eq!(seats, 10);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn withdrawal_refunds_in_full_before_the_cutoff_and_is_refused_after_it() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    let early = class(&app, &c, 72, 30, 1).await;
    assert_eq!(
        enroll(&app, &fan, &early, "e1").await.status,
        StatusCode::CREATED
    );

    let r = withdraw(&app, &fan, &early).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["refunded_tokens"], 30);
    assert_eq!(wallet(&app, fan.id).await, 100);
    assert_eq!(escrow(&app, &early).await, 0);
    let mine = copies(&app, &early).await;
    assert_eq!((mine[1].2.as_str(), mine[1].3), ("cancelled", 1));
    withdraw(&app, &fan, &early)
        .await
        .assert_problem(StatusCode::CONFLICT, "not_enrolled");
    // The seat is free again, and the fan may take it back.
    let back = enroll(&app, &fan, &early, "e2").await;
    assert_eq!(back.status, StatusCode::CREATED, "{}", back.text());
    assert_eq!(copies(&app, &early).await[1].2, "confirmed");

    // Two hours before the start: enrolment is still open, the refund is not.
    let soon = class(&app, &c, 2, 25, 5).await;
    assert_eq!(
        enroll(&app, &fan, &soon, "s1").await.status,
        StatusCode::CREATED
    );
    withdraw(&app, &fan, &soon)
        .await
        .assert_problem(StatusCode::CONFLICT, "cutoff_passed");
    assert_eq!(wallet(&app, fan.id).await, 100 - 30 - 25);
    assert_eq!(escrow(&app, &soon).await, 25);
    assert_eq!(journal_count(&app, "class_refund").await, 1);
    assert_ledger_clean(&app).await;
}

/// The cut-off and the start as time passes (ADR 0014: the test moves
/// `app.now()`, no row is rewritten).
#[tokio::test(flavor = "multi_thread")]
async fn withdrawal_closes_at_the_cutoff_and_enrolment_at_the_start_as_time_passes() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    let id = class(&app, &c, 72, 30, 5).await;
    assert_eq!(
        enroll(&app, &fan, &id, "t1").await.status,
        StatusCode::CREATED
    );

    // 47 h later the class starts in 25 h: still before the 24 h cut-off.
    app.db.advance_clock(Duration::hours(47)).await;
    let r = withdraw(&app, &fan, &id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["refunded_tokens"], 30);
    assert_eq!(
        enroll(&app, &fan, &id, "t2").await.status,
        StatusCode::CREATED
    );

    // Two more hours: 23 h before the start, the cut-off has passed.
    app.db.advance_clock(Duration::hours(2)).await;
    withdraw(&app, &fan, &id)
        .await
        .assert_problem(StatusCode::CONFLICT, "cutoff_passed");
    // Enrolment stays open until the start…
    let late = fan_with(&app, 100).await;
    assert_eq!(
        enroll(&app, &late, &id, "t3").await.status,
        StatusCode::CREATED
    );
    // …and closes with it.
    app.db.advance_clock(Duration::hours(23)).await;
    let later = fan_with(&app, 100).await;
    enroll(&app, &later, &id, "t4")
        .await
        .assert_problem(StatusCode::CONFLICT, "class_not_open");
    assert_eq!(wallet(&app, fan.id).await, 70);
    assert_eq!(escrow(&app, &id).await, 60);
    assert_eq!(journal_count(&app, "class_refund").await, 1);
    assert_ledger_clean(&app).await;
}

/// `req` with headers that name a clock setting (ADR 0014).
fn moved<'a>(token: &str, req: common::Req<'a>) -> common::Req<'a> {
    let mut req = req.bearer(token);
    for name in [
        "stagepass-clock-offset",
        "stagepass.clock_offset",
        "x-stagepass-clock",
        "x-clock",
        "date",
    ] {
        req = req.header(name, "1000 days");
    }
    req.header("prefer", "tx=commit, stagepass.clock_offset=1000 days")
}

/// ADR 0014: in a production database nothing a request sends moves
/// `app.now()`: headers, query strings and token claims that name a clock
/// setting change no time rule (a clock moved a day either way would let
/// the fan withdraw, refuse the enrolment, or settle the class).
#[tokio::test(flavor = "multi_thread")]
async fn no_request_moves_a_production_clock() {
    let app = TestApp::production().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    // Starts in two hours: enrolment open, the withdrawal cut-off passed.
    let id = class(&app, &c, 2, 10, 5).await;
    let mut claims = claims_for(fan.id, Some(&fan.email), 3600);
    for name in [
        "stagepass.clock_offset",
        "stagepass.clock_override",
        "clock",
        "now",
    ] {
        claims[name] = json!("1000 days");
    }
    let token = sign_claims(&claims);
    let enrolled = moved(
        &token,
        app.post(&format!(
            "/api/v1/classes/{id}/enrollments?stagepass.clock_offset=1000%20days&clock=-1000%20days"
        )),
    )
    .header("idempotency-key", "clock-1")
    .send()
    .await;
    assert_eq!(enrolled.status, StatusCode::CREATED, "{}", enrolled.text());
    moved(
        &token,
        app.request(
            http::Method::DELETE,
            &format!("/api/v1/classes/{id}/enrollments/me?stagepass.clock_offset=-1000%20days"),
        ),
    )
    .send()
    .await
    .assert_problem(StatusCode::CONFLICT, "cutoff_passed");
    let listed = moved(&token, app.get("/api/v1/classes")).send().await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    assert!(
        listed.text().contains(&id),
        "still upcoming: {}",
        listed.text()
    );
    let settled = app
        .get("/api/cron/settle-classes?stagepass.clock_offset=1000%20days")
        .header("authorization", &format!("Bearer {}", common::CRON_SECRET))
        .header("stagepass-clock-offset", "1000 days")
        .send()
        .await;
    assert_eq!(settled.json()["settled_classes"], 0, "{}", settled.text());
    assert_eq!(escrow(&app, &id).await, 10);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_refunds_every_fan_pays_the_creator_nothing_and_cancels_every_copy() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let id = class(&app, &c, 72, 40, 10).await;
    let mut fans = Vec::new();
    for i in 0..3 {
        let f = fan_with(&app, 100).await;
        assert_eq!(
            enroll(&app, &f, &id, &format!("k{i}")).await.status,
            StatusCode::CREATED
        );
        fans.push(f);
    }
    assert_eq!(escrow(&app, &id).await, 120);

    cancel(&app, &fans[0], &id)
        .await
        .assert_problem(StatusCode::FORBIDDEN, "not_class_owner");
    let r = cancel(&app, &c, &id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"refunded_enrollments": 3, "refunded_tokens": 120})
    );

    for f in &fans {
        assert_eq!(wallet(&app, f.id).await, 100);
    }
    assert_eq!(wallet(&app, c.id).await, 0);
    assert_eq!(escrow(&app, &id).await, 0);
    assert_eq!(journal_count(&app, "class_refund").await, 3);
    let calendar = copies(&app, &id).await;
    assert_eq!(calendar.len(), 4);
    for copy in &calendar {
        assert_eq!(copy.2, "cancelled", "{copy:?}");
        assert!(copy.3 >= 1, "sequence bumped: {copy:?}");
    }
    cancel(&app, &c, &id)
        .await
        .assert_problem(StatusCode::CONFLICT, "class_not_open");
    let late = fan_with(&app, 100).await;
    enroll(&app, &late, &id, "late")
        .await
        .assert_problem(StatusCode::CONFLICT, "class_not_open");
    // A fan who enrolled still sees the cancelled class; others do not.
    let seen = app
        .get(&format!("/api/v1/classes/{id}"))
        .bearer(&fans[0].token)
        .send()
        .await;
    assert_eq!(seen.json()["status"], "cancelled");
    app.get(&format!("/api/v1/classes/{id}"))
        .bearer(&late.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(settle(&app).await.json()["settled_classes"], 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rescheduling_moves_every_calendar_copy_and_bumps_its_sequence() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let id = class(&app, &c, 72, 10, 10).await;
    let fans = [fan_with(&app, 50).await, fan_with(&app, 50).await];
    for (i, f) in fans.iter().enumerate() {
        assert_eq!(
            enroll(&app, f, &id, &format!("r{i}")).await.status,
            StatusCode::CREATED
        );
    }
    let path = format!("/api/v1/classes/{id}");
    let new_start = (Utc::now() + Duration::days(5)).with_nanosecond_zero();
    let r = app
        .patch(&path)
        .bearer(&c.token)
        .json(&json!({"starts_at": rfc3339(new_start), "title": "Evening flow", "duration_minutes": 90}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let moved = r.json();
    assert_eq!(moved["sequence"], 1);
    assert_eq!(moved["title"], "Evening flow");
    let calendar = copies(&app, &id).await;
    assert_eq!(calendar.len(), 3);
    for copy in &calendar {
        assert_eq!(
            (copy.4, copy.5.as_str(), copy.3),
            (new_start, "Evening flow", 1),
            "{copy:?}"
        );
    }
    // The fan's schedule shows the moved event, ending 90 minutes later.
    let fan_view = schedule(&app, &fans[0], Utc::now(), Utc::now() + Duration::days(10)).await;
    let event = &fan_view.json()["events"][0];
    assert_eq!(event["role"], "attendee");
    assert_eq!(event["starts_at"].as_str().map(parse), Some(new_start));
    assert_eq!(
        event["ends_at"].as_str().map(parse),
        Some(new_start + Duration::minutes(90))
    );

    for (body, status, code) in [
        (
            json!({"price_tokens": 11}),
            StatusCode::CONFLICT,
            "price_locked",
        ),
        (
            json!({"capacity": 1}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            json!({"starts_at": rfc3339(Utc::now() - Duration::hours(1))}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (json!({}), StatusCode::BAD_REQUEST, "validation_failed"),
        (
            json!({"status": "settled"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
    ] {
        let r = app.patch(&path).bearer(&c.token).json(&body).send().await;
        r.assert_problem(status, code);
    }
    app.patch(&path)
        .bearer(&fans[0].token)
        .json(&json!({"title": "mine now"}))
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "not_class_owner");
    assert_eq!(copies(&app, &id).await[0].3, 1, "refusals change nothing");
    // An edit the calendar does not carry bumps the class, not the copies.
    let r = app
        .patch(&path)
        .bearer(&c.token)
        .json(&json!({"description": "Now with music."}))
        .send()
        .await;
    assert_eq!(r.json()["sequence"], 2, "{}", r.text());
    assert!(copies(&app, &id).await.iter().all(|copy| copy.3 == 1));
    assert_ledger_clean(&app).await;
}

trait NoNanos {
    fn with_nanosecond_zero(self) -> Self;
}

impl NoNanos for DateTime<Utc> {
    fn with_nanosecond_zero(self) -> Self {
        DateTime::from_timestamp(self.timestamp(), 0).expect("in range")
    }
}

fn parse(raw: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(raw)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread")]
async fn settlement_pays_the_creator_the_escrow_once() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let ended = class(&app, &c, 2, 25, 10).await;
    let upcoming = class(&app, &c, 72, 25, 10).await;
    for i in 0..3 {
        let f = fan_with(&app, 100).await;
        assert_eq!(
            enroll(&app, &f, &ended, &format!("a{i}")).await.status,
            StatusCode::CREATED
        );
        assert_eq!(
            enroll(&app, &f, &upcoming, &format!("b{i}")).await.status,
            StatusCode::CREATED
        );
    }
    // Nothing has ended yet: settlement pays nobody.
    assert_eq!(settle(&app).await.json()["settled_classes"], 0);
    // Four hours pass (app.now() and the app's clock): the first class, two
    // hours ahead and one hour long, has ended; the other has not.
    app.db.advance_clock(Duration::hours(4)).await;
    sqlx::query("update ledger.settings set platform_fee_bps = 1000")
        .execute(&app.db.admin_pool)
        .await
        .expect("fee");

    app.get("/api/cron/settle-classes")
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");
    app.get("/api/cron/settle-classes")
        .header("authorization", "Bearer wrong-secret-0123456789")
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");

    let r = settle(&app).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"skipped": false, "settled_classes": 1, "settled_tokens": 75})
    );
    // 10 % of 75 is 7 (rounded down): the platform's; the rest the creator's.
    assert_eq!(wallet(&app, c.id).await, 68);
    let platform: i64 =
        sqlx::query_scalar("select balance from ledger.balances where kind = 'platform_revenue'")
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("platform");
    assert_eq!(platform, 7);
    assert_eq!(escrow(&app, &ended).await, 0);
    assert_eq!(escrow(&app, &upcoming).await, 75);
    let statuses: Vec<String> =
        sqlx::query_scalar("select distinct status from app.enrollments where class_id = $1::uuid")
            .bind(&ended)
            .fetch_all(&app.db.admin_pool)
            .await
            .expect("statuses");
    assert_eq!(statuses, ["settled"]);

    let again = settle(&app).await;
    assert_eq!(again.json()["settled_classes"], 0);
    assert_eq!(wallet(&app, c.id).await, 68);
    assert_eq!(journal_count(&app, "class_settlement").await, 1);
    assert_ledger_clean(&app).await;
}

async fn schedule(
    app: &TestApp,
    who: &User,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> TestResponse {
    app.get(&format!(
        "/api/v1/schedule?from={}&to={}",
        rfc3339(from),
        rfc3339(to)
    ))
    .bearer(&who.token)
    .send()
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schedule_lists_own_host_and_attendee_events_in_range() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    let near = class(&app, &c, 72, 5, 5).await;
    let far = class(&app, &c, 24 * 70, 5, 5).await;
    assert_eq!(
        enroll(&app, &fan, &near, "n").await.status,
        StatusCode::CREATED
    );
    let other = fan_with(&app, 100).await;
    assert_eq!(
        enroll(&app, &other, &far, "f").await.status,
        StatusCode::CREATED
    );

    let (from, to) = (Utc::now(), Utc::now() + Duration::days(10));
    let host = schedule(&app, &c, from, to).await;
    assert_eq!(host.status, StatusCode::OK, "{}", host.text());
    let events = host.json()["events"].clone();
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    assert_eq!(
        (events[0]["role"].clone(), events[0]["source_id"].clone()),
        (json!("host"), json!(near))
    );
    let mine = schedule(&app, &fan, from, to).await.json();
    assert_eq!(mine["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(mine["events"][0]["role"], "attendee");
    assert_eq!(mine["events"][0]["status"], "confirmed");
    assert_eq!(mine["truncated"], false);
    let theirs = schedule(&app, &other, from, to).await.json();
    assert_eq!(
        theirs["events"],
        json!([]),
        "another fan's events are not mine"
    );

    let q = |query: &str| {
        app.get(&format!("/api/v1/schedule{query}"))
            .bearer(&fan.token)
            .send()
    };
    for (query, field) in [
        ("?to=2030-01-01T00:00:00Z", "from"),
        ("?from=2030-01-01T00:00:00Z", "to"),
        ("?from=yesterday&to=2030-01-01T00:00:00Z", "from"),
        ("?from=2030-01-02T00:00:00Z&to=2030-01-01T00:00:00Z", "to"),
        ("?from=2030-01-01T00:00:00Z&to=2030-03-05T00:00:00Z", "to"),
    ] {
        let r = q(query).await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), field, "{query}: {}", r.text());
    }
    q("?from=2030-01-01T00:00:00Z&to=2030-01-02T00:00:00Z&x=1")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "bad_request");
    assert_eq!(
        q("?from=2030-01-01T00:00:00Z&to=2030-03-03T00:00:00Z")
            .await
            .status,
        StatusCode::OK
    );
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_class_list_pages_by_start_and_filters_by_creator() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let other = creator(&app).await;
    let fan = app.signed_in_user().await;
    let mut expected = Vec::new();
    for hours in [50, 30, 40, 60, 70] {
        expected.push((hours, class(&app, &c, hours, 0, 5).await));
    }
    let theirs = class(&app, &other, 45, 0, 5).await;
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let mut path = format!("/api/v1/classes?creator={}&limit=2", c.id);
        if let Some(next) = &cursor {
            path.push_str(&format!("&cursor={next}"));
        }
        let page = app.get(&path).bearer(&fan.token).send().await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        let page = page.json();
        for class in page["classes"].as_array().expect("classes") {
            seen.push(class["id"].as_str().expect("id").to_owned());
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, expected);

    let all = app
        .get("/api/v1/classes")
        .bearer(&fan.token)
        .send()
        .await
        .json();
    let ids: Vec<&str> = all["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 6);
    assert_eq!(ids[2], theirs, "sorted by start across creators");
    // A free class: enrolled without any journal.
    let r = enroll(&app, &fan, &theirs, "free").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["journal_id"], Value::Null);

    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=101", "limit"),
        ("?cursor=nope", "cursor"),
        ("?creator=x", "creator"),
    ] {
        let r = app
            .get(&format!("/api/v1/classes{query}"))
            .bearer(&fan.token)
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), field);
    }
    assert_ledger_clean(&app).await;
}

/// Issue 14: a creator moved a paid class with enrolled fans to start in two
/// minutes; the fans' withdrawal then hit the cut-off and settlement would
/// have paid their escrow to the creator. The rule (SPEC §3, ADR 0013): a
/// class with paid enrolments cannot move to start within 24 h, and any
/// reschedule reopens a full-refund withdrawal for every enrolled fan for
/// 24 h (or until the new start), announced in `class.updated`.
#[tokio::test(flavor = "multi_thread")]
async fn a_reschedule_cannot_take_away_a_fans_refund() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    let id = class(&app, &c, 72, 30, 10).await;
    assert_eq!(
        enroll(&app, &fan, &id, "k1").await.status,
        StatusCode::CREATED
    );
    let path = format!("/api/v1/classes/{id}");

    // Moving it to start in two minutes (or 23 h) is refused and changes nothing.
    for minutes in [2, 23 * 60] {
        let soon = Utc::now() + Duration::minutes(minutes);
        app.patch(&path)
            .bearer(&c.token)
            .json(&json!({"starts_at": rfc3339(soon)}))
            .send()
            .await
            .assert_problem(StatusCode::CONFLICT, "reschedule_too_soon");
    }
    let unchanged = app.get(&path).bearer(&fan.token).send().await.json();
    assert_eq!(unchanged["sequence"], 0);

    // Moving it to start in 25 h is allowed and reopens the refund for 24 h.
    let new_start = (Utc::now() + Duration::hours(25)).with_nanosecond_zero();
    let r = app
        .patch(&path)
        .bearer(&c.token)
        .json(&json!({"starts_at": rfc3339(new_start)}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = app.get(&path).bearer(&fan.token).send().await.json();
    let until = parse(seen["withdraw_until"].as_str().expect("withdraw_until"));
    let expected = Utc::now() + Duration::hours(24);
    assert!(
        (until - expected).num_seconds().abs() < 60,
        "the fan's deadline is 24 h after the change: {until}"
    );
    // The creator (not enrolled) sees the plain cut-off.
    let host = app.get(&path).bearer(&c.token).send().await.json();
    assert_eq!(
        host["withdraw_until"].as_str().map(parse),
        Some(new_start - Duration::hours(24))
    );
    // Fans learn the window from the class.updated message.
    let payload: Value = sqlx::query_scalar(
        "select payload from app.outbox where name = 'class.updated' \
         and destination = 'class:' || $1 order by id desc limit 1",
    )
    .bind(&id)
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("class.updated");
    assert_eq!(
        payload["refund_window_until"].as_str().map(parse),
        Some(until),
        "{payload}"
    );

    // Twelve hours pass (app.now() moves): the normal cut-off is over, a fan
    // who enrols now gets only the cut-off, and the fan enrolled at the
    // change still gets a full refund.
    app.db.advance_clock(Duration::hours(12)).await;
    let late = fan_with(&app, 100).await;
    assert_eq!(
        enroll(&app, &late, &id, "k2").await.status,
        StatusCode::CREATED
    );
    withdraw(&app, &late, &id)
        .await
        .assert_problem(StatusCode::CONFLICT, "cutoff_passed");
    let r = withdraw(&app, &fan, &id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["refunded_tokens"], 30);
    assert_eq!(wallet(&app, fan.id).await, 100);
    assert_eq!(escrow(&app, &id).await, 30);
    assert_ledger_clean(&app).await;
}

/// A free class may move close to its start (nobody loses money), but its
/// fans may still leave until the new start.
#[tokio::test(flavor = "multi_thread")]
async fn a_free_class_may_move_close_and_its_fans_may_leave_until_the_start() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 0).await;
    let id = class(&app, &c, 72, 0, 10).await;
    assert_eq!(
        enroll(&app, &fan, &id, "f1").await.status,
        StatusCode::CREATED
    );
    let new_start = (Utc::now() + Duration::minutes(10)).with_nanosecond_zero();
    let r = app
        .patch(&format!("/api/v1/classes/{id}"))
        .bearer(&c.token)
        .json(&json!({"starts_at": rfc3339(new_start)}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = app
        .get(&format!("/api/v1/classes/{id}"))
        .bearer(&fan.token)
        .send()
        .await
        .json();
    assert_eq!(
        seen["withdraw_until"].as_str().map(parse),
        Some(new_start),
        "the window ends at the new start"
    );
    let r = withdraw(&app, &fan, &id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["refunded_tokens"], 0);
    assert_ledger_clean(&app).await;
}

/// Settlement never pays out escrow a fan can still withdraw.
#[tokio::test(flavor = "multi_thread")]
async fn settlement_waits_for_an_open_refund_window() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    let id = class(&app, &c, 72, 40, 10).await;
    assert_eq!(
        enroll(&app, &fan, &id, "s1").await.status,
        StatusCode::CREATED
    );
    let r = app
        .patch(&format!("/api/v1/classes/{id}"))
        .bearer(&c.token)
        .json(&json!({"starts_at": rfc3339(Utc::now() + Duration::hours(30))}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The superuser makes the class end while the window is still open.
    sqlx::query(
        "update app.classes set starts_at = now() - interval '3 hours' where id = $1::uuid",
    )
    .bind(&id)
    .execute(&app.db.admin_pool)
    .await
    .expect("end the class");
    let r = settle(&app).await;
    assert_eq!(r.json()["settled_classes"], 0, "{}", r.text());
    assert_eq!(escrow(&app, &id).await, 40);
    assert_eq!(wallet(&app, c.id).await, 0);
    // The window closes: now it settles.
    sqlx::query("update app.enrollments set refund_until = now() - interval '1 second' where class_id = $1::uuid")
        .bind(&id)
        .execute(&app.db.admin_pool)
        .await
        .expect("close the window");
    let r = settle(&app).await;
    assert_eq!(r.json()["settled_classes"], 1, "{}", r.text());
    assert_eq!(escrow(&app, &id).await, 0);
    assert_ledger_clean(&app).await;
}
