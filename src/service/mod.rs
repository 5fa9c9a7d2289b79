//! Wiring: starts the broker, the devices and the uplinks from a [`Config`], publishes the
//! gateway status, and stops everything in order on shutdown under a deadline.
//!
//! Reloads (SIGHUP, `fieldmq reload`, the HTTP API) are applied by the supervisor, one at
//! a time, between start and shutdown (`reload.rs`; what runs by name is in `running.rs`).
//!
//! Shutdown order: devices and uplinks stop (uplinks flush and say `offline` to their
//! cloud), the gateway publishes `offline` retained on the local broker, then the broker
//! closes client connections after delivering what is queued for them.

pub mod config;
pub mod control;
mod notify;
pub mod preflight;
mod reload;
mod running;
mod sparkplug;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerError, BrokerHandle};
use crate::http::{self, HttpContext, HttpError};
use crate::metrics::Metrics;
use crate::model::{Message, QoS};
use crate::reload::{ReloadRequest, Reloader};
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
    #[error("Modbus server: {0}")]
    ModbusServer(#[from] crate::modbus_server::ModbusServerError),
}

/// One address the gateway serves, as the start-up log and the status show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerAddr {
    /// What is served there: `"MQTT"`, `"HTTP"`.
    pub service: &'static str,
    /// How: `"tcp"`, `"tls"`, `"websocket"`, `"websocket+tls"`.
    pub transport: &'static str,
    pub addr: SocketAddr,
}

impl ListenerAddr {
    fn mqtt(config: &broker::config::ListenerConfig, addr: SocketAddr) -> ListenerAddr {
        let transport = match (config.websocket, config.tls.is_some()) {
            (false, false) => "tcp",
            (false, true) => "tls",
            (true, false) => "websocket",
            (true, true) => "websocket+tls",
        };
        ListenerAddr {
            service: "MQTT",
            transport,
            addr,
        }
    }
}

/// One info line per listener (`MQTT listener ready addr=… transport=…`): with the
/// `starting` line before them they tell an operator what runs where.
pub fn log_listeners(listeners: &[ListenerAddr]) {
    for listener in listeners {
        tracing::info!(
            addr = %listener.addr,
            transport = %listener.transport,
            "{} listener ready",
            listener.service
        );
    }
}

/// A gateway that has started: its broker addresses, its reload trigger and its stop
/// switch.
pub struct Gateway {
    pub local_addrs: Vec<SocketAddr>,
    /// Every address it serves, in the order started (the broker's listeners first).
    pub listeners: Vec<ListenerAddr>,
    /// The HTTP listener's bound address, when `[http]` is configured.
    pub http_addr: Option<SocketAddr>,
    pub broker: BrokerHandle,
    /// Asks the gateway to apply its configuration file again (SIGHUP, `fieldmq reload`,
    /// the HTTP API).
    pub reloader: Reloader,
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
    let broker = broker::start_with_status(
        &config.broker,
        broker_shutdown.clone(),
        Some(board.clients()),
    )
    .await?;
    let handle = broker.handle.clone();
    let local_addrs = broker.local_addrs.clone();
    // The broker binds its listeners in the configuration's order.
    let listeners: Vec<ListenerAddr> = config
        .broker
        .listeners
        .iter()
        .zip(&local_addrs)
        .map(|(listener, addr)| ListenerAddr::mqtt(listener, *addr))
        .collect();

    let mut listeners = listeners;
    let metrics = Arc::new(Metrics::new());
    // One reloader for every trigger: SIGHUP, the control socket, the HTTP API; the
    // supervisor below answers its requests.
    let (reloader, reload_requests) = Reloader::new();
    board.attach_reloader(reloader.clone());

