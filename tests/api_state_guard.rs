//! No API call can leave the desired state invalid: every write operation of the agent API is
//! driven, against a live daemon and a real HAProxy, into a change the merged state would refuse
//! (a name the administrator's files define, an entry of theirs the change would break, an
//! unusable CSR, an address taken, control characters in ids), and each is refused — 400 or
//! 409 naming the problem (403 where the caller may not) — with every file of the state folder
//! byte-identical before and after, and the daemon still ready. Also: ids that are not names
//! are a 400 everywhere (never a 500), and the per-client limit on registration is the state's.

mod support;

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::agent::*;
use support::*;

/// Every file under `dir` (the state folder: base.yaml, the administrator's files, agents.d,
/// the certificates), byte for byte.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.is_file() {
                // (HAProxy's sockets live there too: they are not state.)
                out.insert(
                    path.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Reconciles now (the daemon's `POST /reconcile` answers once done) and checks it applied.
fn reconcile(front: &ApiFront) {
    let (status, body) = http_json(front.daemon.port, "POST", "/reconcile", None, None);
    assert_eq!(status, 200, "{body}");
    front
        .daemon
        .wait_for("/ready", 200, "ok", Duration::from_secs(20));
}

/// Sends each refused write and checks its status, that the answer names the problem, and
/// that no file of the state changed.
struct Refusals<'a> {
    front: &'a ApiFront,
    state: std::path::PathBuf,
    seen: Vec<(String, String)>,
    failures: Vec<String>,
}

/// Whether `path` is an instance of the document's path `template` (`/v1/agents/{id}`).
fn matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
}

impl Refusals<'_> {
    fn check(
        &mut self,
        what: &str,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
        (status, names): (u16, &str),
    ) {
        let before = snapshot(&self.state);
        let (got, answer) = self.front.call(method, path, Some(token), body);
        let after = snapshot(&self.state);
        let changed: Vec<&String> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        // Every refusal is tried and every problem reported at once.
        if !changed.is_empty() {
            self.failures.push(format!(
                "{what}: {method} {path} answered {got} but changed {changed:?}: {answer}"
            ));
        } else if got != status || answer["success"] != false {
            self.failures.push(format!(
                "{what}: {method} {path} answered {got}, not {status}: {answer}"
            ));
        } else if !answer.to_string().contains(names) {
            self.failures.push(format!(
                "{what}: the answer does not name `{names}`: {answer}"
            ));
        }
        self.seen.push((method.to_string(), path.to_string()));
    }
}

