//! Uplinks: one connection per `[[uplinks]]` entry to a cloud broker, with its own SQLite
//! outbox ([`crate::store`]), routes and status.
//!
//! ```text
//!  local broker ──(out-route subscription "uplink:<name>")──► ingest ──append──► outbox
//!                                                                  │ (QoS 0, durable = false)
//!                                                                  ▼
//!  outbox ──read in seq order──► sender ──try_publish──► rumqttc ──► cloud
//!                 ▲                 ▲                       │
//!                 └── delete ◄──────┴──── LinkEvent ◄── poll task (link.rs)
//!                                                           │ cloud messages
//!  local broker ◄── publish as "uplink:<name>" ◄── inbound ◄┘
//! ```
//!
//! Tasks per uplink: `ingest` (local → outbox), `sender` (outbox → cloud, acks, birth,
//! status, clean shutdown), the rumqttc poll task, and `inbound` (cloud → local). The
//! out-route subscription and the in-route publishes use the same internal name
//! `uplink:<name>`, and the broker never delivers a message to the subscriber that
//! published it: a command that came in through an in-route is never sent back out by an
//! out-route of the same uplink (no bridge loop).
//!
//! The queue's invariants are in [`crate::store`]; the ack mapping in `inflight`.

pub mod config;
mod inflight;
mod ingest;
mod link;
pub mod route;
mod sender;
pub mod sparkplug;
mod status;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::bus::{BrokerHandle, BusError, InternalSubscribeOptions};
use crate::config::GatewayConfig;
use crate::metrics::UplinkMetrics;
use crate::status::UplinkBoard;
use crate::store::{Outbox, StoreError};
use config::{SecretSource, UplinkConfig, UrlScheme};

pub use status::UplinkStatus;
pub use tls::{validate_files, TlsError};

/// Messages waiting between the local broker and the ingest task (the router waits when it
/// is full: backpressure, no loss).
const LOCAL_QUEUE: usize = 4096;
/// Non-durable (QoS 0, `durable = false`) messages waiting for the sender; past it they are
/// dropped and counted.
const DIRECT_QUEUE: usize = 1024;
/// Events from the poll task and cloud messages for the inbound task.
const EVENT_QUEUE: usize = 1024;

/// MQTT 5 user property that tells the cloud why the gateway went offline: the will carries
/// [`REASON_CONNECTION_LOST`], the gateway's own message on a clean stop
/// [`REASON_SHUTDOWN`]. The payloads are the same (the will's), so a consumer that only
/// compares the payload sees `offline` either way.
const REASON_PROPERTY: &str = "reason";
/// The will's reason: the cloud publishes it when the connection ends without DISCONNECT.
const REASON_CONNECTION_LOST: &str = "connection lost";
/// The clean stop's reason: the gateway publishes it itself before DISCONNECT.
const REASON_SHUTDOWN: &str = "shutdown";

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink {uplink}: {source}")]
    Outbox { uplink: String, source: StoreError },
    #[error("uplink {uplink}: {source}")]
    Tls { uplink: String, source: TlsError },
    #[error("uplink {uplink}: cannot read the password file {path}: {source}", path = path.display())]
    PasswordFile {
        uplink: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uplink {uplink}: the password variable {var} is not set in the environment")]
    PasswordEnv { uplink: String, var: String },
    #[error("uplink {uplink}: {what}")]
    Unsupported { uplink: String, what: String },
    #[error("uplink {uplink}: local broker: {source}")]
    Broker { uplink: String, source: BusError },
    #[error("uplink {uplink}: the MQTT event loop stopped unexpectedly")]
    LinkStopped { uplink: String },
    #[error("uplink {uplink}: shutdown deadline passed before {unfinished} finished")]
    ShutdownDeadline { uplink: String, unfinished: String },
}

/// The internal name of an uplink on the local broker (subscriber and publisher).
pub fn internal_name(uplink: &str) -> String {
    format!("uplink:{uplink}")
}

/// The outbox file of an uplink: `<data_dir>/uplink-<name>.db` (characters other than
/// letters, digits, `-`, `_` and `.` in the name become `_`).
pub fn outbox_path(data_dir: &Path, uplink: &str) -> PathBuf {
    data_dir.join(format!("uplink-{}.db", file_safe(uplink)))
}

