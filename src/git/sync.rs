//! Following the remote (a thread of the daemon): fetch on the interval, or at once when asked
//! (`POST /hooks/git`, `POST /reconcile`); gate the fetched commit — it must descend from the
//! commit checked out (a rewritten branch is refused unless `--allow-rewrite`), carry a good
//! signature with `--require-signed`, and validate — then move the clone to it and ask the
//! reconcile loop to apply it like a file change. A commit refused, or a remote that cannot be
//! reached, leaves the clone at the last good commit, which HAProxy keeps serving; `/status`
//! and `/metrics` say which commit is applied, which was fetched, and how far behind the node is.

use super::{GitError, Repo, short};
use crate::daemon::reconcile::{Request, Status, Trigger, isolation_enabled, request_blocking};
use crate::spec::diagnostics::Diagnostic;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `/status` says about the repository (`"git"`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GitStatus {
    /// The remote, with any password hidden.
    pub url: String,
    pub branch: String,
    /// The commit HAProxy runs (the one the applied state was read at).
    pub applied_commit: Option<String>,
    /// The commit the clone holds (the last one that passed the gate).
    pub checked_out: Option<String>,
    /// The commit the remote's branch was at, at the last fetch that succeeded.
    pub fetched_commit: Option<String>,
    /// Commits of `fetched_commit` that `applied_commit` lacks.
    pub behind: Option<u64>,
    /// Whether the last fetch reached the remote.
    pub remote_reachable: Option<bool>,
    /// RFC 3339: the last fetch, and the last one that succeeded.
    pub last_fetch: Option<String>,
    pub last_successful_fetch: Option<String>,
    /// Why the last fetch failed (redacted), while it does.
    pub fetch_error: Option<String>,
    /// The fetched commit this node refuses, while the remote's branch is at it.
    pub refused: Option<Refused>,
    pub allow_rewrite: bool,
    pub require_signed: bool,
}

/// Why a fetched commit is not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    /// The branch was rewritten (force-pushed): the commit does not descend from ours.
    Rewrite,
    /// `--require-signed`: not signed by an allowed key.
    Unsigned,
    /// The state at that commit does not validate.
    Invalid,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rewrite => "rewrite",
            Refusal::Unsigned => "unsigned",
            Refusal::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    pub commit: String,
    pub reason: Refusal,
    pub message: String,
    /// With `invalid`: every problem, at its file (relative to the repository), line and column.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
    pub since: String,
}

/// The repository's counters for `/metrics`.
#[derive(Default)]
pub struct GitMetrics {
    pub fetches_ok: AtomicU64,
    pub fetches_failed: AtomicU64,
    pub refused: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub remote_up: AtomicU64,
    pub behind: AtomicU64,
    /// Seconds since the epoch of the last fetch that succeeded (0: none yet).
    pub last_success: Mutex<f64>,
    pub commits: Mutex<(String, String)>,
    pub pushes_ok: AtomicU64,
    pub pushes_rejected: AtomicU64,
}

impl GitMetrics {
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP lunafront_git_fetches_total Fetches of the state's git remote, by result.\n# TYPE lunafront_git_fetches_total counter\nlunafront_git_fetches_total{{result=\"ok\"}} {}\nlunafront_git_fetches_total{{result=\"failed\"}} {}",
            self.fetches_ok.load(Ordering::Relaxed),
            self.fetches_failed.load(Ordering::Relaxed)
        );
        let refused = self.refused.lock().expect("metrics").clone();
        let _ = writeln!(
            out,
            "# HELP lunafront_git_refused_commits_total Fetched commits refused, by reason (rewrite, unsigned, invalid).\n# TYPE lunafront_git_refused_commits_total counter"
        );
        for reason in [Refusal::Rewrite, Refusal::Unsigned, Refusal::Invalid] {
            let _ = writeln!(
                out,
                "lunafront_git_refused_commits_total{{reason=\"{}\"}} {}",
                reason.label(),
                refused.get(reason.label()).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lunafront_git_pushes_total Pushes of API changes, by result (rejected: another node pushed first, retried).\n# TYPE lunafront_git_pushes_total counter\nlunafront_git_pushes_total{{result=\"ok\"}} {}\nlunafront_git_pushes_total{{result=\"rejected\"}} {}",
            self.pushes_ok.load(Ordering::Relaxed),
            self.pushes_rejected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lunafront_git_remote_up Whether the last fetch reached the git remote.\n# TYPE lunafront_git_remote_up gauge\nlunafront_git_remote_up {}",
            self.remote_up.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lunafront_git_behind_commits Commits of the fetched branch that the applied commit lacks.\n# TYPE lunafront_git_behind_commits gauge\nlunafront_git_behind_commits {}",
            self.behind.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lunafront_git_last_fetch_success_timestamp_seconds Time of the last fetch that reached the remote.\n# TYPE lunafront_git_last_fetch_success_timestamp_seconds gauge\nlunafront_git_last_fetch_success_timestamp_seconds {}",
            *self.last_success.lock().expect("metrics")
        );
        let (applied, fetched) = self.commits.lock().expect("metrics").clone();
        let _ = writeln!(
            out,
            "# HELP lunafront_git_commit_info The commit applied and the commit fetched.\n# TYPE lunafront_git_commit_info gauge\nlunafront_git_commit_info{{applied=\"{applied}\",fetched=\"{fetched}\"}} 1"
        );
    }
}

