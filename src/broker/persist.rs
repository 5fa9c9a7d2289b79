//! The broker's durable state in SQLite: sessions that outlive their connection, their
//! subscriptions, their queued and in-flight messages, and retained messages.
//!
//! One OS thread owns the connection. The router and the connections send it [`Op`]s over a
//! bounded channel (a full channel makes them wait: the disk sets the pace, nothing is
//! dropped). The thread applies everything waiting in one transaction (group commit) and
//! then answers the acknowledgements that waited for that commit.
//!
//! Invariants:
//! - A queued message is on disk from the moment the router queues a QoS 1/2 message for
//!   a persistent session until the client acknowledges it (PUBACK, or PUBCOMP for QoS 2):
//!   in a run (`queue`: the messages of one client that one commit wrote, see [`run`]),
//!   until the client's acknowledged watermark passes the run's last seq.
//! - With `Durability::Sync` a publisher is acknowledged only after the commit that holds
//!   every row its message produced (queue rows, retained row).
//! - Messages of one client are delivered in `seq` order; `queue_marks` records what was
//!   in flight (so a restart resends it with the same packet id) and what was removed out
//!   of order (an acknowledgement out of order, an expired or dropped message).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use self::run::{as_row, PendingRuns, Record};
use super::session::{Delivery, InflightState};
use crate::config::Durability;
use crate::model::{Message, MessageProperties, Origin, QoS};

mod run;

/// Ops waiting before a writer blocks.
const CHANNEL: usize = 8192;
/// Most ops applied in one transaction.
const MAX_BATCH: usize = 4096;
/// How long the store thread polls for the next op after a commit before it sleeps: under
/// load the next publish arrives within microseconds, and a sleeping thread takes tens of
/// them to wake (docs/benchmarks.md). Bounded, so an idle store costs nothing.
const NEXT_OP_POLL: Duration = Duration::from_micros(20);
/// Most ops kept to write again after a commit failed for want of space.
const RETRY_MAX: usize = 10_000;
/// `PRAGMA auto_vacuum` value of INCREMENTAL.
const AUTO_VACUUM_INCREMENTAL: i64 = 2;
/// Schema version in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 4;
/// Free pages given back to the file system every 256 commits.
const VACUUM_PAGES: u32 = 256;
/// Commits between two looks at the database file's size.
const SIZE_EVERY: u64 = 64;
/// Bytes of payload buffer allocated at a time when reading a page of queued messages.
const PAYLOAD_CHUNK: usize = 64 * 1024;
/// Prepared statements the store keeps (it uses about twenty).
const STATEMENT_CACHE: usize = 48;
/// The store waits this long without ops before it deletes the runs of acknowledged messages.
const PURGE_IDLE: Duration = Duration::from_millis(20);
/// A commit that nobody waits for is not synced on its own; the next synced one covers it,
/// and one is forced this long after the last (or when the store goes idle).
const UNSYNCED_MAX: Duration = Duration::from_millis(50);
/// Runs of acknowledged messages deleted per purge transaction (a run holds the messages
/// of one commit, typically tens).
const PURGE_CHUNK: usize = 100;
/// Past this many acknowledged messages on disk, their runs are deleted even while busy.
const PURGE_FORCE_ROWS: u64 = 250_000;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(
        "broker database {path} is damaged or not a SQLite database ({reason}); fieldmq does \
         not start with an empty store on its own: move the file aside (`mv {path} {path}.corrupt`, \
         with its -wal and -shm files) to start empty, or restore a backup",
        path = path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "broker database {path} cannot be opened for writing ({reason}): check that the \
         directory exists and is writable by the fieldmq user and the disk is not full",
        path = path.display()
    )]
    Unwritable { path: PathBuf, reason: String },
    #[error("broker database {path}: {reason}", path = path.display())]
    Other { path: PathBuf, reason: String },
}

