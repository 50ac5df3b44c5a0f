//! Faults a production machine sees, injected on purpose into the branches of the apply path
//! and the daemon that only run when something goes wrong: `haproxy -c` refusing once runtime
//! commands went live, a runtime command failing (the fallback reload), the file swap failing,
//! every way putting the previous configuration back can fail too (exit 4), the supervised
//! HAProxy dying, `/ready` (and `/health`) after a rolled-back apply, and drift that cannot be put back.
//!
//! The faults are real ones: an `haproxy` executable that refuses or does something on its
//! `-c` (a wrapper around the real one, named by the target's `haproxy_bin`), a master socket
//! that disappears, a file a configuration needs removed between the check and the reload,
//! folders made immutable (`chattr +i`: even root cannot write there), a port someone else
//! took, a server added by hand through the runtime API, a Data Plane API that goes down.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

/// Backends on loopback.
struct Apps {
    shop: Server,
    blog: Server,
}

impl Apps {
    fn new() -> Apps {
        Apps {
            shop: http_backend("shop"),
            blog: http_backend("blog"),
        }
    }
}

/// A state: an HTTP listener on `port`, agent `a1` (127.0.0.1) with the pooled apps shop and
/// blog, `domains` as (host, backend), `extra` YAML lines appended to `listeners:`, and the
/// site's target (its `haproxy_bin` when given; started by lunafront when `spawn`).
fn state(
    site: &Site,
    port: u16,
    apps: &Apps,
    domains: &[(&str, &str)],
    extra: &str,
    haproxy_bin: Option<&Path>,
    spawn: bool,
) -> String {
    let mut s = format!(
        "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\n{extra}agents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\n  blog: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n",
        apps.shop.port, apps.blog.port
    );
    for (host, backend) in domains {
        s.push_str(&format!("  {host}: {{ backend: {backend} }}\n"));
    }
    let mut target = site.target_block(spawn);
    if let Some(bin) = haproxy_bin {
        target = target.replace(
            "type: haproxy,",
            &format!("type: haproxy, haproxy_bin: {},", bin.display()),
        );
    }
    s.push_str(&target);
    s
}

/// `state` routing shop.example.com alone, started by lunafront (with `haproxy_bin` when given).
fn shop_state(site: &Site, port: u16, apps: &Apps, haproxy_bin: Option<&Path>) -> String {
    state(
        site,
        port,
        apps,
        &[("shop.example.com", "shop")],
        "",
        haproxy_bin,
        true,
    )
}

/// A site on a free port with the apps and a state routing shop.example.com to shop (written,
/// not applied; lunafront starts HAProxy).
fn shop_site() -> (Site, Apps, u16) {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    site.write_state(&shop_state(&site, port, &apps, None));
    (site, apps, port)
}

/// `shop_site`, applied.
fn shop_applied() -> (Site, Apps, u16) {
    let shop = shop_site();
    shop.0.apply();
    shop
}

/// An `haproxy` executable that runs `on_check` (shell) instead of the plain check when
/// lunafront runs `haproxy -c ...` while the fault is armed (`armed` exists); every other
/// use (starting, the master re-executing itself on reload) is the real HAProxy's.
struct FaultyHaproxy {
    bin: PathBuf,
    armed: PathBuf,
}

impl FaultyHaproxy {
    fn new(dir: &Path, on_check: &str) -> FaultyHaproxy {
        FaultyHaproxy::with_fault(dir, "[ \"$1\" = \"-c\" ]", on_check)
    }

    /// An `haproxy` that runs `on_start` (shell) before starting HAProxy while armed; its
    /// `-c` is the real one's. (A reload re-executes the master without this script.)
    fn on_start(dir: &Path, on_start: &str) -> FaultyHaproxy {
        FaultyHaproxy::with_fault(dir, "[ \"$1\" != \"-c\" ]", on_start)
    }

