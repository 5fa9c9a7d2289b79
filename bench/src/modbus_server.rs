//! `fieldmq-bench modbus-server`: the Modbus TCP server's requests per second and latency,
//! measured with an independent client (tokio-modbus' TCP client).
//!
//! ```text
//! fieldmq-bench modbus-server --seconds 10 --clients 4 --registers 100
//! ```
//!
//! The gateway runs in this process from its library: one simulated device with
//! `registers / 2` constant points, served by a `[[modbus_servers]]` entry as consecutive
//! f32 holding registers. Each client holds one connection and reads the whole block
//! (FC03) in a closed loop: a request goes out when the previous answer arrived. Printed:
//! requests per second over all clients, and the request-to-answer latency at p50, p99 and
//! max, after one second of warm-up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio_modbus::client::Reader as _;
use tokio_util::sync::CancellationToken;

use crate::stats::{per_sec, Latencies};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ModbusServerArgs {
    /// Measured seconds (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Clients, each on its own connection.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Registers per read (even, 2 to 124: f32 values).
    #[arg(long, default_value_t = 100)]
    registers: u16,
}

pub(crate) async fn run(args: &ModbusServerArgs) -> Result<()> {
    if args.registers < 2 || args.registers > 124 || args.registers % 2 != 0 {
        bail!("--registers must be even, 2 to 124");
    }
    if args.clients == 0 || args.clients > 64 {
        bail!("--clients must be 1 to 64");
    }
    let points = args.registers / 2;
    let dir = std::env::temp_dir().join(format!(
        "fieldmq-bench-modbus-server-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let mut text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[broker]\nallow_anonymous = true\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\
         [[devices]]\nname = \"sim\"\ndriver = \"simulated\"\npoll = \"1s\"\npoints = [\n",
        dir.join("data").display()
    );
    for i in 0..points {
        text.push_str(&format!(
            "  {{ name = \"p{i}\", waveform = \"constant\", value = {}.5 }},\n",
            20 + i
        ));
    }
    text.push_str(&format!(
        "]\n[[modbus_servers]]\nbind = \"127.0.0.1:0\"\nmax_connections = {}\nmap = [\n",
        args.clients + 1
    ));
    for i in 0..points {
        text.push_str(&format!(
            "  {{ table = \"holding\", address = {}, device = \"sim\", point = \"p{i}\", type = \"f32\" }},\n",
            i * 2
        ));
    }
    text.push_str("]\n");
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, &text)?;
    let config = fieldmq::service::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let shutdown = CancellationToken::new();
    let gateway = fieldmq::service::start(config, shutdown.clone())
        .await
        .context("the gateway did not start")?;
    let addr = gateway
        .listeners
        .iter()
        .find(|l| l.service == "Modbus")
        .map(|l| l.addr)
        .context("no Modbus server address")?;

    // Wait (5 s at most) until every value is known.
    let mut probe = tokio_modbus::client::tcp::connect(addr).await?;
    let ready_by = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Ok(Ok(_))) = tokio::time::timeout(
            Duration::from_secs(1),
            probe.read_holding_registers(0, args.registers),
        )
        .await
        {
            break;
        }
        if Instant::now() > ready_by {
            bail!("the server never served the simulated values");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(probe);

    let warmup_end = Instant::now() + Duration::from_secs(1);
    let end = warmup_end + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(addr, args.registers, warmup_end, end)))
        .collect();
    let mut latencies = Latencies::new();
    let mut errors = 0;
    for task in tasks {
        let (one, errs) = task.await??;
        latencies.merge(&one);
        errors += errs;
    }
    shutdown.cancel();
    gateway.stop().await;
    let _ = std::fs::remove_dir_all(&dir);

    let requests = latencies.len();
    println!(
        "modbus server: {} client(s), FC03 of {} registers ({} f32 values) per request",
        args.clients, args.registers, points
    );
    println!(
        "requests: {requests} in {}s = {:.0} requests/s, {errors} error(s)",
        args.seconds,
        per_sec(requests, Duration::from_secs(args.seconds))
    );
    let ms = |us: Option<u64>| us.map_or(0.0, |us| us as f64 / 1000.0);
    println!(
        "latency: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(latencies.percentile(50.0)),
        ms(latencies.percentile(99.0)),
        ms(latencies.max())
    );
    Ok(())
}

/// One client's closed loop: latencies of the answers after `warmup_end`, and errors.
async fn client(
    addr: SocketAddr,
    registers: u16,
    warmup_end: Instant,
    end: Instant,
) -> Result<(Latencies, u64)> {
    let mut context = tokio_modbus::client::tcp::connect(addr).await?;
    let mut latencies = Latencies::new();
    let mut errors = 0;
    // Bounded by `end`.
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            context.read_holding_registers(0, registers),
        )
        .await;
        let done = Instant::now();
        match answer {
            Ok(Ok(Ok(words))) if words.len() == usize::from(registers) => {
                if sent >= warmup_end {
                    latencies.record(done - sent);
                }
            }
            _ => errors += 1,
        }
    }
    Ok((latencies, errors))
}
