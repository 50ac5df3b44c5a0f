//! The daemon's status page (I/O edge): `GET /` is one server-rendered HTML page for an
//! operator — the applied revision, every domain with its backend, agent and live server state
//! (from HAProxy's runtime API), the agents, the last reconciles, a held change, the last error
//! with its file:line diagnostics, the certificates HAProxy serves with their expiry, and for a
//! daemon following git or driving a fleet, the commits and each target's last rollout. No
//! script, no external asset: it works from a phone on a terminal's browser alike.
//! `collect` reads (the recorded state, the runtime API, the certificate files); `render` is pure.

use super::reconcile::Status;
use crate::model::{HaproxyTarget, Model, ServerTarget};
use crate::render::layout;
use crate::target::haproxy::socket::{Expect, RuntimeApi};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Everything the page shows, gathered at one moment.
#[derive(Debug, Default, Serialize)]
pub struct Page {
    pub target: String,
    pub state: String,
    pub now: String,
    pub status: serde_json::Value,
    pub haproxy_answers: bool,
    /// Why the applied state or HAProxy's servers could not be read, if they could not.
    pub problems: Vec<String>,
    pub domains: Vec<DomainRow>,
    pub agents: Vec<AgentRow>,
    pub certificates: Vec<CertificateRow>,
    pub recent: Vec<serde_json::Value>,
    /// The last error's diagnostics as `file:line:col: error[code]: message` lines.
    pub error_lines: Vec<String>,
    pub acme: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct DomainRow {
    pub domain: String,
    pub listener: String,
    pub backend: String,
    pub agents: String,
    /// Each server as `name: STATUS` (HAProxy's `show stat` status: UP, DOWN, MAINT, no check).
    pub servers: Vec<ServerCell>,
}

#[derive(Debug, Serialize)]
pub struct ServerCell {
    pub name: String,
    pub status: String,
    /// up, down, maint or unknown: the cell's colour.
    pub class: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AgentRow {
    pub name: String,
    pub address: String,
    pub maintenance: bool,
    pub domains: usize,
}

#[derive(Debug, Serialize)]
pub struct CertificateRow {
    pub file: String,
    pub names: String,
    pub not_after: String,
    pub days_left: i64,
    /// ok, soon (within 30 days) or expired.
    pub class: &'static str,
}

/// Reads what the page shows. Never fails: what cannot be read is listed in `problems`.
/// `target` is the local HAProxy, when the daemon runs one (a daemon driving a group or a
/// Data Plane API target shows each target's last rollout instead).
pub fn collect(
    target: Option<&HaproxyTarget>,
    status: &Status,
    acme: Option<serde_json::Value>,
) -> Page {
    let mut page = Page {
        target: status.target.clone(),
        state: status.state.clone(),
        now: crate::clock::rfc3339_now(),
        status: serde_json::to_value(status).unwrap_or_default(),
        recent: status
            .recent
            .iter()
            .map(|o| serde_json::to_value(o).unwrap_or_default())
            .collect(),
        error_lines: status
            .last_error
            .iter()
            .flat_map(|o| o.diagnostics.iter().map(|d| d.to_string()))
            .collect(),
        acme,
        ..Page::default()
    };
    let Some(target) = target else {
        return page;
    };
    let config_dir = crate::target::haproxy::config_dir(target);
    let recorded = match crate::target::files::read_recorded(config_dir) {
        Ok(Some(r)) => Some(r),
        Ok(None) => {
            page.problems
                .push("nothing applied yet: no recorded state beside the configuration".into());
            None
        }
        Err(e) => {
            page.problems
                .push(format!("the recorded state cannot be read: {e}"));
            None
        }
    };
    let api = RuntimeApi::new(&target.runtime_socket);
    let stats = match api.run("show stat", Expect::Any) {
        Ok(text) => {
            page.haproxy_answers = true;
            parse_stat(&text)
        }
        Err(e) => {
            page.problems
                .push(format!("HAProxy's runtime API does not answer: {e}"));
            BTreeMap::new()
        }
    };
    if let Some(recorded) = recorded {
        let config = std::fs::read_to_string(&target.config).unwrap_or_default();
        let slots = crate::render::readback::slot_pools(&config);
        page.domains = domain_rows(&recorded.model, &slots, &stats);
        page.agents = agent_rows(&recorded.model);
        let mut pems: Vec<&String> = recorded
            .files
            .keys()
            .filter(|p| p.ends_with(".pem"))
            .collect();
        pems.sort();
        let now = crate::clock::unix_now() as i64;
        page.certificates = pems
            .into_iter()
            .filter_map(|p| certificate_row(config_dir, p, now))
            .collect();
    }
    page
}

/// `show stat` as (proxy, server) → status.
fn parse_stat(text: &str) -> BTreeMap<(String, String), String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        return BTreeMap::new();
    };
    lines
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let (px, sv, st) = (f.get(px)?, f.get(sv)?, f.get(st)?);
            Some(((px.to_string(), sv.to_string()), st.to_string()))
        })
        .collect()
}

