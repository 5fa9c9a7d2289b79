//! What every device has: the validated [`DeviceConfig`] (name, topic template, payload
//! format, poll interval and the driver's own settings), the `[[devices]]` array's
//! validation (each entry's common keys here, once; the driver's keys in its own
//! `config.rs`), and the serial port settings that Modbus RTU and serial line devices share.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::de::DeValue;
use toml::Spanned;

use super::modbus::config::RawModbusDevice;
use super::payload::template::{PayloadTemplate, TemplateError, Variables};
use super::serial::config::RawSerialDevice;
use super::simulated::config::{RawSimulatedDevice, SimulatedConfig};
use crate::config::{closest, parse_duration, report_missing, Checker, Diagnostic, Diagnostics, S};

const DRIVERS: &[&str] = &["simulated", "modbus-tcp", "modbus-rtu", "serial"];
const PAYLOAD_FORMATS: &[&str] = &["json", "plain", "influx"];
const DEFAULT_DEVICE_TOPIC: &str = "{gateway}/{device}/{point}";
const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// Reopen / reconnect backoff bounds of drivers that hold a connection.
const DEFAULT_BACKOFF_MIN: Duration = Duration::from_secs(1);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How a duration is written, for the hint under an invalid driver setting.
const DURATION_HINT: &str = "write a number and a unit, like \"100ms\", \"1s\" or \"5m\"";

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    pub name: String,
    /// Topic template with `{gateway}`, `{device}`, `{point}`; default
    /// `{gateway}/{device}/{point}`. The gateway id is NOT substituted yet (drivers do it).
    pub topic: String,
    pub payload: PayloadFormat,
    /// Poll / sample interval. Default 1s.
    pub poll: Duration,
    pub driver: DriverConfig,
}

impl DeviceConfig {
    /// The driver's name as the configuration writes it (`simulated`, `modbus`, `serial`).
    pub fn driver_name(&self) -> &'static str {
        match self.driver {
            DriverConfig::Simulated(_) => "simulated",
            DriverConfig::Modbus(_) => "modbus",
            DriverConfig::Serial(_) => "serial",
        }
    }

    /// The configured points and their units, for the status before the first readings
    /// (a serial device's points are its rules' topics, without units).
    pub fn points_and_units(&self) -> Vec<(String, Option<String>)> {
        match &self.driver {
            DriverConfig::Simulated(config) => config
                .points
                .iter()
                .map(|p| (p.name.clone(), p.unit.clone()))
                .collect(),
            DriverConfig::Modbus(config) => config
                .points
                .iter()
                .map(|p| (p.name.clone(), p.unit.clone()))
                .collect(),
            DriverConfig::Serial(config) => config
                .rules
                .iter()
                .map(|rule| (rule.topic.clone(), None))
                .collect(),
        }
    }
}

pub use super::payload::PayloadFormat;

/// A device's `payload` as written: a format's name, or a table with a template.
#[derive(Debug)]
pub(crate) enum RawPayload {
    Name(String),
    Template(RawTemplate),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTemplate {
    pub(crate) template: Option<S<String>>,
    pub(crate) content_type: Option<S<String>>,
}

impl<'de> Deserialize<'de> for RawPayload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PayloadVisitor;
        impl<'de> Visitor<'de> for PayloadVisitor {
            type Value = RawPayload;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a format name (json, plain, influx) or a table with a template")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPayload, E> {
                Ok(RawPayload::Name(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawPayload, A::Error> {
                RawTemplate::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawPayload::Template)
            }
        }
        deserializer.deserialize_any(PayloadVisitor)
    }
}

/// A sample reading for checking a device's template.
fn sample_variables(value: &serde_json::Value) -> Variables<'_> {
    Variables {
        value,
        ts: "2026-01-01T00:00:00Z",
        ts_ms: 1_767_225_600_000,
        quality: "good",
        error: None,
        unit: Some("°C"),
        device: "device",
        point: "point",
        gateway: "gateway",
    }
}

/// What kind of value a point carries, as far as its configuration tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    Bool,
    Integer,
    Float,
    Text,
}

