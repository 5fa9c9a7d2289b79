//! Durability of the broker's state: the real binary is killed with SIGKILL while clients
//! publish to an offline persistent subscriber; after a restart the subscriber gets every
//! message whose PUBACK its publisher received. Also session expiry, a corrupt database, and
//! a broker left waiting for acknowledgements going idle.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use gateway::GatewayProcess;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::util::{gateway, mqtt};

fn write_config(dir: &Path) -> std::path::PathBuf {
    gateway::write_config(dir, &dir.join("data"), "max_queued_messages = 100000")
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
/// into `acked`, with when its PUBACK arrived.
async fn publish_until_killed(
    addr: SocketAddr,
    first: u64,
    acked: std::sync::Arc<std::sync::Mutex<BTreeMap<u64, std::time::Instant>>>,
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
                    acked
                        .lock()
                        .expect("lock")
                        .insert(n, std::time::Instant::now());
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

    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
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

    let want: BTreeSet<u64> = acked.lock().expect("lock").keys().copied().collect();
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

/// With `durability = "batched"` a publisher is acknowledged before the commit, which follows
/// within `commit_window`: a kill -9 may lose acknowledged messages, but only those
/// acknowledged in the last `commit_window` (plus the time the commit itself takes) before
/// it. Two kills while a client pipelines QoS 1 messages to offline persistent subscribers;
/// after each restart one of them drains its queue up to a sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batched_durability_a_kill_9_loses_only_what_was_acknowledged_in_the_last_commit_window(
) {
    const WINDOW: Duration = Duration::from_millis(500);
    /// For the commit itself and a busy machine's scheduling.
    const MARGIN: Duration = Duration::from_millis(250);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway::write_config(
        dir.path(),
        &dir.path().join("data"),
        "max_queued_messages = 100000\ndurability = \"batched\"\ncommit_window = \"500ms\"",
    );
    let mut gateway = GatewayProcess::start(&config);
    subscriber_session(
        gateway.addr,
        true,
        &BTreeSet::new(),
        Duration::from_secs(10),
    )
    .await;
    // Seven more offline subscribers make eight store operations per message: more than the
    // store takes in one transaction (4,096) per window, so a backlog that waited a window
    // for every transaction would show.
    for n in 0..7 {
        mqtt::register_offline_subscriber(
            options(gateway.addr, &format!("durable-extra-{n}"), false),
            "load/#",
        )
        .await;
    }
    // The sessions themselves are written within commit_window too: wait until they are.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rusqlite::Connection::open(committed_copy(&config, dir.path()))
        .expect("open the copy")
        .query_row("SELECT count(*) FROM subscriptions", [], |row| {
            row.get::<_, i64>(0)
        })
        .expect("count subscriptions")
        < 8
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the subscription was not committed within 10 s"
        );
    }
    let mut lost_total = 0;
    let mut acked_total = 0;
    for round in 0..2u64 {
        let first = round * 1_000_000;
        let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let publisher = tokio::spawn(publish_until_killed(gateway.addr, first, acked.clone()));
        // Kill once the first PUBACK is four windows old: by then the oldest acknowledged
        // messages must be on disk.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let first_ack = acked.lock().expect("lock").values().min().copied();
            if first_ack.is_some_and(|at| at.elapsed() >= 4 * WINDOW) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no PUBACK within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let killed_at = std::time::Instant::now();
        gateway.kill9();
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
        gateway = GatewayProcess::start(&config);

        // Everything stored arrives before a sentinel published after the restart.
        let (sentinel, mut sentinel_events) =
            AsyncClient::new(options(gateway.addr, "batched-sentinel", true), 10);
        sentinel
            .publish("load/end", QoS::AtLeastOnce, false, "end")
            .await
            .expect("publish the sentinel");
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(Event::Incoming(Packet::PubAck(_))) = sentinel_events.poll().await {
                    return;
                }
            }
        })
        .await
        .expect("the sentinel's PUBACK");
        let received = drain_until_sentinel(gateway.addr).await;

        let acked = acked.lock().expect("lock").clone();
        let lost: Vec<(u64, Duration)> = acked
            .iter()
            .filter(|(n, _)| !received.contains(n))
            .map(|(n, at)| (*n, killed_at.saturating_duration_since(*at)))
            .collect();
        let oldest = lost.iter().map(|(_, age)| *age).max().unwrap_or_default();
        eprintln!(
            "round {round}: {} acknowledged, {} lost, the oldest acknowledged {oldest:?} before the kill",
            acked.len(),
            lost.len()
        );
        assert!(
            oldest <= WINDOW + MARGIN,
            "round {round}: {} acknowledged messages lost, one of them acknowledged {oldest:?} \
             before the kill (commit_window is {WINDOW:?}); e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        let old_enough = acked
            .values()
            .filter(|at| killed_at.saturating_duration_since(**at) > WINDOW + MARGIN)
            .count();
        assert!(
            old_enough > 0,
            "round {round}: nothing was acknowledged more than {:?} before the kill",
            WINDOW + MARGIN
        );
        lost_total += lost.len();
        acked_total += acked.len();
    }
    eprintln!("{lost_total} of {acked_total} acknowledged messages lost across two kills");
    assert!(gateway.terminate().success());
}

