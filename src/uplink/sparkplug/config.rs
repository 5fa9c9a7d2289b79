//! The `[uplinks.sparkplug]` table: the Sparkplug B identity of an uplink (group, edge
//! node, optional primary host application), its raw form and its validation.

use serde::Deserialize;

use crate::config::{Checker, S};

/// An uplink that speaks Sparkplug B as an edge node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugConfig {
    /// `spBv1.0/<group_id>/...`.
    pub group_id: String,
    /// The edge node's id in every topic, `{gateway}` substituted.
    pub edge_node_id: String,
    /// The primary host application whose `spBv1.0/STATE/<host>` the node waits for before
    /// it publishes births, and while it is offline holds data back (store and forward).
    pub primary_host: Option<String>,
    /// The devices and their points, from the `[[devices]]` section.
    pub devices: Vec<SparkplugDevice>,
}

/// `[uplinks.sparkplug]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSparkplug {
    pub(crate) group_id: Option<S<String>>,
    pub(crate) edge_node_id: Option<S<String>>,
    pub(crate) primary_host: Option<S<String>>,
}

/// Whether `id` may be a Sparkplug topic element: not empty, no `/`, `+` or `#`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && !id.contains(['/', '+', '#']) && !id.chars().any(char::is_control)
}

impl Checker<'_> {
    /// The `sparkplug` table of `uplinks[i]` (`prefix` is `uplinks[i].sparkplug`).
    pub(crate) fn sparkplug(
        &mut self,
        raw: &S<RawSparkplug>,
        prefix: &str,
    ) -> Option<SparkplugConfig> {
        let span = raw.span();
        let raw = raw.get_ref();
        let group_id = match &raw.group_id {
            None => {
                self.missing(
                    span.clone(),
                    format!("{prefix}.group_id"),
                    Some("e.g. group_id = \"plant1\""),
                );
                None
            }
            Some(value) => self.sparkplug_id(value, &format!("{prefix}.group_id")),
        };
        let edge_node_id = match &raw.edge_node_id {
            None => Some(self.substitute("{gateway}")),
            Some(value) => self.sparkplug_id(value, &format!("{prefix}.edge_node_id")),
        };
        let primary_host = match &raw.primary_host {
            None => Some(None),
            Some(value) => self
                .sparkplug_id(value, &format!("{prefix}.primary_host"))
                .map(Some),
        };
        Some(SparkplugConfig {
            group_id: group_id?,
            edge_node_id: edge_node_id?,
            primary_host: primary_host?,
            devices: Vec::new(),
        })
    }

    fn sparkplug_id(&mut self, value: &S<String>, key_path: &str) -> Option<String> {
        if !self.placeholders(value, key_path, &["gateway"]) {
            return None;
        }
        let id = self.substitute(value.get_ref());
        if valid_id(&id) {
            return Some(id);
        }
        self.d
            .error(
                Some(value.span()),
                key_path,
                format!("{:?} is not a valid Sparkplug id", value.get_ref()),
            )
            .hint =
            Some("Sparkplug ids are topic levels: not empty, without `/`, `+` or `#`".into());
        None
    }
}

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn ids_with_topic_separators_or_wildcards_are_invalid() {
        assert!(valid_id("plant1"));
        assert!(valid_id("line 1-pi"));
        for bad in ["", "a/b", "a+", "#", "a\nb"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}

/// A device as the edge node presents it: filled in from the `[[devices]]` section when the
/// whole configuration is assembled (the uplink sees devices only through the bus; this is
/// what it needs to know of their shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugDevice {
    /// The Sparkplug device id (the device's name).
    pub name: String,
    /// The device's retained status topic on the local broker.
    pub status_topic: String,
    /// Its readings are JSON (`{"value":..,"ts":..,"quality":..}`); else plain values.
    pub json: bool,
    /// One topic filter that matches every point topic of the device (its topic template
    /// with `{point}` as `+`), when the template allows one: the node then subscribes to
    /// it instead of to each point (fewer filters for the broker and the ingest to match).
    pub points_filter: Option<String>,
    /// `<device topic>/set`, where one JSON object writes several points in one command
    /// (Modbus devices): a DCMD with several metrics goes there, so that adjacent registers
    /// are written in one request.
    pub write_topic: Option<String>,
    pub points: Vec<SparkplugPoint>,
}

/// One point of a device: one metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugPoint {
    /// The metric's name.
    pub name: String,
    /// The point's topic on the local broker (its readings; writes go to `<topic>/set`).
    pub topic: String,
    pub datatype: super::proto::DataType,
    /// Engineering unit (the `engUnit` property).
    pub unit: Option<String>,
    /// Whether a DCMD may write it.
    pub writable: bool,
}
