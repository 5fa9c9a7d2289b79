//! `fieldmq-bench`: the gateway's benchmarks, side by side with Mosquitto where it has an
//! equivalent.
//!
//! ```text
//! cargo build --release && cargo build --release -p fieldmq-bench
//! target/release/fieldmq-bench broker --target both --messages 100000 --qos both
//! ```
//!
//! `broker`, `durable`, `memory` and `retained` start fieldmq's release binary and Mosquitto
//! on free 127.0.0.1 ports and load both with the same rumqttc clients from this process
//! (`sparkplug` starts the release binary behind a Mosquitto cloud);
//! `uplink`, `modbus`, `modbus-server`, `metrics` and `reload` run the gateway's library in
//! this process; `disk`
//! and `wake` measure the machine alone. Method and current figures: docs/benchmarks.md.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod broker;
mod client;
mod disk;
mod durable;
mod launch;
mod memory;
mod metrics;
mod modbus;
mod modbus_server;
mod proc;
mod queue;
mod reload;
mod retained;
mod sparkplug;
mod stats;
mod uplink;
mod wake;

#[derive(Parser, Debug)]
#[command(
    name = "fieldmq-bench",
    about = "Benchmarks of the fieldmq gateway, side by side with Mosquitto"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Publish/subscribe throughput and latency, fieldmq and/or Mosquitto back to back.
    Broker(broker::BrokerArgs),
    /// QoS 1 into the queue of an offline persistent subscriber, then drained on reconnect.
    Durable(durable::DurableArgs),
    /// Broker RSS with idle clients and with many messages queued for an offline subscriber.
    Memory(memory::MemoryArgs),
    /// Time for a new `#` subscriber to receive N retained messages, and broker RSS meanwhile.
    Retained(retained::RetainedArgs),
    /// What a synced commit costs on a disk (wall time and CPU): what `durability = "sync"`
    /// waits for on every acknowledged publish.
    Disk(disk::DiskArgs),
    /// What a wake-up between two threads costs here, after idle gaps (no broker): on a VM,
    /// what waking a halted virtual CPU adds to every `sync` commit.
    Wake(wake::WakeArgs),
    /// The uplink's store-and-forward path: outbox append, memory with the cloud down, drain,
    /// and end to end against a Mosquitto bridge.
    Uplink(uplink::UplinkArgs),
    /// `GET /metrics` on a gateway with 100 simulated devices of 50 points: median and p99.
    Metrics(metrics::MetricsArgs),
    /// The Modbus TCP driver polling a simulated device: values/s, delay to a subscriber, CPU.
    Modbus(modbus::ModbusArgs),
    /// The Modbus TCP server for SCADA: requests/s and p99 latency beside a bare tokio-modbus
    /// server, with a tokio-modbus or pymodbus client.
    ModbusServer(modbus_server::ModbusServerArgs),
    /// Live reload, request to report: a file that did not change, and one device changed.
    Reload(reload::ReloadArgs),
    /// The Sparkplug B edge node: DDATA messages/s to a Mosquitto and the gateway's CPU time
    /// per 1,000 metrics.
    Sparkplug(sparkplug::SparkplugArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Only the benches that need one get a runtime: `disk` and `wake` time threads of their
    // own, and `modbus` builds its runtimes itself to tell the device's CPU time apart.
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")
    };
    match cli.command {
        Cmd::Broker(args) => runtime()?.block_on(broker::run(args)),
        Cmd::Durable(args) => runtime()?.block_on(durable::run(args)),
        Cmd::Memory(args) => runtime()?.block_on(memory::run(args)),
        Cmd::Retained(args) => runtime()?.block_on(retained::run(&args)),
        Cmd::Uplink(args) => runtime()?.block_on(uplink::run(&args)),
        Cmd::Metrics(args) => runtime()?.block_on(metrics::run(&args)),
        Cmd::Disk(args) => disk::run(&args),
        Cmd::Wake(args) => wake::run(&args),
        Cmd::Modbus(args) => modbus::run(&args),
        Cmd::ModbusServer(args) => runtime()?.block_on(modbus_server::run(&args)),
        Cmd::Reload(args) => runtime()?.block_on(reload::run(&args)),
        Cmd::Sparkplug(args) => runtime()?.block_on(sparkplug::run(&args)),
    }
}
