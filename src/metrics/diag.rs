//! The recent-window numbers a counter cannot hold, kept beside the counters so that one
//! recording feeds both `GET /metrics` and the status API: the last request latencies of a
//! device ([`LatencyRing`]) and how busy a link was over the last minute ([`BusyWindow`]).
//!
//! Both are arrays of atomics with one writer (the task that owns the device or the link):
//! recording never waits, and a reader copies the slots without stopping it. A reader that
//! races a write sees either the old or the new value of a slot, both real samples.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Latencies kept per device: the summary describes the last this many answers.
pub const LATENCY_SAMPLES: usize = 64;

/// The window of [`BusyWindow::utilisation`], seconds.
pub const BUSY_WINDOW_S: u64 = 60;

/// The last [`LATENCY_SAMPLES`] request latencies, in microseconds.
#[derive(Debug)]
pub struct LatencyRing {
    slots: [AtomicU32; LATENCY_SAMPLES],
    written: AtomicU64,
}

impl Default for LatencyRing {
    fn default() -> Self {
        LatencyRing {
            slots: std::array::from_fn(|_| AtomicU32::new(0)),
            written: AtomicU64::new(0),
        }
    }
}

/// A summary of recent latencies, milliseconds (to the microsecond).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    /// How many answers it describes (at most [`LATENCY_SAMPLES`]).
    pub samples: u32,
    pub last_ms: f64,
    pub min_ms: f64,
    pub mean_ms: f64,
    /// The median (nearest rank).
    pub p50_ms: f64,
    pub max_ms: f64,
}

impl LatencyRing {
    /// One answer after `took` (one writer: the task that owns the device).
    pub fn record(&self, took: Duration) {
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        let written = self.written.load(Ordering::Relaxed);
        self.slots[(written % LATENCY_SAMPLES as u64) as usize].store(micros, Ordering::Relaxed);
        self.written.store(written + 1, Ordering::Release);
    }

    /// The recent latencies, or `None` before the first answer.
    pub fn summary(&self) -> Option<LatencySummary> {
        let written = self.written.load(Ordering::Acquire);
        if written == 0 {
            return None;
        }
        let count = written.min(LATENCY_SAMPLES as u64) as usize;
        let mut samples: Vec<u32> = self.slots[..count]
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .collect();
        let last = samples[((written - 1) % LATENCY_SAMPLES as u64) as usize];
        samples.sort_unstable();
        let ms = |micros: u32| f64::from(micros) / 1000.0;
        let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
        // Nearest rank: the smallest sample with at least half the samples at or below it.
        let median = samples[count.div_ceil(2) - 1];
        Some(LatencySummary {
            samples: count as u32,
            last_ms: ms(last),
            min_ms: ms(samples[0]),
            mean_ms: (sum as f64 / count as f64).round() / 1000.0,
            p50_ms: ms(median),
            max_ms: ms(samples[count - 1]),
        })
    }
}

/// Busy time per second over the last [`BUSY_WINDOW_S`] seconds: one slot per second of
/// the link's life (modulo the window), each holding that second's number (plus one, so
/// that an empty slot is 0) and the microseconds of busy time of requests that ended in it.
#[derive(Debug)]
pub struct BusyWindow {
    origin: Instant,
    slots: [AtomicU64; BUSY_WINDOW_S as usize],
}

