//! The live picture of the gateway: every device and point, every uplink, the Modbus links
//! and servers, the LAN clients, the recent errors and the gateway itself. The parts write
//! into it through small handles the service passes in ([`DeviceBoard`], [`UplinkBoard`],
//! [`ClientBoard`]); the status API, the status page and `fieldmq status` read a
//! [`StatusSnapshot`] of it.
//!
//! Writers never wait long and never on the network: each device and each uplink has a
//! mutex of its own, held only to copy a few values in or out, and a reader copies one
//! device at a time. The broker records a client at connect and disconnect only, never per
//! message. Request diagnostics (of a Modbus device, link or server) are not copied in:
//! the board holds the part's metrics handle and reads its atomics when asked, so one
//! recording feeds both `/metrics` and the status.

mod text;
mod view;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Instant, SystemTime};

use crate::metrics::{BusMetrics, DeviceMetrics, ModbusServerMetrics};
use crate::model::{Quality, Value};
use crate::reload::{ReloadHistory, Reloader};

pub use text::{duration as duration_text, render as render_text};
pub use view::{
    BackoffView, BusDeviceView, BusView, ClientView, DeviceView, DiagnosticsView, ErrorView,
    GatewayView, ModbusServerView, PointView, StatusSnapshot, UplinkView,
};

/// How many recent errors are kept (the oldest go first).
pub const RECENT_ERRORS: usize = 50;

/// What the gateway is, fixed at start.
#[derive(Debug, Clone)]
pub struct GatewayInfo {
    pub id: String,
    pub version: String,
    pub config_file: PathBuf,
    pub data_dir: PathBuf,
}

/// The whole picture; cheap to clone (every clone is the same board).
#[derive(Debug, Clone)]
pub struct StatusBoard {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    gateway: GatewayInfo,
    started_at: SystemTime,
    started: Instant,
    devices: Mutex<BTreeMap<String, Arc<Mutex<DeviceEntry>>>>,
    uplinks: Mutex<BTreeMap<String, Arc<Mutex<UplinkEntry>>>>,
    /// By (transport, link name).
    buses: Mutex<BTreeMap<(String, String), BusEntry>>,
    modbus_servers: Mutex<Vec<ModbusServerEntry>>,
    clients: Arc<Mutex<BTreeMap<u64, ClientEntry>>>,
    errors: Arc<ErrorLog>,
    reloader: OnceLock<Reloader>,
}

