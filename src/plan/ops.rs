//! `plan`, operations half: from the files HAProxy runs and the files it should run, the typed
//! runtime operations (map entries, servers, certificates) that take it there without a reload,
//! or the reason none can. This is the one place that decides runtime or reload (`Execution`);
//! targets only execute what it says. The same operations replayed on an in-memory copy of the
//! runtime state must give exactly the new state: that is how they are tested.

use crate::render::RenderOptions;
use crate::render::layout::ServerLine;
use crate::render::readback::{self, Servers};
use crate::target::haproxy::socket::Expect;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What HAProxy holds at runtime that the runtime API can change, read from a set of files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeState {
    /// Map reference (as the configuration names it) → entries.
    pub maps: BTreeMap<String, BTreeMap<String, String>>,
    pub servers: Servers,
    /// crt-list reference → certificate references it lists.
    pub crt_lists: BTreeMap<String, Vec<String>>,
    /// Certificate reference → SHA-256 of its PEM.
    pub certs: BTreeMap<String, String>,
}

pub use crate::target::files::Files;

/// Whether the file at `path` is a map HAProxy reads (a route map, or the ACME challenges').
fn is_map(path: &str, options: &RenderOptions) -> bool {
    (path.starts_with(&options.maps_dir)
        && path[options.maps_dir.len()..].starts_with('/')
        && path.ends_with(".map"))
        || path == crate::acme::CHALLENGE_MAP
}

impl RuntimeState {
    pub fn from_files(files: &Files, options: &RenderOptions) -> RuntimeState {
        RuntimeState::read(
            files.iter().map(|(path, bytes)| (path, bytes.as_slice())),
            options,
        )
    }

    /// The part of the state `files` hold that `ops` touch and that an apply reads whole: the
    /// maps they replace and the servers of the backends they change. A map changed entry by
    /// entry is not in it: those operations carry its new entries (`Op::map_entry`), and the
    /// apply re-bases and reads back just those, without parsing every map of a large state.
    pub fn touched_by(files: &Files, options: &RenderOptions, ops: &[Op]) -> RuntimeState {
        let maps: BTreeSet<&str> = ops.iter().filter_map(Op::replaced_map).collect();
        let backends: BTreeSet<&str> = ops.iter().filter_map(Op::backend).collect();
        let mut state = RuntimeState::default();
        for map in maps {
            if let Some(bytes) = files.get(map) {
                let entries = readback::parse_map(&String::from_utf8_lossy(bytes));
                state.maps.insert(map.to_string(), entries);
            }
        }
        if !backends.is_empty()
            && let Some(config) = files.get(&options.config_name)
        {
            state.servers = readback::parse_servers_of(&String::from_utf8_lossy(config), |b| {
                backends.contains(b)
            });
        }
        state
    }

    /// The state `files` (path, content) hold.
    fn read<'a>(
        files: impl Iterator<Item = (&'a String, &'a [u8])>,
        options: &RenderOptions,
    ) -> RuntimeState {
        let mut state = RuntimeState::default();
        let certs_prefix = format!("{}/", options.certs_dir);
        for (path, bytes) in files {
            let text = || String::from_utf8_lossy(bytes);
            if *path == options.config_name {
                state.servers = readback::parse_servers(&text());
            } else if is_map(path, options) {
                state
                    .maps
                    .insert(path.clone(), readback::parse_map(&text()));
            } else if path.starts_with(&certs_prefix) && path.ends_with(".crt-list") {
                state.crt_lists.insert(
                    path.clone(),
                    text()
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string)
                        .collect(),
                );
            } else if path.starts_with(&certs_prefix) && path.ends_with(".pem") {
                state
                    .certs
                    .insert(path.clone(), crate::plan::sha256_hex(bytes));
            }
        }
        state
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Op {
    AddServer {
        backend: String,
        server: ServerLine,
    },
    SetAddr {
        backend: String,
        name: String,
        addr: IpAddr,
        port: u16,
    },
    SetWeight {
        backend: String,
        name: String,
        weight: u16,
    },
    SetState {
        backend: String,
        name: String,
        disabled: bool,
    },
    DelServer {
        backend: String,
        name: String,
    },
    MapAdd {
        map: String,
        key: String,
        value: String,
    },
    MapSet {
        map: String,
        key: String,
        value: String,
    },
    MapDel {
        map: String,
        key: String,
    },
    /// Atomic replacement of a whole map: prepare, add to the new version, commit.
    MapReplace {
        map: String,
        entries: BTreeMap<String, String>,
    },
    /// A certificate new to HAProxy's store (PEM bytes in `pem`).
    CertNew {
        cert: String,
        pem: Vec<u8>,
    },
    CertUpdate {
        cert: String,
        pem: Vec<u8>,
    },
    CrtListAdd {
        list: String,
        cert: String,
    },
    CrtListDel {
        list: String,
        cert: String,
    },
    CertDel {
        cert: String,
    },
}

/// Above this many changed entries a map is replaced atomically (a new version) instead.
const MAP_BATCH: usize = 64;

/// The largest command sent with a map payload. HAProxy reads a command into one buffer of
/// `tune.bufsize` (16 384 bytes by default) and, on 2.6, silently drops a longer one (measured:
/// a 16 359-byte `add map` is taken, a 16 386-byte one is answered with nothing and ignored);
/// half of it leaves room for a smaller `tune.bufsize` and for the command line itself.
pub const PAYLOAD_BUDGET: usize = 8 * 1024;

