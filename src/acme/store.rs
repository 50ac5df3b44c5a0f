//! The ACME store of a target (I/O edge): `<state_dir>/acme/` holds the account key, the
//! self-signed default certificate, each issued certificate (chain and key in one PEM) and
//! what the daemon knows of each domain (expiry, failures, next attempt) and the HTTP-01
//! answers pending while the CA validates. Folder 0700, files 0600, each written atomically.
//! `overlay` gives a model the certificates and answers the store holds for it, so every path
//! that renders for the target (daemon, `plan`, `apply`) renders them.

use super::{Wanted, wanted};
use crate::model::{Issued, Model};
use crate::spec::load::CertFile;
use crate::target::files::{self, SECRET_MODE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ACME store {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("ACME store {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("generating the default certificate: {0}")]
    Generate(String),
}

/// What the daemon knows of one domain's certificate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainStatus {
    /// The directory the current certificate came from (a new directory means a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// Validity of the certificate held (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    /// When the last certificate was obtained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<i64>,
    /// Failures since the last success; each one doubles the wait before the next attempt.
    #[serde(default)]
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The ACME problem type of the last error, or `transport`, `hook`, `internal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<i64>,
    /// No attempt before this time (backoff after failures, or the renewal time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<i64>,
}

/// The account as stored: the directory it belongs to and instant-acme's credentials.
#[derive(Serialize, Deserialize)]
pub struct StoredAccount {
    pub directory: String,
    pub credentials: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store of the target whose state folder is `state_dir`.
    pub fn new(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("acme"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, path: &Path, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    fn ensure_dir(&self, dir: &Path) -> Result<(), StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| self.io(dir, e))
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(path, e)),
        }
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        self.ensure_dir(&self.dir)?;
        if let Some(parent) = path.parent() {
            self.ensure_dir(parent)?;
        }
        files::write_atomic(path, bytes, SECRET_MODE).map_err(|e| self.io(path, e.source))
    }

    fn cert_path(&self, domain: &str) -> PathBuf {
        // `acme/<file>` in the rendering is `certs/<file>` here.
        let file = super::cert_file(domain);
        let name = file.rsplit('/').next().unwrap_or(&file);
        self.dir.join("certs").join(name)
    }

    /// The certificate (chain and key) held for `domain`.
    pub fn cert(&self, domain: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(&self.cert_path(domain))
    }

    pub fn save_cert(&self, domain: &str, pem: &[u8]) -> Result<(), StoreError> {
        self.write(&self.cert_path(domain), pem)
    }

    /// The default certificate, created (self-signed, ECDSA P-256) the first time it is asked
    /// for with `create`.
    pub fn fallback(&self, create: bool) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.dir.join("default.pem");
        if let Some(bytes) = self.read(&path)? {
            return Ok(Some(bytes));
        }
        if !create {
            return Ok(None);
        }
        let pem = default_certificate()?;
        self.write(&path, pem.as_bytes())?;
        Ok(Some(pem.into_bytes()))
    }

    pub fn account(&self) -> Result<Option<StoredAccount>, StoreError> {
        let path = self.dir.join("account.json");
        match self.read(&path)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
        }
    }

    pub fn save_account(&self, account: &StoredAccount) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(account).expect("account serializes");
        self.write(&self.dir.join("account.json"), &bytes)
    }

    /// What is known of each domain (an unreadable file is reported, not guessed around).
    pub fn status(&self) -> Result<BTreeMap<String, DomainStatus>, StoreError> {
        let path = self.dir.join("status.json");
        match self.read(&path)? {
            None => Ok(BTreeMap::new()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            }),
        }
    }

    pub fn save_status(&self, status: &BTreeMap<String, DomainStatus>) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(status).expect("status serializes");
        self.write(&self.dir.join("status.json"), &bytes)
    }

    /// The pending HTTP-01 answers (`host/token` → key authorization). They only matter while
    /// the CA validates: an unreadable file counts as none.
    pub fn challenges(&self) -> BTreeMap<String, String> {
        let path = self.dir.join("challenges.json");
        match self.read(&path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("{}: {e}; no pending ACME challenges", path.display());
                BTreeMap::new()
            }),
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                tracing::warn!("{e}; no pending ACME challenges");
                BTreeMap::new()
            }
        }
    }

    pub fn save_challenges(&self, pending: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(pending).expect("challenges serialize");
        self.write(&self.dir.join("challenges.json"), &bytes)
    }

    /// The model with the certificates this store holds for it: the default certificate when
    /// an ACME listener has no folder (created on first use), and each wanted domain's
    /// certificate once issued. A model without ACME listeners is returned as it is.
    pub fn overlay(&self, model: Model) -> Result<Model, StoreError> {
        let acme_listeners: Vec<bool> = model
            .listeners
            .values()
            .filter(|l| l.acme && l.is_http())
            .map(|l| l.certificates().is_none())
            .collect();
        if model.acme.is_none() || acme_listeners.is_empty() {
            return Ok(model);
        }
        let issued = self.issued(&wanted(&model), acme_listeners.contains(&true))?;
        Ok(model.with_issued(issued))
    }

    fn issued(
        &self,
        wanted: &BTreeMap<String, Wanted>,
        need_fallback: bool,
    ) -> Result<Issued, StoreError> {
        let fallback = match need_fallback {
            true => self
                .fallback(true)?
                .map(|pem| CertFile::from_pem(super::fallback_file(), pem)),
            false => None,
        };
        // A daemon overlays on every reconcile: a certificate is read and parsed again only
        // when its file changed (size or modification time).
        type Cache = BTreeMap<PathBuf, (std::time::SystemTime, u64, Option<CertFile>)>;
        static CACHE: std::sync::Mutex<Cache> = std::sync::Mutex::new(BTreeMap::new());
        let mut cache = CACHE.lock().expect("certificate cache");
        let mut certs = BTreeMap::new();
        for domain in wanted.keys() {
            let path = self.cert_path(domain);
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(&path, e)),
            };
            let stamp = (meta.modified().map_err(|e| self.io(&path, e))?, meta.len());
            let cert = match cache.get(&path) {
                Some((modified, len, cert)) if (*modified, *len) == stamp => cert.clone(),
                _ => {
                    let Some(pem) = self.read(&path)? else {
                        continue;
                    };
                    // Only a whole certificate for this very name is rendered: a file that
                    // does not parse or names something else is left to the manager.
                    let whole = super::pem_names(&pem)
                        .iter()
                        .any(|n| super::covers(n, domain))
                        && String::from_utf8_lossy(&pem).contains("PRIVATE KEY-----");
                    let cert = whole.then(|| CertFile::from_pem(super::cert_file(domain), pem));
                    cache.insert(path, (stamp.0, stamp.1, cert.clone()));
                    cert
                }
            };
            if let Some(cert) = cert {
                certs.insert(domain.clone(), cert);
            }
        }
        // Answers go into a map file: only well-formed ones, for the domains wanted here.
        let challenges = self
            .challenges()
            .into_iter()
            .filter(|(key, answer)| {
                key.split_once('/').is_some_and(|(host, token)| {
                    wanted.contains_key(host) && super::challenge::is_base64url(token, false)
                }) && super::challenge::is_base64url(answer, true)
            })
            .collect();
        Ok(Issued {
            fallback,
            certs,
            challenges,
        })
    }
}

/// A self-signed certificate for `lunafront.invalid` (a name that cannot exist), presented to
/// names an ACME listener has no certificate for yet.
fn default_certificate() -> Result<String, StoreError> {
    let generate = |e: rcgen::Error| StoreError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["lunafront.invalid".to_string()]).map_err(generate)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lunafront default certificate");
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_certificate_is_made_once_and_kept_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.fallback(false).unwrap(), None);
        let first = store.fallback(true).unwrap().unwrap();
        assert_eq!(store.fallback(true).unwrap().unwrap(), first);
        assert_eq!(
            super::super::pem_names(&first),
            vec!["lunafront.invalid".to_string()]
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("acme/default.pem")), 0o600);
        assert_eq!(mode(&dir.path().join("acme")), 0o700);
    }
}
