//! Generic checks of configuration values, each recording a diagnostic with the value's
//! line and key path when it fails: durations, sizes, integer ranges, QoS, names, keywords
//! from a closed list, `{placeholder}` templates, topics, and files (PEM files too).
//!
//! [`Checker`] carries what every section's check needs: the diagnostics, the config
//! file's directory and the values shared across sections. Each part adds the checks of
//! its own section in its own `config.rs`.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use regex_lite::Regex;

use super::error::{closest, ConfigError, Diagnostics};
use super::gateway::DEFAULT_DATA_DIR;
use super::raw::{RawSize, S};
use crate::model::QoS;
use crate::pem::{self, PemError};

/// How a duration is written, for the hint under an invalid one.
const DURATION_HINT: &str =
    "write a number and a unit, like \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\"";

/// The state of one file's validation, shared by the checks of every section.
#[derive(Debug)]
pub(crate) struct Checker<'a> {
    pub(crate) d: Diagnostics<'a>,
    /// Relative paths in the file are resolved against this directory.
    base_dir: PathBuf,
    /// `gateway.data_dir` once validated: the base of the broker's `store_file`.
    pub(crate) data_dir: PathBuf,
    /// Substituted for `{gateway}`; a harmless stand-in while the id itself is invalid.
    pub(crate) gateway_id: String,
    /// Key paths serde already reported (and removed), so a removed required key is not
    /// reported again as missing.
    pub(crate) reported: HashSet<String>,
}

impl<'a> Checker<'a> {
    /// A checker for the file `source`, whose diagnostics go to `d`.
    pub(crate) fn new(d: Diagnostics<'a>, source: &Path) -> Self {
        Checker {
            d,
            base_dir: super::document::base_dir(source),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            gateway_id: String::from("gateway"),
            reported: HashSet::new(),
        }
    }

    /// The validated value, or every diagnostic recorded (the value may be `None` only
    /// when a diagnostic says why).
    pub(crate) fn finish<T>(self, value: Option<T>) -> Result<T, ConfigError> {
        match value {
            Some(value) if self.d.is_empty() => Ok(value),
            _ => Err(self.d.into_error()),
        }
    }
}

/// Records a missing required key, unless serde already reported the key (present but of
/// the wrong type).
pub(crate) fn report_missing(
    d: &mut Diagnostics<'_>,
    reported: &HashSet<String>,
    span: Range<usize>,
    key_path: String,
    hint: Option<&str>,
) {
    if reported.contains(&key_path) {
        return;
    }
    d.error(Some(span), key_path, "missing required key").hint = hint.map(Into::into);
}

/// A duration such as `"30s"`; an invalid one is recorded with `hint`.
pub(crate) fn parse_duration(
    d: &mut Diagnostics<'_>,
    value: &S<String>,
    key_path: &str,
    hint: &str,
) -> Option<Duration> {
    match humantime::parse_duration(value.get_ref().trim()) {
        Ok(duration) => Some(duration),
        Err(error) => {
            d.error(
                Some(value.span()),
                key_path,
                format!("invalid duration {:?}: {error}", value.get_ref()),
            )
            .hint = Some(hint.into());
            None
        }
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

impl Checker<'_> {
    pub(crate) fn unknown_key(
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

    pub(crate) fn missing(&mut self, span: Range<usize>, key_path: String, hint: Option<&str>) {
        report_missing(&mut self.d, &self.reported, span, key_path, hint);
    }

    /// A keyword that must be one of `choices`: its value, or an error that lists them with
    /// the closest as a hint (else `otherwise`).
    pub(crate) fn choice<T: Copy>(
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

    pub(crate) fn duration(&mut self, value: &S<String>, key_path: &str) -> Option<Duration> {
        parse_duration(&mut self.d, value, key_path, DURATION_HINT)
    }

    /// An optional duration that must be more than zero.
    pub(crate) fn positive_duration(
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
    pub(crate) fn seconds_u32(
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

    pub(crate) fn size(&mut self, value: &S<RawSize>, key_path: &str) -> Option<u64> {
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
    pub(crate) fn size_or_zero(&mut self, value: &S<RawSize>, key_path: &str) -> Option<u64> {
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
    pub(crate) fn integer(
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

    pub(crate) fn qos(&mut self, value: &Option<S<i64>>, key_path: &str, default: QoS) -> QoS {
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
    pub(crate) fn name(&mut self, value: &S<String>, key_path: &str) -> bool {
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
    pub(crate) fn placeholders(
        &mut self,
        value: &S<String>,
        key_path: &str,
        allowed: &[&str],
    ) -> bool {
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

    pub(crate) fn substitute(&self, text: &str) -> String {
        text.replace("{gateway}", &self.gateway_id)
    }

    /// A topic to publish to (no wildcards) with `{gateway}` substituted.
    pub(crate) fn topic(&mut self, value: &S<String>, key_path: &str) -> String {
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
    pub(crate) fn prefix(&mut self, value: &S<String>, key_path: &str) -> String {
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

    /// A path relative to the config file's directory.
    pub(crate) fn path(&self, value: &str) -> PathBuf {
        let path = Path::new(value);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// A file that must exist.
    pub(crate) fn existing_file(&mut self, value: &S<String>, key_path: &str) -> PathBuf {
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

    /// A file that must exist and hold PEM certificates or a PEM private key.
    pub(crate) fn pem_file(&mut self, value: &S<String>, key_path: &str, wanted: Pem) -> PathBuf {
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
}

/// What a PEM file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pem {
    Certificates,
    PrivateKey,
}

/// Checks that `path` holds at least one PEM certificate, or a private key, read as the
/// listener and the uplink will read it.
fn check_pem(path: &Path, wanted: Pem) -> Result<(), String> {
    let result = match wanted {
        Pem::Certificates => pem::certificates("certificate", path).map(drop),
        Pem::PrivateKey => pem::private_key(path).map(drop),
    };
    // The diagnostic names the file already: say only what is wrong with it.
    result.map_err(|error| match error {
        PemError::Read { source, .. } => format!("cannot read: {source}"),
        PemError::Invalid { source, .. } => format!("not valid PEM: {source}"),
        PemError::NoCertificate { .. } => "no PEM certificate in this file".into(),
        PemError::NoKey { .. } => "no PEM private key in this file".into(),
        other => other.to_string(),
    })
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
}
