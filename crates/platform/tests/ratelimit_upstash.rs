//! The Upstash REST client against real Redis through the shim, and
//! against servers that answer garbage.

mod ratelimit_support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use ratelimit_support::{Shim, TOKEN, client, closed_port, prefix};
use stagepass_platform::upstash::{Command, MAX_RESPONSE_BYTES, Reply, Script, UpstashError};

#[tokio::test]
async fn single_commands_and_their_replies() {
    let shim = Shim::start().await;
    let c = shim.client();
    let k = format!("{}:k", prefix());
    let set = Command::new("SET")
        .arg(&k)
        .arg("hello")
        .arg("PX")
        .arg(60_000);
    assert_eq!(c.command(&set).await.unwrap(), Reply::Text("OK".into()));
    assert_eq!(
        c.command(&Command::new("GET").arg(&k)).await.unwrap(),
        Reply::Text("hello".into())
    );
    assert_eq!(
        c.command(&Command::new("EXISTS").arg(&k)).await.unwrap(),
        Reply::Int(1)
    );
    let missing = format!("{}:missing", prefix());
    assert_eq!(
        c.command(&Command::new("GET").arg(&missing)).await.unwrap(),
        Reply::Nil
    );
    assert_eq!(
        c.command(&Command::new("MGET").arg(&k).arg(&missing))
            .await
            .unwrap(),
        Reply::Array(vec![Reply::Text("hello".into()), Reply::Nil])
    );
    match c.command(&Command::new("INCR").arg(&k)).await {
        Err(UpstashError::Command(e)) => assert!(e.starts_with("ERR"), "{e}"),
        other => panic!("expected a command error, got {other:?}"),
    }
    assert_eq!(c.round_trips(), 6);
}

#[tokio::test]
async fn pipelines_answer_per_command() {
    let shim = Shim::start().await;
    let c = shim.client();
    let k = format!("{}:n", prefix());
    let results = c
        .pipeline(&[
            Command::new("SET").arg(&k).arg("1").arg("PX").arg(60_000),
            Command::new("INCR").arg(&k),
            Command::new("HGET").arg(&k).arg("field"),
            Command::new("GET").arg(&k),
        ])
        .await
        .unwrap();
    assert_eq!(results[0], Ok(Reply::Text("OK".into())));
    assert_eq!(results[1], Ok(Reply::Int(2)));
    assert!(
        results[2]
            .as_ref()
            .is_err_and(|e| e.starts_with("WRONGTYPE"))
    );
    assert_eq!(results[3], Ok(Reply::Text("2".into())));
    assert_eq!(c.round_trips(), 1);
}

#[tokio::test]
async fn multi_exec_is_one_transaction() {
    let shim = Shim::start().await;
    let c = shim.client();
    let k = format!("{}:tx", prefix());
    let results = c
        .multi_exec(&[
            Command::new("SET").arg(&k).arg("10").arg("PX").arg(60_000),
            Command::new("INCRBY").arg(&k).arg(5),
            Command::new("GET").arg(&k),
        ])
        .await
        .unwrap();
    assert_eq!(
        results,
        [
            Ok(Reply::Text("OK".into())),
            Ok(Reply::Int(15)),
            Ok(Reply::Text("15".into()))
        ]
    );
    // A command Redis refuses while queueing aborts the whole transaction.
    let aborted = c
        .multi_exec(&[Command::new("INCR").arg(&k), Command::new("NOSUCHCOMMAND")])
        .await;
    assert!(
        matches!(aborted, Err(UpstashError::Command(_))),
        "{aborted:?}"
    );
    assert_eq!(
        c.command(&Command::new("GET").arg(&k)).await.unwrap(),
        Reply::Text("15".into())
    );
}

#[tokio::test]
async fn a_bad_token_is_http_401() {
    let shim = Shim::start().await;
    let wrong = client(&shim.url(), "not-the-token", Duration::from_secs(2));
    assert_eq!(
        wrong.command(&Command::new("PING")).await,
        Err(UpstashError::Http(StatusCode::UNAUTHORIZED))
    );
    assert_eq!(
        wrong.pipeline(&[Command::new("PING")]).await,
        Err(UpstashError::Http(StatusCode::UNAUTHORIZED))
    );
    assert_eq!(shim.requests(), 2);
    let right = client(&shim.url(), TOKEN, Duration::from_secs(2));
    assert_eq!(
        right.command(&Command::new("PING")).await.unwrap(),
        Reply::Text("PONG".into())
    );
}

