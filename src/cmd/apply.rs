//! `lunafront apply`: show the plan, ask (or take --auto-approve), apply it, and say how
//! (runtime API or reload). With several targets (or a group), the first is the canary: applied
//! and checked first, then the rest (`--parallel N` at a time), stopping at the first failure.
//! Exit 0 applied or nothing to do, 1 error or refused, 3 failed and rolled back, 4 failed and
//! the rollback failed too.

use super::{exit, load_model, stdout_color};
use crate::cli::ColorChoice;
use lunafront::clock;
use lunafront::model::Target;
use lunafront::plan::{self, Plan, saved::SavedPlan, text};
use lunafront::render;
use lunafront::target::haproxy;
use lunafront::target::{self, Applied, ApplyError, ApplyRequest, How, files, fleet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

pub struct Options<'a> {
    pub state: &'a Path,
    pub targets: &'a [String],
    pub auto_approve: bool,
    pub saved: Option<&'a Path>,
    pub parallel: usize,
    pub color: ColorChoice,
}

/// One target's part of an apply.
pub struct Prepared {
    pub name: String,
    pub target: Target,
    pub plan: Plan,
    /// The revision the target holds before the apply.
    pub before: Option<String>,
    /// Domains whose certificate `lunafront daemon` will request from the ACME CA.
    pub acme_requests: Vec<String>,
}

pub fn run(o: Options<'_>) -> ExitCode {
    let (prepared, revision) = match o.saved {
        Some(path) => match from_saved(path) {
            Ok(p) => (vec![p], None),
            Err(code) => return code,
        },
        None => match from_state(o.state, o.targets, o.color) {
            Ok(p) => p,
            Err(code) => return code,
        },
    };
    for p in &prepared {
        print!("{}", text::render(&p.plan, stdout_color(o.color)));
    }
    let pending: Vec<&Prepared> = prepared
        .iter()
        .filter(|p| !p.plan.is_empty() || must_start(&p.target))
        .collect();
    if pending.is_empty() {
        return ExitCode::from(exit::OK);
    }
    let names: Vec<&str> = pending.iter().map(|p| p.name.as_str()).collect();
    if !o.auto_approve && !confirm(&names) {
        return ExitCode::from(exit::ERROR);
    }
    if prepared.len() == 1 {
        let p = &prepared[0];
        return match apply_one(p, None, o.saved.is_some()) {
            Ok(applied) => {
                report_applied(&p.name, &applied);
                ExitCode::from(exit::OK)
            }
            Err(e) => fail(&e, o.saved.is_some()),
        };
    }
    rollout(&prepared, revision.unwrap_or_default(), o.parallel.max(1))
}

/// A spawned HAProxy that is not running must be started even when the files match.
fn must_start(target: &Target) -> bool {
    matches!(target, Target::Haproxy(t) if t.spawn && haproxy::process::running(t).is_none())
}

fn from_state(
    state: &Path,
    names: &[String],
    color: ColorChoice,
) -> Result<(Vec<Prepared>, Option<String>), ExitCode> {
    let (model, _) = load_model(state, color)?;
    let result = (|| -> anyhow::Result<Vec<Prepared>> {
        let mut out = Vec::new();
        for (name, target) in fleet::resolve(&model, names)? {
            out.push(prepare(&model, &name, target)?);
        }
        Ok(out)
    })();
    match result {
        Ok(p) => Ok((p, Some(fleet::revision_of(model.document_text().json())))),
        Err(e) => {
            eprintln!("error: {e:#}; nothing was changed");
            Err(ExitCode::from(exit::ERROR))
        }
    }
}

