//! The statements the soak found growing with the data (issue 14,
//! docs/RELIABILITY.md "Soak") read a bounded number of rows: each test
//! seeds a table far beyond what the statement returns, then measures the
//! buffers the statement touches with `EXPLAIN (ANALYZE, BUFFERS)` — a count
//! of pages, not a time, so it does not depend on the machine's load. The
//! bounds are a small multiple of what the fixed statements touch and well
//! below what the old ones did (given per test). Each test also checks the
//! results, so a cheap wrong answer fails too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

use serde_json::Value;
use sqlx::{Connection as _, PgConnection};
use stagepass_platform::testing::TestDb;
use uuid::Uuid;

/// `(shared buffers hit + read, rows)` of one execution of `sql`, after a
/// first execution (in a rolled-back transaction) so that planning the
/// statements inside a function is not counted.
async fn cost(conn: &mut PgConnection, sql: &str) -> (u64, u64) {
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await
        .expect("warm-up run");
    tx.rollback().await.expect("rollback");
    let mut tx = conn.begin().await.expect("begin");
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "explain (analyze, buffers, format json) {sql}"
    )))
    .fetch_one(&mut *tx)
    .await
    .expect("explain");
    tx.rollback().await.expect("rollback");
    let top = &plan[0]["Plan"];
    let n = |k: &str| top[k].as_u64().unwrap_or(0);
    (
        n("Shared Hit Blocks") + n("Shared Read Blocks"),
        n("Actual Rows"),
    )
}

async fn user(conn: &mut PgConnection) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("insert into app.users (id) values ($1)")
        .bind(id)
        .execute(&mut *conn)
        .await
        .expect("user");
    id
}

async fn analyze(conn: &mut PgConnection) {
    sqlx::query("analyze").execute(conn).await.expect("analyze");
}

/// The outbox claim reads the due rows, not the delivered ones nor the
/// inline jobs waiting for their `not_before` (before: a walk of the
/// primary key through all of them, 7,460 buffers after a 5-minute soak).
#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_claim_reads_due_rows_only() {
    let db = TestDb::new().await;
    let mut conn = db.admin_pool.acquire().await.expect("connection");
    // 20,000 delivered messages and 5,000 reminders due tomorrow.
    sqlx::query(
        "insert into app.outbox (kind, destination, name, payload, dedup_key, delivered_at) \
         select 'realtime', 'user:x', 'balance.updated', '{}', 'old-' || g, now() \
           from generate_series(1, 20000) g",
    )
    .execute(&mut *conn)
    .await
    .expect("delivered rows");
    sqlx::query(
        "insert into app.outbox (kind, destination, payload, dedup_key, not_before) \
         select 'job', 'class-reminder', '{}', 'later-' || g, now() + interval '1 day' \
           from generate_series(1, 5000) g",
    )
    .execute(&mut *conn)
    .await
    .expect("deferred jobs");
    // Due: a message, a job without a time, a reminder whose time has come.
    sqlx::query(
        "insert into app.outbox (kind, destination, name, payload, dedup_key, not_before) values \
           ('realtime', 'user:y', 'tip.received', '{}', 'due-1', null), \
           ('job', 'settle', null, '{}', 'due-2', null), \
           ('job', 'class-reminder', null, '{}', 'due-3', now() - interval '1 second')",
    )
    .execute(&mut *conn)
    .await
    .expect("due rows");
    analyze(&mut conn).await;

    let (buffers, rows) = cost(&mut conn, "select * from app.claim_outbox(50, true)").await;
    assert_eq!(rows, 3, "the three due rows are claimed inline");
    assert!(
        buffers < 150,
        "an inline claim touched {buffers} buffers for 3 due rows among 25,003"
    );

    // Which rows, in order; the deferred ones stay.
    let mut tx = conn.begin().await.expect("begin");
    let claimed: Vec<String> =
        sqlx::query_scalar("select dedup_key from app.claim_outbox(50, true) order by id")
            .fetch_all(&mut *tx)
            .await
            .expect("claim");
    assert_eq!(claimed, ["due-1", "due-2", "due-3"]);
    // Claimed now: a second claim finds nothing.
    let again: i64 = sqlx::query_scalar("select count(*) from app.claim_outbox(50, true)")
        .fetch_one(&mut *tx)
        .await
        .expect("claim again");
    assert_eq!(again, 0);
    tx.rollback().await.expect("rollback");

    // With QStash every undelivered row is handed over at once, oldest
    // first, without walking the delivered ones.
    // (Small batches: each claimed row is rewritten in every index.)
    let (buffers, rows) = cost(&mut conn, "select * from app.claim_outbox(5, false)").await;
    assert_eq!(rows, 5);
    assert!(
        buffers < 400,
        "a QStash claim of 5 touched {buffers} buffers behind 20,000 delivered rows"
    );
    let mut tx = conn.begin().await.expect("begin");
    let first: String = sqlx::query_scalar("select dedup_key from app.claim_outbox(1, false)")
        .fetch_one(&mut *tx)
        .await
        .expect("claim");
    assert_eq!(first, "later-1");
    tx.rollback().await.expect("rollback");
}

