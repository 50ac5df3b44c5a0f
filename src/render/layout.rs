//! How the model maps onto HAProxy objects (part of `render`, shared with `plan`).
//!
//! The rule that makes a new app need no reload while keeping a request's cost independent of
//! the number of apps: an *app* (a backend with one server on an agent and nothing backend-wide:
//! no HTTP check path, the default balance, no `extra:` lines) lives in a *slot*, one of a pool of pre-provisioned
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
use std::collections::{BTreeSet, HashMap, HashSet};
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
/// - when the pool is more than twice the size its apps need (`slot_capacity_for`), and that
///   by 64 slots or more, it shrinks to that size (a reload) and the apps above it move down;
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
    // Slot numbers index these (slot 0 is never one); apps are looked up by hash: at 10k apps
    // the ordered sets this used were most of a rendering's slot assignment.
    let wanted: HashSet<&str> = apps.iter().copied().collect();
    let mut was_taken = vec![false; previous.capacity as usize + 1];
    for &slot in previous.apps.values() {
        if slot <= previous.capacity {
            was_taken[slot as usize] = true;
        }
    }
    // Apps keep their slots (the lowest, should a configuration edited by hand list one twice).
    let mut taken = vec![false; previous.capacity as usize + 1];
    let mut kept: HashMap<&str, u32> = HashMap::with_capacity(apps.len());
    let mut by_slot: Vec<(u32, &str)> = previous
        .apps
        .iter()
        .map(|(a, s)| (*s, a.as_str()))
        .collect();
    by_slot.sort_unstable();
    for (slot, app) in by_slot {
        if slot <= previous.capacity
            && wanted.contains(app)
            && !kept.contains_key(app)
            && !taken[slot as usize]
        {
            taken[slot as usize] = true;
            kept.insert(app, slot);
        }
    }
    let new: Vec<&str> = apps
        .iter()
        .copied()
        .filter(|a| !kept.contains_key(a))
        .collect();
    let free_before: Vec<u32> = (1..=previous.capacity)
        .filter(|s| !was_taken[*s as usize])
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
        let moved: Vec<&str> = kept
            .iter()
            .filter(|(_, s)| **s > target)
            .map(|(a, _)| *a)
            .collect();
        for app in &moved {
            taken[kept[app] as usize] = false;
            kept.remove(app);
        }
        let mut free = (1..=target).filter(|s| !taken[*s as usize]);
        let mut placing: Vec<&str> = moved.into_iter().chain(new).collect();
        placing.sort_unstable();
        for app in placing {
            let slot = free
                .next()
                .expect("the target size leaves room for every app");
            kept.insert(app, slot);
        }
    } else {
        free.reverse();
        for app in new {
            let slot = free.pop().expect("free slots cover the new apps");
            kept.insert(app, slot);
        }
    }
    pool.apps = kept.into_iter().map(|(a, s)| (a.to_string(), s)).collect();
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Raw lines of the backend's `extra:`.
    pub extra: Vec<String>,
}

