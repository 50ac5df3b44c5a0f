//! Scenario 5, the daemon's footprint at 10k domains: its memory and CPU while idle and while
//! the state changes 10 times a second (a new domain per save, as an API or a git pull would),
//! and how many reconciles that took. HAProxy is the daemon's child and not counted. Memory is
//! the kernel's own peak (VmHWM), reset at the start of each phase (`clear_refs` 5): samples
//! every 100 ms miss a peak that lasts less.

use crate::procs::{self, Platform, Proc};
use crate::report::{Better, Report, Table};
use std::path::Path;
use std::time::{Duration, Instant};

/// Resets the process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("cannot reset the peak RSS of {pid} (clear_refs): {e}"));
}

/// Runs `each` every 100 ms for `period` while sampling the RSS; returns (the peak of the
/// period as the kernel counted it (VmHWM) in kB, the max of the samples in kB, CPU share).
fn observe(pid: u32, period: Duration, mut each: impl FnMut(usize)) -> (u64, u64, f64) {
    reset_peak(pid);
    let cpu_before = procs::cpu_time(pid);
    let started = Instant::now();
    let mut max_rss = 0;
    let mut tick = 0;
    while started.elapsed() < period {
        each(tick);
        max_rss = max_rss.max(procs::memory_kb(pid).0);
        tick += 1;
        let next = Duration::from_millis(100) * tick as u32;
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let cpu = (procs::cpu_time(pid) - cpu_before).as_secs_f64() / started.elapsed().as_secs_f64();
    (procs::memory_kb(pid).1, max_rss, cpu)
}

pub fn run(report: &mut Report, root: &Path, quick: bool) {
    let (domains, idle_s, load_s) = if quick {
        (1_000, 2, 3)
    } else {
        (10_000, 5, 10)
    };
    let (_origin, origin_port) = procs::origin(root);
    let dir = root.join("footprint");
    let mut platform = Platform::new(&dir, domains, origin_port);
    platform.save();
    let listen = procs::free_port();
    let mut cmd = procs::lunafront();
    cmd.args(["daemon", platform.state_file().to_str().unwrap()])
        .args(["--target", "local", "--listen"])
        .arg(format!("127.0.0.1:{listen}"));
    let daemon = Proc::spawn("lunafront daemon", cmd, &dir.join("daemon.log"));
    procs::wait_200(
        platform.http_port,
        &Platform::host(0),
        Duration::from_secs(180),
    )
    .expect("the daemon never served the state");
    let startup_peak = procs::memory_kb(daemon.pid()).1;
    std::thread::sleep(Duration::from_secs(1));

    let (idle_rss, idle_sampled, idle_cpu) =
        observe(daemon.pid(), Duration::from_secs(idle_s), |_| {});
    // What the idle RSS is made of: the daemon's own data, and pages of its binary and libraries.
    let idle_anon = procs::status_kb(daemon.pid(), "RssAnon:");
    let idle_file = procs::status_kb(daemon.pid(), "RssFile:");
    let before = procs::reconciles(listen);
    let mut saved = 0;
    let (load_rss, load_sampled, load_cpu) =
        observe(daemon.pid(), Duration::from_secs(load_s), |_| {
            platform
                .new_domains
                .push(format!("fp-{saved}.bench.example.com"));
            platform.save();
            saved += 1;
        });
    let last = platform.new_domains.last().cloned().unwrap();
    let converged = procs::wait_200(platform.http_port, &last, Duration::from_secs(60));
    let reconciled = procs::reconciles(listen).saturating_sub(before);
    let mb = |kb: u64| kb as f64 / 1024.0;

    let k = domains / 1000;
    report.figure(
        format!("footprint.{k}k.startup_peak_rss_mb"),
        mb(startup_peak),
        "MB",
        Better::Lower,
    );
    report.figure(
        format!("footprint.{k}k.idle_rss_mb"),
        mb(idle_rss),
        "MB",
        Better::Lower,
    );
    report.figure(
        format!("footprint.{k}k.load_rss_mb"),
        mb(load_rss),
        "MB",
        Better::Lower,
    );
    // The method before issue 17 (max of 100 ms samples), to say how the figures moved.
    report.figure(
        format!("footprint.{k}k.idle_rss_sampled_mb"),
        mb(idle_sampled),
        "MB",
        Better::Lower,
    );
    report.figure(
        format!("footprint.{k}k.load_rss_sampled_mb"),
        mb(load_sampled),
        "MB",
        Better::Lower,
    );
    report.figure(
        format!("footprint.{k}k.load_cpu"),
        load_cpu * 100.0,
        "% of a core",
        Better::Lower,
    );
    report.figure(
        format!("footprint.{k}k.idle_cpu"),
        idle_cpu * 100.0,
        "% of a core",
        Better::Lower,
    );
    let mut table = Table::new(
        &format!("Daemon footprint at {domains} domains (the daemon process; HAProxy not counted)"),
        &[
            "phase",
            "peak RSS (VmHWM)",
            "max of RSS samples every 100 ms",
            "CPU",
            "reconciles",
        ],
    );
    table.row(vec![
        format!("idle ({idle_s} s)"),
        format!("{:.1} MB", mb(idle_rss)),
        format!("{:.1} MB", mb(idle_sampled)),
        format!("{:.1}% of a core", idle_cpu * 100.0),
        "-".into(),
    ]);
    table.row(vec![
        format!("10 changes/s ({load_s} s, {saved} saves)"),
        format!("{:.1} MB", mb(load_rss)),
        format!("{:.1} MB", mb(load_sampled)),
        format!("{:.1}% of a core", load_cpu * 100.0),
        reconciled.to_string(),
    ]);
    table.note(format!(
        "Each phase's peak is VmHWM after resetting it at the phase's start. Idle RSS at its end: {:.1} MB of data (RssAnon) and {:.1} MB of mapped binary and libraries (RssFile). Peak up to the first state served (start-up and the first reconcile): {:.1} MB. The last change answered {} after the saves stopped.",
        mb(idle_anon),
        mb(idle_file),
        mb(startup_peak),
        match converged {
            Some(t) => format!("{:.0} ms", t.as_secs_f64() * 1000.0),
            None => "never (within 60 s)".into(),
        }
    ));
    if converged.is_none() {
        report
            .failures
            .push("footprint: the daemon did not converge after the changes".into());
    }
    let worst = mb(idle_rss.max(load_rss));
    report.goal(
        "daemon footprint",
        format!("peak RSS (VmHWM) < 50 MB at {domains} domains (idle and 10 changes/s)"),
        format!(
            "idle {:.1} MB, under changes {:.1} MB",
            mb(idle_rss),
            mb(load_rss)
        ),
        worst < 50.0,
    );
    report.tables.push(table);
    drop(daemon);
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
}
