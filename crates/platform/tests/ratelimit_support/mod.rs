//! Shared by the `ratelimit*` tests: a shim over the real Redis per test,
//! clients, limiters with a random key prefix, and fixed times.
//!
//! `REDIS_URL` names the Redis (default `redis://127.0.0.1:6379`). Tests
//! never FLUSHALL: other tests share that Redis; a random prefix keeps
//! their keys apart.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use stagepass_platform::config::Secret;
use stagepass_platform::ratelimit::{Identity, RateLimiter};
use stagepass_platform::upstash::Upstash;
use upstash_shim::ShimHandle;

pub const TOKEN: &str = "test-upstash-token";

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub struct Shim {
    pub addr: SocketAddr,
    pub handle: ShimHandle,
}

impl Shim {
    pub async fn start() -> Shim {
        let (addr, handle) = upstash_shim::spawn(&redis_url(), TOKEN)
            .await
            .expect("start the Upstash shim");
        Shim { addr, handle }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> Arc<Upstash> {
        client(&self.url(), TOKEN, Duration::from_secs(2))
    }

    /// Requests that reached the shim so far.
    pub fn requests(&self) -> u64 {
        self.handle.requests()
    }
}

pub fn client(url: &str, token: &str, timeout: Duration) -> Arc<Upstash> {
    Arc::new(Upstash::new(
        url,
        &Secret::from(token.to_owned()),
        reqwest::Client::new(),
        timeout,
    ))
}

/// A key prefix no other test uses.
pub fn prefix() -> String {
    format!("test:rl:{}", uuid::Uuid::new_v4().simple())
}

pub fn limiter(client: Arc<Upstash>) -> RateLimiter {
    RateLimiter::upstash(client).with_prefix(prefix())
}

/// A time `ms` milliseconds after a whole hour (every window size we use
/// divides an hour, so offset 0 is the start of a window).
pub fn at(ms: i64) -> DateTime<Utc> {
    // 2030-03-17T17:20:00Z, a whole hour.
    let hour_start = 1_900_000_800_000_i64;
    debug_assert_eq!(hour_start % 3_600_000, 0);
    Utc.timestamp_millis_opt(hour_start + ms).unwrap()
}

pub fn user(id: uuid::Uuid) -> Identity<'static> {
    Identity {
        user: Some(id),
        ..Identity::default()
    }
}

pub fn new_user() -> Identity<'static> {
    user(uuid::Uuid::new_v4())
}

/// A local port with nothing listening.
pub async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}
