//! Deployment: the systemd unit, the install scripts and the notify protocol, checked against
//! the real tools and the real binary.
//!
//! - the unit passes `systemd-analyze verify` with no output at all (unknown keys are only
//!   warnings there, so any output fails), and carries the settings the gateway relies on;
//! - `systemd/install.sh` installs into a temporary `DESTDIR` with the expected files and
//!   modes, keeps an existing config, and `uninstall.sh` reverses it;
//! - `fieldmq run` under a fake service manager (a datagram socket this test owns as
//!   `NOTIFY_SOCKET`) sends READY=1 once its listener serves MQTT, STATUS= lines, WATCHDOG=1
//!   at half of `WATCHDOG_USEC`, and STOPPING=1 on SIGTERM.
//!
//! A missing `systemd-analyze` skips its test with a message on a developer machine and fails
//! it in CI (`CI` set).

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::gateway::{self, GatewayProcess};
use crate::util::skip;

const BIN: &str = env!("CARGO_BIN_EXE_fieldmq");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{} should exist: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Finds `tool` on PATH; `None` means "skip `test`", except in CI, where the tool must be
/// there (tests/it/util/skip.rs).
fn tool(test: &str, name: &str) -> Option<PathBuf> {
    skip::tool_on_path(test, name, "apt-get install systemd")
}

// --- the unit file -----------------------------------------------------------------------

/// `(section, key, value)` for every setting in a unit file, in order.
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            settings.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
    }
    settings
}

/// The README's run command (the first `cargo run ... -- run ...` line of a code block),
/// split into cargo's arguments and the program's.
fn readme_run_command() -> (Vec<String>, Vec<String>) {
    let readme = read(repo().join("README.md"));
    let line = readme
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("cargo run") && line.contains(" -- run"))
        .expect("a `cargo run ... -- run ...` line in README.md");
    let words: Vec<String> = line
        .split('#')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let split = words
        .iter()
        .position(|w| w == "--")
        .expect("`--` before the program's arguments");
    (words[1..split].to_vec(), words[split + 1..].to_vec())
}

/// The README's first command (`cargo run --release -- run -c config/demo.toml`), run: cargo
/// must pick the gateway's binary in the workspace (the benchmarks are a package of their own), and
/// that binary, given exactly the command's arguments, must bring up the demo gateway. The
/// binary is the one the tests were built with (a release build takes minutes); the demo
/// config is copied next to a temporary data directory with its listener on a free port.
#[test]
fn the_readme_run_command_runs_the_gateway_binary() {
    let (cargo_args, program_args) = readme_run_command();
    assert_eq!(
        cargo_args.first().map(String::as_str),
        Some("run"),
        "{cargo_args:?}"
    );
    assert!(
        cargo_args[1..].iter().all(|a| a == "--release"),
        "cargo arguments this test does not know: {cargo_args:?}"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let package = &metadata["packages"][0];
    let binaries: Vec<&str> = package["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str())
        .collect();
    let runs = match binaries.as_slice() {
        [only] => Some(*only),
        _ => package["default_run"].as_str(),
    };
    assert_eq!(
        runs,
        Some("fieldmq"),
        "`cargo run` must pick the gateway among {binaries:?} (default-run)"
    );

    // The program's arguments as written; the config file they name (relative to the
    // repository, where the README runs it) is copied with a free port.
    let dir = tempfile::tempdir().expect("tempdir");
    let config_at = program_args
        .iter()
        .position(|a| a == "-c" || a == "--config")
        .map(|i| i + 1)
        .expect("the command names a config file");
    let original = read(repo().join(&program_args[config_at]));
    assert!(
        original.contains("bind = \"127.0.0.1:1883\""),
        "the README says the demo listens on 127.0.0.1:1883"
    );
    let copy = dir.path().join("demo.toml");
    fs::write(
        &copy,
        original
            .replace("bind = \"127.0.0.1:1883\"", "bind = \"127.0.0.1:0\"")
            .replace("bind = \"127.0.0.1:8088\"", "bind = \"127.0.0.1:0\""),
    )
    .expect("write the config copy");
    let args: Vec<&std::ffi::OsStr> = program_args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if i == config_at {
                copy.as_os_str()
            } else {
                a.as_ref()
            }
        })
        .collect();
    let mut gateway = gateway::GatewayProcess::start_with_args(&args);

    // The demo's simulated device publishes on demo/sim/... every second.
    let mut options = rumqttc::MqttOptions::new(
        "readme-watcher",
        gateway.addr.ip().to_string(),
        gateway.addr.port(),
    );
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut connection) = rumqttc::Client::new(options, 10);
    client
        .subscribe("demo/#", rumqttc::QoS::AtMostOnce)
        .expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(10);
    let reading = loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("a reading from the demo device within 10 s");
        match connection.recv_timeout(left) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => break p,
            Ok(Ok(_)) => {}
            other => panic!("the watcher's connection: {other:?}"),
        }
    };
    assert!(reading.topic.starts_with("demo/sim/"), "{reading:?}");
    let value: serde_json::Value =
        serde_json::from_slice(&reading.payload).expect("a JSON reading");
    assert_eq!(value["quality"], "good", "{value}");
    assert!(
        dir.path().join("fieldmq-data").is_dir(),
        "the data directory is relative to the config file"
    );
    drop(connection);
    let status = gateway.terminate();
    assert!(status.success(), "{status}");
}

