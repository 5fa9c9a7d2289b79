//! Randomised fault injection at process level: the real `fieldmq` binary (`durability =
//! "sync"`) bridges LAN QoS 1 traffic to a real Mosquitto with persistence (the cloud), while
//! a seeded schedule kills (SIGKILL) and freezes (SIGSTOP/SIGCONT) the gateway and the
//! cloud. At the end, with the faults stopped and everything drained, it checks what the
//! gateway promises:
//!
//! - every message a LAN publisher got a PUBACK for reaches the LAN persistent subscriber;
//! - every such message reaches the cloud's persistent subscriber, unless the cloud itself
//!   lost it (below);
//! - per publisher, first arrivals come in publish order: after removing every arrival of a
//!   (publisher, sequence number) already seen, the sequence numbers increase;
//! - duplicates stay within the windows: after each reconnect the uplink sends again at most
//!   its in-flight window of messages it had sent before (the design's "duplicates bounded by
//!   the in-flight window"), and a restarted gateway delivers again to the LAN subscriber at
//!   most its in-flight window and the acknowledgements it had not recorded yet.
//!
//! Topology. Publishers `fault-pub-<n>` (3.1.1, clean session) publish `plant/p<n>` with
//! payload `<n>:<seq>:<attempt>`, where the attempt is the publisher's connection number: a
//! message re-sent after a reconnect is the same (publisher, seq) but a different copy, so a
//! copy seen twice is a redelivery (by the gateway, or at the cloud also by Mosquitto) and a
//! (publisher, seq) seen twice in different copies is the publisher's own re-send. A publisher that loses its connection starts again
//! from its first unacknowledged message. `fault-lan-sub` (clean session false, QoS 1)
//! subscribes `plant/#` on the gateway; the uplink route `plant/#` (QoS 1, durable outbox)
//! sends to `sites/fault/...` on Mosquitto, where `fault-cloud-sub` (clean session false,
//! QoS 1) subscribes. The gateway's uplink reaches Mosquitto through a relay in this test that
//! forwards bytes unchanged and reads the MQTT packets on the way.
//!
//! Why the relay: Mosquitto writes its persistence file every `autosave_interval` (and at a
//! clean stop), after it has sent its PUBACK, so a SIGKILL of Mosquitto loses messages it
//! had acknowledged and not yet delivered or saved. That is the cloud's loss: the gateway may
//! delete a row once the cloud acknowledged it. The relay records which Mosquitto run
//! acknowledged which message (it connects to the cloud under the lock the fault injector
//! holds to kill and restart, so every connection knows its run). A message may be missing
//! at the cloud only if every run that acknowledged it was later killed with SIGKILL; a
//! message the cloud never acknowledged, or that a run still alive at the end acknowledged,
//! must arrive. A gateway that deleted a row before the cloud's PUBACK
//! fails this: the rows in flight when Mosquitto is killed were never acknowledged.
//!
//! Budget: `FIELDMQ_FAULT_SEED` (default: from the clock), `FIELDMQ_FAULT_SEEDS` seeds in a
//! row (default 1; seed, seed + 1, ...), `FIELDMQ_FAULT_ROUNDS` faults per seed (default
//! 8). The seed is printed at the start and in every failure; a seed replays the same fault
//! schedule (kinds, delays, durations), not the same interleaving of the processes.
//! Ten seeds: `FIELDMQ_FAULT_SEEDS=10 cargo test --release --test it fault_injection:: --
//! --nocapture`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cloud::{mosquitto_available, Cloud, CloudOptions};
use gateway::GatewayProcess;
use mqtt::{Frame, Version};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::util::{cloud, gateway, mqtt};

const GATEWAY: &str = "fault";
const PUBLISHERS: u32 = 3;
/// Messages a publisher has submitted and not had acknowledged, at most.
const PUBLISHER_WINDOW: usize = 20;
/// Between two publishes of one publisher: at most 400 messages per second each.
const PACE: Duration = Duration::from_micros(2500);
/// The uplink's in-flight window (`inflight` in the config below).
const UPLINK_INFLIGHT: usize = 100;
/// What a restarted gateway may deliver again to a persistent subscriber: its in-flight
/// window (`max_inflight`, 20) and the acknowledgements not yet recorded in the store (a
/// connection reports them every 256 or within 20 ms, docs/broker.md; one report may be
/// on its way to the store and the next one still gathering).
const LAN_REDELIVERY: usize = 20 + 2 * 256;
const DEFAULT_ROUNDS: u64 = 8;
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Pause before a client tries to connect again.
const RETRY: Duration = Duration::from_millis(50);