impl PointKind {
    fn name(self) -> &'static str {
        match self {
            PointKind::Bool => "bool",
            PointKind::Integer => "integer",
            PointKind::Float => "float",
            PointKind::Text => "text",
        }
    }

    fn parse(name: &str) -> Option<PointKind> {
        [
            PointKind::Bool,
            PointKind::Integer,
            PointKind::Float,
            PointKind::Text,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// One point as its configuration describes it, for those who announce points (Home
/// Assistant discovery).
#[derive(Debug, Clone, PartialEq)]
pub struct PointInfo {
    pub name: String,
    pub unit: Option<String>,
    pub writable: bool,
    pub kind: PointKind,
}

impl PointInfo {
    /// A Modbus point's description: its register type, or a float once a scale or offset
    /// makes the value a fraction.
    pub(crate) fn modbus(p: &crate::drivers::modbus::config::Point) -> PointInfo {
        use crate::drivers::modbus::config::DataType;
        PointInfo {
            name: p.name.clone(),
            unit: p.unit.clone(),
            writable: p.writable,
            kind: match p.data_type {
                DataType::Bool | DataType::Bit(_) => PointKind::Bool,
                DataType::String { .. } => PointKind::Text,
                DataType::F32 | DataType::F64 => PointKind::Float,
                _ if p.is_unscaled() => PointKind::Integer,
                _ => PointKind::Float,
            },
        }
    }
}

/// The payload of a device's point set announcement (see [`DeviceConfig::points_topic`]):
/// `{"points": [{"name": "inverter_W", "unit": "W", "kind": "float", "writable": false}]}`.
pub fn point_set_payload(points: &[PointInfo]) -> String {
    let points: Vec<serde_json::Value> = points
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "unit": p.unit,
                "kind": p.kind.name(),
                "writable": p.writable,
            })
        })
        .collect();
    serde_json::json!({ "points": points }).to_string()
}

/// The points of a point set announcement; `None` when it is not one. Entries that are
/// not points are left out.
pub fn parse_point_set(payload: &[u8]) -> Option<Vec<PointInfo>> {
    let json: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let points = json.get("points")?.as_array()?;
    Some(
        points
            .iter()
            .filter_map(|p| {
                Some(PointInfo {
                    name: p.get("name")?.as_str()?.to_owned(),
                    unit: p.get("unit").and_then(|u| u.as_str()).map(str::to_owned),
                    writable: p.get("writable")?.as_bool()?,
                    kind: PointKind::parse(p.get("kind")?.as_str()?)?,
                })
            })
            .collect(),
    )
}

/// The topic of one point: `template` with `{gateway}`, `{device}` and `{point}` filled in.
pub fn point_topic(template: &str, gateway: &str, device: &str, point: &str) -> String {
    template
        .replace("{gateway}", gateway)
        .replace("{device}", device)
        .replace("{point}", point)
}

impl DeviceConfig {
    /// The topic `point`'s readings are published on.
    pub fn point_topic(&self, gateway: &str, point: &str) -> String {
        point_topic(&self.topic, gateway, &self.name, point)
    }

    /// The device's retained status topic under the gateway's status topic.
    pub fn status_topic(&self, gateway_status_topic: &str) -> String {
        format!("{gateway_status_topic}/devices/{}", self.name)
    }

    /// The retained topic where a driver announces the device's points when it finds them
    /// at run time (a SunSpec device after discovery), for the parts that describe the
    /// device's points to others (Home Assistant discovery): [`point_set_payload`].
    pub fn points_topic(&self, gateway_status_topic: &str) -> String {
        format!("{}/points", self.status_topic(gateway_status_topic))
    }

    /// The device's points, as [`DriverConfig::point_infos`] describes them.
    pub fn point_infos(&self) -> Vec<PointInfo> {
        self.driver.point_infos()
    }

    /// Whether the device has a point `name`, or can find one of that name at run time
    /// (a SunSpec device's models: `inverter_W`).
    pub fn may_have_point(&self, name: &str) -> bool {
        self.point_infos().iter().any(|p| p.name == name)
            || self.finds_points_at_run_time()
                && crate::drivers::modbus::sunspec::is_point_name(name)
    }

    /// Whether discovery adds points to the configured ones (`profile = "sunspec"`).
    pub fn finds_points_at_run_time(&self) -> bool {
        matches!(&self.driver, DriverConfig::Modbus(config) if config.sunspec)
    }

