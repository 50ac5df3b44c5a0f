//! The agent API attacked as a hostile tenant would, against a live daemon and a real
//! HAProxy: addresses that reach the front server itself, the front's own listeners as route
//! targets, revoked keys, a tenant forcing reloads, a rate limit shared behind a proxy or
//! dodged with a forged header, colliding generated names, a change the state would refuse,
//! path tricks in ids, an administrator's certificate overwritten, data folders created too
//! open — and the attacks that already failed (another tenant's things, injection, oversized
//! bodies), kept so they stay failed.

mod support;

use serde_json::{Value, json};
use std::io::{BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::agent::*;
use support::*;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A raw request from `source` to 127.0.0.1:`port` with the Host `host` and extra header
/// lines.
fn request_from(
    source: &str,
    port: u16,
    host: &str,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> Answer {
    let mut stream = connect_from(source.parse::<IpAddr>().unwrap(), port);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    read_answer(&mut BufReader::new(stream)).unwrap()
}

#[test]
fn addresses_are_judged_as_what_they_are_before_any_policy_decision() {
    // The platform's private network is allowed; loopback, link-local and the rest are not.
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"192.168.50.0/24\" ]\n",
        "",
    );
    let key = front.enroll("evil");
    let fragment = front.site.path().join("state/agents.d/evil.yaml");
    for (i, ip) in [
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "0.0.0.0",
        "0.1.2.3",
        "240.0.0.1",
        "198.18.0.1",
        "192.0.0.8",
        "100.64.0.1",
        "fec0::1",
        "fe80::1",
        "fd00::1",
        "ff02::1",
    ]
    .iter()
    .enumerate()
    {
        // Each attempt from its own client, so that the rate limit stays out of the way.
        let (status, body) = front.call_from(
            &format!("127.0.10.{}", i + 1),
            "POST",
            "/api/agent/register",
            None,
            Some(json!({"agentId": "evil", "agentKey": key, "agentName": "e", "targetIp": ip})),
        );
        // Well-formed and refused by the policy: 403, naming the field.
        assert_eq!(status, 403, "{ip} was accepted: {body}");
        assert!(
            body["fields"]["targetIp"]
                .as_str()
                .unwrap()
                .contains("not a public address"),
            "{ip}: {body}"
        );
        assert!(!fragment.exists(), "{ip}: a refused registration wrote");
    }
    // The allowed network, written as a mapped address, is that network; it is recorded as the
    // IPv4 address it is.
    let (status, body) = front.call(
        "POST",
        "/api/agent/register",
        None,
        Some(json!({"agentId": "evil", "agentKey": key, "agentName": "e", "targetIp": "::ffff:192.168.50.7"})),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["targetIp"], "192.168.50.7");
    // An address belongs to one agent, whatever its spelling.
    let other = front.enroll("other");
    let (status, body) = front.call(
        "POST",
        "/api/agent/register",
        None,
        Some(json!({"agentId": "other", "agentKey": other, "agentName": "o", "targetIp": "::ffff:c0a8:3207"})),
    );
    assert_eq!(status, 409, "{body}");

    // A network that is not one is an error at its place, not a silent no-match.
    let site = Site::new();
    write(
        site.path(),
        "state.yaml",
        "version: 1\napi:\n  allowed_networks: [ \"10.0.0.0/8\", \"10.0.0.0/40\", \"192.168.1.1/24\" ]\n",
    );
    let (code, out, err) = site.lunafront(&["validate", "state.yaml"]);
    assert_eq!(code, 1, "{out}{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("state.yaml:3:")
            && all.contains("error[invalid-network]")
            && all.contains("/40")
            && all.contains("host bits"),
        "{all}"
    );
}

#[test]
fn no_route_reaches_the_front_server_s_own_listeners_whatever_allowed_networks_says() {
    // Agents may live on this host (loopback is allowed), but never route to the front itself.
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
    );
    let jwt = front.register("evil", "::ffff:127.0.0.1");
    let fragment = front.site.path().join("state/agents.d/evil.yaml");
    let before = std::fs::read_to_string(&fragment).unwrap();
    for (what, port) in [
        ("the daemon's health/status port", front.daemon.port),
        ("the API", front.api),
        ("HAProxy's HTTP listener", front.http),
        ("HAProxy's TCP listener", front.tcp),
    ] {
        let answer = axios_post(
            front.api,
            "/api/proxy/http",
            &jwt,
            &format!(
                "{{\"agentId\":\"evil\",\"subdomain\":\"x\",\"targetUrl\":\"http://127.0.0.1:{port}\",\"options\":{{\"useTls\":false,\"check\":false}}}}"
            ),
        );
        assert_eq!(answer.status, 403, "{what}: {}", answer.body);
        assert!(
            answer.body.contains("own listener"),
            "{what}: {}",
            answer.body
        );
        assert_eq!(
            std::fs::read_to_string(&fragment).unwrap(),
            before,
            "{what}"
        );
    }
    let answer = axios_post(
        front.api,
        "/api/mongodb/register",
        &jwt,
        &format!(
            "{{\"agentId\":\"evil\",\"targetIp\":\"127.0.0.1\",\"targetPort\":{},\"useTls\":true}}",
            front.daemon.port
        ),
    );
    assert_eq!(answer.status, 403, "{}", answer.body);
    // The public listener never serves the daemon's loopback-only status.
    let (status, body) = http_get(front.http, "x.apps.example.com", "/status").unwrap();
    assert_ne!(status, 200, "{body}");
    assert!(!body.contains("last_reconcile"), "{body}");
    // Another local port is the agent's business (loopback was allowed).
    let app = App::start("local-app");
    let answer = axios_post(
        front.api,
        "/api/proxy/http",
        &jwt,
        &format!(
            "{{\"agentId\":\"evil\",\"subdomain\":\"fine\",\"targetUrl\":\"http://127.0.0.1:{}\",\"options\":{{\"useTls\":false,\"check\":false}}}}",
            app.port
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[test]
fn revocation_locks_the_agent_out_and_re_enrolling_rotates_the_key() {
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
    );
    for (agent, ip, revoke_with_api) in [
        ("agent-a", "127.0.3.1", false),
        ("agent-b", "127.0.3.2", true),
    ] {
        let key = front.enroll(agent);
        // Each agent is its own client of the rate limit.
        let register = |key: &str| {
            front.call_from(
                ip,
                "POST",
                "/api/agent/register",
                None,
                Some(
                    json!({"agentId": agent, "agentKey": key, "agentName": agent, "targetIp": ip}),
                ),
            )
        };
        let (status, body) = register(&key);
        assert_eq!(status, 201, "{body}");
        let token = body["token"].as_str().unwrap().to_string();
        if revoke_with_api {
            let (status, body) = front.call(
                "POST",
                &format!("/v1/agents/{agent}/revoke"),
                Some(ADMIN),
                None,
            );
            assert_eq!(status, 200, "{body}");
        } else {
            let (code, out, err) = front
                .site
                .lunafront(&["agent", "revoke", agent, "state", "--target", "local"]);
            assert_eq!(code, 0, "{out}{err}");
        }
        // The token, the key: nothing gets a new token.
        assert_eq!(
            front
                .call("GET", &format!("/api/config/{agent}"), Some(&token), None)
                .0,
            401
        );
        let (status, body) = front.call_from(
            ip,
            "POST",
            "/api/agents/authenticate",
            None,
            Some(json!({"agentId": agent, "agentKey": key})),
        );
        assert_eq!(
            status, 401,
            "{agent}: the revoked key authenticated: {body}"
        );
        let (status, body) = register(&key);
        assert_eq!(status, 401, "{agent}: the revoked key registered: {body}");
        // Re-enrolling lets it in with a new key; the old one stays dead.
        let new_key = front.enroll(agent);
        let (status, body) = register(&new_key);
        assert_eq!(status, 201, "{body}");
        let (status, _) = front.call_from(
            ip,
            "POST",
            "/api/agents/authenticate",
            None,
            Some(json!({"agentId": agent, "agentKey": new_key})),
        );
        assert_eq!(status, 200);
        assert_eq!(register(&key).0, 401);
    }
}

#[test]
fn one_tenant_flipping_check_cannot_reload_away_other_tenants_connections() {
    // Old workers holding connections are ended after 5 reloads.
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "global: { mworker_max_reloads: 5 }\n",
    );
    // Tenant B's MongoDB, and a client connection that stays open.
    let b = front.register("tenant-b", "127.0.3.2");
    let leaf = TestCa::new();
    let cert = leaf.leaf(&["tenant-b.mongodb.example.com"]);
    let mongod = tls_echo("mongod-b", &cert.cert_pem, &cert.key_pem);
    let (status, body) = front.call(
        "POST",
        "/api/mongodb/register",
        Some(&b),
        Some(json!({"agentId": "tenant-b", "targetIp": "127.0.3.2", "targetPort": mongod.port, "useTls": true})),
    );
    assert_eq!(status, 200, "{body}");
    let a = front.register("tenant-a", "127.0.3.1");
    let app = App::start("a-app");
    let route = |check: bool| {
        axios_post(
            front.api,
            "/api/proxy/http",
            &a,
            &format!(
                "{{\"agentId\":\"tenant-a\",\"subdomain\":\"flip\",\"targetUrl\":\"http://127.0.3.1:{}\",\"options\":{{\"useTls\":true,\"check\":{check}}}}}",
                app.port
            ),
        )
    };
    assert_eq!(route(false).status, 200);
    let mut connection = LongLived::open(
        leaf.client_config(),
        front.tcp,
        "tenant-b.mongodb.example.com",
    )
    .unwrap();
    assert_eq!(connection.line("before").unwrap(), "mongod-b: before");
    let (reloads_before, _) = front.generation();

    // Tenant A flips its health check 50 times.
    let mut refused = 0;
    for i in 0..50 {
        let answer = route(i % 2 == 0);
        match answer.status {
            200 => {}
            429 => {
                refused += 1;
                let wait: u64 = answer
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 without Retry-After: {answer:?}"));
                assert!(wait >= 1, "{answer:?}");
            }
            other => panic!("flip {i}: {other}: {}", answer.body),
        }
    }
    let (reloads_after, _) = front.generation();
    assert!(refused > 0, "50 reload-forcing changes were all accepted");
    assert!(
        reloads_after - reloads_before <= 4,
        "{} reloads for one tenant's flips",
        reloads_after - reloads_before
    );
    // B's connection, opened before all that, still works.
    assert_eq!(
        connection
            .line("after")
            .expect("tenant B's connection was closed"),
        "mongod-b: after"
    );
}

#[test]
fn per_agent_change_rate_and_route_quota() {
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n  limits: { change_burst: 5, changes_per_minute: 6, routes_per_agent: 3 }\n",
        "",
    );
    let jwt = front.register("agent-1", "127.0.3.1");
    let app = App::start("app");
    let add = |name: &str| {
        axios_post(
            front.api,
            "/api/proxy/http",
            &jwt,
            &format!(
                "{{\"agentId\":\"agent-1\",\"subdomain\":\"{name}\",\"targetUrl\":\"http://127.0.3.1:{}\",\"options\":{{\"useTls\":true,\"check\":false}}}}",
                app.port
            ),
        )
    };
    for name in ["one", "two", "three"] {
        assert_eq!(add(name).status, 200);
    }
    let over = add("four");
    assert_eq!(over.status, 403, "{}", over.body);
    assert_eq!(over.json()["error"], "quota_exceeded");
    // Five changes at once, then six a minute: the sixth and seventh now are refused.
    assert_eq!(add("one").status, 200);
    let answer = add("two");
    assert_eq!(answer.status, 429, "{}", answer.body);
    let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&wait), "{wait}");
    // Another agent is not limited by agent-1's changes.
    let other = front.register("agent-2", "127.0.3.2");
    let answer = axios_post(
        front.api,
        "/api/proxy/http",
        &other,
        &format!(
            "{{\"agentId\":\"agent-2\",\"subdomain\":\"mine\",\"targetUrl\":\"http://127.0.3.2:{}\",\"options\":{{\"useTls\":true,\"check\":false}}}}",
            app.port
        ),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[test]
fn the_rate_limit_sees_the_real_client_behind_proxies_and_never_a_forged_header() {
    // The API served through the front's own HAProxy (X-Forwarded-For), as the README says.
    let front = ApiFront::start(
        "passthrough",
        "  trusted_proxies: [ \"127.0.0.1/32\" ]\n",
        "backends:\n  api: { servers: [ { address: 127.0.0.1, port: {API} } ] }\ndomains:\n  api.example.com: { backend: api }\n",
    );
    let api_backend = front.api;
    let attempt = |source: &str, port: u16, host: &str, extra: &str| {
        request_from(
            source,
            port,
            host,
            "POST",
            "/api/agents/authenticate",
            extra,
            "{\"agentId\":\"nobody\",\"agentKey\":\"wrong-key-0123456789\"}",
        )
    };
    // Twelve clients behind HAProxy, three attempts each: each has its own bucket.
    for i in 1..=12 {
        for _ in 0..3 {
            let a = attempt(&format!("127.0.6.{i}"), front.http, "api.example.com", "");
            assert_eq!(a.status, 401, "client {i} through HAProxy: {}", a.body);
        }
    }
    // One client's bucket does run out, through the proxy as well.
    let statuses: Vec<u16> = (0..12)
        .map(|_| attempt("127.0.6.1", front.http, "api.example.com", "").status)
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    // Nor can a client behind the proxy dodge its limit with a forged X-Forwarded-For (HAProxy
    // appends the address it sees; the rightmost untrusted one is the client).
    let statuses: Vec<u16> = (0..12)
        .map(|i| {
            attempt(
                "127.0.6.2",
                front.http,
                "api.example.com",
                &format!("X-Forwarded-For: 198.51.100.{i}\r\n"),
            )
            .status
        })
        .collect();
    assert!(
        statuses.contains(&429),
        "a forged header behind the proxy reset the limit: {statuses:?}"
    );
    // A direct client forging X-Forwarded-For is still itself.
    let statuses: Vec<u16> = (0..12)
        .map(|i| {
            attempt(
                "127.0.7.1",
                front.api,
                "x",
                &format!("X-Forwarded-For: 198.51.100.{i}\r\n"),
            )
            .status
        })
        .collect();
    assert!(
        statuses.contains(&429),
        "the forged header reset the limit: {statuses:?}"
    );

    // PROXY protocol (v1 and v2) from HAProxy in TCP mode.
    let dir = TempDir::new().unwrap();
    let (v1, v2) = (free_port(), free_port());
    let config = dir.path().join("proxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n    pidfile {d}/proxy.pid\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\nfrontend v1\n    bind 127.0.0.1:{v1}\n    default_backend v1\nbackend v1\n    server api 127.0.0.1:{api_backend} send-proxy\nfrontend v2\n    bind 127.0.0.1:{v2}\n    default_backend v2\nbackend v2\n    server api 127.0.0.1:{api_backend} send-proxy-v2\n",
            d = dir.path().display()
        ),
    ).unwrap();
    let _proxy = Haproxy::start(&config, &dir.path().join("master.sock"), &[v1, v2]);
    for (port, net) in [(v1, 8), (v2, 9)] {
        for i in 1..=12 {
            for _ in 0..3 {
                let a = attempt(&format!("127.0.{net}.{i}"), port, "x", "");
                assert_eq!(
                    a.status, 401,
                    "client {i} through PROXY on {port}: {}",
                    a.body
                );
            }
        }
    }
}

