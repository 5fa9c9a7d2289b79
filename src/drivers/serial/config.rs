//! Serial device configuration: the raw serde struct for a `driver = "serial"` device and
//! its validation into [`SerialConfig`]. The keys every device has (`name`, `topic`,
//! `payload`, `poll`) are read here but validated by `drivers::config`, which calls
//! `validate` for the rest, so every error comes out together with file, line and key
//! path (`devices[1].parse[0].fields.lat.type: unknown type "nubmer", ...`).
//!
//! Byte strings (`delimiter`, `frame_start`, `frame_end`, `request`, `write_template`)
//! accept the escapes `\r`, `\n`, `\t`, `\0`, `\\` and `\xHH` on top of TOML's own, so
//! `delimiter = '\x03'` (a literal string) means the byte 0x03.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use regex_lite::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::config::closest;
use crate::drivers::config::{DeviceCheck, PortRules, RawPort};

type S<T> = Spanned<T>;

pub(crate) const DEFAULT_MAX_FRAME: usize = 1024;
/// Upper bound for `max_frame`: memory per device stays small whatever the config says.
pub(crate) const MAX_MAX_FRAME: usize = 1024 * 1024;
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(60);
/// The point name of the write-back command topic: `<point_topic("command")>/set`.
pub const COMMAND_POINT: &str = "command";
/// Longest delimiter / start / end sequence.
const MAX_MARKER: usize = 16;
/// Compiled size limit of one regex, so a config cannot make the gateway allocate much.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

const ENCODINGS: &[&str] = &["text", "hex"];
const CHECKSUMS: &[&str] = &["none", "nmea"];
const FIELD_TYPES: &[&str] = &["number", "integer", "bool", "string"];

/// A `[[devices]]` entry with `driver = "serial"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSerialDevice {
    pub(crate) name: Option<S<String>>,
    #[allow(dead_code)] // read before this struct is chosen
    pub(crate) driver: Option<S<String>>,
    pub(crate) topic: Option<S<String>>,
    pub(crate) payload: Option<S<crate::drivers::config::RawPayload>>,
    pub(crate) poll: Option<S<String>>,
    pub(crate) port: Option<S<String>>,
    pub(crate) baud: Option<S<i64>>,
    pub(crate) data_bits: Option<S<i64>>,
    pub(crate) parity: Option<S<String>>,
    pub(crate) stop_bits: Option<S<i64>>,
    pub(crate) flow_control: Option<S<String>>,
    pub(crate) delimiter: Option<S<String>>,
    pub(crate) frame_length: Option<S<i64>>,
    pub(crate) frame_start: Option<S<String>>,
    pub(crate) frame_end: Option<S<String>>,
    pub(crate) max_frame: Option<S<i64>>,
    pub(crate) encoding: Option<S<String>>,
    pub(crate) checksum: Option<S<String>>,
    pub(crate) parse: Option<S<Vec<S<RawRule>>>>,
    pub(crate) unmatched_topic: Option<S<String>>,
    pub(crate) request: Option<S<String>>,
    pub(crate) timeout: Option<S<String>>,
    pub(crate) write_template: Option<S<String>>,
    pub(crate) reply_match: Option<S<String>>,
    pub(crate) backoff_min: Option<S<String>>,
    pub(crate) backoff_max: Option<S<String>>,
    pub(crate) status_interval: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    #[serde(rename = "match")]
    pub(crate) pattern: Option<S<String>>,
    pub(crate) topic: Option<S<String>>,
    pub(crate) fields: Option<S<BTreeMap<String, S<RawField>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawField {
    #[serde(rename = "type")]
    pub(crate) kind: Option<S<String>>,
    pub(crate) scale: Option<S<f64>>,
}

