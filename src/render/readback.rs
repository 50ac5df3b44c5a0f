//! Reads back what `render` wrote (a configuration and map files found on a target), so that
//! `plan` and the targets can compare it with a new rendering: which servers each backend has,
//! which map entries, and whether anything besides those differs (then a reload is needed).

use super::layout::{self, ServerLine, SlotPools};
use std::collections::{BTreeMap, BTreeSet};
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

/// The configuration with its `server` lines removed: two configurations whose skeletons are
/// equal differ only in what the runtime API can change.
pub fn skeleton(config: &str) -> String {
    config
        .lines()
        .filter(|l| !l.trim_start().starts_with("server "))
        .collect::<Vec<_>>()
        .join("\n")
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
/// runtime operations share.
pub fn runtime_blocker(old: &str, new: &str) -> Option<String> {
    if skeleton(old) != skeleton(new) {
        return Some("the configuration changes beyond servers and maps".into());
    }
    let (before, after) = (parse_servers(old), parse_servers(new));
    for (key, server) in &before {
        if after.get(key).is_some_and(|s| s.options != server.options) {
            return Some(format!(
                "server {}/{} changes settings fixed at its creation (checks, TLS)",
                key.0, key.1
            ));
        }
    }
    // A slot whose app changes in one step: at runtime the old app's routes could still
    // point at the slot while the new app's server is in it. A reload switches both at once.
    let names = |servers: &Servers, backend: &str| -> BTreeSet<String> {
        servers
            .range((backend.to_string(), String::new())..)
            .take_while(|((b, _), _)| b == backend)
            .map(|((_, n), _)| n.clone())
            .collect()
    };
    let slots: BTreeSet<&str> = before
        .keys()
        .chain(after.keys())
        .map(|(b, _)| b.as_str())
        .filter(|b| layout::parse_slot_name(b).is_some())
        .collect();
    for slot in slots {
        let (was, now) = (names(&before, slot), names(&after, slot));
        if was.difference(&now).next().is_some() && now.difference(&was).next().is_some() {
            return Some(format!(
                "{slot} passes from app {} to app {}",
                was.iter().cloned().collect::<Vec<_>>().join(", "),
                now.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    None
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
        assert_eq!(
            skeleton(cfg)
                .lines()
                .filter(|l| l.contains("server "))
                .count(),
            0
        );
    }

    #[test]
    fn reads_maps() {
        let m = parse_map("# c\na.example.com shop\n\n*.x.com agent:a/b\n");
        assert_eq!(m.len(), 2);
        assert_eq!(m["*.x.com"], "agent:a/b");
    }
}
