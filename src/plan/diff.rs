//! `plan`, semantic half: the typed changes between the previously applied model and the new
//! one (`+ domain`, `~ backend`, `- agent`), each saying whether HAProxy's runtime API can apply
//! it without a reload, and if not, why. Pure.

use crate::model::{
    Backend, Domain, Listener, ListenerKind, Mode as BackendMode, Model, ServerTarget, TcpTls,
};
use crate::render::layout::{self, SlotPools, mode_str};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Display;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn symbol(&self) -> char {
        match self {
            Action::Create => '+',
            Action::Update => '~',
            Action::Delete => '-',
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Global,
    Listener,
    Certificate,
    Agent,
    Backend,
    Server,
    Domain,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Global => "global",
            Kind::Listener => "listener",
            Kind::Certificate => "certificate",
            Kind::Agent => "agent",
            Kind::Backend => "backend",
            Kind::Server => "server",
            Kind::Domain => "domain",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Applied through HAProxy's runtime API: maps, server address/weight/state, add/del
    /// server, certificates. No reload, no worker restart.
    Runtime,
    /// Needs HAProxy to reload its configuration (seamless, but a new worker).
    Reload,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub action: Action,
    pub kind: Kind,
    pub name: String,
    /// What changes, for people: `→ shop`, `: weight 10 → 20`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The changed values as they were and as they will be (what `detail` shows), for
    /// machines: `{"weight": 10}` → `{"weight": 20}`; `null` for what is created or deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
    pub mode: Mode,
    pub reason: String,
    /// The change is to raw HAProxy lines (`extra:`), which lunafront passes through
    /// unchecked: plans mark it for review.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
}

impl Change {
    fn new(
        action: Action,
        kind: Kind,
        name: impl Into<String>,
        mode: Mode,
        reason: impl Into<String>,
    ) -> Change {
        Change {
            action,
            kind,
            name: name.into(),
            detail: String::new(),
            before: None,
            after: None,
            mode,
            reason: reason.into(),
            raw: false,
        }
    }

    fn detail(mut self, detail: impl Into<String>) -> Change {
        self.detail = detail.into();
        self
    }

    fn values(mut self, before: Option<Value>, after: Option<Value>) -> Change {
        self.before = before;
        self.after = after;
        self
    }

    /// `+ domain shop.apps.example.com → shop`
    pub fn summary(&self) -> String {
        format!(
            "{} {} {}{}",
            self.action.symbol(),
            self.kind.as_str(),
            self.name,
            self.detail
        )
    }
}

/// What differs between two ordered maps: the sozu-style diff every collection goes through.
#[derive(Debug)]
pub struct MapDiff<'a, K, V> {
    pub added: Vec<(&'a K, &'a V)>,
    pub removed: Vec<(&'a K, &'a V)>,
    pub changed: Vec<(&'a K, &'a V, &'a V)>,
}

/// Walks both maps side by side in key order (one comparison per step, not a tree lookup per
/// key: at 10k domains and backends the lookups' string comparisons were most of a diff).
pub fn diff_maps<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> MapDiff<'a, K, V> {
    use std::cmp::Ordering;
    let mut d = MapDiff {
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
    };
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ok, _)), Some((nk, _))) => ok.cmp(nk),
        };
        match order {
            Ordering::Less => d.removed.extend(old.next()),
            Ordering::Greater => d.added.extend(new.next()),
            Ordering::Equal => {
                let ((k, v), (_, nv)) = (old.next().expect("peeked"), new.next().expect("peeked"));
                if nv != v {
                    d.changed.push((k, v, nv));
                }
            }
        }
    }
    d
}

impl<K: Ord + Clone, V: Clone> MapDiff<'_, K, V> {
    /// Applies the diff to `old`: replaying `diff(a, b)` on `a` gives `b`.
    pub fn replay(&self, old: &BTreeMap<K, V>) -> BTreeMap<K, V> {
        let mut out = old.clone();
        for (k, _) in &self.removed {
            out.remove(*k);
        }
        for (k, _, v) in &self.changed {
            out.insert((*k).clone(), (*v).clone());
        }
        for (k, v) in &self.added {
            out.insert((*k).clone(), (*v).clone());
        }
        out
    }
}

fn arrow(before: impl Display, after: impl Display) -> String {
    format!("{before} → {after}")
}

/// The app slots of the configuration the target runs and of the new one (both read back from
/// the configurations, `readback::slot_pools`): whether an app can take or free a slot at
/// runtime depends on them, not on the models alone.
#[derive(Debug, Clone, Copy)]
pub struct Slots<'a> {
    pub before: &'a SlotPools,
    pub after: &'a SlotPools,
}

