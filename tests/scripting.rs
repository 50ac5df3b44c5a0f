//! What scripts and CI rely on: exit codes, `--version`, `--json` documents that parse (apply,
//! plan, history, rollback, agent enroll, validate), and `validate --check` catching what only
//! HAProxy or the certificates themselves can tell.

mod support;

use std::path::Path;
use std::process::Command;
use support::*;

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Issue 16: clap exits 2 on a usage error, which `plan --detailed-exitcode` documents as
/// "changes pending" — a CI job would apply on a typo'd flag.
#[test]
fn a_usage_error_exits_1_never_2_even_with_detailed_exitcode() {
    let dir = tempfile::TempDir::new().unwrap();
    for args in [
        &["plan", "--detailed-exitcode", "--no-such-flag"][..],
        &["plan", "--detailed-exitcode", "--target"],
        &["--bogus"],
        &["no-such-command"],
        &["apply", "--parallel", "many"],
    ] {
        let (code, stdout, stderr) = run(args, dir.path());
        assert_eq!(code, 1, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    // Help and version are not errors.
    assert_eq!(run(&["plan", "--help"], dir.path()).0, 0);
    assert_eq!(run(&["--version"], dir.path()).0, 0);
}

#[test]
fn version_names_the_git_commit() {
    let dir = tempfile::TempDir::new().unwrap();
    let (code, stdout, _) = run(&["--version"], dir.path());
    assert_eq!(code, 0);
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(head.status.success(), "the tests run in a git checkout");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(
        stdout.trim(),
        format!("lunafront {} (commit {head})", env!("CARGO_PKG_VERSION"))
    );
}

/// From a source tarball (`git archive`, no .git), build.rs takes the commit that
/// `export-subst` wrote into packaging/commit.
#[test]
fn the_commit_is_known_in_a_source_tarball_without_git() {
    let work = tempfile::TempDir::new().unwrap();
    let repo = env!("CARGO_MANIFEST_DIR");
    let tree = work.path().join("src");
    std::fs::create_dir(&tree).unwrap();
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C {repo} archive --format=tar HEAD | tar -x -C {}",
            tree.display()
        ))
        .status()
        .unwrap();
    assert!(archive.success());
    assert!(!tree.join(".git").exists());
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo)
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(
        std::fs::read_to_string(tree.join("packaging/commit"))
            .unwrap()
            .trim(),
        head
    );
    // Compile the tarball's build script and run it there, as cargo would.
    let script = work.path().join("build-script");
    let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--edition", "2024", "-O", "-o"])
        .arg(&script)
        .arg(tree.join("build.rs"))
        .status()
        .unwrap();
    assert!(rustc.success());
    let out = Command::new(&script)
        .current_dir(&tree)
        .env_remove("LUNAFRONT_GIT_COMMIT")
        .env("GIT_CEILING_DIRECTORIES", work.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!(
            "cargo:rustc-env=LUNAFRONT_GIT_COMMIT={}",
            &head[..12]
        )),
        "{printed}"
    );
}

