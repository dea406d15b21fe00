//! The benchmark's results: a table for people, JSON for tools, and the
//! comparison with the performance targets.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::error::Result;

/// Cold-start targets (median, ms), binary size and memory limits (decimal MB).
const COLD_TARGETS_MS: [(&str, f64); 2] = [("health", 10.0), ("v1_me", 25.0)];
const MAX_BINARY_BYTES: u64 = 10_000_000;
const MAX_PEAK_RSS_BYTES: u64 = 32_000_000;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Summary {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => ms[n / 2],
            _ => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
        };
        Summary {
            min_ms: ms.first().copied().unwrap_or(0.0),
            median_ms: median,
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Warm {
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_200: u64,
    pub errors: u64,
    pub peak_rss_kib: u64,
}

/// A measurement, or why it could not be made.
pub type Outcome<T> = std::result::Result<T, String>;

pub struct Measurements {
    pub bin_dir: PathBuf,
    pub runs: usize,
    /// 1-minute load average when the run started.
    pub load_average: Option<f64>,
    /// `RUST_LOG` given to the functions (`None`: their default, info).
    pub rust_log: Option<String>,
    /// v1_me's database, `user@host:port/name`.
    pub database: String,
    /// `sslmode` of v1_me's database URL (`None`: the driver's default, prefer).
    pub sslmode: Option<String>,
    pub spawn_floor: Summary,
    /// (function, path, spawn → first 200)
    pub cold: Vec<(&'static str, &'static str, Outcome<Summary>)>,
    /// `None`: not built.
    pub sizes: Vec<(&'static str, Option<u64>)>,
    pub warm: Vec<(&'static str, Outcome<Warm>)>,
}

impl Measurements {
    /// Whether every measurement could be made (targets aside).
    pub fn complete(&self) -> bool {
        self.failures().is_empty() && self.sizes.iter().all(|(_, s)| s.is_some())
    }

    fn failures(&self) -> Vec<(String, &str)> {
        let cold = self.cold.iter().filter_map(|(name, _, outcome)| {
            let why = outcome.as_ref().err()?;
            Some((format!("cold start {name}"), why.as_str()))
        });
        let warm = self.warm.iter().filter_map(|(name, outcome)| {
            let why = outcome.as_ref().err()?;
            Some((format!("warm load {name}"), why.as_str()))
        });
        cold.chain(warm).collect()
    }
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub what: String,
    /// `None` when the measurement failed (which counts as FAIL).
    pub value: Option<f64>,
    pub limit: f64,
    pub unit: &'static str,
    pub pass: bool,
}

/// Every target, PASS or FAIL.
pub fn checks(m: &Measurements) -> Vec<Check> {
    let mut out = Vec::new();
    for (name, _, cold) in &m.cold {
        if let Some((_, limit)) = COLD_TARGETS_MS.iter().find(|(n, _)| n == name) {
            let median = cold.as_ref().ok().map(|s| s.median_ms);
            out.push(check(
                format!("cold start median {name}"),
                median,
                *limit,
                "ms",
            ));
        }
    }
    for (name, bytes) in &m.sizes {
        let size = bytes.map(mb);
        out.push(check(
            format!("binary size {name}"),
            size,
            mb(MAX_BINARY_BYTES),
            "MB",
        ));
    }
    for (name, warm) in &m.warm {
        let rss = warm.as_ref().ok().map(|w| mb(w.peak_rss_kib * 1024));
        let limit = mb(MAX_PEAK_RSS_BYTES);
        out.push(check(
            format!("peak RSS under load {name}"),
            rss,
            limit,
            "MB",
        ));
    }
    out
}

fn check(what: String, value: Option<f64>, limit: f64, unit: &'static str) -> Check {
    Check {
        what,
        value,
        limit,
        unit,
        pass: value.is_some_and(|v| v <= limit),
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        cpu_model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    }
}

pub fn print(m: &Measurements) {
    let machine = machine();
    println!(
        "stagepass bench cold-start — {} — {} CPU(s), {}, Linux {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        machine.cpus,
        machine.cpu_model,
        machine.kernel
    );
    println!("release binaries: {}", m.bin_dir.display());
    let sslmode = m
        .sslmode
        .as_deref()
        .unwrap_or("unset (sqlx default: prefer)");
    println!("v1_me database: {}, sslmode {sslmode}", m.database);
    let rust_log = m
        .rust_log
        .as_deref()
        .unwrap_or("unset (info, one JSON line per request)");
    let load = m
        .load_average
        .map_or("unknown".to_owned(), |l| format!("{l:.2}"));
    println!("functions' RUST_LOG: {rust_log}; load average at start: {load}");
    println!();
    println!(
        "{:<44}{:>9}{:>9}{:>9}",
        format!("cold start, spawn → first 200 ({} runs)", m.runs),
        "min",
        "median",
        "max"
    );
    let floor = &m.spawn_floor;
    println!(
        "{:<44}{:>9.2}{:>9.2}{:>9.2}  ms",
        "  process spawn floor (/bin/true)", floor.min_ms, floor.median_ms, floor.max_ms
    );
    for (name, path, cold) in &m.cold {
        let label = format!("  {name} GET {path}");
        match cold {
            Ok(s) => println!(
                "{label:<44}{:>9.2}{:>9.2}{:>9.2}  ms",
                s.min_ms, s.median_ms, s.max_ms
            ),
            Err(_) => println!("{label:<44}  not measured (see below)"),
        }
    }
    println!();
    println!("release binary size");
    for (name, bytes) in &m.sizes {
        match bytes {
            Some(b) => println!("  {name:<30}{:>8.2} MB  ({b} bytes)", mb(*b)),
            None => println!("  {name:<30}  not built"),
        }
    }
    if m.sizes.iter().any(|(_, s)| s.is_none()) {
        println!("  (some function binaries are missing: cargo build --release --bins)");
    }
    println!();
    let conns = m
        .warm
        .iter()
        .find_map(|(_, w)| w.as_ref().ok())
        .map_or(0, |w| w.connections);
    println!("warm, {conns} keep-alive connections, closed loop");
    println!(
        "  {:<12}{:>10}{:>10}{:>10}{:>10}{:>9}{:>13}",
        "function", "requests", "req/s", "p50 ms", "p99 ms", "errors", "peak RSS MB"
    );
    for (name, w) in &m.warm {
        let Ok(w) = w else {
            println!("  {name:<12}  not measured (see below)");
            continue;
        };
        println!(
            "  {name:<12}{:>10}{:>10.0}{:>10.2}{:>10.2}{:>9}{:>13.1}",
            w.requests,
            w.requests_per_second,
            w.p50_ms,
            w.p99_ms,
            w.non_200 + w.errors,
            mb(w.peak_rss_kib * 1024)
        );
    }
    println!();
    println!("targets");
    for c in checks(m) {
        let verdict = if c.pass { "PASS" } else { "FAIL" };
        let value = match c.value {
            Some(v) => format!("{v:>9.3} {}", c.unit),
            None => "not measured".to_owned(),
        };
        println!(
            "  {verdict}  {:<40} {value} (limit {} {})",
            c.what, c.limit, c.unit
        );
    }
    let failures = m.failures();
    if !failures.is_empty() {
        println!();
        println!("measurements that failed");
        for (what, why) in failures {
            println!("  {what}: {why}");
        }
    }
}

pub fn json(m: &Measurements) -> Result<String> {
    let machine = machine();
    let cold: serde_json::Map<String, serde_json::Value> = m
        .cold
        .iter()
        .map(|(name, path, s)| {
            let value = match s {
                Ok(s) => json!({ "path": path, "ms": s }),
                Err(e) => json!({ "path": path, "error": e }),
            };
            ((*name).to_owned(), value)
        })
        .collect();
    let sizes: serde_json::Map<String, serde_json::Value> = m
        .sizes
        .iter()
        .map(|(name, bytes)| ((*name).to_owned(), json!(bytes)))
        .collect();
    let warm: serde_json::Map<String, serde_json::Value> = m
        .warm
        .iter()
        .map(|(name, w)| {
            let value = match w {
                Ok(w) => serde_json::to_value(w)?,
                Err(e) => json!({ "error": e }),
            };
            Ok(((*name).to_owned(), value))
        })
        .collect::<Result<_>>()?;
    let doc = json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "machine": { "cpus": machine.cpus, "cpu_model": machine.cpu_model, "kernel": machine.kernel },
        "bin_dir": m.bin_dir.display().to_string(),
        "runs": m.runs,
        "database": m.database,
        "load_average_at_start": m.load_average,
        "rust_log": m.rust_log,
        "sslmode": m.sslmode,
        "spawn_floor_ms": m.spawn_floor,
        "cold_start": cold,
        "binary_size_bytes": sizes,
        "warm": warm,
        "targets": checks(m),
    });
    Ok(serde_json::to_string_pretty(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_counts() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&x| Duration::from_millis(x))
                .collect::<Vec<_>>()
        };
        let s = Summary::of(&ms(&[5, 1, 3]));
        assert_eq!((s.min_ms, s.median_ms, s.max_ms), (1.0, 3.0, 5.0));
        assert_eq!(Summary::of(&ms(&[4, 1, 2, 3])).median_ms, 2.5);
    }
}