#[test]
fn generated_names_cannot_collide_and_a_change_the_state_would_refuse_is_never_written() {
    let front = ApiFront::start_with(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
        &[(
            "state/admin.yaml",
            "agents:\n  admin-agent: { address: 127.0.9.9 }\n".to_string(),
        )],
    );
    let gamma = front.register("gamma", "127.0.3.1");
    let gamma_x = front.register("gamma--x", "127.0.3.2");
    let (one, two) = (App::start("one"), App::start("two"));
    let add = |jwt: &str, agent: &str, ip: &str, name: &str, port: u16| {
        axios_post(
            front.api,
            "/api/proxy/http",
            jwt,
            &format!(
                "{{\"agentId\":\"{agent}\",\"subdomain\":\"{name}\",\"targetUrl\":\"http://{ip}:{port}\",\"options\":{{\"useTls\":true,\"check\":false}}}}"
            ),
        )
    };
    let first = add(&gamma, "gamma", "127.0.3.1", "x--web", one.port);
    assert_eq!(first.status, 200, "{}", first.body);
    let second = add(&gamma_x, "gamma--x", "127.0.3.2", "web", two.port);
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(
        http_get(front.http, "x--web.apps.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=one ")
    );
    assert!(
        http_get(front.http, "web.apps.example.com", "/")
            .unwrap()
            .1
            .starts_with("backend=two ")
    );

    // The administrator's agent cannot be redefined through the API: 409, nothing written,
    // and every tenant's next change still goes live.
    let (status, body) = post_agent(front.api, "admin-agent", "127.0.9.10");
    assert_eq!(status, 409, "{body}");
    assert!(
        !front
            .site
            .path()
            .join("state/agents.d/admin-agent.yaml")
            .exists()
    );
    let third = add(&gamma, "gamma", "127.0.3.1", "again", one.port);
    assert_eq!(third.status, 200, "{}", third.body);
}

