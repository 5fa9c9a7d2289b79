//! The document: TOML text parsed with recovery (every syntax error reported, a bare word
//! where a string belongs named as such), key paths (`devices[1].points[0].min`) found from
//! byte offsets, and serde run on one part at a time so that a type error in one part does
//! not hide the others.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex_lite::Regex;
use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::check::Checker;
use super::error::{ConfigError, Diagnostic, Diagnostics};

/// Parses `text` into a document; every syntax error becomes a diagnostic.
pub(crate) fn parse_toml<'t>(
    text: &'t str,
    source: &Path,
) -> Result<(Diagnostics<'t>, Spanned<DeValue<'t>>), ConfigError> {
    let mut diagnostics = Diagnostics::new(source, text);
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    let root = Spanned::new(document.span(), DeValue::Table(document.into_inner()));
    if syntax_errors.is_empty() {
        return Ok((diagnostics, root));
    }
    for error in syntax_errors {
        let offset = error.span().map(|span| span.start);
        let key_path = offset
            .and_then(|offset| key_path_at(&root, offset).filter(|path| !path.is_empty()))
            .or_else(|| offset.and_then(|offset| key_path_from_text(text, offset)))
            .unwrap_or_default();
        match offset.and_then(|offset| bare_word(text, offset)) {
            Some(word) => {
                diagnostics
                    .error(
                        error.span(),
                        key_path,
                        format!("expected a value, found the bare word `{word}`"),
                    )
                    .hint = Some(format!("strings must be quoted: \"{word}\""));
            }
            None => {
                diagnostics.error(error.span(), key_path, error.message().to_owned());
            }
        }
    }
    Err(diagnostics.into_error())
}

/// A diagnostic about the key at `key_path` (`broker.listeners[0].bind`) of the file
/// `source`, placed at the key's line, or at the nearest enclosing key that the file
/// writes (a default has no line of its own), or at no line when the file cannot be read
/// again. For problems found after validation, by looking at the machine.
pub fn diagnostic_at(source: &Path, key_path: &str, message: impl Into<String>) -> Diagnostic {
    let text = std::fs::read_to_string(source).unwrap_or_default();
    let mut diagnostics = Diagnostics::new(source, &text);
    let (document, _) = DeTable::parse_recoverable(&text);
    let root = Spanned::new(document.span(), DeValue::Table(document.into_inner()));
    let span = span_of(&root, key_path);
    diagnostics.error(span, key_path, message).clone()
}

