//! Modbus device configuration: the raw serde structs for a `modbus-tcp` / `modbus-rtu`
//! device and their validation into [`ModbusConfig`]. The keys every device has (`name`,
//! `topic`, `payload`, `poll`) are read here but validated by `drivers::config`, which
//! also calls `validate` for the rest, so errors come out together with file, line and
//! key path (`devices[2].points[0].type: unknown type "flaot", ...`).
//!
//! Addresses are 0-based protocol addresses, as they travel in the request: the register a
//! manual calls "40001" (or "holding register 1") is `table = "holding", address = 0`.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::closest;
use crate::drivers::config::{DeviceCheck, PortRules, RawPort, SerialPortConfig};

type S<T> = Spanned<T>;

/// Protocol limits for one read request (Modbus application protocol, 6.1 to 6.4).
pub const MAX_REGISTERS_PER_REQUEST: u16 = 125;
pub const MAX_BITS_PER_REQUEST: u16 = 2000;

pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_TCP_UNIT: u8 = 1;
pub(crate) const DEFAULT_TCP_PORT: u16 = 502;
pub(crate) const DEFAULT_MAX_GAP_REGISTERS: u16 = 0;
pub(crate) const DEFAULT_MAX_GAP_BITS: u16 = 0;
/// `profile = "sunspec"`: the points come from the device's SunSpec models at run time.
pub const SUNSPEC_PROFILE: &str = "sunspec";

const TABLES: &[&str] = &["coil", "discrete", "holding", "input"];
const TYPES: &[&str] = &[
    "bool", "bit", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "string",
];
const ORDERS: &[&str] = &["ABCD", "CDAB", "BADC", "DCBA"];
const REPORTS: &[&str] = &["always", "change"];

/// A `[[devices]]` entry with `driver = "modbus-tcp"` or `"modbus-rtu"`: the common device
/// keys and every Modbus key (validation rejects the keys of the other transport).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModbusDevice {
    pub(crate) name: Option<S<String>>,
    pub(crate) driver: Option<S<String>>,
    pub(crate) topic: Option<S<String>>,
    pub(crate) payload: Option<S<crate::drivers::config::RawPayload>>,
    pub(crate) poll: Option<S<String>>,
    /// TCP: `host:port`.
    pub(crate) address: Option<S<String>>,
    /// TCP: `tcp` (MBAP framing, the default) or `rtu-over-tcp`.
    pub(crate) transport: Option<S<String>>,
    /// RTU: the serial port.
    pub(crate) port: Option<S<String>>,
    pub(crate) baud: Option<S<i64>>,
    pub(crate) parity: Option<S<String>>,
    pub(crate) data_bits: Option<S<i64>>,
    pub(crate) stop_bits: Option<S<i64>>,
    pub(crate) turnaround: Option<S<String>>,
    pub(crate) unit: Option<S<i64>>,
    pub(crate) timeout: Option<S<String>>,
    pub(crate) max_gap: Option<S<i64>>,
    pub(crate) max_bit_gap: Option<S<i64>>,
    pub(crate) max_registers_per_request: Option<S<i64>>,
    pub(crate) max_bits_per_request: Option<S<i64>>,
    pub(crate) backoff_min: Option<S<String>>,
    pub(crate) backoff_max: Option<S<String>>,
    pub(crate) write_multiple: Option<S<bool>>,
    /// A register map from `profiles/` (see `profile.rs`).
    pub(crate) profile: Option<S<String>>,
    pub(crate) points: Option<S<Vec<S<RawModbusPoint>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModbusPoint {
    pub(crate) name: Option<S<String>>,
    pub(crate) table: Option<S<String>>,
    pub(crate) address: Option<S<i64>>,
    #[serde(rename = "type")]
    pub(crate) kind: Option<S<String>>,
    pub(crate) bit: Option<S<i64>>,
    pub(crate) length: Option<S<i64>>,
    pub(crate) order: Option<S<String>>,
    pub(crate) scale: Option<S<f64>>,
    pub(crate) offset: Option<S<f64>>,
    pub(crate) unit: Option<S<String>>,
    pub(crate) poll: Option<S<String>>,
    pub(crate) report: Option<S<String>>,
    pub(crate) deadband: Option<S<f64>>,
    pub(crate) deadband_percent: Option<S<f64>>,
    pub(crate) min_interval: Option<S<String>>,
    pub(crate) max_interval: Option<S<String>>,
    pub(crate) writable: Option<S<bool>>,
}

