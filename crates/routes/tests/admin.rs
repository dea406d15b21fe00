//! `PUT /api/v1/admin/users/{id}/role`: only a database admin may change a
//! role, every change is audited in the append-only `app.role_changes`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::{TestApp, claims_for, sign_claims};
use http::StatusCode;
use serde_json::json;
use uuid::Uuid;

/// `old_role, new_role, changed_by, actor, reason` of an audit row.
type AuditRow = (String, String, Option<Uuid>, String, Option<String>);

fn role_path(id: impl std::fmt::Display) -> String {
    format!("/api/v1/admin/users/{id}/role")
}

#[tokio::test(flavor = "multi_thread")]
async fn non_admin_is_403_and_nothing_changes() {
    let app = TestApp::new().await;
    let fan = app.signed_in_user().await;
    let target = app.signed_in_user().await;
    let creator = app.signed_in_user().await;
    app.set_role(creator.id, "creator").await;
    let audit_before = app.total_role_changes().await;

    for (caller, target_id, role) in [
        (&fan, target.id, "creator"),
        (&fan, fan.id, "admin"),
        (&creator, creator.id, "admin"),
        (&creator, target.id, "admin"),
    ] {
        let r = app
            .put(&role_path(target_id))
            .bearer(&caller.token)
            .json(&json!({ "role": role }))
            .send()
            .await;
        r.assert_problem(StatusCode::FORBIDDEN, "admin_required");
    }
    assert_eq!(app.role_of(fan.id).await.as_deref(), Some("fan"));
    assert_eq!(app.role_of(target.id).await.as_deref(), Some("fan"));
    assert_eq!(app.role_of(creator.id).await.as_deref(), Some("creator"));
    assert_eq!(app.total_role_changes().await, audit_before, "no audit row");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_claim_in_token_does_not_make_an_admin() {
    let app = TestApp::new().await;
    let fan = app.signed_in_user().await;
    let target = app.signed_in_user().await;
    let mut claims = claims_for(fan.id, Some(&fan.email), 3600);
    claims["app_role"] = json!("admin");
    claims["user_metadata"]["role"] = json!("admin");
    claims["app_metadata"]["role"] = json!("admin");
    let r = app
        .put(&role_path(target.id))
        .bearer(&sign_claims(&claims))
        .json(&json!({ "role": "admin" }))
        .send()
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "admin_required");
    assert_eq!(app.role_of(target.id).await.as_deref(), Some("fan"));
    assert_eq!(app.role_change_count(target.id).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_is_401() {
    let app = TestApp::new().await;
    let target = app.signed_in_user().await;
    let r = app
        .put(&role_path(target.id))
        .json(&json!({ "role": "admin" }))
        .send()
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "missing_token");
    assert_eq!(app.role_of(target.id).await.as_deref(), Some("fan"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_promotes_a_fan_to_creator_with_one_audit_row() {
    let app = TestApp::new().await;
    let admin = app.admin().await;
    let fan = app.signed_in_user().await;

    let r = app
        .put(&role_path(fan.id))
        .bearer(&admin.token)
        .json(&json!({ "role": "creator", "reason": "verified creator" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({ "user_id": fan.id, "role": "creator", "previous_role": "fan" })
    );
    assert_eq!(app.role_of(fan.id).await.as_deref(), Some("creator"));

    let rows: Vec<AuditRow> = sqlx::query_as(
        "select old_role, new_role, changed_by, actor, reason from app.role_changes \
         where user_id = $1",
    )
    .bind(fan.id)
    .fetch_all(&app.db.admin_pool)
    .await
    .expect("audit rows");
    assert_eq!(
        rows,
        vec![(
            "fan".to_owned(),
            "creator".to_owned(),
            Some(admin.id),
            format!("user:{}", admin.id),
            Some("verified creator".to_owned()),
        )]
    );

    // The promoted user sees it on the session endpoint.
    let me = app.get("/api/v1/me").bearer(&fan.token).send().await.json();
    assert_eq!(me["role"], "creator");

    // Same role again: nothing changes, nothing is recorded.
    let r = app
        .put(&role_path(fan.id))
        .bearer(&admin.token)
        .json(&json!({ "role": "creator" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["previous_role"], "creator");
    assert_eq!(app.role_change_count(fan.id).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_target_is_404() {
    let app = TestApp::new().await;
    let admin = app.admin().await;
    let ghost = Uuid::new_v4();
    let r = app
        .put(&role_path(ghost))
        .bearer(&admin.token)
        .json(&json!({ "role": "creator" }))
        .send()
        .await;
    r.assert_problem(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.role_of(ghost).await, None, "no user may be created");
    assert_eq!(app.role_change_count(ghost).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_uuid_in_path_is_400() {
    let app = TestApp::new().await;
    let admin = app.admin().await;
    for id in ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"] {
        let r = app
            .put(&role_path(id))
            .bearer(&admin.token)
            .json(&json!({ "role": "creator" }))
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), "id");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn demoting_the_only_admin_is_409() {
    let app = TestApp::new().await;
    let admin = app.admin().await;
    let audit_before = app.total_role_changes().await;
    for role in ["fan", "creator"] {
        let r = app
            .put(&role_path(admin.id))
            .bearer(&admin.token)
            .json(&json!({ "role": role }))
            .send()
            .await;
        r.assert_problem(StatusCode::CONFLICT, "last_admin");
    }
    assert_eq!(app.role_of(admin.id).await.as_deref(), Some("admin"));
    assert_eq!(app.total_role_changes().await, audit_before);

    // With a second admin, self-demotion works.
    let other = app.admin().await;
    let r = app
        .put(&role_path(admin.id))
        .bearer(&admin.token)
        .json(&json!({ "role": "fan" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(app.role_of(admin.id).await.as_deref(), Some("fan"));
    // And now the other one is the last admin.
    let r = app
        .put(&role_path(other.id))
        .bearer(&other.token)
        .json(&json!({ "role": "fan" }))
        .send()
        .await;
    r.assert_problem(StatusCode::CONFLICT, "last_admin");
    // The demoted admin has lost their power at once (database, not token).
    let r = app
        .put(&role_path(admin.id))
        .bearer(&admin.token)
        .json(&json!({ "role": "admin" }))
        .send()
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "admin_required");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_bodies_are_400_naming_the_field() {
    let app = TestApp::new().await;
    let admin = app.admin().await;
    let fan = app.signed_in_user().await;
    for (body, field) in [
        (json!({ "role": "superuser" }), "role"),
        (json!({ "role": "ADMIN" }), "role"),
        (json!({ "role": 1 }), "role"),
        (json!({}), "role"),
        (
            json!({ "role": "creator", "changed_by": Uuid::new_v4() }),
            "changed_by",
        ),
        (
            json!({ "role": "creator", "reason": "x".repeat(501) }),
            "reason",
        ),
    ] {
        let r = app
            .put(&role_path(fan.id))
            .bearer(&admin.token)
            .json(&body)
            .send()
            .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), field, "body {body}");
    }
    assert_eq!(app.role_of(fan.id).await.as_deref(), Some("fan"));
    assert_eq!(app.role_change_count(fan.id).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn role_changes_is_append_only_even_for_the_superuser() {
    let app = TestApp::new().await;
    let admin = app.admin().await;
    let fan = app.signed_in_user().await;
    let r = app
        .put(&role_path(fan.id))
        .bearer(&admin.token)
        .json(&json!({ "role": "creator" }))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let before = app.total_role_changes().await;
    assert!(before >= 2, "operator and admin changes recorded");

    let pool = &app.db.admin_pool;
    for sql in [
        "update app.role_changes set new_role = 'admin'",
        "update app.role_changes set changed_by = null where user_id is not null",
        "delete from app.role_changes",
        "truncate app.role_changes",
    ] {
        let err = sqlx::query(sql)
            .execute(pool)
            .await
            .expect_err(&format!("`{sql}` must fail"));
        let msg = err.to_string();
        assert!(
            msg.contains("append-only"),
            "`{sql}` failed otherwise: {msg}"
        );
    }
    assert_eq!(app.total_role_changes().await, before);
    let (old, new): (String, String) = sqlx::query_as(
        "select old_role, new_role from app.role_changes where user_id = $1 order by id desc limit 1",
    )
    .bind(fan.id)
    .fetch_one(pool)
    .await
    .expect("row");
    assert_eq!((old.as_str(), new.as_str()), ("fan", "creator"));
}
