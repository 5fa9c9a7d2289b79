//! What Linux's /proc says about a process and the machine: memory, CPU time, disk writes,
//! CPU steal and idle time, the load average. Every reader gives `None` (or an error) where
//! the file is missing, so a bench still runs, with "-" in those columns.

use anyhow::{bail, Context, Result};

/// VmRSS and VmHWM (peak) of a process, KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no VmRSS/VmHWM in {path}"),
    }
}

pub(crate) fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// CPU time (user + system, all threads) process `pid` has used so far, ms. `None` where
/// there is no `/proc/<pid>/stat` (not Linux, or the process is gone).
pub(crate) fn process_cpu_ms(pid: u32) -> Option<u64> {
    stat_cpu_ms(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) the calling thread has used so far, ms.
pub(crate) fn thread_cpu_ms() -> Option<u64> {
    stat_cpu_ms("/proc/thread-self/stat")
}

/// User + system time from a `stat` file of /proc, ms.
fn stat_cpu_ms(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')': state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    // In clock ticks of USER_HZ, which Linux fixes at 100 for /proc.
    Some((user + system) * 10)
}

/// CPU time between two [`process_cpu_ms`] readings.
pub(crate) fn cpu_between(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    after?.checked_sub(before?)
}

/// CPU µs per message, shown as "-" when unknown.
pub(crate) fn cpu_per_message(cpu_ms: Option<u64>, messages: u64) -> String {
    match cpu_ms {
        Some(ms) if messages > 0 => format!("{:.1}", ms as f64 * 1000.0 / messages as f64),
        _ => "-".to_string(),
    }
}

/// Bytes process `pid` has caused to be written to storage so far (`write_bytes` of
/// `/proc/<pid>/io`: what reached the block layer, not what sits in the page cache).
pub(crate) fn process_disk_writes(pid: u32) -> Option<u64> {
    disk_writes_from(&std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?)
}

fn disk_writes_from(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU time counters of the whole machine from `/proc/stat`, in ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MachineTicks {
    pub(crate) all: u64,
    pub(crate) stolen: u64,
    /// Idle and waiting for I/O.
    pub(crate) idle: u64,
}

/// The machine's [`MachineTicks`] now; `None` where there is no `/proc/stat` (not Linux).
pub(crate) fn cpu_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    Some(MachineTicks {
        all: fields.iter().sum(),
        stolen: *fields.get(7)?,
        idle: fields.get(3)? + fields.get(4)?,
    })
}

/// Percent of the CPU time between two [`cpu_ticks`] readings that `part` counts.
pub(crate) fn tick_share(
    before: Option<MachineTicks>,
    after: Option<MachineTicks>,
    part: fn(&MachineTicks) -> u64,
) -> Option<f64> {
    let (before, after) = (before?, after?);
    let all = after.all.checked_sub(before.all).filter(|&t| t > 0)?;
    Some(100.0 * part(&after).saturating_sub(part(&before)) as f64 / all as f64)
}

/// The soft limit on open files of this process (from /proc/self/limits).
pub(crate) fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    soft.parse().ok()
}

/// Other work on the machine skews these numbers: say how busy it was.
pub(crate) fn print_load() {
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "\n{cores} cores; load average at the end (1/5/15 min): {}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn steal_and_idle_are_their_shares_of_the_ticks_between_two_readings() {
        let ticks = |all, stolen, idle| MachineTicks { all, stolen, idle };
        let (before, after) = (ticks(1000, 10, 500), ticks(1400, 110, 560));
        assert_eq!(
            tick_share(Some(before), Some(after), |t| t.stolen),
            Some(25.0)
        );
        assert_eq!(
            tick_share(Some(before), Some(after), |t| t.idle),
            Some(15.0)
        );
        assert_eq!(tick_share(Some(before), Some(before), |t| t.stolen), None);
        assert_eq!(tick_share(None, Some(after), |t| t.idle), None);
        let now = cpu_ticks().expect("/proc/stat on Linux");
        assert!(now.all >= now.stolen + now.idle);
    }

    #[test]
    fn broker_cpu_is_read_per_process_and_given_per_message() {
        let mine = process_cpu_ms(std::process::id()).expect("/proc/self/stat on Linux");
        // Burn CPU until the reading moves (10 ms ticks); bounded in time.
        let start = Instant::now();
        let mut x = 0u64;
        let mut later = mine;
        while later < mine + 20 && start.elapsed() < Duration::from_secs(5) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            later = process_cpu_ms(std::process::id()).expect("/proc/self/stat on Linux");
        }
        assert!(
            cpu_between(Some(mine), Some(later)).is_some_and(|ms| ms >= 20),
            "{mine} -> {later}"
        );
        assert_eq!(cpu_between(Some(20), Some(10)), None);
        assert_eq!(cpu_per_message(Some(250), 100_000), "2.5");
        assert_eq!(cpu_per_message(None, 100_000), "-");
        assert_eq!(cpu_per_message(Some(250), 0), "-");
    }

    #[test]
    fn disk_writes_are_read_from_proc_io() {
        assert_eq!(
            disk_writes_from("rchar: 10\nwchar: 20\nread_bytes: 0\nwrite_bytes: 4096\n"),
            Some(4096)
        );
        assert_eq!(disk_writes_from("rchar: 10\n"), None);
        assert!(
            process_disk_writes(std::process::id()).is_some(),
            "/proc/self/io on Linux"
        );
    }
}
