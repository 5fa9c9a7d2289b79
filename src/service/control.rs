//! The gateway's local control socket, `<data_dir>/control.sock` (a Unix socket, mode
//! 0600: only the gateway's user and root may use it). It serves `fieldmq backup`: the
//! stores hold their files with `locking_mode = EXCLUSIVE`, so while the gateway runs no
//! other process can read them, and the copy must be made by the threads that own them.
//!
//! It also serves `fieldmq reload` (the gateway applies its configuration file again) and
//! `fieldmq status`, which needs no HTTP listener.
//!
//! Protocol: one request line.
//! - `backup <absolute directory>`: answered with a line `copied <file>` per store copied,
//!   then `ok`, or `error <reason>` and nothing more.
//! - `reload`: answered with a line `change <text>` per change and `applied`, or a line
//!   `error <text>` per error and `refused`, or `stopping` (or `busy`) when the gateway
//!   cannot reload now.
//! - `status`: answered with one line of JSON (the [`StatusSnapshot`]), then the socket
//!   closes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::config::Config;
use crate::broker::StoreBackup;
use crate::reload::{ReloadError, Reloader};
use crate::status::StatusBoard;
use crate::status::StatusSnapshot;
use crate::store::config::Durability;
use crate::store::Outbox;

/// The socket's file name in the data directory.
pub const SOCKET_NAME: &str = "control.sock";
/// The longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot create the backup directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the running gateway's control socket {path} failed: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the gateway refused the backup: {0}")]
    Refused(String),
    #[error(
        "{path} is locked by a running gateway whose control socket is not reachable ({reason}); \
         run the backup as the gateway's user (or root) on the same data directory",
        path = path.display()
    )]
    Locked { path: PathBuf, reason: String },
    #[error(transparent)]
    Copy(#[from] crate::store::backup::BackupError),
}

/// The control socket of a gateway with data in `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// What a backup copies: the broker store and each uplink's outbox, under their own file
/// names. A reload that adds, restarts or removes uplinks replaces the outboxes.
pub(crate) struct Stores {
    broker: Option<StoreBackup>,
    outboxes: std::sync::Mutex<Vec<Outbox>>,
}

impl Stores {
    pub(crate) fn new(broker: Option<StoreBackup>, outboxes: Vec<Outbox>) -> Stores {
        Stores {
            broker,
            outboxes: std::sync::Mutex::new(outboxes),
        }
    }

    /// The running uplinks' outboxes after a reload.
    pub(crate) fn replace_outboxes(&self, outboxes: Vec<Outbox>) {
        *self
            .outboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = outboxes;
    }

