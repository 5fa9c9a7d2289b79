//! MQTT 3.1.1 and 5 on one port: translation between rumqttc's two packet codecs and the
//! version-neutral packets the connection logic works with. No bytes are parsed here
//! beyond choosing the codec; rumqttc does the encoding and decoding, after [`check`] has
//! refused what rumqttc would wrongly accept.

mod check;

pub(crate) use check::{Violation, ViolationKind};

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as mqtt4bytes, v4};
use rumqttc::v5::mqttbytes::{self as mqtt5bytes, v5};

use crate::model::{MessageProperties, QoS};
use crate::mqtt::convert;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

/// A client's will, as sent in CONNECT.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) properties: Option<MessageProperties>,
    /// MQTT 5 will delay interval, seconds.
    pub(crate) delay: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct ConnectRequest {
    pub(crate) version: Version,
    pub(crate) client_id: String,
    pub(crate) clean_start: bool,
    pub(crate) keep_alive: u16,
    /// MQTT 5 session expiry; for 3.1.1: 0 with clean session, "never" without.
    pub(crate) session_expiry: u32,
    /// How many QoS 1/2 publishes the client accepts in flight.
    pub(crate) receive_maximum: u16,
    pub(crate) max_packet_size: Option<u32>,
    /// How many topic aliases the client accepts from us.
    pub(crate) topic_alias_max: u16,
    pub(crate) will: Option<Will>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) authentication_method: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct PublishIn {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) pkid: u16,
    pub(crate) properties: Option<MessageProperties>,
    pub(crate) topic_alias: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscriptionRequest {
    pub(crate) filter: String,
    pub(crate) qos: QoS,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    /// 0: send retained on subscribe, 1: only for a new subscription, 2: never.
    pub(crate) retain_handling: u8,
}

#[derive(Debug)]
pub(crate) enum Incoming {
    Publish(PublishIn),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubscriptionRequest>,
        subscription_id: Option<usize>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        /// MQTT 5: a new session expiry given at DISCONNECT.
        session_expiry: Option<u32>,
        /// MQTT 5 reason 0x04: publish the will even though this is a clean disconnect.
        with_will: bool,
    },
    /// A packet a client must never send (CONNACK, SUBACK, ...), or AUTH.
    Unexpected(&'static str),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("need more bytes")]
    Incomplete,
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// Refused by the strict checks (a malformed packet or a protocol error).
    #[error(transparent)]
    Invalid(Violation),
    /// A CONNECT refused by the strict checks, with the protocol version it asked for.
    #[error("{1}")]
    InvalidConnect(Version, Violation),
}

/// CONNACK outcome, mapped to a 3.1.1 return code or an MQTT 5 reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnackCode {
    Accepted,
    UnsupportedProtocol,
    IdentifierRejected,
    ServerUnavailable,
    BadCredentials,
    NotAuthorized,
    QuotaExceeded,
    BadAuthenticationMethod,
    MalformedPacket,
    ProtocolError,
}

#[derive(Debug, Clone)]
pub(crate) struct ConnAckOut {
    pub(crate) session_present: bool,
    pub(crate) code: ConnackCode,
    pub(crate) assigned_client_id: Option<String>,
    pub(crate) receive_maximum: u16,
    pub(crate) max_packet_size: u32,
    pub(crate) topic_alias_max: u16,
    pub(crate) server_keep_alive: Option<u16>,
    pub(crate) reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubAckCode {
    Granted(QoS),
    NotAuthorized,
    /// 0x80 in both versions.
    Unspecified,
    TopicFilterInvalid,
}

/// MQTT 5 DISCONNECT reasons the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DisconnectReason {
    MalformedPacket,
    ProtocolError,
    ServerShuttingDown,
    KeepAliveTimeout,
    SessionTakenOver,
    TopicNameInvalid,
    ReceiveMaximumExceeded,
    TopicAliasInvalid,
    PacketTooLarge,
    /// The client did not read for the slow-client timeout.
    QuotaExceeded,
}

impl DisconnectReason {
    fn text(self) -> &'static str {
        match self {
            DisconnectReason::MalformedPacket => "malformed packet",
            DisconnectReason::ProtocolError => "protocol error",
            DisconnectReason::ServerShuttingDown => "server shutting down",
            DisconnectReason::KeepAliveTimeout => "keep alive timeout",
            DisconnectReason::SessionTakenOver => "session taken over by a new connection",
            DisconnectReason::TopicNameInvalid => "invalid topic name",
            DisconnectReason::ReceiveMaximumExceeded => "receive maximum exceeded",
            DisconnectReason::TopicAliasInvalid => "invalid topic alias",
            DisconnectReason::PacketTooLarge => "packet too large",
            DisconnectReason::QuotaExceeded => "the client did not read for slow_client_timeout",
        }
    }
}

