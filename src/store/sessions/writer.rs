//! The broker store's writer thread: applies every op waiting in one transaction (group
//! commit), answers the waiters after the commit, keeps writes that failed for want of space
//! for another try, and deletes acknowledged messages and gives their pages back when idle.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::mpsc;

use super::load::{page, read_queue, RowReader};
use super::ops::Op;
use super::run::{self, as_row, PendingRuns};
use super::schema::{incremental_vacuum, MARK_REMOVED};
use super::InflightState;
use crate::model::Message;
use crate::store::backup::copy_database;
use crate::store::commit_times::CommitTimes;
use crate::store::{self, now_ms, properties, SyncLevel, Synchronous};

/// Most ops applied in one transaction.
const MAX_BATCH: usize = 4096;

/// How long the store thread polls for the next op after a commit before it sleeps: under
/// load the next publish arrives within microseconds, and a sleeping thread takes tens of
/// them to wake (docs/benchmarks.md). Bounded, so an idle store costs nothing.
const NEXT_OP_POLL: Duration = Duration::from_micros(20);

/// Most ops kept to write again after a commit failed for want of space.
const RETRY_MAX: usize = 10_000;

/// Free pages given back to the file system every 256 commits.
const VACUUM_PAGES: u32 = 256;

/// Commits between two looks at the database file's size.
const SIZE_EVERY: u64 = 64;

/// The store waits this long without ops before it deletes the runs of acknowledged messages.
pub(super) const PURGE_IDLE: Duration = Duration::from_millis(20);

/// A commit that nobody waits for is not synced on its own; the next synced one covers it,
/// and one is forced this long after the last (or when the store goes idle).
const UNSYNCED_MAX: Duration = Duration::from_millis(50);

/// Runs of acknowledged messages deleted per purge transaction (a run holds the messages
/// of one commit, typically tens).
const PURGE_CHUNK: usize = 100;

/// Past this many acknowledged messages on disk, their runs are deleted even while busy.
const PURGE_FORCE_ROWS: u64 = 250_000;

