//! What the API does, apart from HTTP: register and authenticate agents, add and remove their
//! routes, list them. Each change is checked (fields, ownership, the address policy, limits)
//! and then against the whole state as it would be once written — the agent's new fragment
//! with every other state file, validated like the daemon will — and only then written as the
//! agent's fragment; the HTTP layer then reconciles and answers once the change is live.
//! Blocking code: handlers run it with `spawn_blocking`.

use super::auth::{AdminToken, Kind, Rate, RateLimiter, TokenStore, ct_eq, hash_secret};
use super::certs::{Ca, CsrError, Issued};
use super::store::{self, AgentEntry, Commit, Fragment, Store};
use crate::model::address::{self, Cidr};
use crate::model::names;
use crate::model::{ListenerKind, Model, ServerTarget, TcpTls, validate};
use crate::plan::diff::Mode as ChangeMode;
use crate::spec::diagnostics::Diagnostic;
use crate::spec::load;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An API error: the HTTP status and `{success: false, error, message}` (with `fields` naming
/// every bad input).
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    pub success: bool,
    pub error: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// Seconds until the request may be retried (429: sent as `Retry-After`).
    #[serde(rename = "retryAfter", skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, error: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            success: false,
            error,
            message: message.into(),
            fields: BTreeMap::new(),
            retry_after: None,
        }
    }
    pub fn fields(fields: BTreeMap<String, String>) -> ApiError {
        let message = fields
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            fields,
            ..ApiError::new(400, "invalid_request", message)
        }
    }
    pub fn field(name: &str, problem: impl Into<String>) -> ApiError {
        ApiError::fields([(name.to_string(), problem.into())].into())
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(401, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(403, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, "conflict", message)
    }
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "unavailable", message)
    }
    /// 403: a well-formed value the administrator's policy refuses (an address outside
    /// `api.allowed_networks`, a name the caller does not own), naming the field.
    pub fn not_allowed(name: &str, problem: impl Into<String>) -> ApiError {
        let problem = problem.into();
        ApiError {
            fields: [(name.to_string(), problem.clone())].into(),
            ..ApiError::forbidden(format!("{name}: {problem}"))
        }
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal", message)
    }
    /// 429 with the time to wait (whole seconds, at least 1).
    pub fn too_many(message: impl Into<String>, wait: Duration) -> ApiError {
        ApiError {
            retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            ..ApiError::new(429, "rate_limited", message)
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Agent(String),
}

impl Caller {
    /// An agent acts for itself only; the admin for anyone.
    pub fn must_act_for(&self, agent: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Agent(me) if me == agent => Ok(()),
            Caller::Agent(me) => Err(ApiError::forbidden(format!(
                "agent `{me}` cannot act for agent `{agent}`"
            ))),
        }
    }

    pub fn must_be_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Agent(_) => Err(ApiError::forbidden(
                "this endpoint is for the administrator",
            )),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Caller::Admin => "admin",
            Caller::Agent(a) => a,
        }
    }
}

/// The API's limits per agent (`api.limits`); the defaults are in the README.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Route changes (registrations, routes added or removed).
    pub changes: Rate,
    /// Changes that need HAProxy to reload (each reload leaves old workers serving long-lived
    /// connections until they end or `mworker_max_reloads` ends them).
    pub reloads: Rate,
    /// Domains one agent may have.
    pub routes_per_agent: usize,
    /// Registration and authentication attempts per client (not per agent: the caller has not
    /// proved who it is yet).
    pub client_attempts: Rate,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            changes: Rate {
                per_minute: 60.0,
                burst: 30.0,
            },
            reloads: Rate {
                per_minute: 12.0 / 60.0,
                burst: 4.0,
            },
            routes_per_agent: 100,
            client_attempts: Rate {
                per_minute: 30.0,
                burst: 10.0,
            },
        }
    }
}

/// The `api:` settings of the state.
#[derive(Debug, Clone)]
pub struct Settings {
    pub apps_domain: Option<String>,
    pub mongodb_domain: Option<String>,
    pub mongodb_listener: Option<String>,
    pub mongodb_port: Option<u16>,
    pub git_commit: bool,
    /// How long a token stays valid without being used; each use extends it.
    pub token_ttl: Duration,
    pub allowed_networks: Vec<Cidr>,
    pub trusted_proxies: Vec<Cidr>,
    pub limits: Limits,
}

impl Settings {
    pub fn from_model(model: &Model) -> Settings {
        let api = model.api.clone().unwrap_or(Value::Null);
        let text = |k: &str| api.get(k).and_then(Value::as_str).map(str::to_string);
        let networks = |k: &str| {
            api.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    // Validation refused any entry that does not parse.
                    a.iter()
                        .filter_map(|n| n.as_str().and_then(|n| Cidr::parse(n).ok()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let defaults = Limits::default();
        let limit = |k: &str| api.pointer(&format!("/limits/{k}")).and_then(Value::as_f64);
        Settings {
            apps_domain: text("apps_domain"),
            mongodb_domain: text("mongodb_domain"),
            mongodb_listener: text("mongodb_listener"),
            mongodb_port: api
                .get("mongodb_port")
                .and_then(Value::as_u64)
                .map(|p| p as u16),
            git_commit: api
                .get("git_commit")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            token_ttl: text("token_ttl")
                .and_then(|t| names::parse_duration(&t).ok())
                .map(|d| d.as_std())
                .unwrap_or(super::auth::DEFAULT_TOKEN_TTL),
            allowed_networks: networks("allowed_networks"),
            trusted_proxies: networks("trusted_proxies"),
            limits: Limits {
                changes: Rate {
                    per_minute: limit("changes_per_minute").unwrap_or(defaults.changes.per_minute),
                    burst: limit("change_burst").unwrap_or(defaults.changes.burst),
                },
                reloads: Rate {
                    per_minute: limit("reloads_per_hour")
                        .map(|h| h / 60.0)
                        .unwrap_or(defaults.reloads.per_minute),
                    burst: limit("reload_burst").unwrap_or(defaults.reloads.burst),
                },
                routes_per_agent: limit("routes_per_agent")
                    .map(|n| n as usize)
                    .unwrap_or(defaults.routes_per_agent),
                client_attempts: Rate {
                    per_minute: limit("client_attempts_per_minute")
                        .unwrap_or(defaults.client_attempts.per_minute),
                    burst: limit("client_attempt_burst").unwrap_or(defaults.client_attempts.burst),
                },
            },
        }
    }
}

/// `api.limits.reload_interval` (default 2s): a reload the agent API asks for comes at least
/// this long after the previous one.
pub fn reload_interval(model: &Model) -> Duration {
    model
        .api
        .as_ref()
        .and_then(|a| a.pointer("/limits/reload_interval"))
        .and_then(Value::as_str)
        .and_then(|t| names::parse_duration(t).ok())
        .map(|d| d.as_std())
        .unwrap_or(Duration::from_secs(2))
}

/// The address policy: an agent's address is one the world can reach (or in a network the
/// administrator allows), judged as what it really is. Returns the canonical address
/// (`::ffff:203.0.113.7` is recorded as `203.0.113.7`).
pub fn check_target_ip(text: &str, settings: &Settings) -> Result<IpAddr, String> {
    judge_address(parse_ip(text)?, settings)
}

/// An IP address as written (`format: ipv4` or `ipv6` in the document): no spaces around it,
/// no zone.
pub fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "`{}` is not an IP address",
            text.chars().take(64).collect::<String>().escape_debug()
        )
    })
}

pub fn judge_address(ip: IpAddr, settings: &Settings) -> Result<IpAddr, String> {
    let canonical = address::canonical(ip);
    if !address::is_connectable(ip) {
        return Err(format!(
            "{ip} is not a public address: nothing can connect to it"
        ));
    }
    if settings.allowed_networks.iter().any(|n| n.contains(ip)) {
        return Ok(canonical);
    }
    match address::special(ip) {
        None => Ok(canonical),
        Some(special) => Err(format!(
            "{ip} is not a public address: it is {special}; the administrator can allow its network with `api.allowed_networks`"
        )),
    }
}

/// A route as the CloudLunacy agent knows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub agent_id: String,
    pub subdomain: String,
    pub domain: String,
    pub target_url: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The service name the agent asked for, when the subdomain was mapped from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

/// What a MongoDB registration answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MongoRoute {
    pub domain: String,
    pub connection_string: String,
    pub target_ip: String,
    pub target_port: u16,
    pub tls_enabled: bool,
}

