//! `POST /hooks/git` (a forge's push webhook) proves it knows the shared secret the way forges
//! sign their hooks: GitHub, Gitea and Forgejo send `X-Hub-Signature-256: sha256=<hex>`, the
//! HMAC-SHA256 of the body under the secret (Gitea and Gogs also `X-Gitea-Signature` /
//! `X-Gogs-Signature`: the same HMAC, bare hex); GitLab sends the secret itself in
//! `X-Gitlab-Token`. Compared in constant time. A hook only asks for a fetch — what a fetch
//! brings is gated like any commit — so the secret keeps strangers from making the daemon
//! fetch, and the rate limit (in `daemon::http`) bounds what a holder of the secret can ask.

use axum::http::HeaderMap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error(
        "no signature: send X-Hub-Signature-256 (HMAC-SHA256 of the body under the hook secret) or X-Gitlab-Token"
    )]
    Missing,
    #[error("the signature does not match the hook secret")]
    Mismatch,
    #[error("the signature is not of the form `sha256=<64 hex digits>`")]
    Malformed,
}

/// Checks that the request was made by someone holding `secret`.
pub fn authenticate(secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), HookError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(signature) = header("x-hub-signature-256") {
        let hex = signature
            .trim()
            .strip_prefix("sha256=")
            .ok_or(HookError::Malformed)?;
        return check_hmac(secret, hex, body);
    }
    if let Some(hex) = header("x-gitea-signature").or_else(|| header("x-gogs-signature")) {
        return check_hmac(secret, hex.trim(), body);
    }
    if let Some(token) = header("x-gitlab-token") {
        return if crate::api::auth::ct_eq(token, secret) {
            Ok(())
        } else {
            Err(HookError::Mismatch)
        };
    }
    Err(HookError::Missing)
}

fn check_hmac(secret: &str, hex_signature: &str, body: &[u8]) -> Result<(), HookError> {
    let expected = hex::decode(hex_signature).map_err(|_| HookError::Malformed)?;
    if expected.len() != 32 {
        return Err(HookError::Malformed);
    }
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&expected).map_err(|_| HookError::Mismatch)
}

/// The `X-Hub-Signature-256` value a forge sends for `body` (for tests and scripts).
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    /// GitHub's own example from "Validating webhook deliveries": secret "It's a Secret to
    /// Everybody", payload "Hello, World!".
    #[test]
    fn github_s_documented_example_verifies() {
        let secret = "It's a Secret to Everybody";
        let body = b"Hello, World!";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(signature(secret, body), expected);
        assert_eq!(
            authenticate(secret, &headers(&[("x-hub-signature-256", expected)]), body),
            Ok(())
        );
    }

    #[test]
    fn a_wrong_secret_a_changed_body_or_no_signature_is_refused() {
        let sig = signature("right", b"{\"ref\":\"refs/heads/main\"}");
        let h = headers(&[("x-hub-signature-256", &sig)]);
        assert_eq!(
            authenticate("wrong", &h, b"{\"ref\":\"refs/heads/main\"}"),
            Err(HookError::Mismatch)
        );
        assert_eq!(
            authenticate("right", &h, b"{\"ref\":\"refs/heads/other\"}"),
            Err(HookError::Mismatch)
        );
        assert_eq!(
            authenticate("right", &HeaderMap::new(), b""),
            Err(HookError::Missing)
        );
        assert_eq!(
            authenticate("right", &headers(&[("x-hub-signature-256", "md5=00")]), b""),
            Err(HookError::Malformed)
        );
        assert_eq!(
            authenticate(
                "right",
                &headers(&[("x-hub-signature-256", "sha256=zz")]),
                b""
            ),
            Err(HookError::Malformed)
        );
    }

    #[test]
    fn gitlab_and_gitea_headers_are_understood() {
        assert_eq!(
            authenticate("s3cret", &headers(&[("x-gitlab-token", "s3cret")]), b"x"),
            Ok(())
        );
        assert_eq!(
            authenticate("s3cret", &headers(&[("x-gitlab-token", "s3cre")]), b"x"),
            Err(HookError::Mismatch)
        );
        let bare = signature("s3cret", b"x")
            .trim_start_matches("sha256=")
            .to_string();
        assert_eq!(
            authenticate("s3cret", &headers(&[("x-gitea-signature", &bare)]), b"x"),
            Ok(())
        );
    }
}
