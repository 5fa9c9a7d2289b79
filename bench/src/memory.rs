//! `fieldmq-bench memory`: the broker's resident memory with many idle clients, and with
//! many messages queued for one offline persistent subscriber (with the queue's size on
//! disk, and optionally a drain that checks nothing was lost).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::launch::{start_broker_in, tail, BinArgs, BrokerSetup, Target, TargetArg, WorkDir};
use crate::proc::{fmt_mib, open_files_limit, print_load, rss_kib};
use crate::queue::{
    drain, publish_qos1, queue_setup, register_offline_subscriber, DrainResult, PublishResult,
};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct MemoryArgs {
    /// Which broker(s) to start and measure.
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    target: TargetArg,
    /// Idle connected clients for the first measurement (0 skips it).
    #[arg(long, default_value_t = 1000)]
    clients: u32,
    /// QoS 1 messages queued for one offline persistent subscriber (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    queued: u64,
    /// Payload size in bytes of the queued messages (at least 8).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Afterwards, reconnect the subscriber and count what it gets (checks nothing was lost).
    #[arg(long)]
    drain: bool,
    /// Longest time the publish phase (and the drain) may take, seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    #[command(flatten)]
    bins: BinArgs,
}

/// Bytes of all files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Open `n` MQTT 3.1.1 connections (keep alive 60, clean session) with raw TCP and one
/// CONNECT each, and wait for each CONNACK. Blocking; the streams stay open until dropped.
fn open_idle_clients(addr: SocketAddr, n: u32) -> Result<Vec<TcpStream>> {
    use std::io::{Read, Write};
    let mut streams = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(format!("bench-idle-{i}"));
        connect.keep_alive = 60;
        connect.clean_session = true;
        let mut buf = bytes::BytesMut::new();
        rumqttc::mqttbytes::v4::Packet::Connect(connect)
            .write(&mut buf, 1024)
            .map_err(|e| anyhow::anyhow!("cannot encode CONNECT: {e:?}"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("idle client {i}: cannot connect"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&buf)
            .with_context(|| format!("idle client {i}: cannot send CONNECT"))?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack)
            .with_context(|| format!("idle client {i}: no CONNACK"))?;
        if ack[0] != 0x20 || ack[1] != 0x02 || ack[3] != 0 {
            bail!("idle client {i}: refused or unexpected CONNACK {ack:02x?}");
        }
        streams.push(s);
    }
    Ok(streams)
}

/// RSS (KiB) before and after: idle clients.
struct IdleRow {
    target: Target,
    clients: u32,
    before: u64,
    after: u64,
}

/// RSS (KiB) before and after: messages queued for an offline subscriber.
struct QueueRow {
    target: Target,
    queued: u64,
    publish: PublishResult,
    before: u64,
    after: u64,
    peak: u64,
    disk: u64,
    drain: Option<DrainResult>,
}

