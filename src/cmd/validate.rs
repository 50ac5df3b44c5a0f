//! `lunafront validate`: every problem of the state in one run; exit 0 when valid, 1 when not.
//! With `--check`, also what only HAProxy and the certificates themselves can tell: the
//! rendering goes through `haproxy -c`, and each PEM file is parsed (certificate, matching
//! key, expiry) — what a pull-request check should catch before an apply does.

use super::{exit, print_diagnostics, stderr_color};
use crate::cli::ColorChoice;
use lunafront::model::{Model, Target, certs, validate::validate};
use lunafront::render::{self, RenderOptions};
use lunafront::spec::diagnostics::{Diagnostic, Severity};
use lunafront::spec::load;
use lunafront::target::{self, files, haproxy};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub struct Options<'a> {
    pub state: &'a Path,
    pub json: bool,
    pub check: bool,
    pub target: Option<&'a str>,
    pub color: ColorChoice,
}

pub fn run(o: Options<'_>) -> ExitCode {
    let source = match load::load_path(o.state) {
        Ok(source) => source,
        Err(e) => {
            if o.json {
                print_json(false, &[], None, Some(&e.to_string()));
            } else {
                eprintln!("error: {e}");
            }
            return ExitCode::from(exit::ERROR);
        }
    };
    let validation = validate(&source);
    let mut diagnostics = validation.diagnostics.clone();
    let mut haproxy_checked = None;
    if o.check
        && let Some(model) = &validation.model
    {
        diagnostics.extend(certs::check(model, lunafront::clock::unix_now() as i64));
        match haproxy_check(model, o.target) {
            Ok(found) => {
                haproxy_checked = Some(found.is_empty());
                diagnostics.extend(found);
            }
            Err(e) => {
                haproxy_checked = Some(false);
                diagnostics.push(
                    Diagnostic::error("haproxy-check", e)
                        .hint("install HAProxy (`apt-get install haproxy`) or name the target whose `haproxy_bin` to use with --target"),
                );
            }
        }
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let valid = validation.model.is_some() && errors == 0;
    if o.json {
        print_json(valid, &diagnostics, haproxy_checked, None);
    } else {
        print_diagnostics(&diagnostics, stderr_color(o.color));
        let warnings = diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .count();
        match (&validation.model, valid) {
            (Some(m), true) => println!(
                "The state is valid{}: {} listener(s), {} agent(s), {} backend(s), {} domain(s), {} target(s){}.",
                if o.check {
                    " and HAProxy accepts its rendering"
                } else {
                    ""
                },
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
            _ => eprintln!("\n{errors} error(s), {warnings} warning(s): the state is not valid."),
        }
    }
    ExitCode::from(if valid { exit::OK } else { exit::ERROR })
}

fn print_json(
    valid: bool,
    diagnostics: &[Diagnostic],
    haproxy_checked: Option<bool>,
    error: Option<&str>,
) {
    let mut doc = serde_json::json!({ "valid": valid, "diagnostics": diagnostics });
    if let Some(ok) = haproxy_checked {
        doc["haproxy_check"] = serde_json::json!(if ok { "passed" } else { "failed" });
    }
    if let Some(error) = error {
        doc["error"] = serde_json::json!(error);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).expect("diagnostics serialize")
    );
}

/// Renders the model into a private temporary folder and runs `haproxy -c` on it (from `/`,
/// as an apply does). HAProxy's complaints become diagnostics; an `Err` means the check could
/// not run at all.
fn haproxy_check(model: &Model, target_name: Option<&str>) -> Result<Vec<Diagnostic>, String> {
    let chosen = match target_name {
        Some(_) => Some(
            target::select(model, target_name)
                .map_err(|e| e.to_string())?
                .1,
        ),
        None if model.targets.len() == 1 => model.targets.values().next(),
        None => None,
    };
    let options = RenderOptions::for_target(chosen);
    let haproxy_bin = match chosen {
        Some(Target::Haproxy(t)) => t.haproxy_bin.clone(),
        _ => PathBuf::from("haproxy"),
    };
    let rendered = render::render(model, &options).map_err(|e| e.to_string())?;
    let dir = private_temp_dir()?;
    let result = (|| {
        let new = rendered.file_map();
        files::write_files(&dir, &new, &Default::default(), &options.config_name)
            .map_err(|e| e.to_string())?;
        let config = dir.join(&options.config_name);
        Ok(match haproxy::process::check_config(&haproxy_bin, &config) {
            Ok(()) => Vec::new(),
            Err(message) if message.starts_with("cannot run") => return Err(message),
            Err(message) => vec![
                Diagnostic::error(
                    "haproxy-check",
                    format!("HAProxy refuses the rendered configuration:\n{message}"),
                )
                .hint("the messages name lines of the rendering: `lunafront render --out DIR` writes it"),
            ],
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn private_temp_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("lunafront-check-{}", hex::encode(nonce)));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
