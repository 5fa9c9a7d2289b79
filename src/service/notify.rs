//! systemd's notify protocol (`sd_notify(3)`): readiness, status lines, stopping, and the
//! watchdog keep-alive.
//!
//! This module owns the one datagram socket the gateway uses to talk to its service manager.
//! Everything here is best-effort: the gateway never fails, blocks or waits because the
//! manager is absent, slow or gone. Outside systemd (no `NOTIFY_SOCKET`) every call is a
//! no-op, so `fieldmq run` behaves the same in a terminal, a container or a test.
//!
//! # Why the socket is ours and not `sd_notify::notify`
//!
//! The wire vocabulary (`READY=1`, `STATUS=...`, `WATCHDOG=1`, ...) comes from the `sd-notify`
//! crate's [`NotifyState`]. Its `notify()` function is not used because it can only find the
//! socket through the process environment, on every call:
//! - unit tests would have to `set_var("NOTIFY_SOCKET")` in a multi-threaded test binary,
//!   which races with every other thread's `getenv` (undefined behaviour in glibc; `unsafe`
//!   since Rust 2024); here a test hands [`Notifier::to_socket`] the path it owns;
//! - its socket is blocking: a manager that stops reading would block a runtime thread;
//!   ours is non-blocking and a message that does not fit is dropped (and logged);
//! - it cannot reach an abstract socket (`NOTIFY_SOCKET=@name`, used by some managers and
//!   containers); we can.
//!
//! Its `watchdog_enabled()` is not used either: it reports "disabled" when `WATCHDOG_PID` is
//! unset, whereas libsystemd's `sd_watchdog_enabled(3)` only ignores `WATCHDOG_USEC` when
//! `WATCHDOG_PID` is set *and* names another process. We follow libsystemd.
//!
//! The environment is read once, in [`Notifier::from_env`], and never modified (removing
//! variables from a running multi-threaded process is unsound; the gateway starts no child
//! processes that could inherit them).
//!
//! # The watchdog
//!
//! With `WatchdogSec=30` systemd passes `WATCHDOG_USEC=30000000` and kills (then, with
//! `Restart=on-failure`, restarts) the service if no `WATCHDOG=1` arrives for 30 s.
//! [`Notifier::run_watchdog`] sends one every half interval, but only while the health check
//! it is given says the gateway is alive. The check should prove that the gateway's main loop
//! makes progress (for instance that the broker router answered a request recently), not
//! merely that the tokio runtime can run this task: a task that pings unconditionally keeps a
//! wedged gateway alive forever.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A handle on the service manager's notification socket. Cheap to clone; every clone sends to
/// the same socket. A `Notifier` built outside systemd does nothing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Notifier {
    /// `None` when there is no service manager to talk to.
    target: Option<Arc<Target>>,
    /// Keep-alive period (half of `WATCHDOG_USEC`), `None` when the watchdog is off.
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// Shown in logs.
    display: String,
    /// Whether a failed send was already logged at `warn` (later ones go to `debug`, so a
    /// vanished manager does not fill the journal with one line per watchdog ping).
    warned: AtomicBool,
    /// The last STATUS= line the service sent, put back when the watchdog's health check
    /// recovers (it replaces the status while the gateway is unhealthy).
    last_status: Mutex<String>,
}

