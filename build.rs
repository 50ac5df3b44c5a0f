//! Build script: records the git commit the binary is built from, for `lunafront --version`
//! and the `lunafront_build_info` metric. From a git checkout it asks git; from a source
//! tarball made by `git archive` it reads `packaging/commit`, which git fills in on export
//! (`export-subst` in .gitattributes); otherwise the commit is `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=packaging/commit");
    println!("cargo:rerun-if-env-changed=LUNAFRONT_GIT_COMMIT");
    let commit = std::env::var("LUNAFRONT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
            // Rebuild when HEAD moves: HEAD itself (a checkout) and the ref it names (a commit).
            for path in ["HEAD", "packed-refs"] {
                if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            if let Some(name) = git(&["symbolic-ref", "-q", "HEAD"])
                && let Some(p) = git(&["rev-parse", "--git-path", &name])
            {
                println!("cargo:rerun-if-changed={p}");
            }
            Some(commit)
        })
        .or_else(|| {
            let text = std::fs::read_to_string(Path::new("packaging/commit")).ok()?;
            let text = text.trim();
            // Unexpanded (`$Format:…$`) outside an archive.
            (!text.is_empty() && !text.starts_with('$')).then(|| text.chars().take(12).collect())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LUNAFRONT_GIT_COMMIT={commit}");
}