/// What a checked (then written) change will do once reconciled.
#[derive(Default)]
pub struct Saved {
    /// HAProxy must reload for it (the plan's typed diff says so).
    pub reload: bool,
    /// Who made the change and what it is: the commit's author and message.
    change: Commit,
    /// Committed in the state folder's git checkout (`api.git_commit`).
    commit: bool,
    /// The agent's fragment as it was when the change was checked (`--git` makes the change
    /// again on another node's commit relative to it).
    old: Fragment,
}

impl Saved {
    /// A change that needs no reload, by `caller`, made on the agent's fragment `old`.
    pub(super) fn new(
        caller: &Caller,
        message: String,
        settings: &Settings,
        old: Fragment,
    ) -> Saved {
        Saved {
            reload: false,
            change: Commit {
                author: caller.name().to_string(),
                message,
            },
            commit: settings.git_commit,
            old,
        }
    }

    /// The commit to make in the state folder's checkout, if one is made (`api.git_commit`).
    pub(super) fn commit(&self) -> Option<&Commit> {
        self.commit.then_some(&self.change)
    }
}

pub struct Api {
    pub tokens: TokenStore,
    pub admin: AdminToken,
    /// Registration and authentication attempts, per client.
    pub clients: RateLimiter<IpAddr>,
    /// Changes per agent, and among them those that force a reload.
    pub changes: RateLimiter<String>,
    pub reloads: RateLimiter<String>,
    pub ca: Ca,
    pub store: Store,
    /// The last state that validated (published by the reconcile loop).
    pub model: Arc<Mutex<Option<Arc<Model>>>>,
    /// The whole state as an accepted change makes it, validated, for the reconcile that
    /// makes the change live (it does not validate the same files again).
    pub prevalidated: crate::daemon::reconcile::Prevalidated,
    /// Route changes checked together (`batch`), one at a time per agent.
    pub batches: super::batch::Batches,
    pub agent_locks: super::batch::AgentLocks,
    pub data_dir: PathBuf,
    /// The front's own TCP listeners outside HAProxy (the API, the daemon's health/metrics
    /// port): never a route target.
    pub front: Vec<SocketAddr>,
    /// The target's own listener addresses (`binds`), which replace the listeners' binds.
    pub binds: BTreeMap<String, String>,
    /// With `--git`: each change is committed and pushed, and answered only once the remote
    /// took it.
    pub git: Option<Arc<crate::git::Repo>>,
}

/// How many times a change is made again on a newer head when another node pushed first.
pub const PUSH_ATTEMPTS: usize = 5;

fn field(errors: &mut BTreeMap<String, String>, name: &str, problem: impl Into<String>) {
    errors.insert(name.to_string(), problem.into());
}

/// A label of a DNS name, as a subdomain is.
fn check_label(label: &str) -> Result<(), String> {
    match names::check_host(label) {
        Ok(()) if !label.contains('.') && !label.contains('*') => Ok(()),
        Ok(()) => {
            Err("a subdomain is one label: letters, digits and inner hyphens, no dots".into())
        }
        Err(e) => Err(format!("{} ({})", e.message, e.hint)),
    }
}

/// The DNS label a service name is served under: the names the original front accepted and the
/// agent sends (`My_App`, `api.v2`) are identifiers; they map to lowercase with `_` and `.` as
/// `-` (`my-app`, `api-v2`). Anything that does not map to a valid label is refused.
pub fn label_of(service: &str) -> Result<String, String> {
    if !names::is_identifier(service) {
        return Err(format!(
            "a service name is {}; `{}` is not",
            names::IDENTIFIER_RULE,
            service.chars().take(64).collect::<String>().escape_debug()
        ));
    }
    let label: String = service
        .chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    // An `xn--` label is an internationalized name's ASCII form: a service name is never one
    // (the document's pattern says so, simply; a valid one would also need valid punycode).
    if label.starts_with("xn--") {
        return Err(format!(
            "`{service}` maps to `{label}`, an internationalized (xn--) label: a service name is not one"
        ));
    }
    check_label(&label).map(|()| label.clone()).map_err(|e| {
        if label == service {
            e
        } else {
            format!("`{service}` maps to `{label}`, which is not a DNS label: {e}")
        }
    })
}

/// The port of a target URL (`http://127.0.0.1:3000`) and whether it speaks TLS (`https://`):
/// the route goes to the agent's address and this port; the URL's host is not used. The
/// grammar (the document's `TargetUrl` pattern): `http` or `https`, `://`, a host (letters,
/// digits, `.`, `_`, `-`: the agent sends its IPv4 address or a name), an optional `:port`
/// (1-65535, no leading zeros; 80 or 443 without), then optionally `/`, `?` or `#` and
/// printable ASCII.
pub fn parse_target_url(url: &str) -> Result<(u16, bool), String> {
    let (rest, default, tls) = if let Some(r) = url.strip_prefix("http://") {
        (r, 80, false)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, 443, true)
    } else {
        return Err("write an http:// or https:// URL such as http://127.0.0.1:3000".into());
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !tail.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the URL may hold printable ASCII only (no spaces)".into());
    }
    let (host, port) = authority
        .find(':')
        .map_or((authority, ""), |i| authority.split_at(i));
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(
            "the URL's host is not valid: letters, digits, `.`, `_` and `-` (it is not used: the route goes to the agent's address)"
                .into(),
        );
    }
    let port = match port.strip_prefix(':') {
        None if port.is_empty() => default,
        Some(p)
            if !p.is_empty()
                && !p.starts_with('0')
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            names::parse_port(p)?
        }
        _ => return Err("the URL's port is not valid: 1-65535".into()),
    };
    Ok((port, tls))
}

/// The backend of an agent's app: `<agent>_<label>`. Injective: a label never holds `_` or
/// `.`, so the part after the last `_` tells (agent, app) apart, and no app is named like the
/// agent's MongoDB backend (`<agent>_mongodb.db`). When that is too long for a name, a digest
/// of both (`app-<128 bits>`, which holds no `_` and so cannot equal the other form).
pub fn backend_name(agent: &str, label: &str) -> String {
    let name = format!("{agent}_{label}");
    if name.len() <= 63 {
        name
    } else {
        format!("app-{}", &hash_secret(&format!("{agent}\0{label}"))[..32])
    }
}

/// The backend of an agent's MongoDB.
pub fn mongodb_backend(agent: &str) -> String {
    backend_name(agent, "mongodb.db")
}

/// The file a `tls: terminate` listener's certificate for an agent is written to, in the
/// listener's certificate folder (never an administrator's file: see `write_front_pem`).
fn front_pem_name(agent: &str) -> String {
    format!("lunafront-{agent}.pem")
}

/// Where a server on an agent at `addr` reaching `port` would land on one of the front's own
/// listeners: (address, port) pairs it binds, `None` for every local address.
fn own_listener(
    addr: IpAddr,
    port: u16,
    own: &[(Option<IpAddr>, u16)],
    local: &[IpAddr],
) -> Option<String> {
    own.iter().find_map(|(bind, p)| {
        if *p != port {
            return None;
        }
        let hit = match bind.filter(|b| !b.is_unspecified()) {
            Some(b) => address::same_host(b, addr),
            None => {
                address::is_loopback(addr) || local.iter().any(|l| address::same_host(*l, addr))
            }
        };
        hit.then(|| match bind {
            Some(b) => SocketAddr::new(*b, port).to_string(),
            None => format!("*:{port}"),
        })
    })
}

/// The machine's own addresses (every interface), for listeners bound to all of them.
fn local_addresses() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|l| l.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

impl Api {
    pub fn model(&self) -> Result<Arc<Model>, ApiError> {
        self.model.lock().expect("model").clone().ok_or_else(|| {
            ApiError::unavailable("the desired state has not validated yet; fix it and try again")
        })
    }

    pub fn settings(&self) -> Result<(Arc<Model>, Settings), ApiError> {
        let model = self.model()?;
        let settings = Settings::from_model(&model);
        Ok((model, settings))
    }

    /// The hash of the key `agent` proves itself with: the one its last enrollment set, else
    /// the one its fragment or the administrator's files declare.
    fn declared_key(
        &self,
        agent: &str,
        fragment: Option<&Fragment>,
        model: &Model,
    ) -> Option<String> {
        self.tokens
            .key_of(agent)
            .or_else(|| {
                fragment
                    .and_then(|f| f.agents.get(agent))
                    .and_then(|a| a.key_sha256.clone())
            })
            .or_else(|| admin_key(agent, model))
    }

