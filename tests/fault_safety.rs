//! Fault safety (issue 11): lunafront must never serve a wrong route — a 404 or another app for
//! a domain nobody touched — while it reports that all is well. Each test is named after a
//! failure that was reproduced on HAProxy 2.6 and injects the real fault: large map changes,
//! an unresponsive (SIGSTOPped) master, kill -9 and SIGINT/SIGTERM in the middle of an apply,
//! truncated files and a file replaced by a folder, symlink loops, SIGHUP/SIGTERM to the daemon,
//! an immutable map file and an immutable history folder. Every wait has a deadline, and every
//! process a test starts is stopped by PID (the `Reaper` stops any HAProxy left under the
//! test's own temporary folder).

mod support;

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::*;

// ---- Processes, by PID ----

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a PID this test started or found under its own folder.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A process that exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// (PID, parent PID, argv) of the live processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<(u32, u32, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv.iter().any(|a| a.contains(needle)) || !alive(pid) {
            continue;
        }
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0);
        out.push((pid, ppid, argv));
    }
    out
}

/// HAProxy masters running a configuration under `dir`: HAProxy processes whose parent is not
/// one of them (a worker's parent is its master).
fn haproxy_masters(dir: &Path) -> Vec<u32> {
    let all: Vec<(u32, u32, Vec<String>)> = processes_with(&dir.display().to_string())
        .into_iter()
        .filter(|(_, _, argv)| argv.first().is_some_and(|a| a.ends_with("haproxy")))
        .collect();
    let pids: Vec<u32> = all.iter().map(|(p, ..)| *p).collect();
    let mut masters: Vec<u32> = all
        .iter()
        .filter(|(_, ppid, _)| !pids.contains(ppid))
        .map(|(p, ..)| *p)
        .collect();
    masters.sort();
    masters
}

/// Stops (SIGCONT, then SIGKILL) every HAProxy still running a configuration under its folder
/// when dropped: whatever a failed test left behind, it never outlives the test.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _, argv) in processes_with(&self.0.display().to_string()) {
            if argv.first().is_some_and(|a| a.ends_with("haproxy")) {
                signal(pid, libc::SIGCONT);
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// Sends SIGCONT to a stopped process when dropped (a failing assertion must not leave it
/// stopped).
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// `chattr +i` on a path for as long as it lives (the fault an immutable or read-only file
/// gives: rename over it and writes into it fail, even as root).
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "chattr +i {} failed: these tests need root and an ext4 (or similar) /tmp",
            path.display()
        );
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits for a child with a deadline; kills it (and fails) when it does not exit in time.
fn wait_bounded(child: &mut Child, timeout: Duration, what: &str) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs lunafront in `dir` with a deadline; returns (exit code, stdout, stderr).
fn run_bounded(dir: &Path, args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = lunafront()
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lunafront");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let code = wait_bounded(
        &mut child,
        timeout,
        &format!("lunafront {}", args.join(" ")),
    );
    (code, out.join().unwrap(), err.join().unwrap())
}

// ---- A prober: what clients see while faults happen ----

