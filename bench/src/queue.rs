//! An offline persistent subscriber's queue, shared by `durable` and `memory`: register the
//! subscriber (clean session false, `bench/#` at QoS 1) and leave, fill its queue with QoS 1
//! publishes whose payloads start with a sequence number, then reconnect and drain it,
//! counting distinct, duplicate and missing messages.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::client::{await_suback, connect, leading_u64, now_ns, IDLE_TIMEOUT};
use crate::launch::{BinArgs, BrokerSetup};
use crate::stats::{per_sec, Latencies};

/// Client id of the persistent subscriber (clean session false).
const DURABLE_SUB_ID: &str = "bench-durable-sub";
/// Topic every message of `durable` and `memory` goes to (the subscriber has `bench/#`).
const DURABLE_TOPIC: &str = "bench/0";
/// rumqttc in-flight window of the publisher.
pub(crate) const PUB_WINDOW: u16 = 100;

/// A broker setup whose per-session queue holds `n` messages (plus slack) of `payload` bytes.
pub(crate) fn queue_setup(
    bins: &BinArgs,
    n: u64,
    payload: usize,
    inflight: u16,
    durability: &str,
) -> BrokerSetup {
    let mut setup = BrokerSetup::new(bins);
    let max_queued = n + 1000;
    // fieldmq also bounds a session's queue in bytes (topic + payload, default 64 MiB):
    // raise it so that the message count is the only limit. Mosquitto's max_queued_bytes
    // is unlimited by default.
    let bytes = ((max_queued) * (payload as u64 + 64)).max(64 << 20);
    setup.fieldmq_broker = format!(
        "durability = \"{durability}\"\nmax_queued_messages = {max_queued}\n\
         max_queued_bytes = {bytes}\nmax_inflight = {inflight}\n"
    );
    setup.mosquitto =
        format!("max_queued_messages {max_queued}\nmax_inflight_messages {inflight}\n");
    setup
}

fn persistent_options(addr: SocketAddr, payload: usize) -> MqttOptions {
    let mut o = MqttOptions::new(DURABLE_SUB_ID, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(false);
    o.set_max_packet_size(payload + 1024, payload + 1024);
    o.set_inflight(PUB_WINDOW);
    o
}

/// Connect the persistent subscriber, subscribe `bench/#` at QoS 1, and disconnect.
pub(crate) async fn register_offline_subscriber(addr: SocketAddr, payload: usize) -> Result<()> {
    let who = "persistent subscriber";
    let (client, mut eventloop) = AsyncClient::new(persistent_options(addr, payload), 64);
    connect(&mut eventloop, who).await?;
    client.subscribe("bench/#", QoS::AtLeastOnce).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    await_suback(&mut eventloop, who, deadline).await?;
    client.disconnect().await?;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
    drop(eventloop);
    // Let the broker notice that the client is gone before anything is published.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// What the publisher got acknowledged.
pub(crate) struct PublishResult {
    pub(crate) acked: u64,
    /// From the first publish to the last PUBACK.
    pub(crate) elapsed: Duration,
    /// PUBLISH written → its PUBACK read.
    pub(crate) ack_latencies: Latencies,
}

impl PublishResult {
    pub(crate) fn rate(&self) -> f64 {
        per_sec(self.acked, self.elapsed)
    }
}

/// One clean-session publisher sends `n` QoS 1 messages (window 100) to `bench/0`, each
/// payload starting with its sequence number, at `rate` msgs/s (0: at once), and waits for
/// every PUBACK (bounded).
pub(crate) async fn publish_qos1(
    addr: SocketAddr,
    n: u64,
    payload: usize,
    rate: u64,
    publishers: u16,
    timeout: Duration,
) -> Result<PublishResult> {
    let publishers = u64::from(publishers.max(1)).min(n.max(1));
    let go = Arc::new(tokio::sync::Barrier::new(usize::try_from(publishers)?));
    let mut tasks = Vec::new();
    for index in 0..publishers {
        // Publisher `index` takes its share of the sequence numbers, contiguous.
        let seqs = (n * index / publishers)..(n * (index + 1) / publishers);
        let rate = rate as f64 / publishers as f64;
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            publish_share(addr, index, seqs, payload, rate, timeout, go).await
        }));
    }
    let mut total = PublishResult {
        acked: 0,
        elapsed: Duration::ZERO,
        ack_latencies: Latencies::new(),
    };
    for task in tasks {
        let share = task.await.context("a publisher task failed")??;
        total.acked += share.acked;
        // They start together (a barrier after connecting): the slowest one's time is the
        // phase's.
        total.elapsed = total.elapsed.max(share.elapsed);
        total.ack_latencies.merge(&share.ack_latencies);
    }
    Ok(total)
}

