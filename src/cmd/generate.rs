//! `lunafront generate man|complete-bash|complete-zsh|complete-fish`: the man page and shell
//! completions, written from the command-line definitions themselves (clap_mangen,
//! clap_complete) so they cannot fall out of date. The Debian package ships their output.

use super::exit;
use crate::cli::{Cli, Generated};
use clap::CommandFactory;
use clap_complete::Shell;
use std::process::ExitCode;

pub fn run(what: Generated) -> ExitCode {
    let mut command = Cli::command();
    let mut out = std::io::stdout().lock();
    let shell = match what {
        Generated::Man => {
            return match clap_mangen::Man::new(command).render(&mut out) {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => {
                    eprintln!("error: cannot write the man page: {e}");
                    ExitCode::from(exit::ERROR)
                }
            };
        }
        Generated::CompleteBash => Shell::Bash,
        Generated::CompleteZsh => Shell::Zsh,
        Generated::CompleteFish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, "lunafront", &mut out);
    ExitCode::from(exit::OK)
}
