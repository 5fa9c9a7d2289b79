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
use tokio_util::sync::CancellationToken;

use config::{BrokerConfig, Durability, ListenerConfig};

pub use crate::store::sessions::PersistError;
pub use acl::{Acl, AclError};
pub use auth::{hash_password, AuthError, PasswordFile};
pub use bus::{AckShare, BrokerHandle, BusError, InternalSubscribeOptions, InternalSubscription};
use listener::ListenerStats;
pub use listener::{BindError, ListenerSnapshot, TlsError};
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
    #[error(transparent)]
    Bind(#[from] BindError),
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
    /// Actual bound addresses at start, in config order (useful with port 0); see
    /// [`RunningBroker::listener_addrs`] after a reload.
    pub local_addrs: Vec<SocketAddr>,
    listeners: Vec<RunningListener>,
    /// The running listeners' counters, in configuration order, shared with the metrics.
    listener_stats: BrokerListeners,
    sys: Option<tokio::task::JoinHandle<()>>,
    /// The parent of every listener's token: cancelled by the gateway at shutdown.
    shutdown: CancellationToken,
    settings: Arc<connection::Settings>,
    /// What the password and ACL files held when last loaded.
    access_files: AccessFiles,
    router: tokio::task::JoinHandle<()>,
    router_stop: CancellationToken,
    /// Asks the store for backups (with `sync` and `batched` durability).
    store_backup: Option<StoreBackup>,
    /// Resolves when the store has checkpointed and closed its file. In a mutex only so
    /// that the broker is `Sync` (a reload borrows it across awaits); never contended.
    store_stopped: std::sync::Mutex<Option<StoreStopped>>,
}

type StoreStopped = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One listener's accept task, with its own token so a reload can stop it alone (its
/// connections close with it; other listeners' clients stay).
struct RunningListener {
    config: ListenerConfig,
    addr: SocketAddr,
    transport: listener::SharedTransport,
    stats: Arc<ListenerStats>,
    /// What its TLS files held when last loaded.
    tls_files: u64,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningListener {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Every listener's counters (connections and handshakes now, sockets accepted and
/// refused), readable at any time without asking the router. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct BrokerListeners(Arc<std::sync::RwLock<Vec<Arc<ListenerStats>>>>);

impl BrokerListeners {
    /// One snapshot per listener, in configuration order.
    pub fn snapshot(&self) -> Vec<ListenerSnapshot> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|stats| stats.snapshot())
            .collect()
    }

    /// What the listeners are now (after a start or a reload).
    fn replace(&self, listeners: &[RunningListener]) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            listeners.iter().map(|l| l.stats.clone()).collect();
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
        for listener in self.listeners.drain(..) {
            let _ = listener.task.await;
        }
        if let Some(sys) = self.sys.take() {
            let _ = sys.await;
        }
        self.router_stop.cancel();
        let _ = self.router.await;
        let stopped = self
            .store_stopped
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(stopped) = stopped {
            stopped.await;
        }
    }
}

/// Loads a listener's TLS files as [`start`] will (certificate, key and client CA, and
/// whether the key matches the certificate), without binding: for `fieldmq check`.
pub fn check_listener_tls(listener: &config::ListenerConfig) -> Result<(), TlsError> {
    listener::prepare(listener).map(drop)
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
    let access = load_access(config)?;
    let access_files = access_fingerprint(config);
    let counters = Arc::new(connection::Counters::default());
    let mut settings =
        connection::Settings::from_config(config, access.passwords, access.acl, counters.clone());
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
        .map(|(persist, _)| Box::pin(persist.stopped()) as StoreStopped);
    let store_backup = store.as_ref().map(|(persist, _)| StoreBackup {
        persist: persist.weak(),
        path: config.store_path.clone(),
    });

    let mut bound = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        bound.push(bind(listener, index).await?);
    }

    let (router_tx, router_rx) = mpsc::channel(ROUTER_QUEUE);
    let handle = BrokerHandle { router: router_tx };
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

    let sys = config.sys_interval.map(|interval| {
        tokio::spawn(sys::run(
            handle.clone(),
            interval,
            std::time::Instant::now(),
            shutdown.clone(),
        ))
    });

    let mut broker = RunningBroker {
        handle,
        local_addrs: Vec::new(),
        listeners: Vec::new(),
        listener_stats: BrokerListeners::default(),
        sys,
        shutdown,
        settings,
        access_files,
        router,
        router_stop,
        store_backup,
        store_stopped: std::sync::Mutex::new(store_stopped),
    };
    for listener in bound {
        broker.spawn_listener(listener)?;
    }
    broker.local_addrs = broker.listener_addrs();
    Ok(broker)
}

