//! `lunafront render --out DIR`: compile the state into a folder. Nothing is written unless
//! the whole state is valid; each file is replaced atomically.

use super::{exit, load_model};
use crate::cli::ColorChoice;
use lunafront::render::{self, RenderOptions};
use lunafront::target::{self, files};
use std::path::Path;
use std::process::ExitCode;

pub fn run(state: &Path, out: &Path, target_name: Option<&str>, color: ColorChoice) -> ExitCode {
    let (model, _) = match load_model(state, color) {
        Ok(m) => m,
        Err(code) => return code,
    };
    // Render for a target's paths when one is named or the state has only one.
    let options = match target_name {
        Some(_) => match target::select(&model, target_name) {
            Ok((_, t)) => target::render_options(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit::ERROR);
            }
        },
        None if model.targets.len() == 1 => {
            target::render_options(model.targets.values().next().expect("one"))
        }
        None => RenderOptions::for_target(None),
    };
    // What a previous render left in the folder: its apps keep their slots.
    let live = match files::observe_dir(out, render::output_paths(&model, &options)) {
        Ok(live) => live,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", out.display());
            return ExitCode::from(exit::ERROR);
        }
    };
    let rendered =
        match render::render_onto(&model, &options, &live.slot_pools(&options.config_name)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit::ERROR);
            }
        };
    let new = rendered.file_map();
    let result = files::write_files(out, &new, &live.files, &rendered.options.config_name);
    match result {
        Ok(written) => {
            println!(
                "Rendered {} file(s) into {} ({} changed).",
                new.len(),
                out.display(),
                written.len()
            );
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("error: cannot write the rendering: {e}");
            ExitCode::from(exit::ERROR)
        }
    }
}
