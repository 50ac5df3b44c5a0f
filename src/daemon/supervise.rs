//! `spawn: true`: the daemon runs HAProxy as its child in master-worker mode (I/O edge),
//! starts it on the files on disk (the last applied state), restarts it when it dies, and stops
//! it gracefully on exit.

use crate::model::HaproxyTarget;
use crate::target::haproxy::process;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Supervisor {
    target: HaproxyTarget,
    child: Mutex<Option<Child>>,
    stopping: AtomicBool,
    pub restarts: AtomicU64,
}

impl Supervisor {
    pub fn new(target: HaproxyTarget) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            target,
            child: Mutex::new(None),
            stopping: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
        })
    }

    /// Starts HAProxy on the configuration on disk unless a master already answers; waits
    /// until it serves. Returns the worker PID.
    pub fn start(&self, target: &HaproxyTarget) -> Result<u32, String> {
        // Holding the lock from the check to the spawn: `stop` cannot slip in between.
        let mut child_slot = self.child.lock().expect("child lock");
        if self.stopping.load(Ordering::SeqCst) {
            return Err("the daemon is stopping".into());
        }
        if let Some(proc) = process::running(target)
            && let Some(worker) = proc.current().next()
        {
            return Ok(worker.pid);
        }
        // Our HAProxy is alive but not answering yet (a large configuration takes a while to
        // load): wait for it. A second master would be one this daemon no longer tracks.
        if child_slot
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        {
            drop(child_slot);
            return process::wait_ready(target, target.reload_timeout.as_std());
        }
        if !target.config.exists() {
            return Err(format!(
                "no configuration at {} yet",
                target.config.display()
            ));
        }
        process::check_config(&target.haproxy_bin, &target.config)?;
        let log_path = target.state_dir.join("haproxy.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        // Its own process group: a Ctrl-C or a signal to the daemon's group does not reach
        // HAProxy directly; the daemon stops it gracefully on its way out.
        let child = Command::new(&target.haproxy_bin)
            .process_group(0)
            .arg("-W")
            .arg("-S")
            .arg(process::master_socket_arg(target))
            .arg("-f")
            .arg(&target.config)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", target.haproxy_bin.display()))?;
        tracing::info!(pid = child.id(), "started HAProxy");
        *child_slot = Some(child);
        drop(child_slot);
        process::wait_ready(target, target.reload_timeout.as_std())
    }

    /// Watches HAProxy until `stop`: restarts it (with a growing pause) when it dies.
    pub fn watch(self: Arc<Self>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut pause = Duration::from_millis(500);
            while !self.stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(250));
                if self.stopping.load(Ordering::SeqCst) {
                    break;
                }
                // Our child alive is enough (it may still be loading its configuration);
                // otherwise any master answering on the socket (one started before us).
                let alive = self
                    .child
                    .lock()
                    .expect("child lock")
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                if alive || process::running(&self.target).is_some() {
                    pause = Duration::from_millis(500);
                    continue;
                }
                if !self.target.config.exists() {
                    continue;
                }
                tracing::warn!("HAProxy is not running: restarting it");
                match self.start(&self.target) {
                    Ok(pid) => {
                        self.restarts.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(worker = pid, "HAProxy restarted");
                    }
                    Err(e) => {
                        tracing::error!("HAProxy restart failed: {e}");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
    }

    /// No restart from now on: the daemon is on its way out.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Stops the child gracefully (soft stop: workers finish their connections), then firmly.
    pub fn stop(&self, grace: Duration) {
        self.begin_stop();
        let mut guard = self.child.lock().expect("child lock");
        let Some(child) = guard.as_mut() else { return };
        signal(child.id(), libc::SIGUSR1);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                *guard = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(child.id(), libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(500));
        let _ = child.kill();
        let _ = child.wait();
        *guard = None;
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a PID we spawned; no memory is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}
