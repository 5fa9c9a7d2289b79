//! A full disk under the broker's store: the real binary runs with its `data_dir` on a small
//! tmpfs; QoS 1 messages to offline persistent subscribers fill it until the store's commits
//! fail. The gateway must keep running, log an error naming the database file, still accept
//! clients, acknowledge nothing it did not store, start again after a kill -9 on the
//! still-full disk, and work again once space returns: every acknowledged message reaches a
//! subscriber of the running gateway, and another one after a kill -9 and a restart on the
//! same (not corrupt) database.
//!
//! Mounting a tmpfs needs root (or CAP_SYS_ADMIN). Without them the test runs itself again
//! inside a user and mount namespace of its own (`unshare --user --map-root-user --mount`),
//! where it may mount; the tmpfs and the gateway live in that namespace only. Where neither
//! works (user namespaces disabled) the test is skipped with a line in the `cargo test`
//! output, and fails under CI (see tests/it/util/skip.rs).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gateway::GatewayProcess;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::util::{gateway, mqtt, skip};

const TOPIC: &str = "fill/data";
/// Bytes of padding after the number in each payload.
const PADDING: usize = 300;
/// Drained while the gateway that saw the full disk still runs.
const LIVE_SUBSCRIBER: &str = "full-live";
/// Drained after a kill -9 and a restart: only what is on disk.
const RESTART_SUBSCRIBER: &str = "full-restart";
/// Subscribes while the disk is full (after the restart on it): its session must reach
/// the disk once space returns.
const LATE_SUBSCRIBER: &str = "full-late";
/// Bounds on filling the disk.
const FILL_MAX_MESSAGES: u64 = 100_000;
const FILL_MAX_TIME: Duration = Duration::from_secs(20);
/// A publisher that hears nothing for this long has stopped getting acknowledgements.
const QUIET: Duration = Duration::from_secs(2);
/// Publisher rounds in a row, one message in flight at a time, without a single PUBACK
/// before the disk counts as full.
const FULL_AFTER_EMPTY_ROUNDS: u32 = 3;

/// A tmpfs mounted on a fresh temporary directory; unmounted (lazily, so a process still
/// holding files there cannot stop it) when dropped, also on a panic.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot create a directory: {e}"))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run `mount`: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "`mount -t tmpfs -o size={size} tmpfs {}` failed ({}): {}",
                dir.path().display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("remount,size={size}"),
                "tmpfs",
            ])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "remounting the tmpfs with size={size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Before the TempDir field removes the (then empty) directory.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

const TEST: &str =
    "a_full_disk_loses_nothing_acknowledged_and_the_store_recovers_when_space_returns";
/// Set in the copy of this test that runs inside its own user and mount namespace.
const IN_NAMESPACE: &str = "FIELDMQ_FULL_DISK_IN_NAMESPACE";

/// The test's path inside the integration binary (`full_disk::...`), to run it alone.
fn test_path() -> String {
    let module = module_path!();
    let module = module
        .split_once("::")
        .map_or(module, |(_crate, path)| path);
    format!("{module}::{TEST}")
}

