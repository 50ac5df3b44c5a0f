//! Scenario 7, API change to live (issue 12): the time from an agent-API route change to the
//! first 200 through HAProxy, one change at a time, at 10k and 100k domains; and 100 agents
//! each adding a route at the same moment (all live, reloads, failed requests). Each figure is
//! also given as a ratio to HAProxy's own runtime `add map` round trip, measured in the same
//! run on the same HAProxy: the physical limit of a route change.

use crate::procs::{self, Platform, Proc};
use crate::report::{Better, Report, Table, ms, percentile};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const ADMIN: &str = "bench-admin-token-0123456789abcdef";

/// One HTTP/1.1 request with a JSON body on a fresh connection: (status, body).
fn call(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The median round trip of HAProxy's own `add map` (and the `del map` that undoes it) on its
/// runtime socket, at the map's current size: what a route change costs HAProxy itself.
pub fn add_map_rtt(config: &Path, runs: usize) -> Result<f64, String> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| format!("the rendered configuration {}: {e}", config.display()))?;
    let socket = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("stats socket "))
        .and_then(|l| l.split_whitespace().next())
        .expect("a stats socket")
        .to_string();
    let dir = config.parent().unwrap();
    let socket = if socket.starts_with('/') {
        socket
    } else {
        dir.join(socket).display().to_string()
    };
    let run = |command: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("the runtime socket");
        s.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let mut times = Vec::new();
    for k in 0..runs {
        let key = format!("rtt-probe-{k}.bench.example.com");
        let started = Instant::now();
        let answer = run(&format!("add map maps/hosts.map {key} rtt-probe"));
        times.push(ms(started.elapsed()));
        assert!(answer.trim().is_empty(), "add map answered: {answer}");
        run(&format!("del map maps/hosts.map {key}"));
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(percentile(&times, 0.5))
}

