//! The HTTP layer every function shares: problem responses, request ids,
//! the panic guard, security headers, CORS, query and body rules, and the
//! strict JSON extractor. [`stack`] puts them around a route's router in the
//! one order every function uses.

pub mod codes;
pub mod cors;
pub mod guard;
pub mod headers;
pub mod json;
pub mod problem;
pub mod request_id;
pub mod text;

use axum::Router;
use axum::middleware::from_fn;

pub use json::JsonBody;
pub use problem::{ApiError, ApiResult, FieldError};

use crate::config::CoreConfig;

/// The `API-Version` every response carries.
pub const API_VERSION: &str = "1";
/// Largest request body any function accepts (webhooks included), on every
/// target: enforced by [`guard::body_rules`] in [`stack`] (and used by the
/// Vercel adapter, which collects bodies before the stack).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Wraps a route's router in the shared layers. Outermost first: request id
/// → panic guard → telemetry → security headers → CORS → query rules → body
/// rules → route.
pub fn stack(router: Router, core: &CoreConfig) -> Router {
    let cors = cors::Cors::from_config(core);
    let router = router.fallback(|| async { ApiError::NotFound });
    // The body rules ask the router which methods a path has (see
    // `guard::body_rules`).
    let routes = router.clone();
    router
        .layer(from_fn(move |req, next| {
            guard::body_rules(routes.clone(), req, next)
        }))
        .layer(from_fn(guard::request_rules))
        .layer(from_fn(move |req, next| {
            cors::apply(cors.clone(), req, next)
        }))
        .layer(from_fn(headers::security_headers))
        .layer(from_fn(crate::telemetry::observe))
        .layer(from_fn(guard::catch_panic))
        .layer(from_fn(request_id::assign))
}
