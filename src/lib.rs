//! lunafront: a declarative front server for HAProxy.
//!
//! The pipeline runs in one direction:
//! `spec::load` (YAML, positions) → `model::validate` (the only constructor of a `Model`) →
//! `render` (templates → haproxy.cfg, maps, certificates) → `plan` (what changes, runtime or
//! reload) → `target` (the I/O edge that observes and applies).

pub mod acme;
pub mod api;
pub mod clock;
pub mod daemon;
pub mod model;
pub mod plan;
pub mod render;
pub mod spec;
pub mod target;
