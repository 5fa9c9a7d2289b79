//! The `[[uplinks]]` array: cloud brokers, their url, credentials, TLS, will and birth
//! messages, outbox queue and routes. The types, their defaults and the validation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use regex_lite::Regex;
use serde::Deserialize;
use toml::de::DeValue;
use toml::Spanned;
use url::{Host, Url};

use super::sparkplug::config::RawSparkplug;
pub use super::sparkplug::SparkplugConfig;
use crate::config::{Checker, RawScalar, S};
use crate::drivers::config::RawTemplate;
use crate::drivers::payload::template::{PayloadTemplate, RouteVariables};
use crate::model::QoS;
use crate::mqtt::topic::valid_filter;
use crate::store::config::RawQueue;
pub use crate::store::config::{QueueConfig, WhenFull};

const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(3600);
const DEFAULT_UPLINK_INFLIGHT: u16 = 100;
const DEFAULT_RECONNECT_MIN: Duration = Duration::from_secs(1);
const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
const DEFAULT_WS_PATH: &str = "/mqtt";

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkConfig {
    pub name: String,
    pub url: UplinkUrl,
    pub protocol: MqttVersion,
    /// Default: the gateway id.
    pub client_id: String,
    /// Default 30s.
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<SecretSource>,
    pub tls: Option<TlsConfig>,
    /// Default false: the cloud keeps subscriptions and queued commands.
    pub clean_start: bool,
    /// MQTT 5 session expiry. Default 1h.
    pub session_expiry: Duration,
    pub will: Option<WillConfig>,
    /// Published on every connect. Default: `online` retained on the will topic when a will
    /// is set.
    pub birth: Option<WillConfig>,
    pub queue: QueueConfig,
    /// QoS 1 messages in flight to the cloud. Default 100.
    pub inflight: u16,
    /// Optional cap on messages per second sent to the cloud.
    pub max_rate: Option<u32>,
    pub routes_out: Vec<OutRoute>,
    pub routes_in: Vec<InRoute>,
    /// Reconnect backoff bounds. Default 1s..60s.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// `[uplinks.sparkplug]`: this uplink is a Sparkplug B edge node.
    pub sparkplug: Option<SparkplugConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkUrl {
    pub scheme: UrlScheme,
    pub host: String,
    pub port: u16,
    /// Path for ws/wss, default `/mqtt`.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlScheme {
    Mqtt,
    Mqtts,
    Ws,
    Wss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    V311,
    V5,
}

/// Where a secret comes from, so it stays out of the TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// CA bundle; `None` means the system roots.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WillConfig {
    /// `{gateway}` already substituted.
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 will delay.
    pub delay: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutRoute {
    /// Local topic filter.
    pub filter: String,
    /// Replaces the filter's literal prefix (the levels before the first wildcard).
    /// `{gateway}` already substituted.
    pub remote_prefix: Option<String>,
    /// Alternative to a prefix: a template with `{gateway}` substituted and `{topic}` left
    /// for the full local topic.
    pub remote_template: Option<String>,
    /// Default 1.
    pub qos: QoS,
    /// Whether the retain flag is kept on the remote publish. Default false.
    pub retain: bool,
    /// Default true. Only QoS 0 routes may set false (best effort, not queued on disk).
    pub durable: bool,
    /// Reshapes each message's payload for the cloud (`payload = { template = .. }`).
    pub payload: Option<Arc<PayloadTemplate>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InRoute {
    /// Remote topic filter, `{gateway}` already substituted.
    pub filter: String,
    /// Replaces the filter's literal prefix on the local side.
    pub local_prefix: Option<String>,
    /// Default 1.
    pub qos: QoS,
}

impl std::fmt::Display for UplinkUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            UrlScheme::Mqtt => "mqtt",
            UrlScheme::Mqtts => "mqtts",
            UrlScheme::Ws => "ws",
            UrlScheme::Wss => "wss",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

fn env_name_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("env regex is valid"))
}

