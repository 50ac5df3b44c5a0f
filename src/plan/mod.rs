//! `plan`: compares the new rendering with what a target holds (its files, and the state it was
//! last applied from) and says what changes, whether HAProxy's runtime API can apply it or a
//! reload is needed and why, and what the files will look like. Pure: targets read the files.

pub mod diff;
pub mod json;
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
    pub reload_required: bool,
    /// Fingerprint of the live files the plan was made against.
    pub live_fingerprint: String,
    /// Every file to write (manifest included), and how they name each other.
    pub new_files: Files,
    pub options: RenderOptions,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.files.is_empty()
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
    plan_with_slots(
        target,
        model,
        rendered.file_map(),
        &rendered.options,
        live,
        &rendered.slots,
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
    let slots = new_files
        .get(&options.config_name)
        .map(|c| readback::slot_pools(&String::from_utf8_lossy(c)))
        .unwrap_or_default();
    plan_with_slots(target, model, new_files, options, live, &slots)
}

/// `slots_after`: the app slots of `new_files`' configuration.
fn plan_with_slots(
    target: &str,
    model: &Model,
    new_files: Files,
    options: &RenderOptions,
    live: &Live,
    slots_after: &SlotPools,
) -> Plan {
    let empty = empty_model();
    let previous = live.previous.as_deref().unwrap_or(&empty);
    let model = &*model.with_binds(&options.binds);
    let slots = diff::Slots {
        before: &live.slot_pools(&options.config_name),
        after: slots_after,
    };
    let mut changes = diff::diff_models(previous, model, &slots);

    let files = file_changes(&new_files, live);

    // What the target holds but the last apply did not write: drift, or a foreign config.
    changes.extend(drift_changes(&options.config_name, live));

    let blocker = runtime_blocker(live, &new_files, &options.config_name);
    let reload_required = blocker.is_some();
    if let Some(reason) = blocker
        && !changes.iter().any(|c| c.mode == Mode::Reload)
    {
        // The configuration text changed with no change of the state that explains it: a new
        // lunafront version, or files rendered earlier (a rollback).
        changes.push(Change {
            action: Action::Update,
            kind: Kind::Global,
            name: options.config_name.clone(),
            detail: ": the generated configuration changed".into(),
            mode: Mode::Reload,
            reason,
        });
    }
    Plan {
        target: target.to_string(),
        changes,
        files,
        reload_required,
        live_fingerprint: live.fingerprint(),
        new_files,
        options: options.clone(),
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
        mode,
        reason: match mode {
            Mode::Reload => "drift in the configuration file is corrected with a reload".into(),
            Mode::Runtime => {
                "drift in maps and certificates is corrected through the runtime API".into()
            }
        },
    }
}

/// The ground truth of reload versus runtime: why the target cannot get `new_files` through
/// the runtime API, if it cannot. A reload is needed when the configuration on the target
/// differs from the new one in anything but what the runtime API changes (server address,
/// port, weight, state; servers added or removed; map and certificate contents), or when a
/// change at runtime could not be made safely (`readback::runtime_blocker`).
fn runtime_blocker(live: &Live, new_files: &Files, config_name: &str) -> Option<String> {
    let (Some(config), Some(new_config)) = (live.config(config_name), new_files.get(config_name))
    else {
        return Some("there is no running configuration to change".into());
    };
    readback::runtime_blocker(
        &String::from_utf8_lossy(config),
        &String::from_utf8_lossy(new_config),
    )
}
