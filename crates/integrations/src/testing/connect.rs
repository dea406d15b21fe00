//! A fake of Stripe's Connect endpoints, owned by this project: localstripe
//! has no Connect support and tests cannot reach Stripe.
//!
//! An axum server on `127.0.0.1:0` that the production [`StripeClient`]
//! talks to unchanged (only the base URL differs). Its request and response
//! shapes are checked against Stripe's published OpenAPI spec by
//! `tests/connect_fake.rs`; its behaviour follows Stripe's documentation:
//!
//! - endpoints: `POST /v1/accounts`, `GET /v1/accounts/{id}`,
//!   `POST /v1/account_links`, `POST|GET /v1/transfers`,
//!   `GET /v1/transfers/{id}`, `POST /v1/transfers/{id}/reversals`,
//!   `GET /v1/balance`, `GET /v1/events`, `GET /v1/events/{id}`;
//! - authentication: any `Bearer sk_…` key, otherwise 401;
//! - idempotency (POSTs with `Idempotency-Key`): the first executed answer
//!   is saved, errors included; the same key with the same parameters gets
//!   it again (same status and body, `Idempotent-Replayed: true`); with other
//!   parameters (or another endpoint) a 400 `idempotency_error`. Answers
//!   that never executed (429 from the rate limiter, [`ConnectFake::fail_next`])
//!   are not saved, as on Stripe. [`ConnectFake::forget_idempotency_keys`]
//!   is Stripe pruning keys after 24 h;
//! - rate limit ([`FakeOptions::rate_limit_per_second`]): per endpoint
//!   (method and path template), a sliding one-second window of the
//!   requests it let through; beyond it 429 with code `rate_limit`;
//! - money: transfers need an account whose `transfers` capability is
//!   `active` and a platform balance that covers them; they take from the
//!   balance and reversals give back.
//!
//! Events (`account.updated`, `capability.updated`, `payout.*`,
//! `transfer.created`, `transfer.reversed`) are recorded as plain JSON in
//! Stripe's event shape and listed by `GET /v1/events`; nothing is
//! delivered: tests sign them with [`crate::stripe::webhook::sign`] and
//! post them to the route under test.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;
use serde_json::{Value, json};
use url::Url;

use crate::stripe::{STRIPE_API_VERSION, StripeClient};

/// The key [`ConnectFake::client`] uses; the fake accepts any `sk_…` key.
pub const SECRET_KEY: &str = "sk_test_connect_fake";
/// The platform's available USD balance at start unless set otherwise.
pub const DEFAULT_PLATFORM_AVAILABLE_CENTS: i64 = 1_000_000_000;
/// What a new Express account must provide before it can receive transfers.
pub const ONBOARDING_DUE: [&str; 3] = [
    "external_account",
    "individual.dob.day",
    "tos_acceptance.date",
];
/// What [`ConnectFake::restrict_account`] asks for again.
pub const RESTRICTION_DUE: [&str; 1] = ["individual.verification.document"];
/// Account links expire this long after they are made (Stripe: minutes).
pub const ACCOUNT_LINK_TTL_SECONDS: i64 = 300;
/// `settings.payouts.schedule.delay_days` for `minimum` (US accounts).
const MINIMUM_DELAY_DAYS: i64 = 2;
const MAX_BODY_BYTES: usize = 1 << 20;
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// How a [`ConnectFake`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeOptions {
    /// Requests let through per endpoint (method + path template) in any
    /// one-second window; `None`: no limit.
    pub rate_limit_per_second: Option<u32>,
    /// The platform's available USD balance at start.
    pub platform_available_cents: i64,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            rate_limit_per_second: None,
            platform_available_cents: DEFAULT_PLATFORM_AVAILABLE_CENTS,
        }
    }
}

/// One request the fake answered, as it saw it.
#[derive(Debug, Clone)]
pub struct StripeCall {
    /// `GET`, `POST`.
    pub method: String,
    /// e.g. `/v1/transfers/tr_…/reversals`.
    pub path: String,
    /// Decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    /// Decoded form pairs, in order (`metadata[k]`, `capabilities[transfers][requested]`).
    pub form: Vec<(String, String)>,
    /// The `Idempotency-Key` header, if sent.
    pub idempotency_key: Option<String>,
    /// The status answered.
    pub status: u16,
    /// The body answered (`Null` when the answer had none).
    pub response: Value,
    /// Answered from a saved idempotent response.
    pub replayed: bool,
    /// When the fake answered it.
    pub at: Instant,
}

