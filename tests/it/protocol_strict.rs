//! Packets the MQTT specifications call malformed or a protocol error, which the broker
//! must refuse although its codec would accept them: raw bytes over a real socket, one test
//! per rule, both protocol versions where the rule exists in both. A refused packet closes
//! its connection: in MQTT 5 after a DISCONNECT (or, for CONNECT, a CONNACK) with 0x81
//! Malformed Packet or 0x82 Protocol Error as the specification classes it, in 3.1.1 with
//! nothing sent. Another client on the same broker keeps publishing and receiving.

use mqtt::packet::{self, Connect, Will};
use mqtt::{
    assert_still_works, bad_client_id, connect_for, start_default, witness, Client, Raw,
    TestBroker, Version,
};

use crate::util::mqtt;

const MALFORMED: u8 = 0x81;
const PROTOCOL_ERROR: u8 = 0x82;
const BOTH: [Version; 2] = [Version::V311, Version::V5];

/// After a good CONNECT, `bad` closes the connection: MQTT 5 with exactly one DISCONNECT
/// carrying `v5_reason`, 3.1.1 with nothing sent. The witness is unaffected.
async fn assert_refused(
    broker: &TestBroker,
    witness: &mut Client,
    version: Version,
    what: &str,
    bad: &[u8],
    v5_reason: u8,
) {
    mqtt::assert_bad_packet_closes_only_its_connection(
        broker,
        witness,
        version,
        what,
        bad,
        &[v5_reason],
    )
    .await;
}

/// A CONNECT that must be refused: MQTT 5 gets exactly one CONNACK with `v5_reason`, 3.1.1
/// a close without CONNACK. The witness is unaffected.
async fn assert_connect_refused(
    broker: &TestBroker,
    witness: &mut Client,
    version: Version,
    what: &str,
    connect: &[u8],
    v5_reason: u8,
) {
    let mut raw = Raw::open(broker.addr).await;
    raw.send(connect).await;
    let frames = raw.expect_closed().await;
    match version {
        Version::V311 => assert!(
            frames.is_empty(),
            "{what}: 3.1.1 closes without CONNACK, got {frames:?}"
        ),
        Version::V5 => {
            assert_eq!(frames.len(), 1, "{what}: one CONNACK, got {frames:?}");
            assert_eq!(frames[0].connack(), (false, v5_reason), "{what}: CONNACK");
        }
    }
    assert_still_works(witness, &format!("{what}-{version:?}")).await;
}

/// `connect` encoded, with its connect flags changed by `change` (the byte after the
/// protocol name and level).
fn with_connect_flags(connect: &Connect<'_>, change: impl Fn(u8) -> u8) -> Vec<u8> {
    let mut bytes = connect.encode();
    assert!(bytes.len() < 128, "one-byte remaining length");
    // Fixed header (2), protocol name (2 + 4), level (1).
    bytes[9] = change(bytes[9]);
    bytes
}

/// The MQTT 5 property list for `version`: `Some` in MQTT 5, `None` (absent) in 3.1.1.
fn props(version: Version, properties: &[u8]) -> Option<&[u8]> {
    (version == Version::V5).then_some(properties)
}

// ---------------------------------------------------------------------------------------
// CONNECT
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_connect_with_the_reserved_flag_set_is_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let id = bad_client_id("reserved", version);
        let bad = with_connect_flags(&connect_for(version, &id), |f| f | 0x01);
        assert_connect_refused(
            &broker,
            &mut witness,
            version,
            "reserved flag",
            &bad,
            MALFORMED,
        )
        .await;
    }
}

#[tokio::test]
async fn a_connect_with_will_qos_3_is_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let id = bad_client_id("will-qos-3", version);
        let connect = Connect {
            will: Some(Will {
                topic: "will/t",
                payload: b"gone",
                qos: 3,
                retain: false,
            }),
            ..connect_for(version, &id)
        };
        let bad = connect.encode();
        assert_connect_refused(
            &broker,
            &mut witness,
            version,
            "will qos 3",
            &bad,
            MALFORMED,
        )
        .await;
    }
}

