//! MQTT 5 in the embedded broker, one test (or a small table) per feature issue 3 lists:
//! session expiry, persistence across a restart, message expiry, topic aliases both ways,
//! subscription options and identifiers, Receive Maximum and Maximum Packet Size both ways,
//! server keep alive, properties forwarded unchanged, will delay, shared subscriptions, what
//! CONNACK advertises and the server's DISCONNECT. The assigned client identifier is tested
//! in `tests/broker.rs` (`an_empty_client_id_gets_an_assigned_client_identifier_in_mqtt_5`).
//!
//! The broker runs in-process on an ephemeral port, started here (not through the shared
//! helper) so that a test can stop it and start it again on the same store. Clients are raw
//! packets encoded and decoded with rumqttc's MQTT 5 codec where a client library would hide
//! a property, and rumqttc v5 clients elsewhere. Every wait is bounded by [`WAIT`]; the only
//! sleeps are for time that must pass (an expiry, a will delay) or to show that something
//! does *not* happen.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fieldmq::broker::config::{BrokerConfig, Durability, ListenerConfig};
use mqtt::{within, Raw, TestBroker};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet, PubAck, PubComp, PubRec,
    PubRel, Publish, PublishProperties, RetainForwardRule, Subscribe, SubscribeProperties,
    SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::util::mqtt;

// ---------------------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------------------

/// One ephemeral 127.0.0.1 listener, anonymous clients, everything in memory.
fn config() -> BrokerConfig {
    BrokerConfig {
        listeners: vec![ListenerConfig::tcp("127.0.0.1:0".parse().expect("address"))],
        allow_anonymous: true,
        ..BrokerConfig::default()
    }
}

/// [`config`] with `sync` durability on a store in `dir`, and room for long queues.
fn durable_config(dir: &Path) -> BrokerConfig {
    BrokerConfig {
        durability: Durability::Sync,
        store_path: dir.join("broker.db"),
        max_queued_messages: 10_000,
        ..config()
    }
}

/// Poll `condition` until it holds, failing the test after [`WAIT`].
async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// A raw MQTT 5 client: rumqttc's codec over `mqtt::Raw`, nothing else in between
// ---------------------------------------------------------------------------------------

fn properties() -> ConnectProperties {
    ConnectProperties::new()
}

fn with_expiry(seconds: u32) -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: Some(seconds),
        ..ConnectProperties::new()
    }
}

