//! What runs by name: the devices (a task per device, or per serial line for the Modbus
//! RTU devices that share it) and the uplinks, each with a child cancellation token of its
//! own, so that a reload can stop, restart or start one without touching the others.
//! Cancelling the parent tokens (the gateway's shutdown) stops them all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerHandle;
use crate::config::GatewayConfig;
use crate::drivers::config::{DeviceConfig, DriverConfig};
use crate::drivers::modbus::Transport;
use crate::drivers::{self, DeviceContext};
use crate::metrics::Metrics;
use crate::modbus_server::config::ModbusServerConfig;
use crate::modbus_server::{self, LastPayloads, ModbusServer, ModbusServerError};
use crate::status::StatusBoard;
use crate::store::Outbox;
use crate::uplink::config::UplinkConfig;
use crate::uplink::{RunningUplink, UplinkError};

/// How long a device task may take to stop when a reload stops it before it is aborted.
const DEVICE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What runs as one task: a device alone, or a serial line with its RTU devices.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TaskKey {
    Device(String),
    SerialLine(String),
    /// An address, and whether it carries RTU frames.
    TcpEndpoint(String, bool),
}

impl TaskKey {
    /// The Modbus link a task owns, as (name, transport): its serial port or TCP address.
    fn link(&self) -> Option<(&str, &'static str)> {
        match self {
            TaskKey::Device(_) => None,
            TaskKey::SerialLine(port) => Some((port, "rtu")),
            TaskKey::TcpEndpoint(address, false) => Some((address, "tcp")),
            TaskKey::TcpEndpoint(address, true) => Some((address, "rtu-over-tcp")),
        }
    }

    fn of(device: &DeviceConfig) -> TaskKey {
        match &device.driver {
            DriverConfig::Modbus(modbus) => match &modbus.transport {
                Transport::Rtu(serial) => TaskKey::SerialLine(serial.path.clone()),
                // Devices behind one address (a Modbus TCP gateway, a serial device
                // server) share its connection.
                Transport::Tcp { address } => TaskKey::TcpEndpoint(address.clone(), false),
                Transport::RtuOverTcp { address } => TaskKey::TcpEndpoint(address.clone(), true),
            },
            _ => TaskKey::Device(device.name.clone()),
        }
    }
}

/// Devices grouped into tasks, in the order they first appear.
fn group(devices: &[DeviceConfig]) -> Vec<(TaskKey, Vec<DeviceConfig>)> {
    let mut groups: Vec<(TaskKey, Vec<DeviceConfig>)> = Vec::new();
    for device in devices {
        let key = TaskKey::of(device);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(device.clone()),
            None => groups.push((key, vec![device.clone()])),
        }
    }
    groups
}

struct DeviceTask {
    key: TaskKey,
    devices: Vec<DeviceConfig>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl DeviceTask {
    async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(DEVICE_STOP_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(devices = ?names(&self.devices), "device task did not stop in time; aborted");
            task.abort();
        }
    }
}

fn names(devices: &[DeviceConfig]) -> Vec<&str> {
    devices.iter().map(|d| d.name.as_str()).collect()
}

/// The running devices.
pub(crate) struct Devices {
    tasks: Vec<DeviceTask>,
    gateway_id: String,
    status_topic: String,
    broker: BrokerHandle,
    metrics: Arc<Metrics>,
    board: StatusBoard,
    shutdown: CancellationToken,
}

impl Devices {
    /// Start every device in `devices`; each task stops when `shutdown` is cancelled.
    pub(crate) fn start(
        devices: &[DeviceConfig],
        gateway_id: &str,
        status_topic: &str,
        broker: BrokerHandle,
        metrics: Arc<Metrics>,
        board: StatusBoard,
        shutdown: CancellationToken,
    ) -> Devices {
        let mut running = Devices {
            tasks: Vec::new(),
            gateway_id: gateway_id.to_owned(),
            status_topic: status_topic.to_owned(),
            broker,
            metrics,
            board,
            shutdown,
        };
        for (key, members) in group(devices) {
            running.spawn(key, members);
        }
        running
    }

