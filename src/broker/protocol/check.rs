//! Strict pre-validation of a client's packet before rumqttc decodes it.
//!
//! rumqttc's decoders accept packets that MQTT 3.1.1 and 5 call malformed or a protocol
//! error: reserved bits set, wrong fixed-header flags, packet id 0, a single-valued MQTT 5
//! property given twice, an UNSUBSCRIBE without filters, and more (the list is in
//! docs/broker.md). This module walks the fixed header, the variable header and the property
//! lists of every packet type a client sends, and of the subscription options in SUBSCRIBE,
//! and refuses those. It owns no state, allocates nothing and reads each byte of the
//! headers at most once; message payloads are never read. Every read is bounds-checked:
//! a packet shorter than its own fields is malformed, never a panic.
//!
//! What the codec refuses anyway (invalid UTF-8, unknown packet types) is left to it.

use super::Version;

/// How the specification classes a refused packet (MQTT 5 reason 0x81 or 0x82).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ViolationKind {
    Malformed,
    ProtocolError,
}

/// Why a packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) struct Violation {
    pub(crate) kind: ViolationKind,
    pub(crate) what: &'static str,
    /// The property or packet type concerned, by its name in the specification.
    pub(crate) detail: Option<&'static str>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ViolationKind::Malformed => "malformed packet",
            ViolationKind::ProtocolError => "protocol error",
        };
        write!(f, "{kind}: {}", self.what)?;
        match self.detail {
            Some(name) => write!(f, " ({name})"),
            None => Ok(()),
        }
    }
}

fn malformed(what: &'static str) -> Violation {
    Violation {
        kind: ViolationKind::Malformed,
        what,
        detail: None,
    }
}

fn protocol_error(what: &'static str) -> Violation {
    Violation {
        kind: ViolationKind::ProtocolError,
        what,
        detail: None,
    }
}

const SHORT: &str = "packet shorter than its fields";

/// The length of the complete frame at the start of `buf` (fixed header included), or
/// `None` when it is not complete yet or its remaining length is not valid (the codec
/// reports that).
pub(crate) fn frame_len(buf: &[u8]) -> Option<usize> {
    fixed_header(buf).map(|(_, total)| total)
}

/// The fixed header's length and the frame's, when the frame is complete.
fn fixed_header(buf: &[u8]) -> Option<(usize, usize)> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let header = 1 + (i + 1);
            let total = header + remaining;
            return (buf.len() >= total).then_some((header, total));
        }
    }
    None
}

/// Check a complete CONNECT frame. The protocol level comes from the packet; a CONNECT
/// for another protocol (name or level) passes, for the codec to refuse. On refusal, the
/// version found is returned with the reason, so an MQTT 5 client can get a CONNACK.
pub(crate) fn connect(frame: &[u8]) -> Result<(), (Version, Violation)> {
    let Some((first, body)) = split(frame) else {
        return Ok(());
    };
    let mut r = Reader(body);
    let (Ok(name), Ok(level)) = (r.binary(), r.u8()) else {
        return Ok(());
    };
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        _ => return Ok(()),
    };
    connect_body(version, first, r).map_err(|v| (version, v))
}

