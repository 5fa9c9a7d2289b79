//! Which readings of a point are published: every poll or on change (with an absolute or
//! percent deadband), never more often than `min_interval`, and at least every
//! `max_interval` (heartbeat). A change of quality (good to bad, or a new reason) is always
//! published at once.

use std::time::Duration;

use tokio::time::Instant;

use super::config::{Deadband, Point, Report};
use crate::model::{Quality, Value};

#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    report: Report,
    min_interval: Duration,
    max_interval: Option<Duration>,
    last: Option<Published>,
}

#[derive(Debug, Clone)]
struct Published {
    value: Option<Value>,
    quality: Quality,
    at: Instant,
}

impl Reporter {
    pub(crate) fn new(point: &Point) -> Reporter {
        Reporter {
            report: point.report,
            min_interval: point.min_interval,
            max_interval: point.max_interval,
            last: None,
        }
    }

    /// Whether a reading taken at `now` is published; if so it becomes the last published.
    pub(crate) fn offer(&mut self, value: &Option<Value>, quality: &Quality, now: Instant) -> bool {
        if self.decide(value, quality, now) {
            self.record(value, quality, now);
            true
        } else {
            false
        }
    }

    /// Records a reading published regardless of the rules (the read-back after a write).
    pub(crate) fn record(&mut self, value: &Option<Value>, quality: &Quality, now: Instant) {
        self.last = Some(Published {
            value: value.clone(),
            quality: quality.clone(),
            at: now,
        });
    }

    fn decide(&self, value: &Option<Value>, quality: &Quality, now: Instant) -> bool {
        let Some(last) = &self.last else {
            return true;
        };
        if last.quality != *quality {
            return true;
        }
        let elapsed = now.saturating_duration_since(last.at);
        if self.max_interval.is_some_and(|max| elapsed >= max) {
            return true;
        }
        if elapsed < self.min_interval {
            return false;
        }
        match self.report {
            Report::Always => true,
            Report::Change(deadband) => changed(&last.value, value, deadband),
        }
    }
}

fn changed(old: &Option<Value>, new: &Option<Value>, deadband: Deadband) -> bool {
    let (Some(old), Some(new)) = (old, new) else {
        return old != new;
    };
    let numbers = match (old, new) {
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => {
            old.as_f64().zip(new.as_f64())
        }
        _ => None,
    };
    let Some((a, b)) = numbers else {
        return old != new;
    };
    let delta = (b - a).abs();
    match deadband {
        Deadband::None => old != new,
        Deadband::Absolute(band) => delta > band,
        Deadband::Percent(percent) => delta > a.abs() * percent / 100.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::modbus::config::{DataType, Order, Table};

    fn reporter(report: Report, min: u64, max: Option<u64>) -> Reporter {
        Reporter::new(&Point {
            name: "p".into(),
            table: Table::Holding,
            address: 0,
            data_type: DataType::F32,
            order: Order::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            poll: None,
            report,
            min_interval: Duration::from_secs(min),
            max_interval: max.map(Duration::from_secs),
            writable: false,
        })
    }

    /// Offers `values` one second apart and returns the seconds at which one was published.
    fn published(mut reporter: Reporter, values: &[f64]) -> Vec<usize> {
        let start = Instant::now();
        values
            .iter()
            .enumerate()
            .filter(|(second, value)| {
                let at = start + Duration::from_secs(*second as u64);
                reporter.offer(&Some(Value::Float(**value)), &Quality::Good, at)
            })
            .map(|(second, _)| second)
            .collect()
    }

    #[test]
    fn absolute_deadband_publishes_only_larger_changes() {
        let r = reporter(Report::Change(Deadband::Absolute(0.5)), 0, None);
        assert_eq!(
            published(r, &[10.0, 10.4, 10.5, 10.6, 11.0, 11.2]),
            vec![0, 3, 5]
        );
    }

    #[test]
    fn percent_deadband_is_relative_to_the_last_published_value() {
        let r = reporter(Report::Change(Deadband::Percent(10.0)), 0, None);
        assert_eq!(
            published(r, &[100.0, 109.0, 111.0, 121.0, 123.0]),
            vec![0, 2, 4]
        );
    }

    #[test]
    fn min_interval_holds_back_and_heartbeat_repeats() {
        let r = reporter(Report::Always, 3, None);
        assert_eq!(published(r, &[1.0; 7]), vec![0, 3, 6]);
        let r = reporter(Report::Change(Deadband::None), 0, Some(4));
        assert_eq!(published(r, &[1.0; 9]), vec![0, 4, 8]);
        let r = reporter(Report::Change(Deadband::None), 2, Some(5));
        assert_eq!(
            published(r, &[1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]),
            vec![0, 2, 7]
        );
    }

    #[test]
    fn quality_changes_are_published_at_once() {
        let mut r = reporter(Report::Change(Deadband::None), 10, None);
        let start = Instant::now();
        let good = Some(Value::Float(1.0));
        assert!(r.offer(&good, &Quality::Good, start));
        let bad = Quality::Bad("timeout".into());
        assert!(r.offer(&None, &bad, start + Duration::from_secs(1)));
        assert!(!r.offer(&None, &bad, start + Duration::from_secs(2)));
        assert!(r.offer(&good, &Quality::Good, start + Duration::from_secs(3)));
    }
}
