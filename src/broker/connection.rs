//! One task per client connection: reads packets, answers them, and sends what the
//! router queued in the client's session, within the client's Receive Maximum.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::acl::Acl;
use super::auth::PasswordFile;
use super::persist::{Op, PageReply, Persist, StoredDelivery};
use super::protocol::{
    self, AckReason, ConnAckOut, ConnackCode, ConnectRequest, DisconnectReason, Incoming, Outgoing,
    PublishIn, PublishOut, ReadError, SubAckCode, Version, ViolationKind,
};
use super::router::{ConnectReply, RouterRequest};
use super::session::{Congestion, Handed, Inflight, InflightState, Room, Session};
use super::topic;
use crate::config::{BrokerConfig, DeniedReason};
use crate::model::{Message, Origin, QoS};

/// Messages read from disk at a time for a persistent session whose queue spilled to disk.
const PAGE_SIZE: usize = 1000;
/// The next page is asked for when fewer than this many are left in memory, so that the
/// read overlaps with sending (the send window never waits for the disk).
const PAGE_LOW_WATER: usize = PAGE_SIZE / 2;
/// In-order acknowledgements gathered before the store is told (see `store_watermark_if_due`).
const WATERMARK_EVERY: u64 = 256;
/// The longest an in-order acknowledgement waits before the store is told.
const WATERMARK_DELAY: Duration = Duration::from_millis(20);
/// How long a closing connection waits for acknowledgements still being committed.
const ACK_DRAIN: Duration = Duration::from_secs(2);
/// Topic aliases a client may use towards us.
const TOPIC_ALIAS_MAX: u16 = 64;
/// How many QoS 2 publishes a 3.1.1 client may have awaiting PUBREL. The messages are
/// routed at once; each open flow holds only its packet id (a few bytes), so 1024 cost
/// under 64 KiB per connection at most.
const MAX_INCOMING_QOS2_V311: usize = 1024;
/// How long a connection that has just sent deliveries to acknowledge keeps polling for
/// the acknowledgements before it sleeps. A busy client answers within microseconds, and
/// going to sleep and being woken costs more than that (tens of µs per wake-up on a VM): a
/// draining queue ran at 0.56× Mosquitto's rate without this and above it with it
/// (docs/benchmarks.md). Bounded, and only while a client owes acknowledgements, so an idle
/// connection, or one that only receives QoS 0, costs nothing.
const ANSWER_POLL: Duration = Duration::from_micros(20);

/// Counters shared by all connections (atomics: no lock on the hot path).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) messages_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    /// Publishes (and wills) dropped: denied by the ACL, or to a `$` topic.
    pub(crate) publishes_denied: AtomicU64,
    /// Clients disconnected because they took nothing from a full queue for
    /// `slow_client_timeout` while publishers waited for them.
    pub(crate) slow_clients_disconnected: AtomicU64,
}

/// What every connection needs to know, fixed at start.
#[derive(Debug)]
pub(crate) struct Settings {
    allow_anonymous: bool,
    passwords: Option<Arc<PasswordFile>>,
    acl: Option<Arc<Acl>>,
    max_packet_size: u32,
    max_inflight: u16,
    max_keep_alive: u16,
    slow_client_timeout: Duration,
    /// What a subscription the ACL denies gets in an MQTT 5 SUBACK.
    denied: SubAckCode,
    next_connection: AtomicU64,
    pub(crate) counters: Arc<Counters>,
}

impl Settings {
    pub(crate) fn from_config(
        config: &BrokerConfig,
        passwords: Option<Arc<PasswordFile>>,
        acl: Option<Arc<Acl>>,
        counters: Arc<Counters>,
    ) -> Settings {
        Settings {
            allow_anonymous: config.allow_anonymous,
            passwords,
            acl,
            max_packet_size: config.max_packet_size,
            max_inflight: config.max_inflight.max(1),
            max_keep_alive: config.max_keep_alive.max(1),
            slow_client_timeout: config.slow_client_timeout,
            denied: match config.subscribe_denied_reason {
                DeniedReason::NotAuthorized => SubAckCode::NotAuthorized,
                DeniedReason::Unspecified => SubAckCode::Unspecified,
            },
            next_connection: AtomicU64::new(1),
            counters,
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum Close {
    /// The client sent DISCONNECT.
    Clean {
        session_expiry: Option<u32>,
        with_will: bool,
    },
    /// Anything else: the will is published.
    Abnormal(String),
    /// Another connection took the session over.
    TakenOver,
    /// The client took nothing from its full queue for the slow-client timeout.
    Slow,
    /// The broker is stopping.
    Shutdown,
}

/// Serve one client until it disconnects, misbehaves, is taken over or the broker stops.
pub(crate) async fn serve<S>(
    mut stream: S,
    peer: SocketAddr,
    identity: Option<String>,
    settings: Arc<Settings>,
    router: mpsc::Sender<RouterRequest>,
    shutdown: CancellationToken,
    admission: super::listener::Admission,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut read_buf = BytesMut::with_capacity(4096);
    // The listener's connect_timeout covers the handshakes and this read together.
    let connect = tokio::select! {
        _ = shutdown.cancelled() => return,
        read = tokio::time::timeout_at(admission.deadline(), read_connect(&mut stream, &mut read_buf, &settings)) => read,
    };
    let connect = match connect {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time, closing");
            return;
        }
        Ok(Err(ReadError::UnsupportedProtocol(level))) => {
            tracing::info!(%peer, level, "refused: unsupported protocol level");
            let refusal = refusal(ConnackCode::UnsupportedProtocol);
            let _ = send_now(&mut stream, Version::V311, &refusal).await;
            return;
        }
        Ok(Err(ReadError::InvalidConnect(version, violation))) => {
            tracing::info!(%peer, ?version, error = %violation, "bad CONNECT, closing");
            // MQTT 5 says why in a CONNACK; 3.1.1 closes without one (MQTT-3.1.4-1).
            if version == Version::V5 {
                let code = match violation.kind {
                    ViolationKind::Malformed => ConnackCode::MalformedPacket,
                    ViolationKind::ProtocolError => ConnackCode::ProtocolError,
                };
                let _ = send_now(&mut stream, version, &refusal(code)).await;
            }
            return;
        }
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "bad CONNECT, closing");
            return;
        }
        Ok(Ok(connect)) => connect,
    };
    // Counted against max_connections from here on (a refusal below gives it back).
    let connection_slot = admission.connect_read();
    let over_quota = connection_slot.is_none();

