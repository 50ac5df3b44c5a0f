//! Reads back what `render` wrote (a configuration and map files found on a target), so that
//! `plan` and the targets can compare it with a new rendering: which servers each backend has,
//! which map entries, and whether anything besides those differs (then a reload is needed).

use super::layout::{self, ServerLine, SlotPools};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

/// `(backend, server)` → server, for every `server` line of a rendered configuration.
pub type Servers = BTreeMap<(String, String), ServerLine>;

pub fn parse_servers(config: &str) -> Servers {
    let mut out = BTreeMap::new();
    let mut backend: Option<&str> = None;
    for line in config.lines() {
        if let Some(name) = line.strip_prefix("backend ") {
            backend = Some(name.trim());
            continue;
        }
        if !line.starts_with(' ') && !line.is_empty() {
            backend = None;
        }
        let (Some(backend), Some(rest)) = (backend, line.trim_start().strip_prefix("server "))
        else {
            continue;
        };
        if let Some(server) = parse_server_line(rest) {
            out.insert((backend.to_string(), server.name.clone()), server);
        }
    }
    out
}

/// `NAME ADDR weight W [options…] [disabled]`, as `ServerLine::params` writes it.
fn parse_server_line(rest: &str) -> Option<ServerLine> {
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_string();
    let address = words.next()?;
    let (addr, port) = parse_address(address)?;
    let mut weight = 1;
    let mut disabled = false;
    let mut options = Vec::new();
    let mut words = words.peekable();
    while let Some(word) = words.next() {
        match word {
            "weight" => weight = words.next()?.parse().ok()?,
            "disabled" => disabled = true,
            other => options.push(other.to_string()),
        }
    }
    Some(ServerLine {
        name,
        addr,
        port,
        weight,
        disabled,
        options,
        agent: None,
    })
}

fn parse_address(address: &str) -> Option<(IpAddr, u16)> {
    let address = address.strip_prefix("ipv6@").unwrap_or(address);
    let (ip, port) = address.rsplit_once(':')?;
    Some((ip.parse().ok()?, port.parse().ok()?))
}

/// The app slots of a configuration: each pool's size (its highest slot backend) and which app
/// each slot holds (the name of its server). What the next rendering starts from, so that apps
/// keep their slots (`layout::assign_slots`).
pub fn slot_pools(config: &str) -> SlotPools {
    let mut pools = SlotPools::default();
    let mut slot = None;
    for line in config.lines() {
        if let Some(name) = line.strip_prefix("backend ") {
            slot = layout::parse_slot_name(name.trim());
            if let Some((mode, index)) = slot {
                let pool = pools.pool_mut(mode);
                pool.capacity = pool.capacity.max(index);
            }
            continue;
        }
        if !line.starts_with(' ') && !line.is_empty() {
            slot = None;
        }
        let (Some((mode, index)), Some(rest)) = (slot, line.trim_start().strip_prefix("server "))
        else {
            continue;
        };
        if let Some(name) = rest.split_whitespace().next() {
            // A slot holds one app; should one be listed twice, it keeps its lowest slot.
            let apps = &mut pools.pool_mut(mode).apps;
            let held = apps.entry(name.to_string()).or_insert(index);
            *held = (*held).min(index);
        }
    }
    pools
}

