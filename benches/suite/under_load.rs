//! Scenario 4, reload under load: wrk keeps keep-alive connections busy on 1k domains while 50
//! changes are applied with `lunafront apply` (half runtime: a new domain; half reload: a
//! global timeout flips), spread over the run. Counts non-2xx answers and socket errors, and
//! compares the p99 latency during the changes with a run before them.

use crate::procs::{self, Platform};
use crate::report::{Better, Report, Table};
use std::path::Path;
use std::time::{Duration, Instant};

const CONNECTIONS: u32 = 50;

pub fn run(report: &mut Report, root: &Path, quick: bool) {
    let (changes, before_s, during_s) = if quick { (10, 2, 6) } else { (50, 5, 30) };
    let (_origin, origin_port) = procs::origin(root);
    let dir = root.join("under-load");
    let mut platform = Platform::new(&dir, 1_000, origin_port);
    platform.save();
    let state = platform.state_file();
    let state = state.to_str().unwrap().to_string();
    procs::lunafront_ok(&["apply", &state, "--auto-approve"]);
    procs::wait_200(
        platform.http_port,
        &Platform::host(0),
        Duration::from_secs(60),
    )
    .expect("the state never answered");
    let hosts = platform.hosts_file();

    let before = procs::wrk(platform.http_port, &hosts, before_s, CONNECTIONS);
    let wrk = procs::wrk_start(platform.http_port, &hosts, during_s, CONNECTIONS);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    // Spread the changes over the run, leaving a second at each end.
    let pace = Duration::from_secs_f64((during_s - 2) as f64 / changes as f64);
    let (mut runtime, mut reloads) = (0, 0);
    for k in 0..changes {
        let due = Duration::from_secs(1) + pace * k as u32;
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        if k % 2 == 0 {
            platform
                .new_domains
                .push(format!("load-{k}.bench.example.com"));
        } else {
            platform.client_timeout_s = if platform.client_timeout_s == 30 {
                31
            } else {
                30
            };
        }
        platform.save();
        let out = procs::lunafront_ok(&["apply", &state, "--auto-approve"]);
        if out.contains("through the runtime API") {
            runtime += 1;
        } else if out.contains("HAProxy reloaded") {
            reloads += 1;
        }
    }
    let applied_in = started.elapsed();
    let during = procs::wrk_finish(wrk);

    let p99_ratio = during.p99_us / before.p99_us;
    report.figure(
        "under_load.failed_requests",
        during.status_errors as f64,
        "requests",
        Better::Lower,
    );
    report.figure(
        "under_load.socket_errors",
        during.socket_errors() as f64,
        "errors",
        Better::Lower,
    );
    report.figure(
        "under_load.p99_before_ms",
        before.p99_us / 1000.0,
        "ms",
        Better::Lower,
    );
    report.figure(
        "under_load.p99_during_ms",
        during.p99_us / 1000.0,
        "ms",
        Better::Lower,
    );
    report.figure(
        "under_load.rps_during",
        during.rps(),
        "req/s",
        Better::Higher,
    );
    let mut table = Table::new(
        &format!(
            "Reload under load: {changes} applies ({runtime} runtime, {reloads} reloads) while wrk runs ({CONNECTIONS} keep-alive connections, 1,000 domains)"
        ),
        &[
            "run",
            "requests",
            "req/s",
            "non-2xx",
            "socket errors (connect/read/write/timeout)",
            "p50",
            "p99",
        ],
    );
    for (name, r) in [("before", &before), ("during the changes", &during)] {
        table.row(vec![
            name.into(),
            r.requests.to_string(),
            format!("{:.0}", r.rps()),
            r.status_errors.to_string(),
            format!(
                "{} ({}/{}/{}/{})",
                r.socket_errors(),
                r.connect_errors,
                r.read_errors,
                r.write_errors,
                r.timeout_errors
            ),
            format!("{:.2} ms", r.p50_us / 1000.0),
            format!("{:.2} ms", r.p99_us / 1000.0),
        ]);
    }
    table.note(format!(
        "The changes took {:.1} s; p99 during / before: {p99_ratio:.2}.",
        applied_in.as_secs_f64()
    ));
    report.goal(
        "reload under load",
        format!("0 non-2xx and 0 socket errors during {changes} applies"),
        format!(
            "{} non-2xx, {} socket errors",
            during.status_errors,
            during.socket_errors()
        ),
        during.status_errors == 0 && during.socket_errors() == 0,
    );
    if runtime + reloads != changes {
        report.failures.push(format!(
            "reload under load: {changes} changes, but {runtime} runtime and {reloads} reloads reported"
        ));
    }
    report.tables.push(table);
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
}
