//! A cloud broker for tests: Mosquitto on a free loopback port, with or without TLS
//! (certificates from [`super::pki`]).
//!
//! Tests that need Mosquitto call [`mosquitto_available`] first: on a machine without it
//! they skip with a message, unless `CI` is set, where a missing Mosquitto is a failure.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pki::Certs;
use super::{free_port, skip};

/// Whether `mosquitto` can be run. Panics in CI when it cannot.
pub(crate) fn mosquitto_available(test: &str) -> bool {
    let found = Command::new("mosquitto")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip::skip(
            test,
            "mosquitto is not on PATH (`apt-get install -y mosquitto`)",
        );
    }
    found
}

/// How to run the cloud broker.
#[derive(Default, Clone)]
pub(crate) struct CloudOptions {
    /// Add a TLS listener that requires a client certificate signed by `certs.ca`.
    pub(crate) mtls: Option<(PathBufs, bool)>,
    /// Extra lines for mosquitto.conf.
    pub(crate) extra: Vec<String>,
}

/// The certificate files a TLS listener needs.
#[derive(Clone)]
pub(crate) struct PathBufs {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl From<&Certs> for PathBufs {
    fn from(c: &Certs) -> Self {
        PathBufs {
            ca: c.ca.clone(),
            cert: c.server_cert.clone(),
            key: c.server_key.clone(),
        }
    }
}

/// A running Mosquitto. Killed when dropped.
pub(crate) struct Cloud {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Plain MQTT listener.
    pub(crate) port: u16,
    /// TLS listener, when configured.
    pub(crate) tls_port: Option<u16>,
    config: PathBuf,
}

impl Cloud {
    pub(crate) fn start(options: CloudOptions) -> Cloud {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let tls_port = options.mtls.as_ref().map(|_| free_port());
        let mut conf = vec![
            // Run as root so the test's key files are readable (mosquitto drops to its own
            // user otherwise).
            "user root".to_string(),
            "per_listener_settings false".to_string(),
            "allow_anonymous true".to_string(),
            "persistence false".to_string(),
            "max_queued_messages 0".to_string(),
            "max_inflight_messages 0".to_string(),
            "log_type error".to_string(),
            "log_type warning".to_string(),
            "log_type notice".to_string(),
            "log_dest stderr".to_string(),
            format!("listener {port} 127.0.0.1"),
        ];
        if let (Some((files, require_certificate)), Some(tls_port)) = (&options.mtls, tls_port) {
            conf.push(format!("listener {tls_port} 127.0.0.1"));
            conf.push(format!("cafile {}", files.ca.display()));
            conf.push(format!("certfile {}", files.cert.display()));
            conf.push(format!("keyfile {}", files.key.display()));
            conf.push(format!("require_certificate {require_certificate}"));
        }
        conf.extend(options.extra.iter().cloned());
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(&config, conf.join("\n") + "\n").expect("write mosquitto.conf");
        let mut cloud = Cloud {
            child: None,
            dir,
            port,
            tls_port,
            config,
        };
        cloud.restart();
        cloud
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Start (again) on the same ports and wait until it accepts connections.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .expect("log file");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(self.addr()).is_ok() {
                break;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("mosquitto exited at start ({status}): {}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen within 10 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop it cleanly (SIGTERM: with `persistence true` it saves its sessions).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Stop it (SIGKILL: the cloud disappears without goodbye).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the broker freezes with its connections open.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Cloud::pause`].
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("mosquitto is running");
        let status = Command::new("kill")
            .args([name, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {name} mosquitto failed");
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.kill();
    }
}
