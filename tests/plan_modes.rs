//! The plan's promise, checked for every kind of change: a change marked `runtime` really needs
//! no reload, and whenever a reload is needed some change says so and why. The judge is a real
//! HAProxy: each change is planned, then applied to a running one, and what HAProxy did —
//! its worker PIDs and the reload counter of its master CLI's `show proc` — must be what the
//! plan promised. The pure tests beside it check the plan's own consistency.

mod support;

use lunafront::model::{Model, validate};
use lunafront::plan::diff::{Action, Kind, Mode};
use lunafront::plan::{Live, make_plan};
use lunafront::render::{RenderOptions, Rendered, render, render_onto};
use lunafront::spec::load::{Source, SourceFile};
use serde_json::{Value, json};
use support::*;

fn base() -> Value {
    json!({
        "version": 1,
        "listeners": {
            "http": { "bind": "127.0.0.1:8080" },
            "mongodb": { "bind": "127.0.0.1:27017", "tls": "passthrough" }
        },
        "agents": {
            "agent-7": { "address": "203.0.113.7" },
            "agent-8": { "address": "203.0.113.8" }
        },
        "backends": {
            "shop": { "servers": [ { "agent": "agent-7", "port": 9001 } ] },
            "blog": { "servers": [ { "agent": "agent-8", "port": 9002 } ], "health_check": true },
            "api": { "servers": [ { "agent": "agent-7", "port": 8000, "weight": 2 }, { "agent": "agent-8", "port": 8000 } ], "health_check": { "path": "/health" } },
            "legacy": { "servers": [ { "address": "10.0.0.5", "port": 80, "weight": 10 } ] },
            "db7": { "servers": [ { "agent": "agent-7", "port": 27017 } ] },
            "duo": { "servers": [ { "agent": "agent-7", "port": 7000 }, { "agent": "agent-8", "port": 7000 } ] }
        },
        "domains": {
            "shop.apps.example.com": { "backend": "shop" },
            "blog.apps.example.com": { "backend": "blog" },
            "api.example.com": { "backend": "api" },
            "legacy.example.com": { "backend": "legacy" },
            "duo.example.com": { "backend": "duo" },
            "*.preview.example.com": { "backend": "shop" },
            "*.staging.example.com": { "backend": "api" },
            "agent-7.mongodb.example.com": { "backend": "db7", "listener": "mongodb" }
        }
    })
}

fn model(doc: &Value) -> Model {
    let source = Source::parse(vec![SourceFile::new(
        "state.yaml".into(),
        serde_json::to_string(doc).unwrap(),
    )]);
    let v = validate(&source);
    v.model.unwrap_or_else(|| panic!("{:#?}", v.diagnostics))
}

fn rendered(m: &Model) -> Rendered {
    render(m, &RenderOptions::for_target(None)).unwrap()
}

/// The target as the last apply of `old` left it.
fn live_after(old: &Model) -> Live {
    let r = rendered(old);
    Live {
        files: r.files().into_iter().map(|f| (f.path, f.bytes)).collect(),
        previous: Some(std::sync::Arc::new(old.clone())),
        recorded_files: recorded(&r),
        previous_error: None,
        version: None,
        interrupted: None,
    }
}

/// The plan `apply` makes: the new state rendered onto the app slots the target holds.
fn plan_between(old: &Value, new: &Value) -> lunafront::plan::Plan {
    let (old, new) = (model(old), model(new));
    let live = live_after(&old);
    let r = render_onto(
        &new,
        &RenderOptions::for_target(None),
        &live.slot_pools("haproxy.cfg"),
    )
    .unwrap();
    make_plan("t", &new, &r, &live)
}

fn set(doc: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    match doc.pointer_mut(parent).unwrap() {
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = value,
        parent => {
            parent
                .as_object_mut()
                .unwrap()
                .insert(key.replace("~1", "/"), value);
        }
    }
}

fn remove(doc: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    doc.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(&key.replace("~1", "/"));
}

type Edit = fn(&mut Value);