/// A running fake; the server stops on drop.
pub struct ConnectFake {
    base_url: Url,
    state: Arc<Mutex<FakeState>>,
    server: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

impl ConnectFake {
    /// Starts a fake with [`FakeOptions::default`].
    ///
    /// # Panics
    /// When no local port can be bound (a test helper's way of failing).
    pub async fn start() -> ConnectFake {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts a fake with `options`.
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start_with(options: FakeOptions) -> ConnectFake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the Connect fake");
        let address = listener.local_addr().expect("the fake's local address");
        let base_url =
            Url::parse(&format!("http://{address}/")).expect("a base URL from a socket address");
        let state = Arc::new(Mutex::new(FakeState::new(options)));
        let shared = state.clone();
        let handle = move |request: axum::extract::Request| {
            let state = shared.clone();
            async move { serve(&state, request).await }
        };
        let app = axum::Router::new().fallback(handle);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("an HTTP client");
        ConnectFake {
            base_url,
            state,
            server,
            http,
        }
    }

    /// `http://127.0.0.1:<port>/`: use as `STRIPE_API_BASE`.
    pub fn base_url(&self) -> Url {
        self.base_url.clone()
    }

    /// The production client, pointed at this fake (key [`SECRET_KEY`]).
    pub fn client(&self) -> StripeClient {
        StripeClient::new(
            self.base_url.clone(),
            SecretString::from(SECRET_KEY),
            self.http.clone(),
        )
    }

    /// Answers the next `n` requests whose path starts with `path_prefix`
    /// with `status` and a Stripe error body (`api_error` for 5xx), without
    /// executing or saving them (Stripe never ran them).
    pub fn fail_next(&self, path_prefix: &str, status: u16, n: usize) {
        self.lock().fail_before.push(FailRule {
            prefix: path_prefix.to_owned(),
            status,
            remaining: n,
        });
    }

    /// The next `n` matching requests are executed (and their answer saved
    /// under their idempotency key), then answered with a 500 whose body is
    /// empty: "Stripe did it, but we never saw the answer". The client's
    /// retry with the same key then gets the saved answer, replayed.
    pub fn fail_after_execute_next(&self, path_prefix: &str, n: usize) {
        self.lock().fail_after.push(FailRule {
            prefix: path_prefix.to_owned(),
            status: 500,
            remaining: n,
        });
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<StripeCall> {
        self.lock().calls.clone()
    }

    /// Requests with `method` whose path starts with `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method.eq_ignore_ascii_case(method) && c.path.starts_with(path_prefix))
            .count()
    }

    /// Requests answered 429 by the rate limiter.
    pub fn beyond_limit_count(&self) -> usize {
        self.lock().beyond_limit
    }

    /// Forgets every saved idempotent response, as Stripe does after 24 h.
    pub fn forget_idempotency_keys(&self) {
        self.lock().saved.clear();
    }

    /// The platform's available USD balance becomes `cents`.
    pub fn set_available(&self, cents: i64) {
        self.lock().available = cents;
    }

    /// Every transfer, oldest first, as `GET /v1/transfers/{id}` answers it.
    pub fn transfers(&self) -> Vec<Value> {
        self.lock().transfers.clone()
    }

    /// Every event recorded, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// Seeds `n` onboarded Express accounts (transfers active) directly,
    /// without requests (no rate-limit slot, nothing recorded): a benchmark's
    /// setup. Returns their ids.
    ///
    /// # Panics
    /// When the seeded account cannot be created (a bug of the fake).
    pub fn seed_active_accounts(&self, n: usize) -> Vec<String> {
        let mut state = self.lock();
        let form = [
            ("type".to_owned(), "express".to_owned()),
            ("country".to_owned(), "US".to_owned()),
            (
                "capabilities[transfers][requested]".to_owned(),
                "true".to_owned(),
            ),
        ];
        (0..n)
            .map(|_| {
                let account = state.create_account(&form).expect("seed an account");
                let id = account["id"].as_str().unwrap_or_default().to_owned();
                let a = state.account_mut(&id);
                a["details_submitted"] = json!(true);
                a["payouts_enabled"] = json!(true);
                a["capabilities"]["transfers"] = json!("active");
                a["requirements"] = requirements(&[], &[], None, None);
                id
            })
            .collect()
    }