#[test]
fn data_folders_made_by_agent_enroll_before_the_daemon_are_as_closed_as_its_own() {
    // Folders made by `agent enroll` before any daemon ran are as closed as the daemon's.
    let site = Site::new();
    write(
        site.path(),
        "state/base.yaml",
        &format!("version: 1\n{}", site.folder_target_block("daemon")),
    );
    let (code, _, err) =
        site.lunafront(&["agent", "enroll", "first", "state", "--target", "local"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&site.path().join("daemon")), 0o700);
    assert_eq!(mode(&site.path().join("daemon/api")), 0o700);
    assert_eq!(mode(&site.path().join("daemon/api/tokens.json")), 0o600);
}

#[test]
fn admin_ids_are_checked_and_files_outside_the_api_s_are_never_touched() {
    let admin_cert = TestCa::new().leaf(&["mongodb.example.net"]).combined();
    let front = ApiFront::start_with(
        "terminate, certificates: certs",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
        &[
            ("state/certs/default.pem", admin_cert.clone()),
            ("state/victim.yaml", "domains: {}\n".to_string()),
            ("outside.yaml", "agents: {}\n".to_string()),
        ],
    );
    // An agent named `default` gets a MongoDB certificate without touching the
    // administrator's certs/default.pem.
    let jwt = front.register("default", "127.0.0.1");
    // With agents.d in place (an agent registered), ids that are paths would name files
    // outside it: in the state folder, and outside the state folder.
    for (method, path) in [
        ("DELETE", "/v1/agents/..%2Fvictim"),
        ("DELETE", "/v1/agents/..%2F..%2Foutside"),
        ("DELETE", "/v1/agents/%2F..%2Fvictim"),
        ("GET", "/v1/agents/%2F..%2Fvictim"),
        ("POST", "/v1/agents/..%2Fvictim/enroll"),
        ("POST", "/v1/agents/%2F..%2Fvictim/revoke"),
        ("GET", "/v1/agents/a%0Ab/routes"),
        ("DELETE", "/v1/agents/%15%C2%90"),
    ] {
        let (status, body) = front.call(method, path, Some(ADMIN), None);
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert!(body["fields"]["id"].is_string(), "{method} {path}: {body}");
    }
    assert!(
        front.site.path().join("state/victim.yaml").exists(),
        "a state file outside agents.d was deleted"
    );
    assert!(
        front.site.path().join("outside.yaml").exists(),
        "a file outside the state folder was deleted"
    );
    let mongod = tcp_backend("mongod");
    let (status, body) = front.call(
        "POST",
        "/api/mongodb/register",
        Some(&jwt),
        Some(json!({"agentId": "default", "targetIp": "127.0.0.1", "targetPort": mongod.port, "useTls": false})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        std::fs::read_to_string(front.site.path().join("state/certs/default.pem")).unwrap(),
        admin_cert,
        "the administrator's certificate was overwritten"
    );
    let (_, ca) = http_json(front.api, "GET", "/api/certificates/mongodb-ca", None, None);
    let reply = tls_exchange_with(
        client_config_trusting(&ca),
        front.tcp,
        "default.mongodb.example.com",
        "hi",
    )
    .unwrap();
    assert_eq!(reply, "tcp-backend=mongod got=hi");
}

/// Attacks that failed before this file existed; kept so they stay failed.
#[test]
fn what_already_held_cross_tenant_access_injection_and_oversized_bodies() {
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
    );
    let a = front.register("agent-a", "127.0.3.1");
    let b = front.register("agent-b", "127.0.3.2");
    let (status, _) = front.call("POST", "/api/proxy/http", Some(&b), Some(json!({"agentId": "agent-b", "subdomain": "bshop", "targetUrl": "http://127.0.0.1:3000"})));
    assert_eq!(status, 200);
    for (method, path, body) in [
        ("GET", "/api/config/agent-b", None),
        ("GET", "/api/proxy/agents/agent-b", None),
        ("GET", "/v1/agents/agent-b/routes", None),
        (
            "POST",
            "/api/proxy/http",
            Some(
                json!({"agentId": "agent-b", "subdomain": "evil", "targetUrl": "http://127.0.0.1:3000"}),
            ),
        ),
        (
            "DELETE",
            "/api/proxy",
            Some(json!({"agentId": "agent-b", "subdomain": "bshop", "type": "http"})),
        ),
        (
            "DELETE",
            "/api/proxy",
            Some(json!({"agentId": "agent-a", "subdomain": "bshop", "type": "http"})),
        ),
        (
            "POST",
            "/api/mongodb/register",
            Some(
                json!({"agentId": "agent-b", "targetIp": "127.0.3.2", "targetPort": 27017, "useTls": true}),
            ),
        ),
        ("GET", "/v1/agents", None),
    ] {
        let (status, body) = front.call(method, path, Some(&a), body);
        assert_eq!(status, 403, "{method} {path}: {body}");
    }
    let fragment = front.site.path().join("state/agents.d/agent-a.yaml");
    let before = std::fs::read_to_string(&fragment).unwrap();
    for hostile in ["a\nb", "a b", "a#b", "x\"y", "%[src]", "${HOME}", "a/b"] {
        let (status, body) = front.call(
            "POST",
            "/api/proxy/http",
            Some(&a),
            Some(json!({"agentId": "agent-a", "subdomain": hostile, "targetUrl": format!("http://x:1{hostile}")})),
        );
        assert_eq!(status, 400, "{hostile:?}: {body}");
    }
    assert_eq!(std::fs::read_to_string(&fragment).unwrap(), before);
    let big = "x".repeat(70 * 1024);
    let (status, body) = front.call(
        "POST",
        "/api/proxy/http",
        Some(&a),
        Some(json!({"agentId": "agent-a", "subdomain": "s", "targetUrl": big})),
    );
    assert_eq!(status, 413, "{body}");
    let _: Value = body;
}

