//! The embedded broker, end to end: the real broker in-process on an ephemeral port, real
//! rumqttc clients (MQTT 3.1.1 and 5), and raw bytes over TCP where a client library would
//! hide the behaviour (CONNACK codes, keep alive, malformed and oversize packets).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldmq::broker::InternalSubscribeOptions;
use fieldmq::model::{Message, Origin, QoS};
use mqtt::packet::{self, Connect, Will};
use mqtt::{
    assert_bad_packet_closes_only_its_connection, assert_still_works, connect_for, start_default,
    within, witness, Client, Frame, Raw, Received, Version,
};

use crate::util::mqtt;

fn message(received: &Received) -> (String, String) {
    (
        received.topic.clone(),
        String::from_utf8_lossy(&received.payload).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn one_port_serves_mqtt_3_1_1_and_mqtt_5_clients_that_talk_to_each_other() {
    let broker = start_default().await;
    let mut v3 = Client::connect(Version::V311, broker.addr, "old").await;
    let mut v5 = Client::connect(Version::V5, broker.addr, "new").await;
    assert_eq!(v3.subscribe("to/old", 1).await, Some(1));
    assert_eq!(v5.subscribe("to/new", 1).await, Some(1));

    v3.publish("to/new", 1, false, b"hello from 3.1.1").await;
    v5.publish("to/old", 1, false, b"hello from 5").await;

    let at_v5 = v5.recv().await;
    let at_v3 = v3.recv().await;
    assert_eq!(
        message(&at_v5),
        ("to/new".into(), "hello from 3.1.1".into())
    );
    assert_eq!(message(&at_v3), ("to/old".into(), "hello from 5".into()));
}

#[tokio::test]
async fn connack_refuses_protocol_level_3_with_return_code_1_and_closes() {
    let broker = start_default().await;
    // MQTT 3.1 proper ("MQIsdp", level 3) and level 3 under the 3.1.1 name.
    for name in ["MQIsdp", "MQTT"] {
        let connect = Connect {
            protocol_name: name,
            level: 3,
            ..Connect::v311("old-timer")
        };
        let (mut raw, connack) = Raw::connect(broker.addr, &connect).await;
        assert_eq!(
            connack.bytes,
            vec![0x20, 0x02, 0x00, 0x01],
            "{name} level 3: a 3.1.1 CONNACK with return code 1"
        );
        assert!(raw.expect_closed().await.is_empty());
    }
}

/// MQTT 5 3.1.2.2: a server that does not accept the Protocol Version MAY answer with
/// 0x84 (Unsupported Protocol Version) and MUST close. We never refuse a version 5
/// CONNECT for its version, so 0x84 has no use; for a level we do not know (6) we cannot
/// know which CONNACK format the client reads, and answer in 3.1.1 format with return
/// code 1 (unacceptable protocol version), which 3.1.1 requires [MQTT-3.1.2-2] and which
/// any client reads as a refusal, then close.
#[tokio::test]
async fn connack_answers_an_unknown_protocol_level_6_with_a_3_1_1_refusal_code_1() {
    let broker = start_default().await;
    let connect = Connect {
        level: 6,
        ..Connect::v5("future")
    };
    let (mut raw, connack) = Raw::connect(broker.addr, &connect).await;
    assert_eq!(connack.bytes, vec![0x20, 0x02, 0x00, 0x01]);
    assert!(raw.expect_closed().await.is_empty());
}

#[tokio::test]
async fn connack_refuses_an_empty_client_id_without_clean_session_with_return_code_2() {
    let broker = start_default().await;
    let connect = Connect {
        clean: false,
        ..Connect::v311("")
    };
    let (mut raw, connack) = Raw::connect(broker.addr, &connect).await;
    assert_eq!(connack.connack(), (false, 2));
    assert!(raw.expect_closed().await.is_empty());
}

#[tokio::test]
async fn connack_refuses_a_connection_over_max_connections_with_3_in_3_1_1_and_0x97_in_5() {
    let mut config = mqtt::config();
    config.listeners[0].max_connections = 1;
    let broker = mqtt::start(config).await;
    let mut first = Raw::connected(broker.addr, &Connect::v311("first")).await;

    let (mut second, connack) = Raw::connect(broker.addr, &Connect::v311("second")).await;
    assert_eq!(connack.connack(), (false, 3), "3.1.1: server unavailable");
    assert!(second.expect_closed().await.is_empty());

    let (mut third, connack) = Raw::connect(broker.addr, &Connect::v5("third")).await;
    assert_eq!(connack.connack(), (false, 0x97), "MQTT 5: quota exceeded");
    assert!(third.expect_closed().await.is_empty());

    // The first connection is untouched by the refusals.
    first.send(&packet::pingreq()).await;
    assert_eq!(
        first.recv().await.expect("PINGRESP").bytes,
        vec![0xD0, 0x00]
    );
}

#[tokio::test]
async fn connack_refuses_a_wrong_password_with_4_in_3_1_1_and_0x86_in_5() {
    let broker = mqtt::start_with_password("user", "pw").await;
    for (version, refused) in [(Version::V311, 4), (Version::V5, 0x86)] {
        for (username, password) in [("user", "wrong"), ("nobody", "pw"), ("user", "")] {
            let connect = Connect {
                username: Some(username),
                password: Some(password),
                ..connect_for(version, "guesser")
            };
            let (mut raw, connack) = Raw::connect(broker.addr, &connect).await;
            assert_eq!(
                connack.connack(),
                (false, refused),
                "{version:?} {username}/{password:?}"
            );
            assert!(raw.expect_closed().await.is_empty());
        }
        // The right password is accepted.
        let connect = Connect {
            username: Some("user"),
            password: Some("pw"),
            ..connect_for(version, "knower")
        };
        Raw::connected(broker.addr, &connect).await;
    }
}

#[tokio::test]
async fn connack_refuses_anonymous_clients_when_anonymous_is_off_with_5_in_3_1_1_and_0x87_in_5() {
    let broker = mqtt::start_with_password("user", "pw").await;
    for (version, refused) in [(Version::V311, 5), (Version::V5, 0x87)] {
        let (mut raw, connack) = Raw::connect(broker.addr, &connect_for(version, "anon")).await;
        assert_eq!(connack.connack(), (false, refused), "{version:?}");
        assert!(raw.expect_closed().await.is_empty());
    }
}

#[tokio::test]
async fn connack_refuses_an_authentication_method_with_0x8c() {
    let broker = start_default().await;
    let connect = Connect {
        properties: packet::property_str(packet::AUTHENTICATION_METHOD, "SCRAM-SHA-1"),
        ..Connect::v5("scram")
    };
    let (mut raw, connack) = Raw::connect(broker.addr, &connect).await;
    assert_eq!(connack.connack(), (false, 0x8C));
    assert!(raw.expect_closed().await.is_empty());
}

#[tokio::test]
async fn an_empty_client_id_gets_an_assigned_client_identifier_in_mqtt_5() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let broker = start_default().await;
    let (_raw, connack) = Raw::connect(broker.addr, &Connect::v5("")).await;
    assert_eq!(connack.connack(), (false, 0));
    let Packet::ConnAck(ack) = connack.v5() else {
        panic!("not a CONNACK: {connack:?}");
    };
    let assigned = ack
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("an Assigned Client Identifier property");
    assert!(!assigned.is_empty());

    // Two anonymous-id clients get different identifiers.
    let (_raw2, connack2) = Raw::connect(broker.addr, &Connect::v5("")).await;
    let Packet::ConnAck(ack2) = connack2.v5() else {
        panic!("not a CONNACK: {connack2:?}");
    };
    let assigned2 = ack2.properties.and_then(|p| p.assigned_client_identifier);
    assert_ne!(assigned2.as_deref(), Some(assigned.as_str()));
}

#[tokio::test]
async fn an_empty_client_id_with_clean_session_is_accepted_in_3_1_1_and_works() {
    let broker = start_default().await;
    let mut raw = Raw::connected(broker.addr, &Connect::v311("")).await;
    raw.send(&packet::subscribe(false, 1, &[("anon/t", 0)]))
        .await;
    assert_eq!(
        raw.recv().await.expect("SUBACK").bytes,
        vec![0x90, 0x03, 0x00, 0x01, 0x00]
    );
    raw.send(&packet::publish(false, b"anon/t", 0, false, 0, b"me"))
        .await;
    let (received, _) = raw.recv().await.expect("PUBLISH").publish(Version::V311);
    assert_eq!(message(&received), ("anon/t".into(), "me".into()));
}

// ---------------------------------------------------------------------------------------
// Keep alive and wills
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_0_keeps_a_silent_connection_open() {
    let broker = start_default().await;
    let connect = |version| Connect {
        keep_alive: 0,
        ..connect_for(
            version,
            if version == Version::V5 {
                "quiet5"
            } else {
                "quiet3"
            },
        )
    };
    let mut v3 = Raw::connected(broker.addr, &connect(Version::V311)).await;
    let mut v5 = Raw::connected(broker.addr, &connect(Version::V5)).await;
    // Silence well past what any non-zero keep alive of 1 s would allow (1.5 s).
    tokio::join!(
        v3.assert_quiet_for(Duration::from_millis(2500)),
        v5.assert_quiet_for(Duration::from_millis(2500)),
    );
    for raw in [&mut v3, &mut v5] {
        raw.send(&packet::pingreq()).await;
        assert_eq!(raw.recv().await.expect("PINGRESP").bytes, vec![0xD0, 0x00]);
    }
}

#[tokio::test]
async fn a_keep_alive_timeout_closes_the_connection_and_publishes_the_will() {
    let broker = start_default().await;
    let mut watcher = Client::connect(Version::V311, broker.addr, "watcher").await;
    watcher.subscribe("will/#", 1).await;

    let will = |topic| Will {
        topic,
        payload: b"gone",
        qos: 1,
        retain: false,
    };
    let connected = Instant::now();
    let mut v3 = Raw::connected(
        broker.addr,
        &Connect {
            keep_alive: 1,
            will: Some(will("will/v3")),
            ..Connect::v311("sleepy3")
        },
    )
    .await;
    let mut v5 = Raw::connected(
        broker.addr,
        &Connect {
            keep_alive: 1,
            will: Some(will("will/v5")),
            ..Connect::v5("sleepy5")
        },
    )
    .await;

    // Silence: the broker closes both (MQTT 5 says why: 0x8D keep alive timeout).
    let (v3_frames, v5_frames) = tokio::join!(v3.expect_closed(), v5.expect_closed());
    assert!(v3_frames.is_empty(), "{v3_frames:?}");
    assert_eq!(v5_frames.len(), 1, "{v5_frames:?}");
    assert_eq!(v5_frames[0].disconnect_reason(), 0x8D);

    let mut wills = BTreeSet::new();
    for _ in 0..2 {
        let received = watcher.recv().await;
        assert_eq!(received.payload, b"gone");
        wills.insert(received.topic);
    }
    let elapsed = connected.elapsed();
    assert_eq!(
        wills,
        BTreeSet::from(["will/v3".to_owned(), "will/v5".to_owned()])
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(4),
        "the will fires after the keep-alive period (1.5 x 1 s), not before nor much later: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_disconnect_suppresses_the_will_but_a_dropped_connection_publishes_it() {
    let broker = start_default().await;
    let mut watcher = Client::connect(Version::V311, broker.addr, "watcher").await;
    watcher.subscribe("will/#", 1).await;
    let mut publisher = Client::connect(Version::V311, broker.addr, "publisher").await;

    for (version, disconnect) in [
        (Version::V311, packet::disconnect()),
        (Version::V5, packet::disconnect()),
        (Version::V5, packet::disconnect_v5(0x00)),
    ] {
        let topic = format!("will/{version:?}/{}", disconnect.len());
        let connect = Connect {
            will: Some(Will {
                topic: &topic,
                payload: b"should not be sent",
                qos: 1,
                retain: false,
            }),
            ..connect_for(version, "polite")
        };
        let mut polite = Raw::connected(broker.addr, &connect).await;
        polite.send(&disconnect).await;
        // The broker closes after it handed the disconnect to the router...
        assert!(polite.expect_closed().await.is_empty());
        // ...so a will would reach the watcher before this.
        publisher.publish("will/end", 1, false, b"").await;
        assert_eq!(
            watcher.recv_until("will/end").await,
            vec![],
            "{version:?} DISCONNECT {disconnect:02x?}"
        );
    }

    // The control: the same client without DISCONNECT publishes its will.
    let connect = Connect {
        will: Some(Will {
            topic: "will/rude",
            payload: b"dropped",
            qos: 1,
            retain: false,
        }),
        ..Connect::v311("rude")
    };
    let mut rude = Raw::connected(broker.addr, &connect).await;
    rude.shutdown_write().await;
    assert!(rude.expect_closed().await.is_empty());
    assert_eq!(
        message(&watcher.recv().await),
        ("will/rude".into(), "dropped".into())
    );
}

/// MQTT 5 3.14.2.1: "If the Remaining Length is less than 1 the value of 0x00 (Normal
/// disconnection) is used"; 3.14.2.2.1: the property length may be left out when the
/// remaining length is less than 2. So `E0 01 00` is a normal DISCONNECT and `E0 01 04`
/// is "disconnect with will message".
#[tokio::test]
async fn an_mqtt_5_disconnect_with_only_a_reason_code_is_honoured() {
    let broker = start_default().await;
    let mut watcher = Client::connect(Version::V311, broker.addr, "watcher").await;
    watcher.subscribe("will/#", 1).await;
    let mut publisher = Client::connect(Version::V311, broker.addr, "publisher").await;

    for (reason, will_expected) in [(0x00u8, false), (0x04u8, true)] {
        let topic = format!("will/{reason}");
        let connect = Connect {
            will: Some(Will {
                topic: &topic,
                payload: b"will",
                qos: 1,
                retain: false,
            }),
            ..Connect::v5("short")
        };
        let mut raw = Raw::connected(broker.addr, &connect).await;
        raw.send(&[0xE0, 0x01, reason]).await;
        assert!(
            raw.expect_closed().await.is_empty(),
            "the broker closes after a DISCONNECT {reason:#04x}"
        );
        publisher.publish("will/end", 1, false, b"").await;
        let wills = watcher.recv_until("will/end").await;
        let expected = if will_expected {
            vec![(topic.clone(), "will".to_owned())]
        } else {
            vec![]
        };
        assert_eq!(
            wills.iter().map(message).collect::<Vec<_>>(),
            expected,
            "DISCONNECT {reason:#04x}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_the_session_over() {
    let broker = start_default().await;
    for version in [Version::V311, Version::V5] {
        let v5 = version == Version::V5;
        let id = format!("twin-{version:?}");
        let mut first = Raw::connected(broker.addr, &connect_for(version, &id)).await;
        let mut second = Raw::connected(broker.addr, &connect_for(version, &id)).await;

        let frames = first.expect_closed().await;
        if v5 {
            assert_eq!(frames.len(), 1, "{frames:?}");
            assert_eq!(frames[0].disconnect_reason(), 0x8E, "session taken over");
        } else {
            assert!(frames.is_empty(), "{frames:?}");
        }

        let topic = format!("twin/{version:?}");
        second
            .send(&packet::subscribe(v5, 7, &[(topic.as_str(), 0)]))
            .await;
        assert_eq!(second.recv().await.expect("SUBACK").kind(), 9);
        second
            .send(&packet::publish(
                v5,
                topic.as_bytes(),
                0,
                false,
                0,
                b"still here",
            ))
            .await;
        let (received, _) = second.recv().await.expect("PUBLISH").publish(version);
        assert_eq!(message(&received), (topic, "still here".into()));
    }
}

async fn persistent_session_queues_while_away(version: Version) {
    let broker = start_default().await;
    let v5 = version == Version::V5;
    let id = format!("durable-{version:?}");
    let (first_connect, reconnect) = match version {
        Version::V311 => (
            Connect {
                clean: false,
                ..Connect::v311(&id)
            },
            Connect {
                clean: false,
                ..Connect::v311(&id)
            },
        ),
        Version::V5 => (
            Connect {
                clean: true,
                properties: packet::property_u32(packet::SESSION_EXPIRY, 60),
                ..Connect::v5(&id)
            },
            Connect {
                clean: false,
                properties: packet::property_u32(packet::SESSION_EXPIRY, 60),
                ..Connect::v5(&id)
            },
        ),
    };

    // A new persistent session is not present yet.
    let mut away = Raw::connected(broker.addr, &first_connect).await;
    away.send(&packet::subscribe(v5, 1, &[("durable/#", 1)]))
        .await;
    assert_eq!(away.recv().await.expect("SUBACK").kind(), 9);
    away.send(&packet::disconnect()).await;
    assert!(away.expect_closed().await.is_empty());

    let mut publisher = Client::connect(Version::V311, broker.addr, "publisher").await;
    for n in 0..3 {
        publisher
            .publish(
                &format!("durable/{n}"),
                1,
                false,
                format!("m{n}").as_bytes(),
            )
            .await;
    }
    publisher
        .publish("durable/qos0", 0, false, b"not kept")
        .await;
    let stats = broker.handle.stats().await.expect("stats");
    assert_eq!(
        stats.clients_connected, 1,
        "only the publisher is connected"
    );
    assert_eq!(
        stats.sessions, 2,
        "the away client's session is kept in memory"
    );

    let (mut back, connack) = Raw::connect(broker.addr, &reconnect).await;
    assert_eq!(connack.connack(), (true, 0), "session present on reconnect");
    let mut received = Vec::new();
    for frame in back.until_ping_barrier().await {
        let (publish, pkid) = frame.publish(version);
        assert_eq!(publish.qos, 1);
        back.send(&packet::puback(pkid)).await;
        received.push(message(&publish));
    }
    assert_eq!(
        received,
        vec![
            ("durable/0".to_owned(), "m0".to_owned()),
            ("durable/1".to_owned(), "m1".to_owned()),
            ("durable/2".to_owned(), "m2".to_owned()),
        ],
        "the QoS 1 messages, in order; QoS 0 is not queued for an offline client"
    );
}

#[tokio::test]
async fn a_3_1_1_persistent_session_queues_qos_1_while_away_and_delivers_on_reconnect() {
    persistent_session_queues_while_away(Version::V311).await;
}

#[tokio::test]
async fn an_mqtt_5_session_with_expiry_queues_qos_1_while_away_and_delivers_on_reconnect() {
    persistent_session_queues_while_away(Version::V5).await;
}

#[tokio::test]
async fn an_mqtt_5_session_without_expiry_ends_with_the_connection() {
    let broker = start_default().await;
    let mut away = Raw::connected(broker.addr, &Connect::v5("fleeting")).await;
    away.send(&packet::subscribe(true, 1, &[("fleeting/#", 1)]))
        .await;
    assert_eq!(away.recv().await.expect("SUBACK").kind(), 9);
    away.send(&packet::disconnect()).await;
    assert!(away.expect_closed().await.is_empty());

    let mut publisher = Client::connect(Version::V311, broker.addr, "publisher").await;
    publisher.publish("fleeting/0", 1, false, b"lost").await;

    let reconnect = Connect {
        clean: false,
        ..Connect::v5("fleeting")
    };
    let (mut back, connack) = Raw::connect(broker.addr, &reconnect).await;
    assert_eq!(connack.connack(), (false, 0), "no session present");
    assert_eq!(back.until_ping_barrier().await, Vec::<Frame>::new());
}

// ---------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn wildcard_and_dollar_filters_match_exactly_the_expected_topics() {
    let topics = [
        "a",
        "a/b",
        "a/b/c",
        "a/c",
        "b/c",
        "/a",
        "a/",
        "$SYS/x",
        "$SYS/broker/uptime",
    ];
    let table: &[(&str, &[&str])] = &[
        ("#", &["a", "a/b", "a/b/c", "a/c", "b/c", "/a", "a/"]),
        ("+", &["a"]),
        ("a/#", &["a", "a/b", "a/b/c", "a/c", "a/"]),
        ("a/+", &["a/b", "a/c", "a/"]),
        ("+/+", &["a/b", "a/c", "b/c", "/a", "a/"]),
        ("+/b/+", &["a/b/c"]),
        ("/+", &["/a"]),
        ("a/b/c", &["a/b/c"]),
        ("+/x", &[]),
        ("$SYS/#", &["$SYS/x", "$SYS/broker/uptime"]),
        ("$SYS/+", &["$SYS/x"]),
        ("+/broker/uptime", &[]),
    ];
    const END: &str = "zz-end";

    let broker = start_default().await;
    let mut subscribers = Vec::new();
    for (n, (filter, _)) in table.iter().enumerate() {
        let mut client = Client::connect(Version::V311, broker.addr, &format!("sub{n}")).await;
        assert_eq!(client.subscribe(filter, 1).await, Some(1), "{filter}");
        assert_eq!(client.subscribe(END, 1).await, Some(1));
        subscribers.push(client);
    }
    let mut publisher = Client::connect(Version::V311, broker.addr, "publisher").await;
    for topic in topics {
        if topic.starts_with('$') {
            // Only the broker publishes to `$` topics.
            let message = Message::internal("test", topic, topic, QoS::AtLeastOnce, false);
            broker.handle.publish(message).await.expect("publish");
        } else {
            publisher.publish(topic, 1, false, topic.as_bytes()).await;
        }
    }
    publisher.publish(END, 1, false, b"").await;

    for ((filter, expected), subscriber) in table.iter().zip(&mut subscribers) {
        let got: Vec<String> = subscriber
            .recv_until(END)
            .await
            .into_iter()
            .map(|r| r.topic)
            .collect();
        assert_eq!(got, *expected, "filter {filter:?}");
    }
}

async fn qos_matrix(version: Version) {
    let broker = start_default().await;
    let mut subscribers = Vec::new();
    for sub_qos in 0..3u8 {
        let mut client = Client::connect(version, broker.addr, &format!("sub-qos{sub_qos}")).await;
        assert_eq!(client.subscribe("m/#", sub_qos).await, Some(sub_qos));
        subscribers.push(client);
    }
    let mut publisher = Client::connect(version, broker.addr, "publisher").await;
    for pub_qos in 0..3u8 {
        // Waits for PUBACK (1) or PUBREC/PUBREL/PUBCOMP (2): client to broker works.
        publisher
            .publish(&format!("m/{pub_qos}"), pub_qos, false, b"x")
            .await;
    }
    publisher.publish("m/end", 1, false, b"").await;

    for (sub_qos, subscriber) in subscribers.iter_mut().enumerate() {
        let sub_qos = sub_qos as u8;
        let got: BTreeMap<String, u8> = subscriber
            .recv_until("m/end")
            .await
            .into_iter()
            .map(|r| (r.topic, r.qos))
            .collect();
        let expected: BTreeMap<String, u8> = (0..3u8)
            .map(|pub_qos| (format!("m/{pub_qos}"), pub_qos.min(sub_qos)))
            .collect();
        assert_eq!(got, expected, "{version:?} subscription QoS {sub_qos}");
    }
    // Broker to client at QoS 2: the broker answered our PUBREC with PUBREL.
    subscribers[2].wait_pubrels(1).await;
}

#[tokio::test]
async fn delivered_qos_is_the_minimum_of_publish_and_subscription_qos_in_3_1_1() {
    qos_matrix(Version::V311).await;
}

#[tokio::test]
async fn delivered_qos_is_the_minimum_of_publish_and_subscription_qos_in_mqtt_5() {
    qos_matrix(Version::V5).await;
}

#[tokio::test]
async fn retained_messages_are_set_replaced_deleted_and_sent_to_late_subscribers() {
    let broker = start_default().await;
    let mut early = Client::connect(Version::V311, broker.addr, "early").await;
    early.subscribe("r/#", 1).await;
    let mut publisher = Client::connect(Version::V311, broker.addr, "publisher").await;
    publisher.publish("r/1", 1, true, b"one").await;
    publisher.publish("r/1", 1, true, b"two").await;
    publisher.publish("r/2", 1, true, b"doomed").await;
    publisher.publish("r/2", 1, true, b"").await;
    publisher.publish("r/3", 0, true, b"qos0").await;
    publisher.publish("r/4", 1, false, b"not retained").await;

    let mut late = Client::connect(Version::V311, broker.addr, "late").await;
    late.subscribe("r/#", 1).await;
    publisher.publish("r/end", 1, false, b"").await;

    let retained: Vec<(String, String, bool)> = late
        .recv_until("r/end")
        .await
        .into_iter()
        .map(|r| (r.topic.clone(), message(&r).1, r.retain))
        .collect();
    assert_eq!(
        retained,
        vec![
            ("r/1".to_owned(), "two".to_owned(), true),
            ("r/3".to_owned(), "qos0".to_owned(), true),
        ],
        "the late subscriber gets the latest retained value per topic, flagged retained"
    );

    // A live subscriber sees every publish as normal (3.1.1: retain 0), the delete too.
    let live: Vec<(String, String, bool)> = early
        .recv_until("r/end")
        .await
        .into_iter()
        .map(|r| (r.topic.clone(), message(&r).1, r.retain))
        .collect();
    let expected: Vec<(String, String, bool)> = [
        ("r/1", "one"),
        ("r/1", "two"),
        ("r/2", "doomed"),
        ("r/2", ""),
        ("r/3", "qos0"),
        ("r/4", "not retained"),
    ]
    .into_iter()
    .map(|(t, p)| (t.to_owned(), p.to_owned(), false))
    .collect();
    assert_eq!(live, expected);
}

// ---------------------------------------------------------------------------------------
// Bad input closes only the connection it came on
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_oversize_packet_closes_only_that_connection() {
    let mut config = mqtt::config();
    config.max_packet_size = 1024;
    let broker = mqtt::start(config).await;
    let mut witness = witness(&broker).await;
    let payload = vec![b'x'; 2000];

    let mut v3 = Raw::connected(broker.addr, &Connect::v311("big3")).await;
    let _ = v3
        .try_send(&packet::publish(false, b"big", 1, false, 1, &payload))
        .await;
    assert!(v3.expect_closed().await.is_empty());
    assert_still_works(&mut witness, "oversize-3.1.1").await;

    let (mut v5, connack) = Raw::connect(broker.addr, &Connect::v5("big5")).await;
    let rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack) = connack.v5() else {
        panic!("not a CONNACK: {connack:?}");
    };
    assert_eq!(
        ack.properties.and_then(|p| p.max_packet_size),
        Some(1024),
        "MQTT 5 clients are told the limit"
    );
    let _ = v5
        .try_send(&packet::publish(true, b"big", 1, false, 1, &payload))
        .await;
    let frames = v5.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].disconnect_reason(), 0x95, "packet too large");
    assert_still_works(&mut witness, "oversize-5").await;
}