    /// The creator finished onboarding: details submitted, payouts enabled,
    /// `transfers` active, nothing due. Returns the `account.updated` and
    /// `capability.updated` events it recorded.
    ///
    /// # Panics
    /// When the account does not exist.
    pub fn complete_onboarding(&self, account_id: &str) -> Vec<Value> {
        let mut state = self.lock();
        let account = state.account_mut(account_id);
        let previous = json!({
            "details_submitted": account["details_submitted"].clone(),
            "payouts_enabled": account["payouts_enabled"].clone(),
            "capabilities": account["capabilities"].clone(),
            "requirements": account["requirements"].clone(),
        });
        let previous_status = account["capabilities"]["transfers"].clone();
        account["details_submitted"] = json!(true);
        account["payouts_enabled"] = json!(true);
        account["capabilities"]["transfers"] = json!("active");
        account["requirements"] = requirements(&[], &[], None, None);
        account["tos_acceptance"]["date"] = json!(now_unix());
        let snapshot = account.clone();
        let capability = capability(&snapshot, "active", requirements(&[], &[], None, None));
        vec![
            state.record_event(
                "account.updated",
                Some(account_id),
                snapshot,
                Some(previous),
                None,
            ),
            state.record_event(
                "capability.updated",
                Some(account_id),
                capability,
                Some(json!({"status": previous_status})),
                None,
            ),
        ]
    }

    /// Stripe needs a document now ([`RESTRICTION_DUE`], past due):
    /// `transfers` inactive, payouts disabled. Returns the `account.updated`
    /// and `capability.updated` events it recorded.
    ///
    /// # Panics
    /// When the account does not exist.
    pub fn restrict_account(&self, account_id: &str) -> Vec<Value> {
        let mut state = self.lock();
        let now = now_unix();
        let due = requirements(
            &RESTRICTION_DUE,
            &RESTRICTION_DUE,
            Some(now),
            Some("requirements.past_due"),
        );
        let account = state.account_mut(account_id);
        let previous = json!({
            "payouts_enabled": account["payouts_enabled"].clone(),
            "capabilities": account["capabilities"].clone(),
            "requirements": account["requirements"].clone(),
        });
        let previous_status = account["capabilities"]["transfers"].clone();
        account["payouts_enabled"] = json!(false);
        account["capabilities"]["transfers"] = json!("inactive");
        account["requirements"] = due.clone();
        let snapshot = account.clone();
        let capability = capability(&snapshot, "inactive", due);
        vec![
            state.record_event(
                "account.updated",
                Some(account_id),
                snapshot,
                Some(previous),
                None,
            ),
            state.record_event(
                "capability.updated",
                Some(account_id),
                capability,
                Some(json!({"status": previous_status})),
                None,
            ),
        ]
    }

    /// A `payout.paid`, `payout.failed` or `payout.canceled` event for a bank
    /// payout of `amount` cents from the account's balance (recorded, and
    /// returned).
    ///
    /// # Panics
    /// When the account does not exist or `status` is not one of the three.
    pub fn bank_payout_event(&self, account_id: &str, status: &str, amount: i64) -> Value {
        assert!(
            matches!(status, "paid" | "failed" | "canceled"),
            "ConnectFake: payout status {status:?} is not paid, failed or canceled"
        );
        let mut state = self.lock();
        state.account_mut(account_id);
        let now = now_unix();
        let failed = status != "paid";
        let payout = json!({
            "id": random_id("po"),
            "object": "payout",
            "amount": amount,
            "arrival_date": now + 86_400,
            "automatic": true,
            "balance_transaction": random_id("txn"),
            "created": now,
            "currency": "usd",
            "description": "STRIPE PAYOUT",
            "destination": random_id("ba"),
            "failure_balance_transaction": if failed { json!(random_id("txn")) } else { Value::Null },
            "failure_code": if status == "failed" { json!("account_closed") } else { Value::Null },
            "failure_message": if status == "failed" {
                json!("The bank account has been closed.")
            } else {
                Value::Null
            },
            "livemode": false,
            "metadata": {},
            "method": "standard",
            "original_payout": null,
            "reconciliation_status": if failed { "not_applicable" } else { "completed" },
            "reversed_by": null,
            "source_type": "card",
            "statement_descriptor": null,
            "status": status,
            "type": "bank_account",
        });
        state.record_event(
            &format!("payout.{status}"),
            Some(account_id),
            payout,
            None,
            None,
        )
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }
}

impl Drop for ConnectFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(state: &Mutex<FakeState>) -> MutexGuard<'_, FakeState> {
    // A panicking test thread must not hide the state from the others.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct FailRule {
    prefix: String,
    status: u16,
    remaining: usize,
}

/// A saved idempotent answer.
struct Saved {
    fingerprint: String,
    status: u16,
    body: Value,
}

