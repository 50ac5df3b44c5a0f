//! `apply` on a real HAProxy: routes served, runtime changes without a reload (same worker),
//! reloads when needed, no failed request under load, rollback on failure, history, saved
//! plans.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::*;

/// Backends on loopback, by name.
struct Apps {
    servers: BTreeMap<&'static str, Server>,
}

impl Apps {
    fn new(names: &[&'static str]) -> Apps {
        Apps {
            servers: names.iter().map(|n| (*n, http_backend(n))).collect(),
        }
    }
    fn port(&self, name: &str) -> u16 {
        self.servers[name].port
    }
}

/// A state: listener on `port`, agent `a1` at 127.0.0.1, one pooled app per (name, app) pair
/// routed from `<name>.example.com`, plus `extra` YAML appended to `backends:`/`domains:`.
fn state(
    site: &Site,
    port: u16,
    apps: &Apps,
    routes: &[(&str, &str)],
    extra_listeners: &str,
) -> String {
    let mut s = format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\n{extra_listeners}agents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n"
    );
    for name in apps.servers.keys() {
        s.push_str(&format!(
            "  {name}: {{ servers: [ {{ agent: a1, port: {} }} ] }}\n",
            apps.port(name)
        ));
    }
    s.push_str("domains:\n");
    for (host, backend) in routes {
        s.push_str(&format!("  {host}: {{ backend: {backend} }}\n"));
    }
    s.push_str(&site.target_block(true));
    s
}

#[test]
fn apply_serves_then_changes_routes_at_runtime_and_reloads_only_for_a_listener() {
    let site = Site::new();
    let apps = Apps::new(&["shop", "blog", "wiki"]);
    let port = free_port();
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop")],
        "",
    ));
    let out = site.apply();
    assert!(out.contains("HAProxy started"), "{out}");
    wait_for_route(
        port,
        "shop.example.com",
        "backend=shop",
        Duration::from_secs(5),
    );
    let (reloads, workers) = site.generation();

    // Move the domain to another backend: runtime, same worker.
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "blog")],
        "",
    ));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(
        http_get(port, "shop.example.com", "/")
            .unwrap()
            .1
            .split(' ')
            .next(),
        Some("backend=blog")
    );
    assert_eq!(
        site.generation(),
        (reloads, workers.clone()),
        "the worker changed: a reload happened"
    );

    // A new app on the known agent: runtime too. (`wiki` exists as a backend already; add a
    // fresh one on a new port.)
    let extra = http_backend("fresh");
    let mut yaml = state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "blog"), ("fresh.example.com", "fresh")],
        "",
    );
    yaml = yaml.replace(
        "domains:\n",
        &format!(
            "  fresh: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n",
            extra.port
        ),
    );
    site.write_state(&yaml);
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert!(
        http_get(port, "fresh.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=fresh ")
    );
    assert_eq!(
        site.generation(),
        (reloads, workers.clone()),
        "a new app on a known agent reloaded HAProxy"
    );

    // A new listener needs exactly one reload.
    let port2 = free_port();
    let with_listener = yaml.replace(
        "agents:\n",
        &format!("  alt: {{ bind: \"127.0.0.1:{port2}\" }}\nagents:\n"),
    );
    site.write_state(&with_listener);
    let out = site.apply();
    assert!(out.contains("HAProxy reloaded"), "{out}");
    let (reloads_after, workers_after) = site.generation();
    assert_eq!(reloads_after, reloads + 1, "exactly one reload");
    assert_ne!(workers_after, workers);
    wait_for_route(
        port2,
        "fresh.example.com",
        "backend=fresh",
        Duration::from_secs(5),
    );

    // The history holds the four applies, newest first.
    let (code, history, _) = site.lunafront(&["history", "state.yaml"]);
    assert_eq!(code, 0);
    let entries: Vec<&str> = history.lines().skip(1).collect();
    assert_eq!(entries.len(), 4, "{history}");
    assert!(
        entries[0].contains("reload") && entries[0].contains("+ listener alt"),
        "{history}"
    );
    assert!(entries[3].contains("start"), "{history}");
    // And nothing is left to do.
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 0, "{plan}");
}

/// A check run against the live HAProxy after an apply.
type Check<'a> = Box<dyn Fn() + 'a>;

