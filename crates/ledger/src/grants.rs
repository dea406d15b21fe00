//! Promotional grants: tokens given by an admin (or the operator) for a
//! stated reason, as one balanced journal `('promotion', grant id)` from the
//! `promotions` account into the user's wallet, and one row of the
//! append-only `app.token_grants` (who, when, whom, how much, why) — both in
//! `app.apply_token_grant`, in the caller's transaction.
//!
//! The checks are SQL's (SQLSTATEs SP050–SP054, see the migration); the
//! bounds are repeated here so a handler can refuse bad input before it
//! opens a transaction.

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{GrantId, LedgerError, TokenAmount, UserId};

/// The smallest and largest grant, in tokens (`app.apply_token_grant`).
pub const MIN_GRANT: i64 = 1;
pub const MAX_GRANT: i64 = 10_000;
/// A reason is 1–500 characters (after trimming), no control characters.
pub const MAX_REASON_CHARS: usize = 500;

/// A grant's reason, checked like the database checks it.
pub fn valid_reason(reason: &str) -> bool {
    let trimmed = reason.trim();
    !trimmed.is_empty()
        && reason.chars().count() <= MAX_REASON_CHARS
        && !reason.chars().any(char::is_control)
}

/// The outcome of a grant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Grant {
    pub grant_id: Uuid,
    pub journal_id: Uuid,
    /// Who received the tokens.
    pub user_id: Uuid,
    pub amount: i64,
    /// The recipient's wallet balance after the grant.
    pub balance: i64,
}

/// A grant by the caller of the transaction (`auth.uid()`), who must be an
/// admin in the database (`app.admin_grant_tokens`).
pub async fn admin_grant(
    conn: &mut PgConnection,
    grant_id: GrantId,
    user: UserId,
    amount: TokenAmount,
    reason: &str,
) -> Result<Grant, LedgerError> {
    let (journal_id, balance): (Uuid, i64) =
        sqlx::query_as("select journal_id, balance from app.admin_grant_tokens($1, $2, $3, $4)")
            .bind(grant_id)
            .bind(user)
            .bind(amount.get())
            .bind(reason)
            .fetch_one(conn)
            .await?;
    Ok(Grant {
        grant_id: grant_id.get(),
        journal_id,
        user_id: user.get(),
        amount: amount.get(),
        balance,
    })
}

/// A grant by the operator (the database owner's connection: the CLI,
/// `stagepass dev`), recorded as `operator:<operator>`. Same function, same
/// checks, same audit row as an admin's.
pub async fn operator_grant(
    conn: &mut PgConnection,
    grant_id: GrantId,
    user: UserId,
    amount: TokenAmount,
    reason: &str,
    operator: &str,
) -> Result<Grant, LedgerError> {
    let (journal_id, balance): (Uuid, i64) = sqlx::query_as(
        "select journal_id, balance from app.apply_token_grant($1, $2, $3, $4, null, $5)",
    )
    .bind(grant_id)
    .bind(user)
    .bind(amount.get())
    .bind(reason)
    .bind(format!("operator:{operator}"))
    .fetch_one(conn)
    .await?;
    Ok(Grant {
        grant_id: grant_id.get(),
        journal_id,
        user_id: user.get(),
        amount: amount.get(),
        balance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_one_line_of_at_most_500_characters() {
        assert!(valid_reason("welcome bonus"));
        assert!(valid_reason(&"é".repeat(500)));
        assert!(!valid_reason(&"é".repeat(501)));
        assert!(!valid_reason("   "));
        assert!(!valid_reason(""));
        assert!(!valid_reason("nul\0byte"));
        assert!(!valid_reason("two\nlines"));
        assert!(!valid_reason("bell\u{7}"));
        assert!(!valid_reason("c1\u{85}control"));
    }
}
