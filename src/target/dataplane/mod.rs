//! The `dataplane` target: an HAProxy managed through its Data Plane API (I/O edge). Planned
//! against the raw configuration it serves (with its version) and the map files in its storage;
//! applied by pushing the whole configuration in one request — validated first with
//! `only_validate` — and waiting for the reload, or, when the plan says runtime, through the
//! runtime map endpoints with no reload. On a 409 it re-reads and retries (a bounded number of times);
//! a failed reload is undone by pushing the previous configuration back. Certificates and
//! crt-lists go to the API's SSL storage; a change of certificates alone is applied through
//! its runtime SSL endpoints (no reload).

pub mod client;

use super::apply::{Applied, ApplyError, ApplyRequest, How};
use super::files::{Files, Recorded, recorded_from_text};
use super::history::History;
use crate::model::DataplaneTarget;
use crate::plan::Live;
use crate::plan::ops::{Execution, Op, map_entry_ops};
use crate::render::{MANIFEST, RenderOptions, readback};
use client::{Client, DpError};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// Conflicting writers make an apply re-read and retry at most this many times.
const CONFLICT_RETRIES: usize = 3;

fn map_name<'a>(options: &RenderOptions, path: &'a str) -> Option<&'a str> {
    path.strip_prefix(&format!("{}/", options.maps_dir))
        .filter(|n| n.ends_with(".map") && !n.contains('/'))
}

/// A file of the API's SSL storage: (storage kind, name) of a certificate or a crt-list.
fn ssl_name<'a>(options: &RenderOptions, path: &'a str) -> Option<(&'static str, &'a str)> {
    let name = path
        .strip_prefix(&format!("{}/", options.certs_dir))
        .filter(|n| !n.contains('/'))?;
    if name.ends_with(".crt-list") {
        Some(("ssl_crt_lists", name))
    } else if name.ends_with(".pem") {
        Some(("ssl_certificates", name))
    } else {
        None
    }
}

/// SHA-256 of the first certificate of a PEM file, as hex: what the API reports of a
/// certificate it stores.
fn fingerprint(pem: &[u8]) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    Some(crate::plan::sha256_hex(&der))
}

/// Stands for a certificate the API holds that is not the one expected: the API gives the
/// file back to no one, so only its fingerprint is known.
fn held_elsewhere(meta: &serde_json::Value) -> Vec<u8> {
    format!(
        "# a certificate held by the Data Plane API, sha256 fingerprint {}\n",
        meta.get("sha256_finger_print")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown")
    )
    .into_bytes()
}

