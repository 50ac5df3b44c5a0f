//! Reads back what `render` wrote (a configuration and map files found on a target), so that
//! `plan` and the targets can compare it with a new rendering: which servers each backend has,
//! which map entries, and whether anything besides those differs (then a reload is needed).

use super::layout::{self, ServerLine, SlotPools};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

/// `(backend, server)` → server, for every `server` line of a rendered configuration.
pub type Servers = BTreeMap<(String, String), ServerLine>;

pub fn parse_servers(config: &str) -> Servers {
    parse_servers_of(config, |_| true)
}

/// `parse_servers`, for the backends `wanted` says yes to (only their lines are parsed).
pub fn parse_servers_of(config: &str, wanted: impl Fn(&str) -> bool) -> Servers {
    let mut out = BTreeMap::new();
    let mut backend: Option<&str> = None;
    for line in config.lines() {
        if let Some(name) = line.strip_prefix("backend ") {
            backend = Some(name.trim()).filter(|name| wanted(name));
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
    // What is outside these parts is the same sections in both: nothing there can block.
    let (old, new) = changed_sections(old, new);
    runtime_blocker_in(old, new)
}

/// `runtime_blocker`, reading the whole of both texts: given the parts `changed_sections`
/// found, the same answer as `runtime_blocker` of the whole configurations.
pub fn runtime_blocker_in(old: &str, new: &str) -> Option<String> {
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

/// The parts of two configurations that differ, widened to whole sections: `(old_part,
/// new_part)`, each a run of whole lines of its text, such that the texts are the same before
/// and after them. A section (a backend with its server lines) is wholly inside or wholly
/// outside them, so servers, slots and blockers read from the parts differ exactly as they
/// differ in the whole texts (what is outside is the same on both sides; a configuration
/// HAProxy accepts names each backend once), for the cost of a comparison: a new app among
/// 10k apps reads a section or two, not 10k.
pub fn changed_sections<'a>(old: &'a str, new: &'a str) -> (&'a str, &'a str) {
    let (a, b) = (old.as_bytes(), new.as_bytes());
    if a == b {
        return ("", "");
    }
    // A line after which reading does not depend on the lines before it: one that opens a
    // section or, not indented, closes one (as `parse_servers` and `slot_pools` read).
    fn opens_section(line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        !line.is_empty() && line[0] != b' '
    }
    // The start: the last line opening a section among the whole lines both begin with.
    let same = common_prefix(a, b);
    let mut line_end = a[..same]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |i| i + 1);
    let mut start = 0;
    while line_end > 0 {
        let line_start = a[..line_end - 1]
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |i| i + 1);
        if opens_section(&a[line_start..line_end - 1]) {
            start = line_start;
            break;
        }
        line_end = line_start;
    }
    // The end: the first line opening a section in the text both end with (or the end).
    let (a, b) = (&a[start..], &b[start..]);
    let tail = common_suffix(a, b);
    let suffix = &a[a.len() - tail..];
    let mut cut = suffix.len();
    let mut at = 0;
    while let Some(newline) = suffix[at..].iter().position(|&c| c == b'\n') {
        let line_start = at + newline + 1;
        let line_end = suffix[line_start..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(suffix.len(), |i| line_start + i);
        if line_start < suffix.len() && opens_section(&suffix[line_start..line_end]) {
            cut = line_start;
            break;
        }
        at = line_start;
    }
    let keep = tail - cut;
    (
        &old[start..start + a.len() - keep],
        &new[start..start + b.len() - keep],
    )
}

/// How many bytes `a` and `b` begin with alike.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const CHUNK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    // Chunks compare with memcmp; only the chunk that differs is walked byte by byte.
    while i + CHUNK <= n && a[i..i + CHUNK] == b[i..i + CHUNK] {
        i += CHUNK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// How many bytes `a` and `b` end with alike.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const CHUNK: usize = 4096;
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = 0;
    while i + CHUNK <= n && a[n - i - CHUNK..n - i] == b[n - i - CHUNK..n - i] {
        i += CHUNK;
    }
    i + a[..n - i]
        .iter()
        .rev()
        .zip(b[..n - i].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
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
    map_entries(text)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `parse_map`'s entries in the file's order, borrowed from it (a key listed twice is there
/// twice; `parse_map` keeps the last).
pub fn map_entries(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once(char::is_whitespace)?;
            Some((k, v.trim()))
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

    /// xorshift64*: the same sequence on every run; `next_name` numbers sections, so that no
    /// two in one configuration have the same name (HAProxy refuses two proxies of a name).
    struct Rng(u64, usize);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }

        fn next_name(&mut self) -> usize {
            self.1 += 1;
            self.1
        }
    }

    /// A configuration's lines: sections of every kind the reading knows (slots, backends,
    /// other sections, comments, blank lines, tab-indented lines).
    fn random_lines(rng: &mut Rng) -> Vec<String> {
        let mut lines = vec!["global".to_string(), "    maxconn 100".to_string()];
        for _ in 0..rng.below(12) + 1 {
            lines.push(random_header(rng));
            for _ in 0..rng.below(4) {
                lines.push(random_line(rng));
            }
        }
        lines
    }

    fn random_header(rng: &mut Rng) -> String {
        let name = rng.next_name();
        match rng.below(5) {
            0 | 1 => format!("backend slot:http:{name}"),
            2 => format!("backend b{name}"),
            3 => format!("frontend f{name}"),
            _ => "# a comment".to_string(),
        }
    }

    fn random_line(rng: &mut Rng) -> String {
        match rng.below(7) {
            0..=2 => format!(
                "    server {} 10.0.0.{}:{} weight {}{}",
                ["a", "b", "c"][rng.below(3)],
                rng.below(3),
                80 + rng.below(2),
                rng.below(3),
                ["", " check", " disabled"][rng.below(3)]
            ),
            3 => "    mode http".to_string(),
            4 => String::new(),
            5 => "\tbalance roundrobin".to_string(),
            _ => random_header(rng),
        }
    }

    fn servers_differing(old: &str, new: &str) -> Vec<((String, String), Option<ServerLine>)> {
        let (old, new) = (parse_servers(old), parse_servers(new));
        let keys: BTreeSet<_> = old.keys().chain(new.keys()).cloned().collect();
        keys.into_iter()
            .filter(|k| old.get(k) != new.get(k))
            .map(|k| {
                let now = new.get(&k).cloned();
                (k, now)
            })
            .collect()
    }

    /// Reading only the changed sections finds what reading both whole texts finds: the same
    /// servers differ, and a reload is needed for the same changes; outside the parts the texts
    /// are the same.
    #[test]
    fn the_changed_sections_differ_as_the_whole_configurations_do() {
        let mut rng = Rng(0x5eed_1234_abcd_0001, 0);
        // How many rounds needed a reload, changed servers only, and read less than the whole.
        let (mut reload, mut servers, mut narrower) = (0, 0, 0);
        for round in 0..4000 {
            let old = random_lines(&mut rng);
            let mut new = old.clone();
            // Half the rounds change server lines only (what can go live at runtime).
            let servers_only = rng.below(2) == 0;
            for _ in 0..rng.below(3) + 1 {
                let at = rng.below(new.len() + 1);
                if servers_only {
                    let server = |rng: &mut Rng| loop {
                        let line = random_line(rng);
                        if line.starts_with("    server ") {
                            break line;
                        }
                    };
                    match new.get(at) {
                        Some(l) if l.starts_with("    server ") && rng.below(2) == 0 => {
                            new[at] = server(&mut rng)
                        }
                        Some(l) if l.starts_with("    server ") => drop(new.remove(at)),
                        // After the first section's first line: inside a section.
                        _ => new.insert(at.max(1), server(&mut rng)),
                    }
                    continue;
                }
                match rng.below(4) {
                    0 => new.insert(at, random_line(&mut rng)),
                    1 if at < new.len() => drop(new.remove(at)),
                    2 if at < new.len() => new[at] = random_line(&mut rng),
                    _ => new.extend(random_lines(&mut rng).into_iter().skip(2)),
                }
            }
            let end = ["\n", "\r\n", ""][rng.below(3)];
            let (old, new) = (old.join("\n") + end, new.join("\n") + end);
            let (old_part, new_part) = changed_sections(&old, &new);
            let context = format!("round {round}:\n--- old\n{old}\n--- new\n{new}");
            if old == new {
                assert_eq!((old_part, new_part), ("", ""));
            } else {
                let offset =
                    |whole: &str, part: &str| part.as_ptr() as usize - whole.as_ptr() as usize;
                let start = offset(&old, old_part);
                let (old_end, new_end) = (
                    start + old_part.len(),
                    offset(&new, new_part) + new_part.len(),
                );
                assert_eq!(start, offset(&new, new_part), "{context}");
                assert_eq!(old[..start], new[..start], "{context}");
                assert_eq!(old[old_end..], new[new_end..], "{context}");
            }
            assert_eq!(
                servers_differing(old_part, new_part),
                servers_differing(&old, &new),
                "{context}"
            );
            let blocked = runtime_blocker(&old, &new).is_some();
            assert_eq!(
                blocked,
                old != new && runtime_blocker_in(&old, &new).is_some(),
                "{context}"
            );
            reload += usize::from(blocked);
            servers += usize::from(!blocked && !servers_differing(&old, &new).is_empty());
            narrower += usize::from(old_part.len() + new_part.len() < old.len() + new.len());
        }
        assert!(
            reload > 400 && servers > 400 && narrower > 2000,
            "reload {reload}, servers {servers}, narrower {narrower}"
        );
    }
}
