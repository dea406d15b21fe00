//! A network distance between a function and its database, on one machine
//! (`--db-rtt-us`): a TCP relay on 127.0.0.1 that holds every byte for half
//! the round trip in each direction before passing it on.
//!
//! Deployed, a function and its database are a network hop apart (a
//! Vercel region and the Supabase project next to it: about a millisecond
//! there and back), so a request's round trips to Postgres cost latency
//! that a benchmark over loopback (tens of microseconds) does not show.
//! Issue 13's one-round-trip reads are about exactly that cost. The relay
//! puts the same distance in front of everything that talks to the
//! database under measurement: the function *and* its pgbench baseline.
//!
//! Plain threads, not tokio: a thread sleeping until a deadline wakes
//! within tens of microseconds, where tokio's timer rounds up to whole
//! milliseconds. A benchmark opens a handful of connections (the pool and
//! pgbench's clients), each with four threads. Order is kept (one queue
//! per direction), an end of stream is passed on after the same delay, and
//! the relay stops accepting when dropped; the connections it relays end
//! with their peers.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Context as _, Result, fail};

pub struct Relay {
    addr: SocketAddr,
    stopped: Arc<AtomicBool>,
}

impl Relay {
    /// Listens on 127.0.0.1 (a free port) and relays every connection to
    /// `upstream`, adding `rtt` to each round trip.
    pub fn start(upstream: SocketAddr, rtt: Duration) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the latency relay")?;
        let addr = listener.local_addr().context("the relay's address")?;
        let stopped = Arc::new(AtomicBool::new(false));
        let one_way = rtt / 2;
        let stop = stopped.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                relay(client, server2, one_way);
                relay(server, client2, one_way);
            }
        });
        Ok(Relay { addr, stopped })
    }

    /// `url` (a `postgres://` URL) pointed at the relay instead.
    pub fn url(&self, url: &str) -> Result<String> {
        let mut u = url::Url::parse(url).context("database url")?;
        u.set_host(Some("127.0.0.1")).context("relay host")?;
        if u.set_port(Some(self.addr.port())).is_err() {
            return fail("relay port");
        }
        Ok(u.to_string())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// The way to a database under measurement: through a relay when the
/// benchmark's `--db-rtt-us` asks for one, else straight (loopback). Keep
/// it for as long as anything connects through `url`.
pub struct Hop {
    /// The relay and the round trip it was asked to add.
    relay: Option<(Relay, Duration)>,
    /// The URL to connect with.
    pub url: String,
}

impl Hop {
    pub fn to(rtt: Option<Duration>, url: &str) -> Result<Hop> {
        let Some(rtt) = rtt else {
            return Ok(Hop {
                relay: None,
                url: url.to_owned(),
            });
        };
        let relay = Relay::start(upstream_of(url)?, rtt)?;
        Ok(Hop {
            url: relay.url(url)?,
            relay: Some((relay, rtt)),
        })
    }

    /// What the relay really adds next to `direct` (the same database
    /// without it); None on loopback.
    pub async fn distance(&self, direct: &str) -> Result<Option<Distance>> {
        match &self.relay {
            Some((_, requested)) => Ok(Some(Distance {
                requested: *requested,
                loopback: median_round_trip(direct).await?,
                relayed: median_round_trip(&self.url).await?,
            })),
            None => Ok(None),
        }
    }
}

/// What a benchmark's `--db-rtt-us` asked for and what it got.
#[derive(Debug, Clone, Copy)]
pub struct Distance {
    pub requested: Duration,
    /// Median `select 1` without the relay…
    pub loopback: Duration,
    /// … and through it.
    pub relayed: Duration,
}

impl Distance {
    /// One line for a report; `None` is loopback.
    pub fn describe(distance: Option<&Distance>) -> String {
        match distance {
            None => "database: loopback".to_owned(),
            Some(d) => format!(
                "database: {} µs added to every round trip, the function's and pgbench's alike \
                 (select 1, idle, median: {} µs through the relay, {} µs on loopback)",
                d.requested.as_micros(),
                d.relayed.as_micros(),
                d.loopback.as_micros()
            ),
        }
    }

    pub fn json(distance: Option<&Distance>) -> serde_json::Value {
        match distance {
            None => serde_json::Value::Null,
            Some(d) => serde_json::json!({
                "requested_us": d.requested.as_micros(),
                "select_1_median_us": d.relayed.as_micros(),
                "select_1_median_loopback_us": d.loopback.as_micros(),
            }),
        }
    }
}

/// The median of 50 `select 1` round trips to `url` on one connection, on
/// an idle machine: what the relay really adds (a thread's wake-up on each
/// side comes on top of the requested time) next to loopback's.
async fn median_round_trip(url: &str) -> Result<Duration> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connect to measure a round trip")?;
    let mut samples = Vec::with_capacity(50);
    for _ in 0..50 {
        let sent = Instant::now();
        sqlx::query("select 1")
            .execute(&mut conn)
            .await
            .context("select 1")?;
        samples.push(sent.elapsed());
    }
    let _ = conn.close().await;
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// The database's address in `url` (host resolved, default port 5432).
fn upstream_of(url: &str) -> Result<SocketAddr> {
    let u = url::Url::parse(url).context("database url")?;
    let host = u.host_str().unwrap_or("127.0.0.1");
    let port = u.port().unwrap_or(5432);
    match std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .context("resolve the database host")?
        .next()
    {
        Some(addr) => Ok(addr),
        None => fail("the database host has no address"),
    }
}

/// One direction: bytes read from `from` are written to `to` `delay` after
/// they arrived.
fn relay(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (queue, due) = mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = queue.send((Instant::now() + delay, None));
                    break;
                }
                Ok(n) => {
                    if queue
                        .send((Instant::now() + delay, Some(buf[..n].to_vec())))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        while let Ok((at, bytes)) = due.recv() {
            let wait = at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                thread::sleep(wait);
            }
            match bytes {
                Some(bytes) => {
                    if to.write_all(&bytes).is_err() {
                        break;
                    }
                }
                None => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the relay: every exchange takes at least the
    /// round trip, the bytes arrive in order, and the end of a stream is
    /// passed on.
    #[test]
    fn every_round_trip_takes_at_least_the_added_time_and_keeps_order() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let rtt = Duration::from_millis(4);
        let relay = Relay::start(upstream, rtt).unwrap();
        let mut c = TcpStream::connect(relay.addr).unwrap();
        for i in 0..5u8 {
            let sent = Instant::now();
            c.write_all(&[i, i + 1, i + 2]).unwrap();
            let mut got = [0u8; 3];
            c.read_exact(&mut got).unwrap();
            assert_eq!(got, [i, i + 1, i + 2]);
            assert!(
                sent.elapsed() >= rtt,
                "a round trip took {:?}",
                sent.elapsed()
            );
        }
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn the_url_points_at_the_relay_with_everything_else_kept() {
        let relay =
            Relay::start("127.0.0.1:5432".parse().unwrap(), Duration::from_millis(1)).unwrap();
        let url = relay
            .url("postgres://stagepass_app@localhost:5432/db_1?sslmode=disable")
            .unwrap();
        assert_eq!(
            url,
            format!(
                "postgres://stagepass_app@127.0.0.1:{}/db_1?sslmode=disable",
                relay.addr.port()
            )
        );
    }
}