    fn with_fault(dir: &Path, when: &str, fault: &str) -> FaultyHaproxy {
        let bin = dir.join("faulty-haproxy");
        let armed = dir.join("fault-armed");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\n# haproxy with a fault injected while {armed} exists\nif {when} && [ -e {armed} ]; then\n{fault}\nfi\nexec {real} \"$@\"\n",
                armed = armed.display(),
                real = haproxy_bin(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        FaultyHaproxy { bin, armed }
    }

    fn arm(&self) {
        std::fs::write(&self.armed, "").unwrap();
    }

    fn disarm(&self) {
        let _ = std::fs::remove_file(&self.armed);
    }
}

/// `chattr +i`: nothing can be created, removed or renamed in the folder (not even by root)
/// until the guard is dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn new(path: &Path) -> Immutable {
        chattr("+i", path);
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, path: &Path) {
    let out = Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .expect("chattr (e2fsprogs) runs");
    assert!(
        out.status.success(),
        "chattr {flag} {}: {} (these tests run as root on a file system with attributes, as CI does)",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `show proc` says changed between two readings: (reloads, failed reloads).
fn proc_counters(site: &Site) -> (u32, u32) {
    let proc = site
        .master()
        .show_proc(Duration::from_secs(2))
        .expect("master answers");
    (proc.reloads, proc.failed)
}

fn serves(port: u16, host: &str, backend: &str) -> bool {
    http_get(port, host, "/").is_ok_and(|(status, body)| {
        status == 200 && body.starts_with(&format!("backend={backend} "))
    })
}

/// Moves the master socket away (as a `/run` cleanup would) until dropped.
struct HiddenSocket {
    path: PathBuf,
    hidden: PathBuf,
}

impl HiddenSocket {
    fn shell(path: &Path) -> String {
        format!("mv {} {}.hidden", path.display(), path.display())
    }

    fn guard(path: &Path) -> HiddenSocket {
        HiddenSocket {
            path: path.to_path_buf(),
            hidden: PathBuf::from(format!("{}.hidden", path.display())),
        }
    }
}

impl Drop for HiddenSocket {
    fn drop(&mut self) {
        if self.hidden.exists() {
            let _ = std::fs::rename(&self.hidden, &self.path);
        }
    }
}

// ---- The apply path ----

/// The shop applied through a `FaultyHaproxy` whose armed `haproxy -c` runs `before_refusing`
/// (shell, given the site) and then refuses the configuration.
fn shop_behind_a_refusing_check(
    before_refusing: impl FnOnce(&Site) -> String,
) -> (Site, Apps, u16, FaultyHaproxy) {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    let faulty = FaultyHaproxy::new(
        site.path(),
        &format!(
            "{}\necho '[ALERT] (injected) the configuration is refused' >&2; exit 1",
            before_refusing(&site)
        ),
    );
    site.write_state(&shop_state(&site, port, &apps, Some(faulty.bin.as_path())));
    site.apply();
    (site, apps, port, faulty)
}

/// The shop's state with blog.example.com added: a runtime change (one map entry).
fn with_blog(site: &Site, port: u16, apps: &Apps, faulty: &FaultyHaproxy) -> String {
    state(
        site,
        port,
        apps,
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        "",
        Some(faulty.bin.as_path()),
        true,
    )
}

/// A runtime change is not checked again with `haproxy -c`: HAProxy's runtime API parsed and
/// took each line that differs (the plan allows no other difference). Here `haproxy -c` refuses
/// everything, and the change still goes live and is applied; the files it leaves are ones the
/// real `haproxy -c` accepts.
#[test]
fn a_runtime_change_haproxy_took_is_not_checked_again_and_its_files_pass_haproxy_c() {
    let (site, apps, port, faulty) = shop_behind_a_refusing_check(|_| String::new());
    let counters = proc_counters(&site);

    faulty.arm();
    site.write_state(&with_blog(&site, port, &apps, &faulty));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(serves(port, "blog.example.com", "blog"));
    assert!(serves(port, "shop.example.com", "shop"));
    assert_eq!(
        proc_counters(&site),
        counters,
        "a runtime change, no reload"
    );
    faulty.disarm();
    let config = site.path().join("live/haproxy.cfg");
    assert!(
        site.live_files()
            .values()
            .any(|t| String::from_utf8_lossy(t).contains("blog.example.com"))
    );
    lunafront::target::haproxy::process::check_config(Path::new(&haproxy_bin()), &config)
        .expect("the files a runtime change leaves pass haproxy -c");
}

/// The runtime socket moved away: no runtime command can go through. `restore_runtime_socket`
/// (shell) puts it back before a reload: the new worker takes over the old one's sockets, this
/// one included, by their path.
fn hide_runtime_socket(site: &Site) {
    let socket = site.path().join("state/admin.sock");
    std::fs::rename(&socket, site.path().join("state/admin.sock.hidden")).unwrap();
}

fn restore_runtime_socket(site: &Site) -> String {
    let socket = site.path().join("state/admin.sock");
    format!(
        "mv {}.hidden {} 2>/dev/null",
        socket.display(),
        socket.display()
    )
}

#[test]
fn a_runtime_change_that_fails_is_reloaded_only_onto_files_haproxy_c_accepts() {
    let (site, apps, port, faulty) = shop_behind_a_refusing_check(restore_runtime_socket);
    let before = site.live_files();
    let counters = proc_counters(&site);

    // A new domain: a runtime change, which cannot go through; the reload that replaces it
    // needs `haproxy -c` to accept the files, and it refuses them.
    faulty.arm();
    hide_runtime_socket(&site);
    site.write_state(&with_blog(&site, port, &apps, &faulty));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("HAProxy refused the new configuration (haproxy -c); nothing was changed")
            && stderr.contains("(injected) the configuration is refused"),
        "{stderr}"
    );
    // The files were never replaced, and HAProxy was reloaded on them once (whatever the
    // failed runtime change left is gone).
    assert_eq!(site.live_files(), before);
    assert_eq!(proc_counters(&site), (counters.0 + 1, counters.1));
    assert_eq!(http_get(port, "blog.example.com", "/").unwrap().0, 404);
    assert!(serves(port, "shop.example.com", "shop"));
    let (code, history, _) = site.lunafront(&["history", "state.yaml"]);
    assert_eq!((code, history.lines().count()), (0, 2), "{history}");
}

#[test]
fn haproxy_c_refusing_and_the_master_gone_is_exit_4() {
    let master = |site: &Site| site.path().join("state/master.sock");
    let (site, apps, port, faulty) = shop_behind_a_refusing_check(|site| {
        format!(
            "{}\n{}",
            restore_runtime_socket(site),
            HiddenSocket::shell(&master(site))
        )
    });
    let before = site.live_files();

    faulty.arm();
    hide_runtime_socket(&site);
    let _hidden = HiddenSocket::guard(&master(&site));
    site.write_state(&with_blog(&site, port, &apps, &faulty));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 4, "{stdout}{stderr}");
    assert!(
        stderr.contains("haproxy -c refused the new files")
            && stderr.contains("the master CLI is unreachable")
            && stderr.contains("HAProxy needs attention"),
        "{stderr}"
    );
    // The refused files never reached the disk.
    assert_eq!(site.live_files(), before);
}

