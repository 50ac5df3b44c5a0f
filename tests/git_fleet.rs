//! A fleet converging from one git repository (issue 14): a bare repository as the remote and
//! daemons on loopback, each with its own HAProxy (spawn: true), ports and state folders, each
//! following the remote with `--git`. Also the daemon driving a group and a Data Plane API
//! target, `lunafront fleet status`, the webhook, signed commits, and credentials kept out of
//! everything a node shows.

mod support;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::agent::{ADMIN, api_call, post_agent};
use support::*;

/// Long enough for a loaded machine; the waits end as soon as the condition holds.
const CONVERGE: Duration = Duration::from_secs(60);

/// `git` in `dir` as the operator, asserting it worked; returns stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_AUTHOR_NAME", "operator")
        .env("GIT_AUTHOR_EMAIL", "ops@example.com")
        .env("GIT_COMMITTER_NAME", "operator")
        .env("GIT_COMMITTER_EMAIL", "ops@example.com")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls `check` until it gives a value, or panics with `what` and the last thing seen.
fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match check() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {}s; last: {last}", timeout.as_secs());
}

/// Which backend `host` reaches through `port` (None: no route, or nothing answers).
fn served(port: u16, host: &str) -> Option<String> {
    http_get(port, host, "/").ok().and_then(|(status, body)| {
        (status == 200).then(|| {
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .trim_start_matches("backend=")
                .to_string()
        })
    })
}

/// The value of a sample line of Prometheus text (`name{labels}` exactly).
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{sample} ")))
        .and_then(|v| v.trim().parse().ok())
}

struct Node {
    name: String,
    /// Its own port for the `http` listener (`binds`).
    http: u16,
    api: u16,
    daemon: Option<Daemon>,
}

/// A bare repository, the operator's working clone of it, and the nodes' targets.
struct GitFleet {
    work: TempDir,
    remote: PathBuf,
    seed: PathBuf,
    nodes: Vec<Node>,
    shop: Server,
    blog: Server,
}

impl GitFleet {
    /// `n` nodes' targets in the repository's first commit (state.yaml, targets.yaml,
    /// domains.yaml routing shop.example.com); no daemon started yet.
    fn new(n: usize) -> GitFleet {
        let work = TempDir::new().unwrap();
        let remote = work.path().join("remote.git");
        let seed = work.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        git(
            work.path(),
            &["init", "--quiet", "--bare", "-b", "main", "remote.git"],
        );
        git(&seed, &["init", "--quiet", "-b", "main"]);
        std::fs::write(work.path().join("admin.token"), ADMIN).unwrap();
        let nodes = (1..=n)
            .map(|i| Node {
                name: format!("node-{i}"),
                http: free_port(),
                api: free_port(),
                daemon: None,
            })
            .collect();
        let fleet = GitFleet {
            work,
            remote,
            seed,
            nodes,
            shop: http_backend("shop"),
            blog: http_backend("blog"),
        };
        write(&fleet.seed, "state.yaml", &fleet.base());
        write(&fleet.seed, "targets.yaml", &fleet.targets());
        write(
            &fleet.seed,
            "domains.yaml",
            &domains(&[("shop.example.com", "shop")]),
        );
        git(&fleet.seed, &["add", "-A"]);
        git(
            &fleet.seed,
            &["commit", "--quiet", "-m", "the fleet's first state"],
        );
        git(
            &fleet.seed,
            &[
                "remote",
                "add",
                "origin",
                &fleet.remote.display().to_string(),
            ],
        );
        git(&fleet.seed, &["push", "--quiet", "-u", "origin", "main"]);
        fleet
    }

    fn w(&self) -> &Path {
        self.work.path()
    }

    fn base(&self) -> String {
        format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\n  blog: {{ servers: [ {{ agent: a1, port: {} }} ] }}\napi:\n  apps_domain: apps.example.com\n  allowed_networks: [ \"127.0.0.0/8\" ]\n",
            free_port(),
            self.shop.port,
            self.blog.port
        )
    }

    /// Each node's target: its files and sockets in its own folder, its own listener port.
    fn targets(&self) -> String {
        let w = self.w().display();
        let mut s = "targets:\n".to_string();
        for node in &self.nodes {
            let n = &node.name;
            s.push_str(&format!(
                "  {n}: {{ type: haproxy, config: {w}/{n}/live/haproxy.cfg, state_dir: {w}/{n}/var, master_socket: {w}/{n}/var/master.sock, runtime_socket: {w}/{n}/var/admin.sock, spawn: true, reload_timeout: 10s, binds: {{ http: \"127.0.0.1:{}\" }} }}\n",
                node.http
            ));
        }
        s
    }

    fn url(&self) -> String {
        self.remote.display().to_string()
    }

    /// Starts node `i`'s daemon (index from 0) following the remote, with the API.
    fn start(&mut self, i: usize, extra: &[&str]) {
        let url = self.url();
        let node = &self.nodes[i];
        let state = format!("{}/state", node.name);
        let api = format!("127.0.0.1:{}", node.api);
        let mut args = vec![
            "--git",
            url.as_str(),
            "--api",
            api.as_str(),
            "--admin-token-file",
            "admin.token",
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::start_target(self.work.path(), &state, &node.name, &args, &[]);
        self.nodes[i].daemon = Some(daemon);
    }

    fn start_all(&mut self, extra: &[&str]) {
        for i in 0..self.nodes.len() {
            self.start(i, extra);
        }
        for i in 0..self.nodes.len() {
            self.daemon(i).wait_for("/ready", 200, "ok", CONVERGE);
            self.wait_served(i, "shop.example.com", "shop");
        }
    }

    fn daemon(&self, i: usize) -> &Daemon {
        self.nodes[i].daemon.as_ref().expect("started")
    }

    /// Writes files in the operator's clone, commits and pushes them; returns the commit.
    fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        git(
            &self.seed,
            &["pull", "--quiet", "--rebase", "origin", "main"],
        );
        for (name, text) in files {
            write(&self.seed, name, text);
        }
        git(&self.seed, &["add", "-A"]);
        git(&self.seed, &["commit", "--quiet", "-m", message]);
        git(&self.seed, &["push", "--quiet", "origin", "main"]);
        git(&self.seed, &["rev-parse", "HEAD"])
    }

