//! The router task: owns the subscription table, the sessions, the retained messages and
//! the broker counters. Connections and in-process clients talk to it through one bounded
//! channel; it never waits on a network client (deliveries go into session queues), only on
//! in-process subscribers, which must not lose messages.
//!
//! Retained messages owed to a new subscription are placed in pages, never all at once: a
//! cursor on the subscription remembers the last retained topic looked at, and each page
//! continues the ordered map's range after it. A client's connection asks for the next page
//! ([`RouterRequest::RetainedPage`]) once its queue has drained; an in-process subscriber
//! gets the next page when its channel has room. So however many retained messages match,
//! the router holds at most one page of copies and never waits for the subscriber. What a
//! page reads is the retained set as it is then: a message replaced between pages is sent
//! in its new version, one deleted is not sent, one added after the cursor is.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::connection::Counters;
use super::protocol::{SubAckCode, SubscriptionRequest};
use super::session::{Congestion, Delivery, Inflight, Limits, RetainedRoom, Session};
use crate::model::{Message, Origin, QoS};
use crate::mqtt::topic;
use crate::store::config::Durability;
use crate::store::sessions::{Op, Persist, Snapshot, StoredSubscription, Waiter};
use crate::store::AckShare;

/// How often expired sessions and delayed wills are looked at.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// The most retained topics one page looks at, matching or not: bounds the router's work
/// per page for a filter whose wildcard comes before its last levels (`+/temp`).
const RETAINED_SCAN: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    pub clients_connected: usize,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    pub messages_received: u64,
    /// `messages_received` by QoS (index 0, 1, 2).
    pub messages_received_by_qos: [u64; 3],
    /// Payload bytes of the received messages, by QoS.
    pub payload_bytes_received_by_qos: [u64; 3],
    pub messages_sent: u64,
    /// `messages_sent` by the QoS they were sent with.
    pub messages_sent_by_qos: [u64; 3],
    /// Payload bytes of the sent messages, by that QoS.
    pub payload_bytes_sent_by_qos: [u64; 3],
    pub messages_dropped: u64,
    /// Messages waiting in client session queues, in memory or on disk, not yet sent.
    pub messages_queued: u64,
    /// Bytes (payload and topic) of the queued messages held in memory.
    pub bytes_queued: u64,
    /// Publishes and wills dropped: denied by the ACL, or to a `$` topic.
    pub publishes_denied: u64,
    /// Clients disconnected for not reading (`slow_client_timeout`).
    pub slow_clients_disconnected: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Size of the broker's database on disk (0 with `durability = "memory"`).
    pub store_bytes: u64,
    /// How long the broker store's commits take (empty with `durability = "memory"`).
    pub store_commits: crate::store::commit_times::CommitTimesSnapshot,
}

pub(crate) struct ConnectReply {
    pub(crate) session: Arc<Session>,
    pub(crate) session_present: bool,
    /// The store, when this session is persistent (its rows must follow its acks).
    pub(crate) persist: Option<Persist>,
}

pub(crate) enum RouterRequest {
    Connect {
        client_id: Arc<str>,
        connection: u64,
        clean_start: bool,
        session_expiry: u32,
        /// Cancelled by the router when another connection takes the session over.
        takeover: CancellationToken,
        /// Cancelled by a publisher that waited too long for this client to read.
        evict: CancellationToken,
        reply: oneshot::Sender<ConnectReply>,
    },
    Disconnected {
        client_id: Arc<str>,
        connection: u64,
        /// Will to publish (abnormal close), with its delay in seconds.
        will: Option<(Message, u32)>,
        session_expiry: u32,
    },
    Subscribe {
        client_id: Arc<str>,
        filters: Vec<SubscriptionRequest>,
        subscription_id: Option<usize>,
        reply: oneshot::Sender<Vec<SubAckCode>>,
    },
    Unsubscribe {
        client_id: Arc<str>,
        filters: Vec<String>,
        reply: oneshot::Sender<Vec<bool>>,
    },
    /// The connection's queue has drained: place the next page of the retained messages
    /// its subscriptions are still owed (see [`Session::retained_page_wanted`]).
    RetainedPage {
        client_id: Arc<str>,
        connection: u64,
    },
    Publish {
        message: Message,
        /// Answered with whether any subscriber matched.
        done: Option<oneshot::Sender<bool>>,
        /// A client publisher's: where a full subscriber queue is reported back to it.
        congestion: Option<Arc<Congestion>>,
    },
    InternalSubscribe {
        name: Arc<str>,
        filters: Vec<(String, QoS)>,
        send_retained: bool,
        /// Whether it takes shares of publishers' acknowledgements (see [`AckShare`]).
        commit: bool,
        tx: mpsc::Sender<(Message, Option<AckShare>)>,
        reply: oneshot::Sender<u64>,
    },
    InternalUnsubscribe {
        id: u64,
    },
    Stats {
        reply: oneshot::Sender<BrokerStats>,
    },
}

