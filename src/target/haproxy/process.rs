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

/// Runs `haproxy -c` on a configuration, from `/` so relative paths must resolve through
/// `default-path config`. `Err` holds HAProxy's own explanation.
pub fn check_config(haproxy: &Path, config: &Path) -> Result<(), String> {
    let out = Command::new(haproxy)
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

/// Starts HAProxy in master-worker mode, in the background (`-D`), for a `spawn: true` target
/// applied from the command line. The daemon supervises its own child instead.
pub fn start_background(target: &HaproxyTarget) -> Result<u32, String> {
    let pidfile = target.state_dir.join("haproxy.pid");
    let out = Command::new(&target.haproxy_bin)
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
    wait_ready(target, target.reload_timeout.as_std())
}

/// The `-S` argument: the master socket, readable by its owner only.
pub fn master_socket_arg(target: &HaproxyTarget) -> String {
    format!("{},mode,600", target.master_socket.display())
}

/// Waits until a master answers and the runtime socket answers from one of its workers.
pub fn wait_ready(target: &HaproxyTarget, timeout: Duration) -> Result<u32, String> {
    let deadline = Instant::now() + timeout;
    let master = MasterCli::new(&target.master_socket);
    let runtime = RuntimeApi::new(&target.runtime_socket);
    loop {
        if let Ok(proc) = master.show_proc(Duration::from_millis(100))
            && let Ok(pid) = runtime.worker_pid()
            && proc.current().any(|w| w.pid == pid)
        {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "HAProxy did not come up within {}s (master socket {}, runtime socket {})",
                timeout.as_secs(),
                target.master_socket.display(),
                target.runtime_socket.display()
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
