//! A client session: what outlives one connection (subscriptions live in the router; the
//! delivery queue, the in-flight window and the QoS 2 receive state live here).
//!
//! The router pushes deliveries into the queue; the connection that currently owns the
//! session pulls from it as its in-flight window allows. The lock is a std mutex that is
//! never held across an `.await`.
//!
//! A persistent session's messages also live on disk (see `persist`), each under a `seq`.
//! Only some of them are kept in memory as well: a window per session, and past it as many
//! as a budget shared by all sessions allows ([`QueueMemory`]). Past that, new messages stay
//! on disk only (`spilled`) and are paged back in, in order, as the client takes them. That
//! keeps memory bounded however long a client is away, and spares the disk reads when the
//! client is back before memory ran out.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::model::{Message, QoS};
use crate::store::sessions::{InflightState, QueuedDelivery};

/// One message on its way to one client, with the QoS and flags it is delivered with.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) message: Message,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) subscription_ids: Vec<usize>,
    /// The row on disk, for a persistent session.
    pub(crate) seq: Option<u64>,
    /// The share of the queue memory budget this message holds while it is in memory
    /// beyond its session's own window; given back when it is dropped. Copies hold none.
    pub(crate) memory: Option<MemoryCharge>,
}

impl Clone for Delivery {
    fn clone(&self) -> Delivery {
        Delivery {
            message: self.message.clone(),
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
            seq: self.seq,
            memory: None,
        }
    }
}

/// Memory that queued messages of persistent sessions may take beyond each session's own
/// window, shared by all sessions (`[broker] queue_memory`).
#[derive(Debug)]
pub(crate) struct QueueMemory {
    used: AtomicU64,
    limit: u64,
}

/// Estimated memory of a queued message besides its topic and payload (the delivery, its
/// allocations and its place in the queue; measured at about 250 bytes on x86-64).
const QUEUED_OVERHEAD: u64 = 256;

impl QueueMemory {
    pub(crate) fn new(limit: u64) -> Arc<QueueMemory> {
        Arc::new(QueueMemory {
            used: AtomicU64::new(0),
            limit,
        })
    }

    /// Reserve room for `delivery`, if the budget has it.
    fn charge(self: &Arc<Self>, delivery: &Delivery) -> Option<MemoryCharge> {
        let bytes = delivery.size() + QUEUED_OVERHEAD;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.limit).then_some(used + bytes)
            })
            .ok()?;
        Some(MemoryCharge {
            pool: self.clone(),
            bytes,
        })
    }

    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Room held in a [`QueueMemory`]; released on drop (not `Clone`: held once).
#[derive(Debug)]
pub(crate) struct MemoryCharge {
    pool: Arc<QueueMemory>,
    bytes: u64,
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        self.pool.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Delivery {
    fn size(&self) -> u64 {
        (self.message.topic.len() + self.message.payload.len()) as u64
    }

    /// What the store writes for this delivery under row `seq`. Costs what a clone does:
    /// the topic and payload are shared, not copied.
    pub(crate) fn queued(&self, seq: u64) -> QueuedDelivery {
        QueuedDelivery {
            message: self.message.clone(),
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
            seq,
        }
    }
}

/// A delivery loaded from the store: it holds no share of the queue memory budget yet.
impl From<QueuedDelivery> for Delivery {
    fn from(queued: QueuedDelivery) -> Delivery {
        Delivery {
            message: queued.message,
            qos: queued.qos,
            retain: queued.retain,
            subscription_ids: queued.subscription_ids,
            seq: Some(queued.seq),
            memory: None,
        }
    }
}

/// What the connection did with a delivery handed to it by [`Session::send_queued`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handed {
    /// Encoded for the client (in flight from now on, for QoS 1 and 2).
    Sent,
    /// Not for this client (ACL, too large for it): done as if delivered.
    Dropped,
}

/// What one [`Session::send_queued`] did.
#[derive(Debug, Default)]
pub(crate) struct SendReport {
    /// Deliveries handed to the connection (sent or dropped).
    pub(crate) handed: usize,
    /// Rows of messages that expired in the queue.
    pub(crate) expired: Vec<u64>,
    /// Rows of messages the connection dropped.
    pub(crate) dropped: Vec<u64>,
    /// QoS 2 messages now in flight: (row, packet id).
    pub(crate) qos2_sent: Vec<(u64, u16)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub(crate) pkid: u16,
    pub(crate) delivery: Delivery,
    pub(crate) state: InflightState,
}

