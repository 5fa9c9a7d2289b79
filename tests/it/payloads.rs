//! Payload formats with the real binary: an `influx` reading parsed by an independent
//! line-protocol parser, a template's JSON with its content type, and template mistakes
//! refused by `fieldmq check` at their line and key.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use influxdb_line_protocol::{parse_lines, FieldValue};

use crate::util::cloud::{mosquitto_available, Cloud, CloudOptions};
use crate::util::gateway::{self, GatewayProcess};
use crate::util::v5::{json, properties, Client};

fn write_config(dir: &Path, devices: &str) -> PathBuf {
    let text = format!(
        "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[broker]\nallow_anonymous = true\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n{devices}",
        dir.join("data").display()
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_influx_reading_parses_as_line_protocol_with_its_tags_and_types() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        r#"
[[devices]]
name = "boiler-1"
driver = "simulated"
payload = "influx"
poll = "100ms"
points = [
  { name = "temperature", waveform = "sine", min = 18.0, max = 24.0, period = "60s", unit = "°C" },
  { name = "starts", waveform = "constant", value = 42 },
  { name = "pump", waveform = "constant", value = true },
  { name = "mode", waveform = "constant", value = "auto \"eco\", night" },
]
"#,
    );
    let gateway = GatewayProcess::start(&config);
    let mut client = Client::connect(gateway.addr, "influx", &["gw/#"]).await;

    let started = now_ns();
    let reading = client.next_on("gw/boiler-1/temperature", |_| true).await;
    let text = std::str::from_utf8(&reading.payload).expect("UTF-8");
    let lines: Vec<_> = parse_lines(text)
        .collect::<Result<_, _>>()
        .expect("line protocol");
    assert_eq!(lines.len(), 1, "{text}");
    let line = &lines[0];
    assert_eq!(line.series.measurement.as_str(), "boiler-1", "{text}");
    let tags: Vec<(String, String)> = line
        .series
        .tag_set
        .iter()
        .flatten()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(tags.contains(&("gateway".into(), "gw".into())), "{tags:?}");
    assert!(
        tags.contains(&("point".into(), "temperature".into())),
        "{tags:?}"
    );
    assert!(tags.contains(&("unit".into(), "°C".into())), "{tags:?}");
    let value = line
        .field_set
        .iter()
        .find(|(k, _)| k.as_str() == "value")
        .map(|(_, v)| v.clone());
    match value {
        Some(FieldValue::F64(x)) => assert!((18.0..=24.0).contains(&x), "{x}"),
        other => panic!("a float value field, got {other:?} in {text}"),
    }
    let ts = line.timestamp.expect("a timestamp");
    assert!(
        (started - 60_000_000_000..now_ns() + 1_000_000_000).contains(&ts),
        "{ts}"
    );
    assert_eq!(
        properties(&reading).content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );

    let field = |publish: &rumqttc::v5::mqttbytes::v5::Publish| {
        let text = std::str::from_utf8(&publish.payload)
            .expect("UTF-8")
            .to_owned();
        let line = parse_lines(&text)
            .next()
            .expect("one line")
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        let value = line
            .field_set
            .iter()
            .find(|(k, _)| k.as_str() == "value")
            .map(|(_, v)| v.clone());
        match value {
            Some(FieldValue::I64(i)) => format!("integer {i}"),
            Some(FieldValue::Boolean(b)) => format!("boolean {b}"),
            Some(FieldValue::String(s)) => format!("string {s}"),
            other => format!("{other:?}"),
        }
    };
    let starts = client.next_on("gw/boiler-1/starts", |_| true).await;
    assert_eq!(field(&starts), "integer 42");
    let pump = client.next_on("gw/boiler-1/pump", |_| true).await;
    assert_eq!(field(&pump), "boolean true");
    let mode = client.next_on("gw/boiler-1/mode", |_| true).await;
    assert_eq!(field(&mode), r#"string auto "eco", night"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_payload_has_the_shape_and_content_type_it_asks_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        r#"
[[devices]]
name = "meter"
driver = "simulated"
poll = "100ms"
payload = { template = '{"v": {{ value|round(2) }}, "t": {{ ts_ms }}, "u": "{{ unit|default("") }}", "id": "{{ gateway }}.{{ device }}.{{ point }}", "ok": {{ "true" if quality == "good" else "false" }}}', content_type = "application/json" }
points = [ { name = "power", waveform = "ramp", min = 0.0, max = 1000.0, period = "60s", unit = "W" } ]
"#,
    );
    let gateway = GatewayProcess::start(&config);
    let mut client = Client::connect(gateway.addr, "template", &["gw/#"]).await;
    let reading = client.next_on("gw/meter/power", |_| true).await;
    let body = json(&reading);
    assert_eq!(body["u"], "W", "{body}");
    assert_eq!(body["id"], "gw.meter.power", "{body}");
    assert_eq!(body["ok"], true, "{body}");
    let v = body["v"].as_f64().expect("a number");
    assert!((0.0..=1000.0).contains(&v), "{body}");
    assert_eq!(
        (v * 100.0).round() / 100.0,
        v,
        "rounded to 2 places: {body}"
    );
    let t = body["t"].as_i64().expect("milliseconds");
    let now_ms = now_ns() / 1_000_000;
    assert!(
        (now_ms - 60_000..=now_ms + 1_000).contains(&t),
        "{t} vs {now_ms}"
    );
    let p = properties(&reading);
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.user_properties, vec![("unit".to_owned(), "W".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_route_reshapes_payloads_for_the_cloud_and_keeps_others_as_they_are() {
    if !mosquitto_available("route_template") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[[devices]]
name = "meter"
driver = "simulated"
topic = "plant/{{device}}/{{point}}"
poll = "100ms"
points = [ {{ name = "voltage", waveform = "constant", value = 230.5, unit = "V" }} ]

[[uplinks]]
name = "cloud"
url = "mqtt://127.0.0.1:{port}"
reconnect = {{ min = "200ms", max = "1s" }}
routes = [
  {{ out = "plant/#", remote_prefix = "shaped/", payload = {{ template = '{{"id": "{{{{ gateway }}}}:{{{{ topic }}}}", "v": {{{{ value }}}}, "t": {{{{ ts_ms }}}}, "u": "{{{{ unit }}}}"}}', content_type = "application/json" }} }},
  {{ out = "raw/#", remote_prefix = "raw/" }},
]
"#,
            port = cloud.port
        ),
    );
    let gateway = GatewayProcess::start(&config);
    let mut cloud_client =
        Client::connect(cloud.addr(), "cloud-side", &["shaped/#", "raw/#"]).await;
    let shaped = cloud_client.next_on("shaped/meter/voltage", |_| true).await;
    let body = json(&shaped);
    assert_eq!(body["id"], "gw:plant/meter/voltage", "{body}");
    assert_eq!(body["v"], 230.5, "{body}");
    assert_eq!(body["u"], "V", "{body}");
    let t = body["t"].as_i64().expect("milliseconds");
    let now_ms = now_ns() / 1_000_000;
    assert!((now_ms - 60_000..=now_ms + 1_000).contains(&t), "{t}");
    let p = properties(&shaped);
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.payload_format_indicator, Some(1));

    // A route without a template forwards the payload unchanged (published once the
    // shaped reading shows the uplink runs).
    let mut local = Client::connect(gateway.addr, "local", &[]).await;
    local
        .client
        .publish(
            "raw/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "not JSON ✓",
        )
        .await
        .expect("publish");
    // rumqttc sends when its event loop is polled.
    local.drain(Duration::from_millis(300)).await;

    let raw = cloud_client.next_on("raw/x", |_| true).await;
    assert_eq!(&raw.payload[..], "not JSON ✓".as_bytes());
}