    fn spawn(&mut self, key: TaskKey, devices: Vec<DeviceConfig>) {
        let stop = self.shutdown.child_token();
        // One handle for the link, shared by every device on it.
        let bus = key.link().map(|(name, transport)| {
            let metrics = self.metrics.bus(name, transport);
            let units = devices
                .iter()
                .filter_map(|device| match &device.driver {
                    DriverConfig::Modbus(modbus) => Some((device.name.clone(), modbus.unit)),
                    _ => None,
                })
                .collect();
            self.board
                .register_bus(name, transport, units, metrics.clone());
            metrics
        });
        let contexts: Vec<(DeviceConfig, DeviceContext)> = devices
            .iter()
            .cloned()
            .map(|device| {
                let metrics = self.metrics.device(&device.name);
                let board = self.board.register_device(
                    &device.name,
                    device.driver_name(),
                    &device.points_and_units(),
                );
                if matches!(device.driver, DriverConfig::Modbus(_)) {
                    board.show_diagnostics(metrics.clone());
                }
                let context = DeviceContext::new(
                    &self.gateway_id,
                    &self.status_topic,
                    &device,
                    self.broker.clone(),
                )
                .with_metrics(metrics, bus.clone())
                .with_status(board);
                (device, context)
            })
            .collect();
        let task = match contexts.first() {
            Some((device, _)) if !device.driver.shares_bus() => {
                let mut contexts = contexts;
                let (device, context) = contexts.remove(0);
                tokio::spawn(drivers::run_device(device, context, stop.clone()))
            }
            _ => {
                // One future for a TCP device or a serial line (device_tasks groups them
                // the same way).
                let tasks = drivers::modbus::device_tasks(contexts, stop.clone());
                tokio::spawn(futures::future::join_all(tasks).map(|_| ()))
            }
        };
        self.tasks.push(DeviceTask {
            key,
            devices,
            stop,
            task,
        });
    }

    /// How many device tasks run.
    pub(crate) fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Make the running devices those of `wanted`: a task whose devices are unchanged
    /// keeps running; a task with a changed, added or removed device restarts (on a serial
    /// line, so do its other devices); a task left without devices stops. Returns one line
    /// per device that changed.
    pub(crate) async fn apply(&mut self, wanted: &[DeviceConfig]) -> Vec<String> {
        let before: HashMap<String, DeviceConfig> = self
            .tasks
            .iter()
            .flat_map(|t| t.devices.iter().map(|d| (d.name.clone(), d.clone())))
            .collect();
        let mut old = std::mem::take(&mut self.tasks);
        let mut keep = Vec::new();
        let mut start = Vec::new();
        for (key, members) in group(wanted) {
            match old.iter().position(|t| t.key == key) {
                Some(index) if old[index].devices == members => keep.push(old.remove(index)),
                _ => start.push((key, members)),
            }
        }
        // Every task that does not stay stops before any starts: a serial port or a
        // device's connection is free again for its successor.
        for task in old {
            if let Some((name, transport)) = task.key.link() {
                self.board.remove_bus(name, transport);
                if !start.iter().any(|(key, _)| *key == task.key) {
                    self.metrics.remove_bus(name, transport);
                }
            }
            task.stop().await;
        }
        self.tasks = keep;
        let mut changes = Vec::new();
        for (key, members) in start {
            for device in &members {
                let line = match before.get(&device.name) {
                    None => "added".to_owned(),
                    Some(old) if old == device => match &key {
                        TaskKey::SerialLine(port) => {
                            format!("restarted (its serial line {port} restarted)")
                        }
                        TaskKey::TcpEndpoint(address, _) => {
                            format!("restarted (its connection to {address} restarted)")
                        }
                        TaskKey::Device(_) => "restarted".to_owned(),
                    },
                    Some(_) => "restarted".to_owned(),
                };
                changes.push(format!("device {}: {line}", device.name));
            }
            self.spawn(key, members);
        }
        for name in before.keys() {
            if !wanted.iter().any(|d| d.name == *name) {
                self.board.remove_device(name);
                self.metrics.remove_device(name);
                changes.push(format!("device {name}: removed"));
            }
        }
        changes.sort();
        changes
    }

    /// Wait for every device task to end (after the parent token was cancelled).
    pub(crate) async fn wait(&mut self) {
        while !self.tasks.is_empty() {
            let _ = self.tasks.remove(0).task.await;
        }
    }
}

