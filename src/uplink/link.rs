//! The rumqttc side of an uplink: MQTT 5 (`rumqttc::v5`) or 3.1.1 (`rumqttc`) behind one
//! [`Client`] and one event stream, and the poll task that drives the event loop.
//!
//! The poll task only polls: it never awaits a client call (rumqttc's request channel is
//! drained by the very loop it runs). It turns rumqttc events into [`LinkEvent`]s for the
//! sender, cloud messages into [`Inbound`]s for the in-route task, and owns reconnects with
//! exponential backoff and jitter.
//!
//! **Reconnect reset.** rumqttc would retransmit unacknowledged publishes itself after a
//! reconnect; the outbox does that instead (it knows which rows are not yet acknowledged),
//! so the poll task removes every publish from rumqttc's pending queue after a connection
//! error, once the sender has confirmed (through [`LinkEvent::Down`]'s `reset` reply) that
//! it forgot its in-flight mapping and submits nothing until the next
//! [`LinkEvent::Connected`]. The FIFO of `Outgoing::Publish` events then matches the
//! sender's FIFO of submissions again. Events rumqttc had queued when the connection
//! failed (a PUBACK read just before the cloud closed the socket, a publish written just
//! before the error) are handed to the sender before [`LinkEvent::Down`]: they belong to the
//! failed connection, and a refusal among them must not be mistaken for silence.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::Outgoing;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::config::{MqttVersion, UplinkConfig, UrlScheme};
use crate::backoff::{Backoff, Jitter};
use crate::model::{MessageProperties, QoS};
use crate::mqtt::convert;

/// Largest packet we accept from the cloud.
const MAX_INCOMING_PACKET: u32 = 1024 * 1024;
/// Largest packet we send when the cloud sets no limit (MQTT's own limit is 256 MiB).
const MAX_OUTGOING_PACKET: usize = 16 * 1024 * 1024;
/// TCP connect + TLS handshake + CONNACK.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// Shortest wait between reconnects, whatever `reconnect_min` says.
const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub(super) enum LinkEvent {
    Connected {
        session_present: bool,
        /// The cloud's maximum packet size (MQTT 5), if it set one.
        max_packet_size: Option<u32>,
    },
    /// rumqttc wrote a PUBLISH with this packet id (0 for QoS 0), in submission order.
    Published(u16),
    /// The final acknowledgement of a QoS 1 (PUBACK) or QoS 2 (PUBCOMP, or a failed PUBREC).
    Acked {
        pkid: u16,
        /// `Some(reason)` when the cloud refused the message (MQTT 5 reason code).
        refused: Option<String>,
    },
    /// The connection failed or could not be made. The sender must forget its in-flight
    /// mapping, stop submitting until `Connected`, and then reply on `reset`.
    Down {
        error: String,
        reset: oneshot::Sender<()>,
    },
    /// DISCONNECT was written (clean shutdown), or the client handles are gone.
    Stopped,
}

/// A message from the cloud on one of our subscriptions.
#[derive(Debug)]
pub(super) struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<MessageProperties>,
}

#[derive(Debug)]
pub(super) enum SubmitError {
    /// rumqttc's request channel is full: try again after the next event.
    Full,
    /// The event loop is gone.
    Closed,
}

/// A publish, subscribe or disconnect request for rumqttc.
#[derive(Clone)]
pub(super) enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queue a publish without waiting (never blocks the caller on rumqttc's progress).
    pub(super) fn try_publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        properties: Option<&MessageProperties>,
    ) -> Result<(), SubmitError> {
        match self {
            Client::V311(client) => client
                .try_publish(topic, qos.into(), retain, payload.to_vec())
                .map_err(v4_error),
            Client::V5(client) => match properties {
                Some(p) => client.try_publish_with_properties(
                    topic,
                    qos.into(),
                    retain,
                    payload,
                    convert::properties_to_v5(p),
                ),
                None => client.try_publish(topic, qos.into(), retain, payload),
            }
            .map_err(v5_error),
        }
    }

    pub(super) fn try_subscribe(&self, filters: &[(String, QoS)]) -> Result<(), SubmitError> {
        match self {
            Client::V311(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), (*q).into())),
                )
                .map_err(v4_error),
            Client::V5(client) => client
                .try_subscribe_many(filters.iter().map(|(f, q)| m5::Filter::new(f, (*q).into())))
                .map_err(v5_error),
        }
    }

    pub(super) fn try_disconnect(&self) -> Result<(), SubmitError> {
        match self {
            Client::V311(client) => client.try_disconnect().map_err(v4_error),
            Client::V5(client) => client.try_disconnect().map_err(v5_error),
        }
    }
}

