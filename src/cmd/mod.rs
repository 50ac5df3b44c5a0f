//! One small module per command; shared helpers to load, validate and print.

pub mod agent;
pub mod apply;
pub mod demo;
pub mod fleet;
pub mod generate;
pub mod history;
pub mod import;
pub mod plan;
pub mod render;
pub mod validate;

use crate::cli::ColorChoice;
use lunafront::model::{Model, validate::validate};
use lunafront::spec::diagnostics::{Diagnostic, Severity};
use lunafront::spec::load;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

/// The daemon's `--git*` flags as the library takes them (the hook secret read from its file).
pub fn daemon_git_options(
    args: &crate::cli::GitArgs,
) -> anyhow::Result<Option<lunafront::git::GitOptions>> {
    use anyhow::Context;
    let Some(url) = &args.git else {
        return Ok(None);
    };
    let hook_secret = match &args.git_hook_secret_file {
        Some(file) => {
            let secret = std::fs::read_to_string(file)
                .with_context(|| format!("--git-hook-secret-file {}", file.display()))?
                .trim()
                .to_string();
            anyhow::ensure!(
                secret.len() >= 16,
                "--git-hook-secret-file {}: the secret must be at least 16 characters",
                file.display()
            );
            Some(secret)
        }
        None => None,
    };
    for (flag, file) in [
        ("--git-key", &args.git_key),
        ("--require-signed", &args.require_signed),
        ("--git-signing-key", &args.git_signing_key),
    ] {
        if let Some(file) = file {
            anyhow::ensure!(file.is_file(), "{flag} {}: no such file", file.display());
        }
    }
    let absolute = |p: &Option<std::path::PathBuf>| -> anyhow::Result<Option<std::path::PathBuf>> {
        Ok(match p {
            Some(p) => Some(std::path::absolute(p)?),
            None => None,
        })
    };
    Ok(Some(lunafront::git::GitOptions {
        url: url.clone(),
        branch: args.branch.clone(),
        interval: args.git_interval,
        key: absolute(&args.git_key)?,
        allow_rewrite: args.allow_rewrite,
        allowed_signers: absolute(&args.require_signed)?,
        signing_key: absolute(&args.git_signing_key)?,
        hook_secret,
        timeout: args.git_timeout,
    }))
}

/// Exit codes, as documented in the README.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const CHANGES: u8 = 2;
    /// Applied (the change is live) but not recorded in the history.
    pub const UNRECORDED: u8 = 5;
}

pub fn use_color(choice: ColorChoice, stream_is_terminal: bool) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            stream_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    }
}

pub fn stderr_color(choice: ColorChoice) -> bool {
    use_color(choice, std::io::stderr().is_terminal())
}

pub fn stdout_color(choice: ColorChoice) -> bool {
    use_color(choice, std::io::stdout().is_terminal())
}

pub fn print_diagnostics(diagnostics: &[Diagnostic], color: bool) {
    for d in diagnostics {
        let text = d.to_string();
        if color {
            let (word, style) = match d.severity {
                Severity::Error => ("error[", "\x1b[1;31m"),
                Severity::Warning => ("warning[", "\x1b[1;33m"),
            };
            eprintln!(
                "{}",
                text.replacen(word, &format!("{style}{word}"), 1)
                    .replacen("]: ", "]\x1b[0m: ", 1)
            );
        } else {
            eprintln!("{text}");
        }
    }
}

/// Loads and validates the state, printing every diagnostic. `Err` is the exit code to use.
pub fn load_model(path: &Path, color: ColorChoice) -> Result<(Model, Vec<Diagnostic>), ExitCode> {
    load_model_for(path, color, false)
}

/// `{"error": …}` on stdout, for a command asked for JSON that fails before its document.
pub fn print_json_error(message: &str) {
    println!(
        "{}",
        serde_json::json!({ "format_version": "1", "error": message })
    );
}

/// `load_model`; with `json`, a state that does not load or validate is also reported on
/// stdout as `{"format_version", "valid": false, "diagnostics": […]}` so a script reading the
/// command's JSON learns why.
pub fn load_model_for(
    path: &Path,
    color: ColorChoice,
    json: bool,
) -> Result<(Model, Vec<Diagnostic>), ExitCode> {
    let source = match load::load_path(path) {
        Ok(source) => source,
        Err(e) => {
            if json {
                print_json_error(&e.to_string());
            }
            eprintln!("error: {e}");
            return Err(ExitCode::from(exit::ERROR));
        }
    };
    let validation = validate(&source);
    print_diagnostics(&validation.diagnostics, stderr_color(color));
    match validation.model {
        Some(model) => Ok((model, validation.diagnostics)),
        None => {
            if json {
                let doc = serde_json::json!({
                    "format_version": "1",
                    "valid": false,
                    "diagnostics": validation.diagnostics,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).expect("diagnostics serialize")
                );
            }
            let errors = validation.errors().count();
            eprintln!(
                "\n{errors} error{} in the state; nothing was changed.",
                if errors == 1 { "" } else { "s" }
            );
            Err(ExitCode::from(exit::ERROR))
        }
    }
}
