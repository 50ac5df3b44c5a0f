//! End to end: states rendered by the lunafront binary, served by a real HAProxy 2.6 on loopback,
//! with real HTTP backends, real TLS (certificates made at test time) and real TLS clients.

mod support;

use std::path::Path;
use support::*;

/// Renders `state` (in `dir`) with the lunafront binary into `dir/out`, checks it with
/// `haproxy -c` from another folder, and starts HAProxy on it.
fn render_and_start(dir: &Path, ports: &[u16]) -> Haproxy {
    let (code, stdout, stderr) = run(&["render", "state.yaml", "--out", "out"], dir);
    assert_eq!(code, 0, "render failed:\n{stdout}\n{stderr}");
    let config = dir.join("out/haproxy.cfg");
    haproxy_check(&config)
        .unwrap_or_else(|e| panic!("haproxy -c refused the rendered config:\n{e}"));
    Haproxy::start(&config, &dir.join("master.sock"), ports)
}

fn target_block(dir: &Path) -> String {
    format!(
        "targets:\n  local: {{ type: haproxy, config: out/haproxy.cfg, runtime_socket: {}/admin.sock }}\n",
        dir.display()
    )
}

#[test]
fn http_routes_by_host_exact_wildcard_and_unknown_is_404() {
    let dir = TempDir::new().unwrap();
    let shop = http_backend("shop");
    let legacy = http_backend("legacy");
    let preview = http_backend("preview");
    let pinned = http_backend("pinned");
    let port = free_port();
    let port2 = free_port();
    let state = format!(
        "version: 1
listeners:
  http: {{ bind: \"127.0.0.1:{port}\" }}
  admin: {{ bind: \"127.0.0.1:{port2}\" }}
agents:
  agent-1: {{ address: 127.0.0.1 }}
backends:
  shop: {{ servers: [ {{ agent: agent-1, port: {} }} ] }}
  legacy: {{ servers: [ {{ address: 127.0.0.1, port: {}, weight: 10 }} ], health_check: {{ path: /healthz }} }}
  preview: {{ servers: [ {{ agent: agent-1, port: {} }} ] }}
  pinned: {{ servers: [ {{ agent: agent-1, port: {} }} ] }}
domains:
  shop.apps.example.com: {{ backend: shop }}
  legacy.example.com: {{ backend: legacy }}
  \"*.preview.example.com\": {{ backend: preview }}
  exact.preview.example.com: {{ backend: shop }}
  admin.example.com: {{ backend: pinned, listener: admin }}
{}",
        shop.port,
        legacy.port,
        preview.port,
        pinned.port,
        target_block(dir.path())
    );
    write(dir.path(), "state.yaml", &state);
    let _haproxy = render_and_start(dir.path(), &[port, port2]);

    let get = |host: &str| http_get(port, host, "/x").unwrap();
    let (status, body) = get("shop.apps.example.com");
    assert_eq!(status, 200);
    assert!(body.starts_with("backend=shop "), "{body}");
    // Host matching ignores case and the port.
    let (status, body) = get(&format!("SHOP.Apps.Example.COM:{port}"));
    assert_eq!(
        (status, body.starts_with("backend=shop ")),
        (200, true),
        "{body}"
    );
    // A dedicated backend (address server, HTTP check).
    let (status, body) = get("legacy.example.com");
    assert_eq!(
        (status, body.starts_with("backend=legacy ")),
        (200, true),
        "{body}"
    );
    // One-label wildcard; an exact name under it wins.
    let (status, body) = get("a.preview.example.com");
    assert_eq!(
        (status, body.starts_with("backend=preview ")),
        (200, true),
        "{body}"
    );
    let (_, body) = get("exact.preview.example.com");
    assert!(body.starts_with("backend=shop "), "{body}");
    // Two labels under the wildcard, the wildcard's parent itself, and unknown names: 404.
    for host in [
        "a.b.preview.example.com",
        "preview.example.com",
        "unknown.example.com",
        "localhost",
    ] {
        let (status, body) = get(host);
        assert_eq!(status, 404, "{host}: {body}");
        assert!(body.contains("404 Not Found"), "{host}: {body}");
        assert!(
            !body.contains("backend="),
            "{host} reached a backend: {body}"
        );
    }
    // A domain pinned to one listener is served there only.
    let (status, body) = http_get(port2, "admin.example.com", "/").unwrap();
    assert_eq!(
        (status, body.starts_with("backend=pinned ")),
        (200, true),
        "{body}"
    );
    assert_eq!(get("admin.example.com").0, 404);
    // The pinned listener still serves the domains of every HTTP listener.
    let (_, body) = http_get(port2, "shop.apps.example.com", "/").unwrap();
    assert!(body.starts_with("backend=shop "), "{body}");
}

#[test]
fn https_terminates_tls_with_one_certificate_per_name() {
    let dir = TempDir::new().unwrap();
    let ca = TestCa::new();
    write(
        dir.path(),
        "certs/shop.pem",
        &ca.leaf(&["shop.apps.example.com"]).combined(),
    );
    write(
        dir.path(),
        "certs/preview.pem",
        &ca.leaf(&["*.preview.example.com"]).combined(),
    );
    let shop = http_backend("shop");
    let preview = http_backend("preview");
    let port = free_port();
    let state = format!(
        "version: 1
listeners:
  https: {{ bind: \"127.0.0.1:{port}\", certificates: certs }}
agents:
  agent-1: {{ address: 127.0.0.1 }}
backends:
  shop: {{ servers: [ {{ agent: agent-1, port: {} }} ] }}
  preview: {{ servers: [ {{ agent: agent-1, port: {} }} ] }}
domains:
  shop.apps.example.com: {{ backend: shop }}
  \"*.preview.example.com\": {{ backend: preview }}
{}",
        shop.port,
        preview.port,
        target_block(dir.path())
    );
    write(dir.path(), "state.yaml", &state);
    let _haproxy = render_and_start(dir.path(), &[port]);

    // The client verifies HAProxy's certificate for each name against the test CA.
    let (status, body) = https_get(
        &ca,
        port,
        "shop.apps.example.com",
        "shop.apps.example.com",
        "/",
    )
    .unwrap();
    assert_eq!(
        (status, body.starts_with("backend=shop ")),
        (200, true),
        "{body}"
    );
    let (status, body) = https_get(
        &ca,
        port,
        "x.preview.example.com",
        "x.preview.example.com",
        "/",
    )
    .unwrap();
    assert_eq!(
        (status, body.starts_with("backend=preview ")),
        (200, true),
        "{body}"
    );
    let (status, _) = https_get(
        &ca,
        port,
        "shop.apps.example.com",
        "nothing.example.com",
        "/",
    )
    .unwrap();
    assert_eq!(status, 404);
    // The rendered private keys are 0600.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("out/certs/https.shop.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn mongodb_sni_passthrough_reaches_the_right_tls_backend() {
    let dir = TempDir::new().unwrap();
    let ca = TestCa::new();
    let (db7, served7) =
        tls_backend_counted("agent-7-db", &ca.leaf(&["agent-7.mongodb.example.com"]));
    let (db8, served8) =
        tls_backend_counted("agent-8-db", &ca.leaf(&["agent-8.mongodb.example.com"]));
    let (dbw, servedw) = tls_backend_counted("wild-db", &ca.leaf(&["*.shard.example.com"]));
    let port = free_port();
    let state = format!(
        "version: 1
listeners:
  mongodb: {{ bind: \"127.0.0.1:{port}\", tls: passthrough }}
agents:
  agent-7: {{ address: 127.0.0.1 }}
  agent-8: {{ address: 127.0.0.1 }}
backends:
  agent-7-db: {{ servers: [ {{ agent: agent-7, port: {} }} ] }}
  agent-8-db: {{ servers: [ {{ agent: agent-8, port: {} }} ], health_check: true }}
  wild-db: {{ servers: [ {{ address: 127.0.0.1, port: {} }} ] }}
domains:
  agent-7.mongodb.example.com: {{ backend: agent-7-db, listener: mongodb }}
  agent-8.mongodb.example.com: {{ backend: agent-8-db, listener: mongodb }}
  \"*.shard.example.com\": {{ backend: wild-db, listener: mongodb }}
{}",
        db7.port,
        db8.port,
        dbw.port,
        target_block(dir.path())
    );
    write(dir.path(), "state.yaml", &state);
    let _haproxy = render_and_start(dir.path(), &[port]);

    // TLS passes through: the client verifies the backend's own certificate, and the backend
    // sees the client's server name.
    let reply = tls_exchange(&ca, port, "agent-7.mongodb.example.com", "ping").unwrap();
    assert_eq!(
        reply,
        "tls-backend=agent-7-db sni=agent-7.mongodb.example.com got=ping"
    );
    let reply = tls_exchange(&ca, port, "agent-8.mongodb.example.com", "ping").unwrap();
    assert_eq!(
        reply,
        "tls-backend=agent-8-db sni=agent-8.mongodb.example.com got=ping"
    );
    let reply = tls_exchange(&ca, port, "s1.shard.example.com", "ping").unwrap();
    assert_eq!(
        reply,
        "tls-backend=wild-db sni=s1.shard.example.com got=ping"
    );
    // An unknown name is closed, never sent to any tenant's database: names next to each
    // tenant's (a prefix, a suffix, one label more or less) reach none of them. Exchanges are
    // counted, not connections: agent-8-db's health checks connect on their own.
    use std::sync::atomic::Ordering::SeqCst;
    let served = || {
        (
            served7.load(SeqCst),
            served8.load(SeqCst),
            servedw.load(SeqCst),
        )
    };
    assert_eq!(served(), (1, 1, 1));
    for name in [
        "agent-9.mongodb.example.com",
        "xagent-7.mongodb.example.com",
        "agent-7.mongodb.example.com.evil.example",
        "agent-8.mongodb.example.co",
        "a.agent-8.mongodb.example.com",
        "mongodb.example.com",
        "shard.example.com",
        "a.s1.shard.example.com",
        "s1.shard.example.comx",
        "evil.example.com",
    ] {
        assert!(
            tls_exchange(&ca, port, name, "ping").is_err(),
            "{name} was answered"
        );
        assert_eq!(served(), (1, 1, 1), "{name} reached a tenant's database");
    }
    drop((db7, db8, dbw));
}

#[test]
fn mongodb_sni_terminate_decrypts_and_routes_by_handshake_name() {
    let dir = TempDir::new().unwrap();
    let ca = TestCa::new();
    write(
        dir.path(),
        "certs/mongodb.pem",
        &ca.leaf(&["*.mongodb.example.com"]).combined(),
    );
    let db7 = tcp_backend("agent-7-db");
    let db8 = tcp_backend("agent-8-db");
    let port = free_port();
    let state = format!(
        "version: 1
listeners:
  mongodb: {{ bind: \"127.0.0.1:{port}\", tls: terminate, certificates: certs }}
agents:
  agent-7: {{ address: 127.0.0.1 }}
backends:
  agent-7-db: {{ servers: [ {{ agent: agent-7, port: {} }} ] }}
  agent-8-db: {{ servers: [ {{ address: 127.0.0.1, port: {} }} ] }}
domains:
  agent-7.mongodb.example.com: {{ backend: agent-7-db, listener: mongodb }}
  agent-8.mongodb.example.com: {{ backend: agent-8-db, listener: mongodb }}
{}",
        db7.port,
        db8.port,
        target_block(dir.path())
    );
    write(dir.path(), "state.yaml", &state);
    let _haproxy = render_and_start(dir.path(), &[port]);

    // HAProxy presents its certificate (verified by the client) and forwards plain TCP.
    let reply = tls_exchange(&ca, port, "agent-7.mongodb.example.com", "hello").unwrap();
    assert_eq!(reply, "tcp-backend=agent-7-db got=hello");
    let reply = tls_exchange(&ca, port, "agent-8.mongodb.example.com", "hello").unwrap();
    assert_eq!(reply, "tcp-backend=agent-8-db got=hello");
    assert!(tls_exchange(&ca, port, "agent-9.mongodb.example.com", "hello").is_err());
    assert_eq!(
        db7.connections.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        db8.connections.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
