use std::time::Duration;

use super::*;
use crate::store::config::WhenFull;

fn bounds(max_messages: u64, when_full: WhenFull) -> QueueConfig {
    QueueConfig {
        max_messages,
        max_bytes: 256 * 1024 * 1024,
        max_age: Duration::from_secs(7 * 24 * 3600),
        when_full,
    }
}

fn record(i: usize) -> OutboxRecord {
    OutboxRecord {
        topic: format!("sites/a/t/{i}"),
        payload: Bytes::from(format!("{i}")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: None,
    }
}

fn records(range: std::ops::Range<usize>) -> Vec<OutboxRecord> {
    range.map(record).collect()
}

fn payloads(rows: &[StoredMessage]) -> Vec<String> {
    rows.iter()
        .map(|r| String::from_utf8_lossy(&r.record.payload).into_owned())
        .collect()
}

#[tokio::test]
async fn appended_rows_are_read_back_in_order_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, bounds(1000, WhenFull::DropOldest))
        .await
        .unwrap();
    let report = outbox.append(records(0..10)).await.unwrap();
    assert_eq!(report.accepted, 10);
    let rows = outbox.read_after(0, 100).await.unwrap();
    assert_eq!(
        payloads(&rows),
        (0..10).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    let after_third = outbox.read_after(rows[2].seq, 3).await.unwrap();
    assert_eq!(payloads(&after_third), ["3", "4", "5"]);
    outbox.close().await.unwrap();

    let outbox = Outbox::open(&path, bounds(1000, WhenFull::DropOldest))
        .await
        .unwrap();
    let stats = outbox.stats().await.unwrap();
    assert_eq!(stats.depth, 10);
    assert!(stats.oldest_enqueued.is_some());
    assert_eq!(outbox.read_after(0, 100).await.unwrap().len(), 10);
}

#[tokio::test]
async fn deleted_rows_are_gone_and_seqs_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, bounds(1000, WhenFull::DropOldest))
        .await
        .unwrap();
    outbox.append(records(0..3)).await.unwrap();
    let rows = outbox.read_after(0, 10).await.unwrap();
    let last = rows[2].seq;
    outbox
        .delete(rows.iter().map(|r| r.seq).collect())
        .await
        .unwrap();
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.depth, stats.bytes, stats.acked), (0, 0, 3));
    assert_eq!(stats.oldest_enqueued, None);
    outbox.close().await.unwrap();

    let outbox = Outbox::open(&path, bounds(1000, WhenFull::DropOldest))
        .await
        .unwrap();
    let report = outbox.append(records(3..4)).await.unwrap();
    assert!(report.last_seq.unwrap() > last, "a seq was reused");
}

#[tokio::test]
async fn max_messages_with_drop_oldest_drops_the_oldest_and_counts_them_persistently() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, bounds(5, WhenFull::DropOldest))
        .await
        .unwrap();
    outbox.append(records(0..4)).await.unwrap();
    let report = outbox.append(records(4..8)).await.unwrap();
    assert_eq!((report.accepted, report.dropped_oldest), (4, 3));
    let rows = outbox.read_after(0, 100).await.unwrap();
    assert_eq!(payloads(&rows), ["3", "4", "5", "6", "7"]);
    assert_eq!(outbox.stats().await.unwrap().dropped.oldest, 3);
    outbox.close().await.unwrap();

    let outbox = Outbox::open(&path, bounds(5, WhenFull::DropOldest))
        .await
        .unwrap();
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.depth, stats.dropped.oldest), (5, 3));
}

#[tokio::test]
async fn max_messages_with_drop_new_refuses_new_records_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o.db"), bounds(3, WhenFull::DropNew))
        .await
        .unwrap();
    let report = outbox.append(records(0..5)).await.unwrap();
    assert_eq!((report.accepted, report.dropped_new), (3, 2));
    assert_eq!(
        payloads(&outbox.read_after(0, 10).await.unwrap()),
        ["0", "1", "2"]
    );
    assert_eq!(outbox.stats().await.unwrap().dropped.new, 2);
}

#[tokio::test]
async fn max_bytes_drops_oldest_until_the_queue_fits() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue = bounds(1000, WhenFull::DropOldest);
    let size = record(0).size();
    queue.max_bytes = size * 3;
    let outbox = Outbox::open(&dir.path().join("o.db"), queue).await.unwrap();
    outbox.append(records(0..5)).await.unwrap();
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.depth, stats.bytes), (3, size * 3));
    assert_eq!(stats.dropped.oldest, 2);
}