    /// `<device topic>/set`, where one JSON object writes several points of a Modbus
    /// device: the topic template up to the level that holds `{point}` (`gw/plc/set` for
    /// `{gateway}/{device}/{point}`). `None` for other drivers, when that prefix does not
    /// name the device (no `{device}` in it), or when a point's own topic is the same (a
    /// point named `set`: the device's readings would come back as commands).
    pub fn device_write_topic(&self, gateway: &str) -> Option<String> {
        if !matches!(self.driver, DriverConfig::Modbus(_)) {
            return None;
        }
        let levels: Vec<&str> = self.topic.split('/').collect();
        let at = levels.iter().position(|l| l.contains("{point}"))?;
        let prefix = levels.get(..at)?.join("/");
        if !prefix.contains("{device}") {
            return None;
        }
        let topic = format!(
            "{}/set",
            prefix
                .replace("{gateway}", gateway)
                .replace("{device}", &self.name)
        );
        let points = self.point_infos();
        (!points
            .iter()
            .any(|p| self.point_topic(gateway, &p.name) == topic))
        .then_some(topic)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DriverConfig {
    Simulated(SimulatedConfig),
    Modbus(crate::drivers::modbus::ModbusConfig),
    Serial(crate::drivers::serial::SerialConfig),
}

impl DriverConfig {
    /// The points that have a `unit`, with it (serial fields have none).
    pub fn point_units(&self) -> Vec<(String, String)> {
        self.point_infos()
            .into_iter()
            .filter_map(|p| Some((p.name, p.unit?)))
            .collect()
    }

    /// The points of a device with registers or simulated values (a serial device's
    /// points are frames of named fields, not one value each: none here).
    pub fn point_infos(&self) -> Vec<PointInfo> {
        use crate::drivers::simulated::config::Waveform;
        use crate::model::Value;
        match self {
            DriverConfig::Simulated(config) => config
                .points
                .iter()
                .map(|p| PointInfo {
                    name: p.name.clone(),
                    unit: p.unit.clone(),
                    writable: p.writable,
                    kind: match &p.waveform {
                        Waveform::Constant {
                            value: Value::Bool(_),
                        } => PointKind::Bool,
                        Waveform::Constant {
                            value: Value::Int(_),
                        } => PointKind::Integer,
                        Waveform::Constant {
                            value: Value::Text(_),
                        } => PointKind::Text,
                        _ => PointKind::Float,
                    },
                })
                .collect(),
            DriverConfig::Modbus(config) => config.points.iter().map(PointInfo::modbus).collect(),
            DriverConfig::Serial(_) => Vec::new(),
        }
    }
}

/// The keys every `[[devices]]` entry has, as written.
pub(crate) struct RawCommon<'r> {
    pub(crate) name: &'r Option<S<String>>,
    pub(crate) topic: &'r Option<S<String>>,
    pub(crate) payload: &'r Option<S<RawPayload>>,
    pub(crate) poll: &'r Option<S<String>>,
}

/// The common keys of a raw device struct: every driver's raw struct names them alike.
macro_rules! common_keys {
    ($raw:expr) => {
        $crate::drivers::config::RawCommon {
            name: &$raw.name,
            topic: &$raw.topic,
            payload: &$raw.payload,
            poll: &$raw.poll,
        }
    };
}
pub(crate) use common_keys;

impl Checker<'_> {
    /// The `[[devices]]` array, each entry checked by its driver; `None` for a device with
    /// errors.
    pub(crate) fn devices(&mut self, value: Spanned<DeValue<'_>>) -> Vec<Option<DeviceConfig>> {
        let Some(array) =
            self.array_of_tables(value, "devices", "write each device as [[devices]]")
        else {
            return vec![None];
        };
        let mut names: HashMap<String, (usize, usize)> = HashMap::new();
        let mut devices = Vec::new();
        for (index, item) in array.into_iter().enumerate() {
            let prefix = format!("devices[{index}]");
            let item_span = item.span();
            let driver = match item.get_ref() {
                DeValue::Table(table) => table
                    .iter()
                    .find(|(key, _)| key.get_ref() == "driver")
                    .map(|(_, value)| (value.get_ref().as_str().map(str::to_owned), value.span())),
                _ => {
                    self.d.error(Some(item_span), prefix, "expected a table");
                    devices.push(None);
                    continue;
                }
            };
            let known = format!("known drivers: {}", DRIVERS.join(", "));
            let device = match driver {
                None => {
                    self.missing(item_span, format!("{prefix}.driver"), Some(&known));
                    None
                }
                Some((None, span)) => {
                    self.d
                        .error(Some(span), format!("{prefix}.driver"), "expected a string");
                    None
                }
                Some((Some(driver), _)) if driver == "simulated" => self
                    .deserialize::<S<RawSimulatedDevice>>(item, &prefix)
                    .and_then(|raw| self.simulated_device(raw, &prefix, &mut names)),
                Some((Some(driver), _)) if driver == "modbus-tcp" || driver == "modbus-rtu" => self
                    .deserialize::<S<RawModbusDevice>>(item, &prefix)
                    .and_then(|raw| self.modbus_device(raw, &prefix, &mut names)),
                Some((Some(driver), _)) if driver == "serial" => self
                    .deserialize::<S<RawSerialDevice>>(item, &prefix)
                    .and_then(|raw| self.serial_device(raw, &prefix, &mut names)),
                Some((Some(driver), span)) => {
                    let diagnostic = self.d.error(
                        Some(span),
                        format!("{prefix}.driver"),
                        format!(
                            "unknown driver {driver:?}, expected one of {}",
                            DRIVERS.join(", ")
                        ),
                    );
                    if let Some(close) = closest(&driver, DRIVERS) {
                        diagnostic.hint = Some(format!("did you mean `{close}`?"));
                    }
                    None
                }
            };
            devices.push(device);
        }
        devices
    }

