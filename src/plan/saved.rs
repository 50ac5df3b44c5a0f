//! Saved plans (`plan --out FILE`, `apply --plan FILE`): the plan, the exact files to write,
//! the target they are for, and a fingerprint of what the target held, so a plan is applied
//! exactly as reviewed, or refused when the target changed since.

use super::Plan;
use super::diff::Change;
use crate::model::Target;
use crate::render::RenderOptions;
use crate::target::files::Files;
use base64::Engine;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format_version: String,
    pub kind: String,
    /// RFC 3339 time the plan was made.
    pub created: String,
    pub target_name: String,
    pub target: Target,
    pub live_fingerprint: String,
    pub reload_required: bool,
    pub changes: Vec<Change>,
    pub options: RenderOptions,
    pub files: Vec<SavedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedFile {
    pub path: String,
    pub base64: String,
}

const KIND: &str = "lunafront-plan";

impl SavedPlan {
    pub fn new(plan: &Plan, target: &Target, created: String) -> SavedPlan {
        let engine = base64::engine::general_purpose::STANDARD;
        SavedPlan {
            format_version: "1".into(),
            kind: KIND.into(),
            created,
            target_name: plan.target.clone(),
            target: target.clone(),
            live_fingerprint: plan.live_fingerprint.clone(),
            reload_required: plan.reload_required,
            changes: plan.changes.clone(),
            options: plan.options.clone(),
            files: plan
                .new_files
                .iter()
                .map(|(path, bytes)| SavedFile {
                    path: path.clone(),
                    base64: engine.encode(bytes),
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plan serializes") + "\n"
    }

    pub fn from_json(text: &str) -> Result<SavedPlan, String> {
        let plan: SavedPlan =
            serde_json::from_str(text).map_err(|e| format!("not a lunafront plan: {e}"))?;
        if plan.kind != KIND || plan.format_version != "1" {
            return Err(format!(
                "not a lunafront plan of format 1 (kind {}, format {})",
                plan.kind, plan.format_version
            ));
        }
        for file in &plan.files {
            if file.path.starts_with('/') || file.path.split('/').any(|c| c == ".." || c.is_empty())
            {
                return Err(format!(
                    "the plan names a file outside the target's folder: {}",
                    file.path
                ));
            }
        }
        Ok(plan)
    }

    pub fn files(&self) -> Result<Files, String> {
        let engine = base64::engine::general_purpose::STANDARD;
        self.files
            .iter()
            .map(|f| {
                engine
                    .decode(&f.base64)
                    .map(|b| (f.path.clone(), b))
                    .map_err(|e| format!("{}: {e}", f.path))
            })
            .collect()
    }
}