/// MQTT 5 3.2.2.3.6: Maximum Packet Size is "the total number of bytes in an MQTT
/// Control Packet", fixed header included; a packet one byte over the advertised limit
/// is refused with 0x95, one exactly at the limit is accepted.
#[tokio::test]
async fn mqtt_5_max_packet_size_counts_the_whole_packet() {
    let mut config = mqtt::config();
    config.max_packet_size = 1024;
    let broker = mqtt::start(config).await;
    let mut raw = Raw::connected(broker.addr, &Connect::v5("edge")).await;

    let at_limit = packet::publish(true, b"t", 1, false, 1, &vec![b'x'; 1015]);
    assert_eq!(at_limit.len(), 1024);
    raw.send(&at_limit).await;
    let puback = raw.recv().await.expect("PUBACK for a packet at the limit");
    assert_eq!(puback.kind(), 4, "{puback:?}");

    let over = packet::publish(true, b"t", 1, false, 2, &vec![b'x'; 1016]);
    assert_eq!(over.len(), 1025);
    let _ = raw.try_send(&over).await;
    let frames = raw.expect_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].disconnect_reason(), 0x95);
}

#[tokio::test]
async fn garbage_bytes_close_only_that_connection() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;

    // Garbage instead of CONNECT: an invalid remaining length.
    let mut raw = Raw::open(broker.addr).await;
    raw.send(&[0xFF; 16]).await;
    assert!(raw.expect_closed().await.is_empty());
    assert_still_works(&mut witness, "garbage-first").await;

    // Garbage after CONNECT: a reserved packet type, then noise.
    for version in [Version::V311, Version::V5] {
        assert_bad_packet_closes_only_its_connection(
            &broker,
            &mut witness,
            version,
            "garbage",
            b"\x00\x04\xde\xad\xbe\xef not mqtt at all",
            &[0x81, 0x82],
        )
        .await;
    }
}

