//! RFC 9457 problem responses with a stable `code`.
//!
//! Every error a client can see is an [`ApiError`]. 5xx details are logged
//! (and reported) but never sent: the client gets a generic title and the
//! request id to quote.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use super::codes;
use super::request_id::RequestId;

/// One field that failed validation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldError {
    /// JSON pointer-ish path of the field, e.g. `handle` or `items[2].amount`.
    pub field: String,
    pub message: String,
}

/// Everything a handler can fail with, each with one status and one code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthenticated(&'static str),
    #[error("forbidden")]
    Forbidden(&'static str),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict: {1}")]
    Conflict(&'static str, String),
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("unprocessable: {1}")]
    Unprocessable(&'static str, String),
    #[error("rate limited")]
    RateLimited {
        policy: String,
        retry_after_seconds: u64,
    },
    #[error("service unavailable: {1}")]
    Unavailable(&'static str, String),
    /// The rate limiter's store failed and a policy fails closed: 503
    /// `rate_limiter_unavailable` with `Retry-After`. The limiter reports
    /// its own outages (at most once a minute), so telemetry does not.
    #[error("rate limits cannot be checked right now")]
    LimiterUnavailable { retry_after_seconds: u64 },
    /// Anything unexpected. The source is logged, never shown.
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ApiError::Internal(Box::new(e))
    }

    /// Postgres chose this request's transaction as a deadlock victim
    /// (SQLSTATE 40P01): the caller may retry the whole transaction.
    pub fn is_deadlock(&self) -> bool {
        match self {
            ApiError::Internal(source) => source
                .downcast_ref::<sqlx::Error>()
                .and_then(|e| e.as_database_error())
                .and_then(|db| db.code())
                .is_some_and(|code| code == "40P01"),
            _ => false,
        }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(..) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(..) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(..) | ApiError::LimiterUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => codes::VALIDATION_FAILED,
            ApiError::BadRequest(_) => codes::BAD_REQUEST,
            ApiError::Unauthenticated(code) => code,
            ApiError::Forbidden(code) => code,
            ApiError::NotFound => codes::NOT_FOUND,
            ApiError::MethodNotAllowed => codes::METHOD_NOT_ALLOWED,
            ApiError::Conflict(code, _) => code,
            ApiError::PayloadTooLarge => codes::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => codes::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(code, _) => code,
            ApiError::RateLimited { .. } => codes::RATE_LIMITED,
            ApiError::Unavailable(code, _) => code,
            ApiError::LimiterUnavailable { .. } => codes::RATE_LIMITER_UNAVAILABLE,
            ApiError::Internal(_) => codes::INTERNAL_ERROR,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "Your request has invalid fields.",
            ApiError::BadRequest(_) => "The request is malformed.",
            ApiError::Unauthenticated(_) => "A valid access token is required.",
            ApiError::Forbidden(_) => "You are not allowed to do this.",
            ApiError::NotFound => "Not found.",
            ApiError::MethodNotAllowed => "This method is not allowed on this resource.",
            ApiError::Conflict(..) => "The request conflicts with the current state.",
            ApiError::PayloadTooLarge => "The request body is too large.",
            ApiError::UnsupportedMediaType => "Send the body as application/json.",
            ApiError::Unprocessable(..) => "The request cannot be processed.",
            ApiError::RateLimited { .. } => "Too many requests.",
            ApiError::Unavailable(..) | ApiError::LimiterUnavailable { .. } => {
                "The service is temporarily unavailable."
            }
            ApiError::Internal(_) => "Something went wrong on our side.",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            ApiError::BadRequest(d)
            | ApiError::Conflict(_, d)
            | ApiError::Unprocessable(_, d)
            | ApiError::Unavailable(_, d) => Some(d.clone()),
            ApiError::RateLimited {
                policy,
                retry_after_seconds,
            } => Some(format!(
                "limit '{policy}' exceeded; retry after {retry_after_seconds} s"
            )),
            ApiError::LimiterUnavailable { .. } => {
                Some("rate limits cannot be checked right now; retry shortly".to_owned())
            }
            _ => None,
        }
    }
}

/// The problem document (RFC 9457) with our extension members.
#[derive(Debug, Serialize)]
pub struct ProblemBody<'a> {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: &'a str,
    pub status: u16,
    pub code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<&'a [FieldError]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

