//! One task per client connection: reads packets, answers them, and sends what the
//! router queued in the client's session, within the client's Receive Maximum.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::acl::Acl;
use super::auth::PasswordFile;
use super::config::{BrokerConfig, DeniedReason};
use super::protocol::{
    self, AckReason, ConnAckOut, ConnackCode, ConnectRequest, DisconnectReason, Incoming, Outgoing,
    PublishIn, PublishOut, ReadError, SubAckCode, Version, ViolationKind,
};
use super::router::{ConnectReply, RouterRequest};
use super::session::{Congestion, Delivery, Handed, Inflight, Room, Session};
use crate::model::{Message, Origin, QoS};
use crate::mqtt::topic;
use crate::status::{ClientBoard, ClientPresence, ProtocolVersion};
use crate::store::sessions::{InflightState, Op, PageReply, Persist, StoredDelivery};

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

/// What a read may take while the client sends little: the input buffer a quiet
/// connection holds while it waits. Most packets of a quiet client fit (a PINGREQ, an
/// acknowledgement, a small PUBLISH).
const READ_QUIET: usize = 256;
/// What a read may take once a read has filled all the room it had.
const READ_BUSY: usize = 4096;
/// Below this much room the input buffer grows before a read.
const READ_MIN: usize = 64;
/// Bounds of the room reserved when packets are encoded into an empty output buffer: the
/// size of the connection's last write, within these.
const WRITE_MIN: usize = 256;
const WRITE_MAX: usize = 64 * 1024;

/// A deadline that never comes (a timer with nothing to wait for).
const NEVER: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Counters shared by all connections (atomics: no lock on the hot path).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// PUBLISH packets handed to clients, by the QoS they were sent with.
    pub(crate) messages_sent_by_qos: [AtomicU64; 3],
    /// Their payload bytes, by the same QoS.
    pub(crate) payload_bytes_sent_by_qos: [AtomicU64; 3],
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    /// Publishes (and wills) dropped: denied by the ACL, or to a `$` topic.
    pub(crate) publishes_denied: AtomicU64,
    /// Clients disconnected because they took nothing from a full queue for
    /// `slow_client_timeout` while publishers waited for them.
    pub(crate) slow_clients_disconnected: AtomicU64,
}

/// Who may connect and what they may do: replaced as a whole by a reload, read by every
/// CONNECT, PUBLISH, SUBSCRIBE and delivery (so a connected client is held to a new ACL from
/// its next packet).
#[derive(Debug, Default)]
pub(crate) struct Access {
    pub(crate) allow_anonymous: bool,
    pub(crate) passwords: Option<PasswordFile>,
    pub(crate) acl: Option<Acl>,
}

/// What every connection needs to know: fixed at start, but for [`Access`].
#[derive(Debug)]
pub(crate) struct Settings {
    /// Read per check without an await under the lock: uncontended but for a reload's swap.
    access: RwLock<Arc<Access>>,
    max_packet_size: u32,
    max_inflight: u16,
    max_keep_alive: u16,
    slow_client_timeout: Duration,
    /// What a subscription the ACL denies gets in an MQTT 5 SUBACK.
    denied: SubAckCode,
    next_connection: AtomicU64,
    pub(crate) counters: Arc<Counters>,
    /// Where the status API lists connected clients (recorded at connect and disconnect).
    pub(crate) clients: Option<ClientBoard>,
}

impl Settings {
    pub(crate) fn from_config(
        config: &BrokerConfig,
        passwords: Option<PasswordFile>,
        acl: Option<Acl>,
        counters: Arc<Counters>,
    ) -> Settings {
        Settings {
            access: RwLock::new(Arc::new(Access {
                allow_anonymous: config.allow_anonymous,
                passwords,
                acl,
            })),
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
            clients: None,
        }
    }