/// An apply reads back only the map entries it changes (not a 10k-entry map, twice): entries
/// someone changed by hand through the runtime API before it are still brought to the new
/// files — a key the apply adds, added by hand twice to the wrong backend; a key it moves,
/// deleted by hand; a key it removes, already deleted by hand — with no reload, and an entry it
/// does not touch is left to the daemon's drift check.
#[test]
fn map_entries_changed_by_hand_before_an_apply_are_brought_to_the_new_files() {
    let site = Site::new();
    let apps = Apps::new(&["shop", "blog"]);
    let port = free_port();
    let routes = |more: &[(&'static str, &'static str)]| {
        let mut routes = vec![("shop.example.com", "shop"), ("keep.example.com", "shop")];
        routes.extend_from_slice(more);
        state(&site, port, &apps, &routes, "")
    };
    site.write_state(&routes(&[
        ("moved.example.com", "shop"),
        ("gone.example.com", "shop"),
    ]));
    site.apply();
    wait_for_route(
        port,
        "gone.example.com",
        "backend=shop",
        Duration::from_secs(5),
    );
    let generation = site.generation();
    let (shop, blog) = (site.http_slot_of("shop"), site.http_slot_of("blog"));
    let api = site.runtime();
    let hand = |command: String| {
        api.run(&command, lunafront::target::haproxy::socket::Expect::Empty)
            .unwrap()
    };
    hand(format!("add map maps/hosts.map new.example.com {shop}"));
    hand(format!("add map maps/hosts.map new.example.com {shop}"));
    hand("del map maps/hosts.map moved.example.com".to_string());
    hand("del map maps/hosts.map gone.example.com".to_string());
    hand(format!("set map maps/hosts.map keep.example.com {blog}"));

    site.write_state(&routes(&[
        ("moved.example.com", "blog"),
        ("new.example.com", "blog"),
    ]));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    let served = |host: &str| {
        let (status, body) = http_get(port, host, "/").unwrap();
        (
            status,
            body.split(' ').next().unwrap_or_default().to_string(),
        )
    };
    assert_eq!(served("new.example.com"), (200, "backend=blog".into()));
    assert_eq!(served("moved.example.com"), (200, "backend=blog".into()));
    assert_eq!(served("shop.example.com"), (200, "backend=shop".into()));
    assert_eq!(served("gone.example.com").0, 404);
    // Both copies of the key added twice by hand now route to the new backend.
    let dump = api
        .run(
            "show map maps/hosts.map",
            lunafront::target::haproxy::socket::Expect::Any,
        )
        .unwrap();
    let copies: Vec<&str> = dump
        .lines()
        .filter(|l| l.split(' ').nth(1) == Some("new.example.com"))
        .collect();
    assert_eq!(copies.len(), 2, "{dump}");
    assert!(
        copies.iter().all(|l| l.ends_with(&format!(" {blog}"))),
        "{dump}"
    );
    let entry = |key: &str| {
        lunafront::target::haproxy::read_map_entry(&api, "maps/hosts.map", key).unwrap()
    };
    assert_eq!(entry("gone.example.com"), None);
    // Untouched by the change: still as the hand left it (the daemon's drift check puts it back).
    assert_eq!(entry("keep.example.com"), Some(blog.clone()));
    assert_eq!(site.generation(), generation, "a reload happened");
}