/// A listener bound and its transport built, not yet accepting.
struct BoundListener {
    index: usize,
    socket: tokio::net::TcpListener,
    config: ListenerConfig,
    transport: listener::Transport,
    tls_files: u64,
}

/// `index` is the listener's place in `[[broker.listeners]]`, for the error message.
async fn bind(config: &ListenerConfig, index: usize) -> Result<BoundListener, BrokerError> {
    let transport = listener::prepare(config)?;
    let socket = listener::bind(config, index).await?;
    Ok(BoundListener {
        index,
        socket,
        config: config.clone(),
        transport,
        tls_files: tls_fingerprint(config),
    })
}

fn tls_fingerprint(config: &ListenerConfig) -> u64 {
    match &config.tls {
        Some(tls) => crate::pem::fingerprint(
            [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| p.as_path()),
        ),
        None => 0,
    }
}

fn load_access(config: &BrokerConfig) -> Result<connection::Access, BrokerError> {
    Ok(connection::Access {
        allow_anonymous: config.allow_anonymous,
        passwords: match &config.password_file {
            Some(path) => Some(PasswordFile::load(path)?),
            None => None,
        },
        acl: match &config.acl_file {
            Some(path) => Some(Acl::load(path)?),
            None => None,
        },
    })
}

/// What the password file and the ACL file hold, each on its own (a reload reports them
/// apart).
fn access_fingerprint(config: &BrokerConfig) -> AccessFiles {
    let one = |file: &Option<std::path::PathBuf>| crate::pem::fingerprint(file.as_deref());
    AccessFiles {
        passwords: one(&config.password_file),
        acl: one(&config.acl_file),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AccessFiles {
    passwords: u64,
    acl: u64,
}

/// What a reload of the broker's section will do, prepared (files loaded, new sockets
/// bound) before anything running is touched: see [`RunningBroker::prepare_reload`].
pub struct BrokerReload {
    access: Option<connection::Access>,
    access_changes: Vec<String>,
    access_files: AccessFiles,
    /// Per new listener, in config order: what to do with it.
    listeners: Vec<ListenerPlan>,
}

enum ListenerPlan {
    /// The running listener at this index stays as it is.
    Keep(usize),
    /// The running listener at this index stays; new handshakes use this transport.
    Rotate(usize, listener::Transport, u64),
    /// The running listener at this index stops and this one (same address, at this place
    /// in the new configuration) starts.
    Restart(usize, usize, ListenerConfig),
    /// A new listener, already bound.
    Add(BoundListener),
}

impl RunningBroker {
    /// The addresses the listeners accept on now, in config order.
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    fn spawn_listener(&mut self, bound: BoundListener) -> Result<SocketAddr, BrokerError> {
        let addr = bound.socket.local_addr().map_err(|source| BindError {
            addr: bound.config.bind,
            index: bound.index,
            source,
        })?;
        // The service logs every listener it started at info (see `service::log_listeners`).
        tracing::debug!(%addr, websocket = bound.config.websocket, "broker listening");
        let stop = self.shutdown.child_token();
        let transport = Arc::new(std::sync::RwLock::new(bound.transport));
        let stats = Arc::new(ListenerStats::new(&bound.config, addr));
        let task = tokio::spawn(crate::essential::guard(
            "broker-listener",
            listener::run(
                bound.socket,
                bound.config.clone(),
                transport.clone(),
                stats.clone(),
                self.settings.clone(),
                self.handle.clone(),
                stop.clone(),
            ),
        ));
        self.listeners.push(RunningListener {
            config: bound.config,
            addr,
            transport,
            stats,
            tls_files: bound.tls_files,
            stop,
            task,
        });
        self.listener_stats.replace(&self.listeners);
        Ok(addr)
    }

    /// Load what `config` asks for (password and ACL files, TLS files of listeners that
    /// are new or whose files changed) and bind new listeners, changing nothing that
    /// runs: an error here leaves the broker as it was. Only the listeners and the access
    /// keys (`allow_anonymous`, `password_file`, `acl_file`) are compared; the caller
    /// refuses changes to the others.
    pub async fn prepare_reload(&self, config: &BrokerConfig) -> Result<BrokerReload, BrokerError> {
        let access = load_access(config)?;
        let access_files = access_fingerprint(config);
        let running = self.settings.access();
        let mut access_changes = Vec::new();
        let mut changed =
            |what: &str, now: Option<&std::path::PathBuf>, before_present: bool| match (
                now,
                before_present,
            ) {
                (Some(_), true) => access_changes.push(format!("{what}: reloaded")),
                (Some(_), false) => access_changes.push(format!("{what}: added")),
                (None, true) => access_changes.push(format!("{what}: removed")),
                (None, false) => {}
            };
        if access_files.passwords != self.access_files.passwords
            || access.passwords.is_some() != running.passwords.is_some()
        {
            changed(
                "password file",
                config.password_file.as_ref(),
                running.passwords.is_some(),
            );
        }
        if access_files.acl != self.access_files.acl
            || access.acl.is_some() != running.acl.is_some()
        {
            changed("acl", config.acl_file.as_ref(), running.acl.is_some());
        }
        if access.allow_anonymous != running.allow_anonymous {
            access_changes.push(format!(
                "allow_anonymous: {}",
                if access.allow_anonymous { "on" } else { "off" }
            ));
        }
        let access_changed = !access_changes.is_empty();

        let mut taken = vec![false; self.listeners.len()];
        let mut listeners = Vec::new();
        for (position, wanted) in config.listeners.iter().enumerate() {
            let same_bind = self
                .listeners
                .iter()
                .enumerate()
                .position(|(i, l)| !taken[i] && l.config.bind == wanted.bind);
            let plan = match same_bind {
                Some(index) => {
                    taken[index] = true;
                    let running = &self.listeners[index];
                    let tls_files = tls_fingerprint(wanted);
                    if running.config == *wanted && running.tls_files == tls_files {
                        ListenerPlan::Keep(index)
                    } else if only_tls_differs(&running.config, wanted) {
                        ListenerPlan::Rotate(index, listener::prepare(wanted)?, tls_files)
                    } else {
                        listener::prepare(wanted)?;
                        ListenerPlan::Restart(index, position, wanted.clone())
                    }
                }
                None => ListenerPlan::Add(bind(wanted, position).await?),
            };
            listeners.push(plan);
        }
        Ok(BrokerReload {
            access: access_changed.then_some(access),
            access_changes,
            access_files,
            listeners,
        })
    }

    /// Apply a prepared reload: swap the access rules, rotate certificates, stop removed
    /// and changed listeners (their clients are disconnected) and start new ones. Returns
    /// one line per change.
    pub async fn apply_reload(&mut self, reload: BrokerReload) -> Vec<String> {
        let mut changes = reload.access_changes;
        if let Some(access) = reload.access {
            self.settings.replace_access(access);
        }
        self.access_files = reload.access_files;

        let mut old: Vec<Option<RunningListener>> = self.listeners.drain(..).map(Some).collect();
        let mut kept = Vec::new();
        let mut restart = Vec::new();
        let mut add = Vec::new();
        for plan in reload.listeners {
            match plan {
                ListenerPlan::Keep(index) => kept.extend(old[index].take()),
                ListenerPlan::Rotate(index, transport, tls_files) => {
                    if let Some(mut listener) = old[index].take() {
                        *listener
                            .transport
                            .write()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = transport;
                        listener.tls_files = tls_files;
                        changes.push(format!(
                            "listener {}: certificate reloaded",
                            listener.config.bind
                        ));
                        kept.push(listener);
                    }
                }
                ListenerPlan::Restart(index, position, config) => {
                    if let Some(listener) = old[index].take() {
                        listener.stop().await;
                    }
                    restart.push((position, config));
                }
                ListenerPlan::Add(bound) => add.push(bound),
            }
        }
        for removed in old.into_iter().flatten() {
            changes.push(format!("listener {}: removed", removed.config.bind));
            removed.stop().await;
        }
        self.listeners = kept;
        self.listener_stats.replace(&self.listeners);
        for (position, config) in restart {
            match bind(&config, position).await {
                Ok(bound) => match self.spawn_listener(bound) {
                    Ok(_) => changes.push(format!("listener {}: restarted", config.bind)),
                    Err(error) => {
                        changes.push(format!("listener {}: not restarted: {error}", config.bind))
                    }
                },
                Err(error) => {
                    tracing::error!(listener = %config.bind, %error, "listener not restarted");
                    changes.push(format!("listener {}: not restarted: {error}", config.bind));
                }
            }
        }
        for bound in add {
            let bind = bound.config.bind;
            match self.spawn_listener(bound) {
                Ok(_) => changes.push(format!("listener {bind}: added")),
                Err(error) => changes.push(format!("listener {bind}: not added: {error}")),
            }
        }
        changes
    }
}

/// Whether two listener configs differ only in their TLS files or options (both with TLS):
/// then the listener keeps its socket and clients and swaps its acceptor.
fn only_tls_differs(running: &ListenerConfig, wanted: &ListenerConfig) -> bool {
    running.tls.is_some()
        && wanted.tls.is_some()
        && ListenerConfig {
            tls: None,
            ..running.clone()
        } == ListenerConfig {
            tls: None,
            ..wanted.clone()
        }
}