impl std::fmt::Debug for RouterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterRequest")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subscriber {
    Client(Arc<str>),
    Internal(u64),
}

#[derive(Debug, Clone)]
struct Subscription {
    filter: String,
    share_group: Option<String>,
    subscriber: Subscriber,
    qos: QoS,
    no_local: bool,
    retain_as_published: bool,
    subscription_id: Option<usize>,
    /// Retained messages still to be placed for this subscription.
    retained: Option<RetainedCursor>,
}

/// Where the delivery of a subscription's retained messages stands: the next page starts
/// after `after` (at the start of the filter's range while `None`).
#[derive(Debug, Clone, Default)]
struct RetainedCursor {
    after: Option<Arc<str>>,
}

struct SessionEntry {
    session: Arc<Session>,
    connection: Option<(u64, CancellationToken)>,
    session_expiry: u32,
    disconnected_at: Option<Instant>,
    /// Whether this session's state is on disk.
    persisted: bool,
}

struct InternalSubscriber {
    name: Arc<str>,
    /// Stores what it receives: with `sync` durability its commit gates acknowledgements.
    commit: bool,
    tx: mpsc::Sender<(Message, Option<AckShare>)>,
    /// Retained messages still to be sent on subscribe, with the filters they match.
    retained: Option<(Vec<String>, RetainedCursor)>,
}

struct DelayedWill {
    client_id: Arc<str>,
    message: Message,
    due: Instant,
}

pub(crate) struct Router {
    limits: Limits,
    persist: Option<Persist>,
    durability: Durability,
    /// Next queue row id.
    next_seq: u64,
    sessions: HashMap<Arc<str>, SessionEntry>,
    subscriptions: Vec<Subscription>,
    internal: HashMap<u64, InternalSubscriber>,
    next_internal_id: u64,
    retained: BTreeMap<Arc<str>, Message>,
    delayed_wills: Vec<DelayedWill>,
    /// Round-robin position per shared subscription group.
    share_cursor: HashMap<(String, String), usize>,
    stats: BrokerStats,
    counters: Arc<Counters>,
}

impl Router {
    pub(crate) fn new(
        limits: Limits,
        counters: Arc<Counters>,
        durability: Durability,
        persist: Option<(Persist, Snapshot)>,
    ) -> Router {
        let (persist, snapshot) = match persist {
            Some((persist, snapshot)) => (Some(persist), snapshot),
            None => (None, Snapshot::default()),
        };
        let mut router = Router {
            limits,
            persist,
            durability,
            next_seq: snapshot.next_seq.max(1),
            sessions: HashMap::new(),
            subscriptions: Vec::new(),
            internal: HashMap::new(),
            next_internal_id: 1,
            retained: BTreeMap::new(),
            delayed_wills: Vec::new(),
            share_cursor: HashMap::new(),
            stats: BrokerStats::default(),
            counters,
        };
        router.restore(snapshot);
        router
    }

    /// Rebuild sessions, subscriptions and retained messages from disk.
    fn restore(&mut self, snapshot: Snapshot) {
        let now = Instant::now();
        let (sessions, queued) = (
            snapshot.sessions.len(),
            snapshot
                .sessions
                .iter()
                .map(|s| s.queue.len() as u64 + s.spilled)
                .sum::<u64>(),
        );
        for stored in snapshot.sessions {
            let client_id: Arc<str> = Arc::from(stored.client_id.as_str());
            let session = Arc::new(Session::new(client_id.clone(), self.limits.clone()));
            let mut inflight = Vec::new();
            let mut queue = Vec::new();
            for row in stored.queue {
                match row.inflight {
                    Some((pkid, state)) => inflight.push(Inflight {
                        pkid,
                        delivery: row.delivery.into(),
                        state,
                    }),
                    None => queue.push(row.delivery.into()),
                }
            }
            session.restore(inflight, queue, stored.spilled);
            for sub in stored.subscriptions {
                let Some(parsed) = topic::parse_filter(&sub.filter) else {
                    continue;
                };
                self.subscriptions.push(Subscription {
                    filter: parsed.filter.to_owned(),
                    share_group: parsed.share_group.map(str::to_owned),
                    subscriber: Subscriber::Client(client_id.clone()),
                    qos: sub.qos,
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    subscription_id: sub.subscription_id,
                    retained: None,
                });
            }
            let disconnected_at = stored
                .disconnected_for
                .map(|ago| now.checked_sub(ago).unwrap_or(now));
            self.sessions.insert(
                client_id,
                SessionEntry {
                    session,
                    connection: None,
                    session_expiry: stored.expiry,
                    disconnected_at,
                    persisted: true,
                },
            );
        }
        for message in snapshot.retained {
            self.retained.insert(message.topic.clone(), message);
        }
        if sessions > 0 || !self.retained.is_empty() {
            tracing::info!(
                sessions,
                queued,
                retained = self.retained.len(),
                "broker state restored from disk"
            );
        }
    }

