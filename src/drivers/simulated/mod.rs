//! The simulated device: points that follow waveforms (sine, ramp, random walk, constant),
//! so the gateway does something real with no hardware. A write to a writable point
//! replaces its waveform with the written value.

pub mod config;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DeviceContext, DeviceStatus};
use crate::model::{Quality, Reading, Value, WriteOutcome};
use config::{SimulatedConfig, SimulatedPoint, Waveform};

/// One point's generator state.
#[derive(Debug, Clone)]
struct Generator {
    waveform: Waveform,
    walk: f64,
}

impl Generator {
    fn new(point: &SimulatedPoint) -> Generator {
        let walk = match &point.waveform {
            Waveform::RandomWalk { min, max, .. } => (min + max) / 2.0,
            _ => 0.0,
        };
        Generator {
            waveform: point.waveform.clone(),
            walk,
        }
    }

    /// The value at `elapsed` since the device started.
    fn sample(&mut self, elapsed: Duration, rng: &mut impl Rng) -> Value {
        match &self.waveform {
            Waveform::Sine { min, max, period } => {
                let phase = fraction_of_period(elapsed, *period) * std::f64::consts::TAU;
                Value::Float(round3(min + (max - min) * (0.5 + 0.5 * phase.sin())))
            }
            Waveform::Ramp { min, max, period } => Value::Float(round3(
                min + (max - min) * fraction_of_period(elapsed, *period),
            )),
            Waveform::RandomWalk { min, max, step } => {
                let delta = rng.random_range(-1.0..=1.0) * step;
                self.walk = (self.walk + delta).clamp(*min, *max);
                Value::Float(round3(self.walk))
            }
            Waveform::Constant { value } => value.clone(),
        }
    }
}

fn fraction_of_period(elapsed: Duration, period: Duration) -> f64 {
    let period = period.as_secs_f64();
    if period <= 0.0 {
        return 0.0;
    }
    (elapsed.as_secs_f64() % period) / period
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) async fn run(
    config: SimulatedConfig,
    poll: Duration,
    context: DeviceContext,
    shutdown: CancellationToken,
) {
    let mut generators: HashMap<String, Generator> = config
        .points
        .iter()
        .map(|p| (p.name.clone(), Generator::new(p)))
        .collect();
    let writable: Vec<&str> = config
        .points
        .iter()
        .filter(|p| p.writable)
        .map(|p| p.name.as_str())
        .collect();
    let mut writes = if writable.is_empty() {
        None
    } else {
        match context.subscribe_writes(&writable).await {
            Ok(subscription) => Some(subscription),
            Err(error) => {
                tracing::error!(device = %context.device, %error, "cannot subscribe to writes");
                None
            }
        }
    };
    if let Err(error) = context.publish_status(&DeviceStatus::Online).await {
        tracing::warn!(device = %context.device, %error, "cannot publish status");
    }

    let started = Instant::now();
    let mut ticker = tokio::time::interval(poll.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut rng = StdRng::from_os_rng();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                let elapsed = started.elapsed();
                context.metrics().poll();
                context.metrics().points(config.points.len(), 0);
                for point in &config.points {
                    let Some(generator) = generators.get_mut(&point.name) else { continue };
                    let reading = Reading {
                        device: context.device.clone(),
                        point: point.name.clone(),
                        value: Some(generator.sample(elapsed, &mut rng)),
                        quality: Quality::Good,
                        timestamp: SystemTime::now(),
                    };
                    if context.publish_reading(&reading).await.is_err() {
                        return; // the broker is gone: we are shutting down
                    }
                }
            }
            Some(message) = next_write(&mut writes) => {
                let request = match context.parse_write(&message, &writable) {
                    Ok(request) => request,
                    Err(reason) => {
                        tracing::warn!(device = %context.device, topic = %message.topic, %reason, "bad write");
                        continue;
                    }
                };
                if let Some(generator) = generators.get_mut(&request.point) {
                    generator.waveform = Waveform::Constant { value: request.value.clone() };
                }
                tracing::info!(device = %context.device, point = %request.point, value = %request.value, "point written");
                let outcome = WriteOutcome::Ok { value: request.value.clone() };
                let _ = context.publish_write_result(&request, &outcome).await;
                let reading = Reading {
                    device: context.device.clone(),
                    point: request.point.clone(),
                    value: Some(request.value.clone()),
                    quality: Quality::Good,
                    timestamp: SystemTime::now(),
                };
                let _ = context.publish_reading(&reading).await;
            }
        }
    }
}

async fn next_write(
    writes: &mut Option<crate::broker::bus::InternalSubscription>,
) -> Option<crate::model::Message> {
    match writes {
        Some(subscription) => subscription.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(waveform: Waveform) -> SimulatedPoint {
        SimulatedPoint {
            name: "p".into(),
            waveform,
            writable: false,
            unit: None,
        }
    }

    #[test]
    fn waveforms_stay_within_their_bounds() {
        let mut rng = rand::rng();
        let period = Duration::from_secs(10);
        let mut sine = Generator::new(&point(Waveform::Sine {
            min: 1.0,
            max: 3.0,
            period,
        }));
        let mut ramp = Generator::new(&point(Waveform::Ramp {
            min: 0.0,
            max: 10.0,
            period,
        }));
        let mut walk = Generator::new(&point(Waveform::RandomWalk {
            min: 0.0,
            max: 1.0,
            step: 0.5,
        }));
        for second in 0..100 {
            let at = Duration::from_millis(second * 370);
            let s = sine.sample(at, &mut rng).as_f64().expect("number");
            let r = ramp.sample(at, &mut rng).as_f64().expect("number");
            let w = walk.sample(at, &mut rng).as_f64().expect("number");
            assert!((1.0..=3.0).contains(&s), "sine {s}");
            assert!((0.0..10.0).contains(&r), "ramp {r}");
            assert!((0.0..=1.0).contains(&w), "walk {w}");
        }
        assert_eq!(
            ramp.sample(Duration::from_secs(5), &mut rng),
            Value::Float(5.0)
        );
        assert_eq!(
            sine.sample(Duration::from_millis(2500), &mut rng),
            Value::Float(3.0)
        );
    }
}
