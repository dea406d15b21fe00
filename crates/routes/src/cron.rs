//! Vercel Cron functions (GET, `Authorization: Bearer $CRON_SECRET`,
//! overlap-safe). Declared in `vercel.json`.
//!
//! - `ledger-audit`: recomputes every balance from its entries and checks
//!   every journal sums to zero; a violation is reported (500, so Sentry
//!   sees it) and returned.
//! - `cleanup`: removes expired idempotency records, hourly spending totals
//!   older than the spending window and outbox rows
//!   delivered more than 7 days ago.
//! - `reconcile-purchases`: asks Stripe about purchases still pending after
//!   15 minutes and applies the outcome, so a lost webhook never loses tokens.
//! - `settle-classes`: pays the escrow of classes that have ended to their
//!   creators (every 5 minutes).
//! - `deliver-outbox`: delivers realtime messages and jobs that were not
//!   delivered right after their request (every minute; ADR 0007).
//! - `bill-calls`: the per-minute sweep of paid calls (ADR 0018): charges
//!   every minute that has started, tops escrows up, ends silent, unfunded
//!   and unjoined calls and expires unanswered ones. No lock: concurrent
//!   runs take disjoint calls (`SKIP LOCKED`) and minutes are charged by
//!   index, so a duplicated, late or skipped run charges exactly what is
//!   due.

use crate::problems::OrProblem;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use http::HeaderMap;
use serde::Serialize;
use sqlx::PgPool;
use stagepass_integrations::stripe::{PaymentIntentStatus, StripeClient};
use stagepass_ledger::Cents;
use stagepass_ledger::audit::{AuditReport, audit};
use stagepass_ledger::calls;
use stagepass_ledger::classes;
use stagepass_ledger::purchases;
use stagepass_platform::config::{CronConfig, DbConfig, Secret, StripeApiConfig};
use stagepass_platform::cron;
use stagepass_platform::db;
use stagepass_platform::http::{ApiError, ApiResult};
use stagepass_platform::ratelimit::{SignatureGate, SignedSource};
use stagepass_platform::serve::{Function, Limits};
use utoipa::ToSchema;

use crate::outbox::{Delivery, Outbox};

#[derive(Clone)]
pub struct CronState {
    pub pool: PgPool,
    pub secret: Secret,
}

pub(crate) fn cron_state(
    l: &mut stagepass_platform::config::Loader,
    r: &stagepass_platform::serve::Resources,
) -> Option<CronState> {
    let db = DbConfig::load(l);
    let cron = CronConfig::load(l);
    Some(CronState {
        pool: r.db(&db?)?,
        secret: cron?.secret,
    })
}

pub const LEDGER_AUDIT: Function = Function {
    name: "cron_ledger_audit",
    limits: Limits::Signed(SignedSource::VercelCron),
    paths: &["/api/cron/ledger-audit"],
    build: |l, r| {
        let state = cron_state(l, r)?;
        Some(
            Router::new()
                .route("/api/cron/ledger-audit", get(ledger_audit))
                .with_state(state),
        )
    },
};

pub const CLEANUP: Function = Function {
    name: "cron_cleanup",
    limits: Limits::Signed(SignedSource::VercelCron),
    paths: &["/api/cron/cleanup"],
    build: |l, r| {
        let state = cron_state(l, r)?;
        Some(
            Router::new()
                .route("/api/cron/cleanup", get(cleanup))
                .with_state(state),
        )
    },
};

pub const RECONCILE_PURCHASES: Function = Function {
    name: "cron_reconcile_purchases",
    limits: Limits::Signed(SignedSource::VercelCron),
    paths: &["/api/cron/reconcile-purchases"],
    build: |l, r| {
        let state = cron_state(l, r);
        let stripe = StripeApiConfig::load(l);
        let stripe = stripe?;
        let state = ReconcileState {
            cron: state?,
            stripe: StripeClient::new(stripe.api_base, stripe.secret_key, r.http()),
        };
        Some(
            Router::new()
                .route("/api/cron/reconcile-purchases", get(reconcile_purchases))
                .with_state(state),
        )
    },
};