/// A claim rewrites a message on its own page (a HOT update, no new entry
/// in any of the outbox's indexes): migration 29 leaves room on every page
/// for it. At the default fillfactor none of the 500 claims here found
/// room.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_rewrites_messages_in_place() {
    let db = TestDb::new().await;
    let mut conn = db.admin_pool.acquire().await.expect("connection");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(
        "insert into app.outbox (kind, destination, name, payload, dedup_key) \
         select 'realtime', 'user:x', 'tip.received', '{}', 'in-place-' || g \
           from generate_series(1, 1000) g",
    )
    .execute(&mut *tx)
    .await
    .expect("messages");
    let claimed: i64 = sqlx::query_scalar("select count(*) from app.claim_outbox(500, true)")
        .fetch_one(&mut *tx)
        .await
        .expect("claim");
    assert_eq!(claimed, 500);
    // This transaction's own counts.
    let (updated, hot): (i64, i64) = sqlx::query_as(
        "select n_tup_upd, n_tup_hot_upd from pg_stat_xact_user_tables \
          where relid = 'app.outbox'::regclass",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("counts");
    assert_eq!(updated, 500);
    assert!(
        hot * 4 >= updated,
        "only {hot} of {updated} claims were HOT updates: the outbox pages have no room"
    );
    tx.rollback().await.expect("rollback");
}

