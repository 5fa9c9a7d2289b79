//! From text to a validated [`Config`]: TOML syntax, then serde into the raw structs (one
//! section, device or uplink at a time, so that a type error in one does not hide the
//! others), then the semantic checks. Every problem becomes a [`Diagnostic`] with line and
//! key path; nothing stops at the first error.
//!
//! Defaults live here, in one place, next to the check of the key they belong to.
//!
//! [`Diagnostic`]: super::Diagnostic

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::mqtt::topic::valid_filter;
use crate::pem::PemContent as Pem;
use regex::Regex;
use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::{closest, ConfigError, Diagnostics};
use super::raw::{
    RawBroker, RawGateway, RawListener, RawListenerTls, RawQueue, RawReconnect, RawRoute,
    RawScalar, RawSimulatedDevice, RawSimulatedPoint, RawSize, RawUplink, RawWill, S,
};
use super::{
    BrokerConfig, Config, DeniedReason, DeviceConfig, DriverConfig, Durability, GatewayConfig,
    InRoute, ListenerConfig, ListenerTls, MqttVersion, OutRoute, PayloadFormat, QueueConfig,
    SecretSource, SimulatedConfig, SimulatedPoint, TlsConfig, UplinkConfig, UplinkUrl, UrlScheme,
    Waveform, WhenFull, WillConfig,
};
use crate::drivers::modbus::config::RawModbusDevice;
use crate::drivers::serial::config::RawSerialDevice;
use crate::model::{QoS, Value};

const TOP_LEVEL_KEYS: &[&str] = &["gateway", "broker", "devices", "uplinks"];
const DRIVERS: &[&str] = &["simulated", "modbus-tcp", "modbus-rtu", "serial"];
const WAVEFORMS: &[&str] = &["sine", "ramp", "random_walk", "constant"];

pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/fieldmq";
pub(crate) const DEFAULT_LOG_LEVEL: &str = "info";
pub(crate) const DEFAULT_STATUS_TOPIC: &str = "fieldmq/{gateway}/status";
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_LISTENER: &str = "127.0.0.1:1883";
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// Sockets in the handshake at once (TCP accepted, no CONNECT read yet), per listener.
pub(crate) const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Sockets (in the handshake or connected) from one IP address, per listener. Below
/// [`DEFAULT_MAX_HANDSHAKES`] so that one host cannot fill the handshake slots alone.
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// The whole pre-CONNECT phase: TLS and WebSocket handshakes and the CONNECT packet.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_MAX_PACKET_SIZE: u32 = 1024 * 1024;
/// The largest packet MQTT can encode: a 256 MiB remaining length plus the fixed header.
const MQTT_MAX_PACKET_SIZE: u64 = 268_435_455 + 5;
pub(crate) const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
pub(crate) const DEFAULT_BROKER_INFLIGHT: u16 = 20;
pub(crate) const DEFAULT_DEVICE_TOPIC: &str = "{gateway}/{device}/{point}";
pub(crate) const DEFAULT_POLL: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_PERIOD: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(3600);
pub(crate) const DEFAULT_UPLINK_INFLIGHT: u16 = 100;
pub(crate) const DEFAULT_RECONNECT_MIN: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_QUEUE_MESSAGES: u64 = 1_000_000;
pub(crate) const DEFAULT_QUEUE_BYTES: u64 = 256 * 1024 * 1024;
pub(crate) const DEFAULT_QUEUE_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub(crate) const DEFAULT_WS_PATH: &str = "/mqtt";
pub(crate) const DEFAULT_MAX_QUEUED_BYTES: u64 = 64 * 1024 * 1024;
/// Memory queued messages of persistent sessions share beyond each session's first 1,000.
pub(crate) const DEFAULT_QUEUE_MEMORY: u64 = 32 * 1024 * 1024;
pub(crate) const DEFAULT_COMMIT_WINDOW: Duration = Duration::from_millis(10);
/// A connected client that does not read for this long is disconnected.
pub(crate) const DEFAULT_SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_STORE_FILE: &str = "broker.db";
pub(crate) const DEFAULT_SYS_INTERVAL: Duration = Duration::from_secs(10);
const DURABILITIES: &[(&str, Durability)] = &[
    ("sync", Durability::Sync),
    ("batched", Durability::Batched),
    ("memory", Durability::Memory),
];
const DENIED_REASONS: &[(&str, DeniedReason)] = &[
    ("not-authorized", DeniedReason::NotAuthorized),
    ("unspecified-error", DeniedReason::Unspecified),
];

/// Parses and validates `text`; `source` names the file in diagnostics and relative paths
/// are resolved against its directory.
pub(crate) fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
    let mut diagnostics = Diagnostics::new(source, text);
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    let root = Spanned::new(document.span(), DeValue::Table(document.into_inner()));
    if !syntax_errors.is_empty() {
        for error in syntax_errors {
            let offset = error.span().map(|span| span.start);
            let key_path = offset
                .and_then(|offset| key_path_at(&root, offset).filter(|path| !path.is_empty()))
                .or_else(|| offset.and_then(|offset| key_path_from_text(text, offset)))
                .unwrap_or_default();
            match offset.and_then(|offset| bare_word(text, offset)) {
                Some(word) => {
                    diagnostics
                        .error(
                            error.span(),
                            key_path,
                            format!("expected a value, found the bare word `{word}`"),
                        )
                        .hint = Some(format!("strings must be quoted: \"{word}\""));
                }
                None => {
                    diagnostics.error(error.span(), key_path, error.message().to_owned());
                }
            }
        }
        return Err(diagnostics.into_error());
    }

    let mut v = Validator {
        d: diagnostics,
        base_dir: base_dir(source),
        data_dir: PathBuf::from(DEFAULT_DATA_DIR),
        gateway_id: String::from("gateway"),
        reported: HashSet::new(),
    };
    let config = v.document(root, source);
    if v.d.is_empty() {
        config.ok_or_else(|| v.d.into_error())
    } else {
        Err(v.d.into_error())
    }
}

/// The directory relative paths in the file are resolved against, made absolute so the
/// result does not depend on a later change of working directory.
fn base_dir(source: &Path) -> PathBuf {
    let parent = source.parent().unwrap_or(Path::new(""));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
}

/// The key path (`devices[1].points[0].min`) of the deepest key or value whose span holds
/// `offset`; `Some("")` when only `value` itself holds it.
fn key_path_at(value: &Spanned<DeValue<'_>>, offset: usize) -> Option<String> {
    let inside = |span: Range<usize>| span.start <= offset && offset < span.end.max(span.start + 1);
    match value.get_ref() {
        DeValue::Table(table) => {
            for (key, child) in table.iter() {
                let name = key.get_ref().as_ref();
                if let Some(rest) = key_path_at(child, offset) {
                    return Some(join_path(name, &rest));
                }
                if inside(key.span()) {
                    return Some(name.to_owned());
                }
            }
        }
        DeValue::Array(array) => {
            for (index, child) in array.iter().enumerate() {
                if let Some(rest) = key_path_at(child, offset) {
                    return Some(join_path(&format!("[{index}]"), &rest));
                }
            }
        }
        _ => {}
    }
    inside(value.span()).then(String::new)
}

/// An unquoted word where a value belongs (`log_level = info`), which TOML reports as a
/// broken float or boolean.
fn bare_word(text: &str, offset: usize) -> Option<&str> {
    let rest = text.get(offset..)?;
    let before = text.get(..offset)?.trim_end_matches([' ', '\t']);
    if !(before.ends_with('=') || before.ends_with('[') || before.ends_with(',')) {
        return None;
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
        .unwrap_or(rest.len());
    let word = &rest[..end];
    let starts_with_letter = word.starts_with(|c: char| c.is_ascii_alphabetic());
    (starts_with_letter && !["true", "false", "inf", "nan"].contains(&word)).then_some(word)
}

/// The key path of a syntax error from the text around it, for errors that leave no value
/// in the recovered document (an unclosed string): the table header above the line and
/// the key on the line, e.g. `devices[1].name`.
fn key_path_from_text(text: &str, offset: usize) -> Option<String> {
    static KEY: OnceLock<Regex> = OnceLock::new();
    static HEADER: OnceLock<Regex> = OnceLock::new();
    let key_re = KEY.get_or_init(|| {
        Regex::new(r"^\s*([A-Za-z0-9_-]+(?:\s*\.\s*[A-Za-z0-9_-]+)*)\s*=").expect("key regex")
    });
    let header_re = HEADER
        .get_or_init(|| Regex::new(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]").expect("header regex"));
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next().unwrap_or_default();
    let key: String = key_re
        .captures(line)?
        .get(1)?
        .as_str()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let earlier: Vec<&str> = text.get(..line_start)?.lines().collect();
    for (i, line) in earlier.iter().enumerate().rev() {
        if let Some(header) = header_re.captures(line) {
            let name = header.get(2).map_or("", |m| m.as_str());
            if header.get(1).is_some_and(|m| m.as_str() == "[[") {
                let index = earlier[..i]
                    .iter()
                    .filter_map(|l| header_re.captures(l))
                    .filter(|c| c.get(2).is_some_and(|m| m.as_str() == name))
                    .count();
                return Some(format!("{name}[{index}].{key}"));
            }
            return Some(format!("{name}.{key}"));
        }
    }
    Some(key)
}

/// Removes the deepest table entry whose key or value holds `offset`; false when no entry
/// does (the offset is on the part's own header).
fn remove_entry_at(value: &mut Spanned<DeValue<'_>>, offset: usize) -> bool {
    match value.get_mut() {
        DeValue::Table(table) => {
            for (_, child) in table.iter_mut() {
                if remove_entry_at(child, offset) {
                    return true;
                }
            }
            let found = table
                .iter()
                .find(|(key, child)| {
                    let span = key.span();
                    (span.start <= offset && offset < span.end)
                        || key_path_at(child, offset).is_some()
                })
                .map(|(key, _)| key.get_ref().to_string());
            match found {
                Some(key) => table.remove(key.as_str()).is_some(),
                None => false,
            }
        }
        DeValue::Array(array) => array.iter_mut().any(|child| remove_entry_at(child, offset)),
        _ => false,
    }
}

fn join_path(prefix: &str, rest: &str) -> String {
    if rest.is_empty() {
        prefix.to_owned()
    } else if prefix.is_empty() || rest.starts_with('[') {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}.{rest}")
    }
}

fn placeholder_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\{([^{}]*)\}").expect("placeholder regex is valid"))
}

