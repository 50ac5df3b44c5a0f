//! `lunafront apply`: show the plan, ask (or take --auto-approve), apply it to the target, and
//! say how (runtime API or reload). Exit 0 applied or nothing to do, 1 error or refused,
//! 3 failed and rolled back, 4 failed and the rollback failed too.

use super::{exit, load_model, stdout_color};
use crate::cli::ColorChoice;
use lunafront::clock;
use lunafront::model::Target;
use lunafront::plan::{self, Plan, saved::SavedPlan, text};
use lunafront::render;
use lunafront::target::haproxy::{self, ApplyRequest, How};
use lunafront::target::{self, files};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

pub struct Options<'a> {
    pub state: &'a Path,
    pub target: Option<&'a str>,
    pub auto_approve: bool,
    pub saved: Option<&'a Path>,
    pub color: ColorChoice,
}

pub fn run(o: Options<'_>) -> ExitCode {
    let prepared = match o.saved {
        Some(path) => from_saved(path),
        None => from_state(o.state, o.target, o.color),
    };
    let (name, target, plan) = match prepared {
        Ok(p) => p,
        Err(code) => return code,
    };
    print!("{}", text::render(&plan, stdout_color(o.color)));
    execute(
        &name,
        &target,
        &plan,
        o.auto_approve,
        None,
        o.saved.is_some(),
    )
}

fn from_state(
    state: &Path,
    target: Option<&str>,
    color: ColorChoice,
) -> Result<(String, Target, Plan), ExitCode> {
    let (model, _) = load_model(state, color)?;
    let result = (|| -> anyhow::Result<(String, Target, Plan)> {
        let (name, target) = target::select(&model, target)?;
        let rendered = render::render(&model, &target::render_options(target))?;
        let live = target::observe(&name, target, &rendered)?;
        let plan = plan::make_plan(&name, &model, &rendered, &live);
        Ok((name, target.clone(), plan))
    })();
    result.map_err(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(exit::ERROR)
    })
}

fn from_saved(path: &Path) -> Result<(String, Target, Plan), ExitCode> {
    let fail = |message: String| {
        eprintln!("error: {}: {message}", path.display());
        ExitCode::from(exit::ERROR)
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let saved = SavedPlan::from_json(&text).map_err(fail)?;
    let new_files = saved.files().map_err(fail)?;
    let plan = Plan {
        target: saved.target_name.clone(),
        changes: saved.changes.clone(),
        files: Vec::new(),
        reload_required: saved.reload_required,
        live_fingerprint: saved.live_fingerprint.clone(),
        new_files,
        options: saved.options.clone(),
    };
    println!(
        "Saved plan made {} for target {}.",
        saved.created, saved.target_name
    );
    Ok((saved.target_name, saved.target, plan))
}

/// Asks for confirmation and applies. `rollback_of` marks a rollback in the history.
pub fn execute(
    name: &str,
    target: &Target,
    plan: &Plan,
    auto_approve: bool,
    rollback_of: Option<u64>,
    saved: bool,
) -> ExitCode {
    let Target::Haproxy(t) = target else {
        eprintln!(
            "error: target {name}: the dataplane target type is not available in this build yet"
        );
        return ExitCode::from(exit::ERROR);
    };
    // A spawned HAProxy that is not running must be started even when the files match.
    let must_start = t.spawn && haproxy::process::running(t).is_none();
    if plan.is_empty() && !must_start {
        return ExitCode::from(exit::OK);
    }
    if !auto_approve && !confirm(name) {
        return ExitCode::from(exit::ERROR);
    }
    let request = ApplyRequest {
        target_name: name.to_string(),
        files: plan.new_files.clone(),
        options: plan.options.clone(),
        expected_fingerprint: Some(plan.live_fingerprint.clone()),
        changes: plan.changes.iter().map(|c| c.summary()).collect(),
        rollback_of,
    };
    match haproxy::apply(t, &request) {
        Ok(applied) => {
            for note in &applied.notes {
                println!("note: {note}");
            }
            let record = applied
                .seq
                .map(|s| format!(" (history entry {s})"))
                .unwrap_or_default();
            match applied.how {
                How::Unchanged => println!("Nothing to change on target {name}."),
                How::Runtime { commands } => println!(
                    "Applied to target {name} through the runtime API: {commands} command(s), no reload{record}."
                ),
                How::Reloaded { worker } => println!(
                    "Applied to target {name}: HAProxy reloaded, new worker {worker}{record}."
                ),
                How::Started { worker } => {
                    println!("Applied to target {name}: HAProxy started, worker {worker}{record}.")
                }
            }
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            if saved && matches!(e, haproxy::ApplyError::Stale { .. }) {
                eprintln!("error: {e}\n  the saved plan was refused; nothing was changed");
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn confirm(name: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "error: refusing to apply without confirmation: stdin is not a terminal; pass --auto-approve to apply non-interactively"
        );
        return false;
    }
    print!("\nApply these changes to target {name}? Only `yes` is accepted: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if answer.trim() == "yes" {
        true
    } else {
        eprintln!("Apply cancelled; nothing was changed.");
        false
    }
}

/// `plan --out FILE`: writes the plan with its files, readable by its owner only (it can hold
/// private keys).
pub fn save(path: &Path, plan: &Plan, target: &Target) -> Result<(), String> {
    let saved = SavedPlan::new(plan, target, clock::rfc3339_now());
    files::write_atomic(path, saved.to_json().as_bytes(), files::SECRET_MODE)
        .map_err(|e| e.to_string())
}
