//! The outbox thread: owns the SQLite connection, executes every waiting write in one
//! transaction (group commit), answers reads after the commit, enforces the bounds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::{
    AppendReport, DropCounters, DropReason, OutboxRecord, OutboxStats, StoreError, StoredMessage,
};
use crate::model::QoS;
use crate::store::backup::copy_database;
use crate::store::config::{QueueConfig, WhenFull};
use crate::store::{self, now_ms, properties, Settings, SyncLevel, Synchronous};

/// Requests executed in one transaction at most. More waiting requests go to the next one.
const MAX_BATCH: usize = 512;
/// Schema version in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;
/// Prepared statements the outbox keeps.
const STATEMENT_CACHE: usize = 32;
/// At most one drop summary per reason in this interval.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// `max_age` is applied at most this often.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What `open` hands back to the async side.
pub(super) struct Opened {
    pub(super) mark_file: std::fs::File,
    pub(super) instance: u64,
    pub(super) mark: u64,
}

pub(super) enum Request {
    Append {
        records: Vec<OutboxRecord>,
        reply: Reply<AppendReport>,
    },
    ReadAfter {
        after: u64,
        limit: usize,
        reply: Reply<Vec<StoredMessage>>,
    },
    Delete {
        seqs: Vec<u64>,
        reason: Option<DropReason>,
        reply: Reply<()>,
    },
    Stats {
        reply: Reply<OutboxStats>,
    },
    Close {
        reply: Reply<()>,
    },
    /// Copy the file to `dest` after this batch's writes.
    Backup {
        dest: PathBuf,
        reply: Reply<()>,
    },
}

struct Writer {
    conn: Connection,
    queue: Queue,
    /// The `synchronous` level the connection is at (see [`Writer::execute`]).
    sync: SyncLevel,
}

/// What the thread knows about the queue without asking SQLite.
struct Queue {
    path: PathBuf,
    bounds: QueueConfig,
    depth: u64,
    bytes: u64,
    oldest_enqueued_ms: Option<i64>,
    dropped: DropCounters,
    acked: u64,
    counters_dirty: bool,
    last_expiry: Option<Instant>,
    drop_log: DropLog,
}

/// Drops not yet logged, so that a full queue logs a summary every few seconds rather than a
/// line per message.
#[derive(Default)]
struct DropLog {
    pending: DropCounters,
    last: Option<Instant>,
}

