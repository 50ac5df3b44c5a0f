//! The validated desired state (`Model`), the grammar of its names, and `validate`, the only
//! way to build one.

pub mod address;
pub mod certs;
pub mod isolate;
#[allow(clippy::module_inception)]
mod model;
pub mod names;
pub mod validate;

pub use model::*;
pub use validate::{Validation, validate, validate_targets};
