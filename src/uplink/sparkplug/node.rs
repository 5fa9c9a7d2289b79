//! The edge node's state: its shape (devices, points, aliases, topics), the latest value
//! of every point, and the session the sender keeps with the cloud (births, `seq`,
//! which devices the host knows alive, whether the primary host is online).
//!
//! The sender owns the [`Session`] and turns each outbox row into a Sparkplug message as it
//! sends it, so `seq` follows the order on the wire and a row stored while the host was
//! away goes out marked `is_historical`. The ingest task records every local reading into
//! [`Latest`] as it stores it, so births carry the current values even while older rows
//! wait in the outbox. Commands from the cloud are decoded by [`decode_inbound`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use prost::Message as _;

use super::config::SparkplugConfig;
use super::convert::{self, LocalSample};
use super::proto::{DataType, Metric, MetricValue, Payload};
use super::topic::{self, CommandTopic, MessageType, NodeTopics};

/// The node control metric a host sets to ask for all births again.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";
/// The alias of [`REBIRTH_METRIC`]; device points take the aliases after it.
const REBIRTH_ALIAS: u64 = 1;
/// The first alias of device points.
const FIRST_POINT_ALIAS: u64 = 2;

/// The node's devices and points, indexed for the lookups of every message.
#[derive(Debug)]
pub struct Shape {
    pub config: SparkplugConfig,
    pub topics: NodeTopics,
    /// Local point topic → (device, point).
    by_topic: HashMap<String, (usize, usize)>,
    /// Local device status topic → device.
    by_status: HashMap<String, usize>,
    /// Device name → device.
    by_device: HashMap<String, usize>,
    /// Alias → (device, point).
    by_alias: HashMap<u64, (usize, usize)>,
    /// Alias of each point, by device and point.
    aliases: Vec<Vec<u64>>,
}

impl Shape {
    pub fn new(config: SparkplugConfig) -> Shape {
        let topics = NodeTopics::new(&config.group_id, &config.edge_node_id);
        let mut by_topic = HashMap::new();
        let mut by_status = HashMap::new();
        let mut by_device = HashMap::new();
        let mut by_alias = HashMap::new();
        let mut aliases = Vec::new();
        let mut next = FIRST_POINT_ALIAS;
        for (d, device) in config.devices.iter().enumerate() {
            by_status.insert(device.status_topic.clone(), d);
            by_device.insert(device.name.clone(), d);
            let mut device_aliases = Vec::new();
            for (p, point) in device.points.iter().enumerate() {
                by_topic.insert(point.topic.clone(), (d, p));
                by_alias.insert(next, (d, p));
                device_aliases.push(next);
                next += 1;
            }
            aliases.push(device_aliases);
        }
        Shape {
            config,
            topics,
            by_topic,
            by_status,
            by_device,
            by_alias,
            aliases,
        }
    }

    /// The local topic filters the node takes from the bus: each device's points (one
    /// filter for all of them where the device has one, else each point's topic) and each
    /// device's status, without repeats. A message that matches a filter and is no point's
    /// reading is skipped when its row is sent.
    pub fn local_topics(&self) -> Vec<String> {
        let mut filters: Vec<String> = Vec::new();
        let mut add = |filter: &str| {
            if !filters.iter().any(|f| f == filter) {
                filters.push(filter.to_owned());
            }
        };
        for device in &self.config.devices {
            match &device.points_filter {
                Some(filter) => add(filter),
                None => device.points.iter().for_each(|p| add(&p.topic)),
            }
        }
        for device in &self.config.devices {
            add(&device.status_topic);
        }
        filters
    }

    /// The cloud filters the node subscribes to: its commands and the primary host's
    /// state.
    pub fn cloud_filters(&self) -> Vec<String> {
        let mut filters: Vec<String> = self.topics.command_filters().into();
        if let Some(host) = &self.config.primary_host {
            filters.push(topic::state_topic(host));
        }
        filters
    }

    /// The NDEATH topic (the will's).
    pub fn ndeath_topic(&self) -> String {
        self.topics.node(MessageType::NDeath)
    }
}

