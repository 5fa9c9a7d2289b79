//! Values encoded at scrape time from what parts already keep: the broker's router
//! statistics and the reload history (copied in by the `/metrics` handler just before it
//! encodes), each device's last good read, and each uplink's connection counters and
//! outbox snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// One broker listener's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerSample {
    /// The listener's URL (`mqtt://0.0.0.0:1883`), its label.
    pub url: String,
    pub connections: u64,
    pub handshakes: u64,
    pub accepted: u64,
    pub refused_over_handshakes: u64,
    pub refused_over_address: u64,
    pub failed_handshakes: u64,
}

/// The broker's counters, as its router and listeners report them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BrokerSnapshot {
    pub listeners: Vec<ListenerSample>,
    pub clients_connected: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    pub messages_received: u64,
    /// `messages_received` by QoS 0, 1, 2.
    pub messages_received_by_qos: [u64; 3],
    /// Payload bytes received, by QoS 0, 1, 2.
    pub payload_bytes_received_by_qos: [u64; 3],
    /// PUBLISH packets sent to clients, by the QoS they were sent with.
    pub messages_sent_by_qos: [u64; 3],
    /// Payload bytes sent, by that QoS.
    pub payload_bytes_sent_by_qos: [u64; 3],
    /// Queued messages dropped (a full session queue).
    pub messages_dropped: u64,
    /// Publishes refused by the ACL or to a `$` topic.
    pub publishes_denied: u64,
    /// Clients cut for not reading.
    pub slow_clients_disconnected: u64,
    pub messages_queued: u64,
    /// Bytes of the queued messages held in memory.
    pub bytes_queued: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub store_bytes: u64,
    /// The store's commit durations: `(upper bound in seconds, cumulative count)`, count
    /// and sum in seconds; `None` without a store file.
    pub store_commits: Option<HistogramSample>,
}

/// A histogram read from a part that keeps its own buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSample {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// An uplink's outbox as its status tick last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UplinkSnapshot {
    /// Rows waiting (including those in flight).
    pub backlog_messages: u64,
    pub backlog_bytes: u64,
    /// Age of the oldest waiting row, seconds.
    pub oldest_age_seconds: u64,
    /// Rows the cloud acknowledged since the outbox was created.
    pub acknowledged: u64,
    pub dropped_oldest: u64,
    pub dropped_new: u64,
    pub dropped_expired: u64,
    pub dropped_rejected: u64,
    pub dropped_not_durable: u64,
}

/// What one uplink handle and the collector share.
#[derive(Debug, Default)]
pub(super) struct UplinkShared {
    pub(super) connected: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) outbox: Mutex<OutboxState>,
}

#[derive(Debug, Default)]
pub(super) struct OutboxState {
    last: UplinkSnapshot,
    /// Acknowledged rows per second between the last two snapshots.
    drain_rate: f64,
    at: Option<Instant>,
}

impl OutboxState {
    pub(super) fn update(&mut self, snapshot: UplinkSnapshot, now: Instant) {
        if let Some(at) = self.at {
            let seconds = now.duration_since(at).as_secs_f64();
            if seconds > 0.0 {
                let drained = snapshot.acknowledged.saturating_sub(self.last.acknowledged);
                self.drain_rate = drained as f64 / seconds;
            }
        }
        self.last = snapshot;
        self.at = Some(now);
    }
}

#[derive(Debug, Default)]
struct ScrapedValues {
    broker: Option<BrokerSnapshot>,
    reloads: (u64, u64),
}

/// Reads one drop reason's count from an outbox snapshot.
type DroppedBy = fn(&UplinkSnapshot) -> u64;

/// The collector for everything above.
#[derive(Debug, Default)]
pub(super) struct Scraped {
    values: Mutex<ScrapedValues>,
    devices: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    uplinks: Mutex<BTreeMap<String, Arc<UplinkShared>>>,
}

impl Scraped {
    pub(super) fn set_broker(&self, broker: BrokerSnapshot) {
        if let Ok(mut values) = self.values.lock() {
            values.broker = Some(broker);
        }
    }

    pub(super) fn set_reloads(&self, succeeded: u64, failed: u64) {
        if let Ok(mut values) = self.values.lock() {
            values.reloads = (succeeded, failed);
        }
    }

