//! fieldmq: an edge gateway.
//!
//! ```text
//!  Modbus RTU/TCP ─┐                                  ┌─ LAN clients (TCP, WS, TLS)
//!  serial lines ───┤ drivers ── publish ──► broker (router) ◄──┘
//!  simulated ──────┘    ▲                        │  ▲
//!                       └── <point>/set ◄────────┘  │ commands from the cloud
//!                                                │  │
//!                             egress routes ◄────┘  │
//!                                   ▼               │
//!                       store (SQLite outbox)       │
//!                                   ▼               │
//!                           uplink (rumqttc) ───────┴──► cloud broker(s)
//! ```
//!
//! - [`config`]: the TOML document and its diagnostics; each part validates its own
//!   section (`broker::config`, `drivers::config`, `uplink::config`), and
//!   [`service::config`] assembles the whole file.
//! - [`model`]: messages, readings, values, write requests.
//! - [`broker`]: the embedded MQTT broker; drivers and uplinks reach it only through the
//!   in-process bus, [`broker::bus::BrokerHandle`].
//! - [`mqtt`]: topic rules and the translation to and from rumqttc's packet types.
//! - [`drivers`]: device drivers; a register or frame becomes a [`model::Reading`] and then
//!   a [`model::Message`] in [`drivers::DeviceContext::publish_sample`], its payload
//!   encoded by [`drivers::payload`].
//! - [`homeassistant`]: Home Assistant MQTT discovery, announcing the devices' points.
//! - [`http`]: the HTTP listener (`/metrics`, the API); [`metrics`]: the registry parts
//!   record into.
//! - [`status`]: the live picture of the gateway that the status API, the status page and
//!   `fieldmq status` show; the parts write into it through handles.
//! - [`service`]: wiring, signals, shutdown.

mod backoff;
pub mod broker;
pub mod cli;
pub mod config;
pub mod drivers;
pub mod essential;
pub mod homeassistant;
pub mod http;
pub mod metrics;
pub mod modbus_server;
pub mod model;
pub mod mqtt;
pub mod pem;
pub mod reload;
pub mod service;
pub mod status;
pub mod store;
pub mod uplink;

/// Entry points for the fuzz targets in `fuzz/` (docs/fuzzing.md): re-exports of internal
/// decoders, built only with the `fuzzing` feature. Not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::broker::protocol::{fuzz_check, fuzz_read, fuzz_read_connect, FuzzRead};
    pub use crate::store::properties::fuzz_decode_properties;
    pub use crate::store::sessions::fuzz_store_row;
}