#[tokio::test]
async fn a_connect_with_will_qos_or_will_retain_but_no_will_flag_is_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        for (what, bits) in [
            ("will qos without will", 0x08),
            ("will retain without will", 0x20),
        ] {
            let id = bad_client_id(what, version);
            let bad = with_connect_flags(&connect_for(version, &id), |f| f | bits);
            assert_connect_refused(&broker, &mut witness, version, what, &bad, MALFORMED).await;
        }
    }
}

#[tokio::test]
async fn a_3_1_1_connect_with_a_password_but_no_user_name_is_refused_and_mqtt_5_allows_it() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let bad = Connect {
        password: Some("secret"),
        ..Connect::v311("password-only-311")
    };
    assert_connect_refused(
        &broker,
        &mut witness,
        Version::V311,
        "password without user name",
        &bad.encode(),
        MALFORMED,
    )
    .await;

    // MQTT 5 (3.1.2.9) allows a password without a user name.
    let good = Connect {
        password: Some("secret"),
        ..Connect::v5("password-only-5")
    };
    let (mut raw, connack) = Raw::connect(broker.addr, &good).await;
    assert_eq!(connack.connack(), (false, 0));
    raw.send(&packet::disconnect()).await;
    assert!(raw.expect_closed().await.is_empty());
}

#[tokio::test]
async fn an_mqtt_5_connect_with_session_expiry_twice_is_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let properties = [
        packet::property_u32(packet::SESSION_EXPIRY, 10),
        packet::property_u32(packet::SESSION_EXPIRY, 20),
    ]
    .concat();
    let bad = Connect {
        properties,
        ..Connect::v5("expiry-twice")
    };
    assert_connect_refused(
        &broker,
        &mut witness,
        Version::V5,
        "session expiry twice",
        &bad.encode(),
        PROTOCOL_ERROR,
    )
    .await;
}

#[tokio::test]
async fn an_mqtt_5_will_with_will_delay_twice_is_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let mut body = Vec::new();
    packet::put_bytes(&mut body, b"MQTT");
    body.push(5);
    body.push(0x02 | 0x04); // clean start, will (QoS 0)
    body.extend_from_slice(&60u16.to_be_bytes());
    body.push(0); // CONNECT properties
    packet::put_bytes(&mut body, b"will-delay-twice");
    let will_properties = [
        packet::property_u32(packet::WILL_DELAY, 1),
        packet::property_u32(packet::WILL_DELAY, 2),
    ]
    .concat();
    packet::put_properties(&mut body, &will_properties);
    packet::put_bytes(&mut body, b"will/t");
    packet::put_bytes(&mut body, b"gone");
    let bad = packet::frame(0x10, &body);
    assert_connect_refused(
        &broker,
        &mut witness,
        Version::V5,
        "will delay twice",
        &bad,
        PROTOCOL_ERROR,
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Fixed-header flags
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_unsubscribe_and_pubrel_with_fixed_header_flags_other_than_0010_are_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let no_props = props(version, &[]);
        for flags in [0x0, 0x3, 0xA] {
            let cases = [
                (
                    "subscribe flags",
                    packet::subscribe_with(0x80 | flags, 1, no_props, &[("a/b", 1)]),
                ),
                (
                    "unsubscribe flags",
                    packet::unsubscribe_with(0xA0 | flags, 1, no_props, &["a/b"]),
                ),
                ("pubrel flags", packet::frame(0x60 | flags, &[0, 1])),
            ];
            for (what, bad) in cases {
                let what = format!("{what} {flags:04b}");
                assert_refused(&broker, &mut witness, version, &what, &bad, MALFORMED).await;
            }
        }
    }
}

