//! The durable outbox of one uplink: an SQLite file that holds every message an out-route
//! accepted until the cloud has acknowledged it.
//!
//! One dedicated OS thread owns the `rusqlite::Connection` (`writer`); async code talks to
//! it through a bounded channel with a oneshot reply per request ([`Outbox`]). The thread
//! drains every request that is waiting and executes all writes of that batch in ONE
//! transaction (group commit), then answers reads.
//!
//! # Invariants
//!
//! 1. **Accepted means committed.** [`Outbox::append`] returns only after the transaction
//!    holding the rows has committed. The file runs in WAL mode with `synchronous = FULL`:
//!    a committed transaction is on disk (fsync of the WAL) before the call returns, so an
//!    accepted message survives a crash, `kill -9` and a power cut. Transactions that only
//!    delete (acknowledged rows, drops) commit with `synchronous = NORMAL`: they survive a
//!    crash or `kill -9`; a power cut can only bring rows back (sent again), never lose one.
//! 2. **Order is `seq`.** Every row gets a `seq` from an `AUTOINCREMENT` key: strictly
//!    increasing, never reused, also after the table was empty. The sender reads in `seq`
//!    order ([`Outbox::read_after`]) and publishes in that order.
//! 3. **Rows are deleted only after the cloud acknowledged them** ([`Outbox::delete`] with
//!    the PUBACK/PUBCOMP'd seqs), or by a bound (below), which is always counted.
//! 4. **At least once.** A row sent but not yet acknowledged is sent again after a
//!    reconnect or a restart. The *ack mark* ([`AckMark`], a small file next to the
//!    database) holds the highest seq up to which every row is acknowledged; it is written
//!    without waiting for SQLite (no fsync: it survives `kill -9`, and a power cut can only
//!    move it back, which resends, never loses). At open, rows up to the mark are deleted;
//!    the sender never sends them again. Duplicates are bounded by the sender's in-flight
//!    window: a window slot is only freed once a mark covering its row has been written.
//!    Acknowledged rows are deleted from the table in batches afterwards; that deletion
//!    no longer gates the window.
//! 5. **Bounded.** `max_messages`, `max_bytes` (topic + payload + properties) and `max_age`
//!    (see [`QueueConfig`]). When a bound is reached, `when_full = drop_oldest` deletes the
//!    oldest rows, `drop_new` refuses the new ones; rows older than `max_age` are deleted.
//!    Every drop is counted in the file itself (the `counters` table, committed in the same
//!    transaction as the drop) and logged with its count.
//! 6. **No silent empty start.** A file that is not a database, is damaged, cannot be
//!    written or is used by another process gives a [`StoreError`] at [`Outbox::open`] that
//!    names the file and what to do. fieldmq never moves or recreates such a file on its
//!    own: the operator moves it aside (`mv outbox.db outbox.db.corrupt`) to start with an
//!    empty queue.
//! 7. **One process per file.** The connection uses `locking_mode = EXCLUSIVE`: a second
//!    gateway on the same data directory fails at open instead of sending the same rows.

pub mod backup;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::config::QueueConfig;
use crate::model::{MessageProperties, QoS};

/// Requests waiting for the writer thread. Callers wait when it is full (backpressure:
/// nothing that must be stored is dropped here).
const REQUEST_QUEUE: usize = 1024;

/// Errors of the outbox. Open errors name the file and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "outbox database {path} is not a valid SQLite database or is damaged ({source}); \
         fieldmq will not start this uplink with an empty queue on its own: move the file \
         aside (for example `mv {path} {path}.corrupt`, together with any -wal file) to \
         start with an empty queue, or restore it from a backup",
        path = path.display()
    )]
    Corrupt {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "outbox database {path} cannot be created or written ({source}): check that \
         {dir} exists, is a directory, is writable by the fieldmq user and that the disk \
         is not full or mounted read-only",
        path = path.display(),
        dir = path.parent().map(|d| d.display().to_string()).unwrap_or_default()
    )]
    Unwritable {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "outbox database {path} is locked by another process ({source}): is a second \
         fieldmq running with the same data_dir?",
        path = path.display()
    )]
    Locked {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create the directory for outbox {path}: {source}", path = path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox database {path}: {source}", path = path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("outbox {path} is closed (its thread stopped)", path = path.display())]
    Closed { path: PathBuf },
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error(
        "cannot read or write the ack mark file {path} ({source}): check that its directory \
         is writable by the fieldmq user",
        path = path.display()
    )]
    MarkFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    fn classify(path: &Path, source: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode;
        let path = path.to_path_buf();
        match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                StoreError::Corrupt { path, source }
            }
            Some(
                ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied
                | ErrorCode::DiskFull,
            ) => StoreError::Unwritable { path, source },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                StoreError::Locked { path, source }
            }
            _ => StoreError::Sqlite { path, source },
        }
    }
}

