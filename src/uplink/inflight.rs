//! Which outbox row a packet id belongs to.
//!
//! rumqttc's `publish()` returns no packet id. It reports `Outgoing::Publish(pkid)` when it
//! writes a PUBLISH, in the order the requests were submitted. The sender is the only task
//! that submits publishes on its client, so the n-th `Published` event belongs to the n-th
//! submission: a FIFO of submissions gives the mapping. After a connection error the FIFO
//! is cleared together with rumqttc's pending publishes (see `link`).
//!
//! The window counts a row from its submission until its deletion has COMMITTED, so a crash
//! resends at most `window` rows that the cloud already had.

use std::collections::{HashMap, VecDeque};

use crate::model::QoS;

/// A publish submitted to rumqttc and not yet written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Submitted {
    /// `None` for publishes that are not outbox rows (birth, offline, non-durable routes).
    seq: Option<u64>,
    qos: QoS,
}

/// What a `Published` event completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// A QoS 1/2 publish: now waiting for its acknowledgement.
    AwaitingAck,
    /// A QoS 0 outbox row: done once written (there is no acknowledgement).
    Row(u64),
    /// A QoS 0 publish that is not a row.
    Other,
}

#[derive(Debug, Default)]
pub(super) struct Inflight {
    submitted: VecDeque<Submitted>,
    /// pkid → seq (`None`: not a row).
    awaiting: HashMap<u16, Option<u64>>,
    /// Rows whose deletion is not yet committed (acked, or being deleted).
    settling: usize,
    /// Rows among `submitted` and `awaiting`.
    rows_unacked: usize,
}

impl Inflight {
    /// Rows occupying the window.
    pub(super) fn rows(&self) -> usize {
        self.rows_unacked + self.settling
    }

    /// Publishes not yet acknowledged (rows or not).
    pub(super) fn unacknowledged(&self) -> usize {
        self.submitted.len() + self.awaiting.len()
    }

    pub(super) fn submit(&mut self, seq: Option<u64>, qos: QoS) {
        self.rows_unacked += usize::from(seq.is_some());
        self.submitted.push_back(Submitted { seq, qos });
    }

    /// rumqttc wrote the next publish with `pkid`.
    pub(super) fn written(&mut self, pkid: u16) -> Option<Written> {
        let submitted = self.submitted.pop_front()?;
        if submitted.qos == QoS::AtMostOnce || pkid == 0 {
            return Some(match submitted.seq {
                Some(seq) => {
                    self.rows_unacked -= 1;
                    self.settling += 1;
                    Written::Row(seq)
                }
                None => Written::Other,
            });
        }
        self.awaiting.insert(pkid, submitted.seq);
        Some(Written::AwaitingAck)
    }

    /// The cloud acknowledged `pkid`. Returns the row, if it was one; the row then occupies
    /// the window until [`Inflight::settled`] is called for it.
    pub(super) fn acked(&mut self, pkid: u16) -> Option<Option<u64>> {
        let seq = self.awaiting.remove(&pkid)?;
        if seq.is_some() {
            self.rows_unacked -= 1;
            self.settling += 1;
        }
        Some(seq)
    }

    /// `count` rows' deletions committed (or failed: they will be resent).
    pub(super) fn settled(&mut self, count: usize) {
        self.settling = self.settling.saturating_sub(count);
    }

    /// The connection is gone: nothing submitted will be acknowledged any more. Rows being
    /// settled stay counted until their deletion commits.
    pub(super) fn reset(&mut self) {
        self.submitted.clear();
        self.awaiting.clear();
        self.rows_unacked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_map_to_rows_in_submission_order() {
        let mut inflight = Inflight::default();
        inflight.submit(None, QoS::AtLeastOnce); // birth
        inflight.submit(Some(10), QoS::AtLeastOnce);
        inflight.submit(Some(11), QoS::AtLeastOnce);
        inflight.submit(Some(12), QoS::AtMostOnce);
        assert_eq!(inflight.rows(), 3);
        assert_eq!(inflight.written(1), Some(Written::AwaitingAck));
        assert_eq!(inflight.written(2), Some(Written::AwaitingAck));
        assert_eq!(inflight.written(3), Some(Written::AwaitingAck));
        assert_eq!(inflight.written(0), Some(Written::Row(12)));
        // Acks out of order still find their rows.
        assert_eq!(inflight.acked(3), Some(Some(11)));
        assert_eq!(inflight.acked(1), Some(None));
        assert_eq!(inflight.acked(2), Some(Some(10)));
        assert_eq!(inflight.acked(2), None);
        assert_eq!(
            inflight.rows(),
            3,
            "rows count until their deletion commits"
        );
        inflight.settled(3);
        assert_eq!(inflight.rows(), 0);
    }

    #[test]
    fn a_reset_forgets_unacknowledged_publishes_but_not_rows_being_deleted() {
        let mut inflight = Inflight::default();
        inflight.submit(Some(1), QoS::AtLeastOnce);
        inflight.submit(Some(2), QoS::AtLeastOnce);
        inflight.written(1);
        inflight.acked(1);
        inflight.written(2);
        inflight.reset();
        assert_eq!(inflight.rows(), 1);
        assert_eq!(inflight.unacknowledged(), 0);
        // Packet id 2 is reused on the next connection for another row.
        inflight.submit(Some(2), QoS::AtLeastOnce);
        inflight.written(2);
        assert_eq!(inflight.acked(2), Some(Some(2)));
    }
}