    /// An agent declared by the administrator (not through the API): its entry is not the API's.
    fn admin_declared(&self, agent: &str, model: &Model) -> bool {
        model
            .document_pointer(&format!("/agents/{}", pointer_token(agent)))
            .is_some_and(|a| a.get("owner").and_then(Value::as_str) != Some(agent))
    }

    /// Checks the agent's key: its declared key (unless revoked), or — when registering — a
    /// one-time enrollment token, which becomes its key (a re-enrollment rotates the key).
    /// Returns whether an enrollment was used.
    fn prove(
        &self,
        agent: &str,
        key: &str,
        fragment: Option<&Fragment>,
        model: &Model,
        enrolling: bool,
    ) -> Result<bool, ApiError> {
        let hash = hash_secret(key);
        let declared = self.declared_key(agent, fragment, model);
        if let Some(declared) = &declared
            && ct_eq(declared, &hash)
            && !self.tokens.is_revoked_key(&hash)
        {
            return Ok(false);
        }
        // An enrollment token is only checked here: it is used up once the registration is
        // known to be accepted (`use_enrollment`), so a refused one can be tried again.
        if enrolling && self.tokens.verify(key, Kind::Enrollment, None).as_deref() == Some(agent) {
            return Ok(true);
        }
        Err(match declared {
            Some(d) if ct_eq(&d, &hash) => ApiError::unauthorized(format!(
                "agent `{agent}`'s key was revoked: the administrator enrolls it again with `lunafront agent enroll {agent}`"
            )),
            Some(_) => ApiError::unauthorized("the agent key does not match"),
            None => ApiError::unauthorized(format!(
                "agent `{agent}` is not known: the administrator enrolls it with `lunafront agent enroll {agent}` (its key is the enrollment token) or declares its key_sha256"
            )),
        })
    }

