//! Scenario 2, the data-plane cost of the generated configuration: the same HAProxy binary and
//! the same upstreams (N apps, each its own address and port), requests spread over N hosts,
//! configurations side by side:
//!   a. the limit: one frontend, one static backend holding the N upstreams (round-robin), no
//!      host routing;
//!   b. lunafront's generated configuration (maps, set-var routing, agent pools);
//!   c. a per-host ACL chain (`acl host_i hdr(host) -i …` + `use_backend be_i if host_i` per
//!      host: the shape of hand-written configurations and of the CloudLunacy front server);
//!   d. the hand-written best for the same apps: a host map naming one backend per app;
//!   a₁. one backend with a single upstream: what no router of N apps can reach (one hot
//!      connection pool instead of N).
//! They run at once, each pinned to the same CPU, and are measured in rotated turns
//! (`fronts::measure`); each ratio is taken within one round, then the median over rounds.

use crate::fronts::{self, CONNECTIONS, Front, Turn};
use crate::procs::{self, Platform};
use crate::report::{Better, Report, Table, guarded};
use std::path::Path;

pub fn run(report: &mut Report, root: &Path, quick: bool) {
    let sizes: &[usize] = if quick {
        &[1, 1_000]
    } else {
        &[1, 1_000, 10_000, 50_000]
    };
    // More short rounds rather than fewer long ones: the machine's noise comes and goes, and
    // a ratio is taken within a round.
    let (rounds, seconds) = if quick { (1, 2) } else { (4, 2) };
    let bin = procs::primary();
    let (_origin, origin_port) = procs::origin(root);
    let mut table = Table::new(
        &format!(
            "Data-plane cost: requests spread over N hosts ({CONNECTIONS} keep-alive connections, front pinned to one CPU, median of {rounds} round(s) of {seconds} s, HAProxy {})",
            bin.version
        ),
        &[
            "N hosts",
            "a: limit req/s",
            "b: lunafront req/s",
            "c: ACL chain req/s",
            "d: map → backend per app req/s",
            "**b/a req/s**",
            "b/d req/s",
            "c/a req/s",
            "b/a p99",
            "c/a p99",
            "a₁: one upstream req/s",
            "front CPU per request a / b / c / d",
            "p99 a / b / c / d",
            "start a / b / c / d",
            "RSS a / b / c / d",
        ],
    );
    let mut method = Vec::new();
    for &n in sizes {
        let dir = root.join(format!("dataplane-{n}"));
        guarded(report, &format!("data-plane cost at N={n}"), |report| {
            let mut platform = Platform::new(&dir, n, origin_port);
            let (b_config, generated) = fronts::render_lunafront(&mut platform, &dir);
            let a = fronts::write_config(&dir, &generated, "a", |h, p, _| {
                fronts::limit(h, p, &platform)
            });
            let c = fronts::write_config(&dir, &generated, "c", |h, p, _| {
                fronts::acl_chain(h, p, &platform)
            });
            let d = fronts::write_config(&dir, &generated, "d", |h, p, path| {
                fronts::map_per_app(h, p, &platform, path)
            });
            let a1 = fronts::write_config(&dir, &generated, "a1", |h, p, _| {
                fronts::bare(h, p, &platform, &[])
            });
            let fronts = [
                Front::start(bin, "a", &a.0, a.1),
                Front::start(bin, "b", &b_config, platform.http_port),
                Front::start(bin, "c", &c.0, c.1),
                Front::start(bin, "d", &d.0, d.1),
                Front::start(bin, "a1", &a1.0, a1.1),
            ];
            // Every configuration answers every host: first, middle, last answer 200.
            fronts::check_routes(&fronts[..4], n);
            let hosts = platform.hosts_file();
            let turns = fronts::measure(&fronts, &hosts, rounds, seconds);
            report.failures.extend(fronts::sanity(
                &format!("data-plane cost at N={n}"),
                &fronts,
                &turns,
            ));
            let memory: Vec<f64> = fronts.iter().map(|f| f.memory_mb().0).collect();
            let rps = |i: usize| fronts::median_of(&turns[i], |t| t.rps);
            let p99 = |i: usize| fronts::median_of(&turns[i], |t| t.p99_ms);
            let cpu = |i: usize| fronts::median_of(&turns[i], |t| t.cpu_us_per_request);
            let ratio =
                |x: usize, y: usize, f: fn(&Turn) -> f64| fronts::ratio(&turns[x], &turns[y], f);
            let (b_a, c_a, b_d) = (
                ratio(1, 0, |t| t.rps),
                ratio(2, 0, |t| t.rps),
                ratio(1, 3, |t| t.rps),
            );
            let (pb_a, pc_a) = (ratio(1, 0, |t| t.p99_ms), ratio(2, 0, |t| t.p99_ms));
            if rounds > 1 {
                method.push(format!(
                    "N={n}: b/a {:.3} by the upper middle value, {b_a:.3} by the median",
                    fronts::ratio_upper_middle(&turns[1], &turns[0], |t| t.rps)
                ));
                report.figure(
                    format!("dataplane.{}.b_over_a_rps_upper_middle", name(n)),
                    fronts::ratio_upper_middle(&turns[1], &turns[0], |t| t.rps),
                    "ratio",
                    Better::Higher,
                );
            }
            let figure = |report: &mut Report, what: &str, value: f64, unit: &str, better| {
                report.figure(format!("dataplane.{}.{what}", name(n)), value, unit, better)
            };
            figure(report, "a_rps", rps(0), "req/s", Better::Higher);
            figure(report, "b_rps", rps(1), "req/s", Better::Higher);
            figure(report, "c_rps", rps(2), "req/s", Better::Higher);
            figure(report, "d_rps", rps(3), "req/s", Better::Higher);
            figure(report, "b_over_a_rps", b_a, "ratio", Better::Higher);
            figure(report, "b_over_d_rps", b_d, "ratio", Better::Higher);
            figure(report, "c_over_a_rps", c_a, "ratio", Better::Higher);
            figure(report, "b_over_a_p99", pb_a, "ratio", Better::Lower);
            figure(report, "b_p99_ms", p99(1), "ms", Better::Lower);
            figure(report, "b_cpu_us_per_request", cpu(1), "µs", Better::Lower);
            figure(report, "d_cpu_us_per_request", cpu(3), "µs", Better::Lower);
            table.row(vec![
                n.to_string(),
                format!("{:.0}", rps(0)),
                format!("{:.0}", rps(1)),
                format!("{:.0}", rps(2)),
                format!("{:.0}", rps(3)),
                format!("**{b_a:.3}**"),
                format!("{b_d:.3}"),
                format!("{c_a:.3}"),
                format!("{pb_a:.2}"),
                format!("{pc_a:.2}"),
                format!("{:.0}", rps(4)),
                format!(
                    "{:.1} / {:.1} / {:.1} / {:.1} µs",
                    cpu(0),
                    cpu(1),
                    cpu(2),
                    cpu(3)
                ),
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} ms",
                    p99(0),
                    p99(1),
                    p99(2),
                    p99(3)
                ),
                format!(
                    "{:.1} / {:.1} / {:.1} / {:.1} s",
                    fronts[0].start_s, fronts[1].start_s, fronts[2].start_s, fronts[3].start_s
                ),
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0} MB",
                    memory[0], memory[1], memory[2], memory[3]
                ),
            ]);
            report.goal(
                "data-plane cost",
                format!("b/a req/s ≥ 0.95 at N={n}"),
                format!("{b_a:.3} (b/d {b_d:.3}, c/a {c_a:.3})"),
                b_a >= 0.95,
            );
            drop(fronts);
            drop(platform);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
    table.note("The configurations share lunafront's `global` and `defaults` sections and the upstreams: an origin HAProxy answering 200 itself on 100 ports of 127.0.x.y (every app its own address and port), on the other CPU with wrk. b and d add `X-Forwarded-For` and `X-Forwarded-Proto` (every lunafront frontend does; the `topology` table measures what each costs), a and c do not. p99 ratios above 1 are slower than the limit. a₁ (one upstream for every request) shows what N distinct upstreams cost any router: N connection pools instead of one. Turns rotate every round (a b c d a₁, b c d a₁ a, …); the CPU per request is each turn's front CPU time over that turn's requests, then the median over rounds.");
    if !method.is_empty() {
        table.note(format!(
            "Method change (issue 17), on these same rounds: {}.",
            method.join("; ")
        ));
    }
    report.tables.push(table);
}

fn name(n: usize) -> String {
    if n >= 1000 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}