#[test]
fn a_runtime_command_that_fails_falls_back_to_a_reload() {
    let (site, apps, port) = shop_applied();
    let (reloads, workers) = site.generation();

    // Someone already added the server the next apply adds, by hand, at another address: the
    // apply's `add server` is refused, and a reload brings HAProxy to the files instead.
    let fresh = http_backend("fresh");
    let yaml = state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop"), ("fresh.example.com", "fresh")],
        "",
        None,
        true,
    )
    .replace(
        "domains:\n",
        &format!(
            "  fresh: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n",
            fresh.port
        ),
    );
    site.write_state(&yaml);
    // The slot the plan gives the new app (`add server slot:http:N/fresh: …`).
    let (_, plan, _) = site.lunafront(&["plan", "state.yaml", "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let reason = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "backend" && c["name"] == "fresh")
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_else(|| panic!("no change for backend fresh: {plan}"))
        .to_string();
    let slot = reason
        .strip_prefix("add server ")
        .and_then(|r| r.split_once("/fresh"))
        .map(|(slot, _)| slot.to_string())
        .unwrap_or_else(|| panic!("a runtime add server: {reason}"));
    site.runtime()
        .run(
            &format!("add server {slot}/fresh 127.0.0.1:9"),
            lunafront::target::haproxy::socket::Expect::Prefix("New server registered"),
        )
        .unwrap();
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("the runtime change did not go through")
            && stdout.contains("reloaded instead"),
        "{stdout}"
    );
    let (reloads_after, workers_after) = site.generation();
    assert_eq!(reloads_after, reloads + 1, "exactly one reload");
    assert!(workers_after.iter().all(|w| !workers.contains(w)));
    assert!(serves(port, "fresh.example.com", "fresh"));
    assert!(serves(port, "shop.example.com", "shop"));
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 0, "{plan}");
}

