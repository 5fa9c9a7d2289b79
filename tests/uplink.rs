//! Uplinks against real peers: Mosquitto (with and without TLS) and fieldmq's own broker as
//! the cloud, our broker in-process as the local bus, SQLite outboxes in temp dirs, and the
//! real `fieldmq` binary for kill -9 / SIGTERM. No mocks.
//!
//! Tests that need Mosquitto skip with a message when it is not installed, and fail when
//! `CI` is set.

#[path = "support/cloud.rs"]
mod cloud;
#[allow(dead_code)]
#[path = "support/mqtt.rs"]
mod mqtt;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use cloud::{make_certs, mosquitto_available, Cloud, CloudOptions, PathBufs};
use fieldmq::broker::{self, BrokerHandle, InternalSubscribeOptions, RunningBroker};
use fieldmq::config::{
    BrokerConfig, GatewayConfig, InRoute, ListenerConfig, MqttVersion, OutRoute, QueueConfig,
    TlsConfig, UplinkConfig, UplinkUrl, UrlScheme, WhenFull,
};
use fieldmq::model::{Message, Origin, QoS};
use fieldmq::uplink::{self, RunningUplink};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const GATEWAY: &str = "line1";

fn gateway(data_dir: &Path) -> GatewayConfig {
    GatewayConfig {
        id: GATEWAY.into(),
        data_dir: data_dir.to_path_buf(),
        log_level: "info".into(),
        status_topic: format!("fieldmq/{GATEWAY}/status"),
        shutdown_timeout: Duration::from_secs(8),
        worker_threads: None,
    }
}

fn uplink_config(name: &str, port: u16) -> UplinkConfig {
    UplinkConfig {
        name: name.into(),
        url: UplinkUrl {
            scheme: UrlScheme::Mqtt,
            host: "127.0.0.1".into(),
            port,
            path: "/mqtt".into(),
        },
        protocol: MqttVersion::V5,
        client_id: format!("{GATEWAY}-{name}"),
        keep_alive: Duration::from_secs(30),
        username: None,
        password: None,
        tls: None,
        clean_start: false,
        session_expiry: Duration::from_secs(3600),
        will: None,
        birth: None,
        queue: QueueConfig {
            max_messages: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            when_full: WhenFull::DropOldest,
        },
        inflight: 100,
        max_rate: None,
        routes_out: vec![OutRoute {
            filter: "plant/#".into(),
            remote_prefix: Some(format!("sites/{GATEWAY}/")),
            remote_template: None,
            qos: QoS::AtLeastOnce,
            retain: false,
            durable: true,
        }],
        routes_in: vec![InRoute {
            filter: format!("sites/{GATEWAY}/cmd/#"),
            local_prefix: Some("plant/cmd/".into()),
            qos: QoS::AtLeastOnce,
        }],
        reconnect_min: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(1),
    }
}

/// Our broker: in-process only (`listen = None`) or also on a loopback port.
async fn local_broker(listen: bool, shutdown: &CancellationToken) -> RunningBroker {
    let listeners = if listen {
        vec![ListenerConfig {
            max_connections: 100,
            ..ListenerConfig::tcp("127.0.0.1:0".parse().unwrap())
        }]
    } else {
        Vec::new()
    };
    let config = BrokerConfig {
        listeners,
        allow_anonymous: true,
        password_file: None,
        max_packet_size: 1024 * 1024,
        max_queued_messages: 1_000_000,
        max_inflight: 100,
        ..BrokerConfig::default()
    };
    broker::start(&config, shutdown.clone())
        .await
        .expect("start the local broker")
}

/// A cloud-side MQTT 5 client: publishes, and collects what its subscriptions receive.
struct CloudClient {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Bytes)>,
}

impl CloudClient {
    /// Connect to `addr` and subscribe to `filters`; returns after the SUBACK.
    async fn connect(addr: SocketAddr, id: &str, filters: &[&str], persistent: bool) -> Self {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(Some(1024 * 1024));
        if persistent {
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(600));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        if tx.send((topic, p.payload)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    // Disconnected on purpose, or nobody listens any more: stop (a
                    // reconnect would take the session over from a newer client).
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) if tx.is_closed() => return,
                    Ok(_) => {}
                    Err(_) if tx.is_closed() => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        if !filters.is_empty() {
            client
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| Filter::new(*f, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)),
                )
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(10), subscribed_rx.recv())
                .await
                .expect("SUBACK within 10 s");
        }
        CloudClient { client, rx }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .unwrap();
    }

    async fn next(&mut self, within: Duration) -> Option<(String, String)> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
            .map(|(t, p)| (t, String::from_utf8_lossy(&p).into_owned()))
    }

    async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the uplink's retained status satisfies `ok`; returns it.