    async fn copy_to(&self, dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
        std::fs::create_dir_all(dir).map_err(|source| BackupError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut copied = Vec::new();
        if let Some(broker) = &self.broker {
            let dest = dir.join(file_name(broker.path()));
            broker.copy_to(dest.clone()).await?;
            copied.push(dest);
        }
        let outboxes = self
            .outboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for outbox in &outboxes {
            let dest = dir.join(file_name(outbox.path()));
            outbox
                .backup(dest.clone())
                .await
                .map_err(|e| BackupError::Refused(e.to_string()))?;
            copied.push(dest);
        }
        Ok(copied)
    }
}

fn file_name(path: &Path) -> PathBuf {
    PathBuf::from(path.file_name().unwrap_or(path.as_os_str()))
}

/// Bind the control socket (replacing a stale one; a second gateway on the same data
/// directory cannot get this far: the stores' exclusive locks stop it first).
pub(crate) fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answer requests until `shutdown`, then remove the socket file.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    stores: Arc<Stores>,
    reloader: Reloader,
    board: StatusBoard,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // One request at a time: backups and reloads are rare, and each store does one
        // backup at a time and the service one reload at a time anyway.
        if let Err(error) = answer(stream, &stores, &reloader, &board).await {
            tracing::warn!(%error, "control request failed");
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(
    stream: UnixStream,
    stores: &Stores,
    reloader: &Reloader,
    board: &StatusBoard,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(4096));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other("no request in time"))??;
    if line.trim_end() == "reload" {
        let reply = reload_reply(reloader).await;
        write.write_all(reply.as_bytes()).await?;
        return write.shutdown().await;
    }
    if line.trim_end() == "status" {
        let mut reply = serde_json::to_string(&board.snapshot())
            .unwrap_or_else(|e| format!("error cannot encode the status: {e}"));
        reply.push('\n');
        write.write_all(reply.as_bytes()).await?;
        return write.shutdown().await;
    }
    let reply = match line.trim_end().strip_prefix("backup ") {
        Some(dir) if Path::new(dir).is_absolute() => {
            let dir = PathBuf::from(dir);
            tracing::info!(dir = %dir.display(), "backup requested");
            match stores.copy_to(&dir).await {
                Ok(copied) => {
                    let mut reply = String::new();
                    for file in &copied {
                        reply.push_str(&format!("copied {}\n", file.display()));
                    }
                    tracing::info!(dir = %dir.display(), files = copied.len(), "backup done");
                    reply + "ok\n"
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "backup failed");
                    format!("error {error}\n")
                }
            }
        }
        _ => "error expected `backup <absolute directory>`, `reload` or `status`\n".to_owned(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

/// The answer to `reload`: one line per change or error (newlines in them become spaces,
/// so each stays one line), then the outcome.
async fn reload_reply(reloader: &Reloader) -> String {
    let one_line = |text: &str| text.replace(['\n', '\r'], " ");
    match reloader.reload().await {
        Ok(report) => {
            let mut reply = String::new();
            for change in &report.changes {
                reply.push_str(&format!("change {}\n", one_line(change)));
            }
            for error in &report.errors {
                reply.push_str(&format!("error {}\n", one_line(error)));
            }
            reply
                + if report.applied {
                    "applied\n"
                } else {
                    "refused\n"
                }
        }
        Err(ReloadError::Stopping) => "stopping\n".to_owned(),
        Err(ReloadError::Busy) => "busy\n".to_owned(),
    }
}

/// How `fieldmq reload` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The gateway applied the file: one line per change.
    Applied(Vec<String>),
    /// The gateway changed nothing: the errors in the file or the keys that cannot change.
    Refused(Vec<String>),
    /// The gateway is stopping or already busy with too many reloads.
    NotNow(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadAskError {
    #[error(
        "no gateway answers on {path} ({source}); is it running with this data directory?",
        path = path.display()
    )]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the gateway's control socket {path} failed: {source}", path = path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The data directory named by the configuration file at `path`, even when the file has
/// errors a reload would refuse (the gateway reports those): only a file that is not TOML
/// at all, or cannot be read, gives `None`.
pub fn data_dir_of(path: &Path) -> Option<PathBuf> {
    if let Ok(config) = super::config::load(path) {
        return Some(config.gateway.data_dir);
    }
    let text = std::fs::read_to_string(path).ok()?;
    // The document the configuration itself is parsed into (no second TOML reader).
    let (_, root) = crate::config::parse_toml(&text, path).ok()?;
    let gateway = match root.get_ref() {
        toml::de::DeValue::Table(table) => table.get("gateway").map(|g| g.get_ref()),
        _ => return None,
    };
    let data_dir = match gateway {
        Some(toml::de::DeValue::Table(gateway)) => gateway.get("data_dir").map(|d| d.get_ref()),
        _ => None,
    };
    let dir = match data_dir {
        Some(toml::de::DeValue::String(dir)) => PathBuf::from(dir.as_ref()),
        Some(_) => return None,
        None => PathBuf::from(crate::config::DEFAULT_DATA_DIR),
    };
    Some(match path.parent() {
        Some(base) if dir.is_relative() => base.join(dir),
        _ => dir,
    })
}

/// Ask the gateway running on `data_dir` to reload its configuration file (`fieldmq
/// reload`), and wait for its report.
pub async fn reload(data_dir: &Path) -> Result<ReloadOutcome, ReloadAskError> {
    let path = socket_path(data_dir);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|source| ReloadAskError::NotRunning {
            path: path.clone(),
            source,
        })?;
    let io = |source| ReloadAskError::Socket {
        path: path.clone(),
        source,
    };
    let (read, mut write) = stream.into_split();
    write.write_all(b"reload\n").await.map_err(io)?;
    let mut lines = BufReader::new(read).lines();
    let (mut changes, mut errors) = (Vec::new(), Vec::new());
    while let Some(line) = lines.next_line().await.map_err(io)? {
        if let Some(change) = line.strip_prefix("change ") {
            changes.push(change.to_owned());
        } else if let Some(error) = line.strip_prefix("error ") {
            errors.push(error.to_owned());
        } else if line == "applied" {
            return Ok(ReloadOutcome::Applied(changes));
        } else if line == "refused" {
            return Ok(ReloadOutcome::Refused(errors));
        } else if line == "stopping" {
            return Ok(ReloadOutcome::NotNow("the gateway is stopping".into()));
        } else if line == "busy" {
            return Ok(ReloadOutcome::NotNow(
                "too many reloads are waiting; try again".into(),
            ));
        }
    }
    Err(io(std::io::Error::other(
        "the gateway closed the socket without an answer",
    )))
}

/// Back up the stores of the gateway configured by `config` into the directory `dir`:
/// through the running gateway's control socket when it runs, else by opening the files
/// directly. Returns the files written.
pub async fn backup(config: &Config, dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let dir = std::path::absolute(dir).map_err(|source| BackupError::Directory {
        path: dir.to_path_buf(),
        source,
    })?;
    let socket = socket_path(&config.gateway.data_dir);
    match UnixStream::connect(&socket).await {
        Ok(stream) => ask(stream, &socket, &dir).await,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            copy_stopped(config, &dir)
        }
        Err(source) => Err(BackupError::Socket {
            path: socket,
            source,
        }),
    }
}

