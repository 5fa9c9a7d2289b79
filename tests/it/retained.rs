//! Retained messages delivered on subscribe: every matching one, once, paged by the
//! subscriber's queue, however many there are. Real broker in-process, real clients
//! (rumqttc, and raw bytes where the test must control reading and acknowledging).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fieldmq::broker::config::{BrokerConfig, Durability};
use fieldmq::broker::InternalSubscribeOptions;
use fieldmq::model::{Message, QoS};
use mqtt::packet::{self, Connect};
use mqtt::{within, Client, Frame, Raw, Received, TestBroker, Version};

use crate::util::mqtt;

/// The queue bound of the subscribers under test: small, so that delivering the retained
/// messages takes many pages.
const MAX_QUEUED: usize = 100;

fn config() -> BrokerConfig {
    BrokerConfig {
        max_queued_messages: MAX_QUEUED,
        ..mqtt::config()
    }
}

/// The topic of retained message `n`: zero-padded, so topic order is number order.
fn bulk_topic(n: usize) -> String {
    format!("bulk/{n:06}")
}

/// Retain `count` messages (`bulk/000000` ...) through the broker's in-process handle, QoS 1,
/// the payload naming the message; returns once the router holds every one.
async fn seed(broker: &TestBroker, count: usize) {
    for n in 0..count {
        let message = Message::internal(
            "seed",
            bulk_topic(n),
            format!("value {n}"),
            QoS::AtLeastOnce,
            true,
        );
        broker.handle.publish(message).await.expect("seed publish");
    }
    let stats = broker.handle.stats().await.expect("stats");
    assert_eq!(stats.retained, count, "every seeded message is retained");
}

fn all_bulk_topics(count: usize) -> BTreeSet<String> {
    (0..count).map(bulk_topic).collect()
}

/// Read from `raw` until `done` is true of what was read, acknowledging each QoS 1
/// PUBLISH as it comes. Returns the PUBLISHes and the other packets, in order.
async fn read_until(
    raw: &mut Raw,
    version: Version,
    mut done: impl FnMut(&[Received], &[Frame]) -> bool,
) -> (Vec<Received>, Vec<Frame>) {
    let mut publishes = Vec::new();
    let mut others = Vec::new();
    while !done(&publishes, &others) {
        let frame = raw.recv().await.expect("the connection stays open");
        if frame.kind() == 3 {
            let (publish, pkid) = frame.publish(version);
            if publish.qos == 1 {
                raw.send(&packet::puback(pkid)).await;
            }
            publishes.push(publish);
        } else {
            others.push(frame);
        }
    }
    (publishes, others)
}

/// Read and acknowledge PUBLISHes until nothing arrives for `quiet`.
async fn read_until_quiet(raw: &mut Raw, version: Version, quiet: Duration) -> Vec<Received> {
    let mut publishes = Vec::new();
    while let Ok(frame) = tokio::time::timeout(quiet, raw.recv()).await {
        let frame = frame.expect("the connection stays open");
        assert_eq!(frame.kind(), 3, "only PUBLISHes expected, got {frame:?}");
        let (publish, pkid) = frame.publish(version);
        if publish.qos == 1 {
            raw.send(&packet::puback(pkid)).await;
        }
        publishes.push(publish);
    }
    publishes
}

/// How often each topic arrived among `publishes` flagged retained.
fn retained_counts(publishes: &[Received]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for publish in publishes.iter().filter(|p| p.retain) {
        *counts.entry(publish.topic.clone()).or_insert(0) += 1;
    }
    counts
}

