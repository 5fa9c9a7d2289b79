//! MQTT.js (npm `mqtt`, pinned in tests/js/package.json) as a real client of the broker,
//! over TCP and WebSocket: a burst of 50 QoS 2 publishes sent at once, as MQTT.js
//! applications do. MQTT 3.1.1 has no Receive Maximum, so the whole burst is accepted;
//! MQTT 5 has one (the broker's `max_inflight`, 20 here), and MQTT.js does not hold its
//! own publishes to it, so the broker disconnects it with 0x93 Receive Maximum exceeded
//! as the specification says. (A raw-bytes MQTT 5 client that exceeds the window by
//! exactly one is tested in tests/mqtt5.rs,
//! `a_client_exceeding_the_advertised_receive_maximum_with_qos_2_gets_disconnect_0x93`.)
//!
//! Needs `node` and `npm ci --prefix tests/js`; without them the tests skip with a
//! message, unless `CI` is set, where they fail.

use std::path::PathBuf;
use std::time::Duration;

use fieldmq::broker::config::ListenerConfig;
use mqtt::{Client, TestBroker, Version};

use crate::util::{mqtt, skip};

const BURST: usize = 50;

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Whether node and the installed `mqtt` package are there. Panics in CI when not.
fn mqttjs_available(test: &str) -> bool {
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let package = js_dir().join("node_modules/mqtt/package.json").is_file();
    if node && package {
        return true;
    }
    let missing = if node {
        "the mqtt package (`npm ci --prefix tests/js`)"
    } else {
        "node (`apt-get install -y nodejs npm`, then `npm ci --prefix tests/js`)"
    };
    skip::skip(test, &format!("{missing} is not installed"));
    false
}

/// The broker with one TCP (first) and one WebSocket listener.
async fn start() -> TestBroker {
    let mut config = mqtt::config();
    let any = "127.0.0.1:0".parse().expect("address");
    config.listeners = vec![
        ListenerConfig::tcp(any),
        ListenerConfig {
            websocket: true,
            ..ListenerConfig::tcp(any)
        },
    ];
    assert!(
        usize::from(config.max_inflight) < BURST,
        "the burst must exceed MQTT 5's Receive Maximum"
    );
    mqtt::start(config).await
}

/// What burst.js printed.
#[derive(Debug)]
struct Outcome {
    acked: usize,
    errors: Vec<String>,
    disconnect_reason: Option<u64>,
    receive_maximum: Option<u64>,
    json: serde_json::Value,
}

async fn burst(url: &str, version: u8, prefix: &str) -> Outcome {
    let run = tokio::process::Command::new("node")
        .arg(js_dir().join("burst.js"))
        .args([url, &version.to_string(), &BURST.to_string(), prefix])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("burst.js {url} did not finish within 30 s"))
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "burst.js {url} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON from burst.js {url}: {stdout}"));
    Outcome {
        acked: json["acked"].as_u64().expect("acked") as usize,
        errors: json["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| e.to_string())
            .collect(),
        disconnect_reason: json["disconnectReason"].as_u64(),
        receive_maximum: json["connack"]["receiveMaximum"].as_u64(),
        json,
    }
}

/// Everything `subscriber` received under `prefix/` until the sentinel, sorted.
async fn received(subscriber: &mut Client, sentinel_from: &mut Client, prefix: &str) -> Vec<usize> {
    let sentinel = format!("sentinel/{prefix}");
    sentinel_from.publish(&sentinel, 1, false, b"").await;
    let mut numbers: Vec<usize> = subscriber
        .recv_until(&sentinel)
        .await
        .into_iter()
        .filter(|r| r.topic.starts_with(&format!("{prefix}/")))
        .map(|r| {
            String::from_utf8_lossy(&r.payload)
                .parse()
                .expect("a number")
        })
        .collect();
    numbers.sort_unstable();
    numbers
}

async fn subscriber(broker: &TestBroker, id: &str) -> Client {
    let mut client = Client::connect(Version::V311, broker.addrs[0], id).await;
    assert_eq!(client.subscribe("burst/#", 2).await, Some(2));
    assert_eq!(client.subscribe("sentinel/#", 1).await, Some(1));
    client
}

#[tokio::test]
async fn an_mqtt_js_3_1_1_burst_of_50_qos_2_publishes_is_all_acknowledged_and_delivered_once() {
    if !mqttjs_available("mqttjs 3.1.1 burst") {
        return;
    }
    let broker = start().await;
    let mut sub = subscriber(&broker, "sub-311").await;
    let tcp = format!("mqtt://{}", broker.addrs[0]);
    let ws = format!("ws://{}/mqtt", broker.addrs[1]);
    for (url, prefix) in [(tcp, "burst/tcp"), (ws, "burst/ws")] {
        let outcome = burst(&url, 4, prefix).await;
        assert_eq!(
            (outcome.acked, outcome.disconnect_reason),
            (BURST, None),
            "{url}: every publish acknowledged, no disconnect: {}",
            outcome.json
        );
        assert!(outcome.errors.is_empty(), "{url}: {:?}", outcome.errors);
        let mut sentinel_from = Client::connect(Version::V311, broker.addrs[0], "sentinel").await;
        assert_eq!(
            received(&mut sub, &mut sentinel_from, prefix).await,
            (0..BURST).collect::<Vec<_>>(),
            "{url}: each message delivered exactly once"
        );
    }
}

#[tokio::test]
async fn an_mqtt_js_mqtt_5_burst_beyond_receive_maximum_gets_disconnect_0x93() {
    if !mqttjs_available("mqttjs MQTT 5 burst") {
        return;
    }
    let broker = start().await;
    let mut sub = subscriber(&broker, "sub-5").await;
    let tcp = format!("mqtt://{}", broker.addrs[0]);
    let ws = format!("ws://{}/mqtt", broker.addrs[1]);
    for (url, prefix) in [(tcp, "burst/tcp5"), (ws, "burst/ws5")] {
        let outcome = burst(&url, 5, prefix).await;
        assert_eq!(outcome.receive_maximum, Some(20), "{url}: {}", outcome.json);
        // MQTT.js sends the whole burst regardless of the Receive Maximum it was given.
        assert_eq!(
            outcome.disconnect_reason,
            Some(0x93),
            "{url}: DISCONNECT Receive Maximum exceeded: {}",
            outcome.json
        );
        assert!(outcome.acked < BURST, "{url}: {}", outcome.json);
        // What was accepted before the disconnect is delivered once, none twice.
        let mut sentinel_from = Client::connect(Version::V311, broker.addrs[0], "sentinel").await;
        let got = received(&mut sub, &mut sentinel_from, prefix).await;
        let mut unique = got.clone();
        unique.dedup();
        assert_eq!(got, unique, "{url}: no duplicates");
        assert!(got.len() <= 20, "{url}: at most the window: {got:?}");
    }
}
