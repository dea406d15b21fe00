//! Tracing and Sentry.
//!
//! Logs: JSON lines in production (Vercel and Lambda collect stdout), pretty
//! locally; one line per request with method, matched route, status, latency,
//! request id and user id. Sentry: every 5xx (including panics) becomes an
//! event tagged with the request id, the matched route and the user id (never
//! an e-mail); request headers and bodies are never attached, and messages
//! pass a scrubber that removes anything shaped like a secret. Events are
//! flushed after the response is sent (`wait_until` on Vercel; on Lambda
//! before the response is returned, since the process freezes), so a frozen
//! function never loses one and, on Vercel, the client never waits for Sentry.
//!
//! Performance: with `SENTRY_TRACES_SAMPLE_RATE` above 0, that share of
//! requests becomes a transaction (`GET /api/v1/me`, op `http.server`) whose
//! child spans are the request's SQL statements, `BEGIN` and `COMMIT`
//! included (op `db.sql.query`, the statement text with its `$n`
//! placeholders, never bound values). The spans come from sqlx's own
//! per-statement `sqlx::query` events, turned into Sentry spans by
//! [`DbSpans`]: no handler or `db` function needs to know. The release is the
//! deployed commit (`config::release`).

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
/// Whether requests may become performance transactions (a DSN and a
/// sample rate above 0).
static TRACES: OnceLock<bool> = OnceLock::new();

/// Sets up logging and Sentry once per process. Safe to call again (tests,
/// the dev server): later calls do nothing.
pub fn init(function: &'static str, core: &CoreConfig) {
    let traces = *TRACES.get_or_init(|| core.sentry_dsn.is_some() && core.traces_sample_rate > 0.0);
    init_tracing(core.app_env.is_production(), traces);
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
        if traces {
            // Validated to 0..=1 by `CoreConfig` (the setter panics otherwise).
            options = options.traces_sample_rate(core.traces_sample_rate);
        }
        options.before_send = Some(std::sync::Arc::new(|mut event| {
            scrub_event(&mut event);
            Some(event)
        }));
        let guard = sentry::init((dsn.expose_secret(), options));
        sentry::configure_scope(|scope| scope.set_tag("function", function));
        report_panics();
        Some(guard)
    });
}

/// Every panic becomes a Sentry event (a handler's panic also becomes its
/// 500's event, as before), then the default hook prints it. Our own hook
/// instead of sentry's `panic` integration: that one brings a backtrace
/// symboliser (~0.3 MB per binary, ADR 0006) whose stack traces of stripped
/// binaries are bare addresses; the message and `file:line` are what helps.
fn report_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            // No location: the report says less, nothing else changes.
            .unwrap_or_default();
        sentry::capture_message(
            &scrub(&format!("panic: {message}{at}")),
            sentry::Level::Fatal,
        );
        default(info);
    }));
}

/// `RUST_LOG` as a list of `target=level` directives and a bare default
/// level (`info,sqlx=warn`, the default). Span and field filters of
/// `EnvFilter` are not supported: they need a regex engine in every binary
/// (~0.3 MB, ADR 0006) for a feature functions do not use.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::filter::Targets {
    const DEFAULT: &str = "info,sqlx=warn";
    rust_log
        .and_then(|v| v.parse().ok())
        // DEFAULT is a constant, valid filter.
        .unwrap_or_else(|| DEFAULT.parse().unwrap_or_default())
}

fn init_tracing(json: bool, db_spans: bool) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(rust_log.as_deref());
    // Per-layer filters: the log lines keep `RUST_LOG` (`sqlx=warn`), while
    // sqlx's per-statement events reach `DbSpans` only when transactions are
    // on at all (otherwise sqlx does not even build them).
    let db_spans = db_spans.then(|| {
        DbSpans.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target() == SQLX_QUERY_TARGET
        }))
    });
    let registry = tracing_subscriber::registry().with(db_spans);
    // `try_init` fails when a subscriber is already set (tests): that is fine.
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .json()
                    .flatten_event(true)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .compact()
                    .with_filter(filter),
            )
            .try_init()
    };
}

/// The target of the event sqlx emits after every statement it executes.
const SQLX_QUERY_TARGET: &str = "sqlx::query";

/// Turns sqlx's per-statement events into child spans of the request's
/// Sentry transaction, when the request is sampled. The event comes when
/// the statement has finished, with its duration: the span is back-dated.
struct DbSpans;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for DbSpans {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        // The request's hub is the thread's current one while its future is
        // polled (`bind_hub` in `observe`), and so while sqlx reports.
        let Some(parent) = sentry::Hub::with_active(|hub| hub.configure_scope(|s| s.get_span()))
        else {
            return;
        };
        if !sampled(&parent) {
            return;
        }
        let mut fields = QueryFields::default();
        event.record(&mut fields);
        let end = std::time::SystemTime::now();
        let start = end
            .checked_sub(Duration::from_secs_f64(fields.elapsed_secs.max(0.0)))
            .unwrap_or(end);
        let statement = fields.statement.trim();
        let description = if statement.is_empty() {
            fields.summary.trim_end_matches(" …")
        } else {
            statement
        };
        let span = parent.start_child_with_details(
            "db.sql.query",
            description,
            sentry::protocol::SpanId::default(),
            start,
        );
        span.set_data("db.system", "postgresql".into());
        if let Some(rows) = fields.rows {
            span.set_data("db.rows", rows.into());
        }
        span.finish_with_timestamp(end);
    }
}

