//! A client session: what outlives one connection (subscriptions live in the router; the
//! delivery queue, the in-flight window and the QoS 2 receive state live here).
//!
//! The router pushes deliveries into the queue; the connection that currently owns the
//! session pulls from it as its in-flight window allows. The lock is a std mutex that is
//! never held across an `.await`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::model::{Message, QoS};

/// One message on its way to one client, with the QoS and flags it is delivered with.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) message: Message,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) subscription_ids: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What an in-flight message waits for.
pub(crate) enum InflightState {
    /// QoS 1 sent, waiting for PUBACK.
    Qos1Sent,
    /// QoS 2 sent, waiting for PUBREC.
    Qos2Sent,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub(crate) pkid: u16,
    pub(crate) delivery: Delivery,
    pub(crate) state: InflightState,
}

#[derive(Debug, Default)]
pub(crate) struct SessionState {
    /// Waiting to be sent, oldest first.
    pub(crate) queue: VecDeque<Delivery>,
    /// Sent and not yet fully acknowledged, in send order.
    pub(crate) inflight: VecDeque<Inflight>,
    next_pkid: u16,
    /// QoS 2 packet ids received and PUBREC'd, waiting for PUBREL.
    pub(crate) incoming_qos2: HashSet<u16>,
    /// Messages dropped because the queue was full.
    pub(crate) dropped: u64,
    pub(crate) connected: bool,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client_id: Arc<str>,
    max_queued: usize,
    state: Mutex<SessionState>,
    /// The connection currently allowed to send from this session (0: none).
    owner: AtomicU64,
    pub(crate) wake: Notify,
}