/// PUBACK/PUBREC reason codes we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckReason {
    Success,
    NotAuthorized,
}

#[derive(Debug, Clone)]
pub(crate) struct PublishOut {
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) dup: bool,
    pub(crate) pkid: u16,
    pub(crate) properties: Option<Arc<MessageProperties>>,
    /// Message expiry left when sent (MQTT 5 forwards the remaining interval).
    pub(crate) message_expiry: Option<u32>,
    pub(crate) subscription_ids: Vec<usize>,
    /// MQTT 5 topic alias; with `topic_known` the topic itself is left out.
    pub(crate) topic_alias: Option<u16>,
    pub(crate) topic_known: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    ConnAck(ConnAckOut),
    Publish(PublishOut),
    PubAck(u16, AckReason),
    PubRec(u16, AckReason),
    PubRel(u16),
    PubComp(u16),
    /// PUBREL/PUBCOMP for a packet id we do not know.
    PubRelNotFound(u16),
    PubCompNotFound(u16),
    SubAck(u16, Vec<SubAckCode>),
    UnsubAck(u16, Vec<bool>),
    PingResp,
    Disconnect(DisconnectReason),
}

#[derive(Debug, thiserror::Error)]
#[error("outgoing packet of {size} bytes exceeds the client's maximum of {max}")]
pub(crate) struct TooLargeForClient {
    pub(crate) size: usize,
    pub(crate) max: u32,
}

/// Read the first packet of a connection, choosing the protocol from CONNECT.
pub(crate) fn read_connect(buf: &mut BytesMut, max_size: u32) -> Result<ConnectRequest, ReadError> {
    // Anything but CONNECT first (an HTTP request, noise) is refused at the first byte.
    if buf.first().is_some_and(|b| b & 0xF0 != 0x10) {
        return Err(ReadError::Malformed("first packet is not CONNECT".into()));
    }
    check_frame_size(buf, max_size)?;
    if let Some(len) = check::frame_len(buf) {
        check::connect(&buf[..len])
            .map_err(|(version, violation)| ReadError::InvalidConnect(version, violation))?;
    }
    // Try MQTT 5 first on a copy: its codec names the protocol level it found.
    let mut probe = buf.clone();
    match v5::Packet::read(&mut probe, Some(max_size)) {
        Ok(v5::Packet::Connect(connect, will, login)) => {
            *buf = probe;
            Ok(connect_from_v5(connect, will, login))
        }
        Ok(_) => Err(ReadError::Malformed("first packet is not CONNECT".into())),
        Err(mqtt5bytes::Error::InvalidProtocolLevel(4)) => {
            match v4::Packet::read(buf, max_size as usize) {
                Ok(v4::Packet::Connect(connect)) => Ok(connect_from_v4(connect)),
                Ok(_) => Err(ReadError::Malformed("first packet is not CONNECT".into())),
                Err(e) => Err(read_error_v4(e)),
            }
        }
        Err(mqtt5bytes::Error::InvalidProtocolLevel(level)) => {
            Err(ReadError::UnsupportedProtocol(level))
        }
        Err(mqtt5bytes::Error::InvalidProtocol) => Err(ReadError::UnsupportedProtocol(0)),
        Err(e) => Err(read_error_v5_after(e, probe.len() < buf.len())),
    }
}

/// How a fuzzing read ended (see [`fuzz_read`]).
#[cfg(feature = "fuzzing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuzzRead {
    /// A packet was read (and taken off the buffer).
    Packet,
    /// Not enough bytes for a packet yet.
    Incomplete,
    /// The connection would be closed.
    Refused,
}

#[cfg(feature = "fuzzing")]
fn fuzz_outcome<T>(result: Result<T, ReadError>) -> FuzzRead {
    match result {
        Ok(_) => FuzzRead::Packet,
        Err(ReadError::Incomplete) => FuzzRead::Incomplete,
        Err(error) => {
            // The messages are logged: formatting must not panic either.
            let _ = error.to_string();
            FuzzRead::Refused
        }
    }
}

