//! Live reload against the real binary: `fieldmq reload` and SIGHUP apply a changed file
//! without dropping LAN clients, untouched devices or an uplink's cloud connection; an
//! invalid file or a key that cannot change is refused and changes nothing; a rotated
//! listener certificate is served to the next client; an ACL change holds connected
//! clients from their next publish.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::cloud::{mosquitto_available, Cloud, CloudOptions};
use crate::util::gateway::{self, GatewayProcess};
use crate::util::mqtt::{packet, Frame, Raw, Received, Version};
use crate::util::{free_port, pki};

/// The most a test waits for one expected event.
const WAIT: Duration = Duration::from_secs(15);

/// A simulated device publishing `value` on `test/<name>/p` every 100 ms.
fn device(name: &str, value: f64) -> String {
    format!(
        "[[devices]]\nname = \"{name}\"\ndriver = \"simulated\"\npoll = \"100ms\"\npayload = \"plain\"\n\
         points = [{{ name = \"p\", waveform = \"constant\", value = {value:?} }}]\n"
    )
}

/// A gateway with its data in `data` and one anonymous listener on an ephemeral port,
/// then `rest` (devices, more tables).
fn gateway_file(data: &Path, broker_lines: &str, rest: &str) -> String {
    format!(
        "[gateway]\nid = \"test\"\ndata_dir = \"{}\"\n\n[broker]\nallow_anonymous = true\n{broker_lines}\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\n{rest}",
        data.display()
    )
}

