//! Home Assistant MQTT discovery: a retained config message for every point of every
//! device, so that Home Assistant's MQTT integration shows them without YAML.
//!
//! Topics are `<discovery_prefix>/<component>/<gateway>/<device>_<point>/config`
//! (component `sensor`, `binary_sensor`, `number`, `switch` or `text`). Each message names
//! the point's state topic, how to read its value, its unit, the device it belongs to, the
//! device's status topic for availability and, for a writable point, its `/set` topic.
//!
//! [`sync`] runs when the gateway starts, on every reload and when a device announces a new
//! point set: it reads the retained config messages under this gateway's node id, publishes
//! what is new or changed, and clears (empty retained message) what no longer has a point,
//! so a removed point or device, or one removed while the gateway was stopped, leaves Home
//! Assistant too. A device's points are those of its configuration and those its driver
//! found at run time and announced, retained, on its points topic (a SunSpec device's
//! models: [`DeviceConfig::points_topic`]).

pub mod config;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value as Json};

use crate::broker::bus::{BrokerHandle, BusError, InternalSubscribeOptions};
use crate::drivers::config::{parse_point_set, DeviceConfig, PayloadFormat, PointInfo, PointKind};
use crate::model::{Message, MessageProperties, QoS};
pub use config::HomeAssistantConfig;

/// The bus name discovery publishes and reads under.
const ORIGIN: &str = "homeassistant";
/// Retained config messages arrive page by page; reading stops after this much quiet.
const QUIET: Duration = Duration::from_millis(300);
/// And after this long in all (a broker with a very large retained set).
const READ_LIMIT: Duration = Duration::from_secs(10);

/// One discovery message.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub topic: String,
    pub payload: Json,
}

/// What a [`sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncSummary {
    /// Config messages published because they were new or changed.
    pub published: usize,
    /// Config messages cleared because their point is gone.
    pub removed: usize,
    /// Devices left out (a serial device, or a payload Home Assistant cannot read).
    pub skipped_devices: usize,
}

/// Where the gateway publishes, for the announcements.
#[derive(Debug, Clone, Copy)]
pub struct Gateway<'a> {
    pub id: &'a str,
    pub status_topic: &'a str,
}

/// A topic level Home Assistant accepts as node or object id: ASCII letters, digits, `_`
/// and `-`; anything else becomes `_`.
fn id_part(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The filter of every config message this gateway may have published.
fn own_filter(prefix: &str, gateway: &str) -> String {
    format!("{prefix}/+/{}/+/config", id_part(gateway))
}

/// The discovery messages of `devices` (with the points their drivers announced,
/// `discovered` by device name), and how many devices were left out.
pub fn announcements(
    config: &HomeAssistantConfig,
    gateway: Gateway<'_>,
    devices: &[DeviceConfig],
    discovered: &HashMap<String, Vec<PointInfo>>,
) -> (Vec<Announcement>, usize) {
    let node = id_part(gateway.id);
    let mut out = Vec::new();
    let mut skipped = 0;
    let mut used: HashSet<String> = HashSet::new();
    for device in devices {
        let reads = match &device.payload {
            PayloadFormat::Json => Reads::Json,
            PayloadFormat::Plain => Reads::Plain,
            // Home Assistant cannot read a line of line protocol or the user's own shape.
            PayloadFormat::Influx | PayloadFormat::Template(_) => {
                skipped += 1;
                continue;
            }
        };
        let mut points = device.point_infos();
        for point in discovered.get(&device.name).into_iter().flatten() {
            if !points.iter().any(|p| p.name == point.name) {
                points.push(point.clone());
            }
        }
        if points.is_empty() {
            skipped += 1;
            continue;
        }
        let device_block = json!({
            "identifiers": [format!("fieldmq_{node}_{}", id_part(&device.name))],
            "name": device.name,
            "model": device.driver_name(),
        });
        let availability = json!([{
            "topic": device.status_topic(gateway.status_topic),
            "value_template": "{{ 'online' if value_json.status == 'online' else 'offline' }}",
        }]);
        for point in &points {
            let component = component(point);
            let mut object = format!("{}_{}", id_part(&device.name), id_part(&point.name));
            // Two names that differ only in characters `id_part` replaces.
            if !used.insert(format!("{component}/{object}")) {
                let mut n = 2;
                while !used.insert(format!("{component}/{object}_{n}")) {
                    n += 1;
                }
                object = format!("{object}_{n}");
            }
            let state_topic = device.point_topic(gateway.id, &point.name);
            let mut body = Map::new();
            body.insert("name".into(), json!(point.name));
            body.insert(
                "unique_id".into(),
                json!(format!("fieldmq_{node}_{object}")),
            );
            body.insert("state_topic".into(), json!(state_topic));
            body.insert("availability".into(), availability.clone());
            body.insert("device".into(), device_block.clone());
            body.insert(
                "origin".into(),
                json!({"name": "fieldmq", "sw_version": env!("CARGO_PKG_VERSION")}),
            );
            point_keys(&mut body, component, point, reads, &state_topic);
            out.push(Announcement {
                topic: format!(
                    "{}/{component}/{node}/{object}/config",
                    config.discovery_prefix
                ),
                payload: Json::Object(body),
            });
        }
    }
    (out, skipped)
}

/// How a point's payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    Json,
    Plain,
}

