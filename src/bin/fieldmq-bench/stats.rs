//! Percentiles of wall times, shared by the benches that time single operations (`disk`,
//! `wake`).

use std::time::Duration;

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The value at fraction `p` (0.0-1.0) of an ascending slice, at the nearest index; 0 when
/// empty.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
