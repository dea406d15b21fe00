//! Supabase access tokens, verified locally.
//!
//! A token is accepted only when all of this holds:
//!
//! - it has exactly three non-empty base64url parts and a JSON object header;
//! - its `alg` is `HS256` (and a project secret is configured: HS256 tokens
//!   are checked with that secret only) or `ES256` / `RS256` (checked with
//!   the JWKS key whose `kid` **and** key type / algorithm match the header;
//!   never with the secret, and JWKS `oct` keys are ignored). Everything
//!   else, `none` included, is refused, so there is no algorithm confusion;
//! - the signature verifies;
//! - `aud` is (or contains) `authenticated`, `iss` is exactly the configured
//!   issuer, `exp` is present and not past, `nbf` (if present) not in the
//!   future — both with 30 s of leeway — and `sub` is a UUID; `role`, when
//!   present, is `authenticated` (the anon and service keys are refused).
//!
//! The JWKS is fetched lazily (3 s timeout), cached for 10 minutes and
//! refetched on an unknown `kid` at most once per 30 s, so a flood of random
//! `kid`s cannot turn into a flood of fetches. A failed fetch keeps the
//! cached keys; with nothing cached, verification reports
//! [`AuthError::JwksUnavailable`] (503) instead of "invalid token".
//!
//! Tokens are never logged, and no error message contains token content.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::AUTHORIZATION;
use http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};

use crate::config::{AuthConfig, ExposeSecret, Secret};
use crate::http::problem::ApiError;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

/// The audience of Supabase user access tokens.
pub const AUDIENCE: &str = "authenticated";
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;
/// Longer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// At most this many usable keys are kept from a JWKS.
const MAX_JWKS_KEYS: usize = 20;
/// A larger JWKS response is refused.
const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Verified claims of a Supabase access token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// User id (Supabase `auth.users.id`).
    pub sub: uuid::Uuid,
    /// From the `email` claim only (an empty string counts as absent).
    pub email: Option<String>,
    /// `user_metadata.email_verified`, else a top-level `email_verified`, else false.
    pub email_verified: bool,
    /// The `app_role` claim added by our access-token hook. Informational
    /// only: authorization uses the database.
    pub app_role: Option<String>,
    pub session_id: Option<String>,
    pub exp: i64,
    /// The full verified claims object (set as `request.jwt.claims` in Postgres).
    pub raw: Value,
}

/// Why a token was refused. The messages never contain token content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    UnsupportedAlgorithm,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's signing key is unknown")]
    UnknownKey,
    #[error("the signing keys (JWKS) could not be loaded")]
    JwksUnavailable,
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    #[error("the token's `{0}` claim is invalid")]
    InvalidClaim(&'static str),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::JwksUnavailable => ApiError::Unavailable(
                crate::http::codes::AUTH_UNAVAILABLE,
                "access tokens cannot be verified right now; retry shortly".into(),
            ),
            _ => ApiError::Unauthenticated(crate::http::codes::INVALID_TOKEN),
        }
    }
}

/// Verifies Supabase access tokens. `Send + Sync`; share it in an `Arc`.
pub struct Verifier {
    issuer: String,
    hs256: Option<DecodingKey>,
    jwks: Option<Jwks>,
    validation_hs256: Validation,
    validation_es256: Validation,
    validation_rs256: Validation,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("hs256", &self.hs256.is_some())
            .field("jwks_url", &self.jwks.as_ref().map(|j| j.url.as_str()))
            .finish()
    }
}

impl Verifier {
    /// HS256 with the project secret (when configured) and ES256/RS256 with
    /// the project's JWKS.
    pub fn new(cfg: &AuthConfig, http: reqwest::Client) -> Verifier {
        Verifier::with_parts(
            cfg.issuer(),
            cfg.jwt_secret.clone(),
            Some(cfg.jwks_url()),
            http,
        )
    }

    /// Explicit issuer, HS256 secret and JWKS URL (tests, tools). An empty
    /// secret counts as none; without a JWKS URL only HS256 is accepted.
    pub fn with_parts(
        issuer: String,
        hs256_secret: Option<Secret>,
        jwks_url: Option<String>,
        http: reqwest::Client,
    ) -> Verifier {
        let hs256 = hs256_secret
            .as_ref()
            .map(|s| s.expose_secret().as_bytes())
            .filter(|s| !s.is_empty())
            .map(DecodingKey::from_secret);
        let jwks = jwks_url.map(|url| Jwks {
            url,
            http,
            timing: JwksTiming::default(),
            state: RwLock::new(JwksState::default()),
            fetch_lock: Mutex::new(()),
        });
        Verifier {
            validation_hs256: validation(Algorithm::HS256, &issuer),
            validation_es256: validation(Algorithm::ES256, &issuer),
            validation_rs256: validation(Algorithm::RS256, &issuer),
            issuer,
            hs256,
            jwks,
        }
    }