fn connect_packet(client_id: &str, clean_start: bool, properties: ConnectProperties) -> Connect {
    Connect {
        keep_alive: 60,
        client_id: client_id.to_owned(),
        clean_start,
        properties: Some(properties),
    }
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

fn message(topic: &str, qos: QoS, payload: impl Into<Bytes>) -> Publish {
    Publish::new(topic, qos, payload, None)
}

fn with_properties(mut publish: Publish, properties: PublishProperties) -> Publish {
    publish.properties = Some(properties);
    publish
}

fn retained(mut publish: Publish) -> Publish {
    publish.retain = true;
    publish
}

fn topic(publish: &Publish) -> String {
    String::from_utf8(publish.topic.to_vec()).expect("UTF-8 topic")
}

fn payload(publish: &Publish) -> String {
    String::from_utf8(publish.payload.to_vec()).expect("UTF-8 payload")
}

/// (topic, payload) of each publish, to compare with expectations in one assertion.
fn summary(publishes: &[Publish]) -> Vec<(String, String)> {
    publishes.iter().map(|p| (topic(p), payload(p))).collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect()
}

/// The publishes among `packets`; anything else fails the test.
fn only_publishes(packets: Vec<Packet>) -> Vec<Publish> {
    packets
        .into_iter()
        .map(|packet| match packet {
            Packet::Publish(publish) => publish,
            other => panic!("expected only PUBLISH packets, got {other:?}"),
        })
        .collect()
}

struct Peer {
    raw: Raw,
    next_pkid: u16,
    /// Packets that arrived while waiting for a particular answer.
    pending: VecDeque<Packet>,
}

impl Peer {
    /// Open a connection and send CONNECT; returns the CONNACK, whatever its code.
    async fn open(addr: SocketAddr, connect: Connect, will: Option<LastWill>) -> (Peer, ConnAck) {
        let mut peer = Peer {
            raw: Raw::open(addr).await,
            next_pkid: 0,
            pending: VecDeque::new(),
        };
        peer.send(Packet::Connect(connect, will, None)).await;
        match peer.recv().await {
            Some(Packet::ConnAck(ack)) => (peer, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connect with clean start and `properties`; the CONNACK must accept a new session.
    async fn connect(addr: SocketAddr, client_id: &str, properties: ConnectProperties) -> Peer {
        let (peer, ack) = Peer::open(addr, connect_packet(client_id, true, properties), None).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{client_id}: {ack:?}");
        assert!(!ack.session_present, "{client_id}: clean start");
        peer
    }

    /// Reconnect without clean start; returns whether the broker had the session.
    async fn resume(
        addr: SocketAddr,
        client_id: &str,
        properties: ConnectProperties,
    ) -> (Peer, bool) {
        let (peer, ack) =
            Peer::open(addr, connect_packet(client_id, false, properties), None).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{client_id}: {ack:?}");
        (peer, ack.session_present)
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    async fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, None).expect("encodable packet");
        self.raw.send(&buf).await;
    }

    /// The next packet (kept-aside ones first), or `None` once the broker has closed.
    async fn recv(&mut self) -> Option<Packet> {
        if let Some(packet) = self.pending.pop_front() {
            return Some(packet);
        }
        self.raw.recv().await.map(|frame| frame.v5())
    }

    /// Read until `pick` accepts a packet; what it rejects is kept for later.
    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        let mut skipped = Vec::new();
        let found = loop {
            let frame = self
                .raw
                .recv()
                .await
                .unwrap_or_else(|| panic!("connection closed while waiting for {what}"));
            let packet = frame.v5();
            if let Some(found) = pick(&packet) {
                break found;
            }
            skipped.push(packet);
        };
        self.pending.extend(skipped);
        found
    }

    /// SUBSCRIBE and wait for the SUBACK; returns its reason codes.
    async fn subscribe_with(
        &mut self,
        filters: Vec<Filter>,
        id: Option<usize>,
    ) -> Vec<SubscribeReasonCode> {
        let pkid = self.pkid();
        let properties = id.map(|id| SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        let mut subscribe = Subscribe::new_many(filters, properties);
        subscribe.pkid = pkid;
        self.send(Packet::Subscribe(subscribe)).await;
        self.wait_for("SUBACK", |packet| match packet {
            Packet::SubAck(ack) if ack.pkid == pkid => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
    }

    /// Subscribe to one filter; the broker must grant the requested QoS.
    async fn subscribe(&mut self, filter: Filter) {
        let qos = filter.qos;
        let codes = self.subscribe_with(vec![filter.clone()], None).await;
        assert_eq!(codes, [SubscribeReasonCode::Success(qos)], "{filter:?}");
    }

    /// Publish and wait for the broker's acknowledgement: PUBACK for QoS 1, the whole
    /// PUBREC, PUBREL, PUBCOMP exchange for QoS 2. QoS 0 returns once written.
    async fn publish(&mut self, mut publish: Publish) {
        let qos = publish.qos;
        if qos != QoS::AtMostOnce {
            publish.pkid = self.pkid();
        }
        let pkid = publish.pkid;
        self.send(Packet::Publish(publish)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.wait_for("PUBACK", |p| match p {
                    Packet::PubAck(ack) if ack.pkid == pkid => Some(()),
                    _ => None,
                })
                .await
            }
            QoS::ExactlyOnce => {
                self.wait_for("PUBREC", |p| match p {
                    Packet::PubRec(ack) if ack.pkid == pkid => Some(()),
                    _ => None,
                })
                .await;
                self.send(Packet::PubRel(PubRel::new(pkid, None))).await;
                self.wait_for("PUBCOMP", |p| match p {
                    Packet::PubComp(ack) if ack.pkid == pkid => Some(()),
                    _ => None,
                })
                .await;
            }
        }
    }

    /// Publish QoS 1 messages with at most `window` unacknowledged (the broker's Receive
    /// Maximum) and wait until all are acknowledged.
    async fn publish_all(&mut self, messages: Vec<Publish>, window: usize) {
        let mut unacked = VecDeque::new();
        for mut publish in messages {
            assert_eq!(publish.qos, QoS::AtLeastOnce);
            if unacked.len() >= window {
                self.wait_puback(&mut unacked).await;
            }
            publish.pkid = self.pkid();
            unacked.push_back(publish.pkid);
            self.send(Packet::Publish(publish)).await;
        }
        while !unacked.is_empty() {
            self.wait_puback(&mut unacked).await;
        }
    }

    async fn wait_puback(&mut self, unacked: &mut VecDeque<u16>) {
        let pkid = self
            .wait_for("PUBACK", |p| match p {
                Packet::PubAck(ack) => Some(ack.pkid),
                _ => None,
            })
            .await;
        assert_eq!(unacked.pop_front(), Some(pkid), "PUBACKs come in order");
    }

    /// Everything the broker sends before it answers two PINGREQs in a row (see
    /// `Raw::until_ping_barrier`): whatever it could send has been sent.
    async fn barrier(&mut self) -> Vec<Packet> {
        let mut packets: Vec<Packet> = self.pending.drain(..).collect();
        packets.extend(
            self.raw
                .until_ping_barrier()
                .await
                .into_iter()
                .map(|frame| frame.v5()),
        );
        packets
    }

    /// The publishes the broker has for this client now, and nothing else.
    async fn publishes(&mut self) -> Vec<Publish> {
        only_publishes(self.barrier().await)
    }

    /// The next publish, however long it takes (bounded).
    async fn next_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(publish)) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Acknowledge a received QoS 1 (PUBACK) or complete a QoS 2 (PUBREC; the PUBREL
    /// that follows is answered with PUBCOMP).
    async fn ack(&mut self, publish: &Publish) {
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.send(Packet::PubAck(PubAck::new(publish.pkid, None)))
                    .await
            }
            QoS::ExactlyOnce => {
                let pkid = publish.pkid;
                self.send(Packet::PubRec(PubRec::new(pkid, None))).await;
                self.wait_for("PUBREL", |p| match p {
                    Packet::PubRel(rel) if rel.pkid == pkid => Some(()),
                    _ => None,
                })
                .await;
                self.send(Packet::PubComp(PubComp::new(pkid, None))).await;
            }
        }
    }

    /// Send DISCONNECT (normal, optionally with a new session expiry) and wait until the
    /// broker closes: by then the router has been told this session is offline.
    async fn disconnect(mut self, session_expiry: Option<u32>) {
        let properties = session_expiry.map(|expiry| DisconnectProperties {
            session_expiry_interval: Some(expiry),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        });
        self.send(Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties,
        }))
        .await;
        let after: Vec<Packet> = self
            .raw
            .expect_closed()
            .await
            .into_iter()
            .map(|frame| frame.v5())
            .collect();
        assert!(
            after.iter().all(|p| matches!(p, Packet::Publish(_))),
            "the broker answers a normal DISCONNECT only by closing: {after:?}"
        );
    }

    /// The broker's DISCONNECT (after any publishes), followed by the closed connection.
    async fn expect_disconnect(&mut self) -> Disconnect {
        let disconnect = loop {
            match self.recv().await {
                Some(Packet::Disconnect(disconnect)) => break disconnect,
                Some(Packet::Publish(_)) => continue,
                other => panic!("expected the broker's DISCONNECT, got {other:?}"),
            }
        };
        let after = self.raw.expect_closed().await;
        assert!(after.is_empty(), "nothing after DISCONNECT: {after:?}");
        disconnect
    }
}

// ---------------------------------------------------------------------------------------
// A rumqttc v5 client that shows whole packets, properties included
// ---------------------------------------------------------------------------------------

struct Library {
    client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    task: JoinHandle<()>,
    pending: VecDeque<Publish>,
}

