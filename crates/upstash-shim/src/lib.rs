//! An Upstash-REST-compatible server over a real Redis.
//!
//! It behaves like Upstash's REST API where our client and
//! `@upstash/redis` depend on it:
//!
//! - `POST /` with a JSON array (`["SET","k","v"]`) runs one command and
//!   answers `{"result": …}`, or HTTP 400 `{"error": "ERR …"}` when Redis
//!   refuses the command;
//! - `POST /pipeline` with an array of commands answers HTTP 200 with one
//!   `{"result"}` or `{"error"}` per command (not atomic, like Upstash);
//! - `POST /multi-exec` runs the commands in MULTI/EXEC on one connection
//!   (atomic) and answers the same shape; a transaction Redis aborts
//!   (EXECABORT) is HTTP 400 `{"error"}`;
//! - every endpoint requires `Authorization: Bearer <token>` (or `?_token=`),
//!   else HTTP 401 `{"error":"Unauthorized"}`;
//! - replies are converted like Upstash does: bulk strings as JSON strings,
//!   integers as numbers, nil as `null`, arrays as arrays; with the request
//!   header `Upstash-Encoding: base64` (which `@upstash/redis` sends by
//!   default) bulk strings are base64-encoded, status replies such as `OK`
//!   are not.
//!
//! Not supported: the `GET /set/foo/bar` path form, streaming (SUBSCRIBE,
//! MONITOR) and blocking commands beyond their timeouts.
//!
//! `GET /__stats` answers `{"requests": n}`, the number of command requests
//! served (`/`, `/pipeline`, `/multi-exec`, authorized or not), so tests and
//! benchmarks can count round trips from outside.

pub mod resp;
mod scripts;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};

use resp::{Pool, Resp, Target};
use scripts::Scripts;

/// Redis connections the shim keeps at most (requests beyond wait).
const MAX_REDIS_CONNECTIONS: usize = 64;
/// Commands in one pipeline or transaction, at most.
const MAX_BATCH: usize = 1000;

/// Requests served, shared with whoever started the shim.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
}

impl Stats {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

struct Shim {
    pool: Pool,
    token: String,
    stats: Arc<Stats>,
    scripts: Scripts,
}

/// The shim's router over the Redis at `redis_url`, requiring `token`.
pub fn router(redis_url: &str, token: &str, stats: Arc<Stats>) -> std::io::Result<Router> {
    let shim = Arc::new(Shim {
        pool: Pool::new(Target::parse(redis_url)?, MAX_REDIS_CONNECTIONS),
        token: token.to_owned(),
        stats,
        scripts: Scripts::default(),
    });
    Ok(Router::new()
        .route("/", post(single))
        .route("/pipeline", post(pipeline))
        .route("/multi-exec", post(multi_exec))
        .route("/__stats", get(stats_handler))
        .with_state(shim))
}

/// A running shim (tests): stops when dropped.
pub struct ShimHandle {
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl ShimHandle {
    /// Command requests served so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

impl Drop for ShimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a shim on a random port of 127.0.0.1.
pub async fn spawn(redis_url: &str, token: &str) -> std::io::Result<(SocketAddr, ShimHandle)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    serve_on(listener, redis_url, token).await
}

/// Serves a shim on `listener` in a background task.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    redis_url: &str,
    token: &str,
) -> std::io::Result<(SocketAddr, ShimHandle)> {
    let addr = listener.local_addr()?;
    let stats = Arc::new(Stats::default());
    let app = router(redis_url, token, stats.clone())?;
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, ShimHandle { stats, task }))
}

async fn stats_handler(State(shim): State<Arc<Shim>>) -> Response {
    json_response(StatusCode::OK, json!({ "requests": shim.stats.requests() }))
}

/// How one request wants its replies.
struct Request {
    base64: bool,
}

/// Counts the request, checks the token and reads the encoding header.
fn admit(
    shim: &Shim,
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
) -> Result<Request, Unauthorized> {
    shim.stats.requests.fetch_add(1, Ordering::Relaxed);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = bearer.or(query.get("_token").map(String::as_str));
    if token != Some(shim.token.as_str()) {
        return Err(Unauthorized);
    }
    let base64 = headers
        .get("upstash-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("base64"));
    Ok(Request { base64 })
}

/// A missing or wrong token: 401 `{"error":"Unauthorized"}`, like Upstash.
struct Unauthorized;

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        error(StatusCode::UNAUTHORIZED, "Unauthorized")
    }
}

type Params = Query<std::collections::HashMap<String, String>>;

