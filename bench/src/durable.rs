//! `fieldmq-bench durable`: QoS 1 into the queue of an offline persistent subscriber, then
//! the drain when it reconnects, fieldmq (`durability = "sync"` by default) against
//! Mosquitto with `persistence true`, in interleaved rounds with per-round ratios.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::launch::{tail, BinArgs, BrokerProcess, BrokerSetup, Target, TargetArg, WorkDir};
use crate::proc::{
    cpu_between, cpu_per_message, cpu_ticks, print_load, process_cpu_ms, process_disk_writes,
    tick_share,
};
use crate::queue::{
    drain, publish_qos1, queue_setup, register_offline_subscriber, DrainResult, PublishResult,
    PUB_WINDOW,
};
use crate::stats::{fmt_us, median};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DurableArgs {
    /// Which broker(s) to start and load.
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    target: TargetArg,
    /// QoS 1 messages published while the subscriber is away.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload size in bytes (at least 8: the sequence number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages each broker keeps in flight to the subscriber (fieldmq `max_inflight`,
    /// Mosquitto `max_inflight_messages`; 20 is both defaults).
    #[arg(long, default_value_t = 20)]
    inflight: u16,
    /// fieldmq's `[broker] durability` (`sync`, its default, is what the comparison with
    /// Mosquitto's `persistence true` is about; the others show what the fsync costs).
    #[arg(long, default_value = "sync", value_parser = ["sync", "batched", "memory"])]
    durability: String,
    /// Publish rate in messages/s; 0 = as fast as the window of 100 allows. A low rate
    /// shows what one acknowledgement costs (with `sync`: the commit and its fsync).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Publishers sharing the messages (and the rate), each with its own connection and
    /// window of 100; more than one shows the group commit with concurrent clients, as on a
    /// LAN with many devices.
    #[arg(long, default_value_t = 1)]
    publishers: u16,
    /// Longest time the publish phase, and then the drain phase, may take, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Rounds; with both targets each round runs both, first one then the other, the order
    /// alternating, and the ratios are given per round with their median (on a shared
    /// machine single runs move by ±50%).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    #[command(flatten)]
    bins: BinArgs,
}

/// One `durable` row.
struct DurableRow {
    round: u32,
    target: Target,
    messages: u64,
    publish: Option<PublishResult>,
    drain: Option<DrainResult>,
    /// Share of the machine's CPU time the hypervisor gave to others during this row.
    steal: Option<f64>,
    /// Share of the machine's CPU time with nothing to run (idle or waiting for I/O) during
    /// the publish phase: on a VM an idle virtual CPU halts, and waking it again goes
    /// through the host.
    idle: Option<f64>,
    /// CPU time the broker process used (all threads, user + system) in each phase, ms.
    broker_cpu_ms: BrokerCpu,
    /// Bytes the broker process had written to storage during the publish phase.
    publish_disk_bytes: Option<u64>,
}

/// Broker CPU time per phase of a `durable` row, ms.
#[derive(Default, Clone, Copy)]
struct BrokerCpu {
    publish: Option<u64>,
    drain: Option<u64>,
}

pub(crate) async fn run(args: DurableArgs) -> Result<()> {
    if args.payload < 8 {
        bail!("--payload must be at least 8 bytes");
    }
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    let work = WorkDir::new(args.bins.keep_dir.clone())?;
    let setup = queue_setup(
        &args.bins,
        args.messages,
        args.payload,
        args.inflight,
        &args.durability,
    );
    let timeout = Duration::from_secs(args.timeout);
    let mut rows = Vec::new();
    for round in 1..=args.repeat.max(1) {
        let mut targets = Target::both(args.target, Target::MosquittoPersist);
        if round % 2 == 0 {
            // Whichever runs first may find the machine (disk, caches) in another state.
            targets.reverse();
        }
        for target in targets {
            rows.push(durable_row(&args, &work, &setup, round, target, timeout).await?);
        }
    }
    println!(
        "\n{} publisher(s), {PUB_WINDOW} in flight each, {}-byte payloads, fieldmq durability `{}`",
        args.publishers.max(1),
        args.payload,
        args.durability
    );
    print!("{}", render_durable(&rows));
    print_load();
    Ok(())
}

