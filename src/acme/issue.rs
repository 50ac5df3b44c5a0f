//! Talking to the ACME CA (I/O edge), through instant-acme: the account (created once, kept
//! in the store), and one order per domain — HTTP-01 for a name, DNS-01 for a wildcard —
//! finalized with a CSR made by rcgen. Returns the chain and the new key as one PEM.

use super::challenge::{ChallengeError, Challenges};
use super::store::{Store, StoreError, StoredAccount};
use crate::model::{Acme, KeyType};
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CA answered with a problem document (RFC 7807).
    #[error("{detail}")]
    Ca { kind: String, detail: String },
    #[error("cannot reach the CA: {0}")]
    Transport(String),
    #[error(transparent)]
    Challenge(#[from] ChallengeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl IssueError {
    /// A short class for metrics: the ACME problem type (`connection`, `rateLimited`, …) or
    /// where it failed (`transport`, `challenge`, `store`, `internal`).
    pub fn kind(&self) -> String {
        match self {
            IssueError::Ca { kind, .. } => kind.clone(),
            IssueError::Transport(_) => "transport".into(),
            IssueError::Challenge(_) => "challenge".into(),
            IssueError::Store(_) => "store".into(),
            IssueError::Internal(_) => "internal".into(),
        }
    }

    pub fn rate_limited(&self) -> bool {
        matches!(self, IssueError::Ca { kind, .. } if kind == "rateLimited")
    }
}

fn problem(p: &instant_acme::Problem) -> IssueError {
    let kind = p
        .r#type
        .as_deref()
        .map(|t| {
            t.trim_start_matches("urn:ietf:params:acme:error:")
                .to_string()
        })
        .unwrap_or_else(|| "unknown".into());
    let mut detail = p.detail.clone().unwrap_or_else(|| kind.clone());
    for sub in &p.subproblems {
        if let Some(d) = &sub.detail {
            detail.push_str("; ");
            detail.push_str(d);
        }
    }
    IssueError::Ca { kind, detail }
}

impl From<instant_acme::Error> for IssueError {
    fn from(e: instant_acme::Error) -> IssueError {
        match &e {
            instant_acme::Error::Api(p) => problem(p),
            instant_acme::Error::Timeout(_) => {
                IssueError::Transport("the CA did not finish in time".into())
            }
            _ => IssueError::Transport(e.to_string()),
        }
    }
}

