//! A publisher's acknowledgement shared between the stores its message goes to: the
//! promise that it is committed everywhere it must be. The broker makes it; the broker's
//! store and the uplinks' outboxes keep it.
//!
//! With `durability = "sync"`, a QoS 1/2 publish is acknowledged only once every store that
//! must hold it has committed: the broker's own store (persistent sessions, retained) and
//! the outbox of every uplink that asked for it (an internal subscription with `commit`).
//! Each of them holds an [`AckShare`]; the acknowledgement is sent when the last share is
//! gone, and only if every share was released with [`AckShare::stored`]. A share dropped
//! without it (a failed commit, a subscriber that stopped) withholds the acknowledgement:
//! the publisher's connection then closes and its client sends the message again.
//!
//! Nothing is allocated for a publish that no such subscriber matches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

/// One store's share of a publisher's acknowledgement. Release it with
/// [`stored`](Self::stored) once the message is committed (or needs no storing: expired,
/// matched by no durable route, refused by a bound and counted). Dropping it instead means
/// "not stored": the publisher gets no acknowledgement.
#[derive(Debug)]
pub struct AckShare {
    state: Option<Arc<AckState>>,
}

#[derive(Debug)]
struct AckState {
    /// Answered with whether the message matched any subscriber.
    reply: Option<oneshot::Sender<bool>>,
    matched: bool,
    failed: AtomicBool,
}

impl Drop for AckState {
    fn drop(&mut self) {
        // The last share is gone (`Arc` makes every share's writes visible here).
        if !*self.failed.get_mut() {
            if let Some(reply) = self.reply.take() {
                let _ = reply.send(self.matched);
            }
        }
    }
}

impl AckShare {
    /// The first share of the acknowledgement `reply`; more with [`share`](Self::share).
    pub(crate) fn new(reply: oneshot::Sender<bool>, matched: bool) -> AckShare {
        AckShare {
            state: Some(Arc::new(AckState {
                reply: Some(reply),
                matched,
                failed: AtomicBool::new(false),
            })),
        }
    }

    /// Another share of the same acknowledgement.
    pub(crate) fn share(&self) -> AckShare {
        AckShare {
            state: self.state.clone(),
        }
    }

    /// This store has committed the message (or has decided it needs no storing).
    pub fn stored(mut self) {
        self.state = None;
    }
}

impl Drop for AckShare {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.failed.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acknowledgement_waits_for_every_share() {
        let (tx, mut rx) = oneshot::channel();
        let first = AckShare::new(tx, true);
        let second = first.share();
        first.stored();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        second.stored();
        assert_eq!(rx.try_recv().ok(), Some(true));
    }

    #[test]
    fn a_share_dropped_without_storing_withholds_the_acknowledgement() {
        let (tx, mut rx) = oneshot::channel();
        let first = AckShare::new(tx, false);
        let second = first.share();
        drop(second);
        first.stored();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }
}