fn v4_error(e: rumqttc::ClientError) -> SubmitError {
    match e {
        rumqttc::ClientError::TryRequest(_) => SubmitError::Full,
        rumqttc::ClientError::Request(_) => SubmitError::Closed,
    }
}

fn v5_error(e: rumqttc::v5::ClientError) -> SubmitError {
    match e {
        rumqttc::v5::ClientError::TryRequest(_) => SubmitError::Full,
        rumqttc::v5::ClientError::Request(_) => SubmitError::Closed,
    }
}

/// Everything the poll task needs besides the event loop.
pub(super) struct PollContext {
    pub name: Arc<str>,
    pub events: mpsc::Sender<LinkEvent>,
    pub inbound: mpsc::Sender<Inbound>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Stops reconnecting (the poll task then ends at the next error or backoff).
    pub stop: CancellationToken,
}

/// Makes the will's payload for the next CONNECT (a Sparkplug NDEATH carries the bdSeq of
/// its connection, which every CONNECT takes anew).
pub(super) type WillPayload = Box<dyn FnMut() -> Bytes + Send>;

/// Connection settings resolved at start (secrets read, TLS built).
pub(super) struct LinkSettings {
    pub password: Option<String>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// When set, the will's payload is made by this for each CONNECT (instead of the
    /// configured text).
    pub will_payload: Option<WillPayload>,
}

/// Build the client and its poll task.
pub(super) fn connect(
    config: &UplinkConfig,
    mut settings: LinkSettings,
    window: u16,
    context: PollContext,
) -> (Client, tokio::task::JoinHandle<()>) {
    let will_payload: Option<Bytes> = match (&config.will, settings.will_payload.as_mut()) {
        (Some(_), Some(make)) => Some(make()),
        (Some(will), None) => Some(Bytes::from(will.payload.clone().into_bytes())),
        (None, _) => None,
    };
    let host = config.url.host.clone();
    let port = config.url.port;
    let transport = match (config.url.scheme, settings.tls) {
        (UrlScheme::Mqtts | UrlScheme::Wss, Some(tls)) => {
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls))
        }
        _ => rumqttc::Transport::tcp(),
    };
    // Room for the whole window plus subscribes and the final offline/disconnect, so that
    // `try_*` rarely finds the channel full.
    let capacity = usize::from(window) + 64;
    let (client, eventloop) = match config.protocol {
        MqttVersion::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(config.client_id.clone(), host.clone(), port);
            options
                .set_transport(transport)
                .set_keep_alive(config.keep_alive.max(Duration::from_secs(1)))
                .set_clean_start(config.clean_start)
                .set_request_channel_capacity(capacity)
                .set_outgoing_inflight_upper_limit(window)
                .set_max_packet_size(Some(MAX_INCOMING_PACKET))
                .set_connection_timeout(CONNECT_TIMEOUT_SECS);
            let expiry = u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX);
            options.set_session_expiry_interval((expiry > 0).then_some(expiry));
            if let Some(username) = &config.username {
                options.set_credentials(
                    username.clone(),
                    settings.password.clone().unwrap_or_default(),
                );
            }
            if let Some(will) = &config.will {
                let delay = u32::try_from(will.delay.as_secs()).unwrap_or(u32::MAX);
                // The reason tells the will apart from the clean stop's offline message,
                // which has the same topic and payload.
                let properties = m5::LastWillProperties {
                    delay_interval: (delay > 0).then_some(delay),
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: vec![(
                        super::REASON_PROPERTY.to_string(),
                        super::REASON_CONNECTION_LOST.to_string(),
                    )],
                };
                options.set_last_will(m5::LastWill::new(
                    will.topic.clone(),
                    will_payload.clone().unwrap_or_default(),
                    will.qos.into(),
                    will.retain,
                    Some(properties),
                ));
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, capacity);
            (Client::V5(client), EventLoop::V5(eventloop))
        }
        MqttVersion::V311 => {
            let mut options = rumqttc::MqttOptions::new(config.client_id.clone(), host, port);
            options
                .set_transport(transport)
                .set_keep_alive(config.keep_alive.max(Duration::from_secs(5)))
                .set_clean_session(config.clean_start)
                .set_request_channel_capacity(capacity)
                .set_inflight(window)
                .set_max_packet_size(MAX_INCOMING_PACKET as usize, MAX_OUTGOING_PACKET);
            if let Some(username) = &config.username {
                options.set_credentials(
                    username.clone(),
                    settings.password.clone().unwrap_or_default(),
                );
            }
            if let Some(will) = &config.will {
                options.set_last_will(rumqttc::LastWill::new(
                    will.topic.clone(),
                    will_payload.clone().unwrap_or_default(),
                    will.qos.into(),
                    will.retain,
                ));
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
            eventloop.set_network_options(network);
            (Client::V311(client), EventLoop::V311(eventloop))
        }
    };
    let mut task = PollTask::new(context);
    task.will_payload = settings.will_payload;
    (client, tokio::spawn(task.run(eventloop)))
}

