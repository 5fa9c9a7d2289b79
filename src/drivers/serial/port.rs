//! The task that owns one serial port: opens it (retrying with backoff and jitter while it
//! is missing), frames and parses what the device sends, sends poll requests, writes
//! commands, and keeps the device status (with counters) up to date.
//!
//! Invariants:
//! - Only this task touches the port. At most one exchange is outstanding: a poll request
//!   waiting for its response or a write waiting for its reply. Commands wait in the
//!   broker's bounded subscription channel meanwhile (never dropped).
//! - Every wait for the device has a deadline: responses and replies `timeout`, writes to
//!   the port `timeout` too (flow control can stall a write forever).
//! - A read or write error, or the end of the stream, means the port is gone: status
//!   `offline`, and the port is reopened with exponential backoff and jitter. A port that
//!   does not exist at start is the same case. Commands that arrive while the port is
//!   closed are answered with an error at once.
//! - Memory is bounded by the frame codec (see `framing`) whatever the device sends.

use std::time::{Duration, SystemTime};

use futures::StreamExt as _;

use serde_json::{json, Map, Value as Json};
use tokio::io::{AsyncWriteExt as _, WriteHalf};
use tokio::time::{sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_serial::SerialStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::config::{FlowControl, Parity, PortSettings, SerialConfig, COMMAND_POINT};
use super::framing::{FrameCodec, FrameEvent};
use super::parse::{self, Parsed};
use crate::backoff::{Backoff, Jitter};
use crate::broker::bus::{BusError, InternalSubscription};
use crate::drivers::payload::Sample;
use crate::drivers::{rfc3339, DeviceContext, PointAccess, SortedWrite, TextKind};
use crate::metrics::ErrorKind;
use crate::model::{Message, Quality, Reading, Value, WriteOutcome, WriteRequest};

/// Least time between two warnings of one kind (bad checksum, over-long frame ...): a
/// device that sends garbage continuously must not flood the journal.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Frame counters, published in the device status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Frames cut from the stream (before checksum and rules).
    pub(crate) frames: u64,
    /// Frames that matched a rule and were published.
    pub(crate) published: u64,
    /// Frames that matched no rule (published raw or dropped).
    pub(crate) unmatched: u64,
    pub(crate) bad_checksum: u64,
    /// Frames longer than `max_frame`, discarded.
    pub(crate) overlong: u64,
    /// Start/end framing: runs of bytes outside any frame, discarded.
    pub(crate) garbled: u64,
    /// Frames whose captures did not convert to their field types.
    pub(crate) invalid: u64,
    /// Poll requests without a response in time.
    pub(crate) timeouts: u64,
    /// Times the port was opened (the first open included).
    pub(crate) opens: u64,
}

impl Counters {
    fn to_json(&self) -> Json {
        json!({
            "frames": self.frames,
            "published": self.published,
            "unmatched": self.unmatched,
            "bad_checksum": self.bad_checksum,
            "overlong": self.overlong,
            "garbled": self.garbled,
            "invalid": self.invalid,
            "timeouts": self.timeouts,
            "opens": self.opens,
        })
    }
}

/// Device health as the status topic shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    /// Not opened yet.
    Starting,
    Online,
    /// The port is missing or failed.
    Offline(String),
    /// The port is open but the device misbehaves (no response to a poll).
    Bad(String),
}

/// Rate-limited warnings of one kind.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(n)` when a warning may be logged now, n being how many were suppressed since
    /// the last one.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + WARN_INTERVAL) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The one exchange that may be outstanding.
#[derive(Debug)]
enum Pending {
    Response {
        sent: Instant,
        deadline: Instant,
    },
    Reply {
        request: WriteRequest,
        deadline: Instant,
    },
}

impl Pending {
    fn deadline(&self) -> Instant {
        match self {
            Pending::Response { deadline, .. } | Pending::Reply { deadline, .. } => *deadline,
        }
    }
}

/// Why a session with an open port ended.
enum Ended {
    Shutdown,
    Lost(String),
}

struct Driver {
    config: SerialConfig,
    poll: Duration,
    context: DeviceContext,
    counters: Counters,
    health: Health,
    /// The health last published, so an unchanged one is not republished (except by the
    /// periodic status).
    published: Option<Health>,
    writes: Option<InternalSubscription>,
    throttle_overlong: Throttle,
    throttle_garbled: Throttle,
    throttle_checksum: Throttle,
    throttle_invalid: Throttle,
    /// Each point (rule topic) and whether its last reading was good, for the metrics.
    point_quality: std::collections::BTreeMap<String, bool>,
}

