//! `plan` for people: the semantic summary first, then a unified diff of every file, coloured on a
//! terminal. Private keys are never shown.

use super::diff::{Action, Mode};
use super::ops::Execution;
use super::{FileChange, Plan};
use similar::{ChangeTag, TextDiff};
use std::fmt::Write;

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";
/// Runtime operations listed in the text view (the JSON view has them all).
const SHOWN_OPS: usize = 10;

struct Paint {
    color: bool,
}

impl Paint {
    fn paint(&self, style: &str, text: &str) -> String {
        if self.color {
            format!("{style}{text}{RESET}")
        } else {
            text.to_string()
        }
    }
}

pub fn render(plan: &Plan, color: bool) -> String {
    let p = Paint { color };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        p.paint(BOLD, &format!("Target {}:", plan.target))
    );
    if plan.is_empty() {
        out.push_str("\nNo changes: the target matches the desired state.\n");
        return out;
    }
    out.push('\n');
    let width = plan
        .changes
        .iter()
        .map(|c| c.summary().chars().count())
        .max()
        .unwrap_or(0)
        .min(72);
    for change in &plan.changes {
        let style = match change.action {
            Action::Create => GREEN,
            Action::Update => YELLOW,
            Action::Delete => RED,
        };
        let summary = change.summary();
        let pad = width.saturating_sub(summary.chars().count());
        let mode = match change.mode {
            Mode::Runtime => p.paint(DIM, "runtime"),
            Mode::Reload => p.paint(BOLD, "reload"),
        };
        // Raw `extra:` lines are marked `!`: lunafront does not know what they do.
        let mark = if change.raw {
            p.paint(BOLD, "!")
        } else {
            " ".to_string()
        };
        let _ = writeln!(
            out,
            "{mark} {}{}  {mode}: {}",
            p.paint(style, &summary),
            " ".repeat(pad),
            change.reason
        );
    }
    let count = |a: Action| plan.changes.iter().filter(|c| c.action == a).count();
    let _ = writeln!(
        out,
        "\nPlan: {} to create, {} to update, {} to delete.",
        count(Action::Create),
        count(Action::Update),
        count(Action::Delete)
    );
    match &plan.execution {
        Execution::Reload { .. } => {
            let _ = writeln!(
                out,
                "A reload is needed: {}.",
                plan.reload_reasons().join("; ")
            );
        }
        Execution::Runtime { ops } => {
            out.push_str("No reload: every change goes through HAProxy's runtime API.\n");
            // The operations the target runs, the first few of them.
            for op in ops.iter().take(SHOWN_OPS) {
                let _ = writeln!(out, "  {}", p.paint(DIM, &op.describe()));
            }
            if ops.len() > SHOWN_OPS {
                let _ = writeln!(out, "  … {} more operation(s)", ops.len() - SHOWN_OPS);
            }
        }
    }
    let raw: Vec<String> = plan
        .changes
        .iter()
        .filter(|c| c.raw)
        .map(|c| format!("{} {}", c.kind.as_str(), c.name))
        .collect();
    if !raw.is_empty() {
        let _ = writeln!(
            out,
            "{}",
            p.paint(
                BOLD,
                &format!(
                    "! Raw HAProxy lines (`extra:`) change in {}: lunafront passes them through unchecked (haproxy -c checks the syntax); review them in the diff below.",
                    raw.join(", ")
                )
            )
        );
    }
    if let Some(mass) = &plan.mass_delete {
        let _ = writeln!(
            out,
            "{}",
            p.paint(
                RED,
                &format!(
                    "Guarded: {}. `apply` needs --allow-deletes; the daemon holds it until the state stays the same or it is approved.",
                    mass.describe()
                )
            )
        );
    }
    for file in &plan.files {
        out.push('\n');
        file_diff(&mut out, file, &p);
    }
    out
}

fn file_diff(out: &mut String, file: &FileChange, p: &Paint) {
    let (a, b) = match (&file.before, &file.after) {
        (Some(_), Some(_)) => (format!("a/{}", file.path), format!("b/{}", file.path)),
        (None, _) => ("/dev/null".to_string(), format!("b/{} (new)", file.path)),
        (_, None) => (
            format!("a/{} (removed)", file.path),
            "/dev/null".to_string(),
        ),
    };
    let _ = writeln!(out, "{}", p.paint(BOLD, &format!("--- {a}")));
    let _ = writeln!(out, "{}", p.paint(BOLD, &format!("+++ {b}")));
    if file.secret {
        let what = match (&file.before, &file.after) {
            (None, _) => "new",
            (_, None) => "removed",
            _ => "changed",
        };
        let _ = writeln!(
            out,
            "{}",
            p.paint(
                DIM,
                &format!("(private key material {what}; content not shown)")
            )
        );
        return;
    }
    let before = String::from_utf8_lossy(file.before.as_deref().unwrap_or_default()).into_owned();
    let after = String::from_utf8_lossy(file.after.as_deref().unwrap_or_default()).into_owned();
    let diff = TextDiff::from_lines(&before, &after);
    for hunk in diff.unified_diff().context_radius(3).iter_hunks() {
        let _ = writeln!(out, "{}", p.paint(CYAN, &hunk.header().to_string()));
        for change in hunk.iter_changes() {
            let (sign, style) = match change.tag() {
                ChangeTag::Delete => ('-', RED),
                ChangeTag::Insert => ('+', GREEN),
                ChangeTag::Equal => (' ', ""),
            };
            let line = format!("{sign}{}", change.value().trim_end_matches('\n'));
            if style.is_empty() {
                let _ = writeln!(out, "{line}");
            } else {
                let _ = writeln!(out, "{}", p.paint(style, &line));
            }
        }
    }
}