/// `name` as part of a file name: characters other than letters, digits, `-`, `_` and `.`
/// become `_`.
pub(crate) fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The retained status topic of an uplink: `<gateway status topic>/uplinks/<name>`.
pub fn status_topic(gateway_status_topic: &str, uplink: &str) -> String {
    format!(
        "{}/uplinks/{uplink}",
        gateway_status_topic.trim_end_matches('/')
    )
}

/// Problems `fieldmq check` can find without connecting: unusable TLS files, an unreadable
/// password file, an unsupported URL scheme. A missing password environment variable is
/// not reported here (systemd may set it only for the service).
pub fn check(config: &UplinkConfig) -> Vec<UplinkError> {
    let mut errors = Vec::new();
    if let Err(e) = transport_supported(config) {
        errors.push(e);
    }
    if let Some(tls) = &config.tls {
        if let Err(source) = tls::validate_files(tls) {
            errors.push(UplinkError::Tls {
                uplink: config.name.clone(),
                source,
            });
        }
    }
    if let Some(SecretSource::File(path)) = &config.password {
        if let Err(e) = read_password(config, &SecretSource::File(path.clone())) {
            errors.push(e);
        }
    }
    errors
}

fn transport_supported(config: &UplinkConfig) -> Result<(), UplinkError> {
    match config.url.scheme {
        UrlScheme::Mqtt | UrlScheme::Mqtts => Ok(()),
        UrlScheme::Ws | UrlScheme::Wss => Err(UplinkError::Unsupported {
            uplink: config.name.clone(),
            what: "ws:// and wss:// are not supported by this build (rumqttc without its \
                   `websocket` feature); use mqtt:// or mqtts://"
                .into(),
        }),
    }
}

fn read_password(config: &UplinkConfig, source: &SecretSource) -> Result<String, UplinkError> {
    match source {
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|source| UplinkError::PasswordFile {
                uplink: config.name.clone(),
                path: path.clone(),
                source,
            }),
        SecretSource::Env(var) => std::env::var(var).map_err(|_| UplinkError::PasswordEnv {
            uplink: config.name.clone(),
            var: var.clone(),
        }),
    }
}

/// Counters shared between the tasks of one uplink (not persistent).
#[derive(Debug, Default)]
struct SharedCounters {
    /// Non-durable messages dropped (sender busy or disconnected).
    dropped_not_durable: AtomicU64,
}

/// A started uplink.
pub struct RunningUplink {
    name: String,
    task: JoinHandle<Result<(), UplinkError>>,
    outbox: Outbox,
}

impl RunningUplink {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The uplink's outbox (for backups).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Wait until the uplink has stopped (after the shutdown token was cancelled, or on a
    /// fatal error).
    pub async fn wait(self) -> Result<(), UplinkError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(uplink = %self.name, error = %e, "uplink task panicked");
                Err(UplinkError::LinkStopped { uplink: self.name })
            }
        }
    }
}

/// Run one uplink until `shutdown` is cancelled. Convenience for [`start`] + `wait`.
pub async fn run(
    config: UplinkConfig,
    gateway: GatewayConfig,
    broker: BrokerHandle,
    shutdown: CancellationToken,
) -> Result<(), UplinkError> {
    start(config, &gateway, broker, shutdown)
        .await?
        .wait()
        .await
}

/// Open the outbox, build TLS, read the password, subscribe the out-routes locally and
/// start the uplink's tasks. Errors here (a damaged outbox, a bad certificate, a missing
/// password) are fatal for this uplink and name the file or setting.
pub async fn start(
    config: UplinkConfig,
    gateway: &GatewayConfig,
    broker: BrokerHandle,
    shutdown: CancellationToken,
) -> Result<RunningUplink, UplinkError> {
    start_with_metrics(config, gateway, broker, UplinkMetrics::detached(), shutdown).await
}

