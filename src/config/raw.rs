//! The configuration file as written: serde structs that mirror the TOML layout, reject
//! unknown keys and keep the span of every value a later check may need to point at.
//!
//! Almost every key is an `Option` so that a missing required key is reported by
//! validation together with every other problem, instead of stopping serde. Durations and
//! sizes stay strings here and are parsed during validation for the same reason.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

pub(crate) type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub(crate) id: Option<S<String>>,
    pub(crate) data_dir: Option<S<String>>,
    pub(crate) log_level: Option<S<String>>,
    pub(crate) status_topic: Option<S<String>>,
    pub(crate) shutdown_timeout: Option<S<String>>,
    pub(crate) worker_threads: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub(crate) allow_anonymous: Option<S<bool>>,
    pub(crate) password_file: Option<S<String>>,
    pub(crate) max_packet_size: Option<S<RawSize>>,
    pub(crate) max_queued_messages: Option<S<i64>>,
    pub(crate) max_inflight: Option<S<i64>>,
    pub(crate) max_queued_bytes: Option<S<RawSize>>,
    pub(crate) queue_memory: Option<S<RawSize>>,
    pub(crate) durability: Option<S<String>>,
    pub(crate) commit_window: Option<S<String>>,
    pub(crate) slow_client_timeout: Option<S<String>>,
    pub(crate) store_file: Option<S<String>>,
    pub(crate) acl_file: Option<S<String>>,
    pub(crate) sys_interval: Option<S<String>>,
    pub(crate) max_keep_alive: Option<S<String>>,
    pub(crate) subscribe_denied_reason: Option<S<String>>,
    pub(crate) listeners: Option<Vec<S<RawListener>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub(crate) bind: Option<S<String>>,
    pub(crate) websocket: Option<S<bool>>,
    pub(crate) websocket_path: Option<S<String>>,
    pub(crate) tls: Option<S<RawListenerTls>>,
    pub(crate) max_connections: Option<S<i64>>,
    pub(crate) max_handshakes: Option<S<i64>>,
    pub(crate) max_connections_per_address: Option<S<i64>>,
    pub(crate) connect_timeout: Option<S<String>>,
}

/// A listener's `tls = { ... }` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub(crate) cert: Option<S<String>>,
    pub(crate) key: Option<S<String>>,
    pub(crate) client_ca: Option<S<String>>,
    pub(crate) require_client_cert: Option<S<bool>>,
    pub(crate) identity_as_username: Option<S<bool>>,
}

/// A `[[devices]]` entry with `driver = "simulated"`. Each driver gets its own struct (the
/// common keys repeated) so that `deny_unknown_fields` rejects keys of other drivers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSimulatedDevice {
    pub(crate) name: Option<S<String>>,
    #[allow(dead_code)] // read before this struct is chosen
    pub(crate) driver: Option<S<String>>,
    pub(crate) topic: Option<S<String>>,
    pub(crate) payload: Option<S<String>>,
    pub(crate) poll: Option<S<String>>,
    pub(crate) points: Option<S<Vec<S<RawSimulatedPoint>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSimulatedPoint {
    pub(crate) name: Option<S<String>>,
    pub(crate) waveform: Option<S<String>>,
    pub(crate) min: Option<S<f64>>,
    pub(crate) max: Option<S<f64>>,
    pub(crate) period: Option<S<String>>,
    pub(crate) step: Option<S<f64>>,
    pub(crate) value: Option<S<RawScalar>>,
    pub(crate) unit: Option<String>,
    pub(crate) writable: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUplink {
    pub(crate) name: Option<S<String>>,
    pub(crate) url: Option<S<String>>,
    pub(crate) protocol: Option<S<RawScalar>>,
    pub(crate) client_id: Option<S<String>>,
    pub(crate) keep_alive: Option<S<String>>,
    pub(crate) username: Option<S<String>>,
    pub(crate) password_file: Option<S<String>>,
    pub(crate) password_env: Option<S<String>>,
    pub(crate) ca: Option<S<String>>,
    pub(crate) cert: Option<S<String>>,
    pub(crate) key: Option<S<String>>,
    pub(crate) alpn: Option<S<Vec<String>>>,
    pub(crate) clean_start: Option<bool>,
    pub(crate) session_expiry: Option<S<String>>,
    pub(crate) will: Option<S<RawWill>>,
    pub(crate) birth: Option<S<RawWill>>,
    pub(crate) inflight: Option<S<i64>>,
    pub(crate) max_rate: Option<S<i64>>,
    pub(crate) reconnect: Option<S<RawReconnect>>,
    pub(crate) queue: Option<S<RawQueue>>,
    pub(crate) routes: Option<Vec<S<RawRoute>>>,
}

/// A will or birth message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWill {
    pub(crate) topic: Option<S<String>>,
    pub(crate) payload: Option<String>,
    pub(crate) qos: Option<S<i64>>,
    pub(crate) retain: Option<bool>,
    pub(crate) delay: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReconnect {
    pub(crate) min: Option<S<String>>,
    pub(crate) max: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub(crate) max_messages: Option<S<i64>>,
    pub(crate) max_bytes: Option<S<RawSize>>,
    pub(crate) max_age: Option<S<String>>,
    pub(crate) when_full: Option<S<String>>,
}

/// One route; exactly one of `out` / `in` must be set, validation checks which other keys
/// fit that direction.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    #[serde(rename = "out")]
    pub(crate) out_filter: Option<S<String>>,
    #[serde(rename = "in")]
    pub(crate) in_filter: Option<S<String>>,
    pub(crate) remote_prefix: Option<S<String>>,
    pub(crate) remote_template: Option<S<String>>,
    pub(crate) local_prefix: Option<S<String>>,
    pub(crate) qos: Option<S<i64>>,
    pub(crate) retain: Option<S<bool>>,
    pub(crate) durable: Option<S<bool>>,
}

/// A size: a plain integer (bytes) or a string such as `"256MiB"`, parsed in validation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: an integer number of bytes or a string like \"256MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::custom("size is too large"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A scalar of any TOML type: a constant's value, or the MQTT protocol version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawScalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawScalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = RawScalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a boolean, number or string")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawScalar, E> {
                Ok(RawScalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawScalar, E> {
                Ok(RawScalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawScalar, E> {
                i64::try_from(v)
                    .map(RawScalar::Int)
                    .map_err(|_| E::custom("integer is too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawScalar, E> {
                Ok(RawScalar::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawScalar, E> {
                Ok(RawScalar::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}
