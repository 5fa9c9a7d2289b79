//! Values between the local bus and Sparkplug metrics: a reading's payload (the device's
//! JSON or plain format) into a value, a time and a quality; a value into a metric of the
//! point's datatype; a command metric into the text a point's `/set` topic takes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;

use super::proto::{DataType, Metric, MetricValue, PropertySet, PropertyValue, PropertyValueKind};

/// The Sparkplug (and OPC) quality code of a good value, in the `Quality` property.
pub const QUALITY_GOOD: u32 = 192;
/// The quality code of a value that could not be read.
pub const QUALITY_BAD: u32 = 0;

/// What one local reading says.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSample {
    /// `None` when the read failed.
    pub value: Option<Json>,
    pub good: bool,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// A reading's payload: `json` for the JSON format (`{"value":..,"ts":..,"quality":..}`),
/// else the bare value (plain). `now` stands in for a missing or unreadable time. `None`
/// for a payload that is neither.
pub fn decode_local(payload: &[u8], json: bool, now: SystemTime) -> Option<LocalSample> {
    let now_ms = millis(now);
    if json {
        let body: Json = serde_json::from_slice(payload).ok()?;
        let object = body.as_object()?;
        let good = object.get("quality").and_then(Json::as_str) != Some("bad");
        let value = object.get("value").filter(|v| !v.is_null()).cloned();
        let timestamp_ms = object
            .get("ts")
            .and_then(Json::as_str)
            .and_then(parse_rfc3339_ms)
            .unwrap_or(now_ms);
        return Some(LocalSample {
            value,
            good,
            timestamp_ms,
        });
    }
    let text = std::str::from_utf8(payload).ok()?;
    let value = serde_json::from_str::<Json>(text.trim())
        .ok()
        .filter(|v| !v.is_object() && !v.is_array())
        .unwrap_or_else(|| Json::String(text.to_owned()));
    Some(LocalSample {
        value: Some(value),
        good: true,
        timestamp_ms: now_ms,
    })
}

fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A JSON value as a metric value of `datatype`; `None` when it does not fit (a text in a
/// numeric point, a number out of range): the metric is then sent as null.
pub fn metric_value(datatype: DataType, value: &Json) -> Option<MetricValue> {
    let as_i64 = || {
        value
            .as_i64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|x| x.fract() == 0.0)
                    .map(|x| x as i64)
            })
            .or_else(|| value.as_bool().map(i64::from))
    };
    let as_u64 = || {
        value
            .as_u64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|x| x.fract() == 0.0 && *x >= 0.0)
                    .map(|x| x as u64)
            })
            .or_else(|| value.as_bool().map(u64::from))
    };
    Some(match datatype {
        // Two's complement in the type's own width (Int16 -2 is 0xfffe), as the reference
        // implementations write it; commands are read in either form.
        DataType::Int8 => MetricValue::IntValue(u32::from(i8::try_from(as_i64()?).ok()? as u8)),
        DataType::Int16 => MetricValue::IntValue(u32::from(i16::try_from(as_i64()?).ok()? as u16)),
        DataType::Int32 => MetricValue::IntValue(i32::try_from(as_i64()?).ok()? as u32),
        DataType::Int64 => MetricValue::LongValue(as_i64()? as u64),
        DataType::UInt8 => MetricValue::IntValue(u32::from(u8::try_from(as_u64()?).ok()?)),
        DataType::UInt16 => MetricValue::IntValue(u32::from(u16::try_from(as_u64()?).ok()?)),
        DataType::UInt32 => MetricValue::IntValue(u32::try_from(as_u64()?).ok()?),
        DataType::UInt64 | DataType::DateTime => MetricValue::LongValue(as_u64()?),
        DataType::Float => MetricValue::FloatValue(number(value)? as f32),
        DataType::Double => MetricValue::DoubleValue(number(value)?),
        DataType::Boolean => MetricValue::BooleanValue(match value {
            Json::Bool(b) => *b,
            Json::Number(n) => n.as_f64()? != 0.0,
            _ => return None,
        }),
        DataType::String | DataType::Text => MetricValue::StringValue(match value {
            Json::String(text) => text.clone(),
            other => other.to_string(),
        }),
    })
}

fn number(value: &Json) -> Option<f64> {
    value.as_f64().or_else(|| value.as_bool().map(f64::from))
}

/// A metric with a value (or null) for a sample.
pub fn sample_metric(datatype: DataType, sample: &LocalSample) -> Metric {
    let value = sample
        .value
        .as_ref()
        .filter(|_| sample.good)
        .and_then(|v| metric_value(datatype, v));
    Metric {
        timestamp: Some(sample.timestamp_ms),
        datatype: Some(datatype.code()),
        is_null: value.is_none().then_some(true),
        value,
        ..Metric::default()
    }
}

/// The properties a point's metric carries in a birth (and in data when its quality is
/// bad): `engUnit` when it has a unit, and `Quality`.
pub fn properties(unit: Option<&str>, good: bool) -> PropertySet {
    let mut set = PropertySet::default();
    if let Some(unit) = unit {
        set.keys.push("engUnit".into());
        set.values.push(PropertyValue {
            r#type: Some(DataType::String.code()),
            is_null: None,
            value: Some(PropertyValueKind::StringValue(unit.to_owned())),
        });
    }
    set.keys.push("Quality".into());
    set.values.push(PropertyValue {
        r#type: Some(DataType::Int32.code()),
        is_null: None,
        value: Some(PropertyValueKind::IntValue(if good {
            QUALITY_GOOD
        } else {
            QUALITY_BAD
        })),
    });
    set
}