/// What an uplink's TLS files hold now (see [`crate::pem::fingerprint`]).
fn uplink_tls_files(config: &UplinkConfig) -> u64 {
    match &config.tls {
        Some(tls) => crate::pem::fingerprint(
            [tls.ca.as_ref(), tls.cert.as_ref(), tls.key.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| p.as_path()),
        ),
        None => 0,
    }
}

struct UplinkTask {
    config: UplinkConfig,
    tls_files: u64,
    stop: CancellationToken,
    uplink: RunningUplink,
}

impl UplinkTask {
    /// Stop the uplink (it flushes, says `offline` to its cloud and closes its outbox).
    async fn stop(self) {
        self.stop.cancel();
        let name = self.config.name;
        if let Err(error) = self.uplink.wait().await {
            tracing::warn!(uplink = %name, %error, "uplink stopped with an error");
        }
    }
}

/// The running uplinks.
pub(crate) struct Uplinks {
    tasks: Vec<UplinkTask>,
    gateway: GatewayConfig,
    broker: BrokerHandle,
    metrics: Arc<Metrics>,
    board: StatusBoard,
    shutdown: CancellationToken,
}

impl Uplinks {
    /// Start every uplink of `uplinks`; stops those started and fails at the first that
    /// cannot start.
    pub(crate) async fn start(
        uplinks: &[UplinkConfig],
        gateway: &GatewayConfig,
        broker: BrokerHandle,
        metrics: Arc<Metrics>,
        board: StatusBoard,
        shutdown: CancellationToken,
    ) -> Result<Uplinks, UplinkError> {
        let mut running = Uplinks {
            tasks: Vec::new(),
            gateway: gateway.clone(),
            broker,
            metrics,
            board,
            shutdown,
        };
        for config in uplinks {
            if let Err(error) = running.start_one(config.clone()).await {
                running.shutdown.cancel();
                running.wait().await;
                return Err(error);
            }
        }
        Ok(running)
    }

    async fn start_one(&mut self, config: UplinkConfig) -> Result<(), UplinkError> {
        let stop = self.shutdown.child_token();
        let tls_files = uplink_tls_files(&config);
        let board = self
            .board
            .register_uplink(&config.name, &config.url.to_string());
        let uplink = crate::uplink::start_with_status(
            config.clone(),
            &self.gateway,
            self.broker.clone(),
            self.metrics.uplink(&config.name),
            stop.clone(),
            Some(board),
        )
        .await?;
        self.tasks.push(UplinkTask {
            config,
            tls_files,
            stop,
            uplink,
        });
        Ok(())
    }

    /// The names of the running uplinks.
    pub(crate) fn names(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.config.name.clone()).collect()
    }

    /// Every running uplink's outbox (for backups).
    pub(crate) fn outboxes(&self) -> Vec<Outbox> {
        self.tasks
            .iter()
            .map(|t| t.uplink.outbox().clone())
            .collect()
    }

    /// Make the running uplinks those of `wanted`: an unchanged uplink keeps its cloud
    /// connection, session and outbox; a changed one, or one whose TLS files changed on
    /// disk, restarts (its outbox file is closed and reopened); a removed one stops (its
    /// outbox file stays on disk). Returns one line per uplink that changed.
    pub(crate) async fn apply(&mut self, wanted: &[UplinkConfig]) -> Vec<String> {
        let mut changes = Vec::new();
        let mut old = std::mem::take(&mut self.tasks);
        let mut start = Vec::new();
        for config in wanted {
            let line = match old.iter().position(|t| t.config.name == config.name) {
                Some(index) => {
                    let task = &old[index];
                    let tls_files = uplink_tls_files(config);
                    if task.config == *config && task.tls_files == tls_files {
                        self.tasks.push(old.remove(index));
                        continue;
                    }
                    let line = if task.config == *config {
                        "reconnected (its TLS files changed)"
                    } else {
                        "restarted"
                    };
                    old.remove(index).stop().await;
                    line
                }
                None => "added",
            };
            start.push((config.clone(), line));
        }
        for removed in old {
            self.board.remove_uplink(&removed.config.name);
            self.metrics.remove_uplink(&removed.config.name);
            changes.push(format!(
                "uplink {}: removed (its outbox file is kept)",
                removed.config.name
            ));
            removed.stop().await;
        }
        for (config, line) in start {
            let name = config.name.clone();
            match self.start_one(config).await {
                Ok(()) => changes.push(format!("uplink {name}: {line}")),
                Err(error) => {
                    tracing::error!(uplink = %name, %error, "uplink not started");
                    changes.push(format!("uplink {name}: not started: {error}"));
                }
            }
        }
        changes
    }

    /// Wait for every uplink to stop (after the parent token was cancelled), logging
    /// errors. Those not yet stopped stay listed in [`Uplinks::names`].
    pub(crate) async fn wait(&mut self) {
        while !self.tasks.is_empty() {
            let task = self.tasks.remove(0);
            let name = task.config.name.clone();
            if let Err(error) = task.uplink.wait().await {
                tracing::warn!(uplink = %name, %error, "uplink stopped with an error");
            }
        }
    }
}