/// One publisher's share: the sequence numbers `seqs`, at `rate` messages/s (0: as fast as
/// its window allows), starting when every publisher has connected (`go`).
async fn publish_share(
    addr: SocketAddr,
    index: u64,
    seqs: std::ops::Range<u64>,
    payload: usize,
    rate: f64,
    timeout: Duration,
    go: Arc<tokio::sync::Barrier>,
) -> Result<PublishResult> {
    let who = format!("publisher {index}");
    let n = seqs.end - seqs.start;
    let id = format!("bench-durable-pub-{index}");
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_max_packet_size(payload + 1024, payload + 1024);
    o.set_inflight(PUB_WINDOW);
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    eventloop.network_options.set_tcp_nodelay(true);
    connect(&mut eventloop, &who).await?;
    go.wait().await;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let acked = Arc::new(AtomicU64::new(0));
    let last_ack_ns = Arc::new(AtomicU64::new(0));
    let driver = {
        let acked = acked.clone();
        let last_ack_ns = last_ack_ns.clone();
        tokio::spawn(async move {
            // Send time by packet id: rumqttc reports each PUBLISH as it writes it.
            let mut sent_ns = vec![0u64; usize::from(u16::MAX) + 1];
            let mut latencies = Latencies::new();
            let end = loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        sent_ns[usize::from(pkid)] = now_ns(start);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let now = now_ns(start);
                        latencies
                            .record_us(now.saturating_sub(sent_ns[usize::from(ack.pkid)]) / 1000);
                        acked.fetch_add(1, Ordering::AcqRel);
                        last_ack_ns.store(now, Ordering::Release);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            match end {
                Ok(()) => Ok(latencies),
                Err(e) => Err((e, latencies)),
            }
        })
    };
    let mut buf = vec![0u8; payload];
    let mut progress = Instant::now();
    let paced_start = tokio::time::Instant::now();
    for (k, seq) in seqs.enumerate() {
        if rate > 0.0 {
            let at = paced_start + Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(at.min(deadline)).await;
        }
        buf[..8].copy_from_slice(&seq.to_be_bytes());
        match tokio::time::timeout_at(
            deadline,
            client.publish(DURABLE_TOPIC, QoS::AtLeastOnce, false, buf.clone()),
        )
        .await
        {
            Ok(r) => r.with_context(|| format!("{who}: publish"))?,
            Err(_) => break,
        }
        if progress.elapsed() >= Duration::from_secs(10) {
            progress = Instant::now();
            eprintln!(
                "   … {who}: {} published, {} acked",
                k + 1,
                acked.load(Ordering::Acquire)
            );
        }
    }
    while acked.load(Ordering::Acquire) < n
        && tokio::time::Instant::now() < deadline
        && !driver.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked_n = acked.load(Ordering::Acquire);
    let elapsed = Duration::from_nanos(last_ack_ns.load(Ordering::Acquire));
    let _ = client.try_disconnect();
    let ack_latencies = match tokio::time::timeout(Duration::from_secs(2), driver).await {
        Ok(Ok(Err((e, _)))) if acked_n < n => {
            bail!("{who}: connection lost after {acked_n} PUBACKs: {e}")
        }
        Ok(Ok(Ok(latencies) | Err((_, latencies)))) => latencies,
        _ => Latencies::new(),
    };
    Ok(PublishResult {
        acked: acked_n,
        elapsed,
        ack_latencies,
    })
}

/// What the persistent subscriber got when it came back.
pub(crate) struct DrainResult {
    /// Distinct sequence numbers received.
    pub(crate) received: u64,
    pub(crate) duplicates: u64,
    pub(crate) session_present: bool,
    /// From the start of the reconnect to the last delivery.
    pub(crate) elapsed: Duration,
}

impl DrainResult {
    pub(crate) fn rate(&self) -> f64 {
        per_sec(self.received, self.elapsed)
    }
}

/// Reconnect the persistent subscriber and take its queue: until all `n` have arrived,
/// nothing has arrived for 10 s, or `timeout`.
pub(crate) async fn drain(
    addr: SocketAddr,
    n: u64,
    payload: usize,
    timeout: Duration,
) -> Result<DrainResult> {
    let who = "persistent subscriber (reconnect)";
    let (client, mut eventloop) = AsyncClient::new(persistent_options(addr, payload), 64);
    eventloop.network_options.set_tcp_nodelay(true);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = vec![false; usize::try_from(n).context("--messages too large")?];
    let mut received = 0u64;
    let mut duplicates = 0u64;
    let mut session_present = false;
    let mut last = start;
    let mut idle_since = tokio::time::Instant::now();
    let mut progress = Instant::now();
    while received < n {
        let wait = deadline.min(idle_since + IDLE_TIMEOUT);
        let ev = match tokio::time::timeout_at(wait, eventloop.poll()).await {
            Err(_) => break,
            Ok(ev) => ev.with_context(|| format!("{who}: connection lost"))?,
        };
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    bail!("{who}: connection refused: {:?}", ack.code);
                }
                session_present = ack.session_present;
            }
            Event::Incoming(Packet::Publish(p)) => {
                idle_since = tokio::time::Instant::now();
                last = Instant::now();
                match leading_u64(&p.payload).and_then(|s| usize::try_from(s).ok()) {
                    Some(i) if i < seen.len() && !seen[i] => {
                        seen[i] = true;
                        received += 1;
                    }
                    _ => duplicates += 1,
                }
                if progress.elapsed() >= Duration::from_secs(10) {
                    progress = Instant::now();
                    eprintln!("   … {received} drained");
                }
            }
            _ => {}
        }
    }
    let elapsed = last.duration_since(start);
    // Send the last PUBACKs and the DISCONNECT (bounded).
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(DrainResult {
        received,
        duplicates,
        session_present,
        elapsed,
    })
}
