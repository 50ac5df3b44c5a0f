//! The benchmark suite behind `bench/run`: lunafront against the physical limit and the usual
//! designs, every figure a ratio or a median taken within one run. Drives the release binary
//! and real HAProxy processes on loopback; prints Markdown tables and the goals (met or not),
//! writes `bench/results/latest.json`, and with `--compare` flags any figure more than 10%
//! worse than `bench/results/baseline.json`.
//!
//! `cargo bench --bench suite -- [--quick] [--check] [--compare [FILE]] [--only S,S] [--out FILE]
//! [--haproxy CMD[,CMD]]` (scenarios: compile, dataplane, topology, live, load, footprint,
//! fleet, api).
//! `--haproxy` lists the HAProxy commands to measure (default: `haproxy` and
//! `scripts/haproxy-3.0`): the topology scenario runs on each, the others on the first.
//! `bench/run` installs what it needs and passes its arguments here.

// The allocator `lunafront` ships with, so that the figures are the product's.
lunafront::use_mimalloc!();

mod api_change;
mod change_to_live;
mod compile;
mod dataplane_cost;
mod fleet;
mod footprint;
mod fronts;
mod procs;
mod report;
mod topology;
mod under_load;

use report::{Report, Table};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const SCENARIOS: [&str; 8] = [
    "compile",
    "dataplane",
    "topology",
    "live",
    "load",
    "footprint",
    "fleet",
    "api",
];

struct Args {
    quick: bool,
    check: bool,
    compare: Option<PathBuf>,
    only: Vec<String>,
    out: PathBuf,
    /// The HAProxy commands to measure; the first drives every scenario.
    haproxy: Vec<String>,
}

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results")
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        check: false,
        compare: None,
        only: Vec::new(),
        out: results_dir().join("latest.json"),
        haproxy: vec![
            "haproxy".into(),
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts/haproxy-3.0")
                .display()
                .to_string(),
        ],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let next = |i: usize| argv.get(i + 1).filter(|v| !v.starts_with("--")).cloned();
        match argv[i].as_str() {
            "--quick" => args.quick = true,
            "--check" => args.check = true,
            // cargo bench passes this to every bench target.
            "--bench" => {}
            "--compare" => {
                args.compare = Some(
                    next(i)
                        .map(PathBuf::from)
                        .unwrap_or_else(|| results_dir().join("baseline.json")),
                );
                if next(i).is_some() {
                    i += 1;
                }
            }
            "--only" => {
                let list = next(i).ok_or(
                    "--only needs a list: compile,dataplane,topology,live,load,footprint,fleet,api",
                )?;
                for s in list.split(',') {
                    if !SCENARIOS.contains(&s) {
                        return Err(format!(
                            "unknown scenario `{s}`; the scenarios are {}",
                            SCENARIOS.join(", ")
                        ));
                    }
                    args.only.push(s.to_string());
                }
                i += 1;
            }
            "--out" => {
                args.out = PathBuf::from(next(i).ok_or("--out needs a file")?);
                i += 1;
            }
            "--haproxy" => {
                let list = next(i)
                    .ok_or("--haproxy needs a command or a list: haproxy,scripts/haproxy-3.0")?;
                args.haproxy = list.split(',').map(str::to_string).collect();
                i += 1;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
        i += 1;
    }
    Ok(args)
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| format!("{cmd}: not found"))
}