    /// One device: the keys every device has, then the driver's own (`driver_keys`).
    pub(crate) fn device(
        &mut self,
        common: RawCommon<'_>,
        span: Range<usize>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
        driver_keys: impl FnOnce(&mut Self) -> Option<DriverConfig>,
    ) -> Option<DeviceConfig> {
        let name = self.device_name(common.name, span, prefix, names);
        let topic = self.device_topic(common.topic, prefix);
        let payload = self.payload(common.payload, prefix);
        let poll = self.positive_duration(common.poll, &format!("{prefix}.poll"), DEFAULT_POLL);
        let driver = driver_keys(self);
        Some(DeviceConfig {
            name: name?,
            topic,
            payload,
            poll,
            driver: driver?,
        })
    }

    /// A `modbus-tcp` or `modbus-rtu` device: its Modbus keys in `drivers::modbus::config`.
    fn modbus_device(
        &mut self,
        raw: S<RawModbusDevice>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<DeviceConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let common = common_keys!(raw);
        self.device(common, span.clone(), prefix, names, |c| {
            let sunspec = raw
                .profile
                .as_ref()
                .is_some_and(|name| name.get_ref() == super::modbus::config::SUNSPEC_PROFILE);
            let profile = match &raw.profile {
                Some(_) if sunspec => None,
                Some(name) => {
                    let local = super::modbus::profile::local_dir(&c.path("."));
                    match super::modbus::profile::find(name.get_ref(), Some(&local)) {
                        Ok(profile) => Some(profile),
                        Err(error) => {
                            let diagnostic = c.d.error(
                                Some(name.span()),
                                format!("{prefix}.profile"),
                                error.to_string(),
                            );
                            diagnostic.hint = Some(
                                "`fieldmq profiles list` shows the profiles; local ones go in profiles/ next to this file"
                                    .into(),
                            );
                            return None;
                        }
                    }
                }
                None => None,
            };
            super::modbus::config::validate(
                &raw,
                span,
                prefix,
                profile.as_ref(),
                sunspec,
                c.device_check(),
            )
                .map(DriverConfig::Modbus)
        })
    }

    /// A `serial` device: its serial keys in `drivers::serial::config`.
    fn serial_device(
        &mut self,
        raw: S<RawSerialDevice>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<DeviceConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let common = common_keys!(raw);
        self.device(common, span.clone(), prefix, names, |c| {
            super::serial::config::validate(&raw, span, prefix, c.device_check())
                .map(DriverConfig::Serial)
        })
    }

