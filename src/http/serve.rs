//! The accept loop and each connection's limits, so that no client stalls or starves
//! another: a bound on connections at once (past it a new socket is closed at once), a
//! deadline for the TLS handshake and for every request's headers (slow-loris), a bound on
//! the request head and body, and an end to every connection's life (keep-alive is not
//! forever). HTTP itself is hyper's; this only sets its limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::config::{HttpConfig, HttpTls};
use super::HttpError;
use crate::pem;

/// After shutdown, the longest an open connection may take to finish its request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// A pause after a failed accept (out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Each connection's bounds, from `[http]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    max_connections: usize,
    header_timeout: Duration,
    max_connection_age: Duration,
    max_header_bytes: usize,
}

impl Limits {
    pub(super) fn from_config(config: &HttpConfig) -> Limits {
        Limits {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            max_connection_age: config.max_connection_age,
            max_header_bytes: config.max_header_bytes,
        }
    }
}

/// The TLS acceptor for `[http.tls]` (ring provider, TLS 1.2 and 1.3, HTTP/1.1 by ALPN).
pub(super) fn tls_acceptor(tls: &HttpTls) -> Result<TlsAcceptor, HttpError> {
    let certs = pem::certificates("cert", &tls.cert)?;
    let key = pem::private_key(&tls.key)?;
    let cert_key = |source| HttpError::CertKey {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(cert_key)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(cert_key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accept until `shutdown`, then wait (briefly) for open connections.
pub(super) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "HTTP accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Full: close the new socket at once rather than queue it behind slow clients.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            connection(stream, peer, tls, app, limits, shutdown).await;
            drop(slot);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE * 2, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    match tls {
        None => http(stream, peer, app, limits, shutdown).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream));
            match handshake.await {
                Ok(Ok(stream)) => http(stream, peer, app, limits, shutdown).await,
                Ok(Err(error)) => tracing::debug!(%peer, %error, "HTTP TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "HTTP TLS handshake timed out"),
            }
        }
    }
}

/// HTTP/1.1 on one connection, by hyper, within `limits`.
async fn http<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let service = TowerToHyperService::new(app);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let age = tokio::time::sleep(limits.max_connection_age);
    tokio::pin!(age);
    // Stop taking requests when the gateway stops or the connection is old enough; the
    // request being served finishes (within the grace).
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => finish(connection.as_mut()).await,
        _ = &mut age => finish(connection.as_mut()).await,
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "HTTP connection ended with an error");
    }
}

async fn finish<C>(mut connection: std::pin::Pin<&mut C>) -> Result<(), hyper::Error>
where
    C: GracefulConnection,
{
    connection.as_mut().shutdown_gracefully();
    match tokio::time::timeout(SHUTDOWN_GRACE, connection).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// hyper's connection type, named once.
trait GracefulConnection: std::future::Future<Output = Result<(), hyper::Error>> {
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// 413 before the handler runs for a request that announces a body larger than `max`
/// (a body without a length is cut at `max` by the body limit as it is read).
pub(super) async fn refuse_large_bodies(
    State(max): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match announced {
        Some(length) if length > max as u64 => {
            (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response()
        }
        _ => next.run(request).await,
    }
}