impl Default for BusyWindow {
    fn default() -> Self {
        BusyWindow {
            origin: Instant::now(),
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl BusyWindow {
    /// A request that kept the link busy for `busy` ended now (one writer: the bus task).
    pub fn record(&self, busy: Duration) {
        self.record_at(self.origin.elapsed(), busy);
    }

    /// The fraction of the last minute (or of the link's life, when shorter) the link was
    /// busy, 0 to 1.
    pub fn utilisation(&self) -> f64 {
        self.utilisation_at(self.origin.elapsed())
    }

    /// [`BusyWindow::record`] at `at` since the window was made.
    fn record_at(&self, at: Duration, busy: Duration) {
        let second = at.as_secs();
        let slot = &self.slots[(second % BUSY_WINDOW_S) as usize];
        let tag = (second + 1) & u64::from(u32::MAX);
        let current = slot.load(Ordering::Relaxed);
        let micros = u64::try_from(busy.as_micros()).unwrap_or(u64::MAX);
        let held = if current >> 32 == tag {
            current & u64::from(u32::MAX)
        } else {
            0
        };
        let total = (held + micros).min(u64::from(u32::MAX));
        slot.store(tag << 32 | total, Ordering::Relaxed);
    }

    /// [`BusyWindow::utilisation`] at `now` since the window was made. The window is the
    /// current second and the 59 before it; a request counts in the second it ended.
    fn utilisation_at(&self, now: Duration) -> f64 {
        let now_s = now.as_secs();
        let first = now_s.saturating_sub(BUSY_WINDOW_S - 1);
        let span = now.saturating_sub(Duration::from_secs(first)).as_secs_f64();
        if span <= 0.0 {
            return 0.0;
        }
        let busy_micros: u64 = self
            .slots
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter_map(|value| {
                let second = (value >> 32).checked_sub(1)?;
                (first..=now_s)
                    .contains(&second)
                    .then_some(value & u64::from(u32::MAX))
            })
            .sum();
        (busy_micros as f64 / 1e6 / span).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn no_latency_summary_before_the_first_answer() {
        assert_eq!(LatencyRing::default().summary(), None);
    }

    #[test]
    fn the_latency_summary_is_last_min_mean_median_and_max() {
        let ring = LatencyRing::default();
        for took in [ms(4), ms(1), Duration::from_micros(2500), ms(10)] {
            ring.record(took);
        }
        let summary = ring.summary().expect("samples");
        assert_eq!(
            summary,
            LatencySummary {
                samples: 4,
                last_ms: 10.0,
                min_ms: 1.0,
                mean_ms: 4.375,
                p50_ms: 2.5,
                max_ms: 10.0,
            }
        );
    }

    #[test]
    fn the_latency_summary_describes_only_the_last_64_answers() {
        let ring = LatencyRing::default();
        // 100 slow answers, then 64 fast ones: the slow ones are gone.
        for _ in 0..100 {
            ring.record(ms(500));
        }
        for n in 1..=64 {
            ring.record(ms(n));
        }
        let summary = ring.summary().expect("samples");
        assert_eq!(summary.samples, 64);
        assert_eq!(summary.last_ms, 64.0);
        assert_eq!(summary.min_ms, 1.0);
        assert_eq!(summary.max_ms, 64.0);
        assert_eq!(summary.p50_ms, 32.0);
        assert_eq!(summary.mean_ms, 32.5);
    }

    #[test]
    fn utilisation_is_busy_time_over_the_life_of_a_young_link() {
        let window = BusyWindow::default();
        assert_eq!(window.utilisation_at(Duration::ZERO), 0.0);
        window.record_at(ms(500), ms(250));
        assert_eq!(window.utilisation_at(ms(1000)), 0.25);
        // Two requests in one second add up.
        window.record_at(ms(1200), ms(100));
        window.record_at(ms(1900), ms(150));
        assert_eq!(window.utilisation_at(ms(2000)), 0.25);
    }

    #[test]
    fn utilisation_covers_the_current_second_and_the_59_before() {
        let window = BusyWindow::default();
        window.record_at(ms(10_200), ms(500));
        // Window 10..=69 s: 59.5 s long, 0.5 s busy.
        assert_eq!(window.utilisation_at(ms(69_500)), 0.5 / 59.5);
        // Window 11..=70 s: the request at 10.2 s has left it.
        assert_eq!(window.utilisation_at(ms(70_000)), 0.0);
    }

    #[test]
    fn a_slot_a_minute_later_starts_from_zero() {
        let window = BusyWindow::default();
        window.record_at(ms(500), ms(900));
        window.record_at(ms(60_500), ms(100));
        assert_eq!(window.utilisation_at(ms(60_750)), 0.1 / 59.75);
    }

    #[test]
    fn utilisation_never_exceeds_one() {
        let window = BusyWindow::default();
        // A 3 s timeout ends in the first second it is counted in.
        window.record_at(ms(2_000), ms(3_000));
        assert_eq!(window.utilisation_at(ms(2_500)), 1.0);
    }
}
