//! What one LAN client must not be able to do to the broker: stop it with a topic, stall
//! everyone by not reading, publish where its ACL (or the `$` rule) forbids, through a
//! publish or through its will.

use std::path::Path;
use std::time::Duration;

use fieldmq::broker::config::BrokerConfig;
use gateway::GatewayProcess;
use mqtt::packet::{self, Connect, Will};
use mqtt::{within, Client, Raw, Version};

use crate::util::{gateway, mqtt};

fn gateway_config(dir: &Path, acl_file: Option<&Path>) -> std::path::PathBuf {
    let acl = acl_file
        .map(|path| format!("acl_file = \"{}\"", path.display()))
        .unwrap_or_default();
    gateway::write_config(dir, &dir.join("data"), &acl)
}

// ---------------------------------------------------------------------------------------
// Topics that start with a multi-byte character
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_publish_to_a_topic_starting_with_a_multi_byte_character_is_served_before_and_after_a_restart(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway_config(dir.path(), None);
    let mut gateway = GatewayProcess::start(&config);

    let mut everything = Client::connect(Version::V5, gateway.addr, "everything").await;
    assert_eq!(everything.subscribe("é/#", 1).await, Some(1));
    let mut publisher = Client::connect(Version::V311, gateway.addr, "publisher").await;
    publisher.publish("é/x", 1, true, b"1").await;
    publisher.publish("température/four/1", 1, true, b"2").await;
    let first = everything.recv().await;
    assert_eq!(
        (first.topic.as_str(), first.payload.as_slice()),
        ("é/x", &b"1"[..])
    );

    // The router is alive: a new client is accepted and gets the retained messages.
    let mut late = Client::connect(Version::V311, gateway.addr, "late").await;
    assert_eq!(late.subscribe("+/x", 1).await, Some(1));
    assert_eq!(late.recv().await.topic, "é/x");

    assert!(gateway.terminate().success(), "a clean stop");
    let gateway = GatewayProcess::start(&config);
    let mut after = Client::connect(Version::V5, gateway.addr, "after-restart").await;
    assert_eq!(after.subscribe("température/+/1", 1).await, Some(1));
    let received = after.recv().await;
    assert_eq!(received.topic, "température/four/1");
    assert!(received.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_rules_on_topics_starting_with_a_multi_byte_character_are_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite température/#\ntopic read é/#\n").expect("acl");
    let config = gateway_config(dir.path(), Some(&acl));
    let gateway = GatewayProcess::start(&config);

    let mut reader = Client::connect(Version::V5, gateway.addr, "reader").await;
    assert_eq!(reader.subscribe("é/#", 1).await, Some(1));
    assert_eq!(reader.subscribe("température/#", 1).await, Some(1));
    let mut writer = Client::connect(Version::V5, gateway.addr, "writer").await;
    writer.publish("é/denied", 1, false, b"no").await;
    writer.publish("température/ok", 1, false, b"yes").await;
    let received = reader.recv().await;
    assert_eq!(
        (received.topic.as_str(), received.payload.as_slice()),
        ("température/ok", &b"yes"[..]),
        "the denied publish to é/denied was dropped, the allowed one delivered"
    );
}

// ---------------------------------------------------------------------------------------
// A subscriber that stops reading
// ---------------------------------------------------------------------------------------

/// A QoS 1 subscriber that never reads nor acknowledges, and a publisher that floods its
/// topic: the router must keep serving everyone else, the stuck client is disconnected
/// after `slow_client_timeout` and counted, and the flood's publisher gets its PUBACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_stalls_no_one_else_and_is_disconnected() {
    const FLOOD: u16 = 3000;
    let broker = mqtt::start(BrokerConfig {
        max_queued_messages: 100,
        slow_client_timeout: Duration::from_secs(2),
        ..mqtt::config()
    })
    .await;

    // Subscribes, then never reads again.
    let mut stuck = Raw::connected(broker.addr, &Connect::v311("stuck")).await;
    stuck
        .send(&packet::subscribe(false, 1, &[("flood/#", 1)]))
        .await;
    assert_eq!(stuck.recv().await.expect("SUBACK").kind(), 9);

    let mut flooder = Raw::connected(broker.addr, &Connect::v311("flooder")).await;
    let flood: Vec<u8> = (1..=FLOOD)
        .flat_map(|pkid| packet::publish(false, b"flood/x", 1, false, pkid, &[0u8; 512]))
        .collect();
    let flooding = tokio::spawn(async move {
        flooder.send(&flood).await;
        // Every publish is acknowledged once the stuck client is gone.
        let mut acked = 0;
        while acked < FLOOD {
            let frame = tokio::time::timeout(Duration::from_secs(20), flooder.recv())
                .await
                .expect("PUBACKs keep coming")
                .expect("the flooder stays connected");
            if frame.kind() == 4 {
                acked += 1;
            }
        }
        acked
    });

    // While the flood is on, another client connects, subscribes, publishes and receives.
    for round in 0..3 {
        let id = format!("bystander-{round}");
        let mut bystander = Client::connect(Version::V311, broker.addr, &id).await;
        assert_eq!(bystander.subscribe("other/#", 1).await, Some(1));
        bystander.publish("other/x", 1, false, b"hello").await;
        assert_eq!(bystander.recv().await.payload, b"hello");
    }

    let acked = within("the flood acknowledged", async {
        tokio::time::timeout(Duration::from_secs(30), flooding)
            .await
            .expect("in time")
            .expect("task")
    })
    .await;
    assert_eq!(acked, FLOOD);
    let stats = broker.handle.stats().await.expect("stats");
    assert_eq!(stats.slow_clients_disconnected, 1, "the stuck client, once");
    stuck.expect_closed().await;
}

