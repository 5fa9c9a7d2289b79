//! The whole configuration file: the [`Config`] assembled from each part's section
//! (`[gateway]`, `[broker]`, `[http]`, `[[devices]]`, `[[uplinks]]`, `[homeassistant]`,
//! `[[modbus_servers]]`), and [`load`], [`parse`] and the
//! embedded [`demo`]. The parts validate their own sections; this is where they meet.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use toml::de::DeValue;
use toml::Spanned;

use crate::broker::config::{BrokerConfig, RawBroker};
use crate::config::{parse_toml, Checker, ConfigError, GatewayConfig, RawGateway, S};
use crate::drivers::config::{DeviceConfig, DriverConfig};
use crate::homeassistant::config::{HomeAssistantConfig, RawHomeAssistant};
use crate::http::config::{HttpConfig, RawHttp};
use crate::modbus_server::config::ModbusServerConfig;
use crate::uplink::config::UplinkConfig;

const TOP_LEVEL_KEYS: &[&str] = &[
    "gateway",
    "broker",
    "http",
    "devices",
    "uplinks",
    "homeassistant",
    "modbus_servers",
];

/// The validated configuration of a whole gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (or `<embedded demo>`).
    pub source: PathBuf,
    pub gateway: GatewayConfig,
    pub broker: BrokerConfig,
    /// The HTTP listener (`/metrics`, the API); `None` without an `[http]` table.
    pub http: Option<HttpConfig>,
    pub devices: Vec<DeviceConfig>,
    pub uplinks: Vec<UplinkConfig>,
    /// Home Assistant MQTT discovery; `None` without a `[homeassistant]` table.
    pub homeassistant: Option<HomeAssistantConfig>,
    /// Modbus TCP servers for SCADA systems and PLCs (`[[modbus_servers]]`).
    pub modbus_servers: Vec<ModbusServerConfig>,
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
    let (diagnostics, root) = parse_toml(text, source)?;
    let mut checker = Checker::new(diagnostics, source);
    let config = checker.document(root, source);
    checker.finish(config)
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
        if let Some(http) = &self.http {
            let _ = writeln!(
                out,
                "http: {}{}",
                http.url(),
                if http.password_file.is_some() {
                    ", basic authentication"
                } else {
                    ""
                }
            );
        }
        for warning in self.warnings() {
            let _ = writeln!(out, "warning: {warning}");
        }
        let _ = writeln!(out, "devices: {}", self.devices.len());
        for device in &self.devices {
            let (driver, points) = match &device.driver {
                DriverConfig::Simulated(sim) => ("simulated", sim.points.len()),
                DriverConfig::Modbus(modbus) => (modbus.transport.describe(), modbus.points.len()),
                DriverConfig::Serial(serial) => ("serial", serial.rules.len()),
            };
            let requests = match &device.driver {
                DriverConfig::Modbus(modbus) => format!(
                    " in {} read request(s) per cycle{}",
                    crate::drivers::modbus::planned_requests(modbus, device.poll),
                    if modbus.sunspec {
                        ", and the points of the SunSpec models found at run time (one request per model)"
                    } else {
                        ""
                    }
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {}: {driver}, {points} point(s){requests}, poll {}",
                device.name,
                humantime::format_duration(device.poll)
            );
        }
        if let Some(homeassistant) = &self.homeassistant {
            let _ = writeln!(
                out,
                "homeassistant: discovery under {}/",
                homeassistant.discovery_prefix
            );
        }
        for server in &self.modbus_servers {
            let _ = writeln!(
                out,
                "modbus server: {}, {} map entr{}, max {} connections",
                server.bind,
                server.map.len(),
                if server.map.len() == 1 { "y" } else { "ies" },
                server.max_connections
            );
        }
        let _ = writeln!(out, "uplinks: {}", self.uplinks.len());
        for uplink in &self.uplinks {
            match &uplink.sparkplug {
                Some(sparkplug) => {
                    let _ = writeln!(
                        out,
                        "  {}: {}, Sparkplug B edge node {}/{}, {} device(s){}",
                        uplink.name,
                        uplink.url,
                        sparkplug.group_id,
                        sparkplug.edge_node_id,
                        sparkplug.devices.len(),
                        sparkplug
                            .primary_host
                            .as_ref()
                            .map(|host| format!(", primary host {host}"))
                            .unwrap_or_default()
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  {}: {}, {} out route(s), {} in route(s)",
                        uplink.name,
                        uplink.url,
                        uplink.routes_out.len(),
                        uplink.routes_in.len()
                    );
                }
            }
        }
        out
    }
}