/// One message to store.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// The remote topic (already remapped).
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<Arc<MessageProperties>>,
}

impl OutboxRecord {
    /// What the record counts against `max_bytes`.
    pub fn size(&self) -> u64 {
        let props = self
            .properties
            .as_deref()
            .map(writer::encode_properties)
            .map_or(0, |p| p.len());
        (self.topic.len() + self.payload.len() + props) as u64
    }
}

/// A stored message with its position in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub seq: u64,
    pub record: OutboxRecord,
    /// When it was appended (wall clock).
    pub enqueued_at: SystemTime,
}

/// What happened to one [`Outbox::append`] call's records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendReport {
    /// Records now stored (committed).
    pub accepted: usize,
    /// Records of this call refused by `drop_new` or because one alone exceeds `max_bytes`.
    pub dropped_new: usize,
    /// Older rows deleted to make room (`drop_oldest`).
    pub dropped_oldest: usize,
    /// The seq of the last stored record of this call.
    pub last_seq: Option<u64>,
}

/// Why rows left the queue without an acknowledgement. Each has its own persistent counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `drop_oldest` made room.
    Oldest,
    /// `drop_new` refused it, or it alone exceeds `max_bytes`.
    New,
    /// Older than `max_age`, or its MQTT 5 message expiry passed while queued.
    Expired,
    /// The cloud refused it (PUBACK with an error reason code) or it exceeds the cloud's
    /// maximum packet size: sending it again cannot succeed.
    Rejected,
}

/// Persistent drop counters (since the file was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub oldest: u64,
    pub new: u64,
    pub expired: u64,
    pub rejected: u64,
}

impl DropCounters {
    pub fn total(&self) -> u64 {
        self.oldest + self.new + self.expired + self.rejected
    }
}

/// A snapshot of the queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    /// Rows waiting (including rows in flight).
    pub depth: u64,
    /// Their size as counted against `max_bytes`.
    pub bytes: u64,
    /// When the oldest row was appended.
    pub oldest_enqueued: Option<SystemTime>,
    pub dropped: DropCounters,
    /// Rows deleted after an acknowledgement (since the file was created).
    pub acked: u64,
}

impl OutboxStats {
    /// Age of the oldest row (backlog age); zero when empty.
    pub fn oldest_age(&self, now: SystemTime) -> Duration {
        self.oldest_enqueued
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default()
    }
}

/// The ack mark file of an outbox: `<database>.ackmark`.
pub fn ack_mark_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_os_string();
    name.push(".ackmark");
    PathBuf::from(name)
}

/// The highest seq up to which every row is acknowledged (see invariant 4), in a small file
/// next to the database. 24 bytes: the database's random instance id (so that a mark never
/// applies to another database file), the seq, and a check word.
#[derive(Debug, Clone)]
pub struct AckMark {
    file: Arc<std::fs::File>,
    path: Arc<PathBuf>,
    instance: u64,
    initial: u64,
}

const MARK_CHECK: u64 = 0x6669_656c_646d_7121;

impl AckMark {
    /// The mark found at open (rows up to it were deleted then).
    pub fn initial(&self) -> u64 {
        self.initial
    }

    /// Record that every row up to `seq` is acknowledged. Written through to the page cache
    /// (survives a crash of the process), not fsynced.
    pub async fn write(&self, seq: u64) -> Result<(), StoreError> {
        let file = self.file.clone();
        let bytes = encode_mark(self.instance, seq);
        let result = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&bytes, 0)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        result.map_err(|source| StoreError::MarkFile {
            path: self.path.to_path_buf(),
            source,
        })
    }
}