/// Every route-change kind the apply issue names, applied to a live HAProxy: how many need no
/// reload. The worker PIDs and the master's reload counter are the proof.
#[test]
fn route_changes_apply_without_a_reload() {
    let site = Site::new();
    let apps = Apps::new(&["one", "two", "three", "four"]);
    let port = free_port();
    let base = |s: &str| {
        format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\nagents:\n{s}{}",
            site.target_block(true)
        )
    };
    let agents = |a1: &str| format!("  a1: {{ address: {a1} }}\n  a2: {{ address: 127.0.0.1 }}\n");
    let multi = |extra: &str, weight: u16, maint: bool| {
        format!(
            "  multi: {{ servers: [ {{ agent: a1, port: {}, weight: {weight} }}, {{ agent: a2, port: {}, maintenance: {maint} }}{extra} ], health_check: {{ path: /health }} }}\n",
            apps.port("one"),
            apps.port("two")
        )
    };
    let doc = |a1: &str, backends: String, domains: &str| {
        base(&format!(
            "{}backends:\n{backends}domains:\n{domains}",
            agents(a1)
        ))
    };
    let pooled = |name: &str, app: &str| {
        format!(
            "  {name}: {{ servers: [ {{ agent: a1, port: {} }} ] }}\n",
            apps.port(app)
        )
    };
    let initial = doc(
        "127.0.0.1",
        format!(
            "{}{}{}",
            multi("", 1, false),
            pooled("one", "one"),
            pooled("two", "two")
        ),
        "  one.example.com: { backend: one }\n  m.example.com: { backend: multi }\n",
    );
    site.write_state(&initial);
    site.apply();
    wait_for_route(
        port,
        "one.example.com",
        "backend=one",
        Duration::from_secs(5),
    );
    let start = site.generation();

    let three_server = format!(", {{ agent: a2, port: {} }}", apps.port("three"));
    let kinds: Vec<(&str, String, Check<'_>)> = vec![
        (
            "add a domain",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi("", 1, false),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: one }\n  m.example.com: { backend: multi }\n  new.example.com: { backend: two }\n",
            ),
            Box::new(|| {
                assert!(
                    http_get(port, "new.example.com", "/")
                        .unwrap()
                        .1
                        .starts_with("backend=two ")
                )
            }),
        ),
        (
            "move a domain to another backend",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi("", 1, false),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: two }\n  m.example.com: { backend: multi }\n  new.example.com: { backend: two }\n",
            ),
            Box::new(|| {
                assert!(
                    http_get(port, "one.example.com", "/")
                        .unwrap()
                        .1
                        .starts_with("backend=two ")
                )
            }),
        ),
        (
            "remove a domain",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi("", 1, false),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: two }\n  m.example.com: { backend: multi }\n",
            ),
            Box::new(|| assert_eq!(http_get(port, "new.example.com", "/").unwrap().0, 404)),
        ),
        (
            "add a server of an agent",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi(&three_server, 1, false),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: two }\n  m.example.com: { backend: multi }\n",
            ),
            Box::new(|| {
                let seen: std::collections::BTreeSet<String> = (0..12)
                    .map(|_| {
                        let (status, body) = http_get(port, "m.example.com", "/").unwrap();
                        assert_eq!(status, 200, "{body}");
                        body.split(' ').next().unwrap().to_string()
                    })
                    .collect();
                assert!(seen.contains("backend=three"), "{seen:?}");
                assert!(
                    seen.iter()
                        .all(|b| ["backend=one", "backend=two", "backend=three"]
                            .contains(&b.as_str())),
                    "{seen:?}"
                );
            }),
        ),
        (
            "remove a server of an agent",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi("", 1, false),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: two }\n  m.example.com: { backend: multi }\n",
            ),
            Box::new(|| {
                // Every answer comes from a remaining server: a 503 (no server) fails too.
                for _ in 0..8 {
                    let (status, body) = http_get(port, "m.example.com", "/").unwrap();
                    assert!(
                        status == 200
                            && (body.starts_with("backend=one ")
                                || body.starts_with("backend=two ")),
                        "{status} {body}"
                    );
                }
            }),
        ),
        (
            "change a weight",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi("", 0, false),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: two }\n  m.example.com: { backend: multi }\n",
            ),
            Box::new(|| {
                for _ in 0..6 {
                    assert!(
                        http_get(port, "m.example.com", "/")
                            .unwrap()
                            .1
                            .starts_with("backend=two "),
                        "weight 0 still gets traffic"
                    );
                }
            }),
        ),
        (
            "put a server in maintenance",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi("", 1, true),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: two }\n  m.example.com: { backend: multi }\n",
            ),
            Box::new(|| {
                for _ in 0..6 {
                    assert!(
                        http_get(port, "m.example.com", "/")
                            .unwrap()
                            .1
                            .starts_with("backend=one "),
                        "maintenance still gets traffic"
                    );
                }
            }),
        ),
        (
            "an agent changes address",
            doc(
                "127.0.0.2",
                format!(
                    "{}{}{}",
                    multi("", 1, true),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: one }\n  m.example.com: { backend: multi }\n",
            ),
            // The test backends listen on 127.0.0.1 only: at 127.0.0.2 `one` is unreachable,
            // which proves the address changed.
            Box::new(|| assert_eq!(http_get(port, "one.example.com", "/").unwrap().0, 503)),
        ),
        (
            "an agent changes address back",
            doc(
                "127.0.0.1",
                format!(
                    "{}{}{}",
                    multi("", 1, true),
                    pooled("one", "one"),
                    pooled("two", "two")
                ),
                "  one.example.com: { backend: one }\n  m.example.com: { backend: multi }\n",
            ),
            Box::new(|| {
                assert!(
                    http_get(port, "one.example.com", "/")
                        .unwrap()
                        .1
                        .starts_with("backend=one ")
                )
            }),
        ),
    ];
    let mut report = Vec::new();
    let total = kinds.len();
    let mut zero_reload = 0;
    for (what, yaml, check) in kinds {
        site.write_state(&yaml);
        let out = site.apply();
        let runtime = out.contains("through the runtime API");
        check();
        let same = site.generation() == start;
        if runtime && same {
            zero_reload += 1;
        }
        report.push(format!(
            "{what}: {}",
            if runtime && same {
                "runtime, no reload"
            } else {
                "RELOAD"
            }
        ));
    }
    println!(
        "{}\n{zero_reload} of {total} route-change kinds applied with zero reloads",
        report.join("\n")
    );
    assert_eq!(zero_reload, total, "{}", report.join("\n"));
}

