//! Change to live: the time from saving a YAML change (daemon mode) or running `apply` to the
//! new route answering through a real HAProxy, for a runtime change (a new domain) and a
//! reload change (a new listener), over many changes at a given number of existing domains.
//! Prints p50/p99 and the goals; `--json FILE` also writes the figures.
//!
//! Run: `cargo bench --bench save_to_live -- [--domains 1000] [--changes 30] [--mode daemon|apply|both] [--json FILE]`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    domains: usize,
    changes: usize,
    modes: Vec<&'static str>,
    json: Option<String>,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let mode = value("--mode").unwrap_or_else(|| "both".into());
    Args {
        domains: value("--domains")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
        changes: value("--changes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
        modes: match mode.as_str() {
            "daemon" => vec!["daemon"],
            "apply" => vec!["apply"],
            _ => vec!["daemon", "apply"],
        },
        json: value("--json"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A keep-alive HTTP backend answering `backend=<name>`.
fn backend(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let body = format!("backend={name}\n");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if writer.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn get(port: u16, host: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn wait_200(port: u16, host: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if get(port, host) == Some(200) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

struct Bench {
    dir: std::path::PathBuf,
    port: u16,
    backends: (u16, u16),
    domains: usize,
    listeners: Vec<(String, u16)>,
    new_domains: Vec<String>,
}

impl Bench {
    fn state(&self) -> String {
        let mut s = String::with_capacity(self.domains * 120);
        s.push_str(&format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\n",
            self.port
        ));
        for (name, port) in &self.listeners {
            s.push_str(&format!("  {name}: {{ bind: \"127.0.0.1:{port}\" }}\n"));
        }
        s.push_str("agents:\n  a1: { address: 127.0.0.1 }\nbackends:\n");
        for i in 0..self.domains {
            let port = if i % 2 == 0 {
                self.backends.0
            } else {
                self.backends.1
            };
            s.push_str(&format!(
                "  app-{i}: {{ servers: [ {{ agent: a1, port: {port} }} ] }}\n"
            ));
        }
        s.push_str("domains:\n");
        for i in 0..self.domains {
            s.push_str(&format!(
                "  d{i}.bench.example.com: {{ backend: app-{i} }}\n"
            ));
        }
        for d in &self.new_domains {
            s.push_str(&format!("  {d}: {{ backend: app-0 }}\n"));
        }
        s.push_str(&format!(
            "targets:\n  local: {{ type: haproxy, config: {d}/live/haproxy.cfg, spawn: true, state_dir: {d}/state, history: 3 }}\n",
            d = self.dir.display()
        ));
        s
    }

    /// Saves the state the way an editor does: write aside, rename over.
    fn save(&self) {
        let tmp = self.dir.join("state/.lunafront.yaml.tmp");
        std::fs::write(&tmp, self.state()).unwrap();
        std::fs::rename(&tmp, self.dir.join("state/lunafront.yaml")).unwrap();
    }
}

fn lunafront() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lunafront"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args = args();
    let root = std::env::temp_dir().join(format!("lunafront-bench-{}", std::process::id()));
    let mut results = Vec::new();
    println!(
        "change to live at {} existing domains, {} changes of each kind",
        args.domains, args.changes
    );
    println!(
        "{:<7} {:<8} {:>9} {:>9} {:>9}  goal",
        "mode", "change", "p50", "p99", "max"
    );
    for mode in &args.modes {
        let dir = root.join(mode);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let mut bench = Bench {
            dir: dir.clone(),
            port: free_port(),
            backends: (backend("even"), backend("odd")),
            domains: args.domains,
            listeners: Vec::new(),
            new_domains: Vec::new(),
        };
        bench.save();
        let state_file = dir.join("state/lunafront.yaml");
        let mut daemon: Option<Child> = None;
        if *mode == "daemon" {
            let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
            daemon = Some(
                lunafront()
                    .args([
                        "daemon",
                        state_file.to_str().unwrap(),
                        "--target",
                        "local",
                        "--listen",
                        &format!("127.0.0.1:{}", free_port()),
                    ])
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            );
        } else {
            let out = lunafront()
                .args(["apply", state_file.to_str().unwrap(), "--auto-approve"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        wait_200(bench.port, "d0.bench.example.com", Duration::from_secs(120))
            .expect("the first state never answered");

        for kind in ["runtime", "reload"] {
            let mut times = Vec::new();
            for k in 0..args.changes {
                let (port, host) = if kind == "runtime" {
                    let host = format!("new-{mode}-{k}.bench.example.com");
                    bench.new_domains.push(host.clone());
                    (bench.port, host)
                } else {
                    let port = free_port();
                    bench.listeners.push((format!("extra{k}"), port));
                    (port, "d0.bench.example.com".to_string())
                };
                let started = Instant::now();
                bench.save();
                if *mode == "apply" {
                    let out = lunafront()
                        .args(["apply", state_file.to_str().unwrap(), "--auto-approve"])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                wait_200(port, &host, Duration::from_secs(60))
                    .unwrap_or_else(|| panic!("{mode} {kind} change {k} never answered"));
                times.push(started.elapsed());
            }
            times.sort();
            let (p50, p99, max) = (
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                *times.last().unwrap(),
            );
            let goal = if kind == "runtime" {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            };
            let verdict = if p50 < goal { "met" } else { "NOT MET" };
            println!(
                "{mode:<7} {kind:<8} {:>7.1}ms {:>7.1}ms {:>7.1}ms  p50 < {}ms: {verdict}",
                ms(p50),
                ms(p99),
                ms(max),
                goal.as_millis()
            );
            results.push(format!(
                "{{\"mode\":\"{mode}\",\"change\":\"{kind}\",\"domains\":{},\"changes\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1},\"goal_p50_ms\":{},\"goal_met\":{}}}",
                args.domains,
                args.changes,
                ms(p50),
                ms(p99),
                ms(max),
                goal.as_millis(),
                p50 < goal
            ));
        }
        if let Some(mut d) = daemon {
            unsafe_term(&mut d);
        }
        stop_haproxy(&dir);
    }
    if let Some(path) = args.json {
        std::fs::write(&path, format!("[{}]\n", results.join(",\n"))).unwrap();
    }
    let _ = std::fs::remove_dir_all(&root);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unsafe_term(child: &mut Child) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = child.wait();
}

/// Stops an HAProxy `apply` started in the background (its pidfile is in the state folder).
fn stop_haproxy(dir: &Path) {
    if let Ok(pid) = std::fs::read_to_string(dir.join("state/haproxy.pid")) {
        let _ = Command::new("kill")
            .arg(pid.trim())
            .stderr(Stdio::null())
            .status();
    }
}
