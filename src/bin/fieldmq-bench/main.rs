//! `fieldmq-bench`: throughput and latency of the embedded broker against Mosquitto.
//!
//! ```text
//! cargo build --release
//! cargo run --release --bin fieldmq-bench -- broker --target both --messages 100000 \
//!     --publishers 1 --subscribers 1 --qos both
//! ```
//!
//! Each target broker is started here on a free 127.0.0.1 port (fieldmq from
//! `target/release/fieldmq run -c <temp config>`, Mosquitto from a temp `mosquitto.conf`),
//! loaded with the same traffic by rumqttc clients in this process, and stopped again.
//! N publishers each send M/N messages to `bench/<i>`; with as many subscribers as
//! publishers (N > 1) subscriber i takes `bench/<i>`, otherwise every subscriber takes
//! `bench/#`. Every payload starts with its send time, so each delivery gives a latency.
//! Everything is bounded: the run of one row stops at `--timeout` and reports what is missing.
//!
//! `durable` measures QoS 1 into the queue of an offline persistent subscriber and the drain
//! when it reconnects; `memory` reads the broker's RSS with idle clients and with many
//! messages queued for an offline subscriber; `retained` times a new `#` subscriber's
//! delivery of many retained messages. See docs/benchmarks.md.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::Barrier;

mod disk;
mod retained;
mod stats;
mod wake;

#[derive(Parser, Debug)]
#[command(
    name = "fieldmq-bench",
    about = "Benchmarks for fieldmq's embedded MQTT broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Publish/subscribe throughput and latency, fieldmq and/or Mosquitto back to back.
    Broker(BrokerArgs),
    /// QoS 1 into the queue of an offline persistent subscriber, then drained on reconnect.
    Durable(DurableArgs),
    /// Broker RSS with idle clients and with many messages queued for an offline subscriber.
    Memory(MemoryArgs),
    /// Time for a new `#` subscriber to receive N retained messages, and broker RSS meanwhile.
    Retained(retained::RetainedArgs),
    /// What a synced commit costs on a disk (wall time and CPU): what `durability = "sync"`
    /// waits for on every acknowledged publish.
    Disk(disk::DiskArgs),
    /// What a wake-up between two threads costs here, after idle gaps (no broker): on a VM,
    /// what waking a halted virtual CPU adds to every `sync` commit.
    Wake(wake::WakeArgs),
}

/// Binaries and the work directory, shared by `durable` and `memory`.
#[derive(clap::Args, Debug, Clone)]
struct BinArgs {
    /// The fieldmq binary.
    #[arg(long, default_value = "target/release/fieldmq")]
    fieldmq_bin: PathBuf,
    /// The Mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: PathBuf,
    /// Keep the started brokers' logs, configs and data in this directory instead of a temp
    /// dir that is removed afterwards.
    #[arg(long)]
    keep_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct DurableArgs {
    /// Which broker(s) to start and load.
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    target: TargetArg,
    /// QoS 1 messages published while the subscriber is away.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload size in bytes (at least 8: the sequence number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages each broker keeps in flight to the subscriber (fieldmq `max_inflight`,
    /// Mosquitto `max_inflight_messages`; 20 is both defaults).
    #[arg(long, default_value_t = 20)]
    inflight: u16,
    /// fieldmq's `[broker] durability` (`sync`, its default, is what the comparison with
    /// Mosquitto's `persistence true` is about; the others show what the fsync costs).
    #[arg(long, default_value = "sync", value_parser = ["sync", "batched", "memory"])]
    durability: String,
    /// Publish rate in messages/s; 0 = as fast as the window of 100 allows. A low rate
    /// shows what one acknowledgement costs (with `sync`: the commit and its fsync).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Publishers sharing the messages (and the rate), each with its own connection and
    /// window of 100; more than one shows the group commit with concurrent clients, as on a
    /// LAN with many devices.
    #[arg(long, default_value_t = 1)]
    publishers: u16,
    /// Longest time the publish phase, and then the drain phase, may take, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Rounds; with both targets each round runs both, first one then the other, the order
    /// alternating, and the ratios are given per round with their median (on a shared
    /// machine single runs move by ±50%).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    #[command(flatten)]
    bins: BinArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct MemoryArgs {
    /// Which broker(s) to start and measure.
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    target: TargetArg,
    /// Idle connected clients for the first measurement (0 skips it).
    #[arg(long, default_value_t = 1000)]
    clients: u32,
    /// QoS 1 messages queued for one offline persistent subscriber (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    queued: u64,
    /// Payload size in bytes of the queued messages (at least 8).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Afterwards, reconnect the subscriber and count what it gets (checks nothing was lost).
    #[arg(long)]
    drain: bool,
    /// Longest time the publish phase (and the drain) may take, seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    #[command(flatten)]
    bins: BinArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct BrokerArgs {
    /// Which broker(s) to start and load.
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    target: TargetArg,
    /// Messages published per row, in total over all publishers.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    #[arg(long, default_value_t = 1)]
    publishers: u32,
    #[arg(long, default_value_t = 1)]
    subscribers: u32,
    /// QoS of publishes and subscriptions.
    #[arg(long, value_enum, default_value_t = QosArg::Both)]
    qos: QosArg,
    /// Payload size in bytes (at least 16: send time and sequence number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Total publish rate in messages/s, spread over the publishers; 0 = as fast as possible.
    /// A rate below saturation gives a latency that is not just queueing.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Longest time one row may take, seconds; then what has not arrived counts as missing.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Runs per row (same broker); the table shows the run with the median msgs/s.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// The fieldmq binary.
    #[arg(long, default_value = "target/release/fieldmq")]
    fieldmq_bin: PathBuf,
    /// The Mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: PathBuf,
    /// Also run Mosquitto with `persistence true` (temp persistence_location) as its own row.
    #[arg(long)]
    mosquitto_persistence: bool,
    /// Keep the started brokers' logs and configs in this directory instead of a temp dir
    /// that is removed afterwards.
    #[arg(long)]
    keep_dir: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TargetArg {
    Fieldmq,
    Mosquitto,
    Both,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum QosArg {
    #[value(name = "0")]
    Zero,
    #[value(name = "1")]
    One,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Fieldmq,
    Mosquitto,
    MosquittoPersist,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Fieldmq => "fieldmq",
            Target::Mosquitto => "mosquitto",
            Target::MosquittoPersist => "mosquitto+persist",
        }
    }
}

/// Header in front of every payload: send time (ns since the bench's epoch) and sequence.
const HEADER: usize = 16;
/// How long a started broker may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a broker may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last publish, how long the subscribers may stay silent before the row ends.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match cli.command {
        Cmd::Broker(args) => rt.block_on(run_broker_bench(args)),
        Cmd::Durable(args) => rt.block_on(run_durable_bench(args)),
        Cmd::Memory(args) => rt.block_on(run_memory_bench(args)),
        Cmd::Retained(args) => rt.block_on(retained::run(&args)),
        Cmd::Disk(args) => disk::run(&args),
        Cmd::Wake(args) => wake::run(&args),
    }
}

async fn run_broker_bench(args: BrokerArgs) -> Result<()> {
    if args.payload < HEADER {
        bail!("--payload must be at least {HEADER} bytes");
    }
    if args.publishers == 0 || args.subscribers == 0 {
        bail!("--publishers and --subscribers must be at least 1");
    }
    if args.messages < u64::from(args.publishers) {
        bail!("--messages must be at least --publishers");
    }
    let mut targets = Vec::new();
    if matches!(args.target, TargetArg::Fieldmq | TargetArg::Both) {
        targets.push(Target::Fieldmq);
    }
    if matches!(args.target, TargetArg::Mosquitto | TargetArg::Both) {
        targets.push(Target::Mosquitto);
        if args.mosquitto_persistence {
            targets.push(Target::MosquittoPersist);
        }
    }
    let qoss: Vec<QoS> = match args.qos {
        QosArg::Zero => vec![QoS::AtMostOnce],
        QosArg::One => vec![QoS::AtLeastOnce],
        QosArg::Both => vec![QoS::AtMostOnce, QoS::AtLeastOnce],
    };

    let work = WorkDir::new(args.keep_dir.clone())?;
    let setup = BrokerSetup::new(&args.fieldmq_bin, &args.mosquitto_bin);
    let mut rows = Vec::new();
    for &qos in &qoss {
        for &target in &targets {
            let dir = work
                .path()
                .join(format!("{}-qos{}", target.name(), qos as u8));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            eprintln!(
                "== {} qos {} {}x{} {} messages",
                target.name(),
                qos as u8,
                args.publishers,
                args.subscribers,
                args.messages
            );
            let broker = match BrokerProcess::start(target, &setup, &dir) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("   cannot start: {e:#}");
                    rows.push((target, qos, LoadResult::failed(&args)));
                    continue;
                }
            };
            // Repeat on the same broker; keep the run with the median throughput.
            let mut runs = Vec::new();
            let mut res = Ok(());
            for _ in 0..args.repeat.max(1) {
                match run_load(broker.addr, qos, &args).await {
                    Ok(row) => {
                        eprintln!(
                            "   {:.0} msgs/s, {} missing",
                            row.rate(),
                            row.expected.saturating_sub(row.received)
                        );
                        runs.push(row);
                    }
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
            }
            let log = broker.log_path.clone();
            broker.stop();
            match res {
                Ok(()) => {
                    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
                    let mid = runs.len() / 2;
                    if let Some(row) = runs.into_iter().nth(mid) {
                        rows.push((target, qos, row));
                    }
                }
                Err(e) => {
                    eprintln!(
                        "   failed: {e:#} (broker log: {})",
                        if work.keep {
                            log.display().to_string()
                        } else {
                            tail(&log, 10)
                        }
                    );
                    rows.push((target, qos, LoadResult::failed(&args)));
                }
            }
        }
    }
    print!("{}", render(&rows, &args));
    print_load();
    Ok(())
}

