//! The Modbus driver: Modbus TCP and Modbus RTU devices polled through tokio-modbus.
//!
//! - [`config`]: the device and point keys, validated into [`ModbusConfig`].
//! - [`codec`]: registers to typed values and back, in every byte/word order.
//! - [`plan`]: points merged into as few read requests as the limits allow.
//! - `report`: which readings are published (deadband, min interval, heartbeat).
//! - `bus`: the task that owns a connection (a TCP socket, or a serial port shared by
//!   every RTU device on it), serialises its transactions and handles writes.
//! - [`probe`]: `fieldmq probe`, every interpretation of a register range.
//! - [`sunspec`]: SunSpec model discovery and decoding, for `profile = "sunspec"`.
//!
//! Devices are grouped into buses with [`device_tasks`]: one bus per TCP address (devices
//! at different addresses poll concurrently; the unit ids behind one Modbus TCP gateway or
//! serial device server share its connection, one request at a time) and one per serial
//! port.

mod bus;
pub mod codec;
pub mod config;
pub mod plan;
pub mod probe;
pub mod profile;
mod report;
pub mod sunspec;

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use tokio_util::sync::CancellationToken;

pub use bus::exception_name;
pub use config::{
    DataType, Deadband, ModbusConfig, Order, Parity, PlanLimits, Point, Report, SerialSettings,
    Table, Transport,
};

use super::DeviceContext;
use crate::drivers::config::{DeviceConfig, DriverConfig};
use bus::{Bus, BusDevice, Link};

/// Runs one Modbus device on a link of its own until shutdown. Several RTU devices on one
/// serial port must share a bus instead: start them with [`device_tasks`].
pub async fn run_device(
    config: ModbusConfig,
    device: &DeviceConfig,
    context: DeviceContext,
    shutdown: CancellationToken,
) {
    let link = Link::of(&config.transport);
    let bus = Bus::new(
        link,
        vec![BusDevice {
            config,
            poll: device.poll,
            context,
        }],
    );
    bus.run(shutdown).await;
}

/// The tasks that run every Modbus device in `devices` (others are ignored): one per TCP
/// address (and framing) with all its devices, one per serial port with all its RTU
/// devices. Spawn each, e.g. into the service's `JoinSet`; each ends after `shutdown` is
/// cancelled.
pub fn device_tasks(
    devices: Vec<(DeviceConfig, DeviceContext)>,
    shutdown: CancellationToken,
) -> Vec<BoxFuture<'static, ()>> {
    let mut serial: BTreeMap<String, (SerialSettings, Vec<BusDevice>)> = BTreeMap::new();
    let mut tcp: BTreeMap<(&'static str, String), (Link, Vec<BusDevice>)> = BTreeMap::new();
    let mut tasks = Vec::new();
    for (device, context) in devices {
        let DriverConfig::Modbus(config) = device.driver else {
            continue;
        };
        let bus_device = BusDevice {
            poll: device.poll,
            context,
            config,
        };
        match bus_device.config.transport.clone() {
            transport @ (Transport::Tcp { .. } | Transport::RtuOverTcp { .. }) => {
                let key = (
                    transport.describe(),
                    transport.tcp_address().unwrap_or_default().to_owned(),
                );
                let entry = tcp
                    .entry(key)
                    .or_insert_with(|| (Link::of(&transport), Vec::new()));
                warn_shared_unit(&entry.1, &bus_device, "at one address");
                entry.1.push(bus_device);
            }
            Transport::Rtu(settings) => {
                let entry = serial
                    .entry(settings.path.clone())
                    .or_insert_with(|| (settings.clone(), Vec::new()));
                if entry.0 != settings {
                    tracing::warn!(
                        device = %device.name,
                        port = %settings.path,
                        "serial settings differ from the first device on this port; the port uses the first device's"
                    );
                }
                warn_shared_unit(&entry.1, &bus_device, "on one serial port");
                entry.1.push(bus_device);
            }
        }
    }
    for (_, (link, devices)) in tcp {
        tasks.push(Bus::new(link, devices).run(shutdown.clone()).boxed());
    }
    for (_, (settings, devices)) in serial {
        let bus = Bus::new(Link::Rtu(settings), devices);
        tasks.push(bus.run(shutdown.clone()).boxed());
    }
    tasks
}

/// Warns when `new` has the unit id of a device already on its link (`place` says which).
fn warn_shared_unit(on_link: &[BusDevice], new: &BusDevice, place: &str) {
    if let Some(other) = on_link.iter().find(|d| d.config.unit == new.config.unit) {
        tracing::warn!(
            device = %new.context.device,
            other = %other.context.device,
            unit = new.config.unit,
            "two devices with the same unit id {place}"
        );
    }
}

/// Read requests per poll cycle for one device, as planned at start.
pub fn planned_requests(config: &ModbusConfig, poll: std::time::Duration) -> usize {
    plan::plan(&config.points, poll, &config.limits).len()
}
