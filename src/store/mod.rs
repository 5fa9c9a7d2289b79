//! Every SQLite file of the gateway, and what they share.
//!
//! - `sessions`: the broker's durable sessions, subscriptions, queued and in-flight
//!   messages and retained messages (one file, `broker.db`).
//! - [`outbox`]: one uplink's queue of messages waiting for the cloud's acknowledgement
//!   (one file per uplink).
//! - `properties`: the one stored form of MQTT 5 message properties, used by both.
//! - [`backup`]: online copies of a store's file, made by the thread that owns it.
//!
//! This module holds what both stores do the same way: opening a file with its pragmas
//! (`open`), schema versioning in `PRAGMA user_version`, reading an SQLite error as what an
//! operator must do about it (`Failure`), switching `synchronous` per commit (`SyncLevel`),
//! one write transaction per batch (`in_transaction`), gathering the requests that wait
//! into one batch (`drain_into`), and the checkpoint at close.
//!
//! Each store owns its connection on one OS thread of its own (SQLite never blocks the
//! runtime); async code talks to that thread through a bounded channel. Only this module
//! and its children use SQLite: the broker and the uplinks see the stores' APIs.

mod ack;
pub mod backup;
pub mod commit_times;
pub mod config;
pub mod outbox;
pub(crate) mod properties;
pub(crate) mod sessions;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::mpsc;

pub use ack::AckShare;
pub use outbox::{
    ack_mark_path, AckMark, AppendReport, DropCounters, DropReason, Outbox, OutboxRecord,
    OutboxStats, StoreError, StoredMessage,
};

/// How long a statement waits for a lock held by another connection before it fails:
/// another process holding the file is an error at open, not a wait.
const BUSY_TIMEOUT: Duration = Duration::from_millis(200);

/// `PRAGMA auto_vacuum` value of INCREMENTAL.
const AUTO_VACUUM_INCREMENTAL: i64 = 2;

/// What an SQLite error means for the operator of a store's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Not a database, or damaged: the file must be moved aside or restored.
    Corrupt,
    /// The file or its directory cannot be created or written (permissions, a full or
    /// read-only disk, an I/O error).
    Unwritable,
    /// Another process holds the file (a second gateway on the same data directory).
    Locked,
    Other,
}

impl Failure {
    fn of(error: &rusqlite::Error) -> Failure {
        match error.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Failure::Corrupt,
            Some(
                ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure,
            ) => Failure::Unwritable,
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Failure::Locked,
            _ => Failure::Other,
        }
    }
}

/// Errors that the same writes would not meet again once the disk has room (or the lock
/// is free): worth keeping the writes for another try.
fn is_transient(error: &rusqlite::Error) -> bool {
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

/// `PRAGMA synchronous`: whether a commit waits for the WAL to be on disk (fsync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Synchronous {
    /// Survives a power cut.
    Full,
    /// Survives a crash or `kill -9`; a power cut may lose the last commits.
    Normal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "PRAGMA synchronous = FULL",
            Synchronous::Normal => "PRAGMA synchronous = NORMAL",
        }
    }
}

/// The `synchronous` level in effect on a connection, changed per commit: commits that
/// somebody waits for are synced, others ride on the next synced one.
#[derive(Debug)]
struct SyncLevel {
    current: Synchronous,
}

impl SyncLevel {
    /// Switch to `level` if it is not in effect. On an error the level in effect is kept.
    fn set(&mut self, conn: &Connection, level: Synchronous) -> rusqlite::Result<()> {
        if self.current != level {
            // Kept prepared: the level may change with nearly every commit.
            conn.prepare_cached(level.pragma())?.execute([])?;
            self.current = level;
        }
        Ok(())
    }
}

/// What a store asks of its connection beyond what every store gets (exclusive locking,
/// WAL, a short busy timeout).
#[derive(Debug, Clone, Copy)]
struct Settings {
    /// The label of the file in log lines (`outbox`, `database`).
    what: &'static str,
    statement_cache: usize,
    /// Keep statements planned once (SQLite would otherwise plan a statement again whenever
    /// a bound value changes, with its STAT4 option).
    stable_plans: bool,
    /// Free pages go back to the file system with `PRAGMA incremental_vacuum`.
    incremental_vacuum: bool,
    synchronous: Synchronous,
}

/// Open (or create) the SQLite file at `path` with the pragmas every store uses.
///
/// `locking_mode = EXCLUSIVE` is set before anything reads the file: one process per file
/// (a second gateway on the same data directory fails instead of sending the same rows),
/// and SQLite keeps the WAL index in memory instead of a `-shm` file, which could not be
/// created on a full disk (and the store could then not even be read).
fn open(path: &Path, settings: &Settings) -> rusqlite::Result<(Connection, SyncLevel)> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    if settings.stable_plans {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    }
    conn.set_prepared_statement_cache_capacity(settings.statement_cache);
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    if settings.incremental_vacuum {
        // Must precede table creation to take effect on a new file. Only set when it is
        // not already: setting it writes the header even when unchanged.
        let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
        if auto_vacuum != AUTO_VACUUM_INCREMENTAL {
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        }
    }
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(file = %path.display(), what = settings.what, mode, "could not switch to WAL mode");
    }
    conn.execute_batch(settings.synchronous.pragma())?;
    Ok((
        conn,
        SyncLevel {
            current: settings.synchronous,
        },
    ))
}

/// Create the directory `path` is to be created in, when it is missing.
fn create_parent_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir),
        None => Ok(()),
    }
}

/// The schema version the file was last written with (0 for a new file).
fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Why a file of schema version `found` cannot be used by code that knows `known`, if so.
fn newer_schema(found: i64, known: i64) -> Option<String> {
    (found > known).then(|| {
        format!("schema version {found} was written by a newer fieldmq (this one knows {known})")
    })
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

/// Move what waits in `rx` into `batch` (group commit), up to `max` in all.
fn drain_into<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
}

/// Copy the WAL into the database and empty it, then close: after a clean stop the file
/// alone holds everything (a copy of it, or a lost `-wal`, loses nothing).
fn checkpoint_and_close(conn: Connection, path: &Path, what: &str) {
    if let Err(error) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
        tracing::warn!(file = %path.display(), what, %error, "checkpoint at close failed");
    }
    if let Err((_, error)) = conn.close() {
        tracing::warn!(file = %path.display(), what, %error, "close failed");
    }
    tracing::debug!(file = %path.display(), what, "closed");
}

/// The wall clock in milliseconds since the epoch, as stored in the files.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
