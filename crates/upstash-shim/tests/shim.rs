//! The shim against the real Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`): Upstash's shapes, statuses and encodings.

use serde_json::{Value, json};

const TOKEN: &str = "shim-test-token";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Shim {
    base: String,
    handle: upstash_shim::ShimHandle,
    http: reqwest::Client,
}

impl Shim {
    async fn start() -> Shim {
        let (addr, handle) = upstash_shim::spawn(&redis_url(), TOKEN).await.unwrap();
        Shim {
            base: format!("http://{addr}"),
            handle,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap())
    }
}

fn key(name: &str) -> String {
    format!("test:shim:{}:{name}", uuid_like())
}

/// Unique enough per call without a uuid dependency.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{nanos}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[tokio::test]
async fn single_commands_answer_like_upstash() {
    let shim = Shim::start().await;
    let k = key("k");
    let (s, v) = shim
        .post("/", json!(["SET", k, "héllo", "PX", 60000]), &[])
        .await;
    assert_eq!((s, v), (200, json!({"result": "OK"})));
    let (s, v) = shim.post("/", json!(["GET", k]), &[]).await;
    assert_eq!((s, v), (200, json!({"result": "héllo"})));
    let (s, v) = shim.post("/", json!(["INCR", k]), &[]).await;
    assert_eq!(s, 400);
    assert_eq!(
        v,
        json!({"error": "ERR value is not an integer or out of range"})
    );
    let (s, v) = shim.post("/", json!(["GET", key("missing")]), &[]).await;
    assert_eq!((s, v), (200, json!({"result": null})));
    let (s, v) = shim.post("/", json!(["NOSUCHCOMMAND"]), &[]).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("ERR unknown command")
    );
    let (s, v) = shim.post("/", json!({"not": "a command"}), &[]).await;
    assert_eq!(s, 400);
    assert!(v["error"].is_string());
}

#[tokio::test]
async fn base64_encoding_covers_bulk_strings_only() {
    let shim = Shim::start().await;
    let k = key("b64");
    let enc = [("Upstash-Encoding", "base64")];
    let (_, v) = shim
        .post("/", json!(["SET", k, "hello", "PX", 60000]), &enc)
        .await;
    assert_eq!(v, json!({"result": "OK"}));
    let (_, v) = shim.post("/", json!(["MGET", k, key("none")]), &enc).await;
    assert_eq!(v, json!({"result": ["aGVsbG8=", null]}));
    let (_, v) = shim.post("/", json!(["STRLEN", k]), &enc).await;
    assert_eq!(v, json!({"result": 5}));
}

#[tokio::test]
async fn the_token_is_required_everywhere() {
    let shim = Shim::start().await;
    for path in ["/", "/pipeline", "/multi-exec"] {
        let res = shim
            .http
            .post(format!("{}{path}", shim.base))
            .bearer_auth("wrong")
            .json(&json!([["PING"]]))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 401, "{path}");
        assert_eq!(
            res.json::<Value>().await.unwrap(),
            json!({"error": "Unauthorized"})
        );
    }
    let res = shim
        .http
        .post(format!("{}/?_token={TOKEN}", shim.base))
        .json(&json!(["PING"]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(shim.handle.requests(), 4);
}

#[tokio::test]
async fn pipelines_and_transactions() {
    let shim = Shim::start().await;
    let k = key("p");
    let (s, v) = shim
        .post(
            "/pipeline",
            json!([["SET", k, 1, "PX", 60000], ["INCR", k], ["HGET", k, "f"]]),
            &[],
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v[0], json!({"result": "OK"}));
    assert_eq!(v[1], json!({"result": 2}));
    assert!(v[2]["error"].as_str().unwrap().starts_with("WRONGTYPE"));
    let (s, v) = shim
        .post("/multi-exec", json!([["INCR", k], ["GET", k]]), &[])
        .await;
    assert_eq!((s, v), (200, json!([{"result": 3}, {"result": "3"}])));
    let (s, v) = shim
        .post("/multi-exec", json!([["INCR", k], ["NOSUCHCOMMAND"]]), &[])
        .await;
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap().contains("unknown command"),
        "{v}"
    );
    let (_, v) = shim.post("/", json!(["GET", k]), &[]).await;
    assert_eq!(
        v,
        json!({"result": "3"}),
        "the aborted transaction changed nothing"
    );
}

#[tokio::test]
async fn scripts_with_upstash_only_flags_run_and_keep_their_digest() {
    let shim = Shim::start().await;
    // Unique per run, so its digest is not cached in Redis yet.
    let script = format!("#!lua flags=allow-key-locking\nreturn '{}'", uuid_like());
    let sha = {
        use std::fmt::Write as _;
        let digest = <sha1::Sha1 as sha1::Digest>::digest(script.as_bytes());
        digest.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    let (s, v) = shim.post("/", json!(["EVALSHA", sha, 0]), &[]).await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().starts_with("NOSCRIPT"));
    let (s, _) = shim.post("/", json!(["EVAL", script, 0]), &[]).await;
    assert_eq!(s, 200);
    let (s, _) = shim
        .post("/pipeline", json!([["EVALSHA", sha, 0]]), &[])
        .await;
    assert_eq!(s, 200);
    let (s, v) = shim.post("/", json!(["SCRIPT", "LOAD", script]), &[]).await;
    assert_eq!((s, v), (200, json!({"result": sha})));
}

#[tokio::test]
async fn stats_count_command_requests() {
    let shim = Shim::start().await;
    shim.post("/", json!(["PING"]), &[]).await;
    shim.post("/pipeline", json!([["PING"], ["PING"]]), &[])
        .await;
    let stats: Value = shim
        .http
        .get(format!("{}/__stats", shim.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, json!({"requests": 2}));
}