/// [`read_connect`] for the fuzz targets: the outcome, and whether the CONNECT read asked
/// for MQTT 5.
#[cfg(feature = "fuzzing")]
pub fn fuzz_read_connect(buf: &mut BytesMut, max_size: u32) -> (FuzzRead, bool) {
    let result = read_connect(buf, max_size);
    let v5 = matches!(&result, Ok(connect) if connect.version == Version::V5);
    (fuzz_outcome(result), v5)
}

/// [`read`] for the fuzz targets, MQTT 5 or 3.1.1.
#[cfg(feature = "fuzzing")]
pub fn fuzz_read(v5: bool, buf: &mut BytesMut, max_size: u32) -> FuzzRead {
    let version = if v5 { Version::V5 } else { Version::V311 };
    fuzz_outcome(read(version, buf, max_size))
}

/// The strict pre-decode checks for the fuzz targets: the complete frame at the start of
/// `buf` (if any) checked as a CONNECT and as a packet of both versions. Returns the
/// frame's length.
#[cfg(feature = "fuzzing")]
pub fn fuzz_check(buf: &[u8]) -> Option<usize> {
    let len = check::frame_len(buf)?;
    let frame = buf.get(..len)?;
    let _ = check::connect(frame).map_err(|(_, violation)| violation.to_string());
    for version in [Version::V311, Version::V5] {
        let _ = check::packet(version, frame).map_err(|violation| violation.to_string());
    }
    Some(len)
}

/// Maximum Packet Size counts the whole packet, fixed header included (MQTT 5 3.2.2.3.6);
/// rumqttc compares only the remaining length.
fn check_frame_size(buf: &[u8], max_size: u32) -> Result<(), ReadError> {
    match v5::check(buf.iter(), None) {
        Ok(header) if header.frame_length() > max_size as usize => {
            Err(ReadError::TooLarge(header.frame_length()))
        }
        Err(mqtt5bytes::Error::InsufficientBytes(needed))
            if buf.len() + needed > max_size as usize =>
        {
            Err(ReadError::TooLarge(buf.len() + needed))
        }
        // Complete and small enough, incomplete, or malformed: the codec says which.
        _ => Ok(()),
    }
}

/// Read the next packet after CONNECT.
pub(crate) fn read(
    version: Version,
    buf: &mut BytesMut,
    max_size: u32,
) -> Result<Incoming, ReadError> {
    check_frame_size(buf, max_size)?;
    if let Some(len) = check::frame_len(buf) {
        if let Err(violation) = check::packet(version, &buf[..len]) {
            let _ = buf.split_to(len);
            return Err(ReadError::Invalid(violation));
        }
    }
    let before = buf.len();
    match version {
        Version::V311 => v4::Packet::read(buf, max_size as usize)
            .map_err(read_error_v4)
            .and_then(incoming_from_v4),
        Version::V5 => {
            // rumqttc refuses a DISCONNECT without reason code, which MQTT 5 allows.
            if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
                let _ = buf.split_to(2);
                return Ok(Incoming::Disconnect {
                    session_expiry: None,
                    with_will: false,
                });
            }
            // MQTT 5 3.14.2.2.1: a DISCONNECT may stop after its reason code, which
            // rumqttc cannot read: give it the empty property length it expects.
            if buf.len() >= 3 && buf[0] == 0xE0 && buf[1] == 1 {
                let reason = buf[2];
                let _ = buf.split_to(3);
                let mut complete = BytesMut::from(&[0xE0, 0x02, reason, 0x00][..]);
                return v5::Packet::read(&mut complete, None)
                    .map_err(read_error_v5)
                    .and_then(incoming_from_v5);
            }
            let result = v5::Packet::read(buf, Some(max_size));
            let consumed = buf.len() < before;
            result
                .map_err(|e| read_error_v5_after(e, consumed))
                .and_then(incoming_from_v5)
        }
    }
}

/// rumqttc takes a complete frame off the buffer before parsing it: running out of bytes
/// after that means the packet is shorter than its own fields (malformed), not incomplete.
fn read_error_v5_after(e: mqtt5bytes::Error, frame_consumed: bool) -> ReadError {
    match e {
        mqtt5bytes::Error::InsufficientBytes(_) if frame_consumed => {
            ReadError::Malformed("packet shorter than its fields".into())
        }
        other => read_error_v5(other),
    }
}

fn read_error_v4(e: mqtt4bytes::Error) -> ReadError {
    match e {
        mqtt4bytes::Error::InsufficientBytes(_) => ReadError::Incomplete,
        mqtt4bytes::Error::PayloadSizeLimitExceeded(size) => ReadError::TooLarge(size),
        other => ReadError::Malformed(other.to_string()),
    }
}

