//! Stripe Connect (Express accounts): the parameters Stagepass sends and the
//! objects it reads back, for paying creators.
//!
//! - an Express account per creator (`POST /v1/accounts`), onboarded through
//!   single-use account links (`POST /v1/account_links`);
//! - transfers from the platform balance to that account (`/v1/transfers`),
//!   one per `transfer_group`, reversed when a payout must be clawed back;
//! - the platform balance (`GET /v1/balance`);
//! - the objects carried by Connect webhooks (`account`, `capability`,
//!   `payout`).
//!
//! As in `types.rs`, response types read only the fields Stagepass uses and
//! ignore unknown ones. Checked against Stripe's published OpenAPI spec by
//! `tests/connect_fake.rs`.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use super::form::Form;
use super::types::required_id;

/// Parameters of `POST /v1/accounts` for an Express account that can receive
/// transfers and is paid out daily, as soon as Stripe allows.
///
/// The spec pinned by the tests has no `controller` parameter on this call,
/// which is why the form sends `type=express`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateExpressAccount {
    /// Prefills onboarding; Stripe does not use it to log in.
    pub email: Option<String>,
    /// ISO 3166-1 alpha-2, e.g. `US`. Cannot be changed later.
    pub country: String,
    /// Our references (creator id). Same key rules as
    /// [`super::CreatePaymentIntent::metadata`].
    pub metadata: BTreeMap<String, String>,
}

impl CreateExpressAccount {
    pub(crate) fn form(&self) -> Form {
        Form::new()
            .field("type", "express")
            .field("country", self.country.as_str())
            .optional("email", self.email.as_deref())
            .field("capabilities[transfers][requested]", "true")
            .field("settings[payouts][schedule][interval]", "daily")
            .field("settings[payouts][schedule][delay_days]", "minimum")
            .map("metadata", &self.metadata)
    }
}

/// A connected account, reduced to what decides whether we can pay it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Account {
    /// `acct_…`.
    pub id: String,
    /// The creator finished Stripe's onboarding form.
    #[serde(default)]
    pub details_submitted: bool,
    /// Stripe can pay the account's balance out to its bank.
    #[serde(default)]
    pub payouts_enabled: bool,
    #[serde(default)]
    pub capabilities: AccountCapabilities,
    /// What Stripe needs now to keep (or enable) the account.
    #[serde(default)]
    pub requirements: Option<Requirements>,
    /// What Stripe will need later (a rule change with a deadline).
    #[serde(default)]
    pub future_requirements: Option<Requirements>,
}

impl Account {
    /// Transfers to this account succeed only while this holds.
    pub fn can_receive_transfers(&self) -> bool {
        self.capabilities.transfers == Some(CapabilityStatus::Active)
    }
}

/// The capabilities Stagepass requests (only `transfers`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AccountCapabilities {
    /// `None` when the capability was never requested.
    #[serde(default)]
    pub transfers: Option<CapabilityStatus>,
}

/// A capability's status (`account.capabilities.*`, `capability.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapabilityStatus {
    /// Usable.
    Active,
    /// Requirements are due (or past due).
    Inactive,
    /// Stripe is verifying what was provided.
    Pending,
    /// `disabled`, `unrequested`, or a status added later: not usable.
    #[serde(other)]
    Unknown,
}

/// `requirements` / `future_requirements` of an account or capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Requirements {
    /// Needed now; becomes `past_due` after `current_deadline`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub currently_due: Vec<String>,
    /// Overdue: the capability is disabled until they are provided.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub past_due: Vec<String>,
    /// Needed eventually (as volume thresholds are reached).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub eventually_due: Vec<String>,
    /// Unix seconds.
    #[serde(default)]
    pub current_deadline: Option<i64>,
    /// Why the account or capability is disabled, e.g.
    /// `requirements.past_due`.
    #[serde(default)]
    pub disabled_reason: Option<String>,
}

/// Parameters of `POST /v1/account_links` (`type=account_onboarding`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateAccountLink {
    /// `acct_…`.
    pub account: String,
    /// Where Stripe sends the creator when the link expired or was used:
    /// our page that makes a new link.
    pub refresh_url: String,
    /// Where Stripe sends the creator after the form (finished or not).
    pub return_url: String,
}

impl CreateAccountLink {
    pub(crate) fn form(&self) -> Form {
        Form::new()
            .field("account", self.account.as_str())
            .field("refresh_url", self.refresh_url.as_str())
            .field("return_url", self.return_url.as_str())
            .field("type", "account_onboarding")
    }
}

/// A single-use onboarding link. Whoever holds the URL can fill in (and
/// change) the creator's payout details until it expires, so it is a
/// credential: `Debug` redacts it and it must never be logged.
#[derive(Clone, Deserialize)]
pub struct AccountLink {
    #[serde(deserialize_with = "secret_string")]
    url: SecretString,
    /// Unix seconds; links live a few minutes.
    pub expires_at: i64,
    /// Unix seconds.
    pub created: i64,
}

impl AccountLink {
    /// The URL to redirect the creator to (and nowhere else).
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }
}

