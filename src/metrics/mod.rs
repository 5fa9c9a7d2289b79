//! The gateway's Prometheus metrics: the one registry and the metric families every part
//! records into. A leaf: it knows no part. The service builds one [`Metrics`] and hands each
//! part a small typed handle with its labels already bound ([`DeviceMetrics`],
//! [`BusMetrics`], [`ModbusServerMetrics`], [`UplinkMetrics`]); recording is an atomic add,
//! no lock and no allocation. The same handles are what the status board reads (through
//! [`DeviceMetrics::diagnostics`] and the like): one recording serves both, with the
//! recent windows a counter cannot hold kept beside the counters ([`diag`]). Values a part already counts elsewhere (the broker's router statistics,
//! the reload history) are copied in at scrape time as snapshots ([`BrokerSnapshot`],
//! [`Metrics::set_reloads`]) instead of being counted twice.
//!
//! Every name starts with `fieldmq_`; counters end in `_total`; units are seconds and
//! bytes. `GET /metrics` (`src/http/`) encodes [`Metrics::encode`] as OpenMetrics text, or
//! the Prometheus text format for a client that does not ask for OpenMetrics.

pub mod diag;
mod process;
mod snapshot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use snapshot::{BrokerSnapshot, HistogramSample, ListenerSample, UplinkSnapshot};

/// The two text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (what Prometheus asks for first).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (for tools that read only that, e.g. `promtool`).
    PrometheusText,
}

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when it names it, else the
    /// Prometheus text format.
    pub fn from_accept(accept: &str) -> Format {
        if accept.contains("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::PrometheusText
        }
    }
}

/// Label sets: a few name/value pairs.
type Labels = Vec<(&'static str, String)>;

/// Device request latency buckets, seconds: from a fast Modbus TCP answer to a timeout.
const REQUEST_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

/// The registry and the families parts record into.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    device: DeviceFamilies,
    bus: BusFamilies,
    modbus_server: ModbusServerFamilies,
    scraped: Arc<snapshot::Scraped>,
}

#[derive(Debug, Clone)]
struct DeviceFamilies {
    polls: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    timeouts: Family<Labels, Counter>,
    request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    points: Family<Labels, Gauge>,
    payload_errors: Family<Labels, Counter>,
    exceptions: Family<Labels, Counter>,
    backoff_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
}

#[derive(Debug, Clone)]
struct BusFamilies {
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    busy_seconds: Family<Labels, Counter<f64, AtomicU64>>,
}

#[derive(Debug, Clone, Default)]
struct ModbusServerFamilies {
    connections: Family<Labels, Gauge>,
    connections_accepted: Family<Labels, Counter>,
    connections_refused: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    exceptions: Family<Labels, Counter>,
    writes: Family<Labels, Counter>,
}