#[test]
fn every_write_that_would_make_the_merged_state_invalid_is_refused_and_writes_nothing() {
    let admin_cert = TestCa::new().leaf(&["mongodb.example.net"]).combined();
    let front = ApiFront::start_ready(
        "terminate, certificates: certs",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
        &[
            ("state/certs/default.pem", admin_cert),
            (
                "state/admin.yaml",
                // The administrator's own agent, and backends named as agent `a`'s app and
                // database would be: a route of `a` under those names would define them twice.
                "agents:\n  taken: { address: 127.0.7.7 }\nbackends:\n  a_shop: { servers: [ { agent: taken, port: 80 } ] }\n  a_mongodb.db: { servers: [ { agent: taken, port: 27017 } ] }\n".to_string(),
            ),
        ],
    );
    let a = front.register("a", "127.0.3.1");
    let b = front.register("b", "127.0.3.2");
    let c = front.register("c", "127.0.3.3");
    let (status, body) = front.call(
        "POST",
        "/api/proxy/http",
        Some(&b),
        Some(json!({"agentId": "b", "subdomain": "blog", "targetUrl": "http://127.0.0.1:3000"})),
    );
    assert_eq!(status, 200, "{body}");
    // The administrator builds on what agents registered: a domain of theirs on b's backend,
    // and a backend of theirs on agent c.
    write(
        front.site.path(),
        "state/admin-uses.yaml",
        "backends:\n  uses-c: { servers: [ { agent: c, port: 8080 } ] }\ndomains:\n  alias.example.com: { backend: b_blog }\n",
    );
    reconcile(&front);
    let _ = c;
    let state = front.site.path().join("state");
    let mut r = Refusals {
        front: &front,
        state: state.clone(),
        seen: Vec::new(),
        failures: Vec::new(),
    };
    let pem = state.join("certs/lunafront-a.pem");

    // Agents (admin).
    r.check(
        "an agent id the administrator's files define",
        "POST",
        "/v1/agents",
        ADMIN,
        Some(json!({"id": "taken", "address": "127.0.8.1"})),
        (409, "taken"),
    );
    r.check(
        "an address another agent has",
        "POST",
        "/v1/agents",
        ADMIN,
        Some(json!({"id": "newcomer", "address": "127.0.7.7"})),
        (409, "taken"),
    );
    r.check(
        "removing an agent the administrator's backend uses",
        "DELETE",
        "/v1/agents/c",
        ADMIN,
        None,
        (409, "uses-c"),
    );
    r.check(
        "removing an agent the administrator's files declare",
        "DELETE",
        "/v1/agents/taken",
        ADMIN,
        None,
        (409, "administrator"),
    );
    r.check(
        "a control character in an id",
        "DELETE",
        "/v1/agents/%15%C2%90",
        ADMIN,
        None,
        (400, "\"id\""),
    );
    r.check(
        "a control character in an id to enroll",
        "POST",
        "/v1/agents/a%0Ab/enroll",
        ADMIN,
        None,
        (400, "\"id\""),
    );
    r.check(
        "a control character in an id to revoke",
        "POST",
        "/v1/agents/%7F/revoke",
        ADMIN,
        None,
        (400, "\"id\""),
    );

    // Registration.
    let key = front.enroll("d");
    r.check(
        "a CSR that cannot be read",
        "POST",
        "/api/agent/register",
        "",
        Some(json!({"agentId": "d", "agentKey": key, "targetIp": "127.0.3.4", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"})),
        (400, "csr"),
    );
    let other = rcgen::CertificateParams::new(vec!["a.mongodb.example.com".to_string()])
        .unwrap()
        .serialize_request(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem()
        .unwrap();
    r.check(
        "a CSR for another agent's name",
        "POST",
        "/api/agents/register",
        "",
        Some(json!({"agentId": "d", "agentKey": key, "targetIp": "127.0.3.4", "csr": other})),
        (403, "a.mongodb.example.com"),
    );
    r.check(
        "an address the administrator's agent has",
        "POST",
        "/api/agent/register",
        "",
        Some(json!({"agentId": "d", "agentKey": key, "targetIp": "127.0.7.7"})),
        (409, "127.0.7.7"),
    );
    // The enrollment token was not used up by the refusals: it still registers.
    let (status, body) = front.call(
        "POST",
        "/api/agent/register",
        None,
        Some(json!({"agentId": "d", "agentKey": key, "targetIp": "127.0.3.4"})),
    );
    if status != 201 {
        r.failures.push(format!(
            "the enrollment token was used up by a refused registration: {status} {body}"
        ));
    }

    // Routes: an app or a database whose backend name the administrator defines.
    r.check(
        "an HTTP route whose backend the administrator defines",
        "POST",
        "/api/proxy/http",
        &a,
        Some(json!({"agentId": "a", "subdomain": "shop", "targetUrl": "http://127.0.0.1:3000"})),
        (409, "a_shop"),
    );
    r.check(
        "the same through the native API",
        "POST",
        "/v1/agents/a/routes",
        &a,
        Some(json!({"type": "http", "subdomain": "shop", "port": 3000})),
        (409, "a_shop"),
    );
    for (what, method, path, body) in [
        (
            "a MongoDB route whose backend the administrator defines",
            "POST",
            "/api/mongodb/register",
            json!({"agentId": "a", "targetIp": "127.0.3.1", "targetPort": 27017, "useTls": true}),
        ),
        (
            "the same through the database manager's endpoint",
            "POST",
            "/api/proxy/mongodb",
            json!({"agentId": "a", "targetHost": "127.0.3.1", "targetPort": 27017, "options": {"useTls": true}}),
        ),
        (
            "the same through the native API",
            "POST",
            "/v1/agents/a/routes",
            json!({"type": "mongodb", "port": 27017, "tls": true}),
        ),
    ] {
        r.check(what, method, path, &a, Some(body), (409, "a_mongodb.db"));
        // The certificate the front would present for it is not written either.
        if pem.exists() {
            r.failures
                .push(format!("{what}: {} was written", pem.display()));
        }
    }

    // Removals that would break the administrator's domain on b's backend.
    r.check(
        "removing a route the administrator's domain uses",
        "DELETE",
        "/api/proxy",
        &b,
        Some(json!({"agentId": "b", "subdomain": "blog", "type": "http"})),
        (409, "alias.example.com"),
    );
    r.check(
        "the same through the native API",
        "DELETE",
        "/v1/agents/b/routes/blog.apps.example.com",
        ADMIN,
        None,
        (409, "alias.example.com"),
    );

    // Removing an agent with more routes than the delete guard lets one change remove: the
    // daemon would hold it (and answer "saved but not live"), so the API refuses it.
    let e = front.register("e", "127.0.3.5");
    for i in 0..12 {
        let (status, body) = front.call(
            "POST",
            "/api/proxy/http",
            Some(&e),
            Some(json!({"agentId": "e", "subdomain": format!("app{i}"), "targetUrl": "http://127.0.0.1:3000"})),
        );
        assert_eq!(status, 200, "{body}");
    }
    r.check(
        "removing an agent with more routes than the delete guard lets through",
        "DELETE",
        "/v1/agents/e",
        ADMIN,
        None,
        (409, "delete_guard"),
    );

    assert!(
        r.failures.is_empty(),
        "{} refused writes went wrong:\n{}",
        r.failures.len(),
        r.failures.join("\n")
    );

    // Every write operation of the document was driven into a refusal.
    let spec: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml")).unwrap(),
    )
    .unwrap();
    // (Authentication writes no state: it checks a key and issues a token.)
    for (template, ops) in spec["paths"].as_object().unwrap() {
        for method in ["post", "delete"] {
            if ops.get(method).is_none() || template.contains("authenticate") {
                continue;
            }
            let method = method.to_uppercase();
            let done = r
                .seen
                .iter()
                .any(|(m, path)| *m == method && matches(template, path));
            assert!(
                done,
                "{method} {template} was not driven into a refused write"
            );
        }
    }
    // And the state is still what the daemon serves.
    front
        .daemon
        .wait_for("/ready", 200, "ok", Duration::from_secs(5));
    let (code, stdout, stderr) = run(&["validate", "state"], front.site.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// `GET /api/proxy/agents/%C3%83` answered 500 (the store refused the id after the handler had
/// let it through): every id in a path or body that is not a name is a 400 naming it.
#[test]
fn ids_that_are_not_names_are_a_400_everywhere_never_a_500() {
    let front = ApiFront::start_ready(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n  limits: { client_attempt_burst: 1000 }\n",
        "",
        &[],
    );
    for id in [
        "%C3%83",
        "%15%C2%90",
        "a%0Ab",
        "-x",
        "%2E%2E",
        &"a".repeat(64),
    ] {
        for (method, path) in [
            ("GET", format!("/api/proxy/agents/{id}")),
            ("GET", format!("/api/config/{id}")),
            ("GET", format!("/v1/agents/{id}")),
            ("GET", format!("/v1/agents/{id}/routes")),
            ("POST", format!("/v1/agents/{id}/enroll")),
            ("POST", format!("/v1/agents/{id}/revoke")),
            ("DELETE", format!("/v1/agents/{id}")),
            (
                "DELETE",
                format!("/v1/agents/{id}/routes/x.apps.example.com"),
            ),
        ] {
            let (status, body) = front.call(method, &path, Some(ADMIN), None);
            assert_eq!(status, 400, "{method} {path}: {body}");
            assert!(body["fields"]["id"].is_string(), "{method} {path}: {body}");
        }
        let decoded = id
            .replace("%C3%83", "Ã")
            .replace("%15%C2%90", "\u{15}\u{90}")
            .replace("%0A", "\n");
        for (path, body) in [
            (
                "/api/proxy/http",
                json!({"agentId": decoded, "subdomain": "x", "targetUrl": "http://x:1"}),
            ),
            (
                "/api/mongodb/register",
                json!({"agentId": decoded, "targetIp": "127.0.0.1", "targetPort": 1}),
            ),
            (
                "/api/agent/register",
                json!({"agentId": decoded, "agentKey": "0123456789abcdef", "targetIp": "127.0.0.1"}),
            ),
            (
                "/api/agents/authenticate",
                json!({"agentId": decoded, "agentKey": "0123456789abcdef"}),
            ),
        ] {
            let (status, answer) = front.call("POST", path, Some(ADMIN), Some(body));
            assert_eq!(status, 400, "{path} {decoded:?}: {answer}");
            assert!(answer["fields"]["agentId"].is_string(), "{path}: {answer}");
        }
    }
}

/// The per-client limit on registration and authentication attempts is the state's
/// (`api.limits.client_attempt_burst`, `client_attempts_per_minute`): a conformance run raises
/// it, a production front can lower it.
#[test]
fn the_limit_on_registration_attempts_per_client_is_the_state_s() {
    let front = ApiFront::start_ready(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n  limits: { client_attempt_burst: 3, client_attempts_per_minute: 1 }\n",
        "",
        &[],
    );
    let attempt = || {
        front.call_from(
            "127.0.11.1",
            "POST",
            "/api/agents/authenticate",
            None,
            Some(json!({"agentId": "nobody", "agentKey": "0123456789abcdef"})),
        )
    };
    for _ in 0..3 {
        assert_eq!(attempt().0, 401);
    }
    let (status, body) = attempt();
    assert_eq!(status, 429, "{body}");
    assert!(body["retryAfter"].as_u64().unwrap() >= 1, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("client_attempt_burst"),
        "{body}"
    );
    // Another client has its own budget.
    let (status, _) = front.call_from(
        "127.0.11.2",
        "POST",
        "/api/agents/authenticate",
        None,
        Some(json!({"agentId": "nobody", "agentKey": "0123456789abcdef"})),
    );
    assert_eq!(status, 401);

    // Raised, fifty attempts from one client all get an answer of their own.
    let site = ApiFront::start_ready(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n  limits: { client_attempt_burst: 100, client_attempts_per_minute: 100 }\n",
        "",
        &[],
    );
    for i in 0..50 {
        let (status, body) = site.call_from(
            "127.0.11.3",
            "POST",
            "/api/agents/authenticate",
            None,
            Some(json!({"agentId": "nobody", "agentKey": "0123456789abcdef"})),
        );
        assert_eq!(status, 401, "attempt {i}: {body}");
    }
}

/// Schemathesis's first run (ST101): `POST /v1/agents {"id": "a", "address": "127.0.0.1"}`
/// with agent `a` in the administrator's YAML wrote `agents.d/a.yaml`, the merged state then
/// failed ("agent `a` is defined twice"), the answer was 503 "saved but not live", and the
/// fragment stayed: every other tenant's change was refused until someone removed it. Now it
/// is a 409 naming the agent, nothing is written, and the next tenant's change goes live.
#[test]
fn posting_an_agent_the_administrator_defines_is_a_409_that_writes_nothing_and_blocks_no_one() {
    let front = ApiFront::start_ready(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
        &[(
            "state/admin.yaml",
            "agents:\n  a: { address: 127.0.0.1 }\n".to_string(),
        )],
    );
    let b = front.register("b", "127.0.3.2");
    let state = front.site.path().join("state");
    let before = snapshot(&state);
    let (status, body) = post_agent(front.api, "a", "127.0.0.1");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "conflict", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("`a`"),
        "the answer names the agent: {body}"
    );
    assert!(!state.join("agents.d/a.yaml").exists());
    assert!(snapshot(&state) == before, "a file of the state changed");
    // Nothing is held: another tenant's change goes live.
    let (status, body) = front.call(
        "POST",
        "/api/proxy/http",
        Some(&b),
        Some(json!({"agentId": "b", "subdomain": "blog", "targetUrl": "http://127.0.0.1:3000"})),
    );
    assert_eq!(status, 200, "{body}");
    let (code, stdout, stderr) = run(&["validate", "state"], front.site.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// The document's answer for `method template` with `status`, its schema checked against
/// `text`: an error when the status is not documented for the operation or the body is not
/// what the document says.
fn documented(
    spec: &Value,
    method: &str,
    template: &str,
    status: u16,
    text: &str,
) -> Result<(), String> {
    let operation = &spec["paths"][template][method.to_lowercase()];
    let mut response = operation["responses"][status.to_string()].clone();
    if response.is_null() {
        return Err(format!(
            "{method} {template} answered {status}, which the document does not list for it: {text}"
        ));
    }
    if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
        response = spec
            .pointer(reference.trim_start_matches('#'))
            .unwrap()
            .clone();
    }
    let Some(schema) = response.pointer("/content/application~1json/schema") else {
        return Ok(());
    };
    let body: Value = serde_json::from_str(text)
        .map_err(|e| format!("{method} {template} {status}: not JSON ({e}): {text}"))?;
    let validator =
        jsonschema::validator_for(&json!({"allOf": [schema], "components": spec["components"]}))
            .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{method} {template} {status}: the body is not the documented one: {errors:?}\n{body}"
        ))
    }
}

/// Schemathesis's first run (ST103, "undocumented status codes"): 503 and others were
/// answered but not documented per operation. Every operation of the document is called
/// without a token, with a body over 64 KiB, and — with the admin token and with an agent's —
/// once the administrator has broken the state by hand; every answer's status is listed for
/// the operation, with the documented body. The writes refused for the broken state are 503s.
#[test]
fn every_status_an_operation_answers_is_documented_for_it() {
    let spec: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml")).unwrap(),
    )
    .unwrap();
    let front = ApiFront::start_ready(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n  limits: { client_attempt_burst: 1000 }\n",
        "",
        &[(
            "state/admin.yaml",
            "agents:\n  admin-agent: { address: 127.0.9.9 }\n".to_string(),
        )],
    );
    let me = front.register("me", "127.0.5.5");
    let (status, body) = front.call(
        "POST",
        "/api/proxy/http",
        Some(&me),
        Some(json!({"agentId": "me", "subdomain": "shop", "targetUrl": "http://127.0.0.1:3000"})),
    );
    assert_eq!(status, 200, "{body}");
    let key = "0123456789abcdef0";
    // (method, the document's path, the path called, a body of the documented shape)
    let calls: Vec<(&str, &str, &str, Option<Value>)> = vec![
        (
            "POST",
            "/api/agent/register",
            "/api/agent/register",
            Some(json!({"agentId": "new-1", "agentKey": key, "targetIp": "127.0.6.1"})),
        ),
        (
            "POST",
            "/api/agents/register",
            "/api/agents/register",
            Some(json!({"agentId": "new-1", "agentKey": key, "targetIp": "127.0.6.1"})),
        ),
        (
            "POST",
            "/api/agents/authenticate",
            "/api/agents/authenticate",
            Some(json!({"agentId": "me", "agentKey": key})),
        ),
        (
            "POST",
            "/api/agent/authenticate",
            "/api/agent/authenticate",
            Some(json!({"serverId": "me", "agentToken": key})),
        ),
        ("GET", "/api/config/{agentId}", "/api/config/me", None),
        (
            "POST",
            "/api/proxy/http",
            "/api/proxy/http",
            Some(
                json!({"agentId": "me", "subdomain": "blog", "targetUrl": "http://127.0.0.1:3000"}),
            ),
        ),
        ("GET", "/api/proxy/routes", "/api/proxy/routes", None),
        (
            "GET",
            "/api/proxy/agents/{agentId}",
            "/api/proxy/agents/me",
            None,
        ),
        ("GET", "/api/proxy", "/api/proxy", None),
        (
            "DELETE",
            "/api/proxy",
            "/api/proxy",
            Some(json!({"agentId": "me", "subdomain": "shop", "type": "http"})),
        ),
        (
            "POST",
            "/api/mongodb/register",
            "/api/mongodb/register",
            Some(
                json!({"agentId": "me", "targetIp": "127.0.5.5", "targetPort": 27017, "useTls": true}),
            ),
        ),
        (
            "POST",
            "/api/proxy/{dbType}",
            "/api/proxy/mongodb",
            Some(
                json!({"agentId": "me", "targetHost": "127.0.5.5", "targetPort": 27018, "options": {"useTls": true}}),
            ),
        ),
        (
            "GET",
            "/api/certificates/mongodb-ca",
            "/api/certificates/mongodb-ca",
            None,
        ),
        ("GET", "/health", "/health", None),
        ("GET", "/v1/agents", "/v1/agents", None),
        (
            "POST",
            "/v1/agents",
            "/v1/agents",
            Some(json!({"id": "new-2", "address": "127.0.6.2"})),
        ),
        ("GET", "/v1/agents/{id}", "/v1/agents/me", None),
        ("DELETE", "/v1/agents/{id}", "/v1/agents/me", None),
        (
            "POST",
            "/v1/agents/{id}/enroll",
            "/v1/agents/new-3/enroll",
            None,
        ),
        (
            "POST",
            "/v1/agents/{id}/revoke",
            "/v1/agents/nobody/revoke",
            None,
        ),
        (
            "GET",
            "/v1/agents/{id}/routes",
            "/v1/agents/me/routes",
            None,
        ),
        (
            "POST",
            "/v1/agents/{id}/routes",
            "/v1/agents/me/routes",
            Some(json!({"type": "http", "subdomain": "blog2", "port": 3000})),
        ),
        (
            "DELETE",
            "/v1/agents/{id}/routes/{domain}",
            "/v1/agents/me/routes/shop.apps.example.com",
            None,
        ),
        ("GET", "/v1/domains", "/v1/domains", None),
        ("GET", "/v1/plan", "/v1/plan", None),
        ("GET", "/v1/status", "/v1/status", None),
    ];
    // Every operation of the document is in the table.
    let mut operations = 0;
    for (template, item) in spec["paths"].as_object().unwrap() {
        for method in ["get", "post", "delete"] {
            if item.get(method).is_some() {
                operations += 1;
                assert!(
                    calls
                        .iter()
                        .any(|(m, t, _, _)| m.eq_ignore_ascii_case(method) && t == template),
                    "{method} {template} is not called"
                );
            }
        }
    }
    assert_eq!(operations, calls.len());

    let mut failures = Vec::new();
    let mut answered: BTreeMap<(String, u16), usize> = BTreeMap::new();
    let mut call = |what: &str,
                    method: &str,
                    template: &str,
                    path: &str,
                    token: Option<&str>,
                    body: Option<&Value>| {
        let (status, text) = http_json(front.api, method, path, token, body);
        if let Err(e) = documented(&spec, method, template, status, &text) {
            failures.push(format!("{what}: {e}"));
        }
        *answered
            .entry((format!("{method} {template}"), status))
            .or_default() += 1;
    };
    for (method, template, path, body) in &calls {
        call("no token", method, template, path, None, body.as_ref());
        if body.is_some() {
            let big = json!({"agentId": "me", "padding": "x".repeat(70 * 1024)});
            call(
                "over 64 KiB",
                method,
                template,
                path,
                Some(ADMIN),
                Some(&big),
            );
        }
    }
    // The administrator breaks the state by hand: a domain on a backend nothing defines.
    write(
        front.site.path(),
        "state/broken.yaml",
        "domains:\n  broken.example.com: { backend: nothing }\n",
    );
    let _ = http_json(front.daemon.port, "POST", "/reconcile", None, None);
    for token in [ADMIN, me.as_str()] {
        for (method, template, path, body) in &calls {
            call(
                "broken state",
                method,
                template,
                path,
                Some(token),
                body.as_ref(),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} undocumented answers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The broken state was met: the writes were refused as unavailable, and nothing was held.
    for write in [
        "POST /v1/agents",
        "POST /api/proxy/http",
        "POST /v1/agents/{id}/routes",
    ] {
        assert!(
            answered.contains_key(&(write.to_string(), 503)),
            "{write} never answered 503: {answered:?}"
        );
    }
    for (method, template, _, body) in &calls {
        if body.is_some() {
            assert!(
                answered.contains_key(&(format!("{method} {template}"), 413)),
                "{method} {template} never answered 413: {answered:?}"
            );
        }
    }
}
