//! Reading the broker store: everything it holds at start ([`load`]), pages of a session's
//! queue that spilled to disk ([`page`]), and the quarantine of rows that cannot be used.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rusqlite::{params, Connection, OptionalExtension};

use super::run::{self, as_row, Record};
use super::schema::MARK_REMOVED;
use super::writer::Garbage;
use super::{
    InflightState, QueuedDelivery, Snapshot, StoredDelivery, StoredSession, StoredSubscription,
};
use crate::model::{Message, MessageProperties, Origin, QoS};
use crate::store::{self, now_ms, properties};

/// Bytes of payload buffer allocated at a time when reading a page of queued messages.
const PAYLOAD_CHUNK: usize = 64 * 1024;

/// The `Instant` a message stored at `received_ms` (wall clock) was received.
fn instant_from_ms(received_ms: i64, now: Instant, now_ms: i64) -> Instant {
    let age = u64::try_from(now_ms.saturating_sub(received_ms)).unwrap_or(0);
    now.checked_sub(Duration::from_millis(age)).unwrap_or(now)
}

fn state_from_code(code: i64) -> Option<InflightState> {
    match code {
        1 => Some(InflightState::Qos1Sent),
        2 => Some(InflightState::Qos2Sent),
        3 => Some(InflightState::Released),
        _ => None,
    }
}

/// Stored properties; none when they do not decode.
pub(super) fn decode_properties(text: Option<&str>) -> Option<Arc<MessageProperties>> {
    text.and_then(|t| properties::decode(t.as_bytes()).ok())
        .map(Arc::new)
}

fn qos_from(code: i64) -> QoS {
    u8::try_from(code)
        .ok()
        .and_then(QoS::from_u8)
        .unwrap_or(QoS::AtLeastOnce)
}

/// Decodes queue rows, sharing what consecutive rows have in common (the origin, and a
/// topic repeated row after row) instead of allocating it per message.
pub(super) struct RowReader {
    now: Instant,
    /// The wall clock at `now`, read once per page rather than per row.
    now_ms: i64,
    origin: Origin,
    last_topic: Option<Arc<str>>,
    /// Payloads are cut from shared chunks of this many bytes (0: one per payload): one
    /// allocation for many messages, and a payload cloned later (into a packet) is a
    /// reference count, not a copy.
    payloads: BytesMut,
    chunk: usize,
}

impl RowReader {
    /// `chunk`: for rows about to be sent (a page), so that a chunk is soon freed; rows that
    /// may stay in memory for long (loaded at start) are better allocated one by one.
    pub(super) fn new(now: Instant, chunk: usize) -> RowReader {
        RowReader {
            now,
            now_ms: now_ms(),
            origin: Origin::Internal(Arc::from("store")),
            last_topic: None,
            payloads: BytesMut::new(),
            chunk,
        }
    }

    fn payload(&mut self, bytes: &[u8]) -> Bytes {
        if self.payloads.capacity() < bytes.len() {
            self.payloads.reserve(bytes.len().max(self.chunk));
        }
        self.payloads.extend_from_slice(bytes);
        self.payloads.split().freeze()
    }

    fn topic(&mut self, topic: &str) -> Arc<str> {
        shared(&mut self.last_topic, topic)
    }

    fn delivery(
        &mut self,
        record: Record<'_>,
        inflight: Option<(u16, InflightState)>,
    ) -> StoredDelivery {
        let qos = qos_from(i64::from(record.qos));
        let message = Message {
            topic: self.topic(record.topic),
            payload: self.payload(record.payload),
            qos,
            retain: record.retain,
            properties: decode_properties(record.properties),
            origin: self.origin.clone(),
            received: instant_from_ms(record.received_ms, self.now, self.now_ms),
        };
        StoredDelivery {
            delivery: QueuedDelivery {
                message,
                qos,
                retain: record.retain,
                subscription_ids: record.subscription_ids,
                seq: record.seq,
            },
            inflight,
        }
    }
}

/// `text` as the `last` string when it is the same (rows after rows repeat it), else a new
/// one that becomes `last`.
pub(super) fn shared(last: &mut Option<Arc<str>>, text: &str) -> Arc<str> {
    match last {
        Some(last) if &**last == text => last.clone(),
        _ => {
            let fresh: Arc<str> = Arc::from(text);
            *last = Some(fresh.clone());
            fresh
        }
    }
}

