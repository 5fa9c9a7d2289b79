//! `fieldmq-bench sparkplug`: the Sparkplug B edge node's data path. The release binary
//! runs simulated devices (random walks, so every poll changes every point) behind a
//! Sparkplug uplink to a loopback Mosquitto; a subscriber there decodes the DDATA. Prints
//! DDATA messages and metrics per second and the gateway process's CPU time (utime + stime
//! from `/proc/<pid>/stat`) per 1,000 metrics.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fieldmq::uplink::sparkplug::proto::Payload;
use prost::Message as _;

use crate::launch::{free_port, start_mosquitto, BinArgs, BrokerProcess, WorkDir};
use crate::proc;

#[derive(clap::Args, Debug)]
pub(crate) struct SparkplugArgs {
    #[command(flatten)]
    bins: BinArgs,
    /// Simulated devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Points per device.
    #[arg(long, default_value_t = 20)]
    points: usize,
    /// Poll interval of every device.
    #[arg(long, default_value = "20ms")]
    poll: String,
    /// Measured time, after the births and a second of warm-up.
    #[arg(long, default_value = "10s")]
    duration: humantime::Duration,
}

fn config_text(
    dir: &std::path::Path,
    listen: SocketAddr,
    cloud: u16,
    args: &SparkplugArgs,
) -> String {
    let mut text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\nlog_level = \"warn\"\n\n\
         [broker]\nallow_anonymous = true\n\n[[broker.listeners]]\nbind = \"{listen}\"\n\n",
        dir.join("data").display()
    );
    for device in 0..args.devices {
        let _ = write!(
            text,
            "[[devices]]\nname = \"dev{device}\"\ndriver = \"simulated\"\npoll = \"{}\"\npoints = [\n",
            args.poll
        );
        for point in 0..args.points {
            let _ = writeln!(
                text,
                "  {{ name = \"p{point}\", waveform = \"random_walk\", min = 0.0, max = 1000.0, step = 1.0, unit = \"kW\" }},"
            );
        }
        text.push_str("]\n\n");
    }
    let _ = write!(
        text,
        "[[uplinks]]\nname = \"spb\"\nurl = \"mqtt://127.0.0.1:{cloud}\"\nprotocol = \"3.1.1\"\n\n\
         [uplinks.sparkplug]\ngroup_id = \"bench\"\n"
    );
    text
}

/// What the subscriber counted.
#[derive(Default, Clone, Copy)]
struct Counts {
    ddata: u64,
    metrics: u64,
    births: u64,
}

pub(crate) async fn run(args: &SparkplugArgs) -> Result<()> {
    let work = WorkDir::new(args.bins.keep_dir.clone())?;
    let cloud_dir = work.subdir("cloud")?;
    let gateway_dir = work.subdir("gateway")?;
    let cloud = start_mosquitto(&args.bins.mosquitto_bin, &cloud_dir, free_port()?, "")?;

    // The subscriber first, so that it sees the births.
    let counts = std::sync::Arc::new(std::sync::Mutex::new(Counts::default()));
    let mut options = rumqttc::MqttOptions::new("sparkplug-bench-host", "127.0.0.1", cloud.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    client
        .subscribe("spBv1.0/bench/#", rumqttc::QoS::AtMostOnce)
        .await
        .context("subscribe")?;
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let shared = counts.clone();
    let subscriber = tokio::spawn(async move {
        let mut subscribed = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                    let kind = publish
                        .topic
                        .split('/')
                        .nth(2)
                        .unwrap_or_default()
                        .to_owned();
                    let metrics = Payload::decode(publish.payload.as_ref())
                        .map(|p| p.metrics.len() as u64)
                        .unwrap_or(0);
                    let mut counts = shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match kind.as_str() {
                        "DDATA" => {
                            counts.ddata += 1;
                            counts.metrics += metrics;
                        }
                        "NBIRTH" | "DBIRTH" => counts.births += 1,
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .context("no SUBACK from Mosquitto")??;

    if !args.bins.fieldmq_bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` or pass --fieldmq-bin",
            args.bins.fieldmq_bin.display()
        );
    }
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let conf = gateway_dir.join("fieldmq.toml");
    std::fs::write(&conf, config_text(&gateway_dir, listen, cloud.port(), args))?;
    let mut command = Command::new(&args.bins.fieldmq_bin);
    command.arg("run").arg("-c").arg(&conf);
    let gateway =
        BrokerProcess::spawn("fieldmq", command, listen, gateway_dir.join("gateway.log"))?;
    let pid = gateway.pid().context("gateway pid")?;

    let snapshot = || {
        *counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let births_by = Instant::now() + Duration::from_secs(15);
    while snapshot().births < 1 + args.devices as u64 {
        if Instant::now() > births_by {
            bail!(
                "no births from the gateway within 15 s (see {})",
                gateway_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = snapshot();
    let cpu_before = proc::process_cpu_ms(pid);
    let started = Instant::now();
    tokio::time::sleep(*args.duration).await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = snapshot();
    let cpu = proc::cpu_between(cpu_before, proc::process_cpu_ms(pid));

    let ddata = after.ddata - before.ddata;
    let metrics = after.metrics - before.metrics;
    let offered = args.devices as f64 * args.points as f64
        / humantime::parse_duration(&args.poll)
            .map(|d| d.as_secs_f64())
            .unwrap_or(1.0);
    println!(
        "sparkplug: {} devices x {} points every {} (offered {:.0} readings/s), {:.1} s measured",
        args.devices, args.points, args.poll, offered, elapsed
    );
    println!("  DDATA messages/s        {:.0}", ddata as f64 / elapsed);
    println!("  metrics/s               {:.0}", metrics as f64 / elapsed);
    match cpu {
        Some(ms) if metrics > 0 => println!(
            "  gateway CPU             {ms} ms ({:.1} ms per 1,000 metrics, {:.0}% of one core)",
            ms as f64 * 1000.0 / metrics as f64,
            ms as f64 / 10.0 / elapsed
        ),
        _ => println!("  gateway CPU             -"),
    }
    proc::print_load();
    gateway.stop();
    subscriber.abort();
    cloud.stop();
    if work.keep {
        println!("files kept in {}", work.path().display());
    }
    Ok(())
}