fn read_error_v5(e: mqtt5bytes::Error) -> ReadError {
    match e {
        mqtt5bytes::Error::InsufficientBytes(_) => ReadError::Incomplete,
        mqtt5bytes::Error::PayloadSizeLimitExceeded { pkt_size, .. } => {
            ReadError::TooLarge(pkt_size)
        }
        other => ReadError::Malformed(other.to_string()),
    }
}

fn connect_from_v4(c: v4::Connect) -> ConnectRequest {
    ConnectRequest {
        version: Version::V311,
        client_id: c.client_id,
        clean_start: c.clean_session,
        keep_alive: c.keep_alive,
        session_expiry: if c.clean_session { 0 } else { u32::MAX },
        receive_maximum: u16::MAX,
        max_packet_size: None,
        topic_alias_max: 0,
        will: c.last_will.map(|w| Will {
            topic: w.topic,
            payload: w.message,
            qos: QoS::from(w.qos),
            retain: w.retain,
            properties: None,
            delay: 0,
        }),
        username: c.login.as_ref().map(|l| l.username.clone()),
        password: c.login.map(|l| l.password),
        authentication_method: None,
    }
}

fn connect_from_v5(
    c: v5::Connect,
    will: Option<v5::LastWill>,
    login: Option<v5::Login>,
) -> ConnectRequest {
    let props = c.properties.unwrap_or_default();
    ConnectRequest {
        version: Version::V5,
        client_id: c.client_id,
        clean_start: c.clean_start,
        keep_alive: c.keep_alive,
        session_expiry: props.session_expiry_interval.unwrap_or(0),
        receive_maximum: props.receive_maximum.unwrap_or(u16::MAX).max(1),
        max_packet_size: props.max_packet_size,
        topic_alias_max: props.topic_alias_max.unwrap_or(0),
        will: will.map(|w| {
            let delay = w
                .properties
                .as_ref()
                .and_then(|p| p.delay_interval)
                .unwrap_or(0);
            Will {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                payload: w.message,
                qos: QoS::from(w.qos),
                retain: w.retain,
                properties: w.properties.map(convert::will_properties_from_v5),
                delay,
            }
        }),
        username: login
            .as_ref()
            .map(|l| l.username.clone())
            .filter(|u| !u.is_empty()),
        password: login.map(|l| l.password).filter(|p| !p.is_empty()),
        authentication_method: props.authentication_method,
    }
}

