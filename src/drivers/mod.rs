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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::broker::bus::{BrokerHandle, BusError, InternalSubscribeOptions, InternalSubscription};
use crate::metrics::{DeviceMetrics, RtuBusMetrics};
use crate::model::{Message, MessageProperties, QoS, Reading, Value, WriteOutcome, WriteRequest};
use crate::status::{DeviceBoard, DeviceState};
use config::{DeviceConfig, DriverConfig, PayloadFormat, PointInfo};
use payload::{Labels, Sample, TEXT_PLAIN};

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
    /// The MQTT 5 properties of each point's readings (content type, payload format, the
    /// `unit` user property), built once; `readings` for points without a unit.
    point_properties: Arc<HashMap<String, Arc<MessageProperties>>>,
    readings: Arc<MessageProperties>,
    /// The units of points that have one, for the JSON payload.
    units: Arc<HashMap<String, String>>,
    /// The properties of the JSON the driver writes itself (status, write results).
    json: Arc<MessageProperties>,
    /// The properties of plain text the driver writes itself (an unmatched frame).
    plain: Arc<MessageProperties>,
    /// Whether a failing payload template has been logged at warn.
    template_warned: Arc<std::sync::atomic::AtomicBool>,
}

/// What a text payload a driver built itself is, for its MQTT 5 content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    Json,
    Plain,
}

/// Largest `/set` payload a driver reads; a larger one is refused without being parsed
/// (no point takes more than a line of text).
pub const MAX_WRITE_PAYLOAD: usize = 1024;

/// What a message on a device's `/set` topics asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum SortedWrite {
    /// A write to a writable point with a value that parses; the driver checks the value
    /// against the point's type.
    Request(WriteRequest),
    /// A write the device refuses before touching anything; answer it with
    /// [`DeviceContext::refuse_write`].
    Refused(RefusedWrite),
    /// A topic of another device that shares this device's topic space (a template
    /// without `{device}`): not ours to answer.
    NotMine,
}