/// How a plan takes a target to the new files: the decision, made once, by `plan_ops`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "how")]
pub enum Execution {
    /// Through the runtime API, these operations in this order (none when only files that
    /// HAProxy does not read change). The files are written too, so a reload keeps them.
    Runtime { ops: Vec<Op> },
    /// A reload (or a start) onto the new files, for these reasons.
    Reload { reasons: Vec<String> },
}

impl Execution {
    pub fn is_reload(&self) -> bool {
        matches!(self, Execution::Reload { .. })
    }

    /// The decision for a target holding `old` that should hold `new`.
    pub fn decide(old: &Files, new: &Files, options: &RenderOptions) -> Execution {
        match plan_ops(old, new, options) {
            Ok(ops) => Execution::Runtime { ops },
            Err(reason) => Execution::Reload {
                reasons: vec![reason],
            },
        }
    }
}

/// The operations that take HAProxy from the `old` files to the `new` ones, or why only a
/// reload can (a configuration that differs beyond servers and maps; servers, for a target
/// whose servers change only with its configuration: `RenderOptions::runtime_servers`).
pub fn plan_ops(old: &Files, new: &Files, options: &RenderOptions) -> Result<Vec<Op>, String> {
    let config =
        |files| Files::get(files, &options.config_name).map(|b| String::from_utf8_lossy(b));
    let (Some(old_config), Some(new_config)) = (config(old), config(new)) else {
        return Err("there is no running configuration to change".into());
    };
    // Only what differs is read: the configuration's changed sections (what may block a
    // runtime change, and their servers), and the maps and certificates whose files differ.
    // The rest is the same on both sides and would give no operation; reading it all cost
    // most of a plan at 10k apps.
    let (old_part, new_part) = readback::changed_sections(&old_config, &new_config);
    if let Some(reason) = readback::runtime_blocker_in(old_part, new_part) {
        return Err(reason);
    }
    let name = &options.config_name;
    // Maps are read below, by the lines that differ.
    let not_map = |(path, _): &(&String, &[u8])| !is_map(path, options);
    let before = RuntimeState::read(
        differing(old, (name, old_part), new).filter(not_map),
        options,
    );
    let after = RuntimeState::read(
        differing(new, (name, new_part), old).filter(not_map),
        options,
    );
    if before.crt_lists.keys().ne(after.crt_lists.keys()) {
        return Err("a listener's certificate list appears or disappears".into());
    }
    let mut ops = Vec::new();

    // 1. Servers that appear, before any route points at them.
    for ((backend, name), server) in &after.servers {
        match before.servers.get(&(backend.clone(), name.clone())) {
            None => ops.push(Op::AddServer {
                backend: backend.clone(),
                server: server.clone(),
            }),
            Some(old) => {
                if (old.addr, old.port) != (server.addr, server.port) {
                    ops.push(Op::SetAddr {
                        backend: backend.clone(),
                        name: name.clone(),
                        addr: server.addr,
                        port: server.port,
                    });
                }
                if old.weight != server.weight {
                    ops.push(Op::SetWeight {
                        backend: backend.clone(),
                        name: name.clone(),
                        weight: server.weight,
                    });
                }
                if old.disabled != server.disabled {
                    ops.push(Op::SetState {
                        backend: backend.clone(),
                        name: name.clone(),
                        disabled: server.disabled,
                    });
                }
            }
        }
    }
    // 2. Certificates, so that new names present them before they are routed.
    for (cert, digest) in &after.certs {
        let pem = new[cert].clone();
        match before.certs.get(cert) {
            None => ops.push(Op::CertNew {
                cert: cert.clone(),
                pem,
            }),
            Some(old) if old != digest => ops.push(Op::CertUpdate {
                cert: cert.clone(),
                pem,
            }),
            Some(_) => {}
        }
    }
    for (list, certs) in &after.crt_lists {
        let old = &before.crt_lists[list];
        for cert in certs.iter().filter(|c| !old.contains(c)) {
            ops.push(Op::CrtListAdd {
                list: list.clone(),
                cert: cert.clone(),
            });
        }
    }
    // 3. Routes.
    for (map, bytes) in new.iter().filter(|(path, _)| is_map(path, options)) {
        let before = old.get(map);
        if before != Some(bytes) {
            let before = before.map(|b| String::from_utf8_lossy(b));
            ops.extend(map_text_ops(
                map,
                before.as_deref().unwrap_or(""),
                &String::from_utf8_lossy(bytes),
            ));
        }
    }
    // 4. What nothing routes to any more.
    for (list, certs) in &before.crt_lists {
        let new_list = &after.crt_lists[list];
        for cert in certs.iter().filter(|c| !new_list.contains(c)) {
            ops.push(Op::CrtListDel {
                list: list.clone(),
                cert: cert.clone(),
            });
        }
    }
    for cert in before
        .certs
        .keys()
        .filter(|c| !after.certs.contains_key(*c))
    {
        ops.push(Op::CertDel { cert: cert.clone() });
    }
    for (backend, name) in before
        .servers
        .keys()
        .filter(|k| !after.servers.contains_key(*k))
    {
        ops.push(Op::DelServer {
            backend: backend.clone(),
            name: name.clone(),
        });
    }
    if !options.runtime_servers
        && let Some(op) = ops.iter().find(|op| op.backend().is_some())
    {
        return Err(format!(
            "{}: this target changes servers only with its configuration",
            op.describe()
        ));
    }
    Ok(ops)
}

