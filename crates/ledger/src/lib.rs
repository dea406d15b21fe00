//! The token ledger's typed door. See README.md.

pub mod audit;
pub mod calls;
pub mod classes;
pub mod grants;
mod ids;
pub mod packages;
pub mod payouts;
pub mod purchases;
pub mod sqlstate;
pub mod status;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

pub use ids::{CallId, ClassId, EnrollmentId, GrantId, PurchaseId, TipId, UserId};

/// The smallest and largest tip, in tokens. `app.tip` refuses others with
/// SQLSTATE SP010 (a test checks its bounds equal these); the API's
/// validation and the OpenAPI document read them from here.
pub const MIN_TIP: i64 = 1;
pub const MAX_TIP: i64 = 10_000;

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

/// An amount of money in US cents (what a card is charged or refunded) —
/// never tokens: a [`TokenAmount`] cannot be passed where this is asked for.
///
/// ```compile_fail
/// # use stagepass_ledger::TokenAmount;
/// # async fn f(conn: &mut sqlx::PgConnection, tokens: TokenAmount) {
/// let _ = stagepass_ledger::purchases::credit(conn, "pi_1", tokens).await;
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cents(i64);

impl Cents {
    pub const fn new(cents: i64) -> Cents {
        Cents(cents)
    }

    pub const fn get(self) -> i64 {
        self.0
    }
}

/// Every reason the ledger refuses an operation, in the order they are
/// checked. The routes map each to one HTTP status and one problem `code`
/// (`stagepass_routes::problems`); this crate knows nothing of HTTP.
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
        use sqlstate::Refusal;
        let Some(raised) = sqlstate::raised(&e) else {
            // The balance-sign constraint is the database's last word on
            // overdrafts: reaching it means a check above was missed.
            let sign = sqlstate::postgres(&e).is_some_and(|pg| {
                pg.code() == sqlstate::CHECK_VIOLATION
                    && pg.constraint() == Some("accounts_balance_sign")
            });
            return if sign {
                LedgerError::InsufficientFunds { balance: 0 }
            } else {
                LedgerError::Db(e)
            };
        };
        let number = |s: &str| s.trim().parse::<i64>().ok();
        let refused = match raised.refusal {
            // `no wallet` (a user who never held tokens) has no DETAIL.
            Refusal::InsufficientFunds if raised.detail.is_empty() => {
                Some(LedgerError::InsufficientFunds { balance: 0 })
            }
            Refusal::InsufficientFunds => {
                number(raised.detail).map(|balance| LedgerError::InsufficientFunds { balance })
            }
            Refusal::AlreadyApplied => Some(LedgerError::AlreadyApplied),
            Refusal::InDebt => number(raised.detail).map(|owed| LedgerError::InDebt { owed }),
            Refusal::DailyLimitExceeded => serde_json::from_str::<serde_json::Value>(raised.detail)
                .ok()
                .and_then(|v| {
                    Some(LedgerError::DailyLimitExceeded {
                        limit: v["limit"].as_i64()?,
                        spent: v["spent"].as_i64()?,
                    })
                }),
            Refusal::TipAmountOutOfRange => Some(LedgerError::AmountOutOfRange {
                min: MIN_TIP,
                max: MAX_TIP,
            }),
            Refusal::SelfTip => Some(LedgerError::SelfTip),
            Refusal::RecipientNotCreator => Some(LedgerError::RecipientNotCreator),
            Refusal::GrantAmountOutOfRange => Some(LedgerError::AmountOutOfRange {
                min: grants::MIN_GRANT,
                max: grants::MAX_GRANT,
            }),
            Refusal::InvalidGrantReason => Some(LedgerError::InvalidReason),
            Refusal::SelfGrant => Some(LedgerError::SelfGrant),
            Refusal::AdminRequired => Some(LedgerError::AdminRequired),
            Refusal::UnknownUser => Some(LedgerError::UnknownUser),
            Refusal::Invariant => Some(LedgerError::Invariant(raised.message.to_owned())),
            // Refusals of the class and purchase functions reach here only
            // through a caller that does not expect them: unexpected.
            _ => None,
        };
        // A refusal whose DETAIL does not parse broke the contract between
        // the migration and this crate: an error, never a made-up number.
        refused.unwrap_or(LedgerError::Db(e))
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
    tip_id: TipId,
    recipient: UserId,
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
        tip_id: tip_id.get(),
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

/// The caller's entries, newest first, before the entry id `before`, in one
/// statement as the caller (`claims`, the verified token's claims as
/// `request.jwt.claims` holds them): `app.read_entries` sets the claims and
/// the `authenticated` role for its own transaction, then reads under RLS
/// (ADR 0020). Run it on the pool, outside any transaction.
pub async fn read_entries<'e>(
    db: impl sqlx::PgExecutor<'e>,
    claims: &str,
    before: Option<i64>,
    limit: i32,
) -> Result<Vec<Entry>, LedgerError> {
    Ok(
        sqlx::query_as::<_, Entry>("select * from app.read_entries($1, $2, $3)")
            .bind(claims)
            .bind(before)
            .bind(limit)
            .fetch_all(db)
            .await?,
    )
}