fn name_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z0-9_.-]+$").expect("name regex is valid"))
}

fn env_name_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("env regex is valid"))
}

/// Parses a size: plain bytes, or a number with a unit (`B`, `KB`/`kB`, `MB`, `GB`, `TB`
/// in powers of 1000; `KiB`, `MiB`, `GiB`, `TiB` in powers of 1024). Units are
/// case-insensitive.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number = number.replace('_', "");
    if number.is_empty() {
        return Err("a size starts with a number".into());
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_u64.pow(2),
        "g" | "gb" => 1000_u64.pow(3),
        "t" | "tb" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("unknown unit {other:?}")),
    };
    let bytes = if let Ok(whole) = number.parse::<u64>() {
        whole.checked_mul(multiplier)
    } else {
        let fraction: f64 = number.parse().map_err(|_| "not a number".to_string())?;
        let bytes = fraction * multiplier as f64;
        (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
    };
    bytes.ok_or_else(|| "too large".into())
}

/// Parses an uplink url: `mqtt://`, `mqtts://`, `ws://`, `wss://`, with default ports
/// 1883/8883/80/443 and, for WebSocket, default path `/mqtt`.
pub(crate) fn parse_url(text: &str) -> Result<UplinkUrl, (String, Option<String>)> {
    const SCHEMES_HINT: &str = "use mqtt://host:1883, mqtts://host:8883, ws://host/mqtt or \
                                wss://host/mqtt";
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err((
            format!("url {text:?} has no scheme"),
            Some(SCHEMES_HINT.into()),
        ));
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => UrlScheme::Mqtt,
        "mqtts" | "ssl" => UrlScheme::Mqtts,
        "ws" => UrlScheme::Ws,
        "wss" => UrlScheme::Wss,
        other => {
            return Err((
                format!("unsupported url scheme {other:?}, expected one of mqtt, mqtts, ws, wss"),
                Some(SCHEMES_HINT.into()),
            ))
        }
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err((
            "credentials do not belong in the url".into(),
            Some("use `username` and `password_file` or `password_env`".into()),
        ));
    }
    let (host, port) = if let Some(after_bracket) = authority.strip_prefix('[') {
        let Some((host, after)) = after_bracket.split_once(']') else {
            return Err((format!("url {text:?} has an unclosed `[`"), None));
        };
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err((format!("url {text:?} has junk after `]`"), None)),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err((format!("url {text:?} has no host"), None));
    }
    let port = match port {
        None => match scheme {
            UrlScheme::Mqtt => 1883,
            UrlScheme::Mqtts => 8883,
            UrlScheme::Ws => 80,
            UrlScheme::Wss => 443,
        },
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err((format!("invalid port {port:?} in url {text:?}"), None)),
        },
    };
    let path = match scheme {
        UrlScheme::Mqtt | UrlScheme::Mqtts => {
            if !(path.is_empty() || path == "/") {
                return Err((
                    format!("a path ({path:?}) is only valid in ws:// and wss:// urls"),
                    None,
                ));
            }
            String::new()
        }
        UrlScheme::Ws | UrlScheme::Wss if path.is_empty() => DEFAULT_WS_PATH.to_owned(),
        UrlScheme::Ws | UrlScheme::Wss if path.starts_with('?') => format!("/{path}"),
        UrlScheme::Ws | UrlScheme::Wss => path.to_owned(),
    };
    Ok(UplinkUrl {
        scheme,
        host: host.to_owned(),
        port,
        path,
    })
}

/// Rewrites serde's type names into words a config author knows.
fn friendly(message: &str) -> String {
    message
        .replace("expected f64", "expected a number")
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("expected a map", "expected a table")
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
}

/// The names between backticks in a serde message.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

struct Validator<'a> {
    d: Diagnostics<'a>,
    base_dir: PathBuf,
    /// `gateway.data_dir` once validated: the base of the broker's `store_file`.
    data_dir: PathBuf,
    /// Substituted for `{gateway}`; a harmless stand-in while the id itself is invalid.
    gateway_id: String,
    /// Key paths serde already reported (and removed), so a removed required key is not
    /// reported again as missing.
    reported: HashSet<String>,
}