/// The files of `files` that differ from `other`'s, with the configuration (`config`: its name,
/// and the part of it to read) in place of the whole configuration.
fn differing<'a>(
    files: &'a Files,
    config: (&'a String, &'a str),
    other: &'a Files,
) -> impl Iterator<Item = (&'a String, &'a [u8])> {
    files.iter().filter_map(move |(path, bytes)| {
        if path == config.0 {
            Some((path, config.1.as_bytes()))
        } else {
            (other.get(path) != Some(bytes)).then_some((path, bytes.as_slice()))
        }
    })
}

/// The operations that turn the entries `old` of `map` into `new`: entry by entry for a few
/// changes, one atomic replacement for many.
pub fn map_ops(
    map: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<Op> {
    let changed = new.iter().filter(|(k, v)| old.get(*k) != Some(v)).count()
        + old.keys().filter(|k| !new.contains_key(*k)).count();
    if changed == 0 {
        return Vec::new();
    }
    if changed > MAP_BATCH {
        return vec![Op::MapReplace {
            map: map.to_string(),
            entries: new.clone(),
        }];
    }
    map_entry_ops(map, old, new)
}

/// `map_ops` between two texts of a map file. Files that list their keys in strictly increasing
/// order, as lunafront writes them, are compared line by line and only the entries that differ
/// are read (a 10k-entry map parsed twice was a tenth of a plan); any other file (edited by hand,
/// with a key twice) is read whole.
fn map_text_ops(map: &str, old: &str, new: &str) -> Vec<Op> {
    let (before, after) = sorted_differences(old, new)
        .unwrap_or_else(|| (readback::parse_map(old), readback::parse_map(new)));
    let ops = map_ops(map, &before, &after);
    if let [Op::MapReplace { .. }] = ops.as_slice() {
        // Only the differing entries were read: a replacement takes them all.
        return vec![Op::MapReplace {
            map: map.to_string(),
            entries: readback::parse_map(new),
        }];
    }
    ops
}

/// The entries of two map texts that differ (old values of the keys changed or removed, new
/// values of the keys changed or added), by a merge of their lines; `None` unless each lists
/// its keys in strictly increasing order.
fn sorted_differences(old: &str, new: &str) -> Option<(MapEntries, MapEntries)> {
    let (old, new) = (readback::map_entries(old), readback::map_entries(new));
    let increasing = |entries: &[(&str, &str)]| entries.windows(2).all(|w| w[0].0 < w[1].0);
    if !increasing(&old) || !increasing(&new) {
        return None;
    }
    let (mut before, mut after) = (MapEntries::new(), MapEntries::new());
    let owned = |(k, v): &(&str, &str)| (k.to_string(), v.to_string());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a.0 == b.0 => {
                if a.1 != b.1 {
                    before.extend([owned(a)]);
                    after.extend([owned(b)]);
                }
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a.0 < b.0 => {
                before.extend([owned(a)]);
                i += 1;
            }
            (Some(a), None) => {
                before.extend([owned(a)]);
                i += 1;
            }
            (_, Some(b)) => {
                after.extend([owned(b)]);
                j += 1;
            }
            (None, None) => unreachable!("the loop ends first"),
        }
    }
    Some((before, after))
}

type MapEntries = BTreeMap<String, String>;

/// The same change, always entry by entry (for APIs without an atomic replacement).
pub fn map_entry_ops(
    map: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for (key, value) in new {
        let (map, key, value) = (map.to_string(), key.clone(), value.clone());
        match old.get(&key) {
            None => ops.push(Op::MapAdd { map, key, value }),
            Some(v) if *v != value => ops.push(Op::MapSet { map, key, value }),
            Some(_) => {}
        }
    }
    for key in old.keys().filter(|k| !new.contains_key(*k)) {
        ops.push(Op::MapDel {
            map: map.to_string(),
            key: key.clone(),
        });
    }
    ops
}

/// Recomputes the map operations against what HAProxy holds now, so that a map file edited by
/// hand, or a map changed through the socket, is still brought to the new entries: a replaced
/// map against the whole map HAProxy holds (`live_map`), a map changed entry by entry (at most
/// `MAP_BATCH` entries: `map_ops`) against just the entries it touches (`live_entry`, HAProxy's
/// value for one key), each key set, added or removed as HAProxy's value requires. `new` holds
/// the replaced maps' new entries (`RuntimeState::touched_by`). A change by hand to another entry
/// of a map changed entry by entry is left to the daemon's runtime drift check: reading a
/// 10k-entry map back cost more than the rest of the apply.
pub fn rebase_map_ops<E>(
    ops: Vec<Op>,
    new: &RuntimeState,
    mut live_map: impl FnMut(&str) -> Result<BTreeMap<String, String>, E>,
    mut live_entry: impl FnMut(&str, &str) -> Result<Option<String>, E>,
) -> Result<Vec<Op>, E> {
    let mut out = Vec::with_capacity(ops.len());
    let mut done = std::collections::BTreeSet::new();
    for op in ops {
        if let Some((map, key, value)) = op.map_entry() {
            let live = live_entry(map, key)?;
            let (map, key) = (map.to_string(), key.to_string());
            match (live, value) {
                (None, Some(value)) => out.push(Op::MapAdd {
                    map,
                    key,
                    value: value.to_string(),
                }),
                (Some(live), Some(value)) if live != value => out.push(Op::MapSet {
                    map,
                    key,
                    value: value.to_string(),
                }),
                (Some(_), None) => out.push(Op::MapDel { map, key }),
                _ => {}
            }
            continue;
        }
        match &op {
            Op::MapReplace { map, .. } => {
                if done.insert(map.clone()) {
                    let live = live_map(map)?;
                    out.extend(map_ops(map, &live, &new.maps[map]));
                }
            }
            _ => out.push(op),
        }
    }
    Ok(out)
}

