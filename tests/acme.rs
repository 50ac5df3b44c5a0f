//! Automatic certificates against pebble, the ACME test server (Debian's `pebble` package),
//! with real validation: pebble resolves every name through pebble-challtestsrv's mock DNS
//! (127.0.0.1) and fetches HTTP-01 answers from the HAProxy lunafront runs (pebble's
//! `httpPort` is HAProxy's HTTP listener); DNS-01 records are published by a hook through
//! challtestsrv's management API. A test fails, never skips, when pebble is missing.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// pebble and pebble-challtestsrv on free loopback ports, stopped when dropped.
struct Pebble {
    pebble: Child,
    challtestsrv: Child,
    /// ACME directory: https://127.0.0.1:<port>/dir
    port: u16,
    management: u16,
    dns_management: u16,
    /// The CA of pebble's own HTTPS certificate (what `acme.ca_file` trusts).
    https_ca: TestCa,
    dir: TempDir,
}

fn require(binary: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join(binary);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "{binary} is not installed: these tests need Debian's `pebble` package (apt-get install pebble)"
    );
}

impl Pebble {
    /// pebble validating HTTP-01 on `http_port`; certificates valid `validity_seconds`.
    fn start(http_port: u16, validity_seconds: u64) -> Pebble {
        let (pebble_bin, challtestsrv_bin) = (require("pebble"), require("pebble-challtestsrv"));
        let dir = TempDir::new().unwrap();
        let https_ca = TestCa::new();
        let leaf = https_ca.leaf(&["127.0.0.1", "localhost"]);
        write(dir.path(), "cert.pem", &leaf.cert_pem);
        write(dir.path(), "key.pem", &leaf.key_pem);
        let (port, management, dns, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": "cert.pem",
            "privateKey": "key.pem",
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_seconds,
        }});
        write(dir.path(), "pebble.json", &config.to_string());
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        // Every A query is answered 127.0.0.1 (HAProxy's listener); no AAAA answers, so the
        // validation never tries ::1 where nothing listens.
        let challtestsrv = Command::new(challtestsrv_bin)
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns}"),
                "-management",
                &format!("127.0.0.1:{dns_management}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv6",
                "",
            ])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .unwrap();
        let pebble = Command::new(pebble_bin)
            .args([
                "-config",
                "pebble.json",
                "-dnsserver",
                &format!("127.0.0.1:{dns}"),
            ])
            .current_dir(dir.path())
            // No random waits before validating, no nonces refused on purpose (instant-acme
            // retries one, a test wants no luck involved), every order validated anew.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .unwrap();
        let p = Pebble {
            pebble,
            challtestsrv,
            port,
            management,
            dns_management,
            https_ca,
            dir,
        };
        assert!(
            wait_for_port(port, Duration::from_secs(20))
                && wait_for_port(management, Duration::from_secs(20))
                && wait_for_port(dns_management, Duration::from_secs(20)),
            "pebble did not start: {}",
            p.log()
        );
        p
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    fn log(&self) -> String {
        [
            "pebble.log",
            "pebble.err",
            "challtestsrv.log",
            "challtestsrv.err",
        ]
        .iter()
        .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// The root that signs pebble's certificates (management `/roots/0`), as PEM.
    fn root(&self) -> String {
        let (status, body) = https_request(
            self.https_ca.client_config(),
            self.management,
            "127.0.0.1",
            "GET /roots/0 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert!(status.contains(" 200 "), "{status}\n{body}");
        assert!(body.contains("BEGIN CERTIFICATE"), "{body}");
        body
    }

    /// challtestsrv's management API: `POST /<path>` with a JSON body.
    fn dns_admin(&self, path: &str, body: &serde_json::Value) {
        let body = body.to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", self.dns_management)).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [&mut self.pebble, &mut self.challtestsrv] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One request over TLS (server name `sni`, verified by `config`); returns the status line
/// with headers, and the body.
fn https_request(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    sni: &str,
    request: &str,
) -> std::io::Result<(String, String)> {
    let server_name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(config, server_name).map_err(std::io::Error::other)?;
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    tls.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.to_string(), body.to_string()))
}

/// A plain HTTP request; returns the head (status line and headers) and the body.
fn http_raw(port: u16, host: &str, path: &str) -> (String, String) {
    let text = raw_get(port, host, path);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// The certificate (DER) HAProxy presents for `sni`, verified against `root` (so chained to
/// it); an error when it is not.
fn served_by(root: &str, port: u16, sni: &str) -> std::io::Result<Vec<u8>> {
    served_certificate_with(client_config_trusting(root), port, sni)
}

/// The certificate HAProxy presents for `sni`, whoever signed it (no verification).
fn presented(port: u16, sni: &str) -> Vec<u8> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error};
    #[derive(Debug)]
    struct Anything;
    impl ServerCertVerifier for Anything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(Anything))
    .with_no_client_auth();
    served_certificate_with(Arc::new(config), port, sni).unwrap()
}

