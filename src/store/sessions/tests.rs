use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::Connection;
use tokio::sync::oneshot;

use super::schema::SCHEMA_VERSION;
use super::writer::{trim_retry, PURGE_IDLE};
use super::*;

fn delivery(topic: &str, seq: u64) -> QueuedDelivery {
    QueuedDelivery {
        message: Message::internal("t", topic, "payload", QoS::AtLeastOnce, false),
        qos: QoS::AtLeastOnce,
        retain: false,
        subscription_ids: vec![3],
        seq,
    }
}

#[tokio::test]
async fn sessions_queues_in_flight_state_and_retained_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    {
        let (persist, snapshot) =
            Persist::open(&path, Durability::Sync, Duration::ZERO, 2).expect("open");
        assert!(snapshot.sessions.is_empty());
        let client: Arc<str> = Arc::from("c1");
        persist.send(session_op(&client)).await;
        persist
            .send(Op::Subscriptions {
                client_id: client.clone(),
                subscriptions: vec![StoredSubscription {
                    filter: "a/#".into(),
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: false,
                    subscription_id: Some(3),
                }],
            })
            .await;
        enqueue(&persist, &client, 1..=5).await;
        send_inflight(&persist, &client, 1, 9, InflightState::Released).await;
        send_remove(&persist, &client, 2).await;
        let retained = Message::internal("t", "r/1", "kept", QoS::AtLeastOnce, true);
        send_retain(&persist, retained).await;
        persist.barrier().await.await.expect("committed");
    }
    // The writer thread closes when the last sender is dropped; give it the lock back.
    let (persist, snapshot) = reopen(&path, 2).await;
    assert_eq!(snapshot.next_seq, 6);
    assert_eq!(snapshot.retained.len(), 1);
    assert_eq!(&snapshot.retained[0].payload[..], b"kept");
    let session = &snapshot.sessions[0];
    assert_eq!(session.client_id, "c1");
    assert_eq!(session.expiry, 60);
    assert_eq!(session.subscriptions[0].filter, "a/#");
    assert!(session.subscriptions[0].no_local);
    // Two in memory (the window), two more on disk; row 2 was acknowledged.
    assert_eq!(session.queue.len(), 2);
    assert_eq!(session.spilled, 2);
    assert_eq!(
        session.queue[0].inflight,
        Some((9, InflightState::Released))
    );
    assert_eq!(&*session.queue[1].delivery.message.topic, "a/3");
    assert_eq!(session.queue[1].delivery.subscription_ids, vec![3]);
    let page = persist.page(Arc::from("c1"), 3, 10).await;
    let seqs: Vec<u64> = page.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, vec![4, 5]);
}

/// A new store with a persistent session for `client` (disconnected, expiry 60 s).
async fn open_with_session(path: &Path, client: &Arc<str>, memory_window: usize) -> Persist {
    let (persist, _) =
        Persist::open(path, Durability::Sync, Duration::ZERO, memory_window).expect("open");
    persist.send(session_op(client)).await;
    persist
}

fn session_op(client: &Arc<str>) -> Op {
    Op::Session {
        client_id: client.clone(),
        expiry: 60,
        connected: false,
    }
}

async fn send_inflight(
    persist: &Persist,
    client: &Arc<str>,
    seq: u64,
    pkid: u16,
    state: InflightState,
) {
    let client_id = client.clone();
    persist
        .send(Op::Inflight {
            client_id,
            seq,
            pkid,
            state,
        })
        .await;
}

/// Keep `message` as the retained message of its topic.
async fn send_retain(persist: &Persist, message: Message) {
    persist
        .send(Op::Retain {
            topic: message.topic.clone(),
            message: Some(message),
        })
        .await;
}

async fn send_remove(persist: &Persist, client: &Arc<str>, seq: u64) {
    let client_id = client.clone();
    persist.send(Op::Remove { client_id, seq }).await;
}

/// Queue `a/<seq>` for `client` under each seq.
async fn enqueue(persist: &Persist, client: &Arc<str>, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        persist
            .send(Op::Enqueue {
                client_id: client.clone(),
                delivery: delivery(&format!("a/{seq}"), seq),
            })
            .await;
    }
}