    // Bound before anything else starts, so that an address in use stops the start cleanly.
    let http_addr = match &config.http {
        Some(http_config) => {
            let context = HttpContext {
                reloader: reloader.clone(),
                metrics: metrics.clone(),
                broker: handle.clone(),
                status: board.clone(),
                listeners: broker.listeners(),
            };
            match http::start(http_config, context, shutdown.clone()).await {
                Ok(http) => {
                    let addr = http.local_addr;
                    listeners.push(ListenerAddr {
                        service: "HTTP",
                        transport: if http_config.tls.is_some() {
                            "tls"
                        } else {
                            "tcp"
                        },
                        addr,
                    });
                    // Stops with `shutdown`, before the devices' last words.
                    tokio::spawn(http.wait());
                    Some(addr)
                }
                Err(error) => {
                    broker_shutdown.cancel();
                    broker.wait().await;
                    return Err(error.into());
                }
            }
        }
        None => None,
    };

    // Modbus TCP servers: bound before the devices start, so that their first readings
    // reach the register images; stopped with `shutdown`.
    let modbus_servers = match running::ModbusServers::start(
        &config.modbus_servers,
        &config.devices,
        &config.gateway.id,
        handle.clone(),
        (metrics.clone(), board.clone()),
        shutdown.clone(),
    )
    .await
    {
        Ok(servers) => servers,
        Err(error) => {
            shutdown.cancel();
            broker_shutdown.cancel();
            broker.wait().await;
            return Err(error.into());
        }
    };
    for addr in modbus_servers.local_addrs() {
        listeners.push(ListenerAddr {
            service: "Modbus",
            transport: "tcp",
            addr,
        });
    }

    let status_topic = config.gateway.status_topic.clone();
    publish_status(&handle, &status_topic, "online").await;

    // Devices stop with `shutdown`, each also alone with its own child token (reload).
    let devices = running::Devices::start(
        &config.devices,
        &config.gateway.id,
        &status_topic,
        handle.clone(),
        metrics.clone(),
        board.clone(),
        shutdown.clone(),
    );

    // Uplinks stop after the devices, so the last readings still reach their outboxes.
    let uplink_shutdown = CancellationToken::new();
    // With the points devices announced before (retained): when they find the same ones
    // again, the uplinks need no restart.
    let uplinks = match running::Uplinks::start(
        &sparkplug_uplinks(&handle, &config).await,
        &config.gateway,
        handle.clone(),
        metrics.clone(),
        board.clone(),
        uplink_shutdown.clone(),
    )
    .await
    {
        Ok(uplinks) => uplinks,
        Err(error) => {
            // Fatal at start (a damaged outbox, a bad certificate): stop what started.
            shutdown.cancel();
            let mut devices = devices;
            devices.wait().await;
            broker_shutdown.cancel();
            return Err(error.into());
        }
    };

    // `fieldmq backup` and `fieldmq reload` ask the running gateway through this socket
    // (see control.rs). It answers until the broker has stopped: a reload asked during
    // shutdown is told the gateway is stopping.
    let stores = Arc::new(control::Stores::new(
        broker.store_backup(),
        uplinks.outboxes(),
    ));
    let socket = control::socket_path(&config.gateway.data_dir);
    let control_stop = CancellationToken::new();
    match control::bind(&config.gateway.data_dir) {
        Ok(listener) => {
            tokio::spawn(control::serve(
                listener,
                socket,
                stores.clone(),
                reloader.clone(),
                board.clone(),
                control_stop.clone(),
            ));
        }
        Err(error) => tracing::warn!(
            path = %socket.display(), %error,
            "no control socket: `fieldmq backup` works only while the gateway is stopped, `fieldmq reload` not at all"
        ),
    }

    let finished = crate::essential::spawn(
        "gateway-supervisor",
        supervise(
            Running {
                config,
                broker,
                handle: handle.clone(),
                devices,
                uplinks,
                modbus_servers,
                stores,
            },
            reload_requests,
            Stops {
                shutdown: shutdown.clone(),
                uplinks: uplink_shutdown,
                broker: broker_shutdown,
                control: control_stop,
            },
        ),
    );