#[test]
fn json_documents_of_apply_plan_history_rollback_and_enroll_parse() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    let state = |weight: u16| {
        format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ address: 127.0.0.1, port: {}, weight: {weight} }}, {{ agent: a1, port: {} }} ] }}\ndomains:\n  shop.example.com: {{ backend: shop }}\n{}",
            shop.port,
            shop.port,
            site.target_block(true)
        )
    };
    site.write_state(&state(1));
    let (code, stdout, stderr) =
        site.lunafront(&["apply", "state.yaml", "--auto-approve", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc = json(&stdout);
    let t = &doc["targets"][0];
    assert_eq!(t["target"], "local");
    assert_eq!(t["result"], "applied");
    assert_eq!(t["how"], "start");
    assert!(t["worker"].as_u64().is_some(), "{doc}");
    assert_eq!(t["history_entry"], 1);
    assert!(t["plan"]["changes"].as_array().unwrap().len() >= 3);

    // The plan's JSON: values, not punctuation.
    site.write_state(&state(5));
    let (code, stdout, _) =
        site.lunafront(&["plan", "state.yaml", "--json", "--detailed-exitcode"]);
    assert_eq!(code, 2);
    let plan = json(&stdout);
    let change = &plan["changes"][0];
    assert_eq!(change["action"], "update", "{plan}");
    assert_eq!(change["kind"], "server");
    assert_eq!(
        change["name"],
        "shop/127.0.0.1:{port}".replace("{port}", &shop.port.to_string())
    );
    assert_eq!(change["before"], serde_json::json!({ "weight": 1 }));
    assert_eq!(change["after"], serde_json::json!({ "weight": 5 }));
    assert!(
        change.get("detail").is_none(),
        "no text view in JSON: {change}"
    );
    assert_eq!(change["mode"], "runtime");
    let (code, stdout, _) = site.lunafront(&["apply", "state.yaml", "--auto-approve", "--json"]);
    assert_eq!(code, 0);
    let doc = json(&stdout);
    assert_eq!(doc["targets"][0]["how"], "runtime");
    assert!(doc["targets"][0]["commands"].as_u64().unwrap() >= 1);
    // Nothing left to do: still one document.
    let (code, stdout, _) = site.lunafront(&["apply", "state.yaml", "--auto-approve", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json(&stdout)["targets"][0]["result"], "unchanged");

    let (code, stdout, _) = site.lunafront(&["history", "state.yaml", "--json"]);
    assert_eq!(code, 0);
    let history = json(&stdout);
    let entries = history["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{history}");
    assert_eq!(entries[0]["seq"], 2, "newest first");
    assert_eq!(entries[0]["how"], "runtime");

    let (code, stdout, stderr) =
        site.lunafront(&["rollback", "state.yaml", "--auto-approve", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let rollback = json(&stdout);
    assert_eq!(rollback["rollback_to"], 1);
    assert_eq!(rollback["result"], "applied", "{rollback}");
    assert_eq!(rollback["plan"]["changes"][0]["after"]["weight"], 1);

    let (code, stdout, _) = site.lunafront(&["agent", "enroll", "a1", "state.yaml", "--json"]);
    assert_eq!(code, 0);
    let token = json(&stdout);
    assert_eq!(token["agent"], "a1");
    assert!(
        token["token"].as_str().unwrap().starts_with("lfe_"),
        "{token}"
    );
    assert!(token["expires_at"].as_str().unwrap().ends_with('Z'));
    let (code, stdout, _) =
        site.lunafront(&["agent", "enroll", "not an id", "state.yaml", "--json"]);
    assert_eq!(code, 1);
    assert!(
        json(&stdout)["error"]
            .as_str()
            .unwrap()
            .contains("not an agent id")
    );

    // An invalid state: plan --json says why, as JSON.
    site.write_state(&state(1).replace("backend: shop }", "backend: shopp }"));
    let (code, stdout, _) = site.lunafront(&["plan", "state.yaml", "--json"]);
    assert_eq!(code, 1);
    let unknown = |doc: &serde_json::Value| {
        doc["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["code"] == "unknown-backend")
            .cloned()
            .unwrap_or_else(|| panic!("{doc}"))
    };
    let doc = json(&stdout);
    assert_eq!(doc["valid"], false);
    assert_eq!(unknown(&doc)["location"]["line"], 9);
    let (code, stdout, _) = site.lunafront(&["apply", "state.yaml", "--auto-approve", "--json"]);
    assert_eq!(code, 1);
    assert_eq!(unknown(&json(&stdout))["location"]["line"], 9);
}

/// A self-signed certificate for `name` valid from `from` to `until` (days from now), and
/// its key.
fn certificate(name: &str, from: i64, until: i64) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(from);
    params.not_after = now + time::Duration::days(until);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn certs_state(dir: &Path, files: &[(&str, String)]) {
    for (name, pem) in files {
        write(dir, &format!("certs/{name}"), pem);
    }
    write(
        dir,
        "state.yaml",
        "version: 1\nlisteners:\n  https: { bind: \"127.0.0.1:18443\", certificates: certs }\nbackends:\n  b: { servers: [ { address: 127.0.0.1, port: 9001 } ] }\ndomains:\n  good.example.com: { backend: b }\n",
    );
}

#[test]
fn validate_check_parses_certificates_matches_keys_and_warns_before_expiry() {
    let dir = tempfile::TempDir::new().unwrap();
    let (good, good_key) = certificate("good.example.com", -1, 365);
    let (soon, soon_key) = certificate("soon.example.com", -300, 10);
    let (old, old_key) = certificate("old.example.com", -400, -5);
    let (other, _) = certificate("other.example.com", -1, 365);
    certs_state(
        dir.path(),
        &[
            ("good.pem", format!("{good}{good_key}")),
            ("soon.pem", format!("{soon}{soon_key}")),
        ],
    );
    // Valid, with a warning for the one that expires in 10 days.
    let (code, stdout, stderr) = run(&["validate", "--check", "state.yaml"], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("certs/soon.pem:1:1: warning[certificate-expires-soon]")
            && (stderr.contains("(in 9 day(s))") || stderr.contains("(in 10 day(s))")),
        "{stderr}"
    );
    assert!(stdout.contains("HAProxy accepts its rendering"), "{stdout}");
    // Plain `validate` does not look inside the PEM files.
    let (code, _, stderr) = run(&["validate", "state.yaml"], dir.path());
    assert_eq!(code, 0);
    assert!(!stderr.contains("expires-soon"));

    // A key that belongs to another certificate, an expired certificate, one that does not parse.
    certs_state(
        dir.path(),
        &[
            ("mismatch.pem", format!("{other}{good_key}")),
            ("old.pem", format!("{old}{old_key}")),
            (
                "broken.pem",
                format!(
                    "-----BEGIN CERTIFICATE-----\nMIIBnotbase64atall\n-----END CERTIFICATE-----\n{good_key}"
                ),
            ),
        ],
    );
    let (code, stdout, stderr) = run(&["validate", "--check", "--json", "state.yaml"], dir.path());
    assert_eq!(code, 1, "{stderr}");
    let doc = json(&stdout);
    assert_eq!(doc["valid"], false);
    let found: Vec<(String, String, u64)> = doc["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["code"].as_str().unwrap().to_string(),
                d["location"]["file"]
                    .as_str()
                    .unwrap_or("")
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                d["location"]["line"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let key_line = other.lines().count() as u64 + 1;
    for expected in [
        (
            "certificate-key-mismatch".to_string(),
            "mismatch.pem".to_string(),
            key_line,
        ),
        ("certificate-expired".to_string(), "old.pem".to_string(), 1),
        (
            "certificate-invalid".to_string(),
            "broken.pem".to_string(),
            1,
        ),
    ] {
        assert!(found.contains(&expected), "{expected:?} in {found:?}");
    }
    // HAProxy's own check ran too, and refused the pair it cannot load.
    assert_eq!(doc["haproxy_check"], "failed", "{doc}");
}