impl Session {
    pub(crate) fn new(client_id: Arc<str>, max_queued: usize) -> Session {
        Session {
            client_id,
            max_queued: max_queued.max(1),
            state: Mutex::new(SessionState::default()),
            owner: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        // A poisoned lock means a panic elsewhere while holding it; the state itself is
        // still consistent (every mutation is a single push/pop), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_owner(&self, connection: u64) {
        self.owner.store(connection, Ordering::SeqCst);
        self.lock().connected = connection != 0;
    }

    pub(crate) fn is_owner(&self, connection: u64) -> bool {
        self.owner.load(Ordering::SeqCst) == connection
    }

    /// Queue a delivery. QoS 0 is not queued for a disconnected client. When the queue is
    /// full the oldest entry is dropped and counted. Returns false if nothing was queued.
    pub(crate) fn enqueue(&self, delivery: Delivery) -> bool {
        let mut state = self.lock();
        if !state.connected && delivery.qos == QoS::AtMostOnce {
            return false;
        }
        if state.queue.len() >= self.max_queued {
            state.queue.pop_front();
            state.dropped += 1;
            if state.dropped.is_power_of_two() {
                tracing::warn!(
                    client = %self.client_id,
                    dropped = state.dropped,
                    limit = self.max_queued,
                    "client queue full, dropping oldest messages"
                );
            }
        }
        state.queue.push_back(delivery);
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Take the deliveries that may be sent now: QoS 0 always, QoS 1/2 while fewer than
    /// `window` are in flight. Assigns packet ids and records them in flight. Expired
    /// messages are discarded.
    pub(crate) fn take_sendable(
        &self,
        connection: u64,
        window: usize,
        now: Instant,
    ) -> Vec<Inflight> {
        let mut out = Vec::new();
        if !self.is_owner(connection) {
            return out;
        }
        let mut state = self.lock();
        while let Some(front) = state.queue.front() {
            if front.message.is_expired(now) {
                state.queue.pop_front();
                continue;
            }
            if front.qos != QoS::AtMostOnce && state.inflight.len() >= window {
                break;
            }
            let Some(delivery) = state.queue.pop_front() else {
                break;
            };
            if delivery.qos == QoS::AtMostOnce {
                out.push(Inflight {
                    pkid: 0,
                    delivery,
                    state: InflightState::Qos1Sent,
                });
                continue;
            }
            let Some(pkid) = state.allocate_pkid() else {
                state.queue.push_front(delivery);
                break;
            };
            let entry = Inflight {
                pkid,
                state: if delivery.qos == QoS::AtLeastOnce {
                    InflightState::Qos1Sent
                } else {
                    InflightState::Qos2Sent
                },
                delivery,
            };
            state.inflight.push_back(entry.clone());
            out.push(entry);
        }
        out
    }

    /// Everything in flight, to resend after a reconnect.
    pub(crate) fn inflight_snapshot(&self) -> Vec<Inflight> {
        self.lock().inflight.iter().cloned().collect()
    }

    /// PUBACK received. Returns false for an unknown packet id.
    pub(crate) fn ack(&self, pkid: u16) -> bool {
        let mut state = self.lock();
        let position = state
            .inflight
            .iter()
            .position(|i| i.pkid == pkid && i.state == InflightState::Qos1Sent);
        match position {
            Some(index) => {
                state.inflight.remove(index);
                true
            }
            None => false,
        }
    }

    /// PUBREC received: the message is now waiting for PUBCOMP.
    pub(crate) fn received(&self, pkid: u16) -> bool {
        let mut state = self.lock();
        match state
            .inflight
            .iter_mut()
            .find(|i| i.pkid == pkid && i.state != InflightState::Qos1Sent)
        {
            Some(entry) => {
                entry.state = InflightState::Released;
                true
            }
            None => false,
        }
    }

    /// PUBCOMP received.
    pub(crate) fn completed(&self, pkid: u16) -> bool {
        let mut state = self.lock();
        let position = state
            .inflight
            .iter()
            .position(|i| i.pkid == pkid && i.state == InflightState::Released);
        match position {
            Some(index) => {
                state.inflight.remove(index);
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    pub(crate) fn queued_len(&self) -> usize {
        self.lock().queue.len()
    }
}

impl SessionState {
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

    fn delivery(n: u32, qos: QoS) -> Delivery {
        Delivery {
            message: Message::internal("test", format!("t/{n}"), "x", qos, false),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
        }
    }

    #[test]
    fn the_in_flight_window_is_never_exceeded() {
        let session = Session::new(Arc::from("c"), 100);
        session.set_owner(7);
        for n in 0..10 {
            session.enqueue(delivery(n, QoS::AtLeastOnce));
        }
        let first = session.take_sendable(7, 3, Instant::now());
        assert_eq!(first.len(), 3);
        assert!(session.take_sendable(7, 3, Instant::now()).is_empty());
        assert!(session.ack(first[0].pkid));
        assert_eq!(session.take_sendable(7, 3, Instant::now()).len(), 1);
        assert_eq!(session.queued_len(), 6);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let session = Session::new(Arc::from("c"), 2);
        session.set_owner(1);
        for n in 0..3 {
            session.enqueue(delivery(n, QoS::AtLeastOnce));
        }
        let state = session.lock();
        assert_eq!(state.dropped, 1);
        assert_eq!(&*state.queue[0].message.topic, "t/1");
    }

    #[test]
    fn qos0_is_not_queued_for_an_offline_client() {
        let session = Session::new(Arc::from("c"), 10);
        assert!(!session.enqueue(delivery(0, QoS::AtMostOnce)));
        assert!(session.enqueue(delivery(1, QoS::AtLeastOnce)));
    }

    #[test]
    fn a_connection_that_lost_ownership_takes_nothing() {
        let session = Session::new(Arc::from("c"), 10);
        session.set_owner(1);
        session.enqueue(delivery(0, QoS::AtLeastOnce));
        session.set_owner(2);
        assert!(session.take_sendable(1, 10, Instant::now()).is_empty());
        assert_eq!(session.take_sendable(2, 10, Instant::now()).len(), 1);
    }
}
