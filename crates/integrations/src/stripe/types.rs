//! The Stripe objects Stagepass reads, reduced to the fields it uses.
//!
//! Unknown fields are ignored, so newer API versions do not break decoding.
//! Fields that are ids in the current API but may arrive expanded into whole
//! objects (`latest_charge`, `charge`, `payment_intent`) accept both: Stripe
//! expands them on request, and localstripe always sends `latest_charge`
//! expanded.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// A PaymentIntent: one attempt to collect a purchase's price.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    pub status: PaymentIntentStatus,
    /// In the currency's smallest unit (cents for USD).
    #[serde(rename = "amount")]
    pub amount_cents: i64,
    pub currency: String,
    /// Handed to the frontend so Stripe.js can confirm (and run 3-D Secure).
    /// Redacted from `Debug`: it lets its holder confirm the payment.
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "optional_id")]
    pub latest_charge: Option<String>,
    #[serde(default)]
    pub last_payment_error: Option<PaymentError>,
    #[serde(default)]
    pub livemode: bool,
}

impl std::fmt::Debug for PaymentIntent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentIntent")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("amount_cents", &self.amount_cents)
            .field("currency", &self.currency)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[REDACTED]"),
            )
            .field("metadata", &self.metadata)
            .field("latest_charge", &self.latest_charge)
            .field("last_payment_error", &self.last_payment_error)
            .field("livemode", &self.livemode)
            .finish()
    }
}

/// <https://docs.stripe.com/payments/paymentintents/lifecycle>
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentIntentStatus {
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresAction,
    Processing,
    RequiresCapture,
    Canceled,
    Succeeded,
    /// A status added after this code was written: treat as "not final".
    #[serde(other)]
    Unknown,
}

impl PaymentIntentStatus {
    /// Whether the PaymentIntent can still change into `Succeeded`.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PaymentIntentStatus::Succeeded | PaymentIntentStatus::Canceled
        )
    }
}

/// Why the last confirmation failed (`last_payment_error`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PaymentError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub decline_code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// A charge, as carried by `charge.refunded` events.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Charge {
    pub id: String,
    #[serde(rename = "amount")]
    pub amount_cents: i64,
    /// Cumulative: everything refunded so far, not this refund alone.
    #[serde(rename = "amount_refunded", default)]
    pub amount_refunded_cents: i64,
    pub currency: String,
    #[serde(default, deserialize_with = "optional_id")]
    pub payment_intent: Option<String>,
    /// True once the whole amount is refunded.
    #[serde(default)]
    pub refunded: bool,
}

/// A dispute (chargeback), as carried by `charge.dispute.*` events.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Dispute {
    pub id: String,
    /// The disputed amount (may be less than the charge).
    #[serde(rename = "amount")]
    pub amount_cents: i64,
    pub currency: String,
    #[serde(deserialize_with = "required_id")]
    pub charge: String,
    #[serde(default, deserialize_with = "optional_id")]
    pub payment_intent: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

/// A refund created through the API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Refund {
    pub id: String,
    #[serde(rename = "amount")]
    pub amount_cents: i64,
    pub currency: String,
    #[serde(default, deserialize_with = "optional_id")]
    pub charge: Option<String>,
    #[serde(default, deserialize_with = "optional_id")]
    pub payment_intent: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// An id, or the object it names (expanded).
#[derive(Deserialize)]
#[serde(untagged)]
enum IdOrObject {
    Id(String),
    Object(Expanded),
}

#[derive(Deserialize)]
struct Expanded {
    id: String,
}

impl IdOrObject {
    fn into_id(self) -> String {
        match self {
            IdOrObject::Id(id) => id,
            IdOrObject::Object(o) => o.id,
        }
    }
}

fn optional_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<IdOrObject>::deserialize(d)?.map(IdOrObject::into_id))
}

pub(crate) fn required_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(IdOrObject::deserialize(d)?.into_id())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn current_api_shape() {
        let pi: PaymentIntent = serde_json::from_value(json!({
            "id": "pi_1", "object": "payment_intent", "status": "requires_payment_method",
            "amount": 1900, "currency": "usd", "client_secret": "pi_1_secret_x",
            "metadata": {"user_id": "u1"}, "latest_charge": null,
            "payment_method_types": ["card"], "livemode": false
        }))
        .unwrap();
        assert_eq!(pi.status, PaymentIntentStatus::RequiresPaymentMethod);
        assert_eq!(pi.amount_cents, 1900);
        assert_eq!(pi.metadata["user_id"], "u1");
        assert_eq!(pi.latest_charge, None);

        let pi: PaymentIntent = serde_json::from_value(json!({
            "id": "pi_1", "status": "succeeded", "amount": 1900, "currency": "usd",
            "latest_charge": "ch_1"
        }))
        .unwrap();
        assert_eq!(pi.latest_charge.as_deref(), Some("ch_1"));
    }

    #[test]
    fn localstripe_shape_with_expanded_latest_charge() {
        let event: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/localstripe_payment_intent_succeeded.json"
        ))
        .unwrap();
        let pi = PaymentIntent::deserialize(&event["data"]["object"]).unwrap();
        assert_eq!(pi.id, "pi_CTwr79IN4GKsFO");
        assert_eq!(pi.status, PaymentIntentStatus::Succeeded);
        assert_eq!(pi.latest_charge.as_deref(), Some("ch_1BWMaIhizehO2A"));
    }

    #[test]
    fn unknown_status_is_not_an_error() {
        let pi: PaymentIntent = serde_json::from_value(json!({
            "id": "pi_1", "status": "requires_reauthorization", "amount": 1, "currency": "usd"
        }))
        .unwrap();
        assert_eq!(pi.status, PaymentIntentStatus::Unknown);
        assert!(!pi.status.is_final());
    }

    #[test]
    fn debug_hides_the_client_secret() {
        let pi: PaymentIntent = serde_json::from_value(json!({
            "id": "pi_1", "status": "succeeded", "amount": 1, "currency": "usd",
            "client_secret": "pi_1_secret_abc"
        }))
        .unwrap();
        let printed = format!("{pi:?}");
        assert!(!printed.contains("secret_abc"), "{printed}");
        assert!(printed.contains("[REDACTED]"));
    }

    #[test]
    fn dispute_accepts_an_expanded_charge() {
        let d: Dispute = serde_json::from_value(json!({
            "id": "dp_1", "amount": 500, "currency": "usd",
            "charge": {"id": "ch_1", "amount": 500}, "payment_intent": "pi_1",
            "reason": "fraudulent", "status": "needs_response"
        }))
        .unwrap();
        assert_eq!(d.charge, "ch_1");
        assert_eq!(d.payment_intent.as_deref(), Some("pi_1"));
    }
}