/// Asks the syncing thread for a fetch now; `reply` is told once it is done (and the commit it
/// brought, if any, was reconciled).
pub struct FetchRequest {
    pub reply: Option<tokio::sync::oneshot::Sender<()>>,
}

pub struct Syncer {
    pub repo: Arc<Repo>,
    pub status: Arc<Mutex<Status>>,
    /// The reconcile loop (taken away when the daemon stops: a fetch under way then asks for
    /// nothing more).
    pub reconcile: Arc<Mutex<Option<Sender<Request>>>>,
    pub metrics: Arc<GitMetrics>,
    /// The fetched commit refused last (not gated again while the remote stays at it).
    refused: Option<String>,
    /// The applied commit `behind` was last counted from.
    counted_from: Option<String>,
}

impl Syncer {
    pub fn new(
        repo: Arc<Repo>,
        status: Arc<Mutex<Status>>,
        reconcile: Sender<Request>,
        metrics: Arc<GitMetrics>,
    ) -> Syncer {
        {
            let mut s = status.lock().expect("status");
            s.git = Some(GitStatus {
                url: repo.shown_url(),
                branch: repo.options.branch.clone(),
                checked_out: repo.head().ok(),
                allow_rewrite: repo.options.allow_rewrite,
                require_signed: repo.options.allowed_signers.is_some(),
                ..GitStatus::default()
            });
        }
        Syncer {
            repo,
            status,
            reconcile: Arc::new(Mutex::new(Some(reconcile))),
            metrics,
            refused: None,
            counted_from: None,
        }
    }

    /// Fetches every interval and whenever asked, until `stop`. Requests that arrive while a
    /// fetch runs are answered by the next one (a burst of hooks is one fetch).
    pub fn run(mut self, asks: Receiver<FetchRequest>, stop: Arc<AtomicBool>) {
        let mut due = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            // A commit applied by another way (the API's, a file edit) is counted at once.
            let applied = self
                .status
                .lock()
                .expect("status")
                .revision
                .git_commit
                .clone();
            if applied.is_some() && applied != self.counted_from {
                self.update_behind();
            }
            let wait = due
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            let mut batch = Vec::new();
            match asks.recv_timeout(wait) {
                Ok(ask) => batch.push(ask),
                Err(RecvTimeoutError::Timeout) if Instant::now() < due => continue,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) if Instant::now() < due => {
                    std::thread::sleep(wait);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {}
            }
            while let Ok(more) = asks.try_recv() {
                batch.push(more);
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
            self.sync_once();
            due = Instant::now() + self.repo.options.interval;
            for ask in batch {
                if let Some(reply) = ask.reply {
                    let _ = reply.send(());
                }
            }
        }
    }