/// Waiting for a slow subscriber holds back only the publishers that feed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_waiting_for_a_full_subscriber_does_not_hold_back_another_publisher() {
    let broker = mqtt::start(BrokerConfig {
        max_queued_messages: 10,
        slow_client_timeout: Duration::from_secs(60),
        ..mqtt::config()
    })
    .await;
    let mut stuck = Raw::connected(broker.addr, &Connect::v311("stuck")).await;
    stuck
        .send(&packet::subscribe(false, 1, &[("slow/#", 1)]))
        .await;
    assert_eq!(stuck.recv().await.expect("SUBACK").kind(), 9);

    // Enough to fill the stuck client's window and queue: this publisher then waits.
    let mut held = Raw::connected(broker.addr, &Connect::v311("held")).await;
    let burst: Vec<u8> = (1..=200u16)
        .flat_map(|pkid| packet::publish(false, b"slow/x", 1, false, pkid, b"x"))
        .collect();
    held.send(&burst).await;

    // A different publisher, to a different subscriber, is served at once.
    let mut listener = Client::connect(Version::V5, broker.addr, "listener").await;
    assert_eq!(listener.subscribe("fast/#", 1).await, Some(1));
    let mut fast = Client::connect(Version::V5, broker.addr, "fast").await;
    for n in 0..50 {
        fast.publish(&format!("fast/{n}"), 1, false, b"y").await;
    }
    for n in 0..50 {
        assert_eq!(listener.recv().await.topic, format!("fast/{n}"));
    }
    // And the held publisher is indeed held: far from all its publishes acknowledged.
    let mut acks = 0;
    while let Ok(frame) = tokio::time::timeout(Duration::from_secs(1), held.recv()).await {
        acks += usize::from(frame.is_some_and(|f| f.kind() == 4));
    }
    assert!(
        acks < 200,
        "{acks} of 200 acknowledged while the subscriber is full"
    );
}

// ---------------------------------------------------------------------------------------
// Wills and `$` topics
// ---------------------------------------------------------------------------------------

const SECRET_ACL: &str = "topic readwrite plant/public/#\ntopic deny plant/secret/#\n";