impl PersistError {
    fn classify(path: &Path, error: rusqlite::Error) -> PersistError {
        use rusqlite::ErrorCode;
        let path = path.to_path_buf();
        let reason = error.to_string();
        match error.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                PersistError::Corrupt { path, reason }
            }
            Some(
                ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure,
            ) => PersistError::Unwritable { path, reason },
            _ => PersistError::Other { path, reason },
        }
    }
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredSubscription {
    /// As the client sent it (may be `$share/group/filter`).
    pub(crate) filter: String,
    pub(crate) qos: QoS,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    pub(crate) subscription_id: Option<usize>,
}

/// One queued message of one session, as loaded at start.
#[derive(Debug, Clone)]
pub(crate) struct StoredDelivery {
    pub(crate) delivery: Delivery,
    /// Packet id and state when it was in flight.
    pub(crate) inflight: Option<(u16, InflightState)>,
}

#[derive(Debug, Clone)]
pub(crate) struct StoredSession {
    pub(crate) client_id: String,
    pub(crate) expiry: u32,
    /// How long ago it disconnected (`None`: it was connected when the broker stopped).
    pub(crate) disconnected_for: Option<Duration>,
    pub(crate) subscriptions: Vec<StoredSubscription>,
    /// Oldest first, at most the in-memory window; `spilled` more wait on disk.
    pub(crate) queue: Vec<StoredDelivery>,
    pub(crate) spilled: u64,
}

/// Everything loaded at start.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) sessions: Vec<StoredSession>,
    pub(crate) retained: Vec<Message>,
    pub(crate) next_seq: u64,
}

pub(crate) enum Op {
    /// Create or update a session (expiry, connected state).
    Session {
        client_id: Arc<str>,
        expiry: u32,
        connected: bool,
    },
    /// Remove a session with its subscriptions and queue.
    DropSession {
        client_id: Arc<str>,
    },
    /// Replace the subscriptions of a session.
    Subscriptions {
        client_id: Arc<str>,
        subscriptions: Vec<StoredSubscription>,
    },
    Enqueue {
        seq: u64,
        client_id: Arc<str>,
        delivery: Delivery,
    },
    Inflight {
        client_id: Arc<str>,
        seq: u64,
        pkid: u16,
        state: InflightState,
    },
    /// Every message of a client up to `through` is done (acknowledged in order): one
    /// watermark write per commit instead of a delete per message. The rows themselves
    /// are deleted later, when the store is idle. `count` is how many acks this covers.
    Acked {
        client_id: Arc<str>,
        through: u64,
        count: u64,
    },
    Remove {
        client_id: Arc<str>,
        seq: u64,
    },
    /// Remove the oldest row of a client above `after_seq` (drop-oldest on a spilled queue).
    RemoveOldest {
        client_id: Arc<str>,
        after_seq: u64,
    },
    Retain {
        topic: Arc<str>,
        message: Option<Message>,
    },
    /// Answered after the commit that holds every op sent before it.
    Barrier(Waiter),
    /// Copy the database to `dest` once everything sent before has been committed.
    Backup {
        dest: PathBuf,
        reply: oneshot::Sender<Result<(), crate::store::backup::BackupError>>,
    },
    /// Rows of a client with `seq > after_seq`, oldest first.
    Page {
        client_id: Arc<str>,
        after_seq: u64,
        limit: usize,
        reply: oneshot::Sender<Vec<(u64, StoredDelivery)>>,
    },
}

/// Where the rows of a [`Persist::request_page`] arrive.
pub(crate) type PageReply = oneshot::Receiver<Vec<(u64, StoredDelivery)>>;

/// Who waits for a commit.
pub(crate) enum Waiter {
    #[cfg(test)]
    Plain(oneshot::Sender<()>),
    /// A publisher's acknowledgement, with whether its message matched a subscriber, and
    /// [`Persist::failures`] from before the message's ops were sent.
    Publish(oneshot::Sender<bool>, bool, u64),
    /// The store's share of an acknowledgement that other stores hold too, with
    /// [`Persist::failures`] from before the message's ops were sent.
    Share(super::ack::AckShare, u64),
}

