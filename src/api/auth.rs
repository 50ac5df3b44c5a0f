//! Who is calling the API (I/O edge): agent tokens (issued at registration and authentication,
//! stored hashed, expiring, revocable), one-time enrollment tokens (`lunafront agent enroll`),
//! the admin token (from a file or the environment, never a default), and a rate limiter per
//! client address. Every secret comparison is constant-time.

use crate::target::files::{SECRET_MODE, write_atomic};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// SHA-256 of a secret, hex: what is stored instead of the secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality of two hashes (or any two secrets).
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A new random secret with a prefix saying what it is (`lfa_` agent token, `lfe_` enrollment).
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system's random source works");
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Agent,
    Enrollment,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    hash: String,
    agent: String,
    kind: Kind,
    /// Unix seconds.
    expires: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    records: Vec<Record>,
}

/// Tokens, persisted (hashed) in `<api data>/tokens.json`, 0600. The file is the truth: each
/// operation reads it under a lock, so `lunafront agent enroll` and a running daemon share it.
pub struct TokenStore {
    path: PathBuf,
    lock_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("token store {path}: {message}")]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

fn now() -> u64 {
    crate::clock::unix_now() as u64
}

impl TokenStore {
    pub fn open(dir: &Path) -> Result<TokenStore, StoreError> {
        let store = TokenStore {
            path: dir.join("tokens.json"),
            lock_path: dir.join("tokens.lock"),
        };
        store.read()?;
        Ok(store)
    }

    fn error(&self, message: impl ToString) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    fn read(&self) -> Result<TokenFile, StoreError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| self.error(e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Reads, changes and writes the file while holding its lock.
    fn update<T>(&self, change: impl FnOnce(&mut TokenFile) -> T) -> Result<T, StoreError> {
        static IN_PROCESS: Mutex<()> = Mutex::new(());
        let _local = IN_PROCESS.lock().expect("tokens");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| self.error(e))?;
        lock.lock().map_err(|e| self.error(e))?;
        let mut file = self.read()?;
        let now = now();
        file.records.retain(|r| r.expires > now);
        let result = change(&mut file);
        let text = serde_json::to_vec_pretty(&file).expect("tokens serialize");
        write_atomic(&self.path, &text, SECRET_MODE).map_err(|e| self.error(e))?;
        Ok(result)
    }

    /// Issues a token of `kind` for `agent`, valid for `ttl`. Returns the secret (shown once).
    pub fn issue(&self, agent: &str, kind: Kind, ttl: Duration) -> Result<String, StoreError> {
        let secret = new_secret(match kind {
            Kind::Agent => "lfa_",
            Kind::Enrollment => "lfe_",
        });
        let record = Record {
            hash: hash_secret(&secret),
            agent: agent.to_string(),
            kind,
            expires: now() + ttl.as_secs(),
        };
        self.update(|file| file.records.push(record))?;
        Ok(secret)
    }

    /// The agent an unexpired token of `kind` belongs to. Every record is compared, in
    /// constant time, whatever matches.
    pub fn verify(&self, secret: &str, kind: Kind) -> Option<String> {
        let hash = hash_secret(secret);
        let file = self.read().ok()?;
        let now = now();
        let mut found = None;
        for r in &file.records {
            if ct_eq(&r.hash, &hash) && r.kind == kind && r.expires > now {
                found = Some(r.agent.clone());
            }
        }
        found
    }

    /// Uses up a one-time enrollment token of `agent`. True when it was valid.
    pub fn consume_enrollment(&self, agent: &str, secret: &str) -> Result<bool, StoreError> {
        let hash = hash_secret(secret);
        self.update(|file| {
            let before = file.records.len();
            file.records.retain(|r| {
                !(r.kind == Kind::Enrollment && r.agent == agent && ct_eq(&r.hash, &hash))
            });
            file.records.len() < before
        })
    }

    /// Revokes every token of `agent` (agent tokens and enrollments). Returns how many.
    pub fn revoke(&self, agent: &str) -> Result<usize, StoreError> {
        self.update(|file| {
            let before = file.records.len();
            file.records.retain(|r| r.agent != agent);
            before - file.records.len()
        })
    }
}

