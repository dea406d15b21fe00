//! CORS from an exact allow-list (plus an optional preview-deployment
//! pattern). A preflight is answered here with 204 or 403, never by a route.

use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::problem::ApiError;
use crate::config::CoreConfig;

const ALLOWED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE";
/// Request headers a browser may send (lower case).
const ALLOWED_HEADERS: [&str; 4] = [
    "authorization",
    "content-type",
    "idempotency-key",
    "request-id",
];
const EXPOSED_HEADERS: &str =
    "Request-Id, API-Version, RateLimit, RateLimit-Policy, Retry-After, Idempotency-Replayed";
const MAX_AGE_SECONDS: &str = "600";

#[derive(Clone, Debug)]
pub struct Cors(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    exact: Vec<String>,
    /// `(prefix, suffix)` around the single `*` of the preview pattern.
    pattern: Option<(String, String)>,
}

impl Cors {
    pub fn from_config(core: &CoreConfig) -> Cors {
        let pattern = core
            .preview_origin_pattern
            .as_ref()
            .and_then(|p| p.split_once('*').map(|(a, b)| (a.to_owned(), b.to_owned())));
        Cors(Arc::new(Inner {
            exact: core.allowed_origins.clone(),
            pattern,
        }))
    }

    pub fn allows(&self, origin: &str) -> bool {
        if self.0.exact.iter().any(|o| o == origin) {
            return true;
        }
        match &self.0.pattern {
            // The wildcard stands for one DNS label fragment: letters,
            // digits and '-', so `*` cannot swallow a dot and another domain.
            Some((prefix, suffix)) => origin
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                .is_some_and(|middle| {
                    !middle.is_empty()
                        && middle
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                }),
            None => false,
        }
    }
}

pub async fn apply(cors: Cors, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);

    if is_preflight {
        return preflight(&cors, origin.as_deref(), req.headers());
    }
    let mut response = next.run(req).await;
    if let Some(origin) = origin.filter(|o| cors.allows(o))
        && let Ok(value) = HeaderValue::from_str(&origin)
    {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
    }
    response
}

fn preflight(cors: &Cors, origin: Option<&str>, headers: &HeaderMap) -> Response {
    let Some(origin) = origin.filter(|o| cors.allows(o)) else {
        return ApiError::Forbidden(super::codes::CORS_ORIGIN_NOT_ALLOWED).into_response();
    };
    let method_ok = headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| ALLOWED_METHODS.split(", ").any(|a| a == m));
    let headers_ok = headers
        .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .all(|h| ALLOWED_HEADERS.contains(&h.as_str()));
    if !method_ok || !headers_ok {
        return ApiError::Forbidden(super::codes::CORS_REQUEST_NOT_ALLOWED).into_response();
    }
    let Ok(origin) = HeaderValue::from_str(origin) else {
        return ApiError::Forbidden(super::codes::CORS_ORIGIN_NOT_ALLOWED).into_response();
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOWED_METHODS),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, Idempotency-Key, Request-Id"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(MAX_AGE_SECONDS),
    );
    h.insert(
        header::VARY,
        HeaderValue::from_static(
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(pattern: Option<&str>) -> Cors {
        Cors(Arc::new(Inner {
            exact: vec!["https://stagepass.app".into()],
            pattern: pattern.and_then(|p| p.split_once('*').map(|(a, b)| (a.into(), b.into()))),
        }))
    }

    #[test]
    fn exact_and_pattern_matching() {
        let c = cors(Some("https://stagepass-*-team.vercel.app"));
        assert!(c.allows("https://stagepass.app"));
        assert!(!c.allows("https://stagepass.app.evil.com"));
        assert!(!c.allows("http://stagepass.app"));
        assert!(c.allows("https://stagepass-git-feature-x-team.vercel.app"));
        assert!(!c.allows("https://stagepass-a.evil.com/x-team.vercel.app"));
        assert!(!c.allows("https://stagepass--team.vercel.app.evil"));
        assert!(!c.allows("https://stagepass-evil.com.-team.vercel.app"));
    }
}