/// Asks each (host, expected backend) in turn, on a fresh connection each time, and records
/// every answer that is not a 200 from the expected backend.
struct Probe {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Probe {
    fn start(port: u16, routes: &[(String, &'static str)]) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let routes = routes.to_vec();
        let (s, r, f) = (stop.clone(), requests.clone(), failures.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for (host, backend) in &routes {
                    let seen = http_get(port, host, "/");
                    r.fetch_add(1, Ordering::Relaxed);
                    let ok = matches!(&seen, Ok((200, body)) if body.starts_with(&format!("backend={backend} ")));
                    if !ok {
                        let mut f = f.lock().unwrap();
                        if f.len() < 50 {
                            f.push(format!("{:?} {host}: {seen:?}", started.elapsed()));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Probe {
            stop,
            requests,
            failures,
            thread: Some(thread),
        }
    }

    fn count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Waits until the probe has made `n` more requests (it runs during what follows).
    fn wait_more(&self, n: u64) {
        let target = self.count() + n;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count() < target {
            assert!(Instant::now() < deadline, "the probe stopped probing");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- States ----

/// A state: an HTTP listener on `port` (and `extra_listeners`), agent `a1` at 127.0.0.1 with
/// the apps `shop` and `blog`, `global`, `domains` (YAML lines) and a `targets:` block.
fn state(port: u16, shop: u16, blog: u16, extra: &str, domains: &str, target: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\n{extra}agents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {shop} }} ] }}\n  blog: {{ servers: [ {{ agent: a1, port: {blog} }} ] }}\ndomains:\n{domains}{target}"
    )
}

/// `d<i>.example.com` for each i in `range`, routed to `blog` when i is in `to_blog`.
fn numbered(range: Range<usize>, to_blog: &Range<usize>) -> String {
    range
        .map(|i| {
            let backend = if to_blog.contains(&i) { "blog" } else { "shop" };
            format!("  d{i}.example.com: {{ backend: {backend} }}\n")
        })
        .collect()
}

const KEEP: &str = "  keep-0.example.com: { backend: shop }\n  keep-1.example.com: { backend: shop }\n  keep-2.example.com: { backend: blog }\n";

const KEEP_FILE: &str = "domains:\n  keep-0.example.com: { backend: shop }\n  keep-1.example.com: { backend: shop }\n  keep-2.example.com: { backend: blog }\n";

fn keep_routes() -> Vec<(String, &'static str)> {
    vec![
        ("keep-0.example.com".into(), "shop"),
        ("keep-1.example.com".into(), "shop"),
        ("keep-2.example.com".into(), "blog"),
    ]
}

fn status_json(daemon: &Daemon) -> serde_json::Value {
    serde_json::from_str(&daemon.get("/status").1).expect("status is JSON")
}

fn metric(daemon: &Daemon, name: &str) -> Option<f64> {
    daemon
        .get("/metrics")
        .1
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn reconciles(daemon: &Daemon) -> u64 {
    daemon
        .get("/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with("lunafront_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

// ---- 1. Large map changes ----

#[test]
fn large_map_change_never_empties_the_live_map() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    let write = |n: usize, to_blog: Range<usize>| {
        let domains = format!("{KEEP}{}", numbered(0..n, &to_blog));
        site.write_state(&state(
            port,
            shop.port,
            blog.port,
            "",
            &domains,
            &site.target_block(true),
        ));
    };
    write(800, 0..0);
    site.apply();
    let (_, workers) = site.generation();
    let mut untouched = keep_routes();
    untouched.extend([
        ("d700.example.com".to_string(), "shop"),
        ("d799.example.com".to_string(), "shop"),
    ]);
    let probe = Probe::start(port, &untouched);
    probe.wait_more(20);

    // 100 entries moved among 800; then 300 moved and 700 added; then 20 000 added: each a
    // map replacement far larger than HAProxy's 16 KB command buffer.
    for (changed, n, to_blog) in [
        ("100", 800, 0..100),
        ("1 000", 1500, 0..400),
        ("20 000", 21500, 0..400),
    ] {
        write(n, to_blog);
        let before = probe.count();
        let (code, stdout, stderr) = run_bounded(
            site.path(),
            &["apply", "state.yaml", "--auto-approve"],
            Duration::from_secs(120),
        );
        assert_eq!(
            code,
            Some(0),
            "{changed} entries: apply failed:\n{stdout}\n{stderr}"
        );
        assert!(
            probe.count() > before,
            "the probe did not run during the apply"
        );
        assert_eq!(
            probe.failures(),
            Vec::<String>::new(),
            "{changed} entries: an untouched domain was not served by its backend"
        );
        assert!(
            stdout.contains("through the runtime API"),
            "{changed} entries: the map change did not go through the runtime API:\n{stdout}"
        );
        wait_for_route(
            port,
            "d5.example.com",
            "backend=blog",
            Duration::from_secs(5),
        );
        wait_for_route(
            port,
            &format!("d{}.example.com", n - 1),
            "backend=shop",
            Duration::from_secs(5),
        );
    }
    probe.wait_more(20);
    assert_eq!(probe.failures(), Vec::<String>::new());
    assert_eq!(
        site.generation().1,
        workers,
        "a map change reloaded HAProxy"
    );
    let live = lunafront::target::haproxy::read_map(&site.runtime(), "maps/hosts.map").unwrap();
    assert_eq!(live.len(), 21500 + 3, "HAProxy's map lost entries");
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 0, "not converged:\n{plan}");
}

#[test]
fn large_map_change_through_the_daemon_never_empties_the_live_map() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    let write = |n: usize, to_blog: Range<usize>| {
        let domains = format!("{KEEP}{}", numbered(0..n, &to_blog));
        site.write_state(&state(
            port,
            shop.port,
            blog.port,
            "",
            &domains,
            &site.target_block(true),
        ));
    };
    write(1500, 0..0);
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(60));
    wait_for_route(
        port,
        "d1499.example.com",
        "backend=shop",
        Duration::from_secs(10),
    );
    let (_, workers) = site.generation();
    let probe = Probe::start(port, &keep_routes());
    probe.wait_more(20);

    // 100 moved, 20 000 added.
    write(21500, 0..100);
    wait_for_route(
        port,
        "d21499.example.com",
        "backend=shop",
        Duration::from_secs(120),
    );
    wait_for_route(
        port,
        "d7.example.com",
        "backend=blog",
        Duration::from_secs(10),
    );
    // The route answers as soon as HAProxy has it; the reconcile ends a moment later.
    let status = daemon.wait_for(
        "/status",
        200,
        "+ domain d21499.example.com",
        Duration::from_secs(60),
    );
    probe.wait_more(20);
    assert_eq!(
        probe.failures(),
        Vec::<String>::new(),
        "an untouched domain was not served by its backend"
    );
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["last_reconcile"]["how"], "runtime",
        "the map change did not go through the runtime API: {}",
        status["last_reconcile"]["message"]
    );
    assert_eq!(
        site.generation().1,
        workers,
        "a map change reloaded HAProxy"
    );
}

// ---- 2. One master ----

#[test]
fn an_unresponsive_master_never_gets_a_second_master_beside_it() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.target_block(true),
    ));
    let mut daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    // The daemon dies (kill -9); its successor adopts the HAProxy that kept serving.
    daemon.kill();
    let daemon = Daemon::start(site.path(), "state.yaml", &["--interval", "1s"]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let masters = haproxy_masters(site.path());
    assert_eq!(masters.len(), 1, "{masters:?}");
    let master = masters[0];

    // The master stops answering (a stopped process, or a machine too busy to schedule it)
    // for four times the 2 s its CLI is given to answer.
    signal(master, libc::SIGSTOP);
    let cont = Continue(master);
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let now = haproxy_masters(site.path());
        assert_eq!(
            now,
            vec![master],
            "a second HAProxy master was started beside the one that did not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(cont);
    let (code, body) = daemon.post("/reconcile");
    assert_eq!(code, 200, "{body}");
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert_eq!(haproxy_masters(site.path()), vec![master]);
    for (host, backend) in keep_routes() {
        let (status, body) = http_get(port, &host, "/").unwrap();
        assert!(
            status == 200 && body.starts_with(&format!("backend={backend} ")),
            "{host}: {status} {body}"
        );
    }
}

#[test]
fn a_second_daemon_on_the_same_target_is_refused() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.target_block(true),
    ));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, _, stderr) = run_bounded(
        site.path(),
        &[
            "daemon",
            "state.yaml",
            "--target",
            "local",
            "--listen",
            &listen,
        ],
        Duration::from_secs(15),
    );
    assert_eq!(
        code,
        Some(1),
        "a second daemon ran on the same target:\n{stderr}"
    );
    assert!(
        stderr.contains("another lunafront daemon"),
        "the refusal does not say why:\n{stderr}"
    );
    assert_eq!(haproxy_masters(site.path()).len(), 1);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(5));
}

