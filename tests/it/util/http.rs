//! A raw HTTP/1.1 client for the gateway's HTTP listener: requests written as bytes (so
//! tests can also send what no client library would), answers read until the server
//! closes, under a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::gateway::GatewayProcess;

/// How long a test waits for an answer.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP listener's address, from the gateway's "HTTP listener ready" log line (it comes
/// before "MQTT listener ready", so it is already there when the gateway has started).
pub(crate) fn http_addr(gateway: &GatewayProcess) -> SocketAddr {
    for line in gateway.log.try_iter() {
        if line.contains("HTTP listener ready") {
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            {
                return addr.parse().expect("HTTP listener address");
            }
        }
    }
    panic!("the gateway did not log \"HTTP listener ready\"");
}

/// An answer: status code, head (status line and headers) and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if present.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// Parse everything the server sent before closing.
pub(crate) fn parse(raw: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// Read until the server closes the connection (or `limit` passes): the bytes read.
pub(crate) fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return received;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buffer) {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return received,
            Err(_) => return received,
        }
    }
}

/// Send `raw` as is on a new connection and read the answer until the server closes.
pub(crate) fn send_raw(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    try_send_raw(addr, raw).expect("connect to the HTTP listener")
}

/// [`send_raw`], `None` when nothing listens at `addr` (yet).
pub(crate) fn try_send_raw(addr: SocketAddr, raw: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).ok()?;
    // The server may close before reading everything (a refused request): not an error.
    let _ = stream.write_all(raw);
    Some(read_until_closed(&mut stream, ANSWER_TIMEOUT))
}

/// `method path` with `headers` and `Connection: close`, and its parsed answer.
pub(crate) fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> Answer {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        raw.push_str(header);
        raw.push_str("\r\n");
    }
    if method == "POST" {
        raw.push_str("Content-Length: 0\r\n");
    }
    raw.push_str("\r\n");
    let answer = send_raw(addr, raw.as_bytes());
    parse(&answer).unwrap_or_else(|| {
        panic!(
            "no HTTP answer to {method} {path}: {:?}",
            String::from_utf8_lossy(&answer)
        )
    })
}

/// `GET path`.
pub(crate) fn get(addr: SocketAddr, path: &str, headers: &[&str]) -> Answer {
    request(addr, "GET", path, headers)
}

/// The value of the sample `series` (a metric name with its labels, as printed) in the
/// Prometheus text `body`, if it is there.
pub(crate) fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