/// The Modbus TCP servers, all under one child token: a reload that changes them (or the
/// devices their maps name) restarts them all.
pub(crate) struct ModbusServers {
    configs: Vec<ModbusServerConfig>,
    devices: Vec<DeviceConfig>,
    gateway: String,
    broker: BrokerHandle,
    metrics: Arc<Metrics>,
    board: StatusBoard,
    parent: CancellationToken,
    token: CancellationToken,
    servers: Vec<ModbusServer>,
}

impl ModbusServers {
    /// Starts every server; the first that cannot bind stops those started and is the error.
    pub(crate) async fn start(
        configs: &[ModbusServerConfig],
        devices: &[DeviceConfig],
        gateway: &str,
        broker: BrokerHandle,
        (metrics, board): (Arc<Metrics>, StatusBoard),
        parent: CancellationToken,
    ) -> Result<ModbusServers, ModbusServerError> {
        let mut servers = ModbusServers {
            configs: configs.to_vec(),
            devices: devices.to_vec(),
            gateway: gateway.to_owned(),
            broker,
            metrics,
            board,
            token: parent.child_token(),
            parent,
            servers: Vec::new(),
        };
        if let Err(error) = servers.start_all(&LastPayloads::new()).await {
            servers.token.cancel();
            servers.wait().await;
            return Err(error);
        }
        Ok(servers)
    }

