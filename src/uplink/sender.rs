//! The sender: drains the outbox to the cloud in `seq` order with a bounded window, maps
//! acknowledgements back to rows, deletes acknowledged rows, publishes birth, subscribes
//! the in-routes, keeps the status, and on shutdown flushes, says `offline` and
//! disconnects.
//!
//! It is the only task that submits publishes on its rumqttc client (the ack mapping
//! depends on it), and it never awaits a client call: rumqttc's request channel is drained
//! by the poll task, which may itself be waiting for this task to take an event. `try_*`
//! calls that find the channel full are retried after the next event or a short pause.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{UplinkConfig, WillConfig};
use super::inflight::{Inflight, Written};
use super::link::{Client, LinkEvent, SubmitError};
use super::sparkplug::{self, node::RowMessage, node::Session};
use super::status::UplinkStatus;
use super::{SharedCounters, UplinkError};
use crate::broker::bus::BrokerHandle;
use crate::metrics::{UplinkMetrics, UplinkSnapshot};
use crate::model::{Message, MessageProperties, QoS};
use crate::status::{Backlog, UplinkBoard, UplinkState};
use crate::store::{AckMark, DropReason, Outbox, OutboxRecord, StoreError, StoredMessage};

/// Rows read from the outbox at a time.
const READ_BATCH: usize = 1024;
/// Status is republished at least this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// Pause before retrying when rumqttc's request channel was full.
const FULL_RETRY: Duration = Duration::from_millis(2);
/// Pause before retrying a failed outbox read.
const READ_RETRY: Duration = Duration::from_secs(1);
/// Framing overhead added to topic + payload when comparing with the cloud's packet limit.
const PACKET_OVERHEAD: usize = 16;

pub(super) struct SenderContext {
    pub config: UplinkConfig,
    pub client: Client,
    pub outbox: Outbox,
    pub broker: BrokerHandle,
    pub status_topic: String,
    pub internal_name: String,
    pub events: mpsc::Receiver<LinkEvent>,
    pub direct: mpsc::Receiver<OutboxRecord>,
    pub appended: watch::Receiver<u64>,
    pub counters: Arc<SharedCounters>,
    /// Connections, sends and the outbox snapshot for `/metrics`.
    pub metrics: UplinkMetrics,
    pub stop: CancellationToken,
    /// How long the shutdown steps (flush, offline, disconnect) may take together.
    pub stop_budget: Duration,
    /// Where the status API sees this uplink's state, errors and backlog.
    pub board: Option<UplinkBoard>,
    /// A Sparkplug edge node: rows become Sparkplug messages as they are sent.
    pub node: Option<SenderNode>,
}

/// The Sparkplug side of the sender: the node's session and what the cloud asks of it.
pub(super) struct SenderNode {
    pub session: Session,
    /// The primary host's state and rebirth requests (decoded by the inbound task).
    pub events: mpsc::Receiver<sparkplug::Inbound>,
}

/// Rows leaving the outbox, waiting for one delete transaction.
#[derive(Default)]
struct Settling {
    /// Acknowledged (or written, for QoS 0): deleted as acked.
    acked: Vec<u64>,
    /// Refused by the cloud after being sent.
    refused: Vec<u64>,
    /// Never sent: expired while queued.
    expired: Vec<u64>,
    /// Never sent: larger than the cloud accepts.
    too_large: Vec<u64>,
}

impl Settling {
    fn is_empty(&self) -> bool {
        self.acked.is_empty()
            && self.refused.is_empty()
            && self.expired.is_empty()
            && self.too_large.is_empty()
    }
}

