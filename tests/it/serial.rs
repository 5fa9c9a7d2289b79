//! The serial driver against a device on the other end of a pty pair (no hardware): the
//! test holds the master side and plays the device, the driver opens the slave by path.
//! The embedded broker runs in-process; every wait is bounded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldmq::broker::config::BrokerConfig;
use fieldmq::broker::{self, BrokerHandle, InternalSubscribeOptions, InternalSubscription};
use fieldmq::drivers::config::DriverConfig;
use fieldmq::drivers::{self, DeviceContext};
use fieldmq::model::{Message, QoS};
use fieldmq::service::config;
use futures::StreamExt as _;
use serde_json::{json, Value as Json};
use tokio::io::AsyncWriteExt as _;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_serial::{SerialPort as _, SerialStream};
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers: a pty pair, the gateway (broker + one serial device), message matching.

/// One pty pair: the test writes and reads `master`; the driver opens `path`. The slave
/// fd is kept open so the pty lives until the test drops it.
struct Pty {
    master: SerialStream,
    _slave: SerialStream,
    path: String,
}

impl Pty {
    /// Wait (bounded) until no byte written to the master waits unread at the slave. The
    /// pty hands written bytes to the slave's input queue a moment later, on a kernel
    /// worker; polling the slave waits for that hand-over first (here the poll of a new
    /// epoll registration of the slave), so a byte just written counts as unread until the
    /// driver has taken it.
    async fn wait_until_read(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let slave = std::fs::File::open(&self.path).expect("open the slave");
            // SAFETY: the File owns its descriptor, which stays open and is not replaced
            // while registered (both are dropped together below).
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register(slave) }.expect("poll the slave");
            let unread = self
                ._slave
                .bytes_to_read()
                .expect("bytes waiting at the slave");
            drop(registered);
            if unread == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the driver left {unread} bytes unread for {WAIT:?}"
            );
            sleep(Duration::from_millis(1)).await;
        }
    }
}

fn pty() -> Pty {
    let (master, slave) = SerialStream::pair().expect("a pty pair");
    let path = slave.name().expect("the slave's path");
    Pty {
        master,
        _slave: slave,
        path,
    }
}

/// Points `link` at `target`, atomically (a new symlink renamed over the old one), the
/// way udev's /dev/serial/by-id links follow a replugged adapter.
fn relink(link: &Path, target: &str) {
    let staged = link.with_extension("new");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(target, &staged).expect("symlink");
    std::fs::rename(&staged, link).expect("rename symlink");
}

struct Gateway {
    handle: BrokerHandle,
    /// What the device records, as `GET /metrics` would show it.
    metrics: Arc<fieldmq::metrics::Metrics>,
    messages: InternalSubscription,
    shutdown: CancellationToken,
    device: JoinHandle<()>,
    status_topic: String,
}

/// Starts a broker and runs the one `[[devices]]` entry in `device` (gateway id `gw`).
async fn start(device: &str) -> Gateway {
    let text = format!(
        "[gateway]\nid = \"gw\"\n\n[broker]\nallow_anonymous = true\n\n[[devices]]\n{device}\n"
    );
    let config = config::parse(&text, Path::new("serial-test.toml"))
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    let running = broker::start(
        &BrokerConfig {
            listeners: vec![],
            allow_anonymous: true,
            ..BrokerConfig::default()
        },
        CancellationToken::new(),
    )
    .await
    .expect("broker starts");
    let handle = running.handle.clone();
    std::mem::forget(running); // lives as long as the test
    let messages = handle
        .subscribe(
            "test",
            vec![("#".to_owned(), QoS::AtLeastOnce)],
            InternalSubscribeOptions {
                capacity: 100_000,
                ..InternalSubscribeOptions::default()
            },
        )
        .await
        .expect("subscribe");
    let device = config.devices[0].clone();
    let metrics = Arc::new(fieldmq::metrics::Metrics::new());
    let context = DeviceContext::new(
        &config.gateway.id,
        &config.gateway.status_topic,
        &device,
        handle.clone(),
    )
    .with_metrics(metrics.device(&device.name), None);
    let status_topic = context.status_topic().to_owned();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(drivers::run_device(device, context, shutdown.clone()));
    Gateway {
        handle,
        metrics,
        messages,
        shutdown,
        device: task,
        status_topic,
    }
}

