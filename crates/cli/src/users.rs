//! `stagepass users set-role`: the operator's way to change a role (and to
//! make the first admin). Goes through `app.operator_set_role`, the same
//! locked, audited path the admin route uses, as the service role.

use std::process::ExitCode;

use sqlx::PgPool;
use stagepass_platform::db;

use crate::error::{Context as _, Result, fail};

const ROLES: [&str; 3] = ["fan", "creator", "admin"];

/// A validated request (checked before touching the database).
#[derive(Debug, PartialEq, Eq)]
pub struct RoleChange {
    pub user: uuid::Uuid,
    pub role: &'static str,
    pub reason: Option<String>,
}

impl RoleChange {
    pub fn parse(user: &str, role: &str, reason: Option<&str>) -> Result<RoleChange> {
        let Ok(user) = uuid::Uuid::parse_str(user) else {
            return fail(format!("'{user}' is not a user id (expected a UUID)"));
        };
        let Some(role) = ROLES.iter().copied().find(|r| *r == role) else {
            return fail(format!(
                "'{role}' is not a role (expected fan, creator or admin)"
            ));
        };
        if reason.is_some_and(|r| r.chars().count() > 500) {
            return fail("--reason is limited to 500 characters");
        }
        Ok(RoleChange {
            user,
            role,
            reason: reason.map(str::to_owned),
        })
    }
}

pub async fn set_role(change: RoleChange) -> Result<ExitCode> {
    let url = database_url()?;
    let pool = crate::migrate::connect(&url).await?;
    let operator = operator_name();
    let result = apply_role(
        &pool,
        change.user,
        change.role,
        &operator,
        change.reason.as_deref(),
    )
    .await;
    pool.close().await;
    let previous = result?;
    if previous == change.role {
        println!(
            "user {}: already {} (nothing changed)",
            change.user, change.role
        );
    } else {
        println!("user {}: {previous} → {}", change.user, change.role);
    }
    Ok(ExitCode::SUCCESS)
}

/// A validated `users grant` (checked before touching the database, with
/// the bounds `app.apply_token_grant` enforces again).
#[derive(Debug, PartialEq, Eq)]
pub struct GrantRequest {
    pub user: uuid::Uuid,
    pub amount: stagepass_ledger::TokenAmount,
    pub reason: String,
}

impl GrantRequest {
    pub fn parse(user: &str, tokens: &str, reason: Option<&str>) -> Result<GrantRequest> {
        use stagepass_ledger::grants::{MAX_GRANT, MIN_GRANT, valid_reason};
        let Ok(user) = uuid::Uuid::parse_str(user) else {
            return fail(format!("'{user}' is not a user id (expected a UUID)"));
        };
        let amount = tokens
            .parse::<i64>()
            .ok()
            .and_then(|n| stagepass_ledger::TokenAmount::parse(n, MIN_GRANT, MAX_GRANT).ok());
        let Some(amount) = amount else {
            return fail(format!(
                "'{tokens}' is not a grant: {MIN_GRANT}-{MAX_GRANT} whole tokens"
            ));
        };
        let Some(reason) = reason.filter(|r| valid_reason(r)) else {
            return fail("--reason is required: 1-500 characters, no control characters");
        };
        Ok(GrantRequest {
            user,
            amount,
            reason: reason.to_owned(),
        })
    }
}

