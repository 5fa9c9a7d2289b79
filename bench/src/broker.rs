//! `fieldmq-bench broker`: publish/subscribe throughput and latency of fieldmq's broker
//! and Mosquitto, back to back.
//!
//! Each target broker is started on a free 127.0.0.1 port, loaded with the same traffic by
//! rumqttc clients in this process, and stopped again. N publishers each send M/N messages
//! to `bench/<i>`; with as many subscribers as publishers (N > 1) subscriber i takes
//! `bench/<i>`, otherwise every subscriber takes `bench/#`. Every payload starts with its
//! send time, so each delivery gives a latency. Everything is bounded: the run of one row
//! stops at `--timeout` and reports what is missing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::Barrier;

use crate::client::{await_suback, connect, leading_u64, now_ns, QosArg, IDLE_TIMEOUT};
use crate::launch::{tail, BinArgs, BrokerProcess, BrokerSetup, Target, TargetArg, WorkDir};
use crate::proc::print_load;
use crate::stats::{fmt_us, Latencies};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BrokerArgs {
    /// Which broker(s) to start and load.
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    target: TargetArg,
    /// Messages published per row, in total over all publishers.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    #[arg(long, default_value_t = 1)]
    publishers: u32,
    #[arg(long, default_value_t = 1)]
    subscribers: u32,
    /// QoS of publishes and subscriptions.
    #[arg(long, value_enum, default_value_t = QosArg::Both)]
    qos: QosArg,
    /// Payload size in bytes (at least 16: send time and sequence number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Total publish rate in messages/s, spread over the publishers; 0 = as fast as possible.
    /// A rate below saturation gives a latency that is not just queueing.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Longest time one row may take, seconds; then what has not arrived counts as missing.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Runs per row (same broker); the table shows the run with the median msgs/s.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Also run Mosquitto with `persistence true` (temp persistence_location) as its own row.
    #[arg(long)]
    mosquitto_persistence: bool,
    #[command(flatten)]
    bins: BinArgs,
}

/// Header in front of every payload: send time (ns since the bench's epoch) and sequence.
const HEADER: usize = 16;

pub(crate) async fn run(args: BrokerArgs) -> Result<()> {
    if args.payload < HEADER {
        bail!("--payload must be at least {HEADER} bytes");
    }
    if args.publishers == 0 || args.subscribers == 0 {
        bail!("--publishers and --subscribers must be at least 1");
    }
    if args.messages < u64::from(args.publishers) {
        bail!("--messages must be at least --publishers");
    }
    let mut targets = Target::both(args.target, Target::Mosquitto);
    if args.mosquitto_persistence && targets.contains(&Target::Mosquitto) {
        targets.push(Target::MosquittoPersist);
    }
    let qoss = args.qos.levels();

    let work = WorkDir::new(args.bins.keep_dir.clone())?;
    let setup = BrokerSetup::new(&args.bins);
    let mut rows = Vec::new();
    for &qos in &qoss {
        for &target in &targets {
            let dir = work.subdir(&format!("{}-qos{}", target.name(), qos as u8))?;
            eprintln!(
                "== {} qos {} {}x{} {} messages",
                target.name(),
                qos as u8,
                args.publishers,
                args.subscribers,
                args.messages
            );
            let broker = match BrokerProcess::start(target, &setup, &dir) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("   cannot start: {e:#}");
                    rows.push((target, qos, LoadResult::failed(&args)));
                    continue;
                }
            };
            // Repeat on the same broker; keep the run with the median throughput.
            let mut runs = Vec::new();
            let mut res = Ok(());
            for _ in 0..args.repeat.max(1) {
                match run_load(broker.addr, qos, &args).await {
                    Ok(row) => {
                        eprintln!(
                            "   {:.0} msgs/s, {} missing",
                            row.rate(),
                            row.expected.saturating_sub(row.received)
                        );
                        runs.push(row);
                    }
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
            }
            let log = broker.log_path.clone();
            broker.stop();
            match res {
                Ok(()) => {
                    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
                    let mid = runs.len() / 2;
                    if let Some(row) = runs.into_iter().nth(mid) {
                        rows.push((target, qos, row));
                    }
                }
                Err(e) => {
                    eprintln!(
                        "   failed: {e:#} (broker log: {})",
                        if work.keep {
                            log.display().to_string()
                        } else {
                            tail(&log, 10)
                        }
                    );
                    rows.push((target, qos, LoadResult::failed(&args)));
                }
            }
        }
    }
    print!("{}", render(&rows, &args));
    print_load();
    Ok(())
}