/// A std mutex that a panicking writer left poisoned still holds a usable picture.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StatusBoard {
    pub fn new(gateway: GatewayInfo) -> StatusBoard {
        StatusBoard {
            shared: Arc::new(Shared {
                gateway,
                started_at: SystemTime::now(),
                started: Instant::now(),
                devices: Mutex::default(),
                uplinks: Mutex::default(),
                buses: Mutex::default(),
                modbus_servers: Mutex::default(),
                clients: Arc::default(),
                errors: Arc::new(ErrorLog::default()),
                reloader: OnceLock::new(),
            }),
        }
    }

    /// Where the last reload and the reload counts come from (set once; later calls are
    /// ignored).
    pub fn attach_reloader(&self, reloader: Reloader) {
        let _ = self.shared.reloader.set(reloader);
    }

    /// A device's handle. A device registered again under the same name (restarted by a
    /// reload) starts from a fresh entry; `points` are its configured points and units, shown
    /// before their first reading.
    pub fn register_device(
        &self,
        name: &str,
        driver: &str,
        points: &[(String, Option<String>)],
    ) -> DeviceBoard {
        let entry = DeviceEntry {
            driver: driver.to_owned(),
            state: DeviceState::Starting,
            last_error: None,
            diagnostics: None,
            points: points
                .iter()
                .map(|(point, unit)| {
                    (
                        point.clone(),
                        PointEntry {
                            unit: unit.clone(),
                            ..PointEntry::default()
                        },
                    )
                })
                .collect(),
        };
        let entry = Arc::new(Mutex::new(entry));
        lock(&self.shared.devices).insert(name.to_owned(), entry.clone());
        DeviceBoard {
            entry,
            errors: self.shared.errors.clone(),
            source: Arc::from(format!("device {name}")),
        }
    }

    /// Forget a device that no longer runs (removed by a reload).
    pub fn remove_device(&self, name: &str) {
        lock(&self.shared.devices).remove(name);
    }

    /// An uplink's handle (a fresh entry when registered again under the same name).
    pub fn register_uplink(&self, name: &str, url: &str) -> UplinkBoard {
        let entry = Arc::new(Mutex::new(UplinkEntry {
            url: url.to_owned(),
            ..UplinkEntry::default()
        }));
        lock(&self.shared.uplinks).insert(name.to_owned(), entry.clone());
        UplinkBoard {
            entry,
            errors: self.shared.errors.clone(),
            source: Arc::from(format!("uplink {name}")),
        }
    }

    /// Forget an uplink that no longer runs (removed by a reload).
    pub fn remove_uplink(&self, name: &str) {
        lock(&self.shared.uplinks).remove(name);
    }

    /// The broker's handle for its LAN clients.
    pub fn clients(&self) -> ClientBoard {
        ClientBoard {
            clients: self.shared.clients.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Record an error that belongs to no device or uplink (the gateway itself, a reload).
    pub fn record_error(&self, source: &str, text: &str) {
        self.shared.errors.record(source, text);
    }

    /// A Modbus link (`name`: its serial port or TCP address; `transport`: `rtu`, `tcp` or
    /// `rtu-over-tcp`) and the devices on it, as (name, unit id). Registered again (its
    /// task restarted), it replaces the old entry.
    pub fn register_bus(
        &self,
        name: &str,
        transport: &str,
        devices: Vec<(String, u8)>,
        metrics: BusMetrics,
    ) {
        lock(&self.shared.buses).insert(
            (transport.to_owned(), name.to_owned()),
            BusEntry { devices, metrics },
        );
    }

    /// Forget a link whose task stopped (a reload).
    pub fn remove_bus(&self, name: &str, transport: &str) {
        lock(&self.shared.buses).remove(&(transport.to_owned(), name.to_owned()));
    }

    /// The Modbus servers that run now, as (name, bound address, metrics).
    pub fn set_modbus_servers(&self, servers: Vec<(String, SocketAddr, ModbusServerMetrics)>) {
        *lock(&self.shared.modbus_servers) = servers
            .into_iter()
            .map(|(name, bind, metrics)| ModbusServerEntry {
                name,
                bind,
                metrics,
            })
            .collect();
    }

    /// A copy of the whole picture.
    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            gateway: self.gateway(),
            devices: self.devices(),
            buses: self.buses(),
            modbus_servers: self.modbus_servers(),
            uplinks: self.uplinks(),
            clients: self.client_list(),
            errors: self.shared.errors.list(),
        }
    }

    pub fn gateway(&self) -> GatewayView {
        let shared = &self.shared;
        let reloads = shared
            .reloader
            .get()
            .map(Reloader::history)
            .and_then(|history: ReloadHistory| serde_json::to_value(history).ok());
        GatewayView {
            id: shared.gateway.id.clone(),
            version: shared.gateway.version.clone(),
            config_file: shared.gateway.config_file.display().to_string(),
            data_dir: shared.gateway.data_dir.display().to_string(),
            started_at: view::rfc3339(shared.started_at),
            uptime_s: shared.started.elapsed().as_secs(),
            reloads,
        }
    }

    /// Every device, by name; each copied under its own lock so a reader holds up one
    /// device at a time, for the time of a copy.
    pub fn devices(&self) -> Vec<DeviceView> {
        let devices: Vec<(String, Arc<Mutex<DeviceEntry>>)> = lock(&self.shared.devices)
            .iter()
            .map(|(name, entry)| (name.clone(), entry.clone()))
            .collect();
        devices
            .into_iter()
            .map(|(name, entry)| {
                let entry = lock(&entry).clone();
                view::device(name, entry)
            })
            .collect()
    }

    /// Every Modbus link, its counts read from its metrics.
    pub fn buses(&self) -> Vec<BusView> {
        let buses: Vec<((String, String), BusEntry)> = lock(&self.shared.buses)
            .iter()
            .map(|(key, entry)| (key.clone(), entry.clone()))
            .collect();
        buses
            .into_iter()
            .map(|((transport, name), entry)| view::bus(name, transport, &entry))
            .collect()
    }

    pub fn modbus_servers(&self) -> Vec<ModbusServerView> {
        let servers = lock(&self.shared.modbus_servers).clone();
        servers.iter().map(view::modbus_server).collect()
    }

    pub fn uplinks(&self) -> Vec<UplinkView> {
        let uplinks: Vec<(String, Arc<Mutex<UplinkEntry>>)> = lock(&self.shared.uplinks)
            .iter()
            .map(|(name, entry)| (name.clone(), entry.clone()))
            .collect();
        uplinks
            .into_iter()
            .map(|(name, entry)| {
                let entry = lock(&entry).clone();
                view::uplink(name, entry, SystemTime::now())
            })
            .collect()
    }

    pub fn client_list(&self) -> Vec<ClientView> {
        let mut clients: Vec<ClientView> = lock(&self.shared.clients)
            .values()
            .map(view::client)
            .collect();
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        clients
    }
}

