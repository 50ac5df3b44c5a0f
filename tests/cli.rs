//! The command line as users meet it: exit codes, diagnostics format, plan output (text and
//! JSON), colours, and what `render` writes. Each test runs the real binary in a temp folder.

mod support;

use serde_json::Value;
use std::path::Path;
use support::*;

const VALID: &str = "version: 1
listeners:
  http: { bind: \"127.0.0.1:8080\" }
agents:
  agent-7: { address: 203.0.113.7 }
backends:
  shop: { servers: [ { agent: agent-7, port: 9001 } ] }
domains:
  shop.apps.example.com: { backend: shop }
targets:
  local: { type: haproxy, config: live/haproxy.cfg, runtime_socket: /tmp/lunafront-cli-test.sock }
";

fn state(dir: &Path, text: &str) {
    write(dir, "state.yaml", text);
}

#[test]
fn validate_accepts_a_valid_state() {
    let dir = TempDir::new().unwrap();
    state(dir.path(), VALID);
    let (code, stdout, stderr) = run(&["validate", "state.yaml"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("The state is valid: 1 listener(s), 1 agent(s), 1 backend(s), 1 domain(s)"),
        "{stdout}"
    );
}

#[test]
fn validate_reports_every_problem_with_file_line_column_code_and_hint() {
    let dir = TempDir::new().unwrap();
    state(
        dir.path(),
        "version: 1
listeners:
  http: { bind: \"127.0.0.1:8080\" }
agents:
  agent-7: { address: not-an-ip }
backends:
  shop: { servers: [ { agent: agent-8, port: 70000 } ] }
domains:
  Shop.example.com: { backend: shop }
  blog.example.com: { backend: shpo }
",
    );
    let (code, stdout, stderr) = run(&["validate", "state.yaml"], dir.path());
    assert_eq!(code, 1, "{stdout}{stderr}");
    for expected in [
        "state.yaml:5:23: error[invalid-address]: agent `agent-7` address `not-an-ip` is not an IP address",
        "state.yaml:7:31: error[unknown-agent]: agent `agent-8` is not defined\n  hint: did you mean `agent-7`?",
        "state.yaml:7:46: error[port-range]:",
        "state.yaml:9:3: error[invalid-host]: domain `Shop.example.com` has uppercase letters\n  hint: write it in lowercase: `shop.example.com`",
        "state.yaml:10:32: error[unknown-backend]: backend `shpo` is not defined\n  hint: did you mean `shop`?",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("5 error(s)"), "{stderr}");
}

#[test]
fn validate_json_lists_diagnostics_with_positions() {
    let dir = TempDir::new().unwrap();
    state(
        dir.path(),
        "version: 1\ndomains:\n  a.example.com: { backend: missing }\n",
    );
    let (code, stdout, _) = run(&["validate", "state.yaml", "--json"], dir.path());
    assert_eq!(code, 1);
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["valid"], false);
    let d = &doc["diagnostics"][0];
    assert_eq!(d["severity"], "error");
    assert!(d["code"].is_string());
    assert_eq!(d["location"]["line"], 3);
    assert!(
        d["location"]["file"]
            .as_str()
            .unwrap()
            .ends_with("state.yaml")
    );
    assert!(d["hint"].is_string());
}

#[test]
fn a_directory_is_merged_and_a_name_defined_twice_names_both_files() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "state/base.yaml",
        "version: 1\nlisteners:\n  http: { bind: \":8080\" }\nagents:\n  a: { address: 10.0.0.1 }\n",
    );
    write(
        dir.path(),
        "state/apps/one.yaml",
        "backends:\n  shop: { servers: [ { agent: a, port: 1 } ] }\ndomains:\n  shop.example.com: { backend: shop }\n",
    );
    let (code, _, stderr) = run(&["validate", "state"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    write(
        dir.path(),
        "state/apps/two.yaml",
        "\ndomains:\n  shop.example.com: { backend: shop }\n",
    );
    let (code, _, stderr) = run(&["validate", "state"], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "two.yaml:3:3: error[duplicate-key]: domain `shop.example.com` is defined twice"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: state/apps/one.yaml:4:3: first defined here"),
        "{stderr}"
    );
}

#[test]
fn a_missing_state_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let (code, _, stderr) = run(&["validate", "nothing-here.yaml"], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read the state at nothing-here.yaml"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["validate"], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("no state files"), "{stderr}");
}

#[test]
fn schema_prints_the_json_schema() {
    let dir = TempDir::new().unwrap();
    let (code, stdout, _) = run(&["schema"], dir.path());
    assert_eq!(code, 0);
    let schema: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    for section in ["listeners", "agents", "backends", "domains", "targets"] {
        assert!(schema["properties"][section].is_object(), "{section}");
    }
}

#[test]
fn plan_shows_changes_then_nothing_once_rendered() {
    let dir = TempDir::new().unwrap();
    state(dir.path(), VALID);
    let (code, stdout, stderr) = run(&["plan", "state.yaml"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("+ domain shop.apps.example.com → shop"),
        "{stdout}"
    );
    assert!(stdout.contains("+ agent agent-7"), "{stdout}");
    assert!(stdout.contains("A reload is needed"), "{stdout}");
    assert!(
        stdout.contains("--- /dev/null\n+++ b/haproxy.cfg (new)"),
        "{stdout}"
    );
    let (code, _, _) = run(&["plan", "state.yaml", "--detailed-exitcode"], dir.path());
    assert_eq!(code, 2);

    // `render` into the target's folder: the target now matches.
    let (code, _, stderr) = run(&["render", "state.yaml", "--out", "live"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, _) = run(&["plan", "state.yaml", "--detailed-exitcode"], dir.path());
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("No changes"), "{stdout}");

    // One more app on the known agent: runtime only, and the diff shows the map line.
    state(
        dir.path(),
        &VALID
            .replace("domains:\n", "  blog: { servers: [ { agent: agent-7, port: 9002 } ] }\ndomains:\n  blog.apps.example.com: { backend: blog }\n"),
    );
    let (code, stdout, _) = run(&["plan", "state.yaml", "--detailed-exitcode"], dir.path());
    assert_eq!(code, 2);
    assert!(stdout.contains("+ backend blog: agent-7:9002"), "{stdout}");
    assert!(
        stdout.contains("No reload: every change goes through HAProxy's runtime API."),
        "{stdout}"
    );
    // shop holds slot 1; blog takes slot 2, a spare.
    assert!(
        stdout.contains("+blog.apps.example.com slot:http:2"),
        "{stdout}"
    );
}

#[test]
fn plan_json_has_the_documented_shape() {
    let dir = TempDir::new().unwrap();
    state(dir.path(), VALID);
    let (code, stdout, _) = run(&["plan", "state.yaml", "--json"], dir.path());
    assert_eq!(code, 0);
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["format_version"], "1");
    assert_eq!(plan["reload_required"], true);
    let changes = plan["changes"].as_array().unwrap();
    assert!(!changes.is_empty());
    for c in changes {
        assert!(
            ["create", "update", "delete"].contains(&c["action"].as_str().unwrap()),
            "{c}"
        );
        assert!(
            [
                "domain",
                "backend",
                "server",
                "agent",
                "listener",
                "global",
                "certificate"
            ]
            .contains(&c["kind"].as_str().unwrap()),
            "{c}"
        );
        assert!(
            ["runtime", "reload"].contains(&c["mode"].as_str().unwrap()),
            "{c}"
        );
        assert!(c["name"].is_string() && c["reason"].is_string(), "{c}");
    }
    let domain = changes.iter().find(|c| c["kind"] == "domain").unwrap();
    assert_eq!(domain["name"], "shop.apps.example.com");
    assert_eq!(domain["mode"], "runtime");
}

#[test]
fn colour_only_on_request_or_terminal() {
    let dir = TempDir::new().unwrap();
    state(dir.path(), VALID);
    let (_, plain, _) = run(&["plan", "state.yaml"], dir.path());
    assert!(!plain.contains('\x1b'), "piped output must be plain");
    let (_, coloured, _) = run(&["--color", "always", "plan", "state.yaml"], dir.path());
    assert!(coloured.contains("\x1b[32m+ domain"), "{coloured}");
    let out = lunafront()
        .args(["--color", "auto", "plan", "state.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains('\x1b'));
}

#[test]
fn plan_needs_a_target_when_there_are_several() {
    let dir = TempDir::new().unwrap();
    state(
        dir.path(),
        &format!("{VALID}  other: {{ type: haproxy, config: other/haproxy.cfg }}\n"),
    );
    let (code, _, stderr) = run(&["plan", "state.yaml"], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("several targets (local, other); choose one with --target"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["plan", "state.yaml", "--target", "nope"], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("no target named `nope`"), "{stderr}");
    let (code, _, _) = run(&["plan", "state.yaml", "--target", "other"], dir.path());
    assert_eq!(code, 0);
}

#[test]
fn plan_reports_hand_edits_on_the_target() {
    let dir = TempDir::new().unwrap();
    state(dir.path(), VALID);
    assert_eq!(
        run(&["render", "state.yaml", "--out", "live"], dir.path()).0,
        0
    );
    let map = dir.path().join("live/maps/hosts.map");
    let mut text = std::fs::read_to_string(&map).unwrap();
    text.push_str("evil.example.com shop\n");
    std::fs::write(&map, text).unwrap();
    let (code, stdout, _) = run(&["plan", "state.yaml", "--detailed-exitcode"], dir.path());
    assert_eq!(code, 2);
    assert!(
        stdout.contains(
            "~ global maps/hosts.map: changed outside lunafront since the last apply (put back)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("-evil.example.com shop"), "{stdout}");
}

#[test]
fn plan_never_shows_private_keys() {
    let dir = TempDir::new().unwrap();
    let ca = TestCa::new();
    let leaf = ca.leaf(&["shop.apps.example.com"]);
    write(dir.path(), "certs/shop.pem", &leaf.combined());
    state(
        dir.path(),
        &VALID.replace(
            "  http: { bind: \"127.0.0.1:8080\" }",
            "  https: { bind: \"127.0.0.1:8443\", certificates: certs }",
        ),
    );
    let (code, stdout, stderr) = run(&["plan", "state.yaml"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("b/certs/https.shop.pem (new)"), "{stdout}");
    assert!(
        stdout.contains("(private key material new; content not shown)"),
        "{stdout}"
    );
    assert!(!stdout.contains("PRIVATE KEY"), "{stdout}");
    let (_, json, _) = run(&["plan", "state.yaml", "--json"], dir.path());
    assert!(!json.contains("PRIVATE KEY"));
}

#[test]
fn render_removes_what_it_no_longer_produces_and_writes_nothing_when_invalid() {
    let dir = TempDir::new().unwrap();
    state(
        dir.path(),
        &VALID.replace(
            "listeners:\n",
            "listeners:\n  alt: { bind: \"127.0.0.1:8081\", tls: passthrough }\n",
        ),
    );
    assert_eq!(
        run(&["render", "state.yaml", "--out", "out"], dir.path()).0,
        0
    );
    assert!(dir.path().join("out/maps/listener-alt.map").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("out/haproxy.cfg"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o640);
    state(dir.path(), VALID);
    assert_eq!(
        run(&["render", "state.yaml", "--out", "out"], dir.path()).0,
        0
    );
    assert!(
        !dir.path().join("out/maps/listener-alt.map").exists(),
        "stale map left behind"
    );

    let before = std::fs::read(dir.path().join("out/haproxy.cfg")).unwrap();
    state(dir.path(), &VALID.replace("203.0.113.7", "203.0.113.999"));
    let (code, _, stderr) = run(&["render", "state.yaml", "--out", "out"], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(
        std::fs::read(dir.path().join("out/haproxy.cfg")).unwrap(),
        before
    );
}

#[test]
fn fleet_settings_are_checked_against_the_state() {
    let dir = TempDir::new().unwrap();
    state(
        dir.path(),
        "version: 1
listeners:
  http: { bind: \"127.0.0.1:8080\" }
  alt:  { bind: \"127.0.0.1:8081\" }
agents:
  agent-7: { address: 203.0.113.7 }
backends:
  shop: { servers: [ { agent: agent-7, port: 9001 } ] }
domains:
  shop.apps.example.com: { backend: shop }
targets:
  edge-1: { type: haproxy, config: e1/haproxy.cfg, binds: { htpp: \"10.0.0.5:80\" } }
  edge-2: { type: haproxy, config: e2/haproxy.cfg, binds: { http: \"10.0.0.6\" } }
  edge-3: { type: haproxy, config: e3/haproxy.cfg, binds: { http: \"127.0.0.1:8081\" } }
groups:
  edge: [ edge-1, edge-4 ]
",
    );
    let (code, stdout, stderr) = run(&["validate", "state.yaml"], dir.path());
    assert_eq!(code, 1, "{stdout}{stderr}");
    for expected in [
        "state.yaml:12:61: error[unknown-listener]: listener `htpp` is not defined\n  hint: did you mean `http`?",
        "error[invalid-bind]: target `edge-2` bind `10.0.0.6` for listener `http`",
        "error[bind-conflict]: on target `edge-3`, listeners `alt` and `http` would both bind 127.0.0.1:8081",
        "edge-4",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}
