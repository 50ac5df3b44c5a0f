//! The `haproxy` target: a local HAProxy whose configuration, maps and certificates live in
//! the folder of its haproxy.cfg.

use super::{TargetError, files};
use crate::model::HaproxyTarget;
use crate::plan::Live;
use crate::render::Rendered;
use std::path::Path;

/// The folder holding haproxy.cfg and, beside it, the maps and certificates.
pub fn config_dir(target: &HaproxyTarget) -> &Path {
    target.config.parent().unwrap_or(Path::new("."))
}

pub fn observe(target: &HaproxyTarget, rendered: &Rendered) -> Result<Live, TargetError> {
    Ok(files::observe_dir(config_dir(target), rendered)?)
}
