//! The JSON Schema of the state (embedded from `schemas/lunafront.schema.json`), checked
//! before the semantic rules. Schema errors are turned into diagnostics at the user's YAML
//! position, with messages written for people rather than for JSON Schema experts.

use super::diagnostics::{Diagnostic, closest, quote};
use super::load::Source;
use super::spans::escape_pointer_token;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;
use std::sync::OnceLock;

pub const SCHEMA_TEXT: &str = include_str!("../../schemas/lunafront.schema.json");

fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| serde_json::from_str(SCHEMA_TEXT).expect("embedded schema is JSON"))
}

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        jsonschema::options()
            .should_validate_formats(true)
            .build(schema())
            .expect("embedded schema compiles")
    })
}

/// Checks the merged document against the schema; one diagnostic per problem.
pub fn check(source: &Source) -> Vec<Diagnostic> {
    check_document(source, &source.document)
}

/// `check` of `document`, the source's merged document or a part of it, located in the
/// source's files.
pub fn check_document(source: &Source, document: &Value) -> Vec<Diagnostic> {
    let validator = validator();
    if validator.is_valid(document) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for error in validator.iter_errors(document) {
        translate(source, &error, &mut out);
    }
    out
}

fn translate(source: &Source, error: &ValidationError<'_>, out: &mut Vec<Diagnostic>) {
    let pointer = error.instance_path().as_str().to_string();
    let instance = error.instance();
    let what = describe(&pointer);
    let here = |key: bool| source.locate(&pointer, key);
    let diagnostic = match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed = allowed_properties(error.schema_path().as_str());
            for name in unexpected {
                let field_pointer = format!("{pointer}/{}", escape_pointer_token(name));
                let hint = match closest(name, allowed.iter().map(String::as_str)) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None if allowed.is_empty() => "remove it".to_string(),
                    None => format!("allowed here: {}", allowed.join(", ")),
                };
                out.push(
                    Diagnostic::error(
                        "unknown-field",
                        format!("unknown field {} in {what}", quote(name)),
                    )
                    .hint(hint)
                    .at(source.locate(&field_pointer, true))
                    .pointer(field_pointer),
                );
            }
            return;
        }
        ValidationErrorKind::PropertyNames { error: inner } => {
            let name = inner.instance().as_str().unwrap_or_default().to_string();
            let key_pointer = format!("{pointer}/{}", escape_pointer_token(&name));
            let rule = schema_description(inner.schema_path().as_str())
                .unwrap_or_else(|| "a valid name".to_string());
            out.push(
                Diagnostic::error(
                    "invalid-name",
                    format!("{} is not a valid name in {what}", quote(&name)),
                )
                .hint(rule)
                .at(source.locate(&key_pointer, true))
                .pointer(key_pointer),
            );
            return;
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            Diagnostic::error(
                "missing-field",
                format!("{what} is missing the required field `{name}`"),
            )
            .hint(format!("add `{name}:`"))
            .at(here(true))
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            Diagnostic::error(
                "wrong-type",
                format!(
                    "{what} must be {}, found {}",
                    article(&expected),
                    json_type(instance)
                ),
            )
            .hint(
                schema_description(error.schema_path().as_str())
                    .unwrap_or_else(|| format!("write {}", article(&expected))),
            )
            .at(here(false))
        }
        ValidationErrorKind::Enum { options } => {
            let options: Vec<String> = options
                .as_array()
                .map(|a| a.iter().map(|v| v.to_string()).collect())
                .unwrap_or_default();
            Diagnostic::error(
                "invalid-value",
                format!("{what} is {}, which is not allowed", short(instance)),
            )
            .hint(format!("one of: {}", options.join(", ")))
            .at(here(false))
        }
        ValidationErrorKind::Constant { expected_value } => Diagnostic::error(
            "invalid-value",
            format!("{what} must be {expected_value}, found {}", short(instance)),
        )
        .hint(format!("write {expected_value}"))
        .at(here(false)),
        ValidationErrorKind::Minimum { limit } | ValidationErrorKind::Maximum { limit } => {
            let range = range_of(error.schema_path().as_str());
            let code = if pointer.ends_with("/port") {
                "port-range"
            } else {
                "out-of-range"
            };
            Diagnostic::error(
                code,
                format!("{what} {} is out of range{range}", short(instance)),
            )
            .hint(format!("use a value{range}; the limit here is {limit}"))
            .at(here(false))
        }
        ValidationErrorKind::MinItems { limit } => {
            Diagnostic::error("too-few", format!("{what} needs at least {limit} item(s)"))
                .at(here(false))
        }
        ValidationErrorKind::Pattern { .. }
        | ValidationErrorKind::Format { .. }
        | ValidationErrorKind::AnyOf { .. }
        | ValidationErrorKind::MaxLength { .. }
        | ValidationErrorKind::MinLength { .. } => {
            let rule = schema_description(error.schema_path().as_str())
                .unwrap_or_else(|| error.to_string());
            Diagnostic::error(
                "invalid-value",
                format!("{what} {} is not valid", short(instance)),
            )
            .hint(rule)
            .at(here(false))
        }
        _ => Diagnostic::error("schema", format!("{what}: {error}")).at(here(false)),
    };
    out.push(diagnostic.pointer(pointer));
}

