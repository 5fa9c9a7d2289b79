//! The status as the API serves it: plain serde types copied out of the board, with times
//! in RFC 3339 (UTC) and ages in seconds.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::{BusEntry, ClientEntry, DeviceEntry, ErrorEntry, ModbusServerEntry, UplinkEntry};
use crate::metrics::diag::{LatencySummary, BUSY_WINDOW_S};

/// Everything `GET /api/v1/status` and `fieldmq status --json` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusSnapshot {
    pub gateway: GatewayView,
    pub devices: Vec<DeviceView>,
    /// Every Modbus link: a serial line, or a TCP address whose unit ids share one
    /// connection.
    pub buses: Vec<BusView>,
    pub modbus_servers: Vec<ModbusServerView>,
    pub uplinks: Vec<UplinkView>,
    pub clients: Vec<ClientView>,
    /// Newest first.
    pub errors: Vec<ErrorView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayView {
    pub id: String,
    pub version: String,
    pub config_file: String,
    pub data_dir: String,
    pub started_at: String,
    pub uptime_s: u64,
    /// Reload counts and the last reload's report (`succeeded`, `failed`, `last`); `null`
    /// when the gateway takes no live reloads.
    pub reloads: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    pub name: String,
    pub driver: String,
    /// `starting`, `online`, `offline` or `error`.
    pub state: String,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// A Modbus device's requests; `null` for other drivers.
    pub diagnostics: Option<DiagnosticsView>,
    pub points: Vec<PointView>,
}

/// One Modbus device's (one unit's) requests since start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiagnosticsView {
    /// Requests answered (an exception answer counts as failed instead).
    pub requests_ok: u64,
    /// Failed requests of every kind: timeouts, exceptions, I/O, CRC, undecodable answers.
    pub requests_failed: u64,
    pub timeouts: u64,
    pub crc_errors: u64,
    /// Exception answers by exception code (`"2": 5`).
    pub exceptions: BTreeMap<String, u64>,
    /// The last 64 answers' latencies; `null` before the first.
    pub latency: Option<LatencySummary>,
    /// Timeouts, broken frames or link failures in a row (0 while the device answers).
    pub consecutive_failures: u32,
    /// `null` unless the device is backed off now.
    pub backoff: Option<BackoffView>,
}

/// A failing device gets no request before `until`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackoffView {
    pub until: String,
    pub remaining_s: f64,
}

/// One Modbus link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BusView {
    /// The serial port or the TCP address.
    pub name: String,
    /// `rtu`, `tcp` or `rtu-over-tcp`.
    pub transport: String,
    pub devices: Vec<BusDeviceView>,
    pub requests: u64,
    pub errors: u64,
    pub busy_seconds: f64,
    /// The fraction of the last `utilisation_window_s` seconds (or of the time since the
    /// link started, when shorter) it was busy with a request, 0 to 1.
    pub utilisation: f64,
    pub utilisation_window_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BusDeviceView {
    pub name: String,
    pub unit: u8,
}