#[test]
fn reload_forcing_changes_of_many_tenants_share_reloads() {
    let front = ApiFront::start(
        "passthrough",
        "  allowed_networks: [ \"127.0.0.0/8\" ]\n",
        "",
    );
    let app = App::start("app");
    let tenants: Vec<(String, String)> = (1..=8)
        .map(|i| {
            let agent = format!("tenant-{i}");
            let jwt = front.register(&agent, &format!("127.0.3.{i}"));
            (agent, jwt)
        })
        .collect();
    let route = |agent: &str, jwt: &str, i: usize, check: bool| {
        axios_post(
            front.api,
            "/api/proxy/http",
            jwt,
            &format!(
                "{{\"agentId\":\"{agent}\",\"subdomain\":\"{agent}-app\",\"targetUrl\":\"http://127.0.3.{i}:{}\",\"options\":{{\"useTls\":true,\"check\":{check}}}}}",
                app.port
            ),
        )
    };
    for (i, (agent, jwt)) in tenants.iter().enumerate() {
        assert_eq!(route(agent, jwt, i + 1, false).status, 200);
    }
    // Each tenant turns its health check on (a reload each), a quarter of a second apart.
    let (before, _) = front.generation();
    std::thread::scope(|scope| {
        for (i, (agent, jwt)) in tenants.iter().enumerate() {
            let route = &route;
            scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(250 * i as u64));
                let answer = route(agent, jwt, i + 1, true);
                assert_eq!(answer.status, 200, "{agent}: {}", answer.body);
            });
        }
    });
    let (after, _) = front.generation();
    assert!(
        after - before <= 3,
        "8 reload-forcing changes in 2 s made {} reloads",
        after - before
    );
    // Every change is live.
    for (i, _) in tenants.iter().enumerate() {
        let (status, _) = http_get(
            front.http,
            &format!("tenant-{}-app.apps.example.com", i + 1),
            "/",
        )
        .unwrap();
        assert_eq!(status, 200);
    }
}

