//! The in-process bus: the face of the broker that drivers, uplinks and the gateway itself
//! use to publish and subscribe without a socket. It owns [`BrokerHandle`],
//! [`InternalSubscription`] and the error they answer with, [`BusError`]; what the router
//! does with a request is the broker's business.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::router::{BrokerStats, RouterRequest};
use crate::model::{Message, QoS};
use crate::mqtt::topic;

pub use crate::store::AckShare;

/// Why the bus refused a request.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid topic filter {filter:?}")]
    InvalidFilter { filter: String },
    #[error("invalid topic {topic:?} for a publish")]
    InvalidTopic { topic: String },
    #[error("the broker is shutting down")]
    Closed,
    #[error("the broker store could not commit the message (its error is logged)")]
    NotStored,
}

/// How an in-process subscriber wants its messages.
#[derive(Debug, Clone)]
pub struct InternalSubscribeOptions {
    /// Channel capacity. When full, the router waits: internal subscribers get every
    /// message (they are the outbox and the drivers' command inputs), and a slow one slows
    /// publishers rather than losing data.
    pub capacity: usize,
    /// Also deliver the matching retained messages, from right after subscribing, as many
    /// at a time as the channel has room for (the router does not wait for this
    /// subscriber to read them).
    pub send_retained: bool,
    /// This subscriber stores what it receives (an uplink's outbox): with
    /// `durability = "sync"`, a QoS 1/2 publish it receives comes with an [`AckShare`]
    /// (see [`InternalSubscription::recv_with_ack`]) and its publisher is acknowledged only
    /// once the subscriber has released it.
    pub commit: bool,
}

impl Default for InternalSubscribeOptions {
    fn default() -> Self {
        InternalSubscribeOptions {
            capacity: 1024,
            send_retained: false,
            commit: false,
        }
    }
}

/// Messages for one in-process subscriber. Dropping it unsubscribes.
#[derive(Debug)]
pub struct InternalSubscription {
    id: u64,
    rx: mpsc::Receiver<(Message, Option<AckShare>)>,
    router: mpsc::Sender<RouterRequest>,
}

impl InternalSubscription {
    /// The next matching message; `None` once the broker has stopped. Its publisher's
    /// acknowledgement, if this subscriber holds a share of it, is released at once.
    pub async fn recv(&mut self) -> Option<Message> {
        self.recv_with_ack().await.map(release)
    }

    /// A message already waiting, without blocking (as [`recv`](Self::recv)).
    pub fn try_recv(&mut self) -> Option<Message> {
        self.try_recv_with_ack().map(release)
    }

    /// The next matching message with this subscriber's share of its publisher's
    /// acknowledgement (only with [`InternalSubscribeOptions::commit`]); `None` once the
    /// broker has stopped.
    pub async fn recv_with_ack(&mut self) -> Option<(Message, Option<AckShare>)> {
        self.rx.recv().await
    }

    /// A message already waiting, without blocking (as [`recv_with_ack`](Self::recv_with_ack)).
    pub fn try_recv_with_ack(&mut self) -> Option<(Message, Option<AckShare>)> {
        self.rx.try_recv().ok()
    }
}

fn release((message, ack): (Message, Option<AckShare>)) -> Message {
    if let Some(ack) = ack {
        ack.stored();
    }
    message
}

impl Drop for InternalSubscription {
    fn drop(&mut self) {
        // Best effort: when the router is gone there is nothing to unsubscribe from.
        let _ = self
            .router
            .try_send(RouterRequest::InternalUnsubscribe { id: self.id });
    }
}

/// A cheap, cloneable handle into the router for in-process publishers and subscribers.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    pub(super) router: mpsc::Sender<RouterRequest>,
}

impl BrokerHandle {
    /// Route a message to every matching subscriber (and store it if retained). Returns
    /// once the router has taken it.
    pub async fn publish(&self, message: Message) -> Result<(), BusError> {
        if !topic::valid_topic_name(&message.topic) {
            return Err(BusError::InvalidTopic {
                topic: message.topic.to_string(),
            });
        }
        self.router
            .send(RouterRequest::Publish {
                message,
                done: None,
                congestion: None,
            })
            .await
            .map_err(|_| BusError::Closed)
    }

    /// Like [`publish`](Self::publish), but returns only once the router has delivered the
    /// message to every matching session queue; answers whether anything matched.
    pub async fn publish_and_wait(&self, message: Message) -> Result<bool, BusError> {
        if !topic::valid_topic_name(&message.topic) {
            return Err(BusError::InvalidTopic {
                topic: message.topic.to_string(),
            });
        }
        let (done, matched) = oneshot::channel();
        self.router
            .send(RouterRequest::Publish {
                message,
                done: Some(done),
                congestion: None,
            })
            .await
            .map_err(|_| BusError::Closed)?;
        // Answered unless the router stopped, or the commit that had to hold it failed.
        matched.await.map_err(|_| {
            if self.router.is_closed() {
                BusError::Closed
            } else {
                BusError::NotStored
            }
        })
    }

    /// Subscribe an in-process consumer named `name` to `filters`. The subscriber never
    /// receives messages it published itself under the same name (no bridge loops).
    pub async fn subscribe(
        &self,
        name: &str,
        filters: Vec<(String, QoS)>,
        options: InternalSubscribeOptions,
    ) -> Result<InternalSubscription, BusError> {
        for (filter, _) in &filters {
            if !topic::valid_filter(filter) {
                return Err(BusError::InvalidFilter {
                    filter: filter.clone(),
                });
            }
        }
        let (tx, rx) = mpsc::channel(options.capacity.max(1));
        let (reply, id) = oneshot::channel();
        self.router
            .send(RouterRequest::InternalSubscribe {
                name: Arc::from(name),
                filters,
                send_retained: options.send_retained,
                commit: options.commit,
                tx,
                reply,
            })
            .await
            .map_err(|_| BusError::Closed)?;
        let id = id.await.map_err(|_| BusError::Closed)?;
        Ok(InternalSubscription {
            id,
            rx,
            router: self.router.clone(),
        })
    }

    /// Counters for status and `$SYS`.
    pub async fn stats(&self) -> Result<BrokerStats, BusError> {
        let (reply, stats) = oneshot::channel();
        self.router
            .send(RouterRequest::Stats { reply })
            .await
            .map_err(|_| BusError::Closed)?;
        stats.await.map_err(|_| BusError::Closed)
    }
}
