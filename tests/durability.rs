//! Durability of the broker's state: the real binary is killed with SIGKILL while clients
//! publish to an offline persistent subscriber; after a restart the subscriber gets every
//! message whose PUBACK its publisher received. Also session expiry, a corrupt database, and
//! a broker left waiting for acknowledgements going idle.

#[path = "support/process.rs"]
mod process;

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use process::GatewayProcess;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

fn write_config(dir: &Path) -> std::path::PathBuf {
    process::write_config(dir, &dir.join("data"), "max_queued_messages = 100000")
}

fn options(addr: SocketAddr, id: &str, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(clean);
    options.set_inflight(50);
    options
}

/// Connect the persistent subscriber; returns whether the broker had its session, and
/// the payloads received until `want` of them have arrived or `limit` passes.
async fn subscriber_session(
    addr: SocketAddr,
    subscribe: bool,
    want: &BTreeSet<u64>,
    limit: Duration,
) -> (bool, BTreeSet<u64>) {
    let (client, mut events) = AsyncClient::new(options(addr, "durable-sub", false), 100);
    if subscribe {
        client
            .subscribe("load/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let mut present = None;
    let mut received = BTreeSet::new();
    let _ = tokio::time::timeout(limit, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    present = Some(ack.session_present);
                    if subscribe || want.is_empty() {
                        // Nothing to wait for but the CONNACK (and the SUBACK).
                        if want.is_empty() && !subscribe {
                            return;
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) if want.is_empty() => return,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(n) = std::str::from_utf8(&p.payload).unwrap_or("").parse() {
                        received.insert(n);
                    }
                    if want.is_subset(&received) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => panic!("subscriber connection failed: {error}"),
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    (present.unwrap_or(false), received)
}

/// Publish numbered QoS 1 messages until the task is aborted; every PUBACKed number goes
/// into `acked`.
async fn publish_until_killed(
    addr: SocketAddr,
    first: u64,
    acked: std::sync::Arc<std::sync::Mutex<BTreeSet<u64>>>,
) {
    let (client, mut events) = AsyncClient::new(options(addr, "durable-pub", true), 200);
    // rumqttc gives packet ids only in its Outgoing events, in publish order.
    let sender = tokio::spawn(async move {
        for n in first.. {
            if client
                .publish(
                    format!("load/{}", n % 4),
                    QoS::AtLeastOnce,
                    false,
                    n.to_string(),
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut submitted: VecDeque<u64> = VecDeque::new();
    let mut next = first;
    let mut by_pkid = std::collections::HashMap::new();
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                submitted.push_back(next);
                next += 1;
                if let Some(n) = submitted.pop_front() {
                    by_pkid.insert(pkid, n);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(n) = by_pkid.remove(&ack.pkid) {
                    acked.lock().expect("lock").insert(n);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_to_an_offline_persistent_subscriber_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());

    let mut gateway = GatewayProcess::start(&config);
    let (present, _) = subscriber_session(
        gateway.addr,
        true,
        &BTreeSet::new(),
        Duration::from_secs(10),
    )
    .await;
    assert!(!present, "a new session");

    // A retained message must survive the kills too.
    let (retainer, mut retainer_events) =
        AsyncClient::new(options(gateway.addr, "durable-retainer", true), 10);
    retainer
        .publish("state/valve", QoS::AtLeastOnce, true, "open")
        .await
        .expect("publish retained");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = retainer_events.poll().await {
                return;
            }
        }
    })
    .await
    .expect("retained PUBACK");
    drop(retainer);

    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut first = 0;
    for round in 0..10u64 {
        // Publish for a random moment, then kill -9 in the middle of it.
        let publisher = tokio::spawn(publish_until_killed(gateway.addr, first, acked.clone()));
        let pause = 50 + rand::random::<u64>() % 250;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        gateway.kill9();
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
        first += 1_000_000;
        gateway = GatewayProcess::start(&config);
        let count = acked.lock().expect("lock").len();
        assert!(count > 0 || round > 0, "the publisher got some PUBACKs");
    }

    let want = acked.lock().expect("lock").clone();
    eprintln!("{} messages acknowledged across ten kills", want.len());
    let (present, received) =
        subscriber_session(gateway.addr, false, &want, Duration::from_secs(60)).await;
    assert!(present, "the session survived ten kills");
    let missing: Vec<&u64> = want.difference(&received).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {missing:?}",
        want.difference(&received).count(),
        want.len()
    );

    let (late, mut late_events) = AsyncClient::new(options(gateway.addr, "durable-late", true), 10);
    late.subscribe("state/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let retained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = late_events.poll().await {
                return p;
            }
        }
    })
    .await
    .expect("the retained message after ten kills");
    assert_eq!(&retained.payload[..], b"open");
    assert!(retained.retain);
    let status = gateway.terminate();
    assert!(status.success());
}

/// Publish `0..n` as numbered QoS 1 messages and wait for every PUBACK (bounded).
async fn publish_all(addr: SocketAddr, topic: &str, n: u64) {
    let (client, mut events) = AsyncClient::new(options(addr, "drain-pub", true), 100);
    let topic = topic.to_string();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, i.to_string())
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while acked < n {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(error) => panic!("publisher connection failed: {error}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {acked} of {n} PUBACKs"));
    let _ = sender.await;
}

/// Start the gateway on `config`, register the persistent subscriber (then offline) and
/// queue `n` numbered messages for it on `load/0`.
async fn start_with_queue(config: &Path, n: u64) -> GatewayProcess {
    let gateway = GatewayProcess::start(config);
    subscriber_session(
        gateway.addr,
        true,
        &BTreeSet::new(),
        Duration::from_secs(10),
    )
    .await;
    publish_all(gateway.addr, "load/0", n).await;
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_killed_mid_drain_gets_the_rest_and_nothing_it_acknowledged() {
    const TOTAL: u64 = 3000;
    const ACK_FIRST: u64 = 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let mut gateway = start_with_queue(&config, TOTAL).await;

    // Take the queue with manual acks: acknowledge the first ACK_FIRST only, give the broker
    // a moment to record that, and kill it with the rest of the window unacknowledged.
    let mut manual = options(gateway.addr, "durable-sub", false);
    manual.set_manual_acks(true);
    let (client, mut events) = AsyncClient::new(manual, 100);
    let mut acknowledged = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while (acknowledged.len() as u64) < ACK_FIRST {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let n: u64 = std::str::from_utf8(&p.payload)
                        .expect("utf-8")
                        .parse()
                        .expect("number");
                    client.ack(&p).await.expect("ack");
                    acknowledged.insert(n);
                }
                Ok(_) => {}
                Err(error) => panic!("subscriber connection failed: {error}"),
            }
        }
        // Send the queued PUBACKs; publishes that arrive meanwhile stay unacknowledged.
        let settle = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(_)) = tokio::time::timeout_at(settle, events.poll()).await {}
    })
    .await
    .expect("the first part of the queue within 30 s");
    gateway.kill9();
    drop(events);
    gateway = GatewayProcess::start(&config);

    let rest: BTreeSet<u64> = (0..TOTAL).filter(|n| !acknowledged.contains(n)).collect();
    let (present, received) =
        subscriber_session(gateway.addr, false, &rest, Duration::from_secs(60)).await;
    assert!(present, "the session survived the kill");
    let missing = rest.difference(&received).count();
    assert_eq!(missing, 0, "{missing} unacknowledged messages lost");
    let again: Vec<&u64> = received.intersection(&acknowledged).take(10).collect();
    assert!(
        again.is_empty(),
        "{} acknowledged messages delivered again after the restart, e.g. {again:?}",
        received.intersection(&acknowledged).count()
    );
    let status = gateway.terminate();
    assert!(status.success());
}