    /// The access rules now (a reload may replace them at any time).
    pub(crate) fn access(&self) -> Arc<Access> {
        self.access
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replace the access rules: new CONNECTs and every connection's next check use them.
    pub(crate) fn replace_access(&self, access: Access) {
        *self
            .access
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(access);
    }

    /// Whether the ACL (if any) allows `check`, read under the lock without cloning.
    fn acl_allows(&self, check: impl FnOnce(&Acl) -> bool) -> bool {
        let access = self
            .access
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        access.acl.as_ref().is_none_or(check)
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
///
/// The task's future is allocated once per connection and keeps the room of the largest
/// state it can be in for the connection's whole life, so what is awaited here is kept
/// small: each phase's locals live in their own block (a local's room is held until the
/// end of its scope, even after it was moved), and channel sends box only a wait for room
/// ([`send_or_wait`]). It is an `async` block, not an `async fn`, for the same reason: an
/// `async fn` keeps each argument twice.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve<S>(
    mut stream: S,
    peer: SocketAddr,
    identity: Option<String>,
    settings: Arc<Settings>,
    router: mpsc::Sender<RouterRequest>,
    shutdown: CancellationToken,
    admission: super::listener::Admission,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let mut input = ReadBuffer::default();
        let takeover = CancellationToken::new();
        let evict = CancellationToken::new();
        let connection_id = settings.next_connection.fetch_add(1, Ordering::Relaxed);
        // Boxed: reading and checking the CONNECT needs more room than the rest of the
        // connection, and only at its start.
        let Some(Opened {
            mut conn,
            will,
            places,
            presence,
        }) = Box::pin(open(
            &mut stream,
            &mut input,
            peer,
            identity,
            &settings,
            &router,
            &shutdown,
            admission,
            connection_id,
            [&takeover, &evict],
        ))
        .await
        else {
            return;
        };
        conn.resend_inflight();

        let close = conn
            .run(&mut stream, &mut input, [&takeover, &evict, &shutdown])
            .await;
        let client_id = conn.client_id.clone();
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
        let will = will
            .filter(|will| publish_will && conn.will_allowed(will))
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
        let _ = send_or_wait(
            &router,
            RouterRequest::Disconnected {
                client_id,
                connection: connection_id,
                will,
                session_expiry,
            },
        )
        .await;
        drop(conn);
        drop(presence);
        linger_close(&mut stream, &mut input).await;
        drop(places);
    }
}

/// A client that connected: its connection, its will, and its places in the listener's
/// limits.
struct Opened {
    conn: Connection,
    /// Kept aside until the connection ends; boxed, since most clients have none.
    will: Option<Box<protocol::Will>>,
    places: super::listener::Places,
    /// The client's line in the status API's client list, while it is connected.
    presence: Option<ClientPresence>,
}

/// Read and check the CONNECT, open the session in the router and queue the CONNACK.
/// `None`: the connection ends (the client was told why where the protocol allows).
/// Its own function so that what only this phase needs (the CONNECT, hundreds of bytes)
/// takes no room in the task after it.
#[allow(clippy::too_many_arguments)]
async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &mut ReadBuffer,
    peer: SocketAddr,
    identity: Option<String>,
    settings: &Arc<Settings>,
    router: &mpsc::Sender<RouterRequest>,
    shutdown: &CancellationToken,
    admission: super::listener::Admission,
    connection_id: u64,
    tokens: [&CancellationToken; 2],
) -> Option<Opened> {
    let Admitted {
        connect,
        places,
        assigned_client_id,
    } = read_and_admit(stream, input, peer, identity, settings, shutdown, admission).await?;
    let client_id: Arc<str> = Arc::from(connect.client_id.as_str());
    let Some(ConnectReply {
        session,
        session_present,
        persist,
    }) = register(router, &client_id, connection_id, &connect, tokens).await
    else {
        let refusal = refusal(ConnackCode::ServerUnavailable);
        let _ = send_now(stream, connect.version, &refusal).await;
        return None;
    };
    tracing::debug!(%peer, client = %client_id, version = ?connect.version, session_present, "client connected");
    let presence = settings.clients.as_ref().map(|clients| {
        let version = match connect.version {
            protocol::Version::V311 => ProtocolVersion::V311,
            protocol::Version::V5 => ProtocolVersion::V5,
        };
        clients.connected(client_id.clone(), peer, version, places.listener())
    });
    let connected = Connected {
        connect,
        client_id,
        connection_id,
        session,
        session_present,
        persist,
        assigned_client_id,
    };
    let (conn, will) = connected.into_connection(settings, router);
    Some(Opened {
        conn,
        will,
        places,
        presence,
    })
}

/// A CONNECT that was read and accepted.
struct Admitted {
    connect: ConnectRequest,
    /// The places held in the listener's limits (counted against `max_connections` from
    /// here on).
    places: super::listener::Places,
    /// The client id the broker chose for an MQTT 5 client that sent none.
    assigned_client_id: Option<String>,
}