async fn wait_status(
    broker: &BrokerHandle,
    uplink: &str,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let topic = uplink::status_topic(&format!("fieldmq/{GATEWAY}/status"), uplink);
    let mut sub = broker
        .subscribe(
            "test-status",
            vec![(topic.clone(), QoS::AtLeastOnce)],
            InternalSubscribeOptions {
                capacity: 64,
                send_retained: true,
                ..InternalSubscribeOptions::default()
            },
        )
        .await
        .unwrap();
    let mut last = serde_json::Value::Null;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sub.recv()).await {
            Ok(Some(message)) => {
                last = serde_json::from_slice(&message.payload).unwrap();
                if ok(&last) {
                    return last;
                }
            }
            _ => panic!("status of {uplink} did not match within {within:?}; last: {last}"),
        }
    }
}

async fn start_uplink(
    config: UplinkConfig,
    data_dir: &Path,
    broker: &BrokerHandle,
    shutdown: &CancellationToken,
) -> RunningUplink {
    uplink::start(config, &gateway(data_dir), broker.clone(), shutdown.clone())
        .await
        .expect("start the uplink")
}

async fn publish_local(broker: &BrokerHandle, topic: &str, payload: &str, qos: QoS) {
    broker
        .publish(Message::internal(
            "test",
            topic,
            payload.to_string(),
            qos,
            false,
        ))
        .await
        .unwrap();
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "fieldmq=info".into()),
        )
        .with_test_writer()
        .try_init();
}