fn component(point: &PointInfo) -> &'static str {
    match (point.kind, point.writable) {
        (PointKind::Bool, false) => "binary_sensor",
        (PointKind::Bool, true) => "switch",
        (PointKind::Integer | PointKind::Float, true) => "number",
        (PointKind::Text, true) => "text",
        (_, false) => "sensor",
    }
}

/// The keys that depend on the component: how the state is read, the command topic, the
/// unit, device and state classes.
fn point_keys(
    body: &mut Map<String, Json>,
    component: &str,
    point: &PointInfo,
    reads: Reads,
    state_topic: &str,
) {
    let value = match reads {
        Reads::Json => "value_json.value",
        Reads::Plain => "value",
    };
    let on_off = match reads {
        Reads::Json => "{{ 'ON' if value_json.value else 'OFF' }}",
        Reads::Plain => "{{ 'ON' if value == 'true' else 'OFF' }}",
    };
    match component {
        "binary_sensor" => {
            body.insert("value_template".into(), json!(on_off));
            body.insert("payload_on".into(), json!("ON"));
            body.insert("payload_off".into(), json!("OFF"));
        }
        "switch" => {
            body.insert("value_template".into(), json!(on_off));
            body.insert("state_on".into(), json!("ON"));
            body.insert("state_off".into(), json!("OFF"));
            body.insert("command_topic".into(), json!(format!("{state_topic}/set")));
            body.insert("payload_on".into(), json!("true"));
            body.insert("payload_off".into(), json!("false"));
        }
        _ => {
            if reads == Reads::Json {
                body.insert("value_template".into(), json!(format!("{{{{ {value} }}}}")));
            }
            if component != "sensor" {
                body.insert("command_topic".into(), json!(format!("{state_topic}/set")));
            }
            if component == "number" {
                // Home Assistant's default range is 1 to 100; a register's is not.
                body.insert("min".into(), json!(-1_000_000_000.0));
                body.insert("max".into(), json!(1_000_000_000.0));
                let step = if point.kind == PointKind::Integer {
                    1.0
                } else {
                    0.001
                };
                body.insert("step".into(), json!(step));
                body.insert("mode".into(), json!("box"));
            }
            if let Some(unit) = &point.unit {
                body.insert("unit_of_measurement".into(), json!(unit));
            }
            if component == "sensor" && point.kind != PointKind::Text {
                let (device_class, state_class) = classes(point.unit.as_deref());
                if let Some(device_class) = device_class {
                    body.insert("device_class".into(), json!(device_class));
                }
                body.insert("state_class".into(), json!(state_class));
            }
        }
    }
}

/// Home Assistant's device class for a unit it knows, and the state class.
fn classes(unit: Option<&str>) -> (Option<&'static str>, &'static str) {
    match unit {
        Some("°C" | "°F" | "K") => (Some("temperature"), "measurement"),
        Some("V" | "mV" | "kV") => (Some("voltage"), "measurement"),
        Some("A" | "mA") => (Some("current"), "measurement"),
        Some("W" | "kW" | "MW") => (Some("power"), "measurement"),
        Some("VA" | "kVA") => (Some("apparent_power"), "measurement"),
        Some("var" | "kvar") => (Some("reactive_power"), "measurement"),
        Some("Wh" | "kWh" | "MWh") => (Some("energy"), "total_increasing"),
        Some("Hz") => (Some("frequency"), "measurement"),
        Some("Pa" | "hPa" | "kPa" | "bar" | "mbar" | "psi") => (Some("pressure"), "measurement"),
        _ => (None, "measurement"),
    }
}

