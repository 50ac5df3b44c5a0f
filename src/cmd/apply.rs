//! `lunafront apply`: show the plan, ask (or take --auto-approve), apply it, and say how
//! (runtime API or reload). With several targets (or a group), the first is the canary: applied
//! and checked first, then the rest (`--parallel N` at a time), stopping at the first failure.
//! Exit 0 applied or nothing to do, 1 error or refused, 3 failed and rolled back, 4 failed and
//! the rollback failed too.

use super::{exit, stdout_color};
use crate::cli::ColorChoice;
use lunafront::clock;
use lunafront::model::Target;
use lunafront::plan::{Plan, saved::SavedPlan, text};
use lunafront::target::fleet::{RollEvent, RollOutcome as Outcome};
use lunafront::target::{self, Applied, ApplyError, How, files, fleet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

pub struct Options<'a> {
    pub state: &'a Path,
    pub targets: &'a [String],
    pub auto_approve: bool,
    pub saved: Option<&'a Path>,
    pub parallel: usize,
    /// Apply a plan that removes more than `global.delete_guard` lets through.
    pub allow_deletes: bool,
    pub color: ColorChoice,
    /// One JSON document on stdout (the plans and each target's result) instead of text.
    pub json: bool,
}

pub use lunafront::target::fleet::{Prepared, apply_one, prepare};

pub fn run(o: Options<'_>) -> ExitCode {
    let (prepared, revision) = match o.saved {
        Some(path) => match from_saved(path) {
            Ok(p) => (vec![p], None),
            Err(code) => return code,
        },
        None => match from_state(o.state, o.targets, o.color, o.json) {
            Ok(p) => p,
            Err(code) => return code,
        },
    };
    if !o.json {
        for p in &prepared {
            print!("{}", text::render(&p.plan, stdout_color(o.color)));
        }
    }
    let pending: Vec<&Prepared> = prepared
        .iter()
        .filter(|p| !p.plan.is_empty() || fleet::must_start(&p.target))
        .collect();
    if pending.is_empty() {
        if o.json {
            let results: Vec<Outcome> = prepared
                .iter()
                .map(|_| Outcome::Applied(unchanged()))
                .collect();
            print_json(&prepared, &results, revision.as_deref());
        }
        return ExitCode::from(exit::OK);
    }
    let guarded: Vec<&&Prepared> = pending
        .iter()
        .filter(|p| p.plan.mass_delete.is_some())
        .collect();
    if !o.allow_deletes && !guarded.is_empty() {
        for p in guarded {
            let mass = p.plan.mass_delete.as_ref().expect("guarded");
            eprintln!(
                "error: target {}: {}; nothing was changed",
                p.name,
                mass.describe()
            );
        }
        eprintln!(
            "  a file cut short, emptied or half written looks like this: check the state; if the removal is intended, run again with --allow-deletes"
        );
        return ExitCode::from(exit::ERROR);
    }
    let names: Vec<&str> = pending.iter().map(|p| p.name.as_str()).collect();
    if !o.auto_approve && !confirm(&names, o.json) {
        if o.json {
            let results: Vec<Outcome> = prepared.iter().map(|_| Outcome::NotStarted).collect();
            print_json(&prepared, &results, revision.as_deref());
        }
        return ExitCode::from(exit::ERROR);
    }
    finish_before_exiting();
    let code = if prepared.len() == 1 {
        let p = &prepared[0];
        let result = apply_one(p, None, o.saved.is_some());
        if o.json {
            let outcome = match &result {
                Ok(applied) => Outcome::Applied(applied.clone()),
                Err(e) => Outcome::Failed(clone_error(e)),
            };
            print_json(&prepared, &[outcome], revision.as_deref());
        }
        match result {
            Ok(applied) => {
                if !o.json {
                    report_applied(&p.name, &applied);
                }
                ExitCode::from(applied_code(&p.name, &applied))
            }
            Err(e) => fail(&e, o.saved.is_some()),
        }
    } else {
        rollout(
            &prepared,
            revision.unwrap_or_default(),
            o.parallel.max(1),
            o.json,
        )
    };
    report_interrupt();
    code
}

