//! Job functions: QStash calls them (signed, at the time the message was
//! scheduled for, retried on failure). Each is idempotent: a repeat does
//! nothing new. In development without QStash the outbox runs them inline
//! through [`run`].
//!
//! - `class-reminder`: 15 minutes before a class starts, notifies the
//!   class's channel — only if the class is still on, still starts when the
//!   message was scheduled for, and someone is enrolled (a stale message
//!   after a reschedule or a cancellation does nothing).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use stagepass_integrations::qstash::Verifier;
use stagepass_platform::config::{DbConfig, Loader, QstashConfig};
use stagepass_platform::db;
use stagepass_platform::http::{ApiError, ApiResult, codes};
use stagepass_platform::ratelimit::{SignatureGate, SignedSource};
use stagepass_platform::serve::{Function, Limits, PlatformHandle, Resources};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::outbox::Outbox;

const CLASS_REMINDER_PATH: &str = "/api/jobs/class-reminder";
const CALL_TICK_PATH: &str = "/api/jobs/call-tick";

pub const CALL_TICK: Function = Function {
    name: "jobs_call_tick",
    limits: Limits::Signed(SignedSource::Qstash),
    paths: &[CALL_TICK_PATH],
    build: |l, r| {
        let state = JobState::load(l, r)?;
        Some(
            Router::new()
                .route(CALL_TICK_PATH, post(call_tick))
                .with_state(state),
        )
    },
};

pub const CLASS_REMINDER: Function = Function {
    name: "jobs_class_reminder",
    limits: Limits::Signed(SignedSource::Qstash),
    paths: &[CLASS_REMINDER_PATH],
    build: |l, r| {
        let state = JobState::load(l, r)?;
        Some(
            Router::new()
                .route(CLASS_REMINDER_PATH, post(class_reminder))
                .with_state(state),
        )
    },
};

/// The public path QStash calls for the job `name` (the outbox's
/// `destination`).
pub fn path_of(name: &str) -> Option<&'static str> {
    match name {
        "class-reminder" => Some(CLASS_REMINDER_PATH),
        "call-tick" => Some(CALL_TICK_PATH),
        "payout-transfer" => Some(crate::payouts::JOB_PATH),
        _ => None,
    }
}