pub fn run(report: &mut Report, root: &Path, quick: bool) {
    let (sizes, changes, burst): (&[usize], usize, usize) = if quick {
        (&[1_000], 5, 20)
    } else {
        (&[10_000, 100_000], 20, 100)
    };
    // `LUNAFRONT_BENCH_API_SIZES=10000` measures only those sizes (profiling one of them).
    let chosen: Option<Vec<usize>> = std::env::var("LUNAFRONT_BENCH_API_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let sizes = chosen.as_deref().unwrap_or(sizes);
    let (_origin, origin_port) = procs::origin(root);
    let mut table = Table::new(
        &format!(
            "API change to live: `POST /v1/agents/{{id}}/routes` → the new route answers ({changes} changes one at a time, a quarter of them at 100k; {burst} agents at once)"
        ),
        &[
            "domains",
            "change",
            "p50",
            "p99",
            "`add map` p50",
            "p50 / `add map`",
            "goal",
            "",
        ],
    );
    let mut p50_by_size = Vec::new();
    for &n in sizes {
        let dir = root.join(format!("api-{n}"));
        let platform = Platform::new(&dir, n, origin_port);
        platform.save();
        std::fs::write(
            dir.join("state/api.yaml"),
            "api:\n  apps_domain: apps.example.com\n  allowed_networks: [ \"127.0.0.0/8\" ]\n  limits: { routes_per_agent: 1000 }\n",
        )
        .unwrap();
        std::fs::write(dir.join("admin.token"), ADMIN).unwrap();
        let (listen, api) = (procs::free_port(), procs::free_port());
        let mut cmd = procs::lunafront();
        cmd.arg("daemon")
            .arg(dir.join("state"))
            .args(["--target", "local", "--listen"])
            .arg(format!("127.0.0.1:{listen}"))
            .arg("--api")
            .arg(format!("127.0.0.1:{api}"))
            .arg("--admin-token-file")
            .arg(dir.join("admin.token"));
        let _daemon = Proc::spawn("lunafront daemon", cmd, &dir.join("daemon.log"));
        procs::wait_200(
            platform.http_port,
            &Platform::host(0),
            Duration::from_secs(600),
        )
        .expect("the first state never answered");
        let rtt = match add_map_rtt(&dir.join("live/haproxy.cfg"), 30) {
            Ok(rtt) => rtt,
            Err(why) => {
                report.failures.push(format!("api at {n} domains: {why}"));
                finish(listen, _daemon, platform, &dir, n);
                continue;
            }
        };
        let k = n / 1000;
        report.figure(format!("api.{k}k.add_map_p50_ms"), rtt, "ms", Better::Lower);

        // One change at a time (fewer at 100k: each one recompiles the whole state today).
        let changes = if n >= 100_000 { changes / 4 } else { changes };
        let reloads_before = metric(listen, "lunafront_reloads_total");
        let mut times = Vec::new();
        let mut refused = None;
        for c in 0..changes {
            let agent = format!("a{}", c % platform.agents());
            let host = format!("api-{c}.apps.example.com");
            let body = format!("{{\"subdomain\": \"api-{c}\", \"port\": {origin_port}}}");
            let started = Instant::now();
            let (status, answer) = call(api, "POST", &format!("/v1/agents/{agent}/routes"), &body)
                .expect("the API answered");
            if status != 201 {
                // Measured as what it is (at 100k domains, the API's own request timeout).
                refused = Some(format!(
                    "route {c} answered {status} after {:.0} ms: {answer}",
                    ms(started.elapsed())
                ));
                break;
            }
            procs::wait_200(platform.http_port, &host, Duration::from_secs(60))
                .unwrap_or_else(|| panic!("API change {c} never answered"));
            times.push(ms(started.elapsed()));
        }
        if let Some(why) = refused {
            let goal_ms = if n >= 100_000 { 30.0 } else { 20.0 };
            report.failures.push(format!("api at {n} domains: {why}"));
            report.goal(
                "API change to live",
                format!("route change → first 200, p50 < {goal_ms:.0} ms at {n} domains"),
                why,
                false,
            );
            finish(listen, _daemon, platform, &dir, n);
            continue;
        }
        let reloaded = metric(listen, "lunafront_reloads_total").saturating_sub(reloads_before);
        report.figure(
            format!("api.{k}k.change.reloads"),
            reloaded as f64,
            "",
            Better::Lower,
        );
        times.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
        report.figure(format!("api.{k}k.change.p50_ms"), p50, "ms", Better::Lower);
        report.figure(format!("api.{k}k.change.p99_ms"), p99, "ms", Better::Lower);
        report.figure(
            format!("api.{k}k.change.p50_over_add_map"),
            p50 / rtt,
            "×",
            Better::Lower,
        );
        let goal_ms = if n >= 100_000 { 30.0 } else { 20.0 };
        let met = p50 < goal_ms;
        table.row(vec![
            n.to_string(),
            format!("one route ({reloaded} reload(s) in {changes})"),
            format!("{p50:.1} ms"),
            format!("{p99:.1} ms"),
            format!("{rtt:.3} ms"),
            format!("{:.0}×", p50 / rtt),
            format!("p50 < {goal_ms:.0} ms"),
            if met { "met" } else { "**NOT MET**" }.into(),
        ]);
        report.goal(
            "API change to live",
            format!("route change → first 200, p50 < {goal_ms:.0} ms at {n} domains"),
            format!("{p50:.1} ms ({:.0}× `add map`)", p50 / rtt),
            met,
        );
        p50_by_size.push((n, p50));

        // Many agents at once (at the first size): every route live, no reload, no failed
        // request on a route that was live before.
        if n == sizes[0] {
            let reloads = |port| metric(port, "lunafront_reloads_total");
            let reloads_before = reloads(listen);
            let stop = Arc::new(AtomicBool::new(false));
            let failed = Arc::new(AtomicU64::new(0));
            let probed = Arc::new(AtomicU64::new(0));
            let prober = {
                let (stop, failed, probed) = (stop.clone(), failed.clone(), probed.clone());
                let port = platform.http_port;
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if procs::get(port, &Platform::host(1)) != Some(200) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        probed.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            };
            let barrier = Arc::new(Barrier::new(burst));
            let started = Instant::now();
            let agents = platform.agents();
            let handles: Vec<_> = (0..burst)
                .map(|i| {
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        let body =
                            format!("{{\"subdomain\": \"burst-{i}\", \"port\": {origin_port}}}");
                        barrier.wait();
                        call(
                            api,
                            "POST",
                            &format!("/v1/agents/a{}/routes", i % agents),
                            &body,
                        )
                    })
                })
                .collect();
            let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let answered = ms(started.elapsed());
            let refused: Vec<String> = answers
                .iter()
                .filter(|a| a.as_ref().is_none_or(|(s, _)| *s != 201))
                .map(|a| format!("{a:?}"))
                .collect();
            let mut live = true;
            for i in 0..burst {
                live &= procs::wait_200(
                    platform.http_port,
                    &format!("burst-{i}.apps.example.com"),
                    Duration::from_secs(60),
                )
                .is_some();
            }
            let all_live = ms(started.elapsed());
            stop.store(true, Ordering::Relaxed);
            prober.join().unwrap();
            let reloaded = reloads(listen).saturating_sub(reloads_before);
            let failed = failed.load(Ordering::Relaxed);
            report.figure(
                format!("api.{k}k.burst.all_live_ms"),
                all_live,
                "ms",
                Better::Lower,
            );
            report.figure(
                format!("api.{k}k.burst.all_live_over_add_map"),
                all_live / rtt,
                "×",
                Better::Lower,
            );
            report.figure(
                format!("api.{k}k.burst.reloads"),
                reloaded as f64,
                "",
                Better::Lower,
            );
            report.zero_figure(
                format!("api.{k}k.burst.failed_requests"),
                failed as f64,
                "requests",
            );
            let met =
                all_live < 1000.0 && reloaded == 0 && failed == 0 && refused.is_empty() && live;
            table.row(vec![
                n.to_string(),
                format!("{burst} agents at once"),
                format!("all answered {answered:.0} ms, all live {all_live:.0} ms"),
                format!(
                    "{reloaded} reload(s), {failed} failed of {} probes, {} refused",
                    probed.load(Ordering::Relaxed),
                    refused.len()
                ),
                format!("{rtt:.3} ms"),
                format!("{:.0}×", all_live / rtt),
                "all live < 1 s, no reload, no failed request".into(),
                if met { "met" } else { "**NOT MET**" }.into(),
            ]);
            report.goal(
                "API change to live",
                format!("{burst} agents adding a route at once → all live < 1 s, no reload, no failed request, at {n} domains"),
                format!("{all_live:.0} ms, {reloaded} reload(s), {failed} failed request(s), {} refused", refused.len()),
                met,
            );
        }
        finish(listen, _daemon, platform, &dir, n);
    }
    if let [(small, a), (large, b)] = p50_by_size[..] {
        let growth = b / a;
        report.figure("api.growth_10k_to_100k", growth, "×", Better::Lower);
        report.goal(
            "API change to live",
            format!("growth from {small} to {large} domains ≤ 1.5×"),
            format!("{growth:.2}×"),
            growth <= 1.5,
        );
    }
    table.note("The administrator's route endpoint (an agent's `POST /api/proxy/http` runs the same code after its token check); each change is answered when live, then the new host is polled every 2 ms on a fresh connection. `add map` is HAProxy's own runtime command on the same HAProxy at the same map size (median of 30, each undone), the physical limit of a route change. The burst's probe asks a route live before it every 2 ms: any answer but 200 is a failed request.");
    report.tables.push(table);
}