/// Every HAProxy backend of the model, in the configuration's order: the dedicated ones by
/// name, then every slot of `slots` (from `assign_slots`) by pool and number, apps in theirs.
pub fn proxy_backends(model: &Model, slots: &SlotPools) -> Vec<ProxyBackend> {
    let pool = |mode: Mode| -> Vec<ProxyBackend> {
        (1..=slots.pool(mode).capacity)
            .map(|index| ProxyBackend {
                name: slot_name(mode, index),
                mode,
                balance: Balance::RoundRobin,
                slot: Some(index),
                http_check: None,
                servers: Vec::new(),
                extra: Vec::new(),
            })
            .collect()
    };
    let (mut http, mut tcp) = (pool(Mode::Http), pool(Mode::Tcp));
    let mut dedicated = Vec::new();
    for (name, backend) in &model.backends {
        let slot = is_app(backend)
            .then(|| slots.pool(backend.mode).apps.get(name))
            .flatten();
        match slot {
            Some(index) => {
                let mut line = server_line(model, backend, &backend.servers[0]);
                // Named after the app: per-app statistics and logs read `slot:http:7/shop`.
                line.name = name.clone();
                let pool = match backend.mode {
                    Mode::Http => &mut http,
                    Mode::Tcp => &mut tcp,
                };
                pool[*index as usize - 1].servers.push(line);
            }
            None => {
                let mut servers: Vec<ServerLine> = backend
                    .servers
                    .iter()
                    .map(|s| server_line(model, backend, s))
                    .collect();
                servers.sort_by(|a, b| a.name.cmp(&b.name));
                dedicated.push(ProxyBackend {
                    name: name.clone(),
                    mode: backend.mode,
                    balance: backend.balance,
                    slot: None,
                    http_check: backend.health_check.clone().filter(|h| h.path.is_some()),
                    servers,
                    extra: backend.extra.clone(),
                });
            }
        }
    }
    dedicated.extend(http);
    dedicated.extend(tcp);
    dedicated
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(capacity: u32, apps: &[(&str, u32)]) -> SlotPool {
        SlotPool {
            capacity,
            apps: apps.iter().map(|(a, s)| (a.to_string(), *s)).collect(),
        }
    }

    fn slots(p: &SlotPool) -> Vec<(&str, u32)> {
        p.apps.iter().map(|(a, s)| (a.as_str(), *s)).collect()
    }

    #[test]
    fn pool_sizes_keep_spares_in_steps() {
        assert_eq!(slot_capacity_for(0), 16);
        assert_eq!(slot_capacity_for(1), 32);
        assert_eq!(slot_capacity_for(100), 128);
        assert_eq!(slot_capacity_for(10_000), 10_160);
        assert_eq!(slot_capacity_for(50_000), 50_784);
        for n in [0, 1, 15, 16, 17, 1000, 4096, 50_000] {
            let c = slot_capacity_for(n);
            assert!(
                c >= n + MIN_SPARE_SLOTS && c.is_multiple_of(SLOT_STEP),
                "{n} → {c}"
            );
        }
    }

    #[test]
    fn slot_names_read_back_only_in_their_canonical_form() {
        assert_eq!(slot_name(Mode::Http, 7), "slot:http:7");
        assert_eq!(parse_slot_name("slot:http:7"), Some((Mode::Http, 7)));
        assert_eq!(parse_slot_name("slot:tcp:12"), Some((Mode::Tcp, 12)));
        for other in [
            "slot:http:07",
            "slot:http:0",
            "slot:http:",
            "slot:http:+7",
            "slot:udp:1",
            "agent:a",
            "shop",
        ] {
            assert_eq!(parse_slot_name(other), None, "{other}");
        }
    }

    #[test]
    fn a_first_rendering_gives_slots_in_name_order() {
        let p = assign_pool(&["blog", "shop", "wiki"], &SlotPool::default());
        assert_eq!(slots(&p), vec![("blog", 1), ("shop", 2), ("wiki", 3)]);
        assert_eq!(p.capacity, 32);
    }

    #[test]
    fn apps_keep_their_slots_and_new_ones_take_the_lowest_free() {
        let before = pool(32, &[("shop", 5), ("wiki", 1)]);
        let p = assign_pool(&["aaa", "shop", "wiki", "zzz"], &before);
        assert_eq!(
            slots(&p),
            vec![("aaa", 2), ("shop", 5), ("wiki", 1), ("zzz", 3)]
        );
        assert_eq!(p.capacity, 32);
    }

    #[test]
    fn a_slot_freed_by_a_change_is_not_reused_by_it() {
        // shop leaves slot 1 while blog arrives: blog takes slot 2, and slot 1 waits.
        let before = pool(16, &[("shop", 1)]);
        let p = assign_pool(&["blog"], &before);
        assert_eq!(slots(&p), vec![("blog", 2)]);
        // The next change may take it.
        let p = assign_pool(&["blog", "cart"], &p);
        assert_eq!(slots(&p), vec![("blog", 2), ("cart", 1)]);
    }

    #[test]
    fn a_full_pool_grows_and_new_apps_take_slots_nobody_held() {
        let names: Vec<String> = (1..=16).map(|i| format!("app{i:02}")).collect();
        let before = SlotPool {
            capacity: 16,
            apps: names.iter().cloned().zip(1..).collect(),
        };
        // app01 leaves (its slot is freed by this change); two new apps arrive.
        let mut apps: Vec<&str> = names[1..].iter().map(String::as_str).collect();
        apps.extend(["new1", "new2"]);
        let p = assign_pool(&apps, &before);
        assert_eq!(p.capacity, slot_capacity_for(17));
        assert_eq!((p.apps["new1"], p.apps["new2"]), (17, 18));
        for (i, name) in names.iter().enumerate().skip(1) {
            assert_eq!(p.apps[name], i as u32 + 1, "{name} kept its slot");
        }
    }

    #[test]
    fn a_mostly_empty_pool_shrinks_and_the_apps_above_move_down() {
        let before = pool(256, &[("low", 3), ("high", 200), ("mid", 40)]);
        let p = assign_pool(&["high", "low", "mid"], &before);
        assert_eq!(p.capacity, slot_capacity_for(3));
        assert_eq!(p.apps["low"], 3, "an app below the new size stays");
        assert!(p.apps.values().all(|s| *s <= p.capacity));
        // A pool with spares to spare but not that many stays as it is.
        let before = pool(64, &[("low", 3)]);
        assert_eq!(assign_pool(&["low"], &before).capacity, 64);
    }

    /// xorshift64*: a fixed sequence, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
        }
    }

    #[test]
    fn any_sequence_of_changes_keeps_the_slot_invariants() {
        let universe: Vec<String> = (0..300).map(|i| format!("app{i}")).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut present: BTreeSet<&str> = BTreeSet::new();
        let mut previous = SlotPool::default();
        let (mut grown, mut shrunk) = (0, 0);
        for step in 0..800 {
            // Mostly small changes, now and then a burst of arrivals or departures.
            let edits = match rng.next(20) {
                0 => 60,
                1 => 30,
                _ => 1 + rng.next(3),
            };
            // Phases of growth and of decline, so that pools grow and shrink.
            let arrivals = (rng.next(4) != 0) == ((step / 200) % 2 == 0);
            for _ in 0..edits {
                let app = universe[rng.next(universe.len() as u64) as usize].as_str();
                if arrivals {
                    present.insert(app);
                } else {
                    present.remove(app);
                }
            }
            let apps: Vec<&str> = present.iter().copied().collect();
            let next = assign_pool(&apps, &previous);
            let what = format!("step {step}: {previous:?} → {next:?}");
            // Every app exactly one slot within the pool, no slot twice.
            assert_eq!(next.apps.len(), apps.len(), "{what}");
            let used: BTreeSet<u32> = next.apps.values().copied().collect();
            assert_eq!(used.len(), apps.len(), "{what}");
            assert!(
                used.iter().all(|s| (1..=next.capacity).contains(s)),
                "{what}"
            );
            assert!(next.capacity > apps.len() as u32, "{what}");
            // Rendering again onto the result changes nothing: a plan after an apply is empty.
            assert_eq!(assign_pool(&apps, &next), next, "{what}");
            if next.capacity == previous.capacity {
                // What runtime changes can do: apps keep their slots, and no slot passes from
                // one app to another in one step.
                let before = previous.occupants();
                for (app, slot) in &next.apps {
                    if let Some(old) = previous.apps.get(app) {
                        assert_eq!(old, slot, "{what}: {app} moved");
                    }
                    if let Some(holder) = before.get(slot) {
                        assert_eq!(holder, app, "{what}: slot {slot} changed hands");
                    }
                }
            } else if next.capacity < previous.capacity {
                shrunk += 1;
            } else if previous.capacity > 0 {
                grown += 1;
                // A growth moves nobody.
                for (app, slot) in &next.apps {
                    if let Some(old) = previous.apps.get(app) {
                        assert_eq!(old, slot, "{what}: {app} moved in a growth");
                    }
                }
            }
            previous = next;
        }
        assert!(grown > 0 && shrunk > 0, "grown {grown}, shrunk {shrunk}");
    }
}