/// Waits until `sni` is served with a certificate chained to `root` (other than `not`).
fn wait_for_certificate(
    root: &str,
    port: u16,
    sni: &str,
    not: Option<&[u8]>,
    timeout: Duration,
    context: &dyn Fn() -> String,
) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match served_by(root, port, sni) {
            Ok(der) if Some(der.as_slice()) != not => return der,
            Ok(_) => last = "the previous certificate".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{sni} was not served with a new certificate from pebble ({last})\n{}",
        context()
    );
}

/// Names in a certificate (DER): its subject alternative names.
fn names_in(der: &[u8]) -> Vec<String> {
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64_lines(der)
    );
    lunafront::acme::pem_names(pem.as_bytes())
}

fn base64_lines(der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out.as_bytes()
        .chunks(64)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

struct Setup {
    site: Site,
    pebble: Pebble,
    http: u16,
    https: u16,
    _shop: Server,
    shop_port: u16,
}

impl Setup {
    fn new(validity_seconds: u64) -> Setup {
        Setup::validated_on(validity_seconds, None)
    }

    /// pebble fetches HTTP-01 answers from `port` (a relay in front of HAProxy) when given,
    /// else from HAProxy's HTTP listener.
    fn validated_on(validity_seconds: u64, port: Option<u16>) -> Setup {
        let site = Site::new();
        let http = free_port();
        let https = free_port();
        let pebble = Pebble::start(port.unwrap_or(http), validity_seconds);
        write(
            site.path(),
            "pebble-https-ca.pem",
            &pebble.https_ca.cert_pem,
        );
        let shop = http_backend("shop");
        let shop_port = shop.port;
        Setup {
            site,
            pebble,
            http,
            https,
            _shop: shop,
            shop_port,
        }
    }

    /// The state: `acme` as given, the listeners (redirect and HSTS on), and `domains`.
    fn state(&self, acme_extra: &str, domains: &[&str]) -> String {
        let mut s = format!(
            "version: 1\nacme: {{ directory: \"{}\", ca_file: pebble-https-ca.pem, contact: [ \"mailto:ops@example.com\" ]{acme_extra} }}\nlisteners:\n  http: {{ bind: \"127.0.0.1:{}\", redirect_to: https }}\n  https: {{ bind: \"127.0.0.1:{}\", acme: true, hsts: true }}\nagents:\n  a1: {{ address: 127.0.0.1 }}\nbackends:\n  shop: {{ servers: [ {{ agent: a1, port: {} }} ] }}\ndomains:\n",
            self.pebble.directory(),
            self.http,
            self.https,
            self.shop_port
        );
        for d in domains {
            s.push_str(&format!("  {d}: {{ backend: shop }}\n"));
        }
        s + &self.site.target_block(true)
    }

    fn status(&self, daemon: &Daemon) -> serde_json::Value {
        serde_json::from_str(&daemon.get("/status").1).unwrap()
    }
}

#[test]
fn a_new_domain_is_served_with_a_certificate_from_the_ca_at_runtime_and_a_restart_keeps_it() {
    let s = Setup::new(3600);
    let root = s.pebble.root();
    s.site.write_state(&s.state("", &["shop.example.com"]));

    // `plan` names the certificates the daemon will request.
    let (code, stdout, stderr) = s.site.lunafront(&["plan", "state.yaml"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("Certificates to request from the ACME CA (local")
            && stdout.contains("  + certificate shop.example.com\n"),
        "{stdout}"
    );
    let (code, json, _) = s.site.lunafront(&["plan", "state.yaml", "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        json["acme_requests"],
        serde_json::json!(["shop.example.com"])
    );

    let mut daemon = Daemon::start(s.site.path(), "state.yaml", &[]);
    let first = wait_for_certificate(
        &root,
        s.https,
        "shop.example.com",
        None,
        Duration::from_secs(60),
        &|| format!("{}\n{}", daemon.log_text(), s.pebble.log()),
    );
    assert_eq!(names_in(&first), vec!["shop.example.com".to_string()]);
    // The route behind it, over TLS verified against pebble's root; HSTS on.
    let (head, body) = https_request(
        client_config_trusting(&root),
        s.https,
        "shop.example.com",
        "GET / HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.starts_with("backend=shop"), "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nstrict-transport-security: max-age=31536000\r"),
        "{head}"
    );
    // Plain HTTP is redirected to the HTTPS listener, the challenge path excepted (it was
    // answered by HAProxy from the challenge map: pebble followed no redirect to get it).
    let (head, _) = http_raw(s.http, "shop.example.com", "/a/b?c=d");
    assert!(head.starts_with("HTTP/1.1 308"), "{head}");
    assert!(
        head.contains(&format!(
            "\r\nlocation: https://shop.example.com:{}/a/b?c=d",
            s.https
        )),
        "{head}"
    );
    let (head, body) = http_raw(
        s.http,
        "shop.example.com",
        "/.well-known/acme-challenge/nope",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.starts_with("backend=shop"),
        "no pending challenge: routed: {body}"
    );
    // Nothing is pending any more: the challenge map is empty again.
    let map = s
        .site
        .runtime()
        .run(
            "show map acme/challenges.map",
            lunafront::target::haproxy::socket::Expect::Any,
        )
        .unwrap();
    assert_eq!(map.trim(), "", "challenge entries left behind");

    // A new domain: certified and served without a reload.
    let (reloads, workers) = s.site.generation();
    let started = Instant::now();
    s.site
        .write_state(&s.state("", &["shop.example.com", "blog.example.com"]));
    let blog = wait_for_certificate(
        &root,
        s.https,
        "blog.example.com",
        None,
        Duration::from_secs(60),
        &|| format!("{}\n{}", daemon.log_text(), s.pebble.log()),
    );
    println!(
        "new domain to served with a CA certificate: {:?}",
        started.elapsed()
    );
    assert_eq!(names_in(&blog), vec!["blog.example.com".to_string()]);
    assert_eq!(
        s.site.generation(),
        (reloads, workers.clone()),
        "the new domain's certificate reloaded HAProxy"
    );
    // The certificate is in the files HAProxy reloads from (written once `haproxy -c` has
    // checked them, just after the runtime change), and the store keeps it secret.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .site
        .path()
        .join("live/certs/acme/blog.example.com.pem")
        .exists()
    {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            s.site.live_files().keys()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    use std::os::unix::fs::PermissionsExt;
    for path in [
        "state/acme/certs/blog.example.com.pem",
        "state/acme/account.json",
        "state/acme/default.pem",
        "state/acme/status.json",
    ] {
        let mode = std::fs::metadata(s.site.path().join(path))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{path}");
    }

    // /status and /metrics: each certificate's expiry, no error.
    let status = s.status(&daemon);
    for domain in ["shop.example.com", "blog.example.com"] {
        let c = &status["acme"]["certificates"][domain];
        assert_eq!(c["state"], "valid", "{status:#}");
        assert_eq!(c["failures"], 0);
        assert!(
            c["not_after"].as_str().is_some_and(|t| t.starts_with("20")),
            "{c}"
        );
        assert!(c["last_error"].is_null(), "{c}");
    }
    let metrics = daemon.get("/metrics").1;
    let expiry = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "lunafront_acme_certificate_expiry_timestamp_seconds{domain=\"blog.example.com\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(expiry > lunafront::clock::unix_now(), "{metrics}");
    assert!(
        metrics.contains(
            "lunafront_acme_certificate_failures{domain=\"blog.example.com\",last_error=\"\"} 0"
        ),
        "{metrics}"
    );
    // A plan now has nothing to do and nothing to request.
    let (code, stdout, _) = s
        .site
        .lunafront(&["plan", "state.yaml", "--detailed-exitcode"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(!stdout.contains("Certificates to request"), "{stdout}");

    // A domain removed: its certificate leaves HAProxy at runtime (the store keeps it).
    let store_before =
        std::fs::read(s.site.path().join("state/acme/certs/blog.example.com.pem")).unwrap();
    s.site.write_state(&s.state("", &["shop.example.com"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while names_in(&presented(s.https, "blog.example.com")) != ["lunafront.invalid"] {
        assert!(
            Instant::now() < deadline,
            "blog.example.com's certificate stayed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        s.site.generation(),
        (reloads, workers),
        "removing it reloaded HAProxy"
    );
    s.site
        .write_state(&s.state("", &["shop.example.com", "blog.example.com"]));
    assert_eq!(
        wait_for_certificate(
            &root,
            s.https,
            "blog.example.com",
            None,
            Duration::from_secs(10),
            &|| daemon.log_text(),
        ),
        blog,
        "the stored certificate is served again, not a new one"
    );

    // A restart keeps the certificates: HAProxy serves them again at once, and none is
    // requested anew (pebble is gone: a request would fail and show on /status).
    daemon.stop();
    drop(daemon);
    let Setup { pebble, site, .. } = s;
    drop(pebble);
    let daemon = Daemon::start(site.path(), "state.yaml", &[]);
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(20));
    assert_eq!(served_by(&root, s.https, "blog.example.com").unwrap(), blog);
    assert_eq!(
        served_by(&root, s.https, "shop.example.com").unwrap(),
        first
    );
    let status: serde_json::Value = serde_json::from_str(&daemon.get("/status").1).unwrap();
    for domain in ["shop.example.com", "blog.example.com"] {
        let c = &status["acme"]["certificates"][domain];
        assert_eq!(c["state"], "valid", "{status:#}");
        assert_eq!(c["failures"], 0, "{status:#}");
    }
    assert_eq!(
        std::fs::read(site.path().join("state/acme/certs/blog.example.com.pem")).unwrap(),
        store_before
    );
}

#[test]
fn renewal_replaces_the_certificate_at_runtime() {
    // Certificates live 30 s; renewal is due 25 s before the end but never before a third of
    // the lifetime: 10 s after issuance.
    let s = Setup::new(30);
    let root = s.pebble.root();
    s.site
        .write_state(&s.state(", renew_before: 25s", &["shop.example.com"]));
    let daemon = Daemon::start(s.site.path(), "state.yaml", &[]);
    let context = || format!("{}\n{}", daemon.log_text(), s.pebble.log());
    let first = wait_for_certificate(
        &root,
        s.https,
        "shop.example.com",
        None,
        Duration::from_secs(60),
        &context,
    );
    let (reloads, workers) = s.site.generation();
    let renewed = wait_for_certificate(
        &root,
        s.https,
        "shop.example.com",
        Some(&first),
        Duration::from_secs(90),
        &context,
    );
    assert_ne!(renewed, first);
    assert_eq!(names_in(&renewed), vec!["shop.example.com".to_string()]);
    assert_eq!(
        s.site.generation(),
        (reloads, workers),
        "the renewal reloaded HAProxy"
    );
    // What HAProxy serves is what its files hold (written just after the runtime change).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let file = s.site.live_files()["certs/acme/shop.example.com.pem"].clone();
        if String::from_utf8(file)
            .unwrap()
            .contains(&base64_lines(&renewed))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the file holds another certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_domain_whose_validation_fails_reports_the_error_and_does_not_hold_up_the_others() {
    let s = Setup::new(3600);
    let root = s.pebble.root();
    // broken.example.com resolves to an address where nothing listens: its HTTP-01
    // validation cannot reach HAProxy.
    s.pebble.dns_admin(
        "/add-a",
        &serde_json::json!({"host": "broken.example.com", "addresses": ["127.0.0.2"]}),
    );
    s.site
        .write_state(&s.state("", &["broken.example.com", "shop.example.com"]));
    let daemon = Daemon::start(s.site.path(), "state.yaml", &[]);
    let context = || format!("{}\n{}", daemon.log_text(), s.pebble.log());
    wait_for_certificate(
        &root,
        s.https,
        "shop.example.com",
        None,
        Duration::from_secs(60),
        &context,
    );
    let body = daemon.wait_for(
        "/status",
        200,
        "\"state\":\"failing\"",
        Duration::from_secs(60),
    );
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let broken = &status["acme"]["certificates"]["broken.example.com"];
    assert_eq!(broken["failures"], 1, "{broken:#}");
    assert_eq!(broken["last_error_kind"], "connection", "{broken:#}");
    let error = broken["last_error"].as_str().unwrap();
    assert!(error.contains("127.0.0.2"), "{error}");
    assert!(broken["next_attempt"].is_string(), "{broken:#}");
    assert_eq!(
        status["acme"]["certificates"]["shop.example.com"]["state"], "valid",
        "{status:#}"
    );
    let metrics = daemon.get("/metrics").1;
    assert!(
        metrics.contains(
            "lunafront_acme_certificate_failures{domain=\"broken.example.com\",last_error=\"connection\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "lunafront_acme_certificate_expiry_timestamp_seconds{domain=\"broken.example.com\"} 0"
        ),
        "{metrics}"
    );
    // The failing name gets the default certificate meanwhile; the daemon stays healthy.
    assert_eq!(
        names_in(&presented(s.https, "broken.example.com")),
        vec!["lunafront.invalid".to_string()]
    );
    assert!(served_by(&root, s.https, "broken.example.com").is_err());
    daemon.wait_for("/ready", 200, "ok", Duration::from_secs(5));
    // It is not retried in a loop: the next attempt is minutes away.
    let next = broken["next_attempt"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(2));
    let status: serde_json::Value = serde_json::from_str(&daemon.get("/status").1).unwrap();
    assert_eq!(
        status["acme"]["certificates"]["broken.example.com"]["failures"],
        1
    );
    assert_eq!(
        status["acme"]["certificates"]["broken.example.com"]["next_attempt"],
        next
    );
}

#[test]
fn a_wildcard_gets_its_certificate_through_the_dns_hook() {
    let s = Setup::new(3600);
    let root = s.pebble.root();
    // The hook publishes the TXT record through challtestsrv's management API (bash only).
    let hook = write(
        s.site.path(),
        "dns-hook",
        &format!(
            "#!/bin/bash\nset -e\ncase \"$1\" in set) path=/set-txt; body=\"{{\\\"host\\\":\\\"$2.\\\",\\\"value\\\":\\\"$3\\\"}}\";; clear) path=/clear-txt; body=\"{{\\\"host\\\":\\\"$2.\\\"}}\";; *) exit 2;; esac\necho \"$1 $2 $3\" >> \"$(dirname \"$0\")/dns-hook.log\"\nexec 3<>/dev/tcp/127.0.0.1/{}\nprintf 'POST %s HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s' \"$path\" \"${{#body}}\" \"$body\" >&3\nread -r status <&3\ncase \"$status\" in *\" 200 \"*) exit 0;; *) echo \"$status\" >&2; exit 1;; esac\n",
            s.pebble.dns_management
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    s.site.write_state(&s.state(
        &format!(", dns_hook: {}", hook.display()),
        &["\"*.preview.example.com\""],
    ));
    let daemon = Daemon::start(s.site.path(), "state.yaml", &[]);
    let context = || format!("{}\n{}", daemon.log_text(), s.pebble.log());
    let der = wait_for_certificate(
        &root,
        s.https,
        "pr-7.preview.example.com",
        None,
        Duration::from_secs(60),
        &context,
    );
    assert_eq!(names_in(&der), vec!["*.preview.example.com".to_string()]);
    let log = std::fs::read_to_string(s.site.path().join("dns-hook.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].starts_with("set _acme-challenge.preview.example.com "),
        "{log}"
    );
    assert!(
        lines[1].starts_with("clear _acme-challenge.preview.example.com "),
        "{log}"
    );
}

/// A TCP relay to HAProxy's HTTP listener that holds every connection until released: pebble's
/// validation request waits in it while the test does something to HAProxy.
struct HeldRelay {
    port: u16,
    held: Arc<std::sync::atomic::AtomicUsize>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl HeldRelay {
    fn bind() -> (HeldRelay, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = HeldRelay {
            port: listener.local_addr().unwrap().port(),
            held: Default::default(),
            release: Default::default(),
        };
        (relay, listener)
    }

    fn relay_to(&self, listener: std::net::TcpListener, to: u16) {
        use std::sync::atomic::Ordering;
        let (held, release) = (self.held.clone(), self.release.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                held.fetch_add(1, Ordering::SeqCst);
                let release = release.clone();
                std::thread::spawn(move || {
                    while !release.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let Ok(upstream) = TcpStream::connect(("127.0.0.1", to)) else {
                        return;
                    };
                    let (mut c_read, mut u_write) =
                        (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                    let forward = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c_read, &mut u_write);
                        let _ = u_write.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut u_read, mut c_write) = (upstream, client);
                    let _ = std::io::copy(&mut u_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                    let _ = forward.join();
                });
            }
        });
    }
}

/// Issue 15: HTTP-01 answers lived in HAProxy's runtime challenge map only, so a HAProxy that
/// died and was restarted by the daemon's supervisor while the CA was validating answered 404:
/// the validation failed and the domain waited a back-off for nothing. Putting the answers
/// back through the runtime API after the restart still left a window (a CI run saw one of
/// pebble's three validation requests arrive in it). The answer is in the map file HAProxy
/// loads, so the new HAProxy answers from its first request: the relay lets pebble through as
/// soon as the new HAProxy accepts connections.
#[test]
fn a_haproxy_restarted_during_validation_still_answers_the_challenge() {
    use std::sync::atomic::Ordering;
    let (relay, listener) = HeldRelay::bind();
    let s = Setup::validated_on(3600, Some(relay.port));
    relay.relay_to(listener, s.http);
    let root = s.pebble.root();
    s.site.write_state(&s.state("", &["shop.example.com"]));
    let daemon = Daemon::start(s.site.path(), "state.yaml", &[]);

    // pebble is validating: the answer is published and its request waits in the relay.
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.held.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "pebble never validated:\n{}\n{}",
            daemon.log_text(),
            s.pebble.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let map = std::fs::read_to_string(s.site.path().join("live/acme/challenges.map")).unwrap();
    assert!(
        map.starts_with("shop.example.com/"),
        "the pending answer is not in the challenge map file a restarted HAProxy loads: {map:?}"
    );
    // HAProxy dies; the supervisor starts a new one on the files.
    let before = s
        .site
        .master()
        .show_proc(Duration::from_secs(2))
        .expect("master answers");
    for pid in before.current().map(|w| w.pid).chain([before.master_pid]) {
        // SAFETY: kill(2) on the HAProxy this test's daemon started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", s.http)).is_ok() {
        assert!(Instant::now() < deadline, "HAProxy did not die");
        std::thread::sleep(Duration::from_millis(5));
    }
    while TcpStream::connect(("127.0.0.1", s.http)).is_err() {
        assert!(
            Instant::now() < deadline,
            "HAProxy was not restarted:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.release.store(true, Ordering::SeqCst);

    let served = wait_for_certificate(
        &root,
        s.https,
        "shop.example.com",
        None,
        Duration::from_secs(60),
        &|| format!("{}\n{}", daemon.log_text(), s.pebble.log()),
    );
    assert_eq!(names_in(&served), vec!["shop.example.com".to_string()]);
    let status = s.status(&daemon);
    assert_eq!(
        status["acme"]["certificates"]["shop.example.com"]["failures"], 0,
        "the validation during the restart failed: {status:#}"
    );
}