#[tokio::test]
async fn a_publish_with_qos_3_closes_only_that_connection() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in [Version::V311, Version::V5] {
        let bad = packet::publish(version == Version::V5, b"q/3", 3, false, 1, b"x");
        assert_bad_packet_closes_only_its_connection(
            &broker,
            &mut witness,
            version,
            "qos 3",
            &bad,
            &[0x81],
        )
        .await;
    }
}

#[tokio::test]
async fn a_qos_1_publish_with_packet_id_0_closes_only_that_connection() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in [Version::V311, Version::V5] {
        let bad = packet::publish(version == Version::V5, b"pkid/0", 1, false, 0, b"x");
        assert_bad_packet_closes_only_its_connection(
            &broker,
            &mut witness,
            version,
            "packet id 0",
            &bad,
            &[0x81, 0x82],
        )
        .await;
    }
}

#[tokio::test]
async fn a_wildcard_in_a_publish_topic_closes_only_that_connection() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    // A subscriber to everything must not see the bad publishes.
    let mut all = Client::connect(Version::V311, broker.addr, "all").await;
    all.subscribe("#", 0).await;
    for version in [Version::V311, Version::V5] {
        for topic in ["a/+/c", "a/#"] {
            let bad = packet::publish(version == Version::V5, topic.as_bytes(), 0, false, 0, b"x");
            assert_bad_packet_closes_only_its_connection(
                &broker,
                &mut witness,
                version,
                &format!("wildcard {topic}"),
                &bad,
                &[0x90],
            )
            .await;
        }
    }
    witness.publish("alive/end", 1, false, b"").await;
    let seen: Vec<String> = all
        .recv_until("alive/end")
        .await
        .into_iter()
        .map(|r| r.topic)
        .filter(|t| !t.starts_with("alive/"))
        .collect();
    assert_eq!(seen, Vec::<String>::new());
}