impl Gateway {
    /// The value of one of the device's series (`fieldmq_device_...{device="sensor"...}`).
    fn metric(&self, series: &str) -> f64 {
        let text = self
            .metrics
            .encode(fieldmq::metrics::Format::PrometheusText)
            .expect("encode");
        crate::util::http::metric_value(&text, series)
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }
}

fn json_of(message: &Message) -> Json {
    serde_json::from_slice(&message.payload)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&message.payload).into_owned()))
}

impl Gateway {
    /// The next message on `topic` whose JSON payload satisfies `check`; messages on
    /// other topics, or that fail the check, are skipped.
    async fn next_on(&mut self, topic: &str, check: impl Fn(&Json) -> bool) -> Json {
        let deadline = Instant::now() + WAIT;
        loop {
            let message = timeout(deadline - Instant::now(), self.messages.recv())
                .await
                .unwrap_or_else(|_| panic!("no matching message on {topic} within {WAIT:?}"))
                .expect("broker running");
            if &*message.topic == topic {
                let payload = json_of(&message);
                if check(&payload) {
                    return payload;
                }
            }
        }
    }

    /// The next status whose `status` is `status`.
    async fn status(&mut self, status: &str) -> Json {
        let topic = self.status_topic.clone();
        self.next_on(&topic, |p| p["status"] == status).await
    }

    /// Every message up to and including the first on `topic`, in order.
    async fn until(&mut self, topic: &str) -> Vec<Message> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let message = timeout(deadline - Instant::now(), self.messages.recv())
                .await
                .unwrap_or_else(|_| panic!("no message on {topic} within {WAIT:?}"))
                .expect("broker running");
            let done = &*message.topic == topic;
            seen.push(message);
            if done {
                return seen;
            }
        }
    }

    async fn command(&self, topic: &str, payload: &str) {
        self.handle
            .publish(Message::internal(
                "test-commander",
                topic,
                payload.to_owned(),
                QoS::AtLeastOnce,
                false,
            ))
            .await
            .expect("publish command");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(WAIT, self.device)
            .await
            .expect("the driver stops on shutdown")
            .expect("the driver did not panic");
    }
}

async fn send(master: &mut SerialStream, bytes: &[u8]) {
    timeout(WAIT, async {
        master.write_all(bytes).await.expect("write to pty");
        master.flush().await.expect("flush pty");
    })
    .await
    .expect("pty write in time");
}

const GGA: &str = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
const GGA_BAD_CHECKSUM: &str = "$GPGGA,123520,4807.099,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
const RMC: &str = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A";

fn gps_device(path: &str) -> String {
    format!(
        r#"name = "receiver"
driver = "serial"
port = "{path}"
baud = 4800
delimiter = "\r\n"
checksum = "nmea"
status_interval = "50ms"
parse = [
  {{ match = '^\$GPGGA,(?P<time>[^,]*),(?P<lat>[^,]*),(?P<ns>[NS]?),(?P<lon>[^,]*),(?P<ew>[EW]?),(?P<quality>\d*),(?P<satellites>\d*),(?P<hdop>[^,]*),(?P<altitude>[^,]*),M', topic = "gps/fix",
     fields = {{ lat = {{ type = "number" }}, lon = {{ type = "number" }}, quality = {{ type = "integer" }}, satellites = {{ type = "integer" }}, hdop = {{ type = "number" }}, altitude = {{ type = "number" }} }} }},
  {{ match = '^\$GPRMC,(?P<time>[^,]*),(?P<valid>[AV]),(?P<lat>[^,]*),(?P<ns>[NS]?),(?P<lon>[^,]*),(?P<ew>[EW]?),(?P<speed>[^,]*),(?P<course>[^,]*),(?P<date>\d*)', topic = "gps/rmc",
     fields = {{ lat = {{ type = "number" }}, lon = {{ type = "number" }}, speed = {{ type = "number", scale = 1.852 }}, course = {{ type = "number" }} }} }},
]
"#
    )
}

