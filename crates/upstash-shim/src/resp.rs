//! A minimal RESP2 client: enough to send commands and read any reply, and
//! a small bounded connection pool.
//!
//! Written by hand instead of pulling in the `redis` crate: the shim needs
//! "send these arguments, give me the reply tree" and nothing else, and the
//! whole client is smaller than that crate's feature list.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest bulk string the shim accepts from Redis (Upstash's own request
/// limit is in this range too).
const MAX_BULK_BYTES: usize = 64 * 1024 * 1024;
/// Largest array (elements) and nesting the shim accepts from Redis.
const MAX_ARRAY_LEN: usize = 1024 * 1024;
const MAX_DEPTH: usize = 32;
/// How long connecting to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None` is the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` is the nil array.
    Array(Option<Vec<Resp>>),
}

/// One connection to Redis.
pub struct Conn {
    stream: BufStream<TcpStream>,
}

impl Conn {
    async fn connect(target: &Target) -> io::Result<Conn> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target.addr))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "connecting to Redis timed out")
            })??;
        tcp.set_nodelay(true)?;
        let mut conn = Conn {
            stream: BufStream::new(tcp),
        };
        if let Some(password) = &target.password {
            let mut auth = vec![b"AUTH".to_vec()];
            if let Some(user) = &target.username {
                auth.push(user.as_bytes().to_vec());
            }
            auth.push(password.as_bytes().to_vec());
            conn.expect_ok(auth).await?;
        }
        if target.db != 0 {
            conn.expect_ok(vec![b"SELECT".to_vec(), target.db.to_string().into_bytes()])
                .await?;
        }
        Ok(conn)
    }

    async fn expect_ok(&mut self, command: Vec<Vec<u8>>) -> io::Result<()> {
        self.send(std::slice::from_ref(&command)).await?;
        match self.read().await? {
            Resp::Error(e) => Err(io::Error::other(format!(
                "Redis refused the connection: {e}"
            ))),
            _ => Ok(()),
        }
    }

    /// Writes `commands` back to back (pipelined) and flushes once.
    pub async fn send(&mut self, commands: &[Vec<Vec<u8>>]) -> io::Result<()> {
        let mut out = Vec::with_capacity(64 * commands.len());
        for command in commands {
            encode(command, &mut out);
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// Reads one reply.
    pub async fn read(&mut self) -> io::Result<Resp> {
        self.read_at(0).await
    }

    fn read_at(
        &mut self,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Resp>> + Send + '_>> {
        Box::pin(async move {
            if depth > MAX_DEPTH {
                return Err(invalid("reply nested too deeply"));
            }
            let line = self.read_line().await?;
            let (kind, rest) = line.split_at(1);
            match kind {
                "+" => Ok(Resp::Simple(rest.to_owned())),
                "-" => Ok(Resp::Error(rest.to_owned())),
                ":" => rest
                    .parse()
                    .map(Resp::Int)
                    .map_err(|_| invalid("bad integer reply")),
                "$" => self.read_bulk(rest).await,
                "*" => {
                    let Some(len) = length(rest, MAX_ARRAY_LEN)? else {
                        return Ok(Resp::Array(None));
                    };
                    let mut items = Vec::with_capacity(len.min(1024));
                    for _ in 0..len {
                        items.push(self.read_at(depth + 1).await?);
                    }
                    Ok(Resp::Array(Some(items)))
                }
                _ => Err(invalid("unknown reply type")),
            }
        })
    }

    async fn read_bulk(&mut self, header: &str) -> io::Result<Resp> {
        let Some(len) = length(header, MAX_BULK_BYTES)? else {
            return Ok(Resp::Bulk(None));
        };
        // The payload plus its CRLF.
        let mut buf = vec![0; len + 2];
        self.stream.read_exact(&mut buf).await?;
        buf.truncate(len);
        Ok(Resp::Bulk(Some(buf)))
    }

    async fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        // Bounded: a reply header line is short; a longer one is garbage.
        let read = (&mut self.stream)
            .take(64 * 1024)
            .read_line(&mut line)
            .await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "Redis closed the connection",
            ));
        }
        let line = line
            .strip_suffix("\r\n")
            .ok_or_else(|| invalid("reply line without CRLF"))?;
        if line.is_empty() {
            return Err(invalid("empty reply line"));
        }
        Ok(line.to_owned())
    }
}

/// `-1` is nil; anything else must be a length within `max`.
fn length(text: &str, max: usize) -> io::Result<Option<usize>> {
    let n: i64 = text.parse().map_err(|_| invalid("bad length"))?;
    if n == -1 {
        return Ok(None);
    }
    let n = usize::try_from(n).map_err(|_| invalid("negative length"))?;
    if n > max {
        return Err(invalid("reply too large"));
    }
    Ok(Some(n))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("Redis protocol: {what}"),
    )
}

/// A command as a RESP array of bulk strings.
fn encode(command: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", command.len()).as_bytes());
    for arg in command {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Where Redis is and how to log in, parsed from `redis://[user:pass@]host:port[/db]`.
#[derive(Debug, Clone)]
pub struct Target {
    addr: String,
    username: Option<String>,
    password: Option<String>,
    db: u32,
}

impl Target {
    pub fn parse(redis_url: &str) -> io::Result<Target> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad Redis URL ({why}); expected redis://[user:pass@]host:port[/db]"),
            )
        };
        let url = url::Url::parse(redis_url).map_err(|_| bad("not a URL"))?;
        if url.scheme() != "redis" {
            return Err(bad("scheme must be redis"));
        }
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        let port = url.port().unwrap_or(6379);
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            db => db.parse().map_err(|_| bad("database must be a number"))?,
        };
        let username = Some(url.username().to_owned()).filter(|u| !u.is_empty());
        Ok(Target {
            addr: format!("{host}:{port}"),
            username,
            password: url.password().map(str::to_owned),
            db,
        })
    }
}

/// A bounded pool: at most `max` connections exist; idle ones are reused.
/// A connection is returned only after a complete exchange, so one left in
/// the middle of a reply (an error, a cancelled request) is dropped instead.
pub struct Pool {
    target: Target,
    idle: Mutex<Vec<Conn>>,
    permits: std::sync::Arc<Semaphore>,
}

/// A connection checked out of the pool, with its permit.
pub struct Lease {
    pub conn: Conn,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(target: Target, max: usize) -> Pool {
        Pool {
            target,
            idle: Mutex::new(Vec::new()),
            permits: std::sync::Arc::new(Semaphore::new(max)),
        }
    }

    pub async fn get(&self) -> io::Result<Lease> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("pool closed"))?;
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match reused {
            Some(conn) => conn,
            None => Conn::connect(&self.target).await?,
        };
        Ok(Lease {
            conn,
            _permit: permit,
        })
    }

    /// Hands a connection back after a complete exchange.
    pub fn put(&self, lease: Lease) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(lease.conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = Vec::new();
        encode(&[b"SET".to_vec(), b"k".to_vec(), b"".to_vec()], &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_redis_urls() {
        let t = Target::parse("redis://:secret@127.0.0.1:6380/2").unwrap();
        assert_eq!(t.addr, "127.0.0.1:6380");
        assert_eq!(t.password.as_deref(), Some("secret"));
        assert_eq!(t.username, None);
        assert_eq!(t.db, 2);
        assert!(Target::parse("http://127.0.0.1").is_err());
        assert_eq!(
            Target::parse("redis://localhost").unwrap().addr,
            "localhost:6379"
        );
    }
}