/// Every route change the apply issue names, and the structural ones, with the expected mode.
fn cases() -> Vec<(&'static str, Edit, Mode)> {
    vec![
        (
            "add a domain to an existing backend",
            |d| {
                set(
                    d,
                    "/domains/new.apps.example.com",
                    json!({"backend": "shop"}),
                )
            },
            Mode::Runtime,
        ),
        (
            "add a wildcard domain",
            |d| set(d, "/domains/*.new.example.com", json!({"backend": "api"})),
            Mode::Runtime,
        ),
        (
            "move a domain to another backend",
            |d| {
                set(
                    d,
                    "/domains/shop.apps.example.com",
                    json!({"backend": "blog"}),
                )
            },
            Mode::Runtime,
        ),
        (
            "move a domain from an app to a dedicated backend",
            |d| {
                set(
                    d,
                    "/domains/shop.apps.example.com",
                    json!({"backend": "api"}),
                )
            },
            Mode::Runtime,
        ),
        (
            "remove a domain",
            |d| remove(d, "/domains/legacy.example.com"),
            Mode::Runtime,
        ),
        (
            "add a MongoDB (SNI) domain",
            |d| {
                set(
                    d,
                    "/domains/db.mongodb.example.com",
                    json!({"backend": "db7", "listener": "mongodb"}),
                )
            },
            Mode::Runtime,
        ),
        (
            "add an app on a known agent (backend + domain)",
            |d| {
                set(
                    d,
                    "/backends/new-app",
                    json!({"servers": [{"agent": "agent-8", "port": 9100}]}),
                );
                set(
                    d,
                    "/domains/new-app.apps.example.com",
                    json!({"backend": "new-app"}),
                );
            },
            Mode::Runtime,
        ),
        (
            "add a MongoDB app on a known agent",
            |d| {
                set(
                    d,
                    "/backends/db8",
                    json!({"servers": [{"agent": "agent-8", "port": 27017}]}),
                );
                set(
                    d,
                    "/domains/agent-8.mongodb.example.com",
                    json!({"backend": "db8", "listener": "mongodb"}),
                );
            },
            Mode::Runtime,
        ),
        (
            "remove an app (backend + domain)",
            |d| {
                remove(d, "/backends/shop");
                remove(d, "/domains/shop.apps.example.com");
                remove(d, "/domains/*.preview.example.com");
            },
            Mode::Runtime,
        ),
        (
            "add a server of an agent to a backend",
            |d| {
                set(
                    d,
                    "/backends/api/servers",
                    json!([{"agent": "agent-7", "port": 8000, "weight": 2}, {"agent": "agent-8", "port": 8000}, {"agent": "agent-8", "port": 8001}]),
                )
            },
            Mode::Runtime,
        ),
        (
            "remove a server of an agent from a backend",
            |d| {
                set(
                    d,
                    "/backends/api/servers",
                    json!([{"agent": "agent-7", "port": 8000, "weight": 2}]),
                )
            },
            Mode::Runtime,
        ),
        // The cost of app slots: a backend that shrinks to a single agent server (and has
        // nothing backend-wide) becomes an app and takes a slot, and an app that grows out of
        // it gets a section of its own. Both need a reload, and the plan says why.
        (
            "a backend shrinks to one agent server (becomes an app in a slot)",
            |d| {
                set(
                    d,
                    "/backends/duo/servers",
                    json!([{"agent": "agent-7", "port": 7000}]),
                )
            },
            Mode::Reload,
        ),
        (
            "an app gets a second server (leaves its slot)",
            |d| {
                set(
                    d,
                    "/backends/shop/servers",
                    json!([{"agent": "agent-7", "port": 9001}, {"agent": "agent-8", "port": 9001}]),
                )
            },
            Mode::Reload,
        ),
        (
            "an agent changes address",
            |d| set(d, "/agents/agent-7", json!({"address": "203.0.113.77"})),
            Mode::Runtime,
        ),
        (
            "change a weight",
            |d| {
                set(
                    d,
                    "/backends/legacy/servers",
                    json!([{"address": "10.0.0.5", "port": 80, "weight": 20}]),
                )
            },
            Mode::Runtime,
        ),
        (
            "put a server in maintenance",
            |d| {
                set(
                    d,
                    "/backends/api/servers/1",
                    json!({"agent": "agent-8", "port": 8000, "maintenance": true}),
                )
            },
            Mode::Runtime,
        ),
        (
            "put an app in maintenance",
            |d| {
                set(
                    d,
                    "/backends/shop/servers",
                    json!([{"agent": "agent-7", "port": 9001, "maintenance": true}]),
                )
            },
            Mode::Runtime,
        ),
        (
            "put an agent in maintenance",
            |d| {
                set(
                    d,
                    "/agents/agent-8",
                    json!({"address": "203.0.113.8", "maintenance": true}),
                )
            },
            Mode::Runtime,
        ),
        (
            "change an app's port",
            |d| {
                set(
                    d,
                    "/backends/shop/servers",
                    json!([{"agent": "agent-7", "port": 9009}]),
                )
            },
            Mode::Runtime,
        ),
        (
            "move an app to another agent",
            |d| {
                set(
                    d,
                    "/backends/shop/servers",
                    json!([{"agent": "agent-8", "port": 9001}]),
                )
            },
            Mode::Runtime,
        ),
        (
            "change an app's weight",
            |d| {
                set(
                    d,
                    "/backends/shop/servers",
                    json!([{"agent": "agent-7", "port": 9001, "weight": 50}]),
                )
            },
            Mode::Runtime,
        ),
        // Agents are no HAProxy objects of their own: their apps take free slots.
        (
            "add a new agent",
            |d| set(d, "/agents/agent-9", json!({"address": "203.0.113.9"})),
            Mode::Runtime,
        ),
        (
            "add an app on a new agent",
            |d| {
                set(d, "/agents/agent-9", json!({"address": "203.0.113.9"}));
                set(
                    d,
                    "/backends/new-app",
                    json!({"servers": [{"agent": "agent-9", "port": 9100}]}),
                );
                set(
                    d,
                    "/domains/new-app.apps.example.com",
                    json!({"backend": "new-app"}),
                );
            },
            Mode::Runtime,
        ),
        (
            "move an app from HTTP to TCP (another pool's free slot)",
            |d| {
                set(
                    d,
                    "/domains/shop.apps.example.com",
                    json!({"backend": "shop", "listener": "mongodb"}),
                );
                remove(d, "/domains/*.preview.example.com");
            },
            Mode::Runtime,
        ),
        (
            "add more apps than there are free slots (the pool grows)",
            |d| {
                // The base has 2 HTTP apps in a pool of 32 slots: 31 more need 33.
                for i in 0..31 {
                    set(
                        d,
                        &format!("/backends/more-{i}"),
                        json!({"servers": [{"agent": "agent-8", "port": 10000 + i}]}),
                    );
                    set(
                        d,
                        &format!("/domains/more-{i}.apps.example.com"),
                        json!({"backend": format!("more-{i}")}),
                    );
                }
            },
            Mode::Reload,
        ),
        (
            "pin a domain to an HTTP listener that has none yet (its frontend gains its own map)",
            |d| {
                set(
                    d,
                    "/domains/only-http.example.com",
                    json!({"backend": "api", "listener": "http"}),
                )
            },
            Mode::Reload,
        ),
        (
            "remove the last wildcard domains (the wildcard lookup goes)",
            |d| {
                remove(d, "/domains/*.preview.example.com");
                remove(d, "/domains/*.staging.example.com");
            },
            Mode::Reload,
        ),
        (
            "add a listener",
            |d| set(d, "/listeners/alt", json!({"bind": "127.0.0.1:8081"})),
            Mode::Reload,
        ),
        (
            "change a global setting",
            |d| set(d, "/global", json!({"hard_stop_after": "5m"})),
            Mode::Reload,
        ),
        (
            "add a backend of its own (address server)",
            |d| {
                set(
                    d,
                    "/backends/ext",
                    json!({"servers": [{"address": "10.0.0.9", "port": 80}]}),
                )
            },
            Mode::Reload,
        ),
        (
            "change an HTTP health check path",
            |d| set(d, "/backends/api/health_check", json!({"path": "/ready"})),
            Mode::Reload,
        ),
        (
            "turn on TLS to a backend",
            |d| set(d, "/backends/legacy/tls", json!(true)),
            Mode::Reload,
        ),
    ]
}