    Ok(Gateway {
        local_addrs,
        listeners,
        http_addr,
        broker: handle,
        reloader,
        status: board,
        metrics,
        shutdown,
        finished,
    })
}

/// Publish the Home Assistant discovery messages of `devices` and clear those of points
/// that are gone; what it did is logged and returned for the reload report.
pub(crate) async fn announce(
    broker: BrokerHandle,
    config: Option<crate::homeassistant::HomeAssistantConfig>,
    previous_prefix: Option<String>,
    gateway_id: String,
    status_topic: String,
    devices: Vec<crate::drivers::config::DeviceConfig>,
) -> Option<String> {
    let gateway = crate::homeassistant::Gateway {
        id: &gateway_id,
        status_topic: &status_topic,
    };
    match crate::homeassistant::sync(
        &broker,
        config.as_ref(),
        previous_prefix.as_deref(),
        gateway,
        &devices,
    )
    .await
    {
        Ok(summary) => {
            tracing::info!(
                published = summary.published,
                removed = summary.removed,
                devices_left_out = summary.skipped_devices,
                "Home Assistant discovery"
            );
            (summary.published + summary.removed > 0).then(|| {
                format!(
                    "homeassistant: {} discovery message(s) published, {} removed",
                    summary.published, summary.removed
                )
            })
        }
        Err(error) => {
            tracing::warn!(%error, "Home Assistant discovery failed");
            None
        }
    }
}

/// Follows the point sets devices announce (a SunSpec device after discovery), for
/// [`point_sets_changed_apply`]: a task drains the point-set topics of `config`'s devices into a watch, so
/// that the router never waits on the supervisor while it syncs. `None` when nothing
/// follows them. With `retained`, the sets already announced trigger a sync too.
async fn watch_point_sets(
    broker: &BrokerHandle,
    config: &Config,
    retained: bool,
) -> Option<(
    tokio::sync::watch::Receiver<()>,
    tokio::task::JoinHandle<()>,
)> {
    if !follows_point_sets(config) {
        return None;
    }
    let filters: Vec<(String, QoS)> = config
        .devices
        .iter()
        .map(|d| {
            (
                d.points_topic(&config.gateway.status_topic),
                QoS::AtLeastOnce,
            )
        })
        .collect();
    if filters.is_empty() {
        return None;
    }
    let options = broker::InternalSubscribeOptions {
        capacity: 64,
        send_retained: retained,
        commit: false,
    };
    let mut subscription = match broker.subscribe("homeassistant", filters, options).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::warn!(%error, "Home Assistant discovery and Sparkplug will not follow the points devices find at run time");
            return None;
        }
    };
    let (changed, watch) = tokio::sync::watch::channel(());
    let task = tokio::spawn(async move {
        while let Some(message) = subscription.recv().await {
            if !message.payload.is_empty() {
                changed.send_replace(());
            }
        }
    });
    Some((watch, task))
}

/// Waits for a point-set announcement, then for the announcements that follow within
/// [`POINT_SETS_QUIET`] (devices on one line discover one after the other), at most
/// [`POINT_SETS_MAX_WAIT`] in all. Pending forever without a watch.
async fn point_sets_changed(
    watch: &mut Option<(
        tokio::sync::watch::Receiver<()>,
        tokio::task::JoinHandle<()>,
    )>,
) {
    let Some((watch, _)) = watch.as_mut() else {
        return std::future::pending().await;
    };
    if watch.changed().await.is_err() {
        return std::future::pending().await;
    }
    let deadline = tokio::time::Instant::now() + POINT_SETS_MAX_WAIT;
    while let Ok(Ok(())) = tokio::time::timeout_at(
        (tokio::time::Instant::now() + POINT_SETS_QUIET).min(deadline),
        watch.changed(),
    )
    .await
    {}
}