/// The admin's token, held as a hash.
pub struct AdminToken {
    hash: Option<String>,
}

impl AdminToken {
    /// From `LUNAFRONT_ADMIN_TOKEN`, or the file named by `--admin-token-file`. None: admin
    /// endpoints refuse everyone.
    pub fn load(file: Option<&Path>) -> Result<AdminToken, String> {
        let secret = match file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("admin token file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("LUNAFRONT_ADMIN_TOKEN").ok(),
        };
        match secret {
            Some(s) if s.len() < 24 => Err(
                "the admin token is shorter than 24 characters: use a long random secret".into(),
            ),
            Some(s) => Ok(AdminToken {
                hash: Some(hash_secret(&s)),
            }),
            None => Ok(AdminToken { hash: None }),
        }
    }

    pub fn configured(&self) -> bool {
        self.hash.is_some()
    }

    pub fn matches(&self, secret: &str) -> bool {
        self.hash
            .as_deref()
            .is_some_and(|h| ct_eq(h, &hash_secret(secret)))
    }
}

/// A token bucket per client address: `burst` requests at once, refilled at `per_minute`.
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            burst: burst as f64,
            per_second: per_minute as f64 / 60.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `client` may make a request now (and counts it).
    pub fn allow(&self, client: IpAddr) -> bool {
        let mut buckets = self.buckets.lock().expect("rate limiter");
        let now = Instant::now();
        if buckets.len() > 10_000 {
            buckets.retain(|_, (tokens, at)| {
                *tokens < self.burst || now.duration_since(*at) < Duration::from_secs(600)
            });
        }
        let (tokens, at) = buckets.entry(client).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_hashed_expire_and_revoke() {
        let dir = std::env::temp_dir().join(format!("lunafront-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = TokenStore::open(&dir).unwrap();
        let token = store
            .issue("agent-7", Kind::Agent, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            store.verify(&token, Kind::Agent).as_deref(),
            Some("agent-7")
        );
        assert_eq!(store.verify(&token, Kind::Enrollment), None);
        assert_eq!(store.verify("lfa_wrong", Kind::Agent), None);
        let on_disk = std::fs::read_to_string(dir.join("tokens.json")).unwrap();
        assert!(!on_disk.contains(&token), "the token is stored in clear");
        assert!(on_disk.contains(&hash_secret(&token)));
        let expired = store
            .issue("agent-8", Kind::Agent, Duration::from_secs(0))
            .unwrap();
        assert_eq!(store.verify(&expired, Kind::Agent), None);
        assert_eq!(store.revoke("agent-7").unwrap(), 1);
        assert_eq!(store.verify(&token, Kind::Agent), None);
        // Persisted: a new store reads the same records.
        let again = store
            .issue("agent-9", Kind::Agent, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            TokenStore::open(&dir)
                .unwrap()
                .verify(&again, Kind::Agent)
                .as_deref(),
            Some("agent-9")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn enrollment_is_one_time() {
        let dir = std::env::temp_dir().join(format!("lunafront-enroll-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = TokenStore::open(&dir).unwrap();
        let token = store
            .issue("agent-7", Kind::Enrollment, Duration::from_secs(60))
            .unwrap();
        assert!(
            !store.consume_enrollment("agent-8", &token).unwrap(),
            "another agent's enrollment"
        );
        assert!(store.consume_enrollment("agent-7", &token).unwrap());
        assert!(
            !store.consume_enrollment("agent-7", &token).unwrap(),
            "used twice"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(ct_eq("abc", "abc"));
        assert!(!ct_eq("abc", "abd"));
        assert!(!ct_eq("abc", "abcd"));
    }

    #[test]
    fn rate_limiter_refuses_past_the_burst() {
        let limiter = RateLimiter::new(60, 3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..3).all(|_| limiter.allow(ip)));
        assert!(!limiter.allow(ip));
        assert!(
            limiter.allow("192.0.2.2".parse().unwrap()),
            "another client has its own bucket"
        );
    }
}
