//! How the model maps onto HAProxy objects (part of `render`, shared with `plan`).
//!
//! The rule that makes a new app need no reload while keeping a request's cost independent of
//! the number of apps: an *app* (a backend with one server on an agent and nothing backend-wide:
//! no HTTP check path, the default balance) lives in a *slot*, one of a pool of pre-provisioned
//! backends per mode (`slot:http:<n>`, `slot:tcp:<n>`), as a server named after the app. Its
//! domains map straight to the slot backend, which `use_backend` finds in a tree: the same
//! work per request as one hand-written backend per app, whatever the number of apps (the
//! agent pools this replaces were picked by `use-server`, which HAProxy 2.6 and 3.0 resolve by
//! walking the pool's server list). A pool keeps spare empty slots, so adding an app is an
//! `add server` into a free slot and a map entry at runtime; when the spares run out, the pool
//! grows with a reload (`assign_slots`). Other backends are *dedicated*: an HAProxy backend of
//! their own name, whose servers can still be added, removed and changed at runtime.

use crate::model::{
    Backend, Balance, HealthCheck, ListenerKind, Mode, Model, ServerTarget, UpstreamTls,
};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
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

pub const NOT_FOUND_BACKEND: &str = "lunafront:not-found";
pub const REJECT_BACKEND: &str = "lunafront:reject";

/// The agent an *app* runs on: a backend with one server, on an agent, and nothing backend-wide
/// (no HTTP check path, the default balance). `None` for a backend that needs a section of its
/// own.
pub fn app_agent(backend: &Backend) -> Option<&str> {
    let simple = backend.servers.len() == 1
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

pub fn is_app(backend: &Backend) -> bool {
    app_agent(backend).is_some()
}

/// `http` or `tcp`, as slot names and plans spell a mode.
pub fn mode_str(mode: Mode) -> &'static str {
    match mode {
        Mode::Http => "http",
        Mode::Tcp => "tcp",
    }
}

/// The HAProxy backend of slot `index` (from 1) of the pool of `mode`: `slot:http:7`.
pub fn slot_name(mode: Mode, index: u32) -> String {
    format!("slot:{}:{index}", mode_str(mode))
}

/// The mode and index of a slot backend's name, or `None` for any other backend.
pub fn parse_slot_name(name: &str) -> Option<(Mode, u32)> {
    let rest = name.strip_prefix("slot:")?;
    let (mode, index) = rest.split_once(':')?;
    let mode = match mode {
        "http" => Mode::Http,
        "tcp" => Mode::Tcp,
        _ => return None,
    };
    // Canonical decimal only (no sign, no leading zero), so a name maps to one slot.
    if index.is_empty() || index.starts_with('0') || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index: u32 = index.parse().ok()?;
    Some((mode, index))
}

/// Spare slots kept free for apps added at runtime: at least `MIN_SPARE_SLOTS`, else one for
/// every `SPARE_SLOTS_PER` apps. Each empty slot is an empty backend (about 9.5 KB of HAProxy's
/// memory, measured on 2.6): 1/64 keeps the pool within ~1.6% of one backend per app while a
/// growth (a reload) comes only every ~1.6% of new apps.
pub const MIN_SPARE_SLOTS: u32 = 16;
pub const SPARE_SLOTS_PER: u32 = 64;
/// Pool sizes are multiples of this, so that they change in steps.
pub const SLOT_STEP: u32 = 16;

/// The number of slots a pool of `apps` apps is given when it is created, grown or shrunk.
pub fn slot_capacity_for(apps: u32) -> u32 {
    let wanted = apps + MIN_SPARE_SLOTS.max(apps / SPARE_SLOTS_PER);
    wanted.div_ceil(SLOT_STEP) * SLOT_STEP
}

/// The slots of one mode: how many slot backends exist, and which app holds which.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPool {
    /// Slot backends `1..=capacity`; 0 when the pool does not exist.
    pub capacity: u32,
    /// App (backend name) → its slot.
    pub apps: BTreeMap<String, u32>,
}

impl SlotPool {
    /// Slot → the app holding it.
    pub fn occupants(&self) -> BTreeMap<u32, &str> {
        self.apps.iter().map(|(a, s)| (*s, a.as_str())).collect()
    }
}

/// The app slots of a configuration, for each mode. What `render` lays out, and what it reads
/// back from the configuration a target runs (`readback::slot_pools`) to lay out the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPools {
    pub http: SlotPool,
    pub tcp: SlotPool,
}

