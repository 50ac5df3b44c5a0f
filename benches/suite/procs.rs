//! What the scenarios drive: the lunafront binary, HAProxy processes (pinned to a CPU), an
//! origin HAProxy that answers every request itself, wrk with `bench/hosts.lua`, and readings
//! of a process's memory and CPU from /proc. Every process is stopped when its handle drops.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// An HAProxy the suite drives (`--haproxy`): a command — `haproxy`, a path, or a wrapper such
/// as `scripts/haproxy-3.0` — and the version it reports.
#[derive(Debug, Clone)]
pub struct HaproxyBin {
    pub command: String,
    /// `2.6.12-1+deb12u3`.
    pub version: String,
}

impl HaproxyBin {
    /// Runs `<command> -v`; a path is made absolute (lunafront and HAProxy run from `/`).
    pub fn probe(command: &str) -> Result<HaproxyBin, String> {
        let command = if command.contains('/') {
            std::fs::canonicalize(command)
                .map_err(|e| format!("{command}: {e}"))?
                .display()
                .to_string()
        } else {
            command.to_string()
        };
        let out = Command::new(&command)
            .arg("-v")
            .output()
            .map_err(|e| format!("{command} -v: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(2))
            .filter(|_| out.status.success())
            .ok_or_else(|| {
                format!(
                    "{command} -v did not print a version: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?
            .to_string();
        Ok(HaproxyBin { command, version })
    }

    /// `2.6`: the figures' names carry it.
    pub fn short(&self) -> String {
        self.version
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".")
    }
}

static PRIMARY: OnceLock<HaproxyBin> = OnceLock::new();

/// Sets the HAProxy of every scenario but those that compare versions (the first `--haproxy`).
pub fn set_primary(bin: HaproxyBin) {
    let _ = PRIMARY.set(bin);
}

pub fn primary() -> &'static HaproxyBin {
    PRIMARY
        .get()
        .expect("the suite's HAProxy is set before any scenario")
}

/// The front HAProxy runs on this CPU; wrk and the origin on the other, so that the front is
/// what saturates.
pub const FRONT_CPU: &str = "0";
pub const CLIENT_CPU: &str = "1";

pub fn lunafront() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lunafront"));
    cmd.env("NO_COLOR", "1");
    cmd
}

/// Runs lunafront to the end; panics with its output when it fails.
pub fn lunafront_ok(args: &[&str]) -> String {
    let out = lunafront().args(args).output().expect("run lunafront");
    assert!(
        out.status.success(),
        "lunafront {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let file = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process this benchmark started.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// `haproxy -db -f config` pinned to `cpu` (HAProxy then runs one thread: it sizes its
/// threads by the CPUs it may use). Waits until `port` accepts connections.
pub fn haproxy(config: &Path, cpu: &str, port: u16) -> Proc {
    haproxy_with(primary(), config, cpu, port)
}

/// `haproxy` with this HAProxy.
pub fn haproxy_with(bin: &HaproxyBin, config: &Path, cpu: &str, port: u16) -> Proc {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu])
        .arg(&bin.command)
        .args(["-db", "-f"])
        .arg(config);
    let mut proc = Proc::spawn("haproxy", cmd, &config.with_extension("log"));
    // 50,000 ACL rules or servers in one backend take a minute to load on a quiet machine.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !wait_port(port, Duration::from_millis(100)) {
        let exited = proc.child.try_wait().ok().flatten().is_some();
        if exited || Instant::now() > deadline {
            panic!(
                "haproxy did not listen on {port}: {}",
                std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
            );
        }
    }
    proc
}

/// How many ports the origin listens on: an agent's apps each get their own, so that every app
/// is its own upstream (address, port), as on a real platform.
pub const ORIGIN_PORTS: u16 = 100;

/// `count` consecutive free ports.
fn free_port_range(count: u16) -> u16 {
    'candidates: for base in (21_000..65_000 - count).step_by(1_000) {
        let mut held = Vec::new();
        for port in base..base + count {
            match TcpListener::bind(("0.0.0.0", port)) {
                Ok(l) => held.push(l),
                Err(_) => continue 'candidates,
            }
        }
        return base;
    }
    panic!("no {count} consecutive free ports");
}