/// What one row measured.
struct LoadResult {
    published: u64,
    expected: u64,
    received: u64,
    /// From the first publish to the last delivery (or the end of the row).
    elapsed: Duration,
    latencies: Latencies,
    failed: bool,
}

impl LoadResult {
    fn failed(args: &BrokerArgs) -> LoadResult {
        LoadResult {
            published: 0,
            expected: args.messages * expected_fanout(args),
            received: 0,
            elapsed: Duration::ZERO,
            latencies: Latencies::new(),
            failed: true,
        }
    }

    /// Deliveries per second.
    fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.received as f64 / secs
        } else {
            0.0
        }
    }

    fn percentile(&self, p: f64) -> Option<u64> {
        self.latencies.percentile(p)
    }
}

/// How many subscribers get each message.
fn expected_fanout(args: &BrokerArgs) -> u64 {
    if paired(args) {
        1
    } else {
        u64::from(args.subscribers)
    }
}

/// N publishers → N subscribers, subscriber i on `bench/<i>`.
fn paired(args: &BrokerArgs) -> bool {
    args.publishers > 1 && args.publishers == args.subscribers
}

fn options(id: String, addr: SocketAddr, args: &BrokerArgs) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(args.payload + 1024, args.payload + 1024);
    o.set_inflight(100);
    o
}

fn new_client(id: String, addr: SocketAddr, args: &BrokerArgs) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options(id, addr, args), 1024);
    eventloop.network_options.set_tcp_nodelay(true);
    (client, eventloop)
}

