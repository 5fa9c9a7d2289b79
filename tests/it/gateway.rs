//! End to end: the real `fieldmq` binary with the demo configuration, watched by real MQTT
//! clients.

use gateway::GatewayProcess;

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use crate::util::gateway;

/// The demo config, moved to a free port and a temporary data directory.
fn demo_config(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
        .expect("read config/demo.toml");
    assert!(
        text.contains("127.0.0.1:1883"),
        "demo listens on 127.0.0.1:1883"
    );
    let text = text
        .replace("127.0.0.1:1883", "127.0.0.1:0")
        // The status page's port too: tests run side by side.
        .replace("127.0.0.1:8088", "127.0.0.1:0")
        .replace("poll = \"1s\"", "poll = \"100ms\"");
    let path = dir.join("demo.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn client(addr: SocketAddr, id: &str) -> (AsyncClient, rumqttc::v5::EventLoop) {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(10));
    AsyncClient::new(options, 100)
}

/// Poll until `want` accepts a publish (topic, payload, retain); bounded by `limit`.
async fn wait_for(
    eventloop: &mut rumqttc::v5::EventLoop,
    limit: Duration,
    mut want: impl FnMut(&str, &[u8], bool) -> bool,
) -> Option<(String, Vec<u8>, bool)> {
    // rumqttc reports a server DISCONNECT as an error and may still hold the packets that
    // came before it; poll on through a few errors (each bounded by `limit` overall).
    let mut errors = 0;
    tokio::time::timeout(limit, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if want(&topic, &p.payload, p.retain) {
                        return Some((topic, p.payload.to_vec(), p.retain));
                    }
                }
                Ok(_) => {}
                Err(_) if errors < 3 => errors += 1,
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_publishes_readings_accepts_a_write_and_says_offline_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = demo_config(dir.path());
    let mut gateway = GatewayProcess::start(&config);

    let (client, mut events) = client(gateway.addr, "e2e-watcher");
    let status_filter = Filter {
        path: "fieldmq/demo/status".into(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    client
        .subscribe_many([status_filter])
        .await
        .expect("subscribe status");
    client
        .subscribe("demo/sim/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe data");

    // The retained status says online.
    let online = wait_for(&mut events, Duration::from_secs(10), |t, p, r| {
        t == "fieldmq/demo/status" && p == b"online" && r
    })
    .await;
    assert!(online.is_some(), "retained `online` status");

    // A simulated reading arrives as JSON with value, time and quality.
    let (_, payload, _) = wait_for(&mut events, Duration::from_secs(10), |t, _, _| {
        t == "demo/sim/temperature"
    })
    .await
    .expect("a temperature reading");
    let reading: serde_json::Value = serde_json::from_slice(&payload).expect("JSON payload");
    let value = reading["value"].as_f64().expect("numeric value");
    assert!(
        (18.0..=24.0).contains(&value),
        "sine within its bounds: {value}"
    );
    assert_eq!(reading["quality"], "good");
    assert!(reading["ts"].as_str().is_some_and(|ts| ts.contains('T')));

    // A write to the writable point changes the simulated value.
    client
        .publish("demo/sim/setpoint/set", QoS::AtLeastOnce, false, "42.5")
        .await
        .expect("publish write");
    let result = wait_for(&mut events, Duration::from_secs(10), |t, _, _| {
        t == "demo/sim/setpoint/set/result"
    })
    .await
    .expect("a write result");
    let result: serde_json::Value = serde_json::from_slice(&result.1).expect("JSON result");
    assert_eq!(result["status"], "ok");
    let changed = wait_for(&mut events, Duration::from_secs(10), |t, p, _| {
        t == "demo/sim/setpoint"
            && serde_json::from_slice::<serde_json::Value>(p)
                .is_ok_and(|v| v["value"].as_f64() == Some(42.5))
    })
    .await;
    assert!(changed.is_some(), "the setpoint reads 42.5 after the write");

    // SIGTERM: exit 0, and `offline` goes out retained before the connection closes. A raw
    // client watches: rumqttc drops packets that arrive in the same read as the server's
    // DISCONNECT.
    let mut watcher = RawWatcher::connect(gateway.addr, "fieldmq/demo/status").await;
    assert_eq!(
        watcher.next_publish().await,
        Some(("online".to_owned(), true))
    );
    let terminator = tokio::task::spawn_blocking(move || {
        let status = gateway.terminate();
        (gateway, status)
    });
    let offline = watcher.next_publish().await;
    let (_gateway, status) = terminator.await.expect("join");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        offline,
        Some(("offline".to_owned(), true)),
        "retained `offline` on clean stop"
    );
}

/// A minimal MQTT 5 subscriber on raw packets (encoded and decoded by rumqttc's codec).
struct RawWatcher {
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl RawWatcher {
    async fn connect(addr: SocketAddr, filter: &str) -> RawWatcher {
        use rumqttc::v5::mqttbytes::v5::{Connect, Subscribe};
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut out = bytes::BytesMut::new();
        let connect = Connect {
            keep_alive: 30,
            client_id: "raw-watcher".into(),
            clean_start: true,
            properties: None,
        };
        Packet::Connect(connect, None, None)
            .write(&mut out, None)
            .expect("encode");
        let filter = Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: true,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![filter],
            properties: None,
        })
        .write(&mut out, None)
        .expect("encode");
        stream.write_all(&out).await.expect("send");
        RawWatcher {
            stream,
            buf: bytes::BytesMut::new(),
        }
    }

    /// The next PUBLISH as (payload, retain flag); `None` on close or after 10 s.
    async fn next_publish(&mut self) -> Option<(String, bool)> {
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match Packet::read(&mut self.buf, None) {
                    Ok(Packet::Publish(p)) => {
                        return Some((String::from_utf8_lossy(&p.payload).into_owned(), p.retain))
                    }
                    Ok(_) => continue,
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(_) => return None,
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

#[test]
fn version_prints_the_crate_version() {
    let (code, text, _) = gateway::run_to_end(&["--version"], None);
    assert_eq!(code, Some(0));
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
}

#[test]
fn a_bad_config_fails_to_start_with_exit_code_2_and_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[gateway]\nid = \"x\"\npoll = 3\n").expect("write");
    let (code, _, text) = gateway::run_to_end(&["run", "-c"], Some(&path));
    assert_eq!(code, Some(2));
    assert!(text.contains("bad.toml:3"), "{text}");
}

#[test]
fn check_reports_an_uplink_certificate_that_is_not_pem_with_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), "this is not a certificate\n").expect("write");
    let config = dir.path().join("bad-tls.toml");
    std::fs::write(
        &config,
        r#"
[gateway]
id = "t"
data_dir = "data"
[broker]
allow_anonymous = true
[[uplinks]]
name = "cloud"
url = "mqtts://127.0.0.1:8883"
ca = "ca.pem"
routes = [ { out = "plant/#", remote_prefix = "site/" } ]
"#,
    )
    .expect("write config");
    let (code, _, stderr) = gateway::run_to_end(&["check", "-c"], Some(&config));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("ca.pem"), "{stderr}");
    assert!(
        stderr.contains("bad-tls.toml:7:") && stderr.contains("uplinks[0]: uplink cloud"),
        "{stderr}"
    );
}

/// SIGINT (Ctrl-C in a terminal) stops the gateway as SIGTERM does: `offline` goes out
/// retained before the connections close, the stores fold their write-ahead log into the
/// database, and the exit status is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_the_gateway_as_cleanly_as_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = demo_config(dir.path());
    let gateway = GatewayProcess::start(&config);
    let mut watcher = RawWatcher::connect(gateway.addr, "fieldmq/demo/status").await;
    assert_eq!(
        watcher.next_publish().await,
        Some(("online".to_owned(), true))
    );
    let interrupter = tokio::task::spawn_blocking(move || {
        let mut gateway = gateway;
        let status = gateway.interrupt();
        let said: Vec<String> = gateway.log.try_iter().collect();
        (status, said)
    });
    let offline = watcher.next_publish().await;
    let (status, said) = interrupter.await.expect("join");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert_eq!(
        offline,
        Some(("offline".to_owned(), true)),
        "retained `offline` on SIGINT"
    );
    assert!(
        said.iter().any(|line| line.contains("SIGINT received")),
        "{said:?}"
    );
    let wal = dir.path().join("fieldmq-data").join("broker.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "the WAL is folded into broker.db on SIGINT");
    assert!(dir.path().join("fieldmq-data").join("broker.db").is_file());
}
