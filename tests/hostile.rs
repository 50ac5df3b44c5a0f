//! Security: no value of the state may inject into haproxy.cfg. Hostile strings (newline, CR,
//! NUL, spaces, `#`, quotes, backslash, `%[`, `${`, over-long labels, unicode look-alikes) are
//! put into every string field and every name of a valid state; each must be rejected with a
//! diagnostic at that very value (its own JSON pointer and its own line and column, never a
//! parent's or the document's), and `lunafront render` must write nothing.
//!
//! The places are enumerated from the JSON Schema (`schemas/lunafront.schema.json`): a string
//! field or a name the schema gains without a place in `base()` fails
//! `every_string_field_and_name_of_the_schema_is_tested`.

mod support;

use lunafront::model::validate;
use lunafront::spec::load::{Source, SourceFile};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;
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

/// What is hostile in a raw HAProxy line (`extra:`): spaces, quotes, `#` and `%[…]` are its
/// syntax, but nothing may end the line, open another section or expand the environment.
const HOSTILE_RAW_LINE: &[(&str, &str)] = &[
    ("newline", "timeout queue 5s\nb"),
    ("carriage return", "timeout queue 5s\rb"),
    ("NUL", "timeout queue 5s\0b"),
    ("tab", "timeout\tqueue 5s"),
    (
        "config injection",
        "timeout queue 5s\n    server evil 192.0.2.66:80",
    ),
    ("a new section", "backend evil"),
    ("a new global section", "Global"),
    (
        "environment",
        "http-request set-header X-Token \"${LUNAFRONT_ADMIN_TOKEN}\"",
    ),
    ("unicode look-alike", "timeout queue 5\u{0455}"),
];

