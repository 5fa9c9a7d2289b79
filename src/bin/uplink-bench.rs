//! `uplink-bench`: the store-and-forward path with 64-byte payloads.
//!
//! ```text
//! cargo run --release --bin uplink-bench            # full run (1,000,000 queued)
//! cargo run --release --bin uplink-bench -- 200000  # smaller queue
//! ```
//!
//! Prints:
//! 1. outbox append rate (durable: WAL, synchronous=FULL, batches as the ingest task makes);
//! 2. resident memory of this process (broker + uplink) with the queue full and the cloud
//!    down;
//! 3. drain rate of that queue to a loopback Mosquitto with QoS 1;
//! 4. end-to-end rate: an MQTT publisher (QoS 1) on fieldmq's listener → uplink → cloud
//!    Mosquitto → subscriber, and the same load through a Mosquitto bridge (edge Mosquitto
//!    with `persistence true` bridged to a cloud Mosquitto), with the ratio fieldmq/Mosquitto.
//!
//! Needs `mosquitto` on PATH. Everything listens on 127.0.0.1 only.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use fieldmq::broker;
use fieldmq::broker::config::{BrokerConfig, ListenerConfig};
use fieldmq::config::GatewayConfig;
use fieldmq::model::QoS;
use fieldmq::store::{Outbox, OutboxRecord};
use fieldmq::uplink;
use fieldmq::uplink::config::{
    MqttVersion, OutRoute, QueueConfig, UplinkConfig, UplinkUrl, UrlScheme, WhenFull,
};
use tokio_util::sync::CancellationToken;

const PAYLOAD: usize = 64;
const E2E_MESSAGES: u64 = 200_000;
const APPEND_BATCH: usize = 2048;

