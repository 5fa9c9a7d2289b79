//! `fieldmq-bench modbus`: the Modbus driver's throughput and latency.
//!
//! ```text
//! fieldmq-bench modbus --seconds 10
//! ```
//!
//! A tokio-modbus TCP server (on its own thread and runtime) holds 1,000 holding
//! registers; one `modbus-tcp` device maps them to 500 f32 points and polls them 10 times a
//! second with `report = "always"`, so every value of every poll is published on the
//! embedded broker, where an in-process subscriber receives them. Printed: read requests
//! per poll cycle, values per second delivered, the delay from the start of a poll cycle
//! (the server receiving its first request) to the subscriber's receipt at p50/p99, and
//! the gateway's CPU seconds per 100,000 values (process CPU time from /proc minus the
//! server thread's). The broker and the driver run in this process, from the gateway's
//! library (the one section below that names its types).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::proc::{process_cpu_ms, thread_cpu_ms};
use crate::stats::{micros, Latencies};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ModbusArgs {
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

pub(crate) fn run(args: &ModbusArgs) -> Result<()> {
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
            Ok(thread_cpu_ms().map_or(0.0, |ms| ms as f64 / 1000.0))
        })
    };
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(5))
        .context("server did not start")?;

    let config = product::Config::modbus_tcp(addr, args.points, args.poll)?;
    let planned = config.planned_requests();

    let runtime = tokio::runtime::Runtime::new()?;
    let (values, delays, measured, cpu_gateway_and_server) = runtime.block_on(async {
        let mut gateway = product::Gateway::start(config).await?;

        // Warm-up, then measure.
        let warmup_end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < warmup_end {
            let _ = tokio::time::timeout(Duration::from_millis(50), gateway.next_value()).await;
        }
        let cpu_start = process_cpu_seconds()?;
        let start = Instant::now();
        let end = start + Duration::from_secs(args.seconds);
        let mut receipts =
            Vec::with_capacity(usize::from(args.points) * 10 * args.seconds as usize);
        while Instant::now() < end {
            if let Ok(Some(())) =
                tokio::time::timeout(Duration::from_millis(50), gateway.next_value()).await
            {
                receipts.push(Instant::now());
            }
        }
        let measured = start.elapsed();
        let cpu = process_cpu_seconds()? - cpu_start;
        gateway.stop();

        let starts = device
            .lock()
            .map(|d| d.cycle_starts.clone())
            .unwrap_or_default();
        let delays: Latencies = receipts
            .iter()
            .filter_map(|at| {
                let i = starts.partition_point(|s| s <= at);
                starts.get(i.checked_sub(1)?).map(|s| micros(*at - *s))
            })
            .collect();
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
        ms(delays.percentile(50.0)),
        ms(delays.percentile(99.0)),
        ms(delays.max())
    );
    println!(
        "gateway CPU: {gateway_cpu:.2} s in {:.2} s = {:.3} CPU s per 100,000 values (process {cpu_gateway_and_server:.2} s minus Modbus server thread {server_cpu:.2} s)",
        measured.as_secs_f64(),
        if values > 0 { gateway_cpu * 100_000.0 / values as f64 } else { 0.0 }
    );
    Ok(())
}

/// CPU seconds (user + system) of this whole process: gateway and Modbus server.
fn process_cpu_seconds() -> Result<f64> {
    let ms = process_cpu_ms(std::process::id()).context("no CPU time in /proc/self/stat")?;
    Ok(ms as f64 / 1000.0)
}

/// µs as ms, 0 when nothing was recorded.
fn ms(us: Option<u64>) -> f64 {
    us.unwrap_or(0) as f64 / 1000.0
}

/// Everything this bench takes from the gateway's library: the config of one Modbus TCP
/// device, and the broker with that device's driver as the gateway runs them.
mod product {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use anyhow::Result;
    use fieldmq::broker::config::BrokerConfig;
    use fieldmq::broker::{self, InternalSubscribeOptions, InternalSubscription, RunningBroker};
    use fieldmq::drivers::config::DriverConfig;
    use fieldmq::drivers::{self, DeviceContext};
    use fieldmq::model::QoS;
    use fieldmq::service::config;
    use tokio_util::sync::CancellationToken;

    /// A gateway config with one `modbus-tcp` device "meter" at `addr`: `points` f32 points
    /// (CDAB) from holding register 0 on, polled every `poll`.
    pub(super) struct Config(config::Config);

    impl Config {
        pub(super) fn modbus_tcp(addr: SocketAddr, points: u16, poll: Duration) -> Result<Config> {
            let points: Vec<String> = (0..points)
                .map(|i| {
                    format!(
                        "{{ name = \"p{i}\", table = \"holding\", address = {}, type = \"f32:CDAB\" }}",
                        i * 2
                    )
                })
                .collect();
            let text = format!(
                "[gateway]\nid = \"bench\"\n[broker]\nallow_anonymous = true\n[[devices]]\nname = \"meter\"\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"{}\"\npoints = [\n{}\n]\n",
                humantime::format_duration(poll),
                points.join(",\n")
            );
            Ok(Config(config::parse(
                &text,
                Path::new("<fieldmq-bench modbus>"),
            )?))
        }

        /// Read requests the driver plans per poll cycle.
        pub(super) fn planned_requests(&self) -> usize {
            let device = &self.0.devices[0];
            match &device.driver {
                DriverConfig::Modbus(modbus) => {
                    drivers::modbus::planned_requests(modbus, device.poll)
                }
                _ => 0,
            }
        }
    }

    /// The embedded broker (no listener), the device's driver, and an in-process subscriber
    /// to everything the device publishes.
    pub(super) struct Gateway {
        subscription: InternalSubscription,
        drivers_stop: CancellationToken,
        broker_stop: CancellationToken,
        /// Held until the end: the broker's tasks belong to it.
        _broker: RunningBroker,
    }

    impl Gateway {
        pub(super) async fn start(config: Config) -> Result<Gateway> {
            let config = config.0;
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
            let subscription = handle
                .subscribe(
                    "bench-subscriber",
                    vec![("bench/meter/#".into(), QoS::AtLeastOnce)],
                    InternalSubscribeOptions {
                        capacity: 65_536,
                        ..InternalSubscribeOptions::default()
                    },
                )
                .await?;
            let drivers_stop = CancellationToken::new();
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
            for task in drivers::modbus::device_tasks(devices, drivers_stop.clone()) {
                tokio::spawn(task);
            }
            Ok(Gateway {
                subscription,
                drivers_stop,
                broker_stop,
                _broker: running,
            })
        }

        /// The next value the subscriber receives; `None` once the broker has stopped.
        pub(super) async fn next_value(&mut self) -> Option<()> {
            self.subscription.recv().await.map(|_| ())
        }

        pub(super) fn stop(&self) {
            self.drivers_stop.cancel();
            self.broker_stop.cancel();
        }
    }
}
