//! `POST /api/v1/realtime/token` — an Ably token for the caller.
//!
//! The server alone decides what the token allows (SPEC §6, defect 11):
//! subscribe on the caller's own `user:{id}` channel, and subscribe +
//! presence on `class:{id}` for each class the caller hosts or is enrolled
//! in that has not ended. The client id is the caller's user id. Nothing
//! of the request body is used; a body asking for anything is refused.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, State};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stagepass_integrations::ably::{self, AblyKey, Capability};
use stagepass_platform::auth::{AuthUser, Verifier};
use stagepass_platform::config::{AblyConfig, ExposeSecret};
use stagepass_platform::http::{ApiError, ApiResult};
use stagepass_platform::serve::{Function, Limits};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::UserApi;

pub const FUNCTION: Function = Function {
    name: "v1_realtime_token",
    limits: Limits::Authenticated,
    paths: &["/api/v1/realtime/token"],
    build: |l, r| {
        let api = UserApi::load(l, r);
        let key = AblyConfig::load(l).and_then(|c| AblyKey::parse(c.api_key.expose_secret()));
        Some(
            Router::new()
                .route("/api/v1/realtime/token", post(realtime_token))
                .with_state(RealtimeState {
                    api: api?,
                    key: key?,
                    clock: r.clock.clone(),
                }),
        )
    },
};

/// How long a token is valid; the Ably client asks for a new one before.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Most class channels in one token (the soonest first).
pub const MAX_CLASS_CHANNELS: i64 = 100;

#[derive(Clone)]
pub struct RealtimeState {
    api: UserApi,
    key: AblyKey,
    clock: stagepass_platform::time::Clock,
}

impl FromRef<RealtimeState> for Arc<Verifier> {
    fn from_ref(s: &RealtimeState) -> Arc<Verifier> {
        s.api.verifier.clone()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RealtimeToken {
    /// An Ably JWT: pass it to the Ably client as its token.
    pub token: String,
    /// The caller's user id (Ably client id).
    pub client_id: Uuid,
    pub expires_at: DateTime<Utc>,
    /// What the token allows, per channel (for information; the token is
    /// what Ably enforces).
    #[schema(value_type = Object)]
    pub capability: std::collections::BTreeMap<String, Vec<String>>,
}

/// The body may be absent or `{}`; capabilities are never taken from it.
fn check_body(body: &[u8]) -> ApiResult<()> {
    let text = std::str::from_utf8(body).map_err(|_| refused())?.trim();
    if text.is_empty() {
        return Ok(());
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) if m.is_empty() => Ok(()),
        _ => Err(refused()),
    }
}

fn refused() -> ApiError {
    ApiError::field(
        "body",
        "send no body: the server decides the token's channels and capabilities",
    )
}

/// A token for Ably with server-decided capabilities.
#[utoipa::path(post, path = "/api/v1/realtime/token", tag = "realtime",
    security(("bearer" = [])),
    responses((status = 200, body = RealtimeToken),
              (status = 400, description = "a body asking for capabilities", body = crate::openapi::Problem),
              (status = 503, description = "Ably is not configured", body = crate::openapi::Problem)))]
pub async fn realtime_token(
    State(s): State<RealtimeState>,
    user: AuthUser,
    body: Bytes,
) -> ApiResult<Json<RealtimeToken>> {
    check_body(&body)?;
    let mut tx = crate::me::begin_seen(&s.api.pool, user.claims()).await?;
    // The caller's classes from both sides, each through its own index
    // (hosted: `classes_creator` from 8 hours back, the longest class;
    // attended: `enrollments_user_enrolled`), not a walk over every
    // upcoming class (it grew with the table: docs/RELIABILITY.md, Soak).
    let classes: Vec<Uuid> = sqlx::query_scalar(
        "select c.id from app.classes c \
          where c.id = any (array( \
                  select h.id from app.classes h \
                   where h.creator_id = auth.uid() \
                     and h.starts_at > app.now() - interval '480 minutes' \
                  union \
                  select e.class_id from app.enrollments e \
                   where e.user_id = auth.uid() and e.status = 'enrolled')) \
            and c.status = 'scheduled' \
            and c.starts_at + make_interval(mins => c.duration_minutes) > app.now() \
          order by c.starts_at, c.id limit $1",
    )
    .bind(MAX_CLASS_CHANNELS)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;

    let mut capability = Capability::new();
    capability.insert(format!("user:{}", user.id()), vec!["subscribe"]);
    for class in classes {
        capability.insert(format!("class:{class}"), vec!["subscribe", "presence"]);
    }
    let now = s.clock.now();
    let client_id = user.id().to_string();
    let token = ably::token(&s.key, &client_id, &capability, now.timestamp(), TOKEN_TTL)
        .map_err(ApiError::internal)?;
    let expires_at =
        now + chrono::Duration::seconds(i64::try_from(TOKEN_TTL.as_secs()).unwrap_or(3600));
    Ok(Json(RealtimeToken {
        token,
        client_id: user.id(),
        expires_at,
        capability: capability
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(str::to_owned).collect()))
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_an_empty_body_is_accepted() {
        for ok in ["", "  ", "{}", " { } "] {
            assert!(super::check_body(ok.as_bytes()).is_ok(), "{ok:?}");
        }
        for bad in [
            r#"{"capability":{"*":["*"]}}"#,
            r#"{"clientId":"someone"}"#,
            "[]",
            "null",
            "x",
        ] {
            assert!(super::check_body(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