    pub(super) fn add_device(&self, device: &str, last_good_unix_ms: Arc<AtomicU64>) {
        if let Ok(mut devices) = self.devices.lock() {
            devices.insert(device.to_owned(), last_good_unix_ms);
        }
    }

    pub(super) fn remove_device(&self, device: &str) {
        if let Ok(mut devices) = self.devices.lock() {
            devices.remove(device);
        }
    }

    pub(super) fn add_uplink(&self, uplink: &str) -> Arc<UplinkShared> {
        let shared = Arc::new(UplinkShared::default());
        if let Ok(mut uplinks) = self.uplinks.lock() {
            uplinks.insert(uplink.to_owned(), shared.clone());
        }
        shared
    }

    pub(super) fn remove_uplink(&self, uplink: &str) {
        if let Ok(mut uplinks) = self.uplinks.lock() {
            uplinks.remove(uplink);
        }
    }
}

/// One family written by hand: its descriptor, then one sample per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: &[(&[(&str, &str)], M)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// The three samples of a family labelled by QoS.
fn by_qos(values: &[u64; 3]) -> [(&'static [(&'static str, &'static str)], u64); 3] {
    [
        (&[("qos", "0")], values[0]),
        (&[("qos", "1")], values[1]),
        (&[("qos", "2")], values[2]),
    ]
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(&[(&str, &str)], u64)],
) -> Result<(), std::fmt::Error> {
    let samples: Vec<_> = samples
        .iter()
        .map(|(labels, value)| (*labels, ConstCounter::new(*value)))
        .collect();
    family(encoder, name, help, MetricType::Counter, &samples)
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(&[(&str, &str)], N)],
) -> Result<(), std::fmt::Error>
where
    N: Copy,
    ConstGauge<N>: EncodeMetric,
{
    let samples: Vec<_> = samples
        .iter()
        .map(|(labels, value)| (*labels, ConstGauge::new(*value)))
        .collect();
    family(encoder, name, help, MetricType::Gauge, &samples)
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (broker, reloads) = match self.values.lock() {
            Ok(values) => (values.broker.clone(), values.reloads),
            Err(_) => (None, (0, 0)),
        };
        if let Some(b) = broker {
            encode_broker(&mut encoder, &b)?;
        }
        counter(
            &mut encoder,
            "config_reloads",
            "Configuration reloads applied",
            &[(&[], reloads.0)],
        )?;
        counter(
            &mut encoder,
            "config_reload_failures",
            "Configuration reloads refused (an invalid file, or a key that cannot change live)",
            &[(&[], reloads.1)],
        )?;
        self.encode_devices(&mut encoder)?;
        self.encode_uplinks(&mut encoder)
    }
}

