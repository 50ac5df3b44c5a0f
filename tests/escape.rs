//! Escape hatches on a real HAProxy: `extra:` raw lines on listeners and backends (they take
//! effect, plans mark them, what HAProxy refuses is pointed at in the state, injection through
//! them is refused) and access logs that carry status and URL (`option httplog`).

mod support;

use std::net::UdpSocket;
use std::time::{Duration, Instant};
use support::*;

fn state(site: &Site, port: u16, shop: u16, listener_extra: &str, backend_extra: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\", extra: [ {listener_extra} ] }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {shop} }} ], extra: [ {backend_extra} ] }}\ndomains:\n  shop.example.com: {{ backend: shop }}\n{}",
        site.target_block(true)
    )
}

#[test]
fn extra_lines_take_effect_and_plans_mark_them_as_raw() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    site.write_state(&state(
        &site,
        port,
        shop.port,
        "\"http-response set-header X-Front lunafront\"",
        "\"http-request return status 418 content-type text/plain string teapot if { path /teapot }\"",
    ));
    site.apply();
    let response = raw_get(port, "shop.example.com", "/");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("backend=shop"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("x-front: lunafront"),
        "the listener's extra line: {response}"
    );
    let teapot = raw_get(port, "shop.example.com", "/teapot");
    assert!(
        teapot.starts_with("HTTP/1.1 418"),
        "the backend's extra line: {teapot}"
    );

    // A change of the raw lines: a reload, marked raw in both views.
    site.write_state(&state(
        &site,
        port,
        shop.port,
        "\"http-response set-header X-Front changed\"",
        "\"http-request return status 418 content-type text/plain string teapot if { path /teapot }\"",
    ));
    let (code, text, stderr) = site.lunafront(&["plan", "state.yaml"]);
    assert_eq!(code, 0, "{stderr}");
    let marked = text
        .lines()
        .find(|l| l.contains("listener http") && l.contains("extra"))
        .unwrap_or_else(|| panic!("no extra change in the plan:\n{text}"));
    assert!(marked.starts_with("! ~ listener http"), "{marked}");
    assert!(marked.contains("reload"), "{marked}");
    assert!(
        text.contains("! Raw HAProxy lines (`extra:`) change in listener http"),
        "{text}"
    );
    let (code, json, stderr) = site.lunafront(&["plan", "state.yaml", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&json).unwrap();
    let change = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["raw"] == true)
        .unwrap_or_else(|| panic!("no raw change: {plan}"));
    assert_eq!(change["kind"], "listener");
    assert_eq!(change["name"], "http");
    assert_eq!(change["mode"], "reload");
    assert_eq!(
        change["before"]["extra"][0],
        "http-response set-header X-Front lunafront"
    );
    assert_eq!(
        change["after"]["extra"][0],
        "http-response set-header X-Front changed"
    );
    site.apply();
    assert!(
        raw_get(port, "shop.example.com", "/")
            .to_ascii_lowercase()
            .contains("x-front: changed")
    );
}

/// A line our filter lets through but HAProxy refuses: `validate --check` points at it in the
/// state, and `apply` changes nothing.
#[test]
fn a_line_haproxy_refuses_is_pointed_at_in_the_state_and_nothing_changes() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    site.write_state(&state(&site, port, shop.port, "", ""));
    site.apply();
    let before = site.live_files();
    site.write_state(&state(
        &site,
        port,
        shop.port,
        "\"http-request frobnicate now\"",
        "",
    ));
    let (code, _, stderr) = site.lunafront(&["validate", "state.yaml"]);
    assert_eq!(code, 0, "the line passes lunafront's own filter: {stderr}");
    let (code, stdout, stderr) = site.lunafront(&["validate", "--check", "state.yaml"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("state.yaml:3:45: error[haproxy-check]")
            && stderr
                .contains("error[haproxy-check]: HAProxy refuses extra line 1 of listener `http`")
            && stderr.contains("frobnicate"),
        "{stderr}"
    );
    let (code, json, _) = site.lunafront(&["validate", "--check", "--json", "state.yaml"]);
    assert_eq!(code, 1);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["haproxy_check"], "failed");
    assert_eq!(doc["diagnostics"][0]["pointer"], "/listeners/http/extra/0");
    assert_eq!(doc["diagnostics"][0]["location"]["line"], 3);

    let (code, _, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("haproxy -c"), "{stderr}");
    assert_eq!(site.live_files(), before, "nothing was written");
    assert_eq!(http_get(port, "shop.example.com", "/").unwrap().0, 200);
}