#[tokio::test]
async fn out_and_in_routes_remap_both_ways_with_qos_0_and_1_and_make_no_loop() {
    if !mosquitto_available("out_and_in_routes_remap_both_ways") {
        return;
    }
    init_logs();
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut config = uplink_config("cloud", cloud.port);
    config.routes_out.push(OutRoute {
        filter: "fast/#".into(),
        remote_prefix: None,
        remote_template: Some(format!("telemetry/{GATEWAY}/{{topic}}")),
        qos: QoS::AtMostOnce,
        retain: false,
        durable: false,
    });
    let mut watcher = CloudClient::connect(cloud.addr(), "watcher", &["#"], false).await;
    let mut local_cmds = local
        .handle
        .subscribe(
            "test-driver",
            vec![("plant/cmd/#".into(), QoS::AtLeastOnce)],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;

    // Out, QoS 1 (durable) and QoS 0 (direct).
    publish_local(&local.handle, "plant/boiler/temp", "21.5", QoS::AtLeastOnce).await;
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("sites/{GATEWAY}/boiler/temp"), "21.5".into()))
    );
    publish_local(&local.handle, "fast/vibration", "0.02", QoS::AtMostOnce).await;
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("telemetry/{GATEWAY}/fast/vibration"), "0.02".into()))
    );
    publish_local(&local.handle, "elsewhere/x", "not routed", QoS::AtLeastOnce).await;

    // In: a command from the cloud reaches the local bus under the local prefix, published
    // by the uplink.
    let commander = CloudClient::connect(cloud.addr(), "commander", &[], false).await;
    commander
        .publish(&format!("sites/{GATEWAY}/cmd/boiler/pump/set"), "on")
        .await;
    let command = tokio::time::timeout(Duration::from_secs(10), local_cmds.recv())
        .await
        .expect("command within 10 s")
        .unwrap();
    assert_eq!(&*command.topic, "plant/cmd/boiler/pump/set");
    assert_eq!(&command.payload[..], b"on");
    assert_eq!(command.origin, Origin::Internal("uplink:cloud".into()));

    // No loop: `plant/cmd/...` matches the out-route `plant/#`, but what came in through the
    // uplink is not sent back out. The watcher sees the command once (from the commander),
    // then the marker.
    publish_local(&local.handle, "plant/marker", "end", QoS::AtLeastOnce).await;
    let mut seen = Vec::new();
    while let Some((topic, payload)) = watcher.next(Duration::from_secs(10)).await {
        let done = topic.ends_with("/marker");
        seen.push((topic, payload));
        if done {
            break;
        }
    }
    assert_eq!(
        seen,
        vec![
            (format!("sites/{GATEWAY}/cmd/boiler/pump/set"), "on".into()),
            (format!("sites/{GATEWAY}/marker"), "end".into()),
        ],
        "the command must not come back from the gateway, and `elsewhere/x` is not routed"
    );

    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn mqtt_3_1_1_and_5_uplinks_work_with_fieldmqs_own_broker_as_the_cloud() {
    init_logs();
    let shutdown = CancellationToken::new();
    let cloud = local_broker(true, &shutdown).await;
    let cloud_addr = cloud.local_addrs[0];
    let local = local_broker(false, &shutdown).await;
    let dir = tempfile::tempdir().unwrap();
    let mut watcher = CloudClient::connect(cloud_addr, "watcher", &["sites/+/t"], false).await;
    let mut uplinks = Vec::new();
    for (name, protocol) in [("v311", MqttVersion::V311), ("v5", MqttVersion::V5)] {
        let mut config = uplink_config(name, cloud_addr.port());
        config.protocol = protocol;
        config.routes_out[0].filter = format!("plant/{name}/#");
        config.routes_out[0].remote_prefix = Some(format!("sites/{name}/"));
        config.routes_in[0].filter = format!("sites/{name}/cmd/#");
        uplinks.push(start_uplink(config, dir.path(), &local.handle, &shutdown).await);
        wait_status(&local.handle, name, Duration::from_secs(10), |s| {
            s["connected"] == true
        })
        .await;
    }
    let mut local_cmds = local
        .handle
        .subscribe(
            "test-driver",
            vec![("plant/cmd/#".into(), QoS::AtLeastOnce)],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
    for name in ["v311", "v5"] {
        publish_local(
            &local.handle,
            &format!("plant/{name}/t"),
            name,
            QoS::AtLeastOnce,
        )
        .await;
        assert_eq!(
            watcher.next(Duration::from_secs(10)).await,
            Some((format!("sites/{name}/t"), name.to_string()))
        );
        watcher
            .publish(&format!("sites/{name}/cmd/valve"), name)
            .await;
        let mut got = None;
        while got.is_none() {
            let m = tokio::time::timeout(Duration::from_secs(10), local_cmds.recv())
                .await
                .expect("command within 10 s")
                .unwrap();
            if &m.payload[..] == name.as_bytes() {
                got = Some(m);
            }
        }
        assert_eq!(&*got.unwrap().topic, "plant/cmd/valve");
    }
    shutdown.cancel();
    for running in uplinks {
        running.wait().await.unwrap();
    }
}

fn tls_uplink(name: &str, port: u16, ca: &Path, client: Option<(&Path, &Path)>) -> UplinkConfig {
    let mut config = uplink_config(name, port);
    config.url.scheme = UrlScheme::Mqtts;
    config.url.host = "localhost".into();
    config.tls = Some(TlsConfig {
        ca: Some(ca.to_path_buf()),
        cert: client.map(|c| c.0.to_path_buf()),
        key: client.map(|c| c.1.to_path_buf()),
        alpn: Vec::new(),
    });
    config.reconnect_min = Duration::from_millis(500);
    config
}

#[tokio::test]
async fn mtls_is_accepted_with_the_right_client_certificate() {
    if !mosquitto_available("mtls_is_accepted") {
        return;
    }
    init_logs();
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let cloud = Cloud::start(CloudOptions {
        mtls: Some((PathBufs::from(&certs), true)),
        extra: Vec::new(),
    });
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut watcher = CloudClient::connect(cloud.addr(), "watcher", &["sites/#"], false).await;
    let config = tls_uplink(
        "cloud",
        cloud.tls_port.unwrap(),
        &certs.ca,
        Some((&certs.client_cert, &certs.client_key)),
    );
    uplink::validate_files(config.tls.as_ref().unwrap()).expect("the test files are valid");
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;
    publish_local(&local.handle, "plant/secure", "yes", QoS::AtLeastOnce).await;
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("sites/{GATEWAY}/secure"), "yes".into()))
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn mtls_is_refused_with_a_wrong_ca_or_no_client_certificate_with_a_clear_error() {
    if !mosquitto_available("mtls_is_refused") {
        return;
    }
    init_logs();
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let cloud = Cloud::start(CloudOptions {
        mtls: Some((PathBufs::from(&certs), true)),
        extra: Vec::new(),
    });
    let port = cloud.tls_port.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let cases: Vec<(&str, UplinkConfig, &[&str])> = vec![
        (
            "foreign-client-cert",
            tls_uplink(
                "foreign-client-cert",
                port,
                &certs.ca,
                Some((&certs.other_client_cert, &certs.other_client_key)),
            ),
            &[
                "refused our client certificate",
                "UnknownCA",
                "BadCertificate",
            ],
        ),
        (
            "no-client-cert",
            tls_uplink("no-client-cert", port, &certs.ca, None),
            &["requires a client certificate"],
        ),
        (
            "wrong-ca",
            tls_uplink(
                "wrong-ca",
                port,
                &certs.other_ca,
                Some((&certs.client_cert, &certs.client_key)),
            ),
            &["not signed by a trusted CA"],
        ),
    ];
    let mut running = Vec::new();
    for (name, config, _) in &cases {
        running.push(start_uplink(config.clone(), dir.path(), &local.handle, &shutdown).await);
        let _ = name;
    }
    for (name, _, expected) in &cases {
        let status = wait_status(&local.handle, name, Duration::from_secs(10), |s| {
            s["last_error"].is_string()
        })
        .await;
        assert_eq!(status["connected"], false, "{name}: {status}");
        let error = status["last_error"].as_str().unwrap();
        assert!(
            expected.iter().any(|e| error.contains(e)),
            "{name}: error {error:?} should say one of {expected:?}"
        );
    }
    shutdown.cancel();
    for r in running {
        r.wait().await.unwrap();
    }
}

