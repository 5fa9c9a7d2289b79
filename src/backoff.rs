//! Retry delays for everything that reconnects (Modbus links and devices, serial ports,
//! uplinks): doubling from a minimum up to a maximum, each drawn with random jitter so that
//! devices and gateways that failed together do not retry together.

use std::time::Duration;

use rand::Rng;

/// How a delay is drawn around its nominal value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Jitter {
    /// Uniformly from 75 % to 125 % of the nominal delay (never past the maximum).
    Quarter,
    /// Uniformly from half the nominal delay to all of it: never later than nominal.
    UpToHalf,
}

impl Jitter {
    fn factor(self) -> f64 {
        match self {
            Jitter::Quarter => rand::rng().random_range(0.75..=1.25),
            Jitter::UpToHalf => rand::rng().random_range(0.5..=1.0),
        }
    }
}

/// The delays between attempts, from the first failure to the next success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    jitter: Jitter,
    /// The nominal delay last drawn; `None` before the first failure.
    current: Option<Duration>,
}

impl Backoff {
    /// Delays from `min` doubling to `max` (raised to `min` if it is below).
    pub(crate) fn new(min: Duration, max: Duration, jitter: Jitter) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            jitter,
            current: None,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let nominal = match self.current {
            None => self.min,
            Some(current) => current.saturating_mul(2).min(self.max),
        };
        self.current = Some(nominal);
        nominal.mul_f64(self.jitter.factor()).min(self.max)
    }

    /// Start again from `min` (after a success).
    pub(crate) fn reset(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter() {
        let mut backoff = Backoff::new(ms(100), ms(400), Jitter::Quarter);
        let nominal = [100u64, 200, 400, 400, 400];
        for nominal in nominal.map(ms) {
            let wait = backoff.next_delay();
            assert!(
                wait >= nominal.mul_f64(0.75) && wait <= nominal.mul_f64(1.25),
                "{wait:?} vs {nominal:?}"
            );
            assert!(wait <= ms(400), "{wait:?} is past the maximum");
        }
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(ms(1000), ms(8000), Jitter::UpToHalf);
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= ms(500) && delays[0] <= ms(1000));
        assert!(delays[3] >= ms(4000) && delays[3] <= ms(8000));
        assert!(delays[5] <= ms(8000));
        backoff.reset();
        assert!(backoff.next_delay() <= ms(1000));
    }

    #[test]
    fn a_maximum_below_the_minimum_is_raised_to_it() {
        let mut backoff = Backoff::new(ms(300), ms(100), Jitter::UpToHalf);
        for _ in 0..4 {
            let wait = backoff.next_delay();
            assert!(wait >= ms(150) && wait <= ms(300), "{wait:?}");
        }
    }
}
