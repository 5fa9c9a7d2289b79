//! The `[broker]` table: listeners, limits, authentication files, durability. Its types,
//! their defaults (each written once, below) and the section's validation.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{Checker, Pem, RawSize, S};
// The store owns the setting; broker configurations name it as often as any field.
pub use crate::store::config::Durability;
use crate::store::config::DURABILITIES;

const DEFAULT_LISTENER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1883));
const DEFAULT_WS_PATH: &str = "/mqtt";
/// No limit of our own: the most MQTT keep alive can say, like Mosquitto.
const DEFAULT_MAX_KEEP_ALIVE: u16 = u16::MAX;
const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// Sockets in the handshake at once (TCP accepted, no CONNECT read yet), per listener.
const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Sockets (in the handshake or connected) from one IP address, per listener. Below
/// [`DEFAULT_MAX_HANDSHAKES`] so that one host cannot fill the handshake slots alone.
const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// The whole pre-CONNECT phase: TLS and WebSocket handshakes and the CONNECT packet.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_PACKET_SIZE: u32 = 1024 * 1024;
/// The largest packet MQTT can encode: a 256 MiB remaining length plus the fixed header.
const MQTT_MAX_PACKET_SIZE: u64 = 268_435_455 + 5;
const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
const DEFAULT_BROKER_INFLIGHT: u16 = 20;
const DEFAULT_MAX_QUEUED_BYTES: u64 = 64 * 1024 * 1024;
/// Memory queued messages of persistent sessions share beyond each session's first 1,000.
const DEFAULT_QUEUE_MEMORY: u64 = 32 * 1024 * 1024;
const DEFAULT_COMMIT_WINDOW: Duration = Duration::from_millis(10);
/// A connected client that does not read for this long is disconnected.
const DEFAULT_SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_STORE_FILE: &str = "broker.db";
const DEFAULT_SYS_INTERVAL: Duration = Duration::from_secs(10);
const DENIED_REASONS: &[(&str, DeniedReason)] = &[
    ("not-authorized", DeniedReason::NotAuthorized),
    ("unspecified-error", DeniedReason::Unspecified),
];

#[derive(Debug, Clone, PartialEq)]
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
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            max_inflight: DEFAULT_BROKER_INFLIGHT,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            queue_memory: DEFAULT_QUEUE_MEMORY,
            durability: Durability::Memory,
            commit_window: DEFAULT_COMMIT_WINDOW,
            slow_client_timeout: DEFAULT_SLOW_CLIENT_TIMEOUT,
            store_path: PathBuf::from(DEFAULT_STORE_FILE),
            acl_file: None,
            sys_interval: None,
            max_keep_alive: DEFAULT_MAX_KEEP_ALIVE,
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
            websocket_path: DEFAULT_WS_PATH.to_owned(),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub(crate) allow_anonymous: Option<S<bool>>,
    pub(crate) password_file: Option<S<String>>,
    pub(crate) max_packet_size: Option<S<RawSize>>,
    pub(crate) max_queued_messages: Option<S<i64>>,
    pub(crate) max_inflight: Option<S<i64>>,
    pub(crate) max_queued_bytes: Option<S<RawSize>>,
    pub(crate) queue_memory: Option<S<RawSize>>,
    pub(crate) durability: Option<S<String>>,
    pub(crate) commit_window: Option<S<String>>,
    pub(crate) slow_client_timeout: Option<S<String>>,
    pub(crate) store_file: Option<S<String>>,
    pub(crate) acl_file: Option<S<String>>,
    pub(crate) sys_interval: Option<S<String>>,
    pub(crate) max_keep_alive: Option<S<String>>,
    pub(crate) subscribe_denied_reason: Option<S<String>>,
    pub(crate) listeners: Option<Vec<S<RawListener>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub(crate) bind: Option<S<String>>,
    pub(crate) websocket: Option<S<bool>>,
    pub(crate) websocket_path: Option<S<String>>,
    pub(crate) tls: Option<S<RawListenerTls>>,
    pub(crate) max_connections: Option<S<i64>>,
    pub(crate) max_handshakes: Option<S<i64>>,
    pub(crate) max_connections_per_address: Option<S<i64>>,
    pub(crate) connect_timeout: Option<S<String>>,
}

/// A listener's `tls = { ... }` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub(crate) cert: Option<S<String>>,
    pub(crate) key: Option<S<String>>,
    pub(crate) client_ca: Option<S<String>>,
    pub(crate) require_client_cert: Option<S<bool>>,
    pub(crate) identity_as_username: Option<S<bool>>,
}

