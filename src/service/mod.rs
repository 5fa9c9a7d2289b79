//! Wiring: starts the broker, the devices and the uplinks from a [`Config`], publishes the
//! gateway status, and stops everything in order on shutdown under a deadline.
//!
//! Shutdown order: devices and uplinks stop (uplinks flush and say `offline` to their
//! cloud), the gateway publishes `offline` retained on the local broker, then the broker
//! closes client connections after delivering what is queued for them.

pub mod config;
pub mod control;
mod notify;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerError, BrokerHandle};
use crate::drivers::{self, DeviceContext};
use crate::http::{self, HttpContext, HttpError};
use crate::metrics::Metrics;
use crate::model::{Message, QoS};
use crate::reload::{ReloadReport, ReloadRequest, Reloader};
use crate::status::{GatewayInfo, StatusBoard};
use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("uplink: {0}")]
    Uplink(#[from] crate::uplink::UplinkError),
    #[error("{0}")]
    Http(#[from] HttpError),
}

/// A gateway that has started: its broker addresses and its stop switch.
pub struct Gateway {
    pub local_addrs: Vec<SocketAddr>,
    /// The HTTP listener's bound address, when `[http]` is configured.
    pub http_addr: Option<SocketAddr>,
    pub broker: BrokerHandle,
    /// The live picture of this gateway.
    pub status: StatusBoard,
    /// The registry the parts record into (what `GET /metrics` shows).
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    finished: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Ask everything to stop and wait until it has (bounded by the shutdown timeout).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.finished.await;
    }
}

