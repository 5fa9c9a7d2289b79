//! MQTT as the gateway speaks it, apart from any one connection: topic names and filters
//! ([`topic`]), and the one translation between our [`QoS`](crate::model::QoS) and
//! [`MessageProperties`](crate::model::MessageProperties) and rumqttc's MQTT 3.1.1 and 5
//! types, used by the broker's codec and by the uplinks alike.

pub(crate) mod convert;
pub mod topic;
