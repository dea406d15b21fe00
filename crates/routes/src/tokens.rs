//! Token packages, the caller's balance and ledger.

use crate::problems::OrProblem;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use stagepass_ledger::packages::{PACKAGES, Package};
use stagepass_ledger::{Balance, Entry};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::db;
use stagepass_platform::http::{ApiError, ApiResult};
use stagepass_platform::serve::{Function, Limits};
use utoipa::{IntoParams, ToSchema};

use crate::UserApi;

pub const PACKAGES_FUNCTION: Function = Function {
    name: "v1_tokens_packages",
    limits: Limits::Public,
    paths: &["/api/v1/tokens/packages"],
    build: |_, _| Some(Router::new().route("/api/v1/tokens/packages", get(packages))),
};

pub const BALANCE_FUNCTION: Function = Function {
    name: "v1_tokens_balance",
    limits: Limits::Authenticated,
    paths: &["/api/v1/tokens/balance"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/tokens/balance", get(balance))
                .with_state(api),
        )
    },
};

pub const LEDGER_FUNCTION: Function = Function {
    name: "v1_tokens_ledger",
    limits: Limits::Authenticated,
    paths: &["/api/v1/tokens/ledger"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/tokens/ledger", get(ledger))
                .with_state(api),
        )
    },
};

#[derive(Serialize, ToSchema)]
pub struct Packages {
    pub packages: &'static [Package],
    /// What one token pays a creator, in USD cents.
    pub payout_cents_per_token: i64,
}

/// The purchasable token packages.
#[utoipa::path(get, path = "/api/v1/tokens/packages", tag = "tokens",
    responses((status = 200, body = Packages)))]
pub async fn packages() -> Json<Packages> {
    Json(Packages {
        packages: &PACKAGES,
        payout_cents_per_token: stagepass_ledger::payouts::CENTS_PER_TOKEN,
    })
}

/// The caller's balance, debt and daily spending position.
#[utoipa::path(get, path = "/api/v1/tokens/balance", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = Balance), (status = 401, body = crate::openapi::Problem)))]
pub async fn balance(State(api): State<UserApi>, user: AuthUser) -> ApiResult<Json<Balance>> {
    // One statement (issue 13): claims, role, first sight and the read.
    let balance = db::read_as_user(
        &api.pool,
        sqlx::query_as::<_, Balance>("select * from app.read_balance($1)")
            .bind(db::claims_text(user.claims())),
    )
    .await?;
    Ok(Json(balance))
}

/// Largest page of ledger entries.
pub const MAX_PAGE: i32 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    /// Cursor from the previous page's `next_cursor` (entry ids are
    /// positive; 0 and below are refused with 400).
    #[param(minimum = 1)]
    pub cursor: Option<i64>,
    /// 1–100, default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i32>,
}

#[derive(Serialize, ToSchema)]
pub struct LedgerPage {
    pub entries: Vec<Entry>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// The caller's own ledger entries, newest first.
#[utoipa::path(get, path = "/api/v1/tokens/ledger", tag = "tokens", security(("bearer" = [])),
    params(LedgerQuery),
    responses((status = 200, body = LedgerPage), (status = 400, body = crate::openapi::Problem)))]
pub async fn ledger(
    State(api): State<UserApi>,
    user: AuthUser,
    query: Result<Query<LedgerQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<LedgerPage>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    // Entry ids are positive; anything else is not a cursor we gave out.
    if q.cursor.is_some_and(|c| c < 1) {
        return Err(ApiError::field(
            "cursor",
            "not a cursor from a previous page",
        ));
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 100"));
    }
    // One statement as the caller (ADR 0020).
    let claims = db::claims_text(user.claims());
    let entries = db::traced_read(stagepass_ledger::read_entries(
        &api.pool, &claims, q.cursor, limit,
    ))
    .await
    .or_problem()?;
    let next_cursor = if entries.len() == usize::try_from(limit).unwrap_or(0) {
        entries.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Json(LedgerPage {
        entries,
        next_cursor,
    }))
}