fn main() -> Result<()> {
    let queued: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("argument: number of messages to queue")?,
        None => 1_000_000,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(queued))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("uplink-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn payload(n: u64) -> Bytes {
    let text = format!("{n:>20}");
    Bytes::from(text.clone() + &".".repeat(PAYLOAD - text.len()))
}

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    fn start(dir: &Path, name: &str, extra: &[String]) -> Result<Mosquitto> {
        let port = free_port()?;
        let mut conf = vec![
            "user root".to_string(),
            "allow_anonymous true".to_string(),
            "max_queued_messages 0".to_string(),
            "max_inflight_messages 0".to_string(),
            "log_type error".to_string(),
            format!("listener {port} 127.0.0.1"),
        ];
        conf.extend(extra.iter().cloned());
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf.join("\n") + "\n")?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start mosquitto (is it installed?)")?;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("mosquitto {name} did not listen within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Mosquitto { child, port })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a [`Counter`] has seen: distinct sequence numbers (the number each payload starts
/// with), duplicates, and its own reconnects, so a shortfall can be told apart from a
/// counter that lost its subscription.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    distinct: u64,
    duplicates: u64,
    /// Payloads outside `0..expected` or without a number.
    foreign: u64,
    reconnects: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Seen {
    fn new(expected: u64) -> Seen {
        Seen {
            bits: vec![0; expected.div_ceil(64) as usize],
            ..Seen::default()
        }
    }

    fn record(&mut self, payload: &[u8], now: Instant) {
        let number = payload
            .get(..20)
            .and_then(|head| std::str::from_utf8(head).ok())
            .and_then(|head| head.trim().parse::<u64>().ok());
        let Some((word, bit)) = number
            .map(|n| ((n / 64) as usize, 1u64 << (n % 64)))
            .filter(|(word, _)| *word < self.bits.len())
        else {
            self.foreign += 1;
            return;
        };
        if self.bits[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.bits[word] |= bit;
        self.distinct += 1;
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// The first few missing sequence numbers below `expected`, as ranges.
    fn missing_ranges(&self, expected: u64, at_most: usize) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for n in 0..expected {
            if self.bits[(n / 64) as usize] & (1 << (n % 64)) != 0 {
                continue;
            }
            let full = ranges.len() == at_most;
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == n => *end = n,
                _ if full => break,
                _ => ranges.push((n, n)),
            }
        }
        ranges
    }
}

/// Counts the distinct messages on `filter` (QoS 0, as a cloud consumer would take them).
/// It subscribes again after every reconnect: a clean session forgets the subscription.
struct Counter {
    seen: Arc<std::sync::Mutex<Seen>>,
    expected: u64,
}

impl Counter {
    async fn start(port: u16, id: &str, filter: &str, expected: u64) -> Result<Counter> {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let seen = Arc::new(std::sync::Mutex::new(Seen::new(expected)));
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let s = seen.clone();
        let filter = filter.to_owned();
        tokio::spawn(async move {
            let mut connects = 0u64;
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        connects += 1;
                        if connects > 1 {
                            if let Ok(mut seen) = s.lock() {
                                seen.reconnects += 1;
                            }
                        }
                        // Queued in the client; sent on the next poll.
                        let _ = client.try_subscribe(&filter, rumqttc::QoS::AtMostOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                        if let Ok(mut seen) = s.lock() {
                            seen.record(&publish.payload, Instant::now());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .context("counter SUBACK")??;
        Ok(Counter { seen, expected })
    }

    fn distinct(&self) -> u64 {
        self.seen.lock().map_or(0, |s| s.distinct)
    }

    /// Wait until every expected message arrived or none arrived for `idle`. Returns
    /// (distinct count, first, last).
    async fn wait(&self, idle: Duration) -> (u64, Option<Instant>, Option<Instant>) {
        let mut seen = 0;
        let mut since = Instant::now();
        loop {
            let count = self.distinct();
            if count >= self.expected {
                break;
            }
            if count != seen {
                seen = count;
                since = Instant::now();
            } else if since.elapsed() > idle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Ok(seen) = self.seen.lock() else {
            return (0, None, None);
        };
        (seen.distinct, seen.first, seen.last)
    }

    /// One line on what did not arrive, or nothing when everything did.
    fn report(&self, what: &str) -> Option<String> {
        let seen = self.seen.lock().ok()?;
        let missing = self.expected - seen.distinct;
        if missing == 0 && seen.duplicates == 0 && seen.reconnects == 0 {
            return None;
        }
        let ranges: Vec<String> = seen
            .missing_ranges(self.expected, 5)
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        Some(format!(
            "{what}: {missing} missing (first: {}), {} duplicates, {} foreign, counter reconnects {}",
            if ranges.is_empty() { "-".to_string() } else { ranges.join(", ") },
            seen.duplicates,
            seen.foreign,
            seen.reconnects
        ))
    }
}

fn uplink_config(port: u16) -> UplinkConfig {
    UplinkConfig {
        name: "cloud".into(),
        url: UplinkUrl {
            scheme: UrlScheme::Mqtt,
            host: "127.0.0.1".into(),
            port,
            path: "/mqtt".into(),
        },
        protocol: MqttVersion::V5,
        client_id: "bench-gw".into(),
        keep_alive: Duration::from_secs(30),
        username: None,
        password: None,
        tls: None,
        clean_start: false,
        session_expiry: Duration::from_secs(3600),
        will: None,
        birth: None,
        queue: QueueConfig {
            max_messages: 2_000_000,
            max_bytes: 1024 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            when_full: WhenFull::DropOldest,
        },
        inflight: 100,
        max_rate: None,
        routes_out: vec![OutRoute {
            filter: "plant/#".into(),
            remote_prefix: Some("sites/bench/".into()),
            remote_template: None,
            qos: QoS::AtLeastOnce,
            retain: false,
            durable: true,
        }],
        routes_in: Vec::new(),
        reconnect_min: Duration::from_millis(500),
        reconnect_max: Duration::from_secs(1),
    }
}

fn gateway(data_dir: &Path) -> GatewayConfig {
    GatewayConfig {
        id: "bench".into(),
        data_dir: data_dir.to_path_buf(),
        log_level: "warn".into(),
        status_topic: "fieldmq/bench/status".into(),
        shutdown_timeout: Duration::from_secs(10),
        worker_threads: None,
    }
}

fn broker_config() -> Result<BrokerConfig> {
    Ok(BrokerConfig {
        listeners: vec![ListenerConfig {
            max_connections: 100,
            ..ListenerConfig::tcp("127.0.0.1:0".parse()?)
        }],
        allow_anonymous: true,
        password_file: None,
        max_packet_size: 1024 * 1024,
        max_queued_messages: 100_000,
        max_inflight: 100,
        ..BrokerConfig::default()
    })
}

/// Publish `n` messages with QoS 1 as fast as the broker acknowledges (window 100).
async fn publish_load(addr: SocketAddr, n: u64) -> Result<Instant> {
    let mut options =
        rumqttc::MqttOptions::new("bench-publisher", addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(100);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    let acked = Arc::new(AtomicU64::new(0));
    let a = acked.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let start = Instant::now();
    for i in 0..n {
        client
            .publish(
                "plant/line/value",
                rumqttc::QoS::AtLeastOnce,
                false,
                payload(i).to_vec(),
            )
            .await?;
    }
    while acked.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    Ok(start)
}

fn rate(count: u64, from: Option<Instant>, to: Option<Instant>) -> f64 {
    match (from, to) {
        (Some(a), Some(b)) if b > a => count as f64 / (b - a).as_secs_f64(),
        _ => 0.0,
    }
}

async fn run(queued: u64) -> Result<()> {
    println!("uplink-bench: {PAYLOAD}-byte payloads, {queued} queued, end-to-end {E2E_MESSAGES}");

    // 1. Append rate.
    let data = scratch_dir("data")?;
    let path = uplink::outbox_path(&data, "cloud");
    let outbox = Outbox::open(&path, uplink_config(0).queue).await?;
    let started = Instant::now();
    let mut n = 0u64;
    while n < queued {
        let batch: Vec<OutboxRecord> = (n..(n + APPEND_BATCH as u64).min(queued))
            .map(|i| OutboxRecord {
                topic: "sites/bench/line/value".into(),
                payload: payload(i),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: None,
            })
            .collect();
        n += batch.len() as u64;
        outbox.append(batch).await?;
    }
    let append_rate = queued as f64 / started.elapsed().as_secs_f64();
    println!("outbox append (durable, batches of {APPEND_BATCH}): {append_rate:>10.0} msg/s");

    // Single-message appends from 64 concurrent callers (group commit).
    let small = scratch_dir("small")?;
    let single = Outbox::open(&small.join("o.db"), uplink_config(0).queue).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let single = single.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..500u64 {
                let record = OutboxRecord {
                    topic: "sites/bench/line/value".into(),
                    payload: payload(t * 1000 + i),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: None,
                };
                single.append(vec![record]).await?;
            }
            Ok::<(), fieldmq::store::StoreError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let single_rate = 32_000.0 / started.elapsed().as_secs_f64();
    single.close().await?;
    let _ = std::fs::remove_dir_all(&small);
    println!("outbox append (1 message per call, 64 callers): {single_rate:>7.0} msg/s");
    outbox.close().await?;

    // 2. RSS with the queue full and the cloud down.
    let cloud_dir = scratch_dir("cloud")?;
    let cloud_port = free_port()?;
    let shutdown = CancellationToken::new();
    let local = broker::start(&broker_config()?, shutdown.clone()).await?;
    let running = uplink::start(
        uplink_config(cloud_port),
        &gateway(&data),
        local.handle.clone(),
        shutdown.clone(),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mb();
    println!("resident memory, {queued} queued, cloud down:   {rss:>10.1} MB");

    // 3. Drain to a loopback Mosquitto (started on the port the uplink keeps trying).
    let cloud = start_on_port(&cloud_dir, cloud_port)?;
    let counter = Counter::start(cloud.port, "drain-counter", "sites/bench/#", queued).await?;
    let (count, first, last) = counter.wait(Duration::from_secs(5)).await;
    let drain_rate = rate(count.saturating_sub(1), first, last);
    println!("drain to Mosquitto, QoS 1 ({count} received):  {drain_rate:>10.0} msg/s");
    let rss_after = rss_mb();
    println!("resident memory after the drain:               {rss_after:>10.1} MB");

    // 4a. End to end through fieldmq.
    if let Some(report) = counter.report("drain") {
        println!("{report}");
    }
    let e2e_counter =
        Counter::start(cloud.port, "e2e-counter", "sites/bench/#", E2E_MESSAGES).await?;
    let pids = [std::process::id(), cloud.child.id()];
    let cpu_before = cpu_ticks(&pids);
    let start = publish_load(local.local_addrs[0], E2E_MESSAGES).await?;
    let (count, _, last) = e2e_counter.wait(Duration::from_secs(10)).await;
    let fieldmq_cpu = cpu_us_per_message(cpu_ticks(&pids) - cpu_before, count);
    let fieldmq_rate = rate(count, Some(start), last);
    println!("end to end via fieldmq ({count} received):    {fieldmq_rate:>10.0} msg/s");
    shutdown.cancel();
    let _ = running.wait().await;
    drop(cloud);
    if let Some(report) = e2e_counter.report("end to end via fieldmq") {
        // Still in the outbox means late (the wait gave up), not lost.
        let left = Outbox::open(&path, uplink_config(0).queue).await?;
        let depth = left.stats().await?.depth;
        left.close().await?;
        println!("{report}; still in the outbox: {depth}");
    }

    // 4b. The same load through a Mosquitto bridge.
    let bridge_dir = scratch_dir("bridge")?;
    let cloud = Mosquitto::start(&bridge_dir, "cloud", &[])?;
    let edge = Mosquitto::start(
        &bridge_dir,
        "edge",
        &[
            "persistence true".into(),
            format!("persistence_location {}/", bridge_dir.display()),
            "connection cloud".into(),
            format!("address 127.0.0.1:{}", cloud.port),
            "topic # out 1 plant/ sites/bench/".into(),
            "cleansession false".into(),
            "bridge_protocol_version mqttv311".into(),
            "bridge_max_packet_size 0".into(),
        ],
    )?;
    let bridge_counter =
        Counter::start(cloud.port, "bridge-counter", "sites/bench/#", E2E_MESSAGES).await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // the bridge connects
    let pids = [std::process::id(), cloud.child.id(), edge.child.id()];
    let cpu_before = cpu_ticks(&pids);
    let start = publish_load(SocketAddr::from(([127, 0, 0, 1], edge.port)), E2E_MESSAGES).await?;
    let (count, _, last) = bridge_counter.wait(Duration::from_secs(10)).await;
    let bridge_cpu = cpu_us_per_message(cpu_ticks(&pids) - cpu_before, count);
    let bridge_rate = rate(count, Some(start), last);
    println!("end to end via a Mosquitto bridge ({count} received): {bridge_rate:>6.0} msg/s");
    if let Some(report) = bridge_counter.report("end to end via the Mosquitto bridge") {
        println!("{report}");
    }
    let ratio = if bridge_rate > 0.0 {
        fieldmq_rate / bridge_rate
    } else {
        0.0
    };
    println!("ratio fieldmq / Mosquitto bridge:              {ratio:>10.2}");
    println!(
        "CPU per message end to end (all processes, incl. publisher and subscriber): \
         fieldmq {fieldmq_cpu:.1} us, Mosquitto bridge {bridge_cpu:.1} us"
    );
    drop(edge);
    drop(cloud);

    println!();
    println!(
        "targets: append >= 50000 {}, drain >= 20000 {}, RSS <= 50 MB {}, ratio >= 1.0 {}",
        verdict(append_rate >= 50_000.0),
        verdict(drain_rate >= 20_000.0),
        verdict(rss <= 50.0),
        verdict(ratio >= 1.0)
    );
    for dir in [&data, &cloud_dir, &bridge_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

fn start_on_port(dir: &Path, port: u16) -> Result<Mosquitto> {
    let conf = [
        "user root".to_string(),
        "allow_anonymous true".to_string(),
        "max_queued_messages 0".to_string(),
        "max_inflight_messages 0".to_string(),
        "log_type error".to_string(),
        format!("listener {port} 127.0.0.1"),
    ];
    let path = dir.join("cloud.conf");
    std::fs::write(&path, conf.join("\n") + "\n")?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start mosquitto")?;
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("mosquitto did not listen within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Mosquitto { child, port })
}

/// User + system CPU of these processes, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .sum()
}

fn cpu_us_per_message(ticks: u64, messages: u64) -> f64 {
    ticks as f64 * 10_000.0 / messages.max(1) as f64
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}