// ---- 3. Interrupted applies ----

/// The site's target, not spawned, with `haproxy -c` held until the test opens a gate (a
/// check as slow as on a loaded machine; the real HAProxy still checks): the test can then act
/// while an apply is known to be before its point of no return.
fn gated_check_target(site: &Site) -> String {
    let d = site.path().display();
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then\n  : > {d}/check-started\n  while [ ! -e {d}/check-gate ]; do sleep 0.01; done\nfi\nexec haproxy \"$@\"\n"
    );
    let path = site.path().join("gated-haproxy");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(site.path().join("check-gate"), "").unwrap();
    site.target_block(false).replace(
        "reload_timeout: 10s }",
        &format!("reload_timeout: 10s, haproxy_bin: {d}/gated-haproxy }}"),
    )
}

/// Starts `apply` for a change that needs a reload (on a `gated_check_target`) and freezes it
/// inside the window between the file swap and the reload: while its `haproxy -c` is held,
/// HAProxy's master is stopped (so the reload waits for it); this returns once the new
/// configuration is on disk. Returns the apply process and a guard that resumes the master.
fn apply_frozen_in_the_window(site: &Site, alt: u16) -> (Child, Continue) {
    let master = site
        .master()
        .show_proc(Duration::from_secs(2))
        .unwrap()
        .master_pid;
    let (started, gate) = (
        site.path().join("check-started"),
        site.path().join("check-gate"),
    );
    let _ = std::fs::remove_file(&started);
    std::fs::remove_file(&gate).unwrap();
    let log_path = site.path().join(format!("apply-{alt}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = lunafront()
        .args(["apply", "state.yaml", "--auto-approve"])
        .current_dir(site.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the apply ended before its check ({status}): {}",
                std::fs::read_to_string(&log_path).unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the apply never checked its files"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(master, libc::SIGSTOP);
    let cont = Continue(master);
    std::fs::write(&gate, "").unwrap();
    let needle = format!("127.0.0.1:{alt}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(site.path().join("live/haproxy.cfg"))
        .unwrap_or_default()
        .contains(&needle)
    {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "the new configuration was never swapped in: {}",
                std::fs::read_to_string(&log_path).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (child, cont)
}

#[test]
fn killed_between_the_file_swap_and_the_reload_the_next_run_finishes_the_apply() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.target_block(true),
    ));
    site.apply();
    // A new listener: a change only a reload applies. The target now expects an HAProxy
    // that runs already (no spawn), so nothing but the apply itself can start one.
    let alt = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        &format!("  alt: {{ bind: \"127.0.0.1:{alt}\" }}\n"),
        KEEP,
        &gated_check_target(&site),
    ));
    let (mut child, cont) = apply_frozen_in_the_window(&site, alt);
    child.kill().unwrap();
    child.wait().unwrap();
    drop(cont);
    assert!(
        http_get(alt, "keep-0.example.com", "/").is_err(),
        "the reload happened anyway: this run did not hit the window"
    );

    // What runs is not what the files say: plan must not call that converged.
    let (code, plan, stderr) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(
        code, 2,
        "after an apply killed between the file swap and the reload, plan says nothing is pending:\n{plan}{stderr}"
    );
    assert!(plan.contains("interrupted"), "{plan}");
    // A daemon started now finishes the apply.
    let mut daemon = Daemon::start(site.path(), "state.yaml", &[]);
    wait_for_route(
        alt,
        "keep-0.example.com",
        "backend=shop",
        Duration::from_secs(20),
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(10));
    daemon.stop();
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 0, "not converged:\n{plan}");
}