/// Bytes on disk: the database and its WAL.
pub(super) fn file_size(path: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    [path.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn ms_from_instant(received: Instant) -> i64 {
    let age = i64::try_from(received.elapsed().as_millis()).unwrap_or(0);
    now_ms().saturating_sub(age)
}

fn state_code(state: InflightState) -> i64 {
    match state {
        InflightState::Qos1Sent => 1,
        InflightState::Qos2Sent => 2,
        InflightState::Released => 3,
    }
}

fn encode_properties(message: &Message) -> Option<String> {
    message.properties.as_deref().map(properties::encode)
}

/// Acknowledged messages not deleted yet: per client, the watermark they are under.
#[derive(Debug, Default)]
pub(super) struct Garbage {
    through: HashMap<Arc<str>, u64>,
    /// About how many messages wait (acks counted; exact enough to bound the backlog).
    rows: u64,
}

impl Garbage {
    pub(super) fn add(&mut self, client_id: Arc<str>, through: u64, rows: u64) {
        let entry = self.through.entry(client_id).or_insert(through);
        *entry = (*entry).max(through);
        self.rows += rows;
    }

    fn is_empty(&self) -> bool {
        self.through.is_empty()
    }
}

pub(super) struct Writer {
    conn: Connection,
    path: PathBuf,
    /// Extra time to gather ops before a commit (`Batched`), zero otherwise.
    window: Duration,
    /// `PRAGMA synchronous` for commits that acknowledge something.
    synchronous: Synchronous,
    /// The `PRAGMA synchronous` in effect.
    sync: SyncLevel,
    /// Commits since the last synced one, and when that was.
    unsynced: bool,
    last_sync: Instant,
    size: Arc<AtomicU64>,
    /// Failed commits (their ops are lost from disk), shared with [`super::Persist::failures`].
    failures: Arc<AtomicU64>,
    /// Shared with [`super::Persist::commit_times`].
    commit_times: Arc<CommitTimes>,
    commits: u64,
    garbage: Garbage,
    /// The store has been idle for [`PURGE_IDLE`]: purge until an op arrives.
    purging: bool,
    /// Ops of the last batch whose commit failed for want of space (see [`Writer::apply`]).
    retry: Vec<Op>,
}

/// What the writer does next.
enum Next {
    Op(Op),
    /// Nothing to write: time to delete the runs of acknowledged messages.
    Idle,
    Closed,
}

/// What the writer reports and [`super::Persist`] reads.
pub(super) struct Shared {
    pub(super) size: Arc<AtomicU64>,
    pub(super) failures: Arc<AtomicU64>,
    pub(super) commit_times: Arc<CommitTimes>,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        sync: SyncLevel,
        path: &Path,
        window: Duration,
        shared: Shared,
        garbage: Garbage,
    ) -> Writer {
        let Shared {
            size,
            failures,
            commit_times,
        } = shared;
        Writer {
            conn,
            path: path.to_path_buf(),
            window,
            synchronous: sync.current,
            sync,
            unsynced: false,
            last_sync: Instant::now(),
            size,
            failures,
            commit_times,
            commits: 0,
            garbage,
            purging: false,
            retry: Vec::new(),
        }
    }

    pub(super) fn run(
        mut self,
        mut rx: mpsc::Receiver<Op>,
        stopped: tokio::sync::watch::Sender<bool>,
    ) {
        // Only for waiting on the channel with a timeout while there is garbage to delete.
        let idle_clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok();
        // The last batch was full: what it left in the channel has waited for a window
        // already, and must not wait another (with a long `commit_window` and more than
        // MAX_BATCH ops per window, each op would otherwise wait several windows).
        let mut backlog = false;
        loop {
            let first = match self.next(&mut rx, idle_clock.as_ref()) {
                Next::Op(op) => op,
                Next::Idle => {
                    self.on_idle();
                    continue;
                }
                Next::Closed => break,
            };
            let mut batch = vec![first];
            if !self.window.is_zero() && !backlog {
                std::thread::sleep(self.window);
            }
            store::drain_into(&mut rx, &mut batch, MAX_BATCH);
            backlog = batch.len() == MAX_BATCH;
            let (backups, batch): (Vec<Op>, Vec<Op>) = batch
                .into_iter()
                .partition(|op| matches!(op, Op::Backup { .. }));
            if !batch.is_empty() {
                self.apply(batch);
            }
            for backup in backups {
                if let Op::Backup { dest, reply } = backup {
                    let _ = reply.send(copy_database(&self.conn, &dest));
                }
            }
            if self.garbage.rows > PURGE_FORCE_ROWS {
                self.purge();
            }
        }
        store::checkpoint_and_close(self.conn, &self.path, "broker store");
        let _ = stopped.send(true);
    }

    fn next(
        &mut self,
        rx: &mut mpsc::Receiver<Op>,
        idle_clock: Option<&tokio::runtime::Runtime>,
    ) -> Next {
        let received = if self.garbage.is_empty() && !self.unsynced {
            poll_briefly(rx).or_else(|| rx.blocking_recv())
        } else if self.purging {
            match rx.try_recv() {
                Ok(op) => Some(op),
                Err(mpsc::error::TryRecvError::Empty) => return Next::Idle,
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            }
        } else {
            let Some(clock) = idle_clock else {
                self.purging = true;
                return Next::Idle;
            };
            match poll_briefly(rx) {
                Some(op) => Some(op),
                None => match clock
                    .block_on(async { tokio::time::timeout(PURGE_IDLE, rx.recv()).await })
                {
                    Ok(op) => op,
                    Err(_) => {
                        self.purging = true;
                        return Next::Idle;
                    }
                },
            }
        };
        match received {
            Some(op) => {
                self.purging = false;
                Next::Op(op)
            }
            None => Next::Closed,
        }
    }

    fn apply(&mut self, mut batch: Vec<Op>) {
        if !self.retry.is_empty() {
            // Before the new ops: their order is the order of the changes.
            let mut retried = std::mem::take(&mut self.retry);
            retried.append(&mut batch);
            batch = retried;
        }
        let mut barriers = Vec::new();
        let mut pages = Vec::new();
        // A row queued and acknowledged within one batch (a client that keeps up) never
        // needs to reach the disk, and an in-flight mark on a row deleted in the same batch
        // is moot: both are skipped.
        let mut removed = HashSet::new();
        let mut acked: HashMap<Arc<str>, (u64, u64)> = HashMap::new();
        for op in &batch {
            match op {
                Op::Remove { seq, .. } => {
                    removed.insert(*seq);
                }
                Op::Acked {
                    client_id,
                    through,
                    count,
                } => {
                    let entry = acked.entry(client_id.clone()).or_insert((*through, 0));
                    entry.0 = entry.0.max(*through);
                    entry.1 += count;
                }
                _ => {}
            }
        }
        // Sync (fsync) when someone waits for this commit, or when the last sync is getting
        // old; other commits (deliveries acknowledged, in-flight marks, sessions) become
        // durable with the next synced one.
        let waited_for = batch.iter().any(|op| matches!(op, Op::Barrier(_)));
        let sync = self.synchronous == Synchronous::Full
            && (waited_for || self.last_sync.elapsed() >= UNSYNCED_MAX);
        let level = if sync {
            Synchronous::Full
        } else {
            Synchronous::Normal
        };
        if let Err(error) = self.sync.set(&self.conn, level) {
            tracing::error!(database = %self.path.display(), %error, "cannot set the store's sync mode");
            self.failures.fetch_add(1, Ordering::AcqRel);
            return;
        }
        let done = |client_id: &str, seq: u64| {
            removed.contains(&seq) || acked.get(client_id).is_some_and(|(w, _)| seq <= *w)
        };
        let mut never_written = HashSet::new();
        let mut runs = PendingRuns::default();
        let mut dropped_sessions = Vec::new();
        // What this batch writes, kept until it has committed: a commit that fails for want
        // of space is tried again with the next batch (see `retry`).
        let mut written = Vec::new();
        let mut ops = batch.into_iter();
        let tx = &self.conn;
        let started = Instant::now();
        let result = store::in_transaction(tx, || {
            for op in ops.by_ref() {
                match op {
                    Op::Barrier(done) => barriers.push(done),
                    Op::Enqueue {
                        ref client_id,
                        ref delivery,
                    } if done(client_id, delivery.seq) => {
                        never_written.insert(delivery.seq);
                    }
                    Op::Inflight {
                        seq, ref client_id, ..
                    } if done(client_id, seq) => {}
                    Op::Enqueue {
                        ref client_id,
                        ref delivery,
                    } => {
                        let properties = encode_properties(&delivery.message);
                        let received_ms = ms_from_instant(delivery.message.received);
                        let record = run::record_of(delivery, received_ms, properties.as_deref());
                        runs.add(client_id, &record)?;
                        written.push(op);
                    }
                    Op::Remove { ref client_id, seq } => {
                        if !never_written.contains(&seq) {
                            mark(tx, client_id, seq, None, MARK_REMOVED)?;
                            written.push(op);
                        }
                    }
                    Op::Inflight {
                        ref client_id,
                        seq,
                        pkid,
                        state,
                    } => {
                        mark(tx, client_id, seq, Some(pkid), state_code(state))?;
                        written.push(op);
                    }
                    Op::Acked { .. } => written.push(op),
                    Op::Page {
                        client_id,
                        after_seq,
                        limit,
                        reply,
                    } => {
                        // Runs go first so that ops that read the queue see them.
                        runs.write(tx)?;
                        let rows = page(tx, &client_id, after_seq, limit)?;
                        pages.push((reply, rows));
                    }
                    other => {
                        if let Op::DropSession { client_id } = &other {
                            dropped_sessions.push(client_id.clone());
                        }
                        if matches!(other, Op::DropSession { .. } | Op::RemoveOldest { .. }) {
                            runs.write(tx)?;
                        }
                        let applied = apply_op(tx, &other);
                        written.push(other);
                        applied?;
                    }
                }
            }
            runs.write(tx)?;
            let mut watermark = tx.prepare_cached(
                "UPDATE sessions SET acked_seq = max(acked_seq, ?2) WHERE client_id = ?1",
            )?;
            for (client_id, (through, _)) in &acked {
                watermark.execute(params![&**client_id, as_row(*through)])?;
            }
            drop(watermark);
            Ok(())
        });
        if let Err(error) = result {
            // Waiters are not answered, so publishers see no acknowledgement for what was not
            // stored, nor are later ones whose ops may have been in this batch (they send
            // again). Memory still has everything.
            tracing::error!(database = %self.path.display(), %error, "broker store commit failed");
            self.failures.fetch_add(1, Ordering::AcqRel);
            if store::is_transient(&error) {
                // A full disk: what sessions, subscriptions, retained messages and queues
                // became meanwhile reaches the disk once space returns, not only when it
                // changes again. Other errors (a row the schema refuses) would fail the same
                // way every time: those ops are dropped.
                written.extend(ops.filter(|op| !matches!(op, Op::Barrier(_) | Op::Page { .. })));
                self.keep_for_retry(written);
            }
            return;
        }
        // The transaction with its commit (and fsync, when synced): what a publisher under
        // `sync` waits for.
        self.commit_times.record(started.elapsed());
        if sync {
            self.unsynced = false;
            self.last_sync = Instant::now();
        } else if self.synchronous == Synchronous::Full {
            self.unsynced = true;
        }
        let skipped = never_written.len() as u64;
        for (client_id, (through, count)) in acked {
            self.garbage.add(client_id, through, count);
        }
        self.garbage.rows = self.garbage.rows.saturating_sub(skipped);
        for client_id in dropped_sessions {
            self.garbage.through.remove(&client_id);
        }
        for waiter in barriers {
            waiter.wake(self.failures.load(Ordering::Acquire));
        }
        for (reply, rows) in pages {
            let _ = reply.send(rows);
        }
        self.after_commit();
    }

    /// Keep the ops of a batch whose commit failed for want of space, to go first in the
    /// next batch. At most [`RETRY_MAX`]: past it the oldest queued rows go first (those
    /// messages are still delivered from memory, but would not survive a restart).
    fn keep_for_retry(&mut self, mut ops: Vec<Op>) {
        let dropped = trim_retry(&mut ops, RETRY_MAX);
        self.retry = ops;
        if dropped == 0 {
            return;
        }
        tracing::warn!(
            database = %self.path.display(),
            dropped,
            "the broker store cannot write: the oldest queued messages waiting for space will \
             not be on disk (they are still delivered unless the gateway restarts first)"
        );
    }

    /// No ops for a while: make unsynced commits durable, then delete acknowledged rows.
    fn on_idle(&mut self) {
        if self.unsynced {
            // A checkpoint syncs the WAL first (then copies it into the database).
            if let Err(error) = self.conn.pragma_update(None, "wal_checkpoint", "PASSIVE") {
                tracing::warn!(database = %self.path.display(), %error, "store checkpoint failed");
            }
            self.unsynced = false;
            self.last_sync = Instant::now();
        }
        self.purge();
    }

    /// Delete one chunk of rows under a client's acknowledged watermark. Nothing waits for
    /// this commit, so it is not synced on its own (the next synced commit covers it; a
    /// power cut before then only leaves rows that are deleted again after the restart).
    fn purge(&mut self) {
        let Some((client_id, through)) = self
            .garbage
            .through
            .iter()
            .next()
            .map(|(c, t)| (c.clone(), *t))
        else {
            return;
        };
        let result = self
            .sync
            .set(&self.conn, Synchronous::Normal)
            .and_then(|()| {
                let tx = &self.conn;
                store::in_transaction(tx, || {
                    // A run that straddles the watermark stays until it passes the run's end.
                    let messages = tx
                        .prepare_cached(
                            "DELETE FROM queue WHERE first_seq IN (SELECT first_seq FROM queue
                         WHERE client_id = ?1 AND first_seq <= ?2 AND last_seq <= ?2
                         ORDER BY first_seq LIMIT ?3)
                         RETURNING count",
                        )?
                        .query_map(
                            params![&*client_id, as_row(through), PURGE_CHUNK as i64],
                            |row| row.get::<_, i64>(0),
                        )?
                        .collect::<rusqlite::Result<Vec<i64>>>()?;
                    tx.prepare_cached(
                        "DELETE FROM queue_marks WHERE client_id = ?1 AND seq <= ?2",
                    )?
                    .execute(params![&*client_id, as_row(through)])?;
                    Ok(messages)
                })
            });
        match result {
            Ok(runs) => {
                let messages: i64 = runs.iter().sum();
                self.garbage.rows = self
                    .garbage
                    .rows
                    .saturating_sub(u64::try_from(messages).unwrap_or(0));
                if runs.len() < PURGE_CHUNK {
                    self.garbage.through.remove(&client_id);
                    if self.garbage.is_empty() {
                        self.garbage.rows = 0;
                    }
                }
            }
            Err(error) => {
                // Left for the next start (it finds them again) rather than retried hot.
                tracing::warn!(database = %self.path.display(), %error, "cannot delete acknowledged messages");
                self.garbage.through.remove(&client_id);
            }
        }
        self.after_commit();
    }

    fn after_commit(&mut self) {
        self.commits += 1;
        if self.commits % 256 == 0 {
            // Give freed pages back a little at a time so the file stays bounded.
            if let Err(error) = incremental_vacuum(&self.conn, Some(VACUUM_PAGES)) {
                tracing::warn!(database = %self.path.display(), %error, "store vacuum failed");
            }
        }
        if self.commits % SIZE_EVERY == 0 {
            // The size is only shown ($SYS): a stat per commit would cost more than it tells.
            self.size.store(file_size(&self.path), Ordering::Relaxed);
        }
    }
}