const POINT_SETS_QUIET: Duration = Duration::from_millis(500);
const POINT_SETS_MAX_WAIT: Duration = Duration::from_secs(5);

/// `config`'s uplinks, the Sparkplug ones with the points their devices announced.
pub(crate) async fn sparkplug_uplinks(
    broker: &BrokerHandle,
    config: &Config,
) -> Vec<crate::uplink::config::UplinkConfig> {
    let mut uplinks = config.uplinks.clone();
    if uplinks.iter().all(|u| u.sparkplug.is_none()) {
        return uplinks;
    }
    let status_topic = &config.gateway.status_topic;
    match crate::homeassistant::point_sets(broker, status_topic, &config.devices).await {
        Ok(discovered) => {
            sparkplug::add_point_sets(&mut uplinks, &config.devices, &config.gateway, &discovered)
        }
        Err(error) => tracing::warn!(%error, "cannot read the devices' point sets"),
    }
    uplinks
}

/// What follows the point sets devices announce: Home Assistant discovery and the
/// Sparkplug uplinks.
fn follows_point_sets(config: &Config) -> bool {
    config.homeassistant.is_some() || config.uplinks.iter().any(|u| u.sparkplug.is_some())
}

/// A device announced a new point set: Home Assistant discovery is synced, and a Sparkplug
/// uplink whose devices' points changed restarts (its new session births them).
async fn point_sets_changed_apply(running: &mut Running, shutdown: &CancellationToken) {
    if running.config.homeassistant.is_some() {
        announce_running(running, shutdown).await;
    }
    if running.config.uplinks.iter().any(|u| u.sparkplug.is_some()) {
        let uplinks = sparkplug_uplinks(&running.handle, &running.config).await;
        let changes = running.uplinks.apply(&uplinks).await;
        if !changes.is_empty() {
            tracing::info!(changes = %changes.join("; "), "devices announced new points");
            running.stores.replace_outboxes(running.uplinks.outboxes());
        }
    }
}

/// [`announce`] for the configuration that runs, given up at shutdown.
async fn announce_running(running: &Running, shutdown: &CancellationToken) {
    let config = &running.config;
    let announce = announce(
        running.handle.clone(),
        config.homeassistant.clone(),
        None,
        config.gateway.id.clone(),
        config.gateway.status_topic.clone(),
        config.devices.clone(),
    );
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = announce => {}
    }
}

async fn publish_status(handle: &BrokerHandle, topic: &str, status: &str) {
    let message = Message::internal("gateway", topic, status.to_owned(), QoS::AtLeastOnce, true);
    if let Err(error) = handle.publish_and_wait(message).await {
        tracing::warn!(%error, topic, "cannot publish gateway status");
    }
}

/// What runs, and the configuration it runs: [`supervise`] applies reloads to it and stops
/// it in order.
struct Running {
    config: Config,
    broker: broker::RunningBroker,
    handle: BrokerHandle,
    devices: running::Devices,
    uplinks: running::Uplinks,
    modbus_servers: running::ModbusServers,
    stores: Arc<control::Stores>,
}

/// The stop switches: sources first, then uplinks, then the broker, then the control
/// socket.
struct Stops {
    shutdown: CancellationToken,
    uplinks: CancellationToken,
    broker: CancellationToken,
    control: CancellationToken,
}

