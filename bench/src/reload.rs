//! `reload`: how long a live reload takes, from the request to the report, for a file that
//! did not change (a no-op: read, check, compare) and for one that changes one device (the
//! device's task stops and a new one starts). The gateway runs from the library in this
//! process, with `--devices` simulated devices and one listener, as `fieldmq run` would
//! start it; the requests go through the same `Reloader` that SIGHUP, `fieldmq reload` and
//! the HTTP API use.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::stats::{fmt_us, Latencies};

#[derive(clap::Args, Debug)]
pub(crate) struct ReloadArgs {
    /// Reloads per kind.
    #[arg(long, default_value_t = 20)]
    runs: u32,
    /// Simulated devices in the file (each with `--points` points, polled every second).
    #[arg(long, default_value_t = 10)]
    devices: usize,
    #[arg(long, default_value_t = 10)]
    points: usize,
}

/// The configuration: `devices` simulated devices; the first one's constant is `value`.
fn config_text(data: &Path, args: &ReloadArgs, value: u32) -> String {
    let mut text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\nlog_level = \"warn\"\n\n\
         [broker]\nallow_anonymous = true\ndurability = \"memory\"\n\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\n",
        data.display()
    );
    for device in 0..args.devices {
        let _ = write!(
            text,
            "[[devices]]\nname = \"dev{device}\"\ndriver = \"simulated\"\npoll = \"1s\"\npoints = ["
        );
        for point in 0..args.points {
            let value = if device == 0 && point == 0 {
                f64::from(value) + 0.5
            } else {
                1.5
            };
            let _ = write!(
                text,
                "{{ name = \"p{point}\", waveform = \"constant\", value = {value:?} }}, "
            );
        }
        text.push_str("]\n\n");
    }
    text
}

pub(crate) async fn run(args: &ReloadArgs) -> Result<()> {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("fieldmq-bench-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = measure(args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(args: &ReloadArgs, dir: &Path) -> Result<()> {
    let file = dir.join("fieldmq.toml");
    let data = dir.join("data");
    std::fs::write(&file, config_text(&data, args, 0))?;
    let config = fieldmq::service::config::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let shutdown = CancellationToken::new();
    let gateway = fieldmq::service::start(config, shutdown.clone()).await?;

    let mut noop = Latencies::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        let report = gateway.reloader.reload().await?;
        noop.record(started.elapsed());
        anyhow::ensure!(
            report.applied && report.changes.is_empty(),
            "a no-op reload changed something: {report:?}"
        );
    }

    let mut device = Latencies::new();
    for run in 1..=args.runs {
        std::fs::write(&file, config_text(&data, args, run))?;
        let started = Instant::now();
        let report = gateway.reloader.reload().await?;
        device.record(started.elapsed());
        anyhow::ensure!(
            report.applied && report.changes == vec!["device dev0: restarted".to_owned()],
            "unexpected report: {report:?}"
        );
    }
    gateway.stop().await;

    println!(
        "reload, request to report; {} devices x {} points, {} runs each",
        args.devices, args.points, args.runs
    );
    println!("| reload | p50 | p90 | max |");
    println!("|---|---|---|---|");
    for (name, latencies) in [("no change", &noop), ("one device changed", &device)] {
        println!(
            "| {name} | {} | {} | {} |",
            fmt_us(latencies.percentile(50.0)),
            fmt_us(latencies.percentile(90.0)),
            fmt_us(latencies.max())
        );
    }
    Ok(())
}