    /// Overrides the JWKS cache timing (tests of rotation and caching).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_jwks_timing(
        mut self,
        cache_ttl: Duration,
        min_refetch_interval: Duration,
        failure_backoff: Duration,
    ) -> Verifier {
        if let Some(jwks) = &mut self.jwks {
            jwks.timing.ttl = cache_ttl;
            jwks.timing.min_refetch = min_refetch_interval;
            jwks.timing.failure_backoff = failure_backoff;
        }
        self
    }

    /// The issuer tokens must carry.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies `token` (without the `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = parse_header(token)?;
        let claims = match header.alg {
            Algorithm::HS256 => {
                let key = self.hs256.as_ref().ok_or(AuthError::UnsupportedAlgorithm)?;
                decode(token, key, &self.validation_hs256)?
            }
            Algorithm::ES256 | Algorithm::RS256 => {
                let jwks = self.jwks.as_ref().ok_or(AuthError::UnsupportedAlgorithm)?;
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                let key = jwks.key(kid, header.alg).await?;
                let validation = if header.alg == Algorithm::ES256 {
                    &self.validation_es256
                } else {
                    &self.validation_rs256
                };
                decode(token, &key.key, validation)?
            }
            _ => return Err(AuthError::UnsupportedAlgorithm),
        };
        self.claims(claims)
    }

    /// Checks and extracts what the library does not check itself.
    fn claims(&self, raw: Value) -> Result<Claims, AuthError> {
        let obj = raw.as_object().ok_or(AuthError::Malformed)?;
        // The library accepts an array `iss` with one matching member; we
        // want exactly our issuer.
        if obj.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(AuthError::WrongIssuer);
        }
        let sub = match obj.get("sub") {
            None | Some(Value::Null) => return Err(AuthError::MissingClaim("sub")),
            Some(v) => v.as_str().ok_or(AuthError::InvalidClaim("sub"))?,
        };
        let sub = parse_uuid(sub).ok_or(AuthError::InvalidClaim("sub"))?;
        if let Some(role) = obj.get("role")
            && role.as_str() != Some(AUDIENCE)
        {
            return Err(AuthError::InvalidClaim("role"));
        }
        let exp = match obj.get("exp") {
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().map(|f| f as i64))
                .ok_or(AuthError::InvalidClaim("exp"))?,
            None => return Err(AuthError::MissingClaim("exp")),
        };
        let email = obj
            .get("email")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
            .map(str::to_owned);
        let email_verified = obj
            .get("user_metadata")
            .and_then(|m| m.get("email_verified"))
            .and_then(Value::as_bool)
            .or_else(|| obj.get("email_verified").and_then(Value::as_bool))
            .unwrap_or(false);
        let app_role = obj
            .get("app_role")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let session_id = obj
            .get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Claims {
            sub,
            email,
            email_verified,
            app_role,
            session_id,
            exp,
            raw,
        })
    }
}

/// The one claims validation, identical for every key kind but the algorithm.
fn validation(alg: Algorithm, issuer: &str) -> Validation {
    let mut v = Validation::new(alg);
    v.set_audience(&[AUDIENCE]);
    v.set_issuer(&[issuer]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    v.leeway = LEEWAY_SECONDS;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    v
}

fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Value, AuthError> {
    jsonwebtoken::decode::<Value>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|e| map_jwt_error(e.kind()))
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(claim_name(c)),
        ErrorKind::InvalidClaimFormat(c) => AuthError::InvalidClaim(claim_name(c)),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::UnsupportedAlgorithm,
        _ => AuthError::Malformed,
    }
}

fn claim_name(c: &str) -> &'static str {
    match c {
        "exp" => "exp",
        "nbf" => "nbf",
        "aud" => "aud",
        "iss" => "iss",
        "sub" => "sub",
        _ => "unknown",
    }
}

/// Only the canonical hyphenated form (what Supabase issues and Postgres prints).
fn parse_uuid(s: &str) -> Option<uuid::Uuid> {
    if s.len() != 36 {
        return None;
    }
    uuid::Uuid::try_parse(s).ok()
}

struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

/// Shape checks and the header, before any key is looked up.
fn parse_header(token: &str) -> Result<TokenHeader, AuthError> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(AuthError::Malformed);
    }
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| AuthError::Malformed)?;
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("HS256") => Algorithm::HS256,
        Some("ES256") => Algorithm::ES256,
        Some("RS256") => Algorithm::RS256,
        Some(_) => return Err(AuthError::UnsupportedAlgorithm),
        None => return Err(AuthError::Malformed),
    };
    // We understand no extension, so a `crit` header must be refused (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(AuthError::Malformed);
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(AuthError::Malformed),
    };
    if signature.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(TokenHeader { alg, kid })
}

