//! From a frame to what gets published: decoding (text or hex), the NMEA `*hh` checksum,
//! and the ordered parse rules whose named captures become typed JSON fields.

use serde_json::{Map, Value as Json};

use super::config::{Checksum, Encoding, Field, FieldType, Rule};

/// What one frame turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Rule `rule` matched; `fields` has one entry per named capture (null when the
    /// capture is empty or did not take part), or, for a rule without named captures,
    /// the whole frame text under `"frame"`.
    Matched {
        rule: usize,
        fields: Map<String, Json>,
    },
    /// No rule matched; the decoded frame text.
    Unmatched { text: String },
    /// The NMEA checksum is missing or wrong.
    BadChecksum { text: String },
    /// A rule matched but a capture is not a valid value of its type.
    Invalid { rule: usize, reason: String },
}

/// The frame as the rules see it.
pub fn decode(frame: &[u8], encoding: Encoding) -> String {
    match encoding {
        Encoding::Text => String::from_utf8_lossy(frame).into_owned(),
        Encoding::Hex => {
            use std::fmt::Write as _;
            let mut text = String::with_capacity(frame.len() * 2);
            for byte in frame {
                let _ = write!(text, "{byte:02x}");
            }
            text
        }
    }
}

/// Whether an NMEA 0183 sentence (`$...*hh` or `!...*hh`, trailing whitespace allowed)
/// carries a correct checksum: the XOR of every byte between the first character and `*`.
pub fn nmea_checksum_ok(sentence: &str) -> bool {
    let sentence = sentence.trim_end();
    let Some(body) = sentence
        .strip_prefix('$')
        .or_else(|| sentence.strip_prefix('!'))
    else {
        return false;
    };
    let Some((data, given)) = body.rsplit_once('*') else {
        return false;
    };
    if given.len() != 2 {
        return false;
    }
    let Ok(given) = u8::from_str_radix(given, 16) else {
        return false;
    };
    data.bytes().fold(0u8, |sum, b| sum ^ b) == given
}

/// Decodes a frame, checks its checksum and runs the rules, first match wins.
pub fn parse(frame: &[u8], encoding: Encoding, checksum: Checksum, rules: &[Rule]) -> Parsed {
    let text = decode(frame, encoding);
    if checksum == Checksum::Nmea && !nmea_checksum_ok(&text) {
        return Parsed::BadChecksum { text };
    }
    for (index, rule) in rules.iter().enumerate() {
        let Some(captures) = rule.pattern.captures(&text) else {
            continue;
        };
        if rule.fields.is_empty() {
            let mut fields = Map::new();
            fields.insert("frame".into(), Json::String(text.clone()));
            return Parsed::Matched {
                rule: index,
                fields,
            };
        }
        let mut fields = Map::new();
        for field in &rule.fields {
            let raw = captures.name(&field.name).map_or("", |m| m.as_str());
            match convert(raw, field) {
                Ok(value) => {
                    fields.insert(field.name.clone(), value);
                }
                Err(reason) => {
                    return Parsed::Invalid {
                        rule: index,
                        reason,
                    }
                }
            }
        }
        return Parsed::Matched {
            rule: index,
            fields,
        };
    }
    Parsed::Unmatched { text }
}

/// One capture as its field's type. Empty (or absent) captures are null: NMEA leaves a
/// field empty when it has no value (no fix yet).
pub fn convert(raw: &str, field: &Field) -> Result<Json, String> {
    let text = raw.trim();
    if text.is_empty() && field.kind != FieldType::String {
        return Ok(Json::Null);
    }
    let bad = |what: &str| format!("field {}: {text:?} is not {what}", field.name);
    match field.kind {
        FieldType::String => Ok(Json::String(raw.to_owned())),
        FieldType::Number => {
            let n: f64 = text.parse().map_err(|_| bad("a number"))?;
            if !n.is_finite() {
                return Err(bad("a finite number"));
            }
            Ok(number(n * field.scale))
        }
        FieldType::Integer => {
            let n: i64 = text
                .strip_prefix('+')
                .unwrap_or(text)
                .parse()
                .map_err(|_| bad("an integer"))?;
            if field.scale == 1.0 {
                Ok(Json::from(n))
            } else {
                Ok(number(n as f64 * field.scale))
            }
        }
        FieldType::Bool => match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "on" | "yes" | "y" | "t" => Ok(Json::Bool(true)),
            "false" | "0" | "off" | "no" | "n" | "f" => Ok(Json::Bool(false)),
            _ => Err(bad("a bool (true/false, 1/0, on/off, yes/no)")),
        },
    }
}