fn machine() -> BTreeMap<String, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    [
        (
            "cpu",
            cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
        ),
        (
            "cores",
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        ("memory", format!("{:.0} GiB", mem_kb / 1024.0 / 1024.0)),
        (
            "kernel",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        ("haproxy", command_line(&procs::primary().command, &["-v"])),
        ("wrk", command_line("wrk", &["--version"])),
        ("rustc", command_line("rustc", &["-V"])),
        ("lunafront", env!("CARGO_PKG_VERSION").to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--child-compile") {
        let n = argv[i + 1].parse().expect("domains");
        let runs = argv[i + 2].parse().expect("runs");
        compile::child(n, runs);
        return ExitCode::SUCCESS;
    }
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
        eprintln!(
            "error: the suite pins HAProxy and its clients to two different CPUs: it needs at least 2"
        );
        return ExitCode::from(2);
    }
    for tool in ["wrk", "taskset"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!(
                "error: `{tool}` is missing; bench/run installs it (apt-get install wrk util-linux)"
            );
            return ExitCode::from(2);
        }
    }
    let mut bins = Vec::new();
    for command in &args.haproxy {
        match procs::HaproxyBin::probe(command) {
            Ok(bin) => bins.push(bin),
            Err(e) => {
                eprintln!(
                    "error: HAProxy `{command}` does not run: {e}\n  bench/run installs Debian's haproxy and builds HAProxy 3.0's root (scripts/haproxy-3.0 install); or pass --haproxy haproxy"
                );
                return ExitCode::from(2);
            }
        }
    }
    procs::set_primary(bins[0].clone());

    let mut report = Report {
        format_version: 1,
        mode: if args.quick { "quick" } else { "full" }.into(),
        started: lunafront::clock::rfc3339_now(),
        machine: machine(),
        ..Report::default()
    };
    println!("{}\n", report.machine_line());
    let root = std::env::temp_dir().join(format!("lunafront-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let started = Instant::now();
    for scenario in SCENARIOS {
        if !args.only.is_empty() && !args.only.iter().any(|s| s == scenario) {
            continue;
        }
        eprintln!("== {scenario}");
        let t = Instant::now();
        let tables = report.tables.len();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match scenario {
            "compile" => compile::run(&mut report, args.quick),
            "dataplane" => dataplane_cost::run(&mut report, &root, args.quick),
            "topology" => topology::run(&mut report, &root, args.quick, &bins),
            "live" => change_to_live::run(&mut report, &root, args.quick),
            "load" => under_load::run(&mut report, &root, args.quick),
            "fleet" => fleet::run(&mut report, &root, args.quick),
            "api" => api_change::run(&mut report, &root, args.quick),
            _ => footprint::run(&mut report, &root, args.quick),
        }));
        report
            .durations
            .insert(scenario.to_string(), t.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                for table in &report.tables[tables..] {
                    println!("{}", table.render());
                }
            }
            Err(panic) => {
                let message = report::panic_message(panic.as_ref());
                report.failures.push(format!("{scenario}: {message}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    println!("{}", report.goals_table().render());
    println!(
        "Suite time: {:.0} s ({}).",
        started.elapsed().as_secs_f64(),
        report
            .durations
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(parent) = args.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let json = serde_json::to_string_pretty(&report).unwrap() + "\n";
    if let Err(e) = std::fs::write(&args.out, json) {
        eprintln!("error: cannot write {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("Figures written to {}.", args.out.display());

    let mut failed = false;
    for failure in &report.failures {
        eprintln!("error: {failure}");
        failed = true;
    }
    if let Some(path) = &args.compare {
        failed |= !compare(path, &report);
    }
    if args.check {
        failed |= !check(&report, &args);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--compare`: every figure more than 10% worse than the baseline's is flagged.
fn compare(path: &Path, latest: &Report) -> bool {
    let baseline: Report = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read the baseline {}: {e}", path.display());
            return false;
        }
    };
    if baseline.mode != latest.mode {
        println!(
            "note: the baseline is a {} run, this one {}: only figures of the same name are compared",
            baseline.mode, latest.mode
        );
    }
    let (regressions, compared) = report::compare(&baseline, latest, 0.10);
    let mut table = Table::new(
        &format!(
            "Against {} ({}): {compared} figures compared, {} more than 10% worse",
            path.display(),
            baseline.started,
            regressions.len()
        ),
        &["figure", "baseline", "latest", "worse by"],
    );
    for r in &regressions {
        table.row(vec![
            format!("**{}**", r.name),
            format!("{:.3} {}", r.baseline, r.unit),
            format!("{:.3} {}", r.latest, r.unit),
            if r.worse_by.is_infinite() {
                "from 0".to_string()
            } else {
                format!("{:.0}%", r.worse_by * 100.0)
            },
        ]);
    }
    println!("{}", table.render());
    if !regressions.is_empty() {
        eprintln!(
            "error: {} figure(s) regressed by more than 10% against {}",
            regressions.len(),
            path.display()
        );
    }
    regressions.is_empty()
}

/// `--check`: the harness worked — its statistics give the known answers, every scenario that
/// ran produced its table, figures and goals, every figure is a finite number, and every
/// zero-tolerance figure (failed requests, socket errors) is 0. Other goals not met are
/// reported, not failures.
fn check(report: &Report, args: &Args) -> bool {
    let mut problems = report::self_check();
    problems.extend(fronts::self_check());
    let prefixes = [
        ("compile", "compile."),
        ("dataplane", "dataplane."),
        ("topology", "topology."),
        ("live", "live."),
        ("load", "under_load."),
        ("footprint", "footprint."),
        ("fleet", "fleet."),
        ("api", "api."),
    ];
    for (scenario, prefix) in prefixes {
        if !args.only.is_empty() && !args.only.iter().any(|s| s == scenario) {
            continue;
        }
        if !report.figures.iter().any(|f| f.name.starts_with(prefix)) {
            problems.push(format!("scenario {scenario} produced no figures"));
        }
    }
    problems.extend(report::figure_problems(&report.figures));
    if report.goals.is_empty() {
        problems.push("no goal was evaluated".into());
    }
    let written: Result<Report, String> = std::fs::read_to_string(&args.out)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
    if let Err(e) = written {
        problems.push(format!("{} does not read back: {e}", args.out.display()));
    }
    for p in &problems {
        eprintln!("check: {p}");
    }
    if problems.is_empty() {
        println!(
            "check: the harness works: {} figures, {} goals ({} met).",
            report.figures.len(),
            report.goals.len(),
            report.goals.iter().filter(|g| g.met).count()
        );
    }
    problems.is_empty()
}
