//! Starting and stopping the brokers under test: fieldmq's release binary and Mosquitto,
//! each on a free 127.0.0.1 port with a config written into a work directory, ready once
//! its listener accepts a connection.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

/// How long a started broker may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a broker may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `--target`: which broker(s) a bench starts.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetArg {
    Fieldmq,
    Mosquitto,
    Both,
}

/// One broker configuration under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Fieldmq,
    Mosquitto,
    /// Mosquitto with `persistence true`: what fieldmq's durable queue compares with.
    MosquittoPersist,
}

impl Target {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Fieldmq => "fieldmq",
            Target::Mosquitto => "mosquitto",
            Target::MosquittoPersist => "mosquitto+persist",
        }
    }

    /// fieldmq and/or Mosquitto, as `--target` asks; Mosquitto as `mosquitto`.
    pub(crate) fn both(target: TargetArg, mosquitto: Target) -> Vec<Target> {
        let mut targets = Vec::new();
        if matches!(target, TargetArg::Fieldmq | TargetArg::Both) {
            targets.push(Target::Fieldmq);
        }
        if matches!(target, TargetArg::Mosquitto | TargetArg::Both) {
            targets.push(mosquitto);
        }
        targets
    }
}

/// Binaries and the work directory, shared by the benches that start brokers.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BinArgs {
    /// The fieldmq binary.
    #[arg(long, default_value = "target/release/fieldmq")]
    pub(crate) fieldmq_bin: PathBuf,
    /// The Mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    pub(crate) mosquitto_bin: PathBuf,
    /// Keep the started brokers' logs, configs and data in this directory instead of a temp
    /// dir that is removed afterwards.
    #[arg(long)]
    pub(crate) keep_dir: Option<PathBuf>,
}

/// How to start the brokers: binaries and extra configuration lines.
pub(crate) struct BrokerSetup {
    pub(crate) fieldmq_bin: PathBuf,
    pub(crate) mosquitto_bin: PathBuf,
    /// Extra lines for fieldmq's `[broker]` table.
    pub(crate) fieldmq_broker: String,
    /// Extra lines for fieldmq's `[[broker.listeners]]` table.
    pub(crate) fieldmq_listener: String,
    /// Extra lines for `mosquitto.conf`.
    pub(crate) mosquitto: String,
}

impl BrokerSetup {
    pub(crate) fn new(bins: &BinArgs) -> BrokerSetup {
        BrokerSetup {
            fieldmq_bin: bins.fieldmq_bin.clone(),
            mosquitto_bin: bins.mosquitto_bin.clone(),
            fieldmq_broker: String::new(),
            // Every benchmark client comes from 127.0.0.1: no per-address limit.
            fieldmq_listener: "max_connections_per_address = 0\n".to_owned(),
            mosquitto: String::new(),
        }
    }
}

/// A started broker; stopped (SIGTERM, then SIGKILL) on `stop` or drop.
pub(crate) struct BrokerProcess {
    child: Option<Child>,
    pub(crate) addr: SocketAddr,
    pub(crate) log_path: PathBuf,
}

impl BrokerProcess {
    /// Start `target` on a free port with its files in `dir`.
    pub(crate) fn start(target: Target, setup: &BrokerSetup, dir: &Path) -> Result<BrokerProcess> {
        let port = free_port()?;
        match target {
            Target::Fieldmq => start_fieldmq(setup, dir, port),
            Target::Mosquitto => start_mosquitto(
                &setup.mosquitto_bin,
                dir,
                port,
                &format!("persistence false\n{}", setup.mosquitto),
            ),
            Target::MosquittoPersist => {
                let data = dir.join("persist");
                create_dir(&data)?;
                let extra = format!(
                    "persistence true\npersistence_location {}/\n{}",
                    data.display(),
                    setup.mosquitto
                );
                start_mosquitto(&setup.mosquitto_bin, dir, port, &extra)
            }
        }
    }