#[tokio::test]
async fn an_invalid_utf8_topic_closes_only_that_connection() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in [Version::V311, Version::V5] {
        let bad = packet::publish(version == Version::V5, b"bad/\xff\xfe", 0, false, 0, b"x");
        assert_bad_packet_closes_only_its_connection(
            &broker,
            &mut witness,
            version,
            "invalid utf-8",
            &bad,
            &[0x81],
        )
        .await;
    }
}

/// An MQTT 5 PUBLISH must carry a property length; one without it is malformed (the
/// frame is complete, its contents are short), not "incomplete".
#[tokio::test]
async fn an_mqtt_5_publish_without_its_property_length_closes_only_that_connection() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    // QoS 0, topic "t", no property length, no payload: remaining length 3.
    let bad = packet::frame(0x30, b"\x00\x01t");
    assert_bad_packet_closes_only_its_connection(
        &broker,
        &mut witness,
        Version::V5,
        "no property length",
        &bad,
        &[0x81],
    )
    .await;
}

#[tokio::test]
async fn a_truncated_packet_followed_by_close_ends_only_that_connection_and_fires_its_will() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let mut watcher = Client::connect(Version::V311, broker.addr, "watcher").await;
    watcher.subscribe("will/#", 1).await;
    for version in [Version::V311, Version::V5] {
        let topic = format!("will/{version:?}");
        let connect = Connect {
            will: Some(Will {
                topic: &topic,
                payload: b"cut off",
                qos: 1,
                retain: false,
            }),
            ..connect_for(version, "truncated")
        };
        let mut raw = Raw::connected(broker.addr, &connect).await;
        let whole = packet::publish(version == Version::V5, b"t", 1, false, 1, &[b'x'; 100]);
        raw.send(&whole[..40]).await;
        raw.shutdown_write().await;
        assert!(raw.expect_closed().await.is_empty());
        assert_eq!(message(&watcher.recv().await), (topic, "cut off".into()));
        assert_still_works(&mut witness, &format!("truncated-{version:?}")).await;
    }
}