/// [`start`], recording connections, sends and the outbox into `metrics`.
pub async fn start_with_metrics(
    config: UplinkConfig,
    gateway: &GatewayConfig,
    broker: BrokerHandle,
    metrics: UplinkMetrics,
    shutdown: CancellationToken,
) -> Result<RunningUplink, UplinkError> {
    start_with_status(config, gateway, broker, metrics, shutdown, None).await
}

/// [`start_with_metrics`], also showing the uplink's state, errors and backlog on the
/// status board.
pub async fn start_with_status(
    config: UplinkConfig,
    gateway: &GatewayConfig,
    broker: BrokerHandle,
    metrics: UplinkMetrics,
    shutdown: CancellationToken,
    board: Option<UplinkBoard>,
) -> Result<RunningUplink, UplinkError> {
    let name = config.name.clone();
    transport_supported(&config)?;
    let (config, node) = match config.sparkplug.clone() {
        Some(sparkplug) => {
            let (config, node) = sparkplug_node(config, sparkplug, &gateway.data_dir);
            (config, Some(node))
        }
        None => (config, None),
    };
    let tls = match (&config.url.scheme, &config.tls) {
        (UrlScheme::Mqtts | UrlScheme::Wss, Some(tls)) => Some(tls.clone()),
        (UrlScheme::Mqtts | UrlScheme::Wss, None) => Some(config::TlsConfig {
            ca: None,
            cert: None,
            key: None,
            alpn: Vec::new(),
        }),
        _ => None,
    };
    let tls = match tls {
        Some(tls) => Some(Arc::new(tls::client_config(&tls).map_err(|source| {
            UplinkError::Tls {
                uplink: name.clone(),
                source,
            }
        })?)),
        None => None,
    };
    let password = match &config.password {
        Some(source) => Some(read_password(&config, source)?),
        None => None,
    };
    let outbox = Outbox::open(&outbox_path(&gateway.data_dir, &name), config.queue.clone())
        .await
        .map_err(|source| UplinkError::Outbox {
            uplink: name.clone(),
            source,
        })?;
    let backup_handle = outbox.clone();

    let internal = internal_name(&name);
    let local = if config.routes_out.is_empty() {
        None
    } else {
        let filters = config
            .routes_out
            .iter()
            .map(|r| (r.filter.clone(), r.qos))
            .collect();
        Some(
            broker
                .subscribe(
                    &internal,
                    filters,
                    InternalSubscribeOptions {
                        capacity: LOCAL_QUEUE,
                        send_retained: false,
                        // A durable route's messages are acknowledged to their publisher
                        // once in the outbox (`durability = "sync"`).
                        commit: config.routes_out.iter().any(|r| r.durable),
                    },
                )
                .await
                .map_err(|source| UplinkError::Broker {
                    uplink: name.clone(),
                    source,
                })?,
        )
    };

    let counters = Arc::new(SharedCounters::default());
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (inbound_tx, inbound_rx) = mpsc::channel(EVENT_QUEUE);
    let (direct_tx, direct_rx) = mpsc::channel(DIRECT_QUEUE);
    let (appended_tx, appended_rx) = watch::channel(0u64);
    let poll_stop = CancellationToken::new();
    let window = config.inflight.max(1);
    let (client, poll_task) = link::connect(
        &config,
        link::LinkSettings {
            password,
            tls,
            will_payload: node.as_ref().map(|node| node.will_payload()),
        },
        window,
        link::PollContext {
            name: Arc::from(name.as_str()),
            events: events_tx,
            inbound: inbound_tx,
            reconnect_min: config.reconnect_min,
            reconnect_max: config.reconnect_max,
            stop: poll_stop.clone(),
        },
    );

    let ingest_task = local.map(|subscription| {
        crate::essential::spawn(
            "uplink-ingest",
            ingest::run_ingest(ingest::IngestContext {
                name: name.clone(),
                gateway: gateway.id.clone(),
                routes: config.routes_out.clone(),
                subscription,
                outbox: outbox.clone(),
                direct: direct_tx,
                appended: appended_tx,
                counters: counters.clone(),
                stop: shutdown.clone(),
                template_warned: Default::default(),
                observe: node.as_ref().map(|node| node.latest.clone()),
            }),
        )
    });
    let (node_tx, node_rx) = mpsc::channel(EVENT_QUEUE);
    let inbound_task = match &node {
        Some(node) => crate::essential::spawn(
            "uplink-inbound",
            sparkplug_inbound(
                name.clone(),
                internal.clone(),
                node.shape.clone(),
                inbound_rx,
                node_tx,
                broker.clone(),
            ),
        ),
        None => crate::essential::spawn(
            "uplink-inbound",
            ingest::run_inbound(
                name.clone(),
                internal.clone(),
                config.routes_in.clone(),
                inbound_rx,
                broker.clone(),
            ),
        ),
    };
    let sender_stop = CancellationToken::new();
    let budget = (gateway.shutdown_timeout * 3 / 4).max(Duration::from_secs(1));
    let sender_task = crate::essential::spawn(
        "uplink-sender",
        sender::Sender::new(sender::SenderContext {
            config: config.clone(),
            client,
            outbox: outbox.clone(),
            broker: broker.clone(),
            status_topic: status_topic(&gateway.status_topic, &name),
            internal_name: internal,
            events: events_rx,
            direct: direct_rx,
            appended: appended_rx,
            counters,
            metrics,
            stop: sender_stop.clone(),
            stop_budget: budget / 2,
            board,
            node: node.map(|node| sender::SenderNode {
                session: node.session(),
                events: node_rx,
            }),
        })
        .run(),
    );

    let supervisor_name = name.clone();
    let task = crate::essential::spawn("uplink", async move {
        let mut sender_task = sender_task;
        let early = tokio::select! {
            _ = shutdown.cancelled() => None,
            result = &mut sender_task => Some(result),
        };
        if let Some(result) = early {
            // The sender ended without a shutdown: the link is gone for good.
            poll_stop.cancel();
            poll_task.abort();
            inbound_task.abort();
            if let Some(task) = ingest_task {
                task.abort();
            }
            let _ = outbox.close().await;
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(UplinkError::LinkStopped {
                    uplink: supervisor_name,
                }),
            };
        }
        shutdown_tasks(
            &supervisor_name,
            budget,
            ingest_task,
            sender_task,
            sender_stop,
            poll_stop,
            poll_task,
            inbound_task,
            outbox,
        )
        .await
    });
    Ok(RunningUplink {
        name,
        task,
        outbox: backup_handle,
    })
}

