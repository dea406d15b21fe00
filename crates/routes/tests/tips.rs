//! Tips: the money path's first route. Replay, concurrency and the ledger
//! invariants after every test (SPEC §2).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::{assert_ledger_clean, fund, journal_count, wallet};

use axum::http::StatusCode;
use common::{TestApp, User};
use serde_json::{Value, json};
use uuid::Uuid;

async fn creator(app: &TestApp) -> User {
    let c = app.signed_in_user().await;
    app.set_role(c.id, "creator").await;
    c
}

async fn fan_with(app: &TestApp, tokens: i64) -> User {
    let f = app.signed_in_user().await;
    fund(app, f.id, tokens).await;
    f
}

async fn tip(app: &TestApp, from: &User, key: &str, body: &Value) -> common::TestResponse {
    app.post("/api/v1/tips")
        .bearer(&from.token)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tip_moves_tokens_once_and_a_replay_answers_the_same() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 100).await;
    let body = json!({"recipient_id": c.id, "amount": 30, "message": "great show"});

    let first = tip(&app, &f, "tip-1", &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert_eq!(first.json()["balance"], 70);
    assert!(first.header("idempotency-replayed").is_none());

    let again = tip(&app, &f, "tip-1", &body).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(again.json(), first.json(), "a replay returns the same body");

    assert_eq!(wallet(&app, f.id).await, 70);
    assert_eq!(wallet(&app, c.id).await, 30);
    assert_eq!(journal_count(&app, "tip").await, 1);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_with_another_body_is_422_and_moves_nothing() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 100).await;
    let ok = tip(&app, &f, "k", &json!({"recipient_id": c.id, "amount": 10})).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    let reused = tip(&app, &f, "k", &json!({"recipient_id": c.id, "amount": 11})).await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(wallet(&app, f.id).await, 90);
    // Keys are scoped per user: another fan may use the same key.
    let other = fan_with(&app, 5).await;
    let theirs = tip(
        &app,
        &other,
        "k",
        &json!({"recipient_id": c.id, "amount": 5}),
    )
    .await;
    assert_eq!(theirs.status, StatusCode::CREATED);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_4xx_and_change_nothing() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 100).await;
    let body = json!({"recipient_id": c.id, "amount": 10});

    let no_key = app
        .post("/api/v1/tips")
        .bearer(&f.token)
        .json(&body)
        .send()
        .await;
    no_key.assert_problem(StatusCode::BAD_REQUEST, "bad_request");
    let bad_key = tip(&app, &f, "has space", &body).await;
    bad_key.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    for amount in [0, -5, 10_001] {
        let r = tip(
            &app,
            &f,
            &format!("amt{amount}"),
            &json!({"recipient_id": c.id, "amount": amount}),
        )
        .await;
        r.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
        assert_eq!(r.first_error_field(), "amount");
    }
    let extra = tip(
        &app,
        &f,
        "x1",
        &json!({"recipient_id": c.id, "amount": 1, "price": 0}),
    )
    .await;
    extra.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
    assert_eq!(extra.first_error_field(), "price");

    let to_fan = fan_with(&app, 0).await;
    let r = tip(
        &app,
        &f,
        "x2",
        &json!({"recipient_id": to_fan.id, "amount": 1}),
    )
    .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "recipient_not_creator");
    let nobody = tip(
        &app,
        &f,
        "x3",
        &json!({"recipient_id": Uuid::new_v4(), "amount": 1}),
    )
    .await;
    nobody.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "recipient_not_creator");
    let selfie = tip(&app, &c, "x4", &json!({"recipient_id": c.id, "amount": 1})).await;
    selfie.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "self_tip");
    let anonymous = app
        .post("/api/v1/tips")
        .header("idempotency-key", "a")
        .json(&body)
        .send()
        .await;
    anonymous.assert_problem(StatusCode::UNAUTHORIZED, "missing_token");

    assert_eq!(wallet(&app, f.id).await, 100);
    assert_eq!(journal_count(&app, "tip").await, 0);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn insufficient_funds_is_422_and_its_replay_answers_the_same() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 5).await;
    let body = json!({"recipient_id": c.id, "amount": 6});
    let first = tip(&app, &f, "poor", &body).await;
    let problem = first.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds");
    let again = tip(&app, &f, "poor", &body).await;
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(again.json(), problem);
    assert_eq!(wallet(&app, f.id).await, 5);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tips_racing_for_the_last_tokens_one_wins() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 50).await;
    let body = json!({"recipient_id": c.id, "amount": 40});
    let (a, b) = tokio::join!(
        tip(&app, &f, "race-a", &body),
        tip(&app, &f, "race-b", &body)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::UNPROCESSABLE_ENTITY],
        "{} / {}",
        a.text(),
        b.text()
    );
    assert_eq!(wallet(&app, f.id).await, 10);
    assert_eq!(wallet(&app, c.id).await, 40);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_fans_tipping_one_creator_at_once_are_all_credited() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let mut fans = Vec::new();
    for _ in 0..50 {
        fans.push(fan_with(&app, 10).await);
    }
    let body = json!({"recipient_id": c.id, "amount": 7});
    let results =
        futures_util::future::join_all(fans.iter().map(|f| tip(&app, f, "hot", &body))).await;
    for r in &results {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
    assert_eq!(wallet(&app, c.id).await, 350);
    assert_eq!(journal_count(&app, "tip").await, 50);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_replays_of_one_key_have_one_effect() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 100).await;
    let body = json!({"recipient_id": c.id, "amount": 9});
    let results =
        futures_util::future::join_all((0..10).map(|_| tip(&app, &f, "same", &body))).await;
    for r in &results {
        // The first wins; a duplicate still in flight is 409, a later one a replay.
        assert!(
            r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT,
            "{} {}",
            r.status,
            r.text()
        );
        if r.status == StatusCode::CONFLICT {
            r.assert_problem(StatusCode::CONFLICT, "idempotency_in_progress");
        }
    }
    assert!(results.iter().any(|r| r.status == StatusCode::CREATED));
    assert_eq!(journal_count(&app, "tip").await, 1);
    assert_eq!(wallet(&app, f.id).await, 91);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tips_between_creators_never_deadlock_a_request_away() {
    let app = TestApp::unlimited().await;
    let a = creator(&app).await;
    let b = creator(&app).await;
    fund(&app, a.id, 1_000).await;
    fund(&app, b.id, 1_000).await;
    let futures = (0..20).map(|i| {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let body = json!({"recipient_id": to.id, "amount": 3});
        let key = format!("mutual-{i}");
        let app = &app;
        async move { tip(app, from, &key, &body).await }
    });
    let results = futures_util::future::join_all(futures).await;
    for r in &results {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
    assert_eq!(wallet(&app, a.id).await + wallet(&app, b.id).await, 2_000);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daily_spending_limit_is_enforced_in_the_spend_transaction() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 1_000).await;
    sqlx::query("update app.user_private set daily_spend_limit_tokens = 100 where user_id = $1")
        .bind(f.id)
        .execute(&app.db.admin_pool)
        .await
        .expect("override");
    // Four tips of 30 race: the limit lets exactly three through.
    let body = json!({"recipient_id": c.id, "amount": 30});
    let results = futures_util::future::join_all((0..4).map(|i| {
        let key = format!("day-{i}");
        let (app, f, body) = (&app, &f, &body);
        async move { tip(app, f, &key, body).await }
    }))
    .await;
    let ok = results
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(ok, 3);
    let refused = results
        .iter()
        .find(|r| r.status != StatusCode::CREATED)
        .expect("one refused");
    refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "daily_limit_exceeded");
    assert_eq!(wallet(&app, f.id).await, 910);
    let balance = app
        .get("/api/v1/tokens/balance")
        .bearer(&f.token)
        .send()
        .await;
    assert_eq!(balance.json()["spent_today"], 90);
    assert_eq!(balance.json()["daily_limit"], 100);

    // The window is 24 h: a minute short of it the limit still holds; once
    // the first tips are 24 h old (app.now() moves; no row is rewritten)
    // the fan may spend again.
    app.db
        .advance_clock(chrono::Duration::hours(24) - chrono::Duration::minutes(1))
        .await;
    tip(&app, &f, "day-late", &body)
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "daily_limit_exceeded");
    app.db.advance_clock(chrono::Duration::minutes(2)).await;
    let r = tip(&app, &f, "day-next", &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let balance = app
        .get("/api/v1/tokens/balance")
        .bearer(&f.token)
        .send()
        .await;
    assert_eq!(balance.json()["spent_today"], 30);
    assert_eq!(wallet(&app, f.id).await, 880);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wallet_in_debt_cannot_spend() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 100).await;
    // A claw-back larger than the wallet: 100 from the wallet, 20 as debt.
    sqlx::query(
        "select ledger.post('refund', $1, \
           array[ledger.account_of('wallet', $2), ledger.account_of('debt', $2), ledger.singleton('stripe_clearing')], \
           array[-100, -20, 120]::bigint[], null)",
    )
    .bind(format!("test-refund-{}", Uuid::new_v4()))
    .bind(f.id)
    .execute(&app.db.admin_pool)
    .await
    .expect("claw back");
    fund(&app, f.id, 50).await; // a later credit the test puts straight in the wallet
    let r = tip(
        &app,
        &f,
        "debt",
        &json!({"recipient_id": c.id, "amount": 1}),
    )
    .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "account_in_debt");
    let balance = app
        .get("/api/v1/tokens/balance")
        .bearer(&f.token)
        .send()
        .await;
    assert_eq!(balance.json()["debt"], 20);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_refuses_an_overdraft_even_from_the_superuser() {
    let app = TestApp::unlimited().await;
    let f = fan_with(&app, 10).await;
    let err = sqlx::query(
        "select ledger.post('tip', 'overdraft', \
           array[ledger.account_of('wallet', $1), ledger.singleton('platform_revenue')], \
           array[-11, 11]::bigint[], null)",
    )
    .bind(f.id)
    .execute(&app.db.admin_pool)
    .await
    .expect_err("overdraft must fail");
    assert!(err.to_string().contains("accounts_balance_sign"), "{err}");
    let unbalanced = sqlx::query(
        "select ledger.post('tip', 'unbalanced', \
           array[ledger.account_of('wallet', $1), ledger.singleton('platform_revenue')], \
           array[-5, 4]::bigint[], null)",
    )
    .bind(f.id)
    .execute(&app.db.admin_pool)
    .await;
    assert!(unbalanced.is_err(), "an unbalanced journal must fail");
    let edit = sqlx::query("update ledger.entries set amount = amount * 2")
        .execute(&app.db.admin_pool)
        .await;
    assert!(edit.is_err(), "entries are append-only");
    assert_eq!(wallet(&app, f.id).await, 10);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn users_cannot_touch_the_ledger_directly() {
    let app = TestApp::unlimited().await;
    let f = fan_with(&app, 10).await;
    let mut tx = user_tx(&app, &f).await;
    for sql in [
        "select count(*) from ledger.entries",
        "select ledger.post('purchase', 'x', array[]::uuid[], array[]::bigint[], null)",
        "update ledger.accounts set balance = 1000000",
    ] {
        let mut sp = sqlx::Acquire::begin(&mut *tx).await.expect("savepoint");
        let err = sqlx::query(sql).execute(&mut *sp).await.expect_err(sql);
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
        sp.rollback().await.expect("rollback");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_lists_own_entries_with_a_cursor() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 100).await;
    for i in 0..3 {
        let r = tip(
            &app,
            &f,
            &format!("l{i}"),
            &json!({"recipient_id": c.id, "amount": 1}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let page1 = app
        .get("/api/v1/tokens/ledger?limit=2")
        .bearer(&f.token)
        .send()
        .await;
    assert_eq!(page1.status, StatusCode::OK);
    let p1 = page1.json();
    assert_eq!(p1["entries"].as_array().map(Vec::len), Some(2));
    assert_eq!(p1["entries"][0]["kind"], "tip");
    assert_eq!(p1["entries"][0]["amount"], -1);
    let cursor = p1["next_cursor"].as_i64().expect("cursor");
    let page2 = app
        .get(&format!("/api/v1/tokens/ledger?limit=2&cursor={cursor}"))
        .bearer(&f.token)
        .send()
        .await;
    let p2 = page2.json();
    // One more tip and the funding purchase.
    assert_eq!(p2["entries"].as_array().map(Vec::len), Some(2));
    assert!(p2["entries"][0]["id"].as_i64() < Some(cursor));
    // The creator sees only their own credits, not the fan's debits.
    let theirs = app
        .get("/api/v1/tokens/ledger")
        .bearer(&c.token)
        .send()
        .await
        .json();
    assert!(
        theirs["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .all(|e| e["amount"].as_i64() > Some(0))
    );
    let too_big = app
        .get("/api/v1/tokens/ledger?limit=101")
        .bearer(&f.token)
        .send()
        .await;
    too_big.assert_problem(StatusCode::BAD_REQUEST, "validation_failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn packages_are_the_spec_table() {
    let app = TestApp::unlimited().await;
    let r = app.get("/api/v1/tokens/packages").send().await;
    assert_eq!(r.status, StatusCode::OK);
    let mega = r.json()["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["id"] == "mega")
        .cloned()
        .expect("mega");
    assert_eq!(mega["credited_tokens"], 8_868);
    assert_eq!(mega["price_cents"], 54_900);
}

/// A transaction as `user`, as a function's `db::begin_user` opens one.
async fn user_tx(app: &TestApp, user: &User) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = app.db.app_pool.begin().await.expect("begin");
    sqlx::query(
        "select set_config('request.jwt.claims', $1, true), set_config('role', 'authenticated', true)",
    )
    .bind(json!({"sub": user.id, "role": "authenticated"}).to_string())
    .execute(&mut *tx)
    .await
    .expect("claims");
    tx
}

/// (row, pending) of a user's wallet: the folded balance and the deferred
/// credits not folded yet (ADR 0021).
async fn wallet_parts(app: &TestApp, user: Uuid) -> (i64, i64) {
    sqlx::query_as(
        "select folded_balance, balance - folded_balance from ledger.balances \
         where kind = 'wallet' and owner_id = $1 and reference is null",
    )
    .bind(user)
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("wallet parts")
}

#[tokio::test(flavor = "multi_thread")]
async fn tips_into_one_creator_do_not_wait_for_each_other() {
    // ADR 0021: a credit neither locks nor updates the creator's row. One
    // fan's tip is left uncommitted, holding everything it took; another
    // fan's tip to the same creator still completes, and the creator can
    // spend meanwhile.
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let other = creator(&app).await;
    let slow = fan_with(&app, 100).await;
    let quick = fan_with(&app, 100).await;
    fund(&app, c.id, 50).await;

    let mut open = user_tx(&app, &slow).await;
    sqlx::query("select * from app.tip($1, $2, 10, null)")
        .bind(Uuid::now_v7())
        .bind(c.id)
        .execute(&mut *open)
        .await
        .expect("the open tip");

    let within = std::time::Duration::from_secs(3);
    let r = tokio::time::timeout(
        within,
        tip(
            &app,
            &quick,
            "quick",
            &json!({"recipient_id": c.id, "amount": 7}),
        ),
    )
    .await
    .expect("a tip into the creator waited for another fan's open tip");
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let spend = tokio::time::timeout(
        within,
        tip(
            &app,
            &c,
            "spend",
            &json!({"recipient_id": other.id, "amount": 57}),
        ),
    )
    .await
    .expect("the creator's own spend waited for a fan's open tip");
    assert_eq!(spend.status, StatusCode::CREATED, "{}", spend.text());
    assert_eq!(spend.json()["balance"], 0, "50 + 7 received, 57 spent");

    open.commit().await.expect("commit the open tip");
    assert_eq!(wallet(&app, c.id).await, 10);
    assert_eq!(wallet(&app, slow.id).await, 90);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_credit_not_folded_yet_is_in_the_balance_and_can_be_spent() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let other = creator(&app).await;
    let f = fan_with(&app, 100).await;
    // The tip as the route's effect runs it, without the route's fold
    // after the response: the credit stays pending.
    let mut tx = user_tx(&app, &f).await;
    sqlx::query("select * from app.tip($1, $2, 40, null)")
        .bind(Uuid::now_v7())
        .bind(c.id)
        .execute(&mut *tx)
        .await
        .expect("tip");
    tx.commit().await.expect("commit");
    assert_eq!(wallet_parts(&app, c.id).await, (0, 40));

    // Read right after: the balance route counts it.
    let balance = app
        .get("/api/v1/tokens/balance")
        .bearer(&c.token)
        .send()
        .await;
    assert_eq!(balance.json()["balance"], 40);
    assert_ledger_clean(&app).await;

    // Spending more than the row holds folds first, under the spend's lock.
    let spend = tip(
        &app,
        &c,
        "spend-pending",
        &json!({"recipient_id": other.id, "amount": 40}),
    )
    .await;
    assert_eq!(spend.status, StatusCode::CREATED, "{}", spend.text());
    assert_eq!(spend.json()["balance"], 0);
    assert_eq!(wallet_parts(&app, c.id).await, (0, 0));
    // One token more than there is: refused, the credit is not minted twice.
    let over = tip(
        &app,
        &c,
        "over",
        &json!({"recipient_id": other.id, "amount": 1}),
    )
    .await;
    over.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds");
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fold_after_the_response_and_the_cron_fold_leave_nothing_pending() {
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 100).await;
    let r = tip(
        &app,
        &f,
        "folded",
        &json!({"recipient_id": c.id, "amount": 9}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    // The route folds its recipient right after the response.
    let mut parts = wallet_parts(&app, c.id).await;
    for _ in 0..200 {
        if parts == (9, 0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        parts = wallet_parts(&app, c.id).await;
    }
    assert_eq!(parts, (9, 0), "folded after the response");

    // A credit whose fold was lost (no route around it) waits for the cron.
    let mut tx = user_tx(&app, &f).await;
    sqlx::query("select * from app.tip($1, $2, 5, null)")
        .bind(Uuid::now_v7())
        .bind(c.id)
        .execute(&mut *tx)
        .await
        .expect("tip");
    tx.commit().await.expect("commit");
    assert_eq!(wallet_parts(&app, c.id).await, (9, 5));
    let cron = app
        .get("/api/cron/deliver-outbox")
        .bearer(common::CRON_SECRET)
        .send()
        .await;
    assert_eq!(cron.status, StatusCode::OK, "{}", cron.text());
    assert_eq!(cron.json()["folded_accounts"], 1);
    assert_eq!(wallet_parts(&app, c.id).await, (14, 0));
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_one_statement_tip_answers_in_the_shape_of_the_multi_statement_one() {
    // `app.money_request` builds the body in SQL; the Rust type is the
    // contract (OpenAPI, clients): the two must have the same fields.
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 10).await;
    let fast = tip(
        &app,
        &f,
        "shape",
        &json!({"recipient_id": c.id, "amount": 4}),
    )
    .await;
    assert_eq!(fast.status, StatusCode::CREATED, "{}", fast.text());
    let rust = serde_json::to_value(stagepass_ledger::Tip {
        tip_id: Uuid::nil(),
        journal_id: Uuid::nil(),
        balance: 0,
    })
    .expect("tip");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&fast.json()), keys(&rust));
    let parsed: stagepass_ledger::Tip = serde_json::from_value(fast.json()).expect("a Tip");
    assert_eq!(parsed.balance, 6);
    assert_eq!(journal_count(&app, "tip").await, 1);
    let journal: String = sqlx::query_scalar(
        "select id::text from ledger.journals where kind = 'tip' and reference = $1",
    )
    .bind(parsed.tip_id.to_string())
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("the tip's journal");
    assert_eq!(journal, parsed.journal_id.to_string());

    // A refusal is recorded with the key (a second statement) and replayed
    // the same.
    let body = json!({"recipient_id": c.id, "amount": 7});
    let refused = tip(&app, &f, "too-much", &body).await;
    refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds");
    fund(&app, f.id, 100).await;
    let again = tip(&app, &f, "too-much", &body).await;
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(again.json(), refused.json());
    assert_eq!(journal_count(&app, "tip").await, 1);
    assert_ledger_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_recorded_after_another_answer_under_its_key_gives_way_to_it() {
    // Between a refused `app.money_request` and the record of its refusal
    // the key's lock is free: a request with the same key may record first
    // (and may have succeeded). The refusal's record then keeps that one.
    let app = TestApp::unlimited().await;
    let c = creator(&app).await;
    let f = fan_with(&app, 10).await;
    let body = json!({"recipient_id": c.id, "amount": 4});
    let first = tip(&app, &f, "raced", &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let claims = json!({"sub": f.id, "role": "authenticated"}).to_string();
    let refused = |fingerprint: &'static str| {
        sqlx::query_as::<_, (bool, String, i16, Value)>(
            "select recorded, fingerprint, status_code, response from app.money_request_refused(\
               $1, 'POST /api/v1/tips', $2, $3, 24, 422::smallint, '{\"code\": \"insufficient_funds\"}')",
        )
        .bind(&claims)
        .bind("raced")
        .bind(fingerprint)
    };
    let stored_fingerprint: String =
        sqlx::query_scalar("select fingerprint from app.idempotency_keys where key = 'raced'")
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("the success's record");
    let (recorded, fingerprint, status, response) = refused("other")
        .fetch_one(&app.db.app_pool)
        .await
        .expect("record the refusal");
    assert!(!recorded, "the success recorded first stands");
    assert_eq!((fingerprint, status), (stored_fingerprint, 201));
    assert_eq!(response, first.json());
    // A fresh key records the refusal.
    let (recorded, _, status, _) = sqlx::query_as::<_, (bool, String, i16, Value)>(
        "select recorded, fingerprint, status_code, response from app.money_request_refused(\
           $1, 'POST /api/v1/tips', 'fresh', 'f', 24, 422::smallint, '{}')",
    )
    .bind(&claims)
    .fetch_one(&app.db.app_pool)
    .await
    .expect("record");
    assert!(recorded);
    assert_eq!(status, 422);
    // The route answers a replay of the raced key with the success.
    let again = tip(&app, &f, "raced", &body).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.json(), first.json());
    assert_ledger_clean(&app).await;
}