/// CPU time (user + system) a process has used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after_name = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> u64 { fields[n - 3].parse().expect("a number") };
    field(14) + field(15)
}

fn ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// The broker polls briefly for acknowledgements before it sleeps (docs/broker.md); a
/// client that holds its window without acknowledging must not keep it polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_acknowledging_leaves_the_broker_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let mut gateway = start_with_queue(&config, 200).await;

    // Take the queue without acknowledging anything: the broker's window (20) fills and
    // stays in flight.
    let mut manual = options(gateway.addr, "durable-sub", false);
    manual.set_manual_acks(true);
    let (_client, mut events) = AsyncClient::new(manual, 100);
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let subscriber = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(error) => panic!("subscriber connection failed: {error}"),
            }
        }
    });
    let settle = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.load(std::sync::atomic::Ordering::Relaxed) < 20 {
        assert!(
            tokio::time::Instant::now() < settle,
            "the window did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_flight = received.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (20..200).contains(&in_flight),
        "{in_flight} delivered without any acknowledgement"
    );

    let before = cpu_ticks(gateway.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(gateway.pid()) - before;
    // A broker that kept polling would use about a whole core: 2 s of ticks.
    let limit = ticks_per_second() / 5;
    assert!(
        used <= limit,
        "the broker used {used} ticks of CPU in 2 s while its client held the window (limit {limit})"
    );
    subscriber.abort();
    let status = gateway.terminate();
    assert!(status.success());
}

#[test]
fn a_corrupt_broker_database_stops_the_start_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("broker.db"), vec![0x42; 16384]).expect("garbage");
    let (code, _, stderr) = process::run_to_end(&["run", "-c"], Some(&config));
    assert_ne!(code, Some(0), "must not start: {stderr}");
    assert!(stderr.contains("broker.db"), "{stderr}");
    assert!(stderr.contains("move the file aside"), "{stderr}");
}
