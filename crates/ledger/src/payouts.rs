//! Creator payouts as the ledger sees them (issue 12, ADR 0019,
//! docs/PAYOUTS.md): a creator's earnings that were not paid yet, frozen
//! into an immutable statement per cycle, held in payout clearing, and
//! retired when the Stripe transfer is recorded. The rules (cycles, the
//! payable amount, the statement, holds and releases, reversals) are SQL in
//! `migrations/*_payouts.sql`; this module is their typed door. User
//! functions read the caller from the verified claims (`auth.uid()`).

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Cents, LedgerError, UserId};

/// SPEC: 1 token = 5 US cents (`payout_config_cents`; a test checks).
pub const CENTS_PER_TOKEN: i64 = 5;
/// SPEC §2: payouts start at 1,000 tokens ($50).
pub const MINIMUM_TOKENS: i64 = 1_000;

/// What `tokens` are worth in a payout, in US cents: never dollars.
///
/// ```
/// use stagepass_ledger::payouts::cents_for;
/// assert_eq!(cents_for(1_000).map(|c| c.get()), Some(5_000));
/// ```
pub fn cents_for(tokens: i64) -> Option<Cents> {
    tokens.checked_mul(CENTS_PER_TOKEN).map(Cents::new)
}

crate::text_enum! {
    /// `app.payouts.status` (check `payouts_status_check`).
    pub enum PayoutStatus {
        /// Frozen: the tokens are in payout clearing; the transfer is being
        /// created (or its answer was not seen yet).
        Held = "held",
        /// The Stripe transfer exists and is recorded; the tokens are retired.
        Sent = "sent",
        /// Stripe refused the transfer; the tokens are back in the wallet
        /// until the next retry (daily, for 7 days).
        Released = "released",
        /// Retries ran out, or the tokens were spent meanwhile; nothing left.
        Abandoned = "abandoned",
        /// The transfer was reversed in full; the tokens were re-credited.
        Reversed = "reversed",
    }
}

crate::text_enum! {
    /// `app.connect_accounts.transfers` (check `connect_accounts_transfers_check`):
    /// the Stripe `transfers` capability, as Stripe's events last said.
    pub enum TransfersCapability {
        /// Payouts can be sent.
        Active = "active",
        Inactive = "inactive",
        Pending = "pending",
        /// A status this code does not know (treated as not active).
        Unknown = "unknown",
    }
}

/// Every reason a payout operation is refused (SQLSTATEs SP090–SP095).
#[derive(Debug, thiserror::Error)]
pub enum PayoutError {
    #[error("only creators are paid out")]
    NotCreator,
    #[error("{0}")]
    BelowMinimum(String),
    #[error("payout not found")]
    NotFound,
    #[error("another delivery of this payout is running")]
    Busy,
    #[error("only an admin may hold or release payouts")]
    AdminRequired,
    #[error("no such creator")]
    UnknownCreator,
    #[error(transparent)]
    Ledger(LedgerError),
}

impl From<sqlx::Error> for PayoutError {
    fn from(e: sqlx::Error) -> Self {
        use crate::sqlstate::{self, Refusal};
        let Some(raised) = sqlstate::raised(&e) else {
            return PayoutError::Ledger(LedgerError::from(e));
        };
        match raised.refusal {
            Refusal::PayoutsCreatorRequired => PayoutError::NotCreator,
            Refusal::BelowPayoutMinimum => PayoutError::BelowMinimum(raised.message.to_owned()),
            Refusal::PayoutNotFound => PayoutError::NotFound,
            Refusal::PayoutBusy => PayoutError::Busy,
            Refusal::PayoutAdminRequired => PayoutError::AdminRequired,
            Refusal::UnknownCreator => PayoutError::UnknownCreator,
            _ => PayoutError::Ledger(LedgerError::from(e)),
        }
    }
}

/// A creator's payout account (`app.connect_accounts`), as the creator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PayoutAccount {
    pub stripe_account_id: String,
    /// Onboarding submitted.
    pub details_submitted: bool,
    /// The `transfers` capability: payouts are sent only while `active`.
    pub transfers: TransfersCapability,
    /// What Stripe needs now, and what is overdue (field names).
    pub currently_due: Vec<String>,
    pub past_due: Vec<String>,
    pub eventually_due: Vec<String>,
    pub current_deadline: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    /// What Stripe will need later (`future_requirements.currently_due`).
    pub future_currently_due: Vec<String>,
    /// Whether Stripe pays the account's balance out to its bank.
    pub payouts_enabled: bool,
    /// The last bank payout Stripe reported: `paid`, `failed`, `canceled`.
    pub bank_payout_status: Option<String>,
    pub bank_payout_failure: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// The caller's payout picture.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PayoutSummary {
    /// Earned and not paid, capped by the wallet net of debt (tokens).
    pub payable_tokens: i64,
    pub minimum_tokens: i64,
    pub cents_per_token: i32,
    /// The cycle an opt-in made now counts for (the 1st or the 15th).
    pub next_cycle: NaiveDate,
    /// An admin holds this creator's payouts.
    pub held: bool,
    /// The open opt-in, if any, its cycle, and why the last run skipped it.
    pub open_request: Option<Uuid>,
    pub open_request_cycle: Option<NaiveDate>,
    pub skipped_reason: Option<String>,
}

