//! Stripe webhooks: signature verification on the raw body, then the event.
//!
//! `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]`, where each `v1`
//! is HMAC-SHA256 over `"{t}.{raw body}"` keyed with the whole `whsec_…`
//! secret (there is one `v1` per active secret while a secret is rolled).
//! <https://docs.stripe.com/webhooks#verify-manually>
//!
//! About the age check (the old system's defect: "a 300 s age check rejected
//! all Stripe retries"): Stripe signs every delivery attempt afresh, with the
//! time of *that attempt* in `t`, so a retry hours later still carries a
//! recent `t`. The tolerance therefore applies to `t` — never to the event's
//! `created`, which stays the same across retries. The tests prove both.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

use super::connect::{Account, BankPayout, Capability, Transfer};
use super::encode_hex;
use super::types::{Charge, Dispute, PaymentIntent};

/// Stripe's own libraries' default.
pub const DEFAULT_TOLERANCE_SECONDS: i64 = 300;

/// Event types Stagepass acts on.
pub const PAYMENT_INTENT_SUCCEEDED: &str = "payment_intent.succeeded";
pub const PAYMENT_INTENT_PAYMENT_FAILED: &str = "payment_intent.payment_failed";
pub const CHARGE_REFUNDED: &str = "charge.refunded";
pub const CHARGE_DISPUTE_CREATED: &str = "charge.dispute.created";
/// Connect event types (their `account` names the connected account).
pub const ACCOUNT_UPDATED: &str = "account.updated";
pub const CAPABILITY_UPDATED: &str = "capability.updated";
pub const PAYOUT_PAID: &str = "payout.paid";
pub const PAYOUT_FAILED: &str = "payout.failed";
pub const PAYOUT_CANCELED: &str = "payout.canceled";
/// A platform event (no `account`): a transfer was (partly) reversed.
pub const TRANSFER_REVERSED: &str = "transfer.reversed";

const SIGNATURE_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("Stripe-Signature header is malformed: {0}")]
    MalformedHeader(&'static str),
    #[error("Stripe-Signature header has no v1 signature")]
    NoSignature,
    #[error("no v1 signature matches")]
    SignatureMismatch,
    /// The signature is genuine but was made too long ago (or in the
    /// future): a replay, or a badly wrong clock.
    #[error("signature timestamp is {age_seconds} s from now (tolerance {tolerance_seconds} s)")]
    TimestampOutsideTolerance {
        age_seconds: i64,
        tolerance_seconds: i64,
    },
    #[error("webhook secret is empty")]
    EmptySecret,
    /// A correctly signed body that is not an event (never expected from
    /// Stripe).
    #[error("webhook body is not a Stripe event: {0}")]
    InvalidPayload(String),
}

/// Checks `signature_header` against the raw `payload` bytes exactly as
/// received (parse nothing before this succeeds). Accepts when any `v1`
/// matches and `t` is within `tolerance_seconds` of `now_unix`.
pub fn verify(
    payload: &[u8],
    signature_header: &str,
    secret: &str,
    now_unix: i64,
    tolerance_seconds: i64,
) -> Result<(), WebhookError> {
    let header = SignatureHeader::parse(signature_header)?;
    let expected = signature(payload, secret, header.timestamp)?;
    // Compare against every candidate without stopping early; `ct_eq` keeps
    // each comparison constant-time.
    let matched = header
        .v1
        .iter()
        .filter_map(|candidate| decode_hex(candidate))
        .fold(Choice::from(0), |acc, candidate| {
            acc | candidate.ct_eq(&expected)
        });
    if !bool::from(matched) {
        return Err(WebhookError::SignatureMismatch);
    }
    let age_seconds = now_unix.saturating_sub(header.timestamp);
    if age_seconds.saturating_abs() > tolerance_seconds {
        return Err(WebhookError::TimestampOutsideTolerance {
            age_seconds,
            tolerance_seconds,
        });
    }
    Ok(())
}

/// [`verify`], then parse the body into an [`Event`].
pub fn verify_event(
    payload: &[u8],
    signature_header: &str,
    secret: &str,
    now_unix: i64,
    tolerance_seconds: i64,
) -> Result<Event, WebhookError> {
    verify(
        payload,
        signature_header,
        secret,
        now_unix,
        tolerance_seconds,
    )?;
    Event::from_slice(payload).map_err(|e| WebhookError::InvalidPayload(e.to_string()))
}

/// A `Stripe-Signature` header value for `payload` signed at `timestamp`,
/// as Stripe (and localstripe) would send it. For tests and fakes.
pub fn sign(payload: &[u8], secret: &str, timestamp: i64) -> Result<String, WebhookError> {
    let mac = signature(payload, secret, timestamp)?;
    Ok(format!("t={timestamp},v1={}", encode_hex(&mac)))
}

fn signature(
    payload: &[u8],
    secret: &str,
    timestamp: i64,
) -> Result<[u8; SIGNATURE_LEN], WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::EmptySecret);
    }
    // HMAC takes keys of any length; this cannot fail for a non-empty key.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .map_err(|_| WebhookError::EmptySecret)?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    Ok(mac.finalize().into_bytes().into())
}

