//! Test support (feature `testing`): a fresh, migrated database per test.
//!
//! The first test in a run migrates a template database (named after the
//! migrations' checksums, so a changed migration builds a new one); every
//! test then gets `CREATE DATABASE … TEMPLATE`, which takes milliseconds.
//! Tests connect as `stagepass_app`, the same unprivileged login the
//! functions use, so row-level security is exercised for real.
//!
//! `DATABASE_ADMIN_URL` names a superuser connection to the cluster
//! (default `postgres://postgres@127.0.0.1:5432/postgres`).
//!
//! `STAGEPASS_TEST_DB_PROXY=host:port` routes every `stagepass_app`
//! connection (the in-process pool and the `DATABASE_URL` given to function
//! binaries) through a transaction pooler at that address, e.g. PgBouncer in
//! `pool_mode = transaction` (`scripts/ci/pgbouncer.sh`): the same tests then
//! prove the functions work through Supabase's transaction pooler. Fixtures
//! and inspection stay on the direct admin connection.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::db::MIGRATOR;
use crate::time::Clock;

/// Installed by the superuser in every test database ([`TestDb::new`]; the
/// dev server may install it too): `app.now()` becomes the transaction's
/// start plus the database's test offset (`stagepass_test.clock`, moved by
/// [`TestDb::advance_clock`]) plus, for one transaction, the
/// `stagepass.clock_offset` setting ([`shift_clock_local`]). Production
/// databases never run this: there `app.now()` is `pg_catalog.now()` and
/// reads no setting (migration 20261130000017, ADR 0014).
pub const TEST_CLOCK_SQL: &str = r#"
create schema stagepass_test;
grant usage on schema stagepass_test to public;
create table stagepass_test.clock (
  id boolean primary key default true check (id),
  offset_by interval not null default interval '0'
);
insert into stagepass_test.clock default values;
grant select on stagepass_test.clock to public;
create or replace function app.now() returns timestamptz
  language sql stable parallel safe as $$
  select pg_catalog.now()
       + (select c.offset_by from stagepass_test.clock c)
       + coalesce(nullif(pg_catalog.current_setting('stagepass.clock_offset', true), '')::interval,
                  interval '0')
$$;
"#;

/// Moves `app.now()` by `by` for the rest of the transaction `tx` only (on
/// a test database: see [`TEST_CLOCK_SQL`]; a production database ignores
/// the setting).
pub async fn shift_clock_local(
    tx: &mut PgConnection,
    by: chrono::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query("select set_config('stagepass.clock_offset', $1, true)")
        .bind(interval_ms(by))
        .execute(tx)
        .await
        .map(|_| ())
}

fn interval_ms(by: chrono::Duration) -> String {
    format!("{} milliseconds", by.num_milliseconds())
}

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Every test database's name starts with this (cleanup drops leftovers).
pub const TEST_DB_PREFIX: &str = "stagepass_t_";