pub const SETTLE_CLASSES: Function = Function {
    name: "cron_settle_classes",
    limits: Limits::Signed(SignedSource::VercelCron),
    paths: &["/api/cron/settle-classes"],
    build: |l, r| {
        let state = cron_state(l, r)?;
        Some(
            Router::new()
                .route("/api/cron/settle-classes", get(settle_classes))
                .with_state(state),
        )
    },
};

pub const DELIVER_OUTBOX: Function = Function {
    name: "cron_deliver_outbox",
    limits: Limits::Signed(SignedSource::VercelCron),
    paths: &["/api/cron/deliver-outbox"],
    build: |l, r| {
        let state = outbox_state(l, r)?;
        Some(
            Router::new()
                .route("/api/cron/deliver-outbox", get(deliver_outbox))
                .with_state(state),
        )
    },
};

pub const BILL_CALLS: Function = Function {
    name: "cron_bill_calls",
    limits: Limits::Signed(SignedSource::VercelCron),
    paths: &["/api/cron/bill-calls"],
    build: |l, r| {
        let state = outbox_state(l, r)?;
        Some(
            Router::new()
                .route("/api/cron/bill-calls", get(bill_calls))
                .with_state(state),
        )
    },
};

/// Calls advanced per transaction, and transactions per run: 5,000 due
/// calls go in one sweep (issue 11's benchmark), more in the next rounds.
const CALLS_BATCH: i32 = 5000;
const CALLS_ROUNDS: usize = 4;

#[derive(Debug, Serialize, ToSchema)]
pub struct CallSweepRun {
    /// Calls that had something due.
    pub swept_calls: i64,
    /// Minutes charged (escrow → creator).
    pub charged_minutes: i64,
}

#[utoipa::path(get, path = "/api/cron/bill-calls", tag = "cron", security(("cron" = [])),
    responses((status = 200, body = CallSweepRun), (status = 401, body = crate::openapi::Problem)))]
pub async fn bill_calls(
    State(s): State<OutboxState>,
    platform: stagepass_platform::serve::PlatformHandle,
    gate: SignatureGate,
    headers: HeaderMap,
) -> ApiResult<Json<CallSweepRun>> {
    gate.admit(cron::authorize(&headers, &s.cron.secret))
        .await?;
    let mut run = CallSweepRun {
        swept_calls: 0,
        charged_minutes: 0,
    };
    for _ in 0..CALLS_ROUNDS {
        let swept = sweep_calls_once(&s.cron.pool, None).await?;
        run.swept_calls += i64::from(swept.swept_calls);
        run.charged_minutes += i64::from(swept.charged_minutes);
        if swept.swept_calls < CALLS_BATCH {
            break;
        }
    }
    if run.swept_calls > 0 {
        s.outbox.kick(&platform);
    }
    Ok(Json(run))
}

/// One sweep transaction (all due calls, or only `only`), retried whole on
/// a deadlock with a tip or another sweep.
pub async fn sweep_calls_once(
    pool: &PgPool,
    only: Option<stagepass_ledger::CallId>,
) -> ApiResult<calls::Sweep> {
    crate::retry::on_deadlock(|| async move {
        let mut tx = db::begin_service(pool).await?;
        let swept = match calls::sweep(&mut tx, CALLS_BATCH, only).await {
            Err(e) if e.is_deadlock() => return Err(crate::retry::deadlocked(tx).await),
            other => other.or_problem()?,
        };
        tx.commit().await?;
        Ok(swept)
    })
    .await
}

/// A cron that writes messages: the cron settings and the outbox.
fn outbox_state(
    l: &mut stagepass_platform::config::Loader,
    r: &stagepass_platform::serve::Resources,
) -> Option<OutboxState> {
    let cron = cron_state(l, r);
    let outbox = Outbox::load(l, r, cron.as_ref().map(|s| s.pool.clone()));
    Some(OutboxState {
        cron: cron?,
        outbox: outbox?,
    })
}