/// Ends one size's run, whether it measured or failed: stops the daemon and the HAProxy it
/// supervises, keeps the daemon's log, removes the folder.
fn finish(listen: u16, daemon: Proc, platform: Platform, dir: &Path, n: usize) {
    // The HAProxy the daemon supervises is stopped by its master's PID (from /status): the
    // platform's pidfile alone left it running after this scenario.
    let master = status_master_pid(listen);
    drop(daemon);
    drop(platform);
    if let Some(pid) = master {
        procs::signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // With `LUNAFRONT_LOG=lunafront=debug` the daemon logs each reconcile's phases: its log
    // is kept to say where the time goes.
    if std::env::var_os("LUNAFRONT_LOG").is_some() {
        let kept = std::env::temp_dir().join(format!("lunafront-bench-api-{n}.log"));
        let _ = std::fs::copy(dir.join("daemon.log"), &kept);
        eprintln!("the daemon's log: {}", kept.display());
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The PID of the HAProxy master the daemon supervises, from its /status.
fn status_master_pid(port: u16) -> Option<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body: serde_json::Value = serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()?;
    body.pointer("/haproxy/master_pid")?
        .as_u64()
        .map(|p| p as u32)
}

/// A counter from the daemon's /metrics.
fn metric(port: u16, name: &str) -> u64 {
    let Some(mut s) = TcpStream::connect(("127.0.0.1", port)).ok() else {
        return 0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
