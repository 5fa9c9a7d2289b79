//! The one stored form of MQTT 5 message properties ([`MessageProperties`]), in the outbox,
//! in the broker's retained messages and inside its queued runs.
//!
//! A small JSON object: only the properties a message has, under short keys (`pfi`,
//! `expiry`, `content_type`, `response_topic`, `correlation` as hex, `user` as
//! `[[name, value], …]`). Its length counts against an outbox's `max_bytes`, so a message
//! without properties costs nothing and one with a few costs little.
//!
//! [`decode`] also reads the form the broker's store wrote before this one: the same
//! object with every field under its full name (`payload_format_indicator`, …,
//! `user_properties`), absent ones as `null`, and correlation data as an array of byte
//! values. Rows in that form need no migration; they are written in this form when they
//! are written again.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::model::MessageProperties;

/// Stored properties that cannot be read back (a damaged row, a hand edit).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DecodeError(#[from] serde_json::Error);

/// The stored form of `properties`.
pub(crate) fn encode(properties: &MessageProperties) -> String {
    serde_json::to_string(&Stored(properties)).unwrap_or_else(|_| "{}".to_owned())
}

/// The properties of a stored form (this one or the older one, see the module doc).
pub(crate) fn decode(text: &[u8]) -> Result<MessageProperties, DecodeError> {
    let read: Read = serde_json::from_slice(text)?;
    Ok(MessageProperties {
        payload_format_indicator: read.payload_format_indicator,
        message_expiry_interval: read.message_expiry_interval,
        content_type: read.content_type,
        response_topic: read.response_topic,
        correlation_data: read.correlation_data,
        user_properties: read.user_properties,
    })
}

/// Writes the stored form without copying the properties.
struct Stored<'a>(&'a MessageProperties);

impl Serialize for Stored<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut map = serializer.serialize_map(None)?;
        if let Some(v) = p.payload_format_indicator {
            map.serialize_entry("pfi", &v)?;
        }
        if let Some(v) = p.message_expiry_interval {
            map.serialize_entry("expiry", &v)?;
        }
        if let Some(v) = &p.content_type {
            map.serialize_entry("content_type", v)?;
        }
        if let Some(v) = &p.response_topic {
            map.serialize_entry("response_topic", v)?;
        }
        if let Some(v) = &p.correlation_data {
            map.serialize_entry("correlation", &to_hex(v))?;
        }
        if !p.user_properties.is_empty() {
            map.serialize_entry("user", &p.user_properties)?;
        }
        map.end()
    }
}

/// Reads both stored forms: the short keys, with the older form's full names as aliases.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Read {
    #[serde(rename = "pfi", alias = "payload_format_indicator")]
    payload_format_indicator: Option<u8>,
    #[serde(rename = "expiry", alias = "message_expiry_interval")]
    message_expiry_interval: Option<u32>,
    content_type: Option<String>,
    response_topic: Option<String>,
    #[serde(
        rename = "correlation",
        alias = "correlation_data",
        deserialize_with = "correlation"
    )]
    correlation_data: Option<Bytes>,
    #[serde(rename = "user", alias = "user_properties")]
    user_properties: Vec<(String, String)>,
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    let nibble = |digit: u8| char::from(digit).to_digit(16);
    let digits = hex.as_bytes();
    if digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| u8::try_from(nibble(pair[0])? << 4 | nibble(pair[1])?).ok())
        .collect()
}

/// Correlation data: hex text (this form), an array of byte values (the older form), or
/// null.
fn correlation<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Bytes>, D::Error> {
    struct CorrelationVisitor;

    impl<'de> Visitor<'de> for CorrelationVisitor {
        type Value = Option<Bytes>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("hex text or an array of bytes")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E: de::Error>(self, hex: &str) -> Result<Self::Value, E> {
            from_hex(hex)
                .map(|bytes| Some(Bytes::from(bytes)))
                .ok_or_else(|| E::invalid_value(de::Unexpected::Str(hex), &self))
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
            Ok(Some(Bytes::copy_from_slice(bytes)))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(byte) = seq.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(Some(Bytes::from(bytes)))
        }
    }

    deserializer.deserialize_any(CorrelationVisitor)
}

/// The properties decoding for the fuzz targets; a decoded value must survive an encode
/// and decode unchanged.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode_properties(text: &str) -> bool {
    let Ok(properties) = decode(text.as_bytes()) else {
        return false;
    };
    let encoded = encode(&properties);
    assert_eq!(
        decode(encoded.as_bytes()).ok(),
        Some(properties),
        "properties change through a round trip"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> MessageProperties {
        MessageProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            content_type: Some("application/json".into()),
            response_topic: Some("replies/7".into()),
            correlation_data: Some(Bytes::from_static(&[0x00, 0xab, 0xff])),
            user_properties: vec![("site".into(), "a".into()), ("site".into(), "b".into())],
        }
    }

    #[test]
    fn properties_survive_an_encode_and_decode() {
        for properties in [full(), MessageProperties::default()] {
            let stored = encode(&properties);
            assert_eq!(decode(stored.as_bytes()).expect("decodes"), properties);
        }
    }

    #[test]
    fn the_stored_form_holds_only_the_properties_a_message_has() {
        assert_eq!(encode(&MessageProperties::default()), "{}");
        assert_eq!(
            encode(&full()),
            r#"{"pfi":1,"expiry":3600,"content_type":"application/json","response_topic":"replies/7","correlation":"00abff","user":[["site","a"],["site","b"]]}"#
        );
    }

    /// The form the broker's store wrote before: every field under its full name,
    /// correlation data as byte values (serde's form of `MessageProperties`).
    #[test]
    fn the_broker_stores_older_form_decodes_to_the_same_properties() {
        let older = serde_json::to_string(&full()).expect("older form");
        assert!(
            older.contains("\"correlation_data\":[0,171,255]"),
            "{older}"
        );
        assert_eq!(decode(older.as_bytes()).expect("decodes"), full());
        let sparse = r#"{"payload_format_indicator":null,"message_expiry_interval":60,
            "content_type":null,"response_topic":null,"correlation_data":null,
            "user_properties":[]}"#;
        assert_eq!(
            decode(sparse.as_bytes()).expect("decodes"),
            MessageProperties {
                message_expiry_interval: Some(60),
                ..MessageProperties::default()
            }
        );
    }

    #[test]
    fn damaged_properties_are_an_error() {
        for damaged in [
            "{not json",
            r#"{"correlation":"abc"}"#,
            r#"{"pfi":300}"#,
            "7",
        ] {
            assert!(decode(damaged.as_bytes()).is_err(), "{damaged}");
        }
    }
}
