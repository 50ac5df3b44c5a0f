//! The daemon's reconcile loop: one reconcile at a time, whatever asked for it (a file change,
//! the drift timer, `POST /reconcile`, an API call). Each runs the same pipeline as `apply`:
//! load → validate → `crate::pipeline` (render → plan → apply). A state that does not validate
//! never replaces the last good one: HAProxy keeps serving what was last applied, and the
//! errors are exposed.

use super::metrics::Metrics;
use super::supervise::Supervisor;
use crate::model::isolate::isolate;
use crate::model::{HaproxyTarget, Target, validate};
use crate::pipeline;
use crate::plan::diff::{Change, Kind};
use crate::render::{MANIFEST, RenderOptions};
use crate::spec::diagnostics::Diagnostic;
use crate::spec::load::{self, Source};
use crate::target::files;
use crate::target::haproxy;
use crate::target::history::History;
use crate::target::{ApplyError, How};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The daemon started.
    Start,
    /// Files of the state changed.
    Files,
    /// The clone moved to a new commit of the git remote (`--git`).
    Git,
    /// The drift timer.
    Timer,
    /// `POST /reconcile`.
    Request,
    /// SIGHUP.
    Signal,
    /// A held change's settle time is over: the state is read again.
    Settle,
    /// A change made through the agent API.
    Api,
    /// The ACME manager has a new or renewed certificate to install.
    Acme,
}

