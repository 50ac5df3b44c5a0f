//! A fleet (I/O edge): several targets kept identical. Names on the command line may be targets
//! or groups; the first target is the canary. A revision names a desired state (the digest of
//! its document), the same whatever the target's type, so a report can say which target holds
//! which. `roll_out` is the one rollout (canary, health check, then the rest) that `apply` and
//! the daemon share.

use super::{Applied, ApplyError, TargetError};
use crate::model::{CanaryCheck, Model, Target};
use crate::plan::Live;
use crate::render::MANIFEST;
use std::time::{Duration, Instant};

pub use crate::pipeline::{PipelineError as PrepareError, Prepared, prepare};

/// Applies one target's plan (`pipeline::apply`). `rollback_of` marks a rollback in the
/// history; `saved`, a plan reviewed earlier (refused as stale rather than planned again when
/// the target changed).
pub fn apply_one(
    p: &Prepared,
    rollback_of: Option<u64>,
    saved: bool,
) -> Result<Applied, ApplyError> {
    crate::pipeline::apply(p, rollback_of, !saved, None)
}

/// A spawned HAProxy that is not running must be started even when the files match.
pub fn must_start(target: &Target) -> bool {
    matches!(target, Target::Haproxy(t) if t.spawn && super::haproxy::process::running(t).is_none())
}

/// What a rollout did to one target.
pub enum RollOutcome {
    Applied(Applied),
    Failed(ApplyError),
    /// The canary's health check failed after its apply.
    Unhealthy(String),
    NotStarted,
}

/// What a rollout tells as it goes.
pub enum RollEvent<'a> {
    Applied(&'a str, &'a Applied),
    /// The canary answered its health check (at this URL).
    CanaryHealthy(&'a str, &'a str),
}

/// Canary first (applied, then its health URL must answer 2xx), then the rest `parallel` at a
/// time; the first failure stops the rollout (and so does an interrupt).
pub fn roll_out(
    prepared: &[Prepared],
    parallel: usize,
    events: &(dyn Fn(RollEvent<'_>) + Sync),
) -> Vec<RollOutcome> {
    let mut outcomes: Vec<RollOutcome> = prepared.iter().map(|_| RollOutcome::NotStarted).collect();
    let Some(canary) = prepared.first() else {
        return outcomes;
    };
    outcomes[0] = match apply_one(canary, None, false) {
        Ok(applied) => {
            events(RollEvent::Applied(&canary.name, &applied));
            match &canary.target.fleet().health_check {
                Some(check) => match check_health(check) {
                    Ok(()) => {
                        events(RollEvent::CanaryHealthy(&canary.name, &check.url));
                        RollOutcome::Applied(applied)
                    }
                    Err(e) => RollOutcome::Unhealthy(e),
                },
                None => RollOutcome::Applied(applied),
            }
        }
        Err(e) => RollOutcome::Failed(e),
    };
    let mut stopped = !matches!(outcomes[0], RollOutcome::Applied(_));
    let rest: Vec<usize> = (1..prepared.len()).collect();
    for chunk in rest.chunks(parallel.max(1)) {
        if stopped || super::interrupted() {
            break;
        }
        let results: Vec<(usize, Result<Applied, ApplyError>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| (i, scope.spawn(move || apply_one(&prepared[i], None, false))))
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| (i, h.join().expect("apply thread")))
                .collect()
        });
        for (i, result) in results {
            outcomes[i] = match result {
                Ok(applied) => {
                    events(RollEvent::Applied(&prepared[i].name, &applied));
                    RollOutcome::Applied(applied)
                }
                Err(e) => {
                    stopped = true;
                    RollOutcome::Failed(e)
                }
            };
        }
    }
    outcomes
}

/// The targets `names` designate (groups expanded, in order, each once); without names, the
/// state's only target.
pub fn resolve<'m>(
    model: &'m Model,
    names: &[String],
) -> Result<Vec<(String, &'m Target)>, TargetError> {
    if names.is_empty() {
        return super::select(model, None).map(|t| vec![t]);
    }
    let mut out: Vec<(String, &Target)> = Vec::new();
    for name in names {
        let members: Vec<String> = match model.groups.get(name) {
            Some(group) => group.clone(),
            None => vec![name.clone()],
        };
        for member in members {
            let (member, target) = super::select(model, Some(&member))?;
            if !out.iter().any(|(n, _)| *n == member) {
                out.push((member, target));
            }
        }
    }
    Ok(out)
}

/// The revision of a state document: 12 hex digits of its digest.
/// `document_json` is its compact JSON, as `serde_json` writes it (keys sorted).
pub fn revision_of(document_json: &str) -> String {
    crate::plan::sha256_hex(document_json.as_bytes())[..12].to_string()
}

/// The revision a target holds (from the manifest the last apply left), if any.
pub fn live_revision(live: &Live) -> Option<String> {
    // Only the document, as written (compact JSON, keys in order): the rest is skipped.
    #[derive(serde::Deserialize)]
    struct Manifest<'a> {
        #[serde(borrow)]
        document: &'a serde_json::value::RawValue,
    }
    let manifest: Manifest = serde_json::from_slice(live.files.get(MANIFEST)?).ok()?;
    Some(revision_of(manifest.document.get()))
}

/// Waits until the canary check answers 2xx: a GET of its URL, with its Host header when set
/// (so one route is checked through this server's own address).
pub fn check_health(check: &CanaryCheck) -> Result<(), String> {
    let timeout = check.timeout.as_std();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let what = match &check.host {
        Some(host) => format!("{} (Host: {host})", check.url),
        None => check.url.clone(),
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut request = agent.get(&check.url);
        if let Some(host) = &check.host {
            request = request.header("Host", host);
        }
        match request.call() {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("{what} answered {}", r.status().as_u16()),
            Err(e) => last = format!("{what}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "the health check failed for {}s: {last}",
        timeout.as_secs()
    ))
}