fn connect_body(version: Version, first: u8, mut r: Reader<'_>) -> Result<(), Violation> {
    if first & 0x0F != 0 {
        return Err(malformed("reserved fixed-header flags set in CONNECT"));
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(malformed("reserved connect flag set"));
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    if !will && (will_qos != 0 || will_retain) {
        return Err(malformed(
            "will QoS or will retain set without the will flag",
        ));
    }
    if will && will_qos == 3 {
        return Err(malformed("will QoS 3"));
    }
    let username = flags & 0x80 != 0;
    let password = flags & 0x40 != 0;
    if version == Version::V311 && password && !username {
        return Err(malformed("password flag set without the user name flag"));
    }
    r.u16()?; // keep alive
    if version == Version::V5 {
        properties(&mut r, &CONNECT_PROPERTIES)?;
    }
    r.binary()?; // client identifier
    if will {
        if version == Version::V5 {
            properties(&mut r, &WILL_PROPERTIES)?;
        }
        r.binary()?; // will topic
        r.binary()?; // will payload
    }
    Ok(())
}

/// Check a complete frame received after CONNECT on a connection of `version`.
pub(crate) fn packet(version: Version, frame: &[u8]) -> Result<(), Violation> {
    let Some((first, body)) = split(frame) else {
        return Ok(());
    };
    let flags = first & 0x0F;
    let r = Reader(body);
    match first >> 4 {
        PUBLISH => publish(version, flags, r),
        PUBACK | PUBREC | PUBCOMP => {
            expect_flags(flags, 0b0000, "PUBACK, PUBREC or PUBCOMP")?;
            acknowledgement(version, r)
        }
        PUBREL => {
            expect_flags(flags, 0b0010, "PUBREL")?;
            acknowledgement(version, r)
        }
        SUBSCRIBE => {
            expect_flags(flags, 0b0010, "SUBSCRIBE")?;
            subscribe(version, r)
        }
        UNSUBSCRIBE => {
            expect_flags(flags, 0b0010, "UNSUBSCRIBE")?;
            unsubscribe(version, r)
        }
        PINGREQ => expect_flags(flags, 0b0000, "PINGREQ"),
        DISCONNECT => {
            expect_flags(flags, 0b0000, "DISCONNECT")?;
            disconnect(version, r)
        }
        AUTH if version == Version::V5 => expect_flags(flags, 0b0000, "AUTH"),
        // A second CONNECT, the packets only a server sends, reserved types: the codec or
        // the connection refuses them.
        _ => Ok(()),
    }
}

const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// The first byte and the body of a complete frame.
fn split(frame: &[u8]) -> Option<(u8, &[u8])> {
    let (header, total) = fixed_header(frame)?;
    Some((*frame.first()?, frame.get(header..total)?))
}

fn expect_flags(flags: u8, expected: u8, packet: &'static str) -> Result<(), Violation> {
    if flags == expected {
        Ok(())
    } else {
        Err(Violation {
            kind: ViolationKind::Malformed,
            what: "wrong fixed-header flags",
            detail: Some(packet),
        })
    }
}

fn publish(version: Version, flags: u8, mut r: Reader<'_>) -> Result<(), Violation> {
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Err(malformed("PUBLISH with QoS 3"));
    }
    if qos == 0 && flags & 0x08 != 0 {
        return Err(malformed("PUBLISH with QoS 0 and DUP set"));
    }
    r.binary()?; // topic name
    if qos > 0 && r.u16()? == 0 {
        return Err(malformed("PUBLISH with packet id 0"));
    }
    if version == Version::V5 {
        properties(&mut r, &PUBLISH_PROPERTIES)?;
    }
    Ok(())
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then (MQTT 5) an optional reason code and
/// an optional property list.
fn acknowledgement(version: Version, mut r: Reader<'_>) -> Result<(), Violation> {
    r.u16()?;
    if version == Version::V5 && !r.is_empty() {
        r.u8()?; // reason code
        if !r.is_empty() {
            properties(&mut r, &ACK_PROPERTIES)?;
        }
    }
    Ok(())
}

fn subscribe(version: Version, mut r: Reader<'_>) -> Result<(), Violation> {
    if r.u16()? == 0 {
        return Err(malformed("SUBSCRIBE with packet id 0"));
    }
    if version == Version::V5 {
        properties(&mut r, &SUBSCRIBE_PROPERTIES)?;
    }
    if r.is_empty() {
        return Err(match version {
            Version::V5 => protocol_error("SUBSCRIBE without topic filters"),
            Version::V311 => malformed("SUBSCRIBE without topic filters"),
        });
    }
    while !r.is_empty() {
        r.binary()?; // topic filter
        let options = r.u8()?;
        match version {
            Version::V311 => {
                if options & 0xFC != 0 {
                    return Err(malformed("reserved subscription option bits set"));
                }
                if options & 0x03 == 3 {
                    return Err(malformed("subscription with QoS 3"));
                }
            }
            Version::V5 => {
                if options & 0xC0 != 0 {
                    return Err(malformed("reserved subscription option bits set"));
                }
                if options & 0x03 == 3 {
                    return Err(protocol_error("subscription with QoS 3"));
                }
                if (options >> 4) & 0x03 == 3 {
                    return Err(protocol_error("subscription with retain handling 3"));
                }
            }
        }
    }
    Ok(())
}

fn unsubscribe(version: Version, mut r: Reader<'_>) -> Result<(), Violation> {
    if r.u16()? == 0 {
        return Err(malformed("UNSUBSCRIBE with packet id 0"));
    }
    if version == Version::V5 {
        properties(&mut r, &UNSUBSCRIBE_PROPERTIES)?;
    }
    if r.is_empty() {
        return Err(match version {
            Version::V5 => protocol_error("UNSUBSCRIBE without topic filters"),
            Version::V311 => malformed("UNSUBSCRIBE without topic filters"),
        });
    }
    while !r.is_empty() {
        r.binary()?;
    }
    Ok(())
}

/// MQTT 5 DISCONNECT: an optional reason code, then an optional property list. (3.1.1
/// DISCONNECT has no body; the codec ignores one.)
fn disconnect(version: Version, mut r: Reader<'_>) -> Result<(), Violation> {
    if version == Version::V5 && !r.is_empty() {
        r.u8()?;
        if !r.is_empty() {
            properties(&mut r, &DISCONNECT_PROPERTIES)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// MQTT 5 properties (section 2.2.2.2 of the specification)
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Value {
    Byte,
    TwoBytes,
    FourBytes,
    VarInt,
    /// UTF-8 string or binary data: a two-byte length and the bytes.
    Bytes,
    /// A UTF-8 string pair.
    Pair,
}

const USER_PROPERTY: u8 = 0x26;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;

/// Every property a client may send: identifier, name, value type. Each may appear at most
/// once in a property list except User Property.
const PROPERTIES: [(u8, &str, Value); 19] = [
    (0x01, "Payload Format Indicator", Value::Byte),
    (0x02, "Message Expiry Interval", Value::FourBytes),
    (0x03, "Content Type", Value::Bytes),
    (0x08, "Response Topic", Value::Bytes),
    (0x09, "Correlation Data", Value::Bytes),
    (
        SUBSCRIPTION_IDENTIFIER,
        "Subscription Identifier",
        Value::VarInt,
    ),
    (0x11, "Session Expiry Interval", Value::FourBytes),
    (0x15, "Authentication Method", Value::Bytes),
    (0x16, "Authentication Data", Value::Bytes),
    (0x17, "Request Problem Information", Value::Byte),
    (0x18, "Will Delay Interval", Value::FourBytes),
    (0x19, "Request Response Information", Value::Byte),
    (0x1C, "Server Reference", Value::Bytes),
    (0x1F, "Reason String", Value::Bytes),
    (0x21, "Receive Maximum", Value::TwoBytes),
    (0x22, "Topic Alias Maximum", Value::TwoBytes),
    (0x23, "Topic Alias", Value::TwoBytes),
    (USER_PROPERTY, "User Property", Value::Pair),
    (0x27, "Maximum Packet Size", Value::FourBytes),
];

/// Which properties a property list may hold.
struct Rules {
    /// Identifiers valid in this list (any other is malformed).
    allowed: &'static [u8],
    /// Identifiers valid for the packet type but not from a client (a protocol error).
    not_from_client: &'static [u8],
}

const CONNECT_PROPERTIES: Rules = Rules {
    allowed: &[
        0x11,
        0x21,
        0x27,
        0x22,
        0x19,
        0x17,
        USER_PROPERTY,
        0x15,
        0x16,
    ],
    not_from_client: &[],
};
const WILL_PROPERTIES: Rules = Rules {
    allowed: &[0x18, 0x01, 0x02, 0x03, 0x08, 0x09, USER_PROPERTY],
    not_from_client: &[],
};
const PUBLISH_PROPERTIES: Rules = Rules {
    allowed: &[0x01, 0x02, 0x23, 0x08, 0x09, USER_PROPERTY, 0x03],
    // MQTT-3.3.4-6: only the server puts subscription identifiers in a PUBLISH.
    not_from_client: &[SUBSCRIPTION_IDENTIFIER],
};
const ACK_PROPERTIES: Rules = Rules {
    allowed: &[0x1F, USER_PROPERTY],
    not_from_client: &[],
};
const SUBSCRIBE_PROPERTIES: Rules = Rules {
    allowed: &[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY],
    not_from_client: &[],
};
const UNSUBSCRIBE_PROPERTIES: Rules = Rules {
    allowed: &[USER_PROPERTY],
    not_from_client: &[],
};
const DISCONNECT_PROPERTIES: Rules = Rules {
    allowed: &[0x11, 0x1F, USER_PROPERTY, 0x1C],
    not_from_client: &[],
};

/// Walk a property list: its length, then each property, which must be allowed, of its
/// type, within the list, and (but for User Property) not seen before in it.
fn properties(r: &mut Reader<'_>, rules: &Rules) -> Result<(), Violation> {
    let len = r.varint()?;
    let mut list = Reader(r.take(len)?);
    // Identifiers are below 64 (the specification's highest is 0x2A).
    let mut seen = 0u64;
    while !list.is_empty() {
        let id = list.varint()?;
        let entry = u8::try_from(id)
            .ok()
            .and_then(|id| PROPERTIES.iter().find(|(known, _, _)| *known == id));
        let Some(&(id, name, value)) = entry else {
            // Unknown, or one only a server sends (CONNACK's): not valid from a client.
            return Err(malformed("unknown property identifier"));
        };
        if rules.not_from_client.contains(&id) {
            return Err(Violation {
                kind: ViolationKind::ProtocolError,
                what: "property only a server may send",
                detail: Some(name),
            });
        }
        if !rules.allowed.contains(&id) {
            return Err(Violation {
                kind: ViolationKind::Malformed,
                what: "property not valid in this packet",
                detail: Some(name),
            });
        }
        let bit = 1u64 << id;
        if seen & bit != 0 && id != USER_PROPERTY {
            return Err(Violation {
                kind: ViolationKind::ProtocolError,
                what: "property given more than once",
                detail: Some(name),
            });
        }
        seen |= bit;
        match value {
            Value::Byte => {
                list.u8()?;
            }
            Value::TwoBytes => {
                list.u16()?;
            }
            Value::FourBytes => {
                list.take(4)?;
            }
            Value::VarInt => {
                if list.varint()? == 0 && id == SUBSCRIPTION_IDENTIFIER {
                    return Err(Violation {
                        kind: ViolationKind::ProtocolError,
                        what: "value 0",
                        detail: Some(name),
                    });
                }
            }
            Value::Bytes => {
                list.binary()?;
            }
            Value::Pair => {
                list.binary()?;
                list.binary()?;
            }
        }
    }
    Ok(())
}

/// A bounds-checked cursor over a packet's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Violation> {
        if n > self.0.len() {
            return Err(malformed(SHORT));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Violation> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Violation> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A two-byte length and that many bytes (a UTF-8 string or binary data).
    fn binary(&mut self) -> Result<&'a [u8], Violation> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A variable byte integer: at most four bytes.
    fn varint(&mut self) -> Result<usize, Violation> {
        let mut value = 0usize;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= usize::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("variable byte integer longer than four bytes"))
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use rumqttc::mqttbytes::{self as mqtt4bytes, v4};
    use rumqttc::v5::mqttbytes::{self as mqtt5bytes, v5};

    use super::*;

    fn users() -> Vec<(String, String)> {
        vec![("k".into(), "1".into()), ("k".into(), "2".into())]
    }

    /// Every packet a client sends, encoded by rumqttc's MQTT 5 codec, with every property
    /// it can carry (and without any).
    fn v5_packets() -> Vec<v5::Packet> {
        use mqtt5bytes::QoS;
        let connect_properties = v5::ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(10),
            max_packet_size: Some(65536),
            topic_alias_max: Some(5),
            request_response_info: Some(1),
            request_problem_info: Some(0),
            user_properties: users(),
            authentication_method: Some("m".into()),
            authentication_data: Some(Bytes::from_static(b"d")),
        };
        let will = v5::LastWill {
            topic: Bytes::from_static(b"will/t"),
            message: Bytes::from_static(b"gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Some(v5::LastWillProperties {
                delay_interval: Some(5),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: users(),
            }),
        };
        let connect = |properties, will, login| {
            v5::Packet::Connect(
                v5::Connect {
                    keep_alive: 30,
                    client_id: "c".into(),
                    clean_start: true,
                    properties,
                },
                will,
                login,
            )
        };
        let publish_properties = v5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            topic_alias: Some(1),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: users(),
            subscription_identifiers: Vec::new(),
            content_type: Some("text/plain".into()),
        };
        let publish = |qos, dup, properties| {
            v5::Packet::Publish(v5::Publish {
                dup,
                qos,
                retain: true,
                topic: Bytes::from_static(b"a/b"),
                pkid: if qos == QoS::AtMostOnce { 0 } else { 7 },
                payload: Bytes::from_static(b"payload"),
                properties,
            })
        };
        let filter = |qos, nolocal, preserve_retain, retain_forward_rule| v5::Filter {
            path: "a/+/#".into(),
            qos,
            nolocal,
            preserve_retain,
            retain_forward_rule,
        };
        let ack_properties = || {
            Some(v5::PubAckProperties {
                reason_string: Some("why".into()),
                user_properties: users(),
            })
        };
        let rel_properties = || {
            Some(v5::PubRelProperties {
                reason_string: Some("why".into()),
                user_properties: users(),
            })
        };
        vec![
            connect(None, None, None),
            connect(
                Some(connect_properties),
                Some(will.clone()),
                Some(v5::Login::new("u", "p")),
            ),
            connect(None, Some(will), Some(v5::Login::new("", "p"))),
            publish(QoS::AtMostOnce, false, None),
            publish(QoS::AtLeastOnce, true, Some(publish_properties.clone())),
            publish(QoS::ExactlyOnce, false, Some(publish_properties)),
            v5::Packet::PubAck(v5::PubAck::new(7, None)),
            v5::Packet::PubAck(v5::PubAck {
                pkid: 7,
                reason: v5::PubAckReason::UnspecifiedError,
                properties: ack_properties(),
            }),
            v5::Packet::PubRec(v5::PubRec::new(7, None)),
            v5::Packet::PubRel(v5::PubRel::new(7, None)),
            v5::Packet::PubRel(v5::PubRel {
                pkid: 7,
                reason: v5::PubRelReason::PacketIdentifierNotFound,
                properties: rel_properties(),
            }),
            v5::Packet::PubComp(v5::PubComp::new(7, None)),
            v5::Packet::Subscribe(v5::Subscribe {
                pkid: 8,
                filters: vec![
                    filter(
                        QoS::AtMostOnce,
                        false,
                        false,
                        v5::RetainForwardRule::OnEverySubscribe,
                    ),
                    filter(QoS::ExactlyOnce, true, true, v5::RetainForwardRule::Never),
                    filter(
                        QoS::AtLeastOnce,
                        false,
                        true,
                        v5::RetainForwardRule::OnNewSubscribe,
                    ),
                ],
                properties: Some(v5::SubscribeProperties {
                    id: Some(268_435_455),
                    user_properties: users(),
                }),
            }),
            v5::Packet::Subscribe(v5::Subscribe {
                pkid: 10,
                ..v5::Subscribe::new(
                    filter(
                        QoS::AtLeastOnce,
                        false,
                        false,
                        v5::RetainForwardRule::OnEverySubscribe,
                    ),
                    None,
                )
            }),
            v5::Packet::Unsubscribe(v5::Unsubscribe {
                pkid: 9,
                filters: vec!["a/b".into(), "c/#".into()],
                properties: Some(v5::UnsubscribeProperties {
                    user_properties: users(),
                }),
            }),
            v5::Packet::PingReq(v5::PingReq),
            // (A DISCONNECT without properties is left out: rumqttc writes it with
            // remaining length 1 and a stray byte after it. Its short forms are checked in
            // `short_disconnects_pass` below.)
            v5::Packet::Disconnect(v5::Disconnect {
                reason_code: v5::DisconnectReasonCode::NormalDisconnection,
                properties: Some(v5::DisconnectProperties {
                    session_expiry_interval: Some(0),
                    reason_string: Some("bye".into()),
                    user_properties: users(),
                    server_reference: None,
                }),
            }),
        ]
    }

    fn v4_packets() -> Vec<v4::Packet> {
        use mqtt4bytes::QoS;
        let mut full = v4::Connect::new("c");
        full.clean_session = false;
        full.last_will = Some(v4::LastWill::new("will/t", "gone", QoS::ExactlyOnce, true));
        full.login = Some(v4::Login::new("u", "p"));
        let mut user_only = v4::Connect::new("c");
        user_only.login = Some(v4::Login::new("u", ""));
        let publish = |qos, dup| {
            let mut publish = v4::Publish::new("a/b", qos, "payload");
            publish.dup = dup;
            publish.retain = true;
            if qos != QoS::AtMostOnce {
                publish.pkid = 7;
            }
            v4::Packet::Publish(publish)
        };
        let mut subscribe = v4::Subscribe::new("a/+", QoS::AtMostOnce);
        subscribe.pkid = 8;
        subscribe.add("b/#".into(), QoS::ExactlyOnce);
        let mut unsubscribe = v4::Unsubscribe::new("a/+");
        unsubscribe.pkid = 9;
        vec![
            v4::Packet::Connect(v4::Connect::new("c")),
            v4::Packet::Connect(full),
            v4::Packet::Connect(user_only),
            publish(QoS::AtMostOnce, false),
            publish(QoS::AtLeastOnce, true),
            publish(QoS::ExactlyOnce, false),
            v4::Packet::PubAck(v4::PubAck::new(7)),
            v4::Packet::PubRec(v4::PubRec::new(7)),
            v4::Packet::PubRel(v4::PubRel::new(7)),
            v4::Packet::PubComp(v4::PubComp::new(7)),
            v4::Packet::Subscribe(subscribe),
            v4::Packet::Unsubscribe(unsubscribe),
            v4::Packet::PingReq,
            v4::Packet::Disconnect,
        ]
    }

    fn encoded_v5() -> Vec<(String, Vec<u8>)> {
        v5_packets()
            .into_iter()
            .map(|packet| {
                let mut buf = BytesMut::new();
                packet.write(&mut buf, None).expect("rumqttc encodes it");
                (format!("{packet:?}"), buf.to_vec())
            })
            .collect()
    }

    fn encoded_v4() -> Vec<(String, Vec<u8>)> {
        v4_packets()
            .into_iter()
            .map(|packet| {
                let mut buf = BytesMut::new();
                packet
                    .write(&mut buf, usize::MAX)
                    .expect("rumqttc encodes it");
                (format!("{packet:?}"), buf.to_vec())
            })
            .collect()
    }

    fn check(version: Version, frame: &[u8]) -> Result<(), Violation> {
        assert_eq!(frame_len(frame), Some(frame.len()), "{frame:02x?}");
        if frame[0] >> 4 == 1 {
            connect(frame).map_err(|(found, violation)| {
                assert_eq!(found, version);
                violation
            })
        } else {
            packet(version, frame)
        }
    }

    #[test]
    fn every_packet_rumqttc_encodes_for_a_client_passes_in_mqtt_5() {
        for (what, frame) in encoded_v5() {
            assert_eq!(check(Version::V5, &frame), Ok(()), "{what}: {frame:02x?}");
        }
    }

    #[test]
    fn every_packet_rumqttc_encodes_for_a_client_passes_in_mqtt_3_1_1() {
        for (what, frame) in encoded_v4() {
            assert_eq!(check(Version::V311, &frame), Ok(()), "{what}: {frame:02x?}");
        }
    }

    /// The fixed header as an encoder writes it for a body of `len` bytes.
    fn reframe(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn a_packet_cut_short_anywhere_is_refused_or_passed_to_the_codec_without_panicking() {
        let all = encoded_v5()
            .into_iter()
            .map(|(w, f)| (Version::V5, w, f))
            .chain(encoded_v4().into_iter().map(|(w, f)| (Version::V311, w, f)));
        for (version, _, frame) in all {
            let (header, _) = fixed_header(&frame).expect("complete");
            let body = &frame[header..];
            for cut in 0..body.len() {
                let _ = check(version, &reframe(frame[0], &body[..cut]));
            }
        }
    }

    #[test]
    fn short_disconnects_pass() {
        assert_eq!(packet(Version::V5, &[0xE0, 0x00]), Ok(()));
        assert_eq!(packet(Version::V5, &[0xE0, 0x01, 0x04]), Ok(()));
        assert_eq!(packet(Version::V5, &[0xE0, 0x02, 0x04, 0x00]), Ok(()));
        assert_eq!(packet(Version::V311, &[0xE0, 0x00]), Ok(()));
    }

    #[test]
    fn random_frames_never_panic() {
        // A fixed linear congruential sequence: reproducible, no extra dependency.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u8
        };
        for _ in 0..20_000 {
            let first = next();
            let len = usize::from(next() % 48);
            let body: Vec<u8> = (0..len).map(|_| next()).collect();
            let frame = reframe(first, &body);
            let _ = connect(&frame);
            let _ = packet(Version::V5, &frame);
            let _ = packet(Version::V311, &frame);
        }
    }

    #[test]
    fn incomplete_frames_and_bad_remaining_lengths_are_left_to_the_codec() {
        assert_eq!(frame_len(&[]), None);
        assert_eq!(frame_len(&[0x30]), None);
        assert_eq!(frame_len(&[0x30, 0x02, 0x00]), None);
        assert_eq!(frame_len(&[0x30, 0x80, 0x01]), None);
        assert_eq!(frame_len(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), None);
        assert_eq!(frame_len(&[0xC0, 0x00, 0xC0]), Some(2));
        assert_eq!(packet(Version::V5, &[0x82, 0x05]), Ok(()));
    }

    fn kind(result: Result<(), Violation>) -> Option<ViolationKind> {
        result.err().map(|v| v.kind)
    }

    #[test]
    fn what_each_rule_refuses_and_how_it_is_classed() {
        use ViolationKind::{Malformed, ProtocolError};
        let v5 = |frame: &[u8]| kind(packet(Version::V5, frame));
        let v311 = |frame: &[u8]| kind(packet(Version::V311, frame));
        // Fixed-header flags.
        assert_eq!(v5(&[0x80, 0x06, 0, 1, 0, 0, 1, b'a']), Some(Malformed));
        assert_eq!(v311(&[0xA0, 0x05, 0, 1, 0, 1, b'a']), Some(Malformed));
        assert_eq!(v311(&[0x62, 0x02, 0, 1]), None);
        assert_eq!(v311(&[0x60, 0x02, 0, 1]), Some(Malformed));
        // Packet id 0.
        assert_eq!(v311(&[0x82, 0x06, 0, 0, 0, 1, b'a', 0]), Some(Malformed));
        assert_eq!(v311(&[0xA2, 0x05, 0, 0, 0, 1, b'a']), Some(Malformed));
        // No filters.
        assert_eq!(v5(&[0xA2, 0x03, 0, 1, 0]), Some(ProtocolError));
        assert_eq!(v311(&[0xA2, 0x02, 0, 1]), Some(Malformed));
        // Subscription options.
        assert_eq!(
            v5(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x40]),
            Some(Malformed)
        );
        assert_eq!(
            v5(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x03]),
            Some(ProtocolError)
        );
        assert_eq!(
            v5(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x30]),
            Some(ProtocolError)
        );
        assert_eq!(v5(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x2E]), None);
        assert_eq!(v311(&[0x82, 0x06, 0, 1, 0, 1, b'a', 0x04]), Some(Malformed));
        // Properties: twice, user property twice, subscription identifier 0.
        let topic_alias_twice = [0x30, 0x0A, 0, 1, b't', 6, 0x23, 0, 1, 0x23, 0, 2];
        assert_eq!(v5(&topic_alias_twice), Some(ProtocolError));
        let users_twice = [
            0x30, 0x10, 0, 1, b't', 12, 0x26, 0, 1, b'k', 0, 0, 0x26, 0, 1, b'k', 0, 0,
        ];
        assert_eq!(v5(&users_twice), None);
        assert_eq!(
            v5(&[0x82, 0x08, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 0]),
            Some(ProtocolError)
        );
        // QoS 0 with DUP.
        assert_eq!(v311(&[0x38, 0x03, 0, 1, b't']), Some(Malformed));
        // CONNECT.
        let connect_flags = |version: u8, flags: u8| {
            let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version, flags, 0, 60];
            if version == 5 {
                body.push(0);
            }
            body.extend_from_slice(&[0, 1, b'c']);
            connect(&reframe(0x10, &body)).err().map(|(_, v)| v.kind)
        };
        assert_eq!(connect_flags(4, 0x02), None);
        assert_eq!(connect_flags(4, 0x03), Some(Malformed));
        assert_eq!(connect_flags(5, 0x03), Some(Malformed));
        assert_eq!(connect_flags(4, 0x0A), Some(Malformed));
        assert_eq!(connect_flags(4, 0x22), Some(Malformed));
        assert_eq!(connect_flags(4, 0x42), Some(Malformed));
        // Another protocol: left to the codec.
        assert_eq!(connect_flags(3, 0x03), None);
    }
}
