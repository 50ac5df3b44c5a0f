//! Scenario 2, the data-plane cost of the generated configuration: the same HAProxy binary and
//! the same upstreams (N apps, each its own address and port), requests spread over N hosts,
//! three configurations side by side:
//!   a. the limit: one frontend, one static backend holding the N upstreams (round-robin), no
//!      host routing;
//!   b. lunafront's generated configuration (maps, set-var routing, agent pools);
//!   c. a per-host ACL chain (`acl host_i hdr(host) -i …` + `use_backend be_i if host_i` per
//!      host: the shape of hand-written configurations and of the CloudLunacy front server);
//! and for reference a₁, one backend with a single upstream: what no router of N apps can
//! reach (one hot connection pool instead of N).
//! The configurations run at once, each pinned to the same CPU, and are measured in turns
//! (a b c a₁, a b c a₁, …): each ratio is taken within one round, then the median over rounds.

use crate::procs::{self, FRONT_CPU, Platform, Proc};
use crate::report::{Better, Report, Table, median};
use std::path::Path;
use std::time::{Duration, Instant};

const CONNECTIONS: u32 = 50;

struct Front {
    label: &'static str,
    port: u16,
    proc: Proc,
    start_s: f64,
}

/// Everything of the generated configuration before its first frontend (global and defaults),
/// so a and c differ from b only by their routing. Its stats socket moves to `socket`.
fn head_of(generated: &str, socket: &Path) -> String {
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

fn upstream(platform: &Platform, i: usize) -> String {
    let (agent, port) = platform.app(i);
    format!("{}:{port}", Platform::agent_ip(agent))
}

fn config_a(head: &str, port: u16, platform: &Platform) -> String {
    let mut s = format!(
        "{head}\nfrontend fe\n    mode http\n    bind 127.0.0.1:{port}\n    default_backend be\n\nbackend be\n    mode http\n    balance roundrobin\n"
    );
    for i in 0..platform.domains {
        s.push_str(&format!("    server s{i} {}\n", upstream(platform, i)));
    }
    s
}

fn config_a1(head: &str, port: u16, platform: &Platform) -> String {
    format!(
        "{head}\nfrontend fe\n    mode http\n    bind 127.0.0.1:{port}\n    default_backend be\n\nbackend be\n    mode http\n    server s1 {}\n",
        upstream(platform, 0)
    )
}

fn config_c(head: &str, port: u16, platform: &Platform) -> String {
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

fn start(label: &'static str, config: &Path, port: u16) -> Front {
    let t = Instant::now();
    let proc = procs::haproxy(config, FRONT_CPU, port);
    Front {
        label,
        port,
        proc,
        start_s: t.elapsed().as_secs_f64(),
    }
}

pub fn run(report: &mut Report, root: &Path, quick: bool) {
    let sizes: &[usize] = if quick {
        &[1, 1_000]
    } else {
        &[1, 1_000, 10_000, 50_000]
    };
    // More short rounds rather than fewer long ones: the machine's noise comes and goes, and
    // a ratio is taken within a round.
    let (rounds, seconds) = if quick { (1, 2) } else { (4, 2) };
    // Before each turn: the previous front's idle upstream connections close (the origin's
    // keep-alive timeout is 1 s).
    let pause = Duration::from_millis(1_200);
    let (_origin, origin_port) = procs::origin(root);
    let mut table = Table::new(
        &format!(
            "Data-plane cost: requests spread over N hosts ({CONNECTIONS} keep-alive connections, front pinned to one CPU, median of {rounds} round(s) of {seconds} s)"
        ),
        &[
            "N hosts",
            "a: limit req/s",
            "b: lunafront req/s",
            "c: ACL chain req/s",
            "**b/a req/s**",
            "c/a req/s",
            "b/a p99",
            "c/a p99",
            "a₁: one upstream req/s",
            "front CPU per request a / b / c",
            "p99 a / b / c",
            "start a / b / c",
            "RSS a / b / c",
        ],
    );
    for &n in sizes {
        let dir = root.join(format!("dataplane-{n}"));
        let mut platform = Platform::new(&dir, n, origin_port);
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
        let generated = std::fs::read_to_string(dir.join("b/haproxy.cfg")).unwrap();
        let write = |name: &str, make: fn(&str, u16, &Platform) -> String| {
            let port = procs::free_port();
            let path = dir.join(format!("{name}.cfg"));
            let head = head_of(&generated, &dir.join(format!("{name}.sock")));
            std::fs::write(&path, make(&head, port, &platform)).unwrap();
            (path, port)
        };
        let (a, c, a1) = (
            write("a", config_a),
            write("c", config_c),
            write("a1", config_a1),
        );
        let fronts = [
            start("a", &a.0, a.1),
            start("b", &dir.join("b/haproxy.cfg"), platform.http_port),
            start("c", &c.0, c.1),
            start("a1", &a1.0, a1.1),
        ];
        // Every configuration answers every host: first, middle, last answer 200.
        for front in &fronts {
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
        let hosts = platform.hosts_file();
        for front in &fronts {
            procs::wrk(front.port, &hosts, 1, CONNECTIONS); // warm-up
        }
        let mut rps: [Vec<f64>; 4] = Default::default();
        let mut p99: [Vec<f64>; 4] = Default::default();
        let mut cpu: [Vec<f64>; 4] = Default::default();
        let mut errors = 0;
        for round in 0..rounds {
            // a₁ is a reference: measured once.
            let turns = if round == 0 { 4 } else { 3 };
            for (i, front) in fronts.iter().enumerate().take(turns) {
                std::thread::sleep(pause);
                let before = procs::cpu_time(front.proc.pid());
                let r = procs::wrk(front.port, &hosts, seconds, CONNECTIONS);
                let used = procs::cpu_time(front.proc.pid()) - before;
                errors += r.status_errors + r.socket_errors();
                rps[i].push(r.rps());
                p99[i].push(r.p99_us / 1000.0);
                cpu[i].push(used.as_secs_f64() * 1e6 / r.requests.max(1) as f64);
            }
        }
        let rss: Vec<f64> = fronts
            .iter()
            .map(|f| procs::memory_kb(f.proc.pid()).0 as f64 / 1024.0)
            .collect();
        let (ra, rb, rc, ra1) = (
            median(&rps[0]),
            median(&rps[1]),
            median(&rps[2]),
            median(&rps[3]),
        );
        let (la, lb, lc) = (median(&p99[0]), median(&p99[1]), median(&p99[2]));
        let (ca, cb, cc) = (median(&cpu[0]), median(&cpu[1]), median(&cpu[2]));
        // Ratios per round, then their median: each ratio compares runs seconds apart.
        let ratio =
            |x: &[f64], y: &[f64]| median(&x.iter().zip(y).map(|(x, y)| x / y).collect::<Vec<_>>());
        let (b_a, c_a) = (ratio(&rps[1], &rps[0]), ratio(&rps[2], &rps[0]));
        let (pb_a, pc_a) = (ratio(&p99[1], &p99[0]), ratio(&p99[2], &p99[0]));
        let name = if n >= 1000 {
            format!("{}k", n / 1000)
        } else {
            n.to_string()
        };
        let figure = |report: &mut Report, what: &str, value: f64, unit: &str, better| {
            report.figure(format!("dataplane.{name}.{what}"), value, unit, better)
        };
        figure(report, "a_rps", ra, "req/s", Better::Higher);
        figure(report, "b_rps", rb, "req/s", Better::Higher);
        figure(report, "c_rps", rc, "req/s", Better::Higher);
        figure(report, "b_over_a_rps", b_a, "ratio", Better::Higher);
        figure(report, "c_over_a_rps", c_a, "ratio", Better::Higher);
        figure(report, "b_over_a_p99", pb_a, "ratio", Better::Lower);
        figure(report, "b_p99_ms", lb, "ms", Better::Lower);
        figure(report, "b_cpu_us_per_request", cb, "µs", Better::Lower);
        table.row(vec![
            n.to_string(),
            format!("{ra:.0}"),
            format!("{rb:.0}"),
            format!("{rc:.0}"),
            format!("**{b_a:.3}**"),
            format!("{c_a:.3}"),
            format!("{pb_a:.2}"),
            format!("{pc_a:.2}"),
            format!("{ra1:.0}"),
            format!("{ca:.1} / {cb:.1} / {cc:.1} µs"),
            format!("{la:.2} / {lb:.2} / {lc:.2} ms"),
            format!(
                "{:.1} / {:.1} / {:.1} s",
                fronts[0].start_s, fronts[1].start_s, fronts[2].start_s
            ),
            format!("{:.0} / {:.0} / {:.0} MB", rss[0], rss[1], rss[2]),
        ]);
        report.goal(
            "data-plane cost",
            format!("b/a req/s ≥ 0.95 at N={n}"),
            format!("{b_a:.3} (c/a {c_a:.3})"),
            b_a >= 0.95,
        );
        if errors > 0 {
            report.failures.push(format!(
                "data-plane cost at N={n}: {errors} failed requests"
            ));
        }
        drop(fronts);
        drop(platform);
        let _ = std::fs::remove_dir_all(&dir);
    }
    table.note("The configurations share lunafront's `global` and `defaults` sections and the upstreams: an origin HAProxy answering 200 itself on 100 ports of 127.0.x.y (every app its own address and port), on the other CPU with wrk. b also adds `X-Forwarded-For` and `X-Forwarded-Proto`, as every lunafront frontend does. p99 ratios above 1 are slower than the limit. a₁ (one upstream for every request) shows what N distinct upstreams cost any router: N connection pools instead of one.");
    report.tables.push(table);
}
