//! Device drivers. Each configured device runs as one task that owns its connection to the
//! device; what it reads becomes a [`Reading`] (or, for a serial frame, a set of fields),
//! and [`DeviceContext::publish_sample`] turns it into an MQTT message on the embedded
//! broker, in the device's [`payload`] format. Writes arrive as messages on
//! `<point topic>/set` and are answered on `<point topic>/set/result`; a Modbus device also
//! takes several points in one JSON object on `<device topic>/set`, answered on
//! `<device topic>/set/result`.

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
use crate::metrics::{BusMetrics, DeviceMetrics};
use crate::model::{
    Message, MessageProperties, PointsWriteOutcome, PointsWriteRequest, QoS, Reading, Value,
    WriteOutcome, WriteRequest,
};
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
    /// The Modbus link this device is on (a serial line, or a TCP connection).
    bus_metrics: BusMetrics,
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
    /// `<device topic>/set`, for a driver that writes several points in one command
    /// ([`DeviceConfig::device_write_topic`]).
    device_write_topic: Option<Arc<str>>,
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

/// A `<device topic>/set` refused as a whole (not an object, a duplicate point, too large),
/// before any point is looked at.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedPointsWrite {
    pub reason: String,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// Largest `<device topic>/set` payload: a JSON object of several points' values.