impl std::fmt::Debug for AccountLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountLink")
            .field("url", &"[REDACTED]")
            .field("expires_at", &self.expires_at)
            .field("created", &self.created)
            .finish()
    }
}

/// Parameters of `POST /v1/transfers`: platform balance → connected account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTransfer {
    /// In the currency's smallest unit; positive.
    pub amount_cents: i64,
    /// Lower-case ISO code, e.g. `usd`.
    pub currency: String,
    /// `acct_…`.
    pub destination: String,
    /// Names the payout this transfer belongs to; [`super::StripeClient::list_transfers`]
    /// finds it again after a lost answer or a forgotten idempotency key.
    pub transfer_group: String,
    pub metadata: BTreeMap<String, String>,
    pub description: Option<String>,
}

impl CreateTransfer {
    pub(crate) fn form(&self) -> Form {
        Form::new()
            .field("amount", self.amount_cents.to_string())
            .field("currency", self.currency.as_str())
            .field("destination", self.destination.as_str())
            .field("transfer_group", self.transfer_group.as_str())
            .map("metadata", &self.metadata)
            .optional("description", self.description.as_deref())
    }
}

/// A transfer to a connected account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Transfer {
    /// `tr_…`.
    pub id: String,
    /// In the currency's smallest unit.
    pub amount: i64,
    /// Lower-case ISO code.
    pub currency: String,
    /// `acct_…` (accepted expanded too).
    #[serde(deserialize_with = "required_id")]
    pub destination: String,
    /// The group it was created with.
    #[serde(default)]
    pub transfer_group: Option<String>,
    /// What it was created with.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Cumulative over all reversals.
    #[serde(default)]
    pub amount_reversed: i64,
    /// True once the whole amount is reversed.
    #[serde(default)]
    pub reversed: bool,
    /// Unix seconds.
    pub created: i64,
}

/// A (partial) reversal of a transfer: money back from the connected account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TransferReversal {
    /// `trr_…`.
    pub id: String,
    /// This reversal's amount (not the cumulative one).
    pub amount: i64,
    /// `tr_…` (accepted expanded too).
    #[serde(deserialize_with = "required_id")]
    pub transfer: String,
}

/// The platform's balance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Balance {
    /// Can be transferred now.
    #[serde(default)]
    pub available: Vec<BalanceAmount>,
    /// Not yet settled.
    #[serde(default)]
    pub pending: Vec<BalanceAmount>,
}

impl Balance {
    /// What can be transferred now in `currency` (lower-case ISO code); 0
    /// when the balance has no entry for it.
    pub fn available_in(&self, currency: &str) -> i64 {
        self.available
            .iter()
            .filter(|a| a.currency.eq_ignore_ascii_case(currency))
            .fold(0_i64, |sum, a| sum.saturating_add(a.amount))
    }
}

/// One currency's amount in a [`Balance`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BalanceAmount {
    /// In the currency's smallest unit; may be negative.
    pub amount: i64,
    /// Lower-case ISO code.
    pub currency: String,
}

/// A `capability` object (`capability.updated` events).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Capability {
    /// The capability's name, e.g. `transfers`.
    pub id: String,
    /// `acct_…` (accepted expanded too).
    #[serde(deserialize_with = "required_id")]
    pub account: String,
    /// Only `Active` lets transfers through.
    pub status: CapabilityStatus,
    /// What Stripe needs for this capability.
    #[serde(default)]
    pub requirements: Option<Requirements>,
}

/// A `payout` object: a connected account's balance paid to its bank
/// (`payout.paid`, `payout.failed`, `payout.canceled` events).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BankPayout {
    /// `po_…`.
    pub id: String,
    /// In the currency's smallest unit.
    pub amount: i64,
    /// Lower-case ISO code.
    pub currency: String,
    /// `paid`, `pending`, `in_transit`, `canceled` or `failed`.
    pub status: String,
    /// Why it failed, e.g. `account_closed`.
    #[serde(default)]
    pub failure_code: Option<String>,
    /// Unix seconds (expected arrival).
    pub arrival_date: i64,
}

fn secret_string<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    Ok(SecretString::from(String::deserialize(d)?))
}