fn encode_mark(instance: u64, seq: u64) -> [u8; 24] {
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&instance.to_le_bytes());
    bytes[8..16].copy_from_slice(&seq.to_le_bytes());
    bytes[16..].copy_from_slice(&(instance ^ seq ^ MARK_CHECK).to_le_bytes());
    bytes
}

/// The seq in a mark file written for database `instance`; `None` when the file is empty,
/// damaged or belongs to another database.
fn decode_mark(bytes: &[u8], instance: u64) -> Option<u64> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?))
    };
    let (owner, seq, check) = (word(0)?, word(8)?, word(16)?);
    (owner == instance && check == owner ^ seq ^ MARK_CHECK).then_some(seq)
}

/// Handle to the outbox thread. Cheap to clone; the thread stops when the last handle is
/// dropped or [`Outbox::close`] is called.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<writer::Request>,
    path: Arc<PathBuf>,
    mark: AckMark,
}

impl Outbox {
    /// Open (or create) the outbox at `path` and start its thread. Fails with a clear
    /// [`StoreError`] when the file is damaged, not a database, unwritable or locked.
    pub async fn open(path: &Path, bounds: QueueConfig) -> Result<Outbox, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
        }
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_path = path.to_path_buf();
        crate::essential::thread("fieldmq-outbox", move || {
            writer::run(thread_path, bounds, rx, ready_tx)
        })
        .map_err(|source| StoreError::Directory {
            path: path.to_path_buf(),
            source,
        })?;
        let opened = ready_rx.await.map_err(|_| StoreError::Closed {
            path: path.to_path_buf(),
        })??;
        Ok(Outbox {
            tx,
            path: Arc::new(path.to_path_buf()),
            mark: AckMark {
                file: Arc::new(opened.mark_file),
                path: Arc::new(ack_mark_path(path)),
                instance: opened.instance,
                initial: opened.mark,
            },
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ack mark of this outbox (for the sender).
    pub fn ack_mark(&self) -> AckMark {
        self.mark.clone()
    }

    /// Store `records` in one transaction (together with whatever else is waiting). Returns
    /// after the commit; only then do the records count as accepted.
    pub async fn append(&self, records: Vec<OutboxRecord>) -> Result<AppendReport, StoreError> {
        self.call(|reply| writer::Request::Append { records, reply })
            .await
    }

    /// Up to `limit` rows with `seq > after`, in `seq` order.
    pub async fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.call(|reply| writer::Request::ReadAfter {
            after,
            limit,
            reply,
        })
        .await
    }

    /// Delete rows the cloud acknowledged. Returns after the commit. Unknown seqs (already
    /// dropped by a bound) are ignored.
    pub async fn delete(&self, seqs: Vec<u64>) -> Result<(), StoreError> {
        self.call(|reply| writer::Request::Delete {
            seqs,
            reason: None,
            reply,
        })
        .await
    }

    /// Delete rows that will never be acknowledged, counting them under `reason`.
    pub async fn discard(&self, seqs: Vec<u64>, reason: DropReason) -> Result<(), StoreError> {
        self.call(|reply| writer::Request::Delete {
            seqs,
            reason: Some(reason),
            reply,
        })
        .await
    }

    /// Depth, bytes, backlog age and counters. Also applies `max_age` (at most once a second).
    pub async fn stats(&self) -> Result<OutboxStats, StoreError> {
        self.call(|reply| writer::Request::Stats { reply }).await
    }

    /// Copy the outbox to `dest` (SQLite's online backup) after everything sent before.
    pub async fn backup(&self, dest: PathBuf) -> Result<(), StoreError> {
        self.call(|reply| writer::Request::Backup { dest, reply })
            .await
    }

    /// Checkpoint the WAL and stop the thread. Other clones of this handle get
    /// [`StoreError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), StoreError> {
        self.call(|reply| writer::Request::Close { reply }).await
    }

    async fn call<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> writer::Request,
    ) -> Result<T, StoreError> {
        let (reply, response) = oneshot::channel();
        let closed = || StoreError::Closed {
            path: self.path.to_path_buf(),
        };
        self.tx.send(request(reply)).await.map_err(|_| closed())?;
        response.await.map_err(|_| closed())?
    }
}

#[cfg(test)]
mod tests;
