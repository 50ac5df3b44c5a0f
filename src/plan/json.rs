//! `plan --json`: the machine-readable plan, `format_version` "1".

use super::Plan;
use super::diff::Change;
use serde::Serialize;

#[derive(Serialize)]
struct JsonPlan<'a> {
    format_version: &'static str,
    target: &'a str,
    changes: &'a [Change],
    reload_required: bool,
    files: Vec<JsonFile<'a>>,
    /// Set when the plan trips `global.delete_guard`.
    #[serde(skip_serializing_if = "Option::is_none")]
    mass_delete: Option<&'a super::MassDelete>,
}

#[derive(Serialize)]
struct JsonFile<'a> {
    path: &'a str,
    action: &'static str,
}

pub fn render(plan: &Plan) -> String {
    let mut text = serde_json::to_string_pretty(&document(plan)).expect("plan serializes");
    text.push('\n');
    text
}

/// Several targets' plans (`plan --target a --target b`, or a group): each target's plan, its
/// revision before, and whether it differs from the others.
#[derive(Serialize)]
struct TargetPlan<'a> {
    #[serde(flatten)]
    plan: JsonPlan<'a>,
    /// The revision the target holds now (see `target::fleet`).
    revision: Option<&'a str>,
    /// The target holds something else than most of the others.
    drift: bool,
}

/// One entry per target of a group plan.
pub struct GroupEntry<'a> {
    pub plan: &'a Plan,
    pub revision: Option<&'a str>,
    pub drift: bool,
}

pub fn render_group(entries: &[GroupEntry<'_>]) -> String {
    let targets: Vec<TargetPlan> = entries
        .iter()
        .map(|e| TargetPlan {
            plan: document(e.plan),
            revision: e.revision,
            drift: e.drift,
        })
        .collect();
    let doc = serde_json::json!({ "format_version": "1", "targets": targets });
    let mut text = serde_json::to_string_pretty(&doc).expect("plan serializes");
    text.push('\n');
    text
}

fn document(plan: &Plan) -> JsonPlan<'_> {
    let files = plan
        .files
        .iter()
        .map(|f| JsonFile {
            path: &f.path,
            action: match (&f.before, &f.after) {
                (None, _) => "create",
                (_, None) => "delete",
                _ => "update",
            },
        })
        .collect();
    JsonPlan {
        format_version: "1",
        target: &plan.target,
        changes: &plan.changes,
        reload_required: plan.reload_required,
        files,
        mass_delete: plan.mass_delete.as_ref(),
    }
}
