//! `POST /api/webhooks/stripe` — Stripe's events, each applied exactly once.
//! `POST /api/webhooks/agora` — Agora's channel events of paid calls (see
//! [`agora_webhook`]).
//!
//! The raw body is verified before anything parses it (SPEC §6, defect 3);
//! the event id is recorded **in the same transaction as the effect**, so a
//! redelivery finds it and changes nothing, and a failed effect rolls the
//! record back and answers 5xx, so Stripe retries. Stripe re-signs every
//! retry with a fresh timestamp, so the 300 s tolerance applies to the
//! signature, never to the event's age.

use crate::problems::OrProblem;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http::HeaderMap;
use serde::Serialize;
use sqlx::PgConnection;
use stagepass_integrations::stripe::webhook::{self, Event, EventKind};
use stagepass_ledger::Cents;
use stagepass_ledger::purchases::{self, ClawBack, CreditOutcome};
use stagepass_platform::config::{DbConfig, ExposeSecret, Secret, StripeWebhookConfig};
use stagepass_platform::db;
use stagepass_platform::http::{ApiError, ApiResult, codes};
use stagepass_platform::ratelimit::{SignatureGate, SignedSource};
use stagepass_platform::serve::{Function, Limits, PlatformHandle};
use stagepass_platform::time::Clock;
use utoipa::ToSchema;

use crate::outbox::Outbox;

pub const STRIPE: Function = Function {
    name: "webhooks_stripe",
    limits: Limits::Signed(SignedSource::Stripe),
    paths: &["/api/webhooks/stripe"],
    build: |l, r| {
        let db = DbConfig::load(l);
        let hook = StripeWebhookConfig::load(l);
        let pool = db.and_then(|db| r.db(&db));
        let outbox = Outbox::load(l, r, pool.clone());
        let state = StripeWebhookState {
            pool: pool?,
            secret: hook?.webhook_secret,
            clock: r.clock.clone(),
            outbox: outbox?,
        };
        Some(
            Router::new()
                .route("/api/webhooks/stripe", post(stripe_webhook))
                .with_state(state),
        )
    },
};

/// Stripe's own tolerance for signature timestamps.
pub const TOLERANCE_SECONDS: i64 = 300;

#[derive(Clone)]
pub struct StripeWebhookState {
    pub pool: sqlx::PgPool,
    pub secret: Secret,
    pub clock: Clock,
    /// A credit or claw-back changes a wallet: `balance.updated`.
    pub outbox: Outbox,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Received {
    pub received: bool,
    /// This event id was applied before; nothing changed.
    pub duplicate: bool,
    /// What the event did, e.g. `credited`, `clawed_back:40`, `ignored`.
    pub outcome: String,
}

#[utoipa::path(post, path = "/api/webhooks/stripe", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "t=…,v1=…")),
    request_body(content = serde_json::Value, description = "a Stripe event, verified on the raw bytes"),
    responses(
        (status = 200, body = Received),
        (status = 401, description = "missing, bad or stale signature (`invalid_signature`)", body = crate::openapi::Problem),
        (status = 429, description = "too many bad signatures from this client IP (`unsigned`), or Stripe's own budget spent", body = crate::openapi::Problem),
        (status = 500, description = "the effect failed; Stripe retries", body = crate::openapi::Problem)))]
