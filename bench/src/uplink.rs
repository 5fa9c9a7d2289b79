//! `fieldmq-bench uplink`: the store-and-forward path with 64-byte payloads.
//!
//! ```text
//! fieldmq-bench uplink            # full run (1,000,000 queued)
//! fieldmq-bench uplink 200000     # smaller queue
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
//! The broker, the uplink and the outbox run in this process, from the gateway's library
//! (the one section below that names its types). Needs Mosquitto; everything listens on
//! 127.0.0.1 only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::launch::{free_port, start_mosquitto, WorkDir};
use crate::proc::{process_cpu_ms, rss_kib};
use anyhow::{Context, Result};
use bytes::Bytes;
use product::{Outbox, OutboxRecord};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct UplinkArgs {
    /// Messages queued in the outbox for the append, memory and drain figures.
    #[arg(default_value_t = 1_000_000)]
    queued: u64,
    /// The Mosquitto binary (the cloud, and the bridge compared with).
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: PathBuf,
}

const PAYLOAD: usize = 64;
const E2E_MESSAGES: u64 = 200_000;
const APPEND_BATCH: usize = 2048;
/// What every Mosquitto of this bench is told: no queue or in-flight limit, so it never
/// drops what the comparison counts.
const MOSQUITTO_UNLIMITED: &str =
    "max_queued_messages 0\nmax_inflight_messages 0\nlog_type error\n";

/// Resident memory of this process (broker and uplink), MB.
fn rss_mb() -> f64 {
    rss_kib(std::process::id()).map_or(0.0, |(rss, _)| rss as f64 / 1024.0)
}

