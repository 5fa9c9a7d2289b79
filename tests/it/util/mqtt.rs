//! Helpers for the broker integration tests: the real broker in-process on an ephemeral
//! port, rumqttc clients (3.1.1 and 5) driven by a background task, and a raw TCP client
//! that sends hand-encoded bytes, for what a client library would hide or refuse to send.
//!
//! Every wait is bounded by [`WAIT`]; nothing sleeps to wait for readiness.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use fieldmq::broker::config::{BrokerConfig, ListenerConfig};
use fieldmq::broker::{self, BrokerHandle, RunningBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The bound on every wait for something that should happen.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// Await `future`, failing the test after [`WAIT`].
pub(crate) async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------------------

/// A broker config listening on one ephemeral 127.0.0.1 port, anonymous clients allowed.
pub(crate) fn config() -> BrokerConfig {
    BrokerConfig {
        listeners: vec![ListenerConfig {
            max_connections: 100,
            ..ListenerConfig::tcp("127.0.0.1:0".parse().expect("address"))
        }],
        allow_anonymous: true,
        password_file: None,
        max_packet_size: 1024 * 1024,
        max_queued_messages: 1000,
        max_inflight: 20,
        ..BrokerConfig::default()
    }
}

/// A broker started in-process; cancelled when dropped, or stopped and awaited by
/// [`TestBroker::stop`].
pub(crate) struct TestBroker {
    /// The first listener's address.
    pub(crate) addr: SocketAddr,
    /// Every listener's address, in the order of the config.
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) handle: BrokerHandle,
    shutdown: CancellationToken,
    running: Option<RunningBroker>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestBroker {
    pub(crate) async fn start(config: &BrokerConfig) -> TestBroker {
        TestBroker::start_in(config, None).await
    }

    async fn start_in(config: &BrokerConfig, dir: Option<tempfile::TempDir>) -> TestBroker {
        let shutdown = CancellationToken::new();
        let running = within(
            "the broker to start",
            broker::start(config, shutdown.clone()),
        )
        .await
        .expect("broker starts");
        TestBroker {
            addr: running.local_addrs[0],
            addrs: running.local_addrs.clone(),
            handle: running.handle.clone(),
            shutdown,
            running: Some(running),
            _dir: dir,
        }
    }

    /// Cancel the shutdown token, without waiting for the broker to finish.
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancel the shutdown token and wait until listeners, connections and router are done.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        let running = self.running.take().expect("a running broker");
        within("the broker to stop", running.wait()).await;
    }

    pub(crate) async fn sessions(&self) -> usize {
        self.handle.stats().await.expect("stats").sessions
    }

    pub(crate) async fn clients_connected(&self) -> usize {
        self.handle.stats().await.expect("stats").clients_connected
    }
}

pub(crate) async fn start(config: BrokerConfig) -> TestBroker {
    TestBroker::start(&config).await
}

/// A broker that refuses anonymous clients and knows `user` with password `password`.
pub(crate) async fn start_with_password(user: &str, password: &str) -> TestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    std::fs::write(
        &path,
        format!("{}\n", broker::hash_password(user, password)),
    )
    .expect("write password file");
    let mut config = config();
    config.allow_anonymous = false;
    config.password_file = Some(path);
    TestBroker::start_in(&config, Some(dir)).await
}

/// A broker with [`config`].
pub(crate) async fn start_default() -> TestBroker {
    start(config()).await
}

/// A 3.1.1 client subscribed to `alive/#` before anything bad happens: it must keep
/// publishing and receiving afterwards (see [`assert_still_works`]).
pub(crate) async fn witness(broker: &TestBroker) -> Client {
    let mut witness = Client::connect(Version::V311, broker.addr, "witness").await;
    assert_eq!(witness.subscribe("alive/#", 1).await, Some(1));
    witness
}

/// The [`witness`] still publishes and receives after what `tag` names.
pub(crate) async fn assert_still_works(witness: &mut Client, tag: &str) {
    let tag: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let tag = tag.as_str();
    let topic = format!("alive/{tag}");
    witness.publish(&topic, 1, false, tag.as_bytes()).await;
    let received = witness.recv().await;
    assert_eq!(
        (received.topic.as_str(), received.payload.as_slice()),
        (topic.as_str(), tag.as_bytes()),
        "the other client still publishes and receives after {tag}"
    );
}