/// `fieldmq reload -c config`: (exit code, stdout, stderr), bounded in time.
fn reload(config: &Path) -> (Option<i32>, String, String) {
    gateway::run_within(
        &["reload".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        WAIT,
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config");
}

/// A LAN client on one TCP connection, subscribed to `filter`.
async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> Raw {
    let mut raw = Raw::connected(addr, &packet::Connect::v311(id)).await;
    raw.send(&packet::subscribe(false, 1, &[(filter, 0)])).await;
    let suback = next(&mut raw).await;
    assert_eq!(suback.kind(), 9, "expected SUBACK, got {suback:?}");
    raw
}

/// The next packet within [`WAIT`]; the connection must stay open.
async fn next(raw: &mut Raw) -> Frame {
    tokio::time::timeout(WAIT, raw.recv())
        .await
        .expect("a packet in time")
        .expect("the connection stays open")
}

/// Publications seen on one connection, with when they arrived.
struct Seen {
    messages: Vec<(Instant, Received)>,
}

impl Seen {
    fn payloads_of(&self, topic: &str) -> Vec<String> {
        self.messages
            .iter()
            .filter(|(_, m)| m.topic == topic)
            .map(|(_, m)| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    /// The longest time between two publications on `topic`.
    fn longest_gap(&self, topic: &str) -> Duration {
        let times: Vec<Instant> = self
            .messages
            .iter()
            .filter(|(_, m)| m.topic == topic)
            .map(|(t, _)| *t)
            .collect();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

/// Read publications until `done` says so (at most [`WAIT`]); any packet but PUBLISH
/// (a second CONNACK, a DISCONNECT) fails the test, and so does a closed connection.
async fn read_until(raw: &mut Raw, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done(seen) {
        assert!(Instant::now() < deadline, "not seen in time");
        let frame = next(raw).await;
        assert_eq!(frame.kind(), 3, "only PUBLISH expected, got {frame:?}");
        let (message, _) = frame.publish(Version::V311);
        seen.messages.push((Instant::now(), message));
    }
}

fn wait_for_log(gateway: &GatewayProcess, needle: &str) -> String {
    let mut said = String::new();
    let deadline = Instant::now() + WAIT;
    while !said.contains(needle) {
        assert!(
            Instant::now() < deadline,
            "log never said {needle:?}:\n{said}"
        );
        if let Ok(line) = gateway.log.recv_timeout(Duration::from_millis(100)) {
            said.push_str(&line);
            said.push('\n');
        }
    }
    said
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    data: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = dir.path().join("fieldmq.toml");
    Setup {
        config,
        data,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_lan_client_keeps_its_connection_across_a_reload_that_adds_and_changes_devices() {
    let s = setup();
    let devices = format!("{}{}", device("steady", 1.5), device("changing", 2.5));
    write(&s.config, &gateway_file(&s.data, "", &devices));
    let mut gateway = GatewayProcess::start(&s.config);
    let mut raw = subscriber(gateway.addr, "lan", "test/#").await;
    let mut seen = Seen {
        messages: Vec::new(),
    };
    read_until(&mut raw, &mut seen, |s| {
        !s.payloads_of("test/changing/p").is_empty() && s.payloads_of("test/steady/p").len() >= 3
    })
    .await;

    let devices = format!(
        "{}{}{}",
        device("steady", 1.5),
        device("changing", 7.5),
        device("added", 3.5)
    );
    write(&s.config, &gateway_file(&s.data, "", &devices));
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("device added: added"), "{stdout}");
    assert!(stdout.contains("device changing: restarted"), "{stdout}");
    assert!(!stdout.contains("steady"), "{stdout}");

    read_until(&mut raw, &mut seen, |s| {
        !s.payloads_of("test/added/p").is_empty()
            && s.payloads_of("test/changing/p").iter().any(|p| p == "7.5")
    })
    .await;
    // A little longer, to see the steady device go on after the reload.
    let settle = Instant::now() + Duration::from_millis(600);
    read_until(&mut raw, &mut seen, |_| Instant::now() >= settle).await;
    let gap = seen.longest_gap("test/steady/p");
    assert!(
        gap < Duration::from_millis(600),
        "the untouched device paused for {gap:?} (it publishes every 100 ms)"
    );
    gateway.terminate();
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_the_report_names_the_error_and_line() {
    let s = setup();
    let good = gateway_file(&s.data, "", &device("steady", 1.5));
    write(&s.config, &good);
    let mut gateway = GatewayProcess::start(&s.config);
    let mut raw = subscriber(gateway.addr, "lan", "test/#").await;

    // Line 7 holds the unknown key; the device table after it changes too, and must not
    // be applied.
    let bad = good
        .replacen(
            "allow_anonymous = true\n",
            "allow_anonymous = true\nbogus = 1\n",
            1,
        )
        .replace("value = 1.5", "value = 9.5");
    write(&s.config, &bad);
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let file = s.config.display().to_string();
    assert!(
        stderr.contains(&format!("{file}:7")) && stderr.contains("bogus"),
        "the report names the file, line and key: {stderr}"
    );
    let mut seen = Seen {
        messages: Vec::new(),
    };
    read_until(&mut raw, &mut seen, |s| {
        s.payloads_of("test/steady/p").len() >= 5
    })
    .await;
    assert!(
        seen.payloads_of("test/steady/p").iter().all(|p| p == "1.5"),
        "nothing of the invalid file is applied: {:?}",
        seen.payloads_of("test/steady/p")
    );
    assert!(gateway.is_running());
    gateway.terminate();
}

#[test]
fn a_key_that_cannot_change_live_is_refused_by_name() {
    let s = setup();
    write(
        &s.config,
        &gateway_file(&s.data, "", &device("steady", 1.5)),
    );
    let mut gateway = GatewayProcess::start(&s.config);
    let moved = s.data.with_file_name("elsewhere");
    let text = gateway_file(&moved, "", &device("steady", 1.5));
    write(&s.config, &text);
    // `fieldmq reload` finds the running gateway through the data directory in the file:
    // name the old one so it can ask.
    let ask = s.config.with_file_name("ask.toml");
    write(&ask, &gateway_file(&s.data, "", ""));
    let (code, stdout, stderr) = reload(&ask);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr
            .contains("gateway.data_dir cannot change while the gateway runs; restart to apply it"),
        "{stderr}"
    );
    assert!(gateway.is_running());
    gateway.terminate();
}

#[test]
fn fieldmq_reload_exits_2_when_no_gateway_answers() {
    let s = setup();
    write(&s.config, &gateway_file(&s.data, "", ""));
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("no gateway answers"), "{stderr}");
}

#[tokio::test]
async fn sighup_outside_systemd_reloads_and_keeps_the_process_running() {
    let s = setup();
    write(
        &s.config,
        &gateway_file(&s.data, "", &device("steady", 1.5)),
    );
    let mut gateway = GatewayProcess::start(&s.config);
    let mut raw = subscriber(gateway.addr, "lan", "test/#").await;
    write(
        &s.config,
        &gateway_file(
            &s.data,
            "",
            &format!("{}{}", device("steady", 1.5), device("more", 2.5)),
        ),
    );
    gateway.hangup();
    wait_for_log(&gateway, "device more: added");
    let mut seen = Seen {
        messages: Vec::new(),
    };
    read_until(&mut raw, &mut seen, |s| {
        !s.payloads_of("test/more/p").is_empty()
    })
    .await;
    assert!(gateway.is_running(), "SIGHUP must not stop the gateway");
    // A new client is served too.
    let _other = subscriber(gateway.addr, "after-hup", "test/#").await;
    gateway.terminate();
}

#[tokio::test]
async fn a_reload_storm_leaves_the_gateway_running_on_the_last_file() {
    let s = setup();
    write(
        &s.config,
        &gateway_file(&s.data, "", &device("steady", 1.5)),
    );
    let mut gateway = GatewayProcess::start(&s.config);
    for round in 0..20 {
        let extra = if round % 2 == 0 {
            device("flicker", f64::from(round) + 0.5)
        } else {
            String::new()
        };
        write(
            &s.config,
            &gateway_file(&s.data, "", &format!("{}{extra}", device("steady", 1.5))),
        );
        gateway.hangup();
    }
    write(
        &s.config,
        &gateway_file(
            &s.data,
            "",
            &format!("{}{}", device("steady", 1.5), device("last", 4.5)),
        ),
    );
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(gateway.is_running());
    let mut raw = subscriber(gateway.addr, "lan", "test/#").await;
    let mut seen = Seen {
        messages: Vec::new(),
    };
    read_until(&mut raw, &mut seen, |s| {
        s.payloads_of("test/last/p").len() >= 3 && s.payloads_of("test/steady/p").len() >= 3
    })
    .await;
    // No device of an earlier file is left running.
    let settle = Instant::now() + Duration::from_millis(500);
    read_until(&mut raw, &mut seen, |_| Instant::now() >= settle).await;
    assert!(
        seen.payloads_of("test/flicker/p").is_empty(),
        "a removed device still publishes"
    );
    gateway.terminate();
}

#[tokio::test]
async fn an_acl_change_applies_to_a_connected_clients_next_publish() {
    let s = setup();
    let acl = s.config.with_file_name("acl");
    write(&acl, "topic readwrite open/#\n");
    let broker = format!("acl_file = \"{}\"", acl.display());
    write(&s.config, &gateway_file(&s.data, &broker, ""));
    let mut gateway = GatewayProcess::start(&s.config);
    let mut watcher = subscriber(gateway.addr, "watcher", "open/#").await;
    let mut publisher = Raw::connected(gateway.addr, &packet::Connect::v311("publisher")).await;

    publisher
        .send(&packet::publish(false, b"open/a", 0, false, 0, b"before"))
        .await;
    let (first, _) = next(&mut watcher).await.publish(Version::V311);
    assert_eq!(first.payload, b"before");

    // Writing to open/# is no longer allowed; reading it still is.
    write(&acl, "topic read open/#\n");
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("acl: reloaded"), "{stdout}");
    publisher
        .send(&packet::publish(false, b"open/a", 0, false, 0, b"after"))
        .await;
    // The ping barrier: whatever the broker would deliver for the denied publish is sent
    // before the second PINGRESP.
    publisher.until_ping_barrier().await;
    let delivered = watcher.until_ping_barrier().await;
    assert!(
        delivered.iter().all(|f| f.kind() != 3),
        "the denied publish was delivered: {delivered:?}"
    );
    gateway.terminate();
}

#[tokio::test]
async fn a_rotated_listener_certificate_is_served_to_the_next_client_while_an_open_one_stays() {
    use tokio_rustls::TlsConnector;

    let s = setup();
    let dir = s.config.parent().expect("dir").to_path_buf();
    let ca = pki::Ca::new("rotation CA");
    let first = ca.server("localhost");
    let cert = pki::write_pem(&dir, "server.pem", &first.cert);
    let key = pki::write_pem(&dir, "server.key", &first.key);
    let tls_port = free_port();
    let rest = format!(
        "[[broker.listeners]]\nbind = \"127.0.0.1:{tls_port}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    write(&s.config, &gateway_file(&s.data, "", &rest));
    let mut gateway = GatewayProcess::start(&s.config);
    let tls_addr: SocketAddr = ([127, 0, 0, 1], tls_port).into();
    let connector = TlsConnector::from(pki::client_trusting(&ca.pem, None));

    let handshake = |connector: TlsConnector| async move {
        let tcp = tokio::net::TcpStream::connect(tls_addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        connector.connect(name, tcp).await.expect("TLS handshake")
    };
    let served = |stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        stream
            .get_ref()
            .1
            .peer_certificates()
            .expect("a certificate")[0]
            .clone()
    };
    let mut open = handshake(connector.clone()).await;
    assert_eq!(served(&open), pki::certs(&first.cert)[0]);
    mqtt_round_trip(&mut open, "open-before").await;

    let second = ca.server("localhost");
    pki::write_pem(&dir, "server.pem", &second.cert);
    pki::write_pem(&dir, "server.key", &second.key);
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "listener 127.0.0.1:{tls_port}: certificate reloaded"
        )),
        "{stdout}"
    );

    let mut next_client = handshake(connector).await;
    assert_eq!(served(&next_client), pki::certs(&second.cert)[0]);
    mqtt_round_trip(&mut next_client, "next").await;
    // The open connection still answers on its first session.
    ping(&mut open).await;
    gateway.terminate();
}

/// CONNECT and CONNACK over `stream`.
async fn mqtt_round_trip<S>(stream: &mut S, id: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(&packet::Connect::v311(id).encode())
        .await
        .expect("send CONNECT");
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
}

/// PINGREQ answered by PINGRESP on `stream`.
async fn ping<S>(stream: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(&packet::pingreq())
        .await
        .expect("send PINGREQ");
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut pong))
        .await
        .expect("PINGRESP in time")
        .expect("PINGRESP: the connection is still open");
    assert_eq!(pong, [0xD0, 0]);
}

#[tokio::test]
async fn an_uplinks_cloud_connection_stays_when_only_a_device_changes() {
    if !mosquitto_available("an_uplinks_cloud_connection_stays_when_only_a_device_changes") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let s = setup();
    let uplink = format!(
        "[[uplinks]]\nname = \"cloud\"\nurl = \"mqtt://{}\"\nroutes = [ {{ out = \"test/#\", remote_prefix = \"site/\" }} ]\n",
        cloud.addr()
    );
    write(
        &s.config,
        &gateway_file(&s.data, "", &format!("{}{uplink}", device("steady", 1.5))),
    );
    let mut gateway = GatewayProcess::start(&s.config);
    let connections = || cloud.log().matches("New client connected").count();
    let deadline = Instant::now() + WAIT;
    while connections() < 1 {
        assert!(
            Instant::now() < deadline,
            "the uplink never connected: {}",
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    write(
        &s.config,
        &gateway_file(&s.data, "", &format!("{}{uplink}", device("steady", 5.5))),
    );
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("device steady: restarted"), "{stdout}");
    assert!(!stdout.contains("uplink"), "{stdout}");

    // The changed device's new readings reach the cloud on the same connection.
    let (code, out, err) = gateway::run_within(
        &[
            "sub".as_ref(),
            "--host".as_ref(),
            "127.0.0.1".as_ref(),
            "--port".as_ref(),
            cloud.port.to_string().as_ref(),
            "--count".as_ref(),
            "3".as_ref(),
            "site/steady/p".as_ref(),
        ],
        &[],
        WAIT,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("5.5"), "{out}");
    assert_eq!(
        connections(),
        2,
        "only the check's subscriber connected again: {}",
        cloud.log()
    );
    gateway.terminate();
}

#[tokio::test]
async fn a_reload_asked_during_shutdown_is_answered_stopping() {
    let s = setup();
    write(
        &s.config,
        &gateway_file(&s.data, "", &device("steady", 1.5)),
    );
    let config = fieldmq::service::config::load(&s.config).expect("valid");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = fieldmq::service::start(config, shutdown.clone())
        .await
        .expect("start");
    let reloader = running.reloader.clone();
    shutdown.cancel();
    assert_eq!(
        reloader.reload().await,
        Err(fieldmq::reload::ReloadError::Stopping)
    );
    running.stop().await;
    assert_eq!(
        reloader.reload().await,
        Err(fieldmq::reload::ReloadError::Stopping)
    );
}

#[tokio::test]
async fn a_listener_is_added_and_removed_without_dropping_clients_of_the_one_that_stays() {
    let s = setup();
    write(&s.config, &gateway_file(&s.data, "", ""));
    let mut gateway = GatewayProcess::start(&s.config);
    let mut stays = Raw::connected(gateway.addr, &packet::Connect::v311("stays")).await;

    let port = free_port();
    let second = format!("[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n");
    write(&s.config, &gateway_file(&s.data, "", &second));
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("listener 127.0.0.1:{port}: added")),
        "{stdout}"
    );
    let added: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut on_added = Raw::connected(added, &packet::Connect::v311("on-added")).await;
    ping_raw(&mut stays).await;

    write(&s.config, &gateway_file(&s.data, "", ""));
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("listener 127.0.0.1:{port}: removed")),
        "{stdout}"
    );
    // The removed listener's client is disconnected; the other one is not.
    tokio::time::timeout(WAIT, on_added.expect_closed())
        .await
        .expect("the removed listener's client is closed in time");
    ping_raw(&mut stays).await;
    assert!(
        tokio::net::TcpStream::connect(added).await.is_err(),
        "the removed listener still accepts"
    );
    gateway.terminate();
}