#[test]
fn a_file_swap_that_fails_is_rolled_back_with_exit_3() {
    let (site, apps, port) = shop_applied();
    let before = site.live_files();
    let (reloads, _) = site.generation();

    // A new listener with a domain of its own (a reload): the swap must create its map in a
    // folder nothing can be written to.
    let alt = free_port();
    let _maps = Immutable::new(&site.path().join("live/maps"));
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[
            ("shop.example.com", "shop"),
            ("alt.example.com", "blog, listener: alt"),
        ],
        &format!("  alt: {{ bind: \"127.0.0.1:{alt}\" }}\n"),
        None,
        true,
    ));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(
        stderr.contains("writing the files")
            && stderr.contains("listener-alt.map")
            && stderr.contains("the previous configuration was put back and HAProxy runs it again"),
        "{stderr}"
    );
    assert_eq!(site.live_files(), before, "the files were not put back");
    // Nothing went live at runtime and no file changed: HAProxy runs the files as they are,
    // with no needless reload (before issue 11's rollback, it was reloaded anyway).
    assert_eq!(site.generation().0, reloads, "a needless reload");
    assert!(serves(port, "shop.example.com", "shop"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", alt)).is_err());
}

/// The file swap fails on haproxy.cfg after it replaced hosts.map, and putting the old
/// hosts.map back fails too (an I/O error at the worst moment, injected by an LD_PRELOAD shim
/// that fails chosen renames: `support/fail_rename.c`). Exit 4, HAProxy reloaded onto the files
/// as they are (never left with runtime changes no file holds), and `plan` shows what differs.
#[test]
fn files_that_cannot_be_restored_after_a_failed_swap_are_exit_4() {
    let (site, apps, port) = shop_applied();
    let before = site.live_files();
    let (reloads, failed) = proc_counters(&site);

    // A new listener (a reload) and a new domain in hosts.map: hosts.map is written first,
    // then haproxy.cfg fails, then restoring hosts.map fails.
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        &format!("  alt: {{ bind: \"127.0.0.1:{}\" }}\n", free_port()),
        None,
        true,
    ));
    let out = lunafront()
        .args(["apply", "state.yaml", "--auto-approve"])
        .current_dir(site.path())
        .env("LD_PRELOAD", fail_rename_shim())
        .env(
            "LUNAFRONT_FAIL_RENAME",
            "live/haproxy.cfg@1,live/maps/hosts.map@2",
        )
        .output()
        .expect("run lunafront");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(4), "{stdout}{stderr}");
    assert!(
        stderr.contains("writing the files")
            && stderr.contains("haproxy.cfg")
            && stderr.contains("restoring the files")
            && stderr.contains("hosts.map")
            && stderr.contains("HAProxy was reloaded onto the files as they are"),
        "{stderr}"
    );
    let after = site.live_files();
    assert_eq!(after["haproxy.cfg"], before["haproxy.cfg"]);
    assert_ne!(after["maps/hosts.map"], before["maps/hosts.map"]);
    // HAProxy runs what the files say (one reload, not failed), and still serves.
    assert_eq!(proc_counters(&site), (reloads + 1, failed));
    assert!(serves(port, "shop.example.com", "shop"));
    // The next plan shows what differs, and applying it converges.
    let (code, plan, _) = site.lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 2, "{plan}");
    site.apply();
    assert!(serves(port, "blog.example.com", "blog"));
}

/// Builds `support/fail_rename.c` once (gcc: build-essential, which scripts/setup installs).
fn fail_rename_shim() -> PathBuf {
    static SHIM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SHIM.get_or_init(|| {
        let out =
            std::env::temp_dir().join(format!("lunafront-fail-rename-{}.so", std::process::id()));
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fail_rename.c");
        let status = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(&source)
            .arg("-ldl")
            .status()
            .expect("cc runs (build-essential)");
        assert!(status.success(), "cannot build {}", source.display());
        out
    })
    .clone()
}

#[test]
fn a_reload_that_fails_and_whose_rollback_reload_fails_too_is_exit_4() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    // A backend verified against a CA file; removed right after `haproxy -c` accepted the
    // files (a package upgrade, a cleanup), every reload from then on fails.
    let ca = TestCa::new();
    let ca_file = write(site.path(), "ca/ca.pem", &ca.cert_pem);
    let faulty = FaultyHaproxy::new(
        site.path(),
        &format!(
            "{} \"$@\" || exit $?\nrm -f {}\nexit 0",
            haproxy_bin(),
            ca_file.display()
        ),
    );
    let bin = Some(faulty.bin.as_path());
    let with_tls = |yaml: String| {
        yaml.replace(
            "  blog: { servers:",
            &format!(
                "  blog: {{ tls: {{ verify: true, ca_file: {} }}, servers:",
                ca_file.display()
            ),
        )
    };
    let domains = [("shop.example.com", "shop"), ("blog.example.com", "blog")];
    site.write_state(&with_tls(state(
        &site, port, &apps, &domains, "", bin, true,
    )));
    site.apply();
    let before = site.live_files();
    let (reloads, failed) = proc_counters(&site);

    faulty.arm();
    // A global setting: a reload.
    site.write_state(
        &with_tls(state(&site, port, &apps, &domains, "", bin, true))
            .replace("targets:", "global:\n  timeouts: { tunnel: 2h }\ntargets:"),
    );
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 4, "{stdout}{stderr}");
    assert!(
        stderr
            .matches("HAProxy refused the new configuration on reload")
            .count()
            == 2
            && stderr.contains("HAProxy needs attention"),
        "{stderr}"
    );
    assert_eq!(site.live_files(), before, "the previous files are not back");
    // Two reloads tried, both failed; the workers that ran before still serve.
    let (reloads_after, failed_after) = proc_counters(&site);
    assert_eq!(
        failed_after,
        failed + 2,
        "reloads {reloads} -> {reloads_after}"
    );
    assert!(serves(port, "shop.example.com", "shop"));
}