/// An HTTP client for the directory that trusts the PEM bundle `ca_file` only.
fn client_trusting(
    ca_file: &std::path::Path,
) -> Result<Box<dyn instant_acme::HttpClient>, IssueError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let failed =
        |m: String| IssueError::Internal(format!("acme.ca_file {}: {m}", ca_file.display()));
    let pem = std::fs::read(ca_file).map_err(|e| failed(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| failed(e.to_string()))?;
        roots.add(cert).map_err(|e| failed(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(failed("holds no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| failed(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, instant_acme::BodyWrapper<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    Ok(Box::new(client))
}

/// The account for `acme.directory`: restored from the store, or created there (a new
/// directory, say staging → production, gets a new account).
pub async fn account(acme: &Acme, store: &Store) -> Result<Account, IssueError> {
    let builder = || -> Result<instant_acme::AccountBuilder, IssueError> {
        match &acme.ca_file {
            Some(file) => Ok(Account::builder_with_http(client_trusting(file)?)),
            None => Account::builder().map_err(IssueError::from),
        }
    };
    if let Some(stored) = store.account()?
        && stored.directory == acme.directory
    {
        let credentials = serde_json::from_value(stored.credentials)
            .map_err(|e| IssueError::Internal(format!("the stored ACME account: {e}")))?;
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            acme.directory.clone(),
            None,
        )
        .await?;
    store.save_account(&StoredAccount {
        directory: acme.directory.clone(),
        credentials: serde_json::to_value(&credentials).expect("credentials serialize"),
    })?;
    tracing::info!(directory = %acme.directory, "ACME account created");
    Ok(account)
}

/// What was published for an order, to take back whatever happens.
enum Published {
    Http { host: String, token: String },
    Dns { name: String, value: String },
}

/// Runs blocking publication work (the runtime socket, the hook) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, IssueError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| IssueError::Internal(e.to_string()))
}

/// Obtains a certificate for `domain`: the chain, then the private key, in one PEM.
pub async fn obtain(
    account: &Account,
    acme: &Acme,
    domain: &str,
    challenges: std::sync::Arc<Challenges>,
) -> Result<String, IssueError> {
    let identifiers = [Identifier::Dns(domain.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut published = Vec::new();
    let result = validate(&mut order, acme, &challenges, &mut published).await;
    for p in published {
        let challenges = challenges.clone();
        let hook = acme.dns_hook.clone();
        let _ = blocking(move || match p {
            Published::Http { host, token } => challenges.withdraw_http(&host, &token),
            Published::Dns { name, value } => {
                if let Err(e) = Challenges::dns_hook(hook.as_deref(), "clear", &name, &value) {
                    tracing::warn!("{e}");
                }
            }
        })
        .await;
    }
    result?;

    let algorithm = match acme.key_type {
        KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let internal = |e: rcgen::Error| IssueError::Internal(format!("making the CSR: {e}"));
    let key = rcgen::KeyPair::generate_for(algorithm).map_err(internal)?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(internal)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(internal)?;
    order.finalize_csr(csr.der()).await?;
    let chain = order
        .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
        .await?;
    if !chain.contains("-----BEGIN CERTIFICATE-----") {
        return Err(IssueError::Internal(
            "the CA's answer holds no certificate".into(),
        ));
    }
    let mut pem = chain;
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    pem.push_str(&key.serialize_pem());
    Ok(pem)
}

/// Publishes each pending authorization's challenge, tells the CA, and waits for the order to
/// be ready; an invalid order reports the CA's reason.
async fn validate(
    order: &mut instant_acme::Order,
    acme: &Acme,
    challenges: &std::sync::Arc<Challenges>,
    published: &mut Vec<Published>,
) -> Result<(), IssueError> {
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(IssueError::Ca {
                    kind: "unauthorized".into(),
                    detail: format!("the authorization is {other:?}"),
                });
            }
        }
        let identifier = authz.identifier().to_string();
        let wildcard = authz.identifier().wildcard;
        let kind = if wildcard {
            ChallengeType::Dns01
        } else {
            ChallengeType::Http01
        };
        let mut challenge = authz
            .challenge(kind.clone())
            .ok_or_else(|| IssueError::Ca {
                kind: "unsupported".into(),
                detail: format!("the CA offers no {kind:?} challenge for {identifier}"),
            })?;
        let key_authorization = challenge.key_authorization();
        if wildcard {
            let name = format!("_acme-challenge.{}", identifier.trim_start_matches("*."));
            let value = key_authorization.dns_value();
            let hook = acme.dns_hook.clone();
            let (n, v) = (name.clone(), value.clone());
            blocking(move || Challenges::dns_hook(hook.as_deref(), "set", &n, &v)).await??;
            published.push(Published::Dns { name, value });
        } else {
            let token = challenge.token.clone();
            let answer = key_authorization.as_str().to_string();
            let c = challenges.clone();
            let (host, t) = (identifier.clone(), token.clone());
            blocking(move || c.publish_http(&host, &t, &answer)).await??;
            published.push(Published::Http {
                host: identifier,
                token,
            });
        }
        challenge.set_ready().await?;
    }
    let status = order
        .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
        .await?;
    if status == OrderStatus::Ready {
        return Ok(());
    }
    // Invalid: the reason is in the failed challenge.
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        let state = authz.refresh().await?;
        for challenge in &state.challenges {
            if let Some(error) = &challenge.error {
                return Err(problem(error));
            }
        }
    }
    Err(IssueError::Ca {
        kind: "unauthorized".into(),
        detail: format!("the order is {status:?}"),
    })
}
