//! `GET /api/v1/me` — the one authoritative session endpoint for web and
//! mobile — and `PATCH /api/v1/me` (handle and display name only).
//!
//! A user unknown to the database is created on first sight from the
//! verified token (`sub`, `email`) as a fan, inside the same transaction, by
//! `app.ensure_current_user()`. Nothing about identity or role is ever read
//! from a request body.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::db::{self, DbResultExt};
use stagepass_platform::http::{ApiError, ApiResult, FieldError, JsonBody, text};
use stagepass_platform::serve::{Function, Limits};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::UserApi;

pub const FUNCTION: Function = Function {
    name: "v1_me",
    limits: Limits::Authenticated,
    paths: &["/api/v1/me"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/me", get(get_me).patch(patch_me))
                .with_state(api),
        )
    },
};

/// The signed-in user as the server knows them.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Me {
    pub id: Uuid,
    /// `fan`, `creator` or `admin`; changed only by an admin.
    pub role: String,
    pub handle: Option<String>,
    pub display_name: Option<String>,
    /// From the verified token only.
    pub email: Option<String>,
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
    /// Every feature flag and whether it is on for this user (ADR 0016),
    /// from the function's flag cache (no database round trip when warm;
    /// at most `FLAGS_CACHE_SECONDS` old).
    #[sqlx(skip)]
    #[serde(default)]
    pub flags: std::collections::BTreeMap<String, bool>,
}

impl Me {
    /// Fills in the caller's flags (by their role in the database).
    async fn with_flags(mut self, api: &UserApi) -> Me {
        self.flags = api.flags.flags().await.evaluate(self.id, Some(&self.role));
        self
    }
}

/// Makes the caller exist (first sight) and copies the token's e-mail. Its
/// own statement: a statement's snapshot does not see rows written by a
/// function it calls, so reading `user_private` in the same statement would
/// return the e-mail as it was *before* this request.
const ENSURE_ME: &str = "select 1 from app.ensure_current_user()";

/// Creates the caller's user row (and wallet) on first sight, from the
/// verified claims of the transaction. Every route that touches the caller's
/// data calls this first.
pub async fn ensure_user(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(ENSURE_ME).execute(conn).await.map(|_| ())
}

/// `db::begin_user`, then first sight ([`ensure_user`]): the transaction of
/// a route that touches the caller's data.
///
/// First sight is a statement of its own, not part of the `BEGIN` message:
/// it can fail (a claim it cannot read, a lock timeout), and a failure
/// inside the `BEGIN` message happens before sqlx counts the transaction,
/// so nothing would roll it back and the pooled connection would go back
/// to the pool inside an aborted transaction, failing the next requests of
/// other users (`tests/session.rs`). Here it fails inside a transaction
/// sqlx rolls back.
pub async fn begin_seen<'a>(
    pool: &'a sqlx::PgPool,
    claims: &stagepass_platform::auth::Claims,
) -> Result<sqlx::Transaction<'a, sqlx::Postgres>, sqlx::Error> {
    let mut tx = db::begin_user(pool, claims).await?;
    ensure_user(&mut tx).await?;
    Ok(tx)
}

const SELECT_ME: &str = "select u.id, u.role, u.handle, u.display_name, \
     p.email, coalesce(p.email_verified, false) as email_verified, u.created_at \
     from app.users u left join app.user_private p on p.user_id = u.id \
     where u.id = auth.uid()";

#[utoipa::path(get, path = "/api/v1/me", tag = "session", security(("bearer" = [])),
    responses((status = 200, body = Me),
              (status = 401, body = crate::openapi::Problem)))]
pub async fn get_me(State(api): State<UserApi>, user: AuthUser) -> ApiResult<Json<Me>> {
    // One statement: the claims, the `authenticated` role, first sight and
    // the read run inside `app.read_me` (issue 13; RLS applies as in
    // `db::begin_user`).
    let me = db::read_as_user(
        &api.pool,
        sqlx::query_as::<_, Me>(READ_ME).bind(db::claims_text(user.claims())),
    )
    .await?;
    Ok(Json(me.with_flags(&api).await))
}

/// `GET /api/v1/me` in one statement (migration 22).
const READ_ME: &str = "select * from app.read_me($1)";

/// Fields a user may change about themselves. Unknown fields (`role`,
/// `email`, …) are refused with a 400 naming them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MePatch {
    /// 3–30 characters of `a-z`, `0-9`, `_` (case-insensitive; stored lower-case).
    pub handle: Option<String>,
    /// 1–60 characters, no control characters.
    pub display_name: Option<String>,
}

impl MePatch {
    /// Parses into normalised values, or every field error at once.
    fn parse(self) -> Result<(Option<String>, Option<String>), ApiError> {
        let mut errors = Vec::new();
        let handle = self.handle.map(|h| h.trim().to_ascii_lowercase());
        if let Some(h) = &handle
            && (!(3..=30).contains(&h.len())
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        {
            errors.push(FieldError {
                field: "handle".into(),
                message: "must be 3–30 characters of a-z, 0-9 and _".into(),
            });
        }
        let display_name = self.display_name.map(|d| d.trim().to_owned());
        if let Some(d) = &display_name
            && (!(1..=60).contains(&d.chars().count())
                || text::check_single_line("display_name", d).is_err())
        {
            errors.push(FieldError {
                field: "display_name".into(),
                message:
                    "must be 1–60 characters on one line, without control or format characters"
                        .into(),
            });
        }
        if handle.is_none() && display_name.is_none() && errors.is_empty() {
            errors.push(FieldError {
                field: "body".into(),
                message: "give handle and/or display_name".into(),
            });
        }
        if errors.is_empty() {
            Ok((handle, display_name))
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

#[utoipa::path(patch, path = "/api/v1/me", tag = "session", security(("bearer" = [])),
    request_body = MePatch,
    responses((status = 200, body = Me),
              (status = 400, body = crate::openapi::Problem),
              (status = 409, description = "handle taken", body = crate::openapi::Problem)))]
pub async fn patch_me(
    State(api): State<UserApi>,
    user: AuthUser,
    JsonBody(patch): JsonBody<MePatch>,
) -> ApiResult<Json<Me>> {
    let (handle, display_name) = patch.parse()?;
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    // Runs under RLS as `authenticated`: the policy and the column grants
    // allow exactly this row and exactly these two columns.
    sqlx::query(ENSURE_ME).execute(&mut *tx).await?;
    sqlx::query(
        "update app.users set handle = coalesce($1, handle), \
         display_name = coalesce($2, display_name) where id = auth.uid()",
    )
    .bind(handle)
    .bind(display_name)
    .execute(&mut *tx)
    .await
    .on_constraint("users_handle_key", || {
        ApiError::Conflict(
            stagepass_platform::http::codes::HANDLE_TAKEN,
            "that handle is taken".into(),
        )
    })?;
    let me = sqlx::query_as::<_, Me>(SELECT_ME)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Json(me.with_flags(&api).await))
}
