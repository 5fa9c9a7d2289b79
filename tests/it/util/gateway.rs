//! The real `fieldmq` binary as a child process: start it on a config, learn its listener
//! address from its log, stop it with SIGTERM or kill it with SIGKILL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub(crate) struct GatewayProcess {
    child: Child,
    pub(crate) addr: SocketAddr,
    /// Log lines after startup, for assertions on what the gateway said.
    pub(crate) log: std::sync::mpsc::Receiver<String>,
}

/// The `fieldmq` binary the tests run: this build's, or another one (e.g. a release
/// binary) named by `FIELDMQ_BIN`.
pub(crate) fn binary() -> std::ffi::OsString {
    std::env::var_os("FIELDMQ_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_fieldmq").into())
}

impl GatewayProcess {
    /// Start `fieldmq run -c config` and wait (20 s at most) for "MQTT listener ready".
    pub(crate) fn start(config: &Path) -> GatewayProcess {
        GatewayProcess::start_with_env(config, &[])
    }

    /// [`GatewayProcess::start`] with extra environment variables for the gateway (e.g. an
    /// uplink's `password_env`): the test process's own environment stays untouched.
    pub(crate) fn start_with_env(config: &Path, envs: &[(&str, &str)]) -> GatewayProcess {
        GatewayProcess::spawn(&["run".as_ref(), "-c".as_ref(), config.as_os_str()], envs)
    }

    /// Start `fieldmq` with `args` and wait (20 s at most) for "MQTT listener ready".
    pub(crate) fn start_with_args(args: &[&std::ffi::OsStr]) -> GatewayProcess {
        GatewayProcess::spawn(args, &[])
    }

    fn spawn(args: &[&std::ffi::OsStr], envs: &[(&str, &str)]) -> GatewayProcess {
        let mut child = Command::new(binary())
            .args(args)
            // Under a systemd service manager the test runner has these; the gateway must
            // see only what a test gives it.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(envs.iter().copied())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start fieldmq");
        let stderr = child.stderr.take().expect("stderr");
        // FIELDMQ_TEST_VERBOSE echoes the gateway's log next to the test's output.
        let verbose = std::env::var_os("FIELDMQ_TEST_VERBOSE").is_some();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (log_tx, log_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if verbose {
                    eprintln!("[gateway] {line}");
                }
                if line.contains("MQTT listener ready") {
                    if let Some(addr) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                    {
                        let _ = ready_tx.send(Ok(addr.to_owned()));
                    }
                }
                let _ = log_tx.send(line);
            }
            let _ = ready_tx.send(Err(()));
        });
        let addr = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(addr)) => addr,
            _ => {
                let lines: Vec<String> = log_rx.try_iter().collect();
                panic!(
                    "the gateway did not report a listener:\n{}",
                    lines.join("\n")
                );
            }
        };
        GatewayProcess {
            child,
            addr: addr.parse().expect("listener address"),
            log: log_rx,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {name} failed");
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (10 s at most) for the exit status.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(10))
    }

    /// SIGTERM, then wait (`limit` at most) for the exit status.
    pub(crate) fn terminate_within(&mut self, limit: Duration) -> ExitStatus {
        self.signal("-TERM");
        self.wait_exit(limit)
    }

    /// SIGINT (Ctrl-C), then wait (10 s at most) for the exit status.
    pub(crate) fn interrupt(&mut self) -> ExitStatus {
        self.signal("-INT");
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGHUP (reload the configuration) without waiting.
    pub(crate) fn hangup(&self) {
        self.signal("-HUP");
    }

    /// Whether the process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// The exit status, once the process has ended.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// SIGTERM without waiting.
    pub(crate) fn request_stop(&self) {
        self.signal("-TERM");
    }

    /// SIGSTOP: the process freezes with its sockets open, as under a long stall.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`GatewayProcess::pause`].
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL: no chance to flush anything.
    pub(crate) fn kill9(&mut self) {
        self.signal("-KILL");
        self.wait_exit(Duration::from_secs(10));
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `fieldmq` with arguments to completion: (exit code, stdout, stderr).
pub(crate) fn run_to_end(args: &[&str], config: Option<&Path>) -> (Option<i32>, String, String) {
    let mut command = Command::new(binary());
    command.args(args);
    if let Some(config) = config {
        command.arg(config);
    }
    let output = command.output().expect("run fieldmq");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Run `fieldmq` with `args` and the environment variables `envs` to completion, at most
/// `limit` (a process still running then is killed and fails the test): (exit code,
/// stdout, stderr).
pub(crate) fn run_within(
    args: &[&std::ffi::OsStr],
    envs: &[(&str, &str)],
    limit: Duration,
) -> (Option<i32>, String, String) {
    let child = Command::new(binary())
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fieldmq");
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done_rx.recv_timeout(limit) {
        Ok(output) => {
            let output = output.expect("wait for fieldmq");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let output = done_rx.recv_timeout(limit);
            panic!("fieldmq {args:?} still running after {limit:?}: {output:?}");
        }
    }
}

/// Write `dir/fieldmq.toml`: a gateway with its data in `data_dir`, anonymous clients, one
/// listener on an ephemeral 127.0.0.1 port, and `broker_lines` added to `[broker]`.
pub(crate) fn write_config(dir: &Path, data_dir: &Path, broker_lines: &str) -> std::path::PathBuf {
    let config = format!(
        r#"
[gateway]
id = "test"
data_dir = "{}"

[broker]
allow_anonymous = true
{broker_lines}

[[broker.listeners]]
bind = "127.0.0.1:0"
"#,
        data_dir.display()
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, config).expect("write config");
    path
}