impl Drop for Library {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Library {
    async fn connect(options: rumqttc::v5::MqttOptions) -> (Library, bool) {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(packet)) => Ok(packet),
                    Ok(rumqttc::v5::Event::Outgoing(_)) => continue,
                    Err(error) => Err(error.to_string()),
                };
                let stop = event.is_err();
                if tx.send(event).is_err() || stop {
                    break;
                }
            }
        });
        let mut library = Library {
            client,
            events,
            task,
            pending: VecDeque::new(),
        };
        let present = library
            .wait_for("CONNACK", |p| match p {
                Packet::ConnAck(ack) => {
                    assert_eq!(ack.code, ConnectReturnCode::Success);
                    Some(ack.session_present)
                }
                _ => None,
            })
            .await;
        (library, present)
    }

    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        within(what, async {
            loop {
                let packet = match self.events.recv().await {
                    Some(Ok(packet)) => packet,
                    Some(Err(error)) => panic!("client connection failed: {error}"),
                    None => panic!("client event loop ended"),
                };
                if let Some(found) = pick(&packet) {
                    return found;
                }
                if let Packet::Publish(publish) = packet {
                    self.pending.push_back(publish);
                }
            }
        })
        .await
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        self.wait_for("SUBACK", |p| match p {
            Packet::SubAck(ack) => {
                assert_eq!(
                    ack.return_codes,
                    [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                );
                Some(())
            }
            _ => None,
        })
        .await
    }

    async fn publish(&mut self, topic: &str, payload: &[u8], properties: PublishProperties) {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), properties)
            .await
            .expect("publish");
        self.wait_for("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
    }

    async fn next_publish(&mut self) -> Publish {
        if let Some(publish) = self.pending.pop_front() {
            return publish;
        }
        self.wait_for("a publish", |p| match p {
            Packet::Publish(publish) => Some(publish.clone()),
            _ => None,
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------
// Session expiry
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn session_expiry_set_at_connect_or_at_disconnect_decides_if_the_session_survives() {
    let broker = TestBroker::start(&config()).await;
    let mut publisher = Peer::connect(broker.addr, "expiry-publisher", properties()).await;
    // (expiry in CONNECT, new expiry in DISCONNECT, session kept)
    let cases: [(Option<u32>, Option<u32>, bool); 8] = [
        (None, None, false),
        (Some(0), None, false),
        (Some(0), Some(0), false),
        (Some(60), None, true),
        (Some(u32::MAX), None, true),
        (Some(60), Some(0), false),
        (Some(60), Some(3600), true),
        (Some(u32::MAX), Some(0), false),
    ];
    for (n, (at_connect, at_disconnect, kept)) in cases.into_iter().enumerate() {
        let case =
            format!("case {n}: expiry {at_connect:?} at CONNECT, {at_disconnect:?} at DISCONNECT");
        let client_id = format!("expiry-{n}");
        let topic = format!("expiry/{n}");
        let mut peer = Peer::connect(
            broker.addr,
            &client_id,
            ConnectProperties {
                session_expiry_interval: at_connect,
                ..properties()
            },
        )
        .await;
        peer.subscribe(filter(&topic, QoS::AtLeastOnce)).await;
        peer.disconnect(at_disconnect).await;
        // Queued while away only if the session outlived the connection.
        publisher
            .publish(message(&topic, QoS::AtLeastOnce, "while away"))
            .await;

        let (mut back, present) = Peer::resume(broker.addr, &client_id, with_expiry(0)).await;
        assert_eq!(present, kept, "{case}: session present");
        let expected: &[(&str, &str)] = if kept {
            &[(topic.as_str(), "while away")]
        } else {
            &[]
        };
        assert_eq!(
            summary(&back.publishes().await),
            pairs(expected),
            "{case}: what was queued while away"
        );
    }
}

#[tokio::test]
async fn a_disconnect_that_gives_expiry_to_a_session_created_without_it_is_a_protocol_error() {
    let broker = TestBroker::start(&config()).await;
    let mut peer = Peer::connect(broker.addr, "no-expiry", properties()).await;
    peer.subscribe(filter("never/kept", QoS::AtLeastOnce)).await;
    peer.send(Packet::Disconnect(Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
        properties: Some(DisconnectProperties {
            session_expiry_interval: Some(10),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        }),
    }))
    .await;
    let disconnect = peer.expect_disconnect().await;
    assert_eq!(
        disconnect.reason_code,
        DisconnectReasonCode::ProtocolError,
        "MQTT 5 3.14.2.2.2"
    );
    let (_back, present) = Peer::resume(broker.addr, "no-expiry", properties()).await;
    assert!(!present, "the session still ended with its connection");
}

async fn count_rows(db: &Path, table: &str, client_id: &str) -> i64 {
    let db = db.to_path_buf();
    let table = table.to_owned();
    let client_id = client_id.to_owned();
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&db).expect("open the broker's store");
        conn.query_row(
            &format!("SELECT count(*) FROM {table} WHERE client_id = ?1"),
            [&client_id],
            |row| row.get(0),
        )
        .expect("count rows")
    })
    .await
    .expect("count task")
}

#[tokio::test]
async fn a_durable_session_expires_on_time_and_its_rows_leave_the_store_while_0xffffffff_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable_config(dir.path());
    let broker = TestBroker::start(&config).await;
    let mut publisher = Peer::connect(broker.addr, "se-publisher", properties()).await;

    // `short` expires 1 s after it goes away, `forever` never, `extended` had 1 s but asked
    // for 0xFFFFFFFF when it disconnected.
    for (client_id, at_connect, at_disconnect) in [
        ("short", 1, None),
        ("forever", u32::MAX, None),
        ("extended", 1, Some(u32::MAX)),
    ] {
        let mut peer = Peer::connect(broker.addr, client_id, with_expiry(at_connect)).await;
        peer.subscribe(filter("se/#", QoS::AtLeastOnce)).await;
        peer.disconnect(at_disconnect).await;
    }
    publisher
        .publish(message("se/1", QoS::AtLeastOnce, "one"))
        .await;

    // Kept while away: back within the second, with its message.
    let (mut short, present) = Peer::resume(broker.addr, "short", with_expiry(1)).await;
    assert!(
        present,
        "a 1 s session is still there right after its client left"
    );
    let first = short.next_publish().await;
    assert_eq!(
        summary(std::slice::from_ref(&first)),
        pairs(&[("se/1", "one")])
    );
    short.ack(&first).await;
    short.disconnect(None).await;
    let away_since = Instant::now();

    publisher
        .publish(message("se/2", QoS::AtLeastOnce, "two"))
        .await;
    let before = broker.sessions().await;
    until("the 1 s session to expire", || async {
        broker.sessions().await < before
    })
    .await;
    let after = away_since.elapsed();
    assert!(
        after >= Duration::from_secs(1),
        "expired after {after:?}, before its 1 s"
    );
    assert!(
        after < Duration::from_millis(3000),
        "expired only after {after:?} (1 s expiry, 1 s housekeeping)"
    );
    assert_eq!(
        broker.sessions().await,
        before - 1,
        "only the 1 s session expired"
    );

    drop(publisher);
    broker.stop().await;
    let db = config.store_path.clone();
    for table in ["sessions", "subscriptions", "queue"] {
        assert_eq!(
            count_rows(&db, table, "short").await,
            0,
            "rows of the expired session in {table}"
        );
    }
    for client_id in ["forever", "extended"] {
        assert_eq!(
            count_rows(&db, "sessions", client_id).await,
            1,
            "{client_id}"
        );
        assert_eq!(
            count_rows(&db, "subscriptions", client_id).await,
            1,
            "{client_id}"
        );
        assert_eq!(
            count_rows(&db, "queue", client_id).await,
            2,
            "{client_id}: se/1 and se/2 wait on disk"
        );
    }

    // And after a restart: the kept sessions are there with their messages, in order.
    let broker = TestBroker::start(&config).await;
    for client_id in ["forever", "extended"] {
        let (mut peer, present) = Peer::resume(broker.addr, client_id, with_expiry(60)).await;
        assert!(present, "{client_id} survives the restart");
        assert_eq!(
            summary(&peer.publishes().await),
            pairs(&[("se/1", "one"), ("se/2", "two")]),
            "{client_id}"
        );
    }
    let (_short, present) = Peer::resume(broker.addr, "short", with_expiry(0)).await;
    assert!(
        !present,
        "the expired session does not come back after a restart"
    );
}

