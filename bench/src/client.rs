//! The MQTT client side of the benches (rumqttc): bounded waits for CONNACK and SUBACK,
//! and the clock a payload carries.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{Event, EventLoop, Packet};

/// After the last publish, how long subscribers may stay silent before a row ends: a
/// broker that sends nothing for this long has sent all it will.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Poll until CONNACK (bounded); a refusal is an error.
pub(crate) async fn connect(eventloop: &mut EventLoop, who: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .with_context(|| format!("{who}: no CONNACK within 10 s"))?
            .with_context(|| format!("{who}: connection failed"))?;
        if let Event::Incoming(Packet::ConnAck(ack)) = ev {
            if ack.code != rumqttc::ConnectReturnCode::Success {
                bail!("{who}: connection refused: {:?}", ack.code);
            }
            return Ok(());
        }
    }
}

/// Poll until the SUBACK of the one subscription sent, by `deadline`; a refusal is an error.
pub(crate) async fn await_suback(
    eventloop: &mut EventLoop,
    who: &str,
    deadline: tokio::time::Instant,
) -> Result<()> {
    loop {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .with_context(|| format!("{who}: no SUBACK in time"))??;
        if let Event::Incoming(Packet::SubAck(ack)) = ev {
            if ack
                .return_codes
                .iter()
                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
            {
                bail!("{who}: subscription refused");
            }
            return Ok(());
        }
    }
}

/// Nanoseconds since `epoch`, as a payload header carries its send time.
pub(crate) fn now_ns(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The big-endian number in the first 8 bytes of a payload; `None` for a shorter one.
pub(crate) fn leading_u64(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// `--qos`: the QoS level(s) a bench runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QosArg {
    #[value(name = "0")]
    Zero,
    #[value(name = "1")]
    One,
    Both,
}

impl QosArg {
    pub(crate) fn levels(self) -> Vec<rumqttc::QoS> {
        match self {
            QosArg::Zero => vec![rumqttc::QoS::AtMostOnce],
            QosArg::One => vec![rumqttc::QoS::AtLeastOnce],
            QosArg::Both => vec![rumqttc::QoS::AtMostOnce, rumqttc::QoS::AtLeastOnce],
        }
    }
}
