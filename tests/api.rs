//! The agent API over HTTP against a running daemon and a real HAProxy: the deployment agent's
//! whole flow with real traffic, 50 agents at once, and the security rules one by one.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const ADMIN: &str = "admin-token-0123456789-abcdefghijklmnop";

struct Front {
    site: Site,
    daemon: Daemon,
    api: u16,
    http: u16,
    mongodb: u16,
    /// The next loopback address to register an agent at (an address belongs to one agent).
    next_ip: std::cell::Cell<u8>,
}

/// Writes a state with these `listeners` (YAML lines), the API settings (agents allowed on
/// loopback, plus `extra_api`) and the admin token, and starts the daemon serving the API on
/// `api`.
fn start_daemon(site: &Site, listeners: &str, extra_api: &str, api: u16) -> Daemon {
    write(
        site.path(),
        "state/base.yaml",
        &format!(
            "version: 1\nlisteners:\n{listeners}api:\n  apps_domain: apps.example.com\n  mongodb_domain: mongodb.example.com\n  allowed_networks: [ \"127.0.0.0/8\" ]\n{extra_api}{}",
            site.folder_target_block("daemon")
        ),
    );
    write(site.path(), "admin.token", ADMIN);
    api_daemon(site, api)
}

/// The daemon on the site's state folder, serving the API on `api` with the admin token.
fn api_daemon(site: &Site, api: u16) -> Daemon {
    Daemon::start(
        site.path(),
        "state",
        &[
            "--api",
            &format!("127.0.0.1:{api}"),
            "--admin-token-file",
            "admin.token",
        ],
    )
}