async fn single(
    State(shim): State<Arc<Shim>>,
    Query(query): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match admit(&shim, &headers, &query) {
        Ok(r) => r,
        Err(unauthorized) => return unauthorized.into_response(),
    };
    let commands = match parse_json(&body).and_then(|v| command(&v)) {
        Ok(c) => vec![c],
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    match shim.run(commands).await {
        Ok(mut replies) => match replies.pop() {
            Some(Resp::Error(e)) => error(StatusCode::BAD_REQUEST, &e),
            Some(reply) => json_response(StatusCode::OK, json!({ "result": convert(reply, &req) })),
            None => error(StatusCode::INTERNAL_SERVER_ERROR, "no reply from Redis"),
        },
        Err(e) => redis_failed(e),
    }
}

async fn pipeline(
    State(shim): State<Arc<Shim>>,
    Query(query): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match admit(&shim, &headers, &query) {
        Ok(r) => r,
        Err(unauthorized) => return unauthorized.into_response(),
    };
    let commands = match parse_json(&body).and_then(|v| commands(&v)) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    match shim.run(commands).await {
        Ok(replies) => {
            let items: Vec<Value> = replies.into_iter().map(|r| entry(r, &req)).collect();
            json_response(StatusCode::OK, Value::Array(items))
        }
        Err(e) => redis_failed(e),
    }
}

async fn multi_exec(
    State(shim): State<Arc<Shim>>,
    Query(query): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match admit(&shim, &headers, &query) {
        Ok(r) => r,
        Err(unauthorized) => return unauthorized.into_response(),
    };
    let commands = match parse_json(&body).and_then(|v| commands(&v)) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let n = commands.len();
    let mut batch = Vec::with_capacity(n + 2);
    batch.push(vec![b"MULTI".to_vec()]);
    batch.extend(commands);
    batch.push(vec![b"EXEC".to_vec()]);
    let replies = match shim.run(batch).await {
        Ok(r) => r,
        Err(e) => return redis_failed(e),
    };
    transaction_response(replies, &req)
}

/// MULTI's, the queued commands' and EXEC's replies → Upstash's answer.
fn transaction_response(mut replies: Vec<Resp>, req: &Request) -> Response {
    let exec = replies.pop();
    // A command refused while queueing aborts the whole transaction; name it.
    let queue_error = replies.iter().find_map(|r| match r {
        Resp::Error(e) => Some(e.clone()),
        _ => None,
    });
    match exec {
        Some(Resp::Array(Some(results))) => {
            let items: Vec<Value> = results.into_iter().map(|r| entry(r, req)).collect();
            json_response(StatusCode::OK, Value::Array(items))
        }
        Some(Resp::Error(e)) => error(StatusCode::BAD_REQUEST, &queue_error.unwrap_or(e)),
        _ => error(StatusCode::BAD_REQUEST, "EXECABORT transaction aborted"),
    }
}

impl Shim {
    /// Runs `commands` back to back on one connection, after the script
    /// rewriting Redis needs (see [`scripts`]).
    async fn run(&self, mut commands: Vec<Vec<Vec<u8>>>) -> std::io::Result<Vec<Resp>> {
        let loads: Vec<Option<String>> = commands
            .iter_mut()
            .map(|c| self.scripts.rewrite(c))
            .collect();
        let n = commands.len();
        let mut replies = exchange(&self.pool, commands, n).await?;
        // A rewritten SCRIPT LOAD answers the digest the client knows.
        for (reply, load) in replies.iter_mut().zip(loads) {
            if let (Some(original), Resp::Bulk(Some(_))) = (load, &reply) {
                *reply = Resp::Bulk(Some(original.into_bytes()));
            }
        }
        Ok(replies)
    }
}

/// Sends `commands` on one pooled connection and reads `expect` replies.
async fn exchange(
    pool: &Pool,
    commands: Vec<Vec<Vec<u8>>>,
    expect: usize,
) -> std::io::Result<Vec<Resp>> {
    let mut lease = pool.get().await?;
    lease.conn.send(&commands).await?;
    let mut replies = Vec::with_capacity(expect);
    for _ in 0..expect {
        replies.push(lease.conn.read().await?);
    }
    pool.put(lease);
    Ok(replies)
}

fn parse_json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|_| "ERR failed to parse command".to_owned())
}

/// One command: a non-empty array of strings, numbers or booleans.
fn command(value: &Value) -> Result<Vec<Vec<u8>>, String> {
    let Value::Array(args) = value else {
        return Err("ERR a command must be a JSON array".to_owned());
    };
    if args.is_empty() {
        return Err("ERR empty command".to_owned());
    }
    args.iter()
        .map(|arg| match arg {
            Value::String(s) => Ok(s.as_bytes().to_vec()),
            Value::Number(n) => Ok(n.to_string().into_bytes()),
            Value::Bool(b) => Ok(b.to_string().into_bytes()),
            _ => Err("ERR command arguments must be strings or numbers".to_owned()),
        })
        .collect()
}

/// A batch: a non-empty array of commands, bounded.
fn commands(value: &Value) -> Result<Vec<Vec<Vec<u8>>>, String> {
    let Value::Array(items) = value else {
        return Err("ERR a pipeline must be a JSON array of commands".to_owned());
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(format!("ERR a pipeline has 1 to {MAX_BATCH} commands"));
    }
    items.iter().map(command).collect()
}

/// One element of a pipeline or transaction answer.
fn entry(reply: Resp, req: &Request) -> Value {
    match reply {
        Resp::Error(e) => json!({ "error": e }),
        reply => json!({ "result": convert(reply, req) }),
    }
}

/// A Redis reply as Upstash renders it.
fn convert(reply: Resp, req: &Request) -> Value {
    match reply {
        Resp::Simple(s) | Resp::Error(s) => Value::String(s),
        Resp::Int(n) => Value::from(n),
        Resp::Bulk(None) | Resp::Array(None) => Value::Null,
        Resp::Bulk(Some(bytes)) if req.base64 => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Resp::Bulk(Some(bytes)) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        Resp::Array(Some(items)) => {
            Value::Array(items.into_iter().map(|r| convert(r, req)).collect())
        }
    }
}

fn redis_failed(e: std::io::Error) -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("ERR Redis is unavailable: {e}"),
    )
}

fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, json!({ "error": message }))
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
