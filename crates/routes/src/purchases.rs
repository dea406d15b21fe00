//! `POST /api/v1/tokens/purchases` — buy a token package by card.
//!
//! Creates (or finds) a Stripe PaymentIntent and returns its client secret;
//! the frontend confirms with Stripe.js (3-D Secure included). Tokens are
//! credited only by the signed `payment_intent.succeeded` webhook or the
//! reconciliation cron, never here (SPEC §6, defect 1).
//!
//! Retries are safe at every step: the purchase id is derived from (user,
//! Idempotency-Key), so a retry finds the same row, and Stripe's
//! idempotency key is derived from that id, so Stripe returns the same
//! PaymentIntent instead of charging twice (defect 2). The Stripe call
//! happens between two short transactions, never while holding one.

use crate::problems::OrProblem;
use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use stagepass_integrations::stripe::{CreatePaymentIntent, StripeClient};
use stagepass_ledger::UserId;
use stagepass_ledger::packages;
use stagepass_ledger::purchases::{self, PurchaseStatus, purchase_id};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::config::StripeApiConfig;
use stagepass_platform::db;
use stagepass_platform::http::{ApiError, ApiResult, JsonBody, codes};
use stagepass_platform::idempotency::{DEFAULT_TTL_HOURS, Idempotency, IdempotencyKey};
use stagepass_platform::serve::{Function, Limits};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::UserApi;

pub const FUNCTION: Function = Function {
    name: "v1_tokens_purchases",
    limits: Limits::Purchase,
    paths: &["/api/v1/tokens/purchases"],
    build: |l, r| {
        let api = UserApi::load(l, r);
        let stripe = StripeApiConfig::load(l);
        let stripe = stripe?;
        let state = PurchaseState {
            api: api?,
            stripe: StripeClient::new(stripe.api_base, stripe.secret_key, r.http()),
        };
        Some(
            Router::new()
                .route("/api/v1/tokens/purchases", post(create_purchase))
                .with_state(state),
        )
    },
};

const ROUTE: &str = "POST /api/v1/tokens/purchases";

/// The most the Stripe call may take. It must stay below the purchase's
/// in-flight claim (`app.purchase_claim_lease()`, 60 s; a test compares
/// them): a claim that ran out while its holder still waited on Stripe let
/// a duplicate call Stripe too (issue 14). The client alone may take
/// 2 × 10 s + 2 s.
pub const STRIPE_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct PurchaseState {
    pub api: UserApi,
    pub stripe: StripeClient,
}

impl axum::extract::FromRef<PurchaseState> for std::sync::Arc<stagepass_platform::auth::Verifier> {
    fn from_ref(s: &PurchaseState) -> Self {
        s.api.verifier.clone()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    /// A package id from `GET /api/v1/tokens/packages`.
    pub package: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurchaseCreated {
    pub purchase_id: Uuid,
    pub package: String,
    /// Tokens credited when the payment succeeds.
    pub tokens: i64,
    pub price_cents: i64,
    pub payment_intent_id: String,
    /// For Stripe.js `confirmCardPayment`.
    pub client_secret: Option<String>,
    /// `pending` until Stripe reports the payment.
    pub status: PurchaseStatus,
}

#[utoipa::path(post, path = "/api/v1/tokens/purchases", tag = "tokens", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1–255 visible ASCII characters")),
    request_body = PurchaseRequest,
    responses(
        (status = 201, body = PurchaseCreated),
        (status = 400, body = crate::openapi::Problem),
        (status = 409, description = "the same key is in flight", body = crate::openapi::Problem),
        (status = 422, description = "idempotency_key_reused", body = crate::openapi::Problem),
        (status = 503, description = "Stripe unavailable; retry with the same key", body = crate::openapi::Problem)))]
pub async fn create_purchase(
    State(state): State<PurchaseState>,
    user: AuthUser,
    key: IdempotencyKey,
    JsonBody(request): JsonBody<PurchaseRequest>,
) -> ApiResult<Response> {
    let package = packages::find(&request.package)
        .ok_or_else(|| ApiError::field("package", "unknown package"))?;
    let id = purchase_id(UserId::new(user.id()), key.as_str());
    let idempotency = Idempotency::new(user.id(), ROUTE, key, &request, DEFAULT_TTL_HOURS)?;

    // 1. Claim the purchase (or replay a finished request).
    let mut tx = crate::me::begin_seen(&state.api.pool, user.claims()).await?;
    if let Some(replay) = idempotency.begin(&mut tx).await? {
        tx.commit().await?;
        return Ok(replay.into_response());
    }
    let start = purchases::begin(&mut tx, id, package.id)
        .await
        .or_problem()?;
    tx.commit().await?;
    if start.busy {
        return Err(ApiError::Conflict(
            codes::IDEMPOTENCY_IN_PROGRESS,
            "a request with this Idempotency-Key is still being processed".into(),
        ));
    }

    // 2. Create the PaymentIntent: the same key returns the same one.
    let mut params = CreatePaymentIntent::card(start.price_cents, "usd");
    params.metadata = BTreeMap::from([
        ("purchase_id".to_owned(), id.to_string()),
        ("user_id".to_owned(), user.id().to_string()),
        ("package".to_owned(), package.id.to_owned()),
    ]);
    let stripe_key = format!("purchase:{id}");
    let call = state.stripe.create_payment_intent(&params, &stripe_key);
    let intent = match tokio::time::timeout(STRIPE_BUDGET, call).await {
        Ok(Ok(intent)) => intent,
        failed => {
            match failed {
                Ok(Err(e)) => tracing::warn!(error = %e, "creating a PaymentIntent failed"),
                _ => tracing::warn!("creating a PaymentIntent took longer than its budget"),
            }
            // Best effort: the lease runs out anyway.
            if let Ok(mut tx) = db::begin_user(&state.api.pool, user.claims()).await
                && purchases::release_claim(&mut tx, id).await.is_ok()
            {
                let _ = tx.commit().await;
            }
            return Err(ApiError::Unavailable(
                codes::PAYMENT_PROVIDER_UNAVAILABLE,
                "the payment provider did not answer; retry with the same Idempotency-Key".into(),
            ));
        }
    };

    // 3. Record it with the response, in one transaction.
    let created = PurchaseCreated {
        purchase_id: id.get(),
        package: package.id.to_owned(),
        tokens: start.tokens,
        price_cents: start.price_cents,
        payment_intent_id: intent.id.clone(),
        client_secret: intent.client_secret.clone(),
        status: PurchaseStatus::Pending,
    };
    let body = serde_json::to_value(&created).map_err(ApiError::internal)?;
    let mut tx = db::begin_user(&state.api.pool, user.claims()).await?;
    // Under the key's lock again: if a duplicate finished first (its claim
    // outlived ours), answer what it answered rather than refusing our own
    // request as a reused key.
    if let Some(replay) = idempotency.begin(&mut tx).await? {
        tx.commit().await?;
        return Ok(replay.into_response());
    }
    purchases::attach_payment_intent(&mut tx, id, &intent.id, intent.client_secret.as_deref())
        .await
        .or_problem()?;
    idempotency
        .store(&mut tx, StatusCode::CREATED, &body)
        .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
