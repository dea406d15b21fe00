//! The client against a scripted local HTTP server that records what it got.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::stripe::PaymentIntentStatus;

const KEY: &str = "sk_test_do_not_print_me";

#[derive(Debug, Clone)]
struct Recorded {
    head: String,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }
}

/// Answers each connection with the next scripted `(status, body)`; `None`
/// means "never answer" (for timeouts).
struct Mock {
    base: Url,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

impl Mock {
    async fn start(script: Vec<Option<(u16, &'static str)>>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for answer in script {
                let (mut socket, _) = listener.accept().await.unwrap();
                let recorded = read_request(&mut socket).await;
                log.lock().unwrap().push(recorded);
                let Some((status, body)) = answer else {
                    // Hold the connection open without answering.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(socket);
                    });
                    continue;
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     request-id: req_test\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
            }
        });
        Mock { base, seen }
    }

    fn client(&self) -> StripeClient {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        StripeClient::new(self.base.clone(), SecretString::from(KEY), http)
            .with_retry_backoff(Duration::from_millis(1))
    }

    fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Recorded {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length || n == 0 {
                return Recorded {
                    head: head.to_owned(),
                    body: body.to_owned(),
                };
            }
        }
    }
}

const PI: &str = r#"{"id":"pi_1","object":"payment_intent","status":"requires_payment_method",
    "amount":1900,"currency":"usd","client_secret":"pi_1_secret_x","metadata":{"user_id":"u1"}}"#;
const SERVER_ERROR: &str = r#"{"error":{"type":"api_error","message":"try again"}}"#;

fn purchase() -> CreatePaymentIntent {
    let mut p = CreatePaymentIntent::card(1900, "usd");
    p.metadata.insert("user_id".into(), "u1".into());
    p
}

#[tokio::test]
async fn create_sends_a_form_with_auth_version_and_idempotency_key() {
    let mock = Mock::start(vec![Some((200, PI))]).await;
    let pi = mock
        .client()
        .create_payment_intent(&purchase(), "purchase:u1:k1")
        .await
        .unwrap();
    assert_eq!(pi.id, "pi_1");
    assert_eq!(pi.status, PaymentIntentStatus::RequiresPaymentMethod);
    assert_eq!(pi.client_secret.as_deref(), Some("pi_1_secret_x"));

    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert!(r.request_line().starts_with("POST /v1/payment_intents "));
    assert_eq!(r.header("authorization"), Some(&*format!("Bearer {KEY}")));
    assert_eq!(r.header("stripe-version"), Some(STRIPE_API_VERSION));
    assert_eq!(r.header("idempotency-key"), Some("purchase:u1:k1"));
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        r.body,
        "amount=1900&currency=usd&metadata%5Buser_id%5D=u1&payment_method_types%5B0%5D=card"
    );
}

#[tokio::test]
async fn a_post_with_an_idempotency_key_is_retried_with_the_same_key() {
    let mock = Mock::start(vec![Some((500, SERVER_ERROR)), Some((200, PI))]).await;
    let pi = mock
        .client()
        .create_payment_intent(&purchase(), "k-same")
        .await
        .unwrap();
    assert_eq!(pi.id, "pi_1");
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|r| r.header("idempotency-key") == Some("k-same"))
    );
    assert_eq!(seen[0].body, seen[1].body, "a resend must be identical");
}

#[tokio::test]
async fn a_post_without_an_idempotency_key_is_sent_once() {
    let mock = Mock::start(vec![Some((500, SERVER_ERROR)), Some((200, PI))]).await;
    let e = mock
        .client()
        .confirm_payment_intent("pi_1", None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(500));
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn confirm_with_a_payment_method_updates_first() {
    let mock = Mock::start(vec![Some((200, PI)), Some((200, PI))]).await;
    mock.client()
        .confirm_payment_intent("pi_1", Some("pm_card_visa"))
        .await
        .unwrap();
    let seen = mock.seen();
    assert!(
        seen[0]
            .request_line()
            .starts_with("POST /v1/payment_intents/pi_1 ")
    );
    assert_eq!(seen[0].body, "payment_method=pm_card_visa");
    assert!(
        seen[1]
            .request_line()
            .starts_with("POST /v1/payment_intents/pi_1/confirm ")
    );
    assert_eq!(seen[1].body, "");
}

#[tokio::test]
async fn a_get_is_retried_and_ids_cannot_leave_their_path_segment() {
    let mock = Mock::start(vec![Some((503, SERVER_ERROR)), Some((200, PI))]).await;
    mock.client()
        .retrieve_payment_intent("pi_1/../../v1/refunds?x=1")
        .await
        .unwrap();
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0]
            .request_line()
            .starts_with("GET /v1/payment_intents/pi_1%2F..%2F..%2Fv1%2Frefunds%3Fx=1 "),
        "{}",
        seen[0].request_line()
    );
    assert_eq!(seen[0].header("idempotency-key"), None);
}