#[tokio::test]
async fn puback_pubrec_pubcomp_pingreq_and_disconnect_with_reserved_flags_set_are_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let cases = [
            ("puback flags", packet::frame(0x42, &[0, 1])),
            ("pubrec flags", packet::frame(0x52, &[0, 1])),
            ("pubcomp flags", packet::frame(0x72, &[0, 1])),
            ("pingreq flags", vec![0xC2, 0]),
            ("disconnect flags", vec![0xE2, 0]),
        ];
        for (what, bad) in cases {
            assert_refused(&broker, &mut witness, version, what, &bad, MALFORMED).await;
        }
    }
}

#[tokio::test]
async fn a_qos_0_publish_with_dup_set_is_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let bad = packet::publish_with(0x38, "dup/0", None, props(version, &[]), b"x");
        assert_refused(&broker, &mut witness, version, "qos 0 dup", &bad, MALFORMED).await;
    }
}

// ---------------------------------------------------------------------------------------
// Packet identifiers and empty payloads
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_unsubscribe_and_qos_2_publish_with_packet_id_0_are_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let no_props = props(version, &[]);
        let cases = [
            (
                "subscribe pkid 0",
                packet::subscribe_with(0x82, 0, no_props, &[("a/b", 1)]),
            ),
            (
                "unsubscribe pkid 0",
                packet::unsubscribe_with(0xA2, 0, no_props, &["a/b"]),
            ),
            (
                "qos 2 publish pkid 0",
                packet::publish_with(0x34, "pkid/0", Some(0), no_props, b"x"),
            ),
        ];
        for (what, bad) in cases {
            assert_refused(&broker, &mut witness, version, what, &bad, MALFORMED).await;
        }
    }
}

#[tokio::test]
async fn an_unsubscribe_without_filters_is_refused_as_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let bad = packet::unsubscribe_with(0xA2, 7, props(version, &[]), &[]);
        assert_refused(
            &broker,
            &mut witness,
            version,
            "empty unsubscribe",
            &bad,
            PROTOCOL_ERROR,
        )
        .await;
    }
}

#[tokio::test]
async fn a_subscribe_without_filters_is_refused_as_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let bad = packet::subscribe_with(0x82, 7, props(version, &[]), &[]);
        assert_refused(
            &broker,
            &mut witness,
            version,
            "empty subscribe",
            &bad,
            PROTOCOL_ERROR,
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// Subscription options
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn reserved_subscription_option_bits_are_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    // MQTT 5: bits 6 and 7 are reserved.
    for options in [0x41, 0x81] {
        let bad = packet::subscribe_with(0x82, 1, Some(&[]), &[("ok/1", 1), ("a/b", options)]);
        let what = format!("v5 options {options:#04x}");
        assert_refused(&broker, &mut witness, Version::V5, &what, &bad, MALFORMED).await;
    }
    // 3.1.1: bits 2 to 7 are reserved (MQTT 5's no local, retain as published and retain
    // handling included).
    for options in [0x05, 0x09, 0x11, 0x21, 0x41, 0x81] {
        let bad = packet::subscribe_with(0x82, 1, None, &[("ok/1", 1), ("a/b", options)]);
        let what = format!("3.1.1 options {options:#04x}");
        assert_refused(&broker, &mut witness, Version::V311, &what, &bad, MALFORMED).await;
    }
}

#[tokio::test]
async fn a_subscription_with_qos_3_is_refused() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    for version in BOTH {
        let bad = packet::subscribe_with(0x82, 1, props(version, &[]), &[("a/b", 3)]);
        // MQTT 5 3.8.3.1 calls it a protocol error; 3.1.1 closes.
        assert_refused(
            &broker,
            &mut witness,
            version,
            "sub qos 3",
            &bad,
            PROTOCOL_ERROR,
        )
        .await;
    }
}

