//! Test helpers (feature `testing`): a `localstripe` process per test, a
//! webhook recorder, builders for the events localstripe never sends, and
//! [`connect`], a fake of Stripe's Connect endpoints (localstripe has none).
//!
//! localstripe 1.15.10 (PyPI) facts these helpers rely on (checked by
//! `tests/localstripe.rs`):
//! - it accepts any `sk_…` key and ignores `Idempotency-Key` and
//!   `Stripe-Version`; objects come in its own 2017 shapes;
//! - `--port N` picks the port; it writes its whole store to the fixed path
//!   `/tmp/localstripe.pickle` after every write and reloads it at start
//!   unless `--from-scratch`: we always pass `--from-scratch` (parallel
//!   instances never read each other's state) and delete the file on drop;
//! - webhooks: `POST /_config/webhooks/<id>` with `url` and `secret`; every
//!   registered endpoint of an instance gets every event, which is why each
//!   test gets its own instance. Deliveries are signed like Stripe's
//!   (`t=<event.created>,v1=…`, the whole secret as key), sent once, about
//!   one second after the event, and never retried;
//! - on confirm it emits `payment_intent.succeeded` or
//!   `payment_intent.payment_failed` only: no `charge.*` events at all (so
//!   no `charge.refunded` on refunds, and it has no disputes). Tests sign
//!   those themselves with [`events`] and [`crate::stripe::webhook::sign`].

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use url::Url;

use crate::stripe::{PaymentIntent, StripeClient};

pub mod connect;

/// localstripe accepts any key that starts with `sk_`.
pub const SECRET_KEY: &str = "sk_test_localstripe";
/// For the endpoints a browser would call (3-D Secure authentication).
pub const PUBLISHABLE_KEY: &str = "pk_test_localstripe";
/// A card that is charged successfully.
pub const CARD_SUCCEEDS: &str = "pm_card_visa";
/// A card whose charge is declined at confirmation. NOT
/// `pm_card_visa_chargeDeclined`: localstripe 1.15.10 maps that one to a
/// card it only declines when attached to a customer, so its charge succeeds.
pub const CARD_DECLINED: &str = "pm_card_chargeCustomerFail";
/// A card number that needs 3-D Secure (create it with
/// [`LocalStripe::create_card_payment_method`]).
pub const CARD_NUMBER_3DS: &str = "4000002500003155";
/// Where localstripe keeps its store; fixed in its source.
pub const PICKLE_PATH: &str = "/tmp/localstripe.pickle";

const START_ATTEMPTS: u32 = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LocalStripeError {
    #[error("localstripe is not installed at {0} (pip install localstripe==1.15.10)")]
    NotInstalled(PathBuf),
    #[error("could not start localstripe: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("localstripe did not start listening within {0:?}")]
    NotReady(Duration),
    #[error("localstripe call failed: {0}")]
    Http(String),
}

/// A running localstripe, killed (and its pickle file deleted) on drop.
pub struct LocalStripe {
    base_url: Url,
    child: Child,
    http: reqwest::Client,
}

