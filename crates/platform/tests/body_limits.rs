//! Issue 14: one body limit, answered as problem+json, on every target;
//! bodies refused on routes that take none; and the local server closes a
//! connection whose request head never finishes (slowloris).
//!
//! The stack is the same on every target (`http::stack`); the in-process
//! tests drive it directly (what Lambda's adapter does), the TCP tests go
//! through `serve::serve_local`, the dev server's listener.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::middleware::from_fn;
use axum::routing::{get, post};
use http_body_util::BodyExt;
use stagepass_platform::config::{CoreConfig, Loader};
use stagepass_platform::http::{MAX_BODY_BYTES, guard, stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt as _;

/// A raw-body route (like the Stripe webhook), a GET, and a bodyless POST.
fn app() -> Router {
    let router = Router::new()
        .route(
            "/raw",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .route("/get", get(|| async { "ok" }).delete(|| async { "gone" }))
        .route(
            "/nobody",
            post(|| async { "done" }).route_layer(from_fn(guard::no_body)),
        );
    let core = CoreConfig::load(&mut Loader::from_map(Vec::<(String, String)>::new()));
    stack(router, &core)
}

struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    code: Option<String>,
}

async fn oneshot(req: Request<Body>) -> Answer {
    let response = app().oneshot(req).await.expect("infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned));
    Answer {
        status,
        content_type,
        code,
    }
}

fn assert_problem(a: &Answer, status: StatusCode, code: &str) {
    assert_eq!(a.status, status);
    assert_eq!(a.content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(a.code.as_deref(), Some(code));
}

fn post_raw(len: usize, declare_length: bool) -> Request<Body> {
    let mut builder = Request::post("/raw").header("content-type", "application/octet-stream");
    let body = if declare_length {
        builder = builder.header("content-length", len.to_string());
        Body::from(vec![b'x'; len])
    } else {
        // Chunked: no length up front, the limit must still hold.
        let chunks = (0..len.div_ceil(8192)).map(move |i| {
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 8192.min(len - i * 8192)]))
        });
        Body::from_stream(futures_util::stream::iter(chunks))
    };
    builder.body(body).expect("request")
}

#[tokio::test]
async fn one_limit_for_raw_body_routes_answered_as_a_problem() {
    let ok = oneshot(post_raw(200 * 1024, true)).await;
    assert_eq!(ok.status, StatusCode::OK);
    let at_limit = oneshot(post_raw(MAX_BODY_BYTES, false)).await;
    assert_eq!(at_limit.status, StatusCode::OK);
    for (len, declared) in [
        (300 * 1024, true),
        (300 * 1024, false),
        (MAX_BODY_BYTES + 1, false),
        (3 * 1024 * 1024, true),
        (3 * 1024 * 1024, false),
    ] {
        let a = oneshot(post_raw(len, declared)).await;
        assert_problem(&a, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
}

/// A body on a method the route does not have is a 405 (the method is the
/// first thing wrong), not a 400 for the body; on a declared bodyless
/// method it is the 400 of `routes_that_take_no_body_refuse_one`.
#[tokio::test]
async fn an_undeclared_method_with_a_body_is_405() {
    for (method, uri) in [("GET", "/raw"), ("DELETE", "/nobody"), ("POST", "/get")] {
        let a = oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json")
                .body(Body::from(r#"{"a": 1}"#))
                .unwrap(),
        )
        .await;
        assert_problem(&a, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    }
}

#[tokio::test]
async fn routes_that_take_no_body_refuse_one() {
    for method in ["GET", "DELETE"] {
        let ok = oneshot(
            Request::builder()
                .method(method)
                .uri("/get")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "{method}");
        let declared = Request::builder()
            .method(method)
            .uri("/get")
            .header("content-length", "10485760")
            .body(Body::from(vec![b'x'; 10 * 1024 * 1024]))
            .unwrap();
        assert_problem(
            &oneshot(declared).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
        let chunked = Request::builder()
            .method(method)
            .uri("/get")
            .body(Body::from_stream(futures_util::stream::iter([Ok::<
                _,
                std::io::Error,
            >(
                Bytes::from_static(b"{}"),
            )])))
            .unwrap();
        assert_problem(
            &oneshot(chunked).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
    let empty = oneshot(Request::post("/nobody").body(Body::empty()).unwrap()).await;
    assert_eq!(empty.status, StatusCode::OK);
    // Clients that always send JSON may send an empty object.
    for tolerated in ["{}", " { } \n"] {
        let a = oneshot(
            Request::post("/nobody")
                .body(Body::from(tolerated))
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{tolerated:?}");
    }
    for refused in ["{\"a\":1}", "[]", "x", "{}{}"] {
        let a = oneshot(Request::post("/nobody").body(Body::from(refused)).unwrap()).await;
        assert_problem(&a, StatusCode::BAD_REQUEST, "bad_request");
    }
    let with_body = oneshot(
        Request::post("/nobody")
            .header("content-type", "application/json")
            .body(Body::from("{\"ignored\":true}"))
            .unwrap(),
    )
    .await;
    assert_problem(&with_body, StatusCode::BAD_REQUEST, "bad_request");
}

async fn local_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(stagepass_platform::serve::serve_local(
        listener,
        app(),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

/// Sends a request with a body of `len` bytes over TCP; returns the status
/// line and the content type of the answer.
async fn raw_post(addr: &str, len: usize) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /raw HTTP/1.1\r\nhost: local\r\ncontent-type: application/octet-stream\r\n\
         content-length: {len}\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    // The server may answer (and close) before the whole body is sent.
    let _ = tcp.write_all(&vec![b'x'; len]).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let content_type = text
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type)
}

#[tokio::test]
async fn the_dev_server_enforces_the_same_limit() {
    let (addr, _stop) = local_server().await;
    let (status, _) = raw_post(&addr, 1024).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    for len in [300 * 1024, 3 * 1024 * 1024] {
        let (status, content_type) = raw_post(&addr, len).await;
        assert_eq!(status, "HTTP/1.1 413 Payload Too Large", "{len}");
        assert_eq!(content_type, "application/problem+json", "{len}");
    }
}

/// A client that never finishes its request head is cut off by the dev
/// server (hyper's header read timeout, which `axum::serve` never armed).
#[tokio::test]
async fn the_dev_server_closes_a_connection_whose_headers_never_finish() {
    let (addr, _stop) = local_server().await;
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();
    tcp.write_all(b"GET /get HTTP/1.1\r\nhost: local\r\nx-slow: ")
        .await
        .expect("partial head");
    let limit = stagepass_platform::local::HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        loop {
            // Trickle one byte a second, as slowloris does.
            if tcp.write_all(b"a").await.is_err() {
                return;
            }
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => sink.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection was still open after {limit:?}"
    );
    assert!(
        started.elapsed()
            >= stagepass_platform::local::HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed too early: {:?}",
        started.elapsed()
    );
    // A normal request on a fresh connection still works.
    let (status, _) = raw_post(&addr, 10).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
}
