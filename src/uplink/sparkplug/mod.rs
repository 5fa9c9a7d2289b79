//! Sparkplug B 3.0 edge node: an uplink with a `[uplinks.sparkplug]` table speaks Sparkplug
//! to its cloud broker instead of bridging topics.
//!
//! ```text
//!  bus: point readings, device status ──ingest──► outbox (rows as read on the bus)
//!                         │ latest values                │
//!                         ▼                              ▼
//!                      Latest ──births──► sender: NBIRTH, DBIRTH, then each row as
//!                                         DDATA / DDEATH / DBIRTH (seq, aliases,
//!                                         is_historical) ──► cloud
//!  bus: <point>/set ◄── inbound: DCMD ◄─── cloud: NCMD, DCMD, STATE/<primary host>
//! ```
//!
//! The pieces: [`proto`] (the payload schema), [`topic`] (the topic layout), [`bdseq`] (the
//! persisted birth/death sequence), [`convert`] (values between the bus and metrics),
//! [`config`] (the table) and [`node`] (the node's shape and session). The uplink's link,
//! outbox and sender carry it: the outbox holds what the bus gave, the sender turns each
//! row into a Sparkplug message as it sends it, and holds rows back while the primary host
//! is offline (store and forward). The uplink sees the devices only through the bus: the
//! shape of each device (its points, datatypes and units) comes from the configuration and
//! the point sets devices announced (`service/sparkplug.rs`); a new shape is a new uplink.

pub mod bdseq;
pub mod config;
pub mod convert;
pub mod node;
pub mod proto;
pub mod topic;

pub use config::{SparkplugConfig, SparkplugDevice, SparkplugPoint};
pub use node::{decode_inbound, Inbound, InboundError, Shape};
