//! The `[homeassistant]` table: MQTT discovery for Home Assistant. Without the table no
//! discovery messages are published.

use serde::Deserialize;

use crate::config::{Checker, S};

/// Home Assistant's own default discovery prefix.
const DEFAULT_DISCOVERY_PREFIX: &str = "homeassistant";

/// The validated `[homeassistant]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeAssistantConfig {
    /// The first level of every discovery topic. Default `homeassistant`.
    pub discovery_prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHomeAssistant {
    pub(crate) discovery_prefix: Option<S<String>>,
}

impl Checker<'_> {
    pub(crate) fn homeassistant(&mut self, raw: S<RawHomeAssistant>) -> HomeAssistantConfig {
        let raw = raw.into_inner();
        let discovery_prefix = match &raw.discovery_prefix {
            Some(prefix) => {
                let topic = self.topic(prefix, "homeassistant.discovery_prefix");
                if topic.starts_with('$') {
                    self.d.error(
                        Some(prefix.span()),
                        "homeassistant.discovery_prefix",
                        "a discovery prefix starting with `$` is not delivered to `#` subscribers",
                    );
                }
                topic.trim_end_matches('/').to_owned()
            }
            None => DEFAULT_DISCOVERY_PREFIX.to_owned(),
        };
        HomeAssistantConfig { discovery_prefix }
    }
}
