//! One task per listener: accept, apply the listener's limits, and hand each socket to its
//! own connection task. Nothing slow happens in the accept loop: the TLS and WebSocket
//! handshakes run in the connection's task.
//!
//! A socket goes through two phases, each with its own cap:
//!
//! 1. **Handshake**, from accept until a CONNECT has been read: TLS, WebSocket, the CONNECT
//!    packet, all together within `connect_timeout`. At most `max_handshakes` sockets are
//!    in it at once; one more is closed at once. So sockets that never send anything take
//!    no connection slot, and they give theirs back after `connect_timeout`.
//! 2. **Connected**, once a CONNECT has been read: counted against `max_connections`;
//!    past it the client gets a CONNACK refusal (server unavailable / quota exceeded).
//!
//! Across both, one IP address holds at most `max_connections_per_address` sockets; one
//! more from it is closed at once. Sockets closed by a limit and failed handshakes are
//! logged, at most [`log_limit::LINES_PER_WINDOW`] lines a minute per listener.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::config::ListenerConfig;
use super::connection::{self, Settings};
use super::BrokerHandle;

// Used only by this module. Declared here (not in broker/mod.rs) so the listener owns its
// transports; see docs/broker.md.
#[path = "log_limit.rs"]
mod log_limit;
#[path = "tls.rs"]
pub(crate) mod tls;
#[path = "websocket.rs"]
pub(crate) mod websocket;

pub use tls::TlsError;

/// What a listener does with each accepted socket before MQTT starts: built at start and
/// again by a reload whose TLS files changed (new handshakes use it; open connections keep
/// theirs).
#[derive(Clone)]
pub(crate) struct Transport {
    tls: Option<TlsAcceptor>,
    identity_as_username: bool,
    /// `Some(path)` for MQTT over WebSocket.
    websocket: Option<Arc<str>>,
}

/// A listener that cannot take its address: which address, which listener of the
/// configuration, and (in the message) what an operator can do about the usual causes.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (broker.listeners[{index}]): {source}{}", bind_hint(.source.kind(), .addr, *.index))]
pub struct BindError {
    pub addr: SocketAddr,
    /// The listener's position in `[[broker.listeners]]` (0 for the first).
    pub index: usize,
    pub source: std::io::Error,
}

/// The next step for the errors a bind commonly meets on a gateway.
fn bind_hint(kind: std::io::ErrorKind, addr: &SocketAddr, index: usize) -> String {
    use std::io::ErrorKind;
    let port = addr.port();
    match kind {
        // Debian's and Raspberry Pi OS's mosquitto package starts mosquitto.service on 1883
        // as soon as it is installed, so this is the first thing people meet.
        ErrorKind::AddrInUse => format!(
            "\n  hint: another program listens on port {port} (`sudo ss -ltnp 'sport = :{port}'` shows which)\
             \n  hint: an installed Mosquitto holds 1883 by default: `sudo systemctl stop mosquitto` \
             (and `sudo systemctl disable mosquitto` to keep it stopped)\
             \n  hint: or change `bind` in broker.listeners[{index}] of the configuration"
        ),
        ErrorKind::PermissionDenied if port < 1024 => format!(
            "\n  hint: ports below 1024 need CAP_NET_BIND_SERVICE (under systemd: \
             AmbientCapabilities= in a drop-in, see fieldmq.service)\
             \n  hint: or change `bind` in broker.listeners[{index}] of the configuration"
        ),
        ErrorKind::AddrNotAvailable => format!(
            "\n  hint: no network interface of this machine has the address {}; \
             change `bind` in broker.listeners[{index}] (0.0.0.0 listens on every interface)",
            addr.ip()
        ),
        _ => String::new(),
    }
}

/// Take the listener's address (before anything is accepted, so a start fails whole).
pub(crate) async fn bind(config: &ListenerConfig, index: usize) -> Result<TcpListener, BindError> {
    TcpListener::bind(config.bind)
        .await
        .map_err(|source| BindError {
            addr: config.bind,
            index,
            source,
        })
}