/// Asserts that the environment of each process of the site's HAProxy (master and current
/// workers) is readable and does not hold `secret`.
fn assert_haproxy_environ_lacks(site: &Site, secret: &str) {
    let proc = site
        .master()
        .show_proc(Duration::from_secs(2))
        .expect("master answers");
    let mut pids: Vec<u32> = proc.current().map(|w| w.pid).collect();
    pids.push(proc.master_pid);
    for pid in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        assert!(
            !environ.is_empty(),
            "HAProxy {pid}'s environment is readable"
        );
        assert!(
            !environ.contains(secret),
            "HAProxy {pid} inherited: {environ}"
        );
    }
}

/// HAProxy expands `${VAR}` in quoted configuration strings and `env()` in expressions: a
/// HAProxy started by lunafront (the daemon's child, or `apply` with `spawn: true`) must not
/// inherit the admin token or any other `LUNAFRONT_*` secret from lunafront's environment.
#[test]
fn haproxy_started_by_lunafront_never_inherits_the_admin_token() {
    let secret = "admin-token-that-must-stay-in-lunafront";
    let shop = http_backend("shop");
    let port = free_port();
    let state = |site: &Site| {
        format!(
            "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n  shop.example.com: {{ backend: shop }}\n{}",
            shop.port,
            site.target_block(true)
        )
    };

    // The daemon's child.
    let site = Site::new();
    site.write_state(&state(&site));
    let daemon = Daemon::start_with_env(
        site.path(),
        "state.yaml",
        &[],
        &[
            ("LUNAFRONT_ADMIN_TOKEN", secret),
            ("LUNAFRONT_OTHER_SECRET", secret),
        ],
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert_haproxy_environ_lacks(&site, secret);
    drop(daemon);
    drop(site);

    // `apply` starting HAProxy in the background.
    let site = Site::new();
    site.write_state(&state(&site));
    let out = lunafront()
        .args(["apply", "state.yaml", "--auto-approve"])
        .env("LUNAFRONT_ADMIN_TOKEN", secret)
        .current_dir(site.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_haproxy_environ_lacks(&site, secret);
}
