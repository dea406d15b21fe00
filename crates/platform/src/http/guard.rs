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
        if let Err(e) = query_text(query) {
            return e.into_response();
        }
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

/// One body limit on every target (issue 14): the request body is read here,
/// at most [`super::MAX_BODY_BYTES`], before any route sees it. Vercel's
/// adapter collected bodies itself, but under the dev server and Lambda the
/// raw-body routes (webhooks, the auth hook, jobs) read up to axum's own
/// 2 MiB and answered 413 as `text/plain` above it; now every target answers
/// the same 413 problem, and axum's limit can never be reached.
///
/// Methods without request content (GET, HEAD, DELETE; RFC 9110 §9.3: such
/// content "has no generally defined semantics") are refused with a 400
/// when they carry a body, rather than reading and ignoring it; routes that
/// take no body on POST say so with [`no_body`].
///
/// A body sent with a method the route does not have (GET on a POST route)
/// is answered like any undeclared method, 405 with `Allow` (or 404 for an
/// unknown path): the method is what is wrong. `routes` is the router
/// itself, asked with a `TRACE` probe (which no route has, so no handler
/// runs) for the path's `Allow` list; this happens only for the rare
/// refused request.
pub async fn body_rules(routes: axum::Router, req: Request, next: Next) -> Response {
    use http_body_util::BodyExt as _;

    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let bodyless_method = matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::DELETE
    );
    if bodyless_method && declared.is_some_and(|n| n > 0) {
        return body_not_allowed_on(routes, req.method().clone(), req.uri().clone()).await;
    }
    if declared.is_some_and(|n| n > super::MAX_BODY_BYTES as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, super::MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return ApiError::PayloadTooLarge.into_response();
        }
        Err(_) => {
            return ApiError::BadRequest("the request body could not be read".into())
                .into_response();
        }
    };
    if bodyless_method && !bytes.is_empty() {
        return body_not_allowed_on(routes, parts.method, parts.uri).await;
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// 400 for a body on a bodyless method the route has; the router's own
/// 404 or 405 when it has no such path or method.
async fn body_not_allowed_on(
    routes: axum::Router,
    method: http::Method,
    uri: http::Uri,
) -> Response {
    use tower::ServiceExt as _;
    let probe = Request::builder()
        .method(http::Method::TRACE)
        .uri(uri)
        .body(axum::body::Body::empty());
    let Ok(probe) = probe else {
        return body_not_allowed();
    };
    let Ok(answer) = routes.oneshot(probe).await;
    let method = method.as_str();
    let allowed = |allow: &str| {
        allow.split(',').map(str::trim).any(|m| {
            m.eq_ignore_ascii_case(method) || (method == "HEAD" && m.eq_ignore_ascii_case("GET"))
        })
    };
    match answer.status() {
        http::StatusCode::NOT_FOUND => answer,
        http::StatusCode::METHOD_NOT_ALLOWED
            if !answer
                .headers()
                .get(http::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .is_some_and(allowed) =>
        {
            answer
        }
        _ => body_not_allowed(),
    }
}

fn body_not_allowed() -> Response {
    ApiError::BadRequest("this route takes no request body".into()).into_response()
}

/// For a POST route that takes nothing (cancel a class, rotate the feed
/// token, enrol): a body is refused instead of ignored. An empty JSON object
/// is tolerated, since many clients always send one. Runs after
/// [`body_rules`], so the body is already buffered (≤ the limit). Apply it
/// with `MethodRouter::route_layer`, so that another method (a GET with a
/// body) still gets its 405 rather than this 400.
pub async fn no_body(req: Request, next: Next) -> Response {
    use http_body_util::BodyExt as _;
    let (parts, body) = req.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return body_not_allowed(),
    };
    let trimmed = bytes.trim_ascii();
    let empty_object = trimmed.first() == Some(&b'{')
        && trimmed.last() == Some(&b'}')
        && trimmed[1..trimmed.len() - 1].trim_ascii().is_empty();
    if !trimmed.is_empty() && !empty_object {
        return body_not_allowed();
    }
    next.run(Request::from_parts(parts, axum::body::Body::empty()))
        .await
}

/// The Lambda target (API Gateway HTTP API events through `lambda_http`'s
/// adapter into the same stack): the body limit holds there too.
#[cfg(all(test, feature = "lambda"))]
mod lambda_body_tests {
    use lambda_http::lambda_runtime::{Context, LambdaEvent};
    use lambda_http::request::LambdaRequest;
    use tower::ServiceExt;

    async fn post(len: usize) -> serde_json::Value {
        let event: LambdaRequest = serde_json::from_value(serde_json::json!({
            "version": "2.0", "routeKey": "$default", "rawPath": "/raw", "rawQueryString": "",
            "headers": {"host": "api.example.com", "content-type": "application/json"},
            "requestContext": {
                "accountId": "1", "apiId": "api", "domainName": "api.example.com",
                "domainPrefix": "api", "requestId": "req-1", "routeKey": "$default",
                "stage": "$default", "time": "27/Nov/2026:00:00:00 +0000", "timeEpoch": 0,
                "http": {"method": "POST", "path": "/raw", "protocol": "HTTP/1.1",
                         "sourceIp": "127.0.0.1", "userAgent": "test"}
            },
            "body": "x".repeat(len),
            "isBase64Encoded": false
        }))
        .expect("an API Gateway v2 event");
        let router = axum::Router::new().route(
            "/raw",
            axum::routing::post(|body: bytes::Bytes| async move { body.len().to_string() }),
        );
        let core = crate::config::CoreConfig::load(&mut crate::config::Loader::from_map(Vec::<(
            String,
            String,
        )>::new(
        )));
        let adapter = lambda_http::Adapter::from(super::super::stack(router, &core));
        let response = adapter
            .oneshot(LambdaEvent::new(event, Context::default()))
            .await
            .expect("response");
        serde_json::to_value(&response).expect("serialise")
    }

    #[tokio::test]
    async fn lambda_bodies_get_the_same_limit_and_problem() {
        assert_eq!(post(1024).await["statusCode"], 200);
        for len in [300 * 1024, 3 * 1024 * 1024] {
            let r = post(len).await;
            assert_eq!(r["statusCode"], 413, "{len}");
            assert_eq!(r["headers"]["content-type"], "application/problem+json");
        }
    }
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