struct FakeState {
    options: FakeOptions,
    available: i64,
    accounts: BTreeMap<String, Value>,
    transfers: Vec<Value>,
    events: Vec<Value>,
    saved: HashMap<String, Saved>,
    windows: HashMap<String, VecDeque<Instant>>,
    fail_before: Vec<FailRule>,
    fail_after: Vec<FailRule>,
    calls: Vec<StripeCall>,
    beyond_limit: usize,
}

/// A request as the handler decoded it.
struct Incoming {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    form: Vec<(String, String)>,
    idempotency_key: Option<String>,
    authorized: bool,
    request_id: String,
}

/// What to answer: `body: None` is an answer without a body.
struct Outcome {
    status: u16,
    body: Option<Value>,
    replayed: bool,
}

impl Outcome {
    fn of(status: u16, body: Value) -> Outcome {
        Outcome {
            status,
            body: Some(body),
            replayed: false,
        }
    }
}

/// A Stripe error answer: status and `{"error": {…}}`.
type Failure = (u16, Value);

fn stripe_error(
    status: u16,
    type_: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> Failure {
    let mut error = json!({"type": type_, "message": message});
    if let Some(code) = code {
        error["code"] = json!(code);
    }
    if let Some(param) = param {
        error["param"] = json!(param);
    }
    (status, json!({ "error": error }))
}

fn invalid(code: Option<&str>, param: &str, message: &str) -> Failure {
    stripe_error(400, "invalid_request_error", code, Some(param), message)
}

fn missing(param: &str) -> Failure {
    invalid(
        Some("parameter_missing"),
        param,
        &format!("Missing required param: {param}."),
    )
}

fn no_such(kind: &str, id: &str, param: &str) -> Failure {
    let (status, param) = if param.is_empty() {
        (404, None)
    } else {
        (400, Some(param))
    };
    stripe_error(
        status,
        "invalid_request_error",
        Some("resource_missing"),
        param,
        &format!("No such {kind}: '{id}'"),
    )
}

/// The endpoints, with their path templates (the rate limiter's key).
enum Route {
    CreateAccount,
    GetAccount(String),
    CreateAccountLink,
    CreateTransfer,
    ListTransfers,
    GetTransfer(String),
    CreateReversal(String),
    GetBalance,
    ListEvents,
    GetEvent(String),
}

impl Route {
    fn parse(method: &Method, path: &str) -> Option<(Route, &'static str)> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let id = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let route = match (method.as_str(), segments.as_slice()) {
            ("POST", ["v1", "accounts"]) => (Route::CreateAccount, "POST /v1/accounts"),
            ("GET", ["v1", "accounts", a]) => {
                (Route::GetAccount(id(a)?), "GET /v1/accounts/{account}")
            }
            ("POST", ["v1", "account_links"]) => {
                (Route::CreateAccountLink, "POST /v1/account_links")
            }
            ("POST", ["v1", "transfers"]) => (Route::CreateTransfer, "POST /v1/transfers"),
            ("GET", ["v1", "transfers"]) => (Route::ListTransfers, "GET /v1/transfers"),
            ("GET", ["v1", "transfers", t]) => {
                (Route::GetTransfer(id(t)?), "GET /v1/transfers/{transfer}")
            }
            ("POST", ["v1", "transfers", t, "reversals"]) => (
                Route::CreateReversal(id(t)?),
                "POST /v1/transfers/{id}/reversals",
            ),
            ("GET", ["v1", "balance"]) => (Route::GetBalance, "GET /v1/balance"),
            ("GET", ["v1", "events"]) => (Route::ListEvents, "GET /v1/events"),
            ("GET", ["v1", "events", e]) => (Route::GetEvent(id(e)?), "GET /v1/events/{id}"),
            _ => return None,
        };
        Some(route)
    }
}

async fn serve(state: &Mutex<FakeState>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorized = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        .is_some_and(|key| key.starts_with("sk_"));
    let incoming = Incoming {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: decode_pairs(parts.uri.query().unwrap_or_default().as_bytes()),
        form: decode_pairs(&body),
        idempotency_key: header("idempotency-key"),
        authorized,
        request_id: random_id("req"),
    };
    let outcome = {
        let mut state = lock(state);
        let outcome = state.answer(&incoming);
        state.calls.push(StripeCall {
            method: incoming.method.to_string(),
            path: incoming.path.clone(),
            query: incoming.query.clone(),
            form: incoming.form.clone(),
            idempotency_key: incoming.idempotency_key.clone(),
            status: outcome.status,
            response: outcome.body.clone().unwrap_or(Value::Null),
            replayed: outcome.replayed,
            at: Instant::now(),
        });
        outcome
    };
    respond(outcome, &incoming.request_id)
}