/// A validated Modbus device (the part specific to Modbus).
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusConfig {
    pub transport: Transport,
    /// Unit id (slave address). TCP default 1; RTU required, 1 to 247.
    pub unit: u8,
    /// Longest wait for one response. Default 1s.
    pub timeout: Duration,
    /// RTU: pause after a transaction with this device before the bus carries the next
    /// frame (on top of the 3.5-character silent interval). Default 0.
    pub turnaround: Duration,
    pub limits: PlanLimits,
    /// Reconnect / retry backoff bounds. Default 1s..60s.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Write with FC15/FC16 (write multiple coils / registers) even for one coil or one
    /// register, for devices that implement only those. Default false (FC05/FC06).
    pub write_multiple: bool,
    /// `profile = "sunspec"`: after connecting, the driver reads the device's SunSpec
    /// model chain and adds a point per mapped SunSpec point (`sunspec.rs`).
    pub sunspec: bool,
    /// Report settings (`report`, deadbands, `min_interval`, `max_interval`, `unit`) for
    /// SunSpec points, by name: the entries of `points` without table and address of a
    /// `profile = "sunspec"` device. Their table, address and type mean nothing.
    pub sunspec_settings: Vec<Point>,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `host:port`, resolved at each connect.
    Tcp {
        address: String,
    },
    /// RTU frames (with CRC) over a TCP socket: a serial device server in transparent mode.
    RtuOverTcp {
        address: String,
    },
    Rtu(SerialSettings),
}

impl Transport {
    /// The TCP address a TCP transport connects to (devices at one address share a
    /// connection); `None` for a serial line.
    pub fn tcp_address(&self) -> Option<&str> {
        match self {
            Transport::Tcp { address } | Transport::RtuOverTcp { address } => Some(address),
            Transport::Rtu(_) => None,
        }
    }

    /// The driver name and framing, for summaries: `modbus-tcp`, `modbus-tcp (rtu-over-tcp)`,
    /// `modbus-rtu`.
    pub fn describe(&self) -> &'static str {
        match self {
            Transport::Tcp { .. } => "modbus-tcp",
            Transport::RtuOverTcp { .. } => "modbus-tcp (rtu-over-tcp)",
            Transport::Rtu(_) => "modbus-rtu",
        }
    }
}

/// What a Modbus RTU line accepts: even parity by default (the Modbus serial line
/// default), 7 or 8 data bits.
const RTU_PORT: PortRules = PortRules {
    default_parity: Parity::Even,
    bauds: 300..=4_000_000,
    data_bits: 7..=8,
    port_hint: "port = \"/dev/ttyUSB0\"",
    baud_hint: "common rates: 9600, 19200, 38400, 115200",
    data_bits_note: " (Modbus RTU uses 8)",
};

/// A Modbus RTU line's serial settings (the shared serial port type).
pub type SerialSettings = SerialPortConfig;
pub use crate::drivers::config::Parity;

impl SerialPortConfig {
    /// The RTU inter-frame silent interval: 3.5 character times at this baud rate, fixed at
    /// 1.75 ms above 19200 baud (Modbus over serial line, 2.5.1.1).
    pub fn silent_interval(&self) -> Duration {
        if self.baud > 19_200 {
            return Duration::from_micros(1750);
        }
        let parity_bits = u32::from(self.parity != Parity::None);
        let bits_per_char = 1 + u32::from(self.data_bits) + parity_bits + u32::from(self.stop_bits);
        let baud = u64::from(self.baud.max(1));
        // 3.5 characters = 7 half characters, in nanoseconds.
        Duration::from_nanos(7 * u64::from(bits_per_char) * 1_000_000_000 / (2 * baud))
    }
}

/// How reads are merged into requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// Most registers in one request: at most 125, lower for devices that need it.
    pub max_registers: u16,
    /// Most coils / discrete inputs in one request: at most 2000.
    pub max_bits: u16,
    /// Unused registers a request may read to join two points. Default 0: only adjacent
    /// points are merged, because many devices refuse a read that covers an unmapped
    /// register.
    pub max_gap_registers: u16,
    /// The same for coils and discrete inputs, counted in bits. Default 0.
    pub max_gap_bits: u16,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            max_registers: MAX_REGISTERS_PER_REQUEST,
            max_bits: MAX_BITS_PER_REQUEST,
            max_gap_registers: DEFAULT_MAX_GAP_REGISTERS,
            max_gap_bits: DEFAULT_MAX_GAP_BITS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Coil,
    Discrete,
    Holding,
    Input,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::Discrete => "discrete",
            Table::Holding => "holding",
            Table::Input => "input",
        }
    }

    /// Coils and discrete inputs hold bits; the other two hold 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// A coil or discrete input.
    Bool,
    /// Bit N (0 = least significant) of a register.
    Bit(u8),
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// ASCII text, two characters per register, NULs and trailing spaces trimmed.
    String {
        registers: u16,
    },
}

impl DataType {
    /// The register types whose name says all there is: `u16`, `i16`, `u32`, `i32`, `u64`,
    /// `i64`, `f32`, `f64` (not `bool`, `bit` or `string`, which need more keys).
    pub(crate) fn fixed(name: &str) -> Option<DataType> {
        Some(match name {
            "u16" => DataType::U16,
            "i16" => DataType::I16,
            "u32" => DataType::U32,
            "i32" => DataType::I32,
            "u64" => DataType::U64,
            "i64" => DataType::I64,
            "f32" => DataType::F32,
            "f64" => DataType::F64,
            _ => return None,
        })
    }

    /// Registers (or bits, for `Bool`) the type occupies.
    pub fn width(self) -> u16 {
        match self {
            DataType::Bool | DataType::Bit(_) | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String { registers } => registers,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::Bit(_) => "bit",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String { .. } => "string",
        }
    }
}

