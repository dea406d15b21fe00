//! The ledger invariants of SPEC §2, checked over the whole database. Used
//! by the `ledger-audit` cron and by every money test after each step.

use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;

use crate::LedgerError;

/// What the audit found. Empty vectors and a zero total mean all is well.
#[derive(Debug, Default, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct AuditReport {
    /// Journals whose entries do not sum to zero.
    pub unbalanced_journals: Vec<String>,
    /// Accounts whose balance (row plus pending credits) differs from the
    /// sum of their entries.
    pub drifted_accounts: Vec<String>,
    /// Pending credits that are not their entry's (another account, another
    /// amount, or not a credit): entry ids.
    pub misplaced_pending_credits: Vec<String>,
    /// Wallets, escrows or payout clearing below zero, debt or promotions
    /// above zero.
    pub sign_violations: Vec<String>,
    /// Promotional journals without their `app.token_grants` audit row, or
    /// whose amount differs from it (every grant is audited).
    pub unaudited_grants: Vec<String>,
    /// Hourly spending totals (`ledger.spend_hours`, read by the 24-hour
    /// spending window) that differ from the spending debits they sum,
    /// as `account@hour`, over the last 25 hours.
    pub drifted_spend_hours: Vec<String>,
    /// Payout clearing's balance less the tokens of the payouts held in it
    /// (frozen, transfer not recorded yet); must be 0.
    pub payout_clearing_drift: i64,
    /// Payouts that paid a creator more than they earned (creator ids).
    pub overpaid_creators: Vec<String>,
    /// The sum of every balance (must be 0).
    pub total_balance: i64,
    pub journals_checked: i64,
    pub accounts_checked: i64,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.unbalanced_journals.is_empty()
            && self.drifted_accounts.is_empty()
            && self.misplaced_pending_credits.is_empty()
            && self.sign_violations.is_empty()
            && self.unaudited_grants.is_empty()
            && self.drifted_spend_hours.is_empty()
            && self.payout_clearing_drift == 0
            && self.overpaid_creators.is_empty()
            && self.total_balance == 0
    }
}

/// Runs every check. Needs read access to the `ledger` schema (the service
/// role or a superuser).
pub async fn audit(conn: &mut PgConnection) -> Result<AuditReport, LedgerError> {
    let unbalanced_journals: Vec<String> = sqlx::query_scalar(
        "select journal_id::text from ledger.entries group by journal_id having sum(amount) <> 0 limit 100",
    )
    .fetch_all(&mut *conn)
    .await?;
    let drifted_accounts: Vec<String> = sqlx::query_scalar(
        "select a.id::text from ledger.balances a \
         left join (select account_id, sum(amount) as s from ledger.entries group by account_id) e \
           on e.account_id = a.id \
         where a.balance <> coalesce(e.s, 0) limit 100",
    )
    .fetch_all(&mut *conn)
    .await?;
    // Deferred credits (ADR 0021): each is its own entry, a credit.
    let misplaced_pending_credits: Vec<String> = sqlx::query_scalar(
        "select p.entry_id::text from ledger.pending_credits p \
         left join ledger.entries e on e.id = p.entry_id \
         where e.id is null or e.account_id <> p.account_id or e.amount <> p.amount \
            or p.amount <= 0 limit 100",
    )
    .fetch_all(&mut *conn)
    .await?;
    let sign_violations: Vec<String> = sqlx::query_scalar(
        "select id::text from ledger.balances where \
         (kind in ('wallet', 'escrow', 'payout_clearing', 'platform_revenue') and balance < 0) \
         or (kind in ('debt', 'promotions') and balance > 0) limit 100",
    )
    .fetch_all(&mut *conn)
    .await?;
    // Each promotion journal credits exactly its audit row's amount to the
    // audit row's user, from the promotions account.
    let unaudited_grants: Vec<String> = sqlx::query_scalar(
        "select j.id::text from ledger.journals j \
         left join app.token_grants g on g.journal_id = j.id \
         where j.kind = 'promotion' and (g.id is null or g.id::text <> j.reference \
           or not exists (select 1 from ledger.entries e join ledger.accounts a on a.id = e.account_id \
                          where e.journal_id = j.id and a.kind = 'wallet' \
                            and a.owner_id = g.user_id and e.amount = g.amount) \
           or not exists (select 1 from ledger.entries e join ledger.accounts a on a.id = e.account_id \
                          where e.journal_id = j.id and a.kind = 'promotions' and e.amount = -g.amount)) \
         limit 100",
    )
    .fetch_all(&mut *conn)
    .await?;
    // The hourly spending totals against the debits they sum (both ways:
    // a total without debits, debits without their total).
    let drifted_spend_hours: Vec<String> = sqlx::query_scalar(
        "with d as ( \
           select e.account_id, date_trunc('hour', e.created_at) as hour, -sum(e.amount) as spent \
             from ledger.entries e join ledger.journals j on j.id = e.journal_id \
            where e.amount < 0 and ledger.is_spending(j.kind) \
              and e.created_at >= date_trunc('hour', app.now() - interval '25 hours') \
            group by 1, 2), \
         h as (select account_id, hour, spent from ledger.spend_hours \
                where hour >= date_trunc('hour', app.now() - interval '25 hours')) \
         select coalesce(d.account_id, h.account_id)::text || '@' || coalesce(d.hour, h.hour)::text \
           from d full join h on h.account_id = d.account_id and h.hour = d.hour \
          where d.spent is distinct from h.spent limit 100",
    )
    .fetch_all(&mut *conn)
    .await?;
    let payout_clearing_drift: i64 = sqlx::query_scalar(
        "select ((select balance from ledger.accounts where kind = 'payout_clearing' \
                   and owner_id is null and reference is null) \
              - coalesce((select sum(tokens) from app.payouts where status = 'held'), 0))::bigint",
    )
    .fetch_one(&mut *conn)
    .await?;
    // Paid (held or sent, net of reversals) never above earned.
    let overpaid_creators: Vec<String> = sqlx::query_scalar(
        "select p.creator_id::text from app.payouts p \
          where p.status in ('held', 'sent', 'reversed') group by p.creator_id \
         having sum(p.tokens - p.reversed_tokens) > (select e.tips + e.classes + e.calls \
                from ledger.earnings(ledger.account_of('wallet', p.creator_id), null, 'infinity') e) \
          limit 100",
    )
    .fetch_all(&mut *conn)
    .await?;
    let (total_balance, accounts_checked): (i64, i64) =
        sqlx::query_as("select coalesce(sum(balance), 0)::bigint, count(*) from ledger.balances")
            .fetch_one(&mut *conn)
            .await?;
    let journals_checked: i64 = sqlx::query_scalar("select count(*) from ledger.journals")
        .fetch_one(&mut *conn)
        .await?;
    Ok(AuditReport {
        unbalanced_journals,
        drifted_accounts,
        misplaced_pending_credits,
        sign_violations,
        unaudited_grants,
        drifted_spend_hours,
        payout_clearing_drift,
        overpaid_creators,
        total_balance,
        journals_checked,
        accounts_checked,
    })
}