/// Other work on the machine skews these numbers: say how busy it was.
fn print_load() {
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "\n{cores} cores; load average at the end (1/5/15 min): {}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

/// How to start the brokers: binaries and extra configuration lines.
struct BrokerSetup {
    fieldmq_bin: PathBuf,
    mosquitto_bin: PathBuf,
    /// Extra lines for fieldmq's `[broker]` table.
    fieldmq_broker: String,
    /// Extra lines for fieldmq's `[[broker.listeners]]` table.
    fieldmq_listener: String,
    /// Extra lines for `mosquitto.conf`.
    mosquitto: String,
}

impl BrokerSetup {
    fn new(fieldmq_bin: &Path, mosquitto_bin: &Path) -> BrokerSetup {
        BrokerSetup {
            fieldmq_bin: fieldmq_bin.to_path_buf(),
            mosquitto_bin: mosquitto_bin.to_path_buf(),
            fieldmq_broker: String::new(),
            // Every benchmark client comes from 127.0.0.1: no per-address limit.
            fieldmq_listener: "max_connections_per_address = 0\n".to_owned(),
            mosquitto: String::new(),
        }
    }
}

/// A started broker; stopped (SIGTERM, then SIGKILL) on `stop` or drop.
struct BrokerProcess {
    child: Option<Child>,
    addr: SocketAddr,
    log_path: PathBuf,
}

impl BrokerProcess {
    fn start(target: Target, setup: &BrokerSetup, dir: &Path) -> Result<BrokerProcess> {
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log_path = dir.join("broker.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        let mut cmd = match target {
            Target::Fieldmq => {
                let data = dir.join("data");
                std::fs::create_dir_all(&data)
                    .with_context(|| format!("cannot create {}", data.display()))?;
                let conf = dir.join("fieldmq.toml");
                let text = format!(
                    "[gateway]\nid = \"bench\"\ndata_dir = {data:?}\n\n[broker]\n\
                     allow_anonymous = true\n{broker}\n[[broker.listeners]]\nbind = \"{addr}\"\n\
                     {listener}",
                    data = data.display().to_string(),
                    broker = setup.fieldmq_broker,
                    listener = setup.fieldmq_listener,
                );
                std::fs::write(&conf, text)
                    .with_context(|| format!("cannot write {}", conf.display()))?;
                if !setup.fieldmq_bin.exists() {
                    bail!(
                        "{} not found: run `cargo build --release` or pass --fieldmq-bin",
                        setup.fieldmq_bin.display()
                    );
                }
                let mut c = Command::new(&setup.fieldmq_bin);
                c.arg("run").arg("-c").arg(&conf);
                c
            }
            Target::Mosquitto | Target::MosquittoPersist => {
                let conf = dir.join("mosquitto.conf");
                let mut text = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
                if is_root() {
                    // Started as root, mosquitto drops to user "mosquitto", which cannot
                    // write our temp dir.
                    text.push_str("user root\n");
                }
                if target == Target::MosquittoPersist {
                    let data = dir.join("persist");
                    std::fs::create_dir_all(&data)
                        .with_context(|| format!("cannot create {}", data.display()))?;
                    let _ = writeln!(
                        text,
                        "persistence true\npersistence_location {}/",
                        data.display()
                    );
                } else {
                    text.push_str("persistence false\n");
                }
                text.push_str(&setup.mosquitto);
                std::fs::write(&conf, text)
                    .with_context(|| format!("cannot write {}", conf.display()))?;
                let mut c = Command::new(&setup.mosquitto_bin);
                c.arg("-c").arg(&conf);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .env("RUST_LOG", "warn");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", target.name()))?;
        let mut broker = BrokerProcess {
            child: Some(child),
            addr,
            log_path,
        };
        broker.wait_ready(target)?;
        Ok(broker)
    }

    /// Connect in a loop until the listener accepts, the process exits, or the time is up.
    fn wait_ready(&mut self, target: Target) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("cannot poll the broker")? {
                    bail!(
                        "{} exited ({status}) before accepting connections:\n{}",
                        target.name(),
                        tail(&self.log_path, 20)
                    );
                }
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept connections on {} within {:?}:\n{}",
                    target.name(),
                    self.addr,
                    READY_TIMEOUT,
                    tail(&self.log_path, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) {
        self.stop_inner();
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn stop_inner(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Graceful first, so fieldmq can close its SQLite files.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The directory for configs, logs and broker data: removed on drop unless `--keep-dir`.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn new(keep_dir: Option<PathBuf>) -> Result<WorkDir> {
        let (path, keep) = match keep_dir {
            Some(p) => (p, true),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let name = format!("fieldmq-bench-{}-{nanos}", std::process::id());
                (std::env::temp_dir().join(name), false)
            }
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir { path, keep })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("no local address")?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// What one row measured.
struct LoadResult {
    published: u64,
    expected: u64,
    received: u64,
    /// From the first publish to the last delivery (or the end of the row).
    elapsed: Duration,
    /// Sorted latencies, microseconds.
    latencies_us: Vec<u64>,
    failed: bool,
}

impl LoadResult {
    fn failed(args: &BrokerArgs) -> LoadResult {
        LoadResult {
            published: 0,
            expected: args.messages * expected_fanout(args),
            received: 0,
            elapsed: Duration::ZERO,
            latencies_us: Vec::new(),
            failed: true,
        }
    }

    /// Deliveries per second.
    fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.received as f64 / secs
        } else {
            0.0
        }
    }

    fn percentile(&self, p: f64) -> Option<u64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        let idx = rank.clamp(1, self.latencies_us.len()) - 1;
        Some(self.latencies_us[idx])
    }
}

/// How many subscribers get each message.
fn expected_fanout(args: &BrokerArgs) -> u64 {
    if paired(args) {
        1
    } else {
        u64::from(args.subscribers)
    }
}

/// N publishers → N subscribers, subscriber i on `bench/<i>`.
fn paired(args: &BrokerArgs) -> bool {
    args.publishers > 1 && args.publishers == args.subscribers
}

fn options(id: String, addr: SocketAddr, args: &BrokerArgs) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(args.payload + 1024, args.payload + 1024);
    o.set_inflight(100);
    o
}

fn new_client(id: String, addr: SocketAddr, args: &BrokerArgs) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options(id, addr, args), 1024);
    eventloop.network_options.set_tcp_nodelay(true);
    (client, eventloop)
}