/// Logs connection errors once per change of error, not once per attempt.
struct ErrorLog {
    name: Arc<str>,
    last: Option<String>,
}

impl ErrorLog {
    fn failed(&mut self, error: &str, retry_in: Duration) {
        if self.last.as_deref() == Some(error) {
            tracing::debug!(uplink = %self.name, error, ?retry_in, "uplink still failing");
        } else {
            tracing::warn!(uplink = %self.name, error, ?retry_in, "uplink connection failed; retrying with backoff");
            self.last = Some(error.to_string());
        }
    }

    fn connected(&mut self, session_present: bool) {
        tracing::info!(uplink = %self.name, session_present, "uplink connected");
        self.last = None;
    }
}

/// Add a hint to errors whose cause is not obvious from rumqttc's text.
pub(super) fn explain(error: String) -> String {
    let hint = if error.contains("CertificateRequired") {
        Some("the broker requires a client certificate: set `cert` and `key`")
    } else if error.contains("UnknownIssuer") {
        Some("the broker's certificate is not signed by a trusted CA: check `ca`")
    } else if error.contains("NotValidForName") {
        Some("the broker's certificate does not name the host in `url`")
    } else if error.contains("UnknownCA") || error.contains("BadCertificate") {
        Some("the broker refused our client certificate: is it signed by a CA the broker trusts?")
    } else if error.contains("BadUserNamePassword") || error.contains("NotAuthorized") {
        Some("check `username` and the password")
    } else {
        None
    };
    match hint {
        Some(hint) => format!("{error} ({hint})"),
        None => error,
    }
}

/// What the poll task does with one rumqttc event.
enum Forward {
    Link(LinkEvent),
    Inbound(Inbound),
    /// DISCONNECT was written: the poll task ends.
    Disconnected,
    Nothing,
}

/// How the poll loop goes on after handing an event over.
enum Flow {
    Continue,
    /// The sender or the inbound task is gone: stop (and say so).
    Stop,
    /// DISCONNECT was written and the sender told: the task ends.
    Done,
}

/// What one poll of the event loop gave.
enum Polled {
    Event(Forward),
    /// Every client handle is gone.
    RequestsDone,
    /// The connection failed or could not be made.
    Failed(String),
}

/// rumqttc's MQTT 3.1.1 or MQTT 5 event loop: the two differ only in their types, so the
/// poll task sees them through this one face.
// One per uplink, owned by its poll task for the task's whole life: the size difference
// between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum EventLoop {
    V311(rumqttc::EventLoop),
    V5(rumqttc::v5::EventLoop),
}

impl EventLoop {
    async fn poll(&mut self, uplink: &str) -> Polled {
        match self {
            EventLoop::V311(eventloop) => {
                use rumqttc::ConnectionError;
                match eventloop.poll().await {
                    Ok(event) => Polled::Event(from_v4(event, uplink)),
                    Err(ConnectionError::RequestsDone) => Polled::RequestsDone,
                    Err(ConnectionError::ConnectionRefused(code)) => Polled::Failed(refused(code)),
                    Err(ConnectionError::Tls(tls)) => Polled::Failed(format!("TLS: {tls}")),
                    Err(other) => Polled::Failed(other.to_string()),
                }
            }
            EventLoop::V5(eventloop) => {
                use rumqttc::v5::ConnectionError;
                match eventloop.poll().await {
                    Ok(event) => Polled::Event(from_v5(event, uplink)),
                    Err(ConnectionError::RequestsDone) => Polled::RequestsDone,
                    Err(ConnectionError::ConnectionRefused(code)) => Polled::Failed(refused(code)),
                    Err(ConnectionError::Tls(tls)) => Polled::Failed(format!("TLS: {tls}")),
                    Err(other) => Polled::Failed(other.to_string()),
                }
            }
        }
    }

