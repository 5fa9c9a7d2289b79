//! Our QoS and message properties to and from rumqttc's MQTT 3.1.1 (`rumqttc::mqttbytes`)
//! and MQTT 5 (`rumqttc::v5::mqttbytes`) types. The broker's packet codec and the uplinks'
//! clients both convert here, so a property added to [`MessageProperties`] is carried by
//! both or by neither.

use rumqttc::mqttbytes as v4;
use rumqttc::v5::mqttbytes::{self as v5, v5::LastWillProperties, v5::PublishProperties};

use crate::model::{MessageProperties, QoS};

impl From<v4::QoS> for QoS {
    fn from(qos: v4::QoS) -> QoS {
        match qos {
            v4::QoS::AtMostOnce => QoS::AtMostOnce,
            v4::QoS::AtLeastOnce => QoS::AtLeastOnce,
            v4::QoS::ExactlyOnce => QoS::ExactlyOnce,
        }
    }
}

impl From<QoS> for v4::QoS {
    fn from(qos: QoS) -> v4::QoS {
        match qos {
            QoS::AtMostOnce => v4::QoS::AtMostOnce,
            QoS::AtLeastOnce => v4::QoS::AtLeastOnce,
            QoS::ExactlyOnce => v4::QoS::ExactlyOnce,
        }
    }
}

impl From<v5::QoS> for QoS {
    fn from(qos: v5::QoS) -> QoS {
        match qos {
            v5::QoS::AtMostOnce => QoS::AtMostOnce,
            v5::QoS::AtLeastOnce => QoS::AtLeastOnce,
            v5::QoS::ExactlyOnce => QoS::ExactlyOnce,
        }
    }
}

impl From<QoS> for v5::QoS {
    fn from(qos: QoS) -> v5::QoS {
        match qos {
            QoS::AtMostOnce => v5::QoS::AtMostOnce,
            QoS::AtLeastOnce => v5::QoS::AtLeastOnce,
            QoS::ExactlyOnce => v5::QoS::ExactlyOnce,
        }
    }
}

/// The message properties of a rumqttc MQTT 5 value that carries them under MQTT's names
/// (a PUBLISH's properties, a will's), moved out of it.
macro_rules! message_properties {
    ($properties:expr) => {{
        let p = $properties;
        MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
        }
    }};
}

/// The message properties of a received MQTT 5 PUBLISH. Its per-hop properties (topic
/// alias, subscription identifiers) are the connection's business, not the message's.
pub(crate) fn properties_from_v5(p: PublishProperties) -> MessageProperties {
    message_properties!(p)
}

/// The message properties of an MQTT 5 will (its delay is the session's business).
pub(crate) fn will_properties_from_v5(p: LastWillProperties) -> MessageProperties {
    message_properties!(p)
}

/// The properties of an MQTT 5 PUBLISH carrying a message with these properties, without
/// per-hop properties (the caller adds a topic alias or subscription identifiers).
pub(crate) fn properties_to_v5(p: &MessageProperties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn qos_survives_a_round_trip_through_both_protocol_versions() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            assert_eq!(QoS::from(v4::QoS::from(qos)), qos);
            assert_eq!(QoS::from(v5::QoS::from(qos)), qos);
        }
    }

    #[test]
    fn message_properties_survive_a_round_trip_through_mqtt5() {
        let properties = MessageProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into())],
        };
        let wire = properties_to_v5(&properties);
        assert_eq!(wire.topic_alias, None);
        assert!(wire.subscription_identifiers.is_empty());
        assert_eq!(properties_from_v5(wire), properties);
    }
}