/// The function codes a Modbus server serves, one `function` label each; any other is
/// counted as `other` (and answered with exception 1).
const SERVER_FUNCTIONS: [u8; 8] = [1, 2, 3, 4, 5, 6, 15, 16];
/// The exception codes a Modbus server answers with: illegal function, data address, data
/// value, server device failure (a refused write), gateway target (a unit id not served).
const SERVER_EXCEPTIONS: [u8; 5] = [1, 2, 3, 4, 11];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered under the `fieldmq_` prefix, with the process metrics.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fieldmq");
        let device = DeviceFamilies {
            polls: Family::default(),
            errors: Family::default(),
            timeouts: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            points: Family::default(),
            payload_errors: Family::default(),
            exceptions: Family::default(),
            backoff_seconds: Family::default(),
        };
        registry.register(
            "device_polls",
            "Poll cycles started, per device",
            device.polls.clone(),
        );
        registry.register(
            "device_errors",
            "Failed requests per device, by kind (timeout, exception, io, decode)",
            device.errors.clone(),
        );
        registry.register(
            "device_timeouts",
            "Requests to a device that got no answer in time",
            device.timeouts.clone(),
        );
        registry.register(
            "device_request_duration_seconds",
            "Time from sending a request to a device to its answer",
            device.request_seconds.clone(),
        );
        registry.register(
            "device_points",
            "Points of a device by the quality of their last reading (good or bad)",
            device.points.clone(),
        );
        registry.register(
            "device_payload_errors",
            "Readings the device's payload template failed on (nothing was published for them)",
            device.payload_errors.clone(),
        );
        registry.register(
            "device_exceptions",
            "Modbus exceptions a device answered with, by exception code",
            device.exceptions.clone(),
        );
        registry.register(
            "device_backoff_seconds",
            "How long a failing device is backed off for (0 while it answers)",
            device.backoff_seconds.clone(),
        );
        let bus = BusFamilies {
            requests: Family::default(),
            errors: Family::default(),
            busy_seconds: Family::default(),
        };
        registry.register(
            "bus_requests",
            "Requests sent on a Modbus link (a serial line, or a TCP connection its units share)",
            bus.requests.clone(),
        );
        registry.register(
            "bus_errors",
            "Failed requests on a Modbus link",
            bus.errors.clone(),
        );
        registry.register(
            "bus_busy_seconds",
            "Time the link was busy with a request; its rate is the link's utilisation (0 to 1)",
            bus.busy_seconds.clone(),
        );
        let modbus_server = ModbusServerFamilies::default();
        registry.register(
            "modbus_server_connections",
            "Modbus TCP clients connected to a Modbus server now",
            modbus_server.connections.clone(),
        );
        registry.register(
            "modbus_server_connections_accepted",
            "Modbus TCP client connections a Modbus server accepted",
            modbus_server.connections_accepted.clone(),
        );
        registry.register(
            "modbus_server_connections_refused",
            "Modbus TCP client connections refused because max_connections were open",
            modbus_server.connections_refused.clone(),
        );
        registry.register(
            "modbus_server_requests",
            "Requests a Modbus server received, by function code",
            modbus_server.requests.clone(),
        );
        registry.register(
            "modbus_server_exceptions",
            "Exceptions a Modbus server answered with, by exception code",
            modbus_server.exceptions.clone(),
        );
        registry.register(
            "modbus_server_writes",
            "Write requests a Modbus server carried out, by result (ok or failed)",
            modbus_server.writes.clone(),
        );
        let scraped = Arc::new(snapshot::Scraped::default());
        registry.register_collector(Box::new(scraped.clone()));
        registry.register_collector(Box::new(process::ProcessCollector::new()));
        Metrics {
            registry,
            device,
            bus,
            modbus_server,
            scraped,
        }
    }

    /// The handle one device records into (`device` label bound).
    pub fn device(&self, device: &str) -> DeviceMetrics {
        let labels: Labels = vec![("device", device.to_owned())];
        let with = |key: &'static str, value: &str| {
            let mut labels = labels.clone();
            labels.push((key, value.to_owned()));
            labels
        };
        let families = &self.device;
        let last_good = Arc::new(AtomicU64::new(0));
        self.scraped.add_device(device, last_good.clone());
        DeviceMetrics {
            polls: families.polls.get_or_create_owned(&labels),
            timeouts: families.timeouts.get_or_create_owned(&labels),
            errors: ErrorKind::ALL.map(|kind| {
                families
                    .errors
                    .get_or_create_owned(&with("kind", kind.label()))
            }),
            request_seconds: families.request_seconds.get_or_create_owned(&labels),
            points_good: families
                .points
                .get_or_create_owned(&with("quality", "good")),
            points_bad: families.points.get_or_create_owned(&with("quality", "bad")),
            payload_errors: families.payload_errors.get_or_create_owned(&labels),
            exceptions: Some((families.exceptions.clone(), labels.clone())),
            backoff_seconds: families.backoff_seconds.get_or_create_owned(&labels),
            last_good_unix_ms: last_good,
            diag: Arc::default(),
        }
    }

    /// Stop showing a device that was removed (a reload).
    pub fn remove_device(&self, device: &str) {
        let labels: Labels = vec![("device", device.to_owned())];
        let families = &self.device;
        families.polls.remove(&labels);
        families.timeouts.remove(&labels);
        families.payload_errors.remove(&labels);
        families.backoff_seconds.remove(&labels);
        // A code's series exists once seen; trying all 255 is cheap and needs no record.
        for code in 1..=255u8 {
            let mut with_code = labels.clone();
            with_code.push(("code", code.to_string()));
            families.exceptions.remove(&with_code);
        }
        families.request_seconds.remove(&labels);
        for kind in ErrorKind::ALL {
            let mut with = labels.clone();
            with.push(("kind", kind.label().to_owned()));
            families.errors.remove(&with);
        }
        for quality in ["good", "bad"] {
            let mut with = labels.clone();
            with.push(("quality", quality.to_owned()));
            families.points.remove(&with);
        }
        self.scraped.remove_device(device);
    }

    /// The handle one Modbus link records into: `bus` is its serial port or TCP address,
    /// `transport` one of `rtu`, `tcp`, `rtu-over-tcp`. Make one per link and give a clone
    /// to each device on it (each call starts a fresh utilisation window).
    pub fn bus(&self, bus: &str, transport: &str) -> BusMetrics {
        let labels: Labels = vec![("bus", bus.to_owned()), ("transport", transport.to_owned())];
        BusMetrics {
            requests: self.bus.requests.get_or_create_owned(&labels),
            errors: self.bus.errors.get_or_create_owned(&labels),
            busy_seconds: self.bus.busy_seconds.get_or_create_owned(&labels),
            window: Arc::default(),
        }
    }

    /// Stop showing a link no device uses any more (a reload).
    pub fn remove_bus(&self, bus: &str, transport: &str) {
        let labels: Labels = vec![("bus", bus.to_owned()), ("transport", transport.to_owned())];
        self.bus.requests.remove(&labels);
        self.bus.errors.remove(&labels);
        self.bus.busy_seconds.remove(&labels);
    }

    /// The handle one Modbus server records into (`server` label: its name). Every series
    /// it can count exists from the start, so recording never takes the families' lock.
    pub fn modbus_server(&self, server: &str) -> ModbusServerMetrics {
        let labels: Labels = vec![("server", server.to_owned())];
        let families = &self.modbus_server;
        let with = |key: &'static str, value: String| {
            let mut labels = labels.clone();
            labels.push((key, value));
            labels
        };
        ModbusServerMetrics {
            open: families.connections.get_or_create_owned(&labels),
            accepted: families.connections_accepted.get_or_create_owned(&labels),
            refused: families.connections_refused.get_or_create_owned(&labels),
            requests: std::array::from_fn(|i| {
                let function = SERVER_FUNCTIONS
                    .get(i)
                    .map_or_else(|| "other".to_owned(), u8::to_string);
                families
                    .requests
                    .get_or_create_owned(&with("function", function))
            }),
            exceptions: SERVER_EXCEPTIONS.map(|code| {
                families
                    .exceptions
                    .get_or_create_owned(&with("code", code.to_string()))
            }),
            writes_ok: families
                .writes
                .get_or_create_owned(&with("result", "ok".to_owned())),
            writes_failed: families
                .writes
                .get_or_create_owned(&with("result", "failed".to_owned())),
        }
    }

    /// Stop showing a Modbus server that no longer runs (a reload).
    pub fn remove_modbus_server(&self, server: &str) {
        let labels: Labels = vec![("server", server.to_owned())];
        let families = &self.modbus_server;
        let with = |key: &'static str, value: String| {
            let mut labels = labels.clone();
            labels.push((key, value));
            labels
        };
        families.connections.remove(&labels);
        families.connections_accepted.remove(&labels);
        families.connections_refused.remove(&labels);
        for function in SERVER_FUNCTIONS.iter().map(u8::to_string) {
            families.requests.remove(&with("function", function));
        }
        families
            .requests
            .remove(&with("function", "other".to_owned()));
        for code in SERVER_EXCEPTIONS {
            families.exceptions.remove(&with("code", code.to_string()));
        }
        for result in ["ok", "failed"] {
            families.writes.remove(&with("result", result.to_owned()));
        }
    }

    /// The handle one uplink records into (`uplink` label bound).
    pub fn uplink(&self, uplink: &str) -> UplinkMetrics {
        UplinkMetrics {
            shared: self.scraped.add_uplink(uplink),
        }
    }

    /// Stop showing an uplink that was removed (a reload).
    pub fn remove_uplink(&self, uplink: &str) {
        self.scraped.remove_uplink(uplink);
    }

    /// The broker's counters as of now (read from its router at scrape time).
    pub fn set_broker(&self, broker: BrokerSnapshot) {
        self.scraped.set_broker(broker);
    }

    /// Configuration reloads applied and refused so far.
    pub fn set_reloads(&self, succeeded: u64, failed: u64) {
        self.scraped.set_reloads(succeeded, failed);
    }

    /// Everything, in `format` (OpenMetrics ends with `# EOF`).
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(16 * 1024);
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut text, &self.registry)?
            }
            Format::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?
            }
        }
        Ok(text)
    }
}