impl SlotPools {
    pub fn pool(&self, mode: Mode) -> &SlotPool {
        match mode {
            Mode::Http => &self.http,
            Mode::Tcp => &self.tcp,
        }
    }

    pub fn pool_mut(&mut self, mode: Mode) -> &mut SlotPool {
        match mode {
            Mode::Http => &mut self.http,
            Mode::Tcp => &mut self.tcp,
        }
    }

    /// The slot backend holding app `name`, if it holds one.
    pub fn slot_of(&self, name: &str, mode: Mode) -> Option<String> {
        self.pool(mode)
            .apps
            .get(name)
            .map(|index| slot_name(mode, *index))
    }
}

/// Gives every app of the model a slot, starting from `previous`, the slots of the
/// configuration the target runs (empty for a first rendering).
///
/// The assignment is a pure function of the model and `previous`, so that a full rendering
/// reproduces exactly what runtime changes did (`add server` into a free slot) and the next
/// rendering starts from it:
/// - an app that holds a slot keeps it, so unrelated changes never move apps;
/// - new apps, in name order, take the lowest slots that were already free in `previous`.
///   A slot freed by this very change is not reused by it: at runtime its old app's routes
///   may still point at it while the new app's server arrives, so reuse waits for a later
///   change (or a reload);
/// - when those free slots do not suffice, the pool grows (a reload) so that every new app
///   finds a slot that was never anyone's in `previous`;
/// - when fewer than half the slots are in use the pool shrinks (a reload), and the apps
///   above the new size move down;
/// - without `previous` (a first rendering, `render --out` into an empty folder), apps take
///   slots 1, 2, 3… in name order.
///
/// A pool exists for a mode when a listener or an app of that mode does.
pub fn assign_slots(model: &Model, previous: &SlotPools) -> SlotPools {
    let mut out = SlotPools::default();
    for mode in [Mode::Http, Mode::Tcp] {
        let apps: Vec<&str> = model
            .backends
            .iter()
            .filter(|(_, b)| b.mode == mode && is_app(b))
            .map(|(name, _)| name.as_str())
            .collect();
        let wanted = !apps.is_empty()
            || model.listeners.values().any(|l| match mode {
                Mode::Http => l.is_http(),
                Mode::Tcp => !l.is_http(),
            });
        if wanted {
            *out.pool_mut(mode) = assign_pool(&apps, previous.pool(mode));
        }
    }
    out
}

fn assign_pool(apps: &[&str], previous: &SlotPool) -> SlotPool {
    let count = u32::try_from(apps.len()).expect("fewer than 4 billion apps");
    let target = slot_capacity_for(count);
    let mut pool = SlotPool::default();
    if previous.capacity == 0 {
        pool.capacity = target;
        pool.apps = apps
            .iter()
            .zip(1..)
            .map(|(a, s)| (a.to_string(), s))
            .collect();
        return pool;
    }
    let wanted: BTreeSet<&str> = apps.iter().copied().collect();
    let was_taken: BTreeSet<u32> = previous
        .apps
        .values()
        .copied()
        .filter(|s| *s <= previous.capacity)
        .collect();
    // Apps keep their slots (the lowest, should a configuration edited by hand list one twice).
    let mut taken = BTreeSet::new();
    let mut by_slot: Vec<(u32, &str)> = previous
        .apps
        .iter()
        .map(|(a, s)| (*s, a.as_str()))
        .collect();
    by_slot.sort();
    for (slot, app) in by_slot {
        if slot <= previous.capacity
            && wanted.contains(app)
            && !pool.apps.contains_key(app)
            && taken.insert(slot)
        {
            pool.apps.insert(app.to_string(), slot);
        }
    }
    let new: Vec<&str> = apps
        .iter()
        .copied()
        .filter(|a| !pool.apps.contains_key(*a))
        .collect();
    let free_before: Vec<u32> = (1..=previous.capacity)
        .filter(|s| !was_taken.contains(s))
        .collect();
    pool.capacity = previous.capacity;
    let mut free: Vec<u32> = if new.len() <= free_before.len() {
        free_before
    } else {
        // Grow: enough never-used slots above the old ones for the apps the free ones miss.
        let missing = u32::try_from(new.len() - free_before.len()).expect("fits");
        pool.capacity = target.max(slot_capacity_for(previous.capacity + missing));
        free_before
            .into_iter()
            .chain(previous.capacity + 1..=pool.capacity)
            .collect()
    };
    if pool.capacity > 2 * target && pool.capacity - target >= 4 * SLOT_STEP {
        // Shrink: apps above the new size move into the lowest free slots below it.
        pool.capacity = target;
        let moved: Vec<String> = pool
            .apps
            .iter()
            .filter(|(_, s)| **s > target)
            .map(|(a, _)| a.clone())
            .collect();
        for app in &moved {
            taken.remove(&pool.apps[app]);
            pool.apps.remove(app);
        }
        let mut free = (1..=target).filter(|s| !taken.contains(s));
        let mut placing: Vec<&str> = moved.iter().map(String::as_str).chain(new).collect();
        placing.sort();
        for app in placing {
            let slot = free
                .next()
                .expect("the target size leaves room for every app");
            pool.apps.insert(app.to_string(), slot);
        }
        return pool;
    }
    free.reverse();
    for app in new {
        let slot = free.pop().expect("free slots cover the new apps");
        pool.apps.insert(app.to_string(), slot);
    }
    pool
}