#[test]
fn unit_file_passes_systemd_analyze_verify_without_any_output() {
    let Some(analyze) = tool(
        "unit_file_passes_systemd_analyze_verify_without_any_output",
        "systemd-analyze",
    ) else {
        return;
    };
    let unit = read(repo().join("systemd/fieldmq.service"));
    // verify insists that ExecStart's binary exists: point it at the one cargo built.
    let unit = unit.replace("ExecStart=/usr/bin/fieldmq ", &format!("ExecStart={BIN} "));
    assert!(
        unit.contains(BIN),
        "ExecStart should start with /usr/bin/fieldmq"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fieldmq.service");
    fs::write(&path, unit).expect("write unit copy");

    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        // Logs go to the console (not the journal, whatever stderr looks like), uncoloured.
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .expect("run systemd-analyze");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && printed.trim().is_empty(),
        "systemd-analyze verify must pass silently; exit {}, printed:\n{printed}",
        out.status
    );
}

#[test]
fn unit_file_has_the_settings_the_gateway_relies_on() {
    let settings = unit_settings(&read(repo().join("systemd/fieldmq.service")));
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(section, k, _)| section == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        match get(key).as_slice() {
            [value] => value,
            other => panic!("[Service] should set {key} once, found {other:?}"),
        }
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("WatchdogSec"), "30");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(
        one("ExecStart"),
        "/usr/bin/fieldmq run -c /etc/fieldmq/fieldmq.toml"
    );
    // SIGHUP reloads the configuration in place; the gateway never exits for it.
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(
        get("RestartForceExitStatus").is_empty(),
        "SIGHUP no longer ends the gateway: nothing to restart on"
    );
    assert_eq!(one("User"), "fieldmq");
    assert_eq!(one("SupplementaryGroups"), "dialout");
    assert_eq!(one("StateDirectory"), "fieldmq");
    assert_eq!(one("ConfigurationDirectory"), "fieldmq");
    // systemd must outwait the gateway's own 10 s shutdown deadline.
    let stop: u64 = one("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > 10,
        "TimeoutStopSec={stop} must exceed the 10 s shutdown deadline"
    );
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert_eq!(one("DevicePolicy"), "closed");
    assert_eq!(one("PrivateDevices"), "no", "serial ports live in /dev");
    assert_eq!(
        get("DeviceAllow"),
        [
            "char-ttyUSB rw",
            "char-ttyACM rw",
            "char-ttyAMA rw",
            "char-ttyS rw"
        ]
    );
    assert_eq!(
        one("RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6",
        "AF_UNIX carries the notify socket"
    );
}

#[test]
fn packaged_example_config_is_the_demo_with_data_dir_in_the_state_directory() {
    let parse = |path: &str| -> toml::Table {
        read(repo().join(path))
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let mut demo = parse("config/demo.toml");
    let packaged = parse("systemd/fieldmq.toml");
    demo["gateway"]
        .as_table_mut()
        .expect("[gateway]")
        .insert("data_dir".into(), "/var/lib/fieldmq".into());
    assert_eq!(
        packaged, demo,
        "systemd/fieldmq.toml must be config/demo.toml with data_dir = \"/var/lib/fieldmq\""
    );
}

// --- install.sh / uninstall.sh ------------------------------------------------------------

fn run_script(script: &str, destdir: &Path, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("systemd").join(script))
        .args(args)
        .env("DESTDIR", destdir)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// What scripts/generate-completions.sh leaves for the installer (its content is tested with
/// the generator, in docgen/tests): a file per shell and two man pages.
fn generated_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let files = [
        ("fieldmq.bash", b"complete -F _fieldmq fieldmq\n".to_vec()),
        ("_fieldmq", b"#compdef fieldmq\n".to_vec()),
        ("fieldmq.fish", b"complete -c fieldmq\n".to_vec()),
        ("man/fieldmq.1.gz", b"\x1f\x8b main page".to_vec()),
        ("man/fieldmq-run.1.gz", b"\x1f\x8b run page".to_vec()),
    ];
    files
        .into_iter()
        .map(|(name, bytes)| {
            let path = dir.join(name);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, &bytes).expect("write");
            (path, bytes)
        })
        .collect()
}