/// Why a device request failed, one label value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer in time.
    Timeout,
    /// The device answered with an error (a Modbus exception).
    Exception,
    /// The link failed: connection refused or lost, serial port error.
    Io,
    /// An answer that could not be decoded into the point's value.
    Decode,
    /// RTU: bytes came back without a valid frame (a CRC error, noise).
    Frame,
}

impl ErrorKind {
    const ALL: [ErrorKind; 5] = [
        ErrorKind::Timeout,
        ErrorKind::Exception,
        ErrorKind::Io,
        ErrorKind::Decode,
        ErrorKind::Frame,
    ];

    fn index(self) -> usize {
        ErrorKind::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or_default()
    }

    fn label(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Exception => "exception",
            ErrorKind::Io => "io",
            ErrorKind::Decode => "decode",
            ErrorKind::Frame => "crc",
        }
    }
}

/// One device's metrics. Cheap to clone; recording takes no lock.
#[derive(Debug, Clone)]
pub struct DeviceMetrics {
    polls: Counter,
    timeouts: Counter,
    errors: [Counter; 5],
    request_seconds: Histogram,
    points_good: Gauge,
    points_bad: Gauge,
    payload_errors: Counter,
    /// Per exception code, created when first seen.
    exceptions: Option<(Family<Labels, Counter>, Labels)>,
    backoff_seconds: Gauge<f64, AtomicU64>,
    last_good_unix_ms: Arc<AtomicU64>,
    /// What the status shows beside the counters.
    diag: Arc<DeviceDiag>,
}

