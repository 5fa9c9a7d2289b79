//! One task per listener: accept, cap the number of connections, and hand each socket to
//! its own connection task. Nothing slow happens in the accept loop: the TLS and WebSocket
//! handshakes run in the connection's task, bounded by [`HANDSHAKE_TIMEOUT`], so a client
//! that opens a socket and sends nothing delays no one else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::connection::{self, Settings};
use super::BrokerHandle;
use crate::config::ListenerConfig;

// Used only by this module. Declared here (not in broker/mod.rs) so the listener owns its
// transports; see docs/broker.md.
#[path = "tls.rs"]
pub(crate) mod tls;
#[path = "websocket.rs"]
pub(crate) mod websocket;

pub(crate) use tls::TlsError;

/// The longest the TLS and WebSocket handshakes together may take. The connection then
/// has its own time limit for CONNECT.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener does with each accepted socket before MQTT starts, built once at start.
#[derive(Clone)]
pub(crate) struct Transport {
    tls: Option<TlsAcceptor>,
    identity_as_username: bool,
    /// `Some(path)` for MQTT over WebSocket.
    websocket: Option<Arc<str>>,
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

/// A connection after its handshakes: plain TCP stays unboxed (the common, fast path).
enum Ready {
    Tcp(TcpStream),
    Other(Box<dyn Io>),
}

/// The stream after the handshakes, and the client certificate's CN when the listener
/// uses it as the username.
struct Handshaken {
    stream: Ready,
    identity: Option<String>,
}

impl Transport {
    async fn handshake(&self, stream: TcpStream) -> Result<Handshaken, String> {
        let mut identity = None;
        let stream: Box<dyn Io> = match &self.tls {
            None => match &self.websocket {
                None => {
                    return Ok(Handshaken {
                        stream: Ready::Tcp(stream),
                        identity: None,
                    })
                }
                Some(path) => Box::new(
                    websocket::accept(stream, path)
                        .await
                        .map_err(|e| format!("WebSocket handshake failed: {e}"))?,
                ),
            },
            Some(acceptor) => {
                let tls = acceptor
                    .accept(stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                if self.identity_as_username {
                    identity = tls::peer_common_name(tls.get_ref().1);
                }
                match &self.websocket {
                    None => Box::new(tls),
                    Some(path) => Box::new(
                        websocket::accept(tls, path)
                            .await
                            .map_err(|e| format!("WebSocket handshake failed: {e}"))?,
                    ),
                }
            }
        };
        Ok(Handshaken {
            stream: Ready::Other(stream),
            identity,
        })
    }
}

/// Accept on `socket` until `shutdown`; a listener whose TLS files cannot be loaded logs
/// why and accepts nothing (call [`prepare`] at start to fail the start instead).
pub(crate) async fn run(
    socket: TcpListener,
    config: ListenerConfig,
    settings: Arc<Settings>,
    broker: BrokerHandle,
    shutdown: CancellationToken,
) {
    let transport = match prepare(&config) {
        Ok(transport) => transport,
        Err(error) => {
            tracing::error!(listener = %config.bind, %error, "listener not started");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
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
                let _ = stream.set_nodelay(true);
                // Taken before the handshake: a connection past the limit still gets its
                // handshake and a CONNACK refusal (server unavailable / quota exceeded).
                let permit = permits.clone().try_acquire_owned().ok();
                let settings = settings.clone();
                let router = broker.router.clone();
                let shutdown = shutdown.clone();
                let transport = transport.clone();
                connections.spawn(async move {
                    let over_quota = permit.is_none();
                    let handshaken = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, transport.handshake(stream)) => done,
                    };
                    let Handshaken { stream, identity } = match handshaken {
                        Ok(Ok(handshaken)) => handshaken,
                        Ok(Err(reason)) => {
                            tracing::debug!(%peer, %reason, "connection closed before MQTT");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "handshake not finished in time, closing");
                            return;
                        }
                    };
                    serve(stream, peer, identity, settings, router, shutdown, over_quota).await;
                    drop(permit);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Connections see the same token and close themselves; wait for them.
    while connections.join_next().await.is_some() {}
}

async fn serve(
    stream: Ready,
    peer: SocketAddr,
    identity: Option<String>,
    settings: Arc<Settings>,
    router: tokio::sync::mpsc::Sender<super::router::RouterRequest>,
    shutdown: CancellationToken,
    over_quota: bool,
) {
    if let Some(identity) = &identity {
        tracing::debug!(%peer, %identity, "client certificate identity");
    }
    match stream {
        Ready::Tcp(stream) => {
            connection::serve(
                stream, peer, identity, settings, router, shutdown, over_quota,
            )
            .await
        }
        Ready::Other(stream) => {
            connection::serve(
                stream, peer, identity, settings, router, shutdown, over_quota,
            )
            .await
        }
    }
}
