//! The `lunafront` binary: parses the command line, runs one command, and maps the outcome to
//! the documented exit codes. anyhow lives here and in `cmd/` only.

mod cli;
mod cmd;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

// Compiling a large state allocates many small strings; mimalloc does that measurably faster
// than glibc's allocator (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LUNAFRONT_LOG")
                .unwrap_or_else(|_| default_log_level(&cli.command).into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match &cli.command {
        Command::Validate { state, json } => cmd::validate::run(&state.state, *json, cli.color),
        Command::Render { state, out, target } => {
            cmd::render::run(&state.state, out, target.as_deref(), cli.color)
        }
        Command::Plan {
            state,
            targets,
            json,
            detailed_exitcode,
            out,
        } => cmd::plan::run(cmd::plan::Options {
            state: &state.state,
            targets,
            as_json: *json,
            detailed: *detailed_exitcode,
            out: out.as_deref(),
            color: cli.color,
        }),
        Command::Apply {
            state,
            targets,
            parallel,
            auto_approve,
            plan,
        } => cmd::apply::run(cmd::apply::Options {
            state: &state.state,
            targets,
            auto_approve: *auto_approve,
            saved: plan.as_deref(),
            parallel: *parallel,
            color: cli.color,
        }),
        Command::Rollback {
            state,
            target,
            steps,
            auto_approve,
        } => cmd::history::rollback(
            &state.state,
            target.as_deref(),
            *steps,
            *auto_approve,
            cli.color,
        ),
        Command::History { state, target } => cmd::history::list(&state.state, target.as_deref()),
        Command::Daemon {
            state,
            target,
            listen,
            spawn,
            interval,
            api,
            admin_token_file,
            api_data,
        } => {
            let api = api.map(|listen| lunafront::api::ApiOptions {
                listen,
                admin_token_file: admin_token_file.clone(),
                data_dir: api_data.clone().unwrap_or_default(),
            });
            let options = lunafront::daemon::DaemonOptions {
                state: state.state.clone(),
                target: target.clone(),
                listen: *listen,
                spawn: *spawn,
                interval: *interval,
                debounce_quiet: std::time::Duration::from_millis(50),
                debounce_cap: std::time::Duration::from_millis(300),
                api,
            };
            match lunafront::daemon::run(options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(cmd::exit::ERROR)
                }
            }
        }
        Command::DemoBackends { apps } => cmd::demo::run(apps),
        Command::Agent { action } => cmd::agent::run(action),
        Command::Schema => {
            print!("{}", lunafront::spec::schema::SCHEMA_TEXT);
            ExitCode::SUCCESS
        }
    }
}

/// The daemon logs what it does; one-shot commands only warnings.
fn default_log_level(command: &Command) -> &'static str {
    match command {
        Command::Daemon { .. } => "info,notify=warn",
        _ => "warn",
    }
}