#[test]
fn bad_tls_files_are_reported_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let tls = |ca: &Path, cert: Option<&Path>, key: Option<&Path>| TlsConfig {
        ca: Some(ca.to_path_buf()),
        cert: cert.map(Path::to_path_buf),
        key: key.map(Path::to_path_buf),
        alpn: vec!["x-amzn-mqtt-ca".into()],
    };
    assert!(uplink::validate_files(&tls(
        &certs.ca,
        Some(&certs.client_cert),
        Some(&certs.client_key)
    ))
    .is_ok());
    let err = uplink::validate_files(&tls(&garbage, None, None)).unwrap_err();
    assert!(err.to_string().contains("garbage.pem"), "{err}");
    let err = uplink::validate_files(&tls(&certs.ca, Some(&certs.client_cert), Some(&garbage)))
        .unwrap_err();
    assert!(
        err.to_string().contains("garbage.pem") && err.to_string().contains("private key"),
        "{err}"
    );
    let err = uplink::validate_files(&tls(&certs.ca, Some(&certs.client_cert), None)).unwrap_err();
    assert!(err.to_string().contains("needs both"), "{err}");
    let missing = dir.path().join("missing.pem");
    let err = uplink::validate_files(&tls(&missing, None, None)).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // A key that does not belong to the certificate.
    let err = uplink::validate_files(&tls(
        &certs.ca,
        Some(&certs.client_cert),
        Some(&certs.other_client_key),
    ));
    if let Err(err) = err {
        assert!(err.to_string().contains("client.pem"), "{err}");
    }
}