/// A device's numbers that are not Prometheus series: answered requests and their recent
/// latencies, exceptions by code, the backoff state.
#[derive(Debug, Default)]
struct DeviceDiag {
    answered: AtomicU64,
    latency: diag::LatencyRing,
    /// Held only to bump or copy (an exception is rare, and the map stays small).
    exceptions: Mutex<BTreeMap<u8, u64>>,
    /// While backed off: until when, Unix milliseconds (0: not backed off).
    backoff_until_unix_ms: AtomicU64,
    consecutive_failures: AtomicU32,
}

/// A copy of one device's request diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDiagnostics {
    /// Requests answered (a Modbus exception is an answer, but counts as failed).
    pub requests_ok: u64,
    /// Failed requests of every kind (timeout, exception, io, decode, crc).
    pub requests_failed: u64,
    pub timeouts: u64,
    pub crc_errors: u64,
    pub exceptions: BTreeMap<u8, u64>,
    /// The last answers' latencies (`None` before the first answer).
    pub latency: Option<diag::LatencySummary>,
    /// Link-level failures in a row (timeouts, broken frames, a link down).
    pub consecutive_failures: u32,
    /// While backed off: no request before this.
    pub backoff_until: Option<SystemTime>,
}

impl DeviceMetrics {
    /// A handle that records into no registry (tests, tools).
    pub fn detached() -> DeviceMetrics {
        DeviceMetrics {
            polls: Counter::default(),
            timeouts: Counter::default(),
            errors: Default::default(),
            request_seconds: request_histogram(),
            points_good: Gauge::default(),
            points_bad: Gauge::default(),
            payload_errors: Counter::default(),
            exceptions: None,
            backoff_seconds: Gauge::default(),
            last_good_unix_ms: Arc::default(),
            diag: Arc::default(),
        }
    }

    /// A poll cycle started.
    pub fn poll(&self) {
        self.polls.inc();
    }

    /// A request answered after `took`.
    pub fn request_ok(&self, took: Duration) {
        self.request_seconds.observe(took.as_secs_f64());
        self.diag.answered.fetch_add(1, Ordering::Relaxed);
        self.diag.latency.record(took);
    }

    /// A request failed; a timeout also counts in `device_timeouts_total`.
    pub fn request_failed(&self, kind: ErrorKind) {
        if kind == ErrorKind::Timeout {
            self.timeouts.inc();
        }
        self.errors[kind.index()].inc();
    }

    /// After a poll cycle: how many points read good and bad. Any good point makes this a
    /// good read for `device_seconds_since_good_read`.
    pub fn points(&self, good: usize, bad: usize) {
        self.points_good.set(good as i64);
        self.points_bad.set(bad as i64);
        if good > 0 {
            self.good_read_at(SystemTime::now());
        }
    }

