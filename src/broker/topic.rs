//! Topic names and filters: validation and matching, including the `$`-topic rule and
//! shared subscriptions (`$share/group/filter`).
//!
//! Matching builds on rumqttc's `mqttbytes::matches`, which refuses every `$` topic; the
//! MQTT rule is narrower: only a filter that *starts* with a wildcard must not match a
//! topic starting with `$` (so `$SYS/#` matches `$SYS/broker/uptime`).

use rumqttc::mqttbytes;

/// Longest topic MQTT can encode.
const MAX_TOPIC_LEN: usize = 65_535;

/// A topic a message may be published to: not empty, no wildcards, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && mqttbytes::valid_topic(topic)
        && !topic.contains('\0')
}

/// A filter a client may subscribe to.
pub fn valid_filter(filter: &str) -> bool {
    filter.len() <= MAX_TOPIC_LEN && !filter.contains('\0') && mqttbytes::valid_filter(filter)
}

/// Whether `topic` matches `filter`.
pub fn matches(topic: &str, filter: &str) -> bool {
    if let Some(rest_of_topic) = topic.strip_prefix('$') {
        // A `$` topic only matches a filter that names its first level literally.
        let Some(rest_of_filter) = filter.strip_prefix('$') else {
            return false;
        };
        let (topic_first, topic_rest) = split_first_level(rest_of_topic);
        let (filter_first, filter_rest) = split_first_level(rest_of_filter);
        if topic_first != filter_first {
            return false;
        }
        return match (topic_rest, filter_rest) {
            (None, None) => true,
            (None, Some(f)) => f == "#",
            (Some(_), None) => false,
            (Some(t), Some(f)) => matches_plain(t, f),
        };
    }
    matches_plain(topic, filter)
}

fn matches_plain(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') {
        // Only reached for the levels after a literal `$` first level (`$SYS/$x`), where
        // `$` has no special meaning: give rumqttc a neutral first level to compare.
        return mqttbytes::matches(&format!("_/{topic}"), &format!("_/{filter}"));
    }
    mqttbytes::matches(topic, filter)
}

fn split_first_level(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (s, None),
    }
}

/// A subscription filter split into its share group (for `$share/group/filter`) and the
/// filter proper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Split `$share/group/filter`; `None` when a shared subscription is malformed.
pub fn parse_filter(raw: &str) -> Option<ParsedFilter<'_>> {
    match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/')?;
            if group.is_empty() || group.contains(['+', '#']) || !valid_filter(filter) {
                return None;
            }
            Some(ParsedFilter {
                share_group: Some(group),
                filter,
            })
        }
        None => valid_filter(raw).then_some(ParsedFilter {
            share_group: None,
            filter: raw,
        }),
    }
}

/// The literal levels of a filter before its first wildcard, with a trailing `/` when the
/// filter continues (`plant/+/temp` → `plant/`; `a/b` → `a/b`).
pub fn literal_prefix(filter: &str) -> &str {
    match filter.find(['+', '#']) {
        Some(index) => &filter[..index],
        None => filter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_and_dollar_matching_follows_the_spec() {
        let cases: &[(&str, &str, bool)] = &[
            ("a/b/c", "a/b/c", true),
            ("a/b/c", "a/+/c", true),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/b", "a/+", true),
            ("a/b/c", "a/+", false),
            ("a", "+", true),
            ("/a", "+/a", true),
            ("a/", "a/+", true),
            ("a/b", "#", true),
            ("b/c", "a/#", false),
            ("$SYS/broker/uptime", "#", false),
            ("$SYS/broker/uptime", "+/broker/uptime", false),
            ("$SYS/broker/uptime", "$SYS/#", true),
            ("$SYS/broker/uptime", "$SYS/+/uptime", true),
            ("$SYS", "$SYS/#", true),
            ("$SYS/broker", "$SYS", false),
            ("$SYS/broker", "$OTHER/#", false),
            ("a/$b", "a/+", true),
            ("sport/tennis/player1", "sport/tennis/player1/#", true),
            ("sport/tennis/player1/ranking", "sport/tennis/+", false),
        ];
        for (topic, filter, expected) in cases {
            assert_eq!(
                matches(topic, filter),
                *expected,
                "topic {topic:?} filter {filter:?}"
            );
        }
    }

    #[test]
    fn invalid_names_and_filters_are_refused() {
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("a/#"));
        assert!(valid_topic_name("a/b"));
        assert!(!valid_filter(""));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a+"));
        assert!(valid_filter("+/+/#"));
    }

    #[test]
    fn shared_subscriptions_are_split() {
        let parsed = parse_filter("$share/g1/a/+").expect("valid");
        assert_eq!(parsed.share_group, Some("g1"));
        assert_eq!(parsed.filter, "a/+");
        assert!(parse_filter("$share/g1").is_none());
        assert!(parse_filter("$share//a").is_none());
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        assert_eq!(literal_prefix("plant/#"), "plant/");
        assert_eq!(literal_prefix("plant/+/temp"), "plant/");
        assert_eq!(literal_prefix("a/b"), "a/b");
        assert_eq!(literal_prefix("#"), "");
    }
}
