//! Payload formats on arbitrary input: a template source compiled and rendered on an
//! arbitrary value (no panic, rendering bounded by the fuel budget), and InfluxDB lines
//! of arbitrary names and text (never a newline inside a line).
#![no_main]

use std::time::SystemTime;

use fieldmq::drivers::payload::influx::{fields_line, reading_line};
use fieldmq::drivers::payload::template::{PayloadTemplate, Variables};
use fieldmq::drivers::payload::Labels;
use fieldmq::model::Value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut at = usize::from(cut).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let (source, value_text) = text.split_at(at);

    let value = serde_json::from_str::<serde_json::Value>(value_text)
        .unwrap_or_else(|_| serde_json::Value::String(value_text.to_owned()));
    if let Ok(template) = PayloadTemplate::compile(source, None) {
        let _ = template.render(&Variables {
            value: &value,
            ts: "2026-01-01T00:00:00Z",
            ts_ms: 0,
            quality: "good",
            error: None,
            unit: Some(value_text),
            device: "d",
            point: "p",
            gateway: "g",
        });
    }

    let labels = Labels {
        gateway: source,
        device: value_text,
        point: source,
        unit: Some(value_text),
    };
    let reading = Value::Text(value_text.to_owned());
    for line in [
        reading_line(&labels, Some(&reading), None, SystemTime::UNIX_EPOCH),
        reading_line(&labels, None, Some(source), SystemTime::UNIX_EPOCH),
    ] {
        assert!(!line.contains(['\n', '\r']), "{line:?}");
    }
    if let serde_json::Value::Object(fields) = &value {
        let line = fields_line(&labels, fields, SystemTime::UNIX_EPOCH);
        assert!(!line.contains(['\n', '\r']), "{line:?}");
    }
});
