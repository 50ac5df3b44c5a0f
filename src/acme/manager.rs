//! Issuance and renewal in the daemon: a thread of its own, apart from the reconcile loop.
//! Each domain that wants a certificate gets its own task (a few at a time), so a slow or
//! failing domain never holds up another, nor a reconcile. A certificate obtained is written
//! to the store and the reconcile loop is asked to install it: the plan sees a new or renewed
//! certificate and the apply installs it through the runtime API (`new/set/commit ssl cert`,
//! `add ssl crt-list`), writing it beside haproxy.cfg so a reload keeps it. Failures back off
//! per domain (5 minutes doubling to a day, an hour at least when the CA says rate limited),
//! remembered across restarts; the state of each domain is on `/status` and `/metrics`.

use super::challenge::Challenges;
use super::store::{DomainStatus, Store};
use super::{Wanted, issue};
use crate::model::{Acme, Model};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The first wait after a failure; it doubles with each further failure.
const BACKOFF_FIRST: i64 = 5 * 60;
/// The longest wait between two attempts.
const BACKOFF_MAX: i64 = 24 * 3600;
/// The least wait after the CA said `rateLimited`.
const BACKOFF_RATE_LIMITED: i64 = 3600;
/// Orders in flight at once: a burst of new domains is spread out (CAs limit new orders).
const CONCURRENT_ORDERS: usize = 4;
/// How long one issuance may take in all.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the reconcile loop and the HTTP endpoints share with the manager.
pub struct Shared {
    store: Store,
    pub challenges: Arc<Challenges>,
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    /// Asks the reconcile loop to install what the store now holds.
    install: Box<dyn Fn() + Send + Sync>,
}

#[derive(Default)]
struct Inner {
    settings: Option<Acme>,
    wanted: BTreeMap<String, Wanted>,
    status: BTreeMap<String, DomainStatus>,
    in_flight: BTreeSet<String>,
    stopping: bool,
    /// Set by the first successful reconcile: HAProxy runs a configuration with the
    /// challenge map, so issuance may start.
    ready: bool,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// When a certificate valid from `not_before` to `not_after` is renewed: `renew_before` its
/// end, but never before a third of its life (a window longer than the lifetime must not
/// renew in a loop).
pub fn renewal_time(not_before: i64, not_after: i64, renew_before: Duration) -> i64 {
    let lifetime = (not_after - not_before).max(0);
    (not_after - renew_before.as_secs() as i64).max(not_before + lifetime / 3)
}

/// The wait after `failures` failures in a row.
pub fn backoff(failures: u32, rate_limited: bool) -> i64 {
    let wait = BACKOFF_FIRST.saturating_mul(1i64 << failures.saturating_sub(1).min(20));
    let wait = wait.min(BACKOFF_MAX);
    if rate_limited {
        wait.max(BACKOFF_RATE_LIMITED)
    } else {
        wait
    }
}

impl Shared {
    /// The manager of the target whose state folder is given. `install` asks for a
    /// reconcile; `apply` asks for one and waits for its outcome (a challenge answer must be
    /// served before the CA is told to look).
    pub fn new(
        state_dir: &std::path::Path,
        install: Box<dyn Fn() + Send + Sync>,
        apply: super::challenge::ApplyStore,
    ) -> Arc<Shared> {
        let store = Store::new(state_dir);
        let status = store.status().unwrap_or_else(|e| {
            tracing::warn!("{e}; starting from what the certificates say");
            BTreeMap::new()
        });
        Arc::new(Shared {
            store,
            challenges: Arc::new(Challenges::new(Store::new(state_dir), apply)),
            inner: Mutex::new(Inner {
                status,
                ..Inner::default()
            }),
            wake: tokio::sync::Notify::new(),
            install,
        })
    }

    /// Called after each reconcile that applied a valid state: the domains that want a
    /// certificate now.
    pub fn wanted(&self, model: &Model) {
        let wanted = super::wanted(model);
        let mut inner = self.inner.lock().expect("acme");
        let changed = !inner.ready || inner.wanted != wanted || inner.settings != model.acme;
        inner.ready = true;
        inner.settings = model.acme.clone();
        inner.wanted = wanted;
        drop(inner);
        if changed {
            self.wake.notify_one();
        }
    }

    pub fn stop(&self) {
        self.inner.lock().expect("acme").stopping = true;
        self.wake.notify_one();
    }

