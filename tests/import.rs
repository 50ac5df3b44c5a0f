//! `lunafront import` round-trips what the original CloudLunacy front generated: a
//! configuration with one ACL and one `use_backend` per host (HTTP by Host header, MongoDB by
//! TLS SNI) plus a frontend routing through a host map is generated here, served by a real
//! HAProxy, imported, applied by lunafront, and every host must reach the same backend
//! through both.

mod support;

use std::collections::BTreeMap;
use support::*;

const APPS: usize = 12;

struct Generated {
    config: String,
    map: String,
    /// (port, host, expected body prefix) of every HTTP route.
    http: Vec<(u16, String)>,
    sni: Vec<String>,
}

/// The shape the CloudLunacy front wrote through the Data Plane API: `acl host-<agent>-<app>
/// hdr(host) -i <domain>` + `use_backend <agent>-<app>-backend if host-<agent>-<app>`, and
/// `acl host-<agent>-mongo req_ssl_sni -i <agent>.<mongodb domain>` on its TCP frontend.
fn generate(
    dir: &std::path::Path,
    ports: (u16, u16, u16),
    apps: &[u16],
    mongo: &[(String, u16)],
) -> Generated {
    let (http_port, tcp_port, map_port) = ports;
    let mut front = format!(
        "global\n    stats socket {}/orig.sock mode 600 level admin\n    maxconn 2000\n\ndefaults\n    log global\n    mode http\n    option httplog\n    timeout connect 5000ms\n    timeout client 50000ms\n    timeout server 50000ms\n\nfrontend https-in\n    bind 127.0.0.1:{http_port}\n    mode http\n    option forwardfor\n",
        dir.display()
    );
    let mut backends = String::new();
    let mut http = Vec::new();
    for (i, port) in apps.iter().enumerate() {
        let agent = format!("agent{}", i % 3);
        let app = format!("app{i}");
        let host = format!("{app}.apps.example.com");
        front.push_str(&format!(
            "    acl host-{agent}-{app} hdr(host) -i {host}\n    use_backend {agent}-{app}-backend if host-{agent}-{app}\n"
        ));
        backends.push_str(&format!(
            "\nbackend {agent}-{app}-backend\n    mode http\n    server {agent}-{app} 127.0.0.1:{port} check\n"
        ));
        http.push((http_port, host));
    }
    front.push_str("    default_backend node-app-backend\n");
    front.push_str(&format!(
        "\nfrontend tcp-in\n    bind 127.0.0.1:{tcp_port}\n    mode tcp\n    option tcplog\n    tcp-request inspect-delay 5s\n    tcp-request content accept if {{ req_ssl_hello_type 1 }}\n"
    ));
    let mut sni = Vec::new();
    for (agent, port) in mongo {
        let host = format!("{agent}.mongodb.example.com");
        front.push_str(&format!(
            "    acl host-{agent}-mongo req_ssl_sni -i {host}\n    use_backend {agent}-mongodb-backend if host-{agent}-mongo\n"
        ));
        backends.push_str(&format!(
            "\nbackend {agent}-mongodb-backend\n    mode tcp\n    server {agent}-mongo 127.0.0.1:{port} check\n"
        ));
        sni.push(host);
    }
    // A frontend routing through a host map, to apps already above.
    front.push_str(&format!(
        "\nfrontend maps-in\n    bind 127.0.0.1:{map_port}\n    mode http\n    use_backend %[req.hdr(host),lower,map({}/original/hosts.map,node-app-backend)]\n",
        dir.display()
    ));
    let mut map = String::new();
    for i in 0..3 {
        let host = format!("mapped{i}.example.com");
        map.push_str(&format!("{host} agent{}-app{i}-backend\n", i % 3));
        http.push((map_port, host));
    }
    backends.push_str(
        "\nbackend node-app-backend\n    mode http\n    http-request return status 503\n",
    );
    Generated {
        config: format!("{front}{backends}"),
        map,
        http,
        sni,
    }
}

/// What each route answers: the HTTP body's first word, or the TLS backend's name.
fn observe(g: &Generated, ca: &TestCa, tcp_port: u16) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    for (port, host) in &g.http {
        let (status, body) = http_get(*port, host, "/").unwrap();
        let first = body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        seen.insert(format!("{port} {host}"), format!("{status} {first}"));
    }
    for host in &g.sni {
        let reply = tls_exchange(ca, tcp_port, host, "ping").unwrap();
        let first = reply
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        seen.insert(format!("sni {host}"), first);
    }
    seen
}

#[test]
fn import_round_trips_a_generated_acl_chain_config_through_a_real_haproxy() {
    let site = Site::new();
    let apps: Vec<Server> = (0..APPS)
        .map(|i| http_backend(&format!("app{i}")))
        .collect();
    let ca = TestCa::new();
    let mongo: Vec<(String, Server)> = (0..2)
        .map(|i| {
            let agent = format!("agent{i}");
            let leaf = ca.leaf(&[&format!("{agent}.mongodb.example.com")]);
            (agent.clone(), tls_backend(&format!("mongo-{agent}"), &leaf))
        })
        .collect();
    let ports = (free_port(), free_port(), free_port());
    let g = generate(
        site.path(),
        ports,
        &apps.iter().map(|a| a.port).collect::<Vec<_>>(),
        &mongo
            .iter()
            .map(|(a, s)| (a.clone(), s.port))
            .collect::<Vec<_>>(),
    );
    let original = write(site.path(), "original/haproxy.cfg", &g.config);
    write(site.path(), "original/hosts.map", &g.map);

    let before = {
        let _haproxy = Haproxy::start(
            &original,
            &site.path().join("orig-master.sock"),
            &[ports.0, ports.1, ports.2],
        );
        observe(&g, &ca, ports.1)
    };
    assert_eq!(before.len(), APPS + 3 + 2);
    for (route, answer) in &before {
        assert!(
            answer.starts_with("200 backend=") || answer.starts_with("tls-backend="),
            "the original serves {route}: {answer}"
        );
    }

    let imported = site.path().join("state.yaml");
    let (code, stdout, stderr) = site.lunafront(&[
        "import",
        original.to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // What could not be translated is said, with its line.
    assert!(
        stderr.contains("not translated: default_backend node-app-backend (unknown hosts get lunafront's 404 page)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "Imported 3 listener(s), {} backend(s), {} domain(s) into {}",
            APPS + 2,
            APPS + 3 + 2,
            imported.display()
        )),
        "{stderr}"
    );
    let mut state = std::fs::read_to_string(&imported).unwrap();
    state.push_str(&site.target_block(true));
    site.write_state(&state);
    let (code, stdout, stderr) = site.lunafront(&["validate", "--check", "state.yaml"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}\n{state}");
    site.apply();

    let after = observe(&g, &ca, ports.1);
    assert_eq!(
        before, after,
        "the same host → backend routing through lunafront"
    );
    // And the JSON report parses, listing the same untranslated lines.
    let (code, json, _) = site.lunafront(&["import", original.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["domains"], APPS + 5);
    assert!(
        doc["untranslated"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |u| u["text"] == "default_backend node-app-backend" && u["line"].as_u64().is_some()
            ),
        "{doc}"
    );
    drop(mongo);
}
