//! `validate --check`, certificates: what only a closer look at the PEM files shows — a
//! certificate that does not parse, a private key that does not belong to it, one that has
//! expired or soon will. Pure: the PEM bytes come from the model and `now` from the caller.

use super::Model;
use crate::spec::diagnostics::{Diagnostic, Location, quote};
use std::path::Path;

/// A certificate expiring within this many seconds gets a warning.
pub const EXPIRY_WARNING_SECS: i64 = 30 * 24 * 3600;

/// Checks every certificate file of every listener. `now` is seconds since the epoch.
pub fn check(model: &Model, now: i64) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (listener, l) in &model.listeners {
        let Some(certs) = l.certificates() else {
            continue;
        };
        for file in &certs.files {
            let Some(pem) = file.pem.as_deref() else {
                continue;
            };
            out.extend(check_pem(&certs.dir.join(&file.name), listener, pem, now));
        }
    }
    out
}

/// The line (1-based) of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap_or(0) + 1
}

/// Checks one PEM file: the first certificate is the server's; the private key must match it.
pub fn check_pem(path: &Path, listener: &str, pem: &[u8], now: i64) -> Vec<Diagnostic> {
    let text = String::from_utf8_lossy(pem);
    let at = |needle: &str| {
        Some(Location {
            file: path.to_path_buf(),
            line: line_of(&text, needle),
            column: 1,
        })
    };
    let shown = quote(&path.display().to_string());
    let mut out = Vec::new();
    let blocks: Vec<x509_parser::pem::Pem> = x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .collect();
    let Some(cert_block) = blocks.iter().find(|b| b.label == "CERTIFICATE") else {
        out.push(
            Diagnostic::error(
                "certificate-invalid",
                format!("{shown} (listener {listener}) holds no certificate that parses"),
            )
            .hint("put the certificate (PEM, `-----BEGIN CERTIFICATE-----`), its chain and the private key in the file")
            .at(at("BEGIN")),
        );
        return out;
    };
    let cert = match cert_block.parse_x509() {
        Ok(cert) => cert,
        Err(e) => {
            out.push(
                Diagnostic::error(
                    "certificate-invalid",
                    format!("{shown}: the certificate does not parse as X.509: {e}"),
                )
                .hint("replace the file with the certificate your CA issued (PEM)")
                .at(at("BEGIN CERTIFICATE")),
            );
            return out;
        }
    };
    let subject = cert.subject().to_string();
    let not_after = cert.validity().not_after.timestamp();
    let not_before = cert.validity().not_before.timestamp();
    let day = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map(|d| d.date().to_string())
            .unwrap_or_else(|_| t.to_string())
    };
    if not_after < now {
        out.push(
            Diagnostic::error(
                "certificate-expired",
                format!(
                    "{shown}: the certificate for {subject} expired on {}",
                    day(not_after)
                ),
            )
            .hint("renew it: clients refuse an expired certificate")
            .at(at("BEGIN CERTIFICATE")),
        );
    } else if not_after - now < EXPIRY_WARNING_SECS {
        out.push(
            Diagnostic::warning(
                "certificate-expires-soon",
                format!(
                    "{shown}: the certificate for {subject} expires on {} (in {} day(s))",
                    day(not_after),
                    (not_after - now) / 86_400
                ),
            )
            .hint("renew it before then")
            .at(at("BEGIN CERTIFICATE")),
        );
    }
    if not_before > now {
        out.push(
            Diagnostic::warning(
                "certificate-not-yet-valid",
                format!(
                    "{shown}: the certificate for {subject} is valid only from {}",
                    day(not_before)
                ),
            )
            .at(at("BEGIN CERTIFICATE")),
        );
    }
    let Some(key_block) = blocks.iter().find(|b| b.label.ends_with("PRIVATE KEY")) else {
        out.push(
            Diagnostic::error(
                "certificate-invalid",
                format!("{shown}: no private key follows the certificate"),
            )
            .hint("append the certificate's private key (PEM) to the file")
            .at(at("BEGIN CERTIFICATE")),
        );
        return out;
    };
    let key_line = format!("BEGIN {}", key_block.label);
    let der = rustls_pki_types::PrivateKeyDer::try_from(key_block.contents.clone());
    let pkcs8 = matches!(der, Ok(rustls_pki_types::PrivateKeyDer::Pkcs8(_)));
    let key = der
        .map_err(|e| e.to_string())
        .and_then(|der| rcgen::KeyPair::try_from(&der).map_err(|e| e.to_string()));
    match key {
        Ok(key) => {
            if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
                out.push(
                    Diagnostic::error(
                        "certificate-key-mismatch",
                        format!(
                            "{shown}: the private key does not belong to the certificate for {subject}"
                        ),
                    )
                    .hint("put the key the certificate was issued for in the file (HAProxy refuses the pair)")
                    .at(at(&key_line)),
                );
            }
        }
        Err(e) if pkcs8 => out.push(
            Diagnostic::error(
                "certificate-invalid",
                format!("{shown}: the private key does not parse: {e}"),
            )
            .hint("write the certificate's private key as PEM")
            .at(at(&key_line)),
        ),
        // PKCS#1 (`RSA PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`) keys are not read here;
        // `haproxy -c` still checks that the pair loads.
        Err(_) => out.push(
            Diagnostic::warning(
                "certificate-key-unchecked",
                format!(
                    "{shown}: a `{}` key is not compared with the certificate (only PKCS#8 keys are)",
                    key_block.label
                ),
            )
            .hint("`openssl pkcs8 -topk8 -nocrypt` converts it; HAProxy's own check still runs")
            .at(at(&key_line)),
        ),
    }
    out
}
