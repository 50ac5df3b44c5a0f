//! Security: no value of the state may inject into haproxy.cfg. Hostile strings (newline, CR,
//! NUL, spaces, `#`, quotes, backslash, `%[`, `${`, over-long labels, unicode look-alikes) are
//! put into every string field and every name of a valid state; each must be rejected with a
//! diagnostic at that place, and `render` must write nothing.

mod support;

use lunafront::model::validate;
use lunafront::spec::load::{Source, SourceFile};
use serde_json::{Value, json};
use std::path::PathBuf;
use support::*;

const HOSTILE: &[(&str, &str)] = &[
    ("newline", "a\nb"),
    ("carriage return", "a\rb"),
    ("NUL", "a\0b"),
    ("space", "a b"),
    ("hash", "a#b"),
    ("double quote", "a\"b"),
    ("single quote", "a'b"),
    ("backslash", "a\\b"),
    ("sample fetch", "%[src]"),
    ("environment", "${HOME}"),
    ("config injection", "x\n    server evil 192.0.2.66:80"),
    ("unicode look-alike", "shop.\u{0430}pps.example.com"),
    ("tab", "a\tb"),
];

/// Over 63 characters in one label: a hostname problem, and too long for any name.
fn long_label() -> String {
    format!("{}.example.com", "a".repeat(64))
}

#[derive(Clone, Copy, PartialEq)]
enum Slot {
    /// The value at this pointer.
    Value,
    /// The last token of the pointer, as a mapping key (a name).
    Key,
}

fn base() -> Value {
    json!({
        "version": 1,
        "listeners": {
            "http": { "bind": "127.0.0.1:8080" },
            "https": { "bind": "127.0.0.1:8443", "certificates": "certs", "mode": "http" },
            "mongodb": { "bind": "127.0.0.1:27017", "tls": "passthrough" }
        },
        "agents": { "agent-7": { "address": "203.0.113.7", "owner": "admin" } },
        "backends": {
            "shop": {
                "servers": [ { "agent": "agent-7", "port": 9001, "name": "shop-1" } ],
                "health_check": { "path": "/healthz", "host": "shop.apps.example.com", "interval": "5s" },
                "tls": { "verify": true, "ca_file": "/etc/ssl/ca.pem", "sni": "shop.apps.example.com" },
                "balance": "roundrobin"
            },
            "legacy": { "servers": [ { "address": "10.0.0.5", "port": 80 } ] },
            "db": { "servers": [ { "agent": "agent-7", "port": 27017 } ] }
        },
        "domains": {
            "shop.apps.example.com": { "backend": "shop" },
            "*.preview.example.com": { "backend": "legacy" },
            "agent-7.mongodb.example.com": { "backend": "db", "listener": "mongodb" }
        },
        "targets": {
            "local": {
                "type": "haproxy", "config": "/etc/haproxy/haproxy.cfg", "master_socket": "/run/haproxy-master.sock",
                "runtime_socket": "/run/haproxy/admin.sock", "reload_timeout": "10s", "state_dir": "/var/lib/lunafront",
                "haproxy_bin": "/usr/sbin/haproxy"
            },
            "edge": {
                "type": "dataplane", "url": "http://10.0.0.9:5555", "username": "admin", "password_env": "DPAPI_PASSWORD",
                "timeout": "10s", "maps_dir": "/etc/haproxy/maps", "certs_dir": "/etc/haproxy/ssl",
                "runtime_socket": "/run/haproxy/admin.sock", "binds": { "http": "10.0.0.9:80" },
                "health_check": { "url": "http://10.0.0.9/healthz", "host": "shop.example.com" }
            },
            "edge2": {
                "type": "dataplane", "url": "http://10.0.0.10:5555", "username": "admin", "password_file": "/etc/lunafront/dpapi"
            }
        },
        "groups": { "fleet": [ "local", "edge" ] },
        "global": {
            "log": "/dev/log", "hard_stop_after": "30m",
            "timeouts": { "connect": "5s", "client": "1m", "server": "1m", "http_request": "10s", "http_keep_alive": "10s", "tunnel": "1h", "tcp_inspect": "5s", "check": "3s" }
        },
        "api": {
            "apps_domain": "apps.example.com", "mongodb_domain": "mongodb.example.com", "mongodb_listener": "mongodb",
            "token_ttl": "1h", "allowed_networks": [ "10.0.0.0/8" ]
        }
    })
}

/// Every string of the base state, and every name.
fn slots() -> Vec<(String, Slot)> {
    fn walk(v: &Value, pointer: String, out: &mut Vec<(String, Slot)>) {
        match v {
            Value::String(_) => out.push((pointer, Slot::Value)),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, format!("{pointer}/{i}"), out);
                }
            }
            Value::Object(map) => {
                let depth = pointer.matches('/').count();
                for (k, item) in map {
                    let child = format!("{pointer}/{}", k.replace('~', "~0").replace('/', "~1"));
                    // Names: entries of the sections (depth 1).
                    if depth == 1 && !matches!(pointer.as_str(), "/global" | "/api") {
                        out.push((child.clone(), Slot::Key));
                    }
                    walk(item, child, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&base(), String::new(), &mut out);
    out
}

fn with_value(doc: &Value, pointer: &str, slot: Slot, hostile: &str) -> (Value, String) {
    let mut doc = doc.clone();
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    let last = last.replace("~1", "/").replace("~0", "~");
    match slot {
        Slot::Value => {
            *doc.pointer_mut(pointer).unwrap() = Value::String(hostile.to_string());
            (doc, pointer.to_string())
        }
        Slot::Key => {
            let map = doc.pointer_mut(parent).unwrap().as_object_mut().unwrap();
            let entry = map.remove(&last).unwrap();
            map.insert(hostile.to_string(), entry);
            (
                doc,
                format!("{parent}/{}", hostile.replace('~', "~0").replace('/', "~1")),
            )
        }
    }
}

fn certs_dir() -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let ca = TestCa::new();
    write(
        dir.path(),
        "certs/shop.pem",
        &ca.leaf(&["shop.apps.example.com"]).combined(),
    );
    let state = dir.path().join("state.yaml");
    (dir, state)
}