/// The next op if one arrives within [`NEXT_OP_POLL`].
fn poll_briefly(rx: &mut mpsc::Receiver<Op>) -> Option<Op> {
    let deadline = Instant::now() + NEXT_OP_POLL;
    loop {
        match rx.try_recv() {
            Ok(op) => return Some(op),
            Err(mpsc::error::TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::yield_now();
            }
            Err(_) => return None,
        }
    }
}

/// Shorten `ops` to at most `max` by dropping its oldest queued rows; returns how many
/// were dropped. Other ops (sessions, subscriptions, retained, acknowledgements) are few
/// and all kept.
pub(super) fn trim_retry(ops: &mut Vec<Op>, max: usize) -> usize {
    let mut excess = ops.len().saturating_sub(max);
    let wanted = excess;
    ops.retain(|op| {
        if excess > 0 && matches!(op, Op::Enqueue { .. }) {
            excess -= 1;
            false
        } else {
            true
        }
    });
    wanted - excess
}

/// Record a queued message's in-flight state, or its removal ([`MARK_REMOVED`]).
pub(super) fn mark(
    tx: &Connection,
    client_id: &str,
    seq: u64,
    pkid: Option<u16>,
    state: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO queue_marks (client_id, seq, pkid, state) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![client_id, as_row(seq), pkid, state])?;
    Ok(())
}

