//! The daemon's status page (`GET /`), loaded in a real headless Chromium (Debian's `chromium`)
//! against a daemon driving a real HAProxy: what a browser shows, read from the DOM it built,
//! and a screenshot at a phone's size kept as a test artifact (target/tmp/status-page*.png).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn chromium() -> &'static str {
    for bin in ["chromium", "chromium-browser"] {
        if Command::new(bin).arg("--version").output().is_ok() {
            return bin;
        }
    }
    panic!("Chromium is needed for this test: apt-get install chromium (scripts/setup does)");
}

/// Chromium's arguments for one headless run at a phone's viewport, in its own profile.
fn chromium_args(profile: &Path) -> Vec<String> {
    vec![
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--hide-scrollbars".into(),
        format!("--user-data-dir={}", profile.display()),
        "--window-size=412,1400".into(),
    ]
}

/// The DOM Chromium built from the page.
fn dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args(chromium_args(profile.path()))
        .args(["--dump-dom", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A screenshot of the page at a phone's width, kept under target/tmp.
fn screenshot(url: &str, name: &str) -> PathBuf {
    let profile = tempfile::tempdir().unwrap();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&path);
    let out = Command::new(chromium())
        .args(chromium_args(profile.path()))
        .arg(format!("--screenshot={}", path.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&path).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG: {}", path.display());
    path
}

/// The table row (`<tr>…</tr>`) of the DOM that contains `needle`.
fn row<'a>(dom: &'a str, needle: &str) -> &'a str {
    let at = dom
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not on the page:\n{dom}"));
    let start = dom[..at].rfind("<tr>").expect("in a row");
    let end = at + dom[at..].find("</tr>").expect("row ends");
    &dom[start..end]
}

/// The section of the DOM with this id.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<section id=\"{id}\""))
        .unwrap_or_else(|| panic!("no section {id}:\n{dom}"));
    let end = start + dom[start..].find("</section>").expect("section ends");
    &dom[start..end]
}

/// Loads the page in Chromium until `ready` holds for its DOM (health checks take seconds).
fn dom_when(url: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let dom = dom(url);
        if ready(&dom) {
            return dom;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{dom}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_status_page_shows_domains_agents_servers_reconciles_errors_and_certificates_in_chromium() {
    let site = Site::new();
    let ca = TestCa::new();
    let shop = http_backend("shop");
    let healthy = http_backend("api-1");
    let closed = free_port();
    let (http, https) = (free_port(), free_port());
    write(
        site.path(),
        "certs/shop.pem",
        &ca.leaf(&["shop.example.com", "www.shop.example.com"])
            .combined(),
    );
    let state = format!(
        "version: 1
listeners:
  http: {{ bind: \"127.0.0.1:{http}\" }}
  https: {{ bind: \"127.0.0.1:{https}\", certificates: certs }}
agents:
  a1: {{ address: 127.0.0.1 }}
  a2: {{ address: 127.0.0.2, maintenance: true }}
backends:
  shop: {{ servers: [ {{ agent: a1, port: {shop} }} ] }}
  api:
    servers: [ {{ name: api-1, agent: a1, port: {healthy} }}, {{ name: api-2, agent: a1, port: {closed} }} ]
    health_check: {{ path: / }}
  old: {{ servers: [ {{ agent: a2, port: {shop} }} ] }}
domains:
  shop.example.com: {{ backend: shop }}
  api.example.com: {{ backend: api }}
  old.example.com: {{ backend: old }}
{}",
        site.target_block(true),
        shop = shop.port,
        healthy = healthy.port,
    );
    site.write_state(&state);
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let url = format!("http://127.0.0.1:{}/", daemon.port);

    let (code, _) = daemon.get("/");
    assert_eq!(code, 200);
    // Health checks mark api-2 down after a few seconds.
    let page = dom_when(&url, "api-2 DOWN", |d| {
        d.contains("api-2: DOWN") && d.contains("api-1: UP")
    });

    // Every domain with its backend, agent and live server state.
    let shop_row = row(&page, "<td>shop.example.com</td>");
    assert!(shop_row.contains("\"backend\">shop</td>"), "{shop_row}");
    assert!(shop_row.contains("\"agent\">a1</td>"), "{shop_row}");
    assert!(shop_row.contains("shop: no check"), "{shop_row}");
    let api_row = row(&page, "<td>api.example.com</td>");
    assert!(api_row.contains("api-1: UP"), "{api_row}");
    assert!(
        api_row.contains("class=\"badge down\">api-2: DOWN"),
        "{api_row}"
    );
    let old_row = row(&page, "<td>old.example.com</td>");
    assert!(old_row.contains("MAINT"), "{old_row}");
    // The agents, with their domains and maintenance.
    let agents = section(&page, "agents");
    assert!(
        row(agents, "<td>a1</td>").contains("\"domains\">2</td>"),
        "{agents}"
    );
    assert!(
        row(agents, "<td>a2</td>").contains("maintenance"),
        "{agents}"
    );
    // The applied revision and the reconcile that applied it.
    let revision = section(&page, "revision");
    assert!(revision.contains("history entry <b>1</b>"), "{revision}");
    assert!(revision.contains("runtime API answers"), "{revision}");
    let reconciles = section(&page, "reconciles");
    assert!(reconciles.contains(">applied<"), "{reconciles}");
    assert!(reconciles.contains("start"), "{reconciles}");
    // The certificate HAProxy serves, with its expiry.
    let certs = section(&page, "certificates");
    let cert_row = row(certs, "shop.example.com, www.shop.example.com");
    assert!(cert_row.contains("days left"), "{cert_row}");
    assert!(cert_row.contains("badge ok"), "{cert_row}");
    screenshot(&url, "status-page.png");

    // A typo: the error with its file:line:col, HAProxy still serving the last good state.
    site.write_state(&state.replace("backend: old }", "backend: nowhere }"));
    let page = dom_when(&url, "the error shown", |d| d.contains("id=\"errors\""));
    let errors = section(&page, "errors");
    assert!(errors.contains("invalid"), "{errors}");
    assert!(errors.contains("state.yaml:"), "{errors}");
    assert!(errors.contains("nowhere"), "{errors}");
    assert!(
        page.contains("<td>old.example.com</td>"),
        "the applied domains stay listed"
    );
    screenshot(&url, "status-page-error.png");
}

/// Whatever a tenant named its domain or backend, the page shows it as text: names come from
/// the state and the agent API, so the page must never run them.
#[test]
fn names_on_the_status_page_are_escaped() {
    let site = Site::new();
    let shop = http_backend("shop");
    let http = free_port();
    site.write_state(&format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{http}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n  shop.example.com: {{ backend: shop }}\n{}",
        shop.port,
        site.target_block(true)
    ));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    // A state that does not validate puts its text into the page's error section.
    site.write_state("version: 1\ndomains:\n  \"<script>x</script>.example.com\": { backend: \"<img src=x onerror=alert(1)>\" }\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (_, body) = daemon.get("/");
        if body.contains("id=\"errors\"") {
            break body;
        }
        assert!(Instant::now() < deadline, "no error shown:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!body.contains("<script>x"), "{body}");
    assert!(!body.contains("<img src=x"), "{body}");
    assert!(body.contains("&lt;"), "{body}");
}