/// Start the gateway described by `config`. It runs until `shutdown` is cancelled.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Gateway, ServiceError> {
    std::fs::create_dir_all(&config.gateway.data_dir).map_err(|source| ServiceError::DataDir {
        path: config.gateway.data_dir.clone(),
        source,
    })?;

    // The broker has its own token: it must outlive devices and uplinks so their last
    // words (the `offline` status) reach local clients.
    let broker_shutdown = CancellationToken::new();
    // The live picture the status API, the status page and `fieldmq status` show.
    let board = StatusBoard::new(GatewayInfo {
        id: config.gateway.id.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        // Absolute, so that the status names the file whatever directory it started in.
        config_file: match config.source.is_file() {
            true => std::path::absolute(&config.source).unwrap_or_else(|_| config.source.clone()),
            false => config.source.clone(),
        },
        data_dir: config.gateway.data_dir.clone(),
    });
    let running = broker::start_with_status(
        &config.broker,
        broker_shutdown.clone(),
        Some(board.clients()),
    )
    .await?;
    let handle = running.handle.clone();
    let local_addrs = running.local_addrs.clone();

    let metrics = Arc::new(Metrics::new());
    let (reloader, reload_requests) = Reloader::new();
    board.attach_reloader(reloader.clone());
    let mut sources = JoinSet::new();
    // PLACEHOLDER until live reload is wired (the reload part replaces this line): every
    // request is answered "refused".
    sources.spawn(refuse_reloads(reload_requests, shutdown.clone()));

    // Bound before anything else starts, so that an address in use stops the start cleanly.
    let http_addr = match &config.http {
        Some(http_config) => {
            let context = HttpContext {
                reloader: reloader.clone(),
                metrics: metrics.clone(),
                broker: handle.clone(),
                status: board.clone(),
                listeners: running.listeners(),
            };
            match http::start(http_config, context, shutdown.clone()).await {
                Ok(running) => {
                    let addr = running.local_addr;
                    sources.spawn(running.wait());
                    Some(addr)
                }
                Err(error) => {
                    shutdown.cancel();
                    while sources.join_next().await.is_some() {}
                    broker_shutdown.cancel();
                    running.wait().await;
                    return Err(error.into());
                }
            }
        }
        None => None,
    };

    let status_topic = config.gateway.status_topic.clone();
    publish_status(&handle, &status_topic, "online").await;

    // Modbus devices are grouped: RTU devices on one serial port share one bus task.
    let mut modbus = Vec::new();
    for device in config.devices.iter().cloned() {
        let device_board = board.register_device(
            &device.name,
            device.driver_name(),
            &device.points_and_units(),
        );
        let rtu_bus = match &device.driver {
            drivers::config::DriverConfig::Modbus(modbus) => match &modbus.transport {
                drivers::modbus::Transport::Rtu(settings) => Some(metrics.rtu_bus(&settings.path)),
                drivers::modbus::Transport::Tcp { .. } => None,
            },
            _ => None,
        };
        let context =
            DeviceContext::new(&config.gateway.id, &status_topic, &device, handle.clone())
                .with_metrics(metrics.device(&device.name), rtu_bus)
                .with_status(device_board);
        if device.driver.shares_bus() {
            modbus.push((device, context));
            continue;
        }
        sources.spawn(drivers::run_device(device, context, shutdown.clone()));
    }
    for task in drivers::modbus::device_tasks(modbus, shutdown.clone()) {
        sources.spawn(task);
    }

    // Uplinks stop after the devices, so the last readings still reach their outboxes.
    let uplink_shutdown = CancellationToken::new();
    let mut uplinks = Vec::new();
    for uplink in config.uplinks.iter().cloned() {
        let uplink_board = board.register_uplink(&uplink.name, &uplink.url.to_string());
        let uplink_metrics = metrics.uplink(&uplink.name);
        let started = crate::uplink::start_with_status(
            uplink,
            &config.gateway,
            handle.clone(),
            uplink_metrics,
            uplink_shutdown.clone(),
            Some(uplink_board),
        )
        .await;
        match started {
            Ok(running) => uplinks.push(running),
            Err(error) => {
                // Fatal at start (a damaged outbox, a bad certificate): stop what started.
                shutdown.cancel();
                uplink_shutdown.cancel();
                for running in uplinks {
                    let _ = running.wait().await;
                }
                while sources.join_next().await.is_some() {}
                broker_shutdown.cancel();
                return Err(error.into());
            }
        }
    }

    // `fieldmq backup` asks the running gateway through this socket (see control.rs).
    let stores = Arc::new(control::Stores {
        broker: running.store_backup(),
        outboxes: uplinks.iter().map(|u| u.outbox().clone()).collect(),
    });
    let socket = control::socket_path(&config.gateway.data_dir);
    match control::bind(&config.gateway.data_dir) {
        Ok(listener) => {
            sources.spawn(control::serve(
                listener,
                socket,
                stores,
                board.clone(),
                shutdown.clone(),
            ));
        }
        Err(error) => tracing::warn!(
            path = %socket.display(), %error,
            "no control socket: `fieldmq backup` works only while the gateway is stopped"
        ),
    }

    let deadline = config.gateway.shutdown_timeout;
    let finished = crate::essential::spawn(
        "gateway-supervisor",
        supervise(
            Running {
                broker: running,
                handle: handle.clone(),
                sources,
                uplinks,
            },
            status_topic,
            Stops {
                shutdown: shutdown.clone(),
                uplinks: uplink_shutdown,
                broker: broker_shutdown,
            },
            deadline,
        ),
    );

    Ok(Gateway {
        local_addrs,
        http_addr,
        broker: handle,
        status: board,
        metrics,
        shutdown,
        finished,
    })
}

/// Answers every reload request "refused" until live reload is wired in.
async fn refuse_reloads(
    mut requests: tokio::sync::mpsc::Receiver<ReloadRequest>,
    shutdown: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => return,
            request = requests.recv() => request,
        };
        let Some(request) = request else { return };
        request.answer(ReloadReport::refused(vec![
            "live reload is not available".into()
        ]));
    }
}

async fn publish_status(handle: &BrokerHandle, topic: &str, status: &str) {
    let message = Message::internal("gateway", topic, status.to_owned(), QoS::AtLeastOnce, true);
    if let Err(error) = handle.publish_and_wait(message).await {
        tracing::warn!(%error, topic, "cannot publish gateway status");
    }
}

/// What [`supervise`] stops, in order.
struct Running {
    broker: broker::RunningBroker,
    handle: BrokerHandle,
    sources: JoinSet<()>,
    uplinks: Vec<crate::uplink::RunningUplink>,
}

/// The stop switches: sources first, then uplinks, then the broker.
struct Stops {
    shutdown: CancellationToken,
    uplinks: CancellationToken,
    broker: CancellationToken,
}