    fn device_name(
        &mut self,
        name: &Option<S<String>>,
        span: Range<usize>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<String> {
        let key_path = format!("{prefix}.name");
        let Some(name) = name else {
            self.missing(span, key_path, None);
            return None;
        };
        if !self.name(name, &key_path) {
            return None;
        }
        let (line, _) = self.d.position(name.span().start);
        let index = prefix
            .trim_start_matches("devices[")
            .trim_end_matches(']')
            .parse()
            .unwrap_or(0);
        if let Some((other_index, other_line)) = names.get(name.get_ref()) {
            self.d.error(
                Some(name.span()),
                key_path,
                format!(
                    "duplicate device name {:?}, already used by devices[{other_index}] (line {other_line})",
                    name.get_ref()
                ),
            );
        } else {
            names.insert(name.get_ref().clone(), (index, line));
        }
        Some(name.get_ref().clone())
    }

    fn device_topic(&mut self, topic: &Option<S<String>>, prefix: &str) -> String {
        let Some(topic) = topic else {
            return DEFAULT_DEVICE_TOPIC.to_owned();
        };
        let key_path = format!("{prefix}.topic");
        self.placeholders(topic, &key_path, &["gateway", "device", "point"]);
        let text = topic.get_ref();
        if text.contains(['+', '#']) {
            self.d.error(
                Some(topic.span()),
                &key_path,
                format!("topic template {text:?} contains a wildcard (`+` or `#`)"),
            );
        } else if !text.contains("{point}") {
            self.d
                .error(
                    Some(topic.span()),
                    &key_path,
                    format!("topic template {text:?} has no {{point}}, so every point would publish to the same topic"),
                )
                .hint = Some(format!("e.g. topic = \"{DEFAULT_DEVICE_TOPIC}\""));
        }
        text.clone()
    }

    /// A `{ template = .., content_type = .. }` table at `key`: compiled, and rendered once
    /// by `sample` so that a misspelt variable or an unknown filter is found by `check`,
    /// not on the first message. `None` (and an error) when it does not work.
    pub(crate) fn template(
        &mut self,
        raw: &RawTemplate,
        span: Range<usize>,
        key: &str,
        sample: impl FnOnce(&PayloadTemplate) -> Result<String, TemplateError>,
    ) -> Option<PayloadTemplate> {
        let Some(source) = &raw.template else {
            self.missing(span, format!("{key}.template"), None);
            return None;
        };
        if let Some(content_type) = &raw.content_type {
            if content_type.get_ref().trim().is_empty() {
                self.d.error(
                    Some(content_type.span()),
                    format!("{key}.content_type"),
                    "content type is empty",
                );
                return None;
            }
        }
        let content_type = raw.content_type.as_ref().map(|c| c.get_ref().as_str());
        let checked = PayloadTemplate::compile(source.get_ref(), content_type)
            .and_then(|template| sample(&template).map(|_| template));
        match checked {
            Ok(template) => Some(template),
            Err(error) => {
                self.d.error(
                    Some(source.span()),
                    format!("{key}.template"),
                    format!("the template does not work: {error}"),
                );
                None
            }
        }
    }

    fn payload(&mut self, payload: &Option<S<RawPayload>>, prefix: &str) -> PayloadFormat {
        let Some(payload) = payload else {
            return PayloadFormat::Json;
        };
        let key = format!("{prefix}.payload");
        match payload.get_ref() {
            RawPayload::Name(name) => match name.as_str() {
                "json" => PayloadFormat::Json,
                "plain" => PayloadFormat::Plain,
                "influx" => PayloadFormat::Influx,
                other => {
                    let diagnostic = self.d.error(
                        Some(payload.span()),
                        key,
                        format!("unknown payload format {other:?}, expected json, plain, influx or a table with a template"),
                    );
                    diagnostic.hint = closest(other, PAYLOAD_FORMATS)
                        .map(|close| format!("did you mean `{close}`?"))
                        .or_else(|| Some("e.g. payload = { template = '{\"v\": {{ value }}}', content_type = \"application/json\" }".to_owned()));
                    PayloadFormat::Json
                }
            },
            RawPayload::Template(raw) => self
                .template(raw, payload.span(), &key, |template| {
                    template.render(&sample_variables(&serde_json::json!(21.5)))
                })
                .map(|template| PayloadFormat::Template(Arc::new(template)))
                .unwrap_or(PayloadFormat::Json),
        }
    }
}

impl<'a> Checker<'a> {
    /// The diagnostics of one device's driver keys, for drivers that report through
    /// [`DeviceCheck`].
    pub(crate) fn device_check(&mut self) -> DeviceCheck<'_, 'a> {
        DeviceCheck {
            d: &mut self.d,
            reported: &self.reported,
            ok: true,
        }
    }
}

/// One serial port's settings, shared by Modbus RTU and serial line devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SerialPortConfig {
    pub path: String,
    /// Default 9600.
    pub baud: u32,
    pub parity: Parity,
    /// Default 8.
    pub data_bits: u8,
    /// 1 or 2, default 1.
    pub stop_bits: u8,
    /// Default none.
    pub flow_control: FlowControl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowControl {
    None,
    Software,
    Hardware,
}

const PARITIES: &[&str] = &["none", "even", "odd"];
const FLOW_CONTROLS: &[&str] = &["none", "software", "hardware"];
const DEFAULT_BAUD: u32 = 9600;

/// The diagnostics of one device, and whether any was recorded.
pub(crate) struct DeviceCheck<'v, 'a> {
    pub(crate) d: &'v mut Diagnostics<'a>,
    /// Key paths serde already reported (present but of the wrong type).
    pub(crate) reported: &'v HashSet<String>,
    pub(crate) ok: bool,
}

/// The raw serial port keys of a device.
pub(crate) struct RawPort<'r> {
    pub(crate) port: &'r Option<S<String>>,
    pub(crate) baud: &'r Option<S<i64>>,
    pub(crate) parity: &'r Option<S<String>>,
    pub(crate) data_bits: &'r Option<S<i64>>,
    pub(crate) stop_bits: &'r Option<S<i64>>,
    /// `None` for drivers without the key (Modbus RTU).
    pub(crate) flow_control: Option<&'r Option<S<String>>>,
}