impl Waiter {
    /// Answer after a successful commit. A publisher is told "stored" only if no commit
    /// failed since its ops were sent: they may have been in the failed one (a batch can end
    /// between a message's rows and its barrier), and then they are not on disk. Dropping
    /// the sender tells it "not stored" (its client resends).
    fn wake(self, failures: u64) {
        match self {
            #[cfg(test)]
            Waiter::Plain(tx) => {
                let _ = tx.send(());
            }
            Waiter::Publish(tx, matched, failures_before) => {
                if failures == failures_before {
                    let _ = tx.send(matched);
                }
            }
            Waiter::Share(share, failures_before) => {
                if failures == failures_before {
                    share.stored();
                }
            }
        }
    }
}

/// The async side: where ops go.
#[derive(Debug, Clone)]
pub(crate) struct Persist {
    tx: mpsc::Sender<Op>,
    size: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    /// Becomes true when the writer thread has checkpointed and closed the file.
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("persist::Op")
    }
}

impl Persist {
    /// Open (or create) the database, load what it holds, and start the writer thread.
    /// `memory_window` is how many queued messages per session are loaded into memory.
    pub(crate) fn open(
        path: &Path,
        durability: Durability,
        commit_window: Duration,
        memory_window: usize,
    ) -> Result<(Persist, Snapshot), PersistError> {
        let mut conn = open_connection(path, durability)?;
        let (snapshot, garbage) =
            load(&mut conn, memory_window).map_err(|e| PersistError::classify(path, e))?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let size = Arc::new(AtomicU64::new(file_size(path)));
        let failures = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            conn,
            path: path.to_path_buf(),
            window: match durability {
                Durability::Batched => commit_window,
                _ => Duration::ZERO,
            },
            synchronous: synchronous_for(durability),
            current_synchronous: synchronous_for(durability),
            unsynced: false,
            last_sync: Instant::now(),
            size: size.clone(),
            failures: failures.clone(),
            commits: 0,
            garbage,
            purging: false,
            retry: Vec::new(),
        };
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        crate::essential::thread("broker-store", move || writer.run(rx, stopped_tx)).map_err(
            |e| PersistError::Other {
                path: path.to_path_buf(),
                reason: format!("cannot start the store thread: {e}"),
            },
        )?;
        Ok((
            Persist {
                tx,
                size,
                failures,
                stopped,
            },
            snapshot,
        ))
    }

    /// Resolves once the writer thread has stopped (every handle dropped) and left the
    /// database complete on its own: WAL checkpointed and truncated, file closed. The
    /// process must not exit before, or the last commits stay only in the `-wal` file.
    pub(crate) fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopped = self.stopped.clone();
        async move {
            // An error means the thread ended without saying so (a panic): nothing to wait for.
            let _ = stopped.wait_for(|done| *done).await;
        }
    }

    /// A handle that can ask for backups without keeping the writer thread alive.
    pub(crate) fn weak(&self) -> WeakPersist {
        WeakPersist {
            tx: self.tx.downgrade(),
        }
    }

    /// Commits that failed so far (see [`Waiter::Publish`]).
    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    pub(crate) async fn send(&self, op: Op) {
        // The writer only stops when every sender is gone; a failed send means shutdown.
        let _ = self.tx.send(op).await;
    }

    /// Resolves once everything sent before has been committed.
    #[cfg(test)]
    pub(crate) async fn barrier(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Barrier(Waiter::Plain(tx))).await;
        rx
    }

    /// [`Self::send`] without waiting: `op` comes back when the queue is full. A closed
    /// queue drops it, as `send` does.
    pub(crate) fn try_send(&self, op: Op) -> Option<Op> {
        match self.tx.try_send(op) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => None,
            Err(mpsc::error::TrySendError::Full(op)) => Some(op),
        }
    }

    /// Ask for up to `limit` rows of a client with `seq > after_seq`, oldest first. The
    /// answer comes after everything sent before it has been applied.
    #[cfg(test)]
    pub(crate) async fn request_page(
        &self,
        client_id: Arc<str>,
        after_seq: u64,
        limit: usize,
    ) -> PageReply {
        let (reply, rows) = oneshot::channel();
        self.send(Op::Page {
            client_id,
            after_seq,
            limit,
            reply,
        })
        .await;
        rows
    }

    #[cfg(test)]
    pub(crate) async fn page(
        &self,
        client_id: Arc<str>,
        after_seq: u64,
        limit: usize,
    ) -> Vec<(u64, StoredDelivery)> {
        let rows = self.request_page(client_id, after_seq, limit).await;
        rows.await.unwrap_or_default()
    }

    /// Bytes on disk (database and WAL), refreshed after commits.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
}