    fn wait_served(&self, i: usize, host: &str, backend: &str) {
        let port = self.nodes[i].http;
        wait_until(
            &format!("{} serving {host} from {backend}", self.nodes[i].name),
            CONVERGE,
            || match served(port, host) {
                Some(b) if b == backend => Ok(()),
                other => Err(format!("{other:?}\n{}", self.daemon(i).log_text())),
            },
        )
    }

    fn status(&self, i: usize) -> Value {
        self.daemon(i).json("/status")
    }

    /// Waits until node `i`'s `/status` satisfies `check`; returns it.
    fn wait_status(&self, i: usize, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_until(&format!("{}: {what}", self.nodes[i].name), CONVERGE, || {
            let status = self.status(i);
            if check(&status) {
                Ok(status)
            } else {
                Err(status.to_string())
            }
        })
    }

    fn wait_applied(&self, i: usize, commit: &str) -> Value {
        self.wait_status(i, &format!("applied commit {commit}"), |s| {
            s["git"]["applied_commit"] == commit && s["git"]["behind"] == 0
        })
    }

    fn call(
        &self,
        i: usize,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        api_call(self.nodes[i].api, method, path, token, body)
    }

    /// Commits and pushes domains.yaml with `routes` as (host, backend); returns the commit.
    fn commit_domains(&self, routes: &[(&str, &str)], message: &str) -> String {
        self.commit(&[("domains.yaml", &domains(routes))], message)
    }

    /// Commits and pushes domains.yaml routing blog.example.com beside shop; returns the commit.
    fn route_blog(&self) -> String {
        self.commit_domains(
            &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
            "route blog",
        )
    }

    /// `POST /v1/agents/<agent>/routes` on node `i` as the administrator.
    fn add_route(&self, i: usize, agent: &str, subdomain: &str, port: u16) -> (u16, Value) {
        self.call(
            i,
            "POST",
            &format!("/v1/agents/{agent}/routes"),
            Some(ADMIN),
            Some(json!({"subdomain": subdomain, "port": port})),
        )
    }

    /// The authors of the remote's commits, newest first.
    fn authors(&self) -> Vec<String> {
        git(&self.remote, &["log", "--format=%an", "main"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn clone_dir(&self, i: usize) -> PathBuf {
        self.w().join(&self.nodes[i].name).join("state")
    }
}

fn domains(routes: &[(&str, &str)]) -> String {
    let mut s = "domains:\n".to_string();
    for (host, backend) in routes {
        s.push_str(&format!("  {host}: {{ backend: {backend} }}\n"));
    }
    s
}

#[test]
fn a_pushed_commit_is_served_by_all_three_and_one_that_does_not_validate_by_none() {
    let mut fleet = GitFleet::new(3);
    fleet.start_all(&["--git-interval", "1s"]);

    // A commit pushed to the remote: every node serves it within its interval.
    let c1 = fleet.route_blog();
    for i in 0..3 {
        fleet.wait_served(i, "blog.example.com", "blog");
        let status = fleet.wait_applied(i, &c1);
        assert_eq!(status["git"]["fetched_commit"], c1.as_str());
        assert_eq!(status["git"]["remote_reachable"], true);
        assert_eq!(status["revision"]["git_commit"], c1.as_str());
        let metrics = fleet.daemon(i).get("/metrics").1;
        assert_eq!(metric(&metrics, "lunafront_git_behind_commits"), Some(0.0));
        assert_eq!(metric(&metrics, "lunafront_git_remote_up"), Some(1.0));
        assert!(
            metrics.contains(&format!(
                "lunafront_git_commit_info{{applied=\"{c1}\",fetched=\"{c1}\"}} 1"
            )),
            "{metrics}"
        );
    }

    // `fleet status` asks every node: all on c1.
    let urls: Vec<String> = (0..3)
        .map(|i| format!("http://127.0.0.1:{}", fleet.daemon(i).port))
        .collect();
    let mut args = vec!["fleet", "status"];
    args.extend(urls.iter().map(String::as_str));
    let (code, stdout, stderr) = run(&args, fleet.w());
    assert_eq!(code, 0, "{stdout}{stderr}");
    for (i, url) in urls.iter().enumerate() {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(url.as_str()))
            .unwrap_or_else(|| panic!("{stdout}"));
        assert!(
            row.contains(&format!("node-{}", i + 1))
                && row.contains(&c1[..12])
                && row.ends_with("ok"),
            "{row}"
        );
    }
    assert!(
        stdout.contains(&format!("3 of 3 node(s) run commit {}", &c1[..12])),
        "{stdout}"
    );

    // A commit that does not validate: applied nowhere, reported everywhere.
    let bad = fleet.commit_domains(
        &[
            ("shop.example.com", "shop"),
            ("blog.example.com", "blog"),
            ("broken.example.com", "nope"),
        ],
        "a route to a backend that does not exist",
    );
    for i in 0..3 {
        let status = fleet.wait_status(i, "the invalid commit refused", |s| {
            s["git"]["refused"]["commit"] == bad.as_str()
        });
        let refused = &status["git"]["refused"];
        assert_eq!(refused["reason"], "invalid", "{status}");
        let diagnostic = &refused["diagnostics"][0];
        assert_eq!(diagnostic["code"], "unknown-backend", "{status}");
        assert_eq!(diagnostic["location"]["file"], "domains.yaml", "{status}");
        assert_eq!(diagnostic["location"]["line"], 4, "{status}");
        assert_eq!(status["git"]["applied_commit"], c1.as_str(), "{status}");
        assert_eq!(status["git"]["checked_out"], c1.as_str(), "{status}");
        assert_eq!(status["git"]["behind"], 1, "{status}");
        assert_eq!(served(fleet.nodes[i].http, "broken.example.com"), None);
        assert_eq!(
            served(fleet.nodes[i].http, "blog.example.com"),
            Some("blog".into())
        );
        let metrics = fleet.daemon(i).get("/metrics").1;
        assert_eq!(
            metric(
                &metrics,
                "lunafront_git_refused_commits_total{reason=\"invalid\"}"
            ),
            Some(1.0),
            "{metrics}"
        );
        assert_eq!(metric(&metrics, "lunafront_git_behind_commits"), Some(1.0));
        assert!(
            fleet.daemon(i).log_text().contains("domains.yaml:4:"),
            "the log names the place"
        );
    }
    let (code, stdout, _) = run(&args, fleet.w());
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("refusing a commit") || stdout.contains("behind"),
        "{stdout}"
    );
    let mut json_args = args.clone();
    json_args.push("--json");
    let (code, stdout, _) = run(&json_args, fleet.w());
    assert_eq!(code, 1);
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["in_sync"], false);
    assert_eq!(doc["nodes"][0]["applied_commit"], c1.as_str());
    assert_eq!(doc["nodes"][0]["fetched_commit"], bad.as_str());
    assert_eq!(doc["nodes"][0]["refused"]["reason"], "invalid");