    let mut connect = connect;
    let mut assigned_client_id = None;
    if let Err(code) = admit(
        &mut connect,
        identity,
        &settings,
        over_quota,
        &mut assigned_client_id,
    ) {
        tracing::info!(%peer, client = %connect.client_id, ?code, "connection refused");
        let _ = send_now(&mut stream, connect.version, &refusal(code)).await;
        return;
    }

    let connection_id = settings.next_connection.fetch_add(1, Ordering::Relaxed);
    let client_id: Arc<str> = Arc::from(connect.client_id.as_str());
    let takeover = CancellationToken::new();
    let evict = CancellationToken::new();
    let (reply_tx, reply_rx) = oneshot::channel();
    let registered = router
        .send(RouterRequest::Connect {
            client_id: client_id.clone(),
            connection: connection_id,
            clean_start: connect.clean_start,
            session_expiry: connect.session_expiry,
            takeover: takeover.clone(),
            evict: evict.clone(),
            reply: reply_tx,
        })
        .await;
    let Ok(ConnectReply {
        session,
        session_present,
        persist,
    }) = (match registered {
        Ok(()) => reply_rx.await.map_err(|_| ()),
        Err(_) => Err(()),
    })
    else {
        let _ = send_now(
            &mut stream,
            connect.version,
            &refusal(ConnackCode::ServerUnavailable),
        )
        .await;
        return;
    };

    tracing::debug!(%peer, client = %client_id, version = ?connect.version, session_present, "client connected");
    // Past the configured limit an MQTT 5 client is told the keep alive to use; a 3.1.1
    // client cannot be told, and keeps its own.
    let server_keep_alive = (connect.version == Version::V5
        && (connect.keep_alive > settings.max_keep_alive || connect.keep_alive == 0)
        && settings.max_keep_alive < u16::MAX)
        .then_some(settings.max_keep_alive);
    let mut conn = Connection {
        version: connect.version,
        client_id: client_id.clone(),
        id: connection_id,
        session,
        settings: settings.clone(),
        router: router.clone(),
        keep_alive: server_keep_alive.unwrap_or(connect.keep_alive),
        receive_maximum: connect.receive_maximum,
        client_max_packet: connect.max_packet_size,
        session_expiry: connect.session_expiry,
        topic_aliases: HashMap::new(),
        outgoing_aliases: HashMap::new(),
        client_alias_max: connect.topic_alias_max,
        username: connect.username.clone(),
        out: BytesMut::with_capacity(4096),
        persist,
        pending_acks: AckQueue::default(),
        page_reply: None,
        watermark: None,
        watermark_due: None,
        congestion: Arc::new(Congestion::default()),
    };
    conn.queue(&Outgoing::ConnAck(ConnAckOut {
        session_present,
        code: ConnackCode::Accepted,
        assigned_client_id,
        receive_maximum: settings.max_inflight,
        max_packet_size: settings.max_packet_size,
        topic_alias_max: TOPIC_ALIAS_MAX,
        server_keep_alive,
        reason: None,
    }));
    conn.resend_inflight();

    let close = conn
        .run(&mut stream, &mut read_buf, [&takeover, &evict, &shutdown])
        .await;
    conn.store_watermark().await;
    let session_expiry = match &close {
        Close::Clean {
            session_expiry: Some(expiry),
            ..
        } => *expiry,
        _ => conn.session_expiry,
    };
    let publish_will = match &close {
        Close::Clean { with_will, .. } => *with_will,
        Close::Abnormal(_) | Close::TakenOver | Close::Slow => true,
        Close::Shutdown => false,
    };
    match &close {
        Close::Abnormal(reason) => {
            tracing::info!(%peer, client = %client_id, %reason, "connection closed")
        }
        other => tracing::debug!(%peer, client = %client_id, ?other, "connection closed"),
    }
    let will_allowed = |will: &protocol::Will| {
        let allowed = may_publish_to(
            &settings,
            connect.username.as_deref(),
            &client_id,
            &will.topic,
        );
        if !allowed {
            settings
                .counters
                .publishes_denied
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %client_id, topic = %will.topic, "will not published: denied");
        }
        allowed
    };
    let will = connect
        .will
        .clone()
        .filter(|will| publish_will && will_allowed(will))
        .map(|will| {
            let message = Message {
                topic: Arc::from(will.topic.as_str()),
                payload: will.payload,
                qos: will.qos,
                retain: will.retain,
                properties: will.properties.map(Arc::new),
                origin: Origin::Client(client_id.clone()),
                received: Instant::now(),
            };
            (message, will.delay)
        });
    let _ = router
        .send(RouterRequest::Disconnected {
            client_id,
            connection: connection_id,
            will,
            session_expiry,
        })
        .await;
    linger_close(&mut stream, &mut read_buf).await;
    drop(connection_slot);
}

/// Close our side, then read and discard until the client closes too (briefly). Closing a
/// socket with unread input makes the kernel send a reset, which can destroy the last
/// packets we sent (a DISCONNECT reason, the gateway's `offline` status) before the client
/// reads them.
async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, buf: &mut BytesMut) {
    const LINGER: Duration = Duration::from_millis(500);
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            buf.clear();
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    settings: &Settings,
) -> Result<ConnectRequest, ReadError> {
    loop {
        match protocol::read_connect(buf, settings.max_packet_size) {
            Err(ReadError::Incomplete) => {}
            other => return other,
        }
        let read = stream
            .read_buf(buf)
            .await
            .map_err(|e| ReadError::Malformed(e.to_string()))?;
        if read == 0 {
            return Err(ReadError::Malformed("closed before CONNECT".into()));
        }
        settings
            .counters
            .bytes_received
            .fetch_add(read as u64, Ordering::Relaxed);
    }
}