/// Poll until CONNACK (bounded).
async fn connect(eventloop: &mut EventLoop, who: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .with_context(|| format!("{who}: no CONNACK within 10 s"))?
            .with_context(|| format!("{who}: connection failed"))?;
        if let Event::Incoming(Packet::ConnAck(ack)) = ev {
            if ack.code != rumqttc::ConnectReturnCode::Success {
                bail!("{who}: connection refused: {:?}", ack.code);
            }
            return Ok(());
        }
    }
}

fn now_ns(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

async fn run_load(addr: SocketAddr, qos: QoS, args: &BrokerArgs) -> Result<LoadResult> {
    let epoch = Instant::now();
    let row_deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let per_pub = args.messages / u64::from(args.publishers);
    let published_total = per_pub * u64::from(args.publishers);
    let fanout = expected_fanout(args);
    let per_sub = if paired(args) {
        per_pub
    } else {
        published_total
    };
    let last_rx = Arc::new(AtomicU64::new(0));
    let published_count = Arc::new(AtomicU64::new(0));

    // Subscribers first; each reports ready once its SUBACK is in.
    let ready = Arc::new(Barrier::new(args.subscribers as usize + 1));
    let mut subs = Vec::new();
    for i in 0..args.subscribers {
        let (client, mut eventloop) = new_client(format!("bench-sub-{i}"), addr, args);
        let filter = if paired(args) {
            format!("bench/{i}")
        } else {
            "bench/#".to_string()
        };
        let ready = ready.clone();
        let last_rx = last_rx.clone();
        let published_count = published_count.clone();
        subs.push(tokio::spawn(async move {
            let who = format!("subscriber {i}");
            let mut lat = Vec::with_capacity(usize::try_from(per_sub).unwrap_or(0));
            let setup = async {
                connect(&mut eventloop, &who).await?;
                client.subscribe(filter, qos).await?;
                await_suback(&mut eventloop, &who, row_deadline).await
            };
            let setup_res = setup.await;
            ready.wait().await;
            setup_res?;
            let mut idle_since = tokio::time::Instant::now();
            while (lat.len() as u64) < per_sub {
                // End when the row's time is up, or when publishing has finished and
                // nothing has arrived for IDLE_TIMEOUT (the rest is lost, not late).
                let idle_deadline = idle_since + IDLE_TIMEOUT;
                let pubs_done = published_count.load(Ordering::Acquire) >= published_total;
                let deadline = if pubs_done {
                    row_deadline.min(idle_deadline)
                } else {
                    // Wake up now and then to notice that publishing has finished.
                    row_deadline.min(tokio::time::Instant::now() + Duration::from_millis(500))
                };
                let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                    Ok(ev) => ev.with_context(|| format!("{who}: connection lost"))?,
                    Err(_) if tokio::time::Instant::now() >= row_deadline => break,
                    Err(_) if pubs_done => break,
                    Err(_) => continue,
                };
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    let now = now_ns(epoch);
                    idle_since = tokio::time::Instant::now();
                    if let Some(ts) = p.payload.get(..8) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(ts);
                        let sent = u64::from_be_bytes(b);
                        lat.push(now.saturating_sub(sent) / 1000);
                    }
                    last_rx.fetch_max(now, Ordering::AcqRel);
                }
            }
            let _ = client.try_disconnect();
            // Flush the DISCONNECT (bounded).
            let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
            anyhow::Ok(lat)
        }));
    }
    ready.wait().await;

    // Publishers: all connect, then start together.
    let go = Arc::new(Barrier::new(args.publishers as usize + 1));
    let mut pubs = Vec::new();
    for i in 0..args.publishers {
        let (client, mut eventloop) = new_client(format!("bench-pub-{i}"), addr, args);
        let go = go.clone();
        let published_count = published_count.clone();
        let topic = format!("bench/{i}");
        let payload_len = args.payload;
        let rate_per_pub = args.rate as f64 / f64::from(args.publishers);
        pubs.push(tokio::spawn(async move {
            let who = format!("publisher {i}");
            let conn = connect(&mut eventloop, &who).await;
            go.wait().await;
            conn?;
            // Drive the event loop in its own task; count PUBACKs for QoS 1.
            let acked = Arc::new(AtomicU64::new(0));
            let acked2 = acked.clone();
            let driver = tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked2.fetch_add(1, Ordering::AcqRel);
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break Ok(()),
                        Ok(_) => {}
                        Err(e) => break Err(e),
                    }
                }
            });
            let start = tokio::time::Instant::now();
            let mut buf = vec![0u8; payload_len];
            for seq in 0..per_pub {
                if rate_per_pub > 0.0 {
                    let at = start + Duration::from_secs_f64(seq as f64 / rate_per_pub);
                    if tokio::time::Instant::now() < at {
                        tokio::time::sleep_until(at).await;
                    }
                }
                if tokio::time::Instant::now() >= row_deadline {
                    break;
                }
                buf[..8].copy_from_slice(&now_ns(epoch).to_be_bytes());
                buf[8..16].copy_from_slice(&seq.to_be_bytes());
                client
                    .publish(topic.clone(), qos, false, buf.clone())
                    .await
                    .with_context(|| format!("{who}: publish"))?;
                published_count.fetch_add(1, Ordering::AcqRel);
            }
            if qos == QoS::AtLeastOnce {
                while acked.load(Ordering::Acquire) < per_pub
                    && tokio::time::Instant::now() < row_deadline
                    && !driver.is_finished()
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            anyhow::Ok((client, driver))
        }));
    }
    go.wait().await;
    let t0 = now_ns(epoch);

    let mut pub_clients = Vec::new();
    let mut errors = Vec::new();
    for p in pubs {
        match p.await.context("publisher task panicked")? {
            Ok(c) => pub_clients.push(c),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // Make sure the subscribers stop waiting for messages that were never published.
    published_count.fetch_max(published_total, Ordering::AcqRel);
    let published = published_total;

    let mut latencies = Vec::new();
    let mut received = 0u64;
    for s in subs {
        match s.await.context("subscriber task panicked")? {
            Ok(lat) => {
                received += lat.len() as u64;
                latencies.extend(lat);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    for (client, driver) in pub_clients {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    latencies.sort_unstable();
    let end = last_rx.load(Ordering::Acquire).max(t0);
    Ok(LoadResult {
        published,
        expected: published_total * fanout,
        received,
        elapsed: Duration::from_nanos(end - t0),
        latencies_us: latencies,
        failed: false,
    })
}

fn fmt_us(v: Option<u64>) -> String {
    match v {
        None => "-".to_string(),
        Some(us) if us >= 10_000 => format!("{:.0} ms", us as f64 / 1000.0),
        Some(us) if us >= 1000 => format!("{:.1} ms", us as f64 / 1000.0),
        Some(us) => format!("{us} µs"),
    }
}

fn render(rows: &[(Target, QoS, LoadResult)], args: &BrokerArgs) -> String {
    let mut out = String::new();
    let shape = format!("{}x{}", args.publishers, args.subscribers);
    let _ = writeln!(
        out,
        "\n| target | qos | pubs×subs | messages | delivered | missing | msgs/s | p50 | p99 |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for (target, qos, r) in rows {
        if r.failed {
            let _ = writeln!(
                out,
                "| {} | {} | {shape} | {} | failed | - | - | - | - |",
                target.name(),
                *qos as u8,
                args.messages
            );
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {shape} | {} | {} | {} | {:.0} | {} | {} |",
            target.name(),
            *qos as u8,
            r.published,
            r.received,
            r.expected.saturating_sub(r.received),
            r.rate(),
            fmt_us(r.percentile(50.0)),
            fmt_us(r.percentile(99.0)),
        );
    }
    let mut ratios = String::new();
    for (target, qos, r) in rows {
        if *target != Target::Fieldmq || r.failed {
            continue;
        }
        let mosq = rows
            .iter()
            .find(|(t, q, m)| *t == Target::Mosquitto && q == qos && !m.failed);
        if let Some((_, _, m)) = mosq {
            let thr = if m.rate() > 0.0 {
                format!("{:.2}", r.rate() / m.rate())
            } else {
                "-".to_string()
            };
            let p99 = match (r.percentile(99.0), m.percentile(99.0)) {
                (Some(a), Some(b)) if b > 0 => format!("{:.2}", a as f64 / b as f64),
                _ => "-".to_string(),
            };
            let _ = writeln!(ratios, "| {} | {shape} | {thr} | {p99} |", *qos as u8);
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\n| qos | pubs×subs | fieldmq/mosquitto msgs/s | fieldmq/mosquitto p99 |"
        );
        let _ = writeln!(out, "|---|---|---|---|");
        out.push_str(&ratios);
    }
    out
}

// ---------------------------------------------------------------------------------------
// `durable` and `memory`: an offline persistent subscriber's queue.
// ---------------------------------------------------------------------------------------

/// Client id of the persistent subscriber (clean session false).
const DURABLE_SUB_ID: &str = "bench-durable-sub";
/// Topic every message of `durable` and `memory` goes to (the subscriber has `bench/#`).
const DURABLE_TOPIC: &str = "bench/0";
/// rumqttc in-flight window of the publisher.
const PUB_WINDOW: u16 = 100;

fn durable_targets(target: TargetArg) -> Vec<Target> {
    let mut targets = Vec::new();
    if matches!(target, TargetArg::Fieldmq | TargetArg::Both) {
        targets.push(Target::Fieldmq);
    }
    if matches!(target, TargetArg::Mosquitto | TargetArg::Both) {
        targets.push(Target::MosquittoPersist);
    }
    targets
}

/// A broker setup whose per-session queue holds `n` messages (plus slack) of `payload` bytes.
fn queue_setup(
    bins: &BinArgs,
    n: u64,
    payload: usize,
    inflight: u16,
    durability: &str,
) -> BrokerSetup {
    let mut setup = BrokerSetup::new(&bins.fieldmq_bin, &bins.mosquitto_bin);
    let max_queued = n + 1000;
    // fieldmq also bounds a session's queue in bytes (topic + payload, default 64 MiB):
    // raise it so that the message count is the only limit. Mosquitto's max_queued_bytes
    // is unlimited by default.
    let bytes = ((max_queued) * (payload as u64 + 64)).max(64 << 20);
    setup.fieldmq_broker = format!(
        "durability = \"{durability}\"\nmax_queued_messages = {max_queued}\n\
         max_queued_bytes = {bytes}\nmax_inflight = {inflight}\n"
    );
    setup.mosquitto =
        format!("max_queued_messages {max_queued}\nmax_inflight_messages {inflight}\n");
    setup
}

fn persistent_options(addr: SocketAddr, payload: usize) -> MqttOptions {
    let mut o = MqttOptions::new(DURABLE_SUB_ID, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(false);
    o.set_max_packet_size(payload + 1024, payload + 1024);
    o.set_inflight(PUB_WINDOW);
    o
}

/// Poll until the SUBACK of the one subscription sent, by `deadline`; a refusal is an error.
async fn await_suback(
    eventloop: &mut EventLoop,
    who: &str,
    deadline: tokio::time::Instant,
) -> Result<()> {
    loop {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .with_context(|| format!("{who}: no SUBACK in time"))??;
        if let Event::Incoming(Packet::SubAck(ack)) = ev {
            if ack
                .return_codes
                .iter()
                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
            {
                bail!("{who}: subscription refused");
            }
            return Ok(());
        }
    }
}

/// Connect the persistent subscriber, subscribe `bench/#` at QoS 1, and disconnect.
async fn register_offline_subscriber(addr: SocketAddr, payload: usize) -> Result<()> {
    let who = "persistent subscriber";
    let (client, mut eventloop) = AsyncClient::new(persistent_options(addr, payload), 64);
    connect(&mut eventloop, who).await?;
    client.subscribe("bench/#", QoS::AtLeastOnce).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    await_suback(&mut eventloop, who, deadline).await?;
    client.disconnect().await?;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
    drop(eventloop);
    // Let the broker notice that the client is gone before anything is published.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// What the publisher got acknowledged.
struct PublishResult {
    acked: u64,
    /// From the first publish to the last PUBACK.
    elapsed: Duration,
    /// PUBLISH written → its PUBACK read, µs, sorted.
    ack_latencies_us: Vec<u64>,
}

impl PublishResult {
    fn rate(&self) -> f64 {
        per_sec(self.acked, self.elapsed)
    }

    fn ack_percentile(&self, p: f64) -> Option<u64> {
        if self.ack_latencies_us.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.ack_latencies_us.len() as f64).ceil() as usize;
        Some(self.ack_latencies_us[rank.clamp(1, self.ack_latencies_us.len()) - 1])
    }
}

fn per_sec(n: u64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// One clean-session publisher sends `n` QoS 1 messages (window 100) to `bench/0`, each
/// payload starting with its sequence number, at `rate` msgs/s (0: at once), and waits for
/// every PUBACK (bounded).
async fn publish_qos1(
    addr: SocketAddr,
    n: u64,
    payload: usize,
    rate: u64,
    publishers: u16,
    timeout: Duration,
) -> Result<PublishResult> {
    let publishers = u64::from(publishers.max(1)).min(n.max(1));
    let go = Arc::new(tokio::sync::Barrier::new(usize::try_from(publishers)?));
    let mut tasks = Vec::new();
    for index in 0..publishers {
        // Publisher `index` takes its share of the sequence numbers, contiguous.
        let seqs = (n * index / publishers)..(n * (index + 1) / publishers);
        let rate = rate as f64 / publishers as f64;
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            publish_share(addr, index, seqs, payload, rate, timeout, go).await
        }));
    }
    let mut total = PublishResult {
        acked: 0,
        elapsed: Duration::ZERO,
        ack_latencies_us: Vec::new(),
    };
    for task in tasks {
        let share = task.await.context("a publisher task failed")??;
        total.acked += share.acked;
        // They start together (a barrier after connecting): the slowest one's time is the
        // phase's.
        total.elapsed = total.elapsed.max(share.elapsed);
        total.ack_latencies_us.extend(share.ack_latencies_us);
    }
    total.ack_latencies_us.sort_unstable();
    Ok(total)
}

/// One publisher's share: the sequence numbers `seqs`, at `rate` messages/s (0: as fast as
/// its window allows), starting when every publisher has connected (`go`).
async fn publish_share(
    addr: SocketAddr,
    index: u64,
    seqs: std::ops::Range<u64>,
    payload: usize,
    rate: f64,
    timeout: Duration,
    go: Arc<tokio::sync::Barrier>,
) -> Result<PublishResult> {
    let who = format!("publisher {index}");
    let n = seqs.end - seqs.start;
    let id = format!("bench-durable-pub-{index}");
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_max_packet_size(payload + 1024, payload + 1024);
    o.set_inflight(PUB_WINDOW);
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    eventloop.network_options.set_tcp_nodelay(true);
    connect(&mut eventloop, &who).await?;
    go.wait().await;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let acked = Arc::new(AtomicU64::new(0));
    let last_ack_ns = Arc::new(AtomicU64::new(0));
    let driver = {
        let acked = acked.clone();
        let last_ack_ns = last_ack_ns.clone();
        tokio::spawn(async move {
            // Send time by packet id: rumqttc reports each PUBLISH as it writes it.
            let mut sent_ns = vec![0u64; usize::from(u16::MAX) + 1];
            let mut latencies_us = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            let end = loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        sent_ns[usize::from(pkid)] = now_ns(start);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let now = now_ns(start);
                        latencies_us
                            .push(now.saturating_sub(sent_ns[usize::from(ack.pkid)]) / 1000);
                        acked.fetch_add(1, Ordering::AcqRel);
                        last_ack_ns.store(now, Ordering::Release);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            latencies_us.sort_unstable();
            match end {
                Ok(()) => Ok(latencies_us),
                Err(e) => Err((e, latencies_us)),
            }
        })
    };
    let mut buf = vec![0u8; payload];
    let mut progress = Instant::now();
    let paced_start = tokio::time::Instant::now();
    for (k, seq) in seqs.enumerate() {
        if rate > 0.0 {
            let at = paced_start + Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(at.min(deadline)).await;
        }
        buf[..8].copy_from_slice(&seq.to_be_bytes());
        match tokio::time::timeout_at(
            deadline,
            client.publish(DURABLE_TOPIC, QoS::AtLeastOnce, false, buf.clone()),
        )
        .await
        {
            Ok(r) => r.with_context(|| format!("{who}: publish"))?,
            Err(_) => break,
        }
        if progress.elapsed() >= Duration::from_secs(10) {
            progress = Instant::now();
            eprintln!(
                "   … {who}: {} published, {} acked",
                k + 1,
                acked.load(Ordering::Acquire)
            );
        }
    }
    while acked.load(Ordering::Acquire) < n
        && tokio::time::Instant::now() < deadline
        && !driver.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked_n = acked.load(Ordering::Acquire);
    let elapsed = Duration::from_nanos(last_ack_ns.load(Ordering::Acquire));
    let _ = client.try_disconnect();
    let ack_latencies_us = match tokio::time::timeout(Duration::from_secs(2), driver).await {
        Ok(Ok(Err((e, _)))) if acked_n < n => {
            bail!("{who}: connection lost after {acked_n} PUBACKs: {e}")
        }
        Ok(Ok(Ok(latencies) | Err((_, latencies)))) => latencies,
        _ => Vec::new(),
    };
    Ok(PublishResult {
        acked: acked_n,
        elapsed,
        ack_latencies_us,
    })
}

/// What the persistent subscriber got when it came back.
struct DrainResult {
    /// Distinct sequence numbers received.
    received: u64,
    duplicates: u64,
    session_present: bool,
    /// From the start of the reconnect to the last delivery.
    elapsed: Duration,
}

impl DrainResult {
    fn rate(&self) -> f64 {
        per_sec(self.received, self.elapsed)
    }
}

/// Reconnect the persistent subscriber and take its queue: until all `n` have arrived,
/// nothing has arrived for 10 s, or `timeout`.
async fn drain(addr: SocketAddr, n: u64, payload: usize, timeout: Duration) -> Result<DrainResult> {
    let who = "persistent subscriber (reconnect)";
    let (client, mut eventloop) = AsyncClient::new(persistent_options(addr, payload), 64);
    eventloop.network_options.set_tcp_nodelay(true);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = vec![false; usize::try_from(n).context("--messages too large")?];
    let mut received = 0u64;
    let mut duplicates = 0u64;
    let mut session_present = false;
    let mut last = start;
    let mut idle_since = tokio::time::Instant::now();
    let mut progress = Instant::now();
    while received < n {
        let wait = deadline.min(idle_since + IDLE_TIMEOUT);
        let ev = match tokio::time::timeout_at(wait, eventloop.poll()).await {
            Err(_) => break,
            Ok(ev) => ev.with_context(|| format!("{who}: connection lost"))?,
        };
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    bail!("{who}: connection refused: {:?}", ack.code);
                }
                session_present = ack.session_present;
            }
            Event::Incoming(Packet::Publish(p)) => {
                idle_since = tokio::time::Instant::now();
                last = Instant::now();
                let seq = p.payload.get(..8).map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    u64::from_be_bytes(a)
                });
                match seq.and_then(|s| usize::try_from(s).ok()) {
                    Some(i) if i < seen.len() && !seen[i] => {
                        seen[i] = true;
                        received += 1;
                    }
                    _ => duplicates += 1,
                }
                if progress.elapsed() >= Duration::from_secs(10) {
                    progress = Instant::now();
                    eprintln!("   … {received} drained");
                }
            }
            _ => {}
        }
    }
    let elapsed = last.duration_since(start);
    // Send the last PUBACKs and the DISCONNECT (bounded).
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(DrainResult {
        received,
        duplicates,
        session_present,
        elapsed,
    })
}