impl Checker<'_> {
    /// The `[broker]` table; without one, every key takes its default.
    pub(crate) fn broker(&mut self, raw: Option<S<RawBroker>>) -> Option<BrokerConfig> {
        let span = raw.as_ref().map(|raw| raw.span());
        let raw = raw.map(Spanned::into_inner);
        let raw = raw.as_ref();

        let password_file = raw
            .and_then(|raw| raw.password_file.as_ref())
            .map(|file| self.existing_file(file, "broker.password_file"));
        let allow_anonymous = raw.and_then(|raw| raw.allow_anonymous.as_ref());
        if password_file.is_none() && !allow_anonymous.is_some_and(|a| *a.get_ref()) {
            self.d
                .error(
                    allow_anonymous.map(Spanned::span).or(span),
                    "broker.allow_anonymous",
                    "no client could connect: anonymous clients are refused and there is no password_file",
                )
                .hint = Some("set allow_anonymous = true under [broker], or password_file = \"passwd\" (Mosquitto format)".into());
        }

        let max_packet_size = match raw.and_then(|raw| raw.max_packet_size.as_ref()) {
            Some(size) => match self.size(size, "broker.max_packet_size") {
                Some(bytes) if bytes > MQTT_MAX_PACKET_SIZE => {
                    self.d.error(
                        Some(size.span()),
                        "broker.max_packet_size",
                        format!("{bytes} bytes is more than MQTT allows ({MQTT_MAX_PACKET_SIZE})"),
                    );
                    DEFAULT_MAX_PACKET_SIZE
                }
                // Fits: checked against a bound below u32::MAX just above.
                Some(bytes) => u32::try_from(bytes).unwrap_or(DEFAULT_MAX_PACKET_SIZE),
                None => DEFAULT_MAX_PACKET_SIZE,
            },
            None => DEFAULT_MAX_PACKET_SIZE,
        };
        let max_queued_messages = self.integer(
            &raw.and_then(|raw| raw.max_queued_messages.clone()),
            "broker.max_queued_messages",
            0,
            i64::from(u32::MAX),
            DEFAULT_MAX_QUEUED_MESSAGES as i64,
        ) as usize;
        let max_inflight = self.integer(
            &raw.and_then(|raw| raw.max_inflight.clone()),
            "broker.max_inflight",
            1,
            i64::from(u16::MAX),
            i64::from(DEFAULT_BROKER_INFLIGHT),
        ) as u16;

        let mut listeners = Vec::new();
        let mut seen: Vec<(SocketAddr, usize, usize)> = Vec::new();
        match raw.and_then(|raw| raw.listeners.as_ref()) {
            Some(raw_listeners) if !raw_listeners.is_empty() => {
                for (index, listener) in raw_listeners.iter().enumerate() {
                    if let Some(config) = self.listener(listener, index, &mut seen) {
                        listeners.push(config);
                    }
                }
            }
            _ => listeners.push(ListenerConfig::tcp(DEFAULT_LISTENER)),
        }

        let max_queued_bytes = match raw.and_then(|raw| raw.max_queued_bytes.as_ref()) {
            Some(size) => self
                .size(size, "broker.max_queued_bytes")
                .unwrap_or(DEFAULT_MAX_QUEUED_BYTES),
            None => DEFAULT_MAX_QUEUED_BYTES,
        };
        let queue_memory = match raw.and_then(|raw| raw.queue_memory.as_ref()) {
            Some(size) => self
                .size_or_zero(size, "broker.queue_memory")
                .unwrap_or(DEFAULT_QUEUE_MEMORY),
            None => DEFAULT_QUEUE_MEMORY,
        };
        let durability = raw
            .and_then(|raw| raw.durability.as_ref())
            .and_then(|value| {
                self.choice(
                    value,
                    "broker.durability",
                    "durability",
                    DURABILITIES,
                    Some(
                        "sync: nothing acknowledged is lost; batched: a power cut loses at most \
                         commit_window; memory: nothing on disk",
                    ),
                )
            })
            .unwrap_or(Durability::Sync);
        let commit_window = self.positive_duration(
            &raw.and_then(|raw| raw.commit_window.clone()),
            "broker.commit_window",
            DEFAULT_COMMIT_WINDOW,
        );
        let slow_client_timeout = self.positive_duration(
            &raw.and_then(|raw| raw.slow_client_timeout.clone()),
            "broker.slow_client_timeout",
            DEFAULT_SLOW_CLIENT_TIMEOUT,
        );
        let store_path = match raw.and_then(|raw| raw.store_file.as_ref()) {
            Some(file) if file.get_ref().trim().is_empty() => {
                self.d
                    .error(Some(file.span()), "broker.store_file", "must not be empty");
                self.data_dir.join(DEFAULT_STORE_FILE)
            }
            Some(file) => self.data_dir.join(file.get_ref()),
            None => self.data_dir.join(DEFAULT_STORE_FILE),
        };
        let acl_file = raw
            .and_then(|raw| raw.acl_file.as_ref())
            .map(|file| self.existing_file(file, "broker.acl_file"));
        let max_keep_alive = match raw.and_then(|raw| raw.max_keep_alive.as_ref()) {
            Some(value) => match self.duration(value, "broker.max_keep_alive") {
                Some(limit) if (1..=u64::from(u16::MAX)).contains(&limit.as_secs()) => {
                    limit.as_secs() as u16
                }
                Some(_) => {
                    self.d
                        .error(
                            Some(value.span()),
                            "broker.max_keep_alive",
                            format!("{:?} is out of range", value.get_ref()),
                        )
                        .hint = Some("MQTT keep alive is 1s to 65535s (18h12m15s)".into());
                    DEFAULT_MAX_KEEP_ALIVE
                }
                None => DEFAULT_MAX_KEEP_ALIVE,
            },
            None => DEFAULT_MAX_KEEP_ALIVE,
        };
        let subscribe_denied_reason = raw
            .and_then(|raw| raw.subscribe_denied_reason.as_ref())
            .and_then(|value| {
                self.choice(
                    value,
                    "broker.subscribe_denied_reason",
                    "reason",
                    DENIED_REASONS,
                    None,
                )
            })
            .unwrap_or(DeniedReason::NotAuthorized);
        let sys_interval = match raw.and_then(|raw| raw.sys_interval.as_ref()) {
            Some(value) => match self.duration(value, "broker.sys_interval") {
                Some(interval) if interval.is_zero() => None,
                Some(interval) if interval < Duration::from_secs(1) => {
                    self.d
                        .error(
                            Some(value.span()),
                            "broker.sys_interval",
                            format!("{:?} is too short", value.get_ref()),
                        )
                        .hint = Some("use at least \"1s\", or \"0s\" to turn $SYS off".into());
                    Some(DEFAULT_SYS_INTERVAL)
                }
                Some(interval) => Some(interval),
                None => Some(DEFAULT_SYS_INTERVAL),
            },
            None => Some(DEFAULT_SYS_INTERVAL),
        };

        Some(BrokerConfig {
            listeners,
            allow_anonymous: allow_anonymous.is_some_and(|a| *a.get_ref()),
            password_file,
            max_packet_size,
            max_queued_messages,
            max_inflight,
            max_queued_bytes,
            queue_memory,
            durability,
            commit_window,
            slow_client_timeout,
            store_path,
            acl_file,
            sys_interval,
            max_keep_alive,
            subscribe_denied_reason,
        })
    }

    fn listener(
        &mut self,
        raw: &S<RawListener>,
        index: usize,
        seen: &mut Vec<(SocketAddr, usize, usize)>,
    ) -> Option<ListenerConfig> {
        let prefix = format!("broker.listeners[{index}]");
        let max_connections = self.integer(
            &raw.get_ref().max_connections,
            &format!("{prefix}.max_connections"),
            1,
            i64::from(u32::MAX),
            DEFAULT_MAX_CONNECTIONS as i64,
        ) as usize;
        let max_handshakes = self.integer(
            &raw.get_ref().max_handshakes,
            &format!("{prefix}.max_handshakes"),
            1,
            i64::from(u32::MAX),
            DEFAULT_MAX_HANDSHAKES as i64,
        ) as usize;
        let max_connections_per_address = self.integer(
            &raw.get_ref().max_connections_per_address,
            &format!("{prefix}.max_connections_per_address"),
            0,
            i64::from(u32::MAX),
            DEFAULT_MAX_CONNECTIONS_PER_ADDRESS as i64,
        ) as usize;
        let connect_timeout = self.positive_duration(
            &raw.get_ref().connect_timeout,
            &format!("{prefix}.connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let Some(bind) = &raw.get_ref().bind else {
            self.missing(
                raw.span(),
                format!("{prefix}.bind"),
                Some("e.g. bind = \"0.0.0.0:1883\""),
            );
            return None;
        };
        let key_path = format!("{prefix}.bind");
        let addr: SocketAddr = match bind.get_ref().parse() {
            Ok(addr) => addr,
            Err(_) => {
                let hint = if bind.get_ref().starts_with("localhost") {
                    "write 127.0.0.1:<port> instead of localhost".to_owned()
                } else {
                    "write ip:port, e.g. \"0.0.0.0:1883\" or \"[::]:1883\"".to_owned()
                };
                self.d
                    .error(
                        Some(bind.span()),
                        key_path,
                        format!("invalid listen address {:?}", bind.get_ref()),
                    )
                    .hint = Some(hint);
                return None;
            }
        };
        let (line, _) = self.d.position(bind.span().start);
        if let Some((other, other_index, other_line)) = seen.iter().find(|(other, _, _)| {
            other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || other.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        }) {
            let message = if *other == addr {
                format!(
                    "{addr} is already used by broker.listeners[{other_index}] (line {other_line})"
                )
            } else {
                format!("{addr} overlaps {other} of broker.listeners[{other_index}] (line {other_line})")
            };
            self.d.error(Some(bind.span()), key_path, message).hint =
                Some("every listener needs its own port".into());
        }
        seen.push((addr, index, line));
        let websocket = raw
            .get_ref()
            .websocket
            .as_ref()
            .is_some_and(|w| *w.get_ref());
        let websocket_path = match &raw.get_ref().websocket_path {
            Some(path) if !websocket => {
                self.d
                    .error(
                        Some(path.span()),
                        format!("{prefix}.websocket_path"),
                        "websocket_path is set but websocket is not",
                    )
                    .hint = Some("add websocket = true to serve MQTT over WebSocket".into());
                DEFAULT_WS_PATH.to_owned()
            }
            Some(path)
                if !path.get_ref().starts_with('/') || path.get_ref().contains(['?', '#', ' ']) =>
            {
                self.d
                    .error(
                        Some(path.span()),
                        format!("{prefix}.websocket_path"),
                        format!("invalid WebSocket path {:?}", path.get_ref()),
                    )
                    .hint = Some("a path starts with `/`, e.g. \"/mqtt\"".into());
                DEFAULT_WS_PATH.to_owned()
            }
            Some(path) => path.get_ref().clone(),
            None => DEFAULT_WS_PATH.to_owned(),
        };
        let tls = raw
            .get_ref()
            .tls
            .as_ref()
            .and_then(|tls| self.listener_tls(tls, &format!("{prefix}.tls")));
        Some(ListenerConfig {
            bind: addr,
            websocket,
            websocket_path,
            tls,
            max_connections,
            max_handshakes,
            max_connections_per_address,
            connect_timeout,
        })
    }

    fn listener_tls(&mut self, raw: &S<RawListenerTls>, prefix: &str) -> Option<ListenerTls> {
        let span = raw.span();
        let r = raw.get_ref();
        let key = |k: &str| format!("{prefix}.{k}");
        let cert = match &r.cert {
            Some(cert) => Some(self.pem_file(cert, &key("cert"), Pem::Certificates)),
            None => {
                self.missing(
                    span.clone(),
                    key("cert"),
                    Some("the server certificate (chain) in PEM, e.g. cert = \"server.crt\""),
                );
                None
            }
        };
        let private_key = match &r.key {
            Some(file) => Some(self.pem_file(file, &key("key"), Pem::PrivateKey)),
            None => {
                self.missing(
                    span,
                    key("key"),
                    Some("the certificate's private key in PEM, e.g. key = \"server.key\""),
                );
                None
            }
        };
        let client_ca = r
            .client_ca
            .as_ref()
            .map(|ca| self.pem_file(ca, &key("client_ca"), Pem::Certificates));
        let require_client_cert = r.require_client_cert.as_ref().is_some_and(|b| *b.get_ref());
        let identity_as_username = r
            .identity_as_username
            .as_ref()
            .is_some_and(|b| *b.get_ref());
        if client_ca.is_none() {
            for (name, flag) in [
                ("require_client_cert", &r.require_client_cert),
                ("identity_as_username", &r.identity_as_username),
            ] {
                if let Some(flag) = flag.as_ref().filter(|flag| *flag.get_ref()) {
                    self.d
                        .error(
                            Some(flag.span()),
                            key(name),
                            format!("{name} needs client_ca"),
                        )
                        .hint = Some(
                        "set client_ca to the CA file that signs the client certificates".into(),
                    );
                }
            }
        }
        Some(ListenerTls {
            cert: cert?,
            key: private_key?,
            client_ca,
            require_client_cert,
            identity_as_username,
        })
    }
}
