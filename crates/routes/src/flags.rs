//! `/api/v1/admin/flags` and `/api/v1/admin/flags/{key}` — admins list,
//! create and change feature flags (issue 15, ADR 0016).
//!
//! Like the role route: the caller must be an admin *in the database*
//! (`app.admin_change_flag` / `app.admin_list_flags` check it; a token claim
//! is never trusted), each change needs a reason, and every change is one
//! row of the append-only `app.feature_flag_changes` (who, when, before,
//! after, why), written in the same transaction. `authenticated` has no
//! privilege on the flag tables: these definer functions are the only door.
//!
//! Functions see a change within their `FLAGS_CACHE_SECONDS` (default 5).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stagepass_ledger::sqlstate::{self, Refusal};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::flags::{self, FlagFields};
use stagepass_platform::http::{ApiError, ApiResult, FieldError, JsonBody, codes};
use stagepass_platform::serve::{Function, Limits};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::UserApi;
use crate::admin::Role;

pub const COLLECTION: Function = Function {
    name: "v1_admin_flags",
    limits: Limits::Authenticated,
    paths: &["/api/v1/admin/flags"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/admin/flags", get(list_flags).post(create_flag))
                .with_state(api),
        )
    },
};

pub const ITEM: Function = Function {
    name: "v1_admin_flags_key",
    limits: Limits::Authenticated,
    paths: &["/api/v1/admin/flags/{key}"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/admin/flags/{key}", get(get_flag).patch(patch_flag))
                .with_state(api),
        )
    },
};

/// A feature flag as stored. On for a user when enabled and (first match
/// wins): not on `deny_users`; on `allow_users`; `roles` empty or holding
/// the user's role, and the user's bucket (0–9,999, a hash of key and user
/// id) below `rollout_basis_points`.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct FeatureFlag {
    pub key: String,
    pub description: String,
    /// Off: off for everyone, the allow list included (the kill switch).
    pub enabled: bool,
    /// 0–10,000: 500 is 5 % of the users who pass the lists and roles.
    pub rollout_basis_points: i32,
    /// Always on (when enabled), whatever the role and rollout.
    pub allow_users: Vec<Uuid>,
    /// Always off; wins over the allow list.
    pub deny_users: Vec<Uuid>,
    /// Empty: every role. Otherwise only these roles get the rollout.
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FlagList {
    /// Every flag, by key.
    pub flags: Vec<FeatureFlag>,
}

/// A new flag. Absent fields take their defaults (off, 0 basis points, no
/// lists, every role).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewFlag {
    /// 2–40 characters of a-z, 0-9 and _, starting with a letter.
    pub key: String,
    /// What the flag gates: 1–500 characters, no control characters.
    pub description: String,
    pub enabled: Option<bool>,
    /// 0–10,000 (basis points: 500 = 5 %).
    pub rollout_basis_points: Option<i64>,
    /// At most 1,000 user ids.
    pub allow_users: Option<Vec<Uuid>>,
    /// At most 1,000 user ids.
    pub deny_users: Option<Vec<Uuid>>,
    pub roles: Option<Vec<Role>>,
    /// Why (kept in the audit trail): 1–500 characters, no control characters.
    pub reason: String,
}

/// A change: the fields given replace the stored ones (lists are replaced
/// whole); at least one besides `reason`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlagPatch {
    /// 1–500 characters, no control characters.
    pub description: Option<String>,
    pub enabled: Option<bool>,
    /// 0–10,000 (basis points: 500 = 5 %).
    pub rollout_basis_points: Option<i64>,
    /// At most 1,000 user ids.
    pub allow_users: Option<Vec<Uuid>>,
    /// At most 1,000 user ids.
    pub deny_users: Option<Vec<Uuid>>,
    pub roles: Option<Vec<Role>>,
    /// Why (kept in the audit trail): 1–500 characters, no control characters.
    pub reason: String,
}