/// One `durable` row.
struct DurableRow {
    round: u32,
    target: Target,
    messages: u64,
    publish: Option<PublishResult>,
    drain: Option<DrainResult>,
    /// Share of the machine's CPU time the hypervisor gave to others during this row.
    steal: Option<f64>,
    /// Share of the machine's CPU time with nothing to run (idle or waiting for I/O) during
    /// the publish phase: on a VM an idle virtual CPU halts, and waking it again goes
    /// through the host.
    idle: Option<f64>,
    /// CPU time the broker process used (all threads, user + system) in each phase, ms.
    broker_cpu_ms: BrokerCpu,
    /// Bytes the broker process had written to storage during the publish phase.
    publish_disk_bytes: Option<u64>,
}

/// Broker CPU time per phase of a `durable` row, ms.
#[derive(Default, Clone, Copy)]
struct BrokerCpu {
    publish: Option<u64>,
    drain: Option<u64>,
}

/// CPU time (user + system, all threads) process `pid` has used so far, ms. `None` where
/// there is no `/proc/<pid>/stat` (not Linux, or the process is gone).
fn process_cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    // In clock ticks of USER_HZ, which Linux fixes at 100 for /proc.
    Some((user + system) * 10)
}

/// Bytes process `pid` has caused to be written to storage so far (`write_bytes` of
/// `/proc/<pid>/io`: what reached the block layer, not what sits in the page cache).
fn process_disk_writes(pid: u32) -> Option<u64> {
    disk_writes_from(&std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?)
}