#[test]
fn haproxy_that_cannot_start_again_after_a_failed_start_is_exit_4() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    let domains = [("shop.example.com", "shop")];
    site.write_state(&state(&site, port, &apps, &domains, "", None, true));
    site.apply();
    site.stop_haproxy();
    let before = site.live_files();

    // HAProxy is down and someone took its port: starting on the new files fails, and
    // starting again on the previous ones fails the same way.
    let taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        "",
        None,
        true,
    ));
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 4, "{stdout}{stderr}");
    assert!(
        stderr.matches("HAProxy did not start").count() == 2
            && stderr.contains("HAProxy needs attention"),
        "{stderr}"
    );
    assert_eq!(site.live_files(), before);
    assert!(site.master().show_proc(Duration::from_millis(200)).is_err());
    drop(taken);
}

#[test]
fn a_master_that_disappears_during_an_apply_is_exit_4() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    let master = site.path().join("state/master.sock");
    let faulty = FaultyHaproxy::new(
        site.path(),
        &format!(
            "{} \"$@\" || exit $?\n{}\nexit 0",
            haproxy_bin(),
            HiddenSocket::shell(&master)
        ),
    );
    let bin = Some(faulty.bin.as_path());
    // An operator's HAProxy (not started by lunafront).
    let domains = [("shop.example.com", "shop")];
    std::fs::create_dir_all(site.path().join("state")).unwrap();
    site.write_state(&state(&site, port, &apps, &domains, "", bin, false));
    assert_eq!(
        site.lunafront(&["render", "state.yaml", "--out", "live"]).0,
        0
    );
    let _haproxy = Haproxy::start(&site.path().join("live/haproxy.cfg"), &master, &[port]);
    site.apply();
    let before = site.live_files();

    // A reload is needed; the master socket is gone by the time it is asked for.
    faulty.arm();
    let _hidden = HiddenSocket::guard(&master);
    site.write_state(
        &state(&site, port, &apps, &domains, "", bin, false)
            .replace("targets:", "global:\n  timeouts: { tunnel: 2h }\ntargets:"),
    );
    let (code, stdout, stderr) = site.lunafront(&["apply", "state.yaml", "--auto-approve"]);
    assert_eq!(code, 4, "{stdout}{stderr}");
    assert!(
        stderr.contains("the master CLI is unreachable")
            && stderr.contains("HAProxy is not running")
            && stderr.contains("HAProxy needs attention"),
        "{stderr}"
    );
    assert_eq!(site.live_files(), before, "the previous files are not back");
    assert!(serves(port, "shop.example.com", "shop"));
}

#[test]
fn a_data_plane_api_that_goes_down_during_an_apply_is_exit_4() {
    use support::dpapi::{DataplaneApi, Faults};
    let api_dir = TempDir::new().unwrap();
    let work = TempDir::new().unwrap();
    let port = free_port();
    let api = DataplaneApi::start(api_dir.path(), "pw-0123456789", port);
    let apps = Apps::new();
    let write_state = |extra: &str| {
        std::fs::write(
            work.path().join("state.yaml"),
            format!(
                "version: 1\nlisteners:\n  http: {{ bind: \"127.0.0.1:{port}\" }}\n{extra}agents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n  shop.example.com: {{ backend: shop }}\ntargets:\n  edge: {{ type: dataplane, url: \"{}\", username: admin, password_env: DPAPI_PASSWORD, timeout: 5s, maps_dir: {d}/maps, runtime_socket: {d}/admin.sock, state_dir: {d}/lunafront }}\n",
                apps.shop.port,
                api.url(),
                d = api.dir.display()
            ),
        )
        .unwrap();
    };
    let apply = || {
        let out = lunafront()
            .args(["apply", "state.yaml", "--auto-approve"])
            .current_dir(work.path())
            .env("DPAPI_PASSWORD", "pw-0123456789")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    write_state("");
    assert_eq!(apply().0, 0);
    let before = api.config_file();

    // The push is answered 500, and the API stays down while lunafront reads what it holds
    // to put the previous configuration back.
    api.set_faults(Faults {
        push_errors: 1,
        then_errors: 100,
        ..Faults::default()
    });
    write_state(&format!(
        "  alt: {{ bind: \"127.0.0.1:{}\" }}\n",
        free_port()
    ));
    let (code, stderr) = apply();
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("target edge: the apply failed")
            && stderr.contains("pushing the configuration: the Data Plane API answered 500")
            && stderr.contains("putting the previous configuration back failed too")
            && stderr.contains("reading the configuration"),
        "{stderr}"
    );
    // The failed push changed nothing that HAProxy runs.
    assert_eq!(api.config_file(), before);
    api.set_faults(Faults::default());
    assert!(serves(port, "shop.example.com", "shop"));
}

// ---- The daemon ----