/// Grants as the operator through `app.apply_token_grant` (owner only: it
/// mints tokens), audited as `operator:$USER`.
pub async fn grant(request: GrantRequest) -> Result<ExitCode> {
    let url = std::env::var("DATABASE_ADMIN_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .ok_or("set DATABASE_ADMIN_URL (the database owner): only the owner may grant tokens")?;
    let pool = crate::migrate::connect(&url).await?;
    let granted = async {
        let mut conn = pool.acquire().await.context("connecting")?;
        stagepass_ledger::grants::operator_grant(
            &mut conn,
            uuid::Uuid::now_v7().into(),
            request.user.into(),
            request.amount,
            &request.reason,
            &operator_name(),
        )
        .await
        .map_err(|e| match e {
            stagepass_ledger::LedgerError::UnknownUser => {
                format!("user {} was not found", request.user).into()
            }
            other => crate::error::BoxError::from(format!("granting tokens: {other}")),
        })
    }
    .await;
    pool.close().await;
    let g = granted?;
    println!(
        "user {}: +{} tokens (journal {}, grant {}); balance {}",
        g.user_id, g.amount, g.journal_id, g.grant_id, g.balance
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn operator_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "cli".to_owned())
}

/// `DATABASE_URL` (the app login may become the service role), else
/// `DATABASE_ADMIN_URL`.
pub(crate) fn database_url() -> Result<String> {
    ["DATABASE_URL", "DATABASE_ADMIN_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()))
        .ok_or_else(|| "set DATABASE_URL (or DATABASE_ADMIN_URL) to the database to change".into())
}

/// Runs `app.operator_set_role` in its own transaction as the service role;
/// returns the previous role. Also used by the dev server for its demo users.
pub async fn apply_role(
    pool: &PgPool,
    user: uuid::Uuid,
    role: &str,
    operator: &str,
    reason: Option<&str>,
) -> Result<String> {
    let mut tx = db::begin_service(pool)
        .await
        .context("starting a transaction as the service role")?;
    let previous: String = sqlx::query_scalar("select app.operator_set_role($1::uuid, $2, $3, $4)")
        .bind(user)
        .bind(role)
        .bind(operator)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| explain(&e, user, role))?;
    tx.commit().await.context("committing the role change")?;
    Ok(previous)
}

/// The SQLSTATEs `app.apply_role_change` raises, in the operator's words.
fn explain(e: &sqlx::Error, user: uuid::Uuid, role: &str) -> crate::error::BoxError {
    match db::sqlstate(e).as_deref() {
        Some("P0001") => format!(
            "user {user} is the last admin; make another user admin before changing this one"
        )
        .into(),
        Some("P0002") => format!("user {user} was not found").into(),
        Some("22023") => format!("'{role}' is not a valid role").into(),
        Some("42883") | Some("3F000") => {
            "app.operator_set_role does not exist: run `stagepass migrate` first".into()
        }
        _ => format!("changing the role: {e}").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_before_touching_the_database() {
        let id = "6f1c1c53-5c55-4b8e-9a57-6cc2a8c6f0a1";
        let ok = RoleChange::parse(id, "creator", Some("launch")).expect("valid");
        assert_eq!(ok.role, "creator");
        assert_eq!(ok.reason.as_deref(), Some("launch"));
        assert!(RoleChange::parse("not-a-uuid", "fan", None).is_err());
        assert!(RoleChange::parse(id, "superuser", None).is_err());
        assert!(RoleChange::parse(id, "fan", Some(&"x".repeat(501))).is_err());
    }

    #[test]
    fn grants_are_validated_before_touching_the_database() {
        let id = "6f1c1c53-5c55-4b8e-9a57-6cc2a8c6f0a1";
        let ok = GrantRequest::parse(id, "500", Some("support case 42")).expect("valid");
        assert_eq!(ok.amount.get(), 500);
        assert!(GrantRequest::parse("nope", "500", Some("r")).is_err());
        for bad in ["0", "-1", "10001", "1.5", "lots"] {
            assert!(GrantRequest::parse(id, bad, Some("r")).is_err(), "{bad}");
        }
        assert!(
            GrantRequest::parse(id, "5", None).is_err(),
            "reason required"
        );
        assert!(GrantRequest::parse(id, "5", Some(" ")).is_err());
        assert!(GrantRequest::parse(id, "5", Some("a\0b")).is_err());
    }

    /// With the app login's URL, as an operator on a deployment would run it
    /// (through PgBouncer in transaction mode under scripts/ci/pgbouncer.sh).
    #[tokio::test(flavor = "multi_thread")]
    async fn sets_a_role_with_the_functions_database_url() {
        let db = stagepass_platform::testing::TestDb::new().await;
        let pool = crate::migrate::connect(&db.app_url())
            .await
            .expect("connect");
        let user = uuid::Uuid::new_v4();
        for _ in 0..3 {
            apply_role(&pool, user, "creator", "cli-test", Some("launch"))
                .await
                .expect("set role");
        }
        let role: String = sqlx::query_scalar("select role::text from app.users where id = $1")
            .bind(user)
            .fetch_one(&db.admin_pool)
            .await
            .expect("role");
        assert_eq!(role, "creator");
        pool.close().await;
    }
}
