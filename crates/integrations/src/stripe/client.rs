//! The HTTP side: one `send` that every call goes through.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use url::Url;

use super::connect::{
    Account, AccountLink, Balance, CreateAccountLink, CreateExpressAccount, CreateTransfer,
    Transfer, TransferReversal,
};
use super::error::{ResponseMeta, StripeError};
use super::form::Form;
use super::types::{PaymentIntent, Refund};

/// The API version every request asks for. Pinned so a change on Stripe's
/// side (or in the account's default version) cannot change the shapes we
/// read; the fields we use are unchanged since `latest_charge` replaced
/// `charges` (2022-11-15). Webhook payloads follow the *endpoint's* version,
/// set when the endpoint is created: create it with this one.
/// localstripe ignores the header and answers in its own 2017 shapes.
pub const STRIPE_API_VERSION: &str = "2025-03-31.basil";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_ATTEMPTS: u32 = 2;
/// Every attempt of one call together: a stalled Stripe must leave the
/// function (Vercel `maxDuration` 15 s) time to answer 503 itself, where
/// two full attempts (2 × 10 s) would have it killed mid-request.
const DEFAULT_BUDGET: Duration = Duration::from_secs(12);
/// A retry with less of the budget left than this is not tried.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// Never wait longer than this between attempts, whatever `Retry-After` says:
/// a serverless function has a few seconds, not minutes.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);
/// Stripe's limit on `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A small typed Stripe client. Cheap to clone (the HTTP client is shared).
#[derive(Clone, Debug)]
pub struct StripeClient {
    http: reqwest::Client,
    api_base: Url,
    /// `SecretString`'s `Debug` prints `[REDACTED]`.
    secret_key: SecretString,
    timeout: Duration,
    max_attempts: u32,
    retry_backoff: Duration,
}

/// Parameters of `POST /v1/payment_intents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePaymentIntent {
    /// In the currency's smallest unit (cents for USD).
    pub amount_cents: i64,
    /// Lower-case ISO code, e.g. `usd`.
    pub currency: String,
    /// Our references (user, purchase, package). Keys must not contain `[`
    /// or `]` (Stripe's form syntax); at most 50 keys of ≤ 40 characters.
    pub metadata: BTreeMap<String, String>,
    /// Only for tests and server-side confirmation; the frontend normally
    /// attaches the card through Stripe.js.
    pub payment_method: Option<String>,
    /// `["card"]`: localstripe rejects `automatic_payment_methods`, and card
    /// (with wallets and 3-D Secure through Stripe.js) is all we sell with.
    pub payment_method_types: Vec<String>,
}

impl CreatePaymentIntent {
    /// A card payment of `amount_cents` in `currency`.
    pub fn card(amount_cents: i64, currency: &str) -> Self {
        CreatePaymentIntent {
            amount_cents,
            currency: currency.to_owned(),
            metadata: BTreeMap::new(),
            payment_method: None,
            payment_method_types: vec!["card".to_owned()],
        }
    }

    fn form(&self) -> Form {
        Form::new()
            .field("amount", self.amount_cents.to_string())
            .field("currency", self.currency.as_str())
            .map("metadata", &self.metadata)
            .optional("payment_method", self.payment_method.as_deref())
            .list("payment_method_types", &self.payment_method_types)
    }
}

/// Parameters of `POST /v1/refunds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRefund {
    pub payment_intent: String,
    /// `None` refunds what is left of the payment.
    pub amount_cents: Option<i64>,
    pub metadata: BTreeMap<String, String>,
}

impl CreateRefund {
    fn form(&self) -> Form {
        let amount = self.amount_cents.map(|a| a.to_string());
        Form::new()
            .field("payment_intent", self.payment_intent.as_str())
            .optional("amount", amount.as_deref())
            .map("metadata", &self.metadata)
    }
}

/// One request, before it is sent (possibly more than once).
struct Call<'a> {
    method: Method,
    path: &'a [&'a str],
    form: Option<Form>,
    idempotency_key: Option<&'a str>,
    /// Query parameters (`GET` lists), percent-encoded when sent.
    query: &'a [(&'a str, &'a str)],
}

impl StripeClient {
    /// `api_base` is `https://api.stripe.com` in production (`STRIPE_API_BASE`
    /// in tests). Defaults: 10 s per attempt, 2 attempts for retry-safe calls.
    pub fn new(api_base: Url, secret_key: SecretString, http: reqwest::Client) -> Self {
        StripeClient {
            http,
            api_base,
            secret_key,
            timeout: DEFAULT_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
        }
    }

