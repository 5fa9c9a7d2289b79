//! Home Assistant MQTT discovery with the real binary: every config message is checked
//! against the keys Home Assistant's MQTT documentation gives each component (required
//! keys, allowed keys, their types and values), a number's `command_topic` writes the point,
//! and config messages are removed (empty retained) when a point or device leaves the
//! configuration, by a reload or while the gateway was stopped.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use serde_json::{Map, Value as Json};

use crate::util::gateway::{self, GatewayProcess};
use crate::util::v5::{json, Client};

const PREFIX: &str = "ha";

/// Keys every MQTT entity may have (the entity and availability options of the MQTT docs).
const COMMON: &[&str] = &[
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "device",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "default_entity_id",
    "origin",
    "payload_available",
    "payload_not_available",
    "platform",
    "qos",
    "unique_id",
];

/// Per component: (required keys, keys of its own).
fn component_keys(component: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match component {
        "sensor" => (
            &["state_topic"],
            &[
                "state_topic",
                "device_class",
                "expire_after",
                "force_update",
                "last_reset_value_template",
                "options",
                "suggested_display_precision",
                "state_class",
                "unit_of_measurement",
                "value_template",
            ],
        ),
        "binary_sensor" => (
            &["state_topic"],
            &[
                "state_topic",
                "device_class",
                "expire_after",
                "force_update",
                "off_delay",
                "payload_off",
                "payload_on",
                "value_template",
            ],
        ),
        "switch" => (
            &["command_topic"],
            &[
                "command_topic",
                "command_template",
                "device_class",
                "optimistic",
                "payload_off",
                "payload_on",
                "retain",
                "state_off",
                "state_on",
                "state_topic",
                "value_template",
            ],
        ),
        "number" => (
            &["command_topic"],
            &[
                "command_topic",
                "command_template",
                "device_class",
                "max",
                "min",
                "mode",
                "optimistic",
                "payload_reset",
                "retain",
                "state_topic",
                "step",
                "unit_of_measurement",
                "value_template",
            ],
        ),
        "text" => (
            &["command_topic"],
            &[
                "command_topic",
                "command_template",
                "max",
                "min",
                "mode",
                "pattern",
                "retain",
                "state_topic",
                "value_template",
            ],
        ),
        other => panic!("not a component fieldmq announces: {other}"),
    }
}

const SENSOR_DEVICE_CLASSES: &[&str] = &[
    "apparent_power",
    "current",
    "energy",
    "frequency",
    "power",
    "pressure",
    "reactive_power",
    "temperature",
    "voltage",
];