/// Apply reload requests one at a time until shutdown, then stop everything in order.
async fn supervise(
    mut running: Running,
    mut reload_requests: mpsc::Receiver<ReloadRequest>,
    stops: Stops,
) {
    // Every Home Assistant sync runs here, one at a time: two at once could clear each
    // other's new config messages.
    // Subscribed first: a set announced after the sync read the retained ones is not missed.
    let mut point_sets = watch_point_sets(&running.handle, &running.config, false).await;
    if running.config.homeassistant.is_some() {
        announce_running(&running, &stops.shutdown).await;
    }
    loop {
        tokio::select! {
            biased;
            _ = stops.shutdown.cancelled() => break,
            request = reload_requests.recv() => match request {
                Some(request) => {
                    let report = reload::reload(&mut running).await;
                    request.answer(report);
                    if let Some((_, task)) = point_sets.take() {
                        task.abort();
                    }
                    // With the retained sets: a device started by the reload may have
                    // announced its points after the reload's sync read them.
                    point_sets = watch_point_sets(&running.handle, &running.config, true).await;
                }
                // Every trigger is gone: only shutdown is left to wait for.
                None => {
                    stops.shutdown.cancelled().await;
                    break;
                }
            },
            () = point_sets_changed(&mut point_sets) => {
                point_sets_changed_apply(&mut running, &stops.shutdown).await;
            }
        }
    }
    if let Some((_, task)) = point_sets.take() {
        task.abort();
    }
    // Requests waiting now, and any made later, are answered "the gateway is stopping".
    drop(reload_requests);
    tracing::info!("stopping");
    let deadline = running.config.gateway.shutdown_timeout;
    let stopped = tokio::time::timeout(deadline, async {
        running.modbus_servers.wait().await;
        running.devices.wait().await;
        stops.uplinks.cancel();
        running.uplinks.wait().await;
        publish_status(
            &running.handle,
            &running.config.gateway.status_topic,
            "offline",
        )
        .await;
        stops.broker.cancel();
    })
    .await;
    match stopped {
        Ok(()) => {
            running.broker.wait().await;
            tracing::info!("stopped");
        }
        Err(_) => {
            tracing::warn!(
                devices_left = running.devices.task_count(),
                uplinks_left = ?running.uplinks.names(),
                "shutdown deadline of {deadline:?} reached; exiting anyway"
            );
            stops.uplinks.cancel();
            stops.broker.cancel();
        }
    }
    stops.control.cancel();
}

/// How often the watchdog health probe asks the router for its counters.
const HEALTH_PROBE: Duration = Duration::from_secs(5);

/// Run until SIGINT or SIGTERM, then stop gracefully; SIGHUP applies the configuration
/// file again (see [`crate::reload`]) and never stops the gateway. Tells systemd when ready, shows
/// the last reload in its status line, and pings its watchdog while the router answers.
pub async fn run_until_signal(config: Config) -> Result<(), ServiceError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServiceError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServiceError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(ServiceError::Signal)?;

    let shutdown = CancellationToken::new();
    let summary = ready_message(&config);
    let gateway = start(config, shutdown.clone()).await?;
    log_listeners(&gateway.listeners);
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

    // SIGHUPs are applied by a task of their own so that SIGTERM is never kept waiting
    // behind a reload; signals that arrive while one is applied fold into the next.
    let (hangups, hangup_requests) = mpsc::channel::<()>(1);
    let reloads = tokio::spawn(reload_on_hangup(
        hangup_requests,
        gateway.reloader.clone(),
        notifier.clone(),
    ));
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break; }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                // Full: a reload is already waiting and will read the file as it is now.
                let _ = hangups.try_send(());
            }
        }
    }
    notifier.stopping();
    drop(hangups);
    gateway.stop().await;
    reloads.abort();
    watchdog.abort();
    probe.abort();
    Ok(())
}

/// Ask for a reload for each SIGHUP; the report is logged by the reload itself.
async fn reload_on_hangup(
    mut hangups: mpsc::Receiver<()>,
    reloader: Reloader,
    notifier: notify::Notifier,
) {
    while hangups.recv().await.is_some() {
        match reloader.reload().await {
            Ok(report) if report.applied => notifier.status(&format!(
                "configuration reloaded: {} change(s)",
                report.changes.len()
            )),
            Ok(_) => notifier.status("configuration reload refused, nothing changed: see the log"),
            Err(error) => tracing::warn!(%error, "SIGHUP: no reload"),
        }
    }
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