fn incoming_from_v4(packet: v4::Packet) -> Result<Incoming, ReadError> {
    Ok(match packet {
        v4::Packet::Connect(_) => Incoming::Unexpected("a second CONNECT"),
        v4::Packet::Publish(p) => Incoming::Publish(PublishIn {
            topic: p.topic,
            payload: p.payload,
            qos: QoS::from(p.qos),
            retain: p.retain,
            pkid: p.pkid,
            properties: None,
            topic_alias: None,
        }),
        v4::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
        v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscriptionRequest {
                    filter: f.path,
                    qos: QoS::from(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            subscription_id: None,
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Disconnect => Incoming::Disconnect {
            session_expiry: None,
            with_will: false,
        },
        v4::Packet::ConnAck(_) => Incoming::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Incoming::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Incoming::Unexpected("PINGRESP"),
    })
}

fn incoming_from_v5(packet: v5::Packet) -> Result<Incoming, ReadError> {
    Ok(match packet {
        v5::Packet::Connect(..) => Incoming::Unexpected("a second CONNECT"),
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| ReadError::Malformed("topic is not valid UTF-8".into()))?;
            let (properties, topic_alias) = match p.properties {
                Some(props) => {
                    let topic_alias = props.topic_alias;
                    (Some(convert::properties_from_v5(props)), topic_alias)
                }
                None => (None, None),
            };
            Incoming::Publish(PublishIn {
                topic,
                payload: p.payload,
                qos: QoS::from(p.qos),
                retain: p.retain,
                pkid: p.pkid,
                properties,
                topic_alias,
            })
        }
        v5::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        v5::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
        v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            subscription_id: s.properties.and_then(|p| p.id),
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscriptionRequest {
                    filter: f.path,
                    qos: QoS::from(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH (enhanced authentication)"),
        v5::Packet::ConnAck(_) => Incoming::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Incoming::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Incoming::Unexpected("PINGRESP"),
    })
}

/// Encode one packet for the client. `max_size` is the client's Maximum Packet Size.
pub(crate) fn write(
    version: Version,
    packet: &Outgoing,
    buf: &mut BytesMut,
    max_size: Option<u32>,
) -> Result<(), TooLargeForClient> {
    match version {
        Version::V311 => {
            let packet = to_v4(packet);
            packet
                .write(buf, usize::MAX)
                .map(|_| ())
                .map_err(|_| TooLargeForClient {
                    size: packet.size(),
                    max: u32::MAX,
                })
        }
        Version::V5 => {
            let packet = to_v5(packet);
            let size = packet.size();
            if let Some(max) = max_size {
                if size > max as usize {
                    return Err(TooLargeForClient { size, max });
                }
            }
            packet
                .write(buf, None)
                .map(|_| ())
                .map_err(|_| TooLargeForClient {
                    size,
                    max: max_size.unwrap_or(u32::MAX),
                })
        }
    }
}

fn to_v4(packet: &Outgoing) -> v4::Packet {
    match packet {
        Outgoing::ConnAck(ack) => v4::Packet::ConnAck(v4::ConnAck {
            session_present: ack.session_present,
            code: match ack.code {
                ConnackCode::Accepted => v4::ConnectReturnCode::Success,
                ConnackCode::UnsupportedProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
                ConnackCode::IdentifierRejected => v4::ConnectReturnCode::BadClientId,
                ConnackCode::ServerUnavailable | ConnackCode::QuotaExceeded => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
                ConnackCode::BadCredentials | ConnackCode::BadAuthenticationMethod => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                ConnackCode::NotAuthorized | ConnackCode::ProtocolError => {
                    v4::ConnectReturnCode::NotAuthorized
                }
                // Never sent: a malformed 3.1.1 CONNECT is answered by closing.
                ConnackCode::MalformedPacket => v4::ConnectReturnCode::NotAuthorized,
            },
        }),
        Outgoing::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: p.qos.into(),
            retain: p.retain,
            topic: p.topic.to_string(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Outgoing::PubAck(pkid, _) => v4::Packet::PubAck(v4::PubAck { pkid: *pkid }),
        Outgoing::PubRec(pkid, _) => v4::Packet::PubRec(v4::PubRec { pkid: *pkid }),
        Outgoing::PubRel(pkid) => v4::Packet::PubRel(v4::PubRel { pkid: *pkid }),
        Outgoing::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp { pkid: *pkid }),
        Outgoing::PubRelNotFound(pkid) => v4::Packet::PubRel(v4::PubRel { pkid: *pkid }),
        Outgoing::PubCompNotFound(pkid) => v4::Packet::PubComp(v4::PubComp { pkid: *pkid }),
        Outgoing::SubAck(pkid, codes) => v4::Packet::SubAck(v4::SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    SubAckCode::Granted(q) => v4::SubscribeReasonCode::Success((*q).into()),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        }),
        Outgoing::UnsubAck(pkid, _) => v4::Packet::UnsubAck(v4::UnsubAck { pkid: *pkid }),
        Outgoing::PingResp => v4::Packet::PingResp,
        // 3.1.1 has no server DISCONNECT: the caller closes the socket instead.
        Outgoing::Disconnect(_) => v4::Packet::PingResp,
    }
}

fn to_v5(packet: &Outgoing) -> v5::Packet {
    match packet {
        Outgoing::ConnAck(ack) => {
            let accepted = ack.code == ConnackCode::Accepted;
            let properties = (accepted || ack.reason.is_some()).then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: accepted.then_some(ack.receive_maximum),
                max_qos: None,
                retain_available: accepted.then_some(1),
                max_packet_size: accepted.then_some(ack.max_packet_size),
                assigned_client_identifier: ack.assigned_client_id.clone(),
                topic_alias_max: accepted.then_some(ack.topic_alias_max),
                reason_string: ack.reason.clone(),
                user_properties: Vec::new(),
                wildcard_subscription_available: accepted.then_some(1),
                subscription_identifiers_available: accepted.then_some(1),
                shared_subscription_available: accepted.then_some(1),
                server_keep_alive: ack.server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: ack.session_present,
                code: match ack.code {
                    ConnackCode::Accepted => v5::ConnectReturnCode::Success,
                    ConnackCode::UnsupportedProtocol => {
                        v5::ConnectReturnCode::UnsupportedProtocolVersion
                    }
                    ConnackCode::IdentifierRejected => {
                        v5::ConnectReturnCode::ClientIdentifierNotValid
                    }
                    ConnackCode::ServerUnavailable => v5::ConnectReturnCode::ServerUnavailable,
                    ConnackCode::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                    ConnackCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                    ConnackCode::QuotaExceeded => v5::ConnectReturnCode::QuotaExceeded,
                    ConnackCode::BadAuthenticationMethod => {
                        v5::ConnectReturnCode::BadAuthenticationMethod
                    }
                    ConnackCode::MalformedPacket => v5::ConnectReturnCode::MalformedPacket,
                    ConnackCode::ProtocolError => v5::ConnectReturnCode::ProtocolError,
                },
                properties,
            })
        }
        Outgoing::Publish(p) => {
            let has_props = p.properties.is_some()
                || p.message_expiry.is_some()
                || p.topic_alias.is_some()
                || !p.subscription_ids.is_empty();
            let properties = has_props.then(|| {
                let mut properties = p
                    .properties
                    .as_deref()
                    .map(convert::properties_to_v5)
                    .unwrap_or_default();
                // What is left of the expiry, not what the publisher set.
                properties.message_expiry_interval = p.message_expiry;
                properties.topic_alias = p.topic_alias;
                properties.subscription_identifiers = p.subscription_ids.clone();
                properties
            });
            v5::Packet::Publish(v5::Publish {
                dup: p.dup,
                qos: p.qos.into(),
                retain: p.retain,
                topic: if p.topic_known {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(p.topic.as_bytes())
                },
                pkid: p.pkid,
                payload: p.payload.clone(),
                properties,
            })
        }
        Outgoing::PubAck(pkid, reason) => v5::Packet::PubAck(v5::PubAck {
            pkid: *pkid,
            reason: match reason {
                AckReason::Success => v5::PubAckReason::Success,
                AckReason::NotAuthorized => v5::PubAckReason::NotAuthorized,
            },
            properties: None,
        }),
        Outgoing::PubRec(pkid, reason) => v5::Packet::PubRec(v5::PubRec {
            pkid: *pkid,
            reason: match reason {
                AckReason::Success => v5::PubRecReason::Success,
                AckReason::NotAuthorized => v5::PubRecReason::NotAuthorized,
            },
            properties: None,
        }),
        Outgoing::PubRel(pkid) => v5::Packet::PubRel(v5::PubRel {
            pkid: *pkid,
            reason: v5::PubRelReason::Success,
            properties: None,
        }),
        Outgoing::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp {
            pkid: *pkid,
            reason: v5::PubCompReason::Success,
            properties: None,
        }),
        Outgoing::PubRelNotFound(pkid) => v5::Packet::PubRel(v5::PubRel {
            pkid: *pkid,
            reason: v5::PubRelReason::PacketIdentifierNotFound,
            properties: None,
        }),
        Outgoing::PubCompNotFound(pkid) => v5::Packet::PubComp(v5::PubComp {
            pkid: *pkid,
            reason: v5::PubCompReason::PacketIdentifierNotFound,
            properties: None,
        }),
        Outgoing::SubAck(pkid, codes) => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    SubAckCode::Granted(q) => v5::SubscribeReasonCode::Success((*q).into()),
                    SubAckCode::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    SubAckCode::Unspecified => v5::SubscribeReasonCode::Unspecified,
                    SubAckCode::TopicFilterInvalid => v5::SubscribeReasonCode::TopicFilterInvalid,
                })
                .collect(),
            properties: None,
        }),
        Outgoing::UnsubAck(pkid, found) => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: found
                .iter()
                .map(|f| {
                    if *f {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        }),
        Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
        // Always with properties (a reason string): rumqttc's own decoder cannot read a
        // DISCONNECT that has a reason code but no property length, which MQTT 5 allows.
        Outgoing::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: match reason {
                DisconnectReason::MalformedPacket => v5::DisconnectReasonCode::MalformedPacket,
                DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                DisconnectReason::ServerShuttingDown => {
                    v5::DisconnectReasonCode::ServerShuttingDown
                }
                DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                DisconnectReason::SessionTakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                DisconnectReason::TopicNameInvalid => v5::DisconnectReasonCode::TopicNameInvalid,
                DisconnectReason::ReceiveMaximumExceeded => {
                    v5::DisconnectReasonCode::ReceiveMaximumExceeded
                }
                DisconnectReason::TopicAliasInvalid => v5::DisconnectReasonCode::TopicAliasInvalid,
                DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                DisconnectReason::QuotaExceeded => v5::DisconnectReasonCode::QuotaExceeded,
            },
            properties: Some(v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(reason.text().to_owned()),
                user_properties: Vec::new(),
                server_reference: None,
            }),
        }),
    }
}
