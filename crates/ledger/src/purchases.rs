//! Token purchases as the ledger sees them: starting one (the caller's
//! transaction), and the service path's credit, failure and claw-back driven
//! by Stripe (webhooks, reconciliation). Every function here is idempotent
//! by construction: the journal reference makes a second credit or the
//! same claw-back a no-op.

use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Cents, LedgerError, PurchaseId, UserId};

crate::text_enum! {
    /// `app.purchases.status` (check `purchases_status_check`).
    pub enum PurchaseStatus {
        /// Created; Stripe has not reported the payment yet.
        Pending = "pending",
        /// Paid; the tokens are credited.
        Succeeded = "succeeded",
        /// The payment failed.
        Failed = "failed",
        /// The PaymentIntent was canceled (Stripe's spelling).
        Canceled = "canceled",
        /// Refunded in full; the tokens were clawed back.
        Refunded = "refunded",
        /// Disputed (a chargeback); the tokens were clawed back.
        Disputed = "disputed",
    }
}

/// The caller's purchase as `app.begin_purchase` found or created it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PurchaseStart {
    pub id: PurchaseId,
    pub tokens: i64,
    pub price_cents: i64,
    pub payment_intent_id: Option<String>,
    pub client_secret: Option<String>,
    pub status: PurchaseStatus,
    /// Another request is creating this purchase's PaymentIntent right now.
    pub busy: bool,
}

/// The purchase id for (user, Idempotency-Key): a retry finds the same row
/// and Stripe sees the same idempotency key.
pub fn purchase_id(user: UserId, idempotency_key: &str) -> PurchaseId {
    const NAMESPACE: Uuid = Uuid::from_u128(0x5f6a_7c1e_2b4d_4e8f_9a0b_1c2d_3e4f_5a6b);
    PurchaseId::new(Uuid::new_v5(
        &NAMESPACE,
        format!("{user}/{idempotency_key}").as_bytes(),
    ))
}

/// Starts (or finds) the caller's purchase of `package`.
pub async fn begin(
    conn: &mut PgConnection,
    id: PurchaseId,
    package: &str,
) -> Result<PurchaseStart, PurchaseError> {
    Ok(
        sqlx::query_as::<_, PurchaseStart>("select * from app.begin_purchase($1, $2)")
            .bind(id)
            .bind(package)
            .fetch_one(conn)
            .await?,
    )
}

/// The caller's Stripe call for purchase `id` failed: gives its in-flight
/// claim back, so a retry need not wait for the lease to run out.
pub async fn release_claim(conn: &mut PgConnection, id: PurchaseId) -> Result<(), PurchaseError> {
    sqlx::query("select app.release_purchase_claim($1)")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn attach_payment_intent(
    conn: &mut PgConnection,
    id: PurchaseId,
    payment_intent: &str,
    client_secret: Option<&str>,
) -> Result<(), PurchaseError> {
    sqlx::query("select app.attach_payment_intent($1, $2, $3)")
        .bind(id)
        .bind(payment_intent)
        .bind(client_secret)
        .execute(conn)
        .await?;
    Ok(())
}

/// What crediting a PaymentIntent did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CreditOutcome {
    Credited,
    AlreadyCredited,
    /// Refunded, disputed or canceled before the success arrived.
    NotCreditable,
    /// No purchase of ours has this PaymentIntent.
    Unknown,
}

impl CreditOutcome {
    /// The wire name (as serialised; also `app.credit_purchase`'s answer).
    pub fn as_str(self) -> &'static str {
        match self {
            CreditOutcome::Credited => "credited",
            CreditOutcome::AlreadyCredited => "already_credited",
            CreditOutcome::NotCreditable => "not_creditable",
            CreditOutcome::Unknown => "unknown",
        }
    }
}