/// One runtime API command with the answer that means success.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub text: String,
    pub expect: Expect,
}

fn cmd(text: String, expect: Expect) -> Command {
    Command { text, expect }
}

/// Map entries as payloads (`<<`, one `key value` line each, an empty line to end) of at most
/// `budget` bytes each, in order.
fn map_chunks(entries: &BTreeMap<String, String>, budget: usize) -> Vec<String> {
    // "<<\n" before the lines and "\n" after them; the version number that replaces the
    // placeholder may be longer than it.
    let room = budget.saturating_sub(16);
    let mut chunks = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    let mut size = 0;
    for (key, value) in entries {
        let line = format!("{key} {value}");
        if !lines.is_empty() && size + line.len() + 1 > room {
            chunks.push(payload(lines.drain(..)));
            size = 0;
        }
        size += line.len() + 1;
        lines.push(line);
    }
    if !lines.is_empty() {
        chunks.push(payload(lines.into_iter()));
    }
    chunks
}

fn payload(lines: impl Iterator<Item = String>) -> String {
    let mut out = String::from("<<\n");
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    out.push('\n');
    out
}

impl Op {
    /// The backend whose servers this operation changes, if it changes servers.
    pub fn backend(&self) -> Option<&str> {
        match self {
            Op::AddServer { backend, .. }
            | Op::SetAddr { backend, .. }
            | Op::SetWeight { backend, .. }
            | Op::SetState { backend, .. }
            | Op::DelServer { backend, .. } => Some(backend),
            _ => None,
        }
    }

    /// The map this operation changes, if it changes a map.
    pub fn map(&self) -> Option<&str> {
        match self {
            Op::MapAdd { map, .. }
            | Op::MapSet { map, .. }
            | Op::MapDel { map, .. }
            | Op::MapReplace { map, .. } => Some(map),
            _ => None,
        }
    }

    /// The map this operation replaces whole, if it replaces one.
    pub fn replaced_map(&self) -> Option<&str> {
        match self {
            Op::MapReplace { map, .. } => Some(map),
            _ => None,
        }
    }

    /// The map entry this operation changes, as (map, key, new value; `None`: removed), if it
    /// changes one entry of a map.
    pub fn map_entry(&self) -> Option<(&str, &str, Option<&str>)> {
        match self {
            Op::MapAdd { map, key, value } | Op::MapSet { map, key, value } => {
                Some((map, key, Some(value)))
            }
            Op::MapDel { map, key } => Some((map, key, None)),
            _ => None,
        }
    }

    /// One line for people (the plan's text view): the command for a single one, a summary for
    /// payloads (no certificate content is shown).
    pub fn describe(&self) -> String {
        match self {
            Op::MapReplace { map, entries } => {
                format!(
                    "replace map {map} ({} entries, one transaction)",
                    entries.len()
                )
            }
            Op::CertNew { cert, .. } => format!("new ssl cert {cert}"),
            Op::CertUpdate { cert, .. } => format!("update ssl cert {cert}"),
            Op::AddServer { backend, server } => {
                format!("add server {backend}/{} {}", server.name, server.address())
            }
            other => other
                .commands()
                .into_iter()
                .last()
                .map(|c| c.text)
                .unwrap_or_default(),
        }
    }