/// A JSON number, without the float noise a scale multiplication leaves (0.1 * 3 is
/// published as 0.3, not 0.30000000000000004).
fn number(x: f64) -> Json {
    let rounded = format!("{x:.12}").parse::<f64>().unwrap_or(x);
    serde_json::Number::from_f64(rounded).map_or(Json::Null, Json::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex_lite::Regex;
    use serde_json::json;

    fn rule(pattern: &str, topic: &str, fields: &[(&str, FieldType, f64)]) -> Rule {
        let pattern = Regex::new(pattern).expect("regex");
        Rule {
            topic: topic.into(),
            fields: pattern
                .capture_names()
                .flatten()
                .map(|name| {
                    let (kind, scale) = fields
                        .iter()
                        .find(|(n, _, _)| *n == name)
                        .map_or((FieldType::String, 1.0), |(_, k, s)| (*k, *s));
                    Field {
                        name: name.into(),
                        kind,
                        scale,
                    }
                })
                .collect(),
            pattern,
        }
    }

    #[test]
    fn nmea_checksums_are_checked() {
        assert!(nmea_checksum_ok(
            "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
        ));
        assert!(nmea_checksum_ok(
            "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r"
        ));
        assert!(!nmea_checksum_ok(
            "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48"
        ));
        assert!(!nmea_checksum_ok("$GPGGA,123519"));
        assert!(!nmea_checksum_ok("GPGGA,123519*47"));
        assert!(!nmea_checksum_ok("$GPGGA,123519*4"));
    }

    #[test]
    fn the_first_matching_rule_wins_and_captures_are_typed() {
        let rules = vec![
            rule(
                r"^T=(?P<t>[-0-9.]+) H=(?P<h>\d+) OK=(?P<ok>\w+)$",
                "climate",
                &[
                    ("t", FieldType::Number, 1.0),
                    ("h", FieldType::Integer, 1.0),
                    ("ok", FieldType::Bool, 1.0),
                ],
            ),
            rule(r"^T=", "other", &[]),
        ];
        let parsed = parse(
            b"T=21.5 H=40 OK=yes",
            Encoding::Text,
            Checksum::None,
            &rules,
        );
        let Parsed::Matched { rule, fields } = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(rule, 0);
        assert_eq!(
            Json::Object(fields),
            json!({"t": 21.5, "h": 40, "ok": true})
        );
        let parsed = parse(b"T=x", Encoding::Text, Checksum::None, &rules);
        assert_eq!(
            parsed,
            Parsed::Matched {
                rule: 1,
                fields: json!({"frame": "T=x"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            }
        );
        assert_eq!(
            parse(b"nothing", Encoding::Text, Checksum::None, &rules),
            Parsed::Unmatched {
                text: "nothing".into()
            }
        );
    }

    #[test]
    fn scale_applies_to_numbers_and_empty_captures_are_null() {
        let field = |kind, scale| Field {
            name: "x".into(),
            kind,
            scale,
        };
        assert_eq!(
            convert("123", &field(FieldType::Number, 0.1)),
            Ok(json!(12.3))
        );
        assert_eq!(convert("+7", &field(FieldType::Integer, 1.0)), Ok(json!(7)));
        assert_eq!(
            convert("7", &field(FieldType::Integer, 0.5)),
            Ok(json!(3.5))
        );
        assert_eq!(convert("", &field(FieldType::Number, 1.0)), Ok(Json::Null));
        assert_eq!(convert("", &field(FieldType::String, 1.0)), Ok(json!("")));
        assert!(convert("abc", &field(FieldType::Number, 1.0)).is_err());
        assert!(convert("1.5", &field(FieldType::Integer, 1.0)).is_err());
        assert!(convert("maybe", &field(FieldType::Bool, 1.0)).is_err());
    }

    #[test]
    fn hex_encoding_shows_every_byte() {
        assert_eq!(decode(&[0x01, 0xab, 0xff], Encoding::Hex), "01abff");
        assert_eq!(decode(b"a\xffb", Encoding::Text), "a\u{fffd}b");
    }
}
