//! How the model maps onto HAProxy objects (part of `render`, shared with `plan`).
//!
//! The rule that makes a new app on a known agent need no reload: a backend with one server on
//! an agent and nothing backend-wide (no HTTP check path, the default balance, no `extra:`
//! lines) is *pooled*: it
//! becomes a server, named after the backend, in its agent's pool backend (`agent:<agent>` for
//! HTTP, `agent-tcp:<agent>` for TCP), and its domains route to `<pool>/<backend>` through
//! `use-server`. Every agent has both pools, empty or not, so adding such an app is an
//! `add server` and a map entry at runtime. Other backends are *dedicated*: an HAProxy backend
//! of their own name, whose servers can still be added, removed and changed at runtime.

use crate::model::{
    Backend, Balance, HealthCheck, ListenerKind, Mode, Model, ServerTarget, UpstreamTls,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The map file of HTTP domains served on every HTTP listener.
pub const SHARED_HTTP_MAP: &str = "hosts.map";

/// The map file of domains pinned to one listener (the only map of a TCP listener).
pub fn listener_map(listener: &str) -> String {
    format!("listener-{listener}.map")
}

/// The map lookups an HTTP listener's frontend makes for each request. Every lookup is a rule
/// evaluated for every request (about a microsecond each), so a frontend looks up its own map
/// only when domains are pinned to it, and tries the wildcard `*.parent` only when a wildcard
/// could match there. The first such domain is a reload (the rules appear); the others are
/// map entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HttpLookups {
    pub own: bool,
    pub wildcards: bool,
}

pub fn http_lookups(model: &Model, listener: &str) -> HttpLookups {
    let mut lookups = HttpLookups::default();
    for (host, domain) in &model.domains {
        let pinned = domain.listener.as_deref() == Some(listener);
        lookups.own |= pinned;
        lookups.wildcards |= host.starts_with("*.") && (pinned || domain.listener.is_none());
    }
    lookups
}

pub fn pool_name(agent: &str, mode: Mode) -> String {
    match mode {
        Mode::Http => format!("agent:{agent}"),
        Mode::Tcp => format!("agent-tcp:{agent}"),
    }
}

pub const NOT_FOUND_BACKEND: &str = "lunafront:not-found";
pub const REJECT_BACKEND: &str = "lunafront:reject";

/// The agent whose pool holds `backend`, or `None` when it needs a backend of its own.
pub fn pooled_agent(backend: &Backend) -> Option<&str> {
    let simple = backend.servers.len() == 1
        && backend.extra.is_empty()
        && backend.balance == Balance::RoundRobin
        && backend
            .health_check
            .as_ref()
            .is_none_or(|h| h.path.is_none());
    match (&backend.servers[..], simple) {
        ([server], true) => match &server.target {
            ServerTarget::Agent(agent) => Some(agent),
            ServerTarget::Address(_) => None,
        },
        _ => None,
    }
}

/// The HAProxy backend (and for pooled apps, server) a domain routing to `backend` uses: the
/// value of its map entry.
pub fn route_value(name: &str, backend: &Backend) -> String {
    match pooled_agent(backend) {
        Some(agent) => format!("{}/{name}", pool_name(agent, backend.mode)),
        None => name.to_string(),
    }
}

/// One `server` line: everything HAProxy needs to create it, in the config file or through
/// `add server` at runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLine {
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u16,
    /// In maintenance: `disabled` in the file, `set server state maint` at runtime.
    pub disabled: bool,
    /// Keywords other than address, weight and state (check, ssl, ...).
    pub options: Vec<String>,
    /// The agent this server runs on, if any.
    pub agent: Option<String>,
}

impl ServerLine {
    /// `1.2.3.4:80` or `ipv6@::1:80`.
    pub fn address(&self) -> String {
        match self.addr {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("ipv6@{a}:{}", self.port),
        }
    }