/// Build the listener's transport: loads and checks its TLS files. Call at start so a bad
/// certificate fails the start instead of the first connection.
pub(crate) fn prepare(config: &ListenerConfig) -> Result<Transport, TlsError> {
    let tls = match &config.tls {
        Some(tls) => Some(TlsAcceptor::from(tls::server_config(tls)?)),
        None => None,
    };
    Ok(Transport {
        tls,
        identity_as_username: config
            .tls
            .as_ref()
            .is_some_and(|tls| tls.identity_as_username),
        websocket: config
            .websocket
            .then(|| Arc::from(config.websocket_path.as_str())),
    })
}

/// Any byte stream a connection can be served on (TLS, WebSocket, both).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The stream after the TLS and WebSocket handshakes (plain TCP has none and stays
/// unboxed: the common, fast path), and the client certificate's CN when the listener uses
/// it as the username.
struct Handshaken {
    stream: Box<dyn Io>,
    identity: Option<String>,
}

/// Why a socket did not get as far as MQTT.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("WebSocket handshake failed: {0}")]
    WebSocket(String),
}

impl Transport {
    /// Plain TCP: no handshake before MQTT.
    fn is_plain(&self) -> bool {
        self.tls.is_none() && self.websocket.is_none()
    }

    async fn handshake(&self, stream: TcpStream) -> Result<Handshaken, HandshakeError> {
        let mut identity = None;
        let stream: Box<dyn Io> = match &self.tls {
            None => match &self.websocket {
                None => Box::new(stream),
                Some(path) => Box::new(
                    websocket::accept(stream, path)
                        .await
                        .map_err(|e| HandshakeError::WebSocket(e.to_string()))?,
                ),
            },
            Some(acceptor) => {
                let tls = acceptor.accept(stream).await.map_err(HandshakeError::Tls)?;
                if self.identity_as_username {
                    identity = tls::peer_common_name(tls.get_ref().1);
                }
                match &self.websocket {
                    None => Box::new(tls),
                    Some(path) => Box::new(
                        websocket::accept(tls, path)
                            .await
                            .map_err(|e| HandshakeError::WebSocket(e.to_string()))?,
                    ),
                }
            }
        };
        Ok(Handshaken { stream, identity })
    }
}

/// A socket's place in the handshake phase, and what turns it into a connection: given to
/// [`connection::serve`], which reads CONNECT by [`Admission::deadline`] and then calls
/// [`Admission::connect_read`].
pub(crate) struct Admission {
    handshake: OwnedSemaphorePermit,
    connections: Arc<Semaphore>,
    deadline: Instant,
    /// The socket's place in `max_connections_per_address`, for as long as it is open.
    address: Option<AddressSlot>,
    /// The listener's bound address (the status API names it for each client).
    listener: SocketAddr,
}

/// What an open connection holds in its listener's limits; given back when dropped.
pub(crate) struct Places {
    connection: Option<OwnedSemaphorePermit>,
    _address: Option<AddressSlot>,
    listener: SocketAddr,
}

impl Places {
    /// The listener was at `max_connections`: the client is to be refused.
    pub(crate) fn over_quota(&self) -> bool {
        self.connection.is_none()
    }

    /// The bound address of the listener the client came in through.
    pub(crate) fn listener(&self) -> SocketAddr {
        self.listener
    }
}

impl Admission {
    /// When the whole pre-CONNECT phase (handshakes and CONNECT) must be over.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// A CONNECT has been read: leave the handshake phase and take a connection slot
    /// (none when the listener is at `max_connections`: see [`Places::over_quota`]).
    pub(crate) fn connect_read(self) -> Places {
        drop(self.handshake);
        Places {
            connection: self.connections.try_acquire_owned().ok(),
            _address: self.address,
            listener: self.listener,
        }
    }
}