/// Check a CONNECT: capacity, client id, credentials, will topic.
fn admit(
    connect: &mut ConnectRequest,
    identity: Option<String>,
    settings: &Settings,
    over_quota: bool,
    assigned: &mut Option<String>,
) -> Result<(), ConnackCode> {
    if over_quota {
        return Err(if connect.version == Version::V5 {
            ConnackCode::QuotaExceeded
        } else {
            ConnackCode::ServerUnavailable
        });
    }
    if connect.authentication_method.is_some() {
        return Err(ConnackCode::BadAuthenticationMethod);
    }
    if connect.client_id.is_empty() {
        if connect.version == Version::V311 && !connect.clean_start {
            return Err(ConnackCode::IdentifierRejected);
        }
        let id = format!("fieldmq-{:016x}", rand::random::<u64>());
        connect.client_id = id.clone();
        if connect.version == Version::V5 {
            *assigned = Some(id);
        }
    }
    if let Some(will) = &connect.will {
        if !topic::valid_topic_name(&will.topic) {
            return Err(ConnackCode::ProtocolError);
        }
    }
    authenticate(connect, identity, settings)?;
    // The will is a publish the client makes in advance: the same rules apply now, so a
    // client cannot have the broker publish where it may not (and again when it is due).
    if let Some(will) = &connect.will {
        if !may_publish_to(
            settings,
            connect.username.as_deref(),
            &connect.client_id,
            &will.topic,
        ) {
            return Err(ConnackCode::NotAuthorized);
        }
    }
    Ok(())
}

/// Whether a client may publish to `topic`: not a `$` topic (those are the broker's own,
/// like `$SYS`), and allowed by the ACL.
fn may_publish_to(
    settings: &Settings,
    username: Option<&str>,
    client_id: &str,
    topic: &str,
) -> bool {
    !topic.starts_with('$')
        && settings
            .acl
            .as_ref()
            .is_none_or(|acl| acl.can_publish(username, client_id, topic))
}

/// Check the credentials; the client certificate's CN becomes the username.
fn authenticate(
    connect: &mut ConnectRequest,
    identity: Option<String>,
    settings: &Settings,
) -> Result<(), ConnackCode> {
    if let Some(common_name) = identity {
        // The listener verified the client certificate; its CN is the username.
        connect.username = Some(common_name);
        return Ok(());
    }
    match (&connect.username, &settings.passwords) {
        (Some(user), Some(passwords)) => {
            let password = connect.password.as_deref().unwrap_or("");
            if passwords.verify(user, password) {
                Ok(())
            } else {
                Err(ConnackCode::BadCredentials)
            }
        }
        _ if settings.allow_anonymous => Ok(()),
        (Some(_), None) => Err(ConnackCode::BadCredentials),
        (None, _) => Err(ConnackCode::NotAuthorized),
    }
}

fn refusal(code: ConnackCode) -> Outgoing {
    Outgoing::ConnAck(ConnAckOut {
        session_present: false,
        code,
        assigned_client_id: None,
        receive_maximum: 0,
        max_packet_size: 0,
        topic_alias_max: 0,
        server_keep_alive: None,
        reason: None,
    })
}

async fn send_now<S: AsyncWrite + Unpin>(
    stream: &mut S,
    version: Version,
    packet: &Outgoing,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    if protocol::write(version, packet, &mut buf, None).is_ok() {
        stream.write_all(&buf).await?;
        stream.flush().await?;
    }
    Ok(())
}

struct Connection {
    version: Version,
    client_id: Arc<str>,
    id: u64,
    session: Arc<Session>,
    settings: Arc<Settings>,
    router: mpsc::Sender<RouterRequest>,
    keep_alive: u16,
    receive_maximum: u16,
    client_max_packet: Option<u32>,
    session_expiry: u32,
    topic_aliases: HashMap<u16, String>,
    /// Aliases we gave topics towards the client (MQTT 5), up to its Topic Alias Maximum.
    outgoing_aliases: HashMap<Arc<str>, u16>,
    client_alias_max: u16,
    /// For ACL checks.
    username: Option<String>,
    out: BytesMut,
    /// The store, when the session is persistent: acks delete rows, sends record pkids.
    persist: Option<Persist>,
    /// Publishes routed but not yet acknowledged (waiting for their commit), in order.
    pending_acks: AckQueue,
    /// A page of queued messages asked for and not yet read from disk.
    page_reply: Option<PageReply>,
    /// Deliveries acknowledged in order since the store last heard: (through seq, count).
    watermark: Option<(u64, u64)>,
    /// When the store is told at the latest.
    watermark_due: Option<tokio::time::Instant>,
    /// Where the router reports a subscriber queue this client's publishes found full.
    congestion: Arc<Congestion>,
}

/// What [`Connection::poll_for_answer`] found.
enum Answer {
    Read(std::io::Result<usize>),
    Acks(PendingAck),
    None,
}

/// A PUBACK/PUBREC to send once the router (and, with `sync` durability, the disk) has
/// taken the message.
struct PendingAck {
    pkid: u16,
    qos: QoS,
    /// False when the store could not commit: the client gets no acknowledgement and
    /// resends.
    stored: bool,
    reason: AckReason,
}

/// Acknowledgements owed, in the order the publishes came. Only the oldest is waited on:
/// a commit answers its publishes in order, so one wake-up finds the rest ready too (and
/// the store thread wakes this task once per commit, not once per message).
#[derive(Default)]
struct AckQueue {
    owed: VecDeque<OwedAck>,
}

struct OwedAck {
    pkid: u16,
    qos: QoS,
    reason: AckReason,
    /// Answered by the router (or, with `sync` durability, the store); `None`: nothing to
    /// wait for (a publish the ACL denied).
    routed: Option<oneshot::Receiver<bool>>,
}