#[test]
fn no_request_fails_while_50_applies_run_mixing_runtime_changes_and_reloads() {
    let site = Site::new();
    let apps = Apps::new(&["blue", "green"]);
    let port = free_port();
    let yaml = |backend: &str, tunnel: &str| {
        state(&site, port, &apps, &[("app.example.com", backend)], "").replace(
            "targets:",
            &format!("global:\n  timeouts: {{ tunnel: {tunnel} }}\ntargets:"),
        )
    };
    site.write_state(&yaml("blue", "1h"));
    site.apply();
    wait_for_route(
        port,
        "app.example.com",
        "backend=blue",
        Duration::from_secs(5),
    );

    // Clients on keep-alive connections, as real ones: a reload must not break a connection
    // under a request (an old worker answers with `Connection: close`, then the client opens
    // a new connection to the new worker).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut client = KeepAliveClient::new(port);
                let deadline = Instant::now() + Duration::from_secs(180);
                let mut requests = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    requests += 1;
                    match client.get("app.example.com", "/") {
                        Ok((200, body))
                            if body.starts_with("backend=blue ")
                                || body.starts_with("backend=green ") =>
                        {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                    // A steady load, not a busy loop that starves the applies on a small machine.
                    std::thread::sleep(Duration::from_millis(2));
                }
                (requests, client.connections)
            })
        })
        .collect();

    let (reloads_before, _) = site.generation();
    let (mut runtime, mut reloads) = (0, 0);
    let mut wrong = Vec::new();
    let (mut backend, mut tunnel) = ("blue", "1h");
    for i in 0..50 {
        // Even: move the route (runtime). Odd: change a global timeout (reload).
        if i % 2 == 0 {
            backend = if backend == "blue" { "green" } else { "blue" };
        } else {
            tunnel = if tunnel == "1h" { "2h" } else { "1h" };
        }
        site.write_state(&yaml(backend, tunnel));
        let before = site.generation();
        let out = site.apply();
        let after = site.generation();
        // What lunafront says it did, and what HAProxy's master says happened.
        let said_runtime = out.contains("through the runtime API");
        let said_reload = out.contains("HAProxy reloaded");
        let reloaded = after.0 == before.0 + 1 && after.1.iter().all(|p| !before.1.contains(p));
        match (i % 2 == 0, said_runtime, said_reload) {
            (true, true, false) if after == before => runtime += 1,
            (false, false, true) if reloaded => reloads += 1,
            _ => wrong.push(format!(
                "apply {i}: show proc {before:?} -> {after:?}, lunafront said:\n{out}"
            )),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut requests, mut connections) = (0, 0);
    for c in clients {
        let (r, c) = c.join().unwrap();
        requests += r;
        connections += c;
    }
    let (reloads_after, _) = site.generation();
    let failures = failures.lock().unwrap();
    let served = ok.load(Ordering::Relaxed);
    println!(
        "50 applies: {runtime} runtime, {reloads} reloads (master counted {}); {served} of {requests} requests served over {connections} connections, {} failed",
        reloads_after - reloads_before,
        failures.len()
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!((runtime, reloads), (25, 25));
    assert_eq!(
        reloads_after - reloads_before,
        25,
        "the master counted other reloads"
    );
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(served, requests);
    assert!(served > 100, "too few requests to mean anything: {served}");
    // Keep-alive it was: connections are reused across requests, and renewed across reloads.
    assert!(
        connections >= 3 && connections < requests / 2,
        "{connections} connections for {requests} requests"
    );
}

#[test]
fn a_configuration_haproxy_refuses_changes_nothing() {
    let site = Site::new();
    let apps = Apps::new(&["shop"]);
    let port = free_port();
    let good = state(&site, port, &apps, &[("shop.example.com", "shop")], "");
    site.write_state(&good);
    site.apply();
    let before = site.live_files();
    // Valid for lunafront, refused by `haproxy -c`: a CA file that does not exist.
    let bad = good.replace(
        "  shop: { servers:",
        "  shop: { tls: { verify: true, ca_file: /nonexistent/ca.pem }, servers:",
    );
    site.write_state(&bad);
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("HAProxy refused the new configuration (haproxy -c); nothing was changed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ca.pem"),
        "HAProxy's reason is shown: {stderr}"
    );
    assert_eq!(site.live_files(), before, "the live files changed");
    assert!(
        http_get(port, "shop.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=shop ")
    );
}

