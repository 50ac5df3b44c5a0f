//! `type: dataplane` targets against the Data Plane API test server (tests/support/dpapi.rs),
//! which runs a real HAProxy: plan and apply through the API, map-only changes at runtime,
//! version conflicts, server errors, timeouts, a failing reload, stale saved plans, and a
//! password that never shows. Every request and answer of every test is checked against the
//! API's specification when its server is dropped.

mod support;

use base64::Engine;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::dpapi::{DataplaneApi, Exchange, Faults, spec};
use support::*;

const PASSWORD: &str = "Dp-s3cret-7f2a91c4";

/// Every form the password takes on its way to the API: itself, `user:password` in base64,
/// and the Authorization header that carries it. None may appear in any output.
fn secrets(password: &str) -> Vec<String> {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("admin:{password}"));
    vec![
        password.to_string(),
        basic.clone(),
        format!("Basic {basic}"),
        format!("Authorization: Basic {basic}"),
    ]
}

/// Fails when `text` (named `what`) holds the password in any form, or an Authorization
/// header at all.
fn assert_no_secret(text: &str, what: &str, password: &str) {
    for secret in secrets(password) {
        assert!(!text.contains(&secret), "{what} holds {secret:?}:\n{text}");
    }
    assert!(
        !text.to_ascii_lowercase().contains("authorization: basic"),
        "{what} holds an Authorization header:\n{text}"
    );
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                // Regular files: HAProxy's sockets live there too.
                out.push(path);
            }
        }
    }
    out
}

/// A front server managed through its Data Plane API, with backends and a state folder.
struct Edge {
    work: TempDir,
    _api_dir: TempDir,
    api: DataplaneApi,
    /// The HTTP listener lunafront's configuration binds.
    port: u16,
    /// The target's per-request timeout.
    timeout: &'static str,
    shop: Server,
    blog: Server,
}

impl Edge {
    fn new(timeout: &'static str) -> Edge {
        let api_dir = TempDir::new().unwrap();
        let port = free_port();
        let api = DataplaneApi::start(api_dir.path(), PASSWORD, port);
        Edge {
            work: TempDir::new().unwrap(),
            _api_dir: api_dir,
            api,
            port,
            timeout,
            shop: http_backend("shop"),
            blog: http_backend("blog"),
        }
    }

    /// Started, with shop.example.com applied.
    fn with_shop(timeout: &'static str) -> Edge {
        let edge = Edge::new(timeout);
        edge.write(&[("shop.example.com", "shop")], "");
        edge.apply();
        edge
    }

    /// Writes the state: `routes` as (host, backend), `extra_listeners` YAML lines.
    fn write(&self, routes: &[(&str, &str)], extra_listeners: &str) {
        let mut s = format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\n{extra_listeners}agents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\n  blog: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n",
            self.port, self.shop.port, self.blog.port
        );
        for (host, backend) in routes {
            s.push_str(&format!("  {host}: {{ backend: {backend} }}\n"));
        }
        s.push_str("targets:\n");
        s.push_str(&dataplane_target("edge", &self.api, self.timeout));
        std::fs::write(self.work.path().join("state.yaml"), s).unwrap();
    }

    fn lunafront(&self, args: &[&str]) -> (i32, String, String) {
        lunafront_with_password(self.work.path(), args)
    }

    fn apply(&self) -> String {
        let (code, stdout, stderr) = self.lunafront(&["apply", "state.yaml", "--auto-approve"]);
        assert_eq!(code, 0, "apply failed:\n{stdout}\n{stderr}");
        stdout
    }

    fn plan_is_empty(&self) -> bool {
        let (code, stdout, stderr) = self.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
        assert!(code == 0 || code == 2, "plan failed:\n{stdout}\n{stderr}");
        code == 0
    }

    fn serves(&self, host: &str, backend: &str) -> bool {
        http_get(self.port, host, "/")
            .map(|(_, body)| body.starts_with(&format!("backend={backend} ")))
            .unwrap_or(false)
    }

    /// The configuration the API holds, without its version line.
    fn config(&self) -> String {
        lunafront::target::dataplane::client::strip_version(&self.api.config_file())
    }

    fn worker_pid(&self) -> u32 {
        self.api.runtime().worker_pid().unwrap()
    }

    fn pushes(&self) -> Vec<String> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.starts_with("POST /v3/services/haproxy/configuration/raw"))
            .collect()
    }
}

