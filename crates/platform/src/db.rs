//! The database: one small pool per process, and transactions that run a
//! user's work under row-level security.
//!
//! A serverless instance serves one request at a time most of the time, so
//! the pool is small (default 4), connects lazily (a cold start that never
//! touches the database never pays for a connection) and bounds every wait:
//! acquiring a connection (3 s) and every statement (`statement_timeout`,
//! 5 s: `SET LOCAL` in the same round trip as each transaction's `BEGIN`;
//! for statements outside a transaction, the login role's default, set by
//! migration 22, and in session mode also the startup packet).
//!
//! Supabase's transaction pooler (port 6543, `DATABASE_POOL_MODE=transaction`)
//! is supported: unnamed statements only (no statement cache), each sent in
//! one flight (Parse … Sync, so the pooler never splits it across server
//! connections; vendor/sqlx-postgres/STAGEPASS-PATCH.md), no startup
//! `options`, settings only transaction-local ([`PoolMode::Transaction`];
//! docs/ARCHITECTURE.md, "Database connections"; ADRs 0010 and 0020).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::auth::Claims;
pub use crate::config::PoolMode;
use crate::config::{DbConfig, ExposeSecret};

/// Statement timeout for every connection of a function.
pub const STATEMENT_TIMEOUT: &str = "5s";
/// Longest wait for a free connection before a request fails with 503.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// A pooled connection idle at least this long is checked (one empty round
/// trip) before it is handed out; one used more recently is not.
pub const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The database role user requests run as (Supabase's name, so policies
/// written for Supabase apply unchanged).
pub const USER_ROLE: &str = "authenticated";
/// The role webhooks, jobs and cron run as: explicit grants, no `BYPASSRLS`.
pub const SERVICE_ROLE: &str = "stagepass_service";

/// `BEGIN` and the statement timeout in one simple-protocol round trip. The
/// timeout is transaction-local, so it holds through a transaction pooler,
/// where startup `options` do not reach the server connection.
const BEGIN: &str = "begin; set local statement_timeout = '5s'";
const BEGIN_SNAPSHOT: &str =
    "begin isolation level repeatable read read only; set local statement_timeout = '5s'";

/// Builds the per-process pool. Connects lazily.
pub fn connect_lazy(cfg: &DbConfig) -> Result<PgPool, sqlx::Error> {
    Ok(pool_options(cfg.max_connections).connect_lazy_with(connect_options(cfg)?))
}

/// The connection settings of [`connect_lazy`] (also what tests through a
/// pooler connect with).
pub fn connect_options(cfg: &DbConfig) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options =
        PgConnectOptions::from_str(cfg.url.expose_secret())?.application_name("stagepass");
    if let Some(pem) = &cfg.ca_pem {
        // Replaces `PGSSLROOTCERT`; the config refuses `sslrootcert=` next
        // to it. Used for verify-ca/verify-full (the config requires one).
        options = options.ssl_root_cert_from_pem(pem.expose_secret().as_bytes().to_vec());
    }
    Ok(match cfg.pool_mode {
        PoolMode::Session => options.options([("statement_timeout", STATEMENT_TIMEOUT)]),
        // No statement cache: with the vendored sqlx-postgres
        // (transact-rs/sqlx#4337) that also means unnamed statements, which
        // never outlive a transaction. No startup parameters a pooler does
        // not know: PgBouncer refuses `options` and `extra_float_digits`
        // (Supavisor ignores them); the timeout is in `BEGIN` instead.
        PoolMode::Transaction => options.statement_cache_capacity(0).extra_float_digits(None),
    })
}

pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        // sqlx checks every idle connection with a round trip (`Sync`)
        // before handing it out: a one-statement read cost two round trips,
        // not one (issue 13). The check is kept where it can find something —
        // a connection that sat idle (an instance thawed after a freeze, a
        // quiet minute after a database restart) — and skipped for one
        // released a moment ago, which was alive then. A connection that
        // died in between fails its statement: a 503 problem
        // (`database_unavailable`), and sqlx discards it (tests/outage.rs).
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .min_connections(0)
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // Serverless instances freeze between invocations: drop connections
        // that sat idle long enough to have been cut by a proxy.
        .idle_timeout(Duration::from_secs(60))
        .max_lifetime(Duration::from_secs(30 * 60))
}

/// Begins a transaction in which the caller's SQL runs as the `authenticated`
/// role with the verified token's claims visible to policies (`auth.uid()`),
/// exactly as Supabase's PostgREST does. Both settings are transaction-local,
/// so a pooled connection never carries them to another request.
///
/// One round trip: `BEGIN`, the timeout, the claims and the role travel in
/// one simple-protocol message ([`begin_user_sql`]; issue 13).
pub async fn begin_user<'a>(
    pool: &'a PgPool,
    claims: &Claims,
) -> Result<Transaction<'a, Postgres>, sqlx::Error> {
    // Nothing that can fail may join this message: a failure after `BEGIN`
    // inside it comes before sqlx counts the transaction, so nothing would
    // roll it back and the connection would return to the pool inside an
    // aborted transaction (`routes::me::begin_seen`). `set_config` of valid
    // text cannot fail; the hex digits are always valid and decode to the
    // claims' UTF-8.
    let begin = sqlx::AssertSqlSafe(begin_user_sql(&claims.raw.to_string()));
    crate::telemetry::db_span("begin_user", pool.begin_with(begin)).await
}