/// The state as a file (JSON is YAML), loaded the way the CLI loads it.
fn validate_doc(doc: &Value, path: &std::path::Path) -> lunafront::model::Validation {
    std::fs::write(path, serde_json::to_string_pretty(doc).unwrap()).unwrap();
    let source = lunafront::spec::load::load_path(path).unwrap();
    validate(&source)
}

#[test]
fn the_base_state_is_valid() {
    let (_dir, path) = certs_dir();
    let v = validate_doc(&base(), &path);
    assert!(v.model.is_some(), "{:#?}", v.diagnostics);
}

#[test]
fn every_hostile_value_in_every_field_is_rejected_at_its_place() {
    let (_dir, path) = certs_dir();
    let doc = base();
    let slots = slots();
    assert!(slots.len() > 60, "only {} string fields found", slots.len());
    let mut missed = Vec::new();
    let mut checked = 0;
    for (pointer, slot) in &slots {
        let long = long_label();
        let values = HOSTILE
            .iter()
            .map(|(n, v)| (*n, *v))
            .chain(std::iter::once(("over-long label", long.as_str())));
        for (what, hostile) in values {
            // An over-long label is a problem for names and hostnames, not for a path.
            if what == "over-long label" && is_path(pointer) {
                continue;
            }
            let (bad, bad_pointer) = with_value(&doc, pointer, *slot, hostile);
            let v = validate_doc(&bad, &path);
            checked += 1;
            let hit = v.diagnostics.iter().filter(|d| d.is_error()).find(|d| {
                d.pointer == bad_pointer
                    || d.pointer.starts_with(&format!("{bad_pointer}/"))
                    || bad_pointer.starts_with(&format!("{}/", d.pointer))
            });
            match (v.model.is_some(), hit) {
                (false, Some(d)) if d.location.is_some() => {
                    // The message must not carry the raw control characters.
                    assert!(!d.to_string().contains(['\0', '\r']), "{d}");
                }
                (false, Some(d)) => missed.push(format!(
                    "{pointer} ({what}): diagnostic without a position: {d}"
                )),
                (false, None) => missed.push(format!(
                    "{pointer} ({what}): rejected, but no diagnostic points at it: {:?}",
                    v.diagnostics
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                )),
                (true, _) => missed.push(format!("{pointer} ({what}): ACCEPTED {hostile:?}")),
            }
        }
    }
    assert!(
        missed.is_empty(),
        "{} of {checked} hostile values slipped:\n{}",
        missed.len(),
        missed.join("\n")
    );
}

fn is_path(pointer: &str) -> bool {
    [
        "certificates",
        "config",
        "master_socket",
        "runtime_socket",
        "state_dir",
        "haproxy_bin",
        "maps_dir",
        "certs_dir",
        "password_file",
        "ca_file",
        "/log",
    ]
    .iter()
    .any(|p| pointer.ends_with(p))
}

#[test]
fn render_writes_nothing_for_a_hostile_state() {
    let (dir, path) = certs_dir();
    for (pointer, slot) in slots().into_iter().step_by(3) {
        for (_, hostile) in [HOSTILE[0], HOSTILE[10], HOSTILE[8]] {
            let (bad, _) = with_value(&base(), &pointer, slot, hostile);
            std::fs::write(&path, serde_json::to_string_pretty(&bad).unwrap()).unwrap();
            let out = dir.path().join("out");
            let (code, _, stderr) = run(
                &["render", "state.yaml", "--out", out.to_str().unwrap()],
                dir.path(),
            );
            assert_eq!(code, 1, "{pointer}: {stderr}");
            assert!(
                !out.exists(),
                "{pointer}: render wrote into {}",
                out.display()
            );
            assert!(stderr.contains("error["), "{stderr}");
            assert!(!stderr.contains('\0'));
        }
    }
}

#[test]
fn a_json_document_in_memory_is_checked_the_same_way() {
    // Names coming from the API are validated by the same code: a Source built in memory.
    let doc = with_value(
        &base(),
        "/domains/shop.apps.example.com",
        Slot::Key,
        "shop.apps.example.com\nx",
    )
    .0;
    let text = serde_json::to_string(&doc).unwrap();
    let source = Source::parse(vec![SourceFile::new("api.yaml".into(), text)]);
    let v = validate(&source);
    assert!(v.model.is_none());
    assert!(v.diagnostics.iter().any(|d| d.code == "invalid-host"));
}