impl Front {
    /// A front with HTTP and MongoDB (passthrough) listeners, the API, and agents allowed on
    /// loopback. `extra` is added to the `api:` settings.
    fn start(extra_api: &str) -> Front {
        let site = Site::new();
        let (http, mongodb, api) = (free_port(), free_port(), free_port());
        let daemon = start_daemon(
            &site,
            &format!(
                "  http: {{ bind: \"127.0.0.1:{http}\" }}\n  mongodb: {{ bind: \"127.0.0.1:{mongodb}\", tls: passthrough }}\n"
            ),
            extra_api,
            api,
        );
        assert!(
            wait_for_port(api, Duration::from_secs(20)),
            "the API did not listen: {}",
            daemon.log_text()
        );
        daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
        Front {
            site,
            daemon,
            api,
            http,
            mongodb,
            next_ip: std::cell::Cell::new(1),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (status, text) = http_json(self.api, method, path, token, body.as_ref());
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// `lunafront agent enroll NAME`: the one-time token the agent registers with.
    fn enroll(&self, agent: &str) -> String {
        let (code, stdout, stderr) = run(
            &["agent", "enroll", agent, "state", "--target", "local"],
            self.site.path(),
        );
        assert_eq!(code, 0, "{stderr}");
        stdout.trim().to_string()
    }

    /// Enrolls and registers an agent at its own loopback address; returns its token.
    fn register(&self, agent: &str) -> String {
        let key = self.enroll(agent);
        let ip = format!("127.0.3.{}", self.next_ip.get());
        self.next_ip.set(self.next_ip.get() + 1);
        let (status, body) = self.call(
            "POST",
            "/api/agent/register",
            None,
            Some(json!({"agentId": agent, "agentKey": key, "agentName": agent, "targetIp": ip})),
        );
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_string()
    }
}

#[test]
fn the_deployment_agents_flow_end_to_end_with_real_traffic() {
    let front = Front::start("");
    let key = front.enroll("agent-1");

    // Register → token and certificates.
    let (status, body) = front.call(
        "POST",
        "/api/agent/register",
        None,
        Some(json!({"agentId": "agent-1", "agentKey": key, "agentName": "vps-1", "targetIp": "127.0.0.1"})),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["agentId"], "agent-1");
    assert_eq!(body["targetIp"], "127.0.0.1");
    let token = body["token"].as_str().unwrap().to_string();
    for part in ["caCert", "serverCert", "serverKey"] {
        assert!(
            body["certificates"][part]
                .as_str()
                .unwrap()
                .contains("-----BEGIN"),
            "{part}: {body}"
        );
    }
    // Registering again with the same key is idempotent: a new token, the same state.
    let (status, again) = front.call("POST", "/api/agents/register", None, Some(json!({"agentId": "agent-1", "agentKey": key, "agentName": "vps-1", "targetIp": "127.0.0.1"})));
    assert_eq!(status, 201, "{again}");
    assert_ne!(again["token"], body["token"]);
    let (status, auth) = front.call(
        "POST",
        "/api/agents/authenticate",
        None,
        Some(json!({"agentId": "agent-1", "agentKey": key})),
    );
    assert_eq!(
        (status, auth["success"].clone()),
        (200, json!(true)),
        "{auth}"
    );

    // Config and certificates.
    let (status, config) = front.call("GET", "/api/config/agent-1", Some(&token), None);
    assert_eq!(status, 200, "{config}");
    assert_eq!(
        config["domains"],
        json!({"app": "apps.example.com", "mongodb": "mongodb.example.com"})
    );
    assert_eq!(
        config["certificates"]["serverCert"], body["certificates"]["serverCert"],
        "a valid certificate is kept"
    );
    let (status, ca) = http_json(front.api, "GET", "/api/certificates/mongodb-ca", None, None);
    assert_eq!(status, 200);
    assert_eq!(ca, body["certificates"]["caCert"].as_str().unwrap());

    // An HTTP route, live when the call returns.
    let app = http_backend("shop-app");
    let (status, route) = front.call(
        "POST",
        "/api/proxy/http",
        Some(&token),
        Some(json!({"agentId": "agent-1", "subdomain": "shop", "targetUrl": format!("http://127.0.0.1:{}", app.port), "options": {"useTls": false, "check": true}})),
    );
    assert_eq!(status, 200, "{route}");
    assert_eq!(route["domain"], "shop.apps.example.com");
    let (status, served) = http_get(front.http, "shop.apps.example.com", "/").unwrap();
    assert_eq!(status, 200);
    assert!(served.starts_with("backend=shop-app "), "{served}");

    // Listing.
    let (_, routes) = front.call("GET", "/api/proxy/routes", Some(&token), None);
    assert_eq!(
        routes["routes"][0]["domain"], "shop.apps.example.com",
        "{routes}"
    );
    assert_eq!(routes["routes"][0]["type"], "http");
    assert_eq!(
        routes["routes"][0]["targetUrl"],
        format!("http://127.0.0.1:{}", app.port)
    );
    let (_, same) = front.call("GET", "/api/proxy/agents/agent-1", Some(&token), None);
    assert_eq!(same["routes"], routes["routes"]);

    // MongoDB: routed by SNI through the passthrough listener to the agent's TLS mongod.
    let ca_test = TestCa::new();
    let mongod = tls_backend("mongod", &ca_test.leaf(&["agent-1.mongodb.example.com"]));
    let (status, mongo) = front.call(
        "POST",
        "/api/mongodb/register",
        Some(&token),
        Some(json!({"agentId": "agent-1", "targetIp": "127.0.0.1", "targetPort": mongod.port, "useTls": true})),
    );
    assert_eq!(status, 200, "{mongo}");
    assert_eq!(mongo["domain"], "agent-1.mongodb.example.com");
    let connection = mongo["connectionString"].as_str().unwrap();
    assert!(
        connection.starts_with("mongodb://agent-1.mongodb.example.com:")
            && connection.contains("tls=true"),
        "{connection}"
    );
    assert!(
        !connection.to_lowercase().contains("invalid"),
        "the connection string accepts invalid certificates: {connection}"
    );
    let reply = tls_exchange(
        &ca_test,
        front.mongodb,
        "agent-1.mongodb.example.com",
        "ping",
    )
    .unwrap();
    assert_eq!(
        reply,
        "tls-backend=mongod sni=agent-1.mongodb.example.com got=ping"
    );

    // Delete the HTTP route.
    let (status, deleted) = front.call(
        "DELETE",
        "/api/proxy",
        Some(&token),
        Some(json!({"agentId": "agent-1", "subdomain": "shop", "type": "http"})),
    );
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(
        http_get(front.http, "shop.apps.example.com", "/")
            .unwrap()
            .0,
        404
    );

    // Everything is in the state folder: a restarted daemon serves the same, tokens still work.
    let text =
        std::fs::read_to_string(front.site.path().join("state/agents.d/agent-1.yaml")).unwrap();
    assert!(
        text.contains("agent-1.mongodb.example.com") && !text.contains(&key),
        "{text}"
    );
    let Front {
        site,
        mut daemon,
        api,
        mongodb,
        ..
    } = front;
    daemon.stop();
    let daemon = api_daemon(&site, api);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert!(wait_for_port(api, Duration::from_secs(10)));
    let reply = tls_exchange(&ca_test, mongodb, "agent-1.mongodb.example.com", "again").unwrap();
    assert!(reply.ends_with("got=again"), "{reply}");
    let (status, routes) = http_json(api, "GET", "/api/proxy/routes", Some(&token), None);
    assert_eq!(status, 200, "{routes}");
    assert!(routes.contains("agent-1.mongodb.example.com"), "{routes}");
}

#[test]
fn fifty_agents_registering_and_adding_routes_at_once_all_go_live() {
    let front = Front::start("");
    let app = http_backend_everywhere("app");
    // Enrollment first (the admin's step), then every agent at once.
    let keys: Vec<(String, String)> = (0..50)
        .map(|i| {
            let agent = format!("agent-{i}");
            let key = front.enroll(&agent);
            (agent, key)
        })
        .collect();
    let api = front.api;
    let port = app.port;
    let workers: Vec<_> = keys
        .into_iter()
        .enumerate()
        .map(|(i, (agent, key))| {
            std::thread::spawn(move || {
                // Each agent on its own loopback address: an address belongs to one agent.
                // and its own client: the rate limit is per client address.
                let ip = format!("127.0.1.{}", i + 1);
                let source: std::net::IpAddr = ip.parse().unwrap();
                let (status, body) = http_json_from(source, api, "POST", "/api/agent/register", None, Some(&json!({"agentId": agent, "agentKey": key, "agentName": agent, "targetIp": ip})));
                assert_eq!(status, 201, "{agent}: {body}");
                let token = serde_json::from_str::<Value>(&body).unwrap()["token"].as_str().unwrap().to_string();
                let (status, body) = http_json_from(
                    source,
                    api,
                    "POST",
                    "/api/proxy/http",
                    Some(&token),
                    Some(&json!({"agentId": agent, "subdomain": format!("app{i}"), "targetUrl": format!("http://127.0.0.1:{port}")})),
                );
                assert_eq!(status, 200, "{agent}: {body}");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Every route is live (at its agent's own address) and every fragment whole.
    for i in 0..50 {
        let (status, body) =
            http_get(front.http, &format!("app{i}.apps.example.com"), "/").unwrap();
        assert_eq!(
            (status, body.starts_with("backend=app ")),
            (200, true),
            "app{i}: {body}"
        );
        let fragment = std::fs::read_to_string(
            front
                .site
                .path()
                .join(format!("state/agents.d/agent-{i}.yaml")),
        )
        .unwrap();
        let parsed: Value = serde_yaml::from_str(&fragment).unwrap();
        assert_eq!(
            parsed["domains"][format!("app{i}.apps.example.com")]["owner"],
            format!("agent-{i}")
        );
        assert_eq!(
            parsed["agents"][format!("agent-{i}")]["address"],
            format!("127.0.1.{}", i + 1)
        );
    }
    let (_, plan, _) = front
        .site
        .lunafront(&["plan", "state", "--detailed-exitcode"]);
    assert!(plan.contains("No changes"), "{plan}");
}

#[test]
fn registration_needs_a_key_the_state_knows_and_enrollment_is_one_time() {
    let front = Front::start("");
    // Unknown agent, made-up key.
    let (status, body) = front.call("POST", "/api/agent/register", None, Some(json!({"agentId": "intruder", "agentKey": "0123456789abcdef0123", "agentName": "x", "targetIp": "127.0.0.1"})));
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["success"], false);
    // A key declared (hashed) in the state by the administrator.
    let key = "declared-key-0123456789";
    let hash = lunafront::api::auth::hash_secret(key);
    write(
        front.site.path(),
        "state/admin-agents.yaml",
        &format!("agents:\n  declared: {{ address: 127.0.0.5, key_sha256: {hash} }}\n"),
    );
    front
        .daemon
        .wait_for("/status", 200, "declared", Duration::from_secs(5));
    let (status, body) = front.call("POST", "/api/agent/register", None, Some(json!({"agentId": "declared", "agentKey": key, "agentName": "d", "targetIp": "127.0.0.5"})));
    assert_eq!(status, 201, "{body}");
    let (status, _) = front.call("POST", "/api/agent/register", None, Some(json!({"agentId": "declared", "agentKey": "wrong-key-0123456789", "agentName": "d", "targetIp": "127.0.0.5"})));
    assert_eq!(status, 401);
    // An enrollment token works once.
    let token = front.enroll("agent-e");
    let register = |ip: &str| {
        front.call(
            "POST",
            "/api/agent/register",
            None,
            Some(
                json!({"agentId": "agent-e", "agentKey": token, "agentName": "e", "targetIp": ip}),
            ),
        )
    };
    assert_eq!(register("127.0.0.6").0, 201);
    // The enrollment token became the agent's key: registering again with it still works
    // (idempotent), but a second enrollment of it does not create a new identity.
    assert_eq!(register("127.0.0.6").0, 201);
    let other = front.enroll("agent-f");
    let (status, _) = front.call("POST", "/api/agent/register", None, Some(json!({"agentId": "agent-g", "agentKey": other, "agentName": "g", "targetIp": "127.0.0.7"})));
    assert_eq!(status, 401, "an enrollment is for its agent only");
    // Keys and tokens are stored hashed, nowhere in clear.
    let tokens = std::fs::read_to_string(front.site.path().join("daemon/api/tokens.json")).unwrap();
    let fragment =
        std::fs::read_to_string(front.site.path().join("state/agents.d/agent-e.yaml")).unwrap();
    assert!(!tokens.contains(&token) && !fragment.contains(&token));
    assert!(fragment.contains(&lunafront::api::auth::hash_secret(&token)));
}

#[test]
fn tokens_expire_and_can_be_revoked() {
    let front = Front::start("  token_ttl: 2s\n");
    let token = front.register("agent-1");
    assert_eq!(
        front
            .call("GET", "/api/config/agent-1", Some(&token), None)
            .0,
        200
    );
    std::thread::sleep(Duration::from_millis(2500));
    let (status, body) = front.call("GET", "/api/config/agent-1", Some(&token), None);
    assert_eq!(status, 401, "{body}");

    let front = Front::start("");
    let token = front.register("agent-2");
    assert_eq!(
        front
            .call("GET", "/api/config/agent-2", Some(&token), None)
            .0,
        200
    );
    let (code, out, _) = run(
        &["agent", "revoke", "agent-2", "state", "--target", "local"],
        front.site.path(),
    );
    assert_eq!(code, 0);
    assert!(out.contains("Revoked"), "{out}");
    assert_eq!(
        front
            .call("GET", "/api/config/agent-2", Some(&token), None)
            .0,
        401
    );
    // Revocation through the admin API too.
    let token = {
        let (status, body) = front.call("POST", "/v1/agents/agent-2/enroll", Some(ADMIN), None);
        assert_eq!(status, 201, "{body}");
        let key = body["enrollmentToken"].as_str().unwrap().to_string();
        // A re-enrollment after the revocation lets agent-2 in again, with a new key.
        let (status, body) = front.call("POST", "/api/agent/register", None, Some(json!({"agentId": "agent-2", "agentKey": key, "agentName": "x", "targetIp": "127.0.3.1"})));
        assert_eq!(status, 201, "{body}");
        front.register("agent-3")
    };
    assert_eq!(
        front
            .call("POST", "/v1/agents/agent-3/revoke", Some(ADMIN), None)
            .0,
        200
    );
    assert_eq!(
        front
            .call("GET", "/api/config/agent-3", Some(&token), None)
            .0,
        401
    );
}

#[test]
fn no_agent_can_touch_another_agents_things() {
    let front = Front::start("");
    let a = front.register("agent-a");
    let b = {
        let key = front.enroll("agent-b");
        let (status, body) = front.call("POST", "/api/agent/register", None, Some(json!({"agentId": "agent-b", "agentKey": key, "agentName": "b", "targetIp": "127.0.0.2"})));
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_string()
    };
    let (status, _) = front.call("POST", "/api/proxy/http", Some(&b), Some(json!({"agentId": "agent-b", "subdomain": "bshop", "targetUrl": "http://127.0.0.1:3000"})));
    assert_eq!(status, 200);

    // A's token on B's things: config, routes, create as B, delete B's route, MongoDB as B.
    assert_eq!(
        front.call("GET", "/api/config/agent-b", Some(&a), None).0,
        403
    );
    assert_eq!(
        front
            .call("GET", "/api/proxy/agents/agent-b", Some(&a), None)
            .0,
        403
    );
    assert_eq!(
        front
            .call("GET", "/v1/agents/agent-b/routes", Some(&a), None)
            .0,
        403
    );
    let (status, body) = front.call("POST", "/api/proxy/http", Some(&a), Some(json!({"agentId": "agent-b", "subdomain": "evil", "targetUrl": "http://127.0.0.1:3000"})));
    assert_eq!(
        status, 403,
        "the agentId in the body must match the token: {body}"
    );
    assert_eq!(
        front
            .call(
                "DELETE",
                "/api/proxy",
                Some(&a),
                Some(json!({"agentId": "agent-b", "subdomain": "bshop", "type": "http"}))
            )
            .0,
        403
    );
    assert_eq!(
        front
            .call(
                "DELETE",
                "/api/proxy",
                Some(&a),
                Some(json!({"agentId": "agent-a", "subdomain": "bshop", "type": "http"}))
            )
            .0,
        403
    );
    assert_eq!(front.call("POST", "/api/mongodb/register", Some(&a), Some(json!({"agentId": "agent-b", "targetIp": "127.0.0.2", "targetPort": 27017, "useTls": true}))).0, 403);
    // B's subdomain cannot be taken by A.
    let (status, body) = front.call("POST", "/api/proxy/http", Some(&a), Some(json!({"agentId": "agent-a", "subdomain": "bshop", "targetUrl": "http://127.0.0.1:3000"})));
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("agent `agent-b`"),
        "{body}"
    );
    // Nor B's address.
    let key = front.enroll("agent-c");
    let (status, _) = front.call("POST", "/api/agent/register", None, Some(json!({"agentId": "agent-c", "agentKey": key, "agentName": "c", "targetIp": "127.0.0.2"})));
    assert_eq!(status, 409);
    // A's own listing does not show B's route; B's route still serves.
    let (_, routes) = front.call("GET", "/api/proxy/routes", Some(&a), None);
    assert_eq!(routes["routes"], json!([]), "{routes}");
    let (_, routes) = front.call("GET", "/api/proxy/routes", Some(&b), None);
    assert_eq!(routes["routes"][0]["subdomain"], "bshop");
}

#[test]
fn admin_endpoints_need_the_admin_token_and_refuse_agents() {
    let front = Front::start("");
    let agent = front.register("agent-1");
    for (method, path) in [
        ("GET", "/api/proxy"),
        ("GET", "/v1/agents"),
        ("GET", "/v1/domains"),
        ("GET", "/v1/plan"),
        ("GET", "/v1/status"),
    ] {
        assert_eq!(
            front.call(method, path, Some(&agent), None).0,
            403,
            "{path} with an agent token"
        );
        assert_eq!(
            front.call(method, path, None, None).0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            front
                .call(method, path, Some("not-the-admin-token-at-all"), None)
                .0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(
            front.call(method, path, Some(ADMIN), None).0,
            200,
            "{path} as admin"
        );
    }
    // Without an admin token configured, nobody is admin.
    let site = Site::new();
    write(
        site.path(),
        "state/base.yaml",
        &format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\" }}\n{}",
            free_port(),
            site.target_block(true)
        ),
    );
    let api = free_port();
    let daemon = Daemon::start(
        site.path(),
        "state",
        &["--api", &format!("127.0.0.1:{api}")],
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert!(wait_for_port(api, Duration::from_secs(10)));
    let (status, body) = http_json(api, "GET", "/v1/agents", Some(ADMIN), None);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no admin token is configured"), "{body}");
}

#[test]
fn hostile_inputs_are_refused_with_every_field_named_and_nothing_written() {
    let front = Front::start("");
    let token = front.register("agent-1");
    let fragment = front.site.path().join("state/agents.d/agent-1.yaml");
    let before = std::fs::read_to_string(&fragment).unwrap();
    for hostile in [
        "a\nb",
        "a b",
        "a#b",
        "x\"y",
        "a\\b",
        "%[src]",
        "${HOME}",
        "shop\u{0430}",
        "a/b",
        &"a".repeat(64),
    ] {
        let (status, body) = front.call(
            "POST",
            "/api/proxy/http",
            Some(&token),
            Some(json!({"agentId": "agent-1", "subdomain": hostile, "targetUrl": format!("http://x:1{hostile}")})),
        );
        assert_eq!(status, 400, "{hostile:?}: {body}");
        assert!(
            body["fields"]["subdomain"].is_string() && body["fields"]["targetUrl"].is_string(),
            "{hostile:?}: {body}"
        );
    }
    // Missing and mistyped fields are all named.
    let (status, body) = front.call(
        "POST",
        "/api/proxy/http",
        Some(&token),
        Some(json!({"agentId": "agent-1", "targetUrl": 5})),
    );
    assert_eq!(status, 400);
    assert_eq!(body["fields"]["subdomain"], "is required", "{body}");
    assert_eq!(body["fields"]["targetUrl"], "must be a string", "{body}");
    let (status, body) = front.call(
        "POST",
        "/api/agent/register",
        None,
        Some(json!({"agentId": "bad id", "agentKey": "short", "targetIp": "10.0.0.1x"})),
    );
    assert_eq!(status, 400, "{body}");
    for f in ["agentId", "agentKey", "targetIp"] {
        assert!(body["fields"][f].is_string(), "{f}: {body}");
    }
    assert_eq!(
        std::fs::read_to_string(&fragment).unwrap(),
        before,
        "a refused request changed the state"
    );
    let cfg = std::fs::read_to_string(front.site.path().join("live/haproxy.cfg")).unwrap();
    assert!(!cfg.contains("evil") && !cfg.contains("%[src]"));
}

#[test]
fn agent_addresses_are_checked_and_never_taken_from_headers() {
    let f = Front::start("");
    let key = f.enroll("agent-1");
    // Private addresses outside the allowed network (127.0.0.0/8) are not recorded: behind
    // NAT the agent sends its private one, and the address its request came from (here
    // 127.0.0.1, allowed) is recorded instead. tests/security.rs has the refusals.
    for ip in [
        "10.0.0.1",
        "192.168.1.1",
        "169.254.0.1",
        "0.0.0.0",
        "::1",
        "fd00::1",
    ] {
        let (status, body) = f.call(
            "POST",
            "/api/agent/register",
            None,
            Some(json!({"agentId": "agent-1", "agentKey": key, "agentName": "a", "targetIp": ip})),
        );
        assert_eq!(status, 201, "{ip}: {body}");
        assert_eq!(body["targetIp"], "127.0.0.1", "{ip}: {body}");
    }
    // X-Forwarded-For is ignored: the address is the one in the body.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", f.api)).unwrap();
    let body =
        json!({"agentId": "agent-1", "agentKey": key, "agentName": "a", "targetIp": "127.0.0.9"})
            .to_string();
    use std::io::{Read, Write};
    write!(stream, "POST /api/agent/register HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.66\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let fragment =
        std::fs::read_to_string(f.site.path().join("state/agents.d/agent-1.yaml")).unwrap();
    assert!(
        fragment.contains("127.0.0.9") && !fragment.contains("203.0.113.66"),
        "{fragment}"
    );
}

#[test]
fn oversized_bodies_floods_and_slow_clients_are_refused() {
    let front = Front::start("");
    // Body size limit.
    let big = json!({"agentId": "a", "agentKey": "k".repeat(100_000), "targetIp": "127.0.0.1"});
    let (status, body) = front.call("POST", "/api/agent/register", None, Some(big));
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["success"], false);
    // Rate limit on registration and authentication, per client address.
    let mut limited = false;
    for _ in 0..15 {
        let (status, _) = front.call(
            "POST",
            "/api/agents/authenticate",
            None,
            Some(json!({"agentId": "nobody", "agentKey": "0123456789abcdef01"})),
        );
        if status == 429 {
            limited = true;
            break;
        }
        assert_eq!(status, 401);
    }
    assert!(limited, "15 attempts in a row were never limited");
    let (status, body) = front.call("POST", "/api/agent/register", None, Some(json!({})));
    assert_eq!(status, 429, "{body}");
    // A client that never finishes its headers is disconnected.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", front.api)).unwrap();
    use std::io::{Read, Write};
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The server closes the connection (an end of file), rather than this client giving up
    // after its 20 s read timeout (an error).
    let mut buf = Vec::new();
    let read = slow.read_to_end(&mut buf);
    assert!(read.is_ok(), "the slow client was held: {read:?}");
}

#[test]
fn api_changes_are_committed_when_the_state_is_a_git_checkout() {
    let front = Front::start("  git_commit: true\n");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(front.site.path().join("state"))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["init", "-q"]);
    git(&[
        "-c",
        "user.name=admin",
        "-c",
        "user.email=admin@example.com",
        "add",
        "-A",
    ]);
    let _ = std::process::Command::new("git")
        .arg("-C")
        .arg(front.site.path().join("state"))
        .args([
            "-c",
            "user.name=admin",
            "-c",
            "user.email=admin@example.com",
            "commit",
            "-q",
            "-m",
            "base",
        ])
        .status();
    let token = front.register("agent-1");
    let (status, _) = front.call("POST", "/api/proxy/http", Some(&token), Some(json!({"agentId": "agent-1", "subdomain": "shop", "targetUrl": "http://127.0.0.1:3000"})));
    assert_eq!(status, 200);
    let log = git(&["log", "--format=%an|%s"]);
    assert!(
        log.contains("agent-1|route shop.apps.example.com to agent agent-1 port 3000"),
        "{log}"
    );
    assert!(
        log.contains("agent-1|register agent agent-1 at 127.0.3.1"),
        "{log}"
    );
    // /status shows the commit the daemon applied.
    let (_, status) = front.daemon.get("/status");
    let head = git(&["rev-parse", "HEAD"]);
    front
        .daemon
        .wait_for("/status", 200, head.trim(), Duration::from_secs(5));
    let _ = status;
}

/// The server against `api/openapi.yaml`: every documented operation is called, and every
/// answer's status is documented for it and its JSON body validates against the documented
/// schema.
#[test]
fn the_server_matches_its_openapi_document() {
    let spec: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml")).unwrap(),
    )
    .unwrap();
    let front = Front::start("");
    let mut exercised = std::collections::BTreeSet::new();
    let mut check = |method: &str,
                     template: &str,
                     path: &str,
                     token: Option<&str>,
                     body: Option<Value>,
                     expect: u16|
     -> Value {
        let (status, text) = http_json(front.api, method, path, token, body.as_ref());
        assert_eq!(status, expect, "{method} {path}: {text}");
        let operation = &spec["paths"][template][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not documented"
        );
        let mut response = operation["responses"][status.to_string()].clone();
        assert!(
            !response.is_null(),
            "{method} {template} answered {status}, which is not documented"
        );
        if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
            response = spec
                .pointer(reference.trim_start_matches('#'))
                .unwrap()
                .clone();
        }
        exercised.insert(format!("{method} {template}"));
        let Some(schema) = response.pointer("/content/application~1json/schema") else {
            return Value::String(text);
        };
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        let wrapped = json!({"$ref": schema.get("$ref").cloned().unwrap_or(json!("#/components/schemas/__inline")), "components": spec["components"]});
        let mut wrapped = wrapped;
        if schema.get("$ref").is_none() {
            wrapped["components"]["schemas"]["__inline"] = schema.clone();
        }
        let validator = jsonschema::validator_for(&wrapped).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path}: the body does not match the document: {errors:?}\n{body}"
        );
        body
    };

    check("GET", "/health", "/health", None, None, 200);
    check(
        "GET",
        "/api/certificates/mongodb-ca",
        "/api/certificates/mongodb-ca",
        None,
        None,
        200,
    );
    let enrollment = check(
        "POST",
        "/v1/agents/{id}/enroll",
        "/v1/agents/agent-x/enroll",
        Some(ADMIN),
        None,
        201,
    );
    let key = enrollment["enrollmentToken"].as_str().unwrap().to_string();
    let register =
        json!({"agentId": "agent-x", "agentKey": key, "agentName": "x", "targetIp": "127.0.4.1"});
    let registered = check(
        "POST",
        "/api/agent/register",
        "/api/agent/register",
        None,
        Some(register.clone()),
        201,
    );
    check(
        "POST",
        "/api/agents/register",
        "/api/agents/register",
        None,
        Some(register),
        201,
    );
    let token = registered["token"].as_str().unwrap().to_string();
    let t = Some(token.as_str());
    check(
        "POST",
        "/api/agents/authenticate",
        "/api/agents/authenticate",
        None,
        Some(json!({"agentId": "agent-x", "agentKey": key})),
        200,
    );
    check(
        "POST",
        "/api/agent/authenticate",
        "/api/agent/authenticate",
        None,
        Some(json!({"serverId": "agent-x", "agentToken": key})),
        200,
    );
    check(
        "GET",
        "/api/config/{agentId}",
        "/api/config/agent-x",
        t,
        None,
        200,
    );
    check(
        "GET",
        "/api/config/{agentId}",
        "/api/config/agent-x",
        None,
        None,
        401,
    );
    check(
        "GET",
        "/api/config/{agentId}",
        "/api/config/nobody",
        Some(ADMIN),
        None,
        404,
    );
    check(
        "POST",
        "/api/proxy/http",
        "/api/proxy/http",
        t,
        Some(json!({"agentId": "agent-x", "subdomain": "x", "targetUrl": "http://127.0.0.1:3000"})),
        200,
    );
    check(
        "POST",
        "/api/proxy/http",
        "/api/proxy/http",
        t,
        Some(json!({"agentId": "agent-x"})),
        400,
    );
    check(
        "GET",
        "/api/proxy/routes",
        "/api/proxy/routes",
        t,
        None,
        200,
    );
    check(
        "GET",
        "/api/proxy/agents/{agentId}",
        "/api/proxy/agents/agent-x",
        t,
        None,
        200,
    );
    check("GET", "/api/proxy", "/api/proxy", Some(ADMIN), None, 200);
    check("GET", "/api/proxy", "/api/proxy", t, None, 403);
    check(
        "POST",
        "/api/mongodb/register",
        "/api/mongodb/register",
        t,
        Some(
            json!({"agentId": "agent-x", "targetIp": "127.0.4.1", "targetPort": 27017, "useTls": true}),
        ),
        200,
    );
    check(
        "POST",
        "/api/proxy/{dbType}",
        "/api/proxy/mongodb",
        t,
        Some(
            json!({"agentId": "agent-x", "targetHost": "127.0.4.1", "targetPort": 27018, "options": {"useTls": true}}),
        ),
        200,
    );
    check(
        "POST",
        "/api/proxy/{dbType}",
        "/api/proxy/redis",
        t,
        Some(json!({"agentId": "agent-x", "targetHost": "127.0.4.1", "targetPort": 6379})),
        422,
    );
    check(
        "DELETE",
        "/api/proxy",
        "/api/proxy",
        t,
        Some(json!({"agentId": "agent-x", "subdomain": "x", "type": "http"})),
        200,
    );
    check("GET", "/v1/agents", "/v1/agents", Some(ADMIN), None, 200);
    check(
        "POST",
        "/v1/agents",
        "/v1/agents",
        Some(ADMIN),
        Some(json!({"id": "agent-y", "address": "127.0.4.2", "key": "agent-y-key-0123456789"})),
        201,
    );
    check(
        "GET",
        "/v1/agents/{id}",
        "/v1/agents/agent-y",
        Some(ADMIN),
        None,
        200,
    );
    check(
        "POST",
        "/v1/agents/{id}/routes",
        "/v1/agents/agent-y/routes",
        Some(ADMIN),
        Some(json!({"subdomain": "y", "port": 3000})),
        201,
    );
    check(
        "GET",
        "/v1/agents/{id}/routes",
        "/v1/agents/agent-y/routes",
        Some(ADMIN),
        None,
        200,
    );
    check(
        "DELETE",
        "/v1/agents/{id}/routes/{domain}",
        "/v1/agents/agent-y/routes/y.apps.example.com",
        Some(ADMIN),
        None,
        200,
    );
    check(
        "POST",
        "/v1/agents/{id}/revoke",
        "/v1/agents/agent-y/revoke",
        Some(ADMIN),
        None,
        200,
    );
    check("GET", "/v1/domains", "/v1/domains", Some(ADMIN), None, 200);
    check("GET", "/v1/plan", "/v1/plan", Some(ADMIN), None, 200);
    check("GET", "/v1/status", "/v1/status", Some(ADMIN), None, 200);
    check(
        "DELETE",
        "/v1/agents/{id}",
        "/v1/agents/agent-y",
        Some(ADMIN),
        None,
        200,
    );

    // Every documented operation was called.
    let documented: std::collections::BTreeSet<String> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|m| *m != "parameters")
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    let missing: Vec<&String> = documented.difference(&exercised).collect();
    assert!(
        missing.is_empty(),
        "documented but never called: {missing:?}"
    );
}