/// Parses an uplink url: `mqtt://`, `mqtts://`, `ws://`, `wss://` (`tcp://` and `ssl://`
/// as aliases), with default ports 1883/8883/80/443 and, for WebSocket, default path
/// `/mqtt`.
pub(crate) fn parse_url(text: &str) -> Result<UplinkUrl, (String, Option<String>)> {
    const SCHEMES_HINT: &str = "use mqtt://host:1883, mqtts://host:8883, ws://host/mqtt or \
                                wss://host/mqtt";
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err((
            format!("url {text:?} has no scheme"),
            Some(SCHEMES_HINT.into()),
        ));
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => UrlScheme::Mqtt,
        "mqtts" | "ssl" => UrlScheme::Mqtts,
        "ws" => UrlScheme::Ws,
        "wss" => UrlScheme::Wss,
        other => {
            return Err((
                format!("unsupported url scheme {other:?}, expected one of mqtt, mqtts, ws, wss"),
                Some(SCHEMES_HINT.into()),
            ))
        }
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err((
            "credentials do not belong in the url".into(),
            Some("use `username` and `password_file` or `password_env`".into()),
        ));
    }
    let url = Url::parse(text).map_err(|error| (url_error(text, authority, error), None))?;
    if url.fragment().is_some() {
        return Err((format!("url {text:?} has a fragment (`#`)"), None));
    }
    let host = match url.host() {
        Some(Host::Ipv6(address)) => address.to_string(),
        Some(host) => host.to_string(),
        None => String::new(),
    };
    if host.is_empty() {
        return Err((format!("url {text:?} has no host"), None));
    }
    // The host of an mqtt:// url is kept as written, non-ASCII characters percent-encoded.
    if host.contains('%') {
        return Err((
            format!("url {text:?} has a host name that is not ASCII"),
            Some("write an international domain name in its xn-- form".into()),
        ));
    }
    let port = match url.port() {
        Some(0) => return Err((format!("invalid port \"0\" in url {text:?}"), None)),
        Some(port) => port,
        None => match scheme {
            UrlScheme::Mqtt => 1883,
            UrlScheme::Mqtts => 8883,
            UrlScheme::Ws => 80,
            UrlScheme::Wss => 443,
        },
    };
    let query = url
        .query()
        .map(|query| format!("?{query}"))
        .unwrap_or_default();
    let path = match scheme {
        UrlScheme::Mqtt | UrlScheme::Mqtts => {
            let path = format!("{}{query}", url.path());
            if !(path.is_empty() || path == "/") {
                return Err((
                    format!("a path ({path:?}) is only valid in ws:// and wss:// urls"),
                    None,
                ));
            }
            String::new()
        }
        // A WebSocket url always has a path once parsed: `/` when none was written.
        UrlScheme::Ws | UrlScheme::Wss if !rest.contains(['/', '?']) => DEFAULT_WS_PATH.to_owned(),
        UrlScheme::Ws | UrlScheme::Wss => format!("{}{query}", url.path()),
    };
    Ok(UplinkUrl {
        scheme,
        host,
        port,
        path,
    })
}

/// What is wrong with an url the `url` crate refused; `authority` is its `host:port`.
fn url_error(text: &str, authority: &str, error: url::ParseError) -> String {
    match error {
        url::ParseError::EmptyHost => format!("url {text:?} has no host"),
        url::ParseError::InvalidPort => {
            let port = match authority.rsplit_once(']') {
                Some((_, after)) => after.trim_start_matches(':'),
                None => authority.rsplit_once(':').map_or("", |(_, port)| port),
            };
            format!("invalid port {port:?} in url {text:?}")
        }
        url::ParseError::InvalidIpv6Address => match authority.split_once(']') {
            None => format!("url {text:?} has an unclosed `[`"),
            Some((_, after)) if !(after.is_empty() || after.starts_with(':')) => {
                format!("url {text:?} has junk after `]`")
            }
            Some(_) => format!("invalid url {text:?}: {error}"),
        },
        other => format!("invalid url {text:?}: {other}"),
    }
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
    pub(crate) sparkplug: Option<S<RawSparkplug>>,
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
    pub(crate) payload: Option<S<RawTemplate>>,
}