    /// What rumqttc read or wrote before a connection error and has not handed out yet.
    fn take_earlier_events(&mut self, uplink: &str) -> Vec<Forward> {
        match self {
            EventLoop::V311(eventloop) => eventloop
                .state
                .events
                .drain(..)
                .map(|event| from_v4(event, uplink))
                .collect(),
            EventLoop::V5(eventloop) => eventloop
                .state
                .events
                .drain(..)
                .map(|event| from_v5(event, uplink))
                .collect(),
        }
    }

    /// Give the will of the next CONNECT a new payload.
    fn renew_will(&mut self, payload: Bytes) {
        match self {
            EventLoop::V311(eventloop) => {
                if let Some(mut will) = eventloop.mqtt_options.last_will() {
                    will.message = payload;
                    eventloop.mqtt_options.set_last_will(will);
                }
            }
            EventLoop::V5(eventloop) => {
                if let Some(mut will) = eventloop.options.last_will() {
                    will.message = payload;
                    eventloop.options.set_last_will(will);
                }
            }
        }
    }

    /// Requests submitted before the sender's reset may still sit in rumqttc's channel:
    /// move them into `pending` and drop every publish (the outbox resends).
    fn drop_queued_publishes(&mut self) {
        match self {
            EventLoop::V311(eventloop) => {
                eventloop.clean();
                eventloop
                    .pending
                    .retain(|r| !matches!(r, rumqttc::Request::Publish(_)));
            }
            EventLoop::V5(eventloop) => {
                eventloop.clean();
                eventloop
                    .pending
                    .retain(|r| !matches!(r, rumqttc::v5::Request::Publish(_)));
            }
        }
    }
}

fn refused(code: impl std::fmt::Debug) -> String {
    format!("connection refused by the broker: {code:?}")
}