    // The next commit fixes it: every node moves past the bad one.
    let c3 = fleet.commit_domains(
        &[
            ("shop.example.com", "shop"),
            ("blog.example.com", "blog"),
            ("fixed.example.com", "shop"),
        ],
        "fix the route",
    );
    for i in 0..3 {
        fleet.wait_served(i, "fixed.example.com", "shop");
        let status = fleet.wait_applied(i, &c3);
        assert!(status["git"]["refused"].is_null(), "{status}");
    }

    // One node that does not answer: fleet status names it.
    args.push("http://127.0.0.1:9");
    let (code, stdout, _) = run(&args, fleet.w());
    assert_eq!(code, 1, "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("http://127.0.0.1:9 "))
        .unwrap();
    assert!(row.contains("unreachable"), "{row}");
}

/// Regression: `/status` published a newly fetched commit before counting how far behind it the
/// node is, so while the commit was checked (and once it was refused) a reader saw the new
/// `fetched_commit` with the old `behind` (0), as if the node ran it.
#[test]
fn status_never_shows_a_fetched_commit_with_a_stale_count_behind() {
    let mut fleet = GitFleet::new(1);
    // Only `POST /reconcile` fetches after the start.
    fleet.start_all(&["--git-interval", "1h"]);
    // A large state makes the check of the commit (validated from the commit) take a while.
    let hosts: Vec<String> = (0..5000).map(|i| format!("d{i}.example.com")).collect();
    let mut routes: Vec<(&str, &str)> = hosts.iter().map(|h| (h.as_str(), "shop")).collect();
    routes.push(("broken.example.com", "nope"));
    let bad = fleet.commit(
        &[("domains.yaml", &domains(&routes))],
        "5000 routes, one broken",
    );
    let port = fleet.daemon(0).port;
    let fetch = std::thread::spawn(move || http_json(port, "POST", "/reconcile", None, None));
    let mut seen = 0;
    let mut stale = Vec::new();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let status = fleet.status(0);
        let git = &status["git"];
        if git["fetched_commit"] == bad.as_str() {
            seen += 1;
            if git["behind"] != 1 {
                stale.push(git.to_string());
            }
        }
        if git["refused"]["commit"] == bad.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "never refused: {status}");
    }
    let (code, body) = fetch.join().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(seen > 0);
    assert!(stale.is_empty(), "{} of {seen}: {}", stale.len(), stale[0]);

    // The fix is taken: while it is applied and once it runs, the count follows.
    routes.pop();
    let good = fleet.commit(
        &[("domains.yaml", &domains(&routes))],
        "the broken route removed",
    );
    let fetch = std::thread::spawn(move || http_json(port, "POST", "/reconcile", None, None));
    loop {
        let status = fleet.status(0);
        let git = &status["git"];
        let (applied, fetched) = (
            git["applied_commit"] == good.as_str(),
            git["fetched_commit"] == good.as_str(),
        );
        if applied && git["behind"] != 0 || fetched && !applied && git["behind"] != 2 {
            stale.push(git.to_string());
        }
        if applied && fetch.is_finished() {
            break;
        }
        assert!(Instant::now() < deadline, "never applied: {status}");
    }
    let (code, body) = fetch.join().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(stale.is_empty(), "{}: {}", stale.len(), stale[0]);
    fleet.wait_served(0, "d4999.example.com", "shop");
}

#[test]
fn an_agent_registering_and_adding_a_route_on_node_1_is_served_by_nodes_2_and_3() {
    let mut fleet = GitFleet::new(3);
    fleet.start_all(&["--git-interval", "1s"]);
    let app = http_backend_everywhere("app");

    let (code, key, stderr) = run(
        &[
            "agent",
            "enroll",
            "agent-1",
            "node-1/state",
            "--target",
            "node-1",
        ],
        fleet.w(),
    );
    assert_eq!(code, 0, "{stderr}");
    let (status, body) = fleet.call(
        0,
        "POST",
        "/api/agent/register",
        None,
        Some(json!({"agentId": "agent-1", "agentKey": key.trim(), "agentName": "vps-1", "targetIp": "127.0.3.1"})),
    );
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let (status, body) = fleet.call(
        0,
        "POST",
        "/api/proxy/http",
        Some(&token),
        Some(json!({"agentId": "agent-1", "subdomain": "app", "targetUrl": format!("http://127.0.3.1:{}", app.port)})),
    );
    assert_eq!(status, 200, "{body}");
    // Answered once live on node 1.
    assert_eq!(
        served(fleet.nodes[0].http, "app.apps.example.com"),
        Some("app".into())
    );
    // Committed (the agent as author) and pushed; the others converge.
    let head = git(&fleet.remote, &["rev-parse", "main"]);
    assert_eq!(&fleet.authors()[..2], ["agent-1", "agent-1"]);
    for i in 1..3 {
        fleet.wait_served(i, "app.apps.example.com", "app");
        fleet.wait_applied(i, &head);
    }
    fleet.wait_applied(0, &head);
    // Node 1's clone is the remote's head, nothing left uncommitted.
    assert_eq!(git(&fleet.clone_dir(0), &["status", "--porcelain"]), "");
    assert_eq!(git(&fleet.clone_dir(0), &["rev-parse", "HEAD"]), head);
}