fn respond(outcome: Outcome, request_id: &str) -> Response {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match outcome.body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    };
    let headers: &mut HeaderMap = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert("request-id", value);
    }
    if outcome.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn decode_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(bytes).into_owned().collect()
}

impl FakeState {
    fn new(options: FakeOptions) -> FakeState {
        FakeState {
            available: options.platform_available_cents,
            options,
            accounts: BTreeMap::new(),
            transfers: Vec::new(),
            events: Vec::new(),
            saved: HashMap::new(),
            windows: HashMap::new(),
            fail_before: Vec::new(),
            fail_after: Vec::new(),
            calls: Vec::new(),
            beyond_limit: 0,
        }
    }

    fn answer(&mut self, request: &Incoming) -> Outcome {
        if !request.authorized {
            let (status, body) = stripe_error(
                401,
                "invalid_request_error",
                None,
                None,
                "Invalid API Key provided.",
            );
            return Outcome::of(status, body);
        }
        let Some((route, template)) = Route::parse(&request.method, &request.path) else {
            let message = format!(
                "Unrecognized request URL ({}: {}).",
                request.method, request.path
            );
            let (status, body) = stripe_error(404, "invalid_request_error", None, None, &message);
            return Outcome::of(status, body);
        };
        if self.beyond_rate_limit(template) {
            self.beyond_limit += 1;
            let (status, body) = stripe_error(
                429,
                "invalid_request_error",
                Some("rate_limit"),
                None,
                "Request rate limit exceeded. Learn more about rate limits here \
                 https://stripe.com/docs/rate-limits.",
            );
            return Outcome::of(status, body);
        }
        if let Some(status) = take_rule(&mut self.fail_before, &request.path) {
            let type_ = if status >= 500 {
                "api_error"
            } else {
                "invalid_request_error"
            };
            let (status, body) = stripe_error(
                status,
                type_,
                None,
                None,
                "An injected failure (ConnectFake::fail_next).",
            );
            return Outcome::of(status, body);
        }
        let key = match request.method {
            Method::POST => request.idempotency_key.clone(),
            _ => None,
        };
        let fingerprint = fingerprint(request);
        if let Some(saved) = key.as_ref().and_then(|k| self.saved.get(k)) {
            if saved.fingerprint == fingerprint {
                return Outcome {
                    status: saved.status,
                    body: Some(saved.body.clone()),
                    replayed: true,
                };
            }
            let message = format!(
                "Keys for idempotent requests can only be used with the same parameters they \
                 were first used with. Try using a key other than '{}' if you meant to execute \
                 a different request.",
                key.as_deref().unwrap_or_default()
            );
            let (status, body) = stripe_error(400, "idempotency_error", None, None, &message);
            return Outcome::of(status, body);
        }
        let (status, body) = match self.execute(route, request) {
            Ok(body) => (200, body),
            Err(failure) => failure,
        };
        if let Some(key) = key {
            self.saved.insert(
                key,
                Saved {
                    fingerprint,
                    status,
                    body: body.clone(),
                },
            );
        }
        if take_rule(&mut self.fail_after, &request.path).is_some() {
            return Outcome {
                status: 500,
                body: None,
                replayed: false,
            };
        }
        Outcome::of(status, body)
    }

    /// Whether `template` already let its limit through in the last second;
    /// if not, counts this request.
    fn beyond_rate_limit(&mut self, template: &str) -> bool {
        let Some(limit) = self.options.rate_limit_per_second else {
            return false;
        };
        let now = Instant::now();
        let window = self.windows.entry(template.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW)
        {
            window.pop_front();
        }
        if window.len() >= usize::try_from(limit).unwrap_or(usize::MAX) {
            return true;
        }
        window.push_back(now);
        false
    }

    fn execute(&mut self, route: Route, request: &Incoming) -> Result<Value, Failure> {
        match route {
            Route::CreateAccount => self.create_account(&request.form),
            Route::GetAccount(id) => self
                .accounts
                .get(&id)
                .cloned()
                .ok_or_else(|| no_such("account", &id, "")),
            Route::CreateAccountLink => self.create_account_link(&request.form),
            Route::CreateTransfer => self.create_transfer(request),
            Route::ListTransfers => self.list_transfers(&request.query),
            Route::GetTransfer(id) => self
                .transfers
                .iter()
                .find(|t| t["id"] == id.as_str())
                .cloned()
                .ok_or_else(|| no_such("transfer", &id, "")),
            Route::CreateReversal(id) => self.create_reversal(&id, request),
            Route::GetBalance => Ok(self.balance()),
            Route::ListEvents => self.list_events(&request.query),
            Route::GetEvent(id) => self
                .events
                .iter()
                .find(|e| e["id"] == id.as_str())
                .cloned()
                .ok_or_else(|| no_such("event", &id, "")),
        }
    }

