//! The types every part of the gateway speaks: messages on the internal bus, device
//! readings and their values, and write commands.
//!
//! A driver turns raw registers or frames into [`Reading`]s;
//! [`DeviceContext::publish_reading`](crate::drivers::DeviceContext::publish_reading) turns
//! a reading into a [`Message`] on the broker. A write arrives as a [`Message`] on
//! `<point topic>/set` and is parsed into a [`WriteRequest`]; several points of one device
//! in one command, on `<device topic>/set`, into a [`PointsWriteRequest`].

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

impl TryFrom<u8> for QoS {
    type Error = String;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        QoS::from_u8(value).ok_or_else(|| format!("invalid QoS {value}, expected 0, 1 or 2"))
    }
}

impl From<QoS> for u8 {
    fn from(q: QoS) -> u8 {
        q as u8
    }
}

/// Who put a message on the bus. Used for MQTT 5 no-local and to stop bridge loops: an
/// internal subscriber never receives what it published itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A network client, by client id.
    Client(Arc<str>),
    /// An in-process publisher (a driver, an uplink, the gateway itself), by name.
    Internal(Arc<str>),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Client(id) => write!(f, "client {id}"),
            Origin::Internal(name) => write!(f, "{name}"),
        }
    }
}

/// MQTT 5 properties that travel with a message and are forwarded unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// One application message on the internal bus.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<Arc<MessageProperties>>,
    pub origin: Origin,
    /// When the broker received it; message expiry counts from here.
    pub received: Instant,
}

impl Message {
    /// A message from an in-process publisher.
    pub fn internal(
        origin: &str,
        topic: impl Into<Arc<str>>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            properties: None,
            origin: Origin::Internal(Arc::from(origin)),
            received: Instant::now(),
        }
    }

    /// Seconds left before the message expires, `None` when it never does,
    /// `Some(0)` when it has expired.
    /// Whether the message carries an expiry interval (most do not: no clock read then).
    pub fn has_expiry(&self) -> bool {
        self.properties
            .as_ref()
            .is_some_and(|p| p.message_expiry_interval.is_some())
    }

    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let interval = self.properties.as_ref()?.message_expiry_interval?;
        let elapsed = now.saturating_duration_since(self.received).as_secs();
        Some(u32::try_from(u64::from(interval).saturating_sub(elapsed)).unwrap_or(0))
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.remaining_expiry(now) == Some(0)
    }
}

/// A typed value read from, or written to, a device point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(*i as f64),
            Value::Float(x) => Some(*x),
            Value::Text(_) => None,
        }
    }
}

/// Whether a reading can be trusted, and why not.
#[derive(Debug, Clone, PartialEq)]
pub enum Quality {
    Good,
    Bad(String),
}

/// One value of one point of one device at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: String,
    pub point: String,
    /// `None` when the read failed (quality is then `Bad`).
    pub value: Option<Value>,
    pub quality: Quality,
    pub timestamp: SystemTime,
}

/// A write to a point, parsed from a message on `<point topic>/set`.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRequest {
    pub device: String,
    pub point: String,
    pub value: Value,
    /// MQTT 5 request/response: where to send the result, and the data to echo.
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// A write to several points of one device in one command, parsed from a JSON object on
/// `<device topic>/set`: the points in the order the object names them.
#[derive(Debug, Clone, PartialEq)]
pub struct PointsWriteRequest {
    pub device: String,
    pub values: Vec<(String, Value)>,
    /// MQTT 5 request/response, as for [`WriteRequest`].
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// The outcome of a [`PointsWriteRequest`], published to `<device topic>/set/result`:
/// `ok` only when every point was written and read back; each point says what happened to
/// it, so a command that fails part-way names what was written and what was not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PointsWriteOutcome {
    pub status: OutcomeStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Per point, in the order of the command.
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    pub points: Vec<(String, PointOutcome)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeStatus {
    Ok,
    Error,
}

/// What happened to one point of a [`PointsWriteRequest`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum PointOutcome {
    /// Written, and read back with this value.
    Ok { value: Value },
    /// Refused or failed; `written` says whether the device took the value (a read-back
    /// that failed after a good write).
    Error { reason: String, written: bool },
}

fn as_map<S: serde::Serializer>(
    points: &[(String, PointOutcome)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(points.iter().map(|(name, outcome)| (name, outcome)))
}

impl PointsWriteOutcome {
    /// A command refused as a whole before any point was looked at.
    pub fn refused(reason: String) -> PointsWriteOutcome {
        PointsWriteOutcome {
            status: OutcomeStatus::Error,
            reason: Some(reason),
            points: Vec::new(),
        }
    }

    /// The outcome of the points: `ok` when every one is, else an error that counts them.
    pub fn of(points: Vec<(String, PointOutcome)>) -> PointsWriteOutcome {
        let failed = points
            .iter()
            .filter(|(_, o)| matches!(o, PointOutcome::Error { .. }))
            .count();
        let written = points
            .iter()
            .filter(|(_, o)| {
                matches!(
                    o,
                    PointOutcome::Ok { .. } | PointOutcome::Error { written: true, .. }
                )
            })
            .count();
        if failed == 0 {
            return PointsWriteOutcome {
                status: OutcomeStatus::Ok,
                reason: None,
                points,
            };
        }
        let reason = match written {
            0 => format!(
                "{failed} of {} point(s) failed; nothing written",
                points.len()
            ),
            _ => format!(
                "{failed} of {} point(s) failed; {written} written",
                points.len()
            ),
        };
        PointsWriteOutcome {
            status: OutcomeStatus::Error,
            reason: Some(reason),
            points,
        }
    }
}

/// The outcome of a write, published to `<point topic>/set/result`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum WriteOutcome {
    Ok { value: Value },
    Error { reason: String },
}