// ---------------------------------------------------------------------------------------
// The in-process API
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn broker_handle_publish_reaches_a_network_subscriber() {
    let broker = start_default().await;
    let mut client = Client::connect(Version::V5, broker.addr, "dashboard").await;
    client.subscribe("plant/+/temp", 1).await;
    broker
        .handle
        .publish(Message::internal(
            "driver",
            "plant/boiler/temp",
            "81.5",
            QoS::AtLeastOnce,
            false,
        ))
        .await
        .expect("publish");
    let received = client.recv().await;
    assert_eq!(
        message(&received),
        ("plant/boiler/temp".into(), "81.5".into())
    );
    assert_eq!(received.qos, 1);
}

#[tokio::test]
async fn broker_handle_subscribe_receives_a_network_clients_publish() {
    let broker = start_default().await;
    let mut sub = broker
        .handle
        .subscribe(
            "uplink",
            vec![("cmd/#".to_owned(), QoS::AtLeastOnce)],
            InternalSubscribeOptions::default(),
        )
        .await
        .expect("subscribe");
    let mut client = Client::connect(Version::V311, broker.addr, "operator").await;
    client.publish("cmd/valve", 1, false, b"open").await;
    let received = within("the internal subscriber's message", sub.recv())
        .await
        .expect("broker running");
    assert_eq!(&*received.topic, "cmd/valve");
    assert_eq!(&received.payload[..], b"open");
    assert_eq!(received.origin, Origin::Client(Arc::from("operator")));
}

