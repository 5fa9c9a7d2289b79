//! Access control from a Mosquitto-format ACL file, so an existing `acl_file` works
//! unchanged.
//!
//! ```text
//! # Anonymous clients (lines before any `user` line):
//! topic read public/#
//!
//! user alice
//! topic readwrite plant/#
//! topic deny plant/secret/#
//!
//! # Every client; %c is the client id, %u the username:
//! pattern readwrite devices/%c/#
//! pattern read users/%u/#
//! ```
//!
//! The checks follow Mosquitto's default ACL check: the client's own list (the entries
//! under its `user` line, or the anonymous entries when it has no username) is consulted
//! first, then the `pattern` lines. Within each list a matching `deny` wins over any
//! matching grant; the first list that grants access decides. Anything not granted is
//! denied. A pattern never applies to a client whose username or client id contains `+`
//! or `#` (it could otherwise widen its own grants), and a `%u` pattern never applies to
//! a client without a username. A topic starting with `$` only matches an ACL topic that
//! starts with `$` too.
//!
//! Subscribing needs read access to the filter itself (the filter is matched as if it
//! were a topic, so `topic read plant/#` allows subscribing to `plant/#` and `plant/+/t`
//! but not to `#`); delivery needs read access to each delivered topic; publishing needs
//! write access to the topic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::mqtt::topic;

/// What a line may start with.
const KEYWORDS: &str = "expected user, topic or pattern";

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read ACL file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn grants(self, wanted: Wanted) -> bool {
        matches!(
            (self, wanted),
            (Access::ReadWrite, _)
                | (Access::Read, Wanted::Read | Wanted::Subscribe)
                | (Access::Write, Wanted::Write)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// A message on a topic delivered to the client.
    Read,
    Write,
    /// A subscription: read access to every topic its filter can match.
    Subscribe,
}

impl Wanted {
    /// Whether the rule's filter covers the request's topic (or, for a subscription, every
    /// topic the requested filter matches).
    fn covered_by(self, requested: &str, rule: &str) -> bool {
        match self {
            Wanted::Subscribe => topic::filter_within(requested, rule),
            Wanted::Read | Wanted::Write => topic::matches(requested, rule),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    /// An MQTT filter; for patterns, with `%c` and `%u` still in it.
    topic: String,
}

/// Rules with the denials first, as Mosquitto keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Rules(Vec<Rule>);

impl Rules {
    fn push(&mut self, rule: Rule) {
        if rule.access == Access::Deny {
            let first_grant = self
                .0
                .iter()
                .position(|r| r.access != Access::Deny)
                .unwrap_or(self.0.len());
            self.0.insert(first_grant, rule);
        } else {
            self.0.push(rule);
        }
    }
}

/// The rules of one ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Topic lines before any `user` line.
    anonymous: Rules,
    users: HashMap<String, Rules>,
    patterns: Rules,
}

impl Acl {
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| AclError::BadLine {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Parse the file's text; errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<Acl, (usize, String)> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err((number, "missing username after `user`".into()));
                    }
                    // The rest of the line: usernames may contain spaces.
                    user = Some(rest.to_owned());
                    acl.users.entry(rest.to_owned()).or_default();
                }
                "topic" | "pattern" => {
                    let (access, topic) = match split_word(rest) {
                        ("", _) => {
                            return Err((number, format!("empty topic after `{keyword}`")));
                        }
                        (word, "") => (Access::ReadWrite, word),
                        (word, topic) => {
                            let access = match word {
                                "read" => Access::Read,
                                "write" => Access::Write,
                                "readwrite" => Access::ReadWrite,
                                "deny" => Access::Deny,
                                other => {
                                    return Err((
                                        number,
                                        format!(
                                            "invalid access {other:?}: expected read, write, \
                                             readwrite or deny"
                                        ),
                                    ))
                                }
                            };
                            (access, topic)
                        }
                    };
                    if !topic::valid_filter(topic) {
                        return Err((number, format!("invalid ACL topic {topic:?}")));
                    }
                    let rule = Rule {
                        access,
                        topic: topic.to_owned(),
                    };
                    if keyword == "pattern" {
                        acl.patterns.push(rule);
                    } else {
                        match &user {
                            Some(user) => acl.users.entry(user.clone()).or_default().push(rule),
                            None => acl.anonymous.push(rule),
                        }
                    }
                }
                other => {
                    let reason = format!("invalid line: unknown keyword {other:?}, {KEYWORDS}");
                    return Err((number, reason));
                }
            }
        }
        Ok(acl)
    }

    /// May this client subscribe to `filter` (read access to the filter itself)? A shared
    /// subscription (`$share/group/filter`) is checked on its filter.
    pub fn can_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        let filter = match topic::parse_filter(filter) {
            Some(parsed) => parsed.filter,
            None => return false,
        };
        self.check(username, client_id, filter, Wanted::Subscribe)
    }

    /// May this client publish to `topic`?
    pub fn can_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(username, client_id, topic, Wanted::Write)
    }

    /// May a message on `topic` be delivered to this client?
    pub fn can_receive(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(username, client_id, topic, Wanted::Read)
    }

    fn check(&self, username: Option<&str>, client_id: &str, topic: &str, wanted: Wanted) -> bool {
        let own = match username {
            Some(user) => self.users.get(user),
            None => Some(&self.anonymous),
        };
        if let Some(rules) = own {
            for rule in &rules.0 {
                if topic.starts_with('$') && !rule.topic.starts_with('$') {
                    continue;
                }
                if wanted.covered_by(topic, &rule.topic) {
                    if rule.access == Access::Deny {
                        return false;
                    }
                    if rule.access.grants(wanted) {
                        return true;
                    }
                }
            }
        }
        if self.patterns.0.is_empty() {
            return false;
        }
        let dangerous = |s: &str| s.contains(['+', '#']);
        if username.is_some_and(dangerous) || dangerous(client_id) {
            tracing::info!(
                client = client_id,
                ?username,
                "ACL patterns refused: `+` or `#` in username or client id"
            );
            return false;
        }
        for rule in &self.patterns.0 {
            let Some(filter) = substitute(&rule.topic, username, client_id) else {
                continue;
            };
            if wanted.covered_by(topic, &filter) {
                if rule.access == Access::Deny {
                    return false;
                }
                if rule.access.grants(wanted) {
                    return true;
                }
            }
        }
        false
    }
}