    fn create_account(&mut self, form: &[(String, String)]) -> Result<Value, Failure> {
        let type_ = field(form, "type").ok_or_else(|| missing("type"))?;
        if !matches!(type_, "express" | "custom" | "standard") {
            return Err(invalid(
                None,
                "type",
                "Invalid type: must be one of custom, express, or standard",
            ));
        }
        let delay_days = match field(form, "settings[payouts][schedule][delay_days]") {
            None | Some("minimum") => MINIMUM_DELAY_DAYS,
            Some(days) => days.parse::<i64>().map_err(|_| {
                invalid(
                    Some("parameter_invalid_integer"),
                    "settings[payouts][schedule][delay_days]",
                    "Invalid integer",
                )
            })?,
        };
        let interval = field(form, "settings[payouts][schedule][interval]").unwrap_or("daily");
        let id = random_id("acct");
        let mut capabilities = json!({});
        if field(form, "capabilities[transfers][requested]") == Some("true") {
            capabilities["transfers"] = json!("inactive");
        }
        let account = json!({
            "id": id,
            "object": "account",
            "business_profile": null,
            "business_type": null,
            "capabilities": capabilities,
            "charges_enabled": false,
            "country": field(form, "country").unwrap_or("US"),
            "created": now_unix(),
            "default_currency": "usd",
            "details_submitted": false,
            "email": field(form, "email"),
            "external_accounts": {
                "object": "list",
                "data": [],
                "has_more": false,
                "url": format!("/v1/accounts/{id}/external_accounts"),
            },
            "future_requirements": requirements(&[], &[], None, None),
            "metadata": metadata(form),
            "payouts_enabled": false,
            "requirements": requirements(&ONBOARDING_DUE, &[], None, Some("requirements.past_due")),
            "settings": {
                "branding": {"icon": null, "logo": null, "primary_color": null, "secondary_color": null},
                "card_payments": {
                    "decline_on": {"avs_failure": false, "cvc_failure": false},
                    "statement_descriptor_prefix": null,
                    "statement_descriptor_prefix_kana": null,
                    "statement_descriptor_prefix_kanji": null,
                },
                "dashboard": {"display_name": null, "timezone": "Etc/UTC"},
                "payments": {
                    "statement_descriptor": null,
                    "statement_descriptor_kana": null,
                    "statement_descriptor_kanji": null,
                    "statement_descriptor_prefix_kana": null,
                    "statement_descriptor_prefix_kanji": null,
                },
                "payouts": {
                    "debit_negative_balances": true,
                    "schedule": {"delay_days": delay_days, "interval": interval},
                    "statement_descriptor": null,
                },
            },
            "tos_acceptance": {"date": null},
            "type": type_,
        });
        self.accounts.insert(id, account.clone());
        Ok(account)
    }

    fn create_account_link(&mut self, form: &[(String, String)]) -> Result<Value, Failure> {
        let account = field(form, "account").ok_or_else(|| missing("account"))?;
        let type_ = field(form, "type").ok_or_else(|| missing("type"))?;
        if type_ != "account_onboarding" && type_ != "account_update" {
            return Err(invalid(
                None,
                "type",
                "Invalid type: must be one of account_onboarding or account_update",
            ));
        }
        if type_ != "account_onboarding" {
            return Err(invalid(
                None,
                "type",
                "The fake only makes account_onboarding links.",
            ));
        }
        field(form, "refresh_url").ok_or_else(|| missing("refresh_url"))?;
        field(form, "return_url").ok_or_else(|| missing("return_url"))?;
        if !self.accounts.contains_key(account) {
            return Err(no_such("account", account, "account"));
        }
        let created = now_unix();
        Ok(json!({
            "object": "account_link",
            "created": created,
            "expires_at": created + ACCOUNT_LINK_TTL_SECONDS,
            "url": format!("https://connect.stripe.test/setup/e/{account}/{}", random_token(24)),
        }))
    }