/// Renders for the target, reads what it holds, and plans.
pub fn prepare(
    model: &lunafront::model::Model,
    name: &str,
    target: &Target,
) -> anyhow::Result<Prepared> {
    let model = lunafront::acme::for_target(model, target)
        .map_err(|e| anyhow::anyhow!("target {name}: {e}"))?;
    let rendered = render::render(&model, &target::render_options(target))?;
    let live = target::observe(name, target, &rendered)?;
    Ok(Prepared {
        name: name.to_string(),
        target: target.clone(),
        before: fleet::live_revision(&live),
        plan: plan::make_plan(name, &model, &rendered, &live),
        acme_requests: lunafront::acme::requests(&model),
    })
}

fn from_saved(path: &Path) -> Result<Prepared, ExitCode> {
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
    Ok(Prepared {
        name: saved.target_name,
        target: saved.target,
        plan,
        before: None,
        acme_requests: Vec::new(),
    })
}

/// Applies one target's plan. `rollback_of` marks a rollback in the history.
pub fn apply_one(
    p: &Prepared,
    rollback_of: Option<u64>,
    saved: bool,
) -> Result<Applied, ApplyError> {
    let request = ApplyRequest {
        target_name: p.name.clone(),
        files: p.plan.new_files.clone(),
        options: p.plan.options.clone(),
        expected_fingerprint: Some(p.plan.live_fingerprint.clone()),
        changes: p.plan.changes.iter().map(|c| c.summary()).collect(),
        rollback_of,
        retry_conflicts: !saved,
    };
    target::apply(&p.target, &request)
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

pub fn confirm(targets: &[&str]) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "error: refusing to apply without confirmation: stdin is not a terminal; pass --auto-approve to apply non-interactively"
        );
        return false;
    }
    print!(
        "\nApply these changes to target(s) {}? Only `yes` is accepted: ",
        targets.join(", ")
    );
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

enum Outcome {
    Applied(Applied),
    Failed(ApplyError),
    /// The canary's health check failed after its apply.
    Unhealthy(String),
    NotStarted,
}

/// Canary first (applied, then its health URL must answer 2xx), then the rest `parallel` at
/// a time; the first failure stops the rollout. Ends with which target holds which revision.
fn rollout(prepared: &[Prepared], revision: String, parallel: usize) -> ExitCode {
    let mut outcomes: Vec<Outcome> = prepared.iter().map(|_| Outcome::NotStarted).collect();
    let canary = &prepared[0];
    println!(
        "\nRolling out revision {revision} to {} targets; canary: {}.",
        prepared.len(),
        canary.name
    );
    outcomes[0] = match apply_one(canary, None, false) {
        Ok(applied) => {
            report_applied(&canary.name, &applied);
            match &canary.target.fleet().health_check {
                Some(check) => match fleet::check_health(check) {
                    Ok(()) => {
                        println!(
                            "Canary {} answers its health check ({}).",
                            canary.name, check.url
                        );
                        Outcome::Applied(applied)
                    }
                    Err(e) => Outcome::Unhealthy(e),
                },
                None => Outcome::Applied(applied),
            }
        }
        Err(e) => Outcome::Failed(e),
    };
    let mut stopped = !matches!(outcomes[0], Outcome::Applied(_));
    let rest: Vec<usize> = (1..prepared.len()).collect();
    for chunk in rest.chunks(parallel) {
        if stopped {
            break;
        }
        let results: Vec<(usize, Result<Applied, ApplyError>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| (i, scope.spawn(move || apply_one(&prepared[i], None, false))))
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| (i, h.join().expect("apply thread")))
                .collect()
        });
        for (i, result) in results {
            outcomes[i] = match result {
                Ok(applied) => {
                    report_applied(&prepared[i].name, &applied);
                    Outcome::Applied(applied)
                }
                Err(e) => {
                    stopped = true;
                    Outcome::Failed(e)
                }
            };
        }
    }

    println!("\n{:<16} {:<14} revision", "target", "result");
    let mut code = exit::OK;
    for (p, outcome) in prepared.iter().zip(&outcomes) {
        let before = p.before.clone().unwrap_or_else(|| "none".into());
        let (result, held) = match outcome {
            Outcome::Applied(a) => (a.how.label().to_string(), revision.clone()),
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