#[test]
fn a_failed_reload_is_rolled_back_with_exit_code_3() {
    let site = Site::new();
    let apps = Apps::new(&["shop"]);
    let port = free_port();
    let good = state(&site, port, &apps, &[("shop.example.com", "shop")], "");
    site.write_state(&good);
    site.apply();
    let before = site.live_files();
    let (reloads, _) = site.generation();
    // `haproxy -c` does not bind: a port already taken passes the check and fails the reload.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop")],
        &format!("  busy: {{ bind: \"127.0.0.1:{taken_port}\" }}\n"),
    ));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(
        stderr.contains("the previous configuration was put back and HAProxy runs it again"),
        "{stderr}"
    );
    assert_eq!(
        site.live_files(),
        before,
        "the files were not put back byte for byte"
    );
    assert!(site.generation().0 > reloads, "no reload was attempted");
    assert!(
        http_get(port, "shop.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=shop ")
    );
    drop(taken);
}

#[test]
fn haproxy_gone_before_an_apply_is_a_clear_error_and_nothing_changes() {
    let site = Site::new();
    let apps = Apps::new(&["shop"]);
    let port = free_port();
    // Not spawned by lunafront: an operator's HAProxy that stopped.
    let yaml = state(&site, port, &apps, &[("shop.example.com", "shop")], "")
        .replace("spawn: true", "spawn: false");
    site.write_state(&yaml);
    let (code, _, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("HAProxy is not running"), "{stderr}");
    assert!(site.live_files().is_empty(), "files were written");

    // Started by hand, then killed between plan and apply.
    assert_eq!(
        site.lunafront(&["render", "state.yaml", "--out", "live"]).0,
        0
    );
    let haproxy = Haproxy::start(
        &site.path().join("live/haproxy.cfg"),
        &site.path().join("state/master.sock"),
        &[port],
    );
    site.write_state(&yaml.replace("shop.example.com:", "blog.example.com:"));
    let (code, _, stderr) = site.lunafront(&["plan", "state.yaml", "--out", "plan.json"]);
    assert_eq!(code, 0, "{stderr}");
    drop(haproxy);
    let before = site.live_files();
    let (code, _, stderr) = site.lunafront(&["apply", "--plan", "plan.json", "--auto-approve"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("HAProxy is not running"), "{stderr}");
    assert_eq!(site.live_files(), before);
}

#[test]
fn saved_plans_apply_as_reviewed_and_stale_ones_are_refused() {
    let site = Site::new();
    let apps = Apps::new(&["shop", "blog"]);
    let port = free_port();
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop")],
        "",
    ));
    site.apply();

    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "blog")],
        "",
    ));
    let (code, _, stderr) = site.lunafront(&["plan", "state.yaml", "--out", "plan.json"]);
    assert_eq!(code, 0, "{stderr}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(site.path().join("plan.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // The state moves on after the plan: the saved plan still applies what was reviewed.
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop"), ("x.example.com", "blog")],
        "",
    ));
    let (code, stdout, stderr) =
        site.lunafront(&["apply", "--plan", "plan.json", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        http_get(port, "shop.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=blog ")
    );
    assert_eq!(http_get(port, "x.example.com", "/").unwrap().0, 404);

    // A plan made before another apply is stale.
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop")],
        "",
    ));
    assert_eq!(
        site.lunafront(&["plan", "state.yaml", "--out", "old.json"])
            .0,
        0
    );
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "blog"), ("y.example.com", "shop")],
        "",
    ));
    site.apply();
    let before = site.live_files();
    let (code, _, stderr) = site.lunafront(&["apply", "--plan", "old.json", "--auto-approve"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("the plan is stale"), "{stderr}");
    assert_eq!(site.live_files(), before);
}

