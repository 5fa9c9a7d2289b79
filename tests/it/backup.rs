//! The broker store's files after a clean stop and in a backup: the real binary, real
//! clients. After SIGTERM `broker.db` alone holds every persistent session, queued message
//! and retained message (nothing is left only in `broker.db-wal`), and `fieldmq backup`
//! copies a running gateway's stores into files a gateway starts from.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway::GatewayProcess;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::util::{gateway, mqtt};

const QUEUED: u64 = 300;
/// Bytes of padding after each message's number: enough WAL that its checkpoint takes a while.
const PADDING: usize = 1024;

fn write_config(dir: &Path, data: &Path) -> PathBuf {
    gateway::write_config(dir, data, "")
}

fn options(addr: SocketAddr, id: &str, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(clean);
    options.set_max_packet_size(1 << 20, 1 << 20);
    options
}

/// Register the persistent subscriber (then offline), queue `QUEUED` numbered QoS 1
/// messages for it and one retained message; returns after every PUBACK.
async fn queue_for_offline_subscriber(addr: SocketAddr) {
    mqtt::register_offline_subscriber(options(addr, "backup-sub", false), "load/#").await;

    let (publisher, mut events) = AsyncClient::new(options(addr, "backup-pub", true), 400);
    for n in 0..QUEUED {
        publisher
            .publish("load/0", QoS::AtLeastOnce, false, payload(n))
            .await
            .expect("publish");
    }
    publisher
        .publish("state/valve", QoS::AtLeastOnce, true, "open")
        .await
        .expect("publish retained");
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        while acked < QUEUED + 1 {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(error) => panic!("publisher: {error}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {acked} PUBACKs"));
}

/// The persistent subscriber comes back: it must find its session and every queued
/// message; a new client must get the retained message.
async fn everything_is_there(addr: SocketAddr) {
    let (_sub, mut events) = AsyncClient::new(options(addr, "backup-sub", false), 10);
    let mut present = None;
    let mut received = BTreeSet::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => present = Some(ack.session_present),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(n) = number(&p.payload) {
                        received.insert(n);
                    }
                    if received.len() as u64 == QUEUED {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => panic!("subscriber: {error}"),
            }
        }
    })
    .await;
    assert_eq!(present, Some(true), "the persistent session is there");
    assert_eq!(
        received.len() as u64,
        QUEUED,
        "queued messages received: {} of {QUEUED}",
        received.len()
    );

    let (late, mut late_events) = AsyncClient::new(options(addr, "backup-late", true), 10);
    late.subscribe("state/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let retained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match late_events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(error) => panic!("late subscriber: {error}"),
            }
        }
    })
    .await
    .expect("the retained message");
    assert_eq!(&retained.payload[..], b"open");
}

fn payload(n: u64) -> String {
    format!("{n} {}", "x".repeat(PADDING))
}

/// The number at the start of a payload.
fn number(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload)
        .ok()?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

fn wal(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-wal", db.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_stop_broker_db_alone_holds_sessions_queues_and_retained_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &data);
    let mut gateway = GatewayProcess::start(&config);
    queue_for_offline_subscriber(gateway.addr).await;
    assert!(gateway.terminate().success());

    // Only the database file, as a backup of it (or a lost -wal) would have it.
    let db = data.join("broker.db");
    let wal_len = std::fs::metadata(wal(&db)).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "the WAL is empty after a clean stop");
    let _ = std::fs::remove_file(wal(&db));
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).expect("copy dir");
    std::fs::copy(&db, copy.join("broker.db")).expect("copy broker.db");
    let config = write_config(dir.path(), &copy);

    let mut gateway = GatewayProcess::start(&config);
    everything_is_there(gateway.addr).await;
    assert!(gateway.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fieldmq_backup_copies_a_running_gateway_and_the_copy_starts_with_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &data);
    let mut gateway = GatewayProcess::start(&config);
    queue_for_offline_subscriber(gateway.addr).await;

    // Why the copy is made by the gateway: its exclusive lock keeps every other
    // connection out while it runs, readers included.
    let other = rusqlite::Connection::open(data.join("broker.db")).expect("open");
    let read = other.query_row("SELECT count(*) FROM retained", [], |row| {
        row.get::<_, i64>(0)
    });
    assert!(
        read.is_err_and(|e| e.to_string().contains("locked")),
        "another process cannot read the store of a running gateway"
    );
    drop(other);

    let copy = dir.path().join("backup");
    let (code, stdout, stderr) = gateway::run_to_end(
        &[
            "backup",
            "-c",
            &config.display().to_string(),
            &copy.display().to_string(),
        ],
        None,
    );
    assert_eq!(code, Some(0), "backup of a running gateway: {stderr}");
    assert!(stdout.contains("broker.db"), "{stdout}");
    assert!(copy.join("broker.db").exists());
    assert!(
        !wal(&copy.join("broker.db")).exists(),
        "the copy is one file"
    );
    // The gateway goes on serving meanwhile.
    assert!(gateway.is_running());
    assert!(gateway.terminate().success());

    // A gateway started on the copy alone has the session, its queue and the retained
    // message.
    let restored_config = write_config(dir.path(), &copy);
    let mut restored = GatewayProcess::start(&restored_config);
    everything_is_there(restored.addr).await;
    assert!(restored.terminate().success());

    // On a stopped gateway the files are copied directly.
    let config = write_config(dir.path(), &data);
    let stopped_copy = dir.path().join("backup-stopped");
    let (code, stdout, stderr) = gateway::run_to_end(
        &[
            "backup",
            "-c",
            &config.display().to_string(),
            &stopped_copy.display().to_string(),
        ],
        None,
    );
    assert_eq!(code, Some(0), "backup of a stopped gateway: {stderr}");
    assert!(stdout.contains("broker.db"), "{stdout}");
    let copied = rusqlite::Connection::open(stopped_copy.join("broker.db")).expect("open");
    let retained: i64 = copied
        .query_row(
            "SELECT count(*) FROM retained WHERE topic = 'state/valve'",
            [],
            |row| row.get(0),
        )
        .expect("the copy reads");
    assert_eq!(retained, 1);
}