#[derive(Clone)]
pub struct OutboxState {
    pub cron: CronState,
    pub outbox: Outbox,
}

/// Batches of 50 per run: a backlog drains over a few runs rather than
/// outliving the function's time limit.
const OUTBOX_ROUNDS: usize = 20;

#[utoipa::path(get, path = "/api/cron/deliver-outbox", tag = "cron", security(("cron" = [])),
    responses((status = 200, body = Delivery), (status = 401, body = crate::openapi::Problem)))]
pub async fn deliver_outbox(
    State(s): State<OutboxState>,
    gate: SignatureGate,
    headers: HeaderMap,
) -> ApiResult<Json<Delivery>> {
    gate.admit(cron::authorize(&headers, &s.cron.secret))
        .await?;
    // Folds first, so their balance.updated messages go out in this run.
    let folded_accounts = s.outbox.fold_all().await?;
    // No lock: deliverers claim disjoint rows (`SKIP LOCKED`).
    let delivery = s.outbox.deliver_pending(OUTBOX_ROUNDS).await?;
    Ok(Json(Delivery {
        folded_accounts,
        ..delivery
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobRun {
    /// Another run held the lock; this one did nothing.
    pub skipped: bool,
    pub processed: i64,
}

#[utoipa::path(get, path = "/api/cron/ledger-audit", tag = "cron", security(("cron" = [])),
    responses((status = 200, body = AuditReport),
              (status = 401, body = crate::openapi::Problem),
              (status = 500, description = "an invariant is violated", body = crate::openapi::Problem)))]
pub async fn ledger_audit(
    State(s): State<CronState>,
    gate: SignatureGate,
    headers: HeaderMap,
) -> ApiResult<Json<AuditReport>> {
    gate.admit(cron::authorize(&headers, &s.secret)).await?;
    // One snapshot for every check.
    let mut tx = db::begin_service_snapshot(&s.pool).await?;
    let report = audit(&mut tx).await.or_problem()?;
    tx.commit().await?;
    if !report.is_clean() {
        return Err(ApiError::Internal(
            format!("ledger invariants violated: {report:?}").into(),
        ));
    }
    Ok(Json(report))
}

#[utoipa::path(get, path = "/api/cron/cleanup", tag = "cron", security(("cron" = [])),
    responses((status = 200, body = JobRun), (status = 401, body = crate::openapi::Problem)))]
pub async fn cleanup(
    State(s): State<CronState>,
    gate: SignatureGate,
    headers: HeaderMap,
) -> ApiResult<Json<JobRun>> {
    gate.admit(cron::authorize(&headers, &s.secret)).await?;
    let mut tx = db::begin_service(&s.pool).await?;
    if !cron::try_lock(&mut tx, "cleanup").await? {
        return Ok(Json(JobRun {
            skipped: true,
            processed: 0,
        }));
    }
    let removed = sqlx::query("delete from app.idempotency_keys where expires_at < app.now()")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let delivered =
        sqlx::query("delete from app.outbox where delivered_at < app.now() - interval '7 days'")
            .execute(&mut *tx)
            .await?
            .rows_affected();
    // Hourly spending totals older than the 24-hour window (migration 19).
    let hours: i64 = sqlx::query_scalar("select ledger.prune_spend_hours()")
        .fetch_one(&mut *tx)
        .await?;
    // Agora notices older than a week (Agora's retries end within minutes).
    let notices: i64 = sqlx::query_scalar("select app.prune_agora_notices()")
        .fetch_one(&mut *tx)
        .await?;
    let removed = removed
        + delivered
        + u64::try_from(hours).unwrap_or(0)
        + u64::try_from(notices).unwrap_or(0);
    tx.commit().await?;
    Ok(Json(JobRun {
        skipped: false,
        processed: i64::try_from(removed).unwrap_or(i64::MAX),
    }))
}