// ---------------------------------------------------------------------------------------
// Persistence across a restart
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn queued_messages_beyond_the_memory_window_and_retained_ones_survive_a_restart_in_order() {
    const BEFORE_RESTART: usize = 1200;
    const AFTER_RESTART: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable_config(dir.path());
    let broker = TestBroker::start(&config).await;

    let mut keeper = Peer::connect(broker.addr, "keeper", with_expiry(3600)).await;
    keeper.subscribe(filter("keep/#", QoS::AtLeastOnce)).await;
    keeper.disconnect(None).await;

    let (mut publisher, ack) = Peer::open(
        broker.addr,
        connect_packet("keep-publisher", true, properties()),
        None,
    )
    .await;
    let window = usize::from(ack.properties.and_then(|p| p.receive_max).unwrap_or(1));
    publisher
        .publish(retained(message(
            "keep-retained/r",
            QoS::AtLeastOnce,
            "last word",
        )))
        .await;
    let batch = |range: std::ops::Range<usize>| -> Vec<Publish> {
        range
            .map(|n| message("keep/q", QoS::AtLeastOnce, n.to_string()))
            .collect()
    };
    publisher
        .publish_all(batch(0..BEFORE_RESTART), window)
        .await;
    drop(publisher);
    broker.stop().await;

    // 1000 of the 1200 come back into memory, 200 stay on disk; 300 more arrive while
    // the session is offline and go to disk behind them.
    let broker = TestBroker::start(&config).await;
    let (mut publisher, _) = Peer::open(
        broker.addr,
        connect_packet("keep-publisher", true, properties()),
        None,
    )
    .await;
    publisher
        .publish_all(
            batch(BEFORE_RESTART..BEFORE_RESTART + AFTER_RESTART),
            window,
        )
        .await;

    let mut options = mqtt::Client::options_v5(broker.addr, "keeper");
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    let (mut keeper, present) = mqtt::Client::connect_v5(options).await;
    assert!(present, "the session survived the restart");
    for n in 0..BEFORE_RESTART + AFTER_RESTART {
        let received = keeper.recv().await;
        assert_eq!(
            (
                received.topic.as_str(),
                received.payload.as_slice(),
                received.qos
            ),
            ("keep/q", n.to_string().as_bytes(), 1),
            "message {n} of {}, in order",
            BEFORE_RESTART + AFTER_RESTART
        );
    }

    let mut late = Peer::connect(broker.addr, "late", properties()).await;
    late.subscribe(filter("keep-retained/#", QoS::AtLeastOnce))
        .await;
    let got = late.publishes().await;
    assert_eq!(summary(&got), pairs(&[("keep-retained/r", "last word")]));
    assert!(got[0].retain, "sent as a retained message");
}

// ---------------------------------------------------------------------------------------
// Message expiry
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn expired_messages_are_not_delivered_and_valid_ones_carry_their_remaining_interval() {
    let broker = TestBroker::start(&config()).await;
    let expiring = |seconds: u32| PublishProperties {
        message_expiry_interval: Some(seconds),
        ..PublishProperties::default()
    };
    let mut subscriber = Peer::connect(broker.addr, "exp-sub", with_expiry(60)).await;
    subscriber
        .subscribe(filter("exp/#", QoS::AtLeastOnce))
        .await;
    let mut publisher = Peer::connect(broker.addr, "exp-pub", properties()).await;

    // Live: forwarded at once with (nearly) the whole interval.
    publisher
        .publish(with_properties(
            message("exp/live", QoS::AtLeastOnce, "live"),
            expiring(60),
        ))
        .await;
    let live = subscriber.next_publish().await;
    let left = live
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(left, Some(59..=60)),
        "live delivery carries the interval: {left:?}"
    );
    subscriber.ack(&live).await;
    subscriber.disconnect(None).await;

    for (topic, expiry) in [
        ("exp/short", Some(1)),
        ("exp/long", Some(60)),
        ("exp/none", None),
    ] {
        let mut publish = message(topic, QoS::AtLeastOnce, topic);
        publish.properties = expiry.map(expiring);
        publisher.publish(publish).await;
    }
    for (topic, expiry) in [("exp-retained/short", 1), ("exp-retained/long", 60)] {
        let publish = retained(message(topic, QoS::AtLeastOnce, topic));
        publisher
            .publish(with_properties(publish, expiring(expiry)))
            .await;
    }
    // Time must pass for anything to expire.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (mut subscriber, present) = Peer::resume(broker.addr, "exp-sub", with_expiry(60)).await;
    assert!(present);
    let got = subscriber.publishes().await;
    assert_eq!(
        summary(&got),
        pairs(&[("exp/long", "exp/long"), ("exp/none", "exp/none")]),
        "the message with a 1 s expiry was not delivered 2 s later"
    );
    let left = got[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(left, Some(50..=58)),
        "after 2 s offline a 60 s message has at most 58 s left: {left:?}"
    );
    assert_eq!(
        got[1]
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval),
        None,
        "no expiry is invented"
    );

    let mut late = Peer::connect(broker.addr, "exp-late", properties()).await;
    late.subscribe(filter("exp-retained/#", QoS::AtLeastOnce))
        .await;
    let got = late.publishes().await;
    assert_eq!(
        summary(&got),
        pairs(&[("exp-retained/long", "exp-retained/long")]),
        "an expired retained message is not sent to a new subscriber"
    );
    let left = got[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(matches!(left, Some(50..=58)), "retained: {left:?}");
}

// ---------------------------------------------------------------------------------------
// Topic aliases
// ---------------------------------------------------------------------------------------

fn aliased(topic: &str, alias: u16, payload: &str) -> Publish {
    with_properties(
        message(topic, QoS::AtLeastOnce, payload.to_owned()),
        PublishProperties {
            topic_alias: Some(alias),
            ..PublishProperties::default()
        },
    )
}