/// Runs the job `name` with its message body; returns what it did. The
/// payout transfer needs Stripe (`payouts`: `None` refuses it, and the
/// outbox retries it later).
pub async fn run(
    pool: &PgPool,
    payouts: Option<&crate::payouts::RunState>,
    name: &str,
    payload: &serde_json::Value,
) -> ApiResult<String> {
    match name {
        "payout-transfer" => {
            let message = message(
                name,
                crate::payouts::PayoutTransferMessage::deserialize(payload),
            )?;
            let Some(state) = payouts else {
                return Err(ApiError::Unavailable(
                    codes::NOT_CONFIGURED,
                    "payout transfers need STRIPE_SECRET_KEY".into(),
                ));
            };
            let outcome = crate::payouts::transfer_payout(state, message.payout_id).await?;
            serde_json::to_value(&outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .ok_or_else(|| ApiError::Internal("outcome".into()))
        }
        "class-reminder" => {
            remind(pool, &message(name, ClassReminder::deserialize(payload))?).await
        }
        "call-tick" => tick(pool, &message(name, CallTick::deserialize(payload))?).await,
        other => Err(ApiError::BadRequest(format!("unknown job {other}"))),
    }
}

/// A job's message, or 400 naming the job (QStash callbacks and the inline
/// runner read them the same way).
pub(crate) fn message<T>(job: &str, parsed: Result<T, serde_json::Error>) -> ApiResult<T> {
    parsed.map_err(|e| ApiError::BadRequest(format!("not a {job} message: {e}")))
}

#[derive(Clone)]
pub struct JobState {
    pool: PgPool,
    verifier: Verifier,
    public_base: url::Url,
    outbox: Outbox,
}

impl JobState {
    pub(crate) fn load(l: &mut Loader, r: &Resources) -> Option<JobState> {
        let db = DbConfig::load(l);
        let qstash = QstashConfig::load(l);
        let pool = db.and_then(|db| r.db(&db));
        let outbox = Outbox::load(l, r, pool.clone())?;
        let (pool, qstash) = (pool?, qstash?);
        Some(JobState {
            pool,
            verifier: Verifier::new(qstash.current_signing_key, qstash.next_signing_key),
            public_base: qstash.public_base_url,
            outbox,
        })
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Checks the QStash signature for a call to `path` with `body`.
    pub(crate) fn verify(&self, path: &str, headers: &HeaderMap, body: &[u8]) -> ApiResult<()> {
        let url = self
            .public_base
            .join(path)
            .map_err(|_| ApiError::Unavailable(codes::MISCONFIGURED, "PUBLIC_BASE_URL".into()))?;
        let signature = headers
            .get("upstash-signature")
            .and_then(|v| v.to_str().ok());
        self.verifier
            .verify(signature, url.as_str(), body)
            .map_err(|e| {
                tracing::warn!(error = %e, path, "QStash callback refused");
                ApiError::Unauthenticated(codes::INVALID_QSTASH_SIGNATURE)
            })
    }
}

/// A class reminder message: the class and the start it was scheduled for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassReminder {
    pub class_id: Uuid,
    pub starts_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobOutcome {
    /// `sent`, or why nothing was: `rescheduled`, `class_cancelled`,
    /// `class_settled`, `class_not_found`, `nobody_enrolled`.
    pub outcome: String,
}

async fn remind(pool: &PgPool, message: &ClassReminder) -> ApiResult<String> {
    let mut tx = db::begin_service(pool).await?;
    let outcome: String = sqlx::query_scalar("select app.run_class_reminder($1, $2)")
        .bind(message.class_id)
        .bind(message.starts_at)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// QStash callback: the class reminder.
#[utoipa::path(post, path = "/api/jobs/class-reminder", tag = "jobs",
    security(("qstash" = [])),
    request_body = ClassReminder,
    responses((status = 200, body = JobOutcome),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, description = "invalid_qstash_signature", body = crate::openapi::Problem)))]
pub async fn class_reminder(
    State(s): State<JobState>,
    platform: PlatformHandle,
    gate: SignatureGate,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<JobOutcome>> {
    gate.admit(s.verify(CLASS_REMINDER_PATH, &headers, &body))
        .await?;
    let message = message(
        "class-reminder",
        serde_json::from_slice::<ClassReminder>(&body),
    )?;
    let outcome = remind(&s.pool, &message).await?;
    if outcome == "sent" {
        s.outbox.kick(&platform);
    }
    Ok(Json(JobOutcome { outcome }))
}

/// A call-tick message: the call to advance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallTick {
    pub call_id: Uuid,
}

async fn tick(pool: &PgPool, message: &CallTick) -> ApiResult<String> {
    let swept =
        crate::cron::sweep_calls_once(pool, Some(stagepass_ledger::CallId::new(message.call_id)))
            .await?;
    Ok(if swept.swept_calls > 0 {
        "advanced".to_owned()
    } else {
        "nothing_due".to_owned()
    })
}

/// QStash callback: advance one call (its 30 s warning, its end when the
/// funded time runs out).
#[utoipa::path(post, path = "/api/jobs/call-tick", tag = "jobs",
    security(("qstash" = [])),
    request_body = CallTick,
    responses((status = 200, description = "`advanced`, or `nothing_due`", body = JobOutcome),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, description = "invalid_qstash_signature", body = crate::openapi::Problem)))]
pub async fn call_tick(
    State(s): State<JobState>,
    platform: PlatformHandle,
    gate: SignatureGate,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<JobOutcome>> {
    gate.admit(s.verify(CALL_TICK_PATH, &headers, &body))
        .await?;
    let message = message("call-tick", serde_json::from_slice::<CallTick>(&body))?;
    let outcome = tick(&s.pool, &message).await?;
    if outcome == "advanced" {
        s.outbox.kick(&platform);
    }
    Ok(Json(JobOutcome { outcome }))
}
