//! Payload formats: how what a driver read becomes the bytes of an MQTT message. Every
//! driver publishes through [`encode`], in the device's [`PayloadFormat`]; a new format is
//! one more variant there and one more arm here.

pub mod influx;
pub mod template;

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{json, Map, Value as Json};

use super::rfc3339;
use crate::model::{Quality, Reading};
pub use template::{PayloadTemplate, TemplateError};

/// Content type of plain text payloads.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// How a device's readings are written.
#[derive(Debug, Clone, PartialEq)]
pub enum PayloadFormat {
    /// `{"value":..,"ts":"RFC 3339","quality":"good"}`
    Json,
    /// The bare value as text.
    Plain,
    /// InfluxDB line protocol ([`influx`]).
    Influx,
    /// The user's template ([`template`]), compiled when the configuration was loaded.
    Template(Arc<PayloadTemplate>),
}

impl PayloadFormat {
    /// The MQTT 5 content type of its messages (every format writes UTF-8 text).
    pub fn content_type(&self) -> &str {
        match self {
            PayloadFormat::Json => "application/json",
            PayloadFormat::Plain | PayloadFormat::Influx => TEXT_PLAIN,
            PayloadFormat::Template(template) => template.content_type(),
        }
    }

    /// The format's name in the configuration.
    pub fn name(&self) -> &'static str {
        match self {
            PayloadFormat::Json => "json",
            PayloadFormat::Plain => "plain",
            PayloadFormat::Influx => "influx",
            PayloadFormat::Template(_) => "template",
        }
    }
}

/// Who a sample is about.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a> {
    pub gateway: &'a str,
    pub device: &'a str,
    pub point: &'a str,
    pub unit: Option<&'a str>,
}

/// What one point reports.
#[derive(Debug)]
pub enum Sample<'a> {
    /// A register, a coil, a simulated value or a reply: one value with its quality.
    Reading(&'a Reading),
    /// The named fields a serial parse rule took from one frame (always good).
    Fields {
        fields: Map<String, Json>,
        timestamp: SystemTime,
    },
}

/// The payload of one sample; `Ok(None)` when the format has nothing to say (a
/// plain-format reading without a good value), an error when a template fails on it.
///
/// JSON: `{"value": .., "ts": "RFC 3339", "quality": "good"}`, with `"unit"` when the
/// point has one, `"error"` for a bad reading and the fields object as the value of a
/// frame. Plain: the bare value; a frame's single field bare, several as a JSON object.
/// (The unit travels as an MQTT 5 user property too, set by the caller.)
pub fn encode(
    format: &PayloadFormat,
    labels: &Labels<'_>,
    sample: Sample<'_>,
) -> Result<Option<Bytes>, TemplateError> {
    let unit = labels.unit;
    Ok(match (format, sample) {
        (PayloadFormat::Json, Sample::Reading(reading)) => {
            let mut body = json!({
                "value": reading.value,
                "ts": rfc3339(reading.timestamp),
                "quality": match reading.quality { Quality::Good => "good", Quality::Bad(_) => "bad" },
            });
            if let Some(map) = body.as_object_mut() {
                if let Some(unit) = unit {
                    map.insert("unit".into(), json!(unit));
                }
                if let Quality::Bad(reason) = &reading.quality {
                    map.insert("error".into(), json!(reason));
                }
            }
            Some(Bytes::from(body.to_string()))
        }
        (PayloadFormat::Json, Sample::Fields { fields, timestamp }) => {
            let mut body = json!({
                "value": Json::Object(fields),
                "ts": rfc3339(timestamp),
                "quality": "good",
            });
            if let (Some(unit), Some(map)) = (unit, body.as_object_mut()) {
                map.insert("unit".into(), json!(unit));
            }
            Some(Bytes::from(body.to_string()))
        }
        (PayloadFormat::Plain, Sample::Reading(reading)) => reading
            .value
            .as_ref()
            .filter(|_| reading.quality == Quality::Good)
            .map(|v| Bytes::from(v.to_string())),
        (PayloadFormat::Plain, Sample::Fields { fields, .. }) => Some(plain_fields(fields)),
        (PayloadFormat::Influx, Sample::Reading(reading)) => {
            let bad = match &reading.quality {
                Quality::Good => None,
                Quality::Bad(reason) => Some(reason.as_str()),
            };
            Some(Bytes::from(influx::reading_line(
                labels,
                reading.value.as_ref(),
                bad,
                reading.timestamp,
            )))
        }
        (PayloadFormat::Influx, Sample::Fields { fields, timestamp }) => {
            Some(Bytes::from(influx::fields_line(labels, &fields, timestamp)))
        }
        (PayloadFormat::Template(template), sample) => {
            let (value, timestamp, error) = match sample {
                Sample::Reading(reading) => (
                    json!(reading.value),
                    reading.timestamp,
                    match &reading.quality {
                        Quality::Good => None,
                        Quality::Bad(reason) => Some(reason.clone()),
                    },
                ),
                Sample::Fields { fields, timestamp } => (Json::Object(fields), timestamp, None),
            };
            let ts = rfc3339(timestamp);
            let ts_ms = timestamp
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            let variables = template::Variables {
                value: &value,
                ts: &ts,
                ts_ms,
                quality: if error.is_some() { "bad" } else { "good" },
                error: error.as_deref(),
                unit,
                device: labels.device,
                point: labels.point,
                gateway: labels.gateway,
            };
            Some(Bytes::from(template.render(&variables)?))
        }
    })
}