    /// Run `command` with its output in `log_path` and wait until `addr` accepts.
    pub(crate) fn spawn(
        name: &str,
        mut command: Command,
        addr: SocketAddr,
        log_path: PathBuf,
    ) -> Result<BrokerProcess> {
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .env("RUST_LOG", "warn");
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let mut broker = BrokerProcess {
            child: Some(child),
            addr,
            log_path,
        };
        broker.wait_ready(name)?;
        Ok(broker)
    }

    /// Connect in a loop until the listener accepts, the process exits, or the time is up.
    fn wait_ready(&mut self, name: &str) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("cannot poll the broker")? {
                    bail!(
                        "{name} exited ({status}) before accepting connections:\n{}",
                        tail(&self.log_path, 20)
                    );
                }
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} did not accept connections on {} within {:?}:\n{}",
                    self.addr,
                    READY_TIMEOUT,
                    tail(&self.log_path, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Graceful first, so fieldmq can close its SQLite files.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// fieldmq's release binary with a config of its own in `dir` (data under `dir/data`).
fn start_fieldmq(setup: &BrokerSetup, dir: &Path, port: u16) -> Result<BrokerProcess> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let data = dir.join("data");
    create_dir(&data)?;
    let conf = dir.join("fieldmq.toml");
    let text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = {data:?}\n\n[broker]\n\
         allow_anonymous = true\n{broker}\n[[broker.listeners]]\nbind = \"{addr}\"\n\
         {listener}",
        data = data.display().to_string(),
        broker = setup.fieldmq_broker,
        listener = setup.fieldmq_listener,
    );
    std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
    if !setup.fieldmq_bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` or pass --fieldmq-bin",
            setup.fieldmq_bin.display()
        );
    }
    let mut command = Command::new(&setup.fieldmq_bin);
    command.arg("run").arg("-c").arg(&conf);
    BrokerProcess::spawn("fieldmq", command, addr, dir.join("broker.log"))
}

/// Mosquitto on 127.0.0.1:`port` for anonymous clients, with the `extra` configuration
/// lines, its `mosquitto.conf` and `broker.log` in `dir`. The one way every bench starts
/// Mosquitto, as a broker under test, a cloud or a bridge.
pub(crate) fn start_mosquitto(
    bin: &Path,
    dir: &Path,
    port: u16,
    extra: &str,
) -> Result<BrokerProcess> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let conf = dir.join("mosquitto.conf");
    let mut text = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
    if is_root() {
        // Started as root, mosquitto drops to user "mosquitto", which cannot write our
        // temp dir.
        text.push_str("user root\n");
    }
    let _ = writeln!(text, "{extra}");
    std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
    let mut command = Command::new(bin);
    command.arg("-c").arg(&conf);
    BrokerProcess::spawn("mosquitto", command, addr, dir.join("broker.log"))
        .with_context(|| format!("{} (is Mosquitto installed?)", bin.display()))
}

/// The directory for configs, logs and broker data: removed on drop unless `--keep-dir`.
pub(crate) struct WorkDir {
    path: PathBuf,
    pub(crate) keep: bool,
}

impl WorkDir {
    pub(crate) fn new(keep_dir: Option<PathBuf>) -> Result<WorkDir> {
        let (path, keep) = match keep_dir {
            Some(p) => (p, true),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let name = format!("fieldmq-bench-{}-{nanos}", std::process::id());
                (std::env::temp_dir().join(name), false)
            }
        };
        create_dir(&path)?;
        Ok(WorkDir { path, keep })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A new subdirectory `name`.
    pub(crate) fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.path.join(name);
        create_dir(&dir)?;
        Ok(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Start `target` in a new directory `dir`; `None` (said on stderr) if it cannot start.
pub(crate) fn start_broker_in(
    dir: &Path,
    target: Target,
    setup: &BrokerSetup,
) -> Result<Option<BrokerProcess>> {
    create_dir(dir)?;
    match BrokerProcess::start(target, setup, dir) {
        Ok(broker) => Ok(Some(broker)),
        Err(e) => {
            eprintln!("   cannot start: {e:#}");
            Ok(None)
        }
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub(crate) fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("no local address")?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// The last `lines` lines of a log, for an error message.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
