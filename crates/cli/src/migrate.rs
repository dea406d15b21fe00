//! `stagepass migrate`: the embedded migrations, run at deploy time as the
//! database owner (they create roles and policies), followed by a check that
//! the functions' login cannot bypass row-level security.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::str::FromStr;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use stagepass_platform::config::{PoolMode, without_pgbouncer_param};
use stagepass_platform::db::MIGRATOR;

use crate::error::{Context as _, Result, fail};

/// The login the functions use (created by the first migration).
pub const APP_LOGIN: &str = "stagepass_app";

pub async fn run() -> Result<ExitCode> {
    let (variable, url) = admin_url()?;
    if url::Url::parse(&url).is_ok_and(|u| PoolMode::inferred_from(&u) == PoolMode::Transaction) {
        return fail(format!(
            "{variable} names a transaction pooler (port 6543 or pgbouncer=true): migrations \
             hold a session lock; use the direct connection or the session pooler (port 5432)"
        ));
    }
    println!("migrating the database named by {variable}");
    let pool = connect(&url).await?;
    let applied = apply(&pool).await?;
    for m in MIGRATOR.iter() {
        let state = if applied.contains(&m.version) {
            "applied now"
        } else {
            "already applied"
        };
        println!("  {} {:<40} {state}", m.version, m.description);
    }
    println!(
        "{} migration(s) applied now, {} in total",
        applied.len(),
        MIGRATOR.iter().count()
    );
    let mut logins = vec![APP_LOGIN.to_owned()];
    // DATABASE_URL may name another login; check that one too.
    if let Some(user) = std::env::var("DATABASE_URL")
        .ok()
        .and_then(|u| url::Url::parse(&u).ok())
        .map(|u| u.username().to_owned())
        .filter(|u| !u.is_empty() && u != APP_LOGIN)
    {
        logins.push(user);
    }
    let warnings = check_logins(&pool, &logins).await?;
    pool.close().await;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The owner connection: `DATABASE_ADMIN_URL`, else `DATABASE_URL`.
fn admin_url() -> Result<(&'static str, String)> {
    for variable in ["DATABASE_ADMIN_URL", "DATABASE_URL"] {
        if let Ok(url) = std::env::var(variable)
            && !url.trim().is_empty()
        {
            return Ok((variable, url));
        }
    }
    fail("set DATABASE_ADMIN_URL (a login that owns the database, e.g. postgres) or DATABASE_URL")
}

/// One connection, for operator commands. Errors never echo the URL (it may
/// hold a password). Through a transaction pooler (the production
/// `DATABASE_URL` for `users set-role`) with the functions' settings for it:
/// unnamed statements, no startup parameters the pooler refuses.
pub async fn connect(url: &str) -> Result<PgPool> {
    let parsed =
        url::Url::parse(url).map_err(|_| "the database URL is not a valid postgres:// URL")?;
    let mode = PoolMode::inferred_from(&parsed);
    let mut options = PgConnectOptions::from_str(&without_pgbouncer_param(parsed))
        .map_err(|_| "the database URL is not a valid postgres:// URL")?
        .application_name("stagepass-cli");
    if mode == PoolMode::Transaction {
        options = options.statement_cache_capacity(0).extra_float_digits(None);
    }
    let target = format!(
        "{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to {target}"))
}

/// Applies pending migrations; returns the versions applied by this call.
pub async fn apply(pool: &PgPool) -> Result<BTreeSet<i64>> {
    let before = applied_versions(pool).await?;
    MIGRATOR.run(pool).await.context("running migrations")?;
    let after = applied_versions(pool).await?;
    Ok(after.difference(&before).copied().collect())
}

async fn applied_versions(pool: &PgPool) -> Result<BTreeSet<i64>> {
    let exists: bool = sqlx::query_scalar("select to_regclass('_sqlx_migrations') is not null")
        .fetch_one(pool)
        .await
        .context("reading the migrations table")?;
    if !exists {
        return Ok(BTreeSet::new());
    }
    let versions: Vec<i64> =
        sqlx::query_scalar("select version from _sqlx_migrations where success")
            .fetch_all(pool)
            .await
            .context("reading the migrations table")?;
    Ok(versions.into_iter().collect())
}

/// Warnings for logins that are superusers or bypass row-level security
/// (either makes every policy moot for the functions).
async fn check_logins(pool: &PgPool, logins: &[String]) -> Result<Vec<String>> {
    let rows: Vec<(String, bool, bool)> = sqlx::query_as(
        "select rolname::text, rolsuper, rolbypassrls from pg_roles where rolname = any($1)",
    )
    .bind(logins)
    .fetch_all(pool)
    .await
    .context("reading pg_roles")?;
    let mut warnings = Vec::new();
    for (name, superuser, bypass) in rows {
        if superuser {
            warnings.push(format!(
                "login {name} is a SUPERUSER: row-level security does not apply to it (ALTER ROLE {name} NOSUPERUSER)"
            ));
        }
        if bypass {
            warnings.push(format!(
                "login {name} has BYPASSRLS: row-level security does not apply to it (ALTER ROLE {name} NOBYPASSRLS)"
            ));
        }
    }
    Ok(warnings)
}