#[test]
fn the_supervisor_restarts_a_dead_haproxy_backing_off_while_it_cannot_start() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    let faulty = FaultyHaproxy::new(
        site.path(),
        "echo '[ALERT] (injected) cannot start' >&2; exit 1",
    );
    let bin = Some(faulty.bin.as_path());
    site.write_state(&shop_state(&site, port, &apps, bin));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    // The first reconcile is over: the start it made is no longer being waited for.
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert!(serves(port, "shop.example.com", "shop"));

    // HAProxy dies (SIGKILL to its master), and cannot start for a while: each attempt fails
    // at `haproxy -c`, and the supervisor waits longer after each.
    faulty.arm();
    // (Counted from here: when the supervisor looks between the first reconcile writing the
    // files and starting HAProxy, it starts HAProxy itself and counts a restart.)
    let restarted = || daemon.log_text().matches("HAProxy restarted").count();
    let restarts = restarted();
    let master = site
        .master()
        .show_proc(Duration::from_secs(2))
        .unwrap()
        .master_pid;
    kill(master);
    let failed_attempts = |log: &str| {
        log.lines()
            .filter(|l| l.contains("HAProxy restart failed"))
            .map(timestamp)
            .collect::<Vec<f64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while failed_attempts(&daemon.log_text()).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "{}\nHAProxy's log: {}",
            daemon.log_text(),
            std::fs::read_to_string(site.path().join("state/haproxy.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.wait_for(
        "/health",
        503,
        "runtime API does not answer",
        Duration::from_secs(5),
    );
    // The pauses between attempts grow: 0.5 s, then 1 s at least (lower bounds read from the
    // daemon's own clock, which a loaded machine can only make longer).
    let times = failed_attempts(&daemon.log_text());
    for (i, minimum) in [0.5, 1.0].iter().enumerate() {
        let gap = times[i + 1] - times[i];
        assert!(
            gap >= *minimum,
            "attempt {}: {gap:.3}s after the previous one: {times:?}",
            i + 2
        );
    }

    // Once it can start, it is back, and restarted once.
    faulty.disarm();
    wait_until(Duration::from_secs(30), || {
        serves(port, "shop.example.com", "shop")
    });
    daemon.wait_for("/health", 200, "ok", Duration::from_secs(10));
    wait_until(Duration::from_secs(10), || restarted() > restarts);
    assert_eq!(restarted(), restarts + 1, "{}", daemon.log_text());
}

/// A HAProxy killed from outside while the daemon still waited for its first start to answer
/// was never restarted: the supervisor restarted only a master that had answered it, so the
/// start waited out `reload_timeout`, the apply rolled back, and nothing served (seen when the
/// test above killed a master that served before the daemon's wait had seen it answer: 7 runs
/// in 42 under load). Here the daemon's child is killed while it is still starting (a wrapper
/// that sleeps before it becomes HAProxy); it is restarted and the first apply goes through.
#[test]
fn haproxy_killed_while_its_first_start_is_awaited_is_restarted_not_rolled_back() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    let faulty = FaultyHaproxy::on_start(site.path(), "sleep 3");
    faulty.arm();
    site.write_state(&shop_state(&site, port, &apps, Some(faulty.bin.as_path())));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    // The daemon records its child (the wrapper, sleeping) as the master it started.
    let record = site.path().join("state/haproxy.master");
    wait_until(Duration::from_secs(20), || record.exists());
    let child: u32 = std::fs::read_to_string(&record)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    faulty.disarm();
    kill(child);
    // Restarted at once and serving well within the 10 s `reload_timeout` the first apply
    // waits: that apply goes through instead of rolling back.
    wait_until(Duration::from_secs(7), || {
        serves(port, "shop.example.com", "shop")
    });
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(10));
    let log = daemon.log_text();
    assert_eq!(log.matches("HAProxy restarted").count(), 1, "{log}");
    assert!(!log.contains("rolled_back"), "{log}");
}

/// `lunafront_haproxy_restarts_total` counts a restart when it happens (it was copied from the
/// supervisor at each reconcile only, so a scrape between a restart and the next reconcile —
/// up to `--interval`, 30 s by default — read a count that missed it), and the first start is
/// no restart (the supervisor used to start HAProxy itself, and count it, when it looked
/// between the first reconcile writing the files and starting HAProxy: 2 runs in 8 under load).
#[test]
fn the_restart_counter_counts_a_restart_without_waiting_for_a_reconcile() {
    let (site, _apps, _) = shop_site();
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    let master = site
        .master()
        .show_proc(Duration::from_secs(2))
        .unwrap()
        .master_pid;
    let restarted = || daemon.log_text().matches("HAProxy restarted").count();
    assert_eq!(restarted(), 0, "{}", daemon.log_text());
    assert!(
        daemon
            .get("/metrics")
            .1
            .contains("lunafront_haproxy_restarts_total 0\n"),
        "the first start is no restart"
    );
    kill(master);
    wait_until(Duration::from_secs(30), || restarted() > 0);
    // The metric says as many restarts as the supervisor made.
    daemon.wait_for(
        "/metrics",
        200,
        &format!("lunafront_haproxy_restarts_total {}\n", restarted()),
        Duration::from_secs(10),
    );
}