/// A validated serial device (the part specific to the serial driver).
#[derive(Debug, Clone, PartialEq)]
pub struct SerialConfig {
    pub port: PortSettings,
    pub framing: Framing,
    /// Longest frame kept, in bytes (delimiters excluded). Default 1024.
    pub max_frame: usize,
    pub encoding: Encoding,
    pub checksum: Checksum,
    /// Tried in order; the first match wins.
    pub rules: Vec<Rule>,
    /// Where frames that match no rule go (a point name, like a rule's topic); `None`
    /// drops them (they are counted either way).
    pub unmatched_topic: Option<String>,
    /// Request/response mode: sent every `poll`; the next frame is the response.
    pub request: Option<Vec<u8>>,
    /// Longest wait for a response or a write reply. Default 1s.
    pub timeout: Duration,
    /// Write-back, when `write_template` is set.
    pub write: Option<WriteBack>,
    /// Reopen backoff bounds. Default 1s..60s.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Status (with counters) is republished this often, besides on every change.
    /// Default 60s.
    pub status_interval: Duration,
}

/// What a serial line device accepts: no parity by default, 5 to 8 data bits.
const LINE_PORT: PortRules = PortRules {
    default_parity: Parity::None,
    bauds: 50..=4_000_000,
    data_bits: 5..=8,
    port_hint: "port = \"/dev/ttyUSB0\" (or a stable /dev/serial/by-id/... path)",
    baud_hint: "common rates: 4800 (GPS), 9600, 19200, 38400, 115200",
    data_bits_note: "",
};

/// The port's settings (the shared serial port type).
pub type PortSettings = crate::drivers::config::SerialPortConfig;
pub use crate::drivers::config::{FlowControl, Parity};

/// How the byte stream is cut into frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// A frame ends at the delimiter (not part of the frame). Default `\n`.
    Delimiter(Vec<u8>),
    /// Every frame is exactly this many bytes.
    FixedLength(usize),
    /// A frame starts after `start` and ends before `end`; bytes outside are discarded.
    StartEnd { start: Vec<u8>, end: Vec<u8> },
}

/// How a frame's bytes become the text the rules match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// UTF-8, invalid sequences replaced by U+FFFD.
    Text,
    /// Lowercase hex digits, two per byte (`"0a1bff"`).
    Hex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    None,
    /// NMEA 0183: `$...*hh`, hh the XOR of the bytes between `$` (or `!`) and `*`.
    Nmea,
}

/// One parse rule: a regex, a topic and typed fields.
#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: Regex,
    /// The `{point}` of the device topic template.
    pub topic: String,
    /// Every named capture of `pattern`, in the order they appear.
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub kind: FieldType,
    /// Numbers are multiplied by this. Default 1.
    pub scale: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Number,
    Integer,
    Bool,
    String,
}

/// Write-back: a command on `<device topic with point = "command">/set` written to the port.
#[derive(Debug, Clone)]
pub struct WriteBack {
    /// Bytes written, with `{value}` replaced by the command's value.
    pub template: Vec<u8>,
    /// When set, the next frame matching it (within `timeout`) is the reply; its `value`
    /// capture (or first capture, or whole match) is published as the result.
    pub reply_match: Option<Regex>,
}

// A regex compares by its pattern: two rules with the same text behave the same (a
// reload compares configurations).
impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.pattern.as_str() == other.pattern.as_str()
            && self.topic == other.topic
            && self.fields == other.fields
    }
}

impl PartialEq for WriteBack {
    fn eq(&self, other: &Self) -> bool {
        self.template == other.template
            && self.reply_match.as_ref().map(Regex::as_str)
                == other.reply_match.as_ref().map(Regex::as_str)
    }
}

impl WriteBack {
    /// The bytes to write for `value`.
    pub fn render(&self, value: &str) -> Vec<u8> {
        let placeholder = b"{value}";
        let mut out = Vec::with_capacity(self.template.len() + value.len());
        let mut rest = &self.template[..];
        while let Some(at) = find(rest, placeholder) {
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(value.as_bytes());
            rest = &rest[at + placeholder.len()..];
        }
        out.extend_from_slice(rest);
        out
    }
}

