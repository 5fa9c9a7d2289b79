//! The Sparkplug B payload (`org.eclipse.tahu.protobuf.Payload`, specification 3.0,
//! `sparkplug_b.proto`, proto2) written by hand with prost's derive macros: the parts an
//! edge node sends and reads. Field numbers and types follow the specification's schema;
//! the parts the gateway never sends or reads (templates, data sets, metadata,
//! extensions) are left out, and prost skips their fields when decoding a payload that has
//! them.

/// A Sparkplug payload: a timestamp, metrics and the session sequence number.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the Unix epoch (UTC) when the message was made.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0..=255, one more per message of the session (NDEATH has none).
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric: its name (births) or alias (data), timestamp, datatype and value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`] number.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// A metric's value (the scalar members of the schema's `oneof value`).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    /// Int8, Int16, Int32 (two's complement in the type's width), UInt8, UInt16, UInt32.
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    /// Int64 (two's complement), UInt64, DateTime.
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

/// Properties of a metric (engineering units, quality): keys and values side by side.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

/// One property's value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    /// A [`DataType`] number.
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyValueKind", tags = "3, 4, 5, 6, 7, 8")]
    pub value: Option<PropertyValueKind>,
}

/// The scalar members of a property value's `oneof value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyValueKind {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
}

/// The specification's data types (the numbers the `datatype` fields carry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DataType {
    Int8 = 1,
    Int16 = 2,
    Int32 = 3,
    Int64 = 4,
    UInt8 = 5,
    UInt16 = 6,
    UInt32 = 7,
    UInt64 = 8,
    Float = 9,
    Double = 10,
    Boolean = 11,
    String = 12,
    DateTime = 13,
    Text = 14,
}

impl DataType {
    /// The number on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The type of a number on the wire; `None` for types the gateway does not use.
    pub fn from_code(code: u32) -> Option<DataType> {
        Some(match code {
            1 => DataType::Int8,
            2 => DataType::Int16,
            3 => DataType::Int32,
            4 => DataType::Int64,
            5 => DataType::UInt8,
            6 => DataType::UInt16,
            7 => DataType::UInt32,
            8 => DataType::UInt64,
            9 => DataType::Float,
            10 => DataType::Double,
            11 => DataType::Boolean,
            12 => DataType::String,
            13 => DataType::DateTime,
            14 => DataType::Text,
            _ => return None,
        })
    }

    /// The name the specification gives the type.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Int8 => "Int8",
            DataType::Int16 => "Int16",
            DataType::Int32 => "Int32",
            DataType::Int64 => "Int64",
            DataType::UInt8 => "UInt8",
            DataType::UInt16 => "UInt16",
            DataType::UInt32 => "UInt32",
            DataType::UInt64 => "UInt64",
            DataType::Float => "Float",
            DataType::Double => "Double",
            DataType::Boolean => "Boolean",
            DataType::String => "String",
            DataType::DateTime => "DateTime",
            DataType::Text => "Text",
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn a_metric_encodes_with_the_specification_field_numbers() {
        let metric = Metric {
            name: Some("t".into()),
            alias: Some(3),
            datatype: Some(DataType::Double.code()),
            value: Some(MetricValue::DoubleValue(1.5)),
            ..Metric::default()
        };
        let bytes = metric.encode_to_vec();
        // name (1, length-delimited), alias (2, varint), datatype (4, varint),
        // double_value (13, fixed64).
        assert_eq!(&bytes[..3], &[0x0a, 0x01, b't']);
        assert_eq!(&bytes[3..5], &[0x10, 0x03]);
        assert_eq!(&bytes[5..7], &[0x20, 10]);
        assert_eq!(bytes[7], 13 << 3 | 1);
        assert_eq!(Metric::decode(bytes.as_slice()).ok(), Some(metric));
    }

    #[test]
    fn a_payload_round_trips() {
        let payload = Payload {
            timestamp: Some(1_700_000_000_000),
            seq: Some(255),
            metrics: vec![Metric {
                alias: Some(1),
                is_historical: Some(true),
                value: Some(MetricValue::StringValue("x".into())),
                properties: Some(PropertySet {
                    keys: vec!["engUnit".into()],
                    values: vec![PropertyValue {
                        r#type: Some(DataType::String.code()),
                        is_null: None,
                        value: Some(PropertyValueKind::StringValue("°C".into())),
                    }],
                }),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        let decoded = Payload::decode(payload.encode_to_vec().as_slice()).ok();
        assert_eq!(decoded, Some(payload));
    }
}
