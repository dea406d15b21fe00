//! Clients for the services Stagepass talks to.
//!
//! - [`stripe`]: PaymentIntents and refunds over Stripe's form-encoded API,
//!   Connect (Express accounts, transfers) for paying creators, and
//!   [`stripe::webhook`] for signed webhook events.
//! - [`qstash`]: publishing delayed, deduplicated jobs and verifying their
//!   signed callbacks.
//! - [`ably`]: client tokens with server-decided capabilities, and REST
//!   publishing.
//! - [`agora`]: Agora RTC tokens (AccessToken2, "007") built and signed
//!   locally, and a decoder that verifies them (ADR 0017).
//! - `testing` (feature `testing`): a `localstripe` process per test, a
//!   webhook recorder, a recording fake for Ably and QStash, and a fake of
//!   Stripe's Connect endpoints (`testing::connect`).

// Money flows through this crate: a panic would turn a Stripe answer into a
// lost request, so fallible paths return errors instead.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::as_conversions)
)]

pub mod ably;
pub mod agora;
pub mod qstash;
pub mod stripe;
#[cfg(feature = "testing")]
// Test helpers may panic on a broken fixture; never in a deployed build.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]
pub mod testing;