/// A request to reconcile; `reply` gets the outcome.
pub struct Request {
    pub trigger: Trigger,
    pub reply: Option<tokio::sync::oneshot::Sender<Outcome>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// applied, unchanged, invalid, partial, failed, rolled_back, held
    pub result: &'static str,
    pub at: String,
    pub trigger: Trigger,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub how: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
    /// Entries held at their last applied version (isolation).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_back: Vec<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        matches!(self.result, "applied" | "unchanged")
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Revision {
    pub history_entry: Option<u64>,
    pub applied_at: Option<String>,
    /// SHA-256 of the recorded state (the manifest beside haproxy.cfg).
    pub state_sha256: Option<String>,
    /// The commit the applied state was read at, when the state folder is a git checkout.
    pub git_commit: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PendingPlan {
    pub changes: Vec<Change>,
    pub reload_required: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub target: String,
    pub state: String,
    pub revision: Revision,
    pub last_reconcile: Option<Outcome>,
    /// The last reconcile that did not succeed, with its diagnostics.
    pub last_error: Option<Outcome>,
    pub drift_corrections: u64,
    /// The plan of the last reconcile (what it applied, or would have).
    pub pending_plan: Option<PendingPlan>,
    /// A change held by `global.delete_guard`, while it is.
    pub held: Option<Held>,
    /// The revision `POST /approve` approved, until a reconcile uses it.
    #[serde(skip)]
    pub approved: Option<String>,
    /// The last reconciles, newest first (at most `RECENT_RECONCILES`), for the status page.
    #[serde(skip)]
    pub recent: std::collections::VecDeque<Outcome>,
    /// The git remote the state follows (`--git`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git: Option<crate::git::sync::GitStatus>,
    /// Each target of a group (or a Data Plane API target): what the last rollout did.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<super::fleet::MemberStatus>,
}

/// How many reconciles the status page lists.
pub const RECENT_RECONCILES: usize = 20;

/// A change held because it removes many domains or backends at once (a file cut short looks
/// like that): not applied until the state stays the same for the settle time, or
/// `POST /approve?revision=<revision>` approves it.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    /// The revision of the state held (`POST /approve?revision=` names it).
    pub revision: String,
    #[serde(flatten)]
    pub removes: crate::plan::MassDelete,
    pub message: String,
    /// RFC 3339: when the change was first seen, and when it is applied if the state stays
    /// the same until then.
    pub since: String,
    pub settles_at: String,
}

/// A held change as the reconcile loop tracks it.
pub struct Holding {
    pub revision: String,
    /// When it is looked at again.
    pub due: Instant,
    /// RFC 3339 times for `/status`: first seen, looked at again.
    pub since_at: String,
    pub due_at: String,
}

/// What the daemon drives.
pub enum Drive {
    /// One local HAProxy (files, master CLI, runtime API), maybe run as the daemon's child.
    Local(HaproxyTarget),
    /// A Data Plane API target or a group (any mix), rolled out as `apply` does.
    Fleet(super::fleet::Fleet),
}

pub struct Reconciler {
    pub state: PathBuf,
    pub target_name: String,
    pub drive: Drive,
    pub options: RenderOptions,
    pub status: Arc<Mutex<Status>>,
    pub metrics: Arc<Metrics>,
    pub supervisor: Option<Arc<Supervisor>>,
    /// The last state that validated, for the API.
    pub valid_model: Arc<Mutex<Option<Arc<crate::model::Model>>>>,
    pub after_reconcile: Option<fn()>,
    /// The change held by the delete guard, if any.
    pub holding: Option<Holding>,
    /// When the last reload was applied: reloads the agent API asks for are at least
    /// `api.limits.reload_interval` after it, and the changes that need one meanwhile share it.
    pub last_reload: Option<Instant>,
    /// The reconcile being run serves an agent API change.
    pub for_api: bool,
    /// Held while the state is read, by whoever moves or writes the folder too (the API's
    /// store while it checks and writes a change; with git, the clone's owner): a reconcile
    /// never reads a batch of fragments half written or a checkout half moved. The reconcile
    /// waits behind the API's check and writes (with `api.git_commit`, its commits too).
    pub state_lock: Arc<Mutex<()>>,
    /// Issuance and renewal of ACME certificates, told what the applied state wants.
    pub acme: Option<Arc<crate::acme::manager::Shared>>,
    /// What the last reconcile that left the target running the whole state read, and what
    /// the target's files were then: a file event that changed neither (the API's own write,
    /// already applied by the reconcile it asked for) is answered without loading the state.
    pub last_converged: Option<Converged>,
    /// The requests being served are all file events (an API change or an ACME certificate
    /// batched with them must be planned whatever the files say).
    pub file_events_only: bool,
    /// The state the API validated for its last change (see `Prevalidated`).
    pub prevalidated: Prevalidated,
    /// A fleet's members' results of the reconcile running, published in /status together
    /// with its outcome (in one lock): a reader never sees one reconcile's members beside the
    /// outcome of the one before.
    pub fleet_targets: Option<Vec<super::fleet::MemberStatus>>,
}

/// See `Reconciler::last_converged`.
#[derive(Clone)]
pub struct Converged {
    /// The files and certificates read, by digest.
    input: load::Fingerprint,
    /// The commit they were read at.
    commit: Option<String>,
    manifest: Option<(u64, u64, std::time::SystemTime)>,
}

/// The whole state as the API's last accepted change made it, validated: the API validates the
/// state as it will be with the change before writing the change, and the reconcile it then
/// asks for reads those same files. That reconcile takes this source and its validation instead
/// of loading and validating again when the files on disk are still exactly the ones the source
/// holds (`load::still_on_disk`: read and compared, not parsed); anything else is loaded and
/// validated.
///
/// The last source kept is also, compacted with its validation (`validate::Checked`), what the
/// API's next check is loaded from (`load::load_path_from`: only the files that differ from
/// it are parsed again) and validated from (`validate::validate_from`: only the entries the
/// change can affect are judged again).
#[derive(Clone, Default)]
pub struct Prevalidated {
    kept: Arc<Mutex<Option<Kept>>>,
    checked: Arc<Mutex<Option<Arc<crate::model::validate::Checked>>>>,
}

/// A source and the model validated from it.
type Kept = (Arc<Source>, Arc<crate::model::Model>);

impl Prevalidated {
    /// Keeps the model validated from `source` and the validation's `diagnostics` (warnings:
    /// the state validated whole), replacing the ones kept.
    pub fn keep(
        &self,
        source: Source,
        model: Arc<crate::model::Model>,
        diagnostics: Vec<crate::spec::diagnostics::Diagnostic>,
    ) {
        let checked =
            crate::model::validate::Checked::new(&source, model.clone(), diagnostics).map(Arc::new);
        *self.checked.lock().unwrap_or_else(|e| e.into_inner()) = checked;
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some((Arc::new(source), model));
    }