fn payload(n: u64) -> Bytes {
    let text = format!("{n:>20}");
    Bytes::from(text.clone() + &".".repeat(PAYLOAD - text.len()))
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

pub(crate) async fn run(args: &UplinkArgs) -> Result<()> {
    let queued = args.queued;
    let mosquitto = args.mosquitto_bin.as_path();
    println!(
        "fieldmq-bench uplink: {PAYLOAD}-byte payloads, {queued} queued, end-to-end {E2E_MESSAGES}"
    );
    let work = WorkDir::new(None)?;

    // 1. Append rate.
    let data = work.subdir("data")?;
    let path = product::outbox_path(&data);
    let outbox = Outbox::open(&path, product::queue_config()).await?;
    let started = Instant::now();
    let mut n = 0u64;
    while n < queued {
        let batch: Vec<OutboxRecord> = (n..(n + APPEND_BATCH as u64).min(queued))
            .map(|i| product::record("sites/bench/line/value", payload(i)))
            .collect();
        n += batch.len() as u64;
        outbox.append(batch).await?;
    }
    let append_rate = queued as f64 / started.elapsed().as_secs_f64();
    println!("outbox append (durable, batches of {APPEND_BATCH}): {append_rate:>10.0} msg/s");

    // Single-message appends from 64 concurrent callers (group commit).
    let small = work.subdir("small")?;
    let single = Outbox::open(&small.join("o.db"), product::queue_config()).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let single = single.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..500u64 {
                let record = product::record("sites/bench/line/value", payload(t * 1000 + i));
                single.append(vec![record]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let single_rate = 32_000.0 / started.elapsed().as_secs_f64();
    single.close().await?;
    println!("outbox append (1 message per call, 64 callers): {single_rate:>7.0} msg/s");
    outbox.close().await?;

    // 2. RSS with the queue full and the cloud down.
    let cloud_port = free_port()?;
    let gateway = product::Gateway::start(&data, cloud_port).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mb();
    println!("resident memory, {queued} queued, cloud down:   {rss:>10.1} MB");

    // 3. Drain to a loopback Mosquitto (started on the port the uplink keeps trying).
    let cloud = start_mosquitto(
        mosquitto,
        &work.subdir("cloud")?,
        cloud_port,
        MOSQUITTO_UNLIMITED,
    )?;
    let counter = Counter::start(cloud.port(), "drain-counter", "sites/bench/#", queued).await?;
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
        Counter::start(cloud.port(), "e2e-counter", "sites/bench/#", E2E_MESSAGES).await?;
    let pids = [Some(std::process::id()), cloud.pid()];
    let cpu_before = cpu_ms(&pids);
    let start = publish_load(gateway.listener, E2E_MESSAGES).await?;
    let (count, _, last) = e2e_counter.wait(Duration::from_secs(10)).await;
    let fieldmq_cpu = cpu_us_per_message(cpu_ms(&pids) - cpu_before, count);
    let fieldmq_rate = rate(count, Some(start), last);
    println!("end to end via fieldmq ({count} received):    {fieldmq_rate:>10.0} msg/s");
    gateway.stop().await;
    drop(cloud);
    if let Some(report) = e2e_counter.report("end to end via fieldmq") {
        // Still in the outbox means late (the wait gave up), not lost.
        let left = Outbox::open(&path, product::queue_config()).await?;
        let depth = left.stats().await?.depth;
        left.close().await?;
        println!("{report}; still in the outbox: {depth}");
    }

    // 4b. The same load through a Mosquitto bridge.
    let cloud = start_mosquitto(
        mosquitto,
        &work.subdir("bridge-cloud")?,
        free_port()?,
        MOSQUITTO_UNLIMITED,
    )?;
    let edge_dir = work.subdir("bridge-edge")?;
    let bridge = format!(
        "{MOSQUITTO_UNLIMITED}persistence true\npersistence_location {}/\n\
         connection cloud\naddress 127.0.0.1:{}\ntopic # out 1 plant/ sites/bench/\n\
         cleansession false\nbridge_protocol_version mqttv311\nbridge_max_packet_size 0\n",
        edge_dir.display(),
        cloud.port()
    );
    let edge = start_mosquitto(mosquitto, &edge_dir, free_port()?, &bridge)?;
    let bridge_counter = Counter::start(
        cloud.port(),
        "bridge-counter",
        "sites/bench/#",
        E2E_MESSAGES,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // the bridge connects
    let pids = [Some(std::process::id()), cloud.pid(), edge.pid()];
    let cpu_before = cpu_ms(&pids);
    let start = publish_load(edge.addr, E2E_MESSAGES).await?;
    let (count, _, last) = bridge_counter.wait(Duration::from_secs(10)).await;
    let bridge_cpu = cpu_us_per_message(cpu_ms(&pids) - cpu_before, count);
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
    Ok(())
}

/// User + system CPU of these processes so far, ms.
fn cpu_ms(pids: &[Option<u32>]) -> u64 {
    pids.iter()
        .flatten()
        .filter_map(|&pid| process_cpu_ms(pid))
        .sum()
}

fn cpu_us_per_message(ms: u64, messages: u64) -> f64 {
    ms as f64 * 1000.0 / messages.max(1) as f64
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// Everything this bench takes from the gateway's library: the outbox, and a broker with
/// one uplink as the gateway runs them.
mod product {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use anyhow::Result;
    use bytes::Bytes;
    use fieldmq::broker;
    use fieldmq::broker::config::{BrokerConfig, ListenerConfig};
    use fieldmq::config::GatewayConfig;
    use fieldmq::model::QoS;
    pub(super) use fieldmq::store::{Outbox, OutboxRecord};
    use fieldmq::uplink;
    use fieldmq::uplink::config::{
        MqttVersion, OutRoute, QueueConfig, UplinkConfig, UplinkUrl, UrlScheme, WhenFull,
    };
    use tokio_util::sync::CancellationToken;

    /// The uplink's name, and so its outbox file's.
    const UPLINK: &str = "cloud";

    pub(super) fn outbox_path(data_dir: &Path) -> PathBuf {
        uplink::outbox_path(data_dir, UPLINK)
    }

    pub(super) fn queue_config() -> QueueConfig {
        uplink_config(0).queue
    }

    /// A durable QoS 1 message for the cloud.
    pub(super) fn record(topic: &str, payload: Bytes) -> OutboxRecord {
        OutboxRecord {
            topic: topic.into(),
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        }
    }

    /// The embedded broker on a free port and one uplink to 127.0.0.1:`cloud_port`
    /// forwarding `plant/#` as `sites/bench/#`, its outbox in `data_dir`.
    pub(super) struct Gateway {
        pub(super) listener: SocketAddr,
        shutdown: CancellationToken,
        uplink: uplink::RunningUplink,
        /// Held until the end: dropping it would end the listeners.
        _broker: broker::RunningBroker,
    }

    impl Gateway {
        pub(super) async fn start(data_dir: &Path, cloud_port: u16) -> Result<Gateway> {
            let shutdown = CancellationToken::new();
            let local = broker::start(&broker_config()?, shutdown.clone()).await?;
            let uplink = uplink::start(
                uplink_config(cloud_port),
                &gateway(data_dir),
                local.handle.clone(),
                shutdown.clone(),
            )
            .await?;
            Ok(Gateway {
                listener: local.local_addrs[0],
                shutdown,
                uplink,
                _broker: local,
            })
        }

        pub(super) async fn stop(self) {
            self.shutdown.cancel();
            let _ = self.uplink.wait().await;
        }
    }

    fn uplink_config(port: u16) -> UplinkConfig {
        UplinkConfig {
            name: UPLINK.into(),
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
                payload: None,
            }],
            routes_in: Vec::new(),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(1),
            sparkplug: None,
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
}