#[tokio::test]
async fn an_internal_subscriber_does_not_receive_what_it_published_under_its_own_name() {
    let broker = start_default().await;
    let filters = vec![("loop/#".to_owned(), QoS::AtLeastOnce)];
    let mut bridge = broker
        .handle
        .subscribe(
            "bridge",
            filters.clone(),
            InternalSubscribeOptions::default(),
        )
        .await
        .expect("subscribe");
    let mut observer = broker
        .handle
        .subscribe("observer", filters, InternalSubscribeOptions::default())
        .await
        .expect("subscribe");

    for (origin, topic) in [("bridge", "loop/own"), ("driver", "loop/other")] {
        let matched = broker
            .handle
            .publish_and_wait(Message::internal(
                origin,
                topic,
                "x",
                QoS::AtLeastOnce,
                false,
            ))
            .await
            .expect("publish");
        assert!(matched, "{topic} matched a subscriber");
    }

    let topic = |m: Option<Message>| m.expect("broker running").topic.to_string();
    // The router handles publishes in order: had "loop/own" reached the bridge, it
    // would come first.
    assert_eq!(topic(within("bridge", bridge.recv()).await), "loop/other");
    assert!(bridge.try_recv().is_none());
    // Someone else does get it.
    assert_eq!(topic(within("observer", observer.recv()).await), "loop/own");
    assert_eq!(
        topic(within("observer", observer.recv()).await),
        "loop/other"
    );
}

