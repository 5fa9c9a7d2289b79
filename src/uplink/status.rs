//! The retained status of an uplink on the local broker.

use std::time::SystemTime;

use serde::Serialize;

use crate::store::OutboxStats;

/// Published retained as JSON at `<gateway status topic>/uplinks/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UplinkStatus {
    pub uplink: String,
    pub connected: bool,
    /// Rows in the outbox (including rows in flight).
    pub queue_depth: u64,
    pub queue_bytes: u64,
    /// Age of the oldest queued message (backlog age), seconds.
    pub oldest_age_s: u64,
    pub dropped: DroppedStatus,
    /// Sum of `dropped`.
    pub dropped_total: u64,
    /// Rows acknowledged by the cloud since the outbox file was created.
    pub acked_total: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DroppedStatus {
    /// `when_full = drop_oldest`.
    pub oldest: u64,
    /// `when_full = drop_new`, or a message larger than `max_bytes`.
    pub new: u64,
    /// Older than `max_age` or past its MQTT 5 message expiry.
    pub expired: u64,
    /// Refused by the cloud (PUBACK reason code) or larger than its maximum packet size.
    pub rejected: u64,
    /// QoS 0 `durable = false` messages dropped while disconnected or busy (this run only).
    pub not_durable: u64,
}

impl UplinkStatus {
    pub(super) fn new(
        uplink: &str,
        connected: bool,
        stats: &OutboxStats,
        not_durable: u64,
        last_error: Option<String>,
    ) -> UplinkStatus {
        let dropped = DroppedStatus {
            oldest: stats.dropped.oldest,
            new: stats.dropped.new,
            expired: stats.dropped.expired,
            rejected: stats.dropped.rejected,
            not_durable,
        };
        UplinkStatus {
            uplink: uplink.to_string(),
            connected,
            queue_depth: stats.depth,
            queue_bytes: stats.bytes,
            oldest_age_s: stats.oldest_age(SystemTime::now()).as_secs(),
            dropped,
            dropped_total: stats.dropped.total() + not_durable,
            acked_total: stats.acked,
            last_error,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}
