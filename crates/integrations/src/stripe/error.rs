//! What can go wrong when calling Stripe. No variant ever carries the secret
//! key or a request body: errors end up in logs and in Sentry.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with an error object (`{"error": {…}}`), e.g. a
    /// declined card (402), an unknown id (404) or invalid parameters (400).
    #[error("{0}")]
    Api(Box<ApiError>),
    /// 429: too many requests. Retried (if allowed) before it is returned.
    #[error("Stripe rate limit reached")]
    RateLimited { retry_after_seconds: Option<u64> },
    /// No complete answer within the client's timeout. The request may or
    /// may not have taken effect: resend it with the same idempotency key.
    #[error("Stripe did not answer in time")]
    Timeout,
    /// Connecting or transferring failed. Same caveat as `Timeout`.
    #[error("could not reach Stripe: {0}")]
    Network(String),
    /// A 2xx answer that is not the object we asked for.
    #[error("unexpected answer from Stripe: {0}")]
    Decode(String),
    /// The request could not be built (a malformed id or idempotency key);
    /// nothing was sent.
    #[error("invalid Stripe request: {0}")]
    InvalidRequest(String),
}

/// Stripe's error object, plus the HTTP status and Stripe's request id (for
/// support tickets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// `card_error`, `invalid_request_error`, `api_error`, `idempotency_error`…
    pub type_: String,
    /// e.g. `card_declined`, `resource_missing`.
    pub code: Option<String>,
    pub decline_code: Option<String>,
    pub message: String,
    pub param: Option<String>,
    pub request_id: Option<String>,
    /// Stripe's `Stripe-Should-Retry` header when present, else "a 5xx".
    pub retryable: bool,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stripe answered {} ({}", self.status, self.type_)?;
        if let Some(code) = &self.code {
            write!(f, ", {code}")?;
        }
        write!(f, "): {}", self.message)
    }
}

impl StripeError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            StripeError::Api(e) => Some(e.status),
            StripeError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// Stripe's error `code`, e.g. `card_declined`.
    pub fn code(&self) -> Option<&str> {
        match self {
            StripeError::Api(e) => e.code.as_deref(),
            _ => None,
        }
    }

    /// The object does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The card was declined: a fact about the payment, not a failure of ours.
    /// Real Stripe answers 402 `card_error`; localstripe 402
    /// `invalid_request_error` with code `card_declined`.
    pub fn is_card_declined(&self) -> bool {
        match self {
            StripeError::Api(e) => {
                e.type_ == "card_error" || e.code.as_deref() == Some("card_declined")
            }
            _ => false,
        }
    }

    /// Whether sending the same request again (with the same idempotency
    /// key) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StripeError::Api(e) => e.retryable,
            StripeError::RateLimited { .. } | StripeError::Timeout | StripeError::Network(_) => {
                true
            }
            StripeError::Decode(_) | StripeError::InvalidRequest(_) => false,
        }
    }

    pub(crate) fn from_transport(error: reqwest::Error) -> StripeError {
        if error.is_timeout() {
            StripeError::Timeout
        } else if error.is_builder() {
            // Headers are built from our own input (the idempotency key).
            StripeError::InvalidRequest(error.without_url().to_string())
        } else {
            StripeError::Network(error.without_url().to_string())
        }
    }

    /// Turns a non-2xx answer into an error. `should_retry` is Stripe's
    /// `Stripe-Should-Retry` header, which overrides our guess.
    pub(crate) fn from_response(status: u16, body: &[u8], meta: ResponseMeta) -> StripeError {
        if status == 429 {
            return StripeError::RateLimited {
                retry_after_seconds: meta.retry_after_seconds,
            };
        }
        let retryable = meta.should_retry.unwrap_or(status >= 500);
        let envelope = serde_json::from_slice::<ErrorEnvelope>(body).ok();
        let api = match envelope {
            Some(ErrorEnvelope { error }) => ApiError {
                status,
                type_: error.type_.unwrap_or_else(|| "unknown".to_owned()),
                code: error.code,
                decline_code: error.decline_code,
                // Stripe sends one for most errors; only for logs.
                message: error.message.unwrap_or_default(),
                param: error.param,
                request_id: meta.request_id,
                retryable,
            },
            // A proxy's HTML page or an empty body: keep a short excerpt only.
            None => ApiError {
                status,
                type_: "unknown".to_owned(),
                code: None,
                decline_code: None,
                message: excerpt(body),
                param: None,
                request_id: meta.request_id,
                retryable,
            },
        };
        StripeError::Api(Box::new(api))
    }
}

