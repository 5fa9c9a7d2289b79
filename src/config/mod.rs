//! Configuration: one TOML file, parsed in two steps (raw serde structs with spans, then
//! validation into the types below, which the rest of the gateway uses). All errors are
//! collected and reported together, each with file, line, column and key path.

mod device_check;
mod error;
mod raw;
mod validate;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::{QoS, Value};

pub use error::{ConfigError, Diagnostic};
// For drivers that validate their own keys (drivers::modbus::config).
pub(crate) use device_check::{DeviceCheck, PortRules, RawPort};
pub(crate) use error::{closest, Diagnostics};

/// The validated configuration of a whole gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (or `<embedded demo>`).
    pub source: PathBuf,
    pub gateway: GatewayConfig,
    pub broker: BrokerConfig,
    pub devices: Vec<DeviceConfig>,
    pub uplinks: Vec<UplinkConfig>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Default cloud client id and the `{gateway}` topic variable.
    pub id: String,
    /// Where SQLite files live.
    pub data_dir: PathBuf,
    /// `tracing` filter, e.g. "info" or "fieldmq=debug"; `RUST_LOG` overrides it.
    pub log_level: String,
    /// Retained gateway status topic, `{gateway}` already substituted.
    /// Default `fieldmq/{gateway}/status`.
    pub status_topic: String,
    /// How long a graceful stop may take before the gateway exits anyway. Default 10s.
    pub shutdown_timeout: Duration,
    /// Threads of the async runtime (connections, devices, uplinks); `None`: one less
    /// than the machine has cores (see [`GatewayConfig::runtime_threads`]).
    pub worker_threads: Option<usize>,
}

impl GatewayConfig {
    /// How many runtime threads to start: as configured, or one less than the cores (at
    /// least one). The broker's store runs on a thread of its own that is busy whenever
    /// persistent sessions take messages; leaving it a core spares the cross-core wake-ups
    /// of a runtime that spreads one connection's work over every core (measured on two
    /// cores: 12-20% less CPU per durably queued message, docs/benchmarks.md).
    pub fn runtime_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |cores| cores.get().saturating_sub(1).max(1))
        })
    }
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listeners: Vec<ListenerConfig>,
    pub allow_anonymous: bool,
    /// Mosquitto-format password file.
    pub password_file: Option<PathBuf>,
    /// Largest packet accepted from a client, bytes. Default 1 MiB.
    pub max_packet_size: u32,
    /// Per-client queue of messages waiting for delivery (QoS 1/2 while offline or slow).
    /// Default 1000; past it the oldest is dropped and counted.
    pub max_queued_messages: usize,
    /// QoS 1/2 messages in flight to one client (our Receive Maximum). Default 20.
    pub max_inflight: u16,
    /// Per-client queue bound in bytes (payload + topic). Default 64 MiB.
    pub max_queued_bytes: u64,
    /// Memory that queued messages of persistent sessions may share beyond the first 1,000
    /// of each session (the rest are on disk only). Default 32 MiB.
    pub queue_memory: u64,
    /// What survives a crash or power cut. Default `Sync`.
    pub durability: Durability,
    /// With `Batched`: the longest a publish waits for its commit. Default 10ms.
    pub commit_window: Duration,
    /// A connected client that takes nothing from its full queue for this long (or does not
    /// read what is written to it) is disconnected; its session keeps its queue. Until then
    /// the publishers whose messages wait for it are slowed down. Default 10s.
    pub slow_client_timeout: Duration,
    /// The broker's SQLite file (sessions, queues, retained). Default `<data_dir>/broker.db`.
    pub store_path: PathBuf,
    /// Mosquitto-format ACL file.
    pub acl_file: Option<PathBuf>,
    /// `$SYS/broker/...` publish interval; `None` disables. Default 10s.
    pub sys_interval: Option<Duration>,
    /// Longest keep alive (seconds) an MQTT 5 client may use; a longer one is answered
    /// with this as Server Keep Alive. Default 65535 (no limit), like Mosquitto.
    pub max_keep_alive: u16,
    /// The MQTT 5 SUBACK reason for a subscription the ACL denies. Default `NotAuthorized`.
    pub subscribe_denied_reason: DeniedReason,
}