    /// The source last kept and its validation, whether or not a reconcile took that source
    /// since: what the API's next check is loaded and validated from. Used only for the files
    /// that differ from it on disk, so one older than an edit is safe (only slower).
    pub fn checked(&self) -> Option<Arc<crate::model::validate::Checked>> {
        self.checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The source kept and its model, if the state at `state` is still exactly what that
    /// source was read from. One that does not match is forgotten when `for_api` (the reconcile
    /// an API change asked for, after writing it: the files changed since, or the API writes
    /// elsewhere, so it would never match) and kept otherwise (a reconcile of file events may
    /// run between the API's check and its write, and must not take it from the reconcile
    /// that change asks for next).
    pub fn take_on_disk(
        &self,
        state: &Path,
        for_api: bool,
    ) -> Option<(Arc<Source>, Arc<crate::model::Model>)> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let matches = kept
            .as_ref()
            .is_some_and(|(source, _)| load::still_on_disk(state, source));
        if !matches && !for_api {
            return None;
        }
        let (source, model) = kept.take()?;
        matches.then_some((source, model))
    }
}

fn unshared(model: Arc<crate::model::Model>) -> crate::model::Model {
    Arc::try_unwrap(model).unwrap_or_else(|shared| (*shared).clone())
}

/// Which manifest the target's folder holds (each apply replaces it by rename).
fn manifest_stamp(target: &HaproxyTarget) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(haproxy::config_dir(target).join(crate::render::MANIFEST)).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()?))
}

