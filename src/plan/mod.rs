//! `plan`: compares the new rendering with what a target holds (its files, and the state it was
//! last applied from) and says what changes, how it goes live — the exact runtime operations,
//! or a reload and why (`ops::Execution`, decided here once) — and what the files will look
//! like. Pure: targets read the files, and execute the plan's `execution`.

pub mod diff;
pub mod json;
pub mod ops;
pub mod saved;
pub mod text;

use crate::model::Model;
use crate::render::layout::SlotPools;
use crate::render::{MANIFEST, RenderOptions, Rendered, readback};
use crate::target::files::Files;
use diff::{Action, Change, Kind, Mode};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// What a target holds now: its files (by path relative to the configuration's folder) and the
/// model it was last applied from, when it recorded one.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub files: BTreeMap<String, Vec<u8>>,
    /// The model recorded by the last apply (from the manifest), if readable.
    pub previous: Option<std::sync::Arc<Model>>,
    /// SHA-256 of each file the last apply wrote (path → digest), from the manifest.
    pub recorded_files: BTreeMap<String, String>,
    /// Why the recorded state could not be used, when a manifest exists but is unreadable.
    pub previous_error: Option<String>,
    /// The configuration's version, for targets that version it (the Data Plane API).
    pub version: Option<u64>,
    /// Why HAProxy is not known to run these files (an apply was interrupted between writing
    /// them and HAProxy running them): the plan then reloads it.
    pub interrupted: Option<String>,
}

impl Live {
    /// A fingerprint of everything the plan was computed against, to refuse a stale saved plan.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        if let Some(version) = self.version {
            hasher.update(format!("version {version}\n").as_bytes());
        }
        for (path, bytes) in &self.files {
            hasher.update(path.as_bytes());
            hasher.update([0]);
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        hex::encode(hasher.finalize())
    }

    pub fn config<'a>(&'a self, config_name: &str) -> Option<&'a [u8]> {
        self.files.get(config_name).map(Vec::as_slice)
    }

    /// The app slots of the configuration the target holds (none when it holds none): what a
    /// rendering for it starts from (`render::render_onto`).
    pub fn slot_pools(&self, config_name: &str) -> SlotPools {
        self.config(config_name)
            .map(|c| readback::slot_pools(&String::from_utf8_lossy(c)))
            .unwrap_or_default()
    }
}

/// One file that differs between the target and the new rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    pub before: Option<Vec<u8>>,
    pub after: Option<Vec<u8>>,
    /// Holds a private key: its content is never shown.
    pub secret: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: String,
    /// Semantic changes, in display order.
    pub changes: Vec<Change>,
    /// Files that differ (the manifest excluded).
    pub files: Vec<FileChange>,
    /// How the target gets there: runtime operations, or a reload with its reasons. The text
    /// and JSON outputs show it; the target executes it.
    pub execution: ops::Execution,
    /// Fingerprint of the live files the plan was made against.
    pub live_fingerprint: String,
    /// Every file to write (manifest included), and how they name each other.
    pub new_files: Files,
    pub options: RenderOptions,
    /// Set when the plan removes more domains or backends than `global.delete_guard` lets
    /// through as they come (a file cut short looks like that).
    pub mass_delete: Option<MassDelete>,
}

/// How many domains and backends a plan removes, of how many, when that trips the guard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MassDelete {
    pub domains_removed: usize,
    pub domains_before: usize,
    pub backends_removed: usize,
    pub backends_before: usize,
    /// The guard it trips: more than `count` and more than `percent` % removed.
    pub count: u32,
    pub percent: u32,
}

impl MassDelete {
    /// The guard's verdict on going from `old` to `new` (the guard's settings are `new`'s).
    pub fn between(old: &Model, new: &Model) -> Option<MassDelete> {
        let guard = new.global.delete_guard;
        let domains_removed = removed_keys(&old.domains, &new.domains);
        let backends_removed = removed_keys(&old.backends, &new.backends);
        (guard.trips(domains_removed, old.domains.len())
            || guard.trips(backends_removed, old.backends.len()))
        .then_some(MassDelete {
            domains_removed,
            domains_before: old.domains.len(),
            backends_removed,
            backends_before: old.backends.len(),
            count: guard.count,
            percent: guard.percent,
        })
    }

    /// `25 of 30 domains` (and/or backends).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.domains_removed > 0 {
            parts.push(format!(
                "{} of {} domains",
                self.domains_removed, self.domains_before
            ));
        }
        if self.backends_removed > 0 {
            parts.push(format!(
                "{} of {} backends",
                self.backends_removed, self.backends_before
            ));
        }
        format!(
            "this change removes {} (more than {} and more than {}%: `global.delete_guard`)",
            parts.join(" and "),
            self.count,
            self.percent
        )
    }
}