/// A run whose bytes do not decode: the database is damaged (SQLite's own code for it, so
/// that the error says what to do).
fn damaged_run(error: postcard::Error) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some(format!("a queued message does not decode: {error}")),
    )
}

/// Up to `limit` of a client's queued messages with seq above `after_seq`, oldest first,
/// without those removed, with their in-flight state.
pub(super) fn read_queue(
    tx: &Connection,
    client_id: &str,
    after_seq: u64,
    limit: usize,
    reader: &mut RowReader,
) -> rusqlite::Result<Vec<(u64, StoredDelivery)>> {
    let mut messages = Vec::with_capacity(limit.min(PAGE_CAPACITY_MAX));
    if limit == 0 {
        return Ok(messages);
    }
    // From the run that holds `after_seq` (if any), not from the client's first run.
    let mut runs = tx.prepare_cached(
        "SELECT first_seq, last_seq, messages FROM queue
         WHERE client_id = ?1 AND last_seq > ?2 AND first_seq >= coalesce(
             (SELECT max(first_seq) FROM queue WHERE client_id = ?1 AND first_seq <= ?2), 0)
         ORDER BY first_seq",
    )?;
    let mut marks = tx.prepare_cached(
        "SELECT seq, pkid, state FROM queue_marks WHERE client_id = ?1 AND seq BETWEEN ?2 AND ?3",
    )?;
    let mut rows = runs.query(params![client_id, as_row(after_seq)])?;
    while let Some(row) = rows.next()? {
        let (first, last): (i64, i64) = (row.get(0)?, row.get(1)?);
        let run_marks = marks
            .query_map(params![client_id, first, last], |mark| {
                Ok((
                    mark.get::<_, i64>(0)?,
                    (mark.get::<_, Option<i64>>(1)?, mark.get::<_, i64>(2)?),
                ))
            })?
            .collect::<rusqlite::Result<HashMap<_, _>>>()?;
        let bytes = row.get_ref(2)?.as_blob()?;
        for record in run::records(bytes) {
            let record = record.map_err(damaged_run)?;
            if record.seq <= after_seq {
                continue;
            }
            let inflight = match run_marks.get(&as_row(record.seq)) {
                Some((_, MARK_REMOVED)) => continue,
                Some((Some(pkid), state)) => u16::try_from(*pkid).ok().zip(state_from_code(*state)),
                _ => None,
            };
            let seq = record.seq;
            messages.push((seq, reader.delivery(record, inflight)));
            if messages.len() >= limit {
                return Ok(messages);
            }
        }
    }
    Ok(messages)
}

/// How many queued messages a client has with seq above `after_seq` (removed ones not
/// counted).
fn live_count(tx: &Connection, client_id: &str, after_seq: u64) -> rusqlite::Result<u64> {
    let after = as_row(after_seq);
    let whole_runs: i64 = tx
        .prepare_cached(
            "SELECT coalesce(sum(count), 0) FROM queue WHERE client_id = ?1 AND first_seq > ?2",
        )?
        .query_row(params![client_id, after], |row| row.get(0))?;
    let straddling: Option<Vec<u8>> = tx
        .prepare_cached(
            "SELECT messages FROM queue WHERE client_id = ?1 AND first_seq <= ?2 AND last_seq > ?2",
        )?
        .query_row(params![client_id, after], |row| row.get(0))
        .optional()?;
    let mut in_straddling = 0;
    for record in straddling.iter().flat_map(|bytes| run::records(bytes)) {
        if record.map_err(damaged_run)?.seq > after_seq {
            in_straddling += 1;
        }
    }
    let removed: i64 = tx
        .prepare_cached(
            "SELECT count(*) FROM queue_marks WHERE client_id = ?1 AND seq > ?2 AND state = ?3",
        )?
        .query_row(params![client_id, after, MARK_REMOVED], |row| row.get(0))?;
    Ok((u64::try_from(whole_runs).unwrap_or(0) + in_straddling)
        .saturating_sub(u64::try_from(removed).unwrap_or(0)))
}

