//! The user's side of the pipeline: loading YAML state files (with positions), the embedded
//! JSON Schema, and the diagnostics every later stage reports through.

pub mod diagnostics;
pub mod load;
pub mod schema;
pub mod spans;
