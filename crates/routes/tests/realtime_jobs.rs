//! Realtime messages (Ably), jobs (QStash) and the iCalendar feed.
//!
//! Ably and QStash cannot run here: their REST APIs are replaced by a
//! recording fake (`stagepass_integrations::testing::Recorder`) at the base
//! URL the production client is given, so what is checked is exactly what
//! the production code sends. QStash callbacks are signed with the test's
//! signing keys the way QStash signs them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use common::classes::{cancel, class, creator, enroll, fan_with, rfc3339, withdraw};
use common::{
    ABLY_SECRET, CRON_SECRET, PUBLIC_BASE_URL, QSTASH_CURRENT_KEY, QSTASH_NEXT_KEY, QSTASH_TOKEN,
    TestApp, TestResponse, User, assert_ledger_clean,
};
use serde_json::{Value, json};
use stagepass_integrations::qstash::sign;
use stagepass_integrations::testing::{RecordedRequest, Recorder};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);
const REMINDER_PATH: &str = "/api/jobs/class-reminder";

async fn ably() -> Recorder {
    Recorder::start(201, json!({"messageId": "ably-fake"}))
        .await
        .expect("ably fake")
}

async fn qstash() -> Recorder {
    Recorder::start(201, json!({"messageId": "msg_fake"}))
        .await
        .expect("qstash fake")
}

/// An app whose Ably (and optionally QStash) is a recording fake.
async fn app_with(ably: &Recorder, qstash: Option<&Recorder>) -> TestApp {
    let mut env = vec![
        ("ABLY_API_BASE", ably.url().to_owned()),
        ("RATE_LIMITS", "off".to_owned()),
    ];
    if let Some(q) = qstash {
        env.push(("QSTASH_URL", q.url().to_owned()));
    }
    TestApp::with_env(&env).await
}

/// One published Ably message: channel, name, id, data.
#[derive(Debug, Clone)]
struct Published {
    channel: String,
    name: String,
    id: String,
    data: Value,
}

fn published(requests: &[RecordedRequest]) -> Vec<Published> {
    requests
        .iter()
        .filter_map(|r| {
            let path = r.uri.replace("%3A", ":");
            let channel = path
                .strip_prefix("/channels/")?
                .strip_suffix("/messages")?
                .to_owned();
            let body = r.json();
            let message = Published {
                channel,
                name: body["name"].as_str()?.to_owned(),
                id: body["id"].as_str()?.to_owned(),
                data: body["data"].clone(),
            };
            // Every message the code really sends matches its published
            // schema (docs/realtime/*.schema.json, ADR 0012).
            assert_matches_published_schema(&message);
            Some(message)
        })
        .collect()
}

/// Checks `message.data` against `docs/realtime/{name}.schema.json`. The
/// schemas use a small part of JSON Schema (type, required, properties,
/// additionalProperties: false, const, format uuid/date-time, minimum,
/// maximum, minLength, maxLength), all of which is checked here; anything
/// else in a schema fails the check rather than being ignored.
fn assert_matches_published_schema(message: &Published) {
    let (_, _, file) = stagepass_routes::openapi::REALTIME
        .iter()
        .find(|(_, name, _)| *name == message.name)
        .unwrap_or_else(|| panic!("{} has no published schema", message.name));
    let schema: Value = serde_json::from_str(file).expect("schema JSON");
    let errors = schema_errors(&schema, &message.data, "data");
    assert!(
        errors.is_empty(),
        "{} does not match its schema: {errors:?}\n{}",
        message.name,
        message.data
    );
}

fn schema_errors(schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let known = [
        "$schema",
        "$id",
        "title",
        "description",
        "type",
        "required",
        "properties",
        "additionalProperties",
        "const",
        "format",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "enum",
    ];
    for key in schema.as_object().expect("schema object").keys() {
        assert!(
            known.contains(&key.as_str()),
            "unsupported keyword {key} at {at}"
        );
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type at {at}"),
        };
        let ok = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            other => panic!("unsupported type {other} at {at}"),
        });
        if !ok {
            errors.push(format!("{at}: {value} is not {types:?}"));
            return errors;
        }
    }
    if let Some(c) = schema.get("const")
        && c != value
    {
        errors.push(format!("{at}: {value} is not {c}"));
    }
    if let Some(allowed) = schema.get("enum") {
        let allowed = allowed.as_array().expect("enum is an array");
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(format), Some(s)) = (schema["format"].as_str(), value.as_str()) {
        let ok = match format {
            "uuid" => Uuid::parse_str(s).is_ok() && s.len() == 36,
            "date-time" => DateTime::parse_from_rfc3339(s).is_ok(),
            other => panic!("unsupported format {other} at {at}"),
        };
        if !ok {
            errors.push(format!("{at}: {s:?} is not a {format}"));
        }
    }
    if let Some(n) = value.as_i64() {
        if schema["minimum"].as_i64().is_some_and(|m| n < m) {
            errors.push(format!("{at}: {n} < minimum"));
        }
        if schema["maximum"].as_i64().is_some_and(|m| n > m) {
            errors.push(format!("{at}: {n} > maximum"));
        }
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|m| chars < m) {
            errors.push(format!("{at}: shorter than minLength"));
        }
        if schema["maxLength"].as_u64().is_some_and(|m| chars > m) {
            errors.push(format!("{at}: longer than maxLength"));
        }
    }
    if let Some(object) = value.as_object() {
        for field in schema["required"].as_array().into_iter().flatten() {
            let field = field.as_str().expect("field name");
            if !object.contains_key(field) {
                errors.push(format!("{at}.{field}: required, missing"));
            }
        }
        let properties = schema["properties"].as_object();
        for (key, v) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(s) => errors.extend(schema_errors(s, v, &format!("{at}.{key}"))),
                None if schema["additionalProperties"] == false => {
                    errors.push(format!("{at}.{key}: not in the schema"));
                }
                None => {}
            }
        }
    }
    errors
}

