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
        match haproxy_check(model, &source, o.target) {
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
fn haproxy_check(
    model: &Model,
    source: &load::Source,
    target_name: Option<&str>,
) -> Result<Vec<Diagnostic>, String> {
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
        Ok(
            match haproxy::process::check_config(&haproxy_bin, &config) {
                Ok(()) => Vec::new(),
                Err(message) if message.starts_with("cannot run") => return Err(message),
                Err(message) => locate_refusals(&message, &rendered.config, model, source),
            },
        )
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Turns `haproxy -c`'s alerts into diagnostics. An alert about a line that came from an
/// `extra:` entry points at that entry in the state (file:line:col); the others are reported
/// together, naming lines of the rendering.
fn locate_refusals(
    message: &str,
    config: &str,
    model: &Model,
    source: &load::Source,
) -> Vec<Diagnostic> {
    let rendered: Vec<&str> = config.lines().collect();
    let mut out = Vec::new();
    let mut unplaced = Vec::new();
    for alert in message.lines() {
        let line_no = alert
            .split_once(".cfg:")
            .and_then(|(_, rest)| rest.split(']').next())
            .and_then(|n| n.parse::<usize>().ok());
        let text = line_no
            .and_then(|n| rendered.get(n.wrapping_sub(1)))
            .map(|l| l.trim());
        let extra = text.and_then(|text| {
            let listeners = model
                .listeners
                .iter()
                .map(|(n, l)| ("listeners", "listener", n, &l.extra));
            let backends = model
                .backends
                .iter()
                .map(|(n, b)| ("backends", "backend", n, &b.extra));
            listeners
                .chain(backends)
                .find_map(|(section, kind, name, extra)| {
                    extra
                        .iter()
                        .position(|l| l.trim() == text)
                        .map(|i| (section, kind, name, i))
                })
        });
        match extra {
            Some((section, kind, name, i)) => {
                let pointer = format!(
                    "/{section}/{}/extra/{i}",
                    lunafront::spec::spans::escape_pointer_token(name)
                );
                let said = alert.rsplit(" : ").next().unwrap_or(alert).trim();
                // Drop the temporary file's name: the diagnostic points at the state.
                let said = said
                    .split_once("]: ")
                    .filter(|(head, _)| head.starts_with("parsing ["))
                    .map_or(said, |(_, rest)| rest);
                out.push(
                    Diagnostic::error(
                        "haproxy-check",
                        format!(
                            "HAProxy refuses extra line {} of {kind} `{name}`: {said}",
                            i + 1
                        ),
                    )
                    .hint("fix or remove the line: it is written as is into the configuration")
                    .at(source.locate(&pointer, false))
                    .pointer(pointer),
                );
            }
            // Alerts naming no line ("Fatal errors found in configuration.") only sum up.
            None if line_no.is_some() => unplaced.push(alert),
            None => {}
        }
    }
    if !unplaced.is_empty() || out.is_empty() {
        out.push(
            Diagnostic::error(
                "haproxy-check",
                format!(
                    "HAProxy refuses the rendered configuration:\n{}",
                    if unplaced.is_empty() {
                        message.to_string()
                    } else {
                        unplaced.join("\n")
                    }
                ),
            )
            .hint(
                "the messages name lines of the rendering: `lunafront render --out DIR` writes it",
            ),
        );
    }
    out
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
