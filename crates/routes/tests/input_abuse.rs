//! Issue 14's input findings, each refused with a 400 naming the field and
//! changing nothing: crafted cursors (a 500 before), NUL bytes (a 500
//! from Postgres before), bidi overrides and other format characters in
//! user-visible text (spoofing), and the same rules for query strings and
//! the Idempotency-Key header. Emoji sequences joined by U+200D stay allowed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use axum::http::StatusCode;
use common::classes::{class_body, create, creator, fan_with};
use common::{TestApp, TestResponse};
use serde_json::json;

fn assert_field(r: &TestResponse, field: &str) {
    r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(r.first_error_field(), field, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn crafted_cursors_are_a_400_not_a_500() {
    let app = TestApp::new().await;
    let fan = app.signed_in_user().await;
    for cursor in [
        "-3200000000000000000.00000000000000000000000000000000",
        "9223372036854775807.00000000000000000000000000000000",
        "253402300800000000.00000000000000000000000000000000",
    ] {
        let r = app
            .get(&format!("/api/v1/classes?cursor={cursor}"))
            .bearer(&fan.token)
            .send()
            .await;
        assert_field(&r, "cursor");
    }
    for cursor in ["-1", "0", "-9223372036854775808"] {
        let r = app
            .get(&format!("/api/v1/tokens/ledger?cursor={cursor}"))
            .bearer(&fan.token)
            .send()
            .await;
        assert_field(&r, "cursor");
    }
    // The extremes of the schedule's range are valid instants Postgres holds.
    let r = app
        .get("/api/v1/schedule?from=9999-12-01T00:00:00Z&to=9999-12-31T23:59:59-14:00")
        .bearer(&fan.token)
        .send()
        .await;
    assert!(
        r.status.is_success() || r.status == StatusCode::BAD_REQUEST,
        "{}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nul_byte_is_refused_in_every_text_field() {
    let app = TestApp::new().await;
    let admin = app.admin().await;
    let target = app.signed_in_user().await;
    let r = app
        .put(&format!("/api/v1/admin/users/{}/role", target.id))
        .bearer(&admin.token)
        .json(&json!({"role": "creator", "reason": "promoted\u{0}"}))
        .send()
        .await;
    assert_field(&r, "reason");
    assert_eq!(app.role_of(target.id).await.as_deref(), Some("fan"));
    assert_eq!(app.role_change_count(target.id).await, 0);

    let r = app
        .patch("/api/v1/me")
        .bearer(&target.token)
        .json(&json!({"display_name": "a\u{0}b"}))
        .send()
        .await;
    assert_field(&r, "display_name");
    // A NUL in a field the route never stores as text is refused too (one
    // rule for every string), and so is one in a query string.
    let r = app
        .post("/api/v1/tokens/purchases")
        .bearer(&target.token)
        .header("idempotency-key", "nul-1")
        .json(&json!({"package": "starter\u{0}"}))
        .send()
        .await;
    assert_field(&r, "package");
    let r = app
        .get("/api/v1/classes?creator=%00")
        .bearer(&target.token)
        .send()
        .await;
    assert_field(&r, "creator");
}

#[tokio::test(flavor = "multi_thread")]
async fn format_characters_are_refused_in_user_visible_text() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    for spoof in [
        "admin\u{202E}nimda",
        "zero\u{200B}width",
        "\u{2066}isolate\u{2069}",
        "mark\u{200F}",
        "bom\u{FEFF}",
        "escape\u{1B}[2J",
    ] {
        let r = app
            .patch("/api/v1/me")
            .bearer(&fan.token)
            .json(&json!({"display_name": spoof}))
            .send()
            .await;
        assert_field(&r, "display_name");
        let r = app
            .post("/api/v1/tips")
            .bearer(&fan.token)
            .header("idempotency-key", &format!("spoof-{}", spoof.len()))
            .json(&json!({"recipient_id": c.id, "amount": 1, "message": spoof}))
            .send()
            .await;
        assert_field(&r, "message");
        let mut body = class_body(48, 10, 5);
        body["title"] = json!(spoof);
        assert_field(&create(&app, &c, &body).await, "title");
        let mut body = class_body(48, 10, 5);
        body["description"] = json!(format!("Fine text.\n{spoof}"));
        assert_field(&create(&app, &c, &body).await, "description");
    }
    // A title is one line; a description keeps its line breaks.
    let mut body = class_body(48, 10, 5);
    body["title"] = json!("two\nlines");
    assert_field(&create(&app, &c, &body).await, "title");
    // Nothing was stored.
    assert_eq!(common::wallet(&app, fan.id).await, 100);
    let classes: i64 = sqlx::query_scalar("select count(*) from app.classes")
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("count");
    assert_eq!(classes, 0);

    // Emoji built with U+200D ZERO WIDTH JOINER are allowed everywhere.
    let r = app
        .patch("/api/v1/me")
        .bearer(&fan.token)
        .json(&json!({"display_name": "Zoë 👩‍💻"}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["display_name"], "Zoë 👩‍💻");
    let r = app
        .post("/api/v1/tips")
        .bearer(&fan.token)
        .header("idempotency-key", "emoji-ok")
        .json(&json!({"recipient_id": c.id, "amount": 1, "message": "thanks 👨‍👩‍👧\nsee you"}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let mut body = class_body(48, 10, 5);
    body["title"] = json!("Coding 👩‍💻 live");
    let r = create(&app, &c, &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_outside_visible_ascii_is_refused() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    let body = json!({"recipient_id": c.id, "amount": 1});
    for key in ["tab\there", "sp ace", "ünï"] {
        let req = http::Request::builder()
            .method("POST")
            .uri("/api/v1/tips")
            .header("authorization", format!("Bearer {}", fan.token))
            .header("content-type", "application/json")
            .header(
                "idempotency-key",
                http::HeaderValue::from_bytes(key.as_bytes()).expect("header bytes"),
            )
            .body(axum::body::Body::from(body.to_string()))
            .expect("request");
        let r = app.send(req).await;
        assert_field(&r, "Idempotency-Key");
    }
    assert_eq!(common::wallet(&app, fan.id).await, 100);
}

/// Issue 14: raw-body routes read 300 KiB under the dev server and Lambda,
/// and routes that take no body read and ignored any. One limit, one
/// answer (problem+json), and bodies refused where none is taken.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_are_bounded_everywhere_and_refused_where_none_is_taken() {
    let app = TestApp::unlimited().await;
    let big = vec![b'{'; 300 * 1024];
    for path in [
        "/api/webhooks/stripe",
        "/api/v1/auth/access-token-hook",
        "/api/jobs/class-reminder",
        "/api/v1/realtime/token",
    ] {
        let r = app
            .post(path)
            .raw_body("application/json", big.clone())
            .send()
            .await;
        r.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
    let c = creator(&app).await;
    let fan = fan_with(&app, 100).await;
    let id = common::classes::class(&app, &c, 48, 10, 5).await;
    let json_body = json!({"ignored": true});
    for (method, path, who) in [
        (
            http::Method::POST,
            format!("/api/v1/classes/{id}/cancel"),
            &c,
        ),
        (
            http::Method::POST,
            "/api/v1/schedule/feed-token".to_owned(),
            &fan,
        ),
        (http::Method::GET, "/api/v1/me".to_owned(), &fan),
        (http::Method::GET, "/api/v1/tokens/balance".to_owned(), &fan),
        (
            http::Method::DELETE,
            format!("/api/v1/classes/{id}/enrollments/me"),
            &fan,
        ),
    ] {
        let r = app
            .request(method.clone(), &path)
            .bearer(&who.token)
            .json(&json_body)
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "bad_request");
        assert!(
            r.text().contains("takes no request body"),
            "{method} {path}: {}",
            r.text()
        );
    }
    let r = app
        .post(&format!("/api/v1/classes/{id}/enrollments"))
        .bearer(&fan.token)
        .header("idempotency-key", "with-body")
        .json(&json_body)
        .send()
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "bad_request");
    // Nothing happened: the class is still on and nobody enrolled.
    let class = app
        .get(&format!("/api/v1/classes/{id}"))
        .bearer(&fan.token)
        .send()
        .await
        .json();
    assert_eq!(
        (class["status"].as_str(), class["seats_taken"].as_i64()),
        (Some("scheduled"), Some(0))
    );
    // Without a body the same requests work.
    let r = app
        .post(&format!("/api/v1/classes/{id}/enrollments"))
        .bearer(&fan.token)
        .header("idempotency-key", "no-body")
        .send()
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
}