/// Every hostile value for the place at `pattern` (an over-long label is a valid file path).
fn hostile_values(pattern: &str) -> Vec<(&'static str, String)> {
    if pattern.ends_with("/extra/#") {
        return HOSTILE_RAW_LINE
            .iter()
            .map(|(what, v)| (*what, v.to_string()))
            .collect();
    }
    let mut values: Vec<(&str, String)> = HOSTILE
        .iter()
        .map(|(what, v)| (*what, v.to_string()))
        .collect();
    if !is_path(pattern) {
        values.push(("over-long label", long_label()));
    }
    values
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Slot {
    /// The value at this pointer.
    Value,
    /// The last token of the pointer, as a mapping key (a name).
    Key,
}

/// A place of `base()` a hostile string can go.
#[derive(Clone, Debug)]
struct Place {
    pointer: String,
    /// The schema place it instantiates: `/targets/*[type=haproxy]/config`, `/groups/*/#`.
    pattern: String,
    slot: Slot,
}

/// A valid state with every string field and every kind of name of the schema.
fn base() -> Value {
    json!({
        "version": 1,
        "listeners": {
            "http": { "bind": "127.0.0.1:8080", "redirect_to": "https", "extra": [ "option http-buffer-request" ] },
            "https": { "bind": "127.0.0.1:8443", "certificates": "certs", "mode": "http", "acme": true, "hsts": { "max_age": "365d" } },
            "mongodb": { "bind": "127.0.0.1:27017", "tls": "passthrough" }
        },
        "agents": {
            "agent-7": {
                "address": "203.0.113.7", "owner": "admin",
                "key_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            }
        },
        "backends": {
            "shop": {
                "servers": [ { "agent": "agent-7", "port": 9001, "name": "shop-1" } ],
                "health_check": { "path": "/healthz", "host": "shop.apps.example.com", "interval": "5s" },
                "tls": { "verify": true, "ca_file": "/etc/ssl/ca.pem", "sni": "shop.apps.example.com" },
                "balance": "roundrobin",
                "owner": "agent-7"
            },
            "legacy": { "servers": [ { "address": "10.0.0.5", "port": 80 } ], "extra": [ "timeout queue 5s" ] },
            "db": { "servers": [ { "agent": "agent-7", "port": 27017 } ] }
        },
        "domains": {
            "shop.apps.example.com": { "backend": "shop", "owner": "agent-7", "service": "shop" },
            "*.preview.example.com": { "backend": "legacy" },
            "agent-7.mongodb.example.com": { "backend": "db", "listener": "mongodb" }
        },
        "targets": {
            "local": {
                "type": "haproxy", "config": "/etc/haproxy/haproxy.cfg", "master_socket": "/run/haproxy-master.sock",
                "runtime_socket": "/run/haproxy/admin.sock", "reload_timeout": "10s", "state_dir": "/var/lib/lunafront",
                "haproxy_bin": "/usr/sbin/haproxy", "binds": { "http": "127.0.0.2:8080" },
                "health_check": { "url": "http://127.0.0.2/healthz", "host": "shop.apps.example.com", "timeout": "5s" }
            },
            "edge": {
                "type": "dataplane", "url": "http://10.0.0.9:5555", "username": "admin", "password_env": "DPAPI_PASSWORD",
                "timeout": "10s", "maps_dir": "/etc/haproxy/maps", "certs_dir": "/etc/haproxy/ssl",
                "runtime_socket": "/run/haproxy/admin.sock", "state_dir": "/var/lib/lunafront/edge",
                "binds": { "http": "10.0.0.9:80" },
                "health_check": { "url": "http://10.0.0.9/healthz", "host": "shop.example.com", "timeout": "10s" }
            },
            "edge2": {
                "type": "dataplane", "url": "http://10.0.0.10:5555", "username": "admin", "password_file": "/etc/lunafront/dpapi"
            }
        },
        "groups": { "fleet": [ "local", "edge" ] },
        "global": {
            "log": "/dev/log", "hard_stop_after": "30m", "stats": { "bind": "127.0.0.1:8404" },
            "delete_guard": { "count": 10, "percent": 10, "settle": "10s" },
            "timeouts": { "connect": "5s", "client": "1m", "server": "1m", "http_request": "10s", "http_keep_alive": "10s", "tunnel": "1h", "tcp_inspect": "5s", "check": "3s" }
        },
        "acme": {
            "directory": "https://acme-staging-v02.api.letsencrypt.org/directory",
            "contact": [ "mailto:ops@example.com" ], "ca_file": "/etc/ssl/acme-ca.pem",
            "renew_before": "30d", "key_type": "ecdsa-p256", "dns_hook": "/usr/local/bin/acme-dns"
        },
        "api": {
            "apps_domain": "apps.example.com", "mongodb_domain": "mongodb.example.com", "mongodb_listener": "mongodb",
            "token_ttl": "1h", "allowed_networks": [ "10.0.0.0/8" ], "trusted_proxies": [ "127.0.0.1/32" ],
            "limits": { "reload_interval": "2s" }
        }
    })
}

// ---- The schema: which places hold strings and names. ----

fn schema() -> Value {
    serde_json::from_str(lunafront::spec::schema::SCHEMA_TEXT).unwrap()
}

fn resolve<'a>(root: &'a Value, mut s: &'a Value) -> &'a Value {
    loop {
        if let Some(reference) = s.get("$ref").and_then(Value::as_str) {
            s = root
                .pointer(reference.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("unresolved {reference}"));
        } else if let Some(object) = object_branch(s) {
            // `true`/`false` or settings (`delete_guard`): the settings hold the strings.
            s = object;
        } else {
            return s;
        }
    }
}

/// The object branch of a `oneOf` between a flag and an object of settings.
fn object_branch(s: &Value) -> Option<&Value> {
    let branches = s.get("oneOf")?.as_array()?;
    branches
        .iter()
        .find(|b| b.get("type") == Some(&json!("object")))
}

fn is_string(s: &Value) -> bool {
    s.get("type") == Some(&json!("string"))
        || s.get("enum")
            .and_then(Value::as_array)
            .is_some_and(|e| e.iter().all(Value::is_string))
        || s.get("const").is_some_and(Value::is_string)
}

/// A schema whose shape depends on a discriminating `type` (targets): `if`/`then` branches.
fn branches(s: &Value) -> Option<Vec<(String, &Value)>> {
    let all = s.get("allOf")?.as_array()?;
    Some(
        all.iter()
            .map(|b| {
                let kind = b
                    .pointer("/if/properties/type/const")
                    .and_then(Value::as_str)
                    .expect("an if on `type`");
                (kind.to_string(), &b["then"])
            })
            .collect(),
    )
}

/// Every place of the schema that holds a string (`Slot::Value`) or a name (`Slot::Key`).
fn schema_places(root: &Value, s: &Value, pattern: String, out: &mut BTreeSet<(String, Slot)>) {
    let s = resolve(root, s);
    if let Some(branches) = branches(s) {
        // Each `then` lists every property of its kind, `type` included.
        for (kind, then) in branches {
            schema_places(root, then, format!("{pattern}[type={kind}]"), out);
        }
        return;
    }
    if is_string(s) {
        out.insert((pattern.clone(), Slot::Value));
    }
    if let Some(properties) = s.get("properties").and_then(Value::as_object) {
        for (name, sub) in properties {
            schema_places(root, sub, format!("{pattern}/{name}"), out);
        }
    }
    if let Some(values) = s.get("additionalProperties").filter(|v| v.is_object()) {
        if s.get("propertyNames").is_some() {
            out.insert((format!("{pattern}/*"), Slot::Key));
        }
        schema_places(root, values, format!("{pattern}/*"), out);
    }
    if let Some(items) = s.get("items") {
        schema_places(root, items, format!("{pattern}/#"), out);
    }
}

/// The places of a document, walked beside the schema.
fn document_places(root: &Value, s: &Value, v: &Value, pointer: &str, pattern: &str) -> Vec<Place> {
    let s = resolve(root, s);
    if let Some(branches) = branches(s) {
        let kind = v["type"].as_str().expect("a target has a type");
        let (_, then) = branches
            .into_iter()
            .find(|(k, _)| k == kind)
            .unwrap_or_else(|| panic!("no schema branch for type {kind}"));
        return document_places(root, then, v, pointer, &format!("{pattern}[type={kind}]"));
    }
    let mut out = Vec::new();
    match v {
        Value::String(_) => {
            assert!(is_string(s), "{pointer}: a string where the schema has {s}");
            out.push(Place {
                pointer: pointer.to_string(),
                pattern: pattern.to_string(),
                slot: Slot::Value,
            });
        }
        Value::Object(map) => {
            for (name, child) in map {
                let child_pointer = format!("{pointer}/{}", escape(name));
                match s.get("properties").and_then(|p| p.get(name)) {
                    Some(sub) => out.extend(document_places(
                        root,
                        sub,
                        child,
                        &child_pointer,
                        &format!("{pattern}/{name}"),
                    )),
                    None => {
                        let values = s
                            .get("additionalProperties")
                            .filter(|v| v.is_object())
                            .unwrap_or_else(|| panic!("{child_pointer} is not in the schema"));
                        let child_pattern = format!("{pattern}/*");
                        if s.get("propertyNames").is_some() {
                            out.push(Place {
                                pointer: child_pointer.clone(),
                                pattern: child_pattern.clone(),
                                slot: Slot::Key,
                            });
                        }
                        out.extend(document_places(
                            root,
                            values,
                            child,
                            &child_pointer,
                            &child_pattern,
                        ));
                    }
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                out.extend(document_places(
                    root,
                    &s["items"],
                    item,
                    &format!("{pointer}/{i}"),
                    &format!("{pattern}/#"),
                ));
            }
        }
        _ => {}
    }
    out
}

fn places() -> Vec<Place> {
    let root = schema();
    document_places(&root, &root, &base(), "", "")
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn is_path(pattern: &str) -> bool {
    [
        "/certificates",
        "/config",
        "/master_socket",
        "/runtime_socket",
        "/state_dir",
        "/haproxy_bin",
        "/maps_dir",
        "/certs_dir",
        "/password_file",
        "/ca_file",
        "/global/log",
        "/dns_hook",
    ]
    .iter()
    .any(|p| pattern.ends_with(p))
}

/// `doc` with `hostile` at the place; returns the document and the hostile value's pointer.
fn with_value(doc: &Value, place: &Place, hostile: &str) -> (Value, String) {
    let mut doc = doc.clone();
    let (parent, last) = place.pointer.rsplit_once('/').unwrap();
    let last = last.replace("~1", "/").replace("~0", "~");
    match place.slot {
        Slot::Value => {
            *doc.pointer_mut(&place.pointer).unwrap() = Value::String(hostile.to_string());
            (doc, place.pointer.clone())
        }
        Slot::Key => {
            let map = doc.pointer_mut(parent).unwrap().as_object_mut().unwrap();
            let entry = map.remove(&last).unwrap();
            map.insert(hostile.to_string(), entry);
            (doc, format!("{parent}/{}", escape(hostile)))
        }
    }
}

/// The state file's text, and where the hostile value is in it (line, key column, value
/// column; 1-based), found in the text itself rather than through lunafront's positions.
fn text_and_position(doc: &Value, place: &Place, hostile: &str) -> (String, usize, usize, usize) {
    let text = serde_json::to_string_pretty(doc).unwrap();
    // JSON escapes control characters: the hostile string stays on one line, and base() holds
    // no other occurrence of it.
    let literal = serde_json::to_string(hostile).unwrap();
    let needle = match place.slot {
        Slot::Key => format!("{literal}: "),
        Slot::Value => literal,
    };
    let offsets: Vec<usize> = text.match_indices(&needle).map(|(i, _)| i).collect();
    assert_eq!(offsets.len(), 1, "{needle} in\n{text}");
    let before = &text[..offsets[0]];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let value_column = text[line_start..offsets[0]].chars().count() + 1;
    let key_column = text[line_start..].chars().position(|c| c != ' ').unwrap() + 1;
    (text, line, key_column, value_column)
}

/// A folder with the listener's certificates; the state is `state.yaml` in it.
fn site() -> TempDir {
    let dir = TempDir::new().unwrap();
    let ca = TestCa::new();
    write(
        dir.path(),
        "certs/shop.pem",
        &ca.leaf(&["shop.apps.example.com"]).combined(),
    );
    dir
}

/// The state as a file (JSON is YAML), loaded the way the CLI loads it.
fn validate_text(text: &str, dir: &Path) -> lunafront::model::Validation {
    let path = dir.join("state.yaml");
    std::fs::write(&path, text).unwrap();
    let source = lunafront::spec::load::load_path(&path).unwrap();
    validate(&source)
}

#[test]
fn the_base_state_is_valid() {
    let dir = site();
    let text = serde_json::to_string_pretty(&base()).unwrap();
    let v = validate_text(&text, dir.path());
    assert!(v.model.is_some(), "{:#?}", v.diagnostics);
    assert!(
        v.diagnostics.iter().all(|d| !d.is_error()),
        "{:#?}",
        v.diagnostics
    );
}

#[test]
fn every_string_field_and_name_of_the_schema_is_tested() {
    let root = schema();
    let mut wanted = BTreeSet::new();
    schema_places(&root, &root, String::new(), &mut wanted);
    let covered: BTreeSet<(String, Slot)> =
        places().into_iter().map(|p| (p.pattern, p.slot)).collect();
    let missing: Vec<String> = wanted
        .difference(&covered)
        .map(|(pattern, slot)| format!("{pattern} ({slot:?})"))
        .collect();
    assert!(
        missing.is_empty(),
        "string fields or names of the schema with no place in base(): add them:\n{}",
        missing.join("\n")
    );
    // The walk found what it should: every section's names, the targets of both kinds.
    for expected in [
        ("/domains/*", Slot::Key),
        ("/targets/*[type=dataplane]/binds/*", Slot::Key),
        ("/targets/*[type=haproxy]/health_check/host", Slot::Value),
        ("/groups/*/#", Slot::Value),
        ("/api/allowed_networks/#", Slot::Value),
    ] {
        assert!(
            wanted.contains(&(expected.0.to_string(), expected.1)),
            "{expected:?}"
        );
    }
    assert!(wanted.len() > 60, "only {} places found", wanted.len());
}

#[test]
fn every_hostile_value_in_every_field_is_rejected_at_its_own_place() {
    let dir = site();
    let doc = base();
    let mut missed = Vec::new();
    let mut checked = 0;
    for place in places() {
        for (what, hostile) in hostile_values(&place.pattern) {
            let (bad, bad_pointer) = with_value(&doc, &place, &hostile);
            let (text, line, key_column, value_column) = text_and_position(&bad, &place, &hostile);
            let v = validate_text(&text, dir.path());
            checked += 1;
            let what = format!("{} ({what})", place.pointer);
            if v.model.is_some() {
                missed.push(format!("{what}: ACCEPTED {hostile:?}"));
                continue;
            }
            let errors: Vec<_> = v.diagnostics.iter().filter(|d| d.is_error()).collect();
            let Some(d) = errors.iter().find(|d| d.pointer == bad_pointer) else {
                missed.push(format!(
                    "{what}: no error at {bad_pointer:?}; errors at {:?}",
                    errors
                        .iter()
                        .map(|d| format!("{:?}: {}", d.pointer, d.message))
                        .collect::<Vec<_>>()
                ));
                continue;
            };
            match &d.location {
                Some(at)
                    if at.file == dir.path().join("state.yaml")
                        && at.line == line
                        && (at.column == value_column || at.column == key_column) => {}
                other => missed.push(format!(
                    "{what}: at {other:?}, expected line {line} column {value_column} (or {key_column}): {d}"
                )),
            }
            // The message must not carry the raw control characters.
            let shown = d.to_string();
            assert!(!shown.contains(['\0', '\r']), "{shown:?}");
            assert!(
                !d.message.contains('\n') && !d.message.contains('\t'),
                "{shown:?}"
            );
        }
    }
    assert!(checked > 1000, "only {checked} cases");
    assert!(
        missed.is_empty(),
        "{} of {checked} hostile values slipped:\n{}",
        missed.len(),
        missed.join("\n")
    );
}

#[test]
fn render_writes_nothing_for_any_hostile_state() {
    let cases: Vec<(Place, &str, String)> = places()
        .into_iter()
        .flat_map(|place| {
            hostile_values(&place.pattern)
                .into_iter()
                .map(move |(what, v)| (place.clone(), what, v))
        })
        .collect();
    let cases = Mutex::new(cases.into_iter());
    let failures = Mutex::new(Vec::new());
    let mut checked = 0;
    // The CLI, once per case: a few at a time.
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let dir = site();
                    std::fs::write(dir.path().join("state.yaml"), "").unwrap();
                    let before = listing(dir.path());
                    let mut done = 0;
                    loop {
                        let Some((place, what, hostile)) = cases.lock().unwrap().next() else {
                            return done;
                        };
                        done += 1;
                        let (bad, _) = with_value(&base(), &place, &hostile);
                        let (text, line, key_column, value_column) =
                            text_and_position(&bad, &place, &hostile);
                        std::fs::write(dir.path().join("state.yaml"), &text).unwrap();
                        let (code, stdout, stderr) =
                            run(&["render", "state.yaml", "--out", "out"], dir.path());
                        let at = [key_column, value_column]
                            .map(|c| format!("state.yaml:{line}:{c}: error["));
                        let problem = if code != 1 {
                            Some(format!("exit code {code}"))
                        } else if listing(dir.path()) != before {
                            Some(format!("files written: {:?}", listing(dir.path())))
                        } else if !at.iter().any(|a| stderr.contains(a.as_str())) {
                            Some(format!("no error at {at:?}"))
                        } else if stderr.contains(['\0', '\r']) || !stdout.is_empty() {
                            Some("raw control characters or output".to_string())
                        } else {
                            None
                        };
                        if let Some(problem) = problem {
                            failures.lock().unwrap().push(format!(
                                "{} ({what}): {problem}\n{stdout}{stderr}",
                                place.pointer
                            ));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            checked += w.join().unwrap();
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(checked > 1000, "only {checked} cases");
    assert!(
        failures.is_empty(),
        "{} of {checked}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every path under `dir` (the state file's content aside).
fn listing(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            out.insert(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[test]
fn a_json_document_in_memory_is_checked_the_same_way() {
    // Names coming from the API are validated by the same code: a Source built in memory.
    let place = Place {
        pointer: "/domains/shop.apps.example.com".into(),
        pattern: "/domains/*".into(),
        slot: Slot::Key,
    };
    let (doc, pointer) = with_value(&base(), &place, "shop.apps.example.com\nx");
    let text = serde_json::to_string(&doc).unwrap();
    let source = Source::parse(vec![SourceFile::new("api.yaml".into(), text)]);
    let v = validate(&source);
    assert!(v.model.is_none());
    assert!(
        v.diagnostics
            .iter()
            .any(|d| d.code == "invalid-host" && d.pointer == pointer),
        "{:#?}",
        v.diagnostics
    );
}
