//! The GitHub Actions workflow in examples/github-actions: valid YAML of the expected shape;
//! every `lunafront` command it runs exists with the flags it passes; and its steps, run here
//! as the runner would run them (bash -eo pipefail, $GITHUB_OUTPUT), validate and plan a real
//! state (the comment lists the changes, or the diagnostics with their file:line and the job
//! fails) and apply it to a real HAProxy.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use support::*;

const WORKFLOW: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/github-actions/lunafront.yml"
);

fn workflow() -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(WORKFLOW).unwrap()).expect("valid YAML")
}

fn steps<'a>(w: &'a serde_yaml::Value, job: &str) -> &'a Vec<serde_yaml::Value> {
    w["jobs"][job]["steps"].as_sequence().expect("steps")
}

/// Every `lunafront SUBCOMMAND --flag ...` in a script: (subcommand, flags).
fn lunafront_commands(script: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in script.lines() {
        let mut words = line.split_whitespace().peekable();
        while let Some(word) = words.next() {
            if word != "lunafront" {
                continue;
            }
            // A command, not the word in a string (`"### lunafront plan"`).
            let Some(sub) = words
                .next()
                .filter(|s| s.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            else {
                continue;
            };
            let mut flags = Vec::new();
            while let Some(w) = words.peek() {
                if [">", "||", "&&", ";", "|"].contains(w) {
                    break;
                }
                if w.starts_with("--") {
                    flags.push(w.to_string());
                }
                words.next();
            }
            out.push((sub.to_string(), flags));
        }
    }
    out
}

#[test]
fn the_workflow_is_valid_yaml_and_runs_only_commands_and_flags_that_exist() {
    let w = workflow();
    assert_eq!(w["name"], "lunafront");
    assert!(
        w["on"]["pull_request"].is_mapping(),
        "runs on pull requests"
    );
    assert_eq!(
        w["on"]["push"]["branches"][0], "main",
        "applies on merge to main"
    );
    let mut seen = Vec::new();
    for job in ["plan", "apply"] {
        for step in steps(&w, job) {
            if let Some(script) = step["run"].as_str() {
                seen.extend(lunafront_commands(script));
            }
        }
    }
    let subcommands: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(subcommands, ["validate", "plan", "apply"], "{seen:?}");
    for (sub, flags) in &seen {
        let out = lunafront().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "lunafront {sub} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in flags {
            assert!(
                help.split(|c: char| c.is_whitespace() || c == ',')
                    .any(|w| w == flag),
                "lunafront {sub} has no {flag}:\n{help}"
            );
        }
    }
}

/// Runs the `run:` steps of a job in `dir` as GitHub's runner does, skipping the ones that
/// talk to GitHub (`gh`) and honouring `if:` on the step outputs. Returns the outputs and the
/// exit code of the first failing step, if any.
fn run_job(dir: &Path, job: &str) -> (BTreeMap<String, String>, Option<i32>) {
    let w = workflow();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_lunafront"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let mut outputs = BTreeMap::new();
    for step in steps(&w, job) {
        let Some(script) = step["run"].as_str() else {
            continue;
        };
        if script.contains("gh pr comment") {
            continue;
        }
        if let Some(condition) = step["if"].as_str() {
            // The only conditions used: `steps.X.outputs.failed == 'true'` joined by `||`.
            let holds = condition.split("||").any(|c| {
                let c = c.trim();
                let id = c
                    .strip_prefix("steps.")
                    .and_then(|r| r.split_once(".outputs.failed == 'true'"))
                    .map(|(id, _)| id)
                    .unwrap_or_else(|| panic!("unexpected condition {c}"));
                outputs.get(&format!("{id}.failed")).map(String::as_str) == Some("true")
            });
            if !holds {
                continue;
            }
        }
        let output_file = dir.join("github_output");
        std::fs::write(&output_file, "").unwrap();
        let mut command = Command::new("bash");
        command
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
            .current_dir(dir)
            .env("PATH", &path)
            .env("GITHUB_OUTPUT", &output_file)
            .env("GITHUB_STEP_SUMMARY", dir.join("summary.md"));
        for (key, value) in w["env"].as_mapping().unwrap() {
            command.env(key.as_str().unwrap(), value.as_str().unwrap());
        }
        let out = command.output().unwrap();
        if let Some(id) = step["id"].as_str() {
            for line in std::fs::read_to_string(&output_file).unwrap().lines() {
                let (k, v) = line.split_once('=').unwrap();
                outputs.insert(format!("{id}.{k}"), v.to_string());
            }
        }
        if !out.status.success() {
            return (outputs, out.status.code());
        }
        assert!(
            out.stderr.is_empty() || step["id"].is_string(),
            "step {:?} wrote to stderr: {}",
            step["name"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (outputs, None)
}

#[test]
fn the_workflows_steps_plan_comment_fail_and_apply_on_a_real_state() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    // A repository with the state in state/, and a target named `edge` as the workflow says.
    let target = site.target_block(true).replace("  local:", "  edge:");
    let target = target
        .replace(
            "config: live/",
            &format!("config: {}/live/", site.path().display()),
        )
        .replace(
            "state_dir: state,",
            &format!("state_dir: {}/state,", site.path().display()),
        );
    let good = format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n  shop.example.com: {{ backend: shop }}\n{target}",
        shop.port
    );
    let repo = site.path().join("repo");
    write(&repo, "state/lunafront.yaml", &good);

    // A pull request with changes: the comment lists them; the job passes.
    let (outputs, failed) = run_job(&repo, "plan");
    assert_eq!(failed, None, "{outputs:?}");
    assert_eq!(outputs["plan.code"], "2", "changes pending");
    let comment = std::fs::read_to_string(repo.join("comment.md")).unwrap();
    assert!(comment.contains("#### target `edge`"), "{comment}");
    assert!(
        comment.contains("| + | domain | `shop.example.com` | runtime |")
            || comment.contains("| + | domain | `shop.example.com` | reload |"),
        "{comment}"
    );
    assert!(
        comment.contains("| + | listener | `http` | reload |"),
        "{comment}"
    );

    // A pull request that breaks the state: the comment has the diagnostic with its place,
    // and the job fails.
    write(
        &repo,
        "state/lunafront.yaml",
        &good.replace("backend: shop }", "backend: shopp }"),
    );
    let (outputs, failed) = run_job(&repo, "plan");
    assert_eq!(failed, Some(1), "{outputs:?}");
    assert_eq!(outputs["validate.failed"], "true");
    let comment = std::fs::read_to_string(repo.join("comment.md")).unwrap();
    assert!(
        comment.contains("`state/lunafront.yaml:9:32` **error[unknown-backend]**")
            && comment.contains("**error[unknown-backend]**: backend `shopp` is not defined"),
        "{comment}"
    );

    // The merge: apply.
    write(&repo, "state/lunafront.yaml", &good);
    let (_, failed) = run_job(&repo, "apply");
    assert_eq!(
        failed,
        None,
        "{}",
        std::fs::read_to_string(repo.join("apply.json")).unwrap_or_default()
    );
    let applied: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("apply.json")).unwrap()).unwrap();
    assert_eq!(applied["targets"][0]["target"], "edge", "{applied}");
    assert_eq!(applied["targets"][0]["result"], "applied", "{applied}");
    assert_eq!(http_get(port, "shop.example.com", "/").unwrap().0, 200);
    // The HAProxy that apply started (its sockets in the site) stops with the site.
}