#[tokio::test]
async fn topic_aliases_from_a_client_reach_subscribers_as_full_topics() {
    let broker = TestBroker::start(&config()).await;
    let mut subscriber = Peer::connect(broker.addr, "alias-sub", properties()).await;
    subscriber
        .subscribe(filter("alias/#", QoS::AtLeastOnce))
        .await;

    let (mut publisher, ack) = Peer::open(
        broker.addr,
        connect_packet("alias-pub", true, properties()),
        None,
    )
    .await;
    let maximum = ack
        .properties
        .and_then(|p| p.topic_alias_max)
        .expect("CONNACK advertises a Topic Alias Maximum");
    assert!(maximum >= 2, "room for two aliases: {maximum}");
    for publish in [
        aliased("alias/one", 1, "1"),
        aliased("", 1, "2"),
        aliased("alias/two", maximum, "3"),
        aliased("", maximum, "4"),
        aliased("alias/three", 1, "5"), // alias 1 now means alias/three
        aliased("", 1, "6"),
        aliased("", maximum, "7"),
    ] {
        publisher.publish(publish).await;
    }
    let got = subscriber.publishes().await;
    assert_eq!(
        summary(&got),
        pairs(&[
            ("alias/one", "1"),
            ("alias/one", "2"),
            ("alias/two", "3"),
            ("alias/two", "4"),
            ("alias/three", "5"),
            ("alias/three", "6"),
            ("alias/two", "7"),
        ])
    );
    assert!(
        got.iter()
            .all(|p| p.properties.as_ref().and_then(|p| p.topic_alias).is_none()),
        "a subscriber that allows no aliases gets none"
    );
}

#[tokio::test]
async fn a_topic_alias_of_0_or_above_the_maximum_gets_disconnect_0x94_and_an_unknown_one_0x82() {
    let broker = TestBroker::start(&config()).await;
    let (_, ack) = Peer::open(
        broker.addr,
        connect_packet("probe", true, properties()),
        None,
    )
    .await;
    let maximum = ack
        .properties
        .and_then(|p| p.topic_alias_max)
        .expect("Topic Alias Maximum");
    let cases = [
        (
            "alias 0",
            aliased("bad/alias", 0, "x"),
            DisconnectReasonCode::TopicAliasInvalid,
        ),
        (
            "alias above the maximum",
            aliased("bad/alias", maximum + 1, "x"),
            DisconnectReasonCode::TopicAliasInvalid,
        ),
        (
            "an alias never set",
            aliased("", 1, "x"),
            DisconnectReasonCode::ProtocolError,
        ),
    ];
    for (what, mut publish, reason) in cases {
        let mut peer = Peer::connect(broker.addr, "bad-alias", properties()).await;
        publish.pkid = 1;
        peer.send(Packet::Publish(publish)).await;
        assert_eq!(peer.expect_disconnect().await.reason_code, reason, "{what}");
    }
}

#[tokio::test]
async fn a_client_with_topic_alias_maximum_10_receives_repeated_topics_as_aliases() {
    let broker = TestBroker::start(&config()).await;
    let mut aliasing = Peer::connect(
        broker.addr,
        "alias-taker",
        ConnectProperties {
            topic_alias_max: Some(10),
            ..properties()
        },
    )
    .await;
    aliasing.subscribe(filter("ta/#", QoS::AtLeastOnce)).await;
    let mut plain = Peer::connect(broker.addr, "alias-refuser", properties()).await;
    plain.subscribe(filter("ta/#", QoS::AtLeastOnce)).await;

    let mut publisher = Peer::connect(broker.addr, "ta-pub", properties()).await;
    for (topic, payload) in [("ta/x", "1"), ("ta/x", "2"), ("ta/y", "3"), ("ta/x", "4")] {
        publisher
            .publish(message(topic, QoS::AtLeastOnce, payload))
            .await;
    }

    let got = aliasing.publishes().await;
    let seen: Vec<(String, Option<u16>, String)> = got
        .iter()
        .map(|p| {
            (
                topic(p),
                p.properties.as_ref().and_then(|p| p.topic_alias),
                payload(p),
            )
        })
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    let x = seen[0].1.expect("the first publish on ta/x sets an alias");
    let y = seen[2].1.expect("the first publish on ta/y sets an alias");
    assert!(
        (1..=10).contains(&x) && (1..=10).contains(&y) && x != y,
        "{seen:?}"
    );
    assert_eq!(
        seen,
        [
            ("ta/x".to_owned(), Some(x), "1".to_owned()),
            (String::new(), Some(x), "2".to_owned()),
            ("ta/y".to_owned(), Some(y), "3".to_owned()),
            (String::new(), Some(x), "4".to_owned()),
        ],
        "the second publish on a topic has an empty topic and the alias"
    );

    let got = plain.publishes().await;
    assert_eq!(
        summary(&got),
        pairs(&[("ta/x", "1"), ("ta/x", "2"), ("ta/y", "3"), ("ta/x", "4")])
    );
    assert!(
        got.iter()
            .all(|p| p.properties.as_ref().and_then(|p| p.topic_alias).is_none()),
        "no alias for a client whose Topic Alias Maximum is 0"
    );
}

// ---------------------------------------------------------------------------------------
// Subscription options and identifiers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn no_local_keeps_a_clients_own_messages_from_it_but_not_others() {
    let broker = TestBroker::start(&config()).await;
    let mut quiet = Peer::connect(broker.addr, "no-local", properties()).await;
    quiet
        .subscribe(Filter {
            nolocal: true,
            ..filter("chat/#", QoS::AtLeastOnce)
        })
        .await;
    let mut echo = Peer::connect(broker.addr, "local", properties()).await;
    echo.subscribe(filter("chat/#", QoS::AtLeastOnce)).await;

    quiet
        .publish(message("chat/from-no-local", QoS::AtLeastOnce, "a"))
        .await;
    echo.publish(message("chat/from-local", QoS::AtLeastOnce, "b"))
        .await;

    assert_eq!(
        summary(&quiet.publishes().await),
        pairs(&[("chat/from-local", "b")]),
        "no local: not its own"
    );
    assert_eq!(
        summary(&echo.publishes().await),
        pairs(&[("chat/from-no-local", "a"), ("chat/from-local", "b")]),
        "without no local: its own too"
    );
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_and_without_it_the_flag_is_cleared() {
    let broker = TestBroker::start(&config()).await;
    let mut publisher = Peer::connect(broker.addr, "rap-pub", properties()).await;
    publisher
        .publish(retained(message("rap/old", QoS::AtLeastOnce, "old")))
        .await;

    let mut keep = Peer::connect(broker.addr, "rap-keep", properties()).await;
    keep.subscribe(Filter {
        preserve_retain: true,
        ..filter("rap/#", QoS::AtLeastOnce)
    })
    .await;
    let mut clear = Peer::connect(broker.addr, "rap-clear", properties()).await;
    clear.subscribe(filter("rap/#", QoS::AtLeastOnce)).await;

    publisher
        .publish(retained(message("rap/new", QoS::AtLeastOnce, "new")))
        .await;
    publisher
        .publish(message("rap/plain", QoS::AtLeastOnce, "plain"))
        .await;

    let flags = |got: Vec<Publish>| -> Vec<(String, bool)> {
        got.iter().map(|p| (topic(p), p.retain)).collect()
    };
    let expect = |old: bool, new: bool, plain: bool| {
        vec![
            ("rap/old".to_owned(), old),
            ("rap/new".to_owned(), new),
            ("rap/plain".to_owned(), plain),
        ]
    };
    assert_eq!(
        flags(keep.publishes().await),
        expect(true, true, false),
        "retain as published"
    );
    assert_eq!(
        flags(clear.publishes().await),
        expect(true, false, false),
        "without retain as published only messages sent because retained keep the flag"
    );
}

