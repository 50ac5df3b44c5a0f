//! `lunafront plan`: what applying the state would change on a target, and how (runtime API or
//! reload). Exit 0, or with --detailed-exitcode 0 (no changes) / 2 (changes); 1 on error.

use super::{exit, load_model, stdout_color};
use crate::cli::ColorChoice;
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
    color: ColorChoice,
) -> ExitCode {
    let (model, _) = match load_model(state, color) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let result = (|| -> anyhow::Result<plan::Plan> {
        let (name, target) = target::select(&model, target_name)?;
        let rendered = render::render(&model, &target::render_options(target))?;
        let live = target::observe(&name, target, &rendered)?;
        Ok(plan::make_plan(&name, &model, &rendered, &live))
    })();
    let plan = match result {
        Ok(plan) => plan,
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
    ExitCode::from(if detailed && !plan.is_empty() {
        exit::CHANGES
    } else {
        exit::OK
    })
}
