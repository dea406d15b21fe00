//! Class helpers shared by the class, realtime and job tests.

use axum::http::StatusCode;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::{CRON_SECRET, TestApp, TestResponse, User, fund};

pub async fn creator(app: &TestApp) -> User {
    let c = app.signed_in_user().await;
    app.set_role(c.id, "creator").await;
    c
}

pub async fn fan_with(app: &TestApp, tokens: i64) -> User {
    let f = app.signed_in_user().await;
    fund(app, f.id, tokens).await;
    f
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A valid class body starting `hours` from now.
pub fn class_body(hours: i64, price: i64, capacity: i64) -> Value {
    json!({
        "title": "Morning flow",
        "description": "Gentle yoga.\nBring a mat.",
        "starts_at": rfc3339(Utc::now() + Duration::hours(hours)),
        "time_zone": "Europe/Berlin",
        "duration_minutes": 60,
        "capacity": capacity,
        "price_tokens": price,
    })
}

pub async fn create(app: &TestApp, who: &User, body: &Value) -> TestResponse {
    app.post("/api/v1/classes")
        .bearer(&who.token)
        .json(body)
        .send()
        .await
}

/// Creates a class and returns its id.
pub async fn class(app: &TestApp, who: &User, hours: i64, price: i64, capacity: i64) -> String {
    let r = create(app, who, &class_body(hours, price, capacity)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_owned()
}

pub async fn enroll(app: &TestApp, fan: &User, class: &str, key: &str) -> TestResponse {
    app.post(&format!("/api/v1/classes/{class}/enrollments"))
        .bearer(&fan.token)
        .header("idempotency-key", key)
        .send()
        .await
}

pub async fn withdraw(app: &TestApp, fan: &User, class: &str) -> TestResponse {
    app.request(
        http::Method::DELETE,
        &format!("/api/v1/classes/{class}/enrollments/me"),
    )
    .bearer(&fan.token)
    .send()
    .await
}

pub async fn cancel(app: &TestApp, who: &User, class: &str) -> TestResponse {
    app.post(&format!("/api/v1/classes/{class}/cancel"))
        .bearer(&who.token)
        .send()
        .await
}

pub async fn settle(app: &TestApp) -> TestResponse {
    app.get("/api/cron/settle-classes")
        .header("authorization", &format!("Bearer {CRON_SECRET}"))
        .send()
        .await
}