fn dataplane_target(name: &str, api: &DataplaneApi, timeout: &str) -> String {
    format!(
        "  {name}: {{ type: dataplane, url: \"{}\", username: admin, password_env: DPAPI_PASSWORD, timeout: {timeout}, maps_dir: {d}/maps, runtime_socket: {d}/admin.sock, state_dir: {d}/lunafront }}\n",
        api.url(),
        d = api.dir.display()
    )
}

/// Runs lunafront with the API's password in its environment, and debug logging (so the test
/// that looks for the password looks at everything lunafront can print).
fn lunafront_with_password(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = lunafront()
        .args(args)
        .current_dir(dir)
        .env("DPAPI_PASSWORD", PASSWORD)
        .env("LUNAFRONT_LOG", "debug")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_no_secret(&stdout, "stdout", PASSWORD);
    assert_no_secret(&stderr, "stderr (debug level)", PASSWORD);
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn plan_and_apply_through_the_api_with_map_changes_at_runtime() {
    let edge = Edge::new("5s");
    edge.write(&[("shop.example.com", "shop")], "");
    let (code, stdout, stderr) = edge.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stdout.contains("shop.example.com"), "{stdout}");
    assert!(!edge.serves("shop.example.com", "shop"));

    let out = edge.apply();
    assert!(out.contains("through its Data Plane API"), "{out}");
    assert!(edge.serves("shop.example.com", "shop"));
    let pushes = edge.pushes();
    assert_eq!(pushes.len(), 2, "{pushes:?}");
    assert!(
        pushes[0].contains("only_validate=true"),
        "validated first: {pushes:?}"
    );
    assert!(!pushes[1].contains("only_validate"), "{pushes:?}");
    assert!(
        edge.api
            .requests()
            .iter()
            .all(|r| !r.contains("skip_version")),
        "skip_version was used"
    );
    // The API wrote its `# _version=N` line: the plan ignores it.
    assert!(edge.api.config_file().starts_with("# _version="));
    assert!(
        edge.plan_is_empty(),
        "a plan right after the apply is not empty"
    );
    assert_eq!(edge.api.reload_statuses(), vec!["succeeded"]);

    // A new domain changes maps only: runtime endpoints, same worker, no reload.
    let (pid, reloads) = (edge.worker_pid(), edge.api.reload_statuses().len());
    edge.api.clear_requests();
    edge.write(
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        "",
    );
    let out = edge.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert!(edge.serves("blog.example.com", "blog"));
    assert!(edge.serves("shop.example.com", "shop"));
    assert_eq!(edge.worker_pid(), pid, "HAProxy was reloaded");
    assert_eq!(edge.api.reload_statuses().len(), reloads);
    assert!(edge.pushes().is_empty(), "{:?}", edge.api.requests());
    assert!(
        edge.api
            .requests()
            .iter()
            .any(|r| r.starts_with("POST /v3/services/haproxy/runtime/maps/")),
        "{:?}",
        edge.api.requests()
    );
    assert!(edge.plan_is_empty());

    // Moving a domain to another backend: still the runtime map, entry replaced.
    edge.write(
        &[("shop.example.com", "blog"), ("blog.example.com", "blog")],
        "",
    );
    assert!(edge.apply().contains("through the runtime API"));
    assert!(edge.serves("shop.example.com", "blog"));
    assert_eq!(edge.worker_pid(), pid);

    // A new listener changes the configuration: pushed whole, reloaded. This API answers 201
    // once reloaded, with no reload to wait on.
    edge.api.set_faults(Faults {
        answer_201: true,
        ..Faults::default()
    });
    let second = free_port();
    edge.write(
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        &format!("  alt: {{ bind: \"127.0.0.1:{second}\" }}\n"),
    );
    assert!(edge.apply().contains("HAProxy reloaded"));
    assert!(wait_for_port(second, Duration::from_secs(5)));
    assert_ne!(edge.worker_pid(), pid);
    assert!(edge.serves("shop.example.com", "shop"));
    assert!(edge.plan_is_empty());

    // The history is kept on this machine, and a rollback goes through the API too.
    let (code, stdout, _) = edge.lunafront(&["history", "state.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    let (code, stdout, stderr) =
        edge.lunafront(&["rollback", "state.yaml", "--steps", "1", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(edge.serves("shop.example.com", "blog"));
    assert!(stdout.contains("through its Data Plane API"), "{stdout}");

    // A domain pinned to a listener gets a map of its own, removed with its last domain; a
    // removed domain is deleted from HAProxy's map at runtime.
    let alt = format!("  alt: {{ bind: \"127.0.0.1:{second}\" }}\n");
    edge.write(
        &[
            ("shop.example.com", "shop"),
            ("blog.example.com", "blog"),
            ("pinned.example.com", "blog, listener: alt"),
        ],
        &alt,
    );
    edge.apply();
    assert!(edge.api.dir.join("maps/listener-alt.map").exists());
    edge.write(
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        &alt,
    );
    edge.apply();
    assert!(!edge.api.dir.join("maps/listener-alt.map").exists());
    edge.write(&[("shop.example.com", "shop")], &alt);
    assert!(edge.apply().contains("through the runtime API"));
    assert_eq!(http_get(edge.port, "blog.example.com", "/").unwrap().0, 404);

    // Every operation lunafront's client uses was called, and checked against the
    // specification (when the server is dropped).
    let called: std::collections::BTreeSet<String> = edge
        .api
        .exchanges()
        .iter()
        .filter_map(spec::operation_id)
        .collect();
    for operation in [
        "getHAProxyConfiguration",
        "postHAProxyConfiguration",
        "getReload",
        "getOneStorageMap",
        "createStorageMapFile",
        "replaceStorageMapFile",
        "deleteStorageMap",
        "getOneStorageGeneralFile",
        "createStorageGeneralFile",
        "replaceStorageGeneralFile",
        "showRuntimeMap",
        "addMapEntry",
        "replaceRuntimeMapEntry",
        "deleteRuntimeMapEntry",
    ] {
        assert!(
            called.contains(operation),
            "{operation} never called: {called:?}"
        );
    }
}

#[test]
fn version_conflicts_are_retried_a_bounded_number_of_times() {
    let edge = Edge::with_shop("5s");
    let before = edge.config();

    // Two conflicting writes: lunafront reads again, retries, and says so.
    let second = free_port();
    edge.write(
        &[("shop.example.com", "shop")],
        &format!("  alt: {{ bind: \"127.0.0.1:{second}\" }}\n"),
    );
    edge.api.set_faults(Faults {
        conflicts: 2,
        ..Faults::default()
    });
    let out = edge.apply();
    assert_eq!(out.matches("(409, attempt").count(), 2, "{out}");
    assert!(wait_for_port(second, Duration::from_secs(5)));
    assert!(edge.plan_is_empty());
    assert!(edge.serves("shop.example.com", "shop"));

    // A storm of them: three attempts, then a clear error, and the target keeps what it had.
    let settled = edge.config();
    assert_ne!(settled, before);
    edge.write(
        &[("shop.example.com", "blog")],
        &format!(
            "  alt: {{ bind: \"127.0.0.1:{second}\" }}\n  third: {{ bind: \"127.0.0.1:{}\" }}\n",
            free_port()
        ),
    );
    edge.api.clear_requests();
    edge.api.set_faults(Faults {
        conflicts: 100,
        ..Faults::default()
    });
    let (code, stdout, stderr) = edge.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("target edge"), "{stderr}");
    assert!(
        stderr.contains("3 version conflicts (409) in a row"),
        "{stderr}"
    );
    let real: Vec<String> = edge
        .pushes()
        .into_iter()
        .filter(|p| !p.contains("only_validate"))
        .collect();
    assert_eq!(real.len(), 3, "{real:?}");
    assert_eq!(edge.api.faults().conflicts, 97);
    assert_eq!(edge.config(), settled, "the configuration changed");
    assert!(edge.serves("shop.example.com", "shop"));
}

#[test]
fn server_errors_timeouts_and_bad_answers_are_clear_errors_that_change_nothing() {
    let edge = Edge::with_shop("1s");
    let before = edge.config();
    let second = free_port();
    edge.write(
        &[("shop.example.com", "shop")],
        &format!("  alt: {{ bind: \"127.0.0.1:{second}\" }}\n"),
    );

    // A couple of 500s on reads: retried with backoff, the plan goes through.
    edge.api.set_faults(Faults {
        errors: 2,
        ..Faults::default()
    });
    let (code, stdout, stderr) = edge.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert_eq!(edge.api.faults().errors, 0);

    // 500s that do not stop: the error names the target, the step and the answer.
    edge.api.set_faults(Faults {
        errors: 1000,
        ..Faults::default()
    });
    let (code, _, stderr) = edge.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("target edge: reading the configuration: the Data Plane API answered 500"),
        "{stderr}"
    );
    assert_eq!(
        1000 - edge.api.faults().errors,
        3,
        "reads are tried 3 times"
    );

    // Too slow: the timeout applies to each request. (The answers wait until the faults
    // change, far beyond the 1s timeout: no race between the two.)
    edge.api.set_faults(Faults {
        delay: Some(Duration::from_secs(300)),
        ..Faults::default()
    });
    let (code, _, stderr) = edge.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("target edge: reading the configuration:"),
        "{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("timeout") || stderr.contains("timed out"),
        "{stderr}"
    );

    // An answer without its version.
    edge.api.set_faults(Faults {
        malformed: 10,
        ..Faults::default()
    });
    let (code, _, stderr) = edge.lunafront(&["plan", "state.yaml"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no Configuration-Version header"),
        "{stderr}"
    );

    // A push answered 500: whatever it left, the previous configuration is what HAProxy runs.
    edge.api.set_faults(Faults {
        push_errors: 1,
        ..Faults::default()
    });
    let (code, _, stderr) = edge.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("target edge: pushing the configuration: the Data Plane API answered 500"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the previous configuration was put back"),
        "{stderr}"
    );

    // Nothing answers at all.
    edge.api.set_faults(Faults::default());
    let closed = free_port();
    std::fs::write(
        edge.work.path().join("state.yaml"),
        std::fs::read_to_string(edge.work.path().join("state.yaml"))
            .unwrap()
            .replace(&edge.api.url(), &format!("http://127.0.0.1:{closed}")),
    )
    .unwrap();
    let (code, _, stderr) = edge.lunafront(&["plan", "state.yaml"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("target edge: reading the configuration:"),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");

    assert_eq!(
        edge.config(),
        before,
        "a failed apply changed the configuration"
    );
    assert!(edge.serves("shop.example.com", "shop"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", second)).is_err(),
        "the listener of a failed apply is open"
    );
}

#[test]
fn a_failed_reload_puts_the_previous_configuration_back() {
    let edge = Edge::with_shop("5s");
    let before = edge.config();
    // `haproxy -c` does not bind: a port already taken passes validation and fails the reload.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    edge.write(
        &[("shop.example.com", "blog")],
        &format!("  busy: {{ bind: \"127.0.0.1:{taken_port}\" }}\n"),
    );
    let (code, stdout, stderr) = edge.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.contains("target edge"), "{stderr}");
    assert!(stderr.contains("the reload failed"), "{stderr}");
    assert!(
        stderr.contains("the previous configuration was put back"),
        "{stderr}"
    );
    assert_eq!(edge.config(), before);
    assert_eq!(
        edge.api.reload_statuses(),
        vec!["succeeded", "failed", "succeeded"]
    );
    assert!(edge.serves("shop.example.com", "shop"));
    drop(taken);
}

#[test]
fn a_saved_plan_is_refused_once_the_version_moved() {
    let edge = Edge::with_shop("5s");
    edge.write(
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        "",
    );
    let (code, _, stderr) = edge.lunafront(&["plan", "state.yaml", "--out", "reviewed.plan"]);
    assert_eq!(code, 0, "{stderr}");
    let saved = std::fs::read_to_string(edge.work.path().join("reviewed.plan")).unwrap();
    assert!(!saved.contains(PASSWORD));

    // Someone else changes the configuration through the API: the version moves on.
    edge.api.hand_edit("changed by hand");
    let edited = edge.config();
    let (code, _, stderr) = edge.lunafront(&["apply", "--plan", "reviewed.plan", "--auto-approve"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("the plan is stale"), "{stderr}");
    assert_eq!(edge.config(), edited);
    assert!(!edge.serves("blog.example.com", "blog"));

    // Planned again, it applies as reviewed.
    let (code, _, stderr) = edge.lunafront(&["plan", "state.yaml", "--out", "reviewed.plan"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) =
        edge.lunafront(&["apply", "--plan", "reviewed.plan", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(edge.serves("blog.example.com", "blog"));
    assert!(!edge.config().contains("changed by hand"));
}

#[test]
fn the_password_never_shows_and_a_wrong_one_is_a_clear_error() {
    // Every run goes through `lunafront_with_password` (debug logging), which fails on the
    // password in any form in stdout or stderr; these runs cover a plan, its JSON, a saved
    // plan, an apply at runtime, one with a reload, one that fails and is rolled back, the
    // history, a rollback, and read errors.
    let edge = Edge::with_shop("5s");
    edge.write(
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        "",
    );
    assert_eq!(edge.lunafront(&["plan", "state.yaml", "--json"]).0, 0);
    assert_eq!(
        edge.lunafront(&["plan", "state.yaml", "--out", "p.plan"]).0,
        0
    );
    assert!(edge.apply().contains("through the runtime API"));
    edge.write(
        &[("shop.example.com", "shop")],
        &format!("  alt: {{ bind: \"127.0.0.1:{}\" }}\n", free_port()),
    );
    assert!(edge.apply().contains("HAProxy reloaded"));
    edge.api.set_faults(Faults {
        push_errors: 1,
        ..Faults::default()
    });
    edge.write(
        &[("shop.example.com", "blog")],
        &format!("  alt2: {{ bind: \"127.0.0.1:{}\" }}\n", free_port()),
    );
    let (code, _, stderr) = edge.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 3, "{stderr}");
    edge.api.set_faults(Faults {
        errors: 1000,
        ..Faults::default()
    });
    let (code, _, stderr) = edge.lunafront(&["plan", "state.yaml", "--json"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("answered 500"), "{stderr}");
    edge.api.set_faults(Faults::default());
    assert_eq!(edge.lunafront(&["history", "state.yaml"]).0, 0);
    let (code, stdout, stderr) =
        edge.lunafront(&["rollback", "state.yaml", "--steps", "1", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // Every file lunafront wrote: the saved plan, the history, and what it stored on the target.
    let mut files = files_under(edge.work.path());
    files.extend(files_under(&edge.api.dir));
    let history = files_under(&edge.api.dir.join("lunafront/history"));
    assert!(history.len() > 6, "{history:?}");
    for file in &files {
        let text = String::from_utf8_lossy(&std::fs::read(file).unwrap()).into_owned();
        assert_no_secret(&text, &file.display().to_string(), PASSWORD);
    }

    // A wrong password: the API's 401, named, without the password in any form.
    let wrong = "wrong-password-123";
    let out = lunafront()
        .args(["plan", "state.yaml"])
        .current_dir(edge.work.path())
        .env("DPAPI_PASSWORD", wrong)
        .env("LUNAFRONT_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("target edge: reading the configuration: the Data Plane API answered 401"),
        "{stderr}"
    );
    assert_no_secret(&stderr, "stderr", wrong);
    assert_no_secret(&String::from_utf8_lossy(&out.stdout), "stdout", wrong);

    // No password at all: the variable is named.
    let out = lunafront()
        .args(["plan", "state.yaml"])
        .current_dir(edge.work.path())
        .env_remove("DPAPI_PASSWORD")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("DPAPI_PASSWORD"), "{stderr}");
}

#[test]
fn a_password_file_is_read_and_never_shown() {
    let edge = Edge::new("5s");
    // As an operator writes it: 0600, with a trailing newline that is not part of it.
    let secret = edge.work.path().join("dpapi.password");
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let with_file = |file: &Path| {
        edge.write(&[("shop.example.com", "shop")], "");
        let path = edge.work.path().join("state.yaml");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "password_env: DPAPI_PASSWORD",
            &format!("password_file: {}", file.display()),
        );
        assert!(text.contains("password_file"));
        std::fs::write(path, text).unwrap();
    };
    with_file(&secret);
    // Without the variable in the environment: the file is the only source.
    let run = |args: &[&str]| {
        let out = lunafront()
            .args(args)
            .current_dir(edge.work.path())
            .env_remove("DPAPI_PASSWORD")
            .env("LUNAFRONT_LOG", "debug")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_no_secret(&stdout, "stdout", PASSWORD);
        assert_no_secret(&stderr, "stderr (debug level)", PASSWORD);
        (out.status.code().unwrap_or(-1), stdout, stderr)
    };
    let (code, stdout, stderr) = run(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    let (code, stdout, stderr) = run(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(edge.serves("shop.example.com", "shop"));
    assert_eq!(run(&["history", "state.yaml"]).0, 0);
    for file in files_under(&edge.api.dir).into_iter().chain(
        files_under(edge.work.path())
            .into_iter()
            .filter(|f| *f != secret),
    ) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        assert_no_secret(&text, &file.display().to_string(), PASSWORD);
    }

    // A file that is not there: named, nothing else said.
    let missing = edge.work.path().join("nowhere/dpapi.password");
    with_file(&missing);
    let (code, _, stderr) = run(&["plan", "state.yaml"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!(
            "target edge: cannot read its password file {}",
            missing.display()
        )),
        "{stderr}"
    );
    // A file with a wrong password: the API's 401, and neither password shown.
    let wrong = edge.work.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password-42\n").unwrap();
    with_file(&wrong);
    let (code, _, stderr) = run(&["plan", "state.yaml"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("answered 401"), "{stderr}");
    assert_no_secret(&stderr, "stderr", "not-the-password-42");
}

/// The specification check is no rubber stamp: exchanges the specification does not allow
/// are each reported, and a correct one is not.
#[test]
fn the_specification_check_refuses_what_the_api_does_not_allow() {
    let exchange = |method: &str, path: &str, query: &[(&str, &str)], status: u16| Exchange {
        method: method.into(),
        path: path.into(),
        query: query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        content_type: None,
        body: Vec::new(),
        status,
        headers: Vec::new(),
        response: Vec::new(),
    };
    let raw = "/v3/services/haproxy/configuration/raw";
    let mut push = exchange("POST", raw, &[("version", "3")], 202);
    push.content_type = Some("text/plain".into());
    push.body = b"global\n".to_vec();
    push.headers = vec![
        ("Configuration-Version".into(), "4".into()),
        ("Reload-Id".into(), "2026-11-28-1".into()),
    ];
    assert_eq!(spec::check(&push), Vec::<String>::new());
    let reload = |status: &str| {
        let mut e = exchange("GET", "/v3/services/haproxy/reloads/2026-11-28-1", &[], 200);
        e.headers = vec![("Content-Type".into(), "application/json".into())];
        e.response = format!("{{\"id\": \"2026-11-28-1\", \"status\": \"{status}\"}}").into_bytes();
        e
    };
    assert_eq!(spec::check(&reload("succeeded")), Vec::<String>::new());

    let mut cases: Vec<(&str, Exchange)> = vec![
        (
            "no such path",
            exchange("GET", "/v3/services/haproxy/nope", &[], 200),
        ),
        ("has no DELETE operation", exchange("DELETE", raw, &[], 204)),
        ("not a parameter of this operation", {
            let mut e = push.clone();
            e.query.push(("dry_run".into(), "true".into()));
            e
        }),
        ("query parameter version", {
            let mut e = push.clone();
            e.query = vec![("version".into(), "latest".into())];
            e
        }),
        ("query parameter only_validate", {
            let mut e = push.clone();
            e.query.push(("only_validate".into(), "yes".into()));
            e
        }),
        (
            "path parameter id",
            exchange("GET", "/v3/services/haproxy/reloads/42", &[], 200),
        ),
        ("does not declare", {
            let mut e = push.clone();
            e.status = 200;
            e
        }),
        ("header x-reload", {
            let mut e = push.clone();
            e.headers.push(("X-Reload".into(), "1".into()));
            e
        }),
        ("required parameter data is missing", {
            let mut e = push.clone();
            e.body.clear();
            e
        }),
        ("body sent as", {
            let mut e = push.clone();
            e.content_type = Some("application/json".into());
            e
        }),
        ("answer 200", reload("done")),
    ];
    let mut form = exchange("POST", "/v3/services/haproxy/storage/maps", &[], 201);
    form.content_type = Some("multipart/form-data; boundary=b".into());
    form.body = b"--b\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"x.map\"\r\n\r\nx\r\n--b--\r\n".to_vec();
    cases.push(("form field upload is not declared", form));
    for (expected, case) in cases {
        let problems = spec::check(&case);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected}: {problems:?}"
        );
    }
}

#[test]
fn certificates_go_to_the_ssl_storage_and_change_at_runtime() {
    let edge = Edge::new("5s");
    let ca = TestCa::new();
    let https = free_port();
    let leaf = ca.leaf(&["shop.example.com"]);
    write(edge.work.path(), "certs/shop.pem", &leaf.combined());
    let write_state = || {
        edge.write(
            &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
            &format!("  https: {{ bind: \"127.0.0.1:{https}\", certificates: certs }}\n"),
        );
        // The API's SSL storage folder on the HAProxy host.
        let path = edge.work.path().join("state.yaml");
        let state = std::fs::read_to_string(&path).unwrap().replace(
            "runtime_socket:",
            &format!("certs_dir: {}/ssl, runtime_socket:", edge.api.dir.display()),
        );
        std::fs::write(path, state).unwrap();
    };
    write_state();

    // The first certificate: the configuration changes (the bind line), pushed with a reload.
    edge.apply();
    assert_eq!(
        served_certificate(&ca, https, "shop.example.com").unwrap(),
        leaf.der()
    );
    assert_eq!(
        https_get(&ca, https, "shop.example.com", "shop.example.com", "/")
            .unwrap()
            .1,
        "backend=shop host=shop.example.com path=/\n"
    );
    for file in ["ssl/https.shop.pem", "ssl/https.crt-list"] {
        assert!(edge.api.dir.join(file).exists(), "{file}");
    }
    // The API never gives a certificate back; its fingerprint and the recorded apply say the
    // target holds it.
    assert!(
        edge.plan_is_empty(),
        "a plan right after the apply is not empty"
    );

    // Renewed: replaced at runtime, no reload.
    let worker = edge.worker_pid();
    let renewed = ca.leaf(&["shop.example.com"]);
    write(edge.work.path(), "certs/shop.pem", &renewed.combined());
    let (_, plan, _) = edge.lunafront(&["plan", "state.yaml"]);
    assert!(plan.contains("~ certificate https/shop.pem"), "{plan}");
    assert!(edge.apply().contains("through the runtime API"));
    assert_eq!(
        served_certificate(&ca, https, "shop.example.com").unwrap(),
        renewed.der()
    );
    assert!(edge.plan_is_empty());

    // A second name: a new certificate and crt-list entry at runtime; then removed again.
    let blog = ca.leaf(&["blog.example.com"]);
    write(edge.work.path(), "certs/blog.pem", &blog.combined());
    assert!(edge.apply().contains("through the runtime API"));
    assert_eq!(
        served_certificate(&ca, https, "blog.example.com").unwrap(),
        blog.der()
    );
    assert!(edge.plan_is_empty());
    std::fs::remove_file(edge.work.path().join("certs/blog.pem")).unwrap();
    assert!(edge.apply().contains("through the runtime API"));
    // The default (first) certificate answers the name again.
    assert_eq!(
        served_certificate(&ca, https, "shop.example.com").unwrap(),
        renewed.der()
    );
    assert!(served_certificate(&ca, https, "blog.example.com").is_err());
    assert!(!edge.api.dir.join("ssl/https.blog.pem").exists());
    assert!(edge.plan_is_empty());
    assert_eq!(
        edge.worker_pid(),
        worker,
        "a certificate change reloaded HAProxy"
    );

    // A certificate changed in the storage behind lunafront's back is put back.
    std::fs::write(
        edge.api.dir.join("ssl/https.shop.pem"),
        ca.leaf(&["shop.example.com"]).combined(),
    )
    .unwrap();
    assert!(
        !edge.plan_is_empty(),
        "a foreign certificate went unnoticed"
    );
    edge.apply();
    assert!(edge.plan_is_empty());
    assert_eq!(
        served_certificate(&ca, https, "shop.example.com").unwrap(),
        renewed.der()
    );

    let called: std::collections::BTreeSet<String> = edge
        .api
        .exchanges()
        .iter()
        .filter_map(spec::operation_id)
        .collect();
    for operation in [
        "getOneStorageSSLCertificate",
        "createStorageSSLCertificate",
        "replaceStorageSSLCertificate",
        "deleteStorageSSLCertificate",
        "getOneStorageSSLCrtListFile",
        "createStorageSSLCrtListFile",
        "replaceStorageSSLCrtListFile",
        "createCert",
        "replaceCert",
        "deleteCert",
        "addCrtListEntry",
        "deleteCrtListEntry",
    ] {
        assert!(
            called.contains(operation),
            "{operation} never called: {called:?}"
        );
    }
}