fn encode_broker(
    encoder: &mut DescriptorEncoder,
    b: &BrokerSnapshot,
) -> Result<(), std::fmt::Error> {
    gauge(
        encoder,
        "broker_clients_connected",
        "MQTT clients connected now",
        &[(&[], b.clients_connected as i64)],
    )?;
    gauge(
        encoder,
        "broker_sessions",
        "Sessions the broker keeps (connected and persistent)",
        &[(&[], b.sessions as i64)],
    )?;
    gauge(
        encoder,
        "broker_subscriptions",
        "Subscriptions of all sessions",
        &[(&[], b.subscriptions as i64)],
    )?;
    gauge(
        encoder,
        "broker_retained_messages",
        "Retained messages",
        &[(&[], b.retained as i64)],
    )?;
    let urls: Vec<[(&str, &str); 1]> = b
        .listeners
        .iter()
        .map(|l| [("listener", l.url.as_str())])
        .collect();
    let per_listener = |value: fn(&ListenerSample) -> u64| -> Vec<(&[(&str, &str)], u64)> {
        urls.iter()
            .zip(&b.listeners)
            .map(|(labels, listener)| (labels.as_slice(), value(listener)))
            .collect()
    };
    let gauges = |value: fn(&ListenerSample) -> u64| -> Vec<(&[(&str, &str)], i64)> {
        per_listener(value)
            .into_iter()
            .map(|(labels, v)| (labels, v as i64))
            .collect()
    };
    gauge(
        encoder,
        "broker_connections",
        "MQTT connections open now (CONNECT read), by listener",
        &gauges(|l| l.connections),
    )?;
    gauge(
        encoder,
        "broker_handshakes",
        "Sockets in their handshake now (TLS, WebSocket, waiting for CONNECT), by listener",
        &gauges(|l| l.handshakes),
    )?;
    counter(
        encoder,
        "broker_accepted_connections",
        "Sockets accepted, by listener",
        &per_listener(|l| l.accepted),
    )?;
    let refused_labels: Vec<[(&str, &str); 2]> = b
        .listeners
        .iter()
        .flat_map(|l| {
            [
                [("listener", l.url.as_str()), ("reason", "max_handshakes")],
                [
                    ("listener", l.url.as_str()),
                    ("reason", "max_connections_per_address"),
                ],
                [("listener", l.url.as_str()), ("reason", "handshake_failed")],
            ]
        })
        .collect();
    let refused_values = b.listeners.iter().flat_map(|l| {
        [
            l.refused_over_handshakes,
            l.refused_over_address,
            l.failed_handshakes,
        ]
    });
    let refused: Vec<(&[(&str, &str)], u64)> = refused_labels
        .iter()
        .zip(refused_values)
        .map(|(labels, value)| (labels.as_slice(), value))
        .collect();
    counter(
        encoder,
        "broker_refused_connections",
        "Sockets closed before CONNECT, by listener and reason",
        &refused,
    )?;
    counter(
        encoder,
        "broker_messages_received",
        "PUBLISH packets received from clients and in-process publishers, by QoS",
        &by_qos(&b.messages_received_by_qos),
    )?;
    counter(
        encoder,
        "broker_messages_sent",
        "PUBLISH packets sent to clients, by the QoS they were sent with",
        &by_qos(&b.messages_sent_by_qos),
    )?;
    counter(
        encoder,
        "broker_payload_received_bytes",
        "Payload bytes of the PUBLISH packets received, by QoS",
        &by_qos(&b.payload_bytes_received_by_qos),
    )?;
    counter(
        encoder,
        "broker_payload_sent_bytes",
        "Payload bytes of the PUBLISH packets sent, by the QoS they were sent with",
        &by_qos(&b.payload_bytes_sent_by_qos),
    )?;
    counter(
        encoder,
        "broker_messages_dropped",
        "Messages dropped, by reason",
        &[
            (&[("reason", "queue_full")], b.messages_dropped),
            (&[("reason", "denied")], b.publishes_denied),
        ],
    )?;
    counter(
        encoder,
        "broker_slow_clients_disconnected",
        "Clients disconnected for not reading (slow_client_timeout)",
        &[(&[], b.slow_clients_disconnected)],
    )?;
    gauge(
        encoder,
        "broker_queued_messages",
        "Messages waiting in session queues, in memory or on disk",
        &[(&[], b.messages_queued as i64)],
    )?;
    gauge(
        encoder,
        "broker_queued_bytes",
        "Bytes (payload and topic) of the queued messages held in memory",
        &[(&[], b.bytes_queued as i64)],
    )?;
    counter(
        encoder,
        "broker_received_bytes",
        "Bytes received from MQTT clients",
        &[(&[], b.bytes_received)],
    )?;
    counter(
        encoder,
        "broker_sent_bytes",
        "Bytes sent to MQTT clients",
        &[(&[], b.bytes_sent)],
    )?;
    if let Some(commits) = &b.store_commits {
        let mut metric = encoder.encode_descriptor(
            "broker_store_commit_duration_seconds",
            "Time of one commit of the broker's SQLite store (with its fsync when synced)",
            None,
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<NoLabelSet>(
            commits.sum,
            commits.count,
            &commits.buckets,
            None,
        )?;
    }
    gauge(
        encoder,
        "broker_store_size_bytes",
        "Size of the broker's SQLite file (0 with durability = \"memory\")",
        &[(&[], b.store_bytes as i64)],
    )
}

impl Scraped {
    fn encode_devices(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|since| since.as_millis() as u64)
            .unwrap_or(0);
        let ages: Vec<(String, f64)> = match self.devices.lock() {
            Ok(devices) => devices
                .iter()
                .filter_map(|(name, at)| {
                    let at = at.load(Ordering::Relaxed);
                    // Never read good: no sample (an age since 1970 would mislead).
                    (at > 0).then(|| (name.clone(), now_ms.saturating_sub(at) as f64 / 1000.0))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let labels: Vec<[(&str, &str); 1]> = ages
            .iter()
            .map(|(name, _)| [("device", name.as_str())])
            .collect();
        let samples: Vec<(&[(&str, &str)], f64)> = labels
            .iter()
            .zip(&ages)
            .map(|(labels, (_, age))| (labels.as_slice(), *age))
            .collect();
        gauge(
            encoder,
            "device_seconds_since_good_read",
            "Seconds since the device last gave a good reading",
            &samples,
        )
    }

    fn encode_uplinks(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        struct Row {
            name: String,
            connected: u64,
            reconnects: u64,
            sent: u64,
            outbox: UplinkSnapshot,
            drain_rate: f64,
        }
        let rows: Vec<Row> = match self.uplinks.lock() {
            Ok(uplinks) => uplinks
                .iter()
                .map(|(name, shared)| {
                    let (outbox, drain_rate) = shared
                        .outbox
                        .lock()
                        .map(|state| (state.last, state.drain_rate))
                        .unwrap_or_default();
                    Row {
                        name: name.clone(),
                        connected: shared.connected.load(Ordering::Relaxed),
                        reconnects: shared.reconnects.load(Ordering::Relaxed),
                        sent: shared.sent.load(Ordering::Relaxed),
                        outbox,
                        drain_rate,
                    }
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let labels: Vec<[(&str, &str); 1]> = rows
            .iter()
            .map(|row| [("uplink", row.name.as_str())])
            .collect();
        let each = |value: fn(&Row) -> u64| -> Vec<(&[(&str, &str)], u64)> {
            labels
                .iter()
                .zip(&rows)
                .map(|(labels, row)| (labels.as_slice(), value(row)))
                .collect()
        };
        let each_i64 = |value: fn(&Row) -> u64| -> Vec<(&[(&str, &str)], i64)> {
            each(value)
                .into_iter()
                .map(|(labels, v)| (labels, v as i64))
                .collect()
        };
        gauge(
            encoder,
            "uplink_connected",
            "1 while the uplink is connected to its cloud broker",
            &each_i64(|row| row.connected),
        )?;
        counter(
            encoder,
            "uplink_reconnects",
            "Connections to the cloud broker after the first, this run",
            &each(|row| row.reconnects),
        )?;
        gauge(
            encoder,
            "uplink_backlog_messages",
            "Messages in the outbox waiting for the cloud's acknowledgement",
            &each_i64(|row| row.outbox.backlog_messages),
        )?;
        gauge(
            encoder,
            "uplink_backlog_bytes",
            "Bytes of the messages in the outbox",
            &each_i64(|row| row.outbox.backlog_bytes),
        )?;
        gauge(
            encoder,
            "uplink_oldest_message_age_seconds",
            "Age of the oldest message in the outbox",
            &each_i64(|row| row.outbox.oldest_age_seconds),
        )?;
        counter(
            encoder,
            "uplink_sent_messages",
            "Messages published to the cloud broker this run (resends included)",
            &each(|row| row.sent),
        )?;
        counter(
            encoder,
            "uplink_acknowledged_messages",
            "Messages the cloud broker acknowledged (since the outbox file was created)",
            &each(|row| row.outbox.acknowledged),
        )?;
        let reasons: [(&str, DroppedBy); 5] = [
            ("oldest", |o| o.dropped_oldest),
            ("new", |o| o.dropped_new),
            ("expired", |o| o.dropped_expired),
            ("rejected", |o| o.dropped_rejected),
            ("not_durable", |o| o.dropped_not_durable),
        ];
        let dropped_labels: Vec<[(&str, &str); 2]> = rows
            .iter()
            .flat_map(|row| {
                reasons
                    .iter()
                    .map(|(reason, _)| [("uplink", row.name.as_str()), ("reason", *reason)])
            })
            .collect();
        let dropped: Vec<(&[(&str, &str)], u64)> = dropped_labels
            .iter()
            .zip(
                rows.iter()
                    .flat_map(|row| reasons.iter().map(move |(_, value)| value(&row.outbox))),
            )
            .map(|(labels, value)| (labels.as_slice(), value))
            .collect();
        counter(
            encoder,
            "uplink_dropped_messages",
            "Messages dropped from the outbox, by reason",
            &dropped,
        )?;
        let rates: Vec<(&[(&str, &str)], f64)> = labels
            .iter()
            .zip(&rows)
            .map(|(labels, row)| (labels.as_slice(), row.drain_rate))
            .collect();
        gauge(
            encoder,
            "uplink_drain_rate",
            "Messages acknowledged per second over the last status interval",
            &rates,
        )
    }
}
