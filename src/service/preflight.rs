//! `fieldmq check`'s look at the machine: what `fieldmq run` would refuse at start once the
//! file itself is valid (an unset password variable, a data directory that cannot be
//! created or written, a password, ACL or TLS file that does not load), and what it would
//! accept but should not (anonymous clients on a listener the network reaches, a serial
//! port that is not there yet). Nothing is started; what the look creates (a missing data
//! directory, a probe file) is removed again.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::config::Config;
use crate::broker::config::Durability;
use crate::config::{diagnostic_at, Diagnostic};
use crate::drivers::config::DriverConfig;
use crate::drivers::modbus::Transport;
use crate::uplink::config::SecretSource;

/// What the look found, each placed at the key it concerns.
#[derive(Debug, Default)]
pub struct Findings {
    /// `fieldmq run` would refuse to start.
    pub errors: Vec<Diagnostic>,
    /// `fieldmq run` starts, but the operator should know.
    pub warnings: Vec<Diagnostic>,
}

/// Looks at what `config` needs from the machine.
pub fn preflight(config: &Config) -> Findings {
    let mut findings = Findings::default();
    let source = config.source.as_path();
    let mut error = |key: &str, message: String| {
        findings.errors.push(diagnostic_at(source, key, message));
    };

    if let Err(why) = probe_writable_dir(&config.gateway.data_dir) {
        error(
            "gateway.data_dir",
            format!(
                "data directory {}: {why}",
                config.gateway.data_dir.display()
            ),
        );
    }
    let broker = &config.broker;
    if broker.durability != Durability::Memory {
        let store_dir = broker.store_path.parent().unwrap_or(Path::new("."));
        if store_dir != config.gateway.data_dir {
            if let Err(why) = probe_writable_dir(store_dir) {
                error(
                    "broker.store_path",
                    format!(
                        "directory of the broker store {}: {why}",
                        store_dir.display()
                    ),
                );
            }
        }
        if let Err(why) = existing_file_writable(&broker.store_path) {
            error("broker.store_path", why);
        }
    }
    if let Some(path) = &broker.password_file {
        if let Err(e) = crate::broker::PasswordFile::load(path) {
            error("broker.password_file", e.to_string());
        }
    }
    if let Some(path) = &broker.acl_file {
        if let Err(e) = crate::broker::Acl::load(path) {
            error("broker.acl_file", e.to_string());
        }
    }
    for (index, listener) in broker.listeners.iter().enumerate() {
        if let Err(e) = crate::broker::check_listener_tls(listener) {
            error(&format!("broker.listeners[{index}].tls"), e.to_string());
        }
    }

    for (index, uplink) in config.uplinks.iter().enumerate() {
        let key = |name: &str| format!("uplinks[{index}].{name}");
        if let Some(SecretSource::Env(var)) = &uplink.password {
            if std::env::var_os(var).is_none() {
                error(
                    &key("password_env"),
                    format!(
                        "the password variable {var} is not set in this environment \
                         (set it where the service runs: an EnvironmentFile or \
                         `systemctl edit fieldmq`)"
                    ),
                );
            }
        }
        for problem in crate::uplink::check(uplink) {
            error(&format!("uplinks[{index}]"), problem.to_string());
        }
        let outbox = crate::uplink::outbox_path(&config.gateway.data_dir, &uplink.name);
        if let Err(why) = existing_file_writable(&outbox) {
            error(&format!("uplinks[{index}]"), why);
        }
    }

    let mut warning = |key: &str, message: String, hint: String| {
        let mut diagnostic = diagnostic_at(source, key, message);
        diagnostic.hint = Some(hint);
        findings.warnings.push(diagnostic);
    };
    for (index, listener) in broker.listeners.iter().enumerate() {
        let certificate_required = listener.tls.as_ref().is_some_and(|t| t.require_client_cert);
        if broker.allow_anonymous && !listener.bind.ip().is_loopback() && !certificate_required {
            warning(
                &format!("broker.listeners[{index}].bind"),
                format!(
                    "listener {} lets anonymous clients in from the network (allow_anonymous \
                     = true): anyone who reaches it can read every topic and write to devices",
                    listener.url()
                ),
                "bind it to 127.0.0.1, or set password_file with allow_anonymous = false (and \
                 an acl_file), as Mosquitto 2 requires"
                    .into(),
            );
        }
    }
    for (index, device) in config.devices.iter().enumerate() {
        let port = match &device.driver {
            DriverConfig::Serial(serial) => Some(&serial.port.path),
            DriverConfig::Modbus(modbus) => match &modbus.transport {
                Transport::Rtu(settings) => Some(&settings.path),
                Transport::Tcp { .. } | Transport::RtuOverTcp { .. } => None,
            },
            DriverConfig::Simulated(_) => None,
        };
        if let Some(port) = port.filter(|p| !Path::new(p.as_str()).exists()) {
            warning(
                &format!("devices[{index}].port"),
                format!(
                    "serial port {port} of device {} does not exist (yet): the device stays \
                     offline until it appears",
                    device.name
                ),
                "plug the adapter in, or name it by /dev/serial/by-id/... so it keeps its name"
                    .into(),
            );
        }
    }
    findings
}

/// Creates `dir` if needed and writes and removes a probe file in it, as the stores will;
/// then removes the directories it created. The reason when that fails.
fn probe_writable_dir(dir: &Path) -> Result<(), String> {
    let mut created: Vec<PathBuf> = Vec::new();
    let mut missing = dir;
    while !missing.exists() {
        created.push(missing.to_path_buf());
        match missing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => missing = parent,
            _ => break,
        }
    }
    let result = std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot be created: {e}"))
        .and_then(|()| {
            let probe = dir.join(format!(".fieldmq-check-{}", std::process::id()));
            let written = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|mut file| file.write_all(b"probe"));
            let _ = std::fs::remove_file(&probe);
            written.map_err(|e| format!("cannot be written: {e}"))
        });
    // Deepest first: each was empty but for what this look made.
    for path in &created {
        let _ = std::fs::remove_dir(path);
    }
    result
}

/// A store file that exists must open for writing (it does not have to exist yet).
fn existing_file_writable(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| format!("{} cannot be opened for writing: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_removes_the_directories_it_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a/b/c");
        assert_eq!(probe_writable_dir(&deep), Ok(()));
        assert!(!dir.path().join("a").exists());
        std::fs::write(dir.path().join("file"), "x").expect("write");
        let refused = probe_writable_dir(&dir.path().join("file/data")).expect_err("a file");
        assert!(refused.contains("cannot be created"), "{refused}");
        assert_eq!(probe_writable_dir(dir.path()), Ok(()));
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