    /// The commands, in order. A map replacement's version number is only known once
    /// `prepare map` answers: its `add` and `commit` use the `@VERSION` placeholder.
    pub fn commands(&self) -> Vec<Command> {
        match self {
            Op::AddServer { backend, server } => {
                let params: Vec<String> = server
                    .params()
                    .into_iter()
                    .filter(|p| p != "disabled")
                    .collect();
                let mut out = vec![cmd(
                    format!(
                        "add server {backend}/{} {} {}",
                        server.name,
                        server.address(),
                        params.join(" ")
                    ),
                    Expect::Prefix("New server registered"),
                )];
                if server.options.iter().any(|o| o == "check") {
                    out.push(cmd(
                        format!("enable health {backend}/{}", server.name),
                        Expect::Empty,
                    ));
                }
                // Servers added at runtime start in maintenance.
                if !server.disabled {
                    out.push(cmd(
                        format!("enable server {backend}/{}", server.name),
                        Expect::Empty,
                    ));
                }
                out
            }
            Op::SetAddr {
                backend,
                name,
                addr,
                port,
            } => {
                vec![cmd(
                    format!("set server {backend}/{name} addr {addr} port {port}"),
                    Expect::Any,
                )]
            }
            Op::SetWeight {
                backend,
                name,
                weight,
            } => {
                vec![cmd(
                    format!("set server {backend}/{name} weight {weight}"),
                    Expect::Empty,
                )]
            }
            Op::SetState {
                backend,
                name,
                disabled,
            } => {
                let state = if *disabled { "maint" } else { "ready" };
                vec![cmd(
                    format!("set server {backend}/{name} state {state}"),
                    Expect::Empty,
                )]
            }
            Op::DelServer { backend, name } => vec![
                cmd(
                    format!("set server {backend}/{name} state maint"),
                    Expect::Empty,
                ),
                cmd(
                    format!("del server {backend}/{name}"),
                    Expect::Prefix("Server deleted"),
                ),
            ],
            Op::MapAdd { map, key, value } => {
                vec![cmd(format!("add map {map} {key} {value}"), Expect::Empty)]
            }
            Op::MapSet { map, key, value } => {
                vec![cmd(format!("set map {map} {key} {value}"), Expect::Empty)]
            }
            Op::MapDel { map, key } => vec![cmd(format!("del map {map} {key}"), Expect::Empty)],
            Op::MapReplace { map, entries } => {
                let mut out = vec![cmd(
                    format!("prepare map {map}"),
                    Expect::Prefix("New version created:"),
                )];
                // The new version is filled in payloads that fit HAProxy's buffer; the apply
                // reads it back before `commit` (see `haproxy::execute`).
                let head = format!("add map @VERSION {map} ");
                out.extend(
                    map_chunks(entries, PAYLOAD_BUDGET - head.len())
                        .into_iter()
                        .map(|chunk| cmd(format!("{head}{chunk}"), Expect::Empty)),
                );
                out.push(cmd(format!("commit map @VERSION {map}"), Expect::Empty));
                out
            }
            Op::CertNew { cert, pem } => vec![
                cmd(
                    format!("new ssl cert {cert}"),
                    Expect::Prefix("New empty certificate store"),
                ),
                cmd(
                    format!(
                        "set ssl cert {cert} {}",
                        payload(String::from_utf8_lossy(pem).lines().map(str::to_string))
                    ),
                    Expect::Prefix("Transaction created"),
                ),
                cmd(format!("commit ssl cert {cert}"), Expect::Any),
            ],
            Op::CertUpdate { cert, pem } => vec![
                cmd(
                    format!(
                        "set ssl cert {cert} {}",
                        payload(String::from_utf8_lossy(pem).lines().map(str::to_string))
                    ),
                    Expect::Prefix("Transaction"),
                ),
                cmd(format!("commit ssl cert {cert}"), Expect::Any),
            ],
            Op::CrtListAdd { list, cert } => {
                vec![cmd(format!("add ssl crt-list {list} {cert}"), Expect::Any)]
            }
            Op::CrtListDel { list, cert } => {
                vec![cmd(format!("del ssl crt-list {list} {cert}"), Expect::Any)]
            }
            Op::CertDel { cert } => vec![cmd(format!("del ssl cert {cert}"), Expect::Any)],
        }
    }

