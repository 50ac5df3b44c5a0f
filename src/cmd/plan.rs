//! `lunafront plan`: what applying the state would change on a target, and how (runtime API or
//! reload). With several targets (or a group) each gets its plan, and a target that holds
//! something else than the others is called out (drift). Exit 0, or with --detailed-exitcode
//! 0 (no changes) / 2 (changes); 1 on error.

use super::apply::{self, Prepared};
use super::{exit, stdout_color};
use crate::cli::ColorChoice;
use lunafront::plan::{json, text};
use lunafront::target::fleet;
use std::path::Path;
use std::process::ExitCode;

pub struct Options<'a> {
    pub state: &'a Path,
    pub targets: &'a [String],
    pub as_json: bool,
    pub detailed: bool,
    pub out: Option<&'a Path>,
    pub color: ColorChoice,
}

pub fn run(o: Options<'_>) -> ExitCode {
    let (model, _) = match super::load_model_for(o.state, o.color, o.as_json) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let result = fleet::resolve(&model, o.targets)
        .map_err(anyhow::Error::from)
        .and_then(|targets| {
            targets
                .into_iter()
                .map(|(name, target)| Ok(apply::prepare(&model, &name, target)?))
                .collect::<anyhow::Result<Vec<Prepared>>>()
        });
    let prepared = match result {
        Ok(p) => p,
        Err(e) => {
            if o.as_json {
                super::print_json_error(&format!("{e:#}"));
            }
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::ERROR);
        }
    };
    if prepared.len() == 1 {
        single(&prepared[0], &o)
    } else if o.out.is_some() {
        eprintln!(
            "error: --out saves one target's plan; plan each target with its own --target and --out"
        );
        ExitCode::from(exit::ERROR)
    } else {
        group(&prepared, &o)
    }
}

fn single(p: &Prepared, o: &Options<'_>) -> ExitCode {
    if o.as_json {
        print!("{}", with_acme(json::render(&p.plan), &p.acme_requests));
    } else {
        print!("{}", text::render(&p.plan, stdout_color(o.color)));
        print_acme(p);
    }
    if let Some(path) = o.out {
        if let Err(e) = apply::save(path, &p.plan, &p.target) {
            eprintln!("error: cannot save the plan to {}: {e}", path.display());
            return ExitCode::from(exit::ERROR);
        }
        eprintln!(
            "Plan saved to {} (mode 0600: it holds the files to write); apply it with `lunafront apply --plan {}`.",
            path.display(),
            path.display()
        );
    }
    exit_code(o.detailed, !p.plan.is_empty())
}

fn group(prepared: &[Prepared], o: &Options<'_>) -> ExitCode {
    let drift = drifted(prepared);
    if o.as_json {
        let entries: Vec<json::GroupEntry> = prepared
            .iter()
            .zip(&drift)
            .map(|(p, &drift)| json::GroupEntry {
                plan: &p.plan,
                revision: p.before.as_deref(),
                drift,
            })
            .collect();
        print!("{}", json::render_group(&entries));
    } else {
        for p in prepared {
            print!("{}", text::render(&p.plan, stdout_color(o.color)));
            print_acme(p);
            println!();
        }
        println!(
            "{:<16} {:<14} {:>8}  {:<8}",
            "target", "holds", "changes", "applied by"
        );
        for (p, &drift) in prepared.iter().zip(&drift) {
            let how = if p.plan.is_empty() {
                "-"
            } else if p.plan.reload_required() {
                "reload"
            } else {
                "runtime"
            };
            println!(
                "{:<16} {:<14} {:>8}  {:<8}{}",
                p.name,
                p.before.as_deref().unwrap_or("none"),
                p.plan.changes.len(),
                how,
                if drift {
                    "  <- differs from the other targets"
                } else {
                    ""
                }
            );
        }
        let drifting: Vec<&str> = prepared
            .iter()
            .zip(&drift)
            .filter(|(_, d)| **d)
            .map(|(p, _)| p.name.as_str())
            .collect();
        if !drifting.is_empty() {
            println!(
                "\nDrift: {} hold(s) something else than the other targets; `lunafront apply` brings them all to the same revision.",
                drifting.join(", ")
            );
        }
    }
    exit_code(o.detailed, prepared.iter().any(|p| !p.plan.is_empty()))
}

/// The certificates `lunafront daemon` will request: not changes of the files (the daemon
/// installs each once the CA has issued it), so they neither make the plan non-empty nor
/// change the exit code.
fn print_acme(p: &Prepared) {
    if p.acme_requests.is_empty() {
        return;
    }
    println!(
        "\nCertificates to request from the ACME CA ({}; `lunafront daemon` requests them and installs each at runtime):",
        p.name
    );
    for domain in &p.acme_requests {
        println!("  + certificate {}", domain);
    }
}

/// The plan's JSON with `acme_requests` last, when there are any: the domains whose
/// certificate will be requested.
fn with_acme(json: String, requests: &[String]) -> String {
    let Some(body) = json.trim_end().strip_suffix('}') else {
        return json;
    };
    if requests.is_empty() {
        return json;
    }
    let list = serde_json::to_string(requests).expect("names serialize");
    format!("{},\n  \"acme_requests\": {list}\n}}\n", body.trim_end())
}

/// Which targets differ from the others: targets are grouped by what they hold (the revision
/// of their last apply, and what the plan would change: a hand edit shows there even when the
/// revision matches); every target outside the largest group has drifted. When all agree,
/// none has.
fn drifted(prepared: &[Prepared]) -> Vec<bool> {
    let keys: Vec<(Option<&str>, Vec<String>)> = prepared
        .iter()
        .map(|p| {
            let mut changes: Vec<String> = p.plan.changes.iter().map(|c| c.summary()).collect();
            changes.sort();
            (p.before.as_deref(), changes)
        })
        .collect();
    let count = |key: &(Option<&str>, Vec<String>)| keys.iter().filter(|k| *k == key).count();
    // The first of the most common keys: with a tie, the earlier targets (the canary) set the
    // reference.
    let mut reference = &keys[0];
    for key in &keys {
        if count(key) > count(reference) {
            reference = key;
        }
    }
    keys.iter().map(|k| k != reference).collect()
}

fn exit_code(detailed: bool, changes: bool) -> ExitCode {
    ExitCode::from(if detailed && changes {
        exit::CHANGES
    } else {
        exit::OK
    })
}