pub(super) fn run(
    path: PathBuf,
    bounds: QueueConfig,
    mut rx: mpsc::Receiver<Request>,
    ready: oneshot::Sender<Result<Opened, StoreError>>,
) {
    let mut writer = match Writer::open(&path, bounds) {
        Ok((writer, opened)) => {
            let _ = ready.send(Ok(opened));
            writer
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    tracing::info!(
        outbox = %path.display(),
        depth = writer.queue.depth,
        bytes = writer.queue.bytes,
        "outbox opened"
    );
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        store::drain_into(&mut rx, &mut batch, MAX_BATCH);
        if let Some(close) = writer.execute(batch) {
            writer.close();
            let _ = close.send(Ok(()));
            return;
        }
    }
    writer.close();
}

impl Writer {
    fn open(path: &Path, bounds: QueueConfig) -> Result<(Writer, Opened), StoreError> {
        let err = |e| StoreError::classify(path, e);
        let settings = Settings {
            what: "outbox",
            statement_cache: STATEMENT_CACHE,
            stable_plans: false,
            incremental_vacuum: false,
            synchronous: Synchronous::Full,
        };
        let (mut conn, sync) = store::open(path, &settings).map_err(err)?;

        // A write transaction at open proves the file is a database, is writable and is not
        // used by another process, before anything counts as accepted.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let version = store::user_version(&tx).map_err(err)?;
        if let Some(reason) = store::newer_schema(version, SCHEMA_VERSION) {
            return Err(StoreError::Sqlite {
                path: path.to_path_buf(),
                source: rusqlite::Error::InvalidParameterName(reason),
            });
        }
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 qos INTEGER NOT NULL,
                 retain INTEGER NOT NULL,
                 properties TEXT,
                 size INTEGER NOT NULL,
                 enqueued_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS counters (
                 name TEXT PRIMARY KEY,
                 value INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(err)?;
        if version != SCHEMA_VERSION {
            // Only when it changes: an open must not need a write (the disk may be full).
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err)?;
        }
        let mut dropped = DropCounters::default();
        let mut acked = 0;
        let mut instance = 0;
        {
            let mut stmt = tx
                .prepare("SELECT name, value FROM counters")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .map_err(err)?;
            for row in rows {
                let (name, value) = row.map_err(err)?;
                match name.as_str() {
                    // The bit pattern of a random id, stored as SQLite's signed integer.
                    "instance" => instance = value as u64,
                    _ => {
                        let value = u64::try_from(value).unwrap_or(0);
                        match name.as_str() {
                            "dropped_oldest" => dropped.oldest = value,
                            "dropped_new" => dropped.new = value,
                            "dropped_expired" => dropped.expired = value,
                            "rejected" => dropped.rejected = value,
                            "acked" => acked = value,
                            _ => {}
                        }
                    }
                }
            }
        }
        if instance == 0 {
            instance = rand::random::<u64>() | 1;
            tx.execute(
                "INSERT INTO counters (name, value) VALUES ('instance', ?1)",
                [instance as i64],
            )
            .map_err(err)?;
        }

        // Rows up to the ack mark were acknowledged before the last stop: delete them now.
        let mark_path = super::ack_mark_path(path);
        let mark_error = |source| StoreError::MarkFile {
            path: mark_path.clone(),
            source,
        };
        let mut mark_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&mark_path)
            .map_err(mark_error)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut mark_file, &mut bytes).map_err(mark_error)?;
        let mark = super::decode_mark(&bytes, instance).unwrap_or(0);
        tx.commit().map_err(err)?;
        if mark > 0 {
            // Best effort: on a full disk the rows stay until a later start (the sender
            // starts after the mark, so they are not sent again), and the gateway starts.
            let deleted = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .and_then(|tx| {
                    let deleted = tx.execute(
                        "DELETE FROM outbox WHERE seq <= ?1",
                        [i64::try_from(mark).unwrap_or(i64::MAX)],
                    )?;
                    if deleted > 0 {
                        tx.execute(
                            "INSERT INTO counters (name, value) VALUES ('acked', ?1)
                             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                            [i64::try_from(acked + deleted as u64).unwrap_or(i64::MAX)],
                        )?;
                    }
                    tx.commit()?;
                    Ok(deleted)
                });
            match deleted {
                Ok(deleted) => {
                    acked += deleted as u64;
                    if deleted > 0 {
                        tracing::debug!(outbox = %path.display(), deleted, mark, "deleted rows acknowledged before the last stop");
                    }
                }
                Err(error) => {
                    tracing::warn!(outbox = %path.display(), %error, mark, "cannot delete rows acknowledged before the last stop; left for the next start");
                }
            }
        }
        let (depth, bytes): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM outbox",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(err)?;
        let mut writer = Writer {
            conn,
            sync,
            queue: Queue {
                path: path.to_path_buf(),
                bounds,
                depth: u64::try_from(depth).unwrap_or(0),
                bytes: u64::try_from(bytes).unwrap_or(0),
                oldest_enqueued_ms: None,
                dropped,
                acked,
                counters_dirty: false,
                last_expiry: None,
                drop_log: DropLog::default(),
            },
        };
        writer.queue.oldest_enqueued_ms = writer.query_oldest().map_err(err)?;
        Ok((
            writer,
            Opened {
                mark_file,
                instance,
                mark,
            },
        ))
    }

    fn query_oldest(&self) -> rusqlite::Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT enqueued_ms FROM outbox ORDER BY seq LIMIT 1")?
            .query_row([], |row| row.get(0))
            .optional()
    }

    /// Checkpoint and close the connection (the file is complete on its own afterwards).
    fn close(self) {
        let Writer {
            conn, mut queue, ..
        } = self;
        queue.flush_drop_log(true);
        store::checkpoint_and_close(conn, &queue.path, "outbox");
    }

    /// Execute one batch. Returns the reply of a close request: the thread must stop.
    fn execute(&mut self, batch: Vec<Request>) -> Option<Reply<()>> {
        let mut appends = Vec::new();
        let mut deletes = Vec::new();
        let mut reads = Vec::new();
        let mut close = None;
        for request in batch {
            match request {
                Request::Append { records, reply } => appends.push((records, reply)),
                Request::Delete {
                    seqs,
                    reason,
                    reply,
                } => deletes.push((seqs, reason, reply)),
                Request::Close { reply } => close = Some(reply),
                read => reads.push(read),
            }
        }

        let expire = !reads.is_empty() || !appends.is_empty();
        if !appends.is_empty() || !deletes.is_empty() || expire {
            // Appends are fsynced at commit (FULL): accepted messages survive a power cut.
            // A transaction that only deletes (acknowledged rows, drops) is committed with
            // NORMAL: it survives a crash or kill -9 (the WAL is written before the commit
            // returns), and after a power cut at worst rows reappear and are sent again,
            // never lost. The next FULL commit or checkpoint makes it durable as well.
            let level = if appends.is_empty() {
                Synchronous::Normal
            } else {
                Synchronous::Full
            };
            if let Err(e) = self.sync.set(&self.conn, level) {
                tracing::warn!(outbox = %self.queue.path.display(), error = %e, ?level, "cannot change the sync level");
            }
            let saved = self.queue.snapshot();
            match self.write(&appends, &deletes, expire) {
                Ok(reports) => {
                    for ((_, reply), report) in appends.into_iter().zip(reports) {
                        let _ = reply.send(Ok(report));
                    }
                    for (_, _, reply) in deletes {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    // The transaction rolled back: restore what it had changed.
                    self.queue.restore(saved);
                    tracing::error!(outbox = %self.queue.path.display(), error = %e, "outbox write failed");
                    let message = e.to_string();
                    for (_, reply) in appends {
                        let _ = reply.send(Err(self.queue.write_error(&message)));
                    }
                    for (_, _, reply) in deletes {
                        let _ = reply.send(Err(self.queue.write_error(&message)));
                    }
                }
            }
        }
        self.queue.flush_drop_log(false);

        for read in reads {
            match read {
                Request::ReadAfter {
                    after,
                    limit,
                    reply,
                } => {
                    let result =
                        self.read_after(after, limit)
                            .map_err(|source| StoreError::Sqlite {
                                path: self.queue.path.clone(),
                                source,
                            });
                    let _ = reply.send(result);
                }
                Request::Stats { reply } => {
                    let _ = reply.send(Ok(self.queue.stats()));
                }
                Request::Backup { dest, reply } => {
                    let result = copy_database(&self.conn, &dest).map_err(StoreError::Backup);
                    let _ = reply.send(result);
                }
                _ => {}
            }
        }

        close
    }

    fn write(
        &mut self,
        appends: &[(Vec<OutboxRecord>, Reply<AppendReport>)],
        deletes: &[(Vec<u64>, Option<DropReason>, Reply<()>)],
        expire: bool,
    ) -> rusqlite::Result<Vec<AppendReport>> {
        let Writer { conn, queue, .. } = self;
        let tx = conn.unchecked_transaction()?;
        let mut changed_front = false;

        for (seqs, reason, _) in deletes {
            // Acknowledged seqs come in long consecutive runs: one range delete per run.
            let mut sorted: Vec<i64> = seqs
                .iter()
                .map(|s| i64::try_from(*s).unwrap_or(i64::MAX))
                .collect();
            sorted.sort_unstable();
            sorted.dedup();
            let mut sum = tx.prepare_cached(
                "SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE seq BETWEEN ?1 AND ?2",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2")?;
            let mut count = 0u64;
            let mut start = 0;
            while start < sorted.len() {
                let mut end = start;
                while end + 1 < sorted.len() && sorted[end + 1] == sorted[end] + 1 {
                    end += 1;
                }
                let (first, last) = (sorted[start], sorted[end]);
                let (rows, size): (i64, i64) =
                    sum.query_row([first, last], |row| Ok((row.get(0)?, row.get(1)?)))?;
                if rows > 0 {
                    delete.execute([first, last])?;
                    let rows = u64::try_from(rows).unwrap_or(0);
                    count += rows;
                    queue.depth = queue.depth.saturating_sub(rows);
                    queue.bytes = queue.bytes.saturating_sub(u64::try_from(size).unwrap_or(0));
                }
                start = end + 1;
            }
            changed_front |= count > 0;
            match reason {
                None => {
                    queue.acked += count;
                    queue.counters_dirty |= count > 0;
                }
                Some(reason) => queue.count_drop(*reason, count),
            }
        }

        if expire && queue.last_expiry.is_none_or_elapsed(EXPIRY_INTERVAL) {
            queue.last_expiry = Some(Instant::now());
            let expired = queue.expire(&tx)?;
            changed_front |= expired > 0;
        }

        let mut reports = Vec::with_capacity(appends.len());
        for (records, _) in appends {
            let mut report = AppendReport::default();
            let now = now_ms();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO outbox (topic, payload, qos, retain, properties, size, enqueued_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for record in records {
                    let properties = record.properties.as_deref().map(properties::encode);
                    let size = (record.topic.len()
                        + record.payload.len()
                        + properties.as_ref().map_or(0, String::len))
                        as u64;
                    let full = queue.depth >= queue.bounds.max_messages
                        || queue.bytes + size > queue.bounds.max_bytes;
                    if size > queue.bounds.max_bytes
                        || (full && queue.bounds.when_full == WhenFull::DropNew)
                    {
                        report.dropped_new += 1;
                        continue;
                    }
                    insert.execute(params![
                        record.topic,
                        &record.payload[..],
                        u8::from(record.qos),
                        record.retain,
                        properties,
                        i64::try_from(size).unwrap_or(i64::MAX),
                        now,
                    ])?;
                    if queue.depth == 0 {
                        queue.oldest_enqueued_ms = Some(now);
                    }
                    queue.depth += 1;
                    queue.bytes += size;
                    report.accepted += 1;
                    report.last_seq = u64::try_from(tx.last_insert_rowid()).ok();
                }
            }
            // Only when a bound is passed: looking at the front costs a query.
            if queue.bounds.when_full == WhenFull::DropOldest
                && (queue.depth > queue.bounds.max_messages || queue.bytes > queue.bounds.max_bytes)
            {
                let dropped = queue.drop_front(&tx, |q, _| {
                    q.depth > q.bounds.max_messages || q.bytes > q.bounds.max_bytes
                })?;
                if dropped > 0 {
                    changed_front = true;
                    // Rows of this very call may be among the oldest when the bound is tiny.
                    report.dropped_oldest = usize::try_from(dropped).unwrap_or(usize::MAX);
                    queue.count_drop(DropReason::Oldest, dropped);
                }
            }
            if report.dropped_new > 0 {
                queue.count_drop(DropReason::New, report.dropped_new as u64);
            }
            reports.push(report);
        }

        if changed_front {
            queue.oldest_enqueued_ms = tx
                .prepare_cached("SELECT enqueued_ms FROM outbox ORDER BY seq LIMIT 1")?
                .query_row([], |row| row.get(0))
                .optional()?;
        }
        if queue.counters_dirty {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )?;
            for (name, value) in [
                ("dropped_oldest", queue.dropped.oldest),
                ("dropped_new", queue.dropped.new),
                ("dropped_expired", queue.dropped.expired),
                ("rejected", queue.dropped.rejected),
                ("acked", queue.acked),
            ] {
                upsert.execute(params![name, i64::try_from(value).unwrap_or(i64::MAX)])?;
            }
        }
        tx.commit()?;
        queue.counters_dirty = false;
        Ok(reports)
    }

    fn read_after(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<StoredMessage>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, topic, payload, qos, retain, properties, enqueued_ms
             FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![after, limit], |row| {
            let seq: i64 = row.get(0)?;
            let payload: Vec<u8> = row.get(2)?;
            let qos: u8 = row.get(3)?;
            let properties: Option<String> = row.get(5)?;
            let enqueued_ms: i64 = row.get(6)?;
            Ok(StoredMessage {
                seq: u64::try_from(seq).unwrap_or(0),
                record: OutboxRecord {
                    topic: row.get(1)?,
                    payload: Bytes::from(payload),
                    qos: QoS::from_u8(qos).unwrap_or(QoS::AtLeastOnce),
                    retain: row.get(4)?,
                    properties: properties
                        .and_then(|stored| properties::decode(stored.as_bytes()).ok())
                        .map(Arc::new),
                },
                enqueued_at: from_ms(enqueued_ms),
            })
        })?;
        rows.collect()
    }
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

