//! App slots on a real HAProxy: an app (one server on an agent, nothing backend-wide) lives in
//! a pre-provisioned slot backend. A new app takes a free slot at runtime (same worker), a full
//! pool grows with one reload the plan explains, a removed app frees its slot at runtime, and
//! health checks, weights, maintenance and per-app statistics work on slotted apps. The pure
//! tests check the layout itself: no request walks a server list, and any history of changes
//! renders the same files as the runtime operations produce.

mod support;

use lunafront::model::{Mode as BackendMode, Model, validate};
use lunafront::plan::diff::Mode;
use lunafront::plan::ops::{Execution, Op, RuntimeState, plan_ops};
use lunafront::plan::{Live, make_plan};
use lunafront::render::layout::slot_name;
use lunafront::render::{RenderOptions, readback, render, render_onto};
use lunafront::spec::load::{Source, SourceFile};
use lunafront::target::haproxy::socket::Expect;
use lunafront::target::haproxy::{Scope, execute, verify, verify_state};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::*;

/// One app in a state: its name, agent and port.
#[derive(Clone)]
struct App {
    name: String,
    agent: &'static str,
    port: u16,
}

fn app(name: &str, agent: &'static str, port: u16) -> App {
    App {
        name: name.to_string(),
        agent,
        port,
    }
}

/// A state with an HTTP listener on `port`, agents `a1` (127.0.0.1) and `a2` (127.0.0.2), and
/// each app routed from `<name>.example.com`.
fn state(site: &Site, port: u16, apps: &[App]) -> String {
    let mut s = format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\n  a2: {{ address: 127.0.0.2 }}\nbackends:\n"
    );
    for a in apps {
        s.push_str(&format!(
            "  {}: {{ servers: [ {{ agent: {}, port: {} }} ] }}\n",
            a.name, a.agent, a.port
        ));
    }
    s.push_str("domains:\n");
    for a in apps {
        s.push_str(&format!(
            "  {}.example.com: {{ backend: {} }}\n",
            a.name, a.name
        ));
    }
    s.push_str(&site.target_block(true));
    s
}

/// Applies a state with app shop alone (agent a1) and waits until it serves.
fn serve_shop(site: &Site, port: u16, shop: &Server) {
    site.apply_until_served(
        &state(site, port, &[app("shop", "a1", shop.port)]),
        port,
        "shop.example.com",
        "backend=shop",
    );
}

/// The slot backend that holds `app` in the site's live configuration.
fn slot_of(site: &Site, app: &str) -> String {
    let config = std::fs::read_to_string(site.path().join("live/haproxy.cfg")).unwrap();
    let pools = readback::slot_pools(&config);
    slot_name(BackendMode::Http, pools.http.apps[app])
}

fn backend_of(port: u16, host: &str) -> (u16, String) {
    let (status, body) = http_get(port, host, "/").unwrap();
    (status, body.split(' ').next().unwrap_or("").to_string())
}

/// `show stat` rows as (proxy, server) → fields by column name.
fn stats(site: &Site) -> BTreeMap<(String, String), BTreeMap<String, String>> {
    let text = site
        .runtime()
        .run("show stat", Expect::Any)
        .expect("show stat");
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .trim_start_matches("# ")
        .split(',')
        .map(str::to_string)
        .collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let row: BTreeMap<String, String> = header
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .collect();
            ((row["pxname"].clone(), row["svname"].clone()), row)
        })
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_new_app_on_a_known_or_new_agent_takes_a_free_slot_without_a_reload() {
    let site = Site::new();
    let port = free_port();
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    let wiki = http_backend_everywhere("wiki");
    serve_shop(&site, port, &shop);
    let generation = site.generation();

    // A new app on a known agent: the plan says runtime, and the same worker serves it.
    let apps = [app("shop", "a1", shop.port), app("blog", "a1", blog.port)];
    site.write_state(&state(&site, port, &apps));
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("runtime: add server slot:http:2/blog: a new app takes a free slot"),
        "{plan}"
    );
    assert!(plan.contains("No reload"), "{plan}");
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(
        backend_of(port, "blog.example.com"),
        (200, "backend=blog".into())
    );
    assert_eq!(site.generation(), generation, "a reload happened");
    assert_eq!(slot_of(&site, "blog"), "slot:http:2");

    // A new app on an agent that is new too (agents are no HAProxy objects): still runtime.
    let mut apps = apps.to_vec();
    apps.push(app("wiki", "a2", wiki.port));
    let yaml = state(&site, port, &apps).replace(
        "  a2: { address: 127.0.0.2 }\n",
        "  a2: { address: 127.0.0.2 }\n  a3: { address: 127.0.0.3 }\n",
    );
    site.write_state(&yaml.replace("agent: a2,", "agent: a3,"));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(
        backend_of(port, "wiki.example.com"),
        (200, "backend=wiki".into())
    );
    assert_eq!(site.generation(), generation, "a reload happened");

    // Nothing is left to do: the files hold what the runtime API did.
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 0, "{plan}");
}