/// What a driver accepts and defaults to.
pub(crate) struct PortRules {
    pub(crate) default_parity: Parity,
    pub(crate) bauds: RangeInclusive<u32>,
    pub(crate) data_bits: RangeInclusive<u8>,
    pub(crate) port_hint: &'static str,
    pub(crate) baud_hint: &'static str,
    pub(crate) data_bits_note: &'static str,
}

impl DeviceCheck<'_, '_> {
    pub(crate) fn error(
        &mut self,
        span: Option<Range<usize>>,
        key_path: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.ok = false;
        self.d.error(span, key_path, message)
    }

    pub(crate) fn missing(&mut self, span: Range<usize>, key_path: String, hint: Option<&str>) {
        self.ok = false;
        report_missing(self.d, self.reported, span, key_path, hint);
    }

    pub(crate) fn unknown(
        &mut self,
        value: &S<String>,
        key_path: &str,
        what: &str,
        known: &[&str],
    ) {
        let text = value.get_ref();
        let diagnostic = self.error(
            Some(value.span()),
            key_path,
            format!(
                "unknown {what} {text:?}, expected one of {}",
                known.join(", ")
            ),
        );
        if let Some(close) = closest(&text.to_ascii_lowercase(), known) {
            diagnostic.hint = Some(format!("did you mean `{close}`?"));
        }
    }

    pub(crate) fn duration(&mut self, value: &S<String>, key_path: &str) -> Option<Duration> {
        let duration = parse_duration(self.d, value, key_path, DURATION_HINT);
        self.ok &= duration.is_some();
        duration
    }

    pub(crate) fn positive_duration(
        &mut self,
        value: &Option<S<String>>,
        key_path: &str,
    ) -> Option<Duration> {
        let value = value.as_ref()?;
        let duration = self.duration(value, key_path)?;
        if duration.is_zero() {
            self.error(Some(value.span()), key_path, "must be more than zero");
            return None;
        }
        Some(duration)
    }

