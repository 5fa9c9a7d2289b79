//! The embedded MQTT broker: listeners, one task per client connection, and one router task
//! that owns subscriptions, sessions and retained messages.
//!
//! In-process publishers and subscribers (drivers, uplinks, the gateway status) talk to the
//! same router through a [`BrokerHandle`]: no loopback socket.

mod acl;
mod auth;
pub mod config;
mod connection;
mod listener;
pub(crate) mod protocol;
mod router;
// pub(crate): the session store keeps deliveries and their in-flight state.
pub(crate) mod session;
mod sys;
pub use crate::topic;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::model::{Message, QoS};
use config::{BrokerConfig, Durability};

pub use crate::store::sessions::PersistError;
pub use crate::store::AckShare;
pub use acl::{Acl, AclError};
pub use auth::{hash_password, AuthError, PasswordFile};
pub use router::BrokerStats;
use router::{Router, RouterRequest};

/// Persistent messages per session kept in memory; the rest wait on disk.
const MEMORY_WINDOW: usize = 1000;

/// Capacity of the router's request channel. Publishers wait when it is full (backpressure
/// rather than loss).
const ROUTER_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid topic filter {filter:?}")]
    InvalidFilter { filter: String },
    #[error("invalid topic {topic:?} for a publish")]
    InvalidTopic { topic: String },
    #[error("the broker is shutting down")]
    Closed,
    #[error("the broker store could not commit the message (its error is logged)")]
    NotStored,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] PersistError),
    #[error(transparent)]
    Acl(#[from] AclError),
    #[error("{0}")]
    Tls(String),
}

/// How an in-process subscriber wants its messages.
#[derive(Debug, Clone)]
pub struct InternalSubscribeOptions {
    /// Channel capacity. When full, the router waits: internal subscribers get every
    /// message (they are the outbox and the drivers' command inputs), and a slow one slows
    /// publishers rather than losing data.
    pub capacity: usize,
    /// Also deliver the matching retained messages, from right after subscribing, as many
    /// at a time as the channel has room for (the router does not wait for this
    /// subscriber to read them).
    pub send_retained: bool,
    /// This subscriber stores what it receives (an uplink's outbox): with
    /// `durability = "sync"`, a QoS 1/2 publish it receives comes with an [`AckShare`]
    /// (see [`InternalSubscription::recv_with_ack`]) and its publisher is acknowledged only
    /// once the subscriber has released it.
    pub commit: bool,
}

impl Default for InternalSubscribeOptions {
    fn default() -> Self {
        InternalSubscribeOptions {
            capacity: 1024,
            send_retained: false,
            commit: false,
        }
    }
}

/// Messages for one in-process subscriber. Dropping it unsubscribes.
#[derive(Debug)]
pub struct InternalSubscription {
    id: u64,
    rx: mpsc::Receiver<(Message, Option<AckShare>)>,
    router: mpsc::Sender<RouterRequest>,
}

impl InternalSubscription {
    /// The next matching message; `None` once the broker has stopped. Its publisher's
    /// acknowledgement, if this subscriber holds a share of it, is released at once.
    pub async fn recv(&mut self) -> Option<Message> {
        self.recv_with_ack().await.map(release)
    }

    /// A message already waiting, without blocking (as [`recv`](Self::recv)).
    pub fn try_recv(&mut self) -> Option<Message> {
        self.try_recv_with_ack().map(release)
    }

    /// The next matching message with this subscriber's share of its publisher's
    /// acknowledgement (only with [`InternalSubscribeOptions::commit`]); `None` once the
    /// broker has stopped.
    pub async fn recv_with_ack(&mut self) -> Option<(Message, Option<AckShare>)> {
        self.rx.recv().await
    }

    /// A message already waiting, without blocking (as [`recv_with_ack`](Self::recv_with_ack)).
    pub fn try_recv_with_ack(&mut self) -> Option<(Message, Option<AckShare>)> {
        self.rx.try_recv().ok()
    }
}

fn release((message, ack): (Message, Option<AckShare>)) -> Message {
    if let Some(ack) = ack {
        ack.stored();
    }
    message
}

impl Drop for InternalSubscription {
    fn drop(&mut self) {
        // Best effort: when the router is gone there is nothing to unsubscribe from.
        let _ = self
            .router
            .try_send(RouterRequest::InternalUnsubscribe { id: self.id });
    }
}

/// A cheap, cloneable handle into the router for in-process publishers and subscribers.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    router: mpsc::Sender<RouterRequest>,
}

