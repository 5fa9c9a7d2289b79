//! The HTTP listener from an attacker's side: slow headers, too many connections, oversized
//! and malformed requests, basic authentication, TLS, an address in use, and the reload
//! endpoint's answer. Every test runs the real `fieldmq` binary.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::gateway::{run_within, GatewayProcess};
use crate::util::http::{self, get, parse, read_until_closed, request, send_raw, Answer};
use crate::util::pki::{self, Pki};

/// A gateway with one simulated device and `[http]` made of `http_lines`.
fn start(dir: &Path, http_lines: &str) -> (GatewayProcess, SocketAddr) {
    let config = write_config(dir, http_lines);
    let gateway = GatewayProcess::start(&config);
    let addr = http::http_addr(&gateway);
    (gateway, addr)
}

fn write_config(dir: &Path, http_lines: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[gateway]
id = "web"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

[http]
{http_lines}

[[devices]]
name = "sim"
driver = "simulated"
poll = "200ms"
points = [ {{ name = "t", waveform = "constant", value = 1.0 }} ]
"#,
        data = dir.join("data").display()
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Authorization: Basic {}",
        BASE64.encode(format!("{user}:{password}"))
    )
}

#[test]
fn slow_headers_do_not_block_another_request_and_are_cut_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr) = start(
        dir.path(),
        "bind = \"127.0.0.1:0\"\nheader_timeout = \"1s\"",
    );
    let mut slow = TcpStream::connect(addr).expect("connect");
    let started = Instant::now();
    let dripper = std::thread::spawn(move || {
        // One byte every 100 ms: the whole head would take about 4 s.
        let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaa\r\n\r\n";
        for byte in head {
            if slow.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let answer = read_until_closed(&mut slow, Duration::from_secs(10));
        (started.elapsed(), answer)
    });
    std::thread::sleep(Duration::from_millis(300));
    let quick_started = Instant::now();
    let answer = get(addr, "/metrics", &[]);
    assert_eq!(answer.status, 200);
    assert!(
        quick_started.elapsed() < Duration::from_secs(1),
        "a normal request waited {:?} behind the slow one",
        quick_started.elapsed()
    );
    let (cut_after, slow_answer) = dripper.join().expect("slow client");
    let slow_answer = String::from_utf8_lossy(&slow_answer);
    assert!(
        !slow_answer.contains(" 200 "),
        "the slow client was served: {slow_answer:?}"
    );
    assert!(
        cut_after < Duration::from_millis(3500),
        "the slow client was cut only after {cut_after:?} (header_timeout 1s)"
    );
    gateway.terminate();
}

#[test]
fn an_idle_connection_is_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr) = start(
        dir.path(),
        "bind = \"127.0.0.1:0\"\nheader_timeout = \"1s\"",
    );
    let mut idle = TcpStream::connect(addr).expect("connect");
    let started = Instant::now();
    read_until_closed(&mut idle, Duration::from_secs(10));
    let closed_after = started.elapsed();
    assert!(
        closed_after < Duration::from_secs(3),
        "an idle connection stayed open {closed_after:?}"
    );
    gateway.terminate();
}

#[test]
fn connections_past_max_connections_are_closed_and_the_slots_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr) = start(
        dir.path(),
        "bind = \"127.0.0.1:0\"\nmax_connections = 2\nheader_timeout = \"10s\"",
    );
    let first = TcpStream::connect(addr).expect("connect");
    let second = TcpStream::connect(addr).expect("connect");
    // Let the listener accept both before the third arrives.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let refused = send_raw(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        refused.is_empty(),
        "a third connection was served: {:?}",
        String::from_utf8_lossy(&refused)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the third connection was held instead of closed"
    );
    drop(first);
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = send_raw(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if parse(&answer).is_some_and(|answer| answer.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot came back after the idle connections closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    gateway.terminate();
}

#[test]
fn oversized_headers_and_bodies_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr) = start(dir.path(), "bind = \"127.0.0.1:0\"");
    // 64 KiB of headers against a 16 KiB limit.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = send_raw(addr, huge.as_bytes());
    if let Some(answer) = parse(&answer) {
        assert_eq!(answer.status, 431, "oversized head: {}", answer.head);
    } // else: closed without an answer, also a refusal
      // A body announced larger than max_body_bytes is refused before it is read.
    let post = "POST /api/v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n";
    let answer = parse(&send_raw(addr, post.as_bytes())).expect("an answer");
    assert_eq!(answer.status, 413, "{}", answer.head);
    // The listener still serves.
    assert_eq!(get(addr, "/metrics", &[]).status, 200);
    gateway.terminate();
}