    /// The device answered with Modbus exception `code` (also counted as an `exception`
    /// error).
    pub fn exception(&self, code: u8) {
        *lock(&self.diag.exceptions).entry(code).or_default() += 1;
        if let Some((family, labels)) = &self.exceptions {
            let mut labels = labels.clone();
            labels.push(("code", code.to_string()));
            family.get_or_create(&labels).inc();
        }
    }

    /// The device is backed off for `wait` (zero: it answers again).
    pub fn backoff(&self, wait: Duration) {
        self.backoff_seconds.set(wait.as_secs_f64());
        let until = if wait.is_zero() {
            0
        } else {
            unix_millis(SystemTime::now() + wait)
        };
        self.diag
            .backoff_until_unix_ms
            .store(until, Ordering::Relaxed);
    }

    /// Link-level failures in a row now (0: the device answers).
    pub fn consecutive_failures(&self, failures: u32) {
        self.diag
            .consecutive_failures
            .store(failures, Ordering::Relaxed);
    }

    /// A copy of the device's request diagnostics, for the status.
    pub fn diagnostics(&self) -> DeviceDiagnostics {
        let diag = &self.diag;
        let until = diag.backoff_until_unix_ms.load(Ordering::Relaxed);
        DeviceDiagnostics {
            requests_ok: diag.answered.load(Ordering::Relaxed),
            requests_failed: self.errors.iter().map(Counter::get).sum(),
            timeouts: self.timeouts.get(),
            crc_errors: self.errors[ErrorKind::index(ErrorKind::Frame)].get(),
            exceptions: lock(&diag.exceptions).clone(),
            latency: diag.latency.summary(),
            consecutive_failures: diag.consecutive_failures.load(Ordering::Relaxed),
            backoff_until: (until > 0)
                .then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(until)),
        }
    }

    /// The payload template failed on a reading.
    pub fn payload_error(&self) {
        self.payload_errors.inc();
    }

    fn good_read_at(&self, at: SystemTime) {
        self.last_good_unix_ms
            .store(unix_millis(at), Ordering::Relaxed);
    }
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or(0)
}

/// A std mutex a panicking holder left poisoned still holds usable counts.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One Modbus link's metrics (a serial line, or a TCP connection its units share). Cheap
/// to clone; every clone is the same link.
#[derive(Debug, Clone)]
pub struct BusMetrics {
    requests: Counter,
    errors: Counter,
    busy_seconds: Counter<f64, AtomicU64>,
    window: Arc<diag::BusyWindow>,
}

/// A copy of one link's counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BusDiagnostics {
    pub requests: u64,
    pub errors: u64,
    pub busy_seconds: f64,
    /// The fraction of the last minute the link was busy (0 to 1).
    pub utilisation: f64,
}

impl BusMetrics {
    /// A handle that records into no registry.
    pub fn detached() -> BusMetrics {
        BusMetrics {
            requests: Counter::default(),
            errors: Counter::default(),
            busy_seconds: Counter::default(),
            window: Arc::default(),
        }
    }

    /// One request on the link that kept it busy for `busy`, answered or not.
    pub fn request(&self, busy: Duration, failed: bool) {
        self.requests.inc();
        if failed {
            self.errors.inc();
        }
        self.busy_seconds.inc_by(busy.as_secs_f64());
        self.window.record(busy);
    }

    /// A copy of the link's counts and recent utilisation, for the status.
    pub fn diagnostics(&self) -> BusDiagnostics {
        BusDiagnostics {
            requests: self.requests.get(),
            errors: self.errors.get(),
            busy_seconds: self.busy_seconds.get(),
            utilisation: self.window.utilisation(),
        }
    }
}

/// One Modbus server's metrics: every series exists from the start, so recording is an
/// atomic add (the request path takes no lock).
#[derive(Debug, Clone)]
pub struct ModbusServerMetrics {
    open: Gauge,
    accepted: Counter,
    refused: Counter,
    /// Per [`SERVER_FUNCTIONS`], then `other`.
    requests: [Counter; SERVER_FUNCTIONS.len() + 1],
    /// Per [`SERVER_EXCEPTIONS`].
    exceptions: [Counter; SERVER_EXCEPTIONS.len()],
    writes_ok: Counter,
    writes_failed: Counter,
}

