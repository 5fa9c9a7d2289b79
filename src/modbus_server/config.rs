//! The `[[modbus_servers]]` array: Modbus TCP servers that answer SCADA systems and PLCs
//! from the gateway's current values. Its types, their defaults (each written once, below)
//! and the section's validation, which needs the validated devices: a map entry names a
//! device's point, which must exist and publish a payload the server can read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeValue;
use toml::Spanned;

use crate::config::{closest, Checker, S};
use crate::drivers::config::{DeviceConfig, DriverConfig, PayloadFormat};
use crate::drivers::modbus::codec;
use crate::drivers::modbus::config::{DataType, Order, Point, Report, Table};
use crate::model::Value;

/// Connections served at once; past it a new connection is closed at once.
const DEFAULT_MAX_CONNECTIONS: usize = 16;
/// A connection that sends no request for this long is closed (also a client that stops
/// reading its answers).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a write from a client waits for the device's result.
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

const TABLES: &[(&str, Table)] = &[
    ("coil", Table::Coil),
    ("discrete", Table::Discrete),
    ("holding", Table::Holding),
    ("input", Table::Input),
];
const REGISTER_TYPES: &[&str] = &[
    "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "string",
];

/// What a read answers for an entry whose value is bad (or not yet known).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BadQuality {
    /// Exception 4, server device failure, for the whole request.
    Exception,
    /// The sentinel, encoded in the entry's type (coils and discrete inputs read 0).
    Sentinel(f64),
}

/// Where a map entry's value comes from and where its writes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A device's point: readings from its topic, writes through `<point topic>/set`.
    Point { device: String, point: String },
    /// Any MQTT topic: its last message is the value, writes are published on it.
    Topic(String),
}

/// One run of registers or bits mapped to one value.
#[derive(Debug, Clone, PartialEq)]
pub struct MapEntry {
    /// The one unit id it answers for; `None`: every unit id the server answers.
    pub unit: Option<u8>,
    pub table: Table,
    pub address: u16,
    pub data_type: DataType,
    pub order: Order,
    /// value = register × scale + offset, as a device point's. Default 1 and 0.
    pub scale: f64,
    pub offset: f64,
    pub source: Source,
    /// Clients may write it (coils and holding registers only). Default false.
    pub writable: bool,
}

impl MapEntry {
    /// Registers or bits it covers.
    pub fn width(&self) -> u16 {
        self.data_type.width()
    }

    /// One past its last register or bit (as u32: may be 65536).
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.width())
    }

    /// The entry as a driver point, for the driver's codec.
    pub fn point(&self) -> Point {
        Point {
            name: String::new(),
            table: self.table,
            address: self.address,
            data_type: self.data_type,
            order: self.order,
            scale: self.scale,
            offset: self.offset,
            unit: None,
            poll: None,
            report: Report::Always,
            min_interval: Duration::ZERO,
            max_interval: None,
            writable: self.writable,
        }
    }
}

