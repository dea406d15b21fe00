//! `PUT /api/v1/admin/users/{id}/role` — the only way a role changes through
//! the API. The caller must be an admin in the database (never by a token
//! claim); every change is recorded in the append-only `app.role_changes`.

use axum::extract::{Path, State};
use axum::routing::put;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::db;
use stagepass_platform::http::{ApiError, ApiResult, JsonBody, codes};
use stagepass_platform::serve::{Function, Limits};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::UserApi;

pub const ROLE: Function = Function {
    name: "v1_admin_users_role",
    limits: Limits::Authenticated,
    paths: &["/api/v1/admin/users/{id}/role"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/admin/users/{id}/role", put(set_role))
                .with_state(api),
        )
    },
};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Fan,
    Creator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Fan => "fan",
            Role::Creator => "creator",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    pub role: Role,
    /// Why (kept in the audit log), at most 500 characters.
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoleChanged {
    pub user_id: Uuid,
    pub role: String,
    pub previous_role: String,
}

#[utoipa::path(put, path = "/api/v1/admin/users/{id}/role", tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the user's id")),
    request_body = RoleChange,
    responses((status = 200, body = RoleChanged),
              (status = 403, description = "caller is not an admin", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem),
              (status = 409, description = "would remove the last admin", body = crate::openapi::Problem)))]
pub async fn set_role(
    State(api): State<UserApi>,
    user: AuthUser,
    Path(id): Path<String>,
    JsonBody(change): JsonBody<RoleChange>,
) -> ApiResult<Json<RoleChanged>> {
    let target = crate::parse_uuid("id", &id)?;
    if change
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 500)
    {
        return Err(ApiError::field("reason", "at most 500 characters"));
    }
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    sqlx::query("select 1 from app.ensure_current_user()")
        .execute(&mut *tx)
        .await?;
    let previous: String = sqlx::query_scalar("select app.admin_set_role($1, $2, $3)")
        .bind(target)
        .bind(change.role.as_str())
        .bind(change.reason)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match db::sqlstate(&e).as_deref() {
            Some("42501") => ApiError::Forbidden(codes::ADMIN_REQUIRED),
            Some("P0002") => ApiError::NotFound,
            Some("P0001") => {
                ApiError::Conflict(codes::LAST_ADMIN, "cannot remove the last admin".into())
            }
            _ => e.into(),
        })?;
    tx.commit().await?;
    Ok(Json(RoleChanged {
        user_id: target,
        role: change.role.as_str().to_owned(),
        previous_role: previous,
    }))
}
