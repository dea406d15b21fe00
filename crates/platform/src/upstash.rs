//! A small client for Upstash Redis over REST.
//!
//! Why our own: the crate `upstash-redis-rs` 0.1.2 does not build on stable
//! Rust and has no EVAL; what we need is four request shapes over the
//! process's shared `reqwest` client (so a warm function reuses its
//! connection):
//!
//! - one command: `POST /` with `["SET","k","v"]` → `{"result": …}`, or
//!   HTTP 400 `{"error": "…"}` when Redis refuses the command;
//! - `POST /pipeline` (not atomic) and `POST /multi-exec` (atomic) with an
//!   array of commands → one `{"result"}` or `{"error"}` per command;
//! - [`Upstash::evalsha`]: `EVALSHA`, and on `NOSCRIPT` (a fresh or flushed
//!   script cache) `EVAL` with the source, which also puts the script back
//!   into Redis's cache, so the next call is one round trip again.
//!
//! Every call has an explicit timeout covering connect, send and the whole
//! response body, and responses are read up to [`MAX_RESPONSE_BYTES`].
//! Every HTTP request sent counts as one round trip ([`Upstash::round_trips`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use serde_json::Value;
use sha1::Digest as _;

use crate::config::{ExposeSecret, Secret};

/// A larger response is refused as malformed (our replies are tiny).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a call failed. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstashError {
    #[error("Upstash did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Upstash is unreachable: {0}")]
    Unreachable(String),
    /// A status other than 200 (and other than 400 with an `error` body).
    #[error("Upstash answered HTTP {0}")]
    Http(StatusCode),
    /// Redis refused the command (HTTP 400 `{"error"}`), e.g. `NOSCRIPT …`.
    #[error("Redis refused the command: {0}")]
    Command(String),
    #[error("Upstash answered something unexpected: {0}")]
    Malformed(String),
}

impl UpstashError {
    /// Whether Upstash itself could not be used (as opposed to Redis
    /// refusing a command): the limiter's fail modes apply to these.
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, UpstashError::Command(_))
    }
}

/// A Redis reply as Upstash renders it in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Int(i64),
    Text(String),
    Array(Vec<Reply>),
}