fn plain_fields(fields: Map<String, Json>) -> Bytes {
    if fields.len() != 1 {
        return Bytes::from(Json::Object(fields).to_string());
    }
    match fields.into_iter().next().map(|(_, v)| v) {
        Some(Json::String(text)) => Bytes::from(text),
        Some(other) => Bytes::from(other.to_string()),
        None => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Value;

    fn enc(format: PayloadFormat, sample: Sample<'_>, unit: Option<&str>) -> Option<Bytes> {
        let labels = Labels {
            gateway: "gw",
            device: "d",
            point: "p",
            unit,
        };
        encode(&format, &labels, sample).expect("json and plain never fail")
    }

    #[test]
    fn json_payload_carries_value_time_and_quality() {
        let reading = Reading {
            device: "d".into(),
            point: "p".into(),
            value: Some(Value::Float(1.5)),
            quality: Quality::Good,
            timestamp: SystemTime::UNIX_EPOCH,
        };
        let payload = enc(PayloadFormat::Json, Sample::Reading(&reading), None).expect("payload");
        let parsed: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        assert_eq!(parsed["value"], json!(1.5));
        assert_eq!(parsed["ts"], json!("1970-01-01T00:00:00Z"));
        assert_eq!(parsed["quality"], json!("good"));
        let plain = enc(PayloadFormat::Plain, Sample::Reading(&reading), None).expect("payload");
        assert_eq!(&plain[..], b"1.5");
        assert_eq!(parsed.get("unit"), None);
    }

    #[test]
    fn json_payload_names_the_unit_and_plain_stays_bare() {
        let reading = Reading {
            device: "d".into(),
            point: "p".into(),
            value: Some(Value::Float(21.5)),
            quality: Quality::Good,
            timestamp: SystemTime::UNIX_EPOCH,
        };
        let payload =
            enc(PayloadFormat::Json, Sample::Reading(&reading), Some("°C")).expect("payload");
        assert_eq!(
            std::str::from_utf8(&payload).expect("utf-8"),
            r#"{"value":21.5,"ts":"1970-01-01T00:00:00Z","quality":"good","unit":"°C"}"#
        );
        let plain =
            enc(PayloadFormat::Plain, Sample::Reading(&reading), Some("°C")).expect("payload");
        assert_eq!(&plain[..], b"21.5");
    }

    #[test]
    fn a_bad_reading_has_an_error_in_json_and_no_plain_payload() {
        let reading = Reading {
            device: "d".into(),
            point: "p".into(),
            value: None,
            quality: Quality::Bad("no response".into()),
            timestamp: SystemTime::UNIX_EPOCH,
        };
        let payload = enc(PayloadFormat::Json, Sample::Reading(&reading), None).expect("payload");
        assert_eq!(
            &payload[..],
            br#"{"value":null,"ts":"1970-01-01T00:00:00Z","quality":"bad","error":"no response"}"#
        );
        assert_eq!(
            enc(PayloadFormat::Plain, Sample::Reading(&reading), None),
            None
        );
    }

    fn fields_payload(fields: Map<String, Json>, format: PayloadFormat) -> Bytes {
        let timestamp = SystemTime::UNIX_EPOCH;
        enc(format, Sample::Fields { fields, timestamp }, None)
            .expect("fields always have a payload")
    }

    #[test]
    fn plain_payload_of_one_field_is_the_bare_value() {
        let mut fields = Map::new();
        fields.insert("t".into(), json!(21.5));
        assert_eq!(
            &fields_payload(fields.clone(), PayloadFormat::Plain)[..],
            b"21.5"
        );
        fields.insert("u".into(), json!("C"));
        assert_eq!(
            &fields_payload(fields, PayloadFormat::Plain)[..],
            br#"{"t":21.5,"u":"C"}"#
        );
    }

    #[test]
    fn influx_and_template_formats_are_encoded() {
        let reading = Reading {
            device: "d".into(),
            point: "p".into(),
            value: Some(Value::Int(42)),
            quality: Quality::Good,
            timestamp: SystemTime::UNIX_EPOCH,
        };
        let line = enc(PayloadFormat::Influx, Sample::Reading(&reading), Some("V")).expect("line");
        assert_eq!(
            &line[..],
            br#"d,gateway=gw,point=p,unit=V value=42i,quality="good" 0"#
        );
        let template = PayloadTemplate::compile(
            r#"{"v": {{ value }}, "t": {{ ts_ms }}, "q": "{{ quality }}", "u": "{{ unit }}"}"#,
            Some("application/json"),
        )
        .expect("compiles");
        let format = PayloadFormat::Template(Arc::new(template));
        assert_eq!(format.content_type(), "application/json");
        let body = enc(format, Sample::Reading(&reading), Some("V")).expect("payload");
        assert_eq!(&body[..], br#"{"v": 42, "t": 0, "q": "good", "u": "V"}"#);
    }

    #[test]
    fn a_template_sees_a_bad_reading_and_its_error() {
        let reading = Reading {
            device: "d".into(),
            point: "p".into(),
            value: None,
            quality: Quality::Bad("timeout".into()),
            timestamp: SystemTime::UNIX_EPOCH,
        };
        let template = PayloadTemplate::compile(
            "{{ quality }}:{{ error }}:{% if value is none %}-{% endif %}",
            None,
        )
        .expect("compiles");
        let body = enc(
            PayloadFormat::Template(Arc::new(template)),
            Sample::Reading(&reading),
            None,
        )
        .expect("payload");
        assert_eq!(&body[..], b"bad:timeout:-");
    }

    #[test]
    fn json_payload_of_a_frame_has_its_fields_as_the_value() {
        let mut fields = Map::new();
        fields.insert("t".into(), json!(21.5));
        assert_eq!(
            &fields_payload(fields, PayloadFormat::Json)[..],
            br#"{"value":{"t":21.5},"ts":"1970-01-01T00:00:00Z","quality":"good"}"#
        );
    }
}