pub const MAX_POINTS_WRITE_PAYLOAD: usize = 16 * 1024;

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
            bus_metrics: BusMetrics::detached(),
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
            device_write_topic: device.device_write_topic(gateway).map(Arc::from),
        }
    }

    /// Also show this device's readings and state on the status board.
    pub fn with_status(mut self, board: DeviceBoard) -> DeviceContext {
        self.board = Some(board);
        self
    }

    /// Record this device's polls, errors and latency into `metrics` (and, for a Modbus
    /// device, its link's requests and busy time into `bus`); without it they are recorded
    /// nowhere.
    pub fn with_metrics(mut self, metrics: DeviceMetrics, bus: Option<BusMetrics>) -> Self {
        self.metrics = metrics;
        if let Some(bus) = bus {
            self.bus_metrics = bus;
        }
        self
    }

    /// Where the driver records polls, errors, latency and point quality.
    pub fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    /// Where the device's Modbus link records its requests and busy time.
    pub fn bus_metrics(&self) -> &BusMetrics {
        &self.bus_metrics
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
        self.broker
            .subscribe(
                &self.origin,
                self.write_filters(points),
                InternalSubscribeOptions::default(),
            )
            .await
    }

    fn write_filters(&self, points: &[&str]) -> Vec<(String, QoS)> {
        let wildcard = self.point_topic("+");
        let whole_level = wildcard
            .split('/')
            .all(|level| level == "+" || !level.contains('+'));
        if whole_level {
            vec![(format!("{wildcard}/set"), QoS::AtLeastOnce)]
        } else {
            points
                .iter()
                .map(|p| (format!("{}/set", self.point_topic(p)), QoS::AtLeastOnce))
                .collect()
        }
    }

    /// Like [`DeviceContext::subscribe_writes`], and also `<device topic>/set` (see
    /// [`DeviceConfig::device_write_topic`]) when the device has one.
    pub async fn subscribe_writes_and_device_writes(
        &self,
        points: &[&str],
    ) -> Result<InternalSubscription, BusError> {
        let mut filters = self.write_filters(points);
        if let Some(topic) = &self.device_write_topic {
            filters.push((topic.to_string(), QoS::AtLeastOnce));
        }
        self.broker
            .subscribe(&self.origin, filters, InternalSubscribeOptions::default())
            .await
    }

    /// Sorts a message on `<device topic>/set`: `None` for any other topic, else the points
    /// and values of its JSON object, or why the command is refused as a whole.
    pub fn sort_points_write(
        &self,
        message: &Message,
    ) -> Option<Result<PointsWriteRequest, RefusedPointsWrite>> {
        if Some(&*message.topic) != self.device_write_topic.as_deref() {
            return None;
        }
        let properties = message.properties.as_deref();
        let response_topic = properties.and_then(|p| p.response_topic.clone());
        let correlation_data = properties.and_then(|p| p.correlation_data.clone());
        Some(match parse_points_write(&message.payload) {
            Ok(values) => Ok(PointsWriteRequest {
                device: self.device.clone(),
                values,
                response_topic,
                correlation_data,
            }),
            Err(reason) => Err(RefusedPointsWrite {
                reason,
                response_topic,
                correlation_data,
            }),
        })
    }

    /// Answers a device-level write refused as a whole, with a warning.
    pub async fn refuse_points_write(&self, refused: RefusedPointsWrite) {
        tracing::warn!(device = %self.device, reason = %refused.reason, "device-level write refused");
        let request = PointsWriteRequest {
            device: self.device.clone(),
            values: Vec::new(),
            response_topic: refused.response_topic,
            correlation_data: refused.correlation_data,
        };
        let outcome = PointsWriteOutcome::refused(refused.reason);
        if let Err(error) = self.publish_points_write_result(&request, &outcome).await {
            tracing::warn!(device = %self.device, %error, "cannot publish write result");
        }
    }

    /// Publish the outcome of a device-level write to `<device topic>/set/result`, and to
    /// the MQTT 5 response topic like [`DeviceContext::publish_write_result`].
    pub async fn publish_points_write_result(
        &self,
        request: &PointsWriteRequest,
        outcome: &PointsWriteOutcome,
    ) -> Result<(), BusError> {
        let Some(topic) = &self.device_write_topic else {
            return Ok(());
        };
        let payload = serde_json::to_string(outcome)
            .unwrap_or_else(|e| json!({"status": "error", "reason": e.to_string()}).to_string());
        self.publish_result(
            format!("{topic}/result"),
            payload,
            request.response_topic.as_ref(),
            request.correlation_data.as_ref(),
        )
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
        self.publish_result(
            result_topic,
            payload,
            request.response_topic.as_ref(),
            request.correlation_data.as_ref(),
        )
        .await
    }

    /// A write result on `result_topic`, and on the MQTT 5 response topic with the
    /// correlation data when the request gave one.
    async fn publish_result(
        &self,
        result_topic: String,
        payload: String,
        response_topic: Option<&String>,
        correlation_data: Option<&Bytes>,
    ) -> Result<(), BusError> {
        let mut result = Message::internal(
            &self.origin,
            result_topic,
            payload.clone(),
            QoS::AtLeastOnce,
            false,
        );
        result.properties = Some(self.json.clone());
        self.broker.publish(result).await?;
        if let Some(response_topic) = response_topic {
            let mut message = Message::internal(
                &self.origin,
                response_topic.clone(),
                payload,
                QoS::AtLeastOnce,
                false,
            );
            message.properties = Some(Arc::new(MessageProperties {
                correlation_data: correlation_data.cloned(),
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
    value_of_json(json)
}

/// A write value given as JSON: a scalar, or `{"value": scalar}`.
fn value_of_json(json: serde_json::Value) -> Result<Value, String> {
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

/// A device-level write payload: a JSON object of point names and values (each as a point's
/// `/set` takes it in JSON), at most [`MAX_POINTS_WRITE_PAYLOAD`] bytes, no point twice.
pub fn parse_points_write(payload: &[u8]) -> Result<Vec<(String, Value)>, String> {
    if payload.len() > MAX_POINTS_WRITE_PAYLOAD {
        return Err(format!(
            "write payload of {} bytes is larger than the limit of {MAX_POINTS_WRITE_PAYLOAD} bytes",
            payload.len()
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|_| "write payload is not UTF-8".to_owned())?;
    let members = match serde_json::from_str::<Members>(text) {
        Ok(Members(members)) => members,
        Err(error) => {
            return Err(match serde_json::from_str::<serde_json::Value>(text) {
                Ok(_) => "a device-level write takes a JSON object of point names and values, like {\"setpoint\": 21.5, \"pump\": true}".to_owned(),
                Err(_) => format!("write payload is not JSON: {error}"),
            })
        }
    };
    if members.is_empty() {
        return Err("empty write: the JSON object names no point".into());
    }
    let mut seen = std::collections::HashSet::new();
    let mut values = Vec::with_capacity(members.len());
    for (name, json) in members {
        if !seen.insert(name.clone()) {
            return Err(format!("point {name:?} is named twice"));
        }
        let value = value_of_json(json).map_err(|reason| format!("point {name:?}: {reason}"))?;
        values.push((name, value));
    }
    Ok(values)
}

/// The members of a JSON object in order, duplicates kept (a `serde_json` map keeps only the
/// last of them, and a repeated point must be refused, not silently take one value).
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visitor)
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

    #[test]
    fn a_device_write_is_an_object_of_distinct_points_and_anything_else_is_named() {
        assert_eq!(
            parse_points_write(br#"{"b": 21.5, "a": {"value": true}, "c": "on"}"#),
            Ok(vec![
                ("b".into(), Value::Float(21.5)),
                ("a".into(), Value::Bool(true)),
                ("c".into(), Value::Text("on".into())),
            ])
        );
        let refused = |payload: &[u8]| parse_points_write(payload).unwrap_err();
        assert_eq!(
            refused(br#"{"a": 1, "a": 2}"#),
            "point \"a\" is named twice"
        );
        assert_eq!(
            refused(b"{}"),
            "empty write: the JSON object names no point"
        );
        assert!(refused(b"[1, 2]").starts_with("a device-level write takes a JSON object"));
        assert!(refused(b"21.5").starts_with("a device-level write takes a JSON object"));
        assert!(refused(b"{\"a\": ").starts_with("write payload is not JSON"));
        assert_eq!(refused(&[b'{', 0xff, b'}']), "write payload is not UTF-8");
        assert_eq!(
            refused(br#"{"a": [1]}"#),
            "point \"a\": unsupported write value [1]"
        );
        let large = format!("{{\"a\": \"{}\"}}", "x".repeat(MAX_POINTS_WRITE_PAYLOAD));
        assert!(refused(large.as_bytes()).contains("larger than the limit"));
    }

    #[test]
    fn a_device_write_outcome_names_every_point_and_what_was_written() {
        use crate::model::{PointOutcome, PointsWriteOutcome};
        let outcome = PointsWriteOutcome::of(vec![
            (
                "a".into(),
                PointOutcome::Ok {
                    value: Value::Int(1),
                },
            ),
            (
                "b".into(),
                PointOutcome::Error {
                    reason: "device exception: illegal data value (exception 3)".into(),
                    written: false,
                },
            ),
        ]);
        assert_eq!(
            serde_json::to_value(&outcome).unwrap(),
            json!({
                "status": "error",
                "reason": "1 of 2 point(s) failed; 1 written",
                "points": {
                    "a": {"status": "ok", "value": 1},
                    "b": {"status": "error", "reason": "device exception: illegal data value (exception 3)", "written": false},
                },
            })
        );
        let ok = PointsWriteOutcome::of(vec![(
            "a".into(),
            PointOutcome::Ok {
                value: Value::Bool(true),
            },
        )]);
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!({"status": "ok", "points": {"a": {"status": "ok", "value": true}}})
        );
    }
}
