//! The `influx` payload format: one line of InfluxDB line protocol per sample, for
//! Telegraf's MQTT consumer (`data_format = "influx"`) or InfluxDB directly.
//!
//! `<device>,gateway=<gateway>,point=<point>[,unit=<unit>] value=<v>,quality="good" <ns>`
//!
//! Integers get the `i` suffix, booleans are `true`/`false`, text is a quoted string. A bad
//! reading has no `value` field: `quality="bad",error="…"`. A serial frame's fields become
//! fields of the line. Line protocol has no NaN or infinity: such a value is reported as
//! bad. Newlines cannot appear in line protocol and become spaces.

use std::fmt::Write;
use std::time::SystemTime;

use serde_json::Value as Json;

use super::Labels;
use crate::model::Value;

/// The line of one reading: `value` with its quality, or the reason it is bad.
pub fn reading_line(
    labels: &Labels<'_>,
    value: Option<&Value>,
    bad: Option<&str>,
    at: SystemTime,
) -> String {
    let mut fields = String::new();
    match (value, bad) {
        (Some(value), None) => match field_value(value) {
            Some(text) => {
                fields.push_str("value=");
                fields.push_str(&text);
                fields.push_str(",quality=\"good\"");
            }
            None => bad_fields(&mut fields, "not a finite number"),
        },
        (_, Some(reason)) => bad_fields(&mut fields, reason),
        (None, None) => bad_fields(&mut fields, "no value"),
    }
    line(labels, &fields, at)
}

/// The line of a serial frame: each field (a number, boolean or string) one field of the
/// line; fields that are objects or arrays are written as JSON strings.
pub fn fields_line(
    labels: &Labels<'_>,
    fields: &serde_json::Map<String, Json>,
    at: SystemTime,
) -> String {
    let mut out = String::new();
    for (key, value) in fields {
        let text = match value {
            Json::Bool(b) => b.to_string(),
            Json::Number(n) if n.is_i64() => format!("{n}i"),
            Json::Number(n) => match n.as_f64().filter(|x| x.is_finite()) {
                Some(x) => float(x),
                None => continue,
            },
            Json::String(s) => quoted(s),
            Json::Null => continue,
            other => quoted(&other.to_string()),
        };
        if !out.is_empty() {
            out.push(',');
        }
        escape_into(&mut out, key, &[',', '=', ' ']);
        out.push('=');
        out.push_str(&text);
    }
    if out.is_empty() {
        bad_fields(&mut out, "no fields");
    } else {
        out.push_str(",quality=\"good\"");
    }
    line(labels, &out, at)
}

fn bad_fields(out: &mut String, reason: &str) {
    out.push_str("quality=\"bad\",error=");
    out.push_str(&quoted(reason));
}

fn line(labels: &Labels<'_>, fields: &str, at: SystemTime) -> String {
    let mut out = String::with_capacity(64 + fields.len());
    escape_into(&mut out, labels.device, &[',', ' ']);
    out.push_str(",gateway=");
    escape_into(&mut out, labels.gateway, &[',', '=', ' ']);
    out.push_str(",point=");
    escape_into(&mut out, labels.point, &[',', '=', ' ']);
    if let Some(unit) = labels.unit.filter(|u| !u.is_empty()) {
        out.push_str(",unit=");
        escape_into(&mut out, unit, &[',', '=', ' ']);
    }
    out.push(' ');
    out.push_str(fields);
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .min(i64::MAX as u128);
    let _ = write!(out, " {nanos}");
    out
}

fn field_value(value: &Value) -> Option<String> {
    match value {
        Value::Bool(b) => Some(b.to_string()),
        Value::Int(i) => Some(format!("{i}i")),
        Value::Float(x) if x.is_finite() => Some(float(*x)),
        Value::Float(_) => None,
        Value::Text(text) => Some(quoted(text)),
    }
}

/// A float that reads back as a float (`21` would be one, but `21.0` says so plainly).
fn float(x: f64) -> String {
    let text = x.to_string();
    if text.contains(['.', 'e', 'E']) {
        text
    } else {
        format!("{text}.0")
    }
}

/// A string field value: quotes and backslashes escaped, newlines as spaces.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A measurement, tag key or tag value: `special` characters and backslashes escaped,
/// newlines as spaces, an empty text as `_` (line protocol has no empty names).
fn escape_into(out: &mut String, text: &str, special: &[char]) {
    if text.is_empty() {
        out.push('_');
        return;
    }
    for c in text.chars() {
        match c {
            '\n' | '\r' => out.push(' '),
            '\\' => out.push_str("\\\\"),
            c if special.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
    }

    fn labels<'a>(device: &'a str, point: &'a str, unit: Option<&'a str>) -> Labels<'a> {
        Labels {
            gateway: "gw1",
            device,
            point,
            unit,
        }
    }

    #[test]
    fn a_float_an_int_a_bool_and_text() {
        let l = labels("boiler", "temp", Some("°C"));
        assert_eq!(
            reading_line(&l, Some(&Value::Float(21.5)), None, at()),
            "boiler,gateway=gw1,point=temp,unit=°C value=21.5,quality=\"good\" 1700000000123000000"
        );
        assert_eq!(
            reading_line(
                &labels("m", "p", None),
                Some(&Value::Float(3.0)),
                None,
                at()
            ),
            "m,gateway=gw1,point=p value=3.0,quality=\"good\" 1700000000123000000"
        );
        assert!(reading_line(&l, Some(&Value::Int(-7)), None, at()).contains(" value=-7i,"));
        assert!(reading_line(&l, Some(&Value::Bool(true)), None, at()).contains(" value=true,"));
        assert!(
            reading_line(&l, Some(&Value::Text("a \"b\" \\ c\nd".into())), None, at())
                .contains(r#" value="a \"b\" \\ c d","#)
        );
    }

    #[test]
    fn bad_readings_and_non_finite_values_have_no_value_field() {
        let l = labels("m", "p", None);
        assert_eq!(
            reading_line(&l, None, Some("timeout"), at()),
            "m,gateway=gw1,point=p quality=\"bad\",error=\"timeout\" 1700000000123000000"
        );
        assert!(reading_line(&l, Some(&Value::Float(f64::NAN)), None, at())
            .contains("error=\"not a finite number\""));
    }

    #[test]
    fn names_with_commas_spaces_and_equals_are_escaped() {
        let l = labels("hall a,b", "p=1 x", Some("k W"));
        assert_eq!(
            reading_line(&l, Some(&Value::Int(1)), None, at()),
            r#"hall\ a\,b,gateway=gw1,point=p\=1\ x,unit=k\ W value=1i,quality="good" 1700000000123000000"#
        );
    }

    #[test]
    fn frame_fields_become_line_fields() {
        let mut fields = serde_json::Map::new();
        fields.insert("lat".into(), serde_json::json!(47.5));
        fields.insert("fix".into(), serde_json::json!(3));
        fields.insert("id".into(), serde_json::json!("A 1"));
        assert_eq!(
            fields_line(&labels("gps", "pos", None), &fields, at()),
            r#"gps,gateway=gw1,point=pos lat=47.5,fix=3i,id="A 1",quality="good" 1700000000123000000"#
        );
    }
}
