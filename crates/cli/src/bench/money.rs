//! What the money scenarios (`tips`, `enroll-race`, `crash`) share: the
//! environment of a money function under test, seeding funded fans and
//! creators through SQL, creating a class, and the ledger audit counted as
//! violations.

use stagepass_platform::testing::TestDb;
use uuid::Uuid;

use super::{JWT_SECRET, SUPABASE_URL};
use crate::error::{Context as _, Result};

/// Tokens each seeded fan is funded with.
pub const FUNDED_TOKENS: i64 = 1_000_000;

/// The environment of a money function under test: `APP_ENV=test`, errors
/// only in the log, rate limits off (the ledger path is measured, not the
/// limiter, which has its own benchmark; a handful of users would otherwise
/// be throttled at once), and the deployed pool size (4) unless the
/// benchmark's own environment sets `DATABASE_MAX_CONNECTIONS`.
pub fn function_env(database_url: String) -> Vec<(&'static str, String)> {
    vec![
        ("APP_ENV", "test".to_owned()),
        ("RUST_LOG", "error".to_owned()),
        ("RATE_LIMITS", "off".to_owned()),
        (
            "DATABASE_MAX_CONNECTIONS",
            std::env::var("DATABASE_MAX_CONNECTIONS").unwrap_or_else(|_| "4".to_owned()),
        ),
        ("DATABASE_URL", database_url),
        ("SUPABASE_URL", SUPABASE_URL.to_owned()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
    ]
}

/// Users for `fans` and `creators` (role creator); each fan funded with
/// [`FUNDED_TOKENS`] like a purchase, and a daily limit a benchmark cannot
/// reach.
pub async fn seed(db: &TestDb, fans: &[Uuid], creators: &[Uuid]) -> Result<()> {
    for id in fans.iter().chain(creators) {
        sqlx::query("insert into app.users (id) values ($1)")
            .bind(id)
            .execute(&db.admin_pool)
            .await
            .context("seed user")?;
    }
    for c in creators {
        sqlx::query("update app.users set role = 'creator' where id = $1")
            .bind(c)
            .execute(&db.admin_pool)
            .await
            .context("seed creator")?;
    }
    for f in fans {
        sqlx::query(
            "select ledger.post('purchase', $1, array[ledger.singleton('stripe_clearing'), \
             ledger.account_of('wallet', $2)], array[-$3::bigint, $3::bigint], null)",
        )
        .bind(format!("bench-{f}"))
        .bind(f)
        .bind(FUNDED_TOKENS)
        .execute(&db.admin_pool)
        .await
        .context("fund")?;
        sqlx::query(
            "insert into app.user_private (user_id, daily_spend_limit_tokens) values ($1, 10000000)",
        )
        .bind(f)
        .execute(&db.admin_pool)
        .await
        .context("limit")?;
    }
    Ok(())
}

/// The ledger invariants of SPEC §2 over the whole database
/// ([`stagepass_ledger::audit`]), one line per violation: each unbalanced
/// journal, drifted account, sign violation, and a non-zero total.
pub async fn ledger_violations(conn: &mut sqlx::PgConnection) -> Result<Vec<String>> {
    let report = stagepass_ledger::audit::audit(conn)
        .await
        .map_err(|e| format!("audit: {e}"))?;
    let mut out = Vec::new();
    out.extend(
        report
            .unbalanced_journals
            .iter()
            .map(|j| format!("unbalanced journal {j}")),
    );
    out.extend(
        report
            .drifted_accounts
            .iter()
            .map(|a| format!("account {a}: balance differs from its entries")),
    );
    out.extend(
        report
            .misplaced_pending_credits
            .iter()
            .map(|e| format!("pending credit of entry {e} is not its entry's")),
    );
    out.extend(
        report
            .sign_violations
            .iter()
            .map(|a| format!("account {a}: balance of the wrong sign")),
    );
    if report.total_balance != 0 {
        out.push(format!(
            "the balances sum to {}, not 0",
            report.total_balance
        ));
    }
    Ok(out)
}

/// A class of `creator` starting in three days, with `seats` seats at
/// `price` tokens: `app.create_class` under the creator's claims, as the
/// route runs it.
pub async fn create_class(
    db: &TestDb,
    creator: Uuid,
    title: &str,
    seats: usize,
    price: i64,
) -> Result<Uuid> {
    let id = Uuid::new_v4();
    let mut tx = db.admin_pool.begin().await.context("begin")?;
    sqlx::query(
        "select set_config('request.jwt.claims', $1, true), \
         set_config('role', 'authenticated', true)",
    )
    .bind(
        serde_json::json!({"sub": creator, "role": "authenticated", "aud": "authenticated"})
            .to_string(),
    )
    .execute(&mut *tx)
    .await
    .context("creator's claims")?;
    sqlx::query(
        "select id from app.create_class($1, $2, '', now() + interval '3 days', 'UTC', 60, $3, $4)",
    )
    .bind(id)
    .bind(title)
    .bind(i32::try_from(seats).context("seats")?)
    .bind(price)
    .fetch_one(&mut *tx)
    .await
    .context("create class")?;
    tx.commit().await.context("commit class")?;
    Ok(id)
}