impl Slots<'_> {
    /// Why an app of `mode` entering or leaving a slot needs a reload: its pool is created,
    /// resized or removed by this change. `None` when the pool stays as it is.
    fn reload_reason(&self, mode: BackendMode) -> Option<String> {
        let (before, after) = (
            self.before.pool(mode).capacity,
            self.after.pool(mode).capacity,
        );
        let m = mode_str(mode);
        match (before, after) {
            _ if before == after => None,
            (0, _) => Some(format!(
                "the {m} app slots are new backends: they come with a reload"
            )),
            (_, 0) => Some(format!(
                "no {m} listener or app is left: the {m} app slots go with a reload"
            )),
            _ if after > before => Some(format!(
                "no free {m} slot was left for every new app: the pool grows from {before} to {after} slots with a reload"
            )),
            _ => Some(format!(
                "the {m} pool is more than twice the size its apps need: it shrinks from {before} to {after} slots with a reload"
            )),
        }
    }

    /// Why app `name` of `mode` entering or leaving a slot needs a reload: its pool is
    /// resized, or its slot passes between it and another app in this one change (what a
    /// rollback to files rendered earlier can ask). At runtime the old app's routes could
    /// still point at the slot while the new app's server is in it; a reload switches both
    /// at once.
    fn reload_reason_for(&self, name: &str, mode: BackendMode) -> Option<String> {
        if let Some(reason) = self.reload_reason(mode) {
            return Some(reason);
        }
        let (before, after) = (self.before.pool(mode), self.after.pool(mode));
        let handover = |slot: Option<&u32>, other: &layout::SlotPool| {
            let slot = *slot?;
            let holder = other
                .apps
                .iter()
                .find(|(a, s)| **s == slot && *a != name)?
                .0;
            Some((slot, holder.clone()))
        };
        if let Some((slot, holder)) = handover(after.apps.get(name), before) {
            return Some(format!(
                "{} passes from app {holder} to app {name}: a reload switches both at once",
                layout::slot_name(mode, slot)
            ));
        }
        handover(before.apps.get(name), after).map(|(slot, holder)| {
            format!(
                "{} passes from app {name} to app {holder}: a reload switches both at once",
                layout::slot_name(mode, slot)
            )
        })
    }

    fn slot(pools: &SlotPools, name: &str, mode: BackendMode) -> String {
        pools
            .slot_of(name, mode)
            .unwrap_or_else(|| format!("slot:{}:?", mode_str(mode)))
    }
}

/// Every change from `old` to `new`, in a stable order (global, listeners, certificates,
/// agents, backends, servers, domains).
pub fn diff_models(old: &Model, new: &Model, slots: &Slots<'_>) -> Vec<Change> {
    let mut changes = Vec::new();
    global_changes(old, new, &mut changes);
    slot_changes(new, slots, &mut changes);
    listener_changes(old, new, &mut changes);
    agent_changes(old, new, &mut changes);
    backend_changes(old, new, slots, &mut changes);
    domain_changes(old, new, &mut changes);
    issued_changes(old, new, &mut changes);
    challenge_changes(old, new, &mut changes);
    changes.sort_by(|a, b| (a.kind, &a.name, a.action).cmp(&(b.kind, &b.name, b.action)));
    changes
}

fn global_changes(old: &Model, new: &Model, out: &mut Vec<Change>) {
    let (o, n) = (&old.global, &new.global);
    let reason = "process-wide settings change with a reload";
    let mut field = |name: &str, before: String, after: String| {
        if before != after {
            out.push(
                Change::new(Action::Update, Kind::Global, name, Mode::Reload, reason)
                    .detail(format!(": {}", arrow(&before, &after)))
                    .values(Some(json!(before)), Some(json!(after))),
            );
        }
    };
    let show = |m: Option<u32>| m.map(|m| m.to_string()).unwrap_or_else(|| "auto".into());
    field("maxconn", show(o.maxconn), show(n.maxconn));
    let stats = |b: &Option<crate::model::names::Bind>| {
        b.as_ref()
            .map(|b| b.to_string())
            .unwrap_or_else(|| "none".into())
    };
    field("stats", stats(&o.stats), stats(&n.stats));
    field(
        "hard_stop_after",
        o.hard_stop_after.to_string(),
        n.hard_stop_after.to_string(),
    );
    field(
        "mworker_max_reloads",
        o.mworker_max_reloads.to_string(),
        n.mworker_max_reloads.to_string(),
    );
    field(
        "log",
        o.log.clone().unwrap_or_else(|| "none".into()),
        n.log.clone().unwrap_or_else(|| "none".into()),
    );
    let (ot, nt) = (&o.timeouts, &n.timeouts);
    for (name, a, b) in [
        ("timeouts.connect", ot.connect, nt.connect),
        ("timeouts.client", ot.client, nt.client),
        ("timeouts.server", ot.server, nt.server),
        ("timeouts.http_request", ot.http_request, nt.http_request),
        (
            "timeouts.http_keep_alive",
            ot.http_keep_alive,
            nt.http_keep_alive,
        ),
        ("timeouts.tunnel", ot.tunnel, nt.tunnel),
        ("timeouts.tcp_inspect", ot.tcp_inspect, nt.tcp_inspect),
        ("timeouts.check", ot.check, nt.check),
    ] {
        field(name, a.to_string(), b.to_string());
    }
}

/// A pool of app slots created, grown, shrunk or removed: new backend sections, so a reload.
fn slot_changes(new: &Model, slots: &Slots<'_>, out: &mut Vec<Change>) {
    for mode in [BackendMode::Http, BackendMode::Tcp] {
        let Some(reason) = slots.reload_reason(mode) else {
            continue;
        };
        let (before, after) = (
            slots.before.pool(mode).capacity,
            slots.after.pool(mode).capacity,
        );
        let action = match (before, after) {
            (0, _) => Action::Create,
            (_, 0) => Action::Delete,
            _ => Action::Update,
        };
        let apps = new
            .backends
            .values()
            .filter(|b| b.mode == mode && layout::is_app(b))
            .count();
        let detail = match action {
            Action::Create => format!(": {after} slots for {apps} app(s)"),
            Action::Delete => format!(": {before} slots"),
            Action::Update => format!(": {} slots for {apps} app(s)", arrow(before, after)),
        };
        out.push(
            Change::new(
                action,
                Kind::Global,
                format!("slots.{}", mode_str(mode)),
                Mode::Reload,
                reason,
            )
            .detail(detail),
        );
    }
}