#[tokio::test]
async fn an_mqtt_5_subscription_with_retain_handling_3_is_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let bad = packet::subscribe_with(0x82, 1, Some(&[]), &[("a/b", 0x31)]);
    assert_refused(
        &broker,
        &mut witness,
        Version::V5,
        "retain handling 3",
        &bad,
        PROTOCOL_ERROR,
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// MQTT 5 properties
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_mqtt_5_publish_with_topic_alias_twice_is_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let properties = [
        packet::property_u16(packet::TOPIC_ALIAS, 1),
        packet::property_u16(packet::TOPIC_ALIAS, 2),
    ]
    .concat();
    let bad = packet::publish_with(0x32, "alias/twice", Some(1), Some(&properties), b"x");
    assert_refused(
        &broker,
        &mut witness,
        Version::V5,
        "topic alias twice",
        &bad,
        PROTOCOL_ERROR,
    )
    .await;
}

#[tokio::test]
async fn any_single_valued_mqtt_5_property_given_twice_is_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let twice = |property: Vec<u8>| [property.clone(), property].concat();
    let expiry_twice = twice(packet::property_u32(0x02, 60));
    let subscription_id_twice = twice(packet::property_varint(packet::SUBSCRIPTION_IDENTIFIER, 5));
    let reason_twice = twice(packet::property_str(packet::REASON_STRING, "why"));
    let session_expiry_twice = twice(packet::property_u32(packet::SESSION_EXPIRY, 0));
    let cases = [
        (
            "message expiry twice",
            packet::publish_with(0x30, "expiry/twice", None, Some(&expiry_twice), b"x"),
        ),
        (
            "subscription id twice",
            packet::subscribe_with(0x82, 1, Some(&subscription_id_twice), &[("a/b", 1)]),
        ),
        ("puback reason string twice", {
            let mut body = vec![0, 1, 0];
            packet::put_properties(&mut body, &reason_twice);
            packet::frame(0x40, &body)
        }),
        ("disconnect session expiry twice", {
            let mut body = vec![0];
            packet::put_properties(&mut body, &session_expiry_twice);
            packet::frame(0xE0, &body)
        }),
    ];
    for (what, bad) in cases {
        assert_refused(
            &broker,
            &mut witness,
            Version::V5,
            what,
            &bad,
            PROTOCOL_ERROR,
        )
        .await;
    }
}

#[tokio::test]
async fn an_mqtt_5_subscription_identifier_of_0_is_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let properties = packet::property_varint(packet::SUBSCRIPTION_IDENTIFIER, 0);
    let bad = packet::subscribe_with(0x82, 1, Some(&properties), &[("a/b", 1)]);
    assert_refused(
        &broker,
        &mut witness,
        Version::V5,
        "subscription id 0",
        &bad,
        PROTOCOL_ERROR,
    )
    .await;
}

#[tokio::test]
async fn an_mqtt_5_publish_from_a_client_with_a_subscription_identifier_is_a_protocol_error() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let properties = packet::property_varint(packet::SUBSCRIPTION_IDENTIFIER, 3);
    let bad = packet::publish_with(0x30, "sub/id", None, Some(&properties), b"x");
    assert_refused(
        &broker,
        &mut witness,
        Version::V5,
        "publish with subscription id",
        &bad,
        PROTOCOL_ERROR,
    )
    .await;
}

#[tokio::test]
async fn an_mqtt_5_property_not_valid_in_its_packet_or_overrunning_its_list_is_malformed() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;
    let session_expiry = packet::property_u32(packet::SESSION_EXPIRY, 1);
    // A property list whose length (2) ends inside its Topic Alias (3 bytes).
    let mut overrun = vec![0x00, 0x01, b't'];
    overrun.extend_from_slice(&[2, packet::TOPIC_ALIAS, 0]);
    overrun.extend_from_slice(&[1, b'x']);
    let cases = [
        (
            "session expiry in publish",
            packet::publish_with(0x30, "wrong/property", None, Some(&session_expiry), b"x"),
        ),
        ("property overruns its list", packet::frame(0x30, &overrun)),
    ];
    for (what, bad) in cases {
        assert_refused(&broker, &mut witness, Version::V5, what, &bad, MALFORMED).await;
    }
}

// ---------------------------------------------------------------------------------------
// What stays valid
// ---------------------------------------------------------------------------------------