#[test]
fn concurrent_api_changes_on_nodes_1_and_2_both_land_and_a_conflict_has_one_winner() {
    let mut fleet = GitFleet::new(3);
    let first = git(&fleet.remote, &["rev-parse", "main"]);
    // Nodes 1 and 2 fetch only when asked: each API change of theirs starts from a head the
    // other node has moved, so their pushes meet the other's commit (git is the arbiter).
    fleet.start(0, &["--git-interval", "1h"]);
    fleet.start(1, &["--git-interval", "1h"]);
    fleet.start(2, &["--git-interval", "1s"]);
    for i in 0..3 {
        fleet.daemon(i).wait_for("/ready", 200, "ok", CONVERGE);
        // Their one fetch at start is done.
        fleet.wait_status(i, "the first fetch", |s| {
            s["git"]["fetched_commit"] == first.as_str()
        });
    }
    let alpha = http_backend_everywhere("alpha");
    let beta = http_backend_everywhere("beta");

    let (status, body) = post_agent(fleet.nodes[0].api, "team-a", "127.0.4.1");
    assert_eq!(status, 201, "{body}");
    // Node 2 has not seen team-a's commit: its push is refused by the remote, it fetches, makes
    // the change again on the new head and pushes that.
    let (status, body) = post_agent(fleet.nodes[1].api, "team-b", "127.0.4.2");
    assert_eq!(status, 201, "{body}");
    let metrics = fleet.daemon(1).get("/metrics").1;
    assert_eq!(
        metric(&metrics, "lunafront_git_pushes_total{result=\"rejected\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "lunafront_git_pushes_total{result=\"ok\"}"),
        Some(1.0),
        "{metrics}"
    );

    // Two changes at the same moment on nodes 1 and 2, for different agents: both land.
    let (a, b) = at_once(
        || fleet.add_route(0, "team-a", "alpha", alpha.port),
        || fleet.add_route(1, "team-b", "beta", beta.port),
    );
    assert_eq!(a.0, 201, "{}", a.1);
    assert_eq!(b.0, 201, "{}", b.1);
    // Each is live on its node when answered; node 3 follows the remote and serves both.
    assert_eq!(
        served(fleet.nodes[0].http, "alpha.apps.example.com"),
        Some("alpha".into())
    );
    assert_eq!(
        served(fleet.nodes[1].http, "beta.apps.example.com"),
        Some("beta".into())
    );
    fleet.wait_served(2, "alpha.apps.example.com", "alpha");
    fleet.wait_served(2, "beta.apps.example.com", "beta");
    let files = git(
        &fleet.remote,
        &["ls-tree", "-r", "--name-only", "main", "agents.d"],
    );
    assert_eq!(files, "agents.d/team-a.yaml\nagents.d/team-b.yaml");
    assert!(
        fleet.authors().iter().take(4).all(|a| a == "admin"),
        "{:?}",
        fleet.authors()
    );
    // POST /reconcile fetches first: nodes 1 and 2 then serve both too.
    for i in 0..2 {
        let (code, body) = fleet.daemon(i).post("/reconcile");
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            served(fleet.nodes[i].http, "alpha.apps.example.com"),
            Some("alpha".into())
        );
        assert_eq!(
            served(fleet.nodes[i].http, "beta.apps.example.com"),
            Some("beta".into())
        );
    }
    let rejected: f64 = (0..2)
        .map(|i| {
            metric(
                &fleet.daemon(i).get("/metrics").1,
                "lunafront_git_pushes_total{result=\"rejected\"}",
            )
            .unwrap()
        })
        .sum();
    assert!(rejected >= 2.0, "the concurrent pushes met: {rejected}");

    // The same name claimed on both nodes at the same moment: one winner, a 409 for the other.
    let (a, b) = at_once(
        || fleet.add_route(0, "team-a", "gamma", alpha.port),
        || fleet.add_route(1, "team-b", "gamma", beta.port),
    );
    let mut codes = [a.0, b.0];
    codes.sort();
    assert_eq!(codes, [201, 409], "{a:?} {b:?}");
    let (winner, loser) = if a.0 == 201 {
        ("alpha", &b)
    } else {
        ("beta", &a)
    };
    assert!(
        loser.1["message"]
            .as_str()
            .unwrap()
            .contains("gamma.apps.example.com"),
        "{loser:?}"
    );
    fleet.wait_served(2, "gamma.apps.example.com", winner);
    for i in 0..2 {
        let (code, body) = fleet.daemon(i).post("/reconcile");
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            served(fleet.nodes[i].http, "gamma.apps.example.com"),
            Some(winner.to_string())
        );
        // The loser pushed nothing and left nothing behind in its clone.
        assert_eq!(git(&fleet.clone_dir(i), &["status", "--porcelain"]), "");
    }
    let gamma_files = git(
        &fleet.remote,
        &[
            "grep",
            "-l",
            "gamma.apps.example.com",
            "main",
            "--",
            "agents.d",
        ],
    );
    assert_eq!(gamma_files.lines().count(), 1, "{gamma_files}");
}

#[test]
fn the_remote_going_away_keeps_every_node_serving_and_is_reported() {
    let mut fleet = GitFleet::new(3);
    fleet.start_all(&["--git-interval", "1s"]);
    let head = git(&fleet.remote, &["rev-parse", "main"]);
    for i in 0..3 {
        fleet.wait_applied(i, &head);
    }
    let away = fleet.w().join("remote.git.away");
    std::fs::rename(&fleet.remote, &away).unwrap();
    for i in 0..3 {
        let status = fleet.wait_status(i, "the remote reported unreachable", |s| {
            s["git"]["remote_reachable"] == false
        });
        let error = status["git"]["fetch_error"].as_str().unwrap();
        assert!(error.contains("git fetch"), "{error}");
        assert!(error.contains("keeps serving commit"), "{error}");
        assert_eq!(status["git"]["applied_commit"], head.as_str());
        assert_eq!(
            served(fleet.nodes[i].http, "shop.example.com"),
            Some("shop".into())
        );
        fleet.daemon(i).wait_for("/ready", 200, "ok", CONVERGE);
        let metrics = fleet.daemon(i).get("/metrics").1;
        assert_eq!(metric(&metrics, "lunafront_git_remote_up"), Some(0.0));
        assert!(metric(&metrics, "lunafront_git_fetches_total{result=\"failed\"}").unwrap() >= 1.0);
        assert!(fleet.daemon(i).log_text().contains("cannot be reached"));
    }
    // An API change cannot be pushed: refused, nothing changed anywhere.
    let (status, body) = post_agent(fleet.nodes[0].api, "late", "127.0.4.9");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("nothing was changed"),
        "{body}"
    );
    assert_eq!(git(&fleet.clone_dir(0), &["status", "--porcelain"]), "");
    assert_eq!(git(&fleet.clone_dir(0), &["rev-parse", "HEAD"]), head);
    assert!(!fleet.clone_dir(0).join("agents.d/late.yaml").exists());

    // Back: the nodes say so, and changes go through again.
    std::fs::rename(&away, &fleet.remote).unwrap();
    for i in 0..3 {
        fleet.wait_status(i, "the remote reachable again", |s| {
            s["git"]["remote_reachable"] == true && s["git"]["fetch_error"].is_null()
        });
    }
    let (status, body) = post_agent(fleet.nodes[0].api, "late", "127.0.4.9");
    assert_eq!(status, 201, "{body}");
}