pub async fn stripe_webhook(
    State(state): State<StripeWebhookState>,
    platform: PlatformHandle,
    gate: SignatureGate,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Received>> {
    // Verified before any budget is charged: a forged flood is counted
    // against its own IP, never against Stripe's budget (ADR 0011).
    let event = gate.admit(verify(&state, &headers, &body)).await?;

    let mut tx = db::begin_service(&state.pool).await?;
    if !first_delivery(&mut tx, &event).await? {
        tx.commit().await?;
        return Ok(Json(Received {
            received: true,
            duplicate: true,
            outcome: "duplicate".into(),
        }));
    }
    // Any error from here rolls back the event record with the effect.
    let outcome = apply(&mut tx, &event).await?;
    tx.commit().await?;
    state.outbox.kick(&platform);
    tracing::info!(event = %event.id, kind = %event.type_, %outcome, "stripe event applied");
    Ok(Json(Received {
        received: true,
        duplicate: false,
        outcome,
    }))
}

/// Records a Stripe event's id (platform and Connect endpoints share
/// `app.stripe_events`: ids are unique across Stripe) in the caller's
/// transaction; false when it was recorded before (a redelivery).
pub(crate) async fn first_delivery(
    conn: &mut PgConnection,
    event: &Event,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "insert into app.stripe_events (id, type) values ($1, $2) on conflict (id) do nothing",
    )
    .bind(&event.id)
    .bind(&event.type_)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

fn verify(state: &StripeWebhookState, headers: &HeaderMap, body: &[u8]) -> ApiResult<Event> {
    verify_signed(&state.secret, &state.clock, headers, body)
}

/// Checks `Stripe-Signature` on the raw body (constant time) against
/// `secret` (the platform or the Connect endpoint's). Missing, bad and stale
/// signatures are one 401: the sender learns nothing more.
pub(crate) fn verify_signed(
    secret: &Secret,
    clock: &Clock,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<Event> {
    let refused = ApiError::Unauthenticated(codes::INVALID_SIGNATURE);
    let Some(signature) = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return Err(refused);
    };
    webhook::verify_event(
        body,
        signature,
        secret.expose_secret(),
        clock.now().timestamp(),
        TOLERANCE_SECONDS,
    )
    .map_err(|e| {
        tracing::warn!(error = %e, "refused a Stripe webhook");
        refused
    })
}

/// The effect of one event, in the caller's (service) transaction.
pub async fn apply(conn: &mut PgConnection, event: &Event) -> Result<String, ApiError> {
    let bad = |e: webhook::EventError| ApiError::Internal(e.to_string().into());
    match event.kind() {
        EventKind::PaymentIntentSucceeded => {
            let intent = event.payment_intent().map_err(bad)?;
            let outcome = purchases::credit(conn, &intent.id, Cents::new(intent.amount_cents))
                .await
                .or_problem()?;
            if outcome == CreditOutcome::Unknown {
                tracing::warn!(payment_intent = %intent.id, "succeeded PaymentIntent of no purchase");
            }
            Ok(outcome.as_str().to_owned())
        }
        EventKind::PaymentIntentPaymentFailed => {
            let intent = event.payment_intent().map_err(bad)?;
            purchases::fail(conn, &intent.id, false)
                .await
                .or_problem()?;
            Ok("failed".into())
        }
        EventKind::ChargeRefunded => {
            let charge = event.charge().map_err(bad)?;
            let Some(intent) = charge.payment_intent.as_deref() else {
                return Ok("ignored:no_payment_intent".into());
            };
            let reference = format!("{}:{}", charge.id, charge.amount_refunded_cents);
            let refund = ClawBack::Refund {
                amount_refunded: Cents::new(charge.amount_refunded_cents),
            };
            let taken = purchases::claw_back(conn, intent, refund, &reference)
                .await
                .or_problem()?;
            Ok(format!("clawed_back:{taken}"))
        }
        EventKind::ChargeDisputeCreated => {
            let dispute = event.dispute().map_err(bad)?;
            let Some(intent) = dispute.payment_intent.as_deref() else {
                // Without the PaymentIntent we cannot find the purchase: fail
                // loudly (5xx, reported) rather than lose a chargeback.
                return Err(ApiError::Internal(
                    format!("dispute {} has no payment_intent", dispute.id).into(),
                ));
            };
            let taken = purchases::claw_back(conn, intent, ClawBack::Dispute, &dispute.id)
                .await
                .or_problem()?;
            Ok(format!("clawed_back:{taken}"))
        }
        EventKind::Other if event.type_ == "transfer.reversed" => {
            crate::payouts::apply_transfer_reversed(conn, event).await
        }
        EventKind::Other => Ok("ignored".into()),
    }
}

pub const AGORA: Function = Function {
    name: "webhooks_agora",
    limits: Limits::Signed(SignedSource::Agora),
    paths: &["/api/webhooks/agora"],
    build: |l, r| {
        let db = DbConfig::load(l);
        let hook = stagepass_platform::config::AgoraNotificationConfig::load(l);
        let pool = db.and_then(|db| r.db(&db));
        let state = AgoraWebhookState {
            pool: pool?,
            secret: hook?.secret,
        };
        Some(
            Router::new()
                .route("/api/webhooks/agora", post(agora_webhook))
                .with_state(state),
        )
    },
};

#[derive(Clone)]
pub struct AgoraWebhookState {
    pub pool: sqlx::PgPool,
    pub secret: Secret,
}

/// Agora's channel events (NCS) for the paid calls: the raw body's
/// `Agora-Signature-V2` (HMAC-SHA256, constant-time comparison) is checked
/// before anything is parsed; each `noticeId` is applied once, in one short
/// transaction, and answered 200 at once (Agora wants an answer within
/// 10 s). A leave that is not a quit ends the call at the leave unless the
/// party rejoins within 60 s; duplicated, reordered (older `clientSeq`) and
/// irrelevant events change nothing. The events corroborate; the billing
/// clock stays the database's (ADR 0018).
#[utoipa::path(post, path = "/api/webhooks/agora", tag = "webhooks",
    params(("Agora-Signature-V2" = String, Header, description = "hex HMAC-SHA256 of the raw body with the notification secret")),
    request_body(content = serde_json::Value, description = "an Agora notification, verified on the raw bytes"),
    responses(
        (status = 200, body = Received),
        (status = 400, description = "a verified body that is not a notification", body = crate::openapi::Problem),
        (status = 401, description = "missing or bad signature (`invalid_signature`)", body = crate::openapi::Problem),
        (status = 429, description = "too many bad signatures from this client IP (`unsigned`), or Agora's own budget spent", body = crate::openapi::Problem)))]
pub async fn agora_webhook(
    State(state): State<AgoraWebhookState>,
    gate: SignatureGate,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Received>> {
    use stagepass_integrations::agora::notify;
    use stagepass_ledger::calls::{self, ChannelEvent, NoticeOutcome};
    let signature = headers
        .get(notify::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    gate.admit(
        notify::verify(&body, signature, &state.secret).map_err(|e| {
            tracing::warn!(error = %e, "refused an Agora notification");
            ApiError::Unauthenticated(codes::INVALID_SIGNATURE)
        }),
    )
    .await?;
    let notice = notify::parse(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let event = ChannelEvent {
        notice_id: &notice.notice_id,
        product_id: notice.product_id,
        event_type: notice.event_type,
        channel: notice.payload.channel_name.as_deref(),
        uid: notice.payload.uid,
        client_seq: notice.payload.client_seq,
        reason: notice.payload.reason,
    };
    let mut tx = db::begin_service(&state.pool).await?;
    let outcome = calls::apply_notice(&mut tx, &event).await.or_problem()?;
    tx.commit().await?;
    Ok(Json(match outcome {
        NoticeOutcome::Duplicate => Received {
            received: true,
            duplicate: true,
            outcome: "duplicate".into(),
        },
        NoticeOutcome::Applied(outcome) => Received {
            received: true,
            duplicate: false,
            outcome,
        },
    }))
}