/// What queueing one delivery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Enqueued {
    pub(crate) queued: bool,
    /// The row of a dropped in-memory delivery, to delete.
    pub(crate) dropped_seq: Option<u64>,
    /// The oldest message on disk was dropped: delete the oldest row after this seq.
    pub(crate) dropped_on_disk_after: Option<u64>,
    /// A connected client's queue is at its bound: the publisher of this message should
    /// wait ([`Session::wait_for_room`]) before it sends more.
    pub(crate) congested: bool,
}

/// Left by the router for a client connection that publishes: a session its messages found
/// full. The connection waits for room there before it reads more ([`Session::wait_for_room`]).
///
/// It also bounds how far a publisher runs ahead of the router ([`ROUTING_WINDOW`]
/// publishes sent and not yet routed), so that it learns of a full queue before it has
/// pushed many more messages into it.
#[derive(Debug, Default)]
pub(crate) struct Congestion {
    /// Set with the session: lets the connection skip the lock on every turn.
    flagged: std::sync::atomic::AtomicBool,
    session: Mutex<Option<Arc<Session>>>,
    /// Publishes sent to the router and not yet routed.
    routing: std::sync::atomic::AtomicUsize,
    routed: Notify,
}

/// Publishes one client connection may have on their way to the router.
pub(crate) const ROUTING_WINDOW: usize = 128;

impl Congestion {
    /// Before sending a publish to the router: wait while [`ROUTING_WINDOW`] are on their
    /// way, then count this one.
    pub(crate) async fn reserve(&self) {
        loop {
            let routed = self.routed.notified();
            tokio::pin!(routed);
            routed.as_mut().enable();
            if self.routing.load(Ordering::Acquire) < ROUTING_WINDOW {
                break;
            }
            routed.await;
        }
        self.routing.fetch_add(1, Ordering::AcqRel);
    }

    /// The router has routed one publish of this connection.
    pub(crate) fn routed(&self) {
        if self.routing.fetch_sub(1, Ordering::AcqRel) == ROUTING_WINDOW {
            self.routed.notify_one();
        }
    }

    pub(crate) fn set(&self, session: &Arc<Session>) {
        let mut slot = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(session.clone());
            self.flagged.store(true, Ordering::Release);
        }
    }

    pub(crate) fn take(&self) -> Option<Arc<Session>> {
        if !self.flagged.load(Ordering::Acquire) {
            return None;
        }
        self.flagged.store(false, Ordering::Release);
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// The most retained messages one page places in a session queue (see
/// [`Session::retained_room`]).
pub(crate) const RETAINED_PAGE: usize = 500;

/// How many retained messages a page may place in a session queue now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetainedRoom {
    pub(crate) messages: usize,
    pub(crate) bytes: u64,
}

/// How a wait for room in a congested session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// The client took messages: there is room again.
    Made,
    /// The client is offline (its queue now drops the oldest instead).
    ClientGone,
    /// The client took nothing for the slow-client timeout: this wait disconnected it.
    Evicted,
}

#[derive(Debug, Default)]
pub(crate) struct SessionState {
    /// Waiting to be sent, oldest first.
    pub(crate) queue: VecDeque<Delivery>,
    queued_bytes: u64,
    /// Messages on disk only, newer than everything in `queue`.
    pub(crate) spilled: u64,
    /// The highest seq that has been in memory: where the next page starts.
    disk_cursor: u64,
    /// Sent and not yet fully acknowledged, in send order.
    pub(crate) inflight: VecDeque<Inflight>,
    next_pkid: u16,
    /// QoS 2 packet ids received and PUBREC'd, waiting for PUBREL.
    pub(crate) incoming_qos2: HashSet<u16>,
    /// Messages dropped because the queue was full.
    pub(crate) dropped: u64,
    pub(crate) connected: bool,
    /// When the connection last took messages from the queue (or connected).
    last_progress: Option<tokio::time::Instant>,
    /// Cancelled to disconnect the current connection when it does not read.
    evict: Option<CancellationToken>,
    /// The router holds retained messages still to be placed for this session's
    /// subscriptions (set by the router).
    retained_pending: bool,
    /// The connection has asked the router for the next page of them, not yet placed.
    retained_asked: bool,
}