#[test]
fn a_force_pushed_rewrite_is_refused_unless_allow_rewrite() {
    let mut fleet = GitFleet::new(3);
    fleet.start(0, &["--git-interval", "1s"]);
    fleet.start(1, &["--git-interval", "1s"]);
    fleet.start(2, &["--git-interval", "1s", "--allow-rewrite"]);
    let c1 = fleet.route_blog();
    for i in 0..3 {
        fleet.wait_served(i, "blog.example.com", "blog");
        fleet.wait_applied(i, &c1);
    }
    // The operator rewrites the last commit and force-pushes it.
    write(
        &fleet.seed,
        "domains.yaml",
        &domains(&[
            ("shop.example.com", "shop"),
            ("rewritten.example.com", "shop"),
        ]),
    );
    git(
        &fleet.seed,
        &["commit", "--quiet", "-a", "--amend", "-m", "rewritten"],
    );
    git(
        &fleet.seed,
        &["push", "--quiet", "--force", "origin", "main"],
    );
    let rewritten = git(&fleet.seed, &["rev-parse", "HEAD"]);
    for i in 0..2 {
        let status = fleet.wait_status(i, "the rewrite refused", |s| {
            s["git"]["refused"]["commit"] == rewritten.as_str()
        });
        assert_eq!(status["git"]["refused"]["reason"], "rewrite", "{status}");
        assert!(
            status["git"]["refused"]["message"]
                .as_str()
                .unwrap()
                .contains("--allow-rewrite"),
            "{status}"
        );
        assert_eq!(status["git"]["applied_commit"], c1.as_str());
        assert_eq!(
            served(fleet.nodes[i].http, "blog.example.com"),
            Some("blog".into())
        );
        assert_eq!(served(fleet.nodes[i].http, "rewritten.example.com"), None);
        let metrics = fleet.daemon(i).get("/metrics").1;
        assert_eq!(
            metric(
                &metrics,
                "lunafront_git_refused_commits_total{reason=\"rewrite\"}"
            ),
            Some(1.0)
        );
    }
    // The node told to follow rewrites does.
    fleet.wait_served(2, "rewritten.example.com", "shop");
    fleet.wait_applied(2, &rewritten);
    assert_eq!(served(fleet.nodes[2].http, "blog.example.com"), None);
}

/// An ed25519 key pair made with ssh-keygen; returns the private key's path.
fn ssh_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