// ---------------------------------------------------------------------------------------
// MQTT 5 flow control
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn mqtt_5_receive_maximum_caps_unacknowledged_publishes_to_the_client() {
    let broker = start_default().await;
    let connect = Connect {
        properties: packet::property_u16(packet::RECEIVE_MAXIMUM, 2),
        ..Connect::v5("slow")
    };
    let mut slow = Raw::connected(broker.addr, &connect).await;
    slow.send(&packet::subscribe(true, 1, &[("flow/#", 1)]))
        .await;
    assert_eq!(slow.recv().await.expect("SUBACK").kind(), 9);

    let mut publisher = Client::connect(Version::V311, broker.addr, "fast").await;
    for n in 0..10 {
        publisher
            .publish(&format!("flow/{n}"), 1, false, b"x")
            .await;
    }
    // The router handles requests in order: once it answers this, all ten are queued
    // for the slow client.
    broker.handle.stats().await.expect("stats");

    let publishes = |frames: Vec<Frame>| -> Vec<(String, u16)> {
        frames
            .into_iter()
            .map(|f| {
                let (publish, pkid) = f.publish(Version::V5);
                assert_eq!(publish.qos, 1);
                (publish.topic, pkid)
            })
            .collect()
    };
    let mut unacked = publishes(slow.until_ping_barrier().await);
    assert_eq!(
        unacked.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["flow/0", "flow/1"],
        "exactly Receive Maximum publishes without acknowledgement"
    );

    // Each PUBACK opens the window by exactly one.
    for n in 2..10 {
        let (_, pkid) = unacked.remove(0);
        slow.send(&packet::puback(pkid)).await;
        let more = publishes(slow.until_ping_barrier().await);
        assert_eq!(
            more.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
            [format!("flow/{n}")],
            "one PUBACK, one more publish"
        );
        unacked.extend(more);
    }
    for (_, pkid) in unacked {
        slow.send(&packet::puback(pkid)).await;
    }
    assert_eq!(slow.until_ping_barrier().await, Vec::<Frame>::new());
}

