//! `POST /api/v1/auth/access-token-hook` — Supabase's custom access token
//! hook over HTTP. Supabase calls it when it issues a token; we answer with
//! the claims plus `app_role`, the user's role from our database. A frontend
//! therefore knows creator/fan/admin from the first frame (no role flicker),
//! and the role still comes from one authority: `app.users.role`.
//!
//! The call is signed per Standard Webhooks: `webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`, keyed with the base64 secret after
//! `v1,whsec_`.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use stagepass_platform::config::{AuthHookConfig, DbConfig, ExposeSecret, Secret};
use stagepass_platform::db;
use stagepass_platform::http::{ApiError, ApiResult, codes};
use stagepass_platform::ratelimit::{SignatureGate, SignedSource};
use stagepass_platform::serve::{Function, Limits};
use stagepass_platform::time::Clock;
use uuid::Uuid;

pub const FUNCTION: Function = Function {
    name: "v1_auth_access_token_hook",
    limits: Limits::Signed(SignedSource::SupabaseAuth),
    paths: &["/api/v1/auth/access-token-hook"],
    build: |l, r| {
        let db = DbConfig::load(l);
        let hook = AuthHookConfig::load(l);
        let state = HookState {
            pool: r.db(&db?)?,
            key: HookKey::from_secret(&hook?.secret)?,
            clock: r.clock.clone(),
        };
        Some(
            Router::new()
                .route("/api/v1/auth/access-token-hook", post(access_token_hook))
                .with_state(state),
        )
    },
};

/// Signatures older or newer than this are refused (replay window).
pub const TOLERANCE_SECONDS: i64 = 5 * 60;

#[derive(Clone)]
pub struct HookState {
    pub pool: PgPool,
    pub key: HookKey,
    pub clock: Clock,
}

/// The decoded Standard Webhooks key.
#[derive(Clone)]
pub struct HookKey(std::sync::Arc<[u8]>);

impl HookKey {
    pub fn from_secret(secret: &Secret) -> Option<HookKey> {
        let b64 = secret.expose_secret().strip_prefix("v1,whsec_")?;
        let key = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        Some(HookKey(key.into()))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value for a payload (tests and tools).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag)
        )
    }

    /// Verifies the three Standard Webhooks headers against the raw body.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now_unix: i64) -> Result<(), ApiError> {
        let bad = || ApiError::Unauthenticated(codes::INVALID_SIGNATURE);
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(bad)
        };
        let id = header("webhook-id")?;
        let timestamp = header("webhook-timestamp")?;
        let signatures = header("webhook-signature")?;
        let ts: i64 = timestamp.parse().map_err(|_| bad())?;
        if (now_unix - ts).abs() > TOLERANCE_SECONDS {
            return Err(ApiError::Unauthenticated(codes::STALE_SIGNATURE));
        }
        let expected = self.mac(id, timestamp, body);
        // Several space-separated signatures may be sent during key rotation;
        // any valid one is enough. `verify_slice` compares in constant time.
        let ok = signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .any(|sig| expected.clone().verify_slice(&sig).is_ok());
        if ok { Ok(()) } else { Err(bad()) }
    }
}

/// Answers Supabase with the claims it sent plus `app_role`.
pub async fn access_token_hook(
    State(state): State<HookState>,
    gate: SignatureGate,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    // Verified before any budget is charged: forged calls cannot starve
    // sign-ins (ADR 0011).
    gate.admit(
        state
            .key
            .verify(&headers, &body, state.clock.now().timestamp()),
    )
    .await?;
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("the body is not JSON".into()))?;
    let user_id = payload
        .get("user_id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| ApiError::field("user_id", "must be a UUID"))?;
    let Some(Value::Object(mut claims)) = payload.get("claims").cloned() else {
        return Err(ApiError::field("claims", "must be an object"));
    };
    let mut tx = db::begin_service(&state.pool).await?;
    let role: Option<String> = sqlx::query_scalar("select role from app.users where id = $1")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    // A user we have not seen yet becomes a fan on first sight; so is their
    // first token. Whatever the claims said about `app_role` is overwritten.
    claims.insert(
        "app_role".into(),
        Value::String(role.unwrap_or_else(|| "fan".into())),
    );
    Ok(Json(json!({ "claims": claims })))
}