/// A redeploy moves an app to another port with `set server … addr … port …`, which HAProxy
/// answers "port changed from A to B"; HAProxy 3.0.11 then still shows port A in `show servers
/// state` for a moment, for about one such change in a hundred under traffic (up to ~2 ms).
/// The apply's read-back took that for a refused change and reloaded instead: the unchanged
/// agent's redeploy reloaded HAProxy in CI. Many port changes in a row under traffic, each
/// executed and read back as an apply does: every one must verify.
#[test]
fn a_port_change_haproxy_answered_verifies_while_its_state_dump_lags_not_reloaded() {
    let site = Site::new();
    let port = free_port();
    let (v1, v2) = (http_backend("v1"), http_backend("v2"));
    site.apply_until_served(
        &state(&site, port, &[app("shop", "a1", v1.port)]),
        port,
        "shop.example.com",
        "backend=v1",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = http_get(port, "shop.example.com", "/");
                }
            })
        })
        .collect();
    let options = RenderOptions::for_target(None);
    let mut expected = RuntimeState::from_files(&site.live_files(), &options);
    let backend = slot_of(&site, "shop");
    let api = site.runtime();
    let mut refused = Vec::new();
    for i in 0..600 {
        let op = Op::SetAddr {
            backend: backend.clone(),
            name: "shop".into(),
            addr: "127.0.0.1".parse().unwrap(),
            port: if i % 2 == 0 { v2.port } else { v1.port },
        };
        execute(&api, std::slice::from_ref(&op)).unwrap();
        op.apply_to(&mut expected);
        if let Err(e) = verify_state(&api, &expected, Scope::TouchedBy(std::slice::from_ref(&op))) {
            refused.push(format!("change {i}: {e}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in traffic {
        t.join().unwrap();
    }
    assert!(
        refused.is_empty(),
        "{} of 600 port changes HAProxy took were read back as refused: {refused:#?}",
        refused.len()
    );
}

#[test]
fn a_full_slot_pool_grows_with_one_reload_that_the_plan_explains() {
    let site = Site::new();
    let port = free_port();
    let upstream = http_backend("many");
    let apps = |n: usize| -> Vec<App> {
        (0..n)
            .map(|i| app(&format!("app{i:02}"), "a1", upstream.port))
            .collect()
    };
    // One app: a pool of 32 slots.
    site.apply_until_served(
        &state(&site, port, &apps(1)),
        port,
        "app00.example.com",
        "backend=many",
    );
    let (reloads, workers) = site.generation();

    // 31 more fill the pool, at runtime.
    site.write_state(&state(&site, port, &apps(32)));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(site.generation(), (reloads, workers.clone()));

    // The 33rd finds no free slot: one reload grows the pool, and the plan says why.
    site.write_state(&state(&site, port, &apps(33)));
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("~ global slots.http: 32 → 64 slots for 33 app(s)"),
        "{plan}"
    );
    assert!(
        plan.contains("no free http slot was left for every new app: the pool grows from 32 to 64 slots with a reload"),
        "{plan}"
    );
    let out = site.apply();
    assert!(out.contains("reload"), "{out}");
    let (after, new_workers) = site.generation();
    assert_eq!(after, reloads + 1, "exactly one reload");
    assert_ne!(new_workers, workers);
    for i in 0..33 {
        assert_eq!(
            backend_of(port, &format!("app{i:02}.example.com")),
            (200, "backend=many".into()),
            "app{i:02}"
        );
    }
    // The apps that were there kept their slots; the new one took slot 33.
    assert_eq!(slot_of(&site, "app00"), "slot:http:1");
    assert_eq!(slot_of(&site, "app31"), "slot:http:32");
    assert_eq!(slot_of(&site, "app32"), "slot:http:33");
    // And the grown pool takes the next app at runtime again.
    site.write_state(&state(&site, port, &apps(34)));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(site.generation().0, reloads + 1);

    // Drift checks read every slot's servers in one `show servers state` dump: they see a
    // hand change of one app's server among the 34.
    let files = site.live_files();
    let options = RenderOptions::for_target(None);
    let check = || verify(&site.runtime(), &files, &options, Scope::Servers);
    check().unwrap();
    let slot = slot_of(&site, "app17");
    site.runtime()
        .run(&format!("set server {slot}/app17 weight 9"), Expect::Empty)
        .unwrap();
    let drift = check().unwrap_err();
    assert!(drift.contains(&format!("backend {slot}:")), "{drift}");
}

#[test]
fn removing_an_app_frees_its_slot_at_runtime_and_a_later_app_takes_it() {
    let site = Site::new();
    let port = free_port();
    let (shop, blog, cart) = (
        http_backend("shop"),
        http_backend("blog"),
        http_backend("cart"),
    );
    site.apply_until_served(
        &state(
            &site,
            port,
            &[app("blog", "a1", blog.port), app("shop", "a1", shop.port)],
        ),
        port,
        "shop.example.com",
        "backend=shop",
    );
    assert_eq!(slot_of(&site, "shop"), "slot:http:2");
    let generation = site.generation();

    site.write_state(&state(&site, port, &[app("blog", "a1", blog.port)]));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(backend_of(port, "shop.example.com").0, 404);
    let servers = site
        .runtime()
        .run("show servers state slot:http:2", Expect::Any)
        .unwrap();
    assert!(!servers.contains(" shop "), "{servers}");
    assert_eq!(site.generation(), generation);

    // The next app takes the freed slot, still at runtime.
    site.write_state(&state(
        &site,
        port,
        &[app("blog", "a1", blog.port), app("cart", "a1", cart.port)],
    ));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(slot_of(&site, "cart"), "slot:http:2");
    assert_eq!(
        backend_of(port, "cart.example.com"),
        (200, "backend=cart".into())
    );
    assert_eq!(
        backend_of(port, "blog.example.com"),
        (200, "backend=blog".into())
    );
    assert_eq!(site.generation(), generation);
}

#[test]
fn health_checks_weights_and_maintenance_work_on_slotted_apps() {
    let site = Site::new();
    let port = free_port();
    let shop = http_backend("shop");
    let blog = http_backend("blog");
    serve_shop(&site, port, &shop);
    let generation = site.generation();

    // An app with a health check, added at runtime: `add server … check` + `enable health`.
    let with_blog = |server: &str| {
        state(&site, port, &[app("shop", "a1", shop.port)]).replace(
            "domains:\n",
            &format!(
                "  blog: {{ servers: [ {server} ], health_check: {{ interval: 200ms, rise: 1, fall: 1 }} }}\ndomains:\n  blog.example.com: {{ backend: blog }}\n"
            ),
        )
    };
    let server = |extra: &str| format!("{{ agent: a1, port: {}{extra} }}", blog.port);
    site.write_state(&with_blog(&server("")));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(site.generation(), generation);
    let slot = slot_of(&site, "blog");
    wait_until("the check to pass", Duration::from_secs(10), || {
        stats(&site)
            .get(&(slot.clone(), "blog".into()))
            .is_some_and(|r| r["status"] == "UP" && r["check_status"] == "L4OK")
    });
    assert_eq!(
        backend_of(port, "blog.example.com"),
        (200, "backend=blog".into())
    );

    // Weight: `set server weight`, at runtime.
    site.write_state(&with_blog(&server(", weight: 40")));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    let state_line = site
        .runtime()
        .run(&format!("show servers state {slot}"), Expect::Any)
        .unwrap();
    let fields: Vec<&str> = state_line
        .lines()
        .find(|l| l.contains(" blog "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(fields[7], "40", "{state_line}");
    assert_eq!(backend_of(port, "blog.example.com").0, 200);

    // Maintenance: out of rotation (503 from HAProxy, never another app), then back.
    site.write_state(&with_blog(&server(", maintenance: true")));
    let out = site.apply();
    assert!(out.contains("through the runtime API"), "{out}");
    assert_eq!(backend_of(port, "blog.example.com").0, 503);
    site.write_state(&with_blog(&server("")));
    site.apply();
    wait_until("blog back in rotation", Duration::from_secs(10), || {
        backend_of(port, "blog.example.com") == (200, "backend=blog".into())
    });
    assert_eq!(site.generation(), generation, "a reload happened");

    // The check notices the app going away: DOWN, and HAProxy answers 503 for it alone.
    drop(blog);
    wait_until("the check to fail", Duration::from_secs(10), || {
        stats(&site)
            .get(&(slot.clone(), "blog".into()))
            .is_some_and(|r| r["status"] == "DOWN")
    });
    assert_eq!(backend_of(port, "blog.example.com").0, 503);
    assert_eq!(
        backend_of(port, "shop.example.com"),
        (200, "backend=shop".into())
    );
}

#[test]
fn statistics_are_per_app() {
    let site = Site::new();
    let port = free_port();
    let upstream = http_backend("any");
    let apps = [
        app("one", "a1", upstream.port),
        app("two", "a1", upstream.port),
        app("three", "a1", upstream.port),
    ];
    site.apply_until_served(
        &state(&site, port, &apps),
        port,
        "one.example.com",
        "backend=any",
    );
    for _ in 0..2 {
        assert_eq!(backend_of(port, "one.example.com").0, 200);
    }
    for _ in 0..4 {
        assert_eq!(backend_of(port, "two.example.com").0, 200);
    }
    // One more request on `one` above came from wait_for_route: 3 in all.
    let stats = stats(&site);
    let sessions = |name: &str| -> (u64, u64) {
        let slot = slot_of(&site, name);
        let server = &stats[&(slot.clone(), name.to_string())];
        let backend = &stats[&(slot, "BACKEND".to_string())];
        (
            server["stot"].parse().unwrap(),
            backend["stot"].parse().unwrap(),
        )
    };
    assert_eq!(sessions("one"), (3, 3));
    assert_eq!(sessions("two"), (4, 4));
    assert_eq!(sessions("three"), (0, 0));
}

#[test]
fn a_rollback_that_hands_a_slot_to_another_app_reloads_so_no_request_crosses_over() {
    let site = Site::new();
    let port = free_port();
    let (shop, blog) = (http_backend("shop"), http_backend("blog"));
    serve_shop(&site, port, &shop);
    // shop leaves slot 1; later blog takes it (a later change may reuse a freed slot).
    site.write_state(&state(&site, port, &[]));
    site.apply();
    site.write_state(&state(&site, port, &[app("blog", "a1", blog.port)]));
    site.apply();
    assert_eq!(slot_of(&site, "blog"), "slot:http:1");
    let (reloads, _) = site.generation();

    // Back two applies: slot 1 goes from blog to shop in one step. At runtime shop's route
    // could point at the slot while blog's server is still in it: lunafront reloads instead.
    let (code, out, err) =
        site.lunafront(&["rollback", "state.yaml", "--steps", "2", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "reload: slot:http:1 passes from app blog to app shop: a reload switches both at once"
        ),
        "{out}"
    );
    assert_eq!(site.generation().0, reloads + 1);
    assert_eq!(
        backend_of(port, "shop.example.com"),
        (200, "backend=shop".into())
    );
    assert_eq!(backend_of(port, "blog.example.com").0, 404);
}

// ---- Pure: the layout itself. ----

fn model(yaml: &str) -> Model {
    let source = Source::parse(vec![SourceFile::new("state.yaml".into(), yaml.to_string())]);
    let v = validate(&source);
    v.model.unwrap_or_else(|| panic!("{:#?}", v.diagnostics))
}

/// The regression of issue 13: apps of one agent lived in one pool backend and were picked by
/// a dynamic `use-server`, which HAProxy resolves by walking the pool's server list (10k apps
/// on one agent served 0.27× the requests of one backend per app). Each domain must now name a
/// backend that holds its app's server alone.
#[test]
fn a_request_finds_its_app_without_walking_the_agents_server_list() {
    let mut yaml = "version: 1\nlisteners:\n  http: { bind: \":80\" }\nagents:\n  a1: { address: 10.0.0.1 }\nbackends:\n".to_string();
    for i in 0..1000 {
        yaml.push_str(&format!(
            "  app{i}: {{ servers: [ {{ agent: a1, port: {} }} ] }}\n",
            10_000 + i
        ));
    }
    yaml.push_str("domains:\n");
    for i in 0..1000 {
        yaml.push_str(&format!("  app{i}.example.com: {{ backend: app{i} }}\n"));
    }
    let rendered = render(&model(&yaml), &RenderOptions::for_target(None)).unwrap();
    assert!(
        !rendered.config.contains("use-server"),
        "a server is picked by name"
    );
    let servers = readback::parse_servers(&rendered.config);
    let mut per_backend: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (backend, server) in servers.keys() {
        per_backend.entry(backend).or_default().push(server);
    }
    for (host, backend) in &rendered.maps["hosts.map"] {
        let app = host.trim_end_matches(".example.com");
        assert_eq!(
            per_backend.get(backend.as_str()),
            Some(&vec![app]),
            "{host} → {backend}"
        );
    }
}

/// xorshift64*: a fixed sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Any history of changes, each rendered onto what the target holds: the plan's promise
/// (runtime or reload) is what the runtime operations can do, the operations replayed reach
/// the new files' runtime state, and rendering the same state again changes nothing (what a
/// full compile of that state onto those files gives is exactly what the target holds).
#[test]
fn any_history_of_changes_renders_what_the_runtime_operations_did() {
    let options = RenderOptions::for_target(None);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // App i: present or not, its agent, its port.
    let mut apps: BTreeMap<usize, (usize, u16)> = BTreeMap::new();
    let state = |apps: &BTreeMap<usize, (usize, u16)>| {
        let mut s = "version: 1\nlisteners:\n  http: { bind: \":80\" }\n  db: { bind: \":27017\", tls: passthrough }\nagents:\n  a0: { address: 10.0.0.1 }\n  a1: { address: 10.0.0.2 }\n  a2: { address: 10.0.0.3 }\nbackends:\n".to_string();
        for (i, (agent, port)) in apps {
            s.push_str(&format!(
                "  app{i}: {{ servers: [ {{ agent: a{agent}, port: {port} }} ] }}\n"
            ));
        }
        s.push_str("domains:\n");
        for i in apps.keys() {
            // Every fifth app is a MongoDB (TCP) one.
            let listener = if i % 5 == 0 { ", listener: db" } else { "" };
            s.push_str(&format!(
                "  app{i}.example.com: {{ backend: app{i}{listener} }}\n"
            ));
        }
        s
    };
    let mut live = Live::default();
    let mut previous: Option<Model> = None;
    let (mut runtime, mut reloads) = (0, 0);
    for step in 0..120 {
        let burst = rng.below(10) == 0;
        for _ in 0..if burst { 25 } else { 1 + rng.below(3) } {
            let i = rng.below(80) as usize;
            match rng.below(4) {
                0 | 1 => {
                    apps.insert(i, (rng.below(3) as usize, 9000 + rng.below(50) as u16));
                }
                2 => {
                    apps.remove(&i);
                }
                _ => {
                    if let Some(a) = apps.get_mut(&i) {
                        a.0 = rng.below(3) as usize;
                    }
                }
            }
        }
        let model = model(&state(&apps));
        let rendered = render_onto(&model, &options, &live.slot_pools("haproxy.cfg")).unwrap();
        let plan = make_plan("t", &model, &rendered, &live);
        let claimed = plan.changes.iter().any(|c| c.mode == Mode::Reload);
        let new_files = rendered.file_map();
        assert_eq!(
            claimed,
            plan.reload_required(),
            "step {step}: the changes claim reload={claimed}: {:#?}",
            plan.changes
        );
        if let Some(_old) = &previous {
            // The plan's own operations, replayed, give the new state (what the target runs).
            match &plan.execution {
                Execution::Runtime { ops } => {
                    assert!(!plan.reload_required(), "step {step}: plan says reload");
                    let mut state = RuntimeState::from_files(&live.files, &options);
                    for op in ops {
                        op.apply_to(&mut state);
                    }
                    assert_eq!(
                        state,
                        RuntimeState::from_files(&new_files, &options),
                        "step {step}"
                    );
                    runtime += 1;
                }
                Execution::Reload { reasons } => {
                    assert!(
                        plan_ops(&live.files, &new_files, &options).is_err(),
                        "step {step}: the plan reloads ({reasons:?}) where the runtime could"
                    );
                    reloads += 1;
                }
            }
        }
        // The state rendered again onto what it left: the same bytes, an empty plan.
        let again = render_onto(&model, &options, &readback::slot_pools(&rendered.config)).unwrap();
        assert_eq!(again.file_map(), new_files, "step {step}");
        live = Live {
            files: new_files,
            previous: Some(std::sync::Arc::new(model.clone())),
            recorded_files: BTreeMap::new(),
            previous_error: None,
            version: None,
            interrupted: None,
        };
        previous = Some(model);
    }
    assert!(
        runtime > 50 && reloads > 0,
        "runtime {runtime}, reloads {reloads}"
    );
}