impl Notifier {
    /// A notifier that does nothing: no socket, no watchdog.
    pub(crate) fn disabled() -> Self {
        Self::default()
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` once. Without
    /// `NOTIFY_SOCKET` (not started by systemd, or `Type=` is not `notify`) the result is a
    /// no-op notifier. A socket address that cannot be used is logged and also gives a no-op
    /// notifier: the gateway runs anyway, and systemd reports the missing `READY=1` itself.
    pub(crate) fn from_env() -> Self {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::disabled();
        };
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let watchdog = watchdog_period(usec.as_deref(), pid.as_deref(), std::process::id());
        let socket = socket.to_string_lossy();
        match Self::to_socket(&socket) {
            Ok(notifier) => notifier.with_watchdog(watchdog),
            Err(e) => {
                warn!(socket = %socket, error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from fieldmq");
                Self::disabled()
            }
        }
    }

    /// A notifier that sends to `address` (an absolute path, or `@name` for an abstract
    /// socket), with the watchdog off. Tests use this with a socket they own.
    pub(crate) fn to_socket(address: &str) -> io::Result<Self> {
        let addr = parse_address(address)?;
        let socket = UnixDatagram::unbound()?;
        // Never block a runtime thread on the manager: a full socket buffer drops the message.
        socket.set_nonblocking(true)?;
        Ok(Self {
            target: Some(Arc::new(Target {
                socket,
                addr,
                display: address.to_owned(),
                warned: AtomicBool::new(false),
                last_status: Mutex::new(String::new()),
            })),
            watchdog: None,
        })
    }

    /// Sets the keep-alive period that [`run_watchdog`](Self::run_watchdog) uses.
    pub(crate) fn with_watchdog(mut self, period: Option<Duration>) -> Self {
        self.watchdog = period.filter(|p| !p.is_zero());
        self
    }

    /// Whether there is a service manager listening (`NOTIFY_SOCKET` was usable).
    pub(crate) fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Startup is finished: the configuration is loaded and every listener accepts
    /// connections. With `Type=notify`, `systemctl start` returns only now.
    #[allow(dead_code)] // the service uses ready_with_status; kept for callers without a summary
    pub(crate) fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// [`ready`](Self::ready) and a first status line in one message.
    pub(crate) fn ready_with_status(&self, line: &str) {
        let line = self.remember_status(line);
        self.send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    }

    /// A one-line summary shown by `systemctl status fieldmq` ("Status: ..."). Newlines
    /// would end the field, so they are replaced by spaces.
    pub(crate) fn status(&self, line: &str) {
        let line = self.remember_status(line);
        self.send(&[NotifyState::Status(&line)]);
    }

    fn remember_status(&self, line: &str) -> String {
        let line = one_line(line);
        if let Some(target) = &self.target {
            if let Ok(mut last) = target.last_status.lock() {
                last.clone_from(&line);
            }
        }
        line
    }

    /// Graceful shutdown has begun (systemd then shows "deactivating").
    pub(crate) fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// The keep-alive period: half of `WATCHDOG_USEC` as `sd_watchdog_enabled(3)` recommends,
    /// or `None` when the watchdog is off (or `WATCHDOG_PID` names another process).
    pub(crate) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// One keep-alive ping, for callers that drive the watchdog from their own loop.
    pub(crate) fn watchdog_ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Sends `WATCHDOG=1` every [`watchdog_interval`](Self::watchdog_interval) while
    /// `healthy()` returns true, until `shutdown` is cancelled. An unhealthy tick sends
    /// nothing (and logs why), so a gateway that stays unhealthy for `WatchdogSec` is killed
    /// with SIGABRT and restarted by systemd; one that recovers sooner resumes pinging.
    ///
    /// The first ping is sent at once. Without a watchdog this just waits for `shutdown`, so
    /// it can sit in a `select!` or a `JoinSet` either way.
    pub(crate) async fn run_watchdog<F>(self, healthy: F, shutdown: CancellationToken)
    where
        F: Fn() -> bool,
    {
        let (Some(period), true) = (self.watchdog_interval(), self.is_enabled()) else {
            shutdown.cancelled().await;
            return;
        };
        debug!(?period, "systemd watchdog enabled");
        let mut ticks = tokio::time::interval(period);
        // After a stall (a suspended Pi, a stopped process) ping once, not in a burst.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut was_healthy = true;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let is_healthy = healthy();
            if is_healthy {
                self.watchdog_ping();
            }
            if was_healthy && !is_healthy {
                warn!("gateway is unhealthy: withholding systemd watchdog pings; systemd restarts fieldmq if this lasts WatchdogSec");
                // Not through status(): the service's own line is put back on recovery.
                self.send(&[NotifyState::Status(
                    "unhealthy: main loop not responding, watchdog pings withheld",
                )]);
            }
            if is_healthy && !was_healthy {
                warn!("gateway is healthy again: systemd watchdog pings resumed");
                let last = self
                    .target
                    .as_ref()
                    .and_then(|t| t.last_status.lock().ok().map(|l| l.clone()))
                    .unwrap_or_default();
                self.send(&[NotifyState::Status(&last)]);
            }
            was_healthy = is_healthy;
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(target) = &self.target else { return };
        let mut message = String::new();
        for state in states {
            message.push_str(&state.to_string());
            message.push('\n');
        }
        match target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            Ok(_) => {}
            Err(e) => {
                let first = !target.warned.swap(true, Ordering::Relaxed);
                let message = message.trim_end();
                if first {
                    warn!(socket = %target.display, error = %e, message, "cannot notify systemd");
                } else {
                    debug!(socket = %target.display, error = %e, message, "cannot notify systemd");
                }
            }
        }
    }
}

/// The keep-alive period for `WATCHDOG_USEC`/`WATCHDOG_PID` as seen by process `own_pid`,
/// following `sd_watchdog_enabled(3)`: off when `WATCHDOG_USEC` is missing, zero or not a
/// number, or when `WATCHDOG_PID` is set and is not `own_pid`; otherwise half the timeout.
fn watchdog_period(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

fn parse_address(address: &str) -> io::Result<SocketAddr> {
    if let Some(name) = address.strip_prefix('@') {
        return abstract_address(name.as_bytes());
    }
    if address.starts_with('/') {
        return SocketAddr::from_pathname(address);
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "expected an absolute path or @abstract-name (vsock addresses are not supported)",
    ))
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

fn one_line(line: &str) -> String {
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    /// A datagram socket standing in for systemd's, in a temporary directory.
    struct FakeManager {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl FakeManager {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            Self {
                _dir: dir,
                path,
                socket,
            }
        }

        fn notifier(&self) -> Notifier {
            Notifier::to_socket(self.path.to_str().expect("utf-8 path")).expect("notifier")
        }

        fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).expect("a notification");
            String::from_utf8(buf[..n].to_vec()).expect("utf-8")
        }

        fn try_recv(&self) -> Option<String> {
            self.socket.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 4096];
            let got = self
                .socket
                .recv(&mut buf)
                .ok()
                .map(|n| String::from_utf8(buf[..n].to_vec()).expect("utf-8"));
            self.socket.set_nonblocking(false).expect("blocking");
            got
        }
    }

    #[test]
    fn ready_status_and_stopping_reach_the_manager_in_order() {
        let manager = FakeManager::new();
        let notifier = manager.notifier();
        assert!(notifier.is_enabled());
        notifier.ready();
        notifier.status("3 devices, 1 uplink connected");
        notifier.stopping();
        assert_eq!(manager.recv(), "READY=1\n");
        assert_eq!(manager.recv(), "STATUS=3 devices, 1 uplink connected\n");
        assert_eq!(manager.recv(), "STOPPING=1\n");
    }

    #[test]
    fn ready_with_status_is_one_datagram() {
        let manager = FakeManager::new();
        manager
            .notifier()
            .ready_with_status("listening on 127.0.0.1:1883");
        assert_eq!(
            manager.recv(),
            "READY=1\nSTATUS=listening on 127.0.0.1:1883\n"
        );
    }

    #[test]
    fn status_lines_cannot_inject_other_fields() {
        let manager = FakeManager::new();
        manager.notifier().status("bad\nREADY=1\r\nx");
        assert_eq!(manager.recv(), "STATUS=bad READY=1  x\n");
    }

    #[test]
    fn a_disabled_notifier_does_nothing() {
        let notifier = Notifier::disabled();
        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready();
        notifier.status("x");
        notifier.stopping();
        notifier.watchdog_ping();
    }

    #[test]
    fn a_vanished_manager_is_not_an_error() {
        let manager = FakeManager::new();
        let notifier = manager.notifier();
        let path = manager.path.clone();
        drop(manager);
        assert!(!path.exists());
        notifier.ready();
        notifier.ready();
    }

    #[test]
    fn relative_and_vsock_addresses_are_refused() {
        assert!(Notifier::to_socket("run/notify").is_err());
        assert!(Notifier::to_socket("vsock:2:1234").is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_sockets_are_reached() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fieldmq-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Notifier::to_socket(&format!("@{name}"))
            .expect("notifier")
            .ready();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\n");
    }

    #[test]
    fn watchdog_period_is_half_the_timeout() {
        assert_eq!(
            watchdog_period(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_period(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn watchdog_is_off_for_another_pid_or_a_bad_value() {
        assert_eq!(watchdog_period(None, None, 7), None);
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
        assert_eq!(watchdog_period(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period(Some("30000000"), Some("x"), 7), None);
    }

    #[tokio::test(start_paused = true)]
    async fn run_watchdog_pings_every_interval_while_healthy_and_stops_on_shutdown() {
        let manager = FakeManager::new();
        let notifier = manager
            .notifier()
            .with_watchdog(Some(Duration::from_secs(15)));
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(15)));
        let checks = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let checks = Arc::clone(&checks);
            notifier.run_watchdog(
                move || {
                    checks.fetch_add(1, Ordering::SeqCst);
                    true
                },
                shutdown.clone(),
            )
        });
        // First ping at once, then one per 15 s of (paused, auto-advanced) time.
        tokio::time::sleep(Duration::from_secs(46)).await;
        assert_eq!(checks.load(Ordering::SeqCst), 4);
        for _ in 0..4 {
            assert_eq!(manager.recv(), "WATCHDOG=1\n");
        }
        shutdown.cancel();
        task.await.expect("watchdog task");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(manager.try_recv(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn run_watchdog_withholds_pings_while_unhealthy() {
        let manager = FakeManager::new();
        let notifier = manager
            .notifier()
            .with_watchdog(Some(Duration::from_secs(10)));
        notifier.ready_with_status("2 devices");
        assert_eq!(manager.recv(), "READY=1\nSTATUS=2 devices\n");
        let healthy = Arc::new(AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let healthy = Arc::clone(&healthy);
            notifier.run_watchdog(move || healthy.load(Ordering::SeqCst), shutdown.clone())
        });
        tokio::time::sleep(Duration::from_secs(5)).await; // tick at 0 s
        assert_eq!(manager.recv(), "WATCHDOG=1\n");
        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(20)).await; // ticks at 10 s, 20 s
        assert_eq!(
            manager.recv(),
            "STATUS=unhealthy: main loop not responding, watchdog pings withheld\n"
        );
        assert_eq!(manager.try_recv(), None, "no ping while unhealthy");
        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await; // tick at 30 s
        assert_eq!(manager.recv(), "WATCHDOG=1\n");
        assert_eq!(
            manager.recv(),
            "STATUS=2 devices\n",
            "the service's status is back"
        );
        shutdown.cancel();
        task.await.expect("watchdog task");
    }

    #[tokio::test(start_paused = true)]
    async fn run_watchdog_without_a_watchdog_waits_for_shutdown() {
        let manager = FakeManager::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(manager.notifier().run_watchdog(|| true, shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!task.is_finished());
        assert_eq!(manager.try_recv(), None);
        shutdown.cancel();
        task.await.expect("watchdog task");
    }
}
