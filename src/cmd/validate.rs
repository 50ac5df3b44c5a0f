//! `lunafront validate`: every problem of the state in one run; exit 0 when valid, 1 when not.

use super::{exit, print_diagnostics, stderr_color};
use crate::cli::ColorChoice;
use lunafront::model::validate::validate;
use lunafront::spec::load;
use std::path::Path;
use std::process::ExitCode;

pub fn run(path: &Path, json: bool, color: ColorChoice) -> ExitCode {
    let source = match load::load_path(path) {
        Ok(source) => source,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let validation = validate(&source);
    let valid = validation.model.is_some();
    if json {
        let doc = serde_json::json!({ "valid": valid, "diagnostics": validation.diagnostics });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("diagnostics serialize")
        );
    } else {
        print_diagnostics(&validation.diagnostics, stderr_color(color));
        let errors = validation.errors().count();
        let warnings = validation.diagnostics.len() - errors;
        match &validation.model {
            Some(m) => println!(
                "The state is valid: {} listener(s), {} agent(s), {} backend(s), {} domain(s), {} target(s){}.",
                m.listeners.len(),
                m.agents.len(),
                m.backends.len(),
                m.domains.len(),
                m.targets.len(),
                if warnings > 0 {
                    format!("; {warnings} warning(s)")
                } else {
                    String::new()
                }
            ),
            None => {
                eprintln!("\n{errors} error(s), {warnings} warning(s): the state is not valid.")
            }
        }
    }
    ExitCode::from(if valid { exit::OK } else { exit::ERROR })
}