/// Why a command metric cannot become a write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("the metric has no value")]
    NoValue,
    #[error("the metric's value is not a number, a boolean or a text")]
    Unsupported,
    #[error("the value does not fit the point's datatype {0}")]
    DoesNotFit(&'static str),
}

/// The `/set` payload (the plain text a driver parses) of a command metric for a point of
/// `datatype`: a number, `true`/`false` or the text.
pub fn command_text(
    datatype: DataType,
    value: Option<&MetricValue>,
) -> Result<String, CommandError> {
    let value = value.ok_or(CommandError::NoValue)?;
    let signed = |raw: u32, bits: u32| -> i64 {
        let shift = 32 - bits;
        i64::from(((raw << shift) as i32) >> shift)
    };
    let fits = || CommandError::DoesNotFit(datatype.name());
    Ok(match (datatype, value) {
        (DataType::Boolean, MetricValue::BooleanValue(b)) => b.to_string(),
        (DataType::Boolean, MetricValue::IntValue(i)) => (*i != 0).to_string(),
        (DataType::Boolean, MetricValue::LongValue(i)) => (*i != 0).to_string(),
        (DataType::Int8, MetricValue::IntValue(raw)) => signed(*raw, 8).to_string(),
        (DataType::Int16, MetricValue::IntValue(raw)) => signed(*raw, 16).to_string(),
        (DataType::Int32, MetricValue::IntValue(raw)) => (*raw as i32).to_string(),
        (DataType::Int64, MetricValue::LongValue(raw)) => (*raw as i64).to_string(),
        (_, MetricValue::IntValue(raw)) => raw.to_string(),
        (_, MetricValue::LongValue(raw)) => raw.to_string(),
        (_, MetricValue::FloatValue(x)) if x.is_finite() => x.to_string(),
        (_, MetricValue::DoubleValue(x)) if x.is_finite() => x.to_string(),
        (DataType::Boolean, _) => return Err(fits()),
        (_, MetricValue::FloatValue(_) | MetricValue::DoubleValue(_)) => return Err(fits()),
        (_, MetricValue::BooleanValue(b)) => b.to_string(),
        (_, MetricValue::StringValue(text)) => text.clone(),
        (_, MetricValue::BytesValue(_)) => return Err(CommandError::Unsupported),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_json_reading_gives_its_value_quality_and_time() {
        let payload =
            br#"{"value":21.5,"ts":"2024-01-02T03:04:05.678Z","quality":"good","unit":"C"}"#;
        let sample = decode_local(payload, true, UNIX_EPOCH).expect("decodes");
        assert_eq!(sample.value, Some(json!(21.5)));
        assert!(sample.good);
        assert_eq!(sample.timestamp_ms, 1_704_164_645_678);
        let bad = decode_local(
            br#"{"value":null,"quality":"bad","error":"timeout"}"#,
            true,
            UNIX_EPOCH,
        )
        .expect("decodes");
        assert_eq!((bad.value, bad.good, bad.timestamp_ms), (None, false, 0));
        assert_eq!(decode_local(b"not json", true, UNIX_EPOCH), None);
    }

    #[test]
    fn a_plain_reading_is_a_number_a_boolean_or_text() {
        let now = UNIX_EPOCH + Duration::from_millis(5);
        assert_eq!(
            decode_local(b"42", false, now).and_then(|s| s.value),
            Some(json!(42))
        );
        assert_eq!(
            decode_local(b"true", false, now).and_then(|s| s.value),
            Some(json!(true))
        );
        assert_eq!(
            decode_local(b"hello world", false, now).and_then(|s| s.value),
            Some(json!("hello world"))
        );
    }

    #[test]
    fn values_become_metrics_of_the_points_datatype() {
        assert_eq!(
            metric_value(DataType::Int16, &json!(-2)),
            Some(MetricValue::IntValue(0xfffe))
        );
        assert_eq!(metric_value(DataType::UInt16, &json!(70000)), None);
        assert_eq!(
            metric_value(DataType::Int64, &json!(-1)),
            Some(MetricValue::LongValue(u64::MAX))
        );
        assert_eq!(
            metric_value(DataType::Double, &json!(1.5)),
            Some(MetricValue::DoubleValue(1.5))
        );
        assert_eq!(
            metric_value(DataType::Boolean, &json!(true)),
            Some(MetricValue::BooleanValue(true))
        );
        assert_eq!(
            metric_value(DataType::String, &json!({"a":1})),
            Some(MetricValue::StringValue("{\"a\":1}".into()))
        );
        assert_eq!(metric_value(DataType::Double, &json!("x")), None);
    }

    #[test]
    fn command_metrics_become_set_payloads() {
        assert_eq!(
            command_text(DataType::Boolean, Some(&MetricValue::BooleanValue(true))),
            Ok("true".into())
        );
        assert_eq!(
            command_text(DataType::Int16, Some(&MetricValue::IntValue(0xffff_fffe))),
            Ok("-2".into())
        );
        assert_eq!(
            command_text(DataType::Int64, Some(&MetricValue::LongValue(u64::MAX))),
            Ok("-1".into())
        );
        assert_eq!(
            command_text(DataType::Double, Some(&MetricValue::DoubleValue(2.5))),
            Ok("2.5".into())
        );
        assert_eq!(
            command_text(DataType::Double, None),
            Err(CommandError::NoValue)
        );
        assert!(command_text(DataType::Double, Some(&MetricValue::DoubleValue(f64::NAN))).is_err());
        assert!(command_text(
            DataType::Boolean,
            Some(&MetricValue::StringValue("x".into()))
        )
        .is_err());
    }
}