async fn acl_broker(dir: &Path) -> mqtt::TestBroker {
    let acl = dir.join("acl");
    std::fs::write(&acl, SECRET_ACL).expect("acl");
    mqtt::start(BrokerConfig {
        acl_file: Some(acl),
        ..mqtt::config()
    })
    .await
}

#[tokio::test]
async fn a_will_to_a_topic_the_acl_denies_is_refused_at_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = acl_broker(dir.path()).await;
    let will = Will {
        topic: "plant/secret/will",
        payload: b"gone",
        qos: 1,
        retain: true,
    };
    for (connect, code) in [
        (Connect::v311("will-311"), 5u8),
        (Connect::v5("will-5"), 0x87),
    ] {
        let connect = Connect {
            will: Some(will.clone()),
            ..connect
        };
        let (mut raw, connack) = Raw::connect(broker.addr, &connect).await;
        assert_eq!(connack.connack(), (false, code), "{connect:?}");
        raw.expect_closed().await;
    }
    // An allowed will is accepted, and published on an abnormal close.
    let mut watcher = Client::connect(Version::V5, broker.addr, "watcher").await;
    assert_eq!(watcher.subscribe("plant/public/#", 1).await, Some(1));
    let allowed = Connect {
        will: Some(Will {
            topic: "plant/public/will",
            ..will
        }),
        ..Connect::v311("will-ok")
    };
    let raw = Raw::connected(broker.addr, &allowed).await;
    drop(raw);
    assert_eq!(watcher.recv().await.topic, "plant/public/will");
}

#[tokio::test]
async fn a_will_to_a_dollar_topic_is_refused_at_connect() {
    let broker = mqtt::start_default().await;
    for (connect, code) in [
        (Connect::v311("sys-will-311"), 5u8),
        (Connect::v5("sys-will-5"), 0x87),
    ] {
        let connect = Connect {
            will: Some(Will {
                topic: "$SYS/broker/version",
                payload: b"spoofed",
                qos: 0,
                retain: true,
            }),
            ..connect
        };
        let (_raw, connack) = Raw::connect(broker.addr, &connect).await;
        assert_eq!(connack.connack(), (false, code), "{connect:?}");
    }
}

#[tokio::test]
async fn clients_cannot_publish_to_dollar_topics() {
    let broker = mqtt::start_default().await;
    let mut watcher = Client::connect(Version::V5, broker.addr, "watcher").await;
    assert_eq!(watcher.subscribe("$SYS/#", 1).await, Some(1));

    let mut v5 = Raw::connected(broker.addr, &Connect::v5("spoofer-5")).await;
    v5.send(&packet::publish(
        true,
        b"$SYS/broker/version",
        1,
        true,
        7,
        b"evil",
    ))
    .await;
    let puback = v5.recv().await.expect("PUBACK");
    assert_eq!(puback.kind(), 4);
    assert_eq!(puback.body()[2], 0x87, "MQTT 5: not authorised");

    let mut v311 = Raw::connected(broker.addr, &Connect::v311("spoofer-311")).await;
    v311.send(&packet::publish(false, b"$foo/bar", 1, true, 8, b"evil"))
        .await;
    assert_eq!(v311.recv().await.expect("PUBACK").kind(), 4);
    v311.send(&packet::publish(false, b"$SYS/x", 0, false, 0, b"evil"))
        .await;
    // The connection handles packets in order: the QoS 0 publish has been routed.
    v311.until_ping_barrier().await;

    // Nothing reached the subscriber, nothing was retained.
    assert_eq!(watcher.subscribe("sentinel", 0).await, Some(0));
    watcher.publish("sentinel", 0, false, b"end").await;
    let seen = watcher.recv_until("sentinel").await;
    assert!(
        seen.iter().all(|m| m.payload != b"evil"),
        "a client's $ publish was delivered: {seen:?}"
    );
    let stats = broker.handle.stats().await.expect("stats");
    assert_eq!(stats.publishes_denied, 3);
    assert_eq!(stats.retained, 0, "nothing retained");
}