#[test]
fn apply_asks_for_confirmation_and_refuses_without_a_terminal() {
    let site = Site::new();
    let apps = Apps::new(&["shop"]);
    site.write_state(&state(
        &site,
        free_port(),
        &apps,
        &[("shop.example.com", "shop")],
        "",
    ));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml"]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("+ domain shop.example.com → shop"),
        "the plan is shown first: {stdout}"
    );
    assert!(stderr.contains("pass --auto-approve"), "{stderr}");
    assert!(site.live_files().is_empty());
}

#[test]
fn rollback_puts_back_an_earlier_state() {
    let site = Site::new();
    let apps = Apps::new(&["shop", "blog"]);
    let port = free_port();
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop")],
        "",
    ));
    site.apply();
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "blog")],
        "",
    ));
    site.apply();
    assert!(
        http_get(port, "shop.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=blog ")
    );
    let (code, stdout, stderr) = site.lunafront(&["rollback", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("Rolling target local back to entry 1"),
        "{stdout}"
    );
    assert!(stdout.contains("through the runtime API"), "{stdout}");
    assert!(
        http_get(port, "shop.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=shop ")
    );
    let (_, history, _) = site.lunafront(&["history", "state.yaml"]);
    assert!(
        history
            .lines()
            .nth(1)
            .unwrap()
            .contains("rollback to entry 1"),
        "{history}"
    );
    // The history keeps private data: 0700 folders, 0600 files.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(site.path().join("state/history"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    let (code, _, stderr) =
        site.lunafront(&["rollback", "state.yaml", "--steps", "10", "--auto-approve"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot go back 10 step(s)"), "{stderr}");
}

#[test]
fn certificates_rotate_at_runtime_and_keys_are_never_printed() {
    let site = Site::new();
    let ca = TestCa::new();
    let apps = Apps::new(&["shop"]);
    let port = free_port();
    write(
        site.path(),
        "certs/shop.pem",
        &ca.leaf(&["shop.example.com"]).combined(),
    );
    let yaml = state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop"), ("new.example.com", "shop")],
        "",
    )
    .replace(
        &format!("  http: {{ bind: \"127.0.0.1:{port}\" }}"),
        &format!("  https: {{ bind: \"127.0.0.1:{port}\", certificates: certs }}"),
    );
    site.write_state(&yaml);
    let out = site.apply();
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    assert!(
        https_get(&ca, port, "shop.example.com", "shop.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=shop ")
    );
    // new.example.com has no certificate yet: the client refuses the default one.
    assert!(https_get(&ca, port, "new.example.com", "new.example.com", "/").is_err());
    let (_, workers) = site.generation();

    // A second certificate: added at runtime, no reload.
    let first = ca.leaf(&["new.example.com"]);
    write(site.path(), "certs/new.pem", &first.combined());
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    assert!(
        https_get(&ca, port, "new.example.com", "new.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=shop ")
    );
    assert!(
        served_certificate(&ca, port, "new.example.com").unwrap() == first.der(),
        "HAProxy does not present the certificate just added"
    );
    // Renewed: replaced at runtime, and the new one (its own serial and names) is the one
    // HAProxy presents from then on.
    let renewed = ca.leaf(&["new.example.com", "www.new.example.com"]);
    assert_ne!(renewed.der(), first.der());
    write(site.path(), "certs/new.pem", &renewed.combined());
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert!(
        https_get(&ca, port, "new.example.com", "new.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=shop ")
    );
    assert!(
        served_certificate(&ca, port, "new.example.com").unwrap() == renewed.der(),
        "HAProxy still presents the certificate before the renewal"
    );
    // Removed: gone at runtime.
    std::fs::remove_file(site.path().join("certs/new.pem")).unwrap();
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert!(https_get(&ca, port, "new.example.com", "new.example.com", "/").is_err());
    assert_eq!(
        site.generation().1,
        workers,
        "certificate changes reloaded HAProxy"
    );
}