fn apply_op(tx: &Connection, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Session {
            client_id,
            expiry,
            connected,
        } => {
            let disconnected = (!connected).then(now_ms);
            tx.prepare_cached(
                "INSERT INTO sessions (client_id, expiry, disconnected_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (client_id) DO UPDATE SET expiry = ?2, disconnected_ms = ?3",
            )?
            .execute(params![&**client_id, i64::from(*expiry), disconnected])?;
        }
        Op::DropSession { client_id } => {
            tx.prepare_cached("DELETE FROM sessions WHERE client_id = ?1")?
                .execute([&**client_id])?;
            tx.prepare_cached("DELETE FROM subscriptions WHERE client_id = ?1")?
                .execute([&**client_id])?;
            tx.prepare_cached("DELETE FROM queue WHERE client_id = ?1")?
                .execute([&**client_id])?;
            tx.prepare_cached("DELETE FROM queue_marks WHERE client_id = ?1")?
                .execute([&**client_id])?;
        }
        Op::Subscriptions {
            client_id,
            subscriptions,
        } => {
            tx.prepare_cached("DELETE FROM subscriptions WHERE client_id = ?1")?
                .execute([&**client_id])?;
            let mut insert = tx.prepare_cached(
                "INSERT OR REPLACE INTO subscriptions
                 (client_id, filter, qos, no_local, retain_as_published, subscription_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for sub in subscriptions {
                insert.execute(params![
                    &**client_id,
                    sub.filter,
                    sub.qos as u8,
                    sub.no_local,
                    sub.retain_as_published,
                    sub.subscription_id.and_then(|n| i64::try_from(n).ok()),
                ])?;
            }
        }
        Op::RemoveOldest {
            client_id,
            after_seq,
        } => {
            let mut reader = RowReader::new(Instant::now(), 0);
            if let Some((seq, _)) = read_queue(tx, client_id, *after_seq, 1, &mut reader)?.pop() {
                mark(tx, client_id, seq, None, MARK_REMOVED)?;
            }
        }
        Op::Retain { topic, message } => match message {
            Some(message) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO retained (topic, payload, qos, properties, received_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    &**topic,
                    &message.payload[..],
                    message.qos as u8,
                    encode_properties(message),
                    ms_from_instant(message.received),
                ])?;
            }
            None => {
                tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                    .execute([&**topic])?;
            }
        },
        // Handled by the writer itself (batched deletes, replies after the commit).
        Op::Barrier(_)
        | Op::Backup { .. }
        | Op::Page { .. }
        | Op::Enqueue { .. }
        | Op::Inflight { .. }
        | Op::Remove { .. }
        | Op::Acked { .. } => {}
    }
    Ok(())
}