/// Time between two faults.
const GAP_MS: Range<u64> = 200..1200;
/// How long a frozen process stays frozen (well below every keep alive).
const STOP_MS: Range<u64> = 100..1500;
/// How long a killed process stays down before it is started again.
const DOWN_MS: Range<u64> = 0..500;
/// One round (its gap, its fault and any restart) must end within this.
const ROUND_LIMIT: Duration = Duration::from_secs(45);
/// Bounds on the setup and on the end: publishers finishing, the queues draining.
const SETUP_LIMIT: Duration = Duration::from_secs(20);
const FINISH_LIMIT: Duration = Duration::from_secs(20);
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn acknowledged_messages_arrive_in_order_through_random_kills_and_stops_of_gateway_and_cloud() {
    if !mosquitto_available("fault_injection") {
        return;
    }
    let budget = Budget::from_env();
    let started = Instant::now();
    for i in 0..budget.seeds {
        let seed = budget.first_seed.wrapping_add(i);
        eprintln!(
            "fault injection: seed {seed} ({} of {}), {} rounds; replay with \
             FIELDMQ_FAULT_SEED={seed} FIELDMQ_FAULT_ROUNDS={}",
            i + 1,
            budget.seeds,
            budget.rounds,
            budget.rounds
        );
        let report = run_seed(seed, budget.rounds);
        eprintln!("{report}");
    }
    eprintln!(
        "fault injection: {} seeds from {} passed in {:.1} s",
        budget.seeds,
        budget.first_seed,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// Budget and messages
// ---------------------------------------------------------------------------------------

struct Budget {
    first_seed: u64,
    seeds: u64,
    rounds: u64,
}

impl Budget {
    fn from_env() -> Budget {
        let first_seed = env_number("FIELDMQ_FAULT_SEED").unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos();
            // Short enough to type back in.
            (nanos % 1_000_000_000) as u64
        });
        Budget {
            first_seed,
            seeds: env_number("FIELDMQ_FAULT_SEEDS").unwrap_or(1).max(1),
            rounds: env_number("FIELDMQ_FAULT_ROUNDS").unwrap_or(DEFAULT_ROUNDS),
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
    )
}

/// One LAN message: who published it and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Msg {
    publisher: u32,
    seq: u64,
}

/// One copy of a message: the publisher's connection that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Sent {
    msg: Msg,
    attempt: u64,
}

impl Sent {
    fn payload(&self) -> String {
        format!("{}:{}:{}", self.msg.publisher, self.msg.seq, self.attempt)
    }