pub(super) struct Sender {
    cx: SenderContext,
    window: usize,
    inflight: Inflight,
    connected: bool,
    /// Connected at least once this run: the next connection is a reconnect.
    connected_before: bool,
    /// In-routes subscribed at least once by this process.
    subscribed_once: bool,
    need_subscribe: bool,
    need_birth: bool,
    max_packet: Option<u32>,
    /// Highest seq submitted on this connection.
    cursor: u64,
    buffer: VecDeque<StoredMessage>,
    /// The last read found no more rows: wait for `appended` to change.
    exhausted: bool,
    /// Re-read from the start of the queue once pending deletions have committed.
    rewind: bool,
    settling: Settling,
    deleting: Option<JoinHandle<()>>,
    mark: AckMark,
    /// The ack mark being written, with the number of rows it covers.
    marking: Option<JoinHandle<usize>>,
    /// rumqttc's channel was full: retry after a pause or the next event.
    blocked: bool,
    read_failed_at: Option<Instant>,
    rate: Option<RateLimit>,
    last_error: Option<String>,
    last_status: Option<UplinkStatus>,
    link_stopped: bool,
    /// The ingest task is gone (or there are no out-routes): no more appends or direct
    /// messages will come.
    appended_closed: bool,
    direct_closed: bool,
    /// A Sparkplug message made from the row with this seq whose submission found
    /// rumqttc's channel full: sent as made (its Sparkplug `seq` is taken).
    prepared: Option<(u64, String, Bytes)>,
    node_closed: bool,
}

/// At most `per_second` publishes per second, with bursts of a tenth of a second.
struct RateLimit {
    interval: Duration,
    burst: Duration,
    next: Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> RateLimit {
        RateLimit {
            interval: Duration::from_secs(1) / per_second.max(1),
            burst: Duration::from_millis(100),
            next: Instant::now(),
        }
    }

    /// Take one token, or say when the next one is available.
    fn take(&mut self) -> Result<(), Instant> {
        let now = Instant::now();
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        if self.next > now {
            return Err(self.next);
        }
        self.next = self.next.max(earliest) + self.interval;
        Ok(())
    }
}

impl Sender {
    pub(super) fn new(cx: SenderContext) -> Sender {
        let window = usize::from(cx.config.inflight.max(1));
        let rate = cx.config.max_rate.map(RateLimit::new);
        let mark = cx.outbox.ack_mark();
        Sender {
            cx,
            window,
            inflight: Inflight::new(mark.initial()),
            mark,
            marking: None,
            connected: false,
            connected_before: false,
            subscribed_once: false,
            need_subscribe: false,
            need_birth: false,
            max_packet: None,
            cursor: 0,
            buffer: VecDeque::new(),
            exhausted: false,
            rewind: true,
            settling: Settling::default(),
            deleting: None,
            blocked: false,
            read_failed_at: None,
            rate,
            last_error: None,
            last_status: None,
            link_stopped: false,
            appended_closed: false,
            direct_closed: false,
            prepared: None,
            node_closed: false,
        }
    }

    fn name(&self) -> &str {
        &self.cx.config.name
    }