/// The first position of `needle` in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Resolves the escapes `\r \n \t \0 \\ \xHH` (on top of whatever TOML already resolved).
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(byte) if hex.len() == 2 => out.push(byte),
                    _ => return Err(format!("`\\x` needs two hex digits, found {hex:?}")),
                }
            }
            Some(other) => return Err(format!("unknown escape `\\{other}`")),
            None => return Err("a lone `\\` at the end".to_owned()),
        }
    }
    Ok(out)
}

/// Validates the serial keys of one device. `span` is the device table's, `prefix` its key
/// path (`devices[2]`), `reported` the key paths serde already complained about. `None`
/// when anything is wrong; every problem is recorded in `d`.
pub(crate) fn validate(
    raw: &RawSerialDevice,
    span: Range<usize>,
    prefix: &str,
    mut v: DeviceCheck<'_, '_>,
) -> Option<SerialConfig> {
    let port = v.serial_port(
        RawPort {
            port: &raw.port,
            baud: &raw.baud,
            parity: &raw.parity,
            data_bits: &raw.data_bits,
            stop_bits: &raw.stop_bits,
            flow_control: Some(&raw.flow_control),
        },
        span,
        prefix,
        &LINE_PORT,
    );
    let (framing, frame_length) = v.framing(raw, prefix);
    let max_frame = match &raw.max_frame {
        None => DEFAULT_MAX_FRAME.max(frame_length.unwrap_or(0)),
        Some(value) => match usize::try_from(*value.get_ref()) {
            Ok(n) if (1..=MAX_MAX_FRAME).contains(&n) => {
                if let (Some(length), Some(span)) =
                    (frame_length, raw.frame_length.as_ref().map(Spanned::span))
                {
                    if length > n {
                        v.error(
                            Some(span),
                            format!("{prefix}.frame_length"),
                            format!("frame_length {length} is more than max_frame ({n})"),
                        );
                    }
                }
                n
            }
            _ => {
                v.error(
                    Some(value.span()),
                    format!("{prefix}.max_frame"),
                    format!(
                        "{} is out of range, expected 1 to {MAX_MAX_FRAME} bytes",
                        value.get_ref()
                    ),
                );
                DEFAULT_MAX_FRAME
            }
        },
    };
    let encoding = match &raw.encoding {
        None => Encoding::Text,
        Some(value) => match value.get_ref().to_ascii_lowercase().as_str() {
            "text" => Encoding::Text,
            "hex" => Encoding::Hex,
            _ => {
                v.unknown(value, &format!("{prefix}.encoding"), "encoding", ENCODINGS);
                Encoding::Text
            }
        },
    };
    let checksum = match &raw.checksum {
        None => Checksum::None,
        Some(value) => match value.get_ref().to_ascii_lowercase().as_str() {
            "none" => Checksum::None,
            "nmea" => {
                if encoding == Encoding::Hex {
                    v.error(
                        Some(value.span()),
                        format!("{prefix}.checksum"),
                        "the NMEA checksum needs encoding = \"text\"",
                    );
                }
                Checksum::Nmea
            }
            _ => {
                v.unknown(value, &format!("{prefix}.checksum"), "checksum", CHECKSUMS);
                Checksum::None
            }
        },
    };

    let mut rules = Vec::new();
    if let Some(list) = &raw.parse {
        for (index, rule) in list.get_ref().iter().enumerate() {
            if let Some(rule) = v.rule(rule, &format!("{prefix}.parse[{index}]")) {
                rules.push(rule);
            }
        }
    }
    let unmatched_topic = raw
        .unmatched_topic
        .as_ref()
        .and_then(|topic| v.point_topic(topic, &format!("{prefix}.unmatched_topic")));

    let request = raw
        .request
        .as_ref()
        .and_then(|value| v.bytes(value, &format!("{prefix}.request"), false));
    let timeout = v
        .positive_duration(&raw.timeout, &format!("{prefix}.timeout"))
        .unwrap_or(DEFAULT_TIMEOUT);

    let reply_match = raw.reply_match.as_ref().and_then(|value| {
        let key_path = format!("{prefix}.reply_match");
        if raw.write_template.is_none() {
            v.error(
                Some(value.span()),
                &key_path,
                "reply_match needs write_template (write-back is off without it)",
            )
            .hint = Some("e.g. write_template = 'SET {value}\\r\\n'".into());
        }
        v.regex(value, &key_path)
    });
    let write = raw.write_template.as_ref().and_then(|value| {
        let key_path = format!("{prefix}.write_template");
        for placeholder in value.get_ref().split('{').skip(1) {
            let name = placeholder.split('}').next().unwrap_or_default();
            if name != "value" {
                v.error(
                    Some(value.span()),
                    &key_path,
                    format!("unknown placeholder {{{name}}}, the template knows only {{value}}"),
                );
            }
        }
        let template = v.bytes(value, &key_path, false)?;
        Some(WriteBack {
            template,
            reply_match: reply_match.clone(),
        })
    });

    let (backoff_min, backoff_max) = v.backoff(&raw.backoff_min, &raw.backoff_max, prefix);
    let status_interval = v
        .positive_duration(&raw.status_interval, &format!("{prefix}.status_interval"))
        .unwrap_or(DEFAULT_STATUS_INTERVAL);

    if !v.ok {
        return None;
    }
    Some(SerialConfig {
        port: port?,
        framing,
        max_frame,
        encoding,
        checksum,
        rules,
        unmatched_topic,
        request,
        timeout,
        write,
        backoff_min,
        backoff_max,
        status_interval,
    })
}

