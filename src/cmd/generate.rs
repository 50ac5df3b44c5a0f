//! `lunafront generate man|complete-bash|complete-zsh|complete-fish`: the man pages and shell
//! completions, written from the command-line definitions themselves (clap_mangen,
//! clap_complete) so they cannot fall out of date. The Debian package ships their output.

use super::exit;
use crate::cli::{Cli, Generated};
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::Path;
use std::process::ExitCode;

pub fn run(what: Generated, out: Option<&Path>) -> ExitCode {
    let mut command = Cli::command();
    let shell = match what {
        Generated::Man => {
            let dir = out.expect("clap requires --out for man");
            return match man_pages(command, dir) {
                Ok(n) => {
                    eprintln!("Wrote {n} man page(s) into {}.", dir.display());
                    ExitCode::from(exit::OK)
                }
                Err(e) => {
                    eprintln!(
                        "error: cannot write the man pages into {}: {e}",
                        dir.display()
                    );
                    ExitCode::from(exit::ERROR)
                }
            };
        }
        Generated::CompleteBash => Shell::Bash,
        Generated::CompleteZsh => Shell::Zsh,
        Generated::CompleteFish => Shell::Fish,
    };
    clap_complete::generate(
        shell,
        &mut command,
        "lunafront",
        &mut std::io::stdout().lock(),
    );
    ExitCode::from(exit::OK)
}

/// `lunafront.1`, and `lunafront-<command>.1` for every visible command (and sub-command),
/// as git and cargo lay theirs out: the main page lists the commands, each page its options.
fn man_pages(command: clap::Command, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut written = 0;
    let mut pending = vec![(command.get_name().to_string(), command)];
    while let Some((name, mut command)) = pending.pop() {
        command.build();
        for sub in command.get_subcommands() {
            if !sub.is_hide_set() && sub.get_name() != "help" {
                pending.push((format!("{name}-{}", sub.get_name()), sub.clone()));
            }
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(command.name(name.clone()))
            .title(name.to_uppercase())
            .render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
        written += 1;
    }
    Ok(written)
}
