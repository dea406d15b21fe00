//! Tracing and Sentry.
//!
//! Logs: JSON lines in production (Vercel and Lambda collect stdout), pretty
//! locally; one line per request with method, matched route, status, latency,
//! request id and user id. Sentry: every 5xx (including panics) becomes an
//! event tagged with the request id, the matched route and the user id (never
//! an e-mail); request headers and bodies are never attached, and messages
//! pass a scrubber that removes anything shaped like a secret. Events are
//! flushed after the response is sent (`wait_until` on Vercel), so a frozen
//! function never loses one and the client never waits for Sentry.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use sentry::SentryFutureExt;
use tracing::Instrument;

use crate::config::{CoreConfig, ExposeSecret};
use crate::http::guard::Panicked;
use crate::http::problem::ProblemInfo;
use crate::http::request_id::RequestId;

/// How long a flush may take after the response.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

static SENTRY: OnceLock<Option<sentry::ClientInitGuard>> = OnceLock::new();

/// Sets up logging and Sentry once per process. Safe to call again (tests,
/// the dev server): later calls do nothing.
pub fn init(function: &'static str, core: &CoreConfig) {
    init_tracing(core.app_env.is_production());
    SENTRY.get_or_init(|| {
        let dsn = core.sentry_dsn.as_ref()?;
        let environment = match core.app_env {
            crate::config::AppEnv::Production => "production",
            crate::config::AppEnv::Test => "test",
            crate::config::AppEnv::Development => "development",
        };
        let mut options = sentry::ClientOptions::default();
        options.release = Some(Cow::Owned(format!("stagepass@{}", core.release)));
        options.environment = Some(Cow::Borrowed(environment));
        options.send_default_pii = false;
        options.server_name = Some(Cow::Borrowed(function));
        options.before_send = Some(std::sync::Arc::new(|mut event| {
            scrub_event(&mut event);
            Some(event)
        }));
        let guard = sentry::init((dsn.expose_secret(), options));
        sentry::configure_scope(|scope| scope.set_tag("function", function));
        Some(guard)
    });
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    // `try_init` fails when a subscriber is already set (tests): that is fine.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
}

/// Whether Sentry is configured in this process.
pub fn sentry_enabled() -> bool {
    SENTRY.get().is_some_and(Option::is_some)
}

/// Per-request middleware: a span, a log line, a Sentry hub of its own, and
/// for 5xx an event (flushed after the response).
pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    let platform = req.extensions().get::<crate::serve::Platform>().cloned();
    let span = tracing::info_span!(
        "request",
        %method,
        route = %route,
        request_id = %request_id,
        user_id = tracing::field::Empty,
    );
    let hub = std::sync::Arc::new(sentry::Hub::new_from_top(sentry::Hub::main()));
    hub.configure_scope(|scope| {
        scope.set_tag("request_id", &request_id);
        scope.set_tag("route", &route);
        scope.set_tag("method", method.as_str());
    });
    let response = next
        .run(req)
        .instrument(span.clone())
        .bind_hub(hub.clone())
        .await;
    let status = response.status();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        tracing::info!(status = status.as_u16(), elapsed_ms, "served");
    });
    // The rate limiter reports its own outages, at most once a minute.
    let self_reported = response
        .extensions()
        .get::<ProblemInfo>()
        .is_some_and(|p| p.code == "rate_limiter_unavailable");
    if status.is_server_error() && sentry_enabled() && !self_reported {
        let message = response
            .extensions()
            .get::<Panicked>()
            .map(|p| format!("panic: {}", p.0))
            .or_else(|| {
                response
                    .extensions()
                    .get::<ProblemInfo>()
                    .and_then(|p| p.internal_message.clone())
            })
            .unwrap_or_else(|| format!("{} on {route}", status.as_u16()));
        hub.configure_scope(|scope| scope.set_tag("status", status.as_u16()));
        hub.capture_message(&scrub(&message), sentry::Level::Error);
        flush_after_response(platform);
    }
    response
}

/// Flushes Sentry without delaying the response: through the platform's
/// `wait_until` on Vercel; on a plain tokio runtime (local, Lambda) in a
/// background task.
fn flush_after_response(platform: Option<crate::serve::Platform>) {
    let flush = async {
        let _ = tokio::task::spawn_blocking(|| {
            if let Some(client) = sentry::Hub::main().client() {
                client.flush(Some(FLUSH_TIMEOUT));
            }
        })
        .await;
    };
    crate::serve::after_response(platform.as_ref(), flush);
}

/// Records the authenticated user on the request's span and Sentry scope.
/// Only the id: never an e-mail or a name.
pub fn record_user(user_id: uuid::Uuid) {
    tracing::Span::current().record("user_id", tracing::field::display(user_id));
    sentry::configure_scope(|scope| {
        scope.set_user(Some(sentry::User {
            id: Some(user_id.to_string()),
            ..Default::default()
        }))
    });
}

fn scrub_event(event: &mut sentry::protocol::Event<'static>) {
    event.request = None;
    if let Some(m) = event.message.take() {
        event.message = Some(scrub(&m));
    }
    for exception in event.exception.values.iter_mut() {
        if let Some(v) = exception.value.take() {
            exception.value = Some(scrub(&v));
        }
    }
    if let Some(user) = event.user.as_mut() {
        user.email = None;
        user.ip_address = None;
        user.username = None;
    }
    event.extra.clear();
}

/// Replaces anything shaped like a credential with `[Filtered]`: Stripe keys
/// and signing secrets, QStash keys, bearer tokens and JWTs, and the password
/// of a connection URL.
pub fn scrub(text: &str) -> String {
    const PREFIXES: [&str; 9] = [
        "sk_live_",
        "sk_test_",
        "rk_live_",
        "rk_test_",
        "whsec_",
        "sig_",
        "Bearer ",
        "eyJ",
        "v1,whsec_",
    ];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for p in PREFIXES {
            if rest.starts_with(p) {
                out.push_str("[Filtered]");
                let end = rest[p.len()..]
                    .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ')'))
                    .map_or(rest.len(), |i| i + p.len());
                rest = &rest[end..];
                continue 'outer;
            }
        }
        // user:password@ in URLs
        if let Some(after) = rest.strip_prefix("://")
            && let Some(at) = after.find('@')
            && let Some(colon) = after[..at].find(':')
            && !after[..at].contains(char::is_whitespace)
        {
            out.push_str("://");
            out.push_str(&after[..colon]);
            out.push_str(":[Filtered]@");
            rest = &after[at + 1..];
            continue;
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::scrub;

    #[test]
    fn scrubs_secrets() {
        let s = scrub(
            "key sk_live_abc123 and Bearer eyJhbGci.x.y, postgres://app:hunter2@db:5432/x whsec_zzz",
        );
        assert!(!s.contains("abc123"), "{s}");
        assert!(!s.contains("eyJhbGci"), "{s}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(!s.contains("zzz"), "{s}");
        assert!(s.contains("postgres://app:[Filtered]@db:5432/x"), "{s}");
        assert_eq!(
            scrub("plain text, nothing here"),
            "plain text, nothing here"
        );
    }
}