/// A tmpfs of `size`; `None` when the test ran instead in a namespace of its own (and
/// passed there) or was skipped.
fn tmpfs_or_run_elsewhere(size: &str) -> Option<Tmpfs> {
    let why = match Tmpfs::mount(size) {
        Ok(tmpfs) => return Some(tmpfs),
        Err(why) => why,
    };
    if std::env::var_os(IN_NAMESPACE).is_some() {
        panic!("no tmpfs even as root of a user namespace: {why}");
    }
    let namespace = ["--user", "--map-root-user", "--mount"];
    let usable = Command::new("unshare")
        .args(namespace)
        .arg("true")
        .output()
        .is_ok_and(|output| output.status.success());
    if !usable {
        skip::skip(
            TEST,
            &format!("no tmpfs can be mounted ({why}) and no user namespace made to mount one"),
        );
        return None;
    }
    let output = Command::new("unshare")
        .args(namespace)
        .arg(std::env::current_exe().expect("the test binary"))
        .args(["--exact", &test_path(), "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .output()
        .expect("run the test in a user namespace");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("in a user and mount namespace (no tmpfs here: {why}):\n{stdout}\n{stderr}");
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the test failed in its user namespace ({}):\n{stdout}\n{stderr}",
        output.status
    );
    None
}

fn write_config(dir: &Path, data_dir: &Path) -> PathBuf {
    let config = format!(
        r#"
[gateway]
id = "full-disk"
data_dir = "{}"

[broker]
allow_anonymous = true
durability = "sync"
max_queued_messages = 1000000
max_queued_bytes = "1GiB"
# Past each session's first 1,000, messages stay on disk only: the drains page from disk.
queue_memory = "0"

[[broker.listeners]]
bind = "127.0.0.1:0"

# Nothing listens there and nothing is routed to it: its outbox, on the same disk, only has
# to open again when the gateway restarts on the full disk.
[[uplinks]]
name = "cloud"
url = "mqtt://127.0.0.1:1"
protocol = "3.1.1"
routes = [{{ out = "outbox-only/#", qos = 1 }}]
"#,
        data_dir.display()
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

fn options(addr: SocketAddr, id: &str, clean: bool, inflight: u16) -> MqttOptions {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(clean);
    options.set_inflight(inflight);
    options
}

fn payload(n: u64) -> String {
    format!("{n}:{}", "x".repeat(PADDING))
}

fn number(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    text.split(':').next()?.parse().ok()
}

/// A persistent session `id` subscribed to [`TOPIC`] with QoS 1, then offline.
async fn register(addr: SocketAddr, id: &str) {
    mqtt::register_offline_subscriber(options(addr, id, false, 10), TOPIC).await;
}

/// How one publisher connection ended.
#[derive(Debug, Default)]
struct Round {
    sent: u64,
    acked: u64,
    /// The connection failed (the broker closes it when a commit fails).
    error: Option<String>,
    /// Nothing happened for [`QUIET`].
    quiet: bool,
}

/// One publisher connection: publish `first..first + count` with QoS 1 and `inflight` at a
/// time until all are acknowledged, the connection fails, or nothing happens for
/// [`QUIET`]. Every PUBACKed number goes into `acked`.
async fn publish_round(
    addr: SocketAddr,
    id: &str,
    first: u64,
    count: u64,
    inflight: u16,
    acked: &mut BTreeSet<u64>,
) -> Round {
    let (client, mut events) = AsyncClient::new(options(addr, id, true, inflight), 10);
    let sender = tokio::spawn(async move {
        for n in first..first + count {
            if client
                .publish(TOPIC, QoS::AtLeastOnce, false, payload(n))
                .await
                .is_err()
            {
                return;
            }
        }
        // Dropping the client would end the event loop before the last PUBACKs.
        std::future::pending::<()>().await;
    });
    // rumqttc gives packet ids only in its Outgoing events, in publish order (a fresh
    // connection per round: nothing is retransmitted to confuse the order).
    let mut next = first;
    let mut by_pkid = HashMap::new();
    let mut round = Round::default();
    loop {
        match tokio::time::timeout(QUIET, events.poll()).await {
            Err(_) => {
                round.quiet = true;
                break;
            }
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                by_pkid.insert(pkid, next);
                next += 1;
                round.sent += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(n) = by_pkid.remove(&ack.pkid) {
                    acked.insert(n);
                    round.acked += 1;
                }
                if round.sent == count && by_pkid.is_empty() {
                    break;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                round.error = Some(error.to_string());
                break;
            }
        }
    }
    sender.abort();
    round
}

/// Connect a persistent subscriber (no new SUBSCRIBE): whether the broker had its session,
/// and the numbers received until all of `want` have arrived or `limit` passes.
async fn drain(
    addr: SocketAddr,
    id: &str,
    want: &BTreeSet<u64>,
    limit: Duration,
) -> (bool, BTreeSet<u64>) {
    let (client, mut events) = AsyncClient::new(options(addr, id, false, 100), 100);
    let mut present = None;
    let mut received = BTreeSet::new();
    let _ = tokio::time::timeout(limit, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    present = Some(ack.session_present);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(n) = number(&p.payload) {
                        received.insert(n);
                    }
                    if want.is_subset(&received) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => panic!("subscriber {id} failed: {error}"),
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    (present.unwrap_or(false), received)
}

/// Whether a new client gets a successful CONNACK within 5 s.
async fn connack(addr: SocketAddr, id: &str) -> Result<(), String> {
    let (_client, mut events) = AsyncClient::new(options(addr, id, true, 10), 10);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return match ack.code {
                        ConnectReturnCode::Success => Ok(()),
                        code => Err(format!("CONNACK {code:?}")),
                    };
                }
                Ok(_) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no CONNACK within 5 s".into()))
}

/// Fill what is left of the file system with a plain file; returns its size.
fn fill_with_file(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create the filler file");
    let block = vec![0u8; 4096];
    let mut written = 0u64;
    while let Ok(n) = file.write(&block) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

/// Move what the gateway logged since the last call into `lines`.
fn collect_log(gateway: &GatewayProcess, lines: &mut Vec<String>) {
    lines.extend(gateway.log.try_iter());
}

/// Reconnect a persistent subscriber and assert that its session is there and that every
/// acknowledged number arrives (within 15 s); returns how many were received.
async fn drain_all(
    gateway: &GatewayProcess,
    id: &str,
    acked: &BTreeSet<u64>,
    log: &mut Vec<String>,
    when: &str,
) -> usize {
    let (present, received) = drain(gateway.addr, id, acked, Duration::from_secs(15)).await;
    collect_log(gateway, log);
    assert!(present, "{when}: the session of {id} is gone");
    assert_all_received(when, acked, &received, log);
    received.len()
}

/// Every acknowledged number was received (duplicates are fine).
fn assert_all_received(
    when: &str,
    acked: &BTreeSet<u64>,
    received: &BTreeSet<u64>,
    log: &[String],
) {
    let missing: Vec<&u64> = acked.difference(received).take(10).collect();
    assert!(
        missing.is_empty(),
        "{when}: {} of {} acknowledged messages lost, e.g. {missing:?} ({} received); log:\n{}",
        acked.difference(received).count(),
        acked.len(),
        received.len(),
        tail(log, 30)
    );
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_acknowledged_and_the_store_recovers_when_space_returns() {
    let started = Instant::now();
    let Some(tmpfs) = tmpfs_or_run_elsewhere("2m") else {
        return;
    };
    let data = tmpfs.path();
    let database = data.join("broker.db");
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(config_dir.path(), data);
    let mut log = Vec::new();

    let mut gateway = GatewayProcess::start(&config);
    register(gateway.addr, LIVE_SUBSCRIBER).await;
    register(gateway.addr, RESTART_SUBSCRIBER).await;

    // Fill the disk with messages for the offline subscribers until PUBACKs stop: many in
    // flight at first (large group commits, so that more than the 1,000 messages a session
    // keeps in memory fit in 2 MiB and the live drain below pages from disk too), then, once
    // a connection got no PUBACK, one at a time, so that a round without a PUBACK means not
    // even a single message fits any more.
    let mut acked = BTreeSet::new();
    let mut sent = 0u64;
    let mut rounds = 0u64;
    let mut empty_rounds = 0u32;
    let mut inflight = 1000;
    let mut endings = Vec::new();
    let fill_started = Instant::now();
    while empty_rounds < FULL_AFTER_EMPTY_ROUNDS
        && sent < FILL_MAX_MESSAGES
        && fill_started.elapsed() < FILL_MAX_TIME
    {
        let round = publish_round(
            gateway.addr,
            &format!("full-pub-{rounds}"),
            rounds * 1_000_000,
            FILL_MAX_MESSAGES - sent,
            inflight,
            &mut acked,
        )
        .await;
        rounds += 1;
        sent += round.sent;
        if round.acked == 0 {
            empty_rounds += 1;
            inflight = 1;
        } else {
            empty_rounds = 0;
        }
        if endings.len() < 5 {
            endings.push(format!("{round:?}"));
        }
    }
    let fill_time = fill_started.elapsed();
    collect_log(&gateway, &mut log);
    assert_eq!(
        empty_rounds,
        FULL_AFTER_EMPTY_ROUNDS,
        "PUBACKs never stopped: {sent} messages sent in {rounds} rounds, {} acknowledged, \
         in {fill_time:?}; log:\n{}",
        acked.len(),
        tail(&log, 20)
    );
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the disk filled up"
    );
    // Take whatever space SQLite left, then check once more that nothing is acknowledged
    // (anything that is goes into the set that must be delivered).
    let filler = data.join("filler");
    let filler_bytes = fill_with_file(&filler);
    let probe = publish_round(
        gateway.addr,
        "full-pub-probe",
        rounds * 1_000_000,
        10,
        1,
        &mut acked,
    )
    .await;
    rounds += 1;
    sent += probe.sent;
    eprintln!(
        "disk full after {fill_time:?}: {sent} messages sent in {rounds} publisher \
         connections, {} acknowledged; filler file {filler_bytes} bytes; probe after it: \
         {probe:?}; first rounds: {endings:#?}",
        acked.len()
    );

    // The gateway runs on, says what is wrong and where, and takes new clients.
    assert!(
        gateway.is_running(),
        "the gateway exited on a full disk; log:\n{}",
        tail(&log, 30)
    );
    let wanted_path = database.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let matched = loop {
        collect_log(&gateway, &mut log);
        let found = log.iter().find(|line| {
            line.contains("broker store commit failed")
                && line.contains(&wanted_path)
                && line.contains("database or disk is full")
        });
        if let Some(line) = found {
            break line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no \"broker store commit failed\" error naming {wanted_path} and \"database or \
             disk is full\" in the log; its last lines:\n{}",
            tail(&log, 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("matched log line: {matched}");
    if let Err(why) = connack(gateway.addr, "full-newcomer").await {
        panic!(
            "a new client got no CONNACK on a full disk: {why}; log:\n{}",
            tail(&log, 30)
        );
    }

    // A power cut while the disk is full: the gateway starts again on the still-full disk
    // (opening and reading the store must not need a write) and takes clients; what it
    // acknowledged before is still there (the drains below).
    gateway.kill9();
    let mut gateway = GatewayProcess::start(&config);
    if let Err(why) = connack(gateway.addr, "full-newcomer-restarted").await {
        collect_log(&gateway, &mut log);
        panic!(
            "a new client got no CONNACK after a restart on a full disk: {why}; log:\n{}",
            tail(&log, 30)
        );
    }
    collect_log(&gateway, &mut log);
    assert!(
        gateway.is_running(),
        "the gateway exited when started on a full disk; log:\n{}",
        tail(&log, 30)
    );

    // A persistent session made while the disk is full: its SUBACK comes from memory, and
    // its session and subscription are written once space returns.
    register(gateway.addr, LATE_SUBSCRIBER).await;

    // Space returns: the running gateway stores and acknowledges again.
    std::fs::remove_file(&filler).expect("remove the filler file");
    tmpfs.resize("16m");
    let mut after = BTreeSet::new();
    let round = publish_round(
        gateway.addr,
        "full-pub-after",
        rounds * 1_000_000,
        100,
        10,
        &mut after,
    )
    .await;
    collect_log(&gateway, &mut log);
    assert_eq!(
        round.acked,
        100,
        "after space returned: {round:?}; log:\n{}",
        tail(&log, 30)
    );
    let acked_after_space = after.clone();
    acked.extend(after);

    // Every acknowledged message reaches the subscriber of the running gateway...
    let received = drain_all(
        &gateway,
        LIVE_SUBSCRIBER,
        &acked,
        &mut log,
        "running gateway",
    )
    .await;
    eprintln!(
        "live subscriber: all {} acknowledged messages ({received} received)",
        acked.len()
    );

    // ...and, from the disk alone, the other one after a kill -9 and a restart on the same
    // database (which must open: not corrupt).
    gateway.kill9();
    let mut gateway = GatewayProcess::start(&config);
    let received = drain_all(
        &gateway,
        RESTART_SUBSCRIBER,
        &acked,
        &mut log,
        "after kill -9 and restart",
    )
    .await;
    eprintln!(
        "restarted gateway: all {} acknowledged messages ({received} received)",
        acked.len()
    );
    // The session made on the full disk survived the kill -9, with its subscription: what
    // was published to it after space returned is there.
    let received = drain_all(
        &gateway,
        LATE_SUBSCRIBER,
        &acked_after_space,
        &mut log,
        "session made on the full disk, after kill -9 and restart",
    )
    .await;
    eprintln!(
        "late subscriber: all {} messages published after space returned ({received} \
         received); total {:?}",
        acked_after_space.len(),
        started.elapsed()
    );
    let status = gateway.terminate();
    assert!(status.success(), "{status}");
}