impl LocalStripe {
    /// Starts a fresh localstripe on a free port. `None` (with a loud note)
    /// when it is not installed and `CI` is unset.
    ///
    /// # Panics
    /// When it is missing in CI, or cannot be started: a test helper's way
    /// of failing the test.
    pub async fn start() -> Option<LocalStripe> {
        match Self::try_start().await {
            Ok(started) => started,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`LocalStripe::start`] without panicking.
    pub async fn try_start() -> Result<Option<LocalStripe>, LocalStripeError> {
        let Some(bin) = Self::binary()? else {
            return Ok(None);
        };
        let mut last_error = LocalStripeError::NotReady(READY_TIMEOUT);
        // A free port can be taken between our probe and localstripe's bind;
        // then the process exits and we try another port.
        for _ in 0..START_ATTEMPTS {
            match Self::spawn_on_free_port(&bin).await {
                Ok(started) => return Ok(Some(started)),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// `$LOCALSTRIPE_BIN`, else the venv `scripts/test.sh` installs into.
    /// `Ok(None)` only when it is missing and `CI` is unset.
    fn binary() -> Result<Option<PathBuf>, LocalStripeError> {
        let path = match std::env::var_os("LOCALSTRIPE_BIN") {
            Some(explicit) => PathBuf::from(explicit),
            None => default_cache_dir().join("venv/bin/localstripe"),
        };
        if path.exists() {
            return Ok(Some(path));
        }
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            return Err(LocalStripeError::NotInstalled(path));
        }
        // Written to the real stderr, not through `eprintln!`, which the test
        // harness captures and hides for passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: localstripe not found at {} — run scripts/test.sh \
             (or pip install localstripe==1.15.10 and set LOCALSTRIPE_BIN) ***\n",
            path.display()
        );
        Ok(None)
    }

    async fn spawn_on_free_port(bin: &std::path::Path) -> Result<LocalStripe, LocalStripeError> {
        let port = free_port()?;
        let output = || {
            if std::env::var_os("LOCALSTRIPE_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            }
        };
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--from-scratch"])
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()?;
        let base_url = Url::parse(&format!("http://127.0.0.1:{port}/"))
            .map_err(|e| LocalStripeError::Http(e.to_string()))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| LocalStripeError::Http(e.to_string()))?;
        // From here on, Drop kills the process whatever happens.
        let mut started = LocalStripe {
            base_url,
            child,
            http,
        };
        started.wait_until_listening(port).await?;
        Ok(started)
    }

    async fn wait_until_listening(&mut self, port: u16) -> Result<(), LocalStripeError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if self.child.try_wait()?.is_some() || Instant::now() > deadline {
                return Err(LocalStripeError::NotReady(READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<port>/`: use as `STRIPE_API_BASE`.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// A client for this instance (with [`SECRET_KEY`]).
    pub fn client(&self) -> StripeClient {
        StripeClient::new(
            self.base_url.clone(),
            SecretString::from(SECRET_KEY),
            self.http.clone(),
        )
    }

    /// Sends every event of this instance to `url`, signed with `secret`
    /// (use a `whsec_…` string, as in production).
    pub async fn register_webhook(&self, url: &str, secret: &str) -> Result<(), LocalStripeError> {
        let form = [("url", url), ("secret", secret)];
        self.post(&["_config", "webhooks", "stagepass"], &form, false)
            .await
            .map(drop)
    }

    /// A card PaymentMethod with `number` (e.g. [`CARD_NUMBER_3DS`]); returns its id.
    pub async fn create_card_payment_method(
        &self,
        number: &str,
    ) -> Result<String, LocalStripeError> {
        let form = [
            ("type", "card"),
            ("card[number]", number),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2030"),
            ("card[cvc]", "123"),
        ];
        let created = self.post(&["v1", "payment_methods"], &form, true).await?;
        created
            .get("id")
            .and_then(|id| id.as_str())
            .map(str::to_owned)
            .ok_or_else(|| LocalStripeError::Http("payment method without id".into()))
    }

    /// Completes (or fails) the 3-D Secure step of a PaymentIntent in
    /// `requires_action`, as the customer would in Stripe.js.
    pub async fn authenticate_3ds(
        &self,
        payment_intent: &str,
        client_secret: &str,
        success: bool,
    ) -> Result<PaymentIntent, LocalStripeError> {
        let form = [
            ("key", PUBLISHABLE_KEY),
            ("client_secret", client_secret),
            ("success", if success { "true" } else { "false" }),
        ];
        let path = ["v1", "payment_intents", payment_intent, "_authenticate"];
        let answer = self.post(&path, &form, false).await?;
        serde_json::from_value(answer).map_err(|e| LocalStripeError::Http(e.to_string()))
    }

    async fn post(
        &self,
        path: &[&str],
        form: &[(&str, &str)],
        authenticated: bool,
    ) -> Result<serde_json::Value, LocalStripeError> {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .map_err(|()| LocalStripeError::Http("bad base url".into()))?
            .pop_if_empty()
            .extend(path);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if authenticated {
            request = request.bearer_auth(SECRET_KEY);
        }
        let response = request.send().await.map_err(http_error)?;
        let status = response.status();
        let text = response.text().await.map_err(http_error)?;
        if !status.is_success() {
            return Err(LocalStripeError::Http(format!("{status}: {text}")));
        }
        // `_config` answers with an empty body.
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        // Kill, then wait so the process cannot write the pickle file again
        // after we delete it. Another test's instance may still write it;
        // its own drop deletes it after that.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(PICKLE_PATH);
    }
}

fn http_error(e: reqwest::Error) -> LocalStripeError {
    LocalStripeError::Http(e.to_string())
}

/// `${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}`, as in
/// `scripts/test.sh`.
fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STAGEPASS_CACHE") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("stagepass")
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One webhook delivery as received.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    /// The `Stripe-Signature` header.
    pub signature: Option<String>,
    /// The raw body, byte for byte (what the signature covers).
    pub body: bytes::Bytes,
}

/// A webhook endpoint for localstripe: a [`Recorder`] read in order.
pub struct WebhookRecorder {
    url: String,
    inner: Recorder,
    /// Deliveries already returned by [`WebhookRecorder::next`].
    seen: usize,
}

impl WebhookRecorder {
    pub async fn start() -> std::io::Result<WebhookRecorder> {
        let inner = Recorder::start(200, serde_json::json!({})).await?;
        Ok(WebhookRecorder {
            url: format!("{}/webhooks/stripe", inner.url()),
            inner,
            seen: 0,
        })
    }

    /// Where to point a webhook.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next delivery, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<ReceivedWebhook> {
        let seen = self.seen;
        let received = self.inner.wait_for(timeout, |r| r.len() > seen).await;
        let delivery = received.get(seen)?;
        self.seen += 1;
        Some(ReceivedWebhook {
            signature: delivery.header("stripe-signature").map(str::to_owned),
            body: delivery.body.clone(),
        })
    }
}

/// Event bodies for what localstripe never sends, in the current API's
/// shapes (only the fields Stagepass reads, plus `object`).
pub mod events {
    use serde_json::{Value, json};

    /// The envelope around `object`.
    pub fn event(id: &str, type_: &str, created: i64, object: Value) -> Vec<u8> {
        let event = json!({
            "id": id,
            "object": "event",
            "type": type_,
            "created": created,
            "livemode": false,
            "api_version": crate::stripe::STRIPE_API_VERSION,
            "data": {"object": object},
        });
        event.to_string().into_bytes()
    }

    /// `charge.refunded`: `amount_refunded_cents` is the cumulative total.
    pub fn charge_refunded(
        event_id: &str,
        created: i64,
        charge_id: &str,
        payment_intent: &str,
        amount_cents: i64,
        amount_refunded_cents: i64,
    ) -> Vec<u8> {
        let charge = json!({
            "id": charge_id,
            "object": "charge",
            "amount": amount_cents,
            "amount_refunded": amount_refunded_cents,
            "currency": "usd",
            "payment_intent": payment_intent,
            "refunded": amount_refunded_cents >= amount_cents,
            "status": "succeeded",
        });
        event(
            event_id,
            crate::stripe::webhook::CHARGE_REFUNDED,
            created,
            charge,
        )
    }

    /// `charge.dispute.created` for `amount_cents` of a payment.
    pub fn charge_dispute_created(
        event_id: &str,
        created: i64,
        dispute_id: &str,
        charge_id: &str,
        payment_intent: &str,
        amount_cents: i64,
    ) -> Vec<u8> {
        let dispute = json!({
            "id": dispute_id,
            "object": "dispute",
            "amount": amount_cents,
            "currency": "usd",
            "charge": charge_id,
            "payment_intent": payment_intent,
            "reason": "fraudulent",
            "status": "needs_response",
        });
        event(
            event_id,
            crate::stripe::webhook::CHARGE_DISPUTE_CREATED,
            created,
            dispute,
        )
    }
}

/// One request as a [`Recorder`] received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as sent (percent-encoding kept).
    pub uri: String,
    pub headers: axum::http::HeaderMap,
    pub body: bytes::Bytes,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A recording fake of an HTTP API that cannot run here (Ably's REST API,
/// QStash): records every request and answers each with the status and
/// JSON body it was started with, or — while [`Recorder::fail_next`] is
/// set — with 503.
pub struct Recorder {
    url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<RecordedRequest>>>,
    failing: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub async fn start(status: u16, body: serde_json::Value) -> std::io::Result<Recorder> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log, fail) = (received.clone(), failing.clone());
        let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK);
        let record = move |request: axum::extract::Request| {
            let (log, fail, body) = (log.clone(), fail.clone(), body.clone());
            async move {
                let (parts, raw) = request.into_parts();
                let raw = axum::body::to_bytes(raw, 1 << 20).await.unwrap_or_default();
                if let Ok(mut log) = log.lock() {
                    log.push(RecordedRequest {
                        method: parts.method.to_string(),
                        uri: parts.uri.to_string(),
                        headers: parts.headers,
                        body: raw,
                    });
                }
                let failed = fail
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if failed {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(serde_json::json!({"error": "unavailable"})),
                    )
                } else {
                    (status, axum::Json(body))
                }
            }
        };
        let app = axum::Router::new().fallback(record);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Recorder {
            url,
            received,
            failing,
            server,
        })
    }

    /// The base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Answers the next `n` requests with 503.
    pub fn fail_next(&self, n: usize) {
        self.failing.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.received.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until `until` holds for the requests received (or `timeout`
    /// passes) and returns them.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        until: impl Fn(&[RecordedRequest]) -> bool,
    ) -> Vec<RecordedRequest> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.requests();
            if until(&now) || tokio::time::Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.server.abort();
    }
}
