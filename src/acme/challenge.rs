//! Publishing ACME challenges (I/O edge). HTTP-01: an entry `host/token → key authorization`
//! in HAProxy's challenge map, added and removed through the runtime API (no reload), and
//! added again after a reload or a restart empties it. DNS-01 (wildcards): the TXT record is published by
//! the `acme.dns_hook` command, `dns_hook set|clear _acme-challenge.<name> <value>`.

use crate::plan::ops::Op;
use crate::target::haproxy::execute;
use crate::target::haproxy::socket::RuntimeApi;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the DNS hook may take to publish or clear a record.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("the CA sent a challenge token with characters outside base64url: {0:?}")]
    BadToken(String),
    #[error("HAProxy refused the challenge answer: {0}")]
    Runtime(String),
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

/// The challenges pending on one HAProxy.
pub struct Challenges {
    runtime_socket: PathBuf,
    /// `host/token` → key authorization, while the CA may ask for it.
    pending: Mutex<BTreeMap<String, String>>,
}

/// RFC 8555 tokens and key authorizations are base64url (a key authorization joins two with
/// a dot). They go into a runtime API command: nothing else may pass.
fn is_base64url(s: &str, dot: bool) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (dot && b == b'.'))
}

impl Challenges {
    pub fn new(runtime_socket: &Path) -> Challenges {
        Challenges {
            runtime_socket: runtime_socket.to_path_buf(),
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    fn op(key: &str, value: Option<&str>) -> Op {
        match value {
            Some(value) => Op::MapAdd {
                map: super::CHALLENGE_MAP.to_string(),
                key: key.to_string(),
                value: value.to_string(),
            },
            None => Op::MapDel {
                map: super::CHALLENGE_MAP.to_string(),
                key: key.to_string(),
            },
        }
    }

    /// Answers `http://<host>/.well-known/acme-challenge/<token>` with `key_authorization`.
    /// `host` is a domain of the validated state.
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
        self.pending
            .lock()
            .expect("challenges")
            .insert(key.clone(), key_authorization.to_string());
        let api = RuntimeApi::new(&self.runtime_socket);
        execute(&api, &[Self::op(&key, Some(key_authorization))])
            .map(|_| ())
            .map_err(ChallengeError::Runtime)
    }

    /// Stops answering; an entry HAProxy no longer has (a reload) is fine.
    pub fn withdraw_http(&self, host: &str, token: &str) {
        let key = format!("{host}/{token}");
        if self
            .pending
            .lock()
            .expect("challenges")
            .remove(&key)
            .is_some()
        {
            let api = RuntimeApi::new(&self.runtime_socket);
            if let Err(e) = execute(&api, &[Self::op(&key, None)]) {
                tracing::debug!("removing ACME challenge {key}: {e}");
            }
        }
    }

    /// After a reload or a start HAProxy's challenge map is empty again (its file is): puts
    /// back the challenges still pending.
    pub fn restore(&self) {
        let pending = self.pending.lock().expect("challenges").clone();
        if pending.is_empty() {
            return;
        }
        let api = RuntimeApi::new(&self.runtime_socket);
        let ops: Vec<Op> = pending.iter().map(|(k, v)| Self::op(k, Some(v))).collect();
        match execute(&api, &ops) {
            Ok(_) => tracing::info!("{} pending ACME challenge(s) put back", ops.len()),
            Err(e) => tracing::warn!("putting pending ACME challenges back: {e}"),
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