    /// The change this operation makes, applied to an in-memory runtime state.
    pub fn apply_to(&self, state: &mut RuntimeState) {
        let key = |b: &str, n: &str| (b.to_string(), n.to_string());
        match self {
            Op::AddServer { backend, server } => {
                state
                    .servers
                    .insert(key(backend, &server.name), server.clone());
            }
            Op::SetAddr {
                backend,
                name,
                addr,
                port,
            } => {
                if let Some(s) = state.servers.get_mut(&key(backend, name)) {
                    s.addr = *addr;
                    s.port = *port;
                }
            }
            Op::SetWeight {
                backend,
                name,
                weight,
            } => {
                if let Some(s) = state.servers.get_mut(&key(backend, name)) {
                    s.weight = *weight;
                }
            }
            Op::SetState {
                backend,
                name,
                disabled,
            } => {
                if let Some(s) = state.servers.get_mut(&key(backend, name)) {
                    s.disabled = *disabled;
                }
            }
            Op::DelServer { backend, name } => {
                state.servers.remove(&key(backend, name));
            }
            Op::MapAdd { map, key, value } | Op::MapSet { map, key, value } => {
                state
                    .maps
                    .entry(map.clone())
                    .or_default()
                    .insert(key.clone(), value.clone());
            }
            Op::MapDel { map, key } => {
                if let Some(m) = state.maps.get_mut(map) {
                    m.remove(key);
                }
            }
            Op::MapReplace { map, entries } => {
                state.maps.insert(map.clone(), entries.clone());
            }
            Op::CertNew { cert, pem } | Op::CertUpdate { cert, pem } => {
                state
                    .certs
                    .insert(cert.clone(), crate::plan::sha256_hex(pem));
            }
            Op::CrtListAdd { list, cert } => {
                let l = state.crt_lists.entry(list.clone()).or_default();
                l.push(cert.clone());
            }
            Op::CrtListDel { list, cert } => {
                if let Some(l) = state.crt_lists.get_mut(list) {
                    l.retain(|c| c != cert);
                }
            }
            Op::CertDel { cert } => {
                state.certs.remove(cert);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::validate;
    use crate::render::{readback, render_onto};
    use crate::spec::load::{Source, SourceFile};

    /// The files of `yaml` rendered for a target that holds `onto` (the way `apply` renders).
    fn files_onto(yaml: &str, onto: Option<&Files>) -> Files {
        let source = Source::parse(vec![SourceFile::new("s.yaml".into(), yaml.to_string())]);
        let model = validate(&source).model.expect("valid");
        let options = RenderOptions::for_target(None);
        let slots = onto
            .and_then(|f| f.get(&options.config_name))
            .map(|c| readback::slot_pools(&String::from_utf8_lossy(c)))
            .unwrap_or_default();
        render_onto(&model, &options, &slots)
            .unwrap()
            .files()
            .into_iter()
            .map(|f| (f.path, f.bytes))
            .collect()
    }

    fn files(yaml: &str) -> Files {
        files_onto(yaml, None)
    }

    fn yaml_with(apps: &[(&str, u16)], weight: u16, agent_ip: &str) -> String {
        let mut s = format!(
            "version: 1\nlisteners:\n  http: {{ bind: \":80\" }}\nagents:\n  a: {{ address: {agent_ip} }}\n  b: {{ address: 10.0.0.2 }}\nbackends:\n  multi: {{ servers: [ {{ agent: a, port: 1, weight: {weight} }}, {{ agent: b, port: 1 }} ] }}\n"
        );
        for (app, port) in apps {
            s.push_str(&format!(
                "  {app}: {{ servers: [ {{ agent: a, port: {port} }} ] }}\n"
            ));
        }
        s.push_str("domains:\n  multi.example.com: { backend: multi }\n");
        for (app, _) in apps {
            s.push_str(&format!("  {app}.example.com: {{ backend: {app} }}\n"));
        }
        s
    }

    fn replay(old: &Files, new: &Files) -> RuntimeState {
        let options = RenderOptions::for_target(None);
        let ops = plan_ops(old, new, &options).expect("runtime-able");
        // What an apply reads back after them is the new state where they touch it.
        let (whole, touched) = (
            RuntimeState::from_files(new, &options),
            RuntimeState::touched_by(new, &options, &ops),
        );
        // Maps replaced are read whole; a map changed entry by entry is read back by the entries
        // its operations carry, which are the new state's.
        let replaced: BTreeSet<&str> = ops.iter().filter_map(Op::replaced_map).collect();
        assert_eq!(
            touched
                .maps
                .keys()
                .map(String::as_str)
                .collect::<BTreeSet<_>>(),
            replaced
        );
        for (map, entries) in &touched.maps {
            assert_eq!(entries, &whole.maps[map]);
        }
        for (map, key, value) in ops.iter().filter_map(Op::map_entry) {
            assert!(
                !replaced.contains(map),
                "{map} is replaced and changed by entry"
            );
            assert_eq!(
                whole.maps[map].get(key).map(String::as_str),
                value,
                "{map} {key}"
            );
        }
        let backends: BTreeSet<&str> = ops.iter().filter_map(Op::backend).collect();
        let mut servers = whole.servers.clone();
        servers.retain(|(b, _), _| backends.contains(b.as_str()));
        assert_eq!(touched.servers, servers);
        let mut state = RuntimeState::from_files(old, &options);
        for op in &ops {
            op.apply_to(&mut state);
        }
        state
    }

    #[test]
    fn map_operations_from_the_lines_that_differ_are_those_of_the_whole_maps() {
        let mut rng = crate::test_rng::Rng(0x005e_ed0f_11a9);
        let (mut merged, mut replaced) = (0, 0);
        for round in 0..2_000 {
            // Two maps of up to 300 keys from a pool of 400, with a few values changed; some
            // written as lunafront writes them (sorted, each key once), others as a hand may:
            // out of order, a key twice, comments, blank lines, a line without a value.
            let size = rng.below(300);
            let mut old: BTreeMap<String, String> = BTreeMap::new();
            for _ in 0..size {
                old.insert(format!("h{:03}.example.com", rng.below(400)), "be_a".into());
            }
            let mut new = old.clone();
            let changes = if rng.one_in(4) { 250 } else { 6 };
            for _ in 0..rng.below(changes) {
                let key = format!("h{:03}.example.com", rng.below(400));
                match rng.below(3) {
                    0 => drop(new.remove(&key)),
                    1 => drop(new.insert(key, "be_b".into())),
                    _ => drop(new.insert(key, "be_a".into())),
                }
            }
            let text = |entries: &BTreeMap<String, String>, rng: &mut crate::test_rng::Rng| {
                let mut lines: Vec<String> =
                    entries.iter().map(|(k, v)| format!("{k} {v}")).collect();
                if rng.one_in(5) && !lines.is_empty() {
                    let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
                    lines.swap(a, b);
                }
                if rng.one_in(5) && !lines.is_empty() {
                    let k = lines[rng.below(lines.len())].clone();
                    let key = k.split(' ').next().unwrap().to_string();
                    lines.insert(rng.below(lines.len()), format!("{key} be_c"));
                }
                if rng.one_in(5) {
                    lines.insert(rng.below(lines.len() + 1), "# by hand".into());
                    lines.insert(rng.below(lines.len() + 1), "   ".into());
                    lines.insert(rng.below(lines.len() + 1), "novalue".into());
                }
                lines.join("\n") + "\n"
            };
            let (old_text, new_text) = (text(&old, &mut rng), text(&new, &mut rng));
            let whole = map_ops(
                "m.map",
                &readback::parse_map(&old_text),
                &readback::parse_map(&new_text),
            );
            assert_eq!(
                map_text_ops("m.map", &old_text, &new_text),
                whole,
                "round {round}:\n{old_text}\n--\n{new_text}"
            );
            merged += usize::from(sorted_differences(&old_text, &new_text).is_some());
            replaced += usize::from(matches!(whole.as_slice(), [Op::MapReplace { .. }]));
        }
        // Both ways were taken, and replacements were among them.
        assert!(merged > 500 && merged < 1_900, "{merged} of 2000 merged");
        assert!(replaced > 50, "{replaced} replacements");
    }

    #[test]
    fn map_operations_are_rebased_on_the_entries_haproxy_holds() {
        let entry = |op: &str, key: &str, value: Option<&str>| {
            let (map, key) = ("maps/hosts.map".to_string(), key.to_string());
            match (op, value) {
                ("add", Some(v)) => Op::MapAdd {
                    map,
                    key,
                    value: v.into(),
                },
                ("set", Some(v)) => Op::MapSet {
                    map,
                    key,
                    value: v.into(),
                },
                _ => Op::MapDel { map, key },
            }
        };
        // What HAProxy holds for the keys, changed by hand since the files were written.
        let live: BTreeMap<&str, &str> =
            [("added.example.com", "x"), ("same.example.com", "b")].into();
        let ops = vec![
            entry("add", "added.example.com", Some("b")),
            entry("set", "deleted.example.com", Some("b")),
            entry("set", "same.example.com", Some("b")),
            entry("del", "gone.example.com", None),
        ];
        let mut asked = Vec::new();
        let rebased = rebase_map_ops::<()>(
            ops,
            &RuntimeState::default(),
            |_| panic!("a map changed entry by entry is not read whole"),
            |_, key| {
                asked.push(key.to_string());
                Ok(live.get(key).map(|v| v.to_string()))
            },
        )
        .unwrap();
        assert_eq!(
            rebased,
            vec![
                entry("set", "added.example.com", Some("b")),
                entry("add", "deleted.example.com", Some("b")),
            ]
        );
        assert_eq!(asked.len(), 4);
        // A replaced map is still re-based on the whole map.
        let new = RuntimeState {
            maps: [(
                "maps/hosts.map".to_string(),
                [("a".to_string(), "1".to_string())].into(),
            )]
            .into(),
            ..Default::default()
        };
        let replace = Op::MapReplace {
            map: "maps/hosts.map".into(),
            entries: new.maps["maps/hosts.map"].clone(),
        };
        let rebased = rebase_map_ops::<()>(
            vec![replace],
            &new,
            |_| Ok([("a".to_string(), "0".to_string())].into()),
            |_, _| panic!("a replaced map is read whole"),
        )
        .unwrap();
        assert_eq!(rebased, vec![entry("set", "a", Some("1"))]);
    }

    #[test]
    fn replaying_the_operations_reaches_the_new_state() {
        let options = RenderOptions::for_target(None);
        let cases = [
            (
                yaml_with(&[("shop", 9001)], 1, "10.0.0.1"),
                yaml_with(&[("shop", 9001), ("blog", 9002)], 1, "10.0.0.1"),
            ),
            (
                yaml_with(&[("shop", 9001), ("blog", 9002)], 1, "10.0.0.1"),
                yaml_with(&[("blog", 9003)], 5, "10.0.0.9"),
            ),
            (
                yaml_with(&[], 1, "10.0.0.1"),
                yaml_with(&[("x1", 1), ("x2", 2)], 1, "10.0.0.1"),
            ),
        ];
        for (a, b) in &cases {
            // There and back, each rendered onto what the target then holds.
            let old = files(a);
            let new = files_onto(b, Some(&old));
            assert_eq!(replay(&old, &new), RuntimeState::from_files(&new, &options));
            let back = files_onto(a, Some(&new));
            assert_eq!(
                replay(&new, &back),
                RuntimeState::from_files(&back, &options)
            );
        }
    }

    #[test]
    fn many_routes_replace_the_map_in_one_transaction() {
        let mut yaml = yaml_with(&[("shop", 9001)], 1, "10.0.0.1");
        let old = files(&yaml);
        for i in 0..200 {
            yaml.push_str(&format!("  d{i}.example.com: {{ backend: shop }}\n"));
        }
        let new = files_onto(&yaml, Some(&old));
        let ops = plan_ops(&old, &new, &RenderOptions::for_target(None)).unwrap();
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, Op::MapReplace { .. }))
                .count(),
            1,
            "{ops:#?}"
        );
        // Teardown, too.
        assert_eq!(
            replay(&new, &old),
            RuntimeState::from_files(&old, &RenderOptions::for_target(None))
        );
    }