/// Why HAProxy cannot be taken from configuration `old` to `new` through its runtime API, or
/// `None` when it can: the one rule that `plan` (reload or not) and the haproxy target's
/// runtime operations share. Borrows the texts (it runs on every plan of a large state).
pub fn runtime_blocker(old: &str, new: &str) -> Option<String> {
    if old == new {
        return None;
    }
    let is_server = |l: &&str| l.trim_start().starts_with("server ");
    if !old
        .lines()
        .filter(|l| !is_server(l))
        .eq(new.lines().filter(|l| !is_server(l)))
    {
        return Some("the configuration changes beyond servers and maps".into());
    }
    let (before, after) = (server_texts(old), server_texts(new));
    for (key, text) in &before.lines {
        if let Some(new_text) = after.lines.get(key)
            && new_text != text
        {
            let options = |t: &str| parse_server_line(t).map(|s| s.options);
            if options(text) != options(new_text) {
                return Some(format!(
                    "server {}/{} changes settings fixed at its creation (checks, TLS)",
                    key.0, key.1
                ));
            }
        }
    }
    // A slot whose app changes in one step: at runtime the old app's routes could still
    // point at the slot while the new app's server is in it. A reload switches both at once.
    let slots: BTreeSet<&str> = before
        .slots
        .keys()
        .chain(after.slots.keys())
        .copied()
        .collect();
    fn names<'a>(t: &ServerTexts<'a>, slot: &str) -> BTreeSet<&'a str> {
        t.slots.get(slot).into_iter().flatten().copied().collect()
    }
    for slot in slots {
        let (was, now) = (names(&before, slot), names(&after, slot));
        if was.difference(&now).next().is_some() && now.difference(&was).next().is_some() {
            return Some(format!(
                "{slot} passes from app {} to app {}",
                was.into_iter().collect::<Vec<_>>().join(", "),
                now.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    None
}

/// The server lines of a configuration, borrowed from it.
struct ServerTexts<'a> {
    /// `(backend, server)` → the line after `server `.
    lines: HashMap<(&'a str, &'a str), &'a str>,
    /// Slot backend → the names of its servers.
    slots: HashMap<&'a str, Vec<&'a str>>,
}

fn server_texts(config: &str) -> ServerTexts<'_> {
    let mut out = ServerTexts {
        lines: HashMap::new(),
        slots: HashMap::new(),
    };
    let mut backend: Option<(&str, bool)> = None;
    for line in config.lines() {
        if let Some(name) = line.strip_prefix("backend ") {
            let name = name.trim();
            backend = Some((name, layout::parse_slot_name(name).is_some()));
            continue;
        }
        if !line.starts_with(' ') && !line.is_empty() {
            backend = None;
        }
        if let (Some((backend, slot)), Some(rest)) =
            (backend, line.trim_start().strip_prefix("server "))
            && let Some(name) = rest.split_whitespace().next()
        {
            out.lines.insert((backend, name), rest);
            if slot {
                out.slots.entry(backend).or_default().push(name);
            }
        }
    }
    out
}

/// Entries of a map file (`key value` per line; blank lines and `#` comments skipped).
pub fn parse_map(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once(char::is_whitespace)?;
            Some((k.to_string(), v.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_lines_by_backend() {
        let cfg = "backend shop\n    mode http\n    server a:1 10.0.0.1:80 weight 5 check inter 2s disabled\n\nbackend agent:x\n    server app ipv6@::1:9000 weight 0\nfrontend f\n    bind :80\n";
        let servers = parse_servers(cfg);
        let a = &servers[&("shop".to_string(), "a:1".to_string())];
        assert_eq!((a.port, a.weight, a.disabled), (80, 5, true));
        assert_eq!(a.options, vec!["check", "inter", "2s"]);
        let b = &servers[&("agent:x".to_string(), "app".to_string())];
        assert_eq!(b.addr.to_string(), "::1");
    }

    #[test]
    fn only_server_lines_weights_and_states_change_at_runtime() {
        let cfg = "backend shop\n    mode http\n    server a 10.0.0.1:80 weight 5 check inter 2s\n\nbackend slot:http:1\n    server blog 10.0.0.2:80 weight 1\n\nbackend slot:http:2\n";
        assert_eq!(runtime_blocker(cfg, cfg), None);
        let runtime = [
            cfg.replace("weight 5 check", "weight 7 check"),
            cfg.replace("inter 2s", "inter 2s disabled"),
            cfg.replace("10.0.0.1:80", "10.0.0.9:81"),
            cfg.replace(
                "slot:http:2\n",
                "slot:http:2\n    server cart 10.0.0.3:80 weight 1\n",
            ),
            cfg.replace("    server blog 10.0.0.2:80 weight 1\n", ""),
        ];
        for new in &runtime {
            assert_eq!(runtime_blocker(cfg, new), None, "{new}");
        }
        let reload = [
            (
                cfg.replace("mode http", "mode tcp"),
                "beyond servers and maps",
            ),
            (
                cfg.replace("inter 2s", "inter 5s"),
                "server shop/a changes settings",
            ),
            (
                cfg.replace("server blog", "server cart"),
                "slot:http:1 passes from app blog to app cart",
            ),
        ];
        for (new, why) in &reload {
            let reason = runtime_blocker(cfg, new).unwrap_or_default();
            assert!(reason.contains(why), "{new}: {reason}");
        }
    }

    #[test]
    fn slot_pools_read_back_sizes_and_apps() {
        let cfg = "backend slot:http:1\n    server blog 10.0.0.2:80 weight 1\n\nbackend slot:http:2\n\nbackend slot:tcp:1\n    server db 10.0.0.2:27017 weight 1\nbackend shop\n    server x 10.0.0.1:80 weight 1\nbackend slot:http:3\n    server blog 10.0.0.2:80 weight 1\n";
        let pools = slot_pools(cfg);
        assert_eq!(pools.http.capacity, 3);
        // Listed twice (a hand edit): it keeps its lowest slot.
        assert_eq!(pools.http.apps.get("blog"), Some(&1));
        assert_eq!(pools.http.apps.len(), 1);
        assert_eq!(
            (pools.tcp.capacity, pools.tcp.apps.get("db")),
            (1, Some(&1))
        );
    }

    #[test]
    fn reads_maps() {
        let m = parse_map("# c\na.example.com shop\n\n*.x.com agent:a/b\n");
        assert_eq!(m.len(), 2);
        assert_eq!(m["*.x.com"], "agent:a/b");
    }
}