fn reason_error(reason: &str) -> Option<FieldError> {
    (!flags::valid_text(reason)).then(|| FieldError {
        field: "reason".into(),
        message: flags::TEXT_RULE.into(),
    })
}

impl NewFlag {
    fn parse(self) -> Result<(String, FlagFields, String), ApiError> {
        let mut errors = Vec::new();
        if !flags::valid_key(&self.key) {
            errors.push(FieldError {
                field: "key".into(),
                message: flags::KEY_RULE.into(),
            });
        }
        let patch = FlagPatch {
            description: Some(self.description),
            enabled: self.enabled,
            rollout_basis_points: self.rollout_basis_points,
            allow_users: self.allow_users,
            deny_users: self.deny_users,
            roles: self.roles,
            reason: self.reason,
        };
        let (fields, reason) = patch.checked(errors)?;
        Ok((self.key, fields, reason))
    }
}

impl FlagPatch {
    /// The fields and the reason, every problem (with `errors` found
    /// before) reported at once.
    fn checked(self, mut errors: Vec<FieldError>) -> Result<(FlagFields, String), ApiError> {
        errors.extend(reason_error(&self.reason));
        let fields = FlagFields {
            description: self.description,
            enabled: self.enabled,
            rollout_basis_points: self.rollout_basis_points,
            allow_users: self.allow_users,
            deny_users: self.deny_users,
            roles: self
                .roles
                .map(|r| r.into_iter().map(|r| r.as_str().to_owned()).collect()),
        };
        errors.extend(fields.errors());
        if errors.is_empty() {
            Ok((fields, self.reason))
        } else {
            Err(ApiError::Validation(errors))
        }
    }

    fn parse(self) -> Result<(FlagFields, String), ApiError> {
        let (fields, reason) = self.checked(Vec::new())?;
        // Well-formed but nothing to do: 422 (the document allows a body of
        // `reason` alone; the change it asks for is empty).
        if fields.is_empty() {
            return Err(ApiError::Unprocessable(
                codes::NOTHING_TO_CHANGE,
                "give at least one field to change besides reason".into(),
            ));
        }
        Ok((fields, reason))
    }
}

fn path_key(key: &str) -> Result<(), ApiError> {
    if flags::valid_key(key) {
        Ok(())
    } else {
        Err(ApiError::field("key", flags::KEY_RULE))
    }
}

/// The SQLSTATEs of migration 18's flag functions (`ledger::sqlstate`, the
/// one table of our codes).
fn explain(e: sqlx::Error) -> ApiError {
    let Some(raised) = sqlstate::raised(&e) else {
        return e.into();
    };
    match raised.refusal {
        Refusal::FlagAdminRequired => ApiError::Forbidden(codes::ADMIN_REQUIRED),
        Refusal::InvalidFlagReason => ApiError::field("reason", flags::TEXT_RULE),
        Refusal::FlagExists => ApiError::Conflict(
            codes::FLAG_EXISTS,
            "a flag with this key already exists".into(),
        ),
        Refusal::UnknownFlag => ApiError::NotFound,
        Refusal::InvalidFlagFields => ApiError::field("body", "a field is out of range"),
        _ => e.into(),
    }
}

const LIST: &str = "select key, description, enabled, rollout_basis_points, allow_users, \
     deny_users, roles, created_at, updated_at from app.admin_list_flags($1)";
const CHANGE: &str = "select key, description, enabled, rollout_basis_points, allow_users, \
     deny_users, roles, created_at, updated_at from app.admin_change_flag($1, $2, $3, $4)";

async fn read(api: &UserApi, user: &AuthUser, key: Option<&str>) -> ApiResult<Vec<FeatureFlag>> {
    let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
    let flags = sqlx::query_as::<_, FeatureFlag>(LIST)
        .bind(key)
        .fetch_all(&mut *tx)
        .await
        .map_err(explain)?;
    tx.commit().await?;
    Ok(flags)
}

