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
///
/// Except a path parameter's name: Vercel's filesystem routing sends
/// `/api/v1/classes/<uuid>` to `api/v1/classes/[id].rs` with `id=<uuid>` added
/// to the query (`dest: /api/v1/classes/[id]?id=$1` in the build output), so a
/// client's own `?id=x` arrives as `id` twice. Handlers take a segment from
/// the path (`{id}`), never from the query, so a repeat of that name is not
/// ambiguous and is not refused. A route must therefore never read a path
/// parameter's name from its query. ADR 0008.
pub async fn request_rules(req: Request, next: Next) -> Response {
    if req.extensions().get::<BodyTooLarge>().is_some() {
        return ApiError::PayloadTooLarge.into_response();
    }
    if let Some(query) = req.uri().query() {
        let path_params = path_parameter_names(&req);
        let mut seen: Vec<std::borrow::Cow<'_, str>> = Vec::new();
        for (key, _) in url::form_urlencoded::parse(query.as_bytes()) {
            if path_params.contains(&key.as_ref()) {
                continue;
            }
            if seen.contains(&key) {
                return ApiError::field(key.into_owned(), "query parameter given more than once")
                    .into_response();
            }
            seen.push(key);
        }
    }
    next.run(req).await
}

/// The parameter names of the matched route's path (`id` for
/// `/api/v1/classes/{id}`); none when no route matched.
fn path_parameter_names(req: &Request) -> Vec<&str> {
    let Some(matched) = req.extensions().get::<axum::extract::MatchedPath>() else {
        return Vec::new();
    };
    matched
        .as_str()
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| name.trim_start_matches('*'))
        .collect()
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::middleware::from_fn;
    use axum::routing::get;
    use http::StatusCode;
    use tower::ServiceExt as _;

    async fn status(uri: &str) -> StatusCode {
        let app = Router::new()
            .route("/api/v1/classes/{id}", get(|| async { "class" }))
            .route("/api/v1/schedule/feed/{token}", get(|| async { "feed" }))
            .route("/api/v1/classes", get(|| async { "list" }))
            .layer(from_fn(super::request_rules));
        let req = http::Request::get(uri)
            .body(Body::empty())
            .expect("request");
        app.oneshot(req).await.expect("infallible").status()
    }

    #[tokio::test]
    async fn a_repeated_query_parameter_is_refused() {
        assert_eq!(
            status("/api/v1/classes?limit=1&limit=1000").await,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("/api/v1/classes/7?limit=1&limit=2").await,
            StatusCode::BAD_REQUEST
        );
        // `id` is no path parameter of the list route: still ambiguous there.
        assert_eq!(
            status("/api/v1/classes?id=1&id=2").await,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn the_segment_vercel_adds_to_the_query_is_not_a_repeat() {
        // As Vercel delivers `/api/v1/classes/7?id=x` to `[id].rs`, in
        // either order, and `/api/v1/schedule/feed/t.ics?token=x` to `[token].rs`.
        assert_eq!(status("/api/v1/classes/7?id=7").await, StatusCode::OK);
        assert_eq!(status("/api/v1/classes/7?id=7&id=x").await, StatusCode::OK);
        assert_eq!(status("/api/v1/classes/7?id=x&id=7").await, StatusCode::OK);
        assert_eq!(
            status("/api/v1/schedule/feed/t.ics?token=t.ics&token=x").await,
            StatusCode::OK
        );
        // Other parameters of those routes keep the rule.
        assert_eq!(
            status("/api/v1/classes/7?id=7&a=1&a=2").await,
            StatusCode::BAD_REQUEST
        );
    }
}
