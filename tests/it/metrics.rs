//! `GET /metrics` read by the real Prometheus tools: `promtool check metrics` accepts the
//! output, and a Prometheus server scraping the gateway finds broker, uplink, device,
//! Modbus link and Modbus server series through its query API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::cloud::{mosquitto_available, Cloud, CloudOptions};
use crate::util::gateway::GatewayProcess;
use crate::util::http::{self, get, metric_value, request};
use crate::util::modbus::{BackgroundDevice, RegisterDevice};
use crate::util::mqtt::{Client, Version};
use crate::util::{free_port, skip};

const PROMETHEUS_INSTALL: &str = "apt-get install -y prometheus";

/// A gateway with a simulated device, a Modbus TCP device (`meter`, on a
/// test device that lives as long as the returned handle), a Modbus server and an uplink
/// to `cloud_port` (nothing need listen there), its HTTP listener on an ephemeral port.
fn start_gateway(dir: &Path, cloud_port: u16) -> (GatewayProcess, SocketAddr, BackgroundDevice) {
    let meter = BackgroundDevice::start(RegisterDevice::with(&[(0, 230)]));
    let text = format!(
        r#"
[gateway]
id = "metered"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

[http]
bind = "127.0.0.1:0"

[[devices]]
name = "sim"
driver = "simulated"
poll = "200ms"
points = [
  {{ name = "t", waveform = "sine", min = 0.0, max = 10.0, period = "10s" }},
  {{ name = "u", waveform = "constant", value = 1.0 }},
]

[[devices]]
name = "meter"
driver = "modbus-tcp"
address = "{meter}"
poll = "200ms"
points = [ {{ name = "v", table = "holding", address = 0 }} ]

[[modbus_servers]]
bind = "127.0.0.1:0"
map = [ {{ table = "holding", address = 0, device = "meter", point = "v" }} ]

[[uplinks]]
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
client_id = "metered-gw"
reconnect = {{ min = "200ms", max = "1s" }}
routes = [ {{ out = "metered/#", qos = 1 }} ]
"#,
        data = dir.join("data").display(),
        meter = meter.addr,
    );
    let config = dir.join("fieldmq.toml");
    std::fs::write(&config, text).expect("write config");
    let gateway = GatewayProcess::start(&config);
    let addr = http::http_addr(&gateway);
    (gateway, addr, meter)
}

#[test]
fn promtool_check_metrics_accepts_the_output() {
    let test = "metrics::promtool_check_metrics_accepts_the_output";
    let Some(promtool) = skip::tool_on_path(test, "promtool", PROMETHEUS_INSTALL) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr, meter) = start_gateway(dir.path(), free_port());
    // A socket in its MQTT handshake (nothing sent) shows on its listener.
    let _silent = std::net::TcpStream::connect(gateway.addr).expect("connect to MQTT");
    // Wait for a poll so that the device's histogram and gauges have samples.
    std::thread::sleep(Duration::from_millis(600));
    let answer = get(addr, "/metrics", &[]);
    let listener = format!("listener=\"mqtt://{}\"", gateway.addr);
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    for family in [
        "fieldmq_broker_clients_connected",
        "fieldmq_device_polls_total{device=\"sim\"}",
        "fieldmq_device_points{device=\"sim\",quality=\"good\"} 2",
        "fieldmq_uplink_connected{uplink=\"cloud\"}",
        "fieldmq_build_info{version=",
        "fieldmq_process_resident_memory_bytes",
        // The retained status messages were committed to the broker's store.
        "fieldmq_broker_store_commit_duration_seconds_bucket{le=\"+Inf\"}",
        // The Modbus link the meter is on, and the Modbus server.
        &format!(
            "fieldmq_bus_requests_total{{bus=\"{}\",transport=\"tcp\"}}",
            meter.addr
        ),
        "fieldmq_bus_errors_total{bus=",
        "fieldmq_bus_busy_seconds_total{bus=",
        "fieldmq_device_request_duration_seconds_count{device=\"meter\"}",
        "fieldmq_modbus_server_connections{server=\"modbus-server-0\"} 0",
        "fieldmq_modbus_server_connections_accepted_total{server=\"modbus-server-0\"}",
        "fieldmq_modbus_server_connections_refused_total{server=\"modbus-server-0\"}",
        "fieldmq_modbus_server_requests_total{server=\"modbus-server-0\",function=\"3\"}",
        "fieldmq_modbus_server_exceptions_total{server=\"modbus-server-0\",code=\"2\"}",
        "fieldmq_modbus_server_writes_total{server=\"modbus-server-0\",result=\"ok\"}",
    ] {
        assert!(
            answer.body.contains(family),
            "no {family} in:\n{}",
            answer.body
        );
    }
    for sample in [
        format!("fieldmq_broker_handshakes{{{listener}}} 1"),
        format!("fieldmq_broker_accepted_connections_total{{{listener}}} 1"),
        format!("fieldmq_broker_connections{{{listener}}} 0"),
    ] {
        assert!(
            answer.body.contains(&sample),
            "no {sample} in:\n{}",
            answer.body
        );
    }
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(answer.body.as_bytes())
        .expect("write metrics to promtool");
    let output = check.wait_with_output().expect("promtool result");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        answer.body
    );

    // Asked for OpenMetrics, the same registry in that format.
    let open = get(
        addr,
        "/metrics",
        &["Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"],
    );
    assert_eq!(
        open.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    gateway.terminate();
}

