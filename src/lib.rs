//! lunafront: a declarative front server for HAProxy.
//!
//! The pipeline runs in one direction:
//! `spec::load` (YAML, positions) → `model::validate` (the only constructor of a `Model`) →
//! `render` (templates → haproxy.cfg, maps, certificates) → `plan` (what changes, and the
//! runtime operations or the reload that make it live) → `target` (the I/O edge that observes
//! and executes the plan). `pipeline` runs the steps after validation in that order for every
//! caller (CLI, rollback, daemon, API). `daemon` keeps a target converged; `git` lets a fleet
//! of daemons follow one repository.

pub mod acme;
pub mod allocator;
pub mod api;
pub mod clock;
pub mod daemon;
pub mod git;
pub mod import;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod render;
pub mod spec;
pub mod target;
#[cfg(test)]
mod test_rng;

/// The package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`unknown` outside git and release tarballs).
pub const GIT_COMMIT: &str = env!("LUNAFRONT_GIT_COMMIT");
/// What `lunafront --version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LUNAFRONT_GIT_COMMIT"),
    ")"
);