/// The span of the deepest key along `key_path` that the document has.
fn span_of(root: &Spanned<DeValue<'_>>, key_path: &str) -> Option<Range<usize>> {
    let mut value = root;
    let mut found = None;
    for segment in key_path.split('.') {
        let (name, indices) = match segment.split_once('[') {
            Some((name, rest)) => (name, Some(rest)),
            None => (segment, None),
        };
        let DeValue::Table(table) = value.get_ref() else {
            break;
        };
        let Some((key, child)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        found = Some(key.span());
        value = child;
        for index in indices.into_iter().flat_map(|rest| rest.split('[')) {
            let index: Option<usize> = index.trim_end_matches(']').parse().ok();
            let DeValue::Array(array) = value.get_ref() else {
                return found;
            };
            let Some(element) = index.and_then(|i| array.get(i)) else {
                return found;
            };
            found = Some(element.span());
            value = element;
        }
    }
    found
}

/// The directory relative paths in the file are resolved against, made absolute so the
/// result does not depend on a later change of working directory.
pub(crate) fn base_dir(source: &Path) -> PathBuf {
    let parent = source.parent().unwrap_or(Path::new(""));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
}

/// The key path (`devices[1].points[0].min`) of the deepest key or value whose span holds
/// `offset`; `Some("")` when only `value` itself holds it.
pub(crate) fn key_path_at(value: &Spanned<DeValue<'_>>, offset: usize) -> Option<String> {
    let inside = |span: Range<usize>| span.start <= offset && offset < span.end.max(span.start + 1);
    match value.get_ref() {
        DeValue::Table(table) => {
            for (key, child) in table.iter() {
                let name = key.get_ref().as_ref();
                if let Some(rest) = key_path_at(child, offset) {
                    return Some(join_path(name, &rest));
                }
                if inside(key.span()) {
                    return Some(name.to_owned());
                }
            }
        }
        DeValue::Array(array) => {
            for (index, child) in array.iter().enumerate() {
                if let Some(rest) = key_path_at(child, offset) {
                    return Some(join_path(&format!("[{index}]"), &rest));
                }
            }
        }
        _ => {}
    }
    inside(value.span()).then(String::new)
}

/// An unquoted word where a value belongs (`log_level = info`), which TOML reports as a
/// broken float or boolean.
fn bare_word(text: &str, offset: usize) -> Option<&str> {
    let rest = text.get(offset..)?;
    let before = text.get(..offset)?.trim_end_matches([' ', '\t']);
    if !(before.ends_with('=') || before.ends_with('[') || before.ends_with(',')) {
        return None;
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
        .unwrap_or(rest.len());
    let word = &rest[..end];
    let starts_with_letter = word.starts_with(|c: char| c.is_ascii_alphabetic());
    (starts_with_letter && !["true", "false", "inf", "nan"].contains(&word)).then_some(word)
}

/// The key path of a syntax error from the text around it, for errors that leave no value
/// in the recovered document (an unclosed string): the table header above the line and
/// the key on the line, e.g. `devices[1].name`.
fn key_path_from_text(text: &str, offset: usize) -> Option<String> {
    static KEY: OnceLock<Regex> = OnceLock::new();
    static HEADER: OnceLock<Regex> = OnceLock::new();
    let key_re = KEY.get_or_init(|| {
        Regex::new(r"^\s*([A-Za-z0-9_-]+(?:\s*\.\s*[A-Za-z0-9_-]+)*)\s*=").expect("key regex")
    });
    let header_re = HEADER
        .get_or_init(|| Regex::new(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]").expect("header regex"));
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next().unwrap_or_default();
    let key: String = key_re
        .captures(line)?
        .get(1)?
        .as_str()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let earlier: Vec<&str> = text.get(..line_start)?.lines().collect();
    for (i, line) in earlier.iter().enumerate().rev() {
        if let Some(header) = header_re.captures(line) {
            let name = header.get(2).map_or("", |m| m.as_str());
            if header.get(1).is_some_and(|m| m.as_str() == "[[") {
                let index = earlier[..i]
                    .iter()
                    .filter_map(|l| header_re.captures(l))
                    .filter(|c| c.get(2).is_some_and(|m| m.as_str() == name))
                    .count();
                return Some(format!("{name}[{index}].{key}"));
            }
            return Some(format!("{name}.{key}"));
        }
    }
    Some(key)
}

/// Removes the deepest table entry whose key or value holds `offset`; false when no entry
/// does (the offset is on the part's own header).
fn remove_entry_at(value: &mut Spanned<DeValue<'_>>, offset: usize) -> bool {
    match value.get_mut() {
        DeValue::Table(table) => {
            for (_, child) in table.iter_mut() {
                if remove_entry_at(child, offset) {
                    return true;
                }
            }
            let found = table
                .iter()
                .find(|(key, child)| {
                    let span = key.span();
                    (span.start <= offset && offset < span.end)
                        || key_path_at(child, offset).is_some()
                })
                .map(|(key, _)| key.get_ref().to_string());
            match found {
                Some(key) => table.remove(key.as_str()).is_some(),
                None => false,
            }
        }
        DeValue::Array(array) => array.iter_mut().any(|child| remove_entry_at(child, offset)),
        _ => false,
    }
}

pub(crate) fn join_path(prefix: &str, rest: &str) -> String {
    if rest.is_empty() {
        prefix.to_owned()
    } else if prefix.is_empty() || rest.starts_with('[') {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}.{rest}")
    }
}

/// Rewrites serde's type names into words a config author knows.
fn friendly(message: &str) -> String {
    message
        .replace("expected f64", "expected a number")
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("expected a map", "expected a table")
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
}

/// The names between backticks in a serde message.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

impl Checker<'_> {
    /// The tables of an array of tables (`[[devices]]`); anything else is recorded as an
    /// error with `hint`, and gives `None`.
    pub(crate) fn array_of_tables<'t>(
        &mut self,
        value: Spanned<DeValue<'t>>,
        key: &str,
        hint: &str,
    ) -> Option<Vec<Spanned<DeValue<'t>>>> {
        let span = value.span();
        match value.into_inner() {
            DeValue::Array(array) => Some(array.into_iter().collect()),
            _ => {
                self.d
                    .error(Some(span), key, "expected an array of tables")
                    .hint = Some(hint.into());
                None
            }
        }
    }

    /// Deserializes one part of the document; a serde error becomes a diagnostic whose key
    /// path starts with `prefix`. The offending key is then removed and serde runs again,
    /// so every bad key of the part is reported and validation still sees the good ones.
    pub(crate) fn deserialize<T: DeserializeOwned>(
        &mut self,
        mut value: Spanned<DeValue<'_>>,
        prefix: &str,
    ) -> Option<T> {
        // Bounded: each round removes one key, and a part has few keys.
        for _ in 0..64 {
            let error = match T::deserialize(value.clone().into_deserializer()) {
                Ok(raw) => return Some(raw),
                Err(error) => error,
            };
            let span = error.span();
            let relative = span
                .as_ref()
                .and_then(|span| key_path_at(&value, span.start))
                .unwrap_or_default();
            let key_path = join_path(prefix, &relative);
            let message = error.message();
            if let Some(rest) = message.strip_prefix("unknown field `") {
                let names = backticked(message);
                let unknown = rest.split('`').next().unwrap_or_default();
                let known: Vec<&str> = names.iter().skip(1).copied().collect();
                self.unknown_key(span.clone(), &key_path, unknown, &known);
            } else if message.starts_with("missing field `") {
                let field = backticked(message).first().copied().unwrap_or_default();
                let key_path = join_path(&key_path, field);
                self.d.error(span.clone(), key_path, "missing required key");
            } else {
                self.d.error(span.clone(), &key_path, friendly(message));
            }
            self.reported.insert(key_path);
            let removed = span.is_some_and(|span| remove_entry_at(&mut value, span.start));
            if !removed {
                return None;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diagnostic_at_a_key_path_gets_the_line_of_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("x.toml");
        std::fs::write(
            &file,
            "[gateway]\nid = \"g\"\n[[broker.listeners]]\nbind = \"a\"\n[[broker.listeners]]\nbind = \"b\"\n",
        )
        .expect("write");
        let at = |path: &str| diagnostic_at(&file, path, "m").line;
        assert_eq!(at("broker.listeners[1].bind"), Some(6));
        assert_eq!(at("broker.listeners[0]"), Some(3));
        assert_eq!(
            at("gateway.data_dir"),
            Some(1),
            "a default: the enclosing table"
        );
        assert_eq!(at("uplinks[0].password_env"), None);
    }

    #[test]
    fn key_paths_follow_tables_and_arrays() {
        let text = "[gateway]\nid = \"x\"\n[[devices]]\nname = \"a\"\npoints = [ { name = \"t\", min = 1 } ]\n";
        let document = DeTable::parse(text).expect("valid toml");
        let root = Spanned::new(document.span(), DeValue::Table(document.into_inner()));
        let offset = text.find("min").expect("min in text");
        assert_eq!(
            key_path_at(&root, offset).as_deref(),
            Some("devices[0].points[0].min")
        );
        let offset = text.find("1 }").expect("1 in text");
        assert_eq!(
            key_path_at(&root, offset).as_deref(),
            Some("devices[0].points[0].min")
        );
        let offset = text.find("\"x\"").expect("x in text");
        assert_eq!(key_path_at(&root, offset).as_deref(), Some("gateway.id"));
    }
}
