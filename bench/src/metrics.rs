//! `fieldmq-bench metrics`: what one `GET /metrics` costs on a large gateway. The gateway's
//! library runs in this process with `--devices` simulated devices of `--points` points
//! each, polled every second, and its HTTP listener on a free loopback port; the bench
//! scrapes it `--scrapes` times one after another (as one Prometheus would) and prints the
//! median and p99 of the time from sending the request to the last byte of the answer.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::stats::Latencies;

#[derive(Args, Debug)]
pub(crate) struct MetricsArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Points per device.
    #[arg(long, default_value_t = 50)]
    points: usize,
    /// Scrapes timed, one after another.
    #[arg(long, default_value_t = 200)]
    scrapes: usize,
    /// The same number of untimed scrapes first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

/// The gateway's configuration text: `devices` × `points` simulated points, polled every
/// second, the broker in memory, HTTP on an ephemeral port.
fn config_text(data_dir: &Path, devices: usize, points: usize) -> String {
    let mut text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\nlog_level = \"warn\"\n\n\
         [broker]\nallow_anonymous = true\ndurability = \"memory\"\n\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\n\
         [http]\nbind = \"127.0.0.1:0\"\n",
        data_dir.display()
    );
    for device in 0..devices {
        text.push_str(&format!(
            "\n[[devices]]\nname = \"dev{device}\"\ndriver = \"simulated\"\npoll = \"1s\"\npoints = [\n"
        ));
        for point in 0..points {
            text.push_str(&format!(
                "  {{ name = \"p{point}\", waveform = \"sine\", min = 0.0, max = 100.0, period = \"60s\" }},\n"
            ));
        }
        text.push_str("]\n");
    }
    text
}

/// One `GET /metrics` on a new connection: the answer's size in bytes.
async fn scrape(addr: std::net::SocketAddr) -> Result<usize> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::with_capacity(1 << 20);
    stream.read_to_end(&mut answer).await?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!(
            "scrape answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)])
        );
    }
    Ok(answer.len())
}

pub(crate) async fn run(args: &MetricsArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("fieldmq-bench-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("temp dir")?;
    let text = config_text(&dir.join("data"), args.devices, args.points);
    let config = fieldmq::service::config::parse(&text, &dir.join("bench.toml"))
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let shutdown = CancellationToken::new();
    let gateway = fieldmq::service::start(config, shutdown.clone())
        .await
        .context("start the gateway")?;
    let addr = gateway.http_addr.context("no HTTP listener")?;
    // Let every device poll once, so every family has its samples.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut bytes = 0;
    for _ in 0..args.warmup {
        bytes = scrape(addr).await?;
    }
    let mut latencies = Latencies::new();
    let started = Instant::now();
    for _ in 0..args.scrapes {
        let began = Instant::now();
        bytes = scrape(addr).await?;
        latencies.record(began.elapsed());
    }
    let elapsed = started.elapsed();
    let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0).unwrap_or(f64::NAN);
    println!(
        "metrics: {} devices x {} points, {} scrapes of {} KiB in {:.1} s: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.devices,
        args.points,
        args.scrapes,
        bytes / 1024,
        elapsed.as_secs_f64(),
        ms(latencies.percentile(50.0)),
        ms(latencies.percentile(99.0)),
        ms(latencies.max()),
    );
    gateway.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
