//! `POST /api/v1/auth/access-token-hook`: Standard Webhooks signature, and
//! `app_role` always from the database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::{HOOK_SECRET, TestApp, TestResponse, WRONG_HOOK_SECRET};
use http::StatusCode;
use serde_json::{Value, json};
use stagepass_platform::config::Secret;
use stagepass_routes::auth_hook::HookKey;
use uuid::Uuid;

const PATH: &str = "/api/v1/auth/access-token-hook";

fn key(secret: &str) -> HookKey {
    HookKey::from_secret(&Secret::from(secret.to_owned())).expect("valid hook secret")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn payload(user_id: Uuid, extra_claims: Value) -> Value {
    let mut claims = json!({
        "aud": "authenticated",
        "exp": now() + 3600,
        "iat": now(),
        "sub": user_id,
        "email": "hook@example.test",
        "role": "authenticated",
        "aal": "aal1",
        "session_id": Uuid::new_v4(),
        "is_anonymous": false,
    });
    for (k, v) in extra_claims.as_object().expect("object") {
        claims[k] = v.clone();
    }
    json!({ "user_id": user_id, "claims": claims, "authentication_method": "password" })
}

/// Sends `body` with the three Standard Webhooks headers.
async fn call(
    app: &TestApp,
    body: &[u8],
    id: &str,
    timestamp: i64,
    signature: &str,
) -> TestResponse {
    app.post(PATH)
        .header("webhook-id", id)
        .header("webhook-timestamp", &timestamp.to_string())
        .header("webhook-signature", signature)
        .raw_body("application/json", body.to_vec())
        .send()
        .await
}

async fn call_signed(app: &TestApp, body: &Value) -> TestResponse {
    let bytes = serde_json::to_vec(body).expect("JSON");
    let ts = now();
    let sig = key(HOOK_SECRET).sign("msg_1", ts, &bytes);
    call(app, &bytes, "msg_1", ts, &sig).await
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_signature_returns_claims_with_role_from_the_database() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    app.set_role(user.id, "creator").await;

    let body = payload(user.id, json!({}));
    let r = call_signed(&app, &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let out = r.json();
    let claims = out["claims"].as_object().expect("claims object");
    assert_eq!(claims["app_role"], "creator");
    // Every claim sent in comes back unchanged.
    for (k, v) in body["claims"].as_object().expect("object") {
        assert_eq!(&claims[k], v, "claim {k}");
    }
    assert_eq!(
        claims.len(),
        body["claims"].as_object().map_or(0, |c| c.len()) + 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_user_is_a_fan() {
    let app = TestApp::new().await;
    let id = Uuid::new_v4();
    let r = call_signed(&app, &payload(id, json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["claims"]["app_role"], "fan");
    assert_eq!(app.role_of(id).await, None, "the hook does not write users");
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_supplied_app_role_is_overwritten() {
    let app = TestApp::new().await;
    let fan = app.signed_in_user().await;
    let r = call_signed(&app, &payload(fan.id, json!({ "app_role": "admin" }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["claims"]["app_role"], "fan");

    let ghost = Uuid::new_v4();
    let r = call_signed(&app, &payload(ghost, json!({ "app_role": "admin" }))).await;
    assert_eq!(r.json()["claims"]["app_role"], "fan");

    let admin = app.admin().await;
    let r = call_signed(&app, &payload(admin.id, json!({ "app_role": "fan" }))).await;
    assert_eq!(r.json()["claims"]["app_role"], "admin");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_body_is_401() {
    let app = TestApp::new().await;
    let fan = app.signed_in_user().await;
    let original = serde_json::to_vec(&payload(fan.id, json!({}))).expect("JSON");
    let ts = now();
    let sig = key(HOOK_SECRET).sign("msg_2", ts, &original);
    // Sanity: the untampered call passes.
    let ok = call(&app, &original, "msg_2", ts, &sig).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());

    let mut tampered: Value = serde_json::from_slice(&original).expect("JSON");
    tampered["user_id"] = json!(Uuid::new_v4());
    let tampered = serde_json::to_vec(&tampered).expect("JSON");
    let r = call(&app, &tampered, "msg_2", ts, &sig).await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");

    // One appended byte.
    let mut extended = original.clone();
    extended.push(b' ');
    let r = call(&app, &extended, "msg_2", ts, &sig).await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");

    // Another message id with the same signature.
    let r = call(&app, &original, "msg_3", ts, &sig).await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_secret_is_401() {
    let app = TestApp::new().await;
    let body = serde_json::to_vec(&payload(Uuid::new_v4(), json!({}))).expect("JSON");
    let ts = now();
    let sig = key(WRONG_HOOK_SECRET).sign("msg_4", ts, &body);
    let r = call(&app, &body, "msg_4", ts, &sig).await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");

    // A bad signature alongside a good one (key rotation) is fine; bad ones alone are not.
    let good = key(HOOK_SECRET).sign("msg_4", ts, &body);
    let r = call(&app, &body, "msg_4", ts, &format!("{sig} {good}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for garbage in ["v1,", "v1,!!!", "v2,abc", "", &good[3..]] {
        let r = call(&app, &body, "msg_4", ts, garbage).await;
        r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_or_future_timestamp_is_401() {
    let app = TestApp::new().await;
    let body = serde_json::to_vec(&payload(Uuid::new_v4(), json!({}))).expect("JSON");
    for ts in [now() - 600, now() + 600] {
        // Correctly signed, but outside the 5-minute window.
        let sig = key(HOOK_SECRET).sign("msg_5", ts, &body);
        let r = call(&app, &body, "msg_5", ts, &sig).await;
        r.assert_problem(StatusCode::UNAUTHORIZED, "stale_signature");
    }
    // Within the window it passes.
    let ts = now() - 120;
    let sig = key(HOOK_SECRET).sign("msg_5", ts, &body);
    let r = call(&app, &body, "msg_5", ts, &sig).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_headers_are_401() {
    let app = TestApp::new().await;
    let body = serde_json::to_vec(&payload(Uuid::new_v4(), json!({}))).expect("JSON");
    let ts = now();
    let sig = key(HOOK_SECRET).sign("msg_6", ts, &body);
    let headers = [
        ("webhook-id", "msg_6".to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sig),
    ];
    for skip in 0..headers.len() {
        let mut req = app.post(PATH);
        for (i, (name, value)) in headers.iter().enumerate() {
            if i != skip {
                req = req.header(name, value);
            }
        }
        let r = req.raw_body("application/json", body.clone()).send().await;
        r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
    }
    let r = app
        .post(PATH)
        .raw_body("application/json", body.clone())
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_signature");
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_but_malformed_payload_is_400() {
    let app = TestApp::new().await;
    let r = call_signed(&app, &json!({ "user_id": "nope", "claims": {} })).await;
    r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(r.first_error_field(), "user_id");
    let r = call_signed(&app, &json!({ "user_id": Uuid::new_v4(), "claims": [] })).await;
    r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(r.first_error_field(), "claims");
}