pub fn admin_url() -> String {
    std::env::var("DATABASE_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// The transaction pooler the tests go through (`STAGEPASS_TEST_DB_PROXY`).
pub fn db_proxy() -> Option<(String, u16)> {
    let raw = std::env::var("STAGEPASS_TEST_DB_PROXY").ok()?;
    let (host, port) = raw
        .rsplit_once(':')
        .expect("STAGEPASS_TEST_DB_PROXY must be host:port");
    let port = port.parse().expect("STAGEPASS_TEST_DB_PROXY: bad port");
    Some((host.to_owned(), port))
}

/// How the tests' `stagepass_app` connections reach Postgres.
pub fn pool_mode() -> crate::db::PoolMode {
    if db_proxy().is_some() {
        crate::db::PoolMode::Transaction
    } else {
        crate::db::PoolMode::Session
    }
}

/// A throwaway database, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    /// Pool connected as `stagepass_app` (what functions use).
    pub app_pool: PgPool,
    /// Pool connected as the superuser (fixtures, inspection).
    pub admin_pool: PgPool,
    /// The Rust clock that reads the same time as this database's
    /// `app.now()`: hand it to the app (`Resources::clock`) and move both
    /// with [`TestDb::advance_clock`].
    pub clock: Clock,
    admin_options: PgConnectOptions,
}

impl TestDb {
    /// A migrated database with the test clock ([`TEST_CLOCK_SQL`]).
    pub async fn new() -> TestDb {
        let db = Self::production().await;
        sqlx::raw_sql(TEST_CLOCK_SQL)
            .execute(&db.admin_pool)
            .await
            .expect("install the test clock");
        db
    }

    /// Moves time forward by `by` for this database's `app.now()` and for
    /// [`TestDb::clock`] together (every later transaction, every pool,
    /// function binaries started on [`TestDb::app_url`] included).
    pub async fn advance_clock(&self, by: chrono::Duration) {
        sqlx::query("update stagepass_test.clock set offset_by = offset_by + $1::interval")
            .bind(interval_ms(by))
            .execute(&self.admin_pool)
            .await
            .expect("advance the test clock (a TestDb::production database has none)");
        self.clock.advance(by);
    }

    /// A database exactly as migrations leave it, as in production: no test
    /// clock, `app.now()` is the wall clock.
    pub async fn production() -> TestDb {
        let admin_options =
            PgConnectOptions::from_str(&admin_url()).expect("DATABASE_ADMIN_URL is not a URL");
        let template = ensure_template(&admin_options).await;
        let name = format!("{TEST_DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let mut conn = admin_options.connect().await.expect("connect as admin");
        // One creation at a time: CREATE DATABASE … TEMPLATE refuses while
        // another session uses the template.
        sqlx::query("select pg_advisory_lock(7401)")
            .execute(&mut conn)
            .await
            .expect("lock");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"create database "{name}" template "{template}""#
        )))
        .execute(&mut conn)
        .await
        .expect("create test database");
        sqlx::query("select pg_advisory_unlock(7401)")
            .execute(&mut conn)
            .await
            .expect("unlock");
        let _ = conn.close().await;
        let db_admin = admin_options.clone().database(&name);
        let app = match db_proxy() {
            None => db_admin.clone().username("stagepass_app").password(""),
            // Exactly what a function connects with (from the URL binaries get).
            Some(_) => crate::db::connect_options(&crate::config::DbConfig {
                url: app_url(&name).into(),
                max_connections: 8,
                pool_mode: crate::db::PoolMode::Transaction,
                ca_pem: None,
            })
            .expect("proxy url"),
        };
        TestDb {
            app_pool: PgPoolOptions::new()
                .max_connections(8)
                .connect_with(app)
                .await
                .expect("connect as stagepass_app"),
            admin_pool: PgPoolOptions::new()
                .max_connections(4)
                .connect_with(db_admin)
                .await
                .expect("connect to test database as admin"),
            name,
            clock: Clock::system(),
            admin_options,
        }
    }

    /// A `postgres://` URL for this database as `stagepass_app` (for
    /// function binaries started by end-to-end tests).
    pub fn app_url(&self) -> String {
        app_url(&self.name)
    }

    /// How [`TestDb::app_pool`] reaches Postgres.
    pub fn pool_mode(&self) -> crate::db::PoolMode {
        pool_mode()
    }
}

/// Through the pooler, the URL says so with `pgbouncer=true`: function
/// binaries infer transaction mode from it (their environment is cleared).
fn app_url(name: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).expect("admin url");
    let _ = url.set_username("stagepass_app");
    let _ = url.set_password(None);
    url.set_path(&format!("/{name}"));
    if let Some((host, port)) = db_proxy() {
        let _ = url.set_host(Some(&host));
        let _ = url.set_port(Some(port));
        url.query_pairs_mut().append_pair("pgbouncer", "true");
    }
    url.to_string()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let options = self.admin_options.clone();
        // Drop runs inside the test's runtime, which may be single-threaded
        // and is blocked here: do the cleanup on a thread with a runtime of
        // its own, and do not wait for the pools to close (their tasks live
        // on the blocked runtime). `with (force)` ends their sessions.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = options.connect().await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        r#"drop database if exists "{name}" with (force)"#
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        });
        let _ = handle.join();
    }
}

async fn ensure_template(admin: &PgConnectOptions) -> String {
    let digest: String = MIGRATOR
        .iter()
        .map(|m| format!("{}{}", m.version, hex(&m.checksum)))
        .collect::<Vec<_>>()
        .join("");
    let template = format!("stagepass_tpl_{}", &fnv_hex(&digest));
    let mut conn = admin.connect().await.expect("connect as admin");
    sqlx::query("select pg_advisory_lock(7400)")
        .execute(&mut conn)
        .await
        .expect("lock");
    let exists: bool =
        sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
            .bind(&template)
            .fetch_one(&mut conn)
            .await
            .expect("query pg_database");
    if !exists {
        let building = format!("{template}_building");
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"drop database if exists "{building}" with (force)"#
        )))
        .execute(&mut conn)
        .await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"create database "{building}""#
        )))
        .execute(&mut conn)
        .await
        .expect("create template");
        let mut tconn = admin
            .clone()
            .database(&building)
            .connect()
            .await
            .expect("connect to template");
        MIGRATOR.run(&mut tconn).await.expect("migrate template");
        let _ = tconn.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"alter database "{building}" rename to "{template}""#
        )))
        .execute(&mut conn)
        .await
        .expect("rename template");
    }
    sqlx::query("select pg_advisory_unlock(7400)")
        .execute(&mut conn)
        .await
        .expect("unlock");
    let _ = conn.close().await;
    template
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fnv_hex(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Connects one raw connection as the superuser to `db` (RLS probes).
pub async fn admin_connection(db: &TestDb) -> PgConnection {
    db.admin_options
        .clone()
        .database(&db.name)
        .connect()
        .await
        .expect("connect")
}