/// Load what the database holds. Also returns, per client, the acknowledged watermark
/// below which rows still wait to be deleted.
pub(super) fn load(
    conn: &mut Connection,
    memory_window: usize,
) -> rusqlite::Result<(Snapshot, Garbage)> {
    let now = Instant::now();
    let now_wall = now_ms();
    let mut snapshot = Snapshot::default();
    let mut garbage = Garbage::default();
    let mut unusable = Vec::new();
    // Seqs never go back, not even below a watermark whose rows are all deleted.
    let next_seq: Option<i64> = conn
        .query_row(
            // Per session: a max over the whole table would scan it (it is keyed by client).
            // A client's last run holds its highest seq.
            "SELECT max(max(acked_seq,
                 coalesce((SELECT last_seq FROM queue WHERE queue.client_id = sessions.client_id
                           ORDER BY first_seq DESC LIMIT 1), 0)))
             FROM sessions",
            [],
            |row| row.get(0),
        )
        .optional()?
        .flatten();
    snapshot.next_seq = u64::try_from(next_seq.unwrap_or(0)).unwrap_or(0) + 1;

    let mut sessions =
        conn.prepare("SELECT client_id, expiry, disconnected_ms, acked_seq FROM sessions")?;
    let rows = sessions.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, Option<i64>>(2)?,
            row.get::<_, i64>(3)?,
        ))
    })?;
    let mut subscriptions = conn.prepare(
        "SELECT filter, qos, no_local, retain_as_published, subscription_id
         FROM subscriptions WHERE client_id = ?1",
    )?;
    let mut has_garbage = conn.prepare(
        "SELECT EXISTS (SELECT 1 FROM queue WHERE client_id = ?1 AND first_seq <= ?2)
             OR EXISTS (SELECT 1 FROM queue_marks WHERE client_id = ?1 AND seq <= ?2)",
    )?;
    for row in rows {
        let (client_id, expiry, disconnected_ms, acked_seq) = row?;
        if has_garbage.query_row(params![&client_id, acked_seq], |row| row.get::<_, bool>(0))? {
            garbage.add(
                Arc::from(client_id.as_str()),
                u64::try_from(acked_seq).unwrap_or(0),
                0,
            );
        }
        let mut subs = Vec::new();
        let mut rows = subscriptions.query([&client_id])?;
        while let Some(row) = rows.next()? {
            let filter = row.get_ref(0)?.as_bytes()?;
            let filter = match std::str::from_utf8(filter) {
                Ok(text) if crate::mqtt::topic::parse_filter(text).is_some() => text.to_owned(),
                _ => {
                    unusable.push(Unusable {
                        table: "subscriptions",
                        key: vec![client_id.as_bytes().to_vec(), filter.to_vec()],
                        reason: "not a valid topic filter".into(),
                    });
                    continue;
                }
            };
            subs.push(StoredSubscription {
                filter,
                qos: qos_from(row.get(1)?),
                no_local: row.get(2)?,
                retain_as_published: row.get(3)?,
                subscription_id: row
                    .get::<_, Option<i64>>(4)?
                    .and_then(|n| usize::try_from(n).ok()),
            });
        }
        drop(rows);
        let acked = u64::try_from(acked_seq).unwrap_or(0);
        let mut reader = RowReader::new(now, 0);
        let queued: Vec<StoredDelivery> =
            read_queue(conn, &client_id, acked, memory_window, &mut reader)?
                .into_iter()
                .map(|(_, d)| d)
                .collect();
        let spilled = live_count(conn, &client_id, acked)?.saturating_sub(queued.len() as u64);
        // A session that was connected when the broker died counts as disconnected now.
        let disconnected_for = Some(Duration::from_millis(
            u64::try_from(now_wall.saturating_sub(disconnected_ms.unwrap_or(now_wall)))
                .unwrap_or(0),
        ));
        snapshot.sessions.push(StoredSession {
            client_id,
            expiry: u32::try_from(expiry).unwrap_or(u32::MAX),
            disconnected_for,
            subscriptions: subs,
            queue: queued,
            spilled,
        });
    }
    drop((sessions, subscriptions, has_garbage));

    let wall_now = now_ms();
    let mut retained =
        conn.prepare("SELECT topic, payload, qos, properties, received_ms FROM retained")?;
    let mut rows = retained.query([])?;
    while let Some(row) = rows.next()? {
        let topic_bytes = row.get_ref(0)?.as_bytes()?;
        let stored_properties = row.get_ref(3)?.as_bytes_or_null()?;
        let problem = match std::str::from_utf8(topic_bytes) {
            Err(_) => Some("the topic is not UTF-8".to_owned()),
            Ok(topic) if !crate::mqtt::topic::valid_topic_name(topic) => {
                Some("not a valid topic name".to_owned())
            }
            Ok(_) => stored_properties.and_then(|stored| {
                properties::decode(stored)
                    .err()
                    .map(|e| format!("its properties do not decode: {e}"))
            }),
        };
        if let Some(reason) = problem {
            unusable.push(Unusable {
                table: "retained",
                key: vec![topic_bytes.to_vec()],
                reason,
            });
            continue;
        }
        let topic = String::from_utf8_lossy(topic_bytes);
        let payload: Vec<u8> = row.get(1)?;
        snapshot.retained.push(Message {
            topic: Arc::from(topic.as_ref()),
            payload: Bytes::from(payload),
            qos: qos_from(row.get(2)?),
            retain: true,
            properties: decode_properties(row.get::<_, Option<String>>(3)?.as_deref()),
            origin: Origin::Internal(Arc::from("store")),
            received: instant_from_ms(row.get(4)?, now, wall_now),
        });
    }
    drop(rows);
    drop(retained);
    quarantine(&*conn, &unusable);
    Ok((snapshot, garbage))
}

