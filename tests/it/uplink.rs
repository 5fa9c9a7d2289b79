//! Uplinks against real peers: Mosquitto (with and without TLS) and fieldmq's own broker as
//! the cloud, our broker in-process as the local bus, SQLite outboxes in temp dirs, and the
//! real `fieldmq` binary for kill -9 / SIGTERM. No mocks: where a test must see or shape the
//! wire (the protocol level of a CONNECT, a held PUBCOMP, a cut link) a loopback proxy sits
//! between the uplink and the real cloud (`util/proxy.rs`); the ALPN test's TLS server
//! is a rustls server that records the ClientHello.
//!
//! Tests that need Mosquitto skip with a message when it is not installed, and fail when
//! `CI` is set.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use cloud::{mosquitto_available, Cloud, CloudOptions, PathBufs};
use fieldmq::broker::config::{BrokerConfig, ListenerConfig};
use fieldmq::broker::{self, BrokerHandle, InternalSubscribeOptions, RunningBroker};
use fieldmq::config::GatewayConfig;
use fieldmq::model::{Message, MessageProperties, Origin, QoS};
use fieldmq::store::OutboxStats;
use fieldmq::uplink::config::{
    InRoute, MqttVersion, OutRoute, QueueConfig, TlsConfig, UplinkConfig, UplinkUrl, UrlScheme,
    WhenFull,
};
use fieldmq::uplink::{self, RunningUplink};
use pki::make_certs;
use proxy::Proxy;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::util::gateway::GatewayProcess;
use crate::util::{cloud, free_port, mqtt, pki, proxy};

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
            payload: None,
        }],
        routes_in: vec![InRoute {
            filter: format!("sites/{GATEWAY}/cmd/#"),
            local_prefix: Some("plant/cmd/".into()),
            qos: QoS::AtLeastOnce,
        }],
        reconnect_min: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(1),
        sparkplug: None,
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

/// A message a [`CloudClient`] received, with the MQTT 5 properties the tests look at.
struct CloudMessage {
    topic: String,
    payload: Bytes,
    user_properties: Vec<(String, String)>,
    message_expiry: Option<u32>,
    /// When the client read it from the socket.
    at: tokio::time::Instant,
}

impl CloudMessage {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A cloud-side MQTT 5 client: publishes, and collects what its subscriptions receive.
struct CloudClient {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<CloudMessage>,
    /// PUBACKs received so far.
    acked: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
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
        let (acked_tx, acked) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let properties = p.properties.unwrap_or_default();
                        let message = CloudMessage {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            user_properties: properties.user_properties,
                            message_expiry: properties.message_expiry_interval,
                            at: tokio::time::Instant::now(),
                        };
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked_tx.send_modify(|n| *n += 1);
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
        CloudClient {
            client,
            rx,
            acked,
            task,
        }
    }

    /// Publish with QoS 1 and return once the broker's PUBACK arrived (the broker has then
    /// routed the message, to offline persistent sessions too).
    async fn publish(&mut self, topic: &str, payload: &str) {
        let before = *self.acked.borrow_and_update();
        self.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            self.acked.wait_for(|&n| n > before),
        )
        .await
        .expect("PUBACK within 10 s")
        .unwrap();
    }

    async fn next_message(&mut self, within: Duration) -> Option<CloudMessage> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    async fn next(&mut self, within: Duration) -> Option<(String, String)> {
        self.next_message(within)
            .await
            .map(|m| (m.topic.clone(), m.text()))
    }

    /// DISCONNECT, and return once it has been written.
    async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("DISCONNECT written within 10 s")
            .unwrap();
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

async fn publish_local_with_expiry(broker: &BrokerHandle, topic: &str, payload: &str, expiry: u32) {
    let mut message =
        Message::internal("test", topic, payload.to_string(), QoS::AtLeastOnce, false);
    message.properties = Some(std::sync::Arc::new(MessageProperties {
        message_expiry_interval: Some(expiry),
        ..MessageProperties::default()
    }));
    broker.publish(message).await.unwrap();
}