#[test]
fn each_change_kind_applies_with_the_promised_mode() {
    let mut report = Vec::new();
    for (what, edit, expected) in cases() {
        let mut new = base();
        edit(&mut new);
        let plan = plan_between(&base(), &new);
        assert!(!plan.changes.is_empty(), "{what}: no change found");
        let claimed = if plan.changes.iter().any(|c| c.mode == Mode::Reload) {
            Mode::Reload
        } else {
            Mode::Runtime
        };
        let truth = if plan.reload_required() {
            Mode::Reload
        } else {
            Mode::Runtime
        };
        assert_eq!(
            claimed, truth,
            "{what}: the changes claim {claimed:?} but the configuration needs {truth:?}: {:#?}",
            plan.changes
        );
        assert_eq!(
            truth, expected,
            "{what}: expected {expected:?}, got {truth:?}: {:#?}",
            plan.changes
        );
        report.push(format!("{what}: {truth:?}"));
    }
    println!("{}", report.join("\n"));
}

/// `doc` on the site: its listeners on free loopback ports (the same port for the same
/// address in every case), applied to the site's HAProxy.
fn on_site(doc: &Value, site: &Site, ports: &std::collections::BTreeMap<&str, u16>) -> Value {
    let mut doc = doc.clone();
    if let Some(listeners) = doc.get_mut("listeners").and_then(Value::as_object_mut) {
        for listener in listeners.values_mut() {
            let bind = listener["bind"].as_str().unwrap().to_string();
            let port = ports
                .get(bind.as_str())
                .unwrap_or_else(|| panic!("no free port for {bind}"));
            listener["bind"] = json!(format!("127.0.0.1:{port}"));
        }
    }
    let d = site.path().display();
    doc["targets"] = json!({
        "local": {
            "type": "haproxy", "config": "live/haproxy.cfg", "state_dir": "state", "spawn": true,
            "master_socket": format!("{d}/state/master.sock"),
            "runtime_socket": format!("{d}/state/admin.sock"), "reload_timeout": "10s"
        }
    });
    doc
}

