//! The Grafana dashboard (examples/grafana/lunafront-dashboard.json) asks only for what is
//! really served: every metric and every label its queries name appears in the /metrics of a
//! live daemon or of the HAProxy it runs (its Prometheus exporter on `global.stats`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use support::*;

/// Metric name → the label names it is served with, from Prometheus' text format.
fn exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_string()).or_default();
        if let Some(rest) = line[end..].strip_prefix('{') {
            let inner = &rest[..rest.find('}').expect("closing brace")];
            for pair in inner.split(',').filter(|p| !p.is_empty()) {
                labels.insert(pair.split('=').next().unwrap().trim().to_string());
            }
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The expression without its string literals (label values, `$variables`).
fn without_strings(expr: &str) -> String {
    expr.split('"').step_by(2).collect::<Vec<_>>().join("\"\"")
}

/// The metric names a PromQL expression selects (ours, HAProxy's and the process collector's).
fn metrics_of(expr: &str) -> BTreeSet<String> {
    without_strings(expr)
        .split(|c: char| !is_ident(c))
        .filter(|w| {
            ["lunafront_", "haproxy_", "process_"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .map(String::from)
        .collect()
}

/// The label names an expression groups by or matches on (`job` is Prometheus' own).
fn labels_of(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find(" by (") {
        let inner = &rest[i + 5..];
        let end = inner.find(')').unwrap();
        out.extend(inner[..end].split(',').map(|l| l.trim().to_string()));
        rest = &inner[end..];
    }
    let mut rest = expr;
    while let Some(i) = rest.find('{') {
        let inner = &rest[i + 1..];
        let end = inner.find('}').unwrap();
        for matcher in inner[..end].split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|c| is_ident(*c))
                .collect();
            out.insert(name);
        }
        rest = &inner[end..];
    }
    out.remove("job");
    out.remove("");
    out
}

#[test]
fn every_query_of_the_dashboard_names_metrics_a_live_daemon_and_haproxy_serve() {
    let site = Site::new();
    let shop = http_backend("shop");
    let (port, stats) = (free_port(), free_port());
    site.write_state(&format!(
        "version: 1\nglobal: {{ stats: {{ bind: \"127.0.0.1:{stats}\" }} }}\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ], health_check: {{ path: / }} }}\ndomains:\n  shop.example.com: {{ backend: shop }}\n{}",
        shop.port,
        site.target_block(true)
    ));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert_eq!(http_get(port, "shop.example.com", "/").unwrap().0, 200);
    assert_eq!(http_get(port, "nobody.example.com", "/").unwrap().0, 404);

    let (code, ours) = daemon.get("/metrics");
    assert_eq!(code, 200);
    let (code, haproxy) = http_get(stats, "127.0.0.1", "/metrics").unwrap();
    assert_eq!(code, 200, "HAProxy's exporter on global.stats");
    let mut served = exposition(&ours);
    for (name, labels) in exposition(&haproxy) {
        served.entry(name).or_default().extend(labels);
    }
    assert!(served.contains_key("lunafront_build_info"), "{ours}");
    assert!(served.contains_key("haproxy_frontend_http_requests_total"));

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/grafana/lunafront-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            queries += 1;
            let metrics = metrics_of(expr);
            assert!(!metrics.is_empty(), "{expr} names no metric");
            for metric in &metrics {
                assert!(
                    served.contains_key(metric),
                    "panel {:?}: {metric} is not served (query {expr})",
                    panel["title"]
                );
            }
            for label in labels_of(expr) {
                assert!(
                    metrics.iter().any(|m| served[m].contains(&label)),
                    "panel {:?}: no metric of {expr} has label {label:?}",
                    panel["title"]
                );
            }
        }
    }
    assert!(queries >= 20, "{queries} queries");
}