#[tokio::test]
async fn rows_older_than_max_age_expire_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut queue = bounds(1000, WhenFull::DropOldest);
    queue.max_age = Duration::from_millis(50);
    let outbox = Outbox::open(&dir.path().join("o.db"), queue).await.unwrap();
    outbox.append(records(0..4)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.depth, stats.dropped.expired), (0, 4));
}

#[tokio::test]
async fn discarded_rows_count_as_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o.db"), bounds(10, WhenFull::DropOldest))
        .await
        .unwrap();
    let report = outbox.append(records(0..2)).await.unwrap();
    outbox
        .discard(vec![report.last_seq.unwrap()], DropReason::Rejected)
        .await
        .unwrap();
    let stats = outbox.stats().await.unwrap();
    assert_eq!(
        (stats.depth, stats.dropped.rejected, stats.acked),
        (1, 1, 0)
    );
}

/// A message with every MQTT 5 property the outbox keeps.
fn every_property() -> MessageProperties {
    MessageProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some("application/json".into()),
        response_topic: Some("r/t".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 0xfe])),
        user_properties: vec![("k".into(), "v".into())],
    }
}

#[tokio::test]
async fn properties_survive_the_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o.db"), bounds(10, WhenFull::DropOldest))
        .await
        .unwrap();
    let mut rec = record(1);
    rec.properties = Some(Arc::new(every_property()));
    rec.retain = true;
    outbox.append(vec![rec.clone()]).await.unwrap();
    let rows = outbox.read_after(0, 1).await.unwrap();
    assert_eq!(rows[0].record, rec);
}

#[tokio::test]
async fn concurrent_appends_are_group_committed_and_all_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        &dir.path().join("o.db"),
        bounds(1_000_000, WhenFull::DropOldest),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                outbox
                    .append(records(t * 1000 + i..t * 1000 + i + 1))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(outbox.stats().await.unwrap().depth, 400);
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("move the file aside"), "{text}");
    // Never a silent empty start: the file is left as it was.
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
}

#[tokio::test]
async fn a_database_with_a_damaged_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap();
    outbox.append(records(0..3)).await.unwrap();
    outbox.close().await.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..16].copy_from_slice(b"garbage garbage!");
    std::fs::write(&path, bytes).unwrap();
    let err = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unwritable_path_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be: cannot be opened as a database, also as root.
    let path = dir.path().join("outbox.db");
    std::fs::create_dir(&path).unwrap();
    let err = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unwritable { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));

    // A parent that is a file.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Outbox::open(&file.join("outbox.db"), bounds(10, WhenFull::DropOldest))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[tokio::test]
async fn an_outbox_from_a_newer_fieldmq_is_refused_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap();
    outbox.append(records(0..2)).await.unwrap();
    outbox.close().await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let known: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    let newer = known + 1;
    conn.pragma_update(None, "user_version", newer).unwrap();
    drop(conn);
    let err = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains(&format!(
            "schema version {newer} was written by a newer fieldmq (this one knows {known})"
        )),
        "{err}"
    );
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, newer, "the newer file is left as it was");
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let _first = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap();
    let err = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
}

/// An outbox at `path` with five rows, the first three acknowledged by the cloud (the ack
/// mark written), killed before their deletion was committed. Returns the mark.
async fn three_of_five_acknowledged_then_killed(path: &Path) -> u64 {
    let outbox = Outbox::open(path, bounds(100, WhenFull::DropOldest))
        .await
        .unwrap();
    assert_eq!(outbox.ack_mark().initial(), 0);
    outbox.append(records(0..5)).await.unwrap();
    let rows = outbox.read_after(0, 10).await.unwrap();
    outbox.ack_mark().write(rows[2].seq).await.unwrap();
    drop(outbox);
    wait_until_released(path).await;
    rows[2].seq
}

/// Wait (5 s at most) until the outbox thread has let go of `path`: while it runs, its
/// connection's exclusive lock makes any other connection's write transaction fail.
async fn wait_until_released(path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let probe = rusqlite::Connection::open(path).unwrap();
        if probe.execute_batch("BEGIN IMMEDIATE; COMMIT;").is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox thread still holds {} after 5 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn rows_up_to_the_ack_mark_are_deleted_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mark = three_of_five_acknowledged_then_killed(&path).await;

    let outbox = Outbox::open(&path, bounds(100, WhenFull::DropOldest))
        .await
        .unwrap();
    assert_eq!(outbox.ack_mark().initial(), mark);
    assert_eq!(
        payloads(&outbox.read_after(0, 10).await.unwrap()),
        ["3", "4"]
    );
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.depth, stats.acked), (2, 3));
}

