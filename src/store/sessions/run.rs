//! A run: the queued messages of one client that one commit wrote, kept in one row.
//!
//! One row per run instead of one per message: a commit that queues 30 messages inserts one
//! row (one b-tree insert, a few pages of WAL) instead of 30. Each message is a postcard
//! record, one after the other, in seq order.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use super::QueuedDelivery;

/// One queued message inside a run.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct Record<'a> {
    pub(super) seq: u64,
    /// Wall clock, milliseconds since the epoch (message expiry counts from it).
    pub(super) received_ms: i64,
    pub(super) qos: u8,
    pub(super) retain: bool,
    pub(super) topic: &'a str,
    #[serde(with = "serde_bytes")]
    pub(super) payload: &'a [u8],
    pub(super) subscription_ids: Vec<usize>,
    /// The MQTT 5 properties in their stored form (`store::properties`), as in the
    /// `retained` table.
    pub(super) properties: Option<&'a str>,
}

/// The messages of one client that the current transaction will write as one row.
#[derive(Debug, Default)]
pub(super) struct Run {
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) count: u64,
    pub(super) bytes: Vec<u8>,
}

/// Lets postcard append to a run's bytes in place.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// Past this many bytes a run is closed and the next message starts another (a page of
/// the queue decodes whole runs).
pub(super) const RUN_BYTES: usize = 32 * 1024;

impl Run {
    pub(super) fn push(&mut self, record: &Record<'_>) -> Result<(), postcard::Error> {
        let before = self.bytes.len();
        if let Err(error) = postcard::to_extend(record, Append(&mut self.bytes)) {
            self.bytes.truncate(before);
            return Err(error);
        }
        if self.count == 0 {
            self.first_seq = record.seq;
        }
        self.last_seq = record.seq;
        self.count += 1;
        Ok(())
    }

    pub(super) fn is_full(&self) -> bool {
        self.bytes.len() >= RUN_BYTES
    }
}

/// The runs one transaction writes: per client, consecutive messages go into its open run.
#[derive(Debug, Default)]
pub(super) struct PendingRuns {
    runs: Vec<(Arc<str>, Run)>,
    /// Index in `runs` of each client's open run.
    open: HashMap<Arc<str>, usize>,
    bytes: usize,
}

impl PendingRuns {
    pub(super) fn add(
        &mut self,
        client_id: &Arc<str>,
        record: &Record<'_>,
    ) -> rusqlite::Result<()> {
        let index = match self.open.get(client_id) {
            Some(&index) if !self.runs[index].1.is_full() => index,
            _ => {
                self.runs.push((client_id.clone(), Run::default()));
                self.open.insert(client_id.clone(), self.runs.len() - 1);
                self.runs.len() - 1
            }
        };
        let run = &mut self.runs[index].1;
        let before = run.bytes.len();
        run.push(record)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        self.bytes += run.bytes.len() - before;
        Ok(())
    }

    /// Bytes of messages not written yet.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Insert the runs (one row each) and start afresh.
    pub(super) fn write(&mut self, tx: &Connection) -> rusqlite::Result<()> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let mut insert = tx.prepare_cached(
            "INSERT INTO queue (first_seq, client_id, last_seq, count, messages)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (client_id, run) in self.runs.drain(..) {
            insert.execute(params![
                as_row(run.first_seq),
                &*client_id,
                as_row(run.last_seq),
                as_row(run.count),
                run.bytes
            ])?;
        }
        self.open.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// A seq or count as SQLite's integer.
pub(super) fn as_row(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The record of a delivery about to be queued.
pub(super) fn record_of<'a>(
    delivery: &'a QueuedDelivery,
    received_ms: i64,
    properties: Option<&'a str>,
) -> Record<'a> {
    Record {
        seq: delivery.seq,
        received_ms,
        qos: delivery.qos as u8,
        retain: delivery.retain,
        topic: &delivery.message.topic,
        payload: &delivery.message.payload,
        subscription_ids: delivery.subscription_ids.clone(),
        properties,
    }
}

/// The records of a run's bytes, in order; an error for bytes that are not a run (a
/// damaged row), never a panic.
pub(super) fn records(
    mut bytes: &[u8],
) -> impl Iterator<Item = Result<Record<'_>, postcard::Error>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        match postcard::take_from_bytes::<Record<'_>>(bytes) {
            Ok((record, rest)) => {
                bytes = rest;
                Some(Ok(record))
            }
            Err(error) => {
                bytes = &[];
                Some(Err(error))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, payload: &[u8]) -> Record<'_> {
        Record {
            seq,
            received_ms: 1_700_000_000_000,
            qos: 1,
            retain: seq % 2 == 0,
            topic: "plant/boiler/temp",
            payload,
            subscription_ids: if seq == 2 {
                vec![3, 70_000]
            } else {
                Vec::new()
            },
            properties: (seq == 3).then_some("{\"content_type\":\"text/plain\"}"),
        }
    }

    #[test]
    fn a_run_reads_back_its_records_in_order() {
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|n| vec![n; usize::from(n) * 100]).collect();
        let mut run = Run::default();
        for (seq, payload) in (1..=5).zip(&payloads) {
            run.push(&record(seq, payload)).expect("encodes");
        }
        assert_eq!((run.first_seq, run.last_seq, run.count), (1, 5, 5));
        let back: Vec<Record<'_>> = records(&run.bytes)
            .collect::<Result<_, _>>()
            .expect("decodes");
        let expected: Vec<Record<'_>> = (1..=5).zip(&payloads).map(|(s, p)| record(s, p)).collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn damaged_bytes_give_an_error_not_a_panic() {
        let mut run = Run::default();
        run.push(&record(1, b"hello")).expect("encodes");
        run.push(&record(2, b"world")).expect("encodes");
        let cut = &run.bytes[..run.bytes.len() - 3];
        let decoded: Vec<_> = records(cut).collect();
        assert_eq!(decoded.len(), 2, "the first record, then the error");
        assert!(decoded[0].is_ok());
        assert!(decoded[1].is_err());
        let garbage = [0xffu8; 16];
        assert!(records(&garbage).any(|r| r.is_err()));
    }

    #[test]
    fn a_run_is_full_past_its_byte_bound() {
        let big = vec![7u8; RUN_BYTES / 2];
        let mut run = Run::default();
        run.push(&record(1, &big)).expect("encodes");
        assert!(!run.is_full());
        run.push(&record(2, &big)).expect("encodes");
        assert!(run.is_full());
    }
}
