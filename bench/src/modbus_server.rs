//! `fieldmq-bench modbus-server`: the Modbus TCP server's requests per second and latency,
//! side by side with a bare tokio-modbus server as the reference, measured with the same
//! independent client.
//!
//! ```text
//! fieldmq-bench modbus-server --seconds 10 --clients 4 --registers 100
//! fieldmq-bench modbus-server --client pymodbus --clients 1
//! ```
//!
//! The gateway runs in this process from its library: one simulated device with
//! `registers / 2` constant points, served by a `[[modbus_servers]]` entry as consecutive
//! f32 holding registers. The reference is a tokio-modbus server in the same process that
//! answers the same block from a fixed array: what the protocol library costs with nothing
//! behind it. Each client holds one connection and reads the whole block (FC03) in a closed
//! loop: a request goes out when the previous answer arrived. The client is tokio-modbus'
//! TCP client in this process, or pymodbus (`--client pymodbus`, bench/py/modbus_load.py,
//! one Python process per client: the SCADA side as another program). Printed per server:
//! requests per second over all clients, and the request-to-answer latency at p50, p99 and
//! max, after one second of warm-up; every answer is checked for its length.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio_modbus::client::Reader as _;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::stats::{per_sec, Latencies};

/// The pymodbus load client, run with `python -c`.
const PYMODBUS_CLIENT: &str = include_str!("../py/modbus_load.py");

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
    /// The client: `tokio-modbus` (in this process) or `pymodbus` (a Python process per
    /// client).
    #[arg(long, value_enum, default_value_t = ClientKind::TokioModbus)]
    client: ClientKind,
    /// The Python with pymodbus installed (`.ci/run` makes this venv).
    #[arg(long, default_value = "target/pymodbus-venv/bin/python")]
    python: PathBuf,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    TokioModbus,
    Pymodbus,
}

/// One server's figures.
struct Measured {
    latencies: Latencies,
    errors: u64,
}

pub(crate) async fn run(args: &ModbusServerArgs) -> Result<()> {
    if args.registers < 2 || args.registers > 124 || args.registers % 2 != 0 {
        bail!("--registers must be even, 2 to 124");
    }
    if args.clients == 0 || args.clients > 64 {
        bail!("--clients must be 1 to 64");
    }
    if args.client == ClientKind::Pymodbus && !args.python.is_file() {
        bail!(
            "{} is missing: make the venv with `python3 -m venv target/pymodbus-venv && \
             target/pymodbus-venv/bin/pip install 'pymodbus>=3.10,<4'` or pass --python",
            args.python.display()
        );
    }
    let points = args.registers / 2;
    let values: Vec<f32> = (0..points).map(|i| 20.5 + f32::from(i)).collect();

    let reference_stop = CancellationToken::new();
    let reference = reference_server(&values, reference_stop.clone()).await?;
    let reference_figures = measure(args, reference).await;
    reference_stop.cancel();
    let reference_figures = reference_figures?;

    let dir = std::env::temp_dir().join(format!(
        "fieldmq-bench-modbus-server-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let shutdown = CancellationToken::new();
    let gateway = start_gateway(&dir, args, &values, shutdown.clone()).await?;
    let addr = gateway
        .listeners
        .iter()
        .find(|l| l.service == "Modbus")
        .map(|l| l.addr)
        .context("no Modbus server address")?;
    let figures = match wait_until_served(addr, args.registers).await {
        Ok(()) => measure(args, addr).await,
        Err(e) => Err(e),
    };
    shutdown.cancel();
    gateway.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let figures = figures?;

    let client = match args.client {
        ClientKind::TokioModbus => "tokio-modbus client in this process",
        ClientKind::Pymodbus => "pymodbus client, one Python process each",
    };
    println!(
        "modbus server: {} client(s) ({client}), FC03 of {} registers ({points} f32 values) per request, {} s",
        args.clients, args.registers, args.seconds
    );
    println!(
        "{:<34} {:>12} {:>10} {:>10} {:>10} {:>7}",
        "server", "requests/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for (name, measured) in [
        ("fieldmq [[modbus_servers]]", &figures),
        ("tokio-modbus, fixed array (ref.)", &reference_figures),
    ] {
        let ms = |us: Option<u64>| us.map_or(0.0, |us| us as f64 / 1000.0);
        let latencies = &measured.latencies;
        println!(
            "{name:<34} {:>12.0} {:>10.3} {:>10.3} {:>10.3} {:>7}",
            per_sec(latencies.len(), Duration::from_secs(args.seconds)),
            ms(latencies.percentile(50.0)),
            ms(latencies.percentile(99.0)),
            ms(latencies.max()),
            measured.errors
        );
    }
    let ratio = per_sec(figures.latencies.len(), Duration::from_secs(1))
        / per_sec(reference_figures.latencies.len(), Duration::from_secs(1)).max(1.0);
    println!("fieldmq / reference requests/s: {ratio:.2}");
    Ok(())
}

/// The gateway from its library, serving the values as f32 holding registers from 0.
async fn start_gateway(
    dir: &std::path::Path,
    args: &ModbusServerArgs,
    values: &[f32],
    shutdown: CancellationToken,
) -> Result<fieldmq::service::Gateway> {
    let mut text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[broker]\nallow_anonymous = true\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\
         [[devices]]\nname = \"sim\"\ndriver = \"simulated\"\npoll = \"1s\"\npoints = [\n",
        dir.join("data").display()
    );
    for (i, value) in values.iter().enumerate() {
        text.push_str(&format!(
            "  {{ name = \"p{i}\", waveform = \"constant\", value = {value:?} }},\n"
        ));
    }
    text.push_str(&format!(
        "]\n[[modbus_servers]]\nbind = \"127.0.0.1:0\"\nmax_connections = {}\nmap = [\n",
        args.clients + 1
    ));
    for i in 0..values.len() {
        text.push_str(&format!(
            "  {{ table = \"holding\", address = {}, device = \"sim\", point = \"p{i}\", type = \"f32\" }},\n",
            i * 2
        ));
    }
    text.push_str("]\n");
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, &text)?;
    let config = fieldmq::service::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    fieldmq::service::start(config, shutdown)
        .await
        .context("the gateway did not start")
}