/// What a device is doing, as its driver last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Registered; the driver has not reported yet.
    Starting,
    Online,
    Offline,
    Error,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Starting => "starting",
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
            DeviceState::Error => "error",
        }
    }
}

#[derive(Debug, Clone)]
struct DeviceEntry {
    driver: String,
    state: DeviceState,
    last_error: Option<(String, SystemTime)>,
    /// A Modbus device's request counts, read when the status is asked for.
    diagnostics: Option<DeviceMetrics>,
    points: BTreeMap<String, PointEntry>,
}

#[derive(Debug, Clone)]
struct BusEntry {
    devices: Vec<(String, u8)>,
    metrics: BusMetrics,
}

#[derive(Debug, Clone)]
struct ModbusServerEntry {
    name: String,
    bind: SocketAddr,
    metrics: ModbusServerMetrics,
}

#[derive(Debug, Clone, Default)]
struct PointEntry {
    unit: Option<String>,
    /// `None` before the first reading.
    value: Option<serde_json::Value>,
    /// `None` before the first reading; `Some(None)` good, `Some(Some(reason))` bad.
    quality: Option<Option<String>>,
    at: Option<SystemTime>,
}

/// One device's handle: its driver's readings and state go in here.
#[derive(Debug, Clone)]
pub struct DeviceBoard {
    entry: Arc<Mutex<DeviceEntry>>,
    errors: Arc<ErrorLog>,
    source: Arc<str>,
}

impl DeviceBoard {
    /// Show the request diagnostics `metrics` records (a Modbus device's).
    pub fn show_diagnostics(&self, metrics: DeviceMetrics) {
        lock(&self.entry).diagnostics = Some(metrics);
    }

    /// The last reading of `point`. A reading that turns bad (or bad for another reason) is
    /// also a recent error; a point that stays bad for the same reason is not repeated.
    pub fn record_reading(
        &self,
        point: &str,
        value: Option<&Value>,
        quality: &Quality,
        at: SystemTime,
    ) {
        let json = value.map(|value| match value {
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(x) => serde_json::Value::from(*x),
            Value::Text(text) => serde_json::Value::String(text.clone()),
        });
        let reason = match quality {
            Quality::Good => None,
            Quality::Bad(reason) => Some(reason.as_str()),
        };
        let newly_bad = {
            let mut entry = lock(&self.entry);
            let point_entry = match entry.points.get_mut(point) {
                Some(existing) => existing,
                None => entry.points.entry(point.to_owned()).or_default(),
            };
            let was = point_entry.quality.as_ref().and_then(|q| q.as_deref());
            let newly_bad = reason.is_some() && was != reason;
            point_entry.value = json;
            point_entry.quality = Some(reason.map(str::to_owned));
            point_entry.at = Some(at);
            newly_bad
        };
        if let (true, Some(reason)) = (newly_bad, reason) {
            self.errors
                .record(&self.source, &format!("point {point}: {reason}"));
        }
    }

    /// The fields a serial rule took from one frame, as the point's value (always good).
    pub fn record_fields(
        &self,
        point: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
        at: SystemTime,
    ) {
        let mut entry = lock(&self.entry);
        let point_entry = match entry.points.get_mut(point) {
            Some(existing) => existing,
            None => entry.points.entry(point.to_owned()).or_default(),
        };
        point_entry.value = Some(serde_json::Value::Object(fields.clone()));
        point_entry.quality = Some(None);
        point_entry.at = Some(at);
    }

    /// What the driver says about the device; an error (new or different) is also a recent
    /// error.
    pub fn set_state(&self, state: DeviceState, error: Option<&str>) {
        let changed = {
            let mut entry = lock(&self.entry);
            let changed = entry.state != state
                || entry.last_error.as_ref().map(|(text, _)| text.as_str()) != error;
            entry.state = state;
            if let Some(error) = error {
                if changed {
                    entry.last_error = Some((error.to_owned(), SystemTime::now()));
                }
            }
            changed
        };
        if let (true, Some(error)) = (changed, error) {
            self.errors.record(&self.source, error);
        }
    }
}

/// An uplink's state as the status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UplinkState {
    /// Not connected yet since start.
    #[default]
    Connecting,
    Connected,
    /// Lost its connection; reconnecting with backoff.
    Disconnected,
    Stopped,
}

