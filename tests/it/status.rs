//! The status of a running gateway (the real binary): `fieldmq status` through the control
//! socket, the JSON API and the status page over HTTP, the page in headless Chromium.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::util::cloud::{mosquitto_available, Cloud, CloudOptions};
use crate::util::gateway::{run_within, GatewayProcess};

/// How long a test waits for the status to show what it expects.
const SETTLE: Duration = Duration::from_secs(20);

/// A gateway with a simulated device of four points (with units), `device_name` for its
/// name, and optionally an uplink to `cloud`.
fn write_config(dir: &Path, device_name: &str, cloud: Option<&Cloud>, extra: &str) -> PathBuf {
    let uplink = cloud.map_or(String::new(), |cloud| {
        format!(
            r#"
[[uplinks]]
name = "cloud"
url = "mqtt://127.0.0.1:{}"
routes = [{{ out = "{{gateway}}/#", qos = 1 }}]
"#,
            cloud.port
        )
    });
    let config = format!(
        r#"
[gateway]
id = "status-test"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"
{extra}
[[devices]]
name = {device_name:?}
driver = "simulated"
topic = "{{gateway}}/sim/{{point}}"
poll = "100ms"
points = [
  {{ name = "temperature", waveform = "sine", min = 18.0, max = 24.0, period = "60s", unit = "°C" }},
  {{ name = "level", waveform = "ramp", min = 0.0, max = 100.0, period = "30s", unit = "%" }},
  {{ name = "setpoint", waveform = "constant", value = 21.5, writable = true, unit = "°C" }},
]
{uplink}
"#,
        data = dir.join("data").display(),
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// `fieldmq status --json -c config`, parsed.
fn status_json(config: &Path) -> Json {
    let (code, stdout, stderr) = run_within(
        &[
            "status".as_ref(),
            "--json".as_ref(),
            "-c".as_ref(),
            config.as_os_str(),
        ],
        &[],
        Duration::from_secs(15),
    );
    assert_eq!(code, Some(0), "fieldmq status --json failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Ask `fetch` until `ready` holds for its answer (bounded by [`SETTLE`]).
fn wait_for(what: &str, mut fetch: impl FnMut() -> Json, ready: impl Fn(&Json) -> bool) -> Json {
    let deadline = Instant::now() + SETTLE;
    loop {
        let status = fetch();
        if ready(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not shown within {SETTLE:?}; last status:\n{status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn device<'a>(status: &'a Json, name: &str) -> Option<&'a Json> {
    status["devices"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
}

fn point<'a>(device: &'a Json, name: &str) -> Option<&'a Json> {
    device["points"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// Every point of `sim` has a good reading.
fn points_read(status: &Json) -> bool {
    device(status, "sim").is_some_and(|d| {
        ["temperature", "level", "setpoint"]
            .iter()
            .all(|p| point(d, p).is_some_and(|p| p["quality"] == "good" && p["value"].is_number()))
    })
}

#[test]
fn status_json_from_a_running_gateway_shows_the_device_points_and_uplink_state() {
    if !mosquitto_available(
        "status_json_from_a_running_gateway_shows_the_device_points_and_uplink_state",
    ) {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "sim", Some(&cloud), "");
    let _gateway = GatewayProcess::start(&config);
    let status = wait_for(
        "the device's readings and the connected uplink",
        || status_json(&config),
        |s| points_read(s) && s["uplinks"][0]["state"] == "connected",
    );
    let sim = device(&status, "sim").expect("device sim");
    assert_eq!(sim["driver"], "simulated");
    assert_eq!(sim["state"], "online");
    let setpoint = point(sim, "setpoint").expect("point setpoint");
    assert_eq!(setpoint["value"], 21.5);
    assert_eq!(setpoint["unit"], "°C");
    assert!(setpoint["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(point(sim, "level").expect("level")["unit"], "%");
    let uplink = &status["uplinks"][0];
    assert_eq!(uplink["name"], "cloud");
    assert!(uplink["backlog_messages"].is_u64(), "{uplink}");
    assert_eq!(status["gateway"]["id"], "status-test");
    assert_eq!(
        status["gateway"]["config_file"],
        config.display().to_string()
    );
}

#[test]
fn status_for_a_person_names_the_device_and_the_clients_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "sim", None, "");
    let gateway = GatewayProcess::start(&config);
    wait_for(
        "the device's readings",
        || status_json(&config),
        points_read,
    );
    // A LAN client is listed while it is connected.
    let client = std::net::TcpStream::connect(gateway.addr).expect("connect");
    mqtt_connect(&client, "status-client-ä");
    let status = wait_for(
        "the LAN client",
        || status_json(&config),
        |s| s["clients"].as_array().is_some_and(|c| c.len() == 1),
    );
    let listed = &status["clients"][0];
    assert_eq!(listed["client_id"], "status-client-ä");
    assert_eq!(listed["protocol"], "3.1.1");
    assert_eq!(listed["listener"], gateway.addr.to_string());
    assert_eq!(
        listed["remote_address"],
        client.local_addr().expect("local address").to_string()
    );

    let (code, stdout, stderr) = run_within(
        &["status".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        Duration::from_secs(15),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("gateway status-test"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("sim "))
        .unwrap_or_else(|| panic!("no row for the device sim:\n{stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["sim", "simulated", "online", "3"], "{stdout}");
    assert!(stdout.contains("clients: 1 connected"), "{stdout}");

    drop(client);
    wait_for(
        "the client's disconnect",
        || status_json(&config),
        |s| s["clients"].as_array().is_some_and(Vec::is_empty),
    );
}

#[test]
fn status_without_a_running_gateway_says_so_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "sim", None, "");
    let (code, stdout, stderr) = run_within(
        &["status".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        Duration::from_secs(15),
    );
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("no gateway is running"), "{stderr}");
    assert!(
        stderr.contains(&dir.path().join("data").display().to_string()),
        "{stderr}"
    );
}

/// Send an MQTT 3.1.1 CONNECT as raw bytes and read the CONNACK.
fn mqtt_connect(stream: &std::net::TcpStream, client_id: &str) {
    use std::io::{Read, Write};
    let id = client_id.as_bytes();
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    variable.extend_from_slice(&(id.len() as u16).to_be_bytes());
    variable.extend_from_slice(id);
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend_from_slice(&variable);
    let mut stream = stream;
    stream.write_all(&packet).expect("send CONNECT");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
}