#[tokio::test]
async fn a_publisher_is_not_acknowledged_after_a_failed_commit_that_may_have_held_its_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    let (persist, _) = Persist::open(&path, Durability::Sync, Duration::ZERO, 10).expect("open");
    let client: Arc<str> = Arc::from("c");
    let before = persist.failures();
    enqueue(&persist, &client, 1..=1).await;
    persist.barrier().await.await.expect("committed");
    // The same row again: this batch cannot commit (as when the disk is full).
    enqueue(&persist, &client, 1..=1).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while persist.failures() == before {
        assert!(Instant::now() < deadline, "the duplicate row did not fail");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A publisher whose rows were sent before the failure (they may have been in it) is
    // not told "stored", although the commit holding its barrier succeeds.
    let (tx, rx) = oneshot::channel();
    persist
        .send(Op::Barrier(Waiter::Publish(tx, true, before)))
        .await;
    assert!(rx.await.is_err(), "acknowledged across a failed commit");
    // One whose rows all came after the failure is.
    let (tx, rx) = oneshot::channel();
    persist
        .send(Op::Barrier(Waiter::Publish(tx, true, persist.failures())))
        .await;
    assert_eq!(rx.await.ok(), Some(true));
}

#[test]
fn a_retry_past_its_bound_drops_the_oldest_queued_rows_and_keeps_the_rest() {
    let client: Arc<str> = Arc::from("c");
    let session = |expiry| Op::Session {
        client_id: client.clone(),
        expiry,
        connected: false,
    };
    let row = |seq| Op::Enqueue {
        client_id: client.clone(),
        delivery: delivery("t", seq),
    };
    let mut ops = vec![session(1), row(1), row(2), session(2), row(3), row(4)];
    assert_eq!(trim_retry(&mut ops, 6), 0);
    assert_eq!(ops.len(), 6);
    assert_eq!(trim_retry(&mut ops, 4), 2);
    let kept: Vec<String> = ops
        .iter()
        .map(|op| match op {
            Op::Session { expiry, .. } => format!("session {expiry}"),
            Op::Enqueue { delivery, .. } => format!("row {}", delivery.seq),
            _ => "other".into(),
        })
        .collect();
    assert_eq!(kept, ["session 1", "session 2", "row 3", "row 4"]);
    // Sessions are never dropped, even past the bound.
    assert_eq!(trim_retry(&mut ops, 1), 2);
    assert_eq!(ops.len(), 2);
}

/// The client acknowledged everything through `through` (`count` messages); committed.
async fn acknowledge_through(persist: &Persist, client: &Arc<str>, through: u64, count: u64) {
    persist
        .send(Op::Acked {
            client_id: client.clone(),
            through,
            count,
        })
        .await;
    persist.barrier().await.await.expect("committed");
}

/// Open the database again once the writer of the previous `Persist` has let go.
async fn reopen(path: &Path, memory_window: usize) -> (Persist, Snapshot) {
    for _ in 0..100 {
        match Persist::open(path, Durability::Sync, Duration::ZERO, memory_window) {
            Ok(opened) => return opened,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("cannot reopen {}", path.display());
}

#[tokio::test]
async fn an_acknowledged_watermark_hides_rows_at_once_and_they_are_purged_when_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    let client: Arc<str> = Arc::from("c1");
    {
        let persist = open_with_session(&path, &client, 100).await;
        // Two commits, two runs: 1..=4 and 5..=6.
        enqueue(&persist, &client, 1..=4).await;
        persist.barrier().await.await.expect("committed");
        enqueue(&persist, &client, 5..=6).await;
        persist.barrier().await.await.expect("committed");
        acknowledge_through(&persist, &client, 4, 4).await;
    }
    let (persist, snapshot) = reopen(&path, 100).await;
    let seqs: Vec<u64> = snapshot.sessions[0]
        .queue
        .iter()
        .map(|d| d.delivery.seq)
        .collect();
    assert_eq!(seqs, vec![5, 6], "acknowledged rows are not loaded");
    assert_eq!(snapshot.sessions[0].spilled, 0);
    // The rows under the watermark go once the store has been idle for a moment.
    let mut physical = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(PURGE_IDLE * 2).await;
        physical = persist.page(client.clone(), 0, 100).await;
        if physical.len() == 2 {
            break;
        }
    }
    let seqs: Vec<u64> = physical.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, vec![5, 6], "the run of 1..=4 purged");
    acknowledge_through(&persist, &client, 6, 2).await;
    drop(persist);
    let (_persist, snapshot) = reopen(&path, 100).await;
    assert!(snapshot.sessions[0].queue.is_empty());
    assert_eq!(
        snapshot.next_seq, 7,
        "seqs never go back below a watermark, even with no rows left"
    );
}