/// The MQTT 5 reason code a denied SUBSCRIBE gets (3.1.1 has only 0x80).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeniedReason {
    /// 0x87 Not authorized: says why.
    NotAuthorized,
    /// 0x80 Unspecified error: for MQTT 5 clients that treat only 0x80 as a refusal.
    Unspecified,
}

impl Default for BrokerConfig {
    /// No listeners, anonymous clients refused, nothing on disk (`Durability::Memory`):
    /// a base for in-process brokers and tests; files use the validated defaults.
    fn default() -> Self {
        BrokerConfig {
            listeners: Vec::new(),
            allow_anonymous: false,
            password_file: None,
            max_packet_size: 1024 * 1024,
            max_queued_messages: 1000,
            max_inflight: 20,
            max_queued_bytes: 64 * 1024 * 1024,
            queue_memory: 32 * 1024 * 1024,
            durability: Durability::Memory,
            commit_window: Duration::from_millis(10),
            slow_client_timeout: Duration::from_secs(10),
            store_path: PathBuf::from("broker.db"),
            acl_file: None,
            sys_interval: None,
            max_keep_alive: u16::MAX,
            subscribe_denied_reason: DeniedReason::NotAuthorized,
        }
    }
}

impl ListenerConfig {
    /// What clients connect to: `mqtt://`, `mqtts://`, `ws://` or `wss://` with the bound
    /// address (and the WebSocket path).
    pub fn url(&self) -> String {
        let scheme = match (self.tls.is_some(), self.websocket) {
            (false, false) => "mqtt",
            (true, false) => "mqtts",
            (false, true) => "ws",
            (true, true) => "wss",
        };
        let path = if self.websocket {
            self.websocket_path.as_str()
        } else {
            ""
        };
        format!("{scheme}://{}{path}", self.bind)
    }