/// The first space-separated word and the rest of the line, trimmed.
fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.find([' ', '\t']) {
        Some(end) => (&text[..end], text[end..].trim()),
        None => (text, ""),
    }
}

/// A pattern with `%c` and `%u` replaced; `None` when it needs a username the client does
/// not have.
fn substitute(pattern: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    if !pattern.contains('%') {
        return Some(pattern.to_owned());
    }
    let mut out = String::with_capacity(pattern.len() + client_id.len());
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('%', Some('c')) => {
                chars.next();
                out.push_str(client_id);
            }
            ('%', Some('u')) => {
                chars.next();
                out.push_str(username?);
            }
            _ => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#
topic deny public/private

user alice
topic readwrite plant/#
topic deny plant/secret/#
topic write commands/+/set
topic $SYS/#

user bob smith
topic read plant/line1/+

# everyone
pattern readwrite devices/%c/#
pattern read users/%u/inbox
pattern deny devices/%c/locked
";

    #[derive(Clone, Copy)]
    enum Op {
        Sub,
        Pub,
        Recv,
    }

    #[test]
    fn rules_follow_mosquitto() {
        let acl = Acl::parse(FILE).expect("parses");
        let cases: &[(Option<&str>, &str, Op, &str, bool)] = &[
            // Anonymous: the lines before any `user`.
            (None, "anon", Op::Recv, "public/news", true),
            (None, "anon", Op::Sub, "public/#", true),
            (None, "anon", Op::Sub, "public/+", true),
            (None, "anon", Op::Sub, "#", false),
            (None, "anon", Op::Pub, "public/news", false),
            (None, "anon", Op::Recv, "public/private", false),
            (None, "anon", Op::Recv, "plant/line1/t", false),
            // Patterns apply to anonymous clients too (%c), but not %u ones.
            (None, "anon", Op::Pub, "devices/anon/state", true),
            (None, "anon", Op::Recv, "users/anon/inbox", false),
            // alice: her lines, denials first.
            (Some("alice"), "a1", Op::Pub, "plant/line1/t", true),
            (Some("alice"), "a1", Op::Sub, "plant/#", true),
            (Some("alice"), "a1", Op::Recv, "plant/secret/key", false),
            (Some("alice"), "a1", Op::Pub, "plant/secret/key", false),
            (Some("alice"), "a1", Op::Pub, "commands/x/set", true),
            (Some("alice"), "a1", Op::Sub, "commands/+/set", false),
            (Some("alice"), "a1", Op::Recv, "public/news", false),
            // A bare `topic X` is readwrite; `$` topics need a `$` rule.
            (Some("alice"), "a1", Op::Recv, "$SYS/broker/uptime", true),
            (Some("alice"), "a1", Op::Sub, "$SYS/#", true),
            (
                Some("bob smith"),
                "b1",
                Op::Recv,
                "$SYS/broker/uptime",
                false,
            ),
            // bob smith: a username with a space.
            (Some("bob smith"), "b1", Op::Recv, "plant/line1/t", true),
            (Some("bob smith"), "b1", Op::Sub, "plant/line1/+", true),
            (Some("bob smith"), "b1", Op::Sub, "plant/line1/#", false),
            (Some("bob smith"), "b1", Op::Sub, "plant/+/t", false),
            (Some("bob smith"), "b1", Op::Pub, "plant/line1/t", false),
            (
                Some("bob smith"),
                "b1",
                Op::Recv,
                "users/bob smith/inbox",
                true,
            ),
            // Patterns: %c and %u, deny first.
            (Some("alice"), "a1", Op::Pub, "devices/a1/state", true),
            (Some("alice"), "a1", Op::Pub, "devices/a2/state", false),
            (Some("alice"), "a1", Op::Recv, "users/alice/inbox", true),
            (Some("alice"), "a1", Op::Pub, "users/alice/inbox", false),
            (Some("alice"), "a1", Op::Pub, "devices/a1/locked", false),
            // Wildcards in the client id or username disable patterns.
            (Some("alice"), "a+", Op::Pub, "devices/a+/state", false),
            (Some("eve#"), "e1", Op::Pub, "devices/e1/state", false),
            // An unknown user gets only the patterns.
            (Some("mallory"), "m1", Op::Recv, "public/news", false),
            (Some("mallory"), "m1", Op::Pub, "devices/m1/x", true),
            // Shared subscriptions are checked on their filter.
            (Some("alice"), "a1", Op::Sub, "$share/g/plant/#", true),
            (Some("alice"), "a1", Op::Sub, "$share/g/#", false),
        ];
        let mut failures = Vec::new();
        for &(user, client, op, topic, expected) in cases {
            let got = match op {
                Op::Sub => acl.can_subscribe(user, client, topic),
                Op::Pub => acl.can_publish(user, client, topic),
                Op::Recv => acl.can_receive(user, client, topic),
            };
            if got != expected {
                let op = match op {
                    Op::Sub => "subscribe",
                    Op::Pub => "publish",
                    Op::Recv => "receive",
                };
                failures.push(format!(
                    "{user:?} {client} {op} {topic}: expected {expected}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn a_deny_anywhere_in_the_list_wins_over_an_earlier_grant() {
        let acl = Acl::parse("topic readwrite a/#\ntopic deny a/b\n").expect("parses");
        assert!(!acl.can_publish(None, "c", "a/b"));
        assert!(acl.can_publish(None, "c", "a/c"));
        // A grant in the client's own list decides before a pattern deny (as Mosquitto).
        let acl = Acl::parse("user u\ntopic a/#\npattern deny a/%c\n").expect("parses");
        assert!(acl.can_publish(Some("u"), "c", "a/c"));
        assert!(!acl.can_publish(Some("v"), "c", "a/c"));
    }

    #[test]
    fn an_empty_file_denies_everything() {
        let acl = Acl::parse("# nothing\n\n").expect("parses");
        assert!(!acl.can_publish(None, "c", "a"));
        assert!(!acl.can_subscribe(Some("u"), "c", "a"));
    }

    #[test]
    fn bad_lines_name_their_number() {
        let cases: &[(&str, usize, &str)] = &[
            ("topic read a\nuser\n", 2, "missing username"),
            ("\n\ntopic\n", 3, "empty topic"),
            ("topic readonly a/b\n", 1, "invalid access \"readonly\""),
            ("topic read a/#/b\n", 1, "invalid ACL topic"),
            ("# ok\nallow a\n", 2, "unknown keyword \"allow\""),
        ];
        for (text, line, reason) in cases {
            let (got_line, got_reason) = Acl::parse(text).expect_err(text);
            assert_eq!(got_line, *line, "{text:?}: {got_reason}");
            assert!(got_reason.contains(reason), "{text:?}: {got_reason}");
        }
    }

    #[test]
    fn load_names_the_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("acl");
        std::fs::write(&path, "topic read a\nbogus\n").expect("write");
        let error = Acl::load(&path).expect_err("bad line");
        assert!(
            error.to_string().ends_with(
                "acl:2: invalid line: unknown keyword \"bogus\", expected user, topic or pattern"
            ),
            "{error}"
        );
        let error = Acl::load(&dir.path().join("missing")).expect_err("missing");
        assert!(error.to_string().contains("missing"), "{error}");
    }
}