/// Open a database created by `old_schema` (with a session `old` and two queued rows,
/// 41 in flight with packet id 7) and check that both messages come back.
fn assert_upgraded_in_place(old_schema: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    {
        let conn = Connection::open(&path).expect("create");
        conn.execute_batch(old_schema).expect("old schema");
        conn.execute_batch(
            "INSERT INTO queue (seq, client_id, topic, payload, qos, retain, subscription_ids,
                 properties, received_ms, pkid, state)
                 VALUES (41, 'old', 'a/1', x'01', 1, 0, NULL, NULL, 0, 7, 1);
             INSERT INTO queue (seq, client_id, topic, payload, qos, retain, subscription_ids,
                 properties, received_ms, pkid, state)
                 VALUES (42, 'old', 'a/2', x'02', 2, 0, '3', NULL, 0, NULL, NULL);",
        )
        .expect("old rows");
    }
    let (persist, snapshot) =
        Persist::open(&path, Durability::Sync, Duration::ZERO, 10).expect("upgraded");
    drop(persist);
    assert_eq!(snapshot.sessions.len(), 1);
    let session = &snapshot.sessions[0];
    assert_eq!(session.client_id, "old");
    let queued: Vec<_> = session
        .queue
        .iter()
        .map(|d| {
            (
                d.delivery.seq,
                d.delivery.message.topic.to_string(),
                d.delivery.qos,
                d.inflight,
            )
        })
        .collect();
    assert_eq!(
        queued,
        vec![
            (
                41,
                "a/1".to_string(),
                QoS::AtLeastOnce,
                Some((7, InflightState::Qos1Sent))
            ),
            (42, "a/2".to_string(), QoS::ExactlyOnce, None),
        ],
        "the queue rows moved into runs, the in-flight state into marks"
    );
    assert_eq!(&session.queue[1].delivery.message.payload[..], b"\x02");
    assert_eq!(session.queue[1].delivery.subscription_ids, vec![3]);
    assert_eq!(snapshot.next_seq, 43);
    // The writer lets go of its exclusive lock once its thread has ended.
    let schema = (0..100)
        .find_map(|_| {
            let found = Connection::open(&path).and_then(|conn| {
                let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
                let mut tables = conn.prepare("SELECT name, sql FROM sqlite_master")?;
                let tables = tables
                    .query_map([], |row| {
                        Ok(format!(
                            "{}: {:?}",
                            row.get::<_, String>(0)?,
                            row.get::<_, Option<String>>(1)?
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((version, tables))
            });
            if found.is_err() {
                std::thread::sleep(Duration::from_millis(20));
            }
            found.ok()
        })
        .expect("database readable after the writer stopped");
    assert_eq!(schema.0, SCHEMA_VERSION);
    let tables = schema.1.join("\n");
    assert!(tables.contains("queue_runs_by_client"), "{tables}");
    assert!(tables.contains("queue_marks"), "{tables}");
    assert!(!tables.contains("queue_rows"), "{tables}");
    assert!(!tables.contains("queue_by_client:"), "{tables}");
}

#[test]
fn a_version_1_database_is_upgraded_in_place() {
    assert_upgraded_in_place(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE sessions (client_id TEXT PRIMARY KEY, expiry INTEGER NOT NULL,
             disconnected_ms INTEGER) WITHOUT ROWID;
         INSERT INTO sessions VALUES ('old', 3600, 0);
         CREATE TABLE queue (seq INTEGER PRIMARY KEY, client_id TEXT NOT NULL,
             topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
             retain INTEGER NOT NULL, subscription_ids TEXT, properties TEXT,
             received_ms INTEGER NOT NULL, pkid INTEGER, state INTEGER);
         CREATE INDEX queue_by_client ON queue (client_id, seq);
         PRAGMA user_version = 1;",
    );
}

#[test]
fn a_version_3_database_is_upgraded_in_place() {
    assert_upgraded_in_place(
        "PRAGMA journal_mode = WAL;
         PRAGMA auto_vacuum = INCREMENTAL;
         CREATE TABLE sessions (client_id TEXT PRIMARY KEY, expiry INTEGER NOT NULL,
             disconnected_ms INTEGER, acked_seq INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
         INSERT INTO sessions VALUES ('old', 3600, 0, 40);
         CREATE TABLE subscriptions (client_id TEXT NOT NULL, filter TEXT NOT NULL,
             qos INTEGER NOT NULL, no_local INTEGER NOT NULL,
             retain_as_published INTEGER NOT NULL, subscription_id INTEGER,
             PRIMARY KEY (client_id, filter)) WITHOUT ROWID;
         CREATE TABLE queue (client_id TEXT NOT NULL, seq INTEGER NOT NULL,
             topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
             retain INTEGER NOT NULL, subscription_ids TEXT, properties TEXT,
             received_ms INTEGER NOT NULL, pkid INTEGER, state INTEGER,
             PRIMARY KEY (client_id, seq)) WITHOUT ROWID;
         CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL,
             qos INTEGER NOT NULL, properties TEXT, received_ms INTEGER NOT NULL) WITHOUT ROWID;
         PRAGMA user_version = 3;",
    );
}

#[tokio::test]
async fn removals_and_in_flight_marks_inside_a_written_run_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    let client: Arc<str> = Arc::from("c1");
    {
        let persist = open_with_session(&path, &client, 100).await;
        enqueue(&persist, &client, 1..=6).await;
        persist.barrier().await.await.expect("committed");
        // After the run is on disk: marks, not deletions inside the run.
        send_inflight(&persist, &client, 2, 7, InflightState::Qos2Sent).await;
        send_remove(&persist, &client, 3).await;
        persist
            .send(Op::RemoveOldest {
                client_id: client.clone(),
                after_seq: 4,
            })
            .await;
        persist.barrier().await.await.expect("committed");
    }
    type Queued = Vec<(u64, Option<(u16, InflightState)>)>;
    let queued = |snapshot: &Snapshot| -> Queued {
        snapshot.sessions[0]
            .queue
            .iter()
            .map(|d| (d.delivery.seq, d.inflight))
            .collect()
    };
    let (persist, snapshot) = reopen(&path, 100).await;
    assert_eq!(
        queued(&snapshot),
        vec![
            (1, None),
            (2, Some((7, InflightState::Qos2Sent))),
            (4, None),
            (6, None)
        ],
        "3 removed, 5 dropped as the oldest past 4"
    );
    assert_eq!(
        &*snapshot.sessions[0].queue[3].delivery.message.topic,
        "a/6"
    );
    drop(persist);
    let (persist, snapshot) = reopen(&path, 2).await;
    assert_eq!(queued(&snapshot).len(), 2);
    assert_eq!(snapshot.sessions[0].spilled, 2, "4 and 6 wait on disk");
    let page = persist.page(client.clone(), 2, 10).await;
    assert_eq!(
        page.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![4, 6]
    );
    // A watermark inside the run hides what it covers; the run itself stays.
    acknowledge_through(&persist, &client, 2, 2).await;
    drop(persist);
    let (persist, snapshot) = reopen(&path, 100).await;
    assert_eq!(queued(&snapshot), vec![(4, None), (6, None)]);
    assert_eq!(snapshot.next_seq, 7);
    persist
        .send(Op::DropSession {
            client_id: client.clone(),
        })
        .await;
    persist.barrier().await.await.expect("committed");
    drop(persist);
    let (_persist, snapshot) = reopen(&path, 100).await;
    assert!(snapshot.sessions.is_empty());
}

#[tokio::test]
async fn the_file_shrinks_once_acknowledged_messages_are_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    let client: Arc<str> = Arc::from("c1");
    let messages = 3000u64;
    let payload = vec![0x42u8; 1024];
    {
        let persist = open_with_session(&path, &client, 100).await;
        for seq in 1..=messages {
            let mut delivery = delivery("big", seq);
            delivery.message.payload = Bytes::from(payload.clone());
            persist
                .send(Op::Enqueue {
                    client_id: client.clone(),
                    delivery,
                })
                .await;
        }
        persist.barrier().await.await.expect("committed");
    }
    let (persist, snapshot) = reopen(&path, 100).await;
    assert_eq!(snapshot.sessions[0].spilled, messages - 100);
    let full = std::fs::metadata(&path).expect("size").len();
    assert!(full > messages * 1024, "{full} bytes hold the queue");
    acknowledge_through(&persist, &client, messages, messages).await;
    for _ in 0..100 {
        tokio::time::sleep(PURGE_IDLE * 2).await;
        if persist.page(client.clone(), 0, 1).await.is_empty() {
            break;
        }
    }
    assert!(
        persist.page(client.clone(), 0, 1).await.is_empty(),
        "purged"
    );
    // Free pages go back to the file system a few hundred at a time, every 256 commits.
    for _ in 0..(4 * 256) {
        persist.send(session_op(&client)).await;
        persist.barrier().await.await.expect("committed");
    }
    drop(persist);
    let (_persist, _) = reopen(&path, 100).await;
    let emptied = std::fs::metadata(&path).expect("size").len();
    assert!(
        emptied < full / 4,
        "{emptied} bytes after the purge, {full} with the queue"
    );
}

#[tokio::test]
async fn a_damaged_run_is_refused_at_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    let client: Arc<str> = Arc::from("c1");
    {
        let persist = open_with_session(&path, &client, 100).await;
        enqueue(&persist, &client, 1..=3).await;
        persist.barrier().await.await.expect("committed");
    }
    let damaged = (0..100).find_map(|_| {
        let done = Connection::open(&path).and_then(|conn| {
            conn.execute("UPDATE queue SET messages = x'01ffffffffffffffffff'", [])
        });
        if done.is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        done.ok()
    });
    assert_eq!(damaged, Some(1), "one run written, then damaged");
    let error = Persist::open(&path, Durability::Sync, Duration::ZERO, 100).expect_err("refused");
    let text = error.to_string();
    assert!(matches!(error, PersistError::Corrupt { .. }), "{text}");
    assert!(text.contains("does not decode"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[tokio::test]
async fn unusable_rows_are_left_out_at_start_and_kept_in_quarantine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    let client: Arc<str> = Arc::from("c");
    {
        let persist = open_with_session(&path, &client, 10).await;
        for topic in ["good/1", "bad/properties", "é/good"] {
            persist
                .send(Op::Retain {
                    topic: Arc::from(topic),
                    message: Some(Message::internal("t", topic, "v", QoS::AtLeastOnce, true)),
                })
                .await;
        }
        persist
            .send(Op::Subscriptions {
                client_id: client.clone(),
                subscriptions: ["ok/#", "bad/#"]
                    .map(|filter| StoredSubscription {
                        filter: filter.to_owned(),
                        qos: QoS::AtLeastOnce,
                        no_local: false,
                        retain_as_published: false,
                        subscription_id: None,
                    })
                    .to_vec(),
            })
            .await;
        persist.barrier().await.await.expect("committed");
    }
    // Damage three rows the way a bad disk or a hand edit would.
    let damaged = {
        let mut conn = None;
        for _ in 0..100 {
            let opened = Connection::open(&path).expect("open");
            if opened
                .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN IMMEDIATE; COMMIT;")
                .is_ok()
            {
                conn = Some(opened);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        conn.expect("the store released the file")
    };
    damaged
        .execute_batch(
            "UPDATE retained SET properties = '{not json' WHERE topic = 'bad/properties';
             UPDATE retained SET topic = CAST(X'FF2F78' AS TEXT) WHERE topic = 'good/1';
             UPDATE subscriptions SET filter = 'bad/#/x' WHERE filter = 'bad/#';",
        )
        .expect("damage");
    drop(damaged);

    let (persist, snapshot) = reopen(&path, 10).await;
    let retained: Vec<&str> = snapshot.retained.iter().map(|m| &*m.topic).collect();
    assert_eq!(
        retained,
        ["é/good"],
        "the usable retained message is loaded"
    );
    let filters: Vec<&str> = snapshot.sessions[0]
        .subscriptions
        .iter()
        .map(|s| s.filter.as_str())
        .collect();
    assert_eq!(filters, ["ok/#"]);
    drop(persist);

    // The unusable rows moved to the quarantine table, and are gone from theirs.
    let (persist, snapshot) = reopen(&path, 10).await;
    assert_eq!(snapshot.retained.len(), 1);
    drop(persist);
    let conn = loop {
        let opened = Connection::open(&path).expect("open");
        if opened.execute_batch("BEGIN IMMEDIATE; COMMIT;").is_ok() {
            break opened;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let quarantined: Vec<(String, String)> = conn
        .prepare("SELECT from_table, reason FROM quarantine ORDER BY from_table, reason")
        .expect("prepare")
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    assert_eq!(quarantined.len(), 3, "{quarantined:?}");
    assert!(quarantined[0].1.starts_with("its properties do not decode"));
    assert_eq!(quarantined[1].1, "the topic is not UTF-8");
    assert_eq!(
        quarantined[2],
        ("subscriptions".into(), "not a valid topic filter".into())
    );
}

#[test]
fn a_file_that_is_not_a_database_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    std::fs::write(&path, vec![0x5a; 8192]).expect("write garbage");
    let error = Persist::open(&path, Durability::Sync, Duration::ZERO, 10).expect_err("refused");
    let text = error.to_string();
    assert!(matches!(error, PersistError::Corrupt { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("move the file aside"), "{text}");
}

/// Retained messages and queued runs whose properties are in the form the store wrote
/// before the one stored form (serde's form of `MessageProperties`) load intact.
#[tokio::test]
async fn properties_stored_in_the_older_form_load_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.db");
    let client: Arc<str> = Arc::from("c1");
    let properties = Arc::new(crate::model::MessageProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some("text/plain".into()),
        response_topic: Some("replies/1".into()),
        correlation_data: Some(Bytes::from_static(&[0, 0x7f, 0xff])),
        user_properties: vec![("site".into(), "north".into())],
    });
    {
        let persist = open_with_session(&path, &client, 10).await;
        let mut queued = delivery("a/1", 1);
        queued.message.properties = Some(properties.clone());
        persist
            .send(Op::Enqueue {
                client_id: client.clone(),
                delivery: queued,
            })
            .await;
        let mut retained = Message::internal("t", "r/1", "kept", QoS::AtLeastOnce, true);
        retained.properties = Some(properties.clone());
        send_retain(&persist, retained).await;
        persist.barrier().await.await.expect("committed");
    }
    let older = serde_json::to_string(&*properties).expect("older form");
    let conn = take_over(&path);
    conn.execute("UPDATE retained SET properties = ?1", [&older])
        .expect("retained row in the older form");
    let stored: Vec<u8> = conn
        .query_row("SELECT messages FROM queue", [], |row| row.get(0))
        .expect("one run");
    let mut rewritten = run::Run::default();
    for record in run::records(&stored) {
        let mut record = record.expect("decodes");
        record.properties = Some(&older);
        rewritten.push(&record).expect("encodes");
    }
    conn.execute("UPDATE queue SET messages = ?1", [&rewritten.bytes])
        .expect("run in the older form");
    drop(conn);

    let (_persist, snapshot) = reopen(&path, 10).await;
    assert_eq!(snapshot.retained[0].properties, Some(properties.clone()));
    let queued = &snapshot.sessions[0].queue[0].delivery.message;
    assert_eq!(queued.properties, Some(properties));
}

/// A connection of its own to the database once the store's writer has let go of it.
fn take_over(path: &Path) -> Connection {
    for _ in 0..100 {
        let opened = Connection::open(path).expect("open");
        if opened.execute_batch("BEGIN IMMEDIATE; COMMIT;").is_ok() {
            return opened;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the store did not release {}", path.display());
}