/// Byte and word order of a multi-register value, named by where the bytes of the
/// big-endian value `A B C D` travel: `ABCD` big-endian (the Modbus default), `CDAB` word
/// swap (low word first), `BADC` byte swap inside each word, `DCBA` little-endian. For
/// 64-bit values the word swap reverses all four words. 16-bit values only honour the
/// byte swap; strings only the byte swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Order {
    #[default]
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl Order {
    pub const ALL: [Order; 4] = [Order::Abcd, Order::Cdab, Order::Badc, Order::Dcba];

    pub fn name(self) -> &'static str {
        match self {
            Order::Abcd => "ABCD",
            Order::Cdab => "CDAB",
            Order::Badc => "BADC",
            Order::Dcba => "DCBA",
        }
    }

    /// Least significant word first.
    pub fn word_swap(self) -> bool {
        matches!(self, Order::Cdab | Order::Dcba)
    }

    /// Low byte first inside each register.
    pub fn byte_swap(self) -> bool {
        matches!(self, Order::Badc | Order::Dcba)
    }

    pub(crate) fn parse(text: &str) -> Option<Order> {
        match text.to_ascii_uppercase().as_str() {
            "ABCD" => Some(Order::Abcd),
            "CDAB" => Some(Order::Cdab),
            "BADC" => Some(Order::Badc),
            "DCBA" => Some(Order::Dcba),
            _ => None,
        }
    }
}

/// When a point's value is published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Report {
    /// Every poll (subject to `min_interval`).
    Always,
    /// When the value changes by more than the deadband, or at the heartbeat.
    Change(Deadband),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deadband {
    /// Any change.
    None,
    /// More than this much (in scaled units).
    Absolute(f64),
    /// More than this percentage of the last published value.
    Percent(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: String,
    pub table: Table,
    /// 0-based protocol address of the first register / bit.
    pub address: u16,
    pub data_type: DataType,
    pub order: Order,
    /// Published value = raw * scale + offset. Default 1 and 0.
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
    /// Overrides the device's poll interval.
    pub poll: Option<Duration>,
    pub report: Report,
    /// Least time between two publishes of this point. Default 0.
    pub min_interval: Duration,
    /// Publish an unchanged value after this long anyway (heartbeat).
    pub max_interval: Option<Duration>,
    pub writable: bool,
}

impl Point {
    /// Whether published values are the raw integers (no scale, no offset).
    pub fn is_unscaled(&self) -> bool {
        self.scale == 1.0 && self.offset == 0.0
    }

    /// One past the last register / bit the point occupies (as u32: may be 65536).
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.data_type.width())
    }
}

