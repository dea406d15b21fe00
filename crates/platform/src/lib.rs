//! What every Stagepass function shares.
//!
//! - [`config`]: typed per-need settings, validated once at cold start.
//! - [`auth`]: Supabase access tokens verified locally (HS256 and JWKS).
//! - [`http`]: problem responses, security headers, CORS, request ids, strict JSON.
//! - [`db`]: the per-process pool and transactions under row-level security.
//! - [`telemetry`]: tracing and Sentry.
//! - [`serve`]: runs a router on Vercel, on Lambda, or locally.
//! - [`runtime`]: the per-request handle for work after the response.
//! - [`upstash`]: a small Upstash Redis REST client.
//! - [`ratelimit`]: every limit of a request in one Upstash round trip.
//! - [`flags`]: feature flags, evaluated in process from a short-lived cache.

pub mod auth;
pub mod config;
pub mod cron;
pub mod db;
pub mod flags;
pub mod http;
pub mod idempotency;
pub mod local;
pub mod ratelimit;
pub mod runtime;
pub mod serve;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod upstash;
