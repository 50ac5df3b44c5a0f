//! Publishing ACME challenges (I/O edge). HTTP-01: an entry `host/token → key authorization`
//! in HAProxy's challenge map. The answer is saved in the ACME store and a reconcile applies
//! it like any change: the plan adds the entry at runtime (no reload) and writes it into the
//! map file, so a HAProxy restarted or reloaded while the CA validates answers at once.
//! DNS-01 (wildcards): the TXT record is published by the `acme.dns_hook` command,
//! `dns_hook set|clear _acme-challenge.<name> <value>`.

use super::store::Store;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the DNS hook may take to publish or clear a record.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("the CA sent a challenge token with characters outside base64url: {0:?}")]
    BadToken(String),
    #[error("saving the challenge answer: {0}")]
    Store(#[from] super::store::StoreError),
    #[error("the challenge answer was not applied: {0}")]
    Apply(String),
    #[error("no `acme.dns_hook` to publish the DNS-01 record of {0}")]
    NoHook(String),
    #[error("dns_hook {hook} {action} {name}: {message}")]
    Hook {
        hook: String,
        action: &'static str,
        name: String,
        message: String,
    },
}

/// Asks the reconcile loop to apply what the store holds, and waits for the outcome.
pub type ApplyStore = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The HTTP-01 answers pending on one target.
pub struct Challenges {
    store: Store,
    apply: ApplyStore,
    /// `host/token` → key authorization, while the CA may ask for it (what the store holds).
    pending: Mutex<BTreeMap<String, String>>,
}

/// RFC 8555 tokens and key authorizations are base64url (a key authorization joins two with
/// a dot). They go into a map file and runtime API commands: nothing else may pass.
pub(super) fn is_base64url(s: &str, dot: bool) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (dot && b == b'.'))
}

impl Challenges {
    /// Answers a previous daemon left in the store belong to orders nobody waits for any more:
    /// they are dropped (the first reconcile takes them out of the map).
    pub fn new(store: Store, apply: ApplyStore) -> Challenges {
        if !store.challenges().is_empty()
            && let Err(e) = store.save_challenges(&BTreeMap::new())
        {
            tracing::warn!("clearing stale ACME challenges: {e}");
        }
        Challenges {
            store,
            apply,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// Saves the pending answers with `change` made, and has them applied.
    fn update(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, String>) -> bool,
    ) -> Result<(), ChallengeError> {
        let mut pending = self.pending.lock().expect("challenges");
        if !change(&mut pending) {
            return Ok(());
        }
        self.store.save_challenges(&pending)?;
        (self.apply)().map_err(ChallengeError::Apply)
    }

    /// Answers `http://<host>/.well-known/acme-challenge/<token>` with `key_authorization`
    /// once this returns. `host` is a domain of the validated state.
    pub fn publish_http(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), ChallengeError> {
        if !is_base64url(token, false) {
            return Err(ChallengeError::BadToken(token.to_string()));
        }
        if !is_base64url(key_authorization, true) {
            return Err(ChallengeError::BadToken(key_authorization.to_string()));
        }
        let key = format!("{host}/{token}");
        self.update(|pending| {
            pending
                .insert(key, key_authorization.to_string())
                .as_deref()
                != Some(key_authorization)
        })
    }

    /// Stops answering.
    pub fn withdraw_http(&self, host: &str, token: &str) {
        let key = format!("{host}/{token}");
        if let Err(e) = self.update(|pending| pending.remove(&key).is_some()) {
            tracing::warn!("removing ACME challenge {key}: {e}");
        }
    }

    /// Runs the DNS hook: `hook set|clear <name> <value>`, no shell, bounded in time.
    pub fn dns_hook(
        hook: Option<&Path>,
        action: &'static str,
        name: &str,
        value: &str,
    ) -> Result<(), ChallengeError> {
        let Some(hook) = hook else {
            return Err(ChallengeError::NoHook(name.to_string()));
        };
        if !is_base64url(value, false) {
            return Err(ChallengeError::BadToken(value.to_string()));
        }
        let failed = |message: String| ChallengeError::Hook {
            hook: hook.display().to_string(),
            action,
            name: name.to_string(),
            message,
        };
        let mut child = std::process::Command::new(hook)
            .args([action, name, value])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run it: {e}")))?;
        let deadline = Instant::now() + HOOK_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let mut err = String::new();
                    if let Some(mut stderr) = child.stderr.take() {
                        use std::io::Read;
                        let _ = stderr.read_to_string(&mut err);
                    }
                    let err: String = err.trim().chars().take(500).collect();
                    return Err(failed(format!("{status}: {err}")));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!(
                        "did not finish within {}s",
                        HOOK_TIMEOUT.as_secs()
                    )));
                }
                Err(e) => return Err(failed(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_base64url_reaches_the_runtime_api() {
        assert!(is_base64url(
            "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0",
            false
        ));
        assert!(is_base64url("abc_-DEF.xyz-_09", true));
        for bad in ["", "a b", "a\nb", "a.b", "a/b", "a;b", "%[src]", "é"] {
            assert!(!is_base64url(bad, false), "{bad:?}");
        }
        assert!(!is_base64url("a.b c", true));
        assert!(!is_base64url(&"a".repeat(513), false));
    }
}