#[test]
fn a_route_template_is_checked_and_belongs_to_out_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (route, key, message) in [
        (
            "{ out = \"a/#\", payload = { template = '{{ device }}' } }",
            "uplinks[0].routes[0].payload.template",
            "undefined",
        ),
        (
            "{ in = \"a/#\", payload = { template = '{{ value }}' } }",
            "uplinks[0].routes[0].payload",
            "belongs to `out` routes",
        ),
    ] {
        let config = write_config(
            dir.path(),
            &format!(
                "[[uplinks]]\nname = \"c\"\nurl = \"mqtt://127.0.0.1:1\"\nroutes = [ {route} ]\n"
            ),
        );
        let (code, stderr) = check(&config);
        assert_eq!(code, Some(2), "{stderr}");
        let at = format!("{}:11:", config.display());
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&at) && l.contains(key) && l.contains(message)),
            "expected {at} {key}: ...{message}... in:\n{stderr}"
        );
    }
}

/// `fieldmq check -c FILE`: (exit code, stderr).
fn check(config: &Path) -> (Option<i32>, String) {
    let (code, _stdout, stderr) = gateway::run_within(
        &[OsStr::new("check"), OsStr::new("-c"), config.as_os_str()],
        &[],
        Duration::from_secs(20),
    );
    (code, stderr)
}

/// The `payload` key is on line 11 (`write_config` writes seven lines before the device).
fn device_with_payload(payload: &str) -> String {
    format!(
        "[[devices]]\nname = \"d\"\ndriver = \"simulated\"\npayload = {payload}\n\
         points = [ {{ name = \"p\", waveform = \"constant\", value = 1 }} ]\n"
    )
}

#[test]
fn template_mistakes_are_refused_by_check_with_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, &str, &str)] = &[
        // A syntax error on the template's second line.
        (
            "{ template = '''\n{\n\"v\": {{ value }\n}''' }",
            "devices[0].payload.template",
            "line 2: syntax error",
        ),
        (
            "{ template = '{{ valeu }}' }",
            "devices[0].payload.template",
            "undefined",
        ),
        (
            "{ template = '{{ value|sha1 }}' }",
            "devices[0].payload.template",
            "unknown filter",
        ),
        (
            "{ content_type = \"text/csv\" }",
            "devices[0].payload.template",
            "missing",
        ),
        (
            "{ template = '{{ value }}', content_type = \"\" }",
            "devices[0].payload.content_type",
            "empty",
        ),
        (
            "{ template = '{{ value }}', format = \"x\" }",
            "devices[0].payload.format",
            "unknown key `format`",
        ),
        (
            "\"influxdb\"",
            "devices[0].payload",
            "unknown payload format \"influxdb\"",
        ),
        ("42", "devices[0]", "format name"),
    ];
    for (payload, key, message) in cases {
        let config = write_config(dir.path(), &device_with_payload(payload));
        let (code, stderr) = check(&config);
        assert_eq!(code, Some(2), "{payload}: {stderr}");
        let at = format!("{}:11:", config.display());
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&at) && l.contains(key) && l.contains(message)),
            "{payload}: expected {at} {key}: ...{message}... in:\n{stderr}"
        );
        if payload.contains("influxdb") {
            assert!(stderr.contains("hint: did you mean `influx`?"), "{stderr}");
        }
    }
    let good = write_config(
        dir.path(),
        &device_with_payload("{ template = '{{ value }} {{ unit|default(\"\") }}' }"),
    );
    let (code, stderr) = check(&good);
    assert_eq!(code, Some(0), "{stderr}");
}
