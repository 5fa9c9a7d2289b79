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
//!
//! Files: `ops` (what the broker sends, who waits), `schema` (tables, open, migrations),
//! `load` (the start, pages of a spilled queue, quarantine), `writer` (the thread, group
//! commit, retry on a full disk, purge and vacuum), `run` (the encoding of queued messages).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::backup::BackupError;
use super::commit_times::{CommitTimes, CommitTimesSnapshot};
use super::Failure;
use crate::model::{Message, QoS};
use crate::store::config::Durability;

mod load;
mod ops;
mod run;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

pub(crate) use ops::{Op, PageReply, Waiter};

/// Ops waiting before a writer blocks.
const CHANNEL: usize = 8192;

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
    #[error(
        "broker database {path} is locked by another process ({reason}): is a second \
         fieldmq running with the same data_dir?",
        path = path.display()
    )]
    Locked { path: PathBuf, reason: String },
    #[error("broker database {path}: {reason}", path = path.display())]
    Other { path: PathBuf, reason: String },
}

impl PersistError {
    fn classify(path: &Path, error: rusqlite::Error) -> PersistError {
        let path = path.to_path_buf();
        let reason = error.to_string();
        match Failure::of(&error) {
            Failure::Corrupt => PersistError::Corrupt { path, reason },
            Failure::Unwritable => PersistError::Unwritable { path, reason },
            Failure::Locked => PersistError::Locked { path, reason },
            Failure::Other => PersistError::Other { path, reason },
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

/// One message queued for one client under its row `seq`, as the store writes and loads
/// it: the message with the QoS and flags it is delivered with.
#[derive(Debug, Clone)]
pub(crate) struct QueuedDelivery {
    pub(crate) message: Message,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) subscription_ids: Vec<usize>,
    pub(crate) seq: u64,
}

/// What an in-flight message waits for; kept with its row so that a restart sends it
/// again with the same packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflightState {
    /// QoS 1 sent, waiting for PUBACK.
    Qos1Sent,
    /// QoS 2 sent, waiting for PUBREC.
    Qos2Sent,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// One queued message of one session, as loaded at start or in a page.
#[derive(Debug, Clone)]
pub(crate) struct StoredDelivery {
    pub(crate) delivery: QueuedDelivery,
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

/// The async side: where ops go.
#[derive(Debug, Clone)]
pub(crate) struct Persist {
    tx: mpsc::Sender<Op>,
    size: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    /// How long the writer's commits take.
    commit_times: Arc<CommitTimes>,
    /// Becomes true when the writer thread has checkpointed and closed the file.
    stopped: tokio::sync::watch::Receiver<bool>,
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
        let (mut conn, sync) = schema::open(path, durability)?;
        let (snapshot, garbage) =
            load::load(&mut conn, memory_window).map_err(|e| PersistError::classify(path, e))?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let size = Arc::new(AtomicU64::new(writer::file_size(path)));
        let failures = Arc::new(AtomicU64::new(0));
        let commit_times = Arc::new(CommitTimes::default());
        let window = match durability {
            Durability::Batched => commit_window,
            _ => Duration::ZERO,
        };
        let writer = writer::Writer::new(
            conn,
            sync,
            path,
            window,
            writer::Shared {
                size: size.clone(),
                failures: failures.clone(),
                commit_times: commit_times.clone(),
            },
            garbage,
        );
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
                commit_times,
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

    /// How long the writer's commits have taken so far.
    pub(crate) fn commit_times(&self) -> CommitTimesSnapshot {
        self.commit_times.snapshot()
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
    pub(crate) async fn backup(&self, dest: PathBuf) -> Result<(), BackupError> {
        let stopped = |dest| BackupError::Io {
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

/// The store's row decoding for the fuzz targets: the records of a run's bytes with their
/// properties JSON, re-encoded and decoded again (which must give the same records).
/// Returns how many records decoded.
#[cfg(feature = "fuzzing")]
pub fn fuzz_store_row(bytes: &[u8]) -> usize {
    let decoded: Vec<run::Record<'_>> = run::records(bytes).map_while(Result::ok).collect();
    let mut again = run::Run::default();
    for record in &decoded {
        let _ = load::decode_properties(record.properties);
        again.push(record).expect("a decoded record encodes");
    }
    let back: Vec<run::Record<'_>> = run::records(&again.bytes)
        .collect::<Result<_, _>>()
        .expect("re-encoded records decode");
    assert_eq!(back, decoded, "records change through a round trip");
    decoded.len()
}
