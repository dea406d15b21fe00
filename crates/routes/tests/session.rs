//! `GET /api/v1/me` and `PATCH /api/v1/me`: first sight, identity only from
//! the verified token (SPEC §6 defect 8), strict JSON bodies.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::{TestApp, claims_for, sign_claims, token_for};
use http::StatusCode;
use serde_json::json;
use uuid::Uuid;

async fn stored_profile(app: &TestApp, id: Uuid) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("select role, handle, display_name from app.users where id = $1")
        .bind(id)
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("user row")
}

#[tokio::test(flavor = "multi_thread")]
async fn first_sight_creates_a_fan_with_the_tokens_email() {
    let app = TestApp::new().await;
    let user = app.new_user();
    assert_eq!(app.role_of(user.id).await, None, "user must not exist yet");

    let r = app.get("/api/v1/me").bearer(&user.token).send().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let me = r.json();
    assert_eq!(me["id"], user.id.to_string());
    assert_eq!(me["role"], "fan");
    assert_eq!(me["email"], user.email);
    assert_eq!(me["email_verified"], true);
    assert!(me["handle"].is_null());

    assert_eq!(app.role_of(user.id).await.as_deref(), Some("fan"));
    let email: Option<String> =
        sqlx::query_scalar("select email from app.user_private where user_id = $1")
            .bind(user.id)
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("user_private row");
    assert_eq!(email.as_deref(), Some(user.email.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn second_sight_returns_the_same_row() {
    let app = TestApp::new().await;
    let user = app.new_user();
    let first = app
        .get("/api/v1/me")
        .bearer(&user.token)
        .send()
        .await
        .json();
    let second = app
        .get("/api/v1/me")
        .bearer(&user.token)
        .send()
        .await
        .json();
    assert_eq!(first, second);
    let count: i64 = sqlx::query_scalar("select count(*) from app.users where id = $1")
        .bind(user.id)
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("count");
    assert_eq!(count, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_token_email_is_the_only_email_source() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    // Supabase reissues the token after an e-mail change: the token is the authority.
    let token = token_for(user.id, Some("changed@example.test"));
    let me = app.get("/api/v1/me").bearer(&token).send().await.json();
    assert_eq!(me["email"], "changed@example.test");
}

/// First sight answers a known user whose token says nothing new in one
/// lookup (migration 27); anything new must still be written. Here: the
/// verification flips, and a user row made by an operator (no private
/// row yet) gains its private row on the next request.
#[tokio::test(flavor = "multi_thread")]
async fn what_a_later_token_says_anew_is_still_recorded() {
    let app = TestApp::new().await;
    let private = |id: Uuid| {
        let pool = app.db.admin_pool.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, bool)>(
                "select email, email_verified from app.user_private where user_id = $1",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .expect("user_private")
        }
    };

    let app_ref = &app;
    let me = move |token: String| async move {
        app_ref.get("/api/v1/me").bearer(&token).send().await.json()
    };

    let user = app.new_user();
    let mut claims = claims_for(user.id, Some(&user.email), 3600);
    claims["user_metadata"]["email_verified"] = json!(false);
    let unverified = sign_claims(&claims);
    let first = me(unverified.clone()).await;
    assert_eq!(first["email_verified"], false);
    // The same token again: nothing new, same answer.
    assert_eq!(me(unverified).await, first);
    // The address is confirmed; the next token says so.
    assert_eq!(me(user.token.clone()).await["email_verified"], true);
    assert_eq!(
        private(user.id).await,
        Some((Some(user.email.clone()), true))
    );

    // An operator made this user a creator before they ever signed in.
    let early = app.new_user();
    app.set_role(early.id, "creator").await;
    assert_eq!(
        private(early.id).await,
        None,
        "the operator writes no private row"
    );
    let seen = me(early.token.clone()).await;
    assert_eq!(seen["role"], "creator");
    assert_eq!(seen["email"], early.email);
    assert_eq!(
        private(early.id).await,
        Some((Some(early.email.clone()), true))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_claims_cannot_set_the_role() {
    let app = TestApp::new().await;
    for claim in [
        json!({ "app_role": "admin" }),
        json!({ "user_metadata": { "role": "admin", "email_verified": true } }),
        json!({ "app_metadata": { "role": "admin", "provider": "email" } }),
        json!({ "app_role": "admin", "user_metadata": { "role": "admin" } }),
    ] {
        let id = Uuid::new_v4();
        let mut claims = claims_for(id, Some("x@example.test"), 3600);
        for (k, v) in claim.as_object().expect("object") {
            claims[k] = v.clone();
        }
        let r = app
            .get("/api/v1/me")
            .bearer(&sign_claims(&claims))
            .send()
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            r.json()["role"],
            "fan",
            "claims {claim} must not set the role"
        );
        assert_eq!(app.role_of(id).await.as_deref(), Some("fan"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn creator_set_by_operator_is_kept_on_later_sign_ins() {
    // Defect 8: mobile logins demoted creators.
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    app.set_role(user.id, "creator").await;
    let mut claims = claims_for(user.id, Some(&user.email), 3600);
    claims["app_role"] = json!("fan");
    let me = app
        .get("/api/v1/me")
        .bearer(&sign_claims(&claims))
        .send()
        .await
        .json();
    assert_eq!(me["role"], "creator");
    assert_eq!(app.role_of(user.id).await.as_deref(), Some("creator"));
}

#[tokio::test(flavor = "multi_thread")]
async fn session_response_headers() {
    let app = TestApp::new().await;
    let user = app.new_user();
    let r = app.get("/api/v1/me").bearer(&user.token).send().await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let vary = r.header_all("vary").to_ascii_lowercase();
    assert!(vary.contains("authorization"), "Vary: {vary}");
    assert!(vary.contains("origin"), "Vary: {vary}");
    let request_id = r.header("request-id").expect("Request-Id");
    assert!(
        Uuid::parse_str(request_id).is_ok(),
        "Request-Id {request_id}"
    );
    assert_eq!(r.header("api-version"), Some("1"));
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "content type {:?}",
        r.header("content-type")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_is_401_missing_token() {
    let app = TestApp::new().await;
    let r = app.get("/api/v1/me").send().await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "missing_token");
    // RFC 6750 §3.1: no token presented, so no error code, only the scheme.
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="stagepass""#)
    );
    assert_eq!(app.total_role_changes().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_token_is_401_invalid_token() {
    let app = TestApp::new().await;
    for value in [
        "Bearer garbage",
        "Bearer a.b.c",
        "Basic dXNlcjpwYXNz",
        "Bearer ",
    ] {
        let r = app
            .get("/api/v1/me")
            .header("authorization", value)
            .send()
            .await;
        r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_token");
        // RFC 6750 §3.1: a token was presented and refused.
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="stagepass", error="invalid_token""#),
            "{value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_signed_with_another_secret_is_401() {
    let app = TestApp::new().await;
    let id = Uuid::new_v4();
    let token = stagepass_platform::auth::testing::mint_hs256(
        "a-completely-different-secret-0123456789abcdef",
        common::ISSUER,
        id,
        Some("x@example.test"),
        3600,
    );
    let r = app.get("/api/v1/me").bearer(&token).send().await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_token");
    assert_eq!(app.role_of(id).await, None, "no user may be created");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_401() {
    let app = TestApp::new().await;
    let id = Uuid::new_v4();
    let token = sign_claims(&claims_for(id, Some("x@example.test"), -3600));
    let r = app.get("/api/v1/me").bearer(&token).send().await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "invalid_token");
    assert_eq!(app.role_of(id).await, None, "no user may be created");
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_updates_handle_and_display_name() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .json(&json!({ "handle": "  Jane_Doe42 ", "display_name": " Jane Doe " }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let me = r.json();
    assert_eq!(me["handle"], "jane_doe42");
    assert_eq!(me["display_name"], "Jane Doe");
    assert_eq!(me["role"], "fan");
    assert_eq!(
        stored_profile(&app, user.id).await,
        (
            "fan".into(),
            Some("jane_doe42".into()),
            Some("Jane Doe".into())
        )
    );

    // Only one field: the other is kept.
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .json(&json!({ "display_name": "J" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        stored_profile(&app, user.id).await,
        ("fan".into(), Some("jane_doe42".into()), Some("J".into()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_on_first_sight_creates_the_user() {
    let app = TestApp::new().await;
    let user = app.new_user();
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .json(&json!({ "handle": "newbie" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["handle"], "newbie");
    assert_eq!(stored_profile(&app, user.id).await.0, "fan");
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_refuses_role_as_unknown_field() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    let before = stored_profile(&app, user.id).await;
    for body in [
        json!({ "role": "admin" }),
        json!({ "handle": "sneaky", "role": "admin" }),
        json!({ "display_name": "x", "role": "creator" }),
    ] {
        let r = app
            .patch("/api/v1/me")
            .bearer(&user.token)
            .json(&body)
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), "role", "body {body}");
        assert_eq!(
            stored_profile(&app, user.id).await,
            before,
            "row changed by {body}"
        );
    }
    for (body, field) in [
        (json!({ "email": "attacker@example.test" }), "email"),
        (json!({ "id": Uuid::new_v4() }), "id"),
    ] {
        let r = app
            .patch("/api/v1/me")
            .bearer(&user.token)
            .json(&body)
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), field);
    }
    let email: Option<String> =
        sqlx::query_scalar("select email from app.user_private where user_id = $1")
            .bind(user.id)
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("email");
    assert_eq!(email.as_deref(), Some(user.email.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_wrong_type_names_the_field() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    for (body, field) in [
        (json!({ "handle": 42 }), "handle"),
        (json!({ "display_name": ["a"] }), "display_name"),
        (
            json!({ "handle": "okay_handle", "display_name": true }),
            "display_name",
        ),
    ] {
        let r = app
            .patch("/api/v1/me")
            .bearer(&user.token)
            .json(&body)
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), field, "body {body}");
    }
    assert_eq!(stored_profile(&app, user.id).await.1, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_bad_handle_format_is_400() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    for handle in [
        "ab",
        "has space",
        "dash-ed",
        "émile",
        "x".repeat(31).as_str(),
        "",
    ] {
        let r = app
            .patch("/api/v1/me")
            .bearer(&user.token)
            .json(&json!({ "handle": handle }))
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), "handle", "handle {handle:?}");
    }
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .json(&json!({ "display_name": "bad\u{0007}name" }))
        .send()
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(r.first_error_field(), "display_name");
    assert_eq!(
        stored_profile(&app, user.id).await,
        ("fan".into(), None, None)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_empty_body_is_400() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .json(&json!({}))
        .send()
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    // Not JSON at all is also a 400 (never a 500).
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .raw_body("application/json", "{not json")
        .send()
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "bad_request");
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .raw_body("application/json", "")
        .send()
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_duplicate_handle_is_409() {
    let app = TestApp::new().await;
    let alice = app.signed_in_user().await;
    let bob = app.signed_in_user().await;
    let r = app
        .patch("/api/v1/me")
        .bearer(&alice.token)
        .json(&json!({ "handle": "taken_one" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Case-insensitive: stored lower-case, so "TAKEN_ONE" collides.
    let r = app
        .patch("/api/v1/me")
        .bearer(&bob.token)
        .json(&json!({ "handle": "TAKEN_ONE", "display_name": "Bob" }))
        .send()
        .await;
    r.assert_problem(StatusCode::CONFLICT, "handle_taken");
    assert_eq!(
        stored_profile(&app, bob.id).await,
        ("fan".into(), None, None)
    );
    // Setting one's own handle again is fine.
    let r = app
        .patch("/api/v1/me")
        .bearer(&alice.token)
        .json(&json!({ "handle": "taken_one" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_needs_json_content_type() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ] {
        let r = app
            .patch("/api/v1/me")
            .bearer(&user.token)
            .raw_body(ct, r#"{"handle":"plain_text"}"#)
            .send()
            .await;
        r.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    }
    // No content type at all.
    let r = app.patch("/api/v1/me").bearer(&user.token).send().await;
    r.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    assert_eq!(stored_profile(&app, user.id).await.1, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_body_over_64_kib_is_413() {
    let app = TestApp::new().await;
    let user = app.signed_in_user().await;
    let big = json!({ "display_name": "x".repeat(70 * 1024) });
    let r = app
        .patch("/api/v1/me")
        .bearer(&user.token)
        .json(&big)
        .send()
        .await;
    r.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(stored_profile(&app, user.id).await.2, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_without_token_is_401() {
    let app = TestApp::new().await;
    let r = app
        .patch("/api/v1/me")
        .json(&json!({ "handle": "anon_user" }))
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "missing_token");
}

/// A first sight that fails (here a claim it cannot read:
/// `user_metadata.email_verified` is user-editable in Supabase) fails that
/// request only. The pooled connection goes back clean: the next
/// transaction on the same single connection, another user's, works. (First
/// sight inside the `BEGIN` message would leave the connection in an
/// aborted transaction that sqlx does not know to roll back.)
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_first_sight_leaves_the_pooled_connection_clean() {
    let app = TestApp::new().await;
    // A function's own pool (connect options of its pool mode, also
    // through PgBouncer), with one connection.
    let mut env = stagepass_platform::config::Loader::from_map([
        ("APP_ENV", "test".to_owned()),
        ("DATABASE_URL", app.db.app_url()),
        ("DATABASE_MAX_CONNECTIONS", "1".to_owned()),
    ]);
    let cfg = stagepass_platform::config::DbConfig::load(&mut env).expect("db config");
    env.finish().expect("no problems");
    let pool = stagepass_platform::db::connect_lazy(&cfg).expect("one-connection pool");
    let claims = |sub: Uuid, raw: serde_json::Value| stagepass_platform::auth::Claims {
        sub,
        email: None,
        email_verified: false,
        app_role: None,
        session_id: None,
        exp: 0,
        raw,
    };
    let mallory = Uuid::new_v4();
    let bad = claims(
        mallory,
        json!({"sub": mallory, "role": "authenticated", "user_metadata": {"email_verified": "maybe"}}),
    );
    for _ in 0..2 {
        let err = stagepass_routes::me::begin_seen(&pool, &bad)
            .await
            .expect_err("first sight cannot read the claim");
        assert_eq!(
            stagepass_platform::db::sqlstate(&err).as_deref(),
            Some("22P02"),
            "{err}"
        );
    }
    let alice = Uuid::new_v4();
    let good = claims(alice, json!({"sub": alice, "role": "authenticated"}));
    let mut tx = stagepass_routes::me::begin_seen(&pool, &good)
        .await
        .expect("the next transaction on the same connection");
    let seen: Option<Uuid> = sqlx::query_scalar("select id from app.users where id = auth.uid()")
        .fetch_optional(&mut *tx)
        .await
        .expect("read as alice");
    assert_eq!(seen, Some(alice));
    tx.commit().await.expect("commit");
}