/// A phrase naming the entry at `pointer`: "backend `shop` field `port`".
pub fn describe(pointer: &str) -> String {
    let parts: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    match parts.as_slice() {
        [] => "the state".to_string(),
        [section] => format!("section `{section}`"),
        [section, name, rest @ ..] => {
            let kind = match section.as_str() {
                "listeners" => "listener",
                "agents" => "agent",
                "backends" => "backend",
                "domains" => "domain",
                "targets" => "target",
                "groups" => "group",
                other => other,
            };
            let head = if matches!(section.as_str(), "global" | "api") {
                format!("`{section}.{name}`")
            } else {
                format!("{kind} {}", quote(name))
            };
            if rest.is_empty() {
                head
            } else {
                let field: Vec<String> = rest
                    .iter()
                    .map(|p| {
                        if p.chars().all(|c| c.is_ascii_digit()) {
                            format!("[{p}]")
                        } else {
                            format!(".{p}")
                        }
                    })
                    .collect();
                format!("{head} field `{}`", field.concat().trim_start_matches('.'))
            }
        }
    }
}

fn article(t: &str) -> String {
    match t.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {t}"),
        _ => format!("a {t}"),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        Value::Object(_) => "a mapping".into(),
        Value::Array(_) => "a list".into(),
        other => format!("`{other}`"),
    }
}

/// The schema node at `schema_path` with its last keyword removed (the node that failed).
fn failing_node(schema_path: &str) -> Option<&'static Value> {
    let mut path = schema_path;
    // Walk up until the pointer names a schema object (skip keyword segments and indexes).
    loop {
        if let Some(node) = schema().pointer(path)
            && node.is_object()
            && (node.get("description").is_some() || node.get("properties").is_some())
        {
            return Some(node);
        }
        let idx = path.rfind('/')?;
        path = &path[..idx];
        if path.is_empty() {
            return None;
        }
    }
}

fn schema_description(schema_path: &str) -> Option<String> {
    let node = failing_node(schema_path)?;
    if let Some(description) = node.get("description").and_then(Value::as_str) {
        return Some(description.to_string());
    }
    // A `$ref` target carries the description of the grammar (identifier, host, ...).
    let reference = node.get("$ref")?.as_str()?.strip_prefix('#')?;
    schema()
        .pointer(reference)?
        .get("description")?
        .as_str()
        .map(str::to_string)
}

fn allowed_properties(schema_path: &str) -> Vec<String> {
    let parent = schema_path
        .strip_suffix("/additionalProperties")
        .unwrap_or(schema_path);
    schema()
        .pointer(parent)
        .and_then(|n| n.get("properties"))
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

fn range_of(schema_path: &str) -> String {
    let parent = schema_path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    let node = schema().pointer(parent);
    let min = node.and_then(|n| n.get("minimum"));
    let max = node.and_then(|n| n.get("maximum"));
    match (min, max) {
        (Some(a), Some(b)) => format!(" ({a}-{b})"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_schema_compiles() {
        let _ = validator();
    }

    #[test]
    fn describe_pointers() {
        assert_eq!(
            describe("/backends/shop/servers/0/port"),
            "backend `shop` field `servers[0].port`"
        );
        assert_eq!(describe("/domains/a.example.com"), "domain `a.example.com`");
        assert_eq!(describe("/global/timeouts"), "`global.timeouts`");
    }
}
