//! The vetted header set on every response (SPEC §1), `API-Version`, and
//! `Cache-Control: no-store` unless a handler chose otherwise.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, header};

const SECURITY_HEADERS: [(&str, &str); 9] = [
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (
        "strict-transport-security",
        "max-age=63072000; includeSubDomains; preload",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    (
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    ),
    ("cross-origin-opener-policy", "same-origin"),
    ("x-xss-protection", "0"),
    ("api-version", super::API_VERSION),
];

pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    // axum answers a wrong method with an empty 405; give it a problem body
    // (keeping its `Allow` header).
    if response.status() == http::StatusCode::METHOD_NOT_ALLOWED
        && !response.headers().contains_key(header::CONTENT_TYPE)
    {
        let allow = response.headers().get(header::ALLOW).cloned();
        response = super::ApiError::MethodNotAllowed.into_response();
        if let Some(allow) = allow {
            response.headers_mut().insert(header::ALLOW, allow);
        }
    }
    apply(&mut response);
    response
}

/// Puts the header set on `response` (also used by the panic guard, whose
/// 500 never passes back through [`security_headers`]).
pub fn apply(response: &mut Response) {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    // Responses depend on who asks and from where; none may be stored by a
    // shared cache unless the handler explicitly said so (the OpenAPI document).
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers.append(
        header::VARY,
        HeaderValue::from_static("Authorization, Origin"),
    );
}
