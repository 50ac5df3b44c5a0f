//! `lunafront plan`: what applying the state would change on a target, and how (runtime API or
//! reload). Exit 0, or with --detailed-exitcode 0 (no changes) / 2 (changes); 1 on error.

use super::{exit, load_model, stdout_color};
use crate::cli::ColorChoice;
use lunafront::model::Target;
use lunafront::plan::{self, json, text};
use lunafront::render;
use lunafront::target;
use std::path::Path;
use std::process::ExitCode;

pub fn run(
    state: &Path,
    target_name: Option<&str>,
    as_json: bool,
    detailed: bool,
    out: Option<&Path>,
    color: ColorChoice,
) -> ExitCode {
    let (model, _) = match load_model(state, color) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let result = (|| -> anyhow::Result<(plan::Plan, Target)> {
        let (name, target) = target::select(&model, target_name)?;
        let rendered = render::render(&model, &target::render_options(target))?;
        let live = target::observe(&name, target, &rendered)?;
        Ok((
            plan::make_plan(&name, &model, &rendered, &live),
            target.clone(),
        ))
    })();
    let (plan, target) = match result {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::ERROR);
        }
    };
    if as_json {
        print!("{}", json::render(&plan));
    } else {
        print!("{}", text::render(&plan, stdout_color(color)));
    }
    if let Some(path) = out {
        if let Err(e) = super::apply::save(path, &plan, &target) {
            eprintln!("error: cannot save the plan to {}: {e}", path.display());
            return ExitCode::from(exit::ERROR);
        }
        eprintln!(
            "Plan saved to {} (mode 0600: it holds the files to write); apply it with `lunafront apply --plan {}`.",
            path.display(),
            path.display()
        );
    }
    ExitCode::from(if detailed && !plan.is_empty() {
        exit::CHANGES
    } else {
        exit::OK
    })
}