#[tokio::test]
async fn evalsha_runs_a_cached_script_in_one_round_trip() {
    let shim = Shim::start().await;
    let c = shim.client();
    // A script unique to this test, so no other test flushes or loads it.
    let source: &'static str = Box::leak(
        format!(
            "-- {}\nreturn {{KEYS[1], ARGV[1], 7}}",
            uuid::Uuid::new_v4()
        )
        .into_boxed_str(),
    );
    let script = Script::new(source);
    let keys = ["k1".to_owned()];
    let args = ["a1".to_owned()];
    let expected = Reply::Array(vec![
        Reply::Text("k1".into()),
        Reply::Text("a1".into()),
        Reply::Int(7),
    ]);
    // Unknown to Redis: NOSCRIPT, then EVAL (which caches it).
    assert_eq!(c.evalsha(&script, &keys, &args).await.unwrap(), expected);
    assert_eq!(c.round_trips(), 2);
    assert_eq!(c.evalsha(&script, &keys, &args).await.unwrap(), expected);
    assert_eq!(c.round_trips(), 3);
}

#[tokio::test]
async fn an_unreachable_server_is_a_typed_error() {
    let c = client(
        &format!("http://{}", closed_port().await),
        TOKEN,
        Duration::from_secs(2),
    );
    match c.command(&Command::new("PING")).await {
        Err(UpstashError::Unreachable(message)) => {
            assert!(!message.contains(TOKEN));
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// A server answering every path with `answer`.
async fn garbage_server(answer: fn() -> axum::response::Response) -> String {
    let app = Router::new()
        .route("/", post(move || async move { answer() }))
        .route("/pipeline", post(move || async move { answer() }))
        .route(
            "/slow/",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn single_answer(answer: fn() -> axum::response::Response) -> Result<Reply, UpstashError> {
    let url = garbage_server(answer).await;
    client(&url, TOKEN, Duration::from_secs(2))
        .command(&Command::new("PING"))
        .await
}

fn is_malformed(r: &Result<Reply, UpstashError>) -> bool {
    matches!(r, Err(UpstashError::Malformed(_)))
}

#[tokio::test]
async fn malformed_answers_are_clean_errors() {
    let r = single_answer(|| (StatusCode::OK, "<html>hello</html>").into_response()).await;
    assert!(is_malformed(&r), "{r:?}");
    let r = single_answer(|| (StatusCode::OK, r#"{"something":"else"}"#).into_response()).await;
    assert!(is_malformed(&r), "{r:?}");
    let r = single_answer(|| (StatusCode::OK, r#"["result"]"#).into_response()).await;
    assert!(is_malformed(&r), "{r:?}");
    let r = single_answer(|| (StatusCode::OK, r#"{"result":{"nested":"object"}}"#).into_response())
        .await;
    assert!(is_malformed(&r), "{r:?}");
    let r = single_answer(|| (StatusCode::OK, r#"{"result":1.5}"#).into_response()).await;
    assert!(is_malformed(&r), "{r:?}");
    let r = single_answer(|| (StatusCode::OK, r#"{"error":42}"#).into_response()).await;
    assert!(is_malformed(&r), "{r:?}");
    let r = single_answer(|| (StatusCode::OK, r#"{"result":"#).into_response()).await;
    assert!(is_malformed(&r), "{r:?}");
    let r = single_answer(|| (StatusCode::OK, vec![b' '; MAX_RESPONSE_BYTES + 1]).into_response())
        .await;
    assert!(is_malformed(&r), "{r:?}");
}

#[tokio::test]
async fn error_statuses_are_http_errors() {
    let r = single_answer(|| (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()).await;
    assert_eq!(
        r,
        Err(UpstashError::Http(StatusCode::INTERNAL_SERVER_ERROR))
    );
    let r = single_answer(|| (StatusCode::BAD_REQUEST, "not json").into_response()).await;
    assert_eq!(r, Err(UpstashError::Http(StatusCode::BAD_REQUEST)));
    let r = single_answer(|| (StatusCode::BAD_GATEWAY, r#"{"error":"upstream"}"#).into_response())
        .await;
    assert_eq!(r, Err(UpstashError::Http(StatusCode::BAD_GATEWAY)));
}

#[tokio::test]
async fn pipeline_answers_of_the_wrong_shape_are_malformed() {
    let url = garbage_server(|| (StatusCode::OK, r#"[{"result":"OK"}]"#).into_response()).await;
    let c = client(&url, TOKEN, Duration::from_secs(2));
    let two = [Command::new("PING"), Command::new("PING")];
    assert!(matches!(
        c.pipeline(&two).await,
        Err(UpstashError::Malformed(_))
    ));
    let url = garbage_server(|| (StatusCode::OK, r#"{"result":"OK"}"#).into_response()).await;
    let c = client(&url, TOKEN, Duration::from_secs(2));
    assert!(matches!(
        c.pipeline(&two).await,
        Err(UpstashError::Malformed(_))
    ));
}

#[tokio::test]
async fn a_slow_server_times_out_at_the_call_timeout() {
    let url = garbage_server(|| (StatusCode::OK, "{}").into_response()).await;
    let c = client(&format!("{url}/slow"), TOKEN, Duration::from_millis(150));
    let started = Instant::now();
    let r = c.command(&Command::new("PING")).await;
    let elapsed = started.elapsed();
    assert_eq!(r, Err(UpstashError::Timeout(Duration::from_millis(150))));
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
}
