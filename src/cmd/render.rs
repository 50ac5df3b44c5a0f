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
    // Render for a target's paths (and its ACME certificates) when one is named or the state
    // has only one.
    let chosen = match target_name {
        Some(_) => match target::select(&model, target_name) {
            Ok((_, t)) => Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit::ERROR);
            }
        },
        None if model.targets.len() == 1 => model.targets.values().next(),
        None => None,
    };
    let options = match chosen {
        Some(t) => target::render_options(t),
        None => RenderOptions::for_target(None),
    };
    let model = match chosen.map(|t| lunafront::acme::for_target(&model, t)) {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::ERROR);
        }
        None => std::borrow::Cow::Borrowed(&model),
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