#[test]
fn with_require_signed_signed_commits_are_applied_and_unsigned_ones_refused() {
    let mut fleet = GitFleet::new(2);
    let keys = fleet.w().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let ops = ssh_key(&keys, "ops");
    let node_key = ssh_key(&keys, "node-1");
    let stranger = ssh_key(&keys, "stranger");
    let public = |k: &Path| std::fs::read_to_string(k.with_extension("pub")).unwrap();
    std::fs::write(
        keys.join("allowed_signers"),
        format!(
            "ops@example.com {}lunafront@example.com {}",
            public(&ops),
            public(&node_key)
        ),
    )
    .unwrap();
    let seed = fleet.seed.clone();
    let sign = |key: &Path| {
        git(&seed, &["config", "gpg.format", "ssh"]);
        git(
            &seed,
            &["config", "user.signingkey", &key.display().to_string()],
        );
    };
    // A node does not even clone a branch whose head is not signed.
    let signers = keys.join("allowed_signers").display().to_string();
    let out = lunafront()
        .args([
            "daemon",
            "node-1/state",
            "--target",
            "node-1",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--git", &fleet.url(), "--require-signed", &signers])
        .current_dir(fleet.w())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("is not signed by a key of") && said.contains("nothing was cloned"),
        "{said}"
    );
    assert!(!fleet.clone_dir(0).exists());
    // The operator signs from now on; the first commit is signed too.
    sign(&ops);
    git(
        &fleet.seed,
        &["commit", "--quiet", "--amend", "--no-edit", "-S"],
    );
    git(
        &fleet.seed,
        &["push", "--quiet", "--force", "origin", "main"],
    );
    let node_key_text = node_key.display().to_string();
    fleet.start(
        0,
        &[
            "--git-interval",
            "1s",
            "--require-signed",
            &signers,
            "--git-signing-key",
            &node_key_text,
        ],
    );
    // Every node that serves the API signs what it commits (it refuses to start otherwise).
    fleet.start(
        1,
        &[
            "--git-interval",
            "1s",
            "--require-signed",
            &signers,
            "--git-signing-key",
            &node_key_text,
        ],
    );
    for i in 0..2 {
        fleet.daemon(i).wait_for("/ready", 200, "ok", CONVERGE);
        fleet.wait_served(i, "shop.example.com", "shop");
    }

    // Unsigned: refused by both.
    let unsigned = fleet.commit_domains(
        &[
            ("shop.example.com", "shop"),
            ("unsigned.example.com", "blog"),
        ],
        "unsigned",
    );
    // (`commit` signs nothing unless asked: -S is not given.)
    for i in 0..2 {
        let status = fleet.wait_status(i, "the unsigned commit refused", |s| {
            s["git"]["refused"]["commit"] == unsigned.as_str()
        });
        assert_eq!(status["git"]["refused"]["reason"], "unsigned", "{status}");
        assert_eq!(status["git"]["require_signed"], true);
        assert_eq!(served(fleet.nodes[i].http, "unsigned.example.com"), None);
    }
    // Signed by a key that is not allowed: refused too.
    sign(&stranger);
    write(
        &fleet.seed,
        "domains.yaml",
        &domains(&[
            ("shop.example.com", "shop"),
            ("stranger.example.com", "blog"),
        ]),
    );
    git(
        &fleet.seed,
        &[
            "commit",
            "--quiet",
            "-a",
            "-S",
            "-m",
            "signed by a stranger",
        ],
    );
    git(&fleet.seed, &["push", "--quiet", "origin", "main"]);
    let strange = git(&fleet.seed, &["rev-parse", "HEAD"]);
    for i in 0..2 {
        fleet.wait_status(i, "the stranger's commit refused", |s| {
            s["git"]["refused"]["commit"] == strange.as_str()
                && s["git"]["refused"]["reason"] == "unsigned"
        });
        assert_eq!(served(fleet.nodes[i].http, "stranger.example.com"), None);
    }
    // Signed by the operator: applied (the tip's signature vouches for the tree applied).
    sign(&ops);
    write(
        &fleet.seed,
        "domains.yaml",
        &domains(&[("shop.example.com", "shop"), ("signed.example.com", "blog")]),
    );
    git(
        &fleet.seed,
        &["commit", "--quiet", "-a", "-S", "-m", "signed"],
    );
    git(&fleet.seed, &["push", "--quiet", "origin", "main"]);
    let signed = git(&fleet.seed, &["rev-parse", "HEAD"]);
    for i in 0..2 {
        fleet.wait_served(i, "signed.example.com", "blog");
        fleet.wait_applied(i, &signed);
    }
    // The API of node 1 signs its commits: node 2 takes them.
    let (status, body) = post_agent(fleet.nodes[0].api, "team-a", "127.0.4.1");
    assert_eq!(status, 201, "{body}");
    let head = git(&fleet.remote, &["rev-parse", "main"]);
    let verify = Command::new("git")
        .arg("-C")
        .arg(&fleet.remote)
        .args([
            "-c",
            &format!("gpg.ssh.allowedSignersFile={signers}"),
            "verify-commit",
            &head,
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    fleet.wait_applied(1, &head);
}

/// An HTTP server that asks for credentials and refuses whatever it gets (a git host that
/// does not take the password): git sends the URL's user and password to it.
fn refusing_git_host() -> Server {
    Server::spawn(|mut stream| {
        use std::io::{Read, Write};
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    })
}

#[test]
fn credentials_never_appear_in_logs_status_metrics_or_errors() {
    const PASSWORD: &str = "pa55-Wd-never-shown-7f3a";
    let mut fleet = GitFleet::new(1);
    let host = refusing_git_host();
    let url = format!("http://deploy:{PASSWORD}@127.0.0.1:{}/fleet.git", host.port);

    // No clone yet and the remote refuses: the daemon cannot start, and says why without it.
    let out = lunafront()
        .args([
            "daemon",
            "node-1/state",
            "--target",
            "node-1",
            "--listen",
            "127.0.0.1:0",
            "--git",
            &url,
            "--git-timeout",
            "20s",
        ])
        .current_dir(fleet.w())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("git clone"), "{said}");
    assert!(!said.contains(PASSWORD), "{said}");
    assert!(!fleet.clone_dir(0).exists(), "no half clone is left");

    // The URL given in the environment keeps it out of the process list; an existing clone
    // keeps serving while the remote refuses.
    git(
        fleet.w(),
        &["clone", "--quiet", &fleet.url(), "node-1/state"],
    );
    let daemon = Daemon::start_target(
        fleet.w(),
        "node-1/state",
        "node-1",
        &[
            "--git-interval",
            "1s",
            "--api",
            &format!("127.0.0.1:{}", fleet.nodes[0].api),
            "--admin-token-file",
            "admin.token",
        ],
        &[("LUNAFRONT_GIT_URL", &url)],
    );
    fleet.nodes[0].daemon = Some(daemon);
    fleet.wait_served(0, "shop.example.com", "shop");
    let status = fleet.wait_status(0, "the refusing remote reported", |s| {
        s["git"]["remote_reachable"] == false
    });
    assert_eq!(
        status["git"]["url"],
        format!("http://deploy:***@127.0.0.1:{}/fleet.git", host.port)
    );
    let (code, body) = post_agent(fleet.nodes[0].api, "team-a", "127.0.4.1");
    assert_eq!(code, 503, "{body}");
    let (_, hook) = fleet.daemon(0).post("/hooks/git");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", fleet.daemon(0).child.id())).unwrap();
    let (_, fleet_status, _) = run(
        &[
            "fleet",
            "status",
            &format!("http://127.0.0.1:{}", fleet.daemon(0).port),
            "--json",
        ],
        fleet.w(),
    );
    for (what, text) in [
        ("the log", fleet.daemon(0).log_text()),
        ("/status", fleet.daemon(0).get("/status").1),
        ("/metrics", fleet.daemon(0).get("/metrics").1),
        ("the API's error", body.to_string()),
        ("the hook's answer", hook),
        ("fleet status", fleet_status),
        (
            "the process list",
            String::from_utf8_lossy(&cmdline).into_owned(),
        ),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "{what} shows the password:\n{text}"
        );
    }
    assert!(
        fleet.daemon(0).log_text().contains("deploy:***@"),
        "{}",
        fleet.daemon(0).log_text()
    );
}

#[test]
fn the_webhook_needs_the_shared_secret_and_post_reconcile_fetches_first() {
    const SECRET: &str = "hook-secret-0123456789abcdef";
    let mut fleet = GitFleet::new(1);
    std::fs::write(fleet.w().join("hook.secret"), format!("{SECRET}\n")).unwrap();
    fleet.start(
        0,
        &[
            "--git-interval",
            "1h",
            "--git-hook-secret-file",
            "hook.secret",
        ],
    );
    fleet.daemon(0).wait_for("/ready", 200, "ok", CONVERGE);
    let head = git(&fleet.remote, &["rev-parse", "main"]);
    fleet.wait_applied(0, &head);

    let c1 = fleet.route_blog();
    let port = fleet.daemon(0).port;
    let body = format!("{{\"ref\":\"refs/heads/main\",\"after\":\"{c1}\"}}");
    let hook_from = |source: [u8; 4], headers: &[(&str, String)], body: &str| -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = connect_from(source.into(), port);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        write!(stream, "POST /hooks/git HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        parse_response(&response).unwrap()
    };
    let hook = |headers: &[(&str, String)], body: &str| hook_from([127, 0, 0, 1], headers, body);
    let good = lunafront::git::hook::signature(SECRET, body.as_bytes());
    let (code, answer) = hook(&[], &body);
    assert_eq!(code, 401, "{answer}");
    let (code, answer) = hook(
        &[(
            "X-Hub-Signature-256",
            lunafront::git::hook::signature("wrong-secret-0123456789", body.as_bytes()),
        )],
        &body,
    );
    assert_eq!(code, 401, "{answer}");
    // The signature covers the body: the same signature on another body is refused.
    let (code, _) = hook(
        &[("X-Hub-Signature-256", good.clone())],
        "{\"ref\":\"refs/heads/main\"}",
    );
    assert_eq!(code, 401);
    assert_eq!(
        fleet.status(0)["git"]["applied_commit"],
        head.as_str(),
        "nothing fetched yet"
    );
    let (code, answer) = hook(
        &[
            ("X-GitHub-Event", "push".into()),
            ("X-Hub-Signature-256", good.clone()),
        ],
        &body,
    );
    assert_eq!(code, 202, "{answer}");
    fleet.wait_served(0, "blog.example.com", "blog");
    fleet.wait_applied(0, &c1);
    // GitLab's token header works too.
    let (code, _) = hook(&[("X-Gitlab-Token", SECRET.into())], "{}");
    assert_eq!(code, 202);

    // A client that keeps guessing is stopped after 10 wrong signatures in a row...
    let guesser = [127, 0, 0, 7];
    let wrong = format!("sha256={}", "0".repeat(64));
    let codes: Vec<u16> = (0..12)
        .map(|_| hook_from(guesser, &[("X-Hub-Signature-256", wrong.clone())], &body).0)
        .collect();
    assert_eq!(codes[..10], [401; 10], "{codes:?}");
    assert_eq!(codes[10..], [429, 429], "{codes:?}");
    // ...whatever it sends until its bucket refills; other clients are not held up.
    let (code, _) = hook_from(guesser, &[("X-Hub-Signature-256", good.clone())], &body);
    assert_eq!(code, 429);
    let (code, _) = hook(&[("X-Hub-Signature-256", good.clone())], &body);
    assert_eq!(code, 202);

    // POST /reconcile fetches first: the commit is live when it answers.
    let c2 = fleet.commit_domains(
        &[
            ("shop.example.com", "shop"),
            ("blog.example.com", "blog"),
            ("now.example.com", "shop"),
        ],
        "route now",
    );
    let (code, body) = fleet.daemon(0).post("/reconcile");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        served(fleet.nodes[0].http, "now.example.com"),
        Some("shop".into())
    );
    assert_eq!(fleet.status(0)["revision"]["git_commit"], c2.as_str());
}