// ---------------------------------------------------------------------------------------
// Backpressure
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_subscriber_that_keeps_up_slowly_loses_nothing_from_a_fast_publisher() {
    const COUNT: usize = 1500;
    const MAX_QUEUED: usize = 10;
    const MAX_INFLIGHT: usize = 5;
    // Routed and not yet taken by the subscriber: the queue may overshoot its bound (twice
    // the bound and two routing windows of 128) while the publisher learns it is full, plus
    // the in-flight window.
    const SLACK: usize = 2 * MAX_QUEUED + 2 * 128 + MAX_INFLIGHT;
    let broker = mqtt::start(fieldmq::broker::config::BrokerConfig {
        // A tiny queue: without backpressure most of the burst would be dropped.
        max_queued_messages: MAX_QUEUED,
        max_inflight: MAX_INFLIGHT as u16,
        ..mqtt::config()
    })
    .await;
    // The subscriber speaks raw MQTT and waits a millisecond before each PUBACK: with five
    // in flight it takes at most about 5,000 messages a second, far fewer than the
    // publisher sends.
    let mut subscriber = Raw::connected(broker.addr, &Connect::v311("slow-sub")).await;
    subscriber
        .send(&packet::subscribe(false, 1, &[("burst/#", 1)]))
        .await;
    assert_eq!(subscriber.recv().await.expect("SUBACK").kind(), 9);

    let mut options = rumqttc::MqttOptions::new("fast-pub", "127.0.0.1", broker.addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(100);
    let (publisher, mut pub_events) = rumqttc::AsyncClient::new(options, 100);
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acks = acked.clone();
    tokio::spawn(async move {
        while let Ok(event) = pub_events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
                acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    tokio::spawn(async move {
        for n in 0..COUNT {
            let _ = publisher
                .publish("burst/x", rumqttc::QoS::AtLeastOnce, false, n.to_string())
                .await;
        }
    });

    let mut received = Vec::with_capacity(COUNT);
    let mut most_ahead = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while received.len() < COUNT {
            let frame = subscriber.recv().await.expect("the connection stays open");
            let (publish, pkid) = frame.publish(Version::V311);
            received.push(
                String::from_utf8_lossy(&publish.payload)
                    .parse::<usize>()
                    .unwrap_or(usize::MAX),
            );
            // How far the publisher's acknowledged count runs ahead of what this
            // subscriber has taken: backpressure keeps it within the queue's slack.
            let ahead = acked
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(received.len());
            most_ahead = most_ahead.max(ahead);
            tokio::time::sleep(Duration::from_millis(1)).await;
            subscriber.send(&packet::puback(pkid)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {COUNT} arrived", received.len()));
    let expected: Vec<usize> = (0..COUNT).collect();
    assert_eq!(received, expected, "every message, in order");
    assert!(
        most_ahead >= MAX_QUEUED,
        "the subscriber never fell behind the publisher (at most {most_ahead} messages)"
    );
    assert!(
        most_ahead <= SLACK,
        "the publisher had {most_ahead} acknowledged messages more than the subscriber had \
         taken (at most {SLACK} with backpressure)"
    );
    let stats = broker.handle.stats().await.expect("stats");
    assert_eq!(stats.messages_dropped, 0, "nothing dropped");
    assert_eq!(
        stats.slow_clients_disconnected, 0,
        "a subscriber that keeps up, however slowly, is not disconnected"
    );
}

// ---------------------------------------------------------------------------------------
// $SYS
// ---------------------------------------------------------------------------------------

/// Everything a `$SYS/#` subscriber received, in order: (topic, payload, retain flag, bytes
/// on the wire).
struct SysLog {
    watcher: Raw,
    frames: Vec<(String, String, bool, usize)>,
}

impl SysLog {
    /// Read until `n` more ticks have begun (a live `$SYS/broker/uptime`); the index of the
    /// last one's first frame.
    async fn ticks(&mut self, n: usize) -> usize {
        let mut seen = 0;
        loop {
            let frame = self
                .watcher
                .recv()
                .await
                .expect("the watcher stays connected");
            let (publish, _) = frame.publish(Version::V311);
            let payload = String::from_utf8(publish.payload).expect("UTF-8 $SYS payload");
            let tick = publish.topic == "$SYS/broker/uptime" && !publish.retain;
            self.frames
                .push((publish.topic, payload, publish.retain, frame.bytes.len()));
            if tick {
                seen += 1;
                if seen == n {
                    return self.frames.len() - 1;
                }
            }
        }
    }

    /// Read on until `topic` arrives; its value.
    async fn until(&mut self, topic: &str) -> u64 {
        loop {
            let frame = self
                .watcher
                .recv()
                .await
                .expect("the watcher stays connected");
            let (publish, _) = frame.publish(Version::V311);
            let payload = String::from_utf8(publish.payload).expect("UTF-8 $SYS payload");
            let found = publish.topic == topic;
            self.frames.push((
                publish.topic,
                payload.clone(),
                publish.retain,
                frame.bytes.len(),
            ));
            if found {
                return payload.parse().expect("a number");
            }
        }
    }

    /// The value of `topic` as of the frames before `end` (published only when it changed,
    /// so the last one published).
    fn value(&self, topic: &str, end: usize) -> u64 {
        self.frames[..end]
            .iter()
            .rev()
            .find(|(t, ..)| t == topic)
            .map(|(_, value, ..)| value.parse().expect("a number"))
            .unwrap_or_else(|| panic!("no {topic} before frame {end}"))
    }
}

/// `$SYS/broker/messages/{received,sent}` and `bytes/{received,sent}` move by exactly the
/// traffic between two ticks: the publisher's messages and bytes in, their deliveries and
/// bytes out, and the broker's own `$SYS` messages (routed like any message, and delivered
/// to the one `$SYS` subscriber).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_message_and_byte_counters_move_by_exactly_the_traffic() {
    const N: usize = 50;
    let broker = mqtt::start(fieldmq::broker::config::BrokerConfig {
        sys_interval: Some(Duration::from_secs(1)),
        ..mqtt::config()
    })
    .await;
    let mut watcher = Raw::connected(broker.addr, &Connect::v311("sys-watcher")).await;
    watcher
        .send(&packet::subscribe(false, 1, &[("$SYS/#", 0)]))
        .await;
    assert_eq!(watcher.recv().await.expect("SUBACK").kind(), 9);
    let mut subscriber = Raw::connected(broker.addr, &Connect::v311("sys-sub")).await;
    subscriber
        .send(&packet::subscribe(false, 1, &[("traffic/#", 0)]))
        .await;
    assert_eq!(subscriber.recv().await.expect("SUBACK").kind(), 9);
    let mut publisher = Raw::connected(broker.addr, &Connect::v311("sys-pub")).await;
    let mut sys = SysLog {
        watcher,
        frames: Vec::new(),
    };

    // Tick A: the second after the set-up, so its statistics were taken after it.
    let tick_a = sys.ticks(2).await;
    let payload = vec![b'p'; 200];
    let mut bytes_in = 0;
    for n in 0..N {
        let publish = packet::publish(
            false,
            format!("traffic/{n}").as_bytes(),
            0,
            false,
            0,
            &payload,
        );
        bytes_in += publish.len();
        publisher.send(&publish).await;
    }
    let mut bytes_out = 0;
    for _ in 0..N {
        let frame = subscriber.recv().await.expect("a delivery");
        assert_eq!(frame.kind(), 3);
        bytes_out += frame.bytes.len();
    }
    // Tick B: the second after the traffic, so its statistics were taken after all of it.
    let tick_b = sys.ticks(2).await;
    sys.until("$SYS/broker/bytes/sent").await;
    let end = sys.frames.len();

    // The broker's own messages between the two: ticks A up to B, all delivered here.
    let own: Vec<&(String, String, bool, usize)> = sys.frames[tick_a..tick_b]
        .iter()
        .filter(|(_, _, retain, _)| !retain)
        .collect();
    assert_eq!(
        own.len(),
        tick_b - tick_a,
        "no retained frame between ticks"
    );
    let own_bytes: usize = own.iter().map(|(.., len)| len).sum();
    // Tick A's values are those published up to tick A + 1.
    let after_a = tick_a
        + 1
        + sys.frames[tick_a + 1..]
            .iter()
            .position(|(topic, _, retain, _)| topic == "$SYS/broker/uptime" && !retain)
            .expect("a tick after A");
    let delta = |topic: &str| sys.value(topic, end) - sys.value(topic, after_a);
    assert_eq!(
        delta("$SYS/broker/messages/received"),
        (N + own.len()) as u64,
        "messages received: {N} published and {} of the broker's own",
        own.len()
    );
    assert_eq!(
        delta("$SYS/broker/messages/sent"),
        (N + own.len()) as u64,
        "messages sent: {N} deliveries and {} `$SYS` messages to the watcher",
        own.len()
    );
    assert_eq!(
        delta("$SYS/broker/bytes/received"),
        bytes_in as u64,
        "bytes received: the {N} PUBLISH packets"
    );
    assert_eq!(
        delta("$SYS/broker/bytes/sent"),
        (bytes_out + own_bytes) as u64,
        "bytes sent: the {N} deliveries and the `$SYS` messages"
    );
}