// ---------------------------------------------------------------------------------------
// Parsing, checksums, framing.

#[tokio::test]
async fn nmea_gga_and_rmc_sentences_become_fields_and_a_bad_checksum_is_dropped() {
    let mut pty = pty();
    let mut gateway = start(&gps_device(&pty.path)).await;
    gateway.status("online").await;

    let burst = format!("{GGA}\r\n{GGA_BAD_CHECKSUM}\r\n{RMC}\r\n");
    send(&mut pty.master, burst.as_bytes()).await;

    let seen = gateway.until("gw/receiver/gps/rmc").await;
    let fixes: Vec<Json> = seen
        .iter()
        .filter(|m| &*m.topic == "gw/receiver/gps/fix")
        .map(json_of)
        .collect();
    assert_eq!(fixes.len(), 1, "the bad checksum is dropped: {fixes:?}");
    let fix = &fixes[0];
    assert_eq!(fix["quality"], "good");
    assert_eq!(
        fix["value"],
        json!({
            "time": "123519", "lat": 4807.038, "ns": "N", "lon": 1131.0, "ew": "E",
            "quality": 1, "satellites": 8, "hdop": 0.9, "altitude": 545.4
        })
    );
    let rmc = json_of(seen.last().expect("rmc"));
    assert_eq!(rmc["value"]["valid"], "A");
    assert_eq!(rmc["value"]["date"], "230394");
    assert_eq!(rmc["value"]["course"], 84.4);
    // 22.4 knots in km/h.
    assert_eq!(rmc["value"]["speed"], 41.4848);

    let status = gateway
        .next_on(&gateway.status_topic.clone(), |s| {
            s["counters"]["bad_checksum"] == 1 && s["counters"]["frames"] == 3
        })
        .await;
    assert_eq!(status["status"], "online");
    // The bad checksum is a decode error; both rules' points read good.
    assert_eq!(
        gateway.metric(r#"fieldmq_device_errors_total{device="receiver",kind="decode"}"#),
        1.0
    );
    assert_eq!(
        gateway.metric(r#"fieldmq_device_points{device="receiver",quality="good"}"#),
        2.0
    );
    assert_eq!(status["counters"]["published"], 2);
    gateway.stop().await;
}

fn line_device(path: &str, extra: &str) -> String {
    format!(
        r#"name = "sensor"
driver = "serial"
port = "{path}"
baud = 9600
status_interval = "50ms"
{extra}
parse = [ {{ match = '^T=(?P<t>-?[0-9.]+)$', topic = "temperature", fields = {{ t = {{ type = "number" }} }} }} ]
"#
    )
}

#[tokio::test]
async fn frames_split_over_many_writes_and_several_frames_in_one_write_are_framed() {
    let mut pty = pty();
    let mut gateway = start(&line_device(&pty.path, r#"delimiter = "\r\n""#)).await;
    gateway.status("online").await;

    // One frame in single bytes, the delimiter itself split between writes, each written
    // only once the driver has read the one before: it sees every byte in a read of its own.
    for byte in b"T=1.5\r\n" {
        send(&mut pty.master, &[*byte]).await;
        pty.wait_until_read().await;
    }
    let first = gateway.next_on("gw/sensor/temperature", |_| true).await;
    assert_eq!(first["value"], json!({"t": 1.5}));

    // Three frames and the start of a fourth in one write, the rest in another.
    send(&mut pty.master, b"T=2\r\nT=3\r\nT=4\r\nT=").await;
    send(&mut pty.master, b"5\r\n").await;
    for expected in [2.0, 3.0, 4.0, 5.0] {
        let reading = gateway.next_on("gw/sensor/temperature", |_| true).await;
        assert_eq!(reading["value"]["t"], expected);
    }
    gateway.stop().await;
}

#[tokio::test]
async fn an_endless_stream_without_delimiter_is_discarded_and_the_reader_recovers() {
    let mut pty = pty();
    let mut gateway = start(&line_device(&pty.path, "max_frame = 64")).await;
    gateway.status("online").await;

    let chunk = vec![b'x'; 1024];
    for _ in 0..64 {
        send(&mut pty.master, &chunk).await;
    }
    send(&mut pty.master, b"\nT=7\n").await;
    let reading = gateway.next_on("gw/sensor/temperature", |_| true).await;
    assert_eq!(reading["value"]["t"], 7.0);
    let status = gateway
        .next_on(&gateway.status_topic.clone(), |s| {
            s["counters"]["published"] == 1
        })
        .await;
    assert_eq!(
        status["counters"]["overlong"], 1,
        "one over-long frame: {status}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn unmatched_frames_go_raw_to_the_unmatched_topic() {
    let mut pty = pty();
    let mut gateway = start(&line_device(&pty.path, r#"unmatched_topic = "raw""#)).await;
    gateway.status("online").await;
    send(&mut pty.master, b"hello there\nT=1\n").await;
    let raw = gateway.next_on("gw/sensor/raw", |_| true).await;
    assert_eq!(raw, json!("hello there"));
    gateway.next_on("gw/sensor/temperature", |_| true).await;
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// Request/response polling.

/// A line-based device: answers `READ` with `T=<value>` while `answer` says so, and
/// `SET <x>` with `OK <x>` (except `SET ignore`). Returns the lines it received.
fn fake_device(
    master: SerialStream,
    answer: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let (reader, mut writer) = tokio::io::split(master);
        let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(256));
        let mut received = Vec::new();
        while let Some(Ok(line)) = lines.next().await {
            let line = line.trim_end().to_owned();
            received.push(line.clone());
            let reply = if line == "READ" && *answer.borrow() {
                Some("T=21.5\r\n".to_owned())
            } else if let Some(value) = line.strip_prefix("SET ") {
                (value != "ignore").then(|| format!("OK {value}\r\n"))
            } else {
                None
            };
            if let Some(reply) = reply {
                if writer.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
                let _ = writer.flush().await;
            }
        }
        received
    })
}

#[tokio::test]
async fn polling_sends_the_request_and_publishes_the_response() {
    let pty = pty();
    let (_answer_tx, answer) = tokio::sync::watch::channel(true);
    let device = fake_device(pty.master, answer);
    let mut gateway = start(&line_device(
        &pty.path,
        "request = 'READ\\r\\n'\npoll = \"100ms\"\ntimeout = \"500ms\"\ndelimiter = \"\\r\\n\"",
    ))
    .await;
    for _ in 0..3 {
        let reading = gateway.next_on("gw/sensor/temperature", |_| true).await;
        assert_eq!(reading["value"]["t"], 21.5);
    }
    // Each request is a poll; each answer a timed request and a good point.
    assert!(gateway.metric(r#"fieldmq_device_polls_total{device="sensor"}"#) >= 3.0);
    assert!(
        gateway.metric(r#"fieldmq_device_request_duration_seconds_count{device="sensor"}"#) >= 3.0
    );
    assert_eq!(
        gateway.metric(r#"fieldmq_device_points{device="sensor",quality="good"}"#),
        1.0
    );
    assert_eq!(
        gateway.metric(r#"fieldmq_device_errors_total{device="sensor",kind="timeout"}"#),
        0.0
    );
    gateway.stop().await;
    drop(pty._slave);
    let received = timeout(WAIT, device)
        .await
        .expect("device ends")
        .expect("device task");
    assert!(received.len() >= 3, "{received:?}");
    assert!(received.iter().all(|l| l == "READ"), "{received:?}");
}

#[tokio::test]
async fn a_device_that_does_not_respond_goes_bad_with_the_reason_and_recovers() {
    let pty = pty();
    let (answer_tx, answer) = tokio::sync::watch::channel(false);
    let _device = fake_device(pty.master, answer);
    let mut gateway = start(&line_device(
        &pty.path,
        "request = 'READ\\r\\n'\npoll = \"100ms\"\ntimeout = \"200ms\"\ndelimiter = \"\\r\\n\"",
    ))
    .await;
    let status = gateway.status("error").await;
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no response to request \"READ\\r\\n\" within 200ms"),
        "{status}"
    );
    let bad = gateway
        .next_on("gw/sensor/temperature", |r| r["quality"] == "bad")
        .await;
    assert_eq!(bad["value"], Json::Null);
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no response"),
        "{bad}"
    );

    assert!(gateway.metric(r#"fieldmq_device_timeouts_total{device="sensor"}"#) >= 1.0);
    assert!(
        gateway.metric(r#"fieldmq_device_errors_total{device="sensor",kind="timeout"}"#) >= 1.0
    );
    assert_eq!(
        gateway.metric(r#"fieldmq_device_points{device="sensor",quality="bad"}"#),
        1.0
    );

    answer_tx.send(true).expect("device alive");
    gateway.status("online").await;
    let good = gateway
        .next_on("gw/sensor/temperature", |r| r["quality"] == "good")
        .await;
    assert_eq!(good["value"]["t"], 21.5);
    assert_eq!(
        gateway.metric(r#"fieldmq_device_points{device="sensor",quality="good"}"#),
        1.0
    );
    assert_eq!(
        gateway.metric(r#"fieldmq_device_points{device="sensor",quality="bad"}"#),
        0.0
    );
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// Write-back.

#[tokio::test]
async fn a_command_is_written_to_the_port_and_the_reply_is_the_result() {
    let pty = pty();
    let (_answer_tx, answer) = tokio::sync::watch::channel(false);
    let device = fake_device(pty.master, answer);
    let mut gateway = start(&line_device(
        &pty.path,
        "delimiter = \"\\r\\n\"\ntimeout = \"300ms\"\nwrite_template = 'SET {value}\\r\\n'\nreply_match = '^OK (?P<value>.+)$'",
    ))
    .await;
    gateway.status("online").await;

    // A read-only point and an unknown one are answered with the reason, and never
    // reach the port (see what the device received, below).
    for (point, reason) in [
        ("temperature", "point temperature is not writable"),
        ("nosuch", "device sensor has no point named \"nosuch\""),
    ] {
        let topic = format!("gw/sensor/{point}/set");
        gateway.command(&topic, "1").await;
        let result = gateway.next_on(&format!("{topic}/result"), |_| true).await;
        assert_eq!(result, json!({"status": "error", "reason": reason}));
    }

    gateway.command("gw/sensor/command/set", "42").await;
    let result = gateway
        .next_on("gw/sensor/command/set/result", |_| true)
        .await;
    assert_eq!(result, json!({"status": "ok", "value": "42"}));

    gateway
        .command("gw/sensor/command/set", r#"{"value": "ignore"}"#)
        .await;
    let result = gateway
        .next_on("gw/sensor/command/set/result", |_| true)
        .await;
    assert_eq!(result["status"], "error");
    assert!(
        result["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no reply matching"),
        "{result}"
    );

    gateway.stop().await;
    drop(pty._slave);
    let received = timeout(WAIT, device)
        .await
        .expect("device ends")
        .expect("device task");
    assert_eq!(received, vec!["SET 42", "SET ignore"]);
}

// ---------------------------------------------------------------------------------------
// Hot-plug.

fn hotplug_device(link: &Path) -> String {
    line_device(
        &link.display().to_string(),
        "backoff_min = \"20ms\"\nbackoff_max = \"100ms\"",
    )
}

#[tokio::test]
async fn a_port_that_goes_away_and_comes_back_is_reopened_and_data_flows_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link: PathBuf = dir.path().join("ttyTEST");
    let mut first = pty();
    relink(&link, &first.path);
    let mut gateway = start(&hotplug_device(&link)).await;
    gateway.status("online").await;
    send(&mut first.master, b"T=1\n").await;
    assert_eq!(
        gateway.next_on("gw/sensor/temperature", |_| true).await["value"]["t"],
        1.0
    );

    // Unplugged: both ends of the pty go away.
    drop(first);
    let offline = gateway.status("offline").await;
    assert!(offline["error"].as_str().is_some(), "{offline}");

    // Plugged back in: a new pty behind the same path.
    let mut second = pty();
    relink(&link, &second.path);
    let online = gateway.status("online").await;
    assert!(online["counters"]["opens"].as_u64() >= Some(2), "{online}");
    send(&mut second.master, b"T=2\n").await;
    assert_eq!(
        gateway.next_on("gw/sensor/temperature", |_| true).await["value"]["t"],
        2.0
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_port_missing_at_start_is_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link: PathBuf = dir.path().join("ttyLATE");
    let device = line_device(
        &link.display().to_string(),
        "backoff_min = \"20ms\"\nbackoff_max = \"100ms\"\nwrite_template = '{value}\\n'",
    );
    let mut gateway = start(&device).await;
    let offline = gateway.status("offline").await;
    assert!(
        offline["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot open"),
        "{offline}"
    );
    // A command while the port is missing is answered with the reason at once.
    gateway.command("gw/sensor/command/set", "1").await;
    let result = gateway
        .next_on("gw/sensor/command/set/result", |_| true)
        .await;
    assert_eq!(result["status"], "error");
    assert!(
        result["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("port offline: cannot open"),
        "{result}"
    );

    let mut late = pty();
    relink(&link, &late.path);
    gateway.status("online").await;
    send(&mut late.master, b"T=3\n").await;
    assert_eq!(
        gateway.next_on("gw/sensor/temperature", |_| true).await["value"]["t"],
        3.0
    );
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// Configuration.

#[test]
fn serial_config_errors_name_the_file_line_and_key_path() {
    let text = r#"[gateway]
id = "gw"

[[devices]]
name = "gps"
driver = "serial"
port = "/dev/ttyACM0"
parity = "evn"
delimiter = '\x0'
parse = [
  { match = '^\$GPGGA,(?P<lat>[^,]*)', topic = "gps/fix", fields = { lat = { type = "nubmer" }, lon = { type = "number" } } },
  { match = '(unclosed', topic = "x" },
]
"#;
    let error = config::parse(text, Path::new("site.toml"))
        .expect_err("invalid")
        .to_string();
    for expected in [
        "site.toml:8:10: devices[0].parity: unknown parity \"evn\"",
        "did you mean `even`?",
        "site.toml:9:13: devices[0].delimiter: `\\x` needs two hex digits",
        "devices[0].parse[0].fields.lat.type: unknown type \"nubmer\"",
        "did you mean `number`?",
        "devices[0].parse[0].fields.lon: the regex has no capture named \"lon\"",
        "site.toml:12:13: devices[0].parse[1].match: invalid regex",
    ] {
        assert!(
            error.contains(expected),
            "missing {expected:?} in:\n{error}"
        );
    }
}

#[test]
fn the_serial_examples_are_accepted() {
    for name in ["serial-gps.toml", "serial-line-sensor.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        let config = config::load(&path).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        assert!(
            config
                .devices
                .iter()
                .any(|d| matches!(d.driver, DriverConfig::Serial(_))),
            "{name} has a serial device"
        );
    }
}
