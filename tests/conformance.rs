//! The API under its own contract: Schemathesis (PyPI `schemathesis`, pinned below, installed by
//! `scripts/setup`), a property-based fuzzer that reads `api/openapi.yaml`, runs against a live
//! daemon driving a real HAProxy, with every check (`--checks all`: no server errors, statuses,
//! content types, headers and bodies as documented, schema-valid requests accepted and invalid
//! ones refused, missing auth refused, deleted resources gone, created ones reachable), its
//! stateful phase following the document's links (created agent → its routes → delete), a fixed
//! seed and a bounded number of examples — once with the admin token, once with an agent's.
//! After each run the state on disk still validates and the daemon is ready: no call left it
//! invalid. `scripts/conformance` runs just this; `LUNAFRONT_CONFORMANCE_SEED` and
//! `LUNAFRONT_CONFORMANCE_EXAMPLES` change the seed and the examples per operation.
//!
//! Fails — never skips — when Schemathesis is missing or another version.

mod support;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::agent::*;

/// The Schemathesis version the document is checked with (`scripts/setup` installs it).
const VERSION: &str = "4.32.5";

/// `st`: `LUNAFRONT_SCHEMATHESIS`, else where `scripts/setup` installs it.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("LUNAFRONT_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(format!(
                "/var/cache/lunafront/schemathesis-{VERSION}/bin/st"
            ))
        });
    let version = Command::new(&path).arg("--version").output();
    match version {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains(&format!("version {VERSION}")) => {
            path
        }
        Ok(out) => panic!(
            "{} is not Schemathesis {VERSION}: {}{}; run scripts/setup",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "Schemathesis {VERSION} is needed at {} ({e}): run scripts/setup, or point LUNAFRONT_SCHEMATHESIS at its `st`",
            path.display()
        ),
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

/// A front whose limits a fuzzer does not run into (the defaults would leave most operations
/// behind a 429), with an agent the administrator declares (`admin-agent`: the API must refuse
/// to redefine or remove it) and one registered through the API (`me`). Returns the front and
/// `me`'s token.
fn front() -> (ApiFront, String) {
    let front = ApiFront::start_ready(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n  limits: { changes_per_minute: 100000, change_burst: 100000, reloads_per_hour: 100000, reload_burst: 100000, reload_interval: 1ms, client_attempts_per_minute: 100000, client_attempt_burst: 100000 }\n",
        "",
        &[(
            "state/admin.yaml",
            "agents:\n  admin-agent: { address: 127.0.9.9 }\n".to_string(),
        )],
    );
    let me = front.register("me", "127.0.5.5");
    (front, me)
}

/// Runs Schemathesis with `token` against `front`, the ids of `agents` drawn often (so that
/// operations reach past "not found" and "not yours"). Returns its report.
fn run(front: &ApiFront, token: &str, agents: &[&str], name: &str) -> String {
    let st = schemathesis();
    let dir = front.site.path().join(format!("schemathesis-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let values = agents
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[dictionaries.agents]\nvalues = [{values}]\n\n[parameters]\n\"path.agentId\" = {{ dictionary = \"agents\", probability = 0.6 }}\n\"path.id\" = {{ dictionary = \"agents\", probability = 0.6 }}\n\"body.agentId\" = {{ dictionary = \"agents\", probability = 0.6 }}\n"
        ),
    )
    .unwrap();
    // Real CSRs for the `pkcs10-pem` format (tests/schemathesis/hooks.py), without a name:
    // valid for any agent.
    let csrs: String = (0..3)
        .map(|_| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "conformance");
            params
                .serialize_request(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .pem()
                .unwrap()
        })
        .collect();
    let csr_file = dir.join("csrs.pem");
    std::fs::write(&csr_file, csrs).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seed = setting("LUNAFRONT_CONFORMANCE_SEED", 1);
    let examples = setting("LUNAFRONT_CONFORMANCE_EXAMPLES", 100);
    let out = Command::new(&st)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(root.join("api/openapi.yaml"))
        .args(["--url", &format!("http://127.0.0.1:{}", front.api)])
        .args(["--checks", "all"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--seed", &seed.to_string()])
        .args(["--max-examples", &examples.to_string()])
        .args(["--generation-database", "none"])
        .args(["--request-timeout", "40"])
        .args(["--workers", "1"])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--report", "har", "--report-har-path"])
        .arg(dir.join("run.har"))
        .arg("--no-color")
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", root.join("tests/schemathesis"))
        .env("LUNAFRONT_CONFORMANCE_CSRS", &csr_file)
        .current_dir(&dir)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "== Schemathesis {VERSION}, {name} token, seed {seed}, {examples} examples per operation\n{report}"
    );
    assert!(
        out.status.success(),
        "Schemathesis found failures with the {name} token (seed {seed}): see the report above\n{}",
        report
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // It really ran: every operation, and many cases.
    assert!(
        report.contains("Tested: 26"),
        "not every operation was tested:\n{report}"
    );
    let generated: u64 = report
        .lines()
        .find(|l| l.contains(" generated, "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        generated >= 10 * examples,
        "only {generated} cases ran:\n{report}"
    );
    // No call left the state invalid: it validates, and the daemon serves it.
    let (code, stdout, stderr) = support::run(&["validate", "state"], front.site.path());
    assert_eq!(code, 0, "after the {name} run: {stdout}{stderr}");
    front
        .daemon
        .wait_for("/ready", 200, "ok", Duration::from_secs(20));
    report
}

/// Every request of a run (`--report har`) as (method, path, status).
fn exchanges(front: &ApiFront, name: &str) -> Vec<(String, String, u16)> {
    let har = front
        .site
        .path()
        .join(format!("schemathesis-{name}/run.har"));
    let har: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&har).unwrap()).expect("a HAR report");
    har["log"]["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            let url = e["request"]["url"].as_str().unwrap();
            let path = url
                .split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
                .unwrap_or("/");
            let path = path.split('?').next().unwrap().to_string();
            (
                e["request"]["method"].as_str().unwrap().to_string(),
                path,
                e["response"]["status"].as_u64().unwrap() as u16,
            )
        })
        .collect()
}

