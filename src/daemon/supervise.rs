//! `spawn: true`: the daemon runs HAProxy as its child in master-worker mode (I/O edge),
//! starts it on the files on disk (the last applied state), restarts it when it dies, and stops
//! it gracefully on exit — also a master it adopted from a daemon that died before it.
//!
//! A master is judged alive by its process (PID and start time, recorded in the state folder),
//! never by whether it answers in time: a master that is stopped or slow still serves, and a
//! second master beside it would serve too, with another configuration.

use crate::model::HaproxyTarget;
use crate::target::haproxy::{marker, process};
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Supervisor {
    target: HaproxyTarget,
    child: Mutex<Option<Child>>,
    stopping: AtomicBool,
    /// Restarts made (the daemon's metric reads the same counter).
    restarts: Arc<AtomicU64>,
    /// Whether HAProxy is to be kept running: a master of this target answered while this
    /// daemon watched, or one it started was killed from outside before it answered. Until
    /// then the reconciles start HAProxy, and a missing master is no restart (a start that
    /// never served and was stopped for it, say).
    keep_up: AtomicBool,
}

impl Supervisor {
    pub fn new(target: HaproxyTarget, restarts: Arc<AtomicU64>) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            target,
            child: Mutex::new(None),
            stopping: AtomicBool::new(false),
            restarts,
            keep_up: AtomicBool::new(false),
        })
    }

    /// Whether our child is alive (it may still be loading its configuration).
    fn child_alive(&self) -> bool {
        self.child
            .lock()
            .expect("child lock")
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Whether a master of this target exists, answering or not.
    fn master_exists(&self) -> bool {
        self.child_alive()
            || process::running(&self.target).is_some()
            || process::existing_master(&self.target).is_some()
    }

    /// Starts HAProxy on the configuration on disk unless a master already exists; waits
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
            // Adopted (or ours): recorded, so that it is stopped with the daemon.
            process::record_master(target, proc.master_pid);
            self.keep_up.store(true, Ordering::SeqCst);
            return Ok(worker.pid);
        }
        // Our HAProxy, or one started before us, exists but does not answer (yet): a large
        // configuration takes a while to load, a stopped or overloaded master answers late.
        // Wait for it; never start a second one beside it.
        let ours = child_slot
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if ours || process::existing_master(target).is_some() {
            drop(child_slot);
            return process::wait_ready(target, target.reload_timeout.as_std()).map_err(|e| {
                match process::existing_master(target) {
                    Some(why) => format!("{why}; not starting a second one ({e})"),
                    None => e,
                }
            });
        }
        if !target.config.exists() {
            return Err(format!(
                "no configuration at {} yet",
                target.config.display()
            ));
        }
        process::check_config(&target.haproxy_bin, &target.config)?;
        process::create_socket_dirs(target)?;
        let log_path = target.state_dir.join("haproxy.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        // What this HAProxy writes starts here: its reason, should it exit at once.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        // Its own process group: a Ctrl-C or a signal to the daemon's group does not reach
        // HAProxy directly; the daemon stops it gracefully on its way out.
        let child = process::haproxy_command(&target.haproxy_bin)
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
        process::record_master(target, child.id());
        *child_slot = Some(child);
        drop(child_slot);
        let worker = process::wait_ready_while(target, target.reload_timeout.as_std(), &mut || {
            let status = match self.child.lock().expect("child lock").as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            match status {
                // Only its own failure to start ends the wait.
                Some(status) if status.code().is_some_and(|code| code != 0) => Err(format!(
                    "HAProxy exited before it served ({status}): {}",
                    log_since(&log_path, log_start)
                )),
                // Killed or stopped from outside (it may have served already: a client saw
                // it answer before this wait did), it is restarted like any HAProxy that
                // dies, and the wait goes on for the restarted one.
                Some(_) => {
                    self.keep_up.store(true, Ordering::SeqCst);
                    Ok(())
                }
                None => Ok(()),
            }
        })
        .map_err(|e| self.stop_unready_child(e))?;
        self.keep_up.store(true, Ordering::SeqCst);
        // It read the files on disk: it runs them (an interrupted apply is finished by this).
        marker::started_on_disk(target);
        Ok(worker)
    }

    /// The child just started did not serve within `reload_timeout`: stopped (the apply that
    /// started it rolls back), unless it already exited, whose reason `why` holds.
    fn stop_unready_child(&self, why: String) -> String {
        let mut child_slot = self.child.lock().expect("child lock");
        let Some(child) = child_slot.as_mut() else {
            return why;
        };
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => return format!("{why}; the HAProxy it started exited ({status})"),
            Err(_) => return why,
        }
        let why = process::stopped_after(why, child.id());
        let _ = child.wait();
        *child_slot = None;
        process::forget_master(&self.target);
        tracing::warn!("{why}");
        why
    }

    /// Watches HAProxy until `stop`: restarts it (with a growing pause) when its master is gone.
    pub fn watch(self: Arc<Self>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut pause = Duration::from_millis(500);
            let mut silent = false;
            while !self.stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(250));
                if self.stopping.load(Ordering::SeqCst) {
                    break;
                }
                if self.master_exists() {
                    let answers = process::running(&self.target).is_some();
                    if answers {
                        self.keep_up.store(true, Ordering::SeqCst);
                    }
                    if !answers && !silent {
                        tracing::warn!(
                            "HAProxy's master does not answer; it still exists, so no other is started"
                        );
                    } else if answers && silent {
                        tracing::info!("HAProxy's master answers again");
                    }
                    silent = !answers;
                    pause = Duration::from_millis(500);
                    continue;
                }
                // Before HAProxy ran, starting it is the first reconcile's job: the files may be
                // half way through being written, and it would be no restart.
                if !self.target.config.exists() || !self.keep_up.load(Ordering::SeqCst) {
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

    /// Stops HAProxy gracefully (soft stop: workers finish their connections), then firmly:
    /// our child, or the master this daemon adopted.
    pub fn stop(&self, grace: Duration) {
        self.begin_stop();
        let mut guard = self.child.lock().expect("child lock");
        if let Some(child) = guard.as_mut() {
            signal(child.id(), libc::SIGUSR1);
            let deadline = Instant::now() + grace;
            let mut exited = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !exited {
                signal(child.id(), libc::SIGTERM);
                std::thread::sleep(Duration::from_millis(500));
                let _ = child.kill();
                let _ = child.wait();
            }
            *guard = None;
        } else if let Some(master) = process::recorded_master(&self.target) {
            // Not our child: a master an earlier daemon started, adopted at our start.
            tracing::info!(pid = master.pid, "stopping the HAProxy this daemon adopted");
            signal(master.pid, libc::SIGUSR1);
            if !wait_gone(&master, grace) {
                signal(master.pid, libc::SIGTERM);
                if !wait_gone(&master, Duration::from_millis(500)) {
                    signal(master.pid, libc::SIGKILL);
                    wait_gone(&master, Duration::from_secs(2));
                }
            }
        }
        process::forget_master(&self.target);
    }
}

/// Waits until a process that is not our child is gone.
fn wait_gone(process: &process::Process, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process.alive() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with the PID of HAProxy's master (ours, or recorded with its start time
    // and checked alive just before); no memory is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// What HAProxy wrote to its log from `offset` on: its reason for exiting (the last lines,
/// at most 2 KB).
fn log_since(path: &std::path::Path, offset: u64) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(b.get(offset as usize..).unwrap_or_default()).into_owned())
        .unwrap_or_default();
    let text = text.trim();
    let start = text.len().saturating_sub(2048);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    match &text[start..] {
        "" => "nothing in its log".to_string(),
        reason => reason.replace('\n', " | "),
    }
}