/// Bounds of one session's queue.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: u64,
    /// Persistent messages kept in memory in any case; more only as `queue_memory` allows.
    pub(crate) memory_window: usize,
    pub(crate) queue_memory: Arc<QueueMemory>,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client_id: Arc<str>,
    limits: Limits,
    state: Mutex<SessionState>,
    /// The connection currently allowed to send from this session (0: none).
    owner: AtomicU64,
    pub(crate) wake: Notify,
    /// Notified when the connection takes messages from the queue.
    drained: Notify,
}

impl Session {
    pub(crate) fn new(client_id: Arc<str>, limits: Limits) -> Session {
        Session {
            client_id,
            limits: Limits {
                max_messages: limits.max_messages.max(1),
                max_bytes: limits.max_bytes.max(1),
                memory_window: limits.memory_window.max(1),
                queue_memory: limits.queue_memory,
            },
            state: Mutex::new(SessionState::default()),
            owner: AtomicU64::new(0),
            wake: Notify::new(),
            drained: Notify::new(),
        }
    }

    /// Wait until a connected client's queue is below its bound again: the backpressure on a
    /// publisher whose message found it full (the publisher's connection waits, never the
    /// router). When the client has taken nothing for `slow_client_timeout` it is
    /// disconnected (its session keeps the queue, which then drops the oldest past the
    /// bound) and the wait ends.
    pub(crate) async fn wait_for_room(&self, slow_client_timeout: std::time::Duration) -> Room {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let deadline = {
                let state = self.lock();
                if !state.connected {
                    return Room::ClientGone;
                }
                if !self.is_full(&state) {
                    return Room::Made;
                }
                state
                    .last_progress
                    .unwrap_or_else(tokio::time::Instant::now)
                    + slow_client_timeout
            };
            if tokio::time::timeout_at(deadline, drained).await.is_ok() {
                continue;
            }
            let mut state = self.lock();
            let stalled = state
                .last_progress
                .is_none_or(|at| at + slow_client_timeout <= tokio::time::Instant::now());
            if state.connected && self.is_full(&state) && stalled {
                // Offline from now on for everyone waiting: the connection closes when it
                // sees the token, and the router learns it then.
                state.connected = false;
                return match state.evict.take() {
                    Some(token) => {
                        token.cancel();
                        Room::Evicted
                    }
                    None => Room::ClientGone,
                };
            }
        }
    }

    /// At the bound where publishers wait (QoS 1/2 for a connected client).
    fn is_full(&self, state: &SessionState) -> bool {
        state.queue.len() as u64 + state.spilled >= self.limits.max_messages as u64
            || state.queued_bytes >= self.limits.max_bytes
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        // A poisoned lock means a panic elsewhere while holding it; the state itself is
        // still consistent (every mutation is a single push/pop), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection now serving this session (0: none), and the token that disconnects
    /// it when it stops reading.
    pub(crate) fn set_owner(&self, connection: u64, evict: Option<CancellationToken>) {
        self.owner.store(connection, Ordering::SeqCst);
        let mut state = self.lock();
        state.connected = connection != 0;
        state.evict = evict;
        state.last_progress = Some(tokio::time::Instant::now());
    }

    pub(crate) fn is_owner(&self, connection: u64) -> bool {
        self.owner.load(Ordering::SeqCst) == connection
    }

    /// Restore what was on disk at start: in-flight entries, queued ones, and how many more
    /// wait on disk.
    pub(crate) fn restore(&self, inflight: Vec<Inflight>, queued: Vec<Delivery>, spilled: u64) {
        let mut state = self.lock();
        for entry in &inflight {
            state.next_pkid = state.next_pkid.max(entry.pkid);
            if let Some(seq) = entry.delivery.seq {
                state.disk_cursor = state.disk_cursor.max(seq);
            }
        }
        state.inflight = inflight.into();
        for delivery in queued {
            if let Some(seq) = delivery.seq {
                state.disk_cursor = state.disk_cursor.max(seq);
            }
            state.queued_bytes += delivery.size();
            state.queue.push_back(delivery);
        }
        state.spilled = spilled;
    }

    /// Queue a delivery. QoS 0 is not queued for a disconnected client. When the queue is
    /// full the oldest entry is dropped and counted.
    pub(crate) fn enqueue(&self, delivery: Delivery) -> Enqueued {
        let mut outcome = Enqueued::default();
        let mut state = self.lock();
        if !state.connected && delivery.qos == QoS::AtMostOnce {
            return outcome;
        }
        let total = state.queue.len() as u64 + state.spilled;
        // A connected client's QoS 1/2 queue may overshoot its bound (by as much again, and a
        // few routing windows) while the publishers that fill it are held back: they learn
        // of it after routing. An offline client's queue, and QoS 0, drop the oldest at the
        // bound.
        let (max_messages, max_bytes) = if state.connected && delivery.qos != QoS::AtMostOnce {
            (
                2 * self.limits.max_messages as u64 + 2 * ROUTING_WINDOW as u64,
                self.limits.max_bytes.saturating_mul(2),
            )
        } else {
            (self.limits.max_messages as u64, self.limits.max_bytes)
        };
        if total >= max_messages
            || (state.queued_bytes + delivery.size() > max_bytes && !state.queue.is_empty())
        {
            if let Some(oldest) = state.queue.pop_front() {
                state.queued_bytes = state.queued_bytes.saturating_sub(oldest.size());
                outcome.dropped_seq = oldest.seq;
            } else if state.spilled > 0 {
                state.spilled -= 1;
                outcome.dropped_on_disk_after = Some(state.disk_cursor);
            }
            state.dropped += 1;
            if state.dropped.is_power_of_two() {
                tracing::warn!(
                    client = %self.client_id,
                    dropped = state.dropped,
                    max_messages = self.limits.max_messages,
                    max_bytes = self.limits.max_bytes,
                    "client queue full, dropping oldest messages"
                );
            }
        }
        let qos = delivery.qos;
        let mut delivery = delivery;
        let on_disk_only = match delivery.seq {
            None => false,
            // Later messages may not overtake those waiting on disk.
            Some(_) if state.spilled > 0 => true,
            Some(_) if state.queue.len() < self.limits.memory_window => false,
            Some(_) => {
                delivery.memory = self.limits.queue_memory.charge(&delivery);
                delivery.memory.is_none()
            }
        };
        if on_disk_only {
            state.spilled += 1;
        } else {
            if let Some(seq) = delivery.seq {
                state.disk_cursor = state.disk_cursor.max(seq);
            }
            state.queued_bytes += delivery.size();
            state.queue.push_back(delivery);
        }
        outcome.queued = true;
        outcome.congested = state.connected && qos != QoS::AtMostOnce && self.is_full(&state);
        drop(state);
        self.wake.notify_one();
        outcome
    }

    /// Retained messages delivered on subscribe fill at most half the queue's bounds (at
    /// most [`RETAINED_PAGE`]): the other half is left to live messages, so that these
    /// neither push retained ones out (QoS 0 drops the oldest at the bound) nor make their
    /// publishers wait for room the retained ones took.
    fn retained_target(&self) -> (usize, u64) {
        (
            (self.limits.max_messages / 2).clamp(1, RETAINED_PAGE),
            (self.limits.max_bytes / 2).max(1),
        )
    }

    /// How many retained messages the router may place now: what is left of the half of
    /// the queue's bounds given to them ([`Self::retained_target`]).
    pub(crate) fn retained_room(&self) -> RetainedRoom {
        let (messages, bytes) = self.retained_target();
        let state = self.lock();
        let queued = state.queue.len() as u64 + state.spilled;
        RetainedRoom {
            messages: usize::try_from((messages as u64).saturating_sub(queued)).unwrap_or(0),
            bytes: bytes.saturating_sub(state.queued_bytes),
        }
    }

    /// Whether the connection should ask the router for the next page of retained
    /// messages: some are owed, none is asked for already, and the queue has drained to
    /// half of what a page fills it to. Counts the page as asked for when it answers yes.
    pub(crate) fn retained_page_wanted(&self) -> bool {
        let (messages, bytes) = self.retained_target();
        let mut state = self.lock();
        let queued = state.queue.len() as u64 + state.spilled;
        let wanted = state.retained_pending
            && !state.retained_asked
            && queued <= messages as u64 / 2
            && state.queued_bytes <= bytes / 2;
        if wanted {
            state.retained_asked = true;
        }
        wanted
    }

    /// The router has placed a page of retained messages (or the session has a new
    /// connection): `more` says whether any are still owed. Wakes the connection, which asks
    /// for the next page when its queue has drained.
    pub(crate) fn retained_paged(&self, more: bool) {
        {
            let mut state = self.lock();
            state.retained_pending = more;
            state.retained_asked = false;
        }
        self.wake.notify_one();
    }

    /// When fewer than `low_water` messages are queued in memory and more wait on disk:
    /// the seq to page after.
    pub(crate) fn page_wanted(&self, low_water: usize) -> Option<u64> {
        let state = self.lock();
        (state.queue.len() < low_water && state.spilled > 0).then_some(state.disk_cursor)
    }

    /// Add a page read from disk (rows after the cursor, oldest first).
    pub(crate) fn add_page(&self, rows: Vec<Delivery>) {
        let mut state = self.lock();
        for delivery in rows {
            let Some(seq) = delivery.seq else { continue };
            if seq <= state.disk_cursor {
                continue;
            }
            state.disk_cursor = seq;
            state.spilled = state.spilled.saturating_sub(1);
            state.queued_bytes += delivery.size();
            state.queue.push_back(delivery);
        }
    }

    /// Hand the deliveries that may be sent now to `send`, in order: QoS 0 always, QoS 1/2
    /// while fewer than `window` are in flight. Assigns packet ids; what `send` took is
    /// recorded in flight (moved there, not copied: `send` encodes it while the session is
    /// locked). Expired messages are discarded.
    pub(crate) fn send_queued(
        &self,
        connection: u64,
        window: usize,
        now: Instant,
        mut send: impl FnMut(&Inflight) -> Handed,
    ) -> SendReport {
        let mut report = SendReport::default();
        if !self.is_owner(connection) {
            return report;
        }
        let mut state = self.lock();
        while let Some(front) = state.queue.front() {
            if front.qos != QoS::AtMostOnce
                && !front.message.is_expired(now)
                && state.inflight.len() >= window
            {
                break;
            }
            let Some(delivery) = state.queue.pop_front() else {
                break;
            };
            state.queued_bytes = state.queued_bytes.saturating_sub(delivery.size());
            if delivery.message.is_expired(now) {
                report.expired.extend(delivery.seq);
                continue;
            }
            let pkid = if delivery.qos == QoS::AtMostOnce {
                0
            } else {
                match state.allocate_pkid() {
                    Some(pkid) => pkid,
                    None => {
                        state.queued_bytes += delivery.size();
                        state.queue.push_front(delivery);
                        break;
                    }
                }
            };
            let entry = Inflight {
                pkid,
                state: if delivery.qos == QoS::ExactlyOnce {
                    InflightState::Qos2Sent
                } else {
                    InflightState::Qos1Sent
                },
                delivery,
            };
            report.handed += 1;
            match send(&entry) {
                Handed::Dropped => report.dropped.extend(entry.delivery.seq),
                Handed::Sent if entry.delivery.qos == QoS::AtMostOnce => {}
                Handed::Sent => {
                    if let (Some(seq), QoS::ExactlyOnce) = (entry.delivery.seq, entry.delivery.qos)
                    {
                        report.qos2_sent.push((seq, entry.pkid));
                    }
                    state.inflight.push_back(entry);
                }
            }
        }
        if report.handed > 0 || !report.expired.is_empty() {
            state.last_progress = Some(tokio::time::Instant::now());
            drop(state);
            self.drained.notify_waiters();
        }
        report
    }

    /// `send_queued` for tests: the entries sent, and the rows of expired messages.
    #[cfg(test)]
    pub(crate) fn take_sendable(
        &self,
        connection: u64,
        window: usize,
        now: Instant,
    ) -> (Vec<Inflight>, Vec<u64>) {
        let mut sent = Vec::new();
        let report = self.send_queued(connection, window, now, |entry| {
            sent.push(entry.clone());
            Handed::Sent
        });
        (sent, report.expired)
    }

    /// The highest seq such that every message of this session up to it is done: the one
    /// before the oldest still in flight or queued, or everything that has been in memory.
    /// (Messages reach memory in seq order, and everything on disk only is newer.)
    pub(crate) fn done_through(&self) -> u64 {
        let state = self.lock();
        let oldest_pending = state
            .inflight
            .iter()
            .find_map(|i| i.delivery.seq)
            .or_else(|| state.queue.iter().find_map(|d| d.seq));
        match oldest_pending {
            Some(seq) => seq.saturating_sub(1),
            None => state.disk_cursor,
        }
    }

    /// Everything in flight, to resend after a reconnect.
    pub(crate) fn inflight_snapshot(&self) -> Vec<Inflight> {
        self.lock().inflight.iter().cloned().collect()
    }

    /// PUBACK received: `Some(row)` (the row may be `None` for a non-persistent message)
    /// when the packet id was in flight.
    pub(crate) fn ack(&self, pkid: u16) -> Option<Option<u64>> {
        self.remove_inflight(pkid, InflightState::Qos1Sent)
    }

    /// PUBREC received: the message now waits for PUBCOMP.
    pub(crate) fn received(&self, pkid: u16) -> Option<Option<u64>> {
        let mut state = self.lock();
        let entry = state
            .inflight
            .iter_mut()
            .find(|i| i.pkid == pkid && i.state != InflightState::Qos1Sent)?;
        entry.state = InflightState::Released;
        Some(entry.delivery.seq)
    }

    /// PUBCOMP received.
    pub(crate) fn completed(&self, pkid: u16) -> Option<Option<u64>> {
        self.remove_inflight(pkid, InflightState::Released)
    }

    fn remove_inflight(&self, pkid: u16, state_wanted: InflightState) -> Option<Option<u64>> {
        let mut state = self.lock();
        let index = state
            .inflight
            .iter()
            .position(|i| i.pkid == pkid && i.state == state_wanted)?;
        state.inflight.remove(index).map(|entry| entry.delivery.seq)
    }

    #[cfg(test)]
    pub(crate) fn queued_len(&self) -> usize {
        self.lock().queue.len()
    }
}

