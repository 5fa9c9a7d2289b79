//! The serial line driver: devices that speak text or binary frames over RS-232, RS-485
//! or USB serial (GPS receivers, scales, weather sensors, barcode readers, debug ports).
//!
//! - [`config`]: the device keys, validated into [`SerialConfig`].
//! - [`framing`]: the byte stream cut into frames (delimiter, fixed length, start/end),
//!   bounded in memory, resynchronising after over-long or garbled frames.
//! - [`parse`]: a frame decoded (text or hex), its NMEA checksum checked, and the ordered
//!   rules whose named captures become typed JSON fields.
//! - `port`: the task that owns the port: opening with backoff (hot-plug), polling,
//!   write-back, status with counters.
//!
//! Topics: a rule's `topic` is the `{point}` of the device's topic template, so with the
//! default template `{gateway}/{device}/{point}` a rule with `topic = "gps/fix"` on device
//! `gps` of gateway `line1` publishes on `line1/gps/gps/fix`. Commands arrive on the
//! point `command` (`line1/gps/command/set`), results on `.../command/set/result`. See
//! `docs/serial.md`.

pub mod config;
pub mod framing;
pub mod parse;
mod port;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::{
    Checksum, Encoding, Field, FieldType, FlowControl, Framing, Parity, PortSettings, Rule,
    SerialConfig, WriteBack, COMMAND_POINT,
};
pub use framing::{FrameCodec, FrameEvent};
pub(crate) use port::open as open_port;

use super::DeviceContext;

/// Runs one serial device until shutdown. `poll` is the device's poll interval: how often
/// the `request` is sent in request/response mode (unused otherwise).
pub async fn run_device(
    config: SerialConfig,
    poll: Duration,
    context: DeviceContext,
    shutdown: CancellationToken,
) {
    port::run(config, poll, context, shutdown).await;
}