impl Reconciler {
    /// Serves requests until the channel closes. Requests that queue while a reconcile runs
    /// are answered together by the next one (changes coalesce into one apply, one reload).
    pub fn run(mut self, requests: Receiver<Request>) {
        loop {
            // A held change is looked at again once its settle time is over.
            let first = match self.holding.as_ref().map(|h| h.due) {
                Some(due) => {
                    match requests.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(request) => request,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Request {
                            trigger: Trigger::Settle,
                            reply: None,
                        },
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match requests.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
            };
            let mut batch = vec![first];
            while let Ok(more) = requests.try_recv() {
                batch.push(more);
            }
            let trigger = batch.iter().map(|r| r.trigger).min().expect("one request");
            self.for_api = batch.iter().any(|r| r.trigger == Trigger::Api);
            self.file_events_only = batch.iter().all(|r| r.trigger == Trigger::Files);
            let outcome = self.reconcile(trigger);
            // A reconcile past the settle time that neither applied nor held the change again
            // ended before it (the state does not validate now): what was held is no longer
            // what the state says; a valid state is looked at afresh.
            if self
                .holding
                .as_ref()
                .is_some_and(|h| h.due <= Instant::now())
            {
                self.release_hold();
                self.metrics.change_held.store(0, Ordering::Relaxed);
            }
            if let Some(release) = self.after_reconcile {
                release();
            }
            for request in batch {
                if let Some(reply) = request.reply {
                    let _ = reply.send(outcome.clone());
                }
            }
        }
    }

    /// The model HAProxy runs (from its recorded files): what isolation keeps invalid entries at.
    fn previous_model(&self) -> Option<Arc<crate::model::Model>> {
        match &self.drive {
            Drive::Local(target) => files::read_recorded(haproxy::config_dir(target))
                .ok()
                .flatten()
                .map(|r| r.model),
            Drive::Fleet(_) => None,
        }
    }

    pub fn reconcile(&mut self, trigger: Trigger) -> Outcome {
        let started = Instant::now();
        let mut outcome = self.reconcile_inner(trigger);
        outcome.duration_ms = started.elapsed().as_millis() as u64;
        self.metrics.count_reconcile(outcome.result);
        if outcome.ok() || outcome.result == "partial" {
            *self.metrics.last_success.lock().expect("metrics") = crate::clock::unix_now();
        }
        self.metrics
            .change_held
            .store(u64::from(self.holding.is_some()), Ordering::Relaxed);
        match outcome.result {
            "held" => tracing::warn!(
                result = outcome.result,
                "reconcile: change held: {}",
                outcome.message.clone().unwrap_or_default()
            ),
            // One event with every diagnostic, so a log pipeline (--log-format json) keeps
            // them together with the reconcile they belong to.
            "invalid" | "partial" | "failed" | "rolled_back" => {
                let diagnostics: Vec<String> =
                    outcome.diagnostics.iter().map(|d| d.to_string()).collect();
                tracing::error!(
                    result = outcome.result,
                    diagnostics = %diagnostics.join("\n"),
                    "reconcile: {}",
                    outcome.message.clone().unwrap_or_default()
                );
            }
            // What asked for it and why it went as it did (a reload's reasons, a runtime change
            // that became a reload, drift put back): a reload nobody expected must be explained
            // by the log alone.
            result => tracing::info!(
                result,
                trigger = ?outcome.trigger,
                how = outcome.how,
                changes = outcome.changes.len(),
                "reconcile{}",
                outcome
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
        }
        let mut status = self.status.lock().expect("status");
        status.revision = self.revision();
        let applied = status.revision.git_commit.clone();
        if let Some(git) = status.git.as_mut() {
            // Applied what was fetched: nothing of it is missing. The git thread's next count
            // says the same, but until then /status must not show a stale count beside it.
            if applied.is_some() && applied == git.fetched_commit {
                git.behind = Some(0);
            }
            git.applied_commit = applied;
        }
        status.drift_corrections = self.metrics.drift_corrections.load(Ordering::Relaxed);
        if !outcome.ok() {
            status.last_error = Some(outcome.clone());
        }
        if let Some(targets) = self.fleet_targets.take() {
            status.targets = targets;
        }
        status.last_reconcile = Some(outcome.clone());
        status.recent.push_front(outcome.clone());
        status.recent.truncate(RECENT_RECONCILES);
        drop(status);
        super::notify::reconciled(&outcome);
        outcome
    }

    pub(super) fn outcome(trigger: Trigger, result: &'static str) -> Outcome {
        Outcome {
            result,
            at: crate::clock::rfc3339_now(),
            trigger,
            duration_ms: 0,
            how: None,
            changes: Vec::new(),
            message: None,
            diagnostics: Vec::new(),
            held_back: Vec::new(),
        }
    }

    fn reconcile_inner(&mut self, trigger: Trigger) -> Outcome {
        let fail = |result, message: String, diagnostics: Vec<Diagnostic>| {
            let mut o = Self::outcome(trigger, result);
            o.message = Some(message);
            o.diagnostics = diagnostics;
            o
        };
        let mut timer = crate::clock::PhaseTimer::new();
        // The commit the state is read at: recorded with what gets applied (a checkout that
        // moved while it was read is no one commit).
        let read_lock = self.state_lock.clone();
        let read_guard = read_lock.lock().unwrap_or_else(|e| e.into_inner());
        let commit_before = git_head(&self.state_folder());
        // A file event for files already applied (the API's own write, which the reconcile it
        // asked for applied): answered from the files' digests, without loading the state.
        if self.file_events_only
            && self.holding.is_none()
            && let (Drive::Local(target), Some(last)) = (&self.drive, &self.last_converged)
            && last.commit == commit_before
            && last.manifest == manifest_stamp(target)
            && last.input.still_on_disk(&self.state)
            && git_head(&self.state_folder()) == commit_before
        {
            return Self::outcome(trigger, "unchanged");
        }
        // The files an API change just wrote are the ones its check loaded and validated.
        let (source, prevalidated) = match self.prevalidated.take_on_disk(&self.state, self.for_api)
        {
            Some((source, model)) => (source, Some(model)),
            None => match load::load_path(&self.state) {
                Ok(source) => {
                    self.metrics.state_loads.fetch_add(1, Ordering::Relaxed);
                    (Arc::new(source), None)
                }
                Err(e) => return fail("invalid", e.to_string(), Vec::new()),
            },
        };
        let git_commit =
            commit_before.filter(|c| git_head(&self.state_folder()).as_ref() == Some(c));
        drop(read_guard);
        timer.lap("load");
        let converged = match &self.drive {
            Drive::Local(target) => Some(Converged {
                input: source.fingerprint(),
                commit: git_commit.clone(),
                manifest: manifest_stamp(target),
            }),
            Drive::Fleet(_) => None,
        };
        // Set again below once this reconcile leaves the target on the whole state.
        self.last_converged = None;
        // The model the API validated is shared with what it keeps for its next check: used
        // as it is, not copied (a copy of a 10k-domain model takes milliseconds).
        let (mut validation, prevalidated) = match prevalidated {
            Some(model) => (
                crate::model::Validation {
                    model: None,
                    diagnostics: Vec::new(),
                },
                Some(model),
            ),
            None => (validate(&source), None),
        };
        timer.lap("validate");
        let mut held_back = Vec::new();
        let model = match (prevalidated, validation.model.take()) {
            (Some(model), _) => {
                self.metrics.state_valid.store(1, Ordering::Relaxed);
                model
            }
            (None, Some(model)) => {
                self.metrics.state_valid.store(1, Ordering::Relaxed);
                Arc::new(model)
            }
            (None, None) => {
                self.metrics.state_valid.store(0, Ordering::Relaxed);
                let errors: Vec<Diagnostic> = validation
                    .diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .cloned()
                    .collect();
                let message = format!(
                    "the state has {} error(s); HAProxy keeps serving the last applied state",
                    errors.len()
                );
                if !isolation_enabled(&source.document) {
                    return fail("invalid", message, errors);
                }
                let previous = self.previous_model();
                match isolate(&source, &validation, previous.as_deref()) {
                    Some(isolated) => {
                        held_back = isolated.held;
                        Arc::new(isolated.model)
                    }
                    None => {
                        return fail(
                            "invalid",
                            format!("{message} (these errors cannot be isolated)"),
                            errors,
                        );
                    }
                }
            }
        };
        // Freeing a large state's source (every file's text, the parsed document when no model
        // shares it) takes milliseconds the change's caller would wait for.
        pipeline::drop_later(source);
        // The certificates the ACME store holds are rendered like a certificate folder (a local
        // target's; a fleet's members are rendered by `fleet::prepare`, which does the same).
        let model = match (&self.drive, crate::acme::uses_acme(&model)) {
            (Drive::Local(target), true) => {
                match crate::acme::store::Store::new(&target.state_dir).overlay(unshared(model)) {
                    Ok(model) => Arc::new(model),
                    Err(e) => return fail("failed", e.to_string(), Vec::new()),
                }
            }
            _ => model,
        };
        *self.valid_model.lock().expect("model") = Some(model.clone());
        let partial = !held_back.is_empty();
        let errors: Vec<Diagnostic> = validation
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .cloned()
            .collect();
        let finish = |mut o: Outcome| {
            if partial {
                o.result = if o.ok() { "partial" } else { o.result };
                o.held_back = held_back.clone();
                o.diagnostics = errors.clone();
                o.message.get_or_insert_with(|| {
                    "the valid rest of the state was applied; invalid entries were held back".into()
                });
            }
            o
        };

        let target = match &self.drive {
            Drive::Local(target) => target.clone(),
            Drive::Fleet(_) => {
                return finish(self.reconcile_fleet(trigger, &model, git_commit));
            }
        };
        let mut prepared = match pipeline::prepare_overlaid(
            &model,
            &self.target_name,
            &Target::Haproxy(target.clone()),
        ) {
            Ok(p) => p,
            Err(e) => return finish(fail("failed", e.to_string(), Vec::new())),
        };
        prepared.git_commit = git_commit;
        timer.lap("observe+render+plan");
        let running = haproxy::process::running(&target).is_some();
        let (plan, live) = (&prepared.plan, &prepared.live);
        // Reloads that agents cause are spaced (a tenant must not be able to reload away the
        // others' long-lived connections): wait for the interval to pass, then start over so
        // that every change written meanwhile goes into this one reload.
        if plan.reload_required()
            && running
            && self.for_api
            && let Some(last) = self.last_reload
        {
            let (interval, elapsed) = (crate::api::ops::reload_interval(&model), last.elapsed());
            if elapsed < interval {
                std::thread::sleep(interval - elapsed);
                return self.reconcile_inner(trigger);
            }
        }
        self.metrics
            .domains
            .store(model.domains.len() as u64, Ordering::Relaxed);
        self.status.lock().expect("status").pending_plan = Some(PendingPlan {
            changes: plan.changes.clone(),
            reload_required: plan.reload_required(),
        });
        if let Some(mass) = &plan.mass_delete
            && let Some(held) = self.hold(&model, mass)
        {
            let mut o = Self::outcome(trigger, "held");
            o.message = Some(held);
            o.changes = plan.changes.iter().map(|c| c.summary()).collect();
            return finish(o);
        }
        if plan.mass_delete.is_none() {
            self.release_hold();
        }

        if plan.is_empty() && running {
            // Nothing to write; someone may still have changed HAProxy through its socket.
            if matches!(
                trigger,
                Trigger::Timer | Trigger::Start | Trigger::Request | Trigger::Signal | Trigger::Api
            ) {
                match haproxy::correct_runtime_drift(&target, &live.files, &self.options) {
                    Ok(Some(what)) => {
                        self.metrics
                            .drift_corrections
                            .fetch_add(1, Ordering::Relaxed);
                        let mut o = Self::outcome(trigger, "applied");
                        o.how = Some("runtime");
                        o.message = Some(format!("runtime drift put back: {what}"));
                        return finish(o);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return finish(fail(
                            "failed",
                            format!("checking runtime drift: {e}"),
                            Vec::new(),
                        ));
                    }
                }
            }
            // HAProxy runs this state: the commit it was read at describes what runs.
            haproxy::marker::set_git_commit(&target, prepared.git_commit.as_deref());
            if let Some(acme) = &self.acme {
                acme.wanted(&model);
            }
            if !partial {
                self.last_converged = converged;
            }
            return finish(Self::outcome(trigger, "unchanged"));
        }

        // Counted once the drift is actually put back.
        let drift = plan
            .changes
            .iter()
            .any(|c| c.kind == Kind::Global && c.detail.contains("outside lunafront"));
        let changes: Vec<String> = plan.changes.iter().map(|c| c.summary()).collect();
        let apply_started = Instant::now();
        let result = match &self.supervisor {
            Some(supervisor) => {
                let supervisor = supervisor.clone();
                pipeline::apply(&prepared, None, true, Some(&move |t| supervisor.start(t)))
            }
            None => pipeline::apply(&prepared, None, true, None),
        };
        self.metrics
            .observe_apply(apply_started.elapsed().as_secs_f64());
        timer.lap("apply");
        tracing::debug!(phases = %timer, "reconcile timings");
        match result {
            Ok(applied) => {
                if drift {
                    self.metrics
                        .drift_corrections
                        .fetch_add(1, Ordering::Relaxed);
                }
                let mut o = Self::outcome(trigger, "applied");
                o.how = Some(applied.how.label());
                o.changes = changes.clone();
                let mut notes = applied.notes.clone();
                if let Some(why) = &applied.unrecorded {
                    tracing::error!(
                        "the change is live, but it could not be recorded: {why}; `lunafront rollback` cannot return to this state"
                    );
                    notes.push(format!(
                        "the change is live, but it could not be recorded: {why}"
                    ));
                }
                if !notes.is_empty() {
                    o.message = Some(notes.join("; "));
                }
                match applied.how {
                    How::Runtime { commands } => {
                        self.metrics.runtime_updates.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .runtime_commands
                            .fetch_add(commands as u64, Ordering::Relaxed);
                    }
                    How::Reloaded { .. } | How::RemoteReload { .. } => {
                        self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                        self.last_reload = Some(Instant::now());
                    }
                    How::Started { .. } | How::Unchanged => {}
                }
                if let Some(acme) = &self.acme {
                    acme.wanted(&model);
                }
                if let Some(manifest) = prepared.plan.new_files.get(crate::render::MANIFEST) {
                    files::remember_recorded(
                        haproxy::config_dir(&target),
                        manifest,
                        match model.with_binds(&self.options.binds) {
                            std::borrow::Cow::Borrowed(_) => model.clone(),
                            std::borrow::Cow::Owned(bound) => Arc::new(bound),
                        },
                    );
                }
                if !partial && applied.unrecorded.is_none() {
                    self.last_converged = converged.map(|c| Converged {
                        manifest: manifest_stamp(&target),
                        ..c
                    });
                }
                // The plan holds the target's files twice (before and after): freed off the
                // path of the callers this reconcile answers.
                pipeline::drop_later(prepared);
                finish(o)
            }
            Err(e) => {
                let result = match &e {
                    ApplyError::RolledBack { .. } => "rolled_back",
                    _ => "failed",
                };
                let mut o = fail(result, e.to_string(), Vec::new());
                o.changes = changes.clone();
                finish(o)
            }
        }
    }

    /// The delete guard: a change removing many domains or backends at once (what a file cut
    /// short or emptied looks like) waits until the state read again after the settle time is
    /// still the same, or until `POST /approve` names it. Returns why it is held, or `None`
    /// when it may be applied now.
    pub(super) fn hold(
        &mut self,
        model: &crate::model::Model,
        mass: &crate::plan::MassDelete,
    ) -> Option<String> {
        let revision = crate::target::fleet::revision_of(model.document_text().json());
        let settle = model.global.delete_guard.settle;
        let approved = {
            let mut status = self.status.lock().expect("status");
            match status.approved.take() {
                Some(approved) if approved == revision => true,
                // An approval of another revision approves nothing that is held now.
                _ => false,
            }
        };
        let settled = self
            .holding
            .as_ref()
            .is_some_and(|h| h.revision == revision && Instant::now() >= h.due);
        if approved || settled {
            tracing::info!(
                revision,
                "applying the held change ({}): {}",
                if approved {
                    "approved".to_string()
                } else {
                    format!("the state stayed the same for {settle}")
                },
                mass.describe()
            );
            self.release_hold();
            return None;
        }
        let holding = match self.holding.take() {
            Some(h) if h.revision == revision => h,
            _ => {
                let now = crate::clock::unix_now() as i64;
                Holding {
                    revision: revision.clone(),
                    due: Instant::now() + settle.as_std(),
                    since_at: crate::clock::rfc3339(now),
                    due_at: crate::clock::rfc3339(now + settle.as_std().as_secs() as i64),
                }
            }
        };
        let message = format!(
            "{}; held, HAProxy keeps serving the last applied state: it is applied if the state read again in {settle} is the same, or with POST /approve?revision={revision}",
            mass.describe()
        );
        self.status.lock().expect("status").held = Some(Held {
            revision,
            removes: mass.clone(),
            message: message.clone(),
            since: holding.since_at.clone(),
            settles_at: holding.due_at.clone(),
        });
        self.holding = Some(holding);
        Some(message)
    }

    pub(super) fn release_hold(&mut self) {
        if self.holding.take().is_some() {
            self.status.lock().expect("status").held = None;
        }
    }

    /// The folder holding the state (the state itself, or the folder of a state file).
    fn state_folder(&self) -> PathBuf {
        if self.state.is_dir() {
            self.state.clone()
        } else {
            self.state
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        }
    }

    /// What HAProxy runs: the last history entry, the manifest, and the git commit recorded
    /// with the applied state (not the checkout's HEAD now: it may hold a state that was not
    /// applied).
    fn revision(&self) -> Revision {
        let target = match &self.drive {
            Drive::Local(target) => target,
            Drive::Fleet(fleet) => return fleet.revision(),
        };
        let last = History::new(&target.state_dir)
            .list()
            .ok()
            .and_then(|l| l.last().cloned());
        let manifest = std::fs::read(haproxy::config_dir(target).join(MANIFEST)).ok();
        Revision {
            history_entry: last.as_ref().map(|e| e.seq),
            applied_at: last.map(|e| e.time),
            state_sha256: manifest.map(|m| crate::plan::sha256_hex(&m)),
            git_commit: haproxy::marker::read(&target.state_dir).and_then(|m| m.git_commit),
        }
    }
}

/// `global.isolate_invalid`, read from the raw document: the setting must work even when the
/// state does not validate.
pub(crate) fn isolation_enabled(document: &serde_json::Value) -> bool {
    document
        .pointer("/global/isolate_invalid")
        .and_then(serde_json::Value::as_bool)
        == Some(true)
}

/// The commit checked out in the git repository holding `dir`, if any.
pub fn git_head(dir: &Path) -> Option<String> {
    let dir = std::path::absolute(dir).ok()?;
    let git = dir
        .ancestors()
        .map(|d| d.join(".git"))
        .find(|g| g.is_dir())?;
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref: ") else {
        return Some(head.to_string());
    };
    if let Ok(commit) = std::fs::read_to_string(git.join(reference)) {
        return Some(commit.trim().to_string());
    }
    let packed = std::fs::read_to_string(git.join("packed-refs")).ok()?;
    packed
        .lines()
        .find(|l| l.ends_with(reference))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
}

/// Sends a request and waits for its outcome (from a blocking context).
pub fn request_blocking(sender: &Sender<Request>, trigger: Trigger) -> Option<Outcome> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    sender
        .send(Request {
            trigger,
            reply: Some(tx),
        })
        .ok()?;
    rx.blocking_recv().ok()
}

