//! A fleet (I/O edge): several targets kept identical. Names on the command line may be targets
//! or groups; the first target is the canary. A revision names a desired state (the digest of
//! its document), the same whatever the target's type, so a report can say which target holds
//! which.

use super::TargetError;
use crate::model::{CanaryCheck, Model, Target};
use crate::plan::Live;
use crate::render::MANIFEST;
use std::time::{Duration, Instant};

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
    let manifest: serde_json::Value = serde_json::from_slice(live.files.get(MANIFEST)?).ok()?;
    Some(revision_of(
        &serde_json::to_string(manifest.get("document")?).ok()?,
    ))
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
