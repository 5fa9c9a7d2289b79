//! The process itself, read from `/proc/self` at scrape time: build info, uptime, resident
//! memory, CPU time and open file descriptors. On a system without `/proc` only build info
//! and uptime are shown.

use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;

/// Linux's clock ticks per second for `/proc/self/stat` (USER_HZ: 100 on every
/// architecture the gateway is built for).
const CLOCK_TICKS: f64 = 100.0;
/// The page size behind `/proc/self/statm` (4 KiB on x86_64 and the Raspberry Pi kernels).
const PAGE_SIZE: u64 = 4096;

#[derive(Debug)]
pub(super) struct ProcessCollector {
    started: Instant,
    info: Info<Vec<(&'static str, &'static str)>>,
}

impl ProcessCollector {
    pub(super) fn new() -> ProcessCollector {
        ProcessCollector {
            started: Instant::now(),
            info: Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        }
    }
}

/// Resident memory in bytes: the second field of `/proc/self/statm`, in pages.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE_SIZE)
}

/// User plus system CPU time: fields 14 and 15 of `/proc/self/stat`, counted after the
/// command name (which may hold spaces and parentheses, so split at its last `)`).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / CLOCK_TICKS)
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = encoder.encode_descriptor(
            "build",
            "The gateway's version",
            None,
            self.info.metric_type(),
        )?;
        self.info.encode(info)?;
        let uptime = ConstGauge::new(self.started.elapsed().as_secs_f64());
        uptime.encode(encoder.encode_descriptor(
            "uptime_seconds",
            "Seconds since the gateway started",
            None,
            uptime.metric_type(),
        )?)?;
        if let Some(bytes) = resident_bytes() {
            let rss = ConstGauge::new(bytes as i64);
            rss.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of the gateway process",
                None,
                rss.metric_type(),
            )?)?;
        }
        if let Some(seconds) = cpu_seconds() {
            let cpu = ConstCounter::new(seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time (user and system) the gateway process used",
                None,
                cpu.metric_type(),
            )?)?;
        }
        if let Some(fds) = open_fds() {
            let fds = ConstGauge::new(fds as i64);
            fds.encode(encoder.encode_descriptor(
                "process_open_fds",
                "File descriptors the gateway process holds open",
                None,
                fds.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_self_is_read() {
        assert!(resident_bytes().is_some_and(|bytes| bytes > 0));
        assert!(cpu_seconds().is_some());
        assert!(open_fds().is_some_and(|fds| fds >= 3));
    }
}