/// What `--target NAME` designates: one `haproxy` target (driven locally), or a `dataplane`
/// target or a group (rolled out as `apply` does). Only `targets` and `groups` must validate,
/// so a broken state still lets the daemon start and serve the last applied one.
pub enum Targets {
    Local(HaproxyTarget),
    Fleet(Vec<(String, Target)>),
}

pub fn targets_of(state: &Path, name: &str) -> Result<Targets, String> {
    let source = load::load_path(state).map_err(|e| e.to_string())?;
    let validation = crate::model::validate_targets(&source);
    let errors: Vec<String> = validation.errors().map(|d| d.to_string()).collect();
    let model = validation.model;
    let model = model.ok_or_else(|| errors.join("\n"))?;
    if let Some(Target::Haproxy(t)) = model.targets.get(name) {
        return Ok(Targets::Local(t.clone()));
    }
    if !model.targets.contains_key(name) && !model.groups.contains_key(name) {
        return Err(format!(
            "no target or group named `{name}` in the state (targets: {}; groups: {})",
            model.targets.keys().cloned().collect::<Vec<_>>().join(", "),
            if model.groups.is_empty() {
                "none".to_string()
            } else {
                model.groups.keys().cloned().collect::<Vec<_>>().join(", ")
            }
        ));
    }
    let members =
        crate::target::fleet::resolve(&model, &[name.to_string()]).map_err(|e| e.to_string())?;
    Ok(Targets::Fleet(
        members.into_iter().map(|(n, t)| (n, t.clone())).collect(),
    ))
}