/// An HAProxy that answers every request with a small 200 itself: the upstream of every
/// scenario, fast enough not to be what is measured. Listens on every loopback address, on
/// `ORIGIN_PORTS` ports from the one returned. It closes idle connections after 1 s, so the
/// idle pools a front keeps to N upstreams drain between turns.
pub fn origin(dir: &Path) -> (Proc, u16) {
    origin_on(dir, ORIGIN_PORTS)
}

/// `origin` on `ports` ports (10,000 apps on one agent are 10,000 ports of one address).
pub fn origin_on(dir: &Path, ports: u16) -> (Proc, u16) {
    let base = free_port_range(ports);
    let config = dir.join(format!("origin-{ports}.cfg"));
    // HAProxy needs about 2 × maxconn + its listeners in file descriptors, within the limit.
    let fds = open_files_limit();
    let maxconn = 9_000.min(fds.saturating_sub(ports as u64 + 200) / 2);
    std::fs::write(
        &config,
        format!(
            "global\n    maxconn {maxconn}\ndefaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n    timeout http-keep-alive 1s\nfrontend origin\n    bind 0.0.0.0:{base}-{}\n    http-request return status 200 content-type text/plain string \"ok\\n\"\n",
            base + ports - 1
        ),
    )
    .unwrap();
    (haproxy(&config, CLIENT_CPU, base), base)
}

/// The hard limit on open files (what HAProxy may raise its own limit to).
fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_max
    } else {
        1024
    }
}

pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The status of `GET /` with this Host, on a fresh connection.
pub fn get(port: u16, host: &str) -> Option<u16> {
    let answer = http_get(port, host, "/")?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// One HTTP/1.1 GET on a fresh connection: the whole answer. The request leaves in one
/// segment: written piecemeal, Nagle's algorithm would hold its tail until the server's
/// delayed ACK (40 ms), and that would be measured as lunafront's latency.
fn http_get(port: u16, host: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Polls (every 2 ms) until `host` answers 200 on `port`; the time it took.
pub fn wait_200(port: u16, host: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if get(port, host) == Some(200) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// What wrk measured (from `bench/hosts.lua`'s `done`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_us: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeout_errors: u64,
    /// Responses other than 2xx or 3xx.
    pub status_errors: u64,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6)
    }
    pub fn socket_errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.timeout_errors
    }
}

