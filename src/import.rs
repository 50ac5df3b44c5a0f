//! `lunafront import`: an existing haproxy.cfg → a state file. The migration path for users of
//! the original CloudLunacy front, whose HAProxy routes each host through its own ACL
//! (`acl host-<agent>-<app> hdr(host) -i <domain>` + `use_backend <agent>-<app>-backend if …`,
//! and `req_ssl_sni` ACLs on the MongoDB frontend), and for configurations that route through
//! host maps (`use_backend %[req.hdr(host),lower,map(hosts.map)]`).
//!
//! Pure: the configuration text comes in, map files are read through the caller's closure,
//! and the state comes out as YAML text with every line that was not translated, and why.
//! What it understands: binds, modes, host ACLs (exact names, `-i`, `||`/`or`, anonymous
//! `{ … }`), host maps, servers with an IP address (check, weight, ssl, disabled), balance,
//! HTTP checks, a few global and defaults settings. Other backend lines are kept as the
//! backend's raw `extra:` lines (reported too); everything else is reported and left out.

use crate::model::names;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A line of the configuration that was not translated (or only kept as a raw line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Untranslated {
    pub line: usize,
    pub text: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Imported {
    /// The state, as YAML (flow style, one entry per line).
    pub yaml: String,
    pub untranslated: Vec<Untranslated>,
    /// How many domains, backends and listeners were found.
    pub domains: usize,
    pub backends: usize,
    pub listeners: usize,
}

#[derive(Debug, Default)]
struct Frontend {
    name: String,
    line: usize,
    mode: Option<String>,
    binds: Vec<(usize, Vec<String>)>,
    /// ACL name → (criterion, values), in order of definition.
    acls: BTreeMap<String, Vec<(String, Vec<String>)>>,
    /// (line, backend, condition words) of `use_backend`.
    rules: Vec<(usize, String, Vec<String>)>,
    dynamic: Vec<(usize, String)>,
    default_backend: Option<(usize, String)>,
}

#[derive(Debug, Default)]
struct Backend {
    name: String,
    mode: Option<String>,
    balance: Option<String>,
    servers: Vec<(usize, Vec<String>)>,
    http_check: Option<String>,
    extra: Vec<(usize, String)>,
}

fn skip(out: &mut Vec<Untranslated>, line: usize, text: &str, reason: &str) {
    out.push(Untranslated {
        line,
        text: text.trim().to_string(),
        reason: reason.to_string(),
    })
}

/// Splits a line into words: `#` starts a comment outside quotes; quotes group words.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quote, mut escaped, mut started) = (None, false, false);
    for c in line.chars() {
        if escaped {
            word.push(c);
            escaped = false;
            continue;
        }
        match (c, quote) {
            ('\\', _) => escaped = true,
            ('"' | '\'', None) => {
                quote = Some(c);
                started = true;
            }
            (q, Some(open)) if q == open => quote = None,
            ('#', None) => break,
            (c, None) if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            (c, _) => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(word);
    }
    out
}

/// A lunafront name for an HAProxy proxy name (which may also hold `:`).
fn identifier(name: &str) -> String {
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        id.insert(0, 'x');
    }
    id.truncate(63);
    id
}

/// `*:80`, `0.0.0.0:80`, `:::443`, `[::]:443`, `ipv4@…` → lunafront's bind syntax.
fn bind_address(addr: &str) -> Option<String> {
    let addr = addr
        .strip_prefix("ipv4@")
        .or_else(|| addr.strip_prefix("ipv6@"))
        .unwrap_or(addr);
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let bind = match host {
        "" | "*" => format!(":{port}"),
        h if h.contains(':') => format!("[{h}]:{port}"),
        h => format!("{h}:{port}"),
    };
    names::parse_bind(&bind).ok().map(|_| bind)
}

/// The criteria that compare the request's host name exactly.
fn host_criterion(criterion: &str) -> Option<bool> {
    match criterion {
        "hdr(host)" | "req.hdr(host)" | "hdr(Host)" | "req.hdr(Host)" | "hdr_str(host)" => {
            Some(true)
        }
        "req_ssl_sni" | "req.ssl_sni" | "ssl_fc_sni" => Some(false),
        _ => None,
    }
}

/// An ACL's criterion and its host names, when it is an exact host match.
fn host_acl(words: &[String]) -> Option<(String, Vec<String>)> {
    let criterion = words.first()?.clone();
    host_criterion(&criterion)?;
    let mut values = Vec::new();
    let mut rest = words[1..].iter();
    while let Some(w) = rest.next() {
        match w.as_str() {
            "-i" => {}
            "-m" => {
                if rest.next().map(String::as_str) != Some("str") {
                    return None;
                }
            }
            w if w.starts_with('-') => return None,
            w => values.push(w.split(':').next().unwrap_or(w).to_ascii_lowercase()),
        }
    }
    (!values.is_empty()).then_some((criterion, values))
}

fn duration(value: &str) -> Option<String> {
    let text = if value.chars().all(|c| c.is_ascii_digit()) {
        format!("{value}ms")
    } else {
        value.to_string()
    };
    names::parse_duration(&text).ok().map(|_| text)
}

/// Parses the configuration and translates it. `read_map` returns a map file's text.
pub fn import(config: &str, read_map: &dyn Fn(&str) -> Option<String>) -> Imported {
    let mut skipped: Vec<Untranslated> = Vec::new();
    let mut frontends: Vec<Frontend> = Vec::new();
    let mut backends: BTreeMap<String, Backend> = BTreeMap::new();
    let mut global = Map::new();
    let mut timeouts = Map::new();
    let mut default_mode = "http".to_string();

    enum Section {
        None,
        Global,
        Defaults,
        Frontend,
        Backend(String),
        Other,
    }
    let mut section = Section::None;
    for (i, raw) in config.lines().enumerate() {
        let n = i + 1;
        let w = words(raw);
        let Some(first) = w.first() else { continue };
        let is_header = !raw.starts_with(char::is_whitespace);
        match (first.as_str(), is_header) {
            ("global", true) => {
                section = Section::Global;
                continue;
            }
            ("defaults", true) => {
                section = Section::Defaults;
                continue;
            }
            ("frontend", true) if w.len() >= 2 => {
                frontends.push(Frontend {
                    name: w[1].clone(),
                    line: n,
                    ..Frontend::default()
                });
                section = Section::Frontend;
                continue;
            }
            ("backend", true) if w.len() >= 2 => {
                backends.insert(
                    w[1].clone(),
                    Backend {
                        name: w[1].clone(),
                        ..Backend::default()
                    },
                );
                section = Section::Backend(w[1].clone());
                continue;
            }
            (
                "listen" | "userlist" | "peers" | "resolvers" | "mailers" | "program"
                | "http-errors" | "ring" | "cache" | "log-forward",
                true,
            ) => {
                skip(
                    &mut skipped,
                    n,
                    raw,
                    "this section has no equivalent in the state",
                );
                section = Section::Other;
                continue;
            }
            _ => {}
        }
        match &section {
            Section::None | Section::Other => {}
            Section::Global => match first.as_str() {
                "maxconn" if w.len() == 2 && w[1].parse::<u32>().is_ok() => {
                    global.insert("maxconn".into(), json!(w[1].parse::<u32>().unwrap_or(0)));
                }
                "hard-stop-after" if w.len() == 2 && duration(&w[1]).is_some() => {
                    global.insert("hard_stop_after".into(), json!(duration(&w[1])));
                }
                _ => skip(
                    &mut skipped,
                    n,
                    raw,
                    "lunafront writes its own global section",
                ),
            },
            Section::Defaults => match (first.as_str(), w.get(1).map(String::as_str)) {
                ("mode", Some(m)) => default_mode = m.to_string(),
                ("timeout", Some(kind)) => {
                    let key = match kind {
                        "connect" | "client" | "server" | "tunnel" | "check" => kind,
                        "http-request" => "http_request",
                        "http-keep-alive" => "http_keep_alive",
                        _ => "",
                    };
                    match w.get(2).and_then(|v| duration(v)) {
                        Some(d) if !key.is_empty() => {
                            timeouts.insert(key.into(), json!(d));
                        }
                        _ => skip(&mut skipped, n, raw, "no such timeout in `global.timeouts`"),
                    }
                }
                _ => skip(
                    &mut skipped,
                    n,
                    raw,
                    "lunafront writes its own defaults section",
                ),
            },
            Section::Frontend => {
                let f = frontends.last_mut().expect("in a frontend");
                match first.as_str() {
                    "bind" => f.binds.push((n, w[1..].to_vec())),
                    "mode" if w.len() == 2 => f.mode = Some(w[1].clone()),
                    "acl" if w.len() >= 3 => match host_acl(&w[2..]) {
                        Some(acl) => f.acls.entry(w[1].clone()).or_default().push(acl),
                        None => skip(&mut skipped, n, raw, "not an exact host-name ACL"),
                    },
                    "use_backend" if w.len() >= 2 && w[1].contains("%[") => {
                        f.dynamic.push((n, w[1..].join(" ")))
                    }
                    "use_backend" if w.len() >= 4 && w[2] == "if" => {
                        f.rules.push((n, w[1].clone(), w[3..].to_vec()))
                    }
                    "use_backend" => skip(
                        &mut skipped,
                        n,
                        raw,
                        "only `use_backend NAME if ACL` is translated",
                    ),
                    "default_backend" if w.len() == 2 => {
                        f.default_backend = Some((n, w[1].clone()))
                    }
                    // What lunafront's frontends already do.
                    "option"
                        if matches!(
                            w.get(1).map(String::as_str),
                            Some(
                                "forwardfor"
                                    | "httplog"
                                    | "tcplog"
                                    | "dontlognull"
                                    | "http-keep-alive"
                            )
                        ) => {}
                    "tcp-request"
                        if w.get(1).map(String::as_str) == Some("inspect-delay")
                            || w.iter().any(|x| x.contains("ssl_hello_type")) => {}
                    "http-request"
                        if w.get(2)
                            .is_some_and(|h| h.eq_ignore_ascii_case("X-Forwarded-Proto")) => {}
                    _ => skip(
                        &mut skipped,
                        n,
                        raw,
                        "frontend setting not translated (add it as the listener's `extra:` if it is still needed)",
                    ),
                }
            }
            Section::Backend(name) => {
                let b = backends.get_mut(name).expect("in a backend");
                match first.as_str() {
                    "mode" if w.len() == 2 => b.mode = Some(w[1].clone()),
                    "balance" if w.len() == 2 => b.balance = Some(w[1].clone()),
                    "server" if w.len() >= 3 => b.servers.push((n, w[1..].to_vec())),
                    "option" if w.get(1).map(String::as_str) == Some("httpchk") => {
                        // `option httpchk GET /path` (old) or `option httpchk` + http-check send.
                        if let Some(path) = w.iter().skip(2).find(|x| x.starts_with('/')) {
                            b.http_check = Some(path.clone());
                        } else if b.http_check.is_none() {
                            b.http_check = Some("/".into());
                        }
                    }
                    "http-check" if w.get(1).map(String::as_str) == Some("send") => {
                        if let Some(i) = w.iter().position(|x| x == "uri") {
                            b.http_check = w.get(i + 1).cloned();
                        }
                    }
                    "option" if w.get(1).map(String::as_str) == Some("forwardfor") => {}
                    _ => b.extra.push((n, raw.trim().to_string())),
                }
            }
        }
    }

    // Backends the routes use, translated.
    let mut state_backends: BTreeMap<String, Value> = BTreeMap::new();
    let mut backend_names: BTreeMap<String, String> = BTreeMap::new();
    let mut translate_backend = |name: &str, skipped: &mut Vec<Untranslated>| -> Option<String> {
        if let Some(id) = backend_names.get(name) {
            return Some(id.clone());
        }
        let b = backends.get(name)?;
        let mut servers = Vec::new();
        let mut check = false;
        let mut tls: Option<Value> = None;
        for (line, w) in &b.servers {
            let addr = w[1].as_str();
            let Some((host, port)) = addr.rsplit_once(':') else {
                skipped.push(Untranslated {
                    line: *line,
                    text: format!("server {}", w.join(" ")),
                    reason: "the server has no port".into(),
                });
                continue;
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let (Ok(ip), Ok(port)) = (host.parse::<IpAddr>(), port.parse::<u16>()) else {
                skipped.push(Untranslated {
                    line: *line,
                    text: format!("server {}", w.join(" ")),
                    reason: "servers need an IP address (host names are not resolved)".into(),
                });
                continue;
            };
            let mut server = Map::new();
            server.insert("address".into(), json!(ip));
            server.insert("port".into(), json!(port));
            let mut params = w[2..].iter();
            while let Some(p) = params.next() {
                match p.as_str() {
                    "check" => check = true,
                    "weight" => {
                        if let Some(v) = params.next().and_then(|v| v.parse::<u16>().ok()) {
                            server.insert("weight".into(), json!(v.min(256)));
                        }
                    }
                    "disabled" => {
                        server.insert("maintenance".into(), json!(true));
                    }
                    "ssl" => {
                        tls.get_or_insert(json!(true));
                    }
                    "verify" => {
                        if params.next().map(String::as_str) == Some("required") {
                            tls = Some(json!({ "verify": true }));
                        }
                    }
                    "inter" | "rise" | "fall" | "maxconn" | "ca-file" | "sni" => {
                        let value = params.next().cloned().unwrap_or_default();
                        skipped.push(Untranslated {
                            line: *line,
                            text: format!("{p} {value}"),
                            reason: format!("server option of {name} not translated"),
                        });
                    }
                    other => skipped.push(Untranslated {
                        line: *line,
                        text: other.to_string(),
                        reason: format!("server option of {name} not translated"),
                    }),
                }
            }
            servers.push(Value::Object(server));
        }
        if servers.is_empty() {
            return None;
        }
        let mut entry = Map::new();
        entry.insert("servers".into(), Value::Array(servers));
        match (&b.http_check, check) {
            (Some(path), _) if names::is_http_path(path) => {
                entry.insert("health_check".into(), json!({ "path": path }));
            }
            (_, true) => {
                entry.insert("health_check".into(), json!(true));
            }
            _ => {}
        }
        if let Some(tls) = tls {
            entry.insert("tls".into(), tls);
        }
        if let Some(balance) = &b.balance {
            if matches!(balance.as_str(), "roundrobin" | "leastconn" | "source") {
                if balance != "roundrobin" {
                    entry.insert("balance".into(), json!(balance));
                }
            } else {
                skipped.push(Untranslated {
                    line: 0,
                    text: format!("balance {balance}"),
                    reason: format!("backend {name}: only roundrobin, leastconn and source"),
                });
            }
        }
        let mut extra = Vec::new();
        for (line, text) in &b.extra {
            if names::check_raw_line(text).is_ok() {
                extra.push(json!(text));
                skipped.push(Untranslated {
                    line: *line,
                    text: text.clone(),
                    reason: format!("kept as a raw `extra:` line of backend {name}"),
                });
            } else {
                skipped.push(Untranslated {
                    line: *line,
                    text: text.clone(),
                    reason: "not translated".into(),
                });
            }
        }
        if !extra.is_empty() {
            entry.insert("extra".into(), Value::Array(extra));
        }
        let mut id = identifier(name);
        while state_backends.contains_key(&id) {
            id.push('_');
        }
        state_backends.insert(id.clone(), Value::Object(entry));
        backend_names.insert(name.to_string(), id.clone());
        Some(id)
    };

    // Listeners and the routes of each.
    let mut listeners: BTreeMap<String, Value> = BTreeMap::new();
    // host → (backend id, listeners routing it, TCP listener)
    let mut routes: BTreeMap<String, Vec<(String, String, bool)>> = BTreeMap::new();
    let mut http_listeners = Vec::new();
    for f in &frontends {
        let id = identifier(&f.name);
        let mode = f.mode.clone().unwrap_or_else(|| default_mode.clone());
        let Some((bind_line, bind)) = f.binds.first() else {
            skip(
                &mut skipped,
                f.line,
                &format!("frontend {}", f.name),
                "a frontend without bind",
            );
            continue;
        };
        for (line, other) in f.binds.iter().skip(1) {
            skip(
                &mut skipped,
                *line,
                &format!("bind {}", other.join(" ")),
                "a listener has one bind; the first is kept",
            );
        }
        let Some(address) = bind.first().and_then(|a| bind_address(a)) else {
            skip(
                &mut skipped,
                *bind_line,
                &format!("bind {}", bind.join(" ")),
                "an address lunafront cannot bind (ip:port)",
            );
            continue;
        };
        let mut listener = Map::new();
        listener.insert("bind".into(), json!(address));
        let ssl = bind.iter().any(|w| w == "ssl");
        let crt = bind
            .iter()
            .position(|w| w == "crt" || w == "crt-list")
            .and_then(|i| bind.get(i + 1));
        if ssl {
            let folder = crt.map(|c| {
                if c.ends_with(".pem") || c.ends_with(".crt") || c.ends_with(".list") {
                    c.rsplit_once('/')
                        .map(|(d, _)| d.to_string())
                        .unwrap_or(".".into())
                } else {
                    c.trim_end_matches('/').to_string()
                }
            });
            match folder {
                Some(folder) if names::is_safe_path(&folder) => {
                    skip(
                        &mut skipped,
                        *bind_line,
                        &format!("bind {}", bind.join(" ")),
                        &format!(
                            "TLS: lunafront reads one PEM file (certificate and key) per name from the folder {folder}; check it holds them"
                        ),
                    );
                    listener.insert("certificates".into(), json!(folder));
                }
                _ => skip(
                    &mut skipped,
                    *bind_line,
                    &format!("bind {}", bind.join(" ")),
                    "TLS certificates not translated",
                ),
            }
        }
        let tcp = mode == "tcp";
        if tcp {
            listener.insert("mode".into(), json!("tcp"));
            listener.insert(
                "tls".into(),
                json!(if ssl { "terminate" } else { "passthrough" }),
            );
        } else {
            http_listeners.push(id.clone());
        }
        // ACL chains.
        for (line, backend, condition) in &f.rules {
            // `host-a` | `host-a || host-b` | `host-a or host-b` | `{ hdr(host) -i a }`.
            let mut hosts = Vec::new();
            let mut ok = true;
            let mut rest = condition.iter().peekable();
            while let Some(word) = rest.next() {
                match word.as_str() {
                    "||" | "or" => {}
                    "{" => {
                        let inner: Vec<String> =
                            rest.by_ref().take_while(|w| *w != "}").cloned().collect();
                        match host_acl(&inner) {
                            Some((_, values)) => hosts.extend(values),
                            None => ok = false,
                        }
                    }
                    acl => match f.acls.get(acl) {
                        Some(defs) => hosts.extend(defs.iter().flat_map(|(_, v)| v.clone())),
                        None => ok = false,
                    },
                }
            }
            let text = format!("use_backend {backend} if {}", condition.join(" "));
            if !ok || hosts.is_empty() {
                skip(
                    &mut skipped,
                    *line,
                    &text,
                    "the condition is not only host-name ACLs (combined with `or`)",
                );
                continue;
            }
            let Some(backend_id) = translate_backend(backend, &mut skipped) else {
                skip(
                    &mut skipped,
                    *line,
                    &text,
                    "its backend has no server lunafront can use",
                );
                continue;
            };
            for host in hosts {
                routes
                    .entry(host)
                    .or_default()
                    .push((backend_id.clone(), id.clone(), tcp));
            }
        }
        // Host maps.
        for (line, expr) in &f.dynamic {
            let file = expr
                .split("map(")
                .nth(1)
                .and_then(|rest| rest.split([',', ')']).next())
                .filter(|_| expr.contains("hdr(host)") || expr.contains("ssl_sni"));
            let Some(text) = file.and_then(read_map) else {
                skip(
                    &mut skipped,
                    *line,
                    &format!("use_backend {expr}"),
                    "not a host map lunafront can read",
                );
                continue;
            };
            for (offset, entry) in text.lines().enumerate() {
                let w = words(entry);
                if w.is_empty() {
                    continue;
                }
                if w.len() != 2 {
                    skip(
                        &mut skipped,
                        *line,
                        &format!("{} line {}: {entry}", file.unwrap_or_default(), offset + 1),
                        "a map line is `host backend`",
                    );
                    continue;
                }
                match translate_backend(&w[1], &mut skipped) {
                    Some(backend_id) => routes
                        .entry(w[0].to_ascii_lowercase())
                        .or_default()
                        .push((backend_id, id.clone(), tcp)),
                    None => skip(
                        &mut skipped,
                        *line,
                        &format!("{} line {}: {entry}", file.unwrap_or_default(), offset + 1),
                        "its backend has no server lunafront can use",
                    ),
                }
            }
        }
        if let Some((line, default)) = &f.default_backend {
            skip(
                &mut skipped,
                *line,
                &format!("default_backend {default}"),
                if tcp {
                    "unknown names get their connection closed"
                } else {
                    "unknown hosts get lunafront's 404 page"
                },
            );
        }
        listeners.insert(id, Value::Object(listener));
    }

    // Domains: served on every HTTP listener when every HTTP listener routes them alike;
    // else pinned to the first listener that routes them.
    let mut domains: BTreeMap<String, Value> = BTreeMap::new();
    for (host, found) in &routes {
        if let Err(e) = names::check_host(host) {
            skip(
                &mut skipped,
                0,
                host,
                &format!("not a host name lunafront accepts: {}", e.message),
            );
            continue;
        }
        let (backend, listener, tcp) = &found[0];
        let same_everywhere = !tcp
            && http_listeners
                .iter()
                .all(|l| found.iter().any(|(b, fl, _)| fl == l && b == backend));
        for (b, l, _) in &found[1..] {
            if b != backend {
                skip(
                    &mut skipped,
                    0,
                    host,
                    &format!(
                        "routed to {backend} on {listener} and to {b} on {l}: the first is kept"
                    ),
                );
            }
        }
        let mut entry = Map::new();
        entry.insert("backend".into(), json!(backend));
        if !same_everywhere {
            entry.insert("listener".into(), json!(listener));
        }
        domains.insert(host.clone(), Value::Object(entry));
    }
    if !timeouts.is_empty() {
        global.insert("timeouts".into(), Value::Object(timeouts));
    }
    for (name, b) in &backends {
        if !backend_names.contains_key(name) {
            skip(
                &mut skipped,
                0,
                &format!("backend {}", b.name),
                "no translated route uses it",
            );
        }
    }
    skipped.sort_by_key(|s| s.line);

    let mut yaml = String::from(
        "# Imported by `lunafront import`: check it with `lunafront validate --check`.\nversion: 1\n",
    );
    let mut section = |title: &str, entries: &BTreeMap<String, Value>| {
        if entries.is_empty() {
            return;
        }
        yaml.push_str(title);
        yaml.push_str(":\n");
        for (key, value) in entries {
            yaml.push_str(&format!("  {}: {}\n", scalar(key), flow(value)));
        }
    };
    if !global.is_empty() {
        section(
            "global",
            &global.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        );
    }
    section("listeners", &listeners);
    section("backends", &state_backends);
    section("domains", &domains);
    Imported {
        yaml,
        untranslated: skipped,
        domains: domains.len(),
        backends: state_backends.len(),
        listeners: listeners.len(),
    }
}

/// A YAML scalar: plain when it cannot be read as anything else, else JSON-quoted (valid YAML).
fn scalar(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("a string serializes")
    }
}

/// A value in YAML's flow style: `{ servers: [ { address: "10.0.0.5", port: 80 } ] }`.
fn flow(value: &Value) -> String {
    match value {
        Value::Object(m) => format!(
            "{{ {} }}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", scalar(k), flow(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Array(items) => format!(
            "[ {} ]",
            items.iter().map(flow).collect::<Vec<_>>().join(", ")
        ),
        Value::String(s) => scalar(s),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_haproxys_quoting_and_comments() {
        assert_eq!(
            words(r#"  http-response set-header X "a b" # note"#),
            ["http-response", "set-header", "X", "a b"]
        );
        assert_eq!(
            words("acl a hdr(host) -i x.com"),
            ["acl", "a", "hdr(host)", "-i", "x.com"]
        );
    }

    #[test]
    fn a_cloudlunacy_acl_chain_becomes_domains_backends_and_listeners() {
        let config = "\
defaults
    mode http
    timeout connect 5000ms
    timeout client 50s
frontend https-in
    bind *:443 ssl crt /etc/ssl/certs/front.pem
    mode http
    option forwardfor
    acl host-a1-shop hdr(host) -i Shop.apps.example.com
    acl host-a1-blog hdr(host) -i blog.apps.example.com
    use_backend a1-shop-backend if host-a1-shop
    use_backend a1-blog-backend if host-a1-blog || { hdr(host) -i www.blog.example.com }
    default_backend node-app-backend
frontend tcp-in
    bind *:27017
    mode tcp
    tcp-request inspect-delay 5s
    tcp-request content accept if { req_ssl_hello_type 1 }
    acl host-a1-mongo req_ssl_sni -i a1.mongodb.example.com
    use_backend a1-mongodb-backend if host-a1-mongo
backend a1-shop-backend
    mode http
    server a1-shop 203.0.113.7:3000 check
backend a1-blog-backend
    mode http
    timeout server 2m
    server a1-blog app-host:3001 check
    server a1-blog2 203.0.113.7:3001 check weight 5
backend a1-mongodb-backend
    mode tcp
    server a1-mongo 203.0.113.7:27017 check
backend node-app-backend
    server node cloudlunacy-front:3005
";
        let i = import(config, &|_| None);
        let y = &i.yaml;
        for line in [
            "  timeouts: { client: \"50s\", connect: \"5000ms\" }",
            "  https-in: { bind: \":443\", certificates: \"/etc/ssl/certs\" }",
            "  tcp-in: { bind: \":27017\", mode: tcp, tls: passthrough }",
            "  a1-blog-backend: { extra: [ \"timeout server 2m\" ], health_check: true, servers: [ { address: \"203.0.113.7\", port: 3001, weight: 5 } ] }",
            "  a1-shop-backend: { health_check: true, servers: [ { address: \"203.0.113.7\", port: 3000 } ] }",
            "  a1.mongodb.example.com: { backend: a1-mongodb-backend, listener: tcp-in }",
            "  shop.apps.example.com: { backend: a1-shop-backend }",
            "  www.blog.example.com: { backend: a1-blog-backend }",
        ] {
            assert!(y.lines().any(|l| l == line), "{line}\n{y}");
        }
        // The imported state is a valid state (its certificate folder aside).
        let source = crate::spec::load::Source::parse(vec![crate::spec::load::SourceFile::new(
            "imported.yaml".into(),
            y.replace(", certificates: \"/etc/ssl/certs\"", ""),
        )]);
        let validation = crate::model::validate(&source);
        assert!(validation.model.is_some(), "{:?}", validation.diagnostics);
        let reasons: Vec<String> = i
            .untranslated
            .iter()
            .map(|u| format!("{}: {} ({})", u.line, u.text, u.reason))
            .collect();
        let all = reasons.join("\n");
        assert!(
            all.contains("server a1-blog app-host:3001 check (servers need an IP address"),
            "{all}"
        );
        assert!(
            all.contains(
                "default_backend node-app-backend (unknown hosts get lunafront's 404 page)"
            ),
            "{all}"
        );
        assert!(
            all.contains("backend node-app-backend (no translated route uses it)"),
            "{all}"
        );
        assert!(
            all.contains("timeout server 2m (kept as a raw `extra:` line"),
            "{all}"
        );
    }
}
