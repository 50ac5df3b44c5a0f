//! Fronts side by side: HAProxy configurations for the same apps and upstreams (lunafront's and
//! the hand-written ones it is compared with), started at once on the front CPU and measured
//! in turns. The order rotates every round (a b c, b c a, c a b, …) so that no configuration
//! always runs first after the pause, or always in the same stretch of a noisy machine; every
//! ratio is taken within a round, then its median over rounds.

use crate::procs::{self, FRONT_CPU, HaproxyBin, Platform, Proc};
use crate::report::{median, upper_middle};
use std::path::Path;
use std::time::{Duration, Instant};

pub const CONNECTIONS: u32 = 50;

/// Before each turn: the previous front's idle upstream connections close (the origin's
/// keep-alive timeout is 1 s).
pub const PAUSE: Duration = Duration::from_millis(1_200);

pub struct Front {
    pub label: String,
    pub port: u16,
    pub proc: Proc,
    /// From the process start to its port accepting connections.
    pub start_s: f64,
}

impl Front {
    pub fn start(bin: &HaproxyBin, label: &str, config: &Path, port: u16) -> Front {
        let t = Instant::now();
        let proc = procs::haproxy_with(bin, config, FRONT_CPU, port);
        Front {
            label: label.to_string(),
            port,
            proc,
            start_s: t.elapsed().as_secs_f64(),
        }
    }

    /// (VmRSS, VmHWM) in MB.
    pub fn memory_mb(&self) -> (f64, f64) {
        let (rss, hwm) = procs::memory_kb(self.proc.pid());
        (rss as f64 / 1024.0, hwm as f64 / 1024.0)
    }
}

/// One front's turn in one round.
#[derive(Debug, Clone, Copy, Default)]
pub struct Turn {
    pub rps: f64,
    pub p99_ms: f64,
    /// The front's CPU time over the turn divided by the requests of that same turn.
    pub cpu_us_per_request: f64,
    /// The front's CPU time over the turn's wall time: at most 1 on one pinned CPU.
    pub cpu_share: f64,
    /// Answers other than 2xx/3xx.
    pub failed: u64,
    pub socket_errors: u64,
}

/// `rounds` rounds of a `seconds` wrk run against each front, in rotated order; a warm-up
/// first. `turns[f][r]` is front `f` in round `r`.
pub fn measure(fronts: &[Front], hosts: &Path, rounds: usize, seconds: u64) -> Vec<Vec<Turn>> {
    for front in fronts {
        procs::wrk(front.port, hosts, 1, CONNECTIONS); // warm-up
    }
    let mut turns = vec![Vec::with_capacity(rounds); fronts.len()];
    for round in 0..rounds {
        for i in order(round, fronts.len()) {
            let front = &fronts[i];
            std::thread::sleep(PAUSE);
            let before = procs::cpu_time(front.proc.pid());
            let t = Instant::now();
            let r = procs::wrk(front.port, hosts, seconds, CONNECTIONS);
            let wall = t.elapsed();
            let used = procs::cpu_time(front.proc.pid()) - before;
            turns[i].push(Turn {
                rps: r.rps(),
                p99_ms: r.p99_us / 1000.0,
                cpu_us_per_request: used.as_secs_f64() * 1e6 / r.requests.max(1) as f64,
                cpu_share: used.as_secs_f64() / wall.as_secs_f64(),
                failed: r.status_errors,
                socket_errors: r.socket_errors(),
            });
        }
    }
    turns
}

pub fn values(turns: &[Turn], f: fn(&Turn) -> f64) -> Vec<f64> {
    turns.iter().map(f).collect()
}

pub fn median_of(turns: &[Turn], f: fn(&Turn) -> f64) -> f64 {
    median(&values(turns, f))
}

/// The median over rounds of x/y, each taken within its round.
pub fn ratio(x: &[Turn], y: &[Turn], f: fn(&Turn) -> f64) -> f64 {
    median(&per_round_ratios(x, y, f))
}

/// The same with the method before issue 17 (upper middle value), for the method note.
pub fn ratio_upper_middle(x: &[Turn], y: &[Turn], f: fn(&Turn) -> f64) -> f64 {
    upper_middle(&per_round_ratios(x, y, f))
}

fn per_round_ratios(x: &[Turn], y: &[Turn], f: fn(&Turn) -> f64) -> Vec<f64> {
    x.iter().zip(y).map(|(x, y)| f(x) / f(y)).collect()
}

