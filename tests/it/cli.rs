//! The operator's command line, run as the real binary:
//!
//! - `fieldmq run` starts its log with a line naming the version, the configuration file and
//!   the data directory, then one line per listener; `-q` keeps only warnings and errors,
//!   `-v` adds debug lines, `RUST_LOG` wins over both, and `--log-format json` writes one
//!   JSON object a line with `level` and `message`;
//! - `fieldmq passwd` without a password asks twice on a terminal (a pty this test owns as
//!   the child's controlling terminal) without echoing what is typed, refuses two different
//!   answers, leaves the terminal echoing after Ctrl-C, and reads one line from standard
//!   input when that is a pipe;
//! - a listen address another socket holds fails the start with the address, the listener's
//!   place in the configuration and what to do about it.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::gateway;

const LIMIT: Duration = Duration::from_secs(20);

/// `fieldmq args...` to completion (bounded): (exit code, stdout, stderr).
fn fieldmq(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    gateway::run_within(&args, envs, LIMIT)
}

// --- the log of `fieldmq run` ------------------------------------------------------------

/// A config with its data in `dir/data`, anonymous clients and the listeners `binds`
/// (`(address, websocket)`), each on its own `[[broker.listeners]]`.
fn config_with_listeners(dir: &Path, binds: &[(&str, bool)]) -> PathBuf {
    let mut text = format!(
        "[gateway]\nid = \"cli\"\ndata_dir = \"{}\"\n\n[broker]\nallow_anonymous = true\n",
        dir.join("data").display()
    );
    for (bind, websocket) in binds {
        text.push_str(&format!(
            "\n[[broker.listeners]]\nbind = \"{bind}\"\nwebsocket = {websocket}\n"
        ));
    }
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `fieldmq run` with its standard error read line by line; killed when dropped.
struct Logged {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Logged {
    /// Start `fieldmq args...` with no `RUST_LOG` unless `envs` sets one.
    fn start(args: &[&OsStr], envs: &[(&str, &str)]) -> Logged {
        Logged::start_in(&std::env::temp_dir(), args, envs)
    }

    /// [`Logged::start`] in the working directory `dir`.
    fn start_in(dir: &Path, args: &[&OsStr], envs: &[(&str, &str)]) -> Logged {
        let mut child = Command::new(gateway::binary())
            .current_dir(dir)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fieldmq");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Logged {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Read lines until `count` of them satisfy `wanted` (bounded); all lines read so far.
    fn wait_for(&mut self, count: usize, wanted: impl Fn(&str) -> bool) -> &[String] {
        let deadline = Instant::now() + LIMIT;
        while self.seen.iter().filter(|l| wanted(l)).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "fewer than {count} wanted log lines within {LIMIT:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
        &self.seen
    }

    /// SIGTERM, wait for the exit (bounded) and return every line it wrote.
    fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "fieldmq exited with {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fieldmq still running after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The reader thread ends at the pipe's end, after the last line.
        while let Ok(line) = self.lines.recv_timeout(LIMIT) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in a text log line's `addr=` field.
fn addr_field(line: &str) -> Option<std::net::SocketAddr> {
    line.split("addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn the_first_log_lines_name_version_config_data_dir_and_every_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        config_with_listeners(dir.path(), &[("127.0.0.1:0", false), ("127.0.0.2:0", true)]);
    let mut gateway = Logged::start(&["run".as_ref(), "-c".as_ref(), config.as_os_str()], &[]);
    let lines = gateway
        .wait_for(2, |l| l.contains("MQTT listener ready"))
        .to_vec();

    let first = &lines[0];
    assert!(
        first.contains("INFO") && first.contains("starting fieldmq"),
        "{first}"
    );
    assert!(
        first.contains(&format!("version={}", env!("CARGO_PKG_VERSION"))),
        "{first}"
    );
    assert!(
        first.contains(&format!("config={}", config.display())),
        "{first}"
    );
    assert!(
        first.contains(&format!("data_dir={}", dir.path().join("data").display())),
        "{first}"
    );
    let listeners: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("MQTT listener ready"))
        .collect();
    assert!(listeners[0].contains("transport=tcp"), "{}", listeners[0]);
    assert!(
        listeners[1].contains("transport=websocket"),
        "{}",
        listeners[1]
    );
    let addrs: Vec<_> = listeners.iter().map(|l| addr_field(l)).collect();
    assert!(
        addrs.iter().all(|a| a.is_some_and(|a| a.port() != 0)),
        "each listener line names its bound address: {listeners:?}"
    );
    assert_ne!(addrs[0], addrs[1]);
    // "First": nothing but the start-up story comes before the last listener line.
    assert!(
        lines.len() <= 6,
        "the start-up lines come first:\n{}",
        lines.join("\n")
    );
    gateway.stop();
}

#[test]
fn the_embedded_demo_is_named_as_such_in_the_first_line() {
    // The demo listens on 127.0.0.1:1883, which another program may hold; the first line is
    // written before the broker binds, so it is there either way.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gateway = Logged::start_in(dir.path(), &["run".as_ref()], &[]);
    let first = gateway.wait_for(1, |_| true)[0].clone();
    assert!(first.contains("starting fieldmq"), "{first}");
    assert!(first.contains("config=embedded demo"), "{first}");
    assert!(
        first.contains(&format!(
            "data_dir={}",
            dir.path().join("fieldmq-data").display()
        )),
        "the data directory as an absolute path: {first}"
    );
}

#[test]
fn quiet_hides_the_info_start_lines_and_keeps_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A password file every user may read: `run` warns about it at start.
    let passwd = dir.path().join("passwd");
    let (code, line, stderr) = fieldmq(&["passwd", "alice", "s3cret"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::write(&passwd, line).expect("write passwd");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = gateway::write_config(
        dir.path(),
        &dir.path().join("data"),
        &format!("password_file = \"{}\"", passwd.display()),
    );
    let mut gateway = Logged::start(
        &[
            "run".as_ref(),
            "-q".as_ref(),
            "-c".as_ref(),
            config.as_os_str(),
        ],
        &[],
    );
    gateway.wait_for(1, |l| {
        l.contains("WARN") && l.contains("readable by every user")
    });
    // Started when its control socket exists (created after the listeners are bound).
    let socket = fieldmq::service::control::socket_path(&dir.path().join("data"));
    let deadline = Instant::now() + LIMIT;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no control socket within {LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = gateway.stop();
    let info: Vec<&String> = lines.iter().filter(|l| l.contains("INFO")).collect();
    assert!(info.is_empty(), "-q shows no info lines: {info:?}");
    assert!(
        lines.iter().all(|l| !l.contains("starting fieldmq")),
        "{lines:?}"
    );
}

#[test]
fn rust_log_wins_over_quiet_and_verbose_adds_debug_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway::write_config(dir.path(), &dir.path().join("data"), "");
    let args = |flag: &'static str| -> Vec<std::ffi::OsString> {
        vec![
            "run".into(),
            flag.into(),
            "-c".into(),
            config.clone().into(),
        ]
    };

    let quiet = args("-q");
    let quiet: Vec<&OsStr> = quiet.iter().map(|a| a.as_os_str()).collect();
    let mut gateway = Logged::start(&quiet, &[("RUST_LOG", "info")]);
    gateway.wait_for(1, |l| l.contains("starting fieldmq"));
    gateway.wait_for(1, |l| l.contains("MQTT listener ready"));
    gateway.stop();

    let verbose = args("-v");
    let verbose: Vec<&OsStr> = verbose.iter().map(|a| a.as_os_str()).collect();
    let mut gateway = Logged::start(&verbose, &[]);
    let lines = gateway
        .wait_for(1, |l| l.contains("MQTT listener ready"))
        .to_vec();
    gateway.stop();
    assert!(
        lines.iter().any(|l| l.contains("DEBUG")),
        "-v shows debug lines:\n{}",
        lines.join("\n")
    );
}

#[test]
fn json_log_lines_parse_and_carry_level_and_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway::write_config(dir.path(), &dir.path().join("data"), "");
    let mut gateway = Logged::start(
        &[
            "run".as_ref(),
            "--log-format".as_ref(),
            "json".as_ref(),
            "-c".as_ref(),
            config.as_os_str(),
        ],
        &[],
    );
    gateway.wait_for(1, |l| l.contains("\"MQTT listener ready\""));
    let lines = gateway.stop();
    assert!(lines.len() >= 3, "{lines:?}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    for event in &events {
        assert!(event["level"].is_string(), "{event}");
        assert!(event["message"].is_string(), "{event}");
    }
    let first = &events[0];
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["message"], "starting fieldmq");
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(first["config"], config.display().to_string());
    let ready = events
        .iter()
        .find(|e| e["message"] == "MQTT listener ready")
        .expect("a listener event");
    let addr: std::net::SocketAddr = ready["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("addr is an address");
    assert_ne!(addr.port(), 0);
    assert!(
        events.iter().any(|e| e["message"] == "stopped"),
        "{lines:?}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_with_the_choices() {
    let (code, _, stderr) = fieldmq(&["run", "--log-format", "xml"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("text") && stderr.contains("json"),
        "{stderr}"
    );
}

// --- passwd --------------------------------------------------------------------------------

/// Whether `line` is a password file line for `user` that accepts `password`.
fn accepts(line: &str, user: &str, password: &str) -> bool {
    let file = fieldmq::broker::PasswordFile::parse(line).expect("a password file line");
    file.verify(user, password)
}

/// `fieldmq passwd user` with `input` piped to its standard input (bounded).
fn passwd_piped(user: &str, input: &[u8]) -> (Option<i32>, String, String) {
    let mut child = Command::new(gateway::binary())
        .args(["passwd", user])
        .env_remove("FIELDMQ_NEW_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fieldmq");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // The child reads only what it needs; a write it refuses to take ends with EPIPE.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let output = match done_rx.recv_timeout(LIMIT) {
        Ok(output) => output.expect("wait for fieldmq"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("fieldmq passwd still running after {LIMIT:?}");
        }
    };
    let _ = writer.join();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn passwd_reads_one_line_from_piped_stdin() {
    let (code, stdout, stderr) = passwd_piped(
        "ünïcode",
        " pässwörd with spaces \r\nnext line\n".as_bytes(),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let line = stdout.trim_end();
    assert!(line.starts_with("ünïcode:$7$"), "{line}");
    assert!(accepts(line, "ünïcode", " pässwörd with spaces "));
    assert!(!accepts(line, "ünïcode", "next line"));
    assert!(
        stderr.is_empty(),
        "no prompt when stdin is a pipe: {stderr:?}"
    );
}

#[test]
fn passwd_refuses_empty_missing_oversized_and_non_utf8_piped_input() {
    let cases: [(&[u8], &str); 4] = [
        (b"\n", "empty"),
        (b"", "no password on standard input"),
        (&[b'x'; 70_000], "longer than 65535 bytes"),
        (b"\xff\xfe\n", "not UTF-8"),
    ];
    for (input, says) in cases {
        let (code, stdout, stderr) = passwd_piped("alice", input);
        assert_eq!(code, Some(1), "{says}: {stderr}");
        assert!(stdout.is_empty(), "{says}: nothing printed: {stdout:?}");
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}

/// A pty pair: (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two descriptors into the given ints; the name, termios and
    // window size pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are open and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Whether the terminal `fd` echoes what is typed.
fn echoes(fd: &OwnedFd) -> bool {
    // SAFETY: termios is plain data; tcgetattr fills it for an open terminal descriptor.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) };
    assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
    termios.c_lflag & libc::ECHO != 0
}

/// What `fieldmq passwd` did on a terminal.
struct OnTerminal {
    code: Option<i32>,
    stdout: String,
    /// Everything the terminal showed.
    shown: String,
    /// Whether the terminal echoes again after the process ended.
    echoes_after: bool,
}

/// `fieldmq passwd user` on a terminal: each answer is typed, with a line end, once the prompt
/// shows and the terminal has stopped echoing.
fn passwd_on_a_terminal(user: &str, answers: &[&str]) -> OnTerminal {
    let (master, slave) = pty();
    let mut command = Command::new(gateway::binary());
    command
        .args(["passwd", user])
        .env_remove("FIELDMQ_NEW_PASSWORD")
        .stdin(Stdio::from(slave.try_clone().expect("dup slave")))
        .stderr(Stdio::from(slave.try_clone().expect("dup slave")))
        .stdout(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec. The child gets a session of
    // its own with the pty as its controlling terminal (/dev/tty), as in a login shell.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start fieldmq");

    let shown = Arc::new(Mutex::new(Vec::new()));
    let mut reader = std::fs::File::from(master.try_clone().expect("dup master"));
    let sink = shown.clone();
    // Ends with EIO once every slave descriptor is closed (the child's and ours).
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            sink.lock().expect("lock").extend_from_slice(&buf[..n]);
        }
    });
    let screen = || String::from_utf8_lossy(&shown.lock().expect("lock")).into_owned();
    let mut terminal = std::fs::File::from(master);
    let prompts = ["Password: ", "Reenter password: "];
    let deadline = Instant::now() + LIMIT;
    for (answer, prompt) in answers.iter().zip(prompts) {
        while !screen().contains(prompt) || echoes(&slave) {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no {prompt:?} with echo off within {LIMIT:?}; the terminal shows {:?}",
                screen()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        terminal
            .write_all(format!("{answer}\n").as_bytes())
            .expect("type on the terminal");
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "fieldmq passwd still running");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Let the reader take the last bytes (the error message) before the pty goes away.
    std::thread::sleep(Duration::from_millis(100));
    let echoes_after = echoes(&slave);
    drop(slave);
    OnTerminal {
        code: status.code(),
        stdout,
        shown: screen(),
        echoes_after,
    }
}

#[test]
fn passwd_asks_twice_on_a_terminal_without_echoing_the_password() {
    let password = "typed-pässwörd";
    let OnTerminal {
        code,
        stdout,
        shown,
        echoes_after,
    } = passwd_on_a_terminal("alice", &[password, password]);
    assert_eq!(code, Some(0), "the terminal showed {shown:?}");
    assert!(echoes_after, "the terminal echoes again afterwards");
    assert!(shown.contains("Password: "), "{shown:?}");
    assert!(shown.contains("Reenter password: "), "{shown:?}");
    assert!(
        !shown.contains(password),
        "the password was echoed: {shown:?}"
    );
    assert!(accepts(stdout.trim_end(), "alice", password), "{stdout}");
}

#[test]
fn passwd_on_a_terminal_refuses_two_different_answers_and_an_empty_one() {
    let OnTerminal {
        code,
        stdout,
        shown,
        ..
    } = passwd_on_a_terminal("alice", &["first-answer", "second-answer"]);
    assert_eq!(code, Some(1), "{shown:?}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(shown.contains("do not match"), "{shown:?}");
    assert!(!shown.contains("first-answer"), "{shown:?}");

    let OnTerminal {
        code,
        stdout,
        shown,
        ..
    } = passwd_on_a_terminal("alice", &[""]);
    assert_eq!(code, Some(1), "{shown:?}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(shown.contains("empty"), "{shown:?}");
    assert!(!shown.contains("Reenter"), "not asked again: {shown:?}");
}

#[test]
fn ctrl_c_at_the_password_prompt_exits_130_and_leaves_the_terminal_echoing() {
    let OnTerminal {
        code,
        stdout,
        shown,
        echoes_after,
    } = passwd_on_a_terminal("alice", &["half\u{3}"]);
    assert_eq!(code, Some(130), "{shown:?}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(shown.contains("interrupted"), "{shown:?}");
    assert!(!shown.contains("half"), "{shown:?}");
    assert!(echoes_after, "the terminal echoes again after Ctrl-C");
}

// --- a listen address in use -------------------------------------------------------------

#[test]
fn a_listen_address_in_use_names_it_and_suggests_stopping_mosquitto_or_changing_bind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let held = holder.local_addr().expect("held address").to_string();
    // The second listener is the one that cannot start.
    let config = config_with_listeners(dir.path(), &[("127.0.0.1:0", false), (&held, false)]);
    let (code, stdout, stderr) = fieldmq(&["run", "-c", &config.display().to_string()], &[]);
    assert_eq!(code, Some(1), "a start failure: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(&format!("cannot listen on {held} (broker.listeners[1])")),
        "{stderr}"
    );
    assert!(stderr.contains("sudo systemctl stop mosquitto"), "{stderr}");
    assert!(
        stderr.contains("change `bind` in broker.listeners[1]"),
        "{stderr}"
    );
    drop(holder);
}