    /// The keywords after the address, as written in the file and sent with `add server`.
    pub fn params(&self) -> Vec<String> {
        let mut params = vec!["weight".to_string(), self.weight.to_string()];
        params.extend(self.options.iter().cloned());
        if self.disabled {
            params.push("disabled".into());
        }
        params
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyBackend {
    pub name: String,
    pub mode: Mode,
    pub balance: Balance,
    /// `Some` for an agent pool: servers are chosen by `use-server`, never balanced.
    pub pool_of: Option<String>,
    pub http_check: Option<HealthCheck>,
    pub servers: Vec<ServerLine>,
    /// Raw lines of the backend's `extra:`.
    pub extra: Vec<String>,
}

/// Every HAProxy backend of the model, by name.
pub fn proxy_backends(model: &Model) -> BTreeMap<String, ProxyBackend> {
    let mut out = BTreeMap::new();
    for agent in model.agents.keys() {
        for mode in [Mode::Http, Mode::Tcp] {
            let name = pool_name(agent, mode);
            out.insert(
                name.clone(),
                ProxyBackend {
                    name,
                    mode,
                    balance: Balance::RoundRobin,
                    pool_of: Some(agent.clone()),
                    http_check: None,
                    servers: Vec::new(),
                    extra: Vec::new(),
                },
            );
        }
    }
    for (name, backend) in &model.backends {
        match pooled_agent(backend) {
            Some(agent) => {
                let pool = out
                    .get_mut(&pool_name(agent, backend.mode))
                    .expect("every agent has pools");
                let server = &backend.servers[0];
                let mut line = server_line(model, backend, server);
                line.name = name.clone();
                // `use-server` picks pooled servers; a weight keeps them out of balancing, so
                // a user weight of 0 ("no new traffic") becomes maintenance here.
                line.disabled |= server.weight == 0;
                line.weight = 0;
                pool.servers.push(line);
            }
            None => {
                let servers = backend
                    .servers
                    .iter()
                    .map(|s| server_line(model, backend, s))
                    .collect();
                out.insert(
                    name.clone(),
                    ProxyBackend {
                        name: name.clone(),
                        mode: backend.mode,
                        balance: backend.balance,
                        pool_of: None,
                        http_check: backend.health_check.clone().filter(|h| h.path.is_some()),
                        servers,
                        extra: backend.extra.clone(),
                    },
                );
            }
        }
    }
    for backend in out.values_mut() {
        backend.servers.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

fn server_line(model: &Model, backend: &Backend, server: &crate::model::Server) -> ServerLine {
    let (addr, agent, agent_down) = match &server.target {
        ServerTarget::Agent(name) => {
            let agent = &model.agents[name];
            (agent.address, Some(name.clone()), agent.maintenance)
        }
        ServerTarget::Address(ip) => (*ip, None, false),
    };
    let mut options = Vec::new();
    if let Some(check) = &backend.health_check {
        options.extend([
            "check".to_string(),
            "inter".into(),
            check.interval.to_string(),
            "rise".into(),
            check.rise.to_string(),
            "fall".into(),
            check.fall.to_string(),
        ]);
    }
    if let Some(tls) = &backend.tls {
        options.extend(tls_options(tls));
    }
    ServerLine {
        name: server.name.clone(),
        addr,
        port: server.port,
        weight: server.weight,
        disabled: server.maintenance || agent_down,
        options,
        agent,
    }
}

fn tls_options(tls: &UpstreamTls) -> Vec<String> {
    let mut out = vec!["ssl".to_string()];
    if tls.verify {
        out.extend(["verify".into(), "required".into(), "ca-file".into()]);
        out.push(tls.ca_file.clone().unwrap_or_else(|| "@system-ca".into()));
        if let Some(sni) = &tls.sni {
            out.extend(["verifyhost".into(), sni.clone()]);
        }
    } else {
        out.extend(["verify".into(), "none".into()]);
    }
    if let Some(sni) = &tls.sni {
        out.extend(["sni".into(), format!("str({sni})")]);
    }
    out
}

/// The map files and their entries: host (or `*.parent`) → route value.
pub fn route_maps(model: &Model) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut maps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    maps.insert(SHARED_HTTP_MAP.to_string(), BTreeMap::new());
    // Exactly the maps HAProxy loads: a TCP listener always looks its map up, an HTTP
    // listener only when domains are pinned to it (see `http_lookups`).
    for (name, listener) in &model.listeners {
        if matches!(listener.kind, ListenerKind::Tcp { .. }) {
            maps.insert(listener_map(name), BTreeMap::new());
        }
    }
    for (host, domain) in &model.domains {
        let file = match &domain.listener {
            Some(listener) => listener_map(listener),
            None => SHARED_HTTP_MAP.to_string(),
        };
        let value = route_value(&domain.backend, &model.backends[&domain.backend]);
        maps.entry(file).or_default().insert(host.clone(), value);
    }
    maps
}
