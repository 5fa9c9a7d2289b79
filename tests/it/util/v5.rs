//! An MQTT 5 client (rumqttc) on the gateway's listener that keeps what it received and
//! answers "the next message on this topic", and the JSON and properties of a message.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::Value as Json;

/// An MQTT 5 client that keeps what it received for later questions.
pub(crate) struct Client {
    pub(crate) client: AsyncClient,
    events: EventLoop,
    received: VecDeque<Publish>,
}

impl Client {
    pub(crate) async fn connect(addr: SocketAddr, id: &str, filters: &[&str]) -> Client {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(10));
        let (client, events) = AsyncClient::new(options, 100);
        for filter in filters {
            client
                .subscribe(*filter, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        Client {
            client,
            events,
            received: VecDeque::new(),
        }
    }

    /// The next message on `topic` that `accept`s (earlier ones on `topic` are dropped,
    /// others kept), within 10 s.
    pub(crate) async fn next_on(
        &mut self,
        topic: &str,
        accept: impl Fn(&Publish) -> bool,
    ) -> Publish {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(index) = self.received.iter().position(|p| p.topic == topic) {
                let publish = self.received.remove(index).expect("index is in range");
                if accept(&publish) {
                    return publish;
                }
                continue;
            }
            let event = tokio::time::timeout_at(deadline, self.events.poll())
                .await
                .unwrap_or_else(|_| panic!("nothing acceptable on {topic} within 10 s"));
            if let Ok(Event::Incoming(Packet::Publish(publish))) = event {
                self.received.push_back(publish);
            }
        }
    }

    /// Everything that arrives until nothing has for `quiet` (at most 10 s in all), with
    /// what was kept from before.
    pub(crate) async fn drain(&mut self, quiet: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let until = (tokio::time::Instant::now() + quiet).min(deadline);
            match tokio::time::timeout_at(until, self.events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                    self.received.push_back(publish)
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => panic!("connection lost: {error}"),
                Err(_) => break,
            }
        }
        self.received.drain(..).collect()
    }

    /// Publishes `payload` on `<topic>/set` and returns the JSON of `<topic>/set/result`.
    pub(crate) async fn write(&mut self, topic: &str, payload: impl Into<Bytes>) -> Json {
        self.client
            .publish(format!("{topic}/set"), QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
        let result = self.next_on(&format!("{topic}/set/result"), |_| true).await;
        serde_json::from_slice(&result.payload).expect("a JSON result")
    }
}

pub(crate) fn json(publish: &Publish) -> Json {
    serde_json::from_slice(&publish.payload).expect("a JSON payload")
}

pub(crate) fn properties(publish: &Publish) -> PublishProperties {
    publish.properties.clone().expect("MQTT 5 properties")
}