/// Read the CONNECT (by the listener's deadline) and check it; a refused client is told
/// why where the protocol allows it. `None`: the connection ends.
async fn read_and_admit<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &mut ReadBuffer,
    peer: SocketAddr,
    identity: Option<String>,
    settings: &Settings,
    shutdown: &CancellationToken,
    admission: super::listener::Admission,
) -> Option<Admitted> {
    // The listener's connect_timeout covers the handshakes and this read together.
    let connect = tokio::select! {
        _ = shutdown.cancelled() => return None,
        read = tokio::time::timeout_at(admission.deadline(), read_connect(stream, input, settings)) => read,
    };
    let mut connect = match connect {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time, closing");
            return None;
        }
        Ok(Err(ReadError::UnsupportedProtocol(level))) => {
            tracing::info!(%peer, level, "refused: unsupported protocol level");
            let refusal = refusal(ConnackCode::UnsupportedProtocol);
            let _ = send_now(stream, Version::V311, &refusal).await;
            return None;
        }
        Ok(Err(ReadError::InvalidConnect(version, violation))) => {
            tracing::info!(%peer, ?version, error = %violation, "bad CONNECT, closing");
            // MQTT 5 says why in a CONNACK; 3.1.1 closes without one (MQTT-3.1.4-1).
            if version == Version::V5 {
                let code = match violation.kind {
                    ViolationKind::Malformed => ConnackCode::MalformedPacket,
                    ViolationKind::ProtocolError => ConnackCode::ProtocolError,
                };
                let _ = send_now(stream, version, &refusal(code)).await;
            }
            return None;
        }
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "bad CONNECT, closing");
            return None;
        }
        Ok(Ok(connect)) => connect,
    };
    // The will's payload was read into the input buffer and shares its allocation: a copy
    // of its own lets the buffer go while the connection is idle.
    if let Some(will) = &mut connect.will {
        will.payload = Bytes::copy_from_slice(&will.payload);
    }
    // Counted against max_connections from here on (a refusal below gives it back).
    let places = admission.connect_read();
    let over_quota = places.over_quota();

    let mut assigned_client_id = None;
    if let Err(code) = admit(
        &mut connect,
        identity,
        settings,
        over_quota,
        &mut assigned_client_id,
    ) {
        tracing::info!(%peer, client = %connect.client_id, ?code, "connection refused");
        let _ = send_now(stream, connect.version, &refusal(code)).await;
        return None;
    }
    Some(Admitted {
        connect,
        places,
        assigned_client_id,
    })
}

/// Open (or take over) the client's session in the router. `None`: the broker is stopping.
async fn register(
    router: &mpsc::Sender<RouterRequest>,
    client_id: &Arc<str>,
    connection: u64,
    connect: &ConnectRequest,
    [takeover, evict]: [&CancellationToken; 2],
) -> Option<ConnectReply> {
    let (reply, answer) = oneshot::channel();
    let request = RouterRequest::Connect {
        client_id: client_id.clone(),
        connection,
        clean_start: connect.clean_start,
        session_expiry: connect.session_expiry,
        takeover: takeover.clone(),
        evict: evict.clone(),
        reply,
    };
    if !send_or_wait(router, request).await {
        return None;
    }
    answer.await.ok()
}

/// A client the router has given its session: what the connection is made of.
struct Connected {
    connect: ConnectRequest,
    client_id: Arc<str>,
    connection_id: u64,
    session: Arc<Session>,
    session_present: bool,
    persist: Option<Persist>,
    assigned_client_id: Option<String>,
}

impl Connected {
    /// The connection, with its CONNACK queued, and the client's will (kept aside until
    /// the connection ends; boxed, since most clients have none).
    fn into_connection(
        self,
        settings: &Arc<Settings>,
        router: &mpsc::Sender<RouterRequest>,
    ) -> (Connection, Option<Box<protocol::Will>>) {
        let Connected {
            connect,
            client_id,
            connection_id,
            session,
            session_present,
            persist,
            assigned_client_id,
        } = self;
        // Past the configured limit an MQTT 5 client is told the keep alive to use; a 3.1.1
        // client cannot be told, and keeps its own.
        let server_keep_alive = (connect.version == Version::V5
            && (connect.keep_alive > settings.max_keep_alive || connect.keep_alive == 0)
            && settings.max_keep_alive < u16::MAX)
            .then_some(settings.max_keep_alive);
        let mut conn = Connection {
            version: connect.version,
            client_id,
            id: connection_id,
            session,
            settings: settings.clone(),
            router: router.clone(),
            keep_alive: server_keep_alive.unwrap_or(connect.keep_alive),
            receive_maximum: connect.receive_maximum,
            client_max_packet: connect.max_packet_size,
            session_expiry: connect.session_expiry,
            aliases: None,
            client_alias_max: connect.topic_alias_max,
            username: connect.username,
            out: BytesMut::new(),
            write_size: WRITE_MIN,
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
        (conn, connect.will.map(Box::new))
    }
}

/// Close our side, then read and discard until the client closes too (briefly). Closing a
/// socket with unread input makes the kernel send a reset, which can destroy the last
/// packets we sent (a DISCONNECT reason, the gateway's `offline` status) before the client
/// reads them.
async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, input: &mut ReadBuffer) {
    const LINGER: Duration = Duration::from_millis(500);
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            input.bytes.clear();
            match input.read_from(stream).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut ReadBuffer,
    settings: &Settings,
) -> Result<ConnectRequest, ReadError> {
    loop {
        match protocol::read_connect(&mut input.bytes, settings.max_packet_size) {
            Err(ReadError::Incomplete) => {}
            other => return other,
        }
        let read = input
            .read_from(stream)
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

/// A connection's input: allocated while it holds bytes or a read waits, small while the
/// client is quiet, and given back whenever it is empty as the connection goes to sleep
/// ([`ReadBuffer::release_if_empty`]). Payloads of PUBLISH packets keep sharing its
/// allocation after they are read (a queued or retained message holds on to its part), so
/// a quiet connection must not read into a large one.
struct ReadBuffer {
    bytes: BytesMut,
    /// What the next read may take when the buffer has no room left.
    chunk: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            bytes: BytesMut::new(),
            chunk: READ_QUIET,
        }
    }
}