impl DeviceCheck<'_, '_> {
    /// A byte string with escapes; `marker` limits it to [`MAX_MARKER`] bytes.
    fn bytes(&mut self, value: &S<String>, key_path: &str, marker: bool) -> Option<Vec<u8>> {
        match unescape(value.get_ref()) {
            Ok(bytes) if bytes.is_empty() => {
                self.error(Some(value.span()), key_path, "must not be empty");
                None
            }
            Ok(bytes) if marker && bytes.len() > MAX_MARKER => {
                self.error(
                    Some(value.span()),
                    key_path,
                    format!("{} bytes is too long, at most {MAX_MARKER}", bytes.len()),
                );
                None
            }
            Ok(bytes) => Some(bytes),
            Err(error) => {
                self.error(Some(value.span()), key_path, error).hint = Some(
                    "escapes: \\r \\n \\t \\0 \\\\ \\xHH; in a TOML basic string (\"...\") write \\\\x03, or use a literal string ('\\x03')".into(),
                );
                None
            }
        }
    }

    fn regex(&mut self, value: &S<String>, key_path: &str) -> Option<Regex> {
        match regex_lite::RegexBuilder::new(value.get_ref())
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
        {
            Ok(regex) => Some(regex),
            Err(error) => {
                // The regex crate's message spans several lines with a caret; keep it whole.
                self.error(
                    Some(value.span()),
                    key_path,
                    format!("invalid regex: {error}"),
                )
                .hint = Some(
                    "write regexes as TOML literal strings ('...') so backslashes stay as they are"
                        .into(),
                );
                None
            }
        }
    }

