//! The daemon's counters, exposed on `GET /metrics` in Prometheus' text format, with
//! `lunafront_build_info` and the standard `process_*` metrics of the daemon's own process.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the apply duration histogram.
const BUCKETS: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub struct Metrics {
    pub reconciles: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub reloads: AtomicU64,
    pub runtime_updates: AtomicU64,
    pub runtime_commands: AtomicU64,
    pub drift_corrections: AtomicU64,
    /// Whole loads of the state folder by the reconcile (`lunafront_state_loads_total`).
    pub state_loads: AtomicU64,
    /// HAProxy restarts by the supervisor (shared with it: counted when they happen, not at
    /// the next reconcile).
    pub haproxy_restarts: std::sync::Arc<AtomicU64>,
    /// Seconds since the epoch of the last successful reconcile (0: none yet).
    pub last_success: Mutex<f64>,
    apply_durations: Mutex<(Vec<u64>, f64, u64)>,
    pub state_valid: AtomicU64,
    pub domains: AtomicU64,
    /// Polls of the state folder (shared with the watcher).
    pub watch_polls: std::sync::Arc<AtomicU64>,
    /// 1 while a change is held by `global.delete_guard`.
    pub change_held: AtomicU64,
    /// The git remote's counters (`--git`).
    pub git: std::sync::OnceLock<std::sync::Arc<crate::git::sync::GitMetrics>>,
}

impl Metrics {
    pub fn count_reconcile(&self, result: &'static str) {
        *self
            .reconciles
            .lock()
            .expect("metrics")
            .entry(result)
            .or_insert(0) += 1;
    }

    pub fn observe_apply(&self, seconds: f64) {
        let mut h = self.apply_durations.lock().expect("metrics");
        if h.0.is_empty() {
            h.0 = vec![0; BUCKETS.len()];
        }
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.0[i] += 1;
            }
        }
        h.1 += seconds;
        h.2 += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP lunafront_reconciles_total Reconciles by result.\n# TYPE lunafront_reconciles_total counter"
        );
        let reconciles = self.reconciles.lock().expect("metrics").clone();
        for result in [
            "applied",
            "unchanged",
            "invalid",
            "partial",
            "failed",
            "rolled_back",
            "held",
        ] {
            let _ = writeln!(
                out,
                "lunafront_reconciles_total{{result=\"{result}\"}} {}",
                reconciles.get(result).copied().unwrap_or(0)
            );
        }
        counter(
            &mut out,
            "lunafront_reloads_total",
            "HAProxy reloads done by applies.",
            self.reloads.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lunafront_state_loads_total",
            "Loads (read, parse, merge) of the whole state folder by the reconcile. The change an API call made and checked, and a file event for files already applied, need none.",
            self.state_loads.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lunafront_runtime_updates_total",
            "Applies done through the runtime API, without a reload.",
            self.runtime_updates.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lunafront_runtime_commands_total",
            "Runtime API commands sent by applies.",
            self.runtime_commands.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lunafront_drift_corrections_total",
            "Times HAProxy's files or runtime state differed from the last apply and were put back.",
            self.drift_corrections.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lunafront_haproxy_restarts_total",
            "Times the supervised HAProxy died and was restarted.",
            self.haproxy_restarts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lunafront_watch_polls_total",
            "Times the state folder was polled for changes file notifications missed.",
            self.watch_polls.load(Ordering::Relaxed),
        );
        let h = self.apply_durations.lock().expect("metrics").clone();
        let _ = writeln!(
            out,
            "# HELP lunafront_apply_duration_seconds Time to apply a change, from plan to verified.\n# TYPE lunafront_apply_duration_seconds histogram"
        );
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "lunafront_apply_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                h.0.get(i).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "lunafront_apply_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            h.2
        );
        let _ = writeln!(out, "lunafront_apply_duration_seconds_sum {}", h.1);
        let _ = writeln!(out, "lunafront_apply_duration_seconds_count {}", h.2);
        let _ = writeln!(
            out,
            "# HELP lunafront_last_success_timestamp_seconds Time of the last successful reconcile.\n# TYPE lunafront_last_success_timestamp_seconds gauge\nlunafront_last_success_timestamp_seconds {}",
            *self.last_success.lock().expect("metrics")
        );
        let _ = writeln!(
            out,
            "# HELP lunafront_state_valid Whether the desired state validated at the last reconcile.\n# TYPE lunafront_state_valid gauge\nlunafront_state_valid {}",
            self.state_valid.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lunafront_domains Domains in the applied state.\n# TYPE lunafront_domains gauge\nlunafront_domains {}",
            self.domains.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lunafront_change_held Whether a change is held because it removes many domains or backends at once (global.delete_guard): see /status.\n# TYPE lunafront_change_held gauge\nlunafront_change_held {}",
            self.change_held.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lunafront_build_info The running lunafront's version and git commit.\n# TYPE lunafront_build_info gauge\nlunafront_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::VERSION,
            crate::GIT_COMMIT
        );
        if let Some(git) = self.git.get() {
            git.render(&mut out);
        }
        process_metrics(&mut out);
        out
    }
}

/// The process collector's usual metrics (the names Prometheus client libraries use), read
/// from /proc/self. A value that cannot be read is left out rather than reported as 0.
fn process_metrics(out: &mut String) {
    let Ok(me) = procfs::process::Process::myself() else {
        return;
    };
    let mut gauge = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    if let Ok(stat) = me.stat() {
        let ticks = procfs::ticks_per_second() as f64;
        gauge(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (stat.utime + stat.stime) as f64 / ticks,
        );
        gauge(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (stat.rss * procfs::page_size()) as f64,
        );
        gauge(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            stat.vsize as f64,
        );
        if let Ok(boot) = procfs::boot_time_secs() {
            gauge(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot as f64 + stat.starttime as f64 / ticks,
            );
        }
    }
    if let Ok(fds) = me.fd_count() {
        gauge(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds as f64,
        );
    }
    if let Ok(limits) = me.limits()
        && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
    {
        gauge(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.count_reconcile("applied");
        m.observe_apply(0.03);
        m.reloads.fetch_add(2, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("lunafront_reconciles_total{result=\"applied\"} 1"));
        assert!(text.contains("lunafront_reloads_total 2"));
        assert!(text.contains("lunafront_apply_duration_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("lunafront_apply_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("lunafront_apply_duration_seconds_count 1"));
        assert!(text.contains(&format!(
            "lunafront_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::VERSION,
            crate::GIT_COMMIT
        )));
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("process_resident_memory_bytes");
        assert!(
            rss > 1_000_000.0,
            "a running test process uses over 1 MB: {rss}"
        );
    }
}
