//! The figures every bench reports the same way: latency percentiles (one definition, from
//! an HDR histogram), rates, and the median of per-round ratios.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Significant decimal digits the histogram keeps: values below 2,048 µs are exact, larger
/// ones within 0.1%.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Recorded durations, microseconds. A percentile is the nearest-rank one: the smallest
/// recorded value that at least that share of the values does not exceed.
#[derive(Clone)]
pub(crate) struct Latencies {
    histogram: Histogram<u64>,
}

impl Latencies {
    pub(crate) fn new() -> Latencies {
        Latencies {
            // Auto-resizing, so no value is ever out of range.
            histogram: Histogram::new(SIGNIFICANT_DIGITS)
                .expect("3 significant digits is a valid histogram precision"),
        }
    }

    pub(crate) fn record_us(&mut self, us: u64) {
        // `record` grows the histogram to fit (`saturating_record` would clamp to its current
        // range instead); only a value beyond what any histogram can track is clamped.
        if self.histogram.record(us).is_err() {
            self.histogram.saturating_record(us);
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        self.record_us(micros(d));
    }

    /// Adds everything `other` recorded (another client's share of the same row).
    pub(crate) fn merge(&mut self, other: &Latencies) {
        // Both auto-resize, so adding cannot run out of range.
        let _ = self.histogram.add(&other.histogram);
    }

    pub(crate) fn len(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at percent `p` (0-100) in µs; `None` when nothing was recorded.
    pub(crate) fn percentile(&self, p: f64) -> Option<u64> {
        (self.len() > 0).then(|| self.histogram.value_at_percentile(p))
    }

    /// The largest value recorded, µs; `None` when nothing was recorded.
    pub(crate) fn max(&self) -> Option<u64> {
        (self.len() > 0).then(|| self.histogram.max())
    }
}

impl FromIterator<u64> for Latencies {
    fn from_iter<I: IntoIterator<Item = u64>>(values: I) -> Latencies {
        let mut latencies = Latencies::new();
        values.into_iter().for_each(|us| latencies.record_us(us));
        latencies
    }
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `n` per second over `d`; 0 for an empty interval.
pub(crate) fn per_sec(n: u64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// The middle value (the mean of the two middle ones for an even count).
pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 0 => Some((values[mid - 1] + values[mid]) / 2.0),
        _ => Some(values[mid]),
    }
}

/// A latency for a table: µs below 1 ms, then ms; "-" when unknown.
pub(crate) fn fmt_us(v: Option<u64>) -> String {
    match v {
        None => "-".to_string(),
        Some(us) if us >= 10_000 => format!("{:.0} ms", us as f64 / 1000.0),
        Some(us) if us >= 1000 => format!("{:.1} ms", us as f64 / 1000.0),
        Some(us) => format!("{us} µs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let latencies: Latencies = (1..=100).collect();
        assert_eq!(latencies.percentile(50.0), Some(50));
        assert_eq!(latencies.percentile(90.0), Some(90));
        assert_eq!(latencies.percentile(99.0), Some(99));
        assert_eq!(latencies.max(), Some(100));
        assert_eq!(Latencies::new().percentile(50.0), None);
    }

    #[test]
    fn values_far_above_the_initial_range_are_kept() {
        let latencies: Latencies = [5, 250_000, 30_000_000].into_iter().collect();
        // Within the histogram's 0.1%.
        let median = latencies.percentile(50.0);
        assert!(
            median.is_some_and(|v| v.abs_diff(250_000) <= 250),
            "{median:?}"
        );
        assert!(latencies.max().is_some_and(|max| max >= 30_000_000));
    }

    #[test]
    fn merged_histograms_count_both_shares() {
        let mut a: Latencies = [10, 20].into_iter().collect();
        a.merge(&[30, 40].into_iter().collect());
        assert_eq!(a.len(), 4);
        assert_eq!(a.percentile(100.0), Some(40));
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