/// A raw CONNECT of `version` with default settings.
pub(crate) fn connect_for(version: Version, client_id: &str) -> packet::Connect<'_> {
    match version {
        Version::V311 => packet::Connect::v311(client_id),
        Version::V5 => packet::Connect::v5(client_id),
    }
}

/// A client id for a raw client that misbehaves in the way `what` names.
pub(crate) fn bad_client_id(what: &str, version: Version) -> String {
    let what: String = what
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("bad-{what}-{version:?}")
}

/// A raw client of `version` sends `bad` after a good CONNECT: the broker closes that
/// connection (3.1.1 without sending anything, MQTT 5 after exactly one DISCONNECT with one
/// of `v5_reasons`), and the [`witness`] is unaffected.
pub(crate) async fn assert_bad_packet_closes_only_its_connection(
    broker: &TestBroker,
    witness: &mut Client,
    version: Version,
    what: &str,
    bad: &[u8],
    v5_reasons: &[u8],
) {
    let id = bad_client_id(what, version);
    let mut raw = Raw::connected(broker.addr, &connect_for(version, &id)).await;
    raw.send(bad).await;
    let frames = raw.expect_closed().await;
    match version {
        Version::V311 => assert!(
            frames.is_empty(),
            "{what}: 3.1.1 closes without sending anything, got {frames:?}"
        ),
        Version::V5 => {
            assert_eq!(frames.len(), 1, "{what}: one DISCONNECT, got {frames:?}");
            let reason = frames[0].disconnect_reason();
            assert!(
                v5_reasons.contains(&reason),
                "{what}: DISCONNECT reason {reason:#04x}, expected one of {v5_reasons:02x?}"
            );
        }
    }
    assert_still_works(witness, &format!("{what}-{version:?}")).await;
}

/// A persistent 3.1.1 session (`options` with a clean session off) subscribed to `filter`
/// with QoS 1, then offline: returns once the SUBACK (10 s at most) and the DISCONNECT
/// are through.
pub(crate) async fn register_offline_subscriber(options: rumqttc::MqttOptions, filter: &str) {
    let id = options.client_id();
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => return,
                Ok(_) => {}
                Err(error) => panic!("subscriber {id} failed: {error}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no SUBACK for {id} within 10 s"));
    client.disconnect().await.expect("disconnect");
    // Let the DISCONNECT go out before the event loop is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// rumqttc clients, both versions behind one type
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

/// A publish as a client received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
}

/// The events the tests care about, the same for both protocol versions.
#[derive(Debug)]
enum Ev {
    ConnAck {
        accepted: bool,
        session_present: bool,
    },
    /// Granted QoS per filter; `None` for a failure code.
    SubAck(Vec<Option<u8>>),
    PubAck,
    PubComp,
    PubRel,
    Publish(Received),
    Disconnect(u8),
    Other,
    Error(String),
}

fn qos_v3(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn ev_v3(event: rumqttc::Event) -> Ev {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => Ev::ConnAck {
            accepted: ack.code == rumqttc::ConnectReturnCode::Success,
            session_present: ack.session_present,
        },
        Event::Incoming(Packet::SubAck(ack)) => Ev::SubAck(
            ack.return_codes
                .iter()
                .map(|code| match code {
                    SubscribeReasonCode::Success(qos) => Some(*qos as u8),
                    SubscribeReasonCode::Failure => None,
                })
                .collect(),
        ),
        Event::Incoming(Packet::PubAck(_)) => Ev::PubAck,
        Event::Incoming(Packet::PubComp(_)) => Ev::PubComp,
        Event::Incoming(Packet::PubRel(_)) => Ev::PubRel,
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Received {
            topic: p.topic,
            payload: p.payload.to_vec(),
            qos: p.qos as u8,
            retain: p.retain,
        }),
        _ => Ev::Other,
    }
}

