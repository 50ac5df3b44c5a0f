//! Scenario 4, reload under load: wrk keeps keep-alive connections busy on 1k domains while 50
//! changes are applied with `lunafront apply` (half runtime: a new domain; half reload: a
//! global timeout flips), spread over the run; a second client requests, on keep-alive
//! connections too, every domain the changes added from the moment its apply returned. Counts
//! non-2xx answers and socket errors (each must be 0: `--check` fails otherwise), and compares
//! the p99 latency during the changes with a run before them.

use crate::procs::{self, Platform};
use crate::report::{Better, Report, Table};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CONNECTIONS: u32 = 50;

/// What the added-domain client counted.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    non_2xx: AtomicU64,
    socket_errors: AtomicU64,
    /// Connections the server closed after an answer (`Connection: close`, as an old worker
    /// does on a reload): the client opens a new one, as any HTTP client does.
    closed_by_server: AtomicU64,
}

/// Requests the added domains in turn on `connections` keep-alive connections (one thread
/// each, a request every 5 ms: a small load beside wrk's) until `stop`.
fn added_domain_client(
    port: u16,
    hosts: Arc<Mutex<Vec<String>>>,
    connections: usize,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> Vec<JoinHandle<()>> {
    (0..connections)
        .map(|c| {
            let (hosts, stop, counts) = (hosts.clone(), stop.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                let mut next = c;
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                    let Some(host) = ({
                        let hosts = hosts.lock().unwrap();
                        (!hosts.is_empty()).then(|| hosts[next % hosts.len()].clone())
                    }) else {
                        continue;
                    };
                    next += 1;
                    if conn.is_none() {
                        match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                                conn = Some(BufReader::new(s));
                            }
                            Err(_) => {
                                counts.socket_errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    let stream = conn.as_mut().unwrap();
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    match exchange(stream, &host) {
                        Ok((status, close)) => {
                            if !(200..300).contains(&status) {
                                counts.non_2xx.fetch_add(1, Ordering::Relaxed);
                            }
                            if close {
                                counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
                                conn = None;
                            }
                        }
                        Err(_) => {
                            counts.socket_errors.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                    }
                }
            })
        })
        .collect()
}

/// One GET on a keep-alive connection: (status, whether the server closes it after).
fn exchange(stream: &mut BufReader<TcpStream>, host: &str) -> std::io::Result<(u16, bool)> {
    stream
        .get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {line:?}")))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if stream.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok((status, close))
}

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
    let added = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let client = added_domain_client(
        platform.http_port,
        added.clone(),
        2,
        stop.clone(),
        counts.clone(),
    );
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
        // Applied: from now on the new domain answers 200, whatever the later changes do.
        if k % 2 == 0 {
            added
                .lock()
                .unwrap()
                .push(platform.new_domains.last().unwrap().clone());
        }
    }
    let applied_in = started.elapsed();
    let during = procs::wrk_finish(wrk);
    stop.store(true, Ordering::SeqCst);
    for t in client {
        let _ = t.join();
    }
    let added_requests = counts.requests.load(Ordering::Relaxed);
    let added_failed = counts.non_2xx.load(Ordering::Relaxed);
    let added_errors = counts.socket_errors.load(Ordering::Relaxed);

    let p99_ratio = during.p99_us / before.p99_us;
    report.zero_figure(
        "under_load.failed_requests",
        during.status_errors as f64,
        "requests",
    );
    report.zero_figure(
        "under_load.socket_errors",
        during.socket_errors() as f64,
        "errors",
    );
    report.zero_figure(
        "under_load.added_domains.failed_requests",
        added_failed as f64,
        "requests",
    );
    report.zero_figure(
        "under_load.added_domains.socket_errors",
        added_errors as f64,
        "errors",
    );
    report.figure(
        "under_load.added_domains.requests",
        added_requests as f64,
        "requests",
        Better::Higher,
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
    table.row(vec![
        "the added domains, from their apply on".into(),
        added_requests.to_string(),
        "-".into(),
        added_failed.to_string(),
        format!(
            "{added_errors} (connections closed by the server after an answer: {})",
            counts.closed_by_server.load(Ordering::Relaxed)
        ),
        "-".into(),
        "-".into(),
    ]);
    table.note(format!(
        "The changes took {:.1} s; p99 during / before: {p99_ratio:.2}. wrk and the added-domain client (2 connections, a request every 5 ms each, cycling through the domains applied so far) use keep-alive connections: a connection is only replaced when the server closes it after an answer. Any non-2xx or socket error fails `bench/run --check`.",
        applied_in.as_secs_f64()
    ));
    if added_requests == 0 {
        report
            .failures
            .push("reload under load: no request reached an added domain".into());
    }
    report.goal(
        "reload under load",
        format!("0 non-2xx and 0 socket errors during {changes} applies (wrk, and the added domains)"),
        format!(
            "{} non-2xx, {} socket errors; added domains: {added_failed} non-2xx, {added_errors} socket errors over {added_requests} requests",
            during.status_errors,
            during.socket_errors()
        ),
        during.status_errors == 0
            && during.socket_errors() == 0
            && added_failed == 0
            && added_errors == 0,
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
