//! `fieldmq-bench wake`: what it costs here for one thread to wake another.
//!
//! With `durability = "sync"` a PUBACK crosses threads several times (connection → store,
//! the disk's completion → store, store → connection) while the broker otherwise waits for
//! the fsync; Mosquitto's path stays on one busy thread. On bare metal (a Pi) waking a
//! thread should cost a few microseconds; on a VM, a CPU left idle halts and the host must
//! schedule it again, which on a busy host takes far longer. This measures a round trip
//! between two threads after the other side has been idle for a given gap, without a
//! broker, so the `durable` rows of a VM can be read against it.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::stats::Latencies;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct WakeArgs {
    /// Idle gaps before each round trip, microseconds (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 50, 200, 1000, 5000])]
    gaps: Vec<u64>,
    /// Round trips per gap.
    #[arg(long, default_value_t = 2000)]
    count: u32,
}

/// Longest gap: the run stays bounded in time (`count` × gap).
const MAX_GAP_US: u64 = 100_000;

pub(crate) fn run(args: &WakeArgs) -> Result<()> {
    if args.count == 0 || args.gaps.is_empty() {
        bail!("--count and --gaps must name at least one round trip");
    }
    if let Some(gap) = args.gaps.iter().find(|gap| **gap > MAX_GAP_US) {
        bail!("--gaps: {gap} µs is longer than the {MAX_GAP_US} µs allowed");
    }
    let (to_echo, echo_rx) = mpsc::channel::<()>();
    let (to_caller, caller_rx) = mpsc::channel::<()>();
    let echo = std::thread::Builder::new()
        .name("wake-echo".into())
        .spawn(move || {
            while echo_rx.recv().is_ok() {
                if to_caller.send(()).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the echo thread")?;
    let mut rows = Vec::new();
    for &gap in &args.gaps {
        let mut round_trips = Latencies::new();
        for _ in 0..args.count {
            if gap > 0 {
                std::thread::sleep(Duration::from_micros(gap));
            }
            let sent = Instant::now();
            to_echo.send(()).context("the echo thread ended")?;
            caller_rx.recv().context("the echo thread ended")?;
            round_trips.record(sent.elapsed());
        }
        rows.push((gap, round_trips));
    }
    drop(to_echo);
    let _ = echo.join();
    println!("{}", render(args.count, &rows));
    Ok(())
}

fn render(count: u32, rows: &[(u64, Latencies)]) -> String {
    let mut out = format!(
        "thread wake-up: {count} round trips between two threads per row, each after the \
         caller slept for the gap\n\n"
    );
    out.push_str("| idle gap | round trip p50 | p90 | p99 |\n|---|---|---|---|\n");
    for (gap, round_trips) in rows {
        // Every row has `count` (at least 1) values.
        let at = |p: f64| round_trips.percentile(p).unwrap_or(0);
        out.push_str(&format!(
            "| {gap} µs | {} µs | {} µs | {} µs |\n",
            at(50.0),
            at(90.0),
            at(99.0)
        ));
    }
    out.push_str(
        "\nA round trip is two wake-ups. On bare metal every row should stay at a few µs; on a VM \
         the rows after a gap show what waking a halted virtual CPU costs, which `sync` \
         durability pays on every commit.",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gap_gets_a_row_with_its_percentiles() {
        let rows = vec![
            (0, (1..=100).collect()),
            (1000, [7; 10].into_iter().collect()),
        ];
        let text = render(100, &rows);
        // Nearest rank: the 50th of 100 values is the median.
        assert!(text.contains("| 0 µs | 50 µs | 90 µs | 99 µs |"), "{text}");
        assert!(text.contains("| 1000 µs | 7 µs | 7 µs | 7 µs |"), "{text}");
    }

    #[test]
    fn a_gap_past_the_bound_is_refused_before_anything_runs() {
        let args = WakeArgs {
            gaps: vec![0, MAX_GAP_US + 1],
            count: 1,
        };
        let error = run(&args).expect_err("a gap past the bound must be refused");
        assert!(error.to_string().contains("--gaps"), "{error}");
    }
}