impl UplinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkState::Connecting => "connecting",
            UplinkState::Connected => "connected",
            UplinkState::Disconnected => "disconnected",
            UplinkState::Stopped => "stopped",
        }
    }
}

/// An uplink's queue, as its outbox last counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub messages: u64,
    pub bytes: u64,
    /// Age of the oldest queued message, seconds (0 when empty).
    pub oldest_age_s: u64,
    pub dropped_total: u64,
    pub acked_total: u64,
}

#[derive(Debug, Clone, Default)]
struct UplinkEntry {
    url: String,
    state: UplinkState,
    since: Option<SystemTime>,
    last_error: Option<(String, SystemTime)>,
    backlog: Backlog,
    /// When `backlog` was counted: the oldest message's age grows from there.
    counted_at: Option<SystemTime>,
}

/// One uplink's handle: its sender writes state, errors and backlog here.
#[derive(Debug, Clone)]
pub struct UplinkBoard {
    entry: Arc<Mutex<UplinkEntry>>,
    errors: Arc<ErrorLog>,
    source: Arc<str>,
}

impl UplinkBoard {
    pub fn set_state(&self, state: UplinkState) {
        let mut entry = lock(&self.entry);
        if entry.state != state {
            entry.state = state;
            entry.since = Some(SystemTime::now());
        }
    }

    /// The connection failed or was lost because of `error` (also a recent error).
    pub fn set_error(&self, error: &str) {
        {
            let mut entry = lock(&self.entry);
            entry.last_error = Some((error.to_owned(), SystemTime::now()));
        }
        self.errors.record(&self.source, error);
    }

    pub fn set_backlog(&self, backlog: Backlog) {
        let mut entry = lock(&self.entry);
        entry.backlog = backlog;
        entry.counted_at = Some(SystemTime::now());
    }
}

/// MQTT protocol versions, as the status names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    V311,
    V5,
}

impl ProtocolVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolVersion::V311 => "3.1.1",
            ProtocolVersion::V5 => "5",
        }
    }
}

#[derive(Debug, Clone)]
struct ClientEntry {
    client_id: Arc<str>,
    remote: SocketAddr,
    protocol: ProtocolVersion,
    listener: SocketAddr,
    since: SystemTime,
}

/// The broker's handle: a client is recorded when it connects and removed when its
/// [`ClientPresence`] is dropped.
#[derive(Debug, Clone)]
pub struct ClientBoard {
    clients: Arc<Mutex<BTreeMap<u64, ClientEntry>>>,
    next_id: Arc<AtomicU64>,
}

impl ClientBoard {
    /// A client connected; it shows until the returned presence is dropped.
    pub fn connected(
        &self,
        client_id: Arc<str>,
        remote: SocketAddr,
        protocol: ProtocolVersion,
        listener: SocketAddr,
    ) -> ClientPresence {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = ClientEntry {
            client_id,
            remote,
            protocol,
            listener,
            since: SystemTime::now(),
        };
        lock(&self.clients).insert(id, entry);
        ClientPresence {
            clients: self.clients.clone(),
            id,
        }
    }
}

/// One connected client's place on the board.
#[derive(Debug)]
pub struct ClientPresence {
    clients: Arc<Mutex<BTreeMap<u64, ClientEntry>>>,
    id: u64,
}

impl Drop for ClientPresence {
    fn drop(&mut self) {
        lock(&self.clients).remove(&self.id);
    }
}

#[derive(Debug, Clone)]
struct ErrorEntry {
    source: Arc<str>,
    text: String,
    first: SystemTime,
    last: SystemTime,
    count: u64,
}

/// The last [`RECENT_ERRORS`] errors, newest first. The same text from the same source
/// again moves its entry to the front and counts it instead of filling the ring.
#[derive(Debug, Default)]
struct ErrorLog {
    entries: Mutex<VecDeque<ErrorEntry>>,
}

impl ErrorLog {
    fn record(&self, source: &str, text: &str) {
        let now = SystemTime::now();
        let mut entries = lock(&self.entries);
        let repeated = entries
            .iter()
            .position(|e| &*e.source == source && e.text == text);
        let entry = match repeated.and_then(|at| entries.remove(at)) {
            Some(mut entry) => {
                entry.count += 1;
                entry.last = now;
                entry
            }
            None => ErrorEntry {
                source: Arc::from(source),
                text: text.to_owned(),
                first: now,
                last: now,
                count: 1,
            },
        };
        entries.push_front(entry);
        entries.truncate(RECENT_ERRORS);
    }

    fn list(&self) -> Vec<ErrorView> {
        lock(&self.entries).iter().map(view::error).collect()
    }
}

#[cfg(test)]
mod tests;