/// A rumqttc subscriber to `#` at `qos` takes all `count` retained messages: each topic
/// once, flagged retained, at the QoS asked for; a message published live after the SUBACK
/// arrives while they are still coming; nothing more follows them.
async fn assert_everything_arrives_once(broker: &TestBroker, count: usize, qos: u8) {
    let id = format!("everything-qos{qos}");
    let mut subscriber = Client::connect(Version::V311, broker.addr, &id).await;
    assert_eq!(subscriber.subscribe("#", qos).await, Some(qos));
    let mut publisher = Client::connect(Version::V311, broker.addr, &format!("live-{qos}")).await;
    publisher.publish("live/during", 1, false, b"live").await;

    let started = Instant::now();
    let mut topics = BTreeSet::new();
    let mut live_after = None;
    let mut received = 0;
    while received < count {
        let publish = subscriber.recv().await;
        if publish.topic == "live/during" {
            assert!(!publish.retain, "a live message is not flagged retained");
            live_after = Some(received);
            continue;
        }
        assert!(publish.retain, "{} is flagged retained", publish.topic);
        assert_eq!(publish.qos, qos, "{} at the granted QoS", publish.topic);
        assert!(
            topics.insert(publish.topic.clone()),
            "{} arrived twice",
            publish.topic
        );
        received += 1;
    }
    let elapsed = started.elapsed();
    assert_eq!(topics, all_bulk_topics(count));
    let live_after = live_after.expect("the live message arrived among the retained ones");
    assert!(
        live_after < count,
        "the live message waited for all {count} retained ones"
    );

    // Nothing else: the next message is one published now.
    publisher.publish("live/end", 1, false, b"end").await;
    let extra = subscriber.recv_until("live/end").await;
    assert!(
        extra.is_empty(),
        "more than every retained message: {extra:?}"
    );
    eprintln!("QoS {qos}: {count} retained messages delivered in {elapsed:?}");
}

/// The hardening issue: with 100,000 retained topics, `#` delivered 1,000 and dropped the
/// rest. Every one arrives now, paged by a queue bounded at 100, at QoS 0 and at QoS 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_to_everything_gets_each_of_100_000_retained_messages_once_at_qos_0_and_1() {
    const COUNT: usize = 100_000;
    let broker = mqtt::start(config()).await;
    seed(&broker, COUNT).await;
    assert_everything_arrives_once(&broker, COUNT, 0).await;
    assert_everything_arrives_once(&broker, COUNT, 1).await;
    let stats = broker.handle.stats().await.expect("stats");
    assert_eq!(stats.messages_dropped, 0, "nothing dropped on the way");
}

