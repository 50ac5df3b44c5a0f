//! The HAProxy process (I/O edge): `haproxy -c`, starting it in master-worker mode, and
//! reloading it through the master CLI. On 2.6 the master does not report whether a reload
//! worked, so a reload is judged by `show proc`: a new worker generation and an unchanged
//! `[failed: N]` counter, then the runtime socket answering from the new worker.

use super::socket::{MasterCli, ProcInfo, RuntimeApi};
use crate::model::HaproxyTarget;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A command that starts `haproxy` without lunafront's secrets: HAProxy expands `${VAR}` in
/// quoted configuration strings and `env(VAR)` in expressions, so whatever its configuration
/// holds must not be able to read the admin token (`LUNAFRONT_*`) from its environment.
pub fn haproxy_command(haproxy: &Path) -> Command {
    let mut command = Command::new(haproxy);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LUNAFRONT_") {
            command.env_remove(&name);
        }
    }
    command
}

/// Runs `haproxy -c` on a configuration, from `/` so relative paths must resolve through
/// `default-path config`. `Err` holds HAProxy's own explanation.
pub fn check_config(haproxy: &Path, config: &Path) -> Result<(), String> {
    let out = haproxy_command(haproxy)
        .args(["-c", "-f"])
        .arg(config)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", haproxy.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("[ALERT]")).collect();
    Err(if lines.is_empty() {
        text.trim().to_string()
    } else {
        lines.join("\n")
    })
}

/// Whether a master answers on the target's master socket.
pub fn running(target: &HaproxyTarget) -> Option<ProcInfo> {
    MasterCli::new(&target.master_socket)
        .show_proc(Duration::from_millis(200))
        .ok()
}

/// One process, named by its PID and its start time (in clock ticks after boot, field 22 of
/// `/proc/PID/stat`): a PID alone may name another process once the first is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub start: u64,
}