/// Validates the Modbus keys of one device. `span` is the device table's, `prefix` its key
/// path (`devices[2]`). `None` when anything is wrong; every problem is recorded through
/// `v`.
pub(crate) fn validate(
    raw: &RawModbusDevice,
    span: Range<usize>,
    prefix: &str,
    profile: Option<&super::profile::Profile>,
    sunspec: bool,
    mut v: DeviceCheck<'_, '_>,
) -> Option<ModbusConfig> {
    // A profile's planning limits are the defaults of the devices that use it.
    let profile_limits = profile.map(|p| p.limits.clone()).unwrap_or_default();
    let rtu = raw
        .driver
        .as_ref()
        .is_some_and(|driver| driver.get_ref() == "modbus-rtu");
    let driver = if rtu { "modbus-rtu" } else { "modbus-tcp" };

    // Keys of the other transport are mistakes worth naming.
    let foreign: Vec<(&str, Option<Range<usize>>)> = if rtu {
        vec![
            ("address", raw.address.as_ref().map(Spanned::span)),
            ("transport", raw.transport.as_ref().map(Spanned::span)),
        ]
    } else {
        vec![
            ("port", raw.port.as_ref().map(Spanned::span)),
            ("baud", raw.baud.as_ref().map(Spanned::span)),
            ("parity", raw.parity.as_ref().map(Spanned::span)),
            ("data_bits", raw.data_bits.as_ref().map(Spanned::span)),
            ("stop_bits", raw.stop_bits.as_ref().map(Spanned::span)),
            ("turnaround", raw.turnaround.as_ref().map(Spanned::span)),
        ]
    };
    for (key, key_span) in foreign {
        if let Some(key_span) = key_span {
            let hint = if rtu {
                "a modbus-rtu device takes port, baud, parity, data_bits, stop_bits"
            } else {
                "a modbus-tcp device takes address = \"host:port\""
            };
            v.error(
                Some(key_span),
                format!("{prefix}.{key}"),
                format!("`{key}` is not used by driver {driver}"),
            )
            .hint = Some(hint.into());
        }
    }

    let transport = if rtu {
        v.serial_port(
            RawPort {
                port: &raw.port,
                baud: &raw.baud,
                parity: &raw.parity,
                data_bits: &raw.data_bits,
                stop_bits: &raw.stop_bits,
                flow_control: None,
            },
            span.clone(),
            prefix,
            &RTU_PORT,
        )
        .map(Transport::Rtu)
    } else {
        v.tcp_address(raw, span.clone(), prefix)
    };

    let unit = match &raw.unit {
        None if rtu => {
            v.missing(
                span.clone(),
                format!("{prefix}.unit"),
                Some("the unit id (slave address) of the device on the bus, 1 to 247"),
            );
            None
        }
        None => Some(DEFAULT_TCP_UNIT),
        Some(unit) => {
            let (min, max) = if rtu { (1, 247) } else { (0, 255) };
            let n = *unit.get_ref();
            if n < min || n > max {
                let diagnostic = v.error(
                    Some(unit.span()),
                    format!("{prefix}.unit"),
                    format!("unit {n} is out of range, expected {min} to {max}"),
                );
                if rtu && n == 0 {
                    diagnostic.hint =
                        Some("unit 0 is the broadcast address: no device answers it".into());
                }
                None
            } else {
                u8::try_from(n).ok()
            }
        }
    };

    let timeout = v
        .positive_duration(&raw.timeout, &format!("{prefix}.timeout"))
        .unwrap_or(DEFAULT_TIMEOUT);
    let turnaround = match &raw.turnaround {
        Some(value) => v
            .duration(value, &format!("{prefix}.turnaround"))
            .unwrap_or_default(),
        None => Duration::ZERO,
    };
    let (backoff_min, backoff_max) = v.backoff(&raw.backoff_min, &raw.backoff_max, prefix);

    let limits = PlanLimits {
        max_registers: v.small(
            &raw.max_registers_per_request,
            &format!("{prefix}.max_registers_per_request"),
            1,
            MAX_REGISTERS_PER_REQUEST,
            profile_limits
                .max_registers
                .unwrap_or(MAX_REGISTERS_PER_REQUEST),
        ),
        max_bits: v.small(
            &raw.max_bits_per_request,
            &format!("{prefix}.max_bits_per_request"),
            1,
            MAX_BITS_PER_REQUEST,
            MAX_BITS_PER_REQUEST,
        ),
        max_gap_registers: v.small(
            &raw.max_gap,
            &format!("{prefix}.max_gap"),
            0,
            MAX_REGISTERS_PER_REQUEST,
            profile_limits.max_gap.unwrap_or(DEFAULT_MAX_GAP_REGISTERS),
        ),
        max_gap_bits: v.small(
            &raw.max_bit_gap,
            &format!("{prefix}.max_bit_gap"),
            0,
            MAX_BITS_PER_REQUEST,
            DEFAULT_MAX_GAP_BITS,
        ),
    };

    let mut points = Vec::new();
    let mut sunspec_settings = Vec::new();
    match &raw.points {
        None if profile.is_some() || sunspec => {}
        None => v.missing(
            span,
            format!("{prefix}.points"),
            Some("e.g. points = [{ name = \"power\", table = \"holding\", address = 12, type = \"f32:CDAB\" }]"),
        ),
        Some(list) if list.get_ref().is_empty() => {
            v.error(
                Some(list.span()),
                format!("{prefix}.points"),
                "a Modbus device needs at least one point",
            );
        }
        Some(list) => {
            let mut names: HashMap<String, usize> = HashMap::new();
            for (index, point) in list.get_ref().iter().enumerate() {
                let point_prefix = format!("{prefix}.points[{index}]");
                let inner = point.get_ref();
                if sunspec && inner.table.is_none() && inner.address.is_none() {
                    if let Some(settings) = v.sunspec_settings(point, &point_prefix, &mut names) {
                        sunspec_settings.push(settings);
                    }
                } else if let Some(point) = v.point(point, &point_prefix, &limits, &mut names) {
                    points.push(point);
                }
            }
        }
    }

    if !v.ok {
        return None;
    }
    if let Some(profile) = profile {
        points = super::profile::merge(&profile.points, points);
    }
    Some(ModbusConfig {
        transport: transport?,
        unit: unit?,
        timeout,
        turnaround,
        limits,
        backoff_min,
        backoff_max,
        write_multiple: raw.write_multiple.as_ref().is_some_and(|w| *w.get_ref()),
        sunspec,
        sunspec_settings,
        points,
    })
}