#[test]
fn the_schema_check_refuses_what_the_schemas_refuse() {
    let tip = |data: Value| Published {
        channel: "user:x".into(),
        name: "tip.received".into(),
        id: "tip:x".into(),
        data,
    };
    let good = json!({"tip_id": Uuid::nil(), "from": Uuid::nil(), "amount": 9,
                      "message": null, "seq": 3});
    assert_matches_published_schema(&tip(good.clone()));
    for (field, bad) in [
        ("amount", json!("9")),
        ("from", json!("not-a-uuid")),
        ("seq", json!(0)),
        ("extra", json!(1)),
    ] {
        let mut data = good.clone();
        data[field] = bad;
        let schema: Value = serde_json::from_str(stagepass_routes::openapi::REALTIME[0].2).unwrap();
        assert!(!schema_errors(&schema, &data, "data").is_empty(), "{field}");
    }
    let mut data = good;
    data.as_object_mut().unwrap().remove("tip_id");
    let schema: Value = serde_json::from_str(stagepass_routes::openapi::REALTIME[0].2).unwrap();
    assert!(!schema_errors(&schema, &data, "data").is_empty());
    // The call messages use `enum` and `boolean` too: both are checked.
    let call_schema = |name: &str| -> Value {
        let (_, _, file) = stagepass_routes::openapi::REALTIME
            .iter()
            .find(|(_, n, _)| *n == name)
            .unwrap();
        serde_json::from_str(file).unwrap()
    };
    let updated = json!({"call_id": Uuid::nil(), "status": "active", "fan_id": Uuid::nil(),
        "creator_id": Uuid::nil(), "media": "video", "price_per_minute": 10, "sequence": 3,
        "ring_until": "2026-11-30T04:00:00+00:00", "started_at": "2026-11-30T04:01:00.5+00:00",
        "funded_until": null, "billed_minutes": 1, "ending_for_funds": false, "end_reason": null,
        "seq": 7});
    assert!(schema_errors(&call_schema("call.updated"), &updated, "data").is_empty());
    for (field, bad) in [
        ("status", json!("paused")),
        ("media", json!("hologram")),
        ("ending_for_funds", json!("false")),
        ("end_reason", json!("bored")),
        ("started_at", json!(5)),
        ("sequence", json!(-1)),
    ] {
        let mut data = updated.clone();
        data[field] = bad;
        assert!(
            !schema_errors(&call_schema("call.updated"), &data, "data").is_empty(),
            "{field}"
        );
    }
    let ending = json!({"call_id": Uuid::nil(), "ends_at": "2026-11-30T04:04:00+00:00",
        "seconds_left": 30, "reason": "funds_exhausted", "seq": 9});
    assert!(schema_errors(&call_schema("call.ending"), &ending, "data").is_empty());
    for (field, bad) in [("seconds_left", json!(45)), ("reason", json!("hung_up"))] {
        let mut data = ending.clone();
        data[field] = bad;
        assert!(
            !schema_errors(&call_schema("call.ending"), &data, "data").is_empty(),
            "{field}"
        );
    }
}

fn named<'a>(messages: &'a [Published], name: &str, channel: &str) -> Vec<&'a Published> {
    messages
        .iter()
        .filter(|m| m.name == name && m.channel == channel)
        .collect()
}

async fn tip(app: &TestApp, fan: &User, to: Uuid, amount: i64, key: &str) -> TestResponse {
    app.post("/api/v1/tips")
        .bearer(&fan.token)
        .header("idempotency-key", key)
        .json(
            &json!({"recipient_id": to, "amount": amount, "message": "great show, thanks; really"}),
        )
        .send()
        .await
}

async fn undelivered(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from app.outbox where delivered_at is null")
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("outbox")
}

