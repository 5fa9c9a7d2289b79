//! How long the store's commits take: a fixed-bucket histogram in atomics that the writer
//! thread records into once per commit and anyone may read at any time (the metrics do,
//! at scrape time). No lock: the writer never waits for a reader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, microseconds: from a commit without fsync to a slow SD
/// card's.
pub const BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Commit durations so far.
#[derive(Debug, Default)]
pub struct CommitTimes {
    /// Commits at or below each bound (not cumulative; the snapshot adds them up).
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// A reading of [`CommitTimes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitTimesSnapshot {
    /// `(upper bound µs, commits at or below it)`, cumulative as Prometheus wants them.
    pub buckets: Vec<(u64, u64)>,
    pub count: u64,
    pub sum_us: u64,
}

impl CommitTimes {
    /// One commit that took `took`.
    pub fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if let Some(index) = BUCKETS_US.iter().position(|bound| us <= *bound) {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CommitTimesSnapshot {
        let mut cumulative = 0;
        let buckets = BUCKETS_US
            .iter()
            .zip(&self.buckets)
            .map(|(bound, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        CommitTimesSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_slow_commits_count_only_in_the_total() {
        let times = CommitTimes::default();
        times.record(Duration::from_micros(80));
        times.record(Duration::from_micros(300));
        times.record(Duration::from_secs(3));
        let snapshot = times.snapshot();
        assert_eq!(snapshot.count, 3);
        assert_eq!(snapshot.sum_us, 3_000_380);
        assert_eq!(snapshot.buckets[0], (100, 1));
        assert_eq!(snapshot.buckets[2], (500, 2));
        assert_eq!(snapshot.buckets.last(), Some(&(1_000_000, 2)));
    }
}
