//! Topic remapping between the local broker and the cloud.
//!
//! A route's filter has a literal prefix: the levels before its first wildcard
//! (`plant/+/temp` → `plant/`; a filter without wildcards is all literal). Prefix
//! replacement swaps that literal prefix for the other side's prefix
//! (`plant/boiler/temp` with `plant/#` → `sites/line1/` gives `sites/line1/boiler/temp`).
//! A template replaces `{topic}` with the whole local topic. Without either, the topic is
//! kept. When several routes match a topic, the first one in the configuration wins.

use super::config::{InRoute, OutRoute};
use crate::mqtt::topic;

/// Replace the literal prefix of `filter` in `topic` with `new_prefix`. When nothing is left
/// after the prefix (a filter without wildcards, or `a/#` matching `a`), the new prefix is
/// used without its trailing `/`.
pub fn replace_prefix(topic: &str, filter: &str, new_prefix: &str) -> String {
    let literal = topic::literal_prefix(filter);
    let rest = topic.strip_prefix(literal).unwrap_or_else(|| {
        // `a/#` matches `a`: the literal prefix is `a/`, the topic is one `/` shorter.
        topic
            .strip_prefix(literal.trim_end_matches('/'))
            .unwrap_or(topic)
    });
    if rest.is_empty() {
        let trimmed = new_prefix.trim_end_matches('/');
        if trimmed.is_empty() {
            new_prefix.to_string()
        } else {
            trimmed.to_string()
        }
    } else {
        format!("{new_prefix}{rest}")
    }
}

/// The remote topic of a local message, or `None` when no out-route matches.
pub fn remote_topic<'a>(
    routes: &'a [OutRoute],
    local: &str,
) -> Option<(usize, &'a OutRoute, String)> {
    routes
        .iter()
        .enumerate()
        .find(|(_, route)| topic::matches(local, &route.filter))
        .map(|(index, route)| {
            let remote = if let Some(template) = &route.remote_template {
                template.replace("{topic}", local)
            } else if let Some(prefix) = &route.remote_prefix {
                replace_prefix(local, &route.filter, prefix)
            } else {
                local.to_string()
            };
            (index, route, remote)
        })
}

/// The local topic of a cloud message, or `None` when no in-route matches.
pub fn local_topic<'a>(routes: &'a [InRoute], remote: &str) -> Option<(&'a InRoute, String)> {
    routes
        .iter()
        .find(|route| topic::matches(remote, &route.filter))
        .map(|route| {
            let local = match &route.local_prefix {
                Some(prefix) => replace_prefix(remote, &route.filter, prefix),
                None => remote.to_string(),
            };
            (route, local)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::QoS;

    fn out(filter: &str, prefix: Option<&str>, template: Option<&str>) -> OutRoute {
        OutRoute {
            filter: filter.into(),
            remote_prefix: prefix.map(String::from),
            remote_template: template.map(String::from),
            qos: QoS::AtLeastOnce,
            retain: false,
            durable: true,
            payload: None,
        }
    }

    #[test]
    fn prefix_replacement_swaps_the_literal_prefix() {
        assert_eq!(
            replace_prefix("plant/boiler/temp", "plant/#", "sites/l1/"),
            "sites/l1/boiler/temp"
        );
        assert_eq!(
            replace_prefix("plant/boiler/temp", "plant/+/temp", "s/"),
            "s/boiler/temp"
        );
        assert_eq!(replace_prefix("plant", "plant/#", "sites/l1/"), "sites/l1");
        assert_eq!(replace_prefix("a/b", "a/b", "x/y/"), "x/y");
        assert_eq!(replace_prefix("a/b", "#", "up/"), "up/a/b");
        assert_eq!(replace_prefix("a/b", "a/#", ""), "b");
    }

    #[test]
    fn out_routes_use_the_first_match_and_templates() {
        let routes = vec![
            out("plant/alarm/#", None, Some("alarms/l1/{topic}")),
            out("plant/#", Some("sites/l1/"), None),
            out("other/#", None, None),
        ];
        let (i, _, t) = remote_topic(&routes, "plant/alarm/x").unwrap();
        assert_eq!((i, t.as_str()), (0, "alarms/l1/plant/alarm/x"));
        let (i, _, t) = remote_topic(&routes, "plant/boiler/t").unwrap();
        assert_eq!((i, t.as_str()), (1, "sites/l1/boiler/t"));
        assert_eq!(remote_topic(&routes, "other/z").unwrap().2, "other/z");
        assert!(remote_topic(&routes, "nope").is_none());
    }

    #[test]
    fn in_routes_map_the_cloud_prefix_to_the_local_one() {
        let routes = vec![InRoute {
            filter: "sites/l1/cmd/#".into(),
            local_prefix: Some("plant/".into()),
            qos: QoS::AtLeastOnce,
        }];
        assert_eq!(
            local_topic(&routes, "sites/l1/cmd/boiler/pump_on/set")
                .unwrap()
                .1,
            "plant/boiler/pump_on/set"
        );
        assert!(local_topic(&routes, "sites/l2/cmd/x").is_none());
    }
}
