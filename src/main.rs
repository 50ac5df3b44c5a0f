//! The `lunafront` binary: parses the command line, runs one command, and maps the outcome to
//! the documented exit codes. anyhow lives here and in `cmd/` only.

mod cli;
mod cmd;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

// Compiling a large state allocates many small strings; mimalloc does that measurably faster
// than glibc's allocator (see BENCHMARKS.md); without transparent huge pages (`allocator`).
lunafront::use_mimalloc!();

/// mimalloc's `purge_delay` option (its index in mimalloc v3's `mi_option_t`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// A long-running daemon should not hold on to the memory a reconcile used: pages mimalloc
/// frees are handed back to the system at once instead of after its default 1 s grace, which
/// a daemon reconciling several times a second would never reach.
fn keep_freed_memory_briefly() {
    // SAFETY: set once, before the daemon starts its threads (mimalloc's options are not
    // thread-safe to set).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// Returns the memory freed by the last reconcile (its source text, parse trees, renderings)
/// to the system.
fn release_freed_memory() {
    // SAFETY: mi_collect may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A usage error is "invalid input" (1) like any other, never clap's 2, which
        // `plan --detailed-exitcode` uses for "changes pending".
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                cmd::exit::ERROR
            } else {
                cmd::exit::OK
            });
        }
    };
    init_logs(&cli);
    match &cli.command {
        Command::Validate {
            state,
            json,
            check,
            target,
        } => cmd::validate::run(cmd::validate::Options {
            state: &state.state,
            json: *json,
            check: *check,
            target: target.as_deref(),
            color: cli.color,
        }),
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
            json,
            allow_deletes,
        } => cmd::apply::run(cmd::apply::Options {
            state: &state.state,
            targets,
            auto_approve: *auto_approve,
            saved: plan.as_deref(),
            parallel: *parallel,
            allow_deletes: *allow_deletes,
            color: cli.color,
            json: *json,
        }),
        Command::Rollback {
            state,
            target,
            steps,
            auto_approve,
            json,
        } => cmd::history::rollback(
            &state.state,
            target.as_deref(),
            *steps,
            *auto_approve,
            *json,
            cli.color,
        ),
        Command::History {
            state,
            target,
            json,
        } => cmd::history::list(&state.state, target.as_deref(), *json),
        Command::Daemon {
            state,
            target,
            parallel,
            listen,
            spawn,
            interval,
            api,
            admin_token_file,
            api_data,
            git,
        } => {
            let git = match cmd::daemon_git_options(git) {
                Ok(git) => git,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(cmd::exit::ERROR);
                }
            };
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
                after_reconcile: Some(release_freed_memory),
                git,
                parallel: *parallel,
            };
            keep_freed_memory_briefly();
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
        Command::Fleet { action } => cmd::fleet::run(action),
        Command::Schema => {
            print!("{}", lunafront::spec::schema::SCHEMA_TEXT);
            ExitCode::SUCCESS
        }
        Command::Import { config, out, json } => cmd::import::run(config, out.as_deref(), *json),
        Command::Generate { what, out } => cmd::generate::run(*what, out.as_deref()),
    }
}

/// Logs go to stderr, as text (coloured on a terminal unless NO_COLOR or --color says
/// otherwise) or as one JSON object per event.
fn init_logs(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LUNAFRONT_LOG")
        .unwrap_or_else(|_| default_log_level(&cli.command).into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Text => builder.with_ansi(cmd::stderr_color(cli.color)).init(),
        cli::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .init(),
    }
}

/// The daemon logs what it does; one-shot commands only warnings.
fn default_log_level(command: &Command) -> &'static str {
    match command {
        Command::Daemon { .. } => "info,notify=warn",
        _ => "warn",
    }
}

#[cfg(test)]
mod tests {
    /// The option index is mimalloc's, not a name: an upgrade that moves it must fail here.
    /// `purge_delay` is the option whose default is 1000 (ms, mimalloc v3's options.c).
    #[test]
    fn the_purge_delay_option_index_is_mimallocs() {
        // SAFETY: reads an option; nothing is set.
        let (before, at, after) = unsafe {
            (
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY - 1),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY + 1),
            )
        };
        assert_eq!(at, 1000, "purge_delay's default");
        assert_ne!((before, after), (1000, 1000));
    }

    /// mimalloc marked its arenas for transparent huge pages (`madvise(MADV_HUGEPAGE)`, the `hg`
    /// flag in /proc/self/smaps): every first touch zeroed 2 MB, and a 100k-domain compile spent
    /// 57% of its time in the kernel doing so. No mapping of this binary carries the flag, also
    /// after allocating more than an arena holds.
    #[test]
    fn no_memory_is_marked_for_transparent_huge_pages() {
        let blocks: Vec<Vec<u8>> = (0..24).map(|i| vec![i as u8; 64 << 20]).collect();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let marked: Vec<&str> = smaps
            .lines()
            .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "hg"))
            .collect();
        assert!(blocks.iter().all(|b| b.len() == 64 << 20));
        assert!(smaps.contains("VmFlags:"), "smaps shows no flags");
        assert!(marked.is_empty(), "{} mappings marked hg", marked.len());
        // SAFETY: reads an option.
        let allow_thp =
            unsafe { libmimalloc_sys::mi_option_get(lunafront::allocator::MI_OPTION_ALLOW_THP) };
        assert_eq!(allow_thp, 0);
    }
}
