//! Scenario 7, a fleet following git: three daemons (each its own HAProxy, run as its child)
//! follow a bare repository on loopback; each turn commits a new domain, pushes it, and times
//! how long until it answers on every node. Two ways of hearing about the commit: polling
//! (`--git-interval 2s`, so about half the interval on average plus the apply) and the push
//! webhook (`POST /hooks/git` to each node right after the push, as a forge sends it).

use crate::procs::{self, Proc};
use crate::report::{Better, Report, Table, ms, percentile};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NODES: usize = 3;
const SECRET: &str = "bench-hook-secret-0123456789";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "commit.gpgsign=false"])
        .args(args)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `POST /hooks/git` with a push event signed as GitHub signs it.
fn hook(port: u16, body: &str) {
    use std::io::{Read, Write};
    let signature = lunafront::git::hook::signature(SECRET, body.as_bytes());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("daemon");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "POST /hooks/git HTTP/1.1\r\nHost: 127.0.0.1\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: {signature}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

pub fn run(report: &mut Report, root: &Path, quick: bool) {
    let (domains, turns) = if quick { (100, 5) } else { (1_000, 20) };
    let (_origin, origin_port) = procs::origin(root);
    let mut table = Table::new(
        &format!(
            "Fleet: commit pushed → the new route answers on all {NODES} nodes ({turns} commits, {domains} domains)"
        ),
        &[
            "heard by",
            "p50",
            "p99",
            "max",
            "slowest node p50",
            "bound",
            "",
        ],
    );
    for mode in ["poll", "hook"] {
        let dir = root.join(format!("fleet-{mode}"));
        let _ = std::fs::remove_dir_all(&dir);
        let seed = dir.join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        git(
            &dir,
            &["init", "--quiet", "--bare", "-b", "main", "remote.git"],
        );
        git(&seed, &["init", "--quiet", "-b", "main"]);
        let d = dir.display();
        let http: Vec<u16> = (0..NODES).map(|_| procs::free_port()).collect();
        let mut state = format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  app: {{ servers: [ {{ agent: a1, port: {origin_port} }} ] }}\ndomains:\n",
            procs::free_port()
        );
        for i in 0..domains {
            state.push_str(&format!("  d{i}.fleet.example.com: {{ backend: app }}\n"));
        }
        state.push_str("targets:\n");
        for (n, port) in http.iter().enumerate() {
            state.push_str(&format!(
                "  node-{n}: {{ type: haproxy, config: {d}/node-{n}/live/haproxy.cfg, state_dir: {d}/node-{n}/var, master_socket: {d}/node-{n}/var/master.sock, runtime_socket: {d}/node-{n}/var/admin.sock, spawn: true, haproxy_bin: {}, binds: {{ http: \"127.0.0.1:{port}\" }} }}\n",
                procs::primary().command
            ));
        }
        std::fs::write(seed.join("state.yaml"), state).unwrap();
        // A file meant to hold nothing yet says `{}` (an empty one is refused as cut short).
        std::fs::write(seed.join("new.yaml"), "{}\n").unwrap();
        std::fs::write(dir.join("hook.secret"), SECRET).unwrap();
        git(&seed, &["add", "-A"]);
        git(&seed, &["commit", "--quiet", "-m", "first"]);
        git(
            &seed,
            &["remote", "add", "origin", &format!("{d}/remote.git")],
        );
        git(&seed, &["push", "--quiet", "origin", "main"]);
        let listens: Vec<u16> = (0..NODES).map(|_| procs::free_port()).collect();
        let interval = if mode == "poll" { "2s" } else { "1h" };
        let daemons: Vec<Proc> = (0..NODES)
            .map(|n| {
                let mut cmd = procs::lunafront();
                cmd.current_dir(&dir).args([
                    "daemon",
                    &format!("node-{n}/state"),
                    "--target",
                    &format!("node-{n}"),
                    "--listen",
                    &format!("127.0.0.1:{}", listens[n]),
                    "--git",
                    &format!("{d}/remote.git"),
                    "--git-interval",
                    interval,
                    "--git-hook-secret-file",
                    "hook.secret",
                ]);
                Proc::spawn(
                    "lunafront daemon",
                    cmd,
                    &dir.join(format!("daemon-{n}.log")),
                )
            })
            .collect();
        for port in &http {
            procs::wait_200(*port, "d0.fleet.example.com", Duration::from_secs(120))
                .expect("a node never served the first commit");
        }
        let mut all = Vec::new();
        let mut per_node: Vec<Vec<f64>> = vec![Vec::new(); NODES];
        let mut new = "domains:\n".to_string();
        for k in 0..turns {
            if mode == "poll" {
                // Pushes spread over the interval (a fixed spread, the same every run): the
                // nodes' fetches are not in step with the commits.
                std::thread::sleep(Duration::from_millis((k as u64 * 7_919 + 1_237) % 2_000));
            }
            let host = format!("new-{k}.fleet.example.com");
            new.push_str(&format!("  {host}: {{ backend: app }}\n"));
            std::fs::write(seed.join("new.yaml"), &new).unwrap();
            git(&seed, &["commit", "--quiet", "-a", "-m", &host]);
            // Timed from the moment the remote has the commit.
            git(&seed, &["push", "--quiet", "origin", "main"]);
            let pushed = Instant::now();
            if mode == "hook" {
                let body = format!("{{\"ref\":\"refs/heads/main\",\"turn\":{k}}}");
                for port in &listens {
                    hook(*port, &body);
                }
            }
            let mut pending: Vec<usize> = (0..NODES).collect();
            let deadline = pushed + Duration::from_secs(60);
            while !pending.is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "{mode}: {host} never answered on every node"
                );
                pending.retain(|&n| {
                    if procs::get(http[n], &host) == Some(200) {
                        per_node[n].push(ms(pushed.elapsed()));
                        false
                    } else {
                        true
                    }
                });
                std::thread::sleep(Duration::from_millis(2));
            }
            all.push(ms(pushed.elapsed()));
            // The next commit once every node finished this one's reconcile.
            for port in &listens {
                let before = procs::reconciles(*port);
                let until = Instant::now() + Duration::from_millis(300);
                while procs::reconciles(*port) == before && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        drop(daemons);
        all.sort_by(|a, b| a.total_cmp(b));
        let slowest = per_node
            .iter_mut()
            .map(|v| {
                v.sort_by(|a, b| a.total_cmp(b));
                percentile(v, 0.5)
            })
            .fold(0.0, f64::max);
        let (p50, p99, max) = (
            percentile(&all, 0.5),
            percentile(&all, 0.99),
            *all.last().unwrap(),
        );
        report.figure(format!("fleet.{mode}.p50_ms"), p50, "ms", Better::Lower);
        report.figure(format!("fleet.{mode}.p99_ms"), p99, "ms", Better::Lower);
        let (label, bound, verdict) = if mode == "poll" {
            // Issue 14: the other nodes converge within their interval (2 s here), plus the
            // fetch, the checks and the apply: 1 s is left for those.
            let met = max < 3_000.0;
            report.goal(
                "fleet",
                format!("commit → live on all {NODES} nodes, polling every 2 s: within the interval (max < 2 s + 1 s)"),
                format!("max {max:.0} ms (p50 {p50:.0} ms)"),
                met,
            );
            let verdict = if met { "met" } else { "**NOT MET**" };
            ("polling every 2 s", "max < 3000 ms", verdict)
        } else {
            ("push webhook", "-", "")
        };
        table.row(vec![
            label.into(),
            format!("{p50:.0} ms"),
            format!("{p99:.0} ms"),
            format!("{max:.0} ms"),
            format!("{slowest:.0} ms"),
            bound.into(),
            verdict.into(),
        ]);
        let _ = std::fs::remove_dir_all(&dir);
    }
    table.note("Each commit adds one domain (a runtime change); the time runs from `git push` returning to the domain answering 200 on the last of the three nodes (each polled every 2 ms on a fresh connection). Polling: a node hears of the commit at its next fetch, so the figure is about half the interval plus the fetch (the pushes are spread over the interval), the checks (a fast-forward, the state validated from the commit before it is checked out) and the apply. Webhook: each node is sent the forge's signed `POST /hooks/git` right after the push.");
    report.tables.push(table);
}