/// Starts wrk (pinned to the client CPU) against `port` for `seconds`, spreading requests
/// over the hosts listed in `hosts_file`, with `connections` keep-alive connections.
pub fn wrk_start(port: u16, hosts_file: &Path, seconds: u64, connections: u32) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hosts.lua");
    Command::new("taskset")
        .args(["-c", CLIENT_CPU, "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "5s", "-s"])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .arg("--")
        .arg(hosts_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wrk (apt-get install wrk; bench/run installs it)")
}

pub fn wrk_finish(child: Child) -> WrkResult {
    let out = child.wait_with_output().expect("wrk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no result:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("wrk result {line}: {e}"))
}

pub fn wrk(port: u16, hosts_file: &Path, seconds: u64, connections: u32) -> WrkResult {
    wrk_finish(wrk_start(port, hosts_file, seconds, connections))
}

/// A process's memory (kB) as /proc reports it: (VmRSS, VmHWM).
pub fn memory_kb(pid: u32) -> (u64, u64) {
    (status_kb(pid, "VmRSS:"), status_kb(pid, "VmHWM:"))
}

/// One `kB` field of /proc/PID/status (`VmRSS:`, `RssAnon:`, ...); 0 when unreadable.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time a process used so far (user + system).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// The bench's platform: `domains` apps (`d<i>.bench.example.com`), one domain each, on
/// `domains / apps_per_agent` agents at 127.0.x.y (100 apps each unless set); each app is its
/// own upstream (its agent's address, a port of the origin's range).
pub struct Platform {
    pub dir: PathBuf,
    pub domains: usize,
    pub apps_per_agent: usize,
    pub http_port: u16,
    pub origin_port: u16,
    /// How many ports the origin listens on (at least `apps_per_agent`).
    pub origin_ports: u16,
    /// More listeners (name, port) and domains added by changes.
    pub listeners: Vec<(String, u16)>,
    pub new_domains: Vec<String>,
    /// Apps added on agent 0 by changes (`host(domains + k)`, after the others' ports).
    pub extra_apps: usize,
    /// A global timeout the reload changes flip.
    pub client_timeout_s: u32,
    /// The `targets:` entry.
    pub target: String,
}

impl Platform {
    pub fn new(dir: &Path, domains: usize, origin_port: u16) -> Platform {
        std::fs::create_dir_all(dir.join("state")).unwrap();
        Platform {
            dir: dir.to_path_buf(),
            domains,
            apps_per_agent: 100,
            http_port: free_port(),
            origin_port,
            origin_ports: ORIGIN_PORTS,
            listeners: Vec::new(),
            new_domains: Vec::new(),
            extra_apps: 0,
            client_timeout_s: 30,
            // HAProxy 2.6 on 2 cores takes about 10 s to start on 100k apps (each a server in
            // its slot): the default `reload_timeout` of 10 s rolled the start back while
            // HAProxy came up anyway. An operator at that size sets it higher, as here.
            target: format!(
                "  local: {{ type: haproxy, config: {d}/live/haproxy.cfg, spawn: true, state_dir: {d}/run, history: 3, haproxy_bin: {bin}, reload_timeout: 60s }}\n",
                d = dir.display(),
                bin = primary().command
            ),
        }
    }

    pub fn host(i: usize) -> String {
        format!("d{i}.bench.example.com")
    }

    pub fn agents(&self) -> usize {
        self.domains.div_ceil(self.apps_per_agent).max(1)
    }

    pub fn agent_ip(agent: usize) -> String {
        format!("127.0.{}.{}", agent / 250, agent % 250 + 1)
    }

    /// App `i`: (its agent, its port).
    pub fn app(&self, i: usize) -> (usize, u16) {
        let agents = self.agents();
        (
            i % agents,
            self.origin_port + ((i / agents) % self.origin_ports as usize) as u16,
        )
    }

    pub fn yaml(&self) -> String {
        let mut s = String::with_capacity(self.domains * 130);
        s.push_str(&format!(
            "version: 1\nglobal:\n  timeouts: {{ client: {}s }}\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\n",
            self.client_timeout_s, self.http_port
        ));
        for (name, port) in &self.listeners {
            s.push_str(&format!("  {name}: {{ bind: \"127.0.0.1:{port}\" }}\n"));
        }
        s.push_str("agents:\n");
        for a in 0..self.agents() {
            s.push_str(&format!("  a{a}: {{ address: {} }}\n", Self::agent_ip(a)));
        }
        s.push_str("backends:\n");
        for i in 0..self.domains {
            let (agent, port) = self.app(i);
            s.push_str(&format!(
                "  app-{i}: {{ servers: [ {{ agent: a{agent}, port: {port} }} ] }}\n"
            ));
        }
        for i in self.domains..self.domains + self.extra_apps {
            let port = self.origin_port + (i % self.origin_ports as usize) as u16;
            s.push_str(&format!(
                "  app-{i}: {{ servers: [ {{ agent: a0, port: {port} }} ] }}\n"
            ));
        }
        s.push_str("domains:\n");
        for i in 0..self.domains + self.extra_apps {
            s.push_str(&format!("  {}: {{ backend: app-{i} }}\n", Self::host(i)));
        }
        for d in &self.new_domains {
            s.push_str(&format!("  {d}: {{ backend: app-0 }}\n"));
        }
        s.push_str("targets:\n");
        s.push_str(&self.target);
        s
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state/lunafront.yaml")
    }

    /// Saves the state the way an editor does: write aside, rename over.
    pub fn save(&self) {
        let tmp = self.dir.join("state/.lunafront.yaml.tmp");
        std::fs::write(&tmp, self.yaml()).unwrap();
        std::fs::rename(&tmp, self.state_file()).unwrap();
    }

    /// The hosts wrk spreads its requests over.
    pub fn hosts_file(&self) -> PathBuf {
        let path = self.dir.join("hosts.txt");
        let hosts: String = (0..self.domains)
            .map(|i| format!("{}\n", Self::host(i)))
            .collect();
        std::fs::write(&path, hosts).unwrap();
        path
    }

    /// Stops the HAProxy lunafront started for this platform (its pidfile).
    pub fn stop_haproxy(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run/haproxy.pid"))
            && let Ok(pid) = pid.trim().parse()
        {
            signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.stop_haproxy();
    }
}

/// The daemon's reconcile counter (every result), from /metrics.
pub fn reconciles(port: u16) -> u64 {
    http_get(port, "127.0.0.1", "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("lunafront_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