/// What the plan of `doc` against the target promises: a reload when any change says so.
fn promised(site: &Site) -> Mode {
    let (code, stdout, stderr) = site.lunafront(&["plan", "state.yaml", "--json"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    let changes = plan["changes"].as_array().unwrap();
    assert!(!changes.is_empty(), "no change: {stdout}");
    if changes.iter().any(|c| c["mode"] == "reload") {
        Mode::Reload
    } else {
        assert!(changes.iter().all(|c| c["mode"] == "runtime"), "{stdout}");
        Mode::Runtime
    }
}

/// What HAProxy did between two `show proc` readings: nothing (same workers, same reload
/// counter) or exactly one reload (a new worker, the counter up by one).
fn what_haproxy_did(before: &(u32, Vec<u32>), after: &(u32, Vec<u32>)) -> Result<Mode, String> {
    if after == before {
        Ok(Mode::Runtime)
    } else if after.0 == before.0 + 1 && after.1.iter().all(|pid| !before.1.contains(pid)) {
        Ok(Mode::Reload)
    } else {
        Err(format!("show proc went from {before:?} to {after:?}"))
    }
}

#[test]
fn each_promised_mode_is_what_a_real_haproxy_did() {
    let site = Site::new();
    let ports: std::collections::BTreeMap<&str, u16> = [
        ("127.0.0.1:8080", free_port()),
        ("127.0.0.1:27017", free_port()),
        ("127.0.0.1:8081", free_port()),
    ]
    .into_iter()
    .collect();
    let write = |doc: &Value| {
        site.write_state(&serde_json::to_string_pretty(&on_site(doc, &site, &ports)).unwrap())
    };
    write(&base());
    let out = site.apply();
    assert!(out.contains("HAProxy started"), "{out}");
    let mut wrong = Vec::new();
    let mut report = Vec::new();
    for (what, edit, expected) in cases() {
        // From the base state, as HAProxy runs it (going back from a case that added many
        // apps removes them all: past the delete guard, on purpose).
        write(&base());
        let (code, stdout, stderr) =
            site.lunafront(&["apply", "state.yaml", "--auto-approve", "--allow-deletes"]);
        assert_eq!(code, 0, "{what}: back to the base state:\n{stdout}{stderr}");
        let before = site.generation();
        let mut new = base();
        edit(&mut new);
        write(&new);
        let promise = promised(&site);
        let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
        assert_eq!(code, 0, "{what}: apply failed:\n{stdout}{stderr}");
        let did = what_haproxy_did(&before, &site.generation());
        report.push(format!("{what}: promised {promise:?}, HAProxy did {did:?}"));
        if did.as_ref() != Ok(&promise) || promise != expected {
            wrong.push(format!(
                "{what}: the plan promised {promise:?} (expected {expected:?}), HAProxy did {did:?}\n{stdout}"
            ));
        }
    }
    println!("{}", report.join("\n"));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn an_unchanged_state_plans_nothing_and_an_empty_target_plans_everything() {
    let plan = plan_between(&base(), &base());
    assert!(plan.is_empty(), "{:#?}", plan.changes);
    assert!(!plan.reload_required());

    let m = model(&base());
    let plan = make_plan("t", &m, &rendered(&m), &Live::default());
    assert!(plan.reload_required());
    assert!(plan.changes.iter().all(|c| c.action == Action::Create));
    let domains = plan
        .changes
        .iter()
        .filter(|c| c.kind == Kind::Domain)
        .count();
    assert_eq!(domains, 8);
    // Tearing down: every entry is deleted.
    let empty = model(&json!({"version": 1}));
    let plan = make_plan("t", &empty, &rendered(&empty), &live_after(&m));
    assert!(
        plan.changes.iter().all(|c| c.action == Action::Delete),
        "{:#?}",
        plan.changes
    );
    assert_eq!(
        plan.changes
            .iter()
            .filter(|c| c.kind == Kind::Domain)
            .count(),
        8
    );
}

#[test]
fn summaries_read_like_the_examples() {
    let mut new = base();
    set(
        &mut new,
        "/domains/new.apps.example.com",
        json!({"backend": "shop"}),
    );
    set(
        &mut new,
        "/backends/legacy/servers",
        json!([{"address": "10.0.0.5", "port": 80, "weight": 20}]),
    );
    remove(&mut new, "/agents/agent-8");
    remove(&mut new, "/backends/blog");
    remove(&mut new, "/backends/duo");
    remove(&mut new, "/domains/duo.example.com");
    remove(&mut new, "/domains/blog.apps.example.com");
    set(
        &mut new,
        "/backends/api/servers",
        json!([{"agent": "agent-7", "port": 8000, "weight": 2}]),
    );
    let plan = plan_between(&base(), &new);
    let lines: Vec<String> = plan.changes.iter().map(|c| c.summary()).collect();
    assert!(
        lines.contains(&"+ domain new.apps.example.com → shop".to_string()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"~ backend legacy: weight 10 → 20".to_string()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"- agent agent-8: 203.0.113.8".to_string()),
        "{lines:#?}"
    );
}

#[test]
fn drift_on_the_target_is_reported() {
    let m = model(&base());
    let mut live = live_after(&m);
    let cfg = live.files.get_mut("haproxy.cfg").unwrap();
    cfg.extend_from_slice(b"# edited by hand\n");
    live.files
        .get_mut("maps/hosts.map")
        .unwrap()
        .extend_from_slice(b"evil.example.com shop\n");
    let plan = make_plan("t", &m, &rendered(&m), &live);
    let drift: Vec<&str> = plan
        .changes
        .iter()
        .filter(|c| c.kind == Kind::Global)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        drift,
        vec!["haproxy.cfg", "maps/hosts.map"],
        "{:#?}",
        plan.changes
    );
    assert!(plan.reload_required());
}

/// The file digests an apply of `r` records in its manifest.
fn recorded(r: &Rendered) -> std::collections::BTreeMap<String, String> {
    r.files()
        .into_iter()
        .filter(|f| f.path != lunafront::render::MANIFEST)
        .map(|f| (f.path, lunafront::plan::sha256_hex(&f.bytes)))
        .collect()
}