#[test]
fn garbage_gets_a_400_or_a_close_and_the_listener_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr) = start(dir.path(), "bind = \"127.0.0.1:0\"");
    let inputs: [&[u8]; 5] = [
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /m\xc3\xa9trics HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00", // an MQTT CONNECT
    ];
    for input in inputs {
        let answer = send_raw(addr, input);
        if let Some(answer) = parse(&answer) {
            assert!(
                answer.status == 400 || answer.status == 404 || answer.status == 505,
                "{:?} got {}",
                String::from_utf8_lossy(input),
                answer.head
            );
        }
    }
    assert_eq!(get(addr, "/metrics", &[]).status, 200);
    gateway.terminate();
}

#[test]
fn basic_auth_refuses_missing_and_wrong_passwords_and_accepts_the_right_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passwords = dir.path().join("passwd");
    std::fs::write(
        &passwords,
        format!(
            "{}\n{}\n",
            fieldmq::broker::hash_password("scraper", "s3cret"),
            fieldmq::broker::hash_password("jürgen", "pässwort"),
        ),
    )
    .expect("password file");
    let (mut gateway, addr) = start(
        dir.path(),
        &format!(
            "bind = \"127.0.0.1:0\"\npassword_file = \"{}\"",
            passwords.display()
        ),
    );
    let refused = |answer: Answer, what: &str| {
        assert_eq!(answer.status, 401, "{what}: {}", answer.head);
        let challenge = answer.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Basic realm="),
            "{what}: WWW-Authenticate {challenge:?}"
        );
    };
    refused(get(addr, "/metrics", &[]), "no credentials");
    refused(
        get(addr, "/metrics", &[&basic("scraper", "wrong")]),
        "wrong password",
    );
    refused(
        get(addr, "/metrics", &[&basic("nobody", "s3cret")]),
        "unknown user",
    );
    refused(
        request(addr, "POST", "/api/v1/reload", &[]),
        "reload without credentials",
    );
    refused(
        get(addr, "/metrics", &["Authorization: Basic %%%not-base64"]),
        "malformed header",
    );
    // Raw bytes that are not UTF-8 in the header value.
    let raw = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xfe\r\nConnection: close\r\n\r\n";
    let answer = parse(&send_raw(addr, raw)).expect("an answer");
    assert!(
        answer.status == 401 || answer.status == 400,
        "{}",
        answer.head
    );

    let ok = get(addr, "/metrics", &[&basic("scraper", "s3cret")]);
    assert_eq!(ok.status, 200, "{}", ok.head);
    assert!(ok.body.contains("fieldmq_build_info"));
    let non_ascii = get(addr, "/metrics", &[&basic("jürgen", "pässwort")]);
    assert_eq!(non_ascii.status, 200, "UTF-8 user name: {}", non_ascii.head);
    refused(
        get(addr, "/metrics", &[&basic("jürgen", "passwort")]),
        "UTF-8 user, wrong password",
    );
    gateway.terminate();
}

#[tokio::test]
async fn the_tls_listener_serves_its_certificate_and_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let (mut gateway, addr) = start(
        dir.path(),
        &format!(
            "bind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}",
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    );
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(None));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio::time::timeout(http::ANSWER_TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake: the certificate is signed by the test CA");
    let served = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first().cloned())
        .expect("a certificate");
    let expected = pki::certs(&std::fs::read_to_string(&pki.server_cert).expect("cert"));
    assert_eq!(served, expected[0], "the configured certificate is served");
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    tokio::time::timeout(http::ANSWER_TIMEOUT, tls.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .expect("read answer");
    let answer = parse(&answer).expect("an HTTP answer");
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("fieldmq_uptime_seconds"));
    // Plain HTTP on the TLS port gets no answer.
    let plain = send_raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(parse(&plain).is_none_or(|answer| answer.status != 200));
    gateway.terminate();
}

#[test]
fn an_http_address_in_use_stops_the_start_and_names_the_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config = write_config(dir.path(), &format!("bind = \"{addr}\""));
    let (code, _stdout, stderr) = run_within(
        &["run".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        Duration::from_secs(20),
    );
    assert_ne!(code, Some(0), "the gateway started on a taken address");
    assert!(
        stderr.contains(&addr.to_string()),
        "the error does not name {addr}: {stderr}"
    );
    drop(taken);
}

#[test]
fn post_reload_answers_with_the_report_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr) = start(dir.path(), "bind = \"127.0.0.1:0\"");
    let answer = request(addr, "POST", "/api/v1/reload", &[]);
    assert!(
        answer.status == 200 || answer.status == 422,
        "{}",
        answer.head
    );
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let report: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON report");
    let applied = report["applied"].as_bool().expect("applied");
    assert_eq!(applied, answer.status == 200, "{report}");
    assert!(report["errors"].is_array() && report["changes"].is_array());
    // Only POST.
    assert_eq!(get(addr, "/api/v1/reload", &[]).status, 405);
    gateway.terminate();
}