/// Whether some `method` request whose path starts with `prefix` (and has `segments` parts)
/// succeeded: the first run's stateful phase could not chain calls, and every route removal
/// it tried was a 404.
fn succeeded(calls: &[(String, String, u16)], method: &str, prefix: &str, segments: usize) -> bool {
    let n = calls
        .iter()
        .filter(|(m, p, s)| {
            m == method
                && p.starts_with(prefix)
                && p.split('/').count() == segments
                && (200..300).contains(s)
        })
        .count();
    println!(
        "{n} of {} requests: {method} {prefix}… ({segments} parts) succeeded",
        calls.len()
    );
    n > 0
}

#[test]
fn schemathesis_finds_no_failure_with_the_admin_token() {
    let (front, _) = front();
    let report = run(&front, ADMIN, &["admin-agent", "me"], "admin");
    // The stateful phase followed the document's links: created routes were found and
    // removed (`/v1/agents/{id}/routes/{domain}`: 6 parts).
    assert!(report.contains("API Links:"), "{report}");
    let calls = exchanges(&front, "admin");
    assert!(
        succeeded(&calls, "DELETE", "/v1/agents/", 6),
        "no route was removed: {:?}",
        calls
            .iter()
            .filter(|(m, _, _)| m == "DELETE")
            .collect::<Vec<_>>()
    );
}

#[test]
fn schemathesis_finds_no_failure_with_an_agent_token() {
    let (front, me) = front();
    run(&front, &me, &["me"], "agent");
    // The agent's routes were created and removed (the stateful phase's links).
    let calls = exchanges(&front, "agent");
    assert!(
        succeeded(&calls, "DELETE", "/api/proxy", 3)
            || succeeded(&calls, "DELETE", "/v1/agents/", 6),
        "no route was removed: {:?}",
        calls
            .iter()
            .filter(|(m, _, _)| m == "DELETE")
            .collect::<Vec<_>>()
    );
    // The agent's own things are still its own, and the administrator's still theirs.
    let (status, body) = front.call("GET", "/v1/agents/admin-agent", Some(&me), None);
    assert_eq!(status, 403, "{body}");
    let (status, body) = front.call("GET", "/v1/agents/admin-agent", Some(ADMIN), None);
    assert_eq!((status, &body["source"]), (200, &json!("state")), "{body}");
}