/// An opt-in ("pay me in the next cycle").
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PayoutRequest {
    pub id: Uuid,
    /// The first cycle it counts for.
    pub cycle: NaiveDate,
    pub requested_at: DateTime<Utc>,
    /// False when an open request already existed and is returned instead.
    pub created: bool,
    /// What could be paid right now (tokens).
    pub payable_tokens: i64,
}

/// A payout and its statement (`app.payouts`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Payout {
    pub id: Uuid,
    pub creator_id: Uuid,
    /// The cycle day (the 1st or the 15th).
    pub cycle: NaiveDate,
    /// The period's earnings: [period_start, period_end), UTC.
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub stripe_account_id: String,
    /// The period's earnings by source (tokens).
    pub period_tips: i64,
    pub period_classes: i64,
    pub period_calls: i64,
    /// Earned before the period and not paid until now (tokens).
    pub carried_over: i64,
    /// Everything earned before the period end, and what was paid of it
    /// before this payout (tokens).
    pub earned_total: i64,
    pub paid_before: i64,
    /// The wallet net of debt when the statement was frozen (tokens).
    pub wallet_available: i64,
    /// What this payout pays: tokens, and cents (tokens × 5).
    pub tokens: i64,
    pub cents_per_token: i32,
    pub amount_cents: i64,
    pub frozen_at: DateTime<Utc>,
    pub status: PayoutStatus,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub give_up_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Stripe's transfer (`tr_…`) once recorded.
    pub transfer_id: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub reversed_cents: i64,
    pub reversed_tokens: i64,
    pub updated_at: DateTime<Utc>,
}

/// The columns of [`Payout`], for `concat!` (static SQL, no formatting).
macro_rules! payout_columns {
    () => {
        "id, creator_id, cycle, period_start, period_end, stripe_account_id, \
         period_tips, period_classes, period_calls, carried_over, earned_total, paid_before, \
         wallet_available, tokens, cents_per_token, amount_cents, frozen_at, status, attempts, \
         next_attempt_at, give_up_at, last_error, transfer_id, sent_at, reversed_cents, \
         reversed_tokens, updated_at"
    };
}

/// One earning of a period (the CSV export).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Earning {
    pub earned_at: DateTime<Utc>,
    /// `tip`, `class` or `call`.
    pub source: String,
    /// The ledger journal's reference (tip id, class id, `call:minute`).
    pub reference: String,
    pub tokens: i64,
    pub cents: i64,
}

/// The caller's Stripe account id, if they have one (creators only).
pub async fn my_account_id(conn: &mut PgConnection) -> Result<Option<String>, PayoutError> {
    Ok(sqlx::query_scalar("select app.my_connect_account()")
        .fetch_one(conn)
        .await?)
}

/// Records the account Stripe created for the caller; returns the stored
/// id (an account recorded first by a concurrent onboarding wins).
pub async fn record_account(
    conn: &mut PgConnection,
    stripe_account_id: &str,
    livemode: bool,
) -> Result<String, PayoutError> {
    Ok(
        sqlx::query_scalar("select app.record_connect_account($1, $2)")
            .bind(stripe_account_id)
            .bind(livemode)
            .fetch_one(conn)
            .await?,
    )
}

/// The caller's payout account, if any.
pub async fn my_account(conn: &mut PgConnection) -> Result<Option<PayoutAccount>, PayoutError> {
    Ok(sqlx::query_as::<_, PayoutAccount>(
        "select stripe_account_id, details_submitted, transfers, currently_due, past_due, \
                eventually_due, current_deadline, disabled_reason, future_currently_due, \
                payouts_enabled, bank_payout_status, bank_payout_failure, updated_at \
           from app.connect_accounts where creator_id = auth.uid()",
    )
    .fetch_optional(conn)
    .await?)
}

