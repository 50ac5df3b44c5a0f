//! Targets: the I/O edge of the pipeline. A target observes what an HAProxy holds (`Live`) and
//! applies a rendering to it. `haproxy` is a local HAProxy (files, master CLI, runtime socket).

pub mod apply;
pub mod dataplane;
pub mod files;
pub mod fleet;
pub mod haproxy;
pub mod history;

pub use apply::{Applied, ApplyError, ApplyRequest, How};

use crate::model::{Model, Target};
use crate::plan::Live;
use crate::render::RenderOptions;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    Select(String),
    #[error("{0}")]
    Remote(String),
    #[error(transparent)]
    Files(#[from] files::FileError),
    #[error("target {target}: {message}")]
    Unsupported { target: String, message: String },
}

/// A target chosen from the state: by `--target NAME`, or the only one there is.
pub fn select<'m>(
    model: &'m Model,
    name: Option<&str>,
) -> Result<(String, &'m Target), TargetError> {
    match name {
        Some(name) => model.targets.get(name).map(|t| (name.to_string(), t)).ok_or_else(|| {
            let known: Vec<&str> = model.targets.keys().map(String::as_str).collect();
            TargetError::Select(format!(
                "no target named `{name}` in the state (targets: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        }),
        None => match model.targets.len() {
            1 => {
                let (name, target) = model.targets.iter().next().expect("one target");
                Ok((name.clone(), target))
            }
            0 => Err(TargetError::Select(
                "the state has no `targets:`; add one, such as `targets: { local: { type: haproxy, config: /etc/haproxy/haproxy.cfg } }`".into(),
            )),
            _ => Err(TargetError::Select(format!(
                "the state has several targets ({}); choose one with --target",
                model.targets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        },
    }
}

pub fn render_options(target: &Target) -> RenderOptions {
    RenderOptions::for_target(Some(target))
}

/// Reads what the target holds now for these files (and those its last apply recorded).
pub fn observe_paths(
    name: &str,
    target: &Target,
    options: &RenderOptions,
    wanted: impl IntoIterator<Item = String>,
) -> Result<Live, TargetError> {
    let expected: files::Files = wanted.into_iter().map(|p| (p, Vec::new())).collect();
    observe_files(name, target, options, &expected)
}

/// Reads what the target holds now for the files of `expected` (and those its last apply
/// recorded). A target that cannot give some files back (a Data Plane API's certificates)
/// says whether it holds the expected ones.
pub fn observe_files(
    name: &str,
    target: &Target,
    options: &RenderOptions,
    expected: &files::Files,
) -> Result<Live, TargetError> {
    match target {
        Target::Haproxy(t) => Ok(haproxy::observe(t, expected.keys().cloned())?),
        Target::Dataplane(t) => {
            let client = dataplane::client::Client::new(name, t).map_err(TargetError::Remote)?;
            dataplane::observe(&client, options, expected)
                .map_err(|e| TargetError::Remote(e.to_string()))
        }
    }
}

/// Where a target's applied states are kept.
pub fn state_dir(target: &Target) -> &std::path::Path {
    match target {
        Target::Haproxy(t) => &t.state_dir,
        Target::Dataplane(t) => &t.state_dir,
    }
}

/// Set when the process was asked to stop (SIGINT, SIGTERM, SIGHUP: see `lunafront apply`):
/// an apply that has not reached its point of no return stops there with nothing changed,
/// one past it completes (a process killed in between is what the haproxy target's marker is
/// for).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks applies to stop at their next point of no return. Async-signal-safe (an atomic store).
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Applies to any target.
pub fn apply(target: &Target, request: &ApplyRequest) -> Result<Applied, ApplyError> {
    if interrupted() {
        return Err(ApplyError::Interrupted {
            target: request.target_name.clone(),
        });
    }
    match target {
        Target::Haproxy(t) => haproxy::apply(t, request),
        Target::Dataplane(t) => dataplane::apply(t, request),
    }
}