#[test]
fn an_interrupt_inside_the_apply_window_completes_the_apply() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.target_block(true),
    ));
    site.apply();
    let target = gated_check_target(&site);
    let mut listeners = String::new();
    for (round, sig) in [("SIGINT", libc::SIGINT), ("SIGTERM", libc::SIGTERM)] {
        let alt = free_port();
        listeners.push_str(&format!("  alt{alt}: {{ bind: \"127.0.0.1:{alt}\" }}\n"));
        site.write_state(&state(
            port, shop.port, blog.port, &listeners, KEEP, &target,
        ));
        let (mut child, cont) = apply_frozen_in_the_window(&site, alt);
        signal(child.id(), sig);
        std::thread::sleep(Duration::from_millis(300));
        drop(cont);
        let code = wait_bounded(&mut child, Duration::from_secs(30), "the interrupted apply");
        let log = std::fs::read_to_string(site.path().join(format!("apply-{alt}.log"))).unwrap();
        assert_eq!(
            code,
            Some(0),
            "{round} inside the window: the apply did not complete:\n{log}"
        );
        assert!(log.contains("HAProxy reloaded"), "{round}: {log}");
        wait_for_route(
            alt,
            "keep-0.example.com",
            "backend=shop",
            Duration::from_secs(5),
        );
        let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
        assert_eq!(code, 0, "{round}: not converged:\n{plan}");
    }
}