/// The caller's payable amount, next cycle, hold and open opt-in.
pub async fn summary(conn: &mut PgConnection) -> Result<PayoutSummary, PayoutError> {
    Ok(
        sqlx::query_as::<_, PayoutSummary>("select * from app.my_payout_summary()")
            .fetch_one(conn)
            .await?,
    )
}

/// The caller opts in for the next cycle (or gets their open opt-in back).
pub async fn request(conn: &mut PgConnection, id: Uuid) -> Result<PayoutRequest, PayoutError> {
    Ok(
        sqlx::query_as::<_, PayoutRequest>("select * from app.request_payout($1)")
            .bind(id)
            .fetch_one(conn)
            .await?,
    )
}

/// The caller's payouts, newest cycle first.
pub async fn mine(conn: &mut PgConnection, limit: i64) -> Result<Vec<Payout>, PayoutError> {
    Ok(sqlx::query_as::<_, Payout>(concat!(
        "select ",
        payout_columns!(),
        " from app.payouts where creator_id = auth.uid() order by cycle desc limit $1"
    ))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// One payout: the caller's own (RLS), or any (the service role).
pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Payout, PayoutError> {
    sqlx::query_as::<_, Payout>(concat!(
        "select ",
        payout_columns!(),
        " from app.payouts where id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or(PayoutError::NotFound)
}

/// The period's earnings of one of the caller's payouts, entry by entry.
pub async fn earnings(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Earning>, PayoutError> {
    Ok(
        sqlx::query_as::<_, Earning>("select * from app.payout_earnings($1)")
            .bind(id)
            .fetch_all(conn)
            .await?,
    )
}

/// An admin holds (`hold`) or releases a creator's payouts, with a reason
/// (logged). Returns whether anything changed.
pub async fn set_hold(
    conn: &mut PgConnection,
    creator: UserId,
    hold: bool,
    reason: &str,
) -> Result<bool, PayoutError> {
    Ok(sqlx::query_scalar("select app.set_payout_hold($1, $2, $3)")
        .bind(creator)
        .bind(hold)
        .bind(reason)
        .fetch_one(conn)
        .await?)
}

/// What the run did with one opt-in.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Frozen {
    pub request_id: Uuid,
    pub creator_id: Uuid,
    pub payout_id: Option<Uuid>,
    /// `frozen`, or why not: `no_account`, `transfers_inactive`, `held`,
    /// `below_minimum`, `platform_funds`, `already_paid_this_cycle`.
    pub outcome: String,
}

/// Service path (the payout run): freezes statements and holds tokens for
/// up to `limit` opt-ins due in the running cycle, within `budget` cents
/// (the platform's available balance less what is in flight; `None`: no
/// limit), and queues their transfer jobs. Nothing when no cycle runs.
pub async fn freeze(
    conn: &mut PgConnection,
    limit: i32,
    budget: Option<Cents>,
) -> Result<Vec<Frozen>, PayoutError> {
    Ok(
        sqlx::query_as::<_, Frozen>("select * from app.freeze_payouts($1, $2)")
            .bind(limit)
            .bind(budget.map(Cents::get))
            .fetch_all(conn)
            .await?,
    )
}

/// Cents of payouts frozen but not sent yet (held in clearing): what the
/// platform balance must still cover.
pub async fn in_flight(conn: &mut PgConnection) -> Result<Cents, PayoutError> {
    let cents: i64 = sqlx::query_scalar(
        "select coalesce(sum(amount_cents), 0)::bigint from app.payouts where status = 'held'",
    )
    .fetch_one(conn)
    .await?;
    Ok(Cents::new(cents))
}

/// What a transfer attempt should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptAction {
    /// Create the transfer (same idempotency key as any earlier attempt).
    Send,
    /// The first attempt is older than Stripe's idempotency window: look
    /// the transfer up first, create it only if Stripe has none.
    LookupThenSend,
    /// Sent, reversed or abandoned already.
    Done,
    /// The next attempt is not due yet.
    NotDue,
    /// Given up just now (retries ran out, or the tokens were spent).
    Abandoned,
}

/// The payout row as `app.begin_payout_attempt` returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct AttemptPayout {
    pub id: Uuid,
    pub creator_id: Uuid,
    pub cycle: NaiveDate,
    pub stripe_account_id: String,
    pub tokens: i64,
    pub amount_cents: i64,
    pub status: PayoutStatus,
    pub attempts: i32,
    pub transfer_id: Option<String>,
}

impl AttemptPayout {
    /// Stripe's idempotency key: the same for every attempt of one
    /// creator's payout in one cycle (issue 12).
    pub fn idempotency_key(&self) -> String {
        format!("payout:{}:{}", self.creator_id, self.cycle)
    }

    /// The transfer group naming this payout at Stripe (the lookup key).
    pub fn transfer_group(&self) -> String {
        format!("payout:{}", self.id)
    }
}

/// Service path, step 1 of a transfer attempt, in its own transaction
/// (commit it before asking Stripe): locks the payout (`Busy` when another
/// delivery holds it), holds the tokens again after a refusal, and records
/// that an attempt started.
pub async fn begin_attempt(
    conn: &mut PgConnection,
    payout: Uuid,
) -> Result<(AttemptAction, AttemptPayout), PayoutError> {
    let (action, row): (String, sqlx::types::Json<AttemptPayout>) =
        sqlx::query_as("select action, payout from app.begin_payout_attempt($1)")
            .bind(payout)
            .fetch_one(conn)
            .await?;
    let action = match action.as_str() {
        "send" => AttemptAction::Send,
        "lookup_then_send" => AttemptAction::LookupThenSend,
        "done" => AttemptAction::Done,
        "not_due" => AttemptAction::NotDue,
        "abandoned" => AttemptAction::Abandoned,
        other => {
            return Err(PayoutError::Ledger(LedgerError::Invariant(format!(
                "unknown payout attempt action {other}"
            ))));
        }
    };
    Ok((action, row.0))
}

/// Service path, step 2 on success: records Stripe's transfer and retires
/// the tokens, in the caller's transaction. False when it was recorded
/// before. A transfer that does not match the statement is refused
/// (invariant).
pub async fn record_sent(
    conn: &mut PgConnection,
    payout: Uuid,
    transfer_id: &str,
    amount: Cents,
    destination: &str,
) -> Result<bool, PayoutError> {
    Ok(
        sqlx::query_scalar("select app.record_payout_sent($1, $2, $3, $4)")
            .bind(payout)
            .bind(transfer_id)
            .bind(amount.get())
            .bind(destination)
            .fetch_one(conn)
            .await?,
    )
}

/// Service path, step 2 on failure: `refused` gives the tokens back until
/// the next retry (a day later); otherwise they stay held and the next
/// attempt is due after `retry_in`. Returns the status after.
pub async fn record_failure(
    conn: &mut PgConnection,
    payout: Uuid,
    refused: bool,
    error: &str,
    retry_in: std::time::Duration,
) -> Result<PayoutStatus, PayoutError> {
    let status: String = sqlx::query_scalar(
        "select app.record_payout_failure($1, $2, $3, make_interval(secs => $4::float8))",
    )
    .bind(payout)
    .bind(refused)
    .bind(error)
    .bind(retry_in.as_secs_f64())
    .fetch_one(conn)
    .await?;
    status.parse().map_err(|e: crate::status::UnknownStatus| {
        PayoutError::Ledger(LedgerError::Invariant(e.to_string()))
    })
}

/// Service path: payouts whose answer was never recorded (held, the last
/// attempt older than `quiet`) or whose retry is due.
pub async fn to_reconcile(
    conn: &mut PgConnection,
    quiet: std::time::Duration,
    limit: i32,
) -> Result<Vec<Payout>, PayoutError> {
    Ok(sqlx::query_as::<_, Payout>(concat!(
        "select ",
        payout_columns!(),
        " from app.payouts_to_reconcile(make_interval(secs => $1::float8), $2)"
    ))
    .bind(quiet.as_secs_f64())
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Service path: queues the transfer job of `payout` again, `after` from
/// now (a new message each time).
pub async fn requeue(
    conn: &mut PgConnection,
    payout: Uuid,
    after: std::time::Duration,
) -> Result<(), PayoutError> {
    sqlx::query("select app.requeue_payout($1, $2)")
        .bind(payout)
        .bind(after.as_secs_f64())
        .execute(conn)
        .await?;
    Ok(())
}

/// Service path (`transfer.reversed`): applies the transfer's cumulative
/// reversed amount once, re-crediting whole tokens. Returns what it did
/// (`reversed:<tokens>`, `stale`, `unknown_transfer`).
pub async fn apply_reversal(
    conn: &mut PgConnection,
    transfer_id: &str,
    amount_reversed: Cents,
) -> Result<String, PayoutError> {
    Ok(
        sqlx::query_scalar("select app.apply_transfer_reversed($1, $2)")
            .bind(transfer_id)
            .bind(amount_reversed.get())
            .fetch_one(conn)
            .await?,
    )
}

/// A connected account's state, from an `account.updated` event.
#[derive(Debug, Clone, Default)]
pub struct AccountState<'a> {
    pub stripe_account_id: &'a str,
    /// The event's `created` (older events than one applied are ignored).
    pub event_created: i64,
    pub details_submitted: bool,
    pub payouts_enabled: bool,
    pub transfers: Option<TransfersCapability>,
    pub currently_due: Vec<String>,
    pub past_due: Vec<String>,
    pub eventually_due: Vec<String>,
    pub current_deadline: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub future_currently_due: Vec<String>,
}

/// Service path: applies an `account.updated` (`applied`, `stale`,
/// `unknown_account`).
pub async fn apply_account(
    conn: &mut PgConnection,
    s: &AccountState<'_>,
) -> Result<String, PayoutError> {
    Ok(sqlx::query_scalar(
        "select app.apply_connect_account($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(s.stripe_account_id)
    .bind(s.event_created)
    .bind(s.details_submitted)
    .bind(s.payouts_enabled)
    .bind(s.transfers.map(TransfersCapability::as_str))
    .bind(&s.currently_due)
    .bind(&s.past_due)
    .bind(&s.eventually_due)
    .bind(s.current_deadline)
    .bind(s.disabled_reason.as_deref())
    .bind(&s.future_currently_due)
    .fetch_one(conn)
    .await?)
}

/// Service path: applies a `capability.updated` of `transfers`.
pub async fn apply_capability(
    conn: &mut PgConnection,
    stripe_account_id: &str,
    event_created: i64,
    status: TransfersCapability,
) -> Result<String, PayoutError> {
    Ok(
        sqlx::query_scalar("select app.apply_connect_capability($1, $2, $3)")
            .bind(stripe_account_id)
            .bind(event_created)
            .bind(status.as_str())
            .fetch_one(conn)
            .await?,
    )
}

/// A bank payout of a connected account, from a `payout.*` event.
#[derive(Debug, Clone)]
pub struct BankPayout<'a> {
    pub stripe_account_id: &'a str,
    pub payout_id: &'a str,
    pub event_created: i64,
    pub status: &'a str,
    pub amount_cents: i64,
    pub currency: &'a str,
    pub failure_code: Option<&'a str>,
    pub arrival: Option<DateTime<Utc>>,
}

/// Service path: records a bank payout's state.
pub async fn apply_bank_payout(
    conn: &mut PgConnection,
    p: &BankPayout<'_>,
) -> Result<String, PayoutError> {
    Ok(
        sqlx::query_scalar("select app.apply_bank_payout($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(p.stripe_account_id)
            .bind(p.payout_id)
            .bind(p.event_created)
            .bind(p.status)
            .bind(p.amount_cents)
            .bind(p.currency)
            .bind(p.failure_code)
            .bind(p.arrival)
            .fetch_one(conn)
            .await?,
    )
}

/// Service path: takes the next slot of the shared pacer `name` (slots
/// `interval` apart, across every instance) if it is at most `max_wait`
/// away; returns how long to wait for it, or `None` (nothing taken).
pub async fn pace(
    conn: &mut PgConnection,
    name: &str,
    interval: std::time::Duration,
    max_wait: std::time::Duration,
) -> Result<Option<std::time::Duration>, PayoutError> {
    let wait: Option<f64> = sqlx::query_scalar("select pacing.take($1, $2, $3)")
        .bind(name)
        .bind(interval.as_secs_f64() * 1000.0)
        .bind(max_wait.as_secs_f64() * 1000.0)
        .fetch_one(conn)
        .await?;
    Ok(wait.map(|ms| std::time::Duration::from_secs_f64(ms.max(0.0) / 1000.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_become_cents_never_dollars() {
        assert_eq!(cents_for(1_000).map(Cents::get), Some(5_000));
        assert_eq!(cents_for(1).map(Cents::get), Some(5));
        assert_eq!(cents_for(i64::MAX), None);
    }

    #[test]
    fn the_idempotency_key_names_creator_and_cycle() {
        let p = AttemptPayout {
            id: Uuid::nil(),
            creator_id: Uuid::from_u128(7),
            cycle: NaiveDate::from_ymd_opt(2026, 12, 15).unwrap_or_default(),
            stripe_account_id: "acct_1".into(),
            tokens: 1_000,
            amount_cents: 5_000,
            status: PayoutStatus::Held,
            attempts: 1,
            transfer_id: None,
        };
        assert_eq!(
            p.idempotency_key(),
            "payout:00000000-0000-0000-0000-000000000007:2026-12-15"
        );
        assert_eq!(
            p.transfer_group(),
            "payout:00000000-0000-0000-0000-000000000000"
        );
    }
}