    pub(super) async fn run(mut self) -> Result<(), UplinkError> {
        self.publish_status(true).await;
        let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rate_wait: Option<Instant> = None;
        loop {
            self.start_deleting();
            self.start_marking();
            rate_wait = self.pump(rate_wait).await?;
            let retry_at = self.retry_at(rate_wait);
            tokio::select! {
                biased;
                _ = self.cx.stop.cancelled() => break,
                event = self.cx.events.recv() => match event {
                    Some(event) => {
                        self.handle(event).await;
                        // Take what else is waiting before submitting more (fewer wake-ups).
                        for _ in 0..256 {
                            match self.cx.events.try_recv() {
                                Ok(event) => self.handle(event).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.link_stopped = true,
                },
                () = wait_deleting(&mut self.deleting) => self.deleting = None,
                covered = wait_marking(&mut self.marking) => self.marked(covered),
                record = self.cx.direct.recv(), if !self.direct_closed => match record {
                    Some(record) => self.send_direct(record),
                    None => self.direct_closed = true,
                },
                changed = self.cx.appended.changed(), if self.exhausted && !self.appended_closed => {
                    match changed {
                        Ok(()) => self.exhausted = false,
                        Err(_) => self.appended_closed = true,
                    }
                }
                _ = sleep_until(retry_at), if retry_at.is_some() => {
                    self.blocked = false;
                    rate_wait = None;
                    if self.read_failed_at.is_some_and(|t| t.elapsed() >= READ_RETRY) {
                        self.read_failed_at = None;
                    }
                }
                _ = status_tick.tick() => self.publish_status(true).await,
                event = next_node_event(&mut self.cx.node), if !self.node_closed => match event {
                    Some(event) => self.node_event(event),
                    None => self.node_closed = true,
                },
            }
            if self.link_stopped {
                return Err(UplinkError::LinkStopped {
                    uplink: self.name().to_string(),
                });
            }
        }
        self.shutdown().await;
        Ok(())
    }

    fn retry_at(&self, rate_wait: Option<Instant>) -> Option<Instant> {
        let blocked = self.blocked.then(|| Instant::now() + FULL_RETRY);
        let read = self.read_failed_at.map(|t| t + READ_RETRY);
        [blocked, rate_wait, read].into_iter().flatten().min()
    }

    async fn handle(&mut self, event: LinkEvent) {
        self.blocked = false;
        match event {
            LinkEvent::Connected {
                session_present,
                max_packet_size,
            } => {
                self.cx.metrics.connected(self.connected_before);
                self.connected_before = true;
                self.connected = true;
                self.max_packet = max_packet_size;
                self.need_birth = self.cx.config.birth.is_some();
                let has_routes = !self.cx.config.routes_in.is_empty();
                if !session_present && self.subscribed_once {
                    tracing::info!(uplink = %self.name(), "the cloud kept no session: subscribing the in-routes again");
                }
                // Subscribe on the first connection of this process too: the routes may have
                // changed since the cloud stored the session.
                self.need_subscribe = has_routes && (!session_present || !self.subscribed_once);
                self.rewind = true;
                self.prepared = None;
                if let Some(node) = self.cx.node.as_mut() {
                    node.session.connected();
                }
                if let Some(board) = &self.cx.board {
                    board.set_state(UplinkState::Connected);
                }
                self.publish_status(false).await;
            }
            LinkEvent::Down { error, reset } => {
                if let Some(board) = &self.cx.board {
                    board.set_error(&error);
                    board.set_state(UplinkState::Disconnected);
                }
                if self.connected {
                    tracing::warn!(uplink = %self.name(), %error, unacknowledged = self.inflight.unacknowledged(), "uplink disconnected; unacknowledged rows will be sent again");
                }
                self.connected = false;
                self.cx.metrics.disconnected();
                self.inflight.reset();
                self.buffer.clear();
                self.need_birth = false;
                self.need_subscribe = false;
                self.rewind = true;
                self.prepared = None;
                if let Some(node) = self.cx.node.as_mut() {
                    node.session.disconnected();
                }
                self.last_error = Some(error);
                let _ = reset.send(());
                self.publish_status(false).await;
            }
            LinkEvent::Published(pkid) => match self.inflight.written(pkid) {
                Some(Written::Row(seq)) => self.settling.acked.push(seq),
                Some(Written::AwaitingAck | Written::Other) => {}
                None => {
                    tracing::warn!(uplink = %self.name(), pkid, "publish written that this sender did not submit")
                }
            },
            LinkEvent::Acked { pkid, refused } => match self.inflight.acked(pkid) {
                Some(Some(seq)) => match refused {
                    None => self.settling.acked.push(seq),
                    Some(reason) => {
                        tracing::warn!(uplink = %self.name(), seq, %reason, "the cloud refused a queued message; it is dropped and counted as rejected");
                        self.settling.refused.push(seq);
                    }
                },
                Some(None) => {
                    if let Some(reason) = refused {
                        tracing::warn!(uplink = %self.name(), %reason, "the cloud refused a status message");
                    }
                }
                None => {
                    tracing::debug!(uplink = %self.name(), pkid, "ack for an unknown packet id")
                }
            },
            LinkEvent::Stopped => self.link_stopped = true,
        }
    }

    /// Submit what may be submitted now. Returns when the rate limit allows the next row.
    async fn pump(&mut self, rate_wait: Option<Instant>) -> Result<Option<Instant>, UplinkError> {
        if !self.connected || self.blocked {
            return Ok(rate_wait);
        }
        if self.need_subscribe {
            let filters: Vec<(String, QoS)> = self
                .cx
                .config
                .routes_in
                .iter()
                .map(|r| (r.filter.clone(), r.qos))
                .collect();
            match self.cx.client.try_subscribe(&filters) {
                Ok(()) => {
                    self.need_subscribe = false;
                    self.subscribed_once = true;
                }
                Err(e) => return self.submit_failed(e).map(|()| rate_wait),
            }
        }
        if self.need_birth {
            if let Some(birth) = self.cx.config.birth.clone() {
                match self.publish_status_message(&birth, birth.payload.as_bytes().to_vec(), None) {
                    Ok(()) => self.need_birth = false,
                    Err(e) => return self.submit_failed(e).map(|()| rate_wait),
                }
            }
        }
        if let Some(node) = self.cx.node.as_mut() {
            // Births first (and, with a primary host, only once it is online); rows wait
            // in the outbox until they are out.
            while let Some((topic, payload)) = node.session.next_control().cloned() {
                match self
                    .cx
                    .client
                    .try_publish(&topic, QoS::AtMostOnce, false, payload, None)
                {
                    Ok(()) => {
                        self.cx.metrics.sent(1);
                        self.inflight.submit(None, QoS::AtMostOnce);
                        node.session.control_sent();
                    }
                    Err(e) => return self.submit_failed(e).map(|()| rate_wait),
                }
            }
            if !node.session.data_ready() {
                return Ok(rate_wait);
            }
        }
        if rate_wait.is_some() || self.cx.stop.is_cancelled() {
            return Ok(rate_wait);
        }
        while self.inflight.rows() < self.window {
            if self.buffer.is_empty() && !self.fill().await {
                break;
            }
            let Some(row) = self.buffer.front() else {
                break;
            };
            let seq = row.seq;
            // Rows that can never be delivered leave the queue, counted.
            if let Some(limit) = self.max_packet {
                let size = row.record.topic.len() + row.record.payload.len() + PACKET_OVERHEAD;
                if size > limit as usize {
                    tracing::warn!(uplink = %self.name(), seq, size, limit, "queued message exceeds the cloud's maximum packet size; dropped and counted as rejected");
                    self.settling.too_large.push(seq);
                    self.inflight.skip(seq);
                    self.buffer.pop_front();
                    self.cursor = seq;
                    continue;
                }
            }
            let mut properties = row.record.properties.clone();
            if let Some(expiry) = properties.as_ref().and_then(|p| p.message_expiry_interval) {
                let age = SystemTime::now()
                    .duration_since(row.enqueued_at)
                    .unwrap_or_default()
                    .as_secs();
                let left = u64::from(expiry).saturating_sub(age);
                if left == 0 {
                    self.settling.expired.push(seq);
                    self.inflight.skip(seq);
                    self.buffer.pop_front();
                    self.cursor = seq;
                    continue;
                }
                if let Some(p) = properties.as_mut() {
                    Arc::make_mut(p).message_expiry_interval =
                        Some(u32::try_from(left).unwrap_or(u32::MAX));
                }
            }
            if let Some(rate) = self.rate.as_mut() {
                if let Err(next) = rate.take() {
                    return Ok(Some(next));
                }
            }
            let mut qos = row.record.qos;
            let submitted = if let Some(node) = self.cx.node.as_mut() {
                // Sparkplug data goes with QoS 0; the row is done once written.
                qos = QoS::AtMostOnce;
                let (topic, payload) = match self.prepared.take() {
                    Some((prepared, topic, payload)) if prepared == seq => (topic, payload),
                    _ => match node.session.row(
                        &row.record.topic,
                        &row.record.payload,
                        row.enqueued_at,
                    ) {
                        RowMessage::Send { topic, payload } => (topic, payload),
                        RowMessage::Skip => {
                            self.settling.acked.push(seq);
                            self.inflight.skip(seq);
                            self.buffer.pop_front();
                            self.cursor = seq;
                            continue;
                        }
                    },
                };
                let result = self
                    .cx
                    .client
                    .try_publish(&topic, qos, false, payload.clone(), None);
                if result.is_err() {
                    self.prepared = Some((seq, topic, payload));
                }
                result
            } else {
                self.cx.client.try_publish(
                    &row.record.topic,
                    qos,
                    row.record.retain,
                    row.record.payload.clone(),
                    properties.as_deref(),
                )
            };
            match submitted {
                Ok(()) => {
                    self.cx.metrics.sent(1);
                    self.inflight.submit(Some(seq), qos);
                    self.cursor = seq;
                    self.buffer.pop_front();
                }
                Err(e) => {
                    self.submit_failed(e)?;
                    break;
                }
            }
        }
        Ok(None)
    }

    /// Read the next rows into the buffer. False when there is nothing to read now.
    async fn fill(&mut self) -> bool {
        if self.read_failed_at.is_some() {
            return false;
        }
        if self.rewind {
            // Everything up to the mark is acknowledged (its deletion may still be pending):
            // start after it. Rows read before are read again, even when the last read had
            // reached the end of the queue.
            self.cursor = self.inflight.mark();
            self.rewind = false;
            self.exhausted = false;
        }
        if self.exhausted {
            return false;
        }
        self.cx.appended.borrow_and_update();
        match self.cx.outbox.read_after(self.cursor, READ_BATCH).await {
            Ok(rows) => {
                self.read_failed_at = None;
                self.exhausted = rows.len() < READ_BATCH;
                let any = !rows.is_empty();
                self.buffer.extend(rows);
                any
            }
            Err(e) => {
                tracing::error!(uplink = %self.name(), error = %e, "cannot read the outbox");
                self.last_error = Some(e.to_string());
                if let Some(board) = &self.cx.board {
                    board.set_error(&format!("cannot read the outbox: {e}"));
                }
                self.read_failed_at = Some(Instant::now());
                false
            }
        }
    }

    fn submit_failed(&mut self, e: SubmitError) -> Result<(), UplinkError> {
        match e {
            SubmitError::Full => {
                self.blocked = true;
                Ok(())
            }
            SubmitError::Closed => Err(UplinkError::LinkStopped {
                uplink: self.name().to_string(),
            }),
        }
    }

    fn send_direct(&mut self, record: OutboxRecord) {
        let sent = self.connected
            && !self.cx.stop.is_cancelled()
            && self
                .cx
                .client
                .try_publish(
                    &record.topic,
                    QoS::AtMostOnce,
                    record.retain,
                    record.payload,
                    record.properties.as_deref(),
                )
                .is_ok();
        if sent {
            self.cx.metrics.sent(1);
            self.inflight.submit(None, QoS::AtMostOnce);
        } else {
            self.cx
                .counters
                .dropped_not_durable
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn publish_status_message(
        &mut self,
        will: &WillConfig,
        payload: Vec<u8>,
        properties: Option<&MessageProperties>,
    ) -> Result<(), SubmitError> {
        self.cx.client.try_publish(
            &will.topic,
            will.qos,
            will.retain,
            payload.into(),
            properties,
        )?;
        self.inflight.submit(None, will.qos);
        Ok(())
    }

    /// One delete transaction at a time; while it commits, more acks accumulate.
    fn start_deleting(&mut self) {
        if self.deleting.is_some() || self.settling.is_empty() {
            return;
        }
        let settling = std::mem::take(&mut self.settling);
        let outbox = self.cx.outbox.clone();
        let name = self.name().to_string();
        self.deleting = Some(tokio::spawn(async move {
            let result: Result<(), StoreError> = async {
                if !settling.acked.is_empty() {
                    outbox.delete(settling.acked).await?;
                }
                if !settling.refused.is_empty() {
                    outbox
                        .discard(settling.refused, DropReason::Rejected)
                        .await?;
                }
                if !settling.too_large.is_empty() {
                    outbox
                        .discard(settling.too_large, DropReason::Rejected)
                        .await?;
                }
                if !settling.expired.is_empty() {
                    outbox
                        .discard(settling.expired, DropReason::Expired)
                        .await?;
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                // The rows stay queued and are sent again after the next reconnect.
                tracing::error!(uplink = %name, error = %e, "cannot delete acknowledged rows from the outbox");
            }
        }));
    }

    /// One mark write at a time, covering every row resolved so far in order.
    fn start_marking(&mut self) {
        if self.marking.is_some() {
            return;
        }
        let Some((seq, covered)) = self.inflight.advance() else {
            return;
        };
        let mark = self.mark.clone();
        let name = self.name().to_string();
        self.marking = Some(tokio::spawn(async move {
            if let Err(e) = mark.write(seq).await {
                // The rows are deleted from the table anyway; only a restart before that
                // would send them again.
                tracing::error!(uplink = %name, error = %e, "cannot write the ack mark");
            }
            covered
        }));
    }

    fn marked(&mut self, covered: usize) {
        self.marking = None;
        self.inflight.marked(covered);
    }

    async fn publish_status(&mut self, force: bool) {
        let stats = match self.cx.outbox.stats().await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::debug!(uplink = %self.name(), error = %e, "no outbox stats for the status");
                return;
            }
        };
        let not_durable = self.cx.counters.dropped_not_durable.load(Ordering::Relaxed);
        self.cx.metrics.outbox(UplinkSnapshot {
            backlog_messages: stats.depth,
            backlog_bytes: stats.bytes,
            oldest_age_seconds: stats.oldest_age(SystemTime::now()).as_secs(),
            acknowledged: stats.acked,
            dropped_oldest: stats.dropped.oldest,
            dropped_new: stats.dropped.new,
            dropped_expired: stats.dropped.expired,
            dropped_rejected: stats.dropped.rejected,
            dropped_not_durable: not_durable,
        });
        let status = UplinkStatus::new(
            self.name(),
            self.connected,
            &stats,
            not_durable,
            self.last_error.clone(),
        );
        if let Some(board) = &self.cx.board {
            board.set_backlog(Backlog {
                messages: status.queue_depth,
                bytes: status.queue_bytes,
                oldest_age_s: status.oldest_age_s,
                dropped_total: status.dropped_total,
                acked_total: status.acked_total,
            });
        }
        let changed = self.last_status.as_ref().is_none_or_changed(&status);
        if !force && !changed {
            return;
        }
        let message = Message::internal(
            &self.cx.internal_name,
            self.cx.status_topic.clone(),
            status.to_json(),
            QoS::AtLeastOnce,
            true,
        );
        if let Err(e) = self.cx.broker.publish(message).await {
            tracing::debug!(uplink = %self.name(), error = %e, "cannot publish the uplink status");
        }
        self.last_status = Some(status);
    }

    /// Flush in-flight rows, publish `offline`, DISCONNECT, all within the stop budget.
    async fn shutdown(&mut self) {
        let deadline = Instant::now() + self.cx.stop_budget;
        let flush_until = deadline - self.cx.stop_budget / 2;
        // 1. Let the cloud acknowledge what is in flight (fewer duplicates after a restart).
        while self.connected && self.inflight.unacknowledged() > 0 && Instant::now() < flush_until {
            if !self.step(flush_until).await {
                break;
            }
        }
        // 2. An explicit offline status: a will is not sent on a clean disconnect.
        if self.connected {
            let offline = match (&self.cx.config.will, &self.cx.config.birth) {
                (Some(will), _) => Some((will.clone(), will.payload.clone())),
                (None, Some(birth)) => Some((birth.clone(), "offline".to_string())),
                (None, None) => None,
            };
            // MQTT 5: the reason tells this message apart from the will (same topic and
            // payload), which the cloud publishes when the connection is lost instead.
            let reason = MessageProperties {
                user_properties: vec![(
                    super::REASON_PROPERTY.to_string(),
                    super::REASON_SHUTDOWN.to_string(),
                )],
                ..MessageProperties::default()
            };
            // Sparkplug: the NDEATH of this connection (its bdSeq), as the will would say.
            let ndeath = self
                .cx
                .node
                .as_ref()
                .map(|node| node.session.ndeath().to_vec());
            if let Some((status, payload)) = offline {
                let payload = ndeath.unwrap_or_else(|| payload.into_bytes());
                let mut submitted = false;
                while !submitted && self.connected && Instant::now() < deadline {
                    match self.publish_status_message(&status, payload.clone(), Some(&reason)) {
                        Ok(()) => submitted = true,
                        Err(SubmitError::Full) => {
                            tokio::time::sleep(FULL_RETRY).await;
                        }
                        Err(SubmitError::Closed) => break,
                    }
                }
                let until = deadline - self.cx.stop_budget / 5;
                while submitted
                    && self.connected
                    && self.inflight.unacknowledged() > 0
                    && Instant::now() < until
                {
                    if !self.step(until).await {
                        break;
                    }
                }
            }
        }
        // 3. DISCONNECT (normal: the cloud discards the will).
        if self.connected {
            let mut sent = false;
            while !sent && Instant::now() < deadline {
                match self.cx.client.try_disconnect() {
                    Ok(()) => sent = true,
                    Err(SubmitError::Full) => tokio::time::sleep(FULL_RETRY).await,
                    Err(SubmitError::Closed) => break,
                }
            }
            while sent && !self.link_stopped && Instant::now() < deadline {
                if !self.step(deadline).await {
                    break;
                }
            }
            tracing::info!(uplink = %self.name(), "uplink disconnected cleanly");
        }
        // 4. Write the mark and commit the deletions of what was acknowledged.
        loop {
            self.start_marking();
            self.start_deleting();
            if self.marking.is_none() && self.deleting.is_none() {
                break;
            }
            if let Some(task) = self.marking.as_mut() {
                match tokio::time::timeout_at(deadline, task).await {
                    Ok(covered) => self.marked(covered.unwrap_or(0)),
                    Err(_) => break,
                }
            }
            if let Some(task) = self.deleting.as_mut() {
                if tokio::time::timeout_at(deadline, task).await.is_err() {
                    break;
                }
                self.deleting = None;
            }
        }
        self.connected = false;
        if let Some(board) = &self.cx.board {
            board.set_state(UplinkState::Stopped);
        }
        self.publish_status(true).await;
    }

    /// Wait for one event or deletion during shutdown. False when nothing more can come.
    async fn step(&mut self, until: Instant) -> bool {
        self.start_deleting();
        self.start_marking();
        tokio::select! {
            event = self.cx.events.recv() => match event {
                Some(event) => {
                    self.handle(event).await;
                    true
                }
                None => {
                    self.link_stopped = true;
                    false
                }
            },
            () = wait_deleting(&mut self.deleting) => {
                self.deleting = None;
                true
            }
            covered = wait_marking(&mut self.marking) => {
                self.marked(covered);
                true
            }
            _ = tokio::time::sleep_until(until) => false,
        }
    }
}

impl Sender {
    fn node_event(&mut self, event: sparkplug::Inbound) {
        let Some(node) = self.cx.node.as_mut() else {
            return;
        };
        match event {
            sparkplug::Inbound::HostState(online) => {
                if online {
                    tracing::info!(uplink = %self.cx.config.name, "the primary host is online");
                }
                // Births may follow: a message made before them would carry an old seq.
                self.prepared = None;
                self.buffer.clear();
                self.exhausted = false;
                node.session.host_state(online);
            }
            sparkplug::Inbound::Rebirth => {
                tracing::info!(uplink = %self.cx.config.name, "rebirth requested");
                // Rows read but not sent are read again (after the cursor) after the births.
                self.buffer.clear();
                self.exhausted = false;
                self.prepared = None;
                node.session.rebirth();
            }
            sparkplug::Inbound::Writes(_) => {}
        }
    }
}

async fn next_node_event(node: &mut Option<SenderNode>) -> Option<sparkplug::Inbound> {
    match node.as_mut() {
        Some(node) => node.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait_deleting(deleting: &mut Option<JoinHandle<()>>) {
    match deleting.as_mut() {
        Some(task) => {
            let _ = task.await;
        }
        None => std::future::pending().await,
    }
}

async fn wait_marking(marking: &mut Option<JoinHandle<usize>>) -> usize {
    match marking.as_mut() {
        Some(task) => task.await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `Option<&UplinkStatus>`: none yet, or different from `new`.
trait StatusChanged {
    fn is_none_or_changed(&self, new: &UplinkStatus) -> bool;
}

impl StatusChanged for Option<&UplinkStatus> {
    fn is_none_or_changed(&self, new: &UplinkStatus) -> bool {
        match self {
            None => true,
            Some(old) => old.connected != new.connected || old.last_error != new.last_error,
        }
    }
}
