//! Scenario 6, the data plane at the limit (issue 13), on every HAProxy of `--haproxy`:
//!   - the topologies of a platform whose biggest agent hosts thousands of apps — 10,000 apps
//!     on one agent, and 100 agents × 100 apps — lunafront's configuration (b) against the
//!     hand-written best for the same apps (d: a host map naming one backend per app, with the
//!     same forwarded headers), measured in rotated turns;
//!   - one app: lunafront against a bare HAProxy (no host routing), and what each header it
//!     adds (`X-Forwarded-For`, `X-Forwarded-Proto`) costs on its own;
//!   - 50,000 apps: HAProxy's start time and memory with b and with d (starts alternate);
//!   - a new app on a known agent, applied to a live HAProxy at the one-agent size: the worker
//!     PIDs and the master's reload counter say whether it reloaded.

use crate::fronts::{self, CONNECTIONS, Front, Turn};
use crate::procs::{self, HaproxyBin, Platform};
use crate::report::{Better, Report, Table, guarded, median};
use lunafront::target::haproxy::socket::MasterCli;
use std::path::Path;
use std::time::{Duration, Instant};

struct Sizes {
    one_agent: usize,
    agents: usize,
    per_agent: usize,
    memory: usize,
    rounds: usize,
    seconds: u64,
    starts: usize,
}