/// Service path: credits a succeeded PaymentIntent exactly once.
pub async fn credit(
    conn: &mut PgConnection,
    payment_intent: &str,
    amount: Cents,
) -> Result<CreditOutcome, PurchaseError> {
    let outcome: String = sqlx::query_scalar("select app.credit_purchase($1, $2)")
        .bind(payment_intent)
        .bind(amount.get())
        .fetch_one(conn)
        .await?;
    [
        CreditOutcome::Credited,
        CreditOutcome::AlreadyCredited,
        CreditOutcome::NotCreditable,
        CreditOutcome::Unknown,
    ]
    .into_iter()
    .find(|o| o.as_str() == outcome)
    .ok_or_else(|| {
        PurchaseError::Ledger(LedgerError::Invariant(format!(
            "app.credit_purchase answered {outcome:?}"
        )))
    })
}

/// Service path: a PaymentIntent failed or was canceled.
pub async fn fail(
    conn: &mut PgConnection,
    payment_intent: &str,
    canceled: bool,
) -> Result<(), PurchaseError> {
    sqlx::query("select app.fail_purchase($1, $2)")
        .bind(payment_intent)
        .bind(if canceled {
            PurchaseStatus::Canceled
        } else {
            PurchaseStatus::Failed
        })
        .execute(conn)
        .await?;
    Ok(())
}

/// Why tokens are taken back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClawBack {
    /// The charge's cumulative refunded amount, in cents.
    Refund {
        amount_refunded: Cents,
    },
    Dispute,
}

/// Service path: claws back tokens after a refund or dispute (into debt if
/// they were spent). `reference` names the refund state or the dispute.
/// Returns the tokens taken back by this call.
pub async fn claw_back(
    conn: &mut PgConnection,
    payment_intent: &str,
    reason: ClawBack,
    reference: &str,
) -> Result<i64, PurchaseError> {
    let (kind, refunded) = match reason {
        ClawBack::Refund { amount_refunded } => ("refund", amount_refunded.get()),
        ClawBack::Dispute => ("dispute", 0),
    };
    let taken: Result<i64, PurchaseError> =
        sqlx::query_scalar("select app.claw_back_purchase($1, $2, $3, $4)")
            .bind(payment_intent)
            .bind(kind)
            .bind(reference)
            .bind(refunded)
            .fetch_one(conn)
            .await
            .map_err(PurchaseError::from);
    match taken {
        // The same refund state or dispute delivered again.
        Err(PurchaseError::Ledger(LedgerError::AlreadyApplied)) => Ok(0),
        other => other,
    }
}

/// Service path: pending purchases older than `older_than_seconds`.
pub async fn stale_pending(
    conn: &mut PgConnection,
    older_than_seconds: i64,
    limit: i32,
) -> Result<Vec<(PurchaseId, String)>, PurchaseError> {
    Ok(sqlx::query_as(
        "select id, payment_intent_id from app.stale_pending_purchases(make_interval(secs => $1), $2)",
    )
    .bind(f64::from(i32::try_from(older_than_seconds).unwrap_or(i32::MAX)))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

#[derive(Debug, thiserror::Error)]
pub enum PurchaseError {
    #[error("unknown package")]
    UnknownPackage,
    #[error("this Idempotency-Key belongs to a different purchase")]
    KeyConflict,
    #[error("the amount paid does not match the package price")]
    AmountMismatch,
    #[error(transparent)]
    Ledger(LedgerError),
}

impl From<sqlx::Error> for PurchaseError {
    fn from(e: sqlx::Error) -> Self {
        use crate::sqlstate::{self, Refusal};
        match sqlstate::raised(&e).map(|r| r.refusal) {
            Some(Refusal::UnknownPackage) => PurchaseError::UnknownPackage,
            Some(Refusal::PurchaseKeyConflict) => PurchaseError::KeyConflict,
            Some(Refusal::PurchaseAmountMismatch) => PurchaseError::AmountMismatch,
            _ => PurchaseError::Ledger(LedgerError::from(e)),
        }
    }
}