/// What the node knows of one device from the bus.
#[derive(Debug, Clone)]
struct DeviceState {
    online: bool,
    values: Vec<Option<LocalSample>>,
}

/// The latest sample of every point and whether each device is online, as the ingest task
/// saw them on the bus.
#[derive(Debug)]
pub struct Latest {
    shape: Arc<Shape>,
    devices: Mutex<Vec<DeviceState>>,
}

/// What a local message is to the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Local {
    Reading {
        device: usize,
        point: usize,
        sample: LocalSample,
    },
    Status {
        device: usize,
        online: bool,
    },
}

impl Latest {
    pub fn new(shape: Arc<Shape>) -> Latest {
        let devices = shape
            .config
            .devices
            .iter()
            .map(|d| DeviceState {
                // Until its status says otherwise a device is taken to be online (its first
                // status may have been published before the uplink subscribed).
                online: true,
                values: vec![None; d.points.len()],
            })
            .collect();
        Latest {
            shape,
            devices: Mutex::new(devices),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<DeviceState>> {
        self.devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record a local message (a reading or a device status).
    pub fn record(&self, topic: &str, payload: &[u8], now: SystemTime) {
        let Some(local) = classify(&self.shape, topic, payload, now) else {
            return;
        };
        let mut devices = self.lock();
        match local {
            Local::Reading {
                device,
                point,
                sample,
            } => {
                if let Some(slot) = devices
                    .get_mut(device)
                    .and_then(|d| d.values.get_mut(point))
                {
                    *slot = Some(sample);
                }
            }
            Local::Status { device, online } => {
                if let Some(state) = devices.get_mut(device) {
                    state.online = online;
                }
            }
        }
    }

    fn snapshot(&self) -> Vec<DeviceState> {
        self.lock().clone()
    }
}

/// What a local topic and payload are to the node; `None` for anything else (a status that
/// is neither online nor offline, a payload that does not decode).
pub fn classify(shape: &Shape, topic: &str, payload: &[u8], now: SystemTime) -> Option<Local> {
    if let Some(&(device, point)) = shape.by_topic.get(topic) {
        let json = shape.config.devices.get(device)?.json;
        let sample = convert::decode_local(payload, json, now)?;
        return Some(Local::Reading {
            device,
            point,
            sample,
        });
    }
    let device = *shape.by_status.get(topic)?;
    let status: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let online = match status.get("status").and_then(serde_json::Value::as_str)? {
        "online" => true,
        "offline" => false,
        _ => return None,
    };
    Some(Local::Status { device, online })
}

/// The node's session with the cloud, owned by the sender.
#[derive(Debug)]
pub struct Session {
    shape: Arc<Shape>,
    latest: Arc<Latest>,
    /// The bdSeq of the current connection (set when its CONNECT is built).
    bdseq: Arc<AtomicU8>,
    /// The next message's `seq`.
    seq: u8,
    /// The primary host is online (always, without a primary host).
    host_online: bool,
    /// Births are owed: after a connect, a rebirth request, the host's return.
    births_pending: bool,
    /// When the births of this session were made: rows stored before are historical.
    born_at: Option<SystemTime>,
    /// Devices the cloud has a DBIRTH (and no DDEATH since) for.
    alive: Vec<bool>,
    /// Births waiting to be submitted, in order.
    control: VecDeque<(String, Bytes)>,
}

/// What the sender does with one outbox row.
#[derive(Debug, PartialEq)]
pub enum RowMessage {
    /// Publish this (QoS 0).
    Send { topic: String, payload: Bytes },
    /// Nothing to send (a status the cloud already knows, an unknown topic): the row is
    /// done.
    Skip,
}

impl Session {
    pub fn new(shape: Arc<Shape>, latest: Arc<Latest>, bdseq: Arc<AtomicU8>) -> Session {
        let devices = shape.config.devices.len();
        Session {
            host_online: shape.config.primary_host.is_none(),
            shape,
            latest,
            bdseq,
            seq: 0,
            births_pending: false,
            born_at: None,
            alive: vec![false; devices],
            control: VecDeque::new(),
        }
    }

    pub fn shape(&self) -> &Arc<Shape> {
        &self.shape
    }

    /// A new connection: births are owed, and with a primary host they wait for its
    /// `online` state.
    pub fn connected(&mut self) {
        self.host_online = self.shape.config.primary_host.is_none();
        self.births_pending = true;
        self.born_at = None;
        self.control.clear();
    }

    /// The connection is gone.
    pub fn disconnected(&mut self) {
        self.born_at = None;
        self.births_pending = false;
        self.control.clear();
    }

    /// The primary host said it is online or offline. Its return owes births again.
    pub fn host_state(&mut self, online: bool) {
        if online && !self.host_online {
            self.births_pending = true;
            self.born_at = None;
            self.control.clear();
        }
        if !online && self.host_online {
            tracing::info!(node = %self.shape.config.edge_node_id, "the primary host is offline: holding data in the outbox");
        }
        self.host_online = online;
    }

    /// An NCMD asked for every birth again.
    pub fn rebirth(&mut self) {
        if self.born_at.is_some() || self.births_pending {
            self.births_pending = true;
            self.born_at = None;
            self.control.clear();
        }
    }

    /// Whether rows may be sent now: births are out and the host is online.
    pub fn data_ready(&self) -> bool {
        self.host_online && self.born_at.is_some() && self.control.is_empty()
    }

    /// The next birth to submit, making the births when they are owed and may go out.
    pub fn next_control(&mut self) -> Option<&(String, Bytes)> {
        if self.births_pending && self.host_online {
            self.births_pending = false;
            self.make_births(SystemTime::now());
        }
        self.control.front()
    }

    /// The birth from [`Session::next_control`] was submitted.
    pub fn control_sent(&mut self) {
        self.control.pop_front();
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        u64::from(seq)
    }

    fn make_births(&mut self, now: SystemTime) {
        let now_ms = convert::millis(now);
        self.seq = 0;
        let bdseq = self.bdseq.load(Ordering::SeqCst);
        let nbirth = Payload {
            timestamp: Some(now_ms),
            seq: Some(self.next_seq()),
            metrics: vec![
                Metric {
                    name: Some("bdSeq".into()),
                    timestamp: Some(now_ms),
                    datatype: Some(DataType::Int64.code()),
                    value: Some(MetricValue::LongValue(u64::from(bdseq))),
                    ..Metric::default()
                },
                Metric {
                    name: Some(REBIRTH_METRIC.into()),
                    alias: Some(REBIRTH_ALIAS),
                    timestamp: Some(now_ms),
                    datatype: Some(DataType::Boolean.code()),
                    value: Some(MetricValue::BooleanValue(false)),
                    ..Metric::default()
                },
            ],
            ..Payload::default()
        };
        self.control.push_back((
            self.shape.topics.node(MessageType::NBirth),
            Bytes::from(nbirth.encode_to_vec()),
        ));
        let states = self.latest.snapshot();
        for (d, state) in states.iter().enumerate() {
            self.alive[d] = state.online;
            if state.online {
                let payload = self.dbirth(d, state, now_ms);
                self.control.push_back(payload);
            }
        }
        self.born_at = Some(now);
    }

    fn dbirth(&mut self, d: usize, state: &DeviceState, now_ms: u64) -> (String, Bytes) {
        let shape = self.shape.clone();
        let device = &shape.config.devices[d];
        let metrics = device
            .points
            .iter()
            .enumerate()
            .map(|(p, point)| {
                let sample = state.values.get(p).and_then(Option::as_ref);
                let mut metric = match sample {
                    Some(sample) => convert::sample_metric(point.datatype, sample),
                    None => Metric {
                        timestamp: Some(now_ms),
                        datatype: Some(point.datatype.code()),
                        is_null: Some(true),
                        ..Metric::default()
                    },
                };
                metric.name = Some(point.name.clone());
                metric.alias = Some(shape.aliases[d][p]);
                let good = sample.is_some_and(|s| s.good && metric.value.is_some());
                metric.properties = Some(convert::properties(point.unit.as_deref(), good));
                metric
            })
            .collect();
        let payload = Payload {
            timestamp: Some(now_ms),
            seq: Some(self.next_seq()),
            metrics,
            ..Payload::default()
        };
        (
            shape.topics.device(MessageType::DBirth, &device.name),
            Bytes::from(payload.encode_to_vec()),
        )
    }

    /// The message for one outbox row (`topic` and `payload` as stored from the bus,
    /// `stored_at` when it was stored).
    pub fn row(&mut self, topic: &str, payload: &[u8], stored_at: SystemTime) -> RowMessage {
        let now = SystemTime::now();
        let historical = self.born_at.is_some_and(|born| stored_at < born);
        match classify(&self.shape, topic, payload, stored_at) {
            Some(Local::Reading {
                device,
                point,
                sample,
            }) => {
                // A dead device (DDEATH sent) has no data until its next DBIRTH, which carries
                // the latest values; held (historical) readings are sent whatever its state.
                if !historical && self.alive.get(device) == Some(&false) {
                    return RowMessage::Skip;
                }
                let shape = self.shape.clone();
                let Some(spec) = shape.config.devices[device].points.get(point) else {
                    return RowMessage::Skip;
                };
                let mut metric = convert::sample_metric(spec.datatype, &sample);
                metric.alias = Some(shape.aliases[device][point]);
                if historical {
                    metric.is_historical = Some(true);
                }
                if !sample.good || metric.value.is_none() {
                    metric.properties = Some(convert::properties(None, false));
                }
                let payload = Payload {
                    timestamp: Some(convert::millis(now)),
                    seq: Some(self.next_seq()),
                    metrics: vec![metric],
                    ..Payload::default()
                };
                RowMessage::Send {
                    topic: shape
                        .topics
                        .device(MessageType::DData, &shape.config.devices[device].name),
                    payload: Bytes::from(payload.encode_to_vec()),
                }
            }
            Some(Local::Status { device, online }) => {
                if self.alive.get(device) == Some(&online) {
                    return RowMessage::Skip;
                }
                self.alive[device] = online;
                let shape = self.shape.clone();
                let name = &shape.config.devices[device].name;
                if online {
                    let states = self.latest.snapshot();
                    let (topic, payload) =
                        self.dbirth(device, &states[device], convert::millis(now));
                    RowMessage::Send { topic, payload }
                } else {
                    let payload = Payload {
                        timestamp: Some(convert::millis(now)),
                        seq: Some(self.next_seq()),
                        ..Payload::default()
                    };
                    RowMessage::Send {
                        topic: shape.topics.device(MessageType::DDeath, name),
                        payload: Bytes::from(payload.encode_to_vec()),
                    }
                }
            }
            None => RowMessage::Skip,
        }
    }

    /// The NDEATH payload of the current connection (its bdSeq).
    pub fn ndeath(&self) -> Bytes {
        ndeath_payload(self.bdseq.load(Ordering::SeqCst))
    }
}

/// An NDEATH payload: the timestamp and the `bdSeq` metric of the CONNECT it belongs to.
pub fn ndeath_payload(bdseq: u8) -> Bytes {
    let payload = Payload {
        timestamp: Some(convert::millis(SystemTime::now())),
        metrics: vec![Metric {
            name: Some("bdSeq".into()),
            datatype: Some(DataType::Int64.code()),
            value: Some(MetricValue::LongValue(u64::from(bdseq))),
            ..Metric::default()
        }],
        ..Payload::default()
    };
    Bytes::from(payload.encode_to_vec())
}

/// What a message from the cloud asks of the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// The primary host's state.
    HostState(bool),
    /// NCMD `Node Control/Rebirth`.
    Rebirth,
    /// DCMD: write `payload` to `<topic>` (a point's `/set`, or the device's `/set` for
    /// several metrics at once).
    Writes(Vec<Write>),
}

/// One DCMD metric (or all of them) as a local write.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// `<point topic>/set`, or `<device topic>/set` with a JSON object of the metrics.
    pub topic: String,
    pub payload: String,
}

/// Why a cloud message was dropped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InboundError {
    #[error("not a topic of this node")]
    UnknownTopic,
    #[error("the payload is not a Sparkplug B payload: {0}")]
    Decode(String),
    #[error("the STATE payload is not {{\"online\": true|false, ...}}")]
    State,
    #[error("no device {0:?} on this node")]
    UnknownDevice(String),
    #[error("device {device:?} has no metric {metric}")]
    UnknownMetric { device: String, metric: String },
    #[error("metric {metric} of device {device:?} is not writable")]
    ReadOnly { device: String, metric: String },
    #[error("metric {metric} of device {device:?}: {error}")]
    Value {
        device: String,
        metric: String,
        error: convert::CommandError,
    },
    #[error("the NCMD asks for nothing this node does")]
    NothingToDo,
}