/// A validated `[[modbus_servers]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusServerConfig {
    /// Listen address; port 0 picks a free port (the bound address is logged).
    pub bind: SocketAddr,
    /// The unit ids answered; empty: every unit id. A request to another unit answers
    /// exception 11 (gateway target device failed to respond).
    pub unit_ids: Vec<u8>,
    /// Connections at once. Default 16.
    pub max_connections: usize,
    /// A connection idle this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// A write waits this long for the device's result. Default 5 s.
    pub write_timeout: Duration,
    /// What a bad or unknown value reads as. Default exception 4.
    pub bad_quality: BadQuality,
    pub map: Vec<MapEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModbusServer {
    pub(crate) bind: Option<S<String>>,
    pub(crate) unit_ids: Option<S<Vec<S<i64>>>>,
    pub(crate) max_connections: Option<S<i64>>,
    pub(crate) idle_timeout: Option<S<String>>,
    pub(crate) write_timeout: Option<S<String>>,
    pub(crate) bad_quality: Option<S<String>>,
    pub(crate) sentinel: Option<S<f64>>,
    pub(crate) map: Option<S<Vec<S<RawMapEntry>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMapEntry {
    pub(crate) unit: Option<S<i64>>,
    pub(crate) table: Option<S<String>>,
    pub(crate) address: Option<S<i64>>,
    #[serde(rename = "type")]
    pub(crate) kind: Option<S<String>>,
    pub(crate) order: Option<S<String>>,
    pub(crate) length: Option<S<i64>>,
    pub(crate) scale: Option<S<f64>>,
    pub(crate) offset: Option<S<f64>>,
    pub(crate) device: Option<S<String>>,
    pub(crate) point: Option<S<String>>,
    pub(crate) topic: Option<S<String>>,
    pub(crate) writable: Option<S<bool>>,
}

impl Checker<'_> {
    /// The `[[modbus_servers]]` array; `devices` are the valid devices (a device with
    /// errors is reported on its own and not named again here).
    pub(crate) fn modbus_servers(
        &mut self,
        value: Spanned<DeValue<'_>>,
        devices: &[DeviceConfig],
    ) -> Vec<Option<ModbusServerConfig>> {
        let Some(array) = self.array_of_tables(
            value,
            "modbus_servers",
            "write each server as [[modbus_servers]]",
        ) else {
            return vec![None];
        };
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        let mut servers = Vec::new();
        for (index, item) in array.into_iter().enumerate() {
            let prefix = format!("modbus_servers[{index}]");
            let server = self
                .deserialize::<S<RawModbusServer>>(item, &prefix)
                .and_then(|raw| self.modbus_server(raw, &prefix, devices));
            if let Some(server) = &server {
                if server.bind.port() != 0 {
                    if let Some(other) = binds.insert(server.bind, index) {
                        self.d.error(
                            None,
                            format!("{prefix}.bind"),
                            format!(
                                "{} is already the address of modbus_servers[{other}]",
                                server.bind
                            ),
                        );
                    }
                }
            }
            servers.push(server);
        }
        servers
    }

    fn modbus_server(
        &mut self,
        raw: S<RawModbusServer>,
        prefix: &str,
        devices: &[DeviceConfig],
    ) -> Option<ModbusServerConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let key = |k: &str| format!("{prefix}.{k}");
        let bind = match &raw.bind {
            Some(bind) => match bind.get_ref().parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.d
                        .error(
                            Some(bind.span()),
                            key("bind"),
                            format!("invalid listen address {:?}", bind.get_ref()),
                        )
                        .hint = Some("write ip:port, e.g. \"0.0.0.0:502\"".to_owned());
                    None
                }
            },
            None => {
                self.missing(
                    span.clone(),
                    key("bind"),
                    Some("e.g. bind = \"0.0.0.0:502\""),
                );
                None
            }
        };
        let mut unit_ids = Vec::new();
        let mut units_ok = true;
        if let Some(ids) = &raw.unit_ids {
            for (i, id) in ids.get_ref().iter().enumerate() {
                match u8::try_from(*id.get_ref()) {
                    Ok(unit) if !unit_ids.contains(&unit) => unit_ids.push(unit),
                    Ok(unit) => {
                        self.d.error(
                            Some(id.span()),
                            format!("{prefix}.unit_ids[{i}]"),
                            format!("unit id {unit} is listed twice"),
                        );
                        units_ok = false;
                    }
                    Err(_) => {
                        self.d.error(
                            Some(id.span()),
                            format!("{prefix}.unit_ids[{i}]"),
                            format!("{} is out of range, expected 0 to 255", id.get_ref()),
                        );
                        units_ok = false;
                    }
                }
            }
        }
        let max_connections = self.integer(
            &raw.max_connections,
            &key("max_connections"),
            1,
            4096,
            DEFAULT_MAX_CONNECTIONS as i64,
        ) as usize;
        let idle_timeout = self.positive_duration(
            &raw.idle_timeout,
            &key("idle_timeout"),
            DEFAULT_IDLE_TIMEOUT,
        );
        let write_timeout = self.positive_duration(
            &raw.write_timeout,
            &key("write_timeout"),
            DEFAULT_WRITE_TIMEOUT,
        );
        let bad_quality = match &raw.bad_quality {
            None => Some(BadQuality::Exception),
            Some(choice) => match self.choice(
                choice,
                &key("bad_quality"),
                "bad_quality",
                &[("exception", false), ("sentinel", true)],
                None,
            ) {
                Some(false) => Some(BadQuality::Exception),
                Some(true) => match &raw.sentinel {
                    Some(sentinel) => Some(BadQuality::Sentinel(*sentinel.get_ref())),
                    None => {
                        self.missing(
                            choice.span(),
                            key("sentinel"),
                            Some("the number a bad value reads as, e.g. sentinel = -9999"),
                        );
                        None
                    }
                },
                None => None,
            },
        };
        if let (Some(sentinel), Some(BadQuality::Exception)) = (&raw.sentinel, bad_quality) {
            self.d
                .error(
                    Some(sentinel.span()),
                    key("sentinel"),
                    "`sentinel` is only used with bad_quality = \"sentinel\"",
                )
                .hint = Some("add bad_quality = \"sentinel\", or remove `sentinel`".into());
        }
        let map = match &raw.map {
            Some(map) => self.server_map(map, prefix, devices, bad_quality, &unit_ids),
            None => {
                self.missing(
                    span,
                    key("map"),
                    Some("e.g. map = [{ table = \"holding\", address = 0, device = \"meter\", point = \"power\", type = \"f32\" }]"),
                );
                None
            }
        };
        units_ok.then_some(())?;
        Some(ModbusServerConfig {
            bind: bind?,
            unit_ids,
            max_connections,
            idle_timeout,
            write_timeout,
            bad_quality: bad_quality?,
            map: map?,
        })
    }

    fn server_map(
        &mut self,
        map: &S<Vec<S<RawMapEntry>>>,
        prefix: &str,
        devices: &[DeviceConfig],
        bad_quality: Option<BadQuality>,
        unit_ids: &[u8],
    ) -> Option<Vec<MapEntry>> {
        let mut entries = Vec::new();
        let mut ok = true;
        for (index, raw) in map.get_ref().iter().enumerate() {
            let entry_prefix = format!("{prefix}.map[{index}]");
            match self.map_entry(raw, &entry_prefix, devices, bad_quality, unit_ids) {
                Some(entry) => entries.push((entry, index, raw.span())),
                None => ok = false,
            }
        }
        // Overlaps: per table, sorted by address, an entry must end before any later one
        // that shares a unit with it (an entry without `unit` shares every unit). Bounded
        // by the entries after it that start inside it.
        let mut sorted: Vec<&(MapEntry, usize, std::ops::Range<usize>)> = entries.iter().collect();
        sorted.sort_by_key(|(entry, _, _)| (entry.table.name(), entry.address));
        let shares_unit =
            |a: &MapEntry, b: &MapEntry| a.unit.is_none() || b.unit.is_none() || a.unit == b.unit;
        let mut overlaps = Vec::new();
        for (i, (a, a_index, _)) in sorted.iter().enumerate() {
            for (b, b_index, b_span) in sorted[i + 1..]
                .iter()
                .take_while(|(b, _, _)| b.table == a.table && a.end() > u32::from(b.address))
            {
                if shares_unit(a, b) {
                    overlaps.push((a, *a_index, b, *b_index, b_span.clone()));
                }
            }
        }
        for (a, a_index, b, b_index, b_span) in overlaps {
            self.d.error(
                Some(b_span),
                format!("{prefix}.map[{b_index}]"),
                format!(
                    "{} {}..={} overlaps {prefix}.map[{a_index}] ({} {}..={}){}",
                    b.table,
                    b.address,
                    b.end() - 1,
                    a.table,
                    a.address,
                    a.end() - 1,
                    match (a.unit, b.unit) {
                        (Some(unit), Some(_)) => format!(" on unit {unit}"),
                        (None, _) | (_, None) => String::new(),
                    }
                ),
            );
            ok = false;
        }
        ok.then(|| entries.into_iter().map(|(entry, _, _)| entry).collect())
    }

    fn map_entry(
        &mut self,
        raw: &S<RawMapEntry>,
        prefix: &str,
        devices: &[DeviceConfig],
        bad_quality: Option<BadQuality>,
        unit_ids: &[u8],
    ) -> Option<MapEntry> {
        let span = raw.span();
        let r = raw.get_ref();
        let key = |k: &str| format!("{prefix}.{k}");
        let table = match &r.table {
            Some(table) => self.choice(table, &key("table"), "table", TABLES, None),
            None => {
                self.missing(
                    span.clone(),
                    key("table"),
                    Some("coil, discrete, holding or input"),
                );
                None
            }
        };
        let address = match &r.address {
            Some(address) => match u16::try_from(*address.get_ref()) {
                Ok(a) => Some(a),
                Err(_) => {
                    self.d.error(
                        Some(address.span()),
                        key("address"),
                        format!(
                            "{} is out of range, expected a 0-based protocol address 0 to 65535",
                            address.get_ref()
                        ),
                    );
                    None
                }
            },
            None => {
                self.missing(span.clone(), key("address"), None);
                None
            }
        };
        let table = table?;
        let (data_type, order) = self.entry_type(r, table, prefix)?;
        let scale = r.scale.as_ref().map_or(1.0, |s| *s.get_ref());
        let offset = r.offset.as_ref().map_or(0.0, |s| *s.get_ref());
        if let Some(s) = &r.scale {
            if *s.get_ref() == 0.0 || !s.get_ref().is_finite() {
                self.d.error(
                    Some(s.span()),
                    key("scale"),
                    "scale must be a finite number other than 0",
                );
                return None;
            }
        }
        let writable = r.writable.as_ref().is_some_and(|w| *w.get_ref());
        if writable && !matches!(table, Table::Coil | Table::Holding) {
            if let Some(w) = &r.writable {
                self.d
                    .error(
                        Some(w.span()),
                        key("writable"),
                        format!("{table} entries cannot be written by a Modbus client"),
                    )
                    .hint =
                    Some("map the value to a coil or holding register to accept writes".into());
            }
            return None;
        }
        let unit = match &r.unit {
            None => None,
            Some(unit) => match u8::try_from(*unit.get_ref()) {
                Ok(id) if unit_ids.is_empty() || unit_ids.contains(&id) => Some(id),
                Ok(id) => {
                    self.d
                        .error(
                            Some(unit.span()),
                            key("unit"),
                            format!("unit {id} is not one of the server's unit_ids {unit_ids:?}"),
                        )
                        .hint = Some(format!("add {id} to unit_ids, or remove `unit`"));
                    return None;
                }
                Err(_) => {
                    self.d.error(
                        Some(unit.span()),
                        key("unit"),
                        format!("{} is out of range, expected 0 to 255", unit.get_ref()),
                    );
                    return None;
                }
            },
        };
        let source = self.entry_source(r, span.clone(), prefix, devices)?;
        let address = address?;
        let entry = MapEntry {
            unit,
            table,
            address,
            data_type,
            order,
            scale,
            offset,
            source,
            writable,
        };
        if entry.end() > 0x1_0000 {
            self.d.error(
                Some(span),
                prefix,
                format!(
                    "{} {}.. with {} register(s) runs past address 65535",
                    table,
                    address,
                    entry.width()
                ),
            );
            return None;
        }
        if let Some(BadQuality::Sentinel(sentinel)) = bad_quality {
            if !table.is_bits() {
                if let Err(error) =
                    codec::encode(&entry.point(), &sentinel_value(sentinel, data_type))
                {
                    self.d.error(
                        Some(raw.span()),
                        prefix,
                        format!("the sentinel does not fit this entry: {error}"),
                    );
                    return None;
                }
            }
        }
        Some(entry)
    }

    fn entry_type(
        &mut self,
        r: &RawMapEntry,
        table: Table,
        prefix: &str,
    ) -> Option<(DataType, Order)> {
        let key = |k: &str| format!("{prefix}.{k}");
        let (name, compact_order, type_span) = match &r.kind {
            Some(kind) => {
                let (name, order) = match kind.get_ref().split_once(':') {
                    Some((name, order)) => (name.to_owned(), Some(order.to_owned())),
                    None => (kind.get_ref().clone(), None),
                };
                (Some(name), order, Some(kind.span()))
            }
            None => (None, None, None),
        };
        let mut order = Order::default();
        for (text, span, key_path) in [
            (compact_order, type_span.clone(), key("type")),
            (
                r.order.as_ref().map(|o| o.get_ref().clone()),
                r.order.as_ref().map(Spanned::span),
                key("order"),
            ),
        ] {
            let Some(text) = text else { continue };
            match Order::parse(&text) {
                Some(parsed) => order = parsed,
                None => {
                    self.d
                        .error(span, key_path, format!("unknown order {text:?}"))
                        .hint = Some(
                        "ABCD big-endian, CDAB word swap, BADC byte swap, DCBA little-endian"
                            .into(),
                    );
                    return None;
                }
            }
        }
        if table.is_bits() {
            return match name.as_deref() {
                None | Some("bool") => Some((DataType::Bool, order)),
                Some(other) => {
                    self.d.error(
                        type_span,
                        key("type"),
                        format!("a {table} entry holds one bit: type \"bool\", not {other:?}"),
                    );
                    None
                }
            };
        }
        let name = name.unwrap_or_else(|| "u16".to_owned());
        let data_type = match name.as_str() {
            fixed if DataType::fixed(fixed).is_some() => DataType::fixed(fixed)?,
            "string" => match &r.length {
                Some(length) => match u16::try_from(*length.get_ref()) {
                    Ok(n) if (1..=125).contains(&n) => DataType::String { registers: n },
                    _ => {
                        self.d.error(
                            Some(length.span()),
                            key("length"),
                            format!(
                                "length {} is out of range, expected 1 to 125 registers",
                                length.get_ref()
                            ),
                        );
                        return None;
                    }
                },
                None => {
                    self.missing(
                        type_span.unwrap_or_default(),
                        key("length"),
                        Some("the string's length in registers (two characters each)"),
                    );
                    return None;
                }
            },
            other => {
                let diagnostic = self.d.error(
                    type_span,
                    key("type"),
                    format!(
                        "unknown type {other:?} for {table} registers, expected one of {}",
                        REGISTER_TYPES.join(", ")
                    ),
                );
                if let Some(close) = closest(other, REGISTER_TYPES) {
                    diagnostic.hint = Some(format!("did you mean `{close}`?"));
                }
                return None;
            }
        };
        if r.length.is_some() && !matches!(data_type, DataType::String { .. }) {
            self.d.error(
                r.length.as_ref().map(Spanned::span),
                key("length"),
                "`length` is only used by type string",
            );
            return None;
        }
        Some((data_type, order))
    }

    fn entry_source(
        &mut self,
        r: &RawMapEntry,
        span: std::ops::Range<usize>,
        prefix: &str,
        devices: &[DeviceConfig],
    ) -> Option<Source> {
        let key = |k: &str| format!("{prefix}.{k}");
        match (&r.device, &r.point, &r.topic) {
            (Some(device), Some(point), None) => {
                let Some(found) = devices.iter().find(|d| &d.name == device.get_ref()) else {
                    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
                    let diagnostic = self.d.error(
                        Some(device.span()),
                        key("device"),
                        format!("no device named {:?}", device.get_ref()),
                    );
                    diagnostic.hint = match closest(device.get_ref(), &names) {
                        Some(close) => Some(format!("did you mean `{close}`?")),
                        None if names.is_empty() => Some("no [[devices]] are configured".into()),
                        None => Some(format!("devices: {}", names.join(", "))),
                    };
                    return None;
                };
                if matches!(found.driver, DriverConfig::Serial(_)) {
                    self.d
                        .error(
                            Some(device.span()),
                            key("device"),
                            format!(
                                "device {:?} is a serial device: its frames are not single values",
                                found.name
                            ),
                        )
                        .hint =
                        Some("map the topic its rule publishes instead: topic = \"...\"".into());
                    return None;
                }
                if !matches!(found.payload, PayloadFormat::Json | PayloadFormat::Plain) {
                    self.d
                        .error(
                            Some(device.span()),
                            key("device"),
                            format!(
                                "device {:?} publishes payload {:?}; the Modbus server reads json and plain payloads only",
                                found.name,
                                found.payload.name()
                            ),
                        )
                        .hint = Some("set payload = \"json\" (the default) on the device".into());
                    return None;
                }
                if !found.may_have_point(point.get_ref()) {
                    let mut names: Vec<String> =
                        found.point_infos().into_iter().map(|p| p.name).collect();
                    if found.finds_points_at_run_time() {
                        names.extend(crate::drivers::modbus::sunspec::point_names());
                    }
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let diagnostic = self.d.error(
                        Some(point.span()),
                        key("point"),
                        format!(
                            "device {:?} has no point named {:?}",
                            found.name,
                            point.get_ref()
                        ),
                    );
                    diagnostic.hint = match closest(point.get_ref(), &names) {
                        Some(close) => Some(format!("did you mean `{close}`?")),
                        None if found.finds_points_at_run_time() => Some(
                            "a SunSpec device's points are named <prefix>_<point>, as `fieldmq profiles show sunspec` lists them".into(),
                        ),
                        None => Some(format!("its points: {}", names.join(", "))),
                    };
                    return None;
                }
                Some(Source::Point {
                    device: device.get_ref().clone(),
                    point: point.get_ref().clone(),
                })
            }
            (None, None, Some(topic)) => {
                let topic = self.topic(topic, &key("topic"));
                Some(Source::Topic(topic))
            }
            (Some(_), None, None) => {
                self.missing(
                    span,
                    key("point"),
                    Some("the device's point, e.g. point = \"power\""),
                );
                None
            }
            (None, Some(_), None) => {
                self.missing(span, key("device"), Some("the device the point belongs to"));
                None
            }
            (None, None, None) => {
                self.d
                    .error(
                        Some(span),
                        prefix,
                        "a map entry needs a device and point, or a topic",
                    )
                    .hint = Some(
                    "e.g. device = \"meter\", point = \"power\" or topic = \"plant/setpoint\""
                        .into(),
                );
                None
            }
            (_, _, Some(topic)) => {
                self.d.error(
                    Some(topic.span()),
                    key("topic"),
                    "a map entry takes either device and point, or a topic, not both",
                );
                None
            }
        }
    }
}

/// The sentinel as a value of an entry's type (text for a string entry: empty).
pub(crate) fn sentinel_value(sentinel: f64, data_type: DataType) -> Value {
    match data_type {
        DataType::String { .. } => Value::Text(String::new()),
        DataType::F32 | DataType::F64 => Value::Float(sentinel),
        _ if sentinel.fract() == 0.0 && sentinel.abs() < 9.2e18 => Value::Int(sentinel as i64),
        _ => Value::Float(sentinel),
    }
}
