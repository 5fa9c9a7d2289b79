//! `$SYS/broker/...`: broker statistics published as retained messages every
//! `sys_interval`, under Mosquitto's topic names so existing dashboards work.
//!
//! The version is published once; the uptime every interval; the counters only when they
//! changed since the last interval (as Mosquitto does), so an idle broker publishes one
//! message per interval.

use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{BrokerHandle, BrokerStats};
use crate::model::{Message, QoS};

/// The origin name of `$SYS` messages.
const ORIGIN: &str = "$SYS";

/// The topics, in publish order, with their values from the stats and the store size.
fn values(stats: &BrokerStats, store_bytes: u64) -> [(&'static str, u64); 11] {
    [
        (
            "$SYS/broker/clients/connected",
            stats.clients_connected as u64,
        ),
        ("$SYS/broker/messages/received", stats.messages_received),
        ("$SYS/broker/messages/sent", stats.messages_sent),
        ("$SYS/broker/bytes/received", stats.bytes_received),
        ("$SYS/broker/bytes/sent", stats.bytes_sent),
        ("$SYS/broker/retained messages/count", stats.retained as u64),
        (
            "$SYS/broker/subscriptions/count",
            stats.subscriptions as u64,
        ),
        ("$SYS/broker/store/bytes", store_bytes),
        ("$SYS/broker/messages/dropped", stats.messages_dropped),
        (
            "$SYS/broker/publish/messages/denied",
            stats.publishes_denied,
        ),
        (
            "$SYS/broker/clients/slow/disconnected",
            stats.slow_clients_disconnected,
        ),
    ]
}

/// Publish `$SYS` until `shutdown` (or until the broker stops). `started` is when the
/// broker started (for the uptime).
pub(crate) async fn run(
    handle: BrokerHandle,
    interval: Duration,
    started: Instant,
    shutdown: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    let version = format!("fieldmq version {}", env!("CARGO_PKG_VERSION"));
    if publish(&handle, "$SYS/broker/version", version)
        .await
        .is_err()
    {
        return;
    }
    let mut last: Option<[(&'static str, u64); 11]> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Ok(stats) = handle.stats().await else {
            return;
        };
        let uptime = format!("{} seconds", started.elapsed().as_secs());
        if publish(&handle, "$SYS/broker/uptime", uptime)
            .await
            .is_err()
        {
            return;
        }
        let now = values(&stats, stats.store_bytes);
        for (index, (topic, value)) in now.iter().enumerate() {
            let changed = last.as_ref().is_none_or(|last| last[index].1 != *value);
            if changed && publish(&handle, topic, value.to_string()).await.is_err() {
                return;
            }
        }
        last = Some(now);
    }
}

async fn publish(handle: &BrokerHandle, topic: &str, payload: String) -> Result<(), ()> {
    let message = Message::internal(ORIGIN, topic, payload, QoS::AtMostOnce, true);
    handle.publish(message).await.map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::config::BrokerConfig;
    use crate::broker::InternalSubscribeOptions;

    #[tokio::test(start_paused = true)]
    async fn statistics_are_published_retained_under_sys() {
        let shutdown = CancellationToken::new();
        let broker = crate::broker::start(&BrokerConfig::default(), shutdown.clone())
            .await
            .expect("broker starts");
        let started = Instant::now();
        let sys = tokio::spawn(run(
            broker.handle.clone(),
            Duration::from_secs(10),
            started,
            shutdown.clone(),
        ));
        let mut sub = broker
            .handle
            .subscribe(
                "test",
                vec![("$SYS/#".to_owned(), QoS::AtMostOnce)],
                InternalSubscribeOptions {
                    send_retained: true,
                    ..InternalSubscribeOptions::default()
                },
            )
            .await
            .expect("subscribe");
        let mut seen = std::collections::HashMap::new();
        while seen.len() < 11 {
            let message = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                .await
                .expect("a $SYS message in time")
                .expect("broker running");
            assert!(message.retain, "{} is retained", message.topic);
            let payload = String::from_utf8(message.payload.to_vec()).expect("UTF-8");
            seen.insert(message.topic.to_string(), payload);
        }
        assert!(seen["$SYS/broker/version"].starts_with("fieldmq version "));
        assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"));
        // Durability::Memory: no database.
        assert_eq!(seen["$SYS/broker/store/bytes"], "0");
        assert_eq!(seen["$SYS/broker/clients/connected"], "0");
        assert!(seen.contains_key("$SYS/broker/retained messages/count"));
        assert!(seen.contains_key("$SYS/broker/subscriptions/count"));

        // A later interval publishes the uptime again.
        let first_uptime = seen["$SYS/broker/uptime"].clone();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                .await
                .expect("a later $SYS message in time")
                .expect("broker running");
            let payload = String::from_utf8(message.payload.to_vec()).expect("UTF-8");
            if &*message.topic == "$SYS/broker/uptime" && payload != first_uptime {
                break;
            }
        }

        shutdown.cancel();
        sys.await.expect("sys task ends on shutdown");
        broker.wait().await;
    }
}
