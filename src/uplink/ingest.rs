//! The two bridges to the local broker: `ingest` (out-route messages → outbox, in batches)
//! and `inbound` (cloud messages → local broker through the in-routes).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::config::{InRoute, OutRoute};
use super::link::Inbound;
use super::{route, SharedCounters};
use crate::broker::bus::{AckShare, BrokerHandle, InternalSubscription};
use crate::drivers::payload::template::{PayloadTemplate, RouteVariables};
use crate::model::{Message, MessageProperties, Origin};
use crate::store::{Outbox, OutboxRecord};

/// Messages stored per append (one transaction may hold several appends).
const INGEST_BATCH: usize = 2048;

pub(super) struct IngestContext {
    pub name: String,
    /// The gateway id, for route templates.
    pub gateway: String,
    pub routes: Vec<OutRoute>,
    pub subscription: InternalSubscription,
    pub outbox: Outbox,
    pub direct: mpsc::Sender<OutboxRecord>,
    /// The last seq committed, for the sender to wake up.
    pub appended: watch::Sender<u64>,
    pub counters: Arc<SharedCounters>,
    pub stop: CancellationToken,
    /// Whether a failing route template has been logged at warn.
    pub template_warned: std::sync::atomic::AtomicBool,
    /// A Sparkplug node's latest values, updated with every message stored.
    pub observe: Option<Arc<super::sparkplug::node::Latest>>,
}

pub(super) async fn run_ingest(mut cx: IngestContext) {
    loop {
        let first = tokio::select! {
            biased;
            _ = cx.stop.cancelled() => break,
            message = cx.subscription.recv_with_ack() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < INGEST_BATCH {
            match cx.subscription.try_recv_with_ack() {
                Some(message) => batch.push(message),
                None => break,
            }
        }
        store(&cx, batch).await;
    }
    // Shutdown: store what the broker already handed over, then stop taking.
    let mut rest = Vec::new();
    while let Some(message) = cx.subscription.try_recv_with_ack() {
        rest.push(message);
    }
    if !rest.is_empty() {
        tracing::debug!(uplink = %cx.name, count = rest.len(), "storing the last local messages");
        store(&cx, rest).await;
    }
}

/// A message's payload as the route's template writes it, with the template's content type.
/// A rendering that fails keeps the message as it was (the cloud gets the data in the
/// local shape rather than not at all) and is logged once per route set at warn.
fn reshape(
    cx: &IngestContext,
    template: &PayloadTemplate,
    message: &Message,
) -> (Bytes, Option<Arc<MessageProperties>>) {
    let unit = message.properties.as_ref().and_then(|p| {
        p.user_properties
            .iter()
            .find(|(key, _)| key == "unit")
            .map(|(_, value)| value.as_str())
    });
    let variables = RouteVariables::of(
        &message.topic,
        &message.payload,
        unit,
        &cx.gateway,
        SystemTime::now(),
    );
    match template.render_route(&variables) {
        Ok(text) => {
            let mut properties = message.properties.as_deref().cloned().unwrap_or_default();
            properties.payload_format_indicator = Some(1);
            properties.content_type = Some(template.content_type().to_owned());
            (Bytes::from(text), Some(Arc::new(properties)))
        }
        Err(error) => {
            if !cx.template_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(uplink = %cx.name, topic = %message.topic, %error, "a route's payload template fails on this message; it is sent unchanged (logged once)");
            } else {
                tracing::debug!(uplink = %cx.name, topic = %message.topic, %error, "a route's payload template fails");
            }
            (message.payload.clone(), message.properties.clone())
        }
    }
}

