//! Scenario 3, change to live: the time from saving a YAML change (daemon mode) or from the
//! save plus `lunafront apply` to the new route answering through HAProxy, for a runtime
//! change (a new domain) and a reload change (a new listener), at 1k and 10k existing domains.

use crate::procs::{self, Platform, Proc};
use crate::report::{Better, Report, Table, ms, percentile};
use std::path::Path;
use std::time::{Duration, Instant};

pub fn run(report: &mut Report, root: &Path, quick: bool) {
    let (sizes, changes): (&[usize], usize) = if quick {
        (&[1_000], 5)
    } else {
        (&[1_000, 10_000], 30)
    };
    let (_origin, origin_port) = procs::origin(root);
    let mut table = Table::new(
        &format!("Change to live: save → the new route answers ({changes} changes of each kind)"),
        &["domains", "mode", "change", "p50", "p99", "max", "goal", ""],
    );
    for &n in sizes {
        for mode in ["daemon", "apply"] {
            let dir = root.join(format!("live-{n}-{mode}"));
            let mut platform = Platform::new(&dir, n, origin_port);
            platform.save();
            let state = platform.state_file();
            let state = state.to_str().unwrap();
            let listen = procs::free_port();
            let _daemon = if mode == "daemon" {
                let mut cmd = procs::lunafront();
                cmd.args(["daemon", state, "--target", "local", "--listen"])
                    .arg(format!("127.0.0.1:{listen}"));
                Some(Proc::spawn(
                    "lunafront daemon",
                    cmd,
                    &dir.join("daemon.log"),
                ))
            } else {
                procs::lunafront_ok(&["apply", state, "--auto-approve"]);
                None
            };
            procs::wait_200(
                platform.http_port,
                &Platform::host(0),
                Duration::from_secs(180),
            )
            .expect("the first state never answered");
            for kind in ["runtime", "reload"] {
                let mut times = Vec::new();
                for k in 0..changes {
                    let (port, host) = if kind == "runtime" {
                        let host = format!("new-{k}.bench.example.com");
                        platform.new_domains.push(host.clone());
                        (platform.http_port, host)
                    } else {
                        let port = procs::free_port();
                        platform.listeners.push((format!("extra{k}"), port));
                        (port, Platform::host(0))
                    };
                    // Each change on its own: the daemon finishes a reconcile after its route is
                    // live (`haproxy -c` of the staged files, the file swap, the history), and
                    // a change saved meanwhile would wait for that.
                    let reconciled = (mode == "daemon").then(|| procs::reconciles(listen));
                    let started = Instant::now();
                    platform.save();
                    if mode == "apply" {
                        procs::lunafront_ok(&["apply", state, "--auto-approve"]);
                    }
                    procs::wait_200(port, &host, Duration::from_secs(60))
                        .unwrap_or_else(|| panic!("{mode} {kind} change {k} never answered"));
                    times.push(ms(started.elapsed()));
                    if let Some(before) = reconciled {
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while procs::reconciles(listen) <= before && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                times.sort_by(|a, b| a.total_cmp(b));
                let (p50, p99, max) = (
                    percentile(&times, 0.5),
                    percentile(&times, 0.99),
                    *times.last().unwrap(),
                );
                let goal_ms = if kind == "runtime" { 100.0 } else { 1000.0 };
                let met = p50 < goal_ms;
                let name = format!("live.{}k.{mode}.{kind}", n / 1000);
                report.figure(format!("{name}.p50_ms"), p50, "ms", Better::Lower);
                report.figure(format!("{name}.p99_ms"), p99, "ms", Better::Lower);
                table.row(vec![
                    n.to_string(),
                    mode.into(),
                    kind.into(),
                    format!("{p50:.1} ms"),
                    format!("{p99:.1} ms"),
                    format!("{max:.1} ms"),
                    format!("p50 < {goal_ms:.0} ms"),
                    if met { "met" } else { "**NOT MET**" }.into(),
                ]);
                report.goal(
                    "change to live",
                    format!("{mode} {kind} p50 < {goal_ms:.0} ms at {n} domains"),
                    format!("{p50:.1} ms (p99 {p99:.1} ms)"),
                    met,
                );
            }
            drop(_daemon);
            drop(platform);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    table.note("Each change is saved the way an editor saves (write aside, rename over); the route is polled every 2 ms on a fresh connection. Runtime change: a new domain. Reload change: a new listener (polled on its port). The daemon's figure includes its debounce (a reconcile starts 50 ms after the last file event); the next change is saved once the daemon has finished the reconcile (it checks the staged files with `haproxy -c`, swaps them and records the history after the route is live). `apply` includes starting the process, reading both states and printing the plan.");
    report.tables.push(table);
}