impl Validator<'_> {
    fn document(&mut self, root: Spanned<DeValue<'_>>, source: &Path) -> Option<Config> {
        let DeValue::Table(table) = root.into_inner() else {
            return None;
        };
        let mut gateway = None;
        let mut broker = None;
        let mut devices = None;
        let mut uplinks = None;
        for (key, value) in table {
            match key.get_ref().as_ref() {
                "gateway" => gateway = Some(value),
                "broker" => broker = Some(value),
                "devices" => devices = Some(value),
                "uplinks" => uplinks = Some(value),
                other => self.unknown_key(key.span(), other, other, TOP_LEVEL_KEYS),
            }
        }

        let gateway = match gateway {
            Some(value) => self
                .deserialize::<S<RawGateway>>(value, "gateway")
                .map(|raw| self.gateway(raw)),
            None => {
                self.d
                    .error(None, "gateway", "the [gateway] table is missing")
                    .hint = Some("add:\n    [gateway]\n    id = \"my-gateway\"".into());
                None
            }
        };
        let broker = match broker {
            Some(value) => self
                .deserialize::<S<RawBroker>>(value, "broker")
                .map(|raw| self.broker(Some(raw))),
            None => Some(self.broker(None)),
        };
        let devices = devices.map(|value| self.devices(value)).unwrap_or_default();
        let uplinks = uplinks.map(|value| self.uplinks(value)).unwrap_or_default();

        let gateway = gateway??;
        let mut broker = broker??;
        // The broker's database lives in the data directory unless given an absolute path.
        if broker.store_path.is_relative() {
            broker.store_path = gateway.data_dir.join(&broker.store_path);
        }
        Some(Config {
            source: source.to_path_buf(),
            gateway,
            broker,
            devices: devices.into_iter().collect::<Option<_>>()?,
            uplinks: uplinks.into_iter().collect::<Option<_>>()?,
        })
    }

    /// Deserializes one part of the document; a serde error becomes a diagnostic whose key
    /// path starts with `prefix`. The offending key is then removed and serde runs again,
    /// so every bad key of the part is reported and validation still sees the good ones.
    fn deserialize<T: DeserializeOwned>(
        &mut self,
        mut value: Spanned<DeValue<'_>>,
        prefix: &str,
    ) -> Option<T> {
        // Bounded: each round removes one key, and a part has few keys.
        for _ in 0..64 {
            let error = match T::deserialize(value.clone().into_deserializer()) {
                Ok(raw) => return Some(raw),
                Err(error) => error,
            };
            let span = error.span();
            let relative = span
                .as_ref()
                .and_then(|span| key_path_at(&value, span.start))
                .unwrap_or_default();
            let key_path = join_path(prefix, &relative);
            let message = error.message();
            if let Some(rest) = message.strip_prefix("unknown field `") {
                let names = backticked(message);
                let unknown = rest.split('`').next().unwrap_or_default();
                let known: Vec<&str> = names.iter().skip(1).copied().collect();
                self.unknown_key(span.clone(), &key_path, unknown, &known);
            } else if message.starts_with("missing field `") {
                let field = backticked(message).first().copied().unwrap_or_default();
                let key_path = join_path(&key_path, field);
                self.d.error(span.clone(), key_path, "missing required key");
            } else {
                self.d.error(span.clone(), &key_path, friendly(message));
            }
            self.reported.insert(key_path);
            let removed = span.is_some_and(|span| remove_entry_at(&mut value, span.start));
            if !removed {
                return None;
            }
        }
        None
    }

    fn unknown_key(
        &mut self,
        span: impl Into<Option<Range<usize>>>,
        key_path: &str,
        key: &str,
        known: &[&str],
    ) {
        let hint = match closest(key, known) {
            Some(close) => format!("did you mean `{close}`?"),
            None if known.is_empty() => "this table takes no keys".to_owned(),
            None => format!("known keys: {}", known.join(", ")),
        };
        self.d
            .error(span.into(), key_path, format!("unknown key `{key}`"))
            .hint = Some(hint);
    }

    fn missing(&mut self, span: Range<usize>, key_path: String, hint: Option<&str>) {
        if self.reported.contains(&key_path) {
            // Present but of the wrong type: already reported by serde.
            return;
        }
        self.d
            .error(Some(span), key_path, "missing required key")
            .hint = hint.map(Into::into);
    }

    /// A keyword that must be one of `choices`: its value, or an error that lists them with
    /// the closest as a hint (else `otherwise`).
    fn choice<T: Copy>(
        &mut self,
        value: &S<String>,
        key_path: &str,
        what: &str,
        choices: &[(&str, T)],
        otherwise: Option<&str>,
    ) -> Option<T> {
        let given = value.get_ref().as_str();
        if let Some((_, chosen)) = choices.iter().find(|(name, _)| *name == given) {
            return Some(*chosen);
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let diagnostic = self.d.error(
            Some(value.span()),
            key_path,
            format!(
                "unknown {what} {given:?}, expected one of {}",
                names.join(", ")
            ),
        );
        diagnostic.hint = match closest(given, &names) {
            Some(close) => Some(format!("did you mean `{close}`?")),
            None => otherwise.map(str::to_owned),
        };
        None
    }

    fn duration(&mut self, value: &S<String>, key_path: &str) -> Option<Duration> {
        match humantime::parse_duration(value.get_ref().trim()) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.d
                    .error(
                        Some(value.span()),
                        key_path,
                        format!("invalid duration {:?}: {error}", value.get_ref()),
                    )
                    .hint = Some(
                    "write a number and a unit, like \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\""
                        .into(),
                );
                None
            }
        }
    }

    /// An optional duration that must be more than zero.
    fn positive_duration(
        &mut self,
        value: &Option<S<String>>,
        key_path: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        match self.duration(value, key_path) {
            Some(duration) if duration.is_zero() => {
                self.d
                    .error(Some(value.span()), key_path, "must be more than zero");
                default
            }
            Some(duration) => duration,
            None => default,
        }
    }

    /// A duration in whole seconds that fits a `u32` (MQTT intervals).
    fn seconds_u32(
        &mut self,
        value: &Option<S<String>>,
        key_path: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        let Some(duration) = self.duration(value, key_path) else {
            return default;
        };
        if duration.as_secs() > u64::from(u32::MAX) {
            self.d.error(
                Some(value.span()),
                key_path,
                format!(
                    "{:?} is too long, the most MQTT allows is {}s",
                    value.get_ref(),
                    u32::MAX
                ),
            );
            return default;
        }
        if duration.subsec_nanos() != 0 {
            self.d.error(
                Some(value.span()),
                key_path,
                format!("{:?} is not a whole number of seconds", value.get_ref()),
            );
            return default;
        }
        duration
    }

    fn size(&mut self, value: &S<RawSize>, key_path: &str) -> Option<u64> {
        match self.size_or_zero(value, key_path) {
            Some(0) => {
                self.d
                    .error(Some(value.span()), key_path, "must be more than zero");
                None
            }
            other => other,
        }
    }

    /// A size where 0 means "none".
    fn size_or_zero(&mut self, value: &S<RawSize>, key_path: &str) -> Option<u64> {
        let result = match value.get_ref() {
            RawSize::Bytes(bytes) => u64::try_from(*bytes).map_err(|_| "negative".to_owned()),
            RawSize::Text(text) => parse_size(text),
        };
        match result {
            Ok(bytes) => Some(bytes),
            Err(why) => {
                let shown = match value.get_ref() {
                    RawSize::Bytes(bytes) => bytes.to_string(),
                    RawSize::Text(text) => format!("{text:?}"),
                };
                self.d
                    .error(
                        Some(value.span()),
                        key_path,
                        format!("invalid size {shown}: {why}"),
                    )
                    .hint = Some(
                    "write bytes as an integer, or a string like \"512KiB\", \"256MiB\" or \"1MB\""
                        .into(),
                );
                None
            }
        }
    }

    /// An optional integer in `min..=max`.
    fn integer(
        &mut self,
        value: &Option<S<i64>>,
        key_path: &str,
        min: i64,
        max: i64,
        default: i64,
    ) -> i64 {
        let Some(value) = value else {
            return default;
        };
        let n = *value.get_ref();
        if n < min || n > max {
            let message = if max == i64::MAX {
                format!("{n} is out of range, expected at least {min}")
            } else {
                format!("{n} is out of range, expected {min} to {max}")
            };
            self.d.error(Some(value.span()), key_path, message);
            return default;
        }
        n
    }

    fn qos(&mut self, value: &Option<S<i64>>, key_path: &str, default: QoS) -> QoS {
        let Some(value) = value else {
            return default;
        };
        match u8::try_from(*value.get_ref()).ok().and_then(QoS::from_u8) {
            Some(qos) => qos,
            None => {
                self.d.error(
                    Some(value.span()),
                    key_path,
                    format!("invalid QoS {}, expected 0, 1 or 2", value.get_ref()),
                );
                default
            }
        }
    }

    /// A name used in topics or file names: `[A-Za-z0-9_.-]+`.
    fn name(&mut self, value: &S<String>, key_path: &str) -> bool {
        let name = value.get_ref();
        if name.is_empty() {
            self.d
                .error(Some(value.span()), key_path, "must not be empty");
            false
        } else if !name_regex().is_match(name) {
            self.d
                .error(
                    Some(value.span()),
                    key_path,
                    format!("{name:?} contains characters other than letters, digits, `_`, `.` and `-`"),
                )
                .hint = Some("names appear in MQTT topics and file names, where `/`, `+`, `#` and spaces would break them".into());
            false
        } else {
            true
        }
    }

    /// Checks that every `{...}` placeholder is one of `allowed`.
    fn placeholders(&mut self, value: &S<String>, key_path: &str, allowed: &[&str]) -> bool {
        let mut ok = true;
        for capture in placeholder_regex().captures_iter(value.get_ref()) {
            let name = capture.get(1).map_or("", |m| m.as_str());
            if !allowed.contains(&name) {
                let known: Vec<String> = allowed.iter().map(|a| format!("{{{a}}}")).collect();
                self.d
                    .error(
                        Some(value.span()),
                        key_path,
                        format!("unknown placeholder {{{name}}}"),
                    )
                    .hint = Some(if known.is_empty() {
                    "no placeholders are allowed here".into()
                } else {
                    format!("allowed here: {}", known.join(", "))
                });
                ok = false;
            }
        }
        ok
    }

    fn substitute(&self, text: &str) -> String {
        text.replace("{gateway}", &self.gateway_id)
    }

    /// A topic to publish to (no wildcards) with `{gateway}` substituted.
    fn topic(&mut self, value: &S<String>, key_path: &str) -> String {
        self.placeholders(value, key_path, &["gateway"]);
        let topic = self.substitute(value.get_ref());
        if topic.is_empty() {
            self.d
                .error(Some(value.span()), key_path, "topic must not be empty");
        } else if topic.contains(['+', '#']) {
            self.d.error(
                Some(value.span()),
                key_path,
                format!(
                    "topic {:?} contains a wildcard (`+` or `#`)",
                    value.get_ref()
                ),
            );
        }
        topic
    }

    /// A topic prefix (may be empty, no wildcards) with `{gateway}` substituted.
    fn prefix(&mut self, value: &S<String>, key_path: &str) -> String {
        self.placeholders(value, key_path, &["gateway"]);
        let prefix = self.substitute(value.get_ref());
        if prefix.contains(['+', '#']) {
            self.d.error(
                Some(value.span()),
                key_path,
                format!(
                    "prefix {:?} contains a wildcard (`+` or `#`)",
                    value.get_ref()
                ),
            );
        }
        prefix
    }

    /// A topic filter with `{gateway}` substituted.
    fn filter(&mut self, value: &S<String>, key_path: &str) -> String {
        self.placeholders(value, key_path, &["gateway"]);
        let filter = self.substitute(value.get_ref());
        if !valid_filter(&filter) {
            self.d
                .error(
                    Some(value.span()),
                    key_path,
                    format!("invalid topic filter {:?}", value.get_ref()),
                )
                .hint = Some("`#` must be the last level and `+` a whole level, e.g. \"plant/+/temperature\" or \"plant/#\"".into());
        }
        filter
    }

    /// A path relative to the config file's directory.
    fn path(&self, value: &str) -> PathBuf {
        let path = Path::new(value);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// A file that must exist.
    fn existing_file(&mut self, value: &S<String>, key_path: &str) -> PathBuf {
        let path = self.path(value.get_ref());
        if !path.is_file() {
            let message = if path.exists() {
                format!("{} is not a file", path.display())
            } else {
                format!("file not found: {}", path.display())
            };
            let diagnostic = self.d.error(Some(value.span()), key_path, message);
            if Path::new(value.get_ref()).is_relative() {
                diagnostic.hint = Some(format!(
                    "relative paths are resolved against the config file's directory, {}",
                    self.base_dir.display()
                ));
            }
        }
        path
    }

    fn gateway(&mut self, raw: S<RawGateway>) -> Option<GatewayConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let id = match &raw.id {
            Some(id) => {
                if self.name(id, "gateway.id") {
                    self.gateway_id = id.get_ref().clone();
                }
                id.get_ref().clone()
            }
            None => {
                self.missing(span, "gateway.id".into(), Some("add id = \"my-gateway\": it names the gateway in topics and is the default cloud client id"));
                String::new()
            }
        };
        let data_dir = match &raw.data_dir {
            Some(dir) if dir.get_ref().is_empty() => {
                self.d
                    .error(Some(dir.span()), "gateway.data_dir", "must not be empty");
                PathBuf::from(DEFAULT_DATA_DIR)
            }
            Some(dir) => self.path(dir.get_ref()),
            None => PathBuf::from(DEFAULT_DATA_DIR),
        };
        self.data_dir = data_dir.clone();
        let log_level = match &raw.log_level {
            Some(level) => {
                if let Err(error) = tracing_subscriber::EnvFilter::try_new(level.get_ref()) {
                    self.d
                        .error(
                            Some(level.span()),
                            "gateway.log_level",
                            format!("invalid log filter {:?}: {error}", level.get_ref()),
                        )
                        .hint = Some("use a level (error, warn, info, debug, trace) or a filter like \"info,fieldmq=debug\"".into());
                }
                level.get_ref().clone()
            }
            None => DEFAULT_LOG_LEVEL.to_owned(),
        };
        let status_topic = match &raw.status_topic {
            Some(topic) => self.topic(topic, "gateway.status_topic"),
            None => self.substitute(DEFAULT_STATUS_TOPIC),
        };
        let shutdown_timeout = self.positive_duration(
            &raw.shutdown_timeout,
            "gateway.shutdown_timeout",
            DEFAULT_SHUTDOWN_TIMEOUT,
        );
        let worker_threads = raw.worker_threads.as_ref().map(|_| {
            let n = self.integer(&raw.worker_threads, "gateway.worker_threads", 1, 256, 1);
            usize::try_from(n).unwrap_or(1)
        });
        Some(GatewayConfig {
            id,
            data_dir,
            log_level,
            status_topic,
            shutdown_timeout,
            worker_threads,
        })
    }

    fn broker(&mut self, raw: Option<S<RawBroker>>) -> Option<BrokerConfig> {
        let span = raw.as_ref().map(|raw| raw.span());
        let raw = raw.map(Spanned::into_inner);
        let raw = raw.as_ref();

        let password_file = raw
            .and_then(|raw| raw.password_file.as_ref())
            .map(|file| self.existing_file(file, "broker.password_file"));
        let allow_anonymous = raw.and_then(|raw| raw.allow_anonymous.as_ref());
        if password_file.is_none() && !allow_anonymous.is_some_and(|a| *a.get_ref()) {
            self.d
                .error(
                    allow_anonymous.map(Spanned::span).or(span),
                    "broker.allow_anonymous",
                    "no client could connect: anonymous clients are refused and there is no password_file",
                )
                .hint = Some("set allow_anonymous = true under [broker], or password_file = \"passwd\" (Mosquitto format)".into());
        }

        let max_packet_size = match raw.and_then(|raw| raw.max_packet_size.as_ref()) {
            Some(size) => match self.size(size, "broker.max_packet_size") {
                Some(bytes) if bytes > MQTT_MAX_PACKET_SIZE => {
                    self.d.error(
                        Some(size.span()),
                        "broker.max_packet_size",
                        format!("{bytes} bytes is more than MQTT allows ({MQTT_MAX_PACKET_SIZE})"),
                    );
                    DEFAULT_MAX_PACKET_SIZE
                }
                // Fits: checked against a bound below u32::MAX just above.
                Some(bytes) => u32::try_from(bytes).unwrap_or(DEFAULT_MAX_PACKET_SIZE),
                None => DEFAULT_MAX_PACKET_SIZE,
            },
            None => DEFAULT_MAX_PACKET_SIZE,
        };
        let max_queued_messages = self.integer(
            &raw.and_then(|raw| raw.max_queued_messages.clone()),
            "broker.max_queued_messages",
            0,
            i64::from(u32::MAX),
            DEFAULT_MAX_QUEUED_MESSAGES as i64,
        ) as usize;
        let max_inflight = self.integer(
            &raw.and_then(|raw| raw.max_inflight.clone()),
            "broker.max_inflight",
            1,
            i64::from(u16::MAX),
            i64::from(DEFAULT_BROKER_INFLIGHT),
        ) as u16;

        let mut listeners = Vec::new();
        let mut seen: Vec<(SocketAddr, usize, usize)> = Vec::new();
        match raw.and_then(|raw| raw.listeners.as_ref()) {
            Some(raw_listeners) if !raw_listeners.is_empty() => {
                for (index, listener) in raw_listeners.iter().enumerate() {
                    if let Some(config) = self.listener(listener, index, &mut seen) {
                        listeners.push(config);
                    }
                }
            }
            _ => listeners.push(ListenerConfig {
                bind: DEFAULT_LISTENER
                    .parse()
                    .expect("the default listener address is valid"),
                websocket: false,
                websocket_path: DEFAULT_WS_PATH.to_owned(),
                tls: None,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_handshakes: DEFAULT_MAX_HANDSHAKES,
                max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            }),
        }

        let max_queued_bytes = match raw.and_then(|raw| raw.max_queued_bytes.as_ref()) {
            Some(size) => self
                .size(size, "broker.max_queued_bytes")
                .unwrap_or(DEFAULT_MAX_QUEUED_BYTES),
            None => DEFAULT_MAX_QUEUED_BYTES,
        };
        let queue_memory = match raw.and_then(|raw| raw.queue_memory.as_ref()) {
            Some(size) => self
                .size_or_zero(size, "broker.queue_memory")
                .unwrap_or(DEFAULT_QUEUE_MEMORY),
            None => DEFAULT_QUEUE_MEMORY,
        };
        let durability = raw
            .and_then(|raw| raw.durability.as_ref())
            .and_then(|value| {
                self.choice(
                    value,
                    "broker.durability",
                    "durability",
                    DURABILITIES,
                    Some(
                        "sync: nothing acknowledged is lost; batched: a power cut loses at most \
                         commit_window; memory: nothing on disk",
                    ),
                )
            })
            .unwrap_or(Durability::Sync);
        let commit_window = self.positive_duration(
            &raw.and_then(|raw| raw.commit_window.clone()),
            "broker.commit_window",
            DEFAULT_COMMIT_WINDOW,
        );
        let slow_client_timeout = self.positive_duration(
            &raw.and_then(|raw| raw.slow_client_timeout.clone()),
            "broker.slow_client_timeout",
            DEFAULT_SLOW_CLIENT_TIMEOUT,
        );
        let store_path = match raw.and_then(|raw| raw.store_file.as_ref()) {
            Some(file) if file.get_ref().trim().is_empty() => {
                self.d
                    .error(Some(file.span()), "broker.store_file", "must not be empty");
                self.data_dir.join(DEFAULT_STORE_FILE)
            }
            Some(file) => self.data_dir.join(file.get_ref()),
            None => self.data_dir.join(DEFAULT_STORE_FILE),
        };
        let acl_file = raw
            .and_then(|raw| raw.acl_file.as_ref())
            .map(|file| self.existing_file(file, "broker.acl_file"));
        let max_keep_alive = match raw.and_then(|raw| raw.max_keep_alive.as_ref()) {
            Some(value) => match self.duration(value, "broker.max_keep_alive") {
                Some(limit) if (1..=u64::from(u16::MAX)).contains(&limit.as_secs()) => {
                    limit.as_secs() as u16
                }
                Some(_) => {
                    self.d
                        .error(
                            Some(value.span()),
                            "broker.max_keep_alive",
                            format!("{:?} is out of range", value.get_ref()),
                        )
                        .hint = Some("MQTT keep alive is 1s to 65535s (18h12m15s)".into());
                    u16::MAX
                }
                None => u16::MAX,
            },
            None => u16::MAX,
        };
        let subscribe_denied_reason = raw
            .and_then(|raw| raw.subscribe_denied_reason.as_ref())
            .and_then(|value| {
                self.choice(
                    value,
                    "broker.subscribe_denied_reason",
                    "reason",
                    DENIED_REASONS,
                    None,
                )
            })
            .unwrap_or(DeniedReason::NotAuthorized);
        let sys_interval = match raw.and_then(|raw| raw.sys_interval.as_ref()) {
            Some(value) => match self.duration(value, "broker.sys_interval") {
                Some(interval) if interval.is_zero() => None,
                Some(interval) if interval < Duration::from_secs(1) => {
                    self.d
                        .error(
                            Some(value.span()),
                            "broker.sys_interval",
                            format!("{:?} is too short", value.get_ref()),
                        )
                        .hint = Some("use at least \"1s\", or \"0s\" to turn $SYS off".into());
                    Some(DEFAULT_SYS_INTERVAL)
                }
                Some(interval) => Some(interval),
                None => Some(DEFAULT_SYS_INTERVAL),
            },
            None => Some(DEFAULT_SYS_INTERVAL),
        };

        Some(BrokerConfig {
            listeners,
            allow_anonymous: allow_anonymous.is_some_and(|a| *a.get_ref()),
            password_file,
            max_packet_size,
            max_queued_messages,
            max_inflight,
            max_queued_bytes,
            queue_memory,
            durability,
            commit_window,
            slow_client_timeout,
            store_path,
            acl_file,
            sys_interval,
            max_keep_alive,
            subscribe_denied_reason,
        })
    }

    fn listener(
        &mut self,
        raw: &S<RawListener>,
        index: usize,
        seen: &mut Vec<(SocketAddr, usize, usize)>,
    ) -> Option<ListenerConfig> {
        let prefix = format!("broker.listeners[{index}]");
        let max_connections = self.integer(
            &raw.get_ref().max_connections,
            &format!("{prefix}.max_connections"),
            1,
            i64::from(u32::MAX),
            DEFAULT_MAX_CONNECTIONS as i64,
        ) as usize;
        let max_handshakes = self.integer(
            &raw.get_ref().max_handshakes,
            &format!("{prefix}.max_handshakes"),
            1,
            i64::from(u32::MAX),
            DEFAULT_MAX_HANDSHAKES as i64,
        ) as usize;
        let max_connections_per_address = self.integer(
            &raw.get_ref().max_connections_per_address,
            &format!("{prefix}.max_connections_per_address"),
            0,
            i64::from(u32::MAX),
            DEFAULT_MAX_CONNECTIONS_PER_ADDRESS as i64,
        ) as usize;
        let connect_timeout = self.positive_duration(
            &raw.get_ref().connect_timeout,
            &format!("{prefix}.connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let Some(bind) = &raw.get_ref().bind else {
            self.missing(
                raw.span(),
                format!("{prefix}.bind"),
                Some("e.g. bind = \"0.0.0.0:1883\""),
            );
            return None;
        };
        let key_path = format!("{prefix}.bind");
        let addr: SocketAddr = match bind.get_ref().parse() {
            Ok(addr) => addr,
            Err(_) => {
                let hint = if bind.get_ref().starts_with("localhost") {
                    "write 127.0.0.1:<port> instead of localhost".to_owned()
                } else {
                    "write ip:port, e.g. \"0.0.0.0:1883\" or \"[::]:1883\"".to_owned()
                };
                self.d
                    .error(
                        Some(bind.span()),
                        key_path,
                        format!("invalid listen address {:?}", bind.get_ref()),
                    )
                    .hint = Some(hint);
                return None;
            }
        };
        let (line, _) = self.d.position(bind.span().start);
        if let Some((other, other_index, other_line)) = seen.iter().find(|(other, _, _)| {
            other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || other.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        }) {
            let message = if *other == addr {
                format!(
                    "{addr} is already used by broker.listeners[{other_index}] (line {other_line})"
                )
            } else {
                format!("{addr} overlaps {other} of broker.listeners[{other_index}] (line {other_line})")
            };
            self.d.error(Some(bind.span()), key_path, message).hint =
                Some("every listener needs its own port".into());
        }
        seen.push((addr, index, line));
        let websocket = raw
            .get_ref()
            .websocket
            .as_ref()
            .is_some_and(|w| *w.get_ref());
        let websocket_path = match &raw.get_ref().websocket_path {
            Some(path) if !websocket => {
                self.d
                    .error(
                        Some(path.span()),
                        format!("{prefix}.websocket_path"),
                        "websocket_path is set but websocket is not",
                    )
                    .hint = Some("add websocket = true to serve MQTT over WebSocket".into());
                DEFAULT_WS_PATH.to_owned()
            }
            Some(path)
                if !path.get_ref().starts_with('/') || path.get_ref().contains(['?', '#', ' ']) =>
            {
                self.d
                    .error(
                        Some(path.span()),
                        format!("{prefix}.websocket_path"),
                        format!("invalid WebSocket path {:?}", path.get_ref()),
                    )
                    .hint = Some("a path starts with `/`, e.g. \"/mqtt\"".into());
                DEFAULT_WS_PATH.to_owned()
            }
            Some(path) => path.get_ref().clone(),
            None => DEFAULT_WS_PATH.to_owned(),
        };
        let tls = raw
            .get_ref()
            .tls
            .as_ref()
            .and_then(|tls| self.listener_tls(tls, &format!("{prefix}.tls")));
        Some(ListenerConfig {
            bind: addr,
            websocket,
            websocket_path,
            tls,
            max_connections,
            max_handshakes,
            max_connections_per_address,
            connect_timeout,
        })
    }

    fn listener_tls(&mut self, raw: &S<RawListenerTls>, prefix: &str) -> Option<ListenerTls> {
        let span = raw.span();
        let r = raw.get_ref();
        let key = |k: &str| format!("{prefix}.{k}");
        let cert = match &r.cert {
            Some(cert) => Some(self.pem_file(cert, &key("cert"), Pem::Certificates)),
            None => {
                self.missing(
                    span.clone(),
                    key("cert"),
                    Some("the server certificate (chain) in PEM, e.g. cert = \"server.crt\""),
                );
                None
            }
        };
        let private_key = match &r.key {
            Some(file) => Some(self.pem_file(file, &key("key"), Pem::PrivateKey)),
            None => {
                self.missing(
                    span,
                    key("key"),
                    Some("the certificate's private key in PEM, e.g. key = \"server.key\""),
                );
                None
            }
        };
        let client_ca = r
            .client_ca
            .as_ref()
            .map(|ca| self.pem_file(ca, &key("client_ca"), Pem::Certificates));
        let require_client_cert = r.require_client_cert.as_ref().is_some_and(|b| *b.get_ref());
        let identity_as_username = r
            .identity_as_username
            .as_ref()
            .is_some_and(|b| *b.get_ref());
        if client_ca.is_none() {
            for (name, flag) in [
                ("require_client_cert", &r.require_client_cert),
                ("identity_as_username", &r.identity_as_username),
            ] {
                if let Some(flag) = flag.as_ref().filter(|flag| *flag.get_ref()) {
                    self.d
                        .error(
                            Some(flag.span()),
                            key(name),
                            format!("{name} needs client_ca"),
                        )
                        .hint = Some(
                        "set client_ca to the CA file that signs the client certificates".into(),
                    );
                }
            }
        }
        Some(ListenerTls {
            cert: cert?,
            key: private_key?,
            client_ca,
            require_client_cert,
            identity_as_username,
        })
    }

    /// A file that must exist and hold PEM certificates or a PEM private key.
    fn pem_file(&mut self, value: &S<String>, key_path: &str, wanted: Pem) -> PathBuf {
        let path = self.existing_file(value, key_path);
        if !path.is_file() {
            return path; // already reported
        }
        if let Err(why) = check_pem(&path, wanted) {
            let hint = match wanted {
                Pem::Certificates => {
                    "expected PEM certificates (-----BEGIN CERTIFICATE-----); convert DER with `openssl x509 -inform der -in FILE -out FILE.pem`"
                }
                Pem::PrivateKey => {
                    "expected a PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY), unencrypted"
                }
            };
            self.d
                .error(
                    Some(value.span()),
                    key_path,
                    format!("{}: {why}", path.display()),
                )
                .hint = Some(hint.into());
        }
        path
    }

    fn devices(&mut self, value: Spanned<DeValue<'_>>) -> Vec<Option<DeviceConfig>> {
        let span = value.span();
        let DeValue::Array(array) = value.into_inner() else {
            self.d
                .error(Some(span), "devices", "expected an array of tables")
                .hint = Some("write each device as [[devices]]".into());
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

    fn simulated_device(
        &mut self,
        raw: S<RawSimulatedDevice>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<DeviceConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = self.device_name(&raw.name, span.clone(), prefix, names);
        let topic = self.device_topic(&raw.topic, prefix);
        let payload = self.payload(&raw.payload, prefix);
        let poll = self.positive_duration(&raw.poll, &format!("{prefix}.poll"), DEFAULT_POLL);

        let mut points = Vec::new();
        let mut point_names: HashMap<String, usize> = HashMap::new();
        match &raw.points {
            None => self.missing(span, format!("{prefix}.points"), Some("a simulated device needs at least one point, e.g. points = [{ name = \"temperature\", waveform = \"sine\", min = 18.0, max = 24.0 }]")),
            Some(list) if list.get_ref().is_empty() => {
                self.d.error(Some(list.span()), format!("{prefix}.points"), "a simulated device needs at least one point");
            }
            Some(list) => {
                for (index, point) in list.get_ref().iter().enumerate() {
                    let point_prefix = format!("{prefix}.points[{index}]");
                    if let Some(point) = self.simulated_point(point, &point_prefix, &mut point_names) {
                        points.push(point);
                    }
                }
            }
        }
        Some(DeviceConfig {
            name: name?,
            topic,
            payload,
            poll,
            driver: DriverConfig::Simulated(SimulatedConfig { points }),
        })
    }

    /// A Modbus device: the common keys here, the Modbus keys in `drivers::modbus::config`.
    fn modbus_device(
        &mut self,
        raw: S<RawModbusDevice>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<DeviceConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = self.device_name(&raw.name, span.clone(), prefix, names);
        let topic = self.device_topic(&raw.topic, prefix);
        let payload = self.payload(&raw.payload, prefix);
        let poll = self.positive_duration(&raw.poll, &format!("{prefix}.poll"), DEFAULT_POLL);
        let modbus = crate::drivers::modbus::config::validate(
            &raw,
            span,
            prefix,
            &mut self.d,
            &self.reported,
        );
        Some(DeviceConfig {
            name: name?,
            topic,
            payload,
            poll,
            driver: DriverConfig::Modbus(modbus?),
        })
    }

    /// A serial device: the common keys here, the serial keys in `drivers::serial::config`.
    fn serial_device(
        &mut self,
        raw: S<RawSerialDevice>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<DeviceConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = self.device_name(&raw.name, span.clone(), prefix, names);
        let topic = self.device_topic(&raw.topic, prefix);
        let payload = self.payload(&raw.payload, prefix);
        let poll = self.positive_duration(&raw.poll, &format!("{prefix}.poll"), DEFAULT_POLL);
        let serial = crate::drivers::serial::config::validate(
            &raw,
            span,
            prefix,
            &mut self.d,
            &self.reported,
        );
        Some(DeviceConfig {
            name: name?,
            topic,
            payload,
            poll,
            driver: DriverConfig::Serial(serial?),
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

    fn payload(&mut self, payload: &Option<S<String>>, prefix: &str) -> PayloadFormat {
        match payload.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
            None | Some(("json", _)) => PayloadFormat::Json,
            Some(("plain", _)) => PayloadFormat::Plain,
            Some((other, span)) => {
                self.d.error(
                    Some(span),
                    format!("{prefix}.payload"),
                    format!("unknown payload format {other:?}, expected json or plain"),
                );
                PayloadFormat::Json
            }
        }
    }

    fn simulated_point(
        &mut self,
        raw: &S<RawSimulatedPoint>,
        prefix: &str,
        names: &mut HashMap<String, usize>,
    ) -> Option<SimulatedPoint> {
        let span = raw.span();
        let raw = raw.get_ref();
        let name = match &raw.name {
            None => {
                self.missing(span.clone(), format!("{prefix}.name"), None);
                None
            }
            Some(name) => {
                let key_path = format!("{prefix}.name");
                if self.name(name, &key_path) {
                    let (line, _) = self.d.position(name.span().start);
                    if let Some(other_line) = names.get(name.get_ref()) {
                        self.d.error(
                            Some(name.span()),
                            key_path,
                            format!("duplicate point name {:?} in this device, first on line {other_line}", name.get_ref()),
                        );
                    } else {
                        names.insert(name.get_ref().clone(), line);
                    }
                }
                Some(name.get_ref().clone())
            }
        };
        let waveform = self.waveform(raw, span, prefix);
        Some(SimulatedPoint {
            name: name?,
            waveform: waveform?,
            writable: raw.writable.unwrap_or(false),
            unit: raw.unit.clone(),
        })
    }

    fn waveform(
        &mut self,
        raw: &RawSimulatedPoint,
        span: Range<usize>,
        prefix: &str,
    ) -> Option<Waveform> {
        let key_path = format!("{prefix}.waveform");
        let Some(kind) = &raw.waveform else {
            self.missing(
                span,
                key_path,
                Some("one of sine, ramp, random_walk, constant"),
            );
            return None;
        };
        let choices: Vec<(&str, &str)> = WAVEFORMS.iter().map(|w| (*w, *w)).collect();
        let kind_name = self.choice(kind, &key_path, "waveform", &choices, None)?;

        // Keys each waveform uses; any other one is a mistake worth reporting.
        let used: &[&str] = match kind_name {
            "sine" | "ramp" => &["min", "max", "period"],
            "random_walk" => &["min", "max", "step"],
            _ => &["value"],
        };
        let present: [(&str, Option<Range<usize>>); 5] = [
            ("min", raw.min.as_ref().map(Spanned::span)),
            ("max", raw.max.as_ref().map(Spanned::span)),
            ("period", raw.period.as_ref().map(Spanned::span)),
            ("step", raw.step.as_ref().map(Spanned::span)),
            ("value", raw.value.as_ref().map(Spanned::span)),
        ];
        let mut ok = true;
        for (key, key_span) in present {
            if let Some(key_span) = key_span {
                if !used.contains(&key) {
                    self.d
                        .error(
                            Some(key_span),
                            format!("{prefix}.{key}"),
                            format!("`{key}` is not used by waveform {kind_name}"),
                        )
                        .hint = Some(format!("{kind_name} takes {}", used.join(", ")));
                    ok = false;
                }
            }
        }

        if kind_name == "constant" {
            let Some(value) = &raw.value else {
                self.missing(
                    span,
                    format!("{prefix}.value"),
                    Some("a constant needs value = <number, boolean or string>"),
                );
                return None;
            };
            let value = match value.get_ref() {
                RawScalar::Bool(b) => Value::Bool(*b),
                RawScalar::Int(i) => Value::Int(*i),
                RawScalar::Float(x) => Value::Float(*x),
                RawScalar::Text(s) => Value::Text(s.clone()),
            };
            return ok.then_some(Waveform::Constant { value });
        }

        let min = self.finite(&raw.min, span.clone(), &format!("{prefix}.min"));
        let max = self.finite(&raw.max, span.clone(), &format!("{prefix}.max"));
        let (min, max) = (min?, max?);
        if min > max {
            let min_span = raw.min.as_ref().map(Spanned::span);
            self.d
                .error(
                    min_span,
                    format!("{prefix}.min"),
                    format!("min ({min}) is greater than max ({max})"),
                )
                .hint = Some("swap min and max".into());
            ok = false;
        }
        let waveform = match kind_name {
            "random_walk" => {
                let step = match &raw.step {
                    None => (max - min) / 100.0,
                    Some(step) if !(step.get_ref().is_finite() && *step.get_ref() > 0.0) => {
                        self.d.error(
                            Some(step.span()),
                            format!("{prefix}.step"),
                            format!("step must be a positive number, found {}", step.get_ref()),
                        );
                        ok = false;
                        0.0
                    }
                    Some(step) => *step.get_ref(),
                };
                Waveform::RandomWalk { min, max, step }
            }
            kind => {
                let period = self.positive_duration(
                    &raw.period,
                    &format!("{prefix}.period"),
                    DEFAULT_PERIOD,
                );
                if kind == "sine" {
                    Waveform::Sine { min, max, period }
                } else {
                    Waveform::Ramp { min, max, period }
                }
            }
        };
        ok.then_some(waveform)
    }

    fn finite(
        &mut self,
        value: &Option<S<f64>>,
        span: Range<usize>,
        key_path: &str,
    ) -> Option<f64> {
        let Some(value) = value else {
            self.missing(span, key_path.to_owned(), None);
            return None;
        };
        if !value.get_ref().is_finite() {
            self.d
                .error(Some(value.span()), key_path, "must be a finite number");
            return None;
        }
        Some(*value.get_ref())
    }

    fn uplinks(&mut self, value: Spanned<DeValue<'_>>) -> Vec<Option<UplinkConfig>> {
        let span = value.span();
        let DeValue::Array(array) = value.into_inner() else {
            self.d
                .error(Some(span), "uplinks", "expected an array of tables")
                .hint = Some("write each uplink as [[uplinks]]".into());
            return vec![None];
        };
        let mut names: HashMap<String, (usize, usize)> = HashMap::new();
        let mut uplinks = Vec::new();
        for (index, item) in array.into_iter().enumerate() {
            let prefix = format!("uplinks[{index}]");
            let uplink = self
                .deserialize::<S<RawUplink>>(item, &prefix)
                .and_then(|raw| self.uplink(raw, index, &prefix, &mut names));
            uplinks.push(uplink);
        }
        uplinks
    }

    fn uplink(
        &mut self,
        raw: S<RawUplink>,
        index: usize,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<UplinkConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let key = |k: &str| format!("{prefix}.{k}");

        let name = match &raw.name {
            None => {
                self.missing(span.clone(), key("name"), None);
                None
            }
            Some(name) => {
                if self.name(name, &key("name")) {
                    let (line, _) = self.d.position(name.span().start);
                    if let Some((other_index, other_line)) = names.get(name.get_ref()) {
                        self.d.error(
                            Some(name.span()),
                            key("name"),
                            format!("duplicate uplink name {:?}, already used by uplinks[{other_index}] (line {other_line})", name.get_ref()),
                        );
                    } else {
                        names.insert(name.get_ref().clone(), (index, line));
                    }
                }
                Some(name.get_ref().clone())
            }
        };

        let url = match &raw.url {
            None => {
                self.missing(
                    span.clone(),
                    key("url"),
                    Some("e.g. url = \"mqtts://broker.example.com:8883\""),
                );
                None
            }
            Some(url) => match parse_url(url.get_ref()) {
                Ok(parsed) => Some(parsed),
                Err((message, hint)) => {
                    self.d.error(Some(url.span()), key("url"), message).hint = hint;
                    None
                }
            },
        };

        let protocol = match &raw.protocol {
            None => MqttVersion::V5,
            Some(protocol) => {
                match protocol.get_ref() {
                    RawScalar::Int(5) => MqttVersion::V5,
                    RawScalar::Text(text) if text == "5" || text == "5.0" => MqttVersion::V5,
                    RawScalar::Text(text) if text == "3.1.1" => MqttVersion::V311,
                    other => {
                        let shown = match other {
                            RawScalar::Text(text) => format!("{text:?}"),
                            RawScalar::Int(i) => i.to_string(),
                            RawScalar::Float(x) => x.to_string(),
                            RawScalar::Bool(b) => b.to_string(),
                        };
                        self.d.error(
                        Some(protocol.span()),
                        key("protocol"),
                        format!("unknown MQTT protocol version {shown}, expected \"5\" or \"3.1.1\""),
                    );
                        MqttVersion::V5
                    }
                }
            }
        };

        let client_id = match &raw.client_id {
            None => self.gateway_id.clone(),
            Some(id) => {
                self.placeholders(id, &key("client_id"), &["gateway"]);
                let id_text = self.substitute(id.get_ref());
                if id_text.is_empty() {
                    self.d
                        .error(Some(id.span()), key("client_id"), "must not be empty");
                }
                id_text
            }
        };

        let keep_alive = self.seconds_u32(&raw.keep_alive, &key("keep_alive"), DEFAULT_KEEP_ALIVE);
        if keep_alive.as_secs() > u64::from(u16::MAX) {
            if let Some(value) = &raw.keep_alive {
                self.d.error(
                    Some(value.span()),
                    key("keep_alive"),
                    format!(
                        "{:?} is too long, the most MQTT allows is {}s",
                        value.get_ref(),
                        u16::MAX
                    ),
                );
            }
        }

        let username = raw.username.as_ref().map(|u| u.get_ref().clone());
        let password = match (&raw.password_file, &raw.password_env) {
            (Some(_), Some(env)) => {
                self.d
                    .error(
                        Some(env.span()),
                        key("password_env"),
                        "password_file and password_env are both set",
                    )
                    .hint = Some("keep one of them".into());
                None
            }
            (Some(file), None) => Some(SecretSource::File(
                self.existing_file(file, &key("password_file")),
            )),
            (None, Some(env)) => {
                if !env_name_regex().is_match(env.get_ref()) {
                    self.d.error(
                        Some(env.span()),
                        key("password_env"),
                        format!(
                            "{:?} is not a valid environment variable name",
                            env.get_ref()
                        ),
                    );
                }
                Some(SecretSource::Env(env.get_ref().clone()))
            }
            (None, None) => None,
        };
        if password.is_some() && username.is_none() && protocol == MqttVersion::V311 {
            let span = raw
                .password_file
                .as_ref()
                .or(raw.password_env.as_ref())
                .map(Spanned::span);
            self.d
                .error(
                    span,
                    key("username"),
                    "MQTT 3.1.1 does not allow a password without a username",
                )
                .hint = Some("set username, or use protocol = \"5\"".into());
        }

        let tls = self.tls(&raw, url.as_ref(), prefix);

        let session_expiry = self.seconds_u32(
            &raw.session_expiry,
            &key("session_expiry"),
            DEFAULT_SESSION_EXPIRY,
        );

        let will = raw
            .will
            .as_ref()
            .and_then(|will| self.will(will, &key("will"), None));
        let birth = match &raw.birth {
            Some(birth) => self.will(birth, &key("birth"), will.as_ref()),
            None => will.as_ref().map(|will| WillConfig {
                topic: will.topic.clone(),
                payload: "online".into(),
                qos: will.qos,
                retain: true,
                delay: Duration::ZERO,
            }),
        };

        let inflight = self.integer(
            &raw.inflight,
            &key("inflight"),
            1,
            i64::from(u16::MAX),
            i64::from(DEFAULT_UPLINK_INFLIGHT),
        ) as u16;
        let max_rate = raw.max_rate.as_ref().map(|_| {
            self.integer(&raw.max_rate, &key("max_rate"), 1, i64::from(u32::MAX), 1) as u32
        });

        let (reconnect_min, reconnect_max) = self.reconnect(&raw.reconnect, &key("reconnect"));
        let queue = self.queue(&raw.queue, &key("queue"));

        let mut routes_out = Vec::new();
        let mut routes_in = Vec::new();
        for (route_index, route) in raw.routes.iter().flatten().enumerate() {
            let route_prefix = format!("{prefix}.routes[{route_index}]");
            match self.route(route, &route_prefix) {
                Some(Route::Out(route)) => routes_out.push(route),
                Some(Route::In(route)) => routes_in.push(route),
                None => {}
            }
        }

        Some(UplinkConfig {
            name: name?,
            url: url?,
            protocol,
            client_id,
            keep_alive,
            username,
            password,
            tls,
            clean_start: raw.clean_start.unwrap_or(false),
            session_expiry,
            will,
            birth,
            queue,
            inflight,
            max_rate,
            routes_out,
            routes_in,
            reconnect_min,
            reconnect_max,
        })
    }

    fn tls(&mut self, raw: &RawUplink, url: Option<&UplinkUrl>, prefix: &str) -> Option<TlsConfig> {
        let secure = url.map(|url| matches!(url.scheme, UrlScheme::Mqtts | UrlScheme::Wss));
        let settings = [
            ("ca", raw.ca.as_ref().map(Spanned::span)),
            ("cert", raw.cert.as_ref().map(Spanned::span)),
            ("key", raw.key.as_ref().map(Spanned::span)),
            ("alpn", raw.alpn.as_ref().map(Spanned::span)),
        ];
        if secure == Some(false) {
            for (name, span) in settings {
                if let Some(span) = span {
                    self.d
                        .error(
                            Some(span),
                            format!("{prefix}.{name}"),
                            "TLS settings need an mqtts:// or wss:// url",
                        )
                        .hint = Some(format!(
                        "change the url to mqtts:// (port 8883) or wss://, or remove `{name}`"
                    ));
                }
            }
            return None;
        }
        let ca = raw
            .ca
            .as_ref()
            .map(|ca| self.existing_file(ca, &format!("{prefix}.ca")));
        let cert = raw
            .cert
            .as_ref()
            .map(|cert| self.existing_file(cert, &format!("{prefix}.cert")));
        let key = raw
            .key
            .as_ref()
            .map(|key| self.existing_file(key, &format!("{prefix}.key")));
        match (&raw.cert, &raw.key) {
            (Some(cert), None) => {
                self.d
                    .error(
                        Some(cert.span()),
                        format!("{prefix}.cert"),
                        "cert is set without key",
                    )
                    .hint = Some(
                    "client certificate authentication needs both cert and key (its private key)"
                        .into(),
                );
            }
            (None, Some(key)) => {
                self.d
                    .error(
                        Some(key.span()),
                        format!("{prefix}.key"),
                        "key is set without cert",
                    )
                    .hint =
                    Some("client certificate authentication needs both cert and key".into());
            }
            _ => {}
        }
        let alpn = raw
            .alpn
            .as_ref()
            .map(|alpn| alpn.get_ref().clone())
            .unwrap_or_default();
        if let Some(list) = &raw.alpn {
            if list.get_ref().iter().any(String::is_empty) {
                self.d.error(
                    Some(list.span()),
                    format!("{prefix}.alpn"),
                    "ALPN protocol names must not be empty",
                );
            }
        }
        Some(TlsConfig {
            ca,
            cert,
            key,
            alpn,
        })
    }

    /// A will (`default` is None) or a birth message (`default` is the will, whose topic
    /// and QoS it takes when they are not set).
    fn will(
        &mut self,
        raw: &S<RawWill>,
        prefix: &str,
        will: Option<&WillConfig>,
    ) -> Option<WillConfig> {
        let span = raw.span();
        let raw = raw.get_ref();
        let is_birth = prefix.ends_with("birth");
        let topic = match (&raw.topic, will) {
            (Some(topic), _) => Some(self.topic(topic, &format!("{prefix}.topic"))),
            (None, Some(will)) => Some(will.topic.clone()),
            (None, None) => {
                let hint = if is_birth {
                    "set topic, or set a will: the birth message defaults to the will's topic"
                } else {
                    "e.g. topic = \"gateways/{gateway}/status\""
                };
                self.missing(span, format!("{prefix}.topic"), Some(hint));
                None
            }
        };
        let delay = if is_birth {
            if let Some(delay) = &raw.delay {
                self.d.error(
                    Some(delay.span()),
                    format!("{prefix}.delay"),
                    "delay applies only to the will",
                );
            }
            Duration::ZERO
        } else {
            self.seconds_u32(&raw.delay, &format!("{prefix}.delay"), Duration::ZERO)
        };
        let default_qos = will.map_or(QoS::AtLeastOnce, |will| will.qos);
        Some(WillConfig {
            topic: topic?,
            payload: raw
                .payload
                .clone()
                .unwrap_or_else(|| if is_birth { "online" } else { "offline" }.into()),
            qos: self.qos(&raw.qos, &format!("{prefix}.qos"), default_qos),
            retain: raw.retain.unwrap_or(true),
            delay,
        })
    }

    fn reconnect(&mut self, raw: &Option<S<RawReconnect>>, prefix: &str) -> (Duration, Duration) {
        let Some(raw) = raw else {
            return (DEFAULT_RECONNECT_MIN, DEFAULT_RECONNECT_MAX);
        };
        let r = raw.get_ref();
        let min = self.positive_duration(&r.min, &format!("{prefix}.min"), DEFAULT_RECONNECT_MIN);
        let max = self.positive_duration(
            &r.max,
            &format!("{prefix}.max"),
            DEFAULT_RECONNECT_MAX.max(min),
        );
        if min > max {
            let span = r.min.as_ref().map(Spanned::span).unwrap_or(raw.span());
            self.d.error(
                Some(span),
                format!("{prefix}.min"),
                format!(
                    "min ({}) is greater than max ({})",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
        }
        (min, max)
    }

    fn queue(&mut self, raw: &Option<S<RawQueue>>, prefix: &str) -> QueueConfig {
        let mut queue = QueueConfig {
            max_messages: DEFAULT_QUEUE_MESSAGES,
            max_bytes: DEFAULT_QUEUE_BYTES,
            max_age: DEFAULT_QUEUE_AGE,
            when_full: WhenFull::DropOldest,
        };
        let Some(raw) = raw else {
            return queue;
        };
        let raw = raw.get_ref();
        queue.max_messages = self.integer(
            &raw.max_messages,
            &format!("{prefix}.max_messages"),
            1,
            i64::MAX,
            DEFAULT_QUEUE_MESSAGES as i64,
        ) as u64;
        if let Some(bytes) = &raw.max_bytes {
            queue.max_bytes = self
                .size(bytes, &format!("{prefix}.max_bytes"))
                .unwrap_or(DEFAULT_QUEUE_BYTES);
        }
        queue.max_age = self.positive_duration(
            &raw.max_age,
            &format!("{prefix}.max_age"),
            DEFAULT_QUEUE_AGE,
        );
        if let Some(when_full) = &raw.when_full {
            queue.when_full = match when_full.get_ref().as_str() {
                "drop_oldest" => WhenFull::DropOldest,
                "drop_new" => WhenFull::DropNew,
                other => {
                    let diagnostic = self.d.error(
                        Some(when_full.span()),
                        format!("{prefix}.when_full"),
                        format!("unknown policy {other:?}, expected drop_oldest or drop_new"),
                    );
                    if let Some(close) = closest(other, &["drop_oldest", "drop_new"]) {
                        diagnostic.hint = Some(format!("did you mean `{close}`?"));
                    }
                    WhenFull::DropOldest
                }
            };
        }
        queue
    }

    fn route(&mut self, raw: &S<RawRoute>, prefix: &str) -> Option<Route> {
        let span = raw.span();
        let r = raw.get_ref();
        let key = |k: &str| format!("{prefix}.{k}");
        match (&r.out_filter, &r.in_filter) {
            (Some(_), Some(in_filter)) => {
                self.d
                    .error(
                        Some(in_filter.span()),
                        key("in"),
                        "a route has either `out` or `in`, not both",
                    )
                    .hint = Some("write two routes".into());
                None
            }
            (None, None) => {
                self.d
                    .error(
                        Some(span),
                        prefix,
                        "a route needs `out` (local to cloud) or `in` (cloud to local)",
                    )
                    .hint =
                    Some("e.g. { out = \"plant/#\", remote_prefix = \"sites/{gateway}/\" }".into());
                None
            }
            (Some(filter), None) => {
                let mut ok = true;
                if let Some(local) = &r.local_prefix {
                    self.d
                        .error(
                            Some(local.span()),
                            key("local_prefix"),
                            "local_prefix belongs to `in` routes",
                        )
                        .hint = Some("did you mean `remote_prefix`?".into());
                    ok = false;
                }
                let filter = self.filter(filter, &key("out"));
                let remote_prefix = r
                    .remote_prefix
                    .as_ref()
                    .map(|p| self.prefix(p, &key("remote_prefix")));
                let remote_template = r.remote_template.as_ref().map(|template| {
                    self.placeholders(template, &key("remote_template"), &["gateway", "topic"]);
                    if template.get_ref().contains(['+', '#']) {
                        self.d.error(
                            Some(template.span()),
                            key("remote_template"),
                            format!(
                                "topic template {:?} contains a wildcard (`+` or `#`)",
                                template.get_ref()
                            ),
                        );
                    }
                    self.substitute(template.get_ref())
                });
                if let (Some(_), Some(template)) = (&r.remote_prefix, &r.remote_template) {
                    self.d
                        .error(
                            Some(template.span()),
                            key("remote_template"),
                            "remote_prefix and remote_template are both set",
                        )
                        .hint = Some("keep one of them".into());
                    ok = false;
                }
                let qos = self.qos(&r.qos, &key("qos"), QoS::AtLeastOnce);
                let durable = r.durable.as_ref().is_none_or(|d| *d.get_ref());
                if let Some(flag) = &r.durable {
                    if !durable && qos != QoS::AtMostOnce {
                        self.d
                            .error(
                                Some(flag.span()),
                                key("durable"),
                                format!("durable = false is only allowed on QoS 0 routes, this one has qos = {}", u8::from(qos)),
                            )
                            .hint = Some("QoS 1 and 2 messages are always queued on disk; set qos = 0 for best effort".into());
                        ok = false;
                    }
                }
                ok.then(|| {
                    Route::Out(OutRoute {
                        filter,
                        remote_prefix,
                        remote_template,
                        qos,
                        retain: r.retain.as_ref().is_some_and(|retain| *retain.get_ref()),
                        durable,
                    })
                })
            }
            (None, Some(filter)) => {
                let mut ok = true;
                let out_only = [
                    ("remote_prefix", r.remote_prefix.as_ref().map(Spanned::span)),
                    (
                        "remote_template",
                        r.remote_template.as_ref().map(Spanned::span),
                    ),
                    ("retain", r.retain.as_ref().map(Spanned::span)),
                    ("durable", r.durable.as_ref().map(Spanned::span)),
                ];
                for (name, span) in out_only {
                    if let Some(span) = span {
                        let diagnostic = self.d.error(
                            Some(span),
                            key(name),
                            format!("{name} belongs to `out` routes"),
                        );
                        if name == "remote_prefix" {
                            diagnostic.hint = Some("did you mean `local_prefix`?".into());
                        }
                        ok = false;
                    }
                }
                let filter = self.filter(filter, &key("in"));
                let local_prefix = r
                    .local_prefix
                    .as_ref()
                    .map(|p| self.prefix(p, &key("local_prefix")));
                let qos = self.qos(&r.qos, &key("qos"), QoS::AtLeastOnce);
                ok.then_some(Route::In(InRoute {
                    filter,
                    local_prefix,
                    qos,
                }))
            }
        }
    }
}

enum Route {
    Out(OutRoute),
    In(InRoute),
}

/// Checks that `path` holds at least one PEM certificate, or a private key.
fn check_pem(path: &Path, wanted: Pem) -> Result<(), crate::pem::ContentError> {
    crate::pem::check_content(path, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_size("256MiB"), Ok(256 * 1024 * 1024));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1 gib"), Ok(1 << 30));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("1_000"), Ok(1000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn urls_get_default_ports_and_paths() {
        let url = parse_url("mqtts://broker.example.com").expect("valid url");
        assert_eq!(
            (url.scheme, url.port, url.path.as_str()),
            (UrlScheme::Mqtts, 8883, "")
        );
        let url = parse_url("wss://h.example.com").expect("valid url");
        assert_eq!((url.port, url.path.as_str()), (443, "/mqtt"));
        let url = parse_url("ws://[::1]:8080/ws").expect("valid url");
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("::1", 8080, "/ws")
        );
        let url = parse_url("mqtt://10.0.0.1:1884").expect("valid url");
        assert_eq!((url.host.as_str(), url.port), ("10.0.0.1", 1884));
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("broker:1883").is_err());
        assert!(parse_url("mqtt://user:pw@host").is_err());
        assert!(parse_url("mqtt://host:0").is_err());
        assert!(parse_url("mqtt://host/path").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
    }

    #[test]
    fn key_paths_follow_tables_and_arrays() {
        let text = "[gateway]\nid = \"x\"\n[[devices]]\nname = \"a\"\npoints = [ { name = \"t\", min = 1 } ]\n";
        let document = DeTable::parse(text).expect("valid toml");
        let root = Spanned::new(document.span(), DeValue::Table(document.into_inner()));
        let offset = text.find("min").expect("min in text");
        assert_eq!(
            key_path_at(&root, offset).as_deref(),
            Some("devices[0].points[0].min")
        );
        let offset = text.find("1 }").expect("1 in text");
        assert_eq!(
            key_path_at(&root, offset).as_deref(),
            Some("devices[0].points[0].min")
        );
        let offset = text.find("\"x\"").expect("x in text");
        assert_eq!(key_path_at(&root, offset).as_deref(), Some("gateway.id"));
    }
}
