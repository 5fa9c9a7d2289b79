//! The status as the API serves it: plain serde types copied out of the board, with times
//! in RFC 3339 (UTC) and ages in seconds.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{ClientEntry, DeviceEntry, ErrorEntry, UplinkEntry};

/// Everything `GET /api/v1/status` and `fieldmq status --json` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusSnapshot {
    pub gateway: GatewayView,
    pub devices: Vec<DeviceView>,
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
    pub points: Vec<PointView>,
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
    DeviceView {
        name,
        driver: entry.driver,
        state: entry.state.as_str().to_owned(),
        last_error,
        last_error_at,
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