/// One Modbus TCP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModbusServerView {
    pub name: String,
    /// The bound address.
    pub bind: String,
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub requests: u64,
    /// Requests by function code (`"3"`, or `"other"` for one it does not serve).
    pub requests_by_function: BTreeMap<String, u64>,
    /// Exceptions answered, by exception code.
    pub exceptions: BTreeMap<String, u64>,
    pub writes_ok: u64,
    pub writes_failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointView {
    pub name: String,
    /// `null` before the first reading and after a bad one.
    pub value: Option<serde_json::Value>,
    /// `good`, `bad`, or `unknown` before the first reading.
    pub quality: String,
    /// Why the last reading was bad.
    pub error: Option<String>,
    pub timestamp: Option<String>,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkView {
    pub name: String,
    pub url: String,
    /// `connecting`, `connected`, `disconnected` or `stopped`.
    pub state: String,
    pub state_since: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub backlog_messages: u64,
    pub backlog_bytes: u64,
    /// Age of the oldest queued message now, seconds (0 when the queue is empty).
    pub oldest_age_s: u64,
    pub dropped_total: u64,
    pub acked_total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientView {
    pub client_id: String,
    pub remote_address: String,
    /// `3.1.1` or `5`.
    pub protocol: String,
    /// The broker listener's bound address.
    pub listener: String,
    pub connected_since: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorView {
    /// The last time it happened.
    pub at: String,
    /// `device <name>`, `uplink <name>`, `gateway`.
    pub source: String,
    pub text: String,
    /// How many times in a row (a repeated error counts instead of filling the list).
    pub count: u64,
    pub first_at: String,
}

/// RFC 3339 in UTC, to the millisecond.
pub(super) fn rfc3339(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    let millis = at.replace_nanosecond(at.millisecond() as u32 * 1_000_000);
    millis
        .unwrap_or(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

pub(super) fn device(name: String, entry: DeviceEntry) -> DeviceView {
    let (last_error, last_error_at) = split_error(entry.last_error);
    let now = SystemTime::now();
    DeviceView {
        name,
        driver: entry.driver,
        state: entry.state.as_str().to_owned(),
        last_error,
        last_error_at,
        diagnostics: entry.diagnostics.map(|metrics| {
            let d = metrics.diagnostics();
            DiagnosticsView {
                requests_ok: d.requests_ok,
                requests_failed: d.requests_failed,
                timeouts: d.timeouts,
                crc_errors: d.crc_errors,
                exceptions: codes(&d.exceptions),
                latency: d.latency,
                consecutive_failures: d.consecutive_failures,
                backoff: d.backoff_until.and_then(|until| {
                    let remaining = until.duration_since(now).ok()?;
                    Some(BackoffView {
                        until: rfc3339(until),
                        remaining_s: (remaining.as_secs_f64() * 1000.0).round() / 1000.0,
                    })
                }),
            }
        }),
        points: entry
            .points
            .into_iter()
            .map(|(name, point)| {
                let (quality, error) = match point.quality {
                    None => ("unknown", None),
                    Some(None) => ("good", None),
                    Some(Some(reason)) => ("bad", Some(reason)),
                };
                PointView {
                    name,
                    value: point.value,
                    quality: quality.to_owned(),
                    error,
                    timestamp: point.at.map(rfc3339),
                    unit: point.unit,
                }
            })
            .collect(),
    }
}

fn codes(counts: &BTreeMap<u8, u64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .map(|(code, count)| (code.to_string(), *count))
        .collect()
}

pub(super) fn bus(name: String, transport: String, entry: &BusEntry) -> BusView {
    let d = entry.metrics.diagnostics();
    BusView {
        name,
        transport,
        devices: entry
            .devices
            .iter()
            .map(|(name, unit)| BusDeviceView {
                name: name.clone(),
                unit: *unit,
            })
            .collect(),
        requests: d.requests,
        errors: d.errors,
        busy_seconds: (d.busy_seconds * 1000.0).round() / 1000.0,
        utilisation: d.utilisation,
        utilisation_window_s: BUSY_WINDOW_S,
    }
}

pub(super) fn modbus_server(entry: &ModbusServerEntry) -> ModbusServerView {
    let d = entry.metrics.diagnostics();
    ModbusServerView {
        name: entry.name.clone(),
        bind: entry.bind.to_string(),
        connections_open: d.connections_open,
        connections_accepted: d.connections_accepted,
        connections_refused: d.connections_refused,
        requests: d.requests,
        requests_by_function: d.requests_by_function,
        exceptions: codes(&d.exceptions),
        writes_ok: d.writes_ok,
        writes_failed: d.writes_failed,
    }
}

pub(super) fn uplink(name: String, entry: UplinkEntry, now: SystemTime) -> UplinkView {
    let (last_error, last_error_at) = split_error(entry.last_error);
    let since_count = entry
        .counted_at
        .and_then(|at| now.duration_since(at).ok())
        .map_or(0, |d| d.as_secs());
    let backlog = entry.backlog;
    UplinkView {
        name,
        url: entry.url,
        state: entry.state.as_str().to_owned(),
        state_since: entry.since.map(rfc3339),
        last_error,
        last_error_at,
        backlog_messages: backlog.messages,
        backlog_bytes: backlog.bytes,
        oldest_age_s: if backlog.messages == 0 {
            0
        } else {
            backlog.oldest_age_s + since_count
        },
        dropped_total: backlog.dropped_total,
        acked_total: backlog.acked_total,
    }
}

pub(super) fn client(entry: &ClientEntry) -> ClientView {
    ClientView {
        client_id: entry.client_id.to_string(),
        remote_address: entry.remote.to_string(),
        protocol: entry.protocol.as_str().to_owned(),
        listener: entry.listener.to_string(),
        connected_since: rfc3339(entry.since),
    }
}

pub(super) fn error(entry: &ErrorEntry) -> ErrorView {
    ErrorView {
        at: rfc3339(entry.last),
        source: entry.source.to_string(),
        text: entry.text.clone(),
        count: entry.count,
        first_at: rfc3339(entry.first),
    }
}

fn split_error(error: Option<(String, SystemTime)>) -> (Option<String>, Option<String>) {
    match error {
        Some((text, at)) => (Some(text), Some(rfc3339(at))),
        None => (None, None),
    }
}