// ---------------------------------------------------------------------------
// JWKS

#[derive(Debug, Clone, Copy)]
struct JwksTiming {
    /// A successfully fetched set is fresh this long.
    ttl: Duration,
    /// With a fresh set, an unknown `kid` refetches at most this often.
    min_refetch: Duration,
    /// With a stale or empty set, a failed fetch is retried at most this often.
    failure_backoff: Duration,
    fetch_timeout: Duration,
}

impl Default for JwksTiming {
    fn default() -> Self {
        JwksTiming {
            ttl: Duration::from_secs(600),
            min_refetch: Duration::from_secs(30),
            failure_backoff: Duration::from_secs(5),
            fetch_timeout: Duration::from_secs(3),
        }
    }
}

struct Jwks {
    url: String,
    http: reqwest::Client,
    timing: JwksTiming,
    state: RwLock<JwksState>,
    /// Single flight: one fetch at a time; waiters re-check the cache.
    fetch_lock: Mutex<()>,
}

#[derive(Default)]
struct JwksState {
    keys: Vec<Arc<VerifyKey>>,
    /// Last successful fetch.
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not.
    attempted_at: Option<Instant>,
}

struct VerifyKey {
    kid: String,
    alg: Algorithm,
    key: DecodingKey,
}

enum Lookup {
    Found(Arc<VerifyKey>),
    Fetch,
    Unknown,
    Unavailable,
}

impl JwksState {
    fn find(&self, kid: &str, alg: Algorithm) -> Option<Arc<VerifyKey>> {
        self.keys
            .iter()
            .find(|k| k.kid == kid && k.alg == alg)
            .cloned()
    }

    fn lookup(&self, kid: &str, alg: Algorithm, now: Instant, t: &JwksTiming) -> Lookup {
        let fresh = self
            .fetched_at
            .is_some_and(|at| now.saturating_duration_since(at) < t.ttl);
        let attempted_within = |d: Duration| {
            self.attempted_at
                .is_some_and(|at| now.saturating_duration_since(at) < d)
        };
        let found = self.find(kid, alg);
        if fresh {
            match found {
                Some(k) => Lookup::Found(k),
                None if attempted_within(t.min_refetch) => Lookup::Unknown,
                None => Lookup::Fetch,
            }
        } else if !attempted_within(t.failure_backoff) {
            Lookup::Fetch
        } else {
            // Stale or empty, and the last attempt failed a moment ago.
            match found {
                Some(k) => Lookup::Found(k),
                None if self.keys.is_empty() => Lookup::Unavailable,
                None => Lookup::Unknown,
            }
        }
    }
}

impl Lookup {
    fn resolve(self) -> Result<Arc<VerifyKey>, AuthError> {
        match self {
            Lookup::Found(k) => Ok(k),
            Lookup::Unknown | Lookup::Fetch => Err(AuthError::UnknownKey),
            Lookup::Unavailable => Err(AuthError::JwksUnavailable),
        }
    }
}

impl Jwks {
    async fn key(&self, kid: &str, alg: Algorithm) -> Result<Arc<VerifyKey>, AuthError> {
        {
            let state = self.state.read().await;
            match state.lookup(kid, alg, Instant::now(), &self.timing) {
                Lookup::Fetch => {}
                other => return other.resolve(),
            }
        }
        let _single_flight = self.fetch_lock.lock().await;
        // Another task may have fetched while we waited.
        {
            let state = self.state.read().await;
            match state.lookup(kid, alg, Instant::now(), &self.timing) {
                Lookup::Fetch => {}
                other => return other.resolve(),
            }
        }
        let result = self.fetch().await;
        let mut state = self.state.write().await;
        let now = Instant::now();
        state.attempted_at = Some(now);
        match result {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "JWKS fetched");
                state.keys = keys;
                state.fetched_at = Some(now);
            }
            Err(e) => {
                tracing::warn!(error = %e, cached_keys = state.keys.len(), "JWKS fetch failed");
                if state.keys.is_empty() {
                    return Err(AuthError::JwksUnavailable);
                }
            }
        }
        state.find(kid, alg).ok_or(AuthError::UnknownKey)
    }

    async fn fetch(&self) -> Result<Vec<Arc<VerifyKey>>, String> {
        let mut response = self
            .http
            .get(&self.url)
            .timeout(self.timing.fetch_timeout)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err("response too large".into());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the body failed: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err("response too large".into());
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body)
    }
}