    /// One fetch, and the move to what it brought when that passes the gate.
    pub fn sync_once(&mut self) {
        let at = crate::clock::rfc3339_now();
        let fetched = match self.repo.fetch() {
            Ok(commit) => commit,
            Err(e) => {
                self.metrics.fetches_failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.remote_up.store(0, Ordering::Relaxed);
                let was_reachable = self.with_status(|g| {
                    let was = g.remote_reachable;
                    g.last_fetch = Some(at.clone());
                    g.remote_reachable = Some(false);
                    g.fetch_error = Some(format!(
                        "{e}; HAProxy keeps serving commit {}",
                        g.applied_commit
                            .as_deref()
                            .map(short)
                            .unwrap_or("(none yet)")
                    ));
                    was
                });
                // Logged when it starts failing (and at debug level after), not every interval.
                if was_reachable != Some(false) {
                    tracing::error!(
                        "git: the remote {} cannot be reached: {e}; the last good commit keeps serving",
                        self.repo.shown_url()
                    );
                } else {
                    tracing::debug!("git: fetch failed again: {e}");
                }
                self.update_behind();
                return;
            }
        };
        self.metrics.fetches_ok.fetch_add(1, Ordering::Relaxed);
        self.metrics.remote_up.store(1, Ordering::Relaxed);
        *self.metrics.last_success.lock().expect("metrics") = crate::clock::unix_now();
        let was_reachable = self.with_status(|g| {
            let was = g.remote_reachable;
            g.last_fetch = Some(at.clone());
            g.last_successful_fetch = Some(at.clone());
            g.remote_reachable = Some(true);
            g.fetch_error = None;
            was
        });
        if was_reachable == Some(false) {
            tracing::info!("git: the remote {} answers again", self.repo.shown_url());
        }
        // Published with its count: never a new fetched commit beside the old `behind`.
        self.publish_behind(Some(&fetched));
        match self.follow(&fetched) {
            Ok(moved) => {
                if self.refused.take().is_some() {
                    self.with_status(|g| g.refused = None);
                }
                if moved {
                    // Applied like any change; the outcome is the reconcile's to report.
                    let sender = self.reconcile.lock().expect("git").clone();
                    if let Some(sender) = sender {
                        let _ = request_blocking(&sender, Trigger::Git);
                    }
                }
            }
            Err((reason, message, diagnostics)) => {
                if self.refused.as_deref() != Some(fetched.as_str()) {
                    *self
                        .metrics
                        .refused
                        .lock()
                        .expect("metrics")
                        .entry(reason.label())
                        .or_insert(0) += 1;
                    let lines: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
                    tracing::error!(
                        reason = reason.label(),
                        commit = fetched,
                        diagnostics = %lines.join("\n"),
                        "git: commit {} refused: {message}; HAProxy keeps serving the last good commit",
                        short(&fetched)
                    );
                    self.refused = Some(fetched.clone());
                    self.with_status(|g| {
                        g.refused = Some(Refused {
                            commit: fetched.clone(),
                            reason,
                            message,
                            diagnostics,
                            since: at.clone(),
                        })
                    });
                }
            }
        }
        self.update_behind();
    }

    /// Moves the clone to `fetched` when it passes the gate. `Ok(true)`: moved.
    fn follow(&mut self, fetched: &str) -> Result<bool, (Refusal, String, Vec<Diagnostic>)> {
        let internal = |e: GitError| (Refusal::Invalid, e.to_string(), Vec::new());
        let head = self.repo.head().map_err(internal)?;
        if head == fetched {
            return Ok(false);
        }
        if self.refused.as_deref() == Some(fetched) {
            // Still the commit refused: it stays refused (and reported) without a new check.
            let refused = self
                .status
                .lock()
                .expect("status")
                .git
                .as_ref()
                .and_then(|g| g.refused.clone());
            if let Some(r) = refused {
                return Err((r.reason, r.message, r.diagnostics));
            }
        }
        if !self.repo.is_ancestor(&head, fetched).map_err(internal)? {
            if self.repo.is_ancestor(fetched, &head).map_err(internal)? {
                // The clone is ahead (a change of this node not pushed yet): nothing to take.
                return Ok(false);
            }
            if !self.repo.options.allow_rewrite {
                return Err((
                    Refusal::Rewrite,
                    format!(
                        "the branch {} was rewritten (force-pushed): commit {} does not descend from commit {} this node runs; refused (start the daemon with --allow-rewrite to follow rewrites)",
                        self.repo.options.branch,
                        short(fetched),
                        short(&head)
                    ),
                    Vec::new(),
                ));
            }
            tracing::warn!(
                "git: the branch was rewritten; following it to commit {} (--allow-rewrite)",
                short(fetched)
            );
        }
        gate(&self.repo, fetched)?;
        let _state = self.repo.lock_state();
        // The API may have committed meanwhile: then the fetched commit is looked at again
        // against the new head at the next fetch (which the API's push makes current anyway).
        if self.repo.head().map_err(internal)? != head {
            return Ok(false);
        }
        self.repo.move_to(fetched).map_err(internal)?;
        drop(_state);
        tracing::info!(
            "git: moved from commit {} to commit {}",
            short(&head),
            short(fetched)
        );
        self.with_status(|g| g.checked_out = Some(fetched.to_string()));
        Ok(true)
    }