/// Publish `config`'s announcements for `devices` and clear this gateway's config messages
/// that no point has any more. With `config` `None` (the table was removed), clears every
/// config message under `previous_prefix`.
pub async fn sync(
    broker: &BrokerHandle,
    config: Option<&HomeAssistantConfig>,
    previous_prefix: Option<&str>,
    gateway: Gateway<'_>,
    devices: &[DeviceConfig],
) -> Result<SyncSummary, BusError> {
    let mut summary = SyncSummary::default();
    let wanted: BTreeMap<String, Bytes> = match config {
        Some(config) => {
            let discovered = point_sets(broker, gateway.status_topic, devices).await?;
            let (announcements, skipped) = announcements(config, gateway, devices, &discovered);
            summary.skipped_devices = skipped;
            announcements
                .into_iter()
                .map(|a| (a.topic, Bytes::from(a.payload.to_string())))
                .collect()
        }
        None => BTreeMap::new(),
    };
    let mut prefixes: Vec<&str> = config
        .map(|c| c.discovery_prefix.as_str())
        .into_iter()
        .collect();
    if let Some(previous) = previous_prefix {
        if !prefixes.contains(&previous) {
            prefixes.push(previous);
        }
    }
    let filters = prefixes
        .iter()
        .map(|prefix| (own_filter(prefix, gateway.id), QoS::AtLeastOnce))
        .collect();
    let existing = retained(broker, filters, wanted.len()).await?;
    let properties = std::sync::Arc::new(MessageProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        ..MessageProperties::default()
    });
    for (topic, payload) in &wanted {
        if existing.get(topic) == Some(payload) {
            continue;
        }
        let mut message = Message::internal(
            ORIGIN,
            topic.as_str(),
            payload.clone(),
            QoS::AtLeastOnce,
            true,
        );
        message.properties = Some(properties.clone());
        broker.publish_and_wait(message).await?;
        summary.published += 1;
    }
    for topic in existing.keys().filter(|topic| !wanted.contains_key(*topic)) {
        let message =
            Message::internal(ORIGIN, topic.as_str(), Bytes::new(), QoS::AtLeastOnce, true);
        broker.publish_and_wait(message).await?;
        summary.removed += 1;
    }
    Ok(summary)
}

/// The point sets `devices` announced (retained on their points topics under
/// `gateway_status_topic`), by device name.
pub async fn point_sets(
    broker: &BrokerHandle,
    gateway_status_topic: &str,
    devices: &[DeviceConfig],
) -> Result<HashMap<String, Vec<PointInfo>>, BusError> {
    let topics: HashMap<String, &str> = devices
        .iter()
        .map(|d| (d.points_topic(gateway_status_topic), d.name.as_str()))
        .collect();
    if topics.is_empty() {
        return Ok(HashMap::new());
    }
    let filters = topics
        .keys()
        .map(|t| (t.clone(), QoS::AtLeastOnce))
        .collect();
    let retained = retained(broker, filters, topics.len()).await?;
    Ok(retained
        .iter()
        .filter_map(|(topic, payload)| {
            let device = topics.get(topic)?;
            Some(((*device).to_owned(), parse_point_set(payload)?))
        })
        .collect())
}