    async fn persist(&self, op: Op) {
        if let Some(persist) = &self.persist {
            persist.send(op).await;
        }
    }

    /// The subscriptions of a client as they are stored.
    fn stored_subscriptions(&self, client_id: &Arc<str>) -> Vec<StoredSubscription> {
        let subscriber = Subscriber::Client(client_id.clone());
        self.subscriptions
            .iter()
            .filter(|s| s.subscriber == subscriber)
            .map(|s| StoredSubscription {
                filter: match &s.share_group {
                    Some(group) => format!("$share/{group}/{}", s.filter),
                    None => s.filter.clone(),
                },
                qos: s.qos,
                no_local: s.no_local,
                retain_as_published: s.retain_as_published,
                subscription_id: s.subscription_id,
            })
            .collect()
    }

    async fn save_subscriptions(&self, client_id: &Arc<str>) {
        if self.sessions.get(client_id).is_some_and(|e| e.persisted) {
            let subscriptions = self.stored_subscriptions(client_id);
            self.persist(Op::Subscriptions {
                client_id: client_id.clone(),
                subscriptions,
            })
            .await;
        }
    }

    /// Queue a delivery for a client, on disk first when its session is persistent.
    /// Returns whether a row was written.
    /// Never waits for the client: a full queue is reported to the publisher's
    /// `congestion`, whose connection then waits before it reads more.
    async fn deliver(
        &mut self,
        client_id: &Arc<str>,
        mut delivery: Delivery,
        congestion: Option<&Congestion>,
    ) -> bool {
        let Some(entry) = self.sessions.get(client_id) else {
            return false;
        };
        let session = entry.session.clone();
        let durable = entry.persisted && delivery.qos != QoS::AtMostOnce;
        if durable {
            let seq = self.next_seq;
            self.next_seq += 1;
            delivery.seq = Some(seq);
            self.persist(Op::Enqueue {
                client_id: client_id.clone(),
                delivery: delivery.queued(seq),
            })
            .await;
        }
        let outcome = session.enqueue(delivery);
        if outcome.congested {
            if let Some(congestion) = congestion {
                congestion.set(&session);
            }
        }
        if let Some(seq) = outcome.dropped_seq {
            self.persist(Op::Remove {
                client_id: client_id.clone(),
                seq,
            })
            .await;
        }
        if let Some(after_seq) = outcome.dropped_on_disk_after {
            self.persist(Op::RemoveOldest {
                client_id: client_id.clone(),
                after_seq,
            })
            .await;
        }
        durable
    }