    fn create_transfer(&mut self, request: &Incoming) -> Result<Value, Failure> {
        let form = &request.form;
        let amount = positive_amount(form, "amount")?.ok_or_else(|| missing("amount"))?;
        let currency = field(form, "currency").ok_or_else(|| missing("currency"))?;
        if currency != "usd" {
            return Err(invalid(
                None,
                "currency",
                "The fake's platform only holds usd.",
            ));
        }
        let destination = field(form, "destination").ok_or_else(|| missing("destination"))?;
        let account = self
            .accounts
            .get(destination)
            .ok_or_else(|| no_such("destination", destination, "destination"))?;
        if account["capabilities"]["transfers"] != "active" {
            return Err(invalid(
                Some("insufficient_capabilities_for_transfer"),
                "destination",
                "Your destination account needs to have at least one of the following \
                 capabilities enabled: transfers, crypto_transfers, legacy_payments",
            ));
        }
        if amount > self.available {
            return Err(stripe_error(
                400,
                "invalid_request_error",
                Some("balance_insufficient"),
                None,
                "You have insufficient available funds in your Stripe account.",
            ));
        }
        self.available -= amount;
        let id = random_id("tr");
        let transfer = json!({
            "id": id,
            "object": "transfer",
            "amount": amount,
            "amount_reversed": 0,
            "balance_transaction": random_id("txn"),
            "created": now_unix(),
            "currency": currency,
            "description": field(form, "description"),
            "destination": destination,
            "destination_payment": random_id("py"),
            "livemode": false,
            "metadata": metadata(form),
            "reversals": {
                "object": "list",
                "data": [],
                "has_more": false,
                "url": format!("/v1/transfers/{id}/reversals"),
            },
            "reversed": false,
            "source_transaction": null,
            "source_type": "card",
            "transfer_group": field(form, "transfer_group"),
        });
        self.transfers.push(transfer.clone());
        self.record_event(
            "transfer.created",
            None,
            transfer.clone(),
            None,
            Some(request),
        );
        Ok(transfer)
    }

    fn list_transfers(&self, query: &[(String, String)]) -> Result<Value, Failure> {
        let limit = list_limit(query)?;
        let group = field(query, "transfer_group");
        let destination = field(query, "destination");
        let matching: Vec<&Value> = self
            .transfers
            .iter()
            .rev()
            .filter(|t| group.is_none_or(|g| t["transfer_group"] == g))
            .filter(|t| destination.is_none_or(|d| t["destination"] == d))
            .collect();
        Ok(list(&matching, limit, "/v1/transfers"))
    }

    fn create_reversal(&mut self, id: &str, request: &Incoming) -> Result<Value, Failure> {
        let index = self
            .transfers
            .iter()
            .position(|t| t["id"] == id)
            .ok_or_else(|| no_such("transfer", id, ""))?;
        let amount = positive_amount(&request.form, "amount")?;
        let transfer = &self.transfers[index];
        let total = transfer["amount"].as_i64().unwrap_or_default();
        let reversed = transfer["amount_reversed"].as_i64().unwrap_or_default();
        let rest = total - reversed;
        let amount = amount.unwrap_or(rest);
        if rest == 0 || amount > rest {
            return Err(invalid(
                None,
                "amount",
                &format!(
                    "Refund amount ({amount}) is greater than unrefunded amount on transfer ({rest})."
                ),
            ));
        }
        let reversal = json!({
            "id": random_id("trr"),
            "object": "transfer_reversal",
            "amount": amount,
            "balance_transaction": random_id("txn"),
            "created": now_unix(),
            "currency": transfer["currency"].clone(),
            "destination_payment_refund": random_id("pyr"),
            "metadata": metadata(&request.form),
            "source_refund": null,
            "transfer": id,
        });
        let transfer = &mut self.transfers[index];
        let previous = json!({
            "amount_reversed": reversed,
            "reversed": false,
        });
        transfer["amount_reversed"] = json!(reversed + amount);
        transfer["reversed"] = json!(reversed + amount == total);
        if let Some(data) = transfer["reversals"]["data"].as_array_mut() {
            data.insert(0, reversal.clone());
        }
        let snapshot = transfer.clone();
        self.available += amount;
        self.record_event(
            "transfer.reversed",
            None,
            snapshot,
            Some(previous),
            Some(request),
        );
        Ok(reversal)
    }

    fn balance(&self) -> Value {
        json!({
            "object": "balance",
            "available": [{"amount": self.available, "currency": "usd",
                           "source_types": {"card": self.available}}],
            "livemode": false,
            "pending": [{"amount": 0, "currency": "usd", "source_types": {"card": 0}}],
        })
    }

    fn list_events(&self, query: &[(String, String)]) -> Result<Value, Failure> {
        let limit = list_limit(query)?;
        let type_ = field(query, "type");
        let matching: Vec<&Value> = self
            .events
            .iter()
            .rev()
            .filter(|e| type_.is_none_or(|t| e["type"] == t))
            .collect();
        Ok(list(&matching, limit, "/v1/events"))
    }