/// The fields of a `sqlx::query` event we keep (never bound values: sqlx
/// logs the statement text only).
#[derive(Default)]
struct QueryFields {
    summary: String,
    statement: String,
    elapsed_secs: f64,
    rows: Option<u64>,
}

impl tracing::field::Visit for QueryFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_owned(),
            "db.statement" => self.statement = value.to_owned(),
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed_secs = value;
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if matches!(field.name(), "rows_affected" | "rows_returned") {
            self.rows = Some(self.rows.unwrap_or(0).max(value));
        }
    }

    fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {}
}

/// Whether finishing `span` sends it to Sentry. `is_sampled` is deprecated
/// because its `false` is ambiguous (not sampled, or a decision deferred to
/// a downstream service); its `true` is reliable, and that is all we ask.
#[allow(deprecated)]
fn sampled(span: &sentry::TransactionOrSpan) -> bool {
    span.is_sampled()
}

/// Runs `work` (acquiring a pooled connection and queueing `BEGIN`, which
/// sqlx sends together with the first statement and reports no event for)
/// as a `db.connection` span of the request's transaction, when sampled: a
/// cold connection (TCP, TLS, authentication) shows up here.
pub async fn db_span<F: std::future::Future>(name: &str, work: F) -> F::Output {
    let parent = traces_enabled()
        .then(|| sentry::Hub::with_active(|hub| hub.configure_scope(|s| s.get_span())))
        .flatten()
        .filter(sampled);
    let Some(parent) = parent else {
        return work.await;
    };
    let span = parent.start_child("db.connection", name);
    span.set_data("db.system", "postgresql".into());
    let output = work.await;
    span.finish();
    output
}

/// Whether this process sends performance transactions.
pub fn traces_enabled() -> bool {
    sentry_enabled() && TRACES.get().copied().unwrap_or(false)
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
        // Only for the log line; the request-id layer always runs first.
        .unwrap_or_default();
    let platform = req.extensions().get::<crate::runtime::Platform>().cloned();
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
    // The matched route, never the raw path: ids stay out of names.
    let transaction = traces_enabled().then(|| {
        let name = format!("{method} {route}");
        let tx = hub.start_transaction(sentry::TransactionContext::new(&name, "http.server"));
        if sampled(&tx.clone().into()) {
            hub.configure_scope(|scope| scope.set_span(Some(tx.clone().into())));
        }
        tx
    });
    let response = next
        .run(req)
        .instrument(span.clone())
        .bind_hub(hub.clone())
        .await;
    let status = response.status();
    let mut flush = false;
    if let Some(tx) = transaction {
        flush |= sampled(&tx.clone().into());
        tx.set_tag("http.status_code", status.as_u16());
        tx.set_status(span_status(status));
        tx.finish();
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        tracing::info!(status = status.as_u16(), elapsed_ms, "served");
    });
    // The rate limiter reports its own outages, at most once a minute.
    let self_reported = response
        .extensions()
        .get::<ProblemInfo>()
        .is_some_and(|p| p.self_reported);
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
        flush = true;
    }
    if flush {
        flush_after_response(platform);
    }
    response
}

/// The transaction status Sentry expects for an HTTP status.
fn span_status(status: http::StatusCode) -> sentry::protocol::SpanStatus {
    use sentry::protocol::SpanStatus;
    match status.as_u16() {
        0..=399 => SpanStatus::Ok,
        400 | 409 | 412 | 413 | 415 | 422 => SpanStatus::InvalidArgument,
        401 => SpanStatus::Unauthenticated,
        403 => SpanStatus::PermissionDenied,
        404 => SpanStatus::NotFound,
        429 => SpanStatus::ResourceExhausted,
        499 => SpanStatus::Cancelled,
        400..=499 => SpanStatus::FailedPrecondition,
        501 => SpanStatus::Unimplemented,
        503 => SpanStatus::Unavailable,
        504 => SpanStatus::DeadlineExceeded,
        _ => SpanStatus::InternalError,
    }
}

/// Flushes Sentry: on Vercel after the response (`wait_until`), on Lambda
/// before it is returned (the adapter awaits it, bounded), locally in a
/// background task.
fn flush_after_response(platform: Option<crate::runtime::Platform>) {
    let flush = async {
        let _ = tokio::task::spawn_blocking(|| {
            if let Some(client) = sentry::Hub::main().client() {
                client.flush(Some(FLUSH_TIMEOUT));
            }
        })
        .await;
    };
    crate::runtime::after_response(platform.as_ref(), flush);
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
mod log_filter_tests {
    use tracing::Level;

    #[test]
    fn rust_log_takes_levels_per_target_and_falls_back_to_the_default() {
        let f = super::log_filter(Some("warn,stagepass_routes=debug"));
        assert!(f.would_enable("stagepass_routes::tips", &Level::DEBUG));
        assert!(!f.would_enable("sqlx::query", &Level::INFO));
        assert!(f.would_enable("sqlx::query", &Level::WARN));
        for fallback in [None, Some("stagepass=loud")] {
            let f = super::log_filter(fallback);
            assert!(f.would_enable("stagepass_routes", &Level::INFO));
            assert!(!f.would_enable("sqlx::query", &Level::INFO));
        }
    }
}

/// An error and its causes in one line ("error sending request: … :
/// Connection refused"): a client library's own message alone often says
/// too little (the Upstash client, the soak's report of unanswered requests).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