/// Sockets per source address (handshaking and connected), for `max_connections_per_address`.
#[derive(Debug)]
struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One socket counted in [`PerAddress`]; gives its place back when dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// A slot for one more socket from `ip`, or `None` when it already has `max`.
    fn take(table: &Arc<PerAddress>, ip: IpAddr) -> Option<AddressSlot> {
        let mut open = table.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= table.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What a listener counts about sockets that did not become connections, and its log
/// budget for them.
#[derive(Debug)]
struct Refusals {
    listener: SocketAddr,
    over_handshakes: AtomicU64,
    over_address: AtomicU64,
    failed_handshakes: AtomicU64,
    log: log_limit::LogLimit,
}

impl Refusals {
    fn over_handshakes(&self, peer: SocketAddr, max: usize) {
        let total = self.over_handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(
                listener = %self.listener, %peer, max_handshakes = max, total, suppressed,
                "socket closed at once: too many connections still in their handshake"
            );
        }
    }

    fn over_address(&self, peer: SocketAddr, max: usize) {
        let total = self.over_address.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(
                listener = %self.listener, %peer, max_connections_per_address = max, total, suppressed,
                "socket closed at once: too many connections from this address"
            );
        }
    }

    fn failed_handshake(&self, peer: SocketAddr, error: &HandshakeError) {
        let total = self.failed_handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(suppressed) = self.log.allow() {
            match error {
                HandshakeError::Tls(reason) => tracing::warn!(
                    listener = %self.listener, %peer, %reason, total, suppressed,
                    "TLS handshake failed"
                ),
                HandshakeError::WebSocket(reason) => tracing::info!(
                    listener = %self.listener, %peer, %reason, total, suppressed,
                    "WebSocket handshake failed"
                ),
            }
        }
    }
}

/// A listener's transport, replaced by a reload (certificate rotation) and read once per
/// accepted socket.
pub(crate) type SharedTransport = Arc<std::sync::RwLock<Transport>>;

/// A listener's limits and counters, shared with whoever reports them (the metrics read
/// them at scrape time: nothing is counted twice).
#[derive(Debug)]
pub(crate) struct ListenerStats {
    url: String,
    max_connections: usize,
    max_handshakes: usize,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    accepted: AtomicU64,
    refusals: Refusals,
}

/// One listener's counters as of now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSnapshot {
    /// `mqtt://`, `mqtts://`, `ws://` or `wss://` and the bound address.
    pub url: String,
    /// Connections whose CONNECT has been read, open now.
    pub connections: u64,
    /// Sockets in their handshake (no CONNECT read yet) now.
    pub handshakes: u64,
    /// Sockets accepted since the start.
    pub accepted: u64,
    /// Sockets closed at once: too many in their handshake.
    pub refused_over_handshakes: u64,
    /// Sockets closed at once: too many from one address.
    pub refused_over_address: u64,
    /// TLS or WebSocket handshakes that failed.
    pub failed_handshakes: u64,
}

impl ListenerStats {
    pub(crate) fn new(config: &ListenerConfig, bound: SocketAddr) -> ListenerStats {
        let mut with_bound = config.clone();
        with_bound.bind = bound;
        ListenerStats {
            url: with_bound.url(),
            max_connections: config.max_connections,
            max_handshakes: config.max_handshakes,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            accepted: AtomicU64::new(0),
            refusals: Refusals {
                listener: bound,
                over_handshakes: AtomicU64::new(0),
                over_address: AtomicU64::new(0),
                failed_handshakes: AtomicU64::new(0),
                log: log_limit::LogLimit::new(),
            },
        }
    }

    pub(crate) fn snapshot(&self) -> ListenerSnapshot {
        let in_use = |max: usize, semaphore: &Semaphore| {
            max.saturating_sub(semaphore.available_permits()) as u64
        };
        ListenerSnapshot {
            url: self.url.clone(),
            connections: in_use(self.max_connections, &self.connections),
            handshakes: in_use(self.max_handshakes, &self.handshakes),
            accepted: self.accepted.load(Ordering::Relaxed),
            refused_over_handshakes: self.refusals.over_handshakes.load(Ordering::Relaxed),
            refused_over_address: self.refusals.over_address.load(Ordering::Relaxed),
            failed_handshakes: self.refusals.failed_handshakes.load(Ordering::Relaxed),
        }
    }
}