/// Wait until the outbox's figures satisfy `ok` (polled every 20 ms); returns them.
async fn wait_outbox(
    running: &RunningUplink,
    within: Duration,
    ok: impl Fn(&OutboxStats) -> bool,
) -> OutboxStats {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let stats = running.outbox().stats().await.unwrap();
        if ok(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox did not get there within {within:?}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Remote topics of the rows in the outbox, in queue order.
async fn outbox_topics(running: &RunningUplink) -> Vec<String> {
    running
        .outbox()
        .read_after(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.record.topic)
        .collect()
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
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
        payload: None,
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
    let mut commander = CloudClient::connect(cloud.addr(), "commander", &[], false).await;
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
    // The uplinks connect through a proxy that records the protocol level of each CONNECT.
    let proxy = Proxy::start(cloud_addr).await;
    let local = local_broker(false, &shutdown).await;
    let dir = tempfile::tempdir().unwrap();
    let mut watcher = CloudClient::connect(cloud_addr, "watcher", &["sites/+/t"], false).await;
    let mut uplinks = Vec::new();
    for (name, protocol, level) in [("v311", MqttVersion::V311, 4), ("v5", MqttVersion::V5, 5)] {
        let mut config = uplink_config(name, proxy.port());
        config.protocol = protocol;
        config.routes_out[0].filter = format!("plant/{name}/#");
        config.routes_out[0].remote_prefix = Some(format!("sites/{name}/"));
        config.routes_in[0].filter = format!("sites/{name}/cmd/#");
        let client_id = config.client_id.clone();
        uplinks.push(start_uplink(config, dir.path(), &local.handle, &shutdown).await);
        wait_status(&local.handle, name, Duration::from_secs(10), |s| {
            s["connected"] == true
        })
        .await;
        let connect = proxy
            .wait_connect(&client_id, Duration::from_secs(10))
            .await;
        assert_eq!(
            connect.level, level,
            "the protocol level of {name}'s CONNECT on the wire"
        );
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
    ))
    .expect_err("a key that does not match the certificate is refused");
    let text = err.to_string();
    assert!(
        text.contains("client.pem")
            && text.contains("other-client.key")
            && text.contains("cannot be used together"),
        "{text}"
    );
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
    let mut commander = CloudClient::connect(cloud.addr(), "commander", &[], false).await;
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
    first.cancel();
    running.wait().await.unwrap();

    // Away (for less than the session expiry): the cloud keeps the session and queues. Its
    // PUBACK to the commander comes after it has queued the command for the session, so
    // the command was published while the gateway was away.
    commander.publish(&topic, "while-away").await;

    let second = CancellationToken::new();
    let running = start_uplink(config, dir.path(), &local.handle, &second).await;
    // Probes the first run had not taken yet may come first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let command = loop {
        let command = tokio::time::timeout_at(deadline, local_cmds.recv())
            .await
            .expect("the queued command is delivered on reconnect")
            .unwrap();
        if &command.payload[..] != b"probe" {
            break command;
        }
    };
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
/// Fails when `within` has passed, or when nothing arrived for 20 s (what is missing then
/// is not coming: the sender has no resend timer).
async fn collect_sequence(sub: &mut CloudClient, count: usize, within: Duration) -> Vec<u64> {
    const QUIET: Duration = Duration::from_secs(20);
    let mut received = Vec::new();
    let mut distinct = HashSet::new();
    let deadline = tokio::time::Instant::now() + within;
    while distinct.len() < count {
        let until = deadline.min(tokio::time::Instant::now() + QUIET);
        match tokio::time::timeout_at(until, sub.rx.recv()).await {
            Ok(Some(message)) => {
                let n: u64 = std::str::from_utf8(&message.payload)
                    .unwrap()
                    .parse()
                    .unwrap();
                distinct.insert(n);
                received.push(n);
            }
            _ => {
                let missing: Vec<u64> = (0..count as u64)
                    .filter(|n| !distinct.contains(n))
                    .take(10)
                    .collect();
                panic!(
                    "only {} of {count} distinct messages arrived (within {within:?}, none in \
                     the last {QUIET:?}); the first missing: {missing:?}",
                    distinct.len()
                )
            }
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
    let config = uplink_config("cloud", free_port());
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
    let will = status
        .next_message(Duration::from_secs(10))
        .await
        .expect("the will within 10 s");
    assert_eq!(will.text(), "offline");
    assert_eq!(
        will.user_property("reason"),
        Some("connection lost"),
        "the will says why"
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
    let exit = gateway.terminate_within(Duration::from_secs(15));
    assert!(exit.success(), "clean exit: {exit}");
    // The will has the same topic and payload; its reason (`connection lost`) tells it
    // apart from the gateway's own message.
    let offline = status
        .next_message(Duration::from_secs(5))
        .await
        .expect("an offline status within 5 s");
    assert_eq!(offline.text(), "offline");
    assert_eq!(
        offline.user_property("reason"),
        Some("shutdown"),
        "the gateway's own offline status, not the will"
    );
    // Mosquitto publishes a will as soon as it sees the connection end; the gateway has
    // exited, so one would come within moments.
    if let Some(late) = status.next_message(Duration::from_secs(2)).await {
        panic!(
            "no will after a clean disconnect, got {:?} with {:?}",
            late.text(),
            late.user_properties
        );
    }
}

// Multi-threaded: the proxy keeps forwarding while the test blocks on the gateway process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kills_while_draining_100000_messages_lose_nothing_and_duplicate_at_most_the_window_per_kill(
) {
    if !mosquitto_available("ten_kills") {
        return;
    }
    const COUNT: u64 = 100_000;
    const INFLIGHT: usize = 100;
    /// How long the link is cut before each kill.
    const PARTITION: Duration = Duration::from_millis(200);
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
    // The gateway reaches the cloud through a proxy that can cut the link.
    let proxy = Proxy::start(cloud.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_toml(dir.path(), proxy.port(), "");
    let mut gateway = GatewayProcess::start(&config);

    // Fill the outbox through the gateway's own MQTT listener while the cloud is down.
    let publisher = CloudClient::connect(gateway.addr, "plc", &[], false).await;
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
        gateway.addr,
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
        // A partition, then the crash. What the gateway writes from the cut on never
        // reaches the cloud, and the PUBACKs for what the cloud had received never reach
        // the gateway: a row deleted before its PUBACK would be lost. On loopback without
        // the cut, the kernel would still deliver what the killed gateway had written.
        proxy.cut();
        tokio::time::sleep(PARTITION).await;
        eprintln!(
            "kill {kill}: {} messages at the cloud so far, {} publishes dropped by the cuts",
            subscriber.rx.len(),
            proxy.dropped_publishes()
        );
        gateway.kill9();
        gateway = GatewayProcess::start(&config);
    }
    let received =
        collect_sequence(&mut subscriber, COUNT as usize, Duration::from_secs(180)).await;
    let duplicates = assert_complete_in_order(&received, COUNT);
    eprintln!(
        "ten kills: {} received, {duplicates} duplicates, {} publishes dropped by the cuts",
        received.len(),
        proxy.dropped_publishes()
    );
    assert!(
        proxy.dropped_publishes() > 0,
        "no cut caught a publish on its way: the drain was over before the kills"
    );
    assert!(
        duplicates <= 10 * INFLIGHT,
        "{duplicates} duplicates for 10 kills with a window of {INFLIGHT}"
    );
    drop(gateway);
}

/// Publish `count` QoS 1 messages (payload: `first` + their index) on `plant/seq` as fast as
/// the gateway reads them, kill -9 the gateway once a tenth of them are acknowledged, and
/// return the numbers whose PUBACK arrived.
async fn publish_until_killed(gateway: &mut GatewayProcess, first: u32, count: u16) -> Vec<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
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
    let config = gateway_toml(dir.path(), free_port(), "");
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
        let config = fieldmq::service::config::load(&dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.uplinks.len(), 1, "{name}");
        for uplink in &config.uplinks {
            let errors = uplink::check(uplink);
            assert!(errors.is_empty(), "{name}: {errors:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Documented uplink promises: rate, refusals, non-durable routes, QoS 2, expiry,
// credentials, ALPN.

#[tokio::test]
async fn max_rate_caps_the_messages_per_second_sent_to_the_cloud() {
    if !mosquitto_available("max_rate") {
        return;
    }
    init_logs();
    const RATE: u32 = 50;
    const COUNT: u32 = 60;
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut watcher = CloudClient::connect(
        cloud.addr(),
        "watcher",
        &[&format!("sites/{GATEWAY}/#")],
        false,
    )
    .await;
    let mut config = uplink_config("cloud", cloud.port);
    config.max_rate = Some(RATE);
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;
    for n in 0..COUNT {
        publish_local(&local.handle, "plant/seq", &n.to_string(), QoS::AtLeastOnce).await;
    }
    let mut arrivals = Vec::new();
    for n in 0..COUNT {
        let message = watcher
            .next_message(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("message {n} within 10 s"));
        assert_eq!(message.text(), n.to_string());
        arrivals.push(message.at);
    }
    let span = arrivals[arrivals.len() - 1] - arrivals[0];
    // A burst of 0.1 s (5 messages) may go at once, the others one every 1/RATE s: the
    // last arrives at least (COUNT - 6) / RATE = 1.08 s after the first. Without the cap
    // the 60 take a few milliseconds.
    let least = Duration::from_millis(u64::from(COUNT - 6) * 1000 / u64::from(RATE));
    eprintln!("{COUNT} messages at max_rate = {RATE}: {span:?} from first to last");
    assert!(
        span >= least - Duration::from_millis(100),
        "{COUNT} messages took {span:?} at max_rate = {RATE}/s (at least {least:?} expected)"
    );
    assert!(
        span < Duration::from_secs(5),
        "{COUNT} messages took {span:?} at max_rate = {RATE}/s: far slower than the cap"
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn messages_the_cloud_refuses_or_cannot_take_are_dropped_as_rejected_and_the_queue_moves_on()
{
    if !mosquitto_available("cloud_refusals") {
        return;
    }
    init_logs();
    // Mosquitto refuses publishes to `secret/` topics with PUBACK 0x87 (Not authorized,
    // MQTT 5) and announces a Maximum Packet Size of 1,024 bytes in its CONNACK.
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    std::fs::write(
        &acl,
        format!("topic readwrite #\ntopic deny sites/{GATEWAY}/secret/#\n"),
    )
    .unwrap();
    let cloud = Cloud::start(CloudOptions {
        mtls: None,
        extra: vec![
            format!("acl_file {}", acl.display()),
            "max_packet_size 1024".into(),
        ],
    });
    // Mosquitto 2.0.11 also closes the connection right after that PUBACK; later versions
    // may not. The proxy makes every cloud do it, so the refusal always arrives together
    // with the end of the connection (the hardest case for the uplink).
    let proxy = Proxy::start(cloud.addr()).await;
    proxy.set_close_after_refusal(true);
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut watcher = CloudClient::connect(
        cloud.addr(),
        "watcher",
        &[&format!("sites/{GATEWAY}/#")],
        false,
    )
    .await;
    let running = start_uplink(
        uplink_config("cloud", proxy.port()),
        dir.path(),
        &local.handle,
        &shutdown,
    )
    .await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;
    publish_local(
        &local.handle,
        "plant/secret/key",
        "refused",
        QoS::AtLeastOnce,
    )
    .await;
    publish_local(
        &local.handle,
        "plant/big",
        &"x".repeat(2000),
        QoS::AtLeastOnce,
    )
    .await;
    publish_local(&local.handle, "plant/ok", "after", QoS::AtLeastOnce).await;
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("sites/{GATEWAY}/ok"), "after".into())),
        "the message behind the refused and the oversized one gets through"
    );
    let stats = wait_outbox(&running, Duration::from_secs(10), |s| s.depth == 0).await;
    assert_eq!(
        (stats.dropped.rejected, stats.acked),
        (2, 1),
        "the refused and the oversized rows are dropped as rejected: {stats:?}"
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn durable_false_messages_are_dropped_and_counted_while_the_link_is_down() {
    if !mosquitto_available("durable_false") {
        return;
    }
    init_logs();
    const DOWN: usize = 20;
    let cloud = Cloud::start(CloudOptions::default());
    let proxy = Proxy::start(cloud.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut watcher = CloudClient::connect(
        cloud.addr(),
        "watcher",
        &[&format!("sites/{GATEWAY}/#")],
        false,
    )
    .await;
    let mut config = uplink_config("cloud", proxy.port());
    config.routes_out.insert(
        0,
        OutRoute {
            filter: "fast/#".into(),
            remote_prefix: Some(format!("sites/{GATEWAY}/fast/")),
            remote_template: None,
            qos: QoS::AtMostOnce,
            retain: false,
            durable: false,
            payload: None,
        },
    );
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;
    // The route works while the link is up.
    publish_local(&local.handle, "fast/vibration", "live", QoS::AtMostOnce).await;
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("sites/{GATEWAY}/fast/vibration"), "live".into()))
    );

    // The link goes down: the cloud is unreachable.
    proxy.set_refusing(true);
    proxy.close_all();
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == false
    })
    .await;
    for n in 0..DOWN {
        publish_local(
            &local.handle,
            "fast/vibration",
            &n.to_string(),
            QoS::AtMostOnce,
        )
        .await;
    }
    // The status is republished every 5 s.
    wait_status(&local.handle, "cloud", Duration::from_secs(12), |s| {
        s["dropped"]["not_durable"] == DOWN
    })
    .await;
    assert_eq!(
        running.outbox().stats().await.unwrap().depth,
        0,
        "nothing of a durable = false route is stored"
    );

    // Back up: what was dropped stays dropped; the next message is the first to arrive.
    proxy.set_refusing(false);
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;
    publish_local(&local.handle, "plant/marker", "end", QoS::AtLeastOnce).await;
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("sites/{GATEWAY}/marker"), "end".into())),
        "no message of the outage reaches the cloud"
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn a_qos_2_row_is_deleted_on_pubcomp_not_before() {
    if !mosquitto_available("qos_2_pubcomp") {
        return;
    }
    init_logs();
    let cloud = Cloud::start(CloudOptions::default());
    let proxy = Proxy::start(cloud.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut watcher = CloudClient::connect(
        cloud.addr(),
        "watcher",
        &[&format!("sites/{GATEWAY}/#")],
        false,
    )
    .await;
    let mut config = uplink_config("cloud", proxy.port());
    config.routes_out.insert(
        0,
        OutRoute {
            filter: "plant/exact/#".into(),
            remote_prefix: Some(format!("sites/{GATEWAY}/exact/")),
            remote_template: None,
            qos: QoS::ExactlyOnce,
            retain: false,
            durable: true,
            payload: None,
        },
    );
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;

    // The cloud's PUBCOMP is held back; its PUBREC and PUBACKs pass.
    proxy.hold_from_cloud(proxy::PUBCOMP);
    publish_local(&local.handle, "plant/exact/a", "two", QoS::AtLeastOnce).await;
    proxy.wait_held(1, Duration::from_secs(10)).await;
    // A QoS 1 row sent after the PUBREC arrived: once it is deleted, the uplink has
    // handled the PUBREC too.
    publish_local(&local.handle, "plant/one", "one", QoS::AtLeastOnce).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let exact = format!("sites/{GATEWAY}/exact/a");
    let one = format!("sites/{GATEWAY}/one");
    loop {
        let topics = outbox_topics(&running).await;
        if !topics.contains(&one) && running.outbox().stats().await.unwrap().acked >= 1 {
            assert_eq!(
                topics,
                vec![exact.clone()],
                "the QoS 2 row stays until its PUBCOMP"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the QoS 1 row was not deleted within 10 s: {topics:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    proxy.release();
    let stats = wait_outbox(&running, Duration::from_secs(10), |s| s.depth == 0).await;
    assert_eq!(stats.acked, 2, "{stats:?}");
    let mut arrived = vec![
        watcher.next(Duration::from_secs(10)).await,
        watcher.next(Duration::from_secs(10)).await,
    ];
    arrived.sort();
    assert_eq!(
        arrived,
        vec![Some((exact, "two".into())), Some((one, "one".into()))]
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn a_row_unacknowledged_when_the_link_drops_is_sent_again_after_the_reconnect() {
    if !mosquitto_available("resend_after_reconnect") {
        return;
    }
    init_logs();
    let cloud = Cloud::start(CloudOptions::default());
    let proxy = Proxy::start(cloud.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut watcher = CloudClient::connect(
        cloud.addr(),
        "watcher",
        &[&format!("sites/{GATEWAY}/#")],
        false,
    )
    .await;
    let running = start_uplink(
        uplink_config("cloud", proxy.port()),
        dir.path(),
        &local.handle,
        &shutdown,
    )
    .await;
    wait_status(&local.handle, "cloud", Duration::from_secs(10), |s| {
        s["connected"] == true
    })
    .await;
    // The cloud gets the message, its PUBACK is held back, then the link drops.
    proxy.hold_from_cloud(proxy::PUBACK);
    publish_local(&local.handle, "plant/once", "again", QoS::AtLeastOnce).await;
    proxy.wait_held(1, Duration::from_secs(10)).await;
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("sites/{GATEWAY}/once"), "again".into()))
    );
    proxy.close_all();
    proxy.release();
    // Nothing new is published: the row alone must make the uplink send it again.
    assert_eq!(
        watcher.next(Duration::from_secs(10)).await,
        Some((format!("sites/{GATEWAY}/once"), "again".into())),
        "the unacknowledged row is sent again after the reconnect"
    );
    let stats = wait_outbox(&running, Duration::from_secs(10), |s| s.depth == 0).await;
    assert_eq!(stats.acked, 1, "{stats:?}");
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn message_expiry_is_reduced_by_the_time_queued_and_expired_rows_are_dropped_and_counted() {
    if !mosquitto_available("message_expiry") {
        return;
    }
    init_logs();
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let broker_shutdown = CancellationToken::new();
    let local = local_broker(false, &broker_shutdown).await;
    let mut watcher = CloudClient::connect(
        cloud.addr(),
        "watcher",
        &[&format!("sites/{GATEWAY}/#")],
        false,
    )
    .await;

    // Queued while the cloud is unreachable.
    let away = CancellationToken::new();
    let running = start_uplink(
        uplink_config("cloud", free_port()),
        dir.path(),
        &local.handle,
        &away,
    )
    .await;
    publish_local_with_expiry(&local.handle, "plant/short", "1 s", 1).await;
    publish_local_with_expiry(&local.handle, "plant/long", "60 s", 60).await;
    publish_local(&local.handle, "plant/forever", "none", QoS::AtLeastOnce).await;
    wait_outbox(&running, Duration::from_secs(10), |s| s.depth == 3).await;
    let queued_at = tokio::time::Instant::now();
    away.cancel();
    running.wait().await.unwrap();
    // Two seconds in the queue: the first message's expiry passes.
    tokio::time::sleep_until(queued_at + Duration::from_millis(2100)).await;

    let back = CancellationToken::new();
    let running = start_uplink(
        uplink_config("cloud", cloud.port),
        dir.path(),
        &local.handle,
        &back,
    )
    .await;
    let long = watcher
        .next_message(Duration::from_secs(10))
        .await
        .expect("the 60 s message within 10 s");
    assert_eq!(
        (long.topic.as_str(), long.text().as_str()),
        (format!("sites/{GATEWAY}/long").as_str(), "60 s"),
        "the expired message is not sent"
    );
    let left = long.message_expiry.expect("the expiry travels");
    assert!(
        (1..=58).contains(&left),
        "2 s in the queue leave at most 58 s of 60, the cloud got {left}"
    );
    let forever = watcher
        .next_message(Duration::from_secs(10))
        .await
        .expect("the message without expiry");
    assert_eq!(forever.text(), "none");
    assert_eq!(forever.message_expiry, None);
    let stats = wait_outbox(&running, Duration::from_secs(10), |s| s.depth == 0).await;
    assert_eq!(
        (stats.dropped.expired, stats.acked),
        (1, 2),
        "the expired row is dropped and counted: {stats:?}"
    );
    back.cancel();
    running.wait().await.unwrap();
}

// Multi-threaded: the test blocks on the gateway process while the status client runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_password_from_password_file_or_password_env_is_used_to_connect() {
    if !mosquitto_available("uplink_password") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("mosquitto.passwd");
    for (user, password) in [("line1-file", "file-secret"), ("line1-env", "env-secret")] {
        let mut command = std::process::Command::new("mosquitto_passwd");
        if !passwd.exists() {
            command.arg("-c");
        }
        let status = command
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd");
    }
    let cloud = Cloud::start(CloudOptions {
        mtls: None,
        extra: vec![
            "allow_anonymous false".into(),
            format!("password_file {}", passwd.display()),
        ],
    });
    // With a trailing newline, as `echo secret > file` writes it.
    let password_file = dir.path().join("uplink.pass");
    std::fs::write(&password_file, "file-secret\n").unwrap();
    let uplink = |name: &str, credentials: &str| {
        format!(
            r#"
[[uplinks]]
name = "{name}"
url = "mqtt://127.0.0.1:{port}"
client_id = "{GATEWAY}-{name}"
reconnect = {{ min = "200ms", max = "1s" }}
{credentials}
"#,
            port = cloud.port
        )
    };
    let text = format!(
        r#"
[gateway]
id = "{GATEWAY}"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"
{file}{env}{wrong}{anonymous}"#,
        data = dir.path().join("data").display(),
        file = uplink(
            "file",
            &format!(
                "username = \"line1-file\"\npassword_file = \"{}\"",
                password_file.display()
            )
        ),
        env = uplink(
            "env",
            "username = \"line1-env\"\npassword_env = \"FIELDMQ_TEST_CLOUD_PASSWORD\""
        ),
        // Controls: the cloud really checks (a wrong password and no credentials fail).
        wrong = uplink(
            "wrong",
            "username = \"line1-env\"\npassword_env = \"FIELDMQ_TEST_WRONG_PASSWORD\""
        ),
        anonymous = uplink("anonymous", ""),
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, text).unwrap();
    let gateway = GatewayProcess::start_with_env(
        &config,
        &[
            ("FIELDMQ_TEST_CLOUD_PASSWORD", "env-secret"),
            ("FIELDMQ_TEST_WRONG_PASSWORD", "not-the-secret"),
        ],
    );
    let mut status = CloudClient::connect(
        gateway.addr,
        "status-reader",
        &[&format!("fieldmq/{GATEWAY}/status/uplinks/+")],
        false,
    )
    .await;
    let mut last = std::collections::HashMap::new();
    let done = |last: &std::collections::HashMap<String, serde_json::Value>| {
        let connected = |name: &str| last.get(name).is_some_and(|s| s["connected"] == true);
        let refused = |name: &str| {
            last.get(name).is_some_and(|s| {
                s["connected"] == false
                    && s["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("check `username` and the password"))
            })
        };
        connected("file") && connected("env") && refused("wrong") && refused("anonymous")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !done(&last) {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some((topic, payload)) = status.next(remaining).await else {
            panic!("statuses after 15 s: {last:?}");
        };
        let name = topic.rsplit('/').next().unwrap().to_string();
        last.insert(name, serde_json::from_str(&payload).unwrap());
    }
    drop(gateway);
}

#[tokio::test]
async fn the_alpn_protocols_are_offered_in_the_tls_handshake() {
    init_logs();
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    // A TLS server on loopback that records what the client offers and picks the first.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server_config = {
        let chain = pki::certs(&std::fs::read_to_string(&certs.server_cert).unwrap());
        let key = pki::key(&std::fs::read_to_string(&certs.server_key).unwrap());
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
        std::sync::Arc::new(config)
    };
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .unwrap();
        let offered: Vec<Vec<u8>> = start
            .client_hello()
            .alpn()
            .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        let tls = start.into_stream(server_config).await.unwrap();
        let chosen = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        (offered, chosen)
    });

    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let local = local_broker(false, &shutdown).await;
    let mut config = tls_uplink("cloud", port, &certs.ca, None);
    if let Some(tls) = config.tls.as_mut() {
        tls.alpn = vec!["x-amzn-mqtt-ca".into(), "mqtt".into()];
    }
    let running = start_uplink(config, dir.path(), &local.handle, &shutdown).await;
    let (offered, chosen) = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("a TLS handshake within 10 s")
        .unwrap();
    assert_eq!(
        offered,
        vec![b"x-amzn-mqtt-ca".to_vec(), b"mqtt".to_vec()],
        "the ALPN protocols in the ClientHello"
    );
    assert_eq!(chosen, Some(b"x-amzn-mqtt-ca".to_vec()));
    shutdown.cancel();
    running.wait().await.unwrap();
}
