//! `modbus-bench`: the Modbus driver's throughput and latency.
//!
//! ```text
//! cargo run --release --bin modbus-bench -- --seconds 10
//! ```
//!
//! A tokio-modbus TCP server (on its own thread and runtime) holds 1,000 holding
//! registers; one `modbus-tcp` device maps them to 500 f32 points and polls them 10 times a
//! second with `report = "always"`, so every value of every poll is published on the
//! embedded broker, where an in-process subscriber receives them. Printed: read requests
//! per poll cycle, values per second delivered, the delay from the start of a poll cycle
//! (the server receiving its first request) to the subscriber's receipt at p50/p99, and
//! the gateway's CPU seconds per 100,000 values (process CPU time from /proc minus the
//! server thread's).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use fieldmq::broker::config::BrokerConfig;
use fieldmq::broker::{self, InternalSubscribeOptions};
use fieldmq::drivers::config::DriverConfig;
use fieldmq::drivers::{self, DeviceContext};
use fieldmq::model::QoS;
use fieldmq::service::config;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "modbus-bench",
    about = "Throughput and latency of fieldmq's Modbus driver"
)]
struct Args {
    /// Measured seconds (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// f32 points (two registers each).
    #[arg(long, default_value_t = 500)]
    points: u16,
    /// Poll interval.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    poll: Duration,
}

/// The device: registers, and when each poll cycle's first request arrived.
#[derive(Default)]
struct Device {
    registers: Vec<u16>,
    requests: u64,
    cycle_starts: Vec<Instant>,
}