impl Checker<'_> {
    /// A topic filter with `{gateway}` substituted.
    fn filter(&mut self, value: &S<String>, key_path: &str) -> String {
        self.placeholders(value, key_path, &["gateway"]);
        let filter = self.substitute(value.get_ref());
        if !valid_filter(&filter) {
            self.d
                .error(
                    Some(value.span()),
                    key_path,
                    format!("invalid topic filter {:?}", value.get_ref()),
                )
                .hint = Some("`#` must be the last level and `+` a whole level, e.g. \"plant/+/temperature\" or \"plant/#\"".into());
        }
        filter
    }

    /// The `[[uplinks]]` array; `None` for an uplink with errors.
    pub(crate) fn uplinks(&mut self, value: Spanned<DeValue<'_>>) -> Vec<Option<UplinkConfig>> {
        let Some(array) =
            self.array_of_tables(value, "uplinks", "write each uplink as [[uplinks]]")
        else {
            return vec![None];
        };
        let mut names: HashMap<String, (usize, usize)> = HashMap::new();
        let mut uplinks = Vec::new();
        for (index, item) in array.into_iter().enumerate() {
            let prefix = format!("uplinks[{index}]");
            let uplink = self
                .deserialize::<S<RawUplink>>(item, &prefix)
                .and_then(|raw| self.uplink(raw, index, &prefix, &mut names));
            uplinks.push(uplink);
        }
        uplinks
    }

    fn uplink(
        &mut self,
        raw: S<RawUplink>,
        index: usize,
        prefix: &str,
        names: &mut HashMap<String, (usize, usize)>,
    ) -> Option<UplinkConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let key = |k: &str| format!("{prefix}.{k}");

        let name = match &raw.name {
            None => {
                self.missing(span.clone(), key("name"), None);
                None
            }
            Some(name) => {
                if self.name(name, &key("name")) {
                    let (line, _) = self.d.position(name.span().start);
                    if let Some((other_index, other_line)) = names.get(name.get_ref()) {
                        self.d.error(
                            Some(name.span()),
                            key("name"),
                            format!("duplicate uplink name {:?}, already used by uplinks[{other_index}] (line {other_line})", name.get_ref()),
                        );
                    } else {
                        names.insert(name.get_ref().clone(), (index, line));
                    }
                }
                Some(name.get_ref().clone())
            }
        };

        let url = match &raw.url {
            None => {
                self.missing(
                    span.clone(),
                    key("url"),
                    Some("e.g. url = \"mqtts://broker.example.com:8883\""),
                );
                None
            }
            Some(url) => match parse_url(url.get_ref()) {
                Ok(parsed) => Some(parsed),
                Err((message, hint)) => {
                    self.d.error(Some(url.span()), key("url"), message).hint = hint;
                    None
                }
            },
        };

        let protocol = match &raw.protocol {
            None => MqttVersion::V5,
            Some(protocol) => {
                match protocol.get_ref() {
                    RawScalar::Int(5) => MqttVersion::V5,
                    RawScalar::Text(text) if text == "5" || text == "5.0" => MqttVersion::V5,
                    RawScalar::Text(text) if text == "3.1.1" => MqttVersion::V311,
                    other => {
                        let shown = match other {
                            RawScalar::Text(text) => format!("{text:?}"),
                            RawScalar::Int(i) => i.to_string(),
                            RawScalar::Float(x) => x.to_string(),
                            RawScalar::Bool(b) => b.to_string(),
                        };
                        self.d.error(
                        Some(protocol.span()),
                        key("protocol"),
                        format!("unknown MQTT protocol version {shown}, expected \"5\" or \"3.1.1\""),
                    );
                        MqttVersion::V5
                    }
                }
            }
        };

        let client_id = match &raw.client_id {
            None => self.gateway_id.clone(),
            Some(id) => {
                self.placeholders(id, &key("client_id"), &["gateway"]);
                let id_text = self.substitute(id.get_ref());
                if id_text.is_empty() {
                    self.d
                        .error(Some(id.span()), key("client_id"), "must not be empty");
                }
                id_text
            }
        };

        let keep_alive = self.seconds_u32(&raw.keep_alive, &key("keep_alive"), DEFAULT_KEEP_ALIVE);
        if keep_alive.as_secs() > u64::from(u16::MAX) {
            if let Some(value) = &raw.keep_alive {
                self.d.error(
                    Some(value.span()),
                    key("keep_alive"),
                    format!(
                        "{:?} is too long, the most MQTT allows is {}s",
                        value.get_ref(),
                        u16::MAX
                    ),
                );
            }
        }

        let username = raw.username.as_ref().map(|u| u.get_ref().clone());
        let password = match (&raw.password_file, &raw.password_env) {
            (Some(_), Some(env)) => {
                self.d
                    .error(
                        Some(env.span()),
                        key("password_env"),
                        "password_file and password_env are both set",
                    )
                    .hint = Some("keep one of them".into());
                None
            }
            (Some(file), None) => Some(SecretSource::File(
                self.existing_file(file, &key("password_file")),
            )),
            (None, Some(env)) => {
                if !env_name_regex().is_match(env.get_ref()) {
                    self.d.error(
                        Some(env.span()),
                        key("password_env"),
                        format!(
                            "{:?} is not a valid environment variable name",
                            env.get_ref()
                        ),
                    );
                }
                Some(SecretSource::Env(env.get_ref().clone()))
            }
            (None, None) => None,
        };
        if password.is_some() && username.is_none() && protocol == MqttVersion::V311 {
            let span = raw
                .password_file
                .as_ref()
                .or(raw.password_env.as_ref())
                .map(Spanned::span);
            self.d
                .error(
                    span,
                    key("username"),
                    "MQTT 3.1.1 does not allow a password without a username",
                )
                .hint = Some("set username, or use protocol = \"5\"".into());
        }

        let tls = self.tls(&raw, url.as_ref(), prefix);

        let session_expiry = self.seconds_u32(
            &raw.session_expiry,
            &key("session_expiry"),
            DEFAULT_SESSION_EXPIRY,
        );

        let will = raw
            .will
            .as_ref()
            .and_then(|will| self.will(will, &key("will"), None));
        let birth = match &raw.birth {
            Some(birth) => self.will(birth, &key("birth"), will.as_ref()),
            None => will.as_ref().map(|will| WillConfig {
                topic: will.topic.clone(),
                payload: "online".into(),
                qos: will.qos,
                retain: true,
                delay: Duration::ZERO,
            }),
        };

        let inflight = self.integer(
            &raw.inflight,
            &key("inflight"),
            1,
            i64::from(u16::MAX),
            i64::from(DEFAULT_UPLINK_INFLIGHT),
        ) as u16;
        let max_rate = raw.max_rate.as_ref().map(|_| {
            self.integer(&raw.max_rate, &key("max_rate"), 1, i64::from(u32::MAX), 1) as u32
        });

        let (reconnect_min, reconnect_max) = self.reconnect(&raw.reconnect, &key("reconnect"));
        let queue = self.outbox_queue(&raw.queue, &key("queue"));

        let mut routes_out = Vec::new();
        let mut routes_in = Vec::new();
        for (route_index, route) in raw.routes.iter().flatten().enumerate() {
            let route_prefix = format!("{prefix}.routes[{route_index}]");
            match self.route(route, &route_prefix) {
                Some(Route::Out(route)) => routes_out.push(route),
                Some(Route::In(route)) => routes_in.push(route),
                None => {}
            }
        }

        let sparkplug = match &raw.sparkplug {
            None => Some(None),
            Some(table) => {
                self.sparkplug_conflicts(&raw, prefix);
                self.sparkplug(table, &key("sparkplug")).map(Some)
            }
        };

        Some(UplinkConfig {
            name: name?,
            url: url?,
            protocol,
            client_id,
            keep_alive,
            username,
            password,
            tls,
            // Sparkplug: clean session (3.1.1) / clean start with no session expiry (5).
            clean_start: raw.clean_start.unwrap_or(false) || raw.sparkplug.is_some(),
            session_expiry: if raw.sparkplug.is_some() {
                Duration::ZERO
            } else {
                session_expiry
            },
            will,
            birth,
            queue,
            inflight,
            max_rate,
            routes_out,
            routes_in,
            reconnect_min,
            reconnect_max,
            sparkplug: sparkplug?,
        })
    }

    /// Keys a Sparkplug uplink sets itself: its will is the NDEATH, its births are
    /// Sparkplug's, its topics the Sparkplug layout, and its session clean.
    fn sparkplug_conflicts(&mut self, raw: &RawUplink, prefix: &str) {
        let spans = [
            ("will", raw.will.as_ref().map(Spanned::span)),
            ("birth", raw.birth.as_ref().map(Spanned::span)),
            (
                "routes",
                raw.routes
                    .as_ref()
                    .and_then(|r| r.first())
                    .map(Spanned::span),
            ),
            (
                "session_expiry",
                raw.session_expiry.as_ref().map(Spanned::span),
            ),
        ];
        for (name, span) in spans {
            if let Some(span) = span {
                self.d
                    .error(
                        Some(span),
                        format!("{prefix}.{name}"),
                        format!("`{name}` does not apply to a Sparkplug uplink"),
                    )
                    .hint = Some(format!(
                    "remove `{name}`: the Sparkplug node sets its will (NDEATH), births, topics and a clean session itself"
                ));
            }
        }
        if raw.clean_start == Some(false) {
            self.d
                .error(
                    None,
                    format!("{prefix}.clean_start"),
                    "a Sparkplug uplink needs a clean session",
                )
                .hint = Some("remove `clean_start` (Sparkplug B requires clean sessions)".into());
        }
    }

    fn tls(&mut self, raw: &RawUplink, url: Option<&UplinkUrl>, prefix: &str) -> Option<TlsConfig> {
        let secure = url.map(|url| matches!(url.scheme, UrlScheme::Mqtts | UrlScheme::Wss));
        let settings = [
            ("ca", raw.ca.as_ref().map(Spanned::span)),
            ("cert", raw.cert.as_ref().map(Spanned::span)),
            ("key", raw.key.as_ref().map(Spanned::span)),
            ("alpn", raw.alpn.as_ref().map(Spanned::span)),
        ];
        if secure == Some(false) {
            for (name, span) in settings {
                if let Some(span) = span {
                    self.d
                        .error(
                            Some(span),
                            format!("{prefix}.{name}"),
                            "TLS settings need an mqtts:// or wss:// url",
                        )
                        .hint = Some(format!(
                        "change the url to mqtts:// (port 8883) or wss://, or remove `{name}`"
                    ));
                }
            }
            return None;
        }
        let ca = raw
            .ca
            .as_ref()
            .map(|ca| self.existing_file(ca, &format!("{prefix}.ca")));
        let cert = raw
            .cert
            .as_ref()
            .map(|cert| self.existing_file(cert, &format!("{prefix}.cert")));
        let key = raw
            .key
            .as_ref()
            .map(|key| self.existing_file(key, &format!("{prefix}.key")));
        match (&raw.cert, &raw.key) {
            (Some(cert), None) => {
                self.d
                    .error(
                        Some(cert.span()),
                        format!("{prefix}.cert"),
                        "cert is set without key",
                    )
                    .hint = Some(
                    "client certificate authentication needs both cert and key (its private key)"
                        .into(),
                );
            }
            (None, Some(key)) => {
                self.d
                    .error(
                        Some(key.span()),
                        format!("{prefix}.key"),
                        "key is set without cert",
                    )
                    .hint =
                    Some("client certificate authentication needs both cert and key".into());
            }
            _ => {}
        }
        let alpn = raw
            .alpn
            .as_ref()
            .map(|alpn| alpn.get_ref().clone())
            .unwrap_or_default();
        if let Some(list) = &raw.alpn {
            if list.get_ref().iter().any(String::is_empty) {
                self.d.error(
                    Some(list.span()),
                    format!("{prefix}.alpn"),
                    "ALPN protocol names must not be empty",
                );
            }
        }
        Some(TlsConfig {
            ca,
            cert,
            key,
            alpn,
        })
    }

    /// A will (`default` is None) or a birth message (`default` is the will, whose topic
    /// and QoS it takes when they are not set).
    fn will(
        &mut self,
        raw: &S<RawWill>,
        prefix: &str,
        will: Option<&WillConfig>,
    ) -> Option<WillConfig> {
        let span = raw.span();
        let raw = raw.get_ref();
        let is_birth = prefix.ends_with("birth");
        let topic = match (&raw.topic, will) {
            (Some(topic), _) => Some(self.topic(topic, &format!("{prefix}.topic"))),
            (None, Some(will)) => Some(will.topic.clone()),
            (None, None) => {
                let hint = if is_birth {
                    "set topic, or set a will: the birth message defaults to the will's topic"
                } else {
                    "e.g. topic = \"gateways/{gateway}/status\""
                };
                self.missing(span, format!("{prefix}.topic"), Some(hint));
                None
            }
        };
        let delay = if is_birth {
            if let Some(delay) = &raw.delay {
                self.d.error(
                    Some(delay.span()),
                    format!("{prefix}.delay"),
                    "delay applies only to the will",
                );
            }
            Duration::ZERO
        } else {
            self.seconds_u32(&raw.delay, &format!("{prefix}.delay"), Duration::ZERO)
        };
        let default_qos = will.map_or(QoS::AtLeastOnce, |will| will.qos);
        Some(WillConfig {
            topic: topic?,
            payload: raw
                .payload
                .clone()
                .unwrap_or_else(|| if is_birth { "online" } else { "offline" }.into()),
            qos: self.qos(&raw.qos, &format!("{prefix}.qos"), default_qos),
            retain: raw.retain.unwrap_or(true),
            delay,
        })
    }

    fn reconnect(&mut self, raw: &Option<S<RawReconnect>>, prefix: &str) -> (Duration, Duration) {
        let Some(raw) = raw else {
            return (DEFAULT_RECONNECT_MIN, DEFAULT_RECONNECT_MAX);
        };
        let r = raw.get_ref();
        let min = self.positive_duration(&r.min, &format!("{prefix}.min"), DEFAULT_RECONNECT_MIN);
        let max = self.positive_duration(
            &r.max,
            &format!("{prefix}.max"),
            DEFAULT_RECONNECT_MAX.max(min),
        );
        if min > max {
            let span = r.min.as_ref().map(Spanned::span).unwrap_or(raw.span());
            self.d.error(
                Some(span),
                format!("{prefix}.min"),
                format!(
                    "min ({}) is greater than max ({})",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
        }
        (min, max)
    }

    fn route(&mut self, raw: &S<RawRoute>, prefix: &str) -> Option<Route> {
        let span = raw.span();
        let r = raw.get_ref();
        let key = |k: &str| format!("{prefix}.{k}");
        match (&r.out_filter, &r.in_filter) {
            (Some(_), Some(in_filter)) => {
                self.d
                    .error(
                        Some(in_filter.span()),
                        key("in"),
                        "a route has either `out` or `in`, not both",
                    )
                    .hint = Some("write two routes".into());
                None
            }
            (None, None) => {
                self.d
                    .error(
                        Some(span),
                        prefix,
                        "a route needs `out` (local to cloud) or `in` (cloud to local)",
                    )
                    .hint =
                    Some("e.g. { out = \"plant/#\", remote_prefix = \"sites/{gateway}/\" }".into());
                None
            }
            (Some(filter), None) => {
                let mut ok = true;
                if let Some(local) = &r.local_prefix {
                    self.d
                        .error(
                            Some(local.span()),
                            key("local_prefix"),
                            "local_prefix belongs to `in` routes",
                        )
                        .hint = Some("did you mean `remote_prefix`?".into());
                    ok = false;
                }
                let filter = self.filter(filter, &key("out"));
                let remote_prefix = r
                    .remote_prefix
                    .as_ref()
                    .map(|p| self.prefix(p, &key("remote_prefix")));
                let remote_template = r.remote_template.as_ref().map(|template| {
                    self.placeholders(template, &key("remote_template"), &["gateway", "topic"]);
                    if template.get_ref().contains(['+', '#']) {
                        self.d.error(
                            Some(template.span()),
                            key("remote_template"),
                            format!(
                                "topic template {:?} contains a wildcard (`+` or `#`)",
                                template.get_ref()
                            ),
                        );
                    }
                    self.substitute(template.get_ref())
                });
                if let (Some(_), Some(template)) = (&r.remote_prefix, &r.remote_template) {
                    self.d
                        .error(
                            Some(template.span()),
                            key("remote_template"),
                            "remote_prefix and remote_template are both set",
                        )
                        .hint = Some("keep one of them".into());
                    ok = false;
                }
                let qos = self.qos(&r.qos, &key("qos"), QoS::AtLeastOnce);
                let durable = r.durable.as_ref().is_none_or(|d| *d.get_ref());
                if let Some(flag) = &r.durable {
                    if !durable && qos != QoS::AtMostOnce {
                        self.d
                            .error(
                                Some(flag.span()),
                                key("durable"),
                                format!("durable = false is only allowed on QoS 0 routes, this one has qos = {}", u8::from(qos)),
                            )
                            .hint = Some("QoS 1 and 2 messages are always queued on disk; set qos = 0 for best effort".into());
                        ok = false;
                    }
                }
                let payload = match &r.payload {
                    Some(raw) => {
                        let sample = RouteVariables::of(
                            "site/device/point",
                            br#"{"value":21.5,"ts":"2026-01-01T00:00:00Z","quality":"good"}"#,
                            Some("V"),
                            "gateway",
                            std::time::SystemTime::UNIX_EPOCH,
                        );
                        let template =
                            self.template(raw.get_ref(), raw.span(), &key("payload"), |t| {
                                t.render_route(&sample)
                            });
                        ok &= template.is_some();
                        template.map(Arc::new)
                    }
                    None => None,
                };
                ok.then(|| {
                    Route::Out(OutRoute {
                        filter,
                        remote_prefix,
                        remote_template,
                        qos,
                        retain: r.retain.as_ref().is_some_and(|retain| *retain.get_ref()),
                        durable,
                        payload,
                    })
                })
            }
            (None, Some(filter)) => {
                let mut ok = true;
                let out_only = [
                    ("remote_prefix", r.remote_prefix.as_ref().map(Spanned::span)),
                    (
                        "remote_template",
                        r.remote_template.as_ref().map(Spanned::span),
                    ),
                    ("retain", r.retain.as_ref().map(Spanned::span)),
                    ("durable", r.durable.as_ref().map(Spanned::span)),
                    ("payload", r.payload.as_ref().map(Spanned::span)),
                ];
                for (name, span) in out_only {
                    if let Some(span) = span {
                        let diagnostic = self.d.error(
                            Some(span),
                            key(name),
                            format!("{name} belongs to `out` routes"),
                        );
                        if name == "remote_prefix" {
                            diagnostic.hint = Some("did you mean `local_prefix`?".into());
                        }
                        ok = false;
                    }
                }
                let filter = self.filter(filter, &key("in"));
                let local_prefix = r
                    .local_prefix
                    .as_ref()
                    .map(|p| self.prefix(p, &key("local_prefix")));
                let qos = self.qos(&r.qos, &key("qos"), QoS::AtLeastOnce);
                ok.then_some(Route::In(InRoute {
                    filter,
                    local_prefix,
                    qos,
                }))
            }
        }
    }
}

enum Route {
    Out(OutRoute),
    In(InRoute),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_default_ports_and_paths() {
        let url = parse_url("mqtts://broker.example.com").expect("valid url");
        assert_eq!(
            (url.scheme, url.port, url.path.as_str()),
            (UrlScheme::Mqtts, 8883, "")
        );
        let url = parse_url("wss://h.example.com").expect("valid url");
        assert_eq!((url.port, url.path.as_str()), (443, "/mqtt"));
        let url = parse_url("ws://[::1]:8080/ws").expect("valid url");
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("::1", 8080, "/ws")
        );
        let url = parse_url("mqtt://10.0.0.1:1884").expect("valid url");
        assert_eq!((url.host.as_str(), url.port), ("10.0.0.1", 1884));
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("broker:1883").is_err());
        assert!(parse_url("mqtt://user:pw@host").is_err());
        assert!(parse_url("mqtt://host:0").is_err());
        assert!(parse_url("mqtt://host/path").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
        assert!(parse_url("mqtt://bro ker").is_err());
        assert!(parse_url("mqtt://host#x").is_err());
        assert!(parse_url("mqtt://[::1").is_err());
    }
}