pub fn run(report: &mut Report, root: &Path, quick: bool, bins: &[HaproxyBin]) {
    let sizes = if quick {
        Sizes {
            one_agent: 1_000,
            agents: 10,
            per_agent: 100,
            memory: 5_000,
            rounds: 1,
            seconds: 1,
            starts: 1,
        }
    } else {
        Sizes {
            one_agent: 10_000,
            agents: 100,
            per_agent: 100,
            memory: 50_000,
            rounds: 4,
            seconds: 2,
            starts: 2,
        }
    };
    // Apps added on the one agent by the runtime check take ports after the others'.
    const ADDED: usize = 2;
    let origin_ports = (sizes.one_agent + ADDED) as u16;
    let (_origin, origin_port) = procs::origin_on(root, origin_ports);
    let mut topologies = Table::new(
        &format!(
            "Topologies: lunafront (b) against the hand-written map → backend per app (d), same apps ({CONNECTIONS} keep-alive connections, front pinned to one CPU, median of {} round(s) of {} s)",
            sizes.rounds, sizes.seconds
        ),
        &[
            "HAProxy",
            "apps",
            "b: lunafront req/s",
            "d: hand-written req/s",
            "**b/d req/s**",
            "b/d by front CPU per request",
            "b/d p99",
            "front CPU per request b / d",
            "start b / d",
            "RSS b / d",
        ],
    );
    let mut one_app = Table::new(
        &format!(
            "One app: lunafront against a bare HAProxy (no host routing), and each header apart (median of {} round(s) of {} s)",
            sizes.rounds, sizes.seconds
        ),
        &[
            "HAProxy",
            "bare req/s",
            "+XFF / bare",
            "+XFP / bare",
            "lunafront without the headers / bare",
            "**lunafront / bare**",
            "lunafront / bare by front CPU per request",
            "front CPU per request bare / +XFF / +XFP / lunafront without / lunafront",
        ],
    );
    let mut memory = Table::new(
        &format!(
            "{} apps (100 per agent): HAProxy's start and memory, lunafront (b) against one backend per app (d) (median of {} start(s) each, alternating)",
            sizes.memory, sizes.starts
        ),
        &[
            "HAProxy",
            "start b",
            "start d",
            "RSS b",
            "RSS d",
            "**RSS b/d**",
            "**start b/d**",
        ],
    );
    let mut new_app = Table::new(
        &format!(
            "A new app on a known agent, applied to a live HAProxy ({} apps on that agent)",
            sizes.one_agent
        ),
        &[
            "HAProxy",
            "applies",
            "how lunafront applied them",
            "reloads",
            "workers replaced",
        ],
    );

    for bin in bins {
        let v = bin.short();
        eprintln!("== topology on HAProxy {}", bin.version);
        for (label, key, apps, per_agent) in [
            (
                format!("{} on one agent", sizes.one_agent),
                "one_agent",
                sizes.one_agent,
                sizes.one_agent,
            ),
            (
                format!("{} agents × {}", sizes.agents, sizes.per_agent),
                "agents",
                sizes.agents * sizes.per_agent,
                sizes.per_agent,
            ),
        ] {
            let dir = root.join(format!("topology-{v}-{key}"));
            guarded(
                report,
                &format!("topology {label}, HAProxy {v}"),
                |report| {
                    let mut platform = Platform::new(&dir, apps, origin_port);
                    platform.apps_per_agent = per_agent;
                    platform.origin_ports = per_agent.max(100) as u16;
                    let (b_config, generated) = fronts::render_lunafront(&mut platform, &dir);
                    let d = fronts::write_config(&dir, &generated, "d", |h, p, path| {
                        fronts::map_per_app(h, p, &platform, path)
                    });
                    let fronts = [
                        Front::start(bin, "b", &b_config, platform.http_port),
                        Front::start(bin, "d", &d.0, d.1),
                    ];
                    fronts::check_routes(&fronts, apps);
                    let turns = fronts::measure(
                        &fronts,
                        &platform.hosts_file(),
                        sizes.rounds,
                        sizes.seconds,
                    );
                    report.failures.extend(fronts::sanity(
                        &format!("topology {label}, HAProxy {v}"),
                        &fronts,
                        &turns,
                    ));
                    let rps = |i: usize| fronts::median_of(&turns[i], |t| t.rps);
                    let cpu = |i: usize| fronts::median_of(&turns[i], |t| t.cpu_us_per_request);
                    let b_d = fronts::ratio(&turns[0], &turns[1], |t| t.rps);
                    // The same comparison read off each front's own CPU: less swayed by what else
                    // runs on a shared machine than requests/s.
                    let b_d_cpu = fronts::ratio(&turns[1], &turns[0], |t| t.cpu_us_per_request);
                    let p99 = fronts::ratio(&turns[0], &turns[1], |t| t.p99_ms);
                    let (mb, md) = (fronts[0].memory_mb().0, fronts[1].memory_mb().0);
                    let name = format!("topology.haproxy{v}.{key}_{}", apps);
                    report.figure(format!("{name}.b_rps"), rps(0), "req/s", Better::Higher);
                    report.figure(format!("{name}.d_rps"), rps(1), "req/s", Better::Higher);
                    report.figure(format!("{name}.b_over_d_rps"), b_d, "ratio", Better::Higher);
                    report.figure(
                        format!("{name}.b_over_d_by_cpu"),
                        b_d_cpu,
                        "ratio",
                        Better::Higher,
                    );
                    report.figure(
                        format!("{name}.b_cpu_us_per_request"),
                        cpu(0),
                        "µs",
                        Better::Lower,
                    );
                    topologies.row(vec![
                        bin.version.clone(),
                        label.clone(),
                        format!("{:.0}", rps(0)),
                        format!("{:.0}", rps(1)),
                        format!("**{b_d:.3}**"),
                        format!("{b_d_cpu:.3}"),
                        format!("{p99:.2}"),
                        format!("{:.1} / {:.1} µs", cpu(0), cpu(1)),
                        format!("{:.1} / {:.1} s", fronts[0].start_s, fronts[1].start_s),
                        format!("{mb:.0} / {md:.0} MB"),
                    ]);
                    report.goal(
                    "topology",
                    format!(
                        "lunafront / hand-written map → backend per app ≥ 0.95, {label} (HAProxy {v})"
                    ),
                    format!("{b_d:.3} (by CPU per request {b_d_cpu:.3})"),
                    b_d >= 0.95,
                );
                    drop(fronts);
                    if key == "one_agent" {
                        new_app_check(report, &mut new_app, bin, &dir, &mut platform, ADDED);
                    }
                    drop(platform);
                },
            );
            let _ = std::fs::remove_dir_all(&dir);
        }

        guarded(report, &format!("one app, HAProxy {v}"), |report| {
            one_app_row(report, &mut one_app, bin, root, origin_port, &sizes)
        });
        guarded(
            report,
            &format!("{} apps, HAProxy {v}", sizes.memory),
            |report| memory_row(report, &mut memory, bin, root, origin_port, &sizes),
        );
    }
    topologies.note("Both configurations share lunafront's `global` and `defaults`, the upstreams (every app its own port of an origin HAProxy on the other CPU; one agent: one address) and the forwarded headers; d routes with `use_backend %[req.hdr(host),field(1,:),lower,map(…)]` to one backend of one server per app — the best a hand-written configuration does. HAProxy resolves a dynamic `use-server` by walking its backend's servers: with every app of an agent in one pool backend, b's cost grows with the apps on the agent.");
    one_app.note("bare: one frontend, one backend, one server, no host routing; +XFF adds `option forwardfor`, +XFP `http-request set-header X-Forwarded-Proto http` (what every lunafront HTTP frontend adds); *lunafront without the headers* is lunafront's configuration with those two lines removed: its routing alone. Each ratio is taken within a round.");
    memory.note("Each configuration is started alone (`haproxy -db`, pinned to the front CPU), timed from the process start to its port accepting connections; RSS is VmRSS once it listens. d: one backend per app, the host map, the same headers.");
    new_app.note("Each apply adds one app (a backend with one server on agent a0, and its domain) with `lunafront apply` to the HAProxy lunafront started (master-worker); reloads and replaced workers are read from the master's `show proc` before and after, and the new domain must answer 200.");
    report.tables.push(topologies);
    report.tables.push(one_app);
    report.tables.push(memory);
    report.tables.push(new_app);
}

