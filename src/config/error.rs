//! Configuration diagnostics: every problem found in a config file, each with the file, the
//! line and column, the key path (`devices[2].points[0].waveform`) and, where one helps, a
//! hint. [`ConfigError`] carries all of them so a user fixes the whole file in one pass.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column, counted in characters.
    pub column: Option<usize>,
    /// Dotted key path with array indices, e.g. `uplinks[0].routes[1].qos`; empty when the
    /// problem concerns the whole file.
    pub key_path: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    /// `config/x.toml:12:5: devices[2].points[0].waveform: unknown waveform "sinus", ...`
    /// followed by `\n  hint: ...` when there is a hint.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key_path.is_empty() {
            write!(f, "{}: ", self.key_path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Everything wrong with a configuration file. Display prints every diagnostic, one per line
/// (a hint goes on its own indented line below its diagnostic).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", render(&self.diagnostics))]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// An error about the file as a whole (unreadable, for example).
    pub(crate) fn whole_file(file: &Path, message: String) -> ConfigError {
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: file.to_path_buf(),
                line: None,
                column: None,
                key_path: String::new(),
                message,
                hint: None,
            }],
        }
    }
}

/// Collects diagnostics for one file, turning byte spans into line and column.
#[derive(Debug)]
pub(crate) struct Diagnostics<'a> {
    file: PathBuf,
    text: &'a str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
    list: Vec<Diagnostic>,
}

impl<'a> Diagnostics<'a> {
    pub(crate) fn new(file: &Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Diagnostics {
            file: file.to_path_buf(),
            text,
            line_starts,
            list: Vec::new(),
        }
    }

    /// 1-based (line, column) of a byte offset; the column counts characters.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line_index = self
            .line_starts
            .partition_point(|&start| start <= offset)
            .saturating_sub(1);
        let line_start = self.line_starts.get(line_index).copied().unwrap_or(0);
        let column = match self.text.get(line_start..offset) {
            Some(prefix) => prefix.chars().count(),
            None => offset - line_start,
        };
        (line_index + 1, column + 1)
    }

    /// Records a problem and returns it so the caller can attach a hint.
    pub(crate) fn error(
        &mut self,
        span: Option<Range<usize>>,
        key_path: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        let (line, column) = match span {
            Some(span) => {
                let (line, column) = self.position(span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        self.list.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            key_path: key_path.into(),
            message: message.into(),
            hint: None,
        });
        let last = self.list.len() - 1;
        &mut self.list[last]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// All diagnostics in file order (those without a line last).
    pub(crate) fn into_error(mut self) -> ConfigError {
        self.list
            .sort_by_key(|d| (d.line.unwrap_or(usize::MAX), d.column.unwrap_or(0)));
        ConfigError {
            diagnostics: self.list,
        }
    }
}

/// The closest candidate within edit distance 2 (and at most half the word, so that a
/// short word is not "corrected" into an unrelated one), if any.
pub(crate) fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let length = word.chars().count();
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(distance, _)| *distance <= 2 && distance * 2 <= length)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let text = "a = 1\nunit = \"°C\" x\n";
        let d = Diagnostics::new(Path::new("x.toml"), text);
        assert_eq!(d.position(0), (1, 1));
        assert_eq!(d.position(6), (2, 1));
        let x = text.rfind('x').expect("x in text");
        assert_eq!(d.position(x), (2, 13));
        assert_eq!(d.position(text.len()), (3, 1));
    }

    #[test]
    fn display_shows_file_line_column_key_path_and_hint() {
        let mut d = Diagnostics::new(Path::new("config/x.toml"), "\n\nab");
        d.error(Some(3..4), "devices[0].pol", "unknown key `pol`")
            .hint = Some("did you mean `poll`?".into());
        let e = d.into_error();
        assert_eq!(
            e.to_string(),
            "config/x.toml:3:2: devices[0].pol: unknown key `pol`\n  hint: did you mean `poll`?"
        );
    }

    #[test]
    fn close_keys_are_suggested_and_far_ones_are_not() {
        assert_eq!(closest("pol", &["name", "poll", "points"]), Some("poll"));
        assert_eq!(closest("wavefrom", &["waveform", "min"]), Some("waveform"));
        assert_eq!(closest("colour", &["name", "poll"]), None);
        assert_eq!(closest("wat", &["out", "in"]), None);
        assert_eq!(closest("sinus", &["sine", "ramp"]), Some("sine"));
        assert_eq!(strsim::levenshtein("", "abc"), 3);
    }
}
