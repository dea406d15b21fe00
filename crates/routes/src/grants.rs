//! `POST /api/v1/admin/users/{id}/grants` — an admin gives a user
//! promotional tokens for a stated reason.
//!
//! Shaped like a tip (`idempotent::run`): one transaction under RLS with
//! first-sight user creation, the `Idempotency-Key` record, and
//! `app.admin_grant_tokens` in a savepoint. The caller's admin role is read
//! from the database, never from the token's `app_role`; the grant is one
//! balanced journal from the `promotions` account into the user's wallet and
//! one append-only `app.token_grants` row (who, when, whom, how much, why).
//! Refusals (403, 404, 422) are recorded with the key, so a replay answers
//! the same.

use crate::problems::OrProblem;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::post;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use stagepass_ledger::grants::{self, MAX_GRANT, MIN_GRANT};
use stagepass_ledger::{GrantId, TokenAmount, UserId};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::http::{ApiError, ApiResult, JsonBody};
use stagepass_platform::idempotency::{DEFAULT_TTL_HOURS, Idempotency, IdempotencyKey};
use stagepass_platform::serve::{Function, Limits, PlatformHandle};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::UserApi;

pub const FUNCTION: Function = Function {
    name: "v1_admin_users_grants",
    // Money is created here: burst + money + API limits, failing closed.
    limits: Limits::Money,
    paths: &["/api/v1/admin/users/{id}/grants"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/admin/users/{id}/grants", post(create_grant))
                .with_state(api),
        )
    },
};

const ROUTE: &str = "POST /api/v1/admin/users/{id}/grants";

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// 1–10,000 tokens.
    pub amount: i64,
    /// Why (kept in the audit trail): 1–500 characters, no control characters.
    pub reason: String,
}

/// What the key's fingerprint covers: the same key for another user is a
/// different request (422 `idempotency_key_reused`), not a replay.
#[derive(Serialize)]
struct Fingerprinted<'a> {
    user_id: Uuid,
    amount: i64,
    reason: &'a str,
}

impl GrantRequest {
    fn validate(&self) -> Result<TokenAmount, ApiError> {
        let amount = TokenAmount::parse(self.amount, MIN_GRANT, MAX_GRANT).or_problem()?;
        if !grants::valid_reason(&self.reason) {
            return Err(ApiError::field(
                "reason",
                "1–500 characters, no control characters",
            ));
        }
        Ok(amount)
    }
}

#[utoipa::path(post, path = "/api/v1/admin/users/{id}/grants", tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the user receiving the tokens"),
           ("Idempotency-Key" = String, Header, description = "1–255 visible ASCII characters")),
    request_body = GrantRequest,
    responses(
        (status = 201, body = stagepass_ledger::grants::Grant),
        (status = 400, description = "validation_failed (amount, reason, id), missing Idempotency-Key", body = crate::openapi::Problem),
        (status = 403, description = "admin_required: the caller is not an admin in the database", body = crate::openapi::Problem),
        (status = 404, description = "no such user", body = crate::openapi::Problem),
        (status = 409, description = "the same key is in flight", body = crate::openapi::Problem),
        (status = 422, description = "self_grant, idempotency_key_reused", body = crate::openapi::Problem)))]
pub async fn create_grant(
    State(api): State<UserApi>,
    user: AuthUser,
    platform: PlatformHandle,
    Path(id): Path<String>,
    key: IdempotencyKey,
    JsonBody(request): JsonBody<GrantRequest>,
) -> ApiResult<Response> {
    let target = crate::parse_uuid("id", &id)?;
    let amount = request.validate()?;
    let fingerprinted = Fingerprinted {
        user_id: target,
        amount: request.amount,
        reason: &request.reason,
    };
    let idempotency = Idempotency::new(user.id(), ROUTE, key, &fingerprinted, DEFAULT_TTL_HOURS)?;
    let reason = request.reason;
    crate::idempotent::run(
        &api,
        &user,
        &platform,
        &idempotency,
        StatusCode::CREATED,
        |conn| {
            let reason = reason.clone();
            Box::pin(async move {
                let grant = grants::admin_grant(
                    conn,
                    GrantId::new(Uuid::now_v7()),
                    UserId::new(target),
                    amount,
                    &reason,
                )
                .await
                .or_problem()?;
                serde_json::to_value(&grant).map_err(ApiError::internal)
            })
        },
    )
    .await
}