#[tokio::test]
async fn a_command_published_while_the_gateway_is_away_is_delivered_when_it_reconnects() {
    if !mosquitto_available("session_expiry") {
        return;
    }
    init_logs();
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let broker_shutdown = CancellationToken::new();
    let local = local_broker(false, &broker_shutdown).await;
    let mut local_cmds = local
        .handle
        .subscribe(
            "test-driver",
            vec![("plant/cmd/#".into(), QoS::AtLeastOnce)],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
    let commander = CloudClient::connect(cloud.addr(), "commander", &[], false).await;
    let mut config = uplink_config("cloud", cloud.port);
    config.session_expiry = Duration::from_secs(300);

    // First run: the in-route subscription is made (a command round trip proves it).
    let first = CancellationToken::new();
    let running = start_uplink(config.clone(), dir.path(), &local.handle, &first).await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;
    let topic = format!("sites/{GATEWAY}/cmd/heater/set");
    let mut delivered = false;
    for _ in 0..50 {
        commander.publish(&topic, "probe").await;
        if let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(200), local_cmds.recv()).await
        {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "the in-route works before the gateway goes away");
    while let Ok(Some(_)) =
        tokio::time::timeout(Duration::from_millis(300), local_cmds.recv()).await
    {}
    first.cancel();
    running.wait().await.unwrap();

    // Away (for less than the session expiry): the cloud keeps the session and queues.
    commander.publish(&topic, "while-away").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let second = CancellationToken::new();
    let running = start_uplink(config, dir.path(), &local.handle, &second).await;
    let command = tokio::time::timeout(Duration::from_secs(10), local_cmds.recv())
        .await
        .expect("the queued command is delivered on reconnect")
        .unwrap();
    assert_eq!(&*command.topic, "plant/cmd/heater/set");
    assert_eq!(&command.payload[..], b"while-away");
    second.cancel();
    running.wait().await.unwrap();
}

/// A cloud with persistence, and a subscriber session registered on it, so that messages
/// published while the subscriber is away are kept for it (also across a cloud restart).
fn persistent_cloud() -> Cloud {
    let persist = tempfile::tempdir().unwrap().keep();
    Cloud::start(CloudOptions {
        mtls: None,
        extra: vec![
            "persistence true".into(),
            format!("persistence_location {}/", persist.display()),
            "autosave_interval 0".into(),
        ],
    })
}

/// Payload numbers received on `sites/<gw>/seq`, until `count` distinct ones arrived.
async fn collect_sequence(sub: &mut CloudClient, count: usize, within: Duration) -> Vec<u64> {
    let mut received = Vec::new();
    let mut distinct = HashSet::new();
    let deadline = tokio::time::Instant::now() + within;
    while distinct.len() < count {
        match tokio::time::timeout_at(deadline, sub.rx.recv()).await {
            Ok(Some((_, payload))) => {
                let n: u64 = std::str::from_utf8(&payload).unwrap().parse().unwrap();
                distinct.insert(n);
                received.push(n);
            }
            _ => panic!(
                "only {} of {count} distinct messages arrived within {within:?}",
                distinct.len()
            ),
        }
    }
    received
}

/// All of 0..count arrived, and, ignoring repeats, in increasing order. Returns the
/// number of duplicates.
fn assert_complete_in_order(received: &[u64], count: u64) -> usize {
    let mut seen = HashSet::new();
    let mut last = None;
    for &n in received {
        if seen.insert(n) {
            if let Some(last) = last {
                assert!(
                    n > last,
                    "{n} arrived after {last} (first arrivals must be in order)"
                );
            }
            last = Some(n);
        }
    }
    assert_eq!(seen.len() as u64, count);
    assert!(seen.iter().all(|&n| n < count));
    received.len() - seen.len()
}

#[tokio::test]
async fn after_an_outage_100000_queued_messages_all_arrive_in_order() {
    if !mosquitto_available("outage_100000") {
        return;
    }
    init_logs();
    const COUNT: u64 = 100_000;
    let mut cloud = persistent_cloud();
    // Register the subscriber's session, then take the cloud down.
    CloudClient::connect(
        cloud.addr(),
        "subscriber",
        &[&format!("sites/{GATEWAY}/seq")],
        true,
    )
    .await
    .disconnect()
    .await;
    cloud.stop();

    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut config = uplink_config("cloud", cloud.port);
    config.routes_out[0].filter = "plant/seq".into();
    config.routes_out[0].remote_prefix = Some(format!("sites/{GATEWAY}/seq"));
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    for n in 0..COUNT {
        publish_local(&local.handle, "plant/seq", &n.to_string(), QoS::AtLeastOnce).await;
    }
    let status = wait_status(&local.handle, "cloud", Duration::from_secs(60), |s| {
        s["queue_depth"] == COUNT
    })
    .await;
    assert_eq!(status["connected"], false);

    cloud.restart();
    let mut subscriber = CloudClient::connect(cloud.addr(), "subscriber", &[], true).await;
    let received =
        collect_sequence(&mut subscriber, COUNT as usize, Duration::from_secs(120)).await;
    let duplicates = assert_complete_in_order(&received, COUNT);
    assert_eq!(
        duplicates, 0,
        "no restart, no reconnect during the drain: no duplicates"
    );
    wait_status(&local.handle, "cloud", Duration::from_secs(20), |s| {
        s["queue_depth"] == 0
    })
    .await;
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn max_messages_drops_the_oldest_counts_them_and_the_status_shows_it() {
    if !mosquitto_available("max_messages") {
        return;
    }
    init_logs();
    let mut cloud = persistent_cloud();
    CloudClient::connect(
        cloud.addr(),
        "subscriber",
        &[&format!("sites/{GATEWAY}/seq")],
        true,
    )
    .await
    .disconnect()
    .await;
    cloud.stop();

    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut config = uplink_config("cloud", cloud.port);
    config.queue.max_messages = 100;
    config.routes_out[0].filter = "plant/seq".into();
    config.routes_out[0].remote_prefix = Some(format!("sites/{GATEWAY}/seq"));
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    for n in 0..150 {
        publish_local(&local.handle, "plant/seq", &n.to_string(), QoS::AtLeastOnce).await;
    }
    let status = wait_status(&local.handle, "cloud", Duration::from_secs(20), |s| {
        s["dropped"]["oldest"] == 50
    })
    .await;
    assert_eq!(status["queue_depth"], 100, "{status}");
    assert_eq!(status["dropped_total"], 50, "{status}");

    cloud.restart();
    let mut subscriber = CloudClient::connect(cloud.addr(), "subscriber", &[], true).await;
    let received = collect_sequence(&mut subscriber, 100, Duration::from_secs(30)).await;
    assert_eq!(
        received,
        (50..150).collect::<Vec<u64>>(),
        "the oldest 50 were dropped"
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_outbox_stops_the_uplink_at_start_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = uplink::outbox_path(dir.path(), "cloud");
    std::fs::write(&path, vec![0xa5u8; 4096]).unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let config = uplink_config("cloud", cloud::free_port());
    let err = match uplink::start(
        config,
        &gateway(dir.path()),
        local.handle.clone(),
        shutdown.clone(),
    )
    .await
    {
        Ok(_) => panic!("a corrupt outbox must not start"),
        Err(err) => err,
    };
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("move the file aside"), "{text}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        vec![0xa5u8; 4096],
        "the file is left alone"
    );
}

// ---------------------------------------------------------------------------------------
// The real binary: kill -9 and SIGTERM.

struct GatewayProcess {
    child: std::process::Child,
    config: PathBuf,
    local_addr: SocketAddr,
}

fn gateway_toml(dir: &Path, cloud_port: u16, extra_uplink: &str) -> PathBuf {
    let text = format!(
        r#"
[gateway]
id = "{GATEWAY}"
data_dir = "{data}"
shutdown_timeout = "8s"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

[[uplinks]]
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
client_id = "{GATEWAY}-gw"
keep_alive = "5s"
reconnect = {{ min = "200ms", max = "1s" }}
will = {{ topic = "gateways/{{gateway}}/status", payload = "offline", qos = 1, retain = false }}
birth = {{ topic = "gateways/{{gateway}}/status", payload = "online", qos = 1, retain = false }}
routes = [
  {{ out = "plant/#", remote_prefix = "sites/{{gateway}}/", qos = 1 }},
]
{extra_uplink}
"#,
        data = dir.join("data").display(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl GatewayProcess {
    fn start(config: &Path) -> GatewayProcess {
        use std::io::{BufRead, BufReader};
        // FIELDMQ_BIN runs another build of the gateway (e.g. a release binary).
        let binary = std::env::var("FIELDMQ_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fieldmq").to_string());
        let mut child = std::process::Command::new(binary)
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start fieldmq");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("FIELDMQ_TEST_VERBOSE").is_some() {
                    eprintln!("[gateway] {line}");
                }
                if let Some(addr) = line
                    .split("addr=")
                    .nth(1)
                    .filter(|_| line.contains("listener ready"))
                {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the gateway reports its listener within 20 s");
        GatewayProcess {
            child,
            config: config.to_path_buf(),
            local_addr: addr.parse().expect("listener address"),
        }
    }

    fn signal(&mut self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        self.signal("-KILL");
        self.wait(Duration::from_secs(5));
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn kill_9_of_the_gateway_makes_the_cloud_deliver_the_will() {
    if !mosquitto_available("kill_9_will") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut status = CloudClient::connect(
        cloud.addr(),
        "status-watcher",
        &[&format!("gateways/{GATEWAY}/status")],
        false,
    )
    .await;
    let mut gateway = GatewayProcess::start(&gateway_toml(dir.path(), cloud.port, ""));
    assert_eq!(
        status.next(Duration::from_secs(15)).await.map(|m| m.1),
        Some("online".into())
    );
    gateway.kill9();
    assert_eq!(
        status.next(Duration::from_secs(10)).await.map(|m| m.1),
        Some("offline".into()),
        "the will"
    );
}

#[tokio::test]
async fn sigterm_sends_offline_before_disconnect_and_no_will() {
    if !mosquitto_available("sigterm_offline") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut status = CloudClient::connect(
        cloud.addr(),
        "status-watcher",
        &[&format!("gateways/{GATEWAY}/status")],
        false,
    )
    .await;
    let mut gateway = GatewayProcess::start(&gateway_toml(dir.path(), cloud.port, ""));
    assert_eq!(
        status.next(Duration::from_secs(15)).await.map(|m| m.1),
        Some("online".into())
    );
    gateway.signal("-TERM");
    let exit = gateway.wait(Duration::from_secs(15));
    assert!(exit.success(), "clean exit: {exit}");
    assert_eq!(
        status.next(Duration::from_secs(5)).await.map(|m| m.1),
        Some("offline".into()),
        "the explicit offline status"
    );
    assert_eq!(
        status.next(Duration::from_secs(2)).await,
        None,
        "no will after a clean disconnect"
    );
}

#[tokio::test]
async fn ten_kills_while_draining_100000_messages_lose_nothing_and_duplicate_at_most_the_window_per_kill(
) {
    if !mosquitto_available("ten_kills") {
        return;
    }
    const COUNT: u64 = 100_000;
    const INFLIGHT: usize = 100;
    let mut cloud = persistent_cloud();
    CloudClient::connect(
        cloud.addr(),
        "subscriber",
        &[&format!("sites/{GATEWAY}/seq")],
        true,
    )
    .await
    .disconnect()
    .await;
    cloud.stop();
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_toml(dir.path(), cloud.port, "");
    let mut gateway = GatewayProcess::start(&config);

    // Fill the outbox through the gateway's own MQTT listener while the cloud is down.
    let publisher = CloudClient::connect(gateway.local_addr, "plc", &[], false).await;
    for n in 0..COUNT {
        publisher
            .client
            .publish(
                "plant/seq",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                n.to_string().into_bytes(),
            )
            .await
            .unwrap();
    }
    let mut status_sub = CloudClient::connect(
        gateway.local_addr,
        "status-reader",
        &[&format!("fieldmq/{GATEWAY}/status/uplinks/cloud")],
        false,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, payload) = status_sub
            .next(Duration::from_secs(10))
            .await
            .expect("status updates");
        let status: serde_json::Value = serde_json::from_str(&payload).unwrap();
        if status["queue_depth"] == COUNT {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never reached {COUNT}: {status}"
        );
    }
    drop(status_sub);
    publisher.disconnect().await;

    cloud.restart();
    let mut subscriber = CloudClient::connect(cloud.addr(), "subscriber", &[], true).await;
    for kill in 0..10 {
        let pause = Duration::from_millis(rand::random_range(200..1500));
        tokio::time::sleep(pause).await;
        eprintln!(
            "kill {kill}: {} messages at the cloud so far",
            subscriber.rx.len()
        );
        gateway.kill9();
        gateway = GatewayProcess::start(&gateway.config.clone());
    }
    let received =
        collect_sequence(&mut subscriber, COUNT as usize, Duration::from_secs(180)).await;
    let duplicates = assert_complete_in_order(&received, COUNT);
    eprintln!(
        "ten kills: {} received, {duplicates} duplicates",
        received.len()
    );
    assert!(
        duplicates <= 10 * INFLIGHT,
        "{duplicates} duplicates for 10 kills with a window of {INFLIGHT}"
    );
    drop(gateway);
}

/// A port on 127.0.0.1 where nothing listens: the cloud is unreachable.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Publish `count` QoS 1 messages (payload: `first` + their index) on `plant/seq` as fast as
/// the gateway reads them, kill -9 the gateway once a tenth of them are acknowledged, and
/// return the numbers whose PUBACK arrived.
async fn publish_until_killed(gateway: &mut GatewayProcess, first: u32, count: u16) -> Vec<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(gateway.local_addr)
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut read, mut write) = stream.into_split();
    let mut connect = Vec::new();
    mqtt::packet::put_bytes(&mut connect, b"MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60]);
    mqtt::packet::put_bytes(&mut connect, b"plc-acked");
    write
        .write_all(&mqtt::packet::frame(0x10, &connect))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    read.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");

    let writer = tokio::spawn(async move {
        for n in 0..count {
            let mut body = Vec::new();
            mqtt::packet::put_bytes(&mut body, b"plant/seq");
            body.extend_from_slice(&(n + 1).to_be_bytes());
            body.extend_from_slice((first + u32::from(n)).to_string().as_bytes());
            if write
                .write_all(&mqtt::packet::frame(0x32, &body))
                .await
                .is_err()
            {
                return;
            }
        }
        // Keep the connection open until the gateway dies.
        std::future::pending::<()>().await;
    });
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= 4 {
                assert_eq!(&buf[..2], &[0x40, 2], "only PUBACKs are expected");
                let pkid = u16::from_be_bytes([buf[2], buf[3]]);
                acked.push(first + u32::from(pkid - 1));
                buf.drain(..4);
            }
            acked_tx.send_replace(acked.len());
        }
        acked
    });
    let tenth = usize::from(count / 10);
    tokio::time::timeout(Duration::from_secs(30), acked_rx.wait_for(|&n| n >= tenth))
        .await
        .expect("a tenth of the publishes acknowledged within 30 s")
        .unwrap();
    gateway.kill9();
    writer.abort();
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the connection closes with the gateway")
        .unwrap()
}

/// Payloads of `plant/seq` messages in the outbox, in queue order.
fn outbox_numbers(data_dir: &Path) -> Vec<u32> {
    let db = rusqlite::Connection::open_with_flags(
        data_dir.join("uplink-cloud.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut statement = db
        .prepare("SELECT payload FROM outbox WHERE topic = ?1 ORDER BY seq")
        .unwrap();
    statement
        .query_map([format!("sites/{GATEWAY}/seq")], |row| {
            row.get::<_, Vec<u8>>(0)
        })
        .unwrap()
        .map(|payload| {
            String::from_utf8(payload.unwrap())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn with_sync_durability_every_puback_means_the_message_is_in_the_outbox_across_kill_9() {
    const COUNT: u16 = 20_000;
    const ROUNDS: u32 = 5;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_toml(dir.path(), closed_port(), "");
    let mut acked = Vec::new();
    for round in 0..ROUNDS {
        let mut gateway = GatewayProcess::start(&config);
        let this_round = publish_until_killed(&mut gateway, round * 100_000, COUNT).await;
        assert!(
            this_round.windows(2).all(|w| w[0] < w[1]),
            "PUBACKs in publish order"
        );
        acked.extend(this_round);
    }
    let stored = outbox_numbers(&dir.path().join("data"));
    let stored_set: HashSet<u32> = stored.iter().copied().collect();
    let missing: Vec<u32> = acked
        .iter()
        .copied()
        .filter(|n| !stored_set.contains(n))
        .collect();
    eprintln!(
        "{ROUNDS} kills: {} acknowledged, {} in the outbox, {} acknowledged but missing",
        acked.len(),
        stored.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged messages missing from the outbox (first {:?})",
        missing.len(),
        missing.first()
    );
    assert!(
        stored.windows(2).all(|w| w[0] < w[1]),
        "the outbox holds the messages in publish order"
    );
}

#[test]
fn the_uplink_examples_in_config_pass_the_uplink_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in [
        "uplink-aws-iot.toml",
        "uplink-hivemq-cloud.toml",
        "uplink-selfhosted-mosquitto.toml",
    ] {
        let config =
            fieldmq::config::load(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.uplinks.len(), 1, "{name}");
        for uplink in &config.uplinks {
            let errors = uplink::check(uplink);
            assert!(errors.is_empty(), "{name}: {errors:?}");
        }
    }
}