#[test]
fn an_interrupt_before_the_point_of_no_return_changes_nothing() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.target_block(true),
    ));
    site.apply();
    let alt = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        &format!("  alt: {{ bind: \"127.0.0.1:{alt}\" }}\n"),
        KEEP,
        &site.target_block(false),
    ));
    let files = site.live_files();
    // The master is stopped, so the apply waits for it in its first question to HAProxy
    // (whether it runs), long before anything changes; the interrupt comes then.
    let master = site
        .master()
        .show_proc(Duration::from_secs(2))
        .unwrap()
        .master_pid;
    signal(master, libc::SIGSTOP);
    let cont = Continue(master);
    let mut child = lunafront()
        .args(["apply", "state.yaml", "--auto-approve"])
        .current_dir(site.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first socket is the master CLI's.
    let fds = format!("/proc/{}/fd", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_dir(&fds)
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
    {
        assert!(
            child.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "the apply never asked HAProxy"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(child.id(), libc::SIGINT);
    std::thread::sleep(Duration::from_millis(200));
    drop(cont);
    let code = wait_bounded(&mut child, Duration::from_secs(30), "the interrupted apply");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted before anything was changed"),
        "{stderr}"
    );
    assert_eq!(site.live_files(), files, "the files changed");
    assert!(http_get(alt, "keep-0.example.com", "/").is_err());
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 2, "{plan}");
    assert!(
        !plan.contains("interrupted"),
        "nothing was under way:\n{plan}"
    );
}

// ---- 4. Partial writes and mass deletes ----

/// A state folder: the listener, agent, backends and target in `base.yaml`, the domains in
/// `domains.yaml`.
fn folder_site(site: &Site, port: u16, shop: u16, blog: u16, global: &str) {
    let base = state(
        port,
        shop,
        blog,
        "",
        "",
        &site.folder_target_block("daemon-state"),
    )
    .replace("domains:\n", &format!("global:\n{global}"));
    write(site.path(), "state/base.yaml", &base);
}

fn thirty_domains(range: Range<usize>) -> String {
    format!("domains:\n{}", numbered(range, &(0..0)))
}

fn all_thirty() -> Vec<(String, &'static str)> {
    (0..30)
        .map(|i| (format!("d{i}.example.com"), "shop"))
        .collect()
}

#[test]
fn a_truncated_or_emptied_state_file_never_deletes_its_domains() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    folder_site(&site, port, shop.port, blog.port, "  maxconn: 1000\n");
    let domains = site.path().join("state/domains.yaml");
    let full = thirty_domains(0..30);
    std::fs::write(&domains, &full).unwrap();
    let daemon = Daemon::start(site.path(), "state", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    wait_for_route(
        port,
        "d29.example.com",
        "backend=shop",
        Duration::from_secs(5),
    );
    let probe = Probe::start(port, &all_thirty());
    probe.wait_more(30);

    // Truncated to nothing, written back 120 ms later (a writer that truncates, then writes).
    std::fs::write(&domains, "").unwrap();
    std::thread::sleep(Duration::from_millis(120));
    std::fs::write(&domains, &full).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    probe.wait_more(30);
    assert_eq!(
        probe.failures(),
        Vec::<String>::new(),
        "an emptied file deleted its domains"
    );

    // Cut at a line: valid YAML with 5 of the 30 domains. Held, not applied.
    let mut cut = thirty_domains(0..5);
    cut.push_str("  d5.exam");
    std::fs::write(&domains, thirty_domains(0..5)).unwrap();
    let held = daemon.wait_for("/status", 200, "\"held\":{", Duration::from_secs(10));
    let held: serde_json::Value = serde_json::from_str(&held).unwrap();
    assert_eq!(held["held"]["domains_removed"], 25, "{held}");
    assert_eq!(metric(&daemon, "lunafront_change_held"), Some(1.0));
    assert!(daemon.log_text().contains("held"), "{}", daemon.log_text());
    probe.wait_more(30);
    std::fs::write(&domains, &full).unwrap();
    daemon.wait_for(
        "/status",
        200,
        "\"result\":\"unchanged\"",
        Duration::from_secs(10),
    );
    assert_eq!(metric(&daemon, "lunafront_change_held"), Some(0.0));

    // Cut in the middle of a line: never read as fewer entries.
    std::fs::write(&domains, &cut).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&domains, &full).unwrap();

    // Replaced by an empty folder.
    std::fs::remove_file(&domains).unwrap();
    std::fs::create_dir(&domains).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    probe.wait_more(30);
    std::fs::remove_dir(&domains).unwrap();
    std::fs::write(&domains, &full).unwrap();
    std::thread::sleep(Duration::from_millis(1000));

    probe.wait_more(30);
    assert_eq!(
        probe.failures(),
        Vec::<String>::new(),
        "a partial write deleted domains"
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(10));
}