fn disk_writes_from(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU time between two [`process_cpu_ms`] readings.
fn cpu_between(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    after?.checked_sub(before?)
}

/// CPU µs per message, shown as "-" when unknown.
fn cpu_per_message(cpu_ms: Option<u64>, messages: u64) -> String {
    match cpu_ms {
        Some(ms) if messages > 0 => format!("{:.1}", ms as f64 * 1000.0 / messages as f64),
        _ => "-".to_string(),
    }
}

/// CPU time counters of the whole machine from `/proc/stat`, in ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MachineTicks {
    all: u64,
    stolen: u64,
    /// Idle and waiting for I/O.
    idle: u64,
}

/// The machine's [`MachineTicks`] now; `None` where there is no `/proc/stat` (not Linux).
fn cpu_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    Some(MachineTicks {
        all: fields.iter().sum(),
        stolen: *fields.get(7)?,
        idle: fields.get(3)? + fields.get(4)?,
    })
}

/// Percent of the CPU time between two [`cpu_ticks`] readings that `part` counts.
fn tick_share(
    before: Option<MachineTicks>,
    after: Option<MachineTicks>,
    part: fn(&MachineTicks) -> u64,
) -> Option<f64> {
    let (before, after) = (before?, after?);
    let all = after.all.checked_sub(before.all).filter(|&t| t > 0)?;
    Some(100.0 * part(&after).saturating_sub(part(&before)) as f64 / all as f64)
}

