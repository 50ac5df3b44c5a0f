//! What a local HAProxy is known to run (I/O edge): `<state_dir>/applied.json`, the digest of
//! the manifest whose files HAProxy was last verified to run (after a runtime change, a reload
//! or a start), and the apply under way, if any.
//!
//! The files and the manifest are written before HAProxy runs them (and runtime changes go
//! live before the files are swapped), so a process killed in between leaves files that say
//! one thing and an HAProxy that runs another. `pending` is written before anything goes
//! live and cleared only once HAProxy is verified: while it is set, `observe` reports the
//! apply as interrupted, and the next plan reloads HAProxy onto the files (which finishes the
//! apply, or completes its rollback).

use crate::model::HaproxyTarget;
use crate::render::MANIFEST;
use crate::target::files::{self, Files};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// SHA-256 of the manifest whose files HAProxy runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<String>,
    /// SHA-256 of the manifest of an apply that went (or was about to go) live and was not
    /// verified yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// The git commit of the state HAProxy runs, when it came from a git checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    /// RFC 3339 time of the last change of this record.
    #[serde(default)]
    pub at: String,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("applied.json")
}

/// The digest a marker names a set of files by: their manifest's.
pub fn digest(files: &Files) -> Option<String> {
    files.get(MANIFEST).map(|m| crate::plan::sha256_hex(m))
}

/// The marker, when there is one (a target applied by an older lunafront has none).
pub fn read(state_dir: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    // An unreadable marker is an apply of unknown outcome: say so rather than trust the files.
    Some(serde_json::from_str(&text).unwrap_or_else(|_| Marker {
        pending: Some("unreadable".into()),
        ..Marker::default()
    }))
}

fn write(state_dir: &Path, marker: &Marker) -> Result<(), files::FileError> {
    let mut marker = marker.clone();
    marker.at = crate::clock::rfc3339_now();
    let text = serde_json::to_string_pretty(&marker).expect("marker serializes") + "\n";
    // Written twice per apply: not synced (see `write_atomic_unsynced`; after a power cut
    // HAProxy starts on the files on disk, which is what a stale record then asks for).
    files::write_atomic_unsynced(&path(state_dir), text.as_bytes(), files::SECRET_MODE)
}

/// Why HAProxy is not known to run the files in `live` (their manifest `on_disk`), if so.
pub fn interrupted(target: &HaproxyTarget, on_disk: Option<&str>) -> Option<String> {
    let marker = read(&target.state_dir)?;
    if marker.pending.is_some() {
        return Some(
            "an apply was interrupted before HAProxy was verified to run it (killed, or it failed to roll back)".into(),
        );
    }
    match (marker.runs.as_deref(), on_disk) {
        (Some(runs), Some(disk)) if runs != disk => {
            Some("the files changed since HAProxy was last verified to run them".into())
        }
        _ => None,
    }
}

/// Before anything of an apply goes live: the apply of `new` is under way.
pub fn begin(target: &HaproxyTarget, new: &Files) -> Result<(), files::FileError> {
    let mut marker = read(&target.state_dir).unwrap_or_default();
    marker.pending = Some(digest(new).unwrap_or_default());
    write(&target.state_dir, &marker)
}

/// HAProxy was verified to run `files` (an apply, a rollback, a start on the files on disk).
pub fn runs(
    target: &HaproxyTarget,
    files: &Files,
    git_commit: Option<&str>,
) -> Result<(), files::FileError> {
    runs_with(target, digest(files), git_commit.map(str::to_string))
}

/// HAProxy was put back on `files` (a refused or failed apply): it runs them again, and the
/// git commit recorded with them is kept when they are the files it was recorded for.
pub fn back_to(target: &HaproxyTarget, files: &Files) {
    let previous = read(&target.state_dir).unwrap_or_default();
    let runs = digest(files);
    let git_commit = previous.git_commit.filter(|_| previous.runs == runs);
    if let Err(e) = runs_with(target, runs, git_commit) {
        tracing::warn!("cannot record what HAProxy runs: {e}");
    }
}

fn runs_with(
    target: &HaproxyTarget,
    runs: Option<String>,
    git_commit: Option<String>,
) -> Result<(), files::FileError> {
    write(
        &target.state_dir,
        &Marker {
            runs,
            pending: None,
            git_commit,
            at: String::new(),
        },
    )
}

/// HAProxy was started on the files on disk: it runs them. The git commit recorded with
/// them is kept when they are the files it was recorded for.
pub fn started_on_disk(target: &HaproxyTarget) {
    let dir = super::config_dir(target);
    if let Ok(on_disk) = files::read_files(dir, &[MANIFEST.to_string()].into()) {
        back_to(target, &on_disk);
    }
}

/// Records the git commit of the state HAProxy runs (a reconcile found nothing to change:
/// the commit checked out now describes what runs).
pub fn set_git_commit(target: &HaproxyTarget, git_commit: Option<&str>) {
    let Some(mut marker) = read(&target.state_dir) else {
        return;
    };
    if marker.pending.is_some() || marker.git_commit.as_deref() == git_commit {
        return;
    }
    marker.git_commit = git_commit.map(str::to_string);
    if let Err(e) = write(&target.state_dir, &marker) {
        tracing::warn!("cannot record the git commit HAProxy runs: {e}");
    }
}
