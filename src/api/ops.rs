//! What the API does, apart from HTTP: register and authenticate agents, add and remove their
//! routes, list them. Each change is checked (fields, ownership, the same validation as the YAML
//! path) and written as the agent's fragment; the HTTP layer then reconciles and answers once
//! the change is live. Blocking code: handlers run it with `spawn_blocking`.

use super::auth::{AdminToken, Kind, RateLimiter, TokenStore, ct_eq, hash_secret};
use super::certs::{Ca, Issued};
use super::store::{self, AgentEntry, Commit, Fragment, Store};
use crate::model::names::{self, Duration as StateDuration};
use crate::model::{ListenerKind, Model, ServerTarget, TcpTls, validate};
use crate::spec::load::Source;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
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
}

impl ApiError {
    pub fn new(status: u16, error: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            success: false,
            error,
            message: message.into(),
            fields: BTreeMap::new(),
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
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal", message)
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

/// The `api:` settings of the state.
#[derive(Debug, Clone)]
pub struct Settings {
    pub apps_domain: Option<String>,
    pub mongodb_domain: Option<String>,
    pub mongodb_listener: Option<String>,
    pub mongodb_port: Option<u16>,
    pub git_commit: bool,
    pub token_ttl: Duration,
    pub allowed_networks: Vec<(IpAddr, u8)>,
}

impl Settings {
    pub fn from_model(model: &Model) -> Settings {
        let api = model.api.clone().unwrap_or(Value::Null);
        let text = |k: &str| api.get(k).and_then(Value::as_str).map(str::to_string);
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
                .unwrap_or(StateDuration::from_ms(24 * 3_600_000))
                .as_std(),
            allowed_networks: api
                .get("allowed_networks")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().and_then(parse_network))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

fn parse_network(text: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = text.split_once('/')?;
    Some((ip.parse().ok()?, bits.parse().ok()?))
}

fn in_network(ip: IpAddr, (net, bits): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// An agent's address must be one the world can reach (or an allowed network of the platform):
/// not loopback, private, link-local, shared (CGNAT), multicast or unspecified.
pub fn check_target_ip(text: &str, settings: &Settings) -> Result<IpAddr, String> {
    let ip: IpAddr = text.trim().parse().map_err(|_| {
        format!(
            "`{}` is not an IP address",
            text.chars().take(64).collect::<String>()
        )
    })?;
    if settings.allowed_networks.iter().any(|n| in_network(ip, *n)) {
        return Ok(ip);
    }
    let public = match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast()
                || in_network(ip, ("100.64.0.0".parse().unwrap(), 10)))
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (a.segments()[0] & 0xfe00) == 0xfc00
                || (a.segments()[0] & 0xffc0) == 0xfe80)
        }
    };
    if public {
        Ok(ip)
    } else {
        Err(format!(
            "{ip} is not a public address; the administrator can allow a network with `api.allowed_networks`"
        ))
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

pub struct Api {
    pub tokens: TokenStore,
    pub admin: AdminToken,
    pub limiter: RateLimiter,
    pub ca: Ca,
    pub store: Store,
    /// The last state that validated (published by the reconcile loop).
    pub model: Arc<Mutex<Option<Arc<Model>>>>,
    pub data_dir: PathBuf,
}

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

/// The port of a target URL (`http://127.0.0.1:3000`): the route goes to the agent's address
/// and this port; the URL's host is not used.
pub fn port_of_url(url: &str) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .map(|r| (r, 80))
        .or_else(|| url.strip_prefix("https://").map(|r| (r, 443)));
    let Some((rest, default)) = rest else {
        return Err("write an http:// or https:// URL such as http://127.0.0.1:3000".into());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty()
        || !authority.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
    {
        return Err("the URL's host is not valid".into());
    }
    let port = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') && host.contains(':') => {
            return Err(format!("write IPv6 hosts in brackets: [{host}]:{port}"));
        }
        Some((_, port)) if !port.contains(']') => names::parse_port(port)?,
        _ => default,
    };
    Ok(port)
}

