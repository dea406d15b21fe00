//! Runs the limiter benchmark once and prints its JSON report (until the
//! `stagepass bench ratelimit` command exists):
//!
//! ```sh
//! upstash-shim --port 8079 --token bench-token &
//! BENCH_UPSTASH_URL=http://127.0.0.1:8079 BENCH_UPSTASH_TOKEN=bench-token \
//!   cargo test --release -p stagepass-platform --features testing \
//!   --test ratelimit_bench -- --ignored --nocapture
//! ```
//!
//! Without `BENCH_UPSTASH_URL` it starts a shim in process (which then
//! shares this runtime; use an external one for numbers to compare).

// The bench helpers exist only with the `testing` feature.
#![cfg(feature = "testing")]

mod ratelimit_support;

use stagepass_platform::config::Secret;
use stagepass_platform::ratelimit::bench::{BenchOptions, bench_check};

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn bench_ratelimit() {
    let iterations = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let (url, token, _shim) = match std::env::var("BENCH_UPSTASH_URL") {
        Ok(url) => {
            let token = std::env::var("BENCH_UPSTASH_TOKEN").expect("BENCH_UPSTASH_TOKEN");
            (url, token, None)
        }
        Err(_) => {
            let shim = ratelimit_support::Shim::start().await;
            (shim.url(), ratelimit_support::TOKEN.to_owned(), Some(shim))
        }
    };
    let options = BenchOptions {
        url,
        token: Secret::from(token),
        iterations,
    };
    let report = bench_check(&options).await.expect("benchmark");
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.round_trips_per_request, 1.0);
    assert_eq!(report.round_trips_per_blocked_request, 0.0);
}