/// A HAProxy the daemon starts that exits at once (a listener port someone else holds:
/// `haproxy -c` cannot see that) was waited for the whole reload timeout, and the daemon
/// reported only "HAProxy did not come up within 10s". It now notices the exit and reports
/// HAProxy's own reason.
#[test]
fn a_haproxy_that_exits_at_start_is_reported_with_its_reason_not_a_timeout() {
    let site = Site::new();
    let apps = Apps::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    site.write_state(&shop_state(&site, port, &apps, None));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    let status = daemon.wait_for(
        "/status",
        200,
        "cannot bind socket",
        Duration::from_secs(60),
    );
    assert!(
        status.contains("HAProxy exited before it served"),
        "{status}\n{}",
        daemon.log_text()
    );
    assert!(!status.contains("did not come up within"), "{status}");
    drop(taken);
}

/// A HAProxy the daemon starts that does not answer within `reload_timeout` (HAProxy 2.6 needs
/// 11–13 s to load 100k apps here) was left running when the apply rolled back: the live files
/// were removed, and a moment later it served the configuration it had read, recorded nowhere.
/// Here HAProxy reads its files (a hard-linked snapshot of the folder, which the rollback cannot
/// touch) and then takes 3 s to come up. The start is now stopped with the apply; with a timeout
/// it fits in (the daemon restarted), the same state starts and serves.
#[test]
fn a_start_slower_than_the_reload_timeout_is_stopped_not_left_serving_rolled_back_files() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    let slow = FaultyHaproxy::on_start(
        site.path(),
        r#"prev=
for a do
  shift
  if [ "$prev" = -f ]; then
    snap="$(dirname "$a")/../start-snapshot"
    rm -rf "$snap" && mkdir "$snap" && cp -al "$(dirname "$a")/." "$snap/"
    a="$snap/$(basename "$a")"
  fi
  set -- "$@" "$a"
  prev=$a
done
sleep 3"#,
    );
    slow.arm();
    let state = |timeout: &str| {
        shop_state(&site, port, &apps, Some(&slow.bin))
            .replace("reload_timeout: 10s", &format!("reload_timeout: {timeout}"))
    };
    site.write_state(&state("1s"));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    let status = daemon.wait_for(
        "/status",
        200,
        "did not come up within 1s",
        Duration::from_secs(30),
    );
    assert!(
        status.contains("the HAProxy it started was stopped"),
        "{status}\n{}",
        daemon.log_text()
    );
    // Longer than the slow start takes: nothing serves, no master answers, no live files.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !serves(port, "shop.example.com", "shop"),
        "a HAProxy serves a rolled-back configuration: {}",
        daemon.log_text()
    );
    assert!(site.master().show_proc(Duration::from_millis(500)).is_err());
    assert!(!site.path().join("live/haproxy.cfg").exists());

    // The daemon reads its target's settings when it starts: the operator raises the timeout
    // and restarts it.
    drop(daemon);
    site.write_state(&state("20s"));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !serves(port, "shop.example.com", "shop") {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(10));
}

#[test]
fn ready_is_503_after_a_rolled_back_apply_and_200_once_fixed_while_health_stays_200() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    let domains = [("shop.example.com", "shop")];
    site.write_state(&state(&site, port, &apps, &domains, "", None, true));
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));

    // A listener on a port someone else holds: `haproxy -c` passes, the reload fails, the
    // previous configuration is put back.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "blog")],
        &format!("  busy: {{ bind: \"127.0.0.1:{busy}\" }}\n"),
        None,
        true,
    ));
    let body = daemon.wait_for("/ready", 503, "rolled_back", Duration::from_secs(20));
    // Liveness is not readiness: HAProxy serves the previous state; no reason to restart.
    let (code, health) = daemon.get("/health");
    assert_eq!(code, 200, "{health}");
    assert!(
        body.contains("the previous configuration was put back"),
        "{body}"
    );
    let (_, status) = daemon.get("/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["last_error"]["result"], "rolled_back", "{status}");
    assert_eq!(status["haproxy"]["running"], true, "{status}");
    daemon.wait_for(
        "/metrics",
        200,
        "lunafront_reconciles_total{result=\"rolled_back\"} 1\n",
        Duration::from_secs(5),
    );
    // HAProxy still runs what it ran.
    assert!(serves(port, "shop.example.com", "shop"));

    drop(taken);
    site.write_state(&state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "blog")],
        "",
        None,
        true,
    ));
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert!(serves(port, "shop.example.com", "blog"));
}