fn unchanged() -> Applied {
    Applied {
        how: How::Unchanged,
        seq: None,
        notes: Vec::new(),
        unrecorded: None,
    }
}

/// The error as the JSON document reports it (ApplyError is not Clone: it is rebuilt as the
/// variant that keeps its message and exit code).
fn clone_error(e: &ApplyError) -> ApplyError {
    match e {
        ApplyError::RolledBack { target, reason } => ApplyError::RolledBack {
            target: target.clone(),
            reason: reason.clone(),
        },
        ApplyError::RollbackFailed {
            target,
            reason,
            rollback,
        } => ApplyError::RollbackFailed {
            target: target.clone(),
            reason: reason.clone(),
            rollback: rollback.clone(),
        },
        other => ApplyError::Prepare {
            target: String::new(),
            detail: other.to_string(),
        },
    }
}

/// One target's result, as `apply --json` and `rollback --json` report it.
pub fn result_value(result: &Result<Applied, ApplyError>) -> serde_json::Value {
    match result {
        Ok(applied) => applied_value(applied),
        Err(e) => error_value(e),
    }
}

fn applied_value(applied: &Applied) -> serde_json::Value {
    let mut v = serde_json::json!({
        "result": if applied.how == How::Unchanged { "unchanged" } else { "applied" },
        "how": applied.how.label(),
        "history_entry": applied.seq,
        "notes": applied.notes,
    });
    if let Some(why) = &applied.unrecorded {
        // Live, but not in the history: exit code 5, and the reason in the document too.
        v["unrecorded"] = why.clone().into();
        v["exit_code"] = 5.into();
    }
    match &applied.how {
        How::Runtime { commands } => v["commands"] = (*commands).into(),
        How::Reloaded { worker } | How::Started { worker } => v["worker"] = (*worker).into(),
        How::RemoteReload { reload_id } => v["reload_id"] = reload_id.clone().into(),
        How::Unchanged => {}
    }
    v
}

fn error_value(e: &ApplyError) -> serde_json::Value {
    let result = match e {
        ApplyError::RolledBack { .. } => "rolled_back",
        ApplyError::RollbackFailed { .. } => "rollback_failed",
        _ => "failed",
    };
    serde_json::json!({ "result": result, "error": e.to_string(), "exit_code": e.exit_code() })
}

/// `apply --json`: each target with its plan and what happened to it.
fn print_json(prepared: &[Prepared], outcomes: &[Outcome], revision: Option<&str>) {
    let targets: Vec<serde_json::Value> = prepared
        .iter()
        .zip(outcomes)
        .map(|(p, outcome)| {
            let mut v = match outcome {
                Outcome::Applied(a) => applied_value(a),
                Outcome::Failed(e) => error_value(e),
                Outcome::Unhealthy(e) => serde_json::json!({ "result": "unhealthy", "error": e }),
                Outcome::NotStarted => serde_json::json!({ "result": "not_applied" }),
            };
            v["target"] = p.name.clone().into();
            v["revision_before"] = p.before.clone().into();
            v["plan"] = lunafront::plan::json::value(&p.plan);
            v
        })
        .collect();
    let doc = serde_json::json!({
        "format_version": "1",
        "revision": revision,
        "targets": targets,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).expect("apply serializes")
    );
}

fn from_state(
    state: &Path,
    names: &[String],
    color: ColorChoice,
    json: bool,
) -> Result<(Vec<Prepared>, Option<String>), ExitCode> {
    let commit_before = git_commit_of(state);
    let (model, _) = super::load_model_for(state, color, json)?;
    // A checkout that moved while the state was read is no one commit.
    let git_commit = commit_before.filter(|c| git_commit_of(state).as_ref() == Some(c));
    let result = (|| -> anyhow::Result<Vec<Prepared>> {
        let mut out = Vec::new();
        for (name, target) in fleet::resolve(&model, names)? {
            let mut p = prepare(&model, &name, target)?;
            p.git_commit = git_commit.clone();
            out.push(p);
        }
        Ok(out)
    })();
    match result {
        Ok(p) => Ok((p, Some(fleet::revision_of(model.document_text().json())))),
        Err(e) => {
            if json {
                super::print_json_error(&format!("{e:#}; nothing was changed"));
            }
            eprintln!("error: {e:#}; nothing was changed");
            Err(ExitCode::from(exit::ERROR))
        }
    }
}