impl AckQueue {
    fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    fn push(
        &mut self,
        pkid: u16,
        qos: QoS,
        reason: AckReason,
        routed: Option<oneshot::Receiver<bool>>,
    ) {
        self.owed.push_back(OwedAck {
            pkid,
            qos,
            reason,
            routed,
        });
    }

    /// The oldest acknowledgement once it is due.
    async fn next(&mut self) -> Option<PendingAck> {
        std::future::poll_fn(|cx| {
            let Some(front) = self.owed.front_mut() else {
                return std::task::Poll::Ready(None);
            };
            let stored = match front.routed.as_mut() {
                None => true,
                Some(routed) => match std::future::Future::poll(std::pin::Pin::new(routed), cx) {
                    std::task::Poll::Ready(answer) => answer.is_ok(),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                },
            };
            std::task::Poll::Ready(self.pop(stored))
        })
        .await
    }

    /// The oldest acknowledgement if it is due now.
    fn try_next(&mut self) -> Option<PendingAck> {
        let front = self.owed.front_mut()?;
        let stored = match front.routed.as_mut() {
            None => true,
            Some(routed) => match routed.try_recv() {
                Ok(_) => true,
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => false,
            },
        };
        self.pop(stored)
    }

    fn pop(&mut self, stored: bool) -> Option<PendingAck> {
        self.owed.pop_front().map(|owed| PendingAck {
            pkid: owed.pkid,
            qos: owed.qos,
            stored,
            reason: owed.reason,
        })
    }
}