    /// Serve requests until every handle has gone or `stop` is cancelled (after the
    /// listeners and their connections have finished).
    pub(crate) async fn run(
        mut self,
        mut requests: mpsc::Receiver<RouterRequest>,
        stop: CancellationToken,
    ) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // In-process subscribers still owed retained messages get the next page when
            // their channel has room: the router waits for that beside its other work,
            // never instead of it.
            let backlog = self.internal_retained_backlog();
            let owed = !backlog.is_empty();
            tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => self.handle(request).await,
                    None => break,
                },
                (id, open) = channel_room(backlog), if owed => {
                    if open {
                        self.send_internal_retained(id);
                    } else {
                        self.drop_internal(id);
                    }
                }
                _ = housekeeping.tick() => self.housekeeping(Instant::now()).await,
                _ = stop.cancelled() => break,
            }
        }
        tracing::debug!("router stopped");
    }

    async fn handle(&mut self, request: RouterRequest) {
        match request {
            RouterRequest::Connect {
                client_id,
                connection,
                clean_start,
                session_expiry,
                takeover,
                evict,
                reply,
            } => {
                let reply_value = self
                    .connect(
                        client_id,
                        connection,
                        clean_start,
                        session_expiry,
                        (takeover, evict),
                    )
                    .await;
                let _ = reply.send(reply_value);
            }
            RouterRequest::Disconnected {
                client_id,
                connection,
                will,
                session_expiry,
            } => {
                self.disconnected(client_id, connection, will, session_expiry)
                    .await
            }
            RouterRequest::Subscribe {
                client_id,
                filters,
                subscription_id,
                reply,
            } => {
                let codes = self
                    .subscribe_client(&client_id, filters, subscription_id)
                    .await;
                self.save_subscriptions(&client_id).await;
                let _ = reply.send(codes);
            }
            RouterRequest::Unsubscribe {
                client_id,
                filters,
                reply,
            } => {
                let subscriber = Subscriber::Client(client_id.clone());
                let found = filters
                    .iter()
                    .map(|raw| self.remove_subscription(&subscriber, raw).is_some())
                    .collect();
                self.save_subscriptions(&client_id).await;
                let _ = reply.send(found);
            }
            RouterRequest::RetainedPage {
                client_id,
                connection,
            } => {
                // A request of a connection since replaced finds the session's retained
                // state reset for the new one (see `connect`).
                let current = self
                    .sessions
                    .get(&client_id)
                    .and_then(|e| e.connection.as_ref())
                    .is_some_and(|(id, _)| *id == connection);
                if current {
                    self.place_retained(&client_id).await;
                }
            }
            RouterRequest::Publish {
                message,
                done,
                congestion,
            } => {
                let failures_before = self.persist.as_ref().map_or(0, Persist::failures);
                let mut done = done;
                let (matched, wrote, ack) = self
                    .publish_acked(message, congestion.as_deref(), &mut done)
                    .await;
                if let Some(congestion) = &congestion {
                    congestion.routed();
                }
                let store_waits =
                    wrote && self.durability == Durability::Sync && self.persist.is_some();
                if let Some(ack) = ack {
                    // Uplink outboxes hold shares already; the broker store takes one too.
                    if store_waits {
                        self.persist(Op::Barrier(Waiter::Share(ack.share(), failures_before)))
                            .await;
                    }
                    ack.stored();
                } else if let Some(done) = done {
                    if store_waits {
                        // Acknowledge only once the rows holding this message are on disk.
                        self.persist(Op::Barrier(Waiter::Publish(done, matched, failures_before)))
                            .await;
                    } else {
                        let _ = done.send(matched);
                    }
                }
            }
            RouterRequest::InternalSubscribe {
                name,
                filters,
                send_retained,
                commit,
                tx,
                reply,
            } => {
                let id = self.next_internal_id;
                self.next_internal_id += 1;
                for (filter, qos) in &filters {
                    self.subscriptions.push(Subscription {
                        filter: filter.clone(),
                        share_group: None,
                        subscriber: Subscriber::Internal(id),
                        qos: *qos,
                        no_local: true,
                        retain_as_published: true,
                        subscription_id: None,
                        retained: None,
                    });
                }
                // Sent page by page as the channel has room (see `run`): the subscriber
                // reads them only once it has its id.
                let retained = send_retained.then(|| {
                    let filters = filters.into_iter().map(|(filter, _)| filter).collect();
                    (filters, RetainedCursor::default())
                });
                self.internal.insert(
                    id,
                    InternalSubscriber {
                        name,
                        commit,
                        tx,
                        retained,
                    },
                );
                let _ = reply.send(id);
            }
            RouterRequest::InternalUnsubscribe { id } => self.drop_internal(id),
            RouterRequest::Stats { reply } => {
                let _ = reply.send(self.current_stats());
            }
        }
    }

    fn current_stats(&self) -> BrokerStats {
        let mut stats = self.stats.clone();
        stats.clients_connected = self
            .sessions
            .values()
            .filter(|e| e.connection.is_some())
            .count();
        stats.sessions = self.sessions.len();
        stats.subscriptions = self.subscriptions.len();
        stats.retained = self.retained.len();
        let load =
            |counters: &[AtomicU64; 3]| counters.each_ref().map(|c| c.load(Ordering::Relaxed));
        stats.messages_sent_by_qos = load(&self.counters.messages_sent_by_qos);
        stats.messages_sent = stats.messages_sent_by_qos.iter().sum();
        stats.payload_bytes_sent_by_qos = load(&self.counters.payload_bytes_sent_by_qos);
        stats.bytes_received = self.counters.bytes_received.load(Ordering::Relaxed);
        stats.bytes_sent = self.counters.bytes_sent.load(Ordering::Relaxed);
        stats.publishes_denied = self.counters.publishes_denied.load(Ordering::Relaxed);
        stats.slow_clients_disconnected = self
            .counters
            .slow_clients_disconnected
            .load(Ordering::Relaxed);
        stats.store_bytes = self.persist.as_ref().map_or(0, Persist::size);
        stats.store_commits = self
            .persist
            .as_ref()
            .map(Persist::commit_times)
            .unwrap_or_default();
        for entry in self.sessions.values() {
            let state = entry.session.lock();
            stats.messages_dropped += state.dropped;
            stats.messages_queued += state.queue.len() as u64 + state.spilled;
            stats.bytes_queued += state.queued_bytes();
        }
        stats
    }

    async fn connect(
        &mut self,
        client_id: Arc<str>,
        connection: u64,
        clean_start: bool,
        session_expiry: u32,
        (takeover, evict): (CancellationToken, CancellationToken),
    ) -> ConnectReply {
        // A reconnect cancels a pending delayed will.
        self.delayed_wills.retain(|w| w.client_id != client_id);
        let existing = self.sessions.remove(&client_id);
        if let Some((_, old)) = existing.as_ref().and_then(|e| e.connection.as_ref()) {
            old.cancel();
        }
        let was_persisted = existing.as_ref().is_some_and(|e| e.persisted);
        let (session, session_present) = match existing {
            Some(entry) if !clean_start => (entry.session, true),
            _ => {
                self.subscriptions
                    .retain(|s| s.subscriber != Subscriber::Client(client_id.clone()));
                if was_persisted {
                    self.persist(Op::DropSession {
                        client_id: client_id.clone(),
                    })
                    .await;
                }
                (
                    Arc::new(Session::new(client_id.clone(), self.limits.clone())),
                    false,
                )
            }
        };
        let persisted = session_expiry > 0 && self.persist.is_some();
        if persisted {
            self.persist(Op::Session {
                client_id: client_id.clone(),
                expiry: session_expiry,
                connected: true,
            })
            .await;
        } else if was_persisted && session_present {
            self.persist(Op::DropSession {
                client_id: client_id.clone(),
            })
            .await;
        }
        session.set_owner(connection, Some(evict));
        if session_present {
            // A resumed session goes on with the retained messages its subscriptions are
            // still owed; a page asked for by the connection it had is not waited for.
            let subscriber = Subscriber::Client(client_id.clone());
            let owed = self
                .subscriptions
                .iter()
                .any(|s| s.subscriber == subscriber && s.retained.is_some());
            session.retained_paged(owed);
        }
        self.sessions.insert(
            client_id.clone(),
            SessionEntry {
                session: session.clone(),
                connection: Some((connection, takeover)),
                session_expiry,
                disconnected_at: None,
                persisted,
            },
        );
        if persisted && session_present && !was_persisted {
            self.save_subscriptions(&client_id).await;
        }
        ConnectReply {
            session,
            session_present,
            persist: self.persist.clone().filter(|_| persisted),
        }
    }

    async fn disconnected(
        &mut self,
        client_id: Arc<str>,
        connection: u64,
        will: Option<(Message, u32)>,
        session_expiry: u32,
    ) {
        let mut remove = false;
        let mut persisted = false;
        // A newer connection for this client id already holds the session: a takeover, or
        // a reconnect the router handled before this close.
        let mut superseded = false;
        if let Some(entry) = self.sessions.get_mut(&client_id) {
            if entry.connection.as_ref().map(|(id, _)| *id) == Some(connection) {
                entry.connection = None;
                entry.session_expiry = session_expiry;
                entry.disconnected_at = Some(Instant::now());
                entry.session.set_owner(0, None);
                remove = session_expiry == 0;
                persisted = entry.persisted;
            } else {
                superseded = entry.connection.is_some();
            }
        }
        if persisted && !remove {
            self.persist(Op::Session {
                client_id: client_id.clone(),
                expiry: session_expiry,
                connected: false,
            })
            .await;
        }
        // MQTT 5 3.1.2.5: a new connection opened within the will delay cancels the will;
        // a will without delay was due the moment the old connection closed.
        let will = will.filter(|(_, delay)| !superseded || (*delay).min(session_expiry) == 0);
        if let Some((message, delay)) = will {
            let delay = delay.min(session_expiry);
            if delay == 0 || remove {
                self.publish(message, None).await;
            } else {
                self.delayed_wills.push(DelayedWill {
                    client_id: client_id.clone(),
                    message,
                    due: Instant::now() + Duration::from_secs(u64::from(delay)),
                });
            }
        }
        if remove {
            self.remove_session(&client_id).await;
        }
    }

    async fn remove_session(&mut self, client_id: &Arc<str>) {
        if let Some(entry) = self.sessions.remove(client_id) {
            if entry.persisted {
                self.persist(Op::DropSession {
                    client_id: client_id.clone(),
                })
                .await;
            }
        }
        let subscriber = Subscriber::Client(client_id.clone());
        self.subscriptions.retain(|s| s.subscriber != subscriber);
    }

    async fn housekeeping(&mut self, now: Instant) {
        let expired: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|(_, e)| {
                e.session_expiry != u32::MAX
                    && e.disconnected_at.is_some_and(|at| {
                        now.saturating_duration_since(at)
                            >= Duration::from_secs(u64::from(e.session_expiry))
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for client_id in expired {
            tracing::debug!(client = %client_id, "session expired");
            // A will whose delay outlasts the session is published when the session ends.
            let wills: Vec<DelayedWill> = {
                let (due, keep) = std::mem::take(&mut self.delayed_wills)
                    .into_iter()
                    .partition(|w| w.client_id == client_id);
                self.delayed_wills = keep;
                due
            };
            for will in wills {
                self.publish(will.message, None).await;
            }
            self.remove_session(&client_id).await;
        }
        let (due, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed_wills)
            .into_iter()
            .partition(|w| w.due <= now);
        self.delayed_wills = pending;
        for will in due {
            self.publish(will.message, None).await;
        }
        let expired: Vec<Arc<str>> = self
            .retained
            .iter()
            .filter(|(_, m)| m.is_expired(now))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in expired {
            self.retained.remove(&topic);
            self.persist(Op::Retain {
                topic,
                message: None,
            })
            .await;
        }
    }

    async fn subscribe_client(
        &mut self,
        client_id: &Arc<str>,
        filters: Vec<SubscriptionRequest>,
        subscription_id: Option<usize>,
    ) -> Vec<SubAckCode> {
        if !self.sessions.contains_key(client_id) {
            return vec![SubAckCode::TopicFilterInvalid; filters.len()];
        }
        let subscriber = Subscriber::Client(client_id.clone());
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained_owed = false;
        for request in filters {
            let Some(parsed) = topic::parse_filter(&request.filter) else {
                codes.push(SubAckCode::TopicFilterInvalid);
                continue;
            };
            let share_group = parsed.share_group.map(str::to_owned);
            let filter = parsed.filter.to_owned();
            let previous = self.remove_subscription(&subscriber, &request.filter);
            let send_retained = share_group.is_none()
                && match request.retain_handling {
                    0 => true,
                    1 => previous.is_none(),
                    _ => false,
                };
            // A subscription made again starts its retained messages over; one that asks
            // for none this time keeps on with those it is still owed.
            let retained = if send_retained {
                Some(RetainedCursor::default())
            } else {
                previous.and_then(|p| p.retained)
            };
            retained_owed |= retained.is_some();
            self.subscriptions.push(Subscription {
                filter,
                share_group,
                subscriber: subscriber.clone(),
                qos: request.qos,
                no_local: request.no_local,
                retain_as_published: request.retain_as_published,
                subscription_id,
                retained,
            });
            codes.push(SubAckCode::Granted(request.qos));
        }
        if retained_owed {
            self.place_retained(client_id).await;
        }
        codes
    }

    /// Place the next page of the retained messages `client_id`'s subscriptions are owed:
    /// as many as its queue has room for ([`Session::retained_room`]), in topic order,
    /// subscription by subscription. Tells the session whether more are owed; its
    /// connection asks for the next page when it has sent these.
    async fn place_retained(&mut self, client_id: &Arc<str>) {
        let Some(entry) = self.sessions.get(client_id) else {
            return;
        };
        let session = entry.session.clone();
        let RetainedRoom {
            messages,
            bytes: mut room_bytes,
        } = session.retained_room();
        let now = Instant::now();
        let mut visited = 0;
        let mut page: Vec<Delivery> = Vec::new();
        let mut more = false;
        let subscriber = Subscriber::Client(client_id.clone());
        for sub in self
            .subscriptions
            .iter_mut()
            .filter(|s| s.subscriber == subscriber)
        {
            let Some(cursor) = sub.retained.as_mut() else {
                continue;
            };
            let filter = sub.filter.as_str();
            let (qos, subscription_id) = (sub.qos, sub.subscription_id);
            let done = scan_retained(
                &self.retained,
                range_prefix(filter),
                |topic| topic::matches(topic, filter),
                cursor,
                now,
                &mut visited,
                |message| {
                    let size = (message.topic.len() + message.payload.len()) as u64;
                    // The first message of a page goes however large it is: the queue
                    // takes one message past its byte bound, and the page makes progress.
                    if page.len() >= messages
                        || room_bytes == 0
                        || (size > room_bytes && !page.is_empty())
                    {
                        return false;
                    }
                    room_bytes = room_bytes.saturating_sub(size);
                    page.push(Delivery {
                        message: message.clone(),
                        qos: message.qos.min(qos),
                        retain: true,
                        subscription_ids: subscription_id.into_iter().collect(),
                        seq: None,
                        memory: None,
                    });
                    true
                },
            );
            if done {
                sub.retained = None;
            } else {
                more = true;
            }
        }
        for delivery in page {
            self.deliver(client_id, delivery, None).await;
        }
        session.retained_paged(more);
    }

    /// In-process subscribers still owed retained messages, with their channels.
    fn internal_retained_backlog(&self) -> Vec<(u64, InternalSender)> {
        self.internal
            .iter()
            .filter(|(_, s)| s.retained.is_some())
            .map(|(id, s)| (*id, s.tx.clone()))
            .collect()
    }

    /// Send an in-process subscriber as many of the retained messages it is owed as its
    /// channel has room for now.
    fn send_internal_retained(&mut self, id: u64) {
        let Some(InternalSubscriber {
            tx,
            retained: owed @ Some(_),
            ..
        }) = self.internal.get_mut(&id)
        else {
            return;
        };
        let Some((filters, cursor)) = owed.as_mut() else {
            return;
        };
        let prefix = match filters.as_slice() {
            [filter] => range_prefix(filter),
            _ => "",
        };
        let mut visited = 0;
        let done = scan_retained(
            &self.retained,
            prefix,
            |topic| filters.iter().any(|f| topic::matches(topic, f)),
            cursor,
            Instant::now(),
            &mut visited,
            |message| tx.try_send((message.clone(), None)).is_ok(),
        );
        if done {
            *owed = None;
        } else if tx.is_closed() {
            self.drop_internal(id);
        }
    }

    /// Remove the subscription `raw` (which may be `$share/group/filter`) of `subscriber`;
    /// returns it if there was one.
    fn remove_subscription(&mut self, subscriber: &Subscriber, raw: &str) -> Option<Subscription> {
        let parsed = topic::parse_filter(raw)?;
        let index = self.subscriptions.iter().position(|s| {
            &s.subscriber == subscriber
                && s.filter == parsed.filter
                && s.share_group.as_deref() == parsed.share_group
        })?;
        Some(self.subscriptions.remove(index))
    }

    fn drop_internal(&mut self, id: u64) {
        self.internal.remove(&id);
        self.subscriptions
            .retain(|s| s.subscriber != Subscriber::Internal(id));
    }

    /// Deliver to every matching subscriber; store or clear a retained message. Returns
    /// whether anything matched and whether anything was written to disk.
    async fn publish(&mut self, message: Message, congestion: Option<&Congestion>) -> (bool, bool) {
        let (matched, wrote, _) = self.publish_acked(message, congestion, &mut None).await;
        (matched, wrote)
    }

    /// [`publish`](Self::publish) for a publisher waiting for `done`. With `sync`
    /// durability, a QoS 1/2 message that reaches a committing internal subscriber (an
    /// uplink outbox) takes `done` into an [`AckShare`] given to each of them; the router's
    /// own share is returned (to be shared with the broker store, then released).
    async fn publish_acked(
        &mut self,
        message: Message,
        congestion: Option<&Congestion>,
        done: &mut Option<oneshot::Sender<bool>>,
    ) -> (bool, bool, Option<AckShare>) {
        self.stats.messages_received += 1;
        self.stats.messages_received_by_qos[message.qos as usize] += 1;
        self.stats.payload_bytes_received_by_qos[message.qos as usize] +=
            message.payload.len() as u64;
        let mut wrote = false;
        if message.retain {
            let stored = if message.payload.is_empty() {
                self.retained.remove(&message.topic);
                None
            } else {
                self.retained.insert(message.topic.clone(), message.clone());
                Some(message.clone())
            };
            // `$SYS` is republished every few seconds: keep it off the disk.
            if self.persist.is_some() && !message.topic.starts_with("$SYS/") {
                self.persist(Op::Retain {
                    topic: message.topic.clone(),
                    message: stored,
                })
                .await;
                wrote = true;
            }
        }

        // One delivery per client: the highest granted QoS of its matching subscriptions,
        // with every matching subscription identifier.
        let mut per_client: Vec<(Arc<str>, Delivery)> = Vec::new();
        let mut internal_targets: Vec<u64> = Vec::new();
        let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();

        for (index, sub) in self.subscriptions.iter().enumerate() {
            if !topic::matches(&message.topic, &sub.filter) {
                continue;
            }
            if let Some(group) = &sub.share_group {
                groups
                    .entry((group.clone(), sub.filter.clone()))
                    .or_default()
                    .push(index);
                continue;
            }
            match &sub.subscriber {
                Subscriber::Internal(id) => internal_targets.push(*id),
                Subscriber::Client(client) => {
                    if sub.no_local && message.origin == Origin::Client(client.clone()) {
                        continue;
                    }
                    add_client_delivery(&mut per_client, client, sub, &message);
                }
            }
        }

        for (key, members) in groups {
            let cursor = self.share_cursor.entry(key).or_insert(0);
            // Prefer a connected member; fall back to any (its session queues the message).
            let pick = (0..members.len())
                .map(|offset| members[(*cursor + offset) % members.len()])
                .find(|&index| match &self.subscriptions[index].subscriber {
                    Subscriber::Client(c) => {
                        self.sessions.get(c).is_some_and(|e| e.connection.is_some())
                    }
                    Subscriber::Internal(_) => true,
                })
                .unwrap_or(members[*cursor % members.len()]);
            *cursor = cursor.wrapping_add(1);
            let sub = &self.subscriptions[pick];
            match &sub.subscriber {
                Subscriber::Internal(id) => internal_targets.push(*id),
                Subscriber::Client(client) => {
                    add_client_delivery(&mut per_client, client, sub, &message)
                }
            }
        }

        let matched = !per_client.is_empty() || !internal_targets.is_empty();
        for (client, delivery) in per_client {
            wrote |= self.deliver(&client, delivery, congestion).await;
        }

        internal_targets.sort_unstable();
        internal_targets.dedup();
        let acked =
            done.is_some() && message.qos != QoS::AtMostOnce && self.durability == Durability::Sync;
        let mut ack: Option<AckShare> = None;
        for id in internal_targets {
            let Some(subscriber) = self.internal.get(&id) else {
                continue;
            };
            if message.origin == Origin::Internal(subscriber.name.clone()) {
                continue;
            }
            let share = if acked && subscriber.commit {
                if ack.is_none() {
                    ack = done.take().map(|done| AckShare::new(done, matched));
                }
                ack.as_ref().map(AckShare::share)
            } else {
                None
            };
            // Wait when full: in-process subscribers (outbox, drivers) must get everything.
            // A subscriber gone drops its share: that publisher is not acknowledged.
            if subscriber.tx.send((message.clone(), share)).await.is_err() {
                self.drop_internal(id);
            }
        }
        (matched, wrote, ack)
    }
}

/// The channel of an in-process subscriber.
type InternalSender = mpsc::Sender<(Message, Option<AckShare>)>;

/// Wait until one of `backlog`'s channels has room (or has closed: then `false`).
async fn channel_room(backlog: Vec<(u64, InternalSender)>) -> (u64, bool) {
    if backlog.is_empty() {
        return std::future::pending().await;
    }
    let waits = backlog.into_iter().map(|(id, tx)| {
        // The slot is given back at once: the router is the channel's only sender, so the
        // room is still there when the page is sent.
        Box::pin(async move { (id, tx.reserve().await.is_ok()) })
    });
    futures::future::select_all(waits).await.0
}

/// Where the retained topics a filter can match begin: its literal levels before the
/// first wildcard, without the `/` before it (`a/#` also matches `a`). Every matching
/// topic starts with it, and they sort together.
fn range_prefix(filter: &str) -> &str {
    let literal = topic::literal_prefix(filter);
    literal.strip_suffix('/').unwrap_or(literal)
}

/// Go through the retained messages whose topics start with `prefix`, after `cursor`, in
/// topic order, and hand those that match and have not expired to `take` until it refuses
/// one. Looks at [`RETAINED_SCAN`] topics at most (counted in `visited` across calls of one
/// page). Moves the cursor past every topic it is done with; returns whether none is left.
fn scan_retained(
    retained: &BTreeMap<Arc<str>, Message>,
    prefix: &str,
    matches: impl Fn(&str) -> bool,
    cursor: &mut RetainedCursor,
    now: Instant,
    visited: &mut usize,
    mut take: impl FnMut(&Message) -> bool,
) -> bool {
    let start = match &cursor.after {
        Some(after) => Bound::Excluded(&**after),
        None => Bound::Included(prefix),
    };
    for (topic, message) in retained.range::<str, _>((start, Bound::Unbounded)) {
        if !topic.starts_with(prefix) {
            return true;
        }
        if *visited >= RETAINED_SCAN {
            return false;
        }
        if !message.is_expired(now) && matches(topic) && !take(message) {
            return false;
        }
        *visited += 1;
        cursor.after = Some(topic.clone());
    }
    true
}

fn add_client_delivery(
    per_client: &mut Vec<(Arc<str>, Delivery)>,
    client: &Arc<str>,
    sub: &Subscription,
    message: &Message,
) {
    let qos = message.qos.min(sub.qos);
    let retain = sub.retain_as_published && message.retain;
    if let Some((_, existing)) = per_client.iter_mut().find(|(c, _)| c == client) {
        existing.qos = existing.qos.max(qos);
        existing.retain |= retain;
        existing.subscription_ids.extend(sub.subscription_id);
        return;
    }
    per_client.push((
        client.clone(),
        Delivery {
            message: message.clone(),
            qos,
            retain,
            subscription_ids: sub.subscription_id.into_iter().collect(),
            seq: None,
            memory: None,
        },
    ));
}