impl Process {
    /// Process `pid` as it is now; `None` when there is none (or only its zombie).
    pub fn of(pid: u32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: count after it.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z" | &"X")) {
            return None;
        }
        Some(Process {
            pid,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// Still the same process, and not a zombie.
    pub fn alive(&self) -> bool {
        Process::of(self.pid) == Some(*self)
    }
}

/// Where the master lunafront started (or adopted) is recorded: `<state_dir>/haproxy.master`.
fn master_record(target: &HaproxyTarget) -> std::path::PathBuf {
    target.state_dir.join("haproxy.master")
}

/// Records process `pid` as the target's HAProxy master.
pub fn record_master(target: &HaproxyTarget, pid: u32) {
    let Some(process) = Process::of(pid) else {
        return;
    };
    if recorded_master(target) == Some(process) {
        return;
    }
    let text = format!("{} {}\n", process.pid, process.start);
    if let Err(e) = crate::target::files::write_atomic(
        &master_record(target),
        text.as_bytes(),
        crate::target::files::SECRET_MODE,
    ) {
        tracing::warn!("cannot record HAProxy's master: {e}");
    }
}

/// The recorded master, if that process still exists (answering or not).
pub fn recorded_master(target: &HaproxyTarget) -> Option<Process> {
    let text = std::fs::read_to_string(master_record(target)).ok()?;
    let mut words = text.split_whitespace();
    let process = Process {
        pid: words.next()?.parse().ok()?,
        start: words.next()?.parse().ok()?,
    };
    process.alive().then_some(process)
}

pub fn forget_master(target: &HaproxyTarget) {
    let _ = std::fs::remove_file(master_record(target));
}

/// Why no new master may be started for the target, when one exists even though it does not
/// answer: the recorded master is alive, or something accepts connections on the master
/// socket (a stopped or overloaded master still does: the kernel queues them). Two masters on
/// one socket path and one port would both serve, each its own configuration.
pub fn existing_master(target: &HaproxyTarget) -> Option<String> {
    if let Some(master) = recorded_master(target) {
        return Some(format!(
            "HAProxy's master (PID {}) is alive but does not answer on {}",
            master.pid,
            target.master_socket.display()
        ));
    }
    std::os::unix::net::UnixStream::connect(&target.master_socket)
        .ok()
        .map(|_| {
            format!(
                "a process accepts connections on {} but does not answer as HAProxy's master",
                target.master_socket.display()
            )
        })
}

/// Starts HAProxy in master-worker mode, in the background (`-D`), for a `spawn: true` target
/// applied from the command line. The daemon supervises its own child instead.
pub fn start_background(target: &HaproxyTarget) -> Result<u32, String> {
    if let Some(why) = existing_master(target) {
        return Err(format!("not starting a second HAProxy: {why}"));
    }
    create_socket_dirs(target)?;
    let pidfile = target.state_dir.join("haproxy.pid");
    let out = haproxy_command(&target.haproxy_bin)
        .arg("-W")
        .arg("-D")
        .arg("-S")
        .arg(master_socket_arg(target))
        .arg("-p")
        .arg(&pidfile)
        .arg("-f")
        .arg(&target.config)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", target.haproxy_bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "HAProxy did not start: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let worker = wait_ready(target, target.reload_timeout.as_std()).map_err(|e| {
        // Left running, it would serve files the failed apply rolls back, recorded nowhere.
        let master = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        match master {
            Some(pid) => stopped_after(e, pid),
            None => e,
        }
    })?;
    if let Some(proc) = running(target) {
        record_master(target, proc.master_pid);
    }
    super::marker::started_on_disk(target);
    Ok(worker)
}

/// A start that did not come up within `reload_timeout`: the HAProxy it started (`master`, the
/// leader of its own process group with its workers) is stopped, since the apply that started
/// it is rolled back and nothing would record what it serves. `why` completed with that.
pub fn stopped_after(why: String, master: u32) -> String {
    stop_group(master, Duration::from_secs(1));
    format!(
        "{why}; the HAProxy it started was stopped, so that it does not serve what the failed apply rolls back (a large configuration may need a longer reload_timeout)"
    )
}

/// Stops process group `leader` (a HAProxy master started in its own group, and its workers):
/// SIGTERM, then SIGKILL once `grace` has passed.
fn stop_group(leader: u32, grace: Duration) {
    let Some(process) = Process::of(leader) else {
        return;
    };
    let signal = |signal: i32| {
        for pid in [leader as libc::pid_t, -(leader as libc::pid_t)] {
            // SAFETY: kill(2) on HAProxy's master (checked alive just before) and the process
            // group it leads; no memory is shared.
            unsafe { libc::kill(pid, signal) };
        }
    };
    signal(libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while process.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its workers may outlive the master for a moment.
    signal(libc::SIGKILL);
}

/// Creates the folders the sockets go in (say /run/haproxy on a machine where HAProxy's own
/// service never ran): HAProxy binds a socket but does not create its folder.
pub fn create_socket_dirs(target: &HaproxyTarget) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    for socket in [&target.master_socket, &target.runtime_socket] {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// The `-S` argument: the master socket, readable by its owner only.
pub fn master_socket_arg(target: &HaproxyTarget) -> String {
    format!("{},mode,600", target.master_socket.display())
}

/// Waits until a master answers and the runtime socket answers from one of its workers.
pub fn wait_ready(target: &HaproxyTarget, timeout: Duration) -> Result<u32, String> {
    wait_ready_while(target, timeout, &mut || Ok(()))
}

/// `wait_ready` for a HAProxy started as a child: `exited` says (with HAProxy's reason) when
/// it ended before it answered — a listener that cannot bind, say — rather than waiting out
/// the whole timeout.
pub fn wait_ready_while(
    target: &HaproxyTarget,
    timeout: Duration,
    exited: &mut dyn FnMut() -> Result<(), String>,
) -> Result<u32, String> {
    let deadline = Instant::now() + timeout;
    let master = MasterCli::new(&target.master_socket);
    let runtime = RuntimeApi::new(&target.runtime_socket);
    loop {
        // What was last seen, for the error: which socket did not answer, and how.
        let seen = match master.show_proc(Duration::from_millis(100)) {
            Err(e) => format!("master socket {}: {e}", target.master_socket.display()),
            Ok(proc) => match runtime.worker_pid() {
                Err(e) => format!("runtime socket {}: {e}", target.runtime_socket.display()),
                Ok(pid) if proc.current().any(|w| w.pid == pid) => return Ok(pid),
                Ok(pid) => format!(
                    "the runtime socket answers from worker {pid}, which the master does not list as current ({proc:?})"
                ),
            },
        };
        exited()?;
        if Instant::now() >= deadline {
            return Err(format!(
                "HAProxy did not come up within {}s (last seen: {seen})",
                timeout.as_secs(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the master CLI is unreachable: {0}")]
    Unreachable(String),
    #[error(
        "HAProxy refused the new configuration on reload ([failed: {0}] in `show proc`); the previous workers keep serving"
    )]
    Failed(u32),
    #[error("no new worker answered within {0:?}")]
    Timeout(Duration),
}

/// Reloads through the master CLI and waits for the new worker. Returns its PID.
pub fn reload(target: &HaproxyTarget) -> Result<u32, ReloadError> {
    let master = MasterCli::new(&target.master_socket);
    let runtime = RuntimeApi::new(&target.runtime_socket);
    let timeout = target.reload_timeout.as_std();
    let before = master
        .show_proc(Duration::from_secs(2))
        .map_err(|e| ReloadError::Unreachable(e.to_string()))?;
    let old: BTreeSet<u32> = before.workers.iter().map(|w| w.pid).collect();
    master
        .reload()
        .map_err(|e| ReloadError::Unreachable(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        // The master re-executes itself: its socket refuses connections for a moment.
        let Ok(now) = master.show_proc(Duration::from_millis(500)) else {
            continue;
        };
        if now.failed > before.failed {
            return Err(ReloadError::Failed(now.failed));
        }
        let Some(new) = now.current().find(|w| !old.contains(&w.pid)) else {
            continue;
        };
        if runtime.worker_pid().ok() == Some(new.pid) {
            return Ok(new.pid);
        }
    }
    Err(ReloadError::Timeout(timeout))
}