/// The parts of a Sparkplug edge node an uplink's tasks share.
struct SparkplugParts {
    shape: Arc<sparkplug::Shape>,
    latest: Arc<sparkplug::node::Latest>,
    bdseq_file: sparkplug::bdseq::BdSeqFile,
    /// The bdSeq of the current CONNECT.
    bdseq: Arc<AtomicU8>,
}

impl SparkplugParts {
    /// The will payload maker: each CONNECT takes the next bdSeq from the file.
    fn will_payload(&self) -> link::WillPayload {
        let file = self.bdseq_file.clone();
        let current = self.bdseq.clone();
        Box::new(move || {
            let value = file.take();
            current.store(value, Ordering::SeqCst);
            sparkplug::node::ndeath_payload(value)
        })
    }

    fn session(&self) -> sparkplug::node::Session {
        sparkplug::node::Session::new(self.shape.clone(), self.latest.clone(), self.bdseq.clone())
    }
}

/// The uplink settings of a Sparkplug node: its will is the NDEATH (QoS 1, not retained),
/// it has no birth of its own, its out-routes are the devices' points and status topics
/// (stored as read, turned into Sparkplug messages by the sender), and its in-routes its
/// commands and the primary host's state.
fn sparkplug_node(
    mut config: config::UplinkConfig,
    sparkplug: sparkplug::SparkplugConfig,
    data_dir: &Path,
) -> (config::UplinkConfig, SparkplugParts) {
    let shape = Arc::new(sparkplug::Shape::new(sparkplug));
    config.will = Some(config::WillConfig {
        topic: shape.ndeath_topic(),
        payload: String::new(),
        qos: crate::model::QoS::AtLeastOnce,
        retain: false,
        delay: Duration::ZERO,
    });
    config.birth = None;
    config.routes_out = shape
        .local_topics()
        .into_iter()
        .map(|filter| config::OutRoute {
            filter,
            remote_prefix: None,
            remote_template: None,
            qos: crate::model::QoS::AtLeastOnce,
            retain: false,
            durable: true,
            payload: None,
        })
        .collect();
    config.routes_in = shape
        .cloud_filters()
        .into_iter()
        .map(|filter| config::InRoute {
            filter,
            local_prefix: None,
            qos: crate::model::QoS::AtLeastOnce,
        })
        .collect();
    let bdseq_file =
        sparkplug::bdseq::BdSeqFile::new(sparkplug::bdseq::bdseq_path(data_dir, &config.name));
    let parts = SparkplugParts {
        latest: Arc::new(sparkplug::node::Latest::new(shape.clone())),
        bdseq: Arc::new(AtomicU8::new(bdseq_file.peek())),
        bdseq_file,
        shape,
    };
    (config, parts)
}