/// One broker, one round: start it, queue `messages` for the offline subscriber, drain.
async fn durable_row(
    args: &DurableArgs,
    work: &WorkDir,
    setup: &BrokerSetup,
    round: u32,
    target: Target,
    timeout: Duration,
) -> Result<DurableRow> {
    let dir = work.subdir(&format!("durable-{}-{round}", target.name()))?;
    eprintln!(
        "== durable {}: {} QoS 1 messages from {} publisher(s) to an offline persistent subscriber",
        target.name(),
        args.messages,
        args.publishers.max(1)
    );
    let mut row = DurableRow {
        round,
        target,
        messages: args.messages,
        publish: None,
        drain: None,
        steal: None,
        idle: None,
        broker_cpu_ms: BrokerCpu::default(),
        publish_disk_bytes: None,
    };
    let ticks_before = cpu_ticks();
    let mut publish_ticks = (None, None);
    let broker = match BrokerProcess::start(target, setup, &dir) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("   cannot start: {e:#}");
            return Ok(row);
        }
    };
    let cpu_now = || broker.pid().and_then(process_cpu_ms);
    let disk_now = || broker.pid().and_then(process_disk_writes);
    let res: Result<()> = async {
        register_offline_subscriber(broker.addr, args.payload).await?;
        let cpu_start = cpu_now();
        let disk_start = disk_now();
        publish_ticks.0 = cpu_ticks();
        let p = publish_qos1(
            broker.addr,
            args.messages,
            args.payload,
            args.rate,
            args.publishers,
            timeout,
        )
        .await?;
        publish_ticks.1 = cpu_ticks();
        let cpu_published = cpu_now();
        row.publish_disk_bytes = cpu_between(disk_start, disk_now());
        eprintln!("   published: {} acked, {:.0} msgs/s", p.acked, p.rate());
        row.publish = Some(p);
        row.broker_cpu_ms.publish = cpu_between(cpu_start, cpu_published);
        let d = drain(broker.addr, args.messages, args.payload, timeout).await?;
        row.broker_cpu_ms.drain = cpu_between(cpu_published, cpu_now());
        eprintln!(
            "   drained: {} ({} duplicates, session present {}), {:.0} msgs/s",
            d.received,
            d.duplicates,
            d.session_present,
            d.rate()
        );
        row.drain = Some(d);
        Ok(())
    }
    .await;
    let log = broker.log_path.clone();
    broker.stop();
    row.steal = tick_share(ticks_before, cpu_ticks(), |t| t.stolen);
    row.idle = tick_share(publish_ticks.0, publish_ticks.1, |t| t.idle);
    if let Err(e) = res {
        eprintln!("   failed: {e:#}\n{}", tail(&log, 10));
    }
    Ok(row)
}