#[tokio::test]
async fn retain_handling_0_sends_retained_on_every_subscribe_1_only_on_a_new_one_2_never() {
    let broker = TestBroker::start(&config()).await;
    let mut publisher = Peer::connect(broker.addr, "rh-pub", properties()).await;
    publisher
        .publish(retained(message("rh/r", QoS::AtLeastOnce, "kept")))
        .await;

    // (rule, retained after the first subscribe, after subscribing again)
    let cases: [(RetainForwardRule, usize, usize); 3] = [
        (RetainForwardRule::OnEverySubscribe, 1, 1),
        (RetainForwardRule::OnNewSubscribe, 1, 0),
        (RetainForwardRule::Never, 0, 0),
    ];
    for (n, (rule, first, again)) in cases.into_iter().enumerate() {
        let mut peer = Peer::connect(broker.addr, &format!("rh-{n}"), properties()).await;
        let subscription = Filter {
            retain_forward_rule: rule.clone(),
            ..filter("rh/#", QoS::AtLeastOnce)
        };
        for (when, expected) in [("first subscribe", first), ("subscribe again", again)] {
            peer.subscribe(subscription.clone()).await;
            let got = peer.publishes().await;
            assert_eq!(
                summary(&got),
                pairs(&[("rh/r", "kept")][..expected]),
                "{rule:?}, {when}"
            );
            for publish in &got {
                assert!(publish.retain);
                peer.ack(publish).await;
            }
        }
    }
}

#[tokio::test]
async fn subscription_identifiers_come_with_every_matching_message() {
    let broker = TestBroker::start(&config()).await;
    let mut publisher = Peer::connect(broker.addr, "sid-pub", properties()).await;
    publisher
        .publish(retained(message("sid/r", QoS::AtLeastOnce, "retained")))
        .await;

    let mut peer = Peer::connect(broker.addr, "sid", properties()).await;
    let granted = [SubscribeReasonCode::Success(QoS::AtLeastOnce)];
    assert_eq!(
        peer.subscribe_with(vec![filter("sid/#", QoS::AtLeastOnce)], Some(7))
            .await,
        granted
    );
    let got = peer.publishes().await;
    assert_eq!(summary(&got), pairs(&[("sid/r", "retained")]));
    let ids = |p: &Publish| -> BTreeSet<usize> {
        p.properties
            .as_ref()
            .map(|p| p.subscription_identifiers.iter().copied().collect())
            .unwrap_or_default()
    };
    assert_eq!(
        ids(&got[0]),
        BTreeSet::from([7]),
        "a retained message at subscribe"
    );
    assert_eq!(
        peer.subscribe_with(vec![filter("sid/a/+", QoS::AtLeastOnce)], Some(300_000))
            .await,
        granted
    );
    assert_eq!(
        peer.subscribe_with(vec![filter("plain/#", QoS::AtLeastOnce)], None)
            .await,
        granted
    );

    for t in ["sid/a/b", "sid/c", "plain/x"] {
        publisher.publish(message(t, QoS::AtLeastOnce, t)).await;
    }
    let got = peer.publishes().await;
    let seen: Vec<(String, BTreeSet<usize>)> = got.iter().map(|p| (topic(p), ids(p))).collect();
    assert_eq!(
        seen,
        [
            ("sid/a/b".to_owned(), BTreeSet::from([7, 300_000])),
            ("sid/c".to_owned(), BTreeSet::from([7])),
            ("plain/x".to_owned(), BTreeSet::new()),
        ],
        "one copy per message with the identifier of each matching subscription"
    );
}

// ---------------------------------------------------------------------------------------
// Flow control and packet sizes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_broker_never_has_more_qos_2_messages_in_flight_than_the_clients_receive_maximum() {
    let broker = TestBroker::start(&config()).await;
    let mut slow = Peer::connect(
        broker.addr,
        "rm-slow",
        ConnectProperties {
            receive_maximum: Some(2),
            ..properties()
        },
    )
    .await;
    slow.subscribe(filter("rm/#", QoS::ExactlyOnce)).await;
    let mut publisher = Peer::connect(broker.addr, "rm-pub", properties()).await;
    for n in 0..6 {
        publisher
            .publish(message(&format!("rm/{n}"), QoS::ExactlyOnce, "x"))
            .await;
    }

    let mut in_flight = slow.publishes().await;
    assert_eq!(
        in_flight.iter().map(topic).collect::<Vec<_>>(),
        ["rm/0", "rm/1"],
        "exactly Receive Maximum unacknowledged"
    );
    for n in 2..6 {
        let oldest = in_flight.remove(0);
        // PUBREC alone does not free the slot: the message is in flight until PUBCOMP.
        slow.send(Packet::PubRec(PubRec::new(oldest.pkid, None)))
            .await;
        let answer = slow.barrier().await;
        assert!(
            matches!(&answer[..], [Packet::PubRel(rel)] if rel.pkid == oldest.pkid),
            "after PUBREC only PUBREL: {answer:?}"
        );
        slow.send(Packet::PubComp(PubComp::new(oldest.pkid, None)))
            .await;
        let more = slow.publishes().await;
        assert_eq!(
            more.iter().map(topic).collect::<Vec<_>>(),
            [format!("rm/{n}")],
            "one PUBCOMP, one more publish"
        );
        in_flight.extend(more);
    }
    for publish in &in_flight {
        slow.ack(publish).await;
    }
    assert!(slow.barrier().await.is_empty());
}