impl Reply {
    fn from_json(value: Value) -> Result<Reply, UpstashError> {
        match value {
            Value::Null => Ok(Reply::Nil),
            Value::Number(n) => n
                .as_i64()
                .map(Reply::Int)
                .ok_or_else(|| malformed("a result number is not an integer")),
            Value::String(s) => Ok(Reply::Text(s)),
            Value::Array(items) => items
                .into_iter()
                .map(Reply::from_json)
                .collect::<Result<_, _>>()
                .map(Reply::Array),
            Value::Bool(_) | Value::Object(_) => Err(malformed("a result is not a Redis value")),
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Reply::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// One command: its arguments in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command(Vec<String>);

impl Command {
    pub fn new(name: &str) -> Command {
        Command(vec![name.to_owned()])
    }

    pub fn arg(mut self, arg: impl fmt::Display) -> Command {
        self.0.push(arg.to_string());
        self
    }

    pub fn args<I: IntoIterator<Item = A>, A: fmt::Display>(mut self, args: I) -> Command {
        self.0.extend(args.into_iter().map(|a| a.to_string()));
        self
    }
}

/// The result of one command of a pipeline or transaction.
pub type Entry = Result<Reply, String>;

/// A Lua script with its SHA-1 (what `EVALSHA` names it by).
#[derive(Debug, Clone)]
pub struct Script {
    source: &'static str,
    sha1: String,
}

impl Script {
    pub fn new(source: &'static str) -> Script {
        let digest = sha1::Sha1::digest(source.as_bytes());
        let sha1 = digest.iter().map(|b| format!("{b:02x}")).collect();
        Script { source, sha1 }
    }

    pub fn sha1(&self) -> &str {
        &self.sha1
    }

    pub fn source(&self) -> &'static str {
        self.source
    }
}

/// The Upstash REST client. `Send + Sync`; share it in an `Arc`.
pub struct Upstash {
    base_url: String,
    authorization: HeaderValue,
    http: reqwest::Client,
    timeout: Duration,
    round_trips: AtomicU64,
}

impl fmt::Debug for Upstash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstash")
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Upstash {
    /// `base_url` is the REST URL (`https://….upstash.io`); `http` the
    /// process's shared client; `timeout` bounds every call.
    pub fn new(
        base_url: &str,
        token: &Secret,
        http: reqwest::Client,
        timeout: Duration,
    ) -> Upstash {
        // A token that cannot be a header value (config checks only that
        // it is set) fails every call with 401 instead of panicking here.
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
            .unwrap_or_else(|_| {
                tracing::error!("the Upstash token has characters a header cannot carry");
                HeaderValue::from_static("Bearer invalid-token")
            });
        authorization.set_sensitive(true);
        Upstash {
            base_url: base_url.trim_end_matches('/').to_owned(),
            authorization,
            http,
            timeout,
            round_trips: AtomicU64::new(0),
        }
    }

    /// HTTP requests sent so far (each is one round trip to Redis).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one command.
    pub async fn command(&self, command: &Command) -> Result<Reply, UpstashError> {
        let body = self.post("", &command.0).await?;
        single_result(body)
    }

    /// Runs commands in one request; not atomic (other clients interleave).
    pub async fn pipeline(&self, commands: &[Command]) -> Result<Vec<Entry>, UpstashError> {
        self.batch("/pipeline", commands).await
    }

    /// Runs commands in one request inside MULTI/EXEC: atomic.
    pub async fn multi_exec(&self, commands: &[Command]) -> Result<Vec<Entry>, UpstashError> {
        self.batch("/multi-exec", commands).await
    }

    /// `EVALSHA`, falling back to `EVAL` on `NOSCRIPT` (two round trips,
    /// once per flush of Redis's script cache: EVAL caches the script again).
    pub async fn evalsha(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Reply, UpstashError> {
        let by_sha = Command::new("EVALSHA")
            .arg(script.sha1())
            .arg(keys.len())
            .args(keys)
            .args(args);
        match self.command(&by_sha).await {
            Err(UpstashError::Command(e)) if e.starts_with("NOSCRIPT") => {
                tracing::debug!(
                    sha1 = script.sha1(),
                    "script not cached in Redis; sending it"
                );
                let by_source = Command::new("EVAL")
                    .arg(script.source())
                    .arg(keys.len())
                    .args(keys)
                    .args(args);
                self.command(&by_source).await
            }
            other => other,
        }
    }

    async fn batch(&self, path: &str, commands: &[Command]) -> Result<Vec<Entry>, UpstashError> {
        let body: Vec<&Vec<String>> = commands.iter().map(|c| &c.0).collect();
        let value = self.post(path, &body).await?;
        let Value::Array(items) = value else {
            return Err(malformed("a batch answer is not an array"));
        };
        if items.len() != commands.len() {
            return Err(malformed("a batch answer has the wrong length"));
        }
        items.into_iter().map(entry).collect()
    }

    /// Sends one request and returns the JSON body of a 200, or the typed
    /// error of anything else.
    async fn post(&self, path: &str, body: &impl serde::Serialize) -> Result<Value, UpstashError> {
        let url = format!(
            "{}{}",
            self.base_url,
            if path.is_empty() { "/" } else { path }
        );
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let request = self
            .http
            .post(url)
            .header(http::header::AUTHORIZATION, self.authorization.clone())
            .timeout(self.timeout)
            .json(body);
        // The reqwest timeout covers the body too; this outer one also
        // bounds anything reqwest might not (e.g. a stalled DNS lookup).
        let exchange = async {
            let response = request.send().await.map_err(|e| self.transport(e.into()))?;
            let status = response.status();
            let bytes = read_limited(response)
                .await
                .map_err(|e| self.transport(e))?;
            Ok::<_, UpstashError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstashError::Timeout(self.timeout))??;
        interpret(status, &bytes)
    }

    fn transport(&self, e: TransportError) -> UpstashError {
        match e {
            TransportError::TooLarge => malformed("the answer is too large"),
            TransportError::Http(e) if e.is_timeout() => UpstashError::Timeout(self.timeout),
            // Without the URL: it is configuration, and the message goes to logs.
            TransportError::Http(e) => {
                UpstashError::Unreachable(crate::telemetry::error_chain(&e.without_url()))
            }
        }
    }
}

enum TransportError {
    Http(reqwest::Error),
    TooLarge,
}

impl From<reqwest::Error> for TransportError {
    fn from(e: reqwest::Error) -> Self {
        TransportError::Http(e)
    }
}

/// Reads the body up to [`MAX_RESPONSE_BYTES`].
async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, TransportError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(TransportError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Status and body → the JSON of a success, or the error Upstash means.
fn interpret(status: StatusCode, body: &[u8]) -> Result<Value, UpstashError> {
    match status {
        StatusCode::OK => {
            serde_json::from_slice(body).map_err(|_| malformed("the answer is not JSON"))
        }
        // Command errors are 400 with `{"error": "…"}`; a 400 without that
        // shape is an HTTP-level refusal.
        StatusCode::BAD_REQUEST => match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut o)) => match o.remove("error") {
                Some(Value::String(e)) => Err(UpstashError::Command(e)),
                _ => Err(UpstashError::Http(status)),
            },
            _ => Err(UpstashError::Http(status)),
        },
        _ => Err(UpstashError::Http(status)),
    }
}

/// `{"result": …}` → the reply; `{"error": …}` → a command error.
fn single_result(value: Value) -> Result<Reply, UpstashError> {
    match entry(value)? {
        Ok(reply) => Ok(reply),
        Err(e) => Err(UpstashError::Command(e)),
    }
}

fn entry(value: Value) -> Result<Entry, UpstashError> {
    let Value::Object(mut o) = value else {
        return Err(malformed("an answer is not an object"));
    };
    if let Some(e) = o.remove("error") {
        return match e {
            Value::String(e) => Ok(Err(e)),
            _ => Err(malformed("an error is not a string")),
        };
    }
    match o.remove("result") {
        Some(result) => Reply::from_json(result).map(Ok),
        None => Err(malformed("an answer has neither result nor error")),
    }
}

fn malformed(what: &str) -> UpstashError {
    UpstashError::Malformed(what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_sha1_matches_redis() {
        // `redis-cli SCRIPT LOAD "return 1"` answers this digest.
        assert_eq!(
            Script::new("return 1").sha1(),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn interprets_upstash_shapes() {
        let ok = interpret(StatusCode::OK, br#"{"result":["a",1,null]}"#).unwrap();
        assert_eq!(
            single_result(ok).unwrap(),
            Reply::Array(vec![Reply::Text("a".into()), Reply::Int(1), Reply::Nil])
        );
        assert_eq!(
            interpret(StatusCode::BAD_REQUEST, br#"{"error":"ERR nope"}"#),
            Err(UpstashError::Command("ERR nope".into()))
        );
        assert_eq!(
            interpret(StatusCode::UNAUTHORIZED, br#"{"error":"Unauthorized"}"#),
            Err(UpstashError::Http(StatusCode::UNAUTHORIZED))
        );
        assert!(matches!(
            single_result(serde_json::json!({"result": 1.5})),
            Err(UpstashError::Malformed(_))
        ));
        assert!(matches!(
            single_result(serde_json::json!({"nothing": 1})),
            Err(UpstashError::Malformed(_))
        ));
    }
}