async fn run_durable_bench(args: DurableArgs) -> Result<()> {
    if args.payload < 8 {
        bail!("--payload must be at least 8 bytes");
    }
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    let work = WorkDir::new(args.bins.keep_dir.clone())?;
    let setup = queue_setup(
        &args.bins,
        args.messages,
        args.payload,
        args.inflight,
        &args.durability,
    );
    let timeout = Duration::from_secs(args.timeout);
    let mut rows = Vec::new();
    for round in 1..=args.repeat.max(1) {
        let mut targets = durable_targets(args.target);
        if round % 2 == 0 {
            // Whichever runs first may find the machine (disk, caches) in another state.
            targets.reverse();
        }
        for target in targets {
            rows.push(durable_row(&args, &work, &setup, round, target, timeout).await?);
        }
    }
    println!(
        "\n{} publisher(s), {PUB_WINDOW} in flight each, {}-byte payloads, fieldmq durability `{}`",
        args.publishers.max(1),
        args.payload,
        args.durability
    );
    print!("{}", render_durable(&rows));
    print_load();
    Ok(())
}

/// One broker, one round: start it, queue `messages` for the offline subscriber, drain.
async fn durable_row(
    args: &DurableArgs,
    work: &WorkDir,
    setup: &BrokerSetup,
    round: u32,
    target: Target,
    timeout: Duration,
) -> Result<DurableRow> {
    let dir = work
        .path()
        .join(format!("durable-{}-{round}", target.name()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "== durable {}: {} QoS 1 messages from {} publisher(s) to an offline persistent subscriber",
        target.name(),
        args.messages,
        args.publishers.max(1)
    );
    let mut row = DurableRow {
        round,
        target,
        messages: args.messages,
        publish: None,
        drain: None,
        steal: None,
        idle: None,
        broker_cpu_ms: BrokerCpu::default(),
        publish_disk_bytes: None,
    };
    let ticks_before = cpu_ticks();
    let mut publish_ticks = (None, None);
    let broker = match BrokerProcess::start(target, setup, &dir) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("   cannot start: {e:#}");
            return Ok(row);
        }
    };
    let cpu_now = || broker.pid().and_then(process_cpu_ms);
    let disk_now = || broker.pid().and_then(process_disk_writes);
    let res: Result<()> = async {
        register_offline_subscriber(broker.addr, args.payload).await?;
        let cpu_start = cpu_now();
        let disk_start = disk_now();
        publish_ticks.0 = cpu_ticks();
        let p = publish_qos1(
            broker.addr,
            args.messages,
            args.payload,
            args.rate,
            args.publishers,
            timeout,
        )
        .await?;
        publish_ticks.1 = cpu_ticks();
        let cpu_published = cpu_now();
        row.publish_disk_bytes = cpu_between(disk_start, disk_now());
        eprintln!("   published: {} acked, {:.0} msgs/s", p.acked, p.rate());
        row.publish = Some(p);
        row.broker_cpu_ms.publish = cpu_between(cpu_start, cpu_published);
        let d = drain(broker.addr, args.messages, args.payload, timeout).await?;
        row.broker_cpu_ms.drain = cpu_between(cpu_published, cpu_now());
        eprintln!(
            "   drained: {} ({} duplicates, session present {}), {:.0} msgs/s",
            d.received,
            d.duplicates,
            d.session_present,
            d.rate()
        );
        row.drain = Some(d);
        Ok(())
    }
    .await;
    let log = broker.log_path.clone();
    broker.stop();
    row.steal = tick_share(ticks_before, cpu_ticks(), |t| t.stolen);
    row.idle = tick_share(publish_ticks.0, publish_ticks.1, |t| t.idle);
    if let Err(e) = res {
        eprintln!("   failed: {e:#}\n{}", tail(&log, 10));
    }
    Ok(row)
}

