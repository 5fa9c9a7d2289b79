//! The broker store's tables, opening its file, and the migrations from older schema
//! versions.
//!
//! Versions: 1 had one row per queued message; 2 added each session's acknowledged
//! watermark (`sessions.acked_seq`); 3 keyed the queue by client; 4 keeps queued messages in
//! runs (see [`super::run`]) and what was in flight in `queue_marks`.

use std::path::Path;
use std::sync::Arc;

use rusqlite::Connection;

use super::load::shared;
use super::run::{PendingRuns, Record};
use super::writer::mark;
use super::PersistError;
use crate::store::config::Durability;
use crate::store::{self, Settings, SyncLevel, Synchronous};

/// Schema version in `PRAGMA user_version`.
pub(super) const SCHEMA_VERSION: i64 = 4;

/// Prepared statements the store keeps (it uses about twenty).
const STATEMENT_CACHE: usize = 48;

/// Open the database, check it, and bring its schema to [`SCHEMA_VERSION`].
pub(super) fn open(
    path: &Path,
    durability: Durability,
) -> Result<(Connection, SyncLevel), PersistError> {
    let err = |e| PersistError::classify(path, e);
    store::create_parent_dir(path).map_err(|e| PersistError::Unwritable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let settings = Settings {
        what: "broker store",
        statement_cache: STATEMENT_CACHE,
        // A bound seq changes on nearly every step of the queue.
        stable_plans: true,
        incremental_vacuum: true,
        synchronous: synchronous_for(durability),
    };
    let (conn, sync) = store::open(path, &settings).map_err(err)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(err)?;
    if check != "ok" {
        return Err(PersistError::Corrupt {
            path: path.to_path_buf(),
            reason: check,
        });
    }
    let version = store::user_version(&conn).map_err(err)?;
    if let Some(reason) = store::newer_schema(version, SCHEMA_VERSION) {
        return Err(PersistError::Other {
            path: path.to_path_buf(),
            reason,
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
        return Ok((conn, sync));
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
    Ok((conn, sync))
}

/// The `synchronous` level of commits that acknowledge something.
pub(super) fn synchronous_for(durability: Durability) -> Synchronous {
    match durability {
        Durability::Sync => Synchronous::Full,
        _ => Synchronous::Normal,
    }
}

/// Seqs are unique across clients (one counter), so a run's first seq is its row id: runs
/// are appended in seq order, the cheapest insert a b-tree has. The index finds a client's.
/// `queue_marks.state`: an in-flight state (`writer::state_code`), or [`MARK_REMOVED`].
pub(super) const QUEUE_TABLES: &str = "CREATE TABLE IF NOT EXISTS queue (
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
pub(super) const MARK_REMOVED: i64 = 0;

/// The columns of the one-row-per-message queue of schema versions 1 to 3.
const QUEUE_COLUMNS: &str =
    "seq, topic, payload, qos, retain, subscription_ids, properties, received_ms, pkid, state";

/// Version 4 keeps queued messages in runs (see [`run`]) and what was in flight in
/// `queue_marks`; versions 1 to 3 have one row per message. Moved over in one
/// transaction, a client at a time, in seq order.
fn migrate_to_runs(conn: &Connection) -> rusqlite::Result<()> {
    store::in_transaction(conn, || {
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

/// Give free pages back to the file system: at most `pages`, or all.
/// SQLite frees one page per step of this pragma (a row each), so it is stepped to the end.
pub(super) fn incremental_vacuum(conn: &Connection, pages: Option<u32>) -> rusqlite::Result<()> {
    let sql = match pages {
        Some(pages) => format!("PRAGMA incremental_vacuum({pages})"),
        None => "PRAGMA incremental_vacuum".to_string(),
    };
    let mut vacuum = conn.prepare_cached(&sql)?;
    let mut rows = vacuum.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}