/// The parts of a response's headers an error needs.
#[derive(Debug, Default, Clone)]
pub(crate) struct ResponseMeta {
    pub(crate) request_id: Option<String>,
    pub(crate) should_retry: Option<bool>,
    pub(crate) retry_after_seconds: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    type_: Option<String>,
    code: Option<String>,
    decline_code: Option<String>,
    message: Option<String>,
    param: Option<String>,
}

fn excerpt(body: &[u8]) -> String {
    const MAX_CHARS: usize = 200;
    String::from_utf8_lossy(body)
        .chars()
        .take(MAX_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(e: StripeError) -> ApiError {
        match e {
            StripeError::Api(api) => *api,
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    #[test]
    fn decodes_stripes_error_object() {
        let body = br#"{"error":{"type":"card_error","code":"card_declined",
            "decline_code":"generic_decline","message":"Your card was declined.",
            "param":"payment_method","payment_intent":{"id":"pi_1"}}}"#;
        let meta = ResponseMeta {
            request_id: Some("req_1".to_owned()),
            ..ResponseMeta::default()
        };
        let e = StripeError::from_response(402, body, meta);
        assert!(e.is_card_declined());
        assert!(!e.is_retryable());
        assert_eq!(e.code(), Some("card_declined"));
        let a = api(e);
        assert_eq!(a.status, 402);
        assert_eq!(a.type_, "card_error");
        assert_eq!(a.decline_code.as_deref(), Some("generic_decline"));
        assert_eq!(a.message, "Your card was declined.");
        assert_eq!(a.param.as_deref(), Some("payment_method"));
        assert_eq!(a.request_id.as_deref(), Some("req_1"));
    }

    #[test]
    fn localstripe_decline_counts_as_card_declined() {
        let body = br#"{"error":{"charge":"ch_1","code":"card_declined",
            "message":"Your card was declined.","type":"invalid_request_error"}}"#;
        let e = StripeError::from_response(402, body, ResponseMeta::default());
        assert!(e.is_card_declined());
    }

    #[test]
    fn not_found_and_server_errors() {
        let body = br#"{"error":{"type":"invalid_request_error","code":"resource_missing",
            "message":"No such payment_intent: 'pi_x'"}}"#;
        let e = StripeError::from_response(404, body, ResponseMeta::default());
        assert!(e.is_not_found());
        assert!(!e.is_retryable());

        let e = StripeError::from_response(500, b"{}", ResponseMeta::default());
        assert!(e.is_retryable(), "5xx without a hint is retryable");
    }

    #[test]
    fn stripe_should_retry_header_overrides_the_guess() {
        let meta = ResponseMeta {
            should_retry: Some(false),
            ..ResponseMeta::default()
        };
        let e = StripeError::from_response(503, b"{}", meta);
        assert!(!e.is_retryable());

        let meta = ResponseMeta {
            should_retry: Some(true),
            ..ResponseMeta::default()
        };
        let body = br#"{"error":{"type":"idempotency_error","message":"in use"}}"#;
        assert!(StripeError::from_response(409, body, meta).is_retryable());
    }

    #[test]
    fn rate_limit_is_its_own_variant() {
        let meta = ResponseMeta {
            retry_after_seconds: Some(2),
            ..ResponseMeta::default()
        };
        let e = StripeError::from_response(429, b"{}", meta);
        assert!(matches!(
            e,
            StripeError::RateLimited {
                retry_after_seconds: Some(2)
            }
        ));
        assert!(e.is_retryable());
    }

    #[test]
    fn a_non_json_error_body_is_kept_short() {
        let body = "<html>".repeat(100);
        let a = api(StripeError::from_response(
            502,
            body.as_bytes(),
            ResponseMeta::default(),
        ));
        assert_eq!(a.type_, "unknown");
        assert_eq!(a.message.chars().count(), 200);
        assert!(a.retryable);
    }
}