async fn run_load(addr: SocketAddr, qos: QoS, args: &BrokerArgs) -> Result<LoadResult> {
    let epoch = Instant::now();
    let row_deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let per_pub = args.messages / u64::from(args.publishers);
    let published_total = per_pub * u64::from(args.publishers);
    let fanout = expected_fanout(args);
    let per_sub = if paired(args) {
        per_pub
    } else {
        published_total
    };
    let last_rx = Arc::new(AtomicU64::new(0));
    let published_count = Arc::new(AtomicU64::new(0));

    // Subscribers first; each reports ready once its SUBACK is in.
    let ready = Arc::new(Barrier::new(args.subscribers as usize + 1));
    let mut subs = Vec::new();
    for i in 0..args.subscribers {
        let (client, mut eventloop) = new_client(format!("bench-sub-{i}"), addr, args);
        let filter = if paired(args) {
            format!("bench/{i}")
        } else {
            "bench/#".to_string()
        };
        let ready = ready.clone();
        let last_rx = last_rx.clone();
        let published_count = published_count.clone();
        subs.push(tokio::spawn(async move {
            let who = format!("subscriber {i}");
            let mut lat = Latencies::new();
            let setup = async {
                connect(&mut eventloop, &who).await?;
                client.subscribe(filter, qos).await?;
                await_suback(&mut eventloop, &who, row_deadline).await
            };
            let setup_res = setup.await;
            ready.wait().await;
            setup_res?;
            let mut idle_since = tokio::time::Instant::now();
            while lat.len() < per_sub {
                // End when the row's time is up, or when publishing has finished and
                // nothing has arrived for IDLE_TIMEOUT (the rest is lost, not late).
                let idle_deadline = idle_since + IDLE_TIMEOUT;
                let pubs_done = published_count.load(Ordering::Acquire) >= published_total;
                let deadline = if pubs_done {
                    row_deadline.min(idle_deadline)
                } else {
                    // Wake up now and then to notice that publishing has finished.
                    row_deadline.min(tokio::time::Instant::now() + Duration::from_millis(500))
                };
                let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                    Ok(ev) => ev.with_context(|| format!("{who}: connection lost"))?,
                    Err(_) if tokio::time::Instant::now() >= row_deadline => break,
                    Err(_) if pubs_done => break,
                    Err(_) => continue,
                };
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    let now = now_ns(epoch);
                    idle_since = tokio::time::Instant::now();
                    if let Some(sent) = leading_u64(&p.payload) {
                        lat.record_us(now.saturating_sub(sent) / 1000);
                    }
                    last_rx.fetch_max(now, Ordering::AcqRel);
                }
            }
            let _ = client.try_disconnect();
            // Flush the DISCONNECT (bounded).
            let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
            anyhow::Ok(lat)
        }));
    }
    ready.wait().await;

    // Publishers: all connect, then start together.
    let go = Arc::new(Barrier::new(args.publishers as usize + 1));
    let mut pubs = Vec::new();
    for i in 0..args.publishers {
        let (client, mut eventloop) = new_client(format!("bench-pub-{i}"), addr, args);
        let go = go.clone();
        let published_count = published_count.clone();
        let topic = format!("bench/{i}");
        let payload_len = args.payload;
        let rate_per_pub = args.rate as f64 / f64::from(args.publishers);
        pubs.push(tokio::spawn(async move {
            let who = format!("publisher {i}");
            let conn = connect(&mut eventloop, &who).await;
            go.wait().await;
            conn?;
            // Drive the event loop in its own task; count PUBACKs for QoS 1.
            let acked = Arc::new(AtomicU64::new(0));
            let acked2 = acked.clone();
            let driver = tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked2.fetch_add(1, Ordering::AcqRel);
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break Ok(()),
                        Ok(_) => {}
                        Err(e) => break Err(e),
                    }
                }
            });
            let start = tokio::time::Instant::now();
            let mut buf = vec![0u8; payload_len];
            for seq in 0..per_pub {
                if rate_per_pub > 0.0 {
                    let at = start + Duration::from_secs_f64(seq as f64 / rate_per_pub);
                    if tokio::time::Instant::now() < at {
                        tokio::time::sleep_until(at).await;
                    }
                }
                if tokio::time::Instant::now() >= row_deadline {
                    break;
                }
                buf[..8].copy_from_slice(&now_ns(epoch).to_be_bytes());
                buf[8..16].copy_from_slice(&seq.to_be_bytes());
                client
                    .publish(topic.clone(), qos, false, buf.clone())
                    .await
                    .with_context(|| format!("{who}: publish"))?;
                published_count.fetch_add(1, Ordering::AcqRel);
            }
            if qos == QoS::AtLeastOnce {
                while acked.load(Ordering::Acquire) < per_pub
                    && tokio::time::Instant::now() < row_deadline
                    && !driver.is_finished()
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            anyhow::Ok((client, driver))
        }));
    }
    go.wait().await;
    let t0 = now_ns(epoch);

    let mut pub_clients = Vec::new();
    let mut errors = Vec::new();
    for p in pubs {
        match p.await.context("publisher task panicked")? {
            Ok(c) => pub_clients.push(c),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // Make sure the subscribers stop waiting for messages that were never published.
    published_count.fetch_max(published_total, Ordering::AcqRel);
    let published = published_total;

    let mut latencies = Latencies::new();
    let mut received = 0u64;
    for s in subs {
        match s.await.context("subscriber task panicked")? {
            Ok(lat) => {
                received += lat.len();
                latencies.merge(&lat);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    for (client, driver) in pub_clients {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    let end = last_rx.load(Ordering::Acquire).max(t0);
    Ok(LoadResult {
        published,
        expected: published_total * fanout,
        received,
        elapsed: Duration::from_nanos(end - t0),
        latencies,
        failed: false,
    })
}

fn render(rows: &[(Target, QoS, LoadResult)], args: &BrokerArgs) -> String {
    let mut out = String::new();
    let shape = format!("{}x{}", args.publishers, args.subscribers);
    let _ = writeln!(
        out,
        "\n| target | qos | pubs×subs | messages | delivered | missing | msgs/s | p50 | p99 |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for (target, qos, r) in rows {
        if r.failed {
            let _ = writeln!(
                out,
                "| {} | {} | {shape} | {} | failed | - | - | - | - |",
                target.name(),
                *qos as u8,
                args.messages
            );
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {shape} | {} | {} | {} | {:.0} | {} | {} |",
            target.name(),
            *qos as u8,
            r.published,
            r.received,
            r.expected.saturating_sub(r.received),
            r.rate(),
            fmt_us(r.percentile(50.0)),
            fmt_us(r.percentile(99.0)),
        );
    }
    let mut ratios = String::new();
    for (target, qos, r) in rows {
        if *target != Target::Fieldmq || r.failed {
            continue;
        }
        let mosq = rows
            .iter()
            .find(|(t, q, m)| *t == Target::Mosquitto && q == qos && !m.failed);
        if let Some((_, _, m)) = mosq {
            let thr = if m.rate() > 0.0 {
                format!("{:.2}", r.rate() / m.rate())
            } else {
                "-".to_string()
            };
            let p99 = match (r.percentile(99.0), m.percentile(99.0)) {
                (Some(a), Some(b)) if b > 0 => format!("{:.2}", a as f64 / b as f64),
                _ => "-".to_string(),
            };
            let _ = writeln!(ratios, "| {} | {shape} | {thr} | {p99} |", *qos as u8);
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\n| qos | pubs×subs | fieldmq/mosquitto msgs/s | fieldmq/mosquitto p99 |"
        );
        let _ = writeln!(out, "|---|---|---|---|");
        out.push_str(&ratios);
    }
    out
}