/// How many keys of `old` `new` lacks, walking both in key order (as `diff::diff_maps`).
fn removed_keys<K: Ord, A, B>(old: &BTreeMap<K, A>, new: &BTreeMap<K, B>) -> usize {
    let mut new = new.keys().peekable();
    old.keys()
        .filter(|k| {
            while new.next_if(|n| n < k).is_some() {}
            new.next_if(|n| n == k).is_none()
        })
        .count()
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.files.is_empty()
    }

    pub fn reload_required(&self) -> bool {
        self.execution.is_reload()
    }

    pub fn reload_reasons(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.changes
            .iter()
            .filter(|c| c.mode == Mode::Reload)
            .filter(|c| seen.insert(c.reason.clone()))
            .map(|c| format!("{} {} ({})", c.kind.as_str(), c.name, c.reason))
            .collect()
    }
}

/// The model with nothing in it: what an empty target holds.
pub fn empty_model() -> Model {
    let source = crate::spec::load::Source::parse(Vec::new());
    crate::model::validate(&source)
        .model
        .expect("the empty state is valid")
}

/// Builds the plan for `target` from the new model and its rendering, against `live`.
pub fn make_plan(target: &str, model: &Model, rendered: &Rendered, live: &Live) -> Plan {
    let before = live.slot_pools(&rendered.options.config_name);
    make_plan_onto(target, model, rendered, live, &before)
}

/// `make_plan`, given the app slots `live`'s configuration holds (`Live::slot_pools`, which
/// the rendering started from): read once for both (a parse of the whole configuration).
pub fn make_plan_onto(
    target: &str,
    model: &Model,
    rendered: &Rendered,
    live: &Live,
    slots_before: &SlotPools,
) -> Plan {
    plan_with_slots(
        target,
        model,
        rendered.file_map(),
        &rendered.options,
        live,
        diff::Slots {
            before: slots_before,
            after: &rendered.slots,
        },
    )
}

/// Builds the plan for files already rendered (a history entry, for a rollback).
pub fn plan_files(
    target: &str,
    model: &Model,
    new_files: Files,
    options: &RenderOptions,
    live: &Live,
) -> Plan {
    let after = new_files
        .get(&options.config_name)
        .map(|c| readback::slot_pools(&String::from_utf8_lossy(c)))
        .unwrap_or_default();
    let before = live.slot_pools(&options.config_name);
    let slots = diff::Slots {
        before: &before,
        after: &after,
    };
    plan_with_slots(target, model, new_files, options, live, slots)
}

/// `slots`: the app slots of `live`'s configuration and of `new_files`'.
fn plan_with_slots(
    target: &str,
    model: &Model,
    new_files: Files,
    options: &RenderOptions,
    live: &Live,
    slots: diff::Slots,
) -> Plan {
    let empty = empty_model();
    let previous = live.previous.as_deref().unwrap_or(&empty);
    let model = &*model.with_binds(&options.binds);
    let mut changes = diff::diff_models(previous, model, &slots);
    let mass_delete = MassDelete::between(previous, model);

    let files = file_changes(&new_files, live);

    // What the target holds but the last apply did not write: drift, or a foreign config.
    changes.extend(drift_changes(&options.config_name, live));

    if let Some(why) = &live.interrupted {
        changes.push(Change {
            action: Action::Update,
            kind: Kind::Global,
            name: "haproxy".into(),
            detail: format!(": {why}"),
            before: None,
            after: None,
            mode: Mode::Reload,
            reason: "HAProxy may run neither the previous files nor these: a reload makes it run what the files say, which finishes the apply".into(),
            raw: false,
        });
    }
    let execution = decide(live, &new_files, options);
    if let ops::Execution::Reload { reasons } = &execution
        && !changes.iter().any(|c| c.mode == Mode::Reload)
    {
        let reason = reasons.join("; ");
        // The configuration text changed with no change of the state that explains it: a new
        // lunafront version, or files rendered earlier (a rollback).
        changes.push(Change {
            action: Action::Update,
            kind: Kind::Global,
            name: options.config_name.clone(),
            detail: ": the generated configuration changed".into(),
            before: None,
            after: None,
            mode: Mode::Reload,
            reason,
            raw: false,
        });
    }
    Plan {
        target: target.to_string(),
        changes,
        files,
        execution,
        live_fingerprint: live.fingerprint(),
        new_files,
        options: options.clone(),
        mass_delete,
    }
}

/// The one decision: how a target holding `live` gets `new_files` — the runtime operations, or a
/// reload and why. Deterministic in what it reads, so a saved plan applied against the same
/// target (its fingerprint checked) gets the same answer.
pub fn decide(live: &Live, new_files: &Files, options: &RenderOptions) -> ops::Execution {
    match &live.interrupted {
        Some(_) => ops::Execution::Reload {
            reasons: vec!["an apply was interrupted: a reload finishes it".to_string()],
        },
        None => ops::Execution::decide(&live.files, new_files, options),
    }
}

fn file_changes(new_files: &Files, live: &Live) -> Vec<FileChange> {
    let mut out = Vec::new();
    for (path, bytes) in new_files {
        let before = live.files.get(path);
        if path != MANIFEST && before != Some(bytes) {
            out.push(FileChange {
                path: path.clone(),
                before: before.cloned(),
                after: Some(bytes.clone()),
                secret: path.ends_with(".pem"),
            });
        }
    }
    for (path, bytes) in &live.files {
        if !new_files.contains_key(path) && path != MANIFEST {
            out.push(FileChange {
                path: path.clone(),
                before: Some(bytes.clone()),
                after: None,
                secret: path.ends_with(".pem"),
            });
        }
    }
    out
}