/// Marker put in a response's extensions so outer layers (telemetry) can see
/// the code and, for 5xx, the hidden cause.
#[derive(Debug, Clone)]
pub struct ProblemInfo {
    pub code: &'static str,
    /// The failure was reported where it happened (the rate limiter reports
    /// its own outages, at most once a minute): telemetry sends no event.
    pub self_reported: bool,
    pub internal_message: Option<String>,
}

impl ApiError {
    /// The problem document this error is sent as (also what an idempotency
    /// record stores, so a replay answers byte for byte the same).
    pub fn body_json(&self) -> serde_json::Value {
        let errors = match self {
            ApiError::Validation(e) => Some(e.as_slice()),
            _ => None,
        };
        let (policy, retry_after_seconds) = match self {
            ApiError::RateLimited {
                policy,
                retry_after_seconds,
            } => (Some(policy.as_str()), Some(*retry_after_seconds)),
            _ => (None, None),
        };
        let body = ProblemBody {
            type_: format!("https://docs.stagepass.app/problems/{}", self.code()),
            title: self.title(),
            status: self.status().as_u16(),
            code: self.code(),
            detail: self.detail(),
            request_id: current_request_id(),
            errors,
            policy,
            retry_after_seconds,
        };
        // Strings and numbers only: serialising cannot fail.
        serde_json::to_value(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %self, "request failed");
        }
        let retry_after_seconds = match &self {
            ApiError::RateLimited {
                retry_after_seconds,
                ..
            } => Some(*retry_after_seconds),
            _ => None,
        };
        let body = self.body_json();
        // A `Value` always serialises.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (status, json).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let ApiError::Unauthenticated(code) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge(code));
        }
        if let ApiError::LimiterUnavailable {
            retry_after_seconds,
        } = &self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
        }
        if let Some(secs) = retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(ProblemInfo {
            code: self.code(),
            self_reported: matches!(self, ApiError::LimiterUnavailable { .. }),
            internal_message: match &self {
                ApiError::Internal(e) => Some(e.to_string()),
                _ => None,
            },
        });
        response
    }
}

/// The `WWW-Authenticate` challenge of a 401 with `code` (RFC 9110 §11.6.1:
/// a 401 must carry one). Access tokens and the cron secret are bearer
/// tokens (RFC 6750): no `error` when none was presented, so a client knows
/// to sign in rather than to refresh; `invalid_token` when one was presented
/// but refused (the cron secret's code does not tell an absent one from a
/// wrong one, so it always names the error). Signed callers (QStash, the Supabase hook) get a challenge
/// naming the signature header they must send.
pub fn challenge(code: &str) -> HeaderValue {
    HeaderValue::from_static(match code {
        codes::MISSING_TOKEN => r#"Bearer realm="stagepass""#,
        codes::INVALID_TOKEN | codes::INVALID_CRON_SECRET => {
            r#"Bearer realm="stagepass", error="invalid_token""#
        }
        codes::INVALID_QSTASH_SIGNATURE => r#"Upstash-Signature realm="stagepass""#,
        codes::INVALID_SIGNATURE | codes::STALE_SIGNATURE => {
            r#"Webhook-Signature realm="stagepass""#
        }
        _ => r#"Bearer realm="stagepass""#,
    })
}

tokio::task_local! {
    /// The id of the request being served on this task (set by the request-id layer).
    pub static REQUEST_ID: RequestId;
}

pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.as_str().to_owned()).ok()
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut => ApiError::Unavailable(
                codes::DATABASE_BUSY,
                "the database is busy; retry shortly".into(),
            ),
            _ if is_connection_loss(&e) => ApiError::Unavailable(
                codes::DATABASE_UNAVAILABLE,
                "the database is unavailable; retry shortly".into(),
            ),
            _ => ApiError::internal(e),
        }
    }
}

/// Whether `e` means the database could not be reached or dropped the
/// connection (a restart, a failover, a network cut) rather than that the
/// request itself was wrong. Such a request did not commit (a transaction
/// whose connection dies is rolled back by the server), so the client may
/// safely retry it: 503, not 500 (docs/RELIABILITY.md, "Outages").
pub fn is_connection_loss(e: &sqlx::Error) -> bool {
    match e {
        // Connection refused/reset, broken pipe, EOF mid-response.
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08xxx connection exception; 57P01 admin_shutdown (the server
            // is stopping: `pg_ctl stop -m fast`), 57P02 crash_shutdown,
            // 57P03 cannot_connect_now (starting up or shutting down);
            // 53300 too_many_connections.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