/// A stored row that cannot be used (written by a damaged disk, a bug or a hand edit): it is
/// left out at start and moved to the `quarantine` table for a person to look at.
struct Unusable {
    table: &'static str,
    /// The row's primary key columns.
    key: Vec<Vec<u8>>,
    reason: String,
}

/// Move unusable rows into `quarantine`, logging each. Best effort: a start must not need to
/// write (the disk may be full); a row that cannot be moved is left out again next time.
fn quarantine(conn: &Connection, rows: &[Unusable]) {
    for row in rows {
        let shown: Vec<String> = row
            .key
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        tracing::error!(
            table = row.table,
            key = ?shown,
            reason = %row.reason,
            "a stored row cannot be used: left out and kept in the quarantine table"
        );
    }
    if rows.is_empty() {
        return;
    }
    let moved = store::in_transaction(conn, || {
        let tx = conn;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS quarantine (
                 id INTEGER PRIMARY KEY,
                 from_table TEXT NOT NULL,
                 reason TEXT NOT NULL,
                 quarantined_ms INTEGER NOT NULL,
                 row TEXT NOT NULL
             )",
        )?;
        for row in rows {
            let (copy, delete) = match row.table {
                "retained" => (
                    "SELECT json_object('topic', hex(topic), 'payload', hex(payload),
                         'qos', qos, 'properties', hex(properties), 'received_ms', received_ms)
                     FROM retained WHERE CAST(topic AS BLOB) = ?1",
                    "DELETE FROM retained WHERE CAST(topic AS BLOB) = ?1",
                ),
                _ => (
                    "SELECT json_object('client_id', hex(client_id), 'filter', hex(filter),
                         'qos', qos, 'no_local', no_local,
                         'retain_as_published', retain_as_published,
                         'subscription_id', subscription_id)
                     FROM subscriptions
                     WHERE CAST(client_id AS BLOB) = ?1 AND CAST(filter AS BLOB) = ?2",
                    "DELETE FROM subscriptions
                     WHERE CAST(client_id AS BLOB) = ?1 AND CAST(filter AS BLOB) = ?2",
                ),
            };
            let key = || rusqlite::params_from_iter(row.key.iter());
            let copied: Option<String> = tx.query_row(copy, key(), |r| r.get(0)).optional()?;
            if let Some(copied) = copied {
                tx.execute(
                    "INSERT INTO quarantine (from_table, reason, quarantined_ms, row)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![row.table, row.reason, now_ms(), copied],
                )?;
                tx.execute(delete, key())?;
            }
        }
        Ok(())
    });
    if let Err(error) = moved {
        tracing::warn!(%error, "unusable rows could not be moved to the quarantine table; they are left out at every start");
    }
}

pub(super) fn page(
    tx: &Connection,
    client_id: &str,
    after_seq: u64,
    limit: usize,
) -> rusqlite::Result<Vec<(u64, StoredDelivery)>> {
    let mut reader = RowReader::new(Instant::now(), PAYLOAD_CHUNK);
    read_queue(tx, client_id, after_seq, limit, &mut reader)
}

/// A page's vector is sized up front (rows are large: no regrowth while reading), to at
/// most this many.
const PAGE_CAPACITY_MAX: usize = 4096;