fn render_durable(rows: &[DurableRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| target | messages | acked | publish msgs/s | PUBACK p50 | PUBACK p99 | drained | duplicates | missing | drain msgs/s | broker CPU µs/msg publish | drain | broker disk bytes/msg publish | round | CPU steal | CPU idle publish |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let (acked, pub_rate) = match &r.publish {
            Some(p) => (p.acked.to_string(), format!("{:.0}", p.rate())),
            None => ("failed".to_string(), "-".to_string()),
        };
        let ack_p = |p: f64| fmt_us(r.publish.as_ref().and_then(|r| r.ack_percentile(p)));
        let (ack_p50, ack_p99) = (ack_p(50.0), ack_p(99.0));
        let (drained, dups, missing, drain_rate) = match &r.drain {
            Some(d) => (
                d.received.to_string(),
                d.duplicates.to_string(),
                r.messages.saturating_sub(d.received).to_string(),
                format!("{:.0}", d.rate()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let percent = |share: Option<f64>| share.map_or("-".to_string(), |s| format!("{s:.0}%"));
        let (steal, idle) = (percent(r.steal), percent(r.idle));
        let cpu_publish = cpu_per_message(
            r.broker_cpu_ms.publish,
            r.publish.as_ref().map_or(0, |p| p.acked),
        );
        let cpu_drain = cpu_per_message(
            r.broker_cpu_ms.drain,
            r.drain.as_ref().map_or(0, |d| d.received),
        );
        let disk_publish = match (r.publish_disk_bytes, r.publish.as_ref()) {
            (Some(bytes), Some(p)) if p.acked > 0 => {
                format!("{:.0}", bytes as f64 / p.acked as f64)
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {acked} | {pub_rate} | {ack_p50} | {ack_p99} | {drained} | {dups} | {missing} | {drain_rate} | {cpu_publish} | {cpu_drain} | {disk_publish} | {} | {steal} | {idle} |",
            r.target.name(),
            r.messages,
            r.round
        );
    }
    let rate_p = |r: &DurableRow| r.publish.as_ref().map_or(0.0, PublishResult::rate);
    let rate_d = |r: &DurableRow| r.drain.as_ref().map_or(0.0, DrainResult::rate);
    let ratio = |a: f64, b: f64| (a > 0.0 && b > 0.0).then(|| a / b);
    // (publish, drain) ratios of each round that has both brokers.
    let rounds: Vec<(u32, Option<f64>, Option<f64>)> = rows
        .iter()
        .filter(|r| r.target == Target::Fieldmq)
        .filter_map(|f| {
            let m = rows
                .iter()
                .find(|m| m.round == f.round && m.target == Target::MosquittoPersist)?;
            Some((
                f.round,
                ratio(rate_p(f), rate_p(m)),
                ratio(rate_d(f), rate_d(m)),
            ))
        })
        .collect();
    if rounds.is_empty() {
        return out;
    }
    let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    let _ = writeln!(
        out,
        "\n| fieldmq/mosquitto | publish msgs/s | drain msgs/s |\n|---|---|---|"
    );
    for (round, publish, drain) in &rounds {
        let _ = writeln!(
            out,
            "| round {round} | {} | {} |",
            show(*publish),
            show(*drain)
        );
    }
    if rounds.len() > 1 {
        let _ = writeln!(
            out,
            "| median of {} rounds | {} | {} |",
            rounds.len(),
            show(median(rounds.iter().filter_map(|r| r.1).collect())),
            show(median(rounds.iter().filter_map(|r| r.2).collect()))
        );
    }
    out
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 0 => Some((values[mid - 1] + values[mid]) / 2.0),
        _ => Some(values[mid]),
    }
}

/// VmRSS and VmHWM (peak) of a process, KiB.
/// Start `target` in a new directory `dir`; `None` (said on stderr) if it cannot start.
fn start_broker_in(
    dir: &Path,
    target: Target,
    setup: &BrokerSetup,
) -> Result<Option<BrokerProcess>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match BrokerProcess::start(target, setup, dir) {
        Ok(broker) => Ok(Some(broker)),
        Err(e) => {
            eprintln!("   cannot start: {e:#}");
            Ok(None)
        }
    }
}

fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no VmRSS/VmHWM in {path}"),
    }
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The soft limit on open files of this process (from /proc/self/limits).
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    soft.parse().ok()
}

/// Bytes of all files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Open `n` MQTT 3.1.1 connections (keep alive 60, clean session) with raw TCP and one
/// CONNECT each, and wait for each CONNACK. Blocking; the streams stay open until dropped.
fn open_idle_clients(addr: SocketAddr, n: u32) -> Result<Vec<TcpStream>> {
    use std::io::{Read, Write};
    let mut streams = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(format!("bench-idle-{i}"));
        connect.keep_alive = 60;
        connect.clean_session = true;
        let mut buf = bytes::BytesMut::new();
        rumqttc::mqttbytes::v4::Packet::Connect(connect)
            .write(&mut buf, 1024)
            .map_err(|e| anyhow::anyhow!("cannot encode CONNECT: {e:?}"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("idle client {i}: cannot connect"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&buf)
            .with_context(|| format!("idle client {i}: cannot send CONNECT"))?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack)
            .with_context(|| format!("idle client {i}: no CONNACK"))?;
        if ack[0] != 0x20 || ack[1] != 0x02 || ack[3] != 0 {
            bail!("idle client {i}: refused or unexpected CONNACK {ack:02x?}");
        }
        streams.push(s);
    }
    Ok(streams)
}

/// RSS (KiB) before and after: idle clients.
struct IdleRow {
    target: Target,
    clients: u32,
    before: u64,
    after: u64,
}

/// RSS (KiB) before and after: messages queued for an offline subscriber.
struct QueueRow {
    target: Target,
    queued: u64,
    publish: PublishResult,
    before: u64,
    after: u64,
    peak: u64,
    disk: u64,
    drain: Option<DrainResult>,
}

async fn run_memory_bench(args: MemoryArgs) -> Result<()> {
    if args.payload < 8 {
        bail!("--payload must be at least 8 bytes");
    }
    if let Some(limit) = open_files_limit() {
        let need = u64::from(args.clients) + 64;
        if limit < need {
            bail!(
                "the open-files limit is {limit}, {need} needed for --clients {}: \
                 raise it (`ulimit -n {need}`) or use fewer clients",
                args.clients
            );
        }
    }
    let work = WorkDir::new(args.bins.keep_dir.clone())?;
    let timeout = Duration::from_secs(args.timeout);
    let mut idle_rows = Vec::new();
    let mut queue_rows = Vec::new();
    let targets: Vec<Target> = durable_targets(args.target);
    // (a) idle clients: fieldmq with its defaults (sync durability) and a listener limit above
    // the client count; Mosquitto without persistence (unlimited connections by default).
    if args.clients > 0 {
        for &target in &targets {
            let target = if target == Target::MosquittoPersist {
                Target::Mosquitto
            } else {
                target
            };
            let mut setup = BrokerSetup::new(&args.bins.fieldmq_bin, &args.bins.mosquitto_bin);
            setup.fieldmq_listener += &format!("max_connections = {}\n", args.clients + 100);
            eprintln!("== memory {}: {} idle clients", target.name(), args.clients);
            let dir = work.path().join(format!("idle-{}", target.name()));
            let Some(broker) = start_broker_in(&dir, target, &setup)? else {
                continue;
            };
            let pid = broker.pid().context("broker not running")?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (before, _) = rss_kib(pid)?;
            let (addr, n) = (broker.addr, args.clients);
            let opened = tokio::task::spawn_blocking(move || open_idle_clients(addr, n))
                .await
                .context("idle clients task panicked")?;
            match opened {
                Ok(streams) => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let (after, _) = rss_kib(pid)?;
                    eprintln!("   RSS {} → {}", fmt_mib(before), fmt_mib(after));
                    idle_rows.push(IdleRow {
                        target,
                        clients: n,
                        before,
                        after,
                    });
                    drop(streams);
                }
                Err(e) => eprintln!("   failed: {e:#}\n{}", tail(&broker.log_path, 10)),
            }
            broker.stop();
        }
    }
    // (b) messages queued for one offline persistent subscriber.
    if args.queued > 0 {
        let setup = queue_setup(&args.bins, args.queued, args.payload, 20, "sync");
        for &target in &targets {
            eprintln!(
                "== memory {}: {} QoS 1 messages queued for an offline subscriber",
                target.name(),
                args.queued
            );
            let dir = work.path().join(format!("queue-{}", target.name()));
            let Some(broker) = start_broker_in(&dir, target, &setup)? else {
                continue;
            };
            let pid = broker.pid().context("broker not running")?;
            let res: Result<QueueRow> = async {
                register_offline_subscriber(broker.addr, args.payload).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (before, _) = rss_kib(pid)?;
                let publish =
                    publish_qos1(broker.addr, args.queued, args.payload, 0, 1, timeout).await?;
                eprintln!(
                    "   published: {} acked, {:.0} msgs/s",
                    publish.acked,
                    publish.rate()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (after, peak) = rss_kib(pid)?;
                let disk = dir_size(&dir.join(if target == Target::Fieldmq {
                    "data"
                } else {
                    "persist"
                }));
                eprintln!(
                    "   RSS {} → {} (peak {}), on disk {:.1} MB",
                    fmt_mib(before),
                    fmt_mib(after),
                    fmt_mib(peak),
                    disk as f64 / 1e6
                );
                let drain = if args.drain {
                    let d = drain(broker.addr, args.queued, args.payload, timeout).await?;
                    eprintln!("   drained: {} ({:.0} msgs/s)", d.received, d.rate());
                    Some(d)
                } else {
                    None
                };
                Ok(QueueRow {
                    target,
                    queued: args.queued,
                    publish,
                    before,
                    after,
                    peak,
                    disk,
                    drain,
                })
            }
            .await;
            let log = broker.log_path.clone();
            broker.stop();
            match res {
                Ok(row) => queue_rows.push(row),
                Err(e) => eprintln!("   failed: {e:#}\n{}", tail(&log, 10)),
            }
        }
    }
    print!("{}", render_memory(&idle_rows, &queue_rows));
    print_load();
    Ok(())
}

