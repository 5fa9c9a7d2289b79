//! The two bridges to the local broker: `ingest` (out-route messages → outbox, in batches)
//! and `inbound` (cloud messages → local broker through the in-routes).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::link::Inbound;
use super::{route, SharedCounters};
use crate::broker::{BrokerHandle, InternalSubscription};
use crate::config::{InRoute, OutRoute};
use crate::model::{Message, Origin};
use crate::store::{Outbox, OutboxRecord};

/// Messages stored per append (one transaction may hold several appends).
const INGEST_BATCH: usize = 2048;

pub(super) struct IngestContext {
    pub name: String,
    pub routes: Vec<OutRoute>,
    pub subscription: InternalSubscription,
    pub outbox: Outbox,
    pub direct: mpsc::Sender<OutboxRecord>,
    /// The last seq committed, for the sender to wake up.
    pub appended: watch::Sender<u64>,
    pub counters: Arc<SharedCounters>,
    pub stop: CancellationToken,
}

pub(super) async fn run_ingest(mut cx: IngestContext) {
    loop {
        let first = tokio::select! {
            biased;
            _ = cx.stop.cancelled() => break,
            message = cx.subscription.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < INGEST_BATCH {
            match cx.subscription.try_recv() {
                Some(message) => batch.push(message),
                None => break,
            }
        }
        store(&cx, batch).await;
    }
    // Shutdown: store what the broker already handed over, then stop taking.
    let mut rest = Vec::new();
    while let Some(message) = cx.subscription.try_recv() {
        rest.push(message);
    }
    if !rest.is_empty() {
        tracing::debug!(uplink = %cx.name, count = rest.len(), "storing the last local messages");
        store(&cx, rest).await;
    }
}

async fn store(cx: &IngestContext, batch: Vec<Message>) {
    let now = Instant::now();
    let mut records = Vec::with_capacity(batch.len());
    for message in batch {
        if message.is_expired(now) {
            continue;
        }
        let Some((_, route, topic)) = route::remote_topic(&cx.routes, &message.topic) else {
            continue;
        };
        let record = OutboxRecord {
            topic,
            payload: message.payload,
            qos: route.qos,
            retain: route.retain && message.retain,
            properties: message.properties,
        };
        if route.durable {
            records.push(record);
        } else if cx.direct.try_send(record).is_err() {
            cx.counters
                .dropped_not_durable
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    if records.is_empty() {
        return;
    }
    // A failed append (disk full, I/O error) is retried: the records are not accepted
    // until committed, and the broker waits meanwhile (backpressure, not loss).
    let mut delay = Duration::from_millis(100);
    loop {
        match cx.outbox.append(records.clone()).await {
            Ok(report) => {
                if let Some(seq) = report.last_seq {
                    cx.appended.send_replace(seq);
                }
                return;
            }
            Err(e) => {
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