    /// Uses up the enrollment token `prove` accepted (401 when another registration used it
    /// meanwhile).
    fn use_enrollment(&self, agent: &str, key: &str) -> Result<(), ApiError> {
        if self
            .tokens
            .consume_enrollment(agent, key)
            .map_err(|e| ApiError::internal(e.to_string()))?
        {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "the enrollment token was used by another registration meanwhile",
            ))
        }
    }

    /// The hashes of every key `agent` has (to revoke them with its tokens).
    pub fn keys_of(&self, agent: &str) -> Vec<String> {
        let fragment = self.store.read(agent).ok().flatten();
        let model = self.model().ok();
        let mut keys: Vec<String> = [
            fragment
                .as_ref()
                .and_then(|f| f.agents.get(agent))
                .and_then(|a| a.key_sha256.clone()),
            model.as_deref().and_then(|m| admin_key(agent, m)),
        ]
        .into_iter()
        .flatten()
        .collect();
        keys.dedup();
        keys
    }

    /// Revokes an agent: its tokens and its keys (which never work again until a new
    /// enrollment). Returns how many were revoked.
    pub fn revoke(&self, agent: &str) -> Result<usize, ApiError> {
        self.tokens
            .revoke(agent, &self.keys_of(agent))
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Registers (or re-registers) an agent: proves its key, records its address, and returns
    /// a new token and its certificate. The address is `targetIp` when the address policy
    /// allows it; behind NAT the agent sends its private address (`hostname -I`), and then the
    /// address its request came from (`client`, the real client behind trusted proxies) is
    /// used instead when the policy allows that one.
    pub fn register(
        &self,
        caller: &Caller,
        agent: &str,
        key: &str,
        target_ip: &str,
        csr: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<(String, IpAddr, Option<Issued>, Saved), ApiError> {
        let (model, settings) = self.settings()?;
        let mut errors = BTreeMap::new();
        if !names::is_identifier(agent) {
            field(&mut errors, "agentId", names::IDENTIFIER_RULE);
        }
        if !is_agent_key(key) {
            field(&mut errors, "agentKey", AGENT_KEY_RULE);
        }
        let sent = match parse_ip(target_ip) {
            Ok(ip) => Some(ip),
            Err(e) => {
                field(&mut errors, "targetIp", e);
                None
            }
        };
        let csr_domain = match (csr, &settings.mongodb_domain) {
            (Some(_), None) => {
                return Err(ApiError::unavailable(
                    "the state sets no `api.mongodb_domain`: there is no name to sign a CSR for",
                ));
            }
            (_, domain) => domain.as_ref().map(|d| format!("{agent}.{d}")),
        };
        let Some(sent) = sent.filter(|_| errors.is_empty()) else {
            return Err(ApiError::fields(errors));
        };
        // Behind NAT the agent sends its private address: the address the request came from
        // is recorded instead when the policy allows that one.
        let ip = match judge_address(sent, &settings) {
            Ok(ip) => ip,
            Err(e) => client
                .and_then(|c| judge_address(c, &settings).ok())
                .ok_or_else(|| ApiError::not_allowed("targetIp", e))?,
        };
        // The CSR is read (and signed) before anything is written or used up (a one-time
        // enrollment token): a CSR that cannot be used refuses the registration whole.
        let signed = match (csr, &csr_domain) {
            (Some(csr), Some(dns)) => Some(self.ca.sign_csr(csr, dns).map_err(|e| match e {
                CsrError::Unreadable(e) => ApiError::field("csr", e),
                CsrError::OtherName(e) => ApiError::not_allowed("csr", e),
                CsrError::Signing(e) => ApiError::internal(e),
            })?),
            _ => None,
        };
        let _guard = self.store.lock();
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut fragment = all.get(agent).cloned().unwrap_or_default();
        let enrolled = self.prove(agent, key, all.get(agent), &model, true)?;
        let mut saved = Saved::default();
        if self.admin_declared(agent, &model) {
            let declared = model.agents.get(agent).map(|a| a.address);
            if !declared.is_some_and(|d| address::same_host(d, ip)) {
                return Err(ApiError::conflict(format!(
                    "agent `{agent}`'s address is managed by the administrator ({}); it cannot be changed through the API",
                    declared.map(|a| a.to_string()).unwrap_or_default()
                )));
            }
            if enrolled {
                self.use_enrollment(agent, key)?;
                self.tokens
                    .set_key(agent, &hash_secret(key))
                    .map_err(|e| ApiError::internal(e.to_string()))?;
            }
        } else {
            // An address belongs to one agent: another cannot take over its routes.
            let taken = model
                .agents
                .iter()
                .filter(|(name, _)| *name != agent)
                .any(|(_, a)| address::same_host(a.address, ip))
                || all.iter().filter(|(name, _)| *name != agent).any(|(_, f)| {
                    f.agents.values().any(|a| {
                        a.address
                            .parse::<IpAddr>()
                            .is_ok_and(|other| address::same_host(other, ip))
                    })
                });
            if taken {
                return Err(ApiError::conflict(format!(
                    "{ip} is the address of another agent"
                )));
            }
            let old = fragment.agents.get(agent).cloned();
            fragment.agents.insert(
                agent.to_string(),
                AgentEntry {
                    address: ip.to_string(),
                    // The key it proved itself with: an enrollment token becomes its key.
                    key_sha256: Some(hash_secret(key)),
                    owner: Some(agent.to_string()),
                    other: old.map(|a| a.other).unwrap_or_default(),
                },
            );
            saved = self.check(
                caller,
                agent,
                &fragment,
                &model,
                &settings,
                format!("register agent {agent} at {ip}"),
            )?;
            if enrolled {
                self.use_enrollment(agent, key)?;
            }
            saved = self.write(agent, &fragment, &model, saved)?;
        }
        let token = self
            .tokens
            .issue(agent, Kind::Agent, settings.token_ttl)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let certs = match signed {
            Some(signed) => {
                self.ca.keep(agent, &signed).map_err(ApiError::internal)?;
                Some(signed)
            }
            None => self.certificate(agent, &settings)?,
        };
        Ok((token, ip, certs, saved))
    }

    /// A new token for an agent that proves its key.
    pub fn authenticate(&self, agent: &str, key: &str) -> Result<String, ApiError> {
        self.check_key(agent, key)?;
        let (_, settings) = self.settings()?;
        self.tokens
            .issue(agent, Kind::Agent, settings.token_ttl)
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Checks an agent's key (no enrollment).
    pub fn check_key(&self, agent: &str, key: &str) -> Result<(), ApiError> {
        let (model, _) = self.settings()?;
        if !names::is_identifier(agent) {
            return Err(ApiError::field("agentId", names::IDENTIFIER_RULE));
        }
        let fragment = self
            .store
            .read(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.prove(agent, key, fragment.as_ref(), &model, false)
            .map(|_| ())
    }

    /// The agent's MongoDB server certificate, renewed when it nears its end.
    pub fn certificate(
        &self,
        agent: &str,
        settings: &Settings,
    ) -> Result<Option<Issued>, ApiError> {
        match &settings.mongodb_domain {
            Some(domain) => self
                .ca
                .for_agent(agent, &format!("{agent}.{domain}"))
                .map(Some)
                .map_err(ApiError::internal),
            None => Ok(None),
        }
    }

    /// Whether the agent is registered (in its fragment or the administrator's files).
    fn known_agent(&self, agent: &str, fragment: &Fragment, model: &Model) -> bool {
        fragment.agents.contains_key(agent) || model.agents.contains_key(agent)
    }

    /// The agent's registered address.
    fn address_of(&self, agent: &str, fragment: &Fragment, model: &Model) -> Option<IpAddr> {
        fragment
            .agents
            .get(agent)
            .and_then(|a| a.address.parse::<IpAddr>().ok())
            .or_else(|| model.agents.get(agent).map(|a| a.address))
    }

    /// Who owns `domain` now, other than `agent`: another agent or the administrator.
    fn other_owner(
        &self,
        agent: &str,
        domain: &str,
        all: &BTreeMap<String, Fragment>,
        model: &Model,
    ) -> Option<String> {
        for (owner, fragment) in all {
            if owner != agent && fragment.domains.contains_key(domain) {
                return Some(format!("agent `{owner}`"));
            }
        }
        // A name the state does not route (the common case: a new route) has no owner there;
        // looking one up reads the whole domains section.
        if !model.domains.contains_key(domain) {
            return None;
        }
        let entry = model.document_pointer(&format!("/domains/{}", pointer_token(domain)))?;
        match entry.get("owner").and_then(Value::as_str) {
            // Written by an agent's fragment: current only if that fragment still has it.
            Some(owner) if owner == agent => None,
            Some(owner) => all
                .get(owner)
                .filter(|f| f.domains.contains_key(domain))
                .map(|_| format!("agent `{owner}`")),
            None => Some("the administrator".to_string()),
        }
    }

    /// Routes the agent's service to `port` on its address: `service` is the name it asked
    /// for (mapped to a DNS label), `tls` whether the app speaks TLS (the `targetUrl`'s
    /// scheme), `check` a health check.
    #[allow(clippy::too_many_arguments)]
    pub fn add_http_route(
        &self,
        caller: &Caller,
        agent: &str,
        service: &str,
        target_url: &str,
        port: u16,
        tls: bool,
        check: bool,
    ) -> Result<(Route, Saved), ApiError> {
        caller.must_act_for(agent)?;
        let (model, settings) = self.settings()?;
        let label = label_of(service).map_err(|e| ApiError::field("subdomain", e))?;
        let apps = settings
            .apps_domain
            .clone()
            .ok_or_else(|| ApiError::unavailable("the state sets no `api.apps_domain`"))?;
        let domain = format!("{label}.{apps}");
        let _agent = self.agent_locks.lock(agent);
        let guard = self.route_lock();
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut fragment = all.get(agent).cloned().unwrap_or_default();
        if !self.known_agent(agent, &fragment, &model) {
            return Err(ApiError::not_found(format!(
                "agent `{agent}` is not registered"
            )));
        }
        if let Some(owner) = self.other_owner(agent, &domain, &all, &model) {
            return Err(ApiError::conflict(format!("{domain} belongs to {owner}")));
        }
        // Two of the agent's own services that map to one label would replace each other.
        if let Some(existing) = fragment.domains.get(&domain) {
            let before = existing.service.clone().unwrap_or_else(|| label.clone());
            if !before.eq_ignore_ascii_case(service) {
                return Err(ApiError::conflict(format!(
                    "`{service}` and `{before}` both map to {domain}: rename one of the services"
                )));
            }
        }
        if !fragment.domains.contains_key(&domain)
            && fragment.domains.len() >= settings.limits.routes_per_agent
        {
            return Err(quota(agent, &settings));
        }
        fragment.route(
            agent,
            &domain,
            store::Route {
                backend: backend_name(agent, &label),
                port,
                listener: None,
                health_check: check.then_some(serde_yaml::Value::Bool(true)),
                tls: tls.then_some(serde_yaml::Value::Bool(true)),
                service: (label != service).then(|| service.to_string()),
            },
        );
        let saved = self.save_route(
            guard,
            caller,
            agent,
            &fragment,
            &model,
            &settings,
            format!("route {domain} to agent {agent} port {port}"),
        )?;
        Ok((
            Route {
                agent_id: agent.to_string(),
                subdomain: label.clone(),
                domain,
                target_url: target_url.to_string(),
                kind: "http".into(),
                service_name: (label != service).then(|| service.to_string()),
            },
            saved,
        ))
    }

    /// The TCP listener MongoDB routes go on: `api.mongodb_listener`, or the only one.
    fn mongodb_listener<'m>(
        &self,
        model: &'m Model,
        settings: &Settings,
    ) -> Result<(String, &'m crate::model::Listener), ApiError> {
        let tcp: Vec<(&String, &crate::model::Listener)> = model
            .listeners
            .iter()
            .filter(|(_, l)| !l.is_http())
            .collect();
        let found = match &settings.mongodb_listener {
            Some(name) => tcp.into_iter().find(|(n, _)| *n == name),
            None if tcp.len() == 1 => tcp.into_iter().next(),
            None => None,
        };
        found.map(|(n, l)| (n.clone(), l)).ok_or_else(|| {
            ApiError::unavailable(
                "no MongoDB listener: set `api.mongodb_listener` to a TCP listener with TLS",
            )
        })
    }

    /// Writes the certificate the front presents for the agent on a `tls: terminate` listener
    /// into the listener's folder (renewed when due), never over a file lunafront did not
    /// write. Returns whether the file changed.
    fn write_front_pem(&self, agent: &str, dns: &str, dir: &Path) -> Result<bool, ApiError> {
        let path = dir.join(front_pem_name(agent));
        let previous = self.ca.front_certificate(agent);
        let combined =
            |i: &Issued| format!("{}{}", i.cert_pem, i.key_pem.clone().unwrap_or_default());
        let on_disk = std::fs::read_to_string(&path).ok();
        if let Some(text) = &on_disk
            && previous.as_ref().map(combined).as_deref() != Some(text.as_str())
        {
            return Err(ApiError::conflict(format!(
                "{} exists and was not written by lunafront: the administrator renames it",
                path.display()
            )));
        }
        let (issued, _) = self.ca.for_front(agent, dns).map_err(ApiError::internal)?;
        let pem = combined(&issued);
        if on_disk.as_deref() == Some(pem.as_str()) {
            return Ok(false);
        }
        crate::target::files::write_atomic(
            &path,
            pem.as_bytes(),
            crate::target::files::SECRET_MODE,
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(true)
    }

    /// Registers the agent's MongoDB. `target_ip` is what the agent believes its address is
    /// (its registered one, or its public one from an IP-echo service behind NAT): either is
    /// accepted when the address policy allows it, and the route always goes to the
    /// registered address, the one the front reaches the agent at.
    pub fn add_mongodb(
        &self,
        caller: &Caller,
        agent: &str,
        target_ip: (&str, &str),
        port: u16,
        use_tls: bool,
    ) -> Result<(MongoRoute, Saved), ApiError> {
        caller.must_act_for(agent)?;
        let (model, settings) = self.settings()?;
        let domain_root = settings
            .mongodb_domain
            .clone()
            .ok_or_else(|| ApiError::unavailable("the state sets no `api.mongodb_domain`"))?;
        let (listener_name, listener) = self.mongodb_listener(&model, &settings)?;
        let passthrough = matches!(
            listener.kind,
            ListenerKind::Tcp {
                tls: TcpTls::Passthrough
            }
        );
        let (ip_field, target_ip) = target_ip;
        let mut errors = BTreeMap::new();
        if port == 0 {
            field(&mut errors, "targetPort", "a TCP port, 1-65535");
        }
        // A well-formed request the administrator's listener cannot serve: a conflict with the
        // state, not a bad field.
        if passthrough && !use_tls {
            let mut e = ApiError::conflict(
                "useTls: the MongoDB listener passes TLS through to mongod: mongod must serve TLS (useTls: true)",
            );
            e.fields.insert(
                "useTls".into(),
                "the MongoDB listener passes TLS through to mongod: mongod must serve TLS".into(),
            );
            return Err(e);
        }
        let _guard = self.store.lock();
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut fragment = all.get(agent).cloned().unwrap_or_default();
        let Some(address) = self.address_of(agent, &fragment, &model) else {
            return Err(ApiError::not_found(format!(
                "agent `{agent}` is not registered"
            )));
        };
        let mut refused = None;
        match parse_ip(target_ip) {
            Ok(ip) if address::same_host(ip, address) => {}
            Ok(ip) => match judge_address(ip, &settings) {
                Ok(_) if another_agents_address(agent, ip, &all, &model) => {
                    refused = Some(ApiError::conflict(format!(
                        "{ip} is the address of another agent"
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    refused = Some(ApiError::not_allowed(
                        ip_field,
                        format!("{e} (the agent's registered address is {address})"),
                    ))
                }
            },
            Err(_) => field(
                &mut errors,
                ip_field,
                format!(
                    "must be an IP address: the agent's registered one ({address}) or its public one"
                ),
            ),
        }
        if !errors.is_empty() {
            return Err(ApiError::fields(errors));
        }
        if let Some(refused) = refused {
            return Err(refused);
        }
        let domain = format!("{agent}.{domain_root}");
        if let Some(owner) = self.other_owner(agent, &domain, &all, &model) {
            return Err(ApiError::conflict(format!("{domain} belongs to {owner}")));
        }
        if !fragment.domains.contains_key(&domain)
            && fragment.domains.len() >= settings.limits.routes_per_agent
        {
            return Err(quota(agent, &settings));
        }
        let mut front_pem = None;
        let tls = match (&listener.kind, use_tls) {
            // Terminated here: HAProxy presents the name's certificate (from the private CA) and,
            // when mongod serves TLS too, verifies it against the same CA.
            (
                ListenerKind::Tcp {
                    tls: TcpTls::Terminate(certs),
                },
                use_tls,
            ) => {
                front_pem = Some(certs.dir.clone());
                use_tls.then(|| {
                    let mut t = serde_yaml::Mapping::new();
                    t.insert("verify".into(), true.into());
                    t.insert(
                        "ca_file".into(),
                        self.data_dir.join("ca/ca.pem").display().to_string().into(),
                    );
                    t.insert("sni".into(), domain.clone().into());
                    serde_yaml::Value::Mapping(t)
                })
            }
            _ => None,
        };
        fragment.route(
            agent,
            &domain,
            store::Route {
                backend: mongodb_backend(agent),
                port,
                listener: Some(listener_name),
                health_check: Some(serde_yaml::Value::Bool(true)),
                tls,
                service: None,
            },
        );
        let saved = self.check(
            caller,
            agent,
            &fragment,
            &model,
            &settings,
            format!("route MongoDB {domain} to agent {agent} port {port}"),
        )?;
        // The certificate the front presents goes in place once the change is known to be
        // accepted, and before the route that needs it.
        if let Some(dir) = &front_pem {
            self.write_front_pem(agent, &domain, dir)?;
        }
        let saved = self.write(agent, &fragment, &model, saved)?;
        let public_port = settings.mongodb_port.unwrap_or(listener.bind.port);
        Ok((
            MongoRoute {
                connection_string: format!("mongodb://{domain}:{public_port}/?tls=true"),
                domain,
                target_ip: address.to_string(),
                target_port: port,
                tls_enabled: true,
            },
            saved,
        ))
    }

    /// Renews what the front presents itself (the `tls: terminate` certificates of agents'
    /// MongoDB names) when due, and warns about agents' own certificates near their end.
    /// Returns whether a file changed (then a reconcile puts it live).
    pub fn renew_certificates(&self) -> Result<bool, ApiError> {
        let (model, settings) = self.settings()?;
        let Some(root) = settings.mongodb_domain.clone() else {
            return Ok(false);
        };
        let terminate = self
            .mongodb_listener(&model, &settings)
            .ok()
            .and_then(|(_, l)| match &l.kind {
                ListenerKind::Tcp {
                    tls: TcpTls::Terminate(certs),
                } => Some(certs.dir.clone()),
                _ => None,
            });
        let _guard = self.store.lock();
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let now = crate::clock::unix_now() as i64;
        let mut changed = false;
        for (agent, fragment) in &all {
            let domain = format!("{agent}.{root}");
            if !fragment.domains.contains_key(&domain) {
                continue;
            }
            match &terminate {
                Some(dir) => match self.write_front_pem(agent, &domain, dir) {
                    Ok(c) => changed |= c,
                    Err(e) => {
                        tracing::error!(agent, "renewing {domain}'s certificate: {}", e.message)
                    }
                },
                None => {
                    if let Some(cert) = self.ca.agent_certificate(agent)
                        && cert.not_after - now < 30 * 86_400
                    {
                        tracing::warn!(
                            agent,
                            "the certificate agent {agent}'s mongod presents for {domain} ends on {}: the agent must fetch a new one (GET /api/config/{agent})",
                            crate::clock::rfc3339(cert.not_after)
                        );
                    }
                }
            }
        }
        Ok(changed)
    }

    /// Removes an agent's route: `http` by subdomain (or service name), `mongodb` its
    /// database route.
    pub fn delete_route(
        &self,
        caller: &Caller,
        agent: &str,
        subdomain: &str,
        kind: &str,
    ) -> Result<(String, Saved), ApiError> {
        caller.must_act_for(agent)?;
        let (model, settings) = self.settings()?;
        let domain = match kind {
            "http" => {
                let label = label_of(subdomain).map_err(|e| ApiError::field("subdomain", e))?;
                format!(
                    "{label}.{}",
                    settings
                        .apps_domain
                        .clone()
                        .ok_or_else(|| ApiError::unavailable(
                            "the state sets no `api.apps_domain`"
                        ))?
                )
            }
            "mongodb" => format!(
                "{agent}.{}",
                settings
                    .mongodb_domain
                    .clone()
                    .ok_or_else(|| ApiError::unavailable(
                        "the state sets no `api.mongodb_domain`"
                    ))?
            ),
            _ => return Err(ApiError::field("type", "`http` or `mongodb`")),
        };
        self.delete_domain(caller, agent, &domain, &model, &settings)
    }

    pub fn delete_domain(
        &self,
        caller: &Caller,
        agent: &str,
        domain: &str,
        model: &Arc<Model>,
        settings: &Settings,
    ) -> Result<(String, Saved), ApiError> {
        let _agent = self.agent_locks.lock(agent);
        let guard = self.route_lock();
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut fragment = all.get(agent).cloned().unwrap_or_default();
        let Some(entry) = fragment.domains.remove(domain) else {
            return Err(match self.other_owner(agent, domain, &all, model) {
                Some(owner) => ApiError::forbidden(format!("{domain} belongs to {owner}")),
                None => ApiError::not_found(format!("agent `{agent}` has no route {domain}")),
            });
        };
        if !fragment
            .domains
            .values()
            .any(|d| d.backend == entry.backend)
        {
            fragment.backends.remove(&entry.backend);
        }
        let saved = self.save_route(
            guard,
            caller,
            agent,
            &fragment,
            model,
            settings,
            format!("remove route {domain} of agent {agent}"),
        )?;
        Ok((domain.to_string(), saved))
    }

    /// Routes: of one agent (from its fragment), or every domain of the state (admin).
    pub fn routes(&self, agent: Option<&str>) -> Result<Vec<Route>, ApiError> {
        let (model, settings) = self.settings()?;
        let mut out = Vec::new();
        let address = |a: &str| model.agents.get(a).map(|x| x.address.to_string());
        match agent {
            Some(agent) => {
                let fragment = self
                    .store
                    .read(agent)
                    .map_err(|e| ApiError::internal(e.to_string()))?
                    .unwrap_or_default();
                let ip = fragment
                    .agents
                    .get(agent)
                    .map(|a| a.address.clone())
                    .or_else(|| address(agent))
                    .unwrap_or_default();
                for (domain, entry) in &fragment.domains {
                    let Some(backend) = fragment.backends.get(&entry.backend) else {
                        continue;
                    };
                    let port = backend.servers.first().map(|s| s.port).unwrap_or(0);
                    let mut route = route_of(
                        agent,
                        domain,
                        entry.listener.is_some(),
                        &ip,
                        port,
                        backend.tls.is_some(),
                        &settings,
                    );
                    route.service_name = entry.service.clone();
                    out.push(route);
                }
            }
            None => {
                let document = model.document();
                for (domain, d) in &model.domains {
                    let backend = &model.backends[&d.backend];
                    let owner = document
                        .pointer(&format!("/domains/{domain}/owner"))
                        .and_then(Value::as_str)
                        .unwrap_or("admin");
                    let (ip, port) = backend
                        .servers
                        .first()
                        .map(|s| {
                            let ip = match &s.target {
                                ServerTarget::Agent(a) => address(a).unwrap_or_default(),
                                ServerTarget::Address(ip) => ip.to_string(),
                            };
                            (ip, s.port)
                        })
                        .unwrap_or_default();
                    let tcp = d
                        .listener
                        .as_ref()
                        .and_then(|l| model.listeners.get(l))
                        .is_some_and(|l| !l.is_http());
                    out.push(route_of(
                        owner,
                        domain,
                        tcp,
                        &ip,
                        port,
                        backend.tls.is_some(),
                        &settings,
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Writes the agent's new fragment — only once the whole state, as it would be with it
    /// (every state file on disk, this file replaced), validates like the daemon will
    /// validate it, and passes the API's own rules (no route to the front's own listeners,
    /// the agent's reload budget). A problem the change would cause is refused and nothing
    /// is written: 400 naming the agent's own fields, 409 naming a conflict with another
    /// file. Problems the state already had are the administrator's, never the agent's.
    /// With `--git` the change is committed and pushed (see `write_through_git`).
    pub fn save(
        &self,
        caller: &Caller,
        agent: &str,
        fragment: &Fragment,
        model: &Model,
        settings: &Settings,
        message: String,
    ) -> Result<Saved, ApiError> {
        let saved = self.check(caller, agent, fragment, model, settings, message)?;
        self.write(agent, fragment, model, saved)
    }

    /// Everything `save` checks, writing nothing: a change that passes is written with `write`
    /// (after whatever else must be in place before the fragment is, such as a certificate).
    pub fn check(
        &self,
        caller: &Caller,
        agent: &str,
        fragment: &Fragment,
        model: &Model,
        settings: &Settings,
        message: String,
    ) -> Result<Saved, ApiError> {
        if !names::is_identifier(agent) {
            return Err(ApiError::field("id", names::IDENTIFIER_RULE));
        }
        let old = self
            .store
            .read(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .unwrap_or_default();
        let reload = self.check_change(agent, &old, fragment, model)?;
        if reload && let Caller::Agent(me) = caller {
            self.reloads
                .check(me, settings.limits.reloads)
                .map_err(|wait| {
                    ApiError::too_many(
                        format!(
                            "this change needs HAProxy to reload, and agent `{me}` may cause {} such changes at once and {} an hour; retry later",
                            settings.limits.reloads.burst,
                            settings.limits.reloads.per_minute * 60.0
                        ),
                        wait,
                    )
                })?;
        }
        Ok(Saved {
            reload,
            change: Commit {
                author: caller.name().to_string(),
                message,
            },
            commit: settings.git_commit,
            old,
        })
    }

    /// Writes the agent's fragment that `check` accepted (see `save`): with `--git`, committed
    /// and pushed (`write_through_git`); else written, and committed in the state folder's
    /// checkout with `api.git_commit`.
    pub fn write(
        &self,
        agent: &str,
        fragment: &Fragment,
        model: &Model,
        saved: Saved,
    ) -> Result<Saved, ApiError> {
        match &self.git {
            Some(repo) => self.write_through_git(
                repo,
                &saved.change,
                agent,
                saved.old.clone(),
                fragment.clone(),
                model,
            )?,
            None => self
                .store
                .write(agent, fragment, saved.commit.then_some(&saved.change))
                .map_err(|e| ApiError::internal(e.to_string()))?,
        }
        Ok(saved)
    }

    /// Checks the agent's new fragment against the whole state on disk (see `save`); returns
    /// whether the change needs HAProxy to reload (the plan's own typed diff says so).
    fn check_change(
        &self,
        agent: &str,
        old: &Fragment,
        fragment: &Fragment,
        model: &Model,
    ) -> Result<bool, ApiError> {
        let root = self.store.root();
        let file = self.store.path(agent);
        let text = fragment.text();
        let mut timer = crate::clock::PhaseTimer::new();
        let checked = self.prevalidated.checked();
        let source = load::load_path_from(
            root,
            &[(&file, text.as_deref())],
            checked.as_deref().map(|c| &c.base),
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
        timer.lap("load");
        let validation =
            crate::model::validate::validate_from_or_whole(checked.as_deref(), &source);
        timer.lap("validate");
        let whole = validation.model.is_some();
        let new_errors = self.new_errors(&validation, root);
        if !new_errors.is_empty() {
            return Err(refusal(&new_errors, fragment, &file, root));
        }
        let merged = match validation.model {
            Some(m) => m,
            None if crate::daemon::reconcile::isolation_enabled(&source.document) => crate::model::isolate::isolate(
                &source,
                &validation,
                Some(model),
            )
            .map(|i| i.model)
            .ok_or_else(|| {
                ApiError::unavailable(
                    "the state has errors the administrator must fix first; nothing was written",
                )
            })?,
            None => {
                return Err(ApiError::unavailable(format!(
                    "the state has errors the administrator must fix first ({}); nothing was written",
                    validation
                        .errors()
                        .map(|d| d.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
        };
        self.check_own_listeners(agent, fragment, &merged)?;
        timer.lap("own listeners");
        // The daemon would hold a change that removes this much (`global.delete_guard`): the
        // answer would be "saved but not live". An API call removes a few at a time.
        if let Some(mass) = crate::plan::MassDelete::between(model, &merged) {
            return Err(ApiError::conflict(format!(
                "the change removes {} of {} domains and {} of {} backends: more than `global.delete_guard` lets one change remove (more than {} and more than {}%); nothing was written: remove the routes a few at a time, or the administrator removes them in the files",
                mass.domains_removed,
                mass.domains_before,
                mass.backends_removed,
                mass.backends_before,
                mass.count,
                mass.percent
            )));
        }
        timer.lap("mass delete");
        let reload = Self::needs_reload(&self.reload_diff(model, &merged), agent, old, fragment);
        timer.lap("diff");
        tracing::debug!(phases = %timer, "API check timings");
        // The state validated whole (not with entries held back): the reconcile that makes
        // the change live reads these same files and need not validate them again.
        if whole {
            self.prevalidated
                .keep(source, Arc::new(merged), validation.diagnostics);
        }
        Ok(reload)
    }

    /// The plan's own typed diff between the state running and the state with the change(s),
    /// for `needs_reload`. Slots are left out (the same on both sides): an app takes a free
    /// slot at runtime, and the pool grows by a reload only once per many new apps, which the
    /// route quota bounds.
    pub(super) fn reload_diff(
        &self,
        model: &Model,
        merged: &Model,
    ) -> Vec<crate::plan::diff::Change> {
        let pools = crate::render::layout::SlotPools::default();
        let slots = crate::plan::diff::Slots {
            before: &pools,
            after: &pools,
        };
        crate::plan::diff::diff_models(model, merged, &slots)
    }

    /// Whether the agent's change from fragment `old` to `fragment` needs HAProxy to reload:
    /// a change of `diff` that needs one names the agent or one of the entries either holds.
    pub(super) fn needs_reload(
        diff: &[crate::plan::diff::Change],
        agent: &str,
        old: &Fragment,
        fragment: &Fragment,
    ) -> bool {
        let names: BTreeSet<String> = [agent.to_string()]
            .into_iter()
            .chain(fragment.backends.keys().cloned())
            .chain(fragment.domains.keys().cloned())
            .chain(old.backends.keys().cloned())
            .chain(old.domains.keys().cloned())
            .collect();
        diff.iter().any(|c| {
            c.mode == ChangeMode::Reload
                && names
                    .iter()
                    .any(|n| c.name == *n || c.name.starts_with(&format!("{n}/")))
        })
    }

    /// With `--git`: writes the fragment, commits it (the agent or admin as author) and pushes
    /// it; git is the arbiter between nodes. When another node pushed first, the remote's new
    /// head is fetched, must pass the same gate as any fetched commit, and the change is made
    /// again on it (`Fragment::rebased`) and checked again against the state there — a conflict
    /// with what the other node wrote is a 409 with nothing pushed — then pushed again, at most
    /// `PUSH_ATTEMPTS` times. A remote that cannot be reached (or a push that fails otherwise)
    /// drops the local commit: 503, nothing changed. The caller holds the store's lock, which
    /// is the clone's.
    fn write_through_git(
        &self,
        repo: &crate::git::Repo,
        change: &Commit,
        agent: &str,
        mut old: Fragment,
        mut fragment: Fragment,
        model: &Model,
    ) -> Result<(), ApiError> {
        use crate::git::{GitError, short};
        let file = self.store.path(agent);
        let rel = file
            .strip_prefix(self.store.root())
            .unwrap_or(&file)
            .to_path_buf();
        let internal = |e: GitError| ApiError::internal(e.to_string());
        let unavailable = |what: String| {
            ApiError::unavailable(format!(
                "{what}; nothing was changed (the change was not pushed, so no node applies it)"
            ))
        };
        for _ in 0..PUSH_ATTEMPTS {
            let base = repo.head().map_err(internal)?;
            // Drops what this attempt wrote or committed: the clone is back at `base`.
            let undo = || {
                if let Err(e) = repo.move_to(&base) {
                    tracing::error!("git: cannot drop the change not pushed: {e}");
                }
            };
            self.store
                .write(agent, &fragment, None)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            match repo.commit(&[&rel], &change.author, &change.message) {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()), // the file already holds this change
                Err(e) => {
                    undo();
                    return Err(internal(e));
                }
            }
            let rejected = match repo.push() {
                Ok(()) => {
                    if let Some(m) = self.git_metrics() {
                        m.pushes_ok
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(GitError::Rejected) => GitError::Rejected,
                Err(e) => {
                    undo();
                    return Err(unavailable(format!(
                        "the git remote {} did not take the change ({e})",
                        repo.shown_url()
                    )));
                }
            };
            if let Some(m) = self.git_metrics() {
                m.pushes_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::info!(agent, "{rejected}: making the change again on the new head");
            let remote = match repo.fetch() {
                Ok(remote) => remote,
                Err(e) => {
                    undo();
                    return Err(unavailable(format!(
                        "the git remote {} cannot be reached ({e})",
                        repo.shown_url()
                    )));
                }
            };
            if !repo.options.allow_rewrite && !repo.is_ancestor(&base, &remote).map_err(internal)? {
                undo();
                return Err(unavailable(format!(
                    "the branch {} was rewritten (force-pushed) and this node refuses rewrites",
                    repo.options.branch
                )));
            }
            if let Err((_, why, _)) = crate::git::sync::gate(repo, &remote) {
                undo();
                return Err(unavailable(format!(
                    "the remote's branch is at commit {}, which this node refuses: {why}",
                    short(&remote)
                )));
            }
            // A newer valid commit: the clone follows it (as the next fetch would), and the
            // change is made again there.
            repo.move_to(&remote).map_err(internal)?;
            let current = self
                .store
                .read(agent)
                .map_err(|e| ApiError::internal(e.to_string()))?
                .unwrap_or_default();
            fragment = fragment.rebased(&old, &current);
            old = current;
            self.check_change(agent, &old, &fragment, model)?;
        }
        Err(ApiError::unavailable(format!(
            "other nodes pushed first {PUSH_ATTEMPTS} times in a row; nothing was changed, retry"
        )))
    }

    /// The daemon's git counters, when it has them.
    fn git_metrics(&self) -> Option<&crate::git::sync::GitMetrics> {
        self.git.as_deref().map(|r| r.metrics.as_ref())
    }

    /// The errors of `validation` that the state on disk does not have already.
    fn new_errors(&self, validation: &crate::model::Validation, root: &Path) -> Vec<Diagnostic> {
        let errors: Vec<&Diagnostic> = validation.errors().collect();
        if errors.is_empty() {
            return Vec::new();
        }
        let key = |d: &Diagnostic| (d.code, d.pointer.clone(), d.message.clone());
        let before: BTreeSet<_> = load::load_path(root)
            .map(|s| validate(&s).errors().map(key).collect())
            .unwrap_or_default();
        errors
            .into_iter()
            .filter(|d| !before.contains(&key(d)))
            .cloned()
            .collect()
    }

    /// No server of the agent may reach one of the front's own listeners (HAProxy's binds,
    /// the API, the daemon's health and metrics port), whatever `allowed_networks` says.
    pub(super) fn check_own_listeners(
        &self,
        agent: &str,
        fragment: &Fragment,
        merged: &Model,
    ) -> Result<(), ApiError> {
        let Some(addr) = merged.agents.get(agent).map(|a| a.address) else {
            return Ok(());
        };
        let served = merged.with_binds(&self.binds);
        let mut own: Vec<(Option<IpAddr>, u16)> = served
            .listeners
            .values()
            .map(|l| (l.bind.addr, l.bind.port))
            .collect();
        own.extend(self.front.iter().map(|a| (Some(a.ip()), a.port())));
        let needs_local = own
            .iter()
            .any(|(a, _)| a.is_none_or(|a| a.is_unspecified()));
        let local = if needs_local {
            local_addresses()
        } else {
            Vec::new()
        };
        for (name, backend) in &fragment.backends {
            for server in backend.servers.iter().filter(|s| s.agent == agent) {
                if let Some(listener) = own_listener(addr, server.port, &own, &local) {
                    return Err(ApiError::forbidden(format!(
                        "backend {name}: agent `{agent}` at {addr} port {} is the front server's own listener {listener}: never a route target",
                        server.port
                    )));
                }
            }
        }
        Ok(())
    }

    /// Removes an agent and everything it owns, and revokes its tokens and keys (admin).
    /// Returns whether it had a fragment (false: only tokens, such as an enrollment not used
    /// yet). An agent the administrator's files declare is theirs to remove (409), and one
    /// nothing knows is a 404.
    pub fn remove_agent(&self, agent: &str) -> Result<bool, ApiError> {
        if !names::is_identifier(agent) {
            return Err(ApiError::field("id", names::IDENTIFIER_RULE));
        }
        let (model, settings) = self.settings()?;
        let keys = self.keys_of(agent);
        let _guard = self.store.lock();
        if self.admin_declared(agent, &model) {
            return Err(ApiError::conflict(format!(
                "agent `{agent}` is declared in the administrator's files: remove it there (its routes one by one through DELETE /v1/agents/{agent}/routes/{{domain}})"
            )));
        }
        let existed = self
            .store
            .read(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .is_some();
        if !existed && !self.tokens.knows(agent) {
            return Err(ApiError::not_found(format!("agent `{agent}` is not known")));
        }
        if existed {
            self.save(
                &Caller::Admin,
                agent,
                &Fragment::default(),
                &model,
                &settings,
                format!("remove agent {agent}"),
            )?;
        }
        self.tokens
            .revoke(agent, &keys)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(existed)
    }

    /// The agent other than `agent` registered at `ip` (an address belongs to one agent),
    /// in the administrator's files or an agent's fragment.
    pub fn agent_at(
        &self,
        agent: &str,
        ip: IpAddr,
        model: &Model,
    ) -> Result<Option<String>, ApiError> {
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(model
            .agents
            .iter()
            .find(|(name, a)| *name != agent && address::same_host(a.address, ip))
            .map(|(name, _)| name.clone())
            .or_else(|| {
                all.iter()
                    .filter(|(name, _)| *name != agent)
                    .find(|(_, f)| {
                        f.agents.values().any(|a| {
                            a.address
                                .parse::<IpAddr>()
                                .is_ok_and(|other| address::same_host(other, ip))
                        })
                    })
                    .map(|(name, _)| name.clone())
            }))
    }
}

/// What an agent key (or enrollment token) is: 16 to 512 printable ASCII characters.
pub const AGENT_KEY_RULE: &str = "16 to 512 printable ASCII characters (no spaces)";

pub fn is_agent_key(key: &str) -> bool {
    (16..=512).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// The key hash the administrator's files declare for `agent`.
fn admin_key(agent: &str, model: &Model) -> Option<String> {
    model
        .document_pointer(&format!("/agents/{}/key_sha256", pointer_token(agent)))
        .and_then(|v| v.as_str().map(str::to_string))
}

/// A name as one token of a JSON pointer (`~` and `/` escaped).
fn pointer_token(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

fn quota(agent: &str, settings: &Settings) -> ApiError {
    ApiError::new(
        403,
        "quota_exceeded",
        format!(
            "agent `{agent}` has {} routes, its quota (api.limits.routes_per_agent): remove one, or the administrator raises the quota",
            settings.limits.routes_per_agent
        ),
    )
}

/// Whether `ip` is the registered address of an agent other than `agent`.
fn another_agents_address(
    agent: &str,
    ip: IpAddr,
    all: &BTreeMap<String, Fragment>,
    model: &Model,
) -> bool {
    model
        .agents
        .iter()
        .any(|(name, a)| name != agent && address::same_host(a.address, ip))
        || all.iter().filter(|(name, _)| *name != agent).any(|(_, f)| {
            f.agents.values().any(|a| {
                a.address
                    .parse::<IpAddr>()
                    .is_ok_and(|other| address::same_host(other, ip))
            })
        })
}

/// The answer to a change the state would refuse: 400 naming the agent's own fields when every
/// problem is in what the agent wrote, else 409 naming the conflict (a name another file
/// defines, an entry of someone else that the change breaks).
fn refusal(errors: &[Diagnostic], fragment: &Fragment, file: &Path, root: &Path) -> ApiError {
    let entries: Vec<String> = ["agents", "backends", "domains"]
        .iter()
        .flat_map(|section| {
            let json = fragment.to_json();
            json.get(*section)
                .and_then(Value::as_object)
                .map(|m| {
                    m.keys()
                        .map(|k| format!("/{section}/{}", k.replace('~', "~0").replace('/', "~1")))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    let ours = |d: &Diagnostic| {
        d.code != "duplicate-key"
            && d.location.as_ref().is_none_or(|l| l.file == file)
            && entries
                .iter()
                .any(|e| d.pointer == *e || d.pointer.starts_with(&format!("{e}/")))
    };
    let describe = |d: &Diagnostic| match &d.hint {
        Some(h) => format!("{} ({h})", d.message),
        None => d.message.clone(),
    };
    if errors.iter().all(ours) {
        return ApiError::fields(
            errors
                .iter()
                .map(|d| (d.pointer.clone(), describe(d)))
                .collect(),
        );
    }
    // Each problem at its place in the state folder (`admin.yaml:3:5`), so the conflict is named.
    let place = |d: &Diagnostic| match &d.location {
        Some(l) => format!(
            "{}:{}:{}: ",
            l.file.strip_prefix(root).unwrap_or(&l.file).display(),
            l.line,
            l.column
        ),
        None => String::new(),
    };
    let explain = |d: &Diagnostic| match d.code {
        "duplicate-key" => format!(
            "{} (another agent or the administrator already uses this name)",
            d.message
        ),
        _ => describe(d),
    };
    let mut e = ApiError::conflict(format!(
        "the change conflicts with the rest of the state, nothing was written: {}",
        errors
            .iter()
            .map(|d| format!("{}{}", place(d), explain(d)))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    e.fields = errors
        .iter()
        .map(|d| (d.pointer.clone(), format!("{}{}", place(d), explain(d))))
        .collect();
    e
}

fn route_of(
    agent: &str,
    domain: &str,
    tcp: bool,
    ip: &str,
    port: u16,
    tls: bool,
    settings: &Settings,
) -> Route {
    let suffix = |root: &Option<String>| {
        root.as_ref()
            .and_then(|r| domain.strip_suffix(&format!(".{r}")))
            .map(str::to_string)
    };
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    if tcp {
        Route {
            agent_id: agent.to_string(),
            subdomain: suffix(&settings.mongodb_domain).unwrap_or_else(|| domain.to_string()),
            domain: domain.to_string(),
            target_url: format!("tcp://{host}:{port}"),
            kind: "mongodb".into(),
            service_name: None,
        }
    } else {
        Route {
            agent_id: agent.to_string(),
            subdomain: suffix(&settings.apps_domain).unwrap_or_else(|| domain.to_string()),
            domain: domain.to_string(),
            target_url: format!("{}://{host}:{port}", if tls { "https" } else { "http" }),
            kind: "http".into(),
            service_name: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls_give_their_port() {
        let port_of_url = |url: &str| parse_target_url(url).map(|(port, _)| port);
        assert_eq!(port_of_url("http://127.0.0.1:3000"), Ok(3000));
        assert_eq!(port_of_url("https://app.internal/health"), Ok(443));
        assert!(port_of_url("http://[::1]:8080/x").is_err(), "no IPv6 hosts");
        assert!(port_of_url("http://x:080").is_err(), "no leading zeros");
        assert!(port_of_url("http://x:").is_err());
        assert!(port_of_url("ftp://x:1").is_err());
        assert!(port_of_url("http://a b:1").is_err());
        assert!(port_of_url("http://x:99999").is_err());
        assert!(port_of_url("http://x:1\nserver evil").is_err());
    }

    fn settings() -> Settings {
        Settings {
            apps_domain: None,
            mongodb_domain: None,
            mongodb_listener: None,
            mongodb_port: None,
            git_commit: false,
            token_ttl: Duration::from_secs(1),
            allowed_networks: Vec::new(),
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
        }
    }

    #[test]
    fn target_url_schemes_say_whether_the_app_speaks_tls() {
        assert_eq!(parse_target_url("http://10.0.0.5:3000"), Ok((3000, false)));
        assert_eq!(
            parse_target_url("https://10.0.0.5:3443/x"),
            Ok((3443, true))
        );
        assert_eq!(parse_target_url("https://app.internal"), Ok((443, true)));
    }

    #[test]
    fn agent_addresses_must_be_public_or_allowed_judged_as_what_they_are() {
        let mut s = settings();
        assert_eq!(
            check_target_ip("93.184.216.34", &s),
            Ok("93.184.216.34".parse().unwrap())
        );
        assert_eq!(
            check_target_ip("::ffff:93.184.216.34", &s),
            Ok("93.184.216.34".parse().unwrap()),
            "recorded as the IPv4 address it is"
        );
        for private in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "2002:7f00:1::1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "0.1.2.3",
            "240.0.0.1",
            "198.18.0.1",
            "203.0.113.7",
            "::1",
            "fd00::1",
            "fec0::1",
            "fe80::1",
            "::",
        ] {
            let e = check_target_ip(private, &s).unwrap_err();
            assert!(e.contains("not a public address"), "{private}: {e}");
        }
        s.allowed_networks = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        assert!(check_target_ip("10.1.2.3", &s).is_ok());
        assert!(check_target_ip("::ffff:10.1.2.3", &s).is_ok());
        assert!(check_target_ip("not-an-ip", &s).is_err());
        // Whatever is allowed, nothing can connect to these.
        s.allowed_networks = vec![Cidr::parse("0.0.0.0/0").unwrap()];
        assert!(check_target_ip("0.0.0.0", &s).is_err());
        assert!(check_target_ip("::ffff:0.0.0.0", &s).is_err());
    }

    #[test]
    fn service_names_map_to_dns_labels_or_are_refused() {
        assert_eq!(label_of("shop").unwrap(), "shop");
        assert_eq!(label_of("My_App").unwrap(), "my-app");
        assert_eq!(label_of("api.v2").unwrap(), "api-v2");
        for bad in ["app_", "a b", "-x", "x\ny", "shop\u{0430}", &"a".repeat(64)] {
            assert!(label_of(bad).is_err(), "{bad:?}");
        }
        assert!(label_of("app_").unwrap_err().contains("maps to `app-`"));
    }

    #[test]
    fn backend_names_are_injective_identifiers() {
        assert_eq!(backend_name("agent-7", "shop"), "agent-7_shop");
        // The collision of the old `<agent>--<app>` scheme.
        assert_ne!(
            backend_name("gamma", "x--web"),
            backend_name("gamma--x", "web")
        );
        assert_ne!(backend_name("a", "mongodb"), mongodb_backend("a"));
        assert_ne!(backend_name("a_b", "c"), backend_name("a", "b-c"));
        let long = backend_name(&"a".repeat(40), &"b".repeat(40));
        assert!(names::is_identifier(&long), "{long}");
        assert_ne!(long, backend_name(&"a".repeat(41), &"b".repeat(39)));
    }

    #[test]
    fn the_front_s_own_listeners_are_found_whatever_the_address_form() {
        let own = vec![
            (Some("127.0.0.1".parse().unwrap()), 9181),
            (None, 8080),
            (Some("0.0.0.0".parse().unwrap()), 9180),
        ];
        let local = vec!["192.0.2.10".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(own_listener(ip("127.0.0.1"), 9181, &own, &local).is_some());
        assert!(own_listener(ip("::ffff:127.0.0.1"), 9181, &own, &local).is_some());
        assert!(own_listener(ip("127.0.0.2"), 9181, &own, &local).is_none());
        assert!(own_listener(ip("127.0.0.2"), 8080, &own, &local).is_some());
        assert!(own_listener(ip("192.0.2.10"), 9180, &own, &local).is_some());
        assert!(own_listener(ip("64:ff9b::c000:20a"), 8080, &own, &local).is_some());
        assert!(own_listener(ip("192.0.2.11"), 8080, &own, &local).is_none());
        assert!(own_listener(ip("127.0.0.1"), 3000, &own, &local).is_none());
    }
}
