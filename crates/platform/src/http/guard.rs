//! Guards that turn bad requests and panics into problem responses.

use std::panic::AssertUnwindSafe;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;

use super::problem::ApiError;

/// Marker in a response's extensions: this 500 came from a panic.
#[derive(Debug, Clone)]
pub struct Panicked(pub String);

/// A panic in a handler becomes a 500 problem with the request id; the
/// process keeps serving. The panic message is kept for telemetry only.
pub async fn catch_panic(req: Request, next: Next) -> Response {
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(response) => response,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            tracing::error!(panic = %message, "handler panicked");
            let mut response =
                ApiError::Internal(format!("handler panicked: {message}").into()).into_response();
            response.extensions_mut().insert(Panicked(message));
            // The panic unwound through the security-headers layer (inside
            // this one), so this response must get the header set here.
            super::headers::apply(&mut response);
            response
        }
    }
}

/// Marker set by the platform adapter when a body exceeded
/// [`super::MAX_BODY_BYTES`].
#[derive(Debug, Clone, Copy)]
pub struct BodyTooLarge;

/// Request rules every route shares: an oversized body is a 413, and a
/// repeated query parameter (HTTP parameter pollution, `?amount=1&amount=1000`)
/// is ambiguous, so it is refused rather than guessed.
pub async fn request_rules(req: Request, next: Next) -> Response {
    if req.extensions().get::<BodyTooLarge>().is_some() {
        return ApiError::PayloadTooLarge.into_response();
    }
    if let Some(query) = req.uri().query() {
        let mut seen: Vec<std::borrow::Cow<'_, str>> = Vec::new();
        if let Err(e) = query_text(query) {
            return e.into_response();
        }
        for (key, _) in url::form_urlencoded::parse(query.as_bytes()) {
            if seen.contains(&key) {
                return ApiError::field(key.into_owned(), "query parameter given more than once")
                    .into_response();
            }
            seen.push(key);
        }
    }
    next.run(req).await
}

/// Query values reach SQL (cursors, dates): the same character rules as
/// bodies, single-line (ADR 0013).
fn query_text(query: &str) -> Result<(), ApiError> {
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key
            .chars()
            .any(|c| c.is_control() || super::text::is_forbidden(c))
        {
            return Err(ApiError::field(
                "query",
                "a parameter name contains a forbidden character",
            ));
        }
        super::text::check_single_line(&key, &value).map_err(|e| ApiError::Validation(vec![e]))?;
    }
    Ok(())
}
