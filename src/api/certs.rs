//! The private CA of the MongoDB names (I/O edge): created on first start (key 0600), it signs
//! each agent's server certificate for `<agent>.<mongodb_domain>` — from a key it generates, or
//! from the agent's own CSR so the key never leaves the agent. Two kinds, kept per agent:
//! the certificate the agent's mongod presents (handed out by `GET /api/config`, which the
//! CloudLunacy agent calls once, at install: it lasts 825 days and a call in its last 90 days
//! gets a new one), and the one the front presents itself on a `tls: terminate` listener (90
//! days, renewed by the front 30 days before its end, with nothing asked of the agent).

use crate::target::files::{FILE_MODE, SECRET_MODE, write_atomic};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why a CSR is not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a PEM PKCS#10 request whose signature verifies.
    #[error("{0}")]
    Unreadable(String),
    /// It asks for a name other than the agent's own.
    #[error("{0}")]
    OtherName(String),
    #[error("signing the CSR: {0}")]
    Signing(String),
}

/// The certificate an agent's mongod presents: how long it lasts, and how long before its end
/// a `GET /api/config` hands out a new one.
pub const AGENT_DAYS: i64 = 825;
pub const AGENT_RENEW_DAYS: i64 = 90;
/// The certificate the front presents on a `tls: terminate` listener, renewed by the front.
pub const FRONT_DAYS: i64 = 90;
pub const FRONT_RENEW_DAYS: i64 = 30;

pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Issued {
    pub dns: String,
    pub cert_pem: String,
    /// Absent when the agent sent a CSR: its key never left it.
    pub key_pem: Option<String>,
    /// Unix seconds.
    pub not_after: i64,
}

fn date(days_from_now: i64) -> (time::OffsetDateTime, i64) {
    let (y, m, d) = crate::clock::date_in_days(days_from_now);
    let unix = (crate::clock::unix_now() as i64 / 86_400 + days_from_now) * 86_400;
    (date_time_ymd(y as i32, m as u8, d as u8), unix)
}