    #[test]
    fn a_map_replacement_is_sent_in_payloads_that_fit_haproxys_buffer() {
        let entries: BTreeMap<String, String> = (0..20_000)
            .map(|i| {
                (
                    format!("app-{i:05}.customers.example.com"),
                    format!("agent:agent-{}/app-{i:05}", i % 7),
                )
            })
            .collect();
        let op = Op::MapReplace {
            map: "maps/hosts.map".into(),
            entries: entries.clone(),
        };
        let commands = op.commands();
        assert!(commands[0].text.starts_with("prepare map "));
        assert!(
            commands
                .last()
                .unwrap()
                .text
                .starts_with("commit map @VERSION ")
        );
        let adds = &commands[1..commands.len() - 1];
        assert!(adds.len() > 100, "{} payloads", adds.len());
        let mut sent = BTreeMap::new();
        for add in adds {
            // Sent as written, plus the newline `RuntimeApi::run` ends a command with; the
            // placeholder becomes a version number of up to 10 digits.
            let bytes = add.text.len() + 1 - "@VERSION".len() + 11;
            assert!(bytes <= PAYLOAD_BUDGET, "{bytes} bytes");
            let body = add.text.split_once(" <<\n").expect("a payload").1;
            assert!(body.ends_with("\n\n"), "a payload ends with an empty line");
            for line in body.lines().filter(|l| !l.is_empty()) {
                let (k, v) = line.split_once(' ').unwrap();
                assert!(sent.insert(k.to_string(), v.to_string()).is_none());
            }
        }
        assert_eq!(sent, entries, "every entry, once");
    }

