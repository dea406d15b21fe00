//! Warm load: one running function, `CONNECTIONS` keep-alive connections
//! each sending the next request as soon as the previous response is in
//! (closed loop), for a fixed time. Runs on the caller's current-thread
//! runtime, so the load generator uses one core and the (single-threaded)
//! function the other.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::report::Warm;
use super::{Running, Target, http};
use crate::error::{Context as _, Result, fail};

const CONNECTIONS: usize = 32;
/// Untimed: fills the pool, the allocator and the caches.
const WARM_UP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(5);
/// A hard cap on requests per connection, whatever the speed.
const MAX_REQUESTS_PER_CONNECTION: usize = 500_000;
/// One response slower than this ends that connection (as an error).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one connection saw.
#[derive(Default)]
struct ConnectionResult {
    /// Microseconds per successful (200) exchange.
    latencies_us: Vec<u32>,
    non_200: u64,
    errors: u64,
}

/// Starts `target`, warms it up, measures, and reads its peak memory.
pub async fn warm(target: &Target) -> Result<Warm> {
    let mut running = Running::spawn(target)?;
    running.wait_for_200(&target.request, Instant::now())?;
    let addr = running.addr;
    run_load(addr, &target.request, WARM_UP).await?;
    let started = Instant::now();
    let results = run_load(addr, &target.request, MEASURE).await?;
    let elapsed = started.elapsed();
    let peak_rss_kib = peak_rss_kib(running.pid())?;
    drop(running);

    let mut latencies: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let non_200 = results.iter().map(|r| r.non_200).sum();
    let errors = results.iter().map(|r| r.errors).sum();
    if latencies.is_empty() {
        return fail(format!(
            "{}: no successful request under load ({non_200} non-200, {errors} errors)",
            target.name
        ));
    }
    Ok(Warm {
        connections: CONNECTIONS,
        seconds: elapsed.as_secs_f64(),
        requests: latencies.len() as u64,
        requests_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
        non_200,
        errors,
        peak_rss_kib,
    })
}

async fn run_load(
    addr: SocketAddr,
    request: &[u8],
    duration: Duration,
) -> Result<Vec<ConnectionResult>> {
    let deadline = tokio::time::Instant::now() + duration;
    let mut set = JoinSet::new();
    for _ in 0..CONNECTIONS {
        set.spawn(connection(addr, request.to_vec(), deadline));
    }
    let mut results = Vec::with_capacity(CONNECTIONS);
    while let Some(joined) = set.join_next().await {
        results.push(joined.context("a load connection task failed")?);
    }
    Ok(results)
}

/// One closed-loop connection until `deadline`. A failure ends the
/// connection and is counted, never retried in a tight loop.
async fn connection(
    addr: SocketAddr,
    request: Vec<u8>,
    deadline: tokio::time::Instant,
) -> ConnectionResult {
    let mut result = ConnectionResult::default();
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(_) => {
            result.errors += 1;
            return result;
        }
    };
    // Requests are one write each; no reason to let Nagle hold them.
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    while tokio::time::Instant::now() < deadline
        && result.latencies_us.len() < MAX_REQUESTS_PER_CONNECTION
    {
        let sent = Instant::now();
        let exchanged = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            http::exchange(&mut stream, &request, &mut buf),
        )
        .await;
        match exchanged {
            Ok(Ok(200)) => {
                let us = sent.elapsed().as_micros();
                result
                    .latencies_us
                    .push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Ok(Ok(_)) => result.non_200 += 1,
            Ok(Err(_)) | Err(_) => {
                result.errors += 1;
                break;
            }
        }
    }
    result
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
pub fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    let rank = (q * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[index]) / 1000.0
}

/// The process's peak resident set (`VmHWM`, KiB) from /proc.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmHWM in /proc/<pid>/status".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.50), 50.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&[7000], 0.99), 7.0);
    }
}
