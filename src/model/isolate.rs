//! Per-entry isolation (the daemon's `isolate_invalid: true`): when only some domains, backends
//! or agents are invalid (say one file written by the API is broken), build a state from the
//! valid rest, keeping each invalid entry at its last applied version (or leaving it out if it
//! was never applied). Errors anywhere else (listeners, global, targets) cannot be isolated.

use super::{Model, Validation, validate};
use crate::spec::load::Source;
use serde_json::Value;
use std::collections::BTreeSet;

const SECTIONS: [&str; 3] = ["domains", "backends", "agents"];

pub struct Isolated {
    pub model: Model,
    /// What was held back, for people: "domain `x`: kept at its last applied version".
    pub held: Vec<String>,
}

/// The entry (`section`, `name`) a diagnostic pointer lies in, if it is an isolatable one.
fn entry_of(pointer: &str) -> Option<(String, String)> {
    let mut parts = pointer.split('/').skip(1);
    let section = parts.next()?;
    let name = parts.next()?;
    SECTIONS.contains(&section).then(|| {
        (
            section.to_string(),
            name.replace("~1", "/").replace("~0", "~"),
        )
    })
}

/// A diagnostic about a whole file whose entries could not be read.
fn unreadable_file(d: &crate::spec::diagnostics::Diagnostic) -> bool {
    d.pointer.is_empty() && matches!(d.code, "yaml-syntax" | "empty-file" | "not-a-file")
}

pub fn isolate(
    source: &Source,
    validation: &Validation,
    previous: Option<&Model>,
) -> Option<Isolated> {
    let previous_doc = previous
        .map(|m| m.document())
        .unwrap_or_else(|| Value::Object(Default::default()));
    let mut doc = source.document.as_ref().clone();
    let mut held = Vec::new();
    let mut done: BTreeSet<(String, String)> = BTreeSet::new();

    // A file that could not be read (it does not parse, is empty, is a folder) took its
    // entries with it: those the last apply had and the state now lacks are presumed to be in
    // it, and kept.
    if validation.errors().any(unreadable_file) {
        for section in SECTIONS {
            let Some(previous_entries) = previous_doc.get(section).and_then(Value::as_object)
            else {
                continue;
            };
            for (name, value) in previous_entries {
                let current = doc
                    .as_object_mut()?
                    .entry(section)
                    .or_insert_with(|| Value::Object(Default::default()));
                let current = current.as_object_mut()?;
                if !current.contains_key(name) {
                    current.insert(name.clone(), value.clone());
                    held.push(format!(
                        "{} `{name}`: kept at its last applied version (its file does not parse)",
                        &section[..section.len() - 1]
                    ));
                }
            }
        }
    }

    let mut diagnostics = validation.diagnostics.clone();
    // Each round holds back the entries the errors point into; an entry whose last applied
    // version is wrong too (it names something gone) is left out in the next round.
    for _round in 0..8 {
        let mut progress = false;
        for d in diagnostics.iter().filter(|d| d.is_error()) {
            if unreadable_file(d) {
                continue;
            }
            let (section, name) = entry_of(&d.pointer)?;
            let entries = doc.get_mut(&section)?.as_object_mut()?;
            let last = previous_doc.get(&section).and_then(|s| s.get(&name));
            let kind = &section[..section.len() - 1];
            if done.insert((section.clone(), name.clone()))
                && let Some(last) = last
            {
                entries.insert(name.clone(), last.clone());
                held.push(format!(
                    "{kind} `{name}`: kept at its last applied version ({})",
                    d.message
                ));
            } else if entries.remove(&name).is_some() {
                held.push(format!("{kind} `{name}`: left out ({})", d.message));
            } else {
                continue;
            }
            progress = true;
        }
        if !progress {
            return None;
        }
        let result = validate(&source.with_document(doc.clone()));
        match result.model {
            Some(model) => return Some(Isolated { model, held }),
            None => diagnostics = result.diagnostics,
        }
    }
    None
}