/// Store a batch in the outbox. The publishers' acknowledgement shares that came with it are
/// released once the records are committed; a message that needs no storing (expired,
/// matched only by a `durable = false` route) releases its share at once, and so does one
/// the outbox refuses by its bounds (`drop_new`: counted, not retried). A failed commit
/// drops the shares (those publishers get no acknowledgement and send again) while the
/// records are still retried here.
async fn store(cx: &IngestContext, batch: Vec<(Message, Option<AckShare>)>) {
    let now = Instant::now();
    let mut records = Vec::with_capacity(batch.len());
    let mut shares = Vec::new();
    let wall = std::time::SystemTime::now();
    for (message, share) in batch {
        if let Some(latest) = &cx.observe {
            latest.record(&message.topic, &message.payload, wall);
        }
        let routed = if message.is_expired(now) {
            None
        } else {
            route::remote_topic(&cx.routes, &message.topic)
        };
        let Some((_, route, topic)) = routed else {
            release(share);
            continue;
        };
        let (payload, properties) = match &route.payload {
            Some(template) => reshape(cx, template, &message),
            None => (message.payload, message.properties),
        };
        let record = OutboxRecord {
            topic,
            payload,
            qos: route.qos,
            retain: route.retain && message.retain,
            properties,
        };
        if route.durable {
            records.push(record);
            shares.extend(share);
        } else {
            // Best effort by configuration: nothing to wait for.
            release(share);
            if cx.direct.try_send(record).is_err() {
                cx.counters
                    .dropped_not_durable
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if records.is_empty() {
        return;
    }
    let mut shares = Some(shares);
    // A failed append (disk full, I/O error) is retried: the records are not accepted
    // until committed, and the broker waits meanwhile (backpressure, not loss).
    let mut delay = Duration::from_millis(100);
    loop {
        match cx.outbox.append(records.clone()).await {
            Ok(report) => {
                if let Some(seq) = report.last_seq {
                    cx.appended.send_replace(seq);
                }
                // Committed, or refused by a bound (`drop_new`, counted by the outbox): the
                // publishers are acknowledged either way.
                shares.into_iter().flatten().for_each(AckShare::stored);
                return;
            }
            Err(e) => {
                if let Some(shares) = shares.take() {
                    if !shares.is_empty() {
                        tracing::warn!(uplink = %cx.name, publishers = shares.len(), "outbox commit failed: withholding acknowledgements");
                    }
                    // Dropped unreleased: those publishers are not acknowledged.
                    drop(shares);
                }
                tracing::error!(uplink = %cx.name, error = %e, count = records.len(), ?delay, "cannot store messages in the outbox; retrying");
                tokio::select! {
                    _ = cx.stop.cancelled() => {
                        tracing::error!(uplink = %cx.name, lost = records.len(), "shutting down with messages that could not be stored");
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn release(share: Option<AckShare>) {
    if let Some(share) = share {
        share.stored();
    }
}

pub(super) async fn run_inbound(
    name: String,
    internal: String,
    routes: Vec<InRoute>,
    mut inbound: mpsc::Receiver<Inbound>,
    broker: BrokerHandle,
) {
    let origin = Origin::Internal(Arc::from(internal.as_str()));
    while let Some(message) = inbound.recv().await {
        let Some((route, local)) = route::local_topic(&routes, &message.topic) else {
            tracing::debug!(uplink = %name, topic = %message.topic, "cloud message matches no in-route");
            continue;
        };
        let qos = message.qos.min(route.qos);
        let local_message = Message {
            topic: Arc::from(local.as_str()),
            payload: message.payload,
            qos,
            retain: message.retain,
            properties: message.properties.map(Arc::new),
            origin: origin.clone(),
            received: Instant::now(),
        };
        if let Err(e) = broker.publish(local_message).await {
            tracing::warn!(uplink = %name, topic = %local, error = %e, "cannot publish a cloud message locally");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::bus::{BusError, InternalSubscribeOptions};
    use crate::broker::config::{BrokerConfig, Durability, ListenerConfig};
    use crate::broker::{self, RunningBroker};
    use crate::model::QoS;
    use crate::uplink::config::{QueueConfig, WhenFull};
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NAME: &str = "uplink:cloud";

    struct Setup {
        broker: RunningBroker,
        outbox: Outbox,
        stop: CancellationToken,
        _dir: tempfile::TempDir,
    }

    fn bounds(max_messages: u64) -> QueueConfig {
        QueueConfig {
            max_messages,
            max_bytes: 1024 * 1024,
            max_age: Duration::from_secs(3600),
            when_full: WhenFull::DropNew,
        }
    }

    /// A broker with `sync` durability and an ingest task storing `plant/#` in an outbox.
    async fn start(outbox_fails: bool, bounds: QueueConfig) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = BrokerConfig {
            listeners: vec![ListenerConfig::tcp("127.0.0.1:0".parse().expect("address"))],
            allow_anonymous: true,
            durability: Durability::Sync,
            store_path: dir.path().join("broker.db"),
            ..BrokerConfig::default()
        };
        let stop = CancellationToken::new();
        let broker = broker::start(&config, stop.clone())
            .await
            .expect("start the broker");
        let subscription = broker
            .handle
            .subscribe(
                NAME,
                vec![("plant/#".into(), QoS::AtLeastOnce)],
                InternalSubscribeOptions {
                    commit: true,
                    ..InternalSubscribeOptions::default()
                },
            )
            .await
            .expect("subscribe");
        let outbox = Outbox::open(&dir.path().join("outbox.db"), bounds)
            .await
            .expect("open the outbox");
        let ingest_outbox = outbox.clone();
        if outbox_fails {
            // Every append after this fails.
            outbox.clone().close().await.expect("close the outbox");
        }
        let (direct, _direct_rx) = mpsc::channel(16);
        tokio::spawn(run_ingest(IngestContext {
            name: "cloud".into(),
            gateway: "gw".into(),
            routes: vec![OutRoute {
                filter: "plant/#".into(),
                remote_prefix: Some("site/".into()),
                remote_template: None,
                qos: QoS::AtLeastOnce,
                retain: false,
                durable: true,
                payload: None,
            }],
            subscription,
            outbox: ingest_outbox,
            direct,
            appended: watch::channel(0).0,
            counters: Arc::default(),
            stop: stop.clone(),
            template_warned: Default::default(),
            observe: None,
        }));
        Setup {
            broker,
            outbox,
            stop,
            _dir: dir,
        }
    }

    fn message(qos: QoS) -> Message {
        Message::internal("plc", "plant/line1", Bytes::from_static(b"42"), qos, false)
    }

    /// Publishes a QoS 1 message and waits for its answer, which must come within 5 s.
    async fn publish_qos_1_answered(setup: &Setup) -> Result<bool, BusError> {
        tokio::time::timeout(
            Duration::from_secs(5),
            setup
                .broker
                .handle
                .publish_and_wait(message(QoS::AtLeastOnce)),
        )
        .await
        .expect("answered, not hung")
    }

    #[tokio::test]
    async fn a_qos_1_publish_is_answered_only_once_the_outbox_holds_it() {
        let setup = start(false, bounds(1000)).await;
        let matched = setup
            .broker
            .handle
            .publish_and_wait(message(QoS::AtLeastOnce))
            .await
            .expect("acknowledged");
        assert!(matched);
        let rows = setup.outbox.read_after(0, 10).await.expect("read");
        assert_eq!(rows.len(), 1, "the row is committed before the answer");
        setup.stop.cancel();
    }

    #[tokio::test]
    async fn a_failed_outbox_commit_withholds_the_acknowledgement() {
        let setup = start(true, bounds(1000)).await;
        let answer = publish_qos_1_answered(&setup).await;
        assert!(
            matches!(answer, Err(BusError::NotStored)),
            "not acknowledged: {answer:?}"
        );
        setup.stop.cancel();
    }

    #[tokio::test]
    async fn a_message_the_full_outbox_refuses_is_still_acknowledged() {
        let setup = start(false, bounds(1)).await;
        for _ in 0..2 {
            publish_qos_1_answered(&setup).await.expect("acknowledged");
        }
        let stats = setup.outbox.stats().await.expect("stats");
        assert_eq!(
            stats.dropped.new, 1,
            "the refused message is counted: {stats:?}"
        );
        setup.stop.cancel();
    }

    /// MQTT 3.1.1 CONNECT (clean session) then PUBLISH QoS 1 `plant/line1` with packet id 1.
    fn connect_and_publish() -> Vec<u8> {
        let mut out = vec![0x10, 16, 0, 4];
        out.extend_from_slice(b"MQTT");
        out.extend_from_slice(&[4, 0x02, 0, 60, 0, 4]);
        out.extend_from_slice(b"dev1");
        out.extend_from_slice(&[0x32, 17, 0, 11]);
        out.extend_from_slice(b"plant/line1");
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(b"42");
        out
    }

    #[tokio::test]
    async fn a_client_whose_message_the_outbox_cannot_commit_gets_no_puback_and_is_disconnected() {
        let setup = start(true, bounds(1000)).await;
        let mut client = tokio::net::TcpStream::connect(setup.broker.local_addrs[0])
            .await
            .expect("connect");
        client
            .write_all(&connect_and_publish())
            .await
            .expect("send");
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut received))
            .await
            .expect("the broker closes the connection")
            .expect("read");
        assert_eq!(received, [0x20, 2, 0, 0], "CONNACK and no PUBACK");
        setup.stop.cancel();
    }
}