/// PINGREQ answered by PINGRESP on a [`Raw`] connection.
async fn ping_raw(raw: &mut Raw) {
    raw.send(&packet::pingreq()).await;
    let pong = next(raw).await;
    assert_eq!(pong.kind(), 13, "expected PINGRESP, got {pong:?}");
}

#[tokio::test]
async fn an_uplink_reconnects_with_its_rotated_client_certificate_and_keeps_its_config() {
    let test = "an_uplink_reconnects_with_its_rotated_client_certificate_and_keeps_its_config";
    if !mosquitto_available(test) {
        return;
    }
    let s = setup();
    let dir = s.config.parent().expect("dir").to_path_buf();
    let ca = pki::Ca::new("cloud CA");
    let server = ca.server("localhost");
    let first = ca.client("first-pi");
    let ca_file = pki::write_pem(&dir, "ca.pem", &ca.pem);
    let server_cert = pki::write_pem(&dir, "cloud.pem", &server.cert);
    let server_key = pki::write_pem(&dir, "cloud.key", &server.key);
    let cert = pki::write_pem(&dir, "client.pem", &first.cert);
    let key = pki::write_pem(&dir, "client.key", &first.key);
    let cloud = Cloud::start(CloudOptions {
        mtls: Some((
            crate::util::cloud::PathBufs {
                ca: ca_file.clone(),
                cert: server_cert,
                key: server_key,
            },
            true,
        )),
        extra: vec!["use_identity_as_username true".into()],
    });
    let tls_port = cloud.tls_port.expect("a TLS listener");
    let uplink = format!(
        "[[uplinks]]\nname = \"cloud\"\nurl = \"mqtts://127.0.0.1:{tls_port}\"\n\
         ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         routes = [ {{ out = \"test/#\", remote_prefix = \"site/\" }} ]\n",
        ca_file.display(),
        cert.display(),
        key.display()
    );
    write(&s.config, &gateway_file(&s.data, "", &uplink));
    let mut gateway = GatewayProcess::start(&s.config);
    let wait_for_cloud = |needle: &str| {
        let deadline = Instant::now() + WAIT;
        while !cloud.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "cloud never logged {needle:?}: {}",
                cloud.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_cloud("u'first-pi'");

    // Only the files change, not the configuration.
    let second = ca.client("second-pi");
    pki::write_pem(&dir, "client.pem", &second.cert);
    pki::write_pem(&dir, "client.key", &second.key);
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("uplink cloud: reconnected (its TLS files changed)"),
        "{stdout}"
    );
    wait_for_cloud("u'second-pi'");
    gateway.terminate();
}

