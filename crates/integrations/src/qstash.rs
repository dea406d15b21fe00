//! Upstash QStash: publishing delayed, deduplicated messages to our job
//! functions, and verifying the signed callbacks.
//!
//! Publish: `POST {QSTASH_URL}/v2/publish/{destination URL}` with the token
//! as bearer, `Upstash-Deduplication-Id` (QStash drops a second message
//! with the same id), `Upstash-Not-Before` (Unix seconds) and
//! `Upstash-Retries`.
//!
//! Verify: QStash signs each callback with `Upstash-Signature`, an HS256
//! JWT keyed with the whole `sig_…` signing key: `iss = "Upstash"`, `sub` =
//! the exact URL called, `exp`/`nbf`, and `body` = base64url(SHA-256(raw
//! body)). Keys rotate, so the current key is tried first, then the next.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use url::Url;

/// How many times QStash retries a failing callback (with its backoff).
pub const DEFAULT_RETRIES: u32 = 5;
/// Clock skew tolerated on `exp` / `nbf`.
const LEEWAY_SECONDS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum QstashError {
    #[error("QStash did not answer: {0}")]
    Transport(String),
    #[error("QStash answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The job function's public URL (what QStash will call, and what the
    /// signature's `sub` will be).
    pub destination: Url,
    pub body: serde_json::Value,
    /// Stable across repeats.
    pub deduplication_id: String,
    /// Do not deliver before this Unix time (seconds).
    pub not_before: Option<i64>,
    pub retries: u32,
}

#[derive(Debug, Deserialize)]
struct Published {
    #[serde(rename = "messageId")]
    message_id: String,
}

/// Publishes to QStash. Cheap to clone.
#[derive(Clone, Debug)]
pub struct QstashClient {
    http: reqwest::Client,
    base: Url,
    token: SecretString,
}

impl QstashClient {
    /// `base` is `https://qstash.upstash.io` in production.
    pub fn new(http: reqwest::Client, base: Url, token: SecretString) -> Self {
        QstashClient { http, base, token }
    }

    /// Publishes one message; returns QStash's message id.
    pub async fn publish(&self, message: &Publish) -> Result<String, QstashError> {
        // The destination goes into the path as it is (QStash's API).
        let url = format!(
            "{}/v2/publish/{}",
            self.base.as_str().trim_end_matches('/'),
            message.destination
        );
        let mut request = self
            .http
            .post(url)
            .bearer_auth(self.token.expose_secret())
            .header("Upstash-Deduplication-Id", &message.deduplication_id)
            .header("Upstash-Retries", message.retries.to_string())
            .header("Upstash-Method", "POST")
            .json(&message.body)
            .timeout(Duration::from_secs(5));
        if let Some(at) = message.not_before {
            request = request.header("Upstash-Not-Before", at.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|e| QstashError::Transport(e.without_url().to_string()))?;
        let status = response.status();
        // Only quoted in an error, or parsed for the id below.
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(QstashError::Status {
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            });
        }
        // A deduplicated publish answers with the first message's id. The
        // message is accepted either way; the id is only informative (the
        // outbox ignores it), so an unreadable one is empty, not an error.
        Ok(serde_json::from_str::<Published>(&body)
            .map(|p| p.message_id)
            .unwrap_or_default())
    }
}

/// Why a callback was refused. Deliberately coarse towards the caller;
/// the variant is logged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("no Upstash-Signature header")]
    Missing,
    #[error("the signature does not verify with either signing key")]
    BadSignature,
    #[error("the signature has expired or is not yet valid")]
    Expired,
    #[error("the signature is for another URL")]
    WrongUrl,
    #[error("the signature is not from Upstash")]
    WrongIssuer,
    #[error("the body does not match the signature")]
    BodyMismatch,
}

#[derive(Debug, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    body: String,
}

/// Verifies QStash callbacks with the current and the next signing key.
#[derive(Clone)]
pub struct Verifier {
    current: SecretString,
    next: SecretString,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier { .. }")
    }
}

impl Verifier {
    pub fn new(current: SecretString, next: SecretString) -> Self {
        Verifier { current, next }
    }

