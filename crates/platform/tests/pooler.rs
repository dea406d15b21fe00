//! The database layer through a transaction pooler (ADR 0010).
//!
//! Runs only with `STAGEPASS_TEST_DB_PROXY=host:port` naming PgBouncer in
//! `pool_mode = transaction` with small pools and `server_round_robin = 1`
//! (`scripts/ci/pgbouncer.sh` starts one and runs this); without it each test
//! returns at once. Several pools stand for several function instances
//! sharing the pooler's two server connections per database.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _, PgPool};
use stagepass_platform::auth::Claims;
use stagepass_platform::config::{DbConfig, Loader, PoolMode};
use stagepass_platform::db;
use stagepass_platform::testing::{TestDb, db_proxy};

/// `DbConfig` exactly as a function loads it from its environment.
fn config(db: &TestDb) -> DbConfig {
    let mut l = Loader::from_map([
        ("APP_ENV", "test".to_owned()),
        ("DATABASE_URL", db.app_url()),
        ("DATABASE_MAX_CONNECTIONS", "2".to_owned()),
    ]);
    let cfg = DbConfig::load(&mut l).expect("db config");
    l.finish().expect("no problems");
    cfg
}

fn claims(sub: uuid::Uuid) -> Claims {
    let raw = serde_json::json!({"sub": sub, "role": "authenticated", "aud": "authenticated"});
    Claims {
        sub,
        email: None,
        email_verified: false,
        app_role: None,
        session_id: None,
        exp: 0,
        raw,
    }
}

/// What the test binaries are given infers transaction mode, and the URL
/// sqlx gets has lost our `pgbouncer=true`.
#[tokio::test(flavor = "multi_thread")]
async fn the_pooler_url_is_inferred_as_transaction_mode() {
    if db_proxy().is_none() {
        return;
    }
    let db = TestDb::new().await;
    let cfg = config(&db);
    assert_eq!(cfg.pool_mode, PoolMode::Transaction);
    use stagepass_platform::config::ExposeSecret as _;
    assert!(!cfg.url.expose_secret().contains("pgbouncer"));
}

/// Session-mode settings (the 5 s timeout in the startup packet) are refused
/// by PgBouncer: this is why transaction mode sends no startup `options`.
#[tokio::test(flavor = "multi_thread")]
async fn session_mode_settings_are_refused_by_the_pooler() {
    if db_proxy().is_none() {
        return;
    }
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.pool_mode = PoolMode::Session;
    let err = db::connect_options(&cfg)
        .expect("options")
        .connect()
        .await
        .expect_err("PgBouncer refuses the startup options");
    assert!(
        err.to_string().contains("unsupported startup parameter"),
        "{err}"
    );
}

/// Several instances, each with its own pool, run many short transactions
/// through the pooler's two server connections per database: statements are
/// never named (no `prepared statement "sqlx_s_1" already exists`), settings
/// are transaction-local (no role or claims carried into the next
/// transaction, wherever it lands), and the 5 s timeout holds inside each.
#[tokio::test(flavor = "multi_thread")]
async fn many_instances_share_the_pooler_without_leaking_state() {
    if db_proxy().is_none() {
        return;
    }
    let db = TestDb::new().await;
    let cfg = config(&db);
    let pools: Vec<PgPool> = (0..4)
        .map(|_| db::connect_lazy(&cfg).expect("pool"))
        .collect();
    let mut tasks = Vec::new();
    for (i, pool) in pools.iter().cloned().enumerate() {
        tasks.push(tokio::spawn(async move {
            for round in 0..25 {
                let user = uuid::Uuid::new_v4();
                let mut tx = db::begin_user(&pool, &claims(user)).await.expect("begin");
                let (role, sub, timeout): (String, Option<String>, String) = sqlx::query_as(
                    "select current_user::text, \
                            current_setting('request.jwt.claims', true)::json->>'sub', \
                            current_setting('statement_timeout')",
                )
                .fetch_one(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("instance {i} round {round}: {e}"));
                assert_eq!(role, "authenticated");
                assert_eq!(sub.as_deref(), Some(user.to_string().as_str()));
                assert_eq!(timeout, "5s");
                tx.commit().await.expect("commit");

                let mut tx = db::begin_service(&pool).await.expect("begin service");
                let (role, claims): (String, Option<String>) = sqlx::query_as(
                    "select current_user::text, \
                            nullif(current_setting('request.jwt.claims', true), '')",
                )
                .fetch_one(&mut *tx)
                .await
                .expect("service query");
                assert_eq!(role, db::SERVICE_ROLE);
                assert_eq!(claims, None, "claims leaked into the next transaction");
                tx.commit().await.expect("commit");

                // Outside a request: one statement on the pool, as the login
                // itself, with the login's default timeout (one flight).
                let (role, n, timeout): (String, i64, String) = sqlx::query_as(
                    "select current_user::text, $1::int8 * 2, current_setting('statement_timeout')",
                )
                .bind(i64::from(round))
                .fetch_one(&pool)
                .await
                .expect("bare statement");
                assert_eq!((role.as_str(), n), ("stagepass_app", i64::from(round) * 2));
                assert_eq!(timeout, "5s", "the login's default");
            }
        }));
    }
    for t in tasks {
        t.await.expect("instance task");
    }
    // Nothing stays prepared on the server connections the pooler shares.
    let mut admin = admin_connection(&db).await;
    let leftovers: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_activity a \
          where a.datname = current_database() and a.usename = 'stagepass_app'",
    )
    .fetch_one(&mut admin)
    .await
    .expect("activity");
    assert!(
        leftovers <= 2,
        "the pooler opened {leftovers} server connections"
    );
    let _ = admin.close().await;
}