#[test]
fn mongodb_terminated_at_the_front_uses_the_private_ca_per_name_and_csrs_and_renewal_work() {
    let site = Site::new();
    let (mongodb, api) = (free_port(), free_port());
    // The administrator's default certificate for the listener (made by another CA).
    let other = TestCa::new();
    write(
        site.path(),
        "state/certs/default.pem",
        &other.leaf(&["default.mongodb.example.com"]).combined(),
    );
    let daemon = start_daemon(
        &site,
        &format!(
            "  http: {{ bind: \"127.0.0.1:{}\" }}\n  mongodb: {{ bind: \"127.0.0.1:{mongodb}\", tls: terminate, certificates: certs }}\n",
            free_port()
        ),
        "",
        api,
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert!(wait_for_port(api, Duration::from_secs(10)));

    // Register with a CSR: the answer holds a certificate for the agent's name, and no key.
    let (_, enrollment) = http_json(api, "POST", "/v1/agents/agent-1/enroll", Some(ADMIN), None);
    let key = serde_json::from_str::<Value>(&enrollment).unwrap()["enrollmentToken"]
        .as_str()
        .unwrap()
        .to_string();
    let agent_key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["agent-1.mongodb.example.com".to_string()])
        .unwrap()
        .serialize_request(&agent_key)
        .unwrap()
        .pem()
        .unwrap();
    let (status, body) = http_json(
        api,
        "POST",
        "/api/agent/register",
        None,
        Some(
            &json!({"agentId": "agent-1", "agentKey": key, "agentName": "a", "targetIp": "127.0.0.1", "csr": csr}),
        ),
    );
    assert_eq!(status, 201, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["certificates"]["serverKey"].is_null(), "{body}");
    assert!(
        body["certificates"]["serverCert"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let token = body["token"].as_str().unwrap().to_string();
    // A CSR for another agent's name is refused.
    let wrong = rcgen::CertificateParams::new(vec!["agent-2.mongodb.example.com".to_string()])
        .unwrap()
        .serialize_request(&agent_key)
        .unwrap()
        .pem()
        .unwrap();
    let (status, _) = http_json(
        api,
        "POST",
        "/api/agent/register",
        None,
        Some(
            &json!({"agentId": "agent-1", "agentKey": key, "agentName": "a", "targetIp": "127.0.0.1", "csr": wrong}),
        ),
    );
    // A CSR for another name is well formed and not allowed: 403 (one that cannot be read is
    // a 400: tests/api_state_guard.rs).
    assert_eq!(status, 403);

    // MongoDB terminated at the front: HAProxy presents agent-1's certificate from the private
    // CA (added at runtime to the listener's certificate list) and forwards plain TCP.
    let mongod = tcp_backend("mongod");
    let (status, route) = http_json(
        api,
        "POST",
        "/api/mongodb/register",
        Some(&token),
        Some(
            &json!({"agentId": "agent-1", "targetIp": "127.0.0.1", "targetPort": mongod.port, "useTls": false}),
        ),
    );
    assert_eq!(status, 200, "{route}");
    let (_, ca_pem) = http_json(api, "GET", "/api/certificates/mongodb-ca", None, None);
    let reply = tls_exchange_with(
        client_config_trusting(&ca_pem),
        mongodb,
        "agent-1.mongodb.example.com",
        "hello",
    )
    .unwrap();
    assert_eq!(reply, "tcp-backend=mongod got=hello");

    // A certificate near its end is renewed, and the new one served on the next config call.
    let (_, first) = http_json(api, "GET", "/api/config/agent-1", Some(&token), None);
    let first: Value = serde_json::from_str(&first).unwrap();
    let issued_path = site.path().join("daemon/api/issued/agent-1.json");
    let mut issued: Value =
        serde_json::from_str(&std::fs::read_to_string(&issued_path).unwrap()).unwrap();
    issued["not_after"] = json!(lunafront::clock::unix_now() as i64 + 10 * 86_400);
    std::fs::write(&issued_path, issued.to_string()).unwrap();
    let (_, second) = http_json(api, "GET", "/api/config/agent-1", Some(&token), None);
    let second: Value = serde_json::from_str(&second).unwrap();
    assert_ne!(
        first["certificates"]["serverCert"], second["certificates"]["serverCert"],
        "not renewed"
    );
    assert!(
        second["certificates"]["serverKey"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
}

/// Route changes made at the same moment are checked together (one validation of the state with
/// all of them, `api::batch`), and that keeps every rule a change checked alone obeys: a name
/// two agents claim at once goes to one of them, one agent's changes all land (none overwrites
/// another made beside it), and its route quota holds.
#[test]
fn route_changes_at_the_same_moment_keep_names_quotas_and_every_change() {
    let front = Front::start("  limits: { routes_per_agent: 4 }\n");
    let app = http_backend_everywhere("app");
    for i in 0..10 {
        front.register(&format!("agent-{i}"));
    }
    // agent-0..7: one route each; agent-8 and agent-9: the same name; agent-9 also asks for
    // six routes of its own, over its quota of four (with the shared name, seven changes).
    let mut asks: Vec<(String, String)> = (0..8)
        .map(|i| (format!("agent-{i}"), format!("own{i}")))
        .collect();
    asks.push(("agent-8".into(), "same".into()));
    asks.push(("agent-9".into(), "same".into()));
    asks.extend((0..6).map(|k| ("agent-9".to_string(), format!("many{k}"))));
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(asks.len()));
    let (api, port) = (front.api, app.port);
    let answers: Vec<(String, String, u16, String)> = asks
        .into_iter()
        .map(|(agent, label)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let (status, body) = http_json(
                    api,
                    "POST",
                    &format!("/v1/agents/{agent}/routes"),
                    Some(ADMIN),
                    Some(&json!({"subdomain": label, "port": port})),
                );
                (agent, label, status, body)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let status_of = |agent: &str, label: &str| {
        answers
            .iter()
            .find(|(a, l, _, _)| a == agent && l == label)
            .map(|(_, _, s, b)| (*s, b.clone()))
            .unwrap()
    };
    for i in 0..8 {
        let (status, body) = status_of(&format!("agent-{i}"), &format!("own{i}"));
        assert_eq!(status, 201, "agent-{i}: {body}");
    }
    // The shared name: exactly one owner.
    let same: Vec<u16> = ["agent-8", "agent-9"]
        .iter()
        .map(|a| status_of(a, "same").0)
        .collect();
    assert_eq!(
        same.iter().filter(|s| **s == 201).count(),
        1,
        "one of the two gets the name: {answers:?}"
    );
    assert!(same.contains(&409), "{answers:?}");
    let owner = if same[0] == 201 { "agent-8" } else { "agent-9" };
    // agent-9's quota: four routes in all, whatever came first.
    let fragment = |agent: &str| -> Value {
        let text = std::fs::read_to_string(
            front
                .site
                .path()
                .join(format!("state/agents.d/{agent}.yaml")),
        )
        .unwrap();
        serde_yaml::from_str(&text).unwrap()
    };
    let nine = fragment("agent-9");
    let nine_routes = nine["domains"].as_object().map_or(0, |d| d.len());
    assert_eq!(nine_routes, 4, "agent-9 holds its quota exactly: {nine}");
    let many_ok = (0..6)
        .filter(|k| status_of("agent-9", &format!("many{k}")).0 == 201)
        .count();
    assert_eq!(
        many_ok + usize::from(owner == "agent-9"),
        4,
        "every accepted change of agent-9 is in its file: {answers:?}"
    );
    for k in 0..6 {
        let (status, body) = status_of("agent-9", &format!("many{k}"));
        assert!(status == 201 || status == 403, "many{k}: {status} {body}");
    }
    // What was accepted is live and in the files; what was refused is not.
    for (agent, label, status, _) in &answers {
        let host = format!("{label}.apps.example.com");
        let (got, body) = http_get(front.http, &host, "/").unwrap();
        if *status == 201 && (label != "same" || agent == owner) {
            assert_eq!(
                (got, body.starts_with("backend=app ")),
                (200, true),
                "{host}"
            );
            assert_eq!(fragment(agent)["domains"][&host]["owner"], agent.as_str());
        } else if label != "same" {
            assert_eq!(got, 404, "{host} was refused: {body}");
        }
    }
    let (_, plan, _) = front
        .site
        .lunafront(&["plan", "state", "--detailed-exitcode"]);
    assert!(plan.contains("No changes"), "{plan}");
}
