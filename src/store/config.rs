//! The stores' settings: the broker store's durability (what it keeps on disk, and when a
//! publisher is acknowledged; `[broker] durability`) and the bounds of an uplink's outbox
//! (`[[uplinks]] queue`), with their defaults and the validation of the `queue` table.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{closest, Checker, RawSize, S};

const DEFAULT_QUEUE_MESSAGES: u64 = 1_000_000;
const DEFAULT_QUEUE_BYTES: u64 = 256 * 1024 * 1024;
const DEFAULT_QUEUE_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

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

/// The names `durability` accepts in the configuration file.
pub(crate) const DURABILITIES: &[(&str, Durability)] = &[
    ("sync", Durability::Sync),
    ("batched", Durability::Batched),
    ("memory", Durability::Memory),
];

/// The bounds of an outbox and what happens when one is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// Default 1,000,000.
    pub max_messages: u64,
    /// Default 256 MiB.
    pub max_bytes: u64,
    /// Default 7 days.
    pub max_age: Duration,
    pub when_full: WhenFull,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_messages: DEFAULT_QUEUE_MESSAGES,
            max_bytes: DEFAULT_QUEUE_BYTES,
            max_age: DEFAULT_QUEUE_AGE,
            when_full: WhenFull::DropOldest,
        }
    }
}

/// What an outbox does with a new message when a bound is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    DropOldest,
    DropNew,
}

/// An uplink's `queue` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub(crate) max_messages: Option<S<i64>>,
    pub(crate) max_bytes: Option<S<RawSize>>,
    pub(crate) max_age: Option<S<String>>,
    pub(crate) when_full: Option<S<String>>,
}

impl Checker<'_> {
    /// The outbox bounds of an uplink's `queue` table at `prefix`, defaults for what it
    /// leaves out.
    pub(crate) fn outbox_queue(&mut self, raw: &Option<S<RawQueue>>, prefix: &str) -> QueueConfig {
        let mut queue = QueueConfig::default();
        let Some(raw) = raw else {
            return queue;
        };
        let raw = raw.get_ref();
        queue.max_messages = self.integer(
            &raw.max_messages,
            &format!("{prefix}.max_messages"),
            1,
            i64::MAX,
            DEFAULT_QUEUE_MESSAGES as i64,
        ) as u64;
        if let Some(bytes) = &raw.max_bytes {
            queue.max_bytes = self
                .size(bytes, &format!("{prefix}.max_bytes"))
                .unwrap_or(DEFAULT_QUEUE_BYTES);
        }
        queue.max_age = self.positive_duration(
            &raw.max_age,
            &format!("{prefix}.max_age"),
            DEFAULT_QUEUE_AGE,
        );
        if let Some(when_full) = &raw.when_full {
            queue.when_full = match when_full.get_ref().as_str() {
                "drop_oldest" => WhenFull::DropOldest,
                "drop_new" => WhenFull::DropNew,
                other => {
                    let diagnostic = self.d.error(
                        Some(when_full.span()),
                        format!("{prefix}.when_full"),
                        format!("unknown policy {other:?}, expected drop_oldest or drop_new"),
                    );
                    if let Some(close) = closest(other, &["drop_oldest", "drop_new"]) {
                        diagnostic.hint = Some(format!("did you mean `{close}`?"));
                    }
                    WhenFull::DropOldest
                }
            };
        }
        queue
    }
}