pub(crate) async fn run(args: MemoryArgs) -> Result<()> {
    if args.payload < 8 {
        bail!("--payload must be at least 8 bytes");
    }
    if let Some(limit) = open_files_limit() {
        let need = u64::from(args.clients) + 64;
        if limit < need {
            bail!(
                "the open-files limit is {limit}, {need} needed for --clients {}: \
                 raise it (`ulimit -n {need}`) or use fewer clients",
                args.clients
            );
        }
    }
    let work = WorkDir::new(args.bins.keep_dir.clone())?;
    let timeout = Duration::from_secs(args.timeout);
    let mut idle_rows = Vec::new();
    let mut queue_rows = Vec::new();
    let targets = Target::both(args.target, Target::MosquittoPersist);
    // (a) idle clients: fieldmq with its defaults (sync durability) and a listener limit above
    // the client count; Mosquitto without persistence (unlimited connections by default).
    if args.clients > 0 {
        for &target in &targets {
            let target = if target == Target::MosquittoPersist {
                Target::Mosquitto
            } else {
                target
            };
            let mut setup = BrokerSetup::new(&args.bins);
            setup.fieldmq_listener += &format!("max_connections = {}\n", args.clients + 100);
            eprintln!("== memory {}: {} idle clients", target.name(), args.clients);
            let dir = work.path().join(format!("idle-{}", target.name()));
            let Some(broker) = start_broker_in(&dir, target, &setup)? else {
                continue;
            };
            let pid = broker.pid().context("broker not running")?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (before, _) = rss_kib(pid)?;
            let (addr, n) = (broker.addr, args.clients);
            let opened = tokio::task::spawn_blocking(move || open_idle_clients(addr, n))
                .await
                .context("idle clients task panicked")?;
            match opened {
                Ok(streams) => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let (after, _) = rss_kib(pid)?;
                    eprintln!("   RSS {} → {}", fmt_mib(before), fmt_mib(after));
                    idle_rows.push(IdleRow {
                        target,
                        clients: n,
                        before,
                        after,
                    });
                    drop(streams);
                }
                Err(e) => eprintln!("   failed: {e:#}\n{}", tail(&broker.log_path, 10)),
            }
            broker.stop();
        }
    }
    // (b) messages queued for one offline persistent subscriber.
    if args.queued > 0 {
        let setup = queue_setup(&args.bins, args.queued, args.payload, 20, "sync");
        for &target in &targets {
            eprintln!(
                "== memory {}: {} QoS 1 messages queued for an offline subscriber",
                target.name(),
                args.queued
            );
            let dir = work.path().join(format!("queue-{}", target.name()));
            let Some(broker) = start_broker_in(&dir, target, &setup)? else {
                continue;
            };
            let pid = broker.pid().context("broker not running")?;
            let res: Result<QueueRow> = async {
                register_offline_subscriber(broker.addr, args.payload).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (before, _) = rss_kib(pid)?;
                let publish =
                    publish_qos1(broker.addr, args.queued, args.payload, 0, 1, timeout).await?;
                eprintln!(
                    "   published: {} acked, {:.0} msgs/s",
                    publish.acked,
                    publish.rate()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (after, peak) = rss_kib(pid)?;
                let disk = dir_size(&dir.join(if target == Target::Fieldmq {
                    "data"
                } else {
                    "persist"
                }));
                eprintln!(
                    "   RSS {} → {} (peak {}), on disk {:.1} MB",
                    fmt_mib(before),
                    fmt_mib(after),
                    fmt_mib(peak),
                    disk as f64 / 1e6
                );
                let drain = if args.drain {
                    let d = drain(broker.addr, args.queued, args.payload, timeout).await?;
                    eprintln!("   drained: {} ({:.0} msgs/s)", d.received, d.rate());
                    Some(d)
                } else {
                    None
                };
                Ok(QueueRow {
                    target,
                    queued: args.queued,
                    publish,
                    before,
                    after,
                    peak,
                    disk,
                    drain,
                })
            }
            .await;
            let log = broker.log_path.clone();
            broker.stop();
            match res {
                Ok(row) => queue_rows.push(row),
                Err(e) => eprintln!("   failed: {e:#}\n{}", tail(&log, 10)),
            }
        }
    }
    print!("{}", render_memory(&idle_rows, &queue_rows));
    print_load();
    Ok(())
}

fn render_memory(idle: &[IdleRow], queued: &[QueueRow]) -> String {
    let mut out = String::new();
    if !idle.is_empty() {
        let _ = writeln!(
            out,
            "\n| target | idle clients | RSS without clients | RSS with clients | per client |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for r in idle {
            let per = r.after.saturating_sub(r.before) as f64 / f64::from(r.clients.max(1));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} KiB |",
                r.target.name(),
                r.clients,
                fmt_mib(r.before),
                fmt_mib(r.after),
                per
            );
        }
    }
    if !queued.is_empty() {
        let _ = writeln!(
            out,
            "\n| target | queued | acked | publish msgs/s | RSS before | RSS after | peak RSS | on disk | drained (missing) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for r in queued {
            let drained = match &r.drain {
                Some(d) => format!("{} ({})", d.received, r.queued.saturating_sub(d.received)),
                None => "not checked".to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {} | {} | {:.1} MB | {drained} |",
                r.target.name(),
                r.queued,
                r.publish.acked,
                r.publish.rate(),
                fmt_mib(r.before),
                fmt_mib(r.after),
                fmt_mib(r.peak),
                r.disk as f64 / 1e6,
            );
        }
    }
    out
}