/// A QoS 1 subscriber to `#` that reads nothing after its SUBACK: its queue stays within
/// its bound (retained messages are placed only as it drains), nothing is dropped, other
/// clients are served meanwhile, and once it reads it gets every retained message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_its_retained_messages_holds_a_bounded_queue_and_stalls_no_one(
) {
    const COUNT: usize = 10_000;
    const BYSTANDER_ROUNDS: usize = 20;
    let broker = mqtt::start(BrokerConfig {
        slow_client_timeout: Duration::from_secs(60),
        ..config()
    })
    .await;
    seed(&broker, COUNT).await;

    let mut stuck = Raw::connected(broker.addr, &Connect::v311("stuck")).await;
    stuck.send(&packet::subscribe(false, 1, &[("#", 1)])).await;

    // A bystander publishes and receives while the stuck client holds its retained page.
    // The stuck client gets these too (`#`), so they are few: its queue stays below its
    // bound with them, and the bystander is never made to wait for it.
    let mut bystander = Client::connect(Version::V5, broker.addr, "bystander").await;
    assert_eq!(bystander.subscribe("other/#", 1).await, Some(1));
    let mut most_queued = 0;
    for round in 0..BYSTANDER_ROUNDS {
        let payload = round.to_string();
        bystander
            .publish("other/x", 1, false, payload.as_bytes())
            .await;
        assert_eq!(bystander.recv().await.payload, payload.as_bytes());
        let stats = broker.handle.stats().await.expect("stats");
        most_queued = most_queued.max(stats.messages_queued);
        assert_eq!(stats.messages_dropped, 0, "nothing dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("at most {most_queued} messages queued");
    assert!(
        most_queued <= MAX_QUEUED as u64,
        "{most_queued} messages queued, more than the bound of {MAX_QUEUED}"
    );

    // It also gets the bystander's messages, live (retain 0).
    let (publishes, others) = read_until(&mut stuck, Version::V311, |publishes, _| {
        publishes.iter().filter(|p| p.retain).count() >= COUNT
    })
    .await;
    assert_eq!(others.len(), 1, "the SUBACK, nothing else: {others:?}");
    assert_eq!(others[0].kind(), 9);
    let counts = retained_counts(&publishes);
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        all_bulk_topics(COUNT)
    );
    assert!(counts.values().all(|&n| n == 1), "each once");
    let rest = read_until_quiet(&mut stuck, Version::V311, Duration::from_millis(300)).await;
    assert!(
        rest.iter().all(|p| !p.retain),
        "no retained message after all of them: {rest:?}"
    );
}

/// UNSUBSCRIBE in the middle of the retained delivery stops it: after the UNSUBACK, at most
/// what was already queued or in flight still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_midway_stops_the_retained_delivery() {
    const COUNT: usize = 20_000;
    const BEFORE: usize = 1_000;
    let broker = mqtt::start(config()).await;
    seed(&broker, COUNT).await;

    let mut raw = Raw::connected(broker.addr, &Connect::v311("quitter")).await;
    raw.send(&packet::subscribe(false, 1, &[("#", 1)])).await;
    let (before, _) = read_until(&mut raw, Version::V311, |publishes, _| {
        publishes.len() >= BEFORE
    })
    .await;
    raw.send(&packet::unsubscribe_with(0xA2, 2, None, &["#"]))
        .await;
    let (until_unsuback, _) = read_until(&mut raw, Version::V311, |_, others| {
        others.iter().any(|f| f.kind() == 11)
    })
    .await;
    let after = read_until_quiet(&mut raw, Version::V311, Duration::from_millis(500)).await;

    let late = until_unsuback.len() + after.len();
    let max_inflight = usize::from(mqtt::config().max_inflight);
    assert!(
        late <= MAX_QUEUED + max_inflight,
        "{late} retained messages after UNSUBSCRIBE: more than were queued or in flight"
    );
    let all: Vec<Received> = before
        .into_iter()
        .chain(until_unsuback)
        .chain(after)
        .collect();
    let counts = retained_counts(&all);
    assert_eq!(counts.len(), all.len(), "no topic twice");
    assert!(all.len() < COUNT / 2, "{} of {COUNT} delivered", all.len());
    // The connection is fine: it answers a ping.
    raw.send(&packet::pingreq()).await;
    assert_eq!(raw.recv().await.expect("PINGRESP").kind(), 13);
}