#[test]
fn drift_that_cannot_be_put_back_is_reported_and_put_back_once_it_can() {
    let site = Site::new();
    let apps = Apps::new();
    let port = free_port();
    // A backend verified against a CA file: without the file, no reload can succeed.
    let ca = TestCa::new();
    let ca_file = write(site.path(), "ca/ca.pem", &ca.cert_pem);
    let yaml = state(
        &site,
        port,
        &apps,
        &[("shop.example.com", "shop"), ("blog.example.com", "blog")],
        "",
        None,
        true,
    )
    .replace(
        "  blog: { servers:",
        &format!(
            "  blog: {{ tls: {{ verify: true, ca_file: {} }}, servers:",
            ca_file.display()
        ),
    );
    site.write_state(&yaml);
    let daemon = Daemon::start(site.path(), "state.yaml", &["--interval", "1s"]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    // An app's server, in its slot backend.
    let slot = site.http_slot_of("shop");
    let weight = || {
        lunafront::target::haproxy::read_servers(&site.runtime(), &slot)
            .unwrap()
            .get("shop")
            .map(|s| s.weight)
    };
    let rendered_weight = weight();
    assert!(
        rendered_weight.is_some_and(|w| w != 7),
        "{rendered_weight:?}"
    );

    // Someone changes a server by hand (drift a reload puts back), and the CA file is gone.
    std::fs::remove_file(&ca_file).unwrap();
    site.runtime()
        .run(
            &format!("set server {slot}/shop weight 7"),
            lunafront::target::haproxy::socket::Expect::Empty,
        )
        .unwrap();
    let body = daemon.wait_for(
        "/ready",
        503,
        "checking runtime drift",
        Duration::from_secs(20),
    );
    assert!(
        body.contains("HAProxy refused the new configuration on reload"),
        "{body}"
    );
    let (_, metrics) = daemon.get("/metrics");
    assert!(
        metrics.contains("lunafront_drift_corrections_total 0\n"),
        "{metrics}"
    );
    assert!(serves(port, "shop.example.com", "shop"));
    assert_eq!(weight(), Some(7), "the drift is still there");

    // The file is back: the next check puts the drift back, counted once.
    write(site.path(), "ca/ca.pem", &ca.cert_pem);
    daemon.wait_for(
        "/metrics",
        200,
        "lunafront_drift_corrections_total 1\n",
        Duration::from_secs(20),
    );
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(10));
    assert_eq!(weight(), rendered_weight);
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on the HAProxy master this test's daemon started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Waits for `condition`, failing after `timeout`.
fn wait_until(timeout: Duration, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds of the day of a log line's RFC 3339 timestamp (`2026-12-01T08:30:01.425447Z …`).
fn timestamp(line: &str) -> f64 {
    let time = line
        .split_whitespace()
        .next()
        .and_then(|t| t.split('T').nth(1))
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"))
        .trim_end_matches('Z');
    let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// After a reload that failed, HAProxy's master keeps the old worker and counts a reload on
/// it (`show proc`: reloads 1), so no worker had reloads 0 and "the current generation" was
/// empty: a daemon starting beside such a HAProxy did not see it serve, waited its whole
/// reload timeout and reported it not started. The current generation is the newest one.
#[test]
fn a_daemon_adopts_a_haproxy_whose_last_reload_failed() {
    let (site, _apps, port) = shop_applied();
    assert!(serves(port, "shop.example.com", "shop"));

    // A reload HAProxy refuses (a configuration it cannot parse), then the good file back.
    let config = site.path().join("live/haproxy.cfg");
    let good = std::fs::read(&config).unwrap();
    std::fs::write(&config, "this is not a configuration\n").unwrap();
    site.master().reload().ok();
    wait_until(Duration::from_secs(20), || {
        site.master()
            .show_proc(Duration::from_secs(1))
            .is_ok_and(|p| p.failed >= 1)
    });
    std::fs::write(&config, good).unwrap();
    let proc = site.master().show_proc(Duration::from_secs(2)).unwrap();
    assert!(
        proc.workers.iter().all(|w| w.reloads >= 1),
        "the old worker carries the failed reload: {proc:?}"
    );
    assert!(serves(port, "shop.example.com", "shop"));

    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(30));
    let log = daemon.log_text();
    assert!(
        log.contains("HAProxy serves the last applied state") && !log.contains("did not come up"),
        "the daemon did not adopt the serving HAProxy:\n{log}"
    );
    assert!(serves(port, "shop.example.com", "shop"));
}
