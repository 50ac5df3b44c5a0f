//! `lunafront history` and `lunafront rollback`: the applied states a target keeps, and putting
//! one back through the normal apply path (plan, confirmation, runtime or reload, rollback on
//! failure).

use super::{exit, stdout_color};
use crate::cli::ColorChoice;
use lunafront::model::{Model, Target, validate};
use lunafront::plan::text;
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
    let validation = lunafront::model::validate_targets(&source);
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

pub fn list(state: &Path, target: Option<&str>, json: bool) -> ExitCode {
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
    if json {
        let newest_first: Vec<_> = entries.iter().rev().collect();
        let doc = serde_json::json!({
            "format_version": "1",
            "target": name,
            "entries": newest_first,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("history serializes")
        );
        return ExitCode::from(exit::OK);
    }
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
    json: bool,
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
    // Steps count from the state the target holds, found by its manifest: the newest entry
    // normally, none when its last apply could not be recorded (then one step back is the
    // newest entry, the state that was live before it).
    let options = target::render_options(&target);
    let live_manifest = target::observe_paths(&name, &target, &options, [MANIFEST.to_string()])
        .ok()
        .and_then(|live| live.files.get(MANIFEST).cloned());
    let live_index = live_manifest.as_ref().and_then(|live| {
        entries
            .iter()
            .rposition(|e| history.file(e.seq, MANIFEST).ok().as_ref() == Some(live))
    });
    if live_manifest.is_some() && live_index.is_none() && !entries.is_empty() {
        println!(
            "Target {name} holds a state its history does not record (its last apply could not be recorded): counting from there."
        );
    }
    let base = live_index.unwrap_or(entries.len());
    let Some(index) = base.checked_sub(steps as usize) else {
        eprintln!(
            "error: target {name} has {} recorded state(s) before the one it holds: cannot go back {steps} step(s)",
            base
        );
        return ExitCode::from(exit::ERROR);
    };
    let entry = &entries[index];
    let result = (|| -> anyhow::Result<lunafront::pipeline::Prepared> {
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
        Ok(lunafront::pipeline::prepare_files(
            &model, &name, &target, files,
        )?)
    })();
    let mut prepared = match result {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::ERROR);
        }
    };
    prepared.git_commit = entry.git_commit.clone();
    let plan = &prepared.plan;
    let plan_value = lunafront::plan::json::value(plan);
    let target_name = name.clone();
    let to_json = |result: serde_json::Value| {
        let mut doc = serde_json::json!({
            "format_version": "1",
            "target": target_name,
            "rollback_to": entry.seq,
            "plan": plan_value.clone(),
        });
        doc.as_object_mut()
            .expect("object")
            .extend(result.as_object().cloned().unwrap_or_default());
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("rollback serializes")
        );
    };
    if !json {
        println!(
            "Rolling target {name} back to entry {} (applied {}).",
            entry.seq, entry.time
        );
        print!("{}", text::render(plan, stdout_color(color)));
    }
    if plan.is_empty() {
        if json {
            to_json(serde_json::json!({ "result": "unchanged" }));
        } else {
            println!(
                "Target {name} already holds entry {}; nothing to do.",
                entry.seq
            );
        }
        return ExitCode::from(exit::OK);
    }
    if !auto_approve && !super::apply::confirm(&[&name], json) {
        if json {
            to_json(serde_json::json!({ "result": "cancelled" }));
        }
        return ExitCode::from(exit::ERROR);
    }
    super::apply::finish_before_exiting();
    let result = super::apply::apply_one(&prepared, Some(entry.seq), false);
    if json {
        to_json(super::apply::result_value(&result));
    }
    let code = match result {
        Ok(applied) => {
            if !json {
                super::apply::report_applied(&prepared.name, &applied);
            }
            ExitCode::from(super::apply::applied_code(&prepared.name, &applied))
        }
        Err(e) => super::apply::fail(&e, false),
    };
    super::apply::report_interrupt();
    code
}