#[tokio::test]
async fn a_changed_password_applies_to_the_next_connect_and_keeps_open_connections() {
    let s = setup();
    let passwords = s.config.with_file_name("passwd");
    let hash = |password: &str| {
        let (code, out, err) = gateway::run_to_end(&["passwd", "alice", password], None);
        assert_eq!(code, Some(0), "{err}");
        out
    };
    write(&passwords, &hash("first secret"));
    let text = gateway_file(&s.data, "", "").replace(
        "allow_anonymous = true",
        &format!(
            "allow_anonymous = false\npassword_file = \"{}\"",
            passwords.display()
        ),
    );
    write(&s.config, &text);
    let mut gateway = GatewayProcess::start(&s.config);
    let login = |id: &'static str, password: &'static str| packet::Connect {
        username: Some("alice"),
        password: Some(password),
        ..packet::Connect::v311(id)
    };
    let mut open = Raw::connected(gateway.addr, &login("open", "first secret")).await;

    write(&passwords, &hash("second secret"));
    let (code, stdout, stderr) = reload(&s.config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("password file: reloaded"), "{stdout}");

    let (_old, refused) = Raw::connect(gateway.addr, &login("old", "first secret")).await;
    assert_eq!(
        refused.connack().1,
        4,
        "the old password is refused: {refused:?}"
    );
    let (_new, accepted) = Raw::connect(gateway.addr, &login("new", "second secret")).await;
    assert_eq!(accepted.connack().1, 0, "the new password is accepted");
    ping_raw(&mut open).await;
    gateway.terminate();
}
