//! Ably realtime: tokens for clients and publishing over the REST API.
//!
//! Tokens are Ably JWTs signed locally with the API key (no request to
//! Ably): header `kid` = the key's name, claims `x-ably-capability` (a JSON
//! **string**) and `x-ably-clientId`. What a token allows is decided by the
//! caller of [`token`] — the server — never by the client.
//!
//! Publishing is `POST {base}/channels/{channel}/messages` with the key as
//! Basic credentials. Each message carries our id, so a repeat (the outbox
//! delivers at least once) is dropped by Ably's idempotent publishing.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use url::Url;

/// An Ably API key, `appId.keyId:secret`.
#[derive(Clone)]
pub struct AblyKey {
    name: String,
    secret: SecretString,
}

impl std::fmt::Debug for AblyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AblyKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AblyKey {
    /// Parses `appId.keyId:secret`; `None` when it has another shape.
    pub fn parse(raw: &str) -> Option<AblyKey> {
        let (name, secret) = raw.split_once(':')?;
        if !name.contains('.') || secret.is_empty() {
            return None;
        }
        Some(AblyKey {
            name: name.to_owned(),
            secret: SecretString::from(secret.to_owned()),
        })
    }

    /// `appId.keyId`: public, the JWT's `kid`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What a client may do on each channel (Ably's capability operations).
pub type Capability = BTreeMap<String, Vec<&'static str>>;

#[derive(Serialize)]
struct TokenClaims<'a> {
    iat: i64,
    exp: i64,
    #[serde(rename = "x-ably-capability")]
    capability: String,
    #[serde(rename = "x-ably-clientId")]
    client_id: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum AblyError {
    #[error("cannot sign the token: {0}")]
    Sign(String),
    #[error("Ably did not answer: {0}")]
    Transport(String),
    #[error("Ably answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// An Ably JWT for `client_id` with exactly `capability`, valid from
/// `now` (Unix seconds) for `ttl`.
pub fn token(
    key: &AblyKey,
    client_id: &str,
    capability: &Capability,
    now: i64,
    ttl: Duration,
) -> Result<String, AblyError> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(key.name.clone());
    header.typ = Some("JWT".to_owned());
    let claims = TokenClaims {
        iat: now,
        exp: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(3600)),
        capability: serde_json::to_string(capability)
            .map_err(|e| AblyError::Sign(e.to_string()))?,
        client_id,
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.secret.expose_secret().as_bytes()),
    )
    .map_err(|e| AblyError::Sign(e.to_string()))
}

/// One message to publish.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// Stable across repeats: Ably drops a second message with the same id.
    pub id: String,
    /// The event, e.g. `tip.received`.
    pub name: String,
    pub data: serde_json::Value,
}

/// Publishes over Ably's REST API. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AblyClient {
    http: reqwest::Client,
    base: Url,
    key: AblyKey,
}

impl AblyClient {
    /// `base` is `https://rest.ably.io` in production (a recording fake in
    /// tests).
    pub fn new(http: reqwest::Client, base: Url, key: AblyKey) -> Self {
        AblyClient { http, base, key }
    }

    pub fn key(&self) -> &AblyKey {
        &self.key
    }

    /// Publishes `message` on `channel`.
    pub async fn publish(&self, channel: &str, message: &Message) -> Result<(), AblyError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| AblyError::Transport("ABLY_API_BASE cannot be a base URL".to_owned()))?
            .pop_if_empty()
            .extend(["channels", channel, "messages"]);
        let response = self
            .http
            .post(url)
            .basic_auth(&self.key.name, Some(self.key.secret.expose_secret()))
            .json(message)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| AblyError::Transport(e.without_url().to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // Only quoted in the error; an unreadable body quotes nothing.
        let body = response.text().await.unwrap_or_default();
        Err(AblyError::Status {
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_a_name_and_a_secret() {
        let key = AblyKey::parse("app.key:secret").expect("valid");
        assert_eq!(key.name(), "app.key");
        assert!(!format!("{key:?}").contains("secret\""));
        for bad in ["", "app.key", "appkey:secret", "app.key:"] {
            assert!(AblyKey::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn tokens_carry_the_capability_as_a_json_string_and_the_key_name() {
        let key = AblyKey::parse("app.key:secret").expect("valid");
        let mut capability = Capability::new();
        capability.insert("user:1".to_owned(), vec!["subscribe"]);
        let jwt = token(&key, "1", &capability, 1_000, Duration::from_secs(60)).expect("token");
        let header = jsonwebtoken::decode_header(&jwt).expect("header");
        assert_eq!(header.kid.as_deref(), Some("app.key"));
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &jwt,
            &jsonwebtoken::DecodingKey::from_secret(b"secret"),
            &validation,
        )
        .expect("signed with the key's secret")
        .claims;
        assert_eq!(claims["x-ably-capability"], r#"{"user:1":["subscribe"]}"#);
        assert_eq!(claims["x-ably-clientId"], "1");
        assert_eq!(claims["exp"], 1_060);
    }
}