async fn ask(stream: UnixStream, socket: &Path, dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let io = |source| BackupError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("backup {}\n", dir.display()).as_bytes())
        .await
        .map_err(io)?;
    let mut lines = BufReader::new(read).lines();
    let mut copied = Vec::new();
    while let Some(line) = lines.next_line().await.map_err(io)? {
        if let Some(file) = line.strip_prefix("copied ") {
            copied.push(PathBuf::from(file));
        } else if line == "ok" {
            return Ok(copied);
        } else if let Some(reason) = line.strip_prefix("error ") {
            return Err(BackupError::Refused(reason.to_owned()));
        }
    }
    Err(io(std::io::Error::other(
        "the gateway closed the socket without an answer",
    )))
}

/// No gateway runs on this data directory: copy the files directly.
fn copy_stopped(config: &Config, dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut sources = Vec::new();
    if config.broker.durability != Durability::Memory {
        sources.push(config.broker.store_path.clone());
    }
    for uplink in &config.uplinks {
        sources.push(crate::uplink::outbox_path(
            &config.gateway.data_dir,
            &uplink.name,
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| BackupError::Directory {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut copied = Vec::new();
    for source in sources.into_iter().filter(|p| p.exists()) {
        let dest = dir.join(file_name(&source));
        crate::store::backup::copy_file(&source, &dest).map_err(|error| match error {
            crate::store::backup::BackupError::Sqlite {
                source: rusqlite::Error::SqliteFailure(code, _),
                ..
            } if code.code == rusqlite::ErrorCode::DatabaseBusy => BackupError::Locked {
                path: source.clone(),
                reason: "database is locked".into(),
            },
            other => BackupError::Copy(other),
        })?;
        copied.push(dest);
    }
    Ok(copied)
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no gateway is running on the data directory {data_dir} (no control socket at {socket}); \
         start it with `fieldmq run`, or pass the configuration file it runs with (-c FILE)",
        data_dir = data_dir.display(),
        socket = socket.display()
    )]
    NotRunning { data_dir: PathBuf, socket: PathBuf },
    #[error("the running gateway's control socket {path} failed: {source}", path = path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the gateway did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the gateway refused the status request: {0}")]
    Refused(String),
    #[error("the gateway's status answer is not valid JSON: {0}")]
    Invalid(String),
}

/// The longest `fieldmq status` waits for the gateway's answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest status answer read (a gateway with thousands of points and clients stays
/// far below it).
const STATUS_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Ask the gateway running on `data_dir` for its status: the JSON text, as it sent it.
pub async fn status_json(data_dir: &Path) -> Result<String, StatusError> {
    let socket = socket_path(data_dir);
    let io = |source| StatusError::Socket {
        path: socket.clone(),
        source,
    };
    let stream = match UnixStream::connect(&socket).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(StatusError::NotRunning {
                data_dir: data_dir.to_path_buf(),
                socket,
            })
        }
        Err(source) => return Err(io(source)),
    };
    let (read, mut write) = stream.into_split();
    let exchange = async {
        write.write_all(b"status\n").await.map_err(io)?;
        let mut answer = String::new();
        read.take(STATUS_MAX_BYTES)
            .read_to_string(&mut answer)
            .await
            .map_err(io)?;
        Ok::<_, StatusError>(answer)
    };
    let answer = tokio::time::timeout(STATUS_TIMEOUT, exchange)
        .await
        .map_err(|_| StatusError::Timeout(STATUS_TIMEOUT))??;
    let answer = answer.trim_end();
    if let Some(reason) = answer.strip_prefix("error ") {
        return Err(StatusError::Refused(reason.to_owned()));
    }
    Ok(answer.to_owned())
}

/// [`status_json`], parsed.
pub async fn status(data_dir: &Path) -> Result<(String, StatusSnapshot), StatusError> {
    let json = status_json(data_dir).await?;
    let snapshot = serde_json::from_str(&json).map_err(|e| StatusError::Invalid(e.to_string()))?;
    Ok((json, snapshot))
}