/// Runs one serial device until `shutdown`.
pub(crate) async fn run(
    config: SerialConfig,
    poll: Duration,
    context: DeviceContext,
    shutdown: CancellationToken,
) {
    // Every point's `/set` is subscribed, so that a write to a read-only point, or to
    // `command` on a device without write-back, is answered rather than ignored.
    let mut points: Vec<&str> = config
        .rules
        .iter()
        .map(|rule| rule.topic.as_str())
        .collect();
    points.extend(config.unmatched_topic.as_deref());
    points.push(COMMAND_POINT);
    let writes = match context.subscribe_writes(&points).await {
        Ok(subscription) => Some(subscription),
        Err(error) => {
            tracing::error!(device = %context.device, %error, "cannot subscribe to commands; write-back is off");
            None
        }
    };
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max, Jitter::Quarter);
    let mut driver = Driver {
        config,
        poll: poll.max(Duration::from_millis(1)),
        context,
        counters: Counters::default(),
        health: Health::Starting,
        published: None,
        writes,
        throttle_overlong: Throttle::default(),
        throttle_garbled: Throttle::default(),
        throttle_checksum: Throttle::default(),
        throttle_invalid: Throttle::default(),
        point_quality: Default::default(),
    };
    let port = driver.config.port.path.clone();
    loop {
        let reason = match open(&driver.config.port) {
            Ok(stream) => {
                backoff.reset();
                driver.counters.opens += 1;
                if driver.counters.opens > 1 {
                    tracing::info!(device = %driver.context.device, %port, "serial port open again");
                } else {
                    tracing::info!(device = %driver.context.device, %port, "serial port open");
                }
                driver.health = Health::Online;
                if !driver.publish_status(false).await {
                    return;
                }
                match driver.session(stream, &shutdown).await {
                    Ended::Shutdown => break,
                    Ended::Lost(reason) => {
                        driver.context.metrics().request_failed(ErrorKind::Io);
                        tracing::warn!(device = %driver.context.device, %port, %reason, "serial port lost, reopening");
                        reason
                    }
                }
            }
            Err(reason) => {
                driver.context.metrics().request_failed(ErrorKind::Io);
                reason
            }
        };
        let wait = backoff.next_delay();
        if driver.health != Health::Offline(reason.clone()) {
            if !matches!(driver.health, Health::Offline(_)) {
                tracing::warn!(device = %driver.context.device, %port, %reason, retry_in = ?wait, "serial port offline");
            }
            driver.health = Health::Offline(reason);
            if !driver.publish_status(false).await {
                return;
            }
        }
        if !driver.wait_offline(wait, &shutdown).await {
            break;
        }
    }
    // The last word waits until the broker has it: the broker stops right after us.
    driver.health = Health::Offline("gateway stopped".to_owned());
    let payload = driver.status_payload();
    driver.context.publish_final_status(payload).await;
}

/// Opens a serial port with its settings (for Modbus RTU lines too). Synchronous: opening
/// a tty does not block.
pub(crate) fn open(settings: &PortSettings) -> Result<SerialStream, String> {
    SerialStream::open(&builder(settings))
        .map_err(|e| format!("cannot open {}: {e}", settings.path))
}

/// A tokio-serial builder with these settings.
fn builder(settings: &PortSettings) -> tokio_serial::SerialPortBuilder {
    tokio_serial::new(settings.path.as_str(), settings.baud)
        .parity(match settings.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .data_bits(match settings.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        })
        .stop_bits(if settings.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })
        .flow_control(match settings.flow_control {
            FlowControl::None => tokio_serial::FlowControl::None,
            FlowControl::Software => tokio_serial::FlowControl::Software,
            FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
        })
}

