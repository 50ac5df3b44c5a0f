//! The one escaping filter of `render`. Every `{{ value }}` in a template goes through it (it
//! is the template engine's formatter, so a template cannot forget it), and so does every line
//! of a map file and every value of the slot backends (`render::slot_blocks`, `check_token`). It does not escape: it refuses. A value that is not a plain token of safe
//! characters fails the render, so even a validation bug cannot inject configuration.
//! The one exception, `extra:` lines, goes through the `raw_line` filter: a whole line, held
//! to `check_raw_line` (one line, no new section, no variable expansion) when it is marked
//! and again when it is written.

use crate::model::names::{check_raw_line, is_config_token};
use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Output, State, Value};

/// The formatter installed in the template environment.
pub fn format_value(out: &mut Output, _state: &mut State, value: &Value) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Number => value.to_string(),
        ValueKind::String if value.is_safe() => {
            let s = value.as_str().unwrap_or_default();
            check_raw_line(s).map_err(|m| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("refusing to write the raw line {s:?}: {m}"),
                )
            })?;
            s.to_string()
        }
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            check_token(s).map_err(|m| Error::new(ErrorKind::InvalidOperation, m))?;
            s.to_string()
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("refusing to write a {other} value into the HAProxy configuration"),
            ));
        }
    };
    out.write_str(&text).map_err(Error::from)
}

/// `{{ line | raw_line }}`: an `extra:` line, written whole (spaces and quotes included).
pub fn raw_line(line: String) -> Result<Value, Error> {
    check_raw_line(&line).map_err(|m| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("refusing to write the raw line {line:?}: {m}"),
        )
    })?;
    Ok(Value::from_safe_string(line))
}

/// A value that may stand as one word of HAProxy configuration or one field of a map line.
pub fn check_token(s: &str) -> Result<(), String> {
    if is_config_token(s) {
        Ok(())
    } else {
        Err(format!(
            "refusing to write {} into the HAProxy configuration: it holds characters HAProxy would interpret",
            crate::spec::diagnostics::quote(s)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_anything_with_syntax() {
        for bad in [
            "a b", "a\nb", "x#y", "%[src]", "${HOME}", "a\"b", "a'b", "a\\b", "", "a\0b", "é",
        ] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
        for good in [
            "shop",
            "agent:agent-7/shop",
            "127.0.0.1:80",
            "ipv6@::1:80",
            "*.preview.example.com",
            "str(a.example.com)",
        ] {
            assert!(check_token(good).is_ok(), "{good:?}");
        }
    }
}