/// The HAProxy backend a domain routing to backend `name` uses: the value of its map entry.
pub fn route_value(name: &str, backend: &Backend, slots: &SlotPools) -> String {
    if is_app(backend)
        && let Some(slot) = slots.slot_of(name, backend.mode)
    {
        return slot;
    }
    name.to_string()
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
    /// `Some(n)` for slot `n` of its mode's pool: empty, or holding one app's server.
    pub slot: Option<u32>,
    pub http_check: Option<HealthCheck>,
    pub servers: Vec<ServerLine>,
}

/// Every HAProxy backend of the model, by name: the dedicated ones and every slot of `slots`
/// (from `assign_slots`), apps in theirs.
pub fn proxy_backends(model: &Model, slots: &SlotPools) -> BTreeMap<String, ProxyBackend> {
    let mut out = BTreeMap::new();
    for mode in [Mode::Http, Mode::Tcp] {
        for index in 1..=slots.pool(mode).capacity {
            let name = slot_name(mode, index);
            out.insert(
                name.clone(),
                ProxyBackend {
                    name,
                    mode,
                    balance: Balance::RoundRobin,
                    slot: Some(index),
                    http_check: None,
                    servers: Vec::new(),
                },
            );
        }
    }
    for (name, backend) in &model.backends {
        let slot = is_app(backend)
            .then(|| slots.slot_of(name, backend.mode))
            .flatten();
        match slot {
            Some(slot) => {
                let mut line = server_line(model, backend, &backend.servers[0]);
                // Named after the app: per-app statistics and logs read `slot:http:7/shop`.
                line.name = name.clone();
                out.get_mut(&slot)
                    .expect("assign_slots gives every app a slot of its pool")
                    .servers
                    .push(line);
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
                        slot: None,
                        http_check: backend.health_check.clone().filter(|h| h.path.is_some()),
                        servers,
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

/// The map files a rendering of `model` writes: the shared HTTP map, every TCP listener's, and
/// those of listeners domains are pinned to. Exactly the maps HAProxy loads: a TCP listener
/// always looks its map up, an HTTP listener only when domains are pinned to it (see
/// `http_lookups`).
pub fn map_files(model: &Model) -> BTreeSet<String> {
    let mut files = BTreeSet::from([SHARED_HTTP_MAP.to_string()]);
    for (name, listener) in &model.listeners {
        if matches!(listener.kind, ListenerKind::Tcp { .. }) {
            files.insert(listener_map(name));
        }
    }
    for domain in model.domains.values() {
        if let Some(listener) = &domain.listener {
            files.insert(listener_map(listener));
        }
    }
    files
}

/// The map files and their entries: host (or `*.parent`) → route value.
pub fn route_maps(model: &Model, slots: &SlotPools) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut maps: BTreeMap<String, BTreeMap<String, String>> = map_files(model)
        .into_iter()
        .map(|f| (f, BTreeMap::new()))
        .collect();
    for (host, domain) in &model.domains {
        let file = match &domain.listener {
            Some(listener) => listener_map(listener),
            None => SHARED_HTTP_MAP.to_string(),
        };
        let value = route_value(&domain.backend, &model.backends[&domain.backend], slots);
        maps.get_mut(&file)
            .expect("map_files lists every domain's map")
            .insert(host.clone(), value);
    }
    maps
}