/// Connect the persistent subscriber and take its queue up to the sentinel `end`: the
/// numbers received.
async fn drain_until_sentinel(addr: SocketAddr) -> BTreeSet<u64> {
    let (client, mut events) = AsyncClient::new(options(addr, "durable-sub", false), 100);
    let mut received = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if &p.payload[..] == b"end" {
                        return;
                    }
                    if let Ok(n) = std::str::from_utf8(&p.payload).unwrap_or("").parse() {
                        received.insert(n);
                    }
                }
                Ok(_) => {}
                Err(error) => panic!("subscriber connection failed: {error}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no sentinel within 30 s ({} received)", received.len()));
    let _ = client.disconnect().await;
    received
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

    // Where the subscriber's ACK_FIRST-th message sits in the store's order.
    let seqs = queued_seqs(&committed_copy(&config, dir.path()), "durable-sub");
    assert_eq!(seqs.len() as u64, TOTAL, "every message is queued on disk");
    let last_acknowledged_seq = seqs[ACK_FIRST as usize - 1];

    // Take the queue with manual acks: acknowledge the first ACK_FIRST only, wait until the
    // store has committed that, and kill it with the rest of the window unacknowledged.
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
        // Send the queued PUBACKs (publishes that arrive meanwhile stay unacknowledged)
        // until a copy of the running store shows the watermark past them.
        loop {
            let quiet = tokio::time::Instant::now() + Duration::from_millis(50);
            while let Ok(Ok(_)) = tokio::time::timeout_at(quiet, events.poll()).await {}
            let copy = committed_copy(&config, dir.path());
            if acked_seq(&copy, "durable-sub") >= last_acknowledged_seq {
                break;
            }
        }
    })
    .await
    .expect("the first part of the queue, acknowledged and committed, within 30 s");
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

/// `broker.db` as the running gateway's store has committed it so far: `fieldmq backup`
/// copies it after applying every operation sent to the store before the request.
fn committed_copy(config: &Path, dir: &Path) -> std::path::PathBuf {
    let dest = dir.join("committed");
    let (code, _, stderr) = gateway::run_to_end(
        &["backup", dest.to_str().expect("UTF-8 path"), "-c"],
        Some(config),
    );
    assert_eq!(code, Some(0), "fieldmq backup: {stderr}");
    dest.join("broker.db")
}

/// The seq of every message queued for `client`, in delivery order, from the store's runs
/// (`first_seq..=last_seq`, `count` messages each).
fn queued_seqs(db: &Path, client: &str) -> Vec<u64> {
    let conn = rusqlite::Connection::open(db).expect("open the copy");
    let mut runs = conn
        .prepare(
            "SELECT first_seq, last_seq, count FROM queue WHERE client_id = ?1 ORDER BY first_seq",
        )
        .expect("query runs");
    let mut seqs = Vec::new();
    let rows = runs
        .query_map([client], |row| {
            Ok((
                row.get::<_, u64>(0)?,
                row.get::<_, u64>(1)?,
                row.get::<_, u64>(2)?,
            ))
        })
        .expect("runs");
    for row in rows {
        let (first, last, count) = row.expect("a run");
        assert_eq!(
            last - first + 1,
            count,
            "one client's run holds consecutive seqs"
        );
        seqs.extend(first..=last);
    }
    seqs
}