fn drift_changes(config_name: &str, live: &Live) -> Vec<Change> {
    if live.previous.is_none() {
        return match (live.config(config_name), &live.previous_error) {
            (Some(_), Some(error)) => vec![global_change(
                config_name,
                format!(
                    ": the state recorded by the last apply cannot be read ({error}); the configuration is replaced"
                ),
                Mode::Reload,
            )],
            (Some(_), None) => vec![global_change(
                config_name,
                ": not written by lunafront; it is replaced".into(),
                Mode::Reload,
            )],
            (None, _) => Vec::new(),
        };
    }
    let mut out = Vec::new();
    for (path, digest) in &live.recorded_files {
        let detail = match live.files.get(path) {
            Some(bytes) if sha256_hex(bytes) == *digest => continue,
            Some(_) => ": changed outside lunafront since the last apply (put back)",
            None => ": missing on the target since the last apply (put back)",
        };
        let mode = if path == config_name {
            Mode::Reload
        } else {
            Mode::Runtime
        };
        out.push(global_change(path, detail.to_string(), mode));
    }
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn global_change(name: &str, detail: String, mode: Mode) -> Change {
    Change {
        action: Action::Update,
        kind: Kind::Global,
        name: name.to_string(),
        detail,
        before: None,
        after: None,
        mode,
        reason: match mode {
            Mode::Reload => "drift in the configuration file is corrected with a reload".into(),
            Mode::Runtime => {
                "drift in maps and certificates is corrected through the runtime API".into()
            }
        },
        raw: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load::{Source, SourceFile};

    fn model(domains: usize, backends: usize, guard: &str) -> Model {
        let mut yaml = format!(
            "version: 1\nlisteners:\n  http: {{ bind: \":80\" }}\nglobal:\n  delete_guard: {guard}\nbackends:\n"
        );
        for b in 0..backends.max(1) {
            yaml.push_str(&format!(
                "  b{b}: {{ servers: [ {{ address: 10.0.0.1, port: {} }} ] }}\n",
                1000 + b
            ));
        }
        yaml.push_str("domains:\n");
        for d in 0..domains {
            yaml.push_str(&format!("  d{d}.example.com: {{ backend: b0 }}\n"));
        }
        let source = Source::parse(vec![SourceFile::new("s.yaml".into(), yaml)]);
        let validation = crate::model::validate(&source);
        validation
            .model
            .unwrap_or_else(|| panic!("{:?}", validation.diagnostics))
    }

    #[test]
    fn removed_keys_counts_the_keys_the_new_map_lacks() {
        let map = |keys: &[u32]| keys.iter().map(|k| (*k, ())).collect::<BTreeMap<_, _>>();
        let cases: [(&[u32], &[u32], usize); 6] = [
            (&[], &[], 0),
            (&[1, 2, 3], &[], 3),
            (&[], &[1, 2], 0),
            (&[1, 2, 3, 7], &[0, 2, 4, 7, 9], 2),
            (&[5], &[1, 2, 3, 4], 1),
            (&[1, 2, 3], &[1, 2, 3], 0),
        ];
        for (old, new, removed) in cases {
            assert_eq!(
                removed_keys(&map(old), &map(new)),
                removed,
                "{old:?} → {new:?}"
            );
        }
    }

    #[test]
    fn the_delete_guard_trips_past_both_its_count_and_its_share() {
        let default = "{}";
        // (domains before, after, backends before, after, guard, trips)
        let cases = [
            (30, 5, 1, 1, default, true),     // 25 of 30: past 10 and 10%
            (30, 20, 1, 1, default, false),   // 10 removed: not more than 10
            (200, 185, 1, 1, default, false), // 15 of 200: 7.5%, not more than 10%
            (200, 170, 1, 1, default, true),  // 30 of 200: 15%
            (5, 0, 1, 1, default, false),     // all 5: not more than 10
            (30, 0, 30, 1, default, true),    // backends too
            (30, 30, 30, 15, default, true),  // backends alone: 15 of 30
            (30, 5, 1, 1, "false", false),    // turned off
            (30, 25, 1, 1, "{ count: 3, percent: 10 }", true),
            (30, 25, 1, 1, "{ count: 3, percent: 50 }", false),
            (30, 35, 1, 1, default, false), // additions only
        ];
        for (before, after, b_before, b_after, guard, trips) in cases {
            let old = model(before, b_before, guard);
            let new = model(after, b_after, guard);
            let verdict = MassDelete::between(&old, &new);
            assert_eq!(
                verdict.is_some(),
                trips,
                "{before}→{after} domains, {b_before}→{b_after} backends, guard {guard}: {verdict:?}"
            );
        }
        let verdict = MassDelete::between(&model(30, 1, "{}"), &model(5, 1, "{}")).unwrap();
        assert!(
            verdict.describe().contains("25 of 30 domains"),
            "{}",
            verdict.describe()
        );
    }
}