#[derive(Clone)]
struct Service(Arc<Mutex<Device>>);

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let now = Instant::now();
        let answer = match self.0.lock() {
            Ok(mut device) => match request.request {
                Request::ReadHoldingRegisters(start, count) => {
                    device.requests += 1;
                    if start == 0 {
                        device.cycle_starts.push(now);
                    }
                    let range = usize::from(start)..usize::from(start) + usize::from(count);
                    match device.registers.get(range) {
                        Some(words) => Ok(Response::ReadHoldingRegisters(words.to_vec())),
                        None => Err(ExceptionCode::IllegalDataAddress),
                    }
                }
                _ => Err(ExceptionCode::IllegalFunction),
            },
            Err(_) => Err(ExceptionCode::ServerDeviceFailure),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// CPU seconds (user + system) from a /proc stat file: fields 14 and 15, in clock ticks
/// (100 per second on Linux).
fn cpu_seconds(stat_file: &str) -> Result<f64> {
    let stat =
        std::fs::read_to_string(stat_file).with_context(|| format!("reading {stat_file}"))?;
    // The command name (field 2) may hold spaces; count fields after its closing ')'.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or(&stat);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        |i: usize| -> Result<f64> { Ok(fields.get(i).context("short stat line")?.parse::<f64>()?) };
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.points == 0 || args.points > 32_000 {
        bail!("--points must be 1 to 32000");
    }

    // The device, on its own thread so its CPU time can be told apart.
    let device = Arc::new(Mutex::new(Device {
        registers: (0..args.points)
            .flat_map(|i| {
                let bits = (20.0 + f32::from(i) / 10.0).to_bits();
                [bits as u16, (bits >> 16) as u16] // CDAB: low word first
            })
            .collect(),
        ..Device::default()
    }));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server_stop = CancellationToken::new();
    let server_thread = {
        let device = device.clone();
        let stop = server_stop.clone();
        std::thread::spawn(move || -> Result<f64> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addr_tx.send(listener.local_addr()?)?;
                let server = tokio_modbus::server::tcp::Server::new(listener);
                let on_connected = move |stream, _peer| {
                    let service = Service(device.clone());
                    async move { Ok(Some((service, stream))) }
                };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    result = server.serve(&on_connected, |_error| {}) => result?,
                }
                anyhow::Ok(())
            })?;
            cpu_seconds("/proc/thread-self/stat")
        })
    };
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(5))
        .context("server did not start")?;

    let points: Vec<String> = (0..args.points)
        .map(|i| {
            format!(
                "{{ name = \"p{i}\", table = \"holding\", address = {}, type = \"f32:CDAB\" }}",
                i * 2
            )
        })
        .collect();
    let text = format!(
        "[gateway]\nid = \"bench\"\n[broker]\nallow_anonymous = true\n[[devices]]\nname = \"meter\"\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"{}\"\npoints = [\n{}\n]\n",
        humantime::format_duration(args.poll),
        points.join(",\n")
    );
    let config = config::parse(&text, Path::new("<modbus-bench>"))?;
    let planned = match &config.devices[0].driver {
        DriverConfig::Modbus(modbus) => {
            drivers::modbus::planned_requests(modbus, config.devices[0].poll)
        }
        _ => 0,
    };

    let runtime = tokio::runtime::Runtime::new()?;
    let (values, delays, measured, cpu_gateway_and_server) = runtime.block_on(async {
        let broker_stop = CancellationToken::new();
        let running = broker::start(
            &BrokerConfig {
                listeners: vec![],
                allow_anonymous: true,
                ..BrokerConfig::default()
            },
            broker_stop.clone(),
        )
        .await?;
        let handle = running.handle.clone();
        let mut subscription = handle
            .subscribe(
                "bench-subscriber",
                vec![("bench/meter/#".into(), QoS::AtLeastOnce)],
                InternalSubscribeOptions {
                    capacity: 65_536,
                    ..InternalSubscribeOptions::default()
                },
            )
            .await?;
        let shutdown = CancellationToken::new();
        let devices = config
            .devices
            .iter()
            .cloned()
            .map(|d| {
                let context = DeviceContext::new(
                    &config.gateway.id,
                    &config.gateway.status_topic,
                    &d,
                    handle.clone(),
                );
                (d, context)
            })
            .collect();
        for task in drivers::modbus::device_tasks(devices, shutdown.clone()) {
            tokio::spawn(task);
        }

        // Warm-up, then measure.
        let warmup_end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < warmup_end {
            let _ = tokio::time::timeout(Duration::from_millis(50), subscription.recv()).await;
        }
        let cpu_start = cpu_seconds("/proc/self/stat")?;
        let start = Instant::now();
        let end = start + Duration::from_secs(args.seconds);
        let mut receipts =
            Vec::with_capacity(usize::from(args.points) * 10 * args.seconds as usize);
        while Instant::now() < end {
            if let Ok(Some(_message)) =
                tokio::time::timeout(Duration::from_millis(50), subscription.recv()).await
            {
                receipts.push(Instant::now());
            }
        }
        let measured = start.elapsed();
        let cpu = cpu_seconds("/proc/self/stat")? - cpu_start;
        shutdown.cancel();
        broker_stop.cancel();

        let starts = device
            .lock()
            .map(|d| d.cycle_starts.clone())
            .unwrap_or_default();
        let mut delays: Vec<Duration> = receipts
            .iter()
            .filter_map(|at| {
                let i = starts.partition_point(|s| s <= at);
                starts.get(i.checked_sub(1)?).map(|s| *at - *s)
            })
            .collect();
        delays.sort();
        anyhow::Ok((receipts.len(), delays, measured, cpu))
    })?;

    let (requests, cycles) = device
        .lock()
        .map(|d| (d.requests, d.cycle_starts.len()))
        .unwrap_or_default();
    server_stop.cancel();
    let server_cpu_total = server_thread
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    // The server's share during the measured window, assuming it was spread evenly
    // over its life (warm-up included).
    let total_run = measured.as_secs_f64() + 1.0;
    let server_cpu = server_cpu_total * measured.as_secs_f64() / total_run;
    let gateway_cpu = (cpu_gateway_and_server - server_cpu).max(0.0);

    let values_per_second = values as f64 / measured.as_secs_f64();
    println!(
        "points: {} f32 ({} registers), poll every {}",
        args.points,
        u32::from(args.points) * 2,
        humantime::format_duration(args.poll)
    );
    println!(
        "requests per cycle: {} planned, {:.2} measured ({requests} requests in {cycles} cycles)",
        planned,
        requests as f64 / cycles.max(1) as f64
    );
    println!(
        "values delivered: {values} in {:.2}s = {values_per_second:.0} values/s (expected {:.0})",
        measured.as_secs_f64(),
        f64::from(args.points) / args.poll.as_secs_f64()
    );
    println!(
        "delay poll start -> subscriber: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&delays, 0.5).as_secs_f64() * 1e3,
        percentile(&delays, 0.99).as_secs_f64() * 1e3,
        delays.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "gateway CPU: {gateway_cpu:.2} s in {:.2} s = {:.3} CPU s per 100,000 values (process {cpu_gateway_and_server:.2} s minus Modbus server thread {server_cpu:.2} s)",
        measured.as_secs_f64(),
        if values > 0 { gateway_cpu * 100_000.0 / values as f64 } else { 0.0 }
    );
    Ok(())
}
