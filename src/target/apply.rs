//! What applying to any target takes and gives: the request (files to write and what they are),
//! how it went (runtime, reload, start), and the errors with their exit codes.

use crate::render::RenderOptions;
use crate::target::files::Files;
use std::path::PathBuf;

/// What to apply: every file of the new rendering (manifest included), and what it is.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub target_name: String,
    pub files: Files,
    pub options: RenderOptions,
    /// What the plan decided: the runtime operations to run, or a reload. The target executes
    /// it (map operations re-based on what HAProxy holds when they run).
    pub execution: crate::plan::ops::Execution,
    /// Refuse unless the target still holds what the plan was made against.
    pub expected_fingerprint: Option<String>,
    /// The plan's change summaries, for the history.
    pub changes: Vec<String>,
    pub rollback_of: Option<u64>,
    /// When someone else changes the target meanwhile (a 409 from a Data Plane API): re-read
    /// and retry (a fresh plan), or refuse as stale (a saved plan, reviewed against what was).
    pub retry_conflicts: bool,
    /// The git commit the state was read at, when it is a git checkout (recorded with it).
    pub git_commit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// The target already held these files.
    Unchanged,
    /// Applied through the runtime API with this many commands; no reload.
    Runtime {
        commands: usize,
    },
    Reloaded {
        worker: u32,
    },
    /// HAProxy was not running (`spawn: true`) and was started on the new files.
    Started {
        worker: u32,
    },
    /// A Data Plane API pushed the configuration and reloaded HAProxy.
    RemoteReload {
        reload_id: Option<String>,
    },
}

impl How {
    pub fn label(&self) -> &'static str {
        match self {
            How::Unchanged => "unchanged",
            How::Runtime { .. } => "runtime",
            How::Reloaded { .. } => "reload",
            How::Started { .. } => "start",
            How::RemoteReload { .. } => "reload",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub how: How,
    /// History entry recorded for this apply.
    pub seq: Option<u64>,
    /// Things worth telling: a runtime change that fell back to a reload, and why.
    pub notes: Vec<String>,
    /// Why this apply, live on the target, is missing from its records (the history could
    /// not be written): `rollback` cannot return to it. Reported as an error by the commands.
    pub unrecorded: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "target {target}: the plan is stale: the target changed since the plan was made; run `lunafront plan` again"
    )]
    Stale { target: String },
    #[error(
        "target {target}: HAProxy refused the new configuration (haproxy -c); nothing was changed:\n{detail}"
    )]
    Refused { target: String, detail: String },
    #[error(
        "target {target}: HAProxy is not running ({detail}); start it (systemctl start haproxy), or set `spawn: true` to let lunafront run it"
    )]
    NotRunning { target: String, detail: String },
    #[error(
        "target {target}: {detail}; nothing was changed (a second HAProxy is never started beside it: if it is stopped or overloaded, try again once it answers)"
    )]
    Unresponsive { target: String, detail: String },
    #[error("target {target}: interrupted before anything was changed")]
    Interrupted { target: String },
    #[error("target {target}: another apply is in progress (lock {lock})")]
    Busy { target: String, lock: PathBuf },
    #[error("target {target}: {detail}; nothing was changed")]
    Prepare { target: String, detail: String },
    #[error(
        "target {target}: the apply failed ({reason}); the previous configuration was put back and HAProxy runs it again"
    )]
    RolledBack { target: String, reason: String },
    #[error(
        "target {target}: the apply failed ({reason}) and putting the previous configuration back failed too ({rollback}); HAProxy needs attention"
    )]
    RollbackFailed {
        target: String,
        reason: String,
        rollback: String,
    },
}

impl ApplyError {
    /// The documented exit code: 3 rolled back, 4 rollback failed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ApplyError::RolledBack { .. } => 3,
            ApplyError::RollbackFailed { .. } => 4,
            _ => 1,
        }
    }
}
