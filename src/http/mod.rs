//! The HTTP listener: one TCP (or TLS) socket serving the gateway's endpoints to operators
//! and scrapers. It owns the socket, the connection limits, TLS and basic authentication;
//! the endpoints come from sub-routers assembled in `router` below:
//!
//! - `GET /metrics`: Prometheus metrics (`metrics.rs`, from [`crate::metrics`]).
//! - `POST /api/v1/reload`: apply the configuration file again (`reload.rs`, through
//!   [`crate::reload::Reloader`]).
//! - `GET /`, `GET /api/v1/status` and the other status endpoints: the status page and API
//!   (`status.rs`, from [`crate::status`]).
//!
//! What the endpoints show comes through [`HttpContext`], handles the service passes in;
//! the listener stops with the gateway's cancellation token.

mod auth;
pub mod config;
mod metrics;
mod reload;
mod serve;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::bus::BrokerHandle;
use crate::broker::{AuthError, BrokerListeners, PasswordFile};
use crate::metrics::Metrics;
use crate::pem::PemError;
use crate::reload::Reloader;
use crate::status::StatusBoard;
pub use config::HttpConfig;

/// Why the HTTP listener could not start. Every variant names the address or file.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (HTTP): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP basic authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("HTTP TLS {0}")]
    Pem(#[from] PemError),
    #[error("HTTP TLS cert {cert} and key {key} cannot be used together: {source}")]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// What the endpoints read and ask: handles the service passes in.
#[derive(Clone)]
pub struct HttpContext {
    /// Asks the service to apply the configuration file again.
    pub reloader: Reloader,
    /// The registry every part records into.
    pub metrics: Arc<Metrics>,
    /// The broker's counters, read at scrape time.
    pub broker: BrokerHandle,
    /// The live picture the status API and page show.
    pub status: StatusBoard,
    /// The broker listeners' counters, read at scrape time.
    pub listeners: BrokerListeners,
}

/// A started HTTP listener.
pub struct RunningHttp {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    server: tokio::task::JoinHandle<()>,
}

impl RunningHttp {
    /// Resolves when the listener has stopped (after the shutdown token is cancelled and
    /// open connections have finished or been cut).
    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

/// Bind `config.bind` and serve until `shutdown` is cancelled.
pub async fn start(
    config: &HttpConfig,
    context: HttpContext,
    shutdown: CancellationToken,
) -> Result<RunningHttp, HttpError> {
    let tls = config.tls.as_ref().map(serve::tls_acceptor).transpose()?;
    let passwords = config
        .password_file
        .as_deref()
        .map(PasswordFile::load)
        .transpose()?;
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|source| HttpError::Bind {
            addr: config.bind,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| HttpError::Bind {
        addr: config.bind,
        source,
    })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let app = router(context, config.max_body_bytes, passwords.map(Arc::new));
    let limits = serve::Limits::from_config(config);
    let server = tokio::spawn(serve::serve(listener, tls, app, limits, shutdown));
    tracing::info!(addr = %local_addr, scheme, "HTTP listener ready");
    Ok(RunningHttp {
        local_addr,
        scheme,
        server,
    })
}

/// Every endpoint, behind the body limit and (with a password file) basic authentication.
fn router(
    context: HttpContext,
    max_body_bytes: usize,
    passwords: Option<Arc<PasswordFile>>,
) -> Router {
    let app = Router::new()
        .merge(metrics::routes(context.clone()))
        .merge(reload::routes(context.reloader.clone()))
        .merge(status::routes(context.status.clone()));
    let app = app
        .layer(axum::middleware::from_fn_with_state(
            max_body_bytes,
            serve::refuse_large_bodies,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes));
    match passwords {
        Some(passwords) => app.layer(axum::middleware::from_fn_with_state(
            passwords,
            auth::require_basic_auth,
        )),
        None => app,
    }
}
