//! Diagnostics: every problem `load` and `validate` find, each pointing at the user's text
//! (file, line, column) with a code, a message and a hint on what to do.

use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A position in a state file; line and column start at 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable, kebab-case identifier of the rule (listed in the README).
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// JSON pointer of the offending value in the merged state, e.g. `/domains/shop.example.com/backend`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pointer: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Note>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, message)
    }

    fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity,
            code,
            message: message.into(),
            hint: None,
            location: None,
            pointer: String::new(),
            notes: Vec::new(),
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn at(mut self, location: Option<Location>) -> Self {
        self.location = location;
        self
    }

    pub fn pointer(mut self, pointer: impl Into<String>) -> Self {
        self.pointer = pointer.into();
        self
    }

    pub fn note(mut self, location: Option<Location>, message: impl Into<String>) -> Self {
        self.notes.push(Note {
            location,
            message: message.into(),
        });
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.location {
            write!(f, "{location}: ")?;
        }
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}[{}]: {}", self.code, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        for note in &self.notes {
            match &note.location {
                Some(location) => write!(f, "\n  note: {location}: {}", note.message)?,
                None => write!(f, "\n  note: {}", note.message)?,
            }
        }
        Ok(())
    }
}

/// Quotes a user value for a message. Control characters, quotes and anything non-ASCII are
/// escaped, so a hostile value can neither break the terminal nor hide a look-alike character.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('`');
    for c in value.chars().take(120) {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            '`' => out.push_str("\\`"),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
        }
    }
    if value.chars().count() > 120 {
        out.push('…');
    }
    out.push('`');
    out
}

/// The closest candidate to `wrong`, for "did you mean" hints.
pub fn closest<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(wrong, c), c))
        .filter(|(distance, c)| *distance <= (c.len().max(wrong.len()) / 3).max(2))
        .min()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_control_and_unicode() {
        assert_eq!(quote("a\nb"), "`a\\nb`");
        assert_eq!(quote("shop.аpps"), "`shop.\\u{0430}pps`");
        assert_eq!(quote("x\0y\r"), "`x\\0y\\r`");
    }

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(closest("shpo", ["shop", "legacy"]), Some("shop"));
        assert_eq!(closest("zzzzzz", ["shop", "legacy"]), None);
    }

    #[test]
    fn display_has_location_code_and_hint() {
        let d = Diagnostic::error("unknown-backend", "no such backend")
            .hint("define it")
            .at(Some(Location {
                file: "state.yaml".into(),
                line: 3,
                column: 5,
            }));
        assert_eq!(
            d.to_string(),
            "state.yaml:3:5: error[unknown-backend]: no such backend\n  hint: define it"
        );
    }
}
