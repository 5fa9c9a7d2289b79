//! What every driver's configuration check shares: recording diagnostics for one device
//! (and remembering whether any was recorded), durations, names from a closed list, and the
//! serial port settings that Modbus RTU and serial line devices both have.

use std::collections::HashSet;
use std::ops::{Range, RangeInclusive};
use std::time::Duration;

use toml::Spanned as S;

use super::{Diagnostic, Diagnostics, FlowControl, Parity, SerialPortConfig};

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
        if self.reported.contains(&key_path) {
            return; // present but of the wrong type: serde said so already
        }
        self.d
            .error(Some(span), key_path, "missing required key")
            .hint = hint.map(Into::into);
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
        if let Some(close) = super::closest(&text.to_ascii_lowercase(), known) {
            diagnostic.hint = Some(format!("did you mean `{close}`?"));
        }
    }

    pub(crate) fn duration(&mut self, value: &S<String>, key_path: &str) -> Option<Duration> {
        match humantime::parse_duration(value.get_ref().trim()) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.error(
                    Some(value.span()),
                    key_path,
                    format!("invalid duration {:?}: {error}", value.get_ref()),
                )
                .hint = Some("write a number and a unit, like \"100ms\", \"1s\" or \"5m\"".into());
                None
            }
        }
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
    /// min not above max.
    pub(crate) fn backoff(
        &mut self,
        min: &Option<S<String>>,
        max: &Option<S<String>>,
        prefix: &str,
        defaults: (Duration, Duration),
    ) -> (Duration, Duration) {
        let backoff_min = self
            .positive_duration(min, &format!("{prefix}.backoff_min"))
            .unwrap_or(defaults.0);
        let backoff_max = self
            .positive_duration(max, &format!("{prefix}.backoff_max"))
            .unwrap_or(defaults.1);
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