#[tokio::test]
async fn an_open_whose_deletion_of_acknowledged_rows_fails_still_opens_after_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mark = three_of_five_acknowledged_then_killed(&path).await;
    // The deletion at the next open fails, as it does on a full disk.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse_delete BEFORE DELETE ON outbox
             BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
        )
        .unwrap();

    let outbox = Outbox::open(&path, bounds(100, WhenFull::DropOldest))
        .await
        .expect("an outbox whose start-up deletion fails still opens");
    assert_eq!(outbox.ack_mark().initial(), mark);
    // The acknowledged rows stay (for a later start); the sender starts after the mark.
    assert_eq!(outbox.read_after(0, 10).await.unwrap().len(), 5);
    assert_eq!(
        payloads(&outbox.read_after(mark, 10).await.unwrap()),
        ["3", "4"]
    );
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.depth, stats.acked), (5, 0));
}

#[tokio::test]
async fn an_ack_mark_of_another_database_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, bounds(100, WhenFull::DropOldest))
        .await
        .unwrap();
    outbox.append(records(0..5)).await.unwrap();
    outbox.ack_mark().write(5).await.unwrap();
    outbox.close().await.unwrap();
    // The database is moved aside; the mark file stays. A new database must not lose its
    // first rows to the old mark.
    std::fs::rename(&path, dir.path().join("old.db")).unwrap();
    let outbox = Outbox::open(&path, bounds(100, WhenFull::DropOldest))
        .await
        .unwrap();
    assert_eq!(outbox.ack_mark().initial(), 0);
    outbox.append(records(0..3)).await.unwrap();
    outbox.close().await.unwrap();
    let outbox = Outbox::open(&path, bounds(100, WhenFull::DropOldest))
        .await
        .unwrap();
    assert_eq!(outbox.stats().await.unwrap().depth, 3);
}

#[tokio::test]
async fn deleting_scattered_seqs_deletes_exactly_those_rows() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("o.db"), bounds(100, WhenFull::DropOldest))
        .await
        .unwrap();
    outbox.append(records(0..10)).await.unwrap();
    let rows = outbox.read_after(0, 10).await.unwrap();
    let seq = |i: usize| rows[i].seq;
    outbox
        .delete(vec![seq(7), seq(0), seq(1), seq(2), seq(4), seq(6), seq(2)])
        .await
        .unwrap();
    assert_eq!(
        payloads(&outbox.read_after(0, 10).await.unwrap()),
        ["3", "5", "8", "9"]
    );
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.depth, stats.acked), (4, 6));
    assert_eq!(
        stats.bytes,
        records(0..10)[3..].iter().map(|r| r.size()).sum::<u64>()
            - [4, 6, 7].iter().map(|&i| record(i).size()).sum::<u64>()
    );
}

/// An outbox file as the gateway wrote it before the stores shared one properties encoding:
/// its rows open with their properties intact and count the same bytes.
#[tokio::test]
async fn an_existing_outbox_file_opens_with_its_properties_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let stored = r#"{"pfi":1,"expiry":60,"content_type":"application/json","response_topic":"r/t","correlation":"0001fe","user":[["k","v"]]}"#;
    let size = "sites/a/t/1".len() + 1 + stored.len();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                 payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
                 properties TEXT, size INTEGER NOT NULL, enqueued_ms INTEGER NOT NULL);
             CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             PRAGMA user_version = 1;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, properties, size, enqueued_ms)
             VALUES ('sites/a/t/1', x'31', 1, 0, ?1, ?2, ?3)",
            rusqlite::params![stored, size as i64, crate::store::now_ms()],
        )
        .unwrap();
    }
    let outbox = Outbox::open(&path, bounds(10, WhenFull::DropOldest))
        .await
        .unwrap();
    let rows = outbox.read_after(0, 1).await.unwrap();
    assert_eq!(
        rows[0].record.properties.as_deref(),
        Some(&every_property())
    );
    assert_eq!(rows[0].record.size(), size as u64, "counts the same bytes");
    assert_eq!(outbox.stats().await.unwrap().bytes, size as u64);
}
