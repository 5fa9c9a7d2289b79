//! The tools built into the binary, run as processes against a running gateway:
//! `fieldmq passwd` makes the password file the gateway (and Mosquitto) accepts, `fieldmq
//! pub` publishes with the given QoS and retain flag and waits for the broker, `fieldmq sub`
//! prints `topic payload` lines and stops after `-n` messages or fails after `-W` without
//! one.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use gateway::GatewayProcess;

use crate::util::{cloud, gateway};

const LIMIT: Duration = Duration::from_secs(20);

/// `fieldmq args...` to completion (bounded): (exit code, stdout, stderr).
fn fieldmq(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    gateway::run_within(&args, envs, LIMIT)
}

/// A password file line for `user`, made by `fieldmq passwd`; the password from the
/// argument, or from FIELDMQ_NEW_PASSWORD when `from_env`.
fn passwd_line(user: &str, password: &str, from_env: bool) -> String {
    let (code, stdout, stderr) = if from_env {
        fieldmq(&["passwd", user], &[("FIELDMQ_NEW_PASSWORD", password)])
    } else {
        fieldmq(&["passwd", user, password], &[])
    };
    assert_eq!(code, Some(0), "fieldmq passwd: {stderr}");
    let line = stdout.trim_end().to_owned();
    assert!(
        line.starts_with(&format!("{user}:$7$")) && !line.contains('\n'),
        "one `{user}:$7$...` line: {stdout:?}"
    );
    assert!(!line.contains(password), "the password is not in the line");
    line
}

fn write_password_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("passwd");
    let lines = [
        passwd_line("alice", "s3cret", true),
        passwd_line("bob", "hunter2", false),
    ];
    std::fs::write(&path, lines.join("\n") + "\n").expect("write the password file");
    path
}

/// `fieldmq <command> -p <port> -u <user> -P <password> <rest>...` (bounded).
fn tool(
    command: &str,
    port: u16,
    user: &str,
    password: &str,
    rest: &[&str],
) -> (Option<i32>, String, String) {
    let port = port.to_string();
    let mut args = vec![command, "-p", &port, "-u", user, "-P", password];
    args.extend_from_slice(rest);
    fieldmq(&args, &[])
}

#[test]
fn passwd_pub_and_sub_work_against_a_gateway_that_requires_passwords() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passwd = write_password_file(dir.path());
    let config = gateway::write_config(
        dir.path(),
        &dir.path().join("data"),
        &format!("password_file = \"{}\"", passwd.display()),
    );
    // write_config allows anonymous clients; this gateway must not.
    let text = std::fs::read_to_string(&config)
        .expect("read config")
        .replace("allow_anonymous = true", "allow_anonymous = false");
    std::fs::write(&config, text).expect("write config");
    let mut gateway = GatewayProcess::start(&config);
    let port = gateway.addr.port();

    // A retained QoS 2 message from alice (password from FIELDMQ_NEW_PASSWORD's line).
    let (code, _, stderr) = tool(
        "pub",
        port,
        "alice",
        "s3cret",
        &["-q", "2", "-r", "tools/retained", "kept"],
    );
    assert_eq!(code, Some(0), "pub -q 2 -r: {stderr}");

    // sub -n 2: the retained message at once (so the subscription is in place), then one
    // published after it.
    let mut sub = Command::new(gateway::binary())
        .args(["sub", "-p", &port.to_string(), "-u", "bob", "-P", "hunter2"])
        .args([
            "-q",
            "1",
            "-n",
            "2",
            "-W",
            "10s",
            "tools/retained",
            "tools/live/#",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fieldmq sub");
    let (line_tx, lines) = std::sync::mpsc::channel();
    let stdout = sub.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("sub prints the retained message");
    assert_eq!(first, "tools/retained kept");
    let (code, _, stderr) = tool(
        "pub",
        port,
        "alice",
        "s3cret",
        &["-q", "1", "tools/live/a", "hello world"],
    );
    assert_eq!(code, Some(0), "pub -q 0: {stderr}");
    let second = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("sub prints the live message");
    assert_eq!(second, "tools/live/a hello world");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = sub.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sub -n 2 still running after two messages"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "sub -n 2 exits 0: {status}");
    assert!(
        lines.recv_timeout(Duration::from_millis(100)).is_err(),
        "nothing after the second message"
    );

    // A wrong password is refused, and said so.
    let (code, _, stderr) = tool("pub", port, "alice", "hunter2", &["tools/x", "no"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");

    // sub -W: nothing arrives, so it fails after the timeout with an error.
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = tool("sub", port, "bob", "hunter2", &["-W", "1s", "tools/silent"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("timed out after 1s"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(started.elapsed() >= Duration::from_secs(1));

    assert!(gateway.terminate().success());
}

/// `fieldmq passwd` writes Mosquitto's format: Mosquitto accepts the file as its own.
#[test]
fn mosquitto_accepts_a_password_file_made_by_fieldmq_passwd() {
    let test = "mosquitto_accepts_a_password_file_made_by_fieldmq_passwd";
    if !cloud::mosquitto_available(test) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let passwd = write_password_file(dir.path());
    let mosquitto = cloud::Cloud::start(cloud::CloudOptions {
        extra: vec![
            "allow_anonymous false".into(),
            format!("password_file {}", passwd.display()),
        ],
        ..cloud::CloudOptions::default()
    });
    let (code, _, stderr) = tool(
        "pub",
        mosquitto.port,
        "bob",
        "hunter2",
        &["-q", "1", "t", "accepted"],
    );
    assert_eq!(code, Some(0), "{stderr}\n{}", mosquitto.log());
    let (code, _, stderr) = tool(
        "pub",
        mosquitto.port,
        "bob",
        "s3cret",
        &["-q", "1", "t", "refused"],
    );
    assert_eq!(code, Some(1), "a wrong password: {stderr}");
}
