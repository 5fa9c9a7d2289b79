//! The embedded MQTT broker: listeners, one task per client connection, and one router task
//! that owns subscriptions, sessions and retained messages.
//!
//! In-process publishers and subscribers (drivers, uplinks, the gateway status) talk to the
//! same router through a [`BrokerHandle`]: no loopback socket.

mod acl;
mod auth;
pub mod bus;
pub mod config;
mod connection;
mod listener;
pub(crate) mod protocol;
mod router;
// pub(crate): the session store keeps deliveries and their in-flight state.
pub(crate) mod session;
mod sys;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use config::{BrokerConfig, Durability};

pub use crate::store::sessions::PersistError;
pub use acl::{Acl, AclError};
pub use auth::{hash_password, AuthError, PasswordFile};
pub use bus::{AckShare, BrokerHandle, BusError, InternalSubscribeOptions, InternalSubscription};
use listener::ListenerStats;
pub use listener::{ListenerSnapshot, TlsError};
pub use router::BrokerStats;
use router::Router;

/// Persistent messages per session kept in memory; the rest wait on disk.
const MEMORY_WINDOW: usize = 1000;

/// Capacity of the router's request channel. Publishers wait when it is full (backpressure
/// rather than loss).
const ROUTER_QUEUE: usize = 4096;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] PersistError),
    #[error(transparent)]
    Acl(#[from] AclError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A started broker: its handle, the addresses it listens on, and its tasks.
pub struct RunningBroker {
    pub handle: BrokerHandle,
    /// Actual bound addresses, in config order (useful with port 0).
    pub local_addrs: Vec<SocketAddr>,
    listener_stats: BrokerListeners,
    listeners: JoinSet<()>,
    router: tokio::task::JoinHandle<()>,
    router_stop: CancellationToken,
    /// Asks the store for backups (with `sync` and `batched` durability).
    store_backup: Option<StoreBackup>,
    /// Resolves when the store has checkpointed and closed its file.
    store_stopped: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

/// Every listener's counters (connections and handshakes now, sockets accepted and
/// refused), readable at any time without asking the router. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct BrokerListeners(Vec<Arc<ListenerStats>>);

impl BrokerListeners {
    /// One snapshot per listener, in configuration order.
    pub fn snapshot(&self) -> Vec<ListenerSnapshot> {
        self.0.iter().map(|stats| stats.snapshot()).collect()
    }
}

/// Copies a running broker's store (see [`RunningBroker::store_backup`]). Holding it does
/// not keep the store open at shutdown.
#[derive(Debug, Clone)]
pub struct StoreBackup {
    persist: crate::store::sessions::WeakPersist,
    path: std::path::PathBuf,
}

impl StoreBackup {
    /// The store's file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Copy the store to `dest`, consistent as of one commit, with everything acknowledged
    /// before the call.
    pub async fn copy_to(
        &self,
        dest: std::path::PathBuf,
    ) -> Result<(), crate::store::backup::BackupError> {
        self.persist.backup(dest).await
    }
}

impl RunningBroker {
    /// The listeners' counters, for the metrics.
    pub fn listeners(&self) -> BrokerListeners {
        self.listener_stats.clone()
    }

    /// A handle for backups of the store; `None` with `durability = "memory"`.
    pub fn store_backup(&self) -> Option<StoreBackup> {
        self.store_backup.clone()
    }

    /// Wait until every listener and connection has stopped, then stop the router, then
    /// wait for the store to checkpoint and close its file. Call after cancelling the
    /// shutdown token given to [`start`].
    pub async fn wait(mut self) {
        while self.listeners.join_next().await.is_some() {}
        self.router_stop.cancel();
        let _ = self.router.await;
        if let Some(stopped) = self.store_stopped.take() {
            stopped.await;
        }
    }
}

/// Bind every listener and start the router. Fails before accepting anything when a
/// listener cannot bind or the password file cannot be read.
pub async fn start(
    config: &BrokerConfig,
    shutdown: CancellationToken,
) -> Result<RunningBroker, BrokerError> {
    start_with_status(config, shutdown, None).await
}

/// [`start`], listing connected clients on the status board (each recorded when it
/// connects and removed when it disconnects; nothing per message).
pub async fn start_with_status(
    config: &BrokerConfig,
    shutdown: CancellationToken,
    clients: Option<crate::status::ClientBoard>,
) -> Result<RunningBroker, BrokerError> {
    let passwords = match &config.password_file {
        Some(path) => Some(Arc::new(PasswordFile::load(path)?)),
        None => None,
    };
    let acl = match &config.acl_file {
        Some(path) => Some(Arc::new(Acl::load(path)?)),
        None => None,
    };
    let counters = Arc::new(connection::Counters::default());
    let mut settings = connection::Settings::from_config(config, passwords, acl, counters.clone());
    settings.clients = clients;
    let settings = Arc::new(settings);

    let store = match config.durability {
        Durability::Memory => None,
        durability => Some(crate::store::sessions::Persist::open(
            &config.store_path,
            durability,
            config.commit_window,
            MEMORY_WINDOW,
        )?),
    };

    let store_stopped = store
        .as_ref()
        .map(|(persist, _)| Box::pin(persist.stopped()) as std::pin::Pin<Box<_>>);
    let store_backup = store.as_ref().map(|(persist, _)| StoreBackup {
        persist: persist.weak(),
        path: config.store_path.clone(),
    });

    let mut bound = Vec::new();
    for listener in &config.listeners {
        listener::prepare(listener)?;
        let socket = tokio::net::TcpListener::bind(listener.bind)
            .await
            .map_err(|source| BrokerError::Bind {
                addr: listener.bind,
                source,
            })?;
        bound.push((socket, listener.clone()));
    }

    let (router_tx, router_rx) = mpsc::channel(ROUTER_QUEUE);
    let handle = BrokerHandle { router: router_tx };
    let mut listeners = JoinSet::new();
    let router_stop = CancellationToken::new();
    let limits = session::Limits {
        max_messages: config.max_queued_messages,
        max_bytes: config.max_queued_bytes,
        memory_window: MEMORY_WINDOW,
        queue_memory: session::QueueMemory::new(config.queue_memory),
    };
    let router = crate::essential::spawn(
        "broker-router",
        Router::new(limits, counters, config.durability, store).run(router_rx, router_stop.clone()),
    );

    if let Some(interval) = config.sys_interval {
        listeners.spawn(sys::run(
            handle.clone(),
            interval,
            std::time::Instant::now(),
            shutdown.clone(),
        ));
    }

    let mut local_addrs = Vec::new();
    let mut listener_stats = Vec::new();
    for (socket, listener_config) in bound {
        let addr = socket.local_addr().map_err(|source| BrokerError::Bind {
            addr: listener_config.bind,
            source,
        })?;
        tracing::info!(%addr, websocket = listener_config.websocket, "broker listening");
        local_addrs.push(addr);
        let stats = Arc::new(ListenerStats::new(&listener_config, addr));
        listener_stats.push(stats.clone());
        listeners.spawn(crate::essential::guard(
            "broker-listener",
            listener::run(
                socket,
                listener_config,
                stats,
                settings.clone(),
                handle.clone(),
                shutdown.clone(),
            ),
        ));
    }

    Ok(RunningBroker {
        handle,
        local_addrs,
        listener_stats: BrokerListeners(listener_stats),
        listeners,
        router,
        router_stop,
        store_backup,
        store_stopped,
    })
}