    /// The bound on each attempt (connect + send + read).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Attempts for retry-safe calls (`GET`, or `POST` with an idempotency
    /// key); at least 1. Other calls are always sent once.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// The base wait between attempts, multiplied by the attempt number.
    pub fn with_retry_backoff(mut self, backoff: Duration) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// Creates a PaymentIntent. `idempotency_key` makes a resend (ours or a
    /// client's retry) return the first PaymentIntent instead of a new one;
    /// derive it from the user and their request's key. Real Stripe honours
    /// it for 24 h; localstripe ignores it.
    pub async fn create_payment_intent(
        &self,
        params: &CreatePaymentIntent,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, StripeError> {
        self.send(Call {
            method: Method::POST,
            path: &["v1", "payment_intents"],
            form: Some(params.form()),
            idempotency_key: Some(idempotency_key),
            query: &[],
        })
        .await
    }

    pub async fn retrieve_payment_intent(&self, id: &str) -> Result<PaymentIntent, StripeError> {
        self.send(Call {
            method: Method::GET,
            path: &["v1", "payment_intents", id],
            form: None,
            idempotency_key: None,
            query: &[],
        })
        .await
    }

    /// Confirms server-side (tests; the frontend confirms with Stripe.js).
    /// A `payment_method` is attached by an update first, because
    /// localstripe's confirm refuses the parameter (real Stripe takes
    /// either). A declined card is `Err` with `is_card_declined()`.
    pub async fn confirm_payment_intent(
        &self,
        id: &str,
        payment_method: Option<&str>,
    ) -> Result<PaymentIntent, StripeError> {
        if let Some(pm) = payment_method {
            self.send::<PaymentIntent>(Call {
                method: Method::POST,
                path: &["v1", "payment_intents", id],
                form: Some(Form::new().field("payment_method", pm)),
                idempotency_key: None,
                query: &[],
            })
            .await?;
        }
        self.send(Call {
            method: Method::POST,
            path: &["v1", "payment_intents", id, "confirm"],
            form: Some(Form::new()),
            idempotency_key: None,
            query: &[],
        })
        .await
    }

    /// Refunds (part of) a payment. The key makes a resend refund once.
    pub async fn create_refund(
        &self,
        params: &CreateRefund,
        idempotency_key: &str,
    ) -> Result<Refund, StripeError> {
        self.send(Call {
            method: Method::POST,
            path: &["v1", "refunds"],
            form: Some(params.form()),
            idempotency_key: Some(idempotency_key),
            query: &[],
        })
        .await
    }

    /// Creates an Express account for a creator (`POST /v1/accounts`). The
    /// key makes a resend return the first account; Stripe forgets keys
    /// after 24 h, so store the account id before anything else.
    pub async fn create_express_account(
        &self,
        params: &CreateExpressAccount,
        idempotency_key: &str,
    ) -> Result<Account, StripeError> {
        self.send(Call {
            method: Method::POST,
            path: &["v1", "accounts"],
            form: Some(params.form()),
            idempotency_key: Some(idempotency_key),
            query: &[],
        })
        .await
    }

    /// `GET /v1/accounts/{id}`.
    pub async fn retrieve_account(&self, id: &str) -> Result<Account, StripeError> {
        self.send(Call {
            method: Method::GET,
            path: &["v1", "accounts", id],
            form: None,
            idempotency_key: None,
            query: &[],
        })
        .await
    }

    /// A single-use onboarding link (`POST /v1/account_links`). Sent once,
    /// without an idempotency key: a lost answer is fixed by asking for a
    /// new link, never by replaying an old one.
    pub async fn create_account_link(
        &self,
        params: &CreateAccountLink,
    ) -> Result<AccountLink, StripeError> {
        self.send(Call {
            method: Method::POST,
            path: &["v1", "account_links"],
            form: Some(params.form()),
            idempotency_key: None,
            query: &[],
        })
        .await
    }

    /// Moves money from the platform balance to a connected account
    /// (`POST /v1/transfers`). The key makes a resend transfer once within
    /// Stripe's 24 h; after that only [`StripeClient::list_transfers`] on
    /// the transfer group tells whether it was made.
    pub async fn create_transfer(
        &self,
        params: &CreateTransfer,
        idempotency_key: &str,
    ) -> Result<Transfer, StripeError> {
        self.send(Call {
            method: Method::POST,
            path: &["v1", "transfers"],
            form: Some(params.form()),
            idempotency_key: Some(idempotency_key),
            query: &[],
        })
        .await
    }

    /// The transfers of one `transfer_group` (`GET /v1/transfers`), newest
    /// first; one page of up to 100 (a group holds one transfer).
    pub async fn list_transfers(&self, transfer_group: &str) -> Result<Vec<Transfer>, StripeError> {
        let page: List<Transfer> = self
            .send(Call {
                method: Method::GET,
                path: &["v1", "transfers"],
                form: None,
                idempotency_key: None,
                query: &[("transfer_group", transfer_group), ("limit", "100")],
            })
            .await?;
        Ok(page.data)
    }

    /// `GET /v1/transfers/{id}`.
    pub async fn retrieve_transfer(&self, id: &str) -> Result<Transfer, StripeError> {
        self.send(Call {
            method: Method::GET,
            path: &["v1", "transfers", id],
            form: None,
            idempotency_key: None,
            query: &[],
        })
        .await
    }

    /// Reverses `amount_cents` of a transfer (`None`: what is left of it)
    /// (`POST /v1/transfers/{id}/reversals`).
    pub async fn create_transfer_reversal(
        &self,
        transfer_id: &str,
        amount_cents: Option<i64>,
        idempotency_key: &str,
    ) -> Result<TransferReversal, StripeError> {
        let amount = amount_cents.map(|a| a.to_string());
        self.send(Call {
            method: Method::POST,
            path: &["v1", "transfers", transfer_id, "reversals"],
            form: Some(Form::new().optional("amount", amount.as_deref())),
            idempotency_key: Some(idempotency_key),
            query: &[],
        })
        .await
    }

    /// The platform's balance (`GET /v1/balance`).
    pub async fn retrieve_balance(&self) -> Result<Balance, StripeError> {
        self.send(Call {
            method: Method::GET,
            path: &["v1", "balance"],
            form: None,
            idempotency_key: None,
            query: &[],
        })
        .await
    }

    /// Sends `call`, retrying only what cannot take effect twice: a `GET`,
    /// or a `POST` resent with the same idempotency key (Stripe then answers
    /// with the first result).
    async fn send<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, StripeError> {
        let mut url = self.endpoint(call.path)?;
        if !call.query.is_empty() {
            url.query_pairs_mut().extend_pairs(call.query);
        }
        if let Some(key) = call.idempotency_key {
            check_idempotency_key(key)?;
        }
        let retry_safe = call.method == Method::GET || call.idempotency_key.is_some();
        let attempts = if retry_safe { self.max_attempts } else { 1 };
        let deadline = std::time::Instant::now() + DEFAULT_BUDGET.max(self.timeout);
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        let mut attempt = 1;
        loop {
            match self.send_once(&call, &url, self.timeout.min(left())).await {
                Err(e) if attempt < attempts && e.is_retryable() => {
                    let wait = self.retry_wait(&e, attempt);
                    if left() < wait + MIN_ATTEMPT {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, attempt, path = url.path(), "retrying Stripe call");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        call: &Call<'_>,
        url: &Url,
        timeout: Duration,
    ) -> Result<T, StripeError> {
        let mut request = self
            .http
            .request(call.method.clone(), url.clone())
            .bearer_auth(self.secret_key.expose_secret())
            .header("Stripe-Version", STRIPE_API_VERSION)
            .timeout(timeout);
        if let Some(key) = call.idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(form) = &call.form {
            request = request
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form.encode());
        }
        let response = request.send().await.map_err(StripeError::from_transport)?;
        let status = response.status().as_u16();
        let meta = response_meta(response.headers());
        let body = response
            .bytes()
            .await
            .map_err(StripeError::from_transport)?;
        if !(200..300).contains(&status) {
            return Err(StripeError::from_response(status, &body, meta));
        }
        serde_json::from_slice(&body).map_err(|e| StripeError::Decode(e.to_string()))
    }

    /// `api_base` + path segments, each percent-encoded: an id taken from a
    /// webhook cannot reach another path (`../`, `?`).
    fn endpoint(&self, segments: &[&str]) -> Result<Url, StripeError> {
        let mut url = self.api_base.clone();
        url.path_segments_mut()
            .map_err(|()| StripeError::InvalidRequest("STRIPE_API_BASE is not a base URL".into()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn retry_wait(&self, error: &StripeError, attempt: u32) -> Duration {
        let wait = match error {
            StripeError::RateLimited {
                retry_after_seconds: Some(s),
            } => Duration::from_secs(*s),
            _ => self.retry_backoff.saturating_mul(attempt),
        };
        wait.min(MAX_RETRY_WAIT)
    }
}

/// One page of a Stripe list (`{"object": "list", "data": […]}`).
#[derive(serde::Deserialize)]
struct List<T> {
    data: Vec<T>,
}

fn check_idempotency_key(key: &str) -> Result<(), StripeError> {
    let visible = key.bytes().all(|b| b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN || !visible {
        return Err(StripeError::InvalidRequest(
            "idempotency key must be 1–255 visible ASCII characters".into(),
        ));
    }
    Ok(())
}

fn response_meta(headers: &HeaderMap) -> ResponseMeta {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    ResponseMeta {
        request_id: text("request-id").map(str::to_owned),
        should_retry: text("stripe-should-retry").and_then(|v| v.parse().ok()),
        retry_after_seconds: text("retry-after").and_then(|v| v.parse().ok()),
    }
}

#[cfg(test)]
mod tests;