#[tokio::test]
async fn api_errors_are_decoded_and_never_show_the_key() {
    let body = r#"{"error":{"type":"invalid_request_error","code":"resource_missing",
        "message":"No such payment_intent: 'pi_x'","param":"intent"}}"#;
    let mock = Mock::start(vec![Some((404, body))]).await;
    let client = mock.client();
    let e = client.retrieve_payment_intent("pi_x").await.unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(e.code(), Some("resource_missing"));
    match &e {
        StripeError::Api(api) => assert_eq!(api.request_id.as_deref(), Some("req_test")),
        other => panic!("{other:?}"),
    }
    for printed in [format!("{e}"), format!("{e:?}"), format!("{client:?}")] {
        assert!(!printed.contains(KEY), "{printed}");
    }
    assert_eq!(mock.seen().len(), 1, "a 404 is not retried");
}

#[tokio::test]
async fn a_silent_server_is_a_timeout() {
    let mock = Mock::start(vec![None]).await;
    let client = mock
        .client()
        .with_timeout(Duration::from_millis(200))
        .with_max_attempts(1);
    let e = client.retrieve_payment_intent("pi_1").await.unwrap_err();
    assert!(matches!(e, StripeError::Timeout), "{e:?}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn a_malformed_success_body_is_a_decode_error() {
    let mock = Mock::start(vec![Some((200, r#"{"id":"pi_1"}"#))]).await;
    let e = mock
        .client()
        .retrieve_payment_intent("pi_1")
        .await
        .unwrap_err();
    assert!(matches!(e, StripeError::Decode(_)), "{e:?}");
}

#[tokio::test]
async fn an_invalid_idempotency_key_is_refused_before_sending() {
    let mock = Mock::start(vec![]).await;
    let client = mock.client();
    for key in ["", "has space", &"k".repeat(256)] {
        let e = client
            .create_payment_intent(&purchase(), key)
            .await
            .unwrap_err();
        assert!(matches!(e, StripeError::InvalidRequest(_)), "{e:?}");
    }
    assert!(mock.seen().is_empty());
}

#[test]
fn refund_form() {
    let refund = CreateRefund {
        payment_intent: "pi_1".into(),
        amount_cents: Some(200),
        metadata: BTreeMap::from([("reason".into(), "class_cancelled".into())]),
    };
    assert_eq!(
        refund.form().encode(),
        "payment_intent=pi_1&amount=200&metadata%5Breason%5D=class_cancelled"
    );
}

#[tokio::test]
async fn list_transfers_sends_a_percent_encoded_query() {
    const EMPTY_LIST: &str =
        r#"{"object":"list","data":[],"has_more":false,"url":"/v1/transfers"}"#;
    let mock = Mock::start(vec![Some((200, EMPTY_LIST))]).await;
    let transfers = mock
        .client()
        .list_transfers("payout:p 1&limit=1")
        .await
        .unwrap();
    assert!(transfers.is_empty());
    let seen = mock.seen();
    assert!(
        seen[0]
            .request_line()
            .starts_with("GET /v1/transfers?transfer_group=payout%3Ap+1%26limit%3D1&limit=100 "),
        "{}",
        seen[0].request_line()
    );
    assert_eq!(seen[0].body, "");
}

#[tokio::test]
async fn connect_posts_carry_their_forms_and_keys() {
    const TRANSFER: &str = r#"{"id":"tr_1","object":"transfer","amount":700,"currency":"usd",
        "destination":"acct_1","transfer_group":"g","metadata":{},"amount_reversed":0,
        "reversed":false,"created":1}"#;
    const LINK: &str =
        r#"{"object":"account_link","url":"https://x/secret","created":1,"expires_at":301}"#;
    const REVERSAL: &str =
        r#"{"id":"trr_1","object":"transfer_reversal","amount":700,"transfer":"tr_1"}"#;
    let mock = Mock::start(vec![
        Some((200, TRANSFER)),
        Some((200, LINK)),
        Some((200, REVERSAL)),
    ])
    .await;
    let client = mock.client();
    let params = crate::stripe::CreateTransfer {
        amount_cents: 700,
        currency: "usd".into(),
        destination: "acct_1".into(),
        transfer_group: "g".into(),
        metadata: BTreeMap::new(),
        description: None,
    };
    client.create_transfer(&params, "transfer:g").await.unwrap();
    let link = crate::stripe::CreateAccountLink {
        account: "acct_1".into(),
        refresh_url: "https://s/r".into(),
        return_url: "https://s/b".into(),
    };
    client.create_account_link(&link).await.unwrap();
    let reversal = client
        .create_transfer_reversal("tr_1", None, "reverse:g")
        .await
        .unwrap();
    assert_eq!(reversal.transfer, "tr_1");

    let seen = mock.seen();
    assert!(seen[0].request_line().starts_with("POST /v1/transfers "));
    assert_eq!(seen[0].header("idempotency-key"), Some("transfer:g"));
    assert_eq!(
        seen[0].body,
        "amount=700&currency=usd&destination=acct_1&transfer_group=g"
    );
    assert!(
        seen[1]
            .request_line()
            .starts_with("POST /v1/account_links ")
    );
    assert_eq!(seen[1].header("idempotency-key"), None);
    assert!(
        seen[2]
            .request_line()
            .starts_with("POST /v1/transfers/tr_1/reversals ")
    );
    assert_eq!(seen[2].header("idempotency-key"), Some("reverse:g"));
    assert_eq!(seen[2].body, "");
}