/// The strict checks refuse nothing valid at their edges: repeated user properties, every
/// MQTT 5 subscription option, a QoS 1 PUBLISH with DUP, a PUBREL with its flags.
#[tokio::test]
async fn valid_packets_at_the_edges_of_the_rules_are_accepted() {
    let broker = start_default().await;
    let mut witness = witness(&broker).await;

    let mut v5 = Raw::connected(broker.addr, &Connect::v5("edges-5")).await;
    // Retain as published, retain handling 2, QoS 2 (and no local on the second filter);
    // the largest subscription identifier; a user property twice.
    let id = packet::property_varint(packet::SUBSCRIPTION_IDENTIFIER, 268_435_455);
    let users = [
        packet::property_pair("k", "1"),
        packet::property_pair("k", "2"),
    ]
    .concat();
    v5.send(&packet::subscribe_with(
        0x82,
        1,
        Some(&[id, users.clone()].concat()),
        &[("edge/#", 0x2A), ("elsewhere/#", 0x2E)],
    ))
    .await;
    let suback = v5.recv().await.expect("SUBACK");
    assert_eq!(suback.kind(), 9, "{suback:?}");
    assert!(
        suback.body().ends_with(&[2, 2]),
        "granted QoS 2: {suback:?}"
    );

    let mut v3 = Raw::connected(broker.addr, &Connect::v311("edges-311")).await;
    v3.send(&packet::publish_with(
        0x3A,
        "edge/a",
        Some(9),
        None,
        b"dup qos 1",
    ))
    .await;
    let puback = v3.recv().await.expect("PUBACK");
    assert_eq!(puback.bytes, vec![0x40, 2, 0, 9]);
    v3.send(&packet::publish_with(
        0x34,
        "edge/b",
        Some(10),
        None,
        b"qos 2",
    ))
    .await;
    let pubrec = v3.recv().await.expect("PUBREC");
    assert_eq!(pubrec.bytes, vec![0x50, 2, 0, 10]);
    v3.send(&packet::frame(0x62, &[0, 10])).await;
    let pubcomp = v3.recv().await.expect("PUBCOMP");
    assert_eq!(pubcomp.bytes, vec![0x70, 2, 0, 10]);
    v3.send(&packet::unsubscribe_with(0xA2, 11, None, &["x/y", "z"]))
        .await;
    assert_eq!(v3.recv().await.expect("UNSUBACK").kind(), 11);

    // A user property twice in a PUBLISH, delivered with both.
    v5.send(&packet::publish_with(
        0x30,
        "edge/c",
        None,
        Some(&users),
        b"users",
    ))
    .await;
    let mut payloads = Vec::new();
    while payloads.len() < 3 {
        let frame = v5.recv().await.expect("PUBLISH or PUBREL");
        match frame.kind() {
            3 => {
                let (received, pkid) = frame.publish(Version::V5);
                if received.payload == b"users" {
                    let rumqttc::v5::mqttbytes::v5::Packet::Publish(p) = frame.v5() else {
                        panic!("not a PUBLISH: {frame:?}");
                    };
                    let properties = p.properties.expect("properties");
                    assert_eq!(
                        properties.user_properties,
                        vec![("k".into(), "1".into()), ("k".into(), "2".into())]
                    );
                }
                match received.qos {
                    1 => v5.send(&packet::puback(pkid)).await,
                    2 => v5.send(&packet::frame(0x50, &pkid.to_be_bytes())).await,
                    _ => {}
                }
                payloads.push(received.payload);
            }
            6 => v5.send(&packet::frame(0x70, &frame.body()[..2])).await,
            _ => panic!("unexpected {frame:?}"),
        }
    }
    payloads.sort();
    assert_eq!(
        payloads,
        vec![b"dup qos 1".to_vec(), b"qos 2".to_vec(), b"users".to_vec()]
    );
    v5.send(&packet::disconnect()).await;
    v3.send(&packet::disconnect()).await;
    assert!(v5.expect_closed().await.is_empty());
    assert!(v3.expect_closed().await.is_empty());
    assert_still_works(&mut witness, "edges").await;
}