    /// A rule topic or `unmatched_topic`: the `{point}` of the device template.
    fn point_topic(&mut self, value: &S<String>, key_path: &str) -> Option<String> {
        let text = value.get_ref().trim();
        let problem = if text.is_empty() {
            Some("must not be empty".to_owned())
        } else if text.contains(['+', '#', '\0']) {
            Some(format!("topic {text:?} contains a wildcard (`+` or `#`)"))
        } else if text.contains(['{', '}']) {
            Some(format!(
                "topic {text:?} is the {{point}} of the device topic template and takes no placeholders"
            ))
        } else if text.starts_with('/') || text.ends_with('/') || text.contains("//") {
            Some(format!("topic {text:?} has an empty level"))
        } else if text == COMMAND_POINT || text.starts_with("command/") {
            Some(format!(
                "topic {text:?} collides with the write-back command topic (point \"{COMMAND_POINT}\")"
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            self.error(Some(value.span()), key_path, problem);
            return None;
        }
        Some(text.to_owned())
    }

    /// The framing, and the fixed frame length when that is the framing.
    fn framing(&mut self, raw: &RawSerialDevice, prefix: &str) -> (Framing, Option<usize>) {
        let given: Vec<(&str, Range<usize>)> = [
            ("delimiter", raw.delimiter.as_ref().map(Spanned::span)),
            ("frame_length", raw.frame_length.as_ref().map(Spanned::span)),
            (
                "frame_start",
                raw.frame_start
                    .as_ref()
                    .or(raw.frame_end.as_ref())
                    .map(Spanned::span),
            ),
        ]
        .into_iter()
        .filter_map(|(key, span)| span.map(|span| (key, span)))
        .collect();
        if given.len() > 1 {
            let names: Vec<&str> = given.iter().map(|(key, _)| *key).collect();
            let (key, span) = given[1].clone();
            self.error(
                Some(span),
                format!("{prefix}.{key}"),
                format!(
                    "choose one framing: {} were both given",
                    names.join(" and ")
                ),
            )
            .hint = Some(
                "delimiter = \"\\r\\n\", or frame_length = N, or frame_start + frame_end".into(),
            );
        }
        let default = Framing::Delimiter(b"\n".to_vec());
        if let Some(delimiter) = &raw.delimiter {
            let bytes = self.bytes(delimiter, &format!("{prefix}.delimiter"), true);
            return (bytes.map_or(default, Framing::Delimiter), None);
        }
        if let Some(length) = &raw.frame_length {
            return match usize::try_from(*length.get_ref()) {
                Ok(n) if (1..=MAX_MAX_FRAME).contains(&n) => (Framing::FixedLength(n), Some(n)),
                _ => {
                    self.error(
                        Some(length.span()),
                        format!("{prefix}.frame_length"),
                        format!(
                            "{} is out of range, expected 1 to {MAX_MAX_FRAME} bytes",
                            length.get_ref()
                        ),
                    );
                    (default, None)
                }
            };
        }
        match (&raw.frame_start, &raw.frame_end) {
            (None, None) => (default, None),
            (Some(start), Some(end)) => {
                let start = self.bytes(start, &format!("{prefix}.frame_start"), true);
                let end = self.bytes(end, &format!("{prefix}.frame_end"), true);
                match (start, end) {
                    (Some(start), Some(end)) => (Framing::StartEnd { start, end }, None),
                    _ => (default, None),
                }
            }
            (Some(start), None) => {
                self.error(
                    Some(start.span()),
                    format!("{prefix}.frame_end"),
                    "frame_start needs frame_end",
                )
                .hint = Some("e.g. frame_start = '\\x02', frame_end = '\\x03'".into());
                (default, None)
            }
            (None, Some(end)) => {
                self.error(
                    Some(end.span()),
                    format!("{prefix}.frame_start"),
                    "frame_end needs frame_start",
                )
                .hint = Some(
                    "a frame that only has an end marker is a delimiter: delimiter = '...'".into(),
                );
                (default, None)
            }
        }
    }

    fn rule(&mut self, raw: &S<RawRule>, prefix: &str) -> Option<Rule> {
        let span = raw.span();
        let raw = raw.get_ref();
        let pattern = match &raw.pattern {
            None => {
                self.missing(
                    span.clone(),
                    format!("{prefix}.match"),
                    Some("match = '^T=(?P<temperature>[-0-9.]+)$'"),
                );
                None
            }
            Some(pattern) => self.regex(pattern, &format!("{prefix}.match")),
        };
        let topic = match &raw.topic {
            None => {
                self.missing(span, format!("{prefix}.topic"), Some("topic = \"gps/fix\""));
                None
            }
            // Several rules may share a topic (e.g. two sentence types of one fix).
            Some(topic) => self.point_topic(topic, &format!("{prefix}.topic")),
        };
        let pattern = pattern?;
        let names: Vec<&str> = pattern.capture_names().flatten().collect();
        let empty = BTreeMap::new();
        let raw_fields = raw.fields.as_ref().map_or(&empty, |f| f.get_ref());
        for (name, field) in raw_fields {
            if !names.contains(&name.as_str()) {
                let diagnostic = self.error(
                    Some(field.span()),
                    format!("{prefix}.fields.{name}"),
                    format!("the regex has no capture named {name:?}"),
                );
                diagnostic.hint = Some(match closest(name, &names) {
                    Some(close) => format!("did you mean `{close}`?"),
                    None if names.is_empty() => {
                        "name a capture in the regex with (?P<name>...)".to_owned()
                    }
                    None => format!("the named captures are {}", names.join(", ")),
                });
            }
        }
        let mut fields = Vec::new();
        for name in names {
            let key_path = format!("{prefix}.fields.{name}");
            let field = raw_fields.get(name).map(Spanned::get_ref);
            let kind = match field.and_then(|f| f.kind.as_ref()) {
                None => FieldType::String,
                Some(kind) => match kind.get_ref().to_ascii_lowercase().as_str() {
                    "number" | "float" => FieldType::Number,
                    "integer" | "int" => FieldType::Integer,
                    "bool" | "boolean" => FieldType::Bool,
                    "string" | "text" => FieldType::String,
                    _ => {
                        self.unknown(kind, &format!("{key_path}.type"), "type", FIELD_TYPES);
                        FieldType::String
                    }
                },
            };
            let scale = match field.and_then(|f| f.scale.as_ref()) {
                None => 1.0,
                Some(scale) => {
                    let n = *scale.get_ref();
                    if !matches!(kind, FieldType::Number | FieldType::Integer) {
                        self.error(
                            Some(scale.span()),
                            format!("{key_path}.scale"),
                            "scale applies only to type number or integer",
                        );
                    } else if !n.is_finite() || n == 0.0 {
                        self.error(
                            Some(scale.span()),
                            format!("{key_path}.scale"),
                            format!("must be a finite number other than 0, found {n}"),
                        );
                    }
                    n
                }
            };
            fields.push(Field {
                name: name.to_owned(),
                kind,
                scale,
            });
        }
        Some(Rule {
            topic: topic?,
            pattern,
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_become_bytes() {
        assert_eq!(unescape(r"\r\n").as_deref(), Ok(&b"\r\n"[..]));
        assert_eq!(unescape(r"\x03").as_deref(), Ok(&[3u8][..]));
        assert_eq!(unescape("\r\n").as_deref(), Ok(&b"\r\n"[..]));
        assert_eq!(unescape(r"a\\b").as_deref(), Ok(&b"a\\b"[..]));
        assert_eq!(unescape("é").as_deref(), Ok("é".as_bytes()));
        assert!(unescape(r"\x3").is_err());
        assert!(unescape(r"\q").is_err());
        assert!(unescape("\\").is_err());
    }

    #[test]
    fn write_template_replaces_every_value_placeholder() {
        let write = WriteBack {
            template: b"SET {value} ({value})\r\n".to_vec(),
            reply_match: None,
        };
        assert_eq!(write.render("42"), b"SET 42 (42)\r\n");
        let fixed = WriteBack {
            template: b"TARE\r\n".to_vec(),
            reply_match: None,
        };
        assert_eq!(fixed.render("x"), b"TARE\r\n");
    }
}