/// See [`Persist::weak`].
#[derive(Debug, Clone)]
pub(crate) struct WeakPersist {
    tx: mpsc::WeakSender<Op>,
}

impl WeakPersist {
    /// Copy the database to `dest` (SQLite's online backup), including every op sent
    /// before this call.
    pub(crate) async fn backup(
        &self,
        dest: PathBuf,
    ) -> Result<(), crate::store::backup::BackupError> {
        let stopped = |dest| crate::store::backup::BackupError::Io {
            path: dest,
            source: std::io::Error::other("the broker store has stopped"),
        };
        let Some(tx) = self.tx.upgrade() else {
            return Err(stopped(dest));
        };
        let (reply, done) = oneshot::channel();
        if tx
            .send(Op::Backup {
                dest: dest.clone(),
                reply,
            })
            .await
            .is_err()
        {
            return Err(stopped(dest));
        }
        drop(tx);
        done.await.map_err(|_| stopped(dest))?
    }
}

fn file_size(path: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    [path.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn open_connection(path: &Path, durability: Durability) -> Result<Connection, PersistError> {
    let err = |e| PersistError::classify(path, e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| PersistError::Unwritable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(Duration::from_millis(200)).map_err(err)?;
    // Statements stay prepared: SQLite would otherwise plan a statement again whenever a
    // bound seq changes (its STAT4 option), i.e. on nearly every step of the queue.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Before anything reads the file: with an exclusive lock from the first access SQLite
    // keeps the WAL index in memory instead of a -shm file, which could not be created on
    // a full disk (and the store could then not even be read).
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(err)?;
    // Must precede table creation to take effect on a new file. Only set when it is not
    // already: setting it writes the header even when unchanged.
    let auto_vacuum: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
        .map_err(err)?;
    if auto_vacuum != AUTO_VACUUM_INCREMENTAL {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(err)?;
    }
    let _: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", synchronous_for(durability))
        .map_err(err)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(err)?;
    if check != "ok" {
        return Err(PersistError::Corrupt {
            path: path.to_path_buf(),
            reason: check,
        });
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(PersistError::Other {
            path: path.to_path_buf(),
            reason: format!(
                "schema version {version} was written by a newer fieldmq (this one knows {SCHEMA_VERSION})"
            ),
        });
    }
    if version == 1 {
        // Version 2 records how far each session's queue has been acknowledged.
        conn.execute_batch("ALTER TABLE sessions ADD COLUMN acked_seq INTEGER NOT NULL DEFAULT 0")
            .map_err(err)?;
    }
    let has_queue: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'queue')",
            [],
            |row| row.get(0),
        )
        .map_err(err)?;
    if (1..4).contains(&version) && has_queue {
        migrate_to_runs(&conn).map_err(err)?;
        // The old table's pages are free now: give them back, and the WAL that held the
        // copy, rather than keep a file twice the size of the queue.
        incremental_vacuum(&conn, None).map_err(err)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(err)?;
    }
    if version == SCHEMA_VERSION {
        // Nothing to create; and a start must not need to write (the disk may be full).
        return Ok(conn);
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS sessions (
             client_id TEXT PRIMARY KEY,
             expiry INTEGER NOT NULL,
             disconnected_ms INTEGER,
             acked_seq INTEGER NOT NULL DEFAULT 0
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS subscriptions (
             client_id TEXT NOT NULL,
             filter TEXT NOT NULL,
             qos INTEGER NOT NULL,
             no_local INTEGER NOT NULL,
             retain_as_published INTEGER NOT NULL,
             subscription_id INTEGER,
             PRIMARY KEY (client_id, filter)
         ) WITHOUT ROWID;
         {QUEUE_TABLES};
         CREATE TABLE IF NOT EXISTS retained (
             topic TEXT PRIMARY KEY,
             payload BLOB NOT NULL,
             qos INTEGER NOT NULL,
             properties TEXT,
             received_ms INTEGER NOT NULL
         ) WITHOUT ROWID;
         PRAGMA user_version = {SCHEMA_VERSION};
         COMMIT;"
    ))
    .map_err(err)?;
    Ok(conn)
}

fn synchronous_for(durability: Durability) -> &'static str {
    match durability {
        Durability::Sync => "FULL",
        _ => "NORMAL",
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The `Instant` a message stored at `received_ms` (wall clock) was received.
fn instant_from_ms(received_ms: i64, now: Instant, now_ms: i64) -> Instant {
    let age = u64::try_from(now_ms.saturating_sub(received_ms)).unwrap_or(0);
    now.checked_sub(Duration::from_millis(age)).unwrap_or(now)
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

fn state_from_code(code: i64) -> Option<InflightState> {
    match code {
        1 => Some(InflightState::Qos1Sent),
        2 => Some(InflightState::Qos2Sent),
        3 => Some(InflightState::Released),
        _ => None,
    }
}

fn encode_properties(properties: &Option<Arc<MessageProperties>>) -> Option<String> {
    properties
        .as_deref()
        .and_then(|p| serde_json::to_string(p).ok())
}

fn decode_properties(text: Option<&str>) -> Option<Arc<MessageProperties>> {
    text.and_then(|t| serde_json::from_str(t).ok())
        .map(Arc::new)
}

/// The store's row decoding for the fuzz targets: the records of a run's bytes with their
/// properties JSON, re-encoded and decoded again (which must give the same records).
/// Returns how many records decoded.
#[cfg(feature = "fuzzing")]
pub fn fuzz_store_row(bytes: &[u8]) -> usize {
    let decoded: Vec<run::Record<'_>> = run::records(bytes).map_while(Result::ok).collect();
    let mut again = run::Run::default();
    for record in &decoded {
        let _ = decode_properties(record.properties);
        again.push(record).expect("a decoded record encodes");
    }
    let back: Vec<run::Record<'_>> = run::records(&again.bytes)
        .collect::<Result<_, _>>()
        .expect("re-encoded records decode");
    assert_eq!(back, decoded, "records change through a round trip");
    decoded.len()
}

/// The properties JSON decoding for the fuzz targets; a decoded value must survive an
/// encode and decode unchanged.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode_properties(text: &str) -> bool {
    let Some(properties) = decode_properties(Some(text)) else {
        return false;
    };
    let encoded = encode_properties(&Some(properties.clone()));
    assert_eq!(
        decode_properties(encoded.as_deref()),
        Some(properties),
        "properties change through a round trip"
    );
    true
}

fn qos_from(code: i64) -> QoS {
    u8::try_from(code)
        .ok()
        .and_then(QoS::from_u8)
        .unwrap_or(QoS::AtLeastOnce)
}

/// Seqs are unique across clients (one counter), so a run's first seq is its row id: runs
/// are appended in seq order, the cheapest insert a b-tree has. The index finds a client's.
/// `queue_marks.state`: an [`InflightState`] code, or [`MARK_REMOVED`].
const QUEUE_TABLES: &str = "CREATE TABLE IF NOT EXISTS queue (
             first_seq INTEGER PRIMARY KEY,
             client_id TEXT NOT NULL,
             last_seq INTEGER NOT NULL,
             count INTEGER NOT NULL,
             messages BLOB NOT NULL
         );
         CREATE INDEX IF NOT EXISTS queue_runs_by_client ON queue (client_id, first_seq);
         CREATE TABLE IF NOT EXISTS queue_marks (
             client_id TEXT NOT NULL,
             seq INTEGER NOT NULL,
             pkid INTEGER,
             state INTEGER NOT NULL,
             PRIMARY KEY (client_id, seq)
         ) WITHOUT ROWID";

/// The mark of a queued message removed before the watermark passed it.
const MARK_REMOVED: i64 = 0;

/// The columns of the one-row-per-message queue of schema versions 1 to 3.
const QUEUE_COLUMNS: &str =
    "seq, topic, payload, qos, retain, subscription_ids, properties, received_ms, pkid, state";

/// Decodes queue rows, sharing what consecutive rows have in common (the origin, and a
/// topic repeated row after row) instead of allocating it per message.
struct RowReader {
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
    fn new(now: Instant, chunk: usize) -> RowReader {
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
            delivery: Delivery {
                message,
                qos,
                retain: record.retain,
                subscription_ids: record.subscription_ids,
                seq: Some(record.seq),
                memory: None,
            },
            inflight,
        }
    }
}