fn describe_listener(l: &Listener) -> String {
    let mut text = describe_listener_kind(l);
    if l.acme {
        text.push_str(" (acme)");
    }
    if let Some(to) = &l.redirect_to {
        text.push_str(&format!(" (redirect to {to})"));
    }
    if let Some(h) = l.hsts {
        text.push_str(&format!(" (hsts {}s)", h.max_age_seconds));
    }
    text
}

fn describe_listener_kind(l: &Listener) -> String {
    match &l.kind {
        ListenerKind::Http { certificates: None } if l.acme => format!("https on {}", l.bind),
        ListenerKind::Http { certificates: None } => format!("http on {}", l.bind),
        ListenerKind::Http {
            certificates: Some(_),
        } => format!("https on {}", l.bind),
        ListenerKind::Tcp {
            tls: TcpTls::Passthrough,
        } => format!("tcp (tls passthrough) on {}", l.bind),
        ListenerKind::Tcp {
            tls: TcpTls::Terminate(_),
        } => format!("tcp (tls terminate) on {}", l.bind),
    }
}

/// A change of an entry's raw `extra:` lines (created and deleted entries included): always a
/// reload, and marked raw.
fn extra_change(
    kind: Kind,
    name: &str,
    old: Option<&[String]>,
    new: Option<&[String]>,
) -> Option<Change> {
    let (before, after) = (old.unwrap_or_default(), new.unwrap_or_default());
    if before == after {
        return None;
    }
    let action = match (old, new) {
        (None, _) => Action::Create,
        (_, None) => Action::Delete,
        _ => Action::Update,
    };
    let mut change = Change::new(
        action,
        kind,
        name,
        Mode::Reload,
        "raw HAProxy lines change with a reload; lunafront passes them through unchecked (haproxy -c still checks them)",
    )
    .detail(format!(
        ": extra: {} raw line(s) → {}",
        before.len(),
        after.len()
    ))
    .values(Some(json!({ "extra": before })), Some(json!({ "extra": after })));
    change.raw = true;
    Some(change)
}

