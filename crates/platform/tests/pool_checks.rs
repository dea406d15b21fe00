//! When the pool checks a connection before handing it out
//! (`db::pool_options`, issue 13): a connection that sat idle for
//! `CHECK_AFTER_IDLE` or longer gets one empty round trip first, so one
//! that died while idle is replaced without failing anybody's statement; a
//! connection released a moment ago is handed out unchecked (the check used
//! to double the round trips of a one-statement read).

use std::str::FromStr as _;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use stagepass_platform::db;
use stagepass_platform::testing::TestDb;

/// A pool of one connection, configured as the functions' pools are.
fn one_connection_pool(db: &TestDb) -> PgPool {
    let options = PgConnectOptions::from_str(&db.app_url()).expect("app URL");
    db::pool_options(1).connect_lazy_with(options)
}

async fn backend_pid(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(pool)
        .await
}

/// Ends `pid`'s session from the server side, as a database restart or a
/// proxy's idle cut does, and waits until it is gone.
async fn terminate(db: &TestDb, pid: i32) {
    let ended: bool = sqlx::query_scalar("select pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&db.admin_pool)
        .await
        .expect("pg_terminate_backend");
    assert!(ended, "backend {pid} did not end");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_died_while_idle_is_replaced_before_use() {
    let db = TestDb::new().await;
    let pool = one_connection_pool(&db);
    let first = backend_pid(&pool).await.expect("first statement");
    terminate(&db, first).await;
    tokio::time::sleep(db::CHECK_AFTER_IDLE + Duration::from_millis(200)).await;

    // The check finds the dead connection; the pool opens another; the
    // statement never sees the failure.
    let second = backend_pid(&pool)
        .await
        .expect("a statement after the idle check");
    assert_ne!(first, second, "a new server session");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_used_a_moment_ago_is_handed_out_without_a_check() {
    let db = TestDb::new().await;
    let pool = one_connection_pool(&db);
    let first = backend_pid(&pool).await.expect("first statement");
    terminate(&db, first).await;

    // Released a moment ago: no round trip before the statement, so the
    // statement itself meets the dead connection (a route answers 503
    // `database_unavailable`) …
    let failed = backend_pid(&pool).await;
    assert!(
        failed.is_err(),
        "no check within {:?} of the last use: {failed:?}",
        db::CHECK_AFTER_IDLE
    );
    // … and sqlx discards it: the next statement gets a new session.
    let second = backend_pid(&pool).await.expect("a new connection");
    assert_ne!(first, second);
    pool.close().await;
}