/// Accept on `socket` until `shutdown`, each socket with the transport `transport` holds
/// when it is accepted (see [`prepare`]), counting into `stats`.
pub(crate) async fn run(
    socket: TcpListener,
    config: ListenerConfig,
    transport: SharedTransport,
    stats: Arc<ListenerStats>,
    settings: Arc<Settings>,
    broker: BrokerHandle,
    shutdown: CancellationToken,
) {
    let connections = stats.connections.clone();
    let handshakes = stats.handshakes.clone();
    let per_address = (config.max_connections_per_address > 0).then(|| {
        Arc::new(PerAddress {
            max: config.max_connections_per_address,
            open: Mutex::new(HashMap::new()),
        })
    });
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little instead of
                        // spinning on the same error.
                        tracing::warn!(listener = %config.bind, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let refusals = &stats.refusals;
                // Both limits close the socket at once (dropping it): nothing is read from
                // it and it costs no task.
                let address_slot = match &per_address {
                    Some(table) => match PerAddress::take(table, peer.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            refusals.over_address(peer, table.max);
                            continue;
                        }
                    },
                    None => None,
                };
                let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                    refusals.over_handshakes(peer, config.max_handshakes);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let admission = Admission {
                    handshake,
                    connections: connections.clone(),
                    deadline: Instant::now() + config.connect_timeout,
                    address: address_slot,
                    listener: refusals.listener,
                };
                let settings = settings.clone();
                let router = broker.router.clone();
                let shutdown = shutdown.clone();
                let transport = transport
                    .read()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                if transport.is_plain() {
                    // The connection's future is the task itself: a future awaited in
                    // another keeps its arguments twice, and the task is allocated for the
                    // connection's whole life.
                    tasks.spawn(connection::serve(
                        stream, peer, None, settings, router, shutdown, admission,
                    ));
                    continue;
                }
                let stats = stats.clone();
                tasks.spawn(async move {
                    // Boxed: the TLS and WebSocket handshakes' state (rustls, tungstenite) is
                    // about 11 KiB, and a future awaited inline is part of the task for the
                    // connection's whole life; boxed, it is freed when the handshake is over.
                    let handshaken = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        done = tokio::time::timeout_at(admission.deadline, Box::pin(transport.handshake(stream))) => done,
                    };
                    let Handshaken { stream, identity } = match handshaken {
                        Ok(Ok(handshaken)) => handshaken,
                        Ok(Err(error)) => {
                            stats.refusals.failed_handshake(peer, &error);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "handshake not finished in time, closing");
                            return;
                        }
                    };
                    if let Some(identity) = &identity {
                        tracing::debug!(%peer, %identity, "client certificate identity");
                    }
                    connection::serve(stream, peer, identity, settings, router, shutdown, admission)
                        .await;
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // Connections see the same token and close themselves; wait for them.
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task is allocated when it is accepted and holds the room of its
    /// future until it closes: with many idle clients this is most of what each one costs
    /// (docs/benchmarks.md, `memory`). The CONNECT phase is boxed and channel sends box
    /// only their waits for this reason (as are the TLS and WebSocket handshakes, about
    /// 11 KiB, outside this future); a large future awaited inline in the connection would
    /// show here.
    #[tokio::test]
    async fn the_task_of_a_plain_tcp_connection_stays_small() {
        const LIMIT: usize = 2560;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let settings = Arc::new(Settings::from_config(
            &crate::broker::config::BrokerConfig::default(),
            None,
            None,
            Default::default(),
        ));
        let (router, _requests) = tokio::sync::mpsc::channel(1);
        let admission = Admission {
            handshake: Arc::new(Semaphore::new(1))
                .try_acquire_owned()
                .expect("a permit"),
            connections: Arc::new(Semaphore::new(1)),
            deadline: Instant::now() + Duration::from_secs(10),
            address: None,
            listener: addr,
        };
        // What the accept loop spawns for a plain TCP listener.
        let task = connection::serve(
            stream,
            peer,
            None,
            settings,
            router,
            CancellationToken::new(),
            admission,
        );
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= LIMIT,
            "a plain TCP connection's future takes {size} bytes, more than {LIMIT}"
        );
    }
}