fn one_app_row(
    report: &mut Report,
    table: &mut Table,
    bin: &HaproxyBin,
    root: &Path,
    origin_port: u16,
    sizes: &Sizes,
) {
    let v = bin.short();
    let dir = root.join(format!("topology-{v}-one-app"));
    let mut platform = Platform::new(&dir, 1, origin_port);
    let (b_config, generated) = fronts::render_lunafront(&mut platform, &dir);
    let bare = fronts::write_config(&dir, &generated, "bare", |h, p, _| {
        fronts::bare(h, p, &platform, &[])
    });
    let xff = fronts::write_config(&dir, &generated, "xff", |h, p, _| {
        fronts::bare(h, p, &platform, &[fronts::XFF])
    });
    let xfp = fronts::write_config(&dir, &generated, "xfp", |h, p, _| {
        fronts::bare(h, p, &platform, &[fronts::XFP])
    });
    // Beside b's configuration: its relative map paths resolve next to the file.
    let b0_config = dir.join("b/b0.cfg");
    let b0_port = procs::free_port();
    std::fs::write(
        &b0_config,
        fronts::without_headers(&generated)
            .replace(
                &format!("bind 127.0.0.1:{}", platform.http_port),
                &format!("bind 127.0.0.1:{b0_port}"),
            )
            .replace(
                &dir.join("b/admin.sock").display().to_string(),
                &dir.join("b0.sock").display().to_string(),
            ),
    )
    .unwrap();
    let fronts = [
        Front::start(bin, "bare", &bare.0, bare.1),
        Front::start(bin, "+XFF", &xff.0, xff.1),
        Front::start(bin, "+XFP", &xfp.0, xfp.1),
        Front::start(bin, "lunafront without the headers", &b0_config, b0_port),
        Front::start(bin, "lunafront", &b_config, platform.http_port),
    ];
    fronts::check_routes(&fronts, 1);
    let turns = fronts::measure(&fronts, &platform.hosts_file(), sizes.rounds, sizes.seconds);
    report.failures.extend(fronts::sanity(
        &format!("one app, HAProxy {v}"),
        &fronts,
        &turns,
    ));
    let over_bare = |i: usize| fronts::ratio(&turns[i], &turns[0], |t: &Turn| t.rps);
    let over_bare_cpu = fronts::ratio(&turns[0], &turns[4], |t: &Turn| t.cpu_us_per_request);
    let cpu = |i: usize| fronts::median_of(&turns[i], |t| t.cpu_us_per_request);
    let name = format!("topology.haproxy{v}.one_app");
    report.figure(
        format!("{name}.bare_rps"),
        fronts::median_of(&turns[0], |t| t.rps),
        "req/s",
        Better::Higher,
    );
    for (i, what) in [(1, "xff"), (2, "xfp"), (3, "routing"), (4, "lunafront")] {
        report.figure(
            format!("{name}.{what}_over_bare_rps"),
            over_bare(i),
            "ratio",
            Better::Higher,
        );
    }
    table.row(vec![
        bin.version.clone(),
        format!("{:.0}", fronts::median_of(&turns[0], |t| t.rps)),
        format!("{:.3}", over_bare(1)),
        format!("{:.3}", over_bare(2)),
        format!("{:.3}", over_bare(3)),
        format!("**{:.3}**", over_bare(4)),
        format!("{over_bare_cpu:.3}"),
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1} / {:.1} µs",
            cpu(0),
            cpu(1),
            cpu(2),
            cpu(3),
            cpu(4)
        ),
    ]);
    report.goal(
        "topology",
        format!("lunafront / bare HAProxy ≥ 0.95, 1 app (HAProxy {v})"),
        format!(
            "{:.3} (by CPU per request {over_bare_cpu:.3}; +XFF {:.3}, +XFP {:.3}, without the headers {:.3})",
            over_bare(4),
            over_bare(1),
            over_bare(2),
            over_bare(3)
        ),
        over_bare(4) >= 0.95,
    );
    drop(fronts);
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
}

