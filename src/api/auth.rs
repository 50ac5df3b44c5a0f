//! Who is calling the API (I/O edge): agent tokens (issued at registration and authentication,
//! stored hashed, revocable, and valid while used: each use slides the expiry), one-time
//! enrollment tokens (`lunafront agent enroll`), keys rotated by re-enrollment, revoked keys,
//! the admin token (from a file or the environment, never a default), and bounded rate
//! limiters. Every secret comparison is constant-time.

use crate::target::files::{SECRET_MODE, write_atomic};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::Hash;
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
    /// An agent's key, set by registering with an enrollment token (a re-enrollment rotates
    /// it); it never expires, revocation removes it.
    Key,
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
    /// SHA-256 of keys that were revoked: never accepted again, wherever they are declared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revoked_keys: Vec<String>,
}

/// How long a token stays valid after its last use, when nobody says: long enough for an
/// agent that deploys once a year (the CloudLunacy agent stores its token once, at install).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(400 * 86_400);

/// A used token's expiry is moved forward at most once per this, so that a busy agent does
/// not rewrite the token file at every call.
const SLIDE_STEP: u64 = 86_400;

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
    /// Opens the store in `dir`, creating the folder (and missing parents) 0700: whoever
    /// creates it first — the daemon or `lunafront agent enroll` — it holds secrets.
    pub fn open(dir: &Path) -> Result<TokenStore, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let store = TokenStore {
            path: dir.join("tokens.json"),
            lock_path: dir.join("tokens.lock"),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| store.error(e))?;
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
        let lock = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&self.lock_path)
                .map_err(|e| self.error(e))?
        };
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
            Kind::Enrollment | Kind::Key => "lfe_",
        });
        let record = Record {
            hash: hash_secret(&secret),
            agent: agent.to_string(),
            kind,
            expires: now().saturating_add(ttl.as_secs()),
        };
        self.update(|file| file.records.push(record))?;
        Ok(secret)
    }

    /// The agent an unexpired token of `kind` belongs to. Every record is compared, in
    /// constant time, whatever matches. With `slide`, a token found valid stays valid for
    /// that long from now (its expiry moves forward, at most once a day).
    pub fn verify(&self, secret: &str, kind: Kind, slide: Option<Duration>) -> Option<String> {
        let hash = hash_secret(secret);
        let file = self.read().ok()?;
        let now = now();
        let mut found = None;
        for r in &file.records {
            if ct_eq(&r.hash, &hash) && r.kind == kind && r.expires > now {
                found = Some((r.agent.clone(), r.expires));
            }
        }
        let (agent, expires) = found?;
        if let Some(ttl) = slide {
            let wanted = now.saturating_add(ttl.as_secs());
            if wanted > expires.saturating_add(SLIDE_STEP) {
                // Best effort: a token that verified stays valid even if the write fails.
                let _ = self.update(|file| {
                    for r in file.records.iter_mut() {
                        if r.kind == kind && ct_eq(&r.hash, &hash) {
                            r.expires = r.expires.max(wanted);
                        }
                    }
                });
            }
        }
        Some(agent)
    }

    /// Sets `agent`'s key (a re-enrollment rotates it): the previous one stops working.
    pub fn set_key(&self, agent: &str, key_hash: &str) -> Result<(), StoreError> {
        self.update(|file| {
            file.records
                .retain(|r| !(r.kind == Kind::Key && r.agent == agent));
            file.records.push(Record {
                hash: key_hash.to_string(),
                agent: agent.to_string(),
                kind: Kind::Key,
                expires: u64::MAX,
            });
        })
    }

    /// The key hash set for `agent` by its last enrollment, if any.
    pub fn key_of(&self, agent: &str) -> Option<String> {
        self.read()
            .ok()?
            .records
            .into_iter()
            .find_map(|r| (r.kind == Kind::Key && r.agent == agent).then_some(r.hash))
    }

    /// Whether `agent` has any token, enrollment or key here.
    pub fn knows(&self, agent: &str) -> bool {
        self.read()
            .map(|f| f.records.iter().any(|r| r.agent == agent))
            .unwrap_or(false)
    }

    /// Whether a key with this hash was revoked.
    pub fn is_revoked_key(&self, key_hash: &str) -> bool {
        self.read()
            .map(|f| f.revoked_keys.iter().any(|k| ct_eq(k, key_hash)))
            .unwrap_or(true)
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

    /// Revokes everything of `agent`: its tokens, enrollments and rotated key, and the keys
    /// given in `keys` (SHA-256 of the keys the state declares for it), which are never
    /// accepted again. Returns how many tokens and keys were revoked.
    pub fn revoke(&self, agent: &str, keys: &[String]) -> Result<usize, StoreError> {
        self.update(|file| {
            let before = file.records.len();
            let mut revoked: Vec<String> = file
                .records
                .iter()
                .filter(|r| r.agent == agent && r.kind == Kind::Key)
                .map(|r| r.hash.clone())
                .collect();
            revoked.extend(keys.iter().cloned());
            file.records.retain(|r| r.agent != agent);
            let mut count = before - file.records.len();
            for key in revoked {
                if !file.revoked_keys.contains(&key) {
                    file.revoked_keys.push(key);
                    count += 1;
                }
            }
            count
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

/// Token buckets by key (a client, an agent): each key may make `burst` requests at once,
/// refilled at `per_minute`. Memory stays bounded: past `capacity` keys, buckets that have
/// refilled are dropped first, then the least recently used.
pub struct RateLimiter<K> {
    capacity: usize,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

/// A limit: `burst` at once, `per_minute` after that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_minute: f64,
    pub burst: f64,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub fn new(capacity: usize) -> RateLimiter<K> {
        RateLimiter {
            capacity: capacity.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` may go on now (and counts it); else how long until it may.
    pub fn check(&self, key: &K, rate: Rate) -> Result<(), Duration> {
        self.take(key, rate, true)
    }

    /// Whether `key` could go on now, without counting it.
    pub fn peek(&self, key: &K, rate: Rate) -> Result<(), Duration> {
        self.take(key, rate, false)
    }

    fn take(&self, key: &K, rate: Rate, count: bool) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("rate limiter");
        let now = Instant::now();
        let per_second = rate.per_minute / 60.0;
        if !buckets.contains_key(key) && buckets.len() >= self.capacity {
            let full_after = Duration::from_secs_f64(rate.burst / per_second.max(1e-9));
            buckets.retain(|_, (_, at)| now.duration_since(*at) < full_after);
            if buckets.len() >= self.capacity {
                // Still full: forget the tenth least recently seen.
                let mut ages: Vec<Instant> = buckets.values().map(|(_, at)| *at).collect();
                ages.sort_unstable();
                let cutoff = ages[(ages.len() / 10).min(ages.len() - 1)];
                buckets.retain(|_, (_, at)| *at > cutoff);
            }
        }
        let (tokens, at) = buckets.entry(key.clone()).or_insert((rate.burst, now));
        let available =
            (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(rate.burst);
        if available >= 1.0 {
            if count {
                *tokens = available - 1.0;
                *at = now;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - available) / per_second.max(1e-9),
            ))
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().expect("rate limiter").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key a client is rate limited by: its canonical address, and for IPv6 its /64 (one
/// host usually holds a whole /64, so its addresses are one client).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match crate::model::address::canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
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
            store.verify(&token, Kind::Agent, None).as_deref(),
            Some("agent-7")
        );
        assert_eq!(store.verify(&token, Kind::Enrollment, None), None);
        assert_eq!(store.verify("lfa_wrong", Kind::Agent, None), None);
        let on_disk = std::fs::read_to_string(dir.join("tokens.json")).unwrap();
        assert!(!on_disk.contains(&token), "the token is stored in clear");
        assert!(on_disk.contains(&hash_secret(&token)));
        let expired = store
            .issue("agent-8", Kind::Agent, Duration::from_secs(0))
            .unwrap();
        assert_eq!(store.verify(&expired, Kind::Agent, None), None);
        assert_eq!(store.revoke("agent-7", &[]).unwrap(), 1);
        assert_eq!(store.verify(&token, Kind::Agent, None), None);
        // Persisted: a new store reads the same records.
        let again = store
            .issue("agent-9", Kind::Agent, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            TokenStore::open(&dir)
                .unwrap()
                .verify(&again, Kind::Agent, None)
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
    fn rate_limiter_refuses_past_the_burst_and_says_when() {
        let limiter = RateLimiter::new(100);
        let rate = Rate {
            per_minute: 60.0,
            burst: 3.0,
        };
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..3).all(|_| limiter.check(&ip, rate).is_ok()));
        let wait = limiter.check(&ip, rate).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limiter.check(&"192.0.2.2".parse().unwrap(), rate).is_ok(),
            "another client has its own bucket"
        );
    }

    #[test]
    fn rate_limiter_memory_is_bounded() {
        let limiter = RateLimiter::new(1000);
        let rate = Rate {
            per_minute: 1.0,
            burst: 2.0,
        };
        for i in 0..50_000u32 {
            let _ = limiter.check(&i, rate);
            assert!(limiter.len() <= 1000);
        }
        // A client seen recently and still limited keeps its bucket.
        let _ = limiter.check(&49_999, rate);
        assert!(limiter.check(&49_999, rate).is_err());
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_addresses_as_ipv4() {
        let a = client_key("2001:db8:1:2::1".parse().unwrap());
        let b = client_key("2001:db8:1:2:ffff::9".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, client_key("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(
            client_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn used_tokens_slide_and_revoked_keys_stay_revoked() {
        let dir = std::env::temp_dir().join(format!("lunafront-slide-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = TokenStore::open(&dir.join("nested/api")).unwrap();
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&dir.join("nested")), 0o700);
        assert_eq!(mode(&dir.join("nested/api")), 0o700);
        let token = store
            .issue("agent-7", Kind::Agent, Duration::from_secs(10))
            .unwrap();
        let expiry = || store.read().unwrap().records[0].expires;
        let before = expiry();
        store.verify(&token, Kind::Agent, Some(Duration::from_secs(5 * 86_400)));
        assert!(expiry() >= before + 4 * 86_400, "the expiry did not slide");
        assert_eq!(mode(&dir.join("nested/api/tokens.json")), 0o600);
        store.set_key("agent-7", &hash_secret("key-1")).unwrap();
        assert_eq!(store.key_of("agent-7"), Some(hash_secret("key-1")));
        store.revoke("agent-7", &[hash_secret("declared")]).unwrap();
        assert!(store.is_revoked_key(&hash_secret("key-1")));
        assert!(store.is_revoked_key(&hash_secret("declared")));
        assert!(!store.is_revoked_key(&hash_secret("other")));
        assert_eq!(store.key_of("agent-7"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