fn render_durable(rows: &[DurableRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| target | messages | acked | publish msgs/s | PUBACK p50 | PUBACK p99 | drained | duplicates | missing | drain msgs/s | broker CPU µs/msg publish | drain | broker disk bytes/msg publish | round | CPU steal | CPU idle publish |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let (acked, pub_rate) = match &r.publish {
            Some(p) => (p.acked.to_string(), format!("{:.0}", p.rate())),
            None => ("failed".to_string(), "-".to_string()),
        };
        let ack_p = |p: f64| {
            fmt_us(
                r.publish
                    .as_ref()
                    .and_then(|r| r.ack_latencies.percentile(p)),
            )
        };
        let (ack_p50, ack_p99) = (ack_p(50.0), ack_p(99.0));
        let (drained, dups, missing, drain_rate) = match &r.drain {
            Some(d) => (
                d.received.to_string(),
                d.duplicates.to_string(),
                r.messages.saturating_sub(d.received).to_string(),
                format!("{:.0}", d.rate()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let percent = |share: Option<f64>| share.map_or("-".to_string(), |s| format!("{s:.0}%"));
        let (steal, idle) = (percent(r.steal), percent(r.idle));
        let cpu_publish = cpu_per_message(
            r.broker_cpu_ms.publish,
            r.publish.as_ref().map_or(0, |p| p.acked),
        );
        let cpu_drain = cpu_per_message(
            r.broker_cpu_ms.drain,
            r.drain.as_ref().map_or(0, |d| d.received),
        );
        let disk_publish = match (r.publish_disk_bytes, r.publish.as_ref()) {
            (Some(bytes), Some(p)) if p.acked > 0 => {
                format!("{:.0}", bytes as f64 / p.acked as f64)
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {acked} | {pub_rate} | {ack_p50} | {ack_p99} | {drained} | {dups} | {missing} | {drain_rate} | {cpu_publish} | {cpu_drain} | {disk_publish} | {} | {steal} | {idle} |",
            r.target.name(),
            r.messages,
            r.round
        );
    }
    let rate_p = |r: &DurableRow| r.publish.as_ref().map_or(0.0, PublishResult::rate);
    let rate_d = |r: &DurableRow| r.drain.as_ref().map_or(0.0, DrainResult::rate);
    let ratio = |a: f64, b: f64| (a > 0.0 && b > 0.0).then(|| a / b);
    // (publish, drain) ratios of each round that has both brokers.
    let rounds: Vec<(u32, Option<f64>, Option<f64>)> = rows
        .iter()
        .filter(|r| r.target == Target::Fieldmq)
        .filter_map(|f| {
            let m = rows
                .iter()
                .find(|m| m.round == f.round && m.target == Target::MosquittoPersist)?;
            Some((
                f.round,
                ratio(rate_p(f), rate_p(m)),
                ratio(rate_d(f), rate_d(m)),
            ))
        })
        .collect();
    if rounds.is_empty() {
        return out;
    }
    let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    let _ = writeln!(
        out,
        "\n| fieldmq/mosquitto | publish msgs/s | drain msgs/s |\n|---|---|---|"
    );
    for (round, publish, drain) in &rounds {
        let _ = writeln!(
            out,
            "| round {round} | {} | {} |",
            show(*publish),
            show(*drain)
        );
    }
    if rounds.len() > 1 {
        let _ = writeln!(
            out,
            "| median of {} rounds | {} | {} |",
            rounds.len(),
            show(median(rounds.iter().filter_map(|r| r.1).collect())),
            show(median(rounds.iter().filter_map(|r| r.2).collect()))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durable_row(round: u32, target: Target, publish_rate: u64, drain_rate: u64) -> DurableRow {
        DurableRow {
            round,
            target,
            messages: publish_rate,
            publish: Some(PublishResult {
                acked: publish_rate,
                elapsed: Duration::from_secs(1),
                ack_latencies: [100].into_iter().collect(),
            }),
            drain: Some(DrainResult {
                received: drain_rate,
                duplicates: 0,
                session_present: true,
                elapsed: Duration::from_secs(1),
            }),
            steal: Some(12.4),
            idle: Some(30.2),
            broker_cpu_ms: BrokerCpu {
                publish: Some(publish_rate / 10),
                drain: None,
            },
            publish_disk_bytes: Some(publish_rate * 150),
        }
    }

    #[test]
    fn durable_ratios_are_given_per_round_with_their_median() {
        let rows = vec![
            durable_row(1, Target::Fieldmq, 50_000, 300_000),
            durable_row(1, Target::MosquittoPersist, 100_000, 300_000),
            durable_row(2, Target::MosquittoPersist, 50_000, 200_000),
            durable_row(2, Target::Fieldmq, 60_000, 300_000),
            durable_row(3, Target::Fieldmq, 90_000, 100_000),
            durable_row(3, Target::MosquittoPersist, 100_000, 400_000),
        ];
        let table = render_durable(&rows);
        assert!(table.contains("| round 1 | 0.50 | 1.00 |"), "{table}");
        assert!(table.contains("| round 2 | 1.20 | 1.50 |"), "{table}");
        assert!(table.contains("| round 3 | 0.90 | 0.25 |"), "{table}");
        assert!(
            table.contains("| median of 3 rounds | 0.90 | 1.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| 100.0 | - | 150 | 2 | 12% | 30% |"),
            "{table}"
        );
        let single = render_durable(&rows[..2]);
        assert!(single.contains("| round 1 | 0.50 | 1.00 |"), "{single}");
        assert!(!single.contains("median"), "{single}");
    }
}
