//! `lunafront import haproxy.cfg`: an existing configuration (per-host ACL chains, as the
//! original CloudLunacy front wrote them, or host maps) → a state file, and a report of every
//! line that was not translated. The translation itself is `lunafront::import` (pure); here
//! the files are read, the result validated and written.

use super::exit;
use lunafront::import::{Imported, import};
use lunafront::model::validate;
use lunafront::spec::load::{Source, SourceFile};
use std::path::Path;
use std::process::ExitCode;

pub fn run(config: &Path, out: Option<&Path>, json: bool) -> ExitCode {
    let text = match std::fs::read_to_string(config) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", config.display());
            return ExitCode::from(exit::ERROR);
        }
    };
    // Map files are named relative to the configuration's folder (or absolute).
    let base = config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let read_map = move |name: &str| std::fs::read_to_string(base.join(name)).ok();
    let imported = import(&text, &read_map);

    // The result must be a state lunafront accepts (certificate folders are not read here:
    // they are on the machine that runs it).
    let shown = out.unwrap_or(Path::new("imported.yaml"));
    let source = Source::parse(vec![SourceFile::new(
        shown.to_path_buf(),
        imported.yaml.clone(),
    )]);
    let validation = validate(&source);
    let diagnostics: Vec<String> = validation
        .errors()
        .filter(|d| d.code != "certificates-missing")
        .map(|d| d.to_string())
        .collect();

    if let Some(path) = out
        && let Err(e) =
            lunafront::target::files::write_atomic(path, imported.yaml.as_bytes(), 0o640)
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::from(exit::ERROR);
    }
    if json {
        let doc = serde_json::json!({
            "format_version": "1",
            "state": imported.yaml,
            "written_to": out.map(|p| p.display().to_string()),
            "listeners": imported.listeners,
            "backends": imported.backends,
            "domains": imported.domains,
            "untranslated": imported.untranslated,
            "errors": diagnostics,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("import serializes")
        );
    } else {
        if out.is_none() {
            print!("{}", imported.yaml);
        }
        report(config, &imported, out);
        for d in &diagnostics {
            eprintln!("{d}");
        }
    }
    ExitCode::from(if diagnostics.is_empty() {
        exit::OK
    } else {
        exit::ERROR
    })
}

fn report(config: &Path, imported: &Imported, out: Option<&Path>) {
    for u in &imported.untranslated {
        let at = if u.line > 0 {
            format!("{}:{}", config.display(), u.line)
        } else {
            config.display().to_string()
        };
        eprintln!("{at}: not translated: {} ({})", u.text, u.reason);
    }
    eprintln!(
        "Imported {} listener(s), {} backend(s), {} domain(s){}; {} line(s) not (or only partly) translated, listed above.",
        imported.listeners,
        imported.backends,
        imported.domains,
        out.map(|p| format!(" into {}", p.display()))
            .unwrap_or_default(),
        imported.untranslated.len()
    );
}