    /// Reconnect backoff bounds (`backoff_min`, `backoff_max`), each more than zero and
    /// min not above max. Default 1s..60s.
    pub(crate) fn backoff(
        &mut self,
        min: &Option<S<String>>,
        max: &Option<S<String>>,
        prefix: &str,
    ) -> (Duration, Duration) {
        let backoff_min = self
            .positive_duration(min, &format!("{prefix}.backoff_min"))
            .unwrap_or(DEFAULT_BACKOFF_MIN);
        let backoff_max = self
            .positive_duration(max, &format!("{prefix}.backoff_max"))
            .unwrap_or(DEFAULT_BACKOFF_MAX);
        if backoff_min > backoff_max {
            self.error(
                max.as_ref().map(S::span),
                format!("{prefix}.backoff_max"),
                "backoff_max is less than backoff_min",
            );
        }
        (backoff_min, backoff_max)
    }

    /// Path, baud, parity, data bits, stop bits and flow control of a serial port.
    pub(crate) fn serial_port(
        &mut self,
        raw: RawPort<'_>,
        span: Range<usize>,
        prefix: &str,
        rules: &PortRules,
    ) -> Option<SerialPortConfig> {
        let path = match raw.port {
            None => {
                self.missing(span, format!("{prefix}.port"), Some(rules.port_hint));
                None
            }
            Some(port) if port.get_ref().trim().is_empty() => {
                self.error(
                    Some(port.span()),
                    format!("{prefix}.port"),
                    "must not be empty",
                );
                None
            }
            Some(port) => Some(port.get_ref().trim().to_owned()),
        };
        let baud = match raw.baud {
            None => DEFAULT_BAUD,
            Some(baud) => match u32::try_from(*baud.get_ref()) {
                Ok(baud) if rules.bauds.contains(&baud) => baud,
                _ => {
                    self.error(
                        Some(baud.span()),
                        format!("{prefix}.baud"),
                        format!(
                            "{} is not a usable baud rate, expected {} to {}",
                            baud.get_ref(),
                            rules.bauds.start(),
                            rules.bauds.end()
                        ),
                    )
                    .hint = Some(rules.baud_hint.into());
                    DEFAULT_BAUD
                }
            },
        };
        let parity = match raw.parity {
            None => rules.default_parity,
            Some(parity) => match parity.get_ref().to_ascii_lowercase().as_str() {
                "none" => Parity::None,
                "even" => Parity::Even,
                "odd" => Parity::Odd,
                _ => {
                    self.unknown(parity, &format!("{prefix}.parity"), "parity", PARITIES);
                    rules.default_parity
                }
            },
        };
        let data_bits = match raw.data_bits {
            None => 8,
            Some(bits) => match u8::try_from(*bits.get_ref()) {
                Ok(n) if rules.data_bits.contains(&n) => n,
                _ => {
                    self.error(
                        Some(bits.span()),
                        format!("{prefix}.data_bits"),
                        format!(
                            "{} data bits, expected {} to {}{}",
                            bits.get_ref(),
                            rules.data_bits.start(),
                            rules.data_bits.end(),
                            rules.data_bits_note
                        ),
                    );
                    8
                }
            },
        };
        let stop_bits = match raw.stop_bits {
            None => 1,
            Some(bits) if matches!(bits.get_ref(), 1 | 2) => {
                u8::try_from(*bits.get_ref()).unwrap_or(1)
            }
            Some(bits) => {
                self.error(
                    Some(bits.span()),
                    format!("{prefix}.stop_bits"),
                    format!("{} stop bits, expected 1 or 2", bits.get_ref()),
                );
                1
            }
        };
        let flow_control = match raw.flow_control.and_then(Option::as_ref) {
            None => FlowControl::None,
            Some(flow) => match flow.get_ref().to_ascii_lowercase().as_str() {
                "none" => FlowControl::None,
                "software" | "xonxoff" | "xon/xoff" => FlowControl::Software,
                "hardware" | "rtscts" | "rts/cts" => FlowControl::Hardware,
                _ => {
                    self.unknown(
                        flow,
                        &format!("{prefix}.flow_control"),
                        "flow control",
                        FLOW_CONTROLS,
                    );
                    FlowControl::None
                }
            },
        };
        Some(SerialPortConfig {
            path: path?,
            baud,
            parity,
            data_bits,
            stop_bits,
            flow_control,
        })
    }
}
