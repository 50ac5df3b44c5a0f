//! `lunafront history` and `lunafront rollback`: the applied states a target keeps, and putting
//! one back through the normal apply path (plan, confirmation, runtime or reload, rollback on
//! failure).

use super::{exit, stdout_color};
use crate::cli::ColorChoice;
use lunafront::model::{Model, Target, validate};
use lunafront::plan::{self, text};
use lunafront::render::MANIFEST;
use lunafront::spec::load::{self, Source};
use lunafront::target::{self, history::History};
use std::path::Path;
use std::process::ExitCode;

/// The targets of the state, even when other sections do not validate: a broken state must
/// not prevent a rollback.
fn targets(state: &Path) -> Result<Model, ExitCode> {
    let source = load::load_path(state).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(exit::ERROR)
    })?;
    let validation = validate(&source.only(&["targets"]));
    validation.model.ok_or_else(|| {
        super::print_diagnostics(&validation.diagnostics, false);
        ExitCode::from(exit::ERROR)
    })
}

fn select(model: &Model, name: Option<&str>) -> Result<(String, Target), ExitCode> {
    target::select(model, name)
        .map(|(name, t)| (name, t.clone()))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(exit::ERROR)
        })
}

pub fn list(state: &Path, target: Option<&str>) -> ExitCode {
    let (name, target) = match targets(state).and_then(|m| select(&m, target)) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let entries = match History::new(target::state_dir(&target)).list() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    if entries.is_empty() {
        println!("No applied states recorded for target {name} yet.");
        return ExitCode::from(exit::OK);
    }
    println!(
        "{:>6}  {:<20}  {:<9}  changes",
        "entry", "time (UTC)", "applied"
    );
    for e in entries.iter().rev() {
        let mut summary = if e.changes.is_empty() {
            "(no change)".to_string()
        } else {
            let shown: Vec<&str> = e.changes.iter().take(3).map(String::as_str).collect();
            let more = e.changes.len().saturating_sub(3);
            format!(
                "{}{}",
                shown.join("; "),
                if more > 0 {
                    format!("; … {more} more")
                } else {
                    String::new()
                }
            )
        };
        if let Some(of) = e.rollback_of {
            summary = format!("rollback to entry {of}: {summary}");
        }
        println!("{:>6}  {:<20}  {:<9}  {summary}", e.seq, e.time, e.how);
    }
    ExitCode::from(exit::OK)
}

pub fn rollback(
    state: &Path,
    target: Option<&str>,
    steps: u64,
    auto_approve: bool,
    color: ColorChoice,
) -> ExitCode {
    let (name, target) = match targets(state).and_then(|m| select(&m, target)) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let history = History::new(target::state_dir(&target));
    let entries = match history.list() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let Some(index) = entries.len().checked_sub(1 + steps as usize) else {
        eprintln!(
            "error: target {name} has {} recorded state(s): cannot go back {steps} step(s)",
            entries.len()
        );
        return ExitCode::from(exit::ERROR);
    };
    let entry = &entries[index];
    let result = (|| -> anyhow::Result<plan::Plan> {
        let files = history.files(entry.seq)?;
        let manifest = files
            .get(MANIFEST)
            .ok_or_else(|| anyhow::anyhow!("entry {} has no {MANIFEST}", entry.seq))?;
        let (source, _) =
            Source::from_manifest(&String::from_utf8_lossy(manifest), Path::new(MANIFEST))
                .map_err(anyhow::Error::msg)?;
        let model = validate(&source)
            .model
            .ok_or_else(|| anyhow::anyhow!("entry {} no longer validates", entry.seq))?;
        let options = target::render_options(&target);
        let live = target::observe_paths(&name, &target, &options, &files)?;
        Ok(plan::plan_files(&name, &model, files, &options, &live))
    })();
    let plan = match result {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::ERROR);
        }
    };
    println!(
        "Rolling target {name} back to entry {} (applied {}).",
        entry.seq, entry.time
    );
    print!("{}", text::render(&plan, stdout_color(color)));
    if plan.is_empty() {
        println!(
            "Target {name} already holds entry {}; nothing to do.",
            entry.seq
        );
        return ExitCode::from(exit::OK);
    }
    if !auto_approve && !super::apply::confirm(&[&name]) {
        return ExitCode::from(exit::ERROR);
    }
    let prepared = super::apply::Prepared {
        name,
        target,
        plan,
        before: None,
        acme_requests: Vec::new(),
    };
    match super::apply::apply_one(&prepared, Some(entry.seq), false) {
        Ok(applied) => {
            super::apply::report_applied(&prepared.name, &applied);
            ExitCode::from(exit::OK)
        }
        Err(e) => super::apply::fail(&e, false),
    }
}