#[tokio::test]
async fn a_client_exceeding_the_advertised_receive_maximum_with_qos_2_gets_disconnect_0x93() {
    let broker = TestBroker::start(&config()).await;
    let (mut flood, ack) = Peer::open(
        broker.addr,
        connect_packet("flood", true, properties()),
        None,
    )
    .await;
    let maximum = ack.properties.and_then(|p| p.receive_max);
    assert_eq!(
        maximum,
        Some(20),
        "CONNACK advertises max_inflight (default 20)"
    );
    let qos2 = |pkid: u16| {
        let mut publish = message(&format!("flood/{pkid}"), QoS::ExactlyOnce, "x");
        publish.pkid = pkid;
        Packet::Publish(publish)
    };
    for pkid in 1..=20 {
        flood.send(qos2(pkid)).await;
    }
    let answers = flood.barrier().await;
    assert_eq!(answers.len(), 20, "{answers:?}");
    assert!(answers.iter().all(|p| matches!(p, Packet::PubRec(_))));

    // Releasing one makes room for exactly one more.
    flood.send(Packet::PubRel(PubRel::new(1, None))).await;
    flood.send(qos2(21)).await;
    let answers = flood.barrier().await;
    assert!(
        matches!(&answers[..], [Packet::PubComp(c), Packet::PubRec(r)] if c.pkid == 1 && r.pkid == 21),
        "{answers:?}"
    );
    flood.send(qos2(22)).await;
    assert_eq!(
        flood.expect_disconnect().await.reason_code,
        DisconnectReasonCode::ReceiveMaximumExceeded
    );
}

#[tokio::test]
async fn a_message_larger_than_the_clients_maximum_packet_size_is_dropped_and_later_ones_arrive() {
    let broker = TestBroker::start(&config()).await;
    // Receive Maximum 1: a dropped QoS 1 message must not hold the only slot either.
    let mut small = Peer::connect(
        broker.addr,
        "mps-small",
        ConnectProperties {
            max_packet_size: Some(100),
            receive_maximum: Some(1),
            ..properties()
        },
    )
    .await;
    small.subscribe(filter("mps/#", QoS::AtLeastOnce)).await;
    let mut publisher = Peer::connect(broker.addr, "mps-pub", properties()).await;
    let big = "x".repeat(500);
    publisher
        .publish(message("mps/big", QoS::AtLeastOnce, big.clone()))
        .await;
    publisher
        .publish(message("mps/big0", QoS::AtMostOnce, big))
        .await;
    publisher
        .publish(message("mps/small", QoS::AtLeastOnce, "fits"))
        .await;

    let got = small.publishes().await;
    assert_eq!(summary(&got), pairs(&[("mps/small", "fits")]));
    small.ack(&got[0]).await;
    publisher
        .publish(message("mps/later", QoS::AtLeastOnce, "also fits"))
        .await;
    let got = small.publishes().await;
    assert_eq!(summary(&got), pairs(&[("mps/later", "also fits")]));
}

#[tokio::test]
async fn a_packet_larger_than_the_advertised_maximum_packet_size_gets_disconnect_0x95() {
    let broker = TestBroker::start(&BrokerConfig {
        max_packet_size: 2048,
        ..config()
    })
    .await;
    let (mut peer, ack) = Peer::open(
        broker.addr,
        connect_packet("too-big", true, properties()),
        None,
    )
    .await;
    assert_eq!(ack.properties.and_then(|p| p.max_packet_size), Some(2048));
    peer.publish(message("size/fits", QoS::AtLeastOnce, vec![0u8; 2000]))
        .await;
    let mut publish = message("size/too-big", QoS::AtLeastOnce, vec![0u8; 2100]);
    publish.pkid = 1000;
    peer.send(Packet::Publish(publish)).await;
    assert_eq!(
        peer.expect_disconnect().await.reason_code,
        DisconnectReasonCode::PacketTooLarge
    );
}

// ---------------------------------------------------------------------------------------
// CONNACK
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn connack_advertises_what_the_broker_supports_and_its_configured_limits() {
    let broker = TestBroker::start(&BrokerConfig {
        max_inflight: 7,
        max_packet_size: 4096,
        ..config()
    })
    .await;
    let (_peer, ack) = Peer::open(
        broker.addr,
        connect_packet("advertised", true, properties()),
        None,
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.retain_available, Some(1), "retain available");
    assert_eq!(p.wildcard_subscription_available, Some(1), "wildcards");
    assert_eq!(
        p.shared_subscription_available,
        Some(1),
        "shared subscriptions"
    );
    assert_eq!(
        p.subscription_identifiers_available,
        Some(1),
        "subscription identifiers"
    );
    assert_eq!(p.max_qos, None, "no Maximum QoS: QoS 2 is supported");
    assert!(
        p.topic_alias_max.is_some_and(|m| m > 0),
        "topic aliases: {p:?}"
    );
    assert_eq!(p.receive_max, Some(7), "receive maximum = max_inflight");
    assert_eq!(p.max_packet_size, Some(4096), "maximum packet size");
    assert_eq!(
        p.session_expiry_interval, None,
        "the client's expiry is accepted"
    );
}