/// A copy of one Modbus server's counts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModbusServerDiagnostics {
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub requests: u64,
    /// Requests by function code (`other` for one it does not serve); only those seen.
    pub requests_by_function: BTreeMap<String, u64>,
    /// Exceptions answered, by code; only those seen.
    pub exceptions: BTreeMap<u8, u64>,
    pub writes_ok: u64,
    pub writes_failed: u64,
}

/// A client connection, counted as open until dropped.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ModbusServerMetrics {
    /// A handle that records into no registry.
    pub fn detached() -> ModbusServerMetrics {
        ModbusServerMetrics {
            open: Gauge::default(),
            accepted: Counter::default(),
            refused: Counter::default(),
            requests: Default::default(),
            exceptions: Default::default(),
            writes_ok: Counter::default(),
            writes_failed: Counter::default(),
        }
    }

    /// A client connected; it counts as open until the returned guard is dropped.
    pub fn connected(&self) -> OpenConnection {
        self.accepted.inc();
        self.open.inc();
        OpenConnection(self.open.clone())
    }

    /// A client was refused (`max_connections` open).
    pub fn refused(&self) {
        self.refused.inc();
    }

    /// A request with function code `function` arrived.
    pub fn request(&self, function: u8) {
        let index = SERVER_FUNCTIONS
            .iter()
            .position(|f| *f == function)
            .unwrap_or(SERVER_FUNCTIONS.len());
        self.requests[index].inc();
    }

    /// The server answered exception `code`.
    pub fn exception(&self, code: u8) {
        if let Some(index) = SERVER_EXCEPTIONS.iter().position(|c| *c == code) {
            self.exceptions[index].inc();
        }
    }

    /// A write request was carried out (`ok`) or refused.
    pub fn write(&self, ok: bool) {
        match ok {
            true => self.writes_ok.inc(),
            false => self.writes_failed.inc(),
        };
    }

    /// A copy of the server's counts, for the status.
    pub fn diagnostics(&self) -> ModbusServerDiagnostics {
        let mut requests_by_function = BTreeMap::new();
        for (index, counter) in self.requests.iter().enumerate() {
            let count = counter.get();
            if count > 0 {
                let function = SERVER_FUNCTIONS
                    .get(index)
                    .map_or_else(|| "other".to_owned(), u8::to_string);
                requests_by_function.insert(function, count);
            }
        }
        ModbusServerDiagnostics {
            connections_open: u64::try_from(self.open.get()).unwrap_or(0),
            connections_accepted: self.accepted.get(),
            connections_refused: self.refused.get(),
            requests: requests_by_function.values().sum(),
            requests_by_function,
            exceptions: SERVER_EXCEPTIONS
                .iter()
                .zip(&self.exceptions)
                .filter(|(_, counter)| counter.get() > 0)
                .map(|(code, counter)| (*code, counter.get()))
                .collect(),
            writes_ok: self.writes_ok.get(),
            writes_failed: self.writes_failed.get(),
        }
    }
}

/// One uplink's metrics: counters the link and sender bump, and a snapshot of its outbox
/// the status tick refreshes.
#[derive(Debug, Clone)]
pub struct UplinkMetrics {
    shared: Arc<snapshot::UplinkShared>,
}

impl UplinkMetrics {
    /// A handle that records into no registry.
    pub fn detached() -> UplinkMetrics {
        UplinkMetrics {
            shared: Arc::default(),
        }
    }

    /// The cloud connection came up (`reconnect`: not the first time this run).
    pub fn connected(&self, reconnect: bool) {
        self.shared.connected.store(1, Ordering::Relaxed);
        if reconnect {
            self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The cloud connection went down.
    pub fn disconnected(&self) {
        self.shared.connected.store(0, Ordering::Relaxed);
    }

    /// Messages published to the cloud (acknowledged or not yet).
    pub fn sent(&self, messages: u64) {
        self.shared.sent.fetch_add(messages, Ordering::Relaxed);
    }

    /// The outbox as of now; the drain rate is derived from successive snapshots.
    pub fn outbox(&self, snapshot: UplinkSnapshot) {
        if let Ok(mut state) = self.shared.outbox.lock() {
            state.update(snapshot, std::time::Instant::now());
        }
    }
}
