//! Fleets: a group of three front servers (two local HAProxy, one behind a Data Plane API),
//! rolled out canary first, a canary that fails stopping the rollout, and `plan` on the group
//! calling out the target that drifted.

mod support;

use std::time::Duration;
use support::dpapi::DataplaneApi;
use support::*;

const PASSWORD: &str = "fleet-pass-51c0";

/// Three front servers, each binding its own loopback port for the `http` listener.
struct Fleet {
    work: TempDir,
    _api_dir: TempDir,
    api: DataplaneApi,
    ports: [u16; 3],
    shop: Server,
    blog: Server,
}

impl Fleet {
    fn new() -> Fleet {
        let ports = [free_port(), free_port(), free_port()];
        let api_dir = TempDir::new().unwrap();
        let api = DataplaneApi::start(api_dir.path(), PASSWORD, ports[2]);
        Fleet {
            work: TempDir::new().unwrap(),
            _api_dir: api_dir,
            api,
            ports,
            shop: http_backend("shop"),
            blog: http_backend("blog"),
        }
    }

    /// A state routing `routes`; the canary checks shop.example.com through its own port.
    fn state(&self, routes: &[(&str, &str)], shop_port: u16) -> String {
        let w = self.work.path().display();
        let [p1, p2, p3] = self.ports;
        let mut s = format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {shop_port} }} ] }}\n  blog: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n",
            free_port(),
            self.blog.port
        );
        for (host, backend) in routes {
            s.push_str(&format!("  {host}: {{ backend: {backend} }}\n"));
        }
        s.push_str(&format!(
            "targets:
  edge-1:
    type: haproxy
    config: {w}/edge-1/haproxy.cfg
    state_dir: {w}/edge-1/state
    master_socket: {w}/edge-1/state/master.sock
    runtime_socket: {w}/edge-1/state/admin.sock
    spawn: true
    binds: {{ http: \"127.0.0.1:{p1}\" }}
    health_check: {{ url: \"http://127.0.0.1:{p1}/healthz\", host: shop.example.com, timeout: 2s }}
  edge-2:
    type: haproxy
    config: {w}/edge-2/haproxy.cfg
    state_dir: {w}/edge-2/state
    master_socket: {w}/edge-2/state/master.sock
    runtime_socket: {w}/edge-2/state/admin.sock
    spawn: true
    binds: {{ http: \"127.0.0.1:{p2}\" }}
  edge-3:
    type: dataplane
    url: \"{url}\"
    username: admin
    password_env: DPAPI_PASSWORD
    maps_dir: {d}/maps
    runtime_socket: {d}/admin.sock
    state_dir: {d}/lunafront
    binds: {{ http: \"127.0.0.1:{p3}\" }}
groups:
  edge: [ edge-1, edge-2, edge-3 ]
",
            url = self.api.url(),
            d = self.api.dir.display()
        ));
        s
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.work.path().join(file), text).unwrap();
    }

    fn lunafront(&self, args: &[&str]) -> (i32, String, String) {
        let out = lunafront()
            .args(args)
            .current_dir(self.work.path())
            .env("DPAPI_PASSWORD", PASSWORD)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Which backend each of the three servers sends `host` to (None: no route).
    fn routes(&self, host: &str) -> Vec<Option<String>> {
        self.ports
            .iter()
            .map(|port| {
                http_get(*port, host, "/").ok().and_then(|(status, body)| {
                    (status == 200).then(|| {
                        body.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .trim_start_matches("backend=")
                            .to_string()
                    })
                })
            })
            .collect()
    }

    fn stop_local(&self) {
        for name in ["edge-1", "edge-2"] {
            let master = lunafront::target::haproxy::socket::MasterCli::new(
                &self.work.path().join(name).join("state/master.sock"),
            );
            if let Ok(proc) = master.show_proc(Duration::from_millis(300)) {
                // SAFETY: kill(2) on the master this test's lunafront started.
                unsafe { libc::kill(proc.master_pid as libc::pid_t, 15) };
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_local();
    }
}

/// The revision `apply` announces (`Rolling out revision X to ...`).
fn rolled_out_revision(stdout: &str) -> String {
    stdout
        .split("Rolling out revision ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no revision in:\n{stdout}"))
        .to_string()
}

/// The `target result revision` row of the rollout report for `target`.
fn report_row<'a>(stdout: &'a str, target: &str) -> Vec<&'a str> {
    let report = stdout.rsplit("target           result").next().unwrap();
    report
        .lines()
        .find(|l| l.starts_with(&format!("{target} ")))
        .unwrap_or_else(|| panic!("no row for {target} in:\n{stdout}"))
        .split_whitespace()
        .collect()
}

fn some(backend: &str) -> Option<String> {
    Some(backend.to_string())
}

#[test]
fn a_group_rolls_out_canary_first_and_a_drifted_target_is_called_out() {
    let fleet = Fleet::new();
    let v1 = fleet.state(&[("shop.example.com", "shop")], fleet.shop.port);
    fleet.write("state.yaml", &v1);

    let (code, stdout, stderr) = fleet.lunafront(&[
        "plan",
        "state.yaml",
        "--target",
        "edge",
        "--detailed-exitcode",
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    for name in ["edge-1", "edge-2", "edge-3"] {
        assert!(stdout.contains(&format!("Target {name}:")), "{stdout}");
    }

    // A saved plan is one target's.
    let (code, _, stderr) = fleet.lunafront(&[
        "plan",
        "state.yaml",
        "--target",
        "edge",
        "--out",
        "edge.plan",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--out saves one target's plan"), "{stderr}");
    assert!(!fleet.work.path().join("edge.plan").exists());

    let (code, stdout, stderr) = fleet.lunafront(&[
        "apply",
        "state.yaml",
        "--target",
        "edge",
        "--parallel",
        "2",
        "--auto-approve",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let revision = rolled_out_revision(&stdout);
    assert!(stdout.contains("canary: edge-1"), "{stdout}");
    assert!(
        stdout.contains("Canary edge-1 answers its health check"),
        "{stdout}"
    );
    // The canary was applied and checked before the others.
    let canary_at = stdout.find("Canary edge-1 answers").unwrap();
    for name in ["edge-2", "edge-3"] {
        assert!(
            stdout.find(&format!("to target {name}")).unwrap() > canary_at,
            "{stdout}"
        );
        assert_eq!(report_row(&stdout, name)[2], revision, "{stdout}");
    }
    assert_eq!(report_row(&stdout, "edge-1")[1], "start");
    assert_eq!(report_row(&stdout, "edge-3")[1], "reload");
    assert_eq!(fleet.routes("shop.example.com"), vec![some("shop"); 3]);

    let (code, stdout, stderr) = fleet.lunafront(&[
        "plan",
        "state.yaml",
        "--target",
        "edge",
        "--detailed-exitcode",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains("Drift"), "{stdout}");

    // edge-2 gets another state on its own: it drifts from the group.
    let v2 = fleet.state(
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        fleet.shop.port,
    );
    fleet.write("other.yaml", &v2);
    let (code, stdout, stderr) = fleet.lunafront(&[
        "apply",
        "other.yaml",
        "--target",
        "edge-2",
        "--auto-approve",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        fleet.routes("blog.example.com"),
        vec![None, some("blog"), None]
    );

    let (code, stdout, stderr) = fleet.lunafront(&[
        "plan",
        "state.yaml",
        "--target",
        "edge",
        "--detailed-exitcode",
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stdout.contains("Drift: edge-2 hold(s) something else than the other targets"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("edge-2 "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.contains("<- differs from the other targets"), "{row}");
    assert!(!row.contains(&revision), "{row}");

    let (code, stdout, _) = fleet.lunafront(&["plan", "state.yaml", "--target", "edge", "--json"]);
    assert_eq!(code, 0);
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let drift: Vec<(String, bool)> = plan["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap().to_string(),
                t["drift"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        drift,
        vec![
            ("edge-1".to_string(), false),
            ("edge-2".to_string(), true),
            ("edge-3".to_string(), false)
        ]
    );
    assert_eq!(plan["targets"][0]["revision"], revision.as_str());

    // One apply on the group brings it back together.
    let (code, stdout, stderr) =
        fleet.lunafront(&["apply", "state.yaml", "--target", "edge", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(report_row(&stdout, "edge-1")[1], "unchanged");
    assert_eq!(fleet.routes("blog.example.com"), vec![None, None, None]);
}

#[test]
fn a_canary_that_fails_its_health_check_stops_the_rollout() {
    let fleet = Fleet::new();
    fleet.write(
        "state.yaml",
        &fleet.state(&[("shop.example.com", "shop")], fleet.shop.port),
    );
    let (code, stdout, stderr) =
        fleet.lunafront(&["apply", "state.yaml", "--target", "edge", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let first = rolled_out_revision(&stdout);

    // The new state sends shop.example.com to a port nothing listens on: the canary applies,
    // then its health check gets 503s.
    let closed = free_port();
    fleet.write(
        "state.yaml",
        &fleet.state(
            &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
            closed,
        ),
    );
    let (code, stdout, stderr) =
        fleet.lunafront(&["apply", "state.yaml", "--target", "edge", "--auto-approve"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let second = rolled_out_revision(&stdout);
    assert_ne!(first, second);
    assert!(
        stderr.contains("canary edge-1: the health check failed"),
        "{stderr}"
    );
    assert!(stderr.contains("answered 503"), "{stderr}");
    assert_eq!(report_row(&stdout, "edge-1")[1..], ["unhealthy", &second]);
    assert_eq!(
        report_row(&stdout, "edge-2")[1..],
        ["not", "applied", &first]
    );
    assert_eq!(
        report_row(&stdout, "edge-3")[1..],
        ["not", "applied", &first]
    );
    assert_eq!(
        fleet.routes("blog.example.com"),
        vec![some("blog"), None, None]
    );
    assert_eq!(
        fleet.routes("shop.example.com")[1..],
        [some("shop"), some("shop")]
    );

    // A canary whose apply fails (its reload: the port is taken) stops it as well.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let text = fleet
        .state(&[("shop.example.com", "shop")], fleet.shop.port)
        .replace(
            "agents:\n",
            &format!("  busy: {{ bind: \"127.0.0.1:{taken_port}\" }}\nagents:\n"),
        );
    fleet.write("state.yaml", &text);
    let (code, stdout, stderr) =
        fleet.lunafront(&["apply", "state.yaml", "--target", "edge", "--auto-approve"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert_eq!(report_row(&stdout, "edge-1")[1..], ["failed", &second]);
    assert_eq!(
        report_row(&stdout, "edge-2")[1..],
        ["not", "applied", &first]
    );
    assert!(stderr.contains("targets marked `not applied` were left as they were"));
    drop(taken);
}