    fn update_behind(&mut self) {
        self.publish_behind(None);
    }

    /// Counts the commits of the fetched commit (`fetched_now`, else the one last published)
    /// that the applied one lacks, and publishes the commits and the count in one update.
    fn publish_behind(&mut self, fetched_now: Option<&str>) {
        let (applied, fetched) = {
            let status = self.status.lock().expect("status");
            (
                status.revision.git_commit.clone(),
                fetched_now
                    .map(str::to_string)
                    .or_else(|| status.git.as_ref().and_then(|g| g.fetched_commit.clone())),
            )
        };
        let behind = match (&applied, &fetched) {
            (Some(a), Some(f)) if a == f => Some(0),
            (Some(a), Some(f)) => self.repo.count_between(a, f).ok(),
            _ => None,
        };
        self.counted_from = applied.clone();
        self.metrics
            .behind
            .store(behind.unwrap_or(0), Ordering::Relaxed);
        *self.metrics.commits.lock().expect("metrics") = (
            applied.clone().unwrap_or_default(),
            fetched.clone().unwrap_or_default(),
        );
        self.with_status(|g| {
            g.applied_commit = applied;
            g.fetched_commit = fetched;
            g.behind = behind;
            g.checked_out = self.repo.head().ok();
        });
    }

    fn with_status<T>(&self, f: impl FnOnce(&mut GitStatus) -> T) -> T {
        let mut status = self.status.lock().expect("status");
        f(status.git.get_or_insert_with(GitStatus::default))
    }
}

/// What a commit must pass besides descending from the one checked out: its signature (with
/// `--require-signed`) and validation of the state it holds, read from the commit itself
/// (nothing is checked out before it passes). With `global.isolate_invalid`, a state whose
/// invalid entries can be held back passes: the reconcile applies the valid rest, as for a
/// file edit.
pub fn gate(repo: &Repo, commit: &str) -> Result<(), (Refusal, String, Vec<Diagnostic>)> {
    repo.verify_signature(commit)
        .map_err(|e| (Refusal::Unsigned, e, Vec::new()))?;
    let scratch = scratch_dir(&repo.dir);
    let result = (|| {
        std::fs::create_dir_all(&scratch).map_err(|e| {
            (
                Refusal::Invalid,
                format!("{}: {e}", scratch.display()),
                Vec::new(),
            )
        })?;
        repo.export(commit, &scratch)
            .map_err(|e| (Refusal::Invalid, e.to_string(), Vec::new()))?;
        let source = crate::spec::load::load_path(&scratch).map_err(|e| {
            (
                Refusal::Invalid,
                format!(
                    "commit {}: {}",
                    short(commit),
                    e.to_string().replace(&scratch.display().to_string(), ".")
                ),
                Vec::new(),
            )
        })?;
        let validation = crate::model::validate(&source);
        if validation.model.is_some() || isolation_enabled(&source.document) {
            return Ok(());
        }
        let diagnostics: Vec<Diagnostic> = validation
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .cloned()
            .map(|d| relative_to(d, &scratch))
            .collect();
        Err((
            Refusal::Invalid,
            format!(
                "the state at commit {} has {} error(s); it is applied nowhere until a commit fixes it",
                short(commit),
                diagnostics.len()
            ),
            diagnostics,
        ))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// A private folder beside the clone for a commit's files (outside it: the watcher and the
/// loader never see it).
fn scratch_dir(clone: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let parent = clone.parent().unwrap_or(Path::new("/tmp"));
    let name = clone
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent.join(format!(
        ".{name}.gate-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A diagnostic of a commit's files, its paths relative to the repository.
fn relative_to(mut d: Diagnostic, root: &Path) -> Diagnostic {
    let fix = |file: &mut PathBuf| {
        if let Ok(rel) = file.strip_prefix(root) {
            *file = rel.to_path_buf();
        }
    };
    if let Some(l) = d.location.as_mut() {
        fix(&mut l.file);
    }
    for n in &mut d.notes {
        if let Some(l) = n.location.as_mut() {
            fix(&mut l.file);
        }
    }
    d
}
