//! Every SQLite file of the gateway: the broker's durable sessions and retained messages
//! ([`sessions`]) and each uplink's outbox ([`outbox`]).

pub mod backup;
pub mod outbox;
pub(crate) mod sessions;

pub use outbox::{
    ack_mark_path, AckMark, AppendReport, DropCounters, DropReason, Outbox, OutboxRecord,
    OutboxStats, StoreError, StoredMessage,
};