async fn supervise(mut running: Running, status_topic: String, stops: Stops, deadline: Duration) {
    stops.shutdown.cancelled().await;
    tracing::info!("stopping");
    let mut uplinks_left: Vec<String> = running
        .uplinks
        .iter()
        .map(|u| u.name().to_owned())
        .collect();
    let stopped = tokio::time::timeout(deadline, async {
        while running.sources.join_next().await.is_some() {}
        stops.uplinks.cancel();
        for uplink in running.uplinks.drain(..) {
            let name = uplink.name().to_owned();
            if let Err(error) = uplink.wait().await {
                tracing::warn!(uplink = %name, %error, "uplink stopped with an error");
            }
            uplinks_left.retain(|n| *n != name);
        }
        publish_status(&running.handle, &status_topic, "offline").await;
        stops.broker.cancel();
        running.broker.wait().await;
    })
    .await;
    match stopped {
        Ok(()) => tracing::info!("stopped"),
        Err(_) => {
            tracing::warn!(
                devices_left = running.sources.len(),
                uplinks_left = ?uplinks_left,
                "shutdown deadline of {deadline:?} reached; exiting anyway"
            );
            stops.uplinks.cancel();
            stops.broker.cancel();
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT: a normal stop.
    Stopped,
    /// SIGHUP with a valid configuration file: stopped so that the service manager starts
    /// the gateway again with the new file (exit status [`RESTART_EXIT_CODE`]).
    Restart,
}

/// Exit status asking systemd to start the gateway again (`RestartForceExitStatus=`).
pub const RESTART_EXIT_CODE: u8 = 75;

/// How often the watchdog health probe asks the router for its counters.
const HEALTH_PROBE: Duration = Duration::from_secs(5);

/// Run until SIGINT or SIGTERM (or SIGHUP, see [`Exit::Restart`]), then stop gracefully.
/// Tells systemd when ready and pings its watchdog while the router answers.
pub async fn run_until_signal(config: Config) -> Result<Exit, ServiceError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServiceError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServiceError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(ServiceError::Signal)?;

    let shutdown = CancellationToken::new();
    let summary = ready_message(&config);
    let source = config.source.clone();
    let gateway = start(config, shutdown.clone()).await?;
    for addr in &gateway.local_addrs {
        tracing::info!(%addr, "MQTT listener ready");
    }
    let notifier = notify::Notifier::from_env();
    notifier.ready_with_status(&summary);

    // The watchdog is fed only while the router answers: a hung broker gets restarted.
    let healthy = Arc::new(AtomicBool::new(true));
    let probe = tokio::spawn(probe_health(
        gateway.broker.clone(),
        healthy.clone(),
        shutdown.clone(),
    ));
    let watchdog = tokio::spawn(
        notifier
            .clone()
            .run_watchdog(move || healthy.load(Ordering::Relaxed), shutdown.clone()),
    );

    let exit = loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break Exit::Stopped; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break Exit::Stopped; }
            _ = sighup.recv() => {
                // Restart only into a configuration that loads: a typo must not take the
                // gateway down.
                match config::load(&source) {
                    Ok(_) => {
                        tracing::info!(config = %source.display(), "SIGHUP: configuration is valid, restarting to apply it");
                        break Exit::Restart;
                    }
                    Err(error) => {
                        tracing::error!(config = %source.display(), "SIGHUP ignored, the configuration has errors:\n{error}");
                    }
                }
            }
        }
    };
    notifier.stopping();
    gateway.stop().await;
    watchdog.abort();
    probe.abort();
    Ok(exit)
}

async fn probe_health(broker: BrokerHandle, healthy: Arc<AtomicBool>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(HEALTH_PROBE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {
                let answered = tokio::time::timeout(HEALTH_PROBE, broker.stats()).await;
                let ok = matches!(answered, Ok(Ok(_)));
                if !ok && healthy.load(Ordering::Relaxed) {
                    tracing::error!("the broker router did not answer within {HEALTH_PROBE:?}; withholding watchdog pings");
                }
                healthy.store(ok, Ordering::Relaxed);
            }
        }
    }
}

/// The one-line status systemd shows.
pub fn ready_message(config: &Config) -> String {
    format!(
        "gateway {}: {} listener(s), {} device(s), {} uplink(s)",
        config.gateway.id,
        config.broker.listeners.len(),
        config.devices.len(),
        config.uplinks.len()
    )
}
