//! Just enough HTTP/1.1 for the benchmark: write a prepared request, read
//! one response framed by `Content-Length`. Hand-written so the client's own
//! cost is small and visible; the functions always send `Content-Length`
//! (the platform adapter buffers complete bodies), and a chunked or
//! unframed response is reported as an error rather than guessed at.

use std::io::{self, Read as _, Write as _};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Headers larger than this mean something is wrong.
const MAX_HEAD: usize = 64 * 1024;

/// A parsed response head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes up to and including the blank line.
    pub head_len: usize,
    pub body_len: usize,
}

/// A response: its status, and its body when asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Empty unless the exchange kept bodies.
    pub body: Vec<u8>,
}

/// A `GET` request on a keep-alive connection.
pub fn get_request(path: &str, bearer: Option<&str>) -> Vec<u8> {
    request("GET", path, bearer, &[])
}

/// A request without a body (`Content-Length: 0` on anything but `GET`) on
/// a keep-alive connection, with extra headers.
pub fn request(
    method: &str,
    path: &str,
    bearer: Option<&str>,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(token) = bearer {
        text.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        text.push_str("Content-Length: 0\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Parses a response head from the start of `buf`; `Ok(None)` until the
/// blank line has arrived.
pub fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(invalid("response head too large"));
        }
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&buf[..end]).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| {
            l.strip_prefix("HTTP/1.1 ")
                .or_else(|| l.strip_prefix("HTTP/1.0 "))
        })
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut body_len = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            body_len = Some(
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "chunked response: this harness expects Content-Length",
            ));
        }
    }
    // Statuses without a body need no length.
    let body_len = match (body_len, status) {
        (Some(n), _) => n,
        (None, 100..=199 | 204 | 304) => 0,
        (None, _) => return Err(invalid("response without Content-Length")),
    };
    Ok(Some(Head {
        status,
        head_len: end + 4,
        body_len,
    }))
}

/// Removes one complete response from the front of `buf`, if there is one;
/// copies its body out only if `keep_body` (the warm load never does).
fn take_response(buf: &mut Vec<u8>, keep_body: bool) -> io::Result<Option<Response>> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let total = head.head_len + head.body_len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = if keep_body {
        buf[head.head_len..total].to_vec()
    } else {
        Vec::new()
    };
    buf.drain(..total);
    Ok(Some(Response {
        status: head.status,
        body,
    }))
}

/// One request and its response on a blocking stream (cold-start probes).
pub fn exchange_blocking(stream: &mut std::net::TcpStream, request: &[u8]) -> io::Result<u16> {
    stream.write_all(request)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(response) = take_response(&mut buf, false)? {
            return Ok(response.status);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One request and its response's status on a keep-alive async stream;
/// `buf` carries over between calls (it is empty between responses, since
/// we never pipeline).
pub async fn exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<u16> {
    Ok(exchange_response(stream, request, buf, false).await?.status)
}

/// [`exchange`], returning the response with its body if `keep_body`.
pub async fn exchange_response(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
    keep_body: bool,
) -> io::Result<Response> {
    stream.write_all(request).await?;
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(response) = take_response(buf, keep_body)? {
            return Ok(response);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_head_and_frames_the_body() {
        let mut buf =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 4"
                .to_vec();
        let head = parse_head(&buf).expect("valid").expect("complete");
        assert_eq!(head.status, 200);
        assert_eq!(head.body_len, 2);
        let response = take_response(&mut buf, true)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            (response.status, response.body.as_slice()),
            (200, &b"{}"[..])
        );
        // The start of the next response stays in the buffer.
        assert_eq!(buf, b"HTTP/1.1 4");
        assert_eq!(take_response(&mut buf, true).expect("valid"), None);
    }

    #[test]
    fn waits_for_the_whole_body() {
        let mut buf = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 10\r\n\r\n12345".to_vec();
        assert_eq!(take_response(&mut buf, false).expect("valid"), None);
        buf.extend_from_slice(b"67890");
        let response = take_response(&mut buf, false)
            .expect("valid")
            .expect("complete");
        // Without keep_body the body is consumed, not copied.
        assert_eq!((response.status, response.body.len()), (401, 0));
        assert!(buf.is_empty());
    }

    #[test]
    fn requests_without_a_body_are_framed() {
        assert_eq!(
            request("POST", "/x", Some("t"), &[("Idempotency-Key", "k")]),
            b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t\r\n\
              Idempotency-Key: k\r\nContent-Length: 0\r\n\r\n"
                .to_vec()
        );
        assert_eq!(
            get_request("/y", None),
            b"GET /y HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn refuses_what_it_cannot_frame() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
                .expect("valid")
                .map(|h| h.body_len),
            Some(0)
        );
    }
}