impl ReadBuffer {
    /// Read what the stream has. Cancel safe like tokio's `read_buf`: the bytes of a read
    /// are in the buffer when it completes, and nothing is read when it is dropped pending.
    async fn read_from<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> std::io::Result<usize> {
        let room = self.make_room();
        let read = stream.read_buf(&mut self.bytes).await?;
        if read == room {
            // The read took all the room there was: the client sends more than that at a
            // time, so read in larger pieces until it is quiet again.
            self.chunk = READ_BUSY;
        }
        Ok(read)
    }

    /// Room for the next read: [`Self::chunk`] bytes when there is less than [`READ_MIN`].
    fn make_room(&mut self) -> usize {
        if self.bytes.capacity() - self.bytes.len() < READ_MIN {
            self.bytes.reserve(self.chunk);
        }
        self.bytes.capacity() - self.bytes.len()
    }

    /// Called before the connection waits: an empty buffer is given back (the next read
    /// gets a small one), and reads start small again.
    fn release_if_empty(&mut self) {
        if self.bytes.is_empty() {
            self.bytes = BytesMut::new();
            self.chunk = READ_QUIET;
        }
    }
}

/// Send `value` on a bounded channel, waiting for room when it is full; false when the
/// receiver is gone. The value goes at once, when this is called, if there is room; only
/// the wait for room is boxed. A connection's task keeps room for the largest state of
/// everything it awaits, for its whole life: an inline `Sender::send` future (the value and
/// a wait for a permit, hundreds of bytes, nested in each caller's state) would make every
/// connection larger, idle or not.
fn send_or_wait<'a, T: Send + 'a>(
    tx: &'a mpsc::Sender<T>,
    value: T,
) -> futures::future::Either<std::future::Ready<bool>, futures::future::BoxFuture<'a, bool>> {
    use futures::future::Either;
    match tx.try_send(value) {
        Ok(()) => Either::Left(std::future::ready(true)),
        Err(mpsc::error::TrySendError::Closed(_)) => Either::Left(std::future::ready(false)),
        Err(mpsc::error::TrySendError::Full(value)) => {
            Either::Right(Box::pin(async move { tx.send(value).await.is_ok() }))
        }
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
        && settings.acl_allows(|acl| acl.can_publish(username, client_id, topic))
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
    let access = settings.access();
    match (&connect.username, &access.passwords) {
        (Some(user), Some(passwords)) => {
            let password = connect.password.as_deref().unwrap_or("");
            if passwords.verify(user, password) {
                Ok(())
            } else {
                Err(ConnackCode::BadCredentials)
            }
        }
        _ if access.allow_anonymous => Ok(()),
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
    /// MQTT 5 topic aliases; allocated when the first is used (most clients use none).
    aliases: Option<Box<TopicAliases>>,
    client_alias_max: u16,
    /// For ACL checks.
    username: Option<String>,
    /// Packets encoded and not yet written. Unallocated while the connection waits: see
    /// [`Self::reserve_out`] and [`Self::release_idle_buffers`].
    out: BytesMut,
    /// What the last write took: the room reserved when encoding into an empty `out`.
    write_size: usize,
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

/// A connection's MQTT 5 topic aliases.
#[derive(Default)]
struct TopicAliases {
    /// Set by the client, for its publishes.
    incoming: HashMap<u16, String>,
    /// Aliases we gave topics towards the client, up to its Topic Alias Maximum.
    outgoing: HashMap<Arc<str>, u16>,
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
        input: &mut ReadBuffer,
        [takeover, evict, shutdown]: [&CancellationToken; 3],
    ) -> Close {
        // MQTT: the server allows one and a half keep-alive periods of silence.
        let keep_alive =
            (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        // One timer for the whole connection, for the keep-alive and the store's watermark:
        // packets only move `last_packet`, and the timer is re-armed from it when it fires
        // (cheaper than a new timer per packet); a watermark due earlier pulls it forward.
        let mut last_packet = tokio::time::Instant::now();
        let never = || tokio::time::Instant::now() + NEVER;
        let timer = tokio::time::sleep_until(keep_alive.map_or_else(never, |ka| last_packet + ka));
        // The other waits also live as long as the connection: made afresh on every turn of
        // the loop, each would register and unregister itself (a lock, a timer) per turn.
        let session = self.session.clone();
        let wake = session.wake.notified();
        let taken_over = takeover.cancelled();
        let evicted = evict.cancelled();
        let shutting_down = shutdown.cancelled();
        tokio::pin!(timer, wake, taken_over, evicted, shutting_down);
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
                match protocol::read(
                    self.version,
                    &mut input.bytes,
                    self.settings.max_packet_size,
                ) {
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
                match self.poll_for_answer(stream, input).await {
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
                if due < timer.deadline() {
                    timer.as_mut().reset(due);
                }
            }

            self.release_idle_buffers(input);
            tokio::select! {
                read = input.read_from(stream) => match self.on_read(read) {
                    Ok(()) => yielded = false,
                    Err(close) => return close,
                },
                _ = &mut wake => wake.set(session.wake.notified()),
                rows = next_page(&mut self.page_reply), if self.page_reply.is_some() => {
                    self.page_reply = None;
                    self.session.add_page(
                        rows.into_iter()
                            .map(|(_, row)| Delivery::from(row.delivery))
                            .collect(),
                    );
                }
                Some(ack) = self.pending_acks.next(), if !self.pending_acks.is_empty() => {
                    if let Err(close) = self.acknowledge_ready(ack, stream).await {
                        return close;
                    }
                }
                _ = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if self.watermark_due.is_some_and(|due| due <= now) {
                        self.store_watermark().await;
                    }
                    let limit = keep_alive.map(|keep_alive| last_packet + keep_alive);
                    if limit.is_some_and(|limit| limit <= now) {
                        self.queue(&Outgoing::Disconnect(DisconnectReason::KeepAliveTimeout));
                        let _ = self.flush(stream).await;
                        return Close::Abnormal("keep-alive timeout".into());
                    }
                    let next = limit.into_iter().chain(self.watermark_due).min();
                    timer.as_mut().reset(next.unwrap_or_else(never));
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
        input: &mut ReadBuffer,
    ) -> Answer {
        let deadline = Instant::now() + ANSWER_POLL;
        while Instant::now() < deadline {
            tokio::task::yield_now().await;
            // A read polled once and dropped when pending loses nothing (it is cancel safe).
            if let Some(read) = futures::FutureExt::now_or_never(input.read_from(stream)) {
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
    ///
    /// An `async` block rather than an `async fn`: the function's argument would be kept
    /// twice in its state (as the argument and as the local it is moved into), and this
    /// state is part of every connection's task. For the same reason the checks of a
    /// PUBLISH are a plain function, and only what remains after them is awaited here.
    #[allow(clippy::manual_async_fn)]
    fn handle(
        &mut self,
        packet: Incoming,
    ) -> impl std::future::Future<Output = Option<Close>> + Send + '_ {
        async move {
            match packet {
                Incoming::Publish(publish) => {
                    let pkid = publish.pkid;
                    let message = match self.check_publish(publish) {
                        Ok(Some(message)) => message,
                        Ok(None) => return None,
                        Err(close) => return Some(close),
                    };
                    let qos = message.qos;
                    let (done, routed) = if qos == QoS::AtMostOnce {
                        (None, None)
                    } else {
                        let (tx, rx) = oneshot::channel();
                        (Some(tx), Some(rx))
                    };
                    self.congestion.reserve().await;
                    let request = RouterRequest::Publish {
                        message,
                        done,
                        congestion: Some(self.congestion.clone()),
                    };
                    if !send_or_wait(&self.router, request).await {
                        return Some(Close::Shutdown);
                    }
                    if let Some(routed) = routed {
                        // Acknowledged when the router (and with `sync` durability, the
                        // disk) has it; later publishes keep flowing meanwhile, acks go out
                        // in order.
                        self.pending_acks
                            .push(pkid, qos, AckReason::Success, Some(routed));
                    }
                    return None;
                }
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
                        let Some(codes) = self.ask_router(request, codes).await else {
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
                    let Some(found) = self.ask_router(request, found).await else {
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
    }

    /// The checks of a PUBLISH, and what they decide at once (a denied publish, a QoS 2
    /// retransmission). `Ok(Some)`: the message to route; `Err`: the connection ends.
    fn check_publish(&mut self, mut publish: PublishIn) -> Result<Option<Message>, Close> {
        if let Some(alias) = publish.topic_alias {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                self.queue(&Outgoing::Disconnect(DisconnectReason::TopicAliasInvalid));
                return Err(Close::Abnormal(format!("topic alias {alias} out of range")));
            }
            if publish.topic.is_empty() {
                let known = self.aliases.as_ref().and_then(|a| a.incoming.get(&alias));
                match known {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return Err(self.protocol_error("unknown topic alias")),
                }
            } else {
                let aliases = self.aliases.get_or_insert_with(Default::default);
                aliases.incoming.insert(alias, publish.topic.clone());
            }
        }
        if !topic::valid_topic_name(&publish.topic) {
            self.queue(&Outgoing::Disconnect(DisconnectReason::TopicNameInvalid));
            return Err(Close::Abnormal(format!(
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
            return Ok(None);
        }
        if publish.qos == QoS::ExactlyOnce {
            let mut state = self.session.lock();
            if state.incoming_qos2.contains(&publish.pkid) {
                // A retransmission of a message already routed: only acknowledge it again.
                drop(state);
                self.queue(&Outgoing::PubRec(publish.pkid, AckReason::Success));
                return Ok(None);
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
                return Err(Close::Abnormal(format!(
                    "more than {limit} QoS 2 publishes awaiting PUBREL"
                )));
            }
            state.incoming_qos2.insert(publish.pkid);
        }
        Ok(Some(Message {
            topic: Arc::from(publish.topic.as_str()),
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties.map(Arc::new),
            origin: Origin::Client(self.client_id.clone()),
            received: Instant::now(),
        }))
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
            .acl_allows(|acl| acl.can_subscribe(self.username.as_deref(), &self.client_id, filter))
    }

    fn may_publish(&self, topic: &str) -> bool {
        may_publish_to(
            &self.settings,
            self.username.as_deref(),
            &self.client_id,
            topic,
        )
    }

    /// Whether the client's will may be published: the rules of a publish, again when it is
    /// due. A denied will is counted and logged.
    fn will_allowed(&self, will: &protocol::Will) -> bool {
        let allowed = self.may_publish(&will.topic);
        if !allowed {
            self.settings
                .counters
                .publishes_denied
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.client_id, topic = %will.topic, "will not published: denied");
        }
        allowed
    }

    fn may_receive(&self, topic: &str) -> bool {
        self.settings
            .acl_allows(|acl| acl.can_receive(self.username.as_deref(), &self.client_id, topic))
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

    /// Send `request` to the router and wait for its answer on `reply`; `None` once the
    /// router is gone.
    async fn ask_router<T>(
        &self,
        request: RouterRequest,
        reply: oneshot::Receiver<T>,
    ) -> Option<T> {
        if !send_or_wait(&self.router, request).await {
            return None;
        }
        reply.await.ok()
    }

    /// Hand `op` to the store (nothing without one). Sent when this is called if the
    /// store's queue has room; only a wait for room is boxed (see [`send_or_wait`]).
    fn store(&self, op: Op) -> impl std::future::Future<Output = ()> + Send + '_ {
        let waiting = self
            .persist
            .as_ref()
            .and_then(|persist| persist.try_send(op).map(|op| Box::pin(persist.send(op))));
        async move {
            if let Some(waiting) = waiting {
                waiting.await;
            }
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
                if !send_or_wait(&self.router, request).await {
                    return;
                }
            }
            if let (Some(after_seq), true, None) = (
                self.session.page_wanted(PAGE_LOW_WATER),
                self.persist.is_some(),
                &self.page_reply,
            ) {
                // Answered after everything sent to the store before it has been applied.
                let (reply, rows) = oneshot::channel();
                self.store(Op::Page {
                    client_id: self.client_id.clone(),
                    after_seq,
                    limit: PAGE_SIZE,
                    reply,
                })
                .await;
                self.page_reply = Some(rows);
            }
            let session = self.session.clone();
            let mut sent = [(0u64, 0u64); 3];
            let report = session.send_queued(self.id, window, Instant::now(), |entry| {
                let topic = &entry.delivery.message.topic;
                if self.may_receive(topic) && self.encode_publish(entry, false) {
                    let by_qos = &mut sent[entry.delivery.qos as usize];
                    by_qos.0 += 1;
                    by_qos.1 += entry.delivery.message.payload.len() as u64;
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
            let counters = &self.settings.counters;
            for (qos, (messages, bytes)) in sent.into_iter().enumerate() {
                if messages > 0 {
                    counters.messages_sent_by_qos[qos].fetch_add(messages, Ordering::Relaxed);
                    counters.payload_bytes_sent_by_qos[qos].fetch_add(bytes, Ordering::Relaxed);
                }
            }
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
        self.reserve_out();
        if let Err(error) =
            protocol::write(self.version, &packet, &mut self.out, self.client_max_packet)
        {
            // MQTT 5: a message the client cannot take is dropped as if delivered.
            tracing::debug!(client = %self.client_id, %error, "message dropped");
            if let (false, Some(_), Some(aliases)) = (topic_known, topic_alias, &mut self.aliases) {
                aliases.outgoing.remove(&message.topic);
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
        let max = self.client_alias_max;
        let outgoing = &mut self.aliases.get_or_insert_with(Default::default).outgoing;
        if let Some(alias) = outgoing.get(topic) {
            return (Some(*alias), true);
        }
        let next = outgoing.len() + 1;
        match u16::try_from(next) {
            Ok(alias) if alias <= max => {
                outgoing.insert(topic.clone(), alias);
                (Some(alias), false)
            }
            _ => (None, false),
        }
    }

    fn queue(&mut self, packet: &Outgoing) {
        if matches!(packet, Outgoing::Disconnect(_)) && self.version == Version::V311 {
            return; // 3.1.1 has no server DISCONNECT: closing the socket says it.
        }
        self.reserve_out();
        if let Err(error) =
            protocol::write(self.version, packet, &mut self.out, self.client_max_packet)
        {
            tracing::debug!(client = %self.client_id, %error, "packet not sent");
        }
    }

    /// Before encoding into an empty, unallocated `out`: room for as much as the last write
    /// took, so that a batch of packets is encoded without growing the buffer step by step.
    fn reserve_out(&mut self) {
        if self.out.capacity() == 0 {
            self.out.reserve(self.write_size);
        }
    }

    /// The connection is about to wait for its client or the router: what its buffers hold
    /// is processed and written, so they are given back. An idle connection then holds only
    /// a small input buffer for its pending read; the next packets get buffers again.
    fn release_idle_buffers(&mut self, input: &mut ReadBuffer) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
        input.release_if_empty();
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let len = self.out.len();
        // Written from the buffer in place and then cleared: while the connection is busy
        // it keeps its capacity, so the next packets are encoded without a new allocation.
        // A client that does not take our bytes for the slow-client timeout is cut off.
        let written = tokio::time::timeout(self.settings.slow_client_timeout, async {
            stream.write_all(&self.out).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read"))?;
        self.out.clear();
        self.write_size = len.clamp(WRITE_MIN, WRITE_MAX);
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
    use crate::broker::session::{Limits, QueueMemory};

    /// A connection as `serve` makes it for a 3.1.1 client without a persistent session.
    fn connection() -> (Connection, mpsc::Receiver<RouterRequest>) {
        let settings = Arc::new(Settings::from_config(
            &BrokerConfig::default(),
            None,
            None,
            Arc::new(Counters::default()),
        ));
        let (router, requests) = mpsc::channel(8);
        let client_id: Arc<str> = Arc::from("quiet");
        let limits = Limits {
            max_messages: 100,
            max_bytes: 1 << 20,
            memory_window: 100,
            queue_memory: QueueMemory::new(1 << 20),
        };
        let connected = Connected {
            connect: ConnectRequest {
                version: Version::V311,
                client_id: client_id.to_string(),
                clean_start: true,
                keep_alive: 60,
                session_expiry: 0,
                receive_maximum: u16::MAX,
                max_packet_size: None,
                topic_alias_max: 0,
                will: None,
                username: None,
                password: None,
                authentication_method: None,
            },
            client_id: client_id.clone(),
            connection_id: 1,
            session: Arc::new(Session::new(client_id, limits)),
            session_present: false,
            persist: None,
            assigned_client_id: None,
        };
        let (conn, _will) = connected.into_connection(&settings, &router);
        (conn, requests)
    }

    /// A 3.1.1 QoS 0 PUBLISH with a payload of `size` bytes.
    fn publish_packet(size: usize) -> Vec<u8> {
        let publish = v311_publish("sensors/big", vec![7u8; size]);
        let mut buf = BytesMut::new();
        publish.write(&mut buf).expect("encodes");
        buf.to_vec()
    }

    fn v311_publish(topic: &str, payload: Vec<u8>) -> rumqttc::mqttbytes::v4::Publish {
        rumqttc::mqttbytes::v4::Publish::new(topic, rumqttc::mqttbytes::QoS::AtMostOnce, payload)
    }

    /// Read from `stream` until one whole packet is in `input`, and take it.
    async fn read_packet(input: &mut ReadBuffer, stream: &mut tokio::io::DuplexStream) -> Incoming {
        for _ in 0..100 {
            match protocol::read(Version::V311, &mut input.bytes, 1 << 20) {
                Ok(packet) => return packet,
                Err(ReadError::Incomplete) => {}
                Err(error) => panic!("unexpected read error: {error}"),
            }
            let read = tokio::time::timeout(Duration::from_secs(5), input.read_from(stream))
                .await
                .expect("bytes in time")
                .expect("read");
            assert!(read > 0, "the peer closed");
        }
        panic!("no packet after 100 reads");
    }

    #[tokio::test]
    async fn a_connection_gives_its_buffers_back_when_it_goes_idle_after_large_packets() {
        let (mut conn, _requests) = connection();
        let mut input = ReadBuffer::default();
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);

        // A large packet in: the reads grow past the quiet size to take it.
        client
            .write_all(&publish_packet(20_000))
            .await
            .expect("write");
        let packet = read_packet(&mut input, &mut server).await;
        assert!(
            matches!(&packet, Incoming::Publish(p) if p.payload.len() == 20_000),
            "{packet:?}"
        );
        assert_eq!(
            input.chunk, READ_BUSY,
            "reads grew while the client sent a lot"
        );

        // A large packet out: the output buffer holds it until it is written.
        let codes = vec![SubAckCode::Granted(QoS::AtLeastOnce); 10_000];
        conn.queue(&Outgoing::SubAck(1, codes));
        assert!(conn.out.len() > 10_000);
        let mut written = Vec::new();
        conn.flush(&mut written).await.expect("flush");
        assert!(
            written.len() > 10_000,
            "the CONNACK and the SUBACK went out"
        );
        assert!(conn.out.is_empty());
        assert!(
            conn.out.capacity() > 10_000,
            "a busy connection keeps its buffer"
        );

        // Idle: both buffers are given back, even while the packet read is still alive.
        conn.release_idle_buffers(&mut input);
        assert_eq!(conn.out.capacity(), 0, "output buffer released");
        assert_eq!(input.bytes.capacity(), 0, "input buffer released");

        // Waiting for the next packet takes only the quiet size.
        let pending = futures::FutureExt::now_or_never(input.read_from(&mut server));
        assert!(pending.is_none(), "nothing to read yet");
        assert!(
            input.bytes.capacity() <= READ_QUIET,
            "an idle read waits with {} bytes of room",
            input.bytes.capacity()
        );
        drop(packet);

        // The next packet out is encoded into room sized by the last write (bounded).
        conn.queue(&Outgoing::PingResp);
        assert!(conn.out.capacity() >= WRITE_MIN && conn.out.capacity() <= WRITE_MAX);
    }

    #[tokio::test]
    async fn a_quiet_client_is_read_in_small_pieces_and_a_busy_one_in_large_ones() {
        let mut input = ReadBuffer::default();
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);

        // Small packets: one quiet-sized read takes them, and the buffer stays small.
        let small = publish_packet(20);
        client.write_all(&small).await.expect("write");
        read_packet(&mut input, &mut server).await;
        assert_eq!(input.chunk, READ_QUIET);
        assert!(input.bytes.capacity() <= READ_QUIET);

        // More than the room there was: the reads after the first take larger pieces.
        let mut burst = Vec::new();
        for _ in 0..100 {
            burst.extend_from_slice(&publish_packet(100));
        }
        client.write_all(&burst).await.expect("write");
        for _ in 0..100 {
            read_packet(&mut input, &mut server).await;
        }
        assert_eq!(input.chunk, READ_BUSY);
        input.release_if_empty();
        assert_eq!(input.chunk, READ_QUIET, "quiet again once idle");
        assert_eq!(input.bytes.capacity(), 0);
    }

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
