//! `fieldmq-bench disk`: what one synced commit costs on the disk that holds `data_dir`.
//!
//! With `durability = "sync"` every PUBACK of a message queued for a persistent session waits
//! for the commit that holds it, fsync included. How long that fsync takes, and how much CPU
//! it burns, is a property of the disk (an SD card, a USB SSD, a VM's virtual disk), not of
//! the broker: this measures it without a broker, so an integrator can tell what `sync` will
//! cost on a box before choosing it over `batched`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection};

use crate::stats::Latencies;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DiskArgs {
    /// Directory on the disk to measure (the gateway's `data_dir`); a temporary file is
    /// created in it and removed afterwards.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Synced writes (and commits) per row.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Bytes written before each sync: 24 KiB is what a commit of about 30 queued
    /// 64-byte messages writes to the store's WAL (six 4 KiB pages).
    #[arg(long, default_value_t = 24 * 1024)]
    bytes: usize,
}

/// Bytes of one run row: about 30 queued 64-byte messages with their topics and headers.
const RUN_BYTES: usize = 2_800;
/// The file is overwritten in place in this many slots, as SQLite reuses its WAL.
const SLOTS: u64 = 40;
/// Largest `--bytes`: the file is `SLOTS` times that.
const MAX_BYTES: usize = 16 * 1024 * 1024;

struct Row {
    what: &'static str,
    wall: Latencies,
    cpu_us_per_op: f64,
}

pub(crate) fn run(args: &DiskArgs) -> Result<()> {
    if args.count == 0 || args.bytes == 0 {
        bail!("--count and --bytes must be at least 1");
    }
    if args.bytes > MAX_BYTES {
        bail!("--bytes must be at most {MAX_BYTES} (the file holds {SLOTS} slots of it)");
    }
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("--dir {}: no such directory", args.dir.display()))?;
    let scratch = Scratch::new(&dir)?;
    let mut rows = Vec::new();
    rows.push(synced_writes(&scratch.file("fsync.bin"), args, false)?);
    rows.push(synced_writes(&scratch.file("fsync.bin"), args, true)?);
    for (what, synchronous) in [
        ("SQLite WAL commit, synchronous = FULL (`sync`)", "FULL"),
        (
            "SQLite WAL commit, synchronous = NORMAL (`batched`)",
            "NORMAL",
        ),
    ] {
        rows.push(sqlite_commits(
            &scratch.file(&format!("store-{synchronous}.db")),
            args.count,
            what,
            synchronous,
        )?);
    }
    println!("{}", render(&dir, args, &rows));
    Ok(())
}

/// `count` times: overwrite `bytes` in place, then fdatasync (or fsync).
fn synced_writes(path: &Path, args: &DiskArgs, full_fsync: bool) -> Result<Row> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block: Vec<u8> = (0..args.bytes).map(|i| (i % 251) as u8).collect();
    // Allocate the slots first: SQLite overwrites its WAL, it does not grow it per commit.
    for slot in 0..SLOTS {
        file.write_all_at(&block, slot * args.bytes as u64)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    let mut wall = Latencies::new();
    let mut cpu = ThreadCpu::new();
    let mut cpu_total = Duration::ZERO;
    for i in 0..u64::from(args.count) {
        file.write_all_at(&block, (i % SLOTS) * args.bytes as u64)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let cpu_before = cpu.now();
        let start = Instant::now();
        let synced = if full_fsync {
            file.sync_all()
        } else {
            file.sync_data()
        };
        synced.with_context(|| format!("cannot sync {}", path.display()))?;
        wall.record(start.elapsed());
        cpu_total += cpu.now().saturating_sub(cpu_before);
    }
    Ok(Row {
        what: if full_fsync {
            "write + fsync"
        } else {
            "write + fdatasync"
        },
        wall,
        cpu_us_per_op: cpu_total.as_secs_f64() * 1e6 / f64::from(args.count),
    })
}

/// `count` transactions in the store's settings (WAL, exclusive locking), each inserting one
/// row the size of a run of queued messages.
fn sqlite_commits(path: &Path, count: u32, what: &'static str, synchronous: &str) -> Result<Row> {
    let context = || format!("SQLite on {}", path.display());
    let conn = Connection::open(path).with_context(context)?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .with_context(context)?;
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .with_context(context)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
        .with_context(context)?;
    conn.pragma_update(None, "synchronous", synchronous)
        .with_context(context)?;
    conn.execute_batch(
        "CREATE TABLE runs (first_seq INTEGER PRIMARY KEY, client_id TEXT NOT NULL,
                            messages BLOB NOT NULL);
         CREATE INDEX runs_by_client ON runs (client_id, first_seq);",
    )
    .with_context(context)?;
    let run: Vec<u8> = (0..RUN_BYTES).map(|i| (i % 253) as u8).collect();
    let mut wall = Latencies::new();
    let mut cpu = ThreadCpu::new();
    let cpu_before = cpu.now();
    for seq in 0..i64::from(count) {
        let start = Instant::now();
        conn.execute_batch("BEGIN").with_context(context)?;
        conn.prepare_cached(
            "INSERT INTO runs (first_seq, client_id, messages) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut insert| insert.execute(params![seq, "bench", run]))
        .with_context(context)?;
        conn.execute_batch("COMMIT").with_context(context)?;
        wall.record(start.elapsed());
    }
    let cpu_total = cpu.now().saturating_sub(cpu_before);
    Ok(Row {
        what,
        wall,
        cpu_us_per_op: cpu_total.as_secs_f64() * 1e6 / f64::from(count),
    })
}

fn render(dir: &Path, args: &DiskArgs, rows: &[Row]) -> String {
    let mut out = format!(
        "disk under {}: {} synced operations per row, {} bytes written before each sync\n\n",
        dir.display(),
        args.count,
        args.bytes
    );
    out.push_str("| operation | wall p50 | wall p90 | wall p99 | CPU per operation | at most per second (1 / p50) |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for row in rows {
        // Every row has `count` (at least 1) values.
        let wall = |p: f64| row.wall.percentile(p).unwrap_or(0);
        let p50 = wall(50.0);
        out.push_str(&format!(
            "| {} | {} µs | {} µs | {} µs | {:.1} µs | {:.0} |\n",
            row.what,
            p50,
            wall(90.0),
            wall(99.0),
            row.cpu_us_per_op,
            1e6 / p50.max(1) as f64
        ));
    }
    out.push_str(
        "\nWith `durability = \"sync\"` every PUBACK of a message for a persistent session waits \
         for one FULL commit; the group commit puts every message that arrived meanwhile in \
         the same one. CPU is the calling thread's time on a CPU (/proc/thread-self/schedstat): \
         on a VM it includes the exits that notify the virtual disk.\n",
    );
    out
}

/// The calling thread's time on a CPU, from `/proc/thread-self/schedstat` (Linux).
struct ThreadCpu {
    file: Option<File>,
}

impl ThreadCpu {
    fn new() -> ThreadCpu {
        ThreadCpu {
            file: File::open("/proc/thread-self/schedstat").ok(),
        }
    }

    fn now(&mut self) -> Duration {
        let Some(file) = self.file.as_mut() else {
            return Duration::ZERO;
        };
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_err() || file.read_to_string(&mut text).is_err() {
            return Duration::ZERO;
        }
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        Duration::from_nanos(ns)
    }
}

/// A directory of its own under `--dir`, removed at the end.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(dir: &Path) -> Result<Scratch> {
        let path = dir.join(format!(".fieldmq-bench-disk-{}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create {} (is --dir writable?)", path.display()))?;
        Ok(Scratch { path })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