/// The retained messages under `filters` (empty ones are not retained, so not here).
async fn retained(
    broker: &BrokerHandle,
    filters: Vec<(String, QoS)>,
    expected: usize,
) -> Result<HashMap<String, Bytes>, BusError> {
    let options = InternalSubscribeOptions {
        capacity: expected + 1024,
        send_retained: true,
        commit: false,
    };
    let mut subscription = broker.subscribe(ORIGIN, filters, options).await?;
    let mut found = HashMap::new();
    let deadline = tokio::time::Instant::now() + READ_LIMIT;
    loop {
        let quiet = (tokio::time::Instant::now() + QUIET).min(deadline);
        match tokio::time::timeout_at(quiet, subscription.recv()).await {
            Ok(Some(message)) if message.retain && !message.payload.is_empty() => {
                found.insert(message.topic.to_string(), message.payload);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn devices(text: &str) -> Vec<DeviceConfig> {
        let config = format!("[gateway]\nid = \"gw.1\"\n[broker]\nallow_anonymous = true\n{text}");
        crate::service::config::parse(&config, Path::new("test.toml"))
            .expect("valid")
            .devices
    }

    fn prefix() -> HomeAssistantConfig {
        HomeAssistantConfig {
            discovery_prefix: "homeassistant".into(),
        }
    }

    const GATEWAY: Gateway<'static> = Gateway {
        id: "gw.1",
        status_topic: "fieldmq/gw.1/status",
    };

    #[test]
    fn each_point_type_gets_its_component_and_keys() {
        let devices = devices(
            r#"
[[devices]]
name = "boiler"
driver = "simulated"
points = [
  { name = "temp", waveform = "sine", min = 1.0, max = 2.0, unit = "°C" },
  { name = "alarm", waveform = "constant", value = false },
  { name = "pump", waveform = "constant", value = true, writable = true },
  { name = "setpoint", waveform = "constant", value = 21.5, writable = true, unit = "°C" },
  { name = "mode", waveform = "constant", value = "eco", writable = true },
  { name = "starts", waveform = "constant", value = 3, unit = "kWh" },
]
"#,
        );
        let (all, skipped) = announcements(&prefix(), GATEWAY, &devices, &HashMap::new());
        assert_eq!(skipped, 0);
        let topics: Vec<&str> = all.iter().map(|a| a.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "homeassistant/sensor/gw_1/boiler_temp/config",
                "homeassistant/binary_sensor/gw_1/boiler_alarm/config",
                "homeassistant/switch/gw_1/boiler_pump/config",
                "homeassistant/number/gw_1/boiler_setpoint/config",
                "homeassistant/text/gw_1/boiler_mode/config",
                "homeassistant/sensor/gw_1/boiler_starts/config",
            ]
        );
        let temp = &all[0].payload;
        assert_eq!(temp["state_topic"], "gw.1/boiler/temp");
        assert_eq!(temp["value_template"], "{{ value_json.value }}");
        assert_eq!(temp["unit_of_measurement"], "°C");
        assert_eq!(temp["device_class"], "temperature");
        assert_eq!(temp["unique_id"], "fieldmq_gw_1_boiler_temp");
        assert_eq!(temp["device"]["identifiers"][0], "fieldmq_gw_1_boiler");
        assert_eq!(
            temp["availability"][0]["topic"],
            "fieldmq/gw.1/status/devices/boiler"
        );
        assert_eq!(all[2].payload["command_topic"], "gw.1/boiler/pump/set");
        assert_eq!(all[3].payload["command_topic"], "gw.1/boiler/setpoint/set");
        assert_eq!(all[5].payload["state_class"], "total_increasing");
        assert!(temp.get("command_topic").is_none());
    }

    #[test]
    fn plain_is_read_bare_and_influx_or_template_devices_are_left_out() {
        let devices = devices(
            r#"
[[devices]]
name = "a"
driver = "simulated"
payload = "plain"
points = [ { name = "x", waveform = "sine", min = 1.0, max = 2.0 }, { name = "b", waveform = "constant", value = true } ]
[[devices]]
name = "b"
driver = "simulated"
payload = "influx"
points = [ { name = "x", waveform = "sine", min = 1.0, max = 2.0 } ]
[[devices]]
name = "c"
driver = "simulated"
payload = { template = "{{ value }}" }
points = [ { name = "x", waveform = "sine", min = 1.0, max = 2.0 } ]
"#,
        );
        let (all, skipped) = announcements(&prefix(), GATEWAY, &devices, &HashMap::new());
        assert_eq!(skipped, 2);
        assert_eq!(all.len(), 2);
        assert!(all[0].payload.get("value_template").is_none());
        assert_eq!(
            all[1].payload["value_template"],
            "{{ 'ON' if value == 'true' else 'OFF' }}"
        );
    }

    #[test]
    fn names_that_sanitise_alike_get_distinct_object_ids() {
        let devices = devices(
            r#"
[[devices]]
name = "m"
driver = "simulated"
points = [ { name = "a.b", waveform = "constant", value = 1.5 }, { name = "a_b", waveform = "constant", value = 2.5 } ]
"#,
        );
        let (all, _) = announcements(&prefix(), GATEWAY, &devices, &HashMap::new());
        assert_eq!(all[0].topic, "homeassistant/sensor/gw_1/m_a_b/config");
        assert_eq!(all[1].topic, "homeassistant/sensor/gw_1/m_a_b_2/config");
        assert_ne!(all[0].payload["unique_id"], all[1].payload["unique_id"]);
    }

    #[test]
    fn points_a_driver_announced_are_announced_beside_the_configured_ones() {
        let devices = devices(
            r#"
[[devices]]
name = "inv"
driver = "modbus-tcp"
address = "127.0.0.1:502"
profile = "sunspec"
"#,
        );
        // Before discovery a SunSpec device has no points: left out.
        let (all, skipped) = announcements(&prefix(), GATEWAY, &devices, &HashMap::new());
        assert_eq!((all.len(), skipped), (0, 1));
        let payload = crate::drivers::config::point_set_payload(&[
            PointInfo {
                name: "inverter_W".into(),
                unit: Some("W".into()),
                writable: false,
                kind: PointKind::Float,
            },
            PointInfo {
                name: "mppt_1_IDStr".into(),
                unit: None,
                writable: false,
                kind: PointKind::Text,
            },
        ]);
        let points = parse_point_set(payload.as_bytes()).expect("a point set");
        let discovered = HashMap::from([("inv".to_owned(), points)]);
        let (all, skipped) = announcements(&prefix(), GATEWAY, &devices, &discovered);
        assert_eq!(skipped, 0);
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].topic,
            "homeassistant/sensor/gw_1/inv_inverter_W/config"
        );
        assert_eq!(all[0].payload["state_topic"], "gw.1/inv/inverter_W");
        assert_eq!(all[0].payload["device_class"], "power");
        assert_eq!(all[0].payload["unit_of_measurement"], "W");
        assert_eq!(all[1].payload["name"], "mppt_1_IDStr");
        assert!(all[1].payload.get("state_class").is_none());
        assert_eq!(parse_point_set(b"{\"status\": \"online\"}"), None);
    }
}