/// The acknowledged watermark of `client`'s session in a copy of `broker.db`.
fn acked_seq(db: &Path, client: &str) -> u64 {
    rusqlite::Connection::open(db)
        .expect("open the copy")
        .query_row(
            "SELECT acked_seq FROM sessions WHERE client_id = ?1",
            [client],
            |row| row.get(0),
        )
        .expect("the session's row")
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
    let (code, _, stderr) = gateway::run_to_end(&["run", "-c"], Some(&config));
    assert_ne!(code, Some(0), "must not start: {stderr}");
    assert!(stderr.contains("broker.db"), "{stderr}");
    assert!(stderr.contains("move the file aside"), "{stderr}");
}

#[test]
fn a_broker_database_from_a_newer_fieldmq_stops_the_start_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let mut gateway = GatewayProcess::start(&config);
    assert!(gateway.terminate().success());
    let database = dir.path().join("data").join("broker.db");
    let known: i64 = rusqlite::Connection::open(&database)
        .expect("open broker.db")
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .expect("user_version");
    let newer = known + 1;
    rusqlite::Connection::open(&database)
        .expect("open broker.db")
        .pragma_update(None, "user_version", newer)
        .expect("set user_version");
    let before = std::fs::read(&database).expect("read broker.db");

    let (code, _, stderr) = gateway::run_within(
        &["run".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(1), "must not start: {stderr}");
    assert!(
        stderr.contains(&database.display().to_string()),
        "the error names the file: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "schema version {newer} was written by a newer fieldmq (this one knows {known})"
        )),
        "the error says why: {stderr}"
    );
    assert_eq!(
        std::fs::read(&database).expect("read broker.db"),
        before,
        "the newer file is left as it was"
    );
}

/// One QoS 2 publish from a raw 3.1.1 client, through PUBCOMP.
async fn publish_qos_2(publisher: &mut mqtt::Raw, pkid: u16, topic: &str, payload: &[u8]) {
    use mqtt::packet;
    publisher
        .send(&packet::publish(
            false,
            topic.as_bytes(),
            2,
            false,
            pkid,
            payload,
        ))
        .await;
    let pubrec = publisher.recv().await.expect("PUBREC");
    assert_eq!(pubrec.bytes, packet::frame(0x50, &pkid.to_be_bytes()));
    publisher
        .send(&packet::frame(0x62, &pkid.to_be_bytes()))
        .await;
    let pubcomp = publisher.recv().await.expect("PUBCOMP");
    assert_eq!(pubcomp.bytes, packet::frame(0x70, &pkid.to_be_bytes()));
}