fn from_v5(event: rumqttc::v5::Event, uplink: &str) -> Forward {
    use rumqttc::v5::{Event, Incoming};
    match event {
        Event::Incoming(Incoming::ConnAck(connack)) => Forward::Link(LinkEvent::Connected {
            session_present: connack.session_present,
            max_packet_size: connack.properties.and_then(|p| p.max_packet_size),
        }),
        Event::Incoming(Incoming::PubAck(ack)) => {
            let refused = !matches!(
                ack.reason,
                m5::PubAckReason::Success | m5::PubAckReason::NoMatchingSubscribers
            );
            Forward::Link(LinkEvent::Acked {
                pkid: ack.pkid,
                refused: refused.then(|| format!("{:?}", ack.reason)),
            })
        }
        Event::Incoming(Incoming::PubRec(rec))
            if !matches!(
                rec.reason,
                m5::PubRecReason::Success | m5::PubRecReason::NoMatchingSubscribers
            ) =>
        {
            Forward::Link(LinkEvent::Acked {
                pkid: rec.pkid,
                refused: Some(format!("{:?}", rec.reason)),
            })
        }
        Event::Incoming(Incoming::PubComp(comp)) => Forward::Link(LinkEvent::Acked {
            pkid: comp.pkid,
            refused: None,
        }),
        Event::Incoming(Incoming::Publish(publish)) => Forward::Inbound(Inbound {
            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
            payload: publish.payload,
            qos: publish.qos.into(),
            retain: publish.retain,
            properties: publish
                .properties
                .map(convert::properties_from_v5)
                .filter(|p| *p != MessageProperties::default()),
        }),
        Event::Incoming(Incoming::SubAck(suback)) => {
            for code in &suback.return_codes {
                if !matches!(code, m5::SubscribeReasonCode::Success(_)) {
                    tracing::warn!(uplink, reason = ?code, "cloud refused an in-route subscription");
                }
            }
            Forward::Nothing
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => Forward::Link(LinkEvent::Published(pkid)),
        Event::Outgoing(Outgoing::Disconnect) => Forward::Disconnected,
        _ => Forward::Nothing,
    }
}

fn from_v4(event: rumqttc::Event, uplink: &str) -> Forward {
    use rumqttc::{Event, Incoming};
    match event {
        Event::Incoming(Incoming::ConnAck(connack)) => Forward::Link(LinkEvent::Connected {
            session_present: connack.session_present,
            max_packet_size: None,
        }),
        Event::Incoming(Incoming::PubAck(ack)) => Forward::Link(LinkEvent::Acked {
            pkid: ack.pkid,
            refused: None,
        }),
        Event::Incoming(Incoming::PubComp(comp)) => Forward::Link(LinkEvent::Acked {
            pkid: comp.pkid,
            refused: None,
        }),
        Event::Incoming(Incoming::Publish(publish)) => Forward::Inbound(Inbound {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos.into(),
            retain: publish.retain,
            properties: None,
        }),
        Event::Incoming(Incoming::SubAck(suback)) => {
            for code in &suback.return_codes {
                if matches!(code, rumqttc::SubscribeReasonCode::Failure) {
                    tracing::warn!(uplink, "cloud refused an in-route subscription");
                }
            }
            Forward::Nothing
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => Forward::Link(LinkEvent::Published(pkid)),
        Event::Outgoing(Outgoing::Disconnect) => Forward::Disconnected,
        _ => Forward::Nothing,
    }
}

/// The poll task: drives one event loop, hands its events over, reconnects with backoff.
struct PollTask {
    context: PollContext,
    backoff: Backoff,
    log: ErrorLog,
    /// Makes the will's payload of each new CONNECT.
    will_payload: Option<WillPayload>,
}

impl PollTask {
    fn new(context: PollContext) -> PollTask {
        PollTask {
            backoff: Backoff::new(
                context.reconnect_min.max(MIN_RECONNECT_DELAY),
                context.reconnect_max,
                Jitter::UpToHalf,
            ),
            log: ErrorLog {
                name: context.name.clone(),
                last: None,
            },
            will_payload: None,
            context,
        }
    }

    async fn run(mut self, mut eventloop: EventLoop) {
        loop {
            let flow = match eventloop.poll(&self.context.name).await {
                Polled::Event(event) => self.forward(event).await,
                Polled::RequestsDone => Flow::Stop,
                Polled::Failed(error) => {
                    // What rumqttc read or wrote before the error (e.g. a PUBACK that refused
                    // a message, just before the cloud closed the connection) belongs to the
                    // failed connection: hand it over before the sender forgets that
                    // connection.
                    let earlier = eventloop.take_earlier_events(&self.context.name);
                    match self.forward_all(earlier).await {
                        Flow::Continue => {
                            if self.after_error(error).await {
                                eventloop.drop_queued_publishes();
                                if let Some(make) = self.will_payload.as_mut() {
                                    eventloop.renew_will(make());
                                }
                                Flow::Continue
                            } else {
                                Flow::Stop
                            }
                        }
                        ended => ended,
                    }
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Stop => break,
                Flow::Done => return,
            }
        }
        let _ = self.context.events.send(LinkEvent::Stopped).await;
    }

    /// Forward `events` in order, up to the first that ends the loop.
    async fn forward_all(&mut self, events: Vec<Forward>) -> Flow {
        for event in events {
            let flow = self.forward(event).await;
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
        Flow::Continue
    }

    async fn forward(&mut self, forward: Forward) -> Flow {
        let delivered = match forward {
            Forward::Link(event) => {
                if let LinkEvent::Connected {
                    session_present, ..
                } = event
                {
                    self.backoff.reset();
                    self.log.connected(session_present);
                }
                self.context.events.send(event).await.is_ok()
            }
            Forward::Inbound(inbound) => self.context.inbound.send(inbound).await.is_ok(),
            Forward::Disconnected => {
                let _ = self.context.events.send(LinkEvent::Stopped).await;
                return Flow::Done;
            }
            Forward::Nothing => true,
        };
        if delivered {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    /// After a connection error: wait for the sender's reset, then back off. Returns false
    /// when the task must end.
    async fn after_error(&mut self, error: String) -> bool {
        let error = explain(error);
        let (reset, done) = oneshot::channel();
        let down = LinkEvent::Down {
            error: error.clone(),
            reset,
        };
        if self.context.events.send(down).await.is_err() {
            return false;
        }
        // The sender has forgotten its in-flight rows once this resolves (or it is gone).
        if done.await.is_err() {
            return false;
        }
        let delay = self.backoff.next_delay();
        self.log.failed(&error, delay);
        tokio::select! {
            _ = self.context.stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
