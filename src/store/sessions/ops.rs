//! What the broker asks of its store: the [`Op`]s the writer thread applies in order, and
//! who waits for the commit that holds them ([`Waiter`]).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{InflightState, QueuedDelivery, StoredDelivery, StoredSubscription};
use crate::model::Message;
use crate::store::backup::BackupError;
use crate::store::AckShare;

pub(crate) enum Op {
    /// Create or update a session (expiry, connected state).
    Session {
        client_id: Arc<str>,
        expiry: u32,
        connected: bool,
    },
    /// Remove a session with its subscriptions and queue.
    DropSession {
        client_id: Arc<str>,
    },
    /// Replace the subscriptions of a session.
    Subscriptions {
        client_id: Arc<str>,
        subscriptions: Vec<StoredSubscription>,
    },
    /// Queue a message for a client under its `delivery.seq`.
    Enqueue {
        client_id: Arc<str>,
        delivery: QueuedDelivery,
    },
    Inflight {
        client_id: Arc<str>,
        seq: u64,
        pkid: u16,
        state: InflightState,
    },
    /// Every message of a client up to `through` is done (acknowledged in order): one
    /// watermark write per commit instead of a delete per message. The rows themselves
    /// are deleted later, when the store is idle. `count` is how many acks this covers.
    Acked {
        client_id: Arc<str>,
        through: u64,
        count: u64,
    },
    Remove {
        client_id: Arc<str>,
        seq: u64,
    },
    /// Remove the oldest row of a client above `after_seq` (drop-oldest on a spilled queue).
    RemoveOldest {
        client_id: Arc<str>,
        after_seq: u64,
    },
    Retain {
        topic: Arc<str>,
        message: Option<Message>,
    },
    /// Answered after the commit that holds every op sent before it.
    Barrier(Waiter),
    /// Copy the database to `dest` once everything sent before has been committed.
    Backup {
        dest: PathBuf,
        reply: oneshot::Sender<Result<(), BackupError>>,
    },
    /// Rows of a client with `seq > after_seq`, oldest first.
    Page {
        client_id: Arc<str>,
        after_seq: u64,
        limit: usize,
        reply: oneshot::Sender<Vec<(u64, StoredDelivery)>>,
    },
}

/// Where the rows of a [`Persist::request_page`] arrive.
pub(crate) type PageReply = oneshot::Receiver<Vec<(u64, StoredDelivery)>>;

/// Who waits for a commit.
pub(crate) enum Waiter {
    #[cfg(test)]
    Plain(oneshot::Sender<()>),
    /// A publisher's acknowledgement, with whether its message matched a subscriber, and
    /// [`Persist::failures`] from before the message's ops were sent.
    Publish(oneshot::Sender<bool>, bool, u64),
    /// The store's share of an acknowledgement that other stores hold too, with
    /// [`Persist::failures`] from before the message's ops were sent.
    Share(AckShare, u64),
}

impl Waiter {
    /// Answer after a successful commit. A publisher is told "stored" only if no commit
    /// failed since its ops were sent: they may have been in the failed one (a batch can end
    /// between a message's rows and its barrier), and then they are not on disk. Dropping
    /// the sender tells it "not stored" (its client resends).
    pub(super) fn wake(self, failures: u64) {
        match self {
            #[cfg(test)]
            Waiter::Plain(tx) => {
                let _ = tx.send(());
            }
            Waiter::Publish(tx, matched, failures_before) => {
                if failures == failures_before {
                    let _ = tx.send(matched);
                }
            }
            Waiter::Share(share, failures_before) => {
                if failures == failures_before {
                    share.stored();
                }
            }
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("persist::Op")
    }
}