/// The ledger page reads one page of entries (and their journals), not
/// every entry of the caller (before: all of them, then a sort).
#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_page_reads_one_page() {
    let db = TestDb::new().await;
    let mut conn = db.admin_pool.acquire().await.expect("connection");
    let fan = user(&mut conn).await;
    // 3,000 credits to the wallet and 40 debt entries in between.
    sqlx::query(
        "select ledger.post('purchase', 'p-' || g, \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-1, 1]::bigint[], null) from generate_series(1, 3000) g",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("credits");
    sqlx::query(
        "select ledger.post('dispute', 'd-' || g, \
           array[ledger.account_of('debt', $1), ledger.singleton('stripe_clearing')], \
           array[-1, 1]::bigint[], null) from generate_series(1, 40) g",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("debt");
    sqlx::query(
        "select ledger.post('purchase', 'q-' || g, \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-1, 1]::bigint[], null) from generate_series(1, 30) g",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("more credits");
    // Newer entries of 500 other users: the fan's are a minority, and not
    // the newest rows of the table.
    sqlx::query("insert into app.users (id) select gen_random_uuid() from generate_series(1, 500)")
        .execute(&mut *conn)
        .await
        .expect("other users");
    sqlx::query(
        "select ledger.post('purchase', 'o-' || u.id || '-' || g, \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', u.id)], \
           array[-1, 1]::bigint[], null) \
           from app.users u cross join generate_series(1, 20) g where u.id <> $1",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("other users' credits");
    analyze(&mut conn).await;
    sqlx::query("select set_config('request.jwt.claims', $1, false)")
        .bind(serde_json::json!({"sub": fan}).to_string())
        .execute(&mut *conn)
        .await
        .expect("claims");

    let (buffers, rows) = cost(&mut conn, "select * from app.my_entries(null, 50)").await;
    assert_eq!(rows, 50);
    assert!(
        buffers < 300,
        "a page of 50 of the fan's 3,070 entries (among 26,140) touched {buffers} buffers"
    );

    // Every page equals the same page of the whole list, newest first.
    let all: Vec<(i64, String)> = sqlx::query_as(
        "select e.id, a.kind from ledger.entries e join ledger.accounts a on a.id = e.account_id \
          where a.owner_id = $1 and a.kind in ('wallet', 'debt') and a.reference is null \
          order by e.id desc",
    )
    .bind(fan)
    .fetch_all(&mut *conn)
    .await
    .expect("all entries");
    assert_eq!(all.len(), 3070);
    let mut paged: Vec<(i64, String)> = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let page: Vec<(i64, String)> =
            sqlx::query_as("select id, account from app.my_entries($1, 100)")
                .bind(before)
                .fetch_all(&mut *conn)
                .await
                .expect("page");
        let Some(last) = page.last() else { break };
        before = Some(last.0);
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert_eq!(paged.iter().filter(|(_, k)| k == "debt").count(), 40);
}

/// What a user spent in 24 hours reads their debits, not the credits a
/// creator receives (before: every credit of the day, 1,848 buffers for a
/// soak creator with 2,151 tips).
#[tokio::test(flavor = "multi_thread")]
async fn the_daily_spend_reads_debits_only() {
    let db = TestDb::new().await;
    let mut conn = db.admin_pool.acquire().await.expect("connection");
    let creator = user(&mut conn).await;
    let fan = user(&mut conn).await;
    sqlx::query(
        "select ledger.post('tip', 't-' || g, \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-2, 2]::bigint[], null) from generate_series(1, 5000) g",
    )
    .bind(creator)
    .execute(&mut *conn)
    .await
    .expect("credits");
    // The fan: funded, then 7 tips of 3 and one refund debit (not spending).
    sqlx::query(
        "select ledger.post('purchase', 'f', \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-100, 100]::bigint[], null)",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("fund");
    sqlx::query(
        "select ledger.post('tip', 'ft-' || g, \
           array[ledger.account_of('wallet', $1), ledger.account_of('wallet', $2)], \
           array[-3, 3]::bigint[], null) from generate_series(1, 7) g",
    )
    .bind(fan)
    .bind(creator)
    .execute(&mut *conn)
    .await
    .expect("tips");
    sqlx::query(
        "select ledger.post('refund', 'r', \
           array[ledger.account_of('wallet', $1), ledger.singleton('stripe_clearing')], \
           array[-10, 10]::bigint[], null)",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("refund");
    analyze(&mut conn).await;

    let wallet = |who: Uuid| format!("ledger.account_of('wallet', '{who}')");
    let (buffers, _) = cost(
        &mut conn,
        &format!("select ledger.spent_last_24h({})", wallet(creator)),
    )
    .await;
    assert!(
        buffers < 40,
        "the daily spend of a creator with 5,000 credits touched {buffers} buffers"
    );
    let spent = |who: Uuid| {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "select ledger.spent_last_24h({})",
            wallet(who)
        )))
    };
    assert_eq!(
        spent(creator).fetch_one(&mut *conn).await.expect("creator"),
        0
    );
    assert_eq!(spent(fan).fetch_one(&mut *conn).await.expect("fan"), 21);
}

/// The 24-hour spending window reads hourly totals and the debits of one
/// partial hour, not every debit of the day (before migration 19: every
/// spending debit of the last 24 hours and its journal, which grew with what
/// the fan spent: 0.6 → 2.4 ms a call over a 3-minute soak).
#[tokio::test(flavor = "multi_thread")]
async fn the_daily_spend_reads_hourly_totals() {
    let db = TestDb::new().await;
    let mut conn = db.admin_pool.acquire().await.expect("connection");
    let creator = user(&mut conn).await;
    let fan = user(&mut conn).await;
    sqlx::query(
        "select ledger.post('purchase', 'f', \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-100000, 100000]::bigint[], null)",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("fund");
    sqlx::query(
        "select ledger.post('tip', 'ft-' || g, \
           array[ledger.account_of('wallet', $1), ledger.account_of('wallet', $2)], \
           array[-1, 1]::bigint[], null) from generate_series(1, 3000) g",
    )
    .bind(fan)
    .bind(creator)
    .execute(&mut *conn)
    .await
    .expect("tips");
    // The hour's total row was updated 3,000 times: vacuumed, as autovacuum
    // keeps a hot row in production (its dead versions are not what this
    // measures; the wallet row every tip updates has as many).
    sqlx::query("vacuum ledger.spend_hours")
        .execute(&mut *conn)
        .await
        .expect("vacuum");
    analyze(&mut conn).await;
    // The wallet's id first: its row has 3,000 versions until vacuumed, and
    // looking it up is not what is measured.
    let wallet: Uuid = sqlx::query_scalar("select ledger.account_of('wallet', $1)")
        .bind(fan)
        .fetch_one(&mut *conn)
        .await
        .expect("wallet");
    let sql = format!("select ledger.spent_last_24h('{wallet}')");
    let (buffers, _) = cost(&mut conn, &sql).await;
    // The old definition on the same data, debit by debit.
    let (old, _) = cost(
        &mut conn,
        &format!(
            "select coalesce(-sum(e.amount), 0)::bigint \
               from ledger.entries e join ledger.journals j on j.id = e.journal_id \
              where e.account_id = '{wallet}' and e.amount < 0 \
                and e.created_at > app.now() - interval '24 hours' \
                and j.kind in ('tip', 'class_enrollment', 'call_minute', 'call_hold')"
        ),
    )
    .await;
    eprintln!("daily spend of a fan with 3,000 tips: {buffers} buffers (debit by debit: {old})");
    assert!(
        buffers < 40 && buffers * 4 < old,
        "the daily spend of a fan with 3,000 tips today touched {buffers} buffers (debit by debit: {old})"
    );
    let spent: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await
        .expect("spent");
    assert_eq!(spent, 3000);
}

/// The window read from hourly totals is exactly the sum of the debits, as
/// time moves across hour boundaries and past 24 hours (the test clock,
/// `app.now()`), and the audit finds every total equal to its debits; the
/// cleanup's pruning of old hours changes nothing inside the window.
#[tokio::test(flavor = "multi_thread")]
async fn the_daily_spend_is_exact_as_time_moves() {
    let db = TestDb::new().await;
    let mut conn = db.admin_pool.acquire().await.expect("connection");
    let creator = user(&mut conn).await;
    let fan = user(&mut conn).await;
    sqlx::query(
        "select ledger.post('purchase', 'f', \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-100000, 100000]::bigint[], null)",
    )
    .bind(fan)
    .execute(&mut *conn)
    .await
    .expect("fund");
    // The old definition, debit by debit.
    let direct = "select coalesce(-sum(e.amount), 0)::bigint \
        from ledger.entries e join ledger.journals j on j.id = e.journal_id \
        where e.account_id = ledger.account_of('wallet', $1) and e.amount < 0 \
          and e.created_at > app.now() - interval '24 hours' \
          and j.kind in ('tip', 'class_enrollment', 'call_minute', 'call_hold')";
    let windowed = "select ledger.spent_last_24h(ledger.account_of('wallet', $1))";
    let mut checked = 0;
    for step in 0_i64..90 {
        // 23 minutes a step: 34.5 hours in all, crossing hour boundaries at
        // every offset, the window's start sliding through earlier tips.
        db.advance_clock(chrono::Duration::minutes(23)).await;
        sqlx::query(
            "select ledger.post('tip', $3, \
               array[ledger.account_of('wallet', $1), ledger.account_of('wallet', $2)], \
               array[-$4, $4]::bigint[], null)",
        )
        .bind(fan)
        .bind(creator)
        .bind(format!("t-{step}"))
        .bind(step % 7 + 1)
        .execute(&mut *conn)
        .await
        .expect("tip");
        if step % 3 == 0 {
            // A debit that is not spending (a refund) counts in neither.
            sqlx::query(
                "select ledger.post('refund', $2, \
                   array[ledger.account_of('wallet', $1), ledger.singleton('stripe_clearing')], \
                   array[-1, 1]::bigint[], null)",
            )
            .bind(fan)
            .bind(format!("r-{step}"))
            .execute(&mut *conn)
            .await
            .expect("refund");
        }
        if step == 80 {
            sqlx::query("select ledger.prune_spend_hours()")
                .execute(&mut *conn)
                .await
                .expect("prune");
        }
        let expected: i64 = sqlx::query_scalar(direct)
            .bind(fan)
            .fetch_one(&mut *conn)
            .await
            .expect("direct");
        let got: i64 = sqlx::query_scalar(windowed)
            .bind(fan)
            .fetch_one(&mut *conn)
            .await
            .expect("windowed");
        assert_eq!(got, expected, "step {step}");
        checked += 1;
    }
    assert_eq!(checked, 90);
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report:?}");
    // A total that disagrees with its debits is found by the audit.
    sqlx::query("update ledger.spend_hours set spent = spent + 1 where hour = (select max(hour) from ledger.spend_hours)")
        .execute(&mut *conn)
        .await
        .expect("tamper");
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert_eq!(report.drifted_spend_hours.len(), 1, "{report:?}");
}