fn memory_row(
    report: &mut Report,
    table: &mut Table,
    bin: &HaproxyBin,
    root: &Path,
    origin_port: u16,
    sizes: &Sizes,
) {
    let v = bin.short();
    let n = sizes.memory;
    let dir = root.join(format!("topology-{v}-memory"));
    let mut platform = Platform::new(&dir, n, origin_port);
    let (b_config, generated) = fronts::render_lunafront(&mut platform, &dir);
    let d = fronts::write_config(&dir, &generated, "d", |h, p, path| {
        fronts::map_per_app(h, p, &platform, path)
    });
    let mut starts: [Vec<f64>; 2] = Default::default();
    let mut rss: [Vec<f64>; 2] = Default::default();
    for _ in 0..sizes.starts {
        for (i, (config, port)) in [(&b_config, platform.http_port), (&d.0, d.1)]
            .into_iter()
            .enumerate()
        {
            let front = Front::start(bin, if i == 0 { "b" } else { "d" }, config, port);
            // It serves: a known host answers.
            assert_eq!(procs::get(port, &Platform::host(n - 1)), Some(200));
            starts[i].push(front.start_s);
            rss[i].push(front.memory_mb().0);
        }
    }
    let (sb, sd) = (median(&starts[0]), median(&starts[1]));
    let (rb, rd) = (median(&rss[0]), median(&rss[1]));
    let k = n / 1000;
    let name = format!("topology.haproxy{v}.{k}k_apps");
    report.figure(format!("{name}.b_start_s"), sb, "s", Better::Lower);
    report.figure(format!("{name}.d_start_s"), sd, "s", Better::Lower);
    report.figure(format!("{name}.b_rss_mb"), rb, "MB", Better::Lower);
    report.figure(format!("{name}.d_rss_mb"), rd, "MB", Better::Lower);
    table.row(vec![
        bin.version.clone(),
        format!("{sb:.2} s"),
        format!("{sd:.2} s"),
        format!("{rb:.0} MB"),
        format!("{rd:.0} MB"),
        format!("**{:.2}**", rb / rd),
        format!("**{:.2}**", sb / sd),
    ]);
    report.goal(
        "topology",
        format!("HAProxy RSS at {k}k apps ≤ one backend per app's (HAProxy {v})"),
        format!("{rb:.0} MB vs {rd:.0} MB"),
        rb <= rd,
    );
    report.goal(
        "topology",
        format!("HAProxy start at {k}k apps ≤ one backend per app's (HAProxy {v})"),
        format!("{sb:.2} s vs {sd:.2} s"),
        sb <= sd,
    );
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Applies `added` new apps on agent a0 (one at a time) to a live HAProxy that lunafront
/// started, and reads from the master whether any of them reloaded it.
fn new_app_check(
    report: &mut Report,
    table: &mut Table,
    bin: &HaproxyBin,
    dir: &Path,
    platform: &mut Platform,
    added: usize,
) {
    let v = bin.short();
    platform.http_port = procs::free_port();
    platform.target = format!(
        "  local: {{ type: haproxy, config: {d}/live/haproxy.cfg, spawn: true, state_dir: {d}/run, history: 2, haproxy_bin: {bin}, reload_timeout: 120s }}\n",
        d = dir.display(),
        bin = bin.command
    );
    platform.save();
    let state = platform.state_file().display().to_string();
    procs::lunafront_ok(&["apply", &state, "--auto-approve"]);
    let master = MasterCli::new(&dir.join("run/master.sock"));
    let before = master
        .show_proc(Duration::from_secs(5))
        .expect("the master answers");
    let mut modes = Vec::new();
    let mut served = true;
    for _ in 0..added {
        platform.extra_apps += 1;
        platform.save();
        let out = procs::lunafront_ok(&["apply", &state, "--auto-approve"]);
        modes.push(if out.contains("through the runtime API") {
            "runtime"
        } else if out.contains("HAProxy reloaded") {
            "reload"
        } else {
            "other"
        });
        let host = Platform::host(platform.domains + platform.extra_apps - 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while procs::get(platform.http_port, &host) != Some(200) {
            if Instant::now() > deadline {
                served = false;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let after = master
        .show_proc(Duration::from_secs(5))
        .expect("the master answers");
    let old: Vec<u32> = before.current().map(|w| w.pid).collect();
    let replaced = after.current().filter(|w| !old.contains(&w.pid)).count();
    let reloads = after.reloads.saturating_sub(before.reloads);
    platform.stop_haproxy();
    let runtime = modes.iter().filter(|m| **m == "runtime").count();
    report.figure(
        format!("topology.haproxy{v}.new_app_reloads"),
        reloads as f64,
        "reloads",
        Better::Lower,
    );
    table.row(vec![
        bin.version.clone(),
        added.to_string(),
        modes.join(", "),
        reloads.to_string(),
        replaced.to_string(),
    ]);
    report.goal(
        "topology",
        format!("a new app on a known agent: runtime, no reload (HAProxy {v})"),
        format!("{runtime} of {added} runtime, {reloads} reload(s)"),
        runtime == added && reloads == 0 && replaced == 0 && served,
    );
    if !served {
        report.failures.push(format!(
            "topology, HAProxy {v}: a new app never answered after its apply"
        ));
    }
}
