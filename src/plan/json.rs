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
}

#[derive(Serialize)]
struct JsonFile<'a> {
    path: &'a str,
    action: &'static str,
}

pub fn render(plan: &Plan) -> String {
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
    let doc = JsonPlan {
        format_version: "1",
        target: &plan.target,
        changes: &plan.changes,
        reload_required: plan.reload_required,
        files,
    };
    let mut text = serde_json::to_string_pretty(&doc).expect("plan serializes");
    text.push('\n');
    text
}