fn listener_changes(old: &Model, new: &Model, out: &mut Vec<Change>) {
    let names: std::collections::BTreeSet<&String> =
        old.listeners.keys().chain(new.listeners.keys()).collect();
    for name in names {
        out.extend(extra_change(
            Kind::Listener,
            name,
            old.listeners.get(name).map(|l| l.extra.as_slice()),
            new.listeners.get(name).map(|l| l.extra.as_slice()),
        ));
    }
    let d = diff_maps(&old.listeners, &new.listeners);
    for (name, l) in d.added {
        out.push(
            Change::new(
                Action::Create,
                Kind::Listener,
                name.as_str(),
                Mode::Reload,
                "a new listener (bind and frontend) needs a reload",
            )
            .detail(format!(": {}", describe_listener(l)))
            .values(None, Some(listener_value(l))),
        );
    }
    for (name, l) in d.removed {
        out.push(
            Change::new(
                Action::Delete,
                Kind::Listener,
                name.as_str(),
                Mode::Reload,
                "removing a listener needs a reload",
            )
            .detail(format!(": {}", describe_listener(l)))
            .values(Some(listener_value(l)), None),
        );
    }
    for (name, o, n) in d.changed {
        let shape_changed = o.bind != n.bind
            || std::mem::discriminant(&o.kind) != std::mem::discriminant(&n.kind)
            || o.certificates().is_some() != n.certificates().is_some()
            || (o.acme, &o.redirect_to, o.hsts) != (n.acme, &n.redirect_to, n.hsts)
            || matches!((&o.kind, &n.kind), (ListenerKind::Tcp { tls: a }, ListenerKind::Tcp { tls: b }) if std::mem::discriminant(a) != std::mem::discriminant(b));
        if shape_changed {
            let reason = if !o.is_tls() && n.is_tls() {
                "turning on TLS (the first certificate) changes the bind line: reload"
            } else if (o.acme, &o.redirect_to, o.hsts) != (n.acme, &n.redirect_to, n.hsts) {
                "ACME, redirect and HSTS settings are rules of the frontend: reload"
            } else {
                "a listener's bind or protocol changes with a reload"
            };
            out.push(
                Change::new(
                    Action::Update,
                    Kind::Listener,
                    name.as_str(),
                    Mode::Reload,
                    reason,
                )
                .detail(format!(
                    ": {}",
                    arrow(describe_listener(o), describe_listener(n))
                ))
                .values(Some(listener_value(o)), Some(listener_value(n))),
            );
            continue;
        }
        // Same listener shape: only certificate files differ.
        let files = |l: &Listener| -> BTreeMap<String, String> {
            l.certificates()
                .map(|c| {
                    c.files
                        .iter()
                        .map(|f| (f.name.clone(), f.sha256.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (of, nf) = (files(o), files(n));
        let cd = diff_maps(&of, &nf);
        let id = |file: &str| format!("{name}/{file}");
        let digest = |sha: &String| Some(json!({ "sha256": sha }));
        for (file, sha) in cd.added {
            out.push(
                Change::new(
                    Action::Create,
                    Kind::Certificate,
                    id(file),
                    Mode::Runtime,
                    "new ssl cert + add ssl crt-list",
                )
                .values(None, digest(sha)),
            );
        }
        for (file, sha) in cd.removed {
            out.push(
                Change::new(
                    Action::Delete,
                    Kind::Certificate,
                    id(file),
                    Mode::Runtime,
                    "del ssl crt-list + del ssl cert",
                )
                .values(digest(sha), None),
            );
        }
        for (file, old_sha, new_sha) in cd.changed {
            out.push(
                Change::new(
                    Action::Update,
                    Kind::Certificate,
                    id(file),
                    Mode::Runtime,
                    "set ssl cert + commit ssl cert",
                )
                .detail(": content changed (not shown)")
                .values(digest(old_sha), digest(new_sha)),
            );
        }
    }
}

/// HTTP-01 answers the CA asks for while it validates a domain: entries of the challenge map,
/// added and removed at runtime.
fn challenge_changes(old: &Model, new: &Model, out: &mut Vec<Change>) {
    let d = diff_maps(&old.issued.challenges, &new.issued.challenges);
    let entry = |action, key: &str, reason| {
        Change::new(action, Kind::Domain, key, Mode::Runtime, reason)
            .detail(": the ACME CA's HTTP-01 challenge")
    };
    for (key, _) in d.added {
        out.push(entry(Action::Create, key, "add map"));
    }
    for (key, _, _) in d.changed {
        out.push(entry(Action::Update, key, "set map"));
    }
    for (key, _) in d.removed {
        out.push(entry(Action::Delete, key, "del map"));
    }
}

/// Certificates from the ACME store: installed, renewed and removed at runtime, unless a
/// listener that lists them is itself reloaded.
fn issued_changes(old: &Model, new: &Model, out: &mut Vec<Change>) {
    // By digest: a recorded model knows its certificates by digest only.
    let digests = |m: &Model| -> BTreeMap<String, String> {
        m.issued
            .certs
            .iter()
            .map(|(d, f)| (d.clone(), f.sha256.clone()))
            .collect()
    };
    let (old_certs, new_certs) = (digests(old), digests(new));
    let fingerprint = |m: &Model| m.issued.fallback.as_ref().map(|f| f.sha256.clone());
    if old_certs == new_certs && fingerprint(old) == fingerprint(new) {
        return;
    }
    let (wanted_old, wanted_new) = (crate::acme::wanted(old), crate::acme::wanted(new));
    let reloaded = |model: &Model, domain: &str| -> Option<String> {
        let wanted = if std::ptr::eq(model, old) {
            &wanted_old
        } else {
            &wanted_new
        };
        wanted
            .get(domain)?
            .listeners
            .iter()
            .find(|l| {
                let (o, n) = (old.listeners.get(*l), new.listeners.get(*l));
                match (o, n) {
                    (Some(o), Some(n)) => {
                        o.bind != n.bind || o.is_tls() != n.is_tls() || o.acme != n.acme
                    }
                    _ => true,
                }
            })
            .cloned()
    };
    let mode = |model: &Model, domain: &str, runtime: &str| match reloaded(model, domain) {
        Some(l) => (Mode::Reload, format!("comes with listener {l}'s reload")),
        None => (Mode::Runtime, runtime.to_string()),
    };
    let id = |domain: &str| crate::acme::cert_file(domain);
    let d = diff_maps(&old_certs, &new_certs);
    for (domain, _) in d.added {
        let (mode, reason) = mode(new, domain, "new ssl cert + add ssl crt-list");
        out.push(
            Change::new(Action::Create, Kind::Certificate, id(domain), mode, reason)
                .detail(format!(": issued by the ACME CA for {domain}")),
        );
    }
    for (domain, _) in d.removed {
        let (mode, reason) = mode(old, domain, "del ssl crt-list + del ssl cert");
        out.push(
            Change::new(Action::Delete, Kind::Certificate, id(domain), mode, reason)
                .detail(format!(": {domain} no longer served on an ACME listener")),
        );
    }
    for (domain, _, _) in d.changed {
        let (mode, reason) = mode(new, domain, "set ssl cert + commit ssl cert");
        out.push(
            Change::new(Action::Update, Kind::Certificate, id(domain), mode, reason)
                .detail(format!(": renewed for {domain} (not shown)")),
        );
    }
    if let (Some(a), Some(b)) = (fingerprint(old), fingerprint(new))
        && a != b
    {
        out.push(
            Change::new(
                Action::Update,
                Kind::Certificate,
                crate::acme::fallback_file(),
                Mode::Runtime,
                "set ssl cert + commit ssl cert",
            )
            .detail(": the default certificate of ACME listeners (not shown)"),
        );
    }
}

fn agent_changes(old: &Model, new: &Model, out: &mut Vec<Change>) {
    let d = diff_maps(&old.agents, &new.agents);
    for (name, a) in d.added {
        out.push(
            Change::new(
                Action::Create,
                Kind::Agent,
                name.as_str(),
                Mode::Runtime,
                "an agent is no HAProxy object of its own: its apps take free slots",
            )
            .detail(format!(": {}", a.address))
            .values(None, Some(agent_value(a))),
        );
    }
    for (name, a) in d.removed {
        out.push(
            Change::new(
                Action::Delete,
                Kind::Agent,
                name.as_str(),
                Mode::Runtime,
                "an agent is no HAProxy object of its own: its apps leave with their backends",
            )
            .detail(format!(": {}", a.address))
            .values(Some(agent_value(a)), None),
        );
    }
    for (name, o, n) in d.changed {
        let servers = servers_on_agent(new, name);
        let mut parts = Vec::new();
        let (mut before, mut after) = (serde_json::Map::new(), serde_json::Map::new());
        if o.address != n.address {
            parts.push(format!("address {}", arrow(o.address, n.address)));
            before.insert("address".into(), json!(o.address));
            after.insert("address".into(), json!(n.address));
        }
        if o.maintenance != n.maintenance {
            parts.push(format!(
                "maintenance {}",
                arrow(o.maintenance, n.maintenance)
            ));
            before.insert("maintenance".into(), json!(o.maintenance));
            after.insert("maintenance".into(), json!(n.maintenance));
        }
        out.push(
            Change::new(
                Action::Update,
                Kind::Agent,
                name.as_str(),
                Mode::Runtime,
                format!("set server addr/state on its {servers} server(s)"),
            )
            .detail(format!(": {}", parts.join(", ")))
            .values(Some(before.into()), Some(after.into())),
        );
    }
}

fn servers_on_agent(model: &Model, agent: &str) -> usize {
    model
        .backends
        .values()
        .flat_map(|b| &b.servers)
        .filter(|s| matches!(&s.target, ServerTarget::Agent(a) if a == agent))
        .count()
}

fn describe_backend(b: &Backend) -> String {
    let servers: Vec<String> = b
        .servers
        .iter()
        .map(|s| match &s.target {
            ServerTarget::Agent(a) => format!("{a}:{}", s.port),
            ServerTarget::Address(ip) => format!("{}", std::net::SocketAddr::new(*ip, s.port)),
        })
        .collect();
    servers.join(", ")
}

fn backend_changes(old: &Model, new: &Model, slots: &Slots<'_>, out: &mut Vec<Change>) {
    let d = diff_maps(&old.backends, &new.backends);
    // A backend that is the same on both sides has the same raw lines: only the others are
    // looked at (a lookup of every name of both sides was most of this diff at 10k backends).
    fn extra(b: &Backend) -> Option<&[String]> {
        Some(b.extra.as_slice())
    }
    let raw = (d.added.iter().map(|(name, b)| (*name, None, extra(b))))
        .chain(d.removed.iter().map(|(name, b)| (*name, extra(b), None)))
        .chain(
            d.changed
                .iter()
                .map(|(name, o, n)| (*name, extra(o), extra(n))),
        );
    for (name, before, after) in raw {
        out.extend(extra_change(Kind::Backend, name, before, after));
    }
    for (name, b) in d.added {
        let (mode, reason) = if layout::is_app(b) {
            match slots.reload_reason_for(name, b.mode) {
                Some(reason) => (Mode::Reload, reason),
                None => (
                    Mode::Runtime,
                    format!(
                        "add server {}/{name}: a new app takes a free slot",
                        Slots::slot(slots.after, name, b.mode)
                    ),
                ),
            }
        } else {
            (
                Mode::Reload,
                dedicated_reason(b, "a new backend section needs a reload"),
            )
        };
        out.push(
            Change::new(Action::Create, Kind::Backend, name.as_str(), mode, reason)
                .detail(format!(": {}", describe_backend(b)))
                .values(None, Some(backend_value(b))),
        );
    }
    for (name, b) in d.removed {
        let (mode, reason) = if layout::is_app(b) {
            match slots.reload_reason_for(name, b.mode) {
                Some(reason) => (Mode::Reload, reason),
                None => (
                    Mode::Runtime,
                    format!(
                        "del server {}/{name}: its slot is free for a later app",
                        Slots::slot(slots.before, name, b.mode)
                    ),
                ),
            }
        } else {
            (
                Mode::Reload,
                "removing a backend section needs a reload".to_string(),
            )
        };
        out.push(
            Change::new(Action::Delete, Kind::Backend, name.as_str(), mode, reason)
                .detail(format!(": {}", describe_backend(b)))
                .values(Some(backend_value(b)), None),
        );
    }
    for (name, o, n) in d.changed {
        backend_update(slots, name, o, n, out);
    }
}

fn dedicated_reason(b: &Backend, base: &str) -> String {
    let why = if !b.extra.is_empty() {
        "it has raw `extra:` lines"
    } else if b.servers.len() > 1 {
        "it has several servers"
    } else if matches!(
        b.servers.first().map(|s| &s.target),
        Some(ServerTarget::Address(_))
    ) {
        "its server is an address, not an agent"
    } else if b.health_check.as_ref().is_some_and(|h| h.path.is_some()) {
        "it has an HTTP health check"
    } else {
        "it sets a balance algorithm"
    };
    format!("{base} ({why}, so it cannot take an app slot)")
}

fn backend_update(slots: &Slots<'_>, name: &str, o: &Backend, n: &Backend, out: &mut Vec<Change>) {
    let (op, np) = (layout::is_app(o), layout::is_app(n));
    // Each update names the field it changes, with its values before and after.
    let mut update =
        |mode: Mode, reason: String, detail: String, field: &str, values: (Value, Value)| {
            out.push(
                Change::new(Action::Update, Kind::Backend, name, mode, reason)
                    .detail(detail)
                    .values(
                        Some(json!({ field: values.0 })),
                        Some(json!({ field: values.1 })),
                    ),
            );
        };
    let servers = |b: &Backend| json!(b.servers.iter().map(server_value).collect::<Vec<_>>());
    let described = format!(": {}", arrow(describe_backend(o), describe_backend(n)));
    match (op, np) {
        (true, false) => {
            return update(
                Mode::Reload,
                dedicated_reason(
                    n,
                    "leaves its app slot for a backend section of its own: reload",
                ),
                described,
                "servers",
                (servers(o), servers(n)),
            );
        }
        (false, true) => {
            return update(
                Mode::Reload,
                "becomes an app: its backend section goes and it takes a slot, with a reload"
                    .into(),
                described,
                "servers",
                (servers(o), servers(n)),
            );
        }
        (true, true) => {
            let (from, to) = (
                Slots::slot(slots.before, name, o.mode),
                Slots::slot(slots.after, name, n.mode),
            );
            if from != to {
                // Another pool (mode), or moved down as its pool shrinks.
                let reason = slots
                    .reload_reason_for(name, o.mode)
                    .or_else(|| slots.reload_reason_for(name, n.mode));
                let (mode, reason) = match reason {
                    Some(reason) => (Mode::Reload, reason),
                    None => (
                        Mode::Runtime,
                        format!("del server {from}/{name} + add server {to}/{name}"),
                    ),
                };
                let detail = format!("{described} (slot {})", arrow(&from, &to));
                return update(mode, reason, detail, "slot", (json!(from), json!(to)));
            }
        }
        (false, false) => {}
    }
    let app = np;
    // Backend-wide settings of a dedicated backend live in its section.
    if !app {
        if o.mode != n.mode {
            update(
                Mode::Reload,
                "the backend's mode changes with a reload".into(),
                format!(": mode {:?} → {:?}", o.mode, n.mode).to_lowercase(),
                "mode",
                (mode_value(o.mode), mode_value(n.mode)),
            );
        }
        if o.balance != n.balance {
            update(
                Mode::Reload,
                "the balance algorithm changes with a reload".into(),
                format!(
                    ": balance {}",
                    arrow(o.balance.as_str(), n.balance.as_str())
                ),
                "balance",
                (json!(o.balance.as_str()), json!(n.balance.as_str())),
            );
        }
        let path = |b: &Backend| {
            b.health_check
                .as_ref()
                .and_then(|h| h.path.clone().map(|p| (p, h.host.clone())))
        };
        if path(o) != path(n) {
            let show = |b: &Backend| path(b).map(|(p, _)| p).unwrap_or_else(|| "none".into());
            update(
                Mode::Reload,
                "the HTTP health check changes with a reload".into(),
                format!(": health check {}", arrow(show(o), show(n))),
                "health_check",
                (health_value(o), health_value(n)),
            );
        }
    }
    // Server options (checks, TLS) are fixed when a server is created.
    let check_params = |b: &Backend| {
        b.health_check
            .as_ref()
            .map(|h| (h.interval, h.rise, h.fall))
    };
    if check_params(o) != check_params(n) {
        let show = |b: &Backend| match &b.health_check {
            None => "off".to_string(),
            Some(h) => format!("every {}", h.interval),
        };
        update(
            Mode::Reload,
            "health check settings of servers change with a reload".into(),
            format!(": health check {}", arrow(show(o), show(n))),
            "health_check",
            (health_value(o), health_value(n)),
        );
    }
    if o.tls != n.tls {
        let show = |b: &Backend| match &b.tls {
            None => "off".to_string(),
            Some(t) if t.verify => "verified".to_string(),
            Some(_) => "on (not verified)".to_string(),
        };
        update(
            Mode::Reload,
            "TLS settings of servers change with a reload".into(),
            format!(": tls {}", arrow(show(o), show(n))),
            "tls",
            (tls_value(o), tls_value(n)),
        );
    }
    server_changes(name, o, n, app, out);
}

fn server_changes(backend: &str, o: &Backend, n: &Backend, app: bool, out: &mut Vec<Change>) {
    use crate::model::Server;
    // A one-server backend speaks of its server as itself: `~ backend legacy: weight 10 → 20`,
    // even when the server's derived name (`agent:port`) changes with it.
    let single = o.servers.len() == 1 && n.servers.len() == 1;
    let (added, removed, changed): (Vec<&Server>, Vec<&Server>, Vec<(&Server, &Server)>) = if single
    {
        let (a, b) = (&o.servers[0], &n.servers[0]);
        (
            Vec::new(),
            Vec::new(),
            if a == b { Vec::new() } else { vec![(a, b)] },
        )
    } else {
        let by_name = |b: &Backend| {
            b.servers
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let (os, ns) = (by_name(o), by_name(n));
        let d = diff_maps(&os, &ns);
        fn find<'b>(b: &'b Backend, name: &str) -> &'b Server {
            b.servers.iter().find(|s| s.name == name).expect("listed")
        }
        (
            d.added.iter().map(|(k, _)| find(n, k)).collect(),
            d.removed.iter().map(|(k, _)| find(o, k)).collect(),
            d.changed
                .iter()
                .map(|(k, _, _)| (find(o, k), find(n, k)))
                .collect(),
        )
    };
    for server in added {
        out.push(
            Change::new(
                Action::Create,
                Kind::Server,
                format!("{backend}/{}", server.name),
                Mode::Runtime,
                "add server",
            )
            .values(None, Some(server_value(server))),
        );
    }
    for server in removed {
        out.push(
            Change::new(
                Action::Delete,
                Kind::Server,
                format!("{backend}/{}", server.name),
                Mode::Runtime,
                "set server state maint + del server",
            )
            .values(Some(server_value(server)), None),
        );
    }
    for (a, b) in changed {
        let mut parts = Vec::new();
        let mut commands = Vec::new();
        let (mut before, mut after) = (serde_json::Map::new(), serde_json::Map::new());
        let (av, bv) = (server_value(a), server_value(b));
        for key in ["agent", "address", "port", "weight", "maintenance"] {
            if av.get(key) != bv.get(key) {
                before.insert(key.into(), av.get(key).cloned().unwrap_or(Value::Null));
                after.insert(key.into(), bv.get(key).cloned().unwrap_or(Value::Null));
            }
        }
        if a.target != b.target || a.port != b.port {
            let show = |s: &Server| match &s.target {
                ServerTarget::Agent(x) => format!("{x}:{}", s.port),
                ServerTarget::Address(ip) => std::net::SocketAddr::new(*ip, s.port).to_string(),
            };
            parts.push(format!("server {}", arrow(show(a), show(b))));
            // An app's server is named after its backend; a dedicated backend's servers are
            // named after their address, so a new address is a new server.
            commands.push(if app || a.name == b.name {
                "set server addr"
            } else {
                "add server + del server"
            });
        }
        if a.weight != b.weight {
            parts.push(format!("weight {}", arrow(a.weight, b.weight)));
            commands.push("set server weight");
        }
        if a.maintenance != b.maintenance {
            parts.push(format!(
                "maintenance {}",
                arrow(a.maintenance, b.maintenance)
            ));
            commands.push("set server state");
        }
        commands.dedup();
        let (kind, name) = if single {
            (Kind::Backend, backend.to_string())
        } else {
            (Kind::Server, format!("{backend}/{}", a.name))
        };
        out.push(
            Change::new(
                Action::Update,
                kind,
                name,
                Mode::Runtime,
                commands.join(" + "),
            )
            .detail(format!(": {}", parts.join(", ")))
            .values(Some(before.into()), Some(after.into())),
        );
    }
}

fn domain_changes(old: &Model, new: &Model, out: &mut Vec<Change>) {
    let d = diff_maps(&old.domains, &new.domains);
    let placement = |domain: &Domain| -> String {
        match &domain.listener {
            Some(l) => format!(" (listener {l})"),
            None => String::new(),
        }
    };
    let map_of = |domain: &Domain| match &domain.listener {
        Some(l) => layout::listener_map(l),
        None => layout::SHARED_HTTP_MAP.to_string(),
    };
    // HTTP listeners (in both states) whose frontend gains or loses a lookup rule.
    let shifted: Vec<(&String, layout::HttpLookups, layout::HttpLookups)> = new
        .listeners
        .iter()
        .filter(|(name, l)| {
            matches!(l.kind, ListenerKind::Http { .. })
                && old.listeners.get(*name).map(|o| &o.kind) == Some(&l.kind)
        })
        .map(|(name, _)| {
            (
                name,
                layout::http_lookups(old, name),
                layout::http_lookups(new, name),
            )
        })
        .filter(|(_, before, after)| before != after)
        .collect();
    // Why this domain's change needs a reload because of a lookup rule, if it does.
    let lookup_shift = |host: &str, domain: &Domain| -> Option<String> {
        shifted.iter().find_map(|(l, before, after)| {
            let pinned = domain.listener.as_deref() == Some(l.as_str());
            let gains = |b: bool| if b { "gains" } else { "loses" };
            if pinned && before.own != after.own {
                Some(format!(
                    "listener {l}'s frontend {} the lookup of its own map",
                    gains(after.own)
                ))
            } else if host.starts_with("*.")
                && (pinned || domain.listener.is_none())
                && before.wildcards != after.wildcards
            {
                Some(format!(
                    "listener {l}'s frontend {} the wildcard lookup",
                    gains(after.wildcards)
                ))
            } else {
                None
            }
        })
    };
    // A map entry on a listener that the same plan creates is applied by that reload.
    let mode_for = |host: &str, domain: &Domain| match &domain.listener {
        Some(l) if !old.listeners.contains_key(l) => (Mode::Reload, format!("listener {l} is new")),
        _ => match lookup_shift(host, domain) {
            Some(reason) => (Mode::Reload, reason),
            None => (Mode::Runtime, format!("map entry in {}", map_of(domain))),
        },
    };
    for (host, domain) in d.added {
        let (mode, reason) = mode_for(host, domain);
        let reason = match mode {
            Mode::Runtime => format!("add {reason}"),
            Mode::Reload => reason,
        };
        out.push(
            Change::new(Action::Create, Kind::Domain, host.as_str(), mode, reason)
                .detail(format!(" → {}{}", domain.backend, placement(domain)))
                .values(None, Some(domain_value(domain))),
        );
    }
    for (host, domain) in d.removed {
        let (mode, reason) = match lookup_shift(host, domain) {
            Some(reason) => (Mode::Reload, reason),
            None => (
                Mode::Runtime,
                format!("del map entry in {}", map_of(domain)),
            ),
        };
        out.push(
            Change::new(Action::Delete, Kind::Domain, host.as_str(), mode, reason)
                .detail(format!(" → {}{}", domain.backend, placement(domain)))
                .values(Some(domain_value(domain)), None),
        );
    }
    for (host, a, b) in d.changed {
        let (mode, reason) = match lookup_shift(host, a) {
            Some(reason) => (Mode::Reload, reason),
            None => mode_for(host, b),
        };
        let reason = match mode {
            Mode::Runtime => format!("set {reason}"),
            Mode::Reload => reason,
        };
        let mut parts = Vec::new();
        let (mut before, mut after) = (serde_json::Map::new(), serde_json::Map::new());
        for (key, (x, y)) in [
            ("backend", (json!(a.backend), json!(b.backend))),
            ("listener", (json!(a.listener), json!(b.listener))),
        ] {
            if x != y {
                before.insert(key.into(), x);
                after.insert(key.into(), y);
            }
        }
        if a.backend != b.backend {
            parts.push(format!("backend {}", arrow(&a.backend, &b.backend)));
        }
        if a.listener != b.listener {
            let show =
                |l: &Option<String>| l.clone().unwrap_or_else(|| "every HTTP listener".into());
            parts.push(format!(
                "listener {}",
                arrow(show(&a.listener), show(&b.listener))
            ));
        }
        out.push(
            Change::new(Action::Update, Kind::Domain, host.as_str(), mode, reason)
                .detail(format!(": {}", parts.join(", ")))
                .values(Some(before.into()), Some(after.into())),
        );
    }
}

/// The values of model entries as the plan's JSON shows them.
fn listener_value(l: &Listener) -> Value {
    let (mode, tls) = match &l.kind {
        ListenerKind::Http { .. } => ("http", None),
        ListenerKind::Tcp {
            tls: TcpTls::Passthrough,
        } => ("tcp", Some("passthrough")),
        ListenerKind::Tcp {
            tls: TcpTls::Terminate(_),
        } => ("tcp", Some("terminate")),
    };
    json!({
        "bind": l.bind.to_string(),
        "mode": mode,
        "tls": tls,
        "certificates": l.certificates().map(|c| c.files.len()),
    })
}

fn agent_value(a: &crate::model::Agent) -> Value {
    json!({ "address": a.address, "maintenance": a.maintenance })
}

fn server_value(s: &crate::model::Server) -> Value {
    let mut v = json!({
        "name": s.name,
        "port": s.port,
        "weight": s.weight,
        "maintenance": s.maintenance,
    });
    match &s.target {
        ServerTarget::Agent(a) => v["agent"] = json!(a),
        ServerTarget::Address(ip) => v["address"] = json!(ip),
    }
    v
}

fn mode_value(m: crate::model::Mode) -> Value {
    json!(match m {
        crate::model::Mode::Http => "http",
        crate::model::Mode::Tcp => "tcp",
    })
}

fn health_value(b: &Backend) -> Value {
    match &b.health_check {
        None => Value::Null,
        Some(h) => json!({
            "path": h.path,
            "host": h.host,
            "interval": h.interval.to_string(),
            "rise": h.rise,
            "fall": h.fall,
        }),
    }
}

fn tls_value(b: &Backend) -> Value {
    match &b.tls {
        None => Value::Null,
        Some(t) => json!({ "verify": t.verify, "ca_file": t.ca_file, "sni": t.sni }),
    }
}

fn backend_value(b: &Backend) -> Value {
    json!({
        "servers": b.servers.iter().map(server_value).collect::<Vec<_>>(),
        "mode": mode_value(b.mode),
        "balance": b.balance.as_str(),
        "health_check": health_value(b),
        "tls": tls_value(b),
    })
}

fn domain_value(d: &Domain) -> Value {
    json!({ "backend": d.backend, "listener": d.listener })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaying_a_diff_rebuilds_the_target() {
        let a: BTreeMap<u32, &str> = [(1, "a"), (2, "b"), (3, "c")].into();
        let b: BTreeMap<u32, &str> = [(2, "B"), (3, "c"), (4, "d")].into();
        let empty = BTreeMap::new();
        assert_eq!(diff_maps(&a, &b).replay(&a), b);
        assert_eq!(diff_maps(&b, &a).replay(&b), a);
        assert_eq!(diff_maps(&empty, &a).replay(&empty), a);
        assert!(diff_maps(&a, &empty).replay(&a).is_empty());
        let same = diff_maps(&a, &a);
        assert!(same.added.is_empty() && same.removed.is_empty() && same.changed.is_empty());
    }

    /// The side-by-side walk finds what looking every key up in the other map finds, in the
    /// same order, over random pairs of maps.
    #[test]
    fn the_walk_finds_what_lookups_find() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut below = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let mut map = |len| -> BTreeMap<String, u64> {
                (0..below(len))
                    .map(|_| (format!("k{}", below(40)), below(3)))
                    .collect()
            };
            let (a, b) = (map(30), map(30));
            let d = diff_maps(&a, &b);
            let removed: Vec<_> = a.iter().filter(|(k, _)| !b.contains_key(*k)).collect();
            let changed: Vec<_> = a
                .iter()
                .filter_map(|(k, v)| b.get(k).filter(|nv| *nv != v).map(|nv| (k, v, nv)))
                .collect();
            let added: Vec<_> = b.iter().filter(|(k, _)| !a.contains_key(*k)).collect();
            assert_eq!((d.removed, d.changed, d.added), (removed, changed, added));
        }
    }
}