/// What the API holds for the files of `expected` (and what the last apply recorded).
/// Certificates are never read back: the target holds the expected one when the API's
/// fingerprint is that certificate's and the last apply recorded writing exactly that file.
pub fn observe(
    client: &Client,
    options: &RenderOptions,
    expected: &Files,
) -> Result<Live, DpError> {
    let wanted = expected.keys().cloned();
    let (config, version) = client.get_raw()?;
    let mut files = Files::new();
    files.insert(options.config_name.clone(), config.into_bytes());
    let manifest = client.general_get(MANIFEST)?;
    let (recorded, previous_error) = match &manifest {
        Some(bytes) => match recorded_from_text(
            &String::from_utf8_lossy(bytes),
            Path::new(&format!("{}:{MANIFEST}", client.target)),
        ) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    if let Some(bytes) = manifest {
        files.insert(MANIFEST.to_string(), bytes);
    }
    let mut paths: BTreeSet<String> = wanted.into_iter().collect();
    if let Some(r) = &recorded {
        paths.extend(r.files.keys().cloned());
    }
    for path in &paths {
        if let Some(name) = map_name(options, path)
            && let Some(bytes) = client.map_get(name)?
        {
            files.insert(path.clone(), bytes);
        }
        match ssl_name(options, path) {
            Some(("ssl_crt_lists", name)) => {
                if let Some(bytes) = client.crt_list_get(name)? {
                    files.insert(path.clone(), bytes);
                }
            }
            Some((_, name)) => {
                if let Some(meta) = client.cert_meta(name)? {
                    let held = expected.get(path).filter(|bytes| {
                        let recorded = recorded
                            .as_ref()
                            .and_then(|r| r.files.get(path))
                            .is_some_and(|d| *d == crate::plan::sha256_hex(bytes));
                        let same = fingerprint(bytes).is_some_and(|f| {
                            meta.get("sha256_finger_print")
                                .and_then(serde_json::Value::as_str)
                                .is_some_and(|m| m.eq_ignore_ascii_case(&f))
                        });
                        recorded && same
                    });
                    files.insert(
                        path.clone(),
                        held.cloned().unwrap_or_else(|| held_elsewhere(&meta)),
                    );
                }
            }
            None => {}
        }
    }
    let (previous, recorded_files) = match recorded {
        Some(Recorded { model, files }) => (Some(model), files),
        None => (None, Default::default()),
    };
    Ok(Live {
        files,
        previous,
        recorded_files,
        previous_error,
        version: Some(version),
        interrupted: None,
    })
}

pub fn apply(target: &DataplaneTarget, request: &ApplyRequest) -> Result<Applied, ApplyError> {
    let name = request.target_name.as_str();
    let prepare = |detail: String| ApplyError::Prepare {
        target: name.to_string(),
        detail,
    };
    let client = Client::new(name, target).map_err(prepare)?;
    let options = &request.options;
    if let Some(cert) = request.files.keys().find(|p| {
        p.starts_with(&format!("{}/", options.certs_dir)) && ssl_name(options, p).is_none()
    }) {
        return Err(prepare(format!(
            "{cert}: the Data Plane API's SSL storage holds files directly in {}",
            options.certs_dir
        )));
    }
    let mut notes = Vec::new();
    for attempt in 1..=CONFLICT_RETRIES {
        let live = observe(&client, options, &request.files).map_err(|e| prepare(e.to_string()))?;
        let stale = request
            .expected_fingerprint
            .as_ref()
            .is_some_and(|expected| *expected != live.fingerprint());
        if attempt == 1 && stale {
            // A saved plan was reviewed against what the target held: refuse. A fresh one is
            // the same desired state: plan again against what it holds now.
            if !request.retry_conflicts {
                return Err(ApplyError::Stale {
                    target: name.to_string(),
                });
            }
            notes.push(format!(
                "target {name} changed since the plan was made (now at version {}); planned again against what it holds now",
                live.version.unwrap_or_default()
            ));
        }
        if live.files == request.files {
            return Ok(Applied {
                how: How::Unchanged,
                seq: None,
                notes,
                unrecorded: None,
            });
        }
        let version = live.version.expect("the API versions its configuration");
        // What the plan decided, or, when the target changed since, the same decision made
        // again against what it holds now.
        let execution = match stale {
            false => request.execution.clone(),
            true => crate::plan::decide(&live, &request.files, options),
        };
        let result = if let Err(e) = upload_ssl(&client, options, &live.files, &request.files) {
            Err(Failure::from(e))
        } else if let Execution::Runtime { ops } = &execution {
            certs_at_runtime(&client, ops)
                .and_then(|certs| {
                    maps_at_runtime(&client, options, &live.files, &request.files)
                        .map(|maps| certs + maps)
                })
                .map(|commands| How::Runtime { commands })
        } else {
            push(
                &client,
                target,
                options,
                &live.files,
                &request.files,
                version,
            )
        };
        match result {
            Ok(how) => {
                for path in live
                    .files
                    .keys()
                    .filter(|p| !request.files.contains_key(*p))
                {
                    if let Some(map) = map_name(options, path)
                        && let Err(e) = client.map_delete(map)
                    {
                        notes.push(format!(
                            "a map file no longer used stays on the target: {e}"
                        ));
                    }
                    if let Some((kind, name)) = ssl_name(options, path)
                        && let Err(e) = client.ssl_delete(kind, name)
                    {
                        notes.push(format!(
                            "a certificate file no longer used stays on the target: {e}"
                        ));
                    }
                }
                if let Err(e) = client.general_put(MANIFEST, &request.files[MANIFEST]) {
                    notes.push(format!(
                        "the applied state could not be recorded on the target ({e}): its next plan will show every change again"
                    ));
                }
                let (seq, unrecorded) = match History::new(&target.state_dir).record_applied(
                    request,
                    &how,
                    target.history,
                ) {
                    Ok(seq) => (Some(seq), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                return Ok(Applied {
                    how,
                    seq,
                    notes,
                    unrecorded,
                });
            }
            Err(Failure::Conflict) if request.retry_conflicts && attempt < CONFLICT_RETRIES => {
                notes.push(format!(
                    "someone else changed target {name}'s configuration meanwhile (409, attempt {attempt} of {CONFLICT_RETRIES}); read it again and retried"
                ));
                tracing::warn!("target {name}: version conflict (attempt {attempt}); re-reading");
                std::thread::sleep(std::time::Duration::from_millis(100 * attempt as u64));
            }
            Err(Failure::Conflict) if request.retry_conflicts => break,
            Err(Failure::Conflict) => {
                return Err(ApplyError::Stale {
                    target: name.to_string(),
                });
            }
            Err(other) => return Err(other.into_error(name)),
        }
    }
    Err(prepare(format!(
        "someone else kept changing the configuration: {CONFLICT_RETRIES} version conflicts (409) in a row; the target keeps the configuration it had"
    )))
}

/// How a push went wrong, before it is named after its target.
enum Failure {
    /// Someone else changed the configuration (409).
    Conflict,
    /// Nothing was changed on the target.
    Untouched(String),
    /// HAProxy (the API's validation) refused the configuration.
    Refused(String),
    /// The target was put back on its previous configuration.
    RolledBack(String),
    RollbackFailed(String, String),
}

impl Failure {
    fn into_error(self, target: &str) -> ApplyError {
        let target = target.to_string();
        match self {
            Failure::Conflict => ApplyError::Stale { target },
            Failure::Untouched(detail) => ApplyError::Prepare { target, detail },
            Failure::Refused(detail) => ApplyError::Refused { target, detail },
            Failure::RolledBack(reason) => ApplyError::RolledBack { target, reason },
            Failure::RollbackFailed(reason, rollback) => ApplyError::RollbackFailed {
                target,
                reason,
                rollback,
            },
        }
    }
}

impl From<DpError> for Failure {
    /// An error before anything was changed.
    fn from(e: DpError) -> Failure {
        match e {
            DpError::Conflict { .. } => Failure::Conflict,
            other => Failure::Untouched(other.to_string()),
        }
    }
}

/// Writes the certificates and crt-lists that are new or changed to the SSL storage (no
/// reload): a configuration naming them validates, and a reload or the runtime endpoints then
/// load them. The previous certificate of a renewed name is not kept to put back: the new one
/// is as good for the configuration that names it.
fn upload_ssl(
    client: &Client,
    options: &RenderOptions,
    old: &Files,
    new: &Files,
) -> Result<(), DpError> {
    // Certificates before the crt-lists that list them.
    let mut changed: Vec<(&'static str, &str, &Vec<u8>)> = new
        .iter()
        .filter(|(p, b)| old.get(*p) != Some(*b))
        .filter_map(|(p, b)| ssl_name(options, p).map(|(kind, name)| (kind, name, b)))
        .collect();
    changed.sort_by_key(|(kind, ..)| *kind == "ssl_crt_lists");
    for (kind, name, bytes) in changed {
        match kind {
            "ssl_crt_lists" => client.crt_list_put(name, bytes)?,
            _ => client.cert_put(name, bytes)?,
        }
    }
    Ok(())
}

/// The plan's certificate operations (the configuration is unchanged), through the runtime SSL
/// endpoints, as `haproxy` targets do through the runtime API.
fn certs_at_runtime(client: &Client, ops: &[Op]) -> Result<usize, Failure> {
    let mut commands = 0;
    for op in ops {
        match op {
            Op::CertNew { cert, pem } => client.runtime_cert_new(cert, pem)?,
            Op::CertUpdate { cert, pem } => client.runtime_cert_replace(cert, pem)?,
            Op::CrtListAdd { list, cert } => client.runtime_crt_list_add(list, cert)?,
            Op::CrtListDel { list, cert } => client.runtime_crt_list_del(list, cert)?,
            Op::CertDel { cert } => client.runtime_cert_delete(cert)?,
            // Maps: `maps_at_runtime`; the plan gives this target no server operation
            // (`RenderOptions::runtime_servers`).
            _ => continue,
        }
        commands += 1;
    }
    Ok(commands)
}

/// The plan's map changes: write the files (no reload) and change HAProxy's maps through the
/// runtime endpoints, entry by entry, re-based on the entries HAProxy holds now (the API has no
/// atomic replacement: a replacement goes entry by entry too).
fn maps_at_runtime(
    client: &Client,
    options: &RenderOptions,
    old: &Files,
    new: &Files,
) -> Result<usize, Failure> {
    let mut commands = 0;
    for (path, bytes) in new {
        let Some(name) = map_name(options, path) else {
            continue;
        };
        if old.get(path) == Some(bytes) {
            continue;
        }
        client.map_put(name, bytes)?;
        let current = client.runtime_entries(name)?;
        let wanted = readback::parse_map(&String::from_utf8_lossy(bytes));
        for op in map_entry_ops(name, &current, &wanted) {
            match &op {
                Op::MapAdd { key, value, .. } => client.runtime_add(name, key, value)?,
                Op::MapSet { key, value, .. } => client.runtime_set(name, key, value)?,
                Op::MapDel { key, .. } => client.runtime_del(name, key)?,
                _ => unreachable!("entry operations only"),
            }
            commands += 1;
        }
    }
    Ok(commands)
}

/// The configuration changed: validate, push, wait for the reload; undo on failure.
fn push(
    client: &Client,
    target: &DataplaneTarget,
    options: &RenderOptions,
    old: &Files,
    new: &Files,
    version: u64,
) -> Result<How, Failure> {
    let config = String::from_utf8_lossy(&new[&options.config_name]).into_owned();
    let previous = String::from_utf8_lossy(&old[&options.config_name]).into_owned();
    let reload_timeout = target.timeout.as_std().max(Duration::from_secs(30));
    let maps: Vec<(&str, &Vec<u8>)> = new
        .iter()
        .filter_map(|(p, b)| map_name(options, p).map(|n| (n, b)))
        .collect();
    let in_use = |name: &str| old.keys().any(|p| map_name(options, p) == Some(name));
    // Maps the running configuration does not use yet are written first: validation needs them.
    for (name, bytes) in maps.iter().filter(|(n, _)| !in_use(n)) {
        client.map_put(name, bytes)?;
    }
    if let Err(e) = client.push_raw(&config, version, true) {
        return Err(match e {
            DpError::Status { status, body, .. } if (400..500).contains(&status) => {
                Failure::Refused(body)
            }
            other => other.into(),
        });
    }
    // Maps the running configuration uses change only now, right before the push.
    let changed: Vec<(&str, &Vec<u8>)> = maps
        .iter()
        .filter(|(n, b)| in_use(n) && old.get(&options.map_ref(n)) != Some(*b))
        .cloned()
        .collect();
    let restore_maps = || -> Result<(), DpError> {
        for (name, _) in &changed {
            if let Some(bytes) = old.get(&options.map_ref(name)) {
                client.map_put(name, bytes)?;
            }
        }
        Ok(())
    };
    // Puts the previous configuration back (and its maps), whatever the push left.
    let undo = |reason: String| -> Failure {
        let undone = (|| -> Result<(), DpError> {
            restore_maps()?;
            let (live, current) = client.get_raw()?;
            if live != previous {
                let pushed = client.push_raw(&previous, current, false)?;
                if let (202, Some(id)) = (pushed.status, pushed.reload_id) {
                    client.wait_reload(&id, reload_timeout)?;
                }
            }
            Ok(())
        })();
        match undone {
            Ok(()) => Failure::RolledBack(reason),
            Err(e) => Failure::RollbackFailed(reason, e.to_string()),
        }
    };
    for (name, bytes) in &changed {
        if let Err(e) = client.map_put(name, bytes) {
            return Err(undo(e.to_string()));
        }
    }
    let pushed = match client.push_raw(&config, version, false) {
        Ok(p) => p,
        Err(DpError::Conflict { .. }) => {
            // Nothing was pushed; the maps go back before the caller re-reads.
            return Err(match restore_maps() {
                Ok(()) => Failure::Conflict,
                Err(e) => Failure::RollbackFailed("version conflict (409)".into(), e.to_string()),
            });
        }
        // A timeout or a 5xx may or may not have landed: undo reads what the API holds.
        Err(e) => return Err(undo(e.to_string())),
    };
    let Some(id) = pushed.reload_id.clone().filter(|_| pushed.status == 202) else {
        return Ok(How::RemoteReload { reload_id: None });
    };
    match client.wait_reload(&id, reload_timeout) {
        Ok(()) => Ok(How::RemoteReload {
            reload_id: Some(id),
        }),
        Err(e) => Err(undo(e.to_string())),
    }
}