#[test]
fn a_mass_delete_is_held_until_it_settles_or_is_approved() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    folder_site(
        &site,
        port,
        shop.port,
        blog.port,
        "  delete_guard: { settle: 4s }\n",
    );
    let domains = site.path().join("state/domains.yaml");
    std::fs::write(&domains, thirty_domains(0..30)).unwrap();
    let daemon = Daemon::start(site.path(), "state", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let kept: Vec<(String, &'static str)> = all_thirty().into_iter().take(5).collect();
    let probe = Probe::start(port, &kept);

    // Removing 25 of 30 domains on purpose: held, then applied once the state stayed the
    // same for the settle time.
    std::fs::write(&domains, thirty_domains(0..5)).unwrap();
    daemon.wait_for("/status", 200, "\"held\":{", Duration::from_secs(10));
    assert_eq!(http_get(port, "d20.example.com", "/").unwrap().0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "d20.example.com", "/").unwrap().0 != 404 {
        assert!(
            Instant::now() < deadline,
            "a settled mass delete was never applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.wait_for(
        "/status",
        200,
        "\"result\":\"applied\"",
        Duration::from_secs(5),
    );
    assert!(status_json(&daemon)["held"].is_null());

    // With a long settle time: applied once approved, and only the change that is held.
    folder_site(
        &site,
        port,
        shop.port,
        blog.port,
        "  delete_guard: { settle: 1h, count: 3, percent: 50 }\n",
    );
    std::fs::write(&domains, thirty_domains(0..30)).unwrap();
    wait_for_route(
        port,
        "d29.example.com",
        "backend=shop",
        Duration::from_secs(10),
    );
    std::fs::write(&domains, thirty_domains(0..10)).unwrap();
    let status = daemon.wait_for("/status", 200, "\"held\":{", Duration::from_secs(10));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let revision = status["held"]["revision"].as_str().unwrap().to_string();
    let (code, body) = daemon.post("/approve?revision=000000000000");
    assert_eq!(code, 409, "{body}");
    assert_eq!(http_get(port, "d29.example.com", "/").unwrap().0, 200);
    let (code, body) = daemon.post(&format!("/approve?revision={revision}"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"result\":\"applied\""), "{body}");
    assert_eq!(http_get(port, "d29.example.com", "/").unwrap().0, 404);
    probe.wait_more(20);
    assert_eq!(probe.failures(), Vec::<String>::new());
}

#[test]
fn apply_refuses_a_mass_delete_without_allow_deletes() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    let write = |domains: &str| {
        site.write_state(&state(
            port,
            shop.port,
            blog.port,
            "",
            domains,
            &site.target_block(true),
        ))
    };
    write(&numbered(0..30, &(0..0)));
    site.apply();
    write(&numbered(0..5, &(0..0)));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(
        code, 1,
        "a mass delete was applied without --allow-deletes:\n{stdout}"
    );
    assert!(stderr.contains("--allow-deletes"), "{stderr}");
    assert!(stderr.contains("25 of 30 domains"), "{stderr}");
    assert_eq!(http_get(port, "d20.example.com", "/").unwrap().0, 200);
    let (code, stdout, stderr) =
        site.lunafront(&["apply", "state.yaml", "--auto-approve", "--allow-deletes"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(http_get(port, "d20.example.com", "/").unwrap().0, 404);

    // The threshold is the state's, checked with positions.
    let bad = state(port, shop.port, blog.port, "", "", &site.target_block(true)).replace(
        "domains:\n",
        "global:\n  delete_guard: { count: -1, percent: 150 }\ndomains: {}\n",
    );
    site.write_state(&bad);
    let (code, _, stderr) = site.lunafront(&["validate", "state.yaml"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("state.yaml:10:"), "{stderr}");

    // An empty state file is refused, not read as a state without domains.
    std::fs::write(site.path().join("state.yaml"), "").unwrap();
    let (code, _, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("state.yaml:1:1"), "{stderr}");
    assert_eq!(http_get(port, "d1.example.com", "/").unwrap().0, 200);
}

// ---- 5. Symlink loops ----

#[test]
fn symlink_loops_in_the_state_folder_keep_the_daemon_small_and_working() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    folder_site(&site, port, shop.port, blog.port, "  maxconn: 1000\n");
    let domains = site.path().join("state/domains.yaml");
    std::fs::write(&domains, thirty_domains(0..30)).unwrap();
    std::os::unix::fs::symlink(".", site.path().join("state/loop")).unwrap();
    std::os::unix::fs::symlink("..", site.path().join("state/up")).unwrap();

    let (code, _, stderr) =
        run_bounded(site.path(), &["validate", "state"], Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    let daemon = Daemon::start(site.path(), "state", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let start = rss_kib(daemon.child.id());
    let mut peak = start;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut edited = false;
    while Instant::now() < deadline {
        peak = peak.max(rss_kib(daemon.child.id()));
        if !edited && deadline - Instant::now() < Duration::from_secs(5) {
            std::fs::write(&domains, thirty_domains(0..31)).unwrap();
            edited = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for_route(
        port,
        "d30.example.com",
        "backend=shop",
        Duration::from_secs(5),
    );
    println!(
        "daemon RSS with two symlink loops: {start} KiB at start, {peak} KiB at most over 8 s"
    );
    assert!(
        peak < start + 64 * 1024,
        "the daemon grew from {start} KiB to {peak} KiB with symlink loops in its folder"
    );
}

// ---- 6. Signals ----

#[test]
fn sighup_reconciles_and_never_kills_the_daemon() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.target_block(true),
    ));
    let mut daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let before = reconciles(&daemon);
    signal(daemon.child.id(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reconciles(&daemon) <= before {
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "SIGHUP killed the daemon:\n{}",
            daemon.log_text()
        );
        assert!(Instant::now() < deadline, "SIGHUP did not reconcile");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon.log_text().contains("SIGHUP"),
        "{}",
        daemon.log_text()
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(5));
    assert!(daemon.child.try_wait().unwrap().is_none());
    daemon.stop();
    assert!(
        daemon.log_text().contains("SIGTERM"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(haproxy_masters(site.path()), Vec::<u32>::new());
}

#[test]
fn sigterm_stops_an_adopted_haproxy() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.target_block(true),
    ));
    let mut daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    daemon.kill();
    let mut daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let masters = haproxy_masters(site.path());
    assert_eq!(masters.len(), 1);
    daemon.stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(masters[0]) {
        assert!(
            Instant::now() < deadline,
            "the adopted HAProxy outlived its daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(http_get(port, "keep-0.example.com", "/").is_err());
}

#[test]
fn a_daemon_that_exits_at_start_leaves_no_haproxy_running() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    // A state folder (the API writes agents' files into it).
    folder_site(&site, port, shop.port, blog.port, "  maxconn: 1000\n");
    write(site.path(), "state/domains.yaml", KEEP_FILE);
    let (code, stdout, stderr) = site.lunafront(&["apply", "state", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    site.stop_haproxy();
    write(site.path(), "admin-token", "short\n");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let cases: [(&str, Vec<String>); 2] = [
        (
            "a short admin token",
            vec![
                "--listen".into(),
                format!("127.0.0.1:{}", free_port()),
                "--api".into(),
                format!("127.0.0.1:{}", free_port()),
                "--admin-token-file".into(),
                "admin-token".into(),
            ],
        ),
        (
            "a listen address in use",
            vec!["--listen".into(), format!("127.0.0.1:{busy_port}")],
        ),
    ];
    for (case, extra) in cases {
        let mut args = vec!["daemon", "state", "--target", "local"];
        args.extend(extra.iter().map(String::as_str));
        let (code, _, stderr) = run_bounded(site.path(), &args, Duration::from_secs(30));
        assert_eq!(code, Some(1), "{case}: {stderr}");
        assert_eq!(
            haproxy_masters(site.path()),
            Vec::<u32>::new(),
            "{case}: the daemon exited and left its HAProxy running:\n{stderr}"
        );
        assert!(http_get(port, "keep-0.example.com", "/").is_err(), "{case}");
    }
}

// ---- 7. One view of the sockets ----

/// `lunafront daemon` in a mount namespace of its own with a private /run (tmpfs, with the
/// /run/haproxy folder Debian's package provides): a target using the default socket paths
/// runs there without touching the machine's /run.
struct NsDaemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl NsDaemon {
    fn start(dir: &Path, args: &[&str]) -> NsDaemon {
        let port = free_port();
        let log = dir.join(format!("ns-daemon-{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs tmpfs /run && mkdir -p /run/haproxy && exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_lunafront"))
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("NO_COLOR", "1")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("unshare (util-linux) runs as root");
        let daemon = NsDaemon { child, port, log };
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "the daemon did not listen: {}",
            std::fs::read_to_string(&daemon.log).unwrap_or_default()
        );
        daemon
    }

    /// Runs lunafront inside the daemon's mount namespace (its /run).
    fn lunafront(&self, dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.child.id().to_string())
            .arg("-m")
            .arg(format!("--wd={}", dir.display()))
            .arg(env!("CARGO_BIN_EXE_lunafront"))
            .args(args)
            .env("NO_COLOR", "1")
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let _ = wait_bounded(&mut self.child, Duration::from_secs(20), "the daemon");
    }
}

#[test]
fn plan_after_the_daemon_converged_is_empty() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    let d = site.path().display();
    // No socket paths and no `spawn:` in the state: the defaults. `--spawn` runs HAProxy.
    site.write_state(&state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &format!(
            "targets:\n  local: {{ type: haproxy, config: {d}/live/haproxy.cfg, state_dir: {d}/state }}\n"
        ),
    ));
    let daemon = NsDaemon::start(
        site.path(),
        &["daemon", "state.yaml", "--target", "local", "--spawn"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(daemon.port, "127.0.0.1", "/ready")
        .map(|r| r.0)
        .ok()
        != Some(200)
    {
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            std::fs::read_to_string(&daemon.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_route(
        port,
        "keep-0.example.com",
        "backend=shop",
        Duration::from_secs(5),
    );
    let (code, plan, stderr) =
        daemon.lunafront(site.path(), &["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(
        code,
        Some(0),
        "plan after the daemon converged is not empty:\n{plan}{stderr}"
    );
    let (code, stdout, stderr) =
        daemon.lunafront(site.path(), &["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("Applied"), "{stdout}");
}

// ---- 8. Rollback and records ----

#[test]
fn a_failed_file_swap_after_runtime_changes_puts_haproxy_back_on_the_files() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    let write = |backend: &str| {
        site.write_state(&state(
            port,
            shop.port,
            blog.port,
            "",
            &format!("{KEEP}  moved.example.com: {{ backend: {backend} }}\n"),
            &site.target_block(true),
        ))
    };
    write("shop");
    site.apply();
    let files = site.live_files();
    let imm = Immutable::set(&site.path().join("live/maps/hosts.map"));
    write("blog");
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    let (status, body) = http_get(port, "moved.example.com", "/").unwrap();
    assert!(
        status == 200 && body.starts_with("backend=shop "),
        "HAProxy serves {status} {body} while its files say shop"
    );
    assert_eq!(site.live_files(), files, "the files changed");
    let (_, history, _) = site.lunafront(&["history", "state.yaml"]);
    assert_eq!(history.lines().count(), 2, "{history}");
    drop(imm);
    site.apply();
    wait_for_route(
        port,
        "moved.example.com",
        "backend=blog",
        Duration::from_secs(5),
    );
}

#[test]
fn a_history_that_cannot_be_written_is_reported_and_rollback_never_skips_the_live_state() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    let write = |backend: &str, extra: &str| {
        site.write_state(&state(
            port,
            shop.port,
            blog.port,
            "",
            &format!("{KEEP}  moved.example.com: {{ backend: {backend} }}\n{extra}"),
            &site.target_block(true),
        ))
    };
    write("shop", "");
    site.apply(); // entry 1
    write("blog", "");
    site.apply(); // entry 2
    let imm = Immutable::set(&site.path().join("state/history"));
    write("shop", "  extra.example.com: { backend: blog }\n");
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    drop(imm);
    assert_eq!(
        code, 5,
        "an apply whose history could not be written exited as if all was well:\n{stdout}{stderr}"
    );
    assert!(stderr.contains("history"), "{stderr}");
    wait_for_route(
        port,
        "extra.example.com",
        "backend=blog",
        Duration::from_secs(5),
    );

    // The live state (unrecorded) is not entry 2: one step back is entry 2, not entry 1.
    let (code, stdout, stderr) = site.lunafront(&["rollback", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("back to entry 2"), "{stdout}");
    wait_for_route(
        port,
        "moved.example.com",
        "backend=blog",
        Duration::from_secs(5),
    );
    assert_eq!(http_get(port, "extra.example.com", "/").unwrap().0, 404);
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn status_git_commit_is_the_commit_of_the_applied_state() {
    let site = Site::new();
    let _reaper = Reaper(site.path().to_path_buf());
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let port = free_port();
    let repo = site.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    // The target keeps its sockets in <site>/state.
    std::fs::create_dir(site.path().join("state")).unwrap();
    git(&repo, &["init", "-q"]);
    let good = state(
        port,
        shop.port,
        blog.port,
        "",
        KEEP,
        &site.folder_target_block("daemon-state"),
    );
    std::fs::write(repo.join("state.yaml"), &good).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let one = git(&repo, &["rev-parse", "HEAD"]);
    let daemon = Daemon::start(site.path(), "repo/state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert_eq!(status_json(&daemon)["revision"]["git_commit"], one.as_str());

    std::fs::write(
        repo.join("state.yaml"),
        good.replace("backend: blog", "backend: nope"),
    )
    .unwrap();
    git(&repo, &["commit", "-q", "-am", "two (broken)"]);
    daemon.wait_for("/status", 200, "unknown-backend", Duration::from_secs(10));
    assert_eq!(
        status_json(&daemon)["revision"]["git_commit"],
        one.as_str(),
        "/status names the checkout's HEAD, not the commit HAProxy runs"
    );

    std::fs::write(
        repo.join("state.yaml"),
        good.replace(
            "keep-2.example.com: { backend: blog }",
            "keep-2.example.com: { backend: shop }",
        ),
    )
    .unwrap();
    git(&repo, &["commit", "-q", "-am", "three"]);
    let three = git(&repo, &["rev-parse", "HEAD"]);
    wait_for_route(
        port,
        "keep-2.example.com",
        "backend=shop",
        Duration::from_secs(10),
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(10));
    assert_eq!(
        status_json(&daemon)["revision"]["git_commit"],
        three.as_str()
    );
}