impl Driver {
    /// While the port is closed: waits `wait`, answering commands with an error and
    /// keeping the periodic status. `false` on shutdown.
    async fn wait_offline(&mut self, wait: Duration, shutdown: &CancellationToken) -> bool {
        let until = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = sleep_until(until) => return true,
                message = next_write(&mut self.writes) => match message {
                    Some(message) => {
                        let reason = match &self.health {
                            Health::Offline(error) => format!("port offline: {error}"),
                            _ => "port offline".to_owned(),
                        };
                        if let Some(request) = self.command(&message).await {
                            let _ = self
                                .context
                                .publish_write_result(&request, &WriteOutcome::Error { reason })
                                .await;
                        }
                    }
                    None => self.writes = None,
                },
            }
        }
    }

    /// Runs with the port open until it fails or shutdown.
    async fn session(&mut self, stream: SerialStream, shutdown: &CancellationToken) -> Ended {
        let (reader, mut writer) = tokio::io::split(stream);
        let codec = FrameCodec::new(self.config.framing.clone(), self.config.max_frame);
        let mut frames = FramedRead::new(reader, codec);
        let mut poll = tokio::time::interval(self.poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut status = tokio::time::interval_at(
            Instant::now() + self.config.status_interval,
            self.config.status_interval,
        );
        status.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let polling = self.config.request.is_some();
        let mut pending: Option<Pending> = None;
        let ended = loop {
            let deadline = pending.as_ref().map(Pending::deadline);
            tokio::select! {
                _ = shutdown.cancelled() => break Ended::Shutdown,
                event = frames.next() => match event {
                    None => break Ended::Lost("the port closed (device unplugged?)".to_owned()),
                    Some(Err(error)) => break Ended::Lost(format!("read failed: {error}")),
                    Some(Ok(event)) => {
                        if !self.on_event(event, &mut pending).await {
                            break Ended::Shutdown;
                        }
                    }
                },
                _ = poll.tick(), if polling && pending.is_none() => {
                    let request = self.config.request.clone().unwrap_or_default();
                    if let Err(reason) = self.write(&mut writer, &request).await {
                        break Ended::Lost(reason);
                    }
                    let sent = Instant::now();
                    self.context.metrics().poll();
                    pending = Some(Pending::Response { sent, deadline: sent + self.config.timeout });
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if let Some(expired) = pending.take() {
                        if !self.expired(expired).await {
                            break Ended::Shutdown;
                        }
                    }
                }
                message = next_write(&mut self.writes), if pending.is_none() => match message {
                    None => self.writes = None,
                    Some(message) => match self.on_command(&message, &mut writer).await {
                        Ok(next) => pending = next,
                        Err(reason) => break Ended::Lost(reason),
                    },
                },
                _ = status.tick() => {
                    if !self.publish_status(true).await {
                        break Ended::Shutdown;
                    }
                }
            }
        };
        // A command waiting for its reply still gets an answer.
        if let Some(Pending::Reply { request, .. }) = pending {
            let reason = match &ended {
                Ended::Shutdown => "gateway stopping".to_owned(),
                Ended::Lost(reason) => format!("port lost: {reason}"),
            };
            let _ = self
                .context
                .publish_write_result(&request, &WriteOutcome::Error { reason })
                .await;
        }
        ended
    }

    /// Writes to the port within `timeout`.
    async fn write(
        &mut self,
        writer: &mut WriteHalf<SerialStream>,
        bytes: &[u8],
    ) -> Result<(), String> {
        let limit = self.config.timeout;
        let result = timeout(limit, async {
            writer.write_all(bytes).await?;
            writer.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("write failed: {error}")),
            Err(_) => Err(format!(
                "write did not complete within {}",
                humantime::format_duration(limit)
            )),
        }
    }

    /// A `/set` message as a request; a message that cannot be parsed, or is for a
    /// read-only or unknown point, is answered with the reason at once (`None`).
    async fn command(&self, message: &Message) -> Option<WriteRequest> {
        let config = &self.config;
        let access = |name: &str| {
            if name == COMMAND_POINT && config.write.is_some() {
                Some(PointAccess::Writable)
            } else if config.rules.iter().any(|rule| rule.topic == name)
                || config.unmatched_topic.as_deref() == Some(name)
            {
                Some(PointAccess::ReadOnly)
            } else {
                None
            }
        };
        match self.context.sort_write(message, access) {
            SortedWrite::Request(request) => Some(request),
            SortedWrite::Refused(refused) => {
                self.context.refuse_write(refused).await;
                None
            }
            SortedWrite::NotMine => None,
        }
    }

    /// Writes one command; returns the reply to wait for, if any. `Err` when the port
    /// failed.
    async fn on_command(
        &mut self,
        message: &Message,
        writer: &mut WriteHalf<SerialStream>,
    ) -> Result<Option<Pending>, String> {
        let Some(request) = self.command(message).await else {
            return Ok(None);
        };
        // `command` sorts as writable only with write-back configured.
        let Some(write) = self.config.write.clone() else {
            return Ok(None);
        };
        let bytes = write.render(&request.value.to_string());
        if let Err(reason) = self.write(writer, &bytes).await {
            let outcome = WriteOutcome::Error {
                reason: reason.clone(),
            };
            let _ = self.context.publish_write_result(&request, &outcome).await;
            return Err(reason);
        }
        tracing::info!(device = %self.context.device, value = %request.value, "command written");
        if write.reply_match.is_some() {
            return Ok(Some(Pending::Reply {
                request,
                deadline: Instant::now() + self.config.timeout,
            }));
        }
        let outcome = WriteOutcome::Ok {
            value: request.value.clone(),
        };
        let _ = self.context.publish_write_result(&request, &outcome).await;
        Ok(None)
    }

    /// The points' qualities into the device's metrics.
    fn record_points(&self) {
        let good = self.point_quality.values().filter(|good| **good).count();
        self.context
            .metrics()
            .points(good, self.point_quality.len() - good);
    }

    /// A response or reply did not come in time. `false` when the broker is gone.
    async fn expired(&mut self, expired: Pending) -> bool {
        let limit = humantime::format_duration(self.config.timeout);
        match expired {
            Pending::Reply { request, .. } => {
                let pattern = self
                    .config
                    .write
                    .as_ref()
                    .and_then(|w| w.reply_match.as_ref())
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default();
                let reason = format!("no reply matching {pattern:?} within {limit}");
                tracing::warn!(device = %self.context.device, %reason, "command not confirmed");
                let outcome = WriteOutcome::Error { reason };
                self.context
                    .publish_write_result(&request, &outcome)
                    .await
                    .is_ok()
            }
            Pending::Response { .. } => {
                self.counters.timeouts += 1;
                self.context.metrics().request_failed(ErrorKind::Timeout);
                // Every point goes bad below, so each counts as bad.
                for rule in &self.config.rules {
                    self.point_quality.insert(rule.topic.clone(), false);
                }
                self.record_points();
                let request = self.config.request.as_deref().unwrap_or_default();
                let reason = format!(
                    "no response to request {:?} within {limit}",
                    String::from_utf8_lossy(request)
                );
                if !matches!(&self.health, Health::Bad(r) if *r == reason) {
                    tracing::warn!(device = %self.context.device, %reason, "device not responding");
                }
                self.health = Health::Bad(reason.clone());
                if !self.publish_status(false).await {
                    return false;
                }
                // Every point of the device goes bad with the reason.
                let points: Vec<&str> = self
                    .config
                    .rules
                    .iter()
                    .map(|r| r.topic.as_str())
                    .chain(self.config.unmatched_topic.as_deref())
                    .collect();
                let mut seen = std::collections::HashSet::new();
                for point in points {
                    if !seen.insert(point) {
                        continue;
                    }
                    let reading = Reading {
                        device: self.context.device.clone(),
                        point: point.to_owned(),
                        value: None,
                        quality: Quality::Bad(reason.clone()),
                        timestamp: SystemTime::now(),
                    };
                    if self.context.publish_reading(&reading).await.is_err() {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Handles one decoder event. `false` when the broker is gone.
    async fn on_event(&mut self, event: FrameEvent, pending: &mut Option<Pending>) -> bool {
        let frame = match event {
            FrameEvent::Frame(frame) => frame,
            FrameEvent::Overlong => {
                self.counters.overlong += 1;
                self.context.metrics().request_failed(ErrorKind::Decode);
                if let Some(suppressed) = self.throttle_overlong.allow() {
                    tracing::warn!(device = %self.context.device, max_frame = self.config.max_frame, suppressed, "over-long frame discarded, resynchronising at the next delimiter");
                }
                return true;
            }
            FrameEvent::Garbled { discarded } => {
                self.counters.garbled += 1;
                self.context.metrics().request_failed(ErrorKind::Decode);
                if let Some(suppressed) = self.throttle_garbled.allow() {
                    tracing::warn!(device = %self.context.device, discarded, suppressed, "bytes outside any frame discarded");
                }
                return true;
            }
        };
        self.counters.frames += 1;
        match pending.take() {
            Some(Pending::Response { sent, .. }) => {
                self.context.metrics().request_ok(sent.elapsed());
                // Any frame answers the poll: the device is alive.
                if matches!(self.health, Health::Bad(_)) {
                    tracing::info!(device = %self.context.device, "device responding again");
                    self.health = Health::Online;
                    if !self.publish_status(false).await {
                        return false;
                    }
                }
            }
            Some(Pending::Reply { request, deadline }) => {
                let text = parse::decode(&frame, self.config.encoding);
                let reply = self
                    .config
                    .write
                    .as_ref()
                    .and_then(|w| w.reply_match.as_ref())
                    .and_then(|r| r.captures(&text));
                match reply {
                    Some(captures) => {
                        let value = captures
                            .name("value")
                            .or_else(|| captures.get(1))
                            .or_else(|| captures.get(0))
                            .map_or(String::new(), |m| m.as_str().to_owned());
                        let outcome = WriteOutcome::Ok {
                            value: Value::Text(value),
                        };
                        // The reply is consumed: it answers the command, it is not data.
                        return self
                            .context
                            .publish_write_result(&request, &outcome)
                            .await
                            .is_ok();
                    }
                    None => *pending = Some(Pending::Reply { request, deadline }),
                }
            }
            None => {}
        }
        self.on_frame(&frame).await
    }

    /// Parses a frame and publishes what it gives. `false` when the broker is gone.
    async fn on_frame(&mut self, frame: &[u8]) -> bool {
        let parsed = parse::parse(
            frame,
            self.config.encoding,
            self.config.checksum,
            &self.config.rules,
        );
        let result = match parsed {
            Parsed::Matched { rule, fields } => {
                self.counters.published += 1;
                let Some(rule) = self.config.rules.get(rule) else {
                    return true;
                };
                self.point_quality.insert(rule.topic.clone(), true);
                self.record_points();
                let sample = Sample::Fields {
                    fields,
                    timestamp: SystemTime::now(),
                };
                self.context.publish_sample(&rule.topic, sample).await
            }
            Parsed::Unmatched { text } => {
                self.counters.unmatched += 1;
                match &self.config.unmatched_topic {
                    Some(point) => {
                        let topic = self.context.point_topic(point);
                        self.context
                            .publish_text(topic, text, false, TextKind::Plain)
                            .await
                    }
                    None => {
                        tracing::debug!(device = %self.context.device, frame = %text, "frame matches no rule, dropped");
                        Ok(())
                    }
                }
            }
            Parsed::BadChecksum { text } => {
                self.counters.bad_checksum += 1;
                self.context.metrics().request_failed(ErrorKind::Decode);
                if let Some(suppressed) = self.throttle_checksum.allow() {
                    tracing::warn!(device = %self.context.device, frame = %text.trim_end(), suppressed, "bad NMEA checksum, frame dropped");
                }
                Ok(())
            }
            Parsed::Invalid { rule, reason } => {
                self.counters.invalid += 1;
                self.context.metrics().request_failed(ErrorKind::Decode);
                if let Some(suppressed) = self.throttle_invalid.allow() {
                    tracing::warn!(device = %self.context.device, rule, %reason, suppressed, "frame dropped");
                }
                Ok(())
            }
        };
        match result {
            Ok(()) => true,
            Err(BusError::Closed) => false,
            Err(error) => {
                tracing::warn!(device = %self.context.device, %error, "cannot publish");
                true
            }
        }
    }

    /// Publishes the status when it changed (or always, with `periodic`). Retained, in the
    /// shape of `DeviceContext::publish_status` plus the port and the counters. `false`
    /// when the broker is gone.
    async fn publish_status(&mut self, periodic: bool) -> bool {
        if !periodic && self.published.as_ref() == Some(&self.health) {
            return true;
        }
        let status_topic = self.context.status_topic().to_owned();
        let payload = self.status_payload();
        match self
            .context
            .publish_text(status_topic, payload, true, TextKind::Json)
            .await
        {
            Ok(()) => {
                self.published = Some(self.health.clone());
                true
            }
            Err(BusError::Closed) => false,
            Err(error) => {
                tracing::warn!(device = %self.context.device, %error, "cannot publish status");
                true
            }
        }
    }

    /// The status JSON: the health, the port and the counters.
    fn status_payload(&self) -> String {
        let mut body = Map::new();
        let (status, error) = match &self.health {
            Health::Starting => ("offline", Some("not opened yet")),
            Health::Online => ("online", None),
            Health::Offline(error) => ("offline", Some(error.as_str())),
            Health::Bad(error) => ("error", Some(error.as_str())),
        };
        body.insert("status".into(), json!(status));
        if let Some(error) = error {
            body.insert("error".into(), json!(error));
        }
        body.insert("ts".into(), json!(rfc3339(SystemTime::now())));
        body.insert("port".into(), json!(self.config.port.path));
        body.insert("counters".into(), self.counters.to_json());
        Json::Object(body).to_string()
    }
}

async fn next_write(writes: &mut Option<InternalSubscription>) -> Option<Message> {
    match writes {
        Some(subscription) => subscription.recv().await,
        None => std::future::pending().await,
    }
}
