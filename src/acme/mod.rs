//! Automatic certificates from an ACME CA (RFC 8555). This module is the pure part: which
//! domains of a model want a certificate, what a certificate covers, and how issued
//! certificates are named in the rendering. `store` keeps them in a target's state folder,
//! `issue` talks to the CA (instant-acme), `manager` runs issuance and renewal in the daemon.

pub mod challenge;
pub mod issue;
pub mod manager;
pub mod store;

use crate::model::{Model, Target, names};
use crate::spec::load::CertFile;
use std::collections::BTreeMap;

/// The map HTTP-01 challenges are answered from, as the configuration names it (beside
/// haproxy.cfg). Outside the maps folder on purpose: its entries live only in HAProxy's
/// memory while a challenge is pending, and the drift correction of route maps must not
/// remove them. The file itself stays empty.
pub const CHALLENGE_MAP: &str = "acme/challenges.map";

/// Where a listener's issued certificates and the default certificate are rendered, under
/// the certificates folder of the rendering.
pub const CERTS_SUBDIR: &str = "acme";

/// The path of challenge answers, excepted from redirects.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// A domain that gets its certificate from the CA, and the ACME listeners serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub listeners: Vec<String>,
    /// `*.parent`: validated through DNS-01.
    pub wildcard: bool,
}

/// Whether a listener of the model gets certificates from ACME.
pub fn uses_acme(model: &Model) -> bool {
    model.acme.is_some() && model.listeners.values().any(|l| l.acme && l.is_http())
}

/// The model as a target renders it: with the certificates its ACME store holds. ACME runs
/// in `lunafront daemon`, which drives `haproxy` targets: a `dataplane` target is refused.
pub fn for_target<'m>(
    model: &'m Model,
    target: &Target,
) -> Result<std::borrow::Cow<'m, Model>, String> {
    if !uses_acme(model) {
        return Ok(std::borrow::Cow::Borrowed(model));
    }
    match target {
        Target::Haproxy(t) => store::Store::new(&t.state_dir)
            .overlay(model.clone())
            .map(std::borrow::Cow::Owned)
            .map_err(|e| e.to_string()),
        Target::Dataplane(_) => Err(
            "listeners with `acme: true` get their certificates from `lunafront daemon`, which drives haproxy targets; a dataplane target terminates TLS with `certificates` folders".into(),
        ),
    }
}

/// The domains whose certificate the daemon will request (none issued yet), for `plan`.
pub fn requests(model: &Model) -> Vec<String> {
    wanted(model)
        .into_keys()
        .filter(|d| !model.issued.certs.contains_key(d))
        .collect()
}

/// Every domain served on a listener with `acme: true` that no file of the listener's
/// certificate folder covers, with the listeners that serve it.
pub fn wanted(model: &Model) -> BTreeMap<String, Wanted> {
    let mut out: BTreeMap<String, Wanted> = BTreeMap::new();
    if model.acme.is_none() {
        return out;
    }
    for (name, listener) in model
        .listeners
        .iter()
        .filter(|(_, l)| l.acme && l.is_http())
    {
        let files = listener
            .certificates()
            .map(|c| c.files.as_slice())
            .unwrap_or_default();
        for (host, domain) in &model.domains {
            let served = match &domain.listener {
                Some(l) => l == name,
                None => true,
            };
            if !served || covered_by_files(host, files) {
                continue;
            }
            let wildcard = names::is_wildcard(host);
            if wildcard && model.acme.as_ref().is_some_and(|a| a.dns_hook.is_none()) {
                continue; // refused by validation; never requested
            }
            out.entry(host.clone())
                .or_insert_with(|| Wanted {
                    listeners: Vec::new(),
                    wildcard,
                })
                .listeners
                .push(name.clone());
        }
    }
    out
}

/// Whether one of `files` (a listener's certificate folder) has a certificate for `host`.
/// A file known by its digest only (a recorded state, whose rules held when it was applied)
/// counts as covering: it cannot be read again.
pub fn covered_by_files(host: &str, files: &[CertFile]) -> bool {
    files.iter().any(|f| match &f.pem {
        Some(pem) => pem_names(pem).iter().any(|n| covers(n, host)),
        None => true,
    })
}

/// Whether a certificate name (`shop.example.com`, `*.example.com`) covers `host`. A wildcard
/// name covers one label; a wildcard host is covered by the same wildcard only.
pub fn covers(name: &str, host: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if name == host {
        return true;
    }
    match (name.strip_prefix("*."), host.split_once('.')) {
        (Some(parent), Some((label, rest))) => label != "*" && rest == parent,
        _ => false,
    }
}

/// The DNS names of the first certificate of a PEM file: its subject alternative names.
pub fn pem_names(pem: &[u8]) -> Vec<String> {
    let Some(der) = first_certificate(pem) else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                out.push(dns.to_string());
            }
        }
    }
    out
}

/// Validity of the first certificate of a PEM file: (not before, not after), seconds since
/// the epoch.
pub fn pem_validity(pem: &[u8]) -> Option<(i64, i64)> {
    let der = first_certificate(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

fn first_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

/// The file an issued certificate is rendered to, relative to the certificates folder. A
/// wildcard's `*` becomes `_wildcard` (no DNS name holds `_`, so names cannot collide).
pub fn cert_file(domain: &str) -> String {
    match domain.strip_prefix("*.") {
        Some(parent) => format!("{CERTS_SUBDIR}/_wildcard.{parent}.pem"),
        None => format!("{CERTS_SUBDIR}/{domain}.pem"),
    }
}

/// The default certificate's file, relative to the certificates folder.
pub fn fallback_file() -> String {
    format!("{CERTS_SUBDIR}/_default.pem")
}

/// The certificates an ACME listener lists after its folder's own: the default certificate
/// when it has no folder (HAProxy needs one to bind), then each issued certificate of a
/// domain it serves. (file name, certificate)
pub fn listener_certs<'m>(model: &'m Model, listener: &str) -> Vec<(String, &'m CertFile)> {
    let Some(l) = model.listeners.get(listener).filter(|l| l.acme) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if l.certificates().is_none()
        && let Some(fallback) = &model.issued.fallback
    {
        out.push((fallback_file(), fallback));
    }
    for (domain, want) in wanted(model) {
        if want.listeners.iter().any(|n| n == listener)
            && let Some(cert) = model.issued.certs.get(&domain)
        {
            out.push((cert_file(&domain), cert));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_name_covers_one_label_and_a_wildcard_host_only_itself() {
        assert!(covers("shop.example.com", "shop.example.com"));
        assert!(covers("*.example.com", "shop.example.com"));
        assert!(!covers("*.example.com", "a.shop.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(covers("*.example.com", "*.example.com"));
        assert!(!covers("shop.example.com", "*.example.com"));
        assert!(covers("Shop.Example.com", "shop.example.com"));
    }

    #[test]
    fn issued_files_are_named_after_their_domain_without_a_star() {
        assert_eq!(cert_file("shop.example.com"), "acme/shop.example.com.pem");
        assert_eq!(
            cert_file("*.preview.example.com"),
            "acme/_wildcard.preview.example.com.pem"
        );
        assert_eq!(fallback_file(), "acme/_default.pem");
    }
}