impl Ca {
    /// Opens the CA under `dir/ca`, creating it the first time.
    pub fn open_or_create(dir: &Path) -> Result<Ca, String> {
        let ca_dir = dir.join("ca");
        let (cert_path, key_path) = (ca_dir.join("ca.pem"), ca_dir.join("ca.key"));
        let err = |e: &dyn std::fmt::Display| format!("private CA in {}: {e}", ca_dir.display());
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| err(&e))?;
            let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| err(&e))?;
            return Ok(Ca {
                cert_pem,
                issuer,
                dir: dir.to_path_buf(),
            });
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "lunafront MongoDB CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date(-1).0;
        params.not_after = date(3650).0;
        let key = KeyPair::generate().map_err(|e| err(&e))?;
        let cert = params.self_signed(&key).map_err(|e| err(&e))?;
        // The key first: a CA certificate without its key would be unusable.
        write_atomic(&key_path, key.serialize_pem().as_bytes(), SECRET_MODE)
            .map_err(|e| err(&e))?;
        write_atomic(&cert_path, cert.pem().as_bytes(), FILE_MODE).map_err(|e| err(&e))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
        })
    }

    fn leaf_params(dns: &str, days: i64) -> Result<(CertificateParams, i64), rcgen::Error> {
        let mut params = CertificateParams::new(vec![dns.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, dns);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = date(-1).0;
        let (not_after, unix) = date(days);
        params.not_after = not_after;
        Ok((params, unix))
    }

    /// A certificate and key for `dns`, valid `days`.
    pub fn issue(&self, dns: &str, days: i64) -> Result<Issued, String> {
        let (params, not_after) = Self::leaf_params(dns, days).map_err(|e| e.to_string())?;
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        Ok(Issued {
            dns: dns.to_string(),
            cert_pem: cert.pem(),
            key_pem: Some(key.serialize_pem()),
            not_after,
        })
    }

    /// A certificate for the agent's CSR, which may ask for `dns` and nothing else.
    pub fn sign_csr(&self, csr_pem: &str, dns: &str) -> Result<Issued, CsrError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CsrError::Unreadable(format!("the CSR cannot be read: {e}")))?;
        let names: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|n| match n {
                SanType::DnsName(d) => d.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if names.iter().any(|n| n != dns) {
            return Err(CsrError::OtherName(format!(
                "the CSR asks for {names:?}; it may only ask for {dns}"
            )));
        }
        let (params, not_after) =
            Self::leaf_params(dns, AGENT_DAYS).map_err(|e| CsrError::Signing(e.to_string()))?;
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        Ok(Issued {
            dns: dns.to_string(),
            cert_pem: cert.pem(),
            key_pem: None,
            not_after,
        })
    }

    fn issued_path(&self, agent: &str) -> PathBuf {
        self.dir.join("issued").join(format!("{agent}.json"))
    }

    fn front_path(&self, agent: &str) -> PathBuf {
        self.dir.join("issued/front").join(format!("{agent}.json"))
    }

    /// A kept certificate for `dns` with a key and more than `renew_days` left.
    fn kept(path: &Path, dns: &str, renew_days: i64) -> Option<Issued> {
        let kept: Issued = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        (kept.dns == dns
            && kept.key_pem.is_some()
            && kept.not_after - crate::clock::unix_now() as i64 > renew_days * 86_400)
            .then_some(kept)
    }

    /// The certificate the agent's mongod presents for `dns`: the kept one while it has more
    /// than 90 days left (and was made with our key), else a new one.
    pub fn for_agent(&self, agent: &str, dns: &str) -> Result<Issued, String> {
        if let Some(kept) = Self::kept(&self.issued_path(agent), dns, AGENT_RENEW_DAYS) {
            return Ok(kept);
        }
        let issued = self.issue(dns, AGENT_DAYS)?;
        self.keep(agent, &issued)?;
        Ok(issued)
    }

    /// The certificate the front presents for the agent's `dns` on a `tls: terminate`
    /// listener, and whether it is new: the kept one while it has more than 30 days left.
    pub fn for_front(&self, agent: &str, dns: &str) -> Result<(Issued, bool), String> {
        let path = self.front_path(agent);
        if let Some(kept) = Self::kept(&path, dns, FRONT_RENEW_DAYS) {
            return Ok((kept, false));
        }
        let issued = self.issue(dns, FRONT_DAYS)?;
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(&issued).expect("serializes"),
            SECRET_MODE,
        )
        .map_err(|e| e.to_string())?;
        Ok((issued, true))
    }

    /// The certificate the front last presented for the agent, whatever its dates.
    pub fn front_certificate(&self, agent: &str) -> Option<Issued> {
        serde_json::from_str(&std::fs::read_to_string(self.front_path(agent)).ok()?).ok()
    }

    /// The agent's own certificate as last handed out, if any (for the expiry warning).
    pub fn agent_certificate(&self, agent: &str) -> Option<Issued> {
        serde_json::from_str(&std::fs::read_to_string(self.issued_path(agent)).ok()?).ok()
    }

    pub fn keep(&self, agent: &str, issued: &Issued) -> Result<(), String> {
        let path = self.issued_path(agent);
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(issued).expect("serializes"),
            SECRET_MODE,
        )
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_keeps_and_reopens() {
        let dir = std::env::temp_dir().join(format!("lunafront-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::open_or_create(&dir).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("ca/ca.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let a = ca
            .for_agent("agent-7", "agent-7.mongodb.example.com")
            .unwrap();
        let b = ca
            .for_agent("agent-7", "agent-7.mongodb.example.com")
            .unwrap();
        assert_eq!(a.cert_pem, b.cert_pem, "a valid certificate is kept");
        assert!(a.not_after - crate::clock::unix_now() as i64 > 800 * 86_400);
        let (front, new) = ca
            .for_front("agent-7", "agent-7.mongodb.example.com")
            .unwrap();
        assert!(new);
        assert!(front.not_after - crate::clock::unix_now() as i64 > 80 * 86_400);
        assert_ne!(
            front.cert_pem, a.cert_pem,
            "the front's certificate is its own"
        );
        let (again, new) = ca
            .for_front("agent-7", "agent-7.mongodb.example.com")
            .unwrap();
        assert!(!new);
        assert_eq!(again.cert_pem, front.cert_pem);
        let reopened = Ca::open_or_create(&dir).unwrap();
        assert_eq!(reopened.cert_pem, ca.cert_pem);
        // A CSR for the right name is signed; for another name, refused.
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["agent-7.mongodb.example.com".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let signed = ca.sign_csr(&csr, "agent-7.mongodb.example.com").unwrap();
        assert!(signed.key_pem.is_none());
        let other = CertificateParams::new(vec!["agent-8.mongodb.example.com".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert!(ca.sign_csr(&other, "agent-7.mongodb.example.com").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