/// The commit checked out where the state is, when it is a git checkout.
pub fn git_commit_of(state: &Path) -> Option<String> {
    let dir = if state.is_dir() {
        state.to_path_buf()
    } else {
        state.parent()?.to_path_buf()
    };
    lunafront::daemon::reconcile::git_head(&dir)
}

fn from_saved(path: &Path) -> Result<Prepared, ExitCode> {
    let fail = |message: String| {
        eprintln!("error: {}: {message}", path.display());
        ExitCode::from(exit::ERROR)
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let saved = SavedPlan::from_json(&text).map_err(fail)?;
    let new_files = saved.files().map_err(fail)?;
    let execution = lunafront::pipeline::decide_saved(
        &saved.target_name,
        &saved.target,
        &saved.options,
        &new_files,
    )
    .map_err(|e| fail(e.to_string()))?;
    let plan = Plan {
        target: saved.target_name.clone(),
        changes: saved.changes.clone(),
        files: Vec::new(),
        execution,
        live_fingerprint: saved.live_fingerprint.clone(),
        new_files,
        options: saved.options.clone(),
        mass_delete: saved.mass_delete.clone(),
    };
    println!(
        "Saved plan made {} for target {}.",
        saved.created, saved.target_name
    );
    Ok(Prepared {
        name: saved.target_name,
        target: saved.target,
        plan,
        live: Default::default(),
        before: None,
        acme_requests: Vec::new(),
        git_commit: None,
    })
}

/// From here on, SIGINT, SIGTERM and SIGHUP (Ctrl-C, `kill`, a closed terminal) no longer
/// end the process in the middle of an apply: an apply stops at its point of no return with
/// nothing changed, or, past it, completes (see `target::interrupt`).
pub fn finish_before_exiting() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the action only stores to an atomic, which is async-signal-safe.
        let registered = unsafe { signal_hook_registry::register(signal, target::interrupt) };
        if let Err(e) = registered {
            eprintln!(
                "warning: cannot handle signal {signal}: {e}; an interrupt could stop an apply halfway"
            );
        }
    }
}

/// Says what an interrupt did, once the applies returned.
pub fn report_interrupt() {
    if target::interrupted() {
        eprintln!(
            "Interrupted: applies that had not started changing their target stopped with nothing changed; one under way was completed first."
        );
    }
}

/// The exit code of an apply that went through: 0, or `exit::UNRECORDED` when it could not
/// be recorded (said on stderr: the change is live, and `rollback` cannot return to it).
pub fn applied_code(name: &str, applied: &Applied) -> u8 {
    match &applied.unrecorded {
        Some(why) => {
            eprintln!(
                "error: target {name}: the change is live, but it could not be recorded: {why}; `lunafront rollback` cannot return to this state (exit code {})",
                exit::UNRECORDED
            );
            exit::UNRECORDED
        }
        None => exit::OK,
    }
}

pub fn report_applied(name: &str, applied: &Applied) {
    for note in &applied.notes {
        println!("note: {note}");
    }
    let record = applied
        .seq
        .map(|s| format!(" (history entry {s})"))
        .unwrap_or_default();
    match &applied.how {
        How::Unchanged => println!("Nothing to change on target {name}."),
        How::Runtime { commands } => println!(
            "Applied to target {name} through the runtime API: {commands} command(s), no reload{record}."
        ),
        How::Reloaded { worker } => {
            println!("Applied to target {name}: HAProxy reloaded, new worker {worker}{record}.")
        }
        How::Started { worker } => {
            println!("Applied to target {name}: HAProxy started, worker {worker}{record}.")
        }
        How::RemoteReload { reload_id } => println!(
            "Applied to target {name} through its Data Plane API: HAProxy reloaded (reload {}){record}.",
            reload_id.clone().unwrap_or_else(|| "done".into())
        ),
    }
}