impl DeviceCheck<'_, '_> {
    /// An optional integer in `min..=max` that fits a u16.
    fn small(
        &mut self,
        value: &Option<S<i64>>,
        key_path: &str,
        min: u16,
        max: u16,
        default: u16,
    ) -> u16 {
        let Some(value) = value else {
            return default;
        };
        let n = *value.get_ref();
        match u16::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.error(
                    Some(value.span()),
                    key_path,
                    format!("{n} is out of range, expected {min} to {max}"),
                );
                default
            }
        }
    }

    fn tcp_address(
        &mut self,
        raw: &RawModbusDevice,
        span: Range<usize>,
        prefix: &str,
    ) -> Option<Transport> {
        let key_path = format!("{prefix}.address");
        let Some(address) = &raw.address else {
            self.missing(span, key_path, Some("address = \"192.168.1.50:502\""));
            return None;
        };
        let text = address.get_ref().trim();
        let (host, port) = match text.rsplit_once(':') {
            // An IPv6 address without brackets has colons but no port.
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, Some(port)),
            _ => (text, None),
        };
        let port = match port {
            None => DEFAULT_TCP_PORT,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => {
                    self.error(
                        Some(address.span()),
                        key_path,
                        format!("invalid port {port:?} in {text:?}"),
                    )
                    .hint = Some("write address = \"host:port\", e.g. \"192.168.1.50:502\"".into());
                    return None;
                }
            },
        };
        if host.is_empty() || host.contains(['/', ' ']) {
            self.error(
                Some(address.span()),
                key_path,
                format!("invalid host in {text:?}"),
            )
            .hint = Some("write address = \"host:port\", e.g. \"192.168.1.50:502\"".into());
            return None;
        }
        let address = format!("{host}:{port}");
        match raw
            .transport
            .as_ref()
            .map(|t| (t.get_ref().as_str(), t.span()))
        {
            None | Some(("tcp", _)) => Some(Transport::Tcp { address }),
            Some(("rtu-over-tcp", _)) => Some(Transport::RtuOverTcp { address }),
            Some((other, span)) => {
                self.error(
                    Some(span),
                    format!("{prefix}.transport"),
                    format!("unknown transport {other:?}, expected \"tcp\" or \"rtu-over-tcp\""),
                )
                .hint = Some(
                    "rtu-over-tcp is for serial device servers in transparent mode; a Modbus TCP gateway is \"tcp\"".into(),
                );
                None
            }
        }
    }

    /// A `points` entry without table and address of a `profile = "sunspec"` device: how a
    /// SunSpec point of that name reports. Only the name, report keys and unit apply.
    fn sunspec_settings(
        &mut self,
        raw: &S<RawModbusPoint>,
        prefix: &str,
        names: &mut HashMap<String, usize>,
    ) -> Option<Point> {
        let span = raw.span();
        let raw = raw.get_ref();
        let ok_before = self.ok;
        self.ok = true;
        let name = match &raw.name {
            None => {
                self.missing(span, format!("{prefix}.name"), None);
                None
            }
            Some(name) => self.point_name(name, &format!("{prefix}.name"), names),
        };
        let foreign = [
            ("type", raw.kind.as_ref().map(Spanned::span)),
            ("bit", raw.bit.as_ref().map(Spanned::span)),
            ("length", raw.length.as_ref().map(Spanned::span)),
            ("order", raw.order.as_ref().map(Spanned::span)),
            ("scale", raw.scale.as_ref().map(Spanned::span)),
            ("offset", raw.offset.as_ref().map(Spanned::span)),
            ("poll", raw.poll.as_ref().map(Spanned::span)),
        ];
        for (key, key_span) in foreign {
            if let Some(key_span) = key_span {
                self.error(
                    Some(key_span),
                    format!("{prefix}.{key}"),
                    format!("`{key}` does not apply to a SunSpec point"),
                )
                .hint = Some(
                    "a point without table and address sets how a SunSpec point reports (report, deadband, min_interval, max_interval, unit) and whether it is writable; type and scale come from the device, and it is read with its model at the device's poll".into(),
                );
            }
        }
        let report = self.report(raw, prefix);
        let min_interval = match &raw.min_interval {
            Some(value) => self
                .duration(value, &format!("{prefix}.min_interval"))
                .unwrap_or_default(),
            None => Duration::ZERO,
        };
        let max_interval =
            self.positive_duration(&raw.max_interval, &format!("{prefix}.max_interval"));
        let point_ok = self.ok;
        self.ok = ok_before && point_ok;
        if !point_ok {
            return None;
        }
        Some(Point {
            name: name?,
            table: Table::Holding,
            address: 0,
            data_type: DataType::U16,
            order: Order::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: raw.unit.as_ref().map(|u| u.get_ref().clone()),
            poll: None,
            report,
            min_interval,
            max_interval,
            writable: raw.writable.as_ref().is_some_and(|w| *w.get_ref()),
        })
    }

    pub(crate) fn point(
        &mut self,
        raw: &S<RawModbusPoint>,
        prefix: &str,
        limits: &PlanLimits,
        names: &mut HashMap<String, usize>,
    ) -> Option<Point> {
        let span = raw.span();
        let raw = raw.get_ref();
        let ok_before = self.ok;
        self.ok = true;

        let name = match &raw.name {
            None => {
                self.missing(span.clone(), format!("{prefix}.name"), None);
                None
            }
            Some(name) => self.point_name(name, &format!("{prefix}.name"), names),
        };

        let table = match &raw.table {
            None => {
                self.missing(
                    span.clone(),
                    format!("{prefix}.table"),
                    Some("one of coil, discrete, holding, input"),
                );
                None
            }
            Some(table) => match table.get_ref().to_ascii_lowercase().as_str() {
                "coil" | "coils" => Some(Table::Coil),
                "discrete" | "discrete_input" | "discrete_inputs" => Some(Table::Discrete),
                "holding" | "holding_register" | "holding_registers" => Some(Table::Holding),
                "input" | "input_register" | "input_registers" => Some(Table::Input),
                _ => {
                    self.unknown(table, &format!("{prefix}.table"), "table", TABLES);
                    None
                }
            },
        };

        let address = match &raw.address {
            None => {
                self.missing(
                    span.clone(),
                    format!("{prefix}.address"),
                    Some("the 0-based protocol address, e.g. register \"40001\" in a manual is address = 0"),
                );
                None
            }
            Some(address) => match u16::try_from(*address.get_ref()) {
                Ok(address) => Some(address),
                Err(_) => {
                    let n = *address.get_ref();
                    let diagnostic = self.error(
                        Some(address.span()),
                        format!("{prefix}.address"),
                        format!("address {n} is out of range, expected 0 to 65535"),
                    );
                    if (300_001..=465_536).contains(&n) {
                        diagnostic.hint = Some(format!(
                            "addresses are 0-based protocol addresses: register {n} of a manual is table = \"{}\", address = {}",
                            if n >= 400_001 { "holding" } else { "input" },
                            (n - 1) % 100_000
                        ));
                    }
                    None
                }
            },
        };

        // `type = "f32:CDAB"` carries the order too.
        let (type_name, compact_order) = match &raw.kind {
            Some(kind) => match kind.get_ref().split_once(':') {
                Some((name, order)) => (
                    Some((name.trim().to_ascii_lowercase(), kind.span())),
                    Some(order.trim().to_owned()),
                ),
                None => (
                    Some((kind.get_ref().trim().to_ascii_lowercase(), kind.span())),
                    None,
                ),
            },
            None => (None, None),
        };
        let order = self.order(raw, compact_order.as_deref(), prefix);

        let data_type = match (table, type_name) {
            (None, _) => None,
            (Some(table), None) => Some(if table.is_bits() {
                DataType::Bool
            } else {
                DataType::U16
            }),
            (Some(table), Some((name, type_span))) => {
                self.data_type(raw, table, &name, type_span, span.clone(), limits, prefix)
            }
        };

        if let (Some(data_type), Some(order_span)) = (
            data_type,
            raw.order.as_ref().map(Spanned::span).or(compact_order
                .as_ref()
                .and(raw.kind.as_ref().map(Spanned::span))),
        ) {
            if matches!(data_type, DataType::Bool | DataType::Bit(_)) {
                self.error(
                    Some(order_span),
                    format!("{prefix}.order"),
                    format!("type {} has no byte order", data_type.name()),
                );
            }
        }

        if let (Some(address), Some(data_type)) = (address, data_type) {
            let end = u32::from(address) + u32::from(data_type.width());
            if end > 65_536 {
                self.error(
                    raw.address.as_ref().map(Spanned::span),
                    format!("{prefix}.address"),
                    format!(
                        "a {} at address {address} runs past the last address, 65535",
                        data_type.name()
                    ),
                );
            }
        }

        let scale = self
            .finite(&raw.scale, &format!("{prefix}.scale"))
            .unwrap_or(1.0);
        if scale == 0.0 {
            if let Some(value) = &raw.scale {
                self.error(
                    Some(value.span()),
                    format!("{prefix}.scale"),
                    "scale must not be zero",
                );
            }
        }
        let offset = self
            .finite(&raw.offset, &format!("{prefix}.offset"))
            .unwrap_or(0.0);
        if let (Some(DataType::Bool | DataType::Bit(_) | DataType::String { .. }), true) =
            (data_type, raw.scale.is_some() || raw.offset.is_some())
        {
            let key_span = raw
                .scale
                .as_ref()
                .or(raw.offset.as_ref())
                .map(Spanned::span);
            self.error(
                key_span,
                format!(
                    "{prefix}.{}",
                    if raw.scale.is_some() {
                        "scale"
                    } else {
                        "offset"
                    }
                ),
                "scale and offset apply only to numeric types",
            );
        }

        let poll = self.positive_duration(&raw.poll, &format!("{prefix}.poll"));
        let report = self.report(raw, prefix);
        let min_interval = match &raw.min_interval {
            Some(value) => self
                .duration(value, &format!("{prefix}.min_interval"))
                .unwrap_or_default(),
            None => Duration::ZERO,
        };
        let max_interval =
            self.positive_duration(&raw.max_interval, &format!("{prefix}.max_interval"));
        if let (Some(max), Some(value)) = (max_interval, &raw.max_interval) {
            if max < min_interval {
                self.error(
                    Some(value.span()),
                    format!("{prefix}.max_interval"),
                    "max_interval is shorter than min_interval",
                );
            }
        }

        let writable = raw.writable.as_ref().is_some_and(|w| *w.get_ref());
        if let (true, Some(table @ (Table::Discrete | Table::Input))) = (writable, table) {
            let key_span = raw.writable.as_ref().map(Spanned::span);
            self.error(
                key_span,
                format!("{prefix}.writable"),
                format!("{table} is a read-only table"),
            )
            .hint = Some("only coils and holding registers can be written".into());
        }

        let point_ok = self.ok;
        self.ok = ok_before && point_ok;
        if !point_ok {
            return None;
        }
        Some(Point {
            name: name?,
            table: table?,
            address: address?,
            data_type: data_type?,
            order,
            scale,
            offset,
            unit: raw.unit.as_ref().map(|u| u.get_ref().clone()),
            poll,
            report,
            min_interval,
            max_interval,
            writable,
        })
    }

    fn point_name(
        &mut self,
        name: &S<String>,
        key_path: &str,
        names: &mut HashMap<String, usize>,
    ) -> Option<String> {
        let text = name.get_ref();
        if text.is_empty() {
            self.error(Some(name.span()), key_path, "must not be empty");
            return None;
        }
        if !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            self.error(
                Some(name.span()),
                key_path,
                format!("{text:?} contains characters other than letters, digits, `_`, `.` and `-`"),
            )
            .hint = Some("point names appear in MQTT topics, where `/`, `+`, `#` and spaces would break them".into());
            return None;
        }
        let (line, _) = self.d.position(name.span().start);
        if let Some(other_line) = names.get(text) {
            self.error(
                Some(name.span()),
                key_path,
                format!("duplicate point name {text:?} in this device, first on line {other_line}"),
            );
        } else {
            names.insert(text.clone(), line);
        }
        Some(text.clone())
    }

    fn order(&mut self, raw: &RawModbusPoint, compact: Option<&str>, prefix: &str) -> Order {
        let key_path = format!("{prefix}.order");
        let explicit = raw
            .order
            .as_ref()
            .map(|o| (o.get_ref().as_str(), o.span(), key_path.clone()));
        let compact = compact
            .zip(raw.kind.as_ref())
            .map(|(o, kind)| (o, kind.span(), format!("{prefix}.type")));
        let mut result = None;
        for (text, span, key_path) in explicit.into_iter().chain(compact) {
            match Order::parse(text) {
                Some(order) => {
                    if let Some(previous) = result {
                        if previous != order {
                            self.error(
                                Some(span.clone()),
                                key_path.clone(),
                                format!(
                                    "the type says order {} but `order` says {}",
                                    order.name(),
                                    Order::name(previous)
                                ),
                            );
                        }
                    }
                    result = Some(order);
                }
                None => {
                    let diagnostic = self.error(
                        Some(span),
                        key_path,
                        format!(
                            "unknown order {text:?}, expected one of {}",
                            ORDERS.join(", ")
                        ),
                    );
                    diagnostic.hint = Some("ABCD big-endian, CDAB word swap, BADC byte swap, DCBA little-endian; `fieldmq probe` shows every order side by side".into());
                }
            }
        }
        result.unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn data_type(
        &mut self,
        raw: &RawModbusPoint,
        table: Table,
        name: &str,
        type_span: Range<usize>,
        point_span: Range<usize>,
        limits: &PlanLimits,
        prefix: &str,
    ) -> Option<DataType> {
        let key_path = format!("{prefix}.type");
        let data_type = match name {
            "bool" => DataType::Bool,
            "bit" => {
                let Some(bit) = &raw.bit else {
                    self.missing(
                        point_span,
                        format!("{prefix}.bit"),
                        Some("the bit of the register, 0 (least significant) to 15"),
                    );
                    return None;
                };
                match u8::try_from(*bit.get_ref()) {
                    Ok(n) if n < 16 => DataType::Bit(n),
                    _ => {
                        self.error(
                            Some(bit.span()),
                            format!("{prefix}.bit"),
                            format!(
                                "bit {} is out of range, expected 0 (least significant) to 15",
                                bit.get_ref()
                            ),
                        );
                        return None;
                    }
                }
            }
            fixed if DataType::fixed(fixed).is_some() => DataType::fixed(fixed)?,
            "string" => {
                let Some(length) = &raw.length else {
                    self.missing(
                        point_span,
                        format!("{prefix}.length"),
                        Some("the string's length in registers (two characters each)"),
                    );
                    return None;
                };
                match u16::try_from(*length.get_ref()) {
                    Ok(n) if (1..=limits.max_registers).contains(&n) => {
                        DataType::String { registers: n }
                    }
                    _ => {
                        self.error(
                            Some(length.span()),
                            format!("{prefix}.length"),
                            format!(
                                "length {} is out of range, expected 1 to {} registers",
                                length.get_ref(),
                                limits.max_registers
                            ),
                        );
                        return None;
                    }
                }
            }
            other => {
                let diagnostic = self.error(
                    Some(type_span),
                    key_path,
                    format!(
                        "unknown type {other:?}, expected one of {}",
                        TYPES.join(", ")
                    ),
                );
                let alias = match other {
                    "float" | "float32" | "real" | "flaot" | "flot" | "floar" => Some("f32"),
                    "double" | "float64" => Some("f64"),
                    "int" | "int16" | "short" => Some("i16"),
                    "uint16" | "word" => Some("u16"),
                    "int32" | "dint" | "long" => Some("i32"),
                    "uint32" | "dword" => Some("u32"),
                    "boolean" | "coil" => Some("bool"),
                    _ => None,
                };
                if let Some(close) = alias.or_else(|| closest(other, TYPES)) {
                    diagnostic.hint = Some(format!("did you mean `{close}`?"));
                }
                return None;
            }
        };
        for (key, present, used_by) in [
            ("bit", raw.bit.is_some(), "bit"),
            ("length", raw.length.is_some(), "string"),
        ] {
            if present && data_type.name() != used_by {
                let key_span = if key == "bit" {
                    raw.bit.as_ref().map(Spanned::span)
                } else {
                    raw.length.as_ref().map(Spanned::span)
                };
                self.error(
                    key_span,
                    format!("{prefix}.{key}"),
                    format!("`{key}` is only used by type {used_by}"),
                );
            }
        }
        match (table.is_bits(), data_type) {
            (true, DataType::Bool) | (false, DataType::Bit(_)) => {}
            (false, DataType::Bool) => {
                self.error(
                    Some(type_span),
                    key_path,
                    format!("type bool needs a coil or discrete input, but table is {table}"),
                )
                .hint = Some("for one bit of a register write type = \"bit\", bit = N".into());
                return None;
            }
            (true, other) => {
                self.error(
                    Some(type_span),
                    key_path,
                    format!(
                        "a {table} holds one bit, it cannot be read as {}",
                        other.name()
                    ),
                )
                .hint = Some("coils and discrete inputs are type = \"bool\"".into());
                return None;
            }
            (false, _) => {}
        }
        if !matches!(data_type, DataType::String { .. })
            && !table.is_bits()
            && data_type.width() > limits.max_registers
        {
            self.error(
                Some(type_span),
                key_path,
                format!(
                    "a {} needs {} registers, more than max_registers_per_request ({})",
                    data_type.name(),
                    data_type.width(),
                    limits.max_registers
                ),
            );
            return None;
        }
        Some(data_type)
    }

    fn report(&mut self, raw: &RawModbusPoint, prefix: &str) -> Report {
        let deadband = match (&raw.deadband, &raw.deadband_percent) {
            (Some(_), Some(percent)) => {
                self.error(
                    Some(percent.span()),
                    format!("{prefix}.deadband_percent"),
                    "give either deadband or deadband_percent, not both",
                );
                None
            }
            (Some(absolute), None) => self
                .non_negative(absolute, &format!("{prefix}.deadband"))
                .map(Deadband::Absolute),
            (None, Some(percent)) => self
                .non_negative(percent, &format!("{prefix}.deadband_percent"))
                .map(Deadband::Percent),
            (None, None) => None,
        };
        match &raw.report {
            None => deadband.map_or(Report::Always, Report::Change),
            Some(report) => match report.get_ref().as_str() {
                "change" => Report::Change(deadband.unwrap_or(Deadband::None)),
                "always" => {
                    if let Some(span) = raw
                        .deadband
                        .as_ref()
                        .or(raw.deadband_percent.as_ref())
                        .map(Spanned::span)
                    {
                        self.error(
                            Some(span),
                            format!(
                                "{prefix}.{}",
                                if raw.deadband.is_some() {
                                    "deadband"
                                } else {
                                    "deadband_percent"
                                }
                            ),
                            "a deadband applies only to report = \"change\"",
                        )
                        .hint = Some(
                            "remove report = \"always\" (a deadband implies \"change\")".into(),
                        );
                    }
                    Report::Always
                }
                _ => {
                    self.unknown(report, &format!("{prefix}.report"), "report mode", REPORTS);
                    Report::Always
                }
            },
        }
    }

    fn finite(&mut self, value: &Option<S<f64>>, key_path: &str) -> Option<f64> {
        let value = value.as_ref()?;
        if !value.get_ref().is_finite() {
            self.error(Some(value.span()), key_path, "must be a finite number");
            return None;
        }
        Some(*value.get_ref())
    }

    fn non_negative(&mut self, value: &S<f64>, key_path: &str) -> Option<f64> {
        let n = *value.get_ref();
        if !n.is_finite() || n < 0.0 {
            self.error(
                Some(value.span()),
                key_path,
                format!("must be a number of at least 0, found {n}"),
            );
            return None;
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_interval_is_three_and_a_half_characters_up_to_19200_baud() {
        let mut serial = SerialSettings {
            path: "/dev/null".into(),
            baud: 9600,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
            flow_control: crate::drivers::config::FlowControl::None,
        };
        // 11 bits per character at 9600 baud: 3.5 * 11 / 9600 s = 4.0104 ms.
        assert_eq!(serial.silent_interval(), Duration::from_nanos(4_010_416));
        serial.baud = 19_200;
        assert_eq!(serial.silent_interval(), Duration::from_nanos(2_005_208));
        serial.baud = 115_200;
        assert_eq!(serial.silent_interval(), Duration::from_micros(1750));
    }

    #[test]
    fn orders_name_their_swaps() {
        assert!(!Order::Abcd.word_swap() && !Order::Abcd.byte_swap());
        assert!(Order::Cdab.word_swap() && !Order::Cdab.byte_swap());
        assert!(!Order::Badc.word_swap() && Order::Badc.byte_swap());
        assert!(Order::Dcba.word_swap() && Order::Dcba.byte_swap());
        assert_eq!(Order::parse("cdab"), Some(Order::Cdab));
    }
}