// ---- The daemon driving a group and a Data Plane API target. ----

const DPAPI_PASSWORD: &str = "daemon-fleet-pass-7a1";

#[test]
fn a_daemon_drives_a_group_canary_first_and_a_data_plane_api_target() {
    use support::dpapi::DataplaneApi;
    let work = TempDir::new().unwrap();
    let w = work.path().display().to_string();
    let (p1, p2) = (free_port(), free_port());
    let api_dir = TempDir::new().unwrap();
    let api = DataplaneApi::start(api_dir.path(), DPAPI_PASSWORD, p2);
    let shop = http_backend("shop");
    let blog = http_backend("blog");
    let state = |routes: &[(&str, &str)], shop_port: u16| {
        format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {shop_port} }} ] }}\n  blog: {{ servers: [ {{ agent: a1, port: {} }} ] }}\n{}targets:\n  edge-1: {{ type: haproxy, config: {w}/edge-1/haproxy.cfg, state_dir: {w}/edge-1/state, master_socket: {w}/edge-1/state/master.sock, runtime_socket: {w}/edge-1/state/admin.sock, spawn: true, binds: {{ http: \"127.0.0.1:{p1}\" }}, health_check: {{ url: \"http://127.0.0.1:{p1}/healthz\", host: shop.example.com, timeout: 2s }} }}\n  edge-2: {{ type: dataplane, url: \"{}\", username: admin, password_env: DPAPI_PASSWORD, maps_dir: {d}/maps, runtime_socket: {d}/admin.sock, state_dir: {d}/lunafront, binds: {{ http: \"127.0.0.1:{p2}\" }} }}\ngroups:\n  edge: [ edge-1, edge-2 ]\n",
            free_port(),
            blog.port,
            domains(routes),
            api.url(),
            d = api.dir.display()
        )
    };
    /// Stops edge-1's HAProxy (started as `apply` starts it, not by a daemon) at the end.
    struct StopEdge1(PathBuf);
    impl Drop for StopEdge1 {
        fn drop(&mut self) {
            let master = lunafront::target::haproxy::socket::MasterCli::new(&self.0);
            if let Ok(proc) = master.show_proc(Duration::from_millis(500)) {
                // SAFETY: kill(2) on the master this test's lunafront started.
                unsafe { libc::kill(proc.master_pid as libc::pid_t, 15) };
            }
        }
    }
    let _stop = StopEdge1(work.path().join("edge-1/state/master.sock"));
    let folder = work.path().join("state");
    std::fs::create_dir_all(&folder).unwrap();
    let save = |text: &str| {
        std::fs::write(folder.join(".state.tmp"), text).unwrap();
        std::fs::rename(folder.join(".state.tmp"), folder.join("state.yaml")).unwrap();
    };
    save(&state(&[("shop.example.com", "shop")], shop.port));
    let env = [("DPAPI_PASSWORD", DPAPI_PASSWORD)];
    let routes = |host: &str| vec![served(p1, host), served(p2, host)];
    let some = |b: &str| Some(b.to_string());

    let mut daemon = Daemon::start_target(work.path(), "state", "edge", &[], &env);
    wait_until("both serve shop", CONVERGE, || {
        let r = routes("shop.example.com");
        if r == vec![some("shop"), some("shop")] {
            Ok(())
        } else {
            Err(format!("{r:?}\n{}", daemon.log_text()))
        }
    });
    daemon.wait_for("/ready", 200, "ok", CONVERGE);
    let status = daemon.json("/status");
    assert_eq!(status["targets"][0]["target"], "edge-1", "{status}");
    assert_eq!(status["targets"][1]["type"], "dataplane", "{status}");
    assert!(
        status.get("haproxy").is_none(),
        "a fleet's members report in targets: {status}"
    );
    // The status page of a daemon without a local HAProxy lists each target's rollout.
    let (code, page) = daemon.get("/");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<section id=\"targets\">")
            && page.contains("<td>edge-1</td>")
            && page.contains("data-label=\"type\">dataplane<"),
        "{page}"
    );

    // A change of the folder is rolled out to both.
    save(&state(
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        shop.port,
    ));
    wait_until("both serve blog", CONVERGE, || {
        let r = routes("blog.example.com");
        if r == vec![some("blog"), some("blog")] {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });

    // The canary fails its health check: the rollout stops there, edge-2 keeps serving.
    save(&state(
        &[
            ("shop.example.com", "shop"),
            ("blog.example.com", "blog"),
            ("new.example.com", "blog"),
        ],
        9,
    ));
    let status = wait_until("the canary found unhealthy", CONVERGE, || {
        let s = daemon.json("/status");
        if s["targets"][0]["result"] == "unhealthy" {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(status["targets"][1]["result"], "not_applied", "{status}");
    assert_eq!(status["last_reconcile"]["result"], "failed", "{status}");
    assert!(
        status["last_reconcile"]["message"]
            .as_str()
            .unwrap()
            .contains("canary edge-1"),
        "{status}"
    );
    assert_eq!(served(p2, "new.example.com"), None);
    assert_eq!(served(p2, "shop.example.com"), some("shop"));
    daemon.wait_for("/ready", 503, "canary", CONVERGE);
    daemon.stop();

    // One Data Plane API target on its own.
    save(&state(
        &[("shop.example.com", "shop"), ("solo.example.com", "blog")],
        shop.port,
    ));
    let mut solo = Daemon::start_target(work.path(), "state", "edge-2", &[], &env);
    wait_until("edge-2 serves solo", CONVERGE, || {
        match served(p2, "solo.example.com") {
            Some(b) if b == "blog" => Ok(()),
            other => Err(format!("{other:?}\n{}", solo.log_text())),
        }
    });
    // HAProxy serves the route before the apply returns: the reconcile's report comes after.
    let status = wait_until("the reconcile reports edge-2", CONVERGE, || {
        let s = solo.json("/status");
        if s["last_reconcile"].is_null() {
            Err(s.to_string())
        } else {
            Ok(s)
        }
    });
    assert_eq!(status["targets"][0]["target"], "edge-2", "{status}");
    assert_eq!(status["targets"][0]["result"], "applied", "{status}");
    solo.stop();
}

/// Regression (the merge of issue 15 into the daemon's rollout): a Data Plane API never gives a
/// certificate back, so the daemon's plan must read the target again with the rendered files
/// to know it holds them; without that every reconcile pushed the certificates again.
#[test]
fn a_daemon_driving_a_data_plane_api_target_with_certificates_leaves_them_alone_once_applied() {
    use support::dpapi::DataplaneApi;
    let work = TempDir::new().unwrap();
    let (http, https) = (free_port(), free_port());
    let api_dir = TempDir::new().unwrap();
    let api = DataplaneApi::start(api_dir.path(), DPAPI_PASSWORD, http);
    let shop = http_backend("shop");
    let ca = TestCa::new();
    let leaf = ca.leaf(&["shop.example.com"]);
    write(work.path(), "state/certs/shop.pem", &leaf.combined());
    write(
        work.path(),
        "state/state.yaml",
        &format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{http}\" }}\n  https: {{ bind: \"127.0.0.1:{https}\", certificates: certs }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n  shop.example.com: {{ backend: shop }}\ntargets:\n  edge-2: {{ type: dataplane, url: \"{}\", username: admin, password_env: DPAPI_PASSWORD, maps_dir: {d}/maps, runtime_socket: {d}/admin.sock, state_dir: {d}/lunafront, certs_dir: {d}/ssl }}\n",
            shop.port,
            api.url(),
            d = api.dir.display()
        ),
    );
    let env = [("DPAPI_PASSWORD", DPAPI_PASSWORD)];
    let mut daemon = Daemon::start_target(work.path(), "state", "edge-2", &[], &env);
    wait_until(
        "edge-2 presents the certificate",
        CONVERGE,
        || match served_certificate(&ca, https, "shop.example.com") {
            Ok(der) if der == leaf.der() => Ok(()),
            other => Err(format!(
                "{:?}\n{}",
                other.map(|d| d.len()),
                daemon.log_text()
            )),
        },
    );
    daemon.wait_for("/ready", 200, "ok", CONVERGE);
    api.clear_requests();
    // Nothing changed since: a reconcile has nothing to do and sends the API no write.
    for _ in 0..2 {
        let (code, body) = daemon.post("/reconcile");
        assert_eq!(code, 200, "{body}");
        let outcome: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(outcome["result"], "unchanged", "{outcome}");
    }
    let status = daemon.json("/status");
    assert!(status["pending_plan"].is_null(), "{status}");
    assert_eq!(status["targets"][0]["result"], "unchanged", "{status}");
    let writes: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET "))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    daemon.stop();
}

/// Regression: a daemon serving the API never ended on SIGTERM (the API's certificate task
/// and its connections kept the reconcile loop's sender), so whoever stopped it had to kill
/// it, which left its HAProxy running.
#[test]
fn a_daemon_serving_the_api_stops_on_sigterm_and_takes_its_haproxy_with_it() {
    let mut fleet = GitFleet::new(1);
    fleet.start_all(&["--git-interval", "1s"]);
    let master = fleet.status(0)["haproxy"]["master_pid"]
        .as_u64()
        .expect("a master") as i32;
    let mut daemon = fleet.nodes[0].daemon.take().unwrap();
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(daemon.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_until(
        "the daemon ends after SIGTERM",
        Duration::from_secs(20),
        || {
            daemon
                .child
                .try_wait()
                .unwrap()
                .ok_or_else(|| daemon.log_text())
        },
    );
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    wait_until("its HAProxy is stopped", Duration::from_secs(10), || {
        if Path::new(&format!("/proc/{master}")).exists() {
            Err(format!("master {master} still runs"))
        } else {
            Ok(())
        }
    });
}
