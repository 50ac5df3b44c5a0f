//! The pipeline after validation, run the same way by every caller — `apply`, `rollback`, the
//! daemon and the API: for one target, observe what it holds → render the model onto it →
//! plan (where runtime or reload is decided, once) → the target executes the plan. Thin: each
//! step is its own module's function; this is only their order.

use crate::model::{Model, Target};
use crate::plan::{self, Live, Plan};
use crate::render::{self, RenderOptions};
use crate::target::files::Files;
use crate::target::haproxy::{self, Starter};
use crate::target::{self, Applied, ApplyError, ApplyRequest, TargetError, fleet};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("target {target}: {message}")]
    Acme { target: String, message: String },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Render(#[from] render::RenderError),
}

/// Drops `value` on a thread of its own, off the path a change's caller waits on: freeing a
/// large state's rendering, files or parsed source takes milliseconds. Should no thread start,
/// the closure is dropped at once, and the value with it.
pub fn drop_later<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new()
        .name("lunafront-drop".into())
        .spawn(move || drop(value));
}

/// One target's plan, with what it was made from.
pub struct Prepared {
    pub name: String,
    pub target: Target,
    pub plan: Plan,
    /// What the target held when the plan was made.
    pub live: Live,
    /// The revision the target holds before the apply.
    pub before: Option<String>,
    /// Domains whose certificate `lunafront daemon` will request from the ACME CA.
    pub acme_requests: Vec<String>,
    /// The git commit the state was read at (recorded with the apply).
    pub git_commit: Option<String>,
}

/// Observes the target, renders `model` onto the app slots it holds, and plans.
pub fn prepare(model: &Model, name: &str, target: &Target) -> Result<Prepared, PipelineError> {
    let model = crate::acme::for_target(model, target).map_err(|message| PipelineError::Acme {
        target: name.to_string(),
        message,
    })?;
    prepare_overlaid(&model, name, target)
}

/// `prepare` for a model that already holds the certificates the target's ACME store has
/// (`acme::for_target`; the daemon overlays them once per reconcile).
pub fn prepare_overlaid(
    model: &Model,
    name: &str,
    target: &Target,
) -> Result<Prepared, PipelineError> {
    let options = target::render_options(target);
    let mut timer = crate::clock::PhaseTimer::new();
    // Read the target first: the rendering starts from the app slots its configuration holds.
    let live = target::observe_paths(
        name,
        target,
        &options,
        render::output_paths(model, &options),
    )?;
    timer.lap("observe");
    let slots_before = live.slot_pools(&options.config_name);
    let rendered = render::render_onto(model, &options, &slots_before)?;
    timer.lap("render");
    // A Data Plane API gives no certificate back: it is known to hold one only against the
    // exact file expected (the API's fingerprint and the recorded apply). Read it again against
    // the rendering, or every certificate it holds would look changed outside lunafront.
    let live = match target {
        Target::Dataplane(_) => {
            target::observe_files(name, target, &options, &rendered.file_map())?
        }
        Target::Haproxy(_) => live,
    };
    let plan = match target {
        Target::Dataplane(_) => plan::make_plan(name, model, &rendered, &live),
        // The configuration read before rendering is the one planned against.
        Target::Haproxy(_) => plan::make_plan_onto(name, model, &rendered, &live, &slots_before),
    };
    timer.lap("plan");
    tracing::debug!(phases = %timer, "prepare timings");
    drop_later((rendered, slots_before));
    Ok(Prepared {
        name: name.to_string(),
        target: target.clone(),
        before: fleet::live_revision(&live),
        plan,
        live,
        acme_requests: crate::acme::requests(model),
        git_commit: None,
    })
}

/// Plans files already rendered (a history entry, for a rollback) from the model they record.
pub fn prepare_files(
    model: &Model,
    name: &str,
    target: &Target,
    files: Files,
) -> Result<Prepared, PipelineError> {
    let options = target::render_options(target);
    let live = target::observe_files(name, target, &options, &files)?;
    let plan = plan::plan_files(name, model, files, &options, &live);
    Ok(Prepared {
        name: name.to_string(),
        target: target.clone(),
        before: fleet::live_revision(&live),
        plan,
        live,
        acme_requests: Vec::new(),
        git_commit: None,
    })
}

/// A plan saved earlier (`plan --out`): its files, decided again against what the target holds
/// now — the same answer as when it was saved, since the apply refuses a target that changed
/// since (its fingerprint).
pub fn decide_saved(
    name: &str,
    target: &Target,
    options: &RenderOptions,
    files: &Files,
) -> Result<plan::ops::Execution, PipelineError> {
    let live = target::observe_files(name, target, options, files)?;
    Ok(plan::decide(&live, files, options))
}

/// What the target is asked to do: the plan's files and its execution.
pub fn request(p: &Prepared, rollback_of: Option<u64>, retry_conflicts: bool) -> ApplyRequest {
    ApplyRequest {
        target_name: p.name.clone(),
        files: p.plan.new_files.clone(),
        options: p.plan.options.clone(),
        execution: p.plan.execution.clone(),
        expected_fingerprint: Some(p.plan.live_fingerprint.clone()),
        changes: p.plan.changes.iter().map(|c| c.summary()).collect(),
        rollback_of,
        retry_conflicts,
        git_commit: p.git_commit.clone(),
    }
}

/// The target executes the plan. `start` starts a `spawn: true` HAProxy that is not running
/// (the daemon supervises it; otherwise it is started in the background).
pub fn apply(
    p: &Prepared,
    rollback_of: Option<u64>,
    retry_conflicts: bool,
    start: Option<Starter<'_>>,
) -> Result<Applied, ApplyError> {
    let request = request(p, rollback_of, retry_conflicts);
    match (&p.target, start) {
        (Target::Haproxy(t), Some(start)) if !target::interrupted() => {
            haproxy::apply_with(t, &request, start)
        }
        _ => target::apply(&p.target, &request),
    }
}