type Snapshot = (u64, u64, Option<i64>, DropCounters, u64, DropCounters);

impl Queue {
    fn snapshot(&self) -> Snapshot {
        (
            self.depth,
            self.bytes,
            self.oldest_enqueued_ms,
            self.dropped,
            self.acked,
            self.drop_log.pending,
        )
    }

    fn restore(&mut self, saved: Snapshot) {
        (
            self.depth,
            self.bytes,
            self.oldest_enqueued_ms,
            self.dropped,
            self.acked,
            self.drop_log.pending,
        ) = saved;
    }

    fn write_error(&self, message: &str) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source: rusqlite::Error::InvalidParameterName(format!("write failed: {message}")),
        }
    }

    fn count_drop(&mut self, reason: DropReason, count: u64) {
        if count == 0 {
            return;
        }
        self.counters_dirty = true;
        let (total, pending) = match reason {
            DropReason::Oldest => (&mut self.dropped.oldest, &mut self.drop_log.pending.oldest),
            DropReason::New => (&mut self.dropped.new, &mut self.drop_log.pending.new),
            DropReason::Expired => (
                &mut self.dropped.expired,
                &mut self.drop_log.pending.expired,
            ),
            DropReason::Rejected => (
                &mut self.dropped.rejected,
                &mut self.drop_log.pending.rejected,
            ),
        };
        *total += count;
        *pending += count;
    }

    /// Delete rows older than `max_age`, oldest first.
    fn expire(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<u64> {
        let max_age_ms = i64::try_from(self.bounds.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(max_age_ms);
        match self.oldest_enqueued_ms {
            Some(oldest) if oldest < cutoff => {}
            _ => return Ok(0),
        }
        let expired = self.drop_front(tx, |_, enqueued| enqueued < cutoff)?;
        self.count_drop(DropReason::Expired, expired);
        Ok(expired)
    }

    /// Delete rows from the front of the queue while `over(self, enqueued_ms of the row)`.
    fn drop_front(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        over: impl Fn(&Queue, i64) -> bool,
    ) -> rusqlite::Result<u64> {
        let mut dropped = 0;
        loop {
            // Walk the front lazily: only the rows that go are decoded.
            let mut cut = None;
            let mut more = false;
            {
                let mut stmt =
                    tx.prepare_cached("SELECT seq, size, enqueued_ms FROM outbox ORDER BY seq")?;
                let mut rows = stmt.query([])?;
                let mut taken = 0;
                while let Some(row) = rows.next()? {
                    let enqueued: i64 = row.get(2)?;
                    if !over(self, enqueued) {
                        break;
                    }
                    let size: i64 = row.get(1)?;
                    self.depth = self.depth.saturating_sub(1);
                    self.bytes = self.bytes.saturating_sub(u64::try_from(size).unwrap_or(0));
                    dropped += 1;
                    cut = Some(row.get::<_, i64>(0)?);
                    taken += 1;
                    // Bound the statement's life: delete in chunks.
                    if taken == 4096 {
                        more = true;
                        break;
                    }
                }
            }
            let Some(cut) = cut else { break };
            tx.prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?
                .execute([cut])?;
            if !more {
                break;
            }
        }
        if self.depth == 0 {
            self.bytes = 0;
        }
        Ok(dropped)
    }

    fn stats(&self) -> OutboxStats {
        OutboxStats {
            depth: self.depth,
            bytes: self.bytes,
            oldest_enqueued: self.oldest_enqueued_ms.map(from_ms),
            dropped: self.dropped,
            acked: self.acked,
        }
    }

    fn flush_drop_log(&mut self, force: bool) {
        let pending = self.drop_log.pending;
        if pending.total() == 0 {
            return;
        }
        let due = force || self.drop_log.last.is_none_or_elapsed(DROP_LOG_INTERVAL);
        if !due {
            return;
        }
        tracing::warn!(
            outbox = %self.path.display(),
            dropped_oldest = pending.oldest,
            dropped_new = pending.new,
            dropped_expired = pending.expired,
            rejected = pending.rejected,
            depth = self.depth,
            bytes = self.bytes,
            max_messages = self.bounds.max_messages,
            max_bytes = self.bounds.max_bytes,
            "outbox dropped messages (counts since the last report)"
        );
        self.drop_log.pending = DropCounters::default();
        self.drop_log.last = Some(Instant::now());
    }
}

/// `Option<Instant>`: never happened, or longer ago than `interval`.
trait ElapsedSince {
    fn is_none_or_elapsed(&self, interval: Duration) -> bool;
}

impl ElapsedSince for Option<Instant> {
    fn is_none_or_elapsed(&self, interval: Duration) -> bool {
        match self {
            None => true,
            Some(t) => t.elapsed() >= interval,
        }
    }
}