/// Problems no honest measurement shows: a front using more than its one CPU, failed requests.
pub fn sanity(label: &str, fronts: &[Front], turns: &[Vec<Turn>]) -> Vec<String> {
    let labels: Vec<&str> = fronts.iter().map(|f| f.label.as_str()).collect();
    sanity_of(label, &labels, turns)
}

fn sanity_of(label: &str, fronts: &[&str], turns: &[Vec<Turn>]) -> Vec<String> {
    let mut problems = Vec::new();
    for (front, turns) in fronts.iter().zip(turns) {
        let worst = turns.iter().map(|t| t.cpu_share).fold(0.0, f64::max);
        // /proc counts in clock ticks (10 ms): a little over 1 is rounding.
        if worst > 1.05 {
            problems.push(format!(
                "{label}: front {front} used {worst:.2} CPU-seconds per second on one pinned CPU: the CPU measurement is wrong"
            ));
        }
        let failed: u64 = turns.iter().map(|t| t.failed).sum();
        let socket: u64 = turns.iter().map(|t| t.socket_errors).sum();
        if failed + socket > 0 {
            problems.push(format!(
                "{label}: front {front}: {failed} answers other than 2xx/3xx and {socket} socket errors (wrk)"
            ));
        }
    }
    problems
}

/// The turn order and the sanity rules, checked on known inputs (`--check` runs it).
pub fn self_check() -> Vec<String> {
    let mut problems = Vec::new();
    let turn = |cpu_share: f64, failed: u64, socket_errors: u64| Turn {
        rps: 1000.0,
        cpu_share,
        failed,
        socket_errors,
        ..Turn::default()
    };
    let honest = vec![vec![turn(0.99, 0, 0), turn(1.04, 0, 0)]];
    if !sanity_of("x", &["a"], &honest).is_empty() {
        problems.push("self-check: an honest front is flagged".into());
    }
    for (what, turns) in [
        (
            "more than one CPU",
            vec![vec![turn(0.5, 0, 0), turn(1.2, 0, 0)]],
        ),
        ("a failed answer", vec![vec![turn(0.5, 1, 0)]]),
        ("a socket error", vec![vec![turn(0.5, 0, 1)]]),
    ] {
        if sanity_of("x", &["a"], &turns).len() != 1 {
            problems.push(format!("self-check: {what} is not flagged"));
        }
    }
    let orders: Vec<Vec<usize>> = (0..3).map(|round| order(round, 3)).collect();
    if orders != [vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1]] {
        problems.push(format!("self-check: turns do not rotate: {orders:?}"));
    }
    problems
}

/// The fronts' order in `round`: rotated by one each round.
fn order(round: usize, fronts: usize) -> Vec<usize> {
    (0..fronts).map(|k| (round + k) % fronts).collect()
}

/// Every front answers 200 for the first, middle and last host.
pub fn check_routes(fronts: &[Front], n: usize) {
    for front in fronts {
        for i in [0, n / 2, n - 1] {
            assert_eq!(
                procs::get(front.port, &Platform::host(i)),
                Some(200),
                "config {} does not route {}",
                front.label,
                Platform::host(i)
            );
        }
    }
}

// ---- The configurations. Each shares lunafront's `global` and `defaults` (`head_of`). ----