/// Stripe sends `null` for some lists (`future_requirements.errors`…).
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pairs(form: &Form) -> Vec<(&str, &str)> {
        form.pairs()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn express_account_form() {
        let params = CreateExpressAccount {
            email: Some("c@example.com".into()),
            country: "US".into(),
            metadata: BTreeMap::from([("creator_id".to_owned(), "c-1".to_owned())]),
        };
        assert_eq!(
            pairs(&params.form()),
            [
                ("type", "express"),
                ("country", "US"),
                ("email", "c@example.com"),
                ("capabilities[transfers][requested]", "true"),
                ("settings[payouts][schedule][interval]", "daily"),
                ("settings[payouts][schedule][delay_days]", "minimum"),
                ("metadata[creator_id]", "c-1"),
            ]
        );
        let without_email = CreateExpressAccount {
            email: None,
            ..params
        };
        assert!(
            !without_email
                .form()
                .pairs()
                .iter()
                .any(|(k, _)| k == "email")
        );
    }

    #[test]
    fn account_link_form() {
        let params = CreateAccountLink {
            account: "acct_1".into(),
            refresh_url: "https://stagepass.test/refresh".into(),
            return_url: "https://stagepass.test/return".into(),
        };
        assert_eq!(
            pairs(&params.form()),
            [
                ("account", "acct_1"),
                ("refresh_url", "https://stagepass.test/refresh"),
                ("return_url", "https://stagepass.test/return"),
                ("type", "account_onboarding"),
            ]
        );
    }

    #[test]
    fn transfer_form() {
        let mut params = CreateTransfer {
            amount_cents: 1234,
            currency: "usd".into(),
            destination: "acct_1".into(),
            transfer_group: "payout:p-1".into(),
            metadata: BTreeMap::from([
                ("payout_id".to_owned(), "p-1".to_owned()),
                ("creator_id".to_owned(), "c-1".to_owned()),
            ]),
            description: None,
        };
        assert_eq!(
            pairs(&params.form()),
            [
                ("amount", "1234"),
                ("currency", "usd"),
                ("destination", "acct_1"),
                ("transfer_group", "payout:p-1"),
                ("metadata[creator_id]", "c-1"),
                ("metadata[payout_id]", "p-1"),
            ]
        );
        params.description = Some("November".into());
        assert_eq!(
            params
                .form()
                .pairs()
                .last()
                .map(|(k, v)| (k.as_str(), v.as_str())),
            Some(("description", "November"))
        );
    }

    #[test]
    fn account_decodes_and_ignores_unknown_fields() {
        let account: Account = serde_json::from_value(json!({
            "id": "acct_1", "object": "account", "type": "express",
            "details_submitted": false, "payouts_enabled": false,
            "capabilities": {"transfers": "inactive", "card_payments": "active"},
            "requirements": {"currently_due": ["external_account"], "past_due": [],
                "eventually_due": ["external_account"], "current_deadline": null,
                "disabled_reason": "requirements.past_due", "errors": []},
            "future_requirements": {"currently_due": [], "past_due": [],
                "eventually_due": [], "errors": null, "alternatives": null}
        }))
        .unwrap();
        assert_eq!(
            account.capabilities.transfers,
            Some(CapabilityStatus::Inactive)
        );
        assert!(!account.can_receive_transfers());
        let req = account.requirements.unwrap();
        assert_eq!(req.currently_due, ["external_account"]);
        assert_eq!(
            req.disabled_reason.as_deref(),
            Some("requirements.past_due")
        );
        assert_eq!(
            account.future_requirements.unwrap(),
            Requirements::default()
        );

        let bare: Account = serde_json::from_value(json!({"id": "acct_2"})).unwrap();
        assert_eq!(bare.capabilities.transfers, None);
        assert_eq!(bare.requirements, None);
    }

    #[test]
    fn unknown_capability_status_is_unknown() {
        let c: Capability = serde_json::from_value(json!({
            "id": "transfers", "object": "capability", "account": {"id": "acct_1"},
            "status": "unrequested", "requested": false
        }))
        .unwrap();
        assert_eq!(c.status, CapabilityStatus::Unknown);
        assert_eq!(c.account, "acct_1");
    }

    #[test]
    fn account_link_debug_hides_the_url() {
        let link: AccountLink = serde_json::from_value(json!({
            "object": "account_link", "url": "https://connect.stripe.com/setup/e/acct_1/SeCrEt",
            "created": 1, "expires_at": 301
        }))
        .unwrap();
        assert_eq!(
            link.url(),
            "https://connect.stripe.com/setup/e/acct_1/SeCrEt"
        );
        let printed = format!("{link:?}");
        assert!(!printed.contains("SeCrEt"), "{printed}");
        assert!(printed.contains("[REDACTED]"));
    }

    #[test]
    fn transfer_accepts_an_expanded_destination() {
        let t: Transfer = serde_json::from_value(json!({
            "id": "tr_1", "object": "transfer", "amount": 500, "currency": "usd",
            "destination": {"id": "acct_1", "object": "account"},
            "transfer_group": null, "amount_reversed": 0, "reversed": false, "created": 5
        }))
        .unwrap();
        assert_eq!(t.destination, "acct_1");
        assert_eq!(t.transfer_group, None);
        assert!(t.metadata.is_empty());
    }

    #[test]
    fn balance_sums_one_currency() {
        let b: Balance = serde_json::from_value(json!({
            "object": "balance",
            "available": [{"amount": 700, "currency": "usd", "source_types": {"card": 700}},
                          {"amount": 5, "currency": "eur"},
                          {"amount": 300, "currency": "usd"}],
            "pending": [{"amount": 1, "currency": "usd"}]
        }))
        .unwrap();
        assert_eq!(b.available_in("usd"), 1000);
        assert_eq!(b.available_in("gbp"), 0);
        assert_eq!(b.pending.len(), 1);
    }
}