/// Decode a message from the cloud (a command or the primary host's state). Outside input:
/// every failure is an error to log, never a panic.
pub fn decode_inbound(shape: &Shape, topic: &str, payload: &[u8]) -> Result<Inbound, InboundError> {
    if let Some(host) = &shape.config.primary_host {
        if topic == topic::state_topic(host) {
            let state: serde_json::Value =
                serde_json::from_slice(payload).map_err(|_| InboundError::State)?;
            let online = state
                .get("online")
                .and_then(serde_json::Value::as_bool)
                .ok_or(InboundError::State)?;
            return Ok(Inbound::HostState(online));
        }
    }
    let command = shape
        .topics
        .parse_command(topic)
        .ok_or(InboundError::UnknownTopic)?;
    let decoded = Payload::decode(payload).map_err(|e| InboundError::Decode(e.to_string()))?;
    match command {
        CommandTopic::Node => {
            let rebirth = decoded.metrics.iter().any(|m| {
                (m.name.as_deref() == Some(REBIRTH_METRIC) || m.alias == Some(REBIRTH_ALIAS))
                    && matches!(m.value, Some(MetricValue::BooleanValue(true)))
            });
            if rebirth {
                Ok(Inbound::Rebirth)
            } else {
                Err(InboundError::NothingToDo)
            }
        }
        CommandTopic::Device(name) => {
            let d = *shape
                .by_device
                .get(name)
                .ok_or_else(|| InboundError::UnknownDevice(name.to_owned()))?;
            let device = &shape.config.devices[d];
            let mut writes = Vec::new();
            // The same metrics as one JSON object for the device-level write.
            let mut object = serde_json::Map::new();
            for metric in &decoded.metrics {
                let label = metric
                    .name
                    .clone()
                    .or_else(|| metric.alias.map(|a| format!("alias {a}")))
                    .unwrap_or_else(|| "without name or alias".into());
                let point = match (&metric.name, metric.alias) {
                    (Some(name), _) => device.points.iter().position(|p| &p.name == name),
                    (None, Some(alias)) => shape
                        .by_alias
                        .get(&alias)
                        .filter(|(pd, _)| *pd == d)
                        .map(|&(_, p)| p),
                    (None, None) => None,
                };
                let Some(point) = point.and_then(|p| device.points.get(p)) else {
                    return Err(InboundError::UnknownMetric {
                        device: device.name.clone(),
                        metric: label,
                    });
                };
                if !point.writable {
                    return Err(InboundError::ReadOnly {
                        device: device.name.clone(),
                        metric: label,
                    });
                }
                let payload = convert::command_text(point.datatype, metric.value.as_ref())
                    .map_err(|error| InboundError::Value {
                        device: device.name.clone(),
                        metric: label,
                        error,
                    })?;
                let value = match point.datatype {
                    DataType::String => serde_json::Value::String(payload.clone()),
                    _ => serde_json::from_str(&payload)
                        .ok()
                        .filter(|v: &serde_json::Value| v.is_number() || v.is_boolean())
                        .unwrap_or_else(|| serde_json::Value::String(payload.clone())),
                };
                object.insert(point.name.clone(), value);
                writes.push(Write {
                    topic: format!("{}/set", point.topic),
                    payload,
                });
            }
            // Several metrics, each point once: one command, merged into as few requests
            // as the device's addresses allow. A point named twice keeps today's order
            // of separate writes (the last value wins).
            match &device.write_topic {
                Some(topic) if writes.len() > 1 && object.len() == writes.len() => {
                    Ok(Inbound::Writes(vec![Write {
                        topic: topic.clone(),
                        payload: serde_json::Value::Object(object).to_string(),
                    }]))
                }
                _ => Ok(Inbound::Writes(writes)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::sparkplug::config::{SparkplugDevice, SparkplugPoint};

    fn shape(primary_host: Option<&str>) -> Arc<Shape> {
        Arc::new(Shape::new(SparkplugConfig {
            group_id: "g".into(),
            edge_node_id: "n".into(),
            primary_host: primary_host.map(str::to_owned),
            devices: vec![SparkplugDevice {
                name: "dev".into(),
                status_topic: "gw/status/devices/dev".into(),
                json: true,
                points_filter: Some("gw/dev/+".into()),
                write_topic: Some("gw/dev/set".into()),
                points: vec![
                    SparkplugPoint {
                        name: "temp".into(),
                        topic: "gw/dev/temp".into(),
                        datatype: DataType::Double,
                        unit: Some("C".into()),
                        writable: false,
                    },
                    SparkplugPoint {
                        name: "setpoint".into(),
                        topic: "gw/dev/setpoint".into(),
                        datatype: DataType::Int16,
                        unit: None,
                        writable: true,
                    },
                ],
            }],
        }))
    }

    fn session(shape: &Arc<Shape>) -> Session {
        let latest = Arc::new(Latest::new(shape.clone()));
        Session::new(shape.clone(), latest, Arc::new(AtomicU8::new(7)))
    }

    fn decode(bytes: &Bytes) -> Payload {
        Payload::decode(bytes.as_ref()).expect("decodes")
    }

    #[test]
    fn births_come_first_with_seq_0_and_the_bdseq_then_data_uses_aliases() {
        let shape = shape(None);
        let mut session = session(&shape);
        session.connected();
        let (topic, nbirth) = session.next_control().cloned().expect("NBIRTH");
        session.control_sent();
        assert_eq!(topic, "spBv1.0/g/NBIRTH/n");
        let nbirth = decode(&nbirth);
        assert_eq!(nbirth.seq, Some(0));
        assert_eq!(nbirth.metrics[0].value, Some(MetricValue::LongValue(7)));
        let (topic, dbirth) = session.next_control().cloned().expect("DBIRTH");
        session.control_sent();
        assert_eq!(topic, "spBv1.0/g/DBIRTH/n/dev");
        let dbirth = decode(&dbirth);
        assert_eq!(dbirth.seq, Some(1));
        assert_eq!(dbirth.metrics.len(), 2);
        assert_eq!(dbirth.metrics[1].alias, Some(3));
        assert!(session.data_ready());
        let row = session.row(
            "gw/dev/temp",
            br#"{"value":1.5,"quality":"good"}"#,
            SystemTime::now(),
        );
        let RowMessage::Send { topic, payload } = row else {
            panic!("a reading is sent");
        };
        assert_eq!(topic, "spBv1.0/g/DDATA/n/dev");
        let ddata = decode(&payload);
        assert_eq!(ddata.seq, Some(2));
        assert_eq!(ddata.metrics[0].alias, Some(2));
        assert_eq!(ddata.metrics[0].name, None);
        assert_eq!(ddata.metrics[0].value, Some(MetricValue::DoubleValue(1.5)));
    }

    #[test]
    fn the_node_subscribes_one_filter_per_device_and_its_status() {
        let shape = shape(None);
        assert_eq!(shape.local_topics(), ["gw/dev/+", "gw/status/devices/dev"]);
        // A message under the filter that is no point's reading is skipped.
        let mut session = session(&shape);
        session.connected();
        while session.next_control().is_some() {
            session.control_sent();
        }
        assert_eq!(
            session.row("gw/dev/other", br#"{"value":1}"#, SystemTime::now()),
            RowMessage::Skip
        );
    }

    #[test]
    fn mangled_commands_are_errors_or_writes_of_writable_points_never_panics() {
        use rand::{Rng, SeedableRng};
        let shape = shape(Some("scada"));
        let valid = Payload {
            timestamp: Some(1),
            metrics: vec![
                Metric {
                    name: Some("setpoint".into()),
                    datatype: Some(DataType::Int16.code()),
                    value: Some(MetricValue::IntValue(5)),
                    ..Metric::default()
                },
                Metric {
                    alias: Some(3),
                    value: Some(MetricValue::DoubleValue(1.5)),
                    ..Metric::default()
                },
            ],
            ..Payload::default()
        }
        .encode_to_vec();
        let topics = [
            "spBv1.0/g/DCMD/n/dev",
            "spBv1.0/g/NCMD/n",
            "spBv1.0/STATE/scada",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        for round in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..3) {
                    0 if !bytes.is_empty() => {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] = rng.random();
                    }
                    1 => bytes.truncate(rng.random_range(0..=bytes.len())),
                    _ => bytes.push(rng.random()),
                }
            }
            let topic = topics[round % topics.len()];
            if let Ok(Inbound::Writes(writes)) = decode_inbound(&shape, topic, &bytes) {
                assert!(
                    writes.iter().all(|w| w.topic == "gw/dev/setpoint/set"),
                    "{writes:?}"
                );
            }
        }
    }

    #[test]
    fn seq_wraps_after_255() {
        let shape = shape(None);
        let mut session = session(&shape);
        session.connected();
        while session.next_control().is_some() {
            session.control_sent();
        }
        let mut seqs = Vec::new();
        for _ in 0..300 {
            if let RowMessage::Send { payload, .. } =
                session.row("gw/dev/temp", br#"{"value":1}"#, SystemTime::now())
            {
                seqs.push(decode(&payload).seq.unwrap_or(999));
            }
        }
        assert_eq!(seqs[253], 255);
        assert_eq!(seqs[254], 0);
        assert!(seqs.iter().all(|s| *s <= 255));
    }

    #[test]
    fn with_a_primary_host_births_wait_for_its_online_state_and_rows_before_are_historical() {
        let shape = shape(Some("scada"));
        let mut session = session(&shape);
        session.connected();
        assert!(session.next_control().is_none());
        assert!(!session.data_ready());
        let stored = SystemTime::now();
        let state = decode_inbound(
            &shape,
            "spBv1.0/STATE/scada",
            br#"{"online":true,"timestamp":1}"#,
        );
        assert_eq!(state, Ok(Inbound::HostState(true)));
        session.host_state(true);
        while session.next_control().is_some() {
            session.control_sent();
        }
        let RowMessage::Send { payload, .. } =
            session.row("gw/dev/temp", br#"{"value":2}"#, stored)
        else {
            panic!("sent");
        };
        assert_eq!(decode(&payload).metrics[0].is_historical, Some(true));
    }

    #[test]
    fn a_device_status_becomes_ddeath_and_dbirth_once_each() {
        let shape = shape(None);
        let mut session = session(&shape);
        session.connected();
        while session.next_control().is_some() {
            session.control_sent();
        }
        let now = SystemTime::now();
        let offline = br#"{"status":"offline","error":"timeout"}"#;
        let online = br#"{"status":"online"}"#;
        let RowMessage::Send { topic, .. } = session.row("gw/status/devices/dev", offline, now)
        else {
            panic!("DDEATH");
        };
        assert_eq!(topic, "spBv1.0/g/DDEATH/n/dev");
        assert_eq!(
            session.row("gw/status/devices/dev", offline, now),
            RowMessage::Skip
        );
        // No live data for a dead device.
        assert_eq!(
            session.row(
                "gw/dev/temp",
                br#"{"value":null,"quality":"bad"}"#,
                SystemTime::now()
            ),
            RowMessage::Skip
        );
        let RowMessage::Send { topic, .. } = session.row("gw/status/devices/dev", online, now)
        else {
            panic!("DBIRTH");
        };
        assert_eq!(topic, "spBv1.0/g/DBIRTH/n/dev");
    }

    #[test]
    fn a_dcmd_with_several_metrics_is_one_device_level_write() {
        let mut config = shape(None).config.clone();
        config.devices[0].points.push(SparkplugPoint {
            name: "mode".into(),
            topic: "gw/dev/mode".into(),
            datatype: DataType::String,
            unit: None,
            writable: true,
        });
        let metric = |name: &str, value: MetricValue| Metric {
            name: Some(name.into()),
            value: Some(value),
            ..Metric::default()
        };
        let dcmd = |metrics: Vec<Metric>| {
            Payload {
                metrics,
                ..Payload::default()
            }
            .encode_to_vec()
        };
        let two = dcmd(vec![
            metric("setpoint", MetricValue::IntValue(0xffff_fff6)),
            metric("mode", MetricValue::StringValue("42".into())),
        ]);
        let shaped = Shape::new(config.clone());
        assert_eq!(
            decode_inbound(&shaped, "spBv1.0/g/DCMD/n/dev", &two),
            Ok(Inbound::Writes(vec![Write {
                topic: "gw/dev/set".into(),
                payload: r#"{"setpoint":-10,"mode":"42"}"#.into()
            }]))
        );
        // A point named twice, or a device without a device-level write: one write each.
        let twice = dcmd(vec![
            metric("setpoint", MetricValue::IntValue(1)),
            metric("setpoint", MetricValue::IntValue(2)),
        ]);
        let Ok(Inbound::Writes(writes)) = decode_inbound(&shaped, "spBv1.0/g/DCMD/n/dev", &twice)
        else {
            panic!("writes");
        };
        assert_eq!(writes.len(), 2);
        config.devices[0].write_topic = None;
        let Ok(Inbound::Writes(writes)) =
            decode_inbound(&Shape::new(config), "spBv1.0/g/DCMD/n/dev", &two)
        else {
            panic!("writes");
        };
        let topics: Vec<&str> = writes.iter().map(|w| w.topic.as_str()).collect();
        assert_eq!(topics, ["gw/dev/setpoint/set", "gw/dev/mode/set"]);
    }

    #[test]
    fn commands_decode_into_writes_and_bad_ones_are_errors() {
        let shape = shape(None);
        let dcmd = Payload {
            metrics: vec![Metric {
                name: Some("setpoint".into()),
                datatype: Some(DataType::Int16.code()),
                value: Some(MetricValue::IntValue(0xffff_fff6)),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        assert_eq!(
            decode_inbound(&shape, "spBv1.0/g/DCMD/n/dev", &dcmd.encode_to_vec()),
            Ok(Inbound::Writes(vec![Write {
                topic: "gw/dev/setpoint/set".into(),
                payload: "-10".into()
            }]))
        );
        let by_alias = Payload {
            metrics: vec![Metric {
                alias: Some(2),
                value: Some(MetricValue::DoubleValue(1.0)),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        assert!(matches!(
            decode_inbound(&shape, "spBv1.0/g/DCMD/n/dev", &by_alias.encode_to_vec()),
            Err(InboundError::ReadOnly { .. })
        ));
        let rebirth = Payload {
            metrics: vec![Metric {
                name: Some(REBIRTH_METRIC.into()),
                value: Some(MetricValue::BooleanValue(true)),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        assert_eq!(
            decode_inbound(&shape, "spBv1.0/g/NCMD/n", &rebirth.encode_to_vec()),
            Ok(Inbound::Rebirth)
        );
        assert!(decode_inbound(&shape, "spBv1.0/g/NCMD/n", &[0xff, 0xff, 0xff]).is_err());
        assert!(decode_inbound(&shape, "spBv1.0/g/DCMD/n/other", &[]).is_err());
    }
}