/// The backend an agent's app lives in: `<agent>--<subdomain>`, or a digest when too long.
pub fn backend_name(agent: &str, what: &str) -> String {
    let name = format!("{agent}--{what}");
    if name.len() <= 63 {
        name
    } else {
        format!("app-{}", &hash_secret(&format!("{agent}/{what}"))[..20])
    }
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

    /// The key hash the state declares for `agent`: in its fragment, or in the administrator's
    /// files.
    fn declared_key(
        &self,
        agent: &str,
        fragment: Option<&Fragment>,
        model: &Model,
    ) -> Option<String> {
        fragment
            .and_then(|f| f.agents.get(agent))
            .and_then(|a| a.key_sha256.clone())
            .or_else(|| {
                model
                    .document()
                    .pointer(&format!("/agents/{agent}/key_sha256"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
    }

    /// An agent declared by the administrator (not through the API): its entry is not the API's.
    fn admin_declared(&self, agent: &str, model: &Model) -> bool {
        model
            .document()
            .pointer(&format!("/agents/{agent}"))
            .is_some_and(|a| a.get("owner").and_then(Value::as_str) != Some(agent))
    }

    /// Checks the agent's key (the hash the state declares, else a one-time enrollment token).
    fn prove(
        &self,
        agent: &str,
        key: &str,
        fragment: Option<&Fragment>,
        model: &Model,
        enrolling: bool,
    ) -> Result<(), ApiError> {
        match self.declared_key(agent, fragment, model) {
            Some(hash) if ct_eq(&hash, &hash_secret(key)) => Ok(()),
            Some(_) => Err(ApiError::unauthorized("the agent key does not match")),
            None if enrolling
                && self
                    .tokens
                    .consume_enrollment(agent, key)
                    .map_err(|e| ApiError::internal(e.to_string()))? =>
            {
                Ok(())
            }
            None => Err(ApiError::unauthorized(format!(
                "agent `{agent}` is not known: the administrator enrolls it with `lunafront agent enroll {agent}` (its key is the enrollment token) or declares its key_sha256"
            ))),
        }
    }

    /// Registers (or re-registers) an agent: proves its key, records its address, and returns
    /// a new token and its certificate.
    pub fn register(
        &self,
        agent: &str,
        key: &str,
        target_ip: &str,
    ) -> Result<(String, IpAddr, Option<Issued>), ApiError> {
        let (model, settings) = self.settings()?;
        let mut errors = BTreeMap::new();
        if !names::is_identifier(agent) {
            field(&mut errors, "agentId", names::IDENTIFIER_RULE);
        }
        if key.len() < 16 || key.len() > 512 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            field(&mut errors, "agentKey", "16 to 512 printable characters");
        }
        let ip = check_target_ip(target_ip, &settings)
            .map_err(|e| field(&mut errors, "targetIp", e))
            .ok();
        let Some(ip) = ip.filter(|_| errors.is_empty()) else {
            return Err(ApiError::fields(errors));
        };
        let _guard = self.store.lock();
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut fragment = all.get(agent).cloned().unwrap_or_default();
        self.prove(agent, key, all.get(agent), &model, true)?;
        if self.admin_declared(agent, &model) {
            let declared = model.agents.get(agent).map(|a| a.address);
            if declared != Some(ip) {
                return Err(ApiError::conflict(format!(
                    "agent `{agent}`'s address is managed by the administrator ({}); it cannot be changed through the API",
                    declared.map(|a| a.to_string()).unwrap_or_default()
                )));
            }
        } else {
            // An address belongs to one agent: another cannot take over its routes.
            let taken = model
                .agents
                .iter()
                .filter(|(name, _)| *name != agent)
                .any(|(_, a)| a.address == ip)
                || all
                    .iter()
                    .filter(|(name, _)| *name != agent)
                    .any(|(_, f)| f.agents.values().any(|a| a.address == ip.to_string()));
            if taken {
                return Err(ApiError::conflict(format!(
                    "{ip} is the address of another agent"
                )));
            }
            fragment.agents.insert(
                agent.to_string(),
                AgentEntry {
                    address: ip.to_string(),
                    key_sha256: Some(hash_secret(key)),
                    owner: Some(agent.to_string()),
                    other: fragment
                        .agents
                        .get(agent)
                        .map(|a| a.other.clone())
                        .unwrap_or_default(),
                },
            );
            self.save(
                agent,
                &fragment,
                &model,
                &settings,
                agent,
                format!("register agent {agent} at {ip}"),
            )?;
        }
        let token = self
            .tokens
            .issue(agent, Kind::Agent, settings.token_ttl)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let certs = self.certificate(agent, &settings)?;
        Ok((token, ip, certs))
    }

    /// A new token for an agent that proves its key.
    pub fn authenticate(&self, agent: &str, key: &str) -> Result<String, ApiError> {
        let (model, settings) = self.settings()?;
        if !names::is_identifier(agent) {
            return Err(ApiError::fields(
                [("agentId".to_string(), names::IDENTIFIER_RULE.to_string())].into(),
            ));
        }
        let fragment = self
            .store
            .read(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.prove(agent, key, fragment.as_ref(), &model, false)?;
        self.tokens
            .issue(agent, Kind::Agent, settings.token_ttl)
            .map_err(|e| ApiError::internal(e.to_string()))
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
        let document = model.document();
        let entry = document.get("domains").and_then(|d| d.get(domain))?;
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

    pub fn add_http_route(
        &self,
        caller: &Caller,
        agent: &str,
        subdomain: &str,
        target_url: &str,
        use_tls: bool,
        check: bool,
    ) -> Result<Route, ApiError> {
        caller.must_act_for(agent)?;
        let (model, settings) = self.settings()?;
        let mut errors = BTreeMap::new();
        if let Err(e) = check_label(subdomain) {
            field(&mut errors, "subdomain", e);
        }
        let port = port_of_url(target_url)
            .map_err(|e| field(&mut errors, "targetUrl", e))
            .ok();
        if !errors.is_empty() {
            return Err(ApiError::fields(errors));
        }
        let apps = settings
            .apps_domain
            .clone()
            .ok_or_else(|| ApiError::unavailable("the state sets no `api.apps_domain`"))?;
        let domain = format!("{subdomain}.{apps}");
        let port = port.expect("checked");
        let _guard = self.store.lock();
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
        fragment.route(
            agent,
            &domain,
            store::Route {
                backend: backend_name(agent, subdomain),
                port,
                listener: None,
                health_check: check.then_some(serde_yaml::Value::Bool(true)),
                tls: use_tls.then_some(serde_yaml::Value::Bool(true)),
            },
        );
        self.save(
            agent,
            &fragment,
            &model,
            &settings,
            caller.name(),
            format!("route {domain} to agent {agent} port {port}"),
        )?;
        Ok(Route {
            agent_id: agent.to_string(),
            subdomain: subdomain.to_string(),
            domain,
            target_url: target_url.to_string(),
            kind: "http".into(),
        })
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

    pub fn add_mongodb(
        &self,
        caller: &Caller,
        agent: &str,
        target_ip: &str,
        port: u16,
        use_tls: bool,
    ) -> Result<MongoRoute, ApiError> {
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
        let mut errors = BTreeMap::new();
        if port == 0 {
            field(&mut errors, "targetPort", "a TCP port, 1-65535");
        }
        if passthrough && !use_tls {
            field(
                &mut errors,
                "useTls",
                "the MongoDB listener passes TLS through to mongod: mongod must serve TLS (useTls: true)",
            );
        }
        let _guard = self.store.lock();
        let all = self
            .store
            .read_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut fragment = all.get(agent).cloned().unwrap_or_default();
        let address = fragment
            .agents
            .get(agent)
            .and_then(|a| a.address.parse::<IpAddr>().ok())
            .or_else(|| model.agents.get(agent).map(|a| a.address));
        let Some(address) = address else {
            return Err(ApiError::not_found(format!(
                "agent `{agent}` is not registered"
            )));
        };
        match target_ip.trim().parse::<IpAddr>() {
            Ok(ip) if ip == address => {}
            _ => field(
                &mut errors,
                "targetIp",
                format!(
                    "must be the agent's registered address ({address}); register again to change it"
                ),
            ),
        }
        if !errors.is_empty() {
            return Err(ApiError::fields(errors));
        }
        let domain = format!("{agent}.{domain_root}");
        if let Some(owner) = self.other_owner(agent, &domain, &all, &model) {
            return Err(ApiError::conflict(format!("{domain} belongs to {owner}")));
        }
        let tls = match (&listener.kind, use_tls) {
            // Terminated here: HAProxy presents the name's certificate (from the private CA) and,
            // when mongod serves TLS too, verifies it against the same CA.
            (
                ListenerKind::Tcp {
                    tls: TcpTls::Terminate(certs),
                },
                use_tls,
            ) => {
                let issued = self
                    .ca
                    .for_agent(agent, &domain)
                    .map_err(ApiError::internal)?;
                let pem = format!(
                    "{}{}",
                    issued.cert_pem,
                    issued.key_pem.clone().unwrap_or_default()
                );
                crate::target::files::write_atomic(
                    &certs.dir.join(format!("{agent}.pem")),
                    pem.as_bytes(),
                    crate::target::files::SECRET_MODE,
                )
                .map_err(|e| ApiError::internal(e.to_string()))?;
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
                backend: backend_name(agent, "mongodb"),
                port,
                listener: Some(listener_name),
                health_check: Some(serde_yaml::Value::Bool(true)),
                tls,
            },
        );
        self.save(
            agent,
            &fragment,
            &model,
            &settings,
            caller.name(),
            format!("route MongoDB {domain} to agent {agent} port {port}"),
        )?;
        let public_port = settings.mongodb_port.unwrap_or(listener.bind.port);
        Ok(MongoRoute {
            connection_string: format!("mongodb://{domain}:{public_port}/?tls=true"),
            domain,
            target_ip: address.to_string(),
            target_port: port,
            tls_enabled: true,
        })
    }

    /// Removes an agent's route: `http` by subdomain, `mongodb` its database route.
    pub fn delete_route(
        &self,
        caller: &Caller,
        agent: &str,
        subdomain: &str,
        kind: &str,
    ) -> Result<String, ApiError> {
        caller.must_act_for(agent)?;
        let (model, settings) = self.settings()?;
        let domain = match kind {
            "http" => {
                check_label(subdomain)
                    .map_err(|e| ApiError::fields([("subdomain".to_string(), e)].into()))?;
                format!(
                    "{subdomain}.{}",
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
            _ => {
                return Err(ApiError::fields(
                    [("type".to_string(), "`http` or `mongodb`".to_string())].into(),
                ));
            }
        };
        self.delete_domain(caller, agent, &domain, &model, &settings)
    }

    pub fn delete_domain(
        &self,
        caller: &Caller,
        agent: &str,
        domain: &str,
        model: &Model,
        settings: &Settings,
    ) -> Result<String, ApiError> {
        let _guard = self.store.lock();
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
        self.save(
            agent,
            &fragment,
            model,
            settings,
            caller.name(),
            format!("remove route {domain} of agent {agent}"),
        )?;
        Ok(domain.to_string())
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
                    out.push(route_of(
                        agent,
                        domain,
                        entry.listener.is_some(),
                        &ip,
                        port,
                        backend.tls.is_some(),
                        &settings,
                    ));
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

    /// Validates the state with the agent's new fragment in place of its old one, then writes
    /// it. A problem in the agent's own entries is the caller's (400); others are not.
    pub fn save(
        &self,
        agent: &str,
        fragment: &Fragment,
        model: &Model,
        settings: &Settings,
        author: &str,
        message: String,
    ) -> Result<(), ApiError> {
        let old = self
            .store
            .read(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .unwrap_or_default();
        let mut doc = model.document();
        let root = doc.as_object_mut().expect("a document is an object");
        let new = fragment.to_json();
        for section in ["agents", "backends", "domains"] {
            let entries = root
                .entry(section)
                .or_insert_with(|| Value::Object(Default::default()))
                .as_object_mut()
                .expect("sections are objects");
            for key in old
                .to_json()
                .get(section)
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
            {
                entries.remove(&key);
            }
            if let Some(Value::Object(add)) = new.get(section) {
                for (k, v) in add {
                    entries.insert(k.clone(), v.clone());
                }
            }
        }
        let ours = |pointer: &str| {
            ["agents", "backends", "domains"].iter().any(|section| {
                new.get(section)
                    .and_then(Value::as_object)
                    .is_some_and(|m| {
                        m.keys().any(|k| {
                            pointer == format!("/{section}/{k}")
                                || pointer.starts_with(&format!("/{section}/{k}/"))
                        })
                    })
            })
        };
        let validation = validate(&Source::parse(Vec::new()).with_document(doc));
        let problems: BTreeMap<String, String> = validation
            .errors()
            .filter(|d| ours(&d.pointer))
            .map(|d| {
                (
                    d.pointer.clone(),
                    format!(
                        "{}{}",
                        d.message,
                        d.hint
                            .as_ref()
                            .map(|h| format!(" ({h})"))
                            .unwrap_or_default()
                    ),
                )
            })
            .collect();
        if !problems.is_empty() {
            return Err(ApiError::fields(problems));
        }
        let commit = settings.git_commit.then(|| Commit {
            author: author.to_string(),
            message,
        });
        self.store
            .write(agent, fragment, commit.as_ref())
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Removes an agent and everything it owns, and revokes its tokens (admin).
    pub fn remove_agent(&self, agent: &str) -> Result<bool, ApiError> {
        let (model, settings) = self.settings()?;
        let _guard = self.store.lock();
        let existed = self
            .store
            .read(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .is_some();
        if existed {
            self.save(
                agent,
                &Fragment::default(),
                &model,
                &settings,
                "admin",
                format!("remove agent {agent}"),
            )?;
        }
        self.tokens
            .revoke(agent)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(existed)
    }
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
        }
    } else {
        Route {
            agent_id: agent.to_string(),
            subdomain: suffix(&settings.apps_domain).unwrap_or_else(|| domain.to_string()),
            domain: domain.to_string(),
            target_url: format!("{}://{host}:{port}", if tls { "https" } else { "http" }),
            kind: "http".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls_give_their_port() {
        assert_eq!(port_of_url("http://127.0.0.1:3000"), Ok(3000));
        assert_eq!(port_of_url("https://app.internal/health"), Ok(443));
        assert_eq!(port_of_url("http://[::1]:8080/x"), Ok(8080));
        assert!(port_of_url("ftp://x:1").is_err());
        assert!(port_of_url("http://a b:1").is_err());
        assert!(port_of_url("http://x:99999").is_err());
        assert!(port_of_url("http://x:1\nserver evil").is_err());
    }

    #[test]
    fn agent_addresses_must_be_public_or_allowed() {
        let mut s = Settings {
            apps_domain: None,
            mongodb_domain: None,
            mongodb_listener: None,
            mongodb_port: None,
            git_commit: false,
            token_ttl: Duration::from_secs(1),
            allowed_networks: Vec::new(),
        };
        assert!(check_target_ip("203.0.113.7", &s).is_ok());
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.1.1",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "0.0.0.0",
        ] {
            assert!(check_target_ip(private, &s).is_err(), "{private}");
        }
        s.allowed_networks = vec![parse_network("10.0.0.0/8").unwrap()];
        assert!(check_target_ip("10.1.2.3", &s).is_ok());
        assert!(check_target_ip("not-an-ip", &s).is_err());
    }

    #[test]
    fn backend_names_stay_identifiers() {
        assert_eq!(backend_name("agent-7", "shop"), "agent-7--shop");
        let long = backend_name(&"a".repeat(40), &"b".repeat(40));
        assert!(names::is_identifier(&long), "{long}");
    }
}