    /// Starts every configured server, their images filled from `seed` (the last payloads
    /// of the servers they replace).
    async fn start_all(&mut self, seed: &LastPayloads) -> Result<(), ModbusServerError> {
        let mut shown = Vec::new();
        let mut result = Ok(());
        for (index, config) in self.configs.iter().enumerate() {
            let name = modbus_server::server_name(index);
            let metrics = self.metrics.modbus_server(&name);
            let with = modbus_server::StartWith {
                devices: &self.devices,
                gateway: &self.gateway,
                broker: self.broker.clone(),
                seed,
                metrics: metrics.clone(),
            };
            match modbus_server::start(config, index, with, self.token.clone()).await {
                Ok(server) => {
                    shown.push((name, server.local_addr, metrics));
                    self.servers.push(server);
                }
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        self.board.set_modbus_servers(shown);
        result
    }

    /// The bound addresses, in the configuration's order.
    pub(crate) fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.servers.iter().map(|s| s.local_addr).collect()
    }

    /// Restarts the servers when their tables or the devices changed.
    pub(crate) async fn apply(
        &mut self,
        wanted: &[ModbusServerConfig],
        devices: &[DeviceConfig],
    ) -> Vec<String> {
        if self.configs == wanted && (wanted.is_empty() || self.devices == devices) {
            return Vec::new();
        }
        self.token.cancel();
        // Readings are not retained: the new servers start from the old ones' last values
        // (merged, so that an entry moved to another server keeps its value).
        let mut last = LastPayloads::new();
        for payloads in self.wait_last().await {
            last.extend(payloads);
        }
        for index in wanted.len()..self.configs.len() {
            self.metrics
                .remove_modbus_server(&modbus_server::server_name(index));
        }
        self.configs = wanted.to_vec();
        self.devices = devices.to_vec();
        self.token = self.parent.child_token();
        match self.start_all(&last).await {
            Ok(()) => vec![format!(
                "modbus_servers: {} server(s) (re)started",
                self.servers.len()
            )],
            Err(error) => {
                tracing::error!(%error, "Modbus server not restarted");
                vec![format!("modbus_servers: {error}")]
            }
        }
    }

    /// Waits for every server to stop (after a token was cancelled).
    pub(crate) async fn wait(&mut self) {
        self.wait_last().await;
    }

    /// [`ModbusServers::wait`], keeping each server's last payloads.
    async fn wait_last(&mut self) -> Vec<LastPayloads> {
        let mut last = Vec::new();
        for server in self.servers.drain(..) {
            last.push(server.wait().await);
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::config::{BrokerConfig, Durability};
    use crate::status::GatewayInfo;

    fn rtu(name: &str, port: &str, unit: u8, poll: &str) -> String {
        format!(
            "[[devices]]\nname = \"{name}\"\ndriver = \"modbus-rtu\"\nport = \"{port}\"\n\
             baud = 9600\nunit = {unit}\npoll = \"{poll}\"\n\
             points = [{{ name = \"power\", table = \"input\", address = 12, type = \"f32:CDAB\" }}]\n"
        )
    }

    fn devices(devices: &str) -> Vec<DeviceConfig> {
        let text = format!(
            "[gateway]\nid = \"g\"\ndata_dir = \"/var/lib/g\"\n[broker]\nallow_anonymous = true\n{devices}"
        );
        crate::service::config::parse(&text, std::path::Path::new("/etc/fieldmq/g.toml"))
            .expect("valid")
            .devices
    }

    /// A change to one RTU device restarts its serial line (and so its neighbour on the
    /// line); a line without changes, and a device of its own, keep running.
    #[tokio::test]
    async fn a_changed_rtu_device_restarts_its_line_and_nothing_else() {
        let config = BrokerConfig {
            durability: Durability::Memory,
            listeners: Vec::new(),
            ..BrokerConfig::default()
        };
        let broker_stop = CancellationToken::new();
        let broker = crate::broker::start(&config, broker_stop.clone())
            .await
            .expect("broker");
        let shutdown = CancellationToken::new();
        // The ports do not exist: a missing port is retried with backoff, not fatal.
        let before = format!(
            "{}{}{}",
            rtu("a1", "/dev/fieldmq-test-a", 1, "1s"),
            rtu("a2", "/dev/fieldmq-test-a", 2, "1s"),
            rtu("b1", "/dev/fieldmq-test-b", 1, "1s"),
        );
        let mut running = Devices::start(
            &devices(&before),
            "g",
            "g/status",
            broker.handle.clone(),
            Arc::new(Metrics::new()),
            StatusBoard::new(GatewayInfo {
                id: "g".into(),
                version: "test".into(),
                config_file: "test.toml".into(),
                data_dir: "data".into(),
            }),
            shutdown.clone(),
        );
        assert_eq!(running.task_count(), 2, "one task per serial line");
        let untouched = running
            .tasks
            .iter()
            .find(|t| t.key == TaskKey::SerialLine("/dev/fieldmq-test-b".into()))
            .map(|t| t.task.id())
            .expect("line b");

        let after = before.replacen("unit = 2\npoll = \"1s\"", "unit = 2\npoll = \"5s\"", 1);
        assert_ne!(after, before);
        let changes = running.apply(&devices(&after)).await;
        assert_eq!(
            changes,
            vec![
                "device a1: restarted (its serial line /dev/fieldmq-test-a restarted)".to_owned(),
                "device a2: restarted".to_owned(),
            ]
        );
        let line_b = running
            .tasks
            .iter()
            .find(|t| t.key == TaskKey::SerialLine("/dev/fieldmq-test-b".into()))
            .map(|t| t.task.id());
        assert_eq!(line_b, Some(untouched), "line b's task kept running");

        let changes = running
            .apply(&devices(&rtu("b1", "/dev/fieldmq-test-b", 1, "1s")))
            .await;
        assert_eq!(
            changes,
            vec![
                "device a1: removed".to_owned(),
                "device a2: removed".to_owned()
            ]
        );
        assert_eq!(running.task_count(), 1);

        shutdown.cancel();
        running.wait().await;
        broker_stop.cancel();
        broker.wait().await;
    }
}