/// A `/set` that gets an error result without reaching the device.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedWrite {
    pub point: String,
    pub reason: String,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// Whether a device has a point, and whether it may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointAccess {
    Writable,
    ReadOnly,
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
        let readings = MessageProperties {
            // Every format writes UTF-8 text (a plain frame field is a decoded string).
            payload_format_indicator: Some(1),
            content_type: Some(device.payload.content_type().to_owned()),
            ..MessageProperties::default()
        };
        let units: HashMap<String, String> = device.driver.point_units().into_iter().collect();
        let point_properties = units
            .iter()
            .map(|(point, unit)| {
                let mut properties = readings.clone();
                properties.user_properties = vec![("unit".to_owned(), unit.clone())];
                (point.clone(), Arc::new(properties))
            })
            .collect();
        DeviceContext {
            gateway: gateway.to_owned(),
            device: device.name.clone(),
            topic_template: device.topic.clone(),
            payload: device.payload.clone(),
            status_topic: device.status_topic(gateway_status_topic),
            origin: Arc::from(format!("driver:{}", device.name)),
            broker,
            board: None,
            metrics: DeviceMetrics::detached(),
            rtu_bus_metrics: RtuBusMetrics::detached(),
            point_properties: Arc::new(point_properties),
            readings: Arc::new(readings),
            units: Arc::new(units),
            json: Arc::new(json_properties()),
            plain: Arc::new(MessageProperties {
                payload_format_indicator: Some(1),
                content_type: Some(TEXT_PLAIN.to_owned()),
                ..MessageProperties::default()
            }),
            template_warned: Arc::default(),
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
        config::point_topic(&self.topic_template, &self.gateway, &self.device, point)
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
        let labels = Labels {
            gateway: &self.gateway,
            device: &self.device,
            point,
            unit: self.units.get(point).map(String::as_str),
        };
        let payload = match payload::encode(&self.payload, &labels, sample) {
            Ok(Some(payload)) => payload,
            Ok(None) => return Ok(()),
            Err(error) => {
                self.metrics.payload_error();
                // Once per device at warn: a template that fails on one value type fails
                // on every poll, and the journal must not fill with it.
                if !self
                    .template_warned
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(device = %self.device, point, %error, "the payload template fails on this reading; nothing is published (logged once per device)");
                } else {
                    tracing::debug!(device = %self.device, point, %error, "the payload template fails");
                }
                return Ok(());
            }
        };
        let mut message = Message::internal(
            &self.origin,
            self.point_topic(point),
            payload,
            QoS::AtLeastOnce,
            false,
        );
        let properties = self.point_properties.get(point).unwrap_or(&self.readings);
        message.properties = Some(properties.clone());
        self.broker.publish(message).await
    }

    /// Adds the units of points a driver finds at run time (a SunSpec device's models),
    /// for their payloads and MQTT 5 `unit` property.
    pub fn add_units(&mut self, units: impl IntoIterator<Item = (String, String)>) {
        let known = Arc::make_mut(&mut self.units);
        let properties = Arc::make_mut(&mut self.point_properties);
        for (point, unit) in units {
            let mut with_unit = (*self.readings).clone();
            with_unit.user_properties = vec![("unit".to_owned(), unit.clone())];
            properties.insert(point.clone(), Arc::new(with_unit));
            known.insert(point, unit);
        }
    }

    /// The unit of `point`, if its configuration gives one.
    pub fn unit(&self, point: &str) -> Option<&str> {
        self.units.get(point).map(String::as_str)
    }

    /// Publish text the driver built itself (an unmatched frame, a status with counters)
    /// under this device's name, marked UTF-8 with its content type.
    pub async fn publish_text(
        &self,
        topic: String,
        payload: String,
        retain: bool,
        kind: TextKind,
    ) -> Result<(), BusError> {
        let mut message = Message::internal(&self.origin, topic, payload, QoS::AtLeastOnce, retain);
        message.properties = Some(match kind {
            TextKind::Json => self.json.clone(),
            TextKind::Plain => self.plain.clone(),
        });
        self.broker.publish(message).await
    }

    /// Announce the device's points (retained, on the status topic's `/points`): a driver
    /// that finds its points at run time tells Home Assistant discovery about them.
    pub async fn publish_points(&self, points: &[PointInfo]) -> Result<(), BusError> {
        let mut message = Message::internal(
            &self.origin,
            format!("{}/points", self.status_topic),
            config::point_set_payload(points),
            QoS::AtLeastOnce,
            true,
        );
        message.properties = Some(self.json.clone());
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
        let mut message = Message::internal(
            &self.origin,
            self.status_topic.clone(),
            payload.to_string(),
            QoS::AtLeastOnce,
            true,
        );
        message.properties = Some(self.json.clone());
        self.broker.publish(message).await
    }

    /// Publish the device's status (retained) and wait until the broker has taken it: the
    /// last word of a driver that stops, which must be stored before the broker closes.
    pub async fn publish_stopped(&self) {
        let payload = json!({"status": "offline", "error": "gateway stopped", "ts": now_rfc3339()});
        self.publish_final_status(payload.to_string()).await;
    }

    /// Publish a retained status payload the driver built and wait until the broker has
    /// taken it (see [`DeviceContext::publish_stopped`]).
    pub async fn publish_final_status(&self, payload: String) {
        let mut message = Message::internal(
            &self.origin,
            self.status_topic.clone(),
            payload,
            QoS::AtLeastOnce,
            true,
        );
        message.properties = Some(self.json.clone());
        if let Err(error) = self.broker.publish_and_wait(message).await {
            tracing::warn!(device = %self.device, %error, "cannot publish the offline status");
        }
    }

    /// Subscribe to `<point topic>/set` for every point of the device, writable or not,
    /// so that every write gets an answer: one wildcard filter when `{point}` is a whole
    /// topic level (the router matches each publish against every filter, and a device may
    /// have hundreds of points; the wildcard also catches writes to points the device does
    /// not have), else one filter per point.
    pub async fn subscribe_writes(
        &self,
        points: &[&str],
    ) -> Result<InternalSubscription, BusError> {
        let wildcard = self.point_topic("+");
        let whole_level = wildcard
            .split('/')
            .all(|level| level == "+" || !level.contains('+'));
        let filters = if whole_level {
            vec![(format!("{wildcard}/set"), QoS::AtLeastOnce)]
        } else {
            points
                .iter()
                .map(|p| (format!("{}/set", self.point_topic(p)), QoS::AtLeastOnce))
                .collect()
        };
        self.broker
            .subscribe(&self.origin, filters, InternalSubscribeOptions::default())
            .await
    }

    /// The point a `/set` topic names, when the topic has this device's shape.
    fn point_of_set_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let base = topic.strip_suffix("/set")?;
        let template = self
            .topic_template
            .replace("{gateway}", &self.gateway)
            .replace("{device}", &self.device);
        let (prefix, suffix) = template.split_once("{point}")?;
        let point = base.strip_prefix(prefix)?.strip_suffix(suffix)?;
        (!point.is_empty() && !point.contains('/')).then_some(point)
    }

    /// Sorts a message on one of this device's `/set` topics: a request for a writable
    /// point with a value that parses, a refusal (unknown point, read-only point, payload
    /// too large, not UTF-8, empty, not a value), or another device's topic. `access`
    /// says whether the device has a point by that name and whether it is writable.
    pub fn sort_write(
        &self,
        message: &Message,
        access: impl Fn(&str) -> Option<PointAccess>,
    ) -> SortedWrite {
        let Some(point) = self.point_of_set_topic(&message.topic) else {
            return SortedWrite::NotMine;
        };
        let properties = message.properties.as_deref();
        let refuse = |reason: String| {
            SortedWrite::Refused(RefusedWrite {
                point: point.to_owned(),
                reason,
                response_topic: properties.and_then(|p| p.response_topic.clone()),
                correlation_data: properties.and_then(|p| p.correlation_data.clone()),
            })
        };
        match access(point) {
            // Without `{device}` in the template, other devices' points share the topic
            // space: only a topic naming one of our points is ours.
            None if !self.topic_template.contains("{device}") => SortedWrite::NotMine,
            None => refuse(format!(
                "device {} has no point named {point:?}",
                self.device
            )),
            Some(PointAccess::ReadOnly) => refuse(format!("point {point} is not writable")),
            Some(PointAccess::Writable) => match parse_write_value(&message.payload) {
                Err(reason) => refuse(reason),
                Ok(value) => SortedWrite::Request(WriteRequest {
                    device: self.device.clone(),
                    point: point.to_owned(),
                    value,
                    response_topic: properties.and_then(|p| p.response_topic.clone()),
                    correlation_data: properties.and_then(|p| p.correlation_data.clone()),
                }),
            },
        }
    }

    /// Answers a write that is refused before it reaches the device, with a warning that
    /// names the device, the point and the reason.
    pub async fn refuse_write(&self, refused: RefusedWrite) {
        tracing::warn!(device = %self.device, point = %refused.point, reason = %refused.reason, "write refused");
        let request = WriteRequest {
            device: self.device.clone(),
            point: refused.point,
            value: Value::Text(String::new()),
            response_topic: refused.response_topic,
            correlation_data: refused.correlation_data,
        };
        let outcome = WriteOutcome::Error {
            reason: refused.reason,
        };
        if let Err(error) = self.publish_write_result(&request, &outcome).await {
            tracing::warn!(device = %self.device, %error, "cannot publish write result");
        }
    }

    /// Answers a write request the driver refused after looking at its value (a type
    /// mismatch, out of range), with the same warning as [`DeviceContext::refuse_write`].
    pub async fn refuse_request(&self, request: &WriteRequest, reason: String) {
        self.refuse_write(RefusedWrite {
            point: request.point.clone(),
            reason,
            response_topic: request.response_topic.clone(),
            correlation_data: request.correlation_data.clone(),
        })
        .await;
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
        let mut result = Message::internal(
            &self.origin,
            result_topic,
            payload.clone(),
            QoS::AtLeastOnce,
            false,
        );
        result.properties = Some(self.json.clone());
        self.broker.publish(result).await?;
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
                ..json_properties()
            }));
            self.broker.publish(message).await?;
        }
        Ok(())
    }
}

/// The MQTT 5 properties of a JSON payload: content type and payload format UTF-8.
fn json_properties() -> MessageProperties {
    MessageProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".to_owned()),
        ..MessageProperties::default()
    }
}

/// A write payload: a JSON value, `{"value": ...}`, or plain text (`true`, `42`, `on`), at
/// most [`MAX_WRITE_PAYLOAD`] bytes.
pub fn parse_write_value(payload: &[u8]) -> Result<Value, String> {
    if payload.len() > MAX_WRITE_PAYLOAD {
        return Err(format!(
            "write payload of {} bytes is larger than the limit of {MAX_WRITE_PAYLOAD} bytes",
            payload.len()
        ));
    }
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