    /// Each wanted domain's certificate: expiry, last error, next attempt (for `/status`).
    pub fn status_json(&self) -> serde_json::Value {
        let inner = self.inner.lock().expect("acme");
        let domains: serde_json::Map<String, serde_json::Value> = inner
            .wanted
            .keys()
            .map(|domain| {
                let s = inner.status.get(domain).cloned().unwrap_or_default();
                let state = if inner.in_flight.contains(domain) {
                    "requesting"
                } else if s.not_after.is_some_and(|t| t > now()) {
                    if s.failures > 0 {
                        "valid, renewal failing"
                    } else {
                        "valid"
                    }
                } else if s.failures > 0 {
                    "failing"
                } else {
                    "pending"
                };
                let time = |t: Option<i64>| t.map(crate::clock::rfc3339);
                (
                    domain.clone(),
                    serde_json::json!({
                        "state": state,
                        "not_after": time(s.not_after),
                        "issued_at": time(s.issued_at),
                        "failures": s.failures,
                        "last_error": s.last_error,
                        "last_error_kind": s.last_error_kind,
                        "last_attempt": time(s.last_attempt),
                        "next_attempt": time(s.next_attempt),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "directory": inner.settings.as_ref().map(|a| a.directory.clone()),
            "certificates": domains,
        })
    }

    /// Prometheus lines: each wanted domain's expiry, failures in a row and last error kind.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let inner = self.inner.lock().expect("acme");
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP lunafront_acme_certificate_expiry_timestamp_seconds When each ACME certificate ends (0: none yet).\n# TYPE lunafront_acme_certificate_expiry_timestamp_seconds gauge"
        );
        for domain in inner.wanted.keys() {
            let s = inner.status.get(domain);
            let _ = writeln!(
                out,
                "lunafront_acme_certificate_expiry_timestamp_seconds{{domain=\"{domain}\"}} {}",
                s.and_then(|s| s.not_after).unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lunafront_acme_certificate_failures Failed attempts in a row for each ACME certificate; the last error's kind is a label.\n# TYPE lunafront_acme_certificate_failures gauge"
        );
        for domain in inner.wanted.keys() {
            let s = inner.status.get(domain).cloned().unwrap_or_default();
            let _ = writeln!(
                out,
                "lunafront_acme_certificate_failures{{domain=\"{domain}\",last_error=\"{}\"}} {}",
                s.last_error_kind
                    .filter(|_| s.failures > 0)
                    .unwrap_or_default()
                    .replace(
                        |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                        "_"
                    ),
                s.failures
            );
        }
        out
    }

    fn save_status(&self, inner: &Inner) {
        if let Err(e) = self.store.save_status(&inner.status) {
            tracing::warn!("{e}");
        }
    }

    /// Domains to start now, and when to look again.
    fn due(&self, inner: &mut Inner) -> (Vec<String>, Option<i64>) {
        let now = now();
        let Some(settings) = inner.settings.clone() else {
            return (Vec::new(), None);
        };
        let mut start = Vec::new();
        let mut next: Option<i64> = None;
        let wanted: Vec<String> = inner.wanted.keys().cloned().collect();
        for domain in wanted {
            if inner.in_flight.contains(&domain) {
                continue;
            }
            let status = inner.status.entry(domain.clone()).or_default();
            // What the certificate held says, when the status lost it (a first start).
            if status.not_after.is_none()
                && let Ok(Some(pem)) = self.store.cert(&domain)
                && let Some((nb, na)) = super::pem_validity(&pem)
            {
                status.not_before = Some(nb);
                status.not_after = Some(na);
                status.directory.get_or_insert(settings.directory.clone());
            }
            let renew_at = match (status.not_before, status.not_after) {
                (Some(nb), Some(na))
                    if status.directory.as_deref() == Some(&settings.directory) =>
                {
                    renewal_time(nb, na, settings.renew_before.as_std())
                }
                _ => now,
            };
            let at = match status.next_attempt {
                Some(t) if status.failures > 0 => t,
                _ => renew_at,
            };
            if at <= now && inner.in_flight.len() + start.len() < CONCURRENT_ORDERS {
                start.push(domain);
            } else {
                let at = at.max(now + 1);
                next = Some(next.map_or(at, |n: i64| n.min(at)));
            }
        }
        (start, next)
    }

    fn finish(&self, domain: &str, directory: &str, result: Result<String, issue::IssueError>) {
        let mut inner = self.inner.lock().expect("acme");
        inner.in_flight.remove(domain);
        let now = now();
        let status = inner.status.entry(domain.to_string()).or_default();
        status.last_attempt = Some(now);
        let installed = match result {
            Ok(pem) => match self.store.save_cert(domain, pem.as_bytes()) {
                Ok(()) => {
                    let validity = super::pem_validity(pem.as_bytes());
                    status.not_before = validity.map(|v| v.0);
                    status.not_after = validity.map(|v| v.1);
                    status.issued_at = Some(now);
                    status.directory = Some(directory.to_string());
                    status.failures = 0;
                    status.last_error = None;
                    status.last_error_kind = None;
                    status.next_attempt = None;
                    tracing::info!(domain, "ACME certificate obtained");
                    true
                }
                Err(e) => {
                    fail(status, now, &issue::IssueError::Store(e));
                    false
                }
            },
            Err(e) => {
                fail(status, now, &e);
                tracing::warn!(domain, failures = status.failures, "ACME: {e}");
                false
            }
        };
        self.save_status(&inner);
        drop(inner);
        if installed {
            (self.install)();
        }
        self.wake.notify_one();
    }
}

fn fail(status: &mut DomainStatus, now: i64, e: &issue::IssueError) {
    status.failures = status.failures.saturating_add(1);
    status.last_error = Some(e.to_string());
    status.last_error_kind = Some(e.kind());
    status.next_attempt = Some(now + backoff(status.failures, e.rate_limited()));
}

/// Runs the manager on a thread of its own until `stop`.
pub fn spawn(shared: Arc<Shared>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("acme".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for ACME");
            runtime.block_on(run(shared));
        })
        .expect("the ACME thread")
}

async fn run(shared: Arc<Shared>) {
    let mut tasks = tokio::task::JoinSet::new();
    // One account per directory, made when the first domain needs it.
    let mut account: Option<(String, instant_acme::Account)> = None;
    loop {
        let (start, next, settings) = {
            let mut inner = shared.inner.lock().expect("acme");
            if inner.stopping {
                break;
            }
            if !inner.ready {
                (Vec::new(), None, None)
            } else {
                let (start, next) = shared.due(&mut inner);
                for d in &start {
                    inner.in_flight.insert(d.clone());
                }
                (start, next, inner.settings.clone())
            }
        };
        if let (Some(settings), false) = (&settings, start.is_empty()) {
            let ready = match &account {
                Some((directory, a)) if *directory == settings.directory => Ok(a.clone()),
                _ => issue::account(settings, &shared.store).await,
            };
            match ready {
                Ok(a) => {
                    account = Some((settings.directory.clone(), a.clone()));
                    for domain in start {
                        let (shared, a, settings) = (shared.clone(), a.clone(), settings.clone());
                        tasks.spawn(async move {
                            let result = match tokio::time::timeout(
                                ISSUE_TIMEOUT,
                                issue::obtain(&a, &settings, &domain, shared.challenges.clone()),
                            )
                            .await
                            {
                                Ok(r) => r,
                                Err(_) => Err(issue::IssueError::Transport(format!(
                                    "no certificate within {}s",
                                    ISSUE_TIMEOUT.as_secs()
                                ))),
                            };
                            shared.finish(&domain, &settings.directory, result);
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!("ACME account: {e}");
                    for domain in start {
                        shared.finish(
                            &domain,
                            &settings.directory,
                            Err(issue::IssueError::Internal(format!(
                                "the ACME account: {e}"
                            ))),
                        );
                    }
                }
            }
            continue;
        }
        let wait = next
            .map(|t| Duration::from_secs((t - now()).clamp(1, 3600) as u64))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_waits_for_the_window_but_at_least_a_third_of_the_lifetime() {
        let day = 86_400;
        // 90 days, renew 30 days before: at day 60.
        assert_eq!(
            renewal_time(0, 90 * day, Duration::from_secs(30 * day as u64)),
            60 * day
        );
        // A window longer than the lifetime: at a third, never at once.
        assert_eq!(renewal_time(0, 60, Duration::from_secs(3600)), 20);
    }

    #[test]
    fn failures_back_off_doubling_to_a_day() {
        assert_eq!(backoff(1, false), 300);
        assert_eq!(backoff(2, false), 600);
        assert_eq!(backoff(3, false), 1200);
        assert_eq!(backoff(30, false), 86_400);
        assert_eq!(backoff(1, true), 3600);
    }
}