    /// Checks `signature` (the `Upstash-Signature` header) for a request to
    /// `url` carrying `body`.
    pub fn verify(
        &self,
        signature: Option<&str>,
        url: &str,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        let signature = signature.ok_or(SignatureError::Missing)?;
        let claims = match self.decode(signature, &self.current) {
            Err(SignatureError::BadSignature) => self.decode(signature, &self.next)?,
            other => other?,
        };
        if claims.iss != "Upstash" {
            return Err(SignatureError::WrongIssuer);
        }
        if claims.sub != url {
            return Err(SignatureError::WrongUrl);
        }
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(body));
        // Upstash's own verifier strips padding before comparing.
        let given = claims.body.trim_end_matches('=');
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            expected.as_bytes(),
        )) {
            return Err(SignatureError::BodyMismatch);
        }
        Ok(())
    }

    fn decode(&self, token: &str, key: &SecretString) -> Result<Claims, SignatureError> {
        use jsonwebtoken::errors::ErrorKind;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
        jsonwebtoken::decode::<Claims>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(key.expose_secret().as_bytes()),
            &validation,
        )
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => SignatureError::Expired,
            _ => SignatureError::BadSignature,
        })
    }
}

/// Signs like QStash does (tests and the local inline runner's self-checks).
#[cfg(any(test, feature = "testing"))]
pub fn sign(key: &str, url: &str, body: &[u8], now: i64, ttl_seconds: i64) -> String {
    let claims = serde_json::json!({
        "iss": "Upstash",
        "sub": url,
        "exp": now + ttl_seconds,
        "nbf": now,
        "iat": now,
        "jti": format!("jwt_{now}"),
        "body": URL_SAFE_NO_PAD.encode(Sha256::digest(body)),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURRENT: &str = "sig_current_key_for_tests";
    const NEXT: &str = "sig_next_key_for_tests";
    const URL: &str = "https://api.example.com/api/jobs/class-reminder";

    fn verifier() -> Verifier {
        Verifier::new(CURRENT.to_owned().into(), NEXT.to_owned().into())
    }

    fn now() -> i64 {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        )
        .unwrap_or_default()
    }

    #[test]
    fn accepts_the_current_and_the_next_key() {
        let body = br#"{"class_id":"x"}"#;
        for key in [CURRENT, NEXT] {
            let sig = sign(key, URL, body, now(), 300);
            assert_eq!(verifier().verify(Some(&sig), URL, body), Ok(()), "{key}");
        }
    }

    #[test]
    fn refuses_what_is_not_exactly_signed_for_this_call() {
        let body = br#"{"class_id":"x"}"#;
        let v = verifier();
        assert_eq!(v.verify(None, URL, body), Err(SignatureError::Missing));
        let wrong_key = sign("sig_someone_else", URL, body, now(), 300);
        assert_eq!(
            v.verify(Some(&wrong_key), URL, body),
            Err(SignatureError::BadSignature)
        );
        let good = sign(CURRENT, URL, body, now(), 300);
        assert_eq!(
            v.verify(Some(&good), "https://api.example.com/api/jobs/other", body),
            Err(SignatureError::WrongUrl)
        );
        assert_eq!(
            v.verify(Some(&good), URL, br#"{"class_id":"y"}"#),
            Err(SignatureError::BodyMismatch)
        );
        let expired = sign(CURRENT, URL, body, now() - 3600, 300);
        assert_eq!(
            v.verify(Some(&expired), URL, body),
            Err(SignatureError::Expired)
        );
        let future = sign(CURRENT, URL, body, now() + 3600, 300);
        assert_eq!(
            v.verify(Some(&future), URL, body),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            v.verify(Some("not.a.jwt"), URL, body),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn refuses_another_issuer() {
        let body = b"{}";
        let claims = serde_json::json!({
            "iss": "Someone", "sub": URL, "exp": now() + 300, "nbf": now(),
            "body": URL_SAFE_NO_PAD.encode(Sha256::digest(body)),
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(CURRENT.as_bytes()),
        )
        .expect("sign");
        assert_eq!(
            verifier().verify(Some(&token), URL, body),
            Err(SignatureError::WrongIssuer)
        );
    }
}