/// (packet id, state) of every delivery in flight to `client`, in a copy of `broker.db`.
fn inflight_marks(db: &Path, client: &str) -> Vec<(u16, i64)> {
    let conn = rusqlite::Connection::open(db).expect("open the copy");
    let mut marks = conn
        .prepare(
            "SELECT pkid, state FROM queue_marks WHERE client_id = ?1 AND pkid IS NOT NULL \
             ORDER BY seq",
        )
        .expect("query marks");
    let rows = marks
        .query_map([client], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("marks");
    rows.map(|row| row.expect("a mark")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_deliveries_in_flight_at_a_kill_9_are_resent_with_their_packet_ids_and_dup() {
    use mqtt::packet::{self, Connect};
    use mqtt::{Raw, Version};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let mut gateway = GatewayProcess::start(&config);
    let persistent = Connect {
        clean: false,
        ..Connect::v311("qos2-sub")
    };
    let mut subscriber = Raw::connected(gateway.addr, &persistent).await;
    subscriber
        .send(&packet::subscribe(false, 1, &[("qos2/#", 2)]))
        .await;
    assert_eq!(
        subscriber.recv().await.expect("SUBACK").bytes,
        packet::frame(0x90, &[0, 1, 2])
    );
    let mut publisher = Raw::connected(gateway.addr, &Connect::v311("qos2-pub")).await;
    let messages = [
        ("qos2/a", "first"),
        ("qos2/b", "second"),
        ("qos2/c", "third"),
    ];
    for (n, (topic, payload)) in messages.iter().enumerate() {
        publish_qos_2(&mut publisher, n as u16 + 1, topic, payload.as_bytes()).await;
    }

    // Three deliveries, DUP clear. The subscriber takes the first as far as PUBREC (the
    // broker answers PUBREL) and leaves the other two unanswered.
    let mut delivered = Vec::new();
    for _ in 0..3 {
        let frame = subscriber.recv().await.expect("PUBLISH");
        assert_eq!(frame.bytes[0], 0x34, "QoS 2, DUP clear: {frame:?}");
        let (publish, pkid) = frame.publish(Version::V311);
        delivered.push((publish.topic, publish.payload, pkid));
    }
    let expected: Vec<(String, Vec<u8>)> = messages
        .iter()
        .map(|(t, p)| (t.to_string(), p.as_bytes().to_vec()))
        .collect();
    let got: Vec<(String, Vec<u8>)> = delivered
        .iter()
        .map(|(t, p, _)| (t.clone(), p.clone()))
        .collect();
    assert_eq!(got, expected);
    let pkids: Vec<u16> = delivered.iter().map(|(_, _, pkid)| *pkid).collect();
    subscriber
        .send(&packet::frame(0x50, &pkids[0].to_be_bytes()))
        .await;
    assert_eq!(
        subscriber.recv().await.expect("PUBREL").bytes,
        packet::frame(0x62, &pkids[0].to_be_bytes())
    );

    // kill -9 once the store has committed those states (PUBREL sent for the first, the
    // other two sent and not acknowledged).
    let want = vec![(pkids[0], 3), (pkids[1], 2), (pkids[2], 2)];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let marks = inflight_marks(&committed_copy(&config, dir.path()), "qos2-sub");
        if marks == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store recorded {marks:?} in flight, not {want:?}"
        );
    }
    gateway.kill9();
    drop(subscriber);
    let mut gateway = GatewayProcess::start(&config);

    // The session is back; the broker resends the PUBREL and both publishes, with the same
    // packet ids, DUP set, in their original order.
    let (mut subscriber, connack) = Raw::connect(gateway.addr, &persistent).await;
    assert_eq!(
        connack.connack(),
        (true, 0),
        "session present after kill -9"
    );
    let resent = subscriber.until_ping_barrier().await;
    let mut want = vec![packet::frame(0x62, &pkids[0].to_be_bytes())];
    for (i, (topic, payload)) in messages.iter().enumerate().skip(1) {
        want.push(packet::publish(
            false,
            topic.as_bytes(),
            2,
            false,
            pkids[i],
            payload.as_bytes(),
        ));
        // DUP set.
        let last = want.last_mut().expect("the publish");
        last[0] |= 0x08;
    }
    let resent: Vec<Vec<u8>> = resent.into_iter().map(|frame| frame.bytes).collect();
    assert_eq!(resent, want, "PUBREL, then both publishes again with DUP");

    // Completing the three flows delivers nothing more: each message arrived once.
    subscriber
        .send(&packet::frame(0x70, &pkids[0].to_be_bytes()))
        .await;
    for pkid in &pkids[1..] {
        subscriber
            .send(&packet::frame(0x50, &pkid.to_be_bytes()))
            .await;
        assert_eq!(
            subscriber.recv().await.expect("PUBREL").bytes,
            packet::frame(0x62, &pkid.to_be_bytes())
        );
        subscriber
            .send(&packet::frame(0x70, &pkid.to_be_bytes()))
            .await;
    }
    assert_eq!(subscriber.until_ping_barrier().await, Vec::new());
    assert!(gateway.terminate().success());
}