/// Everything of the generated configuration before its first frontend (global and defaults),
/// so the other configurations differ from lunafront's only by their frontend and backends.
/// Its stats socket moves to `socket`.
pub fn head_of(generated: &str, socket: &Path) -> String {
    let head = generated.split("\nfrontend ").next().unwrap_or_default();
    head.lines()
        .map(|l| {
            if l.trim_start().starts_with("stats socket ") {
                format!("    stats socket {} mode 600 level admin", socket.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

pub fn upstream(platform: &Platform, i: usize) -> String {
    let (agent, port) = platform.app(i);
    format!("{}:{port}", Platform::agent_ip(agent))
}

/// What lunafront's HTTP frontends add to every request.
pub const XFF: &str = "    option forwardfor\n";
pub const XFP: &str = "    http-request set-header X-Forwarded-Proto http\n";

/// a: the limit — no host routing, one backend holding the N upstreams (round-robin).
pub fn limit(head: &str, port: u16, platform: &Platform) -> String {
    let mut s = format!(
        "{head}\nfrontend fe\n    mode http\n    bind 127.0.0.1:{port}\n    default_backend be\n\nbackend be\n    mode http\n    balance roundrobin\n"
    );
    for i in 0..platform.domains {
        s.push_str(&format!("    server s{i} {}\n", upstream(platform, i)));
    }
    s
}

/// A bare HAProxy: no host routing, one upstream (app 0), with `features` (`XFF`, `XFP`) in
/// its frontend.
pub fn bare(head: &str, port: u16, platform: &Platform, features: &[&str]) -> String {
    format!(
        "{head}\nfrontend fe\n    mode http\n    bind 127.0.0.1:{port}\n{}    default_backend be\n\nbackend be\n    mode http\n    server s1 {}\n",
        features.concat(),
        upstream(platform, 0)
    )
}

/// c: a per-host ACL chain (`acl` + `use_backend if` per host: hand-written configurations and
/// the CloudLunacy front server).
pub fn acl_chain(head: &str, port: u16, platform: &Platform) -> String {
    let mut s = format!("{head}\nfrontend fe\n    mode http\n    bind 127.0.0.1:{port}\n");
    for i in 0..platform.domains {
        s.push_str(&format!(
            "    acl host_{i} hdr(host) -i {}\n    use_backend be_{i} if host_{i}\n",
            Platform::host(i)
        ));
    }
    s.push_str("    default_backend not_found\n\nbackend not_found\n    mode http\n    http-request return status 404\n");
    for i in 0..platform.domains {
        s.push_str(&format!(
            "\nbackend be_{i}\n    mode http\n    server s1 {}\n",
            upstream(platform, i)
        ));
    }
    s
}

/// d: the hand-written best for the same apps — one map lookup of the Host header names the
/// app's own backend (one server each) — with the headers lunafront adds (XFF, XFP), so that
/// b/d compares the routing and nothing else. Writes its map beside `config`.
pub fn map_per_app(head: &str, port: u16, platform: &Platform, config: &Path) -> String {
    let map = config.with_extension("map");
    let lines: String = (0..platform.domains)
        .map(|i| format!("{} be_{i}\n", Platform::host(i)))
        .collect();
    std::fs::write(&map, lines).unwrap();
    let mut s = format!(
        "{head}\nfrontend fe\n    mode http\n    bind 127.0.0.1:{port}\n{XFF}{XFP}    use_backend %[req.hdr(host),field(1,:),lower,map({})]\n    default_backend not_found\n\nbackend not_found\n    mode http\n    http-request return status 404\n",
        map.display()
    );
    for i in 0..platform.domains {
        s.push_str(&format!(
            "\nbackend be_{i}\n    mode http\n    server s1 {}\n",
            upstream(platform, i)
        ));
    }
    s
}

/// lunafront's configuration without the headers it adds (XFF, XFP): its routing alone.
pub fn without_headers(generated: &str) -> String {
    generated
        .lines()
        .filter(|l| {
            let l = l.trim();
            l != "option forwardfor" && !l.starts_with("http-request set-header X-Forwarded-Proto")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Renders the platform's state with lunafront into `dir/b` (target `local`); returns the
/// configuration's path and text.
pub fn render_lunafront(platform: &mut Platform, dir: &Path) -> (std::path::PathBuf, String) {
    platform.target = format!(
        "  local: {{ type: haproxy, config: {d}/b/haproxy.cfg, runtime_socket: {d}/b/admin.sock, state_dir: {d}/b/state }}\n",
        d = dir.display()
    );
    platform.save();
    procs::lunafront_ok(&[
        "render",
        platform.state_file().to_str().unwrap(),
        "--out",
        dir.join("b").to_str().unwrap(),
        "--target",
        "local",
    ]);
    let path = dir.join("b/haproxy.cfg");
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

/// Writes `dir/<name>.cfg` from lunafront's head and `make`; returns (path, port).
pub fn write_config(
    dir: &Path,
    generated: &str,
    name: &str,
    make: impl FnOnce(&str, u16, &Path) -> String,
) -> (std::path::PathBuf, u16) {
    let port = procs::free_port();
    let path = dir.join(format!("{name}.cfg"));
    let head = head_of(generated, &dir.join(format!("{name}.sock")));
    let text = make(&head, port, &path);
    std::fs::write(&path, text).unwrap();
    (path, port)
}