/// `text` as the `last` string when it is the same (rows after rows repeat it), else a new
/// one that becomes `last`.
fn shared(last: &mut Option<Arc<str>>, text: &str) -> Arc<str> {
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
fn read_queue(
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

/// Version 4 keeps queued messages in runs (see [`run`]) and what was in flight in
/// `queue_marks`; versions 1 to 3 have one row per message. Moved over in one
/// transaction, a client at a time, in seq order.
fn migrate_to_runs(conn: &Connection) -> rusqlite::Result<()> {
    in_transaction(conn, || {
        conn.execute_batch(&format!(
            "ALTER TABLE queue RENAME TO queue_rows;
             DROP INDEX IF EXISTS queue_by_client;
             {QUEUE_TABLES};"
        ))?;
        let mut old = conn.prepare(&format!(
            "SELECT client_id, {QUEUE_COLUMNS} FROM queue_rows ORDER BY client_id, seq"
        ))?;
        let mut pending = PendingRuns::default();
        let mut client: Option<Arc<str>> = None;
        let mut rows = old.query([])?;
        while let Some(row) = rows.next()? {
            let client_id = row.get_ref(0)?.as_str()?;
            let client_id = shared(&mut client, client_id);
            let seq: i64 = row.get(1)?;
            let subscription_ids: Option<String> = row.get(6)?;
            let record = Record {
                seq: u64::try_from(seq).unwrap_or(0),
                received_ms: row.get(8)?,
                qos: u8::try_from(row.get::<_, i64>(4)?).unwrap_or(1),
                retain: row.get(5)?,
                topic: row.get_ref(2)?.as_str()?,
                payload: row.get_ref(3)?.as_blob()?,
                subscription_ids: subscription_ids
                    .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or_default(),
                properties: row.get_ref(7)?.as_str_or_null()?,
            };
            pending.add(&client_id, &record)?;
            let inflight = (
                row.get::<_, Option<i64>>(9)?,
                row.get::<_, Option<i64>>(10)?,
            );
            if let (Some(pkid), Some(state)) = inflight {
                let pkid = u16::try_from(pkid).ok();
                mark(conn, &client_id, record.seq, pkid, state)?;
            }
            if pending.bytes() > MIGRATION_PENDING_BYTES {
                pending.write(conn)?;
            }
        }
        pending.write(conn)?;
        drop(rows);
        drop(old);
        conn.execute_batch("DROP TABLE queue_rows;")
    })
}

/// Bytes of converted messages held before they are written, while migrating.
const MIGRATION_PENDING_BYTES: usize = 4 * 1024 * 1024;

/// Load what the database holds. Also returns, per client, the acknowledged watermark
/// below which rows still wait to be deleted.
fn load(conn: &mut Connection, memory_window: usize) -> rusqlite::Result<(Snapshot, Garbage)> {
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
        let properties = row.get_ref(3)?.as_bytes_or_null()?;
        let problem = match std::str::from_utf8(topic_bytes) {
            Err(_) => Some("the topic is not UTF-8".to_owned()),
            Ok(topic) if !crate::mqtt::topic::valid_topic_name(topic) => {
                Some("not a valid topic name".to_owned())
            }
            Ok(_) => properties.and_then(|json| {
                serde_json::from_slice::<MessageProperties>(json)
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
    let moved = in_transaction(conn, || {
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

/// Acknowledged messages not deleted yet: per client, the watermark they are under.
#[derive(Debug, Default)]
struct Garbage {
    through: HashMap<Arc<str>, u64>,
    /// About how many messages wait (acks counted; exact enough to bound the backlog).
    rows: u64,
}

impl Garbage {
    fn add(&mut self, client_id: Arc<str>, through: u64, rows: u64) {
        let entry = self.through.entry(client_id).or_insert(through);
        *entry = (*entry).max(through);
        self.rows += rows;
    }

    fn is_empty(&self) -> bool {
        self.through.is_empty()
    }
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    /// Extra time to gather ops before a commit (`Batched`), zero otherwise.
    window: Duration,
    /// `PRAGMA synchronous` for commits that acknowledge something.
    synchronous: &'static str,
    /// The `PRAGMA synchronous` in effect.
    current_synchronous: &'static str,
    /// Commits since the last synced one, and when that was.
    unsynced: bool,
    last_sync: Instant,
    size: Arc<AtomicU64>,
    /// Failed commits (their ops are lost from disk), shared with [`Persist::failures`].
    failures: Arc<AtomicU64>,
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

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>, stopped: tokio::sync::watch::Sender<bool>) {
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
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            backlog = batch.len() == MAX_BATCH;
            let (backups, batch): (Vec<Op>, Vec<Op>) = batch
                .into_iter()
                .partition(|op| matches!(op, Op::Backup { .. }));
            if !batch.is_empty() {
                self.apply(batch);
            }
            for backup in backups {
                if let Op::Backup { dest, reply } = backup {
                    let _ = reply.send(crate::store::backup::copy_database(&self.conn, &dest));
                }
            }
            if self.garbage.rows > PURGE_FORCE_ROWS {
                self.purge();
            }
        }
        self.close();
        let _ = stopped.send(true);
    }

    /// Copy the WAL into the database and empty it, then close: after a clean stop the
    /// database file alone holds everything (a copy of it, or a lost `-wal`, loses nothing).
    fn close(self) {
        let path = self.path;
        if let Err(error) = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
            tracing::warn!(database = %path.display(), %error, "broker store checkpoint at stop failed");
        }
        if let Err((_, error)) = self.conn.close() {
            tracing::warn!(database = %path.display(), %error, "broker store close failed");
        }
        tracing::debug!(database = %path.display(), "broker store closed");
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
        let sync =
            self.synchronous == "FULL" && (waited_for || self.last_sync.elapsed() >= UNSYNCED_MAX);
        if let Err(error) = self.set_synchronous(if sync { "FULL" } else { "NORMAL" }) {
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
        let result = in_transaction(tx, || {
            for op in ops.by_ref() {
                match op {
                    Op::Barrier(done) => barriers.push(done),
                    Op::Enqueue {
                        seq, ref client_id, ..
                    } if done(client_id, seq) => {
                        never_written.insert(seq);
                    }
                    Op::Inflight {
                        seq, ref client_id, ..
                    } if done(client_id, seq) => {}
                    Op::Enqueue {
                        seq,
                        ref client_id,
                        ref delivery,
                    } => {
                        let properties = encode_properties(&delivery.message.properties);
                        let received_ms = ms_from_instant(delivery.message.received);
                        let record =
                            run::record_of(seq, delivery, received_ms, properties.as_deref());
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
            if is_transient(&error) {
                // A full disk: what sessions, subscriptions, retained messages and queues
                // became meanwhile reaches the disk once space returns, not only when it
                // changes again. Other errors (a row the schema refuses) would fail the same
                // way every time: those ops are dropped.
                written.extend(ops.filter(|op| !matches!(op, Op::Barrier(_) | Op::Page { .. })));
                self.keep_for_retry(written);
            }
            return;
        }
        if sync {
            self.unsynced = false;
            self.last_sync = Instant::now();
        } else if self.synchronous == "FULL" {
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

    fn set_synchronous(&mut self, mode: &'static str) -> rusqlite::Result<()> {
        if self.current_synchronous != mode {
            // Kept prepared: the mode changes with nearly every commit while publishers wait.
            self.conn
                .prepare_cached(&format!("PRAGMA synchronous = {mode}"))?
                .execute([])?;
            self.current_synchronous = mode;
        }
        Ok(())
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
        let result = self.set_synchronous("NORMAL").and_then(|()| {
            let tx = &self.conn;
            in_transaction(tx, || {
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
                tx.prepare_cached("DELETE FROM queue_marks WHERE client_id = ?1 AND seq <= ?2")?
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
fn trim_retry(ops: &mut Vec<Op>, max: usize) -> usize {
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

/// Errors that the same writes would not meet again once the disk has room.
fn is_transient(error: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    matches!(
        error.sqlite_error_code(),
        Some(
            ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
        )
    )
}

/// Run `work` in one write transaction. BEGIN and COMMIT are kept prepared (rusqlite's
/// `Transaction` parses them again for every commit); a failed commit is rolled back.
fn in_transaction<T>(
    conn: &Connection,
    work: impl FnOnce() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let result = work().and_then(|value| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(value)
    });
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// Give free pages back to the file system: at most `pages`, or all.
/// SQLite frees one page per step of this pragma (a row each), so it is stepped to the end.
fn incremental_vacuum(conn: &Connection, pages: Option<u32>) -> rusqlite::Result<()> {
    let sql = match pages {
        Some(pages) => format!("PRAGMA incremental_vacuum({pages})"),
        None => "PRAGMA incremental_vacuum".to_string(),
    };
    let mut vacuum = conn.prepare_cached(&sql)?;
    let mut rows = vacuum.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// Record a queued message's in-flight state, or its removal ([`MARK_REMOVED`]).
fn mark(
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

fn page(
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
                    encode_properties(&message.properties),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str, seq: u64) -> Delivery {
        Delivery {
            message: Message::internal("t", topic, "payload", QoS::AtLeastOnce, false),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![3],
            seq: Some(seq),
            memory: None,
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
            persist
                .send(Op::Retain {
                    topic: retained.topic.clone(),
                    message: Some(retained),
                })
                .await;
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

    async fn send_remove(persist: &Persist, client: &Arc<str>, seq: u64) {
        let client_id = client.clone();
        persist.send(Op::Remove { client_id, seq }).await;
    }

    /// Queue `a/<seq>` for `client` under each seq.
    async fn enqueue(persist: &Persist, client: &Arc<str>, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            persist
                .send(Op::Enqueue {
                    seq,
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
        let (persist, _) =
            Persist::open(&path, Durability::Sync, Duration::ZERO, 10).expect("open");
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
            seq,
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
                Op::Enqueue { seq, .. } => format!("row {seq}"),
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
        let seqs: Vec<Option<u64>> = snapshot.sessions[0]
            .queue
            .iter()
            .map(|d| d.delivery.seq)
            .collect();
        assert_eq!(
            seqs,
            vec![Some(5), Some(6)],
            "acknowledged rows are not loaded"
        );
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
                    Some(41),
                    "a/1".to_string(),
                    QoS::AtLeastOnce,
                    Some((7, InflightState::Qos1Sent))
                ),
                (Some(42), "a/2".to_string(), QoS::ExactlyOnce, None),
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
                    let version: i64 =
                        conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
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
        type Queued = Vec<(Option<u64>, Option<(u16, InflightState)>)>;
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
                (Some(1), None),
                (Some(2), Some((7, InflightState::Qos2Sent))),
                (Some(4), None),
                (Some(6), None)
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
        assert_eq!(queued(&snapshot), vec![(Some(4), None), (Some(6), None)]);
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
                        seq,
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
        let error =
            Persist::open(&path, Durability::Sync, Duration::ZERO, 100).expect_err("refused");
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
        let error =
            Persist::open(&path, Durability::Sync, Duration::ZERO, 10).expect_err("refused");
        let text = error.to_string();
        assert!(matches!(error, PersistError::Corrupt { .. }), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("move the file aside"), "{text}");
    }
}
