//! Observability of the daemon on a real HAProxy: liveness (`/health`) apart from readiness
//! (`/ready`), systemd's readiness notification, JSON logs with every diagnostic in one record,
//! NO_COLOR on a terminal.

mod support;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use support::*;

fn state(site: &Site, port: u16, shop: u16, domains: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {shop} }} ] }}\ndomains:\n{domains}{}",
        site.target_block(true)
    )
}

/// Issue 16: a YAML typo made `/health` answer 503, so a liveness probe would restart a
/// daemon that keeps serving the last good state. Liveness is the daemon and HAProxy;
/// readiness is the last reconcile.
#[test]
fn a_yaml_typo_keeps_health_200_and_makes_ready_503() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    let good = state(
        &site,
        port,
        shop.port,
        "  shop.example.com: { backend: shop }\n",
    );
    site.write_state(&good);
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert_eq!(daemon.get("/health").0, 200);

    site.write_state(&good.replace("backend: shop }", "backend: shop"));
    let body = daemon.wait_for("/ready", 503, "invalid", Duration::from_secs(10));
    assert!(body.contains("not ready"), "{body}");
    let (code, body) = daemon.get("/health");
    assert_eq!(code, 200, "liveness must not depend on the state: {body}");
    assert_eq!(
        http_get(port, "shop.example.com", "/").unwrap().0,
        200,
        "HAProxy keeps serving"
    );

    // HAProxy gone: both fail.
    site.stop_haproxy();
    daemon.wait_for("/health", 503, "HAProxy", Duration::from_secs(10));
    assert_eq!(daemon.get("/ready").0, 503);
}

/// Reads datagrams until one contains `needle` (or the deadline passes); returns all read.
fn read_until(socket: &UnixDatagram, needle: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.contains(needle);
            seen.push(text);
            if done {
                break;
            }
        }
    }
    seen
}

/// `Type=notify`: READY=1 is sent once the first reconcile succeeded, not before (a state
/// that does not validate keeps the unit "activating", with the reason in STATUS=).
#[test]
fn systemd_hears_ready_only_after_the_first_successful_reconcile() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    let good = state(
        &site,
        port,
        shop.port,
        "  shop.example.com: { backend: shop }\n",
    );
    site.write_state(&good.replace("backend: shop }", "backend: nope }"));
    let socket_path = site.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let daemon = Daemon::start_with_env(
        site.path(),
        "state.yaml",
        &[],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let before = read_until(&socket, "STATUS=", Duration::from_secs(20));
    let status = before.join("\n");
    assert!(
        status.contains("STATUS=last reconcile invalid"),
        "the status says why it is not ready: {status}\n{}",
        daemon.log_text()
    );
    assert!(!status.contains("READY=1"), "{status}");
    assert_eq!(daemon.get("/ready").0, 503);

    site.write_state(&good);
    let after = read_until(&socket, "READY=1", Duration::from_secs(20)).join("\n");
    assert!(
        after.contains("READY=1"),
        "no READY=1 after a successful reconcile: {after}\n{}",
        daemon.log_text()
    );
    // By then the desired state is live.
    assert_eq!(http_get(port, "shop.example.com", "/").unwrap().0, 200);
    assert_eq!(daemon.get("/ready").0, 200);
}

/// `--log-format json`: every line on stderr is one JSON object, and a reconcile refused for
/// several problems is one record holding all their diagnostics.
#[test]
fn json_logs_are_one_object_per_event_with_every_diagnostic_in_one_record() {
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    let good = state(
        &site,
        port,
        shop.port,
        "  shop.example.com: { backend: shop }\n  blog.example.com: { backend: shop }\n",
    );
    site.write_state(&good);
    let daemon = Daemon::start(site.path(), "state.yaml", &["--log-format", "json"]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    // Two errors in one state.
    site.write_state(
        &good
            .replace(
                "shop.example.com: { backend: shop }",
                "shop.example.com: { backend: nope }",
            )
            .replace(
                "blog.example.com: { backend: shop }",
                "blog.example.com: { backend: gone }",
            ),
    );
    daemon.wait_for("/ready", 503, "invalid", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let log = daemon.log_text();
        let found = log
            .lines()
            .find(|l| l.contains("unknown-backend"))
            .map(String::from);
        if let Some(line) = found {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no reconcile error logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["level"], "ERROR", "{record}");
    assert_eq!(record["result"], "invalid", "{record}");
    let diagnostics = record["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.contains("`nope`") && diagnostics.contains("`gone`"),
        "both diagnostics in the one record: {record}"
    );
    for line in daemon.log_text().lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
        assert!(
            value["timestamp"].is_string() && value["level"].is_string(),
            "{line}"
        );
    }
}

/// Runs the daemon with stderr on a pseudo-terminal (as an operator's shell would be) until
/// it answers, and returns what it wrote there.
fn daemon_on_a_terminal(env: &[(&str, &str)]) -> String {
    use std::os::fd::{FromRawFd, OwnedFd};
    let site = Site::new();
    let shop = http_backend("shop");
    let port = free_port();
    site.write_state(&state(
        &site,
        port,
        shop.port,
        "  shop.example.com: { backend: shop }\n",
    ));
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors we then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let listen = free_port();
    let mut command = lunafront();
    // Only what the test sets: the environment it runs in may set NO_COLOR itself.
    command.env_remove("NO_COLOR");
    let mut child = command
        .args(["daemon", "state.yaml", "--target", "local", "--listen"])
        .arg(format!("127.0.0.1:{listen}"))
        .envs(env.iter().copied())
        .current_dir(site.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(slave))
        .spawn()
        .unwrap();
    // The command holds the terminal's other end until dropped: the reader would never
    // see it close.
    drop(command);
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the daemon (the last holder of the terminal) exits.
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(listen, "127.0.0.1", "/ready"), Ok((200, _))) {
        assert!(Instant::now() < deadline, "the daemon never got ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    site.stop_haproxy();
    reader.join().unwrap()
}

/// Logs on a terminal are coloured, unless NO_COLOR is set (https://no-color.org).
#[test]
fn logs_on_a_terminal_respect_no_color() {
    let coloured = daemon_on_a_terminal(&[]);
    assert!(
        coloured.contains("\x1b["),
        "on a terminal the logs are coloured (the test can see colour): {coloured:?}"
    );
    let plain = daemon_on_a_terminal(&[("NO_COLOR", "1")]);
    assert!(plain.contains("listening on"), "{plain:?}");
    assert!(
        !plain.contains("\x1b["),
        "NO_COLOR=1 but coloured: {plain:?}"
    );
}
