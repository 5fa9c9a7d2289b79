//! Serial parsing: a frame from the input through the text and hex decodings, the NMEA
//! checksum, and parse rules of every field type (GPS sentences, key=value lines, raw).
#![no_main]

use std::sync::OnceLock;

use fieldmq::drivers::serial::config::{Checksum, Encoding, Field, FieldType, Rule};
use fieldmq::drivers::serial::parse::{convert, decode, nmea_checksum_ok, parse};
use libfuzzer_sys::fuzz_target;
use regex_lite::Regex;

fn field(name: &str, kind: FieldType, scale: f64) -> Field {
    Field {
        name: name.into(),
        kind,
        scale,
    }
}

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        vec![
            Rule {
                pattern: Regex::new(
                    r"^\$G[PN]GGA,(?P<time>[^,]*),(?P<lat>[^,]*),[NS]?,(?P<lon>[^,]*),[EW]?,(?P<fix>[^,]*),(?P<sats>[^,]*),(?P<hdop>[^,]*)",
                )
                .expect("regex"),
                topic: "gps".into(),
                fields: vec![
                    field("time", FieldType::String, 1.0),
                    field("lat", FieldType::Number, 1.0),
                    field("lon", FieldType::Number, 0.01),
                    field("fix", FieldType::Bool, 1.0),
                    field("sats", FieldType::Integer, 1.0),
                    field("hdop", FieldType::Number, 1e300),
                ],
            },
            Rule {
                pattern: Regex::new(r"T=(?P<t>\S*) H=(?P<h>\S*) ON=(?P<on>\S*) N=(?P<n>\S*)")
                    .expect("regex"),
                topic: "env".into(),
                fields: vec![
                    field("t", FieldType::Number, 0.1),
                    field("h", FieldType::Integer, 10.0),
                    field("on", FieldType::Bool, 1.0),
                    field("n", FieldType::Integer, 0.5),
                ],
            },
            Rule {
                pattern: Regex::new(r"^[0-9a-f]{4}").expect("regex"),
                topic: "raw".into(),
                fields: Vec::new(),
            },
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, frame)) = data.split_first() else {
        return;
    };
    let encoding = if mode & 1 == 0 {
        Encoding::Text
    } else {
        Encoding::Hex
    };
    let checksum = if mode & 2 == 0 {
        Checksum::None
    } else {
        Checksum::Nmea
    };
    let text = decode(frame, encoding);
    if encoding == Encoding::Hex {
        assert_eq!(text.len(), frame.len() * 2);
    }
    let _ = nmea_checksum_ok(&text);
    let _ = parse(frame, encoding, checksum, rules());
    // Every field type on the whole frame as one capture.
    let raw = String::from_utf8_lossy(frame);
    for kind in [
        FieldType::Number,
        FieldType::Integer,
        FieldType::Bool,
        FieldType::String,
    ] {
        for scale in [1.0, 0.1, -3.0, 1e-300, f64::MAX] {
            let _ = convert(&raw, &field("f", kind, scale));
        }
    }
});