fn cell(name: String, status: Option<&String>) -> ServerCell {
    let status = status.cloned().unwrap_or_else(|| "not in HAProxy".into());
    let class = match status.as_str() {
        s if s.starts_with("UP") || s == "no check" || s == "OPEN" => "up",
        s if s.starts_with("DOWN") || s.starts_with("NOLB") => "down",
        s if s.starts_with("MAINT") || s.starts_with("DRAIN") => "maint",
        _ => "unknown",
    };
    ServerCell {
        name,
        status,
        class,
    }
}

fn domain_rows(
    model: &Model,
    slots: &layout::SlotPools,
    stats: &BTreeMap<(String, String), String>,
) -> Vec<DomainRow> {
    model
        .domains
        .iter()
        .map(|(domain, d)| {
            let backend = model.backends.get(&d.backend);
            let mut agents: Vec<String> = backend
                .map(|b| {
                    b.servers
                        .iter()
                        .map(|s| match &s.target {
                            ServerTarget::Agent(a) => a.clone(),
                            ServerTarget::Address(ip) => ip.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            agents.sort();
            agents.dedup();
            // An app is a server named after it in a slot backend; other backends are HAProxy
            // backends of their own name.
            let servers = match backend {
                Some(b) if layout::is_app(b) => {
                    let slot = slots.slot_of(&d.backend, b.mode);
                    let status = slot.and_then(|slot| stats.get(&(slot, d.backend.clone())));
                    vec![cell(d.backend.clone(), status)]
                }
                Some(b) => b
                    .servers
                    .iter()
                    .map(|s| {
                        let status = stats.get(&(d.backend.clone(), s.name.clone()));
                        cell(s.name.clone(), status)
                    })
                    .collect(),
                None => Vec::new(),
            };
            DomainRow {
                domain: domain.clone(),
                listener: d
                    .listener
                    .clone()
                    .unwrap_or_else(|| "every HTTP listener".into()),
                backend: d.backend.clone(),
                agents: agents.join(", "),
                servers,
            }
        })
        .collect()
}

fn agent_rows(model: &Model) -> Vec<AgentRow> {
    model
        .agents
        .iter()
        .map(|(name, a)| AgentRow {
            name: name.clone(),
            address: a.address.to_string(),
            maintenance: a.maintenance,
            domains: model
                .domains
                .values()
                .filter(|d| {
                    model.backends.get(&d.backend).is_some_and(|b| {
                        b.servers
                            .iter()
                            .any(|s| s.target == ServerTarget::Agent(name.clone()))
                    })
                })
                .count(),
        })
        .collect()
}

/// The served certificate of a PEM file beside the configuration: its names and expiry.
fn certificate_row(config_dir: &Path, file: &str, now: i64) -> Option<CertificateRow> {
    let bytes = std::fs::read(config_dir.join(file)).ok()?;
    let block = x509_parser::pem::Pem::iter_from_buffer(&bytes)
        .filter_map(Result::ok)
        .find(|b| b.label == "CERTIFICATE")?;
    let cert = block.parse_x509().ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.push(cert.subject().to_string());
    }
    let days_left = (not_after - now).div_euclid(86_400);
    Some(CertificateRow {
        file: file.to_string(),
        names: names.join(", "),
        not_after: crate::clock::rfc3339(not_after),
        days_left,
        class: if not_after < now {
            "expired"
        } else if not_after - now < crate::model::certs::EXPIRY_WARNING_SECS {
            "soon"
        } else {
            "ok"
        },
    })
}

/// The page as HTML (every value escaped by the template engine).
pub fn render(page: &Page) -> String {
    let mut env = minijinja::Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("status.html", include_str!("../../templates/status.html"))
        .expect("the status page template parses");
    env.get_template("status.html")
        .and_then(|t| t.render(minijinja::context! { page => minijinja::Value::from(minijinja::value::Serde(page)) }))
        .unwrap_or_else(|e| format!("status page: {e}"))
}
