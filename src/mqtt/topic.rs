//! Topic names and filters: validation and matching, including the `$`-topic rule and
//! shared subscriptions (`$share/group/filter`).
//!
//! Our own, level by level on `str` slices split at `/`: a topic is UTF-8 and any level may
//! start with a multi-byte character (rumqttc's helpers slice bytes and panic on those).
//! The `$` rule (MQTT-4.7.2-1): a filter that *starts* with a wildcard does not match a
//! topic starting with `$`; `$SYS/#` does match `$SYS/broker/uptime`.

/// Longest topic MQTT can encode.
const MAX_TOPIC_LEN: usize = 65_535;

/// A topic a message may be published to: not empty, no wildcards, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.contains(['+', '#', '\0'])
}

/// A filter a client may subscribe to: not empty, no NUL, `+` only as a whole level, `#`
/// only as the whole last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        let valid = match level {
            "+" => true,
            "#" => last,
            other => !other.contains(['+', '#']),
        };
        if !valid {
            return false;
        }
    }
    true
}

/// Whether `topic` matches `filter` (both assumed valid).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    let mut filter_levels = filter.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `#` also matches the parent level: `a/#` matches `a`.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(wanted), Some(level)) if wanted == level => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `filter` matches is also matched by `outer` (both assumed valid):
/// `a/+/t` is within `a/#` and `+/+/t`, `a/#` is within `#` but not within `a/+`.
pub fn filter_within(filter: &str, outer: &str) -> bool {
    if filter.starts_with('$') != outer.starts_with('$') && outer.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut outer_levels = outer.split('/');
    loop {
        match (outer_levels.next(), filter_levels.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(wanted), Some(level)) if wanted == level => {}
            (None, None) => return true,
            _ => return false,
        }
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

    /// Levels the random topics and filters are made of: multi-byte first characters,
    /// `$` levels, empty levels.
    const LEVELS: &[&str] = &[
        "a",
        "b",
        "é",
        "température",
        "日本",
        "$SYS",
        "$",
        "",
        "x y",
        "a$",
        "ü+",
    ];

    /// The reference: the filter as a regular expression, level by level.
    fn reference_matches(topic: &str, filter: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let mut pattern = String::from("^");
        for (index, level) in levels.iter().enumerate() {
            match *level {
                "#" if index == 0 => pattern.push_str(".*"),
                "#" => {
                    // `a/#` matches `a` and everything below it.
                    pattern.pop();
                    pattern.push_str("(/.*)?");
                }
                "+" => pattern.push_str("[^/]*"),
                literal => pattern.push_str(&regex_lite::escape(literal)),
            }
            if index + 1 < levels.len() {
                pattern.push('/');
            }
        }
        pattern.push('$');
        regex_lite::Regex::new(&pattern)
            .expect("reference pattern")
            .is_match(topic)
    }

    fn random_levels(rng: &mut impl rand::Rng, wildcards: bool) -> Vec<String> {
        let count = rng.random_range(1..=5);
        let mut levels: Vec<String> = (0..count)
            .map(|_| {
                if wildcards && rng.random_bool(0.25) {
                    "+".to_owned()
                } else {
                    LEVELS[rng.random_range(0..LEVELS.len())].to_owned()
                }
            })
            .collect();
        if wildcards && rng.random_bool(0.3) {
            levels.push("#".to_owned());
        }
        levels
    }

    #[test]
    fn matching_agrees_with_a_reference_matcher_over_random_utf8_topics_and_filters() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut matched = 0;
        for _ in 0..3_000 {
            let topic = random_levels(&mut rng, false).join("/");
            let filter = random_levels(&mut rng, true).join("/");
            if !valid_topic_name(&topic) || !valid_filter(&filter) {
                continue;
            }
            let expected = reference_matches(&topic, &filter);
            assert_eq!(
                matches(&topic, &filter),
                expected,
                "seed {seed}: topic {topic:?} filter {filter:?}"
            );
            matched += usize::from(expected);
            // A filter made of the topic itself, or with one level replaced by `+`.
            assert!(
                matches(&topic, &topic),
                "seed {seed}: topic {topic:?} as its own filter"
            );
            let mut levels: Vec<&str> = topic.split('/').collect();
            let replaced = rng.random_range(0..levels.len());
            levels[replaced] = "+";
            let plus = levels.join("/");
            assert_eq!(matches(&topic, &plus), reference_matches(&topic, &plus));
        }
        assert!(
            matched > 10,
            "seed {seed}: too few matching pairs ({matched}) to mean much"
        );
    }

    #[test]
    fn validation_never_panics_and_agrees_with_the_rules_on_arbitrary_strings() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let alphabet = ['a', '/', '+', '#', '$', 'é', '日', '\0', ' ', '\u{10FFFF}'];
        for _ in 0..20_000 {
            let len = rng.random_range(0..12);
            let text: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let name_ok = !text.is_empty() && !text.contains(['+', '#', '\0']);
            assert_eq!(valid_topic_name(&text), name_ok, "seed {seed}: {text:?}");
            let levels: Vec<&str> = text.split('/').collect();
            let filter_ok = !text.is_empty()
                && !text.contains('\0')
                && levels.iter().enumerate().all(|(i, level)| {
                    *level == "+"
                        || (*level == "#" && i + 1 == levels.len())
                        || !level.contains(['+', '#'])
                });
            assert_eq!(valid_filter(&text), filter_ok, "seed {seed}: {text:?}");
            if filter_ok {
                // Never panics, whatever the first character.
                let _ = matches(&text.replace(['+', '#'], "x"), &text);
            }
        }
    }

    #[test]
    fn topics_starting_with_a_multi_byte_character_match_and_validate() {
        assert!(valid_topic_name("é/x"));
        assert!(valid_filter("é/#"));
        assert!(valid_filter("température/+/valeur"));
        assert!(matches("é/x", "é/x"));
        assert!(matches("é/x", "#"));
        assert!(matches("é/x", "+/x"));
        assert!(matches("température/four/valeur", "température/+/valeur"));
        assert!(!matches("é/x", "e/x"));
        assert!(!valid_filter("é#"));
        assert!(!valid_topic_name("é/+"));
    }

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
    fn a_filter_is_within_another_only_when_every_topic_it_matches_is_matched_too() {
        let cases: &[(&str, &str, bool)] = &[
            ("a/b", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", true),
            ("a/#", "a/#", true),
            ("a", "a/#", true),
            ("a/#", "#", true),
            ("a/+/t", "+/+/t", true),
            ("a/#", "a/+", false),
            ("a/+", "a/b", false),
            ("#", "a/#", false),
            ("a/b/c", "a/+", false),
            ("$SYS/#", "#", false),
            ("$SYS/#", "$SYS/#", true),
            ("é/+/x", "é/#", true),
        ];
        for (filter, outer, expected) in cases {
            assert_eq!(
                filter_within(filter, outer),
                *expected,
                "{filter:?} within {outer:?}"
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
