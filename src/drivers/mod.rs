//! Device drivers. Each configured device runs as one task that owns its connection to the
//! device; what it reads becomes a [`Reading`] (or, for a serial frame, a set of fields),
//! and [`DeviceContext::publish_sample`] turns it into an MQTT message on the embedded
//! broker, in the device's [`payload`] format. Writes arrive as messages on
//! `<point topic>/set` and are answered on `<point topic>/set/result`.

pub mod config;
pub mod modbus;
pub mod payload;
pub mod serial;
pub mod simulated;

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::broker::bus::{BrokerHandle, BusError, InternalSubscribeOptions, InternalSubscription};
use crate::metrics::{DeviceMetrics, RtuBusMetrics};
use crate::model::{Message, MessageProperties, QoS, Reading, Value, WriteOutcome, WriteRequest};
use crate::status::{DeviceBoard, DeviceState};
use config::{DeviceConfig, DriverConfig, PayloadFormat};
use payload::Sample;

/// Everything a driver needs to talk to the bus for one device.
#[derive(Debug, Clone)]
pub struct DeviceContext {
    pub gateway: String,
    pub device: String,
    topic_template: String,
    payload: PayloadFormat,
    /// Retained device status topic.
    status_topic: String,
    origin: Arc<str>,
    broker: BrokerHandle,
    /// Where the status API sees this device's readings and state (none in tools and tests
    /// that run a driver alone).
    board: Option<DeviceBoard>,
    metrics: DeviceMetrics,
    /// The shared RTU line this device is on (Modbus RTU only).
    rtu_bus_metrics: RtuBusMetrics,
}

/// Device health, published retained on the device status topic.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceStatus {
    Online,
    Offline { error: String },
    Error { error: String },
}

impl DeviceContext {
    pub fn new(
        gateway: &str,
        gateway_status_topic: &str,
        device: &DeviceConfig,
        broker: BrokerHandle,
    ) -> DeviceContext {
        DeviceContext {
            gateway: gateway.to_owned(),
            device: device.name.clone(),
            topic_template: device.topic.clone(),
            payload: device.payload,
            status_topic: format!("{gateway_status_topic}/devices/{}", device.name),
            origin: Arc::from(format!("driver:{}", device.name)),
            broker,
            board: None,
            metrics: DeviceMetrics::detached(),
            rtu_bus_metrics: RtuBusMetrics::detached(),
        }
    }

    /// Also show this device's readings and state on the status board.
    pub fn with_status(mut self, board: DeviceBoard) -> DeviceContext {
        self.board = Some(board);
        self
    }

    /// Record this device's polls, errors and latency into `metrics` (and, on a shared
    /// RTU line, the line's into `rtu_bus`); without it they are recorded nowhere.
    pub fn with_metrics(mut self, metrics: DeviceMetrics, rtu_bus: Option<RtuBusMetrics>) -> Self {
        self.metrics = metrics;
        if let Some(rtu_bus) = rtu_bus {
            self.rtu_bus_metrics = rtu_bus;
        }
        self
    }

    /// Where the driver records polls, errors, latency and point quality.
    pub fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    /// Where a shared RTU line records its requests and busy time.
    pub fn rtu_bus_metrics(&self) -> &RtuBusMetrics {
        &self.rtu_bus_metrics
    }

    /// The topic of one point: the device's template with `{gateway}`, `{device}` and
    /// `{point}` filled in.
    pub fn point_topic(&self, point: &str) -> String {
        self.topic_template
            .replace("{gateway}", &self.gateway)
            .replace("{device}", &self.device)
            .replace("{point}", point)
    }

    pub fn status_topic(&self) -> &str {
        &self.status_topic
    }

    /// Publish one reading on its point topic, in the device's payload format.
    pub async fn publish_reading(&self, reading: &Reading) -> Result<(), BusError> {
        self.publish_sample(&reading.point, Sample::Reading(reading))
            .await
    }

    /// Publish what `point` reports on its topic, in the device's payload format (nothing
    /// when the format has nothing to say about it).
    pub async fn publish_sample(&self, point: &str, sample: Sample<'_>) -> Result<(), BusError> {
        if let Some(board) = &self.board {
            match &sample {
                Sample::Reading(reading) => board.record_reading(
                    point,
                    reading.value.as_ref(),
                    &reading.quality,
                    reading.timestamp,
                ),
                Sample::Fields { fields, timestamp } => {
                    board.record_fields(point, fields, *timestamp)
                }
            }
        }
        let Some(payload) = payload::encode(self.payload, sample) else {
            return Ok(());
        };
        let message = Message::internal(
            &self.origin,
            self.point_topic(point),
            payload,
            QoS::AtLeastOnce,
            false,
        );
        self.broker.publish(message).await
    }

    /// Publish a payload the driver built itself (a parsed frame, a status with counters)
    /// under this device's name.
    pub async fn publish_raw(
        &self,
        topic: String,
        payload: impl Into<Bytes>,
        retain: bool,
    ) -> Result<(), BusError> {
        let message = Message::internal(&self.origin, topic, payload, QoS::AtLeastOnce, retain);
        self.broker.publish(message).await
    }