/// Waits (5 s at most) until every value is known: the block reads without an exception.
async fn wait_until_served(addr: SocketAddr, registers: u16) -> Result<()> {
    let mut probe = tokio_modbus::client::tcp::connect(addr).await?;
    let ready_by = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Ok(Ok(_))) = tokio::time::timeout(
            Duration::from_secs(1),
            probe.read_holding_registers(0, registers),
        )
        .await
        {
            return Ok(());
        }
        if Instant::now() > ready_by {
            bail!("the server never served the simulated values");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tokio-modbus server answering FC03 from `values` as f32 (high word first), until
/// `stop`.
async fn reference_server(values: &[f32], stop: CancellationToken) -> Result<SocketAddr> {
    let registers: Arc<[u16]> = values
        .iter()
        .flat_map(|v| {
            let bits = v.to_bits();
            [(bits >> 16) as u16, bits as u16]
        })
        .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio_modbus::server::tcp::Server::new(listener);
    tokio::spawn(async move {
        let on_connected = move |stream, _peer| {
            let service = FixedRegisters(registers.clone());
            async move { Ok(Some((service, stream))) }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = server.serve(&on_connected, |_error| {}) => {}
        }
    });
    Ok(addr)
}

struct FixedRegisters(Arc<[u16]>);

impl tokio_modbus::server::Service for FixedRegisters {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let answer = match request.request {
            Request::ReadHoldingRegisters(start, count) => {
                let range = usize::from(start)..usize::from(start) + usize::from(count);
                match self.0.get(range) {
                    Some(words) => Ok(Response::ReadHoldingRegisters(words.to_vec())),
                    None => Err(ExceptionCode::IllegalDataAddress),
                }
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// Every client's closed loop against `addr`, merged.
async fn measure(args: &ModbusServerArgs, addr: SocketAddr) -> Result<Measured> {
    let warmup = Duration::from_secs(1);
    let seconds = Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| match args.client {
            ClientKind::TokioModbus => {
                let warmup_end = Instant::now() + warmup;
                tokio::spawn(tokio_client(
                    addr,
                    args.registers,
                    warmup_end,
                    warmup_end + seconds,
                ))
            }
            ClientKind::Pymodbus => tokio::spawn(pymodbus_client(
                args.python.clone(),
                addr,
                args.registers,
                warmup,
                seconds,
            )),
        })
        .collect();
    let mut all = Measured {
        latencies: Latencies::new(),
        errors: 0,
    };
    for task in tasks {
        let one = task.await??;
        all.latencies.merge(&one.latencies);
        all.errors += one.errors;
    }
    Ok(all)
}

/// One tokio-modbus client's closed loop: latencies of the answers after `warmup_end`.
async fn tokio_client(
    addr: SocketAddr,
    registers: u16,
    warmup_end: Instant,
    end: Instant,
) -> Result<Measured> {
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
    Ok(Measured { latencies, errors })
}

/// One pymodbus client process: its closed loop's latencies, read from its JSON output.
async fn pymodbus_client(
    python: PathBuf,
    addr: SocketAddr,
    registers: u16,
    warmup: Duration,
    seconds: Duration,
) -> Result<Measured> {
    #[derive(serde::Deserialize)]
    struct Output {
        latencies_us: Vec<u64>,
        errors: u64,
    }
    let run = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(PYMODBUS_CLIENT)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(registers.to_string())
        .arg(warmup.as_secs_f64().to_string())
        .arg(seconds.as_secs_f64().to_string())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(warmup + seconds + Duration::from_secs(30), run)
        .await
        .context("the pymodbus client did not finish")?
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "the pymodbus client failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let parsed: Output =
        serde_json::from_slice(&output.stdout).context("the pymodbus client's output")?;
    let mut latencies = Latencies::new();
    for us in parsed.latencies_us {
        latencies.record_us(us);
    }
    Ok(Measured {
        latencies,
        errors: parsed.errors,
    })
}