/// A Prometheus server on loopback scraping `target` every second, its data in `dir`.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(binary: &Path, dir: &Path, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: fieldmq\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, addr }
    }

    /// The query API's result for `query`, `None` while Prometheus is not answering.
    fn query(&self, query: &str) -> Option<serde_json::Value> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let raw = http::try_send_raw(
            self.addr,
            format!(
                "GET /api/v1/query?query={encoded} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.addr
            )
            .as_bytes(),
        )?;
        let answer = http::parse(&raw)?;
        // Prometheus may answer chunked: the JSON sits between the chunk sizes.
        let body = answer.body.trim();
        let json = body
            .find('{')
            .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))?;
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        Some(value["data"]["result"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_broker_uplink_and_device_series() {
    let test = "metrics::prometheus_scrapes_broker_uplink_and_device_series";
    let Some(prometheus) = skip::tool_on_path(test, "prometheus", PROMETHEUS_INSTALL) else {
        return;
    };
    if !mosquitto_available(test) {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr, _meter) = start_gateway(dir.path(), cloud.port);
    let server = Prometheus::start(&prometheus, dir.path(), addr);

    let wanted = [
        // The broker: the device's readings reach its router.
        "fieldmq_broker_messages_received_total > 0",
        // The uplink: connected to the Mosquitto cloud.
        "fieldmq_uplink_connected{uplink=\"cloud\"} == 1",
        // The device: polled.
        "fieldmq_device_polls_total{device=\"sim\"} > 0",
        // The Modbus device's link: requests that kept it busy, none failed.
        "fieldmq_bus_requests_total{transport=\"tcp\"} > 0",
        "fieldmq_bus_busy_seconds_total{transport=\"tcp\"} > 0",
        "fieldmq_bus_errors_total{transport=\"tcp\"} == 0",
        "fieldmq_device_request_duration_seconds_count{device=\"meter\"} > 0",
        // The Modbus server: no client yet.
        "fieldmq_modbus_server_connections{server=\"modbus-server-0\"} == 0",
        "fieldmq_modbus_server_requests_total{function=\"3\"} == 0",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<&str> = wanted.to_vec();
    while !missing.is_empty() {
        missing.retain(|query| {
            server
                .query(query)
                .and_then(|result| result.as_array().map(|series| series.is_empty()))
                .unwrap_or(true)
        });
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not find {missing:?} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Prometheus saw the target up, too.
    let up = server
        .query("up{job=\"fieldmq\"} == 1")
        .expect("Prometheus answers");
    assert_eq!(up.as_array().map(Vec::len), Some(1), "{up}");
    gateway.terminate();
}

/// A gateway with only its broker and HTTP listener (nothing else publishes at QoS 1 or 2).
fn start_broker_only(dir: &Path) -> (GatewayProcess, SocketAddr) {
    let text = format!(
        "[gateway]\nid = \"counted\"\ndata_dir = \"{}\"\n\n[broker]\nallow_anonymous = true\n\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"127.0.0.1:0\"\n",
        dir.join("data").display()
    );
    let config = dir.join("fieldmq.toml");
    std::fs::write(&config, text).expect("write config");
    let gateway = GatewayProcess::start(&config);
    let addr = http::http_addr(&gateway);
    (gateway, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_payload_bytes_are_counted_by_qos_each_way() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr) = start_broker_only(dir.path());
    let mut subscriber = Client::connect(Version::V311, gateway.addr, "counted-sub").await;
    subscriber.subscribe("q/#", 2).await;
    let mut publisher = Client::connect(Version::V311, gateway.addr, "counted-pub").await;
    let series = [
        "fieldmq_broker_messages_received_total{qos=\"1\"}",
        "fieldmq_broker_messages_received_total{qos=\"2\"}",
        "fieldmq_broker_messages_sent_total{qos=\"1\"}",
        "fieldmq_broker_messages_sent_total{qos=\"2\"}",
        "fieldmq_broker_payload_received_bytes_total{qos=\"1\"}",
        "fieldmq_broker_payload_received_bytes_total{qos=\"2\"}",
        "fieldmq_broker_payload_sent_bytes_total{qos=\"1\"}",
        "fieldmq_broker_payload_sent_bytes_total{qos=\"2\"}",
    ];
    let read = || {
        let body = get(addr, "/metrics", &[]).body;
        series.map(|s| metric_value(&body, s).unwrap_or_else(|| panic!("no {s} in:\n{body}")))
    };
    let before = read();
    publisher.publish("q/one", 1, false, &[b'x'; 10]).await;
    publisher.publish("q/two", 2, false, &[b'y'; 20]).await;
    // Subscribed at QoS 2: each message goes out at the QoS it came in with.
    for _ in 0..2 {
        subscriber.recv().await;
    }
    let after = read();
    let delta: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(
        delta,
        [1.0, 1.0, 1.0, 1.0, 10.0, 20.0, 10.0, 20.0],
        "received 1/2, sent 1/2, payload bytes received 1/2, sent 1/2"
    );
    gateway.terminate();
}

#[test]
fn a_reload_takes_removed_devices_their_link_the_modbus_server_and_the_uplink_off_the_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gateway, addr, _meter) = start_gateway(dir.path(), free_port());
    // A second device, to be removed.
    let config = dir.path().join("fieldmq.toml");
    let text = std::fs::read_to_string(&config).expect("read config");
    let with_gone = text.replacen(
        "[[uplinks]]",
        "[[devices]]\nname = \"gone\"\ndriver = \"simulated\"\npoll = \"200ms\"\n\
         points = [ { name = \"v\", waveform = \"constant\", value = 2.0 } ]\n\n[[uplinks]]",
        1,
    );
    std::fs::write(&config, &with_gone).expect("write config");
    assert_eq!(request(addr, "POST", "/api/v1/reload", &[]).status, 200);
    let polls = |device: &str| format!("fieldmq_device_polls_total{{device=\"{device}\"}}");
    let uplink = "fieldmq_uplink_connected{uplink=\"cloud\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = get(addr, "/metrics", &[]).body;
        if metric_value(&body, &polls("gone")).is_some_and(|n| n > 0.0) {
            assert!(metric_value(&body, uplink).is_some(), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "device gone never polled:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Without the second device, the Modbus device (its link), the server and the uplink.
    let meter = "[[devices]]\nname = \"meter\"";
    let without = text[..text.find(meter).expect("meter section")].to_owned();
    std::fs::write(&config, without).expect("write config");
    assert_eq!(request(addr, "POST", "/api/v1/reload", &[]).status, 200);
    let body = get(addr, "/metrics", &[]).body;
    assert!(!body.contains("device=\"gone\""), "{body}");
    assert!(!body.contains("device=\"meter\""), "{body}");
    assert!(!body.contains("uplink=\"cloud\""), "{body}");
    assert!(!body.contains("fieldmq_bus_requests_total{"), "{body}");
    assert!(!body.contains("server=\"modbus-server-0\""), "{body}");
    assert!(metric_value(&body, &polls("sim")).is_some(), "{body}");
    gateway.terminate();
}