    #[test]
    fn new_apps_take_free_slots_at_runtime() {
        let old = files(&yaml_with(&[("shop", 9001)], 1, "10.0.0.1"));
        let apps: Vec<(String, u16)> = (0..10).map(|i| (format!("app{i}"), 1000 + i)).collect();
        let mut refs: Vec<(&str, u16)> = apps.iter().map(|(a, p)| (a.as_str(), *p)).collect();
        refs.push(("shop", 9001));
        let new = files_onto(&yaml_with(&refs, 1, "10.0.0.1"), Some(&old));
        let ops = plan_ops(&old, &new, &RenderOptions::for_target(None)).unwrap();
        let added: Vec<&str> = ops
            .iter()
            .filter_map(|o| match o {
                Op::AddServer { backend, .. } => Some(backend.as_str()),
                _ => None,
            })
            .collect();
        // shop holds slot 1; the new apps take 2, 3, … in name order.
        assert_eq!(added.len(), 10, "{ops:#?}");
        assert!(added.iter().all(|b| b.starts_with("slot:http:")));
        assert!(!added.contains(&"slot:http:1"));
    }

    #[test]
    fn servers_are_added_before_routes_and_removed_after() {
        let old = files(&yaml_with(&[("shop", 9001)], 1, "10.0.0.1"));
        let new = files_onto(&yaml_with(&[("blog", 9002)], 1, "10.0.0.1"), Some(&old));
        let ops = plan_ops(&old, &new, &RenderOptions::for_target(None)).unwrap();
        let pos = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
        let add = pos(&|o| matches!(o, Op::AddServer { .. }));
        let route = pos(&|o| matches!(o, Op::MapAdd { key, .. } if key == "blog.example.com"));
        let unroute = pos(&|o| matches!(o, Op::MapDel { .. }));
        let del = pos(&|o| matches!(o, Op::DelServer { .. }));
        assert!(add < route && unroute < del, "{ops:#?}");
        let commands: Vec<String> = ops
            .iter()
            .flat_map(|o| o.commands())
            .map(|c| c.text)
            .collect();
        // shop keeps slot 1 until it is gone; blog takes slot 2, free before this change.
        assert!(
            commands.contains(&"add server slot:http:2/blog 10.0.0.1:9002 weight 1".to_string()),
            "{commands:#?}"
        );
        assert!(commands.contains(&"enable server slot:http:2/blog".to_string()));
        assert!(
            commands.contains(&"add map maps/hosts.map blog.example.com slot:http:2".to_string())
        );
        assert!(commands.contains(&"del server slot:http:1/shop".to_string()));
    }

    #[test]
    fn a_slot_passing_from_one_app_to_another_needs_a_reload() {
        // What a rollback to files rendered from scratch can ask: slot 1 from shop to blog.
        let old = files(&yaml_with(&[("shop", 9001)], 1, "10.0.0.1"));
        let new = files(&yaml_with(&[("blog", 9002)], 1, "10.0.0.1"));
        let reason = plan_ops(&old, &new, &RenderOptions::for_target(None)).unwrap_err();
        assert!(
            reason.contains("slot:http:1 passes from app shop to app blog"),
            "{reason}"
        );
    }

    #[test]
    fn a_full_slot_pool_grows_with_a_reload() {
        let old = files(&yaml_with(&[], 1, "10.0.0.1"));
        let apps: Vec<(String, u16)> = (0..17).map(|i| (format!("app{i}"), 1000 + i)).collect();
        let refs: Vec<(&str, u16)> = apps.iter().map(|(a, p)| (a.as_str(), *p)).collect();
        let new = files_onto(&yaml_with(&refs, 1, "10.0.0.1"), Some(&old));
        let reason = plan_ops(&old, &new, &RenderOptions::for_target(None)).unwrap_err();
        assert!(reason.contains("beyond servers and maps"), "{reason}");
    }

    #[test]
    fn a_new_backend_section_needs_a_reload() {
        let old = files("version: 1\nlisteners:\n  http: { bind: \":80\" }\n");
        let new = files_onto(
            "version: 1\nlisteners:\n  http: { bind: \":80\" }\nbackends:\n  x: { servers: [ { address: 10.0.0.1, port: 80 } ] }\ndomains:\n  x.example.com: { backend: x }\n",
            Some(&old),
        );
        assert!(plan_ops(&old, &new, &RenderOptions::for_target(None)).is_err());
    }
}