pub fn fail(e: &ApplyError, saved: bool) -> ExitCode {
    if saved && matches!(e, ApplyError::Stale { .. }) {
        eprintln!("error: {e}\n  the saved plan was refused; nothing was changed");
    } else {
        eprintln!("error: {e}");
    }
    ExitCode::from(e.exit_code())
}

/// Asks on the terminal; with `json`, the question goes to stderr so stdout stays one
/// document.
pub fn confirm(targets: &[&str], json: bool) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "error: refusing to apply without confirmation: stdin is not a terminal; pass --auto-approve to apply non-interactively"
        );
        return false;
    }
    let question = format!(
        "\nApply these changes to target(s) {}? Only `yes` is accepted: ",
        targets.join(", ")
    );
    if json {
        eprint!("{question}");
        let _ = std::io::stderr().flush();
    } else {
        print!("{question}");
        let _ = std::io::stdout().flush();
    }
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if answer.trim() == "yes" {
        true
    } else {
        eprintln!("Apply cancelled; nothing was changed.");
        false
    }
}

/// Canary first (applied, then its health URL must answer 2xx), then the rest `parallel` at
/// a time; the first failure stops the rollout. Ends with which target holds which revision.
fn rollout(prepared: &[Prepared], revision: String, parallel: usize, json: bool) -> ExitCode {
    let canary = &prepared[0];
    if !json {
        println!(
            "\nRolling out revision {revision} to {} targets; canary: {}.",
            prepared.len(),
            canary.name
        );
    }
    let outcomes = fleet::roll_out(prepared, parallel, &|event| {
        if json {
            return;
        }
        match event {
            RollEvent::Applied(name, applied) => report_applied(name, applied),
            RollEvent::CanaryHealthy(name, url) => {
                println!("Canary {name} answers its health check ({url}).")
            }
        }
    });

    let code = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Unhealthy(_) => exit::ERROR,
            Outcome::Failed(e) => e.exit_code(),
            _ => exit::OK,
        })
        .max()
        .unwrap_or(exit::OK);
    if json {
        print_json(prepared, &outcomes, Some(&revision));
        return ExitCode::from(code);
    }
    println!("\n{:<16} {:<14} revision", "target", "result");
    let mut code = exit::OK;
    if target::interrupted() && outcomes.iter().any(|o| matches!(o, Outcome::NotStarted)) {
        eprintln!("error: interrupted: the rollout stopped before every target was applied");
        code = exit::ERROR;
    }
    for (p, outcome) in prepared.iter().zip(&outcomes) {
        let before = p.before.clone().unwrap_or_else(|| "none".into());
        let (result, held) = match outcome {
            Outcome::Applied(a) => {
                if applied_code(&p.name, a) != exit::OK && code == exit::OK {
                    code = exit::UNRECORDED;
                }
                (a.how.label().to_string(), revision.clone())
            }
            Outcome::Unhealthy(e) => {
                eprintln!("error: canary {}: {e}; the rollout stopped", p.name);
                code = code.max(exit::ERROR);
                ("unhealthy".into(), revision.clone())
            }
            Outcome::Failed(e) => {
                eprintln!("error: {e}");
                code = code.max(e.exit_code());
                let held = match e {
                    ApplyError::RollbackFailed { .. } => "unknown".to_string(),
                    _ => before,
                };
                ("failed".into(), held)
            }
            Outcome::NotStarted => ("not applied".into(), before),
        };
        println!("{:<16} {:<14} {held}", p.name, result);
    }
    if code != exit::OK {
        eprintln!(
            "The rollout stopped at the first failure; targets marked `not applied` were left as they were."
        );
    }
    ExitCode::from(code)
}

/// `plan --out FILE`: writes the plan with its files, readable by its owner only (it can hold
/// private keys).
pub fn save(path: &Path, plan: &Plan, target: &Target) -> Result<(), String> {
    let saved = SavedPlan::new(plan, target, clock::rfc3339_now());
    files::write_atomic(path, saved.to_json().as_bytes(), files::SECRET_MODE)
        .map_err(|e| e.to_string())
}