/// The statement timeout reaches the server through the pooler.
#[tokio::test(flavor = "multi_thread")]
async fn the_statement_timeout_holds_through_the_pooler() {
    if db_proxy().is_none() {
        return;
    }
    let db = TestDb::new().await;
    let pool = db::connect_lazy(&config(&db)).expect("pool");
    let mut tx = db::begin_service(&pool).await.expect("begin");
    let started = std::time::Instant::now();
    let err = sqlx::query("select pg_sleep(30)")
        .execute(&mut *tx)
        .await
        .expect_err("cancelled by statement_timeout");
    assert_eq!(db::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tx);
    // A single statement outside any transaction (a one-statement read):
    // no `BEGIN` carries the timeout, the login's default does.
    let started = std::time::Instant::now();
    let err = sqlx::query("select pg_sleep(30)")
        .execute(&pool)
        .await
        .expect_err("cancelled by the login's default statement_timeout");
    assert_eq!(db::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

async fn admin_connection(db: &TestDb) -> sqlx::PgConnection {
    let options: PgConnectOptions = stagepass_platform::testing::admin_url()
        .parse::<PgConnectOptions>()
        .expect("admin url")
        .database(&db.name);
    options.connect().await.expect("admin connection")
}

/// Outside a transaction, sqlx 0.9 sent an uncached statement as Parse +
/// Describe + Sync, then Bind + Execute + Sync: two pooler transactions, and
/// the second could land on another server connection, where the unnamed
/// statement did not exist or was another client's (this test counted both
/// before the one-flight patch, vendor/sqlx-postgres/STAGEPASS-PATCH.md).
/// Now each statement is one flight: through the pooler, every bare
/// statement of several instances, each with its own SQL, answers its own
/// result.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_outside_a_transaction_is_one_flight_through_the_pooler() {
    if db_proxy().is_none() {
        return;
    }
    let db = TestDb::new().await;
    let cfg = config(&db);
    let pools: Vec<PgPool> = (0..3)
        .map(|_| db::connect_lazy(&cfg).expect("pool"))
        .collect();
    let mut tasks = Vec::new();
    for (k, pool) in (1_i64..).zip(pools) {
        tasks.push(tokio::spawn(async move {
            // Each instance its own statement text, as different functions
            // have: a Bind that lands next to another's Parse shows.
            let sql = format!("select $1::int8 + {k}");
            let mut bad = Vec::new();
            for i in 0..100_i64 {
                let r: Result<i64, _> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(i)
                    .fetch_one(&pool)
                    .await;
                match r {
                    Ok(n) if n == i + k => {}
                    other => bad.push(format!("{sql} with {i}: {other:?}")),
                }
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.expect("task"));
    }
    assert!(bad.is_empty(), "of 300 bare statements: {bad:#?}");
}
