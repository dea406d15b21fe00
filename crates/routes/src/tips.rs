//! `POST /api/v1/tips` — a fan tips a creator.
//!
//! One statement under RLS holds everything (`app.money_request`, one round
//! trip): first-sight user creation, the idempotency record, and `app.tip`
//! (which locks the tipper's wallet, checks debt, funds and the daily
//! spending limit, and posts the journal). A refusal is recorded with the
//! key in a second statement.
//! A tip's client errors are recorded with the key, so a replay answers the
//! same; a deadlock is retried. The creator's share is a deferred credit
//! (ADR 0021): their wallet is folded right after the response.

use crate::problems::{IntoProblem, OrProblem};
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use stagepass_ledger::{MAX_TIP, MIN_TIP, Tip, TokenAmount};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::http::{ApiError, ApiResult, JsonBody, text};
use stagepass_platform::idempotency::{DEFAULT_TTL_HOURS, Idempotency, IdempotencyKey};
use stagepass_platform::serve::{Function, Limits, PlatformHandle};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::UserApi;

pub const FUNCTION: Function = Function {
    name: "v1_tips",
    limits: Limits::Money,
    paths: &["/api/v1/tips"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/tips", post(create_tip))
                .with_state(api),
        )
    },
};

const ROUTE: &str = "POST /api/v1/tips";
const MAX_MESSAGE_CHARS: usize = 280;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TipRequest {
    /// The creator receiving the tip.
    pub recipient_id: Uuid,
    /// 1–10,000 tokens.
    pub amount: i64,
    /// Up to 280 characters.
    pub message: Option<String>,
}

impl TipRequest {
    fn validate(&self) -> Result<TokenAmount, ApiError> {
        let amount = TokenAmount::parse(self.amount, MIN_TIP, MAX_TIP).or_problem()?;
        if let Some(m) = &self.message
            && (m.chars().count() > MAX_MESSAGE_CHARS
                || m.chars().any(|c| c.is_control() && c != '\n')
                || text::check("message", m).is_err())
        {
            return Err(ApiError::field(
                "message",
                "at most 280 characters, no control or format characters",
            ));
        }
        Ok(amount)
    }
}

#[utoipa::path(post, path = "/api/v1/tips", tag = "tips", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1–255 visible ASCII characters")),
    request_body = TipRequest,
    responses(
        (status = 201, body = Tip),
        (status = 400, body = crate::openapi::Problem),
        (status = 409, description = "the same key is in flight", body = crate::openapi::Problem),
        (status = 422, description = "insufficient_funds, daily_limit_exceeded, account_in_debt, recipient_not_creator, self_tip, idempotency_key_reused", body = crate::openapi::Problem)))]
pub async fn create_tip(
    State(api): State<UserApi>,
    user: AuthUser,
    platform: PlatformHandle,
    key: IdempotencyKey,
    JsonBody(request): JsonBody<TipRequest>,
) -> ApiResult<Response> {
    let amount = request.validate()?;
    let idempotency = Idempotency::new(user.id(), ROUTE, key, &request, DEFAULT_TTL_HOURS)?;
    let (recipient, message) = (request.recipient_id, request.message);
    let args = serde_json::json!({
        "tip_id": Uuid::now_v7(),
        "recipient_id": recipient,
        "amount": amount.get(),
        "message": message,
    });
    crate::idempotent::run_in_one_call(
        &api,
        &user,
        &platform,
        &idempotency,
        StatusCode::CREATED,
        "tip",
        args,
        |e| stagepass_ledger::LedgerError::from(e).into_problem(),
        &[recipient],
    )
    .await
}