/// What a page reads is the retained set as it is then: a message replaced before its page
/// is sent in its new version, one deleted is not sent, one added after the cursor is. One
/// already placed in the queue is sent as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_replaced_deleted_or_added_between_pages_are_sent_as_they_are_then() {
    const COUNT: usize = 2_000;
    let broker = mqtt::start(config()).await;
    seed(&broker, COUNT).await;

    let mut raw = Raw::connected(broker.addr, &Connect::v311("pager")).await;
    raw.send(&packet::subscribe(false, 1, &[("#", 1)])).await;
    // The first page (half the queue bound) is placed with the SUBACK and the in-flight
    // window goes out. Read and left unacknowledged, nothing more moves: no further page is
    // placed until they are acknowledged.
    let mut unacked = Vec::new();
    let max_inflight = usize::from(mqtt::config().max_inflight);
    while unacked.len() < max_inflight {
        let frame = raw.recv().await.expect("open");
        if frame.kind() == 3 {
            unacked.push(frame.publish(Version::V311));
        }
    }
    assert!(unacked.iter().all(|(p, _)| p.retain));
    assert_eq!(unacked[0].0.topic, bulk_topic(0), "in topic order");

    // Change the retained set behind the cursor and ahead of it.
    let set = |topic: String, payload: &'static str| {
        let handle = broker.handle.clone();
        async move {
            let message = Message::internal("change", topic, payload, QoS::AtLeastOnce, true);
            handle.publish(message).await.expect("publish");
        }
    };
    set(bulk_topic(30), "changed after it was queued").await;
    set(bulk_topic(1500), "").await; // deleted
    set(bulk_topic(1501), "replaced").await;
    set(format!("{}a", bulk_topic(1600)), "added").await;

    for (_, pkid) in &unacked {
        raw.send(&packet::puback(*pkid)).await;
    }
    let rest = read_until_quiet(&mut raw, Version::V311, Duration::from_millis(500)).await;
    let retained: BTreeMap<String, Vec<u8>> = unacked
        .into_iter()
        .map(|(p, _)| p)
        .chain(rest.iter().cloned())
        .filter(|p| p.retain)
        .map(|p| (p.topic, p.payload))
        .collect();
    let live: Vec<(String, Vec<u8>)> = rest
        .iter()
        .filter(|p| !p.retain)
        .map(|p| (p.topic.clone(), p.payload.clone()))
        .collect();

    assert_eq!(
        retained.get(&bulk_topic(30)).map(Vec::as_slice),
        Some(&b"value 30"[..]),
        "placed in the first page before it changed: sent as it was"
    );
    assert!(
        !retained.contains_key(&bulk_topic(1500)),
        "deleted before its page: not sent"
    );
    assert_eq!(
        retained.get(&bulk_topic(1501)).map(Vec::as_slice),
        Some(&b"replaced"[..]),
        "replaced before its page: sent in its new version"
    );
    assert_eq!(
        retained
            .get(&format!("{}a", bulk_topic(1600)))
            .map(Vec::as_slice),
        Some(&b"added"[..]),
        "added ahead of the cursor: sent"
    );
    let expected: BTreeSet<String> = all_bulk_topics(COUNT)
        .into_iter()
        .filter(|t| *t != bulk_topic(1500))
        .chain([format!("{}a", bulk_topic(1600))])
        .collect();
    assert_eq!(retained.keys().cloned().collect::<BTreeSet<_>>(), expected);
    let retained_deliveries = rest.iter().filter(|p| p.retain).count() + max_inflight;
    assert_eq!(retained_deliveries, expected.len(), "each topic once");
    // The changes themselves also reach the `#` subscriber, live (3.1.1: retain 0).
    assert_eq!(live.len(), 4, "the four changes, live: {live:?}");
}

/// A filter whose first level is a wildcard can match anywhere: pages that look at many
/// topics and find none matching still lead to the next page, and the few matches arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_matching_few_of_many_retained_topics_gets_its_matches() {
    const COUNT: usize = 20_000;
    let broker = mqtt::start(config()).await;
    seed(&broker, COUNT).await;
    let zones: BTreeSet<String> = (0..10).map(|n| format!("zone/{n}/temp")).collect();
    for topic in &zones {
        let message = Message::internal("seed", topic.as_str(), "21", QoS::AtLeastOnce, true);
        broker.handle.publish(message).await.expect("publish");
    }

    let mut subscriber = Client::connect(Version::V5, broker.addr, "temperatures").await;
    assert_eq!(subscriber.subscribe("+/+/temp", 1).await, Some(1));
    let mut received = BTreeSet::new();
    while received.len() < zones.len() {
        let publish = subscriber.recv().await;
        assert!(publish.retain);
        assert!(
            received.insert(publish.topic.clone()),
            "{} twice",
            publish.topic
        );
    }
    assert_eq!(received, zones);
}

/// An MQTT 5 subscription identifier is carried by every retained message, in every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_of_retained_messages_carries_the_subscription_identifier() {
    const COUNT: usize = 600;
    let broker = mqtt::start(BrokerConfig {
        max_queued_messages: 10,
        ..mqtt::config()
    })
    .await;
    seed(&broker, COUNT).await;

    let mut raw = Raw::connected(broker.addr, &Connect::v5("identified")).await;
    let id = packet::property_varint(packet::SUBSCRIPTION_IDENTIFIER, 7);
    raw.send(&packet::subscribe_with(
        0x82,
        1,
        Some(&id),
        &[("bulk/#", 1)],
    ))
    .await;
    let mut topics = BTreeSet::new();
    while topics.len() < COUNT {
        let frame = raw.recv().await.expect("open");
        if frame.kind() != 3 {
            continue;
        }
        let (publish, pkid) = frame.publish(Version::V5);
        raw.send(&packet::puback(pkid)).await;
        let rumqttc::v5::mqttbytes::v5::Packet::Publish(decoded) = frame.v5() else {
            panic!("a PUBLISH");
        };
        let ids = decoded
            .properties
            .map(|p| p.subscription_identifiers)
            .unwrap_or_default();
        assert_eq!(ids, vec![7], "{} carries the identifier", publish.topic);
        assert!(
            topics.insert(publish.topic.clone()),
            "{} twice",
            publish.topic
        );
    }
    assert_eq!(topics, all_bulk_topics(COUNT));
}