#[tokio::test]
async fn a_keep_alive_above_a_3600_s_maximum_is_answered_with_server_keep_alive_3600() {
    let broker = TestBroker::start(&BrokerConfig {
        max_keep_alive: 3600,
        ..config()
    })
    .await;
    for (keep_alive, server) in [
        (7200, Some(3600)),
        (u16::MAX, Some(3600)),
        (3600, None),
        (60, None),
    ] {
        let connect = Connect {
            keep_alive,
            ..connect_packet("keep-alive", true, properties())
        };
        let (_peer, ack) = Peer::open(broker.addr, connect, None).await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        assert_eq!(
            ack.properties.and_then(|p| p.server_keep_alive),
            server,
            "keep alive {keep_alive}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Properties forwarded unchanged
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn request_and_response_properties_pass_unchanged_between_two_v5_clients() {
    let broker = TestBroker::start(&config()).await;
    let (mut responder, _) =
        Library::connect(mqtt::Client::options_v5(broker.addr, "responder")).await;
    responder.subscribe("service/request").await;
    let (mut requester, _) =
        Library::connect(mqtt::Client::options_v5(broker.addr, "requester")).await;
    requester.subscribe("reply/requester").await;

    let request = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/requester".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01req-42\xff")),
        user_properties: vec![
            ("trace".into(), "a".into()),
            ("trace".into(), "b".into()),
            ("unit".into(), "\u{b0}C".into()),
        ],
        ..PublishProperties::default()
    };
    requester
        .publish("service/request", br#"{"read":"t1"}"#, request.clone())
        .await;

    let received = responder.next_publish().await;
    assert_eq!(topic(&received), "service/request");
    assert_eq!(received.payload.as_ref(), br#"{"read":"t1"}"#);
    assert_eq!(
        received.properties.as_ref(),
        Some(&request),
        "every property as sent, user properties in order with duplicates"
    );

    let asked = received.properties.expect("properties");
    let response = PublishProperties {
        correlation_data: asked.correlation_data.clone(),
        payload_format_indicator: Some(0),
        user_properties: vec![("status".into(), "ok".into())],
        ..PublishProperties::default()
    };
    let response_topic = asked.response_topic.expect("response topic");
    responder
        .publish(&response_topic, &[0xde, 0xad], response.clone())
        .await;
    let answer = requester.next_publish().await;
    assert_eq!(topic(&answer), "reply/requester");
    assert_eq!(answer.payload.as_ref(), [0xde, 0xad]);
    assert_eq!(
        answer.properties,
        Some(response),
        "the correlation data comes back"
    );
}

// ---------------------------------------------------------------------------------------
// Will delay
// ---------------------------------------------------------------------------------------

fn delayed_will(topic: &str, delay: u32) -> LastWill {
    LastWill::new(
        topic,
        b"gone".to_vec(),
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    )
}

async fn with_will(addr: SocketAddr, client_id: &str, will: LastWill, expiry: u32) -> Peer {
    let (peer, ack) = Peer::open(
        addr,
        connect_packet(client_id, true, with_expiry(expiry)),
        Some(will),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    peer
}

#[tokio::test]
async fn a_will_waits_for_its_delay_and_a_reconnect_within_the_delay_cancels_it() {
    let broker = TestBroker::start(&config()).await;
    let mut observer = Peer::connect(broker.addr, "will-observer", properties()).await;
    observer.subscribe(filter("will/#", QoS::AtLeastOnce)).await;

    let delayed = with_will(broker.addr, "delayed", delayed_will("will/delayed", 2), 10).await;
    let cancelled = with_will(
        broker.addr,
        "cancelled",
        delayed_will("will/cancelled", 2),
        10,
    )
    .await;
    // The session ends with the connection: its will cannot wait longer than that.
    let session_ends = with_will(broker.addr, "ends", delayed_will("will/ends", 10), 0).await;

    let connected = broker.clients_connected().await;
    drop((delayed, cancelled, session_ends));
    let dropped_at = Instant::now();
    until("the broker to see the three connections drop", || async {
        broker.clients_connected().await == connected - 3
    })
    .await;
    let (_cancelled, present) = Peer::resume(broker.addr, "cancelled", with_expiry(10)).await;
    assert!(present, "back within the will delay");

    let first = observer.next_publish().await;
    assert_eq!(topic(&first), "will/ends");
    assert!(
        dropped_at.elapsed() < Duration::from_secs(1),
        "a will whose session ends is published at once, not after its delay"
    );
    let second = observer.next_publish().await;
    let after = dropped_at.elapsed();
    assert_eq!(topic(&second), "will/delayed");
    assert!(
        after >= Duration::from_secs(2),
        "published after {after:?}, before its 2 s delay"
    );
    assert!(
        after < Duration::from_millis(3500),
        "published only after {after:?}"
    );
    // The cancelled will was due at the same time: one more housekeeping round shows it
    // is not coming.
    observer
        .raw
        .assert_quiet_for(Duration::from_millis(1200))
        .await;
}

#[tokio::test]
async fn a_session_taken_over_within_the_will_delay_does_not_publish_the_will() {
    let broker = TestBroker::start(&config()).await;
    let mut observer = Peer::connect(broker.addr, "takeover-observer", properties()).await;
    observer.subscribe(filter("will/#", QoS::AtLeastOnce)).await;

    let mut old = with_will(broker.addr, "taken", delayed_will("will/taken", 1), 10).await;
    let (_new, present) = Peer::resume(broker.addr, "taken", with_expiry(10)).await;
    assert!(present);
    assert_eq!(
        old.expect_disconnect().await.reason_code,
        DisconnectReasonCode::SessionTakenOver
    );
    // MQTT 5 3.1.2.5: not published when a new connection for the client id is opened
    // before the will delay has passed. Wait the delay and a housekeeping round.
    observer
        .raw
        .assert_quiet_for(Duration::from_millis(2300))
        .await;
}

// ---------------------------------------------------------------------------------------
// Shared subscriptions
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn members_of_a_shared_subscription_split_the_messages_and_a_plain_subscriber_gets_all() {
    let broker = TestBroker::start(&config()).await;
    let mut members = Vec::new();
    for id in ["worker-a", "worker-b"] {
        let mut member = Peer::connect(broker.addr, id, properties()).await;
        member
            .subscribe(filter("$share/workers/jobs/#", QoS::AtLeastOnce))
            .await;
        members.push(member);
    }
    let mut watcher = Peer::connect(broker.addr, "watcher", properties()).await;
    watcher.subscribe(filter("jobs/#", QoS::AtLeastOnce)).await;

    let mut publisher = Peer::connect(broker.addr, "jobs-pub", properties()).await;
    let all: Vec<String> = (0..20).map(|n| format!("job-{n:02}")).collect();
    for job in &all {
        publisher
            .publish(message("jobs/new", QoS::AtLeastOnce, job.clone()))
            .await;
    }

    let mut together = Vec::new();
    for (member, id) in members.iter_mut().zip(["worker-a", "worker-b"]) {
        let got: Vec<String> = member.publishes().await.iter().map(payload).collect();
        assert!(!got.is_empty(), "{id} gets some: {got:?}");
        assert!(got.len() < all.len(), "{id} does not get all");
        together.extend(got);
    }
    together.sort();
    assert_eq!(
        together, all,
        "together the group gets every message exactly once"
    );
    let watched: Vec<String> = watcher.publishes().await.iter().map(payload).collect();
    assert_eq!(watched, all, "a plain subscriber gets all, in order");
}

// ---------------------------------------------------------------------------------------
// DISCONNECT from the server
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_broker_shutting_down_sends_disconnect_0x8b_with_a_reason_string_to_mqtt_5_clients() {
    let broker = TestBroker::start(&config()).await;
    let mut v5 = Peer::connect(broker.addr, "shutdown-v5", properties()).await;
    let mut v311 = Raw::connected(broker.addr, &mqtt::packet::Connect::v311("shutdown-v311")).await;
    broker.begin_shutdown();

    let disconnect = v5.expect_disconnect().await;
    assert_eq!(
        disconnect.reason_code,
        DisconnectReasonCode::ServerShuttingDown
    );
    let reason = disconnect.properties.and_then(|p| p.reason_string);
    assert!(
        reason.as_deref().is_some_and(|r| !r.is_empty()),
        "a reason string: {reason:?}"
    );
    assert!(
        v311.expect_closed().await.is_empty(),
        "3.1.1 has no server DISCONNECT: the connection just closes"
    );
    broker.stop().await;
}