/// The statement [`begin_user`] sends: [`BEGIN`], then `set_config` for the
/// claims and the role (`set_config('role', …)` is `SET LOCAL ROLE`). The
/// simple protocol has no bind parameters, so the claims travel as hex
/// digits decoded by the server: whatever the claims hold (quotes,
/// backslashes, `$$`), the statement's text is only `[0-9a-f]` where they
/// go, and nothing depends on `standard_conforming_strings`.
pub fn begin_user_sql(claims: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut sql = String::with_capacity(BEGIN.len() + 160 + 2 * claims.len());
    sql.push_str(BEGIN);
    sql.push_str("; select set_config('request.jwt.claims', convert_from(decode('");
    for b in claims.bytes() {
        sql.push(char::from(HEX[usize::from(b >> 4)]));
        sql.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    sql.push_str("', 'hex'), 'UTF8'), true), set_config('role', '");
    sql.push_str(USER_ROLE);
    sql.push_str("', true)");
    sql
}

/// The verified claims as the text `request.jwt.claims` holds.
pub fn claims_text(claims: &Claims) -> String {
    claims.raw.to_string()
}

/// Runs one statement that reads as the caller — a SQL function that sets
/// the claims and the `authenticated` role for its own implicit transaction
/// and then reads under RLS (`app.read_me`, `app.read_balance`; issue 13) —
/// in one round trip (a cached statement in session mode; through a
/// transaction pooler, an unnamed one sent in one flight). Its statement
/// timeout is the login role's default (migration 22), as no `BEGIN`
/// carries one.
pub async fn read_as_user<'q, T>(
    pool: &PgPool,
    query: sqlx::query::QueryAs<'q, Postgres, T, sqlx::postgres::PgArguments>,
) -> Result<T, sqlx::Error>
where
    T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    traced_read(query.fetch_one(pool)).await
}

/// Any such one-statement read (a `read_*` function of the ledger crate, or
/// a query on the pool), under the same telemetry span as [`read_as_user`].
pub async fn traced_read<F: std::future::IntoFuture>(read: F) -> F::Output {
    crate::telemetry::db_span("read_as_user", read.into_future()).await
}

/// Begins a transaction as the service role (webhooks, jobs, cron, admin
/// tooling). Never used for a user's request.
pub async fn begin_service(pool: &PgPool) -> Result<Transaction<'_, Postgres>, sqlx::Error> {
    let mut tx = crate::telemetry::db_span("begin_service", pool.begin_with(BEGIN)).await?;
    sqlx::query("select set_config('role', $1, true)")
        .bind(SERVICE_ROLE)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// [`begin_service`] in a read-only snapshot (`REPEATABLE READ`): every
/// query of the transaction sees the same committed state (audits).
pub async fn begin_service_snapshot(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin_with(BEGIN_SNAPSHOT).await?;
    sqlx::query("select set_config('role', $1, true)")
        .bind(SERVICE_ROLE)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Runs the embedded migrations (the `migrate` command; never a cold start).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Turns named Postgres failures into API errors (constraint names and
/// SQLSTATEs are the contract between migrations and handlers; no
/// "check, then insert").
pub trait DbResultExt<T> {
    /// Maps a violation of the constraint `name`.
    fn on_constraint(
        self,
        name: &str,
        f: impl FnOnce() -> crate::http::ApiError,
    ) -> Result<T, crate::http::ApiError>;
    /// Maps an error raised with SQLSTATE `code` (e.g. by a `raise … using errcode`).
    fn on_sqlstate(
        self,
        code: &str,
        f: impl FnOnce() -> crate::http::ApiError,
    ) -> Result<T, crate::http::ApiError>;
}

impl<T> DbResultExt<T> for Result<T, sqlx::Error> {
    fn on_constraint(
        self,
        name: &str,
        f: impl FnOnce() -> crate::http::ApiError,
    ) -> Result<T, crate::http::ApiError> {
        self.map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some(name) => f(),
            _ => e.into(),
        })
    }

    fn on_sqlstate(
        self,
        code: &str,
        f: impl FnOnce() -> crate::http::ApiError,
    ) -> Result<T, crate::http::ApiError> {
        self.map_err(|e| match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some(code) => f(),
            _ => e.into(),
        })
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_begin_sets_the_one_statement_timeout() {
        let set = format!("; set local statement_timeout = '{STATEMENT_TIMEOUT}'");
        for begin in [BEGIN, BEGIN_SNAPSHOT] {
            assert!(begin.ends_with(&set), "{begin}");
        }
        assert!(begin_user_sql("{}").starts_with(&format!("{BEGIN};")));
    }

    /// Whatever the claims hold, what reaches the statement's text is hex
    /// digits only, and they decode back to the claims.
    #[test]
    fn claims_reach_begin_user_as_hex_digits_only() {
        let claims = r#"{"sub":"x","evil":"'); drop table app.users; --","b":"\\","d":"$$é"}"#;
        let sql = begin_user_sql(claims);
        let start = sql.find("decode('").expect("decode") + "decode('".len();
        let end = start + sql[start..].find('\'').expect("closing quote");
        let hex = &sql[start..end];
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{hex}"
        );
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        assert_eq!(String::from_utf8(bytes).expect("utf-8"), claims);
        assert!(
            sql.ends_with("), 'UTF8'), true), set_config('role', 'authenticated', true)"),
            "{sql}"
        );
    }
}