#[derive(Clone)]
pub struct ReconcileState {
    pub cron: CronState,
    pub stripe: StripeClient,
}

/// Pending purchases younger than this are left to their webhook.
const RECONCILE_AFTER_SECONDS: i64 = 15 * 60;
const RECONCILE_BATCH: i32 = 100;

#[utoipa::path(get, path = "/api/cron/reconcile-purchases", tag = "cron", security(("cron" = [])),
    responses((status = 200, body = JobRun), (status = 401, body = crate::openapi::Problem)))]
pub async fn reconcile_purchases(
    State(s): State<ReconcileState>,
    gate: SignatureGate,
    headers: HeaderMap,
) -> ApiResult<Json<JobRun>> {
    gate.admit(cron::authorize(&headers, &s.cron.secret))
        .await?;
    let mut tx = db::begin_service(&s.cron.pool).await?;
    if !cron::try_lock(&mut tx, "reconcile-purchases").await? {
        return Ok(Json(JobRun {
            skipped: true,
            processed: 0,
        }));
    }
    let stale = purchases::stale_pending(&mut tx, RECONCILE_AFTER_SECONDS, RECONCILE_BATCH)
        .await
        .or_problem()?;
    tx.commit().await?;
    let mut processed = 0;
    for (_, payment_intent) in stale {
        // One purchase at a time, each in its own transaction: a Stripe
        // error on one does not hold back the others.
        let intent = match s.stripe.retrieve_payment_intent(&payment_intent).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(%payment_intent, error = %e, "reconcile: Stripe lookup failed");
                continue;
            }
        };
        let mut tx = db::begin_service(&s.cron.pool).await?;
        match intent.status {
            PaymentIntentStatus::Succeeded => {
                purchases::credit(&mut tx, &intent.id, Cents::new(intent.amount_cents))
                    .await
                    .or_problem()?;
            }
            PaymentIntentStatus::Canceled => purchases::fail(&mut tx, &intent.id, true)
                .await
                .or_problem()?,
            _ => {}
        }
        tx.commit().await?;
        processed += 1;
    }
    Ok(Json(JobRun {
        skipped: false,
        processed,
    }))
}

/// Classes settled per run; the rest wait for the next run (5 minutes).
const SETTLE_BATCH: i32 = 100;

#[derive(Debug, Serialize, ToSchema)]
pub struct SettlementRun {
    /// Another run held the lock; this one did nothing.
    pub skipped: bool,
    pub settled_classes: i32,
    /// Tokens moved from escrow (to creators and the platform fee).
    pub settled_tokens: i64,
}

#[utoipa::path(get, path = "/api/cron/settle-classes", tag = "cron", security(("cron" = [])),
    responses((status = 200, body = SettlementRun), (status = 401, body = crate::openapi::Problem)))]
pub async fn settle_classes(
    State(s): State<CronState>,
    gate: SignatureGate,
    headers: HeaderMap,
) -> ApiResult<Json<SettlementRun>> {
    gate.admit(cron::authorize(&headers, &s.secret)).await?;
    // Settlement credits creators' wallets, so it can deadlock with a tip
    // between two of them; the whole batch is then retried.
    let s = &s;
    crate::retry::on_deadlock(|| async move {
        let mut tx = db::begin_service(&s.pool).await?;
        if !cron::try_lock(&mut tx, "settle-classes").await? {
            return Ok(Json(SettlementRun {
                skipped: true,
                settled_classes: 0,
                settled_tokens: 0,
            }));
        }
        let settled = match classes::settle_ended(&mut tx, SETTLE_BATCH).await {
            Err(e) if e.is_deadlock() => return Err(crate::retry::Retry::Deadlock),
            other => other.or_problem()?,
        };
        tx.commit().await?;
        Ok(Json(SettlementRun {
            skipped: false,
            settled_classes: settled.settled_classes,
            settled_tokens: settled.settled_tokens,
        }))
    })
    .await
}