/// The `haproxy` target a daemon serves (`Targets::Local`), or why it is not one.
pub fn target_of(state: &Path, name: &str) -> Result<(HaproxyTarget, RenderOptions), String> {
    match targets_of(state, name)? {
        Targets::Local(t) => {
            let options = RenderOptions::for_target(Some(&Target::Haproxy(t.clone())));
            Ok((t, options))
        }
        Targets::Fleet(_) => Err(format!(
            "`{name}` is not a haproxy target: it is driven as a fleet"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::Prevalidated;
    use std::sync::Arc;

    /// The source the API loaded is taken without loading only while the files on disk are
    /// exactly what it read: a state file's text, a new state file or a certificate that
    /// changed since sends the reconcile back to a full load.
    #[test]
    fn a_kept_source_serves_only_while_its_files_are_unchanged_on_disk() {
        use crate::spec::load::load_path;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        std::fs::create_dir(state.join("certs")).unwrap();
        std::fs::write(
            state.join("main.yaml"),
            "version: 1\nlisteners:\n  https: { bind: \":443\", certificates: certs }\n",
        )
        .unwrap();
        std::fs::write(state.join("agent.yaml"), "domains: {}\n").unwrap();
        std::fs::write(state.join("certs/a.pem"), "one").unwrap();
        let keep = || {
            let kept = Prevalidated::default();
            let source = load_path(state).unwrap();
            assert_eq!(source.certificates.len(), 1, "{:?}", source.certificates);
            kept.keep(source, Arc::new(crate::plan::empty_model()), Vec::new());
            kept
        };
        for for_api in [false, true] {
            let kept = keep();
            let (source, _) = kept.take_on_disk(state, for_api).expect("unchanged");
            assert_eq!(
                source.fingerprint(),
                load_path(state).unwrap().fingerprint()
            );
            assert!(kept.take_on_disk(state, for_api).is_none(), "used once");
        }

        let changes: [&dyn Fn(); 3] = [
            &|| std::fs::write(state.join("agent.yaml"), "domains: {} \n").unwrap(),
            &|| std::fs::write(state.join("more.yaml"), "backends: {}\n").unwrap(),
            &|| std::fs::write(state.join("certs/a.pem"), "two").unwrap(),
        ];
        for (i, change) in changes.iter().enumerate() {
            let kept = keep();
            change();
            // A reconcile of file events leaves it for the one the API change asks for.
            assert!(
                kept.take_on_disk(state, false).is_none(),
                "change {i} not seen"
            );
            assert!(kept.kept.lock().unwrap().is_some(), "change {i}: not left");
            // That one forgets it: it would never match.
            assert!(
                kept.take_on_disk(state, true).is_none(),
                "change {i} not seen"
            );
            assert!(
                kept.kept.lock().unwrap().is_none(),
                "change {i}: still kept"
            );
        }
    }
}
