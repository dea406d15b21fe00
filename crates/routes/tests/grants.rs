//! `POST /api/v1/admin/users/{id}/grants`: promotional tokens from the
//! `promotions` account, admin checked in SQL, Idempotency-Key, every grant
//! audited, bad input refused with no change, ledger invariants after each.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use axum::http::StatusCode;
use common::{
    TestApp, TestResponse, User, assert_ledger_clean, claims_for, journal_count, sign_claims,
    wallet,
};
use serde_json::{Value, json};
use stagepass_ledger::TokenAmount;
use stagepass_ledger::grants;
use uuid::Uuid;

fn path(user: Uuid) -> String {
    format!("/api/v1/admin/users/{user}/grants")
}

async fn grant(app: &TestApp, admin: &User, to: Uuid, key: &str, body: &Value) -> TestResponse {
    app.post(&path(to))
        .bearer(&admin.token)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
}

async fn promotions_balance(app: &TestApp) -> i64 {
    sqlx::query_scalar("select balance from ledger.accounts where kind = 'promotions'")
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("promotions account")
}

async fn grant_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from app.token_grants")
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_grant_is_audited_spendable_at_once_and_replayed_by_its_key() {
    let app = TestApp::unlimited().await;
    let admin = app.admin().await;
    let fan = app.signed_in_user().await;
    let body = json!({"amount": 500, "reason": "welcome to the beta"});

    let first = grant(&app, &admin, fan.id, "g-1", &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let granted = first.json();
    assert_eq!(granted["user_id"], fan.id.to_string());
    assert_eq!(granted["amount"], 500);
    assert_eq!(granted["balance"], 500);
    assert_eq!(wallet(&app, fan.id).await, 500);
    assert_eq!(promotions_balance(&app).await, -500);

    // The audit row: who, whom, how much, why, when, and the journal.
    let (user_id, amount, reason, granted_by, actor, journal, age): (
        Uuid,
        i64,
        String,
        Option<Uuid>,
        String,
        Uuid,
        f64,
    ) = sqlx::query_as(
        "select user_id, amount, reason, granted_by, actor, journal_id, \
                extract(epoch from now() - granted_at)::float8 from app.token_grants",
    )
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("one audit row");
    assert_eq!(
        (user_id, amount, reason.as_str(), granted_by),
        (fan.id, 500, "welcome to the beta", Some(admin.id))
    );
    assert_eq!(actor, format!("user:{}", admin.id));
    assert_eq!(journal.to_string(), granted["journal_id"].as_str().unwrap());
    assert!(age < 60.0, "granted just now");

    // A replay answers the same and grants nothing more.
    let again = grant(&app, &admin, fan.id, "g-1", &body).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(again.json(), granted);
    // The same key for something else is refused.
    let other_amount = grant(
        &app,
        &admin,
        fan.id,
        "g-1",
        &json!({"amount": 501, "reason": "welcome to the beta"}),
    )
    .await;
    other_amount.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    let someone_else = app.signed_in_user().await;
    let other_user = grant(&app, &admin, someone_else.id, "g-1", &body).await;
    other_user.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(wallet(&app, fan.id).await, 500);
    assert_eq!(wallet(&app, someone_else.id).await, 0);
    assert_eq!(journal_count(&app, "promotion").await, 1);
    assert_eq!(grant_rows(&app).await, 1);

    // The fan can spend the tokens at once.
    let creator = app.signed_in_user().await;
    app.set_role(creator.id, "creator").await;
    let tip = app
        .post("/api/v1/tips")
        .bearer(&fan.token)
        .header("idempotency-key", "spend-the-grant")
        .json(&json!({"recipient_id": creator.id, "amount": 120}))
        .send()
        .await;
    assert_eq!(tip.status, StatusCode::CREATED, "{}", tip.text());
    assert_eq!(wallet(&app, fan.id).await, 380);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_duplicates_grant_once() {
    let app = TestApp::unlimited().await;
    let admin = app.admin().await;
    let fan = app.signed_in_user().await;
    let body = json!({"amount": 250, "reason": "launch party"});
    let results = futures_util::future::join_all(
        (0..10).map(|_| grant(&app, &admin, fan.id, "same-key", &body)),
    )
    .await;
    let mut created = 0;
    for r in &results {
        match r.status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {
                r.assert_problem(StatusCode::CONFLICT, "idempotency_in_progress");
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!(created >= 1);
    assert_eq!(wallet(&app, fan.id).await, 250);
    assert_eq!(journal_count(&app, "promotion").await, 1);
    assert_eq!(grant_rows(&app).await, 1);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_admins_in_the_database_may_grant_whatever_the_token_claims() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    let creator = app.signed_in_user().await;
    app.set_role(creator.id, "creator").await;
    let body = json!({"amount": 100, "reason": "free tokens please"});

    let by_fan = grant(&app, &fan, fan.id, "self-serve", &body).await;
    by_fan.assert_problem(StatusCode::FORBIDDEN, "admin_required");
    let by_creator = grant(&app, &creator, fan.id, "creator-gift", &body).await;
    by_creator.assert_problem(StatusCode::FORBIDDEN, "admin_required");
    // A token claiming `app_role: admin` changes nothing: the role is read
    // from the database.
    let mut claims = claims_for(fan.id, Some(&fan.email), 3600);
    claims["app_role"] = json!("admin");
    claims["role"] = json!("authenticated");
    let forged = User {
        token: sign_claims(&claims),
        ..fan.clone()
    };
    let by_claim = grant(&app, &forged, creator.id, "claimed-admin", &body).await;
    by_claim.assert_problem(StatusCode::FORBIDDEN, "admin_required");

    assert_eq!(wallet(&app, fan.id).await, 0);
    assert_eq!(wallet(&app, creator.id).await, 0);
    assert_eq!(journal_count(&app, "promotion").await, 0);
    assert_eq!(grant_rows(&app).await, 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_changes_nothing() {
    let app = TestApp::unlimited().await;
    let admin = app.admin().await;
    let fan = app.signed_in_user().await;
    let cases: Vec<(&str, Value, &str)> = vec![
        ("zero", json!({"amount": 0, "reason": "r"}), "amount"),
        ("negative", json!({"amount": -5, "reason": "r"}), "amount"),
        (
            "too many",
            json!({"amount": 10_001, "reason": "r"}),
            "amount",
        ),
        ("no reason", json!({"amount": 10}), ""),
        (
            "empty reason",
            json!({"amount": 10, "reason": ""}),
            "reason",
        ),
        (
            "blank reason",
            json!({"amount": 10, "reason": "   "}),
            "reason",
        ),
        (
            "NUL",
            json!({"amount": 10, "reason": "nul\u{0}byte"}),
            "reason",
        ),
        (
            "bell",
            json!({"amount": 10, "reason": "ring\u{7}"}),
            "reason",
        ),
        (
            "newline",
            json!({"amount": 10, "reason": "two\nlines"}),
            "reason",
        ),
        (
            "long",
            json!({"amount": 10, "reason": "x".repeat(501)}),
            "reason",
        ),
        ("string amount", json!({"amount": "10", "reason": "r"}), ""),
        ("fraction", json!({"amount": 1.5, "reason": "r"}), ""),
        (
            "extra field",
            json!({"amount": 10, "reason": "r", "to": "me"}),
            "",
        ),
    ];
    for (what, body, field) in &cases {
        let key = format!("bad-{}", what.replace(' ', "-"));
        let r = grant(&app, &admin, fan.id, &key, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text());
        if !field.is_empty() {
            r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
            assert_eq!(r.first_error_field(), *field, "{what}");
        }
    }
    // A path that is not a UUID; a missing key.
    let bad_id = app
        .post("/api/v1/admin/users/not-a-uuid/grants")
        .bearer(&admin.token)
        .header("idempotency-key", "bad-id")
        .json(&json!({"amount": 10, "reason": "r"}))
        .send()
        .await;
    bad_id.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    let no_key = app
        .post(&path(fan.id))
        .bearer(&admin.token)
        .json(&json!({"amount": 10, "reason": "r"}))
        .send()
        .await;
    no_key.assert_problem(StatusCode::BAD_REQUEST, "bad_request");
    // Nobody by that id; an admin granting to themselves.
    let ghost = grant(
        &app,
        &admin,
        Uuid::new_v4(),
        "ghost",
        &json!({"amount": 10, "reason": "r"}),
    )
    .await;
    ghost.assert_problem(StatusCode::NOT_FOUND, "not_found");
    let own = grant(
        &app,
        &admin,
        admin.id,
        "own",
        &json!({"amount": 10, "reason": "r"}),
    )
    .await;
    own.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "self_grant");

    assert_eq!(wallet(&app, fan.id).await, 0);
    assert_eq!(wallet(&app, admin.id).await, 0);
    assert_eq!(promotions_balance(&app).await, 0);
    assert_eq!(journal_count(&app, "promotion").await, 0);
    assert_eq!(grant_rows(&app).await, 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_refuses_what_the_handler_would_and_the_operator_path_is_audited_too() {
    let app = TestApp::unlimited().await;
    let fan = app.signed_in_user().await;
    let mut conn = app.db.admin_pool.acquire().await.expect("conn");
    // The operator's grant: same function, audited as the operator.
    let amount = TokenAmount::parse(1_000, 1, 10_000).expect("amount");
    let g = grants::operator_grant(
        &mut conn,
        Uuid::new_v4().into(),
        fan.id.into(),
        amount,
        "demo",
        "tests",
    )
    .await
    .expect("operator grant");
    assert_eq!(g.balance, 1_000);
    let actor: String = sqlx::query_scalar("select actor from app.token_grants where id = $1")
        .bind(g.grant_id)
        .fetch_one(&mut *conn)
        .await
        .expect("audit row");
    assert_eq!(actor, "operator:tests");
    // The same grant id twice is refused by the ledger (credited once).
    let twice = grants::operator_grant(
        &mut conn,
        g.grant_id.into(),
        fan.id.into(),
        amount,
        "demo",
        "tests",
    )
    .await;
    assert!(
        matches!(twice, Err(stagepass_ledger::LedgerError::AlreadyApplied)),
        "{twice:?}"
    );
    // Bypassing the handler's checks, the SQL still refuses: a NUL-free
    // control character, an out-of-range amount (SQLSTATEs, mapped).
    let bad_reason = sqlx::query(
        "select * from app.apply_token_grant($1, $2, 10, 'a\tb', null, 'operator:tests')",
    )
    .bind(Uuid::new_v4())
    .bind(fan.id)
    .execute(&mut *conn)
    .await
    .expect_err("refused");
    assert!(matches!(
        stagepass_ledger::LedgerError::from(bad_reason),
        stagepass_ledger::LedgerError::InvalidReason
    ));
    let too_much = sqlx::query(
        "select * from app.apply_token_grant($1, $2, 10001, 'r', null, 'operator:tests')",
    )
    .bind(Uuid::new_v4())
    .bind(fan.id)
    .execute(&mut *conn)
    .await
    .expect_err("refused");
    assert!(matches!(
        stagepass_ledger::LedgerError::from(too_much),
        stagepass_ledger::LedgerError::AmountOutOfRange { max: 10_000, .. }
    ));
    // `authenticated` cannot call the operator's function at all.
    let direct: Result<_, sqlx::Error> = async {
        let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
        sqlx::query("set local role authenticated")
            .execute(&mut *tx)
            .await?;
        sqlx::query("select * from app.apply_token_grant($1, $2, 10, 'r', null, 'x')")
            .bind(Uuid::new_v4())
            .bind(fan.id)
            .execute(&mut *tx)
            .await
    }
    .await;
    assert_eq!(
        stagepass_platform::db::sqlstate(&direct.expect_err("no privilege")).as_deref(),
        Some("42501")
    );
    drop(conn);
    assert_eq!(wallet(&app, fan.id).await, 1_000);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_audit_includes_promotions_and_catches_an_unaudited_grant() {
    let app = TestApp::unlimited().await;
    let admin = app.admin().await;
    let fans = [app.signed_in_user().await, app.signed_in_user().await];
    for (i, fan) in fans.iter().enumerate() {
        let r = grant(
            &app,
            &admin,
            fan.id,
            &format!("k{i}"),
            &json!({"amount": 300 + i, "reason": "beta"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
    assert_eq!(promotions_balance(&app).await, -601);
    let mut conn = app.db.admin_pool.acquire().await.expect("conn");
    let clean = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.total_balance, 0);
    // Tokens minted as a promotion without the audit row: the audit says so.
    sqlx::query(
        "select ledger.post('promotion', 'smuggled', \
           array[ledger.singleton('promotions'), ledger.account_of('wallet', $1)], \
           array[-5::bigint, 5::bigint], null)",
    )
    .bind(fans[0].id)
    .execute(&mut *conn)
    .await
    .expect("post");
    let dirty = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert_eq!(dirty.unaudited_grants.len(), 1, "{dirty:?}");
    assert!(!dirty.is_clean());
    // And the promotions account can never be credited above zero.
    let above = sqlx::query(
        "select ledger.post('test', 'refill', \
           array[ledger.account_of('wallet', $1), ledger.singleton('promotions')], \
           array[-700::bigint, 700::bigint], null)",
    )
    .bind(fans[1].id)
    .execute(&mut *conn)
    .await;
    assert!(above.is_err(), "a positive promotions balance is refused");
}