/// Waits until every outbox row is delivered and no delivery is in flight.
async fn settled(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let busy: i64 = sqlx::query_scalar(
            "select count(*) from app.outbox where delivered_at is null or claimed_until is not null",
        )
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("outbox");
        if busy == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{busy} outbox rows still pending"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tip_tells_the_creator_and_both_balances_once() {
    let fake = ably().await;
    let app = app_with(&fake, None).await;
    let creator = creator(&app).await;
    let fan = fan_with(&app, 100).await;

    let r = tip(&app, &fan, creator.id, 7, "tip-1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let tip_id = r.json()["tip_id"].as_str().expect("tip id").to_owned();

    let creator_channel = format!("user:{}", creator.id);
    let fan_channel = format!("user:{}", fan.id);
    let requests = fake
        .wait_for(WAIT, |r| {
            let m = published(r);
            !named(&m, "tip.received", &creator_channel).is_empty()
                && named(&m, "balance.updated", &fan_channel)
                    .iter()
                    .any(|b| b.data["balance"] == 93)
                && !named(&m, "balance.updated", &creator_channel).is_empty()
        })
        .await;
    let messages = published(&requests);
    let received = named(&messages, "tip.received", &creator_channel);
    assert_eq!(received.len(), 1, "{messages:?}");
    assert_eq!(received[0].id, format!("tip:{tip_id}"));
    assert_eq!(received[0].data["amount"], 7);
    assert_eq!(received[0].data["from"], json!(fan.id));
    assert_eq!(received[0].data["message"], "great show, thanks; really");
    let creator_balance = named(&messages, "balance.updated", &creator_channel);
    assert_eq!(creator_balance.len(), 1);
    assert_eq!(creator_balance[0].data["balance"], 7);
    // Each request authenticates with the API key (HTTP Basic).
    let basic = base64::engine::general_purpose::STANDARD.encode(common::ABLY_API_KEY);
    assert!(
        requests
            .iter()
            .all(|r| r.header("authorization") == Some(&format!("Basic {basic}")))
    );
    // Nobody else hears of it.
    assert!(
        messages
            .iter()
            .all(|m| m.channel == creator_channel || m.channel == fan_channel),
        "{messages:?}"
    );

    // A replay of the same request publishes nothing new.
    settled(&app).await;
    let before = fake.requests().len();
    let replay = tip(&app, &fan, creator.id, 7, "tip-1").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.requests().len(), before);
    assert_eq!(undelivered(&app).await, 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_tip_publishes_nothing() {
    let fake = ably().await;
    let app = app_with(&fake, None).await;
    let creator = creator(&app).await;
    let fan = fan_with(&app, 5).await;
    // The funding itself is a balance change: let it go out first, and the
    // creator's balance from the fold after the response (ADR 0021).
    let warm = tip(&app, &fan, creator.id, 1, "warm").await;
    assert_eq!(warm.status, StatusCode::CREATED);
    let channel = format!("user:{}", creator.id);
    fake.wait_for(WAIT, |r| {
        let got = published(r);
        !named(&got, "tip.received", &channel).is_empty()
            && !named(&got, "balance.updated", &channel).is_empty()
    })
    .await;
    settled(&app).await;
    let before = fake.requests().len();
    let r = tip(&app, &fan, creator.id, 50, "too-much").await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.requests().len(), before);
    assert_eq!(undelivered(&app).await, 0);
}

async fn cron(app: &TestApp, path: &str, secret: Option<&str>) -> TestResponse {
    let mut req = app.get(path);
    if let Some(s) = secret {
        req = req.header("authorization", &format!("Bearer {s}"));
    }
    req.send().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ably_outage_is_retried_by_the_cron_with_the_same_message_id() {
    let fake = ably().await;
    let app = app_with(&fake, None).await;
    let creator = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    fake.fail_next(usize::MAX / 2);

    let r = tip(&app, &fan, creator.id, 3, "during-outage").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    // The delivery after the response fails and backs off.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tried: i64 = sqlx::query_scalar(
            "select count(*) from app.outbox where delivered_at is null and attempts >= 1 \
             and claimed_until is null and last_error like 'Ably answered 503%'",
        )
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("outbox");
        if tried >= 3 || tokio::time::Instant::now() > deadline {
            assert!(tried >= 3, "failed deliveries recorded: {tried}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed_ids: Vec<String> = published(&fake.requests())
        .iter()
        .map(|m| m.id.clone())
        .collect();

    // The cron needs its secret.
    cron(&app, "/api/cron/deliver-outbox", None)
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");
    cron(
        &app,
        "/api/cron/deliver-outbox",
        Some("wrong-secret-wrong-secret"),
    )
    .await
    .assert_problem(StatusCode::UNAUTHORIZED, "invalid_cron_secret");
    assert!(undelivered(&app).await >= 3);

    // Ably is back and the backoff has passed: the cron delivers.
    fake.fail_next(0);
    sqlx::query("update app.outbox set next_attempt_at = now() where delivered_at is null")
        .execute(&app.db.admin_pool)
        .await
        .expect("skip the backoff");
    let run = cron(&app, "/api/cron/deliver-outbox", Some(CRON_SECRET)).await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.text());
    assert!(
        run.json()["delivered"].as_u64() >= Some(3),
        "{}",
        run.text()
    );
    assert_eq!(run.json()["failed"], 0);
    assert_eq!(undelivered(&app).await, 0);
    // The retried messages carry the ids of the failed attempts, so Ably
    // would drop a duplicate of one that had in fact arrived.
    let all = published(&fake.requests());
    let tip_messages: Vec<&Published> = all.iter().filter(|m| m.name == "tip.received").collect();
    assert_eq!(tip_messages.len(), 2, "one failed, one delivered");
    assert_eq!(tip_messages[0].id, tip_messages[1].id);
    assert!(failed_ids.contains(&tip_messages[1].id));
}

/// A QStash callback to the reminder job, signed with `key` for `url`.
async fn reminder_call(app: &TestApp, body: &[u8], key: &str, url: &str) -> TestResponse {
    let now = Utc::now().timestamp();
    app.post(REMINDER_PATH)
        .header("upstash-signature", &sign(key, url, body, now, 300))
        .raw_body("application/json", body.to_vec())
        .send()
        .await
}

fn reminder_url() -> String {
    format!("{PUBLIC_BASE_URL}{REMINDER_PATH}")
}

fn publishes(requests: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.uri.starts_with("/v2/publish/"))
        .collect()
}

async fn class_start(app: &TestApp, class: &str) -> DateTime<Utc> {
    sqlx::query_scalar("select starts_at from app.classes where id = $1::uuid")
        .bind(class)
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("class")
}

#[tokio::test(flavor = "multi_thread")]
async fn reminders_are_scheduled_once_per_start_and_a_stale_one_does_nothing() {
    let realtime = ably().await;
    let jobs = qstash().await;
    let app = app_with(&realtime, Some(&jobs)).await;
    let host = creator(&app).await;
    let class = class(&app, &host, 48, 10, 5).await;
    let first_start = class_start(&app, &class).await;
    let (a, b) = (fan_with(&app, 50).await, fan_with(&app, 50).await);
    for (fan, key) in [(&a, "enrol-a"), (&b, "enrol-b")] {
        let r = enroll(&app, fan, &class, key).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
    let requests = jobs.wait_for(WAIT, |r| !publishes(r).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = jobs.requests();
    let sent = publishes(&sent);
    assert_eq!(
        sent.len(),
        1,
        "one reminder per class and start: {requests:?}"
    );
    let publish = sent[0];
    assert_eq!(publish.method, "POST");
    assert_eq!(publish.uri, format!("/v2/publish/{}", reminder_url()));
    assert_eq!(
        publish.header("authorization"),
        Some(format!("Bearer {QSTASH_TOKEN}").as_str())
    );
    let remind_at = first_start - chrono::Duration::minutes(15);
    assert_eq!(
        publish.header("upstash-not-before"),
        Some(remind_at.timestamp().to_string().as_str())
    );
    assert_eq!(
        publish.header("upstash-deduplication-id"),
        Some(format!("class-reminder.{class}.{}", first_start.timestamp()).as_str())
    );
    assert_eq!(publish.json()["class_id"], json!(class));
    let stale_body = publish.body.clone();

    // Reschedule: a new reminder, and the class's channel hears of it.
    let new_start = first_start + chrono::Duration::hours(24);
    let r = app
        .patch(&format!("/api/v1/classes/{class}"))
        .bearer(&host.token)
        .json(&json!({"starts_at": rfc3339(new_start)}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let all = jobs.wait_for(WAIT, |r| publishes(r).len() >= 2).await;
    let sent = publishes(&all);
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[1].header("upstash-not-before"),
        Some(
            (new_start - chrono::Duration::minutes(15))
                .timestamp()
                .to_string()
                .as_str()
        )
    );
    let fresh_body = sent[1].body.clone();
    let class_channel = format!("class:{class}");
    let updates = realtime
        .wait_for(WAIT, |r| {
            !named(&published(r), "class.updated", &class_channel).is_empty()
        })
        .await;
    let updated = published(&updates);
    let updated = named(&updated, "class.updated", &class_channel);
    assert_eq!(updated.len(), 1);
    assert_eq!(
        updated[0].data["starts_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().ok()),
        Some(Some(new_start))
    );
    // The class has enrolments: the message names the refund window the
    // move opened (ADR 0013), and the published schema allows it (checked
    // for every message by `published`).
    assert!(
        updated[0].data["refund_window_until"]
            .as_str()
            .and_then(|s| s.parse::<DateTime<Utc>>().ok())
            .is_some(),
        "{}",
        updated[0].data
    );

    // The stale message (old start) does nothing; the fresh one notifies.
    let r = reminder_call(&app, &stale_body, QSTASH_CURRENT_KEY, &reminder_url()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["outcome"], "rescheduled");
    let r = reminder_call(&app, &fresh_body, QSTASH_NEXT_KEY, &reminder_url()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["outcome"], "sent");
    // QStash may deliver twice: the second call changes nothing.
    let r = reminder_call(&app, &fresh_body, QSTASH_CURRENT_KEY, &reminder_url()).await;
    assert_eq!(r.json()["outcome"], "sent");
    realtime
        .wait_for(WAIT, |r| {
            !named(&published(r), "class.reminder", &class_channel).is_empty()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = published(&realtime.requests());
    let reminders = named(&got, "class.reminder", &class_channel);
    assert_eq!(reminders.len(), 1, "{got:?}");
    assert_eq!(
        reminders[0].data["starts_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().ok()),
        Some(Some(new_start))
    );
    drop(got);

    // After a cancellation the reminder does nothing, and fans hear of it.
    let r = cancel(&app, &host, &class).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = reminder_call(&app, &fresh_body, QSTASH_CURRENT_KEY, &reminder_url()).await;
    assert_eq!(r.json()["outcome"], "class_cancelled");
    let cancelled = realtime
        .wait_for(WAIT, |r| {
            !named(&published(r), "class.cancelled", &class_channel).is_empty()
        })
        .await;
    assert_eq!(
        named(&published(&cancelled), "class.cancelled", &class_channel).len(),
        1
    );
    // Every kind but tip.received (a_tip_tells_the_creator…) went out here,
    // and `published` checked each against its schema.
    let names: std::collections::BTreeSet<String> = published(&realtime.requests())
        .into_iter()
        .map(|m| m.name)
        .collect();
    for name in [
        "balance.updated",
        "class.updated",
        "class.reminder",
        "class.cancelled",
    ] {
        assert!(names.contains(name), "{name} not seen: {names:?}");
    }
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reminder_callbacks_need_a_valid_qstash_signature() {
    let realtime = ably().await;
    let app = app_with(&realtime, None).await;
    let body = serde_json::to_vec(&json!({
        "class_id": Uuid::new_v4(), "starts_at": "2030-01-01T10:00:00Z"
    }))
    .expect("json");
    let url = reminder_url();
    let now = Utc::now().timestamp();

    let unsigned = app
        .post(REMINDER_PATH)
        .raw_body("application/json", body.clone())
        .send()
        .await;
    unsigned.assert_problem(StatusCode::UNAUTHORIZED, "invalid_qstash_signature");
    for (what, signature, sent_body) in [
        (
            "another key",
            sign("sig_not_ours", &url, &body, now, 300),
            body.clone(),
        ),
        (
            "another URL",
            sign(
                QSTASH_CURRENT_KEY,
                &format!("{PUBLIC_BASE_URL}/api/jobs/other"),
                &body,
                now,
                300,
            ),
            body.clone(),
        ),
        (
            "expired",
            sign(QSTASH_CURRENT_KEY, &url, &body, now - 3600, 300),
            body.clone(),
        ),
        (
            "tampered body",
            sign(QSTASH_CURRENT_KEY, &url, &body, now, 300),
            body.iter()
                .map(|b| if *b == b'2' { b'3' } else { *b })
                .collect(),
        ),
    ] {
        let r = app
            .post(REMINDER_PATH)
            .header("upstash-signature", &signature)
            .raw_body("application/json", sent_body)
            .send()
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
        r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_qstash_signature");
    }
    // Both signing keys are accepted (rotation).
    for key in [QSTASH_CURRENT_KEY, QSTASH_NEXT_KEY] {
        let r = reminder_call(&app, &body, key, &url).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["outcome"], "class_not_found");
    }
    // A signed but malformed message is a 400.
    let bad = br#"{"class_id":"nope"}"#;
    let r = reminder_call(&app, bad, QSTASH_CURRENT_KEY, &url).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn due_jobs_run_inline_without_qstash() {
    // Development: no QStash settings, so the outbox runs due jobs itself.
    let realtime = ably().await;
    let app = app_with(&realtime, None).await;
    let host = creator(&app).await;
    let class = class(&app, &host, 48, 0, 5).await;
    let fan = fan_with(&app, 0).await;
    assert_eq!(
        enroll(&app, &fan, &class, "free").await.status,
        StatusCode::CREATED
    );
    // The app itself is configured for QStash (nothing listens there): let
    // its delivery after the enrolment fail and settle first, so the two
    // deliverers do not meet over the job's row.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let settled: bool = sqlx::query_scalar(
            "select bool_and(attempts >= 1 and claimed_until is null) from app.outbox \
             where kind = 'job'",
        )
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("outbox");
        if settled || tokio::time::Instant::now() > deadline {
            assert!(settled, "the app's own delivery attempt did not settle");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut env = common::test_env(&app.db.app_url());
    env.retain(|(k, _)| !k.starts_with("QSTASH"));
    env.push(("ABLY_API_BASE", realtime.url().to_owned()));
    let outbox = stagepass_routes::outbox::Outbox::load(
        &mut common::loader(&env),
        &app.resources,
        Some(app.db.app_pool.clone()),
    )
    .expect("an outbox without QStash");
    // Not due yet: nothing runs.
    outbox.deliver_pending(4).await.expect("deliver");
    let pending: i64 = sqlx::query_scalar(
        "select count(*) from app.outbox where kind = 'job' and delivered_at is null",
    )
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("jobs");
    assert_eq!(pending, 1);
    // Due (as if 47 h 45 min had passed): the reminder runs and publishes.
    sqlx::query(
        "update app.outbox set not_before = now(), next_attempt_at = now(), claimed_until = null \
         where kind = 'job'",
    )
    .execute(&app.db.admin_pool)
    .await
    .expect("make it due");
    let run = outbox.deliver_pending(4).await.expect("deliver");
    assert!(run.delivered >= 2, "{run:?}");
    let class_channel = format!("class:{class}");
    let got = published(&realtime.requests());
    assert_eq!(
        named(&got, "class.reminder", &class_channel).len(),
        1,
        "{got:?}"
    );
    assert_eq!(undelivered(&app).await, 0);
}

/// Decodes an Ably token with the test key's secret.
fn ably_claims(token: &str) -> (jsonwebtoken::Header, Value) {
    let header = jsonwebtoken::decode_header(token).expect("header");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(ABLY_SECRET.as_bytes()),
        &validation,
    )
    .expect("signed with the Ably key's secret")
    .claims;
    (header, claims)
}

async fn realtime_token(app: &TestApp, who: &User) -> (Value, Value) {
    let r = app
        .post("/api/v1/realtime/token")
        .bearer(&who.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let body = r.json();
    let (header, claims) = ably_claims(body["token"].as_str().expect("token"));
    assert_eq!(header.kid.as_deref(), Some("testapp.testkey"));
    assert_eq!(claims["x-ably-clientId"], who.id.to_string());
    assert_eq!(
        claims["exp"]
            .as_i64()
            .zip(claims["iat"].as_i64())
            .map(|(e, i)| e - i),
        Some(3600)
    );
    let capability: Value =
        serde_json::from_str(claims["x-ably-capability"].as_str().expect("a JSON string"))
            .expect("capability JSON");
    assert_eq!(
        capability, body["capability"],
        "the response tells the truth"
    );
    (body, capability)
}

#[tokio::test(flavor = "multi_thread")]
async fn realtime_tokens_allow_only_what_the_server_decides() {
    let app = TestApp::unlimited().await;
    let host = creator(&app).await;
    let other_class = class(&app, &host, 72, 10, 5).await;
    let class = class(&app, &host, 48, 10, 5).await;
    let enrolled = fan_with(&app, 50).await;
    let stranger = fan_with(&app, 50).await;
    assert_eq!(
        enroll(&app, &enrolled, &class, "k").await.status,
        StatusCode::CREATED
    );

    let (_, fan_caps) = realtime_token(&app, &enrolled).await;
    assert_eq!(
        fan_caps,
        json!({
            format!("user:{}", enrolled.id): ["subscribe"],
            format!("class:{class}"): ["subscribe", "presence"],
        })
    );
    let (_, host_caps) = realtime_token(&app, &host).await;
    assert_eq!(
        host_caps,
        json!({
            format!("user:{}", host.id): ["subscribe"],
            format!("class:{class}"): ["subscribe", "presence"],
            format!("class:{other_class}"): ["subscribe", "presence"],
        })
    );
    let (_, stranger_caps) = realtime_token(&app, &stranger).await;
    assert_eq!(
        stranger_caps,
        json!({format!("user:{}", stranger.id): ["subscribe"]})
    );

    // The request cannot ask for more.
    let r = app
        .post("/api/v1/realtime/token")
        .bearer(&stranger.token)
        .json(&json!({"capability": {"*": ["*"]}, "clientId": host.id}))
        .send()
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert!(r.json().get("token").is_none());
    let r = app.post("/api/v1/realtime/token").send().await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Leaving the class, or its cancellation, takes the channel away.
    assert_eq!(
        withdraw(&app, &enrolled, &class).await.status,
        StatusCode::OK
    );
    let (_, after) = realtime_token(&app, &enrolled).await;
    assert_eq!(
        after,
        json!({format!("user:{}", enrolled.id): ["subscribe"]})
    );
    assert_eq!(
        cancel(&app, &host, &other_class).await.status,
        StatusCode::OK
    );
    let (_, host_after) = realtime_token(&app, &host).await;
    assert!(host_after.get(format!("class:{other_class}")).is_none());
}

/// Makes a feed URL for `who`; returns the path to GET.
async fn feed_path(app: &TestApp, who: &User) -> String {
    let r = app
        .post("/api/v1/schedule/feed-token")
        .bearer(&who.token)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let url = r.json()["url"].as_str().expect("url").to_owned();
    let path = url
        .strip_prefix(PUBLIC_BASE_URL)
        .unwrap_or_else(|| panic!("{url} is not under {PUBLIC_BASE_URL}"))
        .to_owned();
    assert!(path.starts_with("/api/v1/schedule/feed/") && path.ends_with(".ics"));
    path
}

/// Fetches and parses a feed with an independent parser, after checking
/// the RFC 5545 line rules ourselves.
async fn fetch_feed(app: &TestApp, path: &str) -> icalendar::Calendar {
    let r = app.get(path).send().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/calendar; charset=utf-8")
    );
    let text = r.text();
    assert!(text.ends_with("\r\n"));
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        assert!(!line.contains('\n'), "bare LF in {line:?}");
        assert!(line.len() <= 75, "{} octets: {line:?}", line.len());
    }
    text.parse::<icalendar::Calendar>()
        .unwrap_or_else(|e| panic!("not RFC 5545: {e}\n{text}"))
}

fn utc(t: DateTime<Utc>) -> Option<icalendar::DatePerhapsTime> {
    Some(icalendar::DatePerhapsTime::DateTime(
        icalendar::CalendarDateTime::Utc(t),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ical_feed_follows_the_class_and_rotates() {
    use icalendar::{Component as _, EventStatus};

    let app = TestApp::unlimited().await;
    let host = creator(&app).await;
    let fan = fan_with(&app, 50).await;
    let stranger = fan_with(&app, 50).await;
    let title = r"Yoga, flow; and a \ backslash — ünïcode";
    // Issue 14: the feed sent a fixed text instead of this. Long enough to
    // fold, with line breaks and every character RFC 5545 escapes.
    let description = "Bring a mat, water; and a towel.\nWe start slowly — \\ no rush.\n\
                       Ünïcode 🧘 and a long line that certainly needs folding at 75 octets.";
    let r = app
        .post("/api/v1/classes")
        .bearer(&host.token)
        .json(&json!({
            "title": title,
            "description": description,
            "starts_at": rfc3339(Utc::now() + chrono::Duration::hours(48)),
            "time_zone": "Europe/Berlin",
            "duration_minutes": 90,
            "capacity": 5,
            "price_tokens": 10,
        }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let class = r.json()["id"].as_str().expect("id").to_owned();
    let start = class_start(&app, &class).await;
    assert_eq!(
        enroll(&app, &fan, &class, "k").await.status,
        StatusCode::CREATED
    );

    let path = feed_path(&app, &fan).await;
    let calendar = fetch_feed(&app, &path).await;
    assert_eq!(calendar.property_value("VERSION"), Some("2.0"));
    assert!(calendar.property_value("PRODID").is_some());
    let events: Vec<_> = calendar.events().collect();
    assert_eq!(events.len(), 1);
    let event = events[0];
    let uid = format!("class-{class}@stagepass.app");
    assert_eq!(event.get_uid(), Some(uid.as_str()));
    assert_eq!(event.get_summary(), Some(title));
    assert_eq!(
        event.get_description(),
        Some(format!("{description}\n\nYou are attending this class on Stagepass.").as_str())
    );
    assert_eq!(event.get_start(), utc(start));
    assert_eq!(event.get_end(), utc(start + chrono::Duration::minutes(90)));
    assert_eq!(event.get_sequence(), Some(0));
    assert_eq!(event.get_status(), Some(EventStatus::Confirmed));
    assert!(event.get_timestamp().is_some());

    // The host's feed has the host's copy; the stranger's has nothing.
    let host_feed = fetch_feed(&app, &feed_path(&app, &host).await).await;
    assert_eq!(host_feed.events().count(), 1);
    let stranger_feed = fetch_feed(&app, &feed_path(&app, &stranger).await).await;
    assert_eq!(stranger_feed.events().count(), 0);

    // Rescheduled: same UID, moved, SEQUENCE bumped.
    let moved = start + chrono::Duration::hours(3);
    let r = app
        .patch(&format!("/api/v1/classes/{class}"))
        .bearer(&host.token)
        .json(&json!({"starts_at": rfc3339(moved)}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let calendar = fetch_feed(&app, &path).await;
    let event = calendar.events().next().expect("event");
    assert_eq!(event.get_uid(), Some(uid.as_str()));
    assert_eq!(event.get_start(), utc(moved));
    assert_eq!(event.get_sequence(), Some(1));

    // Cancelled: still there, as CANCELLED, SEQUENCE bumped again.
    assert_eq!(cancel(&app, &host, &class).await.status, StatusCode::OK);
    let calendar = fetch_feed(&app, &path).await;
    let event = calendar.events().next().expect("event");
    assert_eq!(event.get_status(), Some(EventStatus::Cancelled));
    assert_eq!(event.get_sequence(), Some(2));

    // Rotation: the old URL stops working at once, the new one works.
    let rotated = feed_path(&app, &fan).await;
    assert_ne!(rotated, path);
    app.get(&path)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(fetch_feed(&app, &rotated).await.events().count(), 1);
    // The URL works with or without `.ics`; garbage and unknown tokens are 404.
    let bare = rotated.trim_end_matches(".ics").to_owned();
    assert_eq!(app.get(&bare).send().await.status, StatusCode::OK);
    let unknown = format!(
        "/api/v1/schedule/feed/{}.ics",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32])
    );
    for bad in ["/api/v1/schedule/feed/nope", unknown.as_str()] {
        app.get(bad)
            .send()
            .await
            .assert_problem(StatusCode::NOT_FOUND, "not_found");
    }
    // Making a feed URL needs a signed-in user.
    let r = app.post("/api/v1/schedule/feed-token").send().await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_of_concurrent_requests_all_go_out_after_their_responses() {
    // Deliveries after responses are coalesced (one at a time per process);
    // a kick arriving while one runs must never be lost.
    let fake = ably().await;
    let app = app_with(&fake, None).await;
    let host = creator(&app).await;
    let mut fans = Vec::new();
    for _ in 0..20 {
        fans.push(fan_with(&app, 10).await);
    }
    let keys: Vec<String> = (0..fans.len()).map(|i| format!("c{i}")).collect();
    let results = futures_util::future::join_all(
        fans.iter()
            .zip(&keys)
            .map(|(fan, key)| tip(&app, fan, host.id, 1, key)),
    )
    .await;
    assert!(results.iter().all(|r| r.status == StatusCode::CREATED));
    let channel = format!("user:{}", host.id);
    // The creator's balance message comes from the fold after the tips'
    // responses (ADR 0021): its last one (by seq) must come to say 20.
    let last_balance = |got: &[Published]| {
        named(got, "balance.updated", &channel)
            .into_iter()
            .max_by_key(|m| m.data["seq"].as_i64())
            .map(|m| m.data["balance"].clone())
    };
    let got = fake
        .wait_for(WAIT, |r| {
            let got = published(r);
            named(&got, "tip.received", &channel).len() >= 20
                && last_balance(&got) == Some(json!(20))
        })
        .await;
    let got = published(&got);
    assert_eq!(named(&got, "tip.received", &channel).len(), 20);
    assert_eq!(
        last_balance(&got),
        Some(json!(20)),
        "the creator's last balance message"
    );
    settled(&app).await;
}

/// A paid call told to both parties (issue 11): request → accept → both
/// join → a fan with exactly 3 minutes of tokens runs out → the 60 s and
/// 30 s warnings → the call ends with its funded time. Every `call.updated`
/// and `call.ending` the code publishes matches its schema (checked by
/// `published`), each party gets every revision of the call exactly under
/// its message id, and both warnings.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_that_runs_out_of_funds_tells_both_parties_in_the_published_shapes() {
    const PRICE: i64 = 10;
    let fake = ably().await;
    let app = app_with(&fake, None).await;
    sqlx::query(
        "update app.feature_flags set enabled = true, rollout_basis_points = 10000 \
          where key = 'calls'",
    )
    .execute(&app.db.admin_pool)
    .await
    .expect("calls flag on");
    let host = creator(&app).await;
    let r = app
        .put("/api/v1/me/call-settings")
        .bearer(&host.token)
        .json(&json!({"price_per_minute": PRICE, "audio_enabled": true, "video_enabled": true}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let fan = fan_with(&app, 3 * PRICE).await;
    let r = app
        .post("/api/v1/calls")
        .bearer(&fan.token)
        .header("idempotency-key", "call-out-of-funds")
        .json(&json!({"creator_id": host.id, "media": "audio"}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let call = r.json()["id"].as_str().expect("id").to_owned();
    let act = |who: &User, action: &str| {
        app.post(&format!("/api/v1/calls/{call}/{action}"))
            .bearer(&who.token)
            .send()
    };
    for (who, action) in [(&host, "accept"), (&host, "join"), (&fan, "join")] {
        let r = act(who, action).await;
        assert_eq!(r.status, StatusCode::OK, "{action}: {}", r.text());
    }
    // +60 s: minute 2 charged, minute 3 held with the fan's last tokens.
    app.db.advance_clock(chrono::Duration::seconds(60)).await;
    assert_eq!(act(&fan, "heartbeat").await.status, StatusCode::OK);
    // +120 s: minute 3 charged, no minute 4: the 60 s warning.
    app.db.advance_clock(chrono::Duration::seconds(60)).await;
    let r = act(&host, "heartbeat").await;
    assert_eq!(r.json()["ending_for_funds"], true, "{}", r.text());
    // +150 s: the 30 s warning; +180 s: the end (the sweep does what the
    // call-tick jobs would).
    for _ in 0..2 {
        app.db.advance_clock(chrono::Duration::seconds(30)).await;
        let run = cron(&app, "/api/cron/bill-calls", Some(CRON_SECRET)).await;
        assert_eq!(run.status, StatusCode::OK, "{}", run.text());
    }
    let (status, end_reason, sequence): (String, Option<String>, i32) =
        sqlx::query_as("select status, end_reason, sequence from app.calls where id = $1::uuid")
            .bind(&call)
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("call");
    assert_eq!(
        (status.as_str(), end_reason.as_deref()),
        ("ended", Some("funds_exhausted"))
    );
    // Whatever the deliveries after the responses left (the job rows go to
    // a QStash nobody runs here; realtime rows are independent of them).
    let run = cron(&app, "/api/cron/deliver-outbox", Some(CRON_SECRET)).await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.text());

    let parties = [fan.id, host.id];
    let expected_ids = |party: Uuid| -> Vec<String> {
        (0..=sequence)
            .map(|s| format!("call:{call}:{s}:{party}"))
            .collect()
    };
    let requests = fake
        .wait_for(WAIT, |r| {
            let m = published(r);
            parties.iter().all(|p| {
                let channel = format!("user:{p}");
                let ids: std::collections::BTreeSet<&str> = named(&m, "call.updated", &channel)
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect();
                expected_ids(*p).iter().all(|id| ids.contains(id.as_str()))
                    && named(&m, "call.ending", &channel).len() >= 2
            })
        })
        .await;
    // `published` checked every message against its schema.
    let messages = published(&requests);
    for party in parties {
        let channel = format!("user:{party}");
        let updates = named(&messages, "call.updated", &channel);
        let mut ids: Vec<String> = updates.iter().map(|m| m.id.clone()).collect();
        ids.sort_by_key(|id| {
            id.split(':')
                .nth(2)
                .and_then(|s| s.parse::<i32>().ok())
                .unwrap_or(-1)
        });
        ids.dedup();
        assert_eq!(ids, expected_ids(party), "every revision, to each party");
        for m in &updates {
            assert_eq!(m.data["call_id"], call.as_str());
            assert_eq!(
                m.id,
                format!("call:{call}:{}:{party}", m.data["sequence"]),
                "the id names the revision"
            );
        }
        let statuses: Vec<&str> = updates
            .iter()
            .filter_map(|m| m.data["status"].as_str())
            .collect();
        for s in ["ringing", "accepted", "active", "ended"] {
            assert!(statuses.contains(&s), "{channel}: no {s} in {statuses:?}");
        }
        let last = updates
            .iter()
            .max_by_key(|m| m.data["sequence"].as_i64())
            .expect("updates");
        assert_eq!(last.data["status"], "ended");
        assert_eq!(last.data["end_reason"], "funds_exhausted");
        assert_eq!(last.data["billed_minutes"], 3);
        let mut warnings: Vec<i64> = named(&messages, "call.ending", &channel)
            .iter()
            .map(|m| {
                assert_eq!(m.data["call_id"], call.as_str());
                assert_eq!(
                    m.id,
                    format!("call.ending:{call}:{}:{party}", m.data["seconds_left"])
                );
                m.data["seconds_left"].as_i64().expect("seconds_left")
            })
            .collect();
        warnings.sort_unstable();
        warnings.dedup();
        assert_eq!(warnings, [30, 60], "{channel}");
    }
    assert_ledger_clean(&app).await;
}
