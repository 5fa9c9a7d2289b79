//! `fieldmq-bench retained`: how long a new `#` subscriber takes to receive every one of N
//! retained messages, and what the broker's memory does meanwhile.
//!
//! Each target broker is started with its defaults (fieldmq: `durability = "sync"`,
//! `max_queued_messages = 1000`; Mosquitto: `persistence false`). One publisher retains N
//! messages on distinct topics (`retained/000000` ...; QoS 1, window 100, 64-byte payloads)
//! and waits for every PUBACK. Then, per QoS, a new clean-session subscriber subscribes to
//! `#` and counts the retained messages it receives; the time runs from the SUBSCRIBE to
//! the last of them (a broker that sends nothing for 10 s has sent all it will). The
//! broker's `VmRSS` is sampled every 10 ms from just before the SUBSCRIBE to the end of the
//! delivery; the row shows it before and at its highest.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::client::{await_suback, connect, QosArg, IDLE_TIMEOUT};
use crate::launch::{start_broker_in, tail, BinArgs, BrokerSetup, Target, TargetArg, WorkDir};
use crate::proc::{fmt_mib, rss_kib};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RetainedArgs {
    /// Which broker(s) to start and measure.
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    target: TargetArg,
    /// Retained messages, on as many topics.
    #[arg(long, default_value_t = 100_000)]
    retained: u64,
    /// QoS of the `#` subscription.
    #[arg(long, value_enum, default_value_t = QosArg::Both)]
    qos: QosArg,
    /// Longest time the seeding, and each delivery, may take, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    #[command(flatten)]
    bins: BinArgs,
}

/// Payload of every retained message.
const PAYLOAD: usize = 64;
/// The seeding publisher's in-flight window.
const SEED_WINDOW: u16 = 100;
/// How often the broker's RSS is read during a delivery.
const RSS_EVERY: Duration = Duration::from_millis(10);

/// One delivery measured.
struct Row {
    target: Target,
    qos: QoS,
    retained: u64,
    received: u64,
    duplicates: u64,
    elapsed: Duration,
    rss_before: u64,
    rss_max: u64,
}

pub(crate) async fn run(args: &RetainedArgs) -> Result<()> {
    if args.retained == 0 {
        bail!("--retained must be at least 1");
    }
    let work = WorkDir::new(args.bins.keep_dir.clone())?;
    let timeout = Duration::from_secs(args.timeout);
    let targets = Target::both(args.target, Target::Mosquitto);
    let qos_list = args.qos.levels();
    let mut rows = Vec::new();
    for target in targets {
        eprintln!("== retained {}: {} messages", target.name(), args.retained);
        let setup = BrokerSetup::new(&args.bins);
        let dir = work.path().join(format!("retained-{}", target.name()));
        let Some(broker) = start_broker_in(&dir, target, &setup)? else {
            continue;
        };
        let pid = broker.pid().context("broker not running")?;
        let result: Result<()> = async {
            let started = Instant::now();
            seed(broker.addr, args.retained, timeout).await?;
            eprintln!("   seeded in {:.1} s", started.elapsed().as_secs_f64());
            for &qos in &qos_list {
                let row = deliver(target, broker.addr, pid, qos, args.retained, timeout).await?;
                eprintln!(
                    "   QoS {}: {} of {} in {:.2} s, RSS {} → max {}",
                    row.qos as u8,
                    row.received,
                    row.retained,
                    row.elapsed.as_secs_f64(),
                    fmt_mib(row.rss_before),
                    fmt_mib(row.rss_max)
                );
                rows.push(row);
            }
            Ok(())
        }
        .await;
        let log = broker.log_path.clone();
        broker.stop();
        if let Err(e) = result {
            eprintln!("   failed: {e:#}\n{}", tail(&log, 10));
        }
    }
    print!("{}", render(&rows));
    Ok(())
}

fn options(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(SEED_WINDOW);
    options
}

/// Retain `n` messages on distinct topics (QoS 1) and wait for every PUBACK.
async fn seed(addr: SocketAddr, n: u64, timeout: Duration) -> Result<()> {
    let who = "seeding publisher";
    let (client, mut eventloop) = AsyncClient::new(options("bench-seed", addr), 1024);
    connect(&mut eventloop, who).await?;
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            let topic = format!("retained/{i:06}");
            client
                .publish(topic, QoS::AtLeastOnce, true, vec![b'x'; PAYLOAD])
                .await?;
        }
        anyhow::Ok(client)
    });
    let deadline = tokio::time::Instant::now() + timeout;
    let mut acked = 0;
    while acked < n {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .with_context(|| format!("{who}: {acked} of {n} acknowledged in time"))??;
        if let Event::Incoming(Packet::PubAck(_)) = event {
            acked += 1;
        }
    }
    let client = publisher.await.context("publisher task")??;
    let _ = client.disconnect().await;
    Ok(())
}

/// A new subscriber to `#` at `qos`: the time until it holds all `n` retained messages,
/// and the broker's RSS meanwhile.
async fn deliver(
    target: Target,
    addr: SocketAddr,
    pid: u32,
    qos: QoS,
    n: u64,
    timeout: Duration,
) -> Result<Row> {
    let who = "subscriber";
    let id = format!("bench-retained-{}", qos as u8);
    let (client, mut eventloop) = AsyncClient::new(options(&id, addr), 64);
    connect(&mut eventloop, who).await?;
    let (rss_before, _) = rss_kib(pid)?;
    let rss_max = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (rss_max, sampling) = (rss_max.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Ok((rss, _)) = rss_kib(pid) {
                    rss_max.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(RSS_EVERY).await;
            }
        })
    };
    let started = Instant::now();
    client.subscribe("#", qos).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    await_suback(&mut eventloop, who, deadline).await?;
    let mut topics = HashSet::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut duplicates = 0;
    let mut elapsed = started.elapsed();
    while (topics.len() as u64) < n {
        // A broker that stops sending (one that dropped the rest) ends the row.
        let wait = deadline.min(tokio::time::Instant::now() + IDLE_TIMEOUT);
        let event = match tokio::time::timeout_at(wait, eventloop.poll()).await {
            Ok(event) => event.with_context(|| format!("{who}: connection failed"))?,
            Err(_) => break,
        };
        if let Event::Incoming(Packet::Publish(publish)) = event {
            if publish.retain && !topics.insert(publish.topic) {
                duplicates += 1;
            }
            elapsed = started.elapsed();
        }
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let _ = client.disconnect().await;
    Ok(Row {
        target,
        qos,
        retained: n,
        received: topics.len() as u64,
        duplicates,
        elapsed,
        rss_before,
        rss_max: rss_max.load(Ordering::Relaxed),
    })
}

fn render(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| target | QoS | retained | received (duplicates) | time | msgs/s | RSS before | RSS max during |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} ({}) | {:.2} s | {:.0} | {} | {} |",
            r.target.name(),
            r.qos as u8,
            r.retained,
            r.received,
            r.duplicates,
            r.elapsed.as_secs_f64(),
            r.received as f64 / r.elapsed.as_secs_f64().max(1e-9),
            fmt_mib(r.rss_before),
            fmt_mib(r.rss_max),
        );
    }
    out
}