    /// A plain TCP listener with default limits.
    pub fn tcp(bind: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            bind,
            websocket: false,
            websocket_path: "/mqtt".to_owned(),
            tls: None,
            max_connections: validate::DEFAULT_MAX_CONNECTIONS,
            max_handshakes: validate::DEFAULT_MAX_HANDSHAKES,
            max_connections_per_address: validate::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            connect_timeout: validate::DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// One serial port's settings, shared by Modbus RTU and serial line devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SerialPortConfig {
    pub path: String,
    /// Default 9600.
    pub baud: u32,
    pub parity: Parity,
    /// Default 8.
    pub data_bits: u8,
    /// 1 or 2, default 1.
    pub stop_bits: u8,
    /// Default none.
    pub flow_control: FlowControl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowControl {
    None,
    Software,
    Hardware,
}

impl SerialPortConfig {
    /// A tokio-serial builder with these settings.
    pub fn builder(&self) -> tokio_serial::SerialPortBuilder {
        tokio_serial::new(self.path.as_str(), self.baud)
            .parity(match self.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            })
            .data_bits(match self.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .stop_bits(if self.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .flow_control(match self.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            })
    }
}

/// What the broker keeps on disk, and when a publisher is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge a QoS 1/2 publish that is queued for a persistent session, or retained,
    /// only after the transaction holding it has committed. Nothing acknowledged is lost.
    Sync,
    /// Acknowledge at once, commit within `commit_window`. A power cut loses at most that
    /// window.
    Batched,
    /// No disk: sessions and retained messages live only in memory.
    Memory,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub bind: SocketAddr,
    /// MQTT over WebSocket (subprotocol `mqtt`) at `websocket_path`.
    pub websocket: bool,
    /// Default `/mqtt`.
    pub websocket_path: String,
    /// TLS (or, with `websocket`, secure WebSocket).
    pub tls: Option<ListenerTls>,
    /// Default 1000. Counts connections whose CONNECT has been read.
    pub max_connections: usize,
    /// Sockets still in the handshake (no valid CONNECT read yet) at once; past it a new
    /// socket is closed at once. Default 256.
    pub max_handshakes: usize,
    /// Sockets from one IP address, in the handshake or connected; 0: no limit. Default 64.
    pub max_connections_per_address: usize,
    /// The longest the TLS and WebSocket handshakes and the CONNECT packet together may
    /// take. Default 5 s.
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA for client certificates; with it, clients may present one.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca`).
    pub require_client_cert: bool,
    /// Use the client certificate's CN as the username.
    pub identity_as_username: bool,
}

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub name: String,
    /// Topic template with `{gateway}`, `{device}`, `{point}`; default
    /// `{gateway}/{device}/{point}`. The gateway id is NOT substituted yet (drivers do it).
    pub topic: String,
    pub payload: PayloadFormat,
    /// Poll / sample interval. Default 1s.
    pub poll: Duration,
    pub driver: DriverConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `{"value":..,"ts":"RFC 3339","quality":"good"}`
    Json,
    /// The bare value as text.
    Plain,
}

#[derive(Debug, Clone)]
pub enum DriverConfig {
    Simulated(SimulatedConfig),
    Modbus(crate::drivers::modbus::ModbusConfig),
    Serial(crate::drivers::serial::SerialConfig),
}

#[derive(Debug, Clone)]
pub struct SimulatedConfig {
    pub points: Vec<SimulatedPoint>,
}

#[derive(Debug, Clone)]
pub struct SimulatedPoint {
    pub name: String,
    pub waveform: Waveform,
    pub writable: bool,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Waveform {
    Sine {
        min: f64,
        max: f64,
        period: Duration,
    },
    Ramp {
        min: f64,
        max: f64,
        period: Duration,
    },
    RandomWalk {
        min: f64,
        max: f64,
        step: f64,
    },
    Constant {
        value: Value,
    },
}

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub name: String,
    pub url: UplinkUrl,
    pub protocol: MqttVersion,
    /// Default: the gateway id.
    pub client_id: String,
    /// Default 30s.
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<SecretSource>,
    pub tls: Option<TlsConfig>,
    /// Default false: the cloud keeps subscriptions and queued commands.
    pub clean_start: bool,
    /// MQTT 5 session expiry. Default 1h.
    pub session_expiry: Duration,
    pub will: Option<WillConfig>,
    /// Published on every connect. Default: `online` retained on the will topic when a will
    /// is set.
    pub birth: Option<WillConfig>,
    pub queue: QueueConfig,
    /// QoS 1 messages in flight to the cloud. Default 100.
    pub inflight: u16,
    /// Optional cap on messages per second sent to the cloud.
    pub max_rate: Option<u32>,
    pub routes_out: Vec<OutRoute>,
    pub routes_in: Vec<InRoute>,
    /// Reconnect backoff bounds. Default 1s..60s.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkUrl {
    pub scheme: UrlScheme,
    pub host: String,
    pub port: u16,
    /// Path for ws/wss, default `/mqtt`.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlScheme {
    Mqtt,
    Mqtts,
    Ws,
    Wss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    V311,
    V5,
}

/// Where a secret comes from, so it stays out of the TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// CA bundle; `None` means the system roots.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WillConfig {
    /// `{gateway}` already substituted.
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 will delay.
    pub delay: Duration,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Default 1,000,000.
    pub max_messages: u64,
    /// Default 256 MiB.
    pub max_bytes: u64,
    /// Default 7 days.
    pub max_age: Duration,
    pub when_full: WhenFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    DropOldest,
    DropNew,
}

#[derive(Debug, Clone)]
pub struct OutRoute {
    /// Local topic filter.
    pub filter: String,
    /// Replaces the filter's literal prefix (the levels before the first wildcard).
    /// `{gateway}` already substituted.
    pub remote_prefix: Option<String>,
    /// Alternative to a prefix: a template with `{gateway}` substituted and `{topic}` left
    /// for the full local topic.
    pub remote_template: Option<String>,
    /// Default 1.
    pub qos: QoS,
    /// Whether the retain flag is kept on the remote publish. Default false.
    pub retain: bool,
    /// Default true. Only QoS 0 routes may set false (best effort, not queued on disk).
    pub durable: bool,
}

#[derive(Debug, Clone)]
pub struct InRoute {
    /// Remote topic filter, `{gateway}` already substituted.
    pub filter: String,
    /// Replaces the filter's literal prefix on the local side.
    pub local_prefix: Option<String>,
    /// Default 1.
    pub qos: QoS,
}

/// The demo configuration embedded in the binary: one simulated device, no uplinks.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| ConfigError::whole_file(path, format!("cannot read: {error}")))?;
    parse(&text, path)
}

/// Parses and validates configuration text. `source` names the file in diagnostics, and
/// relative paths in the file are resolved against its directory.
pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
    validate::parse(text, source)
}

/// The embedded demo configuration ([`DEMO_CONFIG`]).
pub fn demo() -> Config {
    parse(DEMO_CONFIG, Path::new("<embedded demo>"))
        .expect("the embedded demo config is valid (tests/it/config.rs checks it)")
}

impl Config {
    /// Problems that do not stop the gateway but should be fixed: a password file or an ACL
    /// file that every user of the machine may read (the hashes can be attacked offline;
    /// the ACL tells who may do what). Owner and group are left alone: the documented set-up
    /// is `chgrp fieldmq FILE; chmod 640 FILE`. `fieldmq check` prints them and
    /// `fieldmq run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut warnings = Vec::new();
        let mut check = |path: &Path, what: &str| {
            let Ok(metadata) = std::fs::metadata(path) else {
                return;
            };
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                warnings.push(format!(
                    "{what} {} is readable by every user (mode {mode:o}); \
                     `chgrp fieldmq {}; chmod 640 {}`",
                    path.display(),
                    path.display(),
                    path.display()
                ));
            }
        };
        if let Some(file) = &self.broker.password_file {
            check(file, "password file");
        }
        if let Some(file) = &self.broker.acl_file {
            check(file, "ACL file");
        }
        warnings
    }

    /// A short multi-line description for `fieldmq check`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let g = &self.gateway;
        let _ = writeln!(
            out,
            "gateway {:?}, data in {}, {} runtime thread(s){}",
            g.id,
            g.data_dir.display(),
            g.runtime_threads(),
            if g.worker_threads.is_some() {
                ""
            } else {
                " (cores - 1)"
            }
        );
        let b = &self.broker;
        let auth = match (&b.password_file, b.allow_anonymous) {
            (Some(file), true) => format!("password file {} and anonymous", file.display()),
            (Some(file), false) => format!("password file {}", file.display()),
            (None, _) => "anonymous".to_owned(),
        };
        let _ = writeln!(
            out,
            "broker: {} listener(s), auth: {auth}",
            b.listeners.len()
        );
        for listener in &b.listeners {
            let _ = writeln!(
                out,
                "  {} (max {} connections, {} per address, {} in handshake)",
                listener.url(),
                listener.max_connections,
                match listener.max_connections_per_address {
                    0 => "no limit".to_owned(),
                    n => n.to_string(),
                },
                listener.max_handshakes
            );
        }
        for warning in self.warnings() {
            let _ = writeln!(out, "warning: {warning}");
        }
        let _ = writeln!(out, "devices: {}", self.devices.len());
        for device in &self.devices {
            let (driver, points) = match &device.driver {
                DriverConfig::Simulated(sim) => ("simulated", sim.points.len()),
                DriverConfig::Modbus(modbus) => (
                    match modbus.transport {
                        crate::drivers::modbus::Transport::Tcp { .. } => "modbus-tcp",
                        crate::drivers::modbus::Transport::Rtu(_) => "modbus-rtu",
                    },
                    modbus.points.len(),
                ),
                DriverConfig::Serial(serial) => ("serial", serial.rules.len()),
            };
            let _ = writeln!(
                out,
                "  {}: {driver}, {points} point(s), poll {}",
                device.name,
                humantime::format_duration(device.poll)
            );
        }
        let _ = writeln!(out, "uplinks: {}", self.uplinks.len());
        for uplink in &self.uplinks {
            let _ = writeln!(
                out,
                "  {}: {}, {} out route(s), {} in route(s)",
                uplink.name,
                uplink.url,
                uplink.routes_out.len(),
                uplink.routes_in.len()
            );
        }
        out
    }
}

impl std::fmt::Display for UplinkUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            UrlScheme::Mqtt => "mqtt",
            UrlScheme::Mqtts => "mqtts",
            UrlScheme::Ws => "ws",
            UrlScheme::Wss => "wss",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}
