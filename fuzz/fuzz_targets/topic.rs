//! Topic names and filters: validation, matching and shared-subscription parsing on two
//! UTF-8 strings cut from the input, with a few invariants.
#![no_main]

use fieldmq::mqtt::topic::{literal_prefix, matches, parse_filter, valid_filter, valid_topic_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut at = usize::from(cut).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let (topic, filter) = text.split_at(at);

    for s in [topic, filter] {
        let name = valid_topic_name(s);
        let is_filter = valid_filter(s);
        let prefix = literal_prefix(s);
        assert!(s.starts_with(prefix));
        if name {
            // A topic name is a filter that matches itself, and only `$` topics escape
            // the leading wildcards.
            assert!(is_filter, "topic name {s:?} is not a valid filter");
            assert!(matches(s, s), "{s:?} does not match itself");
            assert_eq!(prefix, s);
            assert_eq!(matches(s, "#"), !s.starts_with('$'));
            if s.starts_with('$') {
                assert!(!matches(s, "+/#"));
                assert!(!matches(s, "+"));
            }
        }
        if let Some(parsed) = parse_filter(s) {
            assert!(valid_filter(parsed.filter));
            assert!(s.ends_with(parsed.filter));
            if parsed.share_group.is_none() {
                assert!(is_filter);
                assert_eq!(parsed.filter, s);
            }
        } else if !s.starts_with("$share/") {
            assert!(!is_filter);
        }
    }

    if valid_topic_name(topic) && valid_filter(filter) {
        let matched = matches(topic, filter);
        if topic.starts_with('$') && filter.starts_with(['+', '#']) {
            assert!(!matched, "{filter:?} matched $ topic {topic:?}");
        }
        // `a/#` matches `a` and everything under it.
        if let Some(parent) = filter.strip_suffix("/#") {
            if valid_topic_name(parent) && !(topic.starts_with('$') && parent.is_empty()) {
                let under = format!("{parent}/{}", topic);
                if valid_topic_name(&under) {
                    assert!(
                        matches(&under, filter),
                        "{filter:?} does not match {under:?}"
                    );
                }
            }
        }
        // A filter with no wildcard matches exactly itself.
        if valid_topic_name(filter) {
            assert_eq!(matched, topic == filter);
        }
    } else {
        // Invalid input never panics, whatever it is.
        let _ = matches(topic, filter);
    }
});
