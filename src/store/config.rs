//! The durability setting: what the broker's store keeps on disk, and when a publisher is
//! acknowledged. Chosen in the `[broker]` table (`durability = "sync"`).

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