/// The usable keys of a JWKS document (at most [`MAX_JWKS_KEYS`]).
fn parse_jwks(body: &[u8]) -> Result<Vec<Arc<VerifyKey>>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "the body is not JSON".to_owned())?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| "no `keys` array".to_owned())?;
    let usable: Vec<Arc<VerifyKey>> = keys
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter_map(|jwk| verify_key(&jwk))
        .take(MAX_JWKS_KEYS)
        .map(Arc::new)
        .collect();
    Ok(usable)
}

/// A JWK we may verify with: a `kid`, a signature key, and EC P-256 (ES256)
/// or RSA ≥ 2048 bits (RS256) whose declared `alg`, if any, agrees.
fn verify_key(jwk: &Jwk) -> Option<VerifyKey> {
    let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty())?;
    if let Some(u) = &jwk.common.public_key_use
        && *u != PublicKeyUse::Signature
    {
        return None;
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return None;
    }
    let declared = jwk.common.key_algorithm;
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => {
            if p.curve != EllipticCurve::P256
                || !matches!(declared, None | Some(KeyAlgorithm::ES256))
            {
                return None;
            }
            let x = URL_SAFE_NO_PAD.decode(&p.x).ok()?;
            let y = URL_SAFE_NO_PAD.decode(&p.y).ok()?;
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let key = DecodingKey::from_ec_components(&p.x, &p.y).ok()?;
            Some(VerifyKey {
                kid,
                alg: Algorithm::ES256,
                key,
            })
        }
        AlgorithmParameters::RSA(p) => {
            if !matches!(declared, None | Some(KeyAlgorithm::RS256)) {
                return None;
            }
            let n = URL_SAFE_NO_PAD.decode(&p.n).ok()?;
            let e = URL_SAFE_NO_PAD.decode(&p.e).ok()?;
            let n_bits = n
                .iter()
                .position(|b| *b != 0)
                .map_or(0, |i| (n.len() - i) * 8);
            if n_bits < 2048 || e.is_empty() || e.len() > 8 {
                return None;
            }
            Some(VerifyKey {
                kid,
                alg: Algorithm::RS256,
                key: DecodingKey::from_rsa_raw_components(&n, &e),
            })
        }
        // Symmetric (`oct`) and other keys are never used.
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Extractors

/// A request with `Authorization: Bearer <token>`, verified. A missing
/// header is `401 missing_token`; any other problem `401 invalid_token`
/// (or `503 auth_unavailable` when the signing keys cannot be loaded).
#[derive(Debug, Clone)]
pub struct AuthUser(pub Arc<Claims>);

impl AuthUser {
    pub fn id(&self) -> uuid::Uuid {
        self.0.sub
    }

    pub fn claims(&self) -> &Claims {
        &self.0
    }
}

/// Like [`AuthUser`], but no `Authorization` header gives `None`. A header
/// that is present but not a valid bearer token is still refused.
#[derive(Debug, Clone)]
pub struct MaybeAuthUser(pub Option<AuthUser>);

/// The `Authorization` header: `Ok(None)` when absent, an error when repeated.
fn authorization(parts: &Parts) -> Result<Option<http::HeaderValue>, ApiError> {
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::Unauthenticated(crate::http::codes::INVALID_TOKEN));
    }
    Ok(Some(value.clone()))
}

/// The token of exactly `Bearer <token>` (scheme case-insensitive).
fn bearer_token(value: &http::HeaderValue) -> Result<&str, ApiError> {
    let invalid = || ApiError::Unauthenticated(crate::http::codes::INVALID_TOKEN);
    let value = value.to_str().map_err(|_| invalid())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(invalid)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(invalid());
    }
    Ok(token)
}

async fn authenticate(
    parts: &mut Parts,
    verifier: &Verifier,
) -> Result<Option<AuthUser>, ApiError> {
    let Some(value) = authorization(parts)? else {
        return Ok(None);
    };
    let token = bearer_token(&value)?;
    if let Some(user) = parts.extensions.get::<AuthUser>() {
        // Already verified for this request (two extractors in one handler).
        return Ok(Some(user.clone()));
    }
    match verifier.verify(token).await {
        Ok(claims) => {
            let user = AuthUser(Arc::new(claims));
            crate::telemetry::record_user(user.id());
            parts.extensions.insert(user.clone());
            Ok(Some(user))
        }
        Err(e) => {
            tracing::debug!(reason = %e, "access token refused");
            Err(e.into())
        }
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    S: Send + Sync,
    Arc<Verifier>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Arc::<Verifier>::from_ref(state);
        authenticate(parts, &verifier)
            .await?
            .ok_or(ApiError::Unauthenticated(crate::http::codes::MISSING_TOKEN))
    }
}

impl<S> FromRequestParts<S> for MaybeAuthUser
where
    S: Send + Sync,
    Arc<Verifier>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Arc::<Verifier>::from_ref(state);
        Ok(MaybeAuthUser(authenticate(parts, &verifier).await?))
    }
}