fn render_memory(idle: &[IdleRow], queued: &[QueueRow]) -> String {
    let mut out = String::new();
    if !idle.is_empty() {
        let _ = writeln!(
            out,
            "\n| target | idle clients | RSS without clients | RSS with clients | per client |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for r in idle {
            let per = r.after.saturating_sub(r.before) as f64 / f64::from(r.clients.max(1));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} KiB |",
                r.target.name(),
                r.clients,
                fmt_mib(r.before),
                fmt_mib(r.after),
                per
            );
        }
    }
    if !queued.is_empty() {
        let _ = writeln!(
            out,
            "\n| target | queued | acked | publish msgs/s | RSS before | RSS after | peak RSS | on disk | drained (missing) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for r in queued {
            let drained = match &r.drain {
                Some(d) => format!("{} ({})", d.received, r.queued.saturating_sub(d.received)),
                None => "not checked".to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {} | {} | {:.1} MB | {drained} |",
                r.target.name(),
                r.queued,
                r.publish.acked,
                r.publish.rate(),
                fmt_mib(r.before),
                fmt_mib(r.after),
                fmt_mib(r.peak),
                r.disk as f64 / 1e6,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durable_row(round: u32, target: Target, publish_rate: u64, drain_rate: u64) -> DurableRow {
        DurableRow {
            round,
            target,
            messages: publish_rate,
            publish: Some(PublishResult {
                acked: publish_rate,
                elapsed: Duration::from_secs(1),
                ack_latencies_us: vec![100],
            }),
            drain: Some(DrainResult {
                received: drain_rate,
                duplicates: 0,
                session_present: true,
                elapsed: Duration::from_secs(1),
            }),
            steal: Some(12.4),
            idle: Some(30.2),
            broker_cpu_ms: BrokerCpu {
                publish: Some(publish_rate / 10),
                drain: None,
            },
            publish_disk_bytes: Some(publish_rate * 150),
        }
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn steal_and_idle_are_their_shares_of_the_ticks_between_two_readings() {
        let ticks = |all, stolen, idle| MachineTicks { all, stolen, idle };
        let (before, after) = (ticks(1000, 10, 500), ticks(1400, 110, 560));
        assert_eq!(
            tick_share(Some(before), Some(after), |t| t.stolen),
            Some(25.0)
        );
        assert_eq!(
            tick_share(Some(before), Some(after), |t| t.idle),
            Some(15.0)
        );
        assert_eq!(tick_share(Some(before), Some(before), |t| t.stolen), None);
        assert_eq!(tick_share(None, Some(after), |t| t.idle), None);
        let now = cpu_ticks().expect("/proc/stat on Linux");
        assert!(now.all >= now.stolen + now.idle);
    }

    #[test]
    fn broker_cpu_is_read_per_process_and_given_per_message() {
        let mine = process_cpu_ms(std::process::id()).expect("/proc/self/stat on Linux");
        // Burn CPU until the reading moves (10 ms ticks); bounded in time.
        let start = Instant::now();
        let mut x = 0u64;
        let mut later = mine;
        while later < mine + 20 && start.elapsed() < Duration::from_secs(5) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            later = process_cpu_ms(std::process::id()).expect("/proc/self/stat on Linux");
        }
        assert!(
            cpu_between(Some(mine), Some(later)).is_some_and(|ms| ms >= 20),
            "{mine} -> {later}"
        );
        assert_eq!(cpu_between(Some(20), Some(10)), None);
        assert_eq!(cpu_per_message(Some(250), 100_000), "2.5");
        assert_eq!(cpu_per_message(None, 100_000), "-");
        assert_eq!(cpu_per_message(Some(250), 0), "-");
    }

    #[test]
    fn disk_writes_are_read_from_proc_io() {
        assert_eq!(
            disk_writes_from("rchar: 10\nwchar: 20\nread_bytes: 0\nwrite_bytes: 4096\n"),
            Some(4096)
        );
        assert_eq!(disk_writes_from("rchar: 10\n"), None);
        assert!(
            process_disk_writes(std::process::id()).is_some(),
            "/proc/self/io on Linux"
        );
    }

    #[test]
    fn durable_ratios_are_given_per_round_with_their_median() {
        let rows = vec![
            durable_row(1, Target::Fieldmq, 50_000, 300_000),
            durable_row(1, Target::MosquittoPersist, 100_000, 300_000),
            durable_row(2, Target::MosquittoPersist, 50_000, 200_000),
            durable_row(2, Target::Fieldmq, 60_000, 300_000),
            durable_row(3, Target::Fieldmq, 90_000, 100_000),
            durable_row(3, Target::MosquittoPersist, 100_000, 400_000),
        ];
        let table = render_durable(&rows);
        assert!(table.contains("| round 1 | 0.50 | 1.00 |"), "{table}");
        assert!(table.contains("| round 2 | 1.20 | 1.50 |"), "{table}");
        assert!(table.contains("| round 3 | 0.90 | 0.25 |"), "{table}");
        assert!(
            table.contains("| median of 3 rounds | 0.90 | 1.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| 100.0 | - | 150 | 2 | 12% | 30% |"),
            "{table}"
        );
        let single = render_durable(&rows[..2]);
        assert!(single.contains("| round 1 | 0.50 | 1.00 |"), "{single}");
        assert!(!single.contains("median"), "{single}");
    }
}