    fn account_mut(&mut self, id: &str) -> &mut Value {
        self.accounts
            .get_mut(id)
            .unwrap_or_else(|| panic!("ConnectFake: no account {id}"))
    }

    /// Records an event in Stripe's shape and returns it. `request` is the
    /// API request that caused it (`None`: Stripe's own doing).
    fn record_event(
        &mut self,
        type_: &str,
        account: Option<&str>,
        object: Value,
        previous_attributes: Option<Value>,
        request: Option<&Incoming>,
    ) -> Value {
        let mut data = json!({ "object": object });
        if let Some(previous) = previous_attributes {
            data["previous_attributes"] = previous;
        }
        let mut event = json!({
            "id": random_id("evt"),
            "object": "event",
            "api_version": STRIPE_API_VERSION,
            "created": now_unix(),
            "data": data,
            "livemode": false,
            "pending_webhooks": 1,
            "request": {
                "id": request.map(|r| r.request_id.clone()),
                "idempotency_key": request.and_then(|r| r.idempotency_key.clone()),
            },
            "type": type_,
        });
        if let Some(account) = account {
            event["account"] = json!(account);
        }
        self.events.push(event.clone());
        event
    }
}

/// Counts down the first rule matching `path`; its status if one matched.
fn take_rule(rules: &mut [FailRule], path: &str) -> Option<u16> {
    let rule = rules
        .iter_mut()
        .find(|r| r.remaining > 0 && path.starts_with(&r.prefix))?;
    rule.remaining -= 1;
    Some(rule.status)
}

/// Method, path and the parameters regardless of their order: what Stripe
/// compares when a key is reused.
fn fingerprint(request: &Incoming) -> String {
    let mut form = request.form.clone();
    form.sort();
    format!("{} {} {form:?}", request.method, request.path)
}

fn field<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `metadata[k]=v` pairs (an empty value unsets a key, as on Stripe).
fn metadata(form: &[(String, String)]) -> Value {
    let entries: serde_json::Map<String, Value> = form
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            (!v.is_empty()).then(|| (key.to_owned(), json!(v)))
        })
        .collect();
    Value::Object(entries)
}

/// An optional positive integer parameter.
fn positive_amount(form: &[(String, String)], param: &str) -> Result<Option<i64>, Failure> {
    let Some(text) = field(form, param) else {
        return Ok(None);
    };
    match text.parse::<i64>() {
        Ok(amount) if amount > 0 => Ok(Some(amount)),
        Ok(_) => Err(invalid(
            Some("parameter_invalid_integer"),
            param,
            "This value must be greater than or equal to 1.",
        )),
        Err(_) => Err(invalid(
            Some("parameter_invalid_integer"),
            param,
            "Invalid integer",
        )),
    }
}

/// `limit`: 1–100, default 10.
fn list_limit(query: &[(String, String)]) -> Result<usize, Failure> {
    match field(query, "limit") {
        None => Ok(10),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => Ok(n),
            _ => Err(invalid(
                Some("parameter_invalid_integer"),
                "limit",
                "This value must be between 1 and 100.",
            )),
        },
    }
}

fn list(items: &[&Value], limit: usize, url: &str) -> Value {
    json!({
        "object": "list",
        "data": items.iter().take(limit).collect::<Vec<_>>(),
        "has_more": items.len() > limit,
        "url": url,
    })
}

/// `requirements` of an account or capability (both shapes).
fn requirements(
    currently_due: &[&str],
    past_due: &[&str],
    current_deadline: Option<i64>,
    disabled_reason: Option<&str>,
) -> Value {
    json!({
        "alternatives": [],
        "current_deadline": current_deadline,
        "currently_due": currently_due,
        "disabled_reason": disabled_reason,
        "errors": [],
        "eventually_due": currently_due,
        "past_due": past_due,
        "pending_verification": [],
    })
}

/// The `transfers` capability of `account`.
fn capability(account: &Value, status: &str, requirements_now: Value) -> Value {
    json!({
        "id": "transfers",
        "object": "capability",
        "account": account["id"].clone(),
        "future_requirements": requirements(&[], &[], None, None),
        "requested": true,
        "requested_at": account["created"].clone(),
        "requirements": requirements_now,
        "status": status,
    })
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// `prefix_` and 16 random letters and digits, like Stripe's ids.
fn random_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_token(16))
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).expect("the OS random generator");
    bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}