/// Raw lines cannot smuggle in what the rest of the state cannot: another line, another
/// section, the daemon's environment (its admin token), or an agent writing raw lines into
/// an entry it owns through the API.
#[test]
fn injection_through_extra_lines_is_refused_at_its_place() {
    let site = Site::new();
    let cases: [(&str, &str, &str); 6] = [
        (
            "listeners",
            "\"http-request deny\\nbackend stolen\"",
            "a newline",
        ),
        ("listeners", "\"option httplog\\r\"", "carriage return"),
        ("listeners", "\"backend stolen\"", "new `backend` section"),
        (
            "listeners",
            "'http-response set-header X-Token \"${LUNAFRONT_ADMIN_TOKEN}\"'",
            "environment variable",
        ),
        ("backends", "\"option\\u0000httpchk\"", "a NUL"),
        (
            "backends",
            "\"timeout server 1m\\u2028frontend x\"",
            "U+2028",
        ),
    ];
    for (section, line, why) in cases {
        let (listener_extra, backend_extra) = if section == "listeners" {
            (line, "")
        } else {
            ("", line)
        };
        let yaml = state(&site, 8080, 9001, listener_extra, backend_extra);
        site.write_state(&yaml);
        let (code, stdout, stderr) = site.lunafront(&["validate", "state.yaml", "--json"]);
        assert_eq!(code, 1, "{line}: {stdout}{stderr}");
        let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let d = doc["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["code"] == "invalid-extra")
            .unwrap_or_else(|| panic!("{line}: {doc}"));
        assert!(d["message"].as_str().unwrap().contains(why), "{line}: {d}");
        assert_eq!(
            d["pointer"],
            format!(
                "/{section}/{}/extra/0",
                if section == "listeners" {
                    "http"
                } else {
                    "shop"
                }
            )
        );
        assert_eq!(
            d["location"]["line"],
            if section == "listeners" { 3 } else { 7 },
            "{d}"
        );
        let out = site.path().join("out");
        let (code, ..) = site.lunafront(&["render", "state.yaml", "--out", out.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(
            !out.join("haproxy.cfg").exists(),
            "{line}: render wrote nothing"
        );
    }

    // An entry an agent owns (written through the API) carries no raw lines.
    let yaml = state(&site, 8080, 9001, "", "\"timeout server 1m\"")
        .replace("  shop: {", "  shop: { owner: a1,");
    site.write_state(&yaml);
    let (code, stdout, _) = site.lunafront(&["validate", "state.yaml", "--json"]);
    assert_eq!(code, 1);
    assert!(stdout.contains("\"extra-not-allowed\""), "{stdout}");
}

/// With `global.log`, HAProxy's access log lines (syslog over UDP here) name the status and
/// the URL of each request (`option httplog`).
#[test]
fn access_logs_carry_status_and_url() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    let syslog = UdpSocket::bind("127.0.0.1:0").unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log_port = syslog.local_addr().unwrap().port();
    site.write_state(&state(&site, port, shop.port, "", "").replace(
        "version: 1\n",
        &format!("version: 1\nglobal: {{ log: \"udp@127.0.0.1:{log_port}\" }}\n"),
    ));
    site.apply();
    assert_eq!(
        http_get(port, "shop.example.com", "/orders/42?page=2")
            .unwrap()
            .0,
        200
    );
    let _ = http_get(port, "unknown.example.com", "/missing");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline
        && !(lines.iter().any(|l: &String| l.contains("/orders/42"))
            && lines.iter().any(|l: &String| l.contains("/missing")))
    {
        if let Ok(n) = syslog.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let ok = lines
        .iter()
        .find(|l| l.contains("/orders/42"))
        .unwrap_or_else(|| panic!("no access log line for the request: {lines:?}"));
    assert!(ok.contains("\"GET /orders/42?page=2 HTTP/1.1\""), "{ok}");
    assert!(ok.contains(" 200 "), "the status: {ok}");
    // An app lives in a slot backend, as a server named after it: the log names both.
    assert!(
        ok.contains(" http slot:http:") && ok.contains("/shop "),
        "frontend and backend/server: {ok}"
    );
    let missing = lines
        .iter()
        .find(|l| l.contains("/missing"))
        .unwrap_or_else(|| panic!("no access log line for the unknown host: {lines:?}"));
    assert!(missing.contains(" 404 "), "{missing}");
}