struct SignatureHeader<'a> {
    timestamp: i64,
    v1: Vec<&'a str>,
}

impl<'a> SignatureHeader<'a> {
    fn parse(header: &'a str) -> Result<Self, WebhookError> {
        let mut timestamp = None;
        let mut v1 = Vec::new();
        for item in header.split(',') {
            let (key, value) = item
                .trim()
                .split_once('=')
                .ok_or(WebhookError::MalformedHeader("an item is not key=value"))?;
            match key {
                "t" if timestamp.is_some() => {
                    return Err(WebhookError::MalformedHeader("more than one t"));
                }
                "t" => {
                    let t = value
                        .parse::<i64>()
                        .map_err(|_| WebhookError::MalformedHeader("t is not an integer"))?;
                    timestamp = Some(t);
                }
                "v1" => v1.push(value),
                // v0 (test-mode legacy) and future schemes are ignored.
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(WebhookError::MalformedHeader("no t"))?;
        if v1.is_empty() {
            return Err(WebhookError::NoSignature);
        }
        Ok(SignatureHeader { timestamp, v1 })
    }
}

/// A 64-digit hex signature, or `None` (which then simply matches nothing).
fn decode_hex(text: &str) -> Option<[u8; SIGNATURE_LEN]> {
    let digits = text.as_bytes();
    if digits.len() != SIGNATURE_LEN * 2 {
        return None;
    }
    let mut out = [0u8; SIGNATURE_LEN];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// The event envelope. `data.object` stays JSON until a handler asks for
/// the typed object it expects.
#[derive(Clone, Deserialize)]
pub struct Event {
    /// `evt_…`: the same across Stripe's retries of one event; dedupe on it.
    pub id: String,
    #[serde(rename = "type")]
    pub type_: String,
    /// When the event happened (unix seconds); NOT the signature time.
    pub created: i64,
    #[serde(default)]
    pub livemode: bool,
    #[serde(default)]
    pub api_version: Option<String>,
    /// The connected account (`acct_…`) the event happened on; `None` for
    /// the platform's own events.
    #[serde(default)]
    pub account: Option<String>,
    pub data: EventData,
}

#[derive(Clone, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

/// Leaves out `data`: it may hold a PaymentIntent's client secret.
impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id)
            .field("type", &self.type_)
            .field("created", &self.created)
            .field("livemode", &self.livemode)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// What an event means to Stagepass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    PaymentIntentSucceeded,
    PaymentIntentPaymentFailed,
    ChargeRefunded,
    ChargeDisputeCreated,
    /// Acknowledged and ignored.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event object is a {found:?}, expected a {expected}")]
    UnexpectedObject {
        expected: &'static str,
        found: Option<String>,
    },
    #[error("event object could not be read: {0}")]
    Decode(String),
}

impl Event {
    pub fn from_slice(payload: &[u8]) -> Result<Event, serde_json::Error> {
        serde_json::from_slice(payload)
    }

    pub fn kind(&self) -> EventKind {
        match self.type_.as_str() {
            PAYMENT_INTENT_SUCCEEDED => EventKind::PaymentIntentSucceeded,
            PAYMENT_INTENT_PAYMENT_FAILED => EventKind::PaymentIntentPaymentFailed,
            CHARGE_REFUNDED => EventKind::ChargeRefunded,
            CHARGE_DISPUTE_CREATED => EventKind::ChargeDisputeCreated,
            _ => EventKind::Other,
        }
    }

    /// `data.object` of a `payment_intent.*` event.
    pub fn payment_intent(&self) -> Result<PaymentIntent, EventError> {
        self.object("payment_intent")
    }

    /// `data.object` of a `charge.*` event (e.g. `charge.refunded`).
    pub fn charge(&self) -> Result<Charge, EventError> {
        self.object("charge")
    }

    /// `data.object` of a `charge.dispute.*` event.
    pub fn dispute(&self) -> Result<Dispute, EventError> {
        self.object("dispute")
    }

    /// `data.object` of an `account.updated` event.
    pub fn connect_account(&self) -> Result<Account, EventError> {
        self.object("account")
    }

    /// `data.object` of a `capability.updated` event.
    pub fn capability(&self) -> Result<Capability, EventError> {
        self.object("capability")
    }

    /// `data.object` of a `payout.*` event (a connected account's bank payout).
    pub fn bank_payout(&self) -> Result<BankPayout, EventError> {
        self.object("payout")
    }

    /// `data.object` of a `transfer.*` event (e.g. `transfer.reversed`).
    pub fn transfer(&self) -> Result<Transfer, EventError> {
        self.object("transfer")
    }

    fn object<'a, T: Deserialize<'a>>(&'a self, expected: &'static str) -> Result<T, EventError> {
        let found = self.data.object.get("object").and_then(|o| o.as_str());
        if found != Some(expected) {
            return Err(EventError::UnexpectedObject {
                expected,
                found: found.map(str::to_owned),
            });
        }
        T::deserialize(&self.data.object).map_err(|e| EventError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