impl SessionState {
    /// Bytes (payload and topic) of the messages waiting in memory.
    pub(crate) fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    fn allocate_pkid(&mut self) -> Option<u16> {
        // Packet ids 1..=65535, skipping ids still in flight.
        for _ in 0..u16::MAX {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let candidate = self.next_pkid;
            if !self.inflight.iter().any(|i| i.pkid == candidate) {
                return Some(candidate);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A window of 4 in memory and no shared queue memory beyond it.
    fn limits() -> Limits {
        Limits {
            max_messages: 100,
            max_bytes: 1 << 20,
            memory_window: 4,
            queue_memory: QueueMemory::new(0),
        }
    }

    fn delivery(n: u64, qos: QoS, seq: Option<u64>) -> Delivery {
        Delivery {
            message: Message::internal("test", format!("t/{n}"), "x", qos, false),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            seq,
            memory: None,
        }
    }

    #[test]
    fn the_in_flight_window_is_never_exceeded() {
        let session = Session::new(Arc::from("c"), limits());
        session.set_owner(7, None);
        for n in 0..4 {
            session.enqueue(delivery(n, QoS::AtLeastOnce, None));
        }
        let (first, _) = session.take_sendable(7, 3, Instant::now());
        assert_eq!(first.len(), 3);
        assert!(session.take_sendable(7, 3, Instant::now()).0.is_empty());
        assert!(session.ack(first[0].pkid).is_some());
        assert_eq!(session.take_sendable(7, 3, Instant::now()).0.len(), 1);
        assert_eq!(session.queued_len(), 0);
    }

    #[test]
    fn a_full_queue_of_an_offline_client_drops_the_oldest_and_counts_it() {
        let limits = Limits {
            max_messages: 2,
            ..limits()
        };
        let session = Session::new(Arc::from("c"), limits);
        for n in 0..2 {
            session.enqueue(delivery(n, QoS::AtLeastOnce, Some(n + 1)));
        }
        let outcome = session.enqueue(delivery(2, QoS::AtLeastOnce, Some(3)));
        assert_eq!(outcome.dropped_seq, Some(1));
        let state = session.lock();
        assert_eq!(state.dropped, 1);
        assert_eq!(&*state.queue[0].message.topic, "t/1");
    }

    #[test]
    fn a_connected_client_at_its_bound_reports_congestion_and_drops_only_past_the_headroom() {
        let limits = Limits {
            max_messages: 2,
            ..limits()
        };
        let session = Session::new(Arc::from("c"), limits);
        session.set_owner(1, None);
        let first = session.enqueue(delivery(0, QoS::AtLeastOnce, None));
        assert!(!first.congested);
        let second = session.enqueue(delivery(1, QoS::AtLeastOnce, None));
        assert!(second.congested, "at the bound: the publisher is to wait");
        let headroom = 2 * 2 + 2 * ROUTING_WINDOW;
        for n in 2..headroom {
            let outcome = session.enqueue(delivery(n as u64, QoS::AtLeastOnce, None));
            assert_eq!(outcome.dropped_seq, None);
            assert_eq!(
                session.lock().dropped,
                0,
                "nothing dropped below the headroom"
            );
        }
        session.enqueue(delivery(9999, QoS::AtLeastOnce, None));
        assert_eq!(
            session.lock().dropped,
            1,
            "past the headroom, the oldest goes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_room_ends_when_the_client_takes_messages_or_evicts_a_stalled_one() {
        let limits = Limits {
            max_messages: 1,
            ..limits()
        };
        let session = Arc::new(Session::new(Arc::from("c"), limits));
        let evict = CancellationToken::new();
        session.set_owner(1, Some(evict.clone()));
        session.enqueue(delivery(0, QoS::AtLeastOnce, None));
        let waiting = {
            let session = session.clone();
            tokio::spawn(async move { session.wait_for_room(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(session.take_sendable(1, 10, Instant::now()).0.len(), 1);
        assert_eq!(waiting.await.expect("task"), Room::Made);

        // Full again, and the client takes nothing: evicted after the timeout, once.
        session.enqueue(delivery(1, QoS::AtLeastOnce, None));
        let started = tokio::time::Instant::now();
        assert_eq!(
            session.wait_for_room(Duration::from_secs(10)).await,
            Room::Evicted
        );
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert!(evict.is_cancelled());
        assert_eq!(
            session.wait_for_room(Duration::from_secs(10)).await,
            Room::ClientGone
        );
    }

    #[test]
    fn retained_pages_fill_half_the_queue_and_the_next_is_asked_for_once_it_drains_to_a_quarter() {
        let session = Session::new(Arc::from("c"), limits());
        session.set_owner(1, None);
        assert_eq!(
            session.retained_room(),
            RetainedRoom {
                messages: 50,
                bytes: 1 << 19
            },
            "half of the bounds of 100 messages and 1 MiB"
        );
        assert!(!session.retained_page_wanted(), "none owed");
        session.retained_paged(true);
        for n in 0..50 {
            session.enqueue(delivery(n, QoS::AtLeastOnce, None));
        }
        assert_eq!(session.retained_room().messages, 0);
        assert!(!session.retained_page_wanted(), "the queue holds a page");
        assert_eq!(session.take_sendable(1, 24, Instant::now()).0.len(), 24);
        assert!(!session.retained_page_wanted(), "26 left, above a quarter");
        assert_eq!(session.take_sendable(1, 25, Instant::now()).0.len(), 1);
        assert!(session.retained_page_wanted(), "25 left: the next page");
        assert!(
            !session.retained_page_wanted(),
            "asked for once until it is placed"
        );
        assert_eq!(session.retained_room().messages, 25);
        session.retained_paged(true);
        assert!(session.retained_page_wanted(), "placed, more owed");
        session.retained_paged(false);
        assert!(!session.retained_page_wanted(), "none owed any more");
    }

    #[test]
    fn a_queue_holding_half_its_byte_bound_asks_for_no_retained_page() {
        let limits = Limits {
            max_bytes: 40,
            ..limits()
        };
        let session = Session::new(Arc::from("c"), limits);
        session.set_owner(1, None);
        session.retained_paged(true);
        // "t/1" + "x": 4 bytes each; a quarter of the byte bound is 10.
        for n in 0..3 {
            session.enqueue(delivery(n, QoS::AtLeastOnce, None));
        }
        assert_eq!(session.retained_room().bytes, 8);
        assert!(!session.retained_page_wanted(), "12 bytes queued");
        assert_eq!(session.take_sendable(1, 1, Instant::now()).0.len(), 1);
        assert!(session.retained_page_wanted(), "8 bytes queued");
    }

    #[test]
    fn qos0_is_not_queued_for_an_offline_client() {
        let session = Session::new(Arc::from("c"), limits());
        assert!(!session.enqueue(delivery(0, QoS::AtMostOnce, None)).queued);
        assert!(session.enqueue(delivery(1, QoS::AtLeastOnce, None)).queued);
    }

    #[test]
    fn a_connection_that_lost_ownership_takes_nothing() {
        let session = Session::new(Arc::from("c"), limits());
        session.set_owner(1, None);
        session.enqueue(delivery(0, QoS::AtLeastOnce, None));
        session.set_owner(2, None);
        assert!(session.take_sendable(1, 10, Instant::now()).0.is_empty());
        assert_eq!(session.take_sendable(2, 10, Instant::now()).0.len(), 1);
    }

    #[test]
    fn done_through_stops_before_the_oldest_message_still_pending() {
        let session = Session::new(Arc::from("c"), limits());
        session.set_owner(1, None);
        for seq in [10, 12, 15] {
            session.enqueue(delivery(seq, QoS::AtLeastOnce, Some(seq)));
        }
        assert_eq!(session.done_through(), 9, "nothing sent yet");
        let (sent, _) = session.take_sendable(1, 2, Instant::now());
        assert_eq!(session.done_through(), 9, "10 and 12 in flight");
        assert!(session.ack(sent[1].pkid).is_some());
        assert_eq!(session.done_through(), 9, "12 acknowledged out of order");
        assert!(session.ack(sent[0].pkid).is_some());
        assert_eq!(session.done_through(), 14, "only 15 left, queued");
        let (sent, _) = session.take_sendable(1, 2, Instant::now());
        assert!(session.ack(sent[0].pkid).is_some());
        assert_eq!(session.done_through(), 15, "everything that was in memory");
    }

    #[test]
    fn persistent_messages_past_the_memory_window_stay_on_disk_and_page_in_in_order() {
        let session = Session::new(Arc::from("c"), limits());
        for seq in 1..=10 {
            session.enqueue(delivery(seq, QoS::AtLeastOnce, Some(seq)));
        }
        {
            let state = session.lock();
            assert_eq!(state.queue.len(), 4);
            assert_eq!(state.spilled, 6);
        }
        session.set_owner(1, None);
        let (sent, _) = session.take_sendable(1, 100, Instant::now());
        assert_eq!(sent.len(), 4);
        assert_eq!(session.page_wanted(1), Some(4));
        session.add_page(
            (5..=7)
                .map(|s| delivery(s, QoS::AtLeastOnce, Some(s)))
                .collect(),
        );
        let (sent, _) = session.take_sendable(1, 100, Instant::now());
        let seqs: Vec<u64> = sent.iter().filter_map(|i| i.delivery.seq).collect();
        assert_eq!(seqs, vec![5, 6, 7]);
        assert_eq!(session.page_wanted(1), Some(7));
    }

    #[test]
    fn the_shared_queue_memory_keeps_more_in_memory_and_is_given_back_when_delivered() {
        // Topics of one length (t/NN): every message costs the same share.
        let per_message = delivery(11, QoS::AtLeastOnce, Some(11)).size() + QUEUED_OVERHEAD;
        let pool = QueueMemory::new(3 * per_message);
        let limits = Limits {
            queue_memory: pool.clone(),
            ..limits()
        };
        let first = Session::new(Arc::from("a"), limits.clone());
        let second = Session::new(Arc::from("b"), limits);
        for seq in 11..=16 {
            first.enqueue(delivery(seq, QoS::AtLeastOnce, Some(seq)));
        }
        {
            let state = first.lock();
            assert_eq!(state.queue.len(), 6, "4 in the window, 2 more in the pool");
            assert_eq!(state.spilled, 0);
        }
        for seq in 21..=26 {
            second.enqueue(delivery(seq, QoS::AtLeastOnce, Some(seq)));
        }
        {
            let state = second.lock();
            assert_eq!(
                state.queue.len(),
                5,
                "4 in the window, the pool's last share"
            );
            assert_eq!(state.spilled, 1);
        }
        assert_eq!(pool.used(), 3 * per_message);
        // Sent, the messages hold their share until acknowledged; then it is free again.
        first.set_owner(1, None);
        let (sent, _) = first.take_sendable(1, 100, Instant::now());
        drop(sent);
        assert_eq!(pool.used(), 3 * per_message, "in flight still in memory");
        for pkid in 1..=6 {
            first.ack(pkid);
        }
        assert_eq!(pool.used(), per_message);
        // Once spilled, later messages stay behind the ones on disk, pool or not.
        second.enqueue(delivery(27, QoS::AtLeastOnce, Some(27)));
        assert_eq!(second.lock().spilled, 2);
    }
}