fn ev_v5(event: rumqttc::v5::Event) -> Ev {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, SubscribeReasonCode};
    use rumqttc::v5::Event;
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => Ev::ConnAck {
            accepted: ack.code == ConnectReturnCode::Success,
            session_present: ack.session_present,
        },
        Event::Incoming(Packet::SubAck(ack)) => Ev::SubAck(
            ack.return_codes
                .iter()
                .map(|code| match code {
                    SubscribeReasonCode::Success(qos) => Some(*qos as u8),
                    _ => None,
                })
                .collect(),
        ),
        Event::Incoming(Packet::PubAck(_)) => Ev::PubAck,
        Event::Incoming(Packet::PubComp(_)) => Ev::PubComp,
        Event::Incoming(Packet::PubRel(_)) => Ev::PubRel,
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Received {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
            qos: p.qos as u8,
            retain: p.retain,
        }),
        Event::Incoming(Packet::Disconnect(d)) => Ev::Disconnect(d.reason_code as u8),
        _ => Ev::Other,
    }
}

enum Inner {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A rumqttc client whose event loop runs in its own task. The loop stops at the first
/// error (no automatic reconnect); dropping the client drops the connection without
/// DISCONNECT.
pub(crate) struct Client {
    inner: Inner,
    events: mpsc::UnboundedReceiver<Ev>,
    task: JoinHandle<()>,
    /// Publishes that arrived while waiting for something else.
    pending: VecDeque<Received>,
    /// PUBRELs seen (QoS 2 deliveries whose PUBREC the broker got).
    pub(crate) pubrels: usize,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    pub(crate) fn options_v3(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    pub(crate) fn options_v5(addr: SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
        let mut options = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// Connect with default options and wait for a successful CONNACK.
    pub(crate) async fn connect(version: Version, addr: SocketAddr, id: &str) -> Client {
        let (client, session_present) = match version {
            Version::V311 => Client::connect_v3(Client::options_v3(addr, id)).await,
            Version::V5 => Client::connect_v5(Client::options_v5(addr, id)).await,
        };
        assert!(!session_present, "{id}: a new clean session is not present");
        client
    }

    /// Connect and wait for a successful CONNACK; returns the session-present flag.
    pub(crate) async fn connect_v3(options: rumqttc::MqttOptions) -> (Client, bool) {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let (event, stop) = match eventloop.poll().await {
                    Ok(event) => (ev_v3(event), false),
                    Err(error) => (Ev::Error(error.to_string()), true),
                };
                if tx.send(event).is_err() || stop {
                    break;
                }
            }
        });
        Client::new(Inner::V3(client), events, task).await
    }