impl Connection {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        read_buf: &mut BytesMut,
        [takeover, evict, shutdown]: [&CancellationToken; 3],
    ) -> Close {
        // MQTT: the server allows one and a half keep-alive periods of silence.
        let keep_alive =
            (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        // One timer for the whole connection: packets only move `last_packet`, and the timer
        // is re-armed from it when it fires (cheaper than a new timer per packet).
        let mut last_packet = tokio::time::Instant::now();
        let keep_alive_timer = tokio::time::sleep(keep_alive.unwrap_or(Duration::MAX / 4));
        tokio::pin!(keep_alive_timer);
        // The other waits also live as long as the connection: made afresh on every turn of
        // the loop, each would register and unregister itself (a lock, a timer) per turn.
        let session = self.session.clone();
        let wake = session.wake.notified();
        let watermark_timer = tokio::time::sleep(Duration::MAX / 4);
        let taken_over = takeover.cancelled();
        let evicted = evict.cancelled();
        let shutting_down = shutdown.cancelled();
        tokio::pin!(wake, watermark_timer, taken_over, evicted, shutting_down);
        let mut yielded = false;
        loop {
            // Process whatever complete packets are already buffered.
            let mut got_packet = false;
            loop {
                if let Some(full) = self.congestion.take() {
                    // A subscriber queue our publishes went to is full: read nothing more
                    // from this client until it has room (the backpressure lands on this
                    // publisher, not on the router or other clients). Our own deliveries
                    // and acknowledgements go on meanwhile.
                    let outcome = loop {
                        self.pump().await;
                        if let Err(error) = self.flush(stream).await {
                            return Close::Abnormal(format!("write failed: {error}"));
                        }
                        if Arc::ptr_eq(&full, &self.session) {
                            // Only this connection drains its own queue: waiting on it
                            // would wait on itself.
                            break Room::Made;
                        }
                        tokio::select! {
                            room = full.wait_for_room(self.settings.slow_client_timeout) => break room,
                            _ = &mut wake => wake.set(session.wake.notified()),
                            Some(ack) = self.pending_acks.next(), if !self.pending_acks.is_empty() => {
                                if let Err(close) = self.acknowledge_ready(ack, stream).await {
                                    return close;
                                }
                            }
                            _ = &mut evicted => return self.close_slow(stream).await,
                            _ = &mut taken_over => return self.close_taken_over(stream).await,
                            _ = &mut shutting_down => return self.close_shutdown(stream).await,
                        }
                    };
                    if outcome == Room::Evicted {
                        self.settings
                            .counters
                            .slow_clients_disconnected
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            client = %full.client_id,
                            publisher = %self.client_id,
                            timeout = ?self.settings.slow_client_timeout,
                            "client disconnected: it took nothing from its full queue for slow_client_timeout"
                        );
                    }
                }
                match protocol::read(self.version, read_buf, self.settings.max_packet_size) {
                    Ok(packet) => {
                        if matches!(packet, Incoming::Publish(_)) && !yielded {
                            // Tokio runs the task woken last first. Yielding once per read
                            // before routing a publish lets connections whose bytes arrived
                            // earlier go first: a SUBSCRIBE sent on one connection just
                            // before a PUBLISH on another is in place when the PUBLISH is
                            // routed, as a single-threaded broker would have it.
                            tokio::task::yield_now().await;
                            yielded = true;
                        }
                        got_packet = true;
                        if let Some(close) = self.handle(packet).await {
                            if matches!(close, Close::Clean { .. }) {
                                self.drain_acks().await;
                            }
                            let _ = self.flush(stream).await;
                            return close;
                        }
                    }
                    Err(ReadError::Incomplete) => break,
                    Err(ReadError::TooLarge(size)) => {
                        self.queue(&Outgoing::Disconnect(DisconnectReason::PacketTooLarge));
                        let _ = self.flush(stream).await;
                        return Close::Abnormal(format!(
                            "packet of {size} bytes exceeds max_packet_size {}",
                            self.settings.max_packet_size
                        ));
                    }
                    Err(ReadError::Invalid(violation)) => {
                        self.queue(&Outgoing::Disconnect(match violation.kind {
                            ViolationKind::Malformed => DisconnectReason::MalformedPacket,
                            ViolationKind::ProtocolError => DisconnectReason::ProtocolError,
                        }));
                        let _ = self.flush(stream).await;
                        return Close::Abnormal(violation.to_string());
                    }
                    Err(error) => {
                        self.queue(&Outgoing::Disconnect(DisconnectReason::MalformedPacket));
                        let _ = self.flush(stream).await;
                        return Close::Abnormal(error.to_string());
                    }
                }
            }
            if got_packet {
                last_packet = tokio::time::Instant::now();
            }
            self.pump().await;
            self.store_watermark_if_due().await;
            // Sent deliveries the client is to acknowledge: its answer is on its way.
            let awaits_answer = !self.out.is_empty() && !self.session.lock().inflight.is_empty();
            if let Err(error) = self.flush(stream).await {
                return Close::Abnormal(format!("write failed: {error}"));
            }
            if awaits_answer {
                match self.poll_for_answer(stream, read_buf).await {
                    Answer::Read(read) => match self.on_read(read) {
                        Ok(()) => {
                            yielded = false;
                            continue;
                        }
                        Err(close) => return close,
                    },
                    Answer::Acks(first) => {
                        if let Err(close) = self.acknowledge_ready(first, stream).await {
                            return close;
                        }
                        continue;
                    }
                    Answer::None => {}
                }
            }
            if let Some(due) = self.watermark_due {
                if watermark_timer.deadline() != due {
                    watermark_timer.as_mut().reset(due);
                }
            }

            tokio::select! {
                read = stream.read_buf(read_buf) => match self.on_read(read) {
                    Ok(()) => yielded = false,
                    Err(close) => return close,
                },
                _ = &mut wake => wake.set(session.wake.notified()),
                rows = next_page(&mut self.page_reply), if self.page_reply.is_some() => {
                    self.page_reply = None;
                    self.session
                        .add_page(rows.into_iter().map(|(_, row)| row.delivery).collect());
                }
                _ = &mut watermark_timer, if self.watermark_due.is_some() => {
                    self.store_watermark().await;
                }
                Some(ack) = self.pending_acks.next(), if !self.pending_acks.is_empty() => {
                    if let Err(close) = self.acknowledge_ready(ack, stream).await {
                        return close;
                    }
                }
                _ = &mut keep_alive_timer, if keep_alive.is_some() => {
                    let limit = last_packet + keep_alive.unwrap_or_default();
                    if limit > tokio::time::Instant::now() {
                        keep_alive_timer.as_mut().reset(limit);
                        continue;
                    }
                    self.queue(&Outgoing::Disconnect(DisconnectReason::KeepAliveTimeout));
                    let _ = self.flush(stream).await;
                    return Close::Abnormal("keep-alive timeout".into());
                }
                _ = &mut evicted => return self.close_slow(stream).await,
                _ = &mut taken_over => return self.close_taken_over(stream).await,
                _ = &mut shutting_down => return self.close_shutdown(stream).await,
            }
        }
    }

    async fn close_taken_over<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Close {
        self.queue(&Outgoing::Disconnect(DisconnectReason::SessionTakenOver));
        let _ = self.flush(stream).await;
        Close::TakenOver
    }

    async fn close_slow<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Close {
        // Best effort: a client that does not read may never see it.
        self.queue(&Outgoing::Disconnect(DisconnectReason::QuotaExceeded));
        let _ = futures::FutureExt::now_or_never(self.flush(stream));
        Close::Slow
    }

    async fn close_shutdown<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Close {
        // Deliver what is already queued (the gateway's `offline` status) first.
        self.drain_acks().await;
        self.pump().await;
        self.queue(&Outgoing::Disconnect(DisconnectReason::ServerShuttingDown));
        let _ = self.flush(stream).await;
        Close::Shutdown
    }

    /// Poll the socket, and the acknowledgements owed, for up to [`ANSWER_POLL`]. Each turn
    /// yields to the runtime, which then polls its I/O without sleeping.
    async fn poll_for_answer<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        read_buf: &mut BytesMut,
    ) -> Answer {
        let deadline = Instant::now() + ANSWER_POLL;
        while Instant::now() < deadline {
            tokio::task::yield_now().await;
            // A read polled once and dropped when pending loses nothing (tokio's `read_buf`
            // is cancel safe).
            if let Some(read) = futures::FutureExt::now_or_never(stream.read_buf(read_buf)) {
                return Answer::Read(read);
            }
            if let Some(ack) = self.pending_acks.try_next() {
                return Answer::Acks(ack);
            }
        }
        Answer::None
    }

    /// Account for a read; `Err` ends the connection.
    fn on_read(&self, read: std::io::Result<usize>) -> Result<(), Close> {
        match read {
            Ok(0) => Err(Close::Abnormal(
                "connection closed by client without DISCONNECT".into(),
            )),
            Ok(n) => {
                self.settings
                    .counters
                    .bytes_received
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => Err(Close::Abnormal(format!("read failed: {error}"))),
        }
    }

    /// One commit answers many publishes: queue `first` and every acknowledgement ready
    /// after it, so they leave in one write. `Err` ends the connection.
    async fn acknowledge_ready<S: AsyncWrite + Unpin>(
        &mut self,
        first: PendingAck,
        stream: &mut S,
    ) -> Result<(), Close> {
        let mut next = Some(first);
        while let Some(ack) = next {
            if !self.acknowledge(ack) {
                // What was committed before is still acknowledged.
                let _ = self.flush(stream).await;
                return Err(Close::Abnormal(
                    "the broker store could not commit a message".into(),
                ));
            }
            next = self.pending_acks.try_next();
        }
        Ok(())
    }

    /// Handle one packet; `Some` ends the connection.
    async fn handle(&mut self, packet: Incoming) -> Option<Close> {
        match packet {
            Incoming::Publish(publish) => return self.on_publish(publish).await,
            Incoming::PubAck(pkid) => {
                if let Some(Some(seq)) = self.session.ack(pkid) {
                    self.forget(seq).await;
                }
            }
            Incoming::PubRec(pkid) => match self.session.received(pkid) {
                Some(seq) => {
                    self.queue(&Outgoing::PubRel(pkid));
                    if let Some(seq) = seq {
                        self.store_inflight(seq, pkid, InflightState::Released)
                            .await;
                    }
                }
                None => self.queue(&Outgoing::PubRelNotFound(pkid)),
            },
            Incoming::PubRel(pkid) => {
                let known = self.session.lock().incoming_qos2.remove(&pkid);
                self.queue(&if known {
                    Outgoing::PubComp(pkid)
                } else {
                    Outgoing::PubCompNotFound(pkid)
                });
            }
            Incoming::PubComp(pkid) => {
                if let Some(Some(seq)) = self.session.completed(pkid) {
                    self.forget(seq).await;
                }
            }
            Incoming::Subscribe {
                pkid,
                filters,
                subscription_id,
            } => {
                if filters.is_empty() {
                    return Some(self.protocol_error("SUBSCRIBE without filters"));
                }
                // Denied filters get "not authorised" in their place; the rest go on.
                let allowed: Vec<bool> = filters
                    .iter()
                    .map(|f| self.may_subscribe(&f.filter))
                    .collect();
                let permitted: Vec<_> = filters
                    .into_iter()
                    .zip(&allowed)
                    .filter(|(_, ok)| **ok)
                    .map(|(f, _)| f)
                    .collect();
                let mut granted = Vec::new().into_iter();
                if !permitted.is_empty() {
                    let (reply, codes) = oneshot::channel();
                    let request = RouterRequest::Subscribe {
                        client_id: self.client_id.clone(),
                        filters: permitted,
                        subscription_id,
                        reply,
                    };
                    if self.router.send(request).await.is_err() {
                        return Some(Close::Shutdown);
                    }
                    let Ok(codes) = codes.await else {
                        return Some(Close::Shutdown);
                    };
                    granted = codes.into_iter();
                }
                let codes = allowed
                    .iter()
                    .map(|ok| {
                        if *ok {
                            granted.next().unwrap_or(SubAckCode::TopicFilterInvalid)
                        } else {
                            self.settings.denied
                        }
                    })
                    .collect();
                self.queue(&Outgoing::SubAck(pkid, codes));
            }
            Incoming::Unsubscribe { pkid, filters } => {
                let (reply, found) = oneshot::channel();
                let request = RouterRequest::Unsubscribe {
                    client_id: self.client_id.clone(),
                    filters,
                    reply,
                };
                if self.router.send(request).await.is_err() {
                    return Some(Close::Shutdown);
                }
                let Ok(found) = found.await else {
                    return Some(Close::Shutdown);
                };
                self.queue(&Outgoing::UnsubAck(pkid, found));
            }
            Incoming::PingReq => self.queue(&Outgoing::PingResp),
            Incoming::Disconnect {
                session_expiry,
                with_will,
            } => {
                if self.session_expiry == 0 && session_expiry.is_some_and(|e| e > 0) {
                    // MQTT 5 3.14.2.2.2: a session created without expiry cannot gain one.
                    return Some(self.protocol_error("session expiry set at DISCONNECT"));
                }
                return Some(Close::Clean {
                    session_expiry,
                    with_will,
                });
            }
            Incoming::Unexpected(what) => {
                return Some(self.protocol_error(&format!("unexpected {what}")))
            }
        }
        None
    }

    async fn on_publish(&mut self, mut publish: PublishIn) -> Option<Close> {
        if let Some(alias) = publish.topic_alias {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                self.queue(&Outgoing::Disconnect(DisconnectReason::TopicAliasInvalid));
                return Some(Close::Abnormal(format!("topic alias {alias} out of range")));
            }
            if publish.topic.is_empty() {
                match self.topic_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return Some(self.protocol_error("unknown topic alias")),
                }
            } else {
                self.topic_aliases.insert(alias, publish.topic.clone());
            }
        }
        if !topic::valid_topic_name(&publish.topic) {
            self.queue(&Outgoing::Disconnect(DisconnectReason::TopicNameInvalid));
            return Some(Close::Abnormal(format!(
                "invalid topic name {:?} in PUBLISH",
                publish.topic
            )));
        }
        if !self.may_publish(&publish.topic) {
            // Dropped; acknowledged in order so the client does not resend it forever.
            self.settings
                .counters
                .publishes_denied
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %self.client_id, topic = %publish.topic, "publish denied (ACL or a $ topic)");
            if publish.qos != QoS::AtMostOnce {
                self.pending_acks
                    .push(publish.pkid, publish.qos, AckReason::NotAuthorized, None);
            }
            return None;
        }
        if publish.qos == QoS::ExactlyOnce {
            let mut state = self.session.lock();
            if state.incoming_qos2.contains(&publish.pkid) {
                // A retransmission of a message already routed: only acknowledge it again.
                drop(state);
                self.queue(&Outgoing::PubRec(publish.pkid, AckReason::Success));
                return None;
            }
            // MQTT 5: the Receive Maximum we advertised. 3.1.1 has none, and clients such
            // as MQTT.js send bursts of QoS 2 at once: a generous bound instead.
            let limit = match self.version {
                Version::V5 => usize::from(self.settings.max_inflight),
                Version::V311 => MAX_INCOMING_QOS2_V311,
            };
            if state.incoming_qos2.len() >= limit {
                drop(state);
                self.queue(&Outgoing::Disconnect(
                    DisconnectReason::ReceiveMaximumExceeded,
                ));
                return Some(Close::Abnormal(format!(
                    "more than {limit} QoS 2 publishes awaiting PUBREL"
                )));
            }
            state.incoming_qos2.insert(publish.pkid);
        }
        let pkid = publish.pkid;
        let qos = publish.qos;
        let message = Message {
            topic: Arc::from(publish.topic.as_str()),
            payload: publish.payload,
            qos,
            retain: publish.retain,
            properties: publish.properties.map(Arc::new),
            origin: Origin::Client(self.client_id.clone()),
            received: Instant::now(),
        };
        let (done, routed) = if qos == QoS::AtMostOnce {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        self.congestion.reserve().await;
        let sent = self
            .router
            .send(RouterRequest::Publish {
                message,
                done,
                congestion: Some(self.congestion.clone()),
            })
            .await;
        if sent.is_err() {
            return Some(Close::Shutdown);
        }
        if let Some(routed) = routed {
            // Acknowledged when the router (and with `sync` durability, the disk) has it;
            // later publishes keep flowing meanwhile, acks go out in order.
            self.pending_acks
                .push(pkid, qos, AckReason::Success, Some(routed));
        }
        None
    }

    /// Queue the acknowledgement of a publish whose message is safe. Returns false when it
    /// could not be stored (the connection then closes so the client resends).
    fn acknowledge(&mut self, ack: PendingAck) -> bool {
        if !ack.stored {
            return false;
        }
        match ack.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue(&Outgoing::PubAck(ack.pkid, ack.reason)),
            QoS::ExactlyOnce => self.queue(&Outgoing::PubRec(ack.pkid, ack.reason)),
        }
        true
    }

    /// Before closing: acknowledge what is still being committed (bounded).
    async fn drain_acks(&mut self) {
        let _ = tokio::time::timeout(ACK_DRAIN, async {
            while let Some(ack) = self.pending_acks.next().await {
                if !self.acknowledge(ack) {
                    return;
                }
            }
        })
        .await;
    }

    fn may_subscribe(&self, filter: &str) -> bool {
        let filter = topic::parse_filter(filter).map_or(filter, |f| f.filter);
        self.settings
            .acl
            .as_ref()
            .is_none_or(|acl| acl.can_subscribe(self.username.as_deref(), &self.client_id, filter))
    }

    fn may_publish(&self, topic: &str) -> bool {
        may_publish_to(
            &self.settings,
            self.username.as_deref(),
            &self.client_id,
            topic,
        )
    }

    fn may_receive(&self, topic: &str) -> bool {
        self.settings
            .acl
            .as_ref()
            .is_none_or(|acl| acl.can_receive(self.username.as_deref(), &self.client_id, topic))
    }

    fn protocol_error(&mut self, what: &str) -> Close {
        self.queue(&Outgoing::Disconnect(DisconnectReason::ProtocolError));
        Close::Abnormal(format!("protocol error: {what}"))
    }

    /// After a reconnect with a session: resend unacknowledged publishes (DUP set) and
    /// PUBRELs, in their original order.
    fn resend_inflight(&mut self) {
        for entry in self.session.inflight_snapshot() {
            match entry.state {
                InflightState::Released => self.queue(&Outgoing::PubRel(entry.pkid)),
                _ => {
                    // A resend the client can no longer take is dropped like a first send.
                    let _ = self.queue_publish(&entry, true);
                }
            }
        }
    }

    /// A delivery is complete: its row goes. In the usual case (acknowledged in order) that
    /// is a watermark that covers it (told to the store by
    /// [`Self::store_watermark_if_due`]); an acknowledgement out of order deletes its own row.
    async fn forget(&mut self, seq: u64) {
        let through = self.session.done_through();
        if seq <= through {
            let count = self.watermark.map_or(0, |(_, count)| count);
            self.watermark = Some((through, count + 1));
            self.watermark_due
                .get_or_insert_with(|| tokio::time::Instant::now() + WATERMARK_DELAY);
        } else {
            self.store_removed(seq).await;
        }
    }

    /// Tell the store the watermark every [`WATERMARK_EVERY`] acknowledgements, whenever
    /// nothing is left in flight, and at the latest [`WATERMARK_DELAY`] after an
    /// acknowledgement: a draining queue costs the store one write per few hundred messages,
    /// and a watermark is never far behind.
    async fn store_watermark_if_due(&mut self) {
        let due = self.watermark.is_some_and(|(_, count)| {
            count >= WATERMARK_EVERY || self.session.lock().inflight.is_empty()
        });
        if due {
            self.store_watermark().await;
        }
    }

    async fn store_watermark(&mut self) {
        self.watermark_due = None;
        if let Some((through, count)) = self.watermark.take() {
            self.store(Op::Acked {
                client_id: self.client_id.clone(),
                through,
                count,
            })
            .await;
        }
    }

    async fn store_inflight(&self, seq: u64, pkid: u16, state: InflightState) {
        let client_id = self.client_id.clone();
        self.store(Op::Inflight {
            client_id,
            seq,
            pkid,
            state,
        })
        .await;
    }

    /// The row of a message this client is done with (out of order, expired, dropped).
    async fn store_removed(&self, seq: u64) {
        let client_id = self.client_id.clone();
        self.store(Op::Remove { client_id, seq }).await;
    }

    async fn store(&self, op: Op) {
        if let Some(persist) = &self.persist {
            persist.send(op).await;
        }
    }

    /// Move what the session may send now into the write buffer, and ask for the next page
    /// from disk when the in-memory queue runs low, and for the next page of retained
    /// messages when the queue has drained.
    async fn pump(&mut self) {
        // Like Mosquitto's max_inflight_messages: a 3.1.1 client states no limit, and a long
        // in-flight list only delays acknowledgements without speeding anything up.
        let window = usize::from(self.receive_maximum.min(self.settings.max_inflight));
        loop {
            if self.session.retained_page_wanted() {
                // Answered in the session queue (and its wake-up), not here: the router
                // places the page when it comes to the request.
                let request = RouterRequest::RetainedPage {
                    client_id: self.client_id.clone(),
                    connection: self.id,
                };
                if self.router.send(request).await.is_err() {
                    return;
                }
            }
            if let (Some(after_seq), Some(persist), None) = (
                self.session.page_wanted(PAGE_LOW_WATER),
                &self.persist,
                &self.page_reply,
            ) {
                self.page_reply = Some(
                    persist
                        .request_page(self.client_id.clone(), after_seq, PAGE_SIZE)
                        .await,
                );
            }
            let session = self.session.clone();
            let report = session.send_queued(self.id, window, Instant::now(), |entry| {
                let topic = &entry.delivery.message.topic;
                if self.may_receive(topic) && self.encode_publish(entry, false) {
                    Handed::Sent
                } else {
                    Handed::Dropped
                }
            });
            for seq in report.expired.into_iter().chain(report.dropped) {
                self.store_removed(seq).await;
            }
            // QoS 2 needs its packet id after a restart (the client de-duplicates by it); a
            // QoS 1 message in flight at a crash is simply sent again, which QoS 1 allows, so
            // it costs no write here.
            for (seq, pkid) in report.qos2_sent {
                self.store_inflight(seq, pkid, InflightState::Qos2Sent)
                    .await;
            }
            if report.handed == 0 {
                return;
            }
            self.settings
                .counters
                .messages_sent
                .fetch_add(report.handed as u64, Ordering::Relaxed);
        }
    }

    /// Encode a resent publish. Returns the row to delete when the message was dropped
    /// because the client cannot take it.
    fn queue_publish(&mut self, entry: &Inflight, dup: bool) -> Option<u64> {
        if self.encode_publish(entry, dup) {
            None
        } else {
            self.drop_delivery(entry)
        }
    }

    /// Encode one publish; false when the client cannot take it (MQTT 5 Maximum Packet
    /// Size): it is then dropped as if delivered.
    fn encode_publish(&mut self, entry: &Inflight, dup: bool) -> bool {
        let message = &entry.delivery.message;
        let (topic_alias, topic_known) = self.outgoing_alias(&message.topic);
        let packet = Outgoing::Publish(PublishOut {
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            qos: entry.delivery.qos,
            retain: entry.delivery.retain,
            dup,
            pkid: entry.pkid,
            properties: message.properties.clone(),
            message_expiry: message
                .has_expiry()
                .then(|| message.remaining_expiry(Instant::now()))
                .flatten(),
            subscription_ids: entry.delivery.subscription_ids.clone(),
            topic_alias,
            topic_known,
        });
        if let Err(error) =
            protocol::write(self.version, &packet, &mut self.out, self.client_max_packet)
        {
            // MQTT 5: a message the client cannot take is dropped as if delivered.
            tracing::debug!(client = %self.client_id, %error, "message dropped");
            if !topic_known && topic_alias.is_some() {
                self.outgoing_aliases.remove(&message.topic);
            }
            return false;
        }
        true
    }

    /// Complete a delivery locally without sending it; returns its row to delete.
    fn drop_delivery(&self, entry: &Inflight) -> Option<u64> {
        match entry.delivery.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => self.session.ack(entry.pkid).flatten(),
            QoS::ExactlyOnce => {
                self.session.received(entry.pkid);
                self.session.completed(entry.pkid).flatten()
            }
        }
    }

    /// The alias for a topic towards this client, and whether the client already knows it
    /// (then the topic itself is left out of the PUBLISH).
    fn outgoing_alias(&mut self, topic: &Arc<str>) -> (Option<u16>, bool) {
        if self.version != Version::V5 || self.client_alias_max == 0 {
            return (None, false);
        }
        if let Some(alias) = self.outgoing_aliases.get(topic) {
            return (Some(*alias), true);
        }
        let next = self.outgoing_aliases.len() + 1;
        match u16::try_from(next) {
            Ok(alias) if alias <= self.client_alias_max => {
                self.outgoing_aliases.insert(topic.clone(), alias);
                (Some(alias), false)
            }
            _ => (None, false),
        }
    }

    fn queue(&mut self, packet: &Outgoing) {
        if matches!(packet, Outgoing::Disconnect(_)) && self.version == Version::V311 {
            return; // 3.1.1 has no server DISCONNECT: closing the socket says it.
        }
        if let Err(error) =
            protocol::write(self.version, packet, &mut self.out, self.client_max_packet)
        {
            tracing::debug!(client = %self.client_id, %error, "packet not sent");
        }
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let len = self.out.len();
        // Written from the buffer in place and then cleared: it keeps its capacity, so the
        // next packets are encoded without a new allocation.
        // A client that does not take our bytes for the slow-client timeout is cut off.
        let written = tokio::time::timeout(self.settings.slow_client_timeout, async {
            stream.write_all(&self.out).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read"))?;
        self.out.clear();
        self.settings
            .counters
            .bytes_sent
            .fetch_add(len as u64, Ordering::Relaxed);
        written
    }
}

/// The rows of a pending page (empty when the store has gone); never resolves without one.
async fn next_page(reply: &mut Option<PageReply>) -> Vec<(u64, StoredDelivery)> {
    match reply {
        Some(rows) => rows.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acknowledgements_leave_in_publish_order_whatever_order_they_are_answered_in() {
        let mut acks = AckQueue::default();
        let (first_tx, first_rx) = oneshot::channel();
        let (second_tx, second_rx) = oneshot::channel();
        acks.push(1, QoS::AtLeastOnce, AckReason::Success, Some(first_rx));
        acks.push(2, QoS::AtLeastOnce, AckReason::NotAuthorized, None);
        acks.push(3, QoS::ExactlyOnce, AckReason::Success, Some(second_rx));

        // The denied publish (2) needs no answer, but waits behind 1.
        assert!(acks.try_next().is_none());
        second_tx.send(true).expect("receiver alive");
        assert!(acks.try_next().is_none());

        first_tx.send(false).expect("receiver alive");
        let order: Vec<(u16, bool)> = std::iter::from_fn(|| acks.try_next())
            .map(|ack| (ack.pkid, ack.stored))
            .collect();
        assert_eq!(order, [(1, true), (2, true), (3, true)]);
        assert!(acks.is_empty());
    }

    #[tokio::test]
    async fn a_publish_the_store_could_not_commit_is_owed_no_acknowledgement() {
        let mut acks = AckQueue::default();
        let (lost_tx, lost_rx) = oneshot::channel::<bool>();
        acks.push(7, QoS::AtLeastOnce, AckReason::Success, Some(lost_rx));
        let waiting = tokio::spawn(async move { acks.next().await.map(|a| (a.pkid, a.stored)) });
        // The store drops the waiter of a failed commit.
        drop(lost_tx);
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("answered")
            .expect("task");
        assert_eq!(answer, Some((7, false)));
    }
}