    /// Publish the device's status (retained).
    pub async fn publish_status(&self, status: &DeviceStatus) -> Result<(), BusError> {
        if let Some(board) = &self.board {
            match status {
                DeviceStatus::Online => board.set_state(DeviceState::Online, None),
                DeviceStatus::Offline { error } => board.set_state(
                    DeviceState::Offline,
                    Some(error.as_str()).filter(|e| !e.is_empty()),
                ),
                DeviceStatus::Error { error } => board.set_state(DeviceState::Error, Some(error)),
            }
        }
        let payload = match status {
            DeviceStatus::Online => json!({"status": "online", "ts": now_rfc3339()}),
            DeviceStatus::Offline { error } => {
                json!({"status": "offline", "error": error, "ts": now_rfc3339()})
            }
            DeviceStatus::Error { error } => {
                json!({"status": "error", "error": error, "ts": now_rfc3339()})
            }
        };
        let message = Message::internal(
            &self.origin,
            self.status_topic.clone(),
            payload.to_string(),
            QoS::AtLeastOnce,
            true,
        );
        self.broker.publish(message).await
    }

    /// Subscribe to `<point topic>/set` for every writable point.
    pub async fn subscribe_writes(
        &self,
        points: &[&str],
    ) -> Result<InternalSubscription, BusError> {
        let filters = points
            .iter()
            .map(|p| (format!("{}/set", self.point_topic(p)), QoS::AtLeastOnce))
            .collect();
        self.broker
            .subscribe(&self.origin, filters, InternalSubscribeOptions::default())
            .await
    }

    /// Which of `points` a message on a `/set` topic addresses, and the value it carries.
    pub fn parse_write(&self, message: &Message, points: &[&str]) -> Result<WriteRequest, String> {
        let point = points
            .iter()
            .find(|p| *message.topic == format!("{}/set", self.point_topic(p)))
            .ok_or_else(|| format!("no writable point has the topic {}", message.topic))?;
        let value = parse_write_value(&message.payload)?;
        let properties = message.properties.as_deref();
        Ok(WriteRequest {
            device: self.device.clone(),
            point: (*point).to_owned(),
            value,
            response_topic: properties.and_then(|p| p.response_topic.clone()),
            correlation_data: properties.and_then(|p| p.correlation_data.clone()),
        })
    }

    /// Publish the outcome of a write to `<point topic>/set/result`, and to the MQTT 5
    /// response topic (with the correlation data) when the request gave one.
    pub async fn publish_write_result(
        &self,
        request: &WriteRequest,
        outcome: &WriteOutcome,
    ) -> Result<(), BusError> {
        let payload = serde_json::to_string(outcome)
            .unwrap_or_else(|e| json!({"status": "error", "reason": e.to_string()}).to_string());
        let result_topic = format!("{}/set/result", self.point_topic(&request.point));
        self.broker
            .publish(Message::internal(
                &self.origin,
                result_topic,
                payload.clone(),
                QoS::AtLeastOnce,
                false,
            ))
            .await?;
        if let Some(response_topic) = &request.response_topic {
            let mut message = Message::internal(
                &self.origin,
                response_topic.clone(),
                payload,
                QoS::AtLeastOnce,
                false,
            );
            message.properties = Some(Arc::new(MessageProperties {
                correlation_data: request.correlation_data.clone(),
                ..MessageProperties::default()
            }));
            self.broker.publish(message).await?;
        }
        Ok(())
    }
}

/// A write payload: a JSON value, `{"value": ...}`, or plain text (`true`, `42`, `on`).
pub fn parse_write_value(payload: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| "write payload is not UTF-8".to_owned())?
        .trim();
    if text.is_empty() {
        return Err("empty write payload".into());
    }
    let json: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(_) => return Ok(Value::Text(text.to_owned())),
    };
    let json = match json {
        serde_json::Value::Object(mut map) => map
            .remove("value")
            .ok_or_else(|| "JSON write payload needs a \"value\" field".to_owned())?,
        other => other,
    };
    match json {
        serde_json::Value::Bool(b) => Ok(Value::Bool(b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(Value::Int(i)),
            None => n
                .as_f64()
                .map(Value::Float)
                .ok_or_else(|| format!("number {n} out of range")),
        },
        serde_json::Value::String(s) => Ok(Value::Text(s)),
        other => Err(format!("unsupported write value {other}")),
    }
}

pub fn rfc3339(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

impl DriverConfig {
    /// Whether devices of this driver run in a task shared with other devices (Modbus RTU
    /// devices on one serial port share a bus), started by [`modbus::device_tasks`] for all
    /// of them at once instead of by [`run_device`] for each.
    pub fn shares_bus(&self) -> bool {
        matches!(self, DriverConfig::Modbus(_))
    }
}

/// Run one device until shutdown.
pub async fn run_device(device: DeviceConfig, context: DeviceContext, shutdown: CancellationToken) {
    match &device.driver {
        DriverConfig::Simulated(config) => {
            simulated::run(config.clone(), device.poll, context, shutdown).await
        }
        DriverConfig::Modbus(config) => {
            modbus::run_device(config.clone(), &device, context, shutdown).await
        }
        DriverConfig::Serial(config) => {
            serial::run_device(config.clone(), device.poll, context, shutdown).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_payloads_in_every_accepted_form_parse() {
        assert_eq!(parse_write_value(b"21.5"), Ok(Value::Float(21.5)));
        assert_eq!(parse_write_value(b"7"), Ok(Value::Int(7)));
        assert_eq!(parse_write_value(b"true"), Ok(Value::Bool(true)));
        assert_eq!(parse_write_value(br#"{"value": 3}"#), Ok(Value::Int(3)));
        assert_eq!(parse_write_value(b"on"), Ok(Value::Text("on".into())));
        assert!(parse_write_value(b"").is_err());
        assert!(parse_write_value(br#"{"v": 3}"#).is_err());
        assert!(parse_write_value(&[0xff, 0xfe]).is_err());
    }
}