#[test]
fn install_script_installs_every_file_with_its_mode_into_destdir() {
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let generated = tempfile::tempdir().expect("tempdir");
    let files = generated_files(generated.path());
    let generated_arg = generated.path().display().to_string();
    let printed = run_script(
        "install.sh",
        root,
        &["--bin", BIN, "--generated", &generated_arg],
    );

    let expected = [
        ("usr/bin/fieldmq", 0o755),
        ("usr/lib/systemd/system/fieldmq.service", 0o644),
        ("usr/lib/sysusers.d/fieldmq.conf", 0o644),
        ("usr/lib/tmpfiles.d/fieldmq.conf", 0o644),
        ("etc/fieldmq/fieldmq.toml", 0o640),
        ("usr/share/bash-completion/completions/fieldmq", 0o644),
        ("usr/share/zsh/vendor-completions/_fieldmq", 0o644),
        ("usr/share/fish/vendor_completions.d/fieldmq.fish", 0o644),
        ("usr/share/man/man1/fieldmq.1.gz", 0o644),
    ];
    for (path, want) in expected {
        let got = mode(&root.join(path));
        assert_eq!(got, want, "/{path}: mode {got:o}, want {want:o}");
        assert!(
            printed.contains(&format!("/{path}")),
            "install.sh should print /{path}:\n{printed}"
        );
    }
    assert_eq!(mode(&root.join("etc/fieldmq")), 0o750);
    assert_eq!(
        fs::read(root.join("usr/bin/fieldmq")).expect("installed binary"),
        fs::read(BIN).expect("built binary"),
    );
    assert_eq!(
        read(root.join("usr/lib/systemd/system/fieldmq.service")),
        read(repo().join("systemd/fieldmq.service"))
    );
    // The completions and man pages are the generated ones, each where its tool looks.
    for (installed, (_, bytes)) in [
        "usr/share/bash-completion/completions/fieldmq",
        "usr/share/zsh/vendor-completions/_fieldmq",
        "usr/share/fish/vendor_completions.d/fieldmq.fish",
        "usr/share/man/man1/fieldmq.1.gz",
        "usr/share/man/man1/fieldmq-run.1.gz",
    ]
    .iter()
    .zip(&files)
    {
        assert_eq!(
            &fs::read(root.join(installed)).expect("installed"),
            bytes,
            "/{installed}"
        );
    }
    let config: toml::Table = read(root.join("etc/fieldmq/fieldmq.toml"))
        .parse()
        .expect("installed config is TOML");
    assert_eq!(
        config["gateway"]["data_dir"].as_str(),
        Some("/var/lib/fieldmq"),
        "the hardened unit can write only to its StateDirectory"
    );
    // No leftovers from the atomic copy.
    let leftovers: Vec<_> = walk(root)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("fieldmq-new"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn install_without_generated_files_installs_the_rest_and_says_so() {
    let root = tempfile::tempdir().expect("tempdir");
    let empty = tempfile::tempdir().expect("tempdir");
    let empty_arg = empty.path().display().to_string();
    let out = Command::new("bash")
        .arg(repo().join("systemd/install.sh"))
        .args(["--bin", BIN, "--generated", &empty_arg])
        .env("DESTDIR", root.path())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no completions or man pages"), "{stderr}");
    assert!(
        stderr.contains("scripts/generate-completions.sh"),
        "{stderr}"
    );
    assert!(root.path().join("usr/bin/fieldmq").is_file());
    assert!(!root.path().join("usr/share/man/man1/fieldmq.1.gz").exists());
}

#[test]
fn reinstall_keeps_the_config_and_uninstall_keeps_it_unless_purged() {
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let generated = tempfile::tempdir().expect("tempdir");
    generated_files(generated.path());
    let generated_arg = generated.path().display().to_string();
    let install = ["--bin", BIN, "--generated", &generated_arg];
    run_script("install.sh", root, &install);
    let config = root.join("etc/fieldmq/fieldmq.toml");
    fs::write(&config, "# edited by the user\n").expect("edit config");
    let state = root.join("var/lib/fieldmq");
    fs::create_dir_all(&state).expect("state dir");
    fs::write(state.join("outbox.db"), b"queued").expect("state file");

    let printed = run_script("install.sh", root, &install);
    assert!(printed.contains("kept"), "{printed}");
    assert_eq!(read(&config), "# edited by the user\n");

    let printed = run_script("uninstall.sh", root, &[]);
    for gone in [
        "usr/bin/fieldmq",
        "usr/lib/systemd/system/fieldmq.service",
        "usr/lib/sysusers.d/fieldmq.conf",
        "usr/lib/tmpfiles.d/fieldmq.conf",
        "usr/share/bash-completion/completions/fieldmq",
        "usr/share/man/man1/fieldmq.1.gz",
    ] {
        assert!(!root.join(gone).exists(), "/{gone} should be removed");
        assert!(printed.contains(&format!("removed   /{gone}")), "{printed}");
    }
    assert_eq!(read(&config), "# edited by the user\n");
    assert!(state.join("outbox.db").exists());

    run_script("uninstall.sh", root, &["--purge"]);
    assert!(!root.join("etc/fieldmq").exists());
    assert!(!state.exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

// --- the notify protocol -------------------------------------------------------------------

/// MQTT 3.1.1 CONNECT (clean session, keep-alive 30 s, client id "deploy-test") and the
/// CONNACK that accepts it: proof that READY=1 came from a broker that serves clients.
fn mqtt_connect_is_accepted(port: u16) -> Result<(), String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let client_id = b"deploy-test";
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    variable.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    variable.extend_from_slice(client_id);
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend_from_slice(&variable);
    stream
        .write_all(&packet)
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .map_err(|e| format!("read CONNACK: {e}"))?;
    if connack == [0x20, 0x02, 0x00, 0x00] {
        Ok(())
    } else {
        Err(format!("unexpected CONNACK {connack:02x?}"))
    }
}

#[test]
fn gateway_speaks_the_systemd_notify_protocol() {
    const WATCHDOG_USEC: u64 = 200_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let config = gateway::write_config(dir.path(), &dir.path().join("data"), "");
    let watchdog_usec = WATCHDOG_USEC.to_string();
    let mut gateway = GatewayProcess::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("UTF-8 path")),
            ("WATCHDOG_USEC", &watchdog_usec),
        ],
    );
    let port = gateway.addr.port();
    let context = |gateway: &GatewayProcess| {
        format!(
            "log:\n{}",
            gateway.log.try_iter().collect::<Vec<_>>().join("\n")
        )
    };

    // Every datagram, with the time it arrived, until `until` says stop or the deadline passes.
    let recv = |deadline: Instant| -> Option<(Instant, String)> {
        let left = deadline.checked_duration_since(Instant::now())?;
        manager
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = manager.recv(&mut buf).ok()?;
        Some((
            Instant::now(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ))
    };
    let mut received: Vec<(Instant, String)> = Vec::new();

    // 1. READY=1, and by then the broker answers MQTT.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready_at = loop {
        match recv(deadline) {
            Some((at, message)) => {
                let is_ready = message.lines().any(|l| l == "READY=1");
                received.push((at, message));
                if is_ready {
                    break at;
                }
            }
            None => panic!(
                "no READY=1 within 60 s; got {:?}\n{}",
                received.iter().map(|(_, m)| m).collect::<Vec<_>>(),
                context(&gateway)
            ),
        }
    };
    if let Err(e) = mqtt_connect_is_accepted(port) {
        panic!(
            "READY=1 was sent but the broker does not serve: {e}\n{}",
            context(&gateway)
        );
    }

    // 2. WATCHDOG=1 every WATCHDOG_USEC/2, so never a gap systemd would punish.
    let window = Duration::from_secs(2);
    let deadline = ready_at + window;
    while let Some(message) = recv(deadline) {
        received.push(message);
    }
    let pings: Vec<Instant> = received
        .iter()
        .filter(|(at, m)| *at >= ready_at && m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    // One every half interval: 20 in the window. A tenth fewer allows for a late tick on a
    // busy machine; a ping every 60 % of the interval or slower would be 16 or fewer.
    let expected = (window.as_micros() as u64 / (WATCHDOG_USEC / 2)) as usize;
    assert!(
        (expected * 9 / 10..=expected + 1).contains(&pings.len()),
        "{} WATCHDOG=1 in {window:?}, expected {expected} (one every {} µs)\n{}",
        pings.len(),
        WATCHDOG_USEC / 2,
        context(&gateway)
    );
    let longest_gap = pings
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest_gap < Duration::from_micros(WATCHDOG_USEC),
        "a {longest_gap:?} gap between WATCHDOG=1 pings would have had systemd kill the gateway"
    );
    assert!(
        received
            .iter()
            .any(|(_, m)| m.lines().any(|l| l.starts_with("STATUS="))),
        "expected a STATUS= line for `systemctl status`; got {:?}",
        received.iter().map(|(_, m)| m).collect::<Vec<_>>()
    );

    // 3. SIGTERM: STOPPING=1, then a clean exit within the gateway's own deadline.
    gateway.request_stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut stopping = false;
    while let Some((_, message)) = recv(deadline) {
        if message.lines().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(
        stopping,
        "no STOPPING=1 after SIGTERM\n{}",
        context(&gateway)
    );
    let exit = loop {
        if let Some(exit) = gateway.exit_status() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "still running 15 s after SIGTERM\n{}",
            context(&gateway)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        exit.success(),
        "exit {exit} after SIGTERM\n{}",
        context(&gateway)
    );
}
