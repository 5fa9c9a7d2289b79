//! Copies of SQLite files made with SQLite's online backup API, by the connection that owns
//! the file (the gateway's stores use `locking_mode = EXCLUSIVE`, so no other connection can
//! read them while the gateway runs).

use std::path::{Path, PathBuf};

use rusqlite::backup::Backup;
use rusqlite::Connection;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot back up to {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot back up to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Copy the main database of `source` to `dest`, whole and consistent as of one moment.
/// Written to `dest` + `.partial` first and renamed when complete, so `dest` is never a
/// half-written copy; the copy is a standalone file (no `-wal` of its own to keep).
pub fn copy_database(source: &Connection, dest: &Path) -> Result<(), BackupError> {
    let partial = PathBuf::from(format!("{}.partial", dest.display()));
    let sqlite = |source| BackupError::Sqlite {
        path: dest.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(&partial);
    let mut copy = Connection::open(&partial).map_err(sqlite)?;
    {
        let backup = Backup::new(source, &mut copy).map_err(sqlite)?;
        // All pages in one step: the owning thread does nothing else meanwhile, so the
        // copy is of one moment (no restart on concurrent writes).
        backup.step(-1).map_err(sqlite)?;
    }
    // The copy takes the source's journal mode (WAL): fold it into the file and close.
    copy.pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .map_err(sqlite)?;
    copy.close().map_err(|(_, e)| sqlite(e))?;
    let _ = std::fs::remove_file(format!("{}-wal", partial.display()));
    let _ = std::fs::remove_file(format!("{}-shm", partial.display()));
    let io = |source| BackupError::Io {
        path: dest.to_path_buf(),
        source,
    };
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&partial, dest).map_err(io)?;
    Ok(())
}

/// Copy the database at `path` (not in use by a running gateway) to `dest`.
pub fn copy_file(path: &Path, dest: &Path) -> Result<(), BackupError> {
    let source = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| BackupError::Sqlite {
        path: path.to_path_buf(),
        source,
    })?;
    // Fails with "database is locked" while a gateway holds the file.
    source
        .pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(|source| BackupError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
    copy_database(&source, dest)
}