impl BrokerHandle {
    /// Route a message to every matching subscriber (and store it if retained). Returns
    /// once the router has taken it.
    pub async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        if !topic::valid_topic_name(&message.topic) {
            return Err(BrokerError::InvalidTopic {
                topic: message.topic.to_string(),
            });
        }
        self.router
            .send(RouterRequest::Publish {
                message,
                done: None,
                congestion: None,
            })
            .await
            .map_err(|_| BrokerError::Closed)
    }

    /// Like [`publish`](Self::publish), but returns only once the router has delivered the
    /// message to every matching session queue; answers whether anything matched.
    pub async fn publish_and_wait(&self, message: Message) -> Result<bool, BrokerError> {
        if !topic::valid_topic_name(&message.topic) {
            return Err(BrokerError::InvalidTopic {
                topic: message.topic.to_string(),
            });
        }
        let (done, matched) = oneshot::channel();
        self.router
            .send(RouterRequest::Publish {
                message,
                done: Some(done),
                congestion: None,
            })
            .await
            .map_err(|_| BrokerError::Closed)?;
        // Answered unless the router stopped, or the commit that had to hold it failed.
        matched.await.map_err(|_| {
            if self.router.is_closed() {
                BrokerError::Closed
            } else {
                BrokerError::NotStored
            }
        })
    }

    /// Subscribe an in-process consumer named `name` to `filters`. The subscriber never
    /// receives messages it published itself under the same name (no bridge loops).
    pub async fn subscribe(
        &self,
        name: &str,
        filters: Vec<(String, QoS)>,
        options: InternalSubscribeOptions,
    ) -> Result<InternalSubscription, BrokerError> {
        for (filter, _) in &filters {
            if !topic::valid_filter(filter) {
                return Err(BrokerError::InvalidFilter {
                    filter: filter.clone(),
                });
            }
        }
        let (tx, rx) = mpsc::channel(options.capacity.max(1));
        let (reply, id) = oneshot::channel();
        self.router
            .send(RouterRequest::InternalSubscribe {
                name: Arc::from(name),
                filters,
                send_retained: options.send_retained,
                commit: options.commit,
                tx,
                reply,
            })
            .await
            .map_err(|_| BrokerError::Closed)?;
        let id = id.await.map_err(|_| BrokerError::Closed)?;
        Ok(InternalSubscription {
            id,
            rx,
            router: self.router.clone(),
        })
    }

    /// Counters for status and `$SYS`.
    pub async fn stats(&self) -> Result<BrokerStats, BrokerError> {
        let (reply, stats) = oneshot::channel();
        self.router
            .send(RouterRequest::Stats { reply })
            .await
            .map_err(|_| BrokerError::Closed)?;
        stats.await.map_err(|_| BrokerError::Closed)
    }
}

/// A started broker: its handle, the addresses it listens on, and its tasks.
pub struct RunningBroker {
    pub handle: BrokerHandle,
    /// Actual bound addresses, in config order (useful with port 0).
    pub local_addrs: Vec<SocketAddr>,
    listeners: JoinSet<()>,
    router: tokio::task::JoinHandle<()>,
    router_stop: CancellationToken,
    /// Asks the store for backups (with `sync` and `batched` durability).
    store_backup: Option<StoreBackup>,
    /// Resolves when the store has checkpointed and closed its file.
    store_stopped: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
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
    let passwords = match &config.password_file {
        Some(path) => Some(Arc::new(PasswordFile::load(path)?)),
        None => None,
    };
    let acl = match &config.acl_file {
        Some(path) => Some(Arc::new(Acl::load(path)?)),
        None => None,
    };
    let counters = Arc::new(connection::Counters::default());
    let settings = Arc::new(connection::Settings::from_config(
        config,
        passwords,
        acl,
        counters.clone(),
    ));

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
        listener::prepare(listener).map_err(|e| BrokerError::Tls(e.to_string()))?;
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
    for (socket, listener_config) in bound {
        let addr = socket.local_addr().map_err(|source| BrokerError::Bind {
            addr: listener_config.bind,
            source,
        })?;
        tracing::info!(%addr, websocket = listener_config.websocket, "broker listening");
        local_addrs.push(addr);
        listeners.spawn(crate::essential::guard(
            "broker-listener",
            listener::run(
                socket,
                listener_config,
                settings.clone(),
                handle.clone(),
                shutdown.clone(),
            ),
        ));
    }

    Ok(RunningBroker {
        handle,
        local_addrs,
        listeners,
        router,
        router_stop,
        store_backup,
        store_stopped,
    })
}