    fn parse(payload: &[u8]) -> Option<Sent> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.split(':');
        let publisher = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse().ok()?;
        Some(Sent {
            msg: Msg { publisher, seq },
            attempt,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// One seed
// ---------------------------------------------------------------------------------------

fn run_seed(seed: u64, rounds: u64) -> Report {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run_seed_async(seed, rounds))
}

async fn run_seed_async(seed: u64, rounds: u64) -> Report {
    let started = Instant::now();
    let ctx =
        format!("seed {seed} (replay: FIELDMQ_FAULT_SEED={seed} FIELDMQ_FAULT_ROUNDS={rounds})");
    let dir = tempfile::tempdir().expect("tempdir");
    let persistence = dir.path().join("cloud");
    std::fs::create_dir_all(&persistence).expect("cloud persistence dir");
    let cloud = Cloud::start(CloudOptions {
        mtls: None,
        extra: vec![
            "persistence true".into(),
            format!("persistence_location {}/", persistence.display()),
            "autosave_interval 1".into(),
        ],
    });
    let cloud_addr = cloud.addr();
    let cloud = Arc::new(Mutex::new(CloudSide {
        cloud,
        generation: 0,
        running: true,
        killed: BTreeSet::new(),
    }));
    let stop_subscribers = CancellationToken::new();

    // The cloud subscriber's session, saved by a clean stop so that every later run of
    // Mosquitto starts with it.
    let (_cloud_addr_tx, cloud_addr_rx) = watch::channel(cloud_addr);
    let cloud_arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let cloud_subscriber = tokio::spawn(subscriber(
        "fault-cloud-sub",
        format!("sites/{GATEWAY}/#"),
        cloud_addr_rx,
        cloud_arrivals.clone(),
        stop_subscribers.clone(),
    ));
    wait_for(&ctx, "the cloud subscriber's SUBACK", SETUP_LIMIT, || {
        lock(&cloud_arrivals).subscribed
    })
    .await;
    {
        let mut side = lock(&cloud);
        side.cloud.stop();
        side.cloud.restart();
        side.generation += 1;
    }
    wait_for(
        &ctx,
        "the cloud subscriber back after a clean restart",
        SETUP_LIMIT,
        || lock(&cloud_arrivals).connections >= 2,
    )
    .await;

    let relay_log = Arc::new(Mutex::new(RelayLog::default()));
    let relay = Relay::start(cloud.clone(), relay_log.clone());
    let config = gateway_config(dir.path(), relay.addr);
    let gateway = GatewayProcess::start(&config);
    let (addr_tx, addr_rx) = watch::channel(gateway.addr);

    let lan_arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let lan_subscriber = tokio::spawn(subscriber(
        "fault-lan-sub",
        "plant/#".into(),
        addr_rx.clone(),
        lan_arrivals.clone(),
        stop_subscribers.clone(),
    ));
    wait_for(&ctx, "the LAN subscriber's SUBACK", SETUP_LIMIT, || {
        lock(&lan_arrivals).subscribed
    })
    .await;

    let stop_publishing = CancellationToken::new();
    let mut publishers = Vec::new();
    let mut published = Vec::new();
    for n in 0..PUBLISHERS {
        let log = Arc::new(Mutex::new(Published::default()));
        publishers.push(tokio::spawn(publisher(
            n,
            addr_rx.clone(),
            log.clone(),
            stop_publishing.clone(),
        )));
        published.push(log);
    }
    wait_for(
        &ctx,
        "a PUBACK for every publisher and traffic at the cloud",
        SETUP_LIMIT,
        || {
            published.iter().all(|p| !lock(p).acked.is_empty())
                && !lock(&cloud_arrivals).copies.is_empty()
        },
    )
    .await;

    // The faults, on a thread of their own: they block on processes.
    let injector = Injector {
        rng: StdRng::seed_from_u64(seed),
        ctx: ctx.clone(),
        gateway,
        config,
        cloud: cloud.clone(),
        addr_tx,
        counts: BTreeMap::new(),
    };
    let (gateway, faults) = tokio::task::spawn_blocking(move || injector.run(rounds))
        .await
        .unwrap_or_else(|e| panic!("{ctx}: the fault injector failed: {e}"));
    let faults_done = Instant::now();

    // Stop publishing; each publisher ends once its last messages are acknowledged.
    stop_publishing.cancel();
    for task in publishers {
        if tokio::time::timeout(FINISH_LIMIT, task).await.is_err() {
            panic!("{ctx}: a publisher did not finish within {FINISH_LIMIT:?} after the faults");
        }
    }
    let acked: BTreeSet<Msg> = published
        .iter()
        .enumerate()
        .flat_map(|(n, p)| {
            lock(p)
                .acked
                .iter()
                .map(|&seq| Msg {
                    publisher: n as u32,
                    seq,
                })
                .collect::<Vec<_>>()
        })
        .collect();

    // What the cloud may have lost itself: acknowledged only by runs of Mosquitto that were
    // later killed with SIGKILL.
    let killed = lock(&cloud).killed.clone();
    let excused: HashSet<Msg> = {
        let log = lock(&relay_log);
        let (by_killed, by_survivors): (Vec<_>, Vec<_>) =
            log.acked.iter().partition(|(g, _)| killed.contains(g));
        let survived: HashSet<Msg> = by_survivors
            .into_iter()
            .flat_map(|(_, m)| m.iter().copied())
            .collect();
        by_killed
            .into_iter()
            .flat_map(|(_, m)| m.iter().copied())
            .filter(|m| !survived.contains(m))
            .collect()
    };
    let for_cloud: BTreeSet<Msg> = acked
        .iter()
        .filter(|m| !excused.contains(m))
        .copied()
        .collect();

    // Whatever is missing after this is reported below.
    wait_until(DRAIN_LIMIT, || {
        lock(&lan_arrivals).covers(&acked) && lock(&cloud_arrivals).covers(&for_cloud)
    })
    .await;
    let drain_time = faults_done.elapsed();
    stop_subscribers.cancel();
    let _ = tokio::time::timeout(FINISH_LIMIT, lan_subscriber).await;
    let _ = tokio::time::timeout(FINISH_LIMIT, cloud_subscriber).await;

    let mut gateway = gateway;
    let exit = gateway.terminate();
    relay.stop();

    let lan = Delivery::analyse(&lock(&lan_arrivals), &acked);
    let at_cloud = Delivery::analyse(&lock(&cloud_arrivals), &for_cloud);
    let lost_by_cloud = {
        let arrivals = lock(&cloud_arrivals);
        excused
            .iter()
            .filter(|m| !arrivals.seen.contains(m))
            .count()
    };
    let relay_log = std::mem::take(&mut *lock(&relay_log));
    let report = Report {
        seed,
        rounds,
        faults,
        acked: acked.len(),
        re_sent_by_publishers: published.iter().map(|p| lock(p).re_sent).sum(),
        lan,
        cloud: at_cloud,
        excused: excused.len(),
        lost_by_cloud,
        uplink_connections: relay_log.connections.len(),
        uplink_resends: relay_log.connections.iter().map(|c| c.resends).sum(),
        uplink_most_resends: relay_log
            .connections
            .iter()
            .map(|c| c.resends)
            .max()
            .unwrap_or(0),
        cloud_refused: relay_log.refused,
        lan_sessions_lost: lock(&lan_arrivals).sessions_lost,
        cloud_sessions_lost: lock(&cloud_arrivals).sessions_lost,
        drain_time,
        elapsed: started.elapsed(),
    };

    // The assertions, each naming the seed.
    assert!(
        exit.success(),
        "{ctx}: the gateway's clean stop: {exit}\n{report}"
    );
    assert!(
        report.acked > 0 && report.faults.values().sum::<u64>() >= rounds,
        "{ctx}: traffic and faults happened\n{report}"
    );
    assert_eq!(
        report.lan_sessions_lost, 0,
        "{ctx}: the gateway lost the LAN subscriber's persistent session\n{report}"
    );
    assert_eq!(
        report.cloud_sessions_lost, 0,
        "{ctx}: Mosquitto lost the cloud subscriber's session (its persistence, not the \
         gateway)\n{report}"
    );
    assert!(
        report.lan.missing.is_empty(),
        "{ctx}: {} acknowledged messages never reached the LAN persistent subscriber, e.g. \
         {:?}\n{report}",
        report.lan.missing.len(),
        &report.lan.missing[..report.lan.missing.len().min(10)]
    );
    assert!(
        report.lan.most_copy_duplicates_per_connection <= LAN_REDELIVERY,
        "{ctx}: after one reconnect the LAN subscriber got {} messages again (bound \
         {LAN_REDELIVERY})\n{report}",
        report.lan.most_copy_duplicates_per_connection
    );
    assert!(
        report.lan.out_of_order.is_empty(),
        "{ctx}: first arrivals out of publish order at the LAN subscriber (message, after): \
         {:?}\n{report}",
        &report.lan.out_of_order[..report.lan.out_of_order.len().min(10)]
    );
    assert_eq!(
        report.cloud_refused, 0,
        "{ctx}: the cloud refused messages\n{report}"
    );
    assert!(
        report.cloud.missing.is_empty(),
        "{ctx}: {} acknowledged messages that the cloud never acknowledged (or acknowledged \
         in a run not killed) never reached the cloud subscriber, e.g. {:?}\n{report}",
        report.cloud.missing.len(),
        &report.cloud.missing[..report.cloud.missing.len().min(10)]
    );
    assert!(
        report.cloud.out_of_order.is_empty(),
        "{ctx}: first arrivals out of publish order at the cloud subscriber (message, after): \
         {:?}\n{report}",
        &report.cloud.out_of_order[..report.cloud.out_of_order.len().min(10)]
    );
    for connection in &relay_log.connections {
        assert!(
            connection.resends <= UPLINK_INFLIGHT,
            "{ctx}: uplink connection {} sent {} messages again that an earlier connection had \
             sent (window {UPLINK_INFLIGHT})\n{report}",
            connection.number,
            connection.resends
        );
        assert_eq!(
            connection.repeated, 0,
            "{ctx}: uplink connection {} sent a message twice\n{report}",
            connection.number
        );
    }
    report
}

async fn wait_for(ctx: &str, what: &str, limit: Duration, ready: impl FnMut() -> bool) {
    if !wait_until(limit, ready).await {
        panic!("{ctx}: no {what} within {limit:?}");
    }
}

/// Poll `ready` every 50 ms until it holds (true) or `limit` passes (false).
async fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gateway_config(dir: &Path, relay: SocketAddr) -> PathBuf {
    let text = format!(
        r#"
[gateway]
id = "{GATEWAY}"
data_dir = "{data}"
shutdown_timeout = "5s"

[broker]
allow_anonymous = true
durability = "sync"
max_queued_messages = 1000000

[[broker.listeners]]
bind = "127.0.0.1:0"

[[uplinks]]
name = "cloud"
url = "mqtt://{relay}"
protocol = "5"
client_id = "{GATEWAY}-gw"
keep_alive = "5s"
reconnect = {{ min = "100ms", max = "500ms" }}
inflight = {UPLINK_INFLIGHT}
routes = [
  {{ out = "plant/#", remote_prefix = "sites/{{gateway}}/", qos = 1 }},
]
"#,
        data = dir.join("data").display(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write gateway.toml");
    path
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillGateway,
    StopGateway,
    KillCloud,
    StopCloud,
}

const FAULTS: [Fault; 4] = [
    Fault::KillGateway,
    Fault::StopGateway,
    Fault::KillCloud,
    Fault::StopCloud,
];

/// The cloud, which run of it is up, and which runs ended with SIGKILL. The relay opens its
/// connections under this lock, and the injector kills and restarts under it.
struct CloudSide {
    cloud: Cloud,
    generation: u64,
    running: bool,
    killed: BTreeSet<u64>,
}

struct Injector {
    rng: StdRng,
    ctx: String,
    gateway: GatewayProcess,
    config: PathBuf,
    cloud: Arc<Mutex<CloudSide>>,
    addr_tx: watch::Sender<SocketAddr>,
    counts: BTreeMap<Fault, u64>,
}

impl Injector {
    /// `rounds` faults: each block of four rounds has every kind once, in random order;
    /// a freeze of one process has, half of the time, a kill of the other inside it.
    fn run(mut self, rounds: u64) -> (GatewayProcess, BTreeMap<Fault, u64>) {
        let mut schedule = Vec::new();
        while (schedule.len() as u64) < rounds {
            let mut block = FAULTS;
            block.shuffle(&mut self.rng);
            schedule.extend(block);
        }
        schedule.truncate(rounds as usize);
        for (round, fault) in schedule.into_iter().enumerate() {
            let started = Instant::now();
            self.sleep(GAP_MS);
            let nested =
                matches!(fault, Fault::StopGateway | Fault::StopCloud) && self.rng.random_bool(0.5);
            eprintln!(
                "  round {round}: {fault:?}{}",
                if nested {
                    " with a kill of the other inside"
                } else {
                    ""
                }
            );
            match fault {
                Fault::KillGateway => self.kill_gateway(),
                Fault::KillCloud => self.kill_cloud(),
                Fault::StopGateway => {
                    self.count(Fault::StopGateway);
                    self.gateway.pause();
                    self.sleep(STOP_MS);
                    if nested {
                        self.kill_cloud();
                    }
                    self.gateway.resume();
                }
                Fault::StopCloud => {
                    self.count(Fault::StopCloud);
                    lock(&self.cloud).cloud.pause();
                    self.sleep(STOP_MS);
                    if nested {
                        self.kill_gateway();
                    }
                    lock(&self.cloud).cloud.resume();
                }
            }
            assert!(
                self.gateway.is_running(),
                "{}: round {round}: the gateway exited on its own",
                self.ctx
            );
            assert!(
                started.elapsed() < ROUND_LIMIT,
                "{}: round {round} ({fault:?}) took {:?}, over {ROUND_LIMIT:?}",
                self.ctx,
                started.elapsed()
            );
        }
        (self.gateway, self.counts)
    }

    fn count(&mut self, fault: Fault) {
        *self.counts.entry(fault).or_default() += 1;
    }

    fn sleep(&mut self, range: Range<u64>) {
        std::thread::sleep(Duration::from_millis(self.rng.random_range(range)));
    }

    fn kill_gateway(&mut self) {
        self.count(Fault::KillGateway);
        self.gateway.kill9();
        self.sleep(DOWN_MS);
        self.gateway = GatewayProcess::start(&self.config);
        let _ = self.addr_tx.send(self.gateway.addr);
    }

    fn kill_cloud(&mut self) {
        self.count(Fault::KillCloud);
        {
            let mut side = lock(&self.cloud);
            side.cloud.kill();
            let generation = side.generation;
            side.killed.insert(generation);
            side.running = false;
        }
        self.sleep(DOWN_MS);
        let mut side = lock(&self.cloud);
        side.cloud.restart();
        side.generation += 1;
        side.running = true;
    }
}

// ---------------------------------------------------------------------------------------
// The relay between the gateway's uplink and the cloud
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct RelayLog {
    /// Messages the cloud acknowledged, by the run of Mosquitto that acknowledged them.
    acked: BTreeMap<u64, HashSet<Msg>>,
    /// PUBACKs with a reason code of 0x80 or more.
    refused: usize,
    /// Per connection, in the order they were opened.
    connections: Vec<ConnectionLog>,
    /// The connection that first sent each copy.
    first_sent: HashMap<Sent, usize>,
}

struct ConnectionLog {
    number: usize,
    /// Copies that an earlier connection had sent already.
    resends: usize,
    /// Copies sent twice on this connection.
    repeated: usize,
}

struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: std::thread::JoinHandle<()>,
}

impl Relay {
    fn start(cloud: Arc<Mutex<CloudSide>>, log: Arc<Mutex<RelayLog>>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("relay address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let accept = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((gateway, _)) => {
                        let _ = gateway.set_nonblocking(false);
                        if let Some((upstream, generation)) = open_upstream(&cloud) {
                            relay_connection(gateway, upstream, generation, &log);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Relay { addr, stop, accept }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.accept.join();
    }
}

/// Connect to the cloud's current run, if it is up; the lock keeps the run from changing
/// between reading its number and connecting.
fn open_upstream(cloud: &Mutex<CloudSide>) -> Option<(TcpStream, u64)> {
    let side = lock(cloud);
    if !side.running {
        return None;
    }
    let upstream = TcpStream::connect_timeout(&side.cloud.addr(), Duration::from_secs(2)).ok()?;
    Some((upstream, side.generation))
}

fn relay_connection(
    gateway: TcpStream,
    cloud: TcpStream,
    generation: u64,
    log: &Arc<Mutex<RelayLog>>,
) {
    let number = {
        let mut log = lock(log);
        let number = log.connections.len();
        log.connections.push(ConnectionLog {
            number,
            resends: 0,
            repeated: 0,
        });
        number
    };
    // pkid -> message, for the PUBLISHes on this connection not yet acknowledged.
    let pending = Arc::new(Mutex::new(HashMap::new()));
    let streams = (
        gateway.try_clone().expect("clone"),
        cloud.try_clone().expect("clone"),
    );
    {
        let (log, pending) = (log.clone(), pending.clone());
        let (from, to) = (streams.0, streams.1);
        std::thread::spawn(move || {
            pump(from, to, |frame| {
                observe_to_cloud(frame, number, &pending, &log);
            })
        });
    }
    let log = log.clone();
    std::thread::spawn(move || {
        pump(cloud, gateway, |frame| {
            observe_to_gateway(frame, generation, &pending, &log);
        })
    });
}

/// Copy bytes from `from` to `to`, showing each whole packet to `observe` before it is
/// forwarded; when either side ends, close both.
fn pump(mut from: TcpStream, mut to: TcpStream, mut observe: impl FnMut(&Frame)) {
    let mut packets = BytesMut::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        packets.extend_from_slice(&chunk[..n]);
        while let Some(frame) = Frame::split_off(&mut packets) {
            observe(&frame);
        }
        if to.write_all(&chunk[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn observe_to_cloud(
    frame: &Frame,
    connection: usize,
    pending: &Mutex<HashMap<u16, Msg>>,
    log: &Mutex<RelayLog>,
) {
    if frame.kind() != 3 {
        return;
    }
    let (publish, pkid) = frame.publish(Version::V5);
    let Some(copy) = Sent::parse(&publish.payload) else {
        return;
    };
    if publish.qos > 0 {
        lock(pending).insert(pkid, copy.msg);
    }
    let mut log = lock(log);
    match log.first_sent.get(&copy).copied() {
        None => {
            log.first_sent.insert(copy, connection);
        }
        Some(first) if first == connection => log.connections[connection].repeated += 1,
        Some(_) => log.connections[connection].resends += 1,
    }
}

fn observe_to_gateway(
    frame: &Frame,
    generation: u64,
    pending: &Mutex<HashMap<u16, Msg>>,
    log: &Mutex<RelayLog>,
) {
    if frame.kind() != 4 {
        return;
    }
    let body = frame.body();
    let pkid = u16::from_be_bytes([body[0], body[1]]);
    let reason = body.get(2).copied().unwrap_or(0);
    let Some(msg) = lock(pending).remove(&pkid) else {
        return;
    };
    let mut log = lock(log);
    if reason >= 0x80 {
        log.refused += 1;
    } else {
        log.acked.entry(generation).or_default().insert(msg);
    }
}

// ---------------------------------------------------------------------------------------
// MQTT clients
// ---------------------------------------------------------------------------------------

/// rumqttc's event loop in a task of its own, its events in a channel: the client's logic
/// can wait for an event or a timer without cancelling a poll.
fn spawn_event_loop(
    options: MqttOptions,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    tokio::task::JoinHandle<()>,
) {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                break;
            }
        }
    });
    (client, rx, task)
}

#[derive(Default)]
struct Published {
    /// Sequence numbers the gateway acknowledged.
    acked: BTreeSet<u64>,
    /// Messages written again on a new connection.
    re_sent: u64,
}

/// Publish `plant/p<n>` QoS 1 messages until `stop`, then wait for the last PUBACKs. A lost
/// connection is followed by a new one (to the gateway's current address), starting again
/// from the first unacknowledged message.
async fn publisher(
    n: u32,
    addr: watch::Receiver<SocketAddr>,
    log: Arc<Mutex<Published>>,
    stop: CancellationToken,
) {
    let topic = format!("plant/p{n}");
    let mut next = 0u64;
    // One past the highest sequence number written on an earlier connection.
    let mut written_before = 0u64;
    for attempt in 0u64.. {
        if stop.is_cancelled() {
            return;
        }
        let target = *addr.borrow();
        let mut options = MqttOptions::new(
            format!("fault-pub-{n}"),
            target.ip().to_string(),
            target.port(),
        );
        options.set_keep_alive(KEEP_ALIVE);
        options.set_clean_session(true);
        options.set_inflight(PUBLISHER_WINDOW as u16);
        let (client, mut events, task) = spawn_event_loop(options);
        let mut ticker = tokio::time::interval(PACE);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connected = false;
        let mut submit = next;
        // Submitted, not yet written (rumqttc reports writes in submission order).
        let mut submitted = std::collections::VecDeque::new();
        // Written, waiting for the PUBACK: pkid -> seq.
        let mut unacked: HashMap<u16, u64> = HashMap::new();
        let mut highest_written = 0;
        let mut stopping = false;
        loop {
            if stopping && (!connected || (submitted.is_empty() && unacked.is_empty())) {
                task.abort();
                return;
            }
            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => connected = true,
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        let seq = submitted.pop_front().expect("a write follows a submission");
                        if seq < written_before {
                            lock(&log).re_sent += 1;
                        }
                        highest_written = highest_written.max(seq + 1);
                        unacked.insert(pkid, seq);
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(seq) = unacked.remove(&ack.pkid) {
                            lock(&log).acked.insert(seq);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                _ = ticker.tick(), if connected && !stopping
                    && submitted.len() + unacked.len() < PUBLISHER_WINDOW => {
                    let copy = Sent { msg: Msg { publisher: n, seq: submit }, attempt };
                    if client.try_publish(&topic, QoS::AtLeastOnce, false, copy.payload()).is_ok() {
                        submitted.push_back(submit);
                        submit += 1;
                    }
                }
                _ = stop.cancelled(), if !stopping => stopping = true,
            }
        }
        task.abort();
        // Start again from the first message without a PUBACK.
        written_before = written_before.max(highest_written);
        next = unacked
            .values()
            .chain(submitted.iter())
            .min()
            .copied()
            .unwrap_or(submit);
        tokio::time::sleep(RETRY).await;
    }
}

#[derive(Default)]
struct Arrivals {
    /// Every publish received, in arrival order, with the number of the connection.
    copies: Vec<(Sent, usize)>,
    /// Distinct messages received.
    seen: HashSet<Msg>,
    subscribed: bool,
    connections: usize,
    /// Reconnections whose CONNACK said the session was gone.
    sessions_lost: usize,
}

impl Arrivals {
    fn covers(&self, want: &BTreeSet<Msg>) -> bool {
        want.iter().all(|m| self.seen.contains(m))
    }
}

/// A persistent QoS 1 subscriber: subscribes on its first connection, reconnects (to the
/// current address) whenever the connection ends, and records every publish.
async fn subscriber(
    id: &'static str,
    filter: String,
    addr: watch::Receiver<SocketAddr>,
    arrivals: Arc<Mutex<Arrivals>>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let target = *addr.borrow();
        let mut options = MqttOptions::new(id, target.ip().to_string(), target.port());
        options.set_keep_alive(KEEP_ALIVE);
        options.set_clean_session(false);
        let (client, mut events, task) = spawn_event_loop(options);
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = stop.cancelled() => break,
            };
            match event {
                Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    let mut arrivals = lock(&arrivals);
                    arrivals.connections += 1;
                    if !ack.session_present {
                        if arrivals.subscribed {
                            arrivals.sessions_lost += 1;
                        }
                        client
                            .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                            .expect("subscribe request");
                    }
                }
                Some(Ok(Event::Incoming(Packet::SubAck(_)))) => lock(&arrivals).subscribed = true,
                Some(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                    if let Some(copy) = Sent::parse(&publish.payload) {
                        let mut arrivals = lock(&arrivals);
                        let connection = arrivals.connections;
                        arrivals.copies.push((copy, connection));
                        arrivals.seen.insert(copy.msg);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        task.abort();
        if !stop.is_cancelled() {
            tokio::time::sleep(RETRY).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// What arrived
// ---------------------------------------------------------------------------------------

struct Delivery {
    received: usize,
    distinct: usize,
    /// Arrivals of a message already received in another copy (a publisher's re-send).
    publisher_duplicates: usize,
    /// Arrivals of a copy already received (the gateway's or the cloud's redelivery).
    copy_duplicates: usize,
    /// The most such arrivals on one connection of the subscriber.
    most_copy_duplicates_per_connection: usize,
    missing: Vec<Msg>,
    /// (message, the later message of the same publisher that arrived first).
    out_of_order: Vec<(Msg, Msg)>,
}

impl Delivery {
    fn analyse(arrivals: &Arrivals, want: &BTreeSet<Msg>) -> Delivery {
        let mut copies = HashSet::new();
        let mut first: HashMap<u32, Msg> = HashMap::new();
        let mut seen = HashSet::new();
        let mut delivery = Delivery {
            received: arrivals.copies.len(),
            distinct: 0,
            publisher_duplicates: 0,
            copy_duplicates: 0,
            most_copy_duplicates_per_connection: 0,
            missing: Vec::new(),
            out_of_order: Vec::new(),
        };
        let mut per_connection: HashMap<usize, usize> = HashMap::new();
        for (copy, connection) in &arrivals.copies {
            if !copies.insert(*copy) {
                delivery.copy_duplicates += 1;
                *per_connection.entry(*connection).or_default() += 1;
                continue;
            }
            if !seen.insert(copy.msg) {
                delivery.publisher_duplicates += 1;
                continue;
            }
            if let Some(last) = first.get(&copy.msg.publisher) {
                if copy.msg.seq < last.seq {
                    delivery.out_of_order.push((copy.msg, *last));
                }
            }
            first.insert(copy.msg.publisher, copy.msg);
        }
        delivery.distinct = seen.len();
        delivery.most_copy_duplicates_per_connection =
            per_connection.values().max().copied().unwrap_or(0);
        delivery.missing = want.iter().filter(|m| !seen.contains(m)).copied().collect();
        delivery
    }
}

struct Report {
    seed: u64,
    rounds: u64,
    faults: BTreeMap<Fault, u64>,
    acked: usize,
    re_sent_by_publishers: u64,
    lan: Delivery,
    cloud: Delivery,
    excused: usize,
    lost_by_cloud: usize,
    uplink_connections: usize,
    uplink_resends: usize,
    uplink_most_resends: usize,
    cloud_refused: usize,
    lan_sessions_lost: usize,
    cloud_sessions_lost: usize,
    drain_time: Duration,
    elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(fault, n)| format!("{fault:?} {n}"))
            .collect();
        writeln!(
            f,
            "seed {}: {} rounds, faults: {}; {:.1} s ({:.1} s from the last fault to drained)",
            self.seed,
            self.rounds,
            faults.join(", "),
            self.elapsed.as_secs_f64(),
            self.drain_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "  acknowledged to LAN publishers: {}; written again by publishers after a reconnect: {}",
            self.acked, self.re_sent_by_publishers
        )?;
        for (name, d) in [
            ("LAN subscriber", &self.lan),
            ("cloud subscriber", &self.cloud),
        ] {
            writeln!(
                f,
                "  {name}: {} received, {} distinct, {} missing, {} out of order, duplicates: \
                 {} of a copy (at most {} after one reconnect), {} re-sent by publishers",
                d.received,
                d.distinct,
                d.missing.len(),
                d.out_of_order.len(),
                d.copy_duplicates,
                d.most_copy_duplicates_per_connection,
                d.publisher_duplicates
            )?;
        }
        write!(
            f,
            "  uplink: {} connections, {} copies sent again after a reconnect (at most {} on \
             one connection); messages acknowledged only by killed Mosquitto runs: {} (of \
             which lost by Mosquitto: {}); refused: {}; sessions lost: LAN {}, cloud {}",
            self.uplink_connections,
            self.uplink_resends,
            self.uplink_most_resends,
            self.excused,
            self.lost_by_cloud,
            self.cloud_refused,
            self.lan_sessions_lost,
            self.cloud_sessions_lost
        )
    }
}
