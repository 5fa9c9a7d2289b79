//! The simulated driver's settings: points and their waveforms, and their validation.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{Checker, RawScalar, S};
use crate::drivers::config::{common_keys, DeviceConfig, DriverConfig};
use crate::model::Value;

const WAVEFORMS: &[&str] = &["sine", "ramp", "random_walk", "constant"];
/// A sine's or a ramp's period.
const DEFAULT_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedConfig {
    pub points: Vec<SimulatedPoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedPoint {
    pub name: String,
    pub waveform: Waveform,
    pub writable: bool,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Waveform {
    Sine {
        min: f64,
        max: f64,
        period: Duration,
    },
    Ramp {
        min: f64,
        max: f64,
        period: Duration,
    },
    RandomWalk {
        min: f64,
        max: f64,
        step: f64,
    },
    Constant {
        value: Value,
    },
}

/// A `[[devices]]` entry with `driver = "simulated"`. Each driver gets its own struct (the
/// common keys repeated) so that `deny_unknown_fields` rejects keys of other drivers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSimulatedDevice {
    pub(crate) name: Option<S<String>>,
    #[allow(dead_code)] // read before this struct is chosen
    pub(crate) driver: Option<S<String>>,
    pub(crate) topic: Option<S<String>>,
    pub(crate) payload: Option<S<crate::drivers::config::RawPayload>>,
    pub(crate) poll: Option<S<String>>,
    pub(crate) points: Option<S<Vec<S<RawSimulatedPoint>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSimulatedPoint {
    pub(crate) name: Option<S<String>>,
    pub(crate) waveform: Option<S<String>>,
    pub(crate) min: Option<S<f64>>,
    pub(crate) max: Option<S<f64>>,
    pub(crate) period: Option<S<String>>,
    pub(crate) step: Option<S<f64>>,
    pub(crate) value: Option<S<RawScalar>>,
    pub(crate) unit: Option<String>,
    pub(crate) writable: Option<bool>,
}

impl Checker<'_> {
    /// A `driver = "simulated"` device.
    pub(crate) fn simulated_device(
        &mut self,
        raw: S<RawSimulatedDevice>,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<DeviceConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let common = common_keys!(raw);
        self.device(common, span.clone(), prefix, names, |c| {
            let mut points = Vec::new();
            let mut point_names: HashMap<String, usize> = HashMap::new();
            match &raw.points {
                None => c.missing(span, format!("{prefix}.points"), Some("a simulated device needs at least one point, e.g. points = [{ name = \"temperature\", waveform = \"sine\", min = 18.0, max = 24.0 }]")),
                Some(list) if list.get_ref().is_empty() => {
                    c.d.error(Some(list.span()), format!("{prefix}.points"), "a simulated device needs at least one point");
                }
                Some(list) => {
                    for (index, point) in list.get_ref().iter().enumerate() {
                        let point_prefix = format!("{prefix}.points[{index}]");
                        if let Some(point) = c.simulated_point(point, &point_prefix, &mut point_names) {
                            points.push(point);
                        }
                    }
                }
            }
            Some(DriverConfig::Simulated(SimulatedConfig { points }))
        })
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
}
