//! The token ledger's typed door. See README.md.

pub mod audit;
pub mod classes;
pub mod grants;
pub mod packages;
pub mod purchases;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use sqlx::postgres::PgDatabaseError;
use stagepass_platform::http::ApiError;
use utoipa::ToSchema;
use uuid::Uuid;

/// A whole number of tokens. Never a float; arithmetic is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct TokenAmount(i64);

impl TokenAmount {
    /// Parses an amount that must lie in `min..=max` tokens.
    pub fn parse(raw: i64, min: i64, max: i64) -> Result<TokenAmount, LedgerError> {
        if (min..=max).contains(&raw) {
            Ok(TokenAmount(raw))
        } else {
            Err(LedgerError::AmountOutOfRange { min, max })
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: TokenAmount) -> Option<TokenAmount> {
        self.0.checked_add(other.0).map(TokenAmount)
    }
}

/// Every reason the ledger refuses an operation, in the order they are
/// checked. Each maps to one HTTP status and one problem `code`.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("amount must be between {min} and {max} tokens")]
    AmountOutOfRange { min: i64, max: i64 },
    #[error("you cannot tip yourself")]
    SelfTip,
    #[error("the recipient is not a creator")]
    RecipientNotCreator,
    #[error("your account is in debt by {owed} tokens")]
    InDebt { owed: i64 },
    #[error("insufficient funds: balance {balance}")]
    InsufficientFunds { balance: i64 },
    #[error("daily spending limit of {limit} tokens reached ({spent} spent in the last 24 h)")]
    DailyLimitExceeded { limit: i64, spent: i64 },
    #[error("already applied")]
    AlreadyApplied,
    #[error("a grant needs a reason of 1–500 characters without control characters")]
    InvalidReason,
    #[error("admins cannot grant tokens to themselves")]
    SelfGrant,
    #[error("only an admin may do this")]
    AdminRequired,
    #[error("no such user")]
    UnknownUser,
    #[error("ledger invariant violated: {0}")]
    Invariant(String),
    #[error(transparent)]
    Db(sqlx::Error),
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        let Some(db) = e
            .as_database_error()
            .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
        else {
            return LedgerError::Db(e);
        };
        let detail = db.detail().unwrap_or_default();
        let number = |s: &str| s.trim().parse::<i64>().unwrap_or_default();
        match db.code() {
            "SP001" => LedgerError::InsufficientFunds {
                balance: number(detail),
            },
            "SP002" => LedgerError::AlreadyApplied,
            "SP003" => LedgerError::InDebt {
                owed: number(detail),
            },
            "SP004" => {
                let v: serde_json::Value = serde_json::from_str(detail).unwrap_or_default();
                LedgerError::DailyLimitExceeded {
                    limit: v["limit"].as_i64().unwrap_or_default(),
                    spent: v["spent"].as_i64().unwrap_or_default(),
                }
            }
            "SP010" => LedgerError::AmountOutOfRange {
                min: 1,
                max: 10_000,
            },
            "SP011" => LedgerError::SelfTip,
            "SP050" => LedgerError::AmountOutOfRange {
                min: grants::MIN_GRANT,
                max: grants::MAX_GRANT,
            },
            "SP051" => LedgerError::InvalidReason,
            "SP052" => LedgerError::SelfGrant,
            "SP053" => LedgerError::AdminRequired,
            "SP054" => LedgerError::UnknownUser,
            "SP012" => LedgerError::RecipientNotCreator,
            "SP000" => LedgerError::Invariant(db.message().to_owned()),
            // The balance-sign constraint is the database's last word on
            // overdrafts: reaching it means a check above was missed.
            "23514" if db.constraint() == Some("accounts_balance_sign") => {
                LedgerError::InsufficientFunds { balance: 0 }
            }
            _ => LedgerError::Db(e),
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        let detail = e.to_string();
        match e {
            LedgerError::AmountOutOfRange { .. } => ApiError::field("amount", detail),
            LedgerError::SelfTip => ApiError::Unprocessable("self_tip", detail),
            LedgerError::RecipientNotCreator => {
                ApiError::Unprocessable("recipient_not_creator", detail)
            }
            LedgerError::InDebt { .. } => ApiError::Unprocessable("account_in_debt", detail),
            LedgerError::InsufficientFunds { .. } => {
                ApiError::Unprocessable("insufficient_funds", detail)
            }
            LedgerError::DailyLimitExceeded { .. } => {
                ApiError::Unprocessable("daily_limit_exceeded", detail)
            }
            LedgerError::AlreadyApplied => ApiError::Conflict("already_applied", detail),
            LedgerError::InvalidReason => ApiError::field("reason", detail),
            LedgerError::SelfGrant => ApiError::Unprocessable("self_grant", detail),
            LedgerError::AdminRequired => ApiError::Forbidden("admin_required"),
            LedgerError::UnknownUser => ApiError::NotFound,
            LedgerError::Invariant(m) => ApiError::Internal(m.into()),
            LedgerError::Db(e) => e.into(),
        }
    }
}

/// The outcome of a tip.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Tip {
    pub tip_id: Uuid,
    pub journal_id: Uuid,
    /// The tipper's balance after the tip.
    pub balance: i64,
}

/// A tip from the caller (`auth.uid()` of the transaction) to a creator,
/// through `app.tip`: funds, debt and the daily limit are checked with the
/// caller's wallet locked, in the caller's transaction.
pub async fn tip(
    conn: &mut PgConnection,
    tip_id: Uuid,
    recipient: Uuid,
    amount: TokenAmount,
    message: Option<&str>,
) -> Result<Tip, LedgerError> {
    let (journal_id, balance): (Uuid, i64) =
        sqlx::query_as("select journal_id, balance from app.tip($1, $2, $3, $4)")
            .bind(tip_id)
            .bind(recipient)
            .bind(amount.get())
            .bind(message)
            .fetch_one(conn)
            .await?;
    Ok(Tip {
        tip_id,
        journal_id,
        balance,
    })
}

/// The caller's balance and spending position.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Balance {
    pub balance: i64,
    /// Tokens owed after a refund or chargeback of spent tokens; while > 0
    /// the account cannot spend.
    pub debt: i64,
    pub spent_today: i64,
    pub daily_limit: i64,
    pub trust_level: String,
}

pub async fn my_balance(conn: &mut PgConnection) -> Result<Balance, LedgerError> {
    Ok(
        sqlx::query_as::<_, Balance>("select * from app.my_balance()")
            .fetch_one(conn)
            .await?,
    )
}

/// One ledger entry of the caller's.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Entry {
    pub id: i64,
    pub journal_id: Uuid,
    /// Reason code: purchase, tip, refund, dispute, …
    pub kind: String,
    pub reference: String,
    /// `wallet` or `debt`.
    pub account: String,
    /// Positive: tokens in; negative: tokens out.
    pub amount: i64,
    pub metadata: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
}

/// The caller's entries, newest first, before the entry id `before`.
pub async fn my_entries(
    conn: &mut PgConnection,
    before: Option<i64>,
    limit: i32,
) -> Result<Vec<Entry>, LedgerError> {
    Ok(
        sqlx::query_as::<_, Entry>("select * from app.my_entries($1, $2)")
            .bind(before)
            .bind(limit)
            .fetch_all(conn)
            .await?,
    )
}