/// A persistent session that drops its connection in the middle of its retained delivery
/// goes on with the rest when it comes back (without subscribing again): every retained
/// topic arrives, and only messages in flight at the break arrive twice (QoS 1 allows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_that_reconnects_midway_gets_the_rest_of_its_retained_messages() {
    const COUNT: usize = 5_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = mqtt::start(BrokerConfig {
        durability: Durability::Sync,
        store_path: dir.path().join("broker.db"),
        ..config()
    })
    .await;
    seed(&broker, COUNT).await;

    let persistent = Connect {
        clean: false,
        ..Connect::v311("persistent")
    };
    let mut raw = Raw::connected(broker.addr, &persistent).await;
    raw.send(&packet::subscribe(false, 1, &[("#", 1)])).await;
    let (first, _) = read_until(&mut raw, Version::V311, |publishes, _| {
        publishes.len() >= 1_000
    })
    .await;
    raw.send(&packet::disconnect()).await;
    raw.expect_closed().await;

    let (mut raw, connack) = Raw::connect(broker.addr, &persistent).await;
    assert_eq!(connack.connack(), (true, 0), "the session is resumed");
    let rest = read_until_quiet(&mut raw, Version::V311, Duration::from_millis(500)).await;
    let all: Vec<Received> = first.into_iter().chain(rest).collect();
    let counts = retained_counts(&all);
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        all_bulk_topics(COUNT),
        "every retained topic, across the reconnect"
    );
    let twice = all.len() - counts.len();
    let max_inflight = usize::from(mqtt::config().max_inflight);
    assert!(
        twice <= max_inflight,
        "{twice} arrived twice, more than the in-flight window"
    );
}

/// An in-process subscriber that asks for retained messages gets every one, however many
/// more than its channel holds, and the router keeps serving everyone while it has not read
/// them (before, the router waited on the full channel before answering the subscribe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_subscriber_gets_retained_messages_past_its_channel_capacity_without_stalling_the_router(
) {
    const COUNT: usize = 20_000;
    let broker = mqtt::start(config()).await;
    seed(&broker, COUNT).await;

    let mut internal = within(
        "the in-process subscribe",
        broker.handle.subscribe(
            "internal",
            vec![("bulk/#".to_owned(), QoS::AtLeastOnce)],
            InternalSubscribeOptions {
                capacity: 64,
                send_retained: true,
                ..InternalSubscribeOptions::default()
            },
        ),
    )
    .await
    .expect("subscribe");

    // Its channel is full and unread: network clients are served all the same.
    let mut client = Client::connect(Version::V311, broker.addr, "client").await;
    assert_eq!(client.subscribe("other/#", 1).await, Some(1));
    for n in 0..20 {
        let payload = format!("{n}");
        client
            .publish("other/x", 1, false, payload.as_bytes())
            .await;
        assert_eq!(client.recv().await.payload, payload.as_bytes());
    }

    let mut topics = BTreeSet::new();
    while topics.len() < COUNT {
        let message = within("a retained message", internal.recv())
            .await
            .expect("broker running");
        assert!(message.retain);
        assert!(
            topics.insert(message.topic.to_string()),
            "{} twice",
            message.topic
        );
    }
    assert_eq!(topics, all_bulk_topics(COUNT));
    assert!(
        internal.try_recv().is_none(),
        "nothing after the last retained message"
    );
}
