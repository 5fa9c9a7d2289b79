//! Writes and points tell the truth, with the real binary and real MQTT 5 clients: every
//! `/set` gets a `/set/result` (an error with a reason for an unknown or read-only point,
//! or a value that does not fit, and a warning in the log), readings carry their unit
//! and content type, and every device's retained status is `offline` after a clean stop.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use crate::util::gateway::GatewayProcess;
use crate::util::v5::{json, properties, Client};

/// Where the gateway of these tests says how it is.
const STATUS: &str = "fieldmq/gw/status";

/// A gateway with two simulated devices: `sim` (JSON, a unit on `temperature`, writable
/// points of each type) and `plain` (the plain format); without them, a gateway on the
/// same data directory whose own status goes to another topic.
fn write_config(dir: &Path, devices: bool) -> PathBuf {
    let status = if devices {
        STATUS
    } else {
        "fieldmq/other/status"
    };
    let mut text = format!(
        "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\nstatus_topic = \"{status}\"\n\
         [broker]\nallow_anonymous = true\n[[broker.listeners]]\nbind = \"127.0.0.1:0\"\n",
        dir.join("data").display()
    );
    if devices {
        text.push_str(
            r#"
[[devices]]
name = "sim"
driver = "simulated"
poll = "100ms"
points = [
  { name = "temperature", waveform = "sine", min = 18.0, max = 24.0, period = "60s", unit = "°C" },
  { name = "setpoint", waveform = "constant", value = 21.5, writable = true, unit = "°C" },
  { name = "count", waveform = "constant", value = 3, writable = true },
  { name = "pump", waveform = "constant", value = false, writable = true },
]

[[devices]]
name = "plain"
driver = "simulated"
payload = "plain"
poll = "100ms"
points = [ { name = "level", waveform = "ramp", min = 0.0, max = 100.0, unit = "%" } ]
"#,
        );
    }
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_write_gets_an_error_result_and_a_valid_one_changes_the_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = GatewayProcess::start(&write_config(dir.path(), true));
    let mut client = Client::connect(gateway.addr, "writer", &["gw/sim/#"]).await;
    // A reading means the device runs (and has subscribed to its writes).
    client.next_on("gw/sim/temperature", |_| true).await;

    let oversized = vec![b'1'; 2000];
    let cases: Vec<(&str, Bytes, &str)> = vec![
        (
            "gw/sim/nosuch",
            Bytes::from_static(b"1"),
            "no point named \"nosuch\"",
        ),
        (
            "gw/sim/temperature",
            Bytes::from_static(b"20"),
            "point temperature is not writable",
        ),
        (
            "gw/sim/setpoint",
            Bytes::from_static(b"not json"),
            "expected a number",
        ),
        (
            "gw/sim/setpoint",
            Bytes::from_static(b"\"warm\""),
            "expected a number",
        ),
        (
            "gw/sim/setpoint",
            Bytes::from_static(b"true"),
            "expected a number",
        ),
        (
            "gw/sim/setpoint",
            Bytes::from_static(&[0xff, 0xfe, 0x31]),
            "not UTF-8",
        ),
        (
            "gw/sim/setpoint",
            Bytes::from(oversized),
            "larger than the limit of 1024 bytes",
        ),
        (
            "gw/sim/setpoint",
            Bytes::from_static(b""),
            "empty write payload",
        ),
        (
            "gw/sim/setpoint",
            Bytes::from_static(b"{\"v\": 3}"),
            "needs a \"value\" field",
        ),
        (
            "gw/sim/count",
            Bytes::from_static(b"2.5"),
            "expected an integer",
        ),
        (
            "gw/sim/pump",
            Bytes::from_static(b"maybe"),
            "expected true/false",
        ),
        (
            "gw/sim/pump",
            Bytes::from_static("héllo wörld".as_bytes()),
            "expected true/false",
        ),
    ];
    for (topic, payload, reason) in cases {
        let shown = String::from_utf8_lossy(&payload[..payload.len().min(20)]).into_owned();
        let result = client.write(topic, payload).await;
        assert_eq!(result["status"], "error", "{topic} {shown:?}: {result}");
        let got = result["reason"].as_str().expect("a reason");
        assert!(got.contains(reason), "{topic} {shown:?}: {got}");
    }

    // Nothing refused changed a point: the setpoint still reads its configured value.
    let reading = client.next_on("gw/sim/setpoint", |_| true).await;
    assert_eq!(json(&reading)["value"], 21.5);

    // Valid writes answer ok with the value the point now holds.
    assert_eq!(
        client.write("gw/sim/setpoint", "42.5").await,
        json!({"status": "ok", "value": 42.5})
    );
    client
        .next_on("gw/sim/setpoint", |p| json(p)["value"] == 42.5)
        .await;
    assert_eq!(
        client.write("gw/sim/count", "7").await,
        json!({"status": "ok", "value": 7})
    );
    assert_eq!(
        client.write("gw/sim/pump", "on").await,
        json!({"status": "ok", "value": true})
    );
    client
        .next_on("gw/sim/pump", |p| json(p)["value"] == true)
        .await;

    // The refusals were logged with the device, the point and the reason.
    let log: Vec<String> = gateway.log.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("WARN")
            && l.contains("write refused")
            && l.contains("sim")
            && l.contains("temperature")
            && l.contains("not writable")),
        "{log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_carry_their_unit_content_type_and_utf8_payload_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = GatewayProcess::start(&write_config(dir.path(), true));
    let mut client = Client::connect(gateway.addr, "units", &["gw/#"]).await;

    let reading = client.next_on("gw/sim/temperature", |_| true).await;
    assert_eq!(json(&reading)["unit"], "°C");
    let p = properties(&reading);
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(
        p.user_properties,
        vec![("unit".to_owned(), "°C".to_owned())]
    );

    // A point without a unit: no unit anywhere, the same content type.
    let count = client.next_on("gw/sim/count", |_| true).await;
    assert_eq!(json(&count).get("unit"), None);
    let p = properties(&count);
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert!(p.user_properties.is_empty(), "{:?}", p.user_properties);

    // Plain: the bare value, marked as UTF-8 text, the unit as a user property only.
    let level = client.next_on("gw/plain/level", |_| true).await;
    let text = std::str::from_utf8(&level.payload).expect("UTF-8");
    assert!(text.parse::<f64>().is_ok(), "a bare number: {text:?}");
    let p = properties(&level);
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("text/plain; charset=utf-8"));
    assert_eq!(p.user_properties, vec![("unit".to_owned(), "%".to_owned())]);

    // A write result is JSON too.
    client
        .client
        .publish("gw/sim/setpoint/set", QoS::AtLeastOnce, false, "20")
        .await
        .expect("publish");
    let result = client.next_on("gw/sim/setpoint/set/result", |_| true).await;
    assert_eq!(
        properties(&result).content_type.as_deref(),
        Some("application/json")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_stop_every_retained_status_says_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewayProcess::start(&write_config(dir.path(), true));
    let devices = [
        format!("{STATUS}/devices/sim"),
        format!("{STATUS}/devices/plain"),
    ];
    {
        let mut client = Client::connect(gateway.addr, "before", &[&format!("{STATUS}/#")]).await;
        for topic in &devices {
            let online = client
                .next_on(topic, |p| json(p)["status"] == "online")
                .await;
            assert_eq!(json(&online)["status"], "online");
        }
    }
    assert!(gateway.terminate().success());

    // The same broker store, and nothing that publishes on these topics any more: what a
    // subscriber gets now is what the stop left retained.
    let gateway = GatewayProcess::start(&write_config(dir.path(), false));
    let mut client = Client::connect(gateway.addr, "after", &[&format!("{STATUS}/#")]).await;
    for topic in &devices {
        let retained = client.next_on(topic, |_| true).await;
        assert!(retained.retain, "{topic} is retained");
        let body = json(&retained);
        assert_eq!(body["status"], "offline", "{topic}: {body}");
        assert_eq!(body["error"], "gateway stopped", "{topic}: {body}");
    }
    let gateway_status = client.next_on(STATUS, |_| true).await;
    assert!(gateway_status.retain);
    assert_eq!(&gateway_status.payload[..], b"offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_level_write_over_mqtt5_answers_its_response_topic_and_ok_means_the_device_holds_it(
) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    let state = crate::modbus::device_with(&[]);
    let (modbus, _server) =
        crate::modbus::serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fieldmq.toml");
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
id = "gw"
data_dir = "{}"
status_topic = "{STATUS}"
[broker]
allow_anonymous = true
[[broker.listeners]]
bind = "127.0.0.1:0"

[[devices]]
name = "plc"
driver = "modbus-tcp"
address = "{modbus}"
poll = "200ms"
points = [
  {{ name = "setpoint", table = "holding", address = 10, type = "u16", writable = true }},
  {{ name = "flow", table = "holding", address = 11, type = "f32", writable = true }},
  {{ name = "pump", table = "coil", address = 0, writable = true }},
]
"#,
            dir.path().join("data").display()
        ),
    )
    .expect("write config");
    let mut gateway = GatewayProcess::start(&config);
    let mut client = Client::connect(gateway.addr, "writer", &["gw/plc/#", "replies/#"]).await;
    // A reading means the device runs (and has subscribed to its writes).
    client.next_on("gw/plc/pump", |_| true).await;

    let request = PublishProperties {
        response_topic: Some("replies/writer".into()),
        correlation_data: Some(Bytes::from_static(b"\x00cmd-7")),
        ..PublishProperties::default()
    };
    client
        .client
        .publish_with_properties(
            "gw/plc/set",
            QoS::AtLeastOnce,
            false,
            r#"{"setpoint": 1234, "flow": 2.5, "pump": true}"#,
            request,
        )
        .await
        .expect("publish");
    let reply = client.next_on("replies/writer", |_| true).await;
    let expected = json!({"status": "ok", "points": {
        "setpoint": {"status": "ok", "value": 1234},
        "flow": {"status": "ok", "value": 2.5},
        "pump": {"status": "ok", "value": true},
    }});
    assert_eq!(json(&reply), expected);
    assert_eq!(
        properties(&reply).correlation_data,
        Some(Bytes::from_static(b"\x00cmd-7"))
    );
    let result = client.next_on("gw/plc/set/result", |_| true).await;
    assert_eq!(json(&result), expected);

    // "ok" is a promise about the device, not about the gateway: killed at once, the
    // gateway leaves the device holding every value it reported written.
    gateway.kill9();
    let s = state.lock().unwrap();
    assert_eq!(
        (
            s.holding.get(&10),
            s.holding.get(&11),
            s.holding.get(&12),
            s.coils.get(&0)
        ),
        (Some(&1234), Some(&0x4020), Some(&0), Some(&true))
    );
    // Registers in one FC16, the coil in its own FC05.
    let functions: Vec<(u8, u16)> = s.write_log.iter().map(|(f, a, _)| (*f, *a)).collect();
    assert_eq!(functions, vec![(5, 0), (16, 10)]);
}