/// Cloud messages of a Sparkplug node: the primary host's state and rebirth requests go to
/// the sender; DCMD writes are published on the points' `/set` topics (several metrics of a
/// Modbus device on its device-level `/set`), where the owning driver checks and writes
/// them like any other write. A message that does not decode is
/// logged and dropped.
async fn sparkplug_inbound(
    name: String,
    internal: String,
    shape: Arc<sparkplug::Shape>,
    mut inbound: mpsc::Receiver<link::Inbound>,
    node: mpsc::Sender<sparkplug::Inbound>,
    broker: BrokerHandle,
) {
    while let Some(message) = inbound.recv().await {
        match sparkplug::decode_inbound(&shape, &message.topic, &message.payload) {
            Ok(sparkplug::Inbound::Writes(writes)) => {
                for write in writes {
                    tracing::debug!(uplink = %name, topic = %write.topic, value = %write.payload, "DCMD write");
                    let local = crate::model::Message::internal(
                        &internal,
                        write.topic,
                        write.payload,
                        crate::model::QoS::AtLeastOnce,
                        false,
                    );
                    if let Err(e) = broker.publish(local).await {
                        tracing::warn!(uplink = %name, error = %e, "cannot publish a DCMD write locally");
                    }
                }
            }
            Ok(event) => {
                if node.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(uplink = %name, topic = %message.topic, %error, "Sparkplug command dropped");
            }
        }
    }
}

/// Stop taking local messages, let the sender flush and say `offline`, close the outbox,
/// all under `budget`. The error names what did not finish in time.
#[allow(clippy::too_many_arguments)]
async fn shutdown_tasks(
    name: &str,
    budget: Duration,
    ingest_task: Option<JoinHandle<()>>,
    mut sender_task: JoinHandle<Result<(), UplinkError>>,
    sender_stop: CancellationToken,
    poll_stop: CancellationToken,
    mut poll_task: JoinHandle<()>,
    inbound_task: JoinHandle<()>,
    outbox: Outbox,
) -> Result<(), UplinkError> {
    let deadline = tokio::time::Instant::now() + budget;
    let mut unfinished = Vec::new();
    if let Some(mut task) = ingest_task {
        // Ingest stores what the local broker already handed over, then ends.
        if tokio::time::timeout_at(deadline - budget / 2, &mut task)
            .await
            .is_err()
        {
            task.abort();
            unfinished.push("storing the last local messages");
        }
    }
    sender_stop.cancel();
    let mut result = Ok(());
    match tokio::time::timeout_at(deadline, &mut sender_task).await {
        Ok(Ok(r)) => result = r,
        Ok(Err(_)) => {}
        Err(_) => {
            sender_task.abort();
            unfinished.push("the sender (flush, offline status, disconnect)");
        }
    }
    poll_stop.cancel();
    if tokio::time::timeout(Duration::from_millis(200), &mut poll_task)
        .await
        .is_err()
    {
        poll_task.abort();
    }
    inbound_task.abort();
    if let Err(e) = outbox.close().await {
        tracing::debug!(uplink = name, error = %e, "outbox already closed");
    }
    tracing::info!(uplink = name, "uplink stopped");
    if !unfinished.is_empty() {
        return Err(UplinkError::ShutdownDeadline {
            uplink: name.to_string(),
            unfinished: unfinished.join(", "),
        });
    }
    result
}