    pub(crate) async fn connect_v5(options: rumqttc::v5::MqttOptions) -> (Client, bool) {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let (event, stop) = match eventloop.poll().await {
                    Ok(event) => (ev_v5(event), false),
                    Err(error) => (Ev::Error(error.to_string()), true),
                };
                if tx.send(event).is_err() || stop {
                    break;
                }
            }
        });
        Client::new(Inner::V5(client), events, task).await
    }

    async fn new(
        inner: Inner,
        events: mpsc::UnboundedReceiver<Ev>,
        task: JoinHandle<()>,
    ) -> (Client, bool) {
        let mut client = Client {
            inner,
            events,
            task,
            pending: VecDeque::new(),
            pubrels: 0,
        };
        let session_present = within("CONNACK", async {
            loop {
                match client.event().await {
                    Ev::ConnAck {
                        accepted: true,
                        session_present,
                    } => return session_present,
                    Ev::ConnAck {
                        accepted: false, ..
                    } => panic!("connection refused"),
                    _ => {}
                }
            }
        })
        .await;
        (client, session_present)
    }

    /// The next event; publishes are kept aside, errors fail the test.
    async fn event(&mut self) -> Ev {
        let event = self.events.recv().await.expect("event loop task ended");
        match event {
            Ev::Error(error) => panic!("client connection failed: {error}"),
            Ev::Disconnect(reason) => panic!("broker sent DISCONNECT {reason:#04x}"),
            Ev::Publish(publish) => {
                self.pending.push_back(publish);
                Ev::Other
            }
            Ev::PubRel => {
                self.pubrels += 1;
                Ev::PubRel
            }
            other => other,
        }
    }

    /// Subscribe to one filter and wait for its SUBACK; returns the granted QoS.
    pub(crate) async fn subscribe(&mut self, filter: &str, qos: u8) -> Option<u8> {
        let sent = match &self.inner {
            Inner::V3(c) => c
                .subscribe(filter, qos_v3(qos))
                .await
                .map_err(|e| e.to_string()),
            Inner::V5(c) => c
                .subscribe(filter, qos_v5(qos))
                .await
                .map_err(|e| e.to_string()),
        };
        sent.unwrap_or_else(|e| panic!("subscribe {filter}: {e}"));
        within("SUBACK", async {
            loop {
                if let Ev::SubAck(codes) = self.event().await {
                    return codes[0];
                }
            }
        })
        .await
    }

    /// Publish and wait until the broker has acknowledged it (PUBACK for QoS 1, PUBCOMP
    /// for QoS 2; for QoS 0 until the event loop has written it).
    pub(crate) async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        let sent = match &self.inner {
            Inner::V3(c) => c
                .publish(topic, qos_v3(qos), retain, payload.to_vec())
                .await
                .map_err(|e| e.to_string()),
            Inner::V5(c) => c
                .publish(topic, qos_v5(qos), retain, payload.to_vec())
                .await
                .map_err(|e| e.to_string()),
        };
        sent.unwrap_or_else(|e| panic!("publish {topic}: {e}"));
        if qos == 0 {
            return;
        }
        within("the broker's acknowledgement", async {
            loop {
                match (qos, self.event().await) {
                    (1, Ev::PubAck) | (2, Ev::PubComp) => return,
                    _ => {}
                }
            }
        })
        .await;
    }

    /// The next publish this client receives.
    pub(crate) async fn recv(&mut self) -> Received {
        within("a publish", async {
            loop {
                if let Some(publish) = self.pending.pop_front() {
                    return publish;
                }
                self.event().await;
            }
        })
        .await
    }

    /// Every publish received up to and including the first on `sentinel`, which is
    /// left out. The sentinel is published after the messages under test by the same
    /// publisher, so anything that was going to arrive has arrived before it.
    pub(crate) async fn recv_until(&mut self, sentinel: &str) -> Vec<Received> {
        let mut received = Vec::new();
        loop {
            let publish = self.recv().await;
            if publish.topic == sentinel {
                return received;
            }
            received.push(publish);
        }
    }

    /// Wait until `n` PUBRELs have arrived in total.
    pub(crate) async fn wait_pubrels(&mut self, n: usize) {
        within("PUBREL", async {
            while self.pubrels < n {
                self.event().await;
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// Raw bytes
// ---------------------------------------------------------------------------------------

/// One MQTT packet as it came off the wire (fixed header included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) bytes: Vec<u8>,
    body_start: usize,
}

impl Frame {
    /// Take the first whole packet off the front of `buf`, if it holds one.
    pub(crate) fn split_off(buf: &mut BytesMut) -> Option<Frame> {
        if buf.len() < 2 {
            return None;
        }
        let (len, len_len) = varint(&buf[1..])?;
        let total = 1 + len_len + len;
        if buf.len() < total {
            return None;
        }
        Some(Frame {
            bytes: buf.split_to(total).to_vec(),
            body_start: 1 + len_len,
        })
    }

    /// The packet type (upper four bits of the first byte).
    pub(crate) fn kind(&self) -> u8 {
        self.bytes[0] >> 4
    }

    pub(crate) fn body(&self) -> &[u8] {
        &self.bytes[self.body_start..]
    }

    /// CONNACK: (session present, return or reason code).
    pub(crate) fn connack(&self) -> (bool, u8) {
        assert_eq!(self.kind(), 2, "expected CONNACK, got {self:?}");
        (self.body()[0] & 1 == 1, self.body()[1])
    }

    /// DISCONNECT reason code (0 when absent).
    pub(crate) fn disconnect_reason(&self) -> u8 {
        assert_eq!(self.kind(), 14, "expected DISCONNECT, got {self:?}");
        self.body().first().copied().unwrap_or(0)
    }

    /// Decode with rumqttc's MQTT 5 codec (for properties).
    pub(crate) fn v5(&self) -> rumqttc::v5::mqttbytes::v5::Packet {
        let mut buf = BytesMut::from(&self.bytes[..]);
        rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).expect("a valid MQTT 5 packet")
    }

    /// PUBLISH: the message and its packet id.
    pub(crate) fn publish(&self, version: Version) -> (Received, u16) {
        assert_eq!(self.kind(), 3, "expected PUBLISH, got {self:?}");
        let flags = self.bytes[0] & 0x0F;
        let qos = (flags >> 1) & 3;
        let body = self.body();
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).expect("UTF-8 topic");
        let mut at = 2 + topic_len;
        let mut pkid = 0;
        if qos > 0 {
            pkid = u16::from_be_bytes([body[at], body[at + 1]]);
            at += 2;
        }
        if version == Version::V5 {
            let (len, len_len) = varint(&body[at..]).expect("property length");
            at += len_len + len;
        }
        let received = Received {
            topic,
            payload: body[at..].to_vec(),
            qos,
            retain: flags & 1 == 1,
        };
        (received, pkid)
    }
}

/// Decode a variable byte integer: (value, bytes used).
fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// A TCP connection speaking hand-made MQTT.
pub(crate) struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub(crate) async fn open(addr: SocketAddr) -> Raw {
        let stream = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Open from `source` (any 127/8 address on Linux), so the broker sees another client
    /// address than 127.0.0.1.
    pub(crate) async fn open_from(addr: SocketAddr, source: std::net::IpAddr) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source address");
        let stream = within("TCP connect", socket.connect(addr))
            .await
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Open, send `connect` and return the broker's first answer (CONNACK expected).
    pub(crate) async fn connect(addr: SocketAddr, connect: &packet::Connect<'_>) -> (Raw, Frame) {
        let mut raw = Raw::open(addr).await;
        raw.send(&connect.encode()).await;
        let connack = raw.recv().await.expect("CONNACK, not a closed connection");
        (raw, connack)
    }

    /// Connect and assert the connection is accepted with a clean session.
    pub(crate) async fn connected(addr: SocketAddr, connect: &packet::Connect<'_>) -> Raw {
        let (raw, connack) = Raw::connect(addr, connect).await;
        assert_eq!(connack.connack(), (false, 0), "CONNACK for {connect:?}");
        raw
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).await.expect("send");
    }

    /// Send, tolerating a broker that already closed the connection.
    pub(crate) async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        within("send", async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
    }

    /// Half-close: the broker reads end of stream; we can still read its answer.
    pub(crate) async fn shutdown_write(&mut self) {
        within("shutdown", self.stream.shutdown())
            .await
            .expect("shutdown");
    }

    /// The next packet, or `None` when the broker closed the connection.
    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        within("a packet from the broker", self.read_frame()).await
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = Frame::split_off(&mut self.buf) {
                return Some(frame);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => {
                    assert!(
                        self.buf.is_empty(),
                        "connection closed inside a packet: {:?}",
                        self.buf
                    );
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// Read until the broker closes the connection; returns what it sent before.
    pub(crate) async fn expect_closed(&mut self) -> Vec<Frame> {
        within("the broker to close the connection", async {
            let mut frames = Vec::new();
            while let Some(frame) = self.read_frame().await {
                frames.push(frame);
            }
            frames
        })
        .await
    }

    /// Nothing at all (no packet, no close) arrives for `quiet`.
    pub(crate) async fn assert_quiet_for(&mut self, quiet: Duration) {
        if let Ok(frame) = tokio::time::timeout(quiet, self.read_frame()).await {
            panic!("expected silence for {quiet:?}, got {frame:?}");
        }
    }

    /// Everything the broker sends before it answers two PINGREQs in a row. Whatever the
    /// broker could send when the first ping arrived is written before the second
    /// PINGRESP, so this is a barrier, not a guess.
    pub(crate) async fn until_ping_barrier(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        for _ in 0..2 {
            self.send(&packet::pingreq()).await;
            loop {
                let frame = self.recv().await.expect("connection open");
                if frame.kind() == 13 {
                    break;
                }
                frames.push(frame);
            }
        }
        frames
    }
}

/// Hand-written MQTT packet encoders: exactly the bytes asked for, malformed if asked.
pub(crate) mod packet {
    /// Append a variable byte integer.
    pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: usize) {
        loop {
            let mut byte = (value % 128) as u8;
            value /= 128;
            if value > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if value == 0 {
                break;
            }
        }
    }

    /// Fixed header byte, remaining length, body.
    pub(crate) fn frame(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        put_varint(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    /// A two-byte length and the bytes.
    pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u16::try_from(bytes.len()).expect("short").to_be_bytes());
        out.extend_from_slice(bytes);
    }

    #[derive(Debug, Clone)]
    pub(crate) struct Will<'a> {
        pub(crate) topic: &'a str,
        pub(crate) payload: &'a [u8],
        pub(crate) qos: u8,
        pub(crate) retain: bool,
    }

    #[derive(Debug, Clone)]
    pub(crate) struct Connect<'a> {
        pub(crate) protocol_name: &'a str,
        pub(crate) level: u8,
        pub(crate) client_id: &'a str,
        pub(crate) clean: bool,
        pub(crate) keep_alive: u16,
        pub(crate) will: Option<Will<'a>>,
        pub(crate) username: Option<&'a str>,
        pub(crate) password: Option<&'a str>,
        /// MQTT 5 CONNECT properties, already encoded (see [`property_u32`] and friends).
        pub(crate) properties: Vec<u8>,
    }

    impl<'a> Connect<'a> {
        /// MQTT 3.1.1, clean session, keep alive 60 s.
        pub(crate) fn v311(client_id: &'a str) -> Connect<'a> {
            Connect {
                protocol_name: "MQTT",
                level: 4,
                client_id,
                clean: true,
                keep_alive: 60,
                will: None,
                username: None,
                password: None,
                properties: Vec::new(),
            }
        }

        /// MQTT 5, clean start, keep alive 60 s, no properties.
        pub(crate) fn v5(client_id: &'a str) -> Connect<'a> {
            Connect {
                level: 5,
                ..Connect::v311(client_id)
            }
        }

        pub(crate) fn encode(&self) -> Vec<u8> {
            let v5 = self.level == 5;
            let mut body = Vec::new();
            put_bytes(&mut body, self.protocol_name.as_bytes());
            body.push(self.level);
            let mut flags = 0u8;
            if self.clean {
                flags |= 0x02;
            }
            if let Some(will) = &self.will {
                flags |= 0x04 | (will.qos << 3);
                if will.retain {
                    flags |= 0x20;
                }
            }
            if self.password.is_some() {
                flags |= 0x40;
            }
            if self.username.is_some() {
                flags |= 0x80;
            }
            body.push(flags);
            body.extend_from_slice(&self.keep_alive.to_be_bytes());
            if v5 {
                put_varint(&mut body, self.properties.len());
                body.extend_from_slice(&self.properties);
            }
            put_bytes(&mut body, self.client_id.as_bytes());
            if let Some(will) = &self.will {
                if v5 {
                    body.push(0); // will properties
                }
                put_bytes(&mut body, will.topic.as_bytes());
                put_bytes(&mut body, will.payload);
            }
            if let Some(username) = self.username {
                put_bytes(&mut body, username.as_bytes());
            }
            if let Some(password) = self.password {
                put_bytes(&mut body, password.as_bytes());
            }
            frame(0x10, &body)
        }
    }

    pub(crate) fn property_u16(id: u8, value: u16) -> Vec<u8> {
        let mut out = vec![id];
        out.extend_from_slice(&value.to_be_bytes());
        out
    }

    pub(crate) fn property_u32(id: u8, value: u32) -> Vec<u8> {
        let mut out = vec![id];
        out.extend_from_slice(&value.to_be_bytes());
        out
    }

    pub(crate) fn property_str(id: u8, value: &str) -> Vec<u8> {
        let mut out = vec![id];
        put_bytes(&mut out, value.as_bytes());
        out
    }

    pub(crate) fn property_varint(id: u8, value: usize) -> Vec<u8> {
        let mut out = vec![id];
        put_varint(&mut out, value);
        out
    }

    pub(crate) fn property_pair(key: &str, value: &str) -> Vec<u8> {
        let mut out = vec![USER_PROPERTY];
        put_bytes(&mut out, key.as_bytes());
        put_bytes(&mut out, value.as_bytes());
        out
    }

    pub(crate) const SESSION_EXPIRY: u8 = 0x11;
    pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
    pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
    pub(crate) const WILL_DELAY: u8 = 0x18;
    pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub(crate) const TOPIC_ALIAS: u8 = 0x23;
    pub(crate) const REASON_STRING: u8 = 0x1F;
    pub(crate) const USER_PROPERTY: u8 = 0x26;

    /// A property list: its length, then the properties.
    pub(crate) fn put_properties(out: &mut Vec<u8>, properties: &[u8]) {
        put_varint(out, properties.len());
        out.extend_from_slice(properties);
    }

    /// PUBLISH with any QoS bits (even 3) and any packet id (even 0); the packet id is
    /// written whenever `qos > 0`. MQTT 5 gets an empty property list.
    pub(crate) fn publish(
        v5: bool,
        topic: &[u8],
        qos: u8,
        retain: bool,
        pkid: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, topic);
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        frame(0x30 | (qos << 1) | u8::from(retain), &body)
    }

    /// SUBSCRIBE to `filters` (filter, QoS).
    pub(crate) fn subscribe(v5: bool, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if v5 {
            body.push(0);
        }
        for (filter, qos) in filters {
            put_bytes(&mut body, filter.as_bytes());
            body.push(*qos);
        }
        frame(0x82, &body)
    }

    /// PUBLISH with any first byte (flags included), an optional packet id and, for MQTT 5
    /// (`properties` is `Some`), the given property list.
    pub(crate) fn publish_with(
        first: u8,
        topic: &str,
        pkid: Option<u16>,
        properties: Option<&[u8]>,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, topic.as_bytes());
        if let Some(pkid) = pkid {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if let Some(properties) = properties {
            put_properties(&mut body, properties);
        }
        body.extend_from_slice(payload);
        frame(first, &body)
    }

    /// SUBSCRIBE with any first byte, packet id, raw subscription options byte per filter
    /// and, for MQTT 5 (`properties` is `Some`), the given property list.
    pub(crate) fn subscribe_with(
        first: u8,
        pkid: u16,
        properties: Option<&[u8]>,
        filters: &[(&str, u8)],
    ) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if let Some(properties) = properties {
            put_properties(&mut body, properties);
        }
        for (filter, options) in filters {
            put_bytes(&mut body, filter.as_bytes());
            body.push(*options);
        }
        frame(first, &body)
    }

    /// UNSUBSCRIBE with any first byte and packet id; MQTT 5 when `properties` is `Some`.
    pub(crate) fn unsubscribe_with(
        first: u8,
        pkid: u16,
        properties: Option<&[u8]>,
        filters: &[&str],
    ) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if let Some(properties) = properties {
            put_properties(&mut body, properties);
        }
        for filter in filters {
            put_bytes(&mut body, filter.as_bytes());
        }
        frame(first, &body)
    }

    /// PUBACK without reason code (valid in both versions).
    pub(crate) fn puback(pkid: u16) -> Vec<u8> {
        frame(0x40, &pkid.to_be_bytes())
    }

    pub(crate) fn pingreq() -> Vec<u8> {
        vec![0xC0, 0x00]
    }

    /// DISCONNECT with no variable header (3.1.1, or MQTT 5 normal disconnection).
    pub(crate) fn disconnect() -> Vec<u8> {
        vec![0xE0, 0x00]
    }

    /// MQTT 5 DISCONNECT with a reason code and an empty property list.
    pub(crate) fn disconnect_v5(reason: u8) -> Vec<u8> {
        frame(0xE0, &[reason, 0])
    }
}

/// Publishes `payload` on `topic` at QoS 1, not retained, from inside the process, as a
/// client of the embedded broker `broker` would.
pub(crate) async fn publish_in_process(broker: &BrokerHandle, topic: &str, payload: &str) {
    broker
        .publish(fieldmq::model::Message::internal(
            "test",
            topic.to_owned(),
            payload.to_owned(),
            fieldmq::model::QoS::AtLeastOnce,
            false,
        ))
        .await
        .expect("the embedded broker takes the message");
}
