//! Stripe: a small typed client for the calls Stagepass makes, and webhooks.
//!
//! Requests are form-encoded (`metadata[key]=value`), authenticated with
//! `Authorization: Bearer sk_…`, pinned to [`STRIPE_API_VERSION`], bounded by
//! an explicit timeout, and retried only when retrying cannot charge twice (a
//! `GET`, or a `POST` that carries an `Idempotency-Key`, resent with the same
//! key). The response types read only the fields Stagepass uses and accept both
//! the current API shapes and the older ones localstripe produces.
//!
//! Connect (paying creators through Express accounts) is in `connect.rs`:
//! its parameters and objects, with the calls on [`StripeClient`]. Tests run
//! it against `testing::connect::ConnectFake`, whose shapes are checked
//! against Stripe's published OpenAPI spec.

use sha2::{Digest, Sha256};

mod client;
mod connect;
mod error;
mod form;
mod types;
pub mod webhook;

pub use client::{CreatePaymentIntent, CreateRefund, STRIPE_API_VERSION, StripeClient};
pub use connect::{
    Account, AccountCapabilities, AccountLink, Balance, BalanceAmount, BankPayout, Capability,
    CapabilityStatus, CreateAccountLink, CreateExpressAccount, CreateTransfer, Requirements,
    Transfer, TransferReversal,
};
pub use error::{ApiError, StripeError};
pub use types::{Charge, Dispute, PaymentError, PaymentIntent, PaymentIntentStatus, Refund};

/// The Stripe `Idempotency-Key` for a client's request: the same user,
/// purpose and client key always give the same Stripe key, so a client's
/// retry cannot create a second PaymentIntent (SPEC §6 defect 2), while two
/// users' equal keys never collide. The client key is hashed because it may
/// hold up to 255 characters of its own, and Stripe allows 255 in total.
///
/// `purpose` names the operation (e.g. `purchase`), `user_id` the caller.
pub fn idempotency_key(purpose: &str, user_id: &str, client_key: &str) -> String {
    let digest = Sha256::digest(client_key.as_bytes());
    format!("{purpose}:{user_id}:{}", encode_hex(&digest))
}

/// Lower-case hex, as Stripe writes signatures.
pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_stable_scoped_and_bounded() {
        let user = "0190a3c4-7b1e-7000-8000-000000000001";
        let key = idempotency_key("purchase", user, "client-key-1");
        assert_eq!(key, idempotency_key("purchase", user, "client-key-1"));
        assert_ne!(
            key,
            idempotency_key("purchase", "another-user", "client-key-1")
        );
        assert_ne!(key, idempotency_key("refund", user, "client-key-1"));
        assert_ne!(key, idempotency_key("purchase", user, "client-key-2"));
        assert!(key.starts_with("purchase:0190a3c4-7b1e-7000-8000-000000000001:"));

        let longest = idempotency_key("purchase", user, &"k".repeat(255));
        assert_eq!(longest.len(), "purchase:".len() + user.len() + 1 + 64);
        assert!(longest.bytes().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(encode_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