impl Checker<'_> {
    /// The whole file: each table to the part that owns it.
    fn document(&mut self, root: Spanned<DeValue<'_>>, source: &Path) -> Option<Config> {
        let DeValue::Table(table) = root.into_inner() else {
            return None;
        };
        let mut gateway = None;
        let mut broker = None;
        let mut http = None;
        let mut devices = None;
        let mut uplinks = None;
        let mut homeassistant = None;
        let mut modbus_servers = None;
        for (key, value) in table {
            match key.get_ref().as_ref() {
                "gateway" => gateway = Some(value),
                "broker" => broker = Some(value),
                "http" => http = Some(value),
                "devices" => devices = Some(value),
                "uplinks" => uplinks = Some(value),
                "homeassistant" => homeassistant = Some(value),
                "modbus_servers" => modbus_servers = Some(value),
                other => self.unknown_key(key.span(), other, other, TOP_LEVEL_KEYS),
            }
        }

        let gateway = match gateway {
            Some(value) => self
                .deserialize::<S<RawGateway>>(value, "gateway")
                .map(|raw| self.gateway(raw)),
            None => {
                self.d
                    .error(None, "gateway", "the [gateway] table is missing")
                    .hint = Some("add:\n    [gateway]\n    id = \"my-gateway\"".into());
                None
            }
        };
        let broker = match broker {
            Some(value) => self
                .deserialize::<S<RawBroker>>(value, "broker")
                .map(|raw| self.broker(Some(raw))),
            None => Some(self.broker(None)),
        };
        // Absent: no HTTP listener. Present but invalid: an error like any other section.
        let http = http.map(|value| {
            self.deserialize::<S<RawHttp>>(value, "http")
                .and_then(|raw| self.http(raw))
        });
        let devices = devices.map(|value| self.devices(value)).unwrap_or_default();
        let uplinks = uplinks.map(|value| self.uplinks(value)).unwrap_or_default();
        let homeassistant = homeassistant.map(|value| {
            self.deserialize::<S<RawHomeAssistant>>(value, "homeassistant")
                .map(|raw| self.homeassistant(raw))
        });

        // Map entries name devices and points: checked against the valid devices.
        let valid_devices: Vec<DeviceConfig> = devices.iter().flatten().cloned().collect();
        let modbus_servers = modbus_servers
            .map(|value| self.modbus_servers(value, &valid_devices))
            .unwrap_or_default();

        let gateway = gateway??;
        let mut broker = broker??;
        let devices: Vec<DeviceConfig> = devices.into_iter().collect::<Option<_>>()?;
        let mut uplinks: Vec<UplinkConfig> = uplinks.into_iter().collect::<Option<_>>()?;
        super::sparkplug::fill_devices(&mut uplinks, &devices, &gateway);
        // The broker's database lives in the data directory unless given an absolute path.
        if broker.store_path.is_relative() {
            broker.store_path = gateway.data_dir.join(&broker.store_path);
        }
        Some(Config {
            source: source.to_path_buf(),
            gateway,
            broker,
            http: match http {
                Some(http) => Some(http?),
                None => None,
            },
            devices,
            uplinks,
            homeassistant: match homeassistant {
                Some(homeassistant) => Some(homeassistant?),
                None => None,
            },
            modbus_servers: modbus_servers.into_iter().collect::<Option<_>>()?,
        })
    }
}