async fn change(
    api: &UserApi,
    user: &AuthUser,
    key: &str,
    create: bool,
    fields: &FlagFields,
    reason: &str,
) -> ApiResult<FeatureFlag> {
    let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
    let flag = sqlx::query_as::<_, FeatureFlag>(CHANGE)
        .bind(key)
        .bind(create)
        .bind(fields.to_patch())
        .bind(reason)
        .fetch_one(&mut *tx)
        .await
        .map_err(explain)?;
    tx.commit().await?;
    Ok(flag)
}

#[utoipa::path(get, path = "/api/v1/admin/flags", tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, body = FlagList),
              (status = 403, description = "admin_required: the caller is not an admin in the database", body = crate::openapi::Problem)))]
pub async fn list_flags(State(api): State<UserApi>, user: AuthUser) -> ApiResult<Json<FlagList>> {
    Ok(Json(FlagList {
        flags: read(&api, &user, None).await?,
    }))
}

#[utoipa::path(post, path = "/api/v1/admin/flags", tag = "admin",
    security(("bearer" = [])),
    request_body = NewFlag,
    responses((status = 201, body = FeatureFlag),
              (status = 400, description = "validation_failed (key, description, rollout_basis_points, allow_users, deny_users, roles, reason)", body = crate::openapi::Problem),
              (status = 403, description = "admin_required: the caller is not an admin in the database", body = crate::openapi::Problem),
              (status = 409, description = "flag_exists: a flag with this key already exists", body = crate::openapi::Problem)))]
pub async fn create_flag(
    State(api): State<UserApi>,
    user: AuthUser,
    JsonBody(request): JsonBody<NewFlag>,
) -> ApiResult<(StatusCode, Json<FeatureFlag>)> {
    let (key, fields, reason) = request.parse()?;
    let flag = change(&api, &user, &key, true, &fields, &reason).await?;
    Ok((StatusCode::CREATED, Json(flag)))
}

#[utoipa::path(get, path = "/api/v1/admin/flags/{key}", tag = "admin",
    security(("bearer" = [])),
    params(("key" = String, Path, description = "the flag's key")),
    responses((status = 200, body = FeatureFlag),
              (status = 400, description = "validation_failed: not a flag key", body = crate::openapi::Problem),
              (status = 403, description = "admin_required: the caller is not an admin in the database", body = crate::openapi::Problem),
              (status = 404, description = "no such flag", body = crate::openapi::Problem)))]
pub async fn get_flag(
    State(api): State<UserApi>,
    user: AuthUser,
    Path(key): Path<String>,
) -> ApiResult<Json<FeatureFlag>> {
    path_key(&key)?;
    read(&api, &user, Some(&key))
        .await?
        .into_iter()
        .next()
        .map(Json)
        .ok_or(ApiError::NotFound)
}

#[utoipa::path(patch, path = "/api/v1/admin/flags/{key}", tag = "admin",
    security(("bearer" = [])),
    params(("key" = String, Path, description = "the flag's key")),
    request_body = FlagPatch,
    responses((status = 200, description = "the flag after the change (unchanged and not recorded when nothing differs)", body = FeatureFlag),
              (status = 400, description = "validation_failed (key, description, rollout_basis_points, allow_users, deny_users, roles, reason)", body = crate::openapi::Problem),
              (status = 403, description = "admin_required: the caller is not an admin in the database", body = crate::openapi::Problem),
              (status = 404, description = "no such flag", body = crate::openapi::Problem),
              (status = 422, description = "nothing_to_change: no field to change besides reason", body = crate::openapi::Problem)))]
pub async fn patch_flag(
    State(api): State<UserApi>,
    user: AuthUser,
    Path(key): Path<String>,
    JsonBody(request): JsonBody<FlagPatch>,
) -> ApiResult<Json<FeatureFlag>> {
    path_key(&key)?;
    let (fields, reason) = request.parse()?;
    Ok(Json(
        change(&api, &user, &key, false, &fields, &reason).await?,
    ))
}