fn is_id(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks one config message against the documented schema; returns its component.
fn validate(topic: &str, body: &Map<String, Json>) -> String {
    let levels: Vec<&str> = topic.split('/').collect();
    assert_eq!(levels.len(), 5, "{topic}");
    assert_eq!(levels[0], PREFIX, "{topic}");
    assert!(
        is_id(levels[2]) && is_id(levels[3]),
        "node and object ids: {topic}"
    );
    assert_eq!(levels[4], "config", "{topic}");
    let component = levels[1];
    let (required, own) = component_keys(component);
    for key in required {
        assert!(body.contains_key(*key), "{topic}: {key} is required");
    }
    for key in body.keys() {
        assert!(
            COMMON.contains(&key.as_str()) || own.contains(&key.as_str()),
            "{topic}: {key} is not a {component} option"
        );
    }
    for key in [
        "state_topic",
        "command_topic",
        "value_template",
        "unit_of_measurement",
        "name",
        "unique_id",
    ] {
        if let Some(value) = body.get(key) {
            let text = value
                .as_str()
                .unwrap_or_else(|| panic!("{topic}: {key} is a string"));
            assert!(!text.is_empty(), "{topic}: {key} is empty");
            if key.ends_with("_topic") {
                assert!(!text.contains(['+', '#']), "{topic}: {key} has a wildcard");
            }
        }
    }
    let device = body["device"].as_object().expect("device is an object");
    let identifiers = device["identifiers"].as_array().expect("identifiers list");
    assert!(
        !identifiers.is_empty() && identifiers.iter().all(Json::is_string),
        "{topic}"
    );
    assert!(device["name"].is_string(), "{topic}");
    for availability in body["availability"].as_array().expect("availability list") {
        assert!(availability["topic"].is_string(), "{topic}");
    }
    assert!(body["origin"]["name"].is_string(), "{topic}");
    if let Some(class) = body.get("device_class") {
        assert_eq!(component, "sensor", "{topic}");
        assert!(
            SENSOR_DEVICE_CLASSES.contains(&class.as_str().unwrap_or_default()),
            "{topic}: {class}"
        );
    }
    if let Some(class) = body.get("state_class") {
        assert!(
            ["measurement", "total", "total_increasing"]
                .contains(&class.as_str().unwrap_or_default()),
            "{topic}: {class}"
        );
    }
    if component == "number" {
        let min = body["min"].as_f64().expect("min is a number");
        let max = body["max"].as_f64().expect("max is a number");
        assert!(min < max, "{topic}");
        assert!(body["step"].as_f64().expect("step") >= 0.001, "{topic}");
        assert!(
            ["auto", "box", "slider"].contains(&body["mode"].as_str().unwrap_or_default()),
            "{topic}"
        );
    }
    component.to_owned()
}

fn write_config(dir: &Path, devices: &str) -> PathBuf {
    let text = format!(
        "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[broker]\nallow_anonymous = true\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n[homeassistant]\n\
         discovery_prefix = \"{PREFIX}\"\n{devices}",
        dir.join("data").display()
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

const BOILER_HEAD: &str =
    "[[devices]]\nname = \"boiler\"\ndriver = \"simulated\"\npoll = \"100ms\"\npoints = [\n";
const TEMP: &str =
    "{ name = \"temp\", waveform = \"sine\", min = 18.0, max = 24.0, unit = \"°C\" },\n";
const ALARM: &str = "{ name = \"alarm\", waveform = \"constant\", value = false },\n";
const PUMP: &str = "{ name = \"pump\", waveform = \"constant\", value = true, writable = true },\n";
const SETPOINT: &str =
    "{ name = \"setpoint\", waveform = \"constant\", value = 21.5, writable = true, unit = \"°C\" },\n";
const MODE: &str =
    "{ name = \"mode\", waveform = \"constant\", value = \"eco\", writable = true },\n";
const TANK: &str = "[[devices]]\nname = \"tank\"\ndriver = \"simulated\"\npayload = \"plain\"\n\
                    points = [ { name = \"level\", waveform = \"ramp\", min = 0.0, max = 100.0, unit = \"%\" } ]\n";

fn boiler(points: &[&str]) -> String {
    format!("{BOILER_HEAD}{}]\n", points.concat())
}

/// The retained config messages a new subscriber gets, by topic (empty ones are none).
async fn retained_configs(addr: std::net::SocketAddr, id: &str) -> HashMap<String, Publish> {
    let mut client = Client::connect(addr, id, &[&format!("{PREFIX}/#")]).await;
    client
        .drain(Duration::from_millis(700))
        .await
        .into_iter()
        .filter(|p| p.retain && !p.payload.is_empty())
        .map(|p| (String::from_utf8_lossy(&p.topic).into_owned(), p))
        .collect()
}

fn reload(config: &Path) -> String {
    let (code, stdout, stderr) = gateway::run_within(
        &[OsStr::new("reload"), OsStr::new("-c"), config.as_os_str()],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_messages_follow_the_schema_and_leave_with_their_points() {
    let dir = tempfile::tempdir().expect("tempdir");
    let all = format!("{}{TANK}", boiler(&[TEMP, ALARM, PUMP, SETPOINT, MODE]));
    let config = write_config(dir.path(), &all);
    let mut gateway = GatewayProcess::start(&config);

    // Announced in the background after start: wait for all six.
    let mut configs = HashMap::new();
    for attempt in 0..20 {
        configs = retained_configs(gateway.addr, &format!("ha-{attempt}")).await;
        if configs.len() >= 6 {
            break;
        }
    }
    assert_eq!(configs.len(), 6, "{:?}", configs.keys().collect::<Vec<_>>());
    let mut components = HashMap::new();
    let mut unique_ids = HashSet::new();
    for (topic, publish) in &configs {
        let body = json(publish);
        let body = body.as_object().expect("a JSON object");
        components.insert(topic.clone(), validate(topic, body));
        assert!(
            unique_ids.insert(body["unique_id"].as_str().unwrap_or_default().to_owned()),
            "unique_id repeated: {topic}"
        );
    }
    let mut kinds: Vec<&str> = components.values().map(String::as_str).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "binary_sensor",
            "number",
            "sensor",
            "sensor",
            "switch",
            "text"
        ]
    );
    let temp = json(&configs["ha/sensor/gw/boiler_temp/config"]);
    assert_eq!(temp["state_topic"], "gw/boiler/temp");
    assert_eq!(temp["unit_of_measurement"], "°C");
    assert_eq!(temp["device_class"], "temperature");
    assert_eq!(
        temp["availability"][0]["topic"],
        "fieldmq/gw/status/devices/boiler"
    );
    let level = json(&configs["ha/sensor/gw/tank_level/config"]);
    assert_eq!(
        level.get("value_template"),
        None,
        "plain payloads are read bare"
    );

    // The number's command topic is the point's /set: a write lands and reads back.
    let setpoint = json(&configs["ha/number/gw/boiler_setpoint/config"]);
    let command = setpoint["command_topic"]
        .as_str()
        .expect("command topic")
        .to_owned();
    let state = setpoint["state_topic"]
        .as_str()
        .expect("state topic")
        .to_owned();
    let mut writer = Client::connect(gateway.addr, "ha-writer", &["gw/boiler/#"]).await;
    let result = writer.write(command.trim_end_matches("/set"), "19.5").await;
    assert_eq!(result["status"], "ok", "{result}");
    let reading = writer
        .next_on(&state, |p| json(p)["value"] == serde_json::json!(19.5))
        .await;
    assert_eq!(json(&reading)["quality"], "good");

    // A reload without `alarm` and without the tank device clears exactly those two.
    let mut watcher = Client::connect(gateway.addr, "ha-watch", &[&format!("{PREFIX}/#")]).await;
    watcher.drain(Duration::from_millis(500)).await;
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read config")
            .replace(ALARM, "")
            .replace(TANK, ""),
    )
    .expect("write config");
    let stdout = reload(&config);
    assert!(
        stdout.contains("homeassistant: 0 discovery message(s) published, 2 removed"),
        "{stdout}"
    );
    let after: Vec<Publish> = watcher.drain(Duration::from_millis(700)).await;
    let mut cleared: Vec<String> = after
        .iter()
        .filter(|p| p.payload.is_empty())
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    cleared.sort();
    assert_eq!(
        cleared,
        [
            "ha/binary_sensor/gw/boiler_alarm/config",
            "ha/sensor/gw/tank_level/config"
        ]
    );
    assert!(
        after.iter().all(|p| p.payload.is_empty()),
        "unchanged config messages are not published again"
    );

    // A point removed while the gateway is stopped is cleared when it starts again.
    gateway.terminate();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read config")
            .replace(MODE, ""),
    )
    .expect("write config");
    let gateway = GatewayProcess::start(&config);
    let mut left = HashMap::new();
    for attempt in 0..20 {
        left = retained_configs(gateway.addr, &format!("ha-after-{attempt}")).await;
        if !left.contains_key("ha/text/gw/boiler_mode/config") {
            break;
        }
    }
    let mut topics: Vec<&str> = left.keys().map(String::as_str).collect();
    topics.sort();
    assert_eq!(
        topics,
        [
            "ha/number/gw/boiler_setpoint/config",
            "ha/sensor/gw/boiler_temp/config",
            "ha/switch/gw/boiler_pump/config",
        ]
    );
}

#[test]
fn a_wildcard_or_unknown_key_in_the_homeassistant_table_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (table, key, message) in [
        (
            "discovery_prefix = \"ha/#\"",
            "homeassistant.discovery_prefix",
            "wildcard",
        ),
        ("prefix = \"ha\"", "homeassistant.prefix", "unknown key"),
    ] {
        let path = dir.path().join("fieldmq.toml");
        std::fs::write(
            &path,
            format!("[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n[homeassistant]\n{table}\n"),
        )
        .expect("write");
        let (code, _stdout, stderr) = gateway::run_within(
            &[OsStr::new("check"), OsStr::new("-c"), path.as_os_str()],
            &[],
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(2), "{stderr}");
        let at = format!("{}:6:", path.display());
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&at) && l.contains(key) && l.contains(message)),
            "expected {at} {key}: ...{message}... in:\n{stderr}"
        );
    }
}
