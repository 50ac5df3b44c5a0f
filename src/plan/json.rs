//! `plan --json`: the machine-readable plan, `format_version` "1". Each change carries the
//! values it changes (`before`, `after`) rather than the text view's punctuation; a change
//! with no values (drift, a new lunafront version) says what it is in `note`.

use super::Plan;
use super::diff::{Action, Change, Kind, Mode};
use serde::Serialize;

#[derive(Serialize)]
struct JsonChange<'a> {
    action: Action,
    kind: Kind,
    name: &'a str,
    before: Option<&'a serde_json::Value>,
    after: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    mode: Mode,
    reason: &'a str,
    /// A change of raw HAProxy lines (`extra:`), passed through unchecked.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    raw: bool,
}

impl<'a> JsonChange<'a> {
    fn new(c: &'a Change) -> JsonChange<'a> {
        let valued = c.before.is_some() || c.after.is_some();
        JsonChange {
            action: c.action,
            kind: c.kind,
            name: &c.name,
            before: c.before.as_ref(),
            after: c.after.as_ref(),
            note: (!valued && !c.detail.is_empty())
                .then(|| c.detail.trim_start_matches([':', ' ', '→'])),
            mode: c.mode,
            reason: &c.reason,
            raw: c.raw,
        }
    }
}

#[derive(Serialize)]
struct JsonPlan<'a> {
    format_version: &'static str,
    target: &'a str,
    changes: Vec<JsonChange<'a>>,
    reload_required: bool,
    /// How it goes live: `{"how": "runtime", "operations": [...]}` or `{"how": "reload",
    /// "reasons": [...]}` — what the target executes.
    execution: serde_json::Value,
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

/// The plan as a JSON value (for documents that embed it: `apply --json`, `rollback --json`).
pub fn value(plan: &Plan) -> serde_json::Value {
    serde_json::to_value(document(plan)).expect("plan serializes")
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
        changes: plan.changes.iter().map(JsonChange::new).collect(),
        reload_required: plan.reload_required(),
        execution: execution(&plan.execution),
        files,
        mass_delete: plan.mass_delete.as_ref(),
    }
}

/// The execution as the document shows it: every operation with its fields, except certificate
/// contents (their SHA-256 instead) and a whole map's entries (their count).
fn execution(execution: &super::ops::Execution) -> serde_json::Value {
    use super::ops::{Execution, Op};
    match execution {
        Execution::Reload { reasons } => serde_json::json!({ "how": "reload", "reasons": reasons }),
        Execution::Runtime { ops } => {
            let operations: Vec<serde_json::Value> = ops
                .iter()
                .map(|op| {
                    let mut v = serde_json::to_value(op).expect("operations serialize");
                    match op {
                        Op::CertNew { pem, .. } | Op::CertUpdate { pem, .. } => {
                            if let Some(o) = v.as_object_mut() {
                                o.remove("pem");
                                o.insert("pem_sha256".into(), super::sha256_hex(pem).into());
                            }
                        }
                        Op::MapReplace { entries, .. } => v["entries"] = entries.len().into(),
                        _ => {}
                    }
                    v
                })
                .collect();
            serde_json::json!({ "how": "runtime", "operations": operations })
        }
    }
}
