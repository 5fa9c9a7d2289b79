//! The gateway's Prometheus metrics: the one registry and the metric families every part
//! records into. A leaf: it knows no part. The service builds one [`Metrics`] and hands each
//! part a small typed handle with its labels already bound ([`DeviceMetrics`],
//! [`RtuBusMetrics`], [`UplinkMetrics`]); recording is an atomic add, no lock and no
//! allocation. Values a part already counts elsewhere (the broker's router statistics,
//! the reload history) are copied in at scrape time as snapshots ([`BrokerSnapshot`],
//! [`Metrics::set_reloads`]) instead of being counted twice.
//!
//! Every name starts with `fieldmq_`; counters end in `_total`; units are seconds and
//! bytes. `GET /metrics` (`src/http/`) encodes [`Metrics::encode`] as OpenMetrics text, or
//! the Prometheus text format for a client that does not ask for OpenMetrics.

mod process;
mod snapshot;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
    rtu_bus: RtuBusFamilies,
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
struct RtuBusFamilies {
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    busy_seconds: Family<Labels, Counter<f64, AtomicU64>>,
}

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
        let rtu_bus = RtuBusFamilies {
            requests: Family::default(),
            errors: Family::default(),
            busy_seconds: Family::default(),
        };
        registry.register(
            "rtu_bus_requests",
            "Requests sent on a shared Modbus RTU line",
            rtu_bus.requests.clone(),
        );
        registry.register(
            "rtu_bus_errors",
            "Failed requests on a shared Modbus RTU line",
            rtu_bus.errors.clone(),
        );
        registry.register(
            "rtu_bus_busy_seconds",
            "Time the line was busy with a request; its rate is the line's utilisation (0 to 1)",
            rtu_bus.busy_seconds.clone(),
        );
        let scraped = Arc::new(snapshot::Scraped::default());
        registry.register_collector(Box::new(scraped.clone()));
        registry.register_collector(Box::new(process::ProcessCollector::new()));
        Metrics {
            registry,
            device,
            rtu_bus,
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

    /// The handle one shared RTU line records into (`bus` label: its serial port).
    pub fn rtu_bus(&self, port: &str) -> RtuBusMetrics {
        let labels: Labels = vec![("bus", port.to_owned())];
        RtuBusMetrics {
            requests: self.rtu_bus.requests.get_or_create_owned(&labels),
            errors: self.rtu_bus.errors.get_or_create_owned(&labels),
            busy_seconds: self.rtu_bus.busy_seconds.get_or_create_owned(&labels),
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
        }
    }

    /// A poll cycle started.
    pub fn poll(&self) {
        self.polls.inc();
    }

    /// A request answered after `took`.
    pub fn request_ok(&self, took: Duration) {
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// A request failed; a timeout also counts in `device_timeouts_total`.
    pub fn request_failed(&self, kind: ErrorKind) {
        if kind == ErrorKind::Timeout {
            self.timeouts.inc();
        }
        let index = ErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default();
        self.errors[index].inc();
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
        if let Some((family, labels)) = &self.exceptions {
            let mut labels = labels.clone();
            labels.push(("code", code.to_string()));
            family.get_or_create(&labels).inc();
        }
    }

    /// The device is backed off for `wait` (zero: it answers again).
    pub fn backoff(&self, wait: Duration) {
        self.backoff_seconds.set(wait.as_secs_f64());
    }

    /// The payload template failed on a reading.
    pub fn payload_error(&self) {
        self.payload_errors.inc();
    }

    fn good_read_at(&self, at: SystemTime) {
        let millis = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|since| since.as_millis() as u64)
            .unwrap_or(0);
        self.last_good_unix_ms.store(millis, Ordering::Relaxed);
    }
}

/// One shared RTU line's metrics.
#[derive(Debug, Clone)]
pub struct RtuBusMetrics {
    requests: Counter,
    errors: Counter,
    busy_seconds: Counter<f64, AtomicU64>,
}

impl RtuBusMetrics {
    /// A handle that records into no registry.
    pub fn detached() -> RtuBusMetrics {
        RtuBusMetrics {
            requests: Counter::default(),
            errors: Counter::default(),
            busy_seconds: Counter::default(),
        }
    }

    /// One request on the line that kept it busy for `busy`, answered or not.
    pub fn request(&self, busy: Duration, failed: bool) {
        self.requests.inc();
        if failed {
            self.errors.inc();
        }
        self.busy_seconds.inc_by(busy.as_secs_f64());
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
