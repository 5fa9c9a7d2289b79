//! Which outbox row a packet id belongs to, and how far the queue is acknowledged.
//!
//! rumqttc's `publish()` returns no packet id. It reports `Outgoing::Publish(pkid)` when it
//! writes a PUBLISH, in the order the requests were submitted. The sender is the only task
//! that submits publishes on its client, so the n-th `Published` event belongs to the n-th
//! submission: a FIFO of submissions gives the mapping. After a connection error the FIFO
//! is cleared together with rumqttc's pending publishes (see `link`).
//!
//! Rows are passed in `seq` order (submitted, or skipped because they can never be sent).
//! The *mark* is the highest seq such that every row up to it is resolved (acknowledged,
//! written for QoS 0, refused, or skipped); it is written to the outbox's ack mark file,
//! and rows up to it are never sent again. A row occupies the window from the moment it is
//! passed until a mark covering it has been written, so a crash resends at most `window`
//! rows that the cloud already had.

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
    /// Rows passed and not yet covered by a mark, in seq order, with "resolved".
    rows: VecDeque<(u64, bool)>,
    /// Rows covered by the mark being written.
    marking: usize,
    /// Every row up to here is resolved.
    mark: u64,
}

impl Inflight {
    pub(super) fn new(mark: u64) -> Inflight {
        Inflight {
            mark,
            ..Inflight::default()
        }
    }

    /// Rows occupying the window.
    pub(super) fn rows(&self) -> usize {
        self.rows.len() + self.marking
    }

    /// Publishes not yet acknowledged (rows or not).
    pub(super) fn unacknowledged(&self) -> usize {
        self.submitted.len() + self.awaiting.len()
    }

    /// The highest seq up to which every row is resolved.
    pub(super) fn mark(&self) -> u64 {
        self.mark
    }

    pub(super) fn submit(&mut self, seq: Option<u64>, qos: QoS) {
        if let Some(seq) = seq {
            self.rows.push_back((seq, false));
        }
        self.submitted.push_back(Submitted { seq, qos });
    }

    /// A row that will not be sent (it is discarded and counted elsewhere).
    pub(super) fn skip(&mut self, seq: u64) {
        self.rows.push_back((seq, true));
    }

    /// rumqttc wrote the next publish with `pkid`.
    pub(super) fn written(&mut self, pkid: u16) -> Option<Written> {
        let submitted = self.submitted.pop_front()?;
        if submitted.qos == QoS::AtMostOnce || pkid == 0 {
            return Some(match submitted.seq {
                Some(seq) => {
                    self.resolve(seq);
                    Written::Row(seq)
                }
                None => Written::Other,
            });
        }
        self.awaiting.insert(pkid, submitted.seq);
        Some(Written::AwaitingAck)
    }

    /// The cloud acknowledged `pkid`. Returns the row, if it was one.
    pub(super) fn acked(&mut self, pkid: u16) -> Option<Option<u64>> {
        let seq = self.awaiting.remove(&pkid)?;
        if let Some(seq) = seq {
            self.resolve(seq);
        }
        Some(seq)
    }

    fn resolve(&mut self, seq: u64) {
        // Acknowledgements come in order almost always: the row is at the front.
        if let Some(entry) = self.rows.iter_mut().find(|(s, _)| *s == seq) {
            entry.1 = true;
        }
    }

    /// Advance the mark over the resolved rows at the front. Returns the new mark and how
    /// many rows it covers; call [`Inflight::marked`] with that count once it is written.
    pub(super) fn advance(&mut self) -> Option<(u64, usize)> {
        let mut count = 0;
        while let Some(&(seq, true)) = self.rows.front() {
            self.rows.pop_front();
            self.mark = self.mark.max(seq);
            count += 1;
        }
        if count == 0 {
            return None;
        }
        self.marking += count;
        Some((self.mark, count))
    }

    /// A mark covering `count` rows was written (or failed: the rows are sent again after a
    /// restart, which the window then no longer bounds; the error is logged).
    pub(super) fn marked(&mut self, count: usize) {
        self.marking = self.marking.saturating_sub(count);
    }

    /// The connection is gone: nothing submitted will be acknowledged any more, and rows
    /// after the mark will be read and sent again.
    pub(super) fn reset(&mut self) {
        self.submitted.clear();
        self.awaiting.clear();
        self.rows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_map_to_rows_in_submission_order() {
        let mut inflight = Inflight::new(9);
        inflight.submit(None, QoS::AtLeastOnce); // birth
        inflight.submit(Some(10), QoS::AtLeastOnce);
        inflight.submit(Some(11), QoS::AtLeastOnce);
        inflight.submit(Some(12), QoS::AtMostOnce);
        assert_eq!(inflight.rows(), 3);
        assert_eq!(inflight.written(1), Some(Written::AwaitingAck));
        assert_eq!(inflight.written(2), Some(Written::AwaitingAck));
        assert_eq!(inflight.written(3), Some(Written::AwaitingAck));
        assert_eq!(inflight.written(0), Some(Written::Row(12)));
        // Acks out of order still find their rows; the mark waits for the oldest.
        assert_eq!(inflight.acked(3), Some(Some(11)));
        assert_eq!(inflight.advance(), None);
        assert_eq!(inflight.acked(1), Some(None));
        assert_eq!(inflight.acked(2), Some(Some(10)));
        assert_eq!(inflight.acked(2), None);
        assert_eq!(inflight.rows(), 3, "rows count until their mark is written");
        assert_eq!(inflight.advance(), Some((12, 3)));
        assert_eq!(inflight.rows(), 3);
        inflight.marked(3);
        assert_eq!(inflight.rows(), 0);
        assert_eq!(inflight.mark(), 12);
    }

    #[test]
    fn skipped_rows_move_the_mark() {
        let mut inflight = Inflight::new(0);
        inflight.skip(1);
        inflight.submit(Some(2), QoS::AtLeastOnce);
        inflight.skip(3);
        assert_eq!(inflight.advance(), Some((1, 1)));
        inflight.written(1);
        inflight.acked(1);
        assert_eq!(inflight.advance(), Some((3, 2)));
    }

    #[test]
    fn a_reset_forgets_unacknowledged_rows_but_keeps_the_mark() {
        let mut inflight = Inflight::new(0);
        inflight.submit(Some(1), QoS::AtLeastOnce);
        inflight.submit(Some(2), QoS::AtLeastOnce);
        inflight.written(1);
        inflight.acked(1);
        inflight.written(2);
        assert_eq!(inflight.advance(), Some((1, 1)));
        inflight.reset();
        assert_eq!(inflight.rows(), 1, "the mark being written still counts");
        assert_eq!(inflight.unacknowledged(), 0);
        assert_eq!(inflight.mark(), 1);
        // Packet id 1 is reused on the next connection for row 2, sent again.
        inflight.submit(Some(2), QoS::AtLeastOnce);
        inflight.written(1);
        assert_eq!(inflight.acked(1), Some(Some(2)));
        inflight.marked(1);
        assert_eq!(inflight.advance(), Some((2, 1)));
    }
}
